//! 64-byte table entries: extent records, epoch slots and extent stamps.
//!
//! Layouts: see the crate documentation. Each entry names its own index (and,
//! from version 2, which table copy it belongs to), so a write that landed at
//! the wrong place is detected rather than believed.

use uuid::Uuid;

use crate::codec::{crc_ok, get_u16, get_u32, get_u64, get_uuid, put_u16, put_u32, put_u64};
use crate::codec::{put_uuid, seal};

/// Size of one extent record, epoch slot or stamp.
pub(crate) const ENTRY_SIZE: usize = 64;
/// Magic of an extent record.
pub(crate) const EXTENT_MAGIC: u32 = u32::from_le_bytes(*b"TSXT");
/// Magic of an epoch slot.
pub(crate) const EPOCH_MAGIC: u32 = u32::from_le_bytes(*b"TSEP");
/// Magic of an extent's ownership stamp.
pub(crate) const STAMP_MAGIC: u32 = u32::from_le_bytes(*b"TSST");
/// Layout version written for records and slots; versions 1 and 2 are read.
pub(crate) const ENTRY_VERSION: u16 = 2;
/// Layout version of stamps.
const STAMP_VERSION: u16 = 1;

const FLAG_FREE: u16 = 0;
const FLAG_USED: u16 = 1;
/// Epoch slots (version 2): the slot's content was lost.
const FLAG_LOST: u16 = 2;

/// Offset of the table-copy byte (version 2 records and slots).
const COPY_OFFSET: usize = 48;
/// Offset of the copy byte in an epoch slot (version 2).
const SLOT_COPY_OFFSET: usize = 36;

/// Why a table entry was rejected (the entry is then damaged).
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
    /// The flags are not valid for this kind of entry.
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
    /// The entry belongs to the other copy of its table.
    #[error("the entry belongs to table copy {found}, not {expected}")]
    WrongCopy {
        /// Copy recorded in the entry.
        found: u8,
        /// Copy where it was read.
        expected: u8,
    },
}

/// Checks the parts common to every entry kind; returns (version, flags).
fn check_header(
    b: &[u8],
    magic: u32,
    versions: std::ops::RangeInclusive<u16>,
) -> Result<(u16, u16), RecordError> {
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
    if !versions.contains(&version) {
        return Err(RecordError::UnsupportedVersion(version));
    }
    Ok((version, get_u16(b, 6)))
}

fn header(magic: u32, version: u16, flags: u16) -> [u8; ENTRY_SIZE] {
    let mut b = [0u8; ENTRY_SIZE];
    put_u32(&mut b, 0, magic);
    put_u16(&mut b, 4, version);
    put_u16(&mut b, 6, flags);
    b
}

fn check_copy(b: &[u8], at: usize, copy: u8) -> Result<(), RecordError> {
    match b[at] {
        c if c == copy => Ok(()),
        found => Err(RecordError::WrongCopy {
            found,
            expected: copy,
        }),
    }
}

/// The tag mixed into the stored crc32c of every block of an extent
/// allocated to `(vdisk, chunk)` at `generation` (see the crate
/// documentation): never 0, the tag of version-1 extents.
pub(crate) fn owner_tag(vdisk: Uuid, chunk: u64, generation: u64) -> u32 {
    let mut b = [0u8; 32];
    put_uuid(&mut b, 0, &vdisk);
    put_u64(&mut b, 16, chunk);
    put_u64(&mut b, 24, generation);
    match tessera_crc::crc32c(&b) {
        0 => 1,
        t => t,
    }
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
        /// Whether the extent's block crcs carry the owner tag (allocated by
        /// version 2; version-1 records have plain crcs).
        tagged: bool,
    },
}

impl ExtentRecord {
    /// The generation the record carries.
    pub(crate) fn generation(&self) -> u64 {
        match *self {
            ExtentRecord::Free { generation } | ExtentRecord::Used { generation, .. } => generation,
        }
    }

    /// The tag of the extent's block crcs (0: plain crcs).
    pub(crate) fn tag(&self) -> u32 {
        match *self {
            ExtentRecord::Used {
                vdisk,
                chunk,
                generation,
                tagged: true,
            } => owner_tag(vdisk, chunk, generation),
            _ => 0,
        }
    }

    /// Of two differing, valid copies of one record (possible only while the
    /// last change of the record is not durable), the newer: the higher
    /// generation; at equal generations, a free record (a free keeps the
    /// generation of the allocation it undoes, or a higher one).
    pub(crate) fn newer(a: Self, b: Self) -> Self {
        match a.generation().cmp(&b.generation()) {
            std::cmp::Ordering::Greater => a,
            std::cmp::Ordering::Less => b,
            std::cmp::Ordering::Equal => match a {
                ExtentRecord::Free { .. } => a,
                ExtentRecord::Used { .. } => b,
            },
        }
    }

    /// Encodes the record of extent `extent` for table copy `copy`. A used
    /// record with plain crcs keeps version 1 (its meaning), all others are
    /// version 2.
    pub(crate) fn encode(&self, extent: u64, copy: u8) -> [u8; ENTRY_SIZE] {
        let (flags, vdisk, chunk, generation, version) = match *self {
            ExtentRecord::Free { generation } => (FLAG_FREE, Uuid::nil(), 0, generation, 2),
            ExtentRecord::Used {
                vdisk,
                chunk,
                generation,
                tagged,
            } => (
                FLAG_USED,
                vdisk,
                chunk,
                generation,
                if tagged { 2 } else { 1 },
            ),
        };
        let mut b = header(EXTENT_MAGIC, version, flags);
        put_uuid(&mut b, 8, &vdisk);
        put_u64(&mut b, 24, chunk);
        put_u64(&mut b, 32, generation);
        put_u64(&mut b, 40, extent);
        if version >= 2 {
            b[COPY_OFFSET] = copy;
        }
        seal(&mut b);
        b
    }

    /// Decodes the record found at index `extent` of table copy `copy`.
    /// Never panics.
    pub(crate) fn decode(b: &[u8], extent: u64, copy: u8) -> Result<Self, RecordError> {
        let (version, flags) = check_header(b, EXTENT_MAGIC, 1..=ENTRY_VERSION)?;
        if flags != FLAG_FREE && flags != FLAG_USED {
            return Err(RecordError::BadFlags(flags));
        }
        let found = get_u64(b, 40);
        if found != extent {
            return Err(RecordError::Misplaced {
                found,
                expected: extent,
            });
        }
        if version >= 2 {
            check_copy(b, COPY_OFFSET, copy)?;
        }
        let generation = get_u64(b, 32);
        Ok(if flags == FLAG_USED {
            ExtentRecord::Used {
                vdisk: get_uuid(b, 8),
                chunk: get_u64(b, 24),
                generation,
                tagged: version >= 2,
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
        /// The disk's loss serial when the epoch was written (0 in
        /// version-1 slots): the epoch is trusted only if no slot was lost
        /// since, i.e. if this is at least the highest loss serial.
        trust: u64,
        /// The boot of the node's machine when the epoch was written (a tag
        /// of its boot identity; 0: not known, as in slots written before
        /// the field existed). See [`crate::Disk::fence_report`].
        boot: u64,
    },
    /// The slot's content was lost (both copies damaged); it stays out of use.
    Lost {
        /// The loss serial given to that loss.
        serial: u64,
    },
}

impl EpochSlot {
    /// Encodes slot number `slot` for table copy `copy` (version 2).
    pub(crate) fn encode(&self, slot: u32, copy: u8) -> [u8; ENTRY_SIZE] {
        let (flags, vdisk, epoch, trust, boot) = match *self {
            EpochSlot::Free => (FLAG_FREE, Uuid::nil(), 0, 0, 0),
            EpochSlot::Used {
                vdisk,
                epoch,
                trust,
                boot,
            } => (FLAG_USED, vdisk, epoch, trust, boot),
            EpochSlot::Lost { serial } => (FLAG_LOST, Uuid::nil(), serial, 0, 0),
        };
        let mut b = header(EPOCH_MAGIC, ENTRY_VERSION, flags);
        put_uuid(&mut b, 8, &vdisk);
        put_u64(&mut b, 24, epoch);
        put_u32(&mut b, 32, slot);
        b[SLOT_COPY_OFFSET] = copy;
        put_u64(&mut b, 40, trust);
        put_u64(&mut b, 48, boot);
        seal(&mut b);
        b
    }

    /// Decodes the slot found at index `slot` of table copy `copy`. Never
    /// panics.
    pub(crate) fn decode(b: &[u8], slot: u32, copy: u8) -> Result<Self, RecordError> {
        let (version, flags) = check_header(b, EPOCH_MAGIC, 1..=ENTRY_VERSION)?;
        let lost_ok = version >= 2;
        if !(flags == FLAG_FREE || flags == FLAG_USED || (lost_ok && flags == FLAG_LOST)) {
            return Err(RecordError::BadFlags(flags));
        }
        let found = get_u32(b, 32);
        if found != slot {
            return Err(RecordError::Misplaced {
                found: found.into(),
                expected: slot.into(),
            });
        }
        if version >= 2 {
            check_copy(b, SLOT_COPY_OFFSET, copy)?;
        }
        Ok(match flags {
            FLAG_USED => EpochSlot::Used {
                vdisk: get_uuid(b, 8),
                epoch: get_u64(b, 24),
                trust: if version >= 2 { get_u64(b, 40) } else { 0 },
                boot: if version >= 2 { get_u64(b, 48) } else { 0 },
            },
            FLAG_LOST => EpochSlot::Lost {
                serial: get_u64(b, 24),
            },
            _ => EpochSlot::Free,
        })
    }
}

/// An extent's ownership stamp: who allocated it last. Written with the
/// extent's crcs at allocation (mirrored layouts); never changed by a free,
/// so it names the last owner, not the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The vDisk.
    pub vdisk: Uuid,
    /// The chunk index.
    pub chunk: u64,
    /// The allocation generation.
    pub generation: u64,
}

impl Stamp {
    /// Encodes the stamp of extent `extent`.
    pub(crate) fn encode(&self, extent: u64) -> [u8; ENTRY_SIZE] {
        let mut b = header(STAMP_MAGIC, STAMP_VERSION, 0);
        put_uuid(&mut b, 8, &self.vdisk);
        put_u64(&mut b, 24, self.chunk);
        put_u64(&mut b, 32, self.generation);
        put_u64(&mut b, 40, extent);
        seal(&mut b);
        b
    }

    /// Decodes the stamp found in front of extent `extent`'s crcs.
    pub(crate) fn decode(b: &[u8], extent: u64) -> Result<Self, RecordError> {
        let (_, flags) = check_header(b, STAMP_MAGIC, STAMP_VERSION..=STAMP_VERSION)?;
        if flags != 0 {
            return Err(RecordError::BadFlags(flags));
        }
        let found = get_u64(b, 40);
        if found != extent {
            return Err(RecordError::Misplaced {
                found,
                expected: extent,
            });
        }
        Ok(Stamp {
            vdisk: get_uuid(b, 8),
            chunk: get_u64(b, 24),
            generation: get_u64(b, 32),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn extent_round_trip_and_rejections() {
        let rec = ExtentRecord::Used {
            vdisk: Uuid::from_u128(7),
            chunk: 99,
            generation: 12,
            tagged: true,
        };
        let b = rec.encode(5, 1);
        assert_eq!(ExtentRecord::decode(&b, 5, 1), Ok(rec));
        assert_eq!(
            ExtentRecord::decode(&b, 6, 1),
            Err(RecordError::Misplaced {
                found: 5,
                expected: 6
            })
        );
        assert_eq!(
            ExtentRecord::decode(&b, 5, 0),
            Err(RecordError::WrongCopy {
                found: 1,
                expected: 0
            })
        );
        let mut bad = b;
        bad[30] ^= 0x80;
        assert_eq!(ExtentRecord::decode(&bad, 5, 1), Err(RecordError::Checksum));
        assert_eq!(
            ExtentRecord::decode(&[0u8; 64], 0, 0),
            Err(RecordError::BadMagic(0))
        );
        assert_eq!(
            EpochSlot::decode(&b, 5, 1),
            Err(RecordError::BadMagic(EXTENT_MAGIC))
        );
        let mut flags = b;
        put_u16(&mut flags, 6, 3);
        seal(&mut flags);
        assert_eq!(
            ExtentRecord::decode(&flags, 5, 1),
            Err(RecordError::BadFlags(3))
        );
        let mut version = b;
        put_u16(&mut version, 4, 3);
        seal(&mut version);
        assert_eq!(
            ExtentRecord::decode(&version, 5, 1),
            Err(RecordError::UnsupportedVersion(3))
        );
        assert_eq!(
            ExtentRecord::decode(&b[..63], 5, 1),
            Err(RecordError::WrongSize(63))
        );
    }

    /// A version-1 record exactly as version 1 wrote it.
    fn version_1_record(
        used: bool,
        vdisk: Uuid,
        chunk: u64,
        generation: u64,
        extent: u64,
    ) -> [u8; 64] {
        let mut b = header(EXTENT_MAGIC, 1, u16::from(used));
        put_uuid(&mut b, 8, &vdisk);
        put_u64(&mut b, 24, chunk);
        put_u64(&mut b, 32, generation);
        put_u64(&mut b, 40, extent);
        seal(&mut b);
        b
    }

    #[test]
    fn version_1_records_read_as_untagged_and_keep_their_version() {
        let v = Uuid::from_u128(3);
        let b = version_1_record(true, v, 4, 5, 6);
        // Either table copy: version 1 has no copy byte.
        for copy in [0, 1] {
            assert_eq!(
                ExtentRecord::decode(&b, 6, copy),
                Ok(ExtentRecord::Used {
                    vdisk: v,
                    chunk: 4,
                    generation: 5,
                    tagged: false
                })
            );
        }
        let rec = ExtentRecord::decode(&b, 6, 0).unwrap();
        assert_eq!(rec.tag(), 0);
        assert_eq!(rec.encode(6, 0), b);
        assert_eq!(
            ExtentRecord::decode(&version_1_record(false, Uuid::nil(), 0, 9, 6), 6, 0),
            Ok(ExtentRecord::Free { generation: 9 })
        );
    }

    #[test]
    fn newer_copy() {
        let used = |generation| ExtentRecord::Used {
            vdisk: Uuid::from_u128(1),
            chunk: 0,
            generation,
            tagged: true,
        };
        let free = |generation| ExtentRecord::Free { generation };
        assert_eq!(ExtentRecord::newer(used(5), free(4)), used(5));
        assert_eq!(ExtentRecord::newer(free(4), used(5)), used(5));
        assert_eq!(ExtentRecord::newer(used(5), free(5)), free(5));
        assert_eq!(ExtentRecord::newer(free(5), used(5)), free(5));
        assert_eq!(ExtentRecord::newer(used(7), used(6)), used(7));
    }

    #[test]
    fn tags_differ_by_owner_and_generation() {
        let v = Uuid::from_u128(9);
        let t = owner_tag(v, 1, 1);
        assert_ne!(t, 0);
        assert_ne!(t, owner_tag(v, 2, 1));
        assert_ne!(t, owner_tag(v, 1, 2));
        assert_ne!(t, owner_tag(Uuid::from_u128(10), 1, 1));
    }

    #[test]
    fn slot_round_trip() {
        let s = EpochSlot::Used {
            vdisk: Uuid::from_u128(9),
            epoch: 77,
            trust: 3,
            boot: 0x5eed,
        };
        assert_eq!(EpochSlot::decode(&s.encode(3, 0), 3, 0), Ok(s));
        assert_eq!(
            EpochSlot::decode(&EpochSlot::Free.encode(4, 1), 4, 1),
            Ok(EpochSlot::Free)
        );
        let lost = EpochSlot::Lost { serial: 2 };
        assert_eq!(EpochSlot::decode(&lost.encode(4, 1), 4, 1), Ok(lost));
        assert!(matches!(
            EpochSlot::decode(&lost.encode(4, 1), 4, 0),
            Err(RecordError::WrongCopy { .. })
        ));
        // Version 1 slots: no trust (0), no lost flag.
        let mut b = header(EPOCH_MAGIC, 1, FLAG_USED);
        put_uuid(&mut b, 8, &Uuid::from_u128(9));
        put_u64(&mut b, 24, 77);
        put_u32(&mut b, 32, 3);
        seal(&mut b);
        assert_eq!(
            EpochSlot::decode(&b, 3, 1),
            Ok(EpochSlot::Used {
                vdisk: Uuid::from_u128(9),
                epoch: 77,
                trust: 0,
                boot: 0,
            })
        );
        put_u16(&mut b, 6, FLAG_LOST);
        seal(&mut b);
        assert_eq!(EpochSlot::decode(&b, 3, 1), Err(RecordError::BadFlags(2)));
    }

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            vdisk: Uuid::from_u128(5),
            chunk: 6,
            generation: 7,
        };
        assert_eq!(Stamp::decode(&s.encode(8), 8), Ok(s));
        assert!(Stamp::decode(&s.encode(8), 9).is_err());
        assert!(Stamp::decode(&[0u8; 64], 8).is_err());
    }

    fn extent_record() -> impl Strategy<Value = ExtentRecord> {
        prop_oneof![
            any::<u64>().prop_map(|generation| ExtentRecord::Free { generation }),
            (any::<u128>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                |(v, chunk, generation, tagged)| {
                    ExtentRecord::Used {
                        vdisk: Uuid::from_u128(v),
                        chunk,
                        generation,
                        tagged,
                    }
                }
            ),
        ]
    }

    fn epoch_slot() -> impl Strategy<Value = EpochSlot> {
        prop_oneof![
            Just(EpochSlot::Free),
            (any::<u128>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(v, epoch, trust, boot)| EpochSlot::Used {
                    vdisk: Uuid::from_u128(v),
                    epoch,
                    trust,
                    boot,
                }
            ),
            any::<u64>().prop_map(|serial| EpochSlot::Lost { serial }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80), idx: u32, copy: u8, sealed: bool) {
            let mut b = b;
            if sealed && b.len() == ENTRY_SIZE {
                seal(&mut b);
            }
            let _ = ExtentRecord::decode(&b, idx.into(), copy);
            let _ = EpochSlot::decode(&b, idx, copy);
            let _ = Stamp::decode(&b, idx.into());
        }

        #[test]
        fn extent_encode_decode(rec in extent_record(), idx: u64, copy in 0u8..2) {
            prop_assert_eq!(ExtentRecord::decode(&rec.encode(idx, copy), idx, copy), Ok(rec));
        }

        #[test]
        fn slot_encode_decode(slot in epoch_slot(), idx: u32, copy in 0u8..2) {
            prop_assert_eq!(EpochSlot::decode(&slot.encode(idx, copy), idx, copy), Ok(slot));
        }

        #[test]
        fn any_flipped_bit_is_detected(rec in extent_record(), slot in epoch_slot(), idx: u32, copy in 0u8..2, bit in 0usize..512) {
            let mut b = rec.encode(idx.into(), copy);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(ExtentRecord::decode(&b, idx.into(), copy).is_err());
            let mut b = slot.encode(idx, copy);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(EpochSlot::decode(&b, idx, copy).is_err());
        }
    }
}
