//! The power-loss model of the chunk store.
//!
//! A [`PowerLossDevice`] keeps writes since the last fdatasync volatile; a
//! crash keeps an arbitrary subset of them, in any order (and, in the random
//! cases, torn at sector boundaries). After reopening, every block reads as
//! its last flushed content, as content written after that flush, or as a
//! checksum error — never as data that another chunk or another vDisk wrote
//! before the extent was reused. An epoch raise that returned survives.
//!
//! Exhaustive over every subset of the pending writes (applied in issue
//! order and in reverse order) for small scenarios chosen to exercise extent
//! reuse and fences; random (seeded) over long random sequences that live
//! several lives (crash, reopen, repair, go on), and over crashes followed
//! by random bit flips in the metadata (then errors are allowed too, wrong
//! data and lowered fences are not). `TESSERA_POWERLOSS_SEED=<seed>` replays
//! one case (its seed is printed on failure), `TESSERA_POWERLOSS_CASES=<n>`
//! runs more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tessera_chunkstore::{
    CrashPlan, Device, Disk, Error, FormatOptions, PowerLossDevice, Survivor,
};
use uuid::Uuid;

const BS: usize = 4096;
/// Extent (= chunk) size: 4 blocks.
const ES: u32 = 16 << 10;
const BLOCKS: u32 = ES / BS as u32;
/// Extents on the test disk (data starts at 1 MiB).
const EXTENTS: u64 = 5;
const SIZE: u64 = (1 << 20) + EXTENTS * ES as u64;
const SLOTS: u32 = 8;
/// Chunks per vDisk the random cases touch.
const CHUNKS: u64 = 4;
const VDISKS: [Uuid; 3] = [
    Uuid::from_u128(0xa),
    Uuid::from_u128(0xb),
    Uuid::from_u128(0xc),
];

thread_local! {
    /// Whether this test formats its disk at version 3 (see [`v3`]).
    static THIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn thin() -> bool {
    THIN.with(|t| t.get())
}

/// Runs a test of the crash model on a disk formatted at version 3
/// (allocation at 4 KiB, block map in a log).
fn v3(test: fn()) {
    THIN.with(|t| t.set(true));
    test();
}

/// xorshift64*: deterministic test data and random cases.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Data nobody else writes: the pattern of write number `n`.
fn pattern(n: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(n + 1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Write `sectors` 512-byte sectors from `sector` of a chunk.
    Write {
        v: usize,
        chunk: u64,
        sector: u32,
        sectors: u32,
        epoch: u64,
    },
    Discard {
        v: usize,
        chunk: u64,
        sector: u32,
        sectors: u32,
        epoch: u64,
    },
    Fence {
        v: usize,
        epoch: u64,
    },
    /// The zone deleted the vDisk: every chunk and the epoch slot are freed.
    Delete {
        v: usize,
    },
    Flush,
}

const SECTORS: u32 = ES / 512;

fn write(v: usize, chunk: u64, sector: u32, sectors: u32) -> Op {
    Op::Write {
        v,
        chunk,
        sector,
        sectors,
        epoch: 1,
    }
}

fn discard(v: usize, chunk: u64) -> Op {
    Op::Discard {
        v,
        chunk,
        sector: 0,
        sectors: SECTORS,
        epoch: 1,
    }
}

type Block = Vec<u8>;
type BlockKey = (usize, u64, u32);

/// What the disk must show after a crash.
#[derive(Clone, Default)]
struct Model {
    /// Current content of every chunk touched (absent: zeros).
    current: HashMap<(usize, u64), Vec<u8>>,
    /// Per block: every content allowed after a crash now (the content at
    /// the last flush and everything written since).
    allowed: BTreeMap<BlockKey, Vec<Block>>,
    /// Blocks written (or discarded) since the last flush: only these may
    /// fail their checksum after a crash.
    touched: BTreeSet<BlockKey>,
    /// Chunks that hold an extent (format v2): a write to any other takes
    /// a new one, whose other blocks are zeroed (and may fail their
    /// checksums after a crash, until the next flush).
    extents: BTreeSet<(usize, u64)>,
    /// Per vDisk: the highest epoch a returned fence (or write) raised to.
    fenced: [u64; 3],
    /// Per vDisk: the highest epoch ever asked for.
    asked: [u64; 3],
    writes: u64,
}

impl Model {
    fn chunk(&mut self, v: usize, chunk: u64) -> &mut Vec<u8> {
        self.current
            .entry((v, chunk))
            .or_insert_with(|| vec![0; ES as usize])
    }

    fn block(&self, k: BlockKey) -> Block {
        let b = k.2 as usize * BS;
        self.current
            .get(&(k.0, k.1))
            .map_or_else(|| vec![0; BS], |c| c[b..b + BS].to_vec())
    }

    /// A new content of block `k` may survive a crash.
    fn note(&mut self, k: BlockKey) {
        self.touched.insert(k);
        let now = self.block(k);
        let set = self.allowed.entry(k).or_insert_with(|| vec![vec![0; BS]]);
        if !set.contains(&now) {
            set.push(now);
        }
    }

    /// Everything so far is durable.
    fn flush(&mut self) {
        self.touched.clear();
        let keys: Vec<BlockKey> = self.allowed.keys().copied().collect();
        for k in keys {
            let now = self.block(k);
            self.allowed.insert(k, vec![now]);
        }
    }

    fn allowed(&self, k: BlockKey) -> Vec<Block> {
        self.allowed
            .get(&k)
            .cloned()
            .unwrap_or_else(|| vec![vec![0; BS]])
    }
}

/// A disk on a power-loss device, and the model of what it must show.
struct Harness {
    dev: Arc<PowerLossDevice>,
    disk: Disk,
    model: Model,
}

impl Harness {
    fn new() -> Self {
        let dev = Arc::new(PowerLossDevice::new(SIZE));
        let opts = FormatOptions {
            extent_size: ES,
            thin: thin(),
            ..FormatOptions::new(Uuid::from_u128(0xd15c))
        };
        let disk = Disk::format_device_with_slots(dev.clone(), &opts, SLOTS).unwrap();
        // Format v3 has the same room for data on this little device.
        assert_eq!(disk.info().extents_total, EXTENTS);
        // Start from the formatted disk, made durable (format v3's open
        // writes a checkpoint).
        disk.flush().unwrap();
        Harness {
            dev,
            disk,
            model: Model::default(),
        }
    }

    /// Runs `op` on the disk and the model. Errors that leave the disk
    /// untouched (stale epoch, no space) are part of the game.
    fn apply(&mut self, op: Op) -> Result<(), String> {
        let syncs = self.dev.sync_count();
        let m = &mut self.model;
        let result = match op {
            Op::Write {
                v,
                chunk,
                sector,
                sectors,
                epoch,
            } => {
                m.asked[v] = m.asked[v].max(epoch);
                m.writes += 1;
                let (off, len) = (sector * 512, (sectors * 512) as usize);
                let data = pattern(m.writes * 1000 + v as u64 * 100 + chunk, len);
                let r = self.disk.write(VDISKS[v], chunk, off, &data, epoch);
                if self.dev.sync_count() != syncs {
                    m.flush(); // the epoch raise came first, and synced
                }
                if r.is_ok() {
                    m.fenced[v] = m.fenced[v].max(epoch);
                    if !thin() && m.extents.insert((v, chunk)) {
                        m.touched.extend((0..BLOCKS).map(|b| (v, chunk, b)));
                    }
                    m.chunk(v, chunk)[off as usize..off as usize + len].copy_from_slice(&data);
                    for b in off / BS as u32..(off + len as u32).div_ceil(BS as u32) {
                        m.note((v, chunk, b));
                    }
                }
                r
            }
            Op::Discard {
                v,
                chunk,
                sector,
                sectors,
                epoch,
            } => {
                m.asked[v] = m.asked[v].max(epoch);
                let (off, len) = (sector * 512, sectors * 512);
                let r = self.disk.discard(VDISKS[v], chunk, off, len, epoch);
                if self.dev.sync_count() != syncs {
                    m.flush();
                }
                if r.is_ok() {
                    m.fenced[v] = m.fenced[v].max(epoch);
                    if off == 0 && len == ES {
                        m.extents.remove(&(v, chunk));
                    }
                    m.chunk(v, chunk)[off as usize..(off + len) as usize].fill(0);
                    for b in off / BS as u32..(off + len).div_ceil(BS as u32) {
                        m.note((v, chunk, b));
                    }
                }
                r
            }
            Op::Fence { v, epoch } => {
                m.asked[v] = m.asked[v].max(epoch);
                let r = self.disk.fence(VDISKS[v], epoch).map(|_| ());
                if r.is_ok() {
                    m.fenced[v] = m.fenced[v].max(epoch);
                }
                if self.dev.sync_count() != syncs {
                    m.flush();
                }
                r
            }
            Op::Delete { v } => {
                let r = self.disk.delete_vdisk(VDISKS[v]).map(|_| ());
                if r.is_ok() {
                    // The deletion may or may not survive a crash.
                    m.fenced[v] = 0;
                    m.extents.retain(|(w, _)| *w != v);
                    for chunk in 0..CHUNKS + 2 {
                        m.chunk(v, chunk).fill(0);
                        for b in 0..BLOCKS {
                            m.note((v, chunk, b));
                        }
                    }
                }
                r
            }
            Op::Flush => {
                let r = self.disk.flush();
                m.flush();
                r
            }
        };
        match result {
            Ok(()) | Err(Error::StaleEpoch { .. } | Error::NoSpace) => Ok(()),
            Err(e) => Err(format!("{op:?} failed: {e}")),
        }
    }

    /// Crashes a copy of the device as `plan` says, reopens it and checks
    /// every rule; the copy is returned for further checks.
    fn check_crash(&self, plan: &CrashPlan) -> Result<Disk, String> {
        let dev = self.dev.snapshot();
        dev.crash_with(plan);
        let disk = Disk::open_device(Arc::new(dev)).map_err(|e| format!("reopen failed: {e}"))?;
        check(&disk, &self.model)?;
        Ok(disk)
    }
}

/// Every rule of the crash model, on a reopened disk.
fn check(disk: &Disk, m: &Model) -> Result<(), String> {
    let info = disk.info();
    if info.quarantined_extents != 0 || info.quarantined_epoch_slots != 0 {
        return Err(format!("a crash alone damaged metadata: {info:?}"));
    }
    if info.extents_used + info.extents_free != info.extents_total {
        return Err(format!("extents leaked: {info:?}"));
    }
    let mut extents = Vec::new();
    for (v, &vdisk) in VDISKS.iter().enumerate() {
        let epoch = disk.epoch(vdisk);
        if epoch < m.fenced[v] {
            return Err(format!(
                "vdisk {v}: epoch {epoch} after the crash, but a raise to {} returned",
                m.fenced[v]
            ));
        }
        if epoch > m.asked[v] {
            return Err(format!("vdisk {v}: epoch {epoch} was never asked for"));
        }
        extents.extend(disk.chunks(vdisk).iter().map(|c| c.extent));
        for chunk in 0..CHUNKS + 2 {
            for b in 0..BLOCKS {
                let k = (v, chunk, b);
                let mut buf = vec![0xeeu8; BS];
                match disk.read(vdisk, chunk, b * BS as u32, &mut buf) {
                    Ok(()) => {
                        if !m.allowed(k).contains(&buf) {
                            return Err(format!(
                                "vdisk {v} chunk {chunk} block {b} reads as content it never had since the last flush ({})",
                                describe(&buf)
                            ));
                        }
                    }
                    Err(Error::Checksum { .. }) if m.touched.contains(&k) => {}
                    Err(e) => return Err(format!("vdisk {v} chunk {chunk} block {b}: {e}")),
                }
            }
        }
    }
    extents.sort_unstable();
    if info.format_version == 2 && extents.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("two chunks share an extent: {extents:?}"));
    }
    Ok(())
}

fn describe(b: &[u8]) -> String {
    if b.iter().all(|&x| x == 0) {
        "zeros".into()
    } else {
        format!("{:02x?}…", &b[..8])
    }
}

/// Every subset of the pending writes, applied in issue order and in
/// reverse order; beyond 14 pending writes (too many subsets), 20000
/// random crashes instead.
fn every_plan(dev: &PowerLossDevice) -> Vec<CrashPlan> {
    let n = dev.pending_writes().len();
    if n > 14 {
        return (0..20_000).map(|seed| dev.random_plan(seed)).collect();
    }
    let mut plans = Vec::new();
    for mask in 0u32..1 << n {
        let kept: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
        let forward = CrashPlan {
            survivors: kept
                .iter()
                .map(|&write| Survivor { write, units: None })
                .collect(),
        };
        if kept.len() > 1 {
            let mut backward = forward.clone();
            backward.survivors.reverse();
            plans.push(backward);
        }
        plans.push(forward);
    }
    plans
}

/// Runs `setup` and flushes, runs `ops`, then crashes in every way.
fn exhaustive(name: &str, setup: &[Op], ops: &[Op]) {
    let mut h = Harness::new();
    for &op in setup {
        h.apply(op).unwrap();
    }
    h.apply(Op::Flush).unwrap();
    for &op in ops {
        h.apply(op).unwrap();
    }
    crash_every_way(name, &h);
}

/// Crashes copies of the harness's device in every way and checks each.
fn crash_every_way(name: &str, h: &Harness) {
    let n = h.dev.pending_writes().len();
    let plans = every_plan(&h.dev);
    let cases = plans.len();
    for plan in plans {
        if let Err(e) = h.check_crash(&plan) {
            panic!(
                "{name}: {e}\n  pending writes: {:?}\n  crash plan: {plan:?}",
                h.dev.pending_writes()
            );
        }
    }
    eprintln!("{name}: {n} pending writes, {cases} crashes checked");
}

/// Two power losses: the first keeps a new extent's zeros, data and crcs
/// but loses its record; after the reopen the same chunk is allocated into
/// the same extent again. A generation handed out twice would let the
/// first allocation's (never flushed, since lost) blocks verify.
#[test]
fn generations_are_never_handed_out_twice() {
    let mut h = Harness::new();
    h.apply(write(0, 0, 0, SECTORS)).unwrap();
    // The records: the extent table's two copies (version 2, written
    // last), the log's two copies (version 3, written first).
    let records = metadata_regions(&h.dev);
    let all_but_the_records = CrashPlan {
        survivors: h
            .dev
            .pending_writes()
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                !records
                    .iter()
                    .any(|&(o, l)| w.offset >= o && w.offset < o + l)
            })
            .map(|(write, _)| Survivor { write, units: None })
            .collect(),
    };
    assert!(all_but_the_records.survivors.len() < h.dev.pending_writes().len());
    h.power_cycle(&all_but_the_records, 1).unwrap();
    assert!(h.disk.chunks(VDISKS[0]).is_empty());
    h.apply(write(0, 0, 0, 8)).unwrap();
    crash_every_way("generation reuse", &h);
}

#[test]
fn generations_are_never_handed_out_twice_v3() {
    v3(generations_are_never_handed_out_twice);
}

/// Where a disk keeps its allocation records: `(offset, length)` of the
/// extent tables (version 2) or of the log's copies (version 3).
fn metadata_regions(dev: &PowerLossDevice) -> Vec<(u64, u64)> {
    let mut sb = vec![0u8; 4096];
    dev.read_at(&mut sb, 0).unwrap();
    let at = |o: usize| u64::from_le_bytes(sb[o..o + 8].try_into().unwrap());
    if thin() {
        vec![(at(160), at(176) * 4096), (at(168), at(176) * 4096)]
    } else {
        vec![(at(72), at(80)), (at(136), at(80))]
    }
}

/// Finding 12: a freed extent reused by another vDisk. Its new record may
/// reach the disk before its zeros, data and crcs (and the old owner's
/// record may come back): no block may read as the other owner's data.
#[test]
fn reuse_by_another_vdisk() {
    exhaustive(
        "reuse by another vdisk",
        &[write(0, 0, 0, SECTORS)],
        &[discard(0, 0), write(1, 0, 8, 8)],
    );
}

#[test]
fn reuse_by_another_vdisk_v3() {
    v3(reuse_by_another_vdisk);
}

/// The same, by another chunk of the same vDisk, with a partial first write
/// (the rest of the extent must be zeroed).
#[test]
fn reuse_by_another_chunk() {
    exhaustive(
        "reuse by another chunk",
        &[write(0, 0, 0, SECTORS), write(0, 1, 0, 8)],
        &[discard(0, 0), write(0, 2, 1, 2)],
    );
}

#[test]
fn reuse_by_another_chunk_v3() {
    v3(reuse_by_another_chunk);
}

/// A chunk discarded and written again lands in the same extent: the new
/// allocation's blocks and the old ones must not pass for each other.
#[test]
fn same_chunk_reallocated_in_place() {
    exhaustive(
        "same chunk reallocated",
        &[write(0, 0, 0, SECTORS)],
        &[discard(0, 0), write(0, 0, 16, 1)],
    );
}

#[test]
fn same_chunk_reallocated_in_place_v3() {
    v3(same_chunk_reallocated_in_place);
}

/// A chunk comes back into an extent that still holds what the same chunk
/// wrote there in an earlier life (before the last flush): that old data
/// has valid crcs for the same (vdisk, chunk), so only the allocation's
/// generation tells it apart.
#[test]
fn same_chunk_back_in_an_old_extent() {
    exhaustive(
        "same chunk back in an old extent",
        &[
            write(1, 0, 0, 8),       // B0 -> e0
            write(0, 0, 0, SECTORS), // A0 life 1 -> e1
            discard(0, 0),           // e1 free, still holding A0 life 1
            discard(1, 0),           // e0 free (freed last: reused first)
            write(0, 0, 0, SECTORS), // A0 life 2 -> e0
        ],
        &[
            discard(0, 0),     // e0 free (pending)
            write(1, 1, 0, 8), // B1 -> e0
            write(0, 0, 0, 8), // A0 life 3 -> e1: only block 0 written
        ],
    );
}

#[test]
fn same_chunk_back_in_an_old_extent_v3() {
    v3(same_chunk_back_in_an_old_extent);
}

/// Partial writes (read-modify-write of edge blocks) and partial discards
/// of an allocated chunk, and a whole-chunk free.
#[test]
fn overwrites_and_partial_discards() {
    exhaustive(
        "overwrites",
        &[write(0, 0, 0, SECTORS), write(1, 0, 0, SECTORS)],
        &[
            write(0, 0, 3, 10),
            Op::Discard {
                v: 0,
                chunk: 0,
                sector: 9,
                sectors: 12,
                epoch: 1,
            },
            write(0, 0, 0, 1),
            discard(1, 0),
        ],
    );
}

#[test]
fn overwrites_and_partial_discards_v3() {
    v3(overwrites_and_partial_discards);
}

/// Format v3: more crcs than the crc journal's ring holds (128 records on
/// this little disk) after a flush. The full ring is written back into the
/// crc table and its slots reused, with no sync: whatever part of that a
/// crash keeps, the blocks flushed before still verify.
#[test]
fn a_full_crc_journal_never_loses_flushed_crcs_v3() {
    v3(|| {
        let overwrites: Vec<Op> = (0..40).map(|_| write(2, 1, 0, SECTORS)).collect();
        exhaustive(
            "crc journal",
            &[write(0, 0, 0, SECTORS), write(1, 0, 0, SECTORS)],
            &overwrites,
        );
    });
}

/// Finding 19: a fence returned means its epoch survives; so does a raise
/// made by a write with a newer epoch.
#[test]
fn epoch_raises_survive() {
    exhaustive(
        "epoch raises",
        &[write(0, 0, 0, 8)],
        &[
            Op::Fence { v: 0, epoch: 5 },
            write(1, 0, 0, 8),
            // A write with a newer epoch raises it first.
            Op::Write {
                v: 1,
                chunk: 1,
                sector: 0,
                sectors: 8,
                epoch: 3,
            },
            Op::Fence { v: 2, epoch: 2 },
            // Pending at the crash: writes at the raised epochs, and one
            // from a writer the raise fenced (refused).
            Op::Write {
                v: 0,
                chunk: 1,
                sector: 0,
                sectors: 8,
                epoch: 5,
            },
            write(0, 2, 0, 8),
            Op::Write {
                v: 1,
                chunk: 0,
                sector: 8,
                sectors: 8,
                epoch: 3,
            },
        ],
    );
}

#[test]
fn epoch_raises_survive_v3() {
    v3(epoch_raises_survive);
}

/// The random cases: long random sequences on a full little disk (reuse is
/// constant), crashed in random ways with random order and torn writes.
#[test]
fn random_sequences() {
    let (base, cases) = seeds(0x7e55_e2a0_0000);
    for seed in base..base + cases {
        if let Err(e) = random_case(seed) {
            panic!("{e}\n  replay: TESSERA_POWERLOSS_SEED={seed} cargo test -p tessera-chunkstore --test power_loss random_sequences");
        }
    }
}

#[test]
fn random_sequences_v3() {
    v3(random_sequences);
}

/// The first seed and the number of cases of a random test:
/// `TESSERA_POWERLOSS_SEED` replays from a seed (one case unless
/// `TESSERA_POWERLOSS_CASES` says more), else 300 cases from `default`.
fn seeds(default: u64) -> (u64, u64) {
    let var = |name: &str| {
        std::env::var(name).ok().map(|s| {
            s.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} is a number"))
        })
    };
    let replay = var("TESSERA_POWERLOSS_SEED");
    let cases = var("TESSERA_POWERLOSS_CASES").unwrap_or(if replay.is_some() { 1 } else { 300 });
    (replay.unwrap_or(default), cases)
}

fn random_op(r: &mut Rng, epochs: &mut [u64; 3]) -> Op {
    let v = r.below(3) as usize;
    let chunk = r.below(CHUNKS);
    let sector = r.below(u64::from(SECTORS)) as u32;
    let sectors = 1 + r.below(u64::from(SECTORS - sector)) as u32;
    // Mostly the current epoch; sometimes a newer one (a new writer) or an
    // older one (a fenced writer).
    let epoch = match r.below(20) {
        0 => {
            epochs[v] += 1 + r.below(2);
            epochs[v]
        }
        1 => epochs[v].saturating_sub(1 + r.below(2)),
        _ => epochs[v],
    };
    match r.below(16) {
        0..=7 => Op::Write {
            v,
            chunk,
            sector,
            sectors,
            epoch,
        },
        8 => Op::Write {
            v,
            chunk,
            sector: 0,
            sectors: SECTORS,
            epoch,
        },
        9..=10 => Op::Discard {
            v,
            chunk,
            sector: 0,
            sectors: SECTORS,
            epoch,
        },
        11 => Op::Discard {
            v,
            chunk,
            sector,
            sectors,
            epoch,
        },
        12 => Op::Fence { v, epoch },
        13 if r.below(4) == 0 => Op::Delete { v },
        _ => Op::Flush,
    }
}

fn random_case(seed: u64) -> Result<(), String> {
    let mut r = Rng::new(seed);
    let mut h = Harness::new();
    let mut epochs = [1u64; 3];
    let mut ops = Vec::new();
    // Several lives: ops, crashes of copies, then a power cycle of the disk
    // itself, and on with what survived.
    for life in 0..3 {
        let n = 5 + r.below(40);
        for _ in 0..n {
            let op = random_op(&mut r, &mut epochs);
            ops.push(op);
            h.apply(op)
                .map_err(|e| format!("seed {seed}, life {life}: {e}\n  ops: {ops:?}"))?;
        }
        let context = |h: &Harness, k: &str, e: String, plan: &CrashPlan| {
            format!(
                "seed {seed}, life {life}, crash {k}: {e}\n  ops: {ops:?}\n  pending: {:?}\n  plan: {plan:?}",
                h.dev.pending_writes()
            )
        };
        for k in 0..3 {
            let plan = h.dev.random_plan(r.next());
            let disk = h
                .check_crash(&plan)
                .map_err(|e| context(&h, &k.to_string(), e, &plan))?;
            if k == 0 {
                usable(&disk, &h.model, seed)?;
            }
        }
        let plan = h.dev.random_plan(r.next());
        h.power_cycle(&plan, seed)
            .map_err(|e| context(&h, "in place", e, &plan))?;
        ops.push(Op::Flush); // marks the power cycle in the printed ops
    }
    Ok(())
}

/// The reopened disk works: every vDisk fenced above anything seen, chunks
/// written whole and read back.
fn usable(disk: &Disk, m: &Model, seed: u64) -> Result<(), String> {
    for (v, &vdisk) in VDISKS.iter().enumerate() {
        let epoch = m.asked[v] + 1;
        disk.fence(vdisk, epoch)
            .map_err(|e| format!("seed {seed}: fence after crash: {e}"))?;
        for chunk in 0..2 {
            let data = pattern(seed ^ (v as u64 * 7 + chunk), ES as usize);
            match disk.write(vdisk, chunk, 0, &data, epoch) {
                Ok(()) => {
                    let mut back = vec![0u8; ES as usize];
                    disk.read(vdisk, chunk, 0, &mut back)
                        .map_err(|e| format!("seed {seed}: read after crash: {e}"))?;
                    if back != data {
                        return Err(format!(
                            "seed {seed}: a write after the crash reads back wrong"
                        ));
                    }
                }
                Err(Error::NoSpace) => {}
                Err(e) => return Err(format!("seed {seed}: write after crash: {e}")),
            }
        }
    }
    Ok(())
}

impl Harness {
    /// Power loss of the disk itself: the device crashes as `plan` says, the
    /// disk is reopened and checked, and what it reads becomes the model's
    /// flushed state (the open synced it). Chunks with blocks that fail
    /// their checksums are rewritten whole, as the replicator would.
    fn power_cycle(&mut self, plan: &CrashPlan, seed: u64) -> Result<(), String> {
        self.dev.crash_with(plan);
        self.disk =
            Disk::open_device(self.dev.clone()).map_err(|e| format!("reopen failed: {e}"))?;
        check(&self.disk, &self.model)?;
        let m = &mut self.model;
        m.allowed.clear();
        m.current.clear();
        m.touched.clear();
        m.extents = VDISKS
            .iter()
            .enumerate()
            .flat_map(|(v, &vdisk)| {
                self.disk
                    .chunks(vdisk)
                    .into_iter()
                    .map(move |c| (v, c.chunk))
            })
            .collect();
        let mut repair = Vec::new();
        for (v, &vdisk) in VDISKS.iter().enumerate() {
            for chunk in 0..CHUNKS + 2 {
                let mut content = vec![0u8; ES as usize];
                let mut bad = false;
                for b in 0..BLOCKS {
                    let at = b as usize * BS;
                    let block = &mut content[at..at + BS];
                    match self.disk.read(vdisk, chunk, at as u32, block) {
                        Ok(()) => {
                            m.allowed.insert((v, chunk, b), vec![block.to_vec()]);
                        }
                        Err(_) => {
                            block.fill(0);
                            bad = true;
                            m.allowed.insert((v, chunk, b), Vec::new());
                        }
                    }
                }
                m.current.insert((v, chunk), content);
                if bad {
                    repair.push((v, chunk));
                }
            }
        }
        for (v, chunk) in repair {
            m.writes += 1;
            let data = pattern(seed ^ (m.writes << 20), ES as usize);
            let epoch = self.disk.epoch(VDISKS[v]);
            match self.disk.write(VDISKS[v], chunk, 0, &data, epoch) {
                Ok(()) => {
                    m.current.insert((v, chunk), data);
                    m.extents.insert((v, chunk));
                    for b in 0..BLOCKS {
                        m.note((v, chunk, b));
                    }
                }
                // Version 3: a whole chunk may need blocks a full disk does
                // not have; the blocks that failed are held (a checksum
                // error is a held block's), so they are rewritten alone.
                Err(Error::NoSpace) if thin() => {
                    for b in 0..BLOCKS {
                        if !m.allowed[&(v, chunk, b)].is_empty() {
                            continue;
                        }
                        let at = b as usize * BS;
                        self.disk
                            .write(VDISKS[v], chunk, at as u32, &data[at..at + BS], epoch)
                            .map_err(|e| {
                                format!("repair of vdisk {v} chunk {chunk} block {b}: {e}")
                            })?;
                        m.chunk(v, chunk)[at..at + BS].copy_from_slice(&data[at..at + BS]);
                        m.note((v, chunk, b));
                    }
                }
                Err(e) => return Err(format!("repair of vdisk {v} chunk {chunk}: {e}")),
            }
        }
        Ok(())
    }
}

/// Power loss and media damage together: after random sequences and a
/// random crash, random bits flip in the superblocks, both copies of both
/// tables and the crc table. Whatever the damage, no block reads as content
/// it never had (errors are fine: they make the replicator read another
/// copy), and no writer older than a returned fence is admitted.
#[test]
fn random_crashes_with_bit_flips() {
    let (base, cases) = seeds(0xb17_f119_0000);
    for seed in base..base + cases {
        if let Err(e) = damaged_case(seed) {
            panic!("{e}\n  replay: TESSERA_POWERLOSS_SEED={seed} cargo test -p tessera-chunkstore --test power_loss random_crashes_with_bit_flips");
        }
    }
}

#[test]
fn random_crashes_with_bit_flips_v3() {
    v3(random_crashes_with_bit_flips);
}

fn damaged_case(seed: u64) -> Result<(), String> {
    let mut r = Rng::new(seed);
    let mut h = Harness::new();
    let mut epochs = [1u64; 3];
    let mut ops = Vec::new();
    for _ in 0..5 + r.below(40) {
        let op = random_op(&mut r, &mut epochs);
        ops.push(op);
        h.apply(op).map_err(|e| format!("seed {seed}: {e}"))?;
    }
    let dev = h.dev.snapshot();
    dev.crash(r.next());
    // The metadata's places, from the superblock (see damage.rs).
    let mut sb = vec![0u8; 4096];
    dev.read_at(&mut sb, 0).unwrap();
    let at = |o: usize| u64::from_le_bytes(sb[o..o + 8].try_into().unwrap());
    let regions = if thin() {
        // Format v3: the log's two copies and the checkpoint areas instead
        // of the extent tables.
        let (log_len, ckpt_len) = (at(176) * 4096, at(200) * 4096);
        vec![
            (0, 8192),
            (at(56), at(64)),
            (at(128), at(64)),
            (at(160), log_len),
            (at(168), log_len),
            (at(184), ckpt_len),
            (at(192), ckpt_len),
            (at(88), at(96)),
        ]
    } else {
        vec![
            (0, 8192),
            (at(56), at(64)),
            (at(128), at(64)),
            (at(72), at(80)),
            (at(136), at(80)),
            (at(88), at(96)),
        ]
    };
    let flips = 1 + r.below(6);
    for _ in 0..flips {
        let (off, len) = regions[r.below(regions.len() as u64) as usize];
        dev.flip_bit(off + r.below(len), r.below(8) as u8);
    }
    let disk = match Disk::open_device(Arc::new(dev)) {
        Ok(d) => d,
        Err(Error::BadSuperblock(_)) => return Ok(()),
        Err(e) => return Err(format!("seed {seed}: reopen failed: {e}")),
    };
    let m = &h.model;
    for (v, &vdisk) in VDISKS.iter().enumerate() {
        for chunk in 0..CHUNKS + 2 {
            for b in 0..BLOCKS {
                let mut buf = vec![0xeeu8; BS];
                match disk.read(vdisk, chunk, b * BS as u32, &mut buf) {
                    Ok(()) if m.allowed((v, chunk, b)).contains(&buf) => {}
                    Ok(()) => {
                        return Err(format!(
                            "seed {seed}: vdisk {v} chunk {chunk} block {b} reads as content it never had ({})\n  ops: {ops:?}",
                            describe(&buf)
                        ))
                    }
                    Err(e) if e.is_bad_copy() => {}
                    Err(e) => return Err(format!("seed {seed}: vdisk {v} chunk {chunk} block {b}: {e}")),
                }
            }
        }
        if m.fenced[v] > 0 {
            match disk.write(vdisk, CHUNKS + 3, 0, &[1; 512], m.fenced[v] - 1) {
                Err(Error::StaleEpoch { .. } | Error::FenceUnknown { .. }) => {}
                other => {
                    return Err(format!(
                        "seed {seed}: vdisk {v}: a writer older than fence {} was admitted: {other:?}\n  ops: {ops:?}",
                        m.fenced[v]
                    ))
                }
            }
        }
    }
    Ok(())
}

/// The device really loses what was not synced (the model is not vacuous).
#[test]
fn unsynced_writes_can_be_lost() {
    let mut h = Harness::new();
    h.apply(write(0, 0, 0, SECTORS)).unwrap();
    assert!(!h.dev.pending_writes().is_empty());
    let disk = h.check_crash(&CrashPlan::default()).unwrap();
    let mut buf = vec![1u8; ES as usize];
    disk.read(VDISKS[0], 0, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0; ES as usize]);
    assert!(disk.chunks(VDISKS[0]).is_empty());
    h.apply(Op::Flush).unwrap();
    // Format v3 writes one thing after the sync: the crc journal header's
    // durable mark for the metadata log (lost with the power, it only says
    // less).
    let after = usize::from(thin());
    assert!(h.dev.pending_writes().len() <= after);
    let disk = h.check_crash(&CrashPlan::default()).unwrap();
    disk.read(VDISKS[0], 0, 0, &mut buf).unwrap();
    assert_eq!(buf, h.model.current[&(0, 0)]);
    let _ = Device::size(&*h.dev);
}

#[test]
fn unsynced_writes_can_be_lost_v3() {
    v3(unsynced_writes_can_be_lost);
}
