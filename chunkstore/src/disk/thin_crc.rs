//! Format v3's block crcs on the device: the crc journal
//! ([`crate::crcjournal`]) and the crc table behind it.
//!
//! Locking: the journal's mutex guards its state and is never held across
//! I/O. `committing` is held while a batch is written, so
//! [`Disk::commit`] returns only once every record appended before it is
//! on the device (written by this call or by the one it waited for).
//! `writing_back` makes write-backs one at a time; commits go on during
//! one (its records are newer than the write-back's mark, or harmlessly
//! rewrite a slot it no longer needs). `table` is held shared while a
//! reader fills the crc cache from the table (read, then the dirty crcs
//! over it) and exclusively while a write-back stores into the table and
//! marks its crcs clean: a reader never takes a table value for a block
//! whose newer crc was just marked clean. Order: chunk stripe →
//! `writing_back` → `committing` → `table` → the journal.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use super::{read, write, Disk};
use crate::blockmap::Key;
use crate::crcjournal::{self, Journal, HEADER_PAGES};
use crate::device::Device;
use crate::layout::ThinRegions;
use crate::Error;

const BS: u64 = crate::BLOCK_SIZE as u64;

/// Blocks closer than this in the crc table are written back with one
/// read and one write of the table between them (4 KiB of table).
const RUN_GAP: u64 = 1024;

/// The crc journal of an open format-v3 disk.
pub(super) struct CrcJournal {
    journal: Mutex<Journal>,
    committing: Mutex<()>,
    writing_back: Mutex<()>,
    table: RwLock<()>,
}

impl CrcJournal {
    /// Reads the journal back (see [`crcjournal::replay`]); also says how
    /// many records were replayed, and below which number the header says
    /// every metadata-log page was durable.
    pub(super) fn load(dev: &dyn Device, t: &ThinRegions, salt: u32) -> (CrcJournal, usize, u64) {
        let header = |i: u64| {
            let mut b = vec![0u8; 512];
            dev.read_at(&mut b, t.crc_journal_offset + i * BS)
                .ok()
                .map(|()| b)
        };
        let (h0, h1) = (header(0), header(1));
        let cap = crcjournal::capacity(t.crc_journal_pages);
        let mut ring = vec![0u8; cap as usize * crcjournal::RECORD];
        if let Err(e) = dev.read_at(&mut ring, t.crc_journal_offset + HEADER_PAGES * BS) {
            // Only the crcs written since the last write-back are lost:
            // those blocks fail their checksums.
            tracing::error!(error = %e, "cannot read the crc journal");
            ring.fill(0);
        }
        let r = crcjournal::replay([h0.as_deref(), h1.as_deref()], &ring, salt, t.blocks_total);
        if !r.header {
            tracing::warn!("no crc journal header is whole: replaying every record");
        }
        let replayed = r.entries.len();
        let log_durable = r.log_durable;
        let cj = CrcJournal {
            journal: Mutex::new(Journal::new(salt, cap, r)),
            committing: Mutex::new(()),
            writing_back: Mutex::new(()),
            table: RwLock::new(()),
        };
        (cj, replayed, log_durable)
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn committing(&self) -> MutexGuard<'_, ()> {
        self.committing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Clears the journal of a freshly formatted disk.
    pub(super) fn format(dev: &dyn Device, t: &ThinRegions) -> Result<(), Error> {
        dev.zero(t.crc_journal_offset, t.crc_journal_pages * BS)
            .map_err(Error::io("clear the crc journal"))
    }
}

impl Disk {
    fn crc_journal(&self) -> &CrcJournal {
        &self.thin().crcs
    }

    /// Physical blocks `p ..` now store `crcs`: appended to the journal's
    /// open batch and kept in the crc cache. Durable in the page cache at
    /// the next [`Disk::commit`]. Writes back first when the ring is full.
    pub(super) fn journal_crcs(&self, p: u64, crcs: &[u32]) -> Result<(), Error> {
        let cj = self.crc_journal();
        loop {
            {
                let mut j = cj.journal();
                if j.has_room(crcs.len()) {
                    j.append(p, crcs);
                    break;
                }
            }
            self.crc_write_back()?;
        }
        self.cache_crcs(p, crcs);
        Ok(())
    }

    /// Writes the crc journal's open batch: every block crc stored by a
    /// write that returned before this call is then in the page cache
    /// (`kill -9` loses none). [`Disk::write`] commits by itself; a caller
    /// of [`Disk::write_uncommitted`] commits before it answers. No-op on
    /// other formats.
    pub fn commit(&self) -> Result<(), Error> {
        let Some(t) = &self.thin else {
            return Ok(());
        };
        let cj = &t.crcs;
        let _one = cj.committing();
        let (from, batch, places) = {
            let mut j = cj.journal();
            let (from, batch) = j.take_batch();
            if batch.is_empty() {
                return Ok(());
            }
            let places = j.places(from, batch.len());
            (from, batch, places)
        };
        let ring = t.regions.crc_journal_offset + HEADER_PAGES * BS;
        for (off, range) in &places {
            if let Err(e) =
                self.write_at(&batch[range.clone()], ring + off, "write the crc journal")
            {
                cj.journal().untake_batch(from, batch);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stores every dirty crc into the crc table and records that in the
    /// journal's header (no sync: [`Disk::sync`] calls it first).
    pub(super) fn crc_write_back(&self) -> Result<(), Error> {
        let Some(t) = &self.thin else {
            return Ok(());
        };
        let cj = &t.crcs;
        let _one = cj
            .writing_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (wb, salt) = {
            let mut j = cj.journal();
            if j.is_clean() {
                return Ok(());
            }
            (j.start_write_back(), j.salt())
        };
        let l = &self.sb.layout;
        for (first, end, range) in crcjournal::table_runs(&wb.crcs, RUN_GAP) {
            let _table = write(&cj.table);
            let mut raw = vec![0u8; ((end - first) * 4) as usize];
            self.dev
                .read_at(&mut raw, l.block_crc_offset(first))
                .map_err(Error::io("read the crc table"))?;
            for (p, crc) in &wb.crcs[range] {
                let at = ((p - first) * 4) as usize;
                raw[at..at + 4].copy_from_slice(&crc.to_le_bytes());
            }
            self.write_at(&raw, l.block_crc_offset(first), "write the crc table")?;
        }
        self.write_crc_header(&wb.header, salt)?;
        let _table = write(&cj.table);
        cj.journal().written_back(&wb);
        Ok(())
    }

    /// Writes a header copy (the two copies in turn).
    fn write_crc_header(&self, h: &crcjournal::Header, salt: u32) -> Result<(), Error> {
        let t = self.thin();
        let copy = h.serial % 2;
        self.write_at(
            &crcjournal::encode_header(h, salt),
            t.regions.crc_journal_offset + copy * BS,
            "write the crc journal's header",
        )
    }

    /// After an fdatasync: records in the crc journal's header that every
    /// metadata-log page below `log_durable` is durable (no sync: a header
    /// lost with the power only says less), so a replay that stops below
    /// it knows flushed pages were lost even when no later page says so.
    pub(super) fn note_log_durable(&self, log_durable: u64) -> Result<(), Error> {
        if !self
            .thin()
            .note_durable
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(());
        }
        let cj = self.crc_journal();
        let _one = cj
            .writing_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (h, salt) = {
            let mut j = cj.journal();
            match j.durable_header(log_durable) {
                Some(h) => (h, j.salt()),
                None => return Ok(()),
            }
        };
        self.write_crc_header(&h, salt)
    }

    /// The crcs of physical blocks `p .. p + n` as the table holds them,
    /// with the dirty ones over them.
    pub(super) fn table_crcs(&self, key: &Key, p: u64, n: usize) -> Result<Vec<u32>, Error> {
        let cj = self.crc_journal();
        let _table = read(&cj.table);
        let mut raw = vec![0u8; n * 4];
        self.read_chunk_at(key, &mut raw, self.sb.layout.block_crc_offset(p))?;
        let mut out: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        cj.journal().overlay(p, &mut out);
        Ok(out)
    }
}
