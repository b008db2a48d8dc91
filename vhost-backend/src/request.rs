//! virtio-blk requests: a descriptor chain parsed and validated into a typed
//! [`Request`] before anything is executed.
//!
//! The chain is treated as the spec's byte stream: the device-readable
//! descriptors (which must all come before the device-writable ones) carry
//! the 16-byte header and, for writes and discards, the data; the
//! device-writable descriptors carry the data of reads and GET_ID, and the
//! status byte as their very last byte. Any framing of that stream into
//! descriptors is accepted.

use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes per virtio-blk sector (the unit of `sector` fields, whatever the block size).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a GET_ID answer.
pub const ID_LEN: usize = 20;

/// Limits the device advertises and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size in bytes.
    pub capacity: u64,
    /// Largest data segment (`size_max`).
    pub size_max: u32,
    /// Most data segments in one request (`seg_max`).
    pub seg_max: u32,
    /// Most ranges in one DISCARD / WRITE_ZEROES request.
    pub max_discard_seg: u32,
    /// Largest range of a DISCARD / WRITE_ZEROES, in sectors.
    pub max_discard_sectors: u32,
}

impl Limits {
    /// Largest data length of one request.
    pub fn max_request_bytes(&self) -> u64 {
        self.size_max as u64 * self.seg_max as u64
    }
}

/// A contiguous piece of guest memory holding request data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at `offset` into `segments`.
    Read {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    /// Write `len` bytes from `segments` at `offset`.
    Write {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    Flush,
    /// Write the device id into `segments` (at least [`ID_LEN`] bytes).
    GetId {
        segments: Vec<Segment>,
    },
    Discard {
        ranges: Vec<Range>,
    },
    WriteZeroes {
        ranges: Vec<Range>,
        unmap: bool,
    },
}

/// A validated request and where its status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub status_addr: GuestAddress,
    /// Bytes the device writes into the chain on success (data + status).
    pub used_len_ok: u32,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("descriptor chain is malformed: {0}")]
    Chain(String),
    #[error("the chain has no writable status byte")]
    NoStatus,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request header is {0} bytes, expected 16")]
    ShortHeader(u64),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sector {sector} + {len} bytes is beyond the capacity")]
    OutOfRange { sector: u64, len: u64 },
    #[error("request carries {0} bytes of data, more than the device limit")]
    TooLarge(u64),
    #[error("request carries {0} data segments, more than seg_max")]
    TooManySegments(usize),
    #[error("data in the wrong direction for this request type")]
    WrongDirection,
    #[error("GET_ID buffer is {0} bytes, fewer than 20")]
    ShortIdBuffer(u64),
    #[error("discard/write-zeroes segment list of {0} bytes is malformed")]
    BadRanges(u64),
    #[error("discard/write-zeroes range has reserved flags {0:#x}")]
    ReservedFlags(u32),
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
}

impl RequestError {
    /// The virtio-blk status this error is reported with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::ReservedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain that failed validation; `status_addr` is where its status can
/// still be written, if the chain has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub error: RequestError,
    pub status_addr: Option<GuestAddress>,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Header {
    type_: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: `Header` is plain old data of fixed layout (two u32 and one u64,
// no padding); every bit pattern is a valid value.
unsafe impl ByteValued for Header {}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DiscardRange {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

// SAFETY: plain old data of fixed layout (u64, u32, u32; no padding); every
// bit pattern is a valid value.
unsafe impl ByteValued for DiscardRange {}

/// Reads `buf.len()` bytes at byte `skip` of the stream made by `segments`.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segments: &[Segment],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segments {
        if done == buf.len() {
            break;
        }
        let len = s.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(buf.len() - done);
        let addr = s
            .addr
            .checked_add(skip)
            .ok_or(RequestError::Memory(s.addr.raw_value()))?;
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|_| RequestError::Memory(addr.raw_value()))?;
        done += n;
        skip = 0;
    }
    if done != buf.len() {
        return Err(RequestError::ShortHeader(done as u64));
    }
    Ok(())
}

/// The part of the stream made by `segments` from byte `skip`, `take` bytes long.
fn sub_segments(segments: &[Segment], mut skip: u64, mut take: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        if take == 0 {
            break;
        }
        let len = s.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        if let Some(addr) = s.addr.checked_add(skip) {
            out.push(Segment {
                addr,
                len: n as u32,
            });
        }
        take -= n;
        skip = 0;
    }
    out
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.len as u64).sum()
}

impl Request {
    /// Parses and validates the chain of one request.
    pub fn parse<M>(
        chain: &DescriptorChain<M>,
        mem: &M::Target,
        limits: &Limits,
    ) -> Result<Request, ParseError>
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemory,
    {
        let mut readable = Vec::new();
        let mut writable: Vec<Segment> = Vec::new();
        let mut order_error = false;
        for desc in chain.clone() {
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else {
                if !writable.is_empty() {
                    order_error = true;
                }
                readable.push(seg);
            }
        }
        // The status byte: the last byte of the device-writable part.
        let status_addr = writable
            .iter()
            .rev()
            .find(|s| s.len > 0)
            .and_then(|s| s.addr.checked_add(s.len as u64 - 1));
        let fail = |error| ParseError { error, status_addr };
        let Some(status_addr) = status_addr else {
            return Err(fail(RequestError::NoStatus));
        };
        // A status byte outside guest memory can never be written: the
        // request is rejected, and without a status address.
        if !mem.check_range(status_addr, 1, Permissions::Write) {
            return Err(ParseError {
                error: RequestError::Memory(status_addr.raw_value()),
                status_addr: None,
            });
        }
        if order_error {
            return Err(fail(RequestError::ReadableAfterWritable));
        }
        let readable_len = total(&readable);
        let writable_len = total(&writable);
        if readable_len < 16 {
            return Err(fail(RequestError::ShortHeader(readable_len)));
        }
        let mut header = Header::default();
        read_stream(mem, &readable, 0, header.as_mut_slice()).map_err(fail)?;
        let header_type = u32::from_le(header.type_);
        let sector = u64::from_le(header.sector);
        // Data in each direction, without the header and the status byte.
        let out_len = readable_len - 16;
        let in_len = writable_len - 1;
        let out_data = || sub_segments(&readable, 16, out_len);
        let in_data = || sub_segments(&writable, 0, in_len);

        let check_range = |len: u64| -> Result<u64, RequestError> {
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::OutOfRange { sector, len })?;
            match offset.checked_add(len) {
                Some(end) if end <= limits.capacity => Ok(offset),
                _ => Err(RequestError::OutOfRange { sector, len }),
            }
        };
        let check_data = |len: u64, segments: &[Segment]| -> Result<(), RequestError> {
            if len % SECTOR_SIZE != 0 {
                return Err(RequestError::Unaligned(len));
            }
            if len > limits.max_request_bytes() {
                return Err(RequestError::TooLarge(len));
            }
            if segments.len() > limits.seg_max as usize {
                return Err(RequestError::TooManySegments(segments.len()));
            }
            Ok(())
        };
        // Data buffers must lie in guest memory before anything is executed.
        let check_memory =
            |segments: &[Segment], access: Permissions| -> Result<(), RequestError> {
                match segments
                    .iter()
                    .find(|s| !mem.check_range(s.addr, s.len as usize, access))
                {
                    Some(s) => Err(RequestError::Memory(s.addr.raw_value())),
                    None => Ok(()),
                }
            };

        let (kind, used_len_ok) = match header_type {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    return Err(fail(RequestError::WrongDirection));
                }
                let segments = in_data();
                check_data(in_len, &segments).map_err(fail)?;
                let offset = check_range(in_len).map_err(fail)?;
                check_memory(&segments, Permissions::Write).map_err(fail)?;
                (
                    Kind::Read {
                        offset,
                        len: in_len,
                        segments,
                    },
                    in_len as u32 + 1,
                )
            }
            VIRTIO_BLK_T_OUT => {
                if in_len != 0 {
                    return Err(fail(RequestError::WrongDirection));
                }
                let segments = out_data();
                check_data(out_len, &segments).map_err(fail)?;
                let offset = check_range(out_len).map_err(fail)?;
                check_memory(&segments, Permissions::Read).map_err(fail)?;
                (
                    Kind::Write {
                        offset,
                        len: out_len,
                        segments,
                    },
                    1,
                )
            }
            VIRTIO_BLK_T_FLUSH => (Kind::Flush, 1),
            VIRTIO_BLK_T_GET_ID => {
                if in_len < ID_LEN as u64 {
                    return Err(fail(RequestError::ShortIdBuffer(in_len)));
                }
                let segments = sub_segments(&writable, 0, ID_LEN as u64);
                check_memory(&segments, Permissions::Write).map_err(fail)?;
                (Kind::GetId { segments }, ID_LEN as u32 + 1)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let write_zeroes = header_type == VIRTIO_BLK_T_WRITE_ZEROES;
                let entry = std::mem::size_of::<DiscardRange>() as u64;
                if out_len == 0 || out_len % entry != 0 {
                    return Err(fail(RequestError::BadRanges(out_len)));
                }
                let count = out_len / entry;
                if count > limits.max_discard_seg as u64 {
                    return Err(fail(RequestError::TooManySegments(count as usize)));
                }
                let mut ranges = Vec::with_capacity(count as usize);
                let mut unmap = true;
                for i in 0..count {
                    let mut r = DiscardRange::default();
                    read_stream(mem, &readable, 16 + i * entry, r.as_mut_slice()).map_err(fail)?;
                    let flags = u32::from_le(r.flags);
                    let allowed = if write_zeroes {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    } else {
                        0
                    };
                    if flags & !allowed != 0 {
                        return Err(fail(RequestError::ReservedFlags(flags)));
                    }
                    unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                    let num = u32::from_le(r.num_sectors);
                    if num > limits.max_discard_sectors {
                        return Err(fail(RequestError::TooLarge(num as u64 * SECTOR_SIZE)));
                    }
                    let sector = u64::from_le(r.sector);
                    let len = num as u64 * SECTOR_SIZE;
                    let offset = sector
                        .checked_mul(SECTOR_SIZE)
                        .filter(|o| o.checked_add(len).is_some_and(|e| e <= limits.capacity))
                        .ok_or(fail(RequestError::OutOfRange { sector, len }))?;
                    ranges.push(Range { offset, len });
                }
                let kind = if write_zeroes {
                    Kind::WriteZeroes { ranges, unmap }
                } else {
                    Kind::Discard { ranges }
                };
                (kind, 1)
            }
            other => return Err(fail(RequestError::Unsupported(other))),
        };
        Ok(Request {
            kind,
            status_addr,
            used_len_ok,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;

    /// Guest memory: 1 MiB from address 0. The mock queue sits at 0.
    const MEM_SIZE: u64 = 0x10_0000;
    /// Disk size used by the tests' limits.
    const CAPACITY: u64 = 1 << 20;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const INDIRECT: u64 = 0xd000;
    const RANGES: u64 = 0xe000;
    const STATUS: u64 = 0xf000;
    const BIG: u64 = 0x2_0000;

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity: CAPACITY,
            size_max: 4096,
            seg_max: 4,
            max_discard_seg: 2,
            max_discard_sectors: 64,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn write_header(mem: &Mem, addr: u64, type_: u32, sector: u64) {
        let h = Header {
            type_: type_.to_le(),
            _reserved: 0,
            sector: sector.to_le(),
        };
        mem.write_obj(h, GuestAddress(addr)).unwrap();
    }

    fn write_range(mem: &Mem, addr: u64, sector: u64, num_sectors: u32, flags: u32) {
        let r = DiscardRange {
            sector: sector.to_le(),
            num_sectors: num_sectors.to_le(),
            flags: flags.to_le(),
        };
        mem.write_obj(r, GuestAddress(addr)).unwrap();
    }

    /// Builds `descs` as one chain of a fresh mock queue and parses it.
    fn parse_with(
        mem: &Mem,
        descs: &[RawDescriptor],
        limits: &Limits,
    ) -> Result<Request, ParseError> {
        let queue = MockSplitQueue::new(mem, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        Request::parse(&chain, mem, limits)
    }

    fn parse(mem: &Mem, descs: &[RawDescriptor]) -> Result<Request, ParseError> {
        parse_with(mem, descs, &limits())
    }

    /// A header of `type_`/`sector` at HDR, followed by `rest`.
    fn with_header(
        mem: &Mem,
        type_: u32,
        sector: u64,
        rest: &[RawDescriptor],
    ) -> Result<Request, ParseError> {
        write_header(mem, HDR, type_, sector);
        let mut descs = vec![desc(HDR, 16, R)];
        descs.extend_from_slice(rest);
        parse(mem, &descs)
    }

    #[track_caller]
    fn assert_fails(
        result: Result<Request, ParseError>,
        error: RequestError,
        status: u8,
        status_addr: Option<u64>,
    ) {
        let e = result.expect_err("the chain must be rejected");
        assert_eq!(e.error, error);
        assert_eq!(e.error.status(), status, "status of {}", e.error);
        assert_eq!(e.status_addr, status_addr.map(GuestAddress));
    }

    // ---- reads and writes ----

    #[test]
    fn read_single_data_descriptor() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            2,
            &[desc(DATA, 1024, W), desc(STATUS, 1, W)],
        );
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Read {
                    offset: 1024,
                    len: 1024,
                    segments: vec![seg(DATA, 1024)],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1025,
            }
        );
    }

    #[test]
    fn read_many_data_descriptors() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(DATA, 512, W),
                desc(DATA + 0x1000, 1024, W),
                desc(DATA + 0x2000, 512, W),
                desc(STATUS, 1, W),
            ],
        );
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Read {
                    offset: 0,
                    len: 2048,
                    segments: vec![
                        seg(DATA, 512),
                        seg(DATA + 0x1000, 1024),
                        seg(DATA + 0x2000, 512)
                    ],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 2049,
            }
        );
    }

    #[test]
    fn read_data_and_status_share_a_descriptor() {
        let m = mem();
        let r = with_header(&m, VIRTIO_BLK_T_IN, 1, &[desc(DATA, 513, W)]);
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Read {
                    offset: 512,
                    len: 512,
                    segments: vec![seg(DATA, 512)],
                },
                status_addr: GuestAddress(DATA + 512),
                used_len_ok: 513,
            }
        );
        // The data split unevenly, its tail sharing the last descriptor with the status.
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(DATA, 256, W), desc(DATA + 0x1000, 257, W)],
        );
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Read {
                    offset: 0,
                    len: 512,
                    segments: vec![seg(DATA, 256), seg(DATA + 0x1000, 256)],
                },
                status_addr: GuestAddress(DATA + 0x1000 + 256),
                used_len_ok: 513,
            }
        );
    }

    #[test]
    fn read_of_the_last_sector() {
        let m = mem();
        let last = CAPACITY / SECTOR_SIZE - 1;
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            last,
            &[desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert!(matches!(
            r.unwrap().kind,
            Kind::Read { offset, len: 512, .. } if offset == CAPACITY - 512
        ));
    }

    #[test]
    fn write_single_data_descriptor() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            8,
            &[desc(DATA, 4096, R), desc(STATUS, 1, W)],
        );
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Write {
                    offset: 4096,
                    len: 4096,
                    segments: vec![seg(DATA, 4096)],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1,
            }
        );
    }

    #[test]
    fn write_many_data_descriptors_up_to_the_limits() {
        // seg_max (4) segments of size_max (4096): exactly max_request_bytes.
        let m = mem();
        let data: Vec<_> = (0..4).map(|i| desc(BIG + i * 0x1000, 4096, R)).collect();
        let mut rest = data.clone();
        rest.push(desc(STATUS, 1, W));
        let r = with_header(&m, VIRTIO_BLK_T_OUT, 0, &rest);
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Write {
                    offset: 0,
                    len: 16384,
                    segments: (0..4).map(|i| seg(BIG + i * 0x1000, 4096)).collect(),
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1,
            }
        );
    }

    #[test]
    fn write_header_and_data_share_a_descriptor() {
        let m = mem();
        write_header(&m, HDR, VIRTIO_BLK_T_OUT, 3);
        let r = parse(&m, &[desc(HDR, 16 + 1024, R), desc(STATUS, 1, W)]);
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Write {
                    offset: 3 * 512,
                    len: 1024,
                    segments: vec![seg(HDR + 16, 1024)],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1,
            }
        );
    }

    #[test]
    fn header_split_across_descriptors() {
        let m = mem();
        write_header(&m, HDR, VIRTIO_BLK_T_OUT, 5);
        let r = parse(
            &m,
            &[
                desc(HDR, 3, R),
                desc(HDR + 3, 9, R),
                desc(HDR + 12, 4 + 512, R),
                desc(STATUS, 1, W),
            ],
        );
        assert_eq!(
            r.unwrap().kind,
            Kind::Write {
                offset: 5 * 512,
                len: 512,
                segments: vec![seg(HDR + 16, 512)],
            }
        );
    }

    #[test]
    fn zero_length_request_data_is_accepted() {
        let m = mem();
        let r = with_header(&m, VIRTIO_BLK_T_IN, 0, &[desc(STATUS, 1, W)]);
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Read {
                    offset: 0,
                    len: 0,
                    segments: vec![],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1,
            }
        );
    }

    // ---- flush and GET_ID ----

    #[test]
    fn flush() {
        let m = mem();
        let r = with_header(&m, VIRTIO_BLK_T_FLUSH, 0, &[desc(STATUS, 1, W)]);
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Flush,
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1,
            }
        );
    }

    #[test]
    fn get_id_exact_buffer() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[desc(DATA, 20, W), desc(STATUS, 1, W)],
        );
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::GetId {
                    segments: vec![seg(DATA, 20)],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 21,
            }
        );
    }

    #[test]
    fn get_id_larger_split_buffer_sharing_the_status() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[desc(DATA, 12, W), desc(DATA + 0x1000, 501, W)],
        );
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::GetId {
                    segments: vec![seg(DATA, 12), seg(DATA + 0x1000, 8)],
                },
                status_addr: GuestAddress(DATA + 0x1000 + 500),
                used_len_ok: 21,
            }
        );
    }

    #[test]
    fn get_id_short_buffer() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[desc(DATA, 19, W), desc(STATUS, 1, W)],
        );
        assert_fails(r, RequestError::ShortIdBuffer(19), IOERR, Some(STATUS));
        let r = with_header(&m, VIRTIO_BLK_T_GET_ID, 0, &[desc(STATUS, 1, W)]);
        assert_fails(r, RequestError::ShortIdBuffer(0), IOERR, Some(STATUS));
    }

    // ---- discard and write zeroes ----

    fn ranges_request(
        m: &Mem,
        type_: u32,
        ranges: &[(u64, u32, u32)],
    ) -> Result<Request, ParseError> {
        for (i, &(sector, num, flags)) in ranges.iter().enumerate() {
            write_range(m, RANGES + 16 * i as u64, sector, num, flags);
        }
        with_header(
            m,
            type_,
            0,
            &[
                desc(RANGES, 16 * ranges.len() as u32, R),
                desc(STATUS, 1, W),
            ],
        )
    }

    #[test]
    fn discard_one_range() {
        let m = mem();
        let r = ranges_request(&m, VIRTIO_BLK_T_DISCARD, &[(8, 16, 0)]);
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Discard {
                    ranges: vec![Range {
                        offset: 4096,
                        len: 8192,
                    }],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1,
            }
        );
    }

    #[test]
    fn discard_range_sharing_the_header_descriptor() {
        let m = mem();
        write_header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        write_range(&m, HDR + 16, 1, 1, 0);
        let r = parse(&m, &[desc(HDR, 32, R), desc(STATUS, 1, W)]);
        assert_eq!(
            r.unwrap().kind,
            Kind::Discard {
                ranges: vec![Range {
                    offset: 512,
                    len: 512
                }],
            }
        );
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        let m = mem();
        let r = ranges_request(
            &m,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, 64, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        );
        assert_eq!(
            r.unwrap().kind,
            Kind::WriteZeroes {
                ranges: vec![Range {
                    offset: 0,
                    len: 64 * 512
                }],
                unmap: true,
            }
        );
        let r = ranges_request(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]);
        assert_eq!(
            r.unwrap().kind,
            Kind::WriteZeroes {
                ranges: vec![Range {
                    offset: 0,
                    len: 512
                }],
                unmap: false,
            }
        );
        // Unmap only if every range allows it.
        let r = ranges_request(
            &m,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (10, 2, 0)],
        );
        assert_eq!(
            r.unwrap().kind,
            Kind::WriteZeroes {
                ranges: vec![
                    Range {
                        offset: 0,
                        len: 512
                    },
                    Range {
                        offset: 5120,
                        len: 1024
                    }
                ],
                unmap: false,
            }
        );
    }

    #[test]
    fn reserved_range_flags_are_unsupported() {
        let m = mem();
        // UNMAP is reserved for DISCARD.
        let r = ranges_request(
            &m,
            VIRTIO_BLK_T_DISCARD,
            &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        );
        assert_fails(r, RequestError::ReservedFlags(1), UNSUPP, Some(STATUS));
        let r = ranges_request(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]);
        assert_fails(r, RequestError::ReservedFlags(2), UNSUPP, Some(STATUS));
        let r = ranges_request(
            &m,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, 1, 0), (1, 1, 0x8000_0001)],
        );
        assert_fails(
            r,
            RequestError::ReservedFlags(0x8000_0001),
            UNSUPP,
            Some(STATUS),
        );
    }

    #[test]
    fn more_ranges_than_max_discard_seg() {
        let m = mem();
        let r = ranges_request(&m, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0), (1, 1, 0), (2, 1, 0)]);
        assert_fails(r, RequestError::TooManySegments(3), IOERR, Some(STATUS));
        let r = ranges_request(
            &m,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, 1, 0), (1, 1, 0), (2, 1, 0)],
        );
        assert_fails(r, RequestError::TooManySegments(3), IOERR, Some(STATUS));
    }

    #[test]
    fn malformed_range_list() {
        let m = mem();
        write_range(&m, RANGES, 0, 1, 0);
        let r = with_header(
            &m,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[desc(RANGES, 24, R), desc(STATUS, 1, W)],
        );
        assert_fails(r, RequestError::BadRanges(24), IOERR, Some(STATUS));
        let r = with_header(
            &m,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[desc(RANGES, 15, R), desc(STATUS, 1, W)],
        );
        assert_fails(r, RequestError::BadRanges(15), IOERR, Some(STATUS));
        let r = with_header(&m, VIRTIO_BLK_T_DISCARD, 0, &[desc(STATUS, 1, W)]);
        assert_fails(r, RequestError::BadRanges(0), IOERR, Some(STATUS));
    }

    #[test]
    fn range_beyond_capacity() {
        let m = mem();
        let sectors = CAPACITY / SECTOR_SIZE;
        // Ending exactly at the capacity is fine.
        let r = ranges_request(&m, VIRTIO_BLK_T_DISCARD, &[(sectors - 16, 16, 0)]);
        assert!(r.is_ok());
        let r = ranges_request(&m, VIRTIO_BLK_T_DISCARD, &[(sectors - 8, 16, 0)]);
        assert_fails(
            r,
            RequestError::OutOfRange {
                sector: sectors - 8,
                len: 8192,
            },
            IOERR,
            Some(STATUS),
        );
        let r = ranges_request(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX, 1, 0)]);
        assert_fails(
            r,
            RequestError::OutOfRange {
                sector: u64::MAX,
                len: 512,
            },
            IOERR,
            Some(STATUS),
        );
        // sector * 512 fits in u64, + len does not.
        let r = ranges_request(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX / 512, 1, 0)]);
        assert_fails(
            r,
            RequestError::OutOfRange {
                sector: u64::MAX / 512,
                len: 512,
            },
            IOERR,
            Some(STATUS),
        );
    }

    #[test]
    fn range_over_max_discard_sectors() {
        let m = mem();
        let r = ranges_request(&m, VIRTIO_BLK_T_DISCARD, &[(0, 65, 0)]);
        assert_fails(r, RequestError::TooLarge(65 * 512), IOERR, Some(STATUS));
    }

    // ---- malformed requests ----

    #[test]
    fn unknown_type_is_unsupported_with_status() {
        let m = mem();
        for t in [
            VIRTIO_BLK_T_SCSI_CMD,
            10,
            VIRTIO_BLK_T_SECURE_ERASE,
            VIRTIO_BLK_T_ZONE_APPEND,
            0xdead,
        ] {
            let r = with_header(&m, t, 0, &[desc(DATA, 512, W), desc(STATUS, 1, W)]);
            assert_fails(r, RequestError::Unsupported(t), UNSUPP, Some(STATUS));
        }
    }

    #[test]
    fn data_not_a_multiple_of_512() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            0,
            &[desc(DATA, 100, R), desc(STATUS, 1, W)],
        );
        assert_fails(r, RequestError::Unaligned(100), IOERR, Some(STATUS));
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(DATA, 512, W), desc(DATA + 0x1000, 2, W)],
        );
        assert_fails(r, RequestError::Unaligned(513), IOERR, Some(DATA + 0x1001));
    }

    #[test]
    fn sector_and_length_beyond_capacity() {
        let m = mem();
        let sectors = CAPACITY / SECTOR_SIZE;
        let cases = [
            // Crosses the end.
            (sectors - 1, 1024),
            // Starts at the end.
            (sectors, 512),
            // sector * 512 overflows.
            (u64::MAX, 512),
            (u64::MAX / 512 + 1, 512),
            // sector * 512 fits, + len overflows.
            (u64::MAX / 512, 512),
        ];
        for (sector, len) in cases {
            let r = with_header(
                &m,
                VIRTIO_BLK_T_IN,
                sector,
                &[desc(DATA, len, W), desc(STATUS, 1, W)],
            );
            let expected = RequestError::OutOfRange {
                sector,
                len: len as u64,
            };
            assert_fails(r, expected.clone(), IOERR, Some(STATUS));
            let r = with_header(
                &m,
                VIRTIO_BLK_T_OUT,
                sector,
                &[desc(DATA, len, R), desc(STATUS, 1, W)],
            );
            assert_fails(r, expected, IOERR, Some(STATUS));
        }
    }

    #[test]
    fn readable_descriptor_after_a_writable_one() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            0,
            &[
                desc(DATA, 512, W),
                desc(DATA + 0x1000, 512, R),
                desc(STATUS, 1, W),
            ],
        );
        assert_fails(r, RequestError::ReadableAfterWritable, IOERR, Some(STATUS));
        // Even when the readable one is last: the status goes in the last writable byte.
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(DATA, 513, W), desc(DATA + 0x1000, 512, R)],
        );
        assert_fails(
            r,
            RequestError::ReadableAfterWritable,
            IOERR,
            Some(DATA + 512),
        );
    }

    #[test]
    fn chain_without_writable_descriptor_has_no_status() {
        let m = mem();
        let r = with_header(&m, VIRTIO_BLK_T_OUT, 0, &[desc(DATA, 512, R)]);
        assert_fails(r, RequestError::NoStatus, IOERR, None);
        let r = with_header(&m, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_fails(r, RequestError::NoStatus, IOERR, None);
    }

    #[test]
    fn zero_length_status_descriptor() {
        let m = mem();
        // Nothing writable at all.
        let r = with_header(&m, VIRTIO_BLK_T_FLUSH, 0, &[desc(STATUS, 0, W)]);
        assert_fails(r, RequestError::NoStatus, IOERR, None);
        // The status byte is the last writable byte of the stream: the data's
        // last byte, which leaves 511 bytes of data.
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(DATA, 512, W), desc(STATUS, 0, W)],
        );
        assert_fails(r, RequestError::Unaligned(511), IOERR, Some(DATA + 511));
    }

    #[test]
    fn header_shorter_than_16_bytes() {
        let m = mem();
        write_header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse(&m, &[desc(HDR, 8, R), desc(STATUS, 1, W)]);
        assert_fails(r, RequestError::ShortHeader(8), IOERR, Some(STATUS));
        let r = parse(
            &m,
            &[desc(HDR, 8, R), desc(HDR + 8, 7, R), desc(STATUS, 1, W)],
        );
        assert_fails(r, RequestError::ShortHeader(15), IOERR, Some(STATUS));
        let r = parse(&m, &[desc(STATUS, 1, W)]);
        assert_fails(r, RequestError::ShortHeader(0), IOERR, Some(STATUS));
    }

    #[test]
    fn header_outside_guest_memory() {
        let m = mem();
        let r = parse(&m, &[desc(MEM_SIZE + 0x1000, 16, R), desc(STATUS, 1, W)]);
        assert_fails(
            r,
            RequestError::Memory(MEM_SIZE + 0x1000),
            IOERR,
            Some(STATUS),
        );
        // Straddling the end of memory.
        let r = parse(&m, &[desc(MEM_SIZE - 8, 16, R), desc(STATUS, 1, W)]);
        assert_fails(r, RequestError::Memory(MEM_SIZE - 8), IOERR, Some(STATUS));
    }

    #[test]
    fn more_data_segments_than_seg_max() {
        let m = mem();
        let data: Vec<_> = (0..5).map(|i| desc(DATA + i * 0x1000, 512, R)).collect();
        let mut rest = data;
        rest.push(desc(STATUS, 1, W));
        let r = with_header(&m, VIRTIO_BLK_T_OUT, 0, &rest);
        assert_fails(r, RequestError::TooManySegments(5), IOERR, Some(STATUS));

        let mut rest: Vec<_> = (0..5).map(|i| desc(DATA + i * 0x1000, 512, W)).collect();
        rest.push(desc(STATUS, 1, W));
        let r = with_header(&m, VIRTIO_BLK_T_IN, 0, &rest);
        assert_fails(r, RequestError::TooManySegments(5), IOERR, Some(STATUS));
    }

    #[test]
    fn more_data_than_max_request_bytes() {
        let m = mem();
        let too_much = limits().max_request_bytes() as u32 + 512;
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            0,
            &[desc(BIG, too_much, R), desc(STATUS, 1, W)],
        );
        assert_fails(
            r,
            RequestError::TooLarge(too_much as u64),
            IOERR,
            Some(STATUS),
        );
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(BIG, too_much, W), desc(STATUS, 1, W)],
        );
        assert_fails(
            r,
            RequestError::TooLarge(too_much as u64),
            IOERR,
            Some(STATUS),
        );
    }

    #[test]
    fn data_in_the_wrong_direction() {
        let m = mem();
        // A read with device-readable data.
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(DATA, 512, R),
                desc(DATA + 0x1000, 512, W),
                desc(STATUS, 1, W),
            ],
        );
        assert_fails(r, RequestError::WrongDirection, IOERR, Some(STATUS));
        // A write with device-writable data besides the status.
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            0,
            &[
                desc(DATA, 512, R),
                desc(DATA + 0x1000, 512, W),
                desc(STATUS, 1, W),
            ],
        );
        assert_fails(r, RequestError::WrongDirection, IOERR, Some(STATUS));
        // ... or sharing the status descriptor.
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            0,
            &[desc(DATA, 512, R), desc(STATUS, 2, W)],
        );
        assert_fails(r, RequestError::WrongDirection, IOERR, Some(STATUS + 1));
    }

    #[test]
    fn data_outside_guest_memory() {
        let m = mem();
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(MEM_SIZE, 512, W), desc(STATUS, 1, W)],
        );
        assert_fails(r, RequestError::Memory(MEM_SIZE), IOERR, Some(STATUS));
        // Straddling the end of memory.
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            0,
            &[
                desc(DATA, 512, R),
                desc(MEM_SIZE - 256, 512, R),
                desc(STATUS, 1, W),
            ],
        );
        assert_fails(r, RequestError::Memory(MEM_SIZE - 256), IOERR, Some(STATUS));
        let r = with_header(
            &m,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[desc(u64::MAX - 8, 20, W), desc(STATUS, 1, W)],
        );
        assert_fails(r, RequestError::Memory(u64::MAX - 8), IOERR, Some(STATUS));
    }

    #[test]
    fn status_outside_guest_memory() {
        // Nothing can be reported: no status address, and nothing is executed.
        let m = mem();
        let r = with_header(&m, VIRTIO_BLK_T_FLUSH, 0, &[desc(MEM_SIZE, 1, W)]);
        assert_fails(r, RequestError::Memory(MEM_SIZE), IOERR, None);
        let r = with_header(
            &m,
            VIRTIO_BLK_T_OUT,
            0,
            &[desc(DATA, 512, R), desc(MEM_SIZE - 4, 5, W)],
        );
        assert_fails(r, RequestError::Memory(MEM_SIZE), IOERR, None);
        let r = with_header(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[desc(DATA, 512, W), desc(u64::MAX, 1, W)],
        );
        assert_fails(r, RequestError::Memory(u64::MAX), IOERR, None);
    }

    /// Writes `table` as an indirect descriptor table at `addr`, linking
    /// each entry to the next.
    fn write_indirect_table(m: &Mem, addr: u64, table: &[(u64, u32, u16)]) {
        for (i, &(a, len, flags)) in table.iter().enumerate() {
            let (flags, next) = if i + 1 < table.len() {
                (flags | VRING_DESC_F_NEXT as u16, i as u16 + 1)
            } else {
                (flags, 0)
            };
            let d = RawDescriptor::from(SplitDescriptor::new(a, len, flags, next));
            m.write_obj(d, GuestAddress(addr + 16 * i as u64)).unwrap();
        }
    }

    #[test]
    fn indirect_chain() {
        let m = mem();
        write_header(&m, HDR, VIRTIO_BLK_T_IN, 4);
        write_indirect_table(
            &m,
            INDIRECT,
            &[
                (HDR, 16, R),
                (DATA, 512, W),
                (DATA + 0x1000, 512, W),
                (STATUS, 1, W),
            ],
        );
        let r = parse(&m, &[desc(INDIRECT, 4 * 16, VRING_DESC_F_INDIRECT as u16)]);
        assert_eq!(
            r.unwrap(),
            Request {
                kind: Kind::Read {
                    offset: 2048,
                    len: 1024,
                    segments: vec![seg(DATA, 512), seg(DATA + 0x1000, 512)],
                },
                status_addr: GuestAddress(STATUS),
                used_len_ok: 1025,
            }
        );
    }

    #[test]
    fn invalid_indirect_chains_have_no_status() {
        let m = mem();
        write_header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        // An indirect descriptor inside an indirect table ends the chain.
        write_indirect_table(
            &m,
            INDIRECT,
            &[
                (HDR, 16, R),
                (INDIRECT + 0x100, 16, VRING_DESC_F_INDIRECT as u16),
            ],
        );
        write_indirect_table(&m, INDIRECT + 0x100, &[(STATUS, 1, W)]);
        let r = parse(&m, &[desc(INDIRECT, 2 * 16, VRING_DESC_F_INDIRECT as u16)]);
        assert_fails(r, RequestError::NoStatus, IOERR, None);
        // A table whose length is not a multiple of 16 yields nothing.
        write_indirect_table(&m, INDIRECT, &[(HDR, 16, R), (STATUS, 1, W)]);
        let r = parse(
            &m,
            &[desc(INDIRECT, 2 * 16 - 1, VRING_DESC_F_INDIRECT as u16)],
        );
        assert_fails(r, RequestError::NoStatus, IOERR, None);
    }

    #[test]
    fn error_statuses() {
        let unsupp = [
            RequestError::Unsupported(99),
            RequestError::ReservedFlags(4),
        ];
        for e in unsupp {
            assert_eq!(e.status(), UNSUPP, "{e}");
        }
        let ioerr = [
            RequestError::Chain("x".into()),
            RequestError::NoStatus,
            RequestError::ReadableAfterWritable,
            RequestError::ShortHeader(3),
            RequestError::Unaligned(3),
            RequestError::OutOfRange { sector: 1, len: 2 },
            RequestError::TooLarge(1),
            RequestError::TooManySegments(1),
            RequestError::WrongDirection,
            RequestError::ShortIdBuffer(1),
            RequestError::BadRanges(1),
            RequestError::Memory(1),
        ];
        for e in ioerr {
            assert_eq!(e.status(), IOERR, "{e}");
        }
    }

    /// Arbitrary chains: `Request::parse` never panics, and what it accepts
    /// stays within the disk and within guest memory.
    mod arbitrary_chains {
        use super::*;
        use proptest::prelude::*;

        /// A descriptor address: mostly the interesting places of the
        /// layout, sometimes near or past the end of memory or anywhere.
        fn addr() -> impl Strategy<Value = u64> {
            prop_oneof![
                3 => Just(HDR),
                2 => (0u64..64).prop_map(|i| HDR + i),
                3 => (0u64..16).prop_map(|i| DATA + i * 0x800),
                1 => Just(RANGES),
                2 => Just(STATUS),
                1 => (0u64..0x2000).prop_map(|i| MEM_SIZE - i),
                1 => (0u64..0x1000).prop_map(|i| MEM_SIZE + i),
                1 => any::<u64>(),
                1 => (0u64..0x1000).prop_map(|i| u64::MAX - i),
            ]
        }

        fn len() -> impl Strategy<Value = u32> {
            prop_oneof![
                2 => Just(16u32),
                1 => Just(0u32),
                2 => Just(1u32),
                2 => (1u32..5).prop_map(|n| n * 512),
                1 => (1u32..5).prop_map(|n| n * 512 + 1),
                1 => (1u32..4).prop_map(|n| 16 + n * 16),
                2 => 0u32..0x2000,
                1 => any::<u32>(),
            ]
        }

        fn descriptor() -> impl Strategy<Value = (u64, u32, bool)> {
            (addr(), len(), any::<bool>())
        }

        /// A data descriptor: lengths that make valid requests more likely.
        fn data_descriptor() -> impl Strategy<Value = (u64, u32, bool)> {
            let len = prop_oneof![
                3 => (1u32..9).prop_map(|n| n * 512),
                1 => (1u32..4).prop_map(|n| n * 16),
                1 => len(),
            ];
            let addr = prop_oneof![
                3 => (0u64..64).prop_map(|i| DATA + i * 0x800),
                1 => addr(),
            ];
            (addr, len, any::<bool>())
        }

        /// 1 to 7 descriptors (`(addr, len, device-writable)`): either any
        /// at all, or shaped like a request (a header, random data
        /// descriptors, a writable status descriptor) so that many parse.
        fn chain(writable_data: bool) -> impl Strategy<Value = Vec<(u64, u32, bool)>> {
            let status = prop_oneof![
                4 => Just((STATUS, 1u32, true)),
                2 => (0u64..16).prop_map(|i| (DATA + i * 0x800, 513u32, true)),
                1 => descriptor(),
            ];
            // Data all in one direction, or (less often) each its own.
            let data = (
                proptest::collection::vec(data_descriptor(), 0..5),
                prop_oneof![
                    3 => Just(Some(writable_data)),
                    1 => any::<bool>().prop_map(Some),
                    1 => Just(None),
                ],
            )
                .prop_map(|(data, direction)| {
                    data.into_iter()
                        .map(|(a, n, w)| (a, n, direction.unwrap_or(w)))
                        .collect::<Vec<_>>()
                });
            prop_oneof![
                1 => proptest::collection::vec(descriptor(), 1..8),
                3 => (data, status).prop_map(|(data, status)| {
                    let mut descs = vec![(HDR, 16, false)];
                    descs.extend(data);
                    descs.push(status);
                    descs
                }),
            ]
        }

        fn header_type() -> impl Strategy<Value = u32> {
            prop_oneof![
                3 => Just(VIRTIO_BLK_T_IN),
                3 => Just(VIRTIO_BLK_T_OUT),
                1 => Just(VIRTIO_BLK_T_FLUSH),
                1 => Just(VIRTIO_BLK_T_GET_ID),
                1 => Just(VIRTIO_BLK_T_DISCARD),
                1 => Just(VIRTIO_BLK_T_WRITE_ZEROES),
                1 => any::<u32>(),
            ]
        }

        fn sector() -> impl Strategy<Value = u64> {
            prop_oneof![
                4 => 0u64..16,
                1 => (0u64..16).prop_map(|i| CAPACITY / SECTOR_SIZE - i),
                1 => (0u64..4).prop_map(|i| u64::MAX / SECTOR_SIZE + i - 1),
                1 => (0u64..4).prop_map(|i| u64::MAX - i),
                1 => any::<u64>(),
            ]
        }

        fn discard_range() -> impl Strategy<Value = (u64, u32, u32)> {
            (
                sector(),
                prop_oneof![0u32..80, any::<u32>()],
                prop_oneof![0u32..4, any::<u32>()],
            )
        }

        fn in_memory(m: &Mem, s: &Segment) -> bool {
            m.check_range(s.addr, s.len as usize, Permissions::ReadWrite)
        }

        #[track_caller]
        fn check_data(m: &Mem, l: &Limits, offset: u64, len: u64, segments: &[Segment]) {
            assert_eq!(offset % SECTOR_SIZE, 0);
            assert_eq!(len % SECTOR_SIZE, 0);
            assert!(offset.checked_add(len).is_some_and(|end| end <= l.capacity));
            assert!(len <= l.max_request_bytes());
            assert!(segments.len() <= l.seg_max as usize);
            assert_eq!(segments.iter().map(|s| s.len as u64).sum::<u64>(), len);
            for s in segments {
                assert!(in_memory(m, s), "segment {s:?} outside guest memory");
            }
        }

        /// A byte of one of the chain's writable descriptors.
        fn in_writable(descs: &[(u64, u32, bool)], a: GuestAddress) -> bool {
            descs
                .iter()
                .any(|&(d, n, w)| w && n > 0 && a.0 >= d && a.0 - d < n as u64)
        }

        fn check(
            type_: u32,
            sector: u64,
            ranges: &[(u64, u32, u32)],
            descs: &[(u64, u32, bool)],
            indirect: bool,
        ) -> Result<(), TestCaseError> {
            let m = mem();
            let l = limits();
            write_header(&m, HDR, type_, sector);
            for (i, &(s, n, f)) in ranges.iter().enumerate() {
                write_range(&m, RANGES + 16 * i as u64, s, n, f);
                // Also right after the header, for headers that share a descriptor.
                write_range(&m, HDR + 16 * (i as u64 + 1), s, n, f);
            }
            let flags = |w: bool| if w { W } else { R };
            let result = if indirect {
                let table: Vec<_> = descs.iter().map(|&(a, n, w)| (a, n, flags(w))).collect();
                write_indirect_table(&m, INDIRECT, &table);
                let table_len = 16 * table.len() as u32;
                let head = desc(INDIRECT, table_len, VRING_DESC_F_INDIRECT as u16);
                parse_with(&m, &[head], &l)
            } else {
                let raw: Vec<_> = descs
                    .iter()
                    .map(|&(a, n, w)| desc(a, n, flags(w)))
                    .collect();
                parse_with(&m, &raw, &l)
            };
            let req = match result {
                Ok(req) => req,
                Err(e) => {
                    // A status address, when there is one, is a byte of a
                    // writable descriptor, in guest memory.
                    if let Some(a) = e.status_addr {
                        prop_assert!(in_writable(descs, a), "status {a:?} of {e:?}");
                        prop_assert!(m.check_range(a, 1, Permissions::Write));
                    }
                    let s = e.error.status();
                    prop_assert!(s == IOERR || s == UNSUPP);
                    return Ok(());
                }
            };
            prop_assert!(in_writable(descs, req.status_addr));
            prop_assert!(
                m.check_range(req.status_addr, 1, Permissions::Write),
                "status outside guest memory: {req:?}"
            );
            match &req.kind {
                Kind::Read {
                    offset,
                    len,
                    segments,
                } => {
                    check_data(&m, &l, *offset, *len, segments);
                    prop_assert_eq!(req.used_len_ok as u64, len + 1);
                }
                Kind::Write {
                    offset,
                    len,
                    segments,
                } => {
                    check_data(&m, &l, *offset, *len, segments);
                    prop_assert_eq!(req.used_len_ok, 1);
                }
                Kind::Flush => prop_assert_eq!(req.used_len_ok, 1),
                Kind::GetId { segments } => {
                    let total: usize = segments.iter().map(|s| s.len as usize).sum();
                    prop_assert_eq!(total, ID_LEN);
                    for s in segments {
                        prop_assert!(in_memory(&m, s), "segment {s:?} outside guest memory");
                    }
                    prop_assert_eq!(req.used_len_ok as usize, ID_LEN + 1);
                }
                Kind::Discard { ranges } | Kind::WriteZeroes { ranges, .. } => {
                    prop_assert!(!ranges.is_empty());
                    prop_assert!(ranges.len() <= l.max_discard_seg as usize);
                    for r in ranges {
                        prop_assert_eq!(r.offset % SECTOR_SIZE, 0);
                        prop_assert!(r.len <= l.max_discard_sectors as u64 * SECTOR_SIZE);
                        let end = r.offset.checked_add(r.len);
                        prop_assert!(end.is_some_and(|e| e <= l.capacity), "{r:?}");
                    }
                    prop_assert_eq!(req.used_len_ok, 1);
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 256,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn parse_never_panics_and_accepts_only_valid_requests(
                (type_, descs) in header_type().prop_flat_map(|t| {
                    // Data in the direction the type wants, most of the time.
                    let writable = t == VIRTIO_BLK_T_IN || t == VIRTIO_BLK_T_GET_ID;
                    (Just(t), chain(writable))
                }),
                sector in sector(),
                ranges in proptest::collection::vec(discard_range(), 3),
                indirect in any::<bool>(),
            ) {
                check(type_, sector, &ranges, &descs, indirect)?;
            }
        }
    }
}
