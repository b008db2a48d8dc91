//! Zone operations: what the management API does to the zone metadata.
//!
//! Every mutation is a compare-and-swap on the records it changes, so two API
//! servers sharing one store (etcd) never lose each other's updates.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::env::{Clock, Env, IdSource};
use crate::placement::{place, PlacementDisk, PlacementError};
use crate::records::*;
use crate::store::{CasOp, Expect, KeyValue, LeaseId, MetaStore, StoreError};
use crate::ZoneError;

mod moves;
#[cfg(test)]
mod simulated_tests;

pub use moves::{MovePlanner, RecordedMove};

/// Body of `POST /v1/nodes`: a storage node announcing itself and its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    pub uuid: Uuid,
    pub host: String,
    pub addr: String,
    /// Unix socket for local sessions (clients on the same host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    pub disks: Vec<RegisterDisk>,
    /// The highest storage protocol version the node speaks (absent: a
    /// node from before it said; see [`Node::protocol`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u16>,
}

/// One disk in [`RegisterNode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterDisk {
    pub uuid: Uuid,
    pub path: String,
    pub capacity: u64,
    pub used: u64,
}

/// Answer to [`RegisterNode`]: the liveness lease the node must keep alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub zone: Uuid,
    pub lease: u64,
    /// The node must send a heartbeat at least this often.
    pub heartbeat_ms: u64,
}

/// Body of `POST /v1/nodes/{uuid}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub lease: u64,
    /// Current usage of each disk of the node.
    #[serde(default)]
    pub disks: Vec<RegisterDisk>,
    /// The copies the node holds, as (disk, vDisk) pairs.
    #[serde(default)]
    pub copies: Vec<[Uuid; 2]>,
    /// The vDisks the node holds chunks of.
    #[serde(default)]
    pub vdisks: Vec<Uuid>,
    /// The space each copy takes on its disk (absent: the node does not
    /// say). Kept in the API server's memory only, never in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Vec<CopyUsage>>,
    /// Groups of [`HeartbeatReply::free_groups`] the node has freed since
    /// its last heartbeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freed_groups: Vec<GroupsToFree>,
}

/// Placement groups of one vDisk's copy on one disk that moved away while
/// the disk keeps the vDisk's other groups: the node frees the chunks of
/// those groups (chunk `c` is in group `c % stripes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsToFree {
    pub disk: Uuid,
    pub vdisk: Uuid,
    pub stripes: u32,
    pub groups: Vec<u32>,
}

/// The space one disk gives one vDisk, as its node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyUsage {
    pub disk: Uuid,
    pub vdisk: Uuid,
    /// Bytes of the disk taken by the vDisk's data.
    pub bytes: u64,
}

/// The space one copy of a vDisk takes (see [`VdiskView::space`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySpace {
    pub disk: Uuid,
    /// The placement group the copy belongs to.
    pub group: u32,
    /// Bytes its disk gives the vDisk (all of the vDisk's chunks on that
    /// disk); `None` until the disk's node has reported it.
    pub used: Option<u64>,
}

/// A datastore and its space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatastoreView {
    #[serde(flatten)]
    pub datastore: Datastore,
    pub space: DatastoreSpace,
}

/// The space of a datastore's disks, as their nodes last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatastoreSpace {
    /// Bytes for chunk data on its disks, all together.
    pub capacity: u64,
    pub used: u64,
    pub free: u64,
    /// Roughly what its vDisks can still write: the free space divided by
    /// the copies each write takes.
    pub writable: u64,
    /// The fullest disk's use, in per cent.
    pub fullest_disk_percent: u32,
    /// What is filling up, one sentence each (empty: nothing is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A created vDisk, and what its creator should know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedVdisk {
    #[serde(flatten)]
    pub vdisk: Vdisk,
    /// Said when the vDisk is larger than its datastore can still write:
    /// it is thin, and writes fail once the disks are full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A datastore warns once it is this full, all disks together (per cent).
pub const DATASTORE_WARN_PERCENT: u32 = 85;
/// A datastore warns once one of its disks is this full (per cent): writes
/// that need space on it fail when it is full, whatever the others have.
pub const DISK_WARN_PERCENT: u32 = 90;

/// `used` of `capacity`, in per cent (rounded down; 100 if no capacity).
fn percent(used: u64, capacity: u64) -> u32 {
    if capacity == 0 {
        return 100;
    }
    (u128::from(used) * 100 / u128::from(capacity)).min(100) as u32
}

/// Answer to [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The vDisks of [`Heartbeat::vdisks`] the zone no longer has (deleted):
    /// the node frees their chunks.
    pub orphans: Vec<Uuid>,
    /// Copies of [`Heartbeat::copies`] whose disk no longer holds the vDisk
    /// (moved away): the node frees them on that disk.
    #[serde(default)]
    pub free: Vec<[Uuid; 2]>,
    /// Groups of copies of [`Heartbeat::copies`] that moved away while
    /// their disk keeps other groups of the vDisk: the node frees them and
    /// lists them in its next heartbeat's [`Heartbeat::freed_groups`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub free_groups: Vec<GroupsToFree>,
}

/// Whether a vDisk has every copy its policy requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Every placement group has as many current copies, on nodes that are
    /// up, as the policy's width.
    Healthy,
    /// Some group has fewer: a copy is stale, or its node is down (or unknown).
    Degraded,
}

/// A vDisk record with its health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiskView {
    #[serde(flatten)]
    pub vdisk: Vdisk,
    pub health: Health,
    /// One entry per stale copy: what resync still has to do.
    #[serde(default)]
    pub repair: Vec<CopyRepair>,
    /// The space of each copy on its disk, as the nodes last reported it.
    #[serde(default)]
    pub space: Vec<CopySpace>,
}

/// Body of `POST /v1/datastores`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDatastore {
    pub name: String,
    /// Number of copies (`mirrors=N`).
    pub mirrors: u32,
    /// Placement groups per vDisk; default 1.
    #[serde(default)]
    pub stripes: Option<u32>,
    /// Member disks; default every disk of the zone.
    #[serde(default)]
    pub disks: Option<Vec<Uuid>>,
}

/// Body of `POST /v1/datastores/{name}/disks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreDisk {
    pub disk: Uuid,
}

/// Body of `POST /v1/vdisks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVdisk {
    pub datastore: String,
    pub name: String,
    /// Bytes; a multiple of 512.
    pub size: u64,
}

/// Body of `POST /v1/vdisks/{datastore}/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVdisk {
    /// New size in bytes; a multiple of 512, not smaller than the current size.
    pub size: u64,
}

/// Body of `POST /v1/vdisks/{datastore}/{name}/open`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenVdisk {
    /// Host that will write the vDisk.
    pub host: String,
    /// Lease time to live in milliseconds; renewed with `renew`.
    pub ttl_ms: u64,
    /// Take the lease even if another live holder has it.
    #[serde(default)]
    pub force: bool,
    /// What the host does with the vDisk: front-end (runs the VM, the
    /// default) or backup.
    #[serde(default)]
    pub role: Option<Role>,
    /// The zone's repair worker opens a vDisk nobody has open to resync it;
    /// its lease yields to any other open.
    #[serde(default)]
    pub repair: bool,
}

/// Answer to [`OpenVdisk`]: everything a volume client needs to do I/O.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    pub vdisk: Vdisk,
    /// The epoch this open writes with.
    pub epoch: u64,
    pub session: Uuid,
    /// Every node holding a disk of the placement.
    pub nodes: Vec<NodeStatus>,
    /// Disk → node, for every disk of the placement.
    pub disks: Vec<Disk>,
}

/// Body of `POST /v1/vdisks/{datastore}/{name}/stale`: the writer records
/// that copies missed writes, before it acknowledges those writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkStale {
    pub session: Uuid,
    pub disks: Vec<Uuid>,
    /// Chunks those disks missed (added to each one's dirty set).
    #[serde(default)]
    pub chunks: Vec<u64>,
}

/// Body of `POST /v1/vdisks/{datastore}/{name}/clean`: resync copied
/// `chunks` to `disk`; with `complete`, the copy is current again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkClean {
    pub session: Uuid,
    pub disk: Uuid,
    #[serde(default)]
    pub chunks: Vec<u64>,
    /// The copy has every chunk: it leaves the stale list (refused while
    /// chunks remain dirty).
    #[serde(default)]
    pub complete: bool,
}

/// Body of `POST /v1/vdisks/{datastore}/{name}/activity`: the writer's
/// activity log changes (extents that may have writes in flight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkActive {
    pub session: Uuid,
    #[serde(default)]
    pub add: Vec<u64>,
    #[serde(default)]
    pub remove: Vec<u64>,
}

/// Repair state of one stale copy, in a [`VdiskView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRepair {
    pub disk: Uuid,
    /// Chunks still to copy to it.
    pub dirty_chunks: u64,
    /// Whether the node holding it is up (resync runs only then).
    pub node_up: bool,
    /// For a copy being built by a move (rebuild, drain, rebalance): the
    /// disk it replaces.
    #[serde(default)]
    pub replaces: Option<Uuid>,
}

/// Answer to `POST /v1/vdisks/{datastore}/{name}/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewed {
    #[serde(flatten)]
    pub lease: Lease,
    /// The vDisk's placement version: a writer whose placement is older
    /// fetches the new one.
    #[serde(default)]
    pub placement_version: u64,
}

/// Body of `POST /v1/vdisks/{datastore}/{name}/renew` and `/close`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRef {
    pub session: Uuid,
    /// For renew: new time to live in milliseconds.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// For close: the writer could not make its last writes stable (its
    /// final flush failed), so the activity log stays for the next open to
    /// reconcile; the lease is released all the same.
    #[serde(default)]
    pub keep_activity: bool,
    /// For renew: the newest placement version the writer has settled on
    /// (see [`Lease::settled`]).
    #[serde(default)]
    pub settled: Option<u64>,
}

/// Default time to live of a node's liveness lease.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(5);
/// Most copies a mirrored datastore may have.
pub const MAX_MIRRORS: u32 = 16;
/// Most placement groups (stripes) per vDisk.
pub const MAX_STRIPES: u32 = 64;
/// Longest vDisk lease time to live, in milliseconds.
pub const MAX_LEASE_TTL_MS: u64 = 3_600_000;
/// vDisk lease time to live used by a renewal that names none, in
/// milliseconds, when the lease does not record the one it was opened with.
pub const DEFAULT_LEASE_TTL_MS: u64 = 10_000;
/// Longest name of a datastore, vDisk or zone.
const MAX_NAME: usize = 64;
/// Longest host name (as DNS).
const MAX_HOST_NAME: usize = 253;
/// Compare-and-swap attempts before an update gives up under contention.
const MAX_CAS_ATTEMPTS: usize = 64;
/// Largest vDisk, in bytes: 64 TiB (and at most [`MAX_VDISK_CHUNKS`]
/// chunks: see [`max_vdisk_size`]). Create and resize refuse more.
///
/// In the zone nothing grows with a vDisk's size: a dirty set is runs per
/// placement group (at most [`MAX_DIRTY_RUNS`]), and the move planner
/// records a whole group as one run. The bound is for the volume client,
/// which keeps state per chunk a copy misses (a whole group after a move)
/// and per activity-log extent.
pub const MAX_VDISK_SIZE: u64 = 64 << 40;
/// Most chunks of a vDisk: a vDisk is at most `MAX_VDISK_CHUNKS` chunks and
/// at most [`MAX_VDISK_SIZE`] bytes (64 TiB with 1 MiB chunks, 4 TiB with
/// 64 KiB chunks).
pub const MAX_VDISK_CHUNKS: u64 = 1 << 26;

/// The zone service over one metadata store.
#[derive(Clone)]
pub struct ZoneService {
    store: Arc<dyn MetaStore>,
    node_ttl: Duration,
    env: Env,
    chunk_size: u64,
    /// Disk → vDisk → bytes, from the nodes' heartbeats (statistics: in
    /// memory, never in the store).
    usage: Arc<std::sync::Mutex<HashMap<Uuid, HashMap<Uuid, u64>>>>,
}

/// A record with the revision it was read at.
struct Stored<T> {
    record: T,
    revision: u64,
}

impl ZoneService {
    /// A service over `store`, with node liveness leases of
    /// [`DEFAULT_NODE_TTL`], the wall clock and random ids ([`Env::system`]),
    /// and chunks of [`CHUNK_SIZE`].
    pub fn new(store: Arc<dyn MetaStore>) -> Self {
        Self {
            store,
            node_ttl: DEFAULT_NODE_TTL,
            env: Env::system(),
            chunk_size: CHUNK_SIZE,
            usage: Arc::default(),
        }
    }

    /// Sets where the service reads the time and gets new ids (e.g.
    /// [`Env::simulated`] for a deterministic simulation).
    pub fn with_env(mut self, env: Env) -> Self {
        self.env = env;
        self
    }

    /// Sets the clock (milliseconds since the Unix epoch) the service reads
    /// lease expiry and creation times from.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.env = self.env.with_clock(clock);
        self
    }

    /// Sets where the service gets the ids of new zones, datastores, vDisks
    /// and sessions.
    pub fn with_ids(mut self, ids: IdSource) -> Self {
        self.env = self.env.with_ids(ids);
        self
    }

    /// Sets the chunk size of the vDisks this service creates: a power of
    /// two from [`MIN_CHUNK_SIZE`] (4 KiB) to [`MAX_CHUNK_SIZE`] (1 GiB).
    /// Existing vDisks keep the one they were created with.
    pub fn with_chunk_size(mut self, bytes: u64) -> Result<Self, ZoneError> {
        if !bytes.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&bytes) {
            return Err(ZoneError::Invalid(format!(
                "a chunk size must be a power of two from {} to {}, not {bytes} bytes",
                human(MIN_CHUNK_SIZE),
                human(MAX_CHUNK_SIZE)
            )));
        }
        self.chunk_size = bytes;
        Ok(self)
    }

    /// The service's clock and id source.
    pub fn env(&self) -> &Env {
        &self.env
    }

    /// The chunk size of the vDisks this service creates.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Sets the time to live of node liveness leases: a node that sends no
    /// heartbeat for this long is down.
    pub fn with_node_ttl(mut self, ttl: Duration) -> Self {
        self.node_ttl = ttl;
        self
    }

    /// The metadata store the service works on.
    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    // ---- the zone ----

    /// Creates the zone record if the store has none; returns the zone.
    /// Fails with a conflict if the store holds a zone of another name.
    pub async fn ensure_zone(&self, name: &str) -> Result<Zone, ZoneError> {
        validate_name("zone", name)?;
        let zone = Zone {
            schema: SCHEMA_VERSION,
            uuid: self.env.new_id(),
            name: name.to_owned(),
            created: self.env.now_secs(),
        };
        let existing = match self.create(keys::ZONE, &zone).await? {
            None => return Ok(zone),
            Some(kv) => decode::<Zone>(keys::ZONE, &kv.value)?,
        };
        if existing.name != name {
            return Err(ZoneError::Conflict(format!(
                "the metadata store holds zone '{}', not zone '{name}'",
                existing.name
            )));
        }
        Ok(existing)
    }

    /// The zone record.
    pub async fn zone(&self) -> Result<Zone, ZoneError> {
        self.get(keys::ZONE, || "the zone record".into())
            .await
            .map(|s| s.record)
    }

    // ---- hosts, nodes, disks ----

    /// Records a storage node, its disks and its host (role back-end), and
    /// makes it up: its liveness key is bound to a fresh store lease that the
    /// node keeps alive with [`heartbeat`](Self::heartbeat). Registering
    /// again replaces the previous lease.
    pub async fn register_node(&self, req: RegisterNode) -> Result<Registered, ZoneError> {
        validate_host(&req.host)?;
        req.addr.parse::<SocketAddr>().map_err(|_| {
            ZoneError::Invalid(format!(
                "node address {} is not an ip:port address",
                quote(&req.addr)
            ))
        })?;
        if let Some(socket) = &req.socket {
            // sun_path holds 108 bytes with the terminating NUL.
            if !socket.starts_with('/') || socket.len() > 107 || socket.contains('\0') {
                return Err(ZoneError::Invalid(format!(
                    "node socket {} is not an absolute path of at most 107 bytes",
                    quote(socket)
                )));
            }
        }
        let mut seen = HashSet::new();
        for disk in &req.disks {
            if !seen.insert(disk.uuid) {
                return Err(ZoneError::Invalid(format!(
                    "disk {} is listed twice",
                    disk.uuid
                )));
            }
            if disk.path.is_empty() || disk.path.len() > 4096 {
                return Err(ZoneError::Invalid(format!(
                    "disk {} needs a path of 1 to 4096 bytes",
                    disk.uuid
                )));
            }
        }
        let zone = self.zone().await?;

        // Refuse disks of other nodes before writing anything.
        for disk in &req.disks {
            if let Some(existing) = self.load::<Disk>(&keys::disk(&disk.uuid)).await? {
                if existing.record.node != req.uuid {
                    return Err(ZoneError::Conflict(format!(
                        "disk {} belongs to node {}",
                        disk.uuid, existing.record.node
                    )));
                }
            }
        }
        for disk in &req.disks {
            let record = Disk {
                schema: SCHEMA_VERSION,
                uuid: disk.uuid,
                node: req.uuid,
                path: disk.path.clone(),
                capacity: disk.capacity,
                used: disk.used,
            };
            self.upsert(&keys::disk(&disk.uuid), |_| Ok(record.clone()))
                .await?;
        }
        let node = Node {
            schema: SCHEMA_VERSION,
            uuid: req.uuid,
            host: req.host.clone(),
            addr: req.addr.clone(),
            socket: req.socket.clone(),
            disks: req.disks.iter().map(|d| d.uuid).collect(),
            registered: self.env.now_secs(),
            protocol: req.protocol.unwrap_or(0),
        };
        self.upsert(&keys::node(&req.uuid), |_| Ok(node.clone()))
            .await?;
        self.ensure_host_role(&req.host, Role::BackEnd).await?;

        let alive_key = keys::alive(&req.uuid);
        let previous = self.store.get(&alive_key).await?.and_then(|kv| kv.lease);
        let lease = self.store.grant_lease(self.node_ttl).await?;
        self.store
            .put(&alive_key, req.uuid.to_string().into_bytes(), Some(lease))
            .await?;
        if let Some(previous) = previous.filter(|&p| p != lease) {
            self.store.revoke(previous).await?;
        }
        tracing::info!(node = %req.uuid, host = %req.host, %lease, "storage node registered");
        Ok(Registered {
            zone: zone.uuid,
            lease: lease.0,
            heartbeat_ms: u64::try_from(self.node_ttl.as_millis() / 3)
                .unwrap_or(u64::MAX)
                .max(1),
        })
    }

    /// Keeps node `node`'s liveness lease alive, records its disks' usage, and
    /// answers which of its vDisks the zone no longer has. Fails with
    /// [`ZoneError::NotFound`] if the node is unknown or its lease is gone:
    /// the node must then register again.
    pub async fn heartbeat(&self, node: Uuid, hb: Heartbeat) -> Result<HeartbeatReply, ZoneError> {
        let record = self
            .get::<Node>(&keys::node(&node), || format!("node {node}"))
            .await?
            .record;
        let lease = LeaseId(hb.lease);
        let gone = || {
            ZoneError::NotFound(format!(
                "a live registration of node {node} with lease {lease}"
            ))
        };
        let alive = self.store.get(&keys::alive(&node)).await?;
        if alive.and_then(|kv| kv.lease) != Some(lease) {
            return Err(gone());
        }
        match self.store.keep_alive(lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseExpired(_) | StoreError::LeaseNotFound(_)) => return Err(gone()),
            Err(error) => return Err(error.into()),
        }

        for disk in &hb.disks {
            if !record.disks.contains(&disk.uuid) {
                tracing::warn!(%node, disk = %disk.uuid, "heartbeat reports a disk the node did not register");
                continue;
            }
            let (capacity, used) = (disk.capacity, disk.used);
            let mut before = None;
            let updated = self
                .update(
                    &keys::disk(&disk.uuid),
                    || format!("disk {}", disk.uuid),
                    |d: &mut Disk| {
                        before = Some(percent(d.used, d.capacity));
                        d.capacity = capacity;
                        d.used = used;
                        Ok(())
                    },
                )
                .await;
            let now = percent(used, capacity);
            if before.is_some_and(|b| b < DISK_WARN_PERCENT) && now >= DISK_WARN_PERCENT {
                tracing::warn!(%node, disk = %disk.uuid, percent = now, "a disk is filling up: writes that need space on it fail once it is full");
            }
            match updated {
                Ok(_) | Err(ZoneError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }

        if let Some(usage) = &hb.usage {
            let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            for disk in hb.disks.iter().filter(|d| record.disks.contains(&d.uuid)) {
                let mine = usage
                    .iter()
                    .filter(|u| u.disk == disk.uuid)
                    .map(|u| (u.vdisk, u.bytes))
                    .collect();
                all.insert(disk.uuid, mine);
            }
        }

        let mut orphans = Vec::new();
        if !hb.vdisks.is_empty() {
            let known: HashSet<Uuid> = self
                .load_all::<Vdisk>(keys::VDISKS)
                .await?
                .into_iter()
                .map(|v| v.uuid)
                .collect();
            orphans = hb
                .vdisks
                .into_iter()
                .filter(|v| !known.contains(v))
                .collect();
        }
        // Also with no copies: a node that freed its last moved copy
        // reports none, which is what lets `released` forget it.
        let (free, free_groups) = self
            .copies_to_free(&record, &hb.copies, &hb.freed_groups)
            .await?;
        Ok(HeartbeatReply {
            orphans,
            free,
            free_groups,
        })
    }

    /// Every host of the zone.
    pub async fn hosts(&self) -> Result<Vec<Host>, ZoneError> {
        self.load_all(keys::HOSTS).await
    }

    /// Every storage node, with its state: up iff its liveness key exists.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>, ZoneError> {
        let up = self.up_nodes().await?;
        let nodes: Vec<Node> = self.load_all(keys::NODES).await?;
        Ok(nodes.into_iter().map(|node| status(node, &up)).collect())
    }

    /// Every disk of the zone.
    pub async fn disks(&self) -> Result<Vec<Disk>, ZoneError> {
        self.load_all(keys::DISKS).await
    }

    // ---- datastores ----

    /// Creates a mirrored datastore.
    pub async fn create_datastore(&self, req: CreateDatastore) -> Result<Datastore, ZoneError> {
        let policy = Policy {
            redundancy: Redundancy::Mirror {
                copies: req.mirrors,
            },
            stripes: req.stripes.unwrap_or(1),
        };
        self.create_datastore_with(&req.name, policy, req.disks)
            .await
    }

    /// Creates a datastore with any policy over `disks` (default: every disk
    /// of the zone). Refuses policies this release cannot serve (erasure
    /// coding) and datastores whose up nodes are fewer than a group's width.
    pub async fn create_datastore_with(
        &self,
        name: &str,
        policy: Policy,
        disks: Option<Vec<Uuid>>,
    ) -> Result<Datastore, ZoneError> {
        validate_name("datastore", name)?;
        let copies = match policy.redundancy {
            Redundancy::Mirror { copies } => copies,
            Redundancy::ErasureCode { .. } => {
                return Err(ZoneError::Invalid(
                    "erasure coding is not supported yet".into(),
                ))
            }
        };
        if !(1..=MAX_MIRRORS).contains(&copies) {
            return Err(ZoneError::Invalid(format!(
                "mirrors must be between 1 and {MAX_MIRRORS}, not {copies}"
            )));
        }
        if !(1..=MAX_STRIPES).contains(&policy.stripes) {
            return Err(ZoneError::Invalid(format!(
                "stripes must be between 1 and {MAX_STRIPES}, not {}",
                policy.stripes
            )));
        }

        let zone_disks: HashMap<Uuid, Disk> = self
            .disks()
            .await?
            .into_iter()
            .map(|d| (d.uuid, d))
            .collect();
        let members: Vec<Uuid> = match disks {
            None => zone_disks
                .keys()
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            Some(list) => {
                let mut seen = HashSet::new();
                for disk in &list {
                    if !seen.insert(*disk) {
                        return Err(ZoneError::Invalid(format!("disk {disk} is listed twice")));
                    }
                    if !zone_disks.contains_key(disk) {
                        return Err(ZoneError::NotFound(format!("disk {disk}")));
                    }
                }
                if list.is_empty() {
                    return Err(ZoneError::Invalid(
                        "a datastore needs at least one disk".into(),
                    ));
                }
                list
            }
        };
        let up = self.up_nodes().await?;
        let up_owners: HashSet<Uuid> = members
            .iter()
            .filter_map(|d| zone_disks.get(d))
            .map(|d| d.node)
            .filter(|n| up.contains(n))
            .collect();
        if up_owners.len() < copies as usize {
            return Err(ZoneError::Unsatisfiable(format!(
                "datastore '{name}' needs {copies} nodes for mirrors={copies}; the zone has {} nodes with disks up",
                up_owners.len()
            )));
        }

        let datastore = Datastore {
            schema: SCHEMA_VERSION,
            uuid: self.env.new_id(),
            name: name.to_owned(),
            policy,
            disks: members,
            created: self.env.now_secs(),
            deleting: false,
        };
        if self
            .create(&keys::datastore(name), &datastore)
            .await?
            .is_some()
        {
            return Err(ZoneError::AlreadyExists(format!("datastore '{name}'")));
        }
        tracing::info!(datastore = name, "datastore created");
        Ok(datastore)
    }

    /// Every datastore, by name.
    pub async fn datastores(&self) -> Result<Vec<Datastore>, ZoneError> {
        self.load_all(keys::DATASTORES).await
    }

    /// One datastore.
    pub async fn datastore(&self, name: &str) -> Result<Datastore, ZoneError> {
        Ok(self.get_datastore(name).await?.record)
    }

    /// Every datastore, by name, with its space.
    pub async fn datastore_views(&self) -> Result<Vec<DatastoreView>, ZoneError> {
        let disks = self.disks().await?;
        Ok(self
            .datastores()
            .await?
            .into_iter()
            .map(|ds| datastore_view(ds, &disks))
            .collect())
    }

    /// One datastore with its space.
    pub async fn datastore_view(&self, name: &str) -> Result<DatastoreView, ZoneError> {
        let ds = self.datastore(name).await?;
        Ok(datastore_view(ds, &self.disks().await?))
    }

    /// Creates a vDisk ([`ZoneService::create_vdisk`]) and says when it is
    /// larger than its datastore can still write (it is thin: allowed).
    pub async fn create_vdisk_noted(&self, req: CreateVdisk) -> Result<CreatedVdisk, ZoneError> {
        let vdisk = self.create_vdisk(req).await?;
        let space = self.datastore_view(&vdisk.datastore).await?.space;
        let note = (vdisk.size > space.writable).then(|| {
            format!(
                "vDisk {}/{} ({} bytes) is larger than its datastore can still write ({} bytes free for its copies): it is thin, and writes that need space fail once the disks are full",
                vdisk.datastore, vdisk.name, vdisk.size, space.writable
            )
        });
        if let Some(note) = &note {
            tracing::warn!(vdisk = %format!("{}/{}", vdisk.datastore, vdisk.name), "{note}");
        }
        Ok(CreatedVdisk { vdisk, note })
    }

    /// What each vDisk's copies take on each disk (disk → vDisk → bytes),
    /// as the nodes' latest heartbeats reported it.
    pub(crate) fn usage_snapshot(&self) -> HashMap<Uuid, HashMap<Uuid, u64>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `view` with the space of each copy filled in.
    fn with_space(&self, mut view: VdiskView) -> VdiskView {
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let uuid = view.vdisk.uuid;
        let used = |disk: &Uuid| usage.get(disk).map(|m| m.get(&uuid).copied().unwrap_or(0));
        let p = &view.vdisk.placement;
        let mut space: Vec<CopySpace> = p
            .groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| group.iter().map(move |d| (g as u32, *d)))
            .chain(p.moves.iter().map(|m| (m.group, m.to)))
            .map(|(group, disk)| CopySpace {
                disk,
                group,
                used: used(&disk),
            })
            .collect();
        space.dedup();
        view.space = space;
        view
    }

    /// Deletes a datastore that holds no vDisk.
    ///
    /// Marks it `deleting` first (which stops new vDisks), then checks it is
    /// empty, then deletes it; if it is not empty, clears the mark again. A
    /// vDisk creation racing with the deletion sees the mark or the missing
    /// datastore when it re-reads the datastore after writing the vDisk, and
    /// withdraws the vDisk: no vDisk outlives its datastore.
    pub async fn delete_datastore(&self, name: &str) -> Result<(), ZoneError> {
        validate_name("datastore", name)?;
        let key = keys::datastore(name);
        let what = || format!("datastore '{name}'");
        let unmark = || async {
            self.update(&key, what, |ds: &mut Datastore| {
                ds.deleting = false;
                Ok(())
            })
            .await
        };
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (marked, _) = self
                .update(&key, what, |ds: &mut Datastore| {
                    ds.deleting = true;
                    Ok(())
                })
                .await?;
            let vdisks = self.store.range(&vdisk_prefix(name)).await?.len();
            if vdisks > 0 {
                unmark().await?;
                return Err(ZoneError::Conflict(format!(
                    "datastore '{name}' still holds {vdisks} vDisks"
                )));
            }
            let deleted = self
                .store
                .compare_and_swap(&key, Expect::ModRevision(marked.revision), CasOp::Delete)
                .await?;
            if deleted.succeeded {
                tracing::info!(datastore = name, "datastore deleted");
                return Ok(());
            }
            // The datastore changed after it was marked (a disk added or
            // removed): mark and check again.
        }
        // Contention promises that nothing changed: take the mark back.
        unmark().await?;
        Err(ZoneError::Contention(what()))
    }

    // ---- vDisks ----

    /// Creates a vDisk, offline, at epoch 0, placed on the datastore's disks.
    pub async fn create_vdisk(&self, req: CreateVdisk) -> Result<Vdisk, ZoneError> {
        validate_name("vDisk", &req.name)?;
        validate_name("datastore", &req.datastore)?;
        validate_size(req.size, self.chunk_size)?;
        let (ds_name, name) = (req.datastore.as_str(), req.name.as_str());
        let datastore = self.get_datastore(ds_name).await?.record;
        if datastore.deleting {
            return Err(ZoneError::Conflict(format!(
                "datastore '{ds_name}' is being deleted"
            )));
        }

        let up = self.up_nodes().await?;
        let mut candidates = Vec::with_capacity(datastore.disks.len());
        for disk in &datastore.disks {
            if let Some(Stored { record: d, .. }) = self.load::<Disk>(&keys::disk(disk)).await? {
                candidates.push(PlacementDisk {
                    disk: d.uuid,
                    node: d.node,
                    capacity: d.capacity,
                    used: d.used,
                    up: up.contains(&d.node),
                });
            }
        }
        let uuid = self.env.new_id();
        let groups = place(uuid, &datastore.policy, &candidates).map_err(|error| match error {
            PlacementError::Unsatisfiable { needed, nodes_available } => ZoneError::Unsatisfiable(format!(
                "vDisk {ds_name}/{name} needs {needed} nodes with disks up and not full in datastore '{ds_name}'; it has {nodes_available}"
            )),
            other @ PlacementError::EmptyPolicy { .. } => ZoneError::Invalid(other.to_string()),
        })?;
        let vdisk = Vdisk {
            schema: SCHEMA_VERSION,
            uuid,
            name: name.to_owned(),
            datastore: ds_name.to_owned(),
            size: req.size,
            policy: datastore.policy,
            state: VdiskState::Offline,
            lease: None,
            epoch: 0,
            placement: Placement {
                chunk_size: self.chunk_size,
                groups,
                version: 1,
                moves: Vec::new(),
            },
            created: self.env.now_secs(),
            stale: Vec::new(),
            dirty: Vec::new(),
            activity: Vec::new(),
            released: Vec::new(),
            released_groups: Vec::new(),
        };
        let key = keys::vdisk(ds_name, name);
        if self.create(&key, &vdisk).await?.is_some() {
            return Err(ZoneError::AlreadyExists(format!("vDisk {ds_name}/{name}")));
        }

        // The datastore may have started a deletion meanwhile: see delete_datastore.
        let still = self.load::<Datastore>(&keys::datastore(ds_name)).await?;
        if !still.is_some_and(|s| s.record.uuid == datastore.uuid && !s.record.deleting) {
            if let Some(kv) = self.store.get(&key).await? {
                self.store
                    .compare_and_swap(&key, Expect::ModRevision(kv.mod_revision), CasOp::Delete)
                    .await?;
            }
            return Err(ZoneError::Conflict(format!(
                "datastore '{ds_name}' is being deleted"
            )));
        }
        tracing::info!(vdisk = %format!("{ds_name}/{name}"), %uuid, size = req.size, "vDisk created");
        Ok(vdisk)
    }

    /// Every vDisk, or those of one datastore, with their health.
    pub async fn vdisks(&self, datastore: Option<&str>) -> Result<Vec<VdiskView>, ZoneError> {
        let prefix = match datastore {
            Some(name) => {
                self.get_datastore(name).await?;
                vdisk_prefix(name)
            }
            None => keys::VDISKS.to_owned(),
        };
        let vdisks: Vec<Vdisk> = self.load_all(&prefix).await?;
        let liveness = self.liveness().await?;
        Ok(vdisks
            .into_iter()
            .map(|vdisk| self.with_space(liveness.view(vdisk)))
            .collect())
    }

    /// One vDisk with its health.
    pub async fn vdisk(&self, datastore: &str, name: &str) -> Result<VdiskView, ZoneError> {
        let vdisk = self.get_vdisk(datastore, name).await?.record;
        Ok(self.with_space(self.liveness().await?.view(vdisk)))
    }

    /// Grows a vDisk to `size` bytes (a multiple of 512, at most the limit
    /// of [`MAX_VDISK_SIZE`] and [`MAX_VDISK_CHUNKS`]). Shrinking is refused.
    pub async fn resize_vdisk(
        &self,
        datastore: &str,
        name: &str,
        size: u64,
    ) -> Result<Vdisk, ZoneError> {
        // The limit of the largest chunks first, then the vDisk's own.
        validate_size(size, MAX_CHUNK_SIZE)?;
        let (stored, ()) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    validate_size(size, v.placement.chunk_size)?;
                    if size < v.size {
                        return Err(ZoneError::Invalid(
                            "shrinking a vDisk is not supported".into(),
                        ));
                    }
                    v.size = size;
                    Ok(())
                },
            )
            .await?;
        Ok(stored.record)
    }

    /// Deletes a vDisk; refused while it is open (holds an unexpired lease)
    /// unless `force`. Its nodes free its chunks when their heartbeat reports
    /// it as an orphan.
    pub async fn delete_vdisk(
        &self,
        datastore: &str,
        name: &str,
        force: bool,
    ) -> Result<(), ZoneError> {
        let key = keys::vdisk(datastore, name);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Stored {
                record: vdisk,
                revision,
            } = self.get_vdisk(datastore, name).await?;
            let now = self.env.now_ms();
            if let Some(lease) = vdisk.lease.as_ref().filter(|l| l.expires_ms > now) {
                if !force {
                    return Err(ZoneError::Conflict(format!(
                        "vDisk {datastore}/{name} is open on host {}",
                        lease.holder
                    )));
                }
            }
            if self
                .store
                .compare_and_swap(&key, Expect::ModRevision(revision), CasOp::Delete)
                .await?
                .succeeded
            {
                tracing::info!(vdisk = %format!("{datastore}/{name}"), uuid = %vdisk.uuid, force, "vDisk deleted");
                return Ok(());
            }
        }
        Err(ZoneError::Contention(format!("vDisk {datastore}/{name}")))
    }

    /// Opens a vDisk for writing on `req.host`: takes its lease with a new
    /// session and the next epoch. Refused while another unexpired lease is
    /// held, unless `req.force` (take-over).
    pub async fn open_vdisk(
        &self,
        datastore: &str,
        name: &str,
        req: OpenVdisk,
    ) -> Result<Opened, ZoneError> {
        validate_host(&req.host)?;
        validate_ttl(req.ttl_ms)?;
        // The host that writes a vDisk is a front-end (or a backup server).
        self.ensure_host_role(&req.host, req.role.unwrap_or(Role::FrontEnd))
            .await?;
        let session = self.env.new_id();
        let (stored, ()) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    let now = self.env.now_ms();
                    if let Some(lease) = v.lease.as_ref().filter(|l| l.expires_ms > now) {
                        // A repair worker's lease yields to anyone but another worker.
                        if !req.force && (req.repair || !lease.repair) {
                            return Err(ZoneError::Conflict(format!(
                                "vDisk {datastore}/{name} is open on host {}",
                                lease.holder
                            )));
                        }
                    }
                    v.epoch = v.epoch.checked_add(1).ok_or_else(|| {
                        ZoneError::Conflict("the vDisk's epochs are exhausted".into())
                    })?;
                    v.lease = Some(Lease {
                        holder: req.host.clone(),
                        session,
                        expires_ms: now.saturating_add(req.ttl_ms),
                        ttl_ms: req.ttl_ms,
                        repair: req.repair,
                        // The writer starts from the placement it is given.
                        settled: v.placement.version,
                    });
                    v.state = VdiskState::Online {
                        host: req.host.clone(),
                    };
                    Ok(())
                },
            )
            .await?;
        let vdisk = stored.record;
        tracing::info!(vdisk = %format!("{datastore}/{name}"), host = %req.host, epoch = vdisk.epoch, force = req.force, "vDisk opened");

        let placed: BTreeSet<Uuid> = vdisk.placement.groups.iter().flatten().copied().collect();
        let mut disks = Vec::with_capacity(placed.len());
        for disk in &placed {
            if let Some(stored) = self.load::<Disk>(&keys::disk(disk)).await? {
                disks.push(stored.record);
            }
        }
        let owners: BTreeSet<Uuid> = disks.iter().map(|d| d.node).collect();
        let up = self.up_nodes().await?;
        let mut nodes = Vec::with_capacity(owners.len());
        for node in &owners {
            if let Some(stored) = self.load::<Node>(&keys::node(node)).await? {
                nodes.push(status(stored.record, &up));
            }
        }
        Ok(Opened {
            epoch: vdisk.epoch,
            session,
            vdisk,
            nodes,
            disks,
        })
    }

    /// Extends the lease of session `req.session` by `req.ttl_ms` (default:
    /// the time to live it was opened with). An expired lease that nobody took
    /// over may still be renewed; a lease taken over (or given back) is lost:
    /// [`ZoneError::LeaseLost`].
    pub async fn renew_vdisk(
        &self,
        datastore: &str,
        name: &str,
        req: SessionRef,
    ) -> Result<Renewed, ZoneError> {
        if let Some(ttl) = req.ttl_ms {
            validate_ttl(ttl)?;
        }
        let (stored, lease) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    let lease = match v.lease.as_mut() {
                        Some(lease) if lease.session == req.session => lease,
                        Some(lease) => {
                            return Err(ZoneError::LeaseLost(format!(
                                "vDisk {datastore}/{name} was taken over by host {}",
                                lease.holder
                            )))
                        }
                        None => {
                            return Err(ZoneError::LeaseLost(format!(
                                "vDisk {datastore}/{name} is not open"
                            )))
                        }
                    };
                    let ttl = req.ttl_ms.unwrap_or(if lease.ttl_ms > 0 {
                        lease.ttl_ms
                    } else {
                        DEFAULT_LEASE_TTL_MS
                    });
                    lease.expires_ms = self.env.now_ms().saturating_add(ttl);
                    lease.ttl_ms = ttl;
                    if let Some(settled) = req.settled {
                        lease.settled = lease.settled.max(settled.min(v.placement.version));
                    }
                    Ok(lease.clone())
                },
            )
            .await?;
        Ok(Renewed {
            lease,
            placement_version: stored.record.placement.version,
        })
    }

    /// Creates the host record if missing and adds `role` to it.
    async fn ensure_host_role(&self, name: &str, role: Role) -> Result<(), ZoneError> {
        self.upsert(&keys::host(name), |host: Option<Host>| {
            let mut host = host.unwrap_or_else(|| Host {
                schema: SCHEMA_VERSION,
                name: name.to_owned(),
                roles: Vec::new(),
            });
            if !host.roles.contains(&role) {
                host.roles.push(role);
                host.roles.sort();
            }
            Ok(host)
        })
        .await?;
        Ok(())
    }

    /// Records that the copies on `req.disks` missed writes of session
    /// `req.session` (disks no longer in the placement are ignored). Only the
    /// lease holder may do so (a fenced writer gets [`ZoneError::LeaseLost`]);
    /// the record is durable when this returns, so the writer may then
    /// acknowledge writes that reached only the other copies.
    pub async fn mark_stale(
        &self,
        datastore: &str,
        name: &str,
        req: MarkStale,
    ) -> Result<Vdisk, ZoneError> {
        let (stored, ()) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    require_session(v, req.session, datastore, name)?;
                    for d in &req.disks {
                        // A disk that left the placement (a finished move)
                        // holds nothing a reader could use: nothing to record.
                        if !v.placement.holds(*d) {
                            continue;
                        }
                        // Chunks of groups the disk is not in (it left them
                        // in a move a writer had not adopted yet) are never
                        // read from it, nor resynced: nothing to record.
                        let stripes = u64::from(v.placement.stripes());
                        let chunks: Vec<u64> = req
                            .chunks
                            .iter()
                            .copied()
                            .filter(|c| {
                                v.placement
                                    .groups
                                    .get((c % stripes) as usize)
                                    .is_some_and(|g| g.contains(d))
                            })
                            .collect();
                        if chunks.is_empty() && !req.chunks.is_empty() {
                            continue;
                        }
                        // Chunks a move's target misses in the group it is
                        // being filled for make it no staler than it is.
                        let only_filling = !chunks.is_empty()
                            && chunks.iter().all(|c| {
                                v.placement
                                    .moves
                                    .iter()
                                    .any(|m| m.to == *d && u64::from(m.group) == c % stripes)
                            });
                        if !only_filling && !v.stale.contains(d) {
                            v.stale.push(*d);
                        }
                        dirty_set(v, *d).add(chunks.iter().copied());
                    }
                    Ok(())
                },
            )
            .await?;
        Ok(stored.record)
    }

    /// Updates the activity log of session `req.session`'s vDisk. Only the
    /// lease holder may do so ([`ZoneError::LeaseLost`] otherwise).
    pub async fn mark_active(
        &self,
        datastore: &str,
        name: &str,
        req: MarkActive,
    ) -> Result<Vdisk, ZoneError> {
        let (stored, ()) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    require_session(v, req.session, datastore, name)?;
                    v.activity.retain(|e| !req.remove.contains(e));
                    v.activity.extend(req.add.iter().copied());
                    v.activity.sort_unstable();
                    v.activity.dedup();
                    Ok(())
                },
            )
            .await?;
        Ok(stored.record)
    }

    /// Records chunks resync has copied to a stale copy; with `complete`,
    /// the copy leaves the stale list (it then serves reads again), or, if
    /// other chunks of the copy remain dirty, the call fails with
    /// [`ZoneError::StillDirty`] and records nothing. Only the lease holder
    /// may do so ([`ZoneError::LeaseLost`] otherwise).
    pub async fn mark_clean(
        &self,
        datastore: &str,
        name: &str,
        req: MarkClean,
    ) -> Result<Vdisk, ZoneError> {
        let (stored, ()) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    require_session(v, req.session, datastore, name)?;
                    if let Some(e) = v.dirty.iter_mut().find(|e| e.disk == req.disk) {
                        e.remove(req.chunks.iter().copied());
                    }
                    if req.complete {
                        // Chunks of groups the disk is not in (left by a
                        // finished move) are nothing it could copy.
                        let groups = &v.placement.groups;
                        let left: u64 =
                            v.dirty.iter().find(|e| e.disk == req.disk).map_or(0, |e| {
                                e.runs()
                                    .iter()
                                    .filter(|r| {
                                        groups
                                            .get(r[0] as usize)
                                            .is_some_and(|g| g.contains(&req.disk))
                                    })
                                    .map(|r| r[2] - r[1])
                                    .sum()
                            });
                        if left > 0 {
                            return Err(ZoneError::StillDirty {
                                disk: req.disk,
                                vdisk: format!("{datastore}/{name}"),
                                missing: left,
                            });
                        }
                        v.stale.retain(|d| *d != req.disk);
                        v.dirty.retain(|e| e.disk != req.disk);
                        moves::finish_moves(v, req.disk);
                    }
                    Ok(())
                },
            )
            .await?;
        Ok(stored.record)
    }

    /// Closes session `req.session`: clears the lease and takes the vDisk
    /// offline. Closing a session that no longer holds the lease changes
    /// nothing and succeeds (closing is idempotent).
    pub async fn close_vdisk(
        &self,
        datastore: &str,
        name: &str,
        req: SessionRef,
    ) -> Result<(), ZoneError> {
        self.update(
            &keys::vdisk(datastore, name),
            || format!("vDisk {datastore}/{name}"),
            |v: &mut Vdisk| {
                if v.lease.as_ref().is_some_and(|l| l.session == req.session) {
                    v.lease = None;
                    v.state = VdiskState::Offline;
                    // A clean close: nothing is in flight.
                    if !req.keep_activity {
                        v.activity.clear();
                    }
                }
                Ok(())
            },
        )
        .await?;
        Ok(())
    }

    // ---- helpers ----

    async fn get_datastore(&self, name: &str) -> Result<Stored<Datastore>, ZoneError> {
        validate_name("datastore", name)?;
        self.get(&keys::datastore(name), || format!("datastore '{name}'"))
            .await
    }

    async fn get_vdisk(&self, datastore: &str, name: &str) -> Result<Stored<Vdisk>, ZoneError> {
        validate_name("datastore", datastore)?;
        validate_name("vDisk", name)?;
        self.get(&keys::vdisk(datastore, name), || {
            format!("vDisk {datastore}/{name}")
        })
        .await
    }

    /// Uuids of the nodes whose liveness key exists.
    async fn up_nodes(&self) -> Result<HashSet<Uuid>, ZoneError> {
        let alive = self.store.range(keys::ALIVE).await?;
        Ok(alive
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(keys::ALIVE)?.parse().ok())
            .collect())
    }

    async fn liveness(&self) -> Result<Liveness, ZoneError> {
        let up = self.up_nodes().await?;
        let disks = self.disks().await?;
        Ok(Liveness {
            up_disks: disks
                .into_iter()
                .filter(|d| up.contains(&d.node))
                .map(|d| d.uuid)
                .collect(),
        })
    }

    async fn load<T: Record>(&self, key: &str) -> Result<Option<Stored<T>>, ZoneError> {
        match self.store.get(key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(Stored {
                record: decode(key, &kv.value)?,
                revision: kv.mod_revision,
            })),
        }
    }

    async fn get<T: Record>(
        &self,
        key: &str,
        what: impl FnOnce() -> String,
    ) -> Result<Stored<T>, ZoneError> {
        self.load(key)
            .await?
            .ok_or_else(|| ZoneError::NotFound(what()))
    }

    async fn load_all<T: Record>(&self, prefix: &str) -> Result<Vec<T>, ZoneError> {
        let kvs = self.store.range(prefix).await?;
        kvs.iter()
            .map(|kv| decode(&kv.key, &kv.value).map_err(ZoneError::from))
            .collect()
    }

    /// Writes `record` at `key` if the key is absent; otherwise returns what is there.
    async fn create<T: Serialize>(
        &self,
        key: &str,
        record: &T,
    ) -> Result<Option<KeyValue>, ZoneError> {
        let value = encode(key, record)?;
        let result = self
            .store
            .compare_and_swap(key, Expect::Absent, CasOp::Put(value))
            .await?;
        Ok(if result.succeeded {
            None
        } else {
            result.current
        })
    }

    /// Read-modify-write of the record at `key` with a compare-and-swap loop:
    /// `change` may run several times, and may refuse with an error. Writes
    /// nothing if `change` leaves the record as it was.
    async fn update<T, R>(
        &self,
        key: &str,
        what: impl Fn() -> String,
        mut change: impl FnMut(&mut T) -> Result<R, ZoneError>,
    ) -> Result<(Stored<T>, R), ZoneError>
    where
        T: Record,
    {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Stored {
                mut record,
                revision,
            } = self.get::<T>(key, &what).await?;
            let before = encode(key, &record)?;
            let answer = change(&mut record)?;
            let after = encode(key, &record)?;
            if before == after {
                return Ok((Stored { record, revision }, answer));
            }
            let result = self
                .store
                .compare_and_swap(key, Expect::ModRevision(revision), CasOp::Put(after))
                .await?;
            if result.succeeded {
                return Ok((
                    Stored {
                        record,
                        revision: result.revision,
                    },
                    answer,
                ));
            }
        }
        Err(ZoneError::Contention(what()))
    }

    /// Creates or replaces the record at `key` with `make(current)`, by
    /// compare-and-swap.
    async fn upsert<T>(
        &self,
        key: &str,
        mut make: impl FnMut(Option<T>) -> Result<T, ZoneError>,
    ) -> Result<T, ZoneError>
    where
        T: Record,
    {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (current, expect) = match self.load::<T>(key).await? {
                None => (None, Expect::Absent),
                Some(stored) => (Some(stored.record), Expect::ModRevision(stored.revision)),
            };
            let record = make(current)?;
            let value = encode(key, &record)?;
            if self
                .store
                .compare_and_swap(key, expect, CasOp::Put(value))
                .await?
                .succeeded
            {
                return Ok(record);
            }
        }
        Err(ZoneError::Contention(key.to_owned()))
    }
}

/// Which disks are on nodes that are up.
struct Liveness {
    up_disks: HashSet<Uuid>,
}

impl Liveness {
    fn view(&self, vdisk: Vdisk) -> VdiskView {
        let mut repairing: Vec<Uuid> = vdisk.stale.clone();
        for m in &vdisk.placement.moves {
            if !repairing.contains(&m.to) {
                repairing.push(m.to);
            }
        }
        let repair = repairing
            .iter()
            .map(|d| CopyRepair {
                disk: *d,
                dirty_chunks: vdisk
                    .dirty
                    .iter()
                    .find(|e| e.disk == *d)
                    .map_or(0, |e| e.count()),
                node_up: self.up_disks.contains(d),
                replaces: vdisk
                    .placement
                    .moves
                    .iter()
                    .find(|m| m.to == *d)
                    .map(|m| m.from),
            })
            .collect();
        let width = vdisk.policy.redundancy.width() as usize;
        let healthy = vdisk.placement.groups.iter().enumerate().all(|(g, group)| {
            group
                .iter()
                .filter(|d| {
                    self.up_disks.contains(d)
                        && !vdisk.stale.contains(d)
                        && !vdisk
                            .placement
                            .moves
                            .iter()
                            .any(|m| m.to == **d && m.group as usize == g)
                })
                .count()
                >= width
        });
        VdiskView {
            vdisk,
            repair,
            space: Vec::new(),
            health: if healthy {
                Health::Healthy
            } else {
                Health::Degraded
            },
        }
    }
}

/// A datastore's space from its member disks' records.
fn datastore_view(datastore: Datastore, disks: &[Disk]) -> DatastoreView {
    let members: Vec<&Disk> = disks
        .iter()
        .filter(|d| datastore.disks.contains(&d.uuid))
        .collect();
    let capacity: u64 = members.iter().map(|d| d.capacity).sum();
    let used: u64 = members.iter().map(|d| d.used.min(d.capacity)).sum();
    let free = capacity - used;
    let copies = u64::from(datastore.policy.redundancy.width().max(1));
    let fullest = members
        .iter()
        .max_by_key(|d| percent(d.used, d.capacity))
        .copied();
    let fullest_disk_percent = fullest.map_or(0, |d| percent(d.used, d.capacity));
    let mut warnings = Vec::new();
    let all = percent(used, capacity);
    if !members.is_empty() && all >= DATASTORE_WARN_PERCENT {
        warnings.push(format!(
            "datastore '{}' is {all}% full ({used} of {capacity} bytes): add disks or free space (delete vDisks, discard in guests)",
            datastore.name
        ));
    }
    for d in members
        .iter()
        .filter(|d| percent(d.used, d.capacity) >= DISK_WARN_PERCENT)
    {
        warnings.push(format!(
            "disk {} of datastore '{}' is {}% full: writes that need space on it fail once it is full",
            d.uuid,
            datastore.name,
            percent(d.used, d.capacity)
        ));
    }
    DatastoreView {
        datastore,
        space: DatastoreSpace {
            capacity,
            used,
            free,
            writable: free / copies,
            fullest_disk_percent,
            warnings,
        },
    }
}

/// Only the session holding a vDisk's lease may change its repair state.
fn require_session(v: &Vdisk, session: Uuid, datastore: &str, name: &str) -> Result<(), ZoneError> {
    if v.lease.as_ref().is_none_or(|l| l.session != session) {
        return Err(ZoneError::LeaseLost(format!(
            "vDisk {datastore}/{name} is not open by this session"
        )));
    }
    Ok(())
}

fn status(node: Node, up: &HashSet<Uuid>) -> NodeStatus {
    let state = if up.contains(&node.uuid) {
        NodeState::Up
    } else {
        NodeState::Down
    };
    NodeStatus { node, state }
}

fn vdisk_prefix(datastore: &str) -> String {
    format!("{}{datastore}/", keys::VDISKS)
}

/// The dirty set of `disk` in `v`, created empty if it has none.
fn dirty_set(v: &mut Vdisk, disk: Uuid) -> &mut DirtyChunks {
    let pos = match v.dirty.iter().position(|e| e.disk == disk) {
        Some(pos) => pos,
        None => {
            v.dirty.push(DirtyChunks::new(disk, v.placement.stripes()));
            v.dirty.len() - 1
        }
    };
    &mut v.dirty[pos]
}

/// A size in bytes for people: "64 TiB", "4 KiB", or the bytes when it is
/// no whole number of KiB.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = None;
    let mut value = bytes;
    for u in UNITS {
        if value == 0 || value % 1024 != 0 {
            break;
        }
        value /= 1024;
        unit = Some(u);
    }
    match unit {
        Some(u) => format!("{value} {u}"),
        None => format!("{bytes} bytes"),
    }
}

/// Quotes a user-supplied string for an error message, cut to 80 characters.
fn quote(text: &str) -> String {
    let cut: String = text.chars().take(80).collect();
    if cut.len() < text.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// Names of zones, datastores and vDisks: 1 to 64 characters among
/// `A-Z a-z 0-9 . _ -`, not starting with '.'.
fn validate_name(kind: &str, name: &str) -> Result<(), ZoneError> {
    let valid = (1..=MAX_NAME).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ZoneError::Invalid(format!(
            "{kind} name {} is invalid: use 1 to {MAX_NAME} characters among A-Z a-z 0-9 . _ -, not starting with '.'",
            quote(name)
        )))
    }
}

/// Host names: 1 to 253 characters among `A-Z a-z 0-9 . _ -`, not starting
/// with '.' or '-'.
fn validate_host(host: &str) -> Result<(), ZoneError> {
    let valid = (1..=MAX_HOST_NAME).contains(&host.len())
        && !host.starts_with(['.', '-'])
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ZoneError::Invalid(format!(
            "host name {} is invalid: use 1 to {MAX_HOST_NAME} characters among A-Z a-z 0-9 . _ -, not starting with '.' or '-'",
            quote(host)
        )))
    }
}

/// The largest vDisk with chunks of `chunk_size` bytes.
pub fn max_vdisk_size(chunk_size: u64) -> u64 {
    MAX_VDISK_SIZE.min(MAX_VDISK_CHUNKS.saturating_mul(chunk_size.max(1)))
}

/// A vDisk size is a positive multiple of [`SECTOR_SIZE`], at most
/// [`max_vdisk_size`].
fn validate_size(size: u64, chunk_size: u64) -> Result<(), ZoneError> {
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(ZoneError::Invalid(format!(
            "a vDisk size must be a positive multiple of {SECTOR_SIZE} bytes, not {size}"
        )));
    }
    let max = max_vdisk_size(chunk_size);
    if size > max {
        let chunks = if max < MAX_VDISK_SIZE {
            format!(", {MAX_VDISK_CHUNKS} chunks of {}", human(chunk_size))
        } else {
            String::new()
        };
        return Err(ZoneError::Invalid(format!(
            "a vDisk may be at most {} ({max} bytes{chunks}), not {size} bytes",
            human(max)
        )));
    }
    Ok(())
}

fn validate_ttl(ttl_ms: u64) -> Result<(), ZoneError> {
    if !(1..=MAX_LEASE_TTL_MS).contains(&ttl_ms) {
        return Err(ZoneError::Invalid(format!(
            "a lease time to live must be between 1 and {MAX_LEASE_TTL_MS} ms, not {ttl_ms}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled_store::SledStore;
    use crate::testing::Contended;

    const TB: u64 = 1 << 40;

    pub(super) async fn service() -> ZoneService {
        let store = SledStore::temporary().expect("a temporary store opens");
        let svc = ZoneService::new(Arc::new(store));
        svc.ensure_zone("test").await.expect("the zone is created");
        svc
    }

    pub(super) fn node_id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    pub(super) fn disk_id(n: u128, i: u128) -> Uuid {
        Uuid::from_u128(n * 100 + i)
    }

    pub(super) fn registration(n: u128, disks: u128) -> RegisterNode {
        RegisterNode {
            uuid: node_id(n),
            host: format!("hv{n}"),
            addr: format!("127.0.0.{n}:7000"),
            socket: None,
            disks: (0..disks)
                .map(|i| RegisterDisk {
                    uuid: disk_id(n, i),
                    path: format!("/dev/disk{i}"),
                    capacity: TB,
                    used: 0,
                })
                .collect(),
            protocol: None,
        }
    }

    /// Registers nodes 1..=count with `disks` disks each.
    pub(super) async fn cluster(svc: &ZoneService, count: u128, disks: u128) -> Vec<Registered> {
        let mut registered = Vec::new();
        for n in 1..=count {
            registered.push(
                svc.register_node(registration(n, disks))
                    .await
                    .expect("the node registers"),
            );
        }
        registered
    }

    /// Makes node `n` down by revoking its liveness lease.
    pub(super) async fn kill(svc: &ZoneService, n: u128) {
        let kv = svc
            .store()
            .get(&keys::alive(&node_id(n)))
            .await
            .expect("get")
            .expect("the node is up");
        svc.store()
            .revoke(kv.lease.expect("a leased key"))
            .await
            .expect("revoke");
    }

    pub(super) fn mirrors(name: &str, mirrors: u32, stripes: Option<u32>) -> CreateDatastore {
        CreateDatastore {
            name: name.into(),
            mirrors,
            stripes,
            disks: None,
        }
    }

    pub(super) fn vdisk_req(ds: &str, name: &str, size: u64) -> CreateVdisk {
        CreateVdisk {
            datastore: ds.into(),
            name: name.into(),
            size,
        }
    }

    pub(super) fn open_req(host: &str, ttl_ms: u64, force: bool) -> OpenVdisk {
        OpenVdisk {
            host: host.into(),
            ttl_ms,
            force,
            role: None,
            repair: false,
        }
    }

    fn session(session: Uuid) -> SessionRef {
        SessionRef {
            session,
            ttl_ms: None,
            keep_activity: false,
            settled: None,
        }
    }

    fn heartbeat(lease: u64) -> Heartbeat {
        Heartbeat {
            lease,
            disks: Vec::new(),
            vdisks: Vec::new(),
            copies: Vec::new(),
            usage: None,
            freed_groups: Vec::new(),
        }
    }

    #[tokio::test]
    async fn ensure_zone_is_idempotent_and_refuses_another_name() {
        let store: Arc<dyn MetaStore> = Arc::new(SledStore::temporary().expect("opens"));
        let svc = ZoneService::new(store);
        assert!(matches!(svc.zone().await, Err(ZoneError::NotFound(_))));
        let zone = svc.ensure_zone("z1").await.expect("created");
        assert_eq!(svc.ensure_zone("z1").await.expect("found"), zone);
        assert_eq!(svc.zone().await.expect("found"), zone);
        let error = svc.ensure_zone("z2").await.expect_err("another zone");
        assert_eq!(
            error.to_string(),
            "the metadata store holds zone 'z1', not zone 'z2'"
        );
        assert!(matches!(
            svc.ensure_zone("").await,
            Err(ZoneError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn register_node_records_node_disks_host_and_liveness() {
        let svc = service().await;
        let zone = svc.zone().await.expect("zone");
        let first = svc
            .register_node(registration(1, 2))
            .await
            .expect("registers");
        assert_eq!(first.zone, zone.uuid);
        assert_eq!(first.heartbeat_ms, 5000 / 3);

        let nodes = svc.nodes().await.expect("nodes");
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            (nodes[0].node.host.as_str(), nodes[0].state),
            ("hv1", NodeState::Up)
        );
        assert_eq!(nodes[0].node.disks, vec![disk_id(1, 0), disk_id(1, 1)]);
        let disks = svc.disks().await.expect("disks");
        assert_eq!(disks.len(), 2);
        assert!(disks
            .iter()
            .all(|d| d.node == node_id(1) && d.capacity == TB));
        let hosts = svc.hosts().await.expect("hosts");
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            (hosts[0].name.as_str(), hosts[0].roles.as_slice()),
            ("hv1", &[Role::BackEnd][..])
        );

        // Registering again replaces the lease; the old one is gone.
        let second = svc
            .register_node(registration(1, 2))
            .await
            .expect("registers again");
        assert_ne!(first.lease, second.lease);
        assert!(matches!(
            svc.heartbeat(node_id(1), heartbeat(first.lease)).await,
            Err(ZoneError::NotFound(_))
        ));
        svc.heartbeat(node_id(1), heartbeat(second.lease))
            .await
            .expect("the new lease works");
        assert_eq!(svc.nodes().await.expect("nodes")[0].state, NodeState::Up);
        assert_eq!(
            svc.hosts().await.expect("hosts")[0].roles,
            vec![Role::BackEnd]
        );
    }

    #[tokio::test]
    async fn register_node_refuses_bad_input_and_foreign_disks() {
        let svc = service().await;
        cluster(&svc, 1, 1).await;
        let mut thief = registration(2, 0);
        thief.disks.push(registration(1, 1).disks.remove(0));
        let error = svc
            .register_node(thief)
            .await
            .expect_err("the disk is node 1's");
        assert_eq!(
            error.to_string(),
            format!("disk {} belongs to node {}", disk_id(1, 0), node_id(1))
        );

        let mut bad = registration(3, 1);
        bad.addr = "not an address".into();
        assert!(matches!(
            svc.register_node(bad).await,
            Err(ZoneError::Invalid(_))
        ));
        let mut bad = registration(3, 1);
        bad.host = "-x".into();
        assert!(matches!(
            svc.register_node(bad).await,
            Err(ZoneError::Invalid(_))
        ));
        let mut bad = registration(3, 1);
        bad.disks.push(bad.disks[0].clone());
        assert!(matches!(
            svc.register_node(bad).await,
            Err(ZoneError::Invalid(_))
        ));
        assert_eq!(
            svc.nodes().await.expect("nodes").len(),
            1,
            "nothing was written"
        );
    }

    #[tokio::test]
    async fn heartbeats_keep_a_node_up_and_record_usage() {
        let store = SledStore::temporary().expect("opens");
        let svc = ZoneService::new(Arc::new(store)).with_node_ttl(Duration::from_secs(1));
        svc.ensure_zone("test").await.expect("zone");
        let registered = svc
            .register_node(registration(1, 1))
            .await
            .expect("registers");
        assert_eq!(registered.heartbeat_ms, 333);

        // 1.5 s of heartbeats: longer than the lease's time to live.
        for used in 1..=6u64 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let mut hb = heartbeat(registered.lease);
            hb.disks.push(RegisterDisk {
                uuid: disk_id(1, 0),
                path: "/dev/disk0".into(),
                capacity: TB,
                used,
            });
            hb.disks.push(RegisterDisk {
                uuid: disk_id(9, 9),
                path: "/dev/other".into(),
                capacity: TB,
                used,
            });
            svc.heartbeat(node_id(1), hb).await.expect("heartbeat");
        }
        assert_eq!(svc.nodes().await.expect("nodes")[0].state, NodeState::Up);
        assert_eq!(svc.disks().await.expect("disks")[0].used, 6);
        assert_eq!(
            svc.disks().await.expect("disks").len(),
            1,
            "an unregistered disk is ignored"
        );

        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while svc.nodes().await.expect("nodes")[0].state == NodeState::Up {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node never went down"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let error = svc
            .heartbeat(node_id(1), heartbeat(registered.lease))
            .await
            .expect_err("the lease expired");
        assert!(matches!(error, ZoneError::NotFound(_)), "{error:?}");
        assert!(matches!(
            svc.heartbeat(node_id(7), heartbeat(registered.lease)).await,
            Err(ZoneError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn heartbeats_name_the_orphans() {
        let svc = service().await;
        let registered = cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        let vdisk = svc
            .create_vdisk(vdisk_req("ds", "vd", 1 << 30))
            .await
            .expect("vdisk");
        let stranger = Uuid::new_v4();
        let mut hb = heartbeat(registered[0].lease);
        hb.vdisks = vec![vdisk.uuid, stranger];
        let reply = svc
            .heartbeat(node_id(1), hb.clone())
            .await
            .expect("heartbeat");
        assert_eq!(reply.orphans, vec![stranger]);
        svc.delete_vdisk("ds", "vd", false).await.expect("delete");
        let reply = svc.heartbeat(node_id(1), hb).await.expect("heartbeat");
        assert_eq!(reply.orphans, vec![vdisk.uuid, stranger]);
    }

    #[tokio::test]
    async fn create_datastore_validates_and_defaults_to_every_disk() {
        let svc = service().await;
        cluster(&svc, 3, 2).await;
        for name in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65)] {
            let error = svc
                .create_datastore(mirrors(name, 1, None))
                .await
                .expect_err("a bad name");
            assert!(matches!(error, ZoneError::Invalid(_)), "{name}: {error:?}");
        }
        for (m, s) in [(0, None), (17, None), (1, Some(0)), (1, Some(65))] {
            assert!(matches!(
                svc.create_datastore(mirrors("ds", m, s)).await,
                Err(ZoneError::Invalid(_))
            ));
        }
        let error = svc
            .create_datastore(mirrors("ds", 4, None))
            .await
            .expect_err("3 nodes");
        assert!(matches!(error, ZoneError::Unsatisfiable(_)));
        assert_eq!(
            error.to_string(),
            "datastore 'ds' needs 4 nodes for mirrors=4; the zone has 3 nodes with disks up"
        );

        let ds = svc
            .create_datastore(mirrors("ds", 3, Some(4)))
            .await
            .expect("created");
        assert_eq!(
            ds.policy,
            Policy {
                redundancy: Redundancy::Mirror { copies: 3 },
                stripes: 4
            }
        );
        let mut all: Vec<Uuid> = (1..=3)
            .flat_map(|n| (0..2).map(move |i| disk_id(n, i)))
            .collect();
        all.sort();
        assert_eq!(ds.disks, all);
        assert_eq!(svc.datastore("ds").await.expect("found"), ds);
        assert!(matches!(
            svc.create_datastore(mirrors("ds", 1, None)).await,
            Err(ZoneError::AlreadyExists(_))
        ));

        let mut picked = mirrors("small", 1, None);
        picked.disks = Some(vec![disk_id(2, 1)]);
        assert_eq!(
            svc.create_datastore(picked).await.expect("created").disks,
            vec![disk_id(2, 1)]
        );
        let mut unknown = mirrors("other", 1, None);
        unknown.disks = Some(vec![Uuid::new_v4()]);
        assert!(matches!(
            svc.create_datastore(unknown).await,
            Err(ZoneError::NotFound(_))
        ));
        let mut empty = mirrors("other", 1, None);
        empty.disks = Some(vec![]);
        assert!(matches!(
            svc.create_datastore(empty).await,
            Err(ZoneError::Invalid(_))
        ));

        let names: Vec<String> = svc
            .datastores()
            .await
            .expect("list")
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["ds", "small"]);
        assert!(matches!(
            svc.datastore("nope").await,
            Err(ZoneError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn datastores_count_only_up_nodes_and_refuse_erasure_coding() {
        let svc = service().await;
        cluster(&svc, 3, 1).await;
        kill(&svc, 3).await;
        let error = svc
            .create_datastore(mirrors("ds", 3, None))
            .await
            .expect_err("a node is down");
        assert_eq!(
            error.to_string(),
            "datastore 'ds' needs 3 nodes for mirrors=3; the zone has 2 nodes with disks up"
        );

        let ec = Policy {
            redundancy: Redundancy::ErasureCode { data: 2, parity: 1 },
            stripes: 1,
        };
        let error = svc
            .create_datastore_with("ec", ec, None)
            .await
            .expect_err("erasure coding");
        assert!(matches!(error, ZoneError::Invalid(_)));
        assert_eq!(error.to_string(), "erasure coding is not supported yet");
    }

    #[tokio::test]
    async fn delete_datastore_is_refused_while_it_holds_vdisks() {
        let svc = service().await;
        cluster(&svc, 2, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", 4096))
            .await
            .expect("vdisk");
        let error = svc.delete_datastore("ds").await.expect_err("not empty");
        assert!(matches!(error, ZoneError::Conflict(_)));
        assert_eq!(error.to_string(), "datastore 'ds' still holds 1 vDisks");
        assert!(
            !svc.datastore("ds").await.expect("still there").deleting,
            "the mark was cleared"
        );
        svc.create_vdisk(vdisk_req("ds", "vd2", 4096))
            .await
            .expect("creation works again");

        svc.delete_vdisk("ds", "vd", false).await.expect("delete");
        svc.delete_vdisk("ds", "vd2", false).await.expect("delete");
        svc.delete_datastore("ds").await.expect("empty now");
        assert!(matches!(
            svc.datastore("ds").await,
            Err(ZoneError::NotFound(_))
        ));
        assert!(matches!(
            svc.delete_datastore("ds").await,
            Err(ZoneError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn vdisks_cannot_be_created_in_a_datastore_being_deleted() {
        let svc = service().await;
        cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        svc.update(
            &keys::datastore("ds"),
            || "ds".into(),
            |ds: &mut Datastore| {
                ds.deleting = true;
                Ok(())
            },
        )
        .await
        .expect("marked");
        let error = svc
            .create_vdisk(vdisk_req("ds", "vd", 4096))
            .await
            .expect_err("being deleted");
        assert_eq!(error.to_string(), "datastore 'ds' is being deleted");
        assert!(svc.vdisks(None).await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn create_vdisk_validates_and_places() {
        let svc = service().await;
        cluster(&svc, 4, 2).await;
        let ds = svc
            .create_datastore(mirrors("ds", 3, Some(2)))
            .await
            .expect("datastore");
        for size in [0, 513, 1000] {
            assert!(matches!(
                svc.create_vdisk(vdisk_req("ds", "vd", size)).await,
                Err(ZoneError::Invalid(_))
            ));
        }
        assert!(matches!(
            svc.create_vdisk(vdisk_req("ds", ".vd", 512)).await,
            Err(ZoneError::Invalid(_))
        ));
        assert!(matches!(
            svc.create_vdisk(vdisk_req("nope", "vd", 512)).await,
            Err(ZoneError::NotFound(_))
        ));

        let vdisk = svc
            .create_vdisk(vdisk_req("ds", "vd", 10 << 30))
            .await
            .expect("created");
        assert_eq!(vdisk.uuid.get_version_num(), 4);
        assert_eq!(
            (vdisk.size, vdisk.epoch, &vdisk.state, &vdisk.lease),
            (10 << 30, 0, &VdiskState::Offline, &None)
        );
        assert_eq!(vdisk.policy, ds.policy);
        assert_eq!(
            (vdisk.placement.chunk_size, vdisk.placement.version),
            (CHUNK_SIZE, 1)
        );
        assert_eq!(vdisk.placement.groups.len(), 2);
        let disks = svc.disks().await.expect("disks");
        for group in &vdisk.placement.groups {
            let nodes: HashSet<Uuid> = group
                .iter()
                .map(|d| {
                    disks
                        .iter()
                        .find(|x| x.uuid == *d)
                        .expect("a zone disk")
                        .node
                })
                .collect();
            assert_eq!(nodes.len(), 3);
        }
        assert!(matches!(
            svc.create_vdisk(vdisk_req("ds", "vd", 512)).await,
            Err(ZoneError::AlreadyExists(_))
        ));

        kill(&svc, 1).await;
        kill(&svc, 2).await;
        let error = svc
            .create_vdisk(vdisk_req("ds", "vd2", 512))
            .await
            .expect_err("2 nodes up");
        assert!(matches!(error, ZoneError::Unsatisfiable(_)));
        assert_eq!(
            error.to_string(),
            "vDisk ds/vd2 needs 3 nodes with disks up and not full in datastore 'ds'; it has 2"
        );
    }

    #[tokio::test]
    async fn health_follows_node_liveness() {
        let svc = service().await;
        cluster(&svc, 3, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        svc.create_datastore(mirrors("other", 1, None))
            .await
            .expect("datastore");
        let vdisk = svc
            .create_vdisk(vdisk_req("ds", "vd", 4096))
            .await
            .expect("vdisk");
        svc.create_vdisk(vdisk_req("other", "vd", 4096))
            .await
            .expect("vdisk");
        let view = svc.vdisk("ds", "vd").await.expect("found");
        assert_eq!(
            (view.vdisk.clone(), view.health),
            (vdisk.clone(), Health::Healthy)
        );
        let json = serde_json::to_value(&view).expect("encodes");
        assert_eq!(
            (json["health"].as_str(), json["name"].as_str()),
            (Some("healthy"), Some("vd"))
        );

        let holder = svc
            .disks()
            .await
            .expect("disks")
            .into_iter()
            .find(|d| d.uuid == vdisk.placement.groups[0][0])
            .expect("disk");
        kill(&svc, holder.node.as_u128()).await;
        assert_eq!(
            svc.vdisk("ds", "vd").await.expect("found").health,
            Health::Degraded
        );

        assert_eq!(svc.vdisks(None).await.expect("all").len(), 2);
        let in_ds = svc.vdisks(Some("ds")).await.expect("in ds");
        assert_eq!((in_ds.len(), in_ds[0].vdisk.uuid), (1, vdisk.uuid));
        assert!(matches!(
            svc.vdisks(Some("nope")).await,
            Err(ZoneError::NotFound(_))
        ));
        assert!(matches!(
            svc.vdisk("ds", "nope").await,
            Err(ZoneError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn resize_only_grows() {
        let svc = service().await;
        cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", 1 << 20))
            .await
            .expect("vdisk");
        assert_eq!(
            svc.resize_vdisk("ds", "vd", 2 << 20)
                .await
                .expect("grows")
                .size,
            2 << 20
        );
        assert_eq!(
            svc.resize_vdisk("ds", "vd", 2 << 20)
                .await
                .expect("same size")
                .size,
            2 << 20
        );
        let error = svc
            .resize_vdisk("ds", "vd", 1 << 20)
            .await
            .expect_err("shrinks");
        assert_eq!(error.to_string(), "shrinking a vDisk is not supported");
        assert!(matches!(
            svc.resize_vdisk("ds", "vd", (4 << 20) + 1).await,
            Err(ZoneError::Invalid(_))
        ));
        assert!(matches!(
            svc.resize_vdisk("ds", "nope", 4 << 20).await,
            Err(ZoneError::NotFound(_))
        ));
        assert_eq!(
            svc.vdisk("ds", "vd").await.expect("found").vdisk.size,
            2 << 20
        );
    }

    #[tokio::test]
    async fn open_renew_close_follow_the_lease() {
        let svc = service().await;
        cluster(&svc, 2, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", 1 << 20))
            .await
            .expect("vdisk");

        let a = svc
            .open_vdisk("ds", "vd", open_req("hv-a", 60_000, false))
            .await
            .expect("opens");
        assert_eq!((a.epoch, a.vdisk.epoch), (1, 1));
        let hosts = svc.hosts().await.expect("hosts");
        let writer = hosts
            .iter()
            .find(|h| h.name == "hv-a")
            .expect("writer's host");
        assert_eq!(
            writer.roles,
            vec![Role::FrontEnd],
            "the writing host is a front-end"
        );
        assert_eq!(
            a.vdisk.state,
            VdiskState::Online {
                host: "hv-a".into()
            }
        );
        assert_eq!(
            a.vdisk
                .lease
                .as_ref()
                .map(|l| (l.holder.as_str(), l.session)),
            Some(("hv-a", a.session))
        );
        assert_eq!((a.nodes.len(), a.disks.len()), (2, 2));
        assert!(a.nodes.iter().all(|n| n.state == NodeState::Up));

        let error = svc
            .open_vdisk("ds", "vd", open_req("hv-b", 60_000, false))
            .await
            .expect_err("held");
        assert!(matches!(error, ZoneError::Conflict(_)));
        assert_eq!(error.to_string(), "vDisk ds/vd is open on host hv-a");

        let b = svc
            .open_vdisk("ds", "vd", open_req("hv-b", 60_000, true))
            .await
            .expect("takes over");
        assert_eq!(b.epoch, 2);
        let error = svc
            .renew_vdisk("ds", "vd", session(a.session))
            .await
            .expect_err("taken over");
        assert!(matches!(error, ZoneError::LeaseLost(_)), "{error:?}");
        assert_eq!(
            (error.code(), error.to_string().as_str()),
            (
                "lease_lost",
                "lease lost: vDisk ds/vd was taken over by host hv-b"
            )
        );
        let lease = svc
            .renew_vdisk(
                "ds",
                "vd",
                SessionRef {
                    session: b.session,
                    ttl_ms: Some(5_000),
                    keep_activity: false,
                    settled: None,
                },
            )
            .await
            .expect("renews");
        assert_eq!(
            (lease.lease.session, lease.lease.ttl_ms),
            (b.session, 5_000)
        );
        assert!(lease.lease.expires_ms >= svc.env().now_ms() + 4_000);

        svc.close_vdisk("ds", "vd", session(a.session))
            .await
            .expect("closing a lost session is fine");
        assert_eq!(
            svc.vdisk("ds", "vd").await.expect("found").vdisk.state,
            VdiskState::Online {
                host: "hv-b".into()
            }
        );
        svc.close_vdisk("ds", "vd", session(b.session))
            .await
            .expect("closes");
        let closed = svc.vdisk("ds", "vd").await.expect("found").vdisk;
        assert_eq!(
            (closed.state, closed.lease, closed.epoch),
            (VdiskState::Offline, None, 2)
        );
        svc.close_vdisk("ds", "vd", session(b.session))
            .await
            .expect("closing twice is fine");
        let error = svc
            .renew_vdisk("ds", "vd", session(b.session))
            .await
            .expect_err("closed");
        assert!(matches!(error, ZoneError::LeaseLost(_)), "{error:?}");
        assert_eq!(error.to_string(), "lease lost: vDisk ds/vd is not open");

        assert!(matches!(
            svc.open_vdisk("ds", "vd", open_req("hv-a", 0, false)).await,
            Err(ZoneError::Invalid(_))
        ));
        assert!(matches!(
            svc.open_vdisk("ds", "nope", open_req("hv-a", 10, false))
                .await,
            Err(ZoneError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn an_expired_lease_may_be_renewed_or_taken() {
        let svc = service().await;
        cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", 1 << 20))
            .await
            .expect("vdisk");

        let a = svc
            .open_vdisk("ds", "vd", open_req("hv-a", 30, false))
            .await
            .expect("opens");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let renewed = svc
            .renew_vdisk("ds", "vd", session(a.session))
            .await
            .expect("nobody took it");
        assert_eq!(renewed.lease.ttl_ms, 30);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let b = svc
            .open_vdisk("ds", "vd", open_req("hv-b", 60_000, false))
            .await
            .expect("expired: no force needed");
        assert_eq!(b.epoch, 2);
        assert!(matches!(
            svc.renew_vdisk("ds", "vd", session(a.session)).await,
            Err(ZoneError::LeaseLost(_))
        ));
    }

    #[tokio::test]
    async fn concurrent_opens_elect_one_writer() {
        let svc = service().await;
        cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", 1 << 20))
            .await
            .expect("vdisk");
        let (a, b, c) = tokio::join!(
            svc.open_vdisk("ds", "vd", open_req("hv-a", 60_000, false)),
            svc.open_vdisk("ds", "vd", open_req("hv-b", 60_000, false)),
            svc.open_vdisk("ds", "vd", open_req("hv-c", 60_000, false)),
        );
        let winners: Vec<Opened> = [a, b, c].into_iter().filter_map(Result::ok).collect();
        assert_eq!(winners.len(), 1);
        assert_eq!(winners[0].epoch, 1);
    }

    #[tokio::test]
    async fn lease_bound_updates_of_another_session_are_lease_lost() {
        let svc = service().await;
        cluster(&svc, 2, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        let vdisk = svc
            .create_vdisk(vdisk_req("ds", "vd", 1 << 20))
            .await
            .expect("vdisk");
        let disk = vdisk.placement.groups[0][0];
        let a = svc
            .open_vdisk("ds", "vd", open_req("hv-a", 60_000, false))
            .await
            .expect("opens");
        let b = svc
            .open_vdisk("ds", "vd", open_req("hv-b", 60_000, true))
            .await
            .expect("takes over");

        let stale = |session| MarkStale {
            session,
            disks: vec![disk],
            chunks: vec![1],
        };
        let clean = |session| MarkClean {
            session,
            disk,
            chunks: vec![1],
            complete: false,
        };
        let active = |session| MarkActive {
            session,
            add: vec![0],
            remove: vec![],
        };
        let lost = [
            svc.mark_stale("ds", "vd", stale(a.session)).await.err(),
            svc.mark_clean("ds", "vd", clean(a.session)).await.err(),
            svc.mark_active("ds", "vd", active(a.session)).await.err(),
        ];
        for error in lost {
            let error = error.expect("refused");
            assert!(matches!(error, ZoneError::LeaseLost(_)), "{error:?}");
            assert_eq!(
                (
                    error.code(),
                    error.http_status(),
                    error.to_string().as_str()
                ),
                (
                    "lease_lost",
                    409,
                    "lease lost: vDisk ds/vd is not open by this session"
                )
            );
        }
        let v = svc.vdisk("ds", "vd").await.expect("found").vdisk;
        assert!(v.stale.is_empty() && v.activity.is_empty(), "{v:?}");

        svc.mark_stale("ds", "vd", stale(b.session))
            .await
            .expect("the holder records");
        svc.close_vdisk("ds", "vd", session(b.session))
            .await
            .expect("closes");
        assert!(matches!(
            svc.mark_clean("ds", "vd", clean(b.session)).await,
            Err(ZoneError::LeaseLost(_))
        ));
        assert!(matches!(
            svc.renew_vdisk("ds", "vd", session(b.session)).await,
            Err(ZoneError::LeaseLost(_))
        ));
    }

    #[tokio::test]
    async fn a_completion_while_chunks_are_dirty_is_still_dirty_and_records_nothing() {
        let svc = service().await;
        cluster(&svc, 2, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        let vdisk = svc
            .create_vdisk(vdisk_req("ds", "vd", 1 << 30))
            .await
            .expect("vdisk");
        let disk = vdisk.placement.groups[0][0];
        let a = svc
            .open_vdisk("ds", "vd", open_req("hv-a", 60_000, false))
            .await
            .expect("opens");
        svc.mark_stale(
            "ds",
            "vd",
            MarkStale {
                session: a.session,
                disks: vec![disk],
                chunks: vec![1, 2, 3],
            },
        )
        .await
        .expect("stale");
        let error = svc
            .mark_clean(
                "ds",
                "vd",
                MarkClean {
                    session: a.session,
                    disk,
                    chunks: vec![1],
                    complete: true,
                },
            )
            .await
            .expect_err("chunks 2 and 3 are dirty");
        assert!(
            matches!(&error, ZoneError::StillDirty { disk: d, vdisk, missing: 2 } if *d == disk && vdisk == "ds/vd"),
            "{error:?}"
        );
        assert_eq!((error.code(), error.http_status()), ("still_dirty", 409));
        let v = svc.vdisk("ds", "vd").await.expect("found");
        assert_eq!(v.vdisk.stale, vec![disk]);
        assert_eq!(v.repair[0].dirty_chunks, 3, "chunk 1 was not recorded");
    }

    /// A service whose vDisk and datastore records lose every
    /// compare-and-swap once `lose` is called.
    async fn contended() -> (ZoneService, Arc<Contended<SledStore>>) {
        let store = SledStore::temporary().expect("opens");
        let store = Arc::new(Contended::new(store, "/tessera/"));
        let svc = ZoneService::new(store.clone());
        svc.ensure_zone("test").await.expect("zone");
        cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", 1 << 20))
            .await
            .expect("vdisk");
        (svc, store)
    }

    #[tokio::test]
    async fn updates_that_always_lose_their_compare_and_swap_are_contention() {
        let (svc, store) = contended().await;
        let a = svc
            .open_vdisk("ds", "vd", open_req("hv-a", 60_000, false))
            .await
            .expect("opens");
        let before = svc.vdisk("ds", "vd").await.expect("found").vdisk;
        store.lose(u64::MAX);

        let tried = store.attempts();
        let renew = SessionRef {
            session: a.session,
            ttl_ms: Some(30_000),
            keep_activity: false,
            settled: None,
        };
        let error = svc
            .renew_vdisk("ds", "vd", renew.clone())
            .await
            .expect_err("contended");
        assert!(matches!(error, ZoneError::Contention(_)), "{error:?}");
        assert_eq!(
            (
                error.code(),
                error.http_status(),
                error.to_string().as_str()
            ),
            (
                "contention",
                503,
                "vDisk ds/vd is being changed by others too often; try again"
            )
        );
        assert_eq!(store.attempts() - tried, MAX_CAS_ATTEMPTS as u64);
        let error = svc
            .delete_vdisk("ds", "vd", true)
            .await
            .expect_err("contended");
        assert_eq!(error.code(), "contention", "{error:?}");
        let error = svc
            .open_vdisk("ds", "vd", open_req("hv-b", 60_000, true))
            .await
            .expect_err("contended");
        assert_eq!(error.code(), "contention", "{error:?}");
        assert_eq!(
            svc.vdisk("ds", "vd").await.expect("found").vdisk,
            before,
            "nothing changed"
        );

        store.lose(0);
        svc.renew_vdisk("ds", "vd", renew)
            .await
            .expect("renews once others stop");
    }

    #[tokio::test]
    async fn a_datastore_deletion_that_keeps_losing_gives_up_unmarked() {
        let (svc, store) = contended().await;
        svc.delete_vdisk("ds", "vd", false).await.expect("delete");
        // Marked by an earlier deletion; every deletion attempt now loses
        // (the mark is already there: marking writes nothing).
        svc.update(
            &keys::datastore("ds"),
            || "ds".into(),
            |ds: &mut Datastore| {
                ds.deleting = true;
                Ok(())
            },
        )
        .await
        .expect("marked");
        store.lose(MAX_CAS_ATTEMPTS as u64);
        let error = svc.delete_datastore("ds").await.expect_err("contended");
        assert_eq!(
            (error.code(), error.to_string().as_str()),
            (
                "contention",
                "datastore 'ds' is being changed by others too often; try again"
            )
        );
        assert!(
            !svc.datastore("ds").await.expect("still there").deleting,
            "the mark was taken back"
        );
        svc.delete_datastore("ds").await.expect("deleted");
    }

    #[tokio::test]
    async fn delete_vdisk_is_refused_while_open_unless_forced() {
        let svc = service().await;
        cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", 1 << 20))
            .await
            .expect("vdisk");
        svc.open_vdisk("ds", "vd", open_req("hv-a", 60_000, false))
            .await
            .expect("opens");
        let error = svc.delete_vdisk("ds", "vd", false).await.expect_err("open");
        assert_eq!(error.to_string(), "vDisk ds/vd is open on host hv-a");
        svc.delete_vdisk("ds", "vd", true).await.expect("forced");
        assert!(matches!(
            svc.vdisk("ds", "vd").await,
            Err(ZoneError::NotFound(_))
        ));
        assert!(matches!(
            svc.delete_vdisk("ds", "vd", false).await,
            Err(ZoneError::NotFound(_))
        ));
    }

    #[test]
    fn names_follow_the_rules() {
        for good in ["a", "vm-1.disk_0", &"x".repeat(64), "A.b"] {
            assert!(validate_name("vDisk", good).is_ok(), "{good}");
        }
        for bad in ["", ".a", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(validate_name("vDisk", bad).is_err(), "{bad}");
        }
        let error = validate_name("vDisk", "a b").expect_err("a space");
        assert_eq!(
            error.to_string(),
            "vDisk name \"a b\" is invalid: use 1 to 64 characters among A-Z a-z 0-9 . _ -, not starting with '.'"
        );
        assert_eq!(quote(&"y".repeat(100)).chars().count(), 83);
    }
}
