//! One deterministic test per finding of the code reading (issue 11) that
//! the volume client and the zone can be driven into: the real volume
//! client and zone service against simulated nodes, with every fault
//! injected at a chosen step (no random schedule). Each test checks what a
//! user relies on; its doc comment names the change to the source that
//! brings the finding back and how the test then fails.

use std::time::Duration;

use tessera_proto::Status;
use tessera_replicator::{VolumeError, ZoneFailure};
mod common;

use common::{
    assert_copies_agree, copy_node, dies_with_a_write_held, each_copy, healed, read, requests,
    sleep, what, whats, writer_dies, writes, BLOCK,
};
use tessera_sim::harness::{block, run, Cluster, Shape, DS, NAME};
use tessera_sim::node::{Match, OpKind, Rule};
use tessera_sim::zone::{ZoneAction, ZoneCall, ZoneRule};
use tessera_zone::service::MarkStale;

/// Finding 1: when one disk's `mark_stale` call fails, everything the
/// batch did not record is pending again — not only that disk's chunks.
///
/// Two copies, in two groups, miss one write while the zone refuses
/// `mark_stale`; once it takes records again the write is acknowledged, and
/// the zone must name both copies with the chunk each missed (and the copy
/// resynced from that record must hold the write).
///
/// Fails if `record_pending` puts back only the failed disk's part
/// (`for (other, rest) in &batch` removed): the write is acknowledged and
/// the second disk is recorded stale with an empty dirty set, so resync
/// makes it current without the write.
#[test]
fn a_failed_stale_record_keeps_every_other_disks_chunks() {
    run(async {
        let c = Cluster::new(Shape {
            nodes: 4,
            stripes: 2,
            ..Shape::default()
        })
        .await;
        let groups = c.groups().await;
        // A disk only in group 0 and one only in group 1.
        let x = *groups[0]
            .iter()
            .find(|d| !groups[1].contains(d))
            .expect("a disk of group 0 only");
        let y = *groups[1]
            .iter()
            .find(|d| !groups[0].contains(d))
            .expect("a disk of group 1 only");
        let v = c.open(false).await;
        let refuse = c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::MarkStale(_))),
            action: ZoneAction::Refuse(ZoneFailure::Unreachable),
            times: None,
        });
        c.node_of(x).crash();
        c.node_of(y).crash();
        // One write over the end of chunk 0 (group 0) and the start of
        // chunk 1 (group 1).
        let data = [block(1), block(2)].concat();
        let at = c.offset(1, 0) - BLOCK as u64;
        let write = {
            let v = v.clone();
            let data = data.clone();
            tokio::spawn(async move { v.write(at, &data).await })
        };
        sleep(1000).await;
        assert!(!write.is_finished(), "acknowledged before the zone knew");
        c.zone.release(refuse);
        write
            .await
            .expect("the write task")
            .expect("the write is acknowledged once the zone takes records");
        let (x_stale, x_dirty) = c.stale(x).await;
        let (y_stale, y_dirty) = c.stale(y).await;
        assert!(
            x_stale && x_dirty.contains(&0),
            "the zone must list disk x stale with chunk 0 dirty: {x_stale} {x_dirty:?}"
        );
        assert!(
            y_stale && y_dirty.contains(&1),
            "the zone must list disk y stale with chunk 1 dirty: {y_stale} {y_dirty:?}"
        );
        // The copies come back, are resynced from those records, and are
        // then the only ones left.
        c.node_of(x).restart();
        c.node_of(y).restart();
        healed(&c, &v).await;
        for (g, keep) in [(0, x), (1, y)] {
            for d in &groups[g] {
                if *d != keep {
                    c.node_of(*d).crash();
                }
            }
        }
        let mut back = vec![0u8; 2 * BLOCK];
        v.read(at, &mut back).await.expect("read");
        assert!(
            back == data,
            "the acknowledged write is gone from the resynced copies: {:?}",
            whats(&[back[..BLOCK].to_vec(), back[BLOCK..].to_vec()])
        );
    });
}

/// Finding 2: scrub takes the content most copies hold, not the first
/// copy that reads back without a checksum error.
///
/// With mirrors=3 the first copy of a chunk reads back zeros as good (what
/// an extent whose record was damaged did before the node answered
/// `Checksum`); after a scrub every copy must hold the acknowledged write.
///
/// Fails if `scrub_chunk` takes the first copy that read back as the truth
/// (`.max_by_key(..)` replaced by `.next()`): the scrub hands the two good
/// copies to resync, which copies the zeros over them, and every copy
/// reads zeros.
#[test]
fn scrub_keeps_what_the_majority_of_copies_hold() {
    run(async {
        let c = Cluster::new(Shape {
            nodes: 3,
            mirrors: 3,
            ..Shape::default()
        })
        .await;
        let v = c.open(false).await;
        let at = c.offset(0, 0);
        v.write(at, &block(1)).await.expect("write");
        v.flush().await.expect("flush");
        let (disk, node) = copy_node(&c, 0, 0).await;
        node.rot(disk, c.vdisk, 0, &vec![0; c.shape.chunk_size as usize]);
        let report = v.scrub().await.expect("scrub");
        healed(&c, &v).await;
        let copies = each_copy(&v, at).await;
        assert!(
            copies.iter().all(|b| *b == block(1)),
            "after the scrub the copies hold {:?}, not write 1 ({report:?})",
            whats(&copies)
        );
        assert_eq!(report.mismatches, vec![(disk, 0)], "{report:?}");
    });
}

/// Finding 2 (tie): between two copies that differ, scrub keeps the one
/// reads are served from — what the guest has seen.
///
/// Fails if the tie goes to the other copy (`*disk != preferred` in
/// `scrub_chunk`): the guest read write 1, and after the scrub reads
/// return the rotted zeros.
#[test]
fn a_scrub_tie_keeps_what_reads_returned() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let v = c.open(false).await;
        let at = c.offset(0, 0);
        v.write(at, &block(1)).await.expect("write");
        v.flush().await.expect("flush");
        let (disk, node) = copy_node(&c, 0, 1).await;
        node.rot(disk, c.vdisk, 0, &vec![0; c.shape.chunk_size as usize]);
        assert_eq!(read(&v, at).await.expect("read"), block(1));
        v.scrub().await.expect("scrub");
        healed(&c, &v).await;
        let copies = each_copy(&v, at).await;
        assert!(
            copies.iter().all(|b| *b == block(1)),
            "the guest read write 1; after the scrub the copies hold {:?}",
            whats(&copies)
        );
    });
}

/// Finding 3: an open fences every copy, and one it cannot fence is
/// recorded dirty for the dead writer's in-flight extents.
///
/// The writer dies with a write that reached one copy only; the other
/// copy's node is down when the next writer opens. Once that node is back
/// and resynced, both copies must hold the same bytes (the write in flight
/// is old or new, never both).
///
/// Fails if `fence_all` records no dirty chunks for copies it could not
/// fence (the `missed` loop removed): that copy is recorded stale with an
/// empty dirty set, resync makes it current without copying anything, and
/// the two copies differ.
#[test]
fn a_copy_the_open_cannot_fence_gets_the_dead_writers_extents() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (_, first) = copy_node(&c, 0, 0).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let at = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        // Write 2 reaches the first copy; the second node holds it.
        let hold = dies_with_a_write_held(&c, v, &b, disk_b, at).await;
        b.crash();
        b.release(hold);
        assert!(first.is_up());
        let v = c.open(true).await;
        b.restart();
        healed(&c, &v).await;
        let copies = each_copy(&v, at).await;
        assert!(
            copies[0] == copies[1],
            "the copies differ after the open and resync: {:?}",
            whats(&copies)
        );
    });
}

/// Finding 4: resync fences a returning copy with a new generation, so a
/// write of this writer that timed out while queued at the node is refused
/// when it finally runs, instead of landing over what resync copied.
///
/// Fails if the repair loop does not bump the disk's generation before it
/// fences (`slot.generation.fetch_add` removed): the late write 2 lands on
/// the resynced copy after write 3, and once the other copy's node is down
/// a read returns write 2.
#[test]
fn a_write_that_timed_out_cannot_land_after_resync() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (_, a) = copy_node(&c, 0, 0).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let at = c.offset(0, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        // Write 2 stays queued at b past the I/O timeout: b goes stale.
        let late = b.add_rule_times(
            Rule::Hold(Match {
                whole_chunk: Some(false),
                ..writes(disk_b, 0)
            }),
            Some(1),
        );
        v.write(at, &block(2)).await.expect("write 2");
        assert_eq!(b.held(), 1);
        // b answers everything else: resync copies chunk 0 back.
        healed(&c, &v).await;
        v.write(at, &block(3)).await.expect("write 3");
        // The queued write 2 runs now.
        b.release(late);
        sleep(10).await;
        a.crash();
        let data = read(&v, at).await.expect("read from the other copy");
        assert!(
            data == block(3),
            "the newest acknowledged write is 3; a read returns {}",
            what(&data)
        );
    });
}

/// Finding 6: contention and lost answers from the zone are retried; only
/// a lost lease (or a deleted vDisk) fences the writer.
///
/// Fails if `ZoneCallError::means_fenced` also takes `Contention` (any 409
/// fenced, as before): the contended lease renewal fences the writer and
/// the write fails with `Fenced`. Fails too if contention is not retried
/// (`is_transient` without `Contention`): the write fails.
#[test]
fn zone_contention_and_lost_answers_do_not_fence_the_writer() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let v = c.open(false).await;
        c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::Renew(_))),
            action: ZoneAction::Refuse(ZoneFailure::Contention),
            times: Some(2),
        });
        c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::MarkStale(_))),
            action: ZoneAction::Refuse(ZoneFailure::Contention),
            times: Some(3),
        });
        c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::MarkStale(_))),
            action: ZoneAction::LoseAnswer,
            times: Some(1),
        });
        c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::MarkActive(_))),
            action: ZoneAction::LoseAnswer,
            times: Some(1),
        });
        // Renewals come every 2 s.
        sleep(4500).await;
        b.crash();
        let at = c.offset(0, 0);
        v.write(at, &block(1))
            .await
            .expect("a write while the zone is contended");
        assert!(!v.is_fenced(), "nobody else took the vDisk over");
        let (stale, dirty) = c.stale(disk_b).await;
        assert!(stale && dirty.contains(&0), "{stale} {dirty:?}");
        assert_eq!(read(&v, at).await.expect("read"), block(1));
    });
}

/// Finding 7 (concurrent flushes): a flush forgets only the chunks written
/// before it started, so a copy that fails later is recorded dirty for a
/// chunk acknowledged while that flush ran.
///
/// Fails if a flush forgets every unflushed chunk when it ends
/// (`forget_unflushed` clearing the map): the copy whose node lost power
/// with write 2 in its page cache is resynced without chunk 1 and, the
/// other copy's node down, a read returns zeros.
#[test]
fn a_write_acknowledged_during_a_flush_stays_unflushed() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_a, a) = copy_node(&c, 0, 0).await;
        let (_, b) = copy_node(&c, 0, 1).await;
        let v = c.open(false).await;
        v.write(c.offset(0, 0), &block(1)).await.expect("write 1");
        // A flush that takes its time on a.
        let slow = a.add_rule_times(Rule::Hold(requests(OpKind::Flush, disk_a)), Some(1));
        let flush = {
            let v = v.clone();
            tokio::spawn(async move { v.flush().await })
        };
        assert!(c.until(Duration::from_millis(500), || a.held() == 1).await);
        let at = c.offset(1, 0);
        v.write(at, &block(2)).await.expect("write 2");
        a.release(slow);
        flush.await.expect("flush task").expect("flush");
        // b loses write 2 with its page cache; the next flush notices.
        b.lose_power_with(false);
        v.flush().await.expect("a flush with one copy left");
        b.restart();
        healed(&c, &v).await;
        a.crash();
        let data = read(&v, at).await.expect("read from b");
        assert!(
            data == block(2),
            "write 2 was acknowledged and flushed; a read returns {}",
            what(&data)
        );
    });
}

/// Finding 7 (a copy that held a write and then failed): it is recorded
/// dirty for that write's chunk, since it may lose it before any flush.
///
/// Copy b takes write 1 while copy a's answer is slow; meanwhile b fails
/// another write. When write 1 is acknowledged, the zone must list b dirty
/// for chunk 0 too.
///
/// Fails if `missed_on_ack` leaves out failing or stale copies that held
/// the write (`Failing | Stale => !self.holds(*d)`): the zone lists b dirty
/// for chunk 1 only, and after b loses power resync makes it current
/// without write 1.
#[test]
fn a_copy_that_held_a_write_and_then_failed_is_dirty_for_it() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_a, a) = copy_node(&c, 0, 0).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let v = c.open(false).await;
        let slow = a.add_rule_times(Rule::Hold(writes(disk_a, 0)), Some(1));
        b.add_rule_times(Rule::Fail(writes(disk_b, 1), Status::IoError), Some(1));
        // b holds write 1 before resync can flush it.
        let no_resync = b.add_rule(Rule::Hold(requests(OpKind::Fence, disk_b)));
        let w1 = {
            let v = v.clone();
            tokio::spawn(async move { v.write(c_offset(0), &block(1)).await })
        };
        assert!(c.until(Duration::from_millis(500), || a.held() == 1).await);
        sleep(5).await;
        v.write(c.offset(1, 0), &block(2)).await.expect("write 2");
        a.release(slow);
        w1.await.expect("write task").expect("write 1");
        let (stale, dirty) = c.stale(disk_b).await;
        assert!(
            stale && dirty.contains(&0),
            "b held write 1 and then failed: the zone lists b stale {stale} with dirty chunks {dirty:?}"
        );
        b.lose_power_with(false);
        b.release(no_resync);
        b.restart();
        healed(&c, &v).await;
        a.crash();
        let data = read(&v, c.offset(0, 0)).await.expect("read from b");
        assert!(
            data == block(1),
            "write 1 was acknowledged; a read returns {}",
            what(&data)
        );
    });
}

fn c_offset(chunk: u64) -> u64 {
    chunk * Shape::default().chunk_size
}

/// Finding 8: the end of a resync makes current only the copies it was
/// filling; a copy of the same disk that failed meanwhile stays failed.
///
/// Disk b is stale in group 0 and current in group 1; while resync records
/// b complete, a write to chunk 1 fails on b. The zone then lists b dirty
/// for chunk 1, and once everything settles b must hold that write.
///
/// Fails if `mark_current` also turns a failing copy current (the old
/// store of CURRENT into every slot): b's group-1 copy passes for current
/// with the old data, resync never copies chunk 1, and with the other copy
/// down a read returns write 1 instead of write 2.
#[test]
fn a_failure_while_resync_ends_is_not_overwritten() {
    run(async {
        let c = Cluster::new(Shape {
            stripes: 2,
            ..Shape::default()
        })
        .await;
        let groups = c.groups().await;
        let disk_b = groups[0][1];
        let b = c.node_of(disk_b).clone();
        let disk_a = groups[0][0];
        let a = c.node_of(disk_a).clone();
        let v = c.open(false).await;
        let at = c.offset(1, 0);
        v.write(at, &block(1)).await.expect("write 1");
        // b misses a write of group 0: stale there only.
        b.add_rule_times(Rule::Fail(writes(disk_b, 0), Status::IoError), Some(1));
        let completing = c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::MarkClean(m) if m.complete)),
            action: ZoneAction::Hold,
            times: None,
        });
        v.write(c.offset(0, 0), &block(3)).await.expect("write 3");
        assert!(
            c.until(Duration::from_secs(5), || c.zone.held(completing) == 1)
                .await,
            "resync reaches its end"
        );
        // While it records b complete, b fails a write of group 1.
        b.add_rule_times(Rule::Fail(writes(disk_b, 1), Status::IoError), Some(1));
        let w2 = {
            let v = v.clone();
            tokio::spawn(async move { v.write(at, &block(2)).await })
        };
        sleep(20).await;
        c.zone.release(completing);
        w2.await.expect("write task").expect("write 2");
        let (stale, dirty) = c.stale(disk_b).await;
        assert!(stale && dirty.contains(&1), "{stale} {dirty:?}");
        sleep(5000).await;
        a.crash();
        let data = read(&v, at).await.expect("read from b");
        assert!(
            data == block(2),
            "write 2 was acknowledged; a read returns {}",
            what(&data)
        );
    });
}

/// Finding 9: with mirrors=3 a flush succeeds only when the policy's
/// minimum (two) of current copies made the writes stable.
///
/// Fails if the flush needs one stable copy (`flush_with(links, 1)` in
/// `Inner::flush`): it reports success although only one copy of three
/// holds the write on stable media.
#[test]
fn a_flush_needs_the_policys_minimum_of_stable_copies() {
    run(async {
        let c = Cluster::new(Shape {
            nodes: 3,
            mirrors: 3,
            ..Shape::default()
        })
        .await;
        let v = c.open(false).await;
        v.write(c.offset(0, 0), &block(1)).await.expect("write");
        for i in 1..3 {
            let (disk, node) = copy_node(&c, 0, i).await;
            node.add_rule(Rule::Fail(requests(OpKind::Flush, disk), Status::IoError));
        }
        let r = v.flush().await;
        assert!(
            matches!(
                r,
                Err(VolumeError::Degraded {
                    current: 1,
                    needed: 2,
                    ..
                })
            ),
            "one stable copy of three is below the minimum; the flush answered {r:?}"
        );
    });
}

/// Finding 10: a payload a node refused because it changed in flight is
/// sent again from one stable copy, with one crc, to every copy.
///
/// The guest changes its buffer while the write is in flight: the first
/// copy received the old bytes, the second the new ones (and refused them,
/// as they fail the crc). After the write is acknowledged both copies must
/// hold the same bytes.
///
/// Fails if the refused copy alone is sent the guest's buffer again (no
/// private copy: only the refuser is a target, so no crc is sent and the
/// node takes the changed bytes): the copies differ.
#[test]
fn a_payload_changed_in_flight_ends_the_same_on_every_copy() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let v = c.open(false).await;
        let at = c.offset(0, 0);
        let buf = block(1);
        c.connector.set_volatile(Some(&buf), 1);
        v.write(at, &buf).await.expect("write");
        c.connector.set_volatile(None, 0);
        let copies = each_copy(&v, at).await;
        assert!(
            copies[0] == copies[1],
            "one acknowledged write, two contents: {:?} (first bytes {:?} and {:?})",
            whats(&copies),
            &copies[0][..8],
            &copies[1][..8]
        );
    });
}

/// Finding 11 (cooling): an activity-log extent leaves the log only once a
/// flush covered its writes (the volume flushes by itself).
///
/// A write is never flushed by the guest; after the extent went cold the
/// writer dies and both nodes lose power, one losing its page cache. The
/// next open must find copies that agree.
///
/// Fails if `cool_extents` cools idle extents without a flush (its flush
/// and the `last_seq >= flushed` check removed): the log is empty, nothing
/// is reconciled, and one copy holds the write while the other does not.
#[test]
fn an_extent_cools_only_after_a_flush_covered_it() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let v = c.open(false).await;
        let at = c.offset(0, 0);
        v.write(at, &block(1)).await.expect("write");
        sleep(7000).await;
        assert!(
            c.view().await.vdisk.activity.is_empty(),
            "the extent cools after 5 s without writes"
        );
        writer_dies(v, Vec::new()).await;
        c.nodes[0].lose_power_with(false);
        c.nodes[1].lose_power_with(true);
        c.nodes[0].restart();
        c.nodes[1].restart();
        let v = c.open(true).await;
        let copies = each_copy(&v, at).await;
        assert!(
            copies[0] == copies[1],
            "the copies differ after the power loss: {:?}",
            whats(&copies)
        );
    });
}

/// Finding 11 (reconcile): the copies an open rewrote to agree are made
/// stable before the activity log that names them is cleared.
///
/// The dead writer's write 2 reached the first copy only; the next open
/// rewrites the second copy and dies too; that node then loses power with
/// its page cache. A third open must find copies that agree.
///
/// Fails if `reconcile` clears the log without flushing its rewrites:
/// the second copy is back to write 1 while the first holds write 2, and
/// no log is left to reconcile them.
#[test]
fn reconciled_copies_are_stable_before_the_log_is_cleared() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let at = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        let hold = dies_with_a_write_held(&c, v, &b, disk_b, at).await;
        b.crash();
        b.release(hold);
        b.restart();
        let v = c.open(true).await;
        assert!(
            v.reconciled_chunks() > 0,
            "the open rewrote the second copy"
        );
        writer_dies(v, Vec::new()).await;
        b.lose_power_with(false);
        b.restart();
        let v = c.open(true).await;
        assert_copies_agree(&v, at).await;
    });
}

/// Finding 15: an extent whose removal from the log failed (the zone may
/// have removed it) is cold, so the next write there logs it again.
///
/// The zone removes the extent but every answer is lost; a later write
/// reaches one copy only when the writer dies. The next open must find the
/// extent in the log and make the copies agree.
///
/// Fails if a failed cooling call leaves the extent hot: the later write
/// goes unlogged, nothing is reconciled, and the copies differ.
#[test]
fn a_failed_cooling_call_leaves_the_extent_cold() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let at = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        let lose = c.zone.add_rule(ZoneRule {
            matches: Box::new(
                |call| matches!(call, ZoneCall::MarkActive(m) if !m.remove.is_empty()),
            ),
            action: ZoneAction::LoseAnswer,
            times: None,
        });
        // Cooling starts after 5 s and gives up after 3 s of lost answers
        // (retried every 200 ms); the write comes right after.
        assert!(
            c.until(Duration::from_secs(10), || c.zone.applied(lose) > 0)
                .await
        );
        loop {
            let n = c.zone.applied(lose);
            sleep(400).await;
            if c.zone.applied(lose) == n {
                break;
            }
        }
        assert!(
            c.view().await.vdisk.activity.is_empty(),
            "the zone removed it"
        );
        let hold = dies_with_a_write_held(&c, v, &b, disk_b, at).await;
        c.zone.release(lose);
        b.crash();
        b.release(hold);
        b.restart();
        let v = c.open(true).await;
        assert_copies_agree(&v, at).await;
    });
}

/// Finding 16: every piece of a write runs to its end, also when another
/// piece failed, so each copy failure is recorded.
///
/// A write spans two extents; logging the second one is refused, while
/// the piece in the first reached one copy and waits on the other. Once
/// that copy is back and everything settled, the copies must agree.
///
/// Fails if `writev` uses `try_join_all` (the failing piece drops its
/// sibling in flight): the copy that never got the write stays current,
/// and the copies differ.
#[test]
fn every_piece_of_a_failed_write_is_recorded() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let v = c.open(false).await;
        let at = c.offset(16, 0) - BLOCK as u64;
        v.write(at, &block(1))
            .await
            .expect("write 1 (extent 0 is hot)");
        c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::MarkActive(m) if m.add.contains(&1))),
            action: ZoneAction::Refuse(ZoneFailure::Refused),
            times: Some(1),
        });
        let hold = b.add_rule_times(Rule::Hold(writes(disk_b, 15)), Some(1));
        let data = [block(2), block(3)].concat();
        let r = v.write(at, &data).await;
        assert!(r.is_err(), "logging extent 1 was refused");
        // The write to b is still queued there; it is lost with b.
        assert!(c.until(Duration::from_secs(1), || b.held() == 1).await);
        b.crash();
        b.release(hold);
        b.restart();
        sleep(3000).await;
        healed(&c, &v).await;
        let copies = each_copy(&v, at).await;
        assert!(
            copies[0] == copies[1],
            "the copies differ after a failed write: {:?}",
            whats(&copies)
        );
    });
}

/// Finding 18: the offline repair worker takes a vDisk whose writer
/// crashed once its lease expired (an expired lease is not "no lease").
///
/// Fails if `needs_offline_repair` takes only vDisks without a lease: the
/// crashed writer's vDisk, with a stale copy whose node is up and an
/// activity log, is never repaired.
#[test]
fn the_repair_worker_takes_a_vdisk_whose_writer_crashed() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let v = c.open(false).await;
        // b misses a write and cannot be resynced while this writer lives.
        b.add_rule_times(Rule::Fail(writes(disk_b, 0), Status::IoError), Some(1));
        b.add_rule(Rule::Hold(requests(OpKind::Fence, disk_b)));
        v.write(c.offset(0, 0), &block(1)).await.expect("write");
        writer_dies(v, Vec::new()).await;
        let now = || c.zone.service.env().now_ms();
        let view = c.view().await;
        assert!(view.repair.iter().any(|r| r.node_up));
        assert!(
            !tessera_replicator::worker::needs_offline_repair(&view, now()),
            "the writer's lease is still live"
        );
        sleep(7000).await;
        let view = c.view().await;
        assert!(
            tessera_replicator::worker::needs_offline_repair(&view, now()),
            "the writer died and its lease expired: {:?}",
            view.vdisk.lease
        );
    });
}

/// Finding 17: resync never copies a chunk of a group in which the disk's
/// copy is current (writes there take no stripe lock): it fails that copy
/// first, so writes to the group and resync of the chunk exclude each other.
///
/// Disk b is stale in group 0 only. The zone's dirty set of b also names
/// chunk 1 of group 1, where the writer holds b's copy current (the test
/// records it through the zone service with the writer's session: no path
/// of the volume client records such a chunk by itself any more); resync
/// learns of it when the zone refuses to record b complete. Write 2 to
/// chunk 1 runs while resync's copy of the chunk is on its way to b.
///
/// Fails if `resync` copies such a chunk without failing the copy first
/// (its `is current` check removed): the copy, read before write 2, lands
/// on b after it; b stays current, and with the other copy down a read
/// returns write 1.
#[test]
fn resync_never_copies_a_chunk_whose_copy_is_current() {
    run(async {
        let c = Cluster::new(Shape {
            stripes: 2,
            ..Shape::default()
        })
        .await;
        let (_, a) = copy_node(&c, 1, 0).await;
        let (disk_b, b) = copy_node(&c, 1, 1).await;
        let at = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        // Resync's first copy of chunk 1 to b takes its time.
        let copying = b.add_rule_times(
            Rule::Hold(Match {
                whole_chunk: Some(true),
                ..writes(disk_b, 1)
            }),
            Some(1),
        );
        let session = c.view().await.vdisk.lease.expect("the lease").session;
        c.zone
            .service
            .mark_stale(
                DS,
                NAME,
                MarkStale {
                    session,
                    disks: vec![disk_b],
                    chunks: vec![1],
                },
            )
            .await
            .expect("recorded");
        // b misses a write of group 0: stale there, resync starts.
        b.add_rule_times(Rule::Fail(writes(disk_b, 0), Status::IoError), Some(1));
        v.write(c.offset(0, 0), &block(3)).await.expect("write 3");
        assert!(
            c.until(Duration::from_secs(10), || b.held() == 1).await,
            "resync copies chunk 1"
        );
        v.write(at, &block(2)).await.expect("write 2");
        b.release(copying);
        healed(&c, &v).await;
        sleep(2000).await;
        healed(&c, &v).await;
        a.crash();
        let data = read(&v, at).await.expect("read from b");
        assert!(
            data == block(2),
            "write 2 was acknowledged; a read returns {}",
            what(&data)
        );
    });
}

/// A copy move recorded while the writer resyncs the move's target disk
/// (stale in another group), before the writer adopted the new placement:
/// the target must receive the group's data before the move finishes.
///
/// Disk b is stale in group 0; while its resync records it complete, the
/// zone drains disk c and moves c's copy of group 1 to b. The zone refuses
/// the completion (b's dirty set now holds group 1), resync reloads the
/// dirty set — and must copy group 1 to b before it records b complete,
/// which finishes the move and drops c from group 1.
///
/// Failed before 5b699db: `resync` took the reloaded chunks of group 1
/// while its layout did not list b in group 1 yet, so `rebuild_chunk` found
/// no slot for b and answered `Ok` without copying; resync recorded the 16
/// chunks clean and b complete, the zone finished the move, and b served
/// group 1 with nothing in it: with a down, a read of chunk 1 returned
/// zeros instead of write 1.
#[test]
fn a_move_recorded_during_a_resync_of_its_target_is_filled() {
    run(async {
        let c = Cluster::new(Shape {
            nodes: 3,
            stripes: 2,
            ..Shape::default()
        })
        .await;
        let groups = c.groups().await;
        let disk_b = *groups[0]
            .iter()
            .find(|d| !groups[1].contains(d))
            .expect("a disk of group 0 only");
        let disk_c = *groups[1]
            .iter()
            .find(|d| !groups[0].contains(d))
            .expect("a disk of group 1 only");
        let disk_a = *groups[1]
            .iter()
            .find(|d| **d != disk_c)
            .expect("the other copy of group 1");
        let b = c.node_of(disk_b).clone();
        let v = c.open(false).await;
        let at = c.offset(1, 0);
        v.write(at, &block(1)).await.expect("write 1");
        b.add_rule_times(Rule::Fail(writes(disk_b, 0), Status::IoError), Some(1));
        let completing = c.zone.add_rule(ZoneRule {
            matches: Box::new(move |call| {
                matches!(call, ZoneCall::MarkClean(m) if m.complete && m.disk == disk_b)
            }),
            action: ZoneAction::Hold,
            times: Some(1),
        });
        v.write(c.offset(0, 0), &block(2)).await.expect("write 2");
        assert!(
            c.until(Duration::from_secs(5), || c.zone.held(completing) == 1)
                .await,
            "resync of b reaches its end"
        );
        c.zone
            .service
            .remove_datastore_disk(DS, disk_c)
            .await
            .expect("drain c");
        let moves = c
            .zone
            .service
            .plan_moves(&std::collections::HashSet::new())
            .await
            .expect("planned");
        assert!(
            moves.iter().any(|m| m.mv.to == disk_b && m.mv.group == 1),
            "{moves:?}"
        );
        c.zone.release(completing);
        assert!(
            c.until(Duration::from_secs(30), || v.all_current()).await,
            "resync ends"
        );
        let view = c.view().await.vdisk;
        assert!(view.placement.moves.is_empty(), "the move finished");
        assert!(view.placement.groups[1].contains(&disk_b));
        // Group 1 is now a and b; a goes down.
        c.node_of(disk_a).crash();
        let data = read(&v, at).await.expect("read from b");
        assert!(
            data == block(1),
            "write 1 was acknowledged in group 1; after its copy moved to b a read returns {}",
            what(&data)
        );
    });
}
