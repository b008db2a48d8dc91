//! `guest-dd`: a guest's `dd` throughput (O_DIRECT) on three vhost-user-blk
//! disks attached to one QEMU (TCG) guest, measured in one run, interleaved:
//!
//! - `m1`: a Tessera vDisk with `mirrors=1` (its copy on this host),
//! - `m2`: a Tessera vDisk with `mirrors=2`,
//! - `qsd`: `qemu-storage-daemon` serving a local raw file (the limit).
//!
//! Each round runs every workload on every disk in turn (A B C A B C …);
//! the table shows the median and the min–max over rounds. Under TCG the
//! guest's own CPU cost dominates: compare the columns, not the absolutes.
//!
//! Run: `cargo build --release --bin tessera --bin guest-dd && target/release/guest-dd [ROUNDS]`

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use tessera_guest_kit::{Guest, GuestConfig, GuestKit, QemuStorageDaemon, VhostDisk};
use tessera_tests::TestZone;

const MIB: u64 = 1 << 20;

const WORKLOADS: [(&str, &str); 4] = [
    ("write-4k", "if=/tmp/p of=DEV bs=4k count=4096 oflag=direct"),
    (
        "read-4k",
        "if=DEV of=/dev/null bs=4k count=4096 iflag=direct",
    ),
    ("write-1M", "if=/tmp/p of=DEV bs=1M count=64 oflag=direct"),
    ("read-1M", "if=DEV of=/dev/null bs=1M count=64 iflag=direct"),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("ROUNDS must be a number")?
        .unwrap_or(3);
    let zone = TestZone::start(2, 1024 * MIB).await;
    zone.datastore("m1", 1).await;
    zone.datastore("m2", 2).await;
    zone.vdisk("m1", "bench", 256 * MIB).await;
    zone.vdisk("m2", "bench", 256 * MIB).await;
    let m1 = zone.spawn_vhost("m1", "bench", 1);
    let m2 = zone.spawn_vhost("m2", "bench", 1);
    let image = zone.dir.path().join("qsd.img");
    std::fs::File::create(&image)?.set_len(256 * MIB)?;
    let qsd = QemuStorageDaemon::start(&image, &zone.dir.path().join("qsd.sock"), 1)?;

    let disks = [("m1", "/dev/vda"), ("m2", "/dev/vdb"), ("qsd", "/dev/vdc")];
    let mut script = String::from("yes TESSERA-BENCH | head -c 67108864 > /tmp/p\n");
    for round in 0..rounds {
        for (workload, args) in WORKLOADS {
            for (name, dev) in disks {
                script.push_str(&format!(
                    "tessera_dd {name}/{workload}/{round} {}\n",
                    args.replace("DEV", dev)
                ));
            }
        }
    }
    let sockets = vec![
        VhostDisk::new(&m1.socket, 1),
        VhostDisk::new(&m2.socket, 1),
        VhostDisk::new(&qsd.socket, 1),
    ];
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        Guest::boot(
            GuestKit::get()?,
            GuestConfig {
                disks: sockets,
                script,
                timeout: Duration::from_secs(1800),
                ..GuestConfig::default()
            },
        )
    })
    .await??;
    outcome.expect_success();

    // label = disk/workload/round
    let mut runs: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in outcome.dd_results() {
        let parts: Vec<&str> = r.label.split('/').collect();
        runs.entry((parts[1].to_string(), parts[0].to_string()))
            .or_default()
            .push(r.mib_per_s());
    }
    let stat = |v: &Vec<f64>| {
        let mut s = v.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        (s[s.len() / 2], s[0], s[s.len() - 1])
    };
    println!("guest dd, O_DIRECT, MiB/s: median (min–max) of {rounds} interleaved rounds");
    println!("| workload | Tessera mirrors=1 | Tessera mirrors=2 | qemu-storage-daemon (local file) | m1/qsd | m2/qsd |");
    println!("|---|---|---|---|---|---|");
    for (workload, _) in WORKLOADS {
        let get = |d: &str| stat(&runs[&(workload.to_string(), d.to_string())]);
        let (a, b, q) = (get("m1"), get("m2"), get("qsd"));
        println!(
            "| {workload} | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) | {:.2} | {:.2} |",
            a.0, a.1, a.2, b.0, b.1, b.2, q.0, q.1, q.2, a.0 / q.0, b.0 / q.0
        );
    }
    drop((m1, m2, qsd));
    Ok(())
}
