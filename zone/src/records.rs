//! The zone's metadata records.
//!
//! Every record is stored as JSON under a key of the zone's key space (see
//! [`keys`]) and carries a `schema` field: the version of its layout. A reader
//! accepts every schema version up to [`SCHEMA_VERSION`] and migrates older
//! ones on read ([`Record::migrate`]); a record with a newer schema than the
//! reader knows is refused rather than misread.
//!
//! Schemas:
//!
//! - 1: the first.
//! - 2: a vDisk's dirty sets ([`DirtyChunks`]) are runs over each placement
//!   group's own chunks, with the vDisk's stripe count, instead of ranges of
//!   chunk numbers (which with stripes ≥ 2 never merged: one range per
//!   chunk). Schema 1 vDisks are migrated on read; other records did not
//!   change.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The newest schema version of every record this build writes.
pub const SCHEMA_VERSION: u32 = 2;

/// Size of a vDisk chunk by default: the unit of placement, allocation and
/// replication. A zone service may use another (see
/// [`ZoneService::with_chunk_size`](crate::service::ZoneService::with_chunk_size));
/// each vDisk records its own in [`Placement::chunk_size`].
pub const CHUNK_SIZE: u64 = 1 << 20;

/// Smallest chunk size a zone service accepts (the storage nodes' checksum block).
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;

/// Largest chunk size a zone service accepts.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// Smallest unit of vDisk I/O.
pub const SECTOR_SIZE: u64 = 512;

/// Keys of the zone's key space. All keys live under `/tessera/`.
pub mod keys {
    /// The zone record.
    pub const ZONE: &str = "/tessera/zone";
    /// Prefix of host records: `/tessera/hosts/{host}`.
    pub const HOSTS: &str = "/tessera/hosts/";
    /// Prefix of storage node records: `/tessera/nodes/{node uuid}`.
    pub const NODES: &str = "/tessera/nodes/";
    /// Prefix of node liveness keys, bound to a store lease: `/tessera/alive/{node uuid}`.
    pub const ALIVE: &str = "/tessera/alive/";
    /// Prefix of disk records: `/tessera/disks/{disk uuid}`.
    pub const DISKS: &str = "/tessera/disks/";
    /// Prefix of datastore records: `/tessera/datastores/{name}`.
    pub const DATASTORES: &str = "/tessera/datastores/";
    /// Prefix of vDisk records: `/tessera/vdisks/{datastore}/{name}`.
    pub const VDISKS: &str = "/tessera/vdisks/";

    /// Key of one host record.
    pub fn host(name: &str) -> String {
        format!("{HOSTS}{name}")
    }
    /// Key of one node record.
    pub fn node(id: &uuid::Uuid) -> String {
        format!("{NODES}{id}")
    }
    /// Key of one node's liveness record.
    pub fn alive(id: &uuid::Uuid) -> String {
        format!("{ALIVE}{id}")
    }
    /// Key of one disk record.
    pub fn disk(id: &uuid::Uuid) -> String {
        format!("{DISKS}{id}")
    }
    /// Key of one datastore record.
    pub fn datastore(name: &str) -> String {
        format!("{DATASTORES}{name}")
    }
    /// Key of one vDisk record.
    pub fn vdisk(datastore: &str, name: &str) -> String {
        format!("{VDISKS}{datastore}/{name}")
    }
}

/// The zone: hosts sharing one metadata store and one storage network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    pub schema: u32,
    pub uuid: Uuid,
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// What a host does in the zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Runs VMs (and their vDisk backends).
    FrontEnd,
    /// Holds disks (runs storage nodes).
    BackEnd,
    /// Attaches vDisks to back them up.
    Backup,
}

/// A machine of the zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub schema: u32,
    /// Host name, unique in the zone.
    pub name: String,
    pub roles: Vec<Role>,
}

/// A storage node daemon: serves the chunks of its disks over the storage network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub schema: u32,
    pub uuid: Uuid,
    /// The host it runs on.
    pub host: String,
    /// Storage protocol address, `ip:port`.
    pub addr: String,
    /// Unix socket for local sessions: clients on `host` share their memory
    /// with the node through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Disks it serves.
    pub disks: Vec<Uuid>,
    /// Seconds since the Unix epoch of its last registration.
    pub registered: u64,
    /// The highest storage protocol version it speaks, as it registered
    /// (0: it did not say). Volume clients keep their activity log on the
    /// nodes only when every node of the vDisk keeps marks (version 5).
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub protocol: u16,
}

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}

/// Whether a node is alive, as seen by the zone (derived from its liveness key,
/// never stored in the node record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    Up,
    Down,
}

/// A node record with its liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub node: Node,
    pub state: NodeState,
}

/// A disk owned by a storage node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub schema: u32,
    pub uuid: Uuid,
    pub node: Uuid,
    /// Path of the device or file on the node's host.
    pub path: String,
    /// Bytes available for chunk data.
    pub capacity: u64,
    /// Bytes taken by allocated chunks, as last reported by the node.
    pub used: u64,
}

/// Redundancy of a datastore's vDisks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Redundancy {
    /// `copies` synchronous copies of every chunk, on distinct nodes.
    Mirror { copies: u32 },
    /// `data` data fragments and `parity` parity fragments on distinct nodes.
    /// Recorded for forward compatibility; not served by this release.
    ErasureCode { data: u32, parity: u32 },
}

impl Redundancy {
    /// Fewest current copies a write must reach to be acknowledged: with
    /// fewer, I/O fails rather than pretend to a redundancy it does not have.
    /// `mirrors=1` and `mirrors=2` keep running on one copy; from three
    /// copies on, a majority is required.
    pub fn min_copies(&self) -> u32 {
        match *self {
            Redundancy::Mirror { copies } if copies <= 2 => 1,
            Redundancy::Mirror { copies } => copies / 2 + 1,
            Redundancy::ErasureCode { data, .. } => data,
        }
    }

    /// Number of disks (on distinct nodes) one chunk occupies.
    pub fn width(&self) -> u32 {
        match *self {
            Redundancy::Mirror { copies } => copies,
            Redundancy::ErasureCode { data, parity } => data + parity,
        }
    }
}

/// The redundancy policy of a datastore, inherited by its vDisks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub redundancy: Redundancy,
    /// Number of placement groups a vDisk's chunks are striped over
    /// (chunk `c` lives in group `c % stripes`).
    pub stripes: u32,
}

/// A pool of disks with one redundancy policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    pub schema: u32,
    pub uuid: Uuid,
    pub name: String,
    pub policy: Policy,
    /// Member disks. A disk may belong to several datastores.
    pub disks: Vec<Uuid>,
    pub created: u64,
    /// Set while a deletion checks that the datastore holds no vDisk; vDisks
    /// cannot be created meanwhile. Absent (false) in most records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// Whether a vDisk is open for writing, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum VdiskState {
    Offline,
    Online { host: String },
}

/// The write lease of a vDisk: who may write it, and with which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Host holding the lease.
    pub holder: String,
    /// Identifies one open of the vDisk (one backend process).
    pub session: Uuid,
    /// Milliseconds since the Unix epoch after which the lease may be taken over.
    pub expires_ms: u64,
    /// The time to live the holder asked for, reused by renewals that do not
    /// name one (0 in records written before it was recorded).
    #[serde(default)]
    pub ttl_ms: u64,
    /// Held by the zone's repair worker: any other open takes it over.
    #[serde(default)]
    pub repair: bool,
    /// The newest placement version the holder has settled on: none of its
    /// I/O uses an older one. A copy that a newer placement no longer holds
    /// is freed only once the holder settled on it (it may read that copy
    /// until then).
    #[serde(default)]
    pub settled: u64,
}

/// Which disks hold a vDisk's chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// One entry per placement group (stripe); each lists the disks holding
    /// every chunk of the group, on distinct nodes, `Redundancy::width` long.
    /// Chunk `c` belongs to group `c % groups.len()`.
    pub groups: Vec<Vec<Uuid>>,
    /// Bumped whenever a group's membership changes (rebuild, rebalance).
    pub version: u64,
    /// Copies being moved: each `to` disk is already the last member of its
    /// group (stale until resync fills it); when it is current, `from`
    /// leaves the group. At most one move per group.
    #[serde(default)]
    pub moves: Vec<Move>,
}

/// A copy of one placement group moving from one disk to another (rebuild
/// of a lost disk, drain of a removed one, or rebalance onto a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub group: u32,
    pub from: Uuid,
    pub to: Uuid,
    pub reason: MoveReason,
}

/// Why a copy moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveReason {
    /// The disk's node has been down longer than the rebuild delay.
    Rebuild,
    /// The operator removed the disk (or its node) from the datastore.
    Drain,
    /// A disk joined the datastore and takes its share.
    Rebalance,
    /// The disk is nearly full (at or above `placement::SHED_AT`): the
    /// copy goes to a disk with room.
    Shed,
}

impl Placement {
    /// The disks holding chunk `chunk`.
    pub fn disks_of(&self, chunk: u64) -> &[Uuid] {
        let g = (chunk % self.groups.len() as u64) as usize;
        &self.groups[g]
    }

    /// Whether any group lists `disk`.
    pub fn holds(&self, disk: Uuid) -> bool {
        self.groups.iter().flatten().any(|d| *d == disk)
    }

    /// Number of placement groups (the vDisk's stripes), at least 1.
    pub fn stripes(&self) -> u32 {
        u32::try_from(self.groups.len()).unwrap_or(u32::MAX).max(1)
    }

    /// Number of chunks of a vDisk of `size` bytes.
    pub fn chunks(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size.max(1))
    }

    /// The chunks of group `group` in a vDisk of `size` bytes.
    pub fn group_chunks(&self, group: u32, size: u64) -> impl Iterator<Item = u64> {
        let stripes = u64::from(self.stripes());
        (u64::from(group)..self.chunks(size)).step_by(stripes as usize)
    }

    /// How many chunks group `group` has in a vDisk of `size` bytes: its
    /// chunks are `0..group_len` in the group's own index space (see
    /// [`DirtyChunks`]).
    pub fn group_len(&self, group: u32, size: u64) -> u64 {
        let chunks = self.chunks(size);
        let group = u64::from(group);
        if chunks <= group {
            0
        } else {
            (chunks - group).div_ceil(u64::from(self.stripes()))
        }
    }
}

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vdisk {
    pub schema: u32,
    pub uuid: Uuid,
    pub name: String,
    pub datastore: String,
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    pub size: u64,
    pub policy: Policy,
    #[serde(flatten)]
    pub state: VdiskState,
    /// The current write lease, if any.
    pub lease: Option<Lease>,
    /// Highest epoch ever handed out; every open bumps it.
    pub epoch: u64,
    pub placement: Placement,
    pub created: u64,
    /// Disks whose copies of this vDisk missed writes: they serve no reads
    /// and take no writes until the repair engine resyncs them.
    #[serde(default)]
    pub stale: Vec<Uuid>,
    /// For each stale disk, the chunks it missed: what resync copies.
    #[serde(default)]
    pub dirty: Vec<DirtyChunks>,
    /// The writer's activity log: extents ([`ACTIVITY_EXTENT_CHUNKS`]
    /// chunks each) that may have writes in flight. After a writer crash the
    /// next open makes every copy of these extents agree.
    #[serde(default)]
    pub activity: Vec<u64>,
    /// Disks that held copies of this vDisk and no longer do (moved away):
    /// their nodes free that space; placement does not choose them for
    /// this vDisk again until their node reports it freed.
    #[serde(default)]
    pub released: Vec<Uuid>,
    /// Placement groups whose copy on a disk moved away while the disk
    /// keeps other groups of this vDisk: its node frees their chunks and
    /// says so; placement does not choose the disk for this vDisk again
    /// until then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released_groups: Vec<ReleasedGroup>,
}

/// A placement group whose copy on `disk` moved away (see
/// [`Vdisk::released_groups`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReleasedGroup {
    pub disk: Uuid,
    pub group: u32,
}

/// Chunks per activity-log extent (16 MiB with 1 MiB chunks).
pub const ACTIVITY_EXTENT_CHUNKS: u64 = 16;

/// Most runs one dirty set keeps: beyond it, [`DirtyChunks`] merges the runs
/// separated by the smallest gaps (within a group), which may list chunks the
/// copy does not lack. That errs on the safe side (resync copies them again)
/// and bounds a vDisk record whatever the write pattern: a dirty set is at
/// most about 1.5 MB of JSON (about 22 bytes a run). Only scattered writes
/// reach it (65 536 runs are at least 65 536 chunks no two of which are
/// neighbours in their group); what they cost then is copies of the clean
/// chunks between them.
pub const MAX_DIRTY_RUNS: usize = 1 << 16;

/// The chunks one copy may lack (its dirty set), as runs over each placement
/// group's own index space.
///
/// Chunk `c` is chunk `c / stripes` of group `c % stripes`, so the chunks of
/// group `g` (`g`, `g + stripes`, `g + 2·stripes`, …) are `0, 1, 2, …` in the
/// group's own index space, and a whole dirty group, or a range of the
/// vDisk's chunks, is one run per group whatever the stripe count. A run
/// `[group, first, end]` holds the group's chunks `first..end`. Runs are
/// sorted by group, then first; disjoint; and never adjacent (those merge).
/// With `stripes = 1` a run is a plain range of chunk numbers.
///
/// Stored in schema 2 records as `{"disk", "stripes", "runs"}`; schema 1
/// stored `{"disk", "ranges"}` of chunk numbers ([`Self::from_chunk_ranges`]
/// migrates them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawDirtyChunks")]
pub struct DirtyChunks {
    pub disk: Uuid,
    /// The vDisk's placement groups, at least 1.
    stripes: u32,
    runs: Vec<[u64; 3]>,
}

/// [`DirtyChunks`] as stored, before its invariants are checked.
#[derive(Deserialize)]
struct RawDirtyChunks {
    disk: Uuid,
    stripes: u32,
    runs: Vec<[u64; 3]>,
}

impl TryFrom<RawDirtyChunks> for DirtyChunks {
    type Error = String;

    /// Refuses runs of groups the stripes do not have; sorts and merges the
    /// rest (a record written by hand need not be normalised).
    fn try_from(raw: RawDirtyChunks) -> Result<Self, String> {
        if raw.stripes == 0 {
            return Err("a dirty set needs at least one stripe".into());
        }
        if let Some(r) = raw.runs.iter().find(|r| r[0] >= u64::from(raw.stripes)) {
            return Err(format!(
                "a dirty set of {} stripes has a run in group {}",
                raw.stripes, r[0]
            ));
        }
        let mut set = DirtyChunks {
            disk: raw.disk,
            stripes: raw.stripes,
            runs: raw.runs,
        };
        set.normalise();
        Ok(set)
    }
}

impl DirtyChunks {
    /// An empty dirty set of `disk` in a vDisk of `stripes` placement groups
    /// (0 counts as 1).
    pub fn new(disk: Uuid, stripes: u32) -> Self {
        DirtyChunks {
            disk,
            stripes: stripes.max(1),
            runs: Vec::new(),
        }
    }

    /// The dirty set of a schema 1 record: sorted half-open ranges of chunk
    /// numbers. A range becomes at most one run per group.
    pub fn from_chunk_ranges(disk: Uuid, stripes: u32, ranges: &[[u64; 2]]) -> Self {
        let mut set = DirtyChunks::new(disk, stripes);
        let s = u64::from(set.stripes);
        // The first index in group g of a chunk number at or after x.
        let index = |x: u64, g: u64| if x <= g { 0 } else { (x - g).div_ceil(s) };
        for r in ranges.iter().filter(|r| r[0] < r[1]) {
            for g in 0..s {
                let (first, end) = (index(r[0], g), index(r[1], g));
                if first < end {
                    set.runs.push([g, first, end]);
                }
            }
        }
        set.normalise();
        set
    }

    /// The stripe count the runs are over.
    pub fn stripes(&self) -> u32 {
        self.stripes
    }

    /// The runs `[group, first, end]`: sorted, disjoint, not adjacent.
    pub fn runs(&self) -> &[[u64; 3]] {
        &self.runs
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Number of chunks.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|r| r[2] - r[1]).sum()
    }

    /// Group and index in the group of chunk `chunk`.
    fn locate(&self, chunk: u64) -> (u64, u64) {
        let s = u64::from(self.stripes);
        (chunk % s, chunk / s)
    }

    pub fn contains(&self, chunk: u64) -> bool {
        let (g, i) = self.locate(chunk);
        let after = self.runs.partition_point(|r| (r[0], r[1]) <= (g, i));
        after > 0 && {
            let r = self.runs[after - 1];
            r[0] == g && i < r[2]
        }
    }

    /// Every chunk: group by group, each group's in ascending order.
    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        let s = u64::from(self.stripes);
        self.runs
            .iter()
            .flat_map(move |r| (r[1]..r[2]).map(move |i| i * s + r[0]))
    }

    /// Adds chunks.
    pub fn add(&mut self, chunks: impl IntoIterator<Item = u64>) {
        let s = u64::from(self.stripes);
        self.runs.extend(
            chunks
                .into_iter()
                .map(|c| [c % s, c / s, (c / s).saturating_add(1)]),
        );
        self.normalise();
    }

    /// Adds chunks `indices` of group `group` (in the group's own index
    /// space: `0..Placement::group_len` is the whole group). A group the
    /// stripes do not have adds nothing.
    pub fn add_group_range(&mut self, group: u32, indices: std::ops::Range<u64>) {
        if group < self.stripes && indices.start < indices.end {
            self.runs
                .push([u64::from(group), indices.start, indices.end]);
            self.normalise();
        }
    }

    /// Removes every chunk of group `group`.
    pub fn remove_group(&mut self, group: u32) {
        self.runs.retain(|r| r[0] != u64::from(group));
    }

    /// Removes chunks.
    pub fn remove(&mut self, chunks: impl IntoIterator<Item = u64>) {
        let mut gone: Vec<(u64, u64)> = chunks.into_iter().map(|c| self.locate(c)).collect();
        if gone.is_empty() {
            return;
        }
        gone.sort_unstable();
        gone.dedup();
        let mut out = Vec::with_capacity(self.runs.len());
        for r in &self.runs {
            let (g, mut start) = (r[0], r[1]);
            let lo = gone.partition_point(|&c| c < (g, r[1]));
            let hi = gone.partition_point(|&c| c < (g, r[2]));
            for &(_, i) in &gone[lo..hi] {
                if start < i {
                    out.push([g, start, i]);
                }
                start = i + 1;
            }
            if start < r[2] {
                out.push([g, start, r[2]]);
            }
        }
        self.runs = out;
    }

    /// Sorts and merges the runs, then coarsens them to at most
    /// [`MAX_DIRTY_RUNS`].
    fn normalise(&mut self) {
        let mut runs = std::mem::take(&mut self.runs);
        runs.retain(|r| r[1] < r[2]);
        runs.sort_unstable();
        let mut out: Vec<[u64; 3]> = Vec::with_capacity(runs.len());
        for r in runs {
            match out.last_mut() {
                Some(last) if last[0] == r[0] && r[1] <= last[2] => last[2] = last[2].max(r[2]),
                _ => out.push(r),
            }
        }
        self.runs = out;
        self.coarsen(MAX_DIRTY_RUNS);
    }

    /// Merges the runs separated by the smallest gaps (runs of one group
    /// only) until at most `max` are left, or each group has one.
    fn coarsen(&mut self, max: usize) {
        if self.runs.len() <= max {
            return;
        }
        // (gap, index of the run before it), for runs of one group.
        let mut gaps: Vec<(u64, usize)> = self
            .runs
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0][0] == w[1][0])
            .map(|(i, w)| (w[1][1] - w[0][2], i))
            .collect();
        let excess = (self.runs.len() - max).min(gaps.len());
        if excess == 0 {
            return;
        }
        gaps.select_nth_unstable(excess - 1);
        let mut bridge = vec![false; self.runs.len()];
        for &(_, i) in &gaps[..excess] {
            bridge[i] = true;
        }
        let mut out: Vec<[u64; 3]> = Vec::with_capacity(max);
        let mut joining = false;
        for (i, r) in self.runs.iter().enumerate() {
            match out.last_mut() {
                Some(last) if joining => last[2] = r[2],
                _ => out.push(*r),
            }
            joining = bridge[i];
        }
        self.runs = out;
    }
}

/// Why a stored record cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The bytes are not the JSON of the expected record.
    #[error("the record at {key} is malformed")]
    Malformed {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The record was written by a newer release.
    #[error("the record at {key} has schema {found}, newer than schema {SCHEMA_VERSION} which this build knows")]
    TooNew { key: String, found: u32 },
    /// The record cannot be serialised.
    #[error("the record for {key} cannot be encoded")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A record of the zone's key space: what [`decode`] needs to read every
/// schema of it.
pub trait Record: Serialize + DeserializeOwned {
    /// Rewrites the JSON of a record of schema `from` (older than
    /// [`SCHEMA_VERSION`]) into the current layout. [`decode`] then sets its
    /// `schema` to the current one. Records whose layout never changed keep
    /// the default, which changes nothing.
    fn migrate(from: u32, json: &mut serde_json::Value) -> Result<(), serde_json::Error> {
        let _ = (from, json);
        Ok(())
    }
}

impl Record for Zone {}
impl Record for Host {}
impl Record for Node {}
impl Record for Disk {}
impl Record for Datastore {}

impl Record for Vdisk {
    /// Schema 1 → 2: dirty sets of chunk-number ranges become runs over the
    /// groups of the vDisk's placement.
    fn migrate(from: u32, json: &mut serde_json::Value) -> Result<(), serde_json::Error> {
        use serde::de::Error as _;
        if from >= 2 {
            return Ok(());
        }
        #[derive(Deserialize)]
        struct DirtyV1 {
            disk: Uuid,
            ranges: Vec<[u64; 2]>,
        }
        let stripes = json
            .pointer("/placement/groups")
            .and_then(serde_json::Value::as_array)
            .map(|groups| u32::try_from(groups.len()).unwrap_or(u32::MAX))
            .ok_or_else(|| serde_json::Error::custom("a vDisk record has no placement groups"))?;
        let Some(dirty) = json.get_mut("dirty") else {
            return Ok(());
        };
        let old: Vec<DirtyV1> = serde_json::from_value(dirty.take())?;
        let new: Vec<DirtyChunks> = old
            .iter()
            .map(|d| DirtyChunks::from_chunk_ranges(d.disk, stripes, &d.ranges))
            .collect();
        *dirty = serde_json::to_value(new)?;
        Ok(())
    }
}

/// Decodes the record stored at `key`, refusing schemas newer than
/// [`SCHEMA_VERSION`] and migrating older ones ([`Record::migrate`]): the
/// record returned has the current schema.
pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T, RecordError> {
    #[derive(Deserialize)]
    struct Probe {
        schema: u32,
    }
    let malformed = |source| RecordError::Malformed {
        key: key.to_owned(),
        source,
    };
    let probe: Probe = serde_json::from_slice(bytes).map_err(malformed)?;
    if probe.schema > SCHEMA_VERSION {
        return Err(RecordError::TooNew {
            key: key.to_owned(),
            found: probe.schema,
        });
    }
    if probe.schema == SCHEMA_VERSION {
        return serde_json::from_slice(bytes).map_err(malformed);
    }
    let mut json: serde_json::Value = serde_json::from_slice(bytes).map_err(malformed)?;
    T::migrate(probe.schema, &mut json).map_err(malformed)?;
    if let Some(schema) = json.get_mut("schema") {
        *schema = SCHEMA_VERSION.into();
    }
    serde_json::from_value(json).map_err(malformed)
}

/// Encodes a record for storage at `key`.
pub fn encode<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(record).map_err(|source| RecordError::Encode {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_vdisk() -> Vdisk {
        Vdisk {
            schema: SCHEMA_VERSION,
            uuid: Uuid::from_u128(1),
            name: "vm1".into(),
            datastore: "ds".into(),
            size: 1 << 30,
            policy: Policy {
                redundancy: Redundancy::Mirror { copies: 2 },
                stripes: 1,
            },
            state: VdiskState::Online { host: "hv1".into() },
            lease: Some(Lease {
                holder: "hv1".into(),
                session: Uuid::from_u128(2),
                expires_ms: 10,
                ttl_ms: 5,
                repair: false,
                settled: 1,
            }),
            epoch: 3,
            placement: Placement {
                chunk_size: CHUNK_SIZE,
                groups: vec![vec![Uuid::from_u128(3)]],
                version: 1,
                moves: vec![],
            },
            created: 0,
            stale: vec![],
            dirty: vec![],
            activity: vec![],
            released: vec![],
            released_groups: vec![],
        }
    }

    fn set(stripes: u32, chunks: impl IntoIterator<Item = u64>) -> DirtyChunks {
        let mut d = DirtyChunks::new(Uuid::from_u128(7), stripes);
        d.add(chunks);
        d
    }

    #[test]
    fn dirty_chunk_ranges() {
        let mut d = set(1, [5, 3, 4, 10, 11, 4]);
        assert_eq!(d.runs(), [[0, 3, 6], [0, 10, 12]]);
        assert_eq!(d.count(), 5);
        assert!(d.contains(5) && !d.contains(6) && !d.contains(2));
        d.remove([4, 10, 99]);
        assert_eq!(d.runs(), [[0, 3, 4], [0, 5, 6], [0, 11, 12]]);
        assert_eq!(d.chunks().collect::<Vec<_>>(), vec![3, 5, 11]);
        d.remove([3, 5, 11]);
        assert!(d.is_empty());
    }

    #[test]
    fn striped_dirty_sets_are_runs_over_each_group() {
        // Chunks 0..100 of 4 stripes: one run per group.
        let mut d = set(4, 0..100);
        assert_eq!(d.runs(), [[0, 0, 25], [1, 0, 25], [2, 0, 25], [3, 0, 25]]);
        assert_eq!(d.count(), 100);
        assert!((0..100).all(|c| d.contains(c)) && !d.contains(100));

        // A group's own chunks g, g+4, … merge into one run.
        let mut g = set(4, (1..400).step_by(4));
        assert_eq!(g.runs(), [[1, 0, 100]]);
        assert!(g.contains(397) && !g.contains(398) && !g.contains(401));
        g.remove([1, 201, 397]);
        assert_eq!(g.runs(), [[1, 1, 50], [1, 51, 99]]);
        assert_eq!(g.count(), 97);
        let chunks: Vec<u64> = g.chunks().collect();
        assert_eq!(chunks.len(), 97);
        assert!(chunks.iter().all(|c| c % 4 == 1 && g.contains(*c)));

        // A whole group added by range, then removed.
        d.remove(0..100);
        assert!(d.is_empty());
        d.add_group_range(2, 0..1 << 40);
        d.add_group_range(9, 0..5);
        assert_eq!(d.runs(), [[2, 0, 1 << 40]]);
        assert_eq!(d.count(), 1 << 40);
        assert!(d.contains(2 + 4 * ((1 << 40) - 1)) && !d.contains(3));
        d.remove_group(2);
        assert!(d.is_empty());
    }

    #[test]
    fn huge_scattered_dirty_sets_are_coarsened_never_shrunk() {
        // Every other chunk of one group: more runs than the limit.
        let n = 2 * MAX_DIRTY_RUNS as u64 + 10;
        let scattered: Vec<u64> = (0..n).map(|i| 3 * (2 * i)).collect();
        let d = set(3, scattered.iter().copied());
        assert_eq!(d.runs().len(), MAX_DIRTY_RUNS);
        assert!(scattered.iter().all(|c| d.contains(*c)), "no chunk lost");
        assert!(d.count() >= n);
        assert!(d.runs().windows(2).all(|w| w[0][2] < w[1][1]));
    }

    #[test]
    fn schema_1_ranges_become_runs() {
        let disk = Uuid::from_u128(7);
        let ranges = [[0, 10], [13, 14], [20, 21]];
        for stripes in [1, 2, 3, 4, 64] {
            let d = DirtyChunks::from_chunk_ranges(disk, stripes, &ranges);
            let mut chunks: Vec<u64> = d.chunks().collect();
            chunks.sort_unstable();
            let mut expected: Vec<u64> = (0..10).chain([13, 20]).collect();
            expected.sort_unstable();
            assert_eq!(chunks, expected, "stripes {stripes}");
            assert_eq!(d, set(stripes, expected.iter().copied()));
        }
    }

    #[test]
    fn a_schema_1_vdisk_is_migrated_on_read() {
        let mut v = sample_vdisk();
        v.policy.stripes = 4;
        v.placement.groups = (0..4).map(|g| vec![Uuid::from_u128(10 + g)]).collect();
        let mut json = serde_json::to_value(&v).expect("encodes");
        json["schema"] = 1.into();
        let disk = Uuid::from_u128(3);
        json["dirty"] = serde_json::json!([
            {"disk": disk, "ranges": [[0, 8], [9, 10]]}
        ]);
        let bytes = serde_json::to_vec(&json).expect("encodes");
        let read: Vdisk = decode("/k", &bytes).expect("a schema 1 vDisk decodes");
        assert_eq!(read.schema, SCHEMA_VERSION);
        let mut expected = DirtyChunks::new(disk, 4);
        expected.add((0..8).chain([9]));
        assert_eq!(read.dirty, vec![expected]);
        assert_eq!(
            read.dirty[0].runs(),
            [[0, 0, 2], [1, 0, 3], [2, 0, 2], [3, 0, 2]]
        );
        // Written back, it is schema 2 and reads the same.
        let again = encode("/k", &read).expect("encodes");
        assert_eq!(decode::<Vdisk>("/k", &again).expect("decodes"), read);

        // A schema 1 vDisk without dirty sets, as most are.
        json.as_object_mut().expect("an object").remove("dirty");
        let bytes = serde_json::to_vec(&json).expect("encodes");
        let read: Vdisk = decode("/k", &bytes).expect("decodes");
        assert!(read.dirty.is_empty());
    }

    #[test]
    fn malformed_dirty_sets_are_refused() {
        let d = Uuid::from_u128(7);
        for bad in [
            serde_json::json!({"disk": d, "stripes": 0, "runs": []}),
            serde_json::json!({"disk": d, "stripes": 2, "runs": [[2, 0, 1]]}),
            serde_json::json!({"disk": d, "ranges": [[0, 1]]}),
        ] {
            assert!(
                serde_json::from_value::<DirtyChunks>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let unsorted: DirtyChunks = serde_json::from_value(
            serde_json::json!({"disk": d, "stripes": 2, "runs": [[1, 0, 1], [0, 4, 5], [0, 3, 4], [1, 1, 1]]}),
        )
        .expect("decodes");
        assert_eq!(unsorted.runs(), [[0, 3, 5], [1, 0, 1]]);
    }

    #[test]
    fn records_round_trip() {
        let vdisk = sample_vdisk();
        let bytes = encode("/k", &vdisk).expect("encodes");
        assert_eq!(decode::<Vdisk>("/k", &bytes).expect("decodes"), vdisk);
    }

    #[test]
    fn newer_schemas_and_garbage_are_refused() {
        let mut vdisk = sample_vdisk();
        vdisk.schema = SCHEMA_VERSION + 1;
        let bytes = encode("/k", &vdisk).expect("encodes");
        assert!(
            matches!(decode::<Vdisk>("/k", &bytes), Err(RecordError::TooNew { found, .. }) if found == SCHEMA_VERSION + 1)
        );
        assert!(matches!(
            decode::<Vdisk>("/k", b"{"),
            Err(RecordError::Malformed { .. })
        ));
        assert!(matches!(
            decode::<Vdisk>("/k", br#"{"schema":1}"#),
            Err(RecordError::Malformed { .. })
        ));
    }

    #[test]
    fn fields_added_later_default_when_absent() {
        let lease: Lease = serde_json::from_str(
            r#"{"holder":"h","session":"00000000-0000-0000-0000-000000000001","expires_ms":5}"#,
        )
        .expect("an old lease decodes");
        assert_eq!(lease.ttl_ms, 0);
        let ds = Datastore {
            schema: 1,
            uuid: Uuid::from_u128(1),
            name: "ds".into(),
            policy: Policy {
                redundancy: Redundancy::Mirror { copies: 1 },
                stripes: 1,
            },
            disks: vec![],
            created: 0,
            deleting: false,
        };
        let json = serde_json::to_string(&ds).expect("encodes");
        assert!(!json.contains("deleting"));
        assert_eq!(
            serde_json::from_str::<Datastore>(&json).expect("decodes"),
            ds
        );
    }

    #[test]
    fn vdisk_state_is_flattened() {
        let json = serde_json::to_value(sample_vdisk()).expect("encodes");
        assert_eq!(json["state"], "online");
        assert_eq!(json["host"], "hv1");
    }
}
