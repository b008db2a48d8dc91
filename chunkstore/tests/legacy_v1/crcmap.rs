//! The crc table mapped shared into memory.
//!
//! A checksum update is a 4-byte store into the mapping: it is in the page
//! cache the moment it is made (so it survives `kill -9` of the process, like
//! a `pwrite`), costs no system call, and `fdatasync` of the device writes
//! it out with the data. Entries are little-endian `u32`s accessed through
//! atomics, so concurrent readers and writers of one page never race.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

/// A shared mapping of `len` crc entries.
pub(crate) struct CrcMap {
    base: *mut AtomicU32,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through
// `AtomicU32`, which is safe to use from any thread; the pointer is owned by
// this value and unmapped once, on drop.
unsafe impl Send for CrcMap {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for CrcMap {}

impl CrcMap {
    /// Maps `bytes` bytes of `file` at `offset` (both multiples of the page size).
    pub(crate) fn map(file: &File, offset: u64, bytes: u64) -> std::io::Result<CrcMap> {
        let len =
            usize::try_from(bytes).map_err(|_| std::io::Error::other("crc table too large"))?;
        if len == 0 {
            return Ok(CrcMap {
                base: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
                bytes: 0,
            });
        }
        let off =
            libc::off_t::try_from(offset).map_err(|_| std::io::Error::other("offset too large"))?;
        // SAFETY: a fresh shared mapping of a file we hold open; no existing
        // memory is affected. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CrcMap {
            base: p.cast::<AtomicU32>(),
            len: len / 4,
            bytes: len,
        })
    }

    fn entries(&self) -> &[AtomicU32] {
        // SAFETY: `base` points to `len` u32-sized, 4-byte-aligned (page
        // aligned) entries of a live mapping owned by `self`; `AtomicU32` has
        // the layout of `u32`, and shared memory is only touched atomically.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    /// Entries `first..first + out.len()`.
    pub(crate) fn read(&self, first: usize, out: &mut [u32]) -> Option<()> {
        let src = self.entries().get(first..first.checked_add(out.len())?)?;
        for (o, s) in out.iter_mut().zip(src) {
            *o = u32::from_le(s.load(Ordering::Relaxed));
        }
        Some(())
    }

    /// Stores entries from `first`.
    pub(crate) fn write(&self, first: usize, crcs: &[u32]) -> Option<()> {
        let dst = self.entries().get(first..first.checked_add(crcs.len())?)?;
        for (d, c) in dst.iter().zip(crcs) {
            d.store(c.to_le(), Ordering::Relaxed);
        }
        Some(())
    }
}

impl Drop for CrcMap {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: unmaps exactly the mapping made in `map`, once; no
            // reference into it outlives `self`.
            unsafe {
                libc::munmap(self.base.cast(), self.bytes);
            }
        }
    }
}
