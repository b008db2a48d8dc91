//! Format v3's metadata log: where a disk allocated at 4 KiB records which
//! physical blocks hold which blocks of which chunk.
//!
//! The log is a ring of 4 KiB pages. A page holds up to [`RECORDS_PER_PAGE`]
//! fixed-size records and carries a sequence number; consecutive pages
//! have consecutive numbers. Pages are written in the page cache like data
//! (no sync of their own): a flush (`fdatasync`) makes every page written
//! before it durable together with the data.
//!
//! ```text
//! page (4096 bytes):
//!    0 4 magic b"TSML"   4 2 version 1   6 2 records in this page (≤ 63)
//!    8 8 sequence number
//!   16 63 × 64 records
//! 4048 8 durable before: every page numbered below it was durable
//!        (flushed) when this page was written
//! 4056 36 reserved (zero)
//! 4092 4 crc32c of the page with this field zero
//!
//! record (64 bytes):
//!    0 1 kind (1 alloc, 2 free)   1 3 reserved   4 4 count (blocks, ≥ 1)
//!    8 16 vdisk uuid
//!   24 8 chunk index              32 4 first block in the chunk
//!   36 4 reserved                 40 8 first physical block
//!   48 8 generation (alloc; zero for free)   56 8 reserved
//! ```
//!
//! **Replay keeps a prefix.** After power loss any subset of the pages
//! written since the last flush may have reached the media, in any order.
//! Replay starts at the page a checkpoint names and follows consecutive
//! sequence numbers around the ring; it stops at the first page that is
//! damaged or out of sequence and ignores everything after it. What it
//! drops was never flushed (a flush makes every earlier page durable), and
//! the blocks' owner tags make whatever the data holds read as its old
//! content, its new content or a checksum error (see the crate docs).
//!
//! **Unless a flushed page was lost.** A page damaged in both copies, or
//! a newest checkpoint damaged so that replay starts from the one before,
//! ends the replay early too; then records that were flushed are missing.
//! Replay tells ([`Replayed::lost`]): a page after the end that says it
//! was written once pages up to or past the end were durable, or, at the
//! end, a page of a later lap of the ring.

use uuid::Uuid;

use crate::codec::{get_u16, get_u32, get_u64, get_uuid, put_u16, put_u32, put_u64, put_uuid};

/// Bytes of one log page.
pub(crate) const PAGE: usize = 4096;
/// Records in a full page.
pub(crate) const RECORDS_PER_PAGE: usize = 63;

const MAGIC: [u8; 4] = *b"TSML";
const VERSION: u16 = 1;
const HEADER: usize = 16;
/// Where a page keeps its "durable before" number.
const DURABLE_AT: usize = 4048;
/// Bytes of one record.
pub(crate) const RECORD: usize = 64;
const KIND_ALLOC: u8 = 1;
const KIND_FREE: u8 = 2;
const KIND_TRUSTED: u8 = 3;

/// One change of the block map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// Blocks `first .. first + count` of `(vdisk, chunk)` live at physical
    /// blocks `phys .. phys + count`, allocated under `generation` (part of
    /// their owner tag).
    Alloc {
        vdisk: Uuid,
        chunk: u64,
        first: u32,
        count: u32,
        phys: u64,
        generation: u64,
    },
    /// Blocks `first .. first + count` of `(vdisk, chunk)`, at physical
    /// blocks `phys .. phys + count`, are free (discarded, or the chunk or
    /// its vDisk deleted).
    Free {
        vdisk: Uuid,
        chunk: u64,
        first: u32,
        count: u32,
        phys: u64,
    },
    /// The map was not read back whole, and `(vdisk, chunk)` was written
    /// (or discarded) whole since: it is trusted again (the map itself
    /// does not change).
    Trusted { vdisk: Uuid, chunk: u64 },
}

/// Why a page is not a valid log page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageError {
    /// Wrong magic: never written, or not a log page.
    NotAPage,
    /// A version this build does not know.
    Version(u16),
    /// The crc does not match: torn or damaged.
    Checksum,
    /// The header or a record is malformed under a valid crc.
    Malformed,
}

/// A decoded page: its sequence number and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Page {
    pub seq: u64,
    /// Every page numbered below this was durable when it was written.
    pub durable: u64,
    pub records: Vec<Record>,
}

/// Encodes one record into `out` ([`RECORD`] bytes).
pub(crate) fn encode_record(r: &Record, out: &mut [u8]) {
    out.fill(0);
    match *r {
        Record::Alloc {
            vdisk,
            chunk,
            first,
            count,
            phys,
            generation,
        } => {
            out[0] = KIND_ALLOC;
            put_u32(out, 4, count);
            put_uuid(out, 8, &vdisk);
            put_u64(out, 24, chunk);
            put_u32(out, 32, first);
            put_u64(out, 40, phys);
            put_u64(out, 48, generation);
        }
        Record::Free {
            vdisk,
            chunk,
            first,
            count,
            phys,
        } => {
            out[0] = KIND_FREE;
            put_u32(out, 4, count);
            put_uuid(out, 8, &vdisk);
            put_u64(out, 24, chunk);
            put_u32(out, 32, first);
            put_u64(out, 40, phys);
        }
        Record::Trusted { vdisk, chunk } => {
            out[0] = KIND_TRUSTED;
            put_uuid(out, 8, &vdisk);
            put_u64(out, 24, chunk);
        }
    }
}

/// Decodes one record ([`RECORD`] bytes), validating every field.
pub(crate) fn decode_record(b: &[u8]) -> Option<Record> {
    if b[0] == KIND_TRUSTED {
        let zero = |r: std::ops::Range<usize>| b[r].iter().all(|x| *x == 0);
        return (zero(1..8) && zero(32..RECORD)).then(|| Record::Trusted {
            vdisk: get_uuid(b, 8),
            chunk: get_u64(b, 24),
        });
    }
    let count = get_u32(b, 4);
    if count == 0 || b[1..4] != [0; 3] || get_u32(b, 36) != 0 || get_u64(b, 56) != 0 {
        return None;
    }
    let phys = get_u64(b, 40);
    phys.checked_add(u64::from(count))?;
    let first = get_u32(b, 32);
    first.checked_add(count)?;
    let (vdisk, chunk) = (get_uuid(b, 8), get_u64(b, 24));
    match b[0] {
        KIND_ALLOC => Some(Record::Alloc {
            vdisk,
            chunk,
            first,
            count,
            phys,
            generation: get_u64(b, 48),
        }),
        KIND_FREE if get_u64(b, 48) == 0 => Some(Record::Free {
            vdisk,
            chunk,
            first,
            count,
            phys,
        }),
        _ => None,
    }
}

/// Encodes a page of at most [`RECORDS_PER_PAGE`] records.
pub(crate) fn encode_page(seq: u64, durable: u64, records: &[Record]) -> Box<[u8; PAGE]> {
    assert!(
        records.len() <= RECORDS_PER_PAGE,
        "{} records do not fit a log page",
        records.len()
    );
    let mut page = Box::new([0u8; PAGE]);
    page[..4].copy_from_slice(&MAGIC);
    put_u16(&mut page[..], 4, VERSION);
    put_u16(&mut page[..], 6, records.len() as u16);
    put_u64(&mut page[..], 8, seq);
    for (i, r) in records.iter().enumerate() {
        let at = HEADER + i * RECORD;
        encode_record(r, &mut page[at..at + RECORD]);
    }
    put_u64(&mut page[..], DURABLE_AT, durable);
    crate::codec::seal(&mut page[..]);
    page
}

/// Decodes a page, validating everything before trusting any of it.
pub(crate) fn decode_page(page: &[u8]) -> Result<Page, PageError> {
    if page.len() != PAGE || page[..4] != MAGIC {
        return Err(PageError::NotAPage);
    }
    let version = get_u16(page, 4);
    if version != VERSION {
        return Err(PageError::Version(version));
    }
    if !crate::codec::crc_ok(page) {
        return Err(PageError::Checksum);
    }
    let n = get_u16(page, 6) as usize;
    if n > RECORDS_PER_PAGE {
        return Err(PageError::Malformed);
    }
    let records = (0..n)
        .map(|i| {
            let at = HEADER + i * RECORD;
            decode_record(&page[at..at + RECORD]).ok_or(PageError::Malformed)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tail = HEADER + n * RECORD;
    if page[tail..DURABLE_AT].iter().any(|b| *b != 0)
        || page[DURABLE_AT + 8..PAGE - 4].iter().any(|b| *b != 0)
    {
        return Err(PageError::Malformed);
    }
    Ok(Page {
        seq: get_u64(page, 8),
        durable: get_u64(page, DURABLE_AT),
        records,
    })
}

/// What replay found: the records of the pages it kept, in log order, and
/// where the next page goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replayed {
    pub records: Vec<Record>,
    /// Ring position of the next page to write.
    pub next_pos: u64,
    /// Its sequence number.
    pub next_seq: u64,
    /// Pages kept.
    pub pages: u64,
    /// Records that were flushed are missing (see the module docs).
    pub lost: bool,
}

/// Replays the ring of `ring_len` pages from position `pos`, expecting
/// sequence number `seq` there (the checkpoint's), following consecutive
/// numbers until a page is missing, damaged or out of sequence, and never
/// more than one lap. `read` returns the copies of the page at a ring
/// position that could be read (the ring is written in two copies): the
/// first that is valid with the expected number is taken, and none ends
/// the replay.
pub(crate) fn replay<C: IntoIterator<Item = Vec<u8>>>(
    ring_len: u64,
    pos: u64,
    seq: u64,
    mut read: impl FnMut(u64) -> C,
) -> Replayed {
    let mut out = Replayed {
        records: Vec::new(),
        next_pos: pos % ring_len.max(1),
        next_seq: seq,
        pages: 0,
        lost: false,
    };
    if ring_len == 0 {
        return out;
    }
    while out.pages < ring_len {
        let expected = out.next_seq;
        let copies: Vec<Page> = read(out.next_pos)
            .into_iter()
            .filter_map(|bytes| decode_page(&bytes).ok())
            .collect();
        match copies.iter().position(|p| p.seq == expected) {
            Some(i) => out.records.extend(copies[i].records.iter().copied()),
            None => {
                // A page of a later lap here: the ring was reused past this
                // point, which only follows a durable checkpoint newer than
                // the one replayed from.
                if copies.iter().any(|p| p.seq > expected) {
                    out.lost = true;
                    return out;
                }
                // Nothing newer here (a page never written in this lap, or
                // a torn or damaged one): pages after it that were written
                // once this one was durable say it was flushed.
                let torn = copies.is_empty();
                if torn {
                    for k in 1..ring_len - out.pages {
                        let pos = (out.next_pos + k) % ring_len;
                        let flushed_past = read(pos)
                            .into_iter()
                            .filter_map(|bytes| decode_page(&bytes).ok())
                            .any(|p| p.seq > expected && p.durable > expected);
                        if flushed_past {
                            out.lost = true;
                            break;
                        }
                    }
                }
                return out;
            }
        }
        out.pages += 1;
        out.next_seq += 1;
        out.next_pos = (out.next_pos + 1) % ring_len;
    }
    out
}

/// A page to write: its ring position and bytes.
pub(crate) struct PageWrite {
    pub pos: u64,
    pub bytes: Box<[u8; PAGE]>,
}

/// Where the next records go, and what must not be overwritten.
///
/// Every change is written at once (its page, in the page cache: a
/// `kill -9` loses nothing a method returned for). The page being filled
/// is rewritten with each change until it is full — but never once a
/// flush has made it durable: a rewrite torn by a crash would then lose
/// records that were flushed. So a flush *seals* the open page and the
/// next change starts a new one.
#[derive(Debug, Clone)]
pub(crate) struct LogWriter {
    ring_len: u64,
    /// Ring position and sequence number of the open page.
    pos: u64,
    seq: u64,
    /// Records of the open page so far.
    open: Vec<Record>,
    /// The first page the newest durable checkpoint does not cover: pages
    /// from there on must be kept.
    live_from: u64,
    /// Every page numbered below this is durable (written in each page).
    durable: u64,
}

/// The ring has no room: a checkpoint must be written first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogFull;

impl LogWriter {
    /// A writer that continues after replay: the next page is `pos` with
    /// sequence number `seq`; pages from `live_from` on are needed.
    pub(crate) fn new(ring_len: u64, pos: u64, seq: u64, live_from: u64) -> LogWriter {
        assert!(ring_len >= 2, "a log ring has at least two pages");
        LogWriter {
            ring_len,
            pos: pos % ring_len,
            seq,
            open: Vec::new(),
            live_from: live_from % ring_len,
            durable: 0,
        }
    }

    /// Every page numbered below `seq` is durable now (a flush returned
    /// after [`LogWriter::sealed`] gave `seq`).
    pub(crate) fn durable(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }

    /// Pages in use: from the checkpoint's first page to the open one.
    pub(crate) fn live_pages(&self) -> u64 {
        (self.pos + self.ring_len - self.live_from) % self.ring_len
            + u64::from(!self.open.is_empty())
    }

    /// Whether a checkpoint is due (half the ring is in use).
    pub(crate) fn checkpoint_due(&self) -> bool {
        self.live_pages() * 2 >= self.ring_len
    }

    /// The next page: where replay of a checkpoint taken now starts. Seal
    /// first ([`LogWriter::sealed`]), so that no record the checkpoint
    /// holds is replayed over it again.
    pub(crate) fn position(&self) -> (u64, u64) {
        (self.pos, self.seq)
    }

    /// A checkpoint covering everything before `pos` is durable.
    pub(crate) fn checkpointed(&mut self, pos: u64) {
        self.live_from = pos % self.ring_len;
    }

    /// Adds records: the pages to write (the full ones, then the open one).
    /// Fails, changing nothing, if they would overwrite a page still
    /// needed.
    pub(crate) fn add(&mut self, records: &[Record]) -> Result<Vec<PageWrite>, LogFull> {
        let pages_after = (self.open.len() + records.len()).div_ceil(RECORDS_PER_PAGE) as u64;
        // The pages this takes, from the open one on, must stay clear of
        // the live ones before it (one lap at most).
        let used_before = (self.pos + self.ring_len - self.live_from) % self.ring_len;
        if used_before + pages_after >= self.ring_len {
            return Err(LogFull);
        }
        let mut writes = Vec::new();
        for r in records {
            self.open.push(*r);
            if self.open.len() == RECORDS_PER_PAGE {
                writes.push(PageWrite {
                    pos: self.pos,
                    bytes: encode_page(self.seq, self.durable, &self.open),
                });
                self.open.clear();
                self.pos = (self.pos + 1) % self.ring_len;
                self.seq += 1;
            }
        }
        if !self.open.is_empty() {
            writes.push(PageWrite {
                pos: self.pos,
                bytes: encode_page(self.seq, self.durable, &self.open),
            });
        }
        Ok(writes)
    }

    /// Closes the open page: it is never rewritten, the next record starts
    /// a new page. After every flush (a rewrite torn by a crash would lose
    /// flushed records) and before a checkpoint is taken.
    pub(crate) fn sealed(&mut self) {
        if !self.open.is_empty() {
            self.open.clear();
            self.pos = (self.pos + 1) % self.ring_len;
            self.seq += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alloc(n: u64) -> Record {
        Record::Alloc {
            vdisk: Uuid::from_u128(u128::from(n) + 1),
            chunk: n,
            first: (n % 200) as u32,
            count: 1 + (n % 50) as u32,
            phys: n * 1000,
            generation: n + 7,
        }
    }

    #[test]
    fn pages_round_trip() {
        let records: Vec<Record> = (0..RECORDS_PER_PAGE as u64)
            .map(|n| {
                if n % 3 == 0 {
                    Record::Free {
                        vdisk: Uuid::from_u128(5),
                        chunk: n,
                        first: 2,
                        count: 3,
                        phys: n,
                    }
                } else {
                    alloc(n)
                }
            })
            .collect();
        for n in [0, 1, RECORDS_PER_PAGE] {
            let page = encode_page(42, 40, &records[..n]);
            let p = decode_page(&page[..]).expect("a valid page");
            assert_eq!((p.seq, p.durable, &p.records[..]), (42, 40, &records[..n]));
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let page = encode_page(9, 3, &[alloc(1), alloc(2)]);
        for bit in 0..PAGE * 8 {
            let mut bad = page.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_page(&bad[..]).is_err(),
                "bit {bit} flipped and still valid"
            );
        }
    }

    /// A ring whose pages are `Some(seq)` or `None` (never written / damaged).
    fn ring(pages: &[Option<u64>]) -> Vec<Vec<u8>> {
        pages
            .iter()
            .map(|p| match p {
                Some(seq) => encode_page(*seq, 0, &[alloc(*seq)]).to_vec(),
                None => vec![0u8; PAGE],
            })
            .collect()
    }

    #[test]
    fn replay_follows_consecutive_pages_around_the_ring_and_stops_at_a_gap() {
        // Positions 2, 3, 0 hold 10, 11, 12; position 1 an older lap's 8.
        let pages = ring(&[Some(12), Some(8), Some(10), Some(11)]);
        let r = replay(4, 2, 10, |pos| Some(pages[pos as usize].clone()));
        assert_eq!(r.records, vec![alloc(10), alloc(11), alloc(12)]);
        assert_eq!((r.next_pos, r.next_seq, r.pages), (1, 13, 3));

        // Page 11 never reached the media: 12, written later, is ignored.
        let pages = ring(&[Some(12), None, Some(10), None]);
        let r = replay(4, 2, 10, |pos| Some(pages[pos as usize].clone()));
        assert_eq!(r.records, vec![alloc(10)]);
        assert_eq!((r.next_pos, r.next_seq), (3, 11));

        // An unreadable page ends it too; so does a full lap.
        let r = replay(4, 2, 10, |pos| {
            (pos != 3).then(|| pages[pos as usize].clone())
        });
        assert_eq!(r.pages, 1);
        let pages = ring(&[Some(4), Some(5), Some(6), Some(7)]);
        let r = replay(4, 0, 4, |pos| Some(pages[pos as usize].clone()));
        assert_eq!((r.pages, r.next_pos, r.next_seq), (4, 0, 8));
        // Nothing at the start: an empty log.
        let r = replay(4, 1, 99, |pos| Some(pages[pos as usize].clone()));
        assert_eq!((r.records.len(), r.next_pos, r.next_seq), (0, 1, 99));
    }

    /// A page damaged in one copy of the ring is read from the other.
    #[test]
    fn replay_takes_the_copy_that_is_whole() {
        let good = ring(&[Some(10), Some(11), Some(12), None]);
        let mut bad = good.clone();
        bad[1][100] ^= 1;
        let r = replay(4, 0, 10, |pos| {
            vec![bad[pos as usize].clone(), good[pos as usize].clone()]
        });
        assert_eq!(r.records, vec![alloc(10), alloc(11), alloc(12)]);
        assert!(!r.lost);
    }

    /// Replay tells a flushed page lost from one never made durable: a
    /// page of a later lap where the replay ends, or a page after a torn
    /// end that was written once the torn page was durable.
    #[test]
    fn replay_tells_lost_flushed_pages_from_torn_unflushed_ones() {
        let page = |seq: u64, durable: u64| encode_page(seq, durable, &[alloc(seq)]).to_vec();
        let torn = |seq: u64| {
            let mut p = page(seq, 0);
            p[200] ^= 1;
            p
        };
        // Torn page 11, page 12 written before 11 was durable: a crash.
        let ring1 = [page(10, 5), torn(11), page(12, 10), vec![0u8; PAGE]];
        let r = replay(4, 0, 10, |pos| Some(ring1[pos as usize].clone()));
        assert_eq!((r.pages, r.lost), (1, false));
        // Page 12 written once 11 was durable (its "durable before" is 12):
        // 11 was flushed, and is gone.
        let ring2 = [page(10, 5), torn(11), page(12, 12), vec![0u8; PAGE]];
        let r = replay(4, 0, 10, |pos| Some(ring2[pos as usize].clone()));
        assert_eq!((r.pages, r.lost), (1, true));
        // An older lap's page where the replay ends: never written in this
        // lap, nothing lost.
        let ring3 = [page(10, 5), page(7, 0), vec![0u8; PAGE], vec![0u8; PAGE]];
        let r = replay(4, 0, 10, |pos| Some(ring3[pos as usize].clone()));
        assert_eq!((r.pages, r.lost), (1, false));
        // A later lap's page there: the ring went on past a checkpoint newer
        // than the one replayed from.
        let ring4 = [page(10, 5), page(15, 14), vec![0u8; PAGE], vec![0u8; PAGE]];
        let r = replay(4, 0, 10, |pos| Some(ring4[pos as usize].clone()));
        assert_eq!((r.pages, r.lost), (1, true));
    }

    #[test]
    fn the_writer_fills_pages_seals_them_at_a_flush_and_replays_as_written() {
        let mut ring: Vec<Vec<u8>> = vec![vec![0u8; PAGE]; 8];
        let mut w = LogWriter::new(8, 0, 100, 0);
        let mut all = Vec::new();
        let apply = |ws: Vec<PageWrite>, ring: &mut Vec<Vec<u8>>| {
            for p in ws {
                ring[p.pos as usize] = p.bytes.to_vec();
            }
        };
        let a: Vec<Record> = (0..70).map(alloc).collect();
        apply(w.add(&a).expect("room"), &mut ring);
        all.extend(a);
        assert_eq!(w.position(), (1, 101), "one full page, one open");
        // A flush seals the open page; the next records start page 2.
        w.sealed();
        let b = vec![alloc(500)];
        apply(w.add(&b).expect("room"), &mut ring);
        all.extend(b);
        assert_eq!(w.position(), (2, 102));
        let r = replay(8, 0, 100, |pos| Some(ring[pos as usize].clone()));
        assert_eq!(r.records, all);
        assert_eq!((r.next_pos, r.next_seq), (3, 103));
        assert_eq!(w.live_pages(), 3);
        assert!(!w.checkpoint_due());
    }

    #[test]
    fn the_writer_never_overwrites_a_page_a_checkpoint_still_needs() {
        let mut w = LogWriter::new(4, 0, 0, 0);
        let page: Vec<Record> = (0..RECORDS_PER_PAGE as u64).map(alloc).collect();
        w.add(&page).expect("page 0");
        w.add(&page).expect("page 1");
        assert!(w.checkpoint_due());
        w.add(&page).expect("page 2");
        assert_eq!(
            w.add(&page).err(),
            Some(LogFull),
            "page 3 would close the ring"
        );
        assert_eq!(w.position(), (3, 3), "nothing changed");
        // A checkpoint covering pages 0 and 1 frees them.
        w.checkpointed(2);
        w.add(&page).expect("page 3");
        w.add(&page).expect("page 0 again");
        assert_eq!(w.position(), (1, 5));
        assert_eq!(w.add(&page).err(), Some(LogFull));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and whatever decodes
        /// encodes back to the same bytes.
        #[test]
        fn arbitrary_pages_decode_safely(bytes in proptest::collection::vec(any::<u8>(), 0..PAGE + 8)) {
            if let Ok(p) = decode_page(&bytes) {
                prop_assert_eq!(&encode_page(p.seq, p.durable, &p.records)[..], &bytes[..]);
            }
        }

        /// A valid page with random bytes written over part of it (a torn
        /// or damaged write) is rejected or decodes to what was written.
        #[test]
        fn torn_pages_are_rejected(
            seq in any::<u64>(),
            n in 0usize..=RECORDS_PER_PAGE,
            at in 0usize..PAGE,
            junk in proptest::collection::vec(any::<u8>(), 1..512),
        ) {
            let records: Vec<Record> = (0..n as u64).map(alloc).collect();
            let mut page = encode_page(seq, seq / 2, &records).to_vec();
            let end = (at + junk.len()).min(PAGE);
            page[at..end].copy_from_slice(&junk[..end - at]);
            if let Ok(p) = decode_page(&page) {
                prop_assert_eq!(p, Page { seq, durable: seq / 2, records });
            }
        }
    }
}
