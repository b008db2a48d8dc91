//! The stored crcs of recently used extents, kept in memory.
//!
//! A read verifies its blocks against the crcs the cache holds for its
//! extent, so it costs one read of the device (the data), not two. The
//! cache is filled with a whole extent's crcs at its first read (one read of
//! the crc table, as before) and at its allocation, and every crc write goes
//! to the device first and then to the cache: the device stays the truth,
//! and nothing is lost with the process (a `kill -9` leaves the device's
//! page cache with every crc written).
//!
//! Consistency: every access to an extent's crcs happens under its chunk's
//! stripe lock (reads shared, writes exclusive), so a row is never updated
//! while a read of the same extent uses it. A crc write that fails drops
//! the row (what reached the device is unknown). Freeing an extent drops
//! its row. The cache is bounded: a shard over its share of the budget
//! evicts rows (any of them; rows are cheap to read again).

use std::sync::Mutex;

/// Shards of the cache (by extent), so the node's I/O threads rarely meet.
const SHARDS: usize = 16;

/// Bytes of crcs a disk keeps in memory by default: 32 MiB, the crcs of
/// about 28 GiB of data (rows of 15 crcs a cache line).
pub(crate) const DEFAULT_BUDGET: usize = 32 << 20;

/// Crcs per [`Line`].
const PER_LINE: usize = 15;

/// One cache line of a row: 15 crcs and which of them are known, so that
/// storing a crc touches one line (a write's crc and its known bit in
/// separate allocations were two cache misses per 4 KiB write).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line {
    known: u32,
    crcs: [u32; PER_LINE],
}

/// The crcs of one extent's blocks (format v3: of one group of physical
/// blocks), and which of them are known (the device's).
struct Row {
    lines: Box<[Line]>,
    len: usize,
}

impl Row {
    fn all_known(crcs: &[u32]) -> Row {
        let mut row = Row::none_known(crcs.len());
        for (b, c) in crcs.iter().enumerate() {
            row.set(b, *c);
        }
        row
    }

    fn none_known(len: usize) -> Row {
        Row {
            lines: vec![Line::default(); len.div_ceil(PER_LINE)].into(),
            len,
        }
    }

    /// The crc of block `b`, if known (`b` below the row's length).
    fn get(&self, b: usize) -> Option<u32> {
        let l = &self.lines[b / PER_LINE];
        let at = b % PER_LINE;
        (l.known & (1 << at) != 0).then_some(l.crcs[at])
    }

    fn set(&mut self, b: usize, crc: u32) {
        let l = &mut self.lines[b / PER_LINE];
        let at = b % PER_LINE;
        l.crcs[at] = crc;
        l.known |= 1 << at;
    }

    /// Bytes of memory a row of `len` crcs takes.
    fn bytes(len: usize) -> usize {
        len.div_ceil(PER_LINE) * std::mem::size_of::<Line>()
    }
}

/// One shard: extent → its row.
type Rows = crate::fasthash::FastMap<u64, Row>;

pub(crate) struct CrcCache {
    shards: Box<[Mutex<Rows>]>,
    /// Blocks per row.
    blocks: usize,
    /// Rows a shard keeps at most.
    rows_per_shard: usize,
}

impl CrcCache {
    /// A cache of at most `budget` bytes of crcs, for extents of
    /// `blocks` blocks.
    pub(crate) fn new(budget: usize, blocks: u32) -> CrcCache {
        let row = Row::bytes(blocks as usize).max(1);
        CrcCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Rows::default())).collect(),
            blocks: blocks as usize,
            rows_per_shard: (budget / row / SHARDS).max(1),
        }
    }

    fn shard(&self, extent: u64) -> std::sync::MutexGuard<'_, Rows> {
        self.shards[(extent % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Copies the crcs of blocks `first..first + out.len()` of `extent`
    /// into `out`; false if the cache does not know them all.
    pub(crate) fn get(&self, extent: u64, first: u32, out: &mut [u32]) -> bool {
        let shard = self.shard(extent);
        let Some(row) = shard.get(&extent) else {
            return false;
        };
        let first = first as usize;
        let end = first + out.len();
        if end > row.len {
            return false;
        }
        for (b, o) in (first..end).zip(out.iter_mut()) {
            match row.get(b) {
                Some(c) => *o = c,
                None => return false,
            }
        }
        true
    }

    /// Makes room in a full shard for a new row.
    fn room(&self, shard: &mut Rows, extent: u64) {
        if shard.len() >= self.rows_per_shard && !shard.contains_key(&extent) {
            if let Some(victim) = shard.keys().next().copied() {
                shard.remove(&victim);
            }
        }
    }

    /// Keeps `row`, the crcs of every block of `extent` as the device holds
    /// them.
    pub(crate) fn insert(&self, extent: u64, row: Box<[u32]>) {
        let mut shard = self.shard(extent);
        self.room(&mut shard, extent);
        shard.insert(extent, Row::all_known(&row));
    }

    /// The device now holds `crcs` for blocks `first..` of `extent` (a row
    /// the cache holds is updated; none is made).
    pub(crate) fn update(&self, extent: u64, first: u32, crcs: &[u32]) {
        let mut shard = self.shard(extent);
        let first = first as usize;
        let stale = match shard.get_mut(&extent) {
            Some(row) if first + crcs.len() <= row.len => {
                for (i, c) in crcs.iter().enumerate() {
                    row.set(first + i, *c);
                }
                false
            }
            Some(_) => true,
            None => false,
        };
        if stale {
            shard.remove(&extent);
        }
    }

    /// The device holds `crcs` for blocks `first..` of `extent`, read or
    /// just written: kept, in a new row if need be (format v3, whose rows
    /// fill block by block).
    pub(crate) fn fill(&self, extent: u64, first: u32, crcs: &[u32]) {
        let first = first as usize;
        if first + crcs.len() > self.blocks {
            return;
        }
        let mut shard = self.shard(extent);
        // Most fills land in a row the cache has: one look-up.
        if let Some(row) = shard.get_mut(&extent) {
            for (i, c) in crcs.iter().enumerate() {
                row.set(first + i, *c);
            }
            return;
        }
        self.room(&mut shard, extent);
        let mut row = Row::none_known(self.blocks);
        for (i, c) in crcs.iter().enumerate() {
            row.set(first + i, *c);
        }
        shard.insert(extent, row);
    }

    /// Forgets `extent` (freed, or its crcs on the device are unknown).
    pub(crate) fn forget(&self, extent: u64) {
        self.shard(extent).remove(&extent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_updated_and_forgotten() {
        let c = CrcCache::new(1 << 20, 4);
        let mut out = [0u32; 2];
        assert!(!c.get(7, 0, &mut out));
        c.insert(7, vec![1, 2, 3, 4].into());
        assert!(c.get(7, 1, &mut out));
        assert_eq!(out, [2, 3]);
        c.update(7, 2, &[30, 40]);
        assert!(c.get(7, 2, &mut out));
        assert_eq!(out, [30, 40]);
        assert!(!c.get(7, 3, &mut out), "past the row's end");
        c.update(8, 0, &[9]);
        assert!(!c.get(8, 0, &mut out[..1]), "an update fills nothing");
        c.forget(7);
        assert!(!c.get(7, 0, &mut out));
    }

    #[test]
    fn filled_rows_know_only_what_was_filled() {
        let c = CrcCache::new(1 << 20, 100);
        let mut out = [0u32; 2];
        c.fill(3, 70, &[7, 8]);
        assert!(c.get(3, 70, &mut out));
        assert_eq!(out, [7, 8]);
        assert!(!c.get(3, 69, &mut out), "block 69 is not known");
        c.update(3, 69, &[6]);
        assert!(c.get(3, 69, &mut out));
        assert_eq!(out, [6, 7]);
        c.fill(3, 99, &[1, 2]);
        assert!(!c.get(3, 99, &mut out[..1]), "past the row: not kept");
    }

    #[test]
    fn an_update_past_the_row_forgets_it() {
        let c = CrcCache::new(1 << 20, 4);
        c.insert(1, vec![1, 2, 3, 4].into());
        c.update(1, 3, &[5, 6]);
        let mut out = [0u32; 1];
        assert!(!c.get(1, 0, &mut out));
    }

    #[test]
    fn the_budget_bounds_the_rows() {
        // 16 shards of one 16-byte row each.
        let c = CrcCache::new(16 * 16, 4);
        for e in 0..1000u64 {
            c.insert(e, vec![e as u32; 4].into());
        }
        let held = (0..1000u64)
            .filter(|e| c.get(*e, 0, &mut [0u32; 1]))
            .count();
        assert_eq!(held, SHARDS);
        let mut out = [0u32; 4];
        assert!(c.get(999, 0, &mut out), "the newest row is kept");
        assert_eq!(out, [999; 4]);
    }
}
