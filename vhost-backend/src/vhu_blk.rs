//! The vhost-user glue: the `VhostUserBackend` of a virtio-blk device.
//!
//! Each queue has its own worker thread (the vhost-user-backend epoll
//! loop). On a kick the worker pops every available chain, parses it, and
//! hands each valid request to the async runtime; it never waits for I/O.
//! The task that runs a request writes its status, puts it on the used ring
//! and signals the guest (subject to EVENT_IDX suppression). Requests of one
//! queue share nothing with other queues but the disk: the only locks on the
//! I/O path are the queue's own vring lock and in-flight counter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;

use crate::config::DeviceConfig;
use crate::device::execute;
use crate::disk::BlockDisk;
use crate::request::Request;

type Mem = GuestMemoryMmap<()>;
type MemGuard = GuestMemoryLoadGuard<Mem>;

/// Requests of one queue still being executed.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    drained: Condvar,
}

impl InFlight {
    fn start(&self) {
        *self.count.lock().expect("in-flight poisoned") += 1;
    }

    fn finish(&self) {
        let mut n = self.count.lock().expect("in-flight poisoned");
        *n -= 1;
        if *n == 0 {
            self.drained.notify_all();
        }
    }

    /// Waits until no request is in flight; false on timeout.
    fn wait_drained(&self, timeout: Duration) -> bool {
        let n = self.count.lock().expect("in-flight poisoned");
        let (n, _) = self
            .drained
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .expect("in-flight poisoned");
        *n == 0
    }
}

struct Inner<D> {
    disk: Arc<D>,
    runtime: tokio::runtime::Handle,
    config: DeviceConfig,
    serial: [u8; 20],
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    event_idx: AtomicBool,
    in_flight: Vec<InFlight>,
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
    pub fn new(
        disk: Arc<D>,
        runtime: tokio::runtime::Handle,
        num_queues: u16,
        queue_size: u16,
        serial: &str,
    ) -> Self {
        let mut id = [0u8; 20];
        let n = serial.len().min(20);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let config = DeviceConfig {
            capacity: disk.capacity(),
            num_queues,
            queue_size,
        };
        VhostUserBlk {
            inner: Arc::new(Inner {
                disk,
                runtime,
                config,
                serial: id,
                mem: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                in_flight: (0..num_queues).map(|_| InFlight::default()).collect(),
            }),
        }
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.inner.config
    }

    /// Waits until every queue's requests have completed; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.inner.in_flight.iter().all(|q| q.wait_drained(timeout))
    }

    fn memory(&self) -> Option<MemGuard> {
        self.inner
            .mem
            .read()
            .expect("memory slot poisoned")
            .as_ref()
            .map(|m| m.memory())
    }

    /// Pops and starts every available request of queue `q`.
    fn process_queue(&self, q: usize, vring: &VringRwLock) -> std::io::Result<()> {
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
        let request = match Request::parse(&chain, mem, &limits) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(queue = q, head, error = %e.error, "invalid request");
                complete(vring, mem, head, e.status_addr, e.error.status(), 1);
                return;
            }
        };
        let inner = self.inner.clone();
        let vring = vring.clone();
        let mem = mem.clone();
        inner.in_flight[q].start();
        self.inner.runtime.spawn(async move {
            let (status, used) = execute(&*inner.disk, &*mem, &request, &inner.serial).await;
            complete(&vring, &mem, head, Some(request.status_addr), status, used);
            inner.in_flight[q].finish();
        });
    }
}

/// Writes the status, returns the chain to the guest and signals it if needed.
fn complete(
    vring: &VringRwLock,
    mem: &MemGuard,
    head: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    used_len: u32,
) {
    let used_len = match status_addr {
        Some(addr) => match mem.write_obj(status, addr) {
            Ok(()) => used_len,
            Err(e) => {
                tracing::warn!(head, error = %e, "cannot write request status");
                0
            }
        },
        None => 0,
    };
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

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> std::io::Result<()> {
        *self.inner.mem.write().expect("memory slot poisoned") = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.config.num_queues)
            .map(|q| 1u64 << q)
            .collect()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Some(q) = self.inner.in_flight.get(queue_index as usize) {
            if !q.wait_drained(Duration::from_secs(60)) {
                tracing::warn!(
                    queue = queue_index,
                    "requests still in flight when the queue stopped"
                );
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event set {evset:?}"
            )));
        }
        let q = device_event as usize;
        let Some(vring) = vrings.get(q) else {
            return Err(std::io::Error::other(format!(
                "event for unknown queue {q}"
            )));
        };
        self.process_queue(q, vring)
    }
}
