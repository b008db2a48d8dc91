//! Helpers shared by the deterministic simulation tests.

#![allow(dead_code)]

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use tessera_replicator::{Volume, VolumeError};
use tessera_sim::harness::Cluster;
use tessera_sim::node::{Match, OpKind, Rule, SimNode};
use tessera_zone::service::Health;
use uuid::Uuid;

pub const BLOCK: usize = 4096;

/// Real time a test's simulation may take (it takes well under a second,
/// simulated time being paused; the rest is room for a loaded machine).
pub const WALL: Duration = Duration::from_secs(30);

pub fn sleep(ms: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(ms))
}

/// Mutations of `chunk` on `disk`.
pub fn writes(disk: Uuid, chunk: u64) -> Match {
    Match {
        kind: Some(OpKind::Mutation),
        disk: Some(disk),
        chunk: Some(chunk),
        whole_chunk: None,
    }
}

/// A guest's small writes (not a resync's whole-chunk copy) of `chunk` on `disk`.
pub fn small_writes(disk: Uuid, chunk: u64) -> Match {
    Match {
        whole_chunk: Some(false),
        ..writes(disk, chunk)
    }
}

/// What a read of the 4 KiB block at `offset` returns.
pub async fn read(v: &Volume, offset: u64) -> Result<Vec<u8>, VolumeError> {
    let mut buf = vec![0u8; BLOCK];
    v.read(offset, &mut buf).await.map(|()| buf)
}

/// Names what a block holds, for assertion messages.
pub fn what(data: &[u8]) -> String {
    if data.iter().all(|b| *b == 0) {
        return "zeros".into();
    }
    format!(
        "write {}",
        u64::from_le_bytes(data[..8].try_into().expect("8 bytes"))
    )
}

/// The node of copy `i` of group `g`.
pub async fn copy_node(c: &Cluster, g: usize, i: usize) -> (Uuid, Arc<SimNode>) {
    let disk = c.groups().await[g][i];
    (disk, c.node_of(disk).clone())
}

/// Advances simulated time, at most `limit`, until the vDisk is healthy:
/// every copy current for the writer, and the zone listing no stale copy,
/// no dirty chunk, and health `healthy`.
pub async fn healthy(c: &Cluster, v: &Volume, limit: Duration) -> bool {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let view = c.view().await;
        if v.all_current()
            && view.health == Health::Healthy
            && view.vdisk.stale.is_empty()
            && view.vdisk.dirty.is_empty()
        {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        sleep(10).await;
    }
}

/// The chunks (of the vDisk's `chunks`) whose content differs between the
/// copies on `x` and `y`, as each node holds them.
pub fn differing(c: &Cluster, x: Uuid, y: Uuid) -> Vec<u64> {
    (0..c.shape.chunks)
        .filter(|chunk| {
            c.node_of(x).peek(x, c.vdisk, *chunk) != c.node_of(y).peek(y, c.vdisk, *chunk)
        })
        .collect()
}

/// Runs `test` (a whole simulation) on a thread of its own and fails if it
/// has not finished after `wall` of real time. A task that never stops
/// being ready keeps paused simulated time from advancing: the simulation
/// would then hang instead of failing. (The thread keeps spinning until
/// the test binary exits.)
pub fn bounded(wall: Duration, test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let sim = std::thread::Builder::new()
        .name("simulation".into())
        .spawn(move || {
            test();
            let _ = done.send(());
        })
        .expect("a thread for the simulation");
    match finished.recv_timeout(wall) {
        Ok(()) | Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = sim.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!(
            "the simulation did not finish within {wall:?} of real time: a task spins \
             without ever waiting, so simulated time stands still"
        ),
    }
}

/// Each `(chunk, id)`: the chunk's first block reads as write `id`.
/// `from` names the copies left to serve the reads, for the message.
pub async fn assert_reads(c: &Cluster, v: &Volume, expected: &[(u64, u64)], from: &str) {
    for &(chunk, id) in expected {
        let data = read(v, c.offset(chunk, 0))
            .await
            .unwrap_or_else(|e| panic!("read chunk {chunk} from {from}: {e}"));
        assert!(
            data == tessera_sim::harness::block(id),
            "chunk {chunk}: write {id} was acknowledged; {from} returns {}",
            what(&data)
        );
    }
}

/// The vDisk becomes healthy within `limit`, and the copies on `x` and `y`
/// are then equal.
pub async fn assert_healed(c: &Cluster, v: &Volume, x: Uuid, y: Uuid, limit: Duration) {
    assert!(
        healthy(c, v, limit).await,
        "the vDisk did not become healthy"
    );
    let differ = differing(c, x, y);
    assert!(differ.is_empty(), "the copies differ in chunks {differ:?}");
}

/// Runs a simulation (see `tessera_sim::harness::run`) bounded by `WALL` of
/// real time (see [`bounded`]).
pub fn simulate<F>(test: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    bounded(WALL, move || tessera_sim::harness::run(test()))
}

/// The disks and nodes of the two copies of group 0, in placement order.
pub async fn copy_pair(c: &Cluster) -> ((Uuid, Arc<SimNode>), (Uuid, Arc<SimNode>)) {
    (copy_node(c, 0, 0).await, copy_node(c, 0, 1).await)
}

/// Fences of `disk`.
pub fn fences(disk: Uuid) -> Match {
    Match {
        kind: Some(OpKind::Fence),
        disk: Some(disk),
        ..Match::default()
    }
}

/// Requests of one kind to `disk`.
pub fn requests(kind: OpKind, disk: Uuid) -> Match {
    Match {
        kind: Some(kind),
        disk: Some(disk),
        ..Match::default()
    }
}

/// Asserts that every copy holds the same 4 KiB block at `offset`.
pub async fn assert_copies_agree(v: &Volume, offset: u64) {
    let copies = each_copy(v, offset).await;
    assert!(
        copies.windows(2).all(|w| w[0] == w[1]),
        "the copies differ: {:?}",
        whats(&copies)
    );
}

/// The 4 KiB block at `offset` as each copy holds it, in placement order.
pub async fn each_copy(v: &Volume, offset: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..v.copies() {
        let mut buf = vec![0u8; BLOCK];
        v.read_copy(offset, &mut buf, i)
            .await
            .expect("every copy is readable");
        out.push(buf);
    }
    out
}

/// [`what`] of each copy.
pub fn whats(copies: &[Vec<u8>]) -> Vec<String> {
    copies.iter().map(|c| what(c)).collect()
}

/// Waits (simulated time) until every copy is current again.
pub async fn healed(c: &Cluster, v: &Volume) {
    assert!(
        c.until(Duration::from_secs(30), || v.all_current()).await,
        "the copies did not become current again"
    );
}

/// Write 2 of block(2) at `at` (in chunk 1) is held at `node` for `disk`
/// while it reaches the other copies; then the writer dies with it in
/// flight. Returns the hold rule (release it to let the node run it).
pub async fn dies_with_a_write_held(
    c: &Cluster,
    v: Volume,
    node: &SimNode,
    disk: Uuid,
    at: u64,
) -> u64 {
    let hold = node.add_rule_times(Rule::Hold(writes(disk, 1)), Some(1));
    let w = {
        let v = v.clone();
        tokio::spawn(async move {
            let _ = v.write(at, &tessera_sim::harness::block(2)).await;
        })
    };
    assert!(c.until(Duration::from_secs(1), || node.held() == 1).await);
    sleep(5).await;
    writer_dies(v, vec![w]).await;
    hold
}

/// The writer dies: its requests in flight are cut off, nothing is closed.
pub async fn writer_dies(v: Volume, tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    drop(v);
}

/// Drains disk `s` (its copy moves to `t`) with the writer's call that
/// records `t` complete held by the zone, and waits until the writer has
/// filled `t` and made that call. Returns the zone rule to release.
pub async fn drain_held_at_completion(c: &Cluster, s: Uuid, t: Uuid) -> u64 {
    use tessera_sim::harness::drain;
    use tessera_sim::zone::{ZoneAction, ZoneCall, ZoneRule};
    let complete = c.zone.add_rule(ZoneRule {
        matches: Box::new(|call| matches!(call, ZoneCall::MarkClean(m) if m.complete)),
        action: ZoneAction::Hold,
        times: None,
    });
    let planned = drain(&c.zone.service, s).await;
    assert_eq!(planned.len(), 1, "{planned:?}");
    assert_eq!((planned[0].mv.from, planned[0].mv.to), (s, t));
    // The writer adopts the move at its next renewal and fills T from S.
    assert!(
        c.until(Duration::from_secs(10), || c.zone.held(complete) == 1)
            .await,
        "the writer filled T"
    );
    complete
}
