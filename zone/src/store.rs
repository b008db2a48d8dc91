//! The metadata store interface: an etcd-like key-value store.
//!
//! The zone keeps all its records in one [`MetaStore`]. The interface is the
//! subset of etcd v3 the zone needs, so that the embedded
//! [`SledStore`](crate::sled_store::SledStore) serves a single host and tests
//! today and an etcd store serves a real zone later, behind the same trait and
//! the same [conformance suite](crate::conformance):
//!
//! - a global *revision* counter, bumped by every change (one bump per
//!   operation, however many keys it touches);
//! - every key carries the revision that created it and the revision that last
//!   changed it (`mod_revision`), which compare-and-swap uses to detect
//!   concurrent updates;
//! - *leases*: a key put with a lease is deleted when the lease expires or is
//!   revoked (this is how node liveness works);
//! - *watches*: a stream of the changes under a prefix.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Identifier of a store lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the change that created the key (since its last deletion).
    pub create_revision: u64,
    /// Revision of the change that last wrote the key.
    pub mod_revision: u64,
    /// Number of writes since the key was created (1 after creation).
    pub version: u64,
    /// The lease the key is bound to, if any.
    pub lease: Option<LeaseId>,
}

/// The condition of a [`MetaStore::compare_and_swap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist and have been last written at this revision.
    ModRevision(u64),
}

/// The change a [`MetaStore::compare_and_swap`] makes when its condition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOp {
    /// Write this value (without a lease: a lease the key had is detached).
    Put(Vec<u8>),
    /// Delete the key.
    Delete,
}

/// The outcome of a [`MetaStore::compare_and_swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasResult {
    /// Whether the condition held and the change was made.
    pub succeeded: bool,
    /// The key after the operation: the new value on success (`None` after a
    /// delete), the value that failed the condition otherwise.
    pub current: Option<KeyValue>,
    /// The store's revision after the operation.
    pub revision: u64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was written; `kv` is its new value.
    Put { kv: KeyValue, revision: u64 },
    /// The key was deleted (explicitly, or because its lease expired or was
    /// revoked); `kv` is the value it had.
    Delete { kv: KeyValue, revision: u64 },
}

impl WatchEvent {
    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { kv, .. } | WatchEvent::Delete { kv, .. } => &kv.key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. } | WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// Errors of a metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The lease does not exist (never granted, revoked, or reaped).
    #[error("lease {0} does not exist")]
    LeaseNotFound(LeaseId),
    /// The lease's time to live ran out before it was kept alive.
    #[error("lease {0} has expired")]
    LeaseExpired(LeaseId),
    /// A lease was asked for with a time to live the store cannot honour.
    #[error("a lease time to live of {0:?} is not supported")]
    InvalidTtl(Duration),
    /// The store's own data does not decode.
    #[error("the metadata store is corrupt: {0}")]
    Corrupt(String),
    /// The store must be opened inside a tokio runtime (it runs a lease reaper task).
    #[error("the metadata store must be opened inside a tokio runtime")]
    NoRuntime,
    /// The backend (sled, etcd) failed.
    #[error("the metadata store failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(error))
    }
}

/// An etcd-like key-value store holding the zone's metadata.
///
/// Keys are strings; [`range`](MetaStore::range) and
/// [`watch`](MetaStore::watch) select keys by prefix. Every successful
/// mutation is durable (flushed) before it is acknowledged.
#[async_trait]
pub trait MetaStore: Send + Sync {
    /// The store's current revision (0 for a store that never changed).
    async fn revision(&self) -> Result<u64, StoreError>;

    /// The key's value, if it exists.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix`, sorted by key.
    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;

    /// Writes the key, bound to `lease` if given; returns the change's revision.
    /// Fails with [`StoreError::LeaseNotFound`] if the lease does not exist.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError>;

    /// Deletes the key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Applies `op` to the key if `expect` holds, atomically.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        op: CasOp,
    ) -> Result<CasResult, StoreError>;

    /// Grants a lease that expires after `ttl` unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Restarts the lease's time to live. Fails with
    /// [`StoreError::LeaseExpired`] or [`StoreError::LeaseNotFound`] if the
    /// lease is gone: its keys are (or are about to be) deleted.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Revokes the lease and deletes every key bound to it. Revoking a lease
    /// that does not exist is not an error.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Streams every change to a key starting with `prefix`, in revision
    /// order, from now on. The channel closes if the store is dropped or the
    /// watcher falls too far behind; the watcher then re-reads with
    /// [`range`](MetaStore::range) and watches again.
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, StoreError>;
}
