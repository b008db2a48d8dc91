//! The seam between the volume client and the storage nodes.
//!
//! The volume speaks to a node through a [`Link`]: the network connection
//! of [`crate::conn`] in production, or any [`NodeIo`] (the in-memory nodes
//! of the deterministic simulation). Production links are an enum arm, not a
//! trait object, so the I/O path pays no boxed future per request.

use std::sync::Arc;
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
}

/// Makes the links of a volume handle.
pub trait Connector: Send + Sync {
    /// A (lazily connecting) link to the node at `addr`.
    fn link(
        &self,
        addr: &NodeAddr,
        shm: Arc<SharedMemory>,
        client: [u8; 16],
        timeout: Duration,
    ) -> Arc<dyn NodeIo>;
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
}
