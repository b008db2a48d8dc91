//! `tessera_bench::checked`'s format-v3 reader against disk files that real
//! storage nodes wrote: a zone of two `tessera node run --format-version 3`
//! processes, a mirrored vDisk written, discarded and zeroed in part, and
//! every copy read back from the disk files — while the nodes run (the
//! block map in the live log, block crcs still in the crc journal), after a
//! flush (crcs in the crc table), and after a restart (the map in the
//! checkpoint written at open). Then the reader aims corruption as the
//! fault campaign does: one copy of a live metadata log page damaged costs
//! nothing; both copies of the newest flushed log page damaged lose the
//! map (the crc journal header's durable mark says so), and the node never
//! reads the chunk as zeros; a block map lost stays untrusted across
//! restarts, but for the chunks written whole since (the checkpoints'
//! lost flag and `Trusted` records, which the reader follows too).
//!
//! It needs the `tessera` executable: `$TESSERA_BIN`, or the one cargo
//! built next to the test binary; without one it fails, saying so.

use std::os::unix::fs::FileExt;

use tessera_bench::checked::{block_tag, crc32c, DiskLayout, Loss, MapSource, BLOCK};
use tessera_tests::{pattern, TestZone};

const MIB: u64 = 1 << 20;

/// Whether [`tessera_tests::tessera_bin`] would find an executable.
/// A read at `at` either fails or returns `want`: never zeros nor other
/// content.
async fn error_or_written(
    vol: &tessera_replicator::Volume,
    at: u64,
    back: &mut [u8],
    want: &[u8],
    what: &str,
) {
    if vol.read(at, back).await.is_ok() {
        assert!(
            back == want,
            "{what} read back as something else than was written (zeros: {})",
            back.iter().all(|x| *x == 0)
        );
    }
}

/// What the copies were read from, for the assertions' messages.
#[derive(Debug, Default)]
struct Seen {
    log_blocks: usize,
    checkpoint_blocks: usize,
    pending_crcs: usize,
}

/// Reads every node's copy of the vDisk from its disk file with the
/// independent reader and checks it against `want` (the vDisk's content):
/// held blocks verify under their owner tags, unheld blocks are zeros.
fn check_copies(zone: &TestZone, vdisk: uuid::Uuid, want: &[u8], copies: usize) -> Seen {
    let chunks = want.len() as u64 / MIB;
    let bpc = (MIB / BLOCK as u64) as usize;
    let mut seen = Seen::default();
    let mut found = 0;
    for node in &zone.nodes {
        let f = std::fs::File::open(&node.disk).expect("disk file");
        let l = DiskLayout::read(&f).expect("a superblock");
        assert_eq!(l.version, 3);
        let map = l.thin_map(&f).expect("the block map");
        assert!(!map.untrusted(), "node {}: {map:?}", node.index);
        let crcs = l.thin_crcs(&f).expect("the crcs");
        seen.pending_crcs += crcs.pending.len();
        if map.chunks().all(|((v, _), _)| *v != vdisk) {
            continue;
        }
        found += 1;
        for c in 0..chunks {
            let expect = &want[(c * MIB) as usize..((c + 1) * MIB) as usize];
            let places = map.blocks(vdisk, c);
            for b in 0..bpc {
                let block = &expect[b * BLOCK..(b + 1) * BLOCK];
                let place = places.and_then(|p| p[b]);
                let Some(p) = place else {
                    assert!(
                        block.iter().all(|x| *x == 0),
                        "node {} chunk {c} block {b}: holds nothing but was written",
                        node.index
                    );
                    continue;
                };
                match p.source {
                    MapSource::Log { .. } => seen.log_blocks += 1,
                    MapSource::Checkpoint { .. } => seen.checkpoint_blocks += 1,
                }
                let mut data = vec![0u8; BLOCK];
                f.read_exact_at(&mut data, l.block_data(p.phys))
                    .expect("block data");
                assert!(
                    data == block,
                    "node {} chunk {c} block {b} (physical {}): wrong data",
                    node.index,
                    p.phys
                );
                let tag = block_tag(vdisk, c, p.generation, b as u32);
                assert_eq!(
                    crcs.crcs[p.phys as usize],
                    crc32c(&data) ^ tag,
                    "node {} chunk {c} block {b} (physical {}): stored crc",
                    node.index,
                    p.phys
                );
            }
        }
    }
    assert_eq!(found, copies, "copies found");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v3_reader_reads_what_real_nodes_wrote() {
    let mut zone = TestZone::start_formatted(2, 64 * MIB, 3).await;
    zone.datastore("ds", 2).await;
    let vdisk = zone.vdisk("ds", "v", 8 * MIB).await.uuid;
    let vol = zone.open("ds", "v").await;
    let mut want = vec![0u8; (4 * MIB) as usize];
    // Chunk 0 whole, a few blocks of chunk 1, part of a block of chunk 2;
    // chunk 3 never written.
    let put = |want: &mut Vec<u8>, off: u64, data: &[u8]| {
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    let a = pattern(1, 0, MIB as usize);
    vol.write(0, &a).await.unwrap();
    put(&mut want, 0, &a);
    let b = pattern(2, MIB + 40960, 3 * BLOCK);
    vol.write(MIB + 40960, &b).await.unwrap();
    put(&mut want, MIB + 40960, &b);
    let c = pattern(3, 2 * MIB + 1024, 512);
    vol.write(2 * MIB + 1024, &c).await.unwrap();
    put(&mut want, 2 * MIB + 1024, &c);
    // Whole blocks discarded (freed), part of one zeroed, and blocks of
    // the freed range written again (a new allocation, a new generation).
    vol.discard(64 * 1024, 64 * 1024).await.unwrap();
    put(&mut want, 64 * 1024, &vec![0u8; 64 * 1024]);
    vol.write_zeroes(200 * 1024 + 512, 1024).await.unwrap();
    put(&mut want, 200 * 1024 + 512, &[0u8; 1024]);
    let d = pattern(4, 80 * 1024, 2 * BLOCK);
    vol.write(80 * 1024, &d).await.unwrap();
    put(&mut want, 80 * 1024, &d);

    // The nodes run: the map is in the live log, crcs in the journal.
    let running = check_copies(&zone, vdisk, &want, 2);
    assert!(running.log_blocks > 0, "{running:?}");
    assert!(running.pending_crcs > 0, "{running:?}");

    // A flush stores the crcs into the crc table.
    vol.flush().await.unwrap();
    let flushed = check_copies(&zone, vdisk, &want, 2);
    assert_eq!(flushed.pending_crcs, 0, "{flushed:?}");
    vol.close().await.unwrap();

    // A restart: the map read back, then written as the open's checkpoint.
    for i in 0..2 {
        zone.kill_node(i);
        zone.start_node(i);
    }
    zone.wait_nodes_up(2).await;
    let reopened = check_copies(&zone, vdisk, &want, 2);
    assert_eq!(reopened.log_blocks, 0, "{reopened:?}");
    assert!(reopened.checkpoint_blocks > 0, "{reopened:?}");

    // More writes after the open: in the log after that checkpoint.
    let vol = zone.open("ds", "v").await;
    let e = pattern(5, 3 * MIB, 2 * BLOCK);
    vol.write(3 * MIB, &e).await.unwrap();
    put(&mut want, 3 * MIB, &e);
    let after = check_copies(&zone, vdisk, &want, 2);
    assert!(
        after.log_blocks >= 4 && after.checkpoint_blocks > 0,
        "{after:?}"
    );
    vol.close().await.unwrap();
}

/// Flips one byte of the allocation record of `(vdisk, chunk)` block 0 in
/// the given copies of the metadata log ring (the record must be in the
/// live log), where the independent reader says it is.
fn flip_log_record(path: &std::path::Path, vdisk: uuid::Uuid, chunk: u64, copies: &[usize]) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("disk file");
    let l = DiskLayout::read(&f).expect("a superblock");
    let map = l.thin_map(&f).expect("the block map");
    let place = map.blocks(vdisk, chunk).expect("the chunk")[0].expect("block 0");
    let MapSource::Log { pos, slot, .. } = place.source else {
        panic!("block 0 of chunk {chunk} is not in the live log: {place:?}");
    };
    for &c in copies {
        let at = l.log_record(c, pos, slot).expect("v3") + 30;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        b[0] ^= 0x5a;
        f.write_all_at(&b, at).expect("write");
    }
}

/// One damaged copy of a live metadata log page costs nothing: the node
/// reads the other copy, and so does the independent reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_damaged_copy_of_a_log_page_loses_nothing() {
    let mut zone = TestZone::start_formatted(1, 64 * MIB, 3).await;
    zone.datastore("ds", 1).await;
    let vdisk = zone.vdisk("ds", "v", 4 * MIB).await.uuid;
    let vol = zone.open("ds", "v").await;
    let a = pattern(7, 0, MIB as usize);
    vol.write(0, &a).await.unwrap();
    vol.flush().await.unwrap();
    vol.close().await.unwrap();
    zone.kill_node(0);
    let disk = zone.nodes[0].disk.clone();
    for copy in [0, 1] {
        flip_log_record(&disk, vdisk, 0, &[copy]);
        let f = std::fs::File::open(&disk).unwrap();
        let l = DiskLayout::read(&f).unwrap();
        let map = l.thin_map(&f).unwrap();
        assert!(!map.untrusted());
        assert_eq!(
            map.blocks(vdisk, 0).map(|b| b.iter().flatten().count()),
            Some(256)
        );
        // Back as it was, for the other copy's turn.
        flip_log_record(&disk, vdisk, 0, &[copy]);
    }
    flip_log_record(&disk, vdisk, 0, &[1]);
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    let vol = zone.open("ds", "v").await;
    let mut back = vec![0u8; MIB as usize];
    vol.read(0, &mut back).await.unwrap();
    assert!(back == a, "the node read the other copy of the page");
    vol.close().await.unwrap();
}

/// Both copies of the newest metadata log page damaged — the page holding
/// the allocation of a write that was acknowledged and flushed, with no
/// page after it — must not make that write read as zeros (an error is
/// fine: the replicator then reads another copy and rewrites this one).
/// Replay ends at the damaged page as at a page torn by a crash, and no
/// later page says it was durable: the crc journal header's durable mark
/// does, and the independent reader finds the map lost by it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_copies_of_the_newest_log_page_damaged_never_read_as_zeros() {
    let mut zone = TestZone::start_formatted(1, 64 * MIB, 3).await;
    zone.datastore("ds", 1).await;
    let vdisk = zone.vdisk("ds", "v", 4 * MIB).await.uuid;
    let vol = zone.open("ds", "v").await;
    let a = pattern(7, 0, MIB as usize);
    vol.write(0, &a).await.unwrap();
    vol.flush().await.unwrap();
    let b = pattern(8, MIB, MIB as usize);
    vol.write(MIB, &b).await.unwrap();
    vol.flush().await.unwrap();
    vol.close().await.unwrap();
    zone.kill_node(0);
    let disk = zone.nodes[0].disk.clone();
    flip_log_record(&disk, vdisk, 1, &[0, 1]);
    {
        let f = std::fs::File::open(&disk).unwrap();
        let map = DiskLayout::read(&f).unwrap().thin_map(&f).unwrap();
        assert!(
            matches!(map.loss[..], [Loss::DurableMark { .. }]) && !map.trusts(vdisk, 1),
            "the reader finds the map lost by the durable mark: {:?} (durable mark {}, log pages {:?})",
            map.loss,
            map.log_durable,
            map.log_pages
        );
    }
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    let vol = zone.open("ds", "v").await;
    let mut back = vec![0u8; MIB as usize];
    error_or_written(&vol, MIB, &mut back, &b, "chunk 1").await;
    vol.close().await.unwrap();
}

/// A format-v3 node whose block map could not be read back whole (both
/// checkpoint areas damaged) reads every chunk as an error until it is
/// written whole — and goes on doing so after its next restart, for the
/// chunks not written whole since, once the log has moved on past the
/// pages of before (here: other chunks written): its checkpoints carry the
/// lost flag and the chunks written whole since, and the independent
/// reader finds both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_block_map_stays_untrusted_across_restarts() {
    let mut zone = TestZone::start_formatted(1, 64 * MIB, 3).await;
    zone.datastore("ds", 1).await;
    let vdisk = zone.vdisk("ds", "v", 4 * MIB).await.uuid;
    let vol = zone.open("ds", "v").await;
    let a = pattern(9, 0, MIB as usize);
    vol.write(0, &a).await.unwrap();
    vol.flush().await.unwrap();
    vol.close().await.unwrap();
    // A restart: the map goes into the checkpoint written at open.
    zone.kill_node(0);
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    zone.kill_node(0);
    let disk = zone.nodes[0].disk.clone();
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        let l = DiskLayout::read(&f).unwrap();
        for area in l.thin.unwrap().checkpoints {
            let at = area + 9;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
        }
        assert!(l.thin_map(&f).unwrap().lost);
    }
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    let vol = zone.open("ds", "v").await;
    let mut back = vec![0u8; MIB as usize];
    assert!(
        vol.read(0, &mut back).await.is_err(),
        "chunk 0 is not trusted"
    );
    // Other chunks written (whole first, then block by block, flushed):
    // the log goes round the ring, checkpoints are taken.
    let b = pattern(10, MIB, MIB as usize);
    vol.write(MIB, &b).await.unwrap();
    for i in 0..200u64 {
        let at = MIB + (i % 256) * BLOCK as u64;
        vol.discard(at, BLOCK as u64).await.unwrap();
        vol.flush().await.unwrap();
        vol.write(at, &b[(at - MIB) as usize..][..BLOCK])
            .await
            .unwrap();
        vol.flush().await.unwrap();
    }
    vol.close().await.unwrap();
    zone.kill_node(0);
    {
        let f = std::fs::File::open(&disk).unwrap();
        let map = DiskLayout::read(&f).unwrap().thin_map(&f).unwrap();
        let c = map.checkpoint.as_ref().expect("a checkpoint");
        assert!(c.lost, "the checkpoint says the map was lost");
        assert!(
            map.loss.contains(&Loss::EarlierOpen),
            "the reader keeps the map lost: {:?}",
            map.loss
        );
        assert!(
            map.trusts(vdisk, 1) && !map.trusts(vdisk, 0),
            "chunk 1 (written whole since) is trusted again, chunk 0 is not: {:?}",
            map.trusted
        );
    }
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    let vol = zone.open("ds", "v").await;
    error_or_written(&vol, 0, &mut back, &a, "chunk 0").await;
    vol.close().await.unwrap();
}

/// A block whose newest crc is only in the crc journal (written, not
/// flushed, the node killed): with that record damaged, replay drops it
/// and the block fails its checksum — never reads as good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_crc_journal_record_fails_the_block() {
    let mut zone = TestZone::start_formatted(1, 64 * MIB, 3).await;
    zone.datastore("ds", 1).await;
    let vdisk = zone.vdisk("ds", "v", 4 * MIB).await.uuid;
    let vol = zone.open("ds", "v").await;
    let a = pattern(11, 0, 8 * BLOCK);
    vol.write(0, &a).await.unwrap();
    zone.kill_node(0);
    drop(vol);
    let disk = zone.nodes[0].disk.clone();
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        let l = DiskLayout::read(&f).unwrap();
        let map = l.thin_map(&f).unwrap();
        let p = map.blocks(vdisk, 0).unwrap()[3].unwrap();
        let crcs = l.thin_crcs(&f).unwrap();
        let at = *crcs
            .pending
            .get(&p.phys)
            .expect("the crc is in a journal record");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at + 17).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at + 17).unwrap();
        let after = l.thin_crcs(&f).unwrap();
        assert!(!after.pending.contains_key(&p.phys), "replay drops it");
    }
    zone.start_node(0);
    zone.wait_nodes_up(1).await;
    // The first writer was never closed: take its lease over (which reads
    // back what it may have left half written: the chunk).
    let mut cfg = zone.volume_config("ds", "v");
    cfg.force = true;
    let failed = match tessera_replicator::Volume::open(cfg).await {
        Err(e) => format!("{e:?}"),
        Ok(vol) => {
            let mut back = vec![0u8; BLOCK];
            let e = vol.read(3 * BLOCK as u64, &mut back).await.err();
            let mut other = vec![0u8; BLOCK];
            vol.read(2 * BLOCK as u64, &mut other).await.unwrap();
            assert!(other == a[2 * BLOCK..3 * BLOCK]);
            format!("{e:?}")
        }
    };
    assert!(
        failed.contains("Checksum") && failed.contains("chunk 0 block 3"),
        "block 3 fails its checksum: {failed}"
    );
}
