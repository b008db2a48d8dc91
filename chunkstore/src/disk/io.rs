//! Low-level device access: positioned reads and writes, zeroing, and the
//! writes of single table entries and crc runs.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::{DeviceKind, Disk};
use crate::record::{EpochSlot, ExtentRecord};
use crate::sys;
use crate::Error;

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

    /// `pwrite` of all of `buf`.
    pub(super) fn write_at(&self, buf: &[u8], offset: u64, op: &'static str) -> Result<(), Error> {
        self.file.write_all_at(buf, offset).map_err(Error::io(op))
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
        let mut raw = vec![0u8; count as usize * 4];
        let off = self.sb.layout.crc_offset(e, first);
        self.read_at(&mut raw, off, "read block checksums")?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Writes the crcs of blocks `first..first + crcs.len()` of extent `e`.
    pub(super) fn write_crcs(&self, e: u64, first: u32, crcs: &[u32]) -> Result<(), Error> {
        let raw: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        let off = self.sb.layout.crc_offset(e, first);
        self.write_at(&raw, off, "write block checksums")
    }
}
