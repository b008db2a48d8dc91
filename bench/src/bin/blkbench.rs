//! `blkbench`: Tessera against the references on this machine, one
//! vhost-user-blk client for all, interleaved.
//!
//! Systems (ids for `--only`):
//!
//! - `qsd`: the limit — `qemu-storage-daemon` serving a preallocated local
//!   raw file (`file` driver, `cache.direct=off`);
//! - `qsd-direct`: the same file with `cache.direct=on` and `aio=native`;
//! - `quorum`: the peer — `qemu-storage-daemon` with a `quorum` blockdev
//!   (vote-threshold 2, read-pattern fifo) over three `nbd` children, each a
//!   `qemu-nbd` serving its own preallocated raw file;
//! - `nbd`: one `nbd` child alone (one network copy);
//! - `ceph` (only with `--ceph`): a 3-replica Ceph RBD image (one monitor,
//!   one manager, three BlueStore OSDs on files, set up by
//!   `bench/ceph/setup.sh`), served by `qemu-storage-daemon`'s `rbd` driver;
//! - `m1`, `m2`, `m3`: Tessera vDisks with `mirrors=1/2/3` on a 3-node
//!   [`TestZone`], each served by its own `tessera vhost serve` (1 queue).
//!   Node 0 is on the vhost process's host (a local session: guest memory
//!   shared with the node); nodes 1 and 2 claim other hosts, so they are
//!   reached over TCP (loopback), as peers on other machines would be. `m1`
//!   keeps its one copy on node 0 (a datastore of that disk alone: the local
//!   disk an operator gives a mirrors=1 vDisk); `m2` and `m3` use all three;
//! - `b1`, `b2`, `b3` (only with `--base-bin PATH`): Tessera base, the same
//!   as `m1`–`m3` but served entirely by an older `tessera` executable (its
//!   storage nodes and its `vhost serve` processes), on a second 3-node zone
//!   of the same shape. Both zones' management API runs in this process: it
//!   is the current code's, which the base executables reach over HTTP.
//!
//! Every system is exported over vhost-user-blk and driven by the same
//! client (the `blkio` crate's `virtio-blk-vhost-user` driver, one queue,
//! see `tessera_bench::load`). Workloads: 4 KiB random read and write at
//! queue depth 1 and 32, 1 MiB sequential read and write at depth 4, over
//! `[0, range)` of each disk, which is written once (1 MiB sequential, one
//! writer, 64 MiB of each system in turn) before anything is measured. Each
//! repetition runs every workload on every system in turn (A B C A B C …,
//! a base system next to its new counterpart, after it in even repetitions
//! and before it in odd ones); the report gives medians and
//! min–max over repetitions, with the servers' CPU time per I/O (user + sys
//! of every server process, from `/proc/PID/stat`).
//!
//! A/B: the host's speed drifts (by more than 20% within half an hour on a
//! shared machine), so today's Tessera is compared with an older build in
//! the same run rather than with an old results file: `--base-bin` adds
//! `b1`–`b3`, measured in the same repetitions as everything else, and the
//! report gives `mN/bN` columns and a "New against base" section (medians,
//! ratios normalised by the limit and the peer, and per-repetition paired
//! ratios `mN`/`bN`, which cancel the drift best). An A/B run leaves
//! `blkbench-latest.md` alone: it is not the new baseline.
//!
//! Run: `cargo build --release --bin tessera --bin blkbench && target/release/blkbench`
//! (see `--help`). Results go to `bench/results/`. A/B against an older
//! build: `target/release/blkbench --base-bin /path/to/old/tessera` (with
//! `--only`, list the base systems too: `--only qsd,quorum,m1,m2,m3,b1,b2,b3`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use tessera_bench::load::{Client, Job, Measured, Pattern};
use tessera_bench::machine::{utc_now, Machine};
use tessera_bench::procs::{preallocated_file, shell_quote, CpuSample, Ready, Server, Watched};
use tessera_tests::{free_port, TestZone, VhostProcess, TEST_HOST};
use tessera_zone::service::CreateDatastore;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Tessera's block-storage benchmark against qemu-storage-daemon (local
/// file), QEMU's quorum over qemu-nbd, Ceph RBD and Tessera mirrors=1/2/3
/// (and an older Tessera build with `--base-bin`).
#[derive(Parser, Debug)]
#[command(name = "blkbench")]
struct Args {
    /// Repetitions: each runs every workload on every system in turn.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured seconds at the start of each run.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Bytes of each disk used (K, M, G suffixes), written before measuring.
    #[arg(long, default_value = "1G")]
    range: String,
    /// Only these systems (comma list of qsd, qsd-direct, quorum, nbd, ceph,
    /// m1, m2, m3, b1, b2, b3); `ceph` also needs `--ceph`, `b1`-`b3` need
    /// `--base-bin` (and are not added for the `m` systems listed: list them).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these workloads (comma list of 4k-randread-qd1,
    /// 4k-randwrite-qd1, 4k-randread-qd32, 4k-randwrite-qd32,
    /// 1m-seqread-qd4, 1m-seqwrite-qd4).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Also measure Ceph RBD 3× (installs Debian's Ceph packages if missing;
    /// ~2 min of setup, ~4.5 GiB of memory, 30 GiB of OSD block files).
    #[arg(long)]
    ceph: bool,
    /// Directory for the results (`blkbench-<date>.md/.json`, and
    /// `blkbench-latest.md` unless `--base-bin`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// How quorum and nbd reach qemu-nbd: `unix` sockets or loopback `tcp`.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "unix"])]
    nbd_transport: String,
    /// A/B: an older `tessera` executable to compare with. Adds the systems
    /// `b1`, `b2`, `b3` (Tessera base mirrors=1/2/3): a second 3-node zone
    /// whose storage nodes and `vhost serve` processes run this executable
    /// (the zone's API is this build's, in process), measured in the same
    /// repetitions as the rest. An A/B run does not write `blkbench-latest.md`.
    #[arg(long, value_name = "PATH")]
    base_bin: Option<PathBuf>,
    /// What to call the base in the report (e.g. its commit) [default: the
    /// path of `--base-bin`].
    #[arg(long, value_name = "TEXT", requires = "base_bin")]
    base_label: Option<String>,
    /// The on-disk format of this build's nodes' disk files (2 or 3)
    /// [default: the node's, 3]; the base's zone keeps its own default.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=3))]
    format_version: Option<u32>,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => MIB,
                'G' => GIB,
                'T' => GIB << 10,
                _ => bail!("unknown size suffix in {s:?}"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: f64 = num.parse().with_context(|| format!("size {s:?}"))?;
    Ok((n * mult as f64) as u64)
}

// ---------------------------------------------------------------- workloads

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    title: &'static str,
    write: bool,
    pattern: Pattern,
    block_size: usize,
    depth: usize,
}

impl Workload {
    /// Reported in MiB/s (else IOPS).
    fn bandwidth(&self) -> bool {
        self.block_size >= MIB as usize
    }
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "4k-randread-qd1",
        title: "4k randread QD1",
        write: false,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 1,
    },
    Workload {
        name: "4k-randwrite-qd1",
        title: "4k randwrite QD1",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 1,
    },
    Workload {
        name: "4k-randread-qd32",
        title: "4k randread QD32",
        write: false,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
    },
    Workload {
        name: "4k-randwrite-qd32",
        title: "4k randwrite QD32",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
    },
    Workload {
        name: "1m-seqread-qd4",
        title: "1M seqread QD4",
        write: false,
        pattern: Pattern::Sequential,
        block_size: 1 << 20,
        depth: 4,
    },
    Workload {
        name: "1m-seqwrite-qd4",
        title: "1M seqwrite QD4",
        write: true,
        pattern: Pattern::Sequential,
        block_size: 1 << 20,
        depth: 4,
    },
];

/// Shared memory per client: the largest `depth × block size`.
const CLIENT_MEM: usize = 4 << 20;

// ------------------------------------------------------------------ systems

/// Every system, in report order (and in the order each workload runs on
/// them): (id, label).
const SYSTEMS: [(&str, &str); 11] = [
    ("qsd", "limit: qsd file, cache.direct=off"),
    ("qsd-direct", "qsd file, cache.direct=on, aio=native"),
    ("quorum", "peer: qsd quorum 2/3 over 3 qemu-nbd"),
    ("nbd", "qsd nbd, 1 qemu-nbd"),
    ("ceph", "Ceph RBD 3×"),
    ("m1", "Tessera mirrors=1"),
    ("m2", "Tessera mirrors=2"),
    ("m3", "Tessera mirrors=3"),
    ("b1", "Tessera base mirrors=1"),
    ("b2", "Tessera base mirrors=2"),
    ("b3", "Tessera base mirrors=3"),
];
const LIMIT: &str = "qsd";
const PEER: &str = "quorum";

/// A Tessera system's mirrors and whether it is the base (`bN`, an older
/// executable) rather than this build (`mN`).
fn tessera_system(id: &str) -> Option<(bool, u32)> {
    let base = match id.as_bytes().first() {
        Some(b'm') => false,
        Some(b'b') => true,
        _ => return None,
    };
    match id[1..].parse() {
        Ok(n @ 1..=3) => Some((base, n)),
        _ => None,
    }
}

/// The order in which repetition `rep` measures `ids` (given in report
/// order): each pair of a new system and its base measured one right after
/// the other when both run, the new one first in even repetitions and the
/// base first in odd ones, so that neither side always runs right after
/// the other's workload (see also [`prefill`]).
fn measurement_order(ids: &[&str], rep: usize) -> Vec<usize> {
    let pair = |i: &str, base: bool| {
        tessera_system(i).and_then(|(_, n)| {
            ids.iter()
                .position(|o| tessera_system(o) == Some((base, n)))
        })
    };
    let mut order = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        match tessera_system(id) {
            Some((true, _)) if pair(id, false).is_some() => {}
            Some((false, _)) => match pair(id, true) {
                Some(b) if rep % 2 == 1 => order.extend([b, i]),
                b => {
                    order.push(i);
                    order.extend(b);
                }
            },
            _ => order.push(i),
        }
    }
    order
}

/// One system under test: its servers, the processes whose CPU is counted,
/// and the client connected to it.
struct System {
    id: &'static str,
    label: &'static str,
    socket: PathBuf,
    /// How it was started (shell-quoted command lines).
    commands: Vec<String>,
    watched: Vec<Watched>,
    client: Option<Client>,
    servers: Vec<Server>,
    vhost: Option<VhostProcess>,
    /// Why it is not measured (setup or an earlier run failed).
    failed: Option<String>,
    prefill_mib_s: Option<f64>,
}

impl System {
    fn new(id: &'static str) -> System {
        let label = SYSTEMS
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, l)| *l)
            .unwrap_or(id);
        System {
            id,
            label,
            socket: PathBuf::new(),
            commands: Vec::new(),
            watched: Vec::new(),
            client: None,
            servers: Vec::new(),
            vhost: None,
            failed: None,
            prefill_mib_s: None,
        }
    }

    fn add_server(&mut self, s: Server) {
        self.commands.push(s.command.clone());
        self.watched.push(s.watched());
        self.servers.push(s);
    }

    /// Whether every server process is still running.
    fn check_alive(&mut self) -> Result<()> {
        for s in &mut self.servers {
            if !s.alive() {
                bail!(
                    "{} died; log {}:\n{}",
                    s.name,
                    s.log.display(),
                    tail(&s.log)
                );
            }
        }
        for w in &self.watched {
            if !Path::new(&format!("/proc/{}", w.pid)).exists() {
                bail!("{} (pid {}) is gone", w.name, w.pid);
            }
        }
        Ok(())
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn qsd_export(socket: &Path, node: &str) -> String {
    format!(
        "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues=1",
        socket.display()
    )
}

/// `qemu-storage-daemon --blockdev JSON --export vhost-user-blk`.
fn spawn_qsd(work: &Path, id: &str, blockdev: serde_json::Value) -> Result<Server> {
    let socket = work.join(format!("{id}.sock"));
    let node = blockdev["node-name"]
        .as_str()
        .context("blockdev without node-name")?
        .to_string();
    Server::spawn(
        "qemu-storage-daemon",
        "qemu-storage-daemon",
        &[
            "--blockdev".into(),
            blockdev.to_string(),
            "--export".into(),
            qsd_export(&socket, &node),
        ],
        &work.join(format!("{id}.qsd.log")),
        Ready::Socket(&socket),
    )
}

/// The limit: a preallocated raw file, buffered or `O_DIRECT` + native AIO.
fn setup_qsd(sys: &mut System, work: &Path, range: u64, direct: bool) -> Result<()> {
    let image = work.join(format!("{}.img", sys.id));
    preallocated_file(&image, range)?;
    let mut blockdev = serde_json::json!({
        "driver": "file",
        "node-name": "f0",
        "filename": image.display().to_string(),
        "cache": {"direct": direct},
    });
    if direct {
        blockdev["aio"] = "native".into();
    }
    let s = spawn_qsd(work, sys.id, blockdev)?;
    sys.socket = work.join(format!("{}.sock", sys.id));
    sys.add_server(s);
    Ok(())
}

/// A `qemu-nbd` serving a preallocated raw file (page cache, like a
/// storage node) on a unix socket or a loopback TCP port; returns the
/// server and its `nbd` blockdev `server` address.
fn spawn_nbd(
    work: &Path,
    name: &str,
    range: u64,
    transport: &str,
) -> Result<(Server, serde_json::Value)> {
    let image = work.join(format!("{name}.img"));
    preallocated_file(&image, range)?;
    let mut args: Vec<String> = [
        "--format=raw",
        "--cache=writeback",
        "--aio=threads",
        "--persistent",
        "--shared=4",
        "--export-name=bench",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = work.join(format!("{name}.log"));
    if transport == "tcp" {
        let addr = free_port();
        args.push("--bind=127.0.0.1".into());
        args.push(format!("--port={}", addr.port()));
        args.push(image.display().to_string());
        let s = Server::spawn(
            &format!("qemu-nbd ({name})"),
            "qemu-nbd",
            &args,
            &log,
            Ready::Tcp(addr),
        )?;
        let server = serde_json::json!({"type": "inet", "host": "127.0.0.1", "port": addr.port().to_string()});
        Ok((s, server))
    } else {
        let sock = work.join(format!("{name}.nbd.sock"));
        args.push(format!("--socket={}", sock.display()));
        args.push(image.display().to_string());
        let s = Server::spawn(
            &format!("qemu-nbd ({name})"),
            "qemu-nbd",
            &args,
            &log,
            Ready::Socket(&sock),
        )?;
        let server = serde_json::json!({"type": "unix", "path": sock.display().to_string()});
        Ok((s, server))
    }
}

fn nbd_child(i: usize, server: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "driver": "nbd",
        "node-name": format!("n{i}"),
        "server": server,
        "export": "bench",
    })
}

/// The peer: quorum (vote-threshold 2, fifo reads) over three qemu-nbd.
fn setup_quorum(sys: &mut System, work: &Path, range: u64, transport: &str) -> Result<()> {
    let mut children = Vec::new();
    let mut nbds = Vec::new();
    for i in 0..3 {
        let (s, server) = spawn_nbd(work, &format!("quorum-nbd{i}"), range, transport)?;
        children.push(nbd_child(i, server));
        nbds.push(s);
    }
    let blockdev = serde_json::json!({
        "driver": "quorum",
        "node-name": "q0",
        "vote-threshold": 2,
        "read-pattern": "fifo",
        "children": children,
    });
    for s in nbds {
        sys.add_server(s);
    }
    let q = spawn_qsd(work, sys.id, blockdev)?;
    sys.socket = work.join(format!("{}.sock", sys.id));
    sys.add_server(q);
    Ok(())
}

/// One network copy: a single nbd child.
fn setup_nbd(sys: &mut System, work: &Path, range: u64, transport: &str) -> Result<()> {
    let (s, server) = spawn_nbd(work, "single-nbd", range, transport)?;
    sys.add_server(s);
    let q = spawn_qsd(work, sys.id, nbd_child(0, server))?;
    sys.socket = work.join(format!("{}.sock", sys.id));
    sys.add_server(q);
    Ok(())
}

/// A Ceph cluster set up by `bench/ceph/setup.sh`, torn down on drop.
struct Ceph {
    dir: PathBuf,
    conf: String,
    pool: String,
    image: String,
    size: u64,
    daemons: Vec<Watched>,
}

fn ceph_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("ceph")
        .join(name)
}

impl Ceph {
    fn setup(dir: &Path, range: u64) -> Result<Ceph> {
        let t = Instant::now();
        eprintln!(
            "ceph: setting up in {} (bench/ceph/setup.sh)",
            dir.display()
        );
        let out = Command::new("bash")
            .arg(ceph_script("setup.sh"))
            .arg(dir)
            .arg(range.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("running bench/ceph/setup.sh")?;
        let mut ceph = Ceph {
            dir: dir.to_path_buf(),
            conf: String::new(),
            pool: String::new(),
            image: String::new(),
            size: range,
            daemons: Vec::new(),
        };
        if !out.status.success() {
            bail!("bench/ceph/setup.sh failed ({})", out.status);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "conf" => ceph.conf = v.to_string(),
                "pool" => ceph.pool = v.to_string(),
                "image" => ceph.image = v.to_string(),
                "daemon" => {
                    let (name, pid) = v.split_once(':').context("daemon=NAME:PID")?;
                    ceph.daemons.push(Watched {
                        name: format!("ceph-{name}"),
                        pid: pid.parse()?,
                    });
                }
                _ => {}
            }
        }
        if ceph.conf.is_empty() || ceph.daemons.is_empty() {
            bail!("bench/ceph/setup.sh printed no conf= or daemon= lines");
        }
        eprintln!("ceph: ready in {:.0} s", t.elapsed().as_secs_f64());
        Ok(ceph)
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        eprintln!("ceph: tearing down");
        let _ = Command::new("bash")
            .arg(ceph_script("teardown.sh"))
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status();
    }
}

fn setup_ceph(sys: &mut System, work: &Path, ceph: &Ceph) -> Result<()> {
    let blockdev = serde_json::json!({
        "driver": "rbd",
        "node-name": "r0",
        "pool": ceph.pool,
        "image": ceph.image,
        "conf": ceph.conf,
        "user": "admin",
        "cache": {"direct": true},
    });
    let q = spawn_qsd(work, sys.id, blockdev)?;
    sys.socket = work.join(format!("{}.sock", sys.id));
    sys.add_server(q);
    sys.commands.push(format!(
        "bash bench/ceph/setup.sh {} {}   # 1 mon, 1 mgr, 3 BlueStore OSDs, pool size 3",
        ceph.dir.display(),
        ceph.size
    ));
    sys.watched.extend(ceph.daemons.iter().cloned());
    Ok(())
}

/// Prefill bytes written to one system before the next takes its turn.
const PREFILL_PIECE: u64 = 64 * MIB;

/// Writes every system's range once (one writer, 1 MiB sequential),
/// [`PREFILL_PIECE`] at a time from each system in turn. Interleaved, because
/// the order in which systems fill the page cache moves their results: with
/// one system filled after the other, the same build in two zones measured
/// 5-9 % faster on 1 MiB writes in the zone filled second, whichever was
/// measured first.
fn prefill(systems: &mut [System], range: u64) -> Result<()> {
    let mut took = vec![Duration::ZERO; systems.len()];
    let mut start = 0;
    while start < range {
        let end = (start + PREFILL_PIECE).min(range);
        for (sys, took) in systems.iter_mut().zip(&mut took) {
            let Some(c) = sys.client.as_mut() else {
                continue;
            };
            let job = Job {
                write: true,
                pattern: Pattern::Sequential,
                block_size: MIB as usize,
                depth: 4,
                range: end,
                start,
                warmup: Duration::ZERO,
                duration: None,
                seed: 0,
            };
            let t = Instant::now();
            let failed = match c.run(&job, &mut || {}) {
                Ok(m) if m.errors == 0 => None,
                Ok(m) => Some(format!(
                    "prefill: {} errors ({})",
                    m.errors,
                    m.first_error.unwrap_or_default()
                )),
                Err(e) => Some(format!("prefill: {e:#}")),
            };
            *took += t.elapsed();
            if let Some(e) = failed {
                eprintln!("{}: {e}", sys.id);
                sys.failed = Some(e);
                sys.client = None;
            }
        }
        start = end;
    }
    for (sys, took) in systems.iter_mut().zip(took) {
        if sys.client.is_some() {
            let mib_s = range as f64 / MIB as f64 / took.as_secs_f64().max(1e-9);
            sys.prefill_mib_s = Some(mib_s);
            eprintln!("{}: prefilled at {mib_s:.0} MiB/s", sys.id);
        }
    }
    Ok(())
}

/// A Tessera vDisk `ID/bench` (`ID` = `mN` or `bN`) with `mirrors=N`,
/// served by its own `tessera vhost serve` (the zone's executable) with one
/// queue.
fn setup_tessera(
    sys: &mut System,
    rt: &tokio::runtime::Runtime,
    zone: &TestZone,
    mirrors: u32,
    range: u64,
    disk_size: u64,
) -> Result<()> {
    let ds = sys.id;
    rt.block_on(async {
        // Placement fixed, the same in every zone: with 2 copies one is on
        // the vhost process's host and one on another host (the zone
        // picks 2 of the 3 disks otherwise, and a base zone whose copies
        // both landed on other hosts measured something else).
        let disks = match mirrors {
            1 => Some(vec![zone.disk_of_node(0).await]),
            2 => Some(vec![zone.disk_of_node(0).await, zone.disk_of_node(1).await]),
            _ => None,
        };
        zone.api
            .create_datastore(&CreateDatastore {
                name: ds.into(),
                mirrors,
                stripes: None,
                disks,
            })
            .await
            .expect("create datastore");
        zone.vdisk(ds, "bench", range).await;
    });
    let vhost = zone.spawn_vhost(ds, "bench", 1);
    sys.socket = vhost.socket.clone();
    let bin = shell_quote(&zone.bin.display().to_string());
    sys.commands.push(format!(
        "{bin} vhost serve {ds}/bench --socket {} --queues 1 --host {TEST_HOST} --api {} --token-file {}",
        shell_quote(&vhost.socket.display().to_string()),
        zone.url,
        shell_quote(&zone.token_file.display().to_string()),
    ));
    sys.watched.push(Watched {
        name: "tessera vhost serve".into(),
        pid: vhost.pid().context("vhost process gone")?,
    });
    for n in &zone.nodes {
        sys.commands.push(format!(
            "{bin} node run --dir {} --listen {} --host {} --heartbeat-ms 200 --disk {} --disk-size {disk_size} --api {} --token-file {}",
            shell_quote(&n.dir.display().to_string()),
            n.listen,
            n.host,
            shell_quote(&n.disk.display().to_string()),
            zone.url,
            shell_quote(&zone.token_file.display().to_string()),
        ));
        sys.watched.push(Watched {
            name: format!("tessera node run ({})", n.index),
            pid: n.pid().context("node process gone")?,
        });
    }
    let over = match mirrors {
        1 => "node 0's disk (on the vhost process's host)",
        2 => "the disks of node 0 (on the vhost process's host) and node 1 (another host)",
        _ => "the 3 nodes' disks (node 0 on the vhost process's host, nodes 1-2 on other hosts)",
    };
    sys.commands.push(format!(
        "# datastore {ds}: mirrors={mirrors} over {over}; vDisk {ds}/bench: {range} bytes"
    ));
    if tessera_system(ds).is_some_and(|(base, _)| base) {
        sys.commands.push(format!(
            "# zone API {}: in the benchmark process, this build's (the base executable's nodes and vhost process reach it over HTTP)",
            zone.url
        ));
    }
    sys.vhost = Some(vhost);
    Ok(())
}

// ------------------------------------------------------------------ results

#[derive(Debug, Clone, Serialize)]
struct ProcessCpu {
    name: String,
    pid: u32,
    cpu_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Latency {
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    system: String,
    workload: String,
    rep: usize,
    /// The run failed (the error) — no numbers.
    error: Option<String>,
    seconds: f64,
    ios: u64,
    bytes: u64,
    iops: f64,
    mib_per_s: f64,
    latency_us: Option<Latency>,
    io_errors: u64,
    first_io_error: Option<String>,
    server_cpu_s: f64,
    server_cpu_us_per_io: f64,
    server_cpu_by_process: Vec<ProcessCpu>,
    client_cpu_s: f64,
    client_cpu_us_per_io: f64,
    /// CPU seconds the rest of the machine used meanwhile (neither the
    /// servers nor this benchmark process): disturbance.
    others_cpu_s: f64,
}

#[derive(Debug, Serialize)]
struct SystemReport {
    id: String,
    label: String,
    commands: Vec<String>,
    watched: Vec<Watched>,
    prefill_mib_per_s: Option<f64>,
    failed: Option<String>,
}

#[derive(Debug, Serialize)]
struct Settings {
    reps: usize,
    seconds: f64,
    warmup_s: f64,
    range_bytes: u64,
    nbd_transport: String,
    client: String,
    command: String,
    /// The older `tessera` executable of the `b` systems (`--base-bin`).
    #[serde(skip_serializing_if = "Option::is_none")]
    base_bin: Option<String>,
    /// What the report calls it (`--base-label`, else its path).
    #[serde(skip_serializing_if = "Option::is_none")]
    base_label: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    settings: Settings,
    systems: Vec<SystemReport>,
    runs: Vec<Run>,
    total_seconds: f64,
    /// Throughput of each `mN` against `bN` (when both ran).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    new_against_base: Vec<AgainstBase>,
}

/// `mN`'s throughput over `bN`'s in one repetition.
#[derive(Debug, Clone, Serialize)]
struct PairedRatio {
    rep: usize,
    ratio: f64,
}

/// Throughput of `mN` (this build) against `bN` (the base) in one workload.
#[derive(Debug, Clone, Serialize)]
struct AgainstBase {
    workload: String,
    mirrors: u32,
    /// `IOPS` or `MiB/s`.
    unit: &'static str,
    /// Medians over repetitions.
    new_median: f64,
    base_median: f64,
    /// `new_median / base_median`.
    ratio: f64,
    /// Median over repetitions of `mN / limit` (same repetition), over the
    /// same for `bN`.
    ratio_of_limit_ratios: Option<f64>,
    /// The same against the peer.
    ratio_of_peer_ratios: Option<f64>,
    /// In each repetition both ran: `mN`'s throughput over `bN`'s.
    paired: Vec<PairedRatio>,
    paired_median: Option<f64>,
    paired_min: Option<f64>,
    paired_max: Option<f64>,
    /// Some ratio above is off 1 by more than [`AB_THRESHOLD`].
    flagged: bool,
}

/// A new-against-base throughput ratio further from 1 than this is flagged.
const AB_THRESHOLD: f64 = 0.05;

fn beyond_threshold(r: f64) -> bool {
    (1.0 - r).abs() > AB_THRESHOLD
}

/// For every workload and mirrors level where both `mN` and `bN` ran:
/// their throughputs compared (see [`AgainstBase`]).
fn against_base(workloads: &[Workload], ids: &[&str], runs: &[Run]) -> Vec<AgainstBase> {
    let mut out = Vec::new();
    for w in workloads {
        // Throughput of `id` in each repetition it ran without error.
        let series = |id: &str| -> Vec<(usize, f64)> {
            runs.iter()
                .filter(|r| r.system == id && r.workload == w.name && r.error.is_none())
                .filter_map(|r| throughput(w, r).map(|v| (r.rep, v)))
                .filter(|(_, v)| v.is_finite())
                .collect()
        };
        // In each repetition both ran: a over b.
        let paired = |a: &[(usize, f64)], b: &[(usize, f64)]| -> Vec<PairedRatio> {
            a.iter()
                .filter_map(|&(rep, x)| {
                    let (_, y) = b.iter().find(|(r, _)| *r == rep)?;
                    (*y > 0.0).then(|| PairedRatio { rep, ratio: x / y })
                })
                .collect()
        };
        let median = |v: &[(usize, f64)]| stats(&v.iter().map(|p| p.1).collect::<Vec<_>>());
        let ratio_median =
            |v: &[PairedRatio]| stats(&v.iter().map(|p| p.ratio).collect::<Vec<_>>());
        for n in 1..=3u32 {
            let (m, b) = (format!("m{n}"), format!("b{n}"));
            if !ids.contains(&m.as_str()) || !ids.contains(&b.as_str()) {
                continue;
            }
            let (ms, bs) = (series(&m), series(&b));
            let (Some((mm, _, _)), Some((bm, _, _))) = (median(&ms), median(&bs)) else {
                continue;
            };
            if bm <= 0.0 {
                continue;
            }
            // (mN/ref)/(bN/ref), each the median of same-repetition ratios.
            let of_ratios = |reference: &str| -> Option<f64> {
                let rs = series(reference);
                let (Some((a, _, _)), Some((b, _, _))) = (
                    ratio_median(&paired(&ms, &rs)),
                    ratio_median(&paired(&bs, &rs)),
                ) else {
                    return None;
                };
                (b > 0.0).then(|| a / b)
            };
            let pairs = paired(&ms, &bs);
            let p = ratio_median(&pairs);
            let mut a = AgainstBase {
                workload: w.name.to_string(),
                mirrors: n,
                unit: if w.bandwidth() { "MiB/s" } else { "IOPS" },
                new_median: mm,
                base_median: bm,
                ratio: mm / bm,
                ratio_of_limit_ratios: of_ratios(LIMIT),
                ratio_of_peer_ratios: of_ratios(PEER),
                paired: pairs,
                paired_median: p.map(|p| p.0),
                paired_min: p.map(|p| p.1),
                paired_max: p.map(|p| p.2),
                flagged: false,
            };
            a.flagged = [
                Some(a.ratio),
                a.ratio_of_limit_ratios,
                a.ratio_of_peer_ratios,
                a.paired_median,
            ]
            .into_iter()
            .flatten()
            .any(beyond_threshold);
            out.push(a);
        }
    }
    out
}

/// The "New against base" section of the report.
fn against_base_section(md: &mut String, rows: &[AgainstBase], workloads: &[Workload]) {
    let _ = writeln!(md, "\n### New against base\n");
    let _ = writeln!(
        md,
        "Throughput of this build (`mN`) over the base (`bN`, same mirrors), from the runs above. `mN/bN`: median over median. `(mN/limit)/(bN/limit)`: the median over repetitions of `mN`'s throughput over the limit's in the same repetition, over the same median for `bN` (with medians of separate series it would be `mN/bN` exactly; per repetition, it is normalised by what the limit got meanwhile); `(mN/peer)/(bN/peer)` likewise. Paired: in each repetition, `mN`'s throughput over `bN`'s in that repetition, median (min–max) and each repetition's; pairs cancel host drift better than medians of separate series. Bold: further than {:.0}% from 1. Flag: how far the paired median (else `mN/bN`) is from 1 when that is bold; `mixed` when only another ratio is.\n",
        AB_THRESHOLD * 100.0
    );
    let _ = writeln!(
        md,
        "| workload | mirrors | new `mN` | base `bN` | mN/bN | (mN/limit)/(bN/limit) | (mN/peer)/(bN/peer) | paired mN/bN | paired, by repetition | flag |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let ratio = |r: f64| {
        let cell = format!("{r:.3}×");
        if beyond_threshold(r) {
            format!("**{cell}**")
        } else {
            cell
        }
    };
    let opt = |r: Option<f64>| r.map(ratio).unwrap_or_else(|| "–".into());
    for a in rows {
        let title = workloads
            .iter()
            .find(|w| w.name == a.workload)
            .map(|w| w.title)
            .unwrap_or(&a.workload);
        let paired = match (a.paired_median, a.paired_min, a.paired_max) {
            (Some(med), Some(lo), Some(hi)) => {
                format!("{} ({lo:.3}–{hi:.3}×)", ratio(med))
            }
            _ => "–".into(),
        };
        let by_rep = if a.paired.is_empty() {
            "–".to_string()
        } else {
            a.paired
                .iter()
                .map(|p| format!("r{}: {:.3}", p.rep, p.ratio))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let headline = a.paired_median.unwrap_or(a.ratio);
        let flag = if beyond_threshold(headline) {
            format!("**new {:+.1}%**", (headline - 1.0) * 100.0)
        } else if a.flagged {
            "mixed".to_string()
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| {title} ({}) | {} | {} | {} | {} | {} | {} | {paired} | {by_rep} | {flag} |",
            a.unit,
            a.mirrors,
            num(a.new_median),
            num(a.base_median),
            ratio(a.ratio),
            opt(a.ratio_of_limit_ratios),
            opt(a.ratio_of_peer_ratios),
        );
    }
}

fn measure(sys: &mut System, w: &Workload, rep: usize, args: &Args, range: u64) -> Result<Run> {
    sys.check_alive()?;
    let job = Job {
        write: w.write,
        pattern: w.pattern,
        block_size: w.block_size,
        depth: w.depth,
        range,
        start: 0,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Some(Duration::from_secs_f64(args.seconds)),
        seed: (rep as u64) << 32 | w.depth as u64,
    };
    let watched = sys.watched.clone();
    let mut before: Option<Result<CpuSample>> = None;
    let client = sys.client.as_mut().context("not connected")?;
    let m: Measured = client.run(&job, &mut || before = Some(CpuSample::take(&watched)))?;
    let after = CpuSample::take(&watched)?;
    let before = before.context("the measurement never started")??;
    let per_proc = before.seconds_until(&after);
    let others = before.others_until(&after);
    let server_cpu: f64 = per_proc.iter().sum();
    let ios = m.ios.max(1) as f64;
    Ok(Run {
        system: sys.id.to_string(),
        workload: w.name.to_string(),
        rep,
        error: None,
        seconds: m.elapsed.as_secs_f64(),
        ios: m.ios,
        bytes: m.bytes,
        iops: m.iops(),
        mib_per_s: m.mib_per_s(),
        latency_us: Some(Latency {
            mean: m.mean_us(),
            p50: m.percentile_us(0.50),
            p99: m.percentile_us(0.99),
            p999: m.percentile_us(0.999),
            max: m.percentile_us(1.0),
        }),
        io_errors: m.errors,
        first_io_error: m.first_error.clone(),
        server_cpu_s: server_cpu,
        server_cpu_us_per_io: server_cpu * 1e6 / ios,
        server_cpu_by_process: watched
            .iter()
            .zip(&per_proc)
            .map(|(w, s)| ProcessCpu {
                name: w.name.clone(),
                pid: w.pid,
                cpu_s: *s,
            })
            .collect(),
        client_cpu_s: m.client_cpu.as_secs_f64(),
        client_cpu_us_per_io: m.client_cpu.as_secs_f64() * 1e6 / ios,
        others_cpu_s: others,
    })
}

/// Median, min and max.
fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some((med, s[0], s[n - 1]))
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if a >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A metric of a run for one table.
type Metric = fn(&Workload, &Run) -> Option<f64>;

fn throughput(w: &Workload, r: &Run) -> Option<f64> {
    Some(if w.bandwidth() { r.mib_per_s } else { r.iops })
}
fn p50(_: &Workload, r: &Run) -> Option<f64> {
    r.latency_us.as_ref().map(|l| l.p50)
}
fn p99(_: &Workload, r: &Run) -> Option<f64> {
    r.latency_us.as_ref().map(|l| l.p99)
}
fn p999(_: &Workload, r: &Run) -> Option<f64> {
    r.latency_us.as_ref().map(|l| l.p999)
}
fn server_cpu(_: &Workload, r: &Run) -> Option<f64> {
    Some(r.server_cpu_us_per_io)
}
fn client_cpu(_: &Workload, r: &Run) -> Option<f64> {
    Some(r.client_cpu_us_per_io)
}

/// One table of the report.
struct Table<'a> {
    title: &'a str,
    note: &'a str,
    metric: Metric,
    /// Ratio columns against the limit and the peer (and `mN/bN`).
    ratios: bool,
    /// IOPS or MiB/s after the workload's name.
    units: bool,
}

fn table(
    md: &mut String,
    t: &Table<'_>,
    workloads: &[Workload],
    systems: &[&System],
    runs: &[Run],
) {
    let Table {
        title,
        note,
        metric,
        ratios,
        units,
    } = *t;
    let ids: Vec<&str> = systems.iter().map(|s| s.id).collect();
    let has = |id: &str| ids.contains(&id);
    // Ratio columns: Tessera's systems (this build's, then the base's)
    // against the limit and the peer (or every other system when no Tessera
    // system ran), then this build's over the base's.
    let subjects: Vec<&str> = {
        let t: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|i| tessera_system(i).is_some())
            .collect();
        if t.is_empty() {
            ids.iter()
                .copied()
                .filter(|i| *i != LIMIT && *i != PEER)
                .collect()
        } else {
            t
        }
    };
    let mut refs = Vec::new();
    // (mN, bN) pairs that both ran.
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    if ratios {
        for r in [LIMIT, PEER] {
            if has(r) {
                refs.push(r);
            }
        }
        for m in &ids {
            if let Some((false, n)) = tessera_system(m) {
                if let Some(b) = ids.iter().find(|b| tessera_system(b) == Some((true, n))) {
                    pairs.push((m, b));
                }
            }
        }
    }
    let _ = writeln!(md, "\n### {title}\n\n{note}\n");
    let mut head = String::from("| workload |");
    let mut rule = String::from("|---|");
    for s in systems {
        let _ = write!(head, " {} |", s.label);
        rule.push_str("---|");
    }
    for r in &refs {
        for s in &subjects {
            let _ = write!(
                head,
                " {s}/{} |",
                if *r == LIMIT { "limit" } else { "peer" }
            );
            rule.push_str("---|");
        }
    }
    for (m, b) in &pairs {
        let _ = write!(head, " {m}/{b} |");
        rule.push_str("---|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for w in workloads {
        let med = |id: &str| -> Option<(f64, f64, f64)> {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.system == id && r.workload == w.name && r.error.is_none())
                .filter_map(|r| metric(w, r))
                .collect();
            stats(&v)
        };
        let unit = if units {
            if w.bandwidth() {
                " (MiB/s)"
            } else {
                " (IOPS)"
            }
        } else {
            ""
        };
        let mut row = format!("| {}{unit} |", w.title);
        for s in systems {
            match med(s.id) {
                Some((m, lo, hi)) => {
                    let _ = write!(row, " {} ({}–{}) |", num(m), num(lo), num(hi));
                }
                None => row.push_str(" failed |"),
            }
        }
        for r in &refs {
            for s in &subjects {
                match (med(s), med(r)) {
                    (Some(a), Some(b)) if b.0 > 0.0 => {
                        let _ = write!(row, " {:.2}× |", a.0 / b.0);
                    }
                    _ => row.push_str(" – |"),
                }
            }
        }
        for (m, b) in &pairs {
            match (med(m), med(b)) {
                (Some(a), Some(b)) if b.0 > 0.0 => {
                    let _ = write!(row, " {:.2}× |", a.0 / b.0);
                }
                _ => row.push_str(" – |"),
            }
        }
        let _ = writeln!(md, "{row}");
    }
}

fn markdown(report: &Report, workloads: &[Workload], systems: &[&System]) -> String {
    let m = &report.machine;
    let s = &report.settings;
    let mut md = String::new();
    let _ = writeln!(md, "# blkbench, {}\n", m.date);
    let _ = writeln!(
        md,
        "Machine: {} cores ({}), {:.1} GiB, kernel {}, {}, {}; Tessera {}.\n",
        m.nproc, m.cpu_model, m.memory_gib, m.kernel, m.os, m.qemu, m.tessera_commit
    );
    let _ = writeln!(
        md,
        "`{}` — {} repetitions, interleaved (every workload on every system in turn), {} s measured per run after {} s of warm-up, over the first {} MiB of each disk (written once, 1 MiB sequential, 64 MiB of each system in turn, before anything is measured); one client for all: {}; qemu-nbd reached over {}. Whole run: {:.0} s.\n",
        s.command,
        s.reps,
        s.seconds,
        s.warmup_s,
        s.range_bytes / MIB,
        s.client,
        if s.nbd_transport == "tcp" { "loopback TCP" } else { "unix sockets" },
        report.total_seconds
    );
    let others: Vec<f64> = report
        .runs
        .iter()
        .filter(|r| r.error.is_none() && r.seconds > 0.0)
        .map(|r| r.others_cpu_s / r.seconds)
        .collect();
    if let (Some(bin), true) = (
        &s.base_bin,
        report
            .systems
            .iter()
            .any(|sys| tessera_system(&sys.id).is_some_and(|(base, _)| base)),
    ) {
        let label = match &s.base_label {
            Some(l) if l != bin => format!("{l} (`{bin}`)"),
            _ => format!("`{bin}`"),
        };
        let _ = writeln!(
            md,
            "Base (`b1`–`b3`, \"Tessera base\"): {label}, which runs their storage nodes and `vhost serve` processes in a second zone of the same shape; both zones' management API runs in the benchmark process and is this build's ({}).\n",
            m.tessera_commit
        );
    }
    if let Some((med, _, max)) = stats(&others) {
        let _ = writeln!(
            md,
            "Other load during the measured runs (CPU used by neither the servers nor the benchmark process, from /proc/stat): median {med:.2}, max {max:.2} cores.\n"
        );
    }
    let _ = write!(
        md,
        "Cells: median over repetitions (min–max). Ratio columns: median of the Tessera system over median of the limit (`qsd`, cache.direct=off) or of the peer (`quorum`); for throughput higher is better, for latency and CPU lower is better."
    );
    if !report.new_against_base.is_empty() {
        let _ = write!(
            md,
            " `mN/bN`: median of this build's system over median of the base's with the same mirrors."
        );
    }
    let _ = writeln!(md);
    let tables = [
        Table {
            title: "Throughput",
            note: "IOPS for 4 KiB, MiB/s for 1 MiB.",
            metric: throughput,
            ratios: true,
            units: true,
        },
        Table {
            title: "Latency p50 (µs)",
            note: "Submission to completion as the client sees it.",
            metric: p50,
            ratios: true,
            units: false,
        },
        Table {
            title: "Latency p99 (µs)",
            note: "",
            metric: p99,
            ratios: true,
            units: false,
        },
        Table {
            title: "Latency p99.9 (µs)",
            note: "",
            metric: p999,
            ratios: true,
            units: false,
        },
        Table {
            title: "Server CPU per I/O (µs)",
            note: "User + system time of every server process of the system (from /proc/PID/stat, 10 ms ticks) over the measured time, divided by the I/Os: qemu-storage-daemon (+ qemu-nbd, + Ceph's mon, mgr and OSDs); Tessera's vhost process + its 3 storage nodes.",
            metric: server_cpu,
            ratios: true,
            units: false,
        },
        Table {
            title: "Client CPU per I/O (µs)",
            note: "The benchmark client's thread (libblkio), for context.",
            metric: client_cpu,
            ratios: false,
            units: false,
        },
    ];
    for t in &tables {
        table(&mut md, t, workloads, systems, &report.runs);
    }
    if !report.new_against_base.is_empty() {
        against_base_section(&mut md, &report.new_against_base, workloads);
    }
    let _ = writeln!(md, "\n### Systems\n");
    for sys in &report.systems {
        let _ = writeln!(md, "- **{}** (`{}`)", sys.label, sys.id);
        if let Some(f) = &sys.failed {
            let _ = writeln!(md, "  - FAILED: {}", f.lines().next().unwrap_or(""));
        }
        if let Some(p) = sys.prefill_mib_per_s {
            let _ = writeln!(md, "  - prefill: {p:.0} MiB/s");
        }
        let _ = writeln!(md, "\n  ```sh");
        for c in &sys.commands {
            let _ = writeln!(md, "  {c}");
        }
        let _ = writeln!(md, "  ```");
    }
    let failed: Vec<&Run> = report.runs.iter().filter(|r| r.error.is_some()).collect();
    let io_err: Vec<&Run> = report.runs.iter().filter(|r| r.io_errors > 0).collect();
    if !failed.is_empty() || !io_err.is_empty() {
        let _ = writeln!(md, "\n### Problems\n");
        for r in failed {
            let _ = writeln!(
                md,
                "- {} {} rep {}: {}",
                r.system,
                r.workload,
                r.rep,
                r.error
                    .as_deref()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            );
        }
        for r in io_err {
            let _ = writeln!(
                md,
                "- {} {} rep {}: {} I/O errors ({})",
                r.system,
                r.workload,
                r.rep,
                r.io_errors,
                r.first_io_error.as_deref().unwrap_or("")
            );
        }
    }
    md
}

// --------------------------------------------------------------------- main

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let range = parse_size(&args.range)?;
    if range < MIB || range % MIB != 0 {
        bail!("--range must be a positive multiple of 1 MiB");
    }
    if args.reps == 0 || args.seconds <= 0.0 {
        bail!("--reps and --seconds must be positive");
    }
    let known: Vec<&str> = SYSTEMS.iter().map(|(i, _)| *i).collect();
    let is_base = |id: &str| tessera_system(id).is_some_and(|(base, _)| base);
    for o in &args.only {
        if !known.contains(&o.as_str()) {
            bail!("unknown system {o:?} (known: {})", known.join(", "));
        }
        if is_base(o) && args.base_bin.is_none() {
            bail!("{o} is Tessera base: it needs --base-bin PATH (an older tessera executable)");
        }
    }
    let base_bin = match &args.base_bin {
        Some(p) => {
            if !p.is_file() {
                bail!("--base-bin {}: not a file", p.display());
            }
            Some(std::fs::canonicalize(p).with_context(|| format!("--base-bin {}", p.display()))?)
        }
        None => None,
    };
    let selected: Vec<&'static str> = known
        .iter()
        .copied()
        .filter(|i| {
            if args.only.is_empty() {
                !is_base(i) || base_bin.is_some()
            } else {
                args.only.iter().any(|o| o == i)
            }
        })
        .filter(|i| *i != "ceph" || args.ceph)
        .collect();
    if base_bin.is_some() && !selected.iter().any(|i| is_base(i)) {
        eprintln!("blkbench: --base-bin given but no base system (b1, b2, b3) selected");
    }
    if args.only.iter().any(|o| o == "ceph") && !args.ceph {
        bail!("ceph needs --ceph");
    }
    let workloads: Vec<Workload> = if args.workloads.is_empty() {
        WORKLOADS.to_vec()
    } else {
        for w in &args.workloads {
            if !WORKLOADS.iter().any(|k| k.name == w) {
                bail!(
                    "unknown workload {w:?} (known: {})",
                    WORKLOADS.map(|w| w.name).join(", ")
                );
            }
        }
        WORKLOADS
            .iter()
            .copied()
            .filter(|k| args.workloads.iter().any(|w| w == k.name))
            .collect()
    };
    let machine = Machine::probe();
    eprintln!(
        "blkbench: {} on {} cores, {:.1} GiB, {}",
        selected.join(" "),
        machine.nproc,
        machine.memory_gib,
        machine.qemu
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let work = tempfile::Builder::new().prefix("blkbench-").tempdir()?;
    let wp = work.path().to_path_buf();

    // Set up every system (all of them stay up for the whole run).
    let mut systems: Vec<System> = selected.iter().map(|id| System::new(id)).collect();
    let needs_zone = selected
        .iter()
        .any(|i| tessera_system(i).is_some_and(|(base, _)| !base));
    let needs_base_zone = selected.iter().any(|i| is_base(i));
    // Each node may hold a copy of all three vDisks.
    let disk = 3 * range + 512 * MIB;
    // Nodes 1 and 2 stand for nodes on other hosts: TCP, no local session.
    let on_hosts = |mut zone: TestZone| {
        zone.restart_node_on_host(1, "bench-peer-1");
        zone.restart_node_on_host(2, "bench-peer-2");
        rt.block_on(zone.wait_nodes_up(3));
        zone
    };
    let zone = if needs_zone {
        eprintln!(
            "tessera: starting a 3-node zone ({} MiB disk files)",
            disk / MIB
        );
        let zone = match args.format_version {
            Some(v) => rt.block_on(TestZone::start_formatted(3, disk, v)),
            None => rt.block_on(TestZone::start(3, disk)),
        };
        Some(on_hosts(zone))
    } else {
        None
    };
    // The base's own zone, of the same shape, its nodes running the base.
    let base_zone = match (&base_bin, needs_base_zone) {
        (Some(bin), true) => {
            eprintln!(
                "tessera base: starting a 3-node zone of {} ({} MiB disk files)",
                bin.display(),
                disk / MIB
            );
            Some(on_hosts(rt.block_on(TestZone::start_with_bin(
                3,
                disk,
                bin.clone(),
            ))))
        }
        _ => None,
    };
    let ceph = if args.ceph {
        match Ceph::setup(&wp.join("ceph"), range) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("ceph: {e:#}");
                if let Some(s) = systems.iter_mut().find(|s| s.id == "ceph") {
                    s.failed = Some(format!("setup: {e:#}"));
                }
                None
            }
        }
    } else {
        None
    };
    for sys in &mut systems {
        if sys.failed.is_some() {
            continue;
        }
        let t = Instant::now();
        let r = match sys.id {
            "qsd" => setup_qsd(sys, &wp, range, false),
            "qsd-direct" => setup_qsd(sys, &wp, range, true),
            "quorum" => setup_quorum(sys, &wp, range, &args.nbd_transport),
            "nbd" => setup_nbd(sys, &wp, range, &args.nbd_transport),
            "ceph" => setup_ceph(sys, &wp, ceph.as_ref().context("no ceph")?),
            "m1" | "m2" | "m3" => {
                let n = sys.id[1..].parse()?;
                setup_tessera(sys, &rt, zone.as_ref().context("no zone")?, n, range, disk)
            }
            "b1" | "b2" | "b3" => {
                let n = sys.id[1..].parse()?;
                let z = base_zone.as_ref().context("no base zone")?;
                setup_tessera(sys, &rt, z, n, range, disk)
            }
            other => bail!("no setup for {other}"),
        };
        let r = r.and_then(|()| {
            let c = Client::connect(&sys.socket, CLIENT_MEM)?;
            if c.capacity() < range {
                bail!("capacity {} < range {range}", c.capacity());
            }
            sys.client = Some(c);
            Ok(())
        });
        match r {
            Ok(()) => eprintln!("{}: set up in {:.1} s", sys.id, t.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("{}: setup failed: {e:#}", sys.id);
                sys.failed = Some(format!("setup: {e:#}"));
                sys.client = None;
            }
        }
    }
    prefill(&mut systems, range)?;

    // The measurement: A B C A B C … A base system runs right after its
    // new counterpart (m1 b1 m2 b2 …), so that each pair sees the same host,
    // and right before it in odd repetitions (b1 m1 b2 m2 …).
    let ids: Vec<&str> = systems.iter().map(|s| s.id).collect();
    let mut runs = Vec::new();
    let total = args.reps * workloads.len() * systems.len();
    let mut done = 0;
    for rep in 0..args.reps {
        let order = measurement_order(&ids, rep);
        for w in &workloads {
            for &i in &order {
                let sys = &mut systems[i];
                done += 1;
                if sys.failed.is_some() {
                    continue;
                }
                match measure(sys, w, rep, &args, range) {
                    Ok(run) => {
                        eprintln!(
                            "[{done}/{total}] rep {rep} {:<18} {:<11} {:>9} IOPS {:>8.1} MiB/s  p50 {:>8.1} µs  p99 {:>8.1} µs  srv CPU {:>7.1} µs/IO  others {:.2} cores{}",
                            w.name,
                            sys.id,
                            num(run.iops),
                            run.mib_per_s,
                            run.latency_us.as_ref().map(|l| l.p50).unwrap_or(f64::NAN),
                            run.latency_us.as_ref().map(|l| l.p99).unwrap_or(f64::NAN),
                            run.server_cpu_us_per_io,
                            run.others_cpu_s / run.seconds.max(1e-9),
                            if run.io_errors > 0 {
                                format!("  {} I/O ERRORS", run.io_errors)
                            } else {
                                String::new()
                            }
                        );
                        runs.push(run);
                    }
                    Err(e) => {
                        eprintln!(
                            "[{done}/{total}] rep {rep} {} {}: FAILED: {e:#}",
                            w.name, sys.id
                        );
                        runs.push(Run {
                            system: sys.id.to_string(),
                            workload: w.name.to_string(),
                            rep,
                            error: Some(format!("{e:#}")),
                            seconds: 0.0,
                            ios: 0,
                            bytes: 0,
                            iops: 0.0,
                            mib_per_s: 0.0,
                            latency_us: None,
                            io_errors: 0,
                            first_io_error: None,
                            server_cpu_s: 0.0,
                            server_cpu_us_per_io: 0.0,
                            server_cpu_by_process: Vec::new(),
                            client_cpu_s: 0.0,
                            client_cpu_us_per_io: 0.0,
                            others_cpu_s: 0.0,
                        });
                        // A stalled or dead server: stop measuring it.
                        sys.failed = Some(format!("{} rep {rep}: {e:#}", w.name));
                        sys.client = None;
                    }
                }
            }
        }
    }

    let command = std::iter::once("target/release/blkbench".to_string())
        .chain(std::env::args().skip(1).map(|a| shell_quote(&a)))
        .collect::<Vec<_>>()
        .join(" ");
    let report = Report {
        machine,
        settings: Settings {
            reps: args.reps,
            seconds: args.seconds,
            warmup_s: args.warmup,
            range_bytes: range,
            nbd_transport: args.nbd_transport.clone(),
            client: "blkio 0.5 virtio-blk-vhost-user, 1 queue, eventfd completions, requests split at the device's size_max".into(),
            command,
            base_bin: base_bin.as_ref().map(|b| b.display().to_string()),
            base_label: base_bin.as_ref().map(|b| {
                args.base_label
                    .clone()
                    .unwrap_or_else(|| b.display().to_string())
            }),
        },
        systems: systems
            .iter()
            .map(|s| SystemReport {
                id: s.id.to_string(),
                label: s.label.to_string(),
                commands: s.commands.clone(),
                watched: s.watched.clone(),
                prefill_mib_per_s: s.prefill_mib_s,
                failed: s.failed.clone(),
            })
            .collect(),
        new_against_base: against_base(
            &workloads,
            &systems.iter().map(|s| s.id).collect::<Vec<_>>(),
            &runs,
        ),
        runs,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    let shown: Vec<&System> = systems.iter().collect();
    let md = markdown(&report, &workloads, &shown);
    std::fs::create_dir_all(&args.out)?;
    let stamp = utc_now().stamp();
    let md_path = args.out.join(format!("blkbench-{stamp}.md"));
    let json_path = args.out.join(format!("blkbench-{stamp}.json"));
    std::fs::write(&md_path, &md)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    // An A/B run is not the new baseline: blkbench-latest.md stays.
    if base_bin.is_none() {
        std::fs::write(args.out.join("blkbench-latest.md"), &md)?;
    }
    println!("{md}");
    if base_bin.is_none() {
        eprintln!(
            "wrote {}, {} and blkbench-latest.md in {:.0} s",
            md_path.display(),
            json_path.display(),
            report.total_seconds
        );
    } else {
        eprintln!(
            "wrote {} and {} in {:.0} s (an A/B run: blkbench-latest.md left as it was)",
            md_path.display(),
            json_path.display(),
            report.total_seconds
        );
    }

    // Clients first, then their servers, the zone and Ceph.
    for s in &mut systems {
        s.client = None;
    }
    drop(systems);
    drop(zone);
    drop(base_zone);
    drop(ceph);
    drop(rt);
    drop(work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), GIB);
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1X").is_err());
    }

    #[test]
    fn tessera_systems() {
        assert_eq!(tessera_system("m2"), Some((false, 2)));
        assert_eq!(tessera_system("b3"), Some((true, 3)));
        assert_eq!(tessera_system("b4"), None);
        assert_eq!(tessera_system("qsd"), None);
        assert_eq!(tessera_system("nbd"), None);
        assert!(SYSTEMS.iter().all(|(id, label)| tessera_system(id)
            .is_none_or(|(base, _)| base == label.starts_with("Tessera base"))));
    }

    #[test]
    fn each_base_system_runs_next_to_its_counterpart_first_in_turn() {
        let ids = ["qsd", "quorum", "m1", "m2", "m3", "b1", "b3"];
        let order = |rep| -> Vec<&str> {
            measurement_order(&ids, rep)
                .iter()
                .map(|i| ids[*i])
                .collect()
        };
        assert_eq!(order(0), ["qsd", "quorum", "m1", "b1", "m2", "m3", "b3"]);
        assert_eq!(order(1), ["qsd", "quorum", "b1", "m1", "m2", "b3", "m3"]);
        assert_eq!(order(2), order(0));
        let ids = ["qsd", "b2"];
        assert_eq!(measurement_order(&ids, 1), [0, 1]);
    }

    fn run(system: &str, rep: usize, iops: f64) -> Run {
        Run {
            system: system.into(),
            workload: "4k-randread-qd1".into(),
            rep,
            error: None,
            seconds: 1.0,
            ios: iops as u64,
            bytes: 0,
            iops,
            mib_per_s: 0.0,
            latency_us: None,
            io_errors: 0,
            first_io_error: None,
            server_cpu_s: 0.0,
            server_cpu_us_per_io: 0.0,
            server_cpu_by_process: Vec::new(),
            client_cpu_s: 0.0,
            client_cpu_us_per_io: 0.0,
            others_cpu_s: 0.0,
        }
    }

    #[test]
    fn new_against_base_pairs_repetitions() {
        // The host slows down by half in repetition 1: the pairs do not see it.
        let runs = vec![
            run("qsd", 0, 1000.0),
            run("m1", 0, 110.0),
            run("b1", 0, 100.0),
            run("qsd", 1, 500.0),
            run("m1", 1, 55.0),
            run("b1", 1, 50.0),
            run("qsd", 2, 1000.0),
            run("m1", 2, 110.0),
            run("b1", 2, 100.0),
            run("m2", 0, 50.0),
        ];
        let rows = against_base(&WORKLOADS[..1], &["qsd", "m1", "b1", "m2"], &runs);
        assert_eq!(rows.len(), 1, "m2 has no base");
        let a = &rows[0];
        assert_eq!((a.mirrors, a.unit), (1, "IOPS"));
        assert!((a.ratio - 1.1).abs() < 1e-9);
        assert!((a.ratio_of_limit_ratios.unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(a.ratio_of_peer_ratios, None);
        assert_eq!(a.paired.len(), 3);
        assert!((a.paired_median.unwrap() - 1.1).abs() < 1e-9);
        assert!(a.flagged);
        let mut md = String::new();
        against_base_section(&mut md, &rows, &WORKLOADS);
        assert!(md.contains("| 4k randread QD1 (IOPS) | 1 | 110 | 100 | **1.100×** |"));
        assert!(md.contains("**new +10.0%**"));
    }

    #[test]
    fn median() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(&[]), None);
    }
}
