//! One vDisk on a few simulated nodes, set up in this process for a
//! deterministic, targeted test: the zone service, the nodes and their
//! heartbeats, and the configuration a writer opens the vDisk with. Faults
//! are the test's to inject, step by step ([`SimNode::add_rule`],
//! [`SimZone::add_rule`], crashes and power losses); nothing here draws a
//! random fault.

use std::sync::Arc;
use std::time::Duration;

use tessera_replicator::{Volume, VolumeConfig, ZoneLink};
use tessera_zone::env::Env;
use tessera_zone::mem_store::MemStore;
use tessera_zone::service::{
    CreateDatastore, CreateVdisk, Heartbeat, RecordedMove, RegisterDisk, RegisterNode, VdiskView,
    ZoneService,
};
use uuid::Uuid;

use crate::node::{SimConnector, SimNode};
use crate::zone::SimZone;

/// The datastore and vDisk names of a [`Cluster`].
pub const DS: &str = "ds";
pub const NAME: &str = "v";
/// The host writers open the vDisk from (no node is on it: reads go to
/// the first copy of each group, in placement order).
pub const WRITER_HOST: &str = "sim-writer";

/// The shape of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct Shape {
    pub nodes: usize,
    pub mirrors: u32,
    pub stripes: u32,
    /// vDisk size in chunks.
    pub chunks: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Seeds the zone's ids (and so the placement) and the nodes' delays.
    pub seed: u64,
    /// The nodes keep activity marks (protocol version 5); else the vDisk's
    /// activity log is in the zone.
    pub node_marks: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            nodes: 2,
            mirrors: 2,
            stripes: 1,
            chunks: 32,
            chunk_size: 64 << 10,
            seed: 1,
            node_marks: false,
        }
    }
}

/// A zone, its nodes (one disk each) and one vDisk.
pub struct Cluster {
    pub shape: Shape,
    pub zone: Arc<SimZone>,
    pub nodes: Vec<Arc<SimNode>>,
    /// The disk of node `i`.
    pub disks: Vec<Uuid>,
    pub connector: Arc<SimConnector>,
    /// The vDisk's uuid.
    pub vdisk: Uuid,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl Cluster {
    /// Sets everything up (call on a runtime with paused time).
    pub async fn new(shape: Shape) -> Cluster {
        let seed = shape.seed;
        let service = ZoneService::new(Arc::new(MemStore::new()))
            .with_env(Env::simulated(seed))
            .with_chunk_size(shape.chunk_size)
            .expect("a valid chunk size")
            .with_node_ttl(Duration::from_secs(5));
        service.ensure_zone("sim").await.expect("zone");
        let Nodes {
            nodes,
            disks,
            registrations,
            mut leases,
        } = build_nodes(
            &service,
            seed,
            shape.nodes,
            shape.chunks,
            shape.chunk_size,
            |i| seed.wrapping_add(i as u64),
            |_| shape.node_marks,
        )
        .await;
        let vdisk = create_vdisk(
            &service,
            shape.mirrors,
            shape.stripes,
            shape.chunks,
            shape.chunk_size,
        )
        .await;
        let zone = SimZone::new(service, seed);
        let heartbeats = {
            let zone = zone.clone();
            let nodes = nodes.clone();
            tokio::spawn(async move {
                loop {
                    for (i, n) in nodes.iter().enumerate() {
                        if !n.is_up() {
                            continue;
                        }
                        let hb = Heartbeat {
                            lease: leases[i],
                            disks: Vec::new(),
                            copies: Vec::new(),
                            vdisks: Vec::new(),
                            usage: None,
                            freed_groups: Vec::new(),
                        };
                        if zone.service.heartbeat(n.uuid, hb).await.is_err() {
                            if let Ok(r) =
                                zone.service.register_node(registrations[i].clone()).await
                            {
                                leases[i] = r.lease;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let connector = Arc::new(SimConnector::new(nodes.clone()));
        Cluster {
            shape,
            zone,
            nodes,
            disks,
            connector,
            vdisk,
            heartbeats,
        }
    }

    /// How a writer opens the vDisk: 1 s I/O timeout, 3 s degraded wait,
    /// 6 s lease, fast resync.
    pub fn config(&self) -> VolumeConfig {
        let mut c = VolumeConfig::with_zone(self.zone.clone(), DS, NAME, WRITER_HOST);
        c.connector = Some(self.connector.clone());
        c.io_timeout = Duration::from_secs(1);
        c.degraded_wait = Duration::from_secs(3);
        c.lease_ttl = Duration::from_secs(6);
        c.repair_bandwidth = 64 << 20;
        c
    }

    /// Opens the vDisk for writing (`force`: taking over a dead writer's lease).
    pub async fn open(&self, force: bool) -> Volume {
        let mut c = self.config();
        c.force = force;
        Volume::open(c).await.expect("open")
    }

    /// The vDisk as the zone sees it now.
    pub async fn view(&self) -> VdiskView {
        ZoneLink::vdisk(&self.zone.service, DS, NAME)
            .await
            .expect("the vDisk")
    }

    /// The placement groups: disks of each group, in placement order.
    pub async fn groups(&self) -> Vec<Vec<Uuid>> {
        self.view().await.vdisk.placement.groups
    }

    /// The node that holds `disk`.
    pub fn node_of(&self, disk: Uuid) -> &Arc<SimNode> {
        let i = self
            .disks
            .iter()
            .position(|d| *d == disk)
            .expect("a disk of the cluster");
        &self.nodes[i]
    }

    /// Whether the zone lists `disk` stale, and the chunks its dirty set names.
    pub async fn stale(&self, disk: Uuid) -> (bool, Vec<u64>) {
        let v = self.view().await.vdisk;
        let dirty = v
            .dirty
            .iter()
            .filter(|e| e.disk == disk)
            .flat_map(|e| e.chunks())
            .collect();
        (v.stale.contains(&disk), dirty)
    }

    /// Byte offset of block `block` (4 KiB) of chunk `chunk`.
    pub fn offset(&self, chunk: u64, block: u64) -> u64 {
        chunk * self.shape.chunk_size + block * crate::node::BLOCK
    }

    /// Advances simulated time until `done` holds (checked every 10 ms), at
    /// most `limit`; returns whether it held.
    pub async fn until(&self, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let end = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < end {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done()
    }
}

/// A 4 KiB block whose bytes name `id` (distinct writes have distinct
/// content).
pub fn block(id: u64) -> Vec<u8> {
    crate::model::content(id, id)
}

/// Removes `disk` from datastore [`DS`] and runs the move planner once:
/// returns the moves it planned (the drain of `disk`'s copies).
pub async fn drain(service: &ZoneService, disk: Uuid) -> Vec<RecordedMove> {
    service
        .remove_datastore_disk(DS, disk)
        .await
        .expect("the disk removed from the datastore");
    service
        .plan_moves(&Default::default())
        .await
        .expect("moves planned")
}

/// Chunks per activity extent of the simulated nodes' marks (the
/// protocol's 256 would make a simulated vDisk one extent).
pub const SIM_EXTENT_CHUNKS: u64 = 8;

/// Simulated nodes of one disk each, registered with the zone by
/// [`build_nodes`]; entry `i` of each list is node `i`'s.
#[derive(Default)]
pub struct Nodes {
    pub nodes: Vec<Arc<SimNode>>,
    /// Each node's one disk (their uuids sort in node order).
    pub disks: Vec<Uuid>,
    /// What each node registered (to register again once its liveness
    /// lease ran out).
    pub registrations: Vec<RegisterNode>,
    /// Each node's liveness lease.
    pub leases: Vec<u64>,
}

/// Builds `count` nodes of a simulation seeded `seed` and registers them
/// with `service`, in node order: node `i`'s uuid and disk are drawn from
/// `seed`, its address is `10.99.0.{i + 1}:7000` and its host
/// `sim-host-{i}`, its disk holds `chunks` chunks of `chunk_size` bytes, and
/// `delays(i)` (called just before node `i` is built) seeds its delays.
/// Node `i` registers the protocol version that keeps activity marks if
/// `keeps_marks(i)`, else the one before it (a node not yet upgraded: a
/// vDisk with a copy on it keeps its activity log in the zone).
/// The uuids, addresses, seeds and the order of registrations are what a
/// seed replays: changing any of them changes every seed's schedule.
pub async fn build_nodes(
    service: &ZoneService,
    seed: u64,
    count: usize,
    chunks: u64,
    chunk_size: u64,
    mut delays: impl FnMut(usize) -> u64,
    keeps_marks: impl Fn(usize) -> bool,
) -> Nodes {
    // Small extents, so that a simulated vDisk has several.
    tessera_proto::set_activity_extent_chunks(SIM_EXTENT_CHUNKS);
    let mut built = Nodes::default();
    for i in 0..count {
        let uuid = Uuid::from_u64_pair(seed, 0x100 + i as u64);
        let disk = Uuid::from_u64_pair(seed, 0x200 + i as u64);
        let addr = format!("10.99.0.{}:7000", i + 1);
        let node = SimNode::new(uuid, addr.clone(), &[disk], chunks, chunk_size, delays(i));
        let registration = RegisterNode {
            uuid,
            host: format!("sim-host-{i}"),
            addr,
            socket: None,
            disks: vec![RegisterDisk {
                uuid: disk,
                path: format!("/sim/{i}"),
                capacity: chunks * chunk_size,
                used: 0,
            }],
            protocol: Some(if keeps_marks(i) {
                tessera_proto::PROTOCOL_MARKS
            } else {
                tessera_proto::PROTOCOL_MARKS - 1
            }),
        };
        let registered = service
            .register_node(registration.clone())
            .await
            .expect("register");
        built.nodes.push(node);
        built.disks.push(disk);
        built.registrations.push(registration);
        built.leases.push(registered.lease);
    }
    built
}

/// Creates datastore [`DS`] over every registered disk (`mirrors` copies,
/// `stripes` groups) and in it vDisk [`NAME`] of `chunks` chunks of
/// `chunk_size` bytes; returns the vDisk's uuid.
pub async fn create_vdisk(
    service: &ZoneService,
    mirrors: u32,
    stripes: u32,
    chunks: u64,
    chunk_size: u64,
) -> Uuid {
    service
        .create_datastore(CreateDatastore {
            name: DS.into(),
            mirrors,
            stripes: Some(stripes),
            disks: None,
        })
        .await
        .expect("datastore");
    service
        .create_vdisk(CreateVdisk {
            datastore: DS.into(),
            name: NAME.into(),
            size: chunks * chunk_size,
        })
        .await
        .expect("vdisk")
        .uuid
}

/// Runs `test` on a fresh single-threaded runtime with paused time (with
/// `RUST_LOG` set, the volume client's log goes to stderr).
pub fn run<F: std::future::Future<Output = ()>>(test: F) {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
        .block_on(test)
}
