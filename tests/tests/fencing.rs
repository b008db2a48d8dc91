//! One writer: a newer open of a vDisk fences the older one on every node.

use tessera_proto::{read_frame, ChunkRange, Request, Status};
use tessera_replicator::{Volume, VolumeError};
use tessera_tests::{pattern, TestZone};
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

/// Sends one write with `epoch` straight to a node and returns its status.
async fn raw_write(addr: &str, vdisk: uuid::Uuid, disk: uuid::Uuid, epoch: u64) -> Status {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let data = vec![0xEEu8; 4096];
    let range = ChunkRange {
        vdisk: *vdisk.as_bytes(),
        disk: *disk.as_bytes(),
        chunk: 0,
        offset: 0,
        len: 4096,
        epoch,
    };
    let mut head = Vec::new();
    let payload = Request::Write(range, &data).encode_head(1, &mut head);
    s.write_all(&head).await.unwrap();
    s.write_all(payload).await.unwrap();
    let frame = read_frame(&mut s).await.unwrap().expect("a reply");
    assert_eq!(frame.header.id, 1);
    frame.header.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_epoch_is_refused_by_every_node() {
    let zone = TestZone::start(3, 128 * MIB).await;
    zone.datastore("ds", 3).await;
    let vdisk = zone.vdisk("ds", "v", 4 * MIB).await;
    let old = zone.open("ds", "v").await;
    old.write(0, &pattern(1, 0, 4096))
        .await
        .expect("first writer writes");

    // A second open without force is refused while the lease is held.
    let refused = Volume::open(zone.volume_config("ds", "v")).await;
    assert!(
        refused.is_err(),
        "second open without force must be refused"
    );

    // Take-over: a forced open bumps the epoch and fences every copy.
    let mut cfg = zone.volume_config("ds", "v");
    cfg.force = true;
    let new = Volume::open(cfg).await.expect("take-over");
    assert!(new.epoch() > old.epoch());

    // The old writer is refused and knows it.
    let err = old.write(0, &pattern(2, 0, 4096)).await.unwrap_err();
    assert!(matches!(err, VolumeError::Fenced { .. }), "{err}");
    assert!(old.is_fenced());
    // It reports the vDisk lost for reads too: no split brain in either direction.
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        old.read(0, &mut buf).await,
        Err(VolumeError::Fenced { .. })
    ));
    assert!(old.write(MIB, &pattern(2, MIB, 4096)).await.is_err());

    // Every node refuses the old epoch on its own, on every copy.
    let nodes = zone.api.nodes().await.unwrap();
    let disks = zone.api.disks().await.unwrap();
    for disk in &vdisk.placement.groups[0] {
        let d = disks.iter().find(|d| d.uuid == *disk).unwrap();
        let n = nodes.iter().find(|n| n.node.uuid == d.node).unwrap();
        let status = raw_write(&n.node.addr, vdisk.uuid, *disk, old.epoch()).await;
        assert_eq!(
            status,
            Status::StaleEpoch,
            "node {} accepted an old epoch",
            n.node.addr
        );
        let status = raw_write(&n.node.addr, vdisk.uuid, *disk, 0).await;
        assert_eq!(status, Status::StaleEpoch);
    }

    // The new writer works and nothing of the old one landed after the take-over.
    let data = pattern(3, 0, 4096);
    new.write(0, &data).await.expect("new writer writes");
    for copy in 0..3 {
        let mut buf = vec![0u8; 4096];
        new.read_copy(0, &mut buf, copy).await.unwrap();
        assert_eq!(buf, data);
        let mut buf = vec![1u8; 4096];
        new.read_copy(MIB, &mut buf, copy).await.unwrap();
        assert!(buf.iter().all(|b| *b == 0), "a fenced write landed");
    }
    new.close().await.unwrap();
}
