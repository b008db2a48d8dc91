//! Damage to every on-disk structure — superblock, epoch slot, extent
//! record, stamp, crc table block, data block — by flipped bits and by
//! unreadable sectors: it is detected, the node never panics, a damaged
//! epoch slot never lowers a vDisk's fence, and a damaged extent record
//! never turns stored data into "unallocated, zeros" that a reader takes as
//! good. Every block reads as its content or fails with an error that makes
//! the replicator read another copy ([`Error::is_bad_copy`]).
//!
//! Offsets come from the superblock, decoded here from the documented
//! format (crate documentation), so these tests check the document too.

use std::sync::Arc;

use tessera_chunkstore::{Device, Disk, Error, FormatOptions, PowerLossDevice};
use uuid::Uuid;

const BS: usize = 4096;
const ES: u32 = 16 << 10;
const BLOCKS: u32 = ES / BS as u32;
const SIZE: u64 = (1 << 20) + 8 * ES as u64;
const A: Uuid = Uuid::from_u128(0xa);
const B: Uuid = Uuid::from_u128(0xb);
const C: Uuid = Uuid::from_u128(0xc);
/// The epochs the ground truth fences A and B at.
const EPOCH_A: u64 = 4;
const EPOCH_B: u64 = 2;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Where things are, from the superblock (see the format's documentation).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    epoch_tables: [u64; 2],
    extent_tables: [u64; 2],
    crc_table: u64,
    data: u64,
}

impl Geometry {
    fn read(dev: &PowerLossDevice) -> Self {
        let mut sb = vec![0u8; 4096];
        dev.read_at(&mut sb, 0).unwrap();
        assert_eq!(&sb[..8], b"TESSERA\0");
        assert_eq!(u32::from_le_bytes(sb[8..12].try_into().unwrap()), 2);
        Geometry {
            epoch_tables: [u64_at(&sb, 56), u64_at(&sb, 128)],
            extent_tables: [u64_at(&sb, 72), u64_at(&sb, 136)],
            crc_table: u64_at(&sb, 88),
            data: u64_at(&sb, 104),
        }
    }

    fn record(&self, copy: usize, extent: u64) -> u64 {
        self.extent_tables[copy] + extent * 64
    }

    fn slot(&self, copy: usize, slot: u64) -> u64 {
        self.epoch_tables[copy] + slot * 64
    }

    /// Bytes of crc table per extent: a 64-byte stamp, then 4 per block,
    /// rounded up to 64.
    fn run(&self) -> u64 {
        64 + (u64::from(BLOCKS) * 4).div_ceil(64) * 64
    }

    fn stamp(&self, extent: u64) -> u64 {
        self.crc_table + extent * self.run()
    }

    fn crc(&self, extent: u64, block: u32) -> u64 {
        self.stamp(extent) + 64 + u64::from(block) * 4
    }

    fn block(&self, extent: u64, block: u32) -> u64 {
        self.data + extent * u64::from(ES) + u64::from(block) * BS as u64
    }
}

/// A flushed disk with known content, and what it must read as.
struct Truth {
    dev: PowerLossDevice,
    geo: Geometry,
    /// (vdisk, chunk) → content; absent: zeros.
    chunks: Vec<((Uuid, u64), Vec<u8>)>,
    /// Extents of A0, A1, B0 and of the freed A2.
    extent_a0: u64,
    extent_freed: u64,
    /// Epoch slots holding A's and B's epochs.
    slot_a: u64,
}

fn truth() -> Truth {
    let dev = Arc::new(PowerLossDevice::new(SIZE));
    let opts = FormatOptions {
        extent_size: ES,
        ..FormatOptions::new(Uuid::from_u128(0xd15c))
    };
    let disk = Disk::format_device_with_slots(dev.clone(), &opts, 8).unwrap();
    let mut chunks = Vec::new();
    for (i, (v, c, e)) in [
        (A, 0, EPOCH_A),
        (A, 1, EPOCH_A),
        (B, 0, EPOCH_B),
        (A, 2, EPOCH_A),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(i as u64 + 1, ES as usize);
        disk.write(v, c, 0, &data, e).unwrap();
        chunks.push(((v, c), data));
    }
    let extent_a0 = disk.chunks(A)[0].extent;
    let extent_freed = disk.chunks(A)[2].extent;
    disk.discard(A, 2, 0, ES, EPOCH_A).unwrap();
    chunks.pop();
    // A partial discard inside A1: zeros there now.
    disk.discard(A, 1, 4096 + 512, 4096, EPOCH_A).unwrap();
    chunks[1].1[4096 + 512..8192 + 512].fill(0);
    disk.flush().unwrap();
    drop(disk);
    // The slots: A fenced first, so it took slot 0.
    let dev = Arc::try_unwrap(dev).unwrap();
    let geo = Geometry::read(&dev);
    Truth {
        dev,
        geo,
        chunks,
        extent_a0,
        extent_freed,
        slot_a: 0,
    }
}

impl Truth {
    fn content(&self, v: Uuid, c: u64) -> Vec<u8> {
        self.chunks
            .iter()
            .find(|(k, _)| *k == (v, c))
            .map_or_else(|| vec![0; ES as usize], |(_, d)| d.clone())
    }

    /// A copy of the disk to damage.
    fn copy(&self) -> PowerLossDevice {
        self.dev.snapshot()
    }
}

/// How a damaged disk read.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    good_blocks: usize,
    bad_blocks: usize,
}

/// Opens a damaged copy and checks every rule; returns how the blocks read.
/// `Ok(None)`: the disk refused to open (both superblocks damaged).
fn check(t: &Truth, dev: PowerLossDevice) -> Result<Option<Outcome>, String> {
    let disk = match Disk::open_device(Arc::new(dev)) {
        Ok(d) => d,
        Err(Error::BadSuperblock(_) | Error::NotTessera) => return Ok(None),
        Err(e) => return Err(format!("open failed: {e}")),
    };
    let mut out = Outcome::default();
    for v in [A, B, C] {
        for c in 0..4 {
            let want = t.content(v, c);
            for b in 0..BLOCKS {
                let mut buf = vec![0xeeu8; BS];
                match disk.read(v, c, b * BS as u32, &mut buf) {
                    Ok(()) if buf == want[b as usize * BS..(b as usize + 1) * BS] => {
                        out.good_blocks += 1;
                    }
                    Ok(()) => {
                        return Err(format!(
                            "{v} chunk {c} block {b} reads as wrong data with status Ok"
                        ))
                    }
                    Err(e) if e.is_bad_copy() => out.bad_blocks += 1,
                    Err(e) => return Err(format!("{v} chunk {c} block {b}: unexpected {e}")),
                }
            }
        }
    }
    // No damage lowers a fence: writers older than the truth are refused.
    for (v, epoch) in [(A, EPOCH_A), (B, EPOCH_B)] {
        for old in 0..epoch {
            match disk.write(v, 3, 0, &[1; 512], old) {
                Err(Error::StaleEpoch { .. } | Error::FenceUnknown { .. }) => {}
                other => {
                    return Err(format!(
                        "{v}: a write at epoch {old} < {epoch} was not refused: {other:?}"
                    ))
                }
            }
        }
    }
    Ok(Some(out))
}

fn flip(dev: &PowerLossDevice, offset: u64, bit: u8) {
    dev.flip_bit(offset, bit);
}

#[test]
fn undamaged_disk_reads_whole() {
    let t = truth();
    let out = check(&t, t.copy()).unwrap().unwrap();
    assert_eq!(out.bad_blocks, 0);
}

#[test]
fn superblocks() {
    let t = truth();
    for copy in [0u64, 4096] {
        let d = t.copy();
        flip(&d, copy + 20, 3);
        let out = check(&t, d).unwrap().expect("the other copy serves");
        assert_eq!(out.bad_blocks, 0);
    }
    let d = t.copy();
    flip(&d, 20, 3);
    flip(&d, 4096 + 100, 0);
    assert!(
        check(&t, d).unwrap().is_none(),
        "both copies damaged: refused"
    );
    let d = t.copy();
    d.fail_reads(0, 8192);
    assert!(
        check(&t, d).unwrap().is_none(),
        "both copies unreadable: refused"
    );
}

/// Every bit of one copy of a used extent record, of a free one, and of an
/// epoch slot: the other copy serves, nothing is lost.
#[test]
fn any_bit_of_one_copy() {
    let t = truth();
    let g = t.geo;
    for (what, off) in [
        ("record of A0, primary", g.record(0, t.extent_a0)),
        ("record of A0, mirror", g.record(1, t.extent_a0)),
        ("free record, primary", g.record(0, t.extent_freed)),
        ("slot of A, primary", g.slot(0, t.slot_a)),
        ("slot of A, mirror", g.slot(1, t.slot_a)),
    ] {
        for bit in 0..512u64 {
            let d = t.copy();
            flip(&d, off + bit / 8, (bit % 8) as u8);
            let out = check(&t, d)
                .unwrap_or_else(|e| panic!("{what}, bit {bit}: {e}"))
                .unwrap();
            assert_eq!(out.bad_blocks, 0, "{what}, bit {bit}");
        }
    }
}

/// Finding 2: the same bit of both copies of A0's record. A0 must never
/// read as zeros with status Ok.
#[test]
fn any_bit_of_both_copies_of_a_record() {
    let t = truth();
    let g = t.geo;
    for bit in 0..512u64 {
        let d = t.copy();
        for copy in 0..2 {
            flip(&d, g.record(copy, t.extent_a0) + bit / 8, (bit % 8) as u8);
        }
        let out = check(&t, d)
            .unwrap_or_else(|e| panic!("bit {bit}: {e}"))
            .unwrap();
        assert_eq!(
            out.bad_blocks, BLOCKS as usize,
            "bit {bit}: only A0 is in doubt"
        );
    }
    // Plus its stamp: nobody can tell whose the extent is, so no
    // unallocated chunk reads as zeros any more.
    let d = t.copy();
    for copy in 0..2 {
        flip(&d, g.record(copy, t.extent_a0) + 30, 1);
    }
    flip(&d, g.stamp(t.extent_a0) + 10, 2);
    let out = check(&t, d).unwrap().unwrap();
    // Mapped: A1, B0 (8 blocks). Everything else: an error.
    assert_eq!(out.good_blocks, 2 * BLOCKS as usize);
}

/// The freed extent's record, both copies: its last owner (A2, discarded)
/// is in doubt until rewritten; nothing reads wrong.
#[test]
fn both_copies_of_a_free_record() {
    let t = truth();
    let g = t.geo;
    let d = t.copy();
    for copy in 0..2 {
        flip(&d, g.record(copy, t.extent_freed) + 9, 0);
    }
    let out = check(&t, d).unwrap().unwrap();
    assert_eq!(out.bad_blocks, BLOCKS as usize);
}

/// Finding 19: the same bit of both copies of A's epoch slot: A's fence is
/// never lowered (writes are refused until A is fenced again).
#[test]
fn any_bit_of_both_copies_of_a_slot() {
    let t = truth();
    let g = t.geo;
    for bit in 0..512u64 {
        let d = t.copy();
        for copy in 0..2 {
            flip(&d, g.slot(copy, t.slot_a) + bit / 8, (bit % 8) as u8);
        }
        let out = check(&t, d)
            .unwrap_or_else(|e| panic!("bit {bit}: {e}"))
            .unwrap();
        assert_eq!(out.bad_blocks, 0, "bit {bit}");
    }
}

#[test]
fn crc_table_and_data_blocks() {
    let t = truth();
    let g = t.geo;
    for (what, off) in [
        ("crc of A0 block 1", g.crc(t.extent_a0, 1)),
        ("data of A0 block 1", g.block(t.extent_a0, 1) + 777),
    ] {
        for bit in [0u8, 5] {
            let d = t.copy();
            flip(&d, off, bit);
            let out = check(&t, d)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .unwrap();
            assert_eq!(out.bad_blocks, 1, "{what}");
        }
    }
    // A stamp alone is only read when both record copies are damaged.
    let d = t.copy();
    flip(&d, g.stamp(t.extent_a0) + 3, 3);
    assert_eq!(check(&t, d).unwrap().unwrap().bad_blocks, 0);
}

/// Unreadable sectors (media errors) in every region: the other copy
/// serves, or the affected reads fail; no panic, no SIGBUS.
#[test]
fn unreadable_sectors() {
    let t = truth();
    let g = t.geo;
    /// What, which byte ranges fail, how many blocks then read as errors.
    type Case<'a> = (&'a str, Vec<(u64, u64)>, usize);
    let cases: Vec<Case> = vec![
        (
            "primary tables",
            vec![(g.epoch_tables[0], 512), (g.extent_tables[0], 512)],
            0,
        ),
        (
            "mirror tables",
            vec![(g.epoch_tables[1], 512), (g.extent_tables[1], 512)],
            0,
        ),
        (
            "A0's crcs",
            vec![(g.crc(t.extent_a0, 0), 16)],
            BLOCKS as usize,
        ),
        ("A0's block 2", vec![(g.block(t.extent_a0, 2), 512)], 1),
        // A media error takes a whole sector: the records of all four
        // extents used so far share it, so A0, A1, B0 and the discarded A2
        // are in doubt (each extent's stamp names its chunk).
        (
            "both copies of A0's record",
            vec![
                (g.record(0, t.extent_a0), 64),
                (g.record(1, t.extent_a0), 64),
            ],
            4 * BLOCKS as usize,
        ),
        (
            "both copies of A's slot",
            vec![(g.slot(0, t.slot_a), 64), (g.slot(1, t.slot_a), 64)],
            0,
        ),
        (
            "the whole crc table",
            vec![(g.crc_table, g.data - g.crc_table)],
            3 * BLOCKS as usize,
        ),
    ];
    for (what, ranges, bad) in cases {
        let d = t.copy();
        for (off, len) in ranges {
            d.fail_reads(off, len);
        }
        let out = check(&t, d)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .unwrap();
        assert_eq!(out.bad_blocks, bad, "{what}");
    }
}

/// Random bit flips anywhere in the metadata and the data, many at once.
/// `TESSERA_DAMAGE_CASES` runs more.
#[test]
fn random_bit_storms() {
    let t = truth();
    let g = t.geo;
    let cases: u64 = std::env::var("TESSERA_DAMAGE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let end = g.data + 8 * u64::from(ES);
    // Where the bytes that matter are: superblocks, tables, crcs, data.
    let regions = [
        (0, 8192),
        (g.epoch_tables[0], 512),
        (g.epoch_tables[1], 512),
        (g.extent_tables[0], 512),
        (g.extent_tables[1], 512),
        (g.crc_table, 8 * g.run()),
        (g.data, end - g.data),
    ];
    let mut x = 0x5eed_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for case in 0..cases {
        let d = t.copy();
        let flips = 1 + next() % 12;
        for _ in 0..flips {
            let (off, len) = regions[(next() % regions.len() as u64) as usize];
            flip(&d, off + next() % len, (next() % 8) as u8);
        }
        check(&t, d).unwrap_or_else(|e| panic!("storm {case}: {e}"));
    }
}
