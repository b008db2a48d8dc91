//! Format v3: chunks allocated block by block (4 KiB).
//!
//! The block map ([`BlockMap`]) says where each written block of each
//! chunk lives. Every change of it is logged ([`mlog`]) before the data it
//! places is written, in the page cache like the data: a `kill -9` loses
//! nothing, and a flush makes the log pages written before it durable with
//! the data. Log pages go to two copies of the ring, so one damaged copy
//! of a page costs nothing. A checkpoint ([`ckpt`]) writes the whole map to
//! one of two areas in turn, so the log can be reused; one is written at
//! every open (after replay) and whenever half the ring is in use.
//!
//! Locking: the index mutex guards the map and the log writer, and is held
//! while a change's log pages are written (so pages reach the device in the
//! order their records were made). Data and crc I/O happen outside it,
//! under the chunk's stripe lock, as for extents.
//!
//! A block's stored crc is `crc32c(block) ^ tag`, the tag naming the vDisk,
//! the chunk, the chunk's generation and the block's place in the chunk
//! (`crc32c(vdisk, chunk, generation, block)`, never 0: [`TagSeed`]): after power loss, whatever a reused block still holds
//! from another owner, another life of the chunk or another place in it
//! fails its checksum instead of reading as good.

use std::sync::{Mutex, MutexGuard, PoisonError};

use uuid::Uuid;

use super::Disk;
use crate::blockmap::{BlockMap, Key};
use crate::ckpt::{self, Checkpoint};
use crate::codec::{put_u64, put_uuid};
use crate::device::Device;
use crate::layout::{Layout, ThinRegions};
use crate::mlog::{self, LogFull, LogWriter, PageWrite, Record, PAGE};
use crate::{Error, BLOCK_SIZE};

/// Pages of a checkpoint encoded and written at a time (1 MiB; 4 in this
/// crate's tests, so that their checkpoints take several writes).
#[cfg(not(test))]
pub(super) const CHECKPOINT_BATCH_PAGES: usize = 256;
#[cfg(test)]
pub(super) const CHECKPOINT_BATCH_PAGES: usize = 4;

const BS: u64 = BLOCK_SIZE as u64;

/// The tag of block `block` of `(vdisk, chunk)` allocated under
/// `generation` (never 0), as its definition reads; the data path computes
/// it with [`TagSeed`].
#[cfg(test)]
pub(crate) fn block_tag(vdisk: Uuid, chunk: u64, generation: u64, block: u32) -> u32 {
    let mut b = [0u8; 36];
    put_uuid(&mut b, 0, &vdisk);
    put_u64(&mut b, 16, chunk);
    put_u64(&mut b, 24, generation);
    crate::codec::put_u32(&mut b, 32, block);
    match tessera_crc::crc32c(&b) {
        0 => 1,
        t => t,
    }
}

/// The tags of one chunk's blocks under one generation: the crc of the
/// first 32 bytes of the tagged key is computed once, each block only
/// appends its number (`crc32c(vdisk, chunk, generation, block)`).
#[derive(Clone, Copy)]
pub(crate) struct TagSeed(u32);

impl TagSeed {
    pub(crate) fn new(vdisk: Uuid, chunk: u64, generation: u64) -> TagSeed {
        let mut b = [0u8; 32];
        put_uuid(&mut b, 0, &vdisk);
        put_u64(&mut b, 16, chunk);
        put_u64(&mut b, 24, generation);
        TagSeed(tessera_crc::crc32c(&b))
    }

    /// The tag of `block` (never 0).
    #[inline]
    pub(crate) fn tag(self, block: u32) -> u32 {
        match tessera_crc::crc32c_append_u32(self.0, block) {
            0 => 1,
            t => t,
        }
    }
}

/// The block map and the log it is recorded in.
pub(super) struct Index {
    pub map: BlockMap,
    log: LogWriter,
    /// The checkpoint area the next checkpoint goes to.
    next_area: usize,
}

impl Index {
    /// Every log page numbered below `seq` is durable.
    pub(super) fn log_durable(&mut self, seq: u64) {
        self.log.durable(seq);
    }
}

/// Format v3's state of an open disk.
pub(super) struct Thin {
    pub regions: ThinRegions,
    pub blocks_per_chunk: u32,
    index: Mutex<Index>,
    /// One checkpoint at a time.
    checkpointing: Mutex<()>,
    /// The block crcs on their way to the crc table.
    pub crcs: super::thin_crc::CrcJournal,
    /// Whether syncs record the log's durable mark in the crc journal's
    /// header: only once open's checkpoint (after the log's numbers jumped
    /// a lap) is durable, so the mark never names pages a replay from an
    /// older checkpoint could not reach.
    pub note_durable: std::sync::atomic::AtomicBool,
}

/// What opening found, for the log.
#[derive(Debug, Default)]
pub(super) struct Loaded {
    pub checkpoint_seq: u64,
    pub pages_replayed: u64,
    pub records_replayed: usize,
    pub inconsistent: usize,
    pub generation_floor: u64,
    /// Chunks written whole since the map was lost (see `lost`).
    pub trusted: Vec<Key>,
    /// Crc journal records replayed.
    pub crcs_replayed: usize,
    /// The map could not be read back whole (both checkpoint areas
    /// damaged, a flushed log page lost, or records that contradict it): a
    /// block it does not name may have lost its allocation, and one it
    /// names may have lost its free or its move, so no block of a chunk
    /// reads until the chunk is written whole.
    pub lost: bool,
}

fn read_page(dev: &dyn Device, offset: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; PAGE];
    dev.read_at(&mut buf, offset).ok().map(|()| buf)
}

impl Thin {
    /// Rebuilds the map: the newest whole checkpoint, then the log after it.
    /// `salt`: the crc journal's ([`crate::crcjournal::salt`]).
    pub(super) fn load(dev: &dyn Device, l: &Layout, salt: u32) -> (Thin, Loaded) {
        let t = l.thin.expect("a format-v3 layout");
        let bpc = l.extent_size / BLOCK_SIZE;
        let area = |a: usize| {
            ckpt::decode(t.checkpoint_pages as u32, |i| {
                read_page(dev, t.checkpoint_offsets[a] + u64::from(i) * BS)
            })
        };
        let (c0, c1) = (area(0), area(1));
        let next_area = match (&c0, &c1) {
            (Some(a), Some(b)) if b.seq > a.seq => 0,
            (Some(_), _) => 1,
            _ => 0,
        };
        let mut lost = false;
        let mut loaded = Loaded::default();
        let mut map = BlockMap::new(t.blocks_total, bpc);
        let c = match ckpt::newest(c0, c1) {
            Some(c) => c,
            None => {
                tracing::error!("both checkpoint areas are damaged: the block map is not known");
                lost = true;
                Checkpoint {
                    seq: 0,
                    pos: 0,
                    generation_floor: 0,
                    records: Vec::new(),
                    lost: true,
                }
            }
        };
        // Lost at an earlier open: still not trusted (the log after the
        // checkpoint is replayed as usual).
        let lost_before = c.lost && !lost;
        if lost_before {
            tracing::error!("the block map was lost at an earlier open and is still not trusted");
        }
        loaded.checkpoint_seq = c.seq;
        loaded.generation_floor = c.generation_floor;
        for r in &c.records {
            if let Err(e) = map.apply(r) {
                tracing::error!(record = %e.0, "inconsistent checkpoint");
                loaded.inconsistent += 1;
            }
        }
        let (crcs, crcs_replayed, log_durable) = super::thin_crc::CrcJournal::load(dev, &t, salt);
        let replayed = if lost {
            mlog::Replayed {
                records: Vec::new(),
                next_pos: 0,
                next_seq: 1,
                pages: 0,
                lost: true,
            }
        } else {
            mlog::replay(t.log_pages, c.pos, c.seq, |pos| {
                t.logs()
                    .into_iter()
                    .filter_map(|ring| read_page(dev, ring + pos * BS))
                    .collect::<Vec<_>>()
            })
        };
        if replayed.lost {
            tracing::error!(
                "the metadata log lost pages that were flushed: the block map is not known"
            );
            lost = true;
        } else if !lost && replayed.next_seq < log_durable {
            // The newest flushed pages are damaged in both copies, and no
            // later page says they were flushed: the crc journal's header
            // does.
            tracing::error!(
                stopped = replayed.next_seq,
                durable = log_durable,
                "the metadata log lost its newest flushed pages: the block map is not known"
            );
            lost = true;
        }
        loaded.pages_replayed = replayed.pages;
        loaded.records_replayed = replayed.records.len();
        for r in c.records.iter().chain(&replayed.records) {
            if let Record::Trusted { vdisk, chunk } = r {
                loaded.trusted.push((*vdisk, *chunk));
            }
        }
        for r in &replayed.records {
            if let Record::Alloc { generation, .. } = r {
                loaded.generation_floor = loaded.generation_floor.max(generation + 1);
            }
            if let Err(e) = map.apply(r) {
                tracing::error!(record = %e.0, "inconsistent metadata log");
                loaded.inconsistent += 1;
            }
        }
        loaded.lost = lost || lost_before || loaded.inconsistent > 0;
        // Pages after the end of the replay may hold records never made
        // durable, with the sequence numbers that come next. The log goes
        // on a lap's worth of numbers later, so none of them can ever be
        // taken for a page of this session: every page written before has
        // a number below the checkpoint's plus a lap. The checkpoint
        // written at open starts the replay there.
        let mut jump = replayed.next_seq + t.log_pages;
        if lost || replayed.lost || loaded.inconsistent > 0 {
            // The replay did not reach the end of the log: pages of any
            // number may be in the ring. Go a lap past the highest.
            let highest = (0..t.log_pages)
                .flat_map(|pos| {
                    t.logs()
                        .into_iter()
                        .filter_map(move |ring| read_page(dev, ring + pos * BS))
                })
                .filter_map(|page| mlog::decode_page(&page).ok())
                .map(|p| p.seq)
                .max()
                .unwrap_or(0);
            jump = jump.max(highest + 1 + t.log_pages);
        }
        let log = LogWriter::new(t.log_pages, replayed.next_pos, jump, replayed.next_pos);
        loaded.crcs_replayed = crcs_replayed;
        // Read whole just now, the log rings, checkpoint areas and crc
        // journal sit in large page-cache folios; each small write there
        // (a commit of 32-byte crc records, a log page) would walk a whole
        // folio. Dropped, they come back as small as those writes.
        dev.drop_cached(t.log_offset, l.crc_table_offset - t.log_offset);
        let thin = Thin {
            regions: t,
            blocks_per_chunk: bpc,
            index: Mutex::new(Index {
                map,
                log,
                next_area,
            }),
            checkpointing: Mutex::new(()),
            crcs,
            note_durable: std::sync::atomic::AtomicBool::new(false),
        };
        (thin, loaded)
    }

    /// The log's next page: `(ring position, sequence number)`.
    #[cfg(test)]
    pub(super) fn index_position(&self) -> (u64, u64) {
        self.index().log.position()
    }

    /// The index (never held across data I/O).
    pub(super) fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes an empty map as the checkpoint of a freshly formatted disk,
    /// and clears the rest (the log rings and the other area).
    pub(super) fn format(dev: &dyn Device, t: &ThinRegions) -> Result<(), Error> {
        let zero = |off: u64, pages: u64| {
            dev.zero(off, pages * BS)
                .map_err(Error::io("clear the metadata log"))
        };
        for ring in t.logs() {
            zero(ring, t.log_pages)?;
        }
        for area in t.checkpoint_offsets {
            zero(area, t.checkpoint_pages)?;
        }
        super::thin_crc::CrcJournal::format(dev, t)?;
        let empty = Checkpoint {
            seq: 1,
            pos: 0,
            generation_floor: 1,
            records: Vec::new(),
            lost: false,
        };
        for (i, page) in ckpt::encode(&empty).iter().enumerate() {
            dev.write_at(&page[..], t.checkpoint_offsets[0] + i as u64 * BS)
                .map_err(Error::io("write a checkpoint"))?;
        }
        Ok(())
    }
}

impl Disk {
    /// Format v3's state; only called on format-v3 disks.
    pub(super) fn thin(&self) -> &Thin {
        self.thin.as_ref().expect("a format-v3 disk")
    }

    /// Writes a change's log pages, in order, to both copies of the ring.
    /// Called with the index held.
    pub(super) fn write_log(&self, pages: &[PageWrite]) -> Result<(), Error> {
        let t = &self.thin().regions;
        for p in pages {
            for ring in t.logs() {
                self.write_at(&p.bytes[..], ring + p.pos * BS, "write a metadata log page")?;
            }
        }
        Ok(())
    }

    /// Logs `records` (with the index held), taking a checkpoint first if
    /// the ring has no room. Fails only if the device does.
    pub(super) fn log(
        &self,
        ix: &mut MutexGuard<'_, Index>,
        records: &[Record],
    ) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        loop {
            match ix.log.add(records) {
                Ok(pages) => return self.write_log(&pages),
                Err(LogFull) => {
                    // Rare: checkpoints start at half the ring. Take one
                    // now, holding the index (nothing else can change).
                    self.checkpoint_locked(ix)?;
                }
            }
        }
    }

    /// Writes a checkpoint of the map if half the ring is in use; the
    /// caller holds nothing.
    pub(super) fn checkpoint_if_due(&self) -> Result<(), Error> {
        if !self.thin().index().log.checkpoint_due() {
            return Ok(());
        }
        let Ok(_one) = self.thin().checkpointing.try_lock() else {
            return Ok(()); // another thread is at it
        };
        let (c, area) = {
            let mut ix = self.thin().index();
            if !ix.log.checkpoint_due() {
                return Ok(());
            }
            self.snapshot(&mut ix)
        };
        self.write_checkpoint(&c, area)?;
        self.checkpointed(&c, area);
        Ok(())
    }

    /// A checkpoint written with the index held (the ring is full, or at
    /// open).
    pub(super) fn checkpoint_locked(&self, ix: &mut MutexGuard<'_, Index>) -> Result<(), Error> {
        let (c, area) = self.snapshot(ix);
        self.write_checkpoint(&c, area)?;
        ix.log.checkpointed(c.pos);
        ix.log.durable(c.seq);
        ix.next_area = 1 - area;
        Ok(())
    }

    /// The map as a checkpoint, from the next page of the log on (sealed:
    /// no record it holds is rewritten after it).
    fn snapshot(&self, ix: &mut MutexGuard<'_, Index>) -> (Checkpoint, usize) {
        ix.log.sealed();
        let (pos, seq) = ix.log.position();
        let (lost, trusted, generation_floor) = {
            let st = self.state();
            (st.index_lost(), st.trusted_chunks(), st.next_generation())
        };
        let mut records = ckpt::records_of(&ix.map);
        if lost {
            // Room permitting (a chunk left out is only untrusted again).
            let room = self.thin().regions.checkpoint_pages as usize * mlog::RECORDS_PER_PAGE;
            let n = trusted.len().min(room.saturating_sub(records.len()));
            records.extend(
                trusted[..n]
                    .iter()
                    .map(|&(vdisk, chunk)| Record::Trusted { vdisk, chunk }),
            );
        }
        let c = Checkpoint {
            seq,
            pos,
            generation_floor,
            records,
            lost,
        };
        (c, ix.next_area)
    }

    /// Writes checkpoint `c` to `area` and makes it durable (with
    /// everything written before it).
    fn write_checkpoint(&self, c: &Checkpoint, area: usize) -> Result<(), Error> {
        let t = &self.thin().regions;
        let total = ckpt::pages_for(c.records.len());
        assert!(
            total as u64 <= t.checkpoint_pages,
            "a checkpoint of {total} pages in an area of {}",
            t.checkpoint_pages
        );
        // Encoded and written a bounded batch of pages at a time: a map of
        // millions of runs is hundreds of MiB of pages, and one buffer of
        // them all cost more in fresh memory than in encoding. A reader
        // takes the checkpoint whole or not at all (each page names it and
        // the sync below makes it durable), however many writes it took.
        let mut buf = vec![0u8; CHECKPOINT_BATCH_PAGES.min(total) * PAGE];
        let mut first = 0;
        while first < total {
            let n = CHECKPOINT_BATCH_PAGES.min(total - first);
            for (k, page) in buf[..n * PAGE].chunks_exact_mut(PAGE).enumerate() {
                ckpt::encode_page(c, first + k, page);
            }
            let at = t.checkpoint_offsets[area] + (first * PAGE) as u64;
            self.write_at(&buf[..n * PAGE], at, "write a checkpoint")?;
            first += n;
        }
        // The log was sealed by the snapshot (and the index may be held):
        // the device's sync, not `Disk::sync`.
        self.dev
            .sync()
            .map_err(Error::io("make a checkpoint durable (fdatasync)"))
    }

    fn checkpointed(&self, c: &Checkpoint, area: usize) {
        let mut ix = self.thin().index();
        ix.log.checkpointed(c.pos);
        ix.log.durable(c.seq);
        ix.next_area = 1 - area;
    }

    /// Seals the log's open page before a sync: it is never rewritten
    /// once durable (a rewrite torn by a crash would lose flushed records).
    /// Returns the number below which every page is durable once the sync
    /// returns (format v3).
    pub(super) fn seal_log(&self) -> Option<u64> {
        let t = self.thin.as_ref()?;
        let mut ix = t.index();
        ix.log.sealed();
        Some(ix.log.position().1)
    }

    /// Where the chunk's blocks `first .. first + count` live: `(physical
    /// block, tag)`, or `None` for blocks that hold nothing.
    ///
    /// One look-up of the chunk under the index lock; the tags (a few
    /// nanoseconds a block) are worked out there too, which saves copying
    /// the runs out.
    pub(super) fn thin_lookup(&self, key: &Key, first: u32, count: u32) -> Vec<Option<(u64, u32)>> {
        let end = first + count;
        let mut out = Vec::with_capacity(count as usize);
        let ix = self.thin().index();
        let runs = ix.map.runs(key);
        let from = runs.partition_point(|r| r.first + r.count <= first);
        let mut b = first;
        for r in runs[from..].iter().take_while(|r| r.first < end) {
            let start = r.first.max(b);
            out.resize(out.len() + (start - b) as usize, None);
            let stop = (r.first + r.count).min(end);
            let seed = TagSeed::new(key.0, key.1, r.generation);
            out.extend((start..stop).map(|k| Some((r.phys + u64::from(k - r.first), seed.tag(k)))));
            b = stop;
        }
        drop(ix);
        out.resize(count as usize, None);
        out
    }
}

#[cfg(test)]
mod tag_tests {
    use super::*;

    #[test]
    fn seeded_tags_are_the_block_tags() {
        let v = Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        for (chunk, generation) in [(0, 1), (7, 9), (u64::MAX, 1 << 40)] {
            let seed = TagSeed::new(v, chunk, generation);
            for block in [0, 1, 17, 255, 256, u32::MAX] {
                assert_eq!(seed.tag(block), block_tag(v, chunk, generation, block));
            }
        }
    }
}
