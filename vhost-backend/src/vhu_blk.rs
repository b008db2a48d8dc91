//! The vhost-user glue: the `VhostUserBackend` of a virtio-blk device.
//!
//! Each queue has its own worker thread (the vhost-user-backend epoll
//! loop) and its own single-threaded async runtime, which that thread
//! drives. On a kick the worker pops every available chain, parses it, and
//! starts each valid request as a task of the queue's runtime; then it runs
//! the runtime, watching the queue's kick itself, until none of the queue's
//! requests is in flight, and goes back to the epoll loop. A request's
//! connections to the storage nodes belong to the same runtime, so sending
//! it, its reply and its completion all happen on the queue's thread: no
//! hand-off between threads on the I/O path (on two cores, every thread
//! wake-up costs about as much CPU as the request itself).
//! The task that runs a request writes its status and adds the request to
//! its queue's completion list. Completions are put on the used ring in
//! batches: the task that finds the list idle becomes its drainer, lets the
//! other ready tasks run first (their completions join the list), then takes
//! the vring lock once for the whole list and signals the guest once
//! (subject to EVENT_IDX suppression). Requests of one queue share nothing
//! with other queues but the disk: the only locks on the I/O path are the
//! queue's own vring lock, completion list and in-flight counter.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::DeviceConfig;
use crate::device::execute;
use crate::disk::BlockDisk;
use crate::request::{ParseError, Request, RequestError};

type Mem = GuestMemoryMmap<()>;

/// The file-backed regions of guest memory, as the disk shares them.
fn shared_regions(mem: &Mem) -> Vec<tessera_replicator::SharedRegion> {
    mem.iter()
        .filter_map(|r| {
            let file = r.file_offset()?;
            let addr = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some(tessera_replicator::SharedRegion {
                addr: addr as usize,
                len: usize::try_from(r.len()).ok()?,
                file: file.arc().clone(),
                offset: file.start(),
            })
        })
        .collect()
}
type MemGuard = GuestMemoryLoadGuard<Mem>;

/// Requests of one queue not yet on its used ring.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    /// Only for waiting: taken by the waiter and by the finisher that
    /// brings the count to zero.
    lock: Mutex<()>,
    drained: Condvar,
    /// Wakes the queue's worker when the count reaches zero.
    idle: tokio::sync::Notify,
}

impl InFlight {
    fn start(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn finish(&self, n: usize) {
        if n > 0 && self.count.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_one();
            let _l = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.drained.notify_all();
        }
    }

    /// Waits until no request is in flight; false on timeout.
    fn wait_drained(&self, timeout: Duration) -> bool {
        let l = self.lock.lock().expect("in-flight poisoned");
        let _ = self
            .drained
            .wait_timeout_while(l, timeout, |_| self.count.load(Ordering::Acquire) > 0)
            .expect("in-flight poisoned");
        self.count.load(Ordering::Acquire) == 0
    }
}

/// A request whose status is written, waiting to be put on the used ring.
struct Done {
    /// The queue's generation when the request was started: requests of
    /// one generation belong to the same vring.
    generation: u64,
    vring: VringRwLock,
    head: u16,
    used_len: u32,
}

#[derive(Default)]
struct CompletionList {
    done: Vec<Done>,
    /// An emptied list kept for reuse (no allocation per batch).
    spare: Vec<Done>,
    /// A drainer is at work: it will take what is added meanwhile.
    draining: bool,
}

/// A queue's runtime; shut down without waiting when the device goes (its
/// tasks only run while the queue's worker drives it).
struct QueueRuntime(Option<tokio::runtime::Runtime>);

impl QueueRuntime {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(QueueRuntime(Some(rt)))
    }

    fn get(&self) -> &tokio::runtime::Runtime {
        self.0
            .as_ref()
            .expect("queue runtime present until dropped")
    }
}

impl Drop for QueueRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The queue's kick eventfd as the queue's runtime watches it: a duplicate
/// of the vring's descriptor, registered once per vring. Only watched,
/// never read: the runtime's registration is edge-triggered and every kick
/// is an edge, while the count stays for the epoll loop, which reads it
/// after every readiness it sees (and would fail on an emptied one).
struct KickWatch {
    generation: u64,
    raw: RawFd,
    fd: Arc<AsyncFd<OwnedFd>>,
}

/// One queue's state on the I/O path.
struct QueueState {
    runtime: QueueRuntime,
    kick: Mutex<Option<KickWatch>>,
    in_flight: InFlight,
    completions: Mutex<CompletionList>,
    /// Bumped when the queue stops and when guest memory is replaced (a new
    /// front-end), so completions of different vrings are never batched.
    generation: AtomicU64,
}

impl QueueState {
    fn new() -> std::io::Result<Self> {
        Ok(QueueState {
            runtime: QueueRuntime::new()?,
            kick: Mutex::new(None),
            in_flight: InFlight::default(),
            completions: Mutex::default(),
            generation: AtomicU64::new(0),
        })
    }

    /// The vring's kick as this queue's runtime watches it; `None` if the
    /// vring has none (requests then wait for the epoll loop). Must run in
    /// the queue's runtime.
    fn kick_watch(&self, vring: &VringRwLock) -> Option<Arc<AsyncFd<OwnedFd>>> {
        let generation = self.generation.load(Ordering::Acquire);
        let state = vring.get_ref();
        let raw = state.get_kick().as_ref()?.as_raw_fd();
        let mut slot = self.kick.lock().expect("kick watch poisoned");
        if let Some(w) = slot.as_ref() {
            if w.generation == generation && w.raw == raw {
                return Some(w.fd.clone());
            }
        }
        *slot = None;
        // SAFETY: the vring keeps its kick descriptor open while we hold its
        // state (`state`), and the borrow ends before the guard does.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let watch = fd
            .try_clone_to_owned()
            .and_then(|owned| {
                // SAFETY: the `AsyncFd` owns `owned`, so the descriptor stays
                // open, the same description, for the `AsyncFd`'s whole life.
                unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot watch the queue's kick; kicks wait for the epoll loop"))
            .ok()?;
        let fd = Arc::new(watch);
        *slot = Some(KickWatch {
            generation,
            raw,
            fd: fd.clone(),
        });
        Some(fd)
    }

    /// Adds a completion; true if the caller must drain the list.
    fn push(&self, done: Done) -> bool {
        let mut l = self.completions.lock().expect("completions poisoned");
        l.done.push(done);
        !std::mem::replace(&mut l.draining, true)
    }

    /// Puts every listed completion on its used ring, signalling the guest
    /// once per batch, until the list is empty. Only the drainer calls it.
    fn drain(&self) {
        let mut batch: Vec<Done> = Vec::new();
        loop {
            {
                let mut l = self.completions.lock().expect("completions poisoned");
                if batch.capacity() > l.spare.capacity() {
                    l.spare = std::mem::take(&mut batch);
                }
                if l.done.is_empty() {
                    l.draining = false;
                    return;
                }
                let spare = std::mem::take(&mut l.spare);
                batch = std::mem::replace(&mut l.done, spare);
            }
            let mut i = 0;
            while i < batch.len() {
                let generation = batch[i].generation;
                let vring = &batch[i].vring;
                let mut j = i;
                let notify = {
                    let mut state = vring.get_mut();
                    while j < batch.len() && batch[j].generation == generation {
                        let d = &batch[j];
                        if let Err(e) = state.add_used(d.head, d.used_len) {
                            tracing::warn!(head = d.head, error = %e, "cannot return request to the used ring");
                        }
                        j += 1;
                    }
                    state.needs_notification()
                };
                if !matches!(notify, Ok(false)) {
                    if let Err(e) = vring.signal_used_queue() {
                        tracing::warn!(error = %e, "cannot signal the guest");
                    }
                }
                i = j;
            }
            let n = batch.len();
            batch.clear();
            self.in_flight.finish(n);
        }
    }
}

/// The drainer role: drains its queue's completion list when dropped (also
/// if its task is dropped while it lets other tasks run).
struct Drainer<'a>(&'a QueueState);

impl Drop for Drainer<'_> {
    fn drop(&mut self) {
        self.0.drain();
    }
}

struct Inner<D> {
    /// One handle on the disk per queue.
    disks: Vec<Arc<D>>,
    config: DeviceConfig,
    serial: [u8; 20],
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    event_idx: AtomicBool,
    /// Set by `quiesce`: no new request is taken off the rings.
    paused: AtomicBool,
    queues: Vec<QueueState>,
}

/// A virtio-blk device over a [`BlockDisk`], for one vhost-user connection
/// at a time. Cheap to clone.
pub struct VhostUserBlk<D> {
    inner: Arc<Inner<D>>,
}

impl<D> Clone for VhostUserBlk<D> {
    fn clone(&self) -> Self {
        VhostUserBlk {
            inner: self.inner.clone(),
        }
    }
}

impl<D: BlockDisk> VhostUserBlk<D> {
    /// `serial` is what GET_ID answers (padded with zeros to 20 bytes).
    /// Fails only if a queue's runtime cannot be created.
    pub fn new(
        disk: Arc<D>,
        num_queues: u16,
        queue_size: u16,
        serial: &str,
    ) -> std::io::Result<Self> {
        let mut id = [0u8; 20];
        let n = serial.len().min(20);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let config = DeviceConfig {
            capacity: disk.capacity(),
            num_queues,
            queue_size,
        };
        Ok(VhostUserBlk {
            inner: Arc::new(Inner {
                disks: (0..num_queues).map(|_| disk.for_queue()).collect(),
                config,
                serial: id,
                mem: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                queues: (0..num_queues)
                    .map(|_| QueueState::new())
                    .collect::<std::io::Result<_>>()?,
            }),
        })
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.inner.config
    }

    /// Stops taking requests off the rings (those left there wait for the
    /// next backend: QEMU hands them over when it reconnects) and waits
    /// until the requests already taken have completed; false on timeout.
    /// The device's disk can then be flushed and closed with nothing in
    /// flight.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        self.inner.paused.store(true, Ordering::SeqCst);
        self.wait_idle(timeout)
    }

    /// Waits until every queue's requests have completed; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.inner
            .queues
            .iter()
            .all(|q| q.in_flight.wait_drained(timeout))
    }

    fn memory(&self) -> Option<MemGuard> {
        self.inner
            .mem
            .read()
            .expect("memory slot poisoned")
            .as_ref()
            .map(|m| m.memory())
    }

    /// Serves queue `q` after a kick: starts its available requests on the
    /// queue's runtime and drives that runtime (watching the kick for new
    /// requests meanwhile) until none of the queue's requests is in flight.
    fn serve_queue(&self, q: usize, vring: &VringRwLock) -> std::io::Result<()> {
        let qs = &self.inner.queues[q];
        qs.runtime.get().block_on(async {
            // Idle connections first see what happened while the queue was
            // not driven (a node that closed its end), before new requests
            // are given to them.
            tokio::task::yield_now().await;
            self.process_queue(q, vring)?;
            if qs.in_flight.count() == 0 {
                return Ok(());
            }
            let kick = qs.kick_watch(vring);
            loop {
                let idle = qs.in_flight.idle.notified();
                if qs.in_flight.count() == 0 {
                    return Ok(());
                }
                let Some(kick) = &kick else {
                    idle.await;
                    continue;
                };
                tokio::select! {
                    () = idle => {}
                    ready = kick.readable() => {
                        // Cleared before the ring is read: a later kick is a
                        // new edge.
                        ready?.clear_ready();
                        self.process_queue(q, vring)?;
                    }
                }
            }
        })
    }

    /// Pops and starts every available request of queue `q` (on the
    /// queue's runtime, which must be the current one).
    fn process_queue(&self, q: usize, vring: &VringRwLock) -> std::io::Result<()> {
        if self.inner.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(mem) = self.memory() else {
            return Err(std::io::Error::other(
                "queue kicked before guest memory was set",
            ));
        };
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(std::io::Error::other)?;
            }
            let chains: Vec<DescriptorChain<MemGuard>> = {
                let mut state = vring.get_mut();
                state
                    .get_queue_mut()
                    .iter(mem.clone())
                    .map_err(std::io::Error::other)?
                    .collect()
            };
            for chain in chains {
                self.start(q, vring, &mem, chain);
            }
            if !event_idx || !vring.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    fn start(
        &self,
        q: usize,
        vring: &VringRwLock,
        mem: &MemGuard,
        chain: DescriptorChain<MemGuard>,
    ) {
        let head = chain.head_index();
        let limits = self.inner.config.limits();
        let mut mem = mem.clone();
        let mut parsed = Request::parse(&chain, &mem, &limits);
        if let Err(ParseError {
            error: RequestError::Memory(addr),
            ..
        }) = &parsed
        {
            // Memory the request names may have been added after this pass
            // over the ring took its view of the table: parse again against
            // the newest table before failing the request.
            let addr = *addr;
            if let Some(newest) = self.memory() {
                parsed = Request::parse(&chain, &newest, &limits);
                let regions: Vec<String> = newest
                    .iter()
                    .map(|r| format!("{:#x}+{:#x}", r.start_addr().raw_value(), r.len()))
                    .collect();
                match &parsed {
                    Ok(_) => {
                        tracing::info!(
                            queue = q,
                            head,
                            addr,
                            "request names memory added since the ring was read"
                        );
                        mem = newest;
                    }
                    Err(_) => {
                        tracing::warn!(queue = q, head, addr, regions = ?regions, "request names memory outside every region")
                    }
                }
            }
        }
        let request = match parsed {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(queue = q, head, error = %e.error, "invalid request");
                complete(vring, &mem, head, e.status_addr, e.error.status(), 1);
                return;
            }
        };
        let qs = &self.inner.queues[q];
        qs.in_flight.start();
        let generation = qs.generation.load(Ordering::Acquire);
        let inner = self.inner.clone();
        let vring = vring.clone();
        tokio::spawn(async move {
            let (status, used) = execute(&*inner.disks[q], &*mem, &request, &inner.serial).await;
            let used_len = write_status(&mem, head, Some(request.status_addr), status, used);
            let qs = &inner.queues[q];
            let done = Done {
                generation,
                vring,
                head,
                used_len,
            };
            if qs.push(done) {
                let _drainer = Drainer(qs);
                // With other requests in flight, deferred until this worker
                // has run every other ready task: their completions go on
                // the ring with this one. Alone, nothing can join it, and a
                // yield would only wake an idle worker.
                if qs.in_flight.count.load(Ordering::Acquire) > 1 {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
}

/// Writes the status byte; returns the used length to report (0 without a
/// usable status byte).
fn write_status(
    mem: &MemGuard,
    head: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    used_len: u32,
) -> u32 {
    match status_addr {
        Some(addr) => match mem.write_obj(status, addr) {
            Ok(()) => used_len,
            Err(e) => {
                tracing::warn!(head, error = %e, "cannot write request status");
                0
            }
        },
        None => 0,
    }
}

/// Writes the status, returns the chain to the guest and signals it if
/// needed (for requests refused before they started).
fn complete(
    vring: &VringRwLock,
    mem: &MemGuard,
    head: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    used_len: u32,
) {
    let used_len = write_status(mem, head, status_addr, status, used_len);
    if let Err(e) = vring.add_used(head, used_len) {
        tracing::warn!(head, error = %e, "cannot return request to the used ring");
        return;
    }
    match vring.needs_notification() {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!(error = %e, "cannot signal the guest");
            }
        }
    }
}

impl<D: BlockDisk> VhostUserBackend for VhostUserBlk<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.config.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.inner.config.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.inner.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.inner.config.config_space();
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        let mut out = space[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    /// Takes the new memory table, and lists its regions with the disk so
    /// the storage nodes on this host can map them. Called on the control
    /// thread, which also makes every later mapping change: the disk has
    /// the new list before memory the old list names can be reused.
    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> std::io::Result<()> {
        let regions = shared_regions(&mem.memory());
        if let Some(disk) = self.inner.disks.first() {
            disk.share_memory(regions);
        }
        *self.inner.mem.write().expect("memory slot poisoned") = Some(mem);
        // A new memory table may come with new vrings (a new front-end).
        for q in &self.inner.queues {
            q.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.config.num_queues)
            .map(|q| 1u64 << q)
            .collect()
    }

    /// Gives every queue worker of a connection an exit event, so the
    /// connection's workers stop (and are joined) when it ends.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a queue worker exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Some(q) = self.inner.queues.get(queue_index as usize) {
            q.generation.fetch_add(1, Ordering::AcqRel);
            // The front-end takes the ring back once this returns: a request
            // completing after that would write into a ring it owns. Every
            // request ends (each node request is bounded), so wait for all.
            while !q.in_flight.wait_drained(Duration::from_secs(60)) {
                tracing::warn!(
                    queue = queue_index,
                    "requests still in flight while the queue stops; waiting"
                );
            }
        }
        Ok(())
    }

    /// vhost-user-backend gives each worker thread only the vrings of its
    /// `queues_per_thread` mask, and numbers the events by position in that
    /// mask: with one queue per thread, thread `t`'s event 0 is queue `t`.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event set {evset:?}"
            )));
        }
        let local = device_event as usize;
        let q = thread_id;
        let (Some(vring), 0, true) = (vrings.get(local), local, q < self.num_queues()) else {
            return Err(std::io::Error::other(format!(
                "event {local} of worker {thread_id}: no such queue"
            )));
        };
        self.serve_queue(q, vring)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Address, GuestMemoryAtomic};

    use std::os::fd::{FromRawFd, IntoRawFd};

    use super::*;
    use crate::disk::MemDisk;

    const MEM_SIZE: usize = 0x10_0000;
    const DISK_SIZE: u64 = 1 << 20;
    const QUEUE_SIZE: u16 = 16;
    /// Queue `q`'s rings live at `q * QUEUE_STRIDE`.
    const QUEUE_STRIDE: u64 = 0x1000;
    /// Request `i`'s buffers: header at `slot(i)`, data at `+ 0x1000`, status at `+ 0x3ff0`.
    const SLOTS: u64 = 0x1_0000;
    const SERIAL: &str = "tessera-vol-0001";

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
    const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn slot(i: u64) -> u64 {
        SLOTS + i * 0x4000
    }
    fn hdr(i: u64) -> u64 {
        slot(i)
    }
    fn data(i: u64) -> u64 {
        slot(i) + 0x1000
    }
    fn status(i: u64) -> u64 {
        slot(i) + 0x3ff0
    }

    /// A device over a `MemDisk`, and vrings set up on mock
    /// queues in `mem`.
    struct Device<D = MemDisk> {
        mem: Mem,
        disk: Arc<D>,
        blk: VhostUserBlk<D>,
        vrings: Vec<VringRwLock>,
    }

    impl Device {
        fn new(num_queues: u16, serial: &str) -> Device {
            Device::with_disk(Arc::new(MemDisk::new(DISK_SIZE)), num_queues, serial)
        }
    }

    impl<D: BlockDisk> Device<D> {
        fn with_disk(disk: Arc<D>, num_queues: u16, serial: &str) -> Device<D> {
            let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let blk = VhostUserBlk::new(disk.clone(), num_queues, QUEUE_SIZE, serial).unwrap();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            blk.set_event_idx(false);
            blk.update_memory(atomic.clone()).unwrap();
            let vrings = (0..num_queues)
                .map(|q| {
                    // Only to compute the ring addresses; the rings are reset here once.
                    let mock = MockSplitQueue::create(&mem, queue_base(q), QUEUE_SIZE);
                    let vring = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
                    vring.set_queue_size(QUEUE_SIZE);
                    vring
                        .set_queue_info(
                            mock.desc_table_addr().raw_value(),
                            mock.avail_addr().raw_value(),
                            mock.used_addr().raw_value(),
                        )
                        .unwrap();
                    vring.set_queue_ready(true);
                    vring.set_enabled(true);
                    vring
                })
                .collect();
            Device {
                mem,
                disk,
                blk,
                vrings,
            }
        }

        /// As vhost-user-backend does: worker thread `q` holds only queue
        /// `q`'s vring, its event 0.
        fn kick(&self, q: u16) {
            let q = q as usize;
            self.blk
                .handle_event(0, EventSet::IN, &self.vrings[q..q + 1], q)
                .unwrap();
        }

        fn write_header(&self, i: u64, type_: u32, sector: u64) {
            self.mem
                .write_obj(type_.to_le(), GuestAddress(hdr(i)))
                .unwrap();
            self.mem.write_obj(0u32, GuestAddress(hdr(i) + 4)).unwrap();
            self.mem
                .write_obj(sector.to_le(), GuestAddress(hdr(i) + 8))
                .unwrap();
        }

        fn byte(&self, addr: u64) -> u8 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    fn queue_base(q: u16) -> GuestAddress {
        GuestAddress(q as u64 * QUEUE_STRIDE)
    }

    /// The driver side of queue `q` of `dev`. Does not reset the rings.
    struct Driver<'a> {
        mem: &'a Mem,
        desc_table: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
    }

    impl<'a> Driver<'a> {
        fn new<D: BlockDisk>(dev: &'a Device<D>, q: u16) -> Self {
            let v = dev.vrings[q as usize].get_ref();
            let queue = v.get_queue();
            Driver {
                mem: &dev.mem,
                desc_table: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
                next_desc: 0,
            }
        }

        /// Puts a chain of `(addr, len, flags)` on the avail ring; returns its head.
        fn push(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let index = head + i as u16;
                let (flags, next) = if i + 1 < descs.len() {
                    (flags | VRING_DESC_F_NEXT as u16, index + 1)
                } else {
                    (flags, 0)
                };
                let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
                self.mem
                    .write_obj(d, GuestAddress(self.desc_table + 16 * index as u64))
                    .unwrap();
            }
            self.next_desc += descs.len() as u16;
            assert!(self.next_desc <= QUEUE_SIZE);
            let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
            let slot = self.avail + 4 + 2 * (idx % QUEUE_SIZE) as u64;
            self.mem
                .write_obj(head.to_le(), GuestAddress(slot))
                .unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1).to_le(), GuestAddress(self.avail + 2))
                .unwrap();
            head
        }

        fn used_idx(&self) -> u16 {
            u16::from_le(self.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
        }

        /// Waits (bounded) until the used ring holds `n` entries; returns
        /// them as head → used length.
        fn wait_used(&self, n: u16) -> std::collections::HashMap<u16, u32> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.used_idx() < n {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} requests completed",
                    self.used_idx()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(self.used_idx(), n, "more requests completed than expected");
            (0..n)
                .map(|i| {
                    let elem = GuestAddress(self.used + 4 + 8 * i as u64);
                    let id: u32 = self.mem.read_obj(elem).unwrap();
                    let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
                    (u32::from_le(id) as u16, u32::from_le(len))
                })
                .collect()
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn write_then_read_back() {
        let dev = Device::new(1, SERIAL);
        let mut drv = Driver::new(&dev, 0);
        let payload = pattern(1536, 7);

        // WRITE 3 sectors at sector 4, the data in two descriptors.
        dev.write_header(0, VIRTIO_BLK_T_OUT, 4);
        dev.mem
            .write_slice(&payload[..512], GuestAddress(data(0)))
            .unwrap();
        dev.mem
            .write_slice(&payload[512..], GuestAddress(data(0) + 0x800))
            .unwrap();
        dev.mem.write_obj(0xffu8, GuestAddress(status(0))).unwrap();
        let write = drv.push(&[
            (hdr(0), 16, R),
            (data(0), 512, R),
            (data(0) + 0x800, 1024, R),
            (status(0), 1, W),
        ]);
        dev.kick(0);
        let used = drv.wait_used(1);
        assert_eq!(used[&write], 1);
        assert_eq!(dev.byte(status(0)), S_OK);
        assert_eq!(&dev.disk.contents()[2048..2048 + 1536], &payload[..]);

        // READ them back, into three descriptors, the last sharing the status.
        dev.write_header(1, VIRTIO_BLK_T_IN, 4);
        dev.mem
            .write_slice(&[0xaa; 0x1000], GuestAddress(data(1)))
            .unwrap();
        let read = drv.push(&[
            (hdr(1), 16, R),
            (data(1), 1024, W),
            (data(1) + 0x800, 256, W),
            (data(1) + 0xc00, 257, W),
        ]);
        dev.kick(0);
        let used = drv.wait_used(2);
        assert_eq!(used[&read], 1536 + 1);
        assert_eq!(dev.byte(data(1) + 0xc00 + 256), S_OK);
        let mut back = dev.bytes(data(1), 1024);
        back.extend(dev.bytes(data(1) + 0x800, 256));
        back.extend(dev.bytes(data(1) + 0xc00, 256));
        assert_eq!(back, payload);
        assert!(dev.blk.wait_idle(Duration::from_secs(5)));
    }

    #[test]
    fn bad_requests_then_good_ones_on_the_same_queue() {
        let dev = Device::new(1, SERIAL);
        let mut drv = Driver::new(&dev, 0);
        let initial = dev.disk.contents();

        // Unknown type.
        dev.write_header(0, 0xdead, 0);
        dev.mem.write_obj(0xffu8, GuestAddress(status(0))).unwrap();
        let unknown = drv.push(&[(hdr(0), 16, R), (status(0), 1, W)]);
        // Write of 100 bytes: not a multiple of 512.
        dev.write_header(1, VIRTIO_BLK_T_OUT, 0);
        dev.mem
            .write_slice(&[1; 100], GuestAddress(data(1)))
            .unwrap();
        dev.mem.write_obj(0xffu8, GuestAddress(status(1))).unwrap();
        let unaligned = drv.push(&[(hdr(1), 16, R), (data(1), 100, R), (status(1), 1, W)]);
        // Read beyond the end of the disk.
        dev.write_header(2, VIRTIO_BLK_T_IN, DISK_SIZE / 512);
        dev.mem.write_obj(0xffu8, GuestAddress(status(2))).unwrap();
        let beyond = drv.push(&[(hdr(2), 16, R), (data(2), 512, W), (status(2), 1, W)]);
        dev.kick(0);
        let used = drv.wait_used(3);
        assert_eq!((used[&unknown], dev.byte(status(0))), (1, S_UNSUPP));
        assert_eq!((used[&unaligned], dev.byte(status(1))), (1, S_IOERR));
        assert_eq!((used[&beyond], dev.byte(status(2))), (1, S_IOERR));
        assert_eq!(dev.disk.contents(), initial);

        // The queue keeps working: a good write, in the same kick as another bad one.
        dev.write_header(3, VIRTIO_BLK_T_OUT, 1);
        dev.mem
            .write_slice(&[9; 512], GuestAddress(data(3)))
            .unwrap();
        dev.mem.write_obj(0xffu8, GuestAddress(status(3))).unwrap();
        let good = drv.push(&[(hdr(3), 16, R), (data(3), 512, R), (status(3), 1, W)]);
        // No writable descriptor: no status, used length 0.
        let no_status = drv.push(&[(hdr(3), 16, R)]);
        dev.kick(0);
        let used = drv.wait_used(5);
        assert_eq!((used[&good], dev.byte(status(3))), (1, S_OK));
        assert_eq!(used[&no_status], 0);
        assert_eq!(&dev.disk.contents()[512..1024], &[9; 512]);
        assert!(dev.blk.wait_idle(Duration::from_secs(5)));
    }

    #[test]
    fn status_outside_guest_memory_is_not_executed() {
        let dev = Device::new(1, SERIAL);
        let mut drv = Driver::new(&dev, 0);
        dev.write_header(0, VIRTIO_BLK_T_OUT, 0);
        dev.mem
            .write_slice(&[5; 512], GuestAddress(data(0)))
            .unwrap();
        let head = drv.push(&[(hdr(0), 16, R), (data(0), 512, R), (MEM_SIZE as u64, 1, W)]);
        dev.kick(0);
        assert_eq!(drv.wait_used(1)[&head], 0);
        assert!(dev.blk.wait_idle(Duration::from_secs(5)));
        assert_eq!(&dev.disk.contents()[..512], &[0; 512]);
    }

    #[test]
    fn get_id_answers_the_serial() {
        let dev = Device::new(1, SERIAL);
        let mut drv = Driver::new(&dev, 0);
        dev.write_header(0, VIRTIO_BLK_T_GET_ID, 0);
        dev.mem
            .write_slice(&[0xaa; 64], GuestAddress(data(0)))
            .unwrap();
        let head = drv.push(&[(hdr(0), 16, R), (data(0), 20, W), (status(0), 1, W)]);
        // A buffer shorter than 20 bytes.
        dev.write_header(1, VIRTIO_BLK_T_GET_ID, 0);
        dev.mem
            .write_slice(&[0xaa; 64], GuestAddress(data(1)))
            .unwrap();
        let short = drv.push(&[(hdr(1), 16, R), (data(1), 19, W), (status(1), 1, W)]);
        dev.kick(0);
        let used = drv.wait_used(2);
        assert_eq!((used[&head], dev.byte(status(0))), (21, S_OK));
        let mut expected = [0u8; 20];
        expected[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
        assert_eq!(dev.bytes(data(0), 20), expected);
        assert_eq!((used[&short], dev.byte(status(1))), (1, S_IOERR));
        assert_eq!(dev.bytes(data(1), 19), [0xaa; 19]);
    }

    #[test]
    fn get_id_truncates_a_long_serial() {
        let serial = "0123456789abcdefghijKLMNOP";
        let dev = Device::new(1, serial);
        let mut drv = Driver::new(&dev, 0);
        dev.write_header(0, VIRTIO_BLK_T_GET_ID, 0);
        // A larger buffer sharing its descriptor with the status.
        let head = drv.push(&[(hdr(0), 16, R), (data(0), 513, W)]);
        dev.kick(0);
        assert_eq!(drv.wait_used(1)[&head], 21);
        assert_eq!(dev.byte(data(0) + 512), S_OK);
        assert_eq!(dev.bytes(data(0), 20), serial.as_bytes()[..20]);
    }

    #[test]
    fn flush() {
        let dev = Device::new(1, SERIAL);
        let mut drv = Driver::new(&dev, 0);
        dev.write_header(0, VIRTIO_BLK_T_FLUSH, 0);
        dev.mem.write_obj(0xffu8, GuestAddress(status(0))).unwrap();
        let head = drv.push(&[(hdr(0), 16, R), (status(0), 1, W)]);
        dev.kick(0);
        assert_eq!(drv.wait_used(1)[&head], 1);
        assert_eq!(dev.byte(status(0)), S_OK);
    }

    #[test]
    fn discard_and_write_zeroes_clear_the_range() {
        let dev = Device::new(1, SERIAL);
        let mut drv = Driver::new(&dev, 0);
        dev.write_header(0, VIRTIO_BLK_T_OUT, 0);
        dev.mem
            .write_slice(&[3; 4096], GuestAddress(data(0)))
            .unwrap();
        let write = drv.push(&[(hdr(0), 16, R), (data(0), 4096, R), (status(0), 1, W)]);
        dev.kick(0);
        assert_eq!(drv.wait_used(1)[&write], 1);

        // DISCARD sectors 1..3, WRITE_ZEROES (unmap) sectors 5..6.
        for (i, type_, sector, num, flags) in [
            (1, VIRTIO_BLK_T_DISCARD, 1u64, 2u32, 0u32),
            (
                2,
                VIRTIO_BLK_T_WRITE_ZEROES,
                5,
                1,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
        ] {
            dev.write_header(i, type_, 0);
            dev.mem
                .write_obj(sector.to_le(), GuestAddress(data(i)))
                .unwrap();
            dev.mem
                .write_obj(num.to_le(), GuestAddress(data(i) + 8))
                .unwrap();
            dev.mem
                .write_obj(flags.to_le(), GuestAddress(data(i) + 12))
                .unwrap();
        }
        let discard = drv.push(&[(hdr(1), 16, R), (data(1), 16, R), (status(1), 1, W)]);
        let zeroes = drv.push(&[(hdr(2), 16, R), (data(2), 16, R), (status(2), 1, W)]);
        dev.kick(0);
        let used = drv.wait_used(3);
        assert_eq!((used[&discard], dev.byte(status(1))), (1, S_OK));
        assert_eq!((used[&zeroes], dev.byte(status(2))), (1, S_OK));
        assert!(dev.blk.wait_idle(Duration::from_secs(5)));
        let contents = dev.disk.contents();
        for sector in 0..8 {
            let expected = if [1, 2, 5].contains(&sector) { 0 } else { 3 };
            let s = &contents[sector * 512..(sector + 1) * 512];
            assert!(s.iter().all(|&b| b == expected), "sector {sector}");
        }
    }

    #[test]
    fn queues_are_independent() {
        let dev = Device::new(2, SERIAL);
        let mut drv0 = Driver::new(&dev, 0);
        let mut drv1 = Driver::new(&dev, 1);
        dev.write_header(0, VIRTIO_BLK_T_FLUSH, 0);
        let on_0 = drv0.push(&[(hdr(0), 16, R), (status(0), 1, W)]);
        dev.write_header(1, VIRTIO_BLK_T_OUT, 8);
        dev.mem
            .write_slice(&[4; 512], GuestAddress(data(1)))
            .unwrap();
        let on_1 = drv1.push(&[(hdr(1), 16, R), (data(1), 512, R), (status(1), 1, W)]);
        // Only queue 1 is kicked.
        dev.kick(1);
        assert_eq!(drv1.wait_used(1)[&on_1], 1);
        assert_eq!(dev.byte(status(1)), S_OK);
        assert_eq!(drv0.used_idx(), 0);
        dev.kick(0);
        assert_eq!(drv0.wait_used(1)[&on_0], 1);
        assert_eq!(&dev.disk.contents()[4096..4608], &[4; 512]);
    }

    #[test]
    fn with_event_idx() {
        let dev = Device::new(1, SERIAL);
        dev.blk.set_event_idx(true);
        dev.vrings[0].set_queue_event_idx(true);
        let mut drv = Driver::new(&dev, 0);
        dev.write_header(0, VIRTIO_BLK_T_FLUSH, 0);
        let a = drv.push(&[(hdr(0), 16, R), (status(0), 1, W)]);
        let b = drv.push(&[(hdr(0), 16, R), (status(1), 1, W)]);
        dev.kick(0);
        let used = drv.wait_used(2);
        assert_eq!((used[&a], used[&b]), (1, 1));
    }

    /// A `MemDisk` whose flushes wait until released.
    struct GatedDisk {
        disk: MemDisk,
        started: AtomicUsize,
        gate: tokio::sync::Semaphore,
    }

    impl BlockDisk for GatedDisk {
        type Error = <MemDisk as BlockDisk>::Error;

        fn capacity(&self) -> u64 {
            self.disk.capacity()
        }

        async fn readv(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), Self::Error> {
            self.disk.readv(offset, bufs).await
        }

        async fn writev(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), Self::Error> {
            self.disk.writev(offset, bufs).await
        }

        async fn flush(&self) -> Result<(), Self::Error> {
            self.started.fetch_add(1, Ordering::AcqRel);
            let _permit = self.gate.acquire().await.expect("gate open");
            self.disk.flush().await
        }

        async fn discard(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
            self.disk.discard(offset, len).await
        }

        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            unmap: bool,
        ) -> Result<(), Self::Error> {
            self.disk.write_zeroes(offset, len, unmap).await
        }
    }

    /// While a request is in flight, the queue's worker serves the queue's
    /// kick itself: a request kicked meanwhile runs and completes without
    /// waiting for the first one.
    #[test]
    fn a_request_kicked_while_another_is_in_flight_does_not_wait_for_it() {
        let disk = Arc::new(GatedDisk {
            disk: MemDisk::new(DISK_SIZE),
            started: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let dev = Device::with_disk(disk.clone(), 1, SERIAL);
        let (kick_rx, kick_tx) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).unwrap();
        // SAFETY: the consumer's descriptor is handed over whole to the File.
        let kick_file = unsafe { std::fs::File::from_raw_fd(kick_rx.into_raw_fd()) };
        let mut kick_count = kick_file.try_clone().unwrap();
        dev.vrings[0].set_kick(Some(kick_file));
        let mut drv = Driver::new(&dev, 0);
        dev.write_header(0, VIRTIO_BLK_T_FLUSH, 0);
        dev.mem.write_obj(0xffu8, GuestAddress(status(0))).unwrap();
        let flush = drv.push(&[(hdr(0), 16, R), (status(0), 1, W)]);
        /// Opens the gate however the test ends, so the worker returns.
        struct Release<'a>(&'a GatedDisk);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.gate.add_permits(16);
            }
        }
        std::thread::scope(|s| {
            let worker = s.spawn(|| dev.kick(0));
            let release = Release(&disk);
            let deadline = Instant::now() + Duration::from_secs(10);
            while disk.started.load(Ordering::Acquire) == 0 {
                assert!(Instant::now() < deadline, "the flush never started");
                std::thread::sleep(Duration::from_millis(1));
            }
            let payload = pattern(512, 3);
            dev.write_header(1, VIRTIO_BLK_T_OUT, 2);
            dev.mem
                .write_slice(&payload, GuestAddress(data(1)))
                .unwrap();
            dev.mem.write_obj(0xffu8, GuestAddress(status(1))).unwrap();
            let write = drv.push(&[(hdr(1), 16, R), (data(1), 512, R), (status(1), 1, W)]);
            kick_tx.notify().unwrap();
            let used = drv.wait_used(1);
            assert_eq!(used.keys().copied().collect::<Vec<_>>(), vec![write]);
            assert_eq!(dev.byte(status(1)), S_OK);
            assert_eq!(dev.byte(status(0)), 0xff, "the flush is still held");
            assert!(
                !worker.is_finished(),
                "the worker serves until the flush completes"
            );
            drop(release);
            worker.join().unwrap();
            let used = drv.wait_used(2);
            assert_eq!(used[&flush], 1);
            assert_eq!(dev.byte(status(0)), S_OK);
            assert_eq!(&disk.disk.contents()[1024..1536], &payload[..]);
        });
        // The kick is left for the epoll loop, which reads it after seeing it
        // (an emptied count would fail that read and end the queue's worker).
        let mut count = [0u8; 8];
        use std::io::Read;
        assert_eq!(kick_count.read(&mut count).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(count), 1);
    }

    /// Requests completing together are put on the used ring in batches
    /// (by whichever task drains the queue's completion list): every one
    /// gets its status and used element, with and without EVENT_IDX.
    #[test]
    fn a_burst_of_requests_all_complete() {
        for event_idx in [false, true] {
            let dev = Device::new(1, SERIAL);
            dev.blk.set_event_idx(event_idx);
            dev.vrings[0].set_queue_event_idx(event_idx);
            let mut drv = Driver::new(&dev, 0);
            let mut heads = Vec::new();
            // 4 writes (3 descriptors each) and 2 flushes: the 16 descriptors.
            for i in 0..4u64 {
                dev.write_header(i, VIRTIO_BLK_T_OUT, 8 * i);
                dev.mem
                    .write_slice(&[i as u8 + 1; 512], GuestAddress(data(i)))
                    .unwrap();
                dev.mem.write_obj(0xffu8, GuestAddress(status(i))).unwrap();
                heads.push(drv.push(&[(hdr(i), 16, R), (data(i), 512, R), (status(i), 1, W)]));
            }
            for i in 4..6u64 {
                dev.write_header(i, VIRTIO_BLK_T_FLUSH, 0);
                dev.mem.write_obj(0xffu8, GuestAddress(status(i))).unwrap();
                heads.push(drv.push(&[(hdr(i), 16, R), (status(i), 1, W)]));
            }
            dev.kick(0);
            let used = drv.wait_used(6);
            for (i, h) in heads.iter().enumerate() {
                assert_eq!(used[h], 1, "request {i}");
                assert_eq!(dev.byte(status(i as u64)), S_OK, "request {i}");
            }
            assert!(dev.blk.wait_idle(Duration::from_secs(5)));
            let contents = dev.disk.contents();
            for i in 0..4usize {
                let at = 8 * i * 512;
                assert_eq!(&contents[at..at + 512], &[i as u8 + 1; 512]);
            }
        }
    }

    /// Bursts on two queues at once: each used ring gets its own requests
    /// and only those (completions are batched per queue).
    #[test]
    fn bursts_on_two_queues_stay_on_their_rings() {
        let dev = Device::new(2, SERIAL);
        let mut drivers = [Driver::new(&dev, 0), Driver::new(&dev, 1)];
        let mut heads = [Vec::new(), Vec::new()];
        for (q, drv) in drivers.iter_mut().enumerate() {
            for i in 0..8u64 {
                let slot = q as u64 * 8 + i;
                dev.write_header(slot, VIRTIO_BLK_T_FLUSH, 0);
                heads[q].push(drv.push(&[(hdr(slot), 16, R), (status(slot), 1, W)]));
            }
        }
        std::thread::scope(|s| {
            s.spawn(|| dev.kick(0));
            s.spawn(|| dev.kick(1));
        });
        for (q, drv) in drivers.iter().enumerate() {
            let used = drv.wait_used(8);
            let mut got: Vec<u16> = used.keys().copied().collect();
            got.sort_unstable();
            assert_eq!(got, heads[q], "queue {q}");
        }
        assert!(dev.blk.wait_idle(Duration::from_secs(5)));
    }

    #[test]
    fn unexpected_events_are_errors() {
        let dev = Device::new(1, SERIAL);
        assert!(dev
            .blk
            .handle_event(0, EventSet::OUT, &dev.vrings, 0)
            .is_err());
        assert!(dev
            .blk
            .handle_event(1, EventSet::IN, &dev.vrings, 0)
            .is_err());
        // A worker beyond the device's queues.
        assert!(dev
            .blk
            .handle_event(0, EventSet::IN, &dev.vrings, 1)
            .is_err());
        // Kicked before the guest memory is known.
        let blk =
            VhostUserBlk::new(Arc::new(MemDisk::new(DISK_SIZE)), 1, QUEUE_SIZE, SERIAL).unwrap();
        assert!(blk.handle_event(0, EventSet::IN, &dev.vrings, 0).is_err());
    }
    /// A request whose buffer lies in memory the front-end added (and the
    /// device acknowledged) after this pass over the ring took its view of
    /// the memory table is served, not failed with "guest memory is not
    /// accessible". Fails with the re-parse in `start` removed.
    #[test]
    fn a_request_naming_memory_added_after_the_ring_was_read_is_served() {
        let dev = Device::new(1, SERIAL);
        let mut drv = Driver::new(&dev, 0);
        // The view of the table this pass took: the first region only.
        let before = dev.blk.memory().unwrap();
        // Then a second region is added, as ADD_MEM_REG does.
        const EXTRA: u64 = 0x40_0000;
        let extra = Arc::new(
            vm_memory::GuestRegionMmap::<()>::from_range(GuestAddress(EXTRA), 0x1_0000, None)
                .unwrap(),
        );
        let grown = dev.mem.insert_region(extra).unwrap();
        let atomic = dev.blk.inner.mem.read().unwrap().clone().unwrap();
        atomic.lock().unwrap().replace(grown.clone());

        let payload = pattern(4096, 3);
        grown.write_slice(&payload, GuestAddress(EXTRA)).unwrap();
        dev.write_header(0, VIRTIO_BLK_T_OUT, 8);
        dev.mem.write_obj(0xffu8, GuestAddress(status(0))).unwrap();
        let head = drv.push(&[(hdr(0), 16, R), (EXTRA, 4096, R), (status(0), 1, W)]);

        let qs = &dev.blk.inner.queues[0];
        qs.runtime.get().block_on(async {
            let chains: Vec<_> = dev.vrings[0]
                .get_mut()
                .get_queue_mut()
                .iter(before.clone())
                .unwrap()
                .collect();
            assert_eq!(chains.len(), 1);
            for chain in chains {
                dev.blk.start(0, &dev.vrings[0], &before, chain);
            }
            while qs.in_flight.count() > 0 {
                tokio::task::yield_now().await;
            }
        });
        let used = drv.wait_used(1);
        assert_eq!(used[&head], 1);
        assert_eq!(dev.byte(status(0)), S_OK);
        assert_eq!(&dev.disk.contents()[4096..8192], &payload[..]);
    }
}
