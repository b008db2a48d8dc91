//! `kill -9` of a storage node in the middle of a stream of writes: writes
//! go on on the surviving copies (the dead one is recorded stale first),
//! every acknowledged write is intact on the survivors, the killed node's
//! disk holds every write acknowledged before the kill once it restarts, and
//! its stale copy never serves a read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_tests::{pattern, TestZone};
use tessera_zone::service::Health;

const MIB: u64 = 1 << 20;
const WRITE: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_through_kill_9_of_a_node_and_nothing_acknowledged_is_lost() {
    let mut zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 3).await;
    let size = 64 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let vol = zone.open("ds", "v").await;
    // Copy 0 is the one reads prefer: kill that one.
    let victim_disk = vdisk.placement.groups[0][0];
    let victim = zone.node_of_disk(&victim_disk).await;

    // Four writers, each writing its own offsets (no overwrites), recording
    // what was acknowledged.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let slots = size / WRITE;
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4u64 {
        let vol = vol.clone();
        let acked = acked.clone();
        writers.spawn(async move {
            let mut slot = w;
            while slot < slots {
                let off = slot * WRITE;
                let data = pattern(slot, off, WRITE as usize);
                vol.write(off, &data)
                    .await
                    .map_err(|e| format!("write at {off}: {e}"))?;
                acked.lock().unwrap().push(slot);
                slot += 4;
            }
            Ok::<(), String>(())
        });
    }
    // Let a stream build up, then kill the node mid-stream.
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if acked.lock().unwrap().len() >= 150 {
            break;
        }
    }
    let before_kill = acked.lock().unwrap().clone();
    zone.kill_node(victim);
    let joined = tokio::time::timeout(Duration::from_secs(120), async {
        let mut results = Vec::new();
        while let Some(r) = writers.join_next().await {
            results.push(r.expect("writer task"));
        }
        results
    })
    .await
    .expect("writers finish");
    for r in joined {
        r.expect("no write fails while a majority of copies is alive");
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len() as u64, slots, "every write was acknowledged");
    assert!(
        (before_kill.len() as u64) < slots,
        "the node died mid-stream"
    );

    // The zone knows the dead copy is stale.
    let shown = zone.api.vdisk("ds", "v").await.unwrap();
    assert_eq!(shown.vdisk.stale, vec![victim_disk]);
    assert_eq!(shown.health, Health::Degraded);

    let check = |copy: usize, slots: Vec<u64>| {
        let vol = vol.clone();
        async move {
            for slot in &slots {
                let off = slot * WRITE;
                let mut buf = vec![0u8; WRITE as usize];
                vol.read_copy(off, &mut buf, copy).await.expect("read copy");
                assert!(
                    buf == pattern(*slot, off, WRITE as usize),
                    "acknowledged write at {off} lost on copy {copy}"
                );
            }
        }
    };
    // The survivors hold everything.
    check(1, acked.clone()).await;
    check(2, acked.clone()).await;

    // The killed node restarts with the same command line; its disk opens and
    // holds every write acknowledged before the kill (they were in its page cache).
    zone.start_node(victim);
    zone.wait_nodes_up(3).await;
    check(0, before_kill).await;

    // Its copy is stale and serves no read: the volume reads what was last
    // written, from the current copies, even though copy 0 is preferred.
    for slot in (0..slots).step_by(7) {
        let off = slot * WRITE;
        let mut buf = vec![0u8; WRITE as usize];
        vol.read(off, &mut buf).await.unwrap();
        assert!(
            buf == pattern(slot, off, WRITE as usize),
            "stale read at {off}"
        );
    }
    vol.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_never_serves_a_read() {
    let mut zone = TestZone::start(2, 128 * MIB).await;
    zone.datastore("ds", 2).await;
    let vdisk = zone.vdisk("ds", "v", 8 * MIB).await;
    let preferred = zone.node_of_disk(&vdisk.placement.groups[0][0]).await;
    // No resync here: the returning copy must stay stale for the test.
    let mut cfg = zone.volume_config("ds", "v");
    cfg.repair = false;
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    let old = pattern(1, 0, 2 * MIB as usize);
    vol.write(0, &old).await.unwrap();
    vol.flush().await.unwrap();

    // The copy reads prefer dies; the write goes on with the other copy.
    zone.kill_node(preferred);
    let new = pattern(2, 0, 2 * MIB as usize);
    vol.write(0, &new).await.expect("degraded write");
    vol.flush().await.expect("degraded flush");

    // It comes back holding the old data.
    zone.start_node(preferred);
    zone.wait_nodes_up(2).await;
    let mut buf = vec![0u8; 2 * MIB as usize];
    vol.read_copy(0, &mut buf, 0).await.unwrap();
    assert!(buf == old, "the returning copy holds the old data");

    // Neither this volume nor a new open reads it.
    vol.read(0, &mut buf).await.unwrap();
    assert!(buf == new, "read served by a stale copy");
    vol.close().await.unwrap();
    let mut cfg = zone.volume_config("ds", "v");
    cfg.repair = false;
    let reopened = tessera_replicator::Volume::open(cfg).await.unwrap();
    let mut buf = vec![0u8; 2 * MIB as usize];
    reopened.read(0, &mut buf).await.unwrap();
    assert!(buf == new, "read after reopen served by a stale copy");
    reopened.close().await.unwrap();
}

/// A node whose machine restarted lost what its page cache held. With the
/// writer idle, nothing but the node's boot identity tells: the next request
/// must find it changed and fail the node's copies — dirty for everything
/// written since the last flush — before anything is read from them. A node
/// only killed and restarted (same boot) keeps its copies current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_machine_restarted_while_the_writer_was_idle_is_resynced() {
    let mut zone = TestZone::start(2, 128 * MIB).await;
    zone.datastore("ds", 2).await;
    let vdisk = zone.vdisk("ds", "v", 8 * MIB).await;
    let first = zone.node_of_disk(&vdisk.placement.groups[0][0]).await;
    let disk = vdisk.placement.groups[0][0];
    zone.nodes[first].boot_id = Some(uuid::Uuid::from_u128(1));
    zone.kill_node(first);
    zone.start_node(first);
    zone.wait_nodes_up(2).await;

    let mut cfg = zone.volume_config("ds", "v");
    cfg.repair = false;
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    let flushed = pattern(1, 0, MIB as usize);
    vol.write(0, &flushed).await.unwrap();
    vol.flush().await.unwrap();
    let unflushed = pattern(2, 4 * MIB, MIB as usize);
    vol.write(4 * MIB, &unflushed).await.unwrap();

    // kill -9 and restart in the same boot: the page cache survived.
    zone.kill_node(first);
    zone.start_node(first);
    zone.wait_nodes_up(2).await;
    let mut buf = vec![0u8; MIB as usize];
    vol.read(4 * MIB, &mut buf).await.unwrap();
    assert!(buf == unflushed);
    let v = zone.api.vdisk("ds", "v").await.unwrap();
    assert!(
        v.vdisk.stale.is_empty(),
        "a node restart in the same boot fails no copy: {:?}",
        v.vdisk.stale
    );

    // The machine "reboots": same disk file, a new boot identity.
    zone.kill_node(first);
    zone.nodes[first].boot_id = Some(uuid::Uuid::from_u128(2));
    zone.start_node(first);
    zone.wait_nodes_up(2).await;
    for _ in 0..4 {
        vol.read(4 * MIB, &mut buf).await.unwrap();
        assert!(buf == unflushed);
    }
    // The next flush (or write) records the failed copy in the zone.
    vol.flush().await.unwrap();
    let v = zone.api.vdisk("ds", "v").await.unwrap();
    assert!(
        v.vdisk.stale.contains(&disk),
        "the rebooted node's copy is stale: {:?}",
        v.vdisk.stale
    );
    let dirty: Vec<u64> = v
        .vdisk
        .dirty
        .iter()
        .filter(|e| e.disk == disk)
        .flat_map(|e| e.chunks())
        .collect();
    let chunk = 4 * MIB / vdisk.placement.chunk_size;
    assert!(
        dirty.contains(&chunk),
        "the chunk written since the last flush is dirty on it: {dirty:?}"
    );
    assert!(!dirty.contains(&0), "the flushed chunk is not: {dirty:?}");
    vol.close().await.unwrap();
}
