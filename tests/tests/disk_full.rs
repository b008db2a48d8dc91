//! A full datastore on real storage node processes (format 3: space taken
//! 4 KiB at a time): a write that needs space a copy lacks fails with
//! `VolumeError::NoSpace` on every copy — the copies that took it are
//! rolled back — and nothing else is taken away: old data reads back,
//! overwrites, zeros, discards and flushes go on, no copy goes stale, the
//! vDisk opens again (also after a writer crash), and writes succeed again
//! once space is freed.

use std::time::{Duration, Instant};

use tessera_replicator::{Volume, VolumeError};
use tessera_tests::{pattern, TestZone};
use tessera_zone::records::Disk;
use tessera_zone::service::{CreateDatastore, Health};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// Writes distinct non-zero data to `vol` from `*cursor` on, 1 MiB at a
/// time, then 64 KiB, then 4 KiB, each size until a write fails for lack
/// of space: afterwards a copy's disk has no free 4 KiB block left. Any
/// other error fails the test. Returns the bytes written.
async fn fill(vol: &Volume, cursor: &mut u64, seed: u64) -> u64 {
    let mut written = 0;
    for size in [MIB, 64 * KIB, 4 * KIB] {
        loop {
            assert!(
                *cursor + size <= vol.size(),
                "the filler vDisk ran out of range before the disks filled (wrote {written} bytes)"
            );
            let data = pattern(seed, *cursor, size as usize);
            match vol.write(*cursor, &data).await {
                Ok(()) => {
                    *cursor += size;
                    written += size;
                }
                Err(VolumeError::NoSpace { .. }) => break,
                Err(e) => panic!(
                    "a write to a filling disk must fail only for lack of space (NoSpace), got: {e}"
                ),
            }
        }
    }
    written
}

/// The vDisk and each of its copies hold `want` at `offset`.
async fn assert_every_copy(vol: &Volume, offset: u64, want: &[u8], what: &str) {
    let mut buf = vec![0u8; want.len()];
    vol.read(offset, &mut buf)
        .await
        .unwrap_or_else(|e| panic!("{what}: reads keep working on a full datastore, got: {e}"));
    assert!(buf == want, "{what}: the vDisk reads back what it holds");
    for copy in 0..vol.copies() {
        vol.read_copy(offset, &mut buf, copy)
            .await
            .unwrap_or_else(|e| panic!("{what}: copy {copy} is readable, got: {e}"));
        assert!(
            buf == want,
            "{what}: copy {copy} holds the same data as the vDisk (copies never differ)"
        );
    }
}

/// The zone lists no stale copy of `ds/name` and calls it healthy.
async fn assert_zone_healthy(zone: &TestZone, ds: &str, name: &str, when: &str) {
    let v = zone.api.vdisk(ds, name).await.expect("vdisk view");
    assert!(
        v.vdisk.stale.is_empty(),
        "{when}: a full disk takes no copy away (no copy goes stale for lack of space), the zone lists stale {:?}",
        v.vdisk.stale
    );
    assert!(
        v.repair.is_empty(),
        "{when}: nothing to resync after a full disk, the zone lists {:?}",
        v.repair
    );
    assert_eq!(
        v.health,
        Health::Healthy,
        "{when}: the vDisk keeps its full redundancy on a full datastore"
    );
}

fn used(disks: &[Disk], disk: uuid::Uuid) -> u64 {
    disks
        .iter()
        .find(|d| d.uuid == disk)
        .map(|d| d.used)
        .expect("disk known")
}

fn usage(disks: &[Disk]) -> Vec<String> {
    disks
        .iter()
        .map(|d| format!("{}: {}/{}", d.uuid, d.used, d.capacity))
        .collect()
}

/// Three nodes with 64 MiB disks `full`, `other` and `roomy`. vDisk b
/// (datastore "filler", mirrors=2 on `full` and `other`) fills both. vDisk
/// a (datastore "ds", mirrors=2 on `full` and `roomy`) then has one copy
/// on a full disk and one on a disk with room: a write into new space is
/// taken by `roomy`, refused by `full`, fails, and is rolled back on
/// `roomy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_only_writes_that_need_space_and_takes_no_copy_away() {
    let t0 = Instant::now();
    let zone = TestZone::start_formatted(3, 64 * MIB, 3).await;
    let full = zone.disk_of_node(0).await;
    let other = zone.disk_of_node(1).await;
    let roomy = zone.disk_of_node(2).await;
    for (name, disks) in [("filler", vec![full, other]), ("ds", vec![full, roomy])] {
        zone.api
            .create_datastore(&CreateDatastore {
                name: name.into(),
                mirrors: 2,
                stripes: None,
                disks: Some(disks),
            })
            .await
            .expect("create datastore");
    }
    let size = 256 * MIB; // thin: far more than a disk holds
    let zeros = vec![0u8; MIB as usize];
    let a_rec = zone.vdisk("ds", "a", size).await;
    let b_rec = zone.vdisk("filler", "b", size).await;
    let chunk_size = a_rec.placement.chunk_size;
    let mut a_disks = a_rec.placement.groups[0].clone();
    a_disks.sort();
    let mut want = vec![full, roomy];
    want.sort();
    assert_eq!(
        a_disks, want,
        "vDisk a has its copies on `full` and `roomy`"
    );
    let mut b_disks = b_rec.placement.groups[0].clone();
    b_disks.sort();
    let mut want = vec![full, other];
    want.sort();
    assert_eq!(
        b_disks, want,
        "vDisk b has its copies on `full` and `other`"
    );

    // A: 4 MiB of data, flushed.
    let a = zone.open("ds", "a").await;
    let mut model = pattern(1, 0, (4 * MIB) as usize);
    a.write(0, &model)
        .await
        .expect("write to an empty datastore");
    a.flush().await.expect("flush");

    // B fills `full` and `other`.
    let b = zone.open("filler", "b").await;
    let mut b_cursor = 0;
    let filled = fill(&b, &mut b_cursor, 2).await;
    eprintln!(
        "filled {} MiB of vDisk b in {:.1} s",
        filled / MIB,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        filled >= 32 * MIB,
        "the 64 MiB disks took at least 32 MiB of vDisk b before they filled (took {filled} bytes)"
    );
    // B's failed write left nothing behind on any copy.
    assert_every_copy(
        &b,
        b_cursor,
        &zeros[..(4 * KIB) as usize],
        "the range of b's write that failed for lack of space",
    )
    .await;
    assert!(
        b.all_current(),
        "the filling writer keeps every copy current"
    );
    assert_zone_healthy(&zone, "filler", "b", "after filling b").await;

    // On A, a write into never-written space needs space: `roomy` takes
    // it, `full` refuses it; it fails with NoSpace naming `full`, and
    // `roomy` is rolled back to what `full` holds there (nothing).
    let new_space = 128 * MIB;
    let new_data = pattern(3, new_space, MIB as usize);
    match a.write(new_space, &new_data).await {
        Err(VolumeError::NoSpace { disk, chunk }) => {
            assert_eq!(
                disk, full,
                "the NoSpace error names the disk that has no space"
            );
            assert_eq!(
                chunk,
                new_space / chunk_size,
                "the NoSpace error names the chunk written"
            );
        }
        Ok(()) => panic!("a write into new space with a copy on a full disk cannot succeed"),
        Err(e) => {
            panic!("a write into new space with a copy on a full disk fails with NoSpace, got: {e}")
        }
    }
    assert_every_copy(
        &a,
        new_space,
        &zeros,
        "the range of a's write that failed for lack of space (the copy that took it is rolled back)",
    )
    .await;
    // The rollback gave the space back: `roomy` holds a's 4 MiB, nothing
    // more (as reported by the node's heartbeats, every 200 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let disks = zone.api.disks().await.expect("disks");
    eprintln!(
        "after a's failed write: disks (used/capacity): {:?}",
        usage(&disks)
    );
    assert_eq!(
        used(&disks, roomy),
        4 * MIB,
        "a write that failed for lack of space takes no space on the copy that was rolled back"
    );

    // Everything that needs no space goes on.
    assert_every_copy(&a, 0, &model, "a's data written before the disks filled").await;
    // Overwrites of blocks a holds: a whole chunk, and one sector.
    let over = pattern(4, MIB, MIB as usize);
    a.write(MIB, &over).await.expect(
        "an overwrite of blocks the vDisk holds needs no space: it succeeds on a full disk",
    );
    model[MIB as usize..2 * MIB as usize].copy_from_slice(&over);
    let sector = pattern(5, 3 * MIB + 512, 512);
    a.write(3 * MIB + 512, &sector)
        .await
        .expect("a one-sector overwrite of a held block succeeds on a full disk");
    model[(3 * MIB + 512) as usize..(3 * MIB + 1024) as usize].copy_from_slice(&sector);
    // Zeros take no space, in held blocks and in new space alike.
    a.write_zeroes(2 * MIB, 256 * KIB)
        .await
        .expect("write-zeroes over held blocks succeeds on a full disk");
    model[(2 * MIB) as usize..(2 * MIB + 256 * KIB) as usize].fill(0);
    a.write_zeroes(200 * MIB, MIB)
        .await
        .expect("write-zeroes into new space takes no space: it succeeds on a full disk");
    a.flush().await.expect("a flush succeeds on a full disk");
    assert_every_copy(
        &a,
        0,
        &model,
        "a after overwrites and write-zeroes on a full disk",
    )
    .await;
    assert_every_copy(&a, 200 * MIB, &zeros, "a's zeroed new space").await;
    assert!(
        a.all_current(),
        "no copy of a failed for lack of space (the writer's view)"
    );
    assert_zone_healthy(&zone, "ds", "a", "after a's writes on a full disk").await;

    // A discard succeeds and gives its space back: a can write as much
    // into new space again (after which `full` is full once more).
    a.discard(3 * MIB, MIB)
        .await
        .expect("a discard succeeds on a full disk");
    model[(3 * MIB) as usize..(4 * MIB) as usize].fill(0);
    a.flush().await.expect("a flush after the discard");
    let freed_space = 160 * MIB;
    let freed_data = pattern(7, freed_space, MIB as usize);
    a.write(freed_space, &freed_data).await.expect(
        "a discard on a full disk gives its space back: a write of as much into new space succeeds",
    );
    assert_every_copy(
        &a,
        freed_space,
        &freed_data,
        "a's write into the space its discard freed",
    )
    .await;
    assert!(
        matches!(
            a.write(new_space, &new_data).await,
            Err(VolumeError::NoSpace { .. })
        ),
        "once that space is taken again, a write into new space fails with NoSpace again"
    );
    assert_every_copy(&a, 0, &model, "a after its discard on a full disk").await;
    assert_every_copy(&a, new_space, &zeros, "a's new space whose writes failed").await;
    assert!(a.all_current(), "every copy of a stays current");
    assert!(b.all_current(), "every copy of b stays current");
    assert_zone_healthy(&zone, "ds", "a", "after the discard").await;
    assert_zone_healthy(&zone, "filler", "b", "after a's discard").await;

    // A clean close, and a new writer: the open succeeds on a full disk.
    a.close()
        .await
        .expect("closing a vDisk on a full disk succeeds (its final flush needs no space)");
    let a = Volume::open(zone.volume_config("ds", "a"))
        .await
        .unwrap_or_else(|e| panic!("a vDisk on a full disk opens again after a clean close: {e}"));
    assert!(a.all_current(), "the new writer finds every copy current");
    assert_every_copy(&a, 0, &model, "a after a clean reopen on a full disk").await;
    assert_every_copy(
        &a,
        freed_space,
        &freed_data,
        "a's later write, after the reopen",
    )
    .await;
    assert!(
        matches!(
            a.write(new_space, &new_data).await,
            Err(VolumeError::NoSpace { .. })
        ),
        "the new writer's write into new space fails with NoSpace too"
    );
    assert_zone_healthy(&zone, "ds", "a", "after the clean reopen").await;

    // The writer crashes right after writes (an overwrite, and a write that
    // failed for lack of space): its activity log stays in the zone, and
    // the next open (a take-over) reconciles those extents on a full disk.
    let over = pattern(6, 0, MIB as usize);
    a.write(0, &over)
        .await
        .expect("an overwrite on a full disk succeeds");
    model[..MIB as usize].copy_from_slice(&over);
    assert!(
        matches!(
            a.write(new_space, &new_data).await,
            Err(VolumeError::NoSpace { .. })
        ),
        "a write into new space fails with NoSpace"
    );
    drop(a); // no close: the lease and the activity log stay
    let left = zone.api.vdisk("ds", "a").await.expect("vdisk view");
    assert!(
        left.vdisk.activity.is_empty(),
        "the crashed writer's activity log is on its nodes, not in the zone"
    );
    let mut cfg = zone.volume_config("ds", "a");
    cfg.force = true;
    let a = Volume::open(cfg).await.unwrap_or_else(|e| {
        panic!("after a writer crash, an open reconciles onto a full disk and succeeds: {e}")
    });
    eprintln!(
        "the take-over after the crash reconciled {} chunk(s)",
        a.reconciled_chunks()
    );
    assert!(
        a.all_current(),
        "the take-over finds every copy current on a full disk"
    );
    assert_every_copy(&a, 0, &model, "a after a take-over on a full disk").await;
    assert_every_copy(
        &a,
        freed_space,
        &freed_data,
        "a's later write, after the take-over",
    )
    .await;
    assert_every_copy(
        &a,
        new_space,
        &zeros,
        "the new space whose writes failed, after the take-over",
    )
    .await;
    let after = zone.api.vdisk("ds", "a").await.expect("vdisk view");
    assert!(
        after.vdisk.activity.is_empty(),
        "the take-over reconciled and cleared the activity log: {:?}",
        after.vdisk.activity
    );
    assert_zone_healthy(&zone, "ds", "a", "after the take-over").await;

    // Space freed: b deleted (nodes free it at their next heartbeat).
    b.close().await.expect("closing b");
    zone.api
        .delete_vdisk("filler", "b", false)
        .await
        .expect("delete vDisk b");
    let start = Instant::now();
    loop {
        let disks = zone.api.disks().await.expect("disks");
        if disks.iter().all(|d| d.used < d.capacity / 2) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "a deleted vDisk's space is freed by the nodes within seconds: {:?}",
            usage(&disks)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.write(new_space, &new_data)
        .await
        .expect("once space is freed, a write into new space succeeds");
    a.flush().await.expect("flush after space was freed");
    assert_every_copy(&a, new_space, &new_data, "a's write into freed space").await;
    assert_every_copy(&a, 0, &model, "a's older data, after space was freed").await;
    assert!(
        a.all_current(),
        "every copy of a is current after space was freed"
    );
    assert_zone_healthy(&zone, "ds", "a", "after space was freed").await;
    a.close().await.expect("close");
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

/// Two nodes with 64 MiB disks hold vDisk a (mirrors=2, 4 stripes) until
/// both are full: writes into new space fail with NoSpace. A third node's
/// disk joins the datastore: the full disks shed copies onto it (one at a
/// time each, never filling it past 80 %), and writes into new space
/// succeed again while the writer keeps running, with nothing written
/// before lost and every copy current in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_added_to_a_full_datastore_lets_writes_resume() {
    let t0 = Instant::now();
    let mut zone = TestZone::start_formatted(2, 64 * MIB, 3).await;
    let first = [zone.disk_of_node(0).await, zone.disk_of_node(1).await];
    zone.api
        .create_datastore(&CreateDatastore {
            name: "ds".into(),
            mirrors: 2,
            stripes: Some(4),
            disks: Some(first.to_vec()),
        })
        .await
        .expect("create datastore");
    zone.vdisk("ds", "a", 256 * MIB).await;
    let a = zone.open("ds", "a").await;

    // Fill both disks: every copy is on one of them.
    let mut cursor = 0;
    let filled = fill(&a, &mut cursor, 11).await;
    eprintln!(
        "filled {} MiB of vDisk a in {:.1} s",
        filled / MIB,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        filled >= 32 * MIB,
        "the 64 MiB disks took at least 32 MiB before they filled (took {filled} bytes)"
    );
    a.flush().await.expect("flush on a full datastore");
    // Four chunks: one in each group.
    let new_space = 192 * MIB;
    let new_data = pattern(12, new_space, 4 * MIB as usize);
    assert!(
        matches!(
            a.write(new_space, &new_data).await,
            Err(VolumeError::NoSpace { .. })
        ),
        "with both disks full, a write into new space fails with NoSpace"
    );

    // The zone knows they are full (the nodes' heartbeats say so) before
    // a third node's disk joins the datastore.
    let start = Instant::now();
    loop {
        let view = zone.api.datastore("ds").await.expect("datastore view");
        if view.space.fullest_disk_percent >= 95 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the zone never learnt the disks are full: {:?}",
            view.space
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = zone.add_node();
    zone.wait_nodes_up(3).await;
    let added = zone.disk_of_node(n).await;
    zone.api
        .add_datastore_disk("ds", added)
        .await
        .expect("add the disk to the datastore");
    let view = zone.api.datastore("ds").await.expect("datastore view");
    eprintln!("datastore after the disk joined: {:?}", view.space);

    // Writes into new space resume once the full disks shed copies.
    let start = Instant::now();
    let mut refused = 0;
    loop {
        match a.write(new_space, &new_data).await {
            Ok(()) => break,
            Err(VolumeError::NoSpace { .. }) => refused += 1,
            Err(e) => panic!(
                "while the full disks shed copies, a write fails only with NoSpace, got: {e}"
            ),
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "writes into new space did not resume within 120 s of a disk joining: disks {:?}, placement {:?}",
            usage(&zone.api.disks().await.expect("disks")),
            zone.api.vdisk("ds", "a").await.expect("vdisk").vdisk.placement
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "a write into new space succeeded {:.1} s after the disk joined ({refused} refused before)",
        start.elapsed().as_secs_f64()
    );
    a.flush().await.expect("flush after writes resumed");

    // The moves finish; the zone says healthy; the new disk holds copies.
    let start = Instant::now();
    loop {
        let v = zone.api.vdisk("ds", "a").await.expect("vdisk view");
        if v.vdisk.placement.moves.is_empty() && v.health == Health::Healthy && a.all_current() {
            assert!(
                v.vdisk.placement.holds(added),
                "the new disk holds copies of a: {:?}",
                v.vdisk.placement
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the shed moves did not finish: {:?}, health {:?}",
            v.vdisk.placement,
            v.health
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let disks = zone.api.disks().await.expect("disks");
    eprintln!(
        "disks after the moves (used/capacity): {:?}; the new disk is {added}",
        usage(&disks)
    );
    // The nodes free the groups that moved away (once the writer settled
    // on the placement without them) and report the space at their next
    // heartbeat: the full disks drop below the shed line.
    let start = Instant::now();
    let disks = loop {
        let disks = zone.api.disks().await.expect("disks");
        let below = first.iter().all(|d| {
            disks
                .iter()
                .find(|x| x.uuid == *d)
                .is_some_and(|x| x.used * 10 < x.capacity * 9)
        });
        if below {
            break disks;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the full disks did not shed below 90 %: their nodes did not free the groups that moved away: {:?}",
            usage(&disks)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("disks once freed: {:?}", usage(&disks));
    assert!(
        used(&disks, added) * 10 <= 64 * MIB * 8 + 4 * MIB * 10,
        "a shed fills its target to at most 80 % (and then the guest writes): {:?}",
        usage(&disks)
    );

    // Nothing written before is lost, on any copy.
    for off in (0..cursor).step_by(MIB as usize) {
        let len = (cursor - off).min(MIB);
        assert_every_copy(
            &a,
            off,
            &pattern(11, off, len as usize),
            "data written before the datastore filled",
        )
        .await;
    }
    assert_every_copy(&a, new_space, &new_data, "the write that resumed").await;
    a.close().await.expect("close");
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
