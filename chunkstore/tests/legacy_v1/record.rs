//! 64-byte table entries: extent records and epoch slots.
//!
//! Layouts: see the crate documentation. Each entry names its own index, so a
//! write that landed at the wrong place is detected rather than believed.

use uuid::Uuid;

use crate::legacy_v1::codec::{
    crc_ok, get_u16, get_u32, get_u64, get_uuid, put_u16, put_u32, put_u64,
};
use crate::legacy_v1::codec::{put_uuid, seal};

/// Size of one extent record or epoch slot.
pub(crate) const ENTRY_SIZE: usize = 64;
/// Magic of an extent record.
pub(crate) const EXTENT_MAGIC: u32 = u32::from_le_bytes(*b"TSXT");
/// Magic of an epoch slot.
pub(crate) const EPOCH_MAGIC: u32 = u32::from_le_bytes(*b"TSEP");
/// Layout version of both entry kinds.
pub(crate) const ENTRY_VERSION: u16 = 1;

const FLAG_FREE: u16 = 0;
const FLAG_USED: u16 = 1;

/// Why a table entry was rejected (the entry is then quarantined).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The buffer is not 64 bytes.
    #[error("the entry buffer is {0} bytes instead of 64")]
    WrongSize(usize),
    /// The magic is not the one of this table.
    #[error("the entry magic {0:#010x} is wrong")]
    BadMagic(u32),
    /// The crc32c does not match the content.
    #[error("the entry checksum does not match its content")]
    Checksum,
    /// Written by a layout version this build does not read.
    #[error("entry version {0} is not supported")]
    UnsupportedVersion(u16),
    /// The flags are neither free nor used.
    #[error("entry flags {0:#x} are invalid")]
    BadFlags(u16),
    /// The entry names another index than where it was found.
    #[error("the entry belongs at index {found}, not {expected}")]
    Misplaced {
        /// Index recorded in the entry.
        found: u64,
        /// Index where it was read.
        expected: u64,
    },
}

/// Checks the parts common to both entry kinds; returns the flags.
fn check_header(b: &[u8], magic: u32) -> Result<u16, RecordError> {
    if b.len() != ENTRY_SIZE {
        return Err(RecordError::WrongSize(b.len()));
    }
    let found = get_u32(b, 0);
    if found != magic {
        return Err(RecordError::BadMagic(found));
    }
    if !crc_ok(b) {
        return Err(RecordError::Checksum);
    }
    let version = get_u16(b, 4);
    if version != ENTRY_VERSION {
        return Err(RecordError::UnsupportedVersion(version));
    }
    match get_u16(b, 6) {
        f @ (FLAG_FREE | FLAG_USED) => Ok(f),
        f => Err(RecordError::BadFlags(f)),
    }
}

fn header(magic: u32, used: bool) -> [u8; ENTRY_SIZE] {
    let mut b = [0u8; ENTRY_SIZE];
    put_u32(&mut b, 0, magic);
    put_u16(&mut b, 4, ENTRY_VERSION);
    put_u16(&mut b, 6, if used { FLAG_USED } else { FLAG_FREE });
    b
}

/// The state of one extent as recorded in the extent table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExtentRecord {
    /// Free; remembers the highest generation handed out when it was freed.
    Free {
        /// Allocation counter high-water mark.
        generation: u64,
    },
    /// Holds a chunk.
    Used {
        /// Owning vDisk.
        vdisk: Uuid,
        /// Chunk index within the vDisk.
        chunk: u64,
        /// Allocation generation.
        generation: u64,
    },
}

impl ExtentRecord {
    /// Encodes the record of extent `extent`.
    pub(crate) fn encode(&self, extent: u64) -> [u8; ENTRY_SIZE] {
        let (used, vdisk, chunk, generation) = match *self {
            ExtentRecord::Free { generation } => (false, Uuid::nil(), 0, generation),
            ExtentRecord::Used {
                vdisk,
                chunk,
                generation,
            } => (true, vdisk, chunk, generation),
        };
        let mut b = header(EXTENT_MAGIC, used);
        put_uuid(&mut b, 8, &vdisk);
        put_u64(&mut b, 24, chunk);
        put_u64(&mut b, 32, generation);
        put_u64(&mut b, 40, extent);
        seal(&mut b);
        b
    }

    /// Decodes the record found at index `extent`. Never panics.
    pub(crate) fn decode(b: &[u8], extent: u64) -> Result<Self, RecordError> {
        let flags = check_header(b, EXTENT_MAGIC)?;
        let found = get_u64(b, 40);
        if found != extent {
            return Err(RecordError::Misplaced {
                found,
                expected: extent,
            });
        }
        let generation = get_u64(b, 32);
        Ok(if flags == FLAG_USED {
            ExtentRecord::Used {
                vdisk: get_uuid(b, 8),
                chunk: get_u64(b, 24),
                generation,
            }
        } else {
            ExtentRecord::Free { generation }
        })
    }
}

/// The state of one epoch slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EpochSlot {
    /// Unused.
    Free,
    /// Holds a vDisk's fencing epoch.
    Used {
        /// The vDisk.
        vdisk: Uuid,
        /// Its epoch.
        epoch: u64,
    },
}

impl EpochSlot {
    /// Encodes slot number `slot`.
    pub(crate) fn encode(&self, slot: u32) -> [u8; ENTRY_SIZE] {
        let (used, vdisk, epoch) = match *self {
            EpochSlot::Free => (false, Uuid::nil(), 0),
            EpochSlot::Used { vdisk, epoch } => (true, vdisk, epoch),
        };
        let mut b = header(EPOCH_MAGIC, used);
        put_uuid(&mut b, 8, &vdisk);
        put_u64(&mut b, 24, epoch);
        put_u32(&mut b, 32, slot);
        seal(&mut b);
        b
    }

    /// Decodes the slot found at index `slot`. Never panics.
    pub(crate) fn decode(b: &[u8], slot: u32) -> Result<Self, RecordError> {
        let flags = check_header(b, EPOCH_MAGIC)?;
        let found = get_u32(b, 32);
        if found != slot {
            return Err(RecordError::Misplaced {
                found: found.into(),
                expected: slot.into(),
            });
        }
        Ok(if flags == FLAG_USED {
            EpochSlot::Used {
                vdisk: get_uuid(b, 8),
                epoch: get_u64(b, 24),
            }
        } else {
            EpochSlot::Free
        })
    }
}
