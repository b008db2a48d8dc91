//! Format v3's block map in memory: where each allocated 4 KiB block of
//! each chunk lives, and which physical blocks are free.
//!
//! A chunk's blocks are kept as *runs*: blocks `first .. first + count` of
//! the chunk at physical blocks `phys .. phys + count`, allocated under one
//! *generation* (disk-wide, never handed out twice): a block's owner tag is
//! made of `(vdisk, chunk, generation, block in the chunk)`, so data a
//! block held for another chunk, another allocation of this block or
//! another place in it fails its checksum. A chunk's allocations share a
//! generation (so its runs can merge) until a block of it is freed: the
//! next allocation takes a fresh one, since it may land where the freed
//! block was and find that block's old content there. The allocator keeps a chunk's blocks
//! together when it can: a chunk's first block takes a free, aligned
//! region of a chunk's size when one exists (its *home*), and later blocks
//! go to the same offset in that region while it is free there — so data
//! written in order is one run per chunk, and reads of it one request.
//! Homes are only a preference (nothing reserves them): with no free
//! region left, blocks go to the first free block after a rotating cursor,
//! and every free block is usable.
//!
//! Every change returns the [`Record`]s that describe it, for the metadata
//! log; replaying those records with [`BlockMap::apply`] rebuilds the same
//! map.

use crate::fasthash::FastMap;

use smallvec::SmallVec;
use uuid::Uuid;

use crate::mlog::Record;

/// A chunk's key: `(vdisk, chunk index)`.
pub(crate) type Key = (Uuid, u64);

/// A chunk's runs, by first block. One run (a chunk written in order, the
/// common case) is kept in the map's entry itself: a look-up then touches
/// the entry only, not a separate allocation too (one cache miss less per
/// request, on random I/O over more chunks than the cache holds).
type Runs = SmallVec<[Run; 1]>;

/// Blocks `first .. first + count` of a chunk at physical blocks
/// `phys .. phys + count`, allocated under `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub first: u32,
    pub count: u32,
    pub phys: u64,
    pub generation: u64,
}

impl Run {
    fn end(&self) -> u32 {
        self.first + self.count
    }
}

/// No free block for an allocation: nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoSpace;

/// Where a record being replayed disagrees with the map (only a damaged
/// or inconsistent log does that): what was done instead is said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inconsistent(pub String);

pub(crate) struct BlockMap {
    blocks_per_chunk: u32,
    total: u64,
    /// One bit per physical block, set when free.
    free: Vec<u64>,
    free_count: u64,
    /// Free blocks in each whole region of a chunk's size (the partial
    /// region at the end, if any, is not counted: it is never a home).
    region_free: Vec<u32>,
    /// Regions with every block free: a chunk's first block looks for one
    /// only while some are left (scanning every region for none was an
    /// eighth of the CPU of random first-touch writes on a full disk).
    free_regions: u64,
    chunks: FastMap<Key, Runs>,
    /// Per vDisk: its chunks holding a block, and its blocks (kept as the
    /// map changes: nodes report them at every heartbeat).
    per_vdisk: FastMap<Uuid, (u64, u64)>,
    /// The generation a chunk's next allocation may share: the last one
    /// it took, until a block of it is freed (in memory only: after an
    /// open, every chunk's next allocation takes a fresh one).
    current: FastMap<Key, u64>,
    /// Where the next search for a free block or region starts.
    cursor: u64,
}

impl BlockMap {
    /// An empty map of `total` physical blocks, every one free.
    pub(crate) fn new(total: u64, blocks_per_chunk: u32) -> BlockMap {
        assert!(blocks_per_chunk > 0, "a chunk has blocks");
        let words = total.div_ceil(64) as usize;
        let mut free = vec![u64::MAX; words];
        if total % 64 != 0 {
            if let Some(last) = free.last_mut() {
                *last = (1u64 << (total % 64)) - 1;
            }
        }
        let regions = total / u64::from(blocks_per_chunk);
        BlockMap {
            blocks_per_chunk,
            total,
            free,
            free_count: total,
            region_free: vec![blocks_per_chunk; regions as usize],
            free_regions: regions,
            chunks: FastMap::default(),
            per_vdisk: FastMap::default(),
            current: FastMap::default(),
            cursor: 0,
        }
    }

    pub(crate) fn free_blocks(&self) -> u64 {
        self.free_count
    }

    fn is_free(&self, p: u64) -> bool {
        p < self.total && self.free[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    fn take(&mut self, p: u64) {
        debug_assert!(self.is_free(p));
        self.free[(p / 64) as usize] &= !(1 << (p % 64));
        self.free_count -= 1;
        let r = (p / u64::from(self.blocks_per_chunk)) as usize;
        if let Some(n) = self.region_free.get_mut(r) {
            if *n == self.blocks_per_chunk {
                self.free_regions -= 1;
            }
            *n -= 1;
        }
    }

    fn give(&mut self, p: u64) {
        debug_assert!(!self.is_free(p));
        self.free[(p / 64) as usize] |= 1 << (p % 64);
        self.free_count += 1;
        let r = (p / u64::from(self.blocks_per_chunk)) as usize;
        if let Some(n) = self.region_free.get_mut(r) {
            *n += 1;
            if *n == self.blocks_per_chunk {
                self.free_regions += 1;
            }
        }
    }

    /// The chunk's runs, by first block.
    pub(crate) fn runs(&self, key: &Key) -> &[Run] {
        self.chunks.get(key).map_or(&[], |r| r.as_slice())
    }

    /// Where block `block` of the chunk lives: `(physical block, generation)`.
    pub(crate) fn lookup(&self, key: &Key, block: u32) -> Option<(u64, u64)> {
        let runs = self.runs(key);
        let i = runs.partition_point(|r| r.end() <= block);
        let r = runs.get(i).filter(|r| r.first <= block)?;
        Some((r.phys + u64::from(block - r.first), r.generation))
    }

    /// Blocks of `vdisk` allocated, over all its chunks.
    #[cfg(test)]
    pub(crate) fn used_by(&self, vdisk: Uuid) -> u64 {
        self.chunks
            .iter()
            .filter(|((v, _), _)| *v == vdisk)
            .flat_map(|(_, runs)| runs.iter())
            .map(|r| u64::from(r.count))
            .sum()
    }

    /// Every run of every chunk, chunks sorted by key.
    pub(crate) fn all_runs(&self) -> impl Iterator<Item = (Key, Run)> + '_ {
        let mut keys: Vec<&Key> = self.chunks.keys().collect();
        keys.sort_unstable();
        keys.into_iter()
            .flat_map(move |k| self.chunks[k].iter().map(move |r| (*k, *r)))
    }

    /// Per vDisk: its chunks holding a block, and its blocks.
    pub(crate) fn chunk_counts(&self) -> std::collections::BTreeMap<Uuid, (u64, u64)> {
        self.per_vdisk.iter().map(|(v, c)| (*v, *c)).collect()
    }

    /// The chunks of `vdisk` holding at least one block, sorted.
    pub(crate) fn chunks_of(&self, vdisk: Uuid) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .chunks
            .keys()
            .filter(|(v, _)| *v == vdisk)
            .map(|(_, c)| *c)
            .collect();
        out.sort_unstable();
        out
    }

    /// A free region of a chunk's size, aligned to it, at or after the
    /// cursor (wrapping): its first block.
    fn free_region(&self) -> Option<u64> {
        if self.free_regions == 0 {
            return None;
        }
        let size = u64::from(self.blocks_per_chunk);
        let regions = self.region_free.len();
        let start = (self.cursor / size) as usize % regions;
        let whole = |r: &usize| self.region_free[*r] == self.blocks_per_chunk;
        (start..regions)
            .chain(0..start)
            .find(whole)
            .map(|r| r as u64 * size)
    }

    /// The first free block at or after the cursor (wrapping).
    fn next_free(&self) -> Option<u64> {
        if self.free_count == 0 {
            return None;
        }
        let words = self.free.len() as u64;
        let start = self.cursor / 64;
        for i in 0..=words {
            let w = (start + i) % words;
            let mut bits = self.free[w as usize];
            if i == 0 {
                bits &= u64::MAX << (self.cursor % 64);
            }
            if bits != 0 {
                return Some(w * 64 + u64::from(bits.trailing_zeros()));
            }
        }
        None
    }

    /// The physical block the chunk's block `block` would ideally take.
    fn home(&self, key: &Key, block: u32) -> Option<u64> {
        let size = u64::from(self.blocks_per_chunk);
        let r = self.runs(key).first()?;
        let base = r.phys.checked_sub(u64::from(r.first))?;
        (base % size == 0).then_some(base + u64::from(block))
    }

    /// The generation the chunk's next allocation shares, if it may share
    /// one (see the module docs); otherwise it needs a fresh one.
    pub(crate) fn current_generation(&self, key: &Key) -> Option<u64> {
        self.current.get(key).copied()
    }

    /// Allocates blocks `first .. first + count` of the chunk, which must
    /// all be unallocated: all of them or (no space) none, under
    /// `generation` (the chunk's [`BlockMap::current_generation`], or a
    /// fresh one). Returns the `Alloc` records of the new runs.
    pub(crate) fn allocate(
        &mut self,
        key: Key,
        first: u32,
        count: u32,
        generation: u64,
    ) -> Result<Vec<Record>, NoSpace> {
        assert!(
            first
                .checked_add(count)
                .is_some_and(|e| e <= self.blocks_per_chunk),
            "blocks {first}+{count} are outside a chunk"
        );
        debug_assert!((first..first + count).all(|b| self.lookup(&key, b).is_none()));
        if u64::from(count) > self.free_count {
            return Err(NoSpace);
        }
        self.current.insert(key, generation);
        let mut home_base = self
            .home(&key, 0)
            .or_else(|| self.home(&key, first).map(|h| h - u64::from(first)));
        if home_base.is_none() && self.runs(&key).is_empty() {
            home_base = self.free_region();
        }
        let mut placed: Vec<(u32, u64)> = Vec::with_capacity(count as usize);
        for b in first..first + count {
            let want = home_base.map(|h| h + u64::from(b));
            let p = match want.filter(|p| self.is_free(*p)) {
                Some(p) => p,
                None => self.next_free().expect("free blocks were counted"),
            };
            self.take(p);
            self.cursor = (p + 1) % self.total.max(1);
            placed.push((b, p));
        }
        // Consecutive blocks at consecutive places are one run.
        let mut runs: Vec<Run> = Vec::new();
        for (b, p) in placed {
            match runs.last_mut() {
                Some(r) if r.end() == b && r.phys + u64::from(r.count) == p => r.count += 1,
                _ => runs.push(Run {
                    first: b,
                    count: 1,
                    phys: p,
                    generation,
                }),
            }
        }
        let records = runs
            .iter()
            .map(|r| Record::Alloc {
                vdisk: key.0,
                chunk: key.1,
                first: r.first,
                count: r.count,
                phys: r.phys,
                generation,
            })
            .collect();
        self.insert_runs(key, runs);
        Ok(records)
    }

    /// Adds runs to the chunk, merging those that continue each other.
    fn insert_runs(&mut self, key: Key, new: Vec<Run>) {
        let counts = self.per_vdisk.entry(key.0).or_default();
        counts.1 += new.iter().map(|r| u64::from(r.count)).sum::<u64>();
        if !self.chunks.contains_key(&key) {
            counts.0 += 1;
        }
        let runs = self.chunks.entry(key).or_default();
        runs.extend(new);
        runs.sort_by_key(|r| r.first);
        runs.dedup_by(|next, prev| {
            let continues = prev.end() == next.first
                && prev.phys + u64::from(prev.count) == next.phys
                && prev.generation == next.generation;
            if continues {
                prev.count += next.count;
            }
            continues
        });
    }

    /// Frees whichever of blocks `first .. first + count` of the chunk are
    /// allocated; returns the `Free` records.
    pub(crate) fn free(&mut self, key: Key, first: u32, count: u32) -> Vec<Record> {
        let end = first.saturating_add(count);
        self.current.remove(&key);
        let Some(runs) = self.chunks.get_mut(&key) else {
            return Vec::new();
        };
        let mut kept = Runs::new();
        let mut freed: Vec<(u32, u32, u64)> = Vec::new();
        for r in runs.drain(..) {
            let (lo, hi) = (r.first.max(first), r.end().min(end));
            if lo >= hi {
                kept.push(r);
                continue;
            }
            if r.first < lo {
                kept.push(Run {
                    count: lo - r.first,
                    ..r
                });
            }
            freed.push((lo, hi - lo, r.phys + u64::from(lo - r.first)));
            if hi < r.end() {
                kept.push(Run {
                    first: hi,
                    count: r.end() - hi,
                    phys: r.phys + u64::from(hi - r.first),
                    generation: r.generation,
                });
            }
        }
        let gone = kept.is_empty();
        if gone {
            self.chunks.remove(&key);
        } else {
            *runs = kept;
        }
        if let Some(c) = self.per_vdisk.get_mut(&key.0) {
            c.1 -= freed.iter().map(|f| u64::from(f.1)).sum::<u64>();
            c.0 -= u64::from(gone);
            if c.0 == 0 {
                self.per_vdisk.remove(&key.0);
            }
        }
        for &(_, n, phys) in &freed {
            for p in phys..phys + u64::from(n) {
                self.give(p);
            }
        }
        freed
            .into_iter()
            .map(|(lo, n, phys)| Record::Free {
                vdisk: key.0,
                chunk: key.1,
                first: lo,
                count: n,
                phys,
            })
            .collect()
    }

    /// Applies a logged change (replay at open). A record that disagrees
    /// with the map — blocks it allocates that are in use, blocks it frees
    /// that the chunk does not hold there — is applied as far as it is
    /// consistent, and said.
    pub(crate) fn apply(&mut self, r: &Record) -> Result<(), Inconsistent> {
        match *r {
            Record::Alloc {
                vdisk,
                chunk,
                first,
                count,
                phys,
                generation,
            } => {
                let key = (vdisk, chunk);
                let fits = first
                    .checked_add(count)
                    .is_some_and(|e| e <= self.blocks_per_chunk)
                    && phys
                        .checked_add(u64::from(count))
                        .is_some_and(|e| e <= self.total);
                if !fits {
                    return Err(Inconsistent(format!(
                        "{r:?} is outside the disk or the chunk"
                    )));
                }
                let taken = (phys..phys + u64::from(count)).any(|p| !self.is_free(p));
                let mapped = (first..first + count).any(|b| self.lookup(&key, b).is_some());
                if taken || mapped {
                    return Err(Inconsistent(format!(
                        "{r:?} allocates blocks in use (physical {taken}, in the chunk {mapped}); ignored"
                    )));
                }
                for p in phys..phys + u64::from(count) {
                    self.take(p);
                }
                self.insert_runs(
                    key,
                    vec![Run {
                        first,
                        count,
                        phys,
                        generation,
                    }],
                );
                Ok(())
            }
            Record::Free {
                vdisk,
                chunk,
                first,
                count,
                phys,
            } => {
                let key = (vdisk, chunk);
                let agrees = (0..count).all(|i| {
                    self.lookup(&key, first.saturating_add(i))
                        .is_some_and(|(p, _)| p == phys + u64::from(i))
                });
                self.free(key, first, count);
                if agrees {
                    Ok(())
                } else {
                    Err(Inconsistent(format!(
                        "{r:?} frees blocks the chunk does not hold there; freed what it held"
                    )))
                }
            }
            Record::Trusted { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V: Uuid = Uuid::from_u128(1);

    #[test]
    fn data_written_in_order_is_one_run_per_chunk() {
        let mut m = BlockMap::new(1024, 256);
        for chunk in 0..3 {
            for b in 0..256 {
                m.allocate((V, chunk), b, 1, 1).expect("space");
            }
            assert_eq!(m.runs(&(V, chunk)).len(), 1, "chunk {chunk}");
        }
        assert_eq!(m.free_blocks(), 256);
        assert_eq!(m.used_by(V), 768);
    }

    #[test]
    fn scattered_blocks_of_a_chunk_keep_their_home_offsets() {
        let mut m = BlockMap::new(1024, 256);
        m.allocate((V, 0), 100, 1, 1).unwrap();
        m.allocate((V, 1), 7, 1, 2).unwrap();
        m.allocate((V, 0), 3, 2, 3).unwrap();
        let (p100, _) = m.lookup(&(V, 0), 100).unwrap();
        let (p3, g) = m.lookup(&(V, 0), 3).unwrap();
        assert_eq!(p100 - 100, p3 - 3, "same home");
        assert_eq!(g, 3);
        let (p7, _) = m.lookup(&(V, 1), 7).unwrap();
        assert_ne!(
            (p7 - 7) / 256,
            (p3 - 3) / 256,
            "another chunk, another home"
        );
        assert_eq!(m.lookup(&(V, 0), 4).map(|(p, _)| p), Some(p3 + 1));
        assert_eq!(m.lookup(&(V, 0), 5), None);
    }

    /// Allocations share the chunk's generation until one of its blocks is
    /// freed; a block that comes back where it was takes a new one.
    #[test]
    fn a_block_freed_and_taken_again_has_a_new_generation() {
        let mut m = BlockMap::new(1024, 256);
        let g = |m: &BlockMap, b| m.lookup(&(V, 0), b).unwrap().1;
        m.allocate((V, 0), 0, 2, 5).unwrap();
        assert_eq!(m.current_generation(&(V, 0)), Some(5));
        m.allocate((V, 0), 2, 2, 5).unwrap();
        assert_eq!(m.runs(&(V, 0)).len(), 1, "one generation, one run");
        let (p1, _) = m.lookup(&(V, 0), 1).unwrap();
        m.free((V, 0), 1, 1);
        assert_eq!(m.current_generation(&(V, 0)), None);
        m.allocate((V, 0), 1, 1, 9).unwrap();
        assert_eq!(m.lookup(&(V, 0), 1), Some((p1, 9)), "back home, anew");
        assert_eq!((g(&m, 0), g(&m, 2)), (5, 5));
    }

    #[test]
    fn region_counts_agree_with_the_bitmap_through_random_use() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for total in [13u64, 64, 100, 257] {
            let mut m = BlockMap::new(total, 4);
            for step in 0..3000 {
                let key = (Uuid::from_u128(u128::from(next() % 3)), next() % 20);
                let first = (next() % 4) as u32;
                let count = 1 + (next() % u64::from(4 - first)) as u32;
                if next() % 3 == 0 {
                    m.free(key, first, count);
                } else if (first..first + count).all(|b| m.lookup(&key, b).is_none()) {
                    let _ = m.allocate(key, first, count, step);
                }
                let size = 4;
                for r in 0..total / size {
                    let free = (r * size..(r + 1) * size).filter(|p| m.is_free(*p)).count();
                    assert_eq!(
                        m.region_free[r as usize] as usize, free,
                        "total {total}, step {step}, region {r}"
                    );
                }
                let mut counts = std::collections::BTreeMap::<Uuid, (u64, u64)>::new();
                for ((v, _), runs) in &m.chunks {
                    let e = counts.entry(*v).or_default();
                    e.0 += 1;
                    e.1 += runs.iter().map(|r| u64::from(r.count)).sum::<u64>();
                }
                assert_eq!(m.chunk_counts(), counts, "total {total}, step {step}");
                let whole = (0..total / size)
                    .filter(|r| (r * size..(r + 1) * size).all(|p| m.is_free(p)))
                    .count() as u64;
                assert_eq!(m.free_regions, whole, "total {total}, step {step}");
            }
        }
    }

    #[test]
    fn every_block_is_usable_once_no_region_is_free() {
        // 4 regions; one block in each of 4 chunks takes every home.
        let mut m = BlockMap::new(1024, 256);
        for c in 0..4 {
            m.allocate((V, c), 0, 1, 1).unwrap();
        }
        for c in 4..1024 {
            m.allocate((V, c), 0, 1, 1).expect("a block is free");
        }
        assert_eq!(m.free_blocks(), 0);
        assert_eq!(m.allocate((V, 9999), 0, 1, 1), Err(NoSpace));
        assert_eq!(m.used_by(V), 1024);
    }

    #[test]
    fn an_allocation_that_does_not_fit_changes_nothing() {
        let mut m = BlockMap::new(100, 64);
        m.allocate((V, 0), 0, 60, 1).unwrap();
        assert_eq!(m.allocate((V, 1), 0, 41, 2), Err(NoSpace));
        assert_eq!((m.free_blocks(), m.chunks_of(V)), (40, vec![0]));
    }

    #[test]
    fn freeing_part_of_a_run_splits_it() {
        let mut m = BlockMap::new(512, 256);
        m.allocate((V, 0), 0, 256, 1).unwrap();
        assert_eq!(m.runs(&(V, 0)).len(), 1);
        let recs = m.free((V, 0), 10, 20);
        assert_eq!(recs.len(), 1);
        assert_eq!(m.runs(&(V, 0)).len(), 2);
        assert_eq!(m.lookup(&(V, 0), 15), None);
        assert_eq!(m.free_blocks(), 256 + 20);
        m.free((V, 0), 0, 256);
        assert!(m.chunks_of(V).is_empty());
        assert_eq!(m.free_blocks(), 512);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { chunk: u64, first: u32, count: u32 },
        Free { chunk: u64, first: u32, count: u32 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..6, 0u32..64, 1u32..24).prop_map(|(chunk, first, count)| Op::Alloc {
                chunk,
                first,
                count: count.min(64 - first)
            }),
            (0u64..6, 0u32..64, 1u32..64).prop_map(|(chunk, first, count)| Op::Free {
                chunk,
                first,
                count
            }),
        ]
    }

    proptest! {
        /// Replaying the records of any sequence of allocations and frees
        /// rebuilds the same map; no physical block is ever given twice;
        /// the free count is what the bitmap says.
        #[test]
        fn the_log_rebuilds_the_map(ops in proptest::collection::vec(op(), 1..120)) {
            let mut m = BlockMap::new(200, 64);
            let mut log = Vec::new();
            for (gen, o) in ops.iter().enumerate() {
                match *o {
                    Op::Alloc { chunk, first, count } => {
                        // Only the unallocated blocks of the range, as a write would.
                        let holes: Vec<u32> = (first..first + count)
                            .filter(|b| m.lookup(&(V, chunk), *b).is_none())
                            .collect();
                        for b in holes {
                            if let Ok(r) = m.allocate((V, chunk), b, 1, gen as u64) {
                                log.extend(r);
                            }
                        }
                    }
                    Op::Free { chunk, first, count } => log.extend(m.free((V, chunk), first, count)),
                }
            }
            let mut owners = std::collections::HashSet::new();
            for c in m.chunks_of(V) {
                for r in m.runs(&(V, c)) {
                    for p in r.phys..r.phys + u64::from(r.count) {
                        prop_assert!(owners.insert(p), "block {} given twice", p);
                        prop_assert!(!m.is_free(p));
                    }
                }
            }
            prop_assert_eq!(m.free_blocks(), 200 - owners.len() as u64);
            let mut again = BlockMap::new(200, 64);
            for r in &log {
                prop_assert_eq!(again.apply(r), Ok(()));
            }
            for c in 0..6 {
                for b in 0..64 {
                    prop_assert_eq!(again.lookup(&(V, c), b), m.lookup(&(V, c), b));
                }
            }
            prop_assert_eq!(again.free_blocks(), m.free_blocks());
        }
    }
}
