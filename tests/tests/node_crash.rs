//! `kill -9` of a storage node in the middle of a stream of writes: every
//! acknowledged write is intact on the surviving copies, and on the killed
//! node's own disk once it restarts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_tests::{pattern, TestZone};

const MIB: u64 = 1 << 20;
const WRITE: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_a_node() {
    let mut zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 3).await;
    let size = 64 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let vol = zone.open("ds", "v").await;
    let victim_disk = vdisk.placement.groups[0][1];
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
                match vol.write(off, &data).await {
                    Ok(()) => acked.lock().unwrap().push(slot),
                    Err(_) => return,
                }
                slot += 4;
            }
        });
    }
    // Let a stream build up, then kill the node mid-stream.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if acked.lock().unwrap().len() >= 150 {
            break;
        }
    }
    zone.kill_node(victim);
    let joined = tokio::time::timeout(Duration::from_secs(30), async {
        while writers.join_next().await.is_some() {}
    })
    .await;
    assert!(joined.is_ok(), "writers stopped after the node died");
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 150, "a stream of writes was acknowledged");
    assert!(
        (acked.len() as u64) < slots,
        "the node died before the stream ended"
    );

    // Surviving copies: copy 0 and copy 2 of the placement.
    let check = |copy: usize| {
        let vol = vol.clone();
        let acked = acked.clone();
        async move {
            for slot in &acked {
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
    check(0).await;
    check(2).await;

    // The killed node restarts with the same command line; its disk opens and
    // holds every acknowledged write too (they were in its page cache).
    zone.start_node(victim);
    zone.wait_nodes_up(3).await;
    check(1).await;
    vol.close().await.expect("close");
}
