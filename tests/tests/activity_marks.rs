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

/// The 4 KiB block at `offset` of every copy of `vol`, copy by copy.
async fn blocks(vol: &tessera_replicator::Volume, offset: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for copy in 0..vol.copies() {
        let mut buf = vec![0u8; 4096];
        vol.read_copy(offset, &mut buf, copy)
            .await
            .unwrap_or_else(|e| panic!("copy {copy} reads at {offset}: {e}"));
        out.push(buf);
    }
    out
}

/// A crashed writer left a write on one copy only, in an extent it never
/// marked (sent as protocol 4 here: an extent whose mark a node lost is
/// the same to the next writer). One node's marks file is damaged while it
/// is down: that node says "marks lost", and the next open reconciles
/// every extent of the vDisk, not only those the other node lists, so the
/// copies agree again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_reconciles_every_extent_when_a_node_lost_its_marks() {
    let mut zone = TestZone::start(2, 512 * MIB).await;
    zone.datastore("ds", 2).await;
    // Two node extents of 256 chunks.
    let x = activity_extent_chunks();
    let size = (x + 64) * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let a = zone.open("ds", "v").await;
    a.write(MIB, &[0x11; 4096]).await.expect("write");
    a.flush().await.expect("flush");
    let epoch = a.epoch();
    drop(a); // a crash: no close, the marks of extent 0 stay

    // In flight when it crashed: a write into the second extent that
    // reached copy 0 only.
    let copies = vdisk.placement.groups[0].clone();
    let far = (x + 10) * MIB;
    let i0 = zone.node_of_disk(&copies[0]).await;
    let mut raw = Raw::connect(&zone.nodes[i0].listen.to_string(), 4).await;
    assert_eq!(
        raw.write(
            vdisk.uuid,
            copies[0],
            x + 10,
            0,
            &[0x22; 4096],
            tessera_tests::raw::last_wire_epoch(epoch)
        )
        .await,
        Status::Ok
    );
    drop(raw);

    // The other copy's node loses its marks file while it is down.
    let i1 = zone.node_of_disk(&copies[1]).await;
    zone.stop_node(i1);
    let path = zone.nodes[i1].dir.join("activity-marks");
    let len = std::fs::metadata(&path).expect("marks file").len();
    std::fs::write(&path, vec![0xa5u8; len as usize]).expect("damage the marks");
    zone.start_node(i1);
    zone.wait_nodes_up(2).await;

    let mut cfg = zone.volume_config("ds", "v");
    cfg.force = true;
    let b = tessera_replicator::Volume::open(cfg)
        .await
        .expect("the take-over opens");
    assert!(
        b.reconciled_chunks() >= 1,
        "with one node's marks lost, every extent is reconciled: the one-sided write in the extent no surviving mark names was rewritten"
    );
    let far_blocks = blocks(&b, far).await;
    assert!(
        far_blocks.windows(2).all(|w| w[0] == w[1]),
        "the copies differ where the crashed writer's last write reached one copy"
    );
    assert!(
        far_blocks[0] == vec![0x22; 4096] || far_blocks[0] == vec![0; 4096],
        "the reconciled block is the old or the new content"
    );
    assert_eq!(blocks(&b, MIB).await, vec![vec![0x11; 4096]; 2]);
    let epoch = b.epoch();
    b.close().await.expect("close");
    // The clean close cleared the marks as a whole: the node no longer
    // says they are lost.
    let mut raw = Raw::connect(&zone.nodes[i1].listen.to_string(), 5).await;
    let f = raw
        .fence(
            vdisk.uuid,
            copies[1],
            tessera_tests::raw::last_wire_epoch(epoch),
        )
        .await;
    assert!(!f.marks_lost, "the writer's close cleared the lost marks");
    assert_eq!(f.marks, vec![]);
}

/// A crashed writer left a write on one copy only; that copy's node is
/// down when the next writer opens, so the open cannot reconcile it. When
/// the node returns, its fence lists the crashed writer's marks: the
/// returning copy gets those extents resynced from a current copy, and
/// the copies agree again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_copy_gets_the_extents_its_node_marked_for_an_earlier_writer_resynced() {
    let mut zone = TestZone::start(2, 256 * MIB).await;
    zone.datastore("ds", 2).await;
    let vdisk = zone.vdisk("ds", "v", 64 * MIB).await;
    let a = zone.open("ds", "v").await;
    a.write(5 * MIB, &[0x33; 4096]).await.expect("write");
    a.flush().await.expect("flush");
    let epoch = a.epoch();
    drop(a); // a crash
    let copies = vdisk.placement.groups[0].clone();
    let wire = tessera_tests::raw::last_wire_epoch(epoch);

    // The crashed writer had cooled its extents: copy 0's node holds no
    // mark, so the next open has nothing to reconcile there (and nothing
    // to record for the copy it cannot fence).
    let i0 = zone.node_of_disk(&copies[0]).await;
    let mut raw0 = Raw::connect(&zone.nodes[i0].listen.to_string(), 5).await;
    assert_eq!(
        raw0.unmark(vdisk.uuid, copies[0], wire, &[]).await,
        Status::Ok
    );
    drop(raw0);

    // In flight when it crashed: a write that reached copy 1 only (and
    // marked its extent there).
    let i1 = zone.node_of_disk(&copies[1]).await;
    let mut raw = Raw::connect(&zone.nodes[i1].listen.to_string(), 5).await;
    assert_eq!(
        raw.write(vdisk.uuid, copies[1], 7, 0, &[0x44; 4096], wire)
            .await,
        Status::Ok
    );
    drop(raw);
    // Its node goes down before the next writer opens.
    zone.kill_node(i1);
    let mut cfg = zone.volume_config("ds", "v");
    cfg.force = true;
    let b = tessera_replicator::Volume::open(cfg)
        .await
        .expect("the take-over opens with one copy down");
    assert!(
        !b.all_current(),
        "the copy on the node that is down is stale"
    );
    // The node returns; resync fences it and reads its marks.
    zone.start_node(i1);
    zone.wait_nodes_up(2).await;
    let start = std::time::Instant::now();
    while !b.all_current() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the returning copy was not resynced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = blocks(&b, 7 * MIB).await;
    assert!(
        got.windows(2).all(|w| w[0] == w[1]),
        "the returning copy keeps the crashed writer's one-sided write: copies differ"
    );
    assert_eq!(
        blocks(&b, 5 * MIB).await,
        vec![vec![0x33; 4096]; 2],
        "the acknowledged write is on every copy"
    );
    b.close().await.expect("close");
}
