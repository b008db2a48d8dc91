//! Out of space: a write that needs space a copy's disk lacks fails, and
//! no copy goes stale for it (`undo_no_space` in
//! `replicator/src/volume/mirror.rs`); an open after a writer crash never
//! fails for a full disk (`reconcile` in `replicator/src/volume/activity.rs`).
//! Deterministic: simulated nodes and the real zone and volume client on
//! one thread with paused time.

mod common;

use std::time::Duration;

use common::{copy_node, each_copy, healed, read, sleep, what, whats, writes, BLOCK};
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
