//! One deterministic test per finding of the real-process fault campaign
//! that the simulation can drive the volume client into: the real volume
//! client and zone service against simulated nodes, every fault injected
//! at a chosen step. Each test's doc comment names the change to the
//! source that brings the finding back and how the test then fails.

mod common;

use std::time::Duration;

use common::{
    assert_reads, bounded, copy_node, differing, fences, healthy, read, sleep, small_writes, what,
    writes, WALL,
};
use tessera_proto::Status;
use tessera_replicator::ZoneFailure;
use tessera_sim::harness::{block, run, Cluster, Shape};
use tessera_sim::node::Rule;
use tessera_sim::zone::{ZoneAction, ZoneCall, ZoneRule};

/// Fault campaign seed 6706842144 (fixed in 82fe8d9): a write fails on a
/// copy that resync is filling, while the zone does not take stale records
/// (for longer than `degraded_wait`: the write fails, and what the copy
/// missed stays in the writer's pending list); then the guest is idle.
/// Resync must record those chunks itself, copy them, and the vDisk must
/// become healthy with equal copies. (A write that fails a copy records
/// it before it answers: only a record that fails, as when the zone is
/// restarting, leaves the chunks pending.)
///
/// Copy b misses write 1 (chunk 0) and is resynced; resync's record of the
/// copied chunk waits in the zone, and meanwhile write 2 (chunk 1) fails on
/// b and cannot be recorded. Once the zone takes records again nothing
/// else is written.
///
/// Fails if `resync` waits for someone else to record the pending chunks
/// (the `if pending { drop(barrier); self.record_dirty(&[]).await?;
/// continue; }` branch replaced by `if pending { continue; }`, as before
/// 82fe8d9): resync loops at its final check without ever waiting (about
/// 25,000 times a second, at one simulated instant), simulated time
/// stands still, and the test fails on its real-time bound (`WALL`, 30 s)
/// instead of seeing the vDisk healthy.
#[test]
fn resync_records_what_a_write_failed_on_its_copy_while_the_guest_is_idle() {
    bounded(WALL, || {
        run(async {
            let c = Cluster::new(Shape::default()).await;
            let (disk_a, a) = copy_node(&c, 0, 0).await;
            let (disk_b, b) = copy_node(&c, 0, 1).await;
            let v = c.open(false).await;
            // Resync's first record of chunks it copied to b waits in the
            // zone: b's resync is under way (b syncing) until released.
            let settling = c.zone.add_rule(ZoneRule {
                matches: Box::new(move |call| {
                    matches!(call, ZoneCall::MarkClean(m) if !m.complete && m.disk == disk_b)
                }),
                action: ZoneAction::Hold,
                times: Some(1),
            });
            // b misses write 1: stale with chunk 0 dirty; resync copies it.
            b.add_rule_times(Rule::Fail(writes(disk_b, 0), Status::IoError), Some(1));
            v.write(c.offset(0, 0), &block(1)).await.expect("write 1");
            assert!(
                c.until(Duration::from_secs(10), || c.zone.held(settling) == 1)
                    .await,
                "resync copies chunk 0 to b and records it"
            );
            assert!(!v.all_current(), "b is being resynced");
            // The zone takes no stale record until released (longer than
            // `degraded_wait`).
            let unrecorded = c.zone.add_rule(ZoneRule {
                matches: Box::new(|call| matches!(call, ZoneCall::MarkStale(_))),
                action: ZoneAction::Refuse(ZoneFailure::Unreachable),
                times: None,
            });
            // Write 2 goes to b too (resyncing, chunk 1 not dirty) and fails there.
            b.add_rule_times(
                Rule::Fail(small_writes(disk_b, 1), Status::IoError),
                Some(1),
            );
            let w = {
                let v = v.clone();
                let at = c.offset(1, 0);
                tokio::spawn(async move { v.write(at, &block(2)).await })
            };
            // Write 2 fails at b and waits to record it behind resync's
            // record; once that goes through, write 2's record is refused
            // until `degraded_wait` runs out.
            sleep(100).await;
            c.zone.release(settling);
            let written = w.await.expect("the write task");
            assert!(
                written.is_err(),
                "write 2 failed on b and its record was refused: it cannot be acknowledged"
            );
            assert!(
                c.zone.applied(unrecorded) > 0,
                "the writer tried to record b's failure"
            );
            let (_, dirty) = c.stale(disk_b).await;
            assert!(
                !dirty.contains(&1),
                "the zone does not know b missed chunk 1 yet: {dirty:?}"
            );
            c.zone.release(unrecorded);
            // The guest is idle from now on.
            assert!(
                healthy(&c, &v, Duration::from_secs(30)).await,
                "the vDisk did not become healthy with the guest idle: stale {:?}, dirty {:?}",
                c.view().await.vdisk.stale,
                c.stale(disk_b).await.1
            );
            let differ = differing(&c, disk_a, disk_b);
            assert!(differ.is_empty(), "the copies differ in chunks {differ:?}");
            // b serves what was acknowledged.
            a.crash();
            let data = read(&v, c.offset(0, 0)).await.expect("read from b");
            assert!(
                data == block(1),
                "write 1 was acknowledged; b returns {}",
                what(&data)
            );
        })
    });
}

/// Fixed in fa0919d: with stripes >= 2 a disk holds copies of several
/// groups. Resync of its stale copy in one group fences the disk with a
/// new generation; a write to another group, in flight to the same disk
/// whose copy there is current, is refused (`StaleEpoch` from this
/// writer's own generation). It must be sent again with the new
/// generation, not count as that copy's failure: only the copy really
/// resynced is ever stale, and the data reads back from the disk.
///
/// Write 2 (chunk 1, group 1) waits at disk b; b then misses write 3
/// (chunk 0, group 0), resync of b's group-0 copy fences b with the next
/// generation, and only then does write 2 run at b.
///
/// Fails if `update_piece` has no resend on such a refusal (the
/// `Err(VolumeError::Node { status: Status::StaleEpoch, .. }) if overtaken
/// < 3 && c.health() == CopyHealth::Current => resend = true` arm removed):
/// the refusal counts as b's failure in group 1, and when write 2 is
/// acknowledged the zone lists b dirty for chunk 1 as well as chunk 0.
#[test]
fn a_write_overtaken_by_resync_of_another_group_is_sent_again() {
    run(async {
        let c = Cluster::new(Shape {
            stripes: 2,
            ..Shape::default()
        })
        .await;
        // Both disks hold a copy of both groups.
        let (disk_b, b) = copy_node(&c, 1, 1).await;
        let (disk_a, a) = copy_node(&c, 1, 0).await;
        assert!(c.groups().await[0].contains(&disk_b));
        let v = c.open(false).await;
        let at = c.offset(1, 0);
        v.write(at, &block(1)).await.expect("write 1");
        // Write 2 waits at b; so will resync's fence of b.
        let queued = b.add_rule_times(Rule::Hold(writes(disk_b, 1)), Some(1));
        let fence = b.add_rule_times(Rule::Hold(fences(disk_b)), Some(1));
        let w = {
            let v = v.clone();
            tokio::spawn(async move { v.write(at, &block(2)).await })
        };
        assert!(
            c.until(Duration::from_millis(100), || b.held() == 1).await,
            "write 2 reaches b"
        );
        // b misses write 3, of group 0: its copy there is resynced, and
        // fenced first with the next generation.
        b.add_rule_times(Rule::Fail(writes(disk_b, 0), Status::IoError), Some(1));
        v.write(c.offset(0, 0), &block(3)).await.expect("write 3");
        assert!(
            c.until(Duration::from_millis(700), || b.held() == 2).await,
            "resync fences b while write 2 waits there"
        );
        assert!(!w.is_finished());
        // The fence runs at b (no simulated time passes)...
        b.release(fence);
        for _ in 0..100 {
            if b.held() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(b.held(), 1, "the fence ran at b");
        // ... then write 2, with the generation of before the fence, while
        // resync of b's group-0 copy is under way.
        b.release(queued);
        w.await
            .expect("the write task")
            .expect("write 2 is acknowledged");
        let (a_stale, a_dirty) = c.stale(disk_a).await;
        let (b_stale, b_dirty) = c.stale(disk_b).await;
        assert!(!a_stale && a_dirty.is_empty(), "{a_stale} {a_dirty:?}");
        assert!(
            b_stale && b_dirty.contains(&0),
            "resync of b's group-0 copy is still under way: {b_stale} {b_dirty:?}"
        );
        assert!(
            b_dirty.iter().all(|chunk| chunk % 2 == 0),
            "b's copy of group 1 is current and took write 2, yet the zone lists it dirty: {b_dirty:?}"
        );
        assert!(
            v.disk_current(disk_b),
            "b's copy of group 1 must stay current while its group-0 copy is resynced"
        );
        assert!(
            healthy(&c, &v, Duration::from_secs(30)).await,
            "the vDisk did not become healthy"
        );
        assert!(
            differing(&c, disk_a, disk_b).is_empty(),
            "the copies differ"
        );
        a.crash();
        assert_reads(&c, &v, &[(1, 2), (0, 3)], "b").await;
    });
}

/// Seed 105324 of the long run: scrub compares a chunk's copies while a
/// write to it has reached one copy and not yet the other. It must wait
/// for the write rather than take the difference for a mismatch and fail
/// a good copy.
///
/// Fails if scrub reads the copies without the chunk's stripe lock (the
/// `exclusive` lock in `Inner::scrub` taken only around the repair): the
/// report lists a mismatch and the zone records a copy stale.
#[test]
fn scrub_never_compares_copies_under_a_write_in_flight() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let v = c.open(false).await;
        let at = c.offset(0, 0);
        v.write(at, &block(1)).await.expect("write 1");
        let hold = b.add_rule_times(Rule::Hold(writes(disk_b, 0)), Some(1));
        let w = {
            let v = v.clone();
            tokio::spawn(async move { v.write(at, &block(2)).await })
        };
        assert!(c.until(Duration::from_secs(1), || b.held() == 1).await);
        let s = {
            let v = v.clone();
            tokio::spawn(async move { v.scrub().await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.release(hold);
        w.await.expect("task").expect("write 2");
        let report = s.await.expect("task").expect("scrub");
        assert!(
            report.mismatches.is_empty(),
            "scrub took a write in flight for a mismatch: {:?}",
            report.mismatches
        );
        let (stale, _) = c.stale(disk_b).await;
        assert!(!stale && v.all_current(), "no copy failed");
    });
}
