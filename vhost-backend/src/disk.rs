//! What the device needs from the storage behind it.

use std::future::Future;
use std::sync::Arc;

/// A disk the device serves: byte offsets and lengths, multiples of 512.
/// Implemented by the volume client; tests use an in-memory disk.
pub trait BlockDisk: Send + Sync + 'static {
    /// Why an operation failed; the guest sees `VIRTIO_BLK_S_IOERR`, the log the error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Size in bytes.
    fn capacity(&self) -> u64;

    /// The handle one device queue uses. The device asks one per queue, so
    /// a disk that keeps per-handle state (connections) shares nothing
    /// between queues; the default shares `self`.
    fn for_queue(self: &Arc<Self>) -> Arc<Self> {
        self.clone()
    }

    /// The guest memory's file-backed regions, listed again whenever the
    /// memory table changes: a disk whose storage can map them may move
    /// data to and from them directly. The default ignores them.
    fn share_memory(&self, _regions: Vec<tessera_replicator::SharedRegion>) {}

    /// Reads into the concatenation of `bufs` at `offset`.
    fn readv(
        &self,
        offset: u64,
        bufs: &mut [&mut [u8]],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Writes the concatenation of `bufs` at `offset`; done when held by
    /// every copy the disk's policy requires.
    fn writev(
        &self,
        offset: u64,
        bufs: &[&[u8]],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Makes every completed write stable.
    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Discards a range (reads back as zeros).
    fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Writes zeros over a range; `unmap` lets the disk free the space.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl BlockDisk for tessera_replicator::Volume {
    type Error = tessera_replicator::VolumeError;

    fn capacity(&self) -> u64 {
        self.size()
    }

    /// Each queue gets its own connections to the storage nodes.
    fn for_queue(self: &Arc<Self>) -> Arc<Self> {
        Arc::new(self.fork())
    }

    /// Every queue's handle shares the list.
    fn share_memory(&self, regions: Vec<tessera_replicator::SharedRegion>) {
        tessera_replicator::Volume::share_memory(self, regions);
    }

    async fn readv(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), Self::Error> {
        tessera_replicator::Volume::readv(self, offset, bufs).await
    }

    async fn writev(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), Self::Error> {
        tessera_replicator::Volume::writev(self, offset, bufs).await
    }

    async fn flush(&self) -> Result<(), Self::Error> {
        tessera_replicator::Volume::flush(self).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
        tessera_replicator::Volume::discard(self, offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), Self::Error> {
        if unmap {
            tessera_replicator::Volume::discard(self, offset, len).await
        } else {
            tessera_replicator::Volume::write_zeroes(self, offset, len).await
        }
    }
}

/// An in-memory disk, for tests of the device.
#[derive(Debug)]
pub struct MemDisk {
    data: std::sync::Mutex<Vec<u8>>,
}

impl MemDisk {
    pub fn new(size: u64) -> Self {
        MemDisk {
            data: std::sync::Mutex::new(vec![0; size as usize]),
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().expect("memdisk poisoned").clone()
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, MemDiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity() => Ok(offset as usize..end as usize),
            _ => Err(MemDiskError { offset, len }),
        }
    }
}

/// An I/O beyond the end of a [`MemDisk`].
#[derive(Debug, thiserror::Error)]
#[error("range at {offset} of {len} bytes is beyond the disk")]
pub struct MemDiskError {
    offset: u64,
    len: u64,
}

impl BlockDisk for MemDisk {
    type Error = MemDiskError;

    fn capacity(&self) -> u64 {
        self.data.lock().expect("memdisk poisoned").len() as u64
    }

    async fn readv(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), Self::Error> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let r = self.range(offset, len)?;
        let d = self.data.lock().expect("memdisk poisoned");
        let mut pos = r.start;
        for b in bufs.iter_mut() {
            b.copy_from_slice(&d[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }

    async fn writev(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), Self::Error> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let r = self.range(offset, len)?;
        let mut d = self.data.lock().expect("memdisk poisoned");
        let mut pos = r.start;
        for b in bufs {
            d[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
        let r = self.range(offset, len)?;
        self.data.lock().expect("memdisk poisoned")[r].fill(0);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), Self::Error> {
        self.discard(offset, len).await
    }
}
