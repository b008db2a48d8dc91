//! The volume client: turns a vDisk's byte address space into chunk requests
//! to the storage nodes holding each chunk's copies.
//!
//! It knows the zone's records (placement, lease, epoch) and the storage wire
//! protocol. It knows nothing of virtio, vhost-user or NBD: the device
//! adapters call [`Volume`] with offsets and buffers.
//!
//! Writes go to every copy in parallel and complete when every copy holds
//! them; a flush completes when every copy has made its writes stable; reads
//! come from one copy, a local one if there is one.

mod conn;
mod layout;
pub mod link;
mod shm;
mod volume;
pub mod worker;
pub mod zone_link;

pub use conn::ConnError;
pub use link::{BootGuard, BootWatch, Connector, NodeAddr, NodeIo, Reply};
pub use shm::{SharedMemory, SharedRegion};
pub use volume::{ScrubReport, Volume, VolumeConfig};
pub use zone_link::{ZoneCallError, ZoneFailure, ZoneLink};

use tessera_proto::Status;
use thiserror::Error;

/// Why a volume operation failed.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("zone request failed: {0}")]
    Zone(#[from] ZoneCallError),
    #[error("the vDisk placement is inconsistent: {0}")]
    Placement(String),
    #[error("I/O at offset {offset} length {len} is not a multiple of 512 bytes")]
    Unaligned { offset: u64, len: u64 },
    #[error("I/O at offset {offset} length {len} ends beyond the vDisk size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the vDisk was taken over by another writer (our epoch {epoch}, theirs {by})")]
    Fenced { epoch: u64, by: u64 },
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("storage node {addr} answered {status:?}: {message}")]
    Node {
        addr: String,
        status: Status,
        message: String,
    },
    #[error("the volume is closing: it takes no new writes")]
    Closing,
    #[error("the vDisk has no copy number {0}")]
    NoSuchCopy(usize),
    #[error("the copy on disk {disk} failed while a read from it was in flight")]
    CopyFailed { disk: uuid::Uuid },
    /// A copy's disk had no space for a write: the write failed, and the
    /// copies that took it were rolled back (none goes stale for it).
    #[error("no space left on disk {disk} for chunk {chunk}: the write failed")]
    NoSpace { disk: uuid::Uuid, chunk: u64 },
    #[error("placement group {group} has {current} current copies, fewer than the {needed} the policy requires")]
    Degraded {
        group: usize,
        current: usize,
        needed: usize,
    },
}
