//! Mirrored vDisks over real storage node processes: every byte written is
//! read back through the volume, from every copy, and from every disk file.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use tessera_tests::{pattern, TestZone};

const MIB: u64 = 1 << 20;

/// Writes a random mix of sizes and offsets (some crossing chunk boundaries),
/// keeping a model of the expected contents; returns the model.
async fn random_writes(vol: &tessera_replicator::Volume, size: u64, seed: u64) -> Vec<u8> {
    let mut model = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sizes = [512u64, 1024, 4096, 8192, 65536, 3 * 512, MIB, MIB + 4096];
    let mut writes = Vec::new();
    for i in 0..60u64 {
        let len = sizes[rng.random_range(0..sizes.len())];
        let offset = rng.random_range(0..(size - len) / 512) * 512;
        writes.push((offset, pattern(seed * 1000 + i, offset, len as usize)));
    }
    // Runs of disjoint writes go concurrently (many in flight); a write that
    // overlaps one of the run waits for the run, so the model stays exact.
    let mut run: Vec<&(u64, Vec<u8>)> = Vec::new();
    for w in &writes {
        let overlaps = run
            .iter()
            .any(|d| w.0 < d.0 + d.1.len() as u64 && d.0 < w.0 + w.1.len() as u64);
        if overlaps || run.len() == 16 {
            futures_join(vol, &run).await;
            run.clear();
        }
        run.push(w);
        model[w.0 as usize..w.0 as usize + w.1.len()].copy_from_slice(&w.1);
    }
    futures_join(vol, &run).await;
    model
}

async fn futures_join(vol: &tessera_replicator::Volume, writes: &[&(u64, Vec<u8>)]) {
    let mut set = tokio::task::JoinSet::new();
    for w in writes {
        let vol = vol.clone();
        let (off, data) = (w.0, w.1.clone());
        set.spawn(async move { vol.write(off, &data).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task").expect("write");
    }
}

/// Returns what the vDisk `m{mirrors}/v` holds.
async fn check_every_copy(zone: &mut TestZone, mirrors: u32, nodes: usize) -> Vec<u8> {
    let ds = format!("m{mirrors}");
    zone.datastore(&ds, mirrors).await;
    let size = 24 * MIB;
    let vdisk = zone.vdisk(&ds, "v", size).await;
    assert_eq!(vdisk.placement.groups[0].len(), mirrors as usize);
    let vol = zone.open(&ds, "v").await;
    assert_eq!(vol.copies(), mirrors as usize);
    let model = random_writes(&vol, size, mirrors as u64).await;
    vol.flush().await.expect("flush");

    // Through the volume (any copy).
    let mut buf = vec![0u8; size as usize];
    vol.read(0, &mut buf).await.expect("read");
    assert!(buf == model, "volume read differs from what was written");
    // From each copy alone.
    for copy in 0..mirrors as usize {
        let mut buf = vec![0u8; size as usize];
        vol.read_copy(0, &mut buf, copy).await.expect("read copy");
        assert!(buf == model, "copy {copy} differs from what was written");
    }
    vol.close().await.expect("close");

    // At rest, in the disk files: stop the nodes and open their disks.
    let mut groups: HashMap<uuid::Uuid, ()> = HashMap::new();
    for d in &vdisk.placement.groups[0] {
        groups.insert(*d, ());
    }
    for i in 0..nodes {
        zone.stop_node(i);
    }
    let mut found = 0;
    for i in 0..nodes {
        let disk = tessera_chunkstore::Disk::open(&zone.nodes[i].disk).expect("disk opens");
        if !groups.contains_key(&disk.uuid()) {
            continue;
        }
        found += 1;
        for chunk in 0..size / MIB {
            let mut got = vec![0u8; MIB as usize];
            disk.read(vdisk.uuid, chunk, 0, &mut got)
                .expect("read chunk");
            let want = &model[(chunk * MIB) as usize..((chunk + 1) * MIB) as usize];
            assert!(got == want, "chunk {chunk} on node {i} differs");
        }
    }
    assert_eq!(found, mirrors as usize, "every copy's disk was checked");
    for i in 0..nodes {
        zone.start_node(i);
    }
    zone.wait_nodes_up(nodes).await;
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_2_every_byte_on_every_copy() {
    let mut zone = TestZone::start(3, 256 * MIB).await;
    check_every_copy(&mut zone, 2, 3).await;
}

/// Disks of format version 3 (space taken 4 KiB at a time): every byte
/// on every copy, and each copy takes about what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_2_every_byte_on_every_copy_of_format_3() {
    let mut zone = TestZone::start_formatted(3, 256 * MIB, 3).await;
    let model = check_every_copy(&mut zone, 2, 3).await;
    // Each copy takes the 4 KiB blocks written, not the chunks touched.
    let written = model
        .chunks(4096)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64
        * 4096;
    let mut copies = 0;
    for i in 0..3 {
        zone.stop_node(i);
        let disk = tessera_chunkstore::Disk::open(&zone.nodes[i].disk).expect("disk opens");
        assert_eq!(disk.info().format_version, 3);
        for (vdisk, bytes) in disk.usage() {
            assert_eq!(bytes, written, "vDisk {vdisk} on node {i}");
            copies += 1;
        }
        drop(disk);
        zone.start_node(i);
    }
    assert_eq!(copies, 2);
    zone.wait_nodes_up(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_3_every_byte_on_every_copy() {
    let mut zone = TestZone::start(4, 256 * MIB).await;
    check_every_copy(&mut zone, 3, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_and_write_zeroes_read_back_zeros_on_every_copy() {
    let zone = TestZone::start(2, 128 * MIB).await;
    zone.datastore("ds", 2).await;
    zone.vdisk("ds", "v", 8 * MIB).await;
    let vol = zone.open("ds", "v").await;
    let data = pattern(7, 0, (4 * MIB) as usize);
    vol.write(0, &data).await.unwrap();
    vol.discard(MIB, MIB).await.unwrap(); // a whole chunk
    vol.write_zeroes(2 * MIB + 512, 4096).await.unwrap(); // part of a chunk
    let mut want = data.clone();
    want[MIB as usize..2 * MIB as usize].fill(0);
    want[(2 * MIB + 512) as usize..(2 * MIB + 512 + 4096) as usize].fill(0);
    for copy in 0..2 {
        let mut buf = vec![0u8; (4 * MIB) as usize];
        vol.read_copy(0, &mut buf, copy).await.unwrap();
        assert!(buf == want, "copy {copy}");
    }
    // Unwritten space reads as zeros.
    let mut buf = vec![1u8; MIB as usize];
    vol.read(6 * MIB, &mut buf).await.unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_and_unaligned_io_is_refused() {
    let zone = TestZone::start(1, 64 * MIB).await;
    zone.datastore("ds", 1).await;
    zone.vdisk("ds", "v", MIB).await;
    let vol = zone.open("ds", "v").await;
    assert!(vol.write(MIB, &[0u8; 512]).await.is_err());
    assert!(vol.write(MIB - 512, &[0u8; 1024]).await.is_err());
    assert!(vol.write(100, &[0u8; 512]).await.is_err());
    assert!(vol.write(0, &[0u8; 100]).await.is_err());
    let mut buf = [0u8; 512];
    assert!(vol.read(u64::MAX - 511, &mut buf).await.is_err());
    vol.write(MIB - 512, &[9u8; 512]).await.unwrap();
    vol.close().await.unwrap();
}
