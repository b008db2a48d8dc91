//! Low-level device access: positioned reads and writes, zeroing, and the
//! writes of single table entries and crc runs.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::{DeviceKind, Disk};
use crate::legacy_v1::record::{EpochSlot, ExtentRecord};
use crate::legacy_v1::sys;
use crate::legacy_v1::Error;

/// Largest piece of one `pwrite` (see [`Disk::write_at`]).
const WRITE_PIECE: u64 = 64 * 1024;

/// Source of zeros for devices that cannot zero a range in place.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// `zero_mode` values: the first zeroing method worth trying.
const ZERO_RANGE: u8 = 0;
const PUNCH_HOLE: u8 = 1;
const WRITE_ZEROS: u8 = 2;

impl Disk {
    /// `pread` of exactly `buf.len()` bytes.
    pub(super) fn read_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        op: &'static str,
    ) -> Result<(), Error> {
        self.file.read_exact_at(buf, offset).map_err(Error::io(op))
    }

    /// `pwrite` of all of `buf`, in pieces that do not cross a
    /// [`WRITE_PIECE`] boundary of the device.
    ///
    /// The kernel sizes a page-cache folio by the write that creates it, and
    /// a later small write into a large folio costs in proportion to the
    /// folio (ext4 walks every block of it). Bounded writes keep folios
    /// small, so a 4 KiB write stays cheap after 1 MiB ones.
    pub(super) fn write_at(&self, buf: &[u8], offset: u64, op: &'static str) -> Result<(), Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let room = (WRITE_PIECE - at % WRITE_PIECE) as usize;
            let n = room.min(buf.len() - done);
            self.file
                .write_all_at(&buf[done..done + n], at)
                .map_err(Error::io(op))?;
            done += n;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros.
    ///
    /// Regular files: fallocate `ZERO_RANGE`, else `PUNCH_HOLE`, else writing
    /// zeros (the first method that is unsupported is not tried again).
    /// Block devices: writing zeros.
    pub(super) fn zero(&self, offset: u64, len: u64) -> Result<(), Error> {
        const OP: &str = "zero a range of the device";
        if len == 0 {
            return Ok(());
        }
        if self.kind == DeviceKind::File {
            loop {
                let mode = match self.zero_mode.load(Ordering::Relaxed) {
                    ZERO_RANGE => sys::ZERO_RANGE,
                    PUNCH_HOLE => sys::PUNCH_HOLE,
                    _ => break,
                };
                match sys::fallocate(&self.file, mode, offset, len) {
                    Ok(()) => return Ok(()),
                    Err(e) if sys::is_unsupported(&e) => {
                        let next = if mode == sys::ZERO_RANGE {
                            PUNCH_HOLE
                        } else {
                            WRITE_ZEROS
                        };
                        self.zero_mode.fetch_max(next, Ordering::Relaxed);
                    }
                    Err(e) => return Err(Error::Io { op: OP, source: e }),
                }
            }
        }
        let (mut off, end) = (offset, offset + len);
        while off < end {
            let n = (end - off).min(ZEROS.len() as u64);
            self.write_at(&ZEROS[..n as usize], off, OP)?;
            off += n;
        }
        Ok(())
    }

    /// Writes extent `e`'s record (one sector-contained 64-byte write).
    pub(super) fn write_extent_record(&self, e: u64, rec: &ExtentRecord) -> Result<(), Error> {
        let off = self.sb.layout.extent_record_offset(e);
        self.write_at(&rec.encode(e), off, "write an extent record")
    }

    /// Writes epoch slot `s` (one sector-contained 64-byte write).
    pub(super) fn write_slot(&self, s: u32, slot: &EpochSlot) -> Result<(), Error> {
        let off = self.sb.layout.epoch_slot_offset(s);
        self.write_at(&slot.encode(s), off, "write an epoch slot")
    }

    /// Reads the crcs of `count` blocks of extent `e` from block `first`.
    pub(super) fn read_crcs(&self, e: u64, first: u32, count: u32) -> Result<Vec<u32>, Error> {
        let mut out = vec![0u32; count as usize];
        self.crcs
            .read(self.crc_index(e, first), &mut out)
            .ok_or_else(|| Error::io("read block checksums")(out_of_table()))?;
        Ok(out)
    }

    /// Writes the crcs of blocks `first..first + crcs.len()` of extent `e`:
    /// stores into the shared mapping of the crc table, in the page cache at
    /// once.
    pub(super) fn write_crcs(&self, e: u64, first: u32, crcs: &[u32]) -> Result<(), Error> {
        self.crcs
            .write(self.crc_index(e, first), crcs)
            .ok_or_else(|| Error::io("write block checksums")(out_of_table()))
    }

    fn crc_index(&self, e: u64, first: u32) -> usize {
        let l = &self.sb.layout;
        ((l.crc_offset(e, first) - l.crc_table_offset) / 4) as usize
    }
}

fn out_of_table() -> std::io::Error {
    std::io::Error::other("checksum entry outside the crc table")
}
