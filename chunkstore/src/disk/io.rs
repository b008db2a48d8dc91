//! Device access: positioned reads and writes with error context, and the
//! writes of table entries (to every copy) and of crc runs.

use super::Disk;
use crate::record::{EpochSlot, ExtentRecord, Stamp, ENTRY_SIZE};
use crate::state::ChunkKey;
use crate::Error;

impl Disk {
    /// Reads part of a chunk's data or crcs; a failure is the chunk's
    /// ([`Error::Unreadable`]).
    pub(super) fn read_chunk_at(
        &self,
        key: &ChunkKey,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), Error> {
        self.dev
            .read_at(buf, offset)
            .map_err(|source| Error::Unreadable {
                vdisk: key.0,
                chunk: key.1,
                source,
            })
    }

    /// Writes all of `buf` at `offset`.
    pub(super) fn write_at(&self, buf: &[u8], offset: u64, op: &'static str) -> Result<(), Error> {
        self.dev.write_at(buf, offset).map_err(Error::io(op))
    }

    /// Makes `len` bytes at `offset` read as zeros.
    pub(super) fn zero(&self, offset: u64, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        self.dev
            .zero(offset, len)
            .map_err(Error::io("zero a range of the device"))
    }

    /// `fdatasync` of the device.
    ///
    /// Format v3: stores the crc journal's dirty crcs into the crc table and
    /// seals the log's open page first (a durable page is never rewritten),
    /// and tells the log which pages are durable after.
    pub(super) fn sync(&self, op: &'static str) -> Result<(), Error> {
        self.crc_write_back()?;
        let sealed = self.seal_log();
        self.dev.sync().map_err(Error::io(op))?;
        if let Some(seq) = sealed {
            self.thin().index().log_durable(seq);
            self.note_log_durable(seq)?;
        }
        Ok(())
    }

    /// Writes extent `e`'s record to table copy `copy` (one sector-contained
    /// 64-byte write).
    pub(super) fn write_extent_record_copy(
        &self,
        copy: usize,
        e: u64,
        rec: &ExtentRecord,
    ) -> Result<(), Error> {
        let l = &self.sb.layout;
        let table = l.extent_tables()[copy];
        let off = l.extent_record_offset(table, e);
        self.write_at(&rec.encode(e, copy as u8), off, "write an extent record")
    }

    /// Writes extent `e`'s record to every table copy, the primary first.
    pub(super) fn write_extent_record(&self, e: u64, rec: &ExtentRecord) -> Result<(), Error> {
        for copy in 0..self.sb.layout.extent_tables().len() {
            self.write_extent_record_copy(copy, e, rec)?;
        }
        Ok(())
    }

    /// Writes epoch slot `s` to table copy `copy` (one sector-contained
    /// 64-byte write).
    pub(super) fn write_slot_copy(
        &self,
        copy: usize,
        s: u32,
        slot: &EpochSlot,
    ) -> Result<(), Error> {
        let l = &self.sb.layout;
        let table = l.epoch_tables()[copy];
        let off = l.epoch_slot_offset(table, s);
        self.write_at(&slot.encode(s, copy as u8), off, "write an epoch slot")
    }

    /// Writes epoch slot `s` to every table copy, the primary first.
    pub(super) fn write_slot(&self, s: u32, slot: &EpochSlot) -> Result<(), Error> {
        for copy in 0..self.sb.layout.epoch_tables().len() {
            self.write_slot_copy(copy, s, slot)?;
        }
        Ok(())
    }

    /// Reads the stored crcs of `count` blocks of the chunk's extent `e`
    /// from block `first`.
    pub(super) fn read_crcs(
        &self,
        key: &ChunkKey,
        e: u64,
        first: u32,
        count: u32,
    ) -> Result<Vec<u32>, Error> {
        let mut out = vec![0u32; count as usize];
        if self.crcs.get(e, first, &mut out) {
            return Ok(out);
        }
        // The whole extent's crcs, kept for the next reads of it.
        let blocks = self.sb.layout.blocks_per_extent();
        let mut raw = vec![0u8; blocks as usize * 4];
        self.read_chunk_at(key, &mut raw, self.sb.layout.crc_offset(e, 0))?;
        let row: Box<[u32]> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let first = first as usize;
        out.copy_from_slice(&row[first..first + count as usize]);
        self.crcs.insert(e, row);
        Ok(out)
    }

    /// Writes the stored crcs of blocks `first..first + crcs.len()` of
    /// extent `e`: one write.
    pub(super) fn write_crcs(&self, e: u64, first: u32, crcs: &[u32]) -> Result<(), Error> {
        let raw: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        let off = self.sb.layout.crc_offset(e, first);
        match self.write_at(&raw, off, "write block checksums") {
            Ok(()) => {
                self.crcs.update(e, first, crcs);
                Ok(())
            }
            Err(err) => {
                self.crcs.forget(e);
                Err(err)
            }
        }
    }

    /// Writes extent `e`'s stamp (mirrored layouts) and the crcs of all its
    /// blocks: one write, at allocation.
    pub(super) fn write_stamp_and_crcs(
        &self,
        e: u64,
        stamp: &Stamp,
        crcs: &[u32],
    ) -> Result<(), Error> {
        let l = &self.sb.layout;
        let written = if l.mirrored() {
            let mut raw = Vec::with_capacity(ENTRY_SIZE + crcs.len() * 4);
            raw.extend_from_slice(&stamp.encode(e));
            raw.extend(crcs.iter().flat_map(|c| c.to_le_bytes()));
            self.write_at(&raw, l.stamp_offset(e), "write block checksums")
        } else {
            let raw: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
            self.write_at(&raw, l.crc_offset(e, 0), "write block checksums")
        };
        match written {
            Ok(()) if crcs.len() == l.blocks_per_extent() as usize => {
                self.crcs.insert(e, crcs.into());
                Ok(())
            }
            Ok(()) => {
                self.crcs.forget(e);
                Ok(())
            }
            Err(err) => {
                self.crcs.forget(e);
                Err(err)
            }
        }
    }
}
