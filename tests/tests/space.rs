//! Thin at 4 KiB, as an operator sees it: 16 MiB of 4 KiB writes spread
//! over a thin 1 TiB vDisk with three copies takes 16 MiB on each copy's
//! disk, and the API (what `tessera vdisk show` prints) says so per copy;
//! creating that vDisk on 3 × 128 MiB disks is allowed and noted.

use std::time::{Duration, Instant};

use tessera_tests::{pattern, TestZone};
use tessera_zone::service::CreateVdisk;

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_writes_take_only_their_space_on_every_copy_and_the_api_says_so() {
    let zone = TestZone::start(3, 128 * MIB).await;
    zone.datastore("ds", 3).await;
    let created = zone
        .api
        .create_vdisk(&CreateVdisk {
            datastore: "ds".into(),
            name: "big".into(),
            size: TIB,
        })
        .await
        .expect("a vDisk larger than the datastore is created (thin)");
    let note = created
        .note
        .expect("the creation notes it is larger than the free space");
    assert!(note.contains("thin"), "{note}");

    let vol = zone.open("ds", "big").await;
    const WRITES: u64 = 4096;
    let stride = TIB / WRITES;
    // 32 writers, each its share of the writes in turn.
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..32 {
        let vol = vol.fork();
        tasks.spawn(async move {
            for i in (k..WRITES).step_by(32) {
                // A different chunk each time, at a different place in it.
                let offset = i * stride + (i % 256) * 4096;
                vol.write(offset, &pattern(i, offset, 4096))
                    .await
                    .expect("write");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("writer");
    }
    vol.flush().await.expect("flush");

    // The nodes report within a heartbeat (200 ms here).
    let want = Some(WRITES * 4096);
    let start = Instant::now();
    let view = loop {
        let view = zone.api.vdisk("ds", "big").await.expect("vdisk");
        if view.space.iter().all(|c| c.used == want) || start.elapsed() > Duration::from_secs(20) {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(view.space.len(), 3, "one entry per copy");
    for c in &view.space {
        assert_eq!(
            c.used, want,
            "copy on disk {} takes {:?} bytes for 16 MiB written",
            c.disk, c.used
        );
    }
    // And the datastore counts it (plus the disks' own metadata).
    let ds = zone.api.datastore("ds").await.expect("datastore");
    assert!(
        ds.space.used >= 3 * WRITES * 4096 && ds.space.used < 3 * (WRITES * 4096 + 8 * MIB),
        "datastore used {} bytes",
        ds.space.used
    );
    vol.close().await.expect("close");
}
