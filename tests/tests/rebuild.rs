//! Rebuild, drain and rebalance: copies move to other disks while the
//! vDisk serves I/O (or, offline, the zone's repair worker moves them), and
//! nothing is lost.

use std::time::{Duration, Instant};

use tessera_replicator::Volume;
use tessera_tests::{pattern, TestZone};
use tessera_zone::records::{MoveReason, Vdisk};
use tessera_zone::service::{CreateDatastore, Health, VdiskView};
use uuid::Uuid;

const MIB: u64 = 1 << 20;

/// Waits until the vDisk is healthy with no move in progress.
async fn wait_settled(zone: &TestZone, ds: &str, name: &str, limit: Duration) -> VdiskView {
    let start = Instant::now();
    loop {
        let v = zone.api.vdisk(ds, name).await.unwrap();
        if v.health == Health::Healthy && v.vdisk.placement.moves.is_empty() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{ds}/{name} not settled after {limit:?}: moves {:?}, repair {:?}",
            v.vdisk.placement.moves,
            v.repair
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every copy of every chunk holds `model`.
async fn assert_copies(vol: &Volume, model: &[u8]) {
    for copy in 0..vol.copies() {
        let mut buf = vec![0u8; model.len()];
        vol.read_copy(0, &mut buf, copy).await.unwrap();
        assert!(buf == model, "copy {copy} differs from what was written");
    }
}

fn all_disks(v: &Vdisk) -> Vec<Uuid> {
    let mut d: Vec<Uuid> = v.placement.groups.iter().flatten().copied().collect();
    d.sort();
    d.dedup();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_rebuilt_while_writes_go_on_then_a_second_node_may_die() {
    let mut zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 2).await;
    let size = 24 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let mut cfg = zone.volume_config("ds", "v");
    cfg.repair_bandwidth = 16 * MIB; // slow enough that writes overlap the rebuild
    let vol = Volume::open(cfg).await.unwrap();
    let mut model = pattern(1, 0, size as usize);
    vol.write(0, &model).await.unwrap();
    vol.flush().await.unwrap();
    let version = vol.placement_version();

    // One copy's node dies and the operator removes it for good.
    let lost_disk = vdisk.placement.groups[0][0];
    let kept_disk = vdisk.placement.groups[0][1];
    let lost = zone.node_of_disk(&lost_disk).await;
    let lost_uuid = zone.node_uuid(lost).await;
    zone.kill_node(lost);
    let refused = zone.api.remove_node(lost_uuid, false).await;
    assert!(refused.is_err(), "an up node is not removed without force");
    let start = Instant::now();
    loop {
        match zone.api.remove_node(lost_uuid, false).await {
            Ok(disks) => {
                assert_eq!(disks, vec![lost_disk]);
                break;
            }
            Err(_) if start.elapsed() < Duration::from_secs(15) => {
                // Its liveness has not expired yet.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot remove the dead node: {e}"),
        }
    }

    // Writes go on while the rebuild copies.
    let mut writes = 0;
    let started = Instant::now();
    loop {
        let off = (writes * 5 % 24) * MIB + 4096 * (writes % 7);
        let data = pattern(100 + writes, off, 8192);
        vol.write(off, &data).await.expect("write during rebuild");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        writes += 1;
        let v = zone.api.vdisk("ds", "v").await.unwrap();
        if v.health == Health::Healthy && v.vdisk.placement.moves.is_empty() {
            break;
        }
        if let Some(m) = v.vdisk.placement.moves.first() {
            assert_eq!(m.from, lost_disk);
            assert_eq!(m.reason, MoveReason::Rebuild);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rebuild did not finish: {:?}",
            v.repair
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vol.flush().await.unwrap();
    let settled = wait_settled(&zone, "ds", "v", Duration::from_secs(10)).await;
    let group = &settled.vdisk.placement.groups[0];
    assert_eq!(group.len(), 2);
    assert!(!group.contains(&lost_disk), "the lost disk left the group");
    assert!(group.contains(&kept_disk));
    assert!(writes > 5, "writes went on during the rebuild ({writes})");
    // The volume follows the new placement without a reopen.
    let wait = Instant::now();
    while vol.placement_version() <= version + 1 {
        assert!(
            wait.elapsed() < Duration::from_secs(10),
            "volume kept the old placement"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(vol.all_current());
    assert_copies(&vol, &model).await;

    // Full redundancy again: the other original copy may die now.
    let kept = zone.node_of_disk(&kept_disk).await;
    zone.kill_node(kept);
    let mut buf = vec![0u8; size as usize];
    vol.read(0, &mut buf)
        .await
        .expect("read with one node left");
    assert!(buf == model, "data lost after the second node died");
    let more = pattern(9, 3 * MIB, 65536);
    vol.write(3 * MIB, &more)
        .await
        .expect("write with one copy");
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_past_the_rebuild_delay_is_rebuilt_offline_and_its_copy_freed() {
    let mut zone = TestZone::start_with(3, 256 * MIB, Duration::from_secs(2)).await;
    zone.datastore("ds", 2).await;
    let size = 16 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let vol = zone.open("ds", "v").await;
    let model = pattern(3, 0, size as usize);
    vol.write(0, &model).await.unwrap();
    vol.close().await.unwrap();
    let _worker = zone.start_repair_worker();

    // Nobody has the vDisk open: the worker rebuilds it.
    let lost_disk = vdisk.placement.groups[0][1];
    let lost = zone.node_of_disk(&lost_disk).await;
    zone.kill_node(lost);
    // Wait for the zone to see it down and, after the delay, plan the move.
    let start = Instant::now();
    loop {
        let v = zone.api.vdisk("ds", "v").await.unwrap();
        if let Some(m) = v.vdisk.placement.moves.first() {
            assert_eq!((m.from, m.reason), (lost_disk, MoveReason::Rebuild));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no rebuild planned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = wait_settled(&zone, "ds", "v", Duration::from_secs(60)).await;
    assert!(!all_disks(&settled.vdisk).contains(&lost_disk));
    let start = Instant::now();
    while zone
        .api
        .vdisk("ds", "v")
        .await
        .unwrap()
        .vdisk
        .lease
        .is_some()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker closes the vDisk when done"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The node comes back and ranks first again: the copy may move back
    // (rebalance). Once settled, every disk that holds no copy any more has
    // had its old copy freed.
    zone.start_node(lost);
    zone.wait_nodes_up(3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    loop {
        let v = wait_settled(&zone, "ds", "v", Duration::from_secs(60)).await;
        let placed = all_disks(&v.vdisk);
        let disks = zone.api.disks().await.unwrap();
        let leftover: Vec<(Uuid, u64)> = disks
            .iter()
            .filter(|d| !placed.contains(&d.uuid) && d.used > 0)
            .map(|d| (d.uuid, d.used))
            .collect();
        if leftover.is_empty() && v.vdisk.released.is_empty() && v.vdisk.lease.is_none() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "moved-away copies not freed: {leftover:?}, released {:?}",
            v.vdisk.released
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Reads from every copy give the data.
    let vol = zone.open("ds", "v").await;
    assert_copies(&vol, &model).await;
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_disk_takes_its_share_with_bounded_movement() {
    let mut zone = TestZone::start(3, 512 * MIB).await;
    let mut first: Vec<Uuid> = Vec::new();
    for i in 0..3 {
        first.push(zone.disk_of_node(i).await);
    }
    zone.api
        .create_datastore(&CreateDatastore {
            name: "ds".into(),
            mirrors: 2,
            stripes: Some(8),
            disks: Some(first.clone()),
        })
        .await
        .unwrap();
    let size = 32 * MIB;
    let mut before = Vec::new();
    let mut models = Vec::new();
    for i in 0..3u64 {
        let name = format!("v{i}");
        before.push(zone.vdisk("ds", &name, size).await);
        let vol = zone.open("ds", &name).await;
        let model = pattern(20 + i, 0, size as usize);
        vol.write(0, &model).await.unwrap();
        vol.close().await.unwrap();
        models.push(model);
    }
    // One vDisk stays open (its writer moves its copies); the others are
    // moved by the repair worker.
    let open = zone.open("ds", "v0").await;
    let _worker = zone.start_repair_worker();

    let added = zone.add_node();
    zone.wait_nodes_up(4).await;
    let new_disk = zone.disk_of_node(added).await;
    zone.api.add_datastore_disk("ds", new_disk).await.unwrap();

    let mut moved_groups = 0;
    let mut total_groups = 0;
    let mut on_new = 0;
    // Give the planner time to start moves before waiting for them to end.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, b) in before.iter().enumerate() {
        let name = format!("v{i}");
        let after = wait_settled(&zone, "ds", &name, Duration::from_secs(120)).await;
        for (g, (old, new)) in b
            .placement
            .groups
            .iter()
            .zip(&after.vdisk.placement.groups)
            .enumerate()
        {
            total_groups += 1;
            assert_eq!(new.len(), 2, "group {g} of {name} has two copies");
            let kept = new.iter().filter(|d| old.contains(d)).count();
            if kept < 2 {
                moved_groups += 1;
                assert_eq!(kept, 1, "group {g} of {name} moved one copy at a time");
                assert!(
                    new.contains(&new_disk),
                    "copies move only onto the new disk"
                );
            }
            if new.contains(&new_disk) {
                on_new += 1;
            }
        }
    }
    assert!(on_new > 0, "the new disk took no share");
    assert!(
        moved_groups < total_groups,
        "movement is bounded: {moved_groups} of {total_groups} groups moved"
    );
    // Nothing lost, on any copy.
    assert_copies(&open, &models[0]).await;
    let w = pattern(77, 5 * MIB, 4096);
    open.write(5 * MIB, &w).await.unwrap();
    open.close().await.unwrap();
    for (i, model) in models.iter().enumerate().skip(1) {
        let vol = zone.open("ds", &format!("v{i}")).await;
        assert_copies(&vol, model).await;
        vol.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_opening_takes_the_vdisk_from_the_repair_worker() {
    let mut zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 2).await;
    let size = 64 * MIB;
    let vdisk = zone.vdisk("ds", "v", size).await;
    let vol = zone.open("ds", "v").await;
    let mut model = pattern(5, 0, size as usize);
    vol.write(0, &model).await.unwrap();
    let victim_disk = vdisk.placement.groups[0][1];
    let victim = zone.node_of_disk(&victim_disk).await;
    zone.kill_node(victim);
    // Every chunk is rewritten while the copy is down: all of it is dirty.
    let late = pattern(6, 0, size as usize);
    vol.write(0, &late).await.unwrap();
    vol.close().await.unwrap();
    model.copy_from_slice(&late);

    // A slow worker starts resyncing the offline vDisk...
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(tessera_replicator::worker::run(
        tessera_replicator::worker::WorkerConfig {
            zone: std::sync::Arc::new(zone.api.clone()),
            host: "repair-worker".into(),
            bandwidth: 8 * MIB,
            period: Duration::from_millis(100),
        },
        stopped,
    ));
    zone.start_node(victim);
    zone.wait_nodes_up(3).await;
    let start = Instant::now();
    loop {
        let v = zone.api.vdisk("ds", "v").await.unwrap();
        if v.vdisk.lease.as_ref().is_some_and(|l| l.repair) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the worker did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and a VM starting takes it over without force, continues the
    // resync, and reads the right data meanwhile.
    let vm = zone.open("ds", "v").await;
    let mut buf = vec![0u8; size as usize];
    vm.read(0, &mut buf).await.unwrap();
    assert!(buf == model);
    let settled = wait_settled(&zone, "ds", "v", Duration::from_secs(60)).await;
    assert_eq!(settled.vdisk.lease.as_ref().map(|l| l.repair), Some(false));
    assert_copies(&vm, &model).await;
    vm.close().await.unwrap();
    let _ = stop.send(());
}
