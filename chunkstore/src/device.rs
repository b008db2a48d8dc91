//! The device seam: where a chunk store's bytes live.
//!
//! [`Disk`](crate::Disk) does all its I/O through a [`Device`]: positioned
//! reads and writes, zeroing a range, and `sync`. Production uses
//! [`FileDevice`] (a regular file or a block device, buffered I/O through the
//! page cache); tests and simulations use
//! [`PowerLossDevice`](crate::PowerLossDevice), which keeps what was written
//! since the last `sync` volatile and can lose any part of it.
//!
//! The contract every implementation keeps (it is the page cache's):
//! * once `write_at` or `zero` returned, every later `read_at` sees it, and
//!   it survives the end of the process (`kill -9`);
//! * only what was written before a `sync` that returned survives power loss;
//!   of the rest, any part may survive, in any order, and a write may land
//!   partly (whole sectors at least: a write within one 512-byte sector
//!   lands whole or not at all).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::{sys, Error};

/// A byte-addressed device with the page cache's durability rules (see the
/// module documentation).
pub trait Device: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, with the durability of a
    /// write. The default writes zeros.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let (mut off, end) = (offset, offset + len);
        while off < end {
            let n = (end - off).min(ZEROS.len() as u64);
            self.write_at(&ZEROS[..n as usize], off)?;
            off += n;
        }
        Ok(())
    }

    /// Makes every write and zeroing that returned before this call durable
    /// (`fdatasync`).
    fn sync(&self) -> io::Result<()>;

    /// A hint: the clean cached pages of `len` bytes at `offset` may go.
    /// Nothing changes what reads return. The default does nothing.
    fn drop_cached(&self, _offset: u64, _len: u64) {}
}

/// Source of zeros for devices that cannot zero a range in place.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Largest piece of one `pwrite` (see [`FileDevice::write_at`]).
const WRITE_PIECE: u64 = 64 * 1024;

/// `zero_mode` values: the first zeroing method worth trying.
const ZERO_RANGE: u8 = 0;
const PUNCH_HOLE: u8 = 1;
const WRITE_ZEROS: u8 = 2;

/// What kind of file backs a [`FileDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A (preallocated) regular file.
    File,
    /// A raw block device.
    BlockDevice,
}

/// A regular file or a block device, exclusively locked (`flock`) for as
/// long as it is open. Buffered I/O (`pread`/`pwrite`), no `O_DIRECT`.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    kind: Kind,
    size: u64,
    /// Which way of zeroing a range works here.
    zero_mode: AtomicU8,
}

impl FileDevice {
    /// Opens an existing file or block device read-write and locks it.
    /// Fails with [`Error::Locked`] if another chunk store has it open.
    pub fn open(path: &Path) -> Result<FileDevice, Error> {
        Self::open_with(path, false)
    }

    /// Opens `path` read-write (creating a regular file if `create`) and
    /// takes the exclusive lock.
    pub(crate) fn open_with(path: &Path, create: bool) -> Result<FileDevice, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(Error::io("open the device"))?;
        if !sys::try_lock_exclusive(&file).map_err(Error::io("lock the device"))? {
            return Err(Error::Locked);
        }
        let meta = file.metadata().map_err(Error::io("stat the device"))?;
        let (kind, size) = if meta.file_type().is_block_device() {
            let size =
                sys::block_device_size(&file).map_err(Error::io("get the block device's size"))?;
            (Kind::BlockDevice, size)
        } else if meta.is_file() {
            (Kind::File, meta.len())
        } else {
            return Err(Error::UnsupportedDevice);
        };
        Ok(FileDevice {
            file,
            kind,
            size,
            zero_mode: AtomicU8::new(ZERO_RANGE),
        })
    }

    /// Whether this is a regular file with no bytes yet.
    pub(crate) fn is_empty_file(&self) -> bool {
        self.kind == Kind::File && self.size == 0
    }

    /// Regular files: gives the file `size` bytes, allocated (fallocate,
    /// else `set_len`). Block devices: nothing.
    pub(crate) fn preallocate(&mut self, size: u64) -> Result<(), Error> {
        if self.kind != Kind::File {
            return Ok(());
        }
        match sys::fallocate(&self.file, 0, 0, size) {
            Ok(()) => {}
            Err(e) if sys::is_unsupported(&e) => self
                .file
                .set_len(size)
                .map_err(Error::io("set the file's size"))?,
            Err(e) => return Err(Error::io("preallocate the file")(e)),
        }
        self.size = self.size.max(size);
        Ok(())
    }
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// `pwrite` of all of `buf`, in pieces that do not cross a 64 KiB
    /// boundary of the device.
    ///
    /// The kernel sizes a page-cache folio by the write that creates it, and
    /// a later small write into a large folio costs in proportion to the
    /// folio (ext4 walks every block of it). Bounded writes keep folios
    /// small, so a 4 KiB write stays cheap after 1 MiB ones.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let room = (WRITE_PIECE - at % WRITE_PIECE) as usize;
            let n = room.min(buf.len() - done);
            self.file.write_all_at(&buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    /// `posix_fadvise(DONTNEED)`: reading a region whole (at open) fills
    /// the page cache with large folios, and every later small write into
    /// one walks all of its blocks (ext4); dropped, the region comes back
    /// in folios no larger than the writes that touch it.
    fn drop_cached(&self, offset: u64, len: u64) {
        if let Err(e) = sys::advise_dontneed(&self.file, offset, len) {
            tracing::debug!(error = %e, "posix_fadvise(DONTNEED) failed");
        }
    }

    /// Regular files: fallocate `ZERO_RANGE`, else `PUNCH_HOLE`, else writing
    /// zeros (a method found unsupported is not tried again). Block devices:
    /// writing zeros.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.kind == Kind::File {
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
                    Err(e) => return Err(e),
                }
            }
        }
        let (mut off, end) = (offset, offset + len);
        while off < end {
            let n = (end - off).min(ZEROS.len() as u64);
            self.write_at(&ZEROS[..n as usize], off)?;
            off += n;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_device_round_trip_and_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let mut d = FileDevice::open_with(&path, true).unwrap();
        assert!(d.is_empty_file());
        d.preallocate(1 << 20).unwrap();
        assert_eq!(d.size(), 1 << 20);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8 | 1).collect();
        d.write_at(&data, 1000).unwrap();
        let mut back = vec![0u8; data.len()];
        d.read_at(&mut back, 1000).unwrap();
        assert_eq!(back, data);
        d.zero(4096, 8192).unwrap();
        d.read_at(&mut back, 1000).unwrap();
        let z = 4096 - 1000..4096 + 8192 - 1000;
        assert!(back[z.clone()].iter().all(|&b| b == 0));
        assert_eq!(back[..z.start], data[..z.start]);
        assert_eq!(back[z.end..], data[z.end..]);
        d.sync().unwrap();
        assert!(matches!(FileDevice::open(&path), Err(Error::Locked)));
    }
}
