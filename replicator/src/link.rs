//! The seam between the volume client and the storage nodes.
//!
//! The volume speaks to a node through a [`Link`]: the network connection
//! of [`crate::conn`] in production, or any [`NodeIo`] (the in-memory nodes
//! of the deterministic simulation). Production links are an enum arm, not a
//! trait object, so the I/O path pays no boxed future per request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tessera_proto::{Request, Status};

use crate::conn::{ConnError, NodeLink};
use crate::shm::SharedMemory;

/// Where a node is: its TCP address, and its local-session socket if the
/// node is on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    pub addr: String,
    pub socket: Option<String>,
    /// The volume keeps its activity log on the nodes: the link speaks only
    /// protocol versions whose nodes keep activity marks.
    pub marks: bool,
}

/// A node's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    /// An error message, or a `StaleEpoch`'s epoch, or a `Fence`'s epoch.
    /// Empty for an `Ok` read: its data went to the caller's buffers.
    pub body: Vec<u8>,
}

/// A storage node as the volume client sees it.
#[async_trait]
pub trait NodeIo: Send + Sync {
    /// How logs name the node.
    fn addr(&self) -> &str;

    /// Sends `req` (with `payload`, the data of a write; `crc` its crc32c if
    /// the caller computed it) and waits for the answer.
    async fn call(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
    ) -> Result<Reply, ConnError>;

    /// Sends a read; on `Ok` the data is in `dest`.
    async fn read(&self, req: Request<'_>, dest: &mut [&mut [u8]]) -> Result<Reply, ConnError>;

    /// Ends the connection, if any.
    async fn close(&self);

    /// The volume failed every copy on this node after a
    /// [`ConnError::Rebooted`]: requests may go again ([`BootGuard::accept`]).
    fn accept_reboot(&self);
}

/// Makes the links of a volume handle.
pub trait Connector: Send + Sync {
    /// A (lazily connecting) link to the node at `addr`. The link reports
    /// every connection it opens to `boot` (through its own [`BootGuard`])
    /// and fails requests with [`ConnError::Rebooted`] while the guard says so.
    fn link(
        &self,
        addr: &NodeAddr,
        shm: Arc<SharedMemory>,
        client: [u8; 16],
        timeout: Duration,
        boot: Arc<BootWatch>,
    ) -> Arc<dyn NodeIo>;
}

/// The boot identity a volume last saw a node run, shared by all its links
/// to that node.
///
/// A node killed and restarted keeps what the page cache held; a node whose
/// machine restarted does not. A connection cannot tell the two apart; the
/// node's boot identity (in its `Hello` reply) can. A link that connects
/// and finds a boot other than the one the volume knows refuses every
/// request until the volume has failed every copy on that node — each then
/// dirty for everything written since its last flush — and accepted the new
/// boot. So no request, read or write, reaches a rebooted node as if
/// nothing had happened.
#[derive(Debug, Default)]
pub struct BootWatch {
    known: Mutex<Option<[u8; 16]>>,
}

/// One link's view of its node's boot (see [`BootWatch`]).
#[derive(Debug)]
pub struct BootGuard {
    watch: Arc<BootWatch>,
    /// A boot seen on this link's connection that the volume has not accepted yet.
    unaccepted: Mutex<Option<[u8; 16]>>,
}

impl BootGuard {
    pub fn new(watch: Arc<BootWatch>) -> BootGuard {
        BootGuard {
            watch,
            unaccepted: Mutex::new(None),
        }
    }

    /// A connection opened to a node that runs `boot` (`None`: the node does
    /// not say; it is taken as unchanged). Call it before the connection
    /// carries any request.
    pub fn connected(&self, boot: Option<[u8; 16]>) {
        let Some(boot) = boot else { return };
        let mut known = self.watch.known.lock().expect("boot poisoned");
        match *known {
            None => *known = Some(boot),
            Some(k) if k == boot => {}
            Some(_) => *self.unaccepted.lock().expect("boot poisoned") = Some(boot),
        }
    }

    /// Fails with [`ConnError::Rebooted`] while a new boot is not accepted.
    pub fn check(&self, addr: &str) -> Result<(), ConnError> {
        if self.unaccepted.lock().expect("boot poisoned").is_some() {
            return Err(ConnError::Rebooted {
                addr: addr.to_string(),
            });
        }
        Ok(())
    }

    /// The volume failed every copy on the node: requests may go again.
    pub fn accept(&self) {
        if let Some(boot) = self.unaccepted.lock().expect("boot poisoned").take() {
            *self.watch.known.lock().expect("boot poisoned") = Some(boot);
        }
    }
}

/// One node as one volume handle reaches it.
pub(crate) enum Link {
    Net(NodeLink),
    Other(Arc<dyn NodeIo>),
}

impl Link {
    pub(crate) fn addr(&self) -> &str {
        match self {
            Link::Net(l) => &l.addr,
            Link::Other(l) => l.addr(),
        }
    }

    pub(crate) async fn call(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
    ) -> Result<Reply, ConnError> {
        match self {
            Link::Net(l) => l.call_crc(req, payload, crc).await.map(|f| Reply {
                status: f.header.status(),
                body: f.body,
            }),
            Link::Other(l) => l.call(req, payload, crc).await,
        }
    }

    pub(crate) async fn read(
        &self,
        req: Request<'_>,
        dest: &mut [&mut [u8]],
    ) -> Result<Reply, ConnError> {
        match self {
            Link::Net(l) => l.call_read(req, dest).await.map(|(h, body)| Reply {
                status: h.status(),
                body,
            }),
            Link::Other(l) => l.read(req, dest).await,
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Link::Net(l) => l.close().await,
            Link::Other(l) => l.close().await,
        }
    }

    pub(crate) fn accept_reboot(&self) {
        match self {
            Link::Net(l) => l.boot.accept(),
            Link::Other(l) => l.accept_reboot(),
        }
    }
}
