//! The superblock: identity and geometry of a formatted device.
//!
//! Layout: see the crate documentation. Two copies, at 0 and at 4096.

use uuid::Uuid;

use crate::codec::{get_u32, get_u64, get_uuid, put_u32, put_u64, put_uuid};
use crate::layout::{Layout, LayoutError, ThinRegions};
use crate::{BLOCK_SIZE, FORMAT_VERSION, SECTOR_SIZE};

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
    /// The copy could not be read from the device.
    #[error("the superblock copy cannot be read")]
    Unreadable,
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
    /// The format version this copy was written with (1 or 2).
    pub version: u32,
    /// The format version the disk was formatted with, if it was upgraded
    /// since (0: formatted with `version`).
    pub upgraded_from: u32,
    /// Allocation generations below this may have been handed out (version
    /// 2; 0 in version 1): the next open starts above it.
    pub generation_floor: u64,
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
    /// Encodes the superblock into one sealed 4 KiB block, at the current
    /// format version (whatever `version` says).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        b[..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, self.version);
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
        put_u64(&mut b, 128, l.epoch_mirror_offset);
        put_u64(&mut b, 136, l.extent_mirror_offset);
        put_u32(&mut b, 144, self.upgraded_from);
        put_u64(&mut b, 152, self.generation_floor);
        if let Some(t) = &l.thin {
            put_u64(&mut b, 160, t.log_offset);
            put_u64(&mut b, 168, t.log_mirror_offset);
            put_u64(&mut b, 176, t.log_pages);
            put_u64(&mut b, 184, t.checkpoint_offsets[0]);
            put_u64(&mut b, 192, t.checkpoint_offsets[1]);
            put_u64(&mut b, 200, t.checkpoint_pages);
            put_u64(&mut b, 208, t.blocks_total);
            put_u64(&mut b, 216, t.crc_journal_offset);
            put_u64(&mut b, 224, t.crc_journal_pages);
        }
        crate::codec::seal(&mut b);
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
        if !crate::codec::crc_ok(b) {
            return Err(SuperblockError::Checksum);
        }
        let version = get_u32(b, 8);
        if !(1..=FORMAT_VERSION).contains(&version) {
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
            // Version 1 has no mirrors; its bytes 128.. are reserved (zero).
            epoch_mirror_offset: if version >= 2 { get_u64(b, 128) } else { 0 },
            extent_mirror_offset: if version >= 2 { get_u64(b, 136) } else { 0 },
            thin: (version >= 3).then(|| ThinRegions {
                log_offset: get_u64(b, 160),
                log_mirror_offset: get_u64(b, 168),
                log_pages: get_u64(b, 176),
                checkpoint_offsets: [get_u64(b, 184), get_u64(b, 192)],
                checkpoint_pages: get_u64(b, 200),
                blocks_total: get_u64(b, 208),
                crc_journal_offset: get_u64(b, 216),
                crc_journal_pages: get_u64(b, 224),
            }),
        };
        layout.validate().map_err(SuperblockError::Geometry)?;
        Ok(Superblock {
            version,
            upgraded_from: if version >= 2 { get_u32(b, 144) } else { 0 },
            generation_floor: if version >= 2 { get_u64(b, 152) } else { 0 },
            disk_uuid: get_uuid(b, 16),
            flags,
            created: get_u64(b, 120),
            layout,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::seal;
    use crate::layout::DEFAULT_EPOCH_SLOTS;

    fn sample() -> Superblock {
        Superblock {
            version: crate::EXTENT_FORMAT_VERSION,
            upgraded_from: 0,
            generation_floor: 1 << 40,
            disk_uuid: Uuid::from_u128(42),
            flags: 0,
            created: 1_700_000_000,
            layout: Layout::compute(64 << 20, 1 << 20, DEFAULT_EPOCH_SLOTS).unwrap(),
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn thin_round_trip() {
        let layout = Layout::compute_thin(1 << 30, 1 << 20, DEFAULT_EPOCH_SLOTS).expect("a layout");
        let sb = Superblock {
            version: FORMAT_VERSION,
            layout,
            ..sample()
        };
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        // A version-2 superblock never carries v3 regions.
        let v2 = Superblock {
            version: crate::EXTENT_FORMAT_VERSION,
            ..sb
        };
        assert!(Superblock::decode(&v2.encode()).is_err());
    }

    #[test]
    fn rejections() {
        let good = sample().encode();
        assert_eq!(
            Superblock::decode(&good[..100]),
            Err(SuperblockError::WrongSize(100))
        );
        assert_eq!(
            Superblock::decode(&[0u8; 4096]),
            Err(SuperblockError::NoMagic)
        );
        let mut b = good.clone();
        b[200] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::Checksum));
        let mut b = good.clone();
        put_u32(&mut b, 8, FORMAT_VERSION + 1);
        seal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(SuperblockError::UnsupportedVersion(FORMAT_VERSION + 1))
        );
        let mut b = good.clone();
        put_u64(&mut b, 128, 0);
        seal(&mut b);
        assert!(matches!(
            Superblock::decode(&b),
            Err(SuperblockError::Geometry(_))
        ));
        let mut b = good.clone();
        put_u32(&mut b, 12, 1);
        seal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(SuperblockError::UnknownFlags(1))
        );
        let mut b = good;
        put_u64(&mut b, 112, u64::MAX);
        seal(&mut b);
        assert!(matches!(
            Superblock::decode(&b),
            Err(SuperblockError::Geometry(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut b in proptest::collection::vec(any::<u8>(), 4096), magic: bool, sealed: bool) {
            if magic {
                b[..8].copy_from_slice(&MAGIC);
            }
            if sealed {
                seal(&mut b);
            }
            let _ = Superblock::decode(&b);
        }

        #[test]
        fn encode_decode(uuid: u128, created: u64, mib in 3u64..1 << 24, es_blocks in 1u32..=512) {
            let Ok(layout) = Layout::compute(mib << 20, es_blocks * BLOCK_SIZE, DEFAULT_EPOCH_SLOTS) else {
                return Ok(());
            };
            let sb = Superblock { version: crate::EXTENT_FORMAT_VERSION, upgraded_from: 0, generation_floor: created / 3, disk_uuid: Uuid::from_u128(uuid), flags: 0, created, layout };
            prop_assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
        }
    }
}
