//! Format v3's checkpoints: the whole block map written out, so the
//! metadata log can be reused and an open replays only what came after.
//!
//! A disk has two checkpoint areas and writes them in turn, so the other
//! one stays valid while one is rewritten. A checkpoint is a run of 4 KiB
//! pages, each self-describing:
//!
//! ```text
//!    0 4 magic b"TSCK"   4 2 version 1   6 2 records in this page (≤ 63)
//!    8 8 log sequence number replay starts at
//!   16 8 ring position of that page
//!   24 4 this page's index   28 4 pages in the checkpoint
//!   32 8 generation floor: above every generation the map holds
//!   40 63 × 64 records (as in the log: one `Alloc` per run; while the map
//!      is lost, one `Trusted` per chunk written whole since)
//! 4072 4 lost: 1 if the map was not read back whole at some open (every
//!      chunk not `Trusted` reads as an error), else 0
//! 4076 16 reserved (zero)
//! 4092 4 crc32c
//! ```
//!
//! A checkpoint counts only if every one of its pages is there with its
//! sequence number and a valid crc: a checkpoint torn by a crash (some
//! pages new, some from the one before, some never written) is not one,
//! and the other area's serves. Its pages are flushed before the log
//! pages it covers are reused.

use crate::blockmap::BlockMap;
use crate::codec::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::mlog::{decode_record, encode_record, Record, PAGE, RECORD, RECORDS_PER_PAGE};

const MAGIC: [u8; 4] = *b"TSCK";
const VERSION: u16 = 1;
const HEADER: usize = 40;

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The first log page not covered: replay starts there.
    pub seq: u64,
    pub pos: u64,
    pub generation_floor: u64,
    /// One `Alloc` per run of the map (and, while `lost`, one `Trusted` per
    /// chunk written whole since the loss).
    pub records: Vec<Record>,
    /// The map was not read back whole at some open, and is not trusted
    /// since, but for the `Trusted` chunks.
    pub lost: bool,
}

/// Where a page keeps the lost flag.
const LOST_AT: usize = 4072;

/// The map's runs as `Alloc` records, by chunk.
pub(crate) fn records_of(map: &BlockMap) -> Vec<Record> {
    map.all_runs()
        .map(|((vdisk, chunk), r)| Record::Alloc {
            vdisk,
            chunk,
            first: r.first,
            count: r.count,
            phys: r.phys,
            generation: r.generation,
        })
        .collect()
}

/// Pages needed for `records` records.
pub(crate) fn pages_for(records: usize) -> usize {
    records.div_ceil(RECORDS_PER_PAGE).max(1)
}

/// Encodes a checkpoint as its pages.
pub(crate) fn encode(c: &Checkpoint) -> Vec<Box<[u8; PAGE]>> {
    let total = pages_for(c.records.len());
    (0..total)
        .map(|i| {
            let mut page = Box::new([0u8; PAGE]);
            encode_page(c, i, &mut page[..]);
            page
        })
        .collect()
}

/// Encodes page `i` of `c` into `page` (4 KiB, any content before).
pub(crate) fn encode_page(c: &Checkpoint, i: usize, page: &mut [u8]) {
    let total = pages_for(c.records.len());
    let start = (i * RECORDS_PER_PAGE).min(c.records.len());
    let records = &c.records[start..(start + RECORDS_PER_PAGE).min(c.records.len())];
    page.fill(0);
    page[..4].copy_from_slice(&MAGIC);
    put_u16(page, 4, VERSION);
    put_u16(page, 6, records.len() as u16);
    put_u64(page, 8, c.seq);
    put_u64(page, 16, c.pos);
    put_u32(page, 24, i as u32);
    put_u32(page, 28, total as u32);
    put_u64(page, 32, c.generation_floor);
    put_u32(page, LOST_AT, u32::from(c.lost));
    for (j, r) in records.iter().enumerate() {
        let at = HEADER + j * RECORD;
        encode_record(r, &mut page[at..at + RECORD]);
    }
    crate::codec::seal(page);
}

struct PageHead {
    n: usize,
    seq: u64,
    pos: u64,
    index: u32,
    total: u32,
    floor: u64,
    lost: bool,
}

fn head(page: &[u8]) -> Option<PageHead> {
    if page.len() != PAGE
        || page[..4] != MAGIC
        || get_u16(page, 4) != VERSION
        || !crate::codec::crc_ok(page)
    {
        return None;
    }
    let n = get_u16(page, 6) as usize;
    let h = PageHead {
        n,
        seq: get_u64(page, 8),
        pos: get_u64(page, 16),
        index: get_u32(page, 24),
        total: get_u32(page, 28),
        floor: get_u64(page, 32),
        lost: get_u32(page, LOST_AT) == 1,
    };
    (n <= RECORDS_PER_PAGE && h.index < h.total && get_u32(page, LOST_AT) <= 1).then_some(h)
}

fn records(page: &[u8], n: usize) -> Option<Vec<Record>> {
    if page[HEADER + n * RECORD..LOST_AT].iter().any(|b| *b != 0)
        || page[LOST_AT + 4..PAGE - 4].iter().any(|b| *b != 0)
    {
        return None;
    }
    (0..n)
        .map(|j| {
            let at = HEADER + j * RECORD;
            decode_record(&page[at..at + RECORD])
                .filter(|r| matches!(r, Record::Alloc { .. } | Record::Trusted { .. }))
        })
        .collect()
}

/// Reads the checkpoint in an area of `capacity` pages (`read` returns a
/// page by index, `None` if unreadable): `None` unless every page of one
/// checkpoint is valid.
pub(crate) fn decode(
    capacity: u32,
    mut read: impl FnMut(u32) -> Option<Vec<u8>>,
) -> Option<Checkpoint> {
    let first = read(0)?;
    let h = head(&first)?;
    if h.index != 0 || h.total > capacity {
        return None;
    }
    let mut c = Checkpoint {
        seq: h.seq,
        pos: h.pos,
        generation_floor: h.floor,
        records: records(&first, h.n)?,
        lost: h.lost,
    };
    for i in 1..h.total {
        let page = read(i)?;
        let p = head(&page)?;
        let same = p.index == i
            && p.total == h.total
            && p.seq == h.seq
            && p.pos == h.pos
            && p.floor == h.floor
            && p.lost == h.lost;
        if !same {
            return None;
        }
        c.records.extend(records(&page, p.n)?);
    }
    Some(c)
}

/// The newer of two areas' checkpoints.
pub(crate) fn newest(a: Option<Checkpoint>, b: Option<Checkpoint>) -> Option<Checkpoint> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn map() -> BlockMap {
        let mut m = BlockMap::new(4096, 256);
        let v = Uuid::from_u128(3);
        for chunk in 0..40u64 {
            m.allocate(
                (v, chunk),
                (chunk % 7) as u32,
                1 + (chunk % 5) as u32,
                chunk + 1,
            )
            .expect("space");
            m.allocate((v, chunk), 200, 3, 999).expect("space");
        }
        m
    }

    fn checkpoint(seq: u64) -> Checkpoint {
        Checkpoint {
            seq,
            pos: seq % 17,
            generation_floor: 1 << 32,
            records: records_of(&map()),
            lost: seq % 2 == 0,
        }
    }

    #[test]
    fn a_checkpoint_rebuilds_the_map() {
        let c = checkpoint(50);
        assert!(c.records.len() > RECORDS_PER_PAGE, "several pages");
        let pages = encode(&c);
        assert_eq!(pages.len(), pages_for(c.records.len()));
        let back = decode(64, |i| pages.get(i as usize).map(|p| p.to_vec())).expect("valid");
        assert_eq!(back, c);
        let mut m = BlockMap::new(4096, 256);
        for r in &back.records {
            m.apply(r).expect("consistent");
        }
        let orig = map();
        let v = Uuid::from_u128(3);
        for chunk in 0..40 {
            assert_eq!(m.runs(&(v, chunk)), orig.runs(&(v, chunk)));
        }
        assert_eq!(m.free_blocks(), orig.free_blocks());
        // An empty map is one page.
        let empty = Checkpoint {
            records: Vec::new(),
            ..c
        };
        assert_eq!(encode(&empty).len(), 1);
    }

    /// `write_checkpoint` encodes into a buffer that held the previous
    /// batch: a page encoded over old bytes (a fuller page's records) is
    /// the page encoded fresh, and decodes.
    #[test]
    fn a_page_encoded_over_old_bytes_is_the_fresh_page() {
        let c = checkpoint(30);
        let fresh = encode(&c);
        let last = fresh.len() - 1;
        assert!(
            c.records.len() % RECORDS_PER_PAGE != 0,
            "the last page is partly filled"
        );
        let mut page = fresh[0].to_vec();
        encode_page(&c, last, &mut page);
        assert!(page[..] == fresh[last][..], "stale bytes left in the page");
        let back = decode(64, |i| {
            Some(if i as usize == last {
                page.clone()
            } else {
                fresh.get(i as usize)?.to_vec()
            })
        })
        .expect("valid");
        assert_eq!(back, c);
    }

    #[test]
    fn a_torn_checkpoint_is_not_one_and_the_other_area_serves() {
        let old = encode(&checkpoint(10));
        let new = encode(&checkpoint(20));
        // The new one overwrote the area only in part: page 1 is the old one's.
        let mut area: Vec<Vec<u8>> = new.iter().map(|p| p.to_vec()).collect();
        area[1] = old[1].to_vec();
        assert_eq!(decode(64, |i| area.get(i as usize).cloned()), None);
        // A page never written, or one unreadable.
        let mut area: Vec<Vec<u8>> = new.iter().map(|p| p.to_vec()).collect();
        let last = area.len() - 1;
        area[last] = vec![0; PAGE];
        assert_eq!(decode(64, |i| area.get(i as usize).cloned()), None);
        assert_eq!(
            decode(64, |i| (i != 1).then(|| new[i as usize].to_vec())),
            None
        );
        // A flipped bit anywhere.
        for i in 0..new.len() {
            let mut area: Vec<Vec<u8>> = new.iter().map(|p| p.to_vec()).collect();
            area[i][100 + i * 1000] ^= 4;
            assert_eq!(decode(64, |j| area.get(j as usize).cloned()), None);
        }
        // Larger than the area: refused.
        assert_eq!(decode(1, |i| new.get(i as usize).map(|p| p.to_vec())), None);
        let a = decode(64, |i| old.get(i as usize).map(|p| p.to_vec()));
        let b = decode(64, |i| new.get(i as usize).map(|p| p.to_vec()));
        assert_eq!(newest(a.clone(), b.clone()).map(|c| c.seq), Some(20));
        assert_eq!(newest(a, None).map(|c| c.seq), Some(10));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_pages_never_panic(pages in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), PAGE..=PAGE), 1..4)) {
            let _ = decode(8, |i| pages.get(i as usize).cloned());
        }
    }
}
