//! Disks of on-disk format version 1, made by the version-1 code itself
//! (`legacy_v1/`, kept verbatim), open with this build: their content and
//! epochs read as they were, they are upgraded in place to version 2
//! (crash-safely: power loss at any point of the upgrade leaves a disk that
//! opens with the same content), a version-1 build then refuses them, and
//! the version-1 bugs of findings 2 and 19 do not carry over.

#[path = "legacy_v1/mod.rs"]
mod legacy_v1;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tessera_chunkstore::{Device, Disk, Error, PowerLossDevice};
use uuid::Uuid;

const ES: u32 = 64 << 10;
const SIZE: u64 = 4 << 20;
const A: Uuid = Uuid::from_u128(0xa);
const B: Uuid = Uuid::from_u128(0xb);
/// Version 1's fixed geometry: the extent table follows 16384 epoch slots.
const V1_EPOCH_TABLE: u64 = 64 << 10;
const V1_EXTENT_TABLE: u64 = V1_EPOCH_TABLE + 16384 * 64;

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

/// What a version-1 disk holds: chunk contents and epochs.
struct Model {
    chunks: Vec<((Uuid, u64), Vec<u8>)>,
    epochs: [(Uuid, u64); 2],
}

impl Model {
    fn content(&self, v: Uuid, c: u64) -> Vec<u8> {
        self.chunks
            .iter()
            .find(|(k, _)| *k == (v, c))
            .map_or_else(|| vec![0; ES as usize], |(_, d)| d.clone())
    }

    fn chunk_mut(&mut self, v: Uuid, c: u64) -> &mut Vec<u8> {
        if !self.chunks.iter().any(|(k, _)| *k == (v, c)) {
            self.chunks.push(((v, c), vec![0; ES as usize]));
        }
        &mut self
            .chunks
            .iter_mut()
            .find(|(k, _)| *k == (v, c))
            .unwrap()
            .1
    }
}

/// Makes a version-1 disk at `path` with the version-1 code: writes of
/// every shape, partial and whole discards, fences.
fn make_version_1(path: &Path) -> Model {
    let opts = legacy_v1::FormatOptions {
        extent_size: ES,
        size: Some(SIZE),
        ..legacy_v1::FormatOptions::new(Uuid::from_u128(0x01d))
    };
    let disk = legacy_v1::Disk::format(path, &opts).unwrap();
    let mut m = Model {
        chunks: Vec::new(),
        epochs: [(A, 3), (B, 7)],
    };
    let mut seed = 0;
    for (v, epoch) in m.epochs {
        for c in 0..5u64 {
            for (off, len) in [
                (0u32, ES),
                (4096 + 512, 3000 / 512 * 512),
                (ES - 8192, 8192),
            ] {
                seed += 1;
                let data = pattern(seed, len as usize);
                disk.write(v, c, off, &data, epoch).unwrap();
                m.chunk_mut(v, c)[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        disk.discard(v, 1, 8192, 4096 + 1024, epoch).unwrap();
        m.chunk_mut(v, 1)[8192..8192 + 4096 + 1024].fill(0);
        disk.discard(v, 3, 0, ES, epoch).unwrap();
        m.chunk_mut(v, 3).fill(0);
    }
    disk.fence(A, 3).unwrap();
    disk.flush().unwrap();
    assert_eq!(disk.info().format_version, 1);
    m
}

/// Every chunk reads as the model says; epochs hold.
fn check(disk: &Disk, m: &Model) {
    for (v, epoch) in m.epochs {
        assert_eq!(disk.epoch(v), epoch, "{v}");
        for c in 0..8u64 {
            let mut buf = vec![0xeeu8; ES as usize];
            disk.read(v, c, 0, &mut buf)
                .unwrap_or_else(|e| panic!("{v} chunk {c}: {e}"));
            assert!(buf == m.content(v, c), "{v} chunk {c} differs");
        }
        assert!(matches!(
            disk.write(v, 0, 0, &[1; 512], epoch - 1),
            Err(Error::StaleEpoch { .. })
        ));
    }
}

#[test]
fn a_version_1_disk_opens_is_upgraded_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.img");
    let mut m = make_version_1(&path);
    let v1_chunks = legacy_v1::Disk::open(&path).unwrap().chunks(A);

    let disk = Disk::open(&path).unwrap();
    let info = disk.info();
    assert_eq!(info.format_version, 2);
    assert!(!info.mirrored_tables);
    assert_eq!(info.quarantined_extents, 0);
    let now: Vec<(u64, u64, u64)> = disk
        .chunks(A)
        .iter()
        .map(|c| (c.chunk, c.extent, c.generation))
        .collect();
    let before: Vec<(u64, u64, u64)> = v1_chunks
        .iter()
        .map(|c| (c.chunk, c.extent, c.generation))
        .collect();
    assert_eq!(now, before);
    check(&disk, &m);

    // Old extents (plain crcs) and new ones (tagged) side by side: partial
    // overwrites of both, new allocations, a free and a reuse.
    disk.write(A, 0, 512, &[7; 1024], 3).unwrap();
    m.chunk_mut(A, 0)[512..1536].fill(7);
    disk.write(A, 6, 4096, &[8; 4096], 3).unwrap();
    m.chunk_mut(A, 6)[4096..8192].fill(8);
    disk.discard(B, 2, 0, ES, 7).unwrap();
    m.chunk_mut(B, 2).fill(0);
    disk.write(B, 7, 0, &[9; 8192], 7).unwrap();
    m.chunk_mut(B, 7)[..8192].fill(9);
    disk.write(A, 6, 8192 + 512, &[6; 512], 3).unwrap();
    m.chunk_mut(A, 6)[8192 + 512..8192 + 1024].fill(6);
    check(&disk, &m);
    drop(disk);

    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().format_version, 2);
    check(&disk, &m);
    drop(disk);

    // A version-1 build refuses the upgraded disk (it would misread the
    // tagged crcs of the new extents).
    assert!(matches!(
        legacy_v1::Disk::open(&path),
        Err(legacy_v1::Error::UnsupportedVersion { found: 2 })
    ));
}

/// A device that stops working (the process died) after `budget` writes,
/// zeroings or syncs.
struct StopAfter {
    inner: Arc<PowerLossDevice>,
    budget: AtomicI64,
}

impl StopAfter {
    fn spend(&self) -> std::io::Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(std::io::Error::other("the process died"));
        }
        Ok(())
    }
}

impl Device for StopAfter {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.spend()?;
        self.inner.write_at(buf, offset)
    }

    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.spend()?;
        self.inner.zero(offset, len)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.spend()?;
        self.inner.sync()
    }
}

/// Power loss at every point of the upgrade (after each write or sync of
/// the first open, with every subset of what was pending, in any order)
/// leaves a disk that opens with the same content and epochs.
#[test]
fn the_upgrade_survives_power_loss_at_any_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.img");
    let m = make_version_1(&path);
    let image = std::fs::read(&path).unwrap();
    let base = PowerLossDevice::from_image(&image);
    let mut stopped_early = 0;
    for budget in 0..64 {
        let inner = Arc::new(base.snapshot());
        let dev = Arc::new(StopAfter {
            inner: inner.clone(),
            budget: AtomicI64::new(budget),
        });
        let finished = Disk::open_device(dev).is_ok();
        let pending = inner.pending_writes().len();
        for seed in 0..(1u64 << pending.min(6)) {
            let crashed = inner.snapshot();
            crashed.crash(seed);
            let disk = Disk::open_device(Arc::new(crashed))
                .unwrap_or_else(|e| panic!("budget {budget}, crash {seed}: {e}"));
            assert_eq!(disk.info().format_version, 2);
            check(&disk, &m);
        }
        if finished {
            break;
        }
        stopped_early += 1;
    }
    assert!(
        stopped_early >= 3,
        "the open must have been cut at several points"
    );
}

/// Finding 2 on a version-1 disk: one bit flipped in a chunk's extent
/// record. Version 1 then reads the chunk as zeros with status Ok (which
/// scrub copied over the good copies); this build reports an error, which
/// makes the replicator read another copy and rewrite this one.
#[test]
fn a_damaged_version_1_record_never_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.img");
    let m = make_version_1(&path);
    let extent = legacy_v1::Disk::open(&path).unwrap().chunks(A)[0].extent;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = V1_EXTENT_TABLE + extent * 64 + 30;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 4], at).unwrap();
    drop(f);

    // Before: version 1 reads A's chunk 0 as zeros, status Ok.
    let old = legacy_v1::Disk::open(&path).unwrap();
    let mut buf = vec![0xeeu8; ES as usize];
    old.read(A, 0, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0; ES as usize], "the version-1 bug is reproduced");
    assert_ne!(m.content(A, 0), buf);
    drop(old);

    // Now: an error; the other chunks still read; the chunk takes a whole
    // rewrite (the replicator's repair) and then reads back.
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().ownerless_extents, 1);
    assert!(matches!(
        disk.read(A, 0, 0, &mut buf),
        Err(Error::OwnershipUnknown { .. })
    ));
    let mut one = vec![0u8; ES as usize];
    disk.read(B, 0, 0, &mut one).unwrap();
    assert_eq!(one, m.content(B, 0));
    let data = m.content(A, 0);
    disk.write(A, 0, 0, &data, 3).unwrap();
    disk.read(A, 0, 0, &mut buf).unwrap();
    assert_eq!(buf, data);
    // Every unallocated chunk is in doubt (the damaged extent could be
    // anyone's), except those written or discarded whole since.
    assert!(matches!(
        disk.read(B, 6, 0, &mut buf),
        Err(Error::OwnershipUnknown { .. })
    ));
    disk.discard(B, 0, 0, ES, 7).unwrap();
    disk.discard(B, 6, 0, ES, 7).unwrap();
    for c in [0, 6] {
        disk.read(B, c, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![0; ES as usize]);
    }
}

/// Finding 19 on a version-1 disk: one bit flipped in a vDisk's epoch
/// slot. Version 1 then admits any writer; this build refuses every write
/// of that vDisk until it is fenced again.
#[test]
fn a_damaged_version_1_epoch_slot_never_lowers_the_fence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.img");
    make_version_1(&path);
    // A was fenced first: slot 0.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = V1_EPOCH_TABLE + 25;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
    drop(f);

    let old = legacy_v1::Disk::open(&path).unwrap();
    assert_eq!(old.epoch(A), 0, "the version-1 bug is reproduced");
    drop(old);

    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().quarantined_epoch_slots, 1);
    for epoch in 0..=4 {
        assert!(matches!(
            disk.write(A, 0, 0, &[1; 512], epoch),
            Err(Error::FenceUnknown { .. } | Error::StaleEpoch { .. })
        ));
    }
    assert_eq!(disk.fence(A, 4).unwrap(), 4);
    disk.write(A, 0, 0, &[1; 512], 4).unwrap();
    assert!(matches!(
        disk.write(A, 0, 0, &[1; 512], 3),
        Err(Error::StaleEpoch { .. })
    ));
}
