//! Format v3's crc journal: the crcs of written blocks, appended to a ring
//! in one write per batch of requests instead of one write per block into
//! the crc table.
//!
//! A block's crc lives in the crc table (one `u32` per physical block). A
//! write does not store it there: it appends a 32-byte record (sequence
//! number, physical block, crc) to the journal's open batch and keeps the
//! crc in memory (*dirty*). [`Disk::commit`](crate::Disk::commit) writes
//! the batch — every record appended since the last commit, from any
//! request — with one `pwrite` into the ring; the storage node commits
//! before it answers the requests of a batch. So a write is acknowledged
//! with its crc in the page cache, as before, and `kill -9` loses nothing;
//! a batch of 16 writes costs one small write instead of 16.
//!
//! *Write-back* stores the dirty crcs into the table (one read and one write
//! per run of the table they fall in), then a header saying that every
//! record up to sequence number `applied` is in the table. It runs before
//! every `fdatasync` of the disk (so a flush makes crcs durable in the table,
//! never only in the ring) and when the ring is full (a record may overwrite
//! only a record the header says is applied).
//!
//! Opening replays the records after `applied`, in sequence order, into
//! the dirty crcs. Records are self-checking (crc32c, salted with the
//! disk's identity) and never straddle a sector, so a torn or damaged
//! record is skipped: its block then fails its checksum (the stored crc is
//! older than the data), which reads as an error, never as wrong data. The
//! header has two copies, written in turn; both damaged, every valid record
//! is replayed (an old one can only make a block fail its checksum).
//!
//! Power loss: what a crash keeps of the ring, the table and the headers
//! after the last `fdatasync` is any subset; every crc it can leave is one
//! that a write stored for that block since, so a block reads as its last
//! flushed content, as content written after it, or as a checksum error.

use uuid::Uuid;

use crate::codec::{get_u32, get_u64, put_u32, put_u64};
use crate::fasthash::FastMap;

/// Bytes per record (16 per 512-byte sector: a record never tears).
pub(crate) const RECORD: usize = 32;
/// Pages in front of the ring: the two header copies, one page each.
pub(crate) const HEADER_PAGES: u64 = 2;
const PAGE: usize = 4096;
const HEADER_MAGIC: &[u8; 8] = b"TSCRCJNL";
const HEADER_LEN: usize = 40;

/// Journal pages (headers and ring) for `blocks` data blocks: a record
/// per 64 blocks, at least a page's worth (128) and at most 65,536 records
/// (2 MiB): a ring that fills is written back, so its size only spaces
/// write-backs out.
pub(crate) fn pages_for(blocks: u64) -> u64 {
    let per_page = (PAGE / RECORD) as u64;
    let records = (blocks / 64).clamp(per_page, 65536);
    HEADER_PAGES + records.div_ceil(per_page)
}

/// Records in the ring of a journal of `pages` pages.
pub(crate) fn capacity(pages: u64) -> u64 {
    pages.saturating_sub(HEADER_PAGES) * (PAGE / RECORD) as u64
}

/// The salt of a disk's records and headers: records of another format of
/// the same device never pass their check.
pub(crate) fn salt(disk: Uuid, created: u64) -> u32 {
    let mut b = [0u8; 24];
    b[..16].copy_from_slice(disk.as_bytes());
    put_u64(&mut b, 16, created);
    tessera_crc::crc32c(&b)
}

/// One record: physical block `phys` stored `crc` (sequence number `seq`,
/// from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seq: u64,
    pub phys: u64,
    pub crc: u32,
}

pub(crate) fn encode_record(e: &Entry, salt: u32, out: &mut [u8]) {
    out[..RECORD].fill(0);
    put_u64(out, 0, e.seq);
    put_u64(out, 8, e.phys);
    put_u32(out, 16, e.crc);
    let check = tessera_crc::crc32c(&out[..24]) ^ salt;
    put_u32(out, 24, check);
}

/// A record, if `b` holds a whole one of this disk. Never panics.
pub(crate) fn decode_record(b: &[u8], salt: u32) -> Option<Entry> {
    let b = b.get(..RECORD)?;
    let seq = get_u64(b, 0);
    if seq == 0 || get_u32(b, 24) != tessera_crc::crc32c(&b[..24]) ^ salt {
        return None;
    }
    if get_u32(b, 20) != 0 || b[28..].iter().any(|x| *x != 0) {
        return None;
    }
    Some(Entry {
        seq,
        phys: get_u64(b, 8),
        crc: get_u32(b, 16),
    })
}

/// A header copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Header {
    /// Header writes so far (the copy with the highest rules).
    pub serial: u64,
    /// Every record up to this one is in the crc table.
    pub applied: u64,
    /// Every page of the metadata log numbered below this was durable
    /// (written after an fdatasync): a replay that stops below it lost
    /// flushed pages, even when no later page says so.
    pub log_durable: u64,
}

/// Encodes a header copy (`magic, serial, applied, log_durable, check`).
pub(crate) fn encode_header(h: &Header, salt: u32) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(HEADER_MAGIC);
    put_u64(&mut b, 8, h.serial);
    put_u64(&mut b, 16, h.applied);
    put_u64(&mut b, 24, h.log_durable);
    let check = tessera_crc::crc32c(&b[..32]) ^ salt;
    put_u32(&mut b, 32, check);
    b
}

/// A whole header copy of this disk. Never panics.
pub(crate) fn decode_header(b: &[u8], salt: u32) -> Option<Header> {
    let b = b.get(..HEADER_LEN)?;
    if &b[..8] != HEADER_MAGIC
        || get_u32(b, 32) != tessera_crc::crc32c(&b[..32]) ^ salt
        || get_u32(b, 36) != 0
    {
        return None;
    }
    Some(Header {
        serial: get_u64(b, 8),
        applied: get_u64(b, 16),
        log_durable: get_u64(b, 24),
    })
}

/// What opening found in the journal.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// The newest header's `applied` (0: no header could be read).
    pub applied: u64,
    pub serial: u64,
    /// The newest header's `log_durable` (0: none).
    pub log_durable: u64,
    /// Whether a header copy was whole.
    pub header: bool,
    /// Records after `applied`, in sequence order.
    pub entries: Vec<Entry>,
}

/// Reads the journal back: the newest whole header, then every whole
/// record of the ring after its `applied` (and within one lap of it), for
/// a block below `blocks`, in sequence order.
pub(crate) fn replay(headers: [Option<&[u8]>; 2], ring: &[u8], salt: u32, blocks: u64) -> Replayed {
    let newest = headers
        .iter()
        .filter_map(|h| h.and_then(|h| decode_header(h, salt)))
        .max_by_key(|h| h.serial);
    let Header {
        serial,
        applied,
        log_durable,
    } = newest.unwrap_or_default();
    let cap = (ring.len() / RECORD) as u64;
    let mut entries: Vec<Entry> = ring
        .chunks_exact(RECORD)
        .enumerate()
        .filter_map(|(slot, b)| {
            let e = decode_record(b, salt)?;
            // A record sits at its own slot, after `applied`, and no more
            // than one lap ahead of it.
            (e.seq % cap == slot as u64
                && e.seq > applied
                && (newest.is_none() || e.seq <= applied + cap)
                && e.phys < blocks)
                .then_some(e)
        })
        .collect();
    entries.sort_by_key(|e| e.seq);
    Replayed {
        applied,
        serial,
        log_durable,
        header: newest.is_some(),
        entries,
    }
}

/// The journal's state in memory: the open batch, the dirty crcs, and
/// where the ring stands.
#[derive(Debug)]
pub(crate) struct Journal {
    salt: u32,
    /// Records in the ring.
    capacity: u64,
    /// The next record's sequence number.
    next_seq: u64,
    /// Every record up to this one is in the table (as far as the device's
    /// page cache goes).
    applied: u64,
    /// The last header's serial.
    serial: u64,
    /// The last header's `log_durable`.
    log_durable: u64,
    /// Records appended and not yet committed: sequence numbers
    /// `batch_from .. next_seq`, encoded.
    batch: Vec<u8>,
    batch_from: u64,
    /// Crcs the table may not hold yet: `(physical block, crc)` of every
    /// record after `applied`, in sequence order (a block's newest is its
    /// last). Appending is a store at the end, with no look-up: a map by
    /// block cost a random 4 KiB write two cache misses (4 % of a node's
    /// CPU in profiles), for the reads of crcs the cache does not hold.
    dirty: Vec<(u64, u32)>,
    /// The newest crc of each block among `dirty[..indexed]`, built when a
    /// read needs it (see [`Journal::overlay`]) and dropped at write-back.
    index: FastMap<u64, u32>,
    indexed: usize,
}

/// A write-back to do: every dirty crc as of record `upto`.
#[derive(Debug)]
pub(crate) struct WriteBack {
    pub upto: u64,
    /// The header to write once the crcs are in the table.
    pub header: Header,
    pub crcs: Vec<(u64, u32)>,
    /// The dirty list's entries it covers (its first ones).
    covers: usize,
}

impl Journal {
    /// A journal of `capacity` records, as opening found it.
    pub(crate) fn new(salt: u32, capacity: u64, r: Replayed) -> Journal {
        let next_seq = r.entries.last().map_or(r.applied, |e| e.seq).max(r.applied) + 1;
        let dirty = r.entries.iter().map(|e| (e.phys, e.crc)).collect();
        Journal {
            salt,
            capacity,
            next_seq,
            applied: r.applied,
            serial: r.serial,
            log_durable: r.log_durable,
            batch: Vec::new(),
            batch_from: next_seq,
            dirty,
            index: FastMap::default(),
            indexed: 0,
        }
    }

    /// Whether `n` more records fit in the ring without overwriting one
    /// that is not applied.
    pub(crate) fn has_room(&self, n: usize) -> bool {
        self.next_seq + n as u64 <= self.applied + self.capacity + 1
    }

    /// Records that physical blocks `p ..` store `crcs` (the caller made
    /// room).
    pub(crate) fn append(&mut self, p: u64, crcs: &[u32]) {
        debug_assert!(self.has_room(crcs.len()));
        if self.batch.is_empty() {
            self.batch_from = self.next_seq;
        }
        let at = self.batch.len();
        self.batch.resize(at + crcs.len() * RECORD, 0);
        self.dirty
            .extend(crcs.iter().enumerate().map(|(i, c)| (p + i as u64, *c)));
        for (i, (crc, out)) in crcs
            .iter()
            .zip(self.batch[at..].chunks_exact_mut(RECORD))
            .enumerate()
        {
            let e = Entry {
                seq: self.next_seq,
                phys: p + i as u64,
                crc: *crc,
            };
            encode_record(&e, self.salt, out);
            self.next_seq += 1;
        }
    }

    /// The open batch, to write: `(first record's ring slot, bytes)`, in
    /// one or two pieces (the ring wraps). Empty when nothing is open.
    pub(crate) fn take_batch(&mut self) -> (u64, Vec<u8>) {
        (self.batch_from, std::mem::take(&mut self.batch))
    }

    /// A batch whose write failed goes back in front of the open one.
    pub(crate) fn untake_batch(&mut self, from: u64, mut batch: Vec<u8>) {
        batch.extend_from_slice(&self.batch);
        self.batch = batch;
        self.batch_from = from;
    }

    /// Where a batch starting at record `from` goes: `(ring byte offset,
    /// range of the batch)` pieces.
    pub(crate) fn places(&self, from: u64, len: usize) -> Vec<(u64, std::ops::Range<usize>)> {
        let mut out = Vec::new();
        let mut done = 0usize;
        let mut seq = from;
        while done < len {
            let slot = seq % self.capacity;
            let n = ((self.capacity - slot) as usize * RECORD).min(len - done);
            out.push((slot * RECORD as u64, done..done + n));
            done += n;
            seq += (n / RECORD) as u64;
        }
        out
    }

    /// The dirty crcs among physical blocks `p .. p + out.len()`, over
    /// what `out` holds. Indexes the records appended since the last call
    /// first (readers call this only for crcs the crc cache does not hold).
    pub(crate) fn overlay(&mut self, p: u64, out: &mut [u32]) {
        if self.dirty.is_empty() {
            return;
        }
        for (q, c) in &self.dirty[self.indexed..] {
            self.index.insert(*q, *c);
        }
        self.indexed = self.dirty.len();
        for (q, o) in (p..).zip(out.iter_mut()) {
            if let Some(c) = self.index.get(&q) {
                *o = *c;
            }
        }
    }

    /// Whether any crc is dirty.
    pub(crate) fn is_clean(&self) -> bool {
        self.dirty.is_empty() && self.applied + 1 == self.next_seq
    }

    /// Starts a write-back of every dirty crc (the open batch's among them).
    pub(crate) fn start_write_back(&mut self) -> WriteBack {
        self.serial += 1;
        let upto = self.next_seq - 1;
        WriteBack {
            upto,
            header: Header {
                serial: self.serial,
                applied: upto,
                log_durable: self.log_durable,
            },
            crcs: {
                // By block, each block's newest (the last of its equals:
                // the sort is stable). Sequential writers leave the list
                // in ascending runs, which the sort merges in linear time.
                let mut crcs = self.dirty.clone();
                crcs.sort_by_key(|(q, _)| *q);
                let mut out: Vec<(u64, u32)> = Vec::with_capacity(crcs.len());
                for (q, c) in crcs {
                    match out.last_mut() {
                        Some(last) if last.0 == q => last.1 = c,
                        _ => out.push((q, c)),
                    }
                }
                out
            },
            covers: self.dirty.len(),
        }
    }

    /// The header that says metadata-log pages below `log_durable` are
    /// durable, if the last one said less.
    pub(crate) fn durable_header(&mut self, log_durable: u64) -> Option<Header> {
        if log_durable <= self.log_durable {
            return None;
        }
        self.serial += 1;
        self.log_durable = log_durable;
        Some(Header {
            serial: self.serial,
            applied: self.applied,
            log_durable,
        })
    }

    /// `wb` is in the table and its header written: its crcs are clean
    /// unless stored again since.
    pub(crate) fn written_back(&mut self, wb: &WriteBack) {
        // Records after the write-back's stay dirty (stored again since).
        self.dirty.drain(..wb.covers);
        self.index.clear();
        self.indexed = 0;
        self.applied = self.applied.max(wb.upto);
    }

    pub(crate) fn salt(&self) -> u32 {
        self.salt
    }
}

/// Runs of the sorted `crcs` that share a stretch of the crc table: blocks
/// closer than `gap` go in one run. `(first block, last block + 1, range
/// of crcs)`.
pub(crate) fn table_runs(crcs: &[(u64, u32)], gap: u64) -> Vec<(u64, u64, std::ops::Range<usize>)> {
    let mut out: Vec<(u64, u64, std::ops::Range<usize>)> = Vec::new();
    for (i, (p, _)) in crcs.iter().enumerate() {
        match out.last_mut() {
            Some((_, end, r)) if *p < *end + gap => {
                *end = p + 1;
                r.end = i + 1;
            }
            _ => out.push((*p, p + 1, i..i + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SALT: u32 = 0x5eed;

    fn ring_of(cap: u64, entries: &[Entry]) -> Vec<u8> {
        let mut ring = vec![0u8; cap as usize * RECORD];
        for e in entries {
            let at = (e.seq % cap) as usize * RECORD;
            encode_record(e, SALT, &mut ring[at..at + RECORD]);
        }
        ring
    }

    fn e(seq: u64, phys: u64, crc: u32) -> Entry {
        Entry { seq, phys, crc }
    }

    fn header(serial: u64, applied: u64) -> Header {
        Header {
            serial,
            applied,
            log_durable: 0,
        }
    }

    #[test]
    fn records_and_headers_round_trip_and_check_their_salt() {
        let mut b = [0u8; RECORD];
        encode_record(&e(7, 99, 0xabcd), SALT, &mut b);
        assert_eq!(decode_record(&b, SALT), Some(e(7, 99, 0xabcd)));
        assert_eq!(decode_record(&b, SALT + 1), None, "another disk's record");
        let hd = Header {
            serial: 3,
            applied: 41,
            log_durable: 17,
        };
        let h = encode_header(&hd, SALT);
        assert_eq!(decode_header(&h, SALT), Some(hd));
        assert_eq!(decode_header(&h, SALT ^ 1), None);
        assert_eq!(decode_record(&[0u8; RECORD], SALT), None, "a zeroed slot");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut b = [0u8; RECORD];
        encode_record(&e(5, 1234, 0xfeed), SALT, &mut b);
        for bit in 0..RECORD * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_record(&c, SALT), None, "bit {bit}");
        }
        let h = encode_header(&header(1, 2), SALT);
        for bit in 0..HEADER_LEN * 8 {
            let mut c = h;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_header(&c, SALT), None, "header bit {bit}");
        }
    }

    #[test]
    fn replay_takes_records_after_the_newest_header_in_order() {
        let cap = 8;
        // Records 5..=12: slots wrap; 5..=6 applied by the newest header.
        let entries: Vec<Entry> = (5..=12).map(|s| e(s, s % 3, s as u32)).collect();
        let ring = ring_of(cap, &entries);
        let old = encode_header(&header(1, 2), SALT);
        let new = encode_header(&header(2, 6), SALT);
        let r = replay([Some(&old[..]), Some(&new[..])], &ring, SALT, 100);
        assert_eq!(r.applied, 6);
        assert_eq!(
            r.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (7..=12).collect::<Vec<_>>()
        );
        // The newest copy damaged: the older one rules, more is replayed.
        let r = replay([Some(&old[..]), None], &ring, SALT, 100);
        assert_eq!(r.applied, 2);
        assert_eq!(r.entries.first().map(|e| e.seq), Some(5));
        // Blocks past the data region are not replayed.
        let r = replay([Some(&new[..]), None], &ring, SALT, 2);
        assert!(r.entries.iter().all(|e| e.phys < 2));
    }

    #[test]
    fn the_journal_keeps_the_newest_crc_and_respects_the_ring() {
        let cap = 4;
        let mut j = Journal::new(SALT, cap, Replayed::default());
        assert!(j.has_room(4) && !j.has_room(5));
        j.append(10, &[1, 2]);
        j.append(10, &[3]);
        let mut out = [0u32; 3];
        j.overlay(9, &mut out);
        assert_eq!(out, [0, 3, 2]);
        let (from, batch) = j.take_batch();
        assert_eq!((from, batch.len()), (1, 3 * RECORD));
        assert_eq!(
            j.places(from, batch.len()),
            vec![(RECORD as u64, 0..3 * RECORD)]
        );
        assert!(j.has_room(1) && !j.has_room(2));
        let wb = j.start_write_back();
        assert_eq!((wb.upto, wb.crcs.clone()), (3, vec![(10, 3), (11, 2)]));
        // Stored again during the write-back: stays dirty.
        j.append(11, &[9]);
        j.written_back(&wb);
        let mut out = [0u32; 2];
        j.overlay(10, &mut out);
        assert_eq!(out, [0, 9]);
        assert!(j.has_room(3) && !j.has_room(4));
        // Record 4 is at slot 0, record 5 would wrap: two pieces.
        let (from, batch) = j.take_batch();
        assert_eq!(from, 4);
        assert_eq!(
            j.places(3, 2 * RECORD),
            vec![(3 * RECORD as u64, 0..RECORD), (0, RECORD..2 * RECORD)]
        );
        drop(batch);
    }

    #[test]
    fn table_runs_join_close_blocks() {
        let crcs = [(1, 0), (2, 0), (5, 0), (100, 0)];
        assert_eq!(table_runs(&crcs, 4), vec![(1, 6, 0..3), (100, 101, 3..4)]);
    }

    proptest! {
        /// The dirty crcs are each block's newest crc stored since the last
        /// write-back began: what a reader lays over the table, and what a
        /// write-back stores (by block, once each); a crc stored during a
        /// write-back stays dirty after it.
        #[test]
        fn dirty_crcs_are_the_newest_since_the_write_back(
            ops in proptest::collection::vec((0u64..80, 1usize..40, any::<u32>(), 0u8..4), 1..60),
        ) {
            let mut j = Journal::new(SALT, 1 << 20, Replayed::default());
            // Every (block, crc) stored, and how many of them are clean.
            let mut stored: Vec<(u64, u32)> = Vec::new();
            let mut clean = 0usize;
            let mut pending: Option<(WriteBack, usize)> = None;
            let newest = |from: usize, upto: usize, stored: &[(u64, u32)]| {
                let mut m = std::collections::BTreeMap::new();
                for (b, c) in &stored[from..upto] {
                    m.insert(*b, *c);
                }
                m
            };
            for (p, n, seed, op) in ops {
                match op {
                    0 if pending.is_none() => {
                        let wb = j.start_write_back();
                        let expect: Vec<(u64, u32)> = newest(clean, stored.len(), &stored).into_iter().collect();
                        prop_assert_eq!(&wb.crcs, &expect);
                        pending = Some((wb, stored.len()));
                    }
                    1 if pending.is_some() => {
                        let (wb, upto) = pending.take().expect("pending");
                        j.written_back(&wb);
                        clean = upto;
                    }
                    _ => {
                        let crcs: Vec<u32> = (0..n as u32).map(|i| seed.wrapping_add(i)).collect();
                        j.append(p, &crcs);
                        stored.extend(crcs.iter().enumerate().map(|(i, c)| (p + i as u64, *c)));
                    }
                }
                let dirty = newest(clean, stored.len(), &stored);
                let mut out = vec![7u32; 130];
                j.overlay(0, &mut out);
                for (b, o) in out.iter().enumerate() {
                    prop_assert_eq!(*o, dirty.get(&(b as u64)).copied().unwrap_or(7), "block {}", b);
                }
                prop_assert_eq!(j.is_clean(), stored.len() == clean);
            }
        }

        #[test]
        fn arbitrary_bytes_replay_safely(
            ring in proptest::collection::vec(any::<u8>(), 0..2048),
            h in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let r = replay([Some(&h[..]), None], &ring, SALT, 1 << 20);
            prop_assert!(r.entries.windows(2).all(|w| w[0].seq < w[1].seq));
        }

        /// Replay after a crash that kept any subset of the ring's slots
        /// gives, for every block, a crc some append stored for it after
        /// the applied mark — and the newest one when everything was kept.
        #[test]
        fn replay_gives_stored_crcs(
            ops in proptest::collection::vec((0u64..16, any::<u32>()), 1..64),
            keep in proptest::collection::vec(any::<bool>(), 64),
        ) {
            let cap = 32u64;
            let mut j = Journal::new(SALT, cap, Replayed::default());
            let mut ring = vec![0u8; cap as usize * RECORD];
            let mut full = ring.clone();
            let mut stored: Vec<Entry> = Vec::new();
            let mut applied = 0;
            for (p, crc) in &ops {
                if !j.has_room(1) {
                    let wb = j.start_write_back();
                    j.written_back(&wb);
                    applied = wb.upto;
                    stored.retain(|e| e.seq > applied);
                }
                j.append(*p, &[*crc]);
                let (from, batch) = j.take_batch();
                for (off, r) in j.places(from, batch.len()) {
                    full[off as usize..off as usize + r.len()].copy_from_slice(&batch[r.clone()]);
                    if keep[(from % 64) as usize] {
                        ring[off as usize..off as usize + r.len()].copy_from_slice(&batch[r]);
                    }
                }
                stored.push(e(from, *p, *crc));
            }
            let h = encode_header(&header(1, applied), SALT);
            let r = replay([Some(&h[..]), None], &ring, SALT, 16);
            for got in &r.entries {
                prop_assert!(stored.contains(got), "{got:?} was never stored after {applied}");
            }
            let r = replay([Some(&h[..]), None], &full, SALT, 16);
            prop_assert_eq!(r.entries, stored);
        }
    }
}
