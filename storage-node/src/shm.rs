//! A local session's view of its client's memory: the regions passed in
//! `MapMemory`, mapped shared into the node.
//!
//! Only `ReadShm` and `WriteShm` touch them, at offsets checked against each
//! region's length. The client (and the guest whose memory it is) may change
//! the bytes at any time: a write takes a private copy before anything is
//! checked or stored, and a read that fails its checksum in shared memory is
//! read again into private memory before the node calls the copy bad.

use std::os::fd::{AsRawFd, OwnedFd};

use tessera_proto::{ShmRegion, ShmSeg};

/// One mapped region; unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; the node
// only copies bytes in and out of it (see `ShmTable::segment`).
unsafe impl Send for Mapping {}
// SAFETY: as above; concurrent copies into disjoint or overlapping ranges
// only affect the bytes' values, which the client owns.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows the
        // mapping past the table that owns it.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// The regions of one local session.
pub(crate) struct ShmTable {
    regions: Vec<Mapping>,
}

impl ShmTable {
    /// Maps every region (read-write, shared).
    pub(crate) fn map(regions: &[ShmRegion], fds: &[OwnedFd]) -> Result<ShmTable, String> {
        let mut mapped = Vec::with_capacity(regions.len());
        for (i, (r, fd)) in regions.iter().zip(fds).enumerate() {
            let len = usize::try_from(r.len).map_err(|_| format!("region {i} is too large"))?;
            let offset = libc::off_t::try_from(r.offset)
                .map_err(|_| format!("region {i} offset is too large"))?;
            // SAFETY: a fresh shared mapping of a descriptor we own; the
            // kernel checks the descriptor, length and offset.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(format!(
                    "cannot map region {i} ({len} bytes at {offset}): {}",
                    std::io::Error::last_os_error()
                ));
            }
            mapped.push(Mapping {
                ptr: ptr.cast(),
                len,
            });
        }
        Ok(ShmTable { regions: mapped })
    }

    /// The memory a segment names, if it lies inside its region.
    pub(crate) fn segment(&self, seg: &ShmSeg) -> Option<Segment<'_>> {
        let m = self.regions.get(seg.region as usize)?;
        let start = usize::try_from(seg.offset).ok()?;
        let end = start.checked_add(seg.len as usize)?;
        if end > m.len {
            return None;
        }
        Some(Segment {
            // SAFETY: start <= end <= m.len: inside the live mapping.
            ptr: unsafe { m.ptr.add(start) },
            len: end - start,
            _table: std::marker::PhantomData,
        })
    }

    /// Every segment of a request, or `None` if one is out of bounds.
    pub(crate) fn segments(&self, list: &[u8]) -> Option<Vec<Segment<'_>>> {
        ShmSeg::iter(list).map(|s| self.segment(&s)).collect()
    }
}

/// A checked range of a session's mapped memory. Segments of one request
/// may overlap (the client's choice), so none hands out a reference that
/// outlives one copy; the client may change the bytes at any time, which
/// only changes the values copied.
pub(crate) struct Segment<'a> {
    ptr: *mut u8,
    len: usize,
    _table: std::marker::PhantomData<&'a ShmTable>,
}

impl<'a> Segment<'a> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends the segment's bytes to `out`.
    pub(crate) fn copy_out(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        // SAFETY: ptr..ptr+len is inside a mapping the table keeps alive for
        // 'a; `out` has room for len more bytes and is private memory, so
        // the ranges do not overlap; set_len covers exactly what was copied.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr().add(out.len()), self.len);
            out.set_len(out.len() + self.len);
        }
    }

    /// Copies `src` (private memory, `len` bytes) into the segment.
    pub(crate) fn copy_in(&self, src: &[u8]) {
        assert_eq!(src.len(), self.len, "segment length");
        // SAFETY: as in copy_out; `src` is private memory of the same length.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, self.len) };
    }

    /// The segment as a slice, for a read placed straight into it. Taking
    /// `self` by value keeps it the only view of this memory in the node.
    pub(crate) fn into_slice(self) -> &'a mut [u8] {
        // SAFETY: inside the live mapping (see `segment`); the segment is
        // consumed, so the node holds no other view of these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    fn file(len: usize) -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len as u64).unwrap();
        f
    }

    #[test]
    fn segments_are_bounds_checked_and_shared_with_the_file() {
        let mut f = file(16384);
        let fd: OwnedFd = f.try_clone().unwrap().into();
        let t = ShmTable::map(
            &[ShmRegion {
                len: 8192,
                offset: 4096,
            }],
            &[fd],
        )
        .unwrap();
        let s = t
            .segment(&ShmSeg {
                region: 0,
                len: 512,
                offset: 8192 - 512,
            })
            .unwrap();
        s.copy_in(&[7u8; 512]);
        let mut out = Vec::new();
        s.copy_out(&mut out);
        assert_eq!(out, [7u8; 512]);
        f.seek(std::io::SeekFrom::Start(4096 + 8192 - 512)).unwrap();
        let mut back = [0u8; 512];
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, [7u8; 512]);
        // Past the end, another region, offsets that overflow: refused.
        assert!(t
            .segment(&ShmSeg {
                region: 0,
                len: 513,
                offset: 8192 - 512
            })
            .is_none());
        assert!(t
            .segment(&ShmSeg {
                region: 1,
                len: 1,
                offset: 0
            })
            .is_none());
        assert!(t
            .segment(&ShmSeg {
                region: 0,
                len: 1,
                offset: u64::MAX
            })
            .is_none());
    }
}
