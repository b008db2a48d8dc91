//! The embedded metadata store: a [`MetaStore`] over a sled database.
//!
//! It serves one host (a single API server) and the tests. Layout, all
//! integers big-endian:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `kv` | the key | format byte `1`, create revision, mod revision, version, lease (0 = none), the value |
//! | `leases` | lease id | format byte `1`, time to live in ms |
//! | `lease-keys` | lease id ++ key | empty: the keys bound to each lease |
//! | `meta` | `format`, `revision`, `next-lease` | the store's format version and counters |
//!
//! Every mutation is one sled transaction over these trees (so a crash
//! leaves either all or none of it), made under one writer lock (so watchers
//! see changes in revision order), and flushed to the files before it is
//! acknowledged (so an acknowledged change survives `kill -9` of the process).
//!
//! Lease deadlines live in memory only: a reaper task revokes a lease when it
//! expires, and after a restart every persisted lease gets a fresh full time to
//! live (its holder had no chance to keep it alive while the store was down).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sled::transaction::{
    abort, ConflictableTransactionResult, TransactionError, TransactionalTree,
};
use sled::{Transactional, Tree};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::store::{
    CasOp, CasResult, Expect, KeyValue, LeaseId, MetaStore, StoreError, WatchEvent,
};

/// Version of the on-disk layout described in the module documentation.
const FORMAT: u8 = 1;
const META_FORMAT: &[u8] = b"format";
const META_REVISION: &[u8] = b"revision";
const META_NEXT_LEASE: &[u8] = b"next-lease";
/// Bytes of a `kv` record before the value.
const KV_HEADER: usize = 1 + 4 * 8;
/// Events a watcher may fall behind before it is dropped.
const WATCH_CAPACITY: usize = 1024;
/// Longest lease time to live accepted.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest the reaper sleeps without looking at the deadlines.
const REAPER_MAX_SLEEP: Duration = Duration::from_secs(1);

/// A [`MetaStore`] in a local sled database.
pub struct SledStore {
    inner: Arc<Inner>,
}

impl SledStore {
    /// Opens (creating if needed) the store in directory `dir`. Must be called
    /// inside a tokio runtime: it spawns the lease reaper task there.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::with_config(sled::Config::new().path(dir.as_ref()))
    }

    /// Opens a store that lives in memory and in temporary files removed when
    /// it is dropped (for tests).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::with_config(sled::Config::new().temporary(true))
    }

    fn with_config(config: sled::Config) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StoreError::NoRuntime)?;
        let db = config.open().map_err(StoreError::backend)?;
        let open_tree = |name: &str| db.open_tree(name).map_err(StoreError::backend);
        let kv = open_tree("kv")?;
        let meta = open_tree("meta")?;
        let leases = open_tree("leases")?;
        let lease_keys = open_tree("lease-keys")?;

        match meta.get(META_FORMAT).map_err(StoreError::backend)? {
            None => {
                meta.insert(META_FORMAT, &[FORMAT][..])
                    .map_err(StoreError::backend)?;
                db.flush().map_err(StoreError::backend)?;
            }
            Some(format) if format.as_ref() == [FORMAT] => {}
            Some(format) => {
                return Err(StoreError::Corrupt(format!(
                    "its format {format:?} is not format {FORMAT}, the only one this build knows"
                )))
            }
        }

        let now = Instant::now();
        let mut clocks = HashMap::new();
        for entry in leases.iter() {
            let (id, record) = entry.map_err(StoreError::backend)?;
            let id = LeaseId(decode_u64(&id)?);
            let ttl = decode_lease(&record)?;
            clocks.insert(
                id,
                LeaseClock {
                    ttl,
                    deadline: now + ttl,
                },
            );
        }

        let inner = Arc::new(Inner {
            db,
            kv,
            meta,
            leases,
            lease_keys,
            writer: tokio::sync::Mutex::new(()),
            clocks: Mutex::new(clocks),
            watchers: Mutex::new(Vec::new()),
            reaper: Arc::new(Notify::new()),
        });
        runtime.spawn(reap(Arc::downgrade(&inner), inner.reaper.clone()));
        Ok(Self { inner })
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Wake the reaper so it notices the store is gone and ends.
        self.inner.reaper.notify_one();
    }
}

/// When a lease expires.
#[derive(Debug, Clone, Copy)]
struct LeaseClock {
    ttl: Duration,
    deadline: Instant,
}

/// A watch: its prefix and where its events go.
struct Watcher {
    prefix: String,
    tx: mpsc::Sender<WatchEvent>,
}

struct Inner {
    db: sled::Db,
    kv: Tree,
    meta: Tree,
    leases: Tree,
    lease_keys: Tree,
    /// Serialises mutations, so revisions and watch events are in order.
    writer: tokio::sync::Mutex<()>,
    clocks: Mutex<HashMap<LeaseId, LeaseClock>>,
    watchers: Mutex<Vec<Watcher>>,
    /// Wakes the reaper: a lease was granted, or the store is dropped.
    reaper: Arc<Notify>,
}

/// Locks a std mutex; the data it guards stays consistent even if a holder
/// panicked (every critical section is a single map or vector update).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// Runs `f` as one transaction over every tree.
    fn txn<R>(
        &self,
        f: impl Fn(&Tx<'_>) -> ConflictableTransactionResult<R, StoreError>,
    ) -> Result<R, StoreError> {
        (&self.kv, &self.meta, &self.leases, &self.lease_keys)
            .transaction(|(kv, meta, leases, lease_keys)| {
                f(&Tx {
                    kv,
                    meta,
                    leases,
                    lease_keys,
                })
            })
            .map_err(|error| match error {
                TransactionError::Abort(error) => error,
                TransactionError::Storage(error) => StoreError::backend(error),
            })
    }

    /// Writes everything changed so far to the files.
    async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(StoreError::backend)?
            .map_err(StoreError::backend)?;
        Ok(())
    }

    /// Hands committed changes to the watchers. Called under the writer lock
    /// right after the commit, so no cancellation can lose an event.
    fn publish(&self, events: &[WatchEvent]) {
        if events.is_empty() {
            return;
        }
        lock(&self.watchers).retain(|watcher| {
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

    /// Fails unless the lease exists and has not expired.
    fn check_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match lock(&self.clocks).get(&lease) {
            None => Err(StoreError::LeaseNotFound(lease)),
            Some(clock) if clock.deadline <= Instant::now() => Err(StoreError::LeaseExpired(lease)),
            Some(_) => Ok(()),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        lock(&self.clocks).remove(&lease);
        let id = lease.0.to_be_bytes();
        let mut keys = Vec::new();
        for entry in self.lease_keys.scan_prefix(id) {
            let (index, _) = entry.map_err(StoreError::backend)?;
            keys.push(decode_key(&index[id.len()..])?);
        }
        let events = self.txn(|tx| {
            tx.leases.remove(&id[..])?;
            let mut events = Vec::new();
            if keys.is_empty() {
                return Ok(events);
            }
            let revision = tx.bump()?;
            for key in &keys {
                if let Some(kv) = tx.delete(key)? {
                    events.push(WatchEvent::Delete { kv, revision });
                }
            }
            Ok(events)
        })?;
        self.publish(&events);
        self.flush().await
    }

    /// Leases whose deadline has passed.
    fn expired(&self, now: Instant) -> Vec<LeaseId> {
        lock(&self.clocks)
            .iter()
            .filter(|(_, clock)| clock.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    fn next_deadline(&self) -> Option<Instant> {
        lock(&self.clocks)
            .values()
            .map(|clock| clock.deadline)
            .min()
    }
}

/// The reaper task: revokes leases as they expire; ends when the store is dropped.
async fn reap(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            for lease in inner.expired(Instant::now()) {
                tracing::debug!(%lease, "lease expired");
                if let Err(error) = inner.revoke_lease(lease).await {
                    tracing::warn!(%lease, %error, "cannot revoke an expired lease");
                }
            }
            inner.next_deadline()
        };
        let cap = Instant::now() + REAPER_MAX_SLEEP;
        let until = next.map_or(cap, |deadline| deadline.min(cap));
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = wake.notified() => {}
        }
    }
}

/// One transaction's view of the trees.
struct Tx<'a> {
    kv: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    leases: &'a TransactionalTree,
    lease_keys: &'a TransactionalTree,
}

type TxResult<T> = ConflictableTransactionResult<T, StoreError>;

impl Tx<'_> {
    fn revision(&self) -> TxResult<u64> {
        match self.meta.get(META_REVISION)? {
            None => Ok(0),
            Some(bytes) => decode_u64(&bytes).or_else(abort),
        }
    }

    fn next_lease(&self) -> TxResult<LeaseId> {
        let next = match self.meta.get(META_NEXT_LEASE)? {
            None => 1,
            Some(bytes) => decode_u64(&bytes).or_else(abort)?,
        };
        self.meta
            .insert(META_NEXT_LEASE, &(next + 1).to_be_bytes()[..])?;
        Ok(LeaseId(next))
    }

    /// Increments the revision; returns the new one.
    fn bump(&self) -> TxResult<u64> {
        let revision = self.revision()? + 1;
        self.meta
            .insert(META_REVISION, &revision.to_be_bytes()[..])?;
        Ok(revision)
    }

    fn get(&self, key: &str) -> TxResult<Option<KeyValue>> {
        match self.kv.get(key.as_bytes())? {
            None => Ok(None),
            Some(record) => decode_kv(key, &record).map(Some).or_else(abort),
        }
    }

    /// Writes the key at `revision`; returns its new value.
    fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        revision: u64,
    ) -> TxResult<KeyValue> {
        if let Some(lease) = lease {
            if self.leases.get(lease.0.to_be_bytes())?.is_none() {
                return abort(StoreError::LeaseNotFound(lease));
            }
        }
        let previous = self.get(key)?;
        if let Some(old) = previous.as_ref().and_then(|kv| kv.lease) {
            self.lease_keys.remove(lease_index(old, key))?;
        }
        if let Some(lease) = lease {
            self.lease_keys.insert(lease_index(lease, key), &[][..])?;
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: previous.as_ref().map_or(revision, |kv| kv.create_revision),
            mod_revision: revision,
            version: previous.as_ref().map_or(1, |kv| kv.version + 1),
            lease,
        };
        self.kv.insert(key.as_bytes(), encode_kv(&kv))?;
        Ok(kv)
    }

    /// Deletes the key; returns the value it had.
    fn delete(&self, key: &str) -> TxResult<Option<KeyValue>> {
        let previous = self.get(key)?;
        if let Some(kv) = &previous {
            if let Some(lease) = kv.lease {
                self.lease_keys.remove(lease_index(lease, key))?;
            }
            self.kv.remove(key.as_bytes())?;
        }
        Ok(previous)
    }
}

fn lease_index(lease: LeaseId, key: &str) -> Vec<u8> {
    let mut index = lease.0.to_be_bytes().to_vec();
    index.extend_from_slice(key.as_bytes());
    index
}

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!("a counter has {} bytes instead of 8", bytes.len()))
    })?;
    Ok(u64::from_be_bytes(array))
}

fn decode_key(bytes: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| StoreError::Corrupt("a key is not UTF-8".into()))
}

fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut record = Vec::with_capacity(KV_HEADER + kv.value.len());
    record.push(FORMAT);
    record.extend_from_slice(&kv.create_revision.to_be_bytes());
    record.extend_from_slice(&kv.mod_revision.to_be_bytes());
    record.extend_from_slice(&kv.version.to_be_bytes());
    record.extend_from_slice(&kv.lease.map_or(0, |lease| lease.0).to_be_bytes());
    record.extend_from_slice(&kv.value);
    record
}

fn decode_kv(key: &str, record: &[u8]) -> Result<KeyValue, StoreError> {
    if record.len() < KV_HEADER || record[0] != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "the record of key {key} is malformed"
        )));
    }
    let field = |i: usize| decode_u64(&record[1 + 8 * i..9 + 8 * i]);
    let lease = field(3)?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: record[KV_HEADER..].to_vec(),
        create_revision: field(0)?,
        mod_revision: field(1)?,
        version: field(2)?,
        lease: (lease != 0).then_some(LeaseId(lease)),
    })
}

fn encode_lease(ttl: Duration) -> Vec<u8> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut record = vec![FORMAT];
    record.extend_from_slice(&ttl_ms.to_be_bytes());
    record
}

fn decode_lease(record: &[u8]) -> Result<Duration, StoreError> {
    match record.split_first() {
        Some((&FORMAT, ttl)) => Ok(Duration::from_millis(decode_u64(ttl)?)),
        _ => Err(StoreError::Corrupt("a lease record is malformed".into())),
    }
}

#[async_trait]
impl MetaStore for SledStore {
    async fn revision(&self) -> Result<u64, StoreError> {
        match self
            .inner
            .meta
            .get(META_REVISION)
            .map_err(StoreError::backend)?
        {
            None => Ok(0),
            Some(bytes) => decode_u64(&bytes),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self
            .inner
            .kv
            .get(key.as_bytes())
            .map_err(StoreError::backend)?
        {
            None => Ok(None),
            Some(record) => decode_kv(key, &record).map(Some),
        }
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let mut kvs = Vec::new();
        for entry in self.inner.kv.scan_prefix(prefix.as_bytes()) {
            let (key, record) = entry.map_err(StoreError::backend)?;
            kvs.push(decode_kv(&decode_key(&key)?, &record)?);
        }
        Ok(kvs)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let _writer = inner.writer.lock().await;
        if let Some(lease) = lease {
            inner.check_lease(lease)?;
        }
        let (revision, kv) = inner.txn(|tx| {
            let revision = tx.bump()?;
            Ok((revision, tx.put(key, &value, lease, revision)?))
        })?;
        inner.publish(&[WatchEvent::Put { kv, revision }]);
        inner.flush().await?;
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let _writer = inner.writer.lock().await;
        let deleted = inner.txn(|tx| match tx.get(key)? {
            None => Ok(None),
            Some(_) => {
                let revision = tx.bump()?;
                Ok(tx
                    .delete(key)?
                    .map(|kv| WatchEvent::Delete { kv, revision }))
            }
        })?;
        let Some(event) = deleted else {
            return Ok(false);
        };
        inner.publish(&[event]);
        inner.flush().await?;
        Ok(true)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        op: CasOp,
    ) -> Result<CasResult, StoreError> {
        let inner = &self.inner;
        let _writer = inner.writer.lock().await;
        let (result, event) = inner.txn(|tx| {
            let current = tx.get(key)?;
            let holds = match (expect, &current) {
                (Expect::Absent, None) => true,
                (Expect::ModRevision(revision), Some(kv)) => kv.mod_revision == revision,
                _ => false,
            };
            let unchanged = |succeeded, current| -> TxResult<_> {
                let revision = tx.revision()?;
                Ok((
                    CasResult {
                        succeeded,
                        current,
                        revision,
                    },
                    None,
                ))
            };
            if !holds {
                return unchanged(false, current);
            }
            match &op {
                CasOp::Put(value) => {
                    let revision = tx.bump()?;
                    let kv = tx.put(key, value, None, revision)?;
                    let result = CasResult {
                        succeeded: true,
                        current: Some(kv.clone()),
                        revision,
                    };
                    Ok((result, Some(WatchEvent::Put { kv, revision })))
                }
                CasOp::Delete if current.is_none() => unchanged(true, None),
                CasOp::Delete => {
                    let revision = tx.bump()?;
                    let event = tx
                        .delete(key)?
                        .map(|kv| WatchEvent::Delete { kv, revision });
                    Ok((
                        CasResult {
                            succeeded: true,
                            current: None,
                            revision,
                        },
                        event,
                    ))
                }
            }
        })?;
        if let Some(event) = event {
            inner.publish(&[event]);
            inner.flush().await?;
        }
        Ok(result)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(StoreError::InvalidTtl(ttl));
        }
        let inner = &self.inner;
        let _writer = inner.writer.lock().await;
        let lease = inner.txn(|tx| {
            let lease = tx.next_lease()?;
            tx.leases
                .insert(&lease.0.to_be_bytes()[..], encode_lease(ttl))?;
            Ok(lease)
        })?;
        let deadline = Instant::now() + ttl;
        lock(&inner.clocks).insert(lease, LeaseClock { ttl, deadline });
        inner.reaper.notify_one();
        inner.flush().await?;
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut clocks = lock(&self.inner.clocks);
        match clocks.get_mut(&lease) {
            None => Err(StoreError::LeaseNotFound(lease)),
            Some(clock) if clock.deadline <= now => {
                self.inner.reaper.notify_one();
                Err(StoreError::LeaseExpired(lease))
            }
            Some(clock) => {
                clock.deadline = now + clock.ttl;
                Ok(())
            }
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_CAPACITY);
        // Under the writer lock: the watcher sees exactly the changes
        // committed after this call.
        let _writer = self.inner.writer.lock().await;
        lock(&self.inner.watchers).push(Watcher {
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
    async fn conformance_suite() {
        let store = SledStore::temporary().expect("a temporary store opens");
        // Leases of 1 s leave room for a loaded machine's scheduling delays.
        conformance::run_all(&store, Duration::from_secs(1)).await;
    }

    #[test]
    fn opening_outside_a_runtime_is_an_error() {
        assert!(matches!(SledStore::temporary(), Err(StoreError::NoRuntime)));
    }

    #[test]
    fn kv_records_round_trip() {
        let kv = KeyValue {
            key: "/a".into(),
            value: b"hello".to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease: Some(LeaseId(9)),
        };
        assert_eq!(decode_kv("/a", &encode_kv(&kv)).expect("decodes"), kv);
        let bare = KeyValue {
            lease: None,
            value: Vec::new(),
            ..kv
        };
        assert_eq!(decode_kv("/a", &encode_kv(&bare)).expect("decodes"), bare);
        assert!(matches!(
            decode_kv("/a", &[FORMAT, 0, 1]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_kv("/a", &[9; KV_HEADER]),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn data_and_leases_survive_a_restart() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let lease = {
            let store = SledStore::open(dir.path()).expect("the store opens");
            store.put("/k", b"v".to_vec(), None).await.expect("put");
            let lease = store
                .grant_lease(Duration::from_secs(1))
                .await
                .expect("grant");
            store
                .put("/live", b"1".to_vec(), Some(lease))
                .await
                .expect("put with lease");
            assert_eq!(store.revision().await.expect("revision"), 2);
            lease
        };
        // Stay down longer than the lease's time to live: the lease must
        // still get a full one after the restart.
        tokio::time::sleep(Duration::from_millis(1200)).await;

        let store = SledStore::open(dir.path()).expect("the store reopens");
        assert_eq!(store.revision().await.expect("revision"), 2);
        assert_eq!(
            store.get("/k").await.expect("get").map(|kv| kv.value),
            Some(b"v".to_vec())
        );
        let live = store
            .get("/live")
            .await
            .expect("get")
            .expect("the leased key survived");
        assert_eq!(live.lease, Some(lease));
        store
            .keep_alive(lease)
            .await
            .expect("the lease got a fresh time to live");
        let fresh = store
            .grant_lease(Duration::from_secs(5))
            .await
            .expect("grant");
        assert!(fresh > lease, "lease ids are never reused");

        let deadline = Instant::now() + Duration::from_secs(5);
        while store.get("/live").await.expect("get").is_some() {
            assert!(Instant::now() < deadline, "the lease never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.revision().await.expect("revision"), 3);
    }
}
