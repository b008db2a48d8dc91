//! The volume client: a vDisk's byte address space over its chunks' copies.
//!
//! The parts:
//! - [`copies`]: a copy slot's state and its named transitions;
//! - [`tracker`]: what each copy did with one write, and whether it may be
//!   acknowledged;
//! - [`mirror`]: the redundancy scheme, behind the per-piece interface
//!   [`scheme::Redundancy`] (read, write, zero a piece; rebuild and scrub a
//!   chunk);
//! - [`dirty`]: what stale copies miss, unflushed writes, and recording
//!   both in the zone;
//! - [`placement`]: the layout of copies and how it changes while open;
//! - [`activity`]: the activity log (writer-crash reconciliation);
//! - [`repair`]: resync and scrub.
//!
//! The nodes are reached through [`crate::link`] and the zone through
//! [`crate::zone_link`]: both are traits, so the whole volume client runs in
//! one process against in-memory nodes and an in-memory zone (the
//! deterministic simulation).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use tessera_proto::{ChunkRange, Status};
use tessera_zone::records::{Vdisk, SECTOR_SIZE};
use tessera_zone::service::{OpenVdisk, SessionRef};
use uuid::Uuid;

mod activity;
pub(crate) mod copies;
mod dirty;
mod mirror;
mod placement;
mod repair;
pub(crate) mod scheme;
pub(crate) mod tracker;

pub use repair::ScrubReport;

use crate::layout::{split, Piece};
use crate::link::{Connector, Link, Reply};
use crate::shm::{SharedMemory, SharedRegion};
use crate::zone_link::{ZoneCallError, ZoneLink};
use crate::VolumeError;

use copies::{CopyHealth, CopyState};
use dirty::{DirtyState, ForkState};
use mirror::Mirror;
use placement::{Layout, Links};
use scheme::Redundancy;

/// Bits of the wire epoch below the zone's epoch: a per-disk fence
/// generation. Resync fences a returning copy with the next generation, so
/// a request of this writer that was still queued on the node when it
/// failed (a timeout) is refused rather than landing after resync copied
/// its chunk.
pub(crate) const GENERATION_BITS: u32 = 24;
/// The largest zone epoch a volume can write with.
pub(crate) const MAX_ZONE_EPOCH: u64 = (1 << (64 - GENERATION_BITS)) - 1;

/// How to open a vDisk.
#[derive(Clone)]
pub struct VolumeConfig {
    /// The zone: the REST API in production.
    pub zone: Arc<dyn ZoneLink>,
    /// How links to nodes are made: `None` for the network (TCP, or a
    /// local session on this host).
    pub connector: Option<Arc<dyn Connector>>,
    pub datastore: String,
    pub name: String,
    /// This host: reads prefer copies on it; the zone shows the vDisk online here.
    pub host: String,
    /// Write lease time to live; renewed every third of it.
    pub lease_ttl: Duration,
    /// Take the lease even if another live holder has it (operator take-over).
    pub force: bool,
    /// Bound on one request to one storage node.
    pub io_timeout: Duration,
    /// Resync stale copies in the background while the volume is open.
    pub repair: bool,
    /// Bandwidth resync and scrub may use, bytes per second.
    pub repair_bandwidth: u64,
    /// Scrub every copy this often while open (`None`: never).
    pub scrub_interval: Option<Duration>,
    /// How long a write waits, when fewer copies than the policy's minimum
    /// are current, for one to come back before failing.
    pub degraded_wait: Duration,
    /// Open as the zone's repair worker: the lease yields to any other open.
    pub repair_worker: bool,
}

impl VolumeConfig {
    pub fn new(
        api: tessera_api_client::ApiClient,
        datastore: &str,
        name: &str,
        host: &str,
    ) -> Self {
        Self::with_zone(Arc::new(api), datastore, name, host)
    }

    /// A configuration that reaches the zone through `zone`.
    pub fn with_zone(zone: Arc<dyn ZoneLink>, datastore: &str, name: &str, host: &str) -> Self {
        VolumeConfig {
            zone,
            connector: None,
            datastore: datastore.to_string(),
            name: name.to_string(),
            host: host.to_string(),
            lease_ttl: Duration::from_secs(10),
            force: false,
            io_timeout: Duration::from_secs(30),
            repair: true,
            repair_bandwidth: 256 << 20,
            scrub_interval: None,
            degraded_wait: Duration::from_secs(10),
            repair_worker: false,
        }
    }
}

/// One copy of a chunk: a disk and the node serving it.
#[derive(Clone)]
pub(crate) struct CopySlot {
    pub(crate) disk: Uuid,
    /// Index of the node in the volume's node list (and its connections).
    pub(crate) node: usize,
    pub(crate) local: bool,
    /// This group's copy's state (every group's copy has its own).
    pub(crate) state: Arc<CopyState>,
    /// The disk's fence generation (shared by all its slots).
    pub(crate) generation: Arc<AtomicU64>,
}

impl CopySlot {
    pub(crate) fn health(&self) -> CopyHealth {
        self.state.get()
    }
}

pub(crate) struct Inner {
    pub(crate) config: VolumeConfig,
    /// The vDisk record as of the open (its placement may have changed
    /// since: see `layout`).
    pub(crate) vdisk: Vdisk,
    /// The zone's epoch of this open.
    pub(crate) epoch: u64,
    pub(crate) session: Uuid,
    /// The redundancy scheme.
    scheme: Mirror,
    /// Which disks hold each group's copies, replaced whole when the zone
    /// moves a copy (rebuild, drain, rebalance).
    layout: ArcSwap<Layout>,
    /// Addresses of every node a layout has used, by node index (only grows).
    nodes: Arc<std::sync::RwLock<Vec<crate::link::NodeAddr>>>,
    /// Per node index, the boot identity this volume knows it runs (shared
    /// by every handle's link to it).
    boots: Arc<std::sync::Mutex<Vec<Arc<crate::link::BootWatch>>>>,
    /// Memory the device adapter shares with the nodes on this host.
    shm: Arc<SharedMemory>,
    /// Serialises layout changes.
    adopting: tokio::sync::Mutex<()>,
    /// The placement version no operation of this volume is older than
    /// (the layout's, once operations on the previous one ended). Renewals
    /// report it: the zone frees a copy a newer placement dropped only once
    /// this reaches that placement.
    pub(crate) settled: AtomicU64,
    /// Fewest current copies a write needs.
    pub(crate) min_copies: usize,
    /// Identifies this open to the nodes (the session id).
    client: [u8; 16],
    /// Serialises dirty/clean/activity records in the zone.
    pub(crate) recording: tokio::sync::Mutex<()>,
    /// Which chunks each stale copy misses, as far as the zone knows, and
    /// what is waiting to be recorded.
    pub(crate) dirty: std::sync::Mutex<DirtyState>,
    /// Per-chunk exclusion between writes and resync, striped; taken only
    /// by writes to groups that have a non-current copy.
    pub(crate) stripes: Vec<tokio::sync::RwLock<()>>,
    /// Every handle's bookkeeping (unflushed chunks, writes in flight).
    forks: std::sync::Mutex<Vec<std::sync::Weak<ForkState>>>,
    /// Orders acknowledged writes and flushes (see `dirty`).
    pub(crate) seq: AtomicU64,
    /// Chunks resync copied, for reports.
    pub(crate) resynced_chunks: AtomicU64,
    /// Extents that may have writes in flight (the activity log).
    activity: activity::Activity,
    /// The activity log is kept by the nodes (every node of the vDisk
    /// registered protocol version 5 or later at the open): a write into a
    /// cold extent waits for no zone call, cooling sends `Unmark`, the open
    /// reconciles the extents the nodes' fence replies list. Otherwise it
    /// is kept in the zone's vDisk record.
    pub(crate) node_marks: bool,
    /// Chunks the open rewrote to make copies agree after a writer crash.
    reconciled_chunks: AtomicU64,
    /// The extents (of [`tessera_zone::records::ACTIVITY_EXTENT_CHUNKS`] chunks) an earlier writer
    /// may have left in flight: the zone's activity log, and with
    /// `node_marks` the marks the fenced copies' nodes listed.
    inherited: std::sync::Mutex<Vec<u64>>,
    /// Set once a node or the zone says another writer took over.
    fenced: AtomicBool,
    fenced_by: AtomicU64,
    /// Set by `close`: no new mutation starts.
    closing: AtomicBool,
}

/// An open vDisk. Cheap to clone; every clone shares the lease and the
/// connections, and any number of requests may run at once. [`Volume::fork`]
/// gives a handle with connections of its own (one per device queue, so no
/// lock is shared by the queues on the I/O path).
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
    /// This handle's connections, by node index.
    links: Arc<Links>,
    /// This handle's chunks written since the last flush.
    fork: Arc<ForkState>,
    renewer: Arc<Renewer>,
}

/// Stripe of the per-chunk lock table.
pub(crate) fn stripe(chunk: u64) -> usize {
    (chunk % STRIPES as u64) as usize
}

const STRIPES: usize = 64;

/// The volume's background tasks: lease renewal and repair.
struct Renewer {
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    repair_stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    repair_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Volume {
    /// Opens the vDisk for writing: takes its write lease (a new epoch), and
    /// fences every copy so no older writer's request lands after this returns.
    pub async fn open(config: VolumeConfig) -> Result<Volume, VolumeError> {
        let opened = config
            .zone
            .open(
                &config.datastore,
                &config.name,
                &OpenVdisk {
                    host: config.host.clone(),
                    ttl_ms: config.lease_ttl.as_millis() as u64,
                    force: config.force,
                    role: None,
                    repair: config.repair_worker,
                },
            )
            .await?;
        if opened.epoch > MAX_ZONE_EPOCH {
            return Err(VolumeError::Placement(format!(
                "the vDisk's epoch {} is beyond the largest a writer can use ({MAX_ZONE_EPOCH})",
                opened.epoch
            )));
        }
        let client = *opened.session.as_bytes();
        let nodes = Arc::new(std::sync::RwLock::new(Vec::new()));
        let node_marks = !opened.nodes.is_empty()
            && opened
                .nodes
                .iter()
                .all(|n| n.node.protocol >= tessera_proto::PROTOCOL_MARKS);
        let layout = Layout::build(
            &opened.vdisk,
            &nodes,
            None,
            placement::locator(&opened.disks, &opened.nodes, &config.host, node_marks),
        )?;
        let min_copies = opened.vdisk.policy.redundancy.min_copies() as usize;
        let mut dirty = DirtyState::default();
        for e in &opened.vdisk.dirty {
            dirty.known.insert(e.disk, e.chunks().collect());
        }
        let inner = Arc::new(Inner {
            dirty: std::sync::Mutex::new(dirty),
            stripes: (0..STRIPES).map(|_| tokio::sync::RwLock::new(())).collect(),
            forks: std::sync::Mutex::new(Vec::new()),
            seq: AtomicU64::new(1),
            resynced_chunks: AtomicU64::new(0),
            activity: activity::Activity::new(
                opened.vdisk.size,
                opened.vdisk.placement.chunk_size,
                &[],
                if node_marks {
                    tessera_proto::activity_extent_chunks()
                } else {
                    tessera_zone::records::ACTIVITY_EXTENT_CHUNKS
                },
            ),
            reconciled_chunks: AtomicU64::new(0),
            node_marks,
            inherited: std::sync::Mutex::new(Vec::new()),
            scheme: Mirror,
            layout: ArcSwap::from_pointee(layout),
            nodes,
            boots: Arc::default(),
            shm: Arc::default(),
            adopting: tokio::sync::Mutex::new(()),
            settled: AtomicU64::new(opened.vdisk.placement.version),
            min_copies,
            recording: tokio::sync::Mutex::new(()),
            vdisk: opened.vdisk,
            epoch: opened.epoch,
            session: opened.session,
            client,
            fenced: AtomicBool::new(false),
            fenced_by: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            config,
        });
        let links = Arc::new(inner.connect());
        inner.fence_all(&links).await?;
        // The previous writer died with writes in flight: make the copies of
        // the extents it was writing agree before serving anything.
        let extents = inner.inherited_extents();
        if !extents.is_empty() || inner.node_marks {
            let rewritten = inner.reconcile(&links, &extents).await?;
            inner.reconciled_chunks.store(rewritten, Ordering::Relaxed);
            tracing::info!(
                extents = extents.len(),
                rewritten,
                "reconciled the previous writer's in-flight extents"
            );
        }
        let renewer = Arc::new(Renewer::start(inner.clone()));
        let volume = Volume {
            fork: inner.new_fork(),
            inner,
            links,
            renewer,
        };
        Ok(volume)
    }

    /// Lists the regions of this process's memory, backed by files, that
    /// storage nodes on this host may map: reads and writes whose buffers
    /// lie in them skip the socket (see [`crate::SharedRegion`]). Replaces
    /// the previous list; call it before memory it no longer lists can be
    /// unmapped.
    pub fn share_memory(&self, regions: Vec<SharedRegion>) {
        self.inner.shm.set(regions);
    }

    /// A handle on the same open vDisk (lease, epoch, copy states) with
    /// connections of its own to the nodes.
    pub fn fork(&self) -> Volume {
        Volume {
            inner: self.inner.clone(),
            links: Arc::new(self.inner.connect()),
            fork: self.inner.new_fork(),
            renewer: self.renewer.clone(),
        }
    }

    /// Copies of chunks the open rewrote to make copies agree after the
    /// previous writer died mid-write.
    pub fn reconciled_chunks(&self) -> u64 {
        self.inner.reconciled_chunks.load(Ordering::Relaxed)
    }

    /// Chunks copied to stale copies by resync since the open.
    pub fn resynced_chunks(&self) -> u64 {
        self.inner.resynced_chunks.load(Ordering::Relaxed)
    }

    /// Reads every chunk of every current copy, compares them, and hands
    /// copies with bad checksums or differing data to resync.
    pub async fn scrub(&self) -> Result<repair::ScrubReport, VolumeError> {
        self.inner.scrub(&self.links).await
    }

    /// Whether every copy is current (as far as this volume knows).
    pub fn all_current(&self) -> bool {
        self.inner
            .layout()
            .disks
            .iter()
            .all(|(_, _, st)| st.get() == CopyHealth::Current)
    }

    /// Whether every placement group has the policy's minimum of current
    /// copies: writes and flushes can complete without waiting.
    pub fn writable(&self) -> bool {
        self.inner.layout().groups.iter().all(|group| {
            group
                .iter()
                .filter(|c| c.health() == CopyHealth::Current)
                .count()
                >= self.inner.min_copies
        })
    }

    /// Whether every copy of the placement is current, copies being filled
    /// for a move aside (they are not current until the move finishes).
    pub fn members_current(&self) -> bool {
        let layout = self.inner.layout();
        layout.groups.iter().enumerate().all(|(g, group)| {
            group
                .iter()
                .all(|c| layout.targets.contains(&(c.disk, g)) || c.health() == CopyHealth::Current)
        })
    }

    /// Whether any copy on `disk` is current in this volume's view (false
    /// for a disk its placement does not use).
    pub fn disk_current(&self, disk: Uuid) -> bool {
        self.inner
            .layout()
            .slots(disk)
            .any(|st| st.get() == CopyHealth::Current)
    }

    /// The placement version this volume works with.
    pub fn placement_version(&self) -> u64 {
        self.inner.layout().version
    }

    /// The vDisk record as of the open.
    pub fn vdisk(&self) -> &Vdisk {
        &self.inner.vdisk
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.vdisk.size
    }

    /// The epoch this volume writes with.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Number of copies of every chunk.
    pub fn copies(&self) -> usize {
        self.inner.layout().groups.first().map_or(0, |g| g.len())
    }

    /// Whether another writer has taken the vDisk over.
    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::Acquire)
    }

    /// Reads `buf.len()` bytes at `offset`, from one copy of each chunk.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.read_from(offset, &mut [buf], None).await
    }

    /// Reads from copy number `copy` (placement order) of every chunk only:
    /// lets tests and scrub check each copy.
    pub async fn read_copy(
        &self,
        offset: u64,
        buf: &mut [u8],
        copy: usize,
    ) -> Result<(), VolumeError> {
        if copy >= self.copies() {
            return Err(VolumeError::NoSuchCopy(copy));
        }
        self.read_from(offset, &mut [buf], Some(copy)).await
    }

    async fn read_from(
        &self,
        offset: u64,
        bufs: &mut [&mut [u8]],
        copy: Option<usize>,
    ) -> Result<(), VolumeError> {
        let inner = &self.inner;
        // A fenced writer's view is gone: another host owns the vDisk now.
        inner.check_fenced()?;
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        inner.check_range(offset, len)?;
        let pieces = split(offset, len, inner.vdisk.placement.chunk_size);
        // Within one chunk (nearly every request): no join to build.
        if let [p] = pieces[..] {
            return inner
                .scheme
                .read_piece(inner, &self.links, p, bufs, copy)
                .await;
        }
        let dests = split_mut(bufs, pieces.iter().map(|p| p.len as usize));
        let reads = pieces
            .into_iter()
            .zip(dests)
            .map(|(p, mut dest)| async move {
                inner
                    .scheme
                    .read_piece(inner, &self.links, p, &mut dest, copy)
                    .await
            });
        first_error(join_all(reads).await)
    }

    /// Reads into the concatenation of `bufs` at `offset`: the data is read
    /// off the node's socket straight into the buffers.
    pub async fn readv(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), VolumeError> {
        self.read_from(offset, bufs, None).await
    }

    /// Writes `data` at `offset` to every copy; returns once every copy holds it.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.writev(offset, &[data]).await
    }

    /// Writes the concatenation of `bufs` at `offset` to every copy, sending
    /// the buffers to the nodes as they are (no copy of the data).
    pub async fn writev(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        inner.check_range(offset, len)?;
        let _running = self.fork.start_mutation(inner)?;
        let pieces = split(offset, len, inner.vdisk.placement.chunk_size);
        // Boxed: a write's state is large (it waits for every copy at
        // once), and the caller's future would otherwise carry it.
        if let [p] = pieces[..] {
            return Box::pin(
                inner
                    .scheme
                    .write_piece(inner, &self.links, &self.fork, p, bufs),
            )
            .await;
        }
        let mut cursor = SliceCursor::new(bufs);
        let mut writes = Vec::with_capacity(pieces.len());
        for p in pieces {
            let slices = cursor.take(p.len as usize);
            writes.push(async move {
                inner
                    .scheme
                    .write_piece(inner, &self.links, &self.fork, p, &slices)
                    .await
            });
        }
        // Every piece runs to its end, so each copy failure is recorded.
        first_error(join_all(writes).await)
    }

    /// Makes every write acknowledged before this call stable on at least
    /// the policy's minimum of current copies in every group. A copy that
    /// fails the flush is recorded stale with everything it may have lost;
    /// below the minimum the flush waits, bounded, for copies to come back,
    /// then fails.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.inner.check_fenced()?;
        self.inner.flush(&self.links).await
    }

    /// Discards `len` bytes at `offset`: they read as zeros afterwards and
    /// whole chunks give their space back.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.zero_range(offset, len, true).await
    }

    /// Writes zeros over `len` bytes at `offset`.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.zero_range(offset, len, false).await
    }

    async fn zero_range(&self, offset: u64, len: u64, discard: bool) -> Result<(), VolumeError> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        let _running = self.fork.start_mutation(inner)?;
        let pieces = split(offset, len, inner.vdisk.placement.chunk_size);
        if let [p] = pieces[..] {
            return Box::pin(
                inner
                    .scheme
                    .zero_piece(inner, &self.links, &self.fork, p, discard),
            )
            .await;
        }
        let zeroes = pieces.into_iter().map(|p| {
            inner
                .scheme
                .zero_piece(inner, &self.links, &self.fork, p, discard)
        });
        first_error(join_all(zeroes).await)
    }

    /// Stops taking writes, waits for those in flight, flushes, and releases
    /// the write lease. If the flush fails (it is reported), the activity
    /// log is kept, so the next open reconciles what may differ.
    pub async fn close(self) -> Result<(), VolumeError> {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::SeqCst);
        inner.wait_idle().await;
        self.renewer.finish_repair().await;
        let flushed = if self.is_fenced() {
            Ok(())
        } else {
            inner.flush(&self.links).await
        };
        if flushed.is_ok() && inner.node_marks && !self.is_fenced() {
            // The copies agree on stable media: the nodes forget this
            // writer's marks (those left behind only cost a reconcile).
            inner.unmark(&self.links, &[], None).await;
        }
        self.renewer.stop();
        // Released either way; if the flush failed, the activity log stays
        // so that the next open makes the copies agree.
        if flushed.is_err() {
            tracing::warn!(
                "the final flush failed: the activity log is kept for the next open to reconcile"
            );
        }
        let release = SessionRef {
            session: inner.session,
            ttl_ms: None,
            keep_activity: flushed.is_err(),
            settled: None,
        };
        let released = inner
            .zone_retry(|| {
                inner
                    .config
                    .zone
                    .close(&inner.config.datastore, &inner.config.name, &release)
            })
            .await
            .map_err(VolumeError::from);
        self.links.close_all().await;
        flushed?;
        released?;
        Ok(())
    }
}

/// The first error of a set of per-piece results, once all have ended.
fn first_error(results: Vec<Result<(), VolumeError>>) -> Result<(), VolumeError> {
    results.into_iter().collect()
}

impl Inner {
    /// Fresh (lazily connecting) links to every node.
    fn connect(&self) -> Links {
        Links::new(
            self.nodes.clone(),
            self.boots.clone(),
            self.shm.clone(),
            self.client,
            self.config.io_timeout,
            self.config.connector.clone(),
        )
    }

    /// The current layout; held only for the span of one operation (a
    /// layout change waits for operations on the old one to finish).
    pub(crate) fn layout(&self) -> Arc<Layout> {
        self.layout.load_full()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
            return Err(VolumeError::Unaligned { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.vdisk.size => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                offset,
                len,
                size: self.vdisk.size,
            }),
        }
    }

    pub(crate) fn check_fenced(&self) -> Result<(), VolumeError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    fn fenced_error(&self) -> VolumeError {
        VolumeError::Fenced {
            epoch: self.epoch,
            by: self.fenced_by.load(Ordering::Acquire),
        }
    }

    /// A zone answer that means another writer may own the vDisk (the
    /// lease is lost, or the vDisk was deleted) fences this writer; any
    /// other failure is only that call's.
    pub(crate) fn zone_error(&self, err: ZoneCallError) -> VolumeError {
        if err.means_fenced() {
            if !self.fenced.swap(true, Ordering::AcqRel) {
                tracing::error!(error = %err, "the zone says this writer lost the vDisk; refusing further I/O");
            }
            return self.fenced_error();
        }
        VolumeError::Zone(err)
    }

    /// Calls the zone, retrying what may succeed on another try (contention,
    /// no answer) for up to `degraded_wait`: a zone that restarts within
    /// that time costs the guest nothing.
    pub(crate) async fn zone_retry<T, F, Fut>(&self, mut call: F) -> Result<T, ZoneCallError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ZoneCallError>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.degraded_wait;
        loop {
            match call().await {
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "zone call failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => return r,
            }
        }
    }

    /// The epoch a request to `slot`'s disk carries: the zone's epoch and
    /// the disk's fence generation.
    pub(crate) fn wire_epoch(&self, slot: &CopySlot) -> u64 {
        (self.epoch << GENERATION_BITS) | slot.generation.load(Ordering::Acquire)
    }

    pub(crate) fn range(&self, p: &Piece, slot: &CopySlot) -> ChunkRange {
        ChunkRange {
            vdisk: *self.vdisk.uuid.as_bytes(),
            disk: *slot.disk.as_bytes(),
            chunk: p.chunk,
            offset: p.offset,
            len: p.len,
            epoch: self.wire_epoch(slot),
        }
    }

    /// Turns a node's answer into a result. `StaleEpoch` from a newer
    /// zone epoch fences this writer; from our own newer fence generation
    /// it only refuses a request that was overtaken by a resync.
    pub(crate) fn check_reply(&self, reply: &Reply, link: &Link) -> Result<(), VolumeError> {
        match reply.status {
            Status::Ok => Ok(()),
            Status::StaleEpoch => {
                let theirs = reply
                    .body
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(u64::MAX);
                let by = theirs >> GENERATION_BITS;
                if by <= self.epoch {
                    return Err(VolumeError::Node {
                        addr: link.addr().to_owned(),
                        status: Status::StaleEpoch,
                        message: "a request overtaken by this writer's own fence".into(),
                    });
                }
                self.fenced_by.fetch_max(by, Ordering::AcqRel);
                if !self.fenced.swap(true, Ordering::AcqRel) {
                    tracing::error!(epoch = self.epoch, by, "vDisk taken over by another writer");
                }
                Err(VolumeError::Fenced {
                    epoch: self.epoch,
                    by,
                })
            }
            status => Err(VolumeError::Node {
                addr: link.addr().to_owned(),
                status,
                message: String::from_utf8_lossy(&reply.body).into_owned(),
            }),
        }
    }

    /// Sends `req` to `slot`'s node and checks the answer.
    pub(crate) async fn call(
        &self,
        links: &Links,
        slot: &CopySlot,
        req: tessera_proto::Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
    ) -> Result<(), VolumeError> {
        self.call_reply(links, slot, req, payload, crc)
            .await
            .map(|_| ())
    }

    /// Like `call`, returning the body of an `Ok` reply.
    pub(crate) async fn call_reply(
        &self,
        links: &Links,
        slot: &CopySlot,
        req: tessera_proto::Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
    ) -> Result<Vec<u8>, VolumeError> {
        let link = links.get(slot.node);
        let reply = match link.call(req, payload, crc).await {
            Ok(r) => r,
            Err(e) => return Err(self.node_error(slot.node, &link, e)),
        };
        self.check_reply(&reply, &link)?;
        Ok(reply.body)
    }

    /// What a request's connection error means for the volume. A node whose
    /// machine restarted lost what it had not made stable: every copy on it
    /// fails (dirty for everything written since its last flush) before the
    /// link may carry requests again.
    pub(crate) fn node_error(
        &self,
        node: usize,
        link: &crate::link::Link,
        e: crate::conn::ConnError,
    ) -> VolumeError {
        if matches!(e, crate::conn::ConnError::Rebooted { .. }) {
            let layout = self.layout();
            let disks: Vec<Uuid> = layout
                .disks
                .iter()
                .filter(|(_, n, _)| *n == node)
                .map(|(d, _, _)| *d)
                .collect();
            tracing::warn!(
                node = link.addr(),
                ?disks,
                "a node's machine restarted: its copies are resynced"
            );
            for d in disks {
                self.fail_disk(&layout, d);
            }
            link.accept_reboot();
        }
        e.into()
    }

    /// Makes everything written to one copy stable.
    pub(crate) async fn flush_one(
        &self,
        links: &Links,
        slot: &CopySlot,
    ) -> Result<(), VolumeError> {
        let req = tessera_proto::Request::Flush(tessera_proto::DiskRef {
            disk: *slot.disk.as_bytes(),
        });
        self.call(links, slot, req, &[], None).await
    }

    /// Raises the vDisk's epoch on one copy's disk to this writer's (with
    /// the disk's current fence generation). Returns the node's answer:
    /// whether the vDisk's
    /// epoch was last raised there during its machine's current boot (if
    /// not, the machine restarted since the previous writer fenced it, or
    /// it cannot tell, and the copy may lack what that writer acknowledged
    /// and had not flushed), and which chunks the node doubts.
    async fn fence_report(
        &self,
        links: &Links,
        slot: &CopySlot,
    ) -> Result<tessera_proto::FenceReply, VolumeError> {
        let req = tessera_proto::Request::Fence(tessera_proto::VdiskRef {
            vdisk: *self.vdisk.uuid.as_bytes(),
            disk: *slot.disk.as_bytes(),
            epoch: self.wire_epoch(slot),
        });
        let body = self.call_reply(links, slot, req, &[], None).await?;
        tessera_proto::FenceReply::decode(&body).ok_or_else(|| VolumeError::Node {
            addr: links.get(slot.node).addr().to_owned(),
            status: tessera_proto::Status::Invalid,
            message: "the node's fence reply is malformed".into(),
        })
    }

    /// Fences a copy that is not current before its resync, and records
    /// dirty whatever its node doubts (see [`Inner::doubted_chunks`]).
    /// Fails if the fence or the record does.
    pub(crate) async fn fence_for_resync(
        &self,
        links: &Links,
        slot: &CopySlot,
    ) -> Result<(), VolumeError> {
        let reply = self.fence_report(links, slot).await?;
        let (missed, marked) = {
            let layout = self.layout();
            let mut missed = self.doubted_chunks(&layout, slot.disk, &reply);
            // What an earlier writer may have left half-written on this
            // copy (its node's marks): resync copies it from a current one.
            let marked = if self.node_marks {
                self.marked_extents(&reply)
            } else {
                Vec::new()
            };
            missed.extend(
                activity::extent_chunks(&self.vdisk, &marked)
                    .filter(|c| layout.holds(slot.disk, *c)),
            );
            missed.sort_unstable();
            missed.dedup();
            (missed, marked)
        };
        if missed.is_empty() {
            return Ok(());
        }
        if !marked.is_empty() {
            tracing::info!(disk = %slot.disk, extents = marked.len(), "a returning copy's node lists an earlier writer's activity: resyncing those extents");
        }
        let pairs: Vec<(Uuid, u64)> = missed.iter().map(|c| (slot.disk, *c)).collect();
        self.record_dirty(&pairs).await?;
        if reply.marks_lost || !reply.marks.is_empty() {
            // Recorded: the marks of earlier writers may go (this writer's
            // own stay, whatever copy of this node they are for).
            let older = (self.epoch << GENERATION_BITS).saturating_sub(1);
            let one = [slot.clone()];
            self.unmark_on(links, &one, &[], Some(older)).await;
        }
        if reply.doubtful {
            self.dirty
                .lock()
                .expect("dirty poisoned")
                .doubted
                .insert(slot.disk, reply.token);
        }
        Ok(())
    }

    /// The chunks of `disk`'s copy its node doubts (a fence reply said so:
    /// damaged metadata hides where their data is): every chunk the copy
    /// holds if the node doubts the whole copy — unless this writer already
    /// recorded them for the same doubt (the node was not reopened since),
    /// in which case resync is rebuilding them — else the chunks it names.
    pub(crate) fn doubted_chunks(
        &self,
        layout: &Layout,
        disk: Uuid,
        reply: &tessera_proto::FenceReply,
    ) -> Vec<u64> {
        if reply.doubtful {
            let known = self
                .dirty
                .lock()
                .expect("dirty poisoned")
                .doubted
                .get(&disk)
                .copied();
            if known == Some(reply.token) {
                return Vec::new();
            }
            tracing::warn!(%disk, "the copy's node lost metadata that says where its chunks are: rebuilding the whole copy");
            let chunks = self.vdisk.size.div_ceil(self.vdisk.placement.chunk_size);
            return (0..chunks).filter(|c| layout.holds(disk, *c)).collect();
        }
        if !reply.doubted.is_empty() {
            tracing::warn!(%disk, chunks = reply.doubted.len(), "the copy's node lost the records of some chunks: rebuilding them");
        }
        reply
            .doubted
            .iter()
            .copied()
            .filter(|c| layout.holds(disk, *c))
            .collect()
    }

    /// Tells `slot`'s node that every chunk of its copy was rebuilt since
    /// it named its doubt, if it did: it trusts the copy whole again.
    pub(crate) async fn vouch(&self, links: &Links, slot: &CopySlot) -> Result<(), VolumeError> {
        let token = self
            .dirty
            .lock()
            .expect("dirty poisoned")
            .doubted
            .get(&slot.disk)
            .copied();
        let Some(token) = token else {
            return Ok(());
        };
        let req = tessera_proto::Request::Vouch(tessera_proto::VouchRef {
            vref: tessera_proto::VdiskRef {
                vdisk: *self.vdisk.uuid.as_bytes(),
                disk: *slot.disk.as_bytes(),
                epoch: self.wire_epoch(slot),
            },
            token,
        });
        self.call(links, slot, req, &[], None).await?;
        let mut d = self.dirty.lock().expect("dirty poisoned");
        if d.doubted.get(&slot.disk) == Some(&token) {
            d.doubted.remove(&slot.disk);
        }
        tracing::info!(disk = %slot.disk, "every chunk of the doubted copy was rebuilt: its node trusts it again");
        Ok(())
    }

    /// At open: raises the epoch on every copy, whatever its state, so no
    /// request of an older writer lands after this. A copy that cannot be
    /// fenced fails (it is recorded stale). If the previous writer died
    /// with writes in flight (a non-empty activity log), every copy that is
    /// not current and fenced is recorded dirty for the chunks of those
    /// extents: it may have taken some of those writes and not others. So is
    /// a current copy whose machine restarted since the previous writer
    /// fenced it (it lost what its page cache held), as long as its group
    /// has a current copy whose machine did not: if every copy restarted,
    /// they all lost their unflushed writes, and they are made to agree.
    async fn fence_all(&self, links: &Links) -> Result<(), VolumeError> {
        let layout = self.layout();
        let slots = layout.disk_slots();
        let results = join_all(slots.iter().map(|s| self.fence_report(links, s))).await;
        let mut unfenced = Vec::new();
        let mut restarted = Vec::new();
        let mut doubts = Vec::new();
        let mut marked = Vec::new();
        for (slot, r) in slots.iter().zip(results) {
            match r {
                Ok(reply) => {
                    if !reply.same_boot {
                        restarted.push(slot.disk);
                    }
                    if self.node_marks {
                        marked.extend(self.marked_extents(&reply));
                    }
                    if reply.doubtful || !reply.doubted.is_empty() {
                        doubts.push((slot.disk, reply));
                    }
                }
                Err(e @ VolumeError::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(disk = %slot.disk, error = %e, "cannot fence a copy; recording it stale");
                    self.fail_disk(&layout, slot.disk);
                    unfenced.push(slot.disk);
                }
            }
        }
        if !marked.is_empty() {
            marked.sort_unstable();
            marked.dedup();
            tracing::info!(
                extents = marked.len(),
                "the copies' nodes list an earlier writer's activity"
            );
            *self.inherited.lock().expect("inherited poisoned") = marked;
        }
        let inherited = self.inherited_extents();
        let mut missed = Vec::new();
        // A copy whose node doubts some of its chunks is rebuilt: it fails
        // (its group keeps a current copy its node does not doubt; if none
        // is left, the copies stay as they are: each serves what it can,
        // and a chunk none can serve reads as an error), and the doubted
        // chunks are dirty for it.
        let doubted: Vec<Uuid> = doubts.iter().map(|(d, _)| *d).collect();
        for (disk, reply) in &doubts {
            let chunks = self.doubted_chunks(&layout, *disk, reply);
            let sound = |c: &CopySlot| {
                c.disk != *disk
                    && c.health() == CopyHealth::Current
                    && !unfenced.contains(&c.disk)
                    && !doubted.contains(&c.disk)
            };
            let replaceable = layout
                .groups
                .iter()
                .filter(|g| g.iter().any(|c| c.disk == *disk))
                .all(|g| g.iter().any(sound));
            if !replaceable && layout.disk_any(*disk, |h| h == CopyHealth::Current) {
                tracing::error!(%disk, "a copy's node doubts some of its chunks, and no other copy can replace it: the chunks it cannot read stay errors");
                continue;
            }
            self.fail_disk(&layout, *disk);
            missed.extend(chunks.into_iter().map(|c| (*disk, c)));
            if reply.doubtful {
                self.dirty
                    .lock()
                    .expect("dirty poisoned")
                    .doubted
                    .insert(*disk, reply.token);
            }
        }
        if !inherited.is_empty() {
            for (g, copies) in layout.groups.iter().enumerate() {
                let kept = |c: &CopySlot| {
                    c.health() == CopyHealth::Current
                        && !unfenced.contains(&c.disk)
                        && !restarted.contains(&c.disk)
                };
                let trust_restarted = !copies.iter().any(kept);
                for c in copies {
                    if c.health() == CopyHealth::Current
                        && !unfenced.contains(&c.disk)
                        && (trust_restarted || !restarted.contains(&c.disk))
                    {
                        continue;
                    }
                    if c.health() == CopyHealth::Current {
                        tracing::warn!(disk = %c.disk, "a copy's machine restarted since the last writer fenced it: resyncing what that writer had in flight");
                        self.fail_slot(&layout, c);
                    }
                    for chunk in activity::extent_chunks(&self.vdisk, &inherited) {
                        if layout.group_index(chunk) == g {
                            missed.push((c.disk, chunk));
                        }
                    }
                }
            }
        }
        drop(layout);
        self.record_dirty(&missed).await?;
        self.check_groups()
    }

    /// Fails if a group has no current copy left: its data is unreachable.
    /// (Below the policy's minimum but above zero, the volume stays open and
    /// readable; writes wait for copies to come back, bounded, then fail.)
    fn check_groups(&self) -> Result<(), VolumeError> {
        for (g, copies) in self.layout().groups.iter().enumerate() {
            let current = copies
                .iter()
                .filter(|c| c.health() == CopyHealth::Current)
                .count();
            if current == 0 {
                return Err(VolumeError::Degraded {
                    group: g,
                    current,
                    needed: self.min_copies,
                });
            }
        }
        Ok(())
    }

    /// Flushes every copy that holds acknowledged writes. Succeeds once
    /// every group has at least `min_copies` current copies that made
    /// everything acknowledged before the call stable.
    pub(crate) async fn flush(&self, links: &Links) -> Result<(), VolumeError> {
        self.flush_with(links, self.min_copies).await
    }

    /// Like `flush`, with `needed` stable current copies per group (the
    /// volume's own flushes — reconciling, cooling the activity log — need
    /// only the copies there are: those that fail are recorded stale).
    pub(crate) async fn flush_with(&self, links: &Links, needed: usize) -> Result<(), VolumeError> {
        // Writes acknowledged before this point are covered.
        let covered = self.seq.fetch_add(1, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.config.degraded_wait;
        loop {
            let layout = self.layout();
            let slots: Vec<CopySlot> = layout
                .disk_slots()
                .into_iter()
                .filter(|s| layout.disk_any(s.disk, |h| h.takes_flushes()))
                .collect();
            let results = join_all(slots.iter().map(|s| self.flush_one(links, s))).await;
            let mut stable = Vec::new();
            let mut fenced = None;
            for (slot, r) in slots.iter().zip(results) {
                match r {
                    Ok(()) => stable.push(slot.disk),
                    Err(e @ VolumeError::Fenced { .. }) => fenced = Some(e),
                    Err(e) => {
                        tracing::warn!(disk = %slot.disk, error = %e, "flush failed on a copy");
                        self.fail_disk(&layout, slot.disk);
                    }
                }
            }
            if let Some(e) = fenced {
                return Err(e);
            }
            let short = layout.groups.iter().enumerate().find_map(|(g, copies)| {
                let ok = copies
                    .iter()
                    .filter(|c| c.health() == CopyHealth::Current && stable.contains(&c.disk))
                    .count();
                (ok < needed).then_some((g, ok))
            });
            drop(layout);
            // Copies that failed are recorded stale, with everything they
            // may have lost, before the flush answers.
            self.record_dirty(&[]).await?;
            match short {
                None => {
                    self.forget_unflushed(covered);
                    self.activity
                        .flushed_upto
                        .fetch_max(covered, Ordering::SeqCst);
                    return Ok(());
                }
                Some((group, current)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(VolumeError::Degraded {
                            group,
                            current,
                            needed,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

impl Renewer {
    fn start(inner: Arc<Inner>) -> Self {
        let (repair_stop, repair_task) = if inner.config.repair {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(inner.clone().repair_loop(rx));
            (Some(tx), Some(task))
        } else {
            (None, None)
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let period = inner.config.lease_ttl / 3;
        tokio::spawn(async move {
            let mut wait = period;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut rx => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                // A failed renewal is tried again soon, not a period later.
                wait = Duration::from_millis(200).min(period);
                let renewed = inner
                    .config
                    .zone
                    .renew(
                        &inner.config.datastore,
                        &inner.config.name,
                        &SessionRef {
                            session: inner.session,
                            ttl_ms: Some(inner.config.lease_ttl.as_millis() as u64),
                            keep_activity: false,
                            settled: Some(inner.settled.load(Ordering::Acquire)),
                        },
                    )
                    .await;
                match renewed {
                    Ok(r) => {
                        wait = period;
                        if r.placement_version > inner.layout().version {
                            if let Err(e) = inner.refresh_placement().await {
                                tracing::warn!(error = %e, "cannot adopt the new placement; will retry");
                            }
                        }
                    }
                    Err(e) if e.means_fenced() => {
                        let _ = inner.zone_error(e);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed; will retry"),
                }
            }
        });
        Renewer {
            stop: std::sync::Mutex::new(Some(tx)),
            repair_stop: std::sync::Mutex::new(repair_stop),
            repair_task: std::sync::Mutex::new(repair_task),
        }
    }

    fn stop(&self) {
        self.stop_repair();
        if let Some(tx) = self.stop.lock().expect("renewer poisoned").take() {
            let _ = tx.send(());
        }
    }

    fn stop_repair(&self) {
        if let Some(tx) = self.repair_stop.lock().expect("renewer poisoned").take() {
            let _ = tx.send(());
        }
    }

    /// Stops repair and waits until it no longer touches any copy.
    async fn finish_repair(&self) {
        self.stop_repair();
        let task = self.repair_task.lock().expect("renewer poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Cuts the concatenation of `bufs` into consecutive pieces of `lens` bytes,
/// each a list of sub-slices of the original buffers.
fn split_mut<'a>(
    bufs: &'a mut [&mut [u8]],
    lens: impl Iterator<Item = usize>,
) -> Vec<Vec<&'a mut [u8]>> {
    let mut rest = bufs.iter_mut().map(|b| &mut **b);
    let mut current: &'a mut [u8] = &mut [];
    let mut out = Vec::new();
    for len in lens {
        let mut piece = Vec::new();
        let mut need = len;
        while need > 0 {
            if current.is_empty() {
                match rest.next() {
                    Some(b) => current = b,
                    None => break,
                }
                continue;
            }
            let n = need.min(current.len());
            let (head, tail) = std::mem::take(&mut current).split_at_mut(n);
            piece.push(head);
            current = tail;
            need -= n;
        }
        out.push(piece);
    }
    out
}

/// Walks a list of buffers, handing out sub-slices of given lengths.
struct SliceCursor<'a, 'b> {
    bufs: &'b [&'a [u8]],
    index: usize,
    offset: usize,
}

impl<'a, 'b> SliceCursor<'a, 'b> {
    fn new(bufs: &'b [&'a [u8]]) -> Self {
        SliceCursor {
            bufs,
            index: 0,
            offset: 0,
        }
    }

    /// The next `len` bytes as slices of the original buffers.
    fn take(&mut self, mut len: usize) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while len > 0 && self.index < self.bufs.len() {
            let buf: &'a [u8] = self.bufs[self.index];
            let avail = &buf[self.offset..];
            let n = avail.len().min(len);
            out.push(&avail[..n]);
            len -= n;
            self.offset += n;
            if self.offset == buf.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_mut_cuts_across_buffers() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut bufs: [&mut [u8]; 2] = [&mut a, &mut b];
        let pieces = split_mut(&mut bufs, [2usize, 4, 2].into_iter());
        let lens: Vec<Vec<usize>> = pieces
            .iter()
            .map(|p| p.iter().map(|s| s.len()).collect())
            .collect();
        assert_eq!(lens, vec![vec![2], vec![1, 3], vec![2]]);
    }

    #[test]
    fn cursor_splits_across_buffers() {
        let a = [1u8; 3];
        let b = [2u8; 5];
        let bufs: [&[u8]; 2] = [&a, &b];
        let mut c = SliceCursor::new(&bufs);
        let first: Vec<u8> = c.take(4).concat();
        assert_eq!(first, vec![1, 1, 1, 2]);
        let second: Vec<u8> = c.take(4).concat();
        assert_eq!(second, vec![2, 2, 2, 2]);
        assert!(c.take(1).is_empty());
    }
}
