//! Model-based property test: random writes, discards, reads and reopens on a
//! few chunks, checked against an in-memory copy of every chunk.

use std::path::Path;

use proptest::prelude::*;
use tessera_chunkstore::{Disk, FormatOptions, SECTOR_SIZE};
use uuid::Uuid;

const ES: u32 = 16 << 10;
const CHUNKS: u64 = 3;
const SECTORS: u32 = ES / SECTOR_SIZE;
const V: Uuid = Uuid::from_u128(0xabc);

#[derive(Debug, Clone)]
enum Op {
    Write {
        chunk: u64,
        sector: u32,
        sectors: u32,
        seed: u8,
    },
    Discard {
        chunk: u64,
        sector: u32,
        sectors: u32,
    },
    DiscardAll {
        chunk: u64,
    },
    Read {
        chunk: u64,
        sector: u32,
        sectors: u32,
    },
    Reopen,
}

/// (first sector, sector count) within a chunk.
fn range() -> impl Strategy<Value = (u32, u32)> {
    (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=SECTORS - s))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..CHUNKS, range(), any::<u8>()).prop_map(|(chunk, (sector, sectors), seed)| Op::Write { chunk, sector, sectors, seed }),
        2 => (0..CHUNKS, range()).prop_map(|(chunk, (sector, sectors))| Op::Discard { chunk, sector, sectors }),
        1 => (0..CHUNKS).prop_map(|chunk| Op::DiscardAll { chunk }),
        3 => (0..CHUNKS, range()).prop_map(|(chunk, (sector, sectors))| Op::Read { chunk, sector, sectors }),
        1 => Just(Op::Reopen),
    ]
}

fn bytes(sector: u32, sectors: u32) -> (u32, usize) {
    (sector * SECTOR_SIZE, (sectors * SECTOR_SIZE) as usize)
}

fn run(path: &Path, ops: &[Op]) -> Result<(), TestCaseError> {
    let opts = FormatOptions {
        extent_size: ES,
        size: Some(4 << 20),
        ..FormatOptions::new(Uuid::from_u128(1))
    };
    let mut disk = Some(Disk::format(path, &opts).unwrap());
    let mut model = vec![vec![0u8; ES as usize]; CHUNKS as usize];
    let mut allocated = [false; CHUNKS as usize];
    for op in ops {
        let d = disk.as_ref().unwrap();
        match *op {
            Op::Write {
                chunk,
                sector,
                sectors,
                seed,
            } => {
                let (off, len) = bytes(sector, sectors);
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                    .collect();
                d.write(V, chunk, off, &data, 1).unwrap();
                model[chunk as usize][off as usize..off as usize + len].copy_from_slice(&data);
                allocated[chunk as usize] = true;
            }
            Op::Discard {
                chunk,
                sector,
                sectors,
            } => {
                let (off, len) = bytes(sector, sectors);
                d.discard(V, chunk, off, len as u32, 1).unwrap();
                model[chunk as usize][off as usize..off as usize + len].fill(0);
                if len == ES as usize {
                    allocated[chunk as usize] = false;
                }
            }
            Op::DiscardAll { chunk } => {
                d.discard(V, chunk, 0, ES, 1).unwrap();
                model[chunk as usize].fill(0);
                allocated[chunk as usize] = false;
            }
            Op::Read {
                chunk,
                sector,
                sectors,
            } => {
                let (off, len) = bytes(sector, sectors);
                let mut buf = vec![0xeeu8; len];
                d.read(V, chunk, off, &mut buf).unwrap();
                prop_assert_eq!(
                    &buf[..],
                    &model[chunk as usize][off as usize..off as usize + len]
                );
            }
            Op::Reopen => {
                drop(disk.take()); // closes the device and releases its lock
                disk = Some(Disk::open(path).unwrap());
            }
        }
    }
    let d = disk.as_ref().unwrap();
    for c in 0..CHUNKS {
        let mut buf = vec![0xeeu8; ES as usize];
        d.read(V, c, 0, &mut buf).unwrap();
        prop_assert_eq!(&buf, &model[c as usize], "chunk {}", c);
    }
    let listed: Vec<u64> = d.chunks(V).iter().map(|c| c.chunk).collect();
    let expected: Vec<u64> = (0..CHUNKS).filter(|&c| allocated[c as usize]).collect();
    prop_assert_eq!(listed, expected);
    prop_assert_eq!(
        d.info().extents_used,
        allocated.iter().filter(|&&a| a).count() as u64
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn matches_in_memory_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        run(&dir.path().join("disk.img"), &ops)?;
    }
}
