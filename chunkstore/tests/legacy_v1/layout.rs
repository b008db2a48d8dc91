//! Disk geometry: where the tables and the data region lie.

use crate::legacy_v1::BLOCK_SIZE;

/// Size of the area holding the two superblock copies (and room to grow).
pub(crate) const EPOCH_TABLE_OFFSET: u64 = 64 << 10;
/// Number of epoch slots written by `format`.
pub(crate) const DEFAULT_EPOCH_SLOTS: u32 = 16384;
/// Size of one epoch slot and of one extent record.
pub(crate) const RECORD_SIZE: u64 = 64;
/// Smallest and largest accepted extent size.
pub(crate) const MIN_EXTENT_SIZE: u32 = BLOCK_SIZE;
/// Largest accepted extent size (1 GiB).
pub(crate) const MAX_EXTENT_SIZE: u32 = 1 << 30;
/// The data region is aligned to at least this much.
const DATA_ALIGN: u64 = 1 << 20;
/// Metadata regions are aligned to this much.
const META_ALIGN: u64 = BLOCK_SIZE as u64;

/// Why a geometry is impossible or inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The extent size is not a multiple of 4096 within bounds.
    #[error("extent size {0} is not a multiple of 4096 between 4 KiB and 1 GiB")]
    InvalidExtentSize(u32),
    /// Not even one extent fits.
    #[error("the device cannot hold the metadata and one extent")]
    TooSmall,
    /// A recorded geometry violates a rule of the format.
    #[error("the recorded geometry is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// Where everything lies on one formatted device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Device size in bytes when formatted.
    pub device_size: u64,
    /// Bytes per extent (= chunk size).
    pub extent_size: u32,
    /// Number of epoch slots.
    pub epoch_slots: u32,
    /// Byte offset of the epoch table.
    pub epoch_table_offset: u64,
    /// Byte length of the epoch table.
    pub epoch_table_len: u64,
    /// Byte offset of the extent table.
    pub extent_table_offset: u64,
    /// Byte length of the extent table.
    pub extent_table_len: u64,
    /// Byte offset of the crc table.
    pub crc_table_offset: u64,
    /// Byte length of the crc table.
    pub crc_table_len: u64,
    /// Byte offset of extent 0's data.
    pub data_offset: u64,
    /// Number of extents.
    pub extents_total: u64,
}

fn round_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x / align * align)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Checks that an extent size is acceptable.
pub(crate) fn check_extent_size(extent_size: u32) -> Result<(), LayoutError> {
    if extent_size % BLOCK_SIZE != 0 || !(MIN_EXTENT_SIZE..=MAX_EXTENT_SIZE).contains(&extent_size)
    {
        return Err(LayoutError::InvalidExtentSize(extent_size));
    }
    Ok(())
}

impl Layout {
    /// The layout with `n` extents, or `None` if it does not fit.
    fn with_extents(device_size: u64, extent_size: u32, epoch_slots: u32, n: u64) -> Option<Self> {
        let es = u64::from(extent_size);
        let bpe = es / u64::from(BLOCK_SIZE);
        let epoch_table_len = u64::from(epoch_slots) * RECORD_SIZE;
        let extent_table_offset = round_up(EPOCH_TABLE_OFFSET + epoch_table_len, META_ALIGN)?;
        let extent_table_len = round_up(n.checked_mul(RECORD_SIZE)?, META_ALIGN)?;
        let crc_table_offset = extent_table_offset.checked_add(extent_table_len)?;
        let crc_table_len = round_up(n.checked_mul(bpe)?.checked_mul(4)?, META_ALIGN)?;
        let align = es / gcd(es, DATA_ALIGN) * DATA_ALIGN;
        let data_offset = round_up(crc_table_offset.checked_add(crc_table_len)?, align)?;
        let end = data_offset.checked_add(n.checked_mul(es)?)?;
        (end <= device_size).then_some(Layout {
            device_size,
            extent_size,
            epoch_slots,
            epoch_table_offset: EPOCH_TABLE_OFFSET,
            epoch_table_len,
            extent_table_offset,
            extent_table_len,
            crc_table_offset,
            crc_table_len,
            data_offset,
            extents_total: n,
        })
    }

    /// The layout with the most extents that fit in `device_size` bytes.
    pub(crate) fn compute(
        device_size: u64,
        extent_size: u32,
        epoch_slots: u32,
    ) -> Result<Self, LayoutError> {
        check_extent_size(extent_size)?;
        let fits = |n| Self::with_extents(device_size, extent_size, epoch_slots, n);
        // `fits` is monotone in n: binary search the largest n that fits.
        fits(1).ok_or(LayoutError::TooSmall)?;
        let (mut lo, mut hi) = (1u64, device_size / u64::from(extent_size));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid).is_some() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        fits(lo).ok_or(LayoutError::TooSmall)
    }

    /// Checks a recorded layout against the rules of the format.
    pub(crate) fn validate(&self) -> Result<(), LayoutError> {
        use LayoutError::Inconsistent as Bad;
        check_extent_size(self.extent_size)?;
        let es = u64::from(self.extent_size);
        let n = self.extents_total;
        if self.epoch_slots == 0
            || self.epoch_table_len != u64::from(self.epoch_slots) * RECORD_SIZE
        {
            return Err(Bad("epoch table length does not match its slot count"));
        }
        if self.epoch_table_offset < 2 * u64::from(BLOCK_SIZE) {
            return Err(Bad("epoch table overlaps the superblocks"));
        }
        let offsets = [
            self.epoch_table_offset,
            self.extent_table_offset,
            self.crc_table_offset,
        ];
        if offsets.iter().any(|o| o % META_ALIGN != 0) {
            return Err(Bad("a table is not 4 KiB aligned"));
        }
        if n == 0 {
            return Err(Bad("no extents"));
        }
        let need_records = n.checked_mul(RECORD_SIZE);
        if need_records.is_none_or(|need| self.extent_table_len < need) {
            return Err(Bad("extent table too short"));
        }
        let need_crcs = n
            .checked_mul(es / u64::from(BLOCK_SIZE))
            .and_then(|b| b.checked_mul(4));
        if need_crcs.is_none_or(|need| self.crc_table_len < need) {
            return Err(Bad("crc table too short"));
        }
        let ends = [
            (
                self.epoch_table_offset,
                self.epoch_table_len,
                self.extent_table_offset,
            ),
            (
                self.extent_table_offset,
                self.extent_table_len,
                self.crc_table_offset,
            ),
            (self.crc_table_offset, self.crc_table_len, self.data_offset),
        ];
        for (off, len, next) in ends {
            if off.checked_add(len).is_none_or(|end| end > next) {
                return Err(Bad("regions overlap or are out of order"));
            }
        }
        if self.data_offset % es != 0 {
            return Err(Bad("data region not aligned to the extent size"));
        }
        let end = n
            .checked_mul(es)
            .and_then(|d| d.checked_add(self.data_offset));
        if end.is_none_or(|end| end > self.device_size) {
            return Err(Bad("data region exceeds the device"));
        }
        Ok(())
    }

    /// 4 KiB blocks per extent.
    pub(crate) fn blocks_per_extent(&self) -> u32 {
        self.extent_size / BLOCK_SIZE
    }

    /// Byte offset of extent `e`'s data.
    pub(crate) fn extent_data_offset(&self, e: u64) -> u64 {
        self.data_offset + e * u64::from(self.extent_size)
    }

    /// Byte offset of extent `e`'s record.
    pub(crate) fn extent_record_offset(&self, e: u64) -> u64 {
        self.extent_table_offset + e * RECORD_SIZE
    }

    /// Byte offset of epoch slot `s`.
    pub(crate) fn epoch_slot_offset(&self, s: u32) -> u64 {
        self.epoch_table_offset + u64::from(s) * RECORD_SIZE
    }

    /// Byte offset of the crc of block `block` of extent `e`.
    pub(crate) fn crc_offset(&self, e: u64, block: u32) -> u64 {
        self.crc_table_offset + (e * u64::from(self.blocks_per_extent()) + u64::from(block)) * 4
    }
}
