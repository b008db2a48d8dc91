//! The data path: read, write and discard within one chunk.
//!
//! Every operation holds the chunk's stripe lock (shared for reads,
//! exclusive otherwise) across its data and crc I/O, so a reader never sees
//! data without its crc. The state mutex is only taken for lookups and
//! allocator changes, never across I/O.
//!
//! A block's stored crc is `crc32c(block) ^ tag`, where `tag` is the owner
//! tag of the extent's allocation (`record::owner_tag`; 0 for extents
//! allocated by version 1): a block written for another owner, or for an
//! earlier allocation of the same chunk, never verifies.

use std::borrow::Cow;
use std::ops::Range;

use uuid::Uuid;

use super::{read, write, Disk};
use crate::record::{owner_tag, ExtentRecord, Stamp};
use crate::state::{ChunkKey, Mapping};
use crate::{Error, BLOCK_SIZE};

const BS: u32 = BLOCK_SIZE;

/// The 4 KiB blocks a byte range of a chunk touches (`len` > 0).
pub(super) fn blocks(offset: u32, len: usize) -> Range<u32> {
    let end = offset + len as u32;
    offset / BS..end.div_ceil(BS)
}

/// The stored crcs of whole blocks: crc32c of each, tagged.
fn tagged_crcs(img: &[u8], tag: u32) -> Vec<u32> {
    img.chunks_exact(BS as usize)
        .map(|b| tessera_crc::crc32c(b) ^ tag)
        .collect()
}

impl Disk {
    /// Reads `buf.len()` bytes of a chunk at `offset`.
    ///
    /// `offset` and the length are multiples of 512 and stay within the
    /// chunk. Unallocated chunks and never-written ranges read as zeros,
    /// except an unallocated chunk that a damaged extent may hold
    /// ([`Error::OwnershipUnknown`]). The crc of every 4 KiB block touched is
    /// verified ([`Error::Checksum`]); a device read error is
    /// [`Error::Unreadable`].
    pub fn read(&self, vdisk: Uuid, chunk: u64, offset: u32, buf: &mut [u8]) -> Result<(), Error> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let key = (vdisk, chunk);
        let _stripe = read(self.stripe(&key));
        if self.thin.is_some() {
            let (uncertain, untrusted) = {
                let st = self.state();
                (st.uncertain(&key), st.map_untrusted(&key))
            };
            if untrusted {
                return Err(Error::OwnershipUnknown { vdisk, chunk });
            }
            return self.thin_read(&key, offset, buf, uncertain);
        }
        // An uncommitted mapping is never seen here: its writer holds the
        // stripe exclusively until it commits or aborts.
        let (mapping, uncertain) = {
            let st = self.state();
            let m = st.lookup(&key);
            (m, m.is_none() && st.uncertain(&key))
        };
        let Some(m) = mapping else {
            if uncertain {
                return Err(Error::OwnershipUnknown { vdisk, chunk });
            }
            buf.fill(0);
            return Ok(());
        };
        let range = blocks(offset, buf.len());
        let crcs = self.read_crcs(&key, m.extent, range.start, range.len() as u32)?;
        let base = self.sb.layout.extent_data_offset(m.extent) + u64::from(range.start * BS);
        if offset % BS == 0 && buf.len() % BS as usize == 0 {
            self.read_chunk_at(&key, buf, base)?;
            self.verify(&key, range.start, buf, &crcs, m.tag)
        } else {
            let mut tmp = vec![0u8; range.len() * BS as usize];
            self.read_chunk_at(&key, &mut tmp, base)?;
            self.verify(&key, range.start, &tmp, &crcs, m.tag)?;
            let skip = (offset - range.start * BS) as usize;
            buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
            Ok(())
        }
    }

    /// Writes `data` into a chunk at `offset`, on behalf of a writer at `epoch`.
    ///
    /// Fails with [`Error::StaleEpoch`] (writing nothing) if `epoch` is older
    /// than the vDisk's stored epoch, and with [`Error::FenceUnknown`] if the
    /// vDisk's fence was lost; a newer epoch is persisted (synced) first. The
    /// first write to a chunk allocates its extent. Partial 4 KiB blocks are
    /// read (and verified), merged and rewritten. A chunk that a damaged
    /// extent may hold ([`Error::OwnershipUnknown`]) takes only a write of
    /// the whole chunk.
    pub fn write(
        &self,
        vdisk: Uuid,
        chunk: u64,
        offset: u32,
        data: &[u8],
        epoch: u64,
    ) -> Result<(), Error> {
        self.write_uncommitted(vdisk, chunk, offset, data, epoch)?;
        self.commit()
    }

    /// [`Disk::write`], except that on a format-v3 disk the crcs of the
    /// written blocks are left in the crc journal's open batch: the write
    /// survives `kill -9` only once [`Disk::commit`] has returned (a
    /// storage node commits once per batch of requests, before it answers
    /// them). Reads see the write at once.
    pub fn write_uncommitted(
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
            if self.thin.is_some() {
                // A chunk that may hold blocks whose records were lost takes
                // only a write of all of it.
                let uncertain = self.state().uncertain(&key);
                if uncertain && !self.whole(offset, data.len()) {
                    return Err(Error::OwnershipUnknown { vdisk, chunk });
                }
                self.thin_write(&key, offset, data)?;
                return if uncertain { self.resolve(key) } else { Ok(()) };
            }
            let (existing, uncertain) = {
                let st = self.state();
                let m = st.lookup(&key);
                (m, m.is_none() && st.uncertain(&key))
            };
            match existing {
                Some(m) => self.overwrite(&key, &m, offset, data),
                None if !uncertain => self.write_new(&key, offset, data),
                None if self.whole(offset, data.len()) => {
                    self.write_new(&key, offset, data)?;
                    self.resolve(key)
                }
                None => Err(Error::OwnershipUnknown { vdisk, chunk }),
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
            if self.thin.is_some() {
                if len == 0 {
                    return Ok(());
                }
                let uncertain = self.state().uncertain(&key);
                if uncertain && !self.whole(offset, len as usize) {
                    return Err(Error::OwnershipUnknown { vdisk, chunk });
                }
                self.thin_discard(&key, offset, len)?;
                self.commit()?;
                return if uncertain { self.resolve(key) } else { Ok(()) };
            }
            let (mapping, uncertain) = {
                let st = self.state();
                let m = st.lookup(&key);
                (m, m.is_none() && st.uncertain(&key))
            };
            let whole = self.whole(offset, len as usize);
            match mapping {
                Some(m) if whole => self.free_chunk(&key, m.extent),
                Some(m) => self.zero_within(&key, &m, offset, len),
                None if !uncertain || len == 0 => Ok(()), // already reads as zeros
                None if whole => self.resolve(key),
                None => Err(Error::OwnershipUnknown { vdisk, chunk }),
            }
        })
    }

    /// Whether a range covers the whole chunk.
    fn whole(&self, offset: u32, len: usize) -> bool {
        offset == 0 && len as u64 == u64::from(self.sb.layout.extent_size)
    }

    /// The chunk's content was just set whole: damaged extents that named it
    /// as their owner are freed (their records written free).
    fn resolve(&self, key: ChunkKey) -> Result<(), Error> {
        let (extents, lost) = {
            let mut st = self.state();
            (st.resolve(key), st.index_lost())
        };
        if let (Some(t), true) = (&self.thin, lost) {
            // Format v3 with the map lost: the chunk's trust outlives a
            // restart (the checkpoints of a lost map say which chunks).
            let mut ix = t.index();
            self.log(
                &mut ix,
                &[crate::mlog::Record::Trusted {
                    vdisk: key.0,
                    chunk: key.1,
                }],
            )?;
        }
        self.free_damaged(&extents);
        Ok(())
    }

    /// Writes the records of damaged extents free and frees them; those
    /// whose records cannot be written stay quarantined.
    pub(super) fn free_damaged(&self, extents: &[u64]) {
        for &e in extents {
            let generation = self.state().high_generation();
            match self.write_extent_record(e, &ExtentRecord::Free { generation }) {
                Ok(()) => self.state().release_damaged(&[e]),
                Err(err) => {
                    tracing::warn!(extent = e, error = %err, "cannot free a damaged extent; it stays quarantined");
                    self.state().keep_damaged(&[e]);
                }
            }
        }
    }

    /// Checks each 4 KiB block of `data` (block `first` onwards) against its
    /// stored crc.
    fn verify(
        &self,
        key: &ChunkKey,
        first: u32,
        data: &[u8],
        crcs: &[u32],
        tag: u32,
    ) -> Result<(), Error> {
        for (i, (block, &crc)) in data.chunks_exact(BS as usize).zip(crcs).enumerate() {
            if tessera_crc::crc32c(block) ^ tag != crc {
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
    /// current content of the partial edge blocks (verified), or by zeros
    /// for a fresh extent (`m` is `None`). Borrows `data` when aligned.
    fn block_image<'a>(
        &self,
        key: &ChunkKey,
        m: Option<&Mapping>,
        offset: u32,
        data: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, Error> {
        let range = blocks(offset, data.len());
        let end = offset + data.len() as u32;
        if offset % BS == 0 && end % BS == 0 {
            return Ok(Cow::Borrowed(data));
        }
        let mut img = vec![0u8; range.len() * BS as usize];
        if let Some(m) = m {
            let base = self.sb.layout.extent_data_offset(m.extent);
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
                let crc = self.read_crcs(key, m.extent, b, 1)?;
                self.read_chunk_at(key, block, base + u64::from(b * BS))?;
                self.verify(key, b, block, &crc, m.tag)?;
            }
        }
        let skip = (offset - range.start * BS) as usize;
        img[skip..skip + data.len()].copy_from_slice(data);
        Ok(Cow::Owned(img))
    }

    /// Overwrites part of an allocated chunk: data, then crcs (one write).
    fn overwrite(
        &self,
        key: &ChunkKey,
        m: &Mapping,
        offset: u32,
        data: &[u8],
    ) -> Result<(), Error> {
        let range = blocks(offset, data.len());
        let img = self.block_image(key, Some(m), offset, data)?;
        let base = self.sb.layout.extent_data_offset(m.extent) + u64::from(range.start * BS);
        self.write_at(&img, base, "write chunk data")?;
        self.write_crcs(m.extent, range.start, &tagged_crcs(&img, m.tag))
    }

    /// First write to a chunk: allocate, zero the rest, data, stamp and
    /// crcs, record.
    fn write_new(&self, key: &ChunkKey, offset: u32, data: &[u8]) -> Result<(), Error> {
        self.reserve_generations_if_low()?;
        let m = self
            .state()
            .allocate(*key, |g| owner_tag(key.0, key.1, g))
            .ok_or(Error::NoSpace)?;
        if let Err(e) = self.fill_new(key, &m, offset, data) {
            self.state().abort_allocation(key);
            return Err(e);
        }
        let rec = ExtentRecord::Used {
            vdisk: key.0,
            chunk: key.1,
            generation: m.generation,
            tagged: true,
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
    fn fill_new(&self, key: &ChunkKey, m: &Mapping, offset: u32, data: &[u8]) -> Result<(), Error> {
        let l = &self.sb.layout;
        let range = blocks(offset, data.len());
        let base = l.extent_data_offset(m.extent);
        let (start, end) = (u64::from(range.start * BS), u64::from(range.end * BS));
        self.zero(base, start)?;
        self.zero(base + end, u64::from(l.extent_size) - end)?;
        let img = self.block_image(key, None, offset, data)?;
        self.write_at(&img, base + start, "write chunk data")?;
        let mut crcs = vec![self.zero_crc ^ m.tag; l.blocks_per_extent() as usize];
        crcs[range.start as usize..range.end as usize].copy_from_slice(&tagged_crcs(&img, m.tag));
        let stamp = Stamp {
            vdisk: key.0,
            chunk: key.1,
            generation: m.generation,
        };
        self.write_stamp_and_crcs(m.extent, &stamp, &crcs)
    }

    /// Frees a chunk's extent: record (free) first, then the free list.
    pub(super) fn free_chunk(&self, key: &ChunkKey, extent: u64) -> Result<(), Error> {
        let generation = self.state().high_generation();
        self.crcs.forget(extent);
        self.write_extent_record(extent, &ExtentRecord::Free { generation })?;
        self.state().release(key);
        Ok(())
    }

    /// Partial discard: zero whole blocks in place, merge partial ones.
    fn zero_within(&self, key: &ChunkKey, m: &Mapping, offset: u32, len: u32) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let whole = offset.div_ceil(BS)..end / BS;
        if offset % BS != 0 {
            let head_end = end.min(whole.start * BS);
            let zeros = vec![0u8; (head_end - offset) as usize];
            self.overwrite(key, m, offset, &zeros)?;
        }
        if whole.start < whole.end {
            let base = self.sb.layout.extent_data_offset(m.extent);
            let bytes = u64::from(whole.len() as u32 * BS);
            self.zero(base + u64::from(whole.start * BS), bytes)?;
            let crcs = vec![self.zero_crc ^ m.tag; whole.len()];
            self.write_crcs(m.extent, whole.start, &crcs)?;
        }
        let tail_start = (end / BS) * BS;
        if end % BS != 0 && tail_start >= offset.div_ceil(BS) * BS {
            let zeros = vec![0u8; (end - tail_start) as usize];
            self.overwrite(key, m, tail_start, &zeros)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::blocks;

    #[test]
    fn block_ranges() {
        assert_eq!(blocks(0, 4096), 0..1);
        assert_eq!(blocks(512, 512), 0..1);
        assert_eq!(blocks(3584, 1024), 0..2);
        assert_eq!(blocks(4096, 8192), 1..3);
        assert_eq!(blocks(8192 - 512, 4096 + 1024), 1..4);
    }
}
