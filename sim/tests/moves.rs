//! The source of a finished move is freed by its node while a writer that
//! still uses the old placement may read it: such a read must never return
//! the freed copy's zeros as data. Deterministic: simulated nodes and the
//! real zone and volume client on one thread with paused time.

use std::sync::Arc;
use std::time::Duration;

use tessera_replicator::{Volume, VolumeConfig};
use tessera_sim::harness::{build_nodes, create_vdisk, drain, Nodes};
use tessera_sim::node::{SimConnector, SimNode};
use tessera_sim::zone::SimZone;
use tessera_zone::env::Env;
use tessera_zone::mem_store::MemStore;
use tessera_zone::service::{Heartbeat, RegisterDisk, ZoneService};
use uuid::Uuid;

const CHUNKS: u64 = 4;
const CHUNK: u64 = 64 << 10;

/// Nodes of one disk each, a mirrors=2 vDisk.
struct Cluster {
    zone: Arc<SimZone>,
    nodes: Vec<Arc<SimNode>>,
    disks: Vec<Uuid>,
    leases: Vec<u64>,
    connector: Arc<SimConnector>,
    chunks: u64,
}

impl Cluster {
    /// Three nodes, one group of four chunks.
    async fn new(seed: u64) -> Cluster {
        Cluster::with(seed, 3, 1, CHUNKS).await
    }

    async fn with(seed: u64, count: usize, stripes: u32, chunks: u64) -> Cluster {
        let service = ZoneService::new(Arc::new(MemStore::new()))
            .with_env(Env::simulated(seed))
            .with_chunk_size(CHUNK)
            .expect("a chunk size");
        service.ensure_zone("sim").await.expect("zone");
        let Nodes {
            nodes,
            disks,
            leases,
            ..
        } = build_nodes(
            &service,
            seed,
            count,
            chunks,
            CHUNK,
            |i| seed + i as u64,
            |_| true,
        )
        .await;
        create_vdisk(&service, 2, stripes, chunks, CHUNK).await;
        let connector = Arc::new(SimConnector::new(nodes.clone()));
        Cluster {
            zone: SimZone::new(service, seed),
            nodes,
            disks,
            leases,
            connector,
            chunks,
        }
    }

    fn config(&self, host: &str, lease_ttl: Duration) -> VolumeConfig {
        let mut c = VolumeConfig::with_zone(self.zone.clone(), "ds", "v", host);
        c.connector = Some(self.connector.clone());
        c.io_timeout = Duration::from_secs(1);
        c.degraded_wait = Duration::from_secs(3);
        c.lease_ttl = lease_ttl;
        c.repair_bandwidth = 64 << 20;
        c
    }

    fn node_of(&self, disk: Uuid) -> usize {
        self.disks.iter().position(|d| *d == disk).expect("a disk")
    }

    /// The vDisk's first group.
    async fn group(&self) -> Vec<Uuid> {
        self.groups().await[0].clone()
    }

    async fn groups(&self) -> Vec<Vec<Uuid>> {
        let v = self
            .zone
            .service
            .vdisk("ds", "v")
            .await
            .expect("vdisk")
            .vdisk;
        v.placement.groups
    }

    /// One heartbeat of node `i`: it reports its copies and frees those
    /// the zone says moved away. Returns how many it freed.
    async fn heartbeat(&self, i: usize) -> usize {
        let reply = self
            .zone
            .service
            .heartbeat(
                self.nodes[i].uuid,
                Heartbeat {
                    lease: self.leases[i],
                    disks: Vec::new(),
                    vdisks: Vec::new(),
                    usage: None,
                    freed_groups: Vec::new(),
                    copies: self.nodes[i].copies(),
                },
            )
            .await
            .expect("heartbeat");
        for [disk, vdisk] in &reply.free {
            self.nodes[i].free(*disk, *vdisk);
        }
        reply.free.len()
    }

    /// Drains `disk` out of the datastore: one move, planned now.
    async fn drain(&self, disk: Uuid) {
        let planned = drain(&self.zone.service, disk).await;
        assert_eq!(planned.len(), 1, "{planned:?}");
    }

    /// Waits until the zone finished every move.
    async fn moves_finished(&self) {
        for _ in 0..600 {
            let v = self
                .zone
                .service
                .vdisk("ds", "v")
                .await
                .expect("vdisk")
                .vdisk;
            if v.placement.moves.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the move did not finish");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

const DATA: u8 = 0xab;

async fn write_everything(v: &Volume) {
    v.write(0, &vec![DATA; (CHUNKS * CHUNK) as usize])
        .await
        .expect("written");
    v.flush().await.expect("flushed");
}

/// Reads the whole vDisk: Ok(true) if it holds what was written, Ok(false)
/// if anything else came back as data.
async fn reads_back(v: &Volume) -> Result<bool, String> {
    let mut buf = vec![0u8; (CHUNKS * CHUNK) as usize];
    v.read(0, &mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf.iter().all(|b| *b == DATA))
}

/// The writer that finishes a move keeps reads in flight to the source
/// (queued at its node, up to 50 ms) while the source's node, on a
/// heartbeat, frees the copy the zone says moved away.
#[test]
fn reads_in_flight_to_the_source_of_a_finished_move_return_no_freed_zeros() {
    runtime().block_on(async {
        let c = Cluster::new(11).await;
        // No node on the writer's host: reads go to the group's first copy.
        let v = Volume::open(c.config("client", Duration::from_secs(6)))
            .await
            .expect("opens");
        write_everything(&v).await;
        let source = c.group().await[0];
        let sn = c.node_of(source);
        c.nodes[sn].set_delay(Duration::from_millis(50));
        c.drain(source).await;

        // Readers keep reading while the writer notices the move (lease
        // renewal), fills the target, finishes the move and adopts the
        // placement without the source; the source's node heartbeats
        // often meanwhile.
        let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..4 {
            let (v, bad, stop) = (v.clone(), bad.clone(), stop.clone());
            readers.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match reads_back(&v).await {
                        Ok(true) => {}
                        Ok(false) => bad.lock().expect("poisoned").push("zeros".to_string()),
                        Err(e) => bad.lock().expect("poisoned").push(e),
                    }
                }
            }));
        }
        let mut freed = 0;
        for _ in 0..2000 {
            freed += c.heartbeat(sn).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            if freed > 0 && c.nodes[sn].copies().is_empty() {
                break;
            }
        }
        c.moves_finished().await;
        assert!(freed > 0, "the source was freed");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.await.expect("reader");
        }
        let bad = bad.lock().expect("poisoned").clone();
        let zeros = bad.iter().filter(|b| *b == "zeros").count();
        assert_eq!(
            zeros,
            0,
            "{zeros} reads returned the freed source's zeros as data ({} reads failed otherwise)",
            bad.len() - zeros
        );
        assert_eq!(reads_back(&v).await, Ok(true));
        v.close().await.expect("closed");
    });
}

/// A writer taken over by force has not learnt it yet (its next lease
/// renewal is far off) and reads from the source of a move the new writer
/// finished; the source's node has freed the copy.
#[test]
fn a_taken_over_writer_reads_no_freed_zeros_from_the_source_of_a_move() {
    runtime().block_on(async {
        let c = Cluster::new(12).await;
        let old = Volume::open(c.config("client-a", Duration::from_secs(60)))
            .await
            .expect("opens");
        write_everything(&old).await;
        let source = c.group().await[0];
        let sn = c.node_of(source);

        let mut force = c.config("client-b", Duration::from_secs(6));
        force.force = true;
        let new = Volume::open(force).await.expect("takes over");
        c.drain(source).await;
        c.moves_finished().await;
        // The new writer adopted the placement without the source, and
        // its next renewal (every 2 s) tells the zone so: the source's
        // node then frees it.
        assert!(!c.group().await.contains(&source));
        let mut freed = 0;
        for _ in 0..10 {
            freed = c.heartbeat(sn).await;
            if freed > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(freed, 1, "the source's node frees it");
        assert!(c.nodes[sn].copies().is_empty());

        // The old writer still reads with its placement of before the move.
        assert!(!old.is_fenced(), "it has not learnt of the take-over yet");
        match reads_back(&old).await {
            Ok(true) => {}
            Ok(false) => panic!("the old writer read the freed source's zeros as data"),
            // Refusing is fine too: it is fenced.
            Err(e) => eprintln!("the old writer's read failed: {e}"),
        }
        assert_eq!(reads_back(&new).await, Ok(true));
        new.close().await.expect("closed");
    });
}

/// A disk being filled for a move of one group is made the target of
/// another group's move too, while the writer still resyncs it and has not
/// adopted that second move. Completing the copy must not record the
/// second group's chunks clean without copying them (the writer's layout
/// does not have the disk in that group yet): every copy of every chunk
/// must hold the data once the moves finished.
#[test]
fn a_second_move_onto_a_target_being_filled_copies_its_group_too() {
    runtime().block_on(async {
        // Four nodes, two groups sharing one disk: g0 = [x, s], g1 = [y, s].
        let mut seed = 20;
        let (c, x, y, t) = loop {
            seed += 1;
            let c = Cluster::with(seed, 4, 2, 16).await;
            let g = c.groups().await;
            let shared: Vec<Uuid> = g[0].iter().copied().filter(|d| g[1].contains(d)).collect();
            if shared.len() != 1 {
                continue;
            }
            let x = *g[0].iter().find(|d| **d != shared[0]).expect("x");
            let y = *g[1].iter().find(|d| **d != shared[0]).expect("y");
            let t = *c
                .disks
                .iter()
                .find(|d| !g[0].contains(d) && !g[1].contains(d))
                .expect("a fourth disk");
            break (c, x, y, t);
        };
        // Renewals are far apart (the writer learns of a move late), and
        // resync is slow (128 KiB/s: a group of 8 chunks takes 4 s).
        let mut config = c.config("client", Duration::from_secs(60));
        config.repair_bandwidth = 128 << 10;
        let v = Volume::open(config).await.expect("opens");
        v.write(0, &vec![DATA; (c.chunks * CHUNK) as usize])
            .await
            .expect("written");
        v.flush().await.expect("flushed");

        // y is full: g0's copy on x can only move to t.
        let yn = c.node_of(y);
        c.zone
            .service
            .heartbeat(
                c.nodes[yn].uuid,
                Heartbeat {
                    lease: c.leases[yn],
                    disks: vec![RegisterDisk {
                        uuid: y,
                        path: format!("/sim/{yn}"),
                        capacity: c.chunks * CHUNK,
                        used: c.chunks * CHUNK,
                    }],
                    vdisks: Vec::new(),
                    copies: Vec::new(),
                    usage: None,
                    freed_groups: Vec::new(),
                },
            )
            .await
            .expect("heartbeat");
        // t is 85 % full: no room for a shed (y, full, would shed its g1
        // copy onto it), yet a drain, which must happen, takes it.
        let tn = c.node_of(t);
        c.zone
            .service
            .heartbeat(
                c.nodes[tn].uuid,
                Heartbeat {
                    lease: c.leases[tn],
                    disks: vec![RegisterDisk {
                        uuid: t,
                        path: format!("/sim/{tn}"),
                        capacity: c.chunks * CHUNK * 100,
                        used: c.chunks * CHUNK * 85,
                    }],
                    vdisks: Vec::new(),
                    copies: Vec::new(),
                    usage: None,
                    freed_groups: Vec::new(),
                },
            )
            .await
            .expect("heartbeat");
        // Every node keeps its liveness (and frees what moved away).
        let c = Arc::new(c);
        let beats = {
            let c = c.clone();
            tokio::spawn(async move {
                loop {
                    for i in 0..c.nodes.len() {
                        c.heartbeat(i).await;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        c.drain(x).await;
        // The writer adopts it at its next renewal (20 s) and fills t.
        tokio::time::sleep(Duration::from_millis(21_500)).await;
        let view = c.zone.service.vdisk("ds", "v").await.expect("vdisk");
        assert_eq!(v.placement_version(), view.vdisk.placement.version);
        assert!(!view.vdisk.placement.moves.is_empty(), "still filling t");

        // Now g1's copy on y leaves too: t is the only place for it.
        c.drain(y).await;
        let view = c.zone.service.vdisk("ds", "v").await.expect("vdisk");
        assert!(view.vdisk.placement.groups[1].contains(&t));
        assert!(view.vdisk.placement.groups[0].contains(&t));

        c.moves_finished().await;
        // Wait for the writer to adopt the final placement.
        tokio::time::sleep(Duration::from_secs(45)).await;
        let groups = c.groups().await;
        let version = c
            .zone
            .service
            .vdisk("ds", "v")
            .await
            .expect("vdisk")
            .vdisk
            .placement
            .version;
        assert_eq!(v.placement_version(), version);
        assert!(
            groups.iter().all(|g| g.contains(&t) && g.len() == 2),
            "{groups:?}"
        );
        for chunk in 0..c.chunks {
            for copy in 0..v.copies() {
                let mut buf = vec![0u8; CHUNK as usize];
                v.read_copy(chunk * CHUNK, &mut buf, copy)
                    .await
                    .expect("readable");
                assert!(
                    buf.iter().all(|b| *b == DATA),
                    "chunk {chunk} (group {}): copy {copy} does not hold the data",
                    chunk % 2
                );
            }
        }
        v.close().await.expect("closed");
        beats.abort();
    });
}
