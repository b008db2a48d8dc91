//! The power-loss model of the node's activity marks.
//!
//! Marks are applied in batches on a [`PowerLossDevice`]; a crash can come
//! between batches or in the middle of one (a device that fails from its
//! N-th write or sync on, then loses any part of what was not synced, in any
//! order, torn at sectors). After reopening, the marks are exactly those of
//! every batch that returned, plus a prefix of the one that failed: never
//! fewer (a mark that returned is durable), never a mark no batch set.
//! Damage to one copy of any block costs nothing; damage to both copies of a
//! block that a later block counts durable makes the store say "lost", never
//! fewer marks.
//!
//! Seeded: `TESSERA_MARKS_SEED=<seed>` replays one case (its seed is printed
//! on failure), `TESSERA_MARKS_CASES=<n>` runs more.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tessera_chunkstore::{Device, PowerLossDevice};
use tessera_storage_node::marks::{MarkOp, MarkStore, Opened, VdiskMarks, ENTRIES_PER_BLOCK};
use uuid::Uuid;

const VDISKS: [Uuid; 3] = [
    Uuid::from_u128(0xa1),
    Uuid::from_u128(0xb2),
    Uuid::from_u128(0xc3),
];

/// splitmix64: deterministic random cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The marks the store must hold: (vDisk, extent) → epoch.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
struct Model(HashMap<(Uuid, u32), u64>);

impl Model {
    fn apply(&mut self, op: &MarkOp) {
        match *op {
            MarkOp::Set {
                vdisk,
                extent,
                epoch,
            } => {
                let e = self.0.entry((vdisk, extent)).or_insert(epoch);
                *e = (*e).max(epoch);
            }
            MarkOp::Clear {
                vdisk,
                extent,
                upto,
            } => {
                if self.0.get(&(vdisk, extent)).is_some_and(|&e| e <= upto) {
                    self.0.remove(&(vdisk, extent));
                }
            }
            MarkOp::ClearVdisk { vdisk, upto } => {
                self.0.retain(|&(v, _), &mut e| v != vdisk || e > upto)
            }
        }
    }

    fn of(&self, vdisk: Uuid) -> VdiskMarks {
        let mut v: Vec<(u32, u64)> = self
            .0
            .iter()
            .filter(|((d, _), _)| *d == vdisk)
            .map(|(&(_, x), &e)| (x, e))
            .collect();
        v.sort_unstable();
        VdiskMarks::Extents(v)
    }

    fn matches(&self, store: &MarkStore) -> bool {
        VDISKS.iter().all(|&v| store.marks_of(v) == self.of(v))
    }
}

/// A device that fails every write and sync from its `budget`-th on: the
/// moment power went.
struct Failing {
    inner: Arc<PowerLossDevice>,
    budget: AtomicI64,
}

impl Failing {
    fn step(&self) -> io::Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(io::Error::other("power lost"));
        }
        Ok(())
    }
}

impl Device for Failing {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.step()?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.step()?;
        self.inner.sync()
    }
}

fn random_op(r: &mut Rng) -> MarkOp {
    let vdisk = VDISKS[r.below(3) as usize];
    let extent = r.below(8) as u32;
    let epoch = 1 + r.below(5);
    match r.below(10) {
        0..=5 => MarkOp::Set {
            vdisk,
            extent,
            epoch,
        },
        6..=8 => MarkOp::Clear {
            vdisk,
            extent,
            upto: epoch,
        },
        _ => MarkOp::ClearVdisk { vdisk, upto: epoch },
    }
}

fn random_batch(r: &mut Rng) -> Vec<MarkOp> {
    // Mostly small batches; sometimes more than a block holds.
    let n = if r.below(10) == 0 {
        1 + r.below(2 * ENTRIES_PER_BLOCK as u64 + 10)
    } else {
        1 + r.below(4)
    };
    (0..n).map(|_| random_op(r)).collect()
}

/// One case: several lives, each ended by a crash between or inside
/// batches (or inside the open's own switch of halves).
fn run_case(seed: u64) {
    let mut r = Rng(seed);
    // Small halves (8 to 40 blocks) so that halves switch often.
    let half_blocks = 8 + r.below(33);
    let dev = Arc::new(PowerLossDevice::new(2 * half_blocks * 2 * 4096));
    let mut acked = Model::default();
    let mut new = true;
    for life in 0..6 {
        // Sometimes the power goes during the open itself.
        let budget = if r.below(6) == 0 {
            r.below(4) as i64
        } else {
            i64::MAX
        };
        let failing = Arc::new(Failing {
            inner: dev.clone(),
            budget: AtomicI64::new(budget),
        });
        let Ok((store, opened)) = MarkStore::open(failing.clone(), new) else {
            // The power went during the open: its switch of halves may
            // have landed in part; the next life checks the marks.
            dev.crash(r.next());
            continue;
        };
        new = false;
        failing.budget.store(i64::MAX, Ordering::SeqCst);
        assert!(
            !matches!(opened, Opened::Lost(_)),
            "seed {seed}: life {life}: lost without damage: {opened:?}"
        );
        assert!(
            acked.matches(&store),
            "seed {seed}: life {life}: recovered marks differ from the acknowledged ones"
        );
        let batches = r.below(30);
        let inside = r.below(2) == 0;
        for b in 0..batches {
            let last = inside && b + 1 == batches;
            let ops = if last && r.below(2) == 0 {
                // A commit of several blocks, so that a crash can keep a
                // later block of it and lose an earlier one.
                let n = ENTRIES_PER_BLOCK as u64 * (1 + r.below(3)) + 1 + r.below(50);
                (0..n).map(|_| random_op(&mut r)).collect()
            } else {
                random_batch(&mut r)
            };
            if last {
                // The power goes inside this batch's commit: any prefix of
                // the batch may survive.
                failing.budget.store(r.below(3) as i64, Ordering::SeqCst);
                let failed = store.apply(&ops).is_err();
                drop(store);
                dev.crash(r.next());
                acked = check_prefix(seed, life, &dev, &acked, &ops, failed);
                break;
            }
            store
                .apply(&ops)
                .unwrap_or_else(|e| panic!("seed {seed}: life {life}: {e}"));
            ops.iter().for_each(|op| acked.apply(op));
        }
        dev.crash(r.next());
    }
}

/// After a crash inside a batch: the marks are those acknowledged plus a
/// prefix of the batch.
fn check_prefix(
    seed: u64,
    life: u64,
    dev: &Arc<PowerLossDevice>,
    acked: &Model,
    ops: &[MarkOp],
    failed: bool,
) -> Model {
    let (store, opened) = MarkStore::open(dev.clone(), false).expect("reopen after the crash");
    assert!(
        !matches!(opened, Opened::Lost(_)),
        "seed {seed}: life {life}: lost without damage: {opened:?}"
    );
    let mut m = acked.clone();
    let mut survived = m.matches(&store).then(|| m.clone());
    for op in ops {
        m.apply(op);
        if survived.is_none() && m.matches(&store) {
            survived = Some(m.clone());
        }
    }
    assert!(
        survived.is_some(),
        "seed {seed}: life {life}: after a crash in a batch (failed: {failed}) the marks are neither the acknowledged ones nor those plus a prefix of the batch"
    );
    if !failed {
        assert!(
            m.matches(&store),
            "seed {seed}: life {life}: a batch that returned is not whole"
        );
    }
    survived.expect("checked above")
}

fn cases(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("TESSERA_MARKS_SEED") {
        return vec![s.parse().expect("TESSERA_MARKS_SEED is a number")];
    }
    let n = std::env::var("TESSERA_MARKS_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (1..=n).collect()
}

#[test]
fn marks_survive_power_loss_between_and_inside_commits() {
    for seed in cases(300) {
        run_case(seed);
    }
}

/// Applies random batches and returns the store, its device and the model.
fn filled(seed: u64, half_blocks: u64, batches: u64) -> (Arc<PowerLossDevice>, Model) {
    let mut r = Rng(seed);
    let dev = Arc::new(PowerLossDevice::new(2 * half_blocks * 2 * 4096));
    let (store, _) = MarkStore::open(dev.clone(), true).expect("format");
    let mut m = Model::default();
    for _ in 0..batches {
        let ops = random_batch(&mut r);
        store.apply(&ops).expect("apply");
        ops.iter().for_each(|op| m.apply(op));
    }
    (dev, m)
}

#[test]
fn one_flipped_bit_anywhere_costs_nothing() {
    for seed in cases(200) {
        let mut r = Rng(seed ^ 0xf11b);
        let (dev, m) = filled(seed, 16 + r.below(16), r.below(40));
        let offset = r.below(dev.size());
        dev.flip_bit(offset, r.below(8) as u8);
        let (store, opened) = MarkStore::open(dev.clone(), false).expect("reopen");
        assert_eq!(
            opened,
            Opened::Recovered,
            "seed {seed}: one flipped bit at {offset} made the marks lost"
        );
        assert!(
            m.matches(&store),
            "seed {seed}: one flipped bit at {offset} changed the marks"
        );
    }
}

#[test]
fn a_durable_block_damaged_in_both_copies_is_reported_lost_not_dropped() {
    for seed in cases(100) {
        let mut r = Rng(seed ^ 0xdead);
        // Large halves: no switch, so the log has many blocks.
        let (dev, _m) = filled(seed, 64, 8 + r.below(8));
        let (store, _) = MarkStore::open(dev.clone(), false).expect("reopen");
        // Two more commits: the first's block is then followed by the
        // second's, which counts it durable.
        let v = VDISKS[0];
        for x in [100, 101] {
            store
                .apply(&[MarkOp::Set {
                    vdisk: v,
                    extent: x,
                    epoch: 9,
                }])
                .expect("apply");
        }
        let end = store.log_end();
        drop(store);
        // Both copies of the block before the newest.
        let pair = end - 2 * 2 * 4096;
        dev.flip_bit(pair + 100, 3);
        dev.flip_bit(pair + 4096 + 200, 5);
        let (store, opened) = MarkStore::open(dev.clone(), false).expect("reopen");
        assert!(
            matches!(opened, Opened::Lost(_)),
            "seed {seed}: a damaged durable block went unnoticed: {opened:?}"
        );
        for v in VDISKS {
            assert_eq!(store.marks_of(v), VdiskMarks::Any, "seed {seed}");
        }
    }
}

#[test]
fn after_a_loss_a_vdisk_is_known_again_once_its_marks_are_cleared_and_stays_so() {
    let dev = Arc::new(PowerLossDevice::new(2 * 16 * 2 * 4096));
    // A store whose file exists but holds nothing readable is lost.
    let (store, opened) = MarkStore::open(dev.clone(), false).expect("open");
    assert!(matches!(opened, Opened::Lost(_)), "{opened:?}");
    assert_eq!(store.marks_of(VDISKS[0]), VdiskMarks::Any);
    store
        .apply(&[MarkOp::ClearVdisk {
            vdisk: VDISKS[0],
            upto: 7,
        }])
        .expect("clear");
    store.mark(VDISKS[0], 3, 8).expect("mark");
    assert_eq!(store.marks_of(VDISKS[0]), VdiskMarks::Extents(vec![(3, 8)]));
    assert_eq!(store.marks_of(VDISKS[1]), VdiskMarks::Any);
    drop(store);
    // Through a crash and through many switches of halves.
    dev.crash(1);
    for i in 0..4 {
        let (store, opened) = MarkStore::open(dev.clone(), false).expect("reopen");
        assert!(matches!(opened, Opened::Lost(_)), "{i}: {opened:?}");
        assert_eq!(
            store.marks_of(VDISKS[0]),
            VdiskMarks::Extents(vec![(3, 8)]),
            "{i}"
        );
        assert_eq!(store.marks_of(VDISKS[1]), VdiskMarks::Any, "{i}");
        for x in 0..40 {
            store.mark(VDISKS[2], 1000 + x, 1).expect("mark");
        }
        store
            .apply(&[MarkOp::ClearVdisk {
                vdisk: VDISKS[2],
                upto: 0,
            }])
            .expect("clear nothing");
    }
}

#[test]
fn concurrent_marks_share_commits() {
    let dev = Arc::new(PowerLossDevice::new(2 * 256 * 2 * 4096));
    let (store, _) = MarkStore::open(dev.clone(), true).expect("format");
    let store = Arc::new(store);
    let before = dev.sync_count();
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for x in 0..100u32 {
                    store.mark(VDISKS[0], t * 1000 + x, 1).expect("mark");
                    // Marking again is free once durable.
                    store.mark(VDISKS[0], t * 1000 + x, 1).expect("mark");
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().expect("thread"));
    let syncs = dev.sync_count() - before;
    assert!(syncs <= 800, "{syncs} syncs for 800 new marks");
    drop(store);
    dev.crash(7);
    let (store, _) = MarkStore::open(dev.clone(), false).expect("reopen");
    let VdiskMarks::Extents(xs) = store.marks_of(VDISKS[0]) else {
        panic!("lost")
    };
    assert_eq!(xs.len(), 800);
}

#[test]
fn a_store_too_small_for_its_marks_fails_its_writers_and_keeps_what_it_had() {
    let dev = Arc::new(PowerLossDevice::new(2 * 4 * 2 * 4096));
    let (store, _) = MarkStore::open(dev.clone(), true).expect("format");
    let many: Vec<MarkOp> = (0..(4 * ENTRIES_PER_BLOCK) as u32)
        .map(|x| MarkOp::Set {
            vdisk: VDISKS[1],
            extent: x,
            epoch: 1,
        })
        .collect();
    store.mark(VDISKS[0], 1, 1).expect("one mark fits");
    let e = store.apply(&many).expect_err("too many marks");
    assert!(e.to_string().contains("too small"), "{e}");
    drop(store);
    let (store, _) = MarkStore::open(dev.clone(), false).expect("reopen");
    assert_eq!(store.marks_of(VDISKS[0]), VdiskMarks::Extents(vec![(1, 1)]));
}

#[test]
fn any_bytes_open_without_a_panic() {
    for seed in cases(200) {
        let mut r = Rng(seed ^ 0xbad);
        let blocks = 8 + r.below(24);
        let dev = Arc::new(PowerLossDevice::new(2 * blocks * 2 * 4096));
        // Random bytes, and sometimes valid-looking blocks of a real store
        // with random bytes over part of them.
        if r.below(2) == 0 {
            let (store, _) = MarkStore::open(dev.clone(), true).expect("format");
            for _ in 0..r.below(20) {
                store.apply(&random_batch(&mut r)).expect("apply");
            }
        }
        let mut junk = vec![0u8; 4096];
        for _ in 0..r.below(32) {
            junk.iter_mut().for_each(|b| *b = r.next() as u8);
            let at = r.below(dev.size() / 512) * 512;
            let len = (dev.size() - at).min(1 + r.below(4096));
            dev.write_at(&junk[..len as usize], at).expect("write");
        }
        dev.sync().expect("sync");
        if let Ok((store, _)) = MarkStore::open(dev.clone(), false) {
            for v in VDISKS {
                let _ = store.marks_of(v);
            }
            let _ = store.mark(VDISKS[0], 1, 1);
        }
    }
}
