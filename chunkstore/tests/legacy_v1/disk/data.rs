//! The data path: read, write and discard within one chunk.
//!
//! Every operation holds the chunk's stripe lock (shared for reads,
//! exclusive otherwise) across its data and crc I/O, so a reader never sees
//! data without its crc. The state mutex is only taken for lookups and
//! allocator changes, never across I/O.

use std::borrow::Cow;
use std::ops::Range;

use uuid::Uuid;

use super::{read, write, Disk};
use crate::legacy_v1::record::ExtentRecord;
use crate::legacy_v1::state::ChunkKey;
use crate::legacy_v1::{Error, BLOCK_SIZE};

const BS: u32 = BLOCK_SIZE;

/// The 4 KiB blocks a byte range of a chunk touches (`len` > 0).
fn blocks(offset: u32, len: usize) -> Range<u32> {
    let end = offset + len as u32;
    offset / BS..end.div_ceil(BS)
}

impl Disk {
    /// Reads `buf.len()` bytes of a chunk at `offset`.
    ///
    /// `offset` and the length are multiples of 512 and stay within the
    /// chunk. Unallocated chunks and never-written ranges read as zeros. The
    /// crc of every 4 KiB block touched is verified.
    pub fn read(&self, vdisk: Uuid, chunk: u64, offset: u32, buf: &mut [u8]) -> Result<(), Error> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let key = (vdisk, chunk);
        let _stripe = read(self.stripe(&key));
        // An uncommitted mapping is never seen here: its writer holds the
        // stripe exclusively until it commits or aborts.
        let mapping = self.state().lookup(&key);
        let Some(m) = mapping else {
            buf.fill(0);
            return Ok(());
        };
        let range = blocks(offset, buf.len());
        let crcs = self.read_crcs(m.extent, range.start, range.len() as u32)?;
        let base = self.sb.layout.extent_data_offset(m.extent) + u64::from(range.start * BS);
        const OP: &str = "read chunk data";
        if offset % BS == 0 && buf.len() % BS as usize == 0 {
            self.read_at(buf, base, OP)?;
            self.verify(&key, range.start, buf, &crcs)
        } else {
            let mut tmp = vec![0u8; range.len() * BS as usize];
            self.read_at(&mut tmp, base, OP)?;
            self.verify(&key, range.start, &tmp, &crcs)?;
            let skip = (offset - range.start * BS) as usize;
            buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
            Ok(())
        }
    }

    /// Writes `data` into a chunk at `offset`, on behalf of a writer at `epoch`.
    ///
    /// Fails with [`Error::StaleEpoch`] (writing nothing) if `epoch` is older
    /// than the vDisk's stored epoch; a newer epoch is persisted first. The
    /// first write to a chunk allocates its extent. Partial 4 KiB blocks are
    /// read (and verified), merged and rewritten.
    pub fn write(
        &self,
        vdisk: Uuid,
        chunk: u64,
        offset: u32,
        data: &[u8],
        epoch: u64,
    ) -> Result<(), Error> {
        self.check_range(offset, data.len())?;
        self.admitted(vdisk, epoch, || {
            if data.is_empty() {
                return Ok(());
            }
            let key = (vdisk, chunk);
            let _stripe = write(self.stripe(&key));
            let existing = self.state().lookup(&key);
            match existing {
                Some(m) => self.overwrite(&key, m.extent, offset, data),
                None => self.write_new(&key, offset, data),
            }
        })
    }

    /// Discards `len` bytes of a chunk at `offset`: they read as zeros after.
    ///
    /// A discard of the whole chunk frees its extent. Same range and epoch
    /// rules as [`Disk::write`].
    pub fn discard(
        &self,
        vdisk: Uuid,
        chunk: u64,
        offset: u32,
        len: u32,
        epoch: u64,
    ) -> Result<(), Error> {
        self.check_range(offset, len as usize)?;
        self.admitted(vdisk, epoch, || {
            let key = (vdisk, chunk);
            let _stripe = write(self.stripe(&key));
            let mapping = self.state().lookup(&key);
            let Some(m) = mapping else {
                return Ok(()); // already reads as zeros
            };
            if offset == 0 && len == self.sb.layout.extent_size {
                return self.free_chunk(&key, m.extent);
            }
            self.zero_within(&key, m.extent, offset, len)
        })
    }

    /// Checks each 4 KiB block of `data` (block `first` onwards) against `crcs`.
    fn verify(&self, key: &ChunkKey, first: u32, data: &[u8], crcs: &[u32]) -> Result<(), Error> {
        for (i, (block, &crc)) in data.chunks_exact(BS as usize).zip(crcs).enumerate() {
            if tessera_crc::crc32c(block) != crc {
                return Err(Error::Checksum {
                    vdisk: key.0,
                    chunk: key.1,
                    block: first + i as u32,
                });
            }
        }
        Ok(())
    }

    /// The full-block image of a write: `data` at `offset`, surrounded by the
    /// current content of the partial edge blocks (verified against `crcs`),
    /// or by zeros when `fresh` (a new extent). Borrows `data` when aligned.
    fn block_image<'a>(
        &self,
        key: &ChunkKey,
        extent: u64,
        offset: u32,
        data: &'a [u8],
        crcs: Option<&[u32]>,
    ) -> Result<Cow<'a, [u8]>, Error> {
        let range = blocks(offset, data.len());
        let end = offset + data.len() as u32;
        if offset % BS == 0 && end % BS == 0 {
            return Ok(Cow::Borrowed(data));
        }
        let mut img = vec![0u8; range.len() * BS as usize];
        if let Some(crcs) = crcs {
            let base = self.sb.layout.extent_data_offset(extent);
            let last = range.end - 1;
            let mut edges = vec![];
            if offset % BS != 0 || (range.len() == 1 && end % BS != 0) {
                edges.push(range.start);
            }
            if end % BS != 0 && last != range.start {
                edges.push(last);
            }
            for b in edges {
                let i = (b - range.start) as usize;
                let block = &mut img[i * BS as usize..(i + 1) * BS as usize];
                let op = "read a block to merge a partial write";
                self.read_at(block, base + u64::from(b * BS), op)?;
                self.verify(key, b, block, &crcs[i..=i])?;
            }
        }
        let skip = (offset - range.start * BS) as usize;
        img[skip..skip + data.len()].copy_from_slice(data);
        Ok(Cow::Owned(img))
    }

    /// Overwrites part of an allocated chunk: data, then crcs.
    fn overwrite(
        &self,
        key: &ChunkKey,
        extent: u64,
        offset: u32,
        data: &[u8],
    ) -> Result<(), Error> {
        let range = blocks(offset, data.len());
        let old = self.read_crcs(extent, range.start, range.len() as u32)?;
        let img = self.block_image(key, extent, offset, data, Some(&old))?;
        let base = self.sb.layout.extent_data_offset(extent) + u64::from(range.start * BS);
        self.write_at(&img, base, "write chunk data")?;
        let crcs: Vec<u32> = img
            .chunks_exact(BS as usize)
            .map(tessera_crc::crc32c)
            .collect();
        self.write_crcs(extent, range.start, &crcs)
    }

    /// First write to a chunk: allocate, zero the rest, data, crcs, record.
    fn write_new(&self, key: &ChunkKey, offset: u32, data: &[u8]) -> Result<(), Error> {
        let m = self.state().allocate(*key).ok_or(Error::NoSpace)?;
        if let Err(e) = self.fill_new(key, m.extent, offset, data) {
            self.state().abort_allocation(key);
            return Err(e);
        }
        let rec = ExtentRecord::Used {
            vdisk: key.0,
            chunk: key.1,
            generation: m.generation,
        };
        if let Err(e) = self.write_extent_record(m.extent, &rec) {
            tracing::warn!(extent = m.extent, error = %e, "quarantining an extent whose record could not be written");
            self.state().quarantine(key);
            return Err(e);
        }
        self.state().commit(key);
        Ok(())
    }

    /// Steps (2)–(4) of a first write: everything but the record.
    fn fill_new(&self, key: &ChunkKey, extent: u64, offset: u32, data: &[u8]) -> Result<(), Error> {
        let l = &self.sb.layout;
        let range = blocks(offset, data.len());
        let base = l.extent_data_offset(extent);
        let (start, end) = (u64::from(range.start * BS), u64::from(range.end * BS));
        self.zero(base, start)?;
        self.zero(base + end, u64::from(l.extent_size) - end)?;
        let img = self.block_image(key, extent, offset, data, None)?;
        self.write_at(&img, base + start, "write chunk data")?;
        let mut crcs = vec![self.zero_crc; l.blocks_per_extent() as usize];
        for (slot, block) in crcs[range.start as usize..range.end as usize]
            .iter_mut()
            .zip(img.chunks_exact(BS as usize))
        {
            *slot = tessera_crc::crc32c(block);
        }
        self.write_crcs(extent, 0, &crcs)
    }

    /// Frees a chunk's extent: record (free) first, then the free list.
    pub(super) fn free_chunk(&self, key: &ChunkKey, extent: u64) -> Result<(), Error> {
        let generation = self.state().high_generation();
        self.write_extent_record(extent, &ExtentRecord::Free { generation })?;
        self.state().release(key);
        Ok(())
    }

    /// Partial discard: zero whole blocks in place, merge partial ones.
    fn zero_within(&self, key: &ChunkKey, extent: u64, offset: u32, len: u32) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let whole = offset.div_ceil(BS)..end / BS;
        if offset % BS != 0 {
            let head_end = end.min(whole.start * BS);
            let zeros = vec![0u8; (head_end - offset) as usize];
            self.overwrite(key, extent, offset, &zeros)?;
        }
        if whole.start < whole.end {
            let base = self.sb.layout.extent_data_offset(extent);
            let bytes = u64::from(whole.len() as u32 * BS);
            self.zero(base + u64::from(whole.start * BS), bytes)?;
            let crcs = vec![self.zero_crc; whole.len()];
            self.write_crcs(extent, whole.start, &crcs)?;
        }
        let tail_start = (end / BS) * BS;
        if end % BS != 0 && tail_start >= offset.div_ceil(BS) * BS {
            let zeros = vec![0u8; (end - tail_start) as usize];
            self.overwrite(key, extent, tail_start, &zeros)?;
        }
        Ok(())
    }
}
