//! An in-memory [`MetaStore`] for deterministic simulations and tests.
//!
//! Everything lives in ordered maps behind one mutex: each operation runs
//! whole under it, so operations are atomic and their order is the order of
//! the calls. Nothing depends on the wall clock, on hashing seeds or on
//! other threads: the same calls in the same order give the same revisions,
//! lease ids and watch events.
//!
//! Lease deadlines are [`tokio::time::Instant`]s, so they follow tokio's
//! clock, paused and advanced by a simulation as well as the real one. A
//! lease expires at its deadline: every operation first revokes the leases
//! whose deadline has passed (oldest deadline first), and a reaper task,
//! spawned on the current tokio runtime by the first
//! [`grant_lease`](MetaStore::grant_lease), does the same when a deadline
//! passes, so that watchers see the deletions without anyone asking. No OS
//! thread is started; outside a runtime expiry happens on access only.
//!
//! Nothing is durable: the data goes with the store.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::store::{
    CasOp, CasResult, Expect, KeyValue, LeaseId, MetaStore, StoreError, WatchEvent,
};

/// Events a watcher may fall behind before it is dropped.
const WATCH_CAPACITY: usize = 1024;
/// Longest lease time to live accepted (as the sled store).
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A [`MetaStore`] in memory. See the module documentation.
pub struct MemStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the reaper: a lease was granted or kept alive, or the store is dropped.
    reaper: Arc<Notify>,
}

/// A lease: its time to live, deadline and keys.
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// A watch: its prefix and where its events go.
struct Watcher {
    prefix: String,
    tx: mpsc::Sender<WatchEvent>,
}

#[derive(Default)]
struct State {
    revision: u64,
    /// The last lease id granted.
    last_lease: u64,
    kv: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, Lease>,
    watchers: Vec<Watcher>,
    reaper_started: bool,
}

/// Locks a std mutex; every critical section leaves the state consistent
/// before anything that could panic, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemStore {
    /// An empty store at revision 0. May be called outside a tokio runtime.
    pub fn new() -> Self {
        MemStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                reaper: Arc::new(Notify::new()),
            }),
        }
    }

    /// Starts the reaper on the current runtime, once, if there is one.
    fn start_reaper(&self, state: &mut State) {
        if state.reaper_started {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            state.reaper_started = true;
            runtime.spawn(reap(Arc::downgrade(&self.inner), self.inner.reaper.clone()));
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MemStore {
    fn drop(&mut self) {
        // Wake the reaper so it notices the store is gone and ends.
        self.inner.reaper.notify_one();
    }
}

impl State {
    /// Revokes every lease whose deadline is not after `now`, oldest
    /// deadline first (then lowest id).
    fn expire(&mut self, now: Instant) {
        let mut due: Vec<(Instant, LeaseId)> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, lease)| (lease.deadline, *id))
            .collect();
        due.sort_unstable();
        for (_, id) in due {
            tracing::debug!(lease = %id, "lease expired");
            self.revoke(id);
        }
    }

    /// Deletes the lease and its keys (one revision for all of them).
    fn revoke(&mut self, id: LeaseId) {
        let Some(lease) = self.leases.remove(&id) else {
            return;
        };
        if lease.keys.is_empty() {
            return;
        }
        let revision = self.bump();
        let mut events = Vec::with_capacity(lease.keys.len());
        for key in &lease.keys {
            if let Some(kv) = self.kv.remove(key) {
                events.push(WatchEvent::Delete { kv, revision });
            }
        }
        self.publish(&events);
    }

    fn bump(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Fails unless the lease exists (expired leases are gone already).
    fn check_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.leases.contains_key(&lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }

    /// Writes the key at a new revision, bound to `lease`; returns its value.
    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> KeyValue {
        let revision = self.bump();
        let previous = self.kv.get(key);
        let (create_revision, version, old_lease) = match previous {
            Some(kv) => (kv.create_revision, kv.version + 1, kv.lease),
            None => (revision, 1, None),
        };
        if let Some(old) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
            old.keys.remove(key);
        }
        if let Some(new) = lease.and_then(|id| self.leases.get_mut(&id)) {
            new.keys.insert(key.to_owned());
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
            version,
            lease,
        };
        self.kv.insert(key.to_owned(), kv.clone());
        self.publish(&[WatchEvent::Put {
            kv: kv.clone(),
            revision,
        }]);
        kv
    }

    /// Deletes the key at a new revision if it exists; returns whether it did.
    fn delete(&mut self, key: &str) -> bool {
        let Some(kv) = self.kv.remove(key) else {
            return false;
        };
        if let Some(lease) = kv.lease.and_then(|id| self.leases.get_mut(&id)) {
            lease.keys.remove(key);
        }
        let revision = self.bump();
        self.publish(&[WatchEvent::Delete { kv, revision }]);
        true
    }

    /// Hands changes to the watchers of their keys; drops watchers that fell
    /// behind or went away.
    fn publish(&mut self, events: &[WatchEvent]) {
        self.watchers.retain(|watcher| {
            for event in events.iter().filter(|e| e.key().starts_with(&watcher.prefix)) {
                match watcher.tx.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(prefix = %watcher.prefix, "dropping a watcher that fell behind");
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            true
        });
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|lease| lease.deadline).min()
    }
}

impl Inner {
    /// The state, with the leases due by now expired.
    fn now(&self) -> MutexGuard<'_, State> {
        let mut state = lock(&self.state);
        state.expire(Instant::now());
        state
    }
}

/// The reaper task: expires leases as their deadlines pass; ends when the
/// store is dropped.
async fn reap(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            let state = inner.now();
            state.next_deadline()
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[async_trait]
impl MetaStore for MemStore {
    async fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.inner.now().revision)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.inner.now().kv.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let state = self.inner.now();
        Ok(state
            .kv
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect())
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let mut state = self.inner.now();
        if let Some(lease) = lease {
            state.check_lease(lease)?;
        }
        Ok(state.put(key, value, lease).mod_revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.inner.now().delete(key))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        op: CasOp,
    ) -> Result<CasResult, StoreError> {
        let mut state = self.inner.now();
        let current = state.kv.get(key).cloned();
        let holds = match (expect, &current) {
            (Expect::Absent, None) => true,
            (Expect::ModRevision(revision), Some(kv)) => kv.mod_revision == revision,
            _ => false,
        };
        if !holds {
            return Ok(CasResult {
                succeeded: false,
                current,
                revision: state.revision,
            });
        }
        Ok(match op {
            CasOp::Put(value) => {
                let kv = state.put(key, value, None);
                CasResult {
                    succeeded: true,
                    revision: kv.mod_revision,
                    current: Some(kv),
                }
            }
            CasOp::Delete => {
                state.delete(key);
                CasResult {
                    succeeded: true,
                    current: None,
                    revision: state.revision,
                }
            }
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(StoreError::InvalidTtl(ttl));
        }
        let mut state = self.inner.now();
        self.start_reaper(&mut state);
        state.last_lease += 1;
        let id = LeaseId(state.last_lease);
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        self.inner.reaper.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        let expired = match state.leases.get(&lease) {
            None => return Err(StoreError::LeaseNotFound(lease)),
            Some(l) => l.deadline <= now,
        };
        state.expire(now);
        if expired {
            return Err(StoreError::LeaseExpired(lease));
        }
        if let Some(l) = state.leases.get_mut(&lease) {
            l.deadline = now + l.ttl;
        }
        Ok(())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.now().revoke(lease);
        Ok(())
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_CAPACITY);
        self.inner.now().watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    #[tokio::test]
    async fn conformance_suite_in_real_time() {
        let store = MemStore::new();
        // Leases of 1 s leave room for a loaded machine's scheduling delays.
        conformance::run_all(&store, Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn conformance_suite_in_paused_time() {
        let store = MemStore::new();
        conformance::run_all(&store, Duration::from_secs(10)).await;
    }

    #[test]
    fn it_is_made_outside_a_runtime_and_expires_leases_at_their_deadline() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let store = MemStore::new();
        // Granted inside the runtime (the reaper starts there), read outside.
        let lease = runtime.block_on(async {
            let lease = store
                .grant_lease(Duration::from_secs(5))
                .await
                .expect("grant");
            store
                .put("/k", b"v".to_vec(), Some(lease))
                .await
                .expect("put");
            lease
        });
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            store.keep_alive(lease).await.expect("still alive");
            assert!(store.get("/k").await.expect("get").is_some());
        });
        runtime.block_on(async {
            tokio::time::advance(Duration::from_secs(5)).await;
            // Expired exactly at the deadline, whether or not the reaper ran.
            assert_eq!(store.get("/k").await.expect("get"), None);
            assert!(matches!(
                store.keep_alive(lease).await,
                Err(StoreError::LeaseNotFound(_) | StoreError::LeaseExpired(_))
            ));
        });
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_tells_watchers_of_expiries_at_the_deadline() {
        let store = MemStore::new();
        let mut events = store.watch("/alive/").await.expect("watch");
        let short = store
            .grant_lease(Duration::from_secs(2))
            .await
            .expect("grant");
        let long = store
            .grant_lease(Duration::from_secs(5))
            .await
            .expect("grant");
        let r1 = store
            .put("/alive/a", b"1".to_vec(), Some(short))
            .await
            .expect("put");
        store
            .put("/alive/b", b"1".to_vec(), Some(long))
            .await
            .expect("put");
        let start = Instant::now();
        assert!(matches!(events.recv().await, Some(WatchEvent::Put { .. })));
        assert!(matches!(events.recv().await, Some(WatchEvent::Put { .. })));

        // Nobody touches the store: the reaper deletes each key at its
        // lease's deadline, in deadline order.
        for (key, after) in [("/alive/a", 2), ("/alive/b", 5)] {
            match events.recv().await {
                Some(WatchEvent::Delete { kv, revision }) => {
                    assert_eq!(kv.key, key);
                    assert!(revision > r1);
                }
                other => panic!("expected the deletion of {key}, got {other:?}"),
            }
            assert_eq!(start.elapsed(), Duration::from_secs(after));
        }
        assert_eq!(store.revision().await.expect("revision"), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_calls_give_the_same_revisions_and_leases() {
        async fn run() -> Vec<(u64, Option<LeaseId>)> {
            let store = MemStore::new();
            let a = store
                .grant_lease(Duration::from_secs(1))
                .await
                .expect("grant");
            let b = store
                .grant_lease(Duration::from_secs(3))
                .await
                .expect("grant");
            for (i, lease) in [a, b, a, b].into_iter().enumerate() {
                store
                    .put(&format!("/k/{i}"), vec![i as u8], Some(lease))
                    .await
                    .expect("put");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            store
                .range("/k/")
                .await
                .expect("range")
                .into_iter()
                .map(|kv| (kv.mod_revision, kv.lease))
                .chain([(store.revision().await.expect("revision"), None)])
                .collect()
        }
        let first = run().await;
        assert_eq!(first, run().await);
        assert_eq!(
            first,
            vec![(2, Some(LeaseId(2))), (4, Some(LeaseId(2))), (5, None)]
        );
    }

    #[tokio::test]
    async fn dropping_the_store_ends_the_reaper() {
        let store = MemStore::new();
        store
            .grant_lease(Duration::from_secs(60))
            .await
            .expect("grant");
        let weak = Arc::downgrade(&store.inner);
        drop(store);
        assert!(weak.upgrade().is_none());
        // The reaper wakes, finds the store gone and returns; nothing to
        // observe but the absence of a panic or a hang.
        tokio::task::yield_now().await;
    }
}
