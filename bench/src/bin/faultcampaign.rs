//! `faultcampaign`: real faults against a zone of real processes, under a
//! self-checking guest workload.
//!
//! Each *schedule* (seeded; `--seed S` replays one) starts a zone on this
//! machine — `tessera api run`, four `tessera node run` on 127.0.0.2–5 with
//! small disk files of on-disk format version 3, the default (4 KiB
//! allocation; `--format-version 2`: extents) (node 0 on the vhost process's host: a local session;
//! the others over TCP), a `mirrors=2` or `mirrors=3` datastore and a thin
//! vDisk served by `tessera vhost serve` — and drives it with a `blkio`
//! client (`virtio-blk-vhost-user`) on several queues: writes whose every
//! 4 KiB block names its block, its write generation and the campaign (see
//! `tessera_bench::checked`), discards, write-zeroes, flushes, and reads
//! checked against a model of acknowledged writes, over the first 16 MiB
//! (written whole first; the last 4 MiB only read after that, so bytes
//! flipped there stay until a read or the scrub finds them).
//!
//! Meanwhile it injects, one at a time (never more than the policy
//! tolerates), and healing in between: `kill -9` of a storage node then a
//! restart; SIGSTOP/SIGCONT of a node; `kill -9` of the vhost process then a
//! new one (with or without `--force`), and the client reconnects; SIGTERM
//! of the vhost process then a new one; a restart of the API server
//! (`kill -9` or SIGTERM); bytes flipped in a stopped node's disk file (a
//! data block, a block checksum, one or every copy of an extent record or
//! of the vDisk's epoch slot, the primary superblock; on format 3 the
//! extent record is the metadata log page holding the block's allocation,
//! in one or both copies of the ring, or the checkpoint page holding it, in
//! the newest or both checkpoint areas, and a checksum still in the crc
//! journal is flipped there), followed by `tessera scrub`; a disk that fills
//! up (the client writes past the prefilled range until the nodes answer
//! NoSpace, then discards; meanwhile no copy may go stale and every request
//! that fails must fail for lack of space); and a node and the vhost
//! process killed together.
//!
//! After each fault the campaign waits for `tessera vdisk show --json` to
//! say `healthy`; at the end of a schedule it reads the whole range back,
//! stops the vhost process, runs `tessera scrub`, reads every copy straight
//! from the nodes' disk files (its own parser of the on-disk format: the
//! stored block checksums, the model, copies equal) and reads the range
//! back again through a new vhost process.
//!
//! Violations — a block reading as anything but what the model allows, an
//! I/O error or a stall the policy does not excuse, a process that died by
//! itself, a vDisk that does not heal, a copy gone stale for lack of space,
//! copies that differ — are printed with the schedule's seed and make the
//! exit status 1. Results: a markdown report in
//! `bench/results/faultcampaign-<stamp>.md` (and `faultcampaign-latest.md`)
//! or `--out FILE`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blkio::{iovec, Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use clap::Parser;
use serde_json::Value;
use tessera_bench::checked::{self, fill_block, DiskLayout, MapSource, Model, ReadSnap, BLOCK};
use tessera_bench::load::splitmix64;
use tessera_bench::machine::{utc_now, Machine};
use tessera_bench::procs::{file_id, send_signal, Ready, Server};
use tessera_tests::tessera_bin;

const MIB: u64 = 1 << 20;
/// Nodes per zone.
const NODES: usize = 4;
/// Each node's disk file (small, so a disk can fill up).
const DISK_MIB: u64 = 96;
/// The vDisk (thin: far more than the disks hold).
const VDISK_MIB: u64 = 256;
/// The range the model covers, written whole at the start.
const RANGE_MIB: u64 = 16;
/// Its last chunks are only read after the prefill (bytes flipped there
/// stay until a read or the scrub finds them: the workload's writes would
/// soon cover them elsewhere).
const COLD_MIB: u64 = 4;
/// Host name of the vhost process and node 0 (a local session).
const HOST: &str = "fc-host";
/// Largest request of the workload (and the memory of one slot).
const SLOT: usize = 256 * 1024;
/// A request in flight longer than this, outside a window where errors are
/// expected, is a stall (the volume's io_timeout is 30 s, degraded_wait 10 s).
const STALL: Duration = Duration::from_secs(60);
/// How long a healing may take.
const HEAL: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(about = "Real-process fault campaign with a self-checking workload")]
struct Args {
    /// Schedules to run [default: 8, or as many as `--duration` allows].
    #[arg(long)]
    schedules: Option<usize>,
    /// Start no new schedule after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// Replay the schedule with this seed (with `--schedules N`: the N
    /// schedules from this seed on, as a run that printed it as its first).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults per schedule [default: 3 to 5, from the seed].
    #[arg(long)]
    faults: Option<usize>,
    /// Markdown report [default: bench/results/faultcampaign-<stamp>.md and
    /// bench/results/faultcampaign-latest.md].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep every schedule's directory (logs, disk files); by default only
    /// those of schedules with violations are kept.
    #[arg(long)]
    keep: bool,
    /// Where schedules' directories go.
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
    /// Only print the schedules (seeds and faults) that would run.
    #[arg(long)]
    dry_run: bool,
    /// Fault kinds not to inject (comma list of node-kill, node-stop,
    /// vhost-kill, vhost-term, api-restart, corrupt, disk-full,
    /// node+vhost-kill); replay such a run with the same list.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Regions the corrupt faults flip bytes in (comma list of data, crc,
    /// extent-record, extent-record-both, epoch-slot, epoch-slot-both,
    /// superblock) [default: all, data twice as often]; replay such a run
    /// with the same list.
    #[arg(long, value_delimiter = ',')]
    regions: Vec<String>,
    /// The on-disk format of the nodes' disk files (`tessera node run
    /// --format-version`): 3, the nodes' default (space taken 4 KiB at a
    /// time; the extent record regions are then the metadata log and
    /// checkpoints), or 2 (extents).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=3))]
    format_version: u32,
}

// ---------------------------------------------------------------- random

/// A small deterministic generator (SplitMix64), so a seed replays a plan.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    /// Uniform in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// Uniform in `[lo, hi]`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------- plans

/// Where bytes are flipped in a node's disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    Data,
    Crc,
    /// The primary copy of the chunk's extent record.
    ExtentRecord,
    /// Every copy of it (format version 2 has two).
    ExtentRecordBoth,
    EpochSlot,
    EpochSlotBoth,
    Superblock,
}

#[derive(Debug, Clone)]
enum Fault {
    NodeKill {
        node: usize,
        down_ms: u64,
    },
    NodeStop {
        node: usize,
        stop_ms: u64,
    },
    VhostKill {
        gap_ms: u64,
        force: bool,
    },
    VhostTerm {
        gap_ms: u64,
    },
    ApiRestart {
        kill9: bool,
        down_ms: u64,
    },
    /// `copy`: the position, in its placement group, of the copy damaged.
    Corrupt {
        copy: usize,
        region: Region,
        salt: u64,
    },
    DiskFull {
        hold_ms: u64,
    },
    NodeAndVhostKill {
        node: usize,
        down_ms: u64,
    },
}

const KINDS: [&str; 8] = [
    "node-kill",
    "node-stop",
    "vhost-kill",
    "vhost-term",
    "api-restart",
    "corrupt",
    "disk-full",
    "node+vhost-kill",
];

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::NodeKill { .. } => KINDS[0],
            Fault::NodeStop { .. } => KINDS[1],
            Fault::VhostKill { .. } => KINDS[2],
            Fault::VhostTerm { .. } => KINDS[3],
            Fault::ApiRestart { .. } => KINDS[4],
            Fault::Corrupt { .. } => KINDS[5],
            Fault::DiskFull { .. } => KINDS[6],
            Fault::NodeAndVhostKill { .. } => KINDS[7],
        }
    }

    /// The kind, with the corrupted region for `corrupt`.
    fn kind_detail(&self) -> String {
        match self {
            Fault::Corrupt { region, .. } => format!("corrupt-{}", region_name(*region)),
            f => f.kind().to_string(),
        }
    }

    /// A fault of kind `kind`; a corruption in one of `regions` (empty:
    /// any, data twice as often).
    fn random(kind: usize, rng: &mut Rng, regions: &[Region]) -> Fault {
        let node = rng.below(NODES as u64) as usize;
        match kind {
            0 => Fault::NodeKill {
                node,
                down_ms: rng.range(300, 6000),
            },
            1 => Fault::NodeStop {
                node,
                stop_ms: rng.range(500, 8000),
            },
            2 => Fault::VhostKill {
                gap_ms: rng.range(0, 2000),
                force: rng.chance(70),
            },
            3 => Fault::VhostTerm {
                gap_ms: rng.range(0, 2000),
            },
            4 => Fault::ApiRestart {
                kill9: rng.chance(60),
                down_ms: rng.range(100, 3000),
            },
            5 => Fault::Corrupt {
                copy: rng.below(3) as usize,
                region: if regions.is_empty() {
                    [
                        Region::Data,
                        Region::Data,
                        Region::Crc,
                        Region::ExtentRecord,
                        Region::ExtentRecordBoth,
                        Region::EpochSlot,
                        Region::EpochSlotBoth,
                        Region::Superblock,
                    ][rng.below(8) as usize]
                } else {
                    regions[rng.below(regions.len() as u64) as usize]
                },
                salt: rng.next(),
            },
            6 => Fault::DiskFull {
                hold_ms: rng.range(1000, 4000),
            },
            _ => Fault::NodeAndVhostKill {
                node,
                down_ms: rng.range(500, 4000),
            },
        }
    }
}

const REGIONS: [Region; 7] = [
    Region::Data,
    Region::Crc,
    Region::ExtentRecord,
    Region::ExtentRecordBoth,
    Region::EpochSlot,
    Region::EpochSlotBoth,
    Region::Superblock,
];

fn region_name(r: Region) -> &'static str {
    match r {
        Region::Data => "data",
        Region::Crc => "crc",
        Region::ExtentRecord => "extent-record",
        Region::ExtentRecordBoth => "extent-record-both",
        Region::EpochSlot => "epoch-slot",
        Region::EpochSlotBoth => "epoch-slot-both",
        Region::Superblock => "superblock",
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::NodeKill { node, down_ms } => {
                write!(f, "kill -9 node {node}, restart after {down_ms} ms")
            }
            Fault::NodeStop { node, stop_ms } => {
                write!(f, "SIGSTOP node {node} for {stop_ms} ms, SIGCONT")
            }
            Fault::VhostKill { gap_ms, force } => write!(
                f,
                "kill -9 vhost, new one after {gap_ms} ms ({})",
                if *force {
                    "--force"
                } else {
                    "waits for the lease to expire"
                }
            ),
            Fault::VhostTerm { gap_ms } => write!(f, "SIGTERM vhost, new one after {gap_ms} ms"),
            Fault::ApiRestart { kill9, down_ms } => write!(
                f,
                "{} the API server, restart after {down_ms} ms",
                if *kill9 { "kill -9" } else { "SIGTERM" }
            ),
            Fault::Corrupt { copy, region, .. } => write!(
                f,
                "kill -9 the node of copy {copy} of a chunk of the range's read-only end, flip bytes in its disk file ({}), restart, scrub",
                region_name(*region)
            ),
            Fault::DiskFull { hold_ms } => write!(
                f,
                "write past the range until the disks fill, hold {hold_ms} ms, discard"
            ),
            Fault::NodeAndVhostKill { node, down_ms } => write!(
                f,
                "kill -9 node {node} and vhost together, new vhost, node back after {down_ms} ms"
            ),
        }
    }
}

/// One schedule, all from its seed.
#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    mirrors: u32,
    stripes: u32,
    queues: usize,
    depth: usize,
    /// The nodes' on-disk format version (not from the seed).
    format_version: u32,
    /// Workload time before each fault, and the fault.
    faults: Vec<(u64, Fault)>,
}

impl Plan {
    /// The plan of `seed` on disks of `format_version`; kinds named in
    /// `skip` are never drawn, corruptions only hit `regions` (empty: all):
    /// a plan with either list is another plan than without.
    fn new(
        seed: u64,
        format_version: u32,
        faults: Option<usize>,
        skip: &[String],
        regions: &[Region],
    ) -> Plan {
        let mut rng = Rng(splitmix64(seed));
        let mirrors = if rng.chance(25) { 3 } else { 2 };
        let stripes = rng.range(2, 4) as u32;
        let queues = rng.range(2, 4) as usize;
        let depth = rng.range(4, 12) as usize;
        let n = faults.unwrap_or_else(|| rng.range(3, 5) as usize);
        // The seed's own kind comes first, so consecutive seeds cover them all.
        let allowed: Vec<usize> = (0..KINDS.len())
            .filter(|k| !skip.iter().any(|s| s == KINDS[*k]))
            .collect();
        let featured = (seed % KINDS.len() as u64) as usize;
        let featured = (featured..featured + KINDS.len())
            .map(|k| k % KINDS.len())
            .find(|k| allowed.contains(k))
            .unwrap_or(0);
        let mut faults: Vec<(u64, Fault)> = (0..n)
            .map(|i| {
                let kind = if i == 0 {
                    featured
                } else if skip.is_empty() {
                    rng.below(KINDS.len() as u64) as usize
                } else {
                    allowed[rng.below(allowed.len() as u64) as usize]
                };
                (rng.range(500, 3000), Fault::random(kind, &mut rng, regions))
            })
            .collect();
        // At most one disk-full, and last: the disks stay nearly full after
        // it, and it must not hide the other faults' findings.
        let mut full: Vec<(u64, Fault)> = Vec::new();
        faults.retain(|f| {
            let is_full = matches!(f.1, Fault::DiskFull { .. });
            if is_full && full.is_empty() {
                full.push(f.clone());
            }
            !is_full
        });
        faults.extend(full);
        Plan {
            seed,
            mirrors,
            stripes,
            queues,
            depth,
            format_version,
            faults,
        }
    }
}

// ---------------------------------------------------------------- findings

#[derive(Debug, Clone)]
struct Violation {
    /// Seconds into the schedule.
    at: f64,
    during: String,
    kind: String,
    detail: String,
}

/// What the workload and the checks share.
struct Shared {
    seed: u64,
    t0: Instant,
    model: Mutex<Model>,
    /// Stop submitting; finish (or, with `abandon`, give up) what is in flight.
    stop: AtomicBool,
    abandon: AtomicBool,
    /// Guest I/O errors are expected now (vhost process going away, disks full).
    expect_errors: AtomicBool,
    during: Mutex<String>,
    violations: Mutex<Vec<Violation>>,
    /// Violations by kind (only the first few of each are recorded).
    kinds: Mutex<BTreeMap<String, u64>>,
    fill: Mutex<Fill>,
    writes: AtomicU64,
    reads: AtomicU64,
    zeroes: AtomicU64,
    flushes: AtomicU64,
    expected_errors: AtomicU64,
    bytes_checked: AtomicU64,
    /// Every violation, also those not recorded.
    total: AtomicU64,
}

impl Shared {
    fn violation(&self, kind: &str, detail: impl Into<String>) {
        let detail = detail.into();
        let during = self.during.lock().expect("during").clone();
        let at = self.t0.elapsed().as_secs_f64();
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut kinds = self.kinds.lock().expect("kinds");
        let n = kinds.entry(kind.to_string()).or_default();
        *n += 1;
        // Keep the output readable: the first few of each kind are printed
        // and recorded, the others counted.
        if *n <= 8 {
            eprintln!(
                "faultcampaign: VIOLATION seed {} at {at:.1} s ({during}): {kind}: {}",
                self.seed,
                first_chars(&detail, 600)
            );
            self.violations.lock().expect("violations").push(Violation {
                at,
                during,
                kind: kind.to_string(),
                detail,
            });
        } else if *n == 9 {
            eprintln!(
                "faultcampaign: VIOLATION seed {}: further {kind} violations are counted, not printed",
                self.seed
            );
        }
    }

    /// One violation for a read whose blocks do not match the model.
    fn bad_read(&self, what: &str, bad: &[checked::Mismatch]) {
        if let Some(first) = bad.first() {
            let mut detail = format!("{what}: {} bad block(s): {first}", bad.len());
            for m in bad.iter().skip(1).take(2) {
                let _ = write!(detail, "; {m}");
            }
            self.violation(first.kind(), detail);
        }
    }

    fn set_during(&self, s: &str) {
        *self.during.lock().expect("during") = s.to_string();
    }

    fn count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

fn first_chars(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// The disk-full fault's writes past the range, then its discards.
#[derive(Debug, Default)]
struct Fill {
    active: bool,
    next: u64,
    end: u64,
    inflight: u64,
    written: u64,
    error: Option<String>,
    discarding: bool,
    dnext: u64,
    dend: u64,
    dinflight: u64,
    derror: Option<String>,
}

// ---------------------------------------------------------------- client

fn blk_err(e: blkio::Error) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.errno())
}

/// A vhost-user-blk client with several queues (libblkio's pure-Rust
/// driver), each with `per_queue` bytes of shared memory.
struct MqClient {
    // Field order matters: the queues and the driver go before the memory.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    per_queue: usize,
    max_seg: usize,
}

impl MqClient {
    fn connect(socket: &Path, queues: usize, per_queue: usize) -> Result<MqClient> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blk_err)?;
        b.set_str("path", &socket.display().to_string())
            .map_err(blk_err)?;
        b.connect()
            .map_err(blk_err)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        b.set_i32("num-queues", queues as i32).map_err(blk_err)?;
        let started = b.start().map_err(blk_err)?;
        let max_seg = b.get_i32("max-segment-len").map_err(blk_err)?.max(0) as usize;
        let align = b.get_u64("mem-region-alignment").map_err(blk_err)? as usize;
        let per_queue = per_queue.div_ceil(align) * align;
        let region = b.alloc_mem_region(per_queue * queues).map_err(blk_err)?;
        b.map_mem_region(&region).map_err(blk_err)?;
        ensure!(started.queues.len() == queues, "fewer queues than asked");
        Ok(MqClient {
            queues: started.queues,
            blkio: b,
            region,
            per_queue,
            max_seg: if max_seg == 0 { SLOT } else { max_seg },
        })
    }

    /// Connects in a helper thread: a device that never answers the
    /// handshake must not hang the campaign.
    fn connect_within(
        socket: &Path,
        queues: usize,
        per_queue: usize,
        limit: Duration,
    ) -> Result<MqClient> {
        let (tx, rx) = std::sync::mpsc::channel();
        let socket = socket.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(MqClient::connect(&socket, queues, per_queue));
        });
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => bail!("the vhost-user handshake did not finish in {limit:?}"),
        }
    }

    /// Every queue with its own memory.
    fn split(&mut self) -> Vec<(&mut Blkioq, &mut [u8])> {
        // SAFETY: the region is `per_queue * queues.len()` bytes this client
        // allocated and mapped; it stays mapped until `drop`, after the
        // returned borrows of `self` end; the per-queue slices are disjoint.
        let all =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        self.queues
            .iter_mut()
            .zip(all.chunks_mut(self.per_queue))
            .collect()
    }
}

impl Drop for MqClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

// ---------------------------------------------------------------- workload

#[derive(Debug)]
enum Op {
    Write {
        first: u64,
        n: u64,
    },
    Zero {
        first: u64,
        n: u64,
        how: &'static str,
    },
    Read {
        snap: ReadSnap,
        n: u64,
    },
    Flush {
        seq: u64,
    },
    Fill,
    Discard,
}

struct Pending {
    op: Op,
    started: Instant,
    /// The request's segments: valid until it completes.
    _iov: Vec<iovec>,
    stall_noted: bool,
}

/// One queue's worker: keeps `depth` requests in flight until told to stop.
struct Worker<'a> {
    q: &'a mut Blkioq,
    mem: &'a mut [u8],
    qi: usize,
    sh: &'a Shared,
    rng: Rng,
    max_seg: usize,
    slots: Vec<Option<Pending>>,
    /// A request failed since the last pause (errors come back at once
    /// from a broken vDisk: no need to spin on them).
    failed: bool,
}

impl Worker<'_> {
    fn run(mut self) {
        let mut completions: Vec<MaybeUninit<Completion>> = (0..self.slots.len())
            .map(|_| MaybeUninit::uninit())
            .collect();
        let mut drain_from: Option<Instant> = None;
        loop {
            let stop = self.sh.stop.load(Ordering::Acquire);
            if stop && drain_from.is_none() {
                drain_from = Some(Instant::now());
            }
            if !stop {
                for s in 0..self.slots.len() {
                    if self.slots[s].is_none() {
                        self.submit(s);
                    }
                }
            }
            let inflight = self.slots.iter().filter(|s| s.is_some()).count();
            if inflight == 0 {
                if stop {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if let Some(t) = drain_from {
                if self.sh.abandon.load(Ordering::Acquire) || t.elapsed() > STALL {
                    break;
                }
            }
            let mut timeout = Duration::from_millis(100);
            match self.q.do_io(&mut completions, 1, Some(&mut timeout), None) {
                Ok(n) => {
                    for c in &completions[..n] {
                        // SAFETY: do_io initialised the first `n` completions.
                        let c = unsafe { c.assume_init_ref() };
                        self.complete(c.user_data, c.ret);
                    }
                }
                Err(e) if e.errno().raw_os_error() == libc::ETIME => {}
                Err(e) => {
                    if !self.sh.expect_errors.load(Ordering::Acquire) {
                        self.sh.violation(
                            "client",
                            format!(
                                "queue {}: waiting for completions: {}",
                                self.qi,
                                e.message()
                            ),
                        );
                    }
                    break;
                }
            }
            self.check_stalls();
            if std::mem::take(&mut self.failed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Whatever is still in flight is given up: writes may or may not land.
        for s in 0..self.slots.len() {
            if let Some(p) = self.slots[s].take() {
                self.finish(p, false, "abandoned");
            }
        }
    }

    fn slot_ptr(&mut self, s: usize) -> *mut u8 {
        assert!((s + 1) * SLOT <= self.mem.len(), "slot outside the memory");
        // SAFETY: slot `s` is `SLOT` bytes inside this queue's memory
        // (asserted just above).
        unsafe { self.mem.as_mut_ptr().add(s * SLOT) }
    }

    /// Segments of at most the device's `size_max`, in 4 KiB multiples of
    /// random lengths (as a guest's scatter-gather lists are).
    fn segments(&mut self, s: usize, len: usize) -> Vec<iovec> {
        let base = self.slot_ptr(s);
        let mut v = Vec::new();
        let mut off = 0;
        while off < len {
            let max = self.max_seg.min(len - off) / BLOCK;
            let n = if self.rng.chance(70) {
                max
            } else {
                self.rng.range(1, max as u64) as usize
            };
            v.push(iovec {
                // SAFETY: off + n * BLOCK ≤ len ≤ SLOT: inside slot `s`.
                iov_base: unsafe { base.add(off) }.cast(),
                iov_len: n * BLOCK,
            });
            off += n * BLOCK;
        }
        v
    }

    fn size(&mut self) -> u64 {
        match self.rng.below(100) {
            0..=49 => 1,
            50..=84 => self.rng.range(2, 16),
            _ => self.rng.range(17, (SLOT / BLOCK) as u64),
        }
    }

    fn submit(&mut self, s: usize) {
        if self.qi == 0 && self.submit_fill(s) {
            return;
        }
        let blocks = self.sh.model.lock().expect("model").blocks();
        let writable = blocks - COLD_MIB * MIB / BLOCK as u64;
        let r = self.rng.below(100);
        let (op, iov) = if r < 52 {
            let n = self.size();
            let first = self.rng.below(writable - n + 1);
            let (gen, tag) = {
                let mut m = self.sh.model.lock().expect("model");
                let Some(gen) = m.begin_write(first, n, false) else {
                    return;
                };
                (gen, m.tag)
            };
            let mem = &mut self.mem[s * SLOT..s * SLOT + n as usize * BLOCK];
            for (i, b) in mem.chunks_exact_mut(BLOCK).enumerate() {
                fill_block(b, first + i as u64, gen, tag);
            }
            let iov = self.segments(s, n as usize * BLOCK);
            self.q.writev(
                first * BLOCK as u64,
                iov.as_ptr(),
                iov.len() as u32,
                s,
                ReqFlags::empty(),
            );
            self.sh.writes.fetch_add(1, Ordering::Relaxed);
            (Op::Write { first, n }, iov)
        } else if r < 55 {
            let n = self.rng.range(1, 16);
            let first = self.rng.below(writable - n + 1);
            if self
                .sh
                .model
                .lock()
                .expect("model")
                .begin_write(first, n, true)
                .is_none()
            {
                return;
            }
            let (off, len) = (first * BLOCK as u64, n * BLOCK as u64);
            let how = match self.rng.below(3) {
                0 => {
                    self.q.discard(off, len, s, ReqFlags::empty());
                    "discard"
                }
                1 => {
                    self.q.write_zeroes(off, len, s, ReqFlags::empty());
                    "write-zeroes"
                }
                _ => {
                    self.q.write_zeroes(off, len, s, ReqFlags::NO_UNMAP);
                    "write-zeroes (no unmap)"
                }
            };
            self.sh.zeroes.fetch_add(1, Ordering::Relaxed);
            (Op::Zero { first, n, how }, Vec::new())
        } else if r < 96 {
            let n = self.size();
            let first = self.rng.below(blocks - n + 1);
            let snap = self.sh.model.lock().expect("model").begin_read(first, n);
            // Poison the buffer: a read that does not fill it reads as garbage.
            self.mem[s * SLOT..s * SLOT + n as usize * BLOCK].fill(0xEE);
            let iov = self.segments(s, n as usize * BLOCK);
            self.q.readv(
                first * BLOCK as u64,
                iov.as_ptr(),
                iov.len() as u32,
                s,
                ReqFlags::empty(),
            );
            self.sh.reads.fetch_add(1, Ordering::Relaxed);
            (Op::Read { snap, n }, iov)
        } else {
            let seq = self.sh.model.lock().expect("model").begin_flush();
            self.q.flush(s, ReqFlags::empty());
            self.sh.flushes.fetch_add(1, Ordering::Relaxed);
            (Op::Flush { seq }, Vec::new())
        };
        self.slots[s] = Some(Pending {
            op,
            started: Instant::now(),
            _iov: iov,
            stall_noted: false,
        });
    }

    /// Queue 0 writes past the range (or discards there) while the
    /// disk-full fault asks for it; whether it submitted something.
    fn submit_fill(&mut self, s: usize) -> bool {
        let mut f = self.sh.fill.lock().expect("fill");
        if f.active && f.error.is_none() && f.next < f.end {
            let off = f.next;
            f.next += SLOT as u64;
            f.inflight += 1;
            drop(f);
            let (gen, tag) = {
                let mut m = self.sh.model.lock().expect("model");
                (m.take_gen(), m.tag)
            };
            let mem = &mut self.mem[s * SLOT..(s + 1) * SLOT];
            for (i, b) in mem.chunks_exact_mut(BLOCK).enumerate() {
                fill_block(b, off / BLOCK as u64 + i as u64, gen, tag);
            }
            let iov = self.segments(s, SLOT);
            self.q
                .writev(off, iov.as_ptr(), iov.len() as u32, s, ReqFlags::empty());
            self.slots[s] = Some(Pending {
                op: Op::Fill,
                started: Instant::now(),
                _iov: iov,
                stall_noted: false,
            });
            return true;
        }
        if f.discarding && f.dnext < f.dend {
            let off = f.dnext;
            let len = (16 * MIB).min(f.dend - off);
            f.dnext += len;
            f.dinflight += 1;
            drop(f);
            self.q.discard(off, len, s, ReqFlags::empty());
            self.slots[s] = Some(Pending {
                op: Op::Discard,
                started: Instant::now(),
                _iov: Vec::new(),
                stall_noted: false,
            });
            return true;
        }
        false
    }

    fn complete(&mut self, s: usize, ret: i32) {
        let Some(p) = self.slots.get_mut(s).and_then(Option::take) else {
            self.sh
                .violation("client", format!("completion for unknown slot {s}"));
            return;
        };
        let err = (ret != 0).then(|| std::io::Error::from_raw_os_error(-ret).to_string());
        self.failed |= err.is_some();
        if let (Op::Read { snap, n }, None) = (&p.op, &err) {
            let data = &self.mem[s * SLOT..s * SLOT + *n as usize * BLOCK];
            let bad = self.sh.model.lock().expect("model").check_read(snap, data);
            self.sh
                .bytes_checked
                .fetch_add(*n * BLOCK as u64, Ordering::Relaxed);
            self.sh.bad_read(
                &format!(
                    "queue {} read of blocks [{}, {})",
                    self.qi,
                    snap.first,
                    snap.first + n
                ),
                &bad,
            );
        }
        match &err {
            None => self.finish(p, true, ""),
            Some(e) => {
                let e = e.clone();
                self.finish(p, false, &e)
            }
        }
    }

    /// Records the end of a request in the model; an error the moment does
    /// not excuse is a violation.
    fn finish(&mut self, p: Pending, ok: bool, why: &str) {
        let expected = self.sh.expect_errors.load(Ordering::Acquire) || why == "abandoned";
        let what = match &p.op {
            Op::Write { first, n } => {
                self.sh
                    .model
                    .lock()
                    .expect("model")
                    .end_write(*first, *n, ok);
                format!("write of blocks [{first}, {})", first + n)
            }
            Op::Zero { first, n, how } => {
                self.sh
                    .model
                    .lock()
                    .expect("model")
                    .end_write(*first, *n, ok);
                format!("{how} of blocks [{first}, {})", first + n)
            }
            Op::Read { snap, n } => format!("read of blocks [{}, {})", snap.first, snap.first + n),
            Op::Flush { seq } => {
                if ok {
                    self.sh.model.lock().expect("model").end_flush(*seq);
                }
                "flush".into()
            }
            Op::Fill => {
                let mut f = self.sh.fill.lock().expect("fill");
                f.inflight -= 1;
                if ok {
                    f.written += SLOT as u64;
                } else if f.error.is_none() {
                    f.error = Some(why.to_string());
                }
                if (f.error.is_some() || f.next >= f.end) && f.inflight == 0 {
                    f.active = false;
                }
                // The fill's writes are expected to fail.
                return;
            }
            Op::Discard => {
                let mut f = self.sh.fill.lock().expect("fill");
                f.dinflight -= 1;
                if !ok && f.derror.is_none() {
                    f.derror = Some(why.to_string());
                }
                if f.dnext >= f.dend && f.dinflight == 0 {
                    f.discarding = false;
                }
                return;
            }
        };
        if !ok {
            if expected {
                self.sh.expected_errors.fetch_add(1, Ordering::Relaxed);
            } else {
                self.sh.violation(
                    "io-error",
                    format!(
                        "queue {} {what} failed after {:.1} s: {why}",
                        self.qi,
                        p.started.elapsed().as_secs_f64()
                    ),
                );
            }
        }
    }

    fn check_stalls(&mut self) {
        if self.sh.expect_errors.load(Ordering::Acquire) {
            return;
        }
        for p in self.slots.iter_mut().flatten() {
            if !p.stall_noted && p.started.elapsed() > STALL {
                p.stall_noted = true;
                self.sh.violation(
                    "stall",
                    format!(
                        "queue {}: {:?} in flight for more than {STALL:?}",
                        self.qi, p.op
                    ),
                );
            }
        }
    }
}

/// A running workload: one thread per queue over one client.
struct Session {
    thread: std::thread::JoinHandle<()>,
}

fn start_session(sh: &Arc<Shared>, socket: &Path, plan: &Plan, n: u64) -> Result<Session> {
    sh.stop.store(false, Ordering::Release);
    sh.abandon.store(false, Ordering::Release);
    let mut client = MqClient::connect_within(
        socket,
        plan.queues,
        plan.depth * SLOT,
        Duration::from_secs(20),
    )?;
    let sh = sh.clone();
    let (seed, depth) = (plan.seed, plan.depth);
    let thread = std::thread::spawn(move || {
        let max_seg = client.max_seg;
        std::thread::scope(|scope| {
            for (qi, (q, mem)) in client.split().into_iter().enumerate() {
                let sh = &sh;
                scope.spawn(move || {
                    Worker {
                        q,
                        mem,
                        qi,
                        sh,
                        rng: Rng(splitmix64(seed ^ (n << 8) ^ qi as u64)),
                        max_seg,
                        slots: (0..depth).map(|_| None).collect(),
                        failed: false,
                    }
                    .run()
                });
            }
        });
        drop(client);
    });
    Ok(Session { thread })
}

fn stop_session(sh: &Shared, s: Session, abandon: bool) {
    sh.abandon.store(abandon, Ordering::Release);
    sh.stop.store(true, Ordering::Release);
    let _ = s.thread.join();
}

/// Reads the whole range through a new connection (nothing else in flight)
/// and checks every block; the number of bad blocks.
fn verify_all(sh: &Shared, socket: &Path, what: &str) -> Result<usize> {
    let mut client = MqClient::connect_within(socket, 1, SLOT, Duration::from_secs(20))?;
    let mut parts = client.split();
    let (q, mem) = parts.pop().context("no queue")?;
    let blocks = sh.model.lock().expect("model").blocks();
    let per = (SLOT / BLOCK) as u64;
    let mut bad = 0;
    let mut completions = [MaybeUninit::<Completion>::uninit()];
    let mut first = 0;
    while first < blocks {
        let n = per.min(blocks - first);
        let snap = sh.model.lock().expect("model").begin_read(first, n);
        mem[..n as usize * BLOCK].fill(0xEE);
        q.read(
            first * BLOCK as u64,
            mem.as_mut_ptr(),
            n as usize * BLOCK,
            0,
            ReqFlags::empty(),
        );
        let mut timeout = STALL;
        let got = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(blk_err)
            .with_context(|| format!("{what}: read of blocks [{first}, {})", first + n))?;
        ensure!(got == 1, "{what}: no completion");
        // SAFETY: do_io initialised the first completion.
        let c = unsafe { completions[0].assume_init_ref() };
        if c.ret != 0 {
            sh.violation(
                "io-error",
                format!(
                    "{what}: read of blocks [{first}, {}) failed: {}",
                    first + n,
                    std::io::Error::from_raw_os_error(-c.ret)
                ),
            );
            bad += n as usize;
        } else {
            let m = sh
                .model
                .lock()
                .expect("model")
                .check_read(&snap, &mem[..n as usize * BLOCK]);
            sh.bad_read(
                &format!("{what}: read of blocks [{first}, {})", first + n),
                &m,
            );
            bad += m.len();
        }
        sh.bytes_checked
            .fetch_add(n * BLOCK as u64, Ordering::Relaxed);
        first += n;
    }
    Ok(bad)
}

// ---------------------------------------------------------------- the zone

/// A loopback address `127.0.0.{last}` with a free port.
fn free_addr(last: u8) -> Result<SocketAddr> {
    Ok(TcpListener::bind(format!("127.0.0.{last}:0"))?.local_addr()?)
}

struct Node {
    dir: PathBuf,
    listen: SocketAddr,
    host: String,
    disk: PathBuf,
    proc: Option<Server>,
    stopped: bool,
}

/// A zone of real processes: the API server, the nodes, the vhost process.
struct Zone {
    dir: PathBuf,
    bin: String,
    api_addr: SocketAddr,
    api: Option<Server>,
    token: PathBuf,
    url: String,
    nodes: Vec<Node>,
    vhost: Option<Server>,
    socket: PathBuf,
    queues: usize,
    /// The nodes' disk files' format version (`--format-version`).
    format_version: u32,
}

impl Zone {
    fn start(dir: &Path, queues: usize, format_version: u32) -> Result<Zone> {
        std::fs::create_dir_all(dir)?;
        let api_addr = free_addr(1)?;
        let mut z = Zone {
            dir: dir.to_path_buf(),
            bin: tessera_bin().display().to_string(),
            api_addr,
            api: None,
            token: dir.join("api/api-token"),
            url: format!("http://{api_addr}"),
            nodes: Vec::new(),
            vhost: None,
            socket: dir.join("vdisk.sock"),
            queues,
            format_version,
        };
        z.start_api()?;
        for i in 0..NODES {
            let ndir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&ndir)?;
            z.nodes.push(Node {
                disk: ndir.join("disk0.img"),
                dir: ndir,
                listen: free_addr(2 + i as u8)?,
                host: if i == 0 {
                    HOST.into()
                } else {
                    format!("fc-peer{i}")
                },
                proc: None,
                stopped: false,
            });
            z.start_node(i)?;
        }
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let up = z
                .cli_json(&["node", "list"])
                .ok()
                .and_then(|v| v.as_array().cloned())
                .map(|a| a.iter().filter(|n| n["state"] == "up").count())
                .unwrap_or(0);
            if up == NODES {
                break;
            }
            ensure!(Instant::now() < until, "{up} of {NODES} nodes came up");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(z)
    }

    fn start_api(&mut self) -> Result<()> {
        let args: Vec<String> = [
            "api",
            "run",
            "--dir",
            &self.dir.join("api").display().to_string(),
            "--listen",
            &self.api_addr.to_string(),
            "--rebuild-after-secs",
            "3600",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.api = Some(Server::spawn_restartable(
            "api",
            &self.bin,
            &args,
            &self.dir.join("api.log"),
            Ready::Tcp(self.api_addr),
        )?);
        Ok(())
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let args: Vec<String> = [
            "node",
            "run",
            "--dir",
            &n.dir.display().to_string(),
            "--listen",
            &n.listen.to_string(),
            "--host",
            &n.host,
            "--heartbeat-ms",
            "200",
            "--disk",
            &n.disk.display().to_string(),
            "--disk-size",
            &format!("{DISK_MIB}M"),
            "--format-version",
            &self.format_version.to_string(),
            "--api",
            &self.url,
            "--token-file",
            &self.token.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = Server::spawn_restartable(
            &format!("node{i}"),
            &self.bin,
            &args,
            &n.dir.join("node.log"),
            Ready::Tcp(n.listen),
        )?;
        self.nodes[i].proc = Some(s);
        self.nodes[i].stopped = false;
        Ok(())
    }

    fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
        self.nodes[i].stopped = false;
    }

    /// Starts `tessera vhost serve`; waits for its (new) socket.
    fn start_vhost(&mut self, force: bool) -> Result<()> {
        let mut args: Vec<String> = [
            "vhost",
            "serve",
            "ds/v",
            "--socket",
            &self.socket.display().to_string(),
            "--queues",
            &self.queues.to_string(),
            "--host",
            HOST,
            "--api",
            &self.url,
            "--token-file",
            &self.token.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if force {
            args.push("--force".into());
        }
        let old = file_id(&self.socket);
        self.vhost = Some(Server::spawn_restartable(
            "vhost",
            &self.bin,
            &args,
            &self.dir.join("vhost.log"),
            Ready::NewSocket(&self.socket, old),
        )?);
        Ok(())
    }

    /// `tessera ARGS --json` against this zone, with a time limit.
    fn cli(&self, args: &[&str], limit: Duration) -> Result<std::process::Output> {
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("TESSERA_API", &self.url)
            .env("TESSERA_TOKEN_FILE", &self.token)
            .env("TESSERA_HOME", &self.dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running tessera")?;
        let until = Instant::now() + limit;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(child.wait_with_output()?);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`tessera {}` did not finish in {limit:?}", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a, Duration::from_secs(20))?;
        ensure!(
            out.status.success(),
            "`tessera {}`: {}",
            a.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

// ---------------------------------------------------------------- schedules

/// What one schedule did.
struct Outcome {
    seed: u64,
    plan: Plan,
    secs: f64,
    faults: Vec<String>,
    notes: Vec<String>,
    violations: Vec<Violation>,
    /// All violations, by kind (only the first few are recorded).
    total: u64,
    kinds: BTreeMap<String, u64>,
    stats: String,
    dir: Option<PathBuf>,
}

/// Where a disk file holds a vDisk's chunks, as read by `checked`.
enum Held {
    /// Formats 1 and 2: chunk → extent record.
    Extents(BTreeMap<u64, checked::ExtentRec>),
    /// Format 3: the block map and every block's stored crc.
    Blocks(Box<(checked::ThinMap, checked::ThinCrcs)>),
}

struct Run {
    plan: Plan,
    sh: Arc<Shared>,
    zone: Zone,
    session: Option<Session>,
    sessions: u64,
    notes: Vec<String>,
    vdisk: uuid::Uuid,
}

impl Run {
    fn note(&mut self, s: String) {
        eprintln!("faultcampaign:   {s}");
        self.notes.push(s);
    }

    fn start_session(&mut self) -> Result<()> {
        self.sessions += 1;
        let s = start_session(&self.sh, &self.zone.socket, &self.plan, self.sessions)?;
        self.session = Some(s);
        Ok(())
    }

    fn stop_session(&mut self, abandon: bool) {
        if let Some(s) = self.session.take() {
            stop_session(&self.sh, s, abandon);
        }
    }

    /// A new vhost process and a new client session; a vhost that cannot
    /// start (e.g. the lease is still held) is retried for 30 s.
    fn restart_vhost(&mut self, force: bool) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match self.zone.start_vhost(force) {
                Ok(()) => break,
                Err(e) if Instant::now() < until => {
                    let msg = format!("{e:#}");
                    if !msg.contains("lease") && !msg.contains("held") {
                        eprintln!(
                            "faultcampaign:   vhost did not start, retrying: {}",
                            first_chars(&msg, 300)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e).context("the vhost process does not start"),
            }
        }
        self.start_session()
    }

    /// Processes that died by themselves are violations; they are restarted.
    fn check_processes(&mut self) {
        for i in 0..NODES {
            let exited = self.zone.nodes[i].proc.as_mut().and_then(|p| p.exited());
            if let Some(status) = exited {
                let tail = self.zone.nodes[i]
                    .proc
                    .as_ref()
                    .map(|p| p.log_tail(8))
                    .unwrap_or_default();
                self.sh.violation(
                    "crash",
                    format!("node {i} exited by itself ({status}); log tail:\n{tail}"),
                );
                self.zone.nodes[i].proc = None;
                if let Err(e) = self.zone.start_node(i) {
                    self.sh
                        .violation("crash", format!("node {i} does not restart: {e:#}"));
                }
            }
        }
        let api_exited = self.zone.api.as_mut().and_then(|p| p.exited());
        if let Some(status) = api_exited {
            let tail = self
                .zone
                .api
                .as_ref()
                .map(|p| p.log_tail(8))
                .unwrap_or_default();
            self.sh.violation(
                "crash",
                format!("the API server exited by itself ({status}); log tail:\n{tail}"),
            );
            if let Err(e) = self.zone.start_api() {
                self.sh
                    .violation("crash", format!("the API server does not restart: {e:#}"));
            }
        }
        let vhost_exited = self.zone.vhost.as_mut().and_then(|p| p.exited());
        if let Some(status) = vhost_exited {
            let tail = self
                .zone
                .vhost
                .as_ref()
                .map(|p| p.log_tail(12))
                .unwrap_or_default();
            self.sh.violation(
                "crash",
                format!("the vhost process exited by itself ({status}); log tail:\n{tail}"),
            );
            self.zone.vhost = None;
            self.sh.expect_errors.store(true, Ordering::Release);
            self.stop_session(true);
            if let Err(e) = self.restart_vhost(true) {
                self.sh
                    .violation("crash", format!("no vhost process after a crash: {e:#}"));
            }
            self.sh.expect_errors.store(false, Ordering::Release);
        }
    }

    /// Runs the workload for `ms`, watching the processes.
    fn run_for(&mut self, ms: u64) {
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            self.check_processes();
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now().min(until)));
        }
    }

    fn show(&self) -> Result<Value> {
        self.zone.cli_json(&["vdisk", "show", "ds/v"])
    }

    /// Notes what the zone says about the vDisk while a fault is on.
    fn note_health(&mut self, when: &str) {
        let s = match self.show() {
            Ok(v) => format!(
                "{when}: health {}, {} stale cop(ies), {} chunk(s) to resync",
                v["health"],
                v["stale"].as_array().map_or(0, Vec::len),
                v["repair"].as_array().map_or(0, |a| a
                    .iter()
                    .map(|r| r["dirty_chunks"].as_u64().unwrap_or(0))
                    .sum::<u64>())
            ),
            Err(e) => format!(
                "{when}: vdisk show failed: {}",
                first_chars(&format!("{e:#}"), 200)
            ),
        };
        self.note(s);
    }

    /// Waits until the vDisk is healthy with nothing left to repair or move.
    fn wait_healthy(&mut self, what: &str) -> bool {
        let start = Instant::now();
        let mut last = String::from("no answer");
        while start.elapsed() < HEAL {
            self.check_processes();
            match self.show() {
                Ok(v) => {
                    let healthy = v["health"] == "healthy"
                        && v["repair"].as_array().is_none_or(|a| a.is_empty())
                        && v["placement"]["moves"]
                            .as_array()
                            .is_none_or(|a| a.is_empty());
                    if healthy {
                        return true;
                    }
                    last = format!(
                        "health {}, stale {}, repair {}",
                        v["health"], v["stale"], v["repair"]
                    );
                }
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        self.sh.violation(
            "no-heal",
            format!("{what}: not healthy after {HEAL:?}: {last}"),
        );
        false
    }

    /// Like [`Run::wait_healthy`]; a vDisk that does not heal ends the
    /// schedule (what follows would only pile up consequences).
    fn heal_or_abort(&mut self, what: &str) -> Result<()> {
        ensure!(
            self.wait_healthy(what),
            "the vDisk did not heal: the rest of the schedule is skipped"
        );
        Ok(())
    }

    fn inject(&mut self, fault: &Fault) -> Result<()> {
        match *fault {
            Fault::NodeKill { node, down_ms } => {
                self.zone.kill_node(node);
                self.run_for(down_ms);
                self.note_health(&format!("node {node} down {down_ms} ms"));
                self.zone.start_node(node)?;
            }
            Fault::NodeStop { node, stop_ms } => {
                let pid = self.zone.nodes[node].proc.as_ref().map_or(0, |p| p.pid());
                self.zone.nodes[node].stopped = true;
                send_signal(pid, libc::SIGSTOP);
                self.run_for(stop_ms);
                self.note_health(&format!("node {node} stopped {stop_ms} ms"));
                send_signal(pid, libc::SIGCONT);
                self.zone.nodes[node].stopped = false;
            }
            Fault::VhostKill { gap_ms, force } => {
                self.sh.expect_errors.store(true, Ordering::Release);
                if let Some(mut v) = self.zone.vhost.take() {
                    v.kill();
                }
                self.stop_session(true);
                std::thread::sleep(Duration::from_millis(gap_ms));
                let r = self.restart_vhost(force);
                self.sh.expect_errors.store(false, Ordering::Release);
                r?;
            }
            Fault::VhostTerm { gap_ms } => {
                self.sh.expect_errors.store(true, Ordering::Release);
                if let Some(mut v) = self.zone.vhost.take() {
                    v.signal(libc::SIGTERM);
                    match v.wait_exit(Duration::from_secs(30)) {
                        Some(s) if s.success() => {}
                        Some(s) => self.sh.violation(
                            "vhost-exit",
                            format!(
                                "the vhost process exited {s} on SIGTERM; log tail:\n{}",
                                v.log_tail(10)
                            ),
                        ),
                        None => {
                            self.sh.violation(
                                "vhost-exit",
                                "the vhost process did not exit within 30 s of SIGTERM",
                            );
                            v.kill();
                        }
                    }
                }
                self.stop_session(true);
                std::thread::sleep(Duration::from_millis(gap_ms));
                // A clean exit released the lease: no --force needed.
                let r = match self.zone.start_vhost(false) {
                    Ok(()) => self.start_session(),
                    Err(e) => {
                        self.sh.violation(
                            "vhost-open",
                            format!(
                                "a new vhost process cannot open the vDisk after a clean stop: {}",
                                first_chars(&format!("{e:#}"), 500)
                            ),
                        );
                        self.restart_vhost(true)
                    }
                };
                self.sh.expect_errors.store(false, Ordering::Release);
                r?;
            }
            Fault::ApiRestart { kill9, down_ms } => {
                if let Some(mut a) = self.zone.api.take() {
                    if kill9 {
                        a.kill();
                    } else {
                        a.signal(libc::SIGTERM);
                        if a.wait_exit(Duration::from_secs(20)).is_none() {
                            self.sh.violation(
                                "api-exit",
                                "the API server did not exit within 20 s of SIGTERM",
                            );
                            a.kill();
                        }
                    }
                }
                self.run_for(down_ms);
                self.zone.start_api()?;
            }
            Fault::Corrupt { copy, region, salt } => self.corrupt(copy, region, salt)?,
            Fault::DiskFull { hold_ms } => self.disk_full(hold_ms)?,
            Fault::NodeAndVhostKill { node, down_ms } => {
                self.sh.expect_errors.store(true, Ordering::Release);
                if let Some(mut v) = self.zone.vhost.take() {
                    v.kill();
                }
                self.zone.kill_node(node);
                self.stop_session(true);
                let r = self.restart_vhost(true);
                self.sh.expect_errors.store(false, Ordering::Release);
                r?;
                self.run_for(down_ms);
                self.note_health(&format!("node {node} down, new vhost"));
                self.zone.start_node(node)?;
            }
        }
        Ok(())
    }

    /// Flips bytes in node `node`'s disk file while it is down, restarts it,
    /// lets the workload run, then scrubs (the vhost process stopped
    /// meanwhile) and checks the copies themselves.
    fn corrupt(&mut self, copy: usize, region: Region, salt: u64) -> Result<()> {
        let mut rng = Rng(salt);
        // A chunk of the range's read-only end, and its copy number `copy`
        // (the first copy is the one scrub compares the others with).
        let chunk = RANGE_MIB - COLD_MIB + rng.below(COLD_MIB);
        let groups = self.groups()?;
        let group = &groups[(chunk % groups.len() as u64) as usize];
        let copy = copy % group.len();
        let disk = group[copy].clone();
        let disks = self.zone.cli_json(&["disk", "list"])?;
        let path = disks
            .as_array()
            .and_then(|a| a.iter().find(|d| d["uuid"] == disk.as_str()))
            .and_then(|d| d["path"].as_str())
            .context("the disk of that copy is not listed")?
            .to_string();
        let node = self
            .zone
            .nodes
            .iter()
            .position(|n| n.disk.display().to_string() == path)
            .context("no node has that disk")?;
        self.zone.kill_node(node);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.zone.nodes[node].disk)?;
        let l = DiskLayout::read(&file)?;
        let (flips, what) = if l.thin.is_some() {
            self.thin_flips(&file, &l, node, chunk, region, &mut rng)?
        } else {
            self.extent_flips(&file, &l, node, chunk, region, &mut rng)?
        };
        for &(offset, len) in &flips {
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, offset)?;
            for b in &mut bytes {
                *b ^= rng.range(1, 255) as u8;
            }
            file.write_all_at(&bytes, offset)?;
        }
        drop(file);
        self.note(format!(
            "flipped bytes (offset, count) {flips:?} of node {node}'s disk {} (format version {}; copy {copy} of chunk {chunk}): {what}",
            l.disk, l.version
        ));
        let log = self.zone.dir.join("vhost.log");
        let log_from = std::fs::metadata(&log).map_or(0, |m| m.len());
        self.zone.start_node(node)?;
        self.heal_or_abort("after the corrupted node returned")?;
        self.run_for(rng.range(1000, 3000));
        // Did a guest read meet it (the vhost process logs a copy's failed read)?
        let text = std::fs::read(&log).unwrap_or_default();
        let new = String::from_utf8_lossy(&text[(log_from as usize).min(text.len())..]).to_string();
        match new
            .lines()
            .find(|l| l.contains("Checksum") || l.contains("checksum"))
        {
            Some(line) => self.note(format!(
                "a guest read met it first: {}",
                first_chars(line.trim(), 300)
            )),
            None => self.note("the vhost log shows no checksum failure before the scrub".into()),
        }
        // Scrub needs the vDisk offline.
        self.stop_session(false);
        self.stop_vhost_cleanly();
        self.scrub("after corruption");
        self.inspect_copies("after corruption and scrub");
        self.restart_vhost(false)?;
        Ok(())
    }

    /// Where to flip bytes in a format-v1/v2 disk file (`region` of chunk
    /// `chunk`): `(offset, length)` pairs, and what they are.
    fn extent_flips(
        &self,
        file: &std::fs::File,
        l: &DiskLayout,
        node: usize,
        chunk: u64,
        region: Region,
        rng: &mut Rng,
    ) -> Result<(Vec<(u64, u64)>, String)> {
        let (extents, _) = l.extents(file)?;
        let r = *extents
            .iter()
            .find(|r| r.vdisk == self.vdisk && r.chunk == chunk)
            .with_context(|| format!("node {node} has no extent for chunk {chunk}"))?;
        let b = rng.below(l.extent_size / BLOCK as u64);
        // (offset, bytes) flipped, what they are.
        let mut record = |table: u64| (table + r.extent * 64 + rng.below(60), 1);
        Ok(match region {
            Region::Data => (
                vec![(
                    l.data_of(r.extent) + b * BLOCK as u64 + rng.below(BLOCK as u64 - 8),
                    rng.range(1, 4),
                )],
                format!("chunk {} block {b} data", r.chunk),
            ),
            Region::Crc => (
                vec![(l.crc_of(r.extent, b) + rng.below(4), 1)],
                format!("chunk {} block {b} checksum", r.chunk),
            ),
            Region::ExtentRecord => (
                vec![record(l.extent_table.0)],
                format!("extent record of chunk {} (primary copy)", r.chunk),
            ),
            Region::ExtentRecordBoth => {
                let mut v = vec![record(l.extent_table.0)];
                if l.extent_mirror != 0 {
                    v.push(record(l.extent_mirror));
                }
                (
                    v,
                    format!("extent record of chunk {} (every copy)", r.chunk),
                )
            }
            Region::EpochSlot | Region::EpochSlotBoth | Region::Superblock => {
                self.shared_flips(file, l, region, rng)?
            }
        })
    }

    /// The flips of the regions both formats share: the vDisk's epoch slot
    /// (one or both copies) and the primary superblock.
    fn shared_flips(
        &self,
        file: &std::fs::File,
        l: &DiskLayout,
        region: Region,
        rng: &mut Rng,
    ) -> Result<(Vec<(u64, u64)>, String)> {
        if region == Region::Superblock {
            return Ok((vec![(rng.below(128), 1)], "primary superblock".into()));
        }
        // The epoch slot of the vDisk (in the primary table).
        let mut table = vec![0u8; l.epoch_table.1 as usize];
        file.read_exact_at(&mut table, l.epoch_table.0)?;
        let slot = table
            .chunks_exact(64)
            .position(|s| &s[0..4] == b"TSEP" && s[8..24] == *self.vdisk.as_bytes())
            .unwrap_or(0) as u64;
        let mut v = vec![(l.epoch_table.0 + slot * 64 + rng.below(60), 1)];
        if region == Region::EpochSlotBoth && l.epoch_mirror != 0 {
            v.push((l.epoch_mirror + slot * 64 + rng.below(60), 1));
        }
        let what = format!(
            "the vDisk's epoch slot {slot} ({})",
            if v.len() == 1 {
                "primary copy"
            } else {
                "every copy"
            }
        );
        Ok((v, what))
    }

    /// Where to flip bytes in a format-v3 disk file (`region` of a block of
    /// chunk `chunk` the node holds): `(offset, length)` pairs, and what
    /// they are. The extent-record regions become the metadata log page
    /// (one copy of the ring, or both) or the checkpoint page (the newest
    /// area, or both areas) holding the block's allocation record.
    fn thin_flips(
        &self,
        file: &std::fs::File,
        l: &DiskLayout,
        node: usize,
        chunk: u64,
        region: Region,
        rng: &mut Rng,
    ) -> Result<(Vec<(u64, u64)>, String)> {
        let map = l.thin_map(file)?;
        let blocks = map
            .blocks(self.vdisk, chunk)
            .with_context(|| format!("node {node} holds no block of chunk {chunk}"))?;
        let bpc = blocks.len() as u64;
        let b0 = rng.below(bpc);
        let (b, place) = (0..bpc)
            .map(|i| (b0 + i) % bpc)
            .find_map(|b| blocks[b as usize].map(|p| (b, p)))
            .context("no block held")?;
        let untrusted = if map.untrusted() {
            " (the map on this disk was already not whole)"
        } else {
            ""
        };
        let run = format!(
            "blocks {}..{} of chunk {chunk} at physical blocks {}..{}, generation {}",
            place.first,
            place.first + place.count,
            place.phys - u64::from(b as u32 - place.first),
            place.phys - u64::from(b as u32 - place.first) + u64::from(place.count),
            place.generation
        );
        Ok(match region {
            Region::Data => (
                vec![(
                    l.block_data(place.phys) + rng.below(BLOCK as u64 - 8),
                    rng.range(1, 4),
                )],
                format!(
                    "chunk {chunk} block {b} data (physical block {}){untrusted}",
                    place.phys
                ),
            ),
            Region::Crc => {
                let crcs = l.thin_crcs(file)?;
                match crcs.pending.get(&place.phys) {
                    Some(&at) => (
                        vec![(at + rng.below(32), 1)],
                        format!(
                            "chunk {chunk} block {b} checksum: its crc journal record (physical block {}, after the applied mark {}: not in the crc table yet; replay drops it)",
                            place.phys,
                            crcs.journal.header.map_or(0, |h| h.applied)
                        ),
                    ),
                    None => (
                        vec![(l.block_crc(place.phys) + rng.below(4), 1)],
                        format!(
                            "chunk {chunk} block {b} checksum (crc table entry of physical block {})",
                            place.phys
                        ),
                    ),
                }
            }
            Region::ExtentRecord | Region::ExtentRecordBoth => {
                let both = region == Region::ExtentRecordBoth;
                match place.source {
                    MapSource::Log { pos, seq, slot } => {
                        let copies: Vec<usize> = if both {
                            vec![0, 1]
                        } else {
                            vec![rng.below(2) as usize]
                        };
                        let mut v = Vec::new();
                        for c in &copies {
                            v.push((l.log_record(*c, pos, slot)? + rng.below(64), 1));
                        }
                        let live = map.log_pages.len();
                        let newest = map.log_pages.last().map_or(0, |p| p.1);
                        (
                            v,
                            format!(
                                "metadata log page {seq} (ring position {pos}; {}), record {slot}: the allocation of {run}; the live log has {live} page(s), the newest {newest}{untrusted}",
                                if both {
                                    "both copies of the ring".to_string()
                                } else {
                                    format!(
                                        "the {} copy of the ring only",
                                        ["first", "second"][copies[0]]
                                    )
                                }
                            ),
                        )
                    }
                    MapSource::Checkpoint { area, page, slot } => {
                        let newest = map.checkpoint.as_ref().context("a checkpoint")?;
                        let mut v =
                            vec![(l.checkpoint_record(area, page, slot)? + rng.below(64), 1)];
                        let mut what = format!(
                            "checkpoint area {area} (the newest checkpoint, seq {}, {} page(s)), page {page} record {slot}: the allocation of {run}",
                            newest.seq, newest.pages
                        );
                        match (&map.older, both) {
                            (Some(o), true) => {
                                // The older checkpoint's page holding the same
                                // block, else its first page.
                                let hit = o.records.iter().find(|(_, _, r)| match *r {
                                    checked::MapRecord::Alloc {
                                        vdisk,
                                        chunk: c,
                                        first,
                                        count,
                                        ..
                                    } => {
                                        vdisk == self.vdisk
                                            && c == chunk
                                            && (first..first.saturating_add(count))
                                                .contains(&(b as u32))
                                    }
                                    checked::MapRecord::Free { .. }
                                    | checked::MapRecord::Trusted { .. } => false,
                                });
                                let (p, at) = match hit {
                                    Some(&(p, s, _)) => {
                                        (p, l.checkpoint_record(o.area, p, s)? + rng.below(64))
                                    }
                                    None => (0, l.thin()?.checkpoints[o.area] + rng.below(40)),
                                };
                                v.push((at, 1));
                                let _ = write!(
                                    what,
                                    "; and area {} (the older checkpoint, seq {}), page {p} ({})",
                                    o.area,
                                    o.seq,
                                    if hit.is_some() {
                                        "the record of the same block"
                                    } else {
                                        "its header: the block is in no record there"
                                    }
                                );
                            }
                            (Some(o), false) => {
                                let _ = write!(
                                    what,
                                    "; area {} holds the older checkpoint, seq {} (replay must start there)",
                                    o.area, o.seq
                                );
                            }
                            (None, _) => {
                                what.push_str("; the other area holds no whole checkpoint");
                            }
                        }
                        what.push_str(untrusted);
                        (v, what)
                    }
                }
            }
            Region::EpochSlot | Region::EpochSlotBoth | Region::Superblock => {
                self.shared_flips(file, l, region, rng)?
            }
        })
    }

    fn stop_vhost_cleanly(&mut self) {
        if let Some(mut v) = self.zone.vhost.take() {
            v.signal(libc::SIGTERM);
            match v.wait_exit(Duration::from_secs(30)) {
                Some(s) if s.success() => {}
                Some(s) => self.sh.violation(
                    "vhost-exit",
                    format!(
                        "the vhost process exited {s} on SIGTERM; log tail:\n{}",
                        v.log_tail(10)
                    ),
                ),
                None => {
                    self.sh.violation(
                        "vhost-exit",
                        "the vhost process did not exit within 30 s of SIGTERM",
                    );
                    v.kill();
                }
            }
        }
    }

    /// `tessera scrub ds/v`; what it found is noted (and is a violation
    /// when `clean` was expected).
    fn scrub(&mut self, what: &str) -> Option<Value> {
        let out = match self.zone.cli(
            &["scrub", "ds/v", "--json", "--bandwidth", "1G"],
            Duration::from_secs(300),
        ) {
            Ok(o) => o,
            Err(e) => {
                self.sh.violation("scrub", format!("{what}: {e:#}"));
                return None;
            }
        };
        if !out.status.success() {
            self.sh.violation(
                "scrub",
                format!(
                    "{what}: `tessera scrub` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        self.note(format!(
            "scrub {what}: {} chunks; checksum errors {}; mismatches {}; repaired {}",
            v["chunks"], v["checksum_errors"], v["mismatches"], v["repaired"]
        ));
        Some(v)
    }

    /// Reads every copy of every chunk of the range from the nodes' disk
    /// files and checks the stored block checksums, the model and that the
    /// copies are equal. The vhost process must be stopped.
    fn inspect_copies(&mut self, what: &str) {
        // Moves (a full disk's sheds, and the rebalances back once it has
        // room again) change which disks hold what: inspect a placement
        // that stayed the same, with no move, for 3 s.
        self.wait_placement_settled(what);
        let r = self.inspect_copies_inner(what);
        if let Err(e) = r {
            self.sh.violation(
                "inspect",
                format!("{what}: cannot inspect the copies: {e:#}"),
            );
        }
    }

    /// Waits (at most [`HEAL`]) until the vDisk's placement has had no move
    /// and the same version for 3 s; notes it if it never settles.
    fn wait_placement_settled(&mut self, what: &str) {
        let start = Instant::now();
        let mut seen: Option<(Value, Instant)> = None;
        while start.elapsed() < HEAL {
            if let Ok(v) = self.show() {
                let version = v["placement"]["version"].clone();
                let moving = v["placement"]["moves"]
                    .as_array()
                    .is_some_and(|m| !m.is_empty());
                match &seen {
                    _ if moving => seen = None,
                    Some((old, since)) if *old == version => {
                        if since.elapsed() >= Duration::from_secs(3) {
                            return;
                        }
                    }
                    _ => seen = Some((version, Instant::now())),
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.note(format!(
            "{what}: the placement kept changing for {HEAL:?}; copies inspected anyway"
        ));
    }

    /// The vDisk's placement groups (disk uuids, in copy order).
    fn groups(&self) -> Result<Vec<Vec<String>>> {
        let view = self.show()?;
        let groups: Vec<Vec<String>> = view["placement"]["groups"]
            .as_array()
            .context("no groups")?
            .iter()
            .map(|g| {
                g.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| d.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        ensure!(!groups.is_empty(), "no placement groups");
        Ok(groups)
    }

    fn inspect_copies_inner(&mut self, what: &str) -> Result<()> {
        let groups = self.groups()?;
        // disk uuid → (node, file, layout, where its chunks are)
        let mut disks = BTreeMap::new();
        for (i, n) in self.zone.nodes.iter().enumerate() {
            let f = std::fs::File::open(&n.disk)?;
            let l = DiskLayout::read(&f)?;
            let held = if l.thin.is_some() {
                let map = l.thin_map(&f)?;
                if map.untrusted() {
                    self.notes.push(format!(
                        "{what}: node {i}'s block map does not read back whole ({}{} inconsistent record(s){}); {} chunk(s) trusted again",
                        map.loss
                            .iter()
                            .map(|l| format!("{l}, "))
                            .collect::<String>(),
                        map.inconsistent.len(),
                        map.inconsistent
                            .first()
                            .map(|r| format!(", first: {}", first_chars(r, 200)))
                            .unwrap_or_default(),
                        map.trusted.len()
                    ));
                }
                let crcs = l.thin_crcs(&f)?;
                Held::Blocks(Box::new((map, crcs)))
            } else {
                let (ext, damaged) = l.extents(&f)?;
                if damaged > 0 {
                    self.notes.push(format!(
                        "{what}: node {i}'s extent table has {damaged} damaged record(s)"
                    ));
                }
                Held::Extents(
                    ext.iter()
                        .filter(|r| r.vdisk == self.vdisk)
                        .map(|r| (r.chunk, *r))
                        .collect(),
                )
            };
            disks.insert(l.disk.to_string(), (i, f, l, held));
        }
        let chunk = MIB;
        let bpc = chunk / BLOCK as u64;
        let mut problems = 0;
        for c in 0..RANGE_MIB {
            let group = &groups[(c % groups.len() as u64) as usize];
            let snap = self
                .sh
                .model
                .lock()
                .expect("model")
                .begin_read(c * bpc, bpc);
            let mut first: Option<(String, Vec<u8>, &str)> = None;
            for d in group {
                let Some((node, f, l, held)) = disks.get(d) else {
                    self.sh.violation(
                        "copies",
                        format!("{what}: disk {d} of the placement is on no node"),
                    );
                    problems += 1;
                    continue;
                };
                // A format-v3 node that does not trust its block map reads
                // the chunk as an error, unless written whole since.
                let unread = match held {
                    Held::Blocks(b) if !b.0.trusts(self.vdisk, c) => {
                        " [the node does not trust its block map and this chunk was not written whole since: it reads as an error there]"
                    }
                    _ => "",
                };
                let mut data = vec![0u8; chunk as usize];
                // Per block: (stored crc, tag), for the blocks that hold data.
                let mut stored: Vec<Option<(u32, u32)>> = vec![None; bpc as usize];
                let holds = match held {
                    Held::Extents(map) => match map.get(&c) {
                        Some(rec) => {
                            f.read_exact_at(&mut data, l.data_of(rec.extent))?;
                            let mut crcs = vec![0u8; bpc as usize * 4];
                            f.read_exact_at(&mut crcs, l.crc_of(rec.extent, 0))?;
                            for (s, crc) in stored.iter_mut().zip(crcs.chunks_exact(4)) {
                                *s = Some((u32::from_le_bytes(crc.try_into()?), rec.tag()));
                            }
                            true
                        }
                        // Unallocated: reads as zeros.
                        None => false,
                    },
                    Held::Blocks(b) => {
                        let (map, crcs) = &**b;
                        match map.blocks(self.vdisk, c) {
                            Some(places) => {
                                for (i, p) in places.iter().enumerate() {
                                    // A block that holds nothing reads as zeros.
                                    let Some(p) = p else { continue };
                                    let at = i * BLOCK;
                                    f.read_exact_at(
                                        &mut data[at..at + BLOCK],
                                        l.block_data(p.phys),
                                    )?;
                                    let tag =
                                        checked::block_tag(self.vdisk, c, p.generation, i as u32);
                                    stored[i] = Some((crcs.crcs[p.phys as usize], tag));
                                }
                                true
                            }
                            None => false,
                        }
                    }
                };
                for (b, (blk, s)) in data.chunks_exact(BLOCK).zip(&stored).enumerate() {
                    let Some((crc, tag)) = s else { continue };
                    if *crc != checked::crc32c(blk) ^ tag && problems < 20 {
                        problems += 1;
                        self.sh.violation(
                            "copies",
                            format!(
                                "{what}: node {node} disk {d} chunk {c} block {b}: stored checksum does not match the data{unread}"
                            ),
                        );
                    }
                }
                let bad = self
                    .sh
                    .model
                    .lock()
                    .expect("model")
                    .check_read(&snap, &data);
                if let Some(m) = bad.first() {
                    problems += 1;
                    self.sh.violation(
                        "copies",
                        format!(
                            "{what}: the copy on node {node} (disk {d}) of chunk {c}{}: {} bad blocks, first: {m}{unread}",
                            match (holds, held) {
                                (true, _) => "",
                                (false, Held::Extents(_)) => " (no extent)",
                                (false, Held::Blocks(_)) => " (no block held)",
                            },
                            bad.len()
                        ),
                    );
                }
                match &first {
                    None => first = Some((d.clone(), data, unread)),
                    Some((d0, x, unread0)) if *x != data => {
                        problems += 1;
                        let differ = x
                            .chunks_exact(BLOCK)
                            .zip(data.chunks_exact(BLOCK))
                            .filter(|(a, b)| a != b)
                            .count();
                        self.sh.violation(
                            "copies",
                            format!("{what}: chunk {c}: copies on disks {d0}{unread0} and {d}{unread} differ in {differ} blocks"),
                        );
                    }
                    Some(_) => {}
                }
            }
            if problems > 40 {
                break;
            }
        }
        if problems == 0 {
            self.notes.push(format!(
                "{what}: every copy of the {RANGE_MIB} chunks of the range matches the model, its checksums and the other copies"
            ));
        }
        Ok(())
    }

    /// The client writes past the range until the disks fill, the workload
    /// runs on full disks for `hold_ms`, then the client discards there.
    ///
    /// A full disk fails only the writes that need space (an I/O error for
    /// the guest: the fill's, and the workload's into blocks it discarded),
    /// and takes no copy away: while it is the only fault in force (it is
    /// always the schedule's last, after the others healed), the zone must
    /// list no stale copy and call the vDisk healthy — right after the
    /// disks filled, all through the hold, and after the discards
    /// (`stale-on-full` otherwise) — and every request the vhost process
    /// failed meanwhile must have failed for lack of space.
    fn disk_full(&mut self, hold_ms: u64) -> Result<()> {
        // Only a vDisk healthy at the start says something about the full
        // disks (the previous fault healed: it should be).
        let mut watch = match self.show() {
            Ok(v)
                if v["health"] == "healthy" && v["stale"].as_array().is_none_or(Vec::is_empty) =>
            {
                true
            }
            Ok(v) => {
                self.note(format!(
                    "disk-full: the vDisk is not healthy before the disks fill (health {}, stale {}): no stale-on-full check",
                    v["health"], v["stale"]
                ));
                false
            }
            Err(e) => {
                self.note(format!(
                    "disk-full: vdisk show failed before the disks fill ({}): no stale-on-full check",
                    first_chars(&format!("{e:#}"), 200)
                ));
                false
            }
        };
        let vhost_log = self.zone.dir.join("vhost.log");
        let log_from = std::fs::metadata(&vhost_log).map_or(0, |m| m.len());
        self.sh.expect_errors.store(true, Ordering::Release);
        {
            let mut f = self.sh.fill.lock().expect("fill");
            *f = Fill {
                active: true,
                next: RANGE_MIB * MIB,
                end: VDISK_MIB * MIB,
                ..Fill::default()
            };
        }
        let start = Instant::now();
        loop {
            self.run_for(200);
            let f = self.sh.fill.lock().expect("fill");
            if !f.active {
                break;
            }
            if start.elapsed() > Duration::from_secs(180) {
                drop(f);
                self.sh
                    .violation("stall", "the disk-full writes did not finish in 180 s");
                break;
            }
        }
        let (written, error) = {
            let mut f = self.sh.fill.lock().expect("fill");
            f.active = false;
            (f.written, f.error.clone())
        };
        self.note(format!(
            "disk-full: wrote {} MiB past the range in {:.1} s; {}",
            written / MIB,
            start.elapsed().as_secs_f64(),
            match &error {
                Some(e) => format!("first error: {e}"),
                None => "no write failed (the disks never filled)".into(),
            }
        ));
        if let Ok(disks) = self.zone.cli_json(&["disk", "list"]) {
            let used: Vec<String> = disks
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|d| {
                            format!(
                                "{}/{} MiB",
                                d["used"].as_u64().unwrap_or(0) / MIB,
                                d["capacity"].as_u64().unwrap_or(0) / MIB
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.note(format!("disk-full: disks used {}", used.join(", ")));
        }
        // The guest sees an I/O error for a write the disks have no space
        // for (the vhost log below says why).
        if let Some(e) = &error {
            if !e.contains(&format!("os error {}", libc::EIO)) {
                self.sh.violation(
                    "fill-error",
                    format!("disk-full: the first failed fill write failed with {e}, not an I/O error (EIO)"),
                );
            }
        }
        // Checks of the zone's view that found no stale copy.
        let mut clean = 0;
        if watch {
            watch = self.no_stale_on_full("right after the disks filled");
            clean += u32::from(watch);
        }
        let until = Instant::now() + Duration::from_millis(hold_ms);
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            self.run_for((until - now).as_millis().min(500) as u64);
            if watch {
                watch = self.no_stale_on_full("while the workload runs on the full disks");
                clean += u32::from(watch);
            }
        }
        {
            let mut f = self.sh.fill.lock().expect("fill");
            f.discarding = true;
            f.dnext = RANGE_MIB * MIB;
            f.dend = VDISK_MIB * MIB;
        }
        let start = Instant::now();
        loop {
            self.run_for(200);
            let f = self.sh.fill.lock().expect("fill");
            if !f.discarding {
                if let Some(e) = &f.derror {
                    let e = e.clone();
                    drop(f);
                    self.sh.violation(
                        "io-error",
                        format!("disk-full: a discard past the range failed: {e}"),
                    );
                }
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                drop(f);
                self.sh
                    .violation("stall", "disk-full: the discards did not finish in 120 s");
                break;
            }
        }
        if watch && self.no_stale_on_full("after the discards") {
            clean += 1;
            self.note(format!(
                "disk-full: the zone listed no stale copy and called the vDisk healthy at each of {clean} checks (filled, hold, discarded)"
            ));
        }
        self.sh.expect_errors.store(false, Ordering::Release);
        self.failed_requests_on_full(&vhost_log, log_from, error.is_some());
        Ok(())
    }

    /// While the disk-full fault alone is in force: the zone lists no stale
    /// copy and calls the vDisk healthy (nothing to resync), or that is a
    /// `stale-on-full` violation. Whether it was so (a vdisk show that
    /// fails is noted, not judged).
    fn no_stale_on_full(&mut self, when: &str) -> bool {
        let v = match self.show() {
            Ok(v) => v,
            Err(e) => {
                self.note(format!(
                    "disk-full, {when}: vdisk show failed: {}",
                    first_chars(&format!("{e:#}"), 200)
                ));
                return true;
            }
        };
        let stale = v["stale"].as_array().map_or(0, Vec::len);
        // A nearly full disk sheds copies onto disks with room: a move's
        // target is being filled, which takes no copy away.
        let targets: Vec<&Value> = v["placement"]["moves"]
            .as_array()
            .map(|m| m.iter().map(|m| &m["to"]).collect())
            .unwrap_or_default();
        let repair = v["repair"].as_array().map_or(0, |r| {
            r.iter().filter(|c| !targets.contains(&&c["disk"])).count()
        });
        if v["health"] == "healthy" && stale == 0 && repair == 0 {
            return true;
        }
        self.sh.violation(
            "stale-on-full",
            format!(
                "disk-full, {when}: the zone says health {}, stale {}, repair {}, dirty {} (no copy may go stale for lack of space)",
                v["health"], v["stale"], v["repair"], v["dirty"]
            ),
        );
        false
    }

    /// The requests the vhost process failed since `from` (its log's
    /// length when the disks began to fill): each must have failed for lack
    /// of space (the fill's writes, the workload's into blocks it had
    /// discarded), and if the fill saw an error, some did.
    fn failed_requests_on_full(&mut self, log: &Path, from: u64, fill_failed: bool) {
        let text = match std::fs::read(log) {
            Ok(b) => String::from_utf8_lossy(&b[(from as usize).min(b.len())..]).into_owned(),
            Err(e) => {
                self.note(format!("disk-full: cannot read {}: {e}", log.display()));
                return;
            }
        };
        let failed: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("request failed"))
            .collect();
        let (space, other): (Vec<&str>, Vec<&str>) = failed
            .iter()
            .partition(|l| l.contains("no space left on disk"));
        self.note(format!(
            "disk-full: the vhost process failed {} request(s) for lack of space, {} for another reason",
            space.len(),
            other.len()
        ));
        if fill_failed && space.is_empty() {
            self.sh.violation(
                "fill-error",
                "disk-full: the fill's writes failed, but the vhost process failed no request for lack of space (NoSpace)",
            );
        }
        if let Some(first) = other.first() {
            self.sh.violation(
                "io-error",
                format!(
                    "disk-full: {} request(s) failed for another reason than lack of space while the full disks were the only fault, first: {}",
                    other.len(),
                    first_chars(first, 400)
                ),
            );
        }
    }
}

fn run_schedule(args: &Args, plan: Plan, index: usize) -> Outcome {
    let t0 = Instant::now();
    eprintln!(
        "faultcampaign: schedule {index}: seed {} (format {}, mirrors={}, stripes={}, {} queues × depth {}): {}",
        plan.seed,
        plan.format_version,
        plan.mirrors,
        plan.stripes,
        plan.queues,
        plan.depth,
        plan.faults
            .iter()
            .map(|(_, f)| f.kind_detail())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let dir = args.work_dir.join(format!(
        "faultcampaign-{}-{}",
        std::process::id(),
        plan.seed
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let tag = splitmix64(plan.seed ^ 0x5eed);
    let sh = Arc::new(Shared {
        seed: plan.seed,
        t0,
        model: Mutex::new(Model::new(RANGE_MIB * MIB / BLOCK as u64, tag)),
        stop: AtomicBool::new(false),
        abandon: AtomicBool::new(false),
        expect_errors: AtomicBool::new(false),
        during: Mutex::new("setup".into()),
        violations: Mutex::new(Vec::new()),
        kinds: Mutex::new(BTreeMap::new()),
        fill: Mutex::new(Fill::default()),
        writes: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        zeroes: AtomicU64::new(0),
        flushes: AtomicU64::new(0),
        expected_errors: AtomicU64::new(0),
        bytes_checked: AtomicU64::new(0),
        total: AtomicU64::new(0),
    });
    let mut notes = Vec::new();
    let mut faults = Vec::new();
    let r = schedule_body(&plan, &sh, &dir, &mut notes, &mut faults);
    if let Err(e) = r {
        sh.violation("aborted", format!("the schedule could not go on: {e:#}"));
    }
    let violations = sh.violations.lock().expect("violations").clone();
    let kinds = sh.kinds.lock().expect("kinds").clone();
    let keep = args.keep || sh.count() > 0;
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let stats = format!(
        "{} writes, {} discards/write-zeroes, {} reads, {} flushes, {} MiB checked, {} expected errors",
        sh.writes.load(Ordering::Relaxed),
        sh.zeroes.load(Ordering::Relaxed),
        sh.reads.load(Ordering::Relaxed),
        sh.flushes.load(Ordering::Relaxed),
        sh.bytes_checked.load(Ordering::Relaxed) / MIB,
        sh.expected_errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "faultcampaign: schedule {index} (seed {}) done in {:.0} s: {} violation(s); {stats}",
        plan.seed,
        t0.elapsed().as_secs_f64(),
        sh.total.load(Ordering::Relaxed)
    );
    Outcome {
        seed: plan.seed,
        plan,
        secs: t0.elapsed().as_secs_f64(),
        faults,
        notes,
        violations,
        total: sh.total.load(Ordering::Relaxed),
        kinds,
        stats,
        dir: keep.then_some(dir),
    }
}

fn schedule_body(
    plan: &Plan,
    sh: &Arc<Shared>,
    dir: &Path,
    notes_out: &mut Vec<String>,
    faults_out: &mut Vec<String>,
) -> Result<()> {
    let zone = Zone::start(dir, plan.queues, plan.format_version)?;
    let ds = zone.cli(
        &[
            "datastore",
            "create",
            "ds",
            "--mirrors",
            &plan.mirrors.to_string(),
            "--stripes",
            &plan.stripes.to_string(),
        ],
        Duration::from_secs(20),
    )?;
    ensure!(
        ds.status.success(),
        "datastore create: {}",
        String::from_utf8_lossy(&ds.stderr)
    );
    let vd = zone.cli_json(&[
        "vdisk",
        "create",
        "ds/v",
        "--size",
        &format!("{VDISK_MIB}M"),
    ])?;
    let vdisk: uuid::Uuid = vd["uuid"]
        .as_str()
        .context("vdisk uuid")?
        .parse()
        .context("vdisk uuid")?;
    let mut run = Run {
        plan: plan.clone(),
        sh: sh.clone(),
        zone,
        session: None,
        sessions: 0,
        notes: Vec::new(),
        vdisk,
    };
    let r = run_faults(&mut run, faults_out);
    run.stop_session(true);
    notes_out.append(&mut run.notes);
    // Tear down: everything is killed when `run.zone` is dropped.
    drop(run);
    r
}

fn run_faults(run: &mut Run, faults_out: &mut Vec<String>) -> Result<()> {
    let sh = run.sh.clone();
    run.zone.start_vhost(false)?;
    // Prefill the range: every block written once, acknowledged, flushed.
    sh.set_during("prefill");
    prefill(&sh, &run.zone.socket)?;
    run.start_session()?;
    let plan = run.plan.clone();
    for (i, (before_ms, fault)) in plan.faults.iter().enumerate() {
        sh.set_during(&format!("workload before fault {}", i + 1));
        run.run_for(*before_ms);
        let what = format!("fault {}/{}: {fault}", i + 1, plan.faults.len());
        eprintln!("faultcampaign:  {what}");
        sh.set_during(&what);
        faults_out.push(fault.kind_detail());
        let t = Instant::now();
        let before = sh.count();
        run.inject(fault)?;
        sh.set_during(&format!("healing after {what}"));
        run.heal_or_abort(&what)?;
        let took = t.elapsed().as_secs_f64();
        run.notes.push(format!(
            "{what}: healthy again {took:.1} s after the injection{}",
            if sh.count() > before {
                " (with violations)"
            } else {
                ""
            }
        ));
    }
    // The end: everything healthy, then checks.
    sh.set_during("final checks");
    run.run_for(500);
    run.heal_or_abort("final")?;
    run.stop_session(false);
    let bad = verify_all(&sh, &run.zone.socket, "final read of the range")?;
    run.note(format!("final read of the range: {bad} bad blocks"));
    run.stop_vhost_cleanly();
    if let Some(v) = run.scrub("at the end") {
        let dirty = v["checksum_errors"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
            || v["mismatches"].as_array().is_some_and(|a| !a.is_empty());
        if dirty {
            sh.violation(
                "scrub",
                format!(
                    "the final scrub found damage the schedule left (all of it should have healed): checksum errors {}, mismatches {}",
                    v["checksum_errors"], v["mismatches"]
                ),
            );
        }
    }
    run.inspect_copies("final, after scrub");
    run.zone.start_vhost(false)?;
    let bad = verify_all(&sh, &run.zone.socket, "read of the range after scrub")?;
    run.note(format!("read of the range after scrub: {bad} bad blocks"));
    run.stop_vhost_cleanly();
    Ok(())
}

/// Writes every block of the range once (256 KiB writes), then flushes.
fn prefill(sh: &Shared, socket: &Path) -> Result<()> {
    let mut client = MqClient::connect_within(socket, 1, SLOT, Duration::from_secs(20))?;
    let mut parts = client.split();
    let (q, mem) = parts.pop().context("no queue")?;
    let blocks = sh.model.lock().expect("model").blocks();
    let per = (SLOT / BLOCK) as u64;
    let mut completions = [MaybeUninit::<Completion>::uninit()];
    let mut first = 0;
    let mut wait = |q: &mut Blkioq| -> Result<()> {
        let mut timeout = STALL;
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(blk_err)?;
        ensure!(n == 1, "no completion");
        // SAFETY: do_io initialised the first completion.
        let c = unsafe { completions[0].assume_init_ref() };
        ensure!(
            c.ret == 0,
            "prefill request failed: {}",
            std::io::Error::from_raw_os_error(-c.ret)
        );
        Ok(())
    };
    while first < blocks {
        let n = per.min(blocks - first);
        let (gen, tag) = {
            let mut m = sh.model.lock().expect("model");
            (m.begin_write(first, n, false).context("busy")?, m.tag)
        };
        for (i, b) in mem[..n as usize * BLOCK]
            .chunks_exact_mut(BLOCK)
            .enumerate()
        {
            fill_block(b, first + i as u64, gen, tag);
        }
        q.write(
            first * BLOCK as u64,
            mem.as_ptr(),
            n as usize * BLOCK,
            0,
            ReqFlags::empty(),
        );
        wait(q)?;
        sh.model.lock().expect("model").end_write(first, n, true);
        first += n;
    }
    let seq = sh.model.lock().expect("model").begin_flush();
    q.flush(0, ReqFlags::empty());
    wait(q)?;
    sh.model.lock().expect("model").end_flush(seq);
    Ok(())
}

// ---------------------------------------------------------------- report

/// Writes the report to `path` (and `latest`, if given), creating the
/// directory if need be.
fn write_report(path: &Path, latest: Option<&Path>, md: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(path, md).with_context(|| format!("write {}", path.display()))?;
    if let Some(l) = latest {
        std::fs::write(l, md).with_context(|| format!("write {}", l.display()))?;
    }
    Ok(())
}

fn report(args: &Args, outcomes: &[Outcome], wall: f64, command: &str) -> String {
    let mut md = String::new();
    let machine = Machine::probe();
    let now = utc_now();
    let _ = writeln!(md, "# faultcampaign, {}\n", now.iso());
    let _ = writeln!(
        md,
        "Machine: {} cores ({}), {:.1} GiB, kernel {}, {}; Tessera {}.\n",
        machine.nproc,
        machine.cpu_model,
        machine.memory_gib,
        machine.kernel,
        machine.os,
        machine.tessera_commit
    );
    let _ = writeln!(
        md,
        "`{command}`: {} schedule(s) in {wall:.0} s on disks of **on-disk format version {}**{}. Each: a zone of real processes ({NODES} storage nodes with {DISK_MIB} MiB disk files on 127.0.0.2–5, node 0 on the vhost host, the API server), a {VDISK_MIB} MiB thin vDisk served by `tessera vhost serve`, a blkio client checking every read against a model of acknowledged writes over the first {RANGE_MIB} MiB (written whole first; its last {COLD_MIB} MiB only read afterwards, where bytes are flipped); faults one at a time, healthy in between; at the end a full read, `tessera scrub`, every copy read from the disk files, and a full read through a new vhost process.\n",
        outcomes.len(),
        args.format_version,
        if args.format_version >= 3 {
            " (space taken 4 KiB at a time; the block map in a metadata log and checkpoints, block crcs through a crc journal)"
        } else {
            " (extents)"
        }
    );
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes {
        for f in &o.faults {
            *by_kind.entry(f.clone()).or_default() += 1;
        }
    }
    let violations: u64 = outcomes.iter().map(|o| o.total).sum();
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "- schedules: {}; faults injected: {}; violations: {} (in {} schedule(s))",
        outcomes.len(),
        by_kind.values().sum::<usize>(),
        outcomes.iter().map(|o| o.total).sum::<u64>(),
        outcomes.iter().filter(|o| o.total > 0).count()
    );
    let _ = writeln!(
        md,
        "- faults by kind: {}\n",
        by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "| seed | policy | faults | time | violations | workload |\n|---|---|---|---|---|---|"
    );
    for o in outcomes {
        let _ = writeln!(
            md,
            "| {} | mirrors={} stripes={}, {}×QD{} | {} | {:.0} s | {} | {} |",
            o.seed,
            o.plan.mirrors,
            o.plan.stripes,
            o.plan.queues,
            o.plan.depth,
            o.faults.join(", "),
            o.secs,
            o.total,
            o.stats
        );
    }
    if violations > 0 {
        let _ = writeln!(md, "\n## Violations\n");
        let _ = writeln!(
            md,
            "Replay a schedule with `target/release/faultcampaign --seed SEED`: the seed fixes the policy, the faults, their timing and their targets (a copy's position in its placement group), not the disks' uuids (so not which nodes hold a group) nor the threads' interleaving. Counts by kind, three examples each; a read with bad blocks counts once.\n"
        );
        for o in outcomes.iter().filter(|o| o.total > 0) {
            let _ = writeln!(md, "### seed {}: {} violation(s)\n", o.seed, o.total);
            for (kind, n) in &o.kinds {
                let _ = writeln!(md, "- **{kind}**: {n}");
                for v in o.violations.iter().filter(|v| v.kind == *kind).take(3) {
                    let _ = writeln!(
                        md,
                        "  - at {:.1} s, during {}: {}",
                        v.at,
                        v.during,
                        first_chars(&v.detail, 1200).replace('\n', "\n    ")
                    );
                }
            }
            let _ = writeln!(md);
        }
    }
    let _ = writeln!(md, "\n## Schedules\n");
    for o in outcomes {
        let _ = writeln!(
            md,
            "### seed {}\n\nmirrors={}, stripes={}, {} queues × depth {}; {:.0} s{}.\n",
            o.seed,
            o.plan.mirrors,
            o.plan.stripes,
            o.plan.queues,
            o.plan.depth,
            o.secs,
            o.dir
                .as_ref()
                .map(|d| format!("; logs and disk files kept in `{}`", d.display()))
                .unwrap_or_default()
        );
        for (i, (ms, f)) in o.plan.faults.iter().enumerate() {
            let _ = writeln!(md, "{}. after {ms} ms of workload: {f}", i + 1);
        }
        let _ = writeln!(md);
        for n in &o.notes {
            let _ = writeln!(md, "- {n}");
        }
        let _ = writeln!(md);
    }
    md
}

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    for k in &args.skip {
        ensure!(
            KINDS.contains(&k.as_str()),
            "--skip {k}: the kinds are {}",
            KINDS.join(", ")
        );
    }
    ensure!(args.skip.len() < KINDS.len(), "--skip leaves no fault kind");
    let regions = args
        .regions
        .iter()
        .map(|r| {
            REGIONS
                .into_iter()
                .find(|x| region_name(*x) == r)
                .with_context(|| {
                    format!(
                        "--regions {r}: the regions are {}",
                        REGIONS.map(region_name).join(", ")
                    )
                })
        })
        .collect::<Result<Vec<Region>>>()?;
    let bin = tessera_bin();
    ensure!(bin.is_file(), "{} is missing", bin.display());
    let seeds: Vec<u64> = match args.seed {
        Some(s) => (s..s + args.schedules.unwrap_or(1) as u64).collect(),
        None => {
            let base = splitmix64(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos() as u64,
            ) % 1_000_000_000
                * KINDS.len() as u64;
            let n = args
                .schedules
                .unwrap_or(if args.duration.is_some() { 10_000 } else { 8 });
            (0..n as u64).map(|i| base + i).collect()
        }
    };
    let seeds = if args.dry_run {
        &seeds[..seeds.len().min(args.schedules.unwrap_or(8))]
    } else {
        &seeds[..]
    };
    let (path, latest) = match &args.out {
        Some(p) => (p.clone(), None),
        None => {
            let dir = PathBuf::from("bench/results");
            (
                dir.join(format!("faultcampaign-{}.md", utc_now().stamp())),
                Some(dir.join("faultcampaign-latest.md")),
            )
        }
    };
    let mut outcomes = Vec::new();
    for (i, seed) in seeds.iter().enumerate() {
        if let Some(d) = args.duration {
            if started.elapsed() >= Duration::from_secs(d) {
                break;
            }
        }
        let plan = Plan::new(
            *seed,
            args.format_version,
            args.faults,
            &args.skip,
            &regions,
        );
        if args.dry_run {
            println!(
                "seed {seed}: format {} mirrors={} stripes={} {}×QD{}: {}",
                plan.format_version,
                plan.mirrors,
                plan.stripes,
                plan.queues,
                plan.depth,
                plan.faults
                    .iter()
                    .map(|(ms, f)| format!("after {ms} ms: {f}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            continue;
        }
        outcomes.push(run_schedule(&args, plan, i + 1));
        // After every schedule: a run that is stopped (or whose machine
        // goes away) keeps the report of what it ran.
        let md = report(&args, &outcomes, started.elapsed().as_secs_f64(), &command);
        write_report(&path, latest.as_deref(), &md)?;
    }
    if args.dry_run {
        return Ok(());
    }
    let wall = started.elapsed().as_secs_f64();
    let md = report(&args, &outcomes, wall, &command);
    write_report(&path, latest.as_deref(), &md)?;
    let violations: u64 = outcomes.iter().map(|o| o.total).sum();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outcomes {
        for f in &o.faults {
            *by_kind.entry(f.clone()).or_default() += 1;
        }
    }
    println!(
        "faultcampaign: {} schedule(s) in {wall:.0} s; faults: {}; {violations} violation(s); report {}",
        outcomes.len(),
        by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        path.display()
    );
    for o in outcomes.iter().filter(|o| o.total > 0) {
        println!(
            "  seed {}: {}",
            o.seed,
            o.kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
