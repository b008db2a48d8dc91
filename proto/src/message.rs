//! Frame headers and message bodies: encoding and validated decoding.

use thiserror::Error;

/// First four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"TSP\x01");
/// Layout version of the frame header.
pub const FRAME_VERSION: u8 = 1;
/// Size of the frame header.
pub const HEADER_LEN: usize = 32;
/// Largest data payload of one request (4 MiB).
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Largest frame body: fixed fields plus payload.
pub const MAX_BODY: u32 = MAX_PAYLOAD + 4096;
/// Lowest protocol version this build speaks.
pub const PROTOCOL_MIN: u16 = 1;
/// Highest protocol version this build speaks (2: local sessions, with
/// `MapMemory`, `ReadShm` and `WriteShm`; 3: the node's boot identity in
/// [`HelloReply`]; 4: a `Fence` reply says which chunks the node doubts,
/// and `Vouch`; 5: the node keeps the activity marks — a write into an
/// extent not marked for its epoch marks it durably first — and lists them
/// in `Fence` replies; `Unmark`).
pub const PROTOCOL_MAX: u16 = 5;
/// First protocol version whose node keeps activity marks.
pub const PROTOCOL_MARKS: u16 = 5;
/// First protocol version whose [`HelloReply`] carries the node's boot identity.
pub const PROTOCOL_BOOT: u16 = 3;
/// Most memory regions one local session maps.
pub const MAX_REGIONS: usize = 64;
/// Most shared-memory segments one `ReadShm`/`WriteShm` names.
pub const MAX_SEGMENTS: usize = 1024;
/// Sector size: offsets and lengths of chunk I/O are multiples of it.
pub const SECTOR: u32 = 512;

/// Header flag: the frame is a reply.
pub const FLAG_REPLY: u16 = 1;

/// Why a frame or body is malformed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported frame version {0}")]
    BadVersion(u8),
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("unknown flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("frame body of {0} bytes exceeds the limit")]
    BodyTooLarge(u32),
    #[error("{op:?} body is {got} bytes, expected {expected}")]
    BodyLength {
        op: Opcode,
        got: usize,
        expected: usize,
    },
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("I/O range offset {offset} length {len} is not sector aligned")]
    Unaligned { offset: u32, len: u32 },
    #[error("unknown status code {0}")]
    UnknownStatus(u32),
    #[error("a request frame carries status {0}")]
    StatusInRequest(u32),
    #[error("frame is a request where a reply was expected, or the reverse")]
    Direction,
    #[error("shared-memory request: {0}")]
    BadShm(&'static str),
}

/// What a frame asks (or, in a reply, answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Hello = 1,
    Read = 2,
    Write = 3,
    Flush = 4,
    Discard = 5,
    WriteZeroes = 6,
    Fence = 7,
    DeleteVdisk = 8,
    /// First frame of a local session (Unix socket): the client's memory
    /// regions, whose file descriptors ride along (`SCM_RIGHTS`).
    MapMemory = 9,
    /// A read placed by the node straight into the client's mapped memory.
    ReadShm = 10,
    /// A write the node takes from the client's mapped memory.
    WriteShm = 11,
    /// The writer rebuilt every chunk of a copy the node doubted (protocol
    /// version 4): see [`FenceReply`].
    Vouch = 12,
    /// The writer's copies agree in the named extents (protocol version
    /// 5): their marks go. See [`UnmarkRef`].
    Unmark = 13,
}

impl TryFrom<u8> for Opcode {
    type Error = ProtoError;
    fn try_from(v: u8) -> Result<Self, ProtoError> {
        Ok(match v {
            1 => Opcode::Hello,
            2 => Opcode::Read,
            3 => Opcode::Write,
            4 => Opcode::Flush,
            5 => Opcode::Discard,
            6 => Opcode::WriteZeroes,
            7 => Opcode::Fence,
            8 => Opcode::DeleteVdisk,
            9 => Opcode::MapMemory,
            10 => Opcode::ReadShm,
            11 => Opcode::WriteShm,
            12 => Opcode::Vouch,
            13 => Opcode::Unmark,
            other => return Err(ProtoError::UnknownOpcode(other)),
        })
    }
}

/// Outcome of a request, carried in the reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    /// The request's epoch is older than the vDisk's epoch on the node: the
    /// sender has been fenced. The reply body holds the node's epoch.
    StaleEpoch = 1,
    /// The node has no such disk.
    NoSuchDisk = 2,
    /// The request is well-formed but not valid (range beyond the chunk, …).
    Invalid = 3,
    /// The disk failed the I/O.
    IoError = 4,
    /// Stored data failed its checksum.
    Checksum = 5,
    /// The disk has no free extent.
    NoSpace = 6,
    /// The protocol versions offered are not spoken by the node.
    Unsupported = 7,
    /// A write's payload failed its checksum in transit (or its buffer
    /// changed while it was sent): nothing was written; the sender may retry.
    BadPayload = 8,
}

impl TryFrom<u32> for Status {
    type Error = ProtoError;
    fn try_from(v: u32) -> Result<Self, ProtoError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::StaleEpoch,
            2 => Status::NoSuchDisk,
            3 => Status::Invalid,
            4 => Status::IoError,
            5 => Status::Checksum,
            6 => Status::NoSpace,
            7 => Status::Unsupported,
            8 => Status::BadPayload,
            other => return Err(ProtoError::UnknownStatus(other)),
        })
    }
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub opcode: Opcode,
    pub flags: u16,
    pub id: u64,
    pub body_len: u32,
    pub status: u32,
    pub payload_crc: u32,
}

impl Header {
    /// A request header.
    pub fn request(opcode: Opcode, id: u64, body_len: u32, payload_crc: u32) -> Self {
        Header {
            opcode,
            flags: 0,
            id,
            body_len,
            status: 0,
            payload_crc,
        }
    }

    /// A reply header.
    pub fn reply(opcode: Opcode, id: u64, status: Status, body_len: u32, payload_crc: u32) -> Self {
        Header {
            opcode,
            flags: FLAG_REPLY,
            id,
            body_len,
            status: status as u32,
            payload_crc,
        }
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// The reply status (`Ok` for requests).
    pub fn status(&self) -> Status {
        // decode() only accepts known status codes.
        Status::try_from(self.status).unwrap_or(Status::Invalid)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = FRAME_VERSION;
        b[5] = self.opcode as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.status.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = tessera_crc::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = le32(&b[0..4]);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        if b[4] != FRAME_VERSION {
            return Err(ProtoError::BadVersion(b[4]));
        }
        if tessera_crc::crc32c(&b[0..28]) != le32(&b[28..32]) {
            return Err(ProtoError::HeaderChecksum);
        }
        let opcode = Opcode::try_from(b[5])?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags & !FLAG_REPLY != 0 {
            return Err(ProtoError::UnknownFlags(flags));
        }
        let body_len = le32(&b[16..20]);
        if body_len > MAX_BODY {
            return Err(ProtoError::BodyTooLarge(body_len));
        }
        let status = le32(&b[20..24]);
        Status::try_from(status)?;
        if flags & FLAG_REPLY == 0 && status != 0 {
            return Err(ProtoError::StatusInRequest(status));
        }
        Ok(Header {
            opcode,
            flags,
            id: le64(&b[8..16]),
            body_len,
            status,
            payload_crc: le32(&b[24..28]),
        })
    }
}

/// Bytes of the largest block of fixed fields of any request ([`ShmRange`]).
pub const MAX_FIXED: usize = ShmRange::LEN;

/// Addresses a range inside one chunk of one vDisk on one disk of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    pub vdisk: [u8; 16],
    pub disk: [u8; 16],
    pub chunk: u64,
    /// Byte offset inside the chunk, a multiple of [`SECTOR`].
    pub offset: u32,
    /// Byte length, a multiple of [`SECTOR`].
    pub len: u32,
    /// The writer's epoch (fencing); ignored by reads.
    pub epoch: u64,
}

impl ChunkRange {
    pub const LEN: usize = 56;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..16].copy_from_slice(&self.vdisk);
        b[16..32].copy_from_slice(&self.disk);
        b[32..40].copy_from_slice(&self.chunk.to_le_bytes());
        b[40..44].copy_from_slice(&self.offset.to_le_bytes());
        b[44..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..56].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let r = ChunkRange {
            vdisk: b[0..16].try_into().expect("16 bytes"),
            disk: b[16..32].try_into().expect("16 bytes"),
            chunk: le64(&b[32..40]),
            offset: le32(&b[40..44]),
            len: le32(&b[44..48]),
            epoch: le64(&b[48..56]),
        };
        if r.offset % SECTOR != 0 || r.len % SECTOR != 0 || r.len > MAX_PAYLOAD {
            return Err(ProtoError::Unaligned {
                offset: r.offset,
                len: r.len,
            });
        }
        Ok(r)
    }
}

/// Fixed fields of `ReadShm` and `WriteShm`: the chunk range, and the
/// segments of the client's mapped memory that hold (or receive) its data,
/// which follow as the frame's payload ([`ShmSeg`], 16 bytes each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRange {
    pub range: ChunkRange,
    /// [`SHM_CHECK_CRC`]: the header's `payload_crc` is the data's crc32c,
    /// which the node checks on the bytes it took (a write).
    pub flags: u32,
    pub segments: u32,
}

/// `ShmRange::flags`: check the data against the header's `payload_crc`.
pub const SHM_CHECK_CRC: u32 = 1;

/// Flag of a `Fence` reply (protocol version 3): the vDisk's epoch was last
/// raised, on every disk fenced, during the machine's current boot.
pub const FENCE_SAME_BOOT: u64 = 1;
/// Flag of a `Fence` reply (protocol version 4): the node lost metadata
/// that would say which of the vDisk's chunks it holds (its block map, or
/// an extent record naming no owner), so any chunk not rewritten whole
/// since may read as an error: the writer should rebuild the whole copy and
/// then send `Vouch` with the reply's token.
pub const FENCE_DOUBTFUL: u64 = 2;
/// Most chunks a `Fence` reply lists as doubted one by one; beyond that
/// the node says [`FENCE_DOUBTFUL`] instead.
pub const MAX_DOUBTED: usize = 4096;
/// Flag of a `Fence` reply (protocol version 5): the node lost its activity
/// marks, so any extent of the vDisk may hold writes not every copy has.
pub const FENCE_MARKS_LOST: u64 = 4;
/// Most activity marks a `Fence` reply lists; beyond that the node says
/// [`FENCE_MARKS_LOST`] instead (every extent is in doubt).
pub const MAX_MARKS: usize = 4096;
/// Most extents one `Unmark` names.
pub const MAX_UNMARK: usize = 4096;

/// Chunks per activity extent, as the node marks them: a write into chunk
/// `c` marks extent `c / activity_extent_chunks()`. Fixed by protocol
/// version 5 at [`ACTIVITY_EXTENT_CHUNKS`]; a simulation that runs writer
/// and nodes in one process may set it smaller for every one of them
/// ([`set_activity_extent_chunks`]).
pub fn activity_extent_chunks() -> u64 {
    EXTENT_CHUNKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets [`activity_extent_chunks`] for the whole process (at least 1).
pub fn set_activity_extent_chunks(chunks: u64) {
    EXTENT_CHUNKS.store(chunks.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Chunks per activity extent of protocol version 5 (256 MiB of 1 MiB
/// chunks): few enough marks per vDisk to list, few enough chunks per
/// extent to reconcile after a writer crash.
pub const ACTIVITY_EXTENT_CHUNKS: u64 = 256;

static EXTENT_CHUNKS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(ACTIVITY_EXTENT_CHUNKS);

/// A `Fence` reply's body: `epoch` (u64), flags (u64), then (version 4)
/// the doubt token (u64), the number of doubted chunks (u32) and the
/// chunks (u64 each), then (version 5) the number of activity marks (u32)
/// and the marks (extent u64, epoch u64 each). Every number little-endian.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceReply {
    /// The vDisk's epoch on the node after the fence.
    pub epoch: u64,
    /// [`FENCE_SAME_BOOT`]: the epoch was last raised during this boot.
    pub same_boot: bool,
    /// [`FENCE_DOUBTFUL`]: every chunk not rewritten whole since is in
    /// doubt.
    pub doubtful: bool,
    /// Names the node's current doubt (it changes when the node restarts):
    /// `Vouch` must quote it. 0 when the node doubts nothing.
    pub token: u64,
    /// Chunks whose damaged extent records name them: each may read as an
    /// error until rewritten whole (at most [`MAX_DOUBTED`]).
    pub doubted: Vec<u64>,
    /// [`FENCE_MARKS_LOST`]: the node lost its activity marks.
    pub marks_lost: bool,
    /// The node's activity marks of the vDisk: (extent, epoch of the
    /// newest writer that marked it), at most [`MAX_MARKS`].
    pub marks: Vec<(u64, u64)>,
}

impl FenceReply {
    pub fn encode(&self) -> Vec<u8> {
        let flags = u64::from(self.same_boot) * FENCE_SAME_BOOT
            + u64::from(self.doubtful) * FENCE_DOUBTFUL
            + u64::from(self.marks_lost) * FENCE_MARKS_LOST;
        let mut b = Vec::with_capacity(32 + 8 * self.doubted.len() + 16 * self.marks.len());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.token.to_le_bytes());
        b.extend_from_slice(&(self.doubted.len() as u32).to_le_bytes());
        for c in &self.doubted {
            b.extend_from_slice(&c.to_le_bytes());
        }
        if !self.marks.is_empty() {
            b.extend_from_slice(&(self.marks.len() as u32).to_le_bytes());
            for (x, e) in &self.marks {
                b.extend_from_slice(&x.to_le_bytes());
                b.extend_from_slice(&e.to_le_bytes());
            }
        }
        b
    }

    /// Decodes a reply of any version (fields a version lacks are
    /// false, 0 or empty); `None` if it is shorter or longer than its own
    /// counts say or lists more than [`MAX_DOUBTED`] chunks or
    /// [`MAX_MARKS`] marks.
    pub fn decode(body: &[u8]) -> Option<FenceReply> {
        let epoch = le64(body.get(..8)?);
        let flags = body.get(8..16).map_or(0, le64);
        let token = body.get(16..24).map_or(0, le64);
        let count = body.get(24..28).map_or(0, le32) as usize;
        if count > MAX_DOUBTED {
            return None;
        }
        let list = body.get(28..28 + 8 * count).unwrap_or(&[]);
        if list.len() != 8 * count {
            return None;
        }
        let rest = body.get(28 + 8 * count..).unwrap_or(&[]);
        let marks = match rest.get(..4) {
            None if rest.is_empty() => Vec::new(),
            None => return None,
            Some(n) => {
                let n = le32(n) as usize;
                if n > MAX_MARKS || rest.len() != 4 + 16 * n {
                    return None;
                }
                rest[4..]
                    .chunks_exact(16)
                    .map(|m| (le64(&m[..8]), le64(&m[8..])))
                    .collect()
            }
        };
        Some(FenceReply {
            epoch,
            same_boot: flags & FENCE_SAME_BOOT != 0,
            doubtful: flags & FENCE_DOUBTFUL != 0,
            token,
            doubted: list.chunks_exact(8).map(le64).collect(),
            marks_lost: flags & FENCE_MARKS_LOST != 0,
            marks,
        })
    }
}

/// Reads a `Fence` reply's body: the epoch, and whether the node says the
/// epoch was last raised during its current boot (`false` when it does not
/// say: a node speaking an older version).
pub fn decode_fence_reply(body: &[u8]) -> Option<(u64, bool)> {
    FenceReply::decode(body).map(|r| (r.epoch, r.same_boot))
}

impl ShmRange {
    pub const LEN: usize = ChunkRange::LEN + 8;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..ChunkRange::LEN].copy_from_slice(&self.range.encode());
        b[56..60].copy_from_slice(&self.flags.to_le_bytes());
        b[60..64].copy_from_slice(&self.segments.to_le_bytes());
        b
    }

    /// Decodes the fixed fields and checks the segment list that follows:
    /// its length, and that the segments add up to the range's length.
    fn decode(body: &[u8]) -> Result<(Self, &[u8]), ProtoError> {
        let r = ShmRange {
            range: ChunkRange::decode(&body[..ChunkRange::LEN])?,
            flags: le32(&body[56..60]),
            segments: le32(&body[60..64]),
        };
        if r.flags & !SHM_CHECK_CRC != 0 {
            return Err(ProtoError::BadShm("unknown flags"));
        }
        let n = r.segments as usize;
        if n == 0 || n > MAX_SEGMENTS {
            return Err(ProtoError::BadShm("segment count out of range"));
        }
        let segs = &body[Self::LEN..];
        if segs.len() != n * ShmSeg::LEN {
            return Err(ProtoError::BadShm("segment list length"));
        }
        let total =
            ShmSeg::iter(segs).try_fold(0u64, |t, s| (s.len > 0).then_some(t + u64::from(s.len)));
        if total != Some(u64::from(r.range.len)) {
            return Err(ProtoError::BadShm("segments do not add up to the range"));
        }
        Ok((r, segs))
    }
}

/// One piece of a local request's data in the client's memory: `len` bytes
/// at `offset` in region `region` of the session's `MapMemory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmSeg {
    pub region: u32,
    pub len: u32,
    pub offset: u64,
}

impl ShmSeg {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.region.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// The segments of an encoded list (whole entries only).
    pub fn iter(b: &[u8]) -> impl Iterator<Item = ShmSeg> + '_ {
        b.chunks_exact(Self::LEN).map(|c| ShmSeg {
            region: le32(&c[0..4]),
            len: le32(&c[4..8]),
            offset: le64(&c[8..16]),
        })
    }
}

/// One region of `MapMemory`: `len` bytes of the n-th passed file
/// descriptor, from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRegion {
    pub len: u64,
    pub offset: u64,
}

impl ShmRegion {
    pub const LEN: usize = 16;

    /// A `MapMemory` body: a count, then the regions.
    pub fn encode_list(regions: &[ShmRegion]) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + regions.len() * Self::LEN);
        b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 4]);
        for r in regions {
            b.extend_from_slice(&r.len.to_le_bytes());
            b.extend_from_slice(&r.offset.to_le_bytes());
        }
        b
    }

    /// Decodes a `MapMemory` body; every region is non-empty and its end
    /// fits in 64 bits.
    pub fn decode_list(body: &[u8]) -> Result<Vec<ShmRegion>, ProtoError> {
        if body.len() < 8 {
            return Err(ProtoError::BadShm("region list too short"));
        }
        let n = le32(&body[0..4]) as usize;
        if n > MAX_REGIONS {
            return Err(ProtoError::BadShm("too many regions"));
        }
        if body.len() != 8 + n * Self::LEN {
            return Err(ProtoError::BadShm("region list length"));
        }
        body[8..]
            .chunks_exact(Self::LEN)
            .map(|c| {
                let r = ShmRegion {
                    len: le64(&c[0..8]),
                    offset: le64(&c[8..16]),
                };
                if r.len == 0 || r.offset.checked_add(r.len).is_none() {
                    return Err(ProtoError::BadShm("empty or overflowing region"));
                }
                Ok(r)
            })
            .collect()
    }
}

/// Names one disk of the node (all zeros: every disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRef {
    pub disk: [u8; 16],
}

/// Fixed fields of `Fence` and `DeleteVdisk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VdiskRef {
    pub vdisk: [u8; 16],
    pub disk: [u8; 16],
    pub epoch: u64,
}

impl VdiskRef {
    pub const LEN: usize = 40;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..16].copy_from_slice(&self.vdisk);
        b[16..32].copy_from_slice(&self.disk);
        b[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }
}

/// Fixed fields of `Vouch`: the writer (at `vref.epoch`) rebuilt every
/// chunk of its copy on `vref.disk` since the node answered a fence with
/// [`FENCE_DOUBTFUL`] and `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VouchRef {
    pub vref: VdiskRef,
    pub token: u64,
}

impl VouchRef {
    pub const LEN: usize = VdiskRef::LEN + 8;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..VdiskRef::LEN].copy_from_slice(&self.vref.encode());
        b[VdiskRef::LEN..].copy_from_slice(&self.token.to_le_bytes());
        b
    }
}

/// Fixed fields of `Unmark` (protocol version 5): the writer at
/// `vref.epoch` (fenced like a write on `vref.disk`) says that its copies
/// agree in `count` extents of `vref.vdisk`, which follow as the frame's
/// payload (u64 each; none: every extent). The node removes its marks of
/// those extents whose epoch is at most `upto` (and at most `vref.epoch`):
/// a writer clears older writers' marks without its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmarkRef {
    pub vref: VdiskRef,
    pub count: u32,
    pub upto: u64,
}

impl UnmarkRef {
    pub const LEN: usize = VdiskRef::LEN + 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..VdiskRef::LEN].copy_from_slice(&self.vref.encode());
        b[VdiskRef::LEN..VdiskRef::LEN + 4].copy_from_slice(&self.count.to_le_bytes());
        b[VdiskRef::LEN + 8..].copy_from_slice(&self.upto.to_le_bytes());
        b
    }

    /// The extents of an `Unmark`'s payload (checked by `Request::decode`).
    pub fn extents(payload: &[u8]) -> impl Iterator<Item = u64> + '_ {
        payload.chunks_exact(8).map(le64)
    }

    /// Encodes a list of extents as an `Unmark`'s payload.
    pub fn encode_extents(extents: &[u64]) -> Vec<u8> {
        extents.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

/// Fixed fields of `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Who is calling (the volume client's session), for the node's logs.
    pub client: [u8; 16],
}

impl Hello {
    pub const LEN: usize = 24;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..2].copy_from_slice(&self.min_version.to_le_bytes());
        b[2..4].copy_from_slice(&self.max_version.to_le_bytes());
        b[8..24].copy_from_slice(&self.client);
        b
    }
}

/// A decoded request. `Write` borrows its payload from the frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Hello(Hello),
    Read(ChunkRange),
    Write(ChunkRange, &'a [u8]),
    Flush(DiskRef),
    Discard(ChunkRange),
    WriteZeroes(ChunkRange),
    Fence(VdiskRef),
    DeleteVdisk(VdiskRef),
    Vouch(VouchRef),
    /// Fixed fields and the encoded extents.
    Unmark(UnmarkRef, &'a [u8]),
    /// The regions' list as encoded ([`ShmRegion::decode_list`] checked it).
    MapMemory(&'a [u8]),
    /// Fixed fields and the encoded segment list.
    ReadShm(ShmRange, &'a [u8]),
    WriteShm(ShmRange, &'a [u8]),
}

impl<'a> Request<'a> {
    /// Decodes and validates a request body for `header`.
    pub fn decode(header: &Header, body: &'a [u8]) -> Result<Self, ProtoError> {
        if header.is_reply() {
            return Err(ProtoError::Direction);
        }
        let op = header.opcode;
        let exact = |expected: usize| -> Result<(), ProtoError> {
            if body.len() != expected {
                return Err(ProtoError::BodyLength {
                    op,
                    got: body.len(),
                    expected,
                });
            }
            Ok(())
        };
        Ok(match op {
            Opcode::Hello => {
                exact(Hello::LEN)?;
                Request::Hello(Hello {
                    min_version: u16::from_le_bytes([body[0], body[1]]),
                    max_version: u16::from_le_bytes([body[2], body[3]]),
                    client: body[8..24].try_into().expect("16 bytes"),
                })
            }
            Opcode::Read | Opcode::Discard | Opcode::WriteZeroes => {
                exact(ChunkRange::LEN)?;
                let r = ChunkRange::decode(body)?;
                match op {
                    Opcode::Read => Request::Read(r),
                    Opcode::Discard => Request::Discard(r),
                    _ => Request::WriteZeroes(r),
                }
            }
            Opcode::Write => {
                if body.len() < ChunkRange::LEN {
                    return Err(ProtoError::BodyLength {
                        op,
                        got: body.len(),
                        expected: ChunkRange::LEN,
                    });
                }
                let r = ChunkRange::decode(&body[..ChunkRange::LEN])?;
                exact(ChunkRange::LEN + r.len as usize)?;
                let payload = &body[ChunkRange::LEN..];
                if tessera_crc::crc32c(payload) != header.payload_crc {
                    return Err(ProtoError::PayloadChecksum);
                }
                Request::Write(r, payload)
            }
            Opcode::Flush => {
                exact(16)?;
                Request::Flush(DiskRef {
                    disk: body[0..16].try_into().expect("16 bytes"),
                })
            }
            Opcode::Fence | Opcode::DeleteVdisk => {
                exact(VdiskRef::LEN)?;
                let v = VdiskRef {
                    vdisk: body[0..16].try_into().expect("16 bytes"),
                    disk: body[16..32].try_into().expect("16 bytes"),
                    epoch: le64(&body[32..40]),
                };
                if op == Opcode::Fence {
                    Request::Fence(v)
                } else {
                    Request::DeleteVdisk(v)
                }
            }
            Opcode::Vouch => {
                exact(VouchRef::LEN)?;
                Request::Vouch(VouchRef {
                    vref: VdiskRef {
                        vdisk: body[0..16].try_into().expect("16 bytes"),
                        disk: body[16..32].try_into().expect("16 bytes"),
                        epoch: le64(&body[32..40]),
                    },
                    token: le64(&body[40..48]),
                })
            }
            Opcode::Unmark => {
                if body.len() < UnmarkRef::LEN {
                    return Err(ProtoError::BodyLength {
                        op,
                        got: body.len(),
                        expected: UnmarkRef::LEN,
                    });
                }
                let count = le32(&body[40..44]);
                if count as usize > MAX_UNMARK || body[44..48] != [0; 4] {
                    return Err(ProtoError::BodyLength {
                        op,
                        got: body.len(),
                        expected: UnmarkRef::LEN,
                    });
                }
                exact(UnmarkRef::LEN + 8 * count as usize)?;
                Request::Unmark(
                    UnmarkRef {
                        vref: VdiskRef {
                            vdisk: body[0..16].try_into().expect("16 bytes"),
                            disk: body[16..32].try_into().expect("16 bytes"),
                            epoch: le64(&body[32..40]),
                        },
                        count,
                        upto: le64(&body[48..56]),
                    },
                    &body[UnmarkRef::LEN..],
                )
            }
            Opcode::MapMemory => {
                ShmRegion::decode_list(body)?;
                Request::MapMemory(body)
            }
            Opcode::ReadShm | Opcode::WriteShm => {
                if body.len() < ShmRange::LEN {
                    return Err(ProtoError::BodyLength {
                        op,
                        got: body.len(),
                        expected: ShmRange::LEN,
                    });
                }
                let (r, segs) = ShmRange::decode(body)?;
                if op == Opcode::ReadShm {
                    Request::ReadShm(r, segs)
                } else {
                    Request::WriteShm(r, segs)
                }
            }
        })
    }

    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::Hello,
            Request::Read(_) => Opcode::Read,
            Request::Write(..) => Opcode::Write,
            Request::Flush(_) => Opcode::Flush,
            Request::Discard(_) => Opcode::Discard,
            Request::WriteZeroes(_) => Opcode::WriteZeroes,
            Request::Fence(_) => Opcode::Fence,
            Request::DeleteVdisk(_) => Opcode::DeleteVdisk,
            Request::Vouch(_) => Opcode::Vouch,
            Request::Unmark(..) => Opcode::Unmark,
            Request::MapMemory(_) => Opcode::MapMemory,
            Request::ReadShm(..) => Opcode::ReadShm,
            Request::WriteShm(..) => Opcode::WriteShm,
        }
    }

    /// Writes the request's fixed fields (the body without the payload)
    /// into `out`; returns their length. No allocation.
    pub fn encode_fixed(&self, out: &mut [u8; MAX_FIXED]) -> usize {
        let mut put = |b: &[u8]| {
            out[..b.len()].copy_from_slice(b);
            b.len()
        };
        match *self {
            Request::Hello(h) => put(&h.encode()),
            Request::Read(r) | Request::Discard(r) | Request::WriteZeroes(r) => put(&r.encode()),
            Request::Write(r, _) => put(&r.encode()),
            Request::Flush(d) => put(&d.disk),
            Request::Fence(v) | Request::DeleteVdisk(v) => put(&v.encode()),
            Request::Vouch(v) => put(&v.encode()),
            Request::Unmark(u, _) => put(&u.encode()),
            Request::MapMemory(_) => 0,
            Request::ReadShm(r, _) | Request::WriteShm(r, _) => put(&r.encode()),
        }
    }

    /// What follows the fixed fields: a write's data, a local request's
    /// segment list, a `MapMemory` region list.
    pub fn payload(&self) -> &'a [u8] {
        match *self {
            Request::Write(_, p)
            | Request::Unmark(_, p)
            | Request::MapMemory(p)
            | Request::ReadShm(_, p)
            | Request::WriteShm(_, p) => p,
            _ => &[],
        }
    }

    /// Encodes the request's header and fixed fields into `out`; the payload
    /// (for `Write`) is returned separately so it can be sent without a copy.
    pub fn encode_head(&self, id: u64, out: &mut Vec<u8>) -> &'a [u8] {
        let payload = self.payload();
        let mut fixed = [0u8; MAX_FIXED];
        let n = self.encode_fixed(&mut fixed);
        let crc = if !matches!(self, Request::Write(..)) || payload.is_empty() {
            0
        } else {
            tessera_crc::crc32c(payload)
        };
        let body_len = (n + payload.len()) as u32;
        out.extend_from_slice(&Header::request(self.opcode(), id, body_len, crc).encode());
        out.extend_from_slice(&fixed[..n]);
        payload
    }
}

/// Body of the reply to `Hello`.
///
/// ```text
/// offset size field
///      0    2 version   protocol version the node picked
///      2    2 reserved  0
///      4    4 n         number of disks
///      8   16 node      the node's uuid
///     24 16*n disks     the uuids of its disks
///      …   16 boot      (version >= 3) the identity of the machine's current
///                       boot: it changes when the machine restarts, and with
///                       it everything that was only in its page cache is gone
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    pub node: [u8; 16],
    pub disks: Vec<[u8; 16]>,
    /// The node's boot identity; `None` from a node speaking a version
    /// below [`PROTOCOL_BOOT`] (and then not encoded).
    pub boot: Option<[u8; 16]>,
}

impl HelloReply {
    /// Encodes the reply; `boot` is written only for versions that carry it.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(40 + 16 * self.disks.len());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&[0u8; 2]);
        b.extend_from_slice(&(self.disks.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.node);
        for d in &self.disks {
            b.extend_from_slice(d);
        }
        if self.version >= PROTOCOL_BOOT {
            b.extend_from_slice(&self.boot.unwrap_or([0; 16]));
        }
        b
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let bad = |expected| ProtoError::BodyLength {
            op: Opcode::Hello,
            got: body.len(),
            expected,
        };
        if body.len() < 24 {
            return Err(bad(24));
        }
        let version = u16::from_le_bytes([body[0], body[1]]);
        let n = le32(&body[4..8]) as usize;
        let boot_len = if version >= PROTOCOL_BOOT { 16 } else { 0 };
        let disks_end = n
            .checked_mul(16)
            .and_then(|x| x.checked_add(24))
            .ok_or_else(|| bad(usize::MAX))?;
        let expected = disks_end
            .checked_add(boot_len)
            .ok_or_else(|| bad(usize::MAX))?;
        if body.len() != expected {
            return Err(bad(expected));
        }
        Ok(HelloReply {
            version,
            node: body[8..24].try_into().expect("16 bytes"),
            disks: body[24..disks_end]
                .chunks_exact(16)
                .map(|c| c.try_into().expect("16 bytes"))
                .collect(),
            boot: (boot_len > 0).then(|| body[disks_end..].try_into().expect("16 bytes")),
        })
    }
}

pub(crate) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range() -> impl Strategy<Value = ChunkRange> {
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            0u32..8192,
            0u32..64,
            any::<u64>(),
        )
            .prop_map(|(vdisk, disk, chunk, off, len, epoch)| ChunkRange {
                vdisk,
                disk,
                chunk,
                offset: off * SECTOR,
                len: len * SECTOR,
                epoch,
            })
    }

    fn roundtrip(req: Request<'_>, id: u64) {
        let mut head = Vec::new();
        let payload = req.encode_head(id, &mut head);
        let mut frame = head.clone();
        frame.extend_from_slice(payload);
        let hdr = Header::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(hdr.id, id);
        assert_eq!(hdr.body_len as usize, frame.len() - HEADER_LEN);
        let got = Request::decode(&hdr, &frame[HEADER_LEN..]).unwrap();
        assert_eq!(got, req);
    }

    proptest! {
        #[test]
        fn requests_roundtrip(r in range(), id in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..4)) {
            roundtrip(Request::Read(r), id);
            roundtrip(Request::Discard(r), id);
            roundtrip(Request::WriteZeroes(r), id);
            let payload: Vec<u8> = data.iter().cycle().take(r.len as usize).copied().collect();
            if payload.len() == r.len as usize {
                roundtrip(Request::Write(r, &payload), id);
            }
            roundtrip(Request::Fence(VdiskRef { vdisk: r.vdisk, disk: r.disk, epoch: r.epoch }), id);
            roundtrip(Request::DeleteVdisk(VdiskRef { vdisk: r.vdisk, disk: r.disk, epoch: r.epoch }), id);
            roundtrip(Request::Vouch(VouchRef { vref: VdiskRef { vdisk: r.vdisk, disk: r.disk, epoch: r.epoch }, token: r.chunk }), id);
            roundtrip(Request::Flush(DiskRef { disk: r.disk }), id);
            let extents: Vec<u64> = data.iter().map(|&b| u64::from(b).wrapping_mul(r.chunk)).collect();
            let list = UnmarkRef::encode_extents(&extents);
            let vref = VdiskRef { vdisk: r.vdisk, disk: r.disk, epoch: r.epoch };
            roundtrip(Request::Unmark(UnmarkRef { vref, count: extents.len() as u32, upto: r.chunk }, &list), id);
            prop_assert_eq!(UnmarkRef::extents(&list).collect::<Vec<_>>(), extents);
            roundtrip(Request::Hello(Hello { min_version: 1, max_version: r.len as u16, client: r.vdisk }), id);
            // Local requests: the range split into segments of `data[0] + 1`
            // sectors at most.
            if r.len > 0 {
                let step = (u32::from(data.first().copied().unwrap_or(0)) + 1) * SECTOR;
                let mut segs = Vec::new();
                let mut at = 0;
                while at < r.len {
                    let len = step.min(r.len - at);
                    segs.extend_from_slice(&ShmSeg { region: at % 3, len, offset: u64::from(at) * 7 }.encode());
                    at += len;
                }
                let sr = ShmRange { range: r, flags: SHM_CHECK_CRC, segments: (segs.len() / ShmSeg::LEN) as u32 };
                roundtrip(Request::ReadShm(sr, &segs), id);
                roundtrip(Request::WriteShm(ShmRange { flags: 0, ..sr }, &segs), id);
                let total: u64 = ShmSeg::iter(&segs).map(|s| u64::from(s.len)).sum();
                prop_assert_eq!(total, u64::from(r.len));
            }
            let regions: Vec<ShmRegion> = data.iter().map(|&b| ShmRegion { len: u64::from(b) + 1, offset: r.chunk >> 1 }).collect();
            let list = ShmRegion::encode_list(&regions);
            roundtrip(Request::MapMemory(&list), id);
            prop_assert_eq!(ShmRegion::decode_list(&list).unwrap(), regions);
        }

        /// A segment list that does not add up to its range is refused.
        #[test]
        fn shm_segments_must_cover_the_range(r in range(), extra in 1u32..4096) {
            let seg = ShmSeg { region: 0, len: r.len + extra, offset: 0 };
            let sr = ShmRange { range: r, flags: 0, segments: 1 };
            let mut body = sr.encode().to_vec();
            body.extend_from_slice(&seg.encode());
            let h = Header::request(Opcode::ReadShm, 1, body.len() as u32, 0);
            prop_assert!(Request::decode(&h, &body).is_err());
        }

        /// Arbitrary bytes never panic the decoders; whatever decodes re-encodes identically.
        #[test]
        fn arbitrary_frames_never_panic(hdr in any::<[u8; HEADER_LEN]>(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(h) = Header::decode(&hdr) {
                prop_assert_eq!(h.encode(), hdr);
                let _ = Request::decode(&h, &body);
            }
            let _ = HelloReply::decode(&body);
            if let Some(r) = FenceReply::decode(&body) {
                prop_assert!(r.doubted.len() <= MAX_DOUBTED);
                prop_assert!(r.marks.len() <= MAX_MARKS);
            }
        }

        /// A fence reply survives encoding; a version-3 reply (epoch and
        /// flags only) decodes with no doubt.
        #[test]
        fn fence_replies_roundtrip(epoch in any::<u64>(), same in any::<bool>(), doubtful in any::<bool>(), token in any::<u64>(), doubted in proptest::collection::vec(any::<u64>(), 0..40), marks_lost in any::<bool>(), marks in proptest::collection::vec(any::<(u64, u64)>(), 0..40)) {
            let r = FenceReply { epoch, same_boot: same, doubtful, token, doubted, marks_lost, marks };
            let b = r.encode();
            prop_assert_eq!(FenceReply::decode(&b), Some(r.clone()));
            let v3 = FenceReply::decode(&b[..16]).unwrap();
            prop_assert_eq!(v3, FenceReply { epoch, same_boot: same, doubtful, marks_lost, ..Default::default() });
            // A list cut short is refused, not read as fewer entries.
            if !r.doubted.is_empty() || !r.marks.is_empty() {
                prop_assert_eq!(FenceReply::decode(&b[..b.len() - 1]), None);
            }
            // A version-4 reply (no marks) decodes with none.
            let v4 = FenceReply::decode(&b[..28 + 8 * r.doubted.len()]).unwrap();
            prop_assert_eq!(v4, FenceReply { marks: Vec::new(), ..r.clone() });
        }

        /// Headers that are valid except for garbage in the body never panic either.
        #[test]
        fn valid_header_garbage_body(op in 1u8..=13, body in proptest::collection::vec(any::<u8>(), 0..200), crc in any::<u32>()) {
            let h = Header::request(Opcode::try_from(op).unwrap(), 7, body.len() as u32, crc);
            let h = Header::decode(&h.encode()).unwrap();
            let _ = Request::decode(&h, &body);
        }

        /// One flipped bit anywhere in a header is detected.
        #[test]
        fn header_bit_flips_detected(r in range(), bit in 0usize..(HEADER_LEN * 8)) {
            let mut head = Vec::new();
            Request::Read(r).encode_head(9, &mut head);
            let mut h: [u8; HEADER_LEN] = head[..HEADER_LEN].try_into().unwrap();
            h[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Header::decode(&h).is_err());
        }
    }

    #[test]
    fn rejects_bad_lengths_and_alignment() {
        let r = ChunkRange {
            vdisk: [1; 16],
            disk: [2; 16],
            chunk: 3,
            offset: 100,
            len: 512,
            epoch: 1,
        };
        let h = Header::request(Opcode::Read, 1, ChunkRange::LEN as u32, 0);
        assert!(matches!(
            Request::decode(&h, &r.encode()),
            Err(ProtoError::Unaligned { .. })
        ));
        let h = Header::request(Opcode::Read, 1, 10, 0);
        assert!(matches!(
            Request::decode(&h, &[0; 10]),
            Err(ProtoError::BodyLength { .. })
        ));
        // A write whose payload length disagrees with its range.
        let ok = ChunkRange { offset: 0, ..r };
        let mut body = ok.encode().to_vec();
        body.extend_from_slice(&[0; 100]);
        let h = Header::request(Opcode::Write, 1, body.len() as u32, 0);
        assert!(matches!(
            Request::decode(&h, &body),
            Err(ProtoError::BodyLength { .. })
        ));
        // A write whose payload fails its checksum.
        let mut body = ok.encode().to_vec();
        body.extend_from_slice(&[7; 512]);
        let h = Header::request(Opcode::Write, 1, body.len() as u32, 0);
        assert_eq!(Request::decode(&h, &body), Err(ProtoError::PayloadChecksum));
    }

    #[test]
    fn oversized_body_rejected_before_reading_it() {
        let mut h = Header::request(Opcode::Write, 1, 0, 0).encode();
        h[16..20].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        let crc = tessera_crc::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Header::decode(&h),
            Err(ProtoError::BodyTooLarge(MAX_BODY + 1))
        );
    }

    #[test]
    fn hello_reply_roundtrip_and_truncation() {
        for (version, boot) in [(1, None), (2, None), (3, Some([9; 16]))] {
            let r = HelloReply {
                version,
                node: [5; 16],
                disks: vec![[1; 16], [2; 16]],
                boot,
            };
            let b = r.encode();
            assert_eq!(b.len(), 24 + 32 + if boot.is_some() { 16 } else { 0 });
            assert_eq!(HelloReply::decode(&b).unwrap(), r);
            assert!(HelloReply::decode(&b[..b.len() - 1]).is_err());
            let mut longer = b.clone();
            longer.extend_from_slice(&[0; 16]);
            assert!(HelloReply::decode(&longer).is_err());
            let mut huge = b.clone();
            huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(HelloReply::decode(&huge).is_err());
        }
    }

    #[test]
    fn an_old_node_reply_has_no_boot_and_a_new_one_always_has() {
        // A version-2 node's reply decodes with no boot identity.
        let old = HelloReply {
            version: 2,
            node: [5; 16],
            disks: vec![],
            boot: Some([7; 16]),
        };
        assert_eq!(HelloReply::decode(&old.encode()).unwrap().boot, None);
        // A version-3 reply always carries one (zeros if the node had none).
        let new = HelloReply {
            version: 3,
            boot: None,
            ..old
        };
        assert_eq!(
            HelloReply::decode(&new.encode()).unwrap().boot,
            Some([0; 16])
        );
    }
}
