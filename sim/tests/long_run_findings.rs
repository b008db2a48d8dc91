//! One deterministic test per case the long simulation run (`tessera-sim
//! --nodes 4`, seeds 1 to about 264,000) found: the real volume client and
//! zone service against simulated nodes, every fault injected at a chosen
//! step. Each test's doc comment names the seeds, the change to the source
//! that brings the case back, and how the test then fails.

mod common;

use std::time::Duration;

use common::{assert_healed, assert_reads, copy_pair, fences, read, simulate, sleep, what, writes};
use tessera_proto::Status;
use tessera_replicator::{Volume, ZoneFailure};
use tessera_sim::harness::{block, Cluster, Shape, DS};
use tessera_sim::node::{Match, OpKind, Rule};
use tessera_sim::zone::{ZoneAction, ZoneCall, ZoneRule};

/// Seeds 100725 and 170722: a copy being filled by resync (a move's
/// target, or a stale copy) loses what resync copied to it when its
/// machine restarts before resync flushed it. Another connection notices
/// the restart first and accepts the node's new boot, so resync's own
/// flush, on a fresh connection, succeeds: the chunks must still be copied
/// again, never recorded clean.
///
/// b misses writes 1 and 2 (chunks 0 and 1; the guest flushes after, so
/// nothing of its own is unflushed). Resync copies chunk 0 to b and waits
/// (its bandwidth is one chunk a second); b's machine restarts meanwhile,
/// and a guest flush notices it.
///
/// Fails if a failure of the copy does not make what resync copied and no
/// flush covered dirty again (`DirtyState::recopy` a no-op, or resync not
/// noting the chunk in `copied` before it sends it): resync goes on,
/// records chunks 0 and 1 clean after its flush, b becomes current without
/// write 1, the copies differ in chunk 0, and with a gone b reads zeros.
#[test]
fn what_resync_copied_to_a_copy_whose_machine_restarts_is_copied_again() {
    simulate(|| async {
        let c = Cluster::new(Shape::default()).await;
        let ((disk_a, a), (disk_b, b)) = copy_pair(&c).await;
        let mut config = c.config();
        config.repair_bandwidth = c.shape.chunk_size;
        let v = Volume::open(config).await.expect("open");
        let miss = b.add_rule(Rule::Fail(
            Match {
                kind: Some(OpKind::Mutation),
                disk: Some(disk_b),
                whole_chunk: Some(false),
                ..Match::default()
            },
            Status::IoError,
        ));
        for (chunk, id) in [(0, 1), (1, 2)] {
            v.write(c.offset(chunk, 0), &block(id))
                .await
                .expect("written");
        }
        b.release(miss);
        v.flush().await.expect("flush");
        let (stale, dirty) = c.stale(disk_b).await;
        assert!(
            stale && dirty == [0, 1],
            "b misses chunks 0 and 1: {dirty:?}"
        );
        let copied = || {
            b.peek(disk_b, c.vdisk, 0)
                .is_some_and(|d| d[..common::BLOCK] == block(1)[..])
        };
        assert!(
            c.until(Duration::from_secs(5), copied).await,
            "resync copies chunk 0 to b"
        );
        b.lose_power_with(false);
        b.restart();
        assert!(!copied(), "the restart lost the copy");
        v.flush().await.expect("flush");
        assert_healed(&c, &v, disk_a, disk_b, Duration::from_secs(60)).await;
        a.crash();
        assert_reads(&c, &v, &[(0, 1), (1, 2)], "b").await;
    });
}

/// Seeds 178413, 208768, 213603, 234153 and 263793: a move finishes while
/// the writer does not learn it (the answer to its completion is lost),
/// and a move back onto the first move's source is wanted before the
/// writer's retry brings it the news. The writer then jumped from the
/// placement where that disk was a current member to one where it was a
/// move's target (its node may have freed the copy in between), and had to
/// fill it rather than keep it current (`states.remove(&key)` in
/// `Layout::build`). Since seed 9933 the zone does not let it come to
/// that: a source is no target until the writer settled past the
/// placement without it and its node freed the copy; the move back then
/// fills it from scratch.
///
/// Three nodes: group [a, b], spare s. b is drained (move b → s); the
/// writer fills s, and its completion is made but the answer lost; while
/// its retry waits, b returns to the datastore and s is drained.
///
/// Fails if the planner may make a source a target before its node freed
/// the copy (`finish_moves` listing in `released_groups` only sources that
/// keep other groups): the move s → b is planned while the writer still
/// holds b current. And fails if the move back never finishes.
#[test]
fn a_copy_that_becomes_a_move_target_again_is_filled_again() {
    simulate(|| async {
        let c = Cluster::new(Shape {
            nodes: 3,
            ..Shape::default()
        })
        .await;
        let svc = &c.zone.service;
        let group = c.groups().await[0].clone();
        let (disk_a, disk_b) = (group[0], group[1]);
        let spare = *c
            .disks
            .iter()
            .find(|d| !group.contains(d))
            .expect("a spare disk");
        let v = c.open(false).await;
        v.write(c.offset(0, 0), &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");

        let completes_spare = move |call: &ZoneCall<'_>| matches!(call, ZoneCall::MarkClean(m) if m.complete && m.disk == spare);
        c.zone.add_rule(ZoneRule {
            matches: Box::new(completes_spare),
            action: ZoneAction::LoseAnswer,
            times: Some(1),
        });
        let retry = c.zone.add_rule(ZoneRule {
            matches: Box::new(completes_spare),
            action: ZoneAction::Hold,
            times: Some(1),
        });
        svc.remove_datastore_disk(DS, disk_b)
            .await
            .expect("drain b");
        let planned = svc.plan_moves(&Default::default()).await.expect("plan");
        assert_eq!(planned.len(), 1, "{planned:?}");
        assert!(
            c.until(Duration::from_secs(30), || c.zone.held(retry) == 1)
                .await,
            "the writer fills the spare and completes it"
        );
        let v3 = c.view().await.vdisk.placement;
        assert_eq!(v3.groups[0], [disk_a, spare], "the first move finished");

        svc.add_datastore_disk(DS, disk_b).await.expect("b is back");
        svc.remove_datastore_disk(DS, spare)
            .await
            .expect("drain the spare");
        let planned = svc.plan_moves(&Default::default()).await.expect("plan");
        assert_eq!(planned, Vec::new(), "b's copy is not freed yet");
        c.zone.release(retry);
        // The writer learns the first move and settles past it; b's node
        // frees the copy at a heartbeat; then the move back is planned.
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let planned = svc.plan_moves(&Default::default()).await.expect("plan");
            if let Some(m) = planned.first() {
                assert_eq!((m.mv.from, m.mv.to), (spare, disk_b));
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "the move back onto b was never planned"
            );
            sleep(500).await;
        }

        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let p = c.view().await.vdisk.placement;
            if p.moves.is_empty() {
                assert_eq!(p.groups[0], [disk_a, disk_b]);
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "the move back onto b never finished: the writer is at placement {} \
                 with every copy current ({}), the zone at {p:?}",
                v.placement_version(),
                v.all_current()
            );
            sleep(100).await;
        }
        assert_healed(&c, &v, disk_a, disk_b, Duration::from_secs(30)).await;
    });
}

/// Seed 157397: a copy answers a write, then its machine restarts (losing
/// the write) before the other copy answers; the restart is noticed, the
/// copy recorded stale and its resync begun, all before the write is
/// decided. The copy's answer is from before it failed: the write must
/// make it dirty for the chunk, although it is resyncing by then and
/// "holds" the write.
///
/// Write 2 waits at a after b took it; b's machine restarts and a guest
/// flush (on another handle) notices it; resync fences b (held until the
/// test lets it go) and begins; then a answers write 2.
///
/// Fails if an answer counts as a hold whatever the copy went through
/// since the write went out (the `Ok(()) if c.state.failures() !=
/// failures` arm in `update_piece` removed): write 2 is acknowledged with
/// b not dirty for chunk 0, b becomes current with write 1 there, and the
/// copies differ.
#[test]
fn an_answer_from_before_a_copy_failed_is_no_hold() {
    simulate(|| async {
        let c = Cluster::new(Shape::default()).await;
        let ((disk_a, a), (disk_b, b)) = copy_pair(&c).await;
        let mut config = c.config();
        config.io_timeout = Duration::from_secs(10);
        let v = Volume::open(config).await.expect("open");
        let at = c.offset(0, 0);
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");

        let at_a = a.add_rule_times(Rule::Hold(writes(disk_a, 0)), Some(1));
        let w = {
            let v = v.clone();
            tokio::spawn(async move { v.write(at, &block(2)).await })
        };
        let took = || {
            b.peek(disk_b, c.vdisk, 0)
                .is_some_and(|d| d[..common::BLOCK] == block(2)[..])
        };
        assert!(
            c.until(Duration::from_secs(1), || a.held() == 1 && took())
                .await,
            "write 2 waits at a; b took it"
        );
        let fence = b.add_rule_times(Rule::Hold(fences(disk_b)), Some(1));
        b.lose_power_with(false);
        b.restart();
        v.fork().flush().await.expect("flush");
        let (stale, _) = c.stale(disk_b).await;
        assert!(stale, "the restart was noticed: b is stale");
        assert!(
            c.until(Duration::from_secs(2), || b.held() == 1).await,
            "resync fences b"
        );
        b.release(fence);
        sleep(10).await;
        assert!(!w.is_finished(), "write 2 still waits for a");
        a.release(at_a);
        w.await.expect("the write task").expect("write 2");
        assert_healed(&c, &v, disk_a, disk_b, Duration::from_secs(30)).await;
        a.crash();
        assert_reads(&c, &v, &[(0, 2)], "b").await;
    });
}

/// Seed 263645: the writer dies with a write that only b took (a failed
/// it and the zone did not take the record), and a's copy of another
/// chunk of the same activity-log extent has rotted. The next writer
/// reconciles the extent: reading the rotted chunk fails a, and a is then
/// skipped for the rest of the extent. a may lack what the dead writer
/// had in flight in every chunk it skipped: it must be dirty for them.
///
/// Fails if reconcile skips copies that are not current without
/// recording them dirty (the `missed.push((copy.disk, c))` in
/// `Inner::reconcile` removed): a is resynced for chunk 0 only, and keeps
/// write 2 in chunk 1 where b holds write 3, which the new writer has
/// already read.
#[test]
fn reconcile_makes_a_copy_that_fails_on_the_way_dirty_for_the_rest_of_the_extent() {
    simulate(|| async {
        let c = Cluster::new(Shape::default()).await;
        let ((disk_a, a), (disk_b, b)) = copy_pair(&c).await;
        let old = c.open(false).await;
        old.write(c.offset(0, 0), &block(1)).await.expect("write 1");
        old.write(c.offset(1, 0), &block(2)).await.expect("write 2");
        old.flush().await.expect("flush");
        a.corrupt(disk_a, c.vdisk, 0, 0, false);
        let session = c.view().await.vdisk.lease.expect("open").session;
        c.zone.add_rule(ZoneRule {
            matches: Box::new(
                move |call| matches!(call, ZoneCall::MarkStale(m) if m.session == session),
            ),
            action: ZoneAction::Refuse(ZoneFailure::Unreachable),
            times: None,
        });
        a.add_rule_times(Rule::Fail(writes(disk_a, 1), Status::IoError), Some(1));
        let failed = old.write(c.offset(1, 0), &block(3)).await;
        assert!(failed.is_err(), "write 3 cannot be acknowledged");
        assert_eq!(
            b.peek(disk_b, c.vdisk, 1)
                .map(|d| d[..common::BLOCK] == block(3)[..]),
            Some(true),
            "b took write 3"
        );
        let new = c.open(true).await;
        let seen = read(&new, c.offset(1, 0)).await.expect("read");
        assert!(seen == block(3), "the new writer reads {}", what(&seen));
        assert_healed(&c, &new, disk_a, disk_b, Duration::from_secs(30)).await;
        b.crash();
        let data = read(&new, c.offset(1, 0)).await.expect("read from a");
        assert!(
            data == seen,
            "the new writer read write 3; a returns {}",
            what(&data)
        );
    });
}
