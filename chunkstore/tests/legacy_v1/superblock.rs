//! The superblock: identity and geometry of a formatted device.
//!
//! Layout: see the crate documentation. Two copies, at 0 and at 4096.

use uuid::Uuid;

use crate::legacy_v1::codec::{get_u32, get_u64, get_uuid, put_u32, put_u64, put_uuid};
use crate::legacy_v1::layout::{Layout, LayoutError};
use crate::legacy_v1::{BLOCK_SIZE, FORMAT_VERSION, SECTOR_SIZE};

/// Size of one superblock copy.
pub(crate) const SUPERBLOCK_SIZE: usize = 4096;
/// Byte offsets of the primary and the backup copy.
pub(crate) const SUPERBLOCK_OFFSETS: [u64; 2] = [0, SUPERBLOCK_SIZE as u64];
/// The first 8 bytes of every Tessera device.
pub(crate) const MAGIC: [u8; 8] = *b"TESSERA\0";

/// Why a superblock copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// The buffer is not one 4 KiB block.
    #[error("the superblock buffer is {0} bytes instead of 4096")]
    WrongSize(usize),
    /// The block does not start with the Tessera magic.
    #[error("the block does not start with the Tessera magic")]
    NoMagic,
    /// The crc32c does not match the content.
    #[error("the superblock checksum does not match its content")]
    Checksum,
    /// Written by a format version this build does not read.
    #[error("format version {0} is not supported")]
    UnsupportedVersion(u32),
    /// Flags this build does not know are set.
    #[error("unknown superblock flags {0:#x} are set")]
    UnknownFlags(u32),
    /// The block or sector size is not the one of this format.
    #[error("block size {block} or sector size {sector} differs from 4096/512")]
    Units {
        /// Recorded block size.
        block: u32,
        /// Recorded sector size.
        sector: u32,
    },
    /// The recorded geometry breaks a rule of the format.
    #[error("the recorded geometry is invalid")]
    Geometry(#[source] LayoutError),
    /// The device is smaller than when it was formatted.
    #[error("the device has {actual} bytes but was formatted with {recorded}")]
    DeviceShrunk {
        /// Size recorded in the superblock.
        recorded: u64,
        /// Size of the device now.
        actual: u64,
    },
}

/// The decoded content of a superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Superblock {
    /// The disk's identity.
    pub disk_uuid: Uuid,
    /// Format flags (none defined in version 1).
    pub flags: u32,
    /// Unix seconds at format time.
    pub created: u64,
    /// Where everything lies.
    pub layout: Layout,
}

/// Whether `buf` starts with the Tessera magic.
pub(crate) fn has_magic(buf: &[u8]) -> bool {
    buf.starts_with(&MAGIC)
}

impl Superblock {
    /// Encodes the superblock into one sealed 4 KiB block.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        b[..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, self.flags);
        put_uuid(&mut b, 16, &self.disk_uuid);
        put_u32(&mut b, 32, l.extent_size);
        put_u32(&mut b, 36, BLOCK_SIZE);
        put_u32(&mut b, 40, SECTOR_SIZE);
        put_u32(&mut b, 44, l.epoch_slots);
        put_u64(&mut b, 48, l.device_size);
        put_u64(&mut b, 56, l.epoch_table_offset);
        put_u64(&mut b, 64, l.epoch_table_len);
        put_u64(&mut b, 72, l.extent_table_offset);
        put_u64(&mut b, 80, l.extent_table_len);
        put_u64(&mut b, 88, l.crc_table_offset);
        put_u64(&mut b, 96, l.crc_table_len);
        put_u64(&mut b, 104, l.data_offset);
        put_u64(&mut b, 112, l.extents_total);
        put_u64(&mut b, 120, self.created);
        crate::legacy_v1::codec::seal(&mut b);
        b
    }

    /// Decodes and validates one superblock copy. Never panics.
    pub(crate) fn decode(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() != SUPERBLOCK_SIZE {
            return Err(SuperblockError::WrongSize(b.len()));
        }
        if !has_magic(b) {
            return Err(SuperblockError::NoMagic);
        }
        if !crate::legacy_v1::codec::crc_ok(b) {
            return Err(SuperblockError::Checksum);
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        let flags = get_u32(b, 12);
        if flags != 0 {
            return Err(SuperblockError::UnknownFlags(flags));
        }
        let (block, sector) = (get_u32(b, 36), get_u32(b, 40));
        if block != BLOCK_SIZE || sector != SECTOR_SIZE {
            return Err(SuperblockError::Units { block, sector });
        }
        let layout = Layout {
            extent_size: get_u32(b, 32),
            epoch_slots: get_u32(b, 44),
            device_size: get_u64(b, 48),
            epoch_table_offset: get_u64(b, 56),
            epoch_table_len: get_u64(b, 64),
            extent_table_offset: get_u64(b, 72),
            extent_table_len: get_u64(b, 80),
            crc_table_offset: get_u64(b, 88),
            crc_table_len: get_u64(b, 96),
            data_offset: get_u64(b, 104),
            extents_total: get_u64(b, 112),
        };
        layout.validate().map_err(SuperblockError::Geometry)?;
        Ok(Superblock {
            disk_uuid: get_uuid(b, 16),
            flags,
            created: get_u64(b, 120),
            layout,
        })
    }
}
