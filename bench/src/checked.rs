//! A self-checking block workload's pieces: what a written 4 KiB block
//! holds, a model of what every block may read as, and an independent
//! reader of a storage node's disk file (to compare the copies themselves).
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

/// A storage node's disk file as format versions 1 and 2 lay it out (see
/// `chunkstore/src/lib.rs`), read without the product's code.
#[derive(Debug, Clone)]
pub struct DiskLayout {
    pub version: u32,
    pub disk: uuid::Uuid,
    pub extent_size: u64,
    /// (offset, length) of the primary table; the mirror's offset (0: none).
    pub epoch_table: (u64, u64),
    pub epoch_mirror: u64,
    pub extent_table: (u64, u64),
    pub extent_mirror: u64,
    pub crc_table: (u64, u64),
    pub data_offset: u64,
    pub extents: u64,
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
                version == 1 || version == 2,
                "format version {version} is unknown"
            );
            let v2 = version >= 2;
            return Ok(DiskLayout {
                version,
                disk: uuid::Uuid::from_bytes(sb[16..32].try_into()?),
                extent_size: u32::from_le_bytes(sb[32..36].try_into()?) as u64,
                epoch_table: (le64(&sb, 56), le64(&sb, 64)),
                epoch_mirror: if v2 { le64(&sb, 128) } else { 0 },
                extent_table: (le64(&sb, 72), le64(&sb, 80)),
                extent_mirror: if v2 { le64(&sb, 136) } else { 0 },
                crc_table: (le64(&sb, 88), le64(&sb, 96)),
                data_offset: le64(&sb, 104),
                extents: le64(&sb, 112),
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
}
