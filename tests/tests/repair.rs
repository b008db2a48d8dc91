//! Self-healing: a returning node is resynced with only what it missed, in
//! the background, while the volume keeps serving; afterwards every copy is
//! identical and the zone shows the vDisk healthy.

use std::time::{Duration, Instant};

use tessera_tests::{pattern, TestZone};
use tessera_zone::service::Health;

const MIB: u64 = 1 << 20;

async fn wait_healthy(zone: &TestZone, ds: &str, name: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let v = zone.api.vdisk(ds, name).await.unwrap();
        if v.health == Health::Healthy {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "vDisk not healthy after {limit:?}: stale {:?}, repair {:?}",
            v.vdisk.stale,
            v.repair
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_gets_only_what_it_missed() {
    let mut zone = TestZone::start(2, 256 * MIB).await;
    zone.datastore("ds", 2).await;
    let size = 32 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let vol = zone.open("ds", "v").await;
    let mut model = pattern(1, 0, size as usize);
    vol.write(0, &model).await.unwrap();
    vol.flush().await.unwrap();

    // One copy's node dies; the guest writes 3 chunks' worth, then flushes.
    let victim_disk = vdisk.placement.groups[0][1];
    let victim = zone.node_of_disk(&victim_disk).await;
    zone.kill_node(victim);
    let late = pattern(2, 5 * MIB, (2 * MIB + 4096) as usize);
    vol.write(5 * MIB, &late).await.expect("degraded write");
    vol.flush().await.expect("degraded flush");
    model[5 * MIB as usize..5 * MIB as usize + late.len()].copy_from_slice(&late);
    let shown = zone.api.vdisk("ds", "v").await.unwrap();
    assert_eq!(shown.health, Health::Degraded);
    assert_eq!(shown.repair.len(), 1);
    assert_eq!(shown.repair[0].disk, victim_disk);
    assert_eq!(
        shown.repair[0].dirty_chunks, 3,
        "chunks 5, 6 and 7 were missed"
    );

    // It comes back: resync copies the 3 chunks and nothing else.
    zone.start_node(victim);
    zone.wait_nodes_up(2).await;
    wait_healthy(&zone, "ds", "v", Duration::from_secs(30)).await;
    assert_eq!(
        vol.resynced_chunks(),
        3,
        "only the missed chunks are copied"
    );
    assert!(vol.all_current());
    for copy in 0..2 {
        let mut buf = vec![0u8; size as usize];
        vol.read_copy(0, &mut buf, copy).await.unwrap();
        assert!(buf == model, "copy {copy} differs after resync");
    }
    // Writes reach both copies again.
    let again = pattern(3, MIB, 8192);
    vol.write(MIB, &again).await.unwrap();
    for copy in 0..2 {
        let mut buf = vec![0u8; 8192];
        vol.read_copy(MIB, &mut buf, copy).await.unwrap();
        assert_eq!(buf, again);
    }
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_runs_while_writes_go_on_and_resumes_after_a_reopen() {
    let mut zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 3).await;
    let size = 48 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let mut cfg = zone.volume_config("ds", "v");
    cfg.repair_bandwidth = 8 * MIB; // slow, so writes overlap it
    let vol = tessera_replicator::Volume::open(cfg.clone()).await.unwrap();
    let victim_disk = vdisk.placement.groups[0][2];
    let victim = zone.node_of_disk(&victim_disk).await;
    zone.kill_node(victim);
    let mut model = vec![0u8; size as usize];
    for i in 0..40u64 {
        let off = i * MIB + 512 * i;
        let data = pattern(10 + i, off, 64 * 1024);
        vol.write(off, &data).await.unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    vol.flush().await.unwrap();
    zone.start_node(victim);
    zone.wait_nodes_up(3).await;

    // Writes go on while resync runs (some to chunks it already copied).
    for i in 0..40u64 {
        let off = (i * 7 % 48) * MIB + 4096;
        let data = pattern(100 + i, off, 16 * 1024);
        vol.write(off, &data).await.unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vol.flush().await.unwrap();
    // Close before it finishes: the dirty set stays in the zone.
    vol.close().await.unwrap();
    let left = zone.api.vdisk("ds", "v").await.unwrap();
    assert_eq!(
        left.health,
        Health::Degraded,
        "resync was cut short by the close"
    );

    // A new open resumes it.
    cfg.repair_bandwidth = 256 * MIB;
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    wait_healthy(&zone, "ds", "v", Duration::from_secs(60)).await;
    for copy in 0..3 {
        let mut buf = vec![0u8; size as usize];
        vol.read_copy(0, &mut buf, copy).await.unwrap();
        assert!(buf == model, "copy {copy} differs after resync");
    }
    vol.close().await.unwrap();
}

/// Flips a byte of `chunk`'s block `block` in the copy on node `i`'s disk
/// file (the node is stopped meanwhile; its disk is locked while it runs).
async fn corrupt(zone: &mut TestZone, i: usize, vdisk: uuid::Uuid, chunk: u64, block: u64) {
    zone.stop_node(i);
    let offset = {
        let disk = tessera_chunkstore::Disk::open(&zone.nodes[i].disk).unwrap();
        disk.block_offset(vdisk, chunk, block as u32)
            .expect("block allocated")
    };
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&zone.nodes[i].disk)
        .unwrap();
    let at = offset + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5A;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
    zone.start_node(i);
    zone.wait_nodes_up(zone.nodes.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_read_around_repaired_and_found_by_scrub() {
    let mut zone = TestZone::start(2, 128 * MIB).await;
    zone.datastore("ds", 2).await;
    let size = 8 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let data = pattern(7, 0, size as usize);
    let vol = zone.open("ds", "v").await;
    vol.write(0, &data).await.unwrap();
    vol.close().await.unwrap();
    let first = zone.node_of_disk(&vdisk.placement.groups[0][0]).await;

    // 1. A read meets a bad block on the preferred copy: it gets correct
    //    data from the other copy, and the bad copy is rewritten.
    corrupt(&mut zone, first, vdisk.uuid, 4, 3).await;
    let vol = zone.open("ds", "v").await;
    let mut buf = vec![0u8; MIB as usize];
    vol.read(4 * MIB, &mut buf)
        .await
        .expect("read around the bad block");
    assert!(
        buf == data[4 * MIB as usize..5 * MIB as usize],
        "the reader got correct data"
    );
    let start = Instant::now();
    while !vol.all_current() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bad copy not repaired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(vol.resynced_chunks(), 1);
    vol.read_copy(4 * MIB, &mut buf, 0)
        .await
        .expect("the copy reads again");
    assert!(
        buf == data[4 * MIB as usize..5 * MIB as usize],
        "the bad copy was rewritten"
    );
    vol.close().await.unwrap();

    // 2. Silent corruption nobody reads: `tessera scrub` finds and repairs it.
    corrupt(&mut zone, first, vdisk.uuid, 2, 0).await;
    let out = std::process::Command::new(tessera_tests::tessera_bin())
        .args(["--api", &zone.url, "--token-file"])
        .arg(&zone.token_file)
        .args(["scrub", "ds/v"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 checksum errors"), "{text}");
    assert!(text.contains("chunk 2"), "{text}");
    assert!(text.contains("1 copies repaired"), "{text}");
    let vol = zone.open("ds", "v").await;
    for copy in 0..2 {
        let mut all = vec![0u8; size as usize];
        vol.read_copy(0, &mut all, copy).await.unwrap();
        assert!(all == data, "copy {copy} differs after scrub");
    }
    let again = vol.scrub().await.unwrap();
    assert!(again.checksum_errors.is_empty() && again.mismatches.is_empty());
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vdisk_deleted_while_a_node_was_down_stays_deleted_and_its_space_is_freed() {
    let mut zone = TestZone::start(2, 128 * MIB).await;
    zone.datastore("ds", 2).await;
    let vdisk = zone.vdisk("ds", "v", 16 * MIB).await;
    let vol = zone.open("ds", "v").await;
    vol.write(0, &pattern(1, 0, 8 * MIB as usize))
        .await
        .unwrap();
    vol.close().await.unwrap();
    let away_disk = vdisk.placement.groups[0][1];
    let away = zone.node_of_disk(&away_disk).await;
    let used = |disks: &[tessera_zone::records::Disk], d: uuid::Uuid| {
        disks.iter().find(|x| x.uuid == d).map(|x| x.used).unwrap()
    };
    // Heartbeats report usage: 8 chunks on each copy.
    let start = Instant::now();
    while used(&zone.api.disks().await.unwrap(), away_disk) < 8 * MIB {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    zone.kill_node(away);
    zone.api.delete_vdisk("ds", "v", false).await.unwrap();
    zone.start_node(away);
    zone.wait_nodes_up(2).await;

    // The returning node learns the vDisk is gone and frees its space; the
    // vDisk does not come back.
    let start = Instant::now();
    loop {
        let disks = zone.api.disks().await.unwrap();
        if used(&disks, away_disk) == 0 && used(&disks, vdisk.placement.groups[0][0]) == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "space not freed: {disks:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(zone.api.vdisk("ds", "v").await.is_err());
    assert!(zone.api.vdisks(None).await.unwrap().is_empty());
    // Its disk file no longer holds the vDisk's chunks.
    zone.stop_node(away);
    let disk = tessera_chunkstore::Disk::open(&zone.nodes[away].disk).unwrap();
    assert!(disk.chunks(vdisk.uuid).is_empty());
    assert!(disk.vdisks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_write_leaves_copies_that_the_next_open_reconciles() {
    use tessera_tests::blk::{BlkClient, Op};
    let zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 3).await;
    let size = 64 * MIB;
    zone.vdisk("ds", "v", size).await;
    let mut vhost = zone.spawn_vhost("ds", "v", 1);
    let socket = vhost.socket.clone();
    // A client keeps 32 writes of 256 KiB in flight, over and over.
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let rounds = rounds.clone();
        // The client may block for good once its backend is gone: the
        // thread is left behind, not joined.
        std::thread::spawn(move || {
            let mut c = BlkClient::connect(&socket, 1, 8 << 20).expect("connect");
            let mut q = c.queue();
            for (i, b) in q.mem().iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            for round in 0u64.. {
                let ops: Vec<Op> = (0..32u64)
                    .map(|i| Op::Write {
                        offset: ((round * 32 + i) * 256 * 1024 * 7) % (size - 256 * 1024),
                        buf: (i as usize % 32) * 256 * 1024,
                        len: 256 * 1024,
                    })
                    .collect();
                if q.run(&ops).iter().any(|r| r.is_err()) {
                    return;
                }
                rounds.store(round + 1, std::sync::atomic::Ordering::Release);
            }
        });
    }
    let start = Instant::now();
    while rounds.load(std::sync::atomic::Ordering::Acquire) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "writes do not flow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // kill -9 the backend mid-stream.
    vhost.kill();
    let left = zone.api.vdisk("ds", "v").await.unwrap();
    assert!(
        left.vdisk.activity.is_empty(),
        "the writer made no zone call for its activity log: its nodes keep it"
    );
    // Every copy's node holds the dead writer's marks (one extent: the
    // vDisk is smaller than an extent).
    let copies = left.vdisk.placement.groups[0].clone();
    let last = tessera_tests::raw::last_wire_epoch(left.vdisk.epoch);
    let mut nodes = Vec::new();
    for disk in &copies {
        let i = zone.node_of_disk(disk).await;
        let mut raw = tessera_tests::raw::Raw::connect(&zone.nodes[i].listen.to_string(), 5).await;
        let f = raw.fence(left.vdisk.uuid, *disk, last).await;
        assert_eq!(
            f.marks.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![0],
            "copy on disk {disk}: its node's marks"
        );
        nodes.push((i, *disk));
    }
    // A write the dead writer had in flight that reached one copy only
    // (sent without marking: protocol 4), in a block of its own.
    let one_sided: Vec<u8> = (0..4096).map(|i| ((7 + i) % 251) as u8).collect();
    let (i, disk) = nodes[0];
    let mut raw = tessera_tests::raw::Raw::connect(&zone.nodes[i].listen.to_string(), 4).await;
    assert_eq!(
        raw.write(left.vdisk.uuid, disk, 5, 4096 * 3, &one_sided, last)
            .await,
        tessera_proto::Status::Ok
    );

    // The next open (a take-over: the dead backend's lease has not expired)
    // reconciles the marked extents before serving.
    let mut cfg = zone.volume_config("ds", "v");
    cfg.force = true;
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    assert!(
        vol.reconciled_chunks() >= 1,
        "the one-sided write was reconciled"
    );
    assert!(vol.reconciled_chunks() <= 64 * 3);
    let mut first = vec![0u8; size as usize];
    vol.read_copy(0, &mut first, 0).await.unwrap();
    for copy in 1..3 {
        let mut buf = vec![0u8; size as usize];
        vol.read_copy(0, &mut buf, copy).await.unwrap();
        assert!(
            buf == first,
            "copy {copy} differs from copy 0 after the reopen"
        );
    }
    // Every 4 KiB block is either untouched or one whole written block.
    for block in first.chunks(4096) {
        let zero = block.iter().all(|b| *b == 0);
        let written = block
            .iter()
            .enumerate()
            .all(|(i, b)| *b == ((block[0] as usize + i) % 251) as u8);
        assert!(zero || written, "a block mixes old and new data");
    }
    let epoch = vol.epoch();
    vol.close().await.unwrap();
    // A clean close leaves no mark behind.
    for (i, disk) in nodes {
        let mut raw = tessera_tests::raw::Raw::connect(&zone.nodes[i].listen.to_string(), 5).await;
        let f = raw
            .fence(
                left.vdisk.uuid,
                disk,
                tessera_tests::raw::last_wire_epoch(epoch),
            )
            .await;
        assert_eq!(
            f.marks,
            vec![],
            "marks left on disk {disk}'s node after a clean close"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_scrub_repairs_a_copy_nobody_reads() {
    let mut zone = TestZone::start(2, 128 * MIB).await;
    zone.datastore("ds", 2).await;
    let vdisk = zone.vdisk("ds", "v", 4 * MIB).await;
    let data = pattern(9, 0, 4 * MIB as usize);
    let vol = zone.open("ds", "v").await;
    vol.write(0, &data).await.unwrap();
    vol.close().await.unwrap();
    let second = zone.node_of_disk(&vdisk.placement.groups[0][1]).await;
    corrupt(&mut zone, second, vdisk.uuid, 3, 7).await;

    let mut cfg = zone.volume_config("ds", "v");
    cfg.scrub_interval = Some(Duration::from_secs(1));
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    let start = Instant::now();
    while vol.resynced_chunks() == 0 || !vol.all_current() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "background scrub did not repair"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf = vec![0u8; MIB as usize];
    vol.read_copy(3 * MIB, &mut buf, 1).await.unwrap();
    assert!(buf == data[3 * MIB as usize..4 * MIB as usize]);
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_minimum_a_write_waits_a_bounded_time_then_fails_or_completes_when_a_copy_returns(
) {
    let mut zone = TestZone::start(3, 128 * MIB).await;
    zone.datastore("ds", 3).await;
    let vdisk = zone.vdisk("ds", "v", 8 * MIB).await;
    let mut cfg = zone.volume_config("ds", "v");
    cfg.degraded_wait = Duration::from_secs(2);
    cfg.io_timeout = Duration::from_secs(2);
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    vol.write(0, &pattern(1, 0, 4096)).await.unwrap();
    let a = zone.node_of_disk(&vdisk.placement.groups[0][1]).await;
    let b = zone.node_of_disk(&vdisk.placement.groups[0][2]).await;
    zone.kill_node(a);
    zone.kill_node(b);

    // mirrors=3 needs 2 current copies: with one left, the write waits, then fails.
    let start = Instant::now();
    let err = vol.write(MIB, &pattern(2, MIB, 4096)).await.unwrap_err();
    assert!(
        matches!(
            err,
            tessera_replicator::VolumeError::Degraded { needed: 2, .. }
        ),
        "{err}"
    );
    assert!(start.elapsed() >= Duration::from_secs(2), "it waited");
    assert!(start.elapsed() < Duration::from_secs(10), "a bounded time");
    // Nor can the final flush make anything stable on two copies: close
    // says so, and still releases the lease (keeping the activity log).
    let err = vol.close().await.unwrap_err();
    assert!(
        matches!(
            err,
            tessera_replicator::VolumeError::Degraded { needed: 2, .. }
        ),
        "{err}"
    );
    let view = zone.api.vdisk("ds", "v").await.unwrap();
    assert!(view.vdisk.lease.is_none(), "the lease is released");
    // The activity log is kept: its marks stay on the nodes.
    let disk = view.vdisk.placement.groups[0]
        .iter()
        .copied()
        .find(|d| !view.vdisk.stale.contains(d))
        .expect("a copy not stale");
    let i = zone.node_of_disk(&disk).await;
    let mut raw = tessera_tests::raw::Raw::connect(&zone.nodes[i].listen.to_string(), 5).await;
    let f = raw
        .fence(
            view.vdisk.uuid,
            disk,
            tessera_tests::raw::last_wire_epoch(view.vdisk.epoch),
        )
        .await;
    assert!(!f.marks.is_empty(), "the activity log is kept");

    // With a longer wait, a node that returns meanwhile is resynced and the
    // write completes on it.
    let mut cfg = zone.volume_config("ds", "v");
    cfg.degraded_wait = Duration::from_secs(30);
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    let data = pattern(3, 2 * MIB, 4096);
    let writer = {
        let vol = vol.clone();
        let data = data.clone();
        tokio::spawn(async move { vol.write(2 * MIB, &data).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!writer.is_finished(), "the write waits for a second copy");
    zone.start_node(a);
    zone.wait_nodes_up(2).await;
    writer
        .await
        .unwrap()
        .expect("the write completes once a copy is back");
    let mut buf = vec![0u8; 4096];
    vol.read(2 * MIB, &mut buf).await.unwrap();
    assert_eq!(buf, data);
    vol.close().await.unwrap();
}

/// A node whose block map is lost (format 3: both checkpoint areas damaged
/// while it was down) no longer knows where any chunk is. Its fence answer
/// says so: the writer rebuilds the whole copy from the other one (every
/// chunk, the never-written one too), tells the node, and both copies read
/// back what was written. The next open rebuilds nothing.
///
/// Fails if the doubt is not reported or not acted on (the copy stays
/// current and its chunks read as errors), or if the node is not told (the
/// next open rebuilds the whole copy again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_block_map_gets_its_whole_copy_rebuilt_v3() {
    let mut zone = TestZone::start_formatted(2, 128 * MIB, 3).await;
    zone.datastore("ds", 2).await;
    let size = 8 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let mut data = pattern(11, 0, size as usize);
    data[7 * MIB as usize..].fill(0);
    let vol = zone.open("ds", "v").await;
    vol.write(0, &data[..7 * MIB as usize]).await.unwrap();
    vol.close().await.unwrap();

    let victim = zone.node_of_disk(&vdisk.placement.groups[0][0]).await;
    zone.stop_node(victim);
    let areas = tessera_chunkstore::Disk::open(&zone.nodes[victim].disk)
        .unwrap()
        .checkpoint_areas()
        .expect("a format-3 disk");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&zone.nodes[victim].disk)
            .unwrap();
        for area in areas {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, area + 100).unwrap();
            b[0] ^= 0x5A;
            f.write_all_at(&b, area + 100).unwrap();
        }
        f.sync_all().unwrap();
    }
    zone.start_node(victim);
    zone.wait_nodes_up(2).await;

    let vol = zone.open("ds", "v").await;
    wait_healthy(&zone, "ds", "v", Duration::from_secs(60)).await;
    assert!(vol.all_current());
    assert_eq!(vol.resynced_chunks(), 8, "the whole copy is rebuilt");
    for copy in 0..2 {
        let mut buf = vec![0u8; size as usize];
        vol.read_copy(0, &mut buf, copy)
            .await
            .unwrap_or_else(|e| panic!("copy {copy}: {e}"));
        assert!(buf == data, "copy {copy} differs after the rebuild");
    }
    vol.close().await.unwrap();

    let vol = zone.open("ds", "v").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(vol.all_current());
    assert_eq!(
        vol.resynced_chunks(),
        0,
        "the node was told: nothing to rebuild"
    );
    assert_eq!(
        zone.api.vdisk("ds", "v").await.unwrap().health,
        Health::Healthy
    );
    vol.close().await.unwrap();
}
