//! The zone service over [`MemStore`] with a simulated [`Env`], on tokio's
//! paused clock, as a deterministic simulation runs it; chunk sizes and the
//! vDisk size limit.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::tests::{cluster, kill, mirrors, open_req, registration, vdisk_req};
use super::*;
use crate::env::{Env, SIMULATED_EPOCH_MS};
use crate::mem_store::MemStore;

/// A zone over a fresh [`MemStore`] with [`Env::simulated`]`(seed)`.
async fn simulated(seed: u64) -> ZoneService {
    let svc = ZoneService::new(Arc::new(MemStore::new())).with_env(Env::simulated(seed));
    svc.ensure_zone("sim").await.expect("the zone is created");
    svc
}

fn session(session: Uuid) -> SessionRef {
    SessionRef {
        session,
        ttl_ms: None,
        keep_activity: false,
        settled: None,
    }
}

/// A little history of a zone: nodes, a striped datastore, a vDisk opened,
/// a copy marked stale, time passing, a take-over. Returns everything the
/// zone recorded, as JSON, with the store's revision.
async fn history(seed: u64) -> (serde_json::Value, u64) {
    let svc = simulated(seed).await;
    cluster(&svc, 4, 2).await;
    svc.create_datastore(mirrors("ds", 2, Some(4)))
        .await
        .expect("datastore");
    svc.create_vdisk(vdisk_req("ds", "vd", 1 << 30))
        .await
        .expect("vdisk");
    let opened = svc
        .open_vdisk("ds", "vd", open_req("hv1", 10_000, false))
        .await
        .expect("opens");
    let stale = opened.vdisk.placement.groups[1][0];
    svc.mark_stale(
        "ds",
        "vd",
        MarkStale {
            session: opened.session,
            disks: vec![stale],
            chunks: (0..100).collect(),
        },
    )
    .await
    .expect("marked stale");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let taken = svc
        .open_vdisk("ds", "vd", open_req("hv2", 10_000, false))
        .await
        .expect("the expired lease is taken over");
    let record = serde_json::json!({
        "zone": svc.zone().await.expect("zone"),
        "datastores": svc.datastores().await.expect("datastores"),
        "vdisks": svc.vdisks(None).await.expect("vdisks"),
        "sessions": [opened.session, taken.session],
    });
    (record, svc.store().revision().await.expect("revision"))
}

#[tokio::test(start_paused = true)]
async fn a_seed_replays_the_zone_exactly() {
    let (first, revision) = history(7).await;
    assert_eq!(history(7).await, (first.clone(), revision));

    let (other, _) = history(8).await;
    assert_ne!(first["zone"]["uuid"], other["zone"]["uuid"]);
    assert_ne!(first["vdisks"][0]["uuid"], other["vdisks"][0]["uuid"]);

    // Times come from the simulated clock: 11 s after the zone was made.
    assert_eq!(first["zone"]["created"], SIMULATED_EPOCH_MS / 1000);
    assert_eq!(
        first["vdisks"][0]["lease"]["expires_ms"],
        SIMULATED_EPOCH_MS + 11_000 + 10_000
    );
}

#[tokio::test(start_paused = true)]
async fn vdisk_leases_expire_in_simulated_time() {
    let svc = simulated(1).await;
    cluster(&svc, 1, 1).await;
    svc.create_datastore(mirrors("ds", 1, None))
        .await
        .expect("datastore");
    svc.create_vdisk(vdisk_req("ds", "vd", 1 << 30))
        .await
        .expect("vdisk");
    let first = svc
        .open_vdisk("ds", "vd", open_req("hv1", 10_000, false))
        .await
        .expect("opens");

    tokio::time::sleep(Duration::from_millis(9_999)).await;
    assert!(matches!(
        svc.open_vdisk("ds", "vd", open_req("hv2", 10_000, false))
            .await,
        Err(ZoneError::Conflict(_))
    ));
    assert!(matches!(
        svc.delete_vdisk("ds", "vd", false).await,
        Err(ZoneError::Conflict(_))
    ));
    let renewed = svc
        .renew_vdisk("ds", "vd", session(first.session))
        .await
        .expect("renews");
    assert_eq!(renewed.lease.expires_ms, svc.env().now_ms() + 10_000);

    tokio::time::sleep(Duration::from_millis(10_001)).await;
    let second = svc
        .open_vdisk("ds", "vd", open_req("hv2", 10_000, false))
        .await
        .expect("an expired lease is taken without force");
    assert_eq!(second.epoch, first.epoch + 1);
    assert!(matches!(
        svc.renew_vdisk("ds", "vd", session(first.session)).await,
        Err(ZoneError::LeaseLost(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn nodes_go_down_when_simulated_time_passes_their_ttl() {
    let svc = simulated(1).await.with_node_ttl(Duration::from_secs(5));
    let registered = svc
        .register_node(registration(1, 1))
        .await
        .expect("registers");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        svc.heartbeat(
            registration(1, 1).uuid,
            Heartbeat {
                lease: registered.lease,
                disks: vec![],
                copies: vec![],
                vdisks: vec![],
                usage: None,
                freed_groups: Vec::new(),
            },
        )
        .await
        .expect("a heartbeat in time keeps the node up");
    }
    assert_eq!(svc.nodes().await.expect("nodes")[0].state, NodeState::Up);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(svc.nodes().await.expect("nodes")[0].state, NodeState::Down);
}

#[tokio::test(start_paused = true)]
async fn the_move_planner_counts_the_delay_in_simulated_time() {
    // Nodes whose liveness outlasts the test without heartbeats.
    let svc = simulated(3).await.with_node_ttl(Duration::from_secs(3600));
    cluster(&svc, 3, 1).await;
    svc.create_datastore(mirrors("ds", 2, None))
        .await
        .expect("datastore");
    let vdisk = svc
        .create_vdisk(vdisk_req("ds", "vd", 1 << 30))
        .await
        .expect("vdisk");
    let lost = vdisk.placement.groups[0][0];
    kill(&svc, lost.as_u128() / 100).await;

    let mut planner = MovePlanner::new(svc.clone(), Duration::from_secs(600));
    assert_eq!(planner.run_once().await.expect("planned"), vec![]);
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert_eq!(planner.run_once().await.expect("planned"), vec![]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recorded = planner.run_once().await.expect("planned");
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(
        (recorded[0].mv.from, recorded[0].mv.reason),
        (lost, MoveReason::Rebuild)
    );
}

#[tokio::test]
async fn the_chunk_size_is_a_power_of_two_from_4_kib_to_1_gib() {
    let svc = ZoneService::new(Arc::new(MemStore::new()));
    assert_eq!(svc.chunk_size(), CHUNK_SIZE);
    for bad in [0, 1, 2048, 3 << 12, 1 << 31, u64::MAX] {
        let error = svc
            .clone()
            .with_chunk_size(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad} is refused"));
        assert_eq!(
            error.to_string(),
            format!("a chunk size must be a power of two from 4 KiB to 1 GiB, not {bad} bytes")
        );
    }
    for good in [4 << 10, 64 << 10, 1 << 20, 1 << 30] {
        let svc = svc.clone().with_chunk_size(good).expect("accepted");
        assert_eq!(svc.chunk_size(), good);
    }
}

#[tokio::test(start_paused = true)]
async fn new_vdisks_take_the_services_chunk_size() {
    let svc = simulated(1)
        .await
        .with_chunk_size(64 << 10)
        .expect("64 KiB chunks");
    cluster(&svc, 2, 1).await;
    svc.create_datastore(mirrors("ds", 2, Some(3)))
        .await
        .expect("datastore");
    let v = svc
        .create_vdisk(vdisk_req("ds", "vd", (1 << 20) + 512))
        .await
        .expect("vdisk");
    assert_eq!(v.placement.chunk_size, 64 << 10);
    // 17 chunks over 3 groups: 6, 6 and 5.
    assert_eq!(v.placement.chunks(v.size), 17);
    let lens: Vec<u64> = (0..3).map(|g| v.placement.group_len(g, v.size)).collect();
    assert_eq!(lens, [6, 6, 5]);
    for g in 0..3 {
        assert_eq!(
            v.placement.group_chunks(g, v.size).count() as u64,
            lens[g as usize]
        );
    }

    // A vDisk made with another chunk size keeps its own.
    let other = svc.clone().with_chunk_size(1 << 20).expect("1 MiB");
    let grown = other
        .resize_vdisk("ds", "vd", 2 << 20)
        .await
        .expect("grows");
    assert_eq!(grown.placement.chunk_size, 64 << 10);
}

#[tokio::test(start_paused = true)]
async fn vdisks_larger_than_the_limit_are_refused_with_the_limit() {
    let svc = simulated(1).await;
    cluster(&svc, 1, 1).await;
    svc.create_datastore(mirrors("ds", 1, None))
        .await
        .expect("datastore");
    let largest = svc
        .create_vdisk(vdisk_req("ds", "big", MAX_VDISK_SIZE))
        .await
        .expect("the largest vDisk");
    assert_eq!(largest.placement.chunks(largest.size), MAX_VDISK_CHUNKS);
    let error = svc
        .create_vdisk(vdisk_req("ds", "bigger", MAX_VDISK_SIZE + 512))
        .await
        .expect_err("over the limit");
    assert!(matches!(error, ZoneError::Invalid(_)));
    assert_eq!(error.code(), crate::error::code::INVALID);
    assert_eq!(
        error.to_string(),
        "a vDisk may be at most 64 TiB (70368744177664 bytes), not 70368744178176 bytes"
    );

    svc.create_vdisk(vdisk_req("ds", "vd", 1 << 30))
        .await
        .expect("vdisk");
    let error = svc
        .resize_vdisk("ds", "vd", u64::MAX - 511)
        .await
        .expect_err("over the limit");
    assert_eq!(
        error.to_string(),
        "a vDisk may be at most 64 TiB (70368744177664 bytes), not 18446744073709551104 bytes"
    );
    assert_eq!(
        svc.resize_vdisk("ds", "vd", MAX_VDISK_SIZE)
            .await
            .expect("grows to the limit")
            .size,
        MAX_VDISK_SIZE
    );

    // With small chunks, the chunk count limits first.
    let small = svc.clone().with_chunk_size(64 << 10).expect("64 KiB");
    assert_eq!(max_vdisk_size(64 << 10), 4 << 40);
    let error = small
        .create_vdisk(vdisk_req("ds", "small", (4 << 40) + 512))
        .await
        .expect_err("over the limit");
    assert_eq!(
        error.to_string(),
        "a vDisk may be at most 4 TiB (4398046511104 bytes, 67108864 chunks of 64 KiB), not 4398046511616 bytes"
    );
    small
        .create_vdisk(vdisk_req("ds", "small", 4 << 40))
        .await
        .expect("at the limit");
    let error = small
        .resize_vdisk("ds", "small", 8 << 40)
        .await
        .expect_err("over the limit");
    assert!(error
        .to_string()
        .starts_with("a vDisk may be at most 4 TiB"));
}

#[tokio::test(start_paused = true)]
async fn striped_dirty_sets_stay_compact() {
    let svc = simulated(1).await;
    cluster(&svc, 2, 1).await;
    svc.create_datastore(mirrors("ds", 2, Some(8)))
        .await
        .expect("datastore");
    svc.create_vdisk(vdisk_req("ds", "vd", 64 << 30))
        .await
        .expect("vdisk");
    let opened = svc
        .open_vdisk("ds", "vd", open_req("hv1", 60_000, false))
        .await
        .expect("opens");
    let disk = opened.vdisk.placement.groups[0][1];
    // A copy misses 50 000 consecutive chunks: one run per group.
    let v = svc
        .mark_stale(
            "ds",
            "vd",
            MarkStale {
                session: opened.session,
                disks: vec![disk],
                chunks: (1000..51_000).collect(),
            },
        )
        .await
        .expect("marked stale");
    let dirty = &v.dirty[0];
    assert_eq!((dirty.stripes(), dirty.runs().len()), (8, 8));
    assert_eq!(dirty.count(), 50_000);
    assert!(
        crate::records::encode("/k", &v).expect("encodes").len() < 4096,
        "the record stays small"
    );
    let v = svc
        .mark_clean(
            "ds",
            "vd",
            MarkClean {
                session: opened.session,
                disk,
                chunks: (1000..2000).collect(),
                complete: false,
            },
        )
        .await
        .expect("cleaned");
    assert_eq!(v.dirty[0].runs().len(), 8);
    assert_eq!(v.dirty[0].count(), 49_000);
    assert!(!v.dirty[0].contains(1999) && v.dirty[0].contains(2000));
}

#[tokio::test(start_paused = true)]
async fn moving_a_group_of_the_largest_vdisk_records_one_run() {
    let svc = simulated(1).await;
    cluster(&svc, 3, 1).await;
    svc.create_datastore(mirrors("ds", 2, Some(2)))
        .await
        .expect("datastore");
    let v = svc
        .create_vdisk(vdisk_req("ds", "vd", MAX_VDISK_SIZE))
        .await
        .expect("vdisk");
    let leaving = v.placement.groups[0][0];
    svc.remove_datastore_disk("ds", leaving)
        .await
        .expect("removed");
    let recorded = svc.plan_moves(&HashSet::new()).await.expect("planned");
    assert!(!recorded.is_empty());
    let v = svc.vdisk("ds", "vd").await.expect("found").vdisk;
    let groups = recorded.len() as u64;
    for r in &recorded {
        let dirty = v
            .dirty
            .iter()
            .find(|e| e.disk == r.mv.to)
            .expect("the target's dirty set");
        assert!(dirty.runs().iter().any(|run| *run
            == [
                u64::from(r.mv.group),
                0,
                v.placement.group_len(r.mv.group, v.size)
            ]));
    }
    let dirty: u64 = v.dirty.iter().map(|e| e.count()).sum();
    assert_eq!(dirty, groups * MAX_VDISK_CHUNKS / 2);
    assert!(
        crate::records::encode("/k", &v).expect("encodes").len() < 4096,
        "the record stays small"
    );
}

/// A writer that has not adopted a finished move yet records a disk as
/// having missed chunks of a group the disk left: nothing is recorded (the
/// disk holds no copy of that group any more, so no resync could ever clear
/// it, and the vDisk would never be healthy again). Chunks of its groups are.
#[tokio::test(start_paused = true)]
async fn missed_chunks_of_a_group_the_disk_is_not_in_are_not_recorded() {
    let svc = simulated(1).await;
    cluster(&svc, 4, 1).await;
    svc.create_datastore(mirrors("ds", 2, Some(2)))
        .await
        .expect("datastore");
    svc.create_vdisk(vdisk_req("ds", "vd", 64 << 20))
        .await
        .expect("vdisk");
    let opened = svc
        .open_vdisk("ds", "vd", open_req("hv1", 60_000, false))
        .await
        .expect("opens");
    let groups = &opened.vdisk.placement.groups;
    let disk = groups[1]
        .iter()
        .copied()
        .find(|d| !groups[0].contains(d))
        .expect("with seed 1 on 4 nodes, a disk of group 1 is not in group 0");
    let stale = |chunks: Vec<u64>| MarkStale {
        session: opened.session,
        disks: vec![disk],
        chunks,
    };
    // Chunk 2 is in group 0, which `disk` is not in.
    let v = svc
        .mark_stale("ds", "vd", stale(vec![2]))
        .await
        .expect("marked");
    assert!(
        !v.stale.contains(&disk) && v.dirty.is_empty(),
        "{:?} {:?}",
        v.stale,
        v.dirty
    );
    // Chunks 2 and 3: only 3 (group 1) is recorded.
    let v = svc
        .mark_stale("ds", "vd", stale(vec![2, 3]))
        .await
        .expect("marked");
    assert!(v.stale.contains(&disk));
    let dirty: Vec<u64> = v.dirty.iter().flat_map(|e| e.chunks()).collect();
    assert_eq!(dirty, vec![3]);
}
