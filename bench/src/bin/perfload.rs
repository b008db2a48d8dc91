//! `perfload`: one Tessera system under one steady workload, long enough to
//! profile it, with per-I/O counts of what the servers did.
//!
//! Starts a 3-node [`TestZone`], a `mirrors=N` vDisk served by `tessera
//! vhost serve` (1 queue), prefills it, then runs one workload for
//! `--seconds` after a warm-up. Reports IOPS and, per server process, CPU
//! time and context switches (summed over its threads) per I/O. With
//! `--cmd`, a shell command runs during the measured time, with `{vhost}`,
//! `{nodes}` and `{all}` replaced by the pids (comma lists); it gets SIGINT
//! when the measurement ends (`perf record`, `perf stat`, `strace -c` print
//! their summaries then). With `--vhost-wrap`, the vhost process is started
//! through that command (e.g. `valgrind --tool=callgrind …`), its pid being
//! the wrapper's.
//!
//! Run: `cargo build --release --bin tessera --bin perfload && target/release/perfload --help`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tessera_bench::load::{Client, Job, Pattern};
use tessera_bench::procs::{clock_ticks_per_s, cpu_ticks, machine_busy_ticks};
use tessera_tests::TestZone;

const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(name = "perfload")]
struct Args {
    /// Copies of the vDisk.
    #[arg(long, default_value_t = 3)]
    mirrors: u32,
    /// `read` or `write`.
    #[arg(long, default_value = "write")]
    op: String,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Queue depth.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Bytes of the disk used (MiB).
    #[arg(long, default_value_t = 256)]
    range_mib: u64,
    /// No prefill: the vDisk stays thin and the workload's writes are
    /// first touches until they wrap (with a large `--range-mib`, the
    /// whole-disk case of `blkbench --whole`).
    #[arg(long)]
    no_prefill: bool,
    /// Bytes of each node's disk file (MiB) [default: --range-mib + 512].
    #[arg(long)]
    disk_mib: Option<u64>,
    /// Idle seconds between the prefill and the workload (long enough,
    /// and the vDisk's activity-log extents cool, as between blkbench's
    /// runs of one system).
    #[arg(long, default_value_t = 0.0)]
    idle: f64,
    /// Block size of the prefill (bytes). 1 MiB (as blkbench) leaves the
    /// nodes' page cache in large folios, where every 4 KiB write costs an
    /// ext4 walk over the folio's buffer heads (varies with memory
    /// fragmentation); 4096 leaves small folios and steadier node costs.
    #[arg(long, default_value_t = 1 << 20)]
    prefill_bs: usize,
    /// Shell command run during the measurement ({vhost}, {nodes}, {all}: pids).
    #[arg(long)]
    cmd: Option<String>,
    /// Seconds to wait after starting `--cmd` before measuring (attach time).
    #[arg(long, default_value_t = 0.5)]
    cmd_delay: f64,
    /// Wrapper program for the vhost process: a shell script path that
    /// gets the `tessera` command line as its arguments.
    #[arg(long)]
    vhost_wrap: Option<String>,
    /// Nodes 1 and 2 claim other hosts (TCP), as in blkbench; by default
    /// all three share the vhost process's host (local sessions).
    #[arg(long)]
    remote_peers: bool,
    /// On-disk format of the nodes' disks (2, or 3: 4 KiB thin
    /// allocation); by default the executable's (older ones have no flag).
    #[arg(long)]
    format_version: Option<u32>,
}

/// Voluntary and involuntary context switches of every live thread of `pid`.
fn ctx_switches(pid: u32) -> (u64, u64) {
    let mut v = 0;
    let mut n = 0;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for t in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        for line in s.lines() {
            if let Some(x) = line.strip_prefix("voluntary_ctxt_switches:") {
                v += x.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(x) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                n += x.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    (v, n)
}

struct Sample {
    cpu: Vec<u64>,
    ctx: Vec<(u64, u64)>,
    /// This process's and the whole machine's CPU ticks.
    own: u64,
    machine: u64,
}

fn sample(pids: &[u32]) -> Sample {
    Sample {
        cpu: pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect(),
        ctx: pids.iter().map(|p| ctx_switches(*p)).collect(),
        own: cpu_ticks(std::process::id()).unwrap_or(0),
        machine: machine_busy_ticks().unwrap_or(0),
    }
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let write = match args.op.as_str() {
        "write" => true,
        "read" => false,
        o => bail!("--op {o}: read or write"),
    };
    let range = args.range_mib * MIB;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let disk = args.disk_mib.map_or(range + 512 * MIB, |d| d * MIB);
    let mut zone = match args.format_version {
        Some(v) => rt.block_on(TestZone::start_formatted(3, disk, v)),
        None => rt.block_on(TestZone::start(3, disk)),
    };
    if args.remote_peers {
        zone.restart_node_on_host(1, "perfload-peer-1");
        zone.restart_node_on_host(2, "perfload-peer-2");
        rt.block_on(zone.wait_nodes_up(3));
    }
    let ds = format!("m{}", args.mirrors);
    rt.block_on(async {
        zone.datastore(&ds, args.mirrors).await;
        zone.vdisk(&ds, "bench", range).await;
    });
    let real = zone.bin.clone();
    if let Some(w) = &args.vhost_wrap {
        // Only the vhost process goes through the wrapper.
        std::env::set_var("TESSERA_REAL_BIN", &real);
        zone.bin = w.into();
    }
    let vhost = zone.spawn_vhost(&ds, "bench", 1);
    zone.bin = real;
    let vpid = vhost.pid().context("vhost gone")?;
    let npids: Vec<u32> = zone.nodes.iter().filter_map(|n| n.pid()).collect();
    let mut all = vec![vpid];
    all.extend(&npids);
    eprintln!("perfload: vhost pid {vpid}, node pids {}", join(&npids));

    let mut c = Client::connect(&vhost.socket, 4 << 20)?;
    let prefill = Job {
        write: true,
        pattern: Pattern::Sequential,
        block_size: args.prefill_bs,
        depth: if args.prefill_bs < MIB as usize {
            32
        } else {
            4
        },
        range,
        start: 0,
        warmup: Duration::ZERO,
        duration: None,
        seed: 0,
    };
    if !args.no_prefill {
        let m = c.run(&prefill, &mut || {})?;
        eprintln!("perfload: prefill {:.0} MiB/s", m.mib_per_s());
    }
    std::thread::sleep(Duration::from_secs_f64(args.idle));

    let job = Job {
        write,
        pattern: Pattern::Random,
        block_size: args.bs,
        depth: args.depth,
        range,
        start: 0,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Some(Duration::from_secs_f64(args.seconds)),
        seed: 1,
    };
    let mut child: Option<Child> = None;
    let mut before: Option<(Sample, Instant)> = None;
    let cmd = args.cmd.clone();
    let delay = args.cmd_delay;
    let mut on_measure = || {
        if let Some(cmd) = &cmd {
            let cmd = cmd
                .replace("{vhost}", &vpid.to_string())
                .replace("{nodes}", &join(&npids))
                .replace("{all}", &join(&all));
            eprintln!("perfload: running {cmd}");
            match Command::new("sh")
                .arg("-c")
                .arg(format!("exec {cmd}"))
                .stdin(Stdio::null())
                .spawn()
            {
                Ok(ch) => child = Some(ch),
                Err(e) => eprintln!("perfload: cannot run the command: {e}"),
            }
            std::thread::sleep(Duration::from_secs_f64(delay));
        }
        before = Some((sample(&all), Instant::now()));
    };
    let mut m = c.run(&job, &mut on_measure)?;
    let after = sample(&all);
    if let Some(ch) = &child {
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe {
            libc::kill(ch.id() as libc::pid_t, libc::SIGINT);
        }
    }
    if let Some(mut ch) = child {
        let _ = ch.wait();
    }
    m.sort();
    let (before, _t) = before.context("measurement never started")?;
    let ios = m.ios.max(1) as f64;
    let tick_us = 1e6 / clock_ticks_per_s() as f64;
    println!(
        "{} {} QD{} mirrors={}: {} I/Os in {:.2} s = {:.0} IOPS, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs, errors {}",
        args.op,
        args.bs,
        args.depth,
        args.mirrors,
        m.ios,
        m.elapsed.as_secs_f64(),
        m.iops(),
        m.percentile_us(0.5),
        m.percentile_us(0.99),
        m.percentile_us(0.999),
        m.percentile_us(1.0),
        m.errors
    );
    println!("process          cpu µs/IO   vol cs/IO  invol cs/IO");
    let mut tot = (0.0, 0.0, 0.0);
    for (i, pid) in all.iter().enumerate() {
        let name = if i == 0 {
            "vhost".to_string()
        } else {
            format!("node{}", i - 1)
        };
        let cpu = (after.cpu[i] - before.cpu[i]) as f64 * tick_us / ios;
        let v = after.ctx[i].0.saturating_sub(before.ctx[i].0) as f64 / ios;
        let n = after.ctx[i].1.saturating_sub(before.ctx[i].1) as f64 / ios;
        tot.0 += cpu;
        tot.1 += v;
        tot.2 += n;
        println!("{name:<8} ({pid:>7}) {cpu:>9.1} {v:>11.2} {n:>12.2}");
    }
    println!(
        "total              {:>9.1} {:>11.2} {:>12.2}",
        tot.0, tot.1, tot.2
    );
    println!(
        "client thread cpu {:.2} µs/IO",
        m.client_cpu.as_secs_f64() * 1e6 / ios
    );
    let servers: u64 = (0..all.len()).map(|i| after.cpu[i] - before.cpu[i]).sum();
    let others = (after.machine - before.machine)
        .saturating_sub(servers)
        .saturating_sub(after.own - before.own);
    println!(
        "other load: {:.2} cores",
        others as f64 / clock_ticks_per_s() as f64 / m.elapsed.as_secs_f64()
    );
    drop(c);
    // SIGTERM: a clean exit (a profiler wrapping it writes its output).
    let mut vhost = vhost;
    vhost.stop();
    drop(zone);
    Ok(())
}
