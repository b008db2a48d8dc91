//! Unit tests of `Disk` on small files in temporary directories.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use uuid::Uuid;

use super::*;
use crate::codec::{put_u32, seal};
use crate::record::ExtentRecord;
use crate::SuperblockError;

const ES: u32 = 64 << 10;
const SIZE: u64 = 4 << 20;

thread_local! {
    /// Whether this test formats its disks at version 3 (see [`v3`]).
    static THIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a test of the disk's contract on disks formatted at version 3.
fn v3(test: fn()) {
    THIN.with(|t| t.set(true));
    test();
}

fn opts(size: u64) -> FormatOptions {
    FormatOptions {
        disk_uuid: Uuid::from_u128(0xd15c),
        extent_size: ES,
        size: Some(size),
        force: false,
        thin: THIN.with(|t| t.get()),
    }
}

fn new_disk() -> (TempDir, PathBuf, Disk) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let disk = Disk::format(&path, &opts(SIZE)).unwrap();
    (dir, path, disk)
}

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

fn read_all(d: &Disk, v: Uuid, chunk: u64) -> Vec<u8> {
    let mut buf = vec![0xffu8; ES as usize];
    d.read(v, chunk, 0, &mut buf).unwrap();
    buf
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn flip(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], offset).unwrap();
}

const V: Uuid = Uuid::from_u128(1);

#[test]
fn disk_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Disk>();
}

#[test]
fn format_open_round_trip() {
    let (_dir, path, disk) = new_disk();
    let info = disk.info();
    assert_eq!(info.uuid, Uuid::from_u128(0xd15c));
    assert_eq!(info.format_version, 2);
    assert!(info.mirrored_tables);
    assert_eq!(info.extent_size, ES);
    assert_eq!(info.device_size, SIZE);
    assert!(info.extents_total > 0);
    assert_eq!(info.extents_used, 0);
    assert_eq!(info.extents_free, info.extents_total);
    assert_eq!(info.capacity, info.extents_total * u64::from(ES));
    assert!(info.capacity <= SIZE);
    assert_eq!((info.used, info.quarantined_extents), (0, 0));
    assert_eq!(info.epoch_slots_used, 0);
    assert_eq!(disk.path(), path);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info(), info);
}

#[test]
fn format_refuses_existing_unless_forced() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 0, 0, &[7; 4096], 0).unwrap();
    drop(disk);
    assert!(matches!(
        Disk::format(&path, &opts(SIZE)),
        Err(Error::AlreadyFormatted)
    ));
    let forced = FormatOptions {
        force: true,
        disk_uuid: Uuid::from_u128(2),
        ..opts(SIZE)
    };
    let disk = Disk::format(&path, &forced).unwrap();
    assert_eq!(disk.uuid(), Uuid::from_u128(2));
    assert_eq!(disk.info().extents_used, 0);
    assert_eq!(read_all(&disk, V, 0), vec![0; ES as usize]);
}

#[test]
fn format_refuses_existing_unless_forced_v3() {
    v3(format_refuses_existing_unless_forced);
}

#[test]
fn format_rejects_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    let bad = FormatOptions {
        extent_size: 5000,
        ..opts(SIZE)
    };
    assert!(matches!(
        Disk::format(&path, &bad),
        Err(Error::InvalidExtentSize { extent_size: 5000 })
    ));
    assert!(matches!(
        Disk::format(&path, &opts(1 << 20)),
        Err(Error::TooSmall)
    ));
    let missing = FormatOptions {
        size: None,
        ..opts(SIZE)
    };
    let other = dir.path().join("missing");
    assert!(matches!(
        Disk::format(&other, &missing),
        Err(Error::Io { .. })
    ));
}

#[test]
fn open_non_tessera() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk");
    std::fs::write(&path, pattern(3, 3 << 20)).unwrap();
    assert!(matches!(Disk::open(&path), Err(Error::NotTessera)));
    std::fs::write(&path, b"tiny").unwrap();
    assert!(matches!(Disk::open(&path), Err(Error::NotTessera)));
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(Disk::open(&path), Err(Error::NotTessera)));
}

#[test]
fn damaged_primary_superblock_falls_back_to_backup() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 3, 0, &[9; 4096], 0).unwrap();
    drop(disk);
    flip(&path, 100);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(read_all(&disk, V, 3)[..4096], [9; 4096]);
    drop(disk);
    // The primary was repaired from the backup: losing the backup now is fine.
    flip(&path, 4096 + 100);
    Disk::open(&path).unwrap();
}

#[test]
fn both_superblocks_damaged() {
    let (_dir, path, disk) = new_disk();
    drop(disk);
    flip(&path, 100);
    flip(&path, 4096 + 200);
    assert!(matches!(
        Disk::open(&path),
        Err(Error::BadSuperblock(SuperblockError::Checksum))
    ));
}

#[test]
fn newer_format_version_is_refused() {
    let (_dir, path, disk) = new_disk();
    drop(disk);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 0).unwrap();
    put_u32(&mut b, 8, crate::FORMAT_VERSION + 1);
    seal(&mut b);
    f.write_all_at(&b, 0).unwrap();
    assert!(matches!(
        Disk::open(&path),
        Err(Error::UnsupportedVersion { found: 4 })
    ));
}

#[test]
fn second_open_is_locked() {
    let (_dir, path, disk) = new_disk();
    assert!(matches!(Disk::open(&path), Err(Error::Locked)));
    let forced = FormatOptions {
        force: true,
        ..opts(SIZE)
    };
    assert!(matches!(Disk::format(&path, &forced), Err(Error::Locked)));
    drop(disk);
    Disk::open(&path).unwrap();
}

#[test]
fn second_open_is_locked_v3() {
    v3(second_open_is_locked);
}

#[test]
fn write_read_many_offsets_and_sizes() {
    let (_dir, path, disk) = new_disk();
    let mut model = vec![0u8; ES as usize];
    let mut seed = 0;
    for &off in &[
        0u32,
        512,
        3584,
        4096,
        5120,
        8192 - 512,
        30720,
        ES - 4096,
        ES - 512,
    ] {
        for &len in &[512u32, 1024, 4096, 4608, 8192, 12800, 20480] {
            if off + len > ES {
                continue;
            }
            seed += 1;
            let data = pattern(seed, len as usize);
            disk.write(V, 7, off, &data, 0).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let mut back = vec![0u8; len as usize];
            disk.read(V, 7, off, &mut back).unwrap();
            assert_eq!(back, data, "off {off} len {len}");
            // A read straddling the written range sees the model too.
            let (lo, hi) = (off.saturating_sub(1024), (off + len + 1024).min(ES));
            let mut wide = vec![0u8; (hi - lo) as usize];
            disk.read(V, 7, lo, &mut wide).unwrap();
            assert_eq!(wide, model[lo as usize..hi as usize]);
        }
    }
    assert_eq!(read_all(&disk, V, 7), model);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(read_all(&disk, V, 7), model);
}

#[test]
fn write_read_many_offsets_and_sizes_v3() {
    v3(write_read_many_offsets_and_sizes);
}

#[test]
fn unwritten_reads_zeros() {
    let (_dir, _path, disk) = new_disk();
    assert_eq!(read_all(&disk, V, 0), vec![0; ES as usize]);
    disk.write(V, 1, 8192 + 512, &[0xab; 1024], 0).unwrap();
    let all = read_all(&disk, V, 1);
    assert!(all[..8192 + 512].iter().all(|&b| b == 0));
    assert!(all[8192 + 512..8192 + 1536].iter().all(|&b| b == 0xab));
    assert!(all[8192 + 1536..].iter().all(|&b| b == 0));
}

#[test]
fn unwritten_reads_zeros_v3() {
    v3(unwritten_reads_zeros);
}

#[test]
fn invalid_ranges() {
    let (_dir, _path, disk) = new_disk();
    let mut buf = vec![0u8; 1024];
    for (off, len) in [
        (100u32, 512usize),
        (0, 100),
        (ES - 512, 1024),
        (u32::MAX - 511, 1024),
    ] {
        assert!(matches!(
            disk.read(V, 0, off, &mut buf[..len]),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            disk.write(V, 0, off, &buf[..len], 0),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            disk.discard(V, 0, off, len as u32, 0),
            Err(Error::InvalidRange { .. })
        ));
    }
    assert_eq!(disk.info().extents_used, 0);
}

#[test]
fn invalid_ranges_v3() {
    v3(invalid_ranges);
}

/// A fence tells whether the vDisk's epoch was last raised during this
/// boot: after a machine restart (another boot tag) the answer is no, once,
/// and it survives the disk's reopening (the tag is in the slot).
#[test]
fn a_fence_tells_whether_the_machine_restarted_since_the_last_raise() {
    let (_dir, path, disk) = new_disk();
    let w = Uuid::from_u128(2);
    disk.set_boot(11);
    // Nothing raised yet: not known to be the same boot.
    assert_eq!(
        disk.fence_report(V, 1).unwrap(),
        Fenced {
            epoch: 1,
            same_boot: false,
            doubt: None,
        }
    );
    assert!(disk.fence_report(V, 2).unwrap().same_boot);
    // A raise by a write records the boot too.
    disk.write(w, 0, 0, &[1; 4096], 3).unwrap();
    assert!(disk.fence_report(w, 3).unwrap().same_boot);
    drop(disk);
    // The node restarts in the same boot (kill -9): the page cache was kept.
    let disk = Disk::open(&path).unwrap();
    disk.set_boot(11);
    assert!(disk.fence_report(V, 4).unwrap().same_boot);
    drop(disk);
    // The machine restarted: the first fence says so, the next does not.
    let disk = Disk::open(&path).unwrap();
    disk.set_boot(12);
    let f = disk.fence_report(V, 5).unwrap();
    assert_eq!(f.epoch, 5);
    assert!(!f.same_boot);
    assert!(disk.fence_report(V, 6).unwrap().same_boot);
    // A fence that raises nothing reports, and records, nothing new.
    assert!(!disk.fence_report(w, 3).unwrap().same_boot);
    // A disk that was never told its boot never claims the same boot.
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert!(!disk.fence_report(V, 7).unwrap().same_boot);
    assert!(!disk.fence_report(V, 8).unwrap().same_boot);
}

#[test]
fn a_fence_tells_whether_the_machine_restarted_since_the_last_raise_v3() {
    v3(a_fence_tells_whether_the_machine_restarted_since_the_last_raise);
}

#[test]
fn epochs_fence_writes() {
    let (_dir, path, disk) = new_disk();
    assert_eq!(disk.epoch(V), 0);
    disk.write(V, 0, 0, &[5; 4096], 5).unwrap();
    assert_eq!(disk.epoch(V), 5);
    let stale = disk.write(V, 0, 0, &[4; 4096], 4);
    assert!(matches!(
        stale,
        Err(Error::StaleEpoch {
            current: 5,
            got: 4,
            ..
        })
    ));
    assert!(matches!(
        disk.discard(V, 0, 0, ES, 4),
        Err(Error::StaleEpoch { .. })
    ));
    assert_eq!(read_all(&disk, V, 0)[..4096], [5; 4096]);
    assert_eq!(disk.fence(V, 7).unwrap(), 7);
    assert_eq!(disk.fence(V, 3).unwrap(), 7);
    assert!(matches!(
        disk.write(V, 0, 0, &[6; 4096], 6),
        Err(Error::StaleEpoch { current: 7, .. })
    ));
    disk.write(V, 0, 0, &[7; 512], 7).unwrap();
    assert_eq!(disk.info().epoch_slots_used, 1);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.epoch(V), 7);
    assert!(matches!(
        disk.write(V, 0, 0, &[6; 4096], 6),
        Err(Error::StaleEpoch { .. })
    ));
    assert_eq!(disk.vdisks(), vec![(V, 7, 1)]);
}

#[test]
fn epochs_fence_writes_v3() {
    v3(epochs_fence_writes);
}

#[test]
fn discard_whole_chunk_frees_extent() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 0, 0, &[1; 8192], 0).unwrap();
    disk.write(V, 1, 0, &[2; 8192], 0).unwrap();
    assert_eq!(disk.info().extents_used, 2);
    disk.discard(V, 0, 0, ES, 0).unwrap();
    assert_eq!(disk.info().extents_used, 1);
    assert_eq!(disk.info().used, u64::from(ES));
    let listed: Vec<u64> = disk.chunks(V).iter().map(|c| c.chunk).collect();
    assert_eq!(listed, vec![1]);
    assert_eq!(disk.extent_offset(V, 0), None);
    assert_eq!(read_all(&disk, V, 0), vec![0; ES as usize]);
    // Discarding an unallocated chunk is a no-op.
    disk.discard(V, 9, 0, ES, 0).unwrap();
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().extents_used, 1);
    assert_eq!(disk.chunks(V).len(), 1);
}

#[test]
fn partial_discard_reads_zeros() {
    let (_dir, path, disk) = new_disk();
    let data = pattern(1, ES as usize);
    disk.write(V, 0, 0, &data, 0).unwrap();
    let mut model = data;
    for (off, len) in [
        (512u32, 1024u32),
        (4096, 8192),
        (3584, 5120),
        (20480 + 512, 512),
        (ES - 4096, 4096),
    ] {
        disk.discard(V, 0, off, len, 0).unwrap();
        model[off as usize..(off + len) as usize].fill(0);
        assert_eq!(read_all(&disk, V, 0), model, "discard {off}+{len}");
    }
    assert_eq!(disk.info().extents_used, 1);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(read_all(&disk, V, 0), model);
}

#[test]
fn partial_discard_reads_zeros_v3() {
    v3(partial_discard_reads_zeros);
}

#[test]
fn corruption_is_detected_per_block() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 0, 0, &pattern(2, ES as usize), 0).unwrap();
    let off = disk.extent_offset(V, 0).unwrap();
    flip(&path, off + 2 * 4096 + 17);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        disk.read(V, 0, 8192, &mut buf),
        Err(Error::Checksum {
            chunk: 0,
            block: 2,
            ..
        })
    ));
    let mut all = vec![0u8; ES as usize];
    assert!(matches!(
        disk.read(V, 0, 0, &mut all),
        Err(Error::Checksum { block: 2, .. })
    ));
    disk.read(V, 0, 0, &mut buf).unwrap();
    disk.read(V, 0, 12288, &mut buf).unwrap();
    assert_eq!(buf, pattern(2, ES as usize)[12288..16384]);
    // A partial write into the damaged block refuses to merge with it...
    assert!(matches!(
        disk.write(V, 0, 8192, &[1; 512], 0),
        Err(Error::Checksum { block: 2, .. })
    ));
    // ...but a full-block write repairs it.
    disk.write(V, 0, 8192, &[1; 4096], 0).unwrap();
    disk.read(V, 0, 8192, &mut buf).unwrap();
    assert_eq!(buf, vec![1; 4096]);
}

#[test]
fn no_space_when_full() {
    let (_dir, _path, disk) = new_disk();
    let total = disk.info().extents_total;
    for c in 0..total {
        disk.write(V, c, 0, &[1; 512], 0).unwrap();
    }
    assert!(matches!(
        disk.write(V, total, 0, &[1; 512], 0),
        Err(Error::NoSpace)
    ));
    // Existing chunks stay writable; freeing one makes room again.
    disk.write(V, 0, 512, &[2; 512], 0).unwrap();
    disk.discard(V, 0, 0, ES, 0).unwrap();
    disk.write(V, total, 0, &[1; 512], 0).unwrap();
    assert_eq!(disk.info().extents_free, 0);
}

#[test]
fn delete_vdisk_frees_everything() {
    let (_dir, path, disk) = new_disk();
    let w = Uuid::from_u128(2);
    for c in 0..3 {
        disk.write(V, c, 0, &[3; 4096], 4).unwrap();
    }
    disk.write(w, 0, 0, &[4; 4096], 1).unwrap();
    assert_eq!(disk.vdisks(), vec![(V, 4, 3), (w, 1, 1)]);
    assert_eq!(disk.delete_vdisk(V).unwrap(), 3);
    assert_eq!(disk.vdisks(), vec![(w, 1, 1)]);
    assert_eq!(disk.epoch(V), 0);
    assert_eq!(disk.info().extents_used, 1);
    assert_eq!(disk.info().epoch_slots_used, 1);
    assert_eq!(read_all(&disk, V, 1), vec![0; ES as usize]);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.vdisks(), vec![(w, 1, 1)]);
    assert_eq!(disk.delete_vdisk(V).unwrap(), 0);
}

#[test]
fn delete_vdisk_frees_everything_v3() {
    v3(delete_vdisk_frees_everything);
}

#[test]
fn a_copy_freed_after_it_moved_reads_as_an_error_until_set_whole() {
    let (_dir, _path, disk) = new_disk();
    let w = Uuid::from_u128(2);
    for c in 0..3 {
        disk.write(V, c, 0, &[3; 4096], 4).unwrap();
    }
    disk.write(w, 0, 0, &[4; 4096], 1).unwrap();
    assert_eq!(disk.free_moved_copy(V).unwrap(), 3);
    assert_eq!(disk.vdisks(), vec![(w, 1, 1)], "freed, as a deletion");
    assert_eq!(disk.epoch(V), 0);
    // A writer still on the placement of before the move reads an error
    // (and fails over), never zeros: in chunks it had and chunks it did not.
    let mut buf = vec![0u8; 4096];
    for c in [0, 1, 5] {
        let e = disk.read(V, c, 0, &mut buf).unwrap_err();
        assert!(
            matches!(e, Error::OwnershipUnknown { chunk, .. } if chunk == c) && e.is_bad_copy(),
            "{e:?}"
        );
    }
    // Part of a chunk is refused; a whole chunk (a move back's resync) is
    // taken, and so is a whole discard.
    assert!(matches!(
        disk.write(V, 0, 0, &[5; 4096], 4),
        Err(Error::OwnershipUnknown { .. })
    ));
    assert!(matches!(
        disk.discard(V, 1, 0, 4096, 4),
        Err(Error::OwnershipUnknown { .. })
    ));
    disk.write(V, 0, 0, &vec![6; ES as usize], 5).unwrap();
    disk.discard(V, 1, 0, ES, 5).unwrap();
    assert_eq!(read_all(&disk, V, 0), vec![6; ES as usize]);
    assert_eq!(read_all(&disk, V, 1), vec![0; ES as usize]);
    disk.discard(V, 0, 0, ES, 5).unwrap();
    assert_eq!(read_all(&disk, V, 0), vec![0; ES as usize], "set whole");
    assert!(disk.read(V, 2, 0, &mut buf).is_err(), "still unknown");
    // Other vDisks are untouched; a deletion of the vDisk forgets it.
    assert_eq!(read_all(&disk, w, 0)[..4096], [4; 4096]);
    disk.delete_vdisk(V).unwrap();
    assert_eq!(read_all(&disk, V, 2), vec![0; ES as usize]);
}

#[test]
fn groups_freed_after_they_moved_read_as_an_error_until_set_whole_and_the_rest_stays() {
    let (_dir, _path, disk) = new_disk();
    let w = Uuid::from_u128(2);
    // 4 stripes; chunks 0..8 written: groups 1 and 3 move away.
    for c in 0..8 {
        disk.write(V, c, 0, &[c as u8 + 1; 4096], 4).unwrap();
    }
    disk.write(w, 1, 0, &[9; 4096], 1).unwrap();
    assert!(matches!(
        disk.free_moved_groups(V, 4, &[4]),
        Err(Error::InvalidGroups { stripes: 4 })
    ));
    assert!(matches!(
        disk.free_moved_groups(V, 0, &[]),
        Err(Error::InvalidGroups { stripes: 0 })
    ));
    assert_eq!(disk.free_moved_groups(V, 4, &[1, 3]).unwrap(), 4);
    assert_eq!(
        disk.free_moved_groups(V, 4, &[1, 3]).unwrap(),
        0,
        "idempotent"
    );
    assert_eq!(
        disk.epoch(V),
        4,
        "the disk keeps the vDisk (its other groups)"
    );
    let mut buf = vec![0u8; 4096];
    for c in [1, 3, 5, 7, 9, 11] {
        let e = disk.read(V, c, 0, &mut buf).unwrap_err();
        assert!(
            matches!(e, Error::OwnershipUnknown { chunk, .. } if chunk == c) && e.is_bad_copy(),
            "chunk {c} of a freed group: {e:?}"
        );
    }
    for c in [0, 2, 4, 6] {
        disk.read(V, c, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![c as u8 + 1; 4096], "chunk {c} of a kept group");
    }
    assert_eq!(
        read_all(&disk, V, 8),
        vec![0; ES as usize],
        "never written, kept group: zeros"
    );
    // The kept groups take writes as before; a freed group only whole chunks.
    disk.write(V, 2, 0, &[7; 4096], 4).unwrap();
    assert!(matches!(
        disk.write(V, 1, 0, &[5; 4096], 4),
        Err(Error::OwnershipUnknown { .. })
    ));
    disk.write(V, 1, 0, &vec![6; ES as usize], 5).unwrap();
    assert_eq!(read_all(&disk, V, 1), vec![6; ES as usize], "set whole");
    assert!(disk.read(V, 3, 0, &mut buf).is_err(), "still unknown");
    // Freeing group 1 again (its copy moved away once more) makes chunk 1
    // uncertain again.
    assert_eq!(disk.free_moved_groups(V, 4, &[1]).unwrap(), 1);
    assert!(disk.read(V, 1, 0, &mut buf).is_err(), "freed again");
    // Other vDisks are untouched.
    assert_eq!(read_all(&disk, w, 1)[..4096], [9; 4096]);
    // The whole copy moving away later covers every chunk.
    disk.free_moved_copy(V).unwrap();
    assert!(disk.read(V, 0, 0, &mut buf).is_err());
}

#[test]
fn groups_freed_after_they_moved_read_as_an_error_until_set_whole_and_the_rest_stays_v3() {
    v3(groups_freed_after_they_moved_read_as_an_error_until_set_whole_and_the_rest_stays);
}

#[test]
fn a_copy_freed_after_it_moved_reads_as_an_error_until_set_whole_v3() {
    v3(a_copy_freed_after_it_moved_reads_as_an_error_until_set_whole);
}

#[test]
fn chunks_listing_and_generations() {
    let (_dir, path, disk) = new_disk();
    for c in [5u64, 2, 9] {
        disk.write(V, c, 0, &[1; 512], 0).unwrap();
    }
    let chunks = disk.chunks(V);
    assert_eq!(
        chunks.iter().map(|c| c.chunk).collect::<Vec<_>>(),
        [2, 5, 9]
    );
    let gen_of = |c: u64| chunks.iter().find(|i| i.chunk == c).unwrap().generation;
    assert!(gen_of(5) < gen_of(2) && gen_of(2) < gen_of(9));
    let max = gen_of(9);
    // Generations keep increasing across frees and reopens.
    disk.discard(V, 9, 0, ES, 0).unwrap();
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    disk.write(V, 10, 0, &[1; 512], 0).unwrap();
    assert!(
        disk.chunks(V)
            .iter()
            .find(|c| c.chunk == 10)
            .unwrap()
            .generation
            > max
    );
    let e = disk.chunks(V)[0].extent;
    assert_eq!(
        disk.extent_offset(V, 2),
        Some(disk.sb.layout.extent_data_offset(e))
    );
}

#[test]
fn duplicate_claims_keep_the_newer_generation() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 0, 0, &[1; 4096], 0).unwrap();
    disk.write(V, 1, 0, &[2; 4096], 0).unwrap();
    let chunks = disk.chunks(V);
    let (old, new) = (chunks[0], chunks[1]);
    let layout = disk.sb.layout;
    drop(disk);
    // Make the newer extent claim chunk 0 as well (as after a lost free).
    let forged = ExtentRecord::Used {
        vdisk: V,
        chunk: 0,
        generation: new.generation,
        tagged: true,
    };
    for (copy, table) in layout.extent_tables().into_iter().enumerate() {
        poke(
            &path,
            layout.extent_record_offset(table, new.extent),
            &forged.encode(new.extent, copy as u8),
        );
    }
    let disk = Disk::open(&path).unwrap();
    let now = disk.chunks(V);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].extent, new.extent);
    assert!(now[0].generation > old.generation);
    // The winner's blocks carry the tag of chunk 1's allocation: under
    // chunk 0 they fail their checksums rather than read as chunk 1's data.
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        disk.read(V, 0, 0, &mut buf),
        Err(Error::Checksum { .. })
    ));
    assert_eq!(disk.info().extents_used, 1);
    drop(disk);
    // The loser was rewritten as free on disk.
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().extents_used, 1);
}

#[test]
fn a_damaged_copy_is_repaired_from_the_other() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 0, 0, &[1; 4096], 3).unwrap();
    let e = disk.chunks(V)[0].extent;
    let slot = disk.state().slot(V).unwrap();
    let l = disk.sb.layout;
    drop(disk);
    flip(&path, l.extent_record_offset(l.extent_table_offset, e) + 30);
    flip(
        &path,
        l.extent_record_offset(l.extent_mirror_offset, e + 5) + 3,
    );
    flip(&path, l.epoch_slot_offset(l.epoch_table_offset, slot) + 25);
    flip(&path, l.epoch_slot_offset(l.epoch_mirror_offset, 3) + 3);
    for _ in 0..2 {
        let disk = Disk::open(&path).unwrap();
        let info = disk.info();
        assert_eq!(info.quarantined_extents, 0);
        assert_eq!(info.quarantined_epoch_slots, 0);
        assert_eq!(info.epoch_loss_serial, 0);
        assert_eq!(info.extents_used, 1);
        assert_eq!(disk.epoch(V), 3);
        assert_eq!(read_all(&disk, V, 0)[..4096], [1; 4096]);
    }
    // Repaired on disk: the other copies can go now.
    flip(
        &path,
        l.extent_record_offset(l.extent_mirror_offset, e) + 30,
    );
    flip(&path, l.epoch_slot_offset(l.epoch_mirror_offset, slot) + 25);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().quarantined_extents, 0);
    assert_eq!(disk.epoch(V), 3);
    assert_eq!(read_all(&disk, V, 0)[..4096], [1; 4096]);
}

#[test]
fn a_record_damaged_in_both_copies_never_reads_as_zeros() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 0, 0, &pattern(5, ES as usize), 0).unwrap();
    disk.write(V, 1, 0, &[2; 4096], 0).unwrap();
    disk.discard(V, 1, 0, ES, 0).unwrap();
    let e = disk.chunks(V)[0].extent;
    let l = disk.sb.layout;
    drop(disk);
    for table in l.extent_tables() {
        flip(&path, l.extent_record_offset(table, e) + 30);
        // Extent e + 1 held chunk 1, since freed; e + 2 was never used.
        flip(&path, l.extent_record_offset(table, e + 1) + 30);
        flip(&path, l.extent_record_offset(table, e + 2) + 30);
    }
    let disk = Disk::open(&path).unwrap();
    let info = disk.info();
    assert_eq!(info.quarantined_extents, 2, "{info:?}");
    assert_eq!(info.suspect_chunks, 2);
    assert_eq!(info.ownerless_extents, 0);
    assert!(disk.chunks(V).is_empty());
    let mut buf = vec![0u8; 4096];
    for chunk in [0, 1] {
        assert!(matches!(
            disk.read(V, chunk, 0, &mut buf),
            Err(Error::OwnershipUnknown { chunk: c, .. }) if c == chunk
        ));
        assert!(matches!(
            disk.write(V, chunk, 0, &[3; 4096], 0),
            Err(Error::OwnershipUnknown { .. })
        ));
        assert!(matches!(
            disk.discard(V, chunk, 0, 4096, 0),
            Err(Error::OwnershipUnknown { .. })
        ));
    }
    // Other chunks are not affected.
    disk.read(V, 2, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0; 4096]);
    // The replicator's repair: a whole-chunk write, or a whole discard.
    disk.write(V, 0, 0, &pattern(5, ES as usize), 0).unwrap();
    disk.discard(V, 1, 0, ES, 0).unwrap();
    assert_eq!(read_all(&disk, V, 0), pattern(5, ES as usize));
    assert_eq!(read_all(&disk, V, 1), vec![0; ES as usize]);
    let info = disk.info();
    assert_eq!((info.quarantined_extents, info.suspect_chunks), (0, 0));
    assert_eq!(info.extents_used, 1);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    let info = disk.info();
    assert_eq!((info.quarantined_extents, info.extents_used), (0, 1));
    assert_eq!(read_all(&disk, V, 0), pattern(5, ES as usize));
}

#[test]
fn deleting_a_vdisk_frees_the_damaged_extents_that_name_it() {
    let (_dir, path, disk) = new_disk();
    disk.write(V, 0, 0, &[1; 4096], 0).unwrap();
    let e = disk.chunks(V)[0].extent;
    let l = disk.sb.layout;
    drop(disk);
    for table in l.extent_tables() {
        flip(&path, l.extent_record_offset(table, e) + 30);
    }
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().suspect_chunks, 1);
    disk.delete_vdisk(V).unwrap();
    let info = disk.info();
    assert_eq!((info.quarantined_extents, info.suspect_chunks), (0, 0));
    assert_eq!(info.extents_free, info.extents_total);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().extents_free, disk.info().extents_total);
}

#[test]
fn an_epoch_slot_damaged_in_both_copies_refuses_writes_until_fenced() {
    let (_dir, path, disk) = new_disk();
    let w = Uuid::from_u128(2);
    disk.write(V, 0, 0, &[1; 4096], 7).unwrap();
    disk.write(w, 0, 0, &[1; 4096], 2).unwrap();
    let slot = disk.state().slot(V).unwrap();
    let l = disk.sb.layout;
    drop(disk);
    for table in l.epoch_tables() {
        flip(&path, l.epoch_slot_offset(table, slot) + 25);
    }
    for round in 0..2 {
        let disk = Disk::open(&path).unwrap();
        let info = disk.info();
        assert_eq!(info.quarantined_epoch_slots, 1);
        assert_eq!(info.epoch_loss_serial, 1);
        // V's epoch is gone: no writer is admitted, however old or new.
        assert_eq!(disk.epoch(V), 0);
        for epoch in [0, 6, 7, 8] {
            assert!(matches!(
                disk.write(V, 0, 0, &[9; 4096], epoch),
                Err(Error::FenceUnknown { .. })
            ));
        }
        // W's slot is intact, but W might have had a second slot: the same.
        assert_eq!(disk.epoch(w), 2);
        if round == 0 {
            assert!(matches!(
                disk.write(w, 0, 0, &[9; 4096], 2),
                Err(Error::FenceUnknown { .. })
            ));
            assert!(matches!(
                disk.write(w, 0, 0, &[9; 4096], 1),
                Err(Error::StaleEpoch { .. })
            ));
            // A fence confirms W (at its epoch or above)...
            assert_eq!(disk.fence(w, 1).unwrap(), 2);
            assert_eq!(disk.fence(w, 2).unwrap(), 2);
        }
        disk.write(w, 0, 0, &[9; 4096], 2).unwrap();
        // ...and the data is all there.
        assert_eq!(read_all(&disk, V, 0)[..4096], [1; 4096]);
    }
    // The confirmation survives reopening; V needs its own fence.
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.fence(V, 8).unwrap(), 8);
    disk.write(V, 0, 0, &[9; 4096], 8).unwrap();
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.epoch(V), 8);
    disk.write(V, 0, 0, &[9; 4096], 8).unwrap();
    assert!(matches!(
        disk.write(V, 0, 0, &[9; 4096], 7),
        Err(Error::StaleEpoch { .. })
    ));
}

#[test]
fn concurrent_writers_and_readers() {
    let (_dir, _path, disk) = new_disk();
    let disk = Arc::new(disk);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    // Every thread writes its own 512-byte sectors of shared chunks.
                    let chunk = i % 3;
                    let off = (t as u32 * 8 + (i as u32 % 8)) * 512;
                    let data = pattern(t * 1000 + i, 512);
                    disk.write(V, chunk, off, &data, 1).unwrap();
                    let mut back = vec![0u8; 512];
                    disk.read(V, chunk, off, &mut back).unwrap();
                    assert_eq!(back, data);
                    let mut all = vec![0u8; ES as usize];
                    disk.read(V, chunk, 0, &mut all).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(disk.chunks(V).len(), 3);
    if disk.info().format_version == 2 {
        assert_eq!(disk.info().extents_used, 3);
    }
    disk.flush().unwrap();
}

#[test]
fn concurrent_writers_and_readers_v3() {
    v3(concurrent_writers_and_readers);
}

/// The crcs kept in memory follow every write: reads after an overwrite,
/// a partial-block write, a partial discard, and a free and reuse of the
/// extent all verify and return what was written.
///
/// Fails if a crc write does not reach the cached row (`CrcCache::update`
/// or the row kept at allocation left out): the read after the overwrite,
/// or after the reuse, fails its checksum.
#[test]
fn cached_crcs_follow_every_write() {
    let (_dir, _path, disk) = new_disk();
    let mut want = pattern(1, ES as usize);
    disk.write(V, 0, 0, &want, 0).unwrap();
    assert_eq!(read_all(&disk, V, 0), want);
    let b = pattern(2, 8192);
    disk.write(V, 0, 4096, &b, 0).unwrap();
    want[4096..12288].copy_from_slice(&b);
    assert_eq!(read_all(&disk, V, 0), want);
    let c = pattern(3, 512);
    disk.write(V, 0, 512, &c, 0).unwrap();
    want[512..1024].copy_from_slice(&c);
    assert_eq!(read_all(&disk, V, 0), want);
    disk.discard(V, 0, 16384, 8192, 0).unwrap();
    want[16384..24576].fill(0);
    assert_eq!(read_all(&disk, V, 0), want);
    // Every extent is taken and freed in turn: chunk 1 gets the one chunk
    // 0 had, whose crcs were cached.
    let total = disk.info().extents_total;
    for chunk in 1..total {
        disk.write(V, chunk, 0, &[1; 4096], 0).unwrap();
    }
    disk.discard(V, 0, 0, ES, 0).unwrap();
    let d = pattern(4, 4096);
    disk.write(V, total, 0, &d, 0).unwrap();
    let mut again = vec![0u8; ES as usize];
    again[..4096].copy_from_slice(&d);
    assert_eq!(read_all(&disk, V, total), again);
    assert_eq!(read_all(&disk, V, 0), vec![0u8; ES as usize]);
}

// ---- format v3: allocation at 4 KiB ---------------------------------------

fn new_thin_disk(size: u64) -> (TempDir, PathBuf, Disk) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let o = FormatOptions {
        thin: true,
        ..opts(size)
    };
    let disk = Disk::format(&path, &o).unwrap();
    (dir, path, disk)
}

/// A 4 KiB write takes 4 KiB, whatever the chunk size; zeros take
/// nothing; discarding frees what it covers; and all of it is read back
/// after a reopen.
#[test]
fn a_chunk_takes_only_the_blocks_written() {
    let (_dir, path, disk) = new_thin_disk(SIZE);
    assert_eq!(disk.info().format_version, 3);
    assert_eq!(disk.info().used, 0);
    disk.write(V, 3, 8192, &[7; 4096], 1).unwrap();
    assert_eq!(disk.info().used, 4096);
    assert_eq!(disk.usage(), vec![(V, 4096)]);
    // A sector inside a fresh block takes that block.
    disk.write(V, 3, 20480 + 512, &[8; 512], 1).unwrap();
    assert_eq!(disk.info().used, 8192);
    // Zeros into blocks that hold nothing take nothing.
    disk.write(V, 4, 0, &vec![0; ES as usize], 1).unwrap();
    assert_eq!(disk.info().used, 8192);
    assert_eq!(disk.vdisks(), vec![(V, 1, 1)]);
    let mut want = vec![0u8; ES as usize];
    want[8192..12288].fill(7);
    want[20480 + 512..20480 + 1024].fill(8);
    assert_eq!(read_all(&disk, V, 3), want);
    // A discard of whole blocks frees them.
    disk.discard(V, 3, 8192, 4096, 1).unwrap();
    want[8192..12288].fill(0);
    assert_eq!(disk.info().used, 4096);
    assert_eq!(read_all(&disk, V, 3), want);
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.info().used, 4096);
    assert_eq!(read_all(&disk, V, 3), want);
    assert_eq!(disk.epoch(V), 1);
}

/// Data written in order lies in order: one run per chunk.
#[test]
fn sequential_data_is_one_run_per_chunk() {
    let (_dir, _path, disk) = new_thin_disk(SIZE);
    for c in 0..4u64 {
        for b in 0..(ES / 4096) {
            disk.write(V, c, b * 4096, &pattern(c * 100 + u64::from(b), 4096), 0)
                .unwrap();
        }
    }
    let ix = disk.thin().index();
    for c in 0..4u64 {
        assert_eq!(ix.map.runs(&(V, c)).len(), 1, "chunk {c}");
    }
}

/// Random writes and discards of every size, many more than one log lap
/// (so checkpoints are taken), then a reopen: everything reads back.
#[test]
fn random_writes_and_discards_survive_reopen_across_checkpoints() {
    let (_dir, path, disk) = new_thin_disk(8 << 20);
    let chunks = 24u64;
    let mut model = vec![vec![0u8; ES as usize]; chunks as usize];
    let mut x = 0x1234_5678_u64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..6000u64 {
        let c = next(chunks);
        let off = next(u64::from(ES / 512)) as u32 * 512;
        let len = ((next(24) + 1) as u32 * 512).min(ES - off);
        if next(4) == 0 {
            disk.discard(V, c, off, len, 0).unwrap();
            model[c as usize][off as usize..(off + len) as usize].fill(0);
        } else {
            let data = pattern(i, len as usize);
            disk.write(V, c, off, &data, 0).unwrap();
            model[c as usize][off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if i % 1000 == 999 {
            disk.flush().unwrap();
        }
    }
    let used = disk.info().used;
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    for c in 0..chunks {
        assert_eq!(read_all(&disk, V, c), model[c as usize], "chunk {c}");
    }
    assert_eq!(disk.info().used, used);
    // And once more, from the checkpoint written at open.
    drop(disk);
    let disk = Disk::open(&path).unwrap();
    for c in 0..chunks {
        assert_eq!(read_all(&disk, V, c), model[c as usize], "chunk {c}");
    }
}

/// A full disk refuses the write that needs a block it does not have,
/// writing nothing; blocks already held stay writable, and a freed block
/// can be taken again.
#[test]
fn a_full_thin_disk_refuses_only_writes_that_need_space() {
    let (_dir, _path, disk) = new_thin_disk(SIZE);
    let total = disk.info().capacity / 4096;
    let bpc = u64::from(ES / 4096);
    for b in 0..total {
        disk.write(V, b / bpc, (b % bpc) as u32 * 4096, &[1; 4096], 0)
            .unwrap();
    }
    assert_eq!(disk.info().used, disk.info().capacity);
    let next = (total / bpc, (total % bpc) as u32 * 4096);
    assert!(matches!(
        disk.write(V, next.0 + 1, 0, &[2; 8192], 0),
        Err(Error::NoSpace)
    ));
    let mut buf = vec![0u8; 8192];
    disk.read(V, next.0 + 1, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0; 8192], "a refused write wrote nothing");
    disk.write(V, 0, 0, &[3; 4096], 0).unwrap();
    disk.discard(V, 0, 4096, 4096, 0).unwrap();
    disk.write(V, next.0 + 1, 0, &[2; 4096], 0).unwrap();
    disk.read(V, next.0 + 1, 0, &mut buf[..4096]).unwrap();
    assert_eq!(buf[..4096], [2; 4096]);
}

/// A flipped bit in a block's data is that block's checksum error; a
/// block of another chunk placed where one was freed never reads as the
/// freed chunk's (owner tags).
#[test]
fn thin_corruption_is_detected_per_block() {
    let (_dir, path, disk) = new_thin_disk(SIZE);
    disk.write(V, 0, 0, &pattern(2, ES as usize), 0).unwrap();
    let (p, _) = disk.thin_lookup(&(V, 0), 2, 1)[0].unwrap();
    flip(&path, disk.sb.layout.block_data_offset(p) + 17);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        disk.read(V, 0, 8192, &mut buf),
        Err(Error::Checksum {
            chunk: 0,
            block: 2,
            ..
        })
    ));
    disk.read(V, 0, 12288, &mut buf).unwrap();
    assert_eq!(buf, pattern(2, ES as usize)[12288..16384]);
    disk.write(V, 0, 8192, &[1; 4096], 0).unwrap();
    disk.read(V, 0, 8192, &mut buf).unwrap();
    assert_eq!(buf, vec![1; 4096]);
    // The tag names the block's place: block 3's content copied over
    // block 2's place fails block 2's checksum.
    let (p3, _) = disk.thin_lookup(&(V, 0), 3, 1)[0].unwrap();
    let (p2, _) = disk.thin_lookup(&(V, 0), 2, 1)[0].unwrap();
    let l = disk.sb.layout;
    // The crcs reach the table at a flush (before, the crc journal holds them).
    disk.flush().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let (mut data, mut crc) = (vec![0u8; 4096], [0u8; 4]);
    f.read_exact_at(&mut data, l.block_data_offset(p3)).unwrap();
    f.read_exact_at(&mut crc, l.block_crc_offset(p3)).unwrap();
    f.write_all_at(&data, l.block_data_offset(p2)).unwrap();
    f.write_all_at(&crc, l.block_crc_offset(p2)).unwrap();
    assert!(matches!(
        disk.read(V, 0, 8192, &mut buf),
        Err(Error::Checksum { block: 2, .. })
    ));
}

/// One copy of a log page damaged costs nothing (the other copy is read);
/// both copies damaged, or both checkpoint areas, and the blocks the map
/// no longer names read as errors — never as zeros — until their chunk is
/// written whole.
#[test]
fn damaged_block_map_metadata_never_reads_as_zeros() {
    let (_dir, path, disk) = new_thin_disk(SIZE);
    let t = disk.thin().regions;
    // The open at format took a checkpoint: the log starts at its page.
    let (pos, _) = disk.thin().index_position();
    disk.write(V, 0, 0, &[5; 4096], 0).unwrap();
    disk.write(V, 1, 0, &[6; 4096], 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    // One copy: nothing lost.
    flip(&path, t.log_offset + pos * 4096 + 100);
    let disk = Disk::open(&path).unwrap();
    assert_eq!(read_all(&disk, V, 0)[..4096], [5; 4096]);
    assert_eq!(read_all(&disk, V, 1)[..4096], [6; 4096]);
    drop(disk);
    // Both checkpoint areas: what the map named is unknown.
    for area in t.checkpoint_offsets {
        flip(&path, area + 100);
    }
    let disk = Disk::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        disk.read(V, 0, 0, &mut buf),
        Err(Error::OwnershipUnknown { chunk: 0, .. })
    ));
    assert!(matches!(
        disk.write(V, 0, 0, &[1; 4096], 0),
        Err(Error::OwnershipUnknown { .. })
    ));
    disk.write(V, 0, 0, &vec![9; ES as usize], 0).unwrap();
    assert_eq!(read_all(&disk, V, 0), vec![9; ES as usize]);
    assert!(disk.read(V, 1, 0, &mut buf).is_err());
}

/// Both copies of the newest flushed log page damaged, with no later page
/// to say it was flushed: the crc journal's header, written after every
/// fdatasync, says so, and the chunk whose allocation it held reads as an
/// error, never as zeros. Fails without the header's durable mark: chunk 1
/// then reads as zeros (campaign finding on format 3).
#[test]
fn both_copies_of_the_newest_flushed_log_page_damaged_never_read_as_zeros() {
    let (_dir, path, disk) = new_thin_disk(SIZE);
    let t = disk.thin().regions;
    disk.write(V, 0, 0, &[5; 4096], 0).unwrap();
    disk.flush().unwrap();
    let (pos, _) = disk.thin().index_position();
    disk.write(V, 1, 0, &[6; 4096], 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    for ring in t.logs() {
        flip(&path, ring + pos * 4096 + 100);
    }
    let disk = Disk::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        matches!(
            disk.read(V, 1, 0, &mut buf),
            Err(Error::OwnershipUnknown { .. })
        ),
        "chunk 1 reads {:?}",
        disk.read(V, 1, 0, &mut buf).map(|()| buf[0])
    );
    // No false alarm: a clean reopen trusts the map.
    disk.write(V, 1, 0, &vec![7; ES as usize], 0).unwrap();
    disk.write(V, 0, 0, &vec![8; ES as usize], 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    drop(Disk::open(&path).unwrap());
    let disk = Disk::open(&path).unwrap();
    assert_eq!(read_all(&disk, V, 1), vec![7; ES as usize]);
    assert!(disk.read(V, 2, 0, &mut buf).is_err(), "still lost");
}

/// A block map not read back whole stays untrusted across restarts: the
/// checkpoints written after the loss say so (and name the chunks written
/// whole since), so a later open never takes the partial map for the
/// whole one and reads a chunk it lost as zeros (campaign seed 965664544
/// on format 3). Fails if the checkpoint written at the lossy open is
/// trusted by the next one: chunk 1 then reads as zeros.
#[test]
fn a_lost_block_map_stays_untrusted_across_restarts() {
    let (_dir, path, disk) = new_thin_disk(SIZE);
    let t = disk.thin().regions;
    disk.write(V, 0, 0, &[5; 4096], 0).unwrap();
    disk.write(V, 1, 0, &[6; 4096], 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    for area in t.checkpoint_offsets {
        flip(&path, area + 100);
    }
    let untrusted = |disk: &Disk, chunk: u64| {
        let mut buf = vec![0u8; 4096];
        matches!(
            disk.read(V, chunk, 0, &mut buf),
            Err(Error::OwnershipUnknown { .. })
        )
    };
    let disk = Disk::open(&path).unwrap();
    assert!(untrusted(&disk, 0) && untrusted(&disk, 1));
    disk.write(V, 0, 0, &vec![9; ES as usize], 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    for round in 0..3 {
        let disk = Disk::open(&path).unwrap();
        assert!(untrusted(&disk, 1), "round {round}: chunk 1 trusted again");
        assert_eq!(read_all(&disk, V, 0), vec![9; ES as usize], "round {round}");
        go_round_the_log(&disk, 0);
    }
}

/// Enough writes and discards of chunks 2..10 of `V` (at `epoch`) to go
/// round the metadata log, so checkpoints are taken; then a flush.
fn go_round_the_log(disk: &Disk, epoch: u64) {
    for i in 0..400u32 {
        let chunk = 2 + u64::from(i % 8);
        disk.write(V, chunk, 0, &vec![i as u8 | 1; ES as usize], epoch)
            .unwrap();
        disk.discard(V, chunk, 0, ES, epoch).unwrap();
    }
    disk.flush().unwrap();
}

/// A disk whose block map was lost says so at every fence of a vDisk
/// (with a token naming this open), until the vDisk's writer vouches that
/// it rebuilt the whole copy: then its chunks are trusted — the ones it
/// did not write read as zeros — and that outlives a restart. A vouch
/// quoting another open's token, or from an older writer, changes nothing.
///
/// Fails if the fence does not report the doubt (the writer would leave
/// the copy current with chunks it cannot read), or if a vouch is not kept
/// across the restart (every new writer would rebuild the copy again).
#[test]
fn a_vouched_vdisk_is_trusted_again_across_restarts_v3() {
    const W: Uuid = Uuid::from_u128(0xabc);
    let (_dir, path, disk) = new_thin_disk(SIZE);
    let t = disk.thin().regions;
    assert_eq!(disk.fence_report(V, 1).unwrap().doubt, None);
    disk.write(V, 0, 0, &[5; 4096], 1).unwrap();
    disk.write(V, 1, 0, &[6; 4096], 1).unwrap();
    disk.write(W, 0, 0, &[7; 4096], 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    for area in t.checkpoint_offsets {
        flip(&path, area + 100);
    }
    let untrusted = |disk: &Disk, vdisk: Uuid, chunk: u64| {
        let mut buf = vec![0u8; 4096];
        matches!(
            disk.read(vdisk, chunk, 0, &mut buf),
            Err(Error::OwnershipUnknown { .. })
        )
    };
    let disk = Disk::open(&path).unwrap();
    let doubt = disk.fence_report(V, 2).unwrap().doubt.expect("a doubt");
    assert!(doubt.whole && doubt.token != 0);
    assert!(untrusted(&disk, V, 0) && untrusted(&disk, V, 1));
    // The writer rebuilds its copy: chunk 0 holds data, chunk 1 zeros.
    disk.write(V, 0, 0, &vec![9; ES as usize], 2).unwrap();
    disk.discard(V, 1, 0, ES, 2).unwrap();
    // Refused: another open's token; an older writer.
    assert!(!disk.vouch(V, 2, doubt.token ^ 1).unwrap());
    assert!(matches!(
        disk.vouch(V, 1, doubt.token),
        Err(Error::StaleEpoch { .. })
    ));
    assert!(untrusted(&disk, V, 5));
    assert!(disk.vouch(V, 2, doubt.token).unwrap());
    assert_eq!(disk.fence_report(V, 2).unwrap().doubt, None);
    let check = |disk: &Disk, round: &str| {
        assert_eq!(read_all(disk, V, 0), vec![9; ES as usize], "{round}");
        assert_eq!(read_all(disk, V, 1), vec![0; ES as usize], "{round}");
        assert_eq!(read_all(disk, V, 5), vec![0; ES as usize], "{round}");
        // Another vDisk of the disk is still in doubt.
        assert!(untrusted(disk, W, 0), "{round}");
        assert!(
            disk.fence_report(W, 1)
                .unwrap()
                .doubt
                .is_some_and(|d| d.whole),
            "{round}"
        );
        assert_eq!(disk.fence_report(V, 2).unwrap().doubt, None, "{round}");
    };
    check(&disk, "before the restart");
    disk.flush().unwrap();
    drop(disk);
    for round in 0..3 {
        let disk = Disk::open(&path).unwrap();
        check(&disk, &format!("round {round}"));
        go_round_the_log(&disk, 2);
    }
}

/// A flushed log page lost in both copies may have held a free (or a move)
/// of a block the map still names at its old place: with the map not read
/// back whole, no block of a chunk not set whole since reads — named or
/// not — so the old content never comes back (power-loss bit-flip case
/// 12197457103313 on format 3).
///
/// Fails if only the blocks the map does not name read as errors: block 0
/// of chunk 0 then reads as its content from before the discard.
#[test]
fn a_lost_flushed_free_never_brings_back_the_old_content() {
    let (_dir, path, disk) = new_thin_disk(SIZE);
    let t = disk.thin().regions;
    disk.write(V, 0, 0, &[5; 4096], 0).unwrap();
    disk.flush().unwrap();
    let (pos, _) = disk.thin().index_position();
    disk.discard(V, 0, 0, 4096, 0).unwrap();
    disk.flush().unwrap();
    // A later page, written once the discard's page was durable.
    disk.write(V, 1, 0, &[6; 4096], 0).unwrap();
    disk.flush().unwrap();
    assert_eq!(read_all(&disk, V, 0), vec![0; ES as usize]);
    drop(disk);
    for ring in t.logs() {
        flip(&path, ring + pos * 4096 + 100);
    }
    let disk = Disk::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    for chunk in [0, 1] {
        assert!(
            matches!(
                disk.read(V, chunk, 0, &mut buf),
                Err(Error::OwnershipUnknown { .. })
            ),
            "chunk {chunk}"
        );
    }
    disk.write(V, 0, 0, &vec![7; ES as usize], 0).unwrap();
    assert_eq!(read_all(&disk, V, 0), vec![7; ES as usize]);
}

/// A map of more runs than one batch of checkpoint pages holds (a
/// checkpoint written in several writes) survives reopens: every block
/// written reads back, every other block reads as zeros.
#[test]
fn a_checkpoint_of_many_batches_survives_reopens() {
    let (_dir, path, disk) = new_thin_disk(256 << 20);
    let blocks = ES / 4096;
    let chunks = 600u64;
    // Every other block: one run per write.
    for c in 0..chunks {
        for b in (0..blocks).step_by(2) {
            disk.write(V, c, b * 4096, &pattern(c * 64 + u64::from(b), 4096), 1)
                .unwrap();
        }
    }
    let runs = disk.thin().index().map.all_runs().count();
    assert!(
        crate::ckpt::pages_for(runs) > super::thin::CHECKPOINT_BATCH_PAGES,
        "{runs} runs fit one batch of checkpoint pages"
    );
    drop(disk);
    for _ in 0..2 {
        let disk = Disk::open(&path).unwrap();
        assert!(
            !disk.state().index_lost(),
            "the open found no whole checkpoint"
        );
        for c in 0..chunks {
            let got = read_all(&disk, V, c);
            for b in 0..blocks {
                let at = (b * 4096) as usize;
                let want = if b % 2 == 0 {
                    pattern(c * 64 + u64::from(b), 4096)
                } else {
                    vec![0; 4096]
                };
                assert!(got[at..at + 4096] == want[..], "chunk {c} block {b}");
            }
        }
    }
}
