//! [`Disk`]: one formatted device, shared by the node's I/O threads.

mod crc_cache;
mod data;
mod io;
mod open;
#[cfg(test)]
mod tests;
mod thin;
mod thin_crc;
mod thin_data;
mod vdisk;
pub use vdisk::{Doubt, Fenced};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use uuid::Uuid;

use crate::device::Device;
use crate::state::{ChunkKey, State};
use crate::superblock::Superblock;
use crate::{Error, BLOCK_SIZE, DEFAULT_EXTENT_SIZE, SECTOR_SIZE};

/// Number of chunk lock stripes.
const STRIPES: usize = 256;

/// How to format a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatOptions {
    /// The new disk's identity.
    pub disk_uuid: Uuid,
    /// Extent (= chunk) size in bytes: a multiple of 4096, 4 KiB ..= 1 GiB.
    pub extent_size: u32,
    /// Regular files only: the size to give a missing or empty file.
    /// `None`: use the existing size. Ignored for block devices.
    pub size: Option<u64>,
    /// Overwrite an existing Tessera superblock.
    pub force: bool,
    /// Format version 3: chunks take space 4 KiB block by block as they
    /// are written (a chunk's `extent_size` stays its size). Otherwise
    /// version 2: a chunk's first write takes a whole extent.
    pub thin: bool,
}

impl FormatOptions {
    /// Default options (1 MiB extents, existing size, no force) for `disk_uuid`.
    pub fn new(disk_uuid: Uuid) -> Self {
        FormatOptions {
            disk_uuid,
            extent_size: DEFAULT_EXTENT_SIZE,
            size: None,
            force: false,
            thin: false,
        }
    }
}

/// A snapshot of a disk's identity and usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The disk's identity.
    pub uuid: Uuid,
    /// On-disk format version.
    pub format_version: u32,
    /// Extent (= chunk) size in bytes.
    pub extent_size: u32,
    /// Checksum unit in bytes.
    pub block_size: u32,
    /// Device size recorded at format time.
    pub device_size: u64,
    /// Unix seconds at format time.
    pub created: u64,
    /// Extents in the data region.
    pub extents_total: u64,
    /// Extents holding a chunk (or being filled by a first write).
    pub extents_used: u64,
    /// Extents on the free list.
    pub extents_free: u64,
    /// Extents whose record is damaged in every copy (or could not be
    /// written): neither free nor used.
    pub quarantined_extents: u64,
    /// Unallocated chunks that a damaged extent may hold: they read as
    /// errors, not zeros, until written or discarded whole.
    pub suspect_chunks: u64,
    /// Damaged extents whose owner cannot be told: while there is one,
    /// every unallocated chunk reads as an error until written or discarded
    /// whole.
    pub ownerless_extents: u64,
    /// `extents_total * extent_size`.
    pub capacity: u64,
    /// `extents_used * extent_size`.
    pub used: u64,
    /// Slots in the epoch table.
    pub epoch_slots_total: u64,
    /// Slots holding a vDisk's epoch.
    pub epoch_slots_used: u64,
    /// Slots whose content was lost (every copy damaged).
    pub quarantined_epoch_slots: u64,
    /// How many times epoch slots were found lost (0: never). While it is
    /// not 0, a vDisk not fenced since the last loss is refused writes.
    pub epoch_loss_serial: u64,
    /// Whether the epoch and extent tables have a second copy (disks
    /// formatted at version 2; not disks upgraded from version 1).
    pub mirrored_tables: bool,
}

/// One allocated chunk of a vDisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Chunk index within the vDisk.
    pub chunk: u64,
    /// Extent holding it.
    pub extent: u64,
    /// Allocation generation (disk-wide, strictly increasing).
    pub generation: u64,
}

/// One formatted device, open for I/O. `Send + Sync`; all methods take `&self`.
///
/// Dropping it closes the device (and releases a [`crate::FileDevice`]'s lock).
pub struct Disk {
    path: PathBuf,
    dev: Arc<dyn Device>,
    sb: Superblock,
    state: Mutex<State>,
    stripes: Box<[RwLock<()>]>,
    /// crc32c of a 4 KiB block of zeros.
    zero_crc: u32,
    /// The stored crcs of recently used extents.
    crcs: crc_cache::CrcCache,
    /// Serialises reservations of allocation generations.
    reserving: Mutex<()>,
    /// The boot tag epoch raises are written under (see [`Disk::set_boot`]).
    boot: std::sync::atomic::AtomicU64,
    /// Names this open's doubt about chunks whose owner records were lost
    /// (see [`Disk::fence_report`]); new at every open, never 0.
    doubt_token: u64,
    /// Format v3: the block map and its log.
    thin: Option<thin::Thin>,
}

impl std::fmt::Debug for Disk {
    /// Identity only: the in-memory maps can be huge.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("uuid", &self.sb.disk_uuid)
            .finish_non_exhaustive()
    }
}

impl Disk {
    fn new(
        path: &Path,
        dev: Arc<dyn Device>,
        sb: Superblock,
        state: State,
        thin: Option<thin::Thin>,
    ) -> Disk {
        // Rows of the crc cache: an extent's blocks, or (format v3) a
        // group of physical blocks.
        let blocks = if sb.layout.thin.is_some() {
            thin_data::CRC_GROUP
        } else {
            sb.layout.blocks_per_extent()
        };
        Disk {
            path: path.to_path_buf(),
            dev,
            sb,
            state: Mutex::new(state),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            zero_crc: tessera_crc::crc32c(&[0u8; BLOCK_SIZE as usize]),
            crcs: crc_cache::CrcCache::new(crc_cache::DEFAULT_BUDGET, blocks),
            boot: std::sync::atomic::AtomicU64::new(0),
            doubt_token: vdisk::new_doubt_token(),
            reserving: Mutex::new(()),
            thin,
        }
    }

    /// The disk's identity.
    pub fn uuid(&self) -> Uuid {
        self.sb.disk_uuid
    }

    /// The path the disk was opened from (empty for a device opened with
    /// [`Disk::open_device`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Identity, geometry and usage.
    pub fn info(&self) -> DiskInfo {
        let l = &self.sb.layout;
        let c = self.state().counts();
        let es = u64::from(l.extent_size);
        // Format v3 counts space in blocks; its "extents" are chunks' worth
        // of used blocks, for the fields that speak of extents.
        let (capacity, used, extents_used, extents_free, quarantined) = match &self.thin {
            Some(t) => {
                let free = t.index().map.free_blocks();
                let total = t.regions.blocks_total;
                let bs = u64::from(BLOCK_SIZE);
                let chunks = (total - free).div_ceil(u64::from(t.blocks_per_chunk));
                (
                    total * bs,
                    (total - free) * bs,
                    chunks.min(l.extents_total),
                    l.extents_total.saturating_sub(chunks),
                    0,
                )
            }
            None => {
                let used = l.extents_total - c.extents_free - c.extents_quarantined;
                (
                    l.extents_total * es,
                    used * es,
                    used,
                    c.extents_free,
                    c.extents_quarantined,
                )
            }
        };
        let slots_total = u64::from(l.epoch_slots);
        DiskInfo {
            uuid: self.sb.disk_uuid,
            format_version: self.sb.version,
            extent_size: l.extent_size,
            block_size: BLOCK_SIZE,
            device_size: l.device_size,
            created: self.sb.created,
            extents_total: l.extents_total,
            extents_used,
            extents_free,
            quarantined_extents: quarantined,
            suspect_chunks: c.suspect_chunks,
            ownerless_extents: c.ownerless_extents,
            capacity,
            used,
            epoch_slots_total: slots_total,
            epoch_slots_used: slots_total - c.slots_free - c.slots_lost,
            quarantined_epoch_slots: c.slots_lost,
            epoch_loss_serial: c.loss_serial,
            mirrored_tables: l.thin.is_some() || l.mirrored(),
        }
    }

    /// Makes everything written before durable (fdatasync).
    pub fn flush(&self) -> Result<(), Error> {
        self.sync("flush the device (fdatasync)")
    }

    /// The vDisk's stored epoch; 0 if unknown.
    pub fn epoch(&self, vdisk: Uuid) -> u64 {
        self.state().epoch(vdisk)
    }

    /// Every vDisk with an epoch slot or an allocated chunk, as
    /// `(vdisk, epoch, chunks)`, sorted by vDisk.
    pub fn vdisks(&self) -> Vec<(Uuid, u64, u64)> {
        let mut out = self.state().vdisks();
        if let Some(t) = &self.thin {
            let counts = t.index().map.chunk_counts();
            for (vdisk, (chunks, _)) in counts {
                match out.binary_search_by_key(&vdisk, |(v, _, _)| *v) {
                    Ok(i) => out[i].2 = chunks,
                    Err(i) => out.insert(i, (vdisk, self.state().epoch(vdisk), chunks)),
                }
            }
        }
        out
    }

    /// What each vDisk's copy takes on this disk, in bytes (sorted by
    /// vDisk): its written blocks (format v3) or its chunks' extents.
    pub fn usage(&self) -> Vec<(Uuid, u64)> {
        if let Some(t) = &self.thin {
            return t
                .index()
                .map
                .chunk_counts()
                .into_iter()
                .map(|(v, (_, blocks))| (v, blocks * u64::from(BLOCK_SIZE)))
                .collect();
        }
        let extent = u64::from(self.sb.layout.extent_size);
        self.vdisks()
            .into_iter()
            .filter(|(_, _, n)| *n > 0)
            .map(|(v, _, n)| (v, n * extent))
            .collect()
    }

    /// The vDisk's allocated chunks, sorted by chunk index.
    pub fn chunks(&self, vdisk: Uuid) -> Vec<ChunkInfo> {
        if let Some(t) = &self.thin {
            // Format v3 has no extents: `extent` is the chunk's first
            // block's physical block, in chunks.
            let ix = t.index();
            return ix
                .map
                .chunks_of(vdisk)
                .into_iter()
                .filter_map(|chunk| {
                    let r = ix.map.runs(&(vdisk, chunk)).first().copied()?;
                    Some(ChunkInfo {
                        chunk,
                        extent: r.phys / u64::from(t.blocks_per_chunk),
                        generation: r.generation,
                    })
                })
                .collect();
        }
        self.state()
            .chunks_of(vdisk)
            .into_iter()
            .filter(|(_, m)| m.committed)
            .map(|(chunk, m)| ChunkInfo {
                chunk,
                extent: m.extent,
                generation: m.generation,
            })
            .collect()
    }

    /// Byte offset of the chunk's extent in the device, if it is allocated.
    /// Format v3: `None` (a chunk's blocks are wherever they were placed).
    pub fn extent_offset(&self, vdisk: Uuid, chunk: u64) -> Option<u64> {
        if self.thin.is_some() {
            return None;
        }
        let m = self.state().lookup(&(vdisk, chunk))?;
        m.committed
            .then(|| self.sb.layout.extent_data_offset(m.extent))
    }

    /// Byte offsets in the device of the two checkpoint areas of the block
    /// map (format v3; `None` on older formats): for tools and fault tests
    /// that damage the map on purpose.
    pub fn checkpoint_areas(&self) -> Option<[u64; 2]> {
        self.sb.layout.thin.as_ref().map(|t| t.checkpoint_offsets)
    }

    /// Byte offset in the device of block `block` (4 KiB) of the chunk, if
    /// it holds data: in the chunk's extent, or (format v3) wherever the
    /// block was placed.
    pub fn block_offset(&self, vdisk: Uuid, chunk: u64, block: u32) -> Option<u64> {
        if self.thin.is_some() {
            let (p, _) = self.thin_lookup(&(vdisk, chunk), block, 1)[0]?;
            return Some(self.sb.layout.block_data_offset(p));
        }
        self.extent_offset(vdisk, chunk)
            .map(|o| o + u64::from(block) * u64::from(BLOCK_SIZE))
    }

    /// The in-memory state (never held across I/O).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock stripe of a chunk.
    fn stripe(&self, key: &ChunkKey) -> &RwLock<()> {
        let (hi, lo) = key.0.as_u64_pair();
        let h = (hi ^ lo.rotate_left(29) ^ key.1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // The top 8 bits pick one of the 256 stripes.
        &self.stripes[(h >> 56) as usize % self.stripes.len()]
    }

    /// Checks an I/O range within a chunk.
    fn check_range(&self, offset: u32, len: usize) -> Result<(), Error> {
        let bad = || Error::InvalidRange {
            offset,
            len: len as u64,
        };
        let end = u64::from(offset).checked_add(len as u64).ok_or_else(bad)?;
        let sector = u64::from(SECTOR_SIZE);
        if u64::from(offset) % sector != 0
            || len as u64 % sector != 0
            || end > u64::from(self.sb.layout.extent_size)
        {
            return Err(bad());
        }
        Ok(())
    }
}

/// Shared lock on an `RwLock`, ignoring poisoning (the data is `()` or a flag).
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Exclusive lock on an `RwLock`, ignoring poisoning.
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
