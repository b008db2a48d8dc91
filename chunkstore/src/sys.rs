//! Thin, safe wrappers over the Linux system calls the store needs
//! (flock, fallocate, the block-device size ioctl).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `fallocate` mode: zero a range, keeping the file size.
pub(crate) const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode: deallocate a range (reads as zeros), keeping the size.
pub(crate) const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// Takes an exclusive, non-blocking `flock` on `file`.
///
/// Returns `Ok(false)` if another open file description holds a lock. The
/// lock lives as long as the file description (i.e. until `file` is closed).
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock only reads its integer arguments; the fd is valid
        // because `file` is borrowed for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// `fallocate(fd, mode, offset, len)`.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is valid
        // because `file` is borrowed for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// `posix_fadvise(fd, offset, len, POSIX_FADV_DONTNEED)`.
pub(crate) fn advise_dontneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is
    // valid because `file` is borrowed for the duration of the call.
    let rc =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Whether an error means "this fallocate mode is not supported here".
pub(crate) fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV)
    )
}

/// `_IOR(0x12, 114, u64)`: the `BLKGETSIZE64` request number.
const fn blkgetsize64() -> libc::c_ulong {
    // Directions and size-field widths differ between architectures.
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const IOC_READ: libc::c_ulong = 2 << 29;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const IOC_READ: libc::c_ulong = 2 << 30;
    IOC_READ | (8 << 16) | (0x12 << 8) | 114
}

/// The size in bytes of the block device open as `file`.
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // The request parameter is c_ulong on glibc and c_int on musl: `as _`
    // keeps the bit pattern either way.
    //
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which
    // points to a live, properly aligned local; the fd is valid because
    // `file` is borrowed for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), blkgetsize64() as _, &mut size) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flock_excludes_second_description() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = File::open(f.path()).unwrap();
        let b = File::open(f.path()).unwrap();
        assert!(try_lock_exclusive(&a).unwrap());
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
    }

    #[test]
    fn zero_range_on_a_file() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[0xaa; 16384], 0).unwrap();
        match fallocate(&f, ZERO_RANGE, 4096, 4096) {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => fallocate(&f, PUNCH_HOLE, 4096, 4096).unwrap(),
            Err(e) => panic!("{e}"),
        }
        let mut buf = [1u8; 16384];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xaa));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..].iter().all(|&b| b == 0xaa));
        assert_eq!(f.metadata().unwrap().len(), 16384);
    }

    #[test]
    fn ioctl_number() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(blkgetsize64(), 0x8008_1272);
    }

    #[test]
    fn block_size_of_a_regular_file_fails() {
        let f = tempfile::tempfile().unwrap();
        assert!(block_device_size(&f).is_err());
    }
}
