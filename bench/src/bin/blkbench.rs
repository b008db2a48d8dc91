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
//! Whole disk (`--whole SIZE`): a database or a VM's file system writes all
//! over its disk, not over a prefilled first gigabyte. Each disk is then a
//! thin disk of `SIZE`, never written before the run: `qsd` and
//! `qsd-direct` serve a sparse file of that size, `mN`/`bN` a vDisk of that
//! size (thin on format-3 nodes, whose disk files keep their own size,
//! `--disk-size`). 4 KiB random writes at QD32 over the whole disk run as
//! one load per system, measured in two phases back to back — first touch
//! (the first `--seconds` after the warm-up) and steady (the next
//! `--seconds`) — then 4 KiB random reads at QD32 over the whole disk; the
//! report adds what each system's disk took for the writes against what the
//! guest wrote (space amplification). `quorum`, `nbd` and `ceph` are not
//! run: their disks are preallocated.
//!
//! Run: `cargo build --release --bin tessera --bin blkbench && target/release/blkbench`
//! (see `--help`). Results go to `bench/results/`. A/B against an older
//! build: `target/release/blkbench --base-bin /path/to/old/tessera` (with
//! `--only`, list the base systems too: `--only qsd,quorum,m1,m2,m3,b1,b2,b3`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
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
    /// Repetitions: each runs every workload on every system in turn
    /// [default: 3; 1 with --whole, where only the first repetition's first
    /// touch is on disks never written].
    #[arg(long)]
    reps: Option<usize>,
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
    /// `blkbench-latest.md` unless `--base-bin`; `blkbench-whole-<date>.*`
    /// only with `--whole`).
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
    /// Whole-disk mode: every disk is a thin disk of SIZE (K, M, G, T
    /// suffixes), not prefilled, and the workloads cover all of it: 4 KiB
    /// random writes at QD32 as one load, measured as first touch (the first
    /// --seconds after the warm-up) and steady (the next --seconds), then
    /// 4 KiB random reads at QD32; the report adds each system's space used
    /// per copy against what the guest wrote. qsd and qsd-direct serve a
    /// sparse file of SIZE, mN/bN a vDisk of SIZE; quorum, nbd and ceph are
    /// not run (their files would be preallocated at SIZE).
    #[arg(long, value_name = "SIZE", conflicts_with_all = ["range", "workloads", "ceph"])]
    whole: Option<String>,
    /// Bytes of each Tessera node's disk file (preallocated; K, M, G, T
    /// suffixes) [default: 3 × --range + 512 MiB; with --whole, room for
    /// every Tessera system's writes at 50,000 IOPS]. A write that finds its
    /// node's disk full fails: an I/O error in the report.
    #[arg(long, value_name = "SIZE")]
    disk_size: Option<String>,
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
    /// Which sequence of random offsets it draws (see [`seed`]): workloads
    /// that write one disk in turn draw different ones.
    stream: u64,
    phase: Phase,
}

/// Where a workload's run stands in a load that goes on over several
/// workloads (`--whole`: one stream of writes, measured in two phases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A run of its own: `--warmup` seconds unmeasured, then `--seconds`.
    Alone,
    /// The start of a load: `--warmup` seconds, recorded (to count what it
    /// wrote) but shown in no table; the workloads after it continue it.
    Warmup,
    /// Continues the previous workload's load on the same system, right
    /// after it: `--seconds`, no warm-up.
    Continued,
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
        stream: 0,
        phase: Phase::Alone,
    },
    Workload {
        name: "4k-randwrite-qd1",
        title: "4k randwrite QD1",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 1,
        stream: 0,
        phase: Phase::Alone,
    },
    Workload {
        name: "4k-randread-qd32",
        title: "4k randread QD32",
        write: false,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        stream: 0,
        phase: Phase::Alone,
    },
    Workload {
        name: "4k-randwrite-qd32",
        title: "4k randwrite QD32",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        stream: 0,
        phase: Phase::Alone,
    },
    Workload {
        name: "1m-seqread-qd4",
        title: "1M seqread QD4",
        write: false,
        pattern: Pattern::Sequential,
        block_size: 1 << 20,
        depth: 4,
        stream: 0,
        phase: Phase::Alone,
    },
    Workload {
        name: "1m-seqwrite-qd4",
        title: "1M seqwrite QD4",
        write: true,
        pattern: Pattern::Sequential,
        block_size: 1 << 20,
        depth: 4,
        stream: 0,
        phase: Phase::Alone,
    },
];

/// `--whole`: 4 KiB random writes at QD32 over the whole disk as one load —
/// the warm-up, then the first `--seconds` (first touch) and the next
/// `--seconds` (steady) — then 4 KiB random reads at QD32 over the whole
/// disk (on a large disk they land mostly on blocks never written: a hole
/// of the sparse file, an unallocated block of the vDisk).
const WHOLE_WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4k-randwrite-qd32-whole-warmup",
        title: "4k randwrite QD32 whole, warm-up",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        stream: 1,
        phase: Phase::Warmup,
    },
    Workload {
        name: "4k-randwrite-qd32-whole-first",
        title: "4k randwrite QD32 whole, first touch",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        stream: 2,
        phase: Phase::Continued,
    },
    Workload {
        name: "4k-randwrite-qd32-whole-steady",
        title: "4k randwrite QD32 whole, steady",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        stream: 3,
        phase: Phase::Continued,
    },
    Workload {
        name: "4k-randread-qd32-whole",
        title: "4k randread QD32 whole",
        write: false,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        stream: 4,
        phase: Phase::Alone,
    },
];

/// The seed of `w`'s run in repetition `rep`. The client draws offset `i`
/// from `splitmix64(seed + i)`: repetitions lie 2^32 apart in that counter
/// and streams 2^24 apart, so runs of fewer than 16 M I/Os never draw the
/// same offsets in the same order.
fn seed(w: &Workload, rep: usize) -> u64 {
    (rep as u64) << 32 | w.stream << 24 | w.depth as u64
}

/// The workloads in steps: a step runs on one system from its first
/// workload to its last, with no pause, before the next system takes its
/// turn — a load in its phases, or one workload alone.
fn steps(workloads: &[Workload]) -> Vec<&[Workload]> {
    workloads
        .chunk_by(|_, next| next.phase == Phase::Continued)
        .collect()
}

/// The client's job for `w` in repetition `rep`, over `[0, range)`.
fn job(w: &Workload, rep: usize, args: &Args, range: u64) -> Job {
    let (warmup, seconds) = match w.phase {
        Phase::Alone => (args.warmup, args.seconds),
        Phase::Warmup => (0.0, args.warmup),
        Phase::Continued => (0.0, args.seconds),
    };
    Job {
        write: w.write,
        pattern: w.pattern,
        block_size: w.block_size,
        depth: w.depth,
        range,
        start: 0,
        warmup: Duration::from_secs_f64(warmup),
        duration: Some(Duration::from_secs_f64(seconds)),
        seed: seed(w, rep),
    }
}

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
/// Systems `--whole` does not run: their disks are preallocated (three
/// `qemu-nbd` files, a single one, Ceph's OSD files), which at the sizes it
/// is for (1 TiB) is more than the machine has.
const NOT_WHOLE: [&str; 3] = ["quorum", "nbd", "ceph"];

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
    /// Where its disk takes space.
    space: Option<Space>,
    /// `--whole`: the bytes its writes took so far, all copies together,
    /// or why they could not be counted.
    taken: Result<u64, String>,
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
            space: None,
            taken: Ok(0),
        }
    }

    fn add_server(&mut self, s: Server) {
        self.commands.push(s.command.clone());
        self.watched.push(s.watched());
        self.servers.push(s);
    }

    /// Bytes its disk takes now, all copies together (see [`Space::taken`]).
    fn space_taken(
        &self,
        rt: &tokio::runtime::Runtime,
        zones: [Option<&TestZone>; 2],
    ) -> Result<u64> {
        self.space
            .as_ref()
            .context("no space to measure")?
            .taken(rt, zones)
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

/// Where a system's disk takes space.
#[derive(Debug, Clone)]
enum Space {
    /// A file: its allocated blocks.
    File(PathBuf),
    /// A Tessera datastore's disks (in the base's zone or this build's):
    /// the bytes their nodes report used, over `copies` copies.
    Disks {
        base: bool,
        disks: Vec<uuid::Uuid>,
        copies: u32,
    },
}

impl Space {
    /// Copies of what the guest writes.
    fn copies(&self) -> u32 {
        match self {
            Space::File(_) => 1,
            Space::Disks { copies, .. } => *copies,
        }
    }

    /// The bytes taken now, all copies together: a file's allocated blocks
    /// (`st_blocks` × 512), or the sum of what the zone (`zones[base]`)
    /// last heard its disks' nodes report used, read until two readings
    /// [`USED_SETTLE`] apart agree (nodes report with every heartbeat).
    fn taken(&self, rt: &tokio::runtime::Runtime, zones: [Option<&TestZone>; 2]) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let (zone, disks) = match self {
            Space::File(path) => {
                let meta = std::fs::metadata(path)
                    .with_context(|| format!("reading the size of {}", path.display()))?;
                return Ok(meta.blocks() * 512);
            }
            Space::Disks { base, disks, .. } => {
                let zone = zones[usize::from(*base)].context("no zone for the datastore")?;
                (zone, disks)
            }
        };
        let read = || -> Result<u64> {
            let all = rt
                .block_on(zone.api.disks())
                .context("listing the zone's disks")?;
            disks
                .iter()
                .map(|d| {
                    all.iter()
                        .find(|x| x.uuid == *d)
                        .map(|x| x.used)
                        .with_context(|| format!("disk {d} is not in the zone's list"))
                })
                .sum()
        };
        let mut last = read()?;
        for _ in 0..USED_READINGS {
            std::thread::sleep(USED_SETTLE);
            let now = read()?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        bail!(
            "the used bytes of disks {disks:?} still changed after {USED_READINGS} readings {} ms apart",
            USED_SETTLE.as_millis()
        )
    }
}

/// How long apart two readings of a zone's disk usage must agree: longer
/// than two of the nodes' heartbeats (200 ms in a [`TestZone`]).
const USED_SETTLE: Duration = Duration::from_millis(500);
/// Readings of a zone's disk usage before giving up on their agreeing.
const USED_READINGS: usize = 20;

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

/// A sparse file of `size` bytes: all of it a hole, nothing allocated.
fn sparse_file(path: &Path, size: u64) -> Result<()> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {} ({size} bytes, sparse)", path.display()))
}

/// The limit: a raw file, buffered or `O_DIRECT` + native AIO; preallocated,
/// or sparse (`--whole`).
fn setup_qsd(sys: &mut System, work: &Path, size: u64, direct: bool, sparse: bool) -> Result<()> {
    let image = work.join(format!("{}.img", sys.id));
    if sparse {
        sparse_file(&image, size)?;
    } else {
        preallocated_file(&image, size)?;
    }
    sys.space = Some(Space::File(image.clone()));
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

/// 4 KiB writes per second the default node disk of `--whole` has room for:
/// Tessera at issue 12's target, half of what `qemu-storage-daemon` on a
/// sparse file reaches at first touch here (81k IOPS on 2 cores; Tessera
/// mirrors=2 reached 1.1k on 2026-12-01).
const WHOLE_SIZED_IOPS: f64 = 50_000.0;

/// The default size of the node disk files with `--whole`, when a node may
/// hold `copies` copies: room for all the writes of `reps` repetitions
/// (warm-up, first touch and steady) at [`WHOLE_SIZED_IOPS`] to each copy,
/// and 512 MiB for the format's metadata, rounded up to a GiB.
fn whole_disk_size(copies: u64, reps: usize, warmup: f64, seconds: f64) -> u64 {
    let written = reps as f64 * (warmup + 2.0 * seconds) * WHOLE_SIZED_IOPS * 4096.0;
    (copies * written as u64 + 512 * MIB).div_ceil(GIB) * GIB
}

/// Bytes of the file system holding `dir` that an unprivileged user may
/// still take.
fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", dir.display()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` has room
    // for the `statvfs` the call writes.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    // SAFETY: statvfs returned 0: it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

/// A Tessera vDisk `ID/bench` (`ID` = `mN` or `bN`) of `size` bytes with
/// `mirrors=N`, served by its own `tessera vhost serve` (the zone's
/// executable) with one queue.
fn setup_tessera(
    sys: &mut System,
    rt: &tokio::runtime::Runtime,
    zone: &TestZone,
    mirrors: u32,
    size: u64,
    disk_size: u64,
) -> Result<()> {
    let ds = sys.id;
    let datastore = rt.block_on(async {
        // Placement fixed, the same in every zone: with 2 copies one is on
        // the vhost process's host and one on another host (the zone
        // picks 2 of the 3 disks otherwise, and a base zone whose copies
        // both landed on other hosts measured something else).
        let disks = match mirrors {
            1 => Some(vec![zone.disk_of_node(0).await]),
            2 => Some(vec![zone.disk_of_node(0).await, zone.disk_of_node(1).await]),
            _ => None,
        };
        let datastore = zone
            .api
            .create_datastore(&CreateDatastore {
                name: ds.into(),
                mirrors,
                stripes: None,
                disks,
            })
            .await
            .expect("create datastore");
        zone.vdisk(ds, "bench", size).await;
        datastore
    });
    sys.space = Some(Space::Disks {
        base: tessera_system(ds).is_some_and(|(base, _)| base),
        disks: datastore.disks,
        copies: mirrors,
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
        "# datastore {ds}: mirrors={mirrors} over {over}; vDisk {ds}/bench: {size} bytes"
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

impl Run {
    /// A run of `workload` on `system` that measured nothing (the base
    /// of a failed run's record).
    fn nothing(system: &str, workload: &str, rep: usize) -> Run {
        Run {
            system: system.to_string(),
            workload: workload.to_string(),
            rep,
            error: None,
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
        }
    }
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
    /// `--whole`: the size of every disk, measured over all of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    whole_bytes: Option<u64>,
    /// The size of the Tessera nodes' disk files, when a zone ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    node_disk_bytes: Option<u64>,
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
    /// `--whole`: what each system's disk took for the writes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    space: Vec<SpaceUse>,
}

/// What one system's disk took for the writes of a `--whole` run.
#[derive(Debug, Clone, Serialize)]
struct SpaceUse {
    system: String,
    /// Copies of what the guest wrote (a file: 1).
    copies: u32,
    /// Bytes the guest wrote and saw succeed (see [`guest_wrote`]).
    written_bytes: u64,
    /// Bytes the writes took, all copies together; `None`: not counted
    /// (`error` says why).
    used_bytes: Option<u64>,
    /// Used per copy over written (see [`amplification`]).
    amplification: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Bytes the guest wrote to `system` and saw succeed: the I/Os of its write
/// runs (warm-ups included, whose writes take space too) less the failed
/// ones, times their block size. A block written twice counts twice (over a
/// large disk few are).
fn guest_wrote(workloads: &[Workload], runs: &[Run], system: &str) -> u64 {
    runs.iter()
        .filter(|r| r.system == system && r.error.is_none())
        .filter_map(|r| {
            let w = workloads.iter().find(|w| w.name == r.workload && w.write)?;
            Some(r.ios.saturating_sub(r.io_errors) * w.block_size as u64)
        })
        .sum()
}

/// Space amplification: bytes used per copy over bytes written (1: thin
/// at the guest's block size; 256: a 1 MiB extent per 4 KiB write).
fn amplification(used: u64, copies: u32, written: u64) -> Option<f64> {
    (written > 0 && copies > 0).then(|| used as f64 / f64::from(copies) / written as f64)
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

/// Runs `job` (workload `w`'s, see [`job`]) on `sys`.
fn measure(sys: &mut System, w: &Workload, rep: usize, job: &Job) -> Result<Run> {
    sys.check_alive()?;
    let watched = sys.watched.clone();
    let mut before: Option<Result<CpuSample>> = None;
    let client = sys.client.as_mut().context("not connected")?;
    let m: Measured = client.run(job, &mut || before = Some(CpuSample::take(&watched)))?;
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

/// A byte count in GiB, MiB or KiB.
fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= GIB as f64 {
        format!("{:.2} GiB", b / GIB as f64)
    } else if b >= MIB as f64 {
        format!("{:.1} MiB", b / MIB as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// The "Space" section of a `--whole` report.
fn space_section(md: &mut String, rows: &[SpaceUse], systems: &[SystemReport]) {
    let _ = writeln!(md, "\n### Space\n");
    let _ = writeln!(
        md,
        "What each system's disk took for the writes above (every repetition's warm-up, first touch and steady writes): the sparse file's allocated blocks (`st_blocks` × 512), or the bytes Tessera's nodes report used on the datastore's disks (data blocks; the disk format's fixed metadata areas aside), all copies together and per copy. Written: the writes that succeeded × 4 KiB, as the guest sees them. Amplification: used per copy over written (1.00×: thin at 4 KiB).\n"
    );
    let _ = writeln!(
        md,
        "| system | copies | written | used, all copies | used per copy | amplification |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let label = systems
            .iter()
            .find(|s| s.id == r.system)
            .map_or(r.system.as_str(), |s| s.label.as_str());
        let (used, per_copy) = match r.used_bytes {
            Some(u) => (bytes(u), bytes(u / u64::from(r.copies.max(1)))),
            None => (
                format!(
                    "not counted: {}",
                    r.error
                        .as_deref()
                        .unwrap_or("")
                        .lines()
                        .next()
                        .unwrap_or("")
                ),
                "–".into(),
            ),
        };
        let amp = r
            .amplification
            .map_or_else(|| "–".into(), |a| format!("{a:.2}×"));
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {used} | {per_copy} | {amp} |",
            r.copies,
            bytes(r.written_bytes)
        );
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
    match s.whole_bytes {
        None => {
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
        }
        Some(size) => {
            let nodes = s
                .node_disk_bytes
                .map(|d| format!(" on nodes whose disk files are {} each", bytes(d)))
                .unwrap_or_default();
            let later = if s.reps > 1 {
                " Repetitions after the first write to disks the earlier ones wrote to: only the first repetition's first touch is on disks never written."
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "`{}` — {} repetition(s), interleaved (the writes on every system in turn, then the reads), over the whole of each disk: a thin disk of {}, never written before the run (`qsd`: a sparse file; Tessera: a vDisk{nodes}). 4 KiB random writes at QD32 as one load per system: {} s of warm-up (in no table, but counted in what the guest wrote), then {} s measured (first touch) and {} s more (steady), with no pause; then 4 KiB random reads at QD32 over the whole disk ({} s of warm-up, {} s measured; they land mostly on blocks never written).{later} One client for all: {}. Whole run: {:.0} s.\n",
                s.command,
                s.reps,
                bytes(size),
                s.warmup_s,
                s.seconds,
                s.seconds,
                s.warmup_s,
                s.seconds,
                s.client,
                report.total_seconds
            );
        }
    }
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
    if !report.space.is_empty() {
        space_section(&mut md, &report.space, &report.systems);
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
    let whole = args.whole.as_deref().map(parse_size).transpose()?;
    // The bytes of each disk the workloads use: the first `--range`, or all
    // of a `--whole` disk.
    let (range, range_flag) = match whole {
        Some(size) => (size, "--whole"),
        None => (parse_size(&args.range)?, "--range"),
    };
    if range < MIB || range % MIB != 0 {
        bail!("{range_flag} must be a positive multiple of 1 MiB");
    }
    let reps = args.reps.unwrap_or(if whole.is_some() { 1 } else { 3 });
    if reps == 0 || args.seconds <= 0.0 {
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
        if whole.is_some() && NOT_WHOLE.contains(&o.as_str()) {
            bail!("{o} does not run with --whole: its disks are preallocated");
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
        .filter(|i| whole.is_none() || !NOT_WHOLE.contains(i))
        .collect();
    if base_bin.is_some() && !selected.iter().any(|i| is_base(i)) {
        eprintln!("blkbench: --base-bin given but no base system (b1, b2, b3) selected");
    }
    if args.only.iter().any(|o| o == "ceph") && !args.ceph {
        bail!("ceph needs --ceph");
    }
    let workloads: Vec<Workload> = if whole.is_some() {
        WHOLE_WORKLOADS.to_vec()
    } else if args.workloads.is_empty() {
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
    let disk = match (&args.disk_size, whole) {
        (Some(s), _) => parse_size(s)?,
        // Each node may hold a copy of all three vDisks.
        (None, None) => 3 * range + 512 * MIB,
        // Node 0 holds a copy of every vDisk of its zone.
        (None, Some(_)) => {
            let in_zone = |base: bool| {
                selected
                    .iter()
                    .filter(|i| tessera_system(i).is_some_and(|(b, _)| b == base))
                    .count()
            };
            let copies = in_zone(false).max(in_zone(true));
            whole_disk_size(copies as u64, reps, args.warmup, args.seconds)
        }
    };
    if whole.is_some() && (needs_zone || needs_base_zone) {
        // Preallocated: make sure they fit beside whatever else this
        // machine is doing.
        let tmp = std::env::temp_dir();
        let need = 3 * disk * (u64::from(needs_zone) + u64::from(needs_base_zone));
        let free = free_bytes(&tmp)?;
        if need > free {
            bail!(
                "the Tessera nodes' disk files take {} ({} each, preallocated) but {} has {} free: pass a smaller --disk-size (writes that find no space fail, counted as I/O errors) or fewer Tessera systems",
                bytes(need),
                bytes(disk),
                tmp.display(),
                bytes(free)
            );
        }
    }
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
            "qsd" => setup_qsd(sys, &wp, range, false, whole.is_some()),
            "qsd-direct" => setup_qsd(sys, &wp, range, true, whole.is_some()),
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
    if whole.is_none() {
        prefill(&mut systems, range)?;
    }

    // The measurement: A B C A B C … (each step — a workload, or the phases
    // of one load — on every system in turn). A base system runs right
    // after its new counterpart (m1 b1 m2 b2 …), so that each pair sees the
    // same host, and right before it in odd repetitions (b1 m1 b2 m2 …).
    let ids: Vec<&str> = systems.iter().map(|s| s.id).collect();
    let zones = [zone.as_ref(), base_zone.as_ref()];
    let mut runs = Vec::new();
    let total = reps * workloads.len() * systems.len();
    let mut done = 0;
    for rep in 0..reps {
        let order = measurement_order(&ids, rep);
        for step in steps(&workloads) {
            // `--whole`: what a step's writes take on each disk.
            let writes = whole.is_some() && step.iter().any(|w| w.write);
            for &i in &order {
                let sys = &mut systems[i];
                let before = (writes && sys.failed.is_none() && sys.taken.is_ok())
                    .then(|| sys.space_taken(&rt, zones));
                for w in step {
                    done += 1;
                    if sys.failed.is_some() {
                        continue;
                    }
                    match measure(sys, w, rep, &job(w, rep, &args, range)) {
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
                                error: Some(format!("{e:#}")),
                                ..Run::nothing(sys.id, w.name, rep)
                            });
                            // A stalled or dead server: stop measuring it.
                            sys.failed = Some(format!("{} rep {rep}: {e:#}", w.name));
                            sys.client = None;
                        }
                    }
                }
                if let Some(before) = before {
                    let took = match &sys.failed {
                        Some(f) => Err(anyhow!("its writes failed: {f}")),
                        None => {
                            before.and_then(|b| Ok(sys.space_taken(&rt, zones)?.saturating_sub(b)))
                        }
                    };
                    match (took, &mut sys.taken) {
                        (Ok(t), Ok(sum)) => {
                            *sum += t;
                            eprintln!("{}: the writes took {}", sys.id, bytes(t));
                        }
                        (Err(e), _) => {
                            eprintln!("{}: space not counted: {e:#}", sys.id);
                            sys.taken = Err(format!("{e:#}"));
                        }
                        (Ok(_), Err(_)) => {}
                    }
                }
            }
        }
    }
    // `--whole`: what each system's writes took against what the guest wrote.
    let space: Vec<SpaceUse> = systems
        .iter()
        .filter(|_| whole.is_some())
        .filter_map(|s| {
            let copies = s.space.as_ref()?.copies();
            let written = guest_wrote(&workloads, &runs, s.id);
            let used = s.taken.as_ref().ok().copied();
            Some(SpaceUse {
                system: s.id.to_string(),
                copies,
                written_bytes: written,
                used_bytes: used,
                amplification: used.and_then(|u| amplification(u, copies, written)),
                error: s.taken.clone().err().or_else(|| s.failed.clone()),
            })
        })
        .collect();
    // The warm-ups are in the JSON, in no table.
    let shown_workloads: Vec<Workload> = workloads
        .iter()
        .copied()
        .filter(|w| w.phase != Phase::Warmup)
        .collect();

    let command = std::iter::once("target/release/blkbench".to_string())
        .chain(std::env::args().skip(1).map(|a| shell_quote(&a)))
        .collect::<Vec<_>>()
        .join(" ");
    let report = Report {
        machine,
        settings: Settings {
            reps,
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
            whole_bytes: whole,
            node_disk_bytes: (needs_zone || needs_base_zone).then_some(disk),
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
            &shown_workloads,
            &systems.iter().map(|s| s.id).collect::<Vec<_>>(),
            &runs,
        ),
        space,
        runs,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    let shown: Vec<&System> = systems.iter().collect();
    let md = markdown(&report, &shown_workloads, &shown);
    std::fs::create_dir_all(&args.out)?;
    let stamp = match whole {
        Some(_) => format!("whole-{}", utc_now().stamp()),
        None => utc_now().stamp(),
    };
    let md_path = args.out.join(format!("blkbench-{stamp}.md"));
    let json_path = args.out.join(format!("blkbench-{stamp}.json"));
    std::fs::write(&md_path, &md)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    // Neither an A/B run nor a whole-disk one is the new baseline of the
    // workloads blkbench-latest.md has: it stays.
    let not_latest = match (&base_bin, whole) {
        (Some(_), _) => Some("an A/B run"),
        (None, Some(_)) => Some("a --whole run"),
        (None, None) => None,
    };
    if not_latest.is_none() {
        std::fs::write(args.out.join("blkbench-latest.md"), &md)?;
    }
    println!("{md}");
    match not_latest {
        None => eprintln!(
            "wrote {}, {} and blkbench-latest.md in {:.0} s",
            md_path.display(),
            json_path.display(),
            report.total_seconds
        ),
        Some(why) => eprintln!(
            "wrote {} and {} in {:.0} s ({why}: blkbench-latest.md left as it was)",
            md_path.display(),
            json_path.display(),
            report.total_seconds
        ),
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
            seconds: 1.0,
            ios: iops as u64,
            iops,
            ..Run::nothing(system, "4k-randread-qd1", rep)
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
    fn a_whole_disk_load_runs_its_phases_back_to_back() {
        let names = |steps: Vec<&[Workload]>| -> Vec<Vec<&str>> {
            steps
                .iter()
                .map(|s| s.iter().map(|w| w.name).collect())
                .collect()
        };
        assert_eq!(
            names(steps(&WHOLE_WORKLOADS)),
            [
                vec![
                    "4k-randwrite-qd32-whole-warmup",
                    "4k-randwrite-qd32-whole-first",
                    "4k-randwrite-qd32-whole-steady"
                ],
                vec!["4k-randread-qd32-whole"],
            ]
        );
        assert_eq!(steps(&WORKLOADS).len(), WORKLOADS.len());
        assert!(steps(&[]).is_empty());

        let args = Args::try_parse_from([
            "blkbench",
            "--whole",
            "1T",
            "--seconds",
            "3",
            "--warmup",
            "0.5",
        ])
        .unwrap();
        let jobs: Vec<Job> = WHOLE_WORKLOADS
            .iter()
            .map(|w| job(w, 0, &args, 1 << 40))
            .collect();
        let secs = |d: Option<Duration>| d.unwrap().as_secs_f64();
        assert_eq!(
            (jobs[0].warmup, secs(jobs[0].duration)),
            (Duration::ZERO, 0.5)
        );
        assert_eq!(
            (jobs[1].warmup, secs(jobs[1].duration)),
            (Duration::ZERO, 3.0)
        );
        assert_eq!(
            (jobs[2].warmup, secs(jobs[2].duration)),
            (Duration::ZERO, 3.0)
        );
        assert_eq!(jobs[3].warmup, Duration::from_millis(500));
        assert!(jobs.iter().all(|j| j.range == 1 << 40 && j.start == 0));
        // Every phase draws its own offsets, in every repetition.
        let mut seeds: Vec<u64> = (0..3)
            .flat_map(|rep| WHOLE_WORKLOADS.iter().map(move |w| seed(w, rep)))
            .collect();
        seeds.sort();
        seeds.dedup();
        assert_eq!(seeds.len(), 3 * WHOLE_WORKLOADS.len());
        // The other workloads keep the seeds of earlier results.
        for w in &WORKLOADS {
            assert_eq!(seed(w, 2), 2 << 32 | w.depth as u64);
        }
    }

    #[test]
    fn whole_conflicts_with_the_options_it_replaces() {
        for extra in [["--range", "2G"], ["--workloads", "4k-randread-qd1"]] {
            let mut argv = vec!["blkbench", "--whole", "1T"];
            argv.extend(extra);
            assert!(Args::try_parse_from(argv).is_err(), "{extra:?}");
        }
        assert!(Args::try_parse_from(["blkbench", "--whole", "1T", "--ceph"]).is_err());
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
    }

    #[test]
    fn space_amplification_counts_what_the_guest_saw_written() {
        let mut runs = vec![
            run("m2", 0, 100.0),
            run("m2", 0, 1000.0),
            run("m2", 0, 900.0),
            run("m2", 0, 5000.0),
            run("qsd", 0, 2000.0),
        ];
        for (r, w) in runs.iter_mut().zip(WHOLE_WORKLOADS.iter().cycle()) {
            r.workload = w.name.into();
        }
        runs[4].workload = WHOLE_WORKLOADS[1].name.into();
        // Ten writes failed: the guest saw them fail, they took no space.
        runs[2].io_errors = 10;
        // Reads write nothing.
        assert_eq!(guest_wrote(&WHOLE_WORKLOADS, &runs, "m2"), 1990 * 4096);
        assert_eq!(guest_wrote(&WHOLE_WORKLOADS, &runs, "qsd"), 2000 * 4096);
        assert_eq!(guest_wrote(&WHOLE_WORKLOADS, &runs, "m3"), 0);
        // Two copies of 1 MiB per 4 KiB written: 256× per copy.
        let amp = amplification(2 * 1990 * MIB, 2, 1990 * 4096).unwrap();
        assert!((amp - 256.0).abs() < 1e-9);
        assert_eq!(amplification(4096, 1, 0), None);

        let rows = [
            SpaceUse {
                system: "m2".into(),
                copies: 2,
                written_bytes: GIB,
                used_bytes: Some(2 * GIB + 2 * 100 * MIB),
                amplification: amplification(2 * GIB + 2 * 100 * MIB, 2, GIB),
                error: None,
            },
            SpaceUse {
                system: "qsd".into(),
                copies: 1,
                written_bytes: 8 * 1024,
                used_bytes: None,
                amplification: None,
                error: Some("listing the zone's disks\nmore".into()),
            },
        ];
        let systems = [SystemReport {
            id: "m2".into(),
            label: "Tessera mirrors=2".into(),
            commands: Vec::new(),
            watched: Vec::new(),
            prefill_mib_per_s: None,
            failed: None,
        }];
        let mut md = String::new();
        space_section(&mut md, &rows, &systems);
        assert!(md.contains("| Tessera mirrors=2 | 2 | 1.00 GiB | 2.20 GiB | 1.10 GiB | 1.10× |"));
        assert!(md.contains("| qsd | 1 | 8 KiB | not counted: listing the zone's disks | – | – |"));
    }

    #[test]
    fn whole_node_disks_hold_every_copy_of_the_writes() {
        // 1 repetition of 0.5 + 2 × 3 s at 50k IOPS: 1.24 GiB a copy.
        assert_eq!(whole_disk_size(1, 1, 0.5, 3.0), 2 * GIB);
        assert_eq!(whole_disk_size(3, 1, 0.5, 3.0), 5 * GIB);
        assert_eq!(whole_disk_size(0, 3, 0.5, 5.0), GIB);
        assert_eq!(bytes(1536 * MIB), "1.50 GiB");
        assert_eq!(bytes(3 * MIB / 2), "1.5 MiB");
        assert_eq!(bytes(4096), "4 KiB");
    }

    #[test]
    fn median() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(&[]), None);
    }
}
