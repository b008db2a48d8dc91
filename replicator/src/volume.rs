//! The volume client: a vDisk's byte address space over its chunks' copies.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::{join_all, try_join_all};
use tessera_api_client::ApiClient;
use tessera_proto::{ChunkRange, DiskRef, Frame, Header, Request, Status};
use tessera_zone::records::{Vdisk, SECTOR_SIZE};
use tessera_zone::service::{MarkStale, OpenVdisk, SessionRef};
use uuid::Uuid;

mod activity;
mod placement;
mod repair;

pub use repair::ScrubReport;

use crate::conn::NodeLink;
use crate::layout::{split, Piece};
use crate::shm::{SharedMemory, SharedRegion};
use crate::VolumeError;

use placement::{Layout, Links};

/// How to open a vDisk.
#[derive(Clone)]
pub struct VolumeConfig {
    pub api: ApiClient,
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
    pub fn new(api: ApiClient, datastore: &str, name: &str, host: &str) -> Self {
        VolumeConfig {
            api,
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
struct Copy {
    disk: Uuid,
    /// Index of the node in the volume's node list (and its connections).
    node: usize,
    local: bool,
    /// The target of a move into this group: its state is its own.
    target: bool,
    /// Shared by every group position on the same disk (but a move target's).
    state: Arc<CopyState>,
}

/// Whether a disk's copies of the vDisk are current.
struct CopyState(AtomicU8);

const CURRENT: u8 = 0;
/// Missed a write; the zone does not know yet. Nothing is acknowledged
/// without that copy until the zone records it stale.
const FAILING: u8 = 1;
/// Recorded stale in the zone: no reads, no writes until resynced.
const STALE: u8 = 2;
/// Stale and being resynced: no reads; writes to chunks it is not missing
/// go to it too (so what resync copied stays copied), and flushes.
const SYNCING: u8 = 3;

impl CopyState {
    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    /// A current or resyncing copy missed a write or a flush: it goes
    /// (back) to stale once the zone records it.
    fn fail(&self) {
        for from in [CURRENT, SYNCING] {
            if self
                .0
                .compare_exchange(from, FAILING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }
}

struct Inner {
    config: VolumeConfig,
    /// The vDisk record as of the open (its placement may have changed
    /// since: see `layout`).
    vdisk: Vdisk,
    epoch: u64,
    session: Uuid,
    /// Which disks hold each group's copies, replaced whole when the zone
    /// moves a copy (rebuild, drain, rebalance).
    layout: ArcSwap<Layout>,
    /// Addresses of every node a layout has used, by node index (only grows).
    nodes: Arc<std::sync::RwLock<Vec<crate::conn::NodeAddr>>>,
    /// Memory the device adapter shares with the nodes on this host.
    shm: Arc<SharedMemory>,
    /// Serialises layout changes.
    adopting: tokio::sync::Mutex<()>,
    /// Fewest current copies a write needs.
    min_copies: usize,
    /// Identifies this open to the nodes (the session id).
    client: [u8; 16],
    /// Serialises dirty/clean records in the zone.
    pub(crate) recording: tokio::sync::Mutex<()>,
    /// Which chunks each stale copy misses, as far as the zone knows, and
    /// what is waiting to be recorded. Touched only while a copy is stale.
    pub(crate) dirty: std::sync::Mutex<DirtyState>,
    /// Per-chunk exclusion between writes and resync, striped; taken only
    /// by writes to groups that have a non-current copy.
    pub(crate) stripes: Vec<tokio::sync::RwLock<()>>,
    /// Every handle's chunks written since its last flush.
    forks: std::sync::Mutex<Vec<std::sync::Weak<ForkState>>>,
    /// Chunks resync copied, for reports.
    pub(crate) resynced_chunks: AtomicU64,
    /// Extents that may have writes in flight (the activity log).
    activity: activity::Activity,
    /// Chunks the open rewrote to make copies agree after a writer crash.
    reconciled_chunks: AtomicU64,
    /// Set once a node or the zone says another writer took over.
    fenced: AtomicBool,
    fenced_by: AtomicU64,
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

/// A handle's own bookkeeping.
#[derive(Default)]
pub(crate) struct ForkState {
    /// Chunks this handle wrote that no flush has made stable yet: if a copy
    /// fails, it may have lost them (power loss), so they become dirty.
    unflushed: std::sync::Mutex<HashSet<u64>>,
}

/// Dirty chunks of stale copies.
#[derive(Default)]
pub(crate) struct DirtyState {
    /// Recorded in the zone (or being copied by resync).
    pub(crate) known: HashMap<Uuid, HashSet<u64>>,
    /// Waiting to be recorded.
    pub(crate) pending: Vec<(Uuid, u64)>,
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
            .api
            .open_vdisk(
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
        let client = *opened.session.as_bytes();
        let nodes = Arc::new(std::sync::RwLock::new(Vec::new()));
        let layout = Layout::build(
            &opened.vdisk,
            &nodes,
            None,
            placement::locator(&opened.disks, &opened.nodes, &config.host),
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
            resynced_chunks: AtomicU64::new(0),
            activity: activity::Activity::new(
                opened.vdisk.size,
                opened.vdisk.placement.chunk_size,
                &[],
            ),
            reconciled_chunks: AtomicU64::new(0),
            layout: ArcSwap::from_pointee(layout),
            nodes,
            shm: Arc::default(),
            adopting: tokio::sync::Mutex::new(()),
            min_copies,
            recording: tokio::sync::Mutex::new(()),
            vdisk: opened.vdisk,
            epoch: opened.epoch,
            session: opened.session,
            client,
            fenced: AtomicBool::new(false),
            fenced_by: AtomicU64::new(0),
            config,
        });
        let links = Arc::new(inner.connect());
        inner.fence_all(&links).await?;
        // The previous writer died with writes in flight: make the copies of
        // the extents it was writing agree before serving anything.
        if !inner.vdisk.activity.is_empty() {
            let extents = inner.vdisk.activity.clone();
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

    /// A handle on the same open vDisk (lease, epoch, copy states) with
    /// connections of its own to the nodes.
    /// Lists the regions of this process's memory, backed by files, that
    /// storage nodes on this host may map: reads and writes whose buffers
    /// lie in them skip the socket (see [`crate::SharedRegion`]). Replaces
    /// the previous list; call it before memory it no longer lists can be
    /// unmapped.
    pub fn share_memory(&self, regions: Vec<SharedRegion>) {
        self.inner.shm.set(regions);
    }

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
            .all(|(_, _, st)| st.get() == CURRENT)
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
        let dests = split_mut(bufs, pieces.iter().map(|p| p.len as usize));
        let reads =
            pieces
                .into_iter()
                .zip(dests)
                .map(|(p, mut dest)| async move {
                    inner.read_piece(&self.links, p, &mut dest, copy).await
                });
        try_join_all(reads).await?;
        Ok(())
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
        // A fenced writer's view is gone: another host owns the vDisk now.
        inner.check_fenced()?;
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        inner.check_range(offset, len)?;
        inner.check_fenced()?;
        let pieces = split(offset, len, inner.vdisk.placement.chunk_size);
        let mut cursor = SliceCursor::new(bufs);
        let mut writes = Vec::with_capacity(pieces.len());
        for p in pieces {
            let slices = cursor.take(p.len as usize);
            writes.push(inner.write_piece(&self.links, &self.fork, p, slices));
        }
        try_join_all(writes).await?;
        Ok(())
    }

    /// Makes every write acknowledged before this call stable on every
    /// current copy. A copy that fails the flush is recorded stale (it may
    /// have lost acknowledged writes); the flush fails only if a group is
    /// left with fewer current copies than the policy's minimum.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        let inner = &self.inner;
        inner.check_fenced()?;
        // What this flush makes stable; put back if a copy fails it.
        let taken = inner.take_unflushed();
        let layout = inner.layout();
        // A copy being resynced holds acknowledged writes too.
        let current = layout.disks_where(|st| matches!(st, CURRENT | SYNCING));
        let links = &self.links;
        let results = join_all(
            current
                .iter()
                .map(|(disk, node)| inner.flush_one(links, *disk, *node)),
        )
        .await;
        let mut failed = false;
        for ((disk, _), r) in current.iter().zip(results) {
            match r {
                Ok(()) => {}
                Err(e @ VolumeError::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(%disk, error = %e, "flush failed on a copy");
                    layout.fail_disk(*disk);
                    failed = true;
                }
            }
        }
        if failed {
            for (fork, set) in taken {
                fork.unflushed
                    .lock()
                    .expect("unflushed poisoned")
                    .extend(set);
            }
        }
        drop(current);
        drop(layout);
        inner.record_dirty(&[]).await?;
        inner.check_groups()
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
        inner.check_fenced()?;
        let pieces = split(offset, len, inner.vdisk.placement.chunk_size);
        try_join_all(pieces.into_iter().map(|p| {
            let range = inner.range(&p, Uuid::nil());
            inner.update_piece(
                &self.links,
                &self.fork,
                p,
                move |disk| {
                    let r = ChunkRange {
                        disk: *disk.as_bytes(),
                        ..range
                    };
                    if discard {
                        Request::Discard(r)
                    } else {
                        Request::WriteZeroes(r)
                    }
                },
                &[],
            )
        }))
        .await?;
        Ok(())
    }

    /// Flushes, releases the write lease and closes the connections.
    pub async fn close(self) -> Result<(), VolumeError> {
        self.renewer.finish_repair().await;
        let flushed = if self.is_fenced() {
            Ok(())
        } else {
            self.flush().await
        };
        self.renewer.stop();
        let inner = &self.inner;
        let released = inner
            .config
            .api
            .close_vdisk(
                &inner.config.datastore,
                &inner.config.name,
                &SessionRef {
                    session: inner.session,
                    ttl_ms: None,
                },
            )
            .await;
        self.links.close_all().await;
        flushed?;
        released?;
        Ok(())
    }
}

impl Inner {
    fn new_fork(&self) -> Arc<ForkState> {
        let fork = Arc::new(ForkState::default());
        let mut forks = self.forks.lock().expect("forks poisoned");
        forks.retain(|f| f.strong_count() > 0);
        forks.push(Arc::downgrade(&fork));
        fork
    }

    fn live_forks(&self) -> Vec<Arc<ForkState>> {
        self.forks
            .lock()
            .expect("forks poisoned")
            .iter()
            .filter_map(|f| f.upgrade())
            .collect()
    }

    /// Every live handle's unflushed chunks, taken out (a flush in progress).
    fn take_unflushed(&self) -> Vec<(Arc<ForkState>, HashSet<u64>)> {
        self.live_forks()
            .into_iter()
            .map(|f| {
                let set = std::mem::take(&mut *f.unflushed.lock().expect("unflushed poisoned"));
                (f, set)
            })
            .collect()
    }

    /// Every live handle's unflushed chunks (a copy just failed).
    fn all_unflushed(&self) -> HashSet<u64> {
        let mut all = HashSet::new();
        for f in self.live_forks() {
            all.extend(
                f.unflushed
                    .lock()
                    .expect("unflushed poisoned")
                    .iter()
                    .copied(),
            );
        }
        all
    }

    /// Whether `disk` misses `chunk` (recorded or about to be).
    fn is_dirty(&self, disk: Uuid, chunk: u64) -> bool {
        let d = self.dirty.lock().expect("dirty poisoned");
        d.known.get(&disk).is_some_and(|k| k.contains(&chunk)) || d.pending.contains(&(disk, chunk))
    }

    /// Fresh (lazily connecting) links to every node.
    fn connect(&self) -> Links {
        Links::new(
            self.nodes.clone(),
            self.shm.clone(),
            self.client,
            self.config.io_timeout,
        )
    }

    /// The current layout; held only for the span of one operation (a
    /// layout change waits for operations on the old one to finish).
    pub(super) fn layout(&self) -> Arc<Layout> {
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

    /// Makes everything written to one copy stable.
    async fn flush_one(&self, links: &Links, disk: Uuid, node: usize) -> Result<(), VolumeError> {
        let link = &*links.get(node);
        let frame = link
            .call(
                Request::Flush(DiskRef {
                    disk: *disk.as_bytes(),
                }),
                &[],
            )
            .await?;
        self.check_reply(&frame, link)
    }

    /// A zone refusal for a lost lease (code lease_lost) means this writer is fenced.
    pub(crate) fn api_error(&self, err: tessera_api_client::ApiError) -> VolumeError {
        if matches!(err, tessera_api_client::ApiError::LeaseLost { .. }) {
            self.fenced.store(true, Ordering::Release);
            return VolumeError::Fenced {
                epoch: self.epoch,
                by: self.fenced_by.load(Ordering::Acquire),
            };
        }
        err.into()
    }

    fn check_fenced(&self) -> Result<(), VolumeError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(VolumeError::Fenced {
                epoch: self.epoch,
                by: self.fenced_by.load(Ordering::Acquire),
            });
        }
        Ok(())
    }

    fn range(&self, p: &Piece, disk: Uuid) -> ChunkRange {
        ChunkRange {
            vdisk: *self.vdisk.uuid.as_bytes(),
            disk: *disk.as_bytes(),
            chunk: p.chunk,
            offset: p.offset,
            len: p.len,
            epoch: self.epoch,
        }
    }

    /// Turns a reply's status into a result, noting a fence.
    fn check_reply(&self, frame: &Frame, node: &NodeLink) -> Result<(), VolumeError> {
        self.check_status(&frame.header, &frame.body, node)
    }

    /// Turns a reply's status into a result, noting a fence.
    fn check_status(
        &self,
        header: &Header,
        body: &[u8],
        node: &NodeLink,
    ) -> Result<(), VolumeError> {
        match header.status() {
            Status::Ok => Ok(()),
            Status::StaleEpoch => {
                let by = body
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(0);
                self.fenced_by.fetch_max(by, Ordering::AcqRel);
                self.fenced.store(true, Ordering::Release);
                tracing::error!(epoch = self.epoch, by, "vDisk taken over by another writer");
                Err(VolumeError::Fenced {
                    epoch: self.epoch,
                    by,
                })
            }
            status => Err(VolumeError::Node {
                addr: node.addr.clone(),
                status,
                message: String::from_utf8_lossy(body).into_owned(),
            }),
        }
    }

    /// Raises the epoch on every current copy; unreachable copies are
    /// recorded stale (they will refuse this writer's predecessor anyway
    /// once resynced, as resync carries the new epoch).
    async fn fence_all(&self, links: &Links) -> Result<(), VolumeError> {
        let layout = self.layout();
        let current = layout.disks_where(|st| st == CURRENT);
        let results = join_all(
            current
                .iter()
                .map(|(disk, node)| self.fence_one(links, *disk, *node)),
        )
        .await;
        for ((disk, _), r) in current.iter().zip(results) {
            match r {
                Ok(()) => {}
                Err(e @ VolumeError::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(%disk, error = %e, "cannot fence a copy; recording it stale");
                    layout.fail_disk(*disk);
                }
            }
        }
        drop(current);
        drop(layout);
        self.record_dirty(&[]).await?;
        self.check_groups()
    }

    /// Records in the zone that `missed` (disk, chunk) pairs are dirty, and
    /// every failing copy stale with the chunks it may have lost (those not
    /// yet flushed). Returns once the zone holds all of it, so writes that
    /// skipped those copies may then be acknowledged. Concurrent callers are
    /// batched into one record.
    pub(crate) async fn record_dirty(&self, missed: &[(Uuid, u64)]) -> Result<(), VolumeError> {
        let any_failing = || {
            self.layout()
                .disks
                .iter()
                .any(|(_, _, st)| st.get() == FAILING)
        };
        {
            let mut d = self.dirty.lock().expect("dirty poisoned");
            let DirtyState { known, pending } = &mut *d;
            let new: Vec<(Uuid, u64)> = missed
                .iter()
                .filter(|(disk, c)| !known.get(disk).is_some_and(|k| k.contains(c)))
                .copied()
                .collect();
            if new.is_empty() && !any_failing() {
                return Ok(());
            }
            pending.extend(new);
        }
        let _one = self.recording.lock().await;
        let layout = self.layout();
        let failing: Vec<Uuid> = layout
            .disks
            .iter()
            .filter(|(_, _, st)| st.get() == FAILING)
            .map(|(d, _, _)| *d)
            .collect();
        let mut batch: HashMap<Uuid, HashSet<u64>> = HashMap::new();
        for (disk, c) in std::mem::take(&mut self.dirty.lock().expect("dirty poisoned").pending) {
            // A disk that left the placement meanwhile holds nothing to record.
            if layout.has_disk(disk) {
                batch.entry(disk).or_default().insert(c);
            }
        }
        if !failing.is_empty() {
            let unflushed = self.all_unflushed();
            for d in &failing {
                let set = batch.entry(*d).or_default();
                set.extend(unflushed.iter().copied().filter(|c| layout.holds(*d, *c)));
            }
        }
        drop(layout);
        for (disk, chunks) in &batch {
            let mut chunks: Vec<u64> = chunks.iter().copied().collect();
            chunks.sort_unstable();
            let recorded = self
                .config
                .api
                .mark_stale(
                    &self.config.datastore,
                    &self.config.name,
                    &MarkStale {
                        session: self.session,
                        disks: vec![*disk],
                        chunks: chunks.clone(),
                    },
                )
                .await;
            match recorded {
                Ok(_) => {}
                Err(tessera_api_client::ApiError::LeaseLost { .. }) => {
                    self.fenced.store(true, Ordering::Release);
                    return Err(VolumeError::Fenced {
                        epoch: self.epoch,
                        by: self.fenced_by.load(Ordering::Acquire),
                    });
                }
                Err(e) => {
                    // Not recorded: put them back for the next attempt.
                    let mut d = self.dirty.lock().expect("dirty poisoned");
                    d.pending.extend(chunks.iter().map(|c| (*disk, *c)));
                    return Err(e.into());
                }
            }
            self.dirty
                .lock()
                .expect("dirty poisoned")
                .known
                .entry(*disk)
                .or_default()
                .extend(chunks);
        }
        for (d, _, st) in &self.layout().disks {
            if failing.contains(d)
                && st
                    .0
                    .compare_exchange(FAILING, STALE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                tracing::warn!(disk = %d, "copy recorded stale: it serves nothing until resynced");
            }
        }
        Ok(())
    }

    /// Fails if a group has no current copy left: its data is unreachable.
    /// (Below the policy's minimum but above zero, the volume stays open and
    /// readable; writes wait for copies to come back, bounded, then fail.)
    fn check_groups(&self) -> Result<(), VolumeError> {
        for (g, copies) in self.layout().groups.iter().enumerate() {
            let current = copies.iter().filter(|c| c.state.get() == CURRENT).count();
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

    async fn read_piece(
        &self,
        links: &Links,
        p: Piece,
        out: &mut [&mut [u8]],
        only: Option<usize>,
    ) -> Result<(), VolumeError> {
        let layout = self.layout();
        let copies = layout.group(p.chunk);
        if only.is_some_and(|c| c >= copies.len()) {
            return Err(VolumeError::NoSuchCopy(only.unwrap_or(0)));
        }
        let first = match only {
            Some(c) => c,
            None => layout.read_first[layout.group_index(p.chunk)],
        };
        let tries = if only.is_some() { 1 } else { copies.len() };
        let mut last_err = None;
        let mut corrupt: Vec<Uuid> = Vec::new();
        for i in 0..tries {
            let c = &copies[(first + i) % copies.len()];
            if only.is_none() && c.state.get() != CURRENT {
                continue;
            }
            let range = self.range(&p, c.disk);
            let link = &*links.get(c.node);
            let result = match link.call_read(Request::Read(range), out).await {
                Ok((header, body)) => self.check_status(&header, &body, link),
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(()) => {
                    if !corrupt.is_empty() {
                        // The copies whose checksums failed are repaired by
                        // resync: dirty for this chunk, stale until rewritten.
                        for d in &corrupt {
                            if let Some(c) = copies.iter().find(|c| c.disk == *d) {
                                let _ = c.state.0.compare_exchange(
                                    CURRENT,
                                    FAILING,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                );
                            }
                        }
                        let missed: Vec<(Uuid, u64)> =
                            corrupt.iter().map(|d| (*d, p.chunk)).collect();
                        drop(layout);
                        if let Err(e) = self.record_dirty(&missed).await {
                            tracing::warn!(error = %e, "cannot record a corrupt copy for repair");
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(chunk = p.chunk, disk = %c.disk, error = %e, "read from copy failed");
                    if matches!(
                        e,
                        VolumeError::Node {
                            status: Status::Checksum,
                            ..
                        }
                    ) && only.is_none()
                    {
                        corrupt.push(c.disk);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(VolumeError::Degraded {
            group: layout.group_index(p.chunk),
            current: 0,
            needed: 1,
        }))
    }

    async fn write_piece(
        &self,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        data: Vec<&[u8]>,
    ) -> Result<(), VolumeError> {
        let range = self.range(&p, Uuid::nil());
        self.update_piece(
            links,
            fork,
            p,
            move |disk| {
                Request::Write(
                    ChunkRange {
                        disk: *disk.as_bytes(),
                        ..range
                    },
                    &[],
                )
            },
            &data,
        )
        .await
    }

    /// Sends a mutation of one chunk to every current copy. Copies that
    /// fail are recorded stale, and the chunk dirty for every copy that did
    /// not get it, before the mutation is acknowledged; it is acknowledged
    /// only if at least the policy's minimum of copies hold it.
    async fn update_piece<'a>(
        &self,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        request: impl Fn(Uuid) -> Request<'a>,
        payload: &[&[u8]],
    ) -> Result<(), VolumeError> {
        let _active = self.enter_extent(p.chunk).await?;
        // Held to the end: a layout change waits for this write.
        let layout = self.layout();
        let copies = layout.group(p.chunk);
        // With a copy missing, exclude resync of this chunk while we write it.
        let degraded = copies.iter().any(|c| c.state.get() != CURRENT);
        let mut exclusion = if degraded {
            Some(self.stripes[stripe(p.chunk)].read().await)
        } else {
            None
        };
        let group = layout.group_index(p.chunk);
        let deadline = Instant::now() + self.config.degraded_wait;
        // Disks that hold this write, and how many of them are current.
        let mut held: Vec<Uuid> = Vec::with_capacity(copies.len());
        let mut held_current;
        loop {
            let targets: Vec<&Copy> = copies
                .iter()
                .filter(|c| !held.contains(&c.disk))
                .filter(|c| match c.state.get() {
                    CURRENT => true,
                    // Under the stripe lock, so resync cannot be copying
                    // this chunk: a copy that has it gets the write too.
                    SYNCING => !self.is_dirty(c.disk, p.chunk),
                    _ => false,
                })
                .collect();
            // The payload's checksum, once for every copy (a retry after a
            // payload changed in transit computes it again). A write to one
            // copy leaves it to the connection: a local session's node
            // checksums its own private copy of the data instead.
            let crc = (!payload.is_empty() && targets.len() > 1)
                .then(|| crate::conn::payload_crc(payload));
            let results = join_all(targets.iter().map(|c| {
                let req = request(c.disk);
                async move {
                    let link = links.get(c.node);
                    let mut attempt = 0;
                    loop {
                        let crc = if attempt == 0 { crc } else { None };
                        let frame = link.call_crc(req, payload, crc).await?;
                        // A payload that changed under us in transit (a guest
                        // rewriting a buffer it has in flight) is refused whole
                        // by the node; send it again.
                        if frame.header.status() == Status::BadPayload && attempt < 3 {
                            attempt += 1;
                            continue;
                        }
                        return self.check_reply(&frame, &link);
                    }
                }
            }))
            .await;
            for (c, r) in targets.iter().zip(results) {
                match r {
                    Ok(()) => held.push(c.disk),
                    Err(e @ VolumeError::Fenced { .. }) => return Err(e),
                    Err(
                        e @ VolumeError::Node {
                            status: Status::BadPayload,
                            ..
                        },
                    ) => return Err(e),
                    Err(e) => {
                        tracing::warn!(chunk = p.chunk, disk = %c.disk, error = %e, "copy missed a write");
                        c.state.fail();
                    }
                }
            }
            // A resyncing copy that took the write counts once it is current.
            held_current = copies
                .iter()
                .filter(|c| held.contains(&c.disk) && c.state.get() == CURRENT)
                .count();
            if held_current >= self.min_copies {
                break;
            }
            // Below the policy's minimum: wait, bounded, for a copy to be
            // current again (a returning node's resync), then fail rather
            // than acknowledge what is not safe.
            if Instant::now() >= deadline {
                // Some copies have it: the others must not pass for equal.
                // If only resyncing copies have it, they copy it again.
                let missed: Vec<(Uuid, u64)> = copies
                    .iter()
                    .filter(|c| (held_current > 0) != held.contains(&c.disk))
                    .map(|c| (c.disk, p.chunk))
                    .collect();
                if !held.is_empty() {
                    if let Err(e) = self.record_dirty(&missed).await {
                        tracing::warn!(error = %e, "cannot record copies that missed a failed write");
                    }
                }
                return Err(VolumeError::Degraded {
                    group,
                    current: held_current,
                    needed: self.min_copies,
                });
            }
            // Let resync take this chunk meanwhile; it works on copies the
            // zone knows stale, so record the ones that just failed.
            drop(exclusion.take());
            if let Err(e @ VolumeError::Fenced { .. }) = self.record_dirty(&[]).await {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            exclusion = Some(self.stripes[stripe(p.chunk)].read().await);
        }
        fork.unflushed
            .lock()
            .expect("unflushed poisoned")
            .insert(p.chunk);
        // Every copy without this write must be known to miss it first.
        let missed: Vec<(Uuid, u64)> = copies
            .iter()
            .filter(|c| c.state.get() != CURRENT && !held.contains(&c.disk))
            .map(|c| (c.disk, p.chunk))
            .collect();
        if !missed.is_empty() {
            self.record_dirty(&missed).await?;
        }
        Ok(())
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
            loop {
                tokio::select! {
                    _ = &mut rx => return,
                    _ = tokio::time::sleep(period) => {}
                }
                let renewed = inner
                    .config
                    .api
                    .renew_vdisk(
                        &inner.config.datastore,
                        &inner.config.name,
                        &SessionRef {
                            session: inner.session,
                            ttl_ms: Some(inner.config.lease_ttl.as_millis() as u64),
                        },
                    )
                    .await;
                match renewed {
                    Ok(r) => {
                        if r.placement_version > inner.layout().version {
                            if let Err(e) = inner.refresh_placement().await {
                                tracing::warn!(error = %e, "cannot adopt the new placement; will retry");
                            }
                        }
                    }
                    Err(tessera_api_client::ApiError::LeaseLost { message }) => {
                        tracing::error!(%message, "write lease lost; refusing further writes");
                        inner.fenced.store(true, Ordering::Release);
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
