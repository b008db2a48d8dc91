//! Fault injection for tests of the zone and of the crates above it (with
//! the `testing` feature, or in this crate's tests).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::store::{
    CasOp, CasResult, Expect, KeyValue, LeaseId, MetaStore, StoreError, WatchEvent,
};

/// A [`MetaStore`] whose compare-and-swaps on keys under a prefix lose, as
/// if another writer changed the key each time: the next `n` of them (see
/// [`lose`](Contended::lose)) fail without writing anything. Everything else
/// goes to the inner store.
pub struct Contended<S> {
    inner: S,
    prefix: String,
    losses: AtomicU64,
    attempts: AtomicU64,
}

impl<S: MetaStore> Contended<S> {
    /// Contends for the keys of `inner` starting with `prefix`; loses
    /// nothing until [`lose`](Contended::lose) is called.
    pub fn new(inner: S, prefix: &str) -> Self {
        Self {
            inner,
            prefix: prefix.to_owned(),
            losses: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
        }
    }

    /// The next `n` compare-and-swaps on the prefix's keys lose (`u64::MAX`:
    /// all of them).
    pub fn lose(&self, n: u64) {
        self.losses.store(n, Ordering::SeqCst);
    }

    /// Compare-and-swaps attempted on the prefix's keys so far, lost or not.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }

    /// Takes one loss from the budget; whether this attempt loses.
    fn loses(&self, key: &str) -> bool {
        if !key.starts_with(&self.prefix) {
            return false;
        }
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.losses
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u64::MAX => Some(u64::MAX),
                n => Some(n - 1),
            })
            .is_ok()
    }
}

#[async_trait]
impl<S: MetaStore> MetaStore for Contended<S> {
    async fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision().await
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.range(prefix).await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        self.inner.put(key, value, lease).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        op: CasOp,
    ) -> Result<CasResult, StoreError> {
        if self.loses(key) {
            return Ok(CasResult {
                succeeded: false,
                current: self.inner.get(key).await?,
                revision: self.inner.revision().await?,
            });
        }
        self.inner.compare_and_swap(key, expect, op).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        self.inner.watch(prefix).await
    }
}
