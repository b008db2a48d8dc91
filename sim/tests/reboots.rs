//! A node whose machine restarted lost what its page cache held, however
//! fast it came back: the volume client must learn it from the node's boot
//! identity, before anything is read from that node's copies.

use std::sync::Arc;
use std::time::Duration;

use tessera_replicator::{Volume, VolumeError};
use tessera_sim::harness::{block, run, Cluster, Shape};
use tessera_sim::node::SimNode;
use uuid::Uuid;

const BLOCK: usize = 4096;

async fn read(v: &Volume, offset: u64) -> Result<Vec<u8>, VolumeError> {
    let mut buf = vec![0u8; BLOCK];
    v.read(offset, &mut buf).await.map(|()| buf)
}

/// The node of copy `i` of group 0.
async fn copy_node(c: &Cluster, i: usize) -> (Uuid, Arc<SimNode>) {
    let disk = c.groups().await[0][i];
    (disk, c.node_of(disk).clone())
}

/// Write 1 flushed, then write 2 acknowledged by both copies and not
/// flushed; the node reads go to first reboots at once, losing write 2.
/// The next read must not return write 1.
///
/// Fails if the volume does not fail a rebooted node's copies
/// (`Inner::node_error` accepting the boot without `fail_disk`): the read
/// returns write 1.
#[test]
fn a_reboot_nobody_saw_is_never_read_as_current() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_a, a) = copy_node(&c, 0).await;
        let at = c.offset(0, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        v.write(at, &block(2)).await.expect("write 2");
        a.lose_power_with(false);
        a.restart();
        assert!(
            read(&v, at).await.expect("read") == block(2),
            "read the rebooted copy"
        );
        v.flush().await.expect("flush");
        let (stale, dirty) = c.stale(disk_a).await;
        assert!(
            stale && dirty.contains(&0),
            "the rebooted copy is stale with chunk 0 dirty: {dirty:?}"
        );
        assert!(
            c.until(Duration::from_secs(30), || v.all_current()).await,
            "resynced"
        );
        let mut copy = vec![0u8; BLOCK];
        v.read_copy(at, &mut copy, 0).await.expect("first copy");
        assert!(
            copy == block(2),
            "resync brought write 2 back to the rebooted copy"
        );
    });
}

/// The writer dies with write 2 acknowledged and not flushed; the machine
/// of the copy reads go to first restarts (losing write 2) before a new
/// writer takes over. The new writer reconciles the dead writer's extents:
/// it must take them from the copy that kept write 2.
///
/// Fails if `fence_all` ignores the `Fence` reply's boot flag (a restarted
/// copy stays trusted): the reconcile copies write 1 over write 2 and the
/// read returns write 1.
#[test]
fn a_reboot_between_writers_does_not_win_the_reconcile() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let (disk_a, a) = copy_node(&c, 0).await;
        let at = c.offset(0, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        v.write(at, &block(2)).await.expect("write 2");
        drop(v);
        a.lose_power_with(false);
        a.restart();
        let v = c.open(true).await;
        assert!(
            read(&v, at).await.expect("read") == block(2),
            "write 2 lost"
        );
        let (stale, dirty) = c.stale(disk_a).await;
        assert!(
            stale && dirty.contains(&0),
            "the restarted copy is dirty for the extent: {dirty:?}"
        );
        assert!(
            c.until(Duration::from_secs(30), || v.all_current()).await,
            "resynced"
        );
        for i in 0..2 {
            let mut copy = vec![0u8; BLOCK];
            v.read_copy(at, &mut copy, i).await.expect("copy");
            assert!(copy == block(2), "copy {i} holds write 2");
        }
    });
}

/// Every copy's machine restarted: all lost write 2 alike, and the new
/// writer must still open the vDisk (flushed data is all there is).
///
/// Fails if restarted copies are distrusted even when no copy of the group
/// kept its boot (`trust_restarted` in `fence_all` always false): every
/// copy is recorded stale and the open finds no current copy.
#[test]
fn when_every_copy_restarted_the_vdisk_opens_with_what_was_flushed() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let at = c.offset(0, 0);
        let v = c.open(false).await;
        v.write(at, &block(1)).await.expect("write 1");
        v.flush().await.expect("flush");
        v.write(at, &block(2)).await.expect("write 2");
        drop(v);
        for n in &c.nodes {
            n.lose_power_with(false);
            n.restart();
        }
        let v = c.open(true).await;
        assert!(read(&v, at).await.expect("read") == block(1));
        assert!(
            v.all_current(),
            "no copy is failed for what every copy lost"
        );
    });
}
