//! `repairbench`: how fast Tessera heals, and what the guest sees meanwhile.
//!
//! One zone of real processes on this machine (storage nodes, the API with
//! its move planner and repair worker, `tessera vhost serve` for the
//! vDisk), one `blkio` client on the vhost-user socket standing in for the
//! guest. The client runs a steady 4 KiB random write load at queue depth
//! `--depth` for the whole run, in 1-second slices; each phase reports the
//! bytes the repair copied, how long it took (throughput), and the client's
//! IOPS during it against the healthy baseline:
//!
//! 1. **resync**: the node of one copy is killed for `--down-secs` while the
//!    load runs, then restarted; the copy gets back what it missed.
//! 2. **rebuild**: the node of one copy is killed and removed for good; its
//!    copies are recreated on the spare node.
//! 3. **rebalance**: a new node's disk joins the datastore; the groups that
//!    placement now puts on it move there.
//!
//! Results: a markdown table printed and written to
//! `bench/results/repair-<stamp>.md` (and `repair-latest.md`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use tessera_bench::load::{Client, Job, Pattern};
use tessera_bench::machine::{utc_now, Machine};
use tessera_tests::{TestZone, VhostProcess};
use tessera_zone::records::Vdisk;
use tessera_zone::service::{CreateDatastore, Health, VdiskView};

const MIB: u64 = 1 << 20;

#[derive(Parser)]
#[command(about = "Measures resync, rebuild and rebalance under guest load")]
struct Args {
    /// vDisk size in MiB (written whole before the measurements).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Placement groups of the vDisk (rebalance moves some of them).
    #[arg(long, default_value_t = 8)]
    stripes: u32,
    /// Bandwidth repair may use, MiB/s.
    #[arg(long, default_value_t = 256)]
    bandwidth_mib: u64,
    /// Queue depth of the client's 4 KiB random writes.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// How long the resync phase's node stays down, seconds.
    #[arg(long, default_value_t = 10)]
    down_secs: u64,
    /// Where to write the results.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// One phase's result.
struct Phase {
    name: &'static str,
    what: String,
    bytes: u64,
    secs: f64,
    /// Client IOPS per second-slice while the repair ran.
    iops: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Bench {
    rt: tokio::runtime::Runtime,
    zone: TestZone,
    client: Client,
    job: Job,
    seed: u64,
}

impl Bench {
    /// One second of load; returns its IOPS.
    fn slice(&mut self) -> Result<f64> {
        self.seed += 1;
        let job = Job {
            seed: self.seed,
            ..self.job.clone()
        };
        let m = self.client.run(&job, &mut || {})?;
        if m.errors > 0 {
            let log =
                std::fs::read_to_string(self.zone.dir.path().join("vhost.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("vhost log (last lines, newest first):");
            for l in tail {
                eprintln!("  {l}");
            }
        }
        ensure!(m.errors == 0, "guest I/O error: {:?}", m.first_error);
        Ok(m.iops())
    }

    fn view(&self) -> Result<VdiskView> {
        Ok(self.rt.block_on(self.zone.api.vdisk("ds", "bench"))?)
    }

    /// Runs load slices until `done(view)`; returns the IOPS of each slice
    /// and the seconds until done.
    fn until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&VdiskView) -> bool,
    ) -> Result<(Vec<f64>, f64)> {
        let start = Instant::now();
        let mut iops = Vec::new();
        loop {
            let v = self.view()?;
            if done(&v) {
                return Ok((iops, start.elapsed().as_secs_f64()));
            }
            ensure!(
                start.elapsed() < limit,
                "not done after {limit:?}: moves {:?}, repair {:?}",
                v.vdisk.placement.moves,
                v.repair
            );
            iops.push(self.slice()?);
        }
    }
}

fn settled(v: &VdiskView) -> bool {
    v.health == Health::Healthy && v.vdisk.placement.moves.is_empty() && v.repair.is_empty()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let size = args.size_mib * MIB;
    let disk = 2 * size + 512 * MIB;
    eprintln!(
        "repairbench: starting 3 storage nodes ({} MiB disk files)",
        disk / MIB
    );
    let zone = rt.block_on(TestZone::start_with(3, disk, Duration::from_secs(3600)));
    let first: Vec<uuid::Uuid> = (0..3).map(|i| rt.block_on(zone.disk_of_node(i))).collect();
    rt.block_on(zone.api.create_datastore(&CreateDatastore {
        name: "ds".into(),
        mirrors: 2,
        stripes: Some(args.stripes),
        disks: Some(first),
    }))?;
    let vdisk: Vdisk = rt.block_on(zone.vdisk("ds", "bench", size));
    let _worker = {
        let _in_runtime = rt.enter();
        zone.start_repair_worker()
    };
    let socket = zone.dir.path().join("bench.sock");
    let bw = format!("{}M", args.bandwidth_mib);
    let _vhost = VhostProcess::spawn(
        &zone,
        "ds/bench",
        socket.clone(),
        zone.dir.path().join("vhost.log"),
        1,
        &["--repair-bandwidth", &bw],
    );
    let mut client = Client::connect(&socket, 4 * MIB as usize).context("blkio client")?;
    eprintln!("repairbench: writing the whole {} MiB vDisk", args.size_mib);
    client.run(
        &Job {
            write: true,
            pattern: Pattern::Sequential,
            block_size: MIB as usize,
            depth: 4,
            range: size,
            start: 0,
            warmup: Duration::ZERO,
            duration: None,
            seed: 1,
        },
        &mut || {},
    )?;
    let job = Job {
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: args.depth,
        range: size,
        start: 0,
        warmup: Duration::ZERO,
        duration: Some(Duration::from_secs(1)),
        seed: 2,
    };
    let mut b = Bench {
        rt,
        zone,
        client,
        job,
        seed: 2,
    };
    let mut baseline: Vec<f64> = (0..5).map(|_| b.slice()).collect::<Result<_>>()?;
    let baseline = median(&mut baseline);
    eprintln!("repairbench: healthy baseline {baseline:.0} IOPS");
    let mut phases = Vec::new();
    let chunk = vdisk.placement.chunk_size;

    // 1. Resync: a node down for a while, then back.
    let victim_disk = vdisk.placement.groups[0][1];
    let victim = b.rt.block_on(b.zone.node_of_disk(&victim_disk));
    b.zone.kill_node(victim);
    for _ in 0..args.down_secs {
        b.slice()?;
    }
    let missed: u64 = b.view()?.repair.iter().map(|r| r.dirty_chunks).sum();
    b.zone.start_node(victim);
    let (iops, secs) = b.until(Duration::from_secs(600), settled)?;
    eprintln!("repairbench: resync of {missed} chunks took {secs:.1} s");
    phases.push(Phase {
        name: "resync",
        what: format!(
            "node down {} s under load, then back: {missed} missed chunks copied",
            args.down_secs
        ),
        bytes: missed * chunk,
        secs,
        iops,
    });

    // 2. Rebuild: a node gone for good; a fourth node is the spare.
    let spare = b.zone.add_node();
    let spare_disk = b.rt.block_on(b.zone.disk_of_node(spare));
    b.rt.block_on(b.zone.api.add_datastore_disk("ds", spare_disk))?;
    // The spare may take a rebalance share first: let that settle.
    std::thread::sleep(Duration::from_secs(1));
    b.until(Duration::from_secs(600), settled)?;
    let before = b.view()?.vdisk;
    let lost_disk = before.placement.groups[0][0];
    let lost = b.rt.block_on(b.zone.node_of_disk(&lost_disk));
    let lost_uuid = b.rt.block_on(b.zone.node_uuid(lost));
    b.zone.kill_node(lost);
    // Wait for the zone to see it down, then remove it.
    loop {
        match b.rt.block_on(b.zone.api.remove_node(lost_uuid, false)) {
            Ok(_) => break,
            Err(_) => {
                b.slice()?;
            }
        }
    }
    let groups_lost = before
        .placement
        .groups
        .iter()
        .filter(|g| g.contains(&lost_disk))
        .count() as u64;
    let group_bytes = size / args.stripes as u64;
    let (iops, secs) = b.until(Duration::from_secs(900), settled)?;
    eprintln!("repairbench: rebuild of {groups_lost} groups took {secs:.1} s");
    phases.push(Phase {
        name: "rebuild",
        what: format!(
            "node killed and removed: {groups_lost} of {} groups' copies recreated",
            args.stripes
        ),
        bytes: groups_lost * group_bytes,
        secs,
        iops,
    });

    // 3. Rebalance: a new disk joins.
    let before = b.view()?.vdisk;
    let added = b.zone.add_node();
    let new_disk = b.rt.block_on(b.zone.disk_of_node(added));
    b.rt.block_on(b.zone.api.add_datastore_disk("ds", new_disk))?;
    let started = Instant::now();
    // Give the planner a moment to plan before waiting for the end.
    let mut iops = vec![b.slice()?];
    let (more, secs) = b.until(Duration::from_secs(900), settled)?;
    iops.extend(more);
    let secs = secs + 1.0;
    let after = b.view()?.vdisk;
    let moved = before
        .placement
        .groups
        .iter()
        .zip(&after.placement.groups)
        .filter(|(a, b)| a != b)
        .count() as u64;
    eprintln!(
        "repairbench: rebalance of {moved} groups took {secs:.1} s ({:.1} s wall)",
        started.elapsed().as_secs_f64()
    );
    phases.push(Phase {
        name: "rebalance",
        what: format!(
            "a disk joins: {moved} of {} groups moved onto it",
            args.stripes
        ),
        bytes: moved * group_bytes,
        secs,
        iops,
    });

    // Report.
    let machine = Machine::probe();
    let now = utc_now();
    let machine_line = format!(
        "Machine: {} cores ({}), {:.1} GiB, kernel {}, {}; Tessera {}.",
        machine.nproc,
        machine.cpu_model,
        machine.memory_gib,
        machine.kernel,
        machine.os,
        machine.tessera_commit
    );
    let mut md = format!(
        "# repairbench, {}\n\n{}\n\n`target/release/repairbench --size-mib {} --stripes {} --bandwidth-mib {} --depth {} --down-secs {}`: mirrors=2, a {} MiB vDisk written whole, served by `tessera vhost serve` (1 queue) to one blkio client running 4 KiB random writes at QD{} throughout, in 1 s slices; repair limited to {} MiB/s. Throughput = bytes the repair had to copy / time from the trigger until the vDisk is healthy with no move left (includes detection and the planner's 200 ms period).\n\nHealthy baseline: {:.0} IOPS (median of 5 s).\n\n| phase | what | copied | time | throughput | client IOPS during (median, min–max) | vs baseline |\n|---|---|---|---|---|---|---|\n",
        now.iso(),
        machine_line,
        args.size_mib,
        args.stripes,
        args.bandwidth_mib,
        args.depth,
        args.down_secs,
        args.size_mib,
        args.depth,
        args.bandwidth_mib,
        baseline
    );
    for p in &mut phases {
        let mut v = p.iops.clone();
        let med = median(&mut v);
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        let lo = if v.is_empty() { 0.0 } else { lo };
        md.push_str(&format!(
            "| {} | {} | {} MiB | {:.1} s | {:.0} MiB/s | {:.0} ({:.0}–{:.0}) | {:.2}× |\n",
            p.name,
            p.what,
            p.bytes / MIB,
            p.secs,
            p.bytes as f64 / MIB as f64 / p.secs.max(0.001),
            med,
            lo,
            hi,
            med / baseline.max(1.0)
        ));
    }
    print!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join(format!("repair-{}.md", now.stamp())), &md)?;
    std::fs::write(args.out.join("repair-latest.md"), &md)?;
    Ok(())
}
