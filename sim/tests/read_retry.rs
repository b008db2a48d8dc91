//! A read that no copy of its group could serve, while the group's copies
//! are changing, reads again once they changed (`read_piece` in
//! `replicator/src/volume/mirror.rs`, for at most `READ_SETTLE`) instead
//! of failing the guest's read. Deterministic: simulated nodes and the
//! real zone and volume client on one thread with paused time, every fault
//! at a chosen step.
//!
//! The simulation's seeds 13895 and 28885 (mirrors=2, 4 nodes, on 61f69ea,
//! before the retry) failed a guest read so: a move's target had just been
//! filled, the zone had finished the move and told the source's node to
//! free its copy, and this writer, not yet told, read the freed source
//! (which answered `Checksum`: the copy was freed) while the group's other
//! copy was stale and the target, as far as the writer knew, still
//! filling. The zone now frees a copy a newer placement dropped only once
//! the writer settled on that placement (3280288), so that way into the
//! state cannot be driven through the zone any more. The test reaches the
//! same state the other way a current copy answers `Checksum`: a block of
//! the source flipped.

mod common;

use std::time::Duration;

use common::{read, sleep, what};
use tessera_sim::harness::{block, run, Cluster, Shape};

/// Three nodes, mirrors=2: the group is [S, X], T the third disk. X's node
/// dies and write 2 is acknowledged by S alone (X stale). S is drained:
/// the writer fills T from S, and its call recording T complete is held
/// before the zone sees it, so T stays filling for the writer. A block of
/// S then flips, and the guest reads it: S fails the checksum, X is stale,
/// T is not current yet — no copy can serve the read. 200 ms later the
/// call goes through: the zone finishes the move, T becomes current, and
/// the read must return write 2 (from T) within `READ_SETTLE`.
///
/// Fails if `read_piece` makes one pass only (its loop replaced with
/// `self.read_once(v, links, p, out, only).await`): the read fails at
/// once with S's checksum error, although T holds write 2.
#[test]
fn a_read_no_copy_could_serve_reads_again_once_a_moves_target_became_current() {
    run(async {
        let three = Shape {
            nodes: 3,
            ..Shape::default()
        };
        let c = Cluster::new(three).await;
        let group = c.groups().await[0].clone();
        let (s, x) = (group[0], group[1]);
        let t = *c
            .disks
            .iter()
            .find(|d| !group.contains(d))
            .expect("a disk outside the group");
        let at = c.offset(0, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");

        // X's node dies: write 2 is acknowledged by S alone.
        c.node_of(x).crash();
        v.write(at, &block(2)).await.expect("write 2");
        v.flush().await.expect("flush");
        assert!(c.stale(x).await.0, "X is stale");

        // The writer's call recording T complete is held once it filled T.
        let complete = common::drain_held_at_completion(&c, s, t).await;
        assert!(
            c.node_of(t).peek(t, c.vdisk, 0).expect("T holds chunk 0")[..common::BLOCK]
                == block(2)[..],
            "T holds write 2"
        );
        // The writer's view: S the only current copy, X stale, T filling.
        assert_eq!(
            (v.disk_current(s), v.disk_current(x), v.disk_current(t)),
            (true, false, false)
        );

        c.node_of(s).corrupt(s, c.vdisk, 0, 0, false);
        let reader = tokio::spawn({
            let v = v.clone();
            async move { read(&v, at).await }
        });
        sleep(200).await;
        if reader.is_finished() {
            let r = reader.await.expect("the reader");
            panic!(
                "the read ended while no copy could serve it: {:?}",
                r.map(|d| what(&d))
            );
        }

        // The zone finishes the move; the writer makes T current.
        c.zone.release(complete);
        let got = tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("the read ends")
            .expect("the reader")
            .expect("the read succeeds once T is current");
        assert!(got == block(2), "the read returned {}", what(&got));
        assert!(v.disk_current(t), "T is current");
    });
}
