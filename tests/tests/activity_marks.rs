//! A storage node keeps activity marks for clients of protocol version 5:
//! a write into an extent not marked for its epoch marks it durably first,
//! a fence lists the vDisk's marks, `Unmark` (fenced like a write) clears
//! them; the marks survive `kill -9`, and a node whose marks file is
//! damaged says so ("marks lost") until the vDisk's writer clears its
//! marks as a whole. Clients of older versions get no marks.

use std::time::Duration;

use tessera_proto::{activity_extent_chunks, Status};
use tessera_tests::raw::Raw;
use tessera_tests::TestZone;
use uuid::Uuid;

const MIB: u64 = 1 << 20;

/// One 4 KiB write of `chunk` at `epoch`.
async fn write(raw: &mut Raw, v: Uuid, d: Uuid, chunk: u64, epoch: u64) -> Status {
    raw.write(v, d, chunk, 0, &[0x5a; 4096], epoch).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_activity_marks_through_kill_and_says_when_it_lost_them() {
    let mut zone = TestZone::start(1, 64 * MIB).await;
    let addr = zone.nodes[0].listen.to_string();
    let disk = zone.disk_of_node(0).await;
    let v = Uuid::new_v4();
    let x = activity_extent_chunks();

    // A version-4 client: its writes leave no marks.
    let mut old = Raw::connect(&addr, 4).await;
    let version = old.version;
    assert_eq!(version, 4);
    old.fence(v, disk, 1 << 24).await;
    assert_eq!(write(&mut old, v, disk, 0, 1 << 24).await, Status::Ok);

    // Version 5: writes into chunk 0 and into the second extent mark both.
    let mut a = Raw::connect(&addr, 5).await;
    let version = a.version;
    assert_eq!(version, 5);
    let e1 = 2 << 24;
    let f = a.fence(v, disk, e1).await;
    assert!(!f.marks_lost);
    assert_eq!(f.marks, vec![], "a version-4 client's write left a mark");
    assert_eq!(write(&mut a, v, disk, 0, e1).await, Status::Ok);
    assert_eq!(write(&mut a, v, disk, 1, e1).await, Status::Ok);
    assert_eq!(write(&mut a, v, disk, x + 3, e1).await, Status::Ok);

    // kill -9: the marks were durable before the writes ran.
    zone.kill_node(0);
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    let mut b = Raw::connect(&addr, 5).await;
    let e2 = 3 << 24;
    let f = b.fence(v, disk, e2).await;
    assert!(!f.marks_lost);
    assert_eq!(f.marks, vec![(0, e1), (1, e1)]);

    // The old writer is fenced: its Unmark clears nothing.
    let mut a = Raw::connect(&addr, 5).await;
    assert_eq!(a.unmark(v, disk, e1, &[0, 1]).await, Status::StaleEpoch);
    // The new writer clears one extent; a write of its own marks it anew.
    assert_eq!(b.unmark(v, disk, e2, &[0]).await, Status::Ok);
    assert_eq!(write(&mut b, v, disk, 5, e2).await, Status::Ok);
    let f = b.fence(v, disk, e2).await;
    assert_eq!(f.marks, vec![(0, e2), (1, e1)]);
    // Every extent at once.
    assert_eq!(b.unmark(v, disk, e2, &[]).await, Status::Ok);
    assert_eq!(b.fence(v, disk, e2).await.marks, vec![]);
    assert_eq!(write(&mut b, v, disk, 2 * x, e2).await, Status::Ok);

    // The marks file damaged while the node is down: lost, and said so.
    zone.stop_node(0);
    let path = zone.nodes[0].dir.join("activity-marks");
    let len = std::fs::metadata(&path).expect("marks file").len();
    std::fs::write(&path, vec![0xa5u8; len as usize]).expect("damage the marks");
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = Raw::connect(&addr, 5).await;
    let e3 = 4 << 24;
    let f = c.fence(v, disk, e3).await;
    assert!(f.marks_lost, "a damaged marks file went unnoticed");
    // Until the writer clears the vDisk's marks as a whole.
    assert_eq!(c.unmark(v, disk, e3, &[7]).await, Status::Ok);
    assert!(c.fence(v, disk, e3).await.marks_lost);
    assert_eq!(c.unmark(v, disk, e3, &[]).await, Status::Ok);
    let f = c.fence(v, disk, e3).await;
    assert!(!f.marks_lost);
    assert_eq!(f.marks, vec![]);
    assert!(zone.node_log(0).contains("activity marks are lost"));
}
