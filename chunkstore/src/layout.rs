//! Disk geometry: where the tables and the data region lie.

use crate::BLOCK_SIZE;

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
///
/// A disk formatted at version 2 has *mirrored* tables: a second copy of the
/// epoch table and of the extent table, and a 64-byte ownership *stamp* in
/// front of each extent's crcs. A disk upgraded from version 1 keeps the
/// version-1 geometry: one copy of each table and no stamps (both mirror
/// offsets are 0).
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
    /// Byte length of the epoch table (and of its mirror).
    pub epoch_table_len: u64,
    /// Byte offset of the epoch table's mirror; 0: none.
    pub epoch_mirror_offset: u64,
    /// Byte offset of the extent table.
    pub extent_table_offset: u64,
    /// Byte length of the extent table (and of its mirror).
    pub extent_table_len: u64,
    /// Byte offset of the extent table's mirror; 0: none.
    pub extent_mirror_offset: u64,
    /// Byte offset of the crc table.
    pub crc_table_offset: u64,
    /// Byte length of the crc table.
    pub crc_table_len: u64,
    /// Byte offset of extent 0's data.
    pub data_offset: u64,
    /// Number of extents (format v3: chunks of data blocks, rounded down;
    /// for information only).
    pub extents_total: u64,
    /// Format v3 (allocation at 4 KiB): the metadata log and checkpoint
    /// areas; no extent table (both its offsets are 0).
    pub thin: Option<ThinRegions>,
}

/// Format v3's own regions: the metadata log in two copies, the two
/// checkpoint areas, and the number of 4 KiB data blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThinRegions {
    /// Byte offset of the log ring.
    pub log_offset: u64,
    /// Byte offset of the log ring's second copy.
    pub log_mirror_offset: u64,
    /// Pages (4 KiB) in each copy of the ring.
    pub log_pages: u64,
    /// Byte offsets of the two checkpoint areas.
    pub checkpoint_offsets: [u64; 2],
    /// Pages (4 KiB) in each checkpoint area.
    pub checkpoint_pages: u64,
    /// Byte offset of the crc journal ([`crate::crcjournal`]).
    pub crc_journal_offset: u64,
    /// Pages (4 KiB) of the crc journal: two headers, then the ring.
    pub crc_journal_pages: u64,
    /// 4 KiB blocks in the data region.
    pub blocks_total: u64,
}

impl ThinRegions {
    /// Byte offsets of the log ring's two copies.
    pub(crate) fn logs(&self) -> [u64; 2] {
        [self.log_offset, self.log_mirror_offset]
    }
}

/// Log pages per copy for `blocks` data blocks: a page per 4 MiB of data,
/// at least 64 pages and at most 256 MiB.
pub(crate) fn thin_log_pages(blocks: u64) -> u64 {
    (blocks / 1024).clamp(64, 65536)
}

/// Size of an extent's ownership stamp in the crc table (mirrored layouts).
pub(crate) const STAMP_SIZE: u64 = 64;

/// Bytes of crc table per extent: the stamp (mirrored layouts) and one u32
/// per block, rounded up so that every stamp is 64-byte aligned.
fn crc_run(extent_size: u32, mirrored: bool) -> u64 {
    let crcs = u64::from(extent_size / BLOCK_SIZE) * 4;
    if mirrored {
        STAMP_SIZE + crcs.div_ceil(STAMP_SIZE) * STAMP_SIZE
    } else {
        crcs
    }
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

/// The layout for the largest count in `min..=max` that fits (`fits` is
/// monotone in the count: a binary search), or `TooSmall` if `min` does not.
fn largest_fitting(
    min: u64,
    max: u64,
    fits: impl Fn(u64) -> Option<Layout>,
) -> Result<Layout, LayoutError> {
    fits(min).ok_or(LayoutError::TooSmall)?;
    let (mut lo, mut hi) = (min, max.max(min));
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

/// Checks that an extent size is acceptable.
pub(crate) fn check_extent_size(extent_size: u32) -> Result<(), LayoutError> {
    if extent_size % BLOCK_SIZE != 0 || !(MIN_EXTENT_SIZE..=MAX_EXTENT_SIZE).contains(&extent_size)
    {
        return Err(LayoutError::InvalidExtentSize(extent_size));
    }
    Ok(())
}

impl Layout {
    /// The mirrored layout with `n` extents, or `None` if it does not fit.
    fn with_extents(device_size: u64, extent_size: u32, epoch_slots: u32, n: u64) -> Option<Self> {
        let es = u64::from(extent_size);
        let epoch_table_len = u64::from(epoch_slots) * RECORD_SIZE;
        let epoch_mirror_offset = round_up(EPOCH_TABLE_OFFSET + epoch_table_len, META_ALIGN)?;
        let extent_table_offset = round_up(epoch_mirror_offset + epoch_table_len, META_ALIGN)?;
        let extent_table_len = round_up(n.checked_mul(RECORD_SIZE)?, META_ALIGN)?;
        let extent_mirror_offset = extent_table_offset.checked_add(extent_table_len)?;
        let crc_table_offset = extent_mirror_offset.checked_add(extent_table_len)?;
        let crc_table_len = round_up(n.checked_mul(crc_run(extent_size, true))?, META_ALIGN)?;
        let align = es / gcd(es, DATA_ALIGN) * DATA_ALIGN;
        let data_offset = round_up(crc_table_offset.checked_add(crc_table_len)?, align)?;
        let end = data_offset.checked_add(n.checked_mul(es)?)?;
        (end <= device_size).then_some(Layout {
            device_size,
            extent_size,
            epoch_slots,
            epoch_table_offset: EPOCH_TABLE_OFFSET,
            epoch_table_len,
            epoch_mirror_offset,
            extent_table_offset,
            extent_table_len,
            extent_mirror_offset,
            crc_table_offset,
            crc_table_len,
            data_offset,
            extents_total: n,
            thin: None,
        })
    }

    /// The format-v3 layout with `blocks` data blocks of 4 KiB, or `None`
    /// if it does not fit. Checkpoint areas hold the worst case: every
    /// block a run of its own.
    fn thin_with_blocks(
        device_size: u64,
        chunk_size: u32,
        epoch_slots: u32,
        blocks: u64,
    ) -> Option<Self> {
        let bs = u64::from(BLOCK_SIZE);
        let epoch_table_len = u64::from(epoch_slots) * RECORD_SIZE;
        let epoch_mirror_offset = round_up(EPOCH_TABLE_OFFSET + epoch_table_len, META_ALIGN)?;
        let log_pages = thin_log_pages(blocks);
        let log_offset = round_up(epoch_mirror_offset + epoch_table_len, META_ALIGN)?;
        let log_mirror_offset = log_offset.checked_add(log_pages * bs)?;
        let checkpoint_pages = crate::ckpt::pages_for(usize::try_from(blocks).ok()?) as u64;
        let ckpt0 = log_mirror_offset.checked_add(log_pages * bs)?;
        let ckpt1 = ckpt0.checked_add(checkpoint_pages.checked_mul(bs)?)?;
        let crc_journal_offset = ckpt1.checked_add(checkpoint_pages * bs)?;
        let crc_journal_pages = crate::crcjournal::pages_for(blocks);
        let crc_table_offset = crc_journal_offset.checked_add(crc_journal_pages * bs)?;
        let crc_table_len = round_up(blocks.checked_mul(4)?, META_ALIGN)?;
        let data_offset = round_up(crc_table_offset.checked_add(crc_table_len)?, DATA_ALIGN)?;
        let end = data_offset.checked_add(blocks.checked_mul(bs)?)?;
        (end <= device_size).then_some(Layout {
            device_size,
            extent_size: chunk_size,
            epoch_slots,
            epoch_table_offset: EPOCH_TABLE_OFFSET,
            epoch_table_len,
            epoch_mirror_offset,
            extent_table_offset: 0,
            extent_table_len: 0,
            extent_mirror_offset: 0,
            crc_table_offset,
            crc_table_len,
            data_offset,
            extents_total: blocks / u64::from(chunk_size / BLOCK_SIZE),
            thin: Some(ThinRegions {
                log_offset,
                log_mirror_offset,
                log_pages,
                checkpoint_offsets: [ckpt0, ckpt1],
                checkpoint_pages,
                crc_journal_offset,
                crc_journal_pages,
                blocks_total: blocks,
            }),
        })
    }

    /// The format-v3 layout with the most 4 KiB data blocks that fit in
    /// `device_size` bytes (at least one chunk's worth).
    pub(crate) fn compute_thin(
        device_size: u64,
        chunk_size: u32,
        epoch_slots: u32,
    ) -> Result<Self, LayoutError> {
        check_extent_size(chunk_size)?;
        largest_fitting(
            u64::from(chunk_size / BLOCK_SIZE),
            device_size / u64::from(BLOCK_SIZE),
            |n| Self::thin_with_blocks(device_size, chunk_size, epoch_slots, n),
        )
    }

    /// Checks a recorded format-v3 layout.
    fn validate_thin(&self, t: &ThinRegions) -> Result<(), LayoutError> {
        use LayoutError::Inconsistent as Bad;
        let bs = u64::from(BLOCK_SIZE);
        if self.epoch_slots == 0
            || self.epoch_table_len != u64::from(self.epoch_slots) * RECORD_SIZE
        {
            return Err(Bad("epoch table length does not match its slot count"));
        }
        if self.epoch_table_offset < 2 * bs || self.epoch_mirror_offset == 0 {
            return Err(Bad("epoch table overlaps the superblocks or has no mirror"));
        }
        if self.extent_table_offset != 0 || self.extent_mirror_offset != 0 {
            return Err(Bad("format v3 has no extent table"));
        }
        if t.blocks_total < u64::from(self.extent_size / BLOCK_SIZE) {
            return Err(Bad("fewer data blocks than a chunk"));
        }
        if t.log_pages < 4 {
            return Err(Bad("metadata log too short"));
        }
        let need_ckpt = usize::try_from(t.blocks_total)
            .map(|b| crate::ckpt::pages_for(b) as u64)
            .unwrap_or(u64::MAX);
        if t.checkpoint_pages < need_ckpt {
            return Err(Bad("checkpoint areas too short"));
        }
        if t.crc_journal_pages < crate::crcjournal::HEADER_PAGES + 1 {
            return Err(Bad("crc journal too short"));
        }
        if t.blocks_total
            .checked_mul(4)
            .is_none_or(|need| self.crc_table_len < need)
        {
            return Err(Bad("crc table too short"));
        }
        let pages = |n: u64| n.saturating_mul(bs);
        let regions = [
            (self.epoch_table_offset, self.epoch_table_len),
            (self.epoch_mirror_offset, self.epoch_table_len),
            (t.log_offset, pages(t.log_pages)),
            (t.log_mirror_offset, pages(t.log_pages)),
            (t.checkpoint_offsets[0], pages(t.checkpoint_pages)),
            (t.checkpoint_offsets[1], pages(t.checkpoint_pages)),
            (t.crc_journal_offset, pages(t.crc_journal_pages)),
            (self.crc_table_offset, self.crc_table_len),
            (self.data_offset, 0),
        ];
        if regions.iter().any(|(o, _)| o % META_ALIGN != 0) {
            return Err(Bad("a region is not 4 KiB aligned"));
        }
        for w in regions.windows(2) {
            let ((off, len), (next, _)) = (w[0], w[1]);
            if off.checked_add(len).is_none_or(|end| end > next) {
                return Err(Bad("regions overlap or are out of order"));
            }
        }
        let end = t
            .blocks_total
            .checked_mul(bs)
            .and_then(|d| d.checked_add(self.data_offset));
        if end.is_none_or(|end| end > self.device_size) {
            return Err(Bad("data region exceeds the device"));
        }
        Ok(())
    }

    /// Byte offset of physical block `p`'s data (format v3).
    pub(crate) fn block_data_offset(&self, p: u64) -> u64 {
        self.data_offset + p * u64::from(BLOCK_SIZE)
    }

    /// Byte offset of physical block `p`'s crc (format v3).
    pub(crate) fn block_crc_offset(&self, p: u64) -> u64 {
        self.crc_table_offset + p * 4
    }

    /// The layout with the most extents that fit in `device_size` bytes.
    pub(crate) fn compute(
        device_size: u64,
        extent_size: u32,
        epoch_slots: u32,
    ) -> Result<Self, LayoutError> {
        check_extent_size(extent_size)?;
        largest_fitting(1, device_size / u64::from(extent_size), |n| {
            Self::with_extents(device_size, extent_size, epoch_slots, n)
        })
    }

    /// Checks a recorded layout against the rules of the format.
    pub(crate) fn validate(&self) -> Result<(), LayoutError> {
        use LayoutError::Inconsistent as Bad;
        check_extent_size(self.extent_size)?;
        if let Some(t) = &self.thin {
            return self.validate_thin(t);
        }
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
        if (self.epoch_mirror_offset == 0) != (self.extent_mirror_offset == 0) {
            return Err(Bad("only one of the tables has a mirror"));
        }
        if n == 0 {
            return Err(Bad("no extents"));
        }
        let need_records = n.checked_mul(RECORD_SIZE);
        if need_records.is_none_or(|need| self.extent_table_len < need) {
            return Err(Bad("extent table too short"));
        }
        let need_crcs = n.checked_mul(crc_run(self.extent_size, self.mirrored()));
        if need_crcs.is_none_or(|need| self.crc_table_len < need) {
            return Err(Bad("crc table too short"));
        }
        // Every region, in the order the format requires.
        let mut regions = vec![(self.epoch_table_offset, self.epoch_table_len)];
        if self.mirrored() {
            regions.push((self.epoch_mirror_offset, self.epoch_table_len));
        }
        regions.push((self.extent_table_offset, self.extent_table_len));
        if self.mirrored() {
            regions.push((self.extent_mirror_offset, self.extent_table_len));
        }
        regions.push((self.crc_table_offset, self.crc_table_len));
        if regions.iter().any(|(o, _)| o % META_ALIGN != 0) {
            return Err(Bad("a table is not 4 KiB aligned"));
        }
        regions.push((self.data_offset, 0));
        for w in regions.windows(2) {
            let ((off, len), (next, _)) = (w[0], w[1]);
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

    /// Whether the tables have mirrors and the extents stamps (version-2
    /// geometry), rather than the version-1 geometry.
    pub(crate) fn mirrored(&self) -> bool {
        self.extent_mirror_offset != 0
    }

    /// Byte offsets of the copies of the epoch table (one or two).
    pub(crate) fn epoch_tables(&self) -> Vec<u64> {
        let mut v = vec![self.epoch_table_offset];
        if self.epoch_mirror_offset != 0 {
            v.push(self.epoch_mirror_offset);
        }
        v
    }

    /// Byte offsets of the copies of the extent table (one or two).
    pub(crate) fn extent_tables(&self) -> Vec<u64> {
        if self.thin.is_some() {
            return Vec::new();
        }
        let mut v = vec![self.extent_table_offset];
        if self.mirrored() {
            v.push(self.extent_mirror_offset);
        }
        v
    }

    /// 4 KiB blocks per extent.
    pub(crate) fn blocks_per_extent(&self) -> u32 {
        self.extent_size / BLOCK_SIZE
    }

    /// Byte offset of extent `e`'s data.
    pub(crate) fn extent_data_offset(&self, e: u64) -> u64 {
        self.data_offset + e * u64::from(self.extent_size)
    }

    /// Byte offset of extent `e`'s record in the table copy at `table`.
    pub(crate) fn extent_record_offset(&self, table: u64, e: u64) -> u64 {
        table + e * RECORD_SIZE
    }

    /// Byte offset of epoch slot `s` in the table copy at `table`.
    pub(crate) fn epoch_slot_offset(&self, table: u64, s: u32) -> u64 {
        table + u64::from(s) * RECORD_SIZE
    }

    /// Byte offset of extent `e`'s stamp (mirrored layouts only).
    pub(crate) fn stamp_offset(&self, e: u64) -> u64 {
        self.crc_table_offset + e * crc_run(self.extent_size, true)
    }

    /// Byte offset of the crc of block `block` of extent `e`.
    pub(crate) fn crc_offset(&self, e: u64, block: u32) -> u64 {
        let run = crc_run(self.extent_size, self.mirrored());
        let stamp = if self.mirrored() { STAMP_SIZE } else { 0 };
        self.crc_table_offset + e * run + stamp + u64::from(block) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_file_layout() {
        let l = Layout::compute(8 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS).unwrap();
        l.validate().unwrap();
        assert_eq!(l.epoch_table_len, 1 << 20);
        assert_eq!(l.epoch_mirror_offset, l.epoch_table_offset + (1 << 20));
        assert_eq!(l.extent_table_offset, l.epoch_mirror_offset + (1 << 20));
        assert_eq!(l.extent_table_len, 8192);
        assert_eq!(l.extent_mirror_offset, l.extent_table_offset + 8192);
        assert_eq!(l.crc_table_offset, l.extent_mirror_offset + 8192);
        assert_eq!(l.data_offset, 3 << 20);
        assert_eq!(l.extents_total, 80);
        assert!(l.mirrored());
    }

    #[test]
    fn largest_count_is_chosen() {
        for size in [3u64 << 20, 5 << 20, (100 << 20) + 12345, 10 << 30] {
            for es in [4096u32, 12 << 10, 64 << 10, 1 << 20, 3 << 20] {
                let Ok(l) = Layout::compute(size, es, DEFAULT_EPOCH_SLOTS) else {
                    continue;
                };
                l.validate().unwrap();
                assert!(l.data_offset % (1 << 20) == 0);
                let more = Layout::with_extents(size, es, DEFAULT_EPOCH_SLOTS, l.extents_total + 1);
                assert!(more.is_none(), "size {size} es {es}");
            }
        }
    }

    #[test]
    fn too_small_and_bad_extent_size() {
        assert_eq!(
            Layout::compute(1 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS),
            Err(LayoutError::TooSmall)
        );
        assert_eq!(
            Layout::compute(1 << 30, 1000, DEFAULT_EPOCH_SLOTS),
            Err(LayoutError::InvalidExtentSize(1000))
        );
        assert_eq!(
            Layout::compute(1 << 30, 0, DEFAULT_EPOCH_SLOTS),
            Err(LayoutError::InvalidExtentSize(0))
        );
    }

    #[test]
    fn validate_rejects_overlap() {
        let mut l = Layout::compute(8 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS).unwrap();
        l.extents_total += 1;
        assert!(l.validate().is_err());
        let mut l = Layout::compute(8 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS).unwrap();
        l.crc_table_offset -= 4096;
        assert!(l.validate().is_err());
        let mut l = Layout::compute(8 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS).unwrap();
        l.epoch_mirror_offset = 0;
        assert!(l.validate().is_err());
        let mut l = Layout::compute(8 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS).unwrap();
        l.extent_mirror_offset = l.extent_table_offset;
        assert!(l.validate().is_err());
    }

    /// The version-1 geometry (no mirrors, no stamps), as version 1 computed it.
    fn version_1(device_size: u64, extent_size: u32, n: u64) -> Layout {
        let bpe = u64::from(extent_size / BLOCK_SIZE);
        let extent_table_offset = EPOCH_TABLE_OFFSET + u64::from(DEFAULT_EPOCH_SLOTS) * RECORD_SIZE;
        let extent_table_len = round_up(n * RECORD_SIZE, META_ALIGN).unwrap();
        let crc_table_offset = extent_table_offset + extent_table_len;
        let crc_table_len = round_up(n * bpe * 4, META_ALIGN).unwrap();
        Layout {
            device_size,
            extent_size,
            epoch_slots: DEFAULT_EPOCH_SLOTS,
            epoch_table_offset: EPOCH_TABLE_OFFSET,
            epoch_table_len: u64::from(DEFAULT_EPOCH_SLOTS) * RECORD_SIZE,
            epoch_mirror_offset: 0,
            extent_table_offset,
            extent_table_len,
            extent_mirror_offset: 0,
            crc_table_offset,
            crc_table_len,
            data_offset: round_up(crc_table_offset + crc_table_len, 1 << 20).unwrap(),
            extents_total: n,
            thin: None,
        }
    }

    #[test]
    fn version_1_geometry() {
        let l = version_1(8 << 20, 64 << 10, 96);
        l.validate().unwrap();
        assert!(!l.mirrored());
        assert_eq!(l.data_offset, 2 << 20);
        assert_eq!(l.epoch_tables(), vec![l.epoch_table_offset]);
        assert_eq!(l.extent_tables(), vec![l.extent_table_offset]);
        assert_eq!(l.crc_offset(1, 2), l.crc_table_offset + (16 + 2) * 4);
    }

    #[test]
    fn thin_layouts_fit_and_validate() {
        for size in [8u64 << 20, (100 << 20) + 12345, 10 << 30, 1 << 40] {
            for cs in [64u32 << 10, 1 << 20] {
                let l = Layout::compute_thin(size, cs, DEFAULT_EPOCH_SLOTS).unwrap();
                l.validate().unwrap();
                let t = l.thin.unwrap();
                assert!(l.data_offset % (1 << 20) == 0);
                assert!(Layout::thin_with_blocks(
                    size,
                    cs,
                    DEFAULT_EPOCH_SLOTS,
                    t.blocks_total + 1
                )
                .is_none());
                // Metadata stays a small share of a large disk.
                if size >= 10 << 30 {
                    let data = t.blocks_total * 4096;
                    assert!(data as f64 > size as f64 * 0.96, "size {size}: {data}");
                }
                assert_eq!(l.epoch_tables().len(), 2);
                assert!(l.extent_tables().is_empty());
            }
        }
        assert_eq!(
            Layout::compute_thin(1 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS),
            Err(LayoutError::TooSmall)
        );
        let mut l = Layout::compute_thin(64 << 20, 1 << 20, DEFAULT_EPOCH_SLOTS).unwrap();
        l.thin.as_mut().unwrap().checkpoint_pages -= 1;
        assert!(l.validate().is_err());
        let mut l = Layout::compute_thin(64 << 20, 1 << 20, DEFAULT_EPOCH_SLOTS).unwrap();
        l.thin.as_mut().unwrap().log_mirror_offset -= 4096;
        assert!(l.validate().is_err());
    }

    #[test]
    fn offsets() {
        let l = Layout::compute(8 << 20, 64 << 10, DEFAULT_EPOCH_SLOTS).unwrap();
        assert_eq!(l.extent_data_offset(2), l.data_offset + (128 << 10));
        assert_eq!(
            l.extent_record_offset(l.extent_mirror_offset, 3),
            l.extent_mirror_offset + 192
        );
        // 64 KiB extents: a 64-byte stamp and 16 crcs per extent.
        assert_eq!(l.stamp_offset(1), l.crc_table_offset + 128);
        assert_eq!(l.crc_offset(1, 2), l.crc_table_offset + 128 + 64 + 2 * 4);
        assert_eq!(
            l.epoch_slot_offset(l.epoch_table_offset, 5),
            l.epoch_table_offset + 320
        );
        assert_eq!(
            l.epoch_tables(),
            vec![l.epoch_table_offset, l.epoch_mirror_offset]
        );
    }
}
