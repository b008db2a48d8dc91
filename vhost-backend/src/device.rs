//! Executing a validated request against the disk.
//!
//! Write data goes from guest memory to the disk client as slices of the
//! guest's own pages (no intermediate copy); read data is placed into the
//! guest's segments.

use vm_memory::{Bytes, GuestMemory};

use crate::disk::BlockDisk;
use crate::request::{Kind, Request, Segment};

const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;

/// Runs `req`; returns the status and the number of bytes written into the chain.
pub async fn execute<D: BlockDisk, M: GuestMemory + Sync>(
    disk: &D,
    mem: &M,
    req: &Request,
    serial: &[u8; 20],
) -> (u8, u32) {
    let result: Result<(), String> = match &req.kind {
        Kind::Read {
            offset,
            len,
            segments,
        } => read(disk, mem, *offset, *len, segments).await,
        Kind::Write {
            offset, segments, ..
        } => match guest_slices(mem, segments) {
            Ok(slices) => disk
                .writev(*offset, &slices)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        },
        Kind::Flush => disk.flush().await.map_err(|e| e.to_string()),
        Kind::GetId { segments } => write_segments(mem, segments, serial),
        Kind::Discard { ranges } => {
            let mut r = Ok(());
            for range in ranges {
                r = disk
                    .discard(range.offset, range.len)
                    .await
                    .map_err(|e| e.to_string());
                if r.is_err() {
                    break;
                }
            }
            r
        }
        Kind::WriteZeroes { ranges, unmap } => {
            let mut r = Ok(());
            for range in ranges {
                r = disk
                    .write_zeroes(range.offset, range.len, *unmap)
                    .await
                    .map_err(|e| e.to_string());
                if r.is_err() {
                    break;
                }
            }
            r
        }
    };
    match result {
        Ok(()) => (S_OK, req.used_len_ok),
        Err(e) => {
            tracing::warn!(request = ?req.kind_name(), error = %e, "request failed");
            (S_IOERR, 1)
        }
    }
}

impl Request {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Read { .. } => "read",
            Kind::Write { .. } => "write",
            Kind::Flush => "flush",
            Kind::GetId { .. } => "get-id",
            Kind::Discard { .. } => "discard",
            Kind::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

async fn read<D: BlockDisk, M: GuestMemory>(
    disk: &D,
    mem: &M,
    offset: u64,
    len: u64,
    segments: &[Segment],
) -> Result<(), String> {
    if let Some(slices) = guest_slices_mut(mem, segments) {
        // The data lands in the guest's pages straight from the socket.
        let mut slices = slices?;
        return disk
            .readv(offset, &mut slices)
            .await
            .map_err(|e| e.to_string());
    }
    // Segments that overlap cannot be lent out as distinct buffers: read
    // into one and copy it over them in order, as the spec's byte stream.
    let mut buf = vec![0u8; len as usize];
    disk.readv(offset, &mut [&mut buf])
        .await
        .map_err(|e| e.to_string())?;
    write_segments(mem, segments, &buf)
}

/// Whether no two segments share a byte of guest memory.
fn disjoint(segments: &[Segment]) -> bool {
    let mut spans: Vec<(u64, u64)> = segments
        .iter()
        .map(|s| (s.addr.0, s.addr.0.saturating_add(s.len as u64)))
        .collect();
    spans.sort_unstable();
    spans.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// The guest's data segments as writable byte slices of its memory, or
/// `None` if two segments overlap (their slices would alias).
// Guest memory is writable through a shared handle by design (it is the
// guest's RAM, mapped shared): the mutable slices come from the mapping, not
// from `mem`'s own data.
#[allow(clippy::mut_from_ref)]
fn guest_slices_mut<'m, M: GuestMemory>(
    mem: &'m M,
    segments: &[Segment],
) -> Option<Result<Vec<&'m mut [u8]>, String>> {
    if !disjoint(segments) {
        return None;
    }
    Some(guest_slices_mut_disjoint(mem, segments))
}

#[allow(clippy::mut_from_ref)]
fn guest_slices_mut_disjoint<'m, M: GuestMemory>(
    mem: &'m M,
    segments: &[Segment],
) -> Result<Vec<&'m mut [u8]>, String> {
    let mut out = Vec::with_capacity(segments.len());
    for s in segments {
        let bad = |e: vm_memory::GuestMemoryError| format!("guest memory at {:#x}: {e}", s.addr.0);
        for slice in mem
            .get_slices(s.addr, s.len as usize, vm_memory::Permissions::Write)
            .map_err(bad)?
        {
            let slice = slice.map_err(bad)?;
            let guard = slice.ptr_guard_mut();
            // SAFETY: `slice` covers `slice.len()` mapped, writable bytes of
            // guest memory that stay mapped for `'m` (the mapping is owned by
            // `mem`, which the caller keeps alive until the read completes).
            // The segments are pairwise disjoint (checked by `guest_slices_mut`), so
            // no two returned slices alias. The guest does not touch a
            // buffer it has handed to the device until the request completes
            // (the virtio contract); if it does, only the bytes it sees change.
            let bytes = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
            out.push(bytes);
        }
    }
    Ok(out)
}

/// Copies `data` into the guest segments, in order.
fn write_segments<M: GuestMemory>(
    mem: &M,
    segments: &[Segment],
    data: &[u8],
) -> Result<(), String> {
    let mut pos = 0usize;
    for s in segments {
        let n = (s.len as usize).min(data.len() - pos);
        mem.write_slice(&data[pos..pos + n], s.addr)
            .map_err(|e| format!("guest memory at {:#x}: {e}", s.addr.0))?;
        pos += n;
        if pos == data.len() {
            break;
        }
    }
    Ok(())
}

/// The guest's data segments as byte slices of its memory.
fn guest_slices<'m, M: GuestMemory>(
    mem: &'m M,
    segments: &[Segment],
) -> Result<Vec<&'m [u8]>, String> {
    let mut out = Vec::with_capacity(segments.len());
    for s in segments {
        let bad = |e: vm_memory::GuestMemoryError| format!("guest memory at {:#x}: {e}", s.addr.0);
        for slice in mem
            .get_slices(s.addr, s.len as usize, vm_memory::Permissions::Read)
            .map_err(bad)?
        {
            let slice = slice.map_err(bad)?;
            let guard = slice.ptr_guard();
            // SAFETY: `slice` covers `slice.len()` mapped bytes of guest memory
            // that stay mapped for `'m`: the mapping is owned by `mem`, which
            // the caller keeps alive (and borrowed) until the write completes.
            // The bytes are only read. The guest may change them while the
            // request is in flight only by breaking the virtio contract; that
            // can change the data written (never our memory safety), and the
            // payload checksum sent with it makes the storage node reject a
            // torn payload instead of storing it.
            let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
            out.push(bytes);
        }
    }
    Ok(out)
}
