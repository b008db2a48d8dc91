//! Out of space: a write that needs space a copy's disk lacks fails, and
//! no copy goes stale for it (`undo_no_space` in
//! `replicator/src/volume/mirror.rs`); an open after a writer crash never
//! fails for a full disk (`reconcile` in `replicator/src/volume/activity.rs`).
//! Deterministic: simulated nodes and the real zone and volume client on
//! one thread with paused time.

mod common;

use std::time::Duration;

use common::{
    copy_node, differing, each_copy, healed, healthy, read, simulate, sleep, what, whats, writes,
    BLOCK,
};
use tessera_replicator::{Volume, VolumeError};
use tessera_sim::harness::{block, run, Cluster, Shape};
use tessera_sim::node::Rule;

/// No copy failed and the zone lists none stale.
async fn all_current(c: &Cluster, v: &Volume) {
    assert!(v.all_current(), "a copy is no longer current");
    let view = c.view().await;
    assert!(
        view.vdisk.stale.is_empty(),
        "the zone lists stale copies: {:?}",
        view.vdisk.stale
    );
}

fn is_no_space(r: &Result<(), VolumeError>) -> bool {
    matches!(r, Err(VolumeError::NoSpace { .. }))
}

/// mirrors=2, one copy's disk full. A write into a chunk that copy does
/// not hold fails with `NoSpace`; the other copy, which took it, gives it
/// back (the chunk reads as zeros on both); both stay current. Writes that
/// need no space (over what is held) succeed meanwhile. Once space is
/// freed, the same write succeeds.
///
/// Fails if a copy without space is failed instead (the write then
/// succeeds on the other copy alone, and the full one goes stale).
#[test]
fn a_write_one_copy_has_no_space_for_fails_and_no_copy_goes_stale() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_x, x) = copy_node(&c, 0, 1).await;
        let held = c.offset(0, 0);
        let fresh = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(held, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");

        x.set_full(disk_x, true);
        let r = v.write(fresh, &block(2)).await;
        assert!(is_no_space(&r), "write 2 needs space X lacks: {r:?}");
        all_current(&c, &v).await;
        assert_eq!(
            whats(&each_copy(&v, fresh).await),
            ["zeros", "zeros"],
            "the copy that took write 2 gave it back"
        );
        v.write(held, &block(3))
            .await
            .expect("an overwrite needs no space");
        v.flush().await.expect("flush");
        assert_eq!(whats(&each_copy(&v, held).await), ["write 3", "write 3"]);

        x.set_full(disk_x, false);
        v.write(fresh, &block(4))
            .await
            .expect("write 4, with space");
        assert_eq!(whats(&each_copy(&v, fresh).await), ["write 4", "write 4"]);
        all_current(&c, &v).await;
    });
}

/// The copy that took a write one copy had no space for gets back exactly
/// what the full copy holds: in a chunk both hold, a write over a held
/// block and a block that reads as zeros (a thin disk allocates it) fails,
/// and the held block reads its old content on both copies again.
///
/// Fails if the rollback is skipped: the copy that took it keeps write 2
/// over write 1 while the full copy keeps write 1.
#[test]
fn a_rolled_back_copy_holds_what_the_full_copy_holds() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_x, x) = copy_node(&c, 0, 1).await;
        let b0 = c.offset(0, 0);
        let b1 = c.offset(0, 1);
        let v = c.open(false).await;
        v.write(b0, &block(1)).await.expect("write 1");

        x.set_full(disk_x, true);
        let mut two = block(2);
        two.extend_from_slice(&block(2));
        let r = v.write(b0, &two).await;
        assert!(is_no_space(&r), "block 1 needs space X lacks: {r:?}");
        assert_eq!(whats(&each_copy(&v, b0).await), ["write 1", "write 1"]);
        assert_eq!(whats(&each_copy(&v, b1).await), ["zeros", "zeros"]);
        all_current(&c, &v).await;
        assert_eq!(what(&read(&v, b0).await.expect("read")), "write 1");
    });
}

/// Every copy full: a write that needs space fails with `NoSpace` at
/// once (not after the wait for a copy to come back), and no copy fails.
///
/// Fails if a write whose copies all refused waits like one short of
/// current copies (`degraded_wait`) before it fails.
#[test]
fn a_write_no_copy_has_space_for_fails_at_once() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let v = c.open(false).await;
        for (i, n) in c.nodes.iter().enumerate() {
            n.set_full(c.disks[i], true);
        }
        let started = tokio::time::Instant::now();
        let r = v.write(c.offset(2, 0), &block(1)).await;
        assert!(is_no_space(&r), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the write took {:?} to fail",
            started.elapsed()
        );
        all_current(&c, &v).await;
        // Zeros need no space.
        v.write_zeroes(c.offset(2, 0), BLOCK as u64)
            .await
            .expect("write-zeroes");
        v.discard(c.offset(2, 0), BLOCK as u64)
            .await
            .expect("discard");
        v.flush().await.expect("flush");
    });
}

/// A writer dies with a write in flight that reached one copy only; then
/// the other copy's disk fills up. The next writer's open reconciles the
/// chunk: the content the first copy holds cannot go to the full one, so
/// both take the full one's instead — the open succeeds, and the copies
/// agree.
///
/// Fails if reconcile gives up on `NoSpace` (the open fails: the vDisk
/// cannot be opened while a disk is full).
#[test]
fn an_open_reconciles_onto_a_full_disk_by_taking_its_content() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_x, x) = copy_node(&c, 0, 1).await;
        let at = c.offset(3, 0);
        let v = c.open(false).await;
        // Chunk 3 is held by both (zeros past its first block).
        v.write(c.offset(3, 5), &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        // Write 2 reaches the first copy; X's node holds it.
        let hold = x.add_rule_times(Rule::Hold(writes(disk_x, 3)), Some(1));
        let w = {
            let v = v.clone();
            tokio::spawn(async move {
                let _ = v.write(at, &block(2)).await;
            })
        };
        assert!(c.until(Duration::from_secs(1), || x.held() == 1).await);
        sleep(5).await;
        w.abort();
        let _ = w.await;
        drop(v);
        // The held write is lost with X's node; its disk is full when it
        // comes back.
        x.crash();
        x.release(hold);
        x.set_full(disk_x, true);
        x.restart();

        let v = c.open(true).await;
        healed(&c, &v).await;
        let copies = whats(&each_copy(&v, at).await);
        assert_eq!(copies[0], copies[1], "the copies differ after the open");
        assert_eq!(copies[0], "zeros", "both took the full copy's content");
        assert_eq!(
            whats(&each_copy(&v, c.offset(3, 5)).await),
            ["write 1", "write 1"]
        );
    });
}

/// One copy's disk is full and the other copy's node holds the write past
/// the I/O timeout, then runs it late: the write fails (`NoSpace`), and
/// the late copy must not keep it once it is current again — it is dirty
/// for the chunk, so resync copies the chunk back from the full copy.
///
/// Fails if the copy that failed with the write in flight is not recorded
/// dirty when the write fails for lack of space (simulation seeds 3188
/// and 4765 on 4 nodes): it resyncs without that chunk and keeps the
/// failed write, which the full copy lacks; reads then change with the
/// copy they are served from.
#[test]
fn a_copy_that_failed_with_a_write_no_space_refused_is_resynced_for_it() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_x, x) = copy_node(&c, 0, 0).await;
        let (disk_y, y) = copy_node(&c, 0, 1).await;
        let at = c.offset(4, 0);
        let v = c.open(false).await;
        v.write(c.offset(4, 3), &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");

        x.set_full(disk_x, true);
        let hold = y.add_rule_times(Rule::Hold(writes(disk_y, 4)), Some(1));
        let r = v.write(at, &block(2)).await;
        assert!(is_no_space(&r), "{r:?}");
        // The request Y held runs now, after it timed out.
        y.release(hold);
        x.set_full(disk_x, false);
        healed(&c, &v).await;
        assert_eq!(
            whats(&each_copy(&v, at).await),
            ["zeros", "zeros"],
            "the write that failed is on neither copy"
        );
        assert_eq!(
            whats(&each_copy(&v, c.offset(4, 3)).await),
            ["write 1", "write 1"]
        );
    });
}

/// Seed 117778 on 4 nodes: a write in flight to the copy a move is taking
/// away, whose disk is full, is refused for space only after the writer
/// adopted the placement without that copy. Nothing is left to roll the
/// write back to; the rule proven here is that every copy of the group
/// that does not hold it is then recorded dirty for the chunk (`missed`
/// in `undo_no_space`), so that healing makes the copies agree.
///
/// Three nodes, mirrors=2: the group is [S, X], T the third disk. X's
/// node dies and write 2 leaves X stale, dirty for chunk 0 only. S is
/// drained: the writer fills T from S, and its call recording T complete
/// is held by the zone (every stripe of the writer held back meanwhile).
/// S's disk fills up, and write 3, into a chunk nothing holds yet, starts
/// on that layout; S's node holds it. The call goes through: T becomes
/// current and takes write 3, the zone finishes the move, and the writer
/// adopts the placement [X, T]. Then S refuses write 3 for space: it fails
/// for the guest, T keeps it, and X, a stale copy that was never sent it,
/// must be dirty for its chunk. X's node comes back, resync heals it, and
/// X and T must then hold the same (and the guest read the same from
/// either).
///
/// Fails if the full copy having left the placement records nothing (the
/// `missed.extend(..)` of 8e8aa7d removed, or `return err` as before it):
/// X resyncs chunk 0 only, keeps zeros where T holds write 3, and the
/// copies differ in chunk 5.
#[test]
fn a_write_refused_for_space_by_a_copy_that_left_the_placement_leaves_no_copy_unrecorded() {
    simulate(|| async {
        let c = Cluster::new(Shape {
            nodes: 3,
            ..Shape::default()
        })
        .await;
        let (s, x) = {
            let group = &c.groups().await[0];
            (group[0], group[1])
        };
        let t = *c
            .disks
            .iter()
            .find(|d| ![s, x].contains(d))
            .expect("a disk outside the group");
        let fresh: u64 = 5;
        let v = c.open(false).await;
        v.write(c.offset(0, 0), &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");

        // X's node dies: X is stale, dirty for chunk 0 only.
        c.node_of(x).crash();
        v.write(c.offset(0, 0), &block(2)).await.expect("write 2");
        v.flush().await.expect("flush");
        assert_eq!(c.stale(x).await, (true, vec![0]), "X stale for chunk 0");

        // The writer's call recording T complete is held once it filled T.
        let complete = common::drain_held_at_completion(&c, s, t).await;
        let before = v.placement_version();

        // Write 3 starts on the layout with S; S is full and holds it.
        let sn = c.node_of(s).clone();
        sn.set_full(s, true);
        let hold = sn.add_rule_times(Rule::Hold(writes(s, fresh)), Some(1));
        let w = tokio::spawn({
            let v = v.clone();
            let at = c.offset(fresh, 0);
            async move { v.write(at, &block(3)).await }
        });
        sleep(50).await;
        assert!(!w.is_finished(), "write 3 waits for the move's completion");

        // The move finishes; the writer adopts the placement without S
        // while S still holds write 3.
        c.zone.release(complete);
        assert!(
            c.until(Duration::from_millis(500), || sn.held() == 1
                && v.placement_version() > before)
                .await,
            "S holds write 3 and the writer adopted the finished move"
        );
        let group = c.groups().await[0].clone();
        assert!(
            group.len() == 2 && group.contains(&x) && group.contains(&t),
            "the move finished: {group:?}"
        );
        let on_t = c.node_of(t).peek(t, c.vdisk, fresh).expect("T's chunk");
        assert_eq!(what(&on_t[..BLOCK]), "write 3", "T took write 3");
        sn.release(hold);
        let r = w.await.expect("the writer task");
        assert!(is_no_space(&r), "S had no space for write 3: {r:?}");
        let (_, x_dirty) = c.stale(x).await;

        // X comes back and is resynced.
        c.node_of(x).restart();
        assert!(
            healthy(&c, &v, Duration::from_secs(30)).await,
            "the vDisk did not become healthy"
        );
        let differ = differing(&c, x, t);
        assert!(
            differ.is_empty(),
            "X and T differ in chunks {differ:?} after healing (X was dirty for {x_dirty:?} \
             after write 3 failed)"
        );
        assert!(
            x_dirty.contains(&fresh),
            "X, which never got write 3, is not dirty for chunk {fresh}: {x_dirty:?}"
        );
        let copies = whats(&each_copy(&v, c.offset(fresh, 0)).await);
        assert_eq!(copies[0], copies[1], "the copies differ");
        assert_eq!(
            what(&read(&v, c.offset(fresh, 0)).await.expect("read")),
            copies[0],
            "the guest reads what both copies hold"
        );
        assert_eq!(
            whats(&each_copy(&v, c.offset(0, 0)).await),
            ["write 2", "write 2"]
        );
    });
}

/// Seeds 609276 and 894820 on 4 nodes: a write that a full copy refused
/// lets go of its stripe lock before it rolls back the copies that took
/// it; resync, filling a drain's target, copies the chunk from a copy
/// that took the write in between. The rollback must reach that target
/// too (`undo_no_space` rolls back every copy that may hold what a
/// holder holds), or the target keeps a write the guest was told failed.
///
/// Three nodes, mirrors=2: the group is [S, X], T the third disk. X's disk
/// fills up and X is drained to T; resync of T is held at chunk 4. Write 2
/// into chunk 5 reaches S (held there) and X refuses it for space. Resync
/// moves on to chunk 5 and waits for the stripe; S answers write 2, the
/// write fails, and resync copies chunk 5 from S before the rollback runs.
///
/// Fails if only the copies that answered the write are rolled back (the
/// `holders.contains` filter alone): T keeps write 2 in chunk 5 while S
/// reads zeros there, and once the move finishes the copies differ.
#[test]
fn a_failed_write_resync_copied_to_a_moves_target_is_rolled_back_there_too() {
    simulate(|| async {
        let c = Cluster::new(Shape {
            nodes: 3,
            ..Shape::default()
        })
        .await;
        let (s, x) = {
            let group = &c.groups().await[0];
            (group[0], group[1])
        };
        let t = *c
            .disks
            .iter()
            .find(|d| ![s, x].contains(d))
            .expect("a disk outside the group");
        let (sn, xn, tn) = (
            c.node_of(s).clone(),
            c.node_of(x).clone(),
            c.node_of(t).clone(),
        );
        let v = c.open(false).await;
        for chunk in [4, 5] {
            v.write(c.offset(chunk, 0), &block(1))
                .await
                .expect("write 1");
        }
        v.flush().await.expect("flush");

        // X fills up and is drained to T; resync of T stops at chunk 4.
        xn.set_full(x, true);
        let resync_at_4 = tn.add_rule_times(Rule::Hold(writes(t, 4)), Some(1));
        let planned = tessera_sim::harness::drain(&c.zone.service, x).await;
        assert_eq!(planned.len(), 1, "{planned:?}");
        assert!(
            c.until(Duration::from_secs(10), || tn.held() == 1).await,
            "resync of T reached chunk 4"
        );

        // Write 2 (a block X does not hold) waits at S; X refuses it.
        let at_s = sn.add_rule_times(Rule::Hold(common::small_writes(s, 5)), Some(1));
        let w = tokio::spawn({
            let v = v.clone();
            let at = c.offset(5, 1);
            async move { v.write(at, &block(2)).await }
        });
        assert!(
            c.until(Duration::from_millis(500), || sn.held() == 1).await,
            "write 2 waits at S"
        );
        // Resync goes on to chunk 5 and waits for its stripe.
        tn.release(resync_at_4);
        sleep(50).await;
        assert!(!w.is_finished(), "write 2 still waits at S");
        sn.release(at_s);
        let r = w.await.expect("the writer task");
        assert!(is_no_space(&r), "X had no space for write 2: {r:?}");

        // The move finishes once T is filled; X leaves the group.
        xn.set_full(x, false);
        assert!(
            healthy(&c, &v, Duration::from_secs(30)).await,
            "the vDisk did not become healthy"
        );
        let group = c.groups().await[0].clone();
        assert!(
            group.len() == 2 && group.contains(&s) && group.contains(&t),
            "the move finished: {group:?}"
        );
        let differ = differing(&c, s, t);
        assert!(
            differ.is_empty(),
            "S and T differ in chunks {differ:?}: T kept a write that failed"
        );
        assert_eq!(
            whats(&each_copy(&v, c.offset(5, 1)).await),
            ["zeros", "zeros"],
            "write 2 failed: no copy holds it"
        );
        assert_eq!(
            whats(&each_copy(&v, c.offset(5, 0)).await),
            ["write 1", "write 1"]
        );
        assert_eq!(
            what(&read(&v, c.offset(5, 1)).await.expect("read")),
            "zeros"
        );
    });
}

/// Seed 881752 on 4 nodes: two copies refuse a write for space, and the
/// first of them, a drain's source, leaves the placement before the
/// refusal is handled. The other full copy stays in the group: the copies
/// that took the write are rolled back to what it holds (any full copy
/// still in the group is the rollback's source), and no copy goes stale.
///
/// Three nodes, mirrors=2: the group is [X, S], T the third disk. X is
/// drained to T, and the writer's call recording T complete is held once
/// it filled T. Both X's and S's disks fill up. Write 2, into a chunk
/// nothing holds, waits at X; S refuses it, T takes it. The call goes
/// through, the writer adopts the placement [S, T], and then X refuses
/// write 2 too.
///
/// Fails if only the first copy that refused is looked for in the group
/// (the rollback source found from `full[0]` alone): X has left, so T
/// keeps write 2 and S, which lacks it and has no space to take it, is
/// recorded dirty — reads of the chunk differ between S and T, and the
/// vDisk does not heal while S is full.
#[test]
fn a_write_two_full_copies_refused_is_rolled_back_to_the_one_that_stays() {
    simulate(|| async {
        let c = Cluster::new(Shape {
            nodes: 3,
            ..Shape::default()
        })
        .await;
        let (x, s) = {
            let group = &c.groups().await[0];
            (group[0], group[1])
        };
        let t = *c
            .disks
            .iter()
            .find(|d| ![s, x].contains(d))
            .expect("a disk outside the group");
        let fresh: u64 = 5;
        let v = c.open(false).await;
        v.write(c.offset(0, 0), &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");

        let complete = common::drain_held_at_completion(&c, x, t).await;
        let before = v.placement_version();
        let (xn, sn) = (c.node_of(x).clone(), c.node_of(s).clone());
        xn.set_full(x, true);
        sn.set_full(s, true);
        let hold = xn.add_rule_times(Rule::Hold(writes(x, fresh)), Some(1));
        let w = tokio::spawn({
            let v = v.clone();
            let at = c.offset(fresh, 0);
            async move { v.write(at, &block(2)).await }
        });
        sleep(50).await;
        assert!(!w.is_finished(), "write 2 waits at X");

        // The move finishes; the writer adopts [S, T] while X holds write 2.
        c.zone.release(complete);
        assert!(
            c.until(Duration::from_millis(500), || xn.held() == 1
                && v.placement_version() > before)
                .await,
            "X holds write 2 and the writer adopted the finished move"
        );
        let group = c.groups().await[0].clone();
        assert!(
            group.len() == 2 && group.contains(&s) && group.contains(&t),
            "the move finished: {group:?}"
        );
        xn.release(hold);
        let r = w.await.expect("the writer task");
        assert!(is_no_space(&r), "X and S had no space for write 2: {r:?}");

        assert_eq!(
            whats(&each_copy(&v, c.offset(fresh, 0)).await),
            ["zeros", "zeros"],
            "write 2 failed: T gave it back"
        );
        all_current(&c, &v).await;
        assert!(
            healthy(&c, &v, Duration::from_secs(30)).await,
            "the vDisk did not become healthy while S is full"
        );
        assert!(differing(&c, s, t).is_empty(), "S and T differ");
        assert_eq!(
            what(&read(&v, c.offset(fresh, 0)).await.expect("read")),
            "zeros"
        );
    });
}
