//! The zone's metadata records.
//!
//! Every record is stored as JSON under a key of the zone's key space (see
//! [`keys`]) and carries a `schema` field: the version of its layout. A reader
//! accepts every schema version up to [`SCHEMA_VERSION`] and migrates older
//! ones on read; a record with a newer schema than the reader knows is refused
//! rather than misread.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The newest schema version of every record this build writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Size of a vDisk chunk: the unit of placement, allocation and replication.
pub const CHUNK_SIZE: u64 = 1 << 20;

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

    /// The chunks of group `group` in a vDisk of `size` bytes.
    pub fn group_chunks(&self, group: u32, size: u64) -> impl Iterator<Item = u64> {
        let stripes = self.groups.len().max(1) as u64;
        let chunks = size.div_ceil(self.chunk_size.max(1));
        (group as u64..chunks).step_by(stripes as usize)
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
}

/// Chunks per activity-log extent (16 MiB with 1 MiB chunks).
pub const ACTIVITY_EXTENT_CHUNKS: u64 = 16;

/// The chunks one stale copy missed, as sorted, disjoint, half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyChunks {
    pub disk: Uuid,
    pub ranges: Vec<[u64; 2]>,
}

impl DirtyChunks {
    /// Number of chunks.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|r| r[1] - r[0]).sum()
    }

    pub fn contains(&self, chunk: u64) -> bool {
        self.ranges.iter().any(|r| r[0] <= chunk && chunk < r[1])
    }

    /// Every chunk, in order.
    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| r[0]..r[1])
    }

    /// Adds chunks, keeping the ranges sorted, disjoint and merged.
    pub fn add(&mut self, chunks: impl IntoIterator<Item = u64>) {
        let mut all: Vec<[u64; 2]> = self.ranges.drain(..).collect();
        all.extend(chunks.into_iter().map(|c| [c, c.saturating_add(1)]));
        self.ranges = merge(all);
    }

    /// Removes chunks.
    pub fn remove(&mut self, chunks: impl IntoIterator<Item = u64>) {
        let mut gone: Vec<u64> = chunks.into_iter().collect();
        gone.sort_unstable();
        gone.dedup();
        let mut out = Vec::new();
        for r in &self.ranges {
            let mut start = r[0];
            let lo = gone.partition_point(|&c| c < r[0]);
            let hi = gone.partition_point(|&c| c < r[1]);
            for &c in &gone[lo..hi] {
                if start < c {
                    out.push([start, c]);
                }
                start = c + 1;
            }
            if start < r[1] {
                out.push([start, r[1]]);
            }
        }
        self.ranges = out;
    }
}

fn merge(mut ranges: Vec<[u64; 2]>) -> Vec<[u64; 2]> {
    ranges.retain(|r| r[0] < r[1]);
    ranges.sort_unstable();
    let mut out: Vec<[u64; 2]> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r[0] <= last[1] => last[1] = last[1].max(r[1]),
            _ => out.push(r),
        }
    }
    out
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

/// Decodes the record stored at `key`, refusing schemas newer than
/// [`SCHEMA_VERSION`]. (Schema 1 is the first: there is nothing to migrate yet;
/// a future schema 2 reader migrates 1 → 2 here.)
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RecordError> {
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
    serde_json::from_slice(bytes).map_err(malformed)
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
        }
    }

    #[test]
    fn dirty_chunk_ranges() {
        let mut d = DirtyChunks::default();
        d.add([5, 3, 4, 10, 11, 4]);
        assert_eq!(d.ranges, vec![[3, 6], [10, 12]]);
        assert_eq!(d.count(), 5);
        assert!(d.contains(5) && !d.contains(6));
        d.remove([4, 10, 99]);
        assert_eq!(d.ranges, vec![[3, 4], [5, 6], [11, 12]]);
        assert_eq!(d.chunks().collect::<Vec<_>>(), vec![3, 5, 11]);
        d.remove([3, 5, 11]);
        assert!(d.ranges.is_empty());
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
