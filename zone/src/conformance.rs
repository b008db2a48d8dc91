//! The conformance suite of [`MetaStore`]: the behaviour every implementation
//! (sled now, etcd later) must show, as async functions over a `&dyn MetaStore`.
//!
//! Each check works under its own key prefix below `/conformance/`, deletes
//! what it finds there first (so it can run again on a persistent store), and
//! panics on the first deviation. Run them all with [`run_all`].
//!
//! Revisions are compared relatively (strictly increasing, equal to what the
//! store answered), never to absolute numbers, so a store that already holds
//! data passes too.

use std::time::Duration;

use crate::store::{CasOp, Expect, MetaStore, StoreError, WatchEvent};

/// How long a watch check waits for an event before it fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs every check. `lease_ttl` is the time to live of the leases the lease
/// checks grant; the sled store honours short ones (300 ms), etcd rounds
/// anything under its minimum (about 1.5 s) up, so give it 2 s or more.
pub async fn run_all(store: &dyn MetaStore, lease_ttl: Duration) {
    put_get_delete(store).await;
    range_is_sorted_and_bounded_by_prefix(store).await;
    revisions_increase_on_every_change(store).await;
    compare_and_swap(store).await;
    concurrent_compare_and_swap_loses_no_update(store).await;
    leases_bind_keys(store, lease_ttl).await;
    leases_expire_unless_kept_alive(store, lease_ttl).await;
    cas_put_detaches_the_lease(store, lease_ttl).await;
    watch_sees_every_change_in_order(store, lease_ttl).await;
}

async fn clean(store: &dyn MetaStore, prefix: &str) {
    for kv in store.range(prefix).await.expect("range") {
        store.delete(&kv.key).await.expect("delete");
    }
}

/// Put, get and delete one key, with its revisions and version.
pub async fn put_get_delete(store: &dyn MetaStore) {
    let key = "/conformance/basic/key";
    clean(store, "/conformance/basic/").await;

    assert_eq!(store.get(key).await.expect("get"), None);
    let r1 = store.put(key, b"one".to_vec(), None).await.expect("put");
    let kv = store.get(key).await.expect("get").expect("the key exists");
    assert_eq!((kv.key.as_str(), kv.value.as_slice()), (key, &b"one"[..]));
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        (r1, r1, 1, None)
    );

    let r2 = store.put(key, b"two".to_vec(), None).await.expect("put");
    assert!(r2 > r1);
    let kv = store.get(key).await.expect("get").expect("the key exists");
    assert_eq!(kv.value, b"two");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2)
    );

    assert!(store.delete(key).await.expect("delete"));
    assert_eq!(store.get(key).await.expect("get"), None);
    assert!(
        !store.delete(key).await.expect("delete"),
        "a second delete finds nothing"
    );

    let r3 = store.put(key, Vec::new(), None).await.expect("put");
    let kv = store.get(key).await.expect("get").expect("the key exists");
    assert_eq!(
        (kv.create_revision, kv.version),
        (r3, 1),
        "a re-created key starts over"
    );
    assert!(kv.value.is_empty());
    assert!(store.delete(key).await.expect("delete"));
}

/// `range` returns exactly the keys under the prefix, sorted.
pub async fn range_is_sorted_and_bounded_by_prefix(store: &dyn MetaStore) {
    clean(store, "/conformance/range").await;
    for key in [
        "/conformance/range/b",
        "/conformance/range/a",
        "/conformance/range/c",
        "/conformance/rangex",
        "/conformance/range",
    ] {
        store
            .put(key, key.as_bytes().to_vec(), None)
            .await
            .expect("put");
    }
    let keys: Vec<String> = store
        .range("/conformance/range/")
        .await
        .expect("range")
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        keys,
        [
            "/conformance/range/a",
            "/conformance/range/b",
            "/conformance/range/c"
        ]
    );
    let all = store.range("/conformance/range").await.expect("range");
    assert_eq!(all.len(), 5);
    assert!(
        all.windows(2).all(|w| w[0].key < w[1].key),
        "keys are sorted"
    );
    assert!(store
        .range("/conformance/range/z")
        .await
        .expect("range")
        .is_empty());
    clean(store, "/conformance/range").await;
}

/// Every change bumps the revision; reads and no-op deletes do not.
pub async fn revisions_increase_on_every_change(store: &dyn MetaStore) {
    let prefix = "/conformance/revision/";
    clean(store, prefix).await;
    let start = store.revision().await.expect("revision");
    let r1 = store
        .put("/conformance/revision/a", b"1".to_vec(), None)
        .await
        .expect("put");
    assert!(r1 > start);
    assert_eq!(store.revision().await.expect("revision"), r1);
    let r2 = store
        .put("/conformance/revision/b", b"1".to_vec(), None)
        .await
        .expect("put");
    assert!(r2 > r1);
    store.get("/conformance/revision/a").await.expect("get");
    store.range(prefix).await.expect("range");
    assert!(!store
        .delete("/conformance/revision/missing")
        .await
        .expect("delete"));
    assert_eq!(
        store.revision().await.expect("revision"),
        r2,
        "reads and no-op deletes change nothing"
    );
    assert!(store
        .delete("/conformance/revision/a")
        .await
        .expect("delete"));
    let r3 = store.revision().await.expect("revision");
    assert!(r3 > r2);
    clean(store, prefix).await;
}

/// Compare-and-swap on absence and on mod revision.
pub async fn compare_and_swap(store: &dyn MetaStore) {
    let key = "/conformance/cas/key";
    clean(store, "/conformance/cas/").await;

    let created = store
        .compare_and_swap(key, Expect::Absent, CasOp::Put(b"1".to_vec()))
        .await
        .expect("cas");
    assert!(created.succeeded);
    let kv = created.current.expect("the new value");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision, kv.version),
        (&b"1"[..], created.revision, 1)
    );
    assert_eq!(store.revision().await.expect("revision"), created.revision);

    let again = store
        .compare_and_swap(key, Expect::Absent, CasOp::Put(b"x".to_vec()))
        .await
        .expect("cas");
    assert!(!again.succeeded, "the key exists");
    assert_eq!(
        again.current.as_ref(),
        Some(&kv),
        "a failed CAS answers the current value"
    );
    assert_eq!(
        again.revision, created.revision,
        "a failed CAS changes nothing"
    );

    let stale = Expect::ModRevision(kv.mod_revision + 1000);
    let refused = store
        .compare_and_swap(key, stale, CasOp::Put(b"x".to_vec()))
        .await
        .expect("cas");
    assert!(!refused.succeeded);
    assert_eq!(refused.current.as_ref(), Some(&kv));

    let updated = store
        .compare_and_swap(
            key,
            Expect::ModRevision(kv.mod_revision),
            CasOp::Put(b"2".to_vec()),
        )
        .await
        .expect("cas");
    assert!(updated.succeeded);
    assert!(updated.revision > created.revision);
    let kv2 = updated.current.expect("the new value");
    assert_eq!(
        (
            kv2.value.as_slice(),
            kv2.mod_revision,
            kv2.create_revision,
            kv2.version
        ),
        (&b"2"[..], updated.revision, kv.create_revision, 2)
    );

    let late = store
        .compare_and_swap(key, Expect::ModRevision(kv.mod_revision), CasOp::Delete)
        .await
        .expect("cas");
    assert!(!late.succeeded, "a delete on an old revision is refused");
    assert_eq!(store.get(key).await.expect("get"), Some(kv2.clone()));

    let deleted = store
        .compare_and_swap(key, Expect::ModRevision(kv2.mod_revision), CasOp::Delete)
        .await
        .expect("cas");
    assert!(deleted.succeeded);
    assert_eq!(deleted.current, None);
    assert_eq!(store.get(key).await.expect("get"), None);

    let missing = store
        .compare_and_swap(
            key,
            Expect::ModRevision(kv2.mod_revision),
            CasOp::Put(b"3".to_vec()),
        )
        .await
        .expect("cas");
    assert!(
        !missing.succeeded,
        "a revision check on a missing key fails"
    );
    assert_eq!(missing.current, None);
}

/// Four writers incrementing one counter with CAS loops lose no increment.
pub async fn concurrent_compare_and_swap_loses_no_update(store: &dyn MetaStore) {
    let key = "/conformance/counter/value";
    clean(store, "/conformance/counter/").await;
    const PER_WRITER: u64 = 20;

    let increment = || async {
        for _ in 0..PER_WRITER {
            loop {
                let current = store.get(key).await.expect("get");
                let (expect, value) = match &current {
                    None => (Expect::Absent, 0),
                    Some(kv) => {
                        let text = std::str::from_utf8(&kv.value).expect("the counter is text");
                        (
                            Expect::ModRevision(kv.mod_revision),
                            text.parse::<u64>().expect("the counter is a number"),
                        )
                    }
                };
                let next = (value + 1).to_string().into_bytes();
                if store
                    .compare_and_swap(key, expect, CasOp::Put(next))
                    .await
                    .expect("cas")
                    .succeeded
                {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    };
    tokio::join!(increment(), increment(), increment(), increment());

    let kv = store
        .get(key)
        .await
        .expect("get")
        .expect("the counter exists");
    assert_eq!(kv.value, (4 * PER_WRITER).to_string().into_bytes());
    assert_eq!(kv.version, 4 * PER_WRITER);
    clean(store, "/conformance/counter/").await;
}

fn is_lease_gone(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::LeaseExpired(_) | StoreError::LeaseNotFound(_)
    )
}

/// Keys put with a lease carry it, and go when it is revoked.
pub async fn leases_bind_keys(store: &dyn MetaStore, ttl: Duration) {
    clean(store, "/conformance/lease/").await;
    let lease = store.grant_lease(ttl).await.expect("grant");
    let other = store.grant_lease(ttl).await.expect("grant");
    assert_ne!(lease, other);

    store
        .put("/conformance/lease/a", b"a".to_vec(), Some(lease))
        .await
        .expect("put");
    store
        .put("/conformance/lease/b", b"b".to_vec(), Some(lease))
        .await
        .expect("put");
    store
        .put("/conformance/lease/c", b"c".to_vec(), Some(other))
        .await
        .expect("put");
    store
        .put("/conformance/lease/d", b"d".to_vec(), None)
        .await
        .expect("put");
    let a = store
        .get("/conformance/lease/a")
        .await
        .expect("get")
        .expect("the key exists");
    assert_eq!(a.lease, Some(lease));
    store.keep_alive(lease).await.expect("keep alive");

    let before = store.revision().await.expect("revision");
    store.revoke(lease).await.expect("revoke");
    assert!(
        store.revision().await.expect("revision") > before,
        "the deletions are a change"
    );
    let keys: Vec<String> = store
        .range("/conformance/lease/")
        .await
        .expect("range")
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/conformance/lease/c", "/conformance/lease/d"]);

    let error = store
        .keep_alive(lease)
        .await
        .expect_err("a revoked lease cannot be kept alive");
    assert!(is_lease_gone(&error), "unexpected error {error:?}");
    let error = store
        .put("/conformance/lease/e", b"e".to_vec(), Some(lease))
        .await
        .expect_err("a revoked lease binds nothing");
    assert!(is_lease_gone(&error), "unexpected error {error:?}");
    store.revoke(lease).await.expect("revoking twice is fine");

    // Re-putting a key under another lease moves it to that lease.
    store
        .put("/conformance/lease/d", b"d".to_vec(), Some(other))
        .await
        .expect("put");
    store.revoke(other).await.expect("revoke");
    assert!(store
        .range("/conformance/lease/")
        .await
        .expect("range")
        .is_empty());
}

/// A lease kept alive outlives its time to live; one left alone expires and
/// takes its keys with it.
pub async fn leases_expire_unless_kept_alive(store: &dyn MetaStore, ttl: Duration) {
    let key = "/conformance/expiry/key";
    clean(store, "/conformance/expiry/").await;
    let lease = store.grant_lease(ttl).await.expect("grant");
    store
        .put(key, b"alive".to_vec(), Some(lease))
        .await
        .expect("put");

    for _ in 0..4 {
        tokio::time::sleep(ttl / 2).await;
        store.keep_alive(lease).await.expect("keep alive");
    }
    assert!(
        store.get(key).await.expect("get").is_some(),
        "a lease kept alive keeps its keys"
    );

    let deadline = tokio::time::Instant::now() + ttl * 3 + Duration::from_secs(1);
    while store.get(key).await.expect("get").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease did not expire"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = store
        .keep_alive(lease)
        .await
        .expect_err("an expired lease cannot be kept alive");
    assert!(is_lease_gone(&error), "unexpected error {error:?}");
}

/// A compare-and-swap put writes the key without a lease.
pub async fn cas_put_detaches_the_lease(store: &dyn MetaStore, ttl: Duration) {
    let key = "/conformance/detach/key";
    clean(store, "/conformance/detach/").await;
    let lease = store.grant_lease(ttl).await.expect("grant");
    store
        .put(key, b"1".to_vec(), Some(lease))
        .await
        .expect("put");
    let kv = store.get(key).await.expect("get").expect("the key exists");
    let swapped = store
        .compare_and_swap(
            key,
            Expect::ModRevision(kv.mod_revision),
            CasOp::Put(b"2".to_vec()),
        )
        .await
        .expect("cas");
    assert!(swapped.succeeded);
    assert_eq!(swapped.current.and_then(|kv| kv.lease), None);
    store.revoke(lease).await.expect("revoke");
    let kv = store
        .get(key)
        .await
        .expect("get")
        .expect("the key no longer belongs to the lease");
    assert_eq!(kv.value, b"2");
    clean(store, "/conformance/detach/").await;
}

async fn next_event(events: &mut tokio::sync::mpsc::Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(EVENT_TIMEOUT, events.recv())
        .await
        .expect("an event arrives in time")
        .expect("the watch is open")
}

/// A watch sees puts, deletes and lease deletions under its prefix, in
/// revision order, and nothing else.
pub async fn watch_sees_every_change_in_order(store: &dyn MetaStore, ttl: Duration) {
    clean(store, "/conformance/watch").await;
    let mut events = store.watch("/conformance/watch/").await.expect("watch");

    let r1 = store
        .put("/conformance/watch/a", b"1".to_vec(), None)
        .await
        .expect("put");
    store
        .put("/conformance/watchx", b"not watched".to_vec(), None)
        .await
        .expect("put");
    let cas = store
        .compare_and_swap(
            "/conformance/watch/a",
            Expect::ModRevision(r1),
            CasOp::Put(b"2".to_vec()),
        )
        .await
        .expect("cas");
    assert!(cas.succeeded);
    assert!(store.delete("/conformance/watch/a").await.expect("delete"));
    let lease = store.grant_lease(ttl).await.expect("grant");
    let r4 = store
        .put("/conformance/watch/b", b"3".to_vec(), Some(lease))
        .await
        .expect("put");
    store.revoke(lease).await.expect("revoke");

    match next_event(&mut events).await {
        WatchEvent::Put { kv, revision } => {
            assert_eq!(
                (
                    kv.key.as_str(),
                    kv.value.as_slice(),
                    revision,
                    kv.mod_revision
                ),
                ("/conformance/watch/a", &b"1"[..], r1, r1)
            );
        }
        other => panic!("expected the first put, got {other:?}"),
    }
    match next_event(&mut events).await {
        WatchEvent::Put { kv, revision } => {
            assert_eq!((kv.value.as_slice(), revision), (&b"2"[..], cas.revision));
        }
        other => panic!("expected the CAS put, got {other:?}"),
    }
    let deleted_at = match next_event(&mut events).await {
        WatchEvent::Delete { kv, revision } => {
            assert_eq!(
                (kv.key.as_str(), kv.value.as_slice()),
                ("/conformance/watch/a", &b"2"[..])
            );
            assert!(revision > cas.revision);
            revision
        }
        other => panic!("expected the delete, got {other:?}"),
    };
    match next_event(&mut events).await {
        WatchEvent::Put { kv, revision } => {
            assert_eq!(
                (kv.key.as_str(), revision, kv.lease),
                ("/conformance/watch/b", r4, Some(lease))
            );
            assert!(revision > deleted_at);
        }
        other => panic!("expected the leased put, got {other:?}"),
    }
    match next_event(&mut events).await {
        WatchEvent::Delete { kv, revision } => {
            assert_eq!(kv.key, "/conformance/watch/b");
            assert!(revision > r4);
        }
        other => panic!("expected the deletion by revoke, got {other:?}"),
    }
    assert!(events.try_recv().is_err(), "nothing else was watched");
    clean(store, "/conformance/watch").await;
}
