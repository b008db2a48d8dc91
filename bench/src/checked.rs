//! A self-checking block workload's pieces: what a written 4 KiB block
//! holds, a model of what every block may read as, and an independent
//! reader of a storage node's disk file (to compare the copies themselves).
//!
//! The reader is a second implementation of the on-disk format, written
//! from its documentation (`chunkstore/src/lib.rs` and the modules it
//! names), sharing no code with `tessera-chunkstore`: format versions 1 and
//! 2 ([`DiskLayout::extents`]: extent records, stamps and crcs), and format
//! 3 ([`DiskLayout::thin_map`]: the block map rebuilt as the node does at
//! open — the newest whole checkpoint, then the metadata log after it,
//! whether the node trusts it and which chunks it trusts again if not —
//! and [`DiskLayout::thin_crcs`]: the crc table overlaid with the crc
//! journal's records after its `applied` mark).
//!
//! Every written block identifies itself: a magic, its block number (LBA in
//! 4 KiB units), the generation of the write that wrote it, the campaign's
//! tag, then bytes derived from all three. So a read can tell apart the
//! newest data, an older write, another block's data, zeros and garbage.
//!
//! The [`Model`] knows, per block, the newest acknowledged value, the values
//! of writes that failed or were abandoned since (they may or may not have
//! landed), and the write in flight. A read may return any of those it could
//! see when it was submitted, or a write started while it was in flight.

use std::collections::BTreeMap;
use std::fmt;

/// The unit the model tracks (the nodes' checksum unit too).
pub const BLOCK: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"FCBLK\x00\x01\x00");

/// SplitMix64's output function (same as `load::splitmix64`).
fn mix(x: u64) -> u64 {
    crate::load::splitmix64(x)
}

/// Fills `buf` (one block) with the content of block `lba` as written by
/// write generation `gen` (≥ 1) of the campaign `tag`.
pub fn fill_block(buf: &mut [u8], lba: u64, gen: u64, tag: u64) {
    debug_assert_eq!(buf.len(), BLOCK);
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&lba.to_le_bytes());
    buf[16..24].copy_from_slice(&gen.to_le_bytes());
    buf[24..32].copy_from_slice(&tag.to_le_bytes());
    let seed = mix(lba ^ mix(gen ^ mix(tag)));
    for (i, w) in buf[32..].chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed.wrapping_add(i as u64)).to_le_bytes());
    }
}

/// What one block read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// All zeros (never written, or discarded).
    Zero,
    /// A whole, self-consistent block written by generation `gen` for `lba`.
    Data { lba: u64, gen: u64 },
    /// Anything else: a torn block, flipped bits, foreign bytes.
    Garbage,
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Zero => write!(f, "zeros"),
            Seen::Data { lba, gen } => write!(f, "block {lba} gen {gen}"),
            Seen::Garbage => write!(f, "garbage"),
        }
    }
}

/// Classifies one block's bytes.
pub fn classify(buf: &[u8], tag: u64) -> Seen {
    debug_assert_eq!(buf.len(), BLOCK);
    if buf.iter().all(|&b| b == 0) {
        return Seen::Zero;
    }
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC || word(24) != tag {
        return Seen::Garbage;
    }
    let (lba, gen) = (word(8), word(16));
    let mut want = vec![0u8; BLOCK];
    fill_block(&mut want, lba, gen, tag);
    if want == buf {
        Seen::Data { lba, gen }
    } else {
        Seen::Garbage
    }
}

/// A value a block may hold: the content of write `gen`; `zero` for a
/// discard or write-zeroes (and gen 0, the never-written block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Val {
    pub gen: u64,
    pub zero: bool,
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.zero {
            write!(f, "zeros(gen {})", self.gen)
        } else {
            write!(f, "gen {}", self.gen)
        }
    }
}

#[derive(Debug, Clone)]
struct BlockState {
    /// The newest acknowledged value.
    acked: Val,
    /// Model sequence number of that acknowledgement.
    acked_seq: u64,
    /// Values of writes that failed or were abandoned since `acked`.
    maybe: Vec<Val>,
    /// The write in flight, if any (one at a time per block).
    inflight: Option<Val>,
    /// Generation of the newest zeroing write started on the block.
    last_zero_start: u64,
}

/// What a read may return, per block, taken when it was submitted.
#[derive(Debug, Clone)]
pub struct ReadSnap {
    pub first: u64,
    /// Generations ≥ `g0` were started after the read was submitted.
    pub g0: u64,
    allowed: Vec<Vec<Val>>,
}

/// One block that read as something the model does not allow.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub lba: u64,
    pub seen: Seen,
    pub allowed: Vec<Val>,
    /// Whether the newest acknowledged value was covered by a completed flush.
    pub flushed: bool,
}

impl Mismatch {
    /// A short name of what went wrong.
    pub fn kind(&self) -> &'static str {
        match self.seen {
            Seen::Garbage => "garbage",
            Seen::Data { lba, .. } if lba != self.lba => "misdirected",
            Seen::Zero => "lost (zeros)",
            Seen::Data { .. } => "stale or lost",
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let allowed: Vec<String> = self.allowed.iter().map(|v| v.to_string()).collect();
        write!(
            f,
            "{}: block {} (byte {}) read as {}, allowed [{}]{}",
            self.kind(),
            self.lba,
            self.lba * BLOCK as u64,
            self.seen,
            allowed.join(", "),
            if self.flushed {
                " (acknowledged and flushed)"
            } else {
                ""
            }
        )
    }
}

/// What every block of `[0, blocks)` may read as.
#[derive(Debug)]
pub struct Model {
    blocks: Vec<BlockState>,
    next_gen: u64,
    seq: u64,
    flushed_seq: u64,
    pub tag: u64,
}

impl Model {
    /// `blocks` never-written blocks (they read as zeros).
    pub fn new(blocks: u64, tag: u64) -> Model {
        Model {
            blocks: vec![
                BlockState {
                    acked: Val { gen: 0, zero: true },
                    acked_seq: 0,
                    maybe: Vec::new(),
                    inflight: None,
                    last_zero_start: 0,
                };
                blocks as usize
            ],
            next_gen: 1,
            seq: 1,
            flushed_seq: 0,
            tag,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// A fresh generation for data outside the model (it never repeats).
    pub fn take_gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen - 1
    }

    /// Starts a write (`zero`: a discard or write-zeroes) of `n` blocks
    /// from `first`; `None` if one of them has a write in flight.
    pub fn begin_write(&mut self, first: u64, n: u64, zero: bool) -> Option<u64> {
        let range = first as usize..(first + n) as usize;
        if self.blocks[range.clone()]
            .iter()
            .any(|b| b.inflight.is_some())
        {
            return None;
        }
        let gen = self.take_gen();
        for b in &mut self.blocks[range] {
            b.inflight = Some(Val { gen, zero });
            if zero {
                b.last_zero_start = gen;
            }
        }
        Some(gen)
    }

    /// Ends that write: `ok` = acknowledged; else it failed or was
    /// abandoned (it may or may not have landed).
    pub fn end_write(&mut self, first: u64, n: u64, ok: bool) {
        let seq = self.seq;
        self.seq += 1;
        for b in &mut self.blocks[first as usize..(first + n) as usize] {
            let Some(v) = b.inflight.take() else { continue };
            if ok {
                b.acked = v;
                b.acked_seq = seq;
                b.maybe.clear();
            } else {
                b.maybe.push(v);
            }
        }
    }

    /// Starts a flush: what it covers (every acknowledgement so far).
    pub fn begin_flush(&mut self) -> u64 {
        self.seq += 1;
        self.seq - 1
    }

    /// A flush that covered `seq` completed.
    pub fn end_flush(&mut self, seq: u64) {
        self.flushed_seq = self.flushed_seq.max(seq);
    }

    /// What a read of `n` blocks from `first` submitted now may return.
    pub fn begin_read(&self, first: u64, n: u64) -> ReadSnap {
        let allowed = self.blocks[first as usize..(first + n) as usize]
            .iter()
            .map(|b| {
                let mut v = vec![b.acked];
                v.extend(b.maybe.iter().copied());
                v.extend(b.inflight);
                v
            })
            .collect();
        ReadSnap {
            first,
            g0: self.next_gen,
            allowed,
        }
    }

    /// Checks what a read returned (`data`: the blocks from `snap.first`).
    pub fn check_read(&self, snap: &ReadSnap, data: &[u8]) -> Vec<Mismatch> {
        let mut bad = Vec::new();
        for (i, (block, allowed)) in data.chunks_exact(BLOCK).zip(&snap.allowed).enumerate() {
            let lba = snap.first + i as u64;
            let state = &self.blocks[lba as usize];
            let seen = classify(block, self.tag);
            let ok = match seen {
                Seen::Zero => allowed.iter().any(|v| v.zero) || state.last_zero_start >= snap.g0,
                Seen::Data { lba: l, gen } => {
                    l == lba && (allowed.iter().any(|v| !v.zero && v.gen == gen) || gen >= snap.g0)
                }
                Seen::Garbage => false,
            };
            if !ok {
                bad.push(Mismatch {
                    lba,
                    seen,
                    allowed: allowed.clone(),
                    flushed: state.acked_seq <= self.flushed_seq,
                });
            }
        }
        bad
    }

    /// Whether any block has a write in flight.
    pub fn any_inflight(&self) -> bool {
        self.blocks.iter().any(|b| b.inflight.is_some())
    }
}

/// The software crc32c (Castagnoli, reflected 0x82F63B78), to check a disk
/// file's block checksums without the product's code.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A storage node's disk file as format versions 1, 2 and 3 lay it out
/// (see `chunkstore/src/lib.rs`), read without the product's code.
#[derive(Debug, Clone)]
pub struct DiskLayout {
    pub version: u32,
    pub disk: uuid::Uuid,
    /// Bytes per extent (format v3: per chunk).
    pub extent_size: u64,
    /// Unix seconds at format time (part of the crc journal's salt).
    pub created: u64,
    /// (offset, length) of the primary table; the mirror's offset (0: none).
    pub epoch_table: (u64, u64),
    pub epoch_mirror: u64,
    /// Format v3 has no extent table: both are 0.
    pub extent_table: (u64, u64),
    pub extent_mirror: u64,
    pub crc_table: (u64, u64),
    pub data_offset: u64,
    /// Format v3: chunks' worth of data blocks (for information only).
    pub extents: u64,
    /// Format v3's own regions.
    pub thin: Option<ThinLayout>,
}

/// One used extent record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRec {
    pub extent: u64,
    pub vdisk: uuid::Uuid,
    pub chunk: u64,
    pub generation: u64,
    /// The record's own version: 2 stores crcs tagged with the owner.
    pub version: u16,
}

impl ExtentRec {
    /// What a block's stored crc is XORed with: 0 for version-1 records,
    /// else `crc32c(vdisk ‖ chunk LE ‖ generation LE)` (1 if that is 0).
    pub fn tag(&self) -> u32 {
        if self.version < 2 {
            return 0;
        }
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(self.vdisk.as_bytes());
        b.extend_from_slice(&self.chunk.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        match crc32c(&b) {
            0 => 1,
            t => t,
        }
    }
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Whether a structure's last 4 bytes are the crc32c of it with them zeroed.
pub fn sealed(b: &[u8]) -> bool {
    let n = b.len();
    let mut copy = b.to_vec();
    copy[n - 4..].fill(0);
    u32::from_le_bytes(b[n - 4..].try_into().expect("4 bytes")) == crc32c(&copy)
}

impl DiskLayout {
    /// Reads the superblock (the primary, else the backup).
    pub fn read(file: &std::fs::File) -> anyhow::Result<DiskLayout> {
        use std::os::unix::fs::FileExt;
        for off in [0u64, 4096] {
            let mut sb = vec![0u8; 4096];
            file.read_exact_at(&mut sb, off)?;
            if &sb[0..8] != b"TESSERA\0" || !sealed(&sb) {
                continue;
            }
            let version = u32::from_le_bytes(sb[8..12].try_into()?);
            anyhow::ensure!(
                (1..=3).contains(&version),
                "format version {version} is unknown"
            );
            let v2 = version >= 2;
            let extent_size = u32::from_le_bytes(sb[32..36].try_into()?) as u64;
            anyhow::ensure!(
                extent_size > 0 && extent_size % BLOCK as u64 == 0,
                "extent size {extent_size} is not a multiple of 4096"
            );
            let thin = if version >= 3 {
                let t = ThinLayout {
                    log: [le64(&sb, 160), le64(&sb, 168)],
                    log_pages: le64(&sb, 176),
                    checkpoints: [le64(&sb, 184), le64(&sb, 192)],
                    checkpoint_pages: le64(&sb, 200),
                    blocks_total: le64(&sb, 208),
                    crc_journal: le64(&sb, 216),
                    crc_journal_pages: le64(&sb, 224),
                };
                t.check()?;
                Some(t)
            } else {
                None
            };
            return Ok(DiskLayout {
                version,
                disk: uuid::Uuid::from_bytes(sb[16..32].try_into()?),
                extent_size,
                created: le64(&sb, 120),
                epoch_table: (le64(&sb, 56), le64(&sb, 64)),
                epoch_mirror: if v2 { le64(&sb, 128) } else { 0 },
                extent_table: (le64(&sb, 72), le64(&sb, 80)),
                extent_mirror: if v2 { le64(&sb, 136) } else { 0 },
                crc_table: (le64(&sb, 88), le64(&sb, 96)),
                data_offset: le64(&sb, 104),
                extents: le64(&sb, 112),
                thin,
            });
        }
        anyhow::bail!("no valid superblock")
    }

    /// Whether `r` is a valid copy `copy` (0 primary, 1 mirror) of the
    /// record of extent `e`.
    fn record_ok(r: &[u8], e: u64, copy: u8) -> bool {
        let version = u16::from_le_bytes([r[4], r[5]]);
        &r[0..4] == b"TSXT"
            && sealed(r)
            && le64(r, 40) == e
            && (version == 1 || (version == 2 && r[48] == copy))
            && u16::from_le_bytes([r[6], r[7]]) <= 1
    }

    /// The used extent records (a damaged primary replaced by its mirror),
    /// and how many records are damaged in every copy. Two records for one
    /// chunk: the higher generation wins.
    pub fn extents(&self, file: &std::fs::File) -> anyhow::Result<(Vec<ExtentRec>, u64)> {
        use std::os::unix::fs::FileExt;
        anyhow::ensure!(
            self.thin.is_none(),
            "format version {} has no extent table",
            self.version
        );
        let len = (self.extents * 64) as usize;
        let mut table = vec![0u8; len];
        file.read_exact_at(&mut table, self.extent_table.0)?;
        let mut mirror = vec![0u8; if self.extent_mirror != 0 { len } else { 0 }];
        if self.extent_mirror != 0 {
            file.read_exact_at(&mut mirror, self.extent_mirror)?;
        }
        let mut used: std::collections::HashMap<(uuid::Uuid, u64), ExtentRec> =
            std::collections::HashMap::new();
        let mut damaged = 0;
        for e in 0..self.extents as usize {
            let primary = &table[e * 64..(e + 1) * 64];
            let r = if Self::record_ok(primary, e as u64, 0) {
                primary
            } else if !mirror.is_empty()
                && Self::record_ok(&mirror[e * 64..(e + 1) * 64], e as u64, 1)
            {
                &mirror[e * 64..(e + 1) * 64]
            } else {
                damaged += 1;
                continue;
            };
            if u16::from_le_bytes([r[6], r[7]]) != 1 {
                continue;
            }
            let rec = ExtentRec {
                extent: e as u64,
                vdisk: uuid::Uuid::from_bytes(r[8..24].try_into()?),
                chunk: le64(r, 24),
                generation: le64(r, 32),
                version: u16::from_le_bytes([r[4], r[5]]),
            };
            let key = (rec.vdisk, rec.chunk);
            if used.get(&key).is_none_or(|o| o.generation < rec.generation) {
                used.insert(key, rec);
            }
        }
        let mut v: Vec<ExtentRec> = used.into_values().collect();
        v.sort_by_key(|r| (r.vdisk, r.chunk));
        Ok((v, damaged))
    }

    /// Byte offset of extent `e`'s data.
    pub fn data_of(&self, e: u64) -> u64 {
        self.data_offset + e * self.extent_size
    }

    fn bpe(&self) -> u64 {
        self.extent_size / BLOCK as u64
    }

    /// Byte offset of the crc of block `b` of extent `e` (version 2: after
    /// the extent's 64-byte stamp, in runs rounded up to 64 bytes).
    pub fn crc_of(&self, e: u64, b: u64) -> u64 {
        if self.version >= 2 {
            let run = (64 + self.bpe() * 4).div_ceil(64) * 64;
            self.crc_table.0 + e * run + 64 + b * 4
        } else {
            self.crc_table.0 + (e * self.bpe() + b) * 4
        }
    }
}

// ---------------------------------------------------------------- format v3

/// Bytes of a metadata log page, a checkpoint page and a journal header's page.
const PAGE: usize = 4096;
/// Records in a full log or checkpoint page.
const MAP_RECORDS_PER_PAGE: usize = 63;
/// Bytes of one block-map record.
const MAP_RECORD: usize = 64;
/// Where a log page's records start, and its "durable before" number.
const LOG_HEADER: usize = 16;
const LOG_DURABLE_AT: usize = 4048;
/// Where a checkpoint page's records start, and its "lost" flag.
const CKPT_HEADER: usize = 40;
const CKPT_LOST_AT: usize = 4072;
/// Bytes of one crc journal record and of a journal header.
const JOURNAL_RECORD: usize = 32;
const JOURNAL_HEADER: usize = 40;
/// Pages in front of the crc journal's ring (its two header copies).
const JOURNAL_HEADER_PAGES: u64 = 2;

/// Format v3's own regions (superblock bytes 160..232).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinLayout {
    /// Byte offsets of the metadata log ring's two copies.
    pub log: [u64; 2],
    /// Pages in each copy of the ring.
    pub log_pages: u64,
    /// Byte offsets of the two checkpoint areas.
    pub checkpoints: [u64; 2],
    /// Pages in each checkpoint area.
    pub checkpoint_pages: u64,
    /// 4 KiB blocks in the data region.
    pub blocks_total: u64,
    /// Byte offset of the crc journal (two header pages, then the ring).
    pub crc_journal: u64,
    pub crc_journal_pages: u64,
}

impl ThinLayout {
    /// Bounds that keep this reader from trusting absurd sizes.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (2..=1 << 20).contains(&self.log_pages),
            "metadata log of {} pages",
            self.log_pages
        );
        anyhow::ensure!(
            (1..=1 << 24).contains(&self.checkpoint_pages),
            "checkpoint areas of {} pages",
            self.checkpoint_pages
        );
        anyhow::ensure!(
            (JOURNAL_HEADER_PAGES + 1..=1 << 20).contains(&self.crc_journal_pages),
            "crc journal of {} pages",
            self.crc_journal_pages
        );
        anyhow::ensure!(
            (1..=1 << 40).contains(&self.blocks_total),
            "{} data blocks",
            self.blocks_total
        );
        Ok(())
    }

    /// Records in the crc journal's ring.
    pub fn journal_capacity(&self) -> u64 {
        (self.crc_journal_pages - JOURNAL_HEADER_PAGES) * (PAGE / JOURNAL_RECORD) as u64
    }

    /// Byte offset of the crc journal's ring.
    pub fn journal_ring(&self) -> u64 {
        self.crc_journal + JOURNAL_HEADER_PAGES * PAGE as u64
    }
}

/// The crc a format-v3 block's stored crc is XORed with: `crc32c(vdisk ‖
/// chunk LE ‖ generation LE ‖ block LE (u32))`, 1 if that is 0.
pub fn block_tag(vdisk: uuid::Uuid, chunk: u64, generation: u64, block: u32) -> u32 {
    let mut b = Vec::with_capacity(36);
    b.extend_from_slice(vdisk.as_bytes());
    b.extend_from_slice(&chunk.to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&block.to_le_bytes());
    match crc32c(&b) {
        0 => 1,
        t => t,
    }
}

/// One change of a format-v3 block map (a metadata log or checkpoint record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapRecord {
    /// Blocks `first .. first + count` of the chunk live at physical blocks
    /// `phys ..`, allocated under `generation`.
    Alloc {
        vdisk: uuid::Uuid,
        chunk: u64,
        first: u32,
        count: u32,
        phys: u64,
        generation: u64,
    },
    /// Those blocks are free.
    Free {
        vdisk: uuid::Uuid,
        chunk: u64,
        first: u32,
        count: u32,
        phys: u64,
    },
    /// The chunk was written (or discarded) whole since the map was lost:
    /// the node trusts it again. The map itself does not change.
    Trusted { vdisk: uuid::Uuid, chunk: u64 },
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Decodes one 64-byte map record (kind 1 alloc, 2 free; reserved bytes
/// zero; count ≥ 1; a free has generation 0; kind 3 trusted: the vdisk at
/// 8 and the chunk at 24, every other byte zero).
pub fn decode_map_record(b: &[u8]) -> Option<MapRecord> {
    let b = b.get(..MAP_RECORD)?;
    if b[0] == 3 {
        let zero = |r: std::ops::Range<usize>| b[r].iter().all(|x| *x == 0);
        return (zero(1..8) && zero(32..MAP_RECORD)).then(|| MapRecord::Trusted {
            vdisk: uuid::Uuid::from_bytes(b[8..24].try_into().expect("16 bytes")),
            chunk: le64(b, 24),
        });
    }
    let count = le32(b, 4);
    if count == 0 || b[1..4] != [0; 3] || le32(b, 36) != 0 || le64(b, 56) != 0 {
        return None;
    }
    let (first, phys) = (le32(b, 32), le64(b, 40));
    first.checked_add(count)?;
    phys.checked_add(u64::from(count))?;
    let vdisk = uuid::Uuid::from_bytes(b[8..24].try_into().ok()?);
    let chunk = le64(b, 24);
    match b[0] {
        1 => Some(MapRecord::Alloc {
            vdisk,
            chunk,
            first,
            count,
            phys,
            generation: le64(b, 48),
        }),
        2 if le64(b, 48) == 0 => Some(MapRecord::Free {
            vdisk,
            chunk,
            first,
            count,
            phys,
        }),
        _ => None,
    }
}

/// A valid metadata log page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    pub seq: u64,
    /// Every page numbered below this was durable when this one was written.
    pub durable: u64,
    pub records: Vec<MapRecord>,
}

/// Decodes a metadata log page (magic `TSML`, version 1, sealed, at most
/// 63 valid records, zeros elsewhere); `None` if it is not a whole one.
pub fn decode_log_page(b: &[u8]) -> Option<LogPage> {
    if b.len() != PAGE || &b[..4] != b"TSML" || le16(b, 4) != 1 || !sealed(b) {
        return None;
    }
    let n = le16(b, 6) as usize;
    if n > MAP_RECORDS_PER_PAGE {
        return None;
    }
    let records = (0..n)
        .map(|i| decode_map_record(&b[LOG_HEADER + i * MAP_RECORD..]))
        .collect::<Option<Vec<_>>>()?;
    let tail = LOG_HEADER + n * MAP_RECORD;
    if b[tail..LOG_DURABLE_AT].iter().any(|x| *x != 0)
        || b[LOG_DURABLE_AT + 8..PAGE - 4].iter().any(|x| *x != 0)
    {
        return None;
    }
    Some(LogPage {
        seq: le64(b, 8),
        durable: le64(b, LOG_DURABLE_AT),
        records,
    })
}

/// A valid checkpoint page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPage {
    /// The log page replay starts at: its sequence number and ring position.
    pub seq: u64,
    pub pos: u64,
    pub index: u32,
    pub total: u32,
    pub generation_floor: u64,
    pub records: Vec<MapRecord>,
    /// The map was lost at an earlier open and is not trusted since (but
    /// for the chunks of its `Trusted` records and the log's).
    pub lost: bool,
}

/// Decodes a checkpoint page (magic `TSCK`, version 1, sealed, index below
/// total, at most 63 `Alloc` or `Trusted` records, zeros after them but
/// for the lost flag, 0 or 1, at 4072).
pub fn decode_checkpoint_page(b: &[u8]) -> Option<CheckpointPage> {
    if b.len() != PAGE || &b[..4] != b"TSCK" || le16(b, 4) != 1 || !sealed(b) {
        return None;
    }
    let n = le16(b, 6) as usize;
    let (index, total) = (le32(b, 24), le32(b, 28));
    let lost = le32(b, CKPT_LOST_AT);
    if n > MAP_RECORDS_PER_PAGE || index >= total || lost > 1 {
        return None;
    }
    if b[CKPT_HEADER + n * MAP_RECORD..CKPT_LOST_AT]
        .iter()
        .chain(&b[CKPT_LOST_AT + 4..PAGE - 4])
        .any(|x| *x != 0)
    {
        return None;
    }
    let records = (0..n)
        .map(|i| {
            decode_map_record(&b[CKPT_HEADER + i * MAP_RECORD..])
                .filter(|r| matches!(r, MapRecord::Alloc { .. } | MapRecord::Trusted { .. }))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(CheckpointPage {
        seq: le64(b, 8),
        pos: le64(b, 16),
        index,
        total,
        generation_floor: le64(b, 32),
        records,
        lost: lost == 1,
    })
}

/// A whole checkpoint: every page of it valid and naming the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The area it was read from (0 or 1).
    pub area: usize,
    pub seq: u64,
    pub pos: u64,
    pub pages: u32,
    pub generation_floor: u64,
    /// Every record, with its page and its slot in the page.
    pub records: Vec<(u32, usize, MapRecord)>,
    /// Every page's lost flag (they agree).
    pub lost: bool,
}

/// Reads the checkpoint of an area of `capacity` pages from `read` (a page
/// by index, `None` if unreadable): `None` unless all of it is whole.
pub fn decode_checkpoint(
    area: usize,
    capacity: u64,
    mut read: impl FnMut(u32) -> Option<Vec<u8>>,
) -> Option<Checkpoint> {
    let first = decode_checkpoint_page(&read(0)?)?;
    if first.index != 0 || u64::from(first.total) > capacity {
        return None;
    }
    let mut c = Checkpoint {
        area,
        seq: first.seq,
        pos: first.pos,
        pages: first.total,
        generation_floor: first.generation_floor,
        records: Vec::new(),
        lost: first.lost,
    };
    let add = |c: &mut Checkpoint, i: u32, p: &CheckpointPage| {
        c.records
            .extend(p.records.iter().enumerate().map(|(j, r)| (i, j, *r)));
    };
    add(&mut c, 0, &first);
    for i in 1..first.total {
        let p = decode_checkpoint_page(&read(i)?)?;
        let same = p.index == i
            && p.total == first.total
            && p.seq == first.seq
            && p.pos == first.pos
            && p.generation_floor == first.generation_floor
            && p.lost == first.lost;
        if !same {
            return None;
        }
        add(&mut c, i, &p);
    }
    Some(c)
}

/// What replaying the metadata log found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogReplay {
    /// The pages kept, in order: ring position and page.
    pub pages: Vec<(u64, LogPage)>,
    /// Pages that were flushed are missing: a page of a later lap where
    /// the replay ends, or, after a page damaged in every copy, a page
    /// written once it was durable.
    pub lost: bool,
}

/// Replays a ring of `ring` pages from position `pos`, expecting sequence
/// number `seq` there, following consecutive numbers for at most one lap;
/// `read` gives the valid copies of the page at a ring position (the first
/// one with the expected number is taken).
pub fn replay_log(
    ring: u64,
    pos: u64,
    seq: u64,
    mut read: impl FnMut(u64) -> Vec<LogPage>,
) -> LogReplay {
    let mut out = LogReplay::default();
    if ring == 0 {
        return out;
    }
    let (mut pos, mut seq) = (pos % ring, seq);
    while (out.pages.len() as u64) < ring {
        let copies = read(pos);
        if let Some(p) = copies.iter().find(|p| p.seq == seq) {
            out.pages.push((pos, p.clone()));
            pos = (pos + 1) % ring;
            seq += 1;
            continue;
        }
        if copies.iter().any(|p| p.seq > seq) {
            out.lost = true;
        } else if copies.is_empty() {
            // Damaged or never written in every copy: a later page written
            // once this one was durable says it was flushed.
            let kept = out.pages.len() as u64;
            out.lost = (1..ring - kept).any(|k| {
                read((pos + k) % ring)
                    .iter()
                    .any(|p| p.seq > seq && p.durable > seq)
            });
        }
        break;
    }
    out
}

/// Where a block's mapping was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapSource {
    /// Record `slot` of page `page` of the checkpoint in area `area`.
    Checkpoint { area: usize, page: u32, slot: usize },
    /// Record `slot` of the log page with sequence number `seq`, at ring
    /// position `pos` (in both copies of the ring).
    Log { pos: u64, seq: u64, slot: usize },
}

/// Where one block of a chunk lives (format v3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub phys: u64,
    pub generation: u64,
    /// The record that placed it, and the run of the chunk it names.
    pub source: MapSource,
    pub first: u32,
    pub count: u32,
}

/// Why the node does not trust a format-v3 block map read back at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Neither checkpoint area holds a whole checkpoint.
    NoCheckpoint,
    /// The newest checkpoint's lost flag: the map was lost at an earlier
    /// open, and only the chunks written whole since are trusted.
    EarlierOpen,
    /// The log replay found flushed pages missing: a page of a later lap
    /// where it ended, or a later page written once the missing one was
    /// durable.
    FlushedPages,
    /// The log replay stopped at page `stopped` (the number it expected
    /// next) with no other sign of loss, below the crc journal header's
    /// mark `durable` (every page numbered below it was flushed).
    DurableMark { stopped: u64, durable: u64 },
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::NoCheckpoint => write!(f, "no whole checkpoint"),
            Loss::EarlierOpen => write!(f, "the checkpoint says the map was lost at an earlier open"),
            Loss::FlushedPages => write!(f, "flushed log pages missing"),
            Loss::DurableMark { stopped, durable } => write!(
                f,
                "the log replay stopped at page {stopped}, below the crc journal's durable mark {durable}"
            ),
        }
    }
}

/// A format-v3 disk's block map as the node rebuilds it at open: the
/// newest whole checkpoint, then the log after it.
#[derive(Debug, Clone)]
pub struct ThinMap {
    /// The checkpoint replay started from, and the other area's (if whole).
    pub checkpoint: Option<Checkpoint>,
    pub older: Option<Checkpoint>,
    /// The log pages kept: ring position and sequence number.
    pub log_pages: Vec<(u64, u64)>,
    /// The node cannot trust the map: `loss` says why.
    pub lost: bool,
    pub loss: Vec<Loss>,
    /// The newest crc journal header's `log_durable` (0: none whole).
    pub log_durable: u64,
    /// Chunks named by `Trusted` records of the checkpoint or the log
    /// replayed: written whole since the map was lost, so the node reads
    /// them even when it does not trust the map (see [`ThinMap::trusts`]).
    pub trusted: std::collections::BTreeSet<(uuid::Uuid, u64)>,
    /// Records that contradict the map (applied as far as they agree).
    pub inconsistent: Vec<String>,
    blocks_per_chunk: u32,
    total: u64,
    /// One bit per physical block, set when a chunk holds it.
    used: Vec<u64>,
    chunks: BTreeMap<(uuid::Uuid, u64), Vec<Option<Place>>>,
}

impl ThinMap {
    /// An empty map of `total` physical blocks.
    pub fn new(blocks_per_chunk: u32, total: u64) -> ThinMap {
        ThinMap {
            checkpoint: None,
            older: None,
            log_pages: Vec::new(),
            lost: false,
            loss: Vec::new(),
            log_durable: 0,
            trusted: std::collections::BTreeSet::new(),
            inconsistent: Vec::new(),
            blocks_per_chunk,
            total,
            used: vec![0; total.div_ceil(64) as usize],
            chunks: BTreeMap::new(),
        }
    }

    /// Whether the node cannot trust this map (it then reads every chunk
    /// as an error until the chunk is written whole).
    pub fn untrusted(&self) -> bool {
        self.lost || !self.inconsistent.is_empty()
    }

    /// Whether the node reads the chunk from this map: always when it
    /// trusts the map, else only a chunk written whole since it was lost
    /// (any other reads as an error), or any chunk of a vDisk its writer
    /// vouched for (a `Trusted` record of chunk `u64::MAX`: it rebuilt the
    /// whole copy).
    pub fn trusts(&self, vdisk: uuid::Uuid, chunk: u64) -> bool {
        !self.untrusted()
            || self.trusted.contains(&(vdisk, chunk))
            || self.trusted.contains(&(vdisk, u64::MAX))
    }

    fn lose(&mut self, why: Loss) {
        self.lost = true;
        self.loss.push(why);
    }

    /// The chunk's blocks (`None`: holds nothing, reads as zeros), or
    /// `None` if it holds no block.
    pub fn blocks(&self, vdisk: uuid::Uuid, chunk: u64) -> Option<&[Option<Place>]> {
        self.chunks.get(&(vdisk, chunk)).map(Vec::as_slice)
    }

    /// Every chunk holding a block, by key.
    pub fn chunks(&self) -> impl Iterator<Item = (&(uuid::Uuid, u64), &[Option<Place>])> {
        self.chunks.iter().map(|(k, v)| (k, v.as_slice()))
    }

    fn is_used(&self, p: u64) -> bool {
        self.used[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    fn set_used(&mut self, p: u64, used: bool) {
        let w = &mut self.used[(p / 64) as usize];
        if used {
            *w |= 1 << (p % 64);
        } else {
            *w &= !(1 << (p % 64));
        }
    }

    fn lookup(&self, key: &(uuid::Uuid, u64), b: u32) -> Option<Place> {
        self.chunks.get(key)?.get(b as usize).copied().flatten()
    }

    /// Applies a record as the node does (`BlockMap::apply`): an `Alloc`
    /// outside the disk or the chunk, or of blocks in use, is ignored; a
    /// `Free` frees what the chunk holds in its range; either is noted as
    /// inconsistent when it disagrees with the map. A `Trusted` changes
    /// nothing in the map: its chunk joins [`ThinMap::trusted`].
    pub fn apply(&mut self, r: &MapRecord, source: MapSource) {
        let bpc = self.blocks_per_chunk;
        match *r {
            MapRecord::Trusted { vdisk, chunk } => {
                self.trusted.insert((vdisk, chunk));
            }
            MapRecord::Alloc {
                vdisk,
                chunk,
                first,
                count,
                phys,
                generation,
            } => {
                let key = (vdisk, chunk);
                let fits = first.checked_add(count).is_some_and(|e| e <= bpc)
                    && phys
                        .checked_add(u64::from(count))
                        .is_some_and(|e| e <= self.total);
                if !fits {
                    self.inconsistent
                        .push(format!("{r:?} is outside the disk or the chunk"));
                    return;
                }
                let taken = (phys..phys + u64::from(count)).any(|p| self.is_used(p));
                let mapped = (first..first + count).any(|b| self.lookup(&key, b).is_some());
                if taken || mapped {
                    self.inconsistent.push(format!(
                        "{r:?} allocates blocks in use (physical {taken}, in the chunk {mapped}); ignored"
                    ));
                    return;
                }
                for p in phys..phys + u64::from(count) {
                    self.set_used(p, true);
                }
                let blocks = self
                    .chunks
                    .entry(key)
                    .or_insert_with(|| vec![None; bpc as usize]);
                for (i, b) in (first..first + count).enumerate() {
                    blocks[b as usize] = Some(Place {
                        phys: phys + i as u64,
                        generation,
                        source,
                        first,
                        count,
                    });
                }
            }
            MapRecord::Free {
                vdisk,
                chunk,
                first,
                count,
                phys,
            } => {
                let key = (vdisk, chunk);
                let agrees = (0..count).all(|i| {
                    self.lookup(&key, first.saturating_add(i))
                        .is_some_and(|p| p.phys == phys + u64::from(i))
                });
                let end = first.saturating_add(count).min(bpc);
                let mut freed = Vec::new();
                if let Some(blocks) = self.chunks.get_mut(&key) {
                    for b in first.min(end)..end {
                        if let Some(p) = blocks[b as usize].take() {
                            freed.push(p.phys);
                        }
                    }
                    if blocks.iter().all(Option::is_none) {
                        self.chunks.remove(&key);
                    }
                }
                for p in freed {
                    self.set_used(p, false);
                }
                if !agrees {
                    self.inconsistent.push(format!(
                        "{r:?} frees blocks the chunk does not hold there; freed what it held"
                    ));
                }
            }
        }
    }
}

/// A crc journal header copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JournalHeader {
    /// Header writes so far: the copy with the highest rules.
    pub serial: u64,
    /// Every record up to this number is in the crc table.
    pub applied: u64,
    /// Every metadata log page numbered below this was durable.
    pub log_durable: u64,
}

/// What the crc journal holds on top of the crc table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JournalReplay {
    /// The newest whole header copy.
    pub header: Option<JournalHeader>,
    /// Records after `applied` (within a lap of it when a header is
    /// whole), for blocks of the disk, in sequence order: `(ring slot,
    /// sequence number, physical block, crc)`.
    pub records: Vec<(u64, u64, u64, u32)>,
}

/// The salt of a disk's crc journal records and headers:
/// `crc32c(disk uuid ‖ created LE)`.
pub fn journal_salt(disk: uuid::Uuid, created: u64) -> u32 {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(disk.as_bytes());
    b.extend_from_slice(&created.to_le_bytes());
    crc32c(&b)
}

/// A crc journal header copy, if whole: magic `TSCRCJNL`, serial at 8,
/// applied at 16, log_durable at 24, `crc32c(bytes 0..32) ^ salt` at 32,
/// zeros at 36..40.
pub fn decode_journal_header(b: &[u8], salt: u32) -> Option<JournalHeader> {
    let b = b.get(..JOURNAL_HEADER)?;
    if &b[..8] != b"TSCRCJNL" || le32(b, 32) != crc32c(&b[..32]) ^ salt || le32(b, 36) != 0 {
        return None;
    }
    Some(JournalHeader {
        serial: le64(b, 8),
        applied: le64(b, 16),
        log_durable: le64(b, 24),
    })
}

/// The newest whole header copy (the higher serial; the second copy on a
/// tie), as the node picks it.
pub fn newest_journal_header(headers: [&[u8]; 2], salt: u32) -> Option<JournalHeader> {
    let mut newest: Option<JournalHeader> = None;
    for h in headers
        .into_iter()
        .filter_map(|h| decode_journal_header(h, salt))
    {
        if newest.is_none_or(|n| h.serial >= n.serial) {
            newest = Some(h);
        }
    }
    newest
}

/// A crc journal record: `(seq, physical block, crc)` if whole (seq ≥ 1,
/// `crc32c(bytes 0..24) ^ salt` at 24, zeros at 20..24 and 28..32).
pub fn decode_journal_record(b: &[u8], salt: u32) -> Option<(u64, u64, u32)> {
    let b = b.get(..JOURNAL_RECORD)?;
    let seq = le64(b, 0);
    if seq == 0 || le32(b, 24) != crc32c(&b[..24]) ^ salt {
        return None;
    }
    if le32(b, 20) != 0 || b[28..].iter().any(|x| *x != 0) {
        return None;
    }
    Some((seq, le64(b, 8), le32(b, 16)))
}

/// Replays the crc journal as the node does at open: the newest whole
/// header (the higher serial), then every whole record of the ring at its
/// own slot (`seq % capacity`), after `applied` and (with a header) at most
/// one lap past it, for a block below `blocks`, in sequence order.
pub fn replay_journal(headers: [&[u8]; 2], ring: &[u8], salt: u32, blocks: u64) -> JournalReplay {
    let header = newest_journal_header(headers, salt);
    let applied = header.map_or(0, |h| h.applied);
    let cap = (ring.len() / JOURNAL_RECORD) as u64;
    let mut records: Vec<(u64, u64, u64, u32)> = ring
        .chunks_exact(JOURNAL_RECORD)
        .enumerate()
        .filter_map(|(slot, b)| {
            let (seq, phys, crc) = decode_journal_record(b, salt)?;
            let keep = seq % cap == slot as u64
                && seq > applied
                && (header.is_none() || seq <= applied + cap)
                && phys < blocks;
            keep.then_some((slot as u64, seq, phys, crc))
        })
        .collect();
    records.sort_by_key(|r| r.1);
    JournalReplay { header, records }
}

/// Every data block's stored crc on a format-v3 disk.
#[derive(Debug, Clone)]
pub struct ThinCrcs {
    /// Per physical block: the crc table's value, overlaid with the
    /// journal's newer ones.
    pub crcs: Vec<u32>,
    pub journal: JournalReplay,
    /// Blocks whose crc is only in a journal record (after `applied`):
    /// the byte offset of the newest such record.
    pub pending: BTreeMap<u64, u64>,
}

fn read_at(file: &std::fs::File, off: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    file.read_exact_at(&mut b, off).ok().map(|()| b)
}

impl DiskLayout {
    /// Format v3's regions, or an error for another format.
    pub fn thin(&self) -> anyhow::Result<&ThinLayout> {
        self.thin
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("format version {} is not 3", self.version))
    }

    /// Byte offset of physical block `p`'s data (format v3).
    pub fn block_data(&self, p: u64) -> u64 {
        self.data_offset + p * BLOCK as u64
    }

    /// Byte offset of physical block `p`'s entry in the crc table (format v3).
    pub fn block_crc(&self, p: u64) -> u64 {
        self.crc_table.0 + p * 4
    }

    /// Byte offset of record `slot` of the log page at ring position `pos`
    /// in copy `copy` of the ring.
    pub fn log_record(&self, copy: usize, pos: u64, slot: usize) -> anyhow::Result<u64> {
        let t = self.thin()?;
        Ok(t.log[copy] + pos * PAGE as u64 + (LOG_HEADER + slot * MAP_RECORD) as u64)
    }

    /// Byte offset of record `slot` of page `page` of checkpoint area `area`.
    pub fn checkpoint_record(&self, area: usize, page: u32, slot: usize) -> anyhow::Result<u64> {
        let t = self.thin()?;
        Ok(t.checkpoints[area]
            + u64::from(page) * PAGE as u64
            + (CKPT_HEADER + slot * MAP_RECORD) as u64)
    }

    /// The checkpoint in area `area`, if whole.
    pub fn checkpoint(
        &self,
        file: &std::fs::File,
        area: usize,
    ) -> anyhow::Result<Option<Checkpoint>> {
        let t = self.thin()?;
        let base = t.checkpoints[area];
        Ok(decode_checkpoint(area, t.checkpoint_pages, |i| {
            read_at(file, base + u64::from(i) * PAGE as u64, PAGE)
        }))
    }

    /// The valid copies of the log page at ring position `pos`.
    pub fn log_page(&self, file: &std::fs::File, pos: u64) -> anyhow::Result<Vec<LogPage>> {
        let t = self.thin()?;
        Ok(t.log
            .iter()
            .filter_map(|ring| read_at(file, ring + pos * PAGE as u64, PAGE))
            .filter_map(|b| decode_log_page(&b))
            .collect())
    }

    /// The crc journal's two header copies (empty if unreadable).
    fn journal_headers(&self, file: &std::fs::File) -> anyhow::Result<[Vec<u8>; 2]> {
        let t = self.thin()?;
        let header = |i: u64| {
            read_at(file, t.crc_journal + i * PAGE as u64, JOURNAL_HEADER).unwrap_or_default()
        };
        Ok([header(0), header(1)])
    }

    /// The block map as the node rebuilds it at open (format v3), and
    /// whether the node trusts it (see [`Loss`]).
    pub fn thin_map(&self, file: &std::fs::File) -> anyhow::Result<ThinMap> {
        let t = *self.thin()?;
        let bpc = u32::try_from(self.extent_size / BLOCK as u64)?;
        let mut map = ThinMap::new(bpc, t.blocks_total);
        let [h0, h1] = self.journal_headers(file)?;
        map.log_durable = newest_journal_header([&h0, &h1], journal_salt(self.disk, self.created))
            .map_or(0, |h| h.log_durable);
        let (c0, c1) = (self.checkpoint(file, 0)?, self.checkpoint(file, 1)?);
        let (newest, older) = match (c0, c1) {
            (Some(a), Some(b)) if b.seq > a.seq => (Some(b), Some(a)),
            (Some(a), Some(b)) => (Some(a), Some(b)),
            (a, b) => (a.or(b), None),
        };
        let Some(c) = newest else {
            map.lose(Loss::NoCheckpoint);
            return Ok(map);
        };
        if c.lost {
            map.lose(Loss::EarlierOpen);
        }
        for (page, slot, r) in &c.records {
            let source = MapSource::Checkpoint {
                area: c.area,
                page: *page,
                slot: *slot,
            };
            map.apply(r, source);
        }
        let replay = replay_log(t.log_pages, c.pos, c.seq, |pos| {
            self.log_page(file, pos).unwrap_or_default()
        });
        for (pos, page) in &replay.pages {
            for (slot, r) in page.records.iter().enumerate() {
                let source = MapSource::Log {
                    pos: *pos,
                    seq: page.seq,
                    slot,
                };
                map.apply(r, source);
            }
            map.log_pages.push((*pos, page.seq));
        }
        // The page the replay stopped at (the number it expected next).
        let stopped = c.seq + replay.pages.len() as u64;
        if replay.lost {
            map.lose(Loss::FlushedPages);
        } else if stopped < map.log_durable {
            // The newest flushed pages damaged in every copy, and no later
            // page to say so: the crc journal's header does.
            map.lose(Loss::DurableMark {
                stopped,
                durable: map.log_durable,
            });
        }
        map.checkpoint = Some(c);
        map.older = older;
        Ok(map)
    }

    /// Every data block's stored crc (format v3): the crc table overlaid
    /// with the crc journal's records after its `applied` mark.
    pub fn thin_crcs(&self, file: &std::fs::File) -> anyhow::Result<ThinCrcs> {
        use std::os::unix::fs::FileExt;
        let t = *self.thin()?;
        let mut table = vec![0u8; usize::try_from(t.blocks_total * 4)?];
        file.read_exact_at(&mut table, self.crc_table.0)?;
        let mut crcs: Vec<u32> = table
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let [h0, h1] = self.journal_headers(file)?;
        let cap = t.journal_capacity();
        let ring = read_at(
            file,
            t.journal_ring(),
            usize::try_from(cap)? * JOURNAL_RECORD,
        )
        .unwrap_or_default();
        let journal = replay_journal(
            [&h0, &h1],
            &ring,
            journal_salt(self.disk, self.created),
            t.blocks_total,
        );
        let mut pending = BTreeMap::new();
        for &(slot, _, phys, crc) in &journal.records {
            crcs[phys as usize] = crc;
            pending.insert(phys, t.journal_ring() + slot * JOURNAL_RECORD as u64);
        }
        Ok(ThinCrcs {
            crcs,
            journal,
            pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(lba: u64, gen: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        fill_block(&mut b, lba, gen, 7);
        b
    }

    #[test]
    fn blocks_identify_themselves() {
        assert_eq!(classify(&block(3, 9), 7), Seen::Data { lba: 3, gen: 9 });
        assert_eq!(classify(&vec![0u8; BLOCK], 7), Seen::Zero);
        let mut torn = block(3, 9);
        torn[2048..].copy_from_slice(&block(3, 10)[2048..]);
        assert_eq!(classify(&torn, 7), Seen::Garbage);
        let mut flipped = block(3, 9);
        flipped[100] ^= 1;
        assert_eq!(classify(&flipped, 7), Seen::Garbage);
        assert_eq!(classify(&block(3, 9), 8), Seen::Garbage);
    }

    #[test]
    fn acknowledged_writes_must_be_read() {
        let mut m = Model::new(4, 7);
        let g1 = m.begin_write(1, 1, false).unwrap();
        assert!(m.begin_write(0, 2, false).is_none(), "one write per block");
        m.end_write(1, 1, true);
        let snap = m.begin_read(0, 2);
        let mut data = vec![0u8; 2 * BLOCK];
        data[BLOCK..].copy_from_slice(&block(1, g1));
        assert!(m.check_read(&snap, &data).is_empty());
        // Zeros where the acknowledged write should be: lost.
        let bad = m.check_read(&snap, &vec![0u8; 2 * BLOCK]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].kind(), "lost (zeros)");
        // Another block's data: misdirected.
        data[BLOCK..].copy_from_slice(&block(2, g1));
        assert_eq!(m.check_read(&snap, &data)[0].kind(), "misdirected");
    }

    #[test]
    fn in_flight_and_failed_writes_may_read_either_way() {
        let mut m = Model::new(2, 7);
        let g1 = m.begin_write(0, 1, false).unwrap();
        m.end_write(0, 1, true);
        let g2 = m.begin_write(0, 1, false).unwrap();
        let during = m.begin_read(0, 1);
        assert!(m.check_read(&during, &block(0, g1)).is_empty());
        assert!(m.check_read(&during, &block(0, g2)).is_empty());
        m.end_write(0, 1, false);
        let after = m.begin_read(0, 1);
        assert!(m.check_read(&after, &block(0, g1)).is_empty());
        assert!(m.check_read(&after, &block(0, g2)).is_empty());
        // An acknowledged write replaces them all.
        let g3 = m.begin_write(0, 1, false).unwrap();
        m.end_write(0, 1, true);
        let last = m.begin_read(0, 1);
        assert!(m.check_read(&last, &block(0, g3)).is_empty());
        assert_eq!(m.check_read(&last, &block(0, g2)).len(), 1);
        assert_eq!(m.check_read(&last, &block(0, g1)).len(), 1);
    }

    #[test]
    fn writes_started_during_a_read_may_be_seen() {
        let mut m = Model::new(1, 7);
        let read = m.begin_read(0, 1);
        let g = m.begin_write(0, 1, false).unwrap();
        m.end_write(0, 1, true);
        assert!(m.check_read(&read, &block(0, g)).is_empty());
        let z = m.begin_write(0, 1, true).unwrap();
        assert!(z > g);
        assert!(m.check_read(&read, &vec![0u8; BLOCK]).is_empty());
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    // ---- format v3, against bytes built by hand from the documented layouts

    const V: uuid::Uuid = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_0fed_cba9_8765_4321);

    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// The crc32c of the structure with its last 4 bytes zero, stored there.
    fn seal(b: &mut [u8]) {
        let n = b.len();
        b[n - 4..].fill(0);
        let crc = crc32c(b);
        put32(b, n - 4, crc);
    }

    fn alloc(chunk: u64, first: u32, count: u32, phys: u64, generation: u64) -> MapRecord {
        MapRecord::Alloc {
            vdisk: V,
            chunk,
            first,
            count,
            phys,
            generation,
        }
    }

    fn free(chunk: u64, first: u32, count: u32, phys: u64) -> MapRecord {
        MapRecord::Free {
            vdisk: V,
            chunk,
            first,
            count,
            phys,
        }
    }

    fn trusted(chunk: u64) -> MapRecord {
        MapRecord::Trusted { vdisk: V, chunk }
    }

    fn record_bytes(r: &MapRecord, out: &mut [u8]) {
        out[..64].fill(0);
        let (kind, vdisk, chunk, first, count, phys, generation) = match *r {
            MapRecord::Trusted { vdisk, chunk } => {
                out[0] = 3;
                out[8..24].copy_from_slice(vdisk.as_bytes());
                put64(out, 24, chunk);
                return;
            }
            MapRecord::Alloc {
                vdisk,
                chunk,
                first,
                count,
                phys,
                generation,
            } => (1, vdisk, chunk, first, count, phys, generation),
            MapRecord::Free {
                vdisk,
                chunk,
                first,
                count,
                phys,
            } => (2, vdisk, chunk, first, count, phys, 0),
        };
        out[0] = kind;
        put32(out, 4, count);
        out[8..24].copy_from_slice(vdisk.as_bytes());
        put64(out, 24, chunk);
        put32(out, 32, first);
        put64(out, 40, phys);
        put64(out, 48, generation);
    }

    fn log_page(seq: u64, durable: u64, records: &[MapRecord]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        p[..4].copy_from_slice(b"TSML");
        p[4..6].copy_from_slice(&1u16.to_le_bytes());
        p[6..8].copy_from_slice(&(records.len() as u16).to_le_bytes());
        put64(&mut p, 8, seq);
        for (i, r) in records.iter().enumerate() {
            record_bytes(r, &mut p[16 + i * 64..]);
        }
        put64(&mut p, 4048, durable);
        seal(&mut p);
        p
    }

    fn checkpoint_pages(seq: u64, pos: u64, floor: u64, records: &[MapRecord]) -> Vec<Vec<u8>> {
        lost_checkpoint_pages(seq, pos, floor, false, records)
    }

    /// A checkpoint's pages, with their lost flag (4 bytes at 4072).
    fn lost_checkpoint_pages(
        seq: u64,
        pos: u64,
        floor: u64,
        lost: bool,
        records: &[MapRecord],
    ) -> Vec<Vec<u8>> {
        let total = records.len().div_ceil(63).max(1);
        (0..total)
            .map(|i| {
                let part = &records[(i * 63).min(records.len())..((i + 1) * 63).min(records.len())];
                let mut p = vec![0u8; PAGE];
                p[..4].copy_from_slice(b"TSCK");
                p[4..6].copy_from_slice(&1u16.to_le_bytes());
                p[6..8].copy_from_slice(&(part.len() as u16).to_le_bytes());
                put64(&mut p, 8, seq);
                put64(&mut p, 16, pos);
                put32(&mut p, 24, i as u32);
                put32(&mut p, 28, total as u32);
                put64(&mut p, 32, floor);
                for (j, r) in part.iter().enumerate() {
                    record_bytes(r, &mut p[40 + j * 64..]);
                }
                put32(&mut p, 4072, u32::from(lost));
                seal(&mut p);
                p
            })
            .collect()
    }

    fn journal_record(seq: u64, phys: u64, crc: u32, salt: u32) -> [u8; 32] {
        let mut b = [0u8; 32];
        put64(&mut b, 0, seq);
        put64(&mut b, 8, phys);
        put32(&mut b, 16, crc);
        let check = crc32c(&b[..24]) ^ salt;
        put32(&mut b, 24, check);
        b
    }

    /// A crc journal header copy: magic, serial, applied, log_durable,
    /// `crc32c(bytes 0..32) ^ salt`, 4 zero bytes.
    fn journal_header(serial: u64, applied: u64, log_durable: u64, salt: u32) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[..8].copy_from_slice(b"TSCRCJNL");
        put64(&mut b, 8, serial);
        put64(&mut b, 16, applied);
        put64(&mut b, 24, log_durable);
        let check = crc32c(&b[..32]) ^ salt;
        put32(&mut b, 32, check);
        b
    }

    fn jh(serial: u64, applied: u64, log_durable: u64) -> Option<JournalHeader> {
        Some(JournalHeader {
            serial,
            applied,
            log_durable,
        })
    }

    #[test]
    fn log_pages_decode_and_every_damage_is_detected() {
        let records = [alloc(3, 0, 256, 1024, 9), free(3, 10, 2, 1034)];
        let page = log_page(42, 40, &records);
        assert_eq!(
            decode_log_page(&page),
            Some(LogPage {
                seq: 42,
                durable: 40,
                records: records.to_vec()
            })
        );
        for byte in 0..PAGE {
            let mut bad = page.clone();
            bad[byte] ^= 1 << (byte % 8);
            assert_eq!(decode_log_page(&bad), None, "byte {byte} flipped");
        }
        // A full page; one record more does not fit.
        let full: Vec<MapRecord> = (0..63).map(|i| alloc(i, 0, 1, i, 1)).collect();
        assert_eq!(
            decode_log_page(&log_page(1, 0, &full)).unwrap().records,
            full
        );
        let mut over = log_page(1, 0, &full);
        over[6..8].copy_from_slice(&64u16.to_le_bytes());
        seal(&mut over);
        assert_eq!(decode_log_page(&over), None);
        // A free with a generation, a record with count 0: malformed.
        let mut p = log_page(1, 0, &[free(0, 0, 1, 5)]);
        put64(&mut p, 16 + 48, 7);
        seal(&mut p);
        assert_eq!(decode_log_page(&p), None);
        let mut p = log_page(1, 0, &[alloc(0, 0, 1, 5, 1)]);
        put32(&mut p, 16 + 4, 0);
        seal(&mut p);
        assert_eq!(decode_log_page(&p), None);
    }

    #[test]
    fn a_checkpoint_counts_only_whole() {
        let records: Vec<MapRecord> = (0..70).map(|i| alloc(i, 0, 4, i * 4, 2)).collect();
        let new = checkpoint_pages(20, 3, 1 << 32, &records);
        let old = checkpoint_pages(10, 1, 1 << 32, &records);
        assert_eq!(new.len(), 2);
        let c = decode_checkpoint(1, 8, |i| new.get(i as usize).cloned()).expect("whole");
        assert_eq!((c.area, c.seq, c.pos, c.pages), (1, 20, 3, 2));
        assert_eq!(c.records.len(), 70);
        assert_eq!(c.records[63], (1, 0, records[63]));
        assert_eq!(c.records[62], (0, 62, records[62]));
        // Torn: page 1 of the checkpoint before.
        let torn = [new[0].clone(), old[1].clone()];
        assert_eq!(
            decode_checkpoint(0, 8, |i| torn.get(i as usize).cloned()),
            None
        );
        // A damaged page, a missing page, an area too small.
        let mut bad = new.clone();
        bad[1][100] ^= 4;
        assert_eq!(
            decode_checkpoint(0, 8, |i| bad.get(i as usize).cloned()),
            None
        );
        assert_eq!(
            decode_checkpoint(0, 8, |i| new.get(i as usize).filter(|_| i == 0).cloned()),
            None
        );
        assert_eq!(
            decode_checkpoint(0, 1, |i| new.get(i as usize).cloned()),
            None
        );
        // Only allocations in a checkpoint.
        let with_free = checkpoint_pages(5, 0, 1, &[free(0, 0, 1, 0)]);
        assert_eq!(
            decode_checkpoint(0, 8, |i| with_free.get(i as usize).cloned()),
            None
        );
    }

    #[test]
    fn log_replay_keeps_a_prefix_and_tells_lost_flushed_pages() {
        let page = |seq: u64, durable: u64| {
            decode_log_page(&log_page(seq, durable, &[alloc(seq, 0, 1, seq, 1)])).unwrap()
        };
        // Positions 2, 3, 0 hold 10, 11, 12; position 1 an older lap's 8.
        let ring = [
            Some(page(12, 0)),
            Some(page(8, 0)),
            Some(page(10, 0)),
            Some(page(11, 0)),
        ];
        let r = replay_log(4, 2, 10, |p| ring[p as usize].iter().cloned().collect());
        let kept: Vec<(u64, u64)> = r.pages.iter().map(|(p, pg)| (*p, pg.seq)).collect();
        assert_eq!((kept, r.lost), (vec![(2, 10), (3, 11), (0, 12)], false));
        // One copy damaged: the other serves.
        let r = replay_log(4, 2, 10, |p| match p {
            3 => vec![page(11, 0)],
            _ => ring[p as usize].iter().cloned().collect(),
        });
        assert_eq!(r.pages.len(), 3);
        // Page 11 damaged in both copies; 12 written before 11 was durable:
        // a crash, nothing flushed lost.
        let r = replay_log(4, 2, 10, |p| match p {
            3 => vec![],
            0 => vec![page(12, 10)],
            _ => ring[p as usize].iter().cloned().collect(),
        });
        assert_eq!((r.pages.len(), r.lost), (1, false));
        // 12 written once 11 was durable: 11 was flushed, and is gone.
        let r = replay_log(4, 2, 10, |p| match p {
            3 => vec![],
            0 => vec![page(12, 12)],
            _ => ring[p as usize].iter().cloned().collect(),
        });
        assert_eq!((r.pages.len(), r.lost), (1, true));
        // A later lap's page where the replay ends.
        let r = replay_log(4, 2, 10, |p| match p {
            3 => vec![page(15, 14)],
            _ => ring[p as usize].iter().cloned().collect(),
        });
        assert_eq!((r.pages.len(), r.lost), (1, true));
        // A full lap and no more.
        let lap = [page(4, 0), page(5, 0), page(6, 0), page(7, 0)];
        let r = replay_log(4, 0, 4, |p| vec![lap[p as usize].clone()]);
        assert_eq!((r.pages.len(), r.lost), (4, false));
    }

    #[test]
    fn the_map_applies_records_as_the_node_does() {
        let src = MapSource::Log {
            pos: 0,
            seq: 1,
            slot: 0,
        };
        let mut m = ThinMap::new(16, 64);
        m.apply(&alloc(0, 0, 4, 10, 3), src);
        m.apply(&alloc(1, 2, 2, 20, 4), src);
        assert!(m.inconsistent.is_empty());
        let b = m.blocks(V, 0).unwrap();
        assert_eq!(
            b[3].map(|p| (p.phys, p.generation, p.first, p.count)),
            Some((13, 3, 0, 4))
        );
        assert_eq!(b[4], None);
        // A partial free splits the run; a whole one removes the chunk.
        m.apply(&free(0, 1, 2, 11), src);
        let held: Vec<Option<u64>> = m.blocks(V, 0).unwrap()[..4]
            .iter()
            .map(|p| p.map(|p| p.phys))
            .collect();
        assert_eq!(held, vec![Some(10), None, None, Some(13)]);
        m.apply(&free(1, 0, 16, 18), src);
        assert!(m.blocks(V, 1).is_none());
        assert_eq!(
            m.inconsistent.len(),
            1,
            "that free named blocks the chunk did not hold"
        );
        // Allocating a block in use, or outside the disk or the chunk: ignored.
        m.apply(&alloc(2, 0, 1, 13, 5), src);
        m.apply(&alloc(0, 0, 1, 30, 5), src);
        m.apply(&alloc(2, 15, 2, 30, 5), src);
        m.apply(&alloc(2, 0, 1, 64, 5), src);
        assert_eq!(m.inconsistent.len(), 5);
        assert!(m.blocks(V, 2).is_none());
        assert_eq!(m.blocks(V, 0).unwrap()[0].map(|p| p.phys), Some(10));
        assert!(m.untrusted());
        // Freed blocks can be taken again.
        m.apply(&alloc(2, 0, 2, 11, 6), src);
        assert_eq!(m.blocks(V, 2).unwrap()[1].map(|p| p.phys), Some(12));
    }

    #[test]
    fn the_crc_journal_overlays_the_table_after_its_applied_mark() {
        let salt = 0x5eed;
        let cap = 8usize;
        let mut ring = vec![0u8; cap * 32];
        let mut put = |seq: u64, phys: u64, crc: u32| {
            let at = (seq % cap as u64) as usize * 32;
            ring[at..at + 32].copy_from_slice(&journal_record(seq, phys, crc, salt));
        };
        put(5, 1, 50); // applied
        put(7, 2, 70);
        put(9, 2, 90); // slot 1: newer for block 2
        put(10, 3, 100);
        put(12, 99, 120); // not a block of the disk
        let old = journal_header(1, 2, 0, salt);
        let new = journal_header(2, 6, 0, salt);
        let r = replay_journal([&old, &new], &ring, salt, 16);
        assert_eq!(r.header, jh(2, 6, 0));
        let got: Vec<(u64, u64, u32)> = r.records.iter().map(|&(_, s, p, c)| (s, p, c)).collect();
        assert_eq!(got, vec![(7, 2, 70), (9, 2, 90), (10, 3, 100)]);
        // The newest header damaged: the older rules, more is replayed.
        let mut bad = new;
        bad[17] ^= 1;
        let r = replay_journal([&old, &bad], &ring, salt, 16);
        assert_eq!(r.header, jh(1, 2, 0));
        assert_eq!(r.records.first().map(|r| r.1), Some(5));
        // No header: every whole record; another disk's salt: none.
        let r = replay_journal([&[0u8; 40], &bad], &ring, salt, 16);
        assert_eq!((r.header, r.records.len()), (None, 4));
        assert!(replay_journal([&old, &new], &ring, salt ^ 1, 16)
            .records
            .is_empty());
        // A record out of its slot, a damaged record: skipped.
        let mut moved = ring.clone();
        moved.copy_within(7 * 32..8 * 32, 6 * 32);
        moved[7 * 32..8 * 32].fill(0);
        moved[2 * 32 + 3] ^= 1; // record 10
        let r = replay_journal([&old, &new], &moved, salt, 16);
        assert_eq!(r.records.iter().map(|r| r.1).collect::<Vec<_>>(), vec![9]);
    }

    #[test]
    fn trusted_records_decode_and_change_nothing_in_the_map() {
        // Kind 3: the vdisk at 8, the chunk at 24, every other byte zero.
        let mut b = [0u8; 64];
        b[0] = 3;
        b[8..24].copy_from_slice(V.as_bytes());
        put64(&mut b, 24, 0x0102_0304_0506_0708);
        assert_eq!(decode_map_record(&b), Some(trusted(0x0102_0304_0506_0708)));
        let mut built = [0u8; 64];
        record_bytes(&trusted(0x0102_0304_0506_0708), &mut built);
        assert_eq!(built, b);
        for byte in (1..8).chain(32..64) {
            for bit in 0..8 {
                let mut c = b;
                c[byte] ^= 1 << bit;
                assert_eq!(decode_map_record(&c), None, "byte {byte} bit {bit}");
            }
        }
        // Another kind over those bytes: not a record (an alloc or a free
        // would need a count).
        for kind in [0u8, 1, 2, 4, 0x83] {
            let mut c = b;
            c[0] = kind;
            assert_eq!(decode_map_record(&c), None, "kind {kind}");
        }
        let mut nil = [0u8; 64];
        nil[0] = 3;
        assert_eq!(
            decode_map_record(&nil),
            Some(MapRecord::Trusted {
                vdisk: uuid::Uuid::nil(),
                chunk: 0
            })
        );
        // In a log page, among allocations and frees.
        let records = [
            alloc(3, 0, 4, 8, 2),
            trusted(3),
            free(3, 0, 1, 8),
            trusted(9),
        ];
        let page = log_page(7, 6, &records);
        assert_eq!(decode_log_page(&page).unwrap().records, records.to_vec());
        // Applied: the map is as before; the chunk is trusted again (which
        // matters once the map is not).
        let src = MapSource::Log {
            pos: 0,
            seq: 1,
            slot: 0,
        };
        let mut m = ThinMap::new(16, 64);
        m.apply(&alloc(0, 0, 4, 10, 3), src);
        m.apply(&trusted(0), src);
        m.apply(&trusted(5), src);
        assert!(m.inconsistent.is_empty());
        assert_eq!(m.chunks().count(), 1);
        let held: Vec<Option<u64>> = m.blocks(V, 0).unwrap()[..5]
            .iter()
            .map(|p| p.map(|p| p.phys))
            .collect();
        assert_eq!(held, vec![Some(10), Some(11), Some(12), Some(13), None]);
        assert_eq!(
            m.trusted,
            std::collections::BTreeSet::from([(V, 0), (V, 5)])
        );
        assert!(m.trusts(V, 1), "a map trusted whole: every chunk reads");
        m.lose(Loss::NoCheckpoint);
        assert!(m.trusts(V, 0) && m.trusts(V, 5));
        assert!(!m.trusts(V, 1));
        // The writer vouched for the whole vDisk (chunk u64::MAX): every
        // chunk of it reads; another vDisk's do not.
        m.apply(&trusted(u64::MAX), src);
        assert!(m.trusts(V, 1) && m.trusts(V, 1 << 20));
        assert!(!m.trusts(uuid::Uuid::from_u128(0xdead), 1));
    }

    #[test]
    fn a_checkpoint_carries_its_lost_flag() {
        let records = [alloc(0, 0, 4, 16, 3), trusted(0), trusted(7)];
        let pages = lost_checkpoint_pages(9, 2, 5, true, &records);
        assert_eq!(le32(&pages[0], 4072), 1);
        let p = decode_checkpoint_page(&pages[0]).unwrap();
        assert!(p.lost);
        assert_eq!(p.records, records.to_vec());
        let c = decode_checkpoint(0, 4, |i| pages.get(i as usize).cloned()).unwrap();
        assert!(c.lost);
        let got: Vec<MapRecord> = c.records.iter().map(|r| r.2).collect();
        assert_eq!(got, records.to_vec());
        let clear = lost_checkpoint_pages(9, 2, 5, false, &records);
        assert!(!decode_checkpoint_page(&clear[0]).unwrap().lost);
        // Every flipped bit of a page is detected, the flag's among them.
        for byte in 0..PAGE {
            let mut bad = pages[0].clone();
            bad[byte] ^= 1 << (byte % 8);
            assert_eq!(decode_checkpoint_page(&bad), None, "byte {byte} flipped");
        }
        // Sealed again: the flag is 0 or 1 and the bytes after it are zero.
        for v in [2u32, 3, 0x100, u32::MAX] {
            let mut bad = pages[0].clone();
            put32(&mut bad, 4072, v);
            seal(&mut bad);
            assert_eq!(decode_checkpoint_page(&bad), None, "flag {v}");
        }
        for byte in 4076..4092 {
            let mut bad = pages[0].clone();
            bad[byte] = 0x40;
            seal(&mut bad);
            assert_eq!(decode_checkpoint_page(&bad), None, "byte {byte} set");
        }
        // The pages of one checkpoint agree on it.
        let many: Vec<MapRecord> = (0..70).map(|i| alloc(i, 0, 1, i, 2)).collect();
        let lost = lost_checkpoint_pages(4, 0, 1, true, &many);
        let kept = lost_checkpoint_pages(4, 0, 1, false, &many);
        assert!(
            decode_checkpoint(0, 8, |i| lost.get(i as usize).cloned())
                .unwrap()
                .lost
        );
        assert!(
            !decode_checkpoint(0, 8, |i| kept.get(i as usize).cloned())
                .unwrap()
                .lost
        );
        let mixed = [lost[0].clone(), kept[1].clone()];
        assert_eq!(
            decode_checkpoint(0, 8, |i| mixed.get(i as usize).cloned()),
            None
        );
        // Still no frees in a checkpoint, lost or not.
        let with_free = lost_checkpoint_pages(5, 0, 1, true, &[trusted(0), free(0, 0, 1, 0)]);
        assert_eq!(decode_checkpoint_page(&with_free[0]), None);
    }

    #[test]
    fn crc_journal_headers_are_40_bytes_and_every_flipped_bit_is_detected() {
        let salt = 0xfeed_beef;
        let h = journal_header(5, 130, 77, salt);
        assert_eq!(decode_journal_header(&h, salt), jh(5, 130, 77));
        assert_eq!(decode_journal_header(&h, salt ^ 1), None, "another disk's");
        assert_eq!(decode_journal_header(&h[..39], salt), None, "short");
        for bit in 0..40 * 8 {
            let mut c = h;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_journal_header(&c, salt), None, "bit {bit}");
        }
        // The 32-byte layout of before (its check at 28, over 0..28).
        let mut old = [0u8; 40];
        old[..8].copy_from_slice(b"TSCRCJNL");
        put64(&mut old, 8, 5);
        put64(&mut old, 16, 130);
        let check = crc32c(&old[..28]) ^ salt;
        put32(&mut old, 28, check);
        assert_eq!(decode_journal_header(&old, salt), None);
        // The newest whole copy rules: the higher serial (the second copy
        // on a tie, as the node's max_by_key picks).
        let a = journal_header(7, 100, 50, salt);
        let b = journal_header(8, 90, 60, salt);
        assert_eq!(newest_journal_header([&a, &b], salt), jh(8, 90, 60));
        assert_eq!(newest_journal_header([&b, &a], salt), jh(8, 90, 60));
        let tie = journal_header(8, 95, 61, salt);
        assert_eq!(newest_journal_header([&b, &tie], salt), jh(8, 95, 61));
        let mut bad = b;
        bad[30] ^= 4;
        assert_eq!(newest_journal_header([&a, &bad], salt), jh(7, 100, 50));
        assert_eq!(newest_journal_header([&[], &bad], salt), None);
    }

    /// A small format-v3 disk file laid out by hand: superblock, checkpoint
    /// areas, both log copies, crc journal, crc table and data.
    struct Fake {
        file: tempfile::NamedTempFile,
        salt: u32,
    }

    const UUID: uuid::Uuid = uuid::Uuid::from_u128(77);
    const CREATED: u64 = 1_700_000_000;
    const LOG: [u64; 2] = [0x1_0000, 0x1_4000];
    const CKPT: [u64; 2] = [0x1_8000, 0x1_a000];
    const JOURNAL: u64 = 0x1_c000;
    const CRC_TABLE: u64 = 0x1_f000;
    const DATA: u64 = 0x2_0000;

    impl Fake {
        fn new() -> Fake {
            use std::os::unix::fs::FileExt;
            let file = tempfile::NamedTempFile::new().unwrap();
            file.as_file().set_len(DATA + 64 * 4096).unwrap();
            let mut sb = vec![0u8; 4096];
            sb[..8].copy_from_slice(b"TESSERA\0");
            put32(&mut sb, 8, 3);
            sb[16..32].copy_from_slice(UUID.as_bytes());
            put32(&mut sb, 32, 64 << 10);
            put32(&mut sb, 36, 4096);
            put32(&mut sb, 40, 512);
            put32(&mut sb, 44, 16);
            put64(&mut sb, 48, DATA + 64 * 4096);
            put64(&mut sb, 56, 0x8000);
            put64(&mut sb, 64, 1024);
            put64(&mut sb, 88, CRC_TABLE);
            put64(&mut sb, 96, 4096);
            put64(&mut sb, 104, DATA);
            put64(&mut sb, 112, 4);
            put64(&mut sb, 120, CREATED);
            put64(&mut sb, 128, 0x9000);
            for (off, v) in [
                (160, LOG[0]),
                (168, LOG[1]),
                (176, 4),
                (184, CKPT[0]),
                (192, CKPT[1]),
                (200, 2),
                (208, 64),
                (216, JOURNAL),
                (224, 3),
            ] {
                put64(&mut sb, off, v);
            }
            seal(&mut sb);
            // The primary is damaged: the backup serves.
            file.as_file().write_all_at(&sb, 4096).unwrap();
            sb[200] ^= 1;
            file.as_file().write_all_at(&sb, 0).unwrap();
            Fake {
                file,
                salt: journal_salt(UUID, CREATED),
            }
        }

        fn write(&self, off: u64, b: &[u8]) {
            use std::os::unix::fs::FileExt;
            self.file.as_file().write_all_at(b, off).unwrap();
        }

        fn checkpoint(&self, area: usize, seq: u64, pos: u64, records: &[MapRecord]) {
            for (i, p) in checkpoint_pages(seq, pos, 1, records).iter().enumerate() {
                self.write(CKPT[area] + i as u64 * 4096, p);
            }
        }

        fn log(&self, copies: &[usize], pos: u64, page: &[u8]) {
            for &c in copies {
                self.write(LOG[c] + pos * 4096, page);
            }
        }

        /// Block data whose crc, tagged, is stored in the table.
        fn block(&self, phys: u64, fill: u8, tag: u32) -> u32 {
            let data = vec![fill; 4096];
            self.write(DATA + phys * 4096, &data);
            let crc = crc32c(&data) ^ tag;
            self.write(CRC_TABLE + phys * 4, &crc.to_le_bytes());
            crc
        }
    }

    #[test]
    fn a_hand_made_v3_disk_reads_back() {
        let f = Fake::new();
        let file = f.file.as_file();
        let l = DiskLayout::read(file).unwrap();
        assert_eq!(
            (l.version, l.disk, l.created, l.extent_size),
            (3, UUID, CREATED, 64 << 10)
        );
        let t = l.thin.unwrap();
        assert_eq!(
            (t.log, t.log_pages, t.checkpoints, t.checkpoint_pages),
            (LOG, 4, CKPT, 2)
        );
        assert_eq!(
            (t.blocks_total, t.crc_journal, t.journal_capacity()),
            (64, JOURNAL, 128)
        );
        assert!(l.extents(file).is_err(), "no extent table");
        // Area 0: the newest checkpoint (seq 5, replay from position 1);
        // area 1: an older one.
        f.checkpoint(0, 5, 1, &[alloc(0, 0, 4, 16, 3)]);
        f.checkpoint(1, 2, 0, &[alloc(0, 0, 4, 16, 3), alloc(9, 0, 1, 60, 2)]);
        // Position 1: page 5 (both copies); position 2: page 6, whole in
        // the mirror only; position 3: an older lap's page.
        f.log(&[0, 1], 0, &log_page(4, 0, &[alloc(9, 0, 1, 60, 2)]));
        f.log(
            &[0, 1],
            1,
            &log_page(5, 0, &[alloc(1, 2, 2, 40, 7), free(0, 1, 1, 17)]),
        );
        let mut p6 = log_page(6, 5, &[alloc(0, 1, 1, 50, 8)]);
        f.log(&[1], 2, &p6);
        p6[300] ^= 1;
        f.log(&[0], 2, &p6);
        f.log(&[0, 1], 3, &log_page(3, 0, &[free(9, 0, 1, 60)]));
        let m = l.thin_map(file).unwrap();
        assert!(!m.untrusted(), "{:?}", m.inconsistent);
        assert_eq!(m.checkpoint.as_ref().map(|c| (c.area, c.seq)), Some((0, 5)));
        assert_eq!(m.older.as_ref().map(|c| (c.area, c.seq)), Some((1, 2)));
        assert_eq!(m.log_pages, vec![(1, 5), (2, 6)]);
        let c0 = m.blocks(V, 0).unwrap();
        let at = |b: usize| c0[b].map(|p| (p.phys, p.generation, p.source));
        assert_eq!(
            at(0),
            Some((
                16,
                3,
                MapSource::Checkpoint {
                    area: 0,
                    page: 0,
                    slot: 0
                }
            ))
        );
        assert_eq!(
            at(1),
            Some((
                50,
                8,
                MapSource::Log {
                    pos: 2,
                    seq: 6,
                    slot: 0
                }
            ))
        );
        assert_eq!(at(3).map(|p| p.0), Some(19));
        assert_eq!(at(4), None);
        let c1 = m.blocks(V, 1).unwrap();
        assert_eq!(c1[3].map(|p| (p.phys, p.first, p.count)), Some((41, 2, 2)));
        assert!(
            m.blocks(V, 9).is_none(),
            "chunk 9 lives only in the older checkpoint"
        );
        assert_eq!(
            l.log_record(1, 2, 0).unwrap(),
            LOG[1] + 2 * 4096 + 16,
            "record 0 of the page at position 2, mirror copy"
        );
        assert_eq!(l.checkpoint_record(1, 0, 1).unwrap(), CKPT[1] + 40 + 64);

        // Crcs: the table, then the journal's records after `applied`.
        let tag = |chunk, generation, block| block_tag(V, chunk, generation, block);
        let c16 = f.block(16, 0xa1, tag(0, 3, 0));
        let _old50 = f.block(50, 0xb2, tag(0, 8, 1));
        let c41 = f.block(41, 0xc3, tag(1, 7, 3));
        // Block 50 was rewritten: its new crc is only in the journal.
        let new50 = crc32c(&[0xd4; 4096]) ^ tag(0, 8, 1);
        f.write(DATA + 50 * 4096, &[0xd4; 4096]);
        f.write(JOURNAL, &journal_header(3, 130, 0, f.salt));
        f.write(JOURNAL + 4096, &journal_header(2, 100, 0, f.salt));
        let ring = JOURNAL + 2 * 4096;
        f.write(ring + 3 * 32, &journal_record(131, 50, new50, f.salt));
        f.write(ring + 2 * 32, &journal_record(130, 16, 1, f.salt)); // applied
        let mut damaged = journal_record(132, 41, 7, f.salt);
        damaged[9] ^= 2;
        f.write(ring + 4 * 32, &damaged);
        let crcs = l.thin_crcs(file).unwrap();
        assert_eq!(crcs.journal.header, jh(3, 130, 0));
        assert_eq!(
            (crcs.crcs[16], crcs.crcs[50], crcs.crcs[41]),
            (c16, new50, c41)
        );
        assert_eq!(crcs.pending, BTreeMap::from([(50, ring + 3 * 32)]));
        // Every held block of chunk 0 that was written verifies under its tag.
        use std::os::unix::fs::FileExt;
        for b in [0usize, 1] {
            let p = c0[b].unwrap();
            let mut data = vec![0u8; 4096];
            file.read_exact_at(&mut data, l.block_data(p.phys)).unwrap();
            let want = crc32c(&data) ^ block_tag(V, 0, p.generation, b as u32);
            assert_eq!(crcs.crcs[p.phys as usize], want, "block {b}");
        }

        // The newest checkpoint damaged: replay from the older one meets a
        // page of a later lap (4 at position 0 follows 2..3 of an older
        // lap: here page 4 sits where 2 was expected): the map is lost.
        let mut page = checkpoint_pages(5, 1, 1, &[alloc(0, 0, 4, 16, 3)]).remove(0);
        page[45] ^= 8;
        f.write(CKPT[0], &page);
        let m = l.thin_map(file).unwrap();
        assert_eq!(m.checkpoint.as_ref().map(|c| c.seq), Some(2));
        assert!(m.older.is_none());
        assert!(m.lost && m.untrusted());
        // Both damaged: nothing is known.
        f.write(CKPT[1] + 100, &[0xff]);
        let m = l.thin_map(file).unwrap();
        assert!(m.checkpoint.is_none() && m.lost);
        assert!(m.chunks().next().is_none());
    }

    #[test]
    fn a_replay_that_stops_below_the_durable_mark_loses_the_map() {
        let f = Fake::new();
        let file = f.file.as_file();
        let l = DiskLayout::read(file).unwrap();
        // Replay from page 10 at position 2: 10 and 11 whole, then page 12
        // (position 0) damaged in both copies; position 1 an older lap's 9.
        f.checkpoint(0, 10, 2, &[alloc(0, 0, 4, 16, 3)]);
        f.log(&[0, 1], 2, &log_page(10, 9, &[alloc(1, 0, 1, 20, 4)]));
        f.log(&[0, 1], 3, &log_page(11, 10, &[alloc(2, 0, 1, 21, 4)]));
        let mut p12 = log_page(12, 11, &[alloc(3, 0, 1, 22, 4)]);
        p12[100] ^= 1;
        f.log(&[0, 1], 0, &p12);
        f.log(&[0, 1], 1, &log_page(9, 8, &[]));
        // No header whole: no mark; nothing says page 12 was flushed.
        let m = l.thin_map(file).unwrap();
        assert_eq!((m.log_durable, m.lost), (0, false));
        assert_eq!(m.log_pages, vec![(2, 10), (3, 11)]);
        let with_mark = |serial: u64, mark: u64| {
            f.write(JOURNAL + 4096, &journal_header(serial, 0, mark, f.salt));
            l.thin_map(file).unwrap()
        };
        // A mark up to where the replay stopped: every flushed page is there.
        for mark in [1, 11, 12] {
            let m = with_mark(4, mark);
            assert_eq!(
                (m.log_durable, m.untrusted()),
                (mark, false),
                "{:?}",
                m.loss
            );
        }
        // Past it: page 12 was flushed, and is gone.
        let m = with_mark(4, 13);
        assert_eq!(
            m.loss,
            vec![Loss::DurableMark {
                stopped: 12,
                durable: 13
            }]
        );
        assert!(m.lost && m.untrusted() && !m.trusts(V, 0));
        assert_eq!(m.log_pages.len(), 2, "the map is still as read");
        assert!(m.blocks(V, 2).is_some());
        // Only the newest whole copy's mark counts.
        f.write(JOURNAL, &journal_header(3, 0, 20, f.salt));
        assert!(!with_mark(4, 12).lost);
        f.write(JOURNAL + 4096 + 20, &[0xff]);
        let m = l.thin_map(file).unwrap();
        assert_eq!(
            m.loss,
            vec![Loss::DurableMark {
                stopped: 12,
                durable: 20
            }]
        );
        // A loss the replay finds itself (a later lap's page where it
        // stops) is that loss alone, the mark not consulted.
        f.log(&[0, 1], 0, &log_page(16, 15, &[]));
        assert_eq!(l.thin_map(file).unwrap().loss, vec![Loss::FlushedPages]);
        // No checkpoint: nothing is known, and nothing replayed.
        f.write(CKPT[0] + 8, &[0xff]);
        f.write(CKPT[1], &[0xff]);
        let m = l.thin_map(file).unwrap();
        assert_eq!(m.loss, vec![Loss::NoCheckpoint]);
        assert_eq!(m.log_durable, 20);
    }

    #[test]
    fn a_checkpoint_of_a_lost_map_keeps_it_lost_but_for_trusted_chunks() {
        let f = Fake::new();
        let file = f.file.as_file();
        let l = DiskLayout::read(file).unwrap();
        // Area 0: the newest checkpoint, of a map lost before; chunks 0 and
        // 3 were written whole since. Area 1: an older one, not lost.
        let write_area0 = |lost: bool| {
            let records = [alloc(0, 0, 4, 16, 3), trusted(0), trusted(3)];
            for (i, p) in lost_checkpoint_pages(10, 2, 1, lost, &records)
                .iter()
                .enumerate()
            {
                f.write(CKPT[0] + i as u64 * 4096, p);
            }
        };
        write_area0(true);
        f.checkpoint(1, 6, 2, &[alloc(0, 0, 4, 16, 3)]);
        // The log after it: chunk 1 written whole, chunk 4 in part.
        f.log(
            &[0, 1],
            2,
            &log_page(10, 9, &[alloc(1, 0, 16, 20, 4), trusted(1)]),
        );
        f.log(&[0, 1], 3, &log_page(11, 10, &[alloc(4, 2, 1, 40, 5)]));
        let m = l.thin_map(file).unwrap();
        assert_eq!(m.loss, vec![Loss::EarlierOpen]);
        assert!(m.lost && m.untrusted() && m.inconsistent.is_empty());
        assert_eq!(
            m.checkpoint.as_ref().map(|c| (c.seq, c.lost)),
            Some((10, true))
        );
        assert_eq!(m.older.as_ref().map(|c| (c.seq, c.lost)), Some((6, false)));
        assert_eq!(m.log_pages, vec![(2, 10), (3, 11)]);
        assert_eq!(
            m.trusted,
            std::collections::BTreeSet::from([(V, 0), (V, 1), (V, 3)])
        );
        for (chunk, reads) in [(0, true), (1, true), (2, false), (3, true), (4, false)] {
            assert_eq!(m.trusts(V, chunk), reads, "chunk {chunk}");
        }
        assert_eq!(m.blocks(V, 4).unwrap()[2].map(|p| p.phys), Some(40));
        // The same checkpoint not lost: the map is trusted whole.
        write_area0(false);
        let m = l.thin_map(file).unwrap();
        assert!(!m.untrusted() && m.loss.is_empty());
        assert!(m.trusts(V, 2) && m.trusts(V, 4));
    }

    #[test]
    fn block_tags_cover_every_field() {
        let t = block_tag(V, 3, 9, 17);
        assert_ne!(t, 0);
        assert_ne!(t, block_tag(V, 4, 9, 17));
        assert_ne!(t, block_tag(V, 3, 10, 17));
        assert_ne!(t, block_tag(V, 3, 9, 18));
        assert_ne!(t, block_tag(uuid::Uuid::from_u128(1), 3, 9, 17));
        let mut b = Vec::new();
        b.extend_from_slice(V.as_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(&9u64.to_le_bytes());
        b.extend_from_slice(&17u32.to_le_bytes());
        assert_eq!(t, crc32c(&b));
    }
}
