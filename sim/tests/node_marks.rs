//! The writer-crash guarantee with the activity log kept by the nodes
//! (protocol version 5): a write marks its extent on every node it reaches
//! before it runs there, the next open reconciles the extents the fence
//! replies list, and a node that lost its marks puts the whole vDisk in
//! doubt. Each test's doc comment names the change that breaks it.

use std::time::Duration;

mod common;

use common::{assert_copies_agree, copy_node, dies_with_a_write_held, sleep, writer_dies};
use tessera_sim::harness::{block, run, Cluster, Shape};
use tessera_sim::node::SimNode;
use tessera_sim::zone::{ZoneAction, ZoneCall, ZoneRule};

/// Whether `node` keeps no mark of the cluster's vDisk (and lost none).
fn unmarked(node: &SimNode, c: &Cluster) -> bool {
    node.marks(c.vdisk).is_some_and(|m| m.is_empty())
}

fn marking() -> Shape {
    Shape {
        node_marks: true,
        ..Shape::default()
    }
}

/// The dead writer's write 2 reached the first copy and was still queued
/// at the second when that node crashed; the zone holds no activity log.
/// The next open must make the copies agree from the nodes' marks.
///
/// Fails if the open ignores the marks its fence replies list (the
/// `marked_extents` of `fence_report` empty): nothing is reconciled and
/// the first copy holds write 2 while the second holds write 1.
#[test]
fn a_dead_writers_extent_is_reconciled_from_the_nodes_marks() {
    run(async {
        let c = Cluster::new(marking()).await;
        let (disk_b, b) = copy_node(&c, 0, 1).await;
        let (_, a) = copy_node(&c, 0, 0).await;
        let at = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        assert!(
            c.view().await.vdisk.activity.is_empty(),
            "the nodes keep the log, not the zone"
        );
        let hold = dies_with_a_write_held(&c, v, &b, disk_b, at).await;
        assert!(
            a.marks(c.vdisk).is_some_and(|m| !m.is_empty()),
            "the first copy's node marked the extent"
        );
        b.crash();
        b.release(hold);
        b.restart();
        let v = c.open(true).await;
        assert!(v.reconciled_chunks() > 0, "the open rewrote a copy");
        assert_copies_agree(&v, at).await;
    });
}

/// The dead writer's write 2 reached the first copy only (the second's
/// node was down, and the writer died before the zone recorded that copy
/// stale); the first copy's node then comes back with its marks lost. The
/// next open cannot know which extent the write was in: it must reconcile
/// the whole vDisk.
///
/// Fails if the open ignores a fence reply's "marks lost" (treated as no
/// marks): the copies differ.
#[test]
fn a_node_that_lost_its_marks_puts_the_whole_vdisk_in_doubt() {
    run(async {
        let c = Cluster::new(marking()).await;
        let (_, a) = copy_node(&c, 0, 0).await;
        let (_, b) = copy_node(&c, 0, 1).await;
        let at = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        // Write 1's marks go once the extent cooled.
        assert!(
            c.until(Duration::from_secs(80), || unmarked(&a, &c)
                && unmarked(&b, &c))
                .await
        );
        // The writer's first call that records a copy stale never ends.
        let stale = c.zone.add_rule(ZoneRule {
            matches: Box::new(|call| matches!(call, ZoneCall::MarkStale(_))),
            action: ZoneAction::Hold,
            times: Some(1),
        });
        b.crash();
        let w = {
            let v = v.clone();
            tokio::spawn(async move {
                let _ = v.write(at, &block(2)).await;
            })
        };
        assert!(
            c.until(Duration::from_secs(10), || c.zone.held(stale) > 0)
                .await,
            "the writer records the second copy stale"
        );
        writer_dies(v, vec![w]).await;
        // Down with its page cache kept; its mark store found damaged.
        a.crash();
        a.lose_marks();
        a.restart();
        b.restart();
        assert_eq!(a.marks(c.vdisk), None, "the first node lost its marks");
        let v = c.open(true).await;
        assert!(v.reconciled_chunks() > 0, "the open rewrote a copy");
        assert_copies_agree(&v, at).await;
        assert!(
            a.marks(c.vdisk).is_some(),
            "once every copy agrees the vDisk is known again"
        );
    });
}

/// An extent the writer stopped writing leaves the nodes' marks once a
/// flush covered it, and a later write marks it again.
///
/// Fails if cooling does not send `Unmark` (or the node ignores it): the
/// marks stay, and every open after a crash reconciles extents long idle;
/// or if an extent cools within 40 s of idleness.
#[test]
fn an_idle_extent_leaves_the_nodes_marks() {
    run(async {
        let c = Cluster::new(marking()).await;
        let (_, a) = copy_node(&c, 0, 0).await;
        let (_, b) = copy_node(&c, 0, 1).await;
        let at = c.offset(1, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        assert!(a.marks(c.vdisk).is_some_and(|m| !m.is_empty()));
        // Not after a guest's usual pause between bursts (a journal commit
        // every 5 s, writeback every 30 s): the next burst would wait for
        // a durable mark on every copy's node again.
        sleep(40_000).await;
        assert!(
            !unmarked(&a, &c) && !unmarked(&b, &c),
            "the extent cooled after 40 s idle: a {:?}, b {:?}",
            a.marks(c.vdisk),
            b.marks(c.vdisk)
        );
        assert!(
            c.until(Duration::from_secs(40), || unmarked(&a, &c)
                && unmarked(&b, &c))
                .await,
            "the marks stay: a {:?}, b {:?}",
            a.marks(c.vdisk),
            b.marks(c.vdisk)
        );
        v.write(at, &block(2)).await.expect("write 2");
        assert!(
            a.marks(c.vdisk).is_some_and(|m| !m.is_empty()),
            "the next write marks the extent again"
        );
    });
}
