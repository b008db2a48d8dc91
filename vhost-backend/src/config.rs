//! The device's virtio features and configuration space.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::request::{Limits, SECTOR_SIZE};

/// Logical block size reported to the guest: 512 bytes, so images made
/// for 512-byte sectors (partition tables, templates) mean the same thing.
pub const BLOCK_SIZE: u32 = 512;
/// Physical block size (the checksum unit of the storage nodes), reported in
/// the topology so the guest aligns its I/O to it: 2^3 logical blocks.
pub const PHYSICAL_BLOCK_EXP: u8 = 3;
/// Largest data segment.
pub const SIZE_MAX: u32 = 128 * 1024;
/// Largest DISCARD / WRITE_ZEROES range, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// The device's shape: what the guest is told and what requests are held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Size in bytes (a multiple of 512).
    pub capacity: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl DeviceConfig {
    /// Virtio features offered. FLUSH is offered because writes are
    /// acknowledged once in every copy's page cache, before they are stable:
    /// the device has a volatile write cache, and the guest must flush.
    pub fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    }

    /// Segments per request: the queue less the header and status descriptors.
    pub fn seg_max(&self) -> u32 {
        (self.queue_size as u32).saturating_sub(2).max(1)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity,
            size_max: SIZE_MAX,
            seg_max: self.seg_max(),
            max_discard_seg: 1,
            max_discard_sectors: MAX_DISCARD_SECTORS,
        }
    }

    /// `struct virtio_blk_config`, little-endian, 60 bytes.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(60);
        c.extend_from_slice(&(self.capacity / SECTOR_SIZE).to_le_bytes()); // capacity
        c.extend_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
        c.extend_from_slice(&self.seg_max().to_le_bytes()); // seg_max
        c.extend_from_slice(&[0u8; 4]); // geometry
        c.extend_from_slice(&BLOCK_SIZE.to_le_bytes()); // blk_size
                                                        // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
        c.push(PHYSICAL_BLOCK_EXP);
        c.push(0);
        c.extend_from_slice(&(1u16 << PHYSICAL_BLOCK_EXP).to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.push(1); // writeback: the cache is write-back (see `features`)
        c.push(0); // unused0
        c.extend_from_slice(&self.num_queues.to_le_bytes()); // num_queues
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        c.extend_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c.extend_from_slice(&(1u32 << PHYSICAL_BLOCK_EXP).to_le_bytes()); // discard_sector_alignment
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c.extend_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c.push(1); // write_zeroes_may_unmap
        c.extend_from_slice(&[0u8; 3]); // unused1
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let d = DeviceConfig {
            capacity: 1 << 30,
            num_queues: 4,
            queue_size: 256,
        };
        let c = d.config_space();
        assert_eq!(c.len(), 60);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "physical blocks of 4 KiB");
        assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 8);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(c[56], 1);
        assert_ne!(d.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    }
}
