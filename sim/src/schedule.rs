//! One simulated schedule: a zone, storage nodes, one vDisk, a workload
//! that checks every read against the model, and a timeline of faults —
//! all on one thread with simulated time, drawn from one seed.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_replicator::{Volume, VolumeConfig, VolumeError};
use tessera_zone::env::Env;
use tessera_zone::mem_store::MemStore;
use tessera_zone::records::MoveReason;
use tessera_zone::service::{Health, Heartbeat, MovePlanner, ZoneService};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::harness::{build_nodes, create_vdisk, Nodes, DS, NAME};
use crate::model::{fill, Model, Ticket, BLOCK};
use crate::node::SimConnector;
use crate::rng::Rng;
use crate::zone::SimZone;

/// The shape of a schedule.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    pub mirrors: u32,
    pub stripes: u32,
    /// vDisk size in chunks.
    pub chunks: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Simulated seconds of workload under faults.
    pub seconds: u64,
    /// Requests the workload keeps in flight.
    pub depth: usize,
    /// Simulated time a schedule may take beyond `seconds`. One that runs
    /// past it has a request, a repair or a close that never completes: a
    /// hang is a violation with its seed, not an endless run.
    pub finish_within: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 3,
            mirrors: 2,
            stripes: 1,
            chunks: 32,
            chunk_size: 64 << 10,
            seconds: 20,
            depth: 4,
            finish_within: Duration::from_secs(3600),
        }
    }
}

/// What one schedule did and found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub seed: u64,
    pub ops: u64,
    pub guest_errors: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub violations: Vec<String>,
}

/// Faults the timeline can inject.
#[derive(Debug, Clone, Copy)]
enum Event {
    Crash(usize),
    PowerLoss(usize),
    /// The machine loses power and is back before anything reached it.
    Reboot(usize),
    Freeze(usize),
    Delay(usize),
    BadPayload(usize),
    Corrupt {
        node: usize,
        whole: bool,
    },
    /// The machine loses power and its disk comes back with its block map
    /// lost: it knows none of its chunks any more.
    MapLost(usize),
    /// The machine loses power and comes back with its activity marks
    /// lost (its mark store found damaged): every extent is in doubt.
    MarksLost(usize),
    ZoneDown,
    Contention,
    LostAnswers,
    WriterCrash,
    Takeover,
    /// A disk leaves the datastore (`tessera datastore remove-disk`): its
    /// copies drain to other disks.
    Drain,
    /// A disk that left comes back (`tessera datastore add-disk`):
    /// placement may prefer it (rebalance).
    AddDisk,
    /// A node stays down past `rebuild_after`: its copies are rebuilt
    /// elsewhere.
    Outage(usize),
    /// A node's disk fills up (other vDisks took its space), then space is
    /// freed: writes that need space fail, and nothing else may.
    DiskFull(usize),
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::Crash(_) => "node kill -9 and restart",
            Event::PowerLoss(_) => "node power loss and restart",
            Event::Reboot(_) => "node reboot nobody saw",
            Event::Freeze(_) => "node frozen and resumed",
            Event::Delay(_) => "node delays and reorders",
            Event::BadPayload(_) => "payload changed in flight",
            Event::Corrupt { whole: false, .. } => "flipped data block",
            Event::Corrupt { whole: true, .. } => "damaged extent record",
            Event::MapLost(_) => "node power loss, block map lost",
            Event::MarksLost(_) => "node power loss, activity marks lost",
            Event::ZoneDown => "zone unreachable",
            Event::Contention => "zone compare-and-swap contention",
            Event::LostAnswers => "zone answers lost after the change",
            Event::WriterCrash => "writer crash and reopen",
            Event::Takeover => "second writer takes over (force)",
            Event::Drain => "disk removed from the datastore (drain)",
            Event::AddDisk => "disk added back to the datastore (rebalance)",
            Event::Outage(_) => "node down past rebuild_after (rebuild)",
            Event::DiskFull(_) => "disk full, then space freed",
        }
    }

    /// The node a fault takes out (a corrupt copy counts until a scrub
    /// repaired it).
    fn node(self) -> Option<usize> {
        match self {
            Event::Crash(n)
            | Event::PowerLoss(n)
            | Event::Reboot(n)
            | Event::Freeze(n)
            | Event::MapLost(n)
            | Event::MarksLost(n)
            | Event::Outage(n) => Some(n),
            Event::Corrupt { node, .. } => Some(node),
            // A refused write leaves that copy stale until resynced.
            Event::BadPayload(n) => Some(n),
            _ => None,
        }
    }
}

/// How long a node is down before the move planner rebuilds its copies
/// elsewhere (counted from the first planning pass that saw it down, once
/// its liveness lease ran out).
const REBUILD_AFTER: Duration = Duration::from_secs(2);
/// How often the move planner runs (the API server's `plan_interval`).
const PLAN_INTERVAL: Duration = Duration::from_secs(1);
/// The nodes' liveness lease.
const NODE_TTL: Duration = Duration::from_secs(5);

/// Counts of what the zone did by itself (moves planned, copies freed),
/// reported with the faults.
type Tallies = Arc<Mutex<BTreeMap<&'static str, u64>>>;

fn tally(t: &Tallies, what: &'static str) {
    *t.lock().expect("poisoned").entry(what).or_default() += 1;
}

struct World {
    model: Mutex<Model>,
    /// The writer the workload uses now.
    volume: Mutex<Option<Volume>>,
    /// Blocks with a write in flight (writes never overlap).
    busy: Mutex<BTreeSet<u64>>,
    violations: Mutex<Vec<String>>,
    guest_errors: Mutex<u64>,
    /// Bumped by every zone fault and writer change: an op that saw it
    /// change may fail without breaking a promise.
    excuse: Mutex<u64>,
    /// Bumped by every takeover and writer crash: a fenced op is excused.
    writers: Mutex<u64>,
    /// More nodes are out than writes can do without (the policy still
    /// keeps the data, but writes may fail).
    unavailable: Mutex<bool>,
    /// Disks full now, and disk-full episodes started or ended so far: a
    /// write may fail for lack of space only while a disk is (or was)
    /// full.
    space: Mutex<(usize, u64)>,
}

impl World {
    fn violation(&self, what: String) {
        tracing::error!(%what, "VIOLATION");
        self.violations.lock().expect("poisoned").push(what);
    }

    fn excuse(&self) -> u64 {
        *self.excuse.lock().expect("poisoned")
    }

    fn excuse_now(&self) {
        *self.excuse.lock().expect("poisoned") += 1;
    }

    fn writers(&self) -> u64 {
        *self.writers.lock().expect("poisoned")
    }

    fn space(&self) -> u64 {
        self.space.lock().expect("poisoned").1
    }

    /// A disk fills up (`true`) or gets space back.
    fn set_full(&self, full: bool) {
        let mut s = self.space.lock().expect("poisoned");
        if full {
            s.0 += 1;
        } else {
            s.0 -= 1;
        }
        s.1 += 1;
    }

    /// An op failed: a broken promise unless something excuses it.
    fn op_failed(&self, what: &str, e: &VolumeError, excuse: u64, writers: u64, space: u64) {
        *self.guest_errors.lock().expect("poisoned") += 1;
        match e {
            // Only a disk that is or was full while it ran excuses it.
            VolumeError::NoSpace { .. } => {
                let (full, episodes) = *self.space.lock().expect("poisoned");
                if full == 0 && episodes == space {
                    self.violation(format!(
                        "{what} failed with '{e}' although no disk was full"
                    ));
                }
            }
            VolumeError::Fenced { .. } | VolumeError::Closing if self.writers() == writers => {
                self.violation(format!(
                    "{what} failed with '{e}' although no other writer took over"
                ));
            }
            VolumeError::Fenced { .. } | VolumeError::Closing => {}
            _ if self.excuse() == excuse
                && self.writers() == writers
                && !*self.unavailable.lock().expect("poisoned") =>
            {
                self.violation(format!(
                    "{what} failed with '{e}' while the faults were within the policy"
                ));
            }
            _ => {}
        }
    }
}

/// Runs schedule `seed` on a fresh single-threaded runtime with simulated time.
pub fn run(seed: u64, cfg: &Config) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let limit = Duration::from_secs(cfg.seconds) + cfg.finish_within;
    rt.block_on(async {
        match tokio::time::timeout(limit, schedule(seed, cfg.clone())).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome {
                seed,
                violations: vec![format!(
                    "the schedule did not finish within {} simulated seconds: a request, a repair or a close never completed",
                    limit.as_secs()
                )],
                ..Outcome::default()
            },
        }
    })
}

async fn schedule(seed: u64, cfg: Config) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut outcome = Outcome {
        seed,
        ..Outcome::default()
    };
    // The zone.
    let service = ZoneService::new(Arc::new(MemStore::new()))
        .with_env(Env::simulated(seed))
        .with_chunk_size(cfg.chunk_size)
        .expect("a valid chunk size")
        .with_node_ttl(NODE_TTL);
    service.ensure_zone("sim").await.expect("zone");
    let tallies: Tallies = Arc::default();
    // In one schedule in five a node is not upgraded yet: it does not keep
    // activity marks, so the writer keeps its activity log in the zone.
    let old_node = rng
        .chance(200)
        .then(|| rng.below(cfg.nodes as u64) as usize);
    let Nodes {
        nodes,
        disks: disk_of,
        registrations,
        mut leases,
    } = build_nodes(
        &service,
        seed,
        cfg.nodes,
        cfg.chunks,
        cfg.chunk_size,
        |_| rng.next_u64(),
        |i| Some(i) != old_node,
    )
    .await;
    if old_node.is_some() {
        tally(&tallies, "activity log in the zone (a node not upgraded)");
    }
    create_vdisk(
        &service,
        cfg.mirrors,
        cfg.stripes,
        cfg.chunks,
        cfg.chunk_size,
    )
    .await;
    let chunk_size = cfg.chunk_size;
    let zone = SimZone::new(service, rng.next_u64());
    // Nodes that are up (and not frozen) keep their liveness in the zone,
    // report the copies they hold, and free those the zone says moved away.
    {
        let zone = zone.clone();
        let nodes = nodes.clone();
        let tallies = tallies.clone();
        tokio::spawn(async move {
            // Groups each node freed since its last heartbeat.
            let mut freed: Vec<Vec<tessera_zone::service::GroupsToFree>> =
                vec![Vec::new(); nodes.len()];
            loop {
                for (i, n) in nodes.iter().enumerate() {
                    if !n.is_up() || n.is_frozen() {
                        continue;
                    }
                    let hb = Heartbeat {
                        lease: leases[i],
                        disks: Vec::new(),
                        copies: n.copies(),
                        vdisks: Vec::new(),
                        usage: None,
                        freed_groups: freed[i].clone(),
                    };
                    match zone.service.heartbeat(n.uuid, hb).await {
                        Ok(reply) => {
                            freed[i].clear();
                            for [disk, vdisk] in reply.free {
                                tracing::info!(node = i, %disk, %vdisk, "node frees a moved copy");
                                n.free(disk, vdisk);
                                tally(&tallies, "moved copy freed by its node");
                            }
                            for f in reply.free_groups {
                                tracing::info!(node = i, disk = %f.disk, vdisk = %f.vdisk, groups = ?f.groups, "node frees moved groups");
                                n.free_groups(f.disk, f.vdisk, f.stripes, &f.groups);
                                tally(&tallies, "moved groups freed by their node");
                                freed[i].push(f);
                            }
                        }
                        Err(_) => {
                            // The liveness lease ran out while the node was down.
                            if let Ok(r) =
                                zone.service.register_node(registrations[i].clone()).await
                            {
                                leases[i] = r.lease;
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    // The API server's move planner (rebuild, drain, rebalance), on the
    // simulated clock; it stops while the zone is down. Heal switches it
    // off once the placement settled.
    let planning = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let zone = zone.clone();
        let tallies = tallies.clone();
        let planning = planning.clone();
        tokio::spawn(async move {
            let mut planner = MovePlanner::new(zone.service.clone(), REBUILD_AFTER);
            loop {
                tokio::time::sleep(PLAN_INTERVAL).await;
                if zone.is_down() || !planning.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                match planner.run_once().await {
                    Ok(moves) => {
                        for m in moves {
                            tracing::info!(?m, "move planned");
                            tally(
                                &tallies,
                                match m.mv.reason {
                                    MoveReason::Rebuild => "move planned: rebuild",
                                    MoveReason::Drain => "move planned: drain",
                                    MoveReason::Rebalance => "move planned: rebalance",
                                    MoveReason::Shed => "move planned: shed",
                                },
                            );
                        }
                    }
                    Err(e) => tracing::info!(error = %e, "planning moves failed"),
                }
            }
        });
    }
    let connector = Arc::new(SimConnector::new(nodes.clone()));
    let config = {
        let mut c = VolumeConfig::with_zone(zone.clone(), DS, NAME, "sim-host-0");
        c.connector = Some(connector.clone());
        c.io_timeout = Duration::from_secs(1);
        c.degraded_wait = Duration::from_secs(3);
        c.lease_ttl = Duration::from_secs(6);
        c.repair_bandwidth = 64 << 20;
        c
    };
    let blocks = cfg.chunks * chunk_size / BLOCK as u64;
    let world = Arc::new(World {
        model: Mutex::new(Model::new(blocks)),
        volume: Mutex::new(None),
        busy: Mutex::new(BTreeSet::new()),
        violations: Mutex::new(Vec::new()),
        guest_errors: Mutex::new(0),
        excuse: Mutex::new(0),
        writers: Mutex::new(0),
        unavailable: Mutex::new(false),
        space: Mutex::new((0, 0)),
    });
    match Volume::open(config.clone()).await {
        Ok(v) => *world.volume.lock().expect("poisoned") = Some(v),
        Err(e) => {
            outcome
                .violations
                .push(format!("the first open failed: {e}"));
            return outcome;
        }
    }

    // The timeline of faults.
    let end = Instant::now() + Duration::from_secs(cfg.seconds);
    let mut timeline: Vec<(Duration, Event, Duration)> = Vec::new();
    let mut t = Duration::from_millis(rng.below(2000));
    while t < Duration::from_secs(cfg.seconds) {
        let n = rng.below(cfg.nodes as u64) as usize;
        let e = match rng.below(18) {
            0 | 1 => Event::Crash(n),
            2 if rng.chance(300) => Event::MarksLost(n),
            2 => Event::PowerLoss(n),
            3 => Event::Freeze(n),
            4 => Event::Delay(n),
            5 => Event::BadPayload(n),
            6 if rng.chance(200) => Event::MapLost(n),
            6 => Event::Corrupt {
                node: n,
                whole: rng.chance(300),
            },
            7 => Event::ZoneDown,
            8 => Event::Contention,
            9 => Event::LostAnswers,
            10 => Event::WriterCrash,
            11 => Event::Takeover,
            12 => Event::Drain,
            13 => Event::AddDisk,
            14 => Event::Outage(n),
            15 => Event::Reboot(n),
            16 => Event::DiskFull(n),
            _ => Event::Crash(n),
        };
        let lasts = match e {
            // Until the zone saw it down (its liveness lease ran out), then
            // past `rebuild_after`, and a while longer or not.
            Event::Outage(_) => NODE_TTL + REBUILD_AFTER + Duration::from_millis(rng.below(6000)),
            _ => Duration::from_millis(200 + rng.below(4000)),
        };
        timeline.push((t, e, lasts));
        t += Duration::from_millis(500 + rng.below(4000));
    }
    let start = Instant::now();

    let min_copies = if cfg.mirrors <= 2 {
        1
    } else {
        cfg.mirrors / 2 + 1
    };
    let availability_tolerance = (cfg.mirrors - min_copies) as usize;
    // Node faults in force: node -> when it ends.
    let mut faulty: BTreeMap<usize, (Event, Instant)> = BTreeMap::new();
    // Full disks: node -> when space is freed. Not a node fault: a full
    // disk takes no copy out (writes that need space fail, on every copy).
    let mut full: BTreeMap<usize, Instant> = BTreeMap::new();
    // Disks removed from the datastore (they may be added back).
    let mut removed: Vec<Uuid> = Vec::new();
    let mut zone_fault: Option<Event> = None;
    let mut ops: JoinSet<()> = JoinSet::new();
    let mut wrng = rng.fork();
    // A writer taken over by force keeps reading until it learns it (at
    // its next lease renewal, or from a node): its reads may return what
    // it could read when it was taken over, or anything written since,
    // never older (a copy freed after a move must not read as zeros).
    let mut lrng = rng.fork();
    let mut lagging: Option<(Volume, Arc<Vec<Ticket>>, Instant)> = None;
    let mut next_event = 0;
    while Instant::now() < end {
        let now = Instant::now();
        // Faults whose time is up end.
        // A reboot lasts (as a fault of its node) until the writer noticed
        // it: until then the node's copies lack what its page cache held.
        let writer = world.volume.lock().expect("poisoned").clone();
        let noticed = |n: usize| writer.as_ref().is_none_or(|v| !v.disk_current(disk_of[n]));
        let ended: Vec<usize> = faulty
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .filter(|(n, (e, _))| !matches!(e, Event::Reboot(_)) || noticed(**n))
            .map(|(n, _)| *n)
            .collect();
        drop(writer);
        for n in ended {
            let (e, _) = faulty.remove(&n).expect("listed");
            match e {
                Event::Crash(_)
                | Event::PowerLoss(_)
                | Event::MapLost(_)
                | Event::MarksLost(_)
                | Event::Outage(_) => nodes[n].restart(),
                Event::Freeze(_) => nodes[n].resume(),
                Event::BadPayload(_) => nodes[n].set_bad_payload(0),
                Event::Corrupt { .. } => {
                    // The background scrub finds it.
                    let v = world.volume.lock().expect("poisoned").clone();
                    if let Some(v) = v {
                        if let Err(e) = v.scrub().await {
                            tracing::info!(error = %e, "scrub failed");
                        }
                    }
                }
                _ => {}
            }
        }
        let freed: Vec<usize> = full
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(n, _)| *n)
            .collect();
        for n in freed {
            full.remove(&n);
            nodes[n].set_full(disk_of[n], false);
            world.set_full(false);
        }
        if zone_fault.is_some() && !zone.is_faulty() {
            zone_fault = None;
            world.excuse_now();
        }
        // Faults whose time has come start.
        while next_event < timeline.len() && start + timeline[next_event].0 <= now {
            let (_, e, lasts) = timeline[next_event];
            next_event += 1;
            let current = world
                .volume
                .lock()
                .expect("poisoned")
                .as_ref()
                .is_some_and(|v| v.members_current());
            // Node faults stay within the policy: at most mirrors - 1
            // nodes at once, and a new one only while every copy is current
            // (a copy being filled for a move is not one of them yet).
            if let Some(n) = e.node() {
                if faulty.contains_key(&n)
                    || faulty.len() + 1 > cfg.mirrors as usize - 1
                    || !current
                {
                    continue;
                }
            }
            // Moves need a node beyond the placement's width.
            if matches!(e, Event::Drain | Event::AddDisk | Event::Outage(_))
                && cfg.nodes <= cfg.mirrors as usize
            {
                continue;
            }
            match e {
                Event::Crash(n) | Event::Outage(n) => nodes[n].crash(),
                Event::PowerLoss(n) => nodes[n].lose_power(),
                Event::MarksLost(n) => {
                    nodes[n].lose_power();
                    nodes[n].lose_marks();
                }
                Event::MapLost(n) => {
                    if cfg.mirrors < 2 {
                        continue;
                    }
                    nodes[n].lose_map(disk_of[n]);
                }
                Event::Reboot(n) => {
                    nodes[n].lose_power();
                    nodes[n].restart();
                }
                Event::Freeze(n) => nodes[n].freeze(),
                Event::Delay(n) => {
                    nodes[n].set_delay(Duration::from_millis(1 + rng.below(50)));
                }
                Event::BadPayload(n) => nodes[n].set_bad_payload(200),
                Event::DiskFull(n) => {
                    if full.contains_key(&n) {
                        continue;
                    }
                    full.insert(n, now + lasts);
                    world.set_full(true);
                    nodes[n].set_full(disk_of[n], true);
                }
                Event::Corrupt { node, whole } => {
                    if cfg.mirrors < 2 {
                        continue;
                    }
                    let vdisk = world
                        .volume
                        .lock()
                        .expect("poisoned")
                        .as_ref()
                        .map(|v| v.vdisk().uuid);
                    let Some(vdisk) = vdisk else { continue };
                    let chunks = nodes[node].chunks(disk_of[node], vdisk);
                    if chunks.is_empty() {
                        continue;
                    }
                    let c = chunks[rng.below(chunks.len() as u64) as usize];
                    nodes[node].corrupt(disk_of[node], vdisk, c, rng.next_u64(), whole);
                }
                Event::ZoneDown | Event::Contention | Event::LostAnswers => {
                    if zone_fault.is_some() {
                        continue;
                    }
                    // Shorter than the volume's wait for the zone: the
                    // guest must not notice.
                    let lasts = lasts.min(Duration::from_millis(2500));
                    match e {
                        Event::ZoneDown => zone.fault(true, 0, 0, lasts),
                        Event::Contention => zone.fault(false, 300, 0, lasts),
                        _ => zone.fault(false, 0, 300, lasts),
                    }
                    zone_fault = Some(e);
                }
                Event::WriterCrash => {
                    lagging = None;
                    // The writer dies: its requests in flight are cut off
                    // (what it sent may still land), nothing is closed.
                    ops.abort_all();
                    while ops.join_next().await.is_some() {}
                    let cut: Vec<u64> = std::mem::take(&mut *world.busy.lock().expect("poisoned"))
                        .into_iter()
                        .collect();
                    world
                        .model
                        .lock()
                        .expect("poisoned")
                        .cut_off(cut.into_iter());
                    *world.writers.lock().expect("poisoned") += 1;
                    world.excuse_now();
                    let old = world.volume.lock().expect("poisoned").take();
                    drop(old);
                    // The next writer takes over at once, or once the
                    // dead one's lease has expired.
                    let mut c = config.clone();
                    c.force = rng.chance(500);
                    if !reopen(&world, c, &zone).await {
                        break;
                    }
                }
                Event::Drain => {
                    // A disk of the vDisk's placement leaves the datastore,
                    // as long as the datastore keeps enough disks to place it.
                    let ds = zone.service.datastore(DS).await.expect("datastore");
                    let placed = zone.service.vdisk(DS, NAME).await.expect("vdisk").vdisk;
                    let candidates: Vec<Uuid> = ds
                        .disks
                        .iter()
                        .copied()
                        .filter(|d| placed.placement.holds(*d))
                        .collect();
                    if ds.disks.len() <= cfg.mirrors as usize || candidates.is_empty() {
                        continue;
                    }
                    let d = candidates[rng.below(candidates.len() as u64) as usize];
                    zone.service
                        .remove_datastore_disk(DS, d)
                        .await
                        .expect("a member disk is removed");
                    removed.push(d);
                }
                Event::AddDisk => {
                    if removed.is_empty() {
                        continue;
                    }
                    let d = removed.remove(rng.below(removed.len() as u64) as usize);
                    zone.service
                        .add_datastore_disk(DS, d)
                        .await
                        .expect("a disk is added");
                }
                Event::Takeover => {
                    // Another host opens with force while this writer runs.
                    *world.writers.lock().expect("poisoned") += 1;
                    world.excuse_now();
                    let mut c = config.clone();
                    c.force = true;
                    c.host = "sim-host-1".into();
                    let old = world.volume.lock().expect("poisoned").clone();
                    let tickets: Vec<Ticket> = {
                        let m = world.model.lock().expect("poisoned");
                        (0..m.blocks()).map(|b| m.ticket(b)).collect()
                    };
                    if !reopen(&world, c, &zone).await {
                        break;
                    }
                    lagging = old.map(|v| (v, Arc::new(tickets), now + Duration::from_secs(10)));
                }
            }
            *outcome.faults.entry(e.name()).or_default() += 1;
            tracing::info!(event = e.name(), ?e, "fault");
            if let Some(n) = e.node() {
                faulty.insert(n, (e, now + lasts));
            }
        }
        // Writes need `min_copies` current copies per group: with more
        // nodes out than that allows, they may fail (excused) — and until
        // the volume has that many current copies in every group again,
        // since a node whose fault ended has stale copies until resync
        // (or a rebuild) makes them current (seed 2325 on 5 nodes with
        // mirrors=3: a freeze and a power loss at once; once the freeze
        // ended, one node was out, but the group still had one current
        // copy until the frozen node's copy was rebuilt elsewhere).
        let recovering = *world.unavailable.lock().expect("poisoned")
            && world
                .volume
                .lock()
                .expect("poisoned")
                .as_ref()
                .is_some_and(|v| !v.writable());
        let out_now = faulty.len() > availability_tolerance || recovering;
        if out_now != *world.unavailable.lock().expect("poisoned") {
            *world.unavailable.lock().expect("poisoned") = out_now;
            world.excuse_now();
        }
        // Keep up to `depth` of the workload's requests in flight, with
        // pauses between them (a guest thinks, too).
        while let Some(Ok(())) = ops.try_join_next() {}
        if ops.len() < cfg.depth {
            outcome.ops += 1;
            start_op(&world, &mut ops, &mut wrng);
        }
        if let Some((old, tickets, until)) = &lagging {
            if old.is_fenced() || *until <= now {
                lagging = None;
            } else if lrng.chance(200) {
                *outcome
                    .faults
                    .entry("read by a taken-over writer before it learnt it")
                    .or_default() += 1;
                lagging_read(&world, &mut ops, &mut lrng, old, tickets);
            }
        }
        let pause = Duration::from_millis(wrng.below(40));
        tokio::select! {
            biased;
            _ = ops.join_next(), if ops.len() >= cfg.depth => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    while ops.join_next().await.is_some() {}
    drop(lagging);

    // Heal: every fault ends; the copies must become whole again. A flush
    // first lets the writer notice the nodes that are down (see above).
    let writer = world.volume.lock().expect("poisoned").clone();
    if let Some(v) = writer {
        if faulty.values().any(|(e, _)| {
            matches!(
                e,
                Event::PowerLoss(_) | Event::MapLost(_) | Event::MarksLost(_) | Event::Reboot(_)
            )
        }) {
            let _ = v.flush().await;
        }
    }
    for (n, (e, _)) in std::mem::take(&mut faulty) {
        match e {
            Event::Crash(_)
            | Event::PowerLoss(_)
            | Event::MapLost(_)
            | Event::MarksLost(_)
            | Event::Outage(_) => nodes[n].restart(),
            Event::Freeze(_) => nodes[n].resume(),
            _ => {}
        }
    }
    for n in std::mem::take(&mut full).into_keys() {
        nodes[n].set_full(disk_of[n], false);
        world.set_full(false);
    }
    for n in &nodes {
        n.set_delay(Duration::ZERO);
        n.set_bad_payload(0);
    }
    zone.heal();
    *world.unavailable.lock().expect("poisoned") = false;
    world.excuse_now();
    let volume = world.volume.lock().expect("poisoned").clone();
    let Some(volume) = volume else {
        outcome.violations.push("no writer at the end".into());
        return finish(outcome, &world, &tallies);
    };
    // Copies become current again; then the background scrub finds what
    // the faults left behind unread (it checks current copies only), and
    // what it hands to resync is repaired.
    // Copies held outside the placement, and chunks of groups a disk is
    // no longer in: every one must be freed.
    let strays = || async {
        let v = zone.service.vdisk(DS, NAME).await.expect("vdisk").vdisk;
        let stripes = v.placement.groups.len().max(1) as u64;
        let mut out = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            for [disk, vd] in n.copies() {
                if vd != v.uuid {
                    continue;
                }
                let stray_group = || {
                    n.chunks_of(disk, vd)
                        .iter()
                        .any(|c| !v.placement.groups[(c % stripes) as usize].contains(&disk))
                };
                if !v.placement.holds(disk) || stray_group() {
                    out.push((i, disk));
                }
            }
        }
        let mut released = v.released;
        released.extend(v.released_groups.iter().map(|r| r.disk));
        (out, released)
    };
    // Healthy, the writer on the zone's placement, every move finished,
    // every moved copy freed.
    let wait_healthy = || async {
        let healed_by = Instant::now() + Duration::from_secs(120);
        while Instant::now() < healed_by {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let health = ZoneLink_vdisk(&zone).await;
            let placement = zone
                .service
                .vdisk(DS, NAME)
                .await
                .expect("vdisk")
                .vdisk
                .placement;
            let settled = placement.moves.is_empty()
                && placement.version == volume.placement_version()
                && placement
                    .groups
                    .iter()
                    .all(|g| g.len() == cfg.mirrors as usize);
            if volume.all_current()
                && health == Some(Health::Healthy)
                && settled
                && strays().await == (Vec::new(), Vec::new())
            {
                return true;
            }
        }
        false
    };
    let mut healed = wait_healthy().await;
    if healed {
        // Settled: no new move from now on (one planned meanwhile finishes
        // in the wait below).
        planning.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = volume.scrub().await {
            world.violation(format!("the scrub after healing failed: {e}"));
        }
        healed = wait_healthy().await;
    }
    if !healed {
        let view = tessera_replicator::ZoneLink::vdisk(&*zone, DS, NAME).await;
        let nodes_up = tessera_replicator::ZoneLink::nodes(&*zone).await;
        outcome.violations.push(format!(
            "the vDisk did not heal within 120 s (all current: {}, writer's placement version {}, zone's view: {:?}, nodes: {:?}, copies outside the placement and released: {:?})",
            volume.all_current(),
            volume.placement_version(),
            view.map(|v| (v.health, v.vdisk.stale, v.repair, v.vdisk.placement)),
            nodes_up.map(|n| n.iter().map(|n| n.state).collect::<Vec<_>>()),
            strays().await,
        ));
    }
    // Every block reads what the model allows; every copy agrees.
    check_all(&world, &volume, "after healing").await;
    if healed {
        // A copy whose node lost its map was rebuilt whole, and its node
        // told so: it trusts the copy again (or the next writer would
        // rebuild it whole once more).
        let v = zone.service.vdisk(DS, NAME).await.expect("vdisk").vdisk;
        for (i, n) in nodes.iter().enumerate() {
            if n.doubts(disk_of[i], v.uuid) && v.placement.holds(disk_of[i]) {
                world.violation(format!(
                    "node {i} still doubts its copy after healing: no writer vouched for it"
                ));
            }
        }
        let copies = volume.copies();
        for c in 0..cfg.chunks {
            let mut first: Option<Vec<u8>> = None;
            for i in 0..copies {
                let mut buf = vec![0u8; chunk_size as usize];
                match volume.read_copy(c * chunk_size, &mut buf, i).await {
                    Ok(()) => match &first {
                        None => first = Some(buf),
                        Some(f) if *f != buf => {
                            world.violation(format!(
                                "chunk {c}: copy {i} differs from copy 0 after healing"
                            ));
                        }
                        Some(_) => {}
                    },
                    Err(e) => world
                        .violation(format!("chunk {c}: copy {i} unreadable after healing: {e}")),
                }
            }
        }
    }
    // With no writes, the activity log drains (the volume flushes by itself).
    tokio::time::sleep(Duration::from_secs(15)).await;
    if let Ok(view) = tessera_replicator::ZoneLink::vdisk(&*zone, DS, NAME).await {
        if !view.vdisk.activity.is_empty() {
            world.violation(format!(
                "the activity log still lists {:?} 15 s after the last write",
                view.vdisk.activity
            ));
        }
    }
    if let Err(e) = volume.close().await {
        world.violation(format!("the final close failed: {e}"));
    }
    // A clean close flushed everything: it survives every node losing power.
    for n in &nodes {
        n.lose_power();
        n.restart();
    }
    *outcome
        .faults
        .entry("power loss of every node after close")
        .or_default() += 1;
    let freed_reads: u64 = nodes.iter().map(|n| n.freed_reads()).sum();
    if freed_reads > 0 {
        *outcome
            .faults
            .entry("read of a moved copy after its node freed it (refused)")
            .or_default() += freed_reads;
    }
    let mut last = config.clone();
    // A close whose flush failed leaves the lease to expire.
    last.force = true;
    match Volume::open(last).await {
        Ok(v) => {
            check_all(&world, &v, "after every node lost power").await;
            if let Err(e) = v.close().await {
                world.violation(format!("the last close failed: {e}"));
            }
        }
        Err(e) => world.violation(format!("cannot open after every node lost power: {e}")),
    }
    finish(outcome, &world, &tallies)
}

#[allow(non_snake_case)]
async fn ZoneLink_vdisk(zone: &SimZone) -> Option<Health> {
    tessera_replicator::ZoneLink::vdisk(zone, DS, NAME)
        .await
        .ok()
        .map(|v| v.health)
}

fn finish(mut outcome: Outcome, world: &World, tallies: &Tallies) -> Outcome {
    for (k, v) in tallies.lock().expect("poisoned").iter() {
        *outcome.faults.entry(k).or_default() += v;
    }
    outcome
        .violations
        .extend(world.violations.lock().expect("poisoned").drain(..));
    outcome.guest_errors = *world.guest_errors.lock().expect("poisoned");
    outcome
}

/// Opens a new writer and makes the workload use it.
async fn reopen(world: &World, config: VolumeConfig, zone: &SimZone) -> bool {
    let _ = zone;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Volume::open(config.clone()).await {
            Ok(v) => {
                *world.volume.lock().expect("poisoned") = Some(v);
                return true;
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "reopen failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                world.violation(format!("cannot open the vDisk again: {e}"));
                return false;
            }
        }
    }
}

/// Reads every block and checks it against the model.
async fn check_all(world: &World, volume: &Volume, when: &str) {
    let size = volume.size();
    let mut buf = vec![0u8; size as usize];
    let issued: Vec<crate::model::Ticket> = {
        let m = world.model.lock().expect("poisoned");
        (0..m.blocks()).map(|b| m.ticket(b)).collect()
    };
    if let Err(e) = volume.read(0, &mut buf).await {
        world.violation(format!("{when}: reading the vDisk failed: {e}"));
        return;
    }
    let mut m = world.model.lock().expect("poisoned");
    for b in 0..m.blocks() {
        let data = &buf[b as usize * BLOCK..(b as usize + 1) * BLOCK];
        if let Err(broken) = m.read_done(b, data, &issued[b as usize]) {
            world.violation(format!("{when}: block {}: {}", broken.block, broken.what));
        }
    }
}

/// Starts a read by a writer that was taken over and does not know it yet.
fn lagging_read(
    world: &Arc<World>,
    ops: &mut JoinSet<()>,
    rng: &mut Rng,
    old: &Volume,
    tickets: &Arc<Vec<Ticket>>,
) {
    let blocks = world.model.lock().expect("poisoned").blocks();
    let first = rng.below(blocks);
    let range: Range<u64> = first..(first + 1 + rng.below(8)).min(blocks);
    let (world, old, tickets) = (world.clone(), old.clone(), tickets.clone());
    ops.spawn(async move {
        let mut buf = vec![0u8; ((range.end - range.start) as usize) * BLOCK];
        // Failing is fine (it is fenced, or its copies are out).
        if old
            .read(range.start * BLOCK as u64, &mut buf)
            .await
            .is_err()
        {
            return;
        }
        let m = world.model.lock().expect("poisoned");
        let broken: Vec<_> = range
            .clone()
            .enumerate()
            .filter_map(|(i, b)| {
                m.check_lagging(b, &buf[i * BLOCK..(i + 1) * BLOCK], &tickets[b as usize])
                    .err()
            })
            .collect();
        drop(m);
        for broken in broken {
            world.violation(format!(
                "a read by the taken-over writer: block {}: {}",
                broken.block, broken.what
            ));
        }
    });
}

/// Starts one random request of the workload.
fn start_op(world: &Arc<World>, ops: &mut JoinSet<()>, rng: &mut Rng) {
    let Some(volume) = world.volume.lock().expect("poisoned").clone() else {
        return;
    };
    let blocks = world.model.lock().expect("poisoned").blocks();
    let kind = rng.below(100);
    let long = rng.chance(100);
    let len = 1 + rng.below(if long { 64 } else { 8 });
    let first = rng.below(blocks);
    let range: Range<u64> = first..(first + len).min(blocks);
    let world = world.clone();
    let excuse = world.excuse();
    let writers = world.writers();
    let space = world.space();
    if kind < 50 || (50..60).contains(&kind) {
        // A write (or, 1 in 6, zeros: discard or write-zeroes).
        {
            let mut busy = world.busy.lock().expect("poisoned");
            if range.clone().any(|b| busy.contains(&b)) {
                return;
            }
            busy.extend(range.clone());
        }
        let zero = kind >= 50;
        let discard = rng.chance(500);
        let id = world
            .model
            .lock()
            .expect("poisoned")
            .issue(range.clone(), zero);
        tracing::debug!(id, ?range, zero, writer = writers, "write issued");
        ops.spawn(async move {
            let offset = range.start * BLOCK as u64;
            let r = if zero {
                let len = (range.end - range.start) * BLOCK as u64;
                if discard {
                    volume.discard(offset, len).await
                } else {
                    volume.write_zeroes(offset, len).await
                }
            } else {
                let mut data = vec![0u8; (range.end - range.start) as usize * BLOCK];
                for (b, out) in range.clone().zip(data.chunks_exact_mut(BLOCK)) {
                    fill(id, b, out);
                }
                volume.write(offset, &data).await
            };
            tracing::debug!(id, ?range, zero, ok = r.is_ok(), err = ?r.as_ref().err().map(|e| e.to_string()), writer = writers, "write done");
            match r {
                Ok(()) => world.model.lock().expect("poisoned").acked(range.clone(), id),
                Err(e) => {
                    world.model.lock().expect("poisoned").failed(range.clone(), id);
                    world.op_failed("a write", &e, excuse, writers, space);
                }
            }
            let mut busy = world.busy.lock().expect("poisoned");
            for b in range {
                busy.remove(&b);
            }
        });
    } else if kind < 90 {
        let issued: Vec<crate::model::Ticket> = {
            let m = world.model.lock().expect("poisoned");
            range.clone().map(|b| m.ticket(b)).collect()
        };
        ops.spawn(async move {
            let mut buf = vec![0u8; ((range.end - range.start) as usize) * BLOCK];
            let r = volume.read(range.start * BLOCK as u64, &mut buf).await;
            tracing::debug!(?range, ok = r.is_ok(), first = ?crate::model::decode(&buf[..BLOCK], range.start), writer = writers, "read done");
            match r {
                Ok(()) => {
                    let mut m = world.model.lock().expect("poisoned");
                    for (i, b) in range.clone().enumerate() {
                        let data = &buf[i * BLOCK..(i + 1) * BLOCK];
                        if let Err(broken) = m.read_done(b, data, &issued[i]) {
                            drop(m);
                            world.violation(format!("a read: block {}: {}", broken.block, broken.what));
                            m = world.model.lock().expect("poisoned");
                        }
                    }
                }
                Err(e) => world.op_failed("a read", &e, excuse, writers, space),
            }
        });
    } else {
        let covered = world.model.lock().expect("poisoned").flush_issued();
        ops.spawn(async move {
            match volume.flush().await {
                Ok(()) => world.model.lock().expect("poisoned").flushed(&covered),
                Err(e) => world.op_failed("a flush", &e, excuse, writers, space),
            }
        });
    }
}
