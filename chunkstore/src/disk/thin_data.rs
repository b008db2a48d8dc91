//! Format v3's data path: read, write and discard within one chunk, block
//! by block. The caller holds the chunk's stripe lock (shared for reads,
//! exclusive otherwise) and has settled what an uncertain chunk may take
//! (see `data.rs`).
//!
//! A write allocates the blocks it gives content to that hold nothing yet
//! (a block of zeros needs none: it reads as zeros unallocated), logs the
//! allocation, then writes data and crcs. A discard frees the whole blocks
//! it covers and zeroes the partial ones in place.

use std::borrow::Cow;

use super::data::blocks;
use super::Disk;
use crate::blockmap::{Key, NoSpace};
use crate::mlog::Record;
use crate::{Error, BLOCK_SIZE};

const BS: usize = BLOCK_SIZE as usize;

/// Where each block of a range lives: `(physical block, tag)`, `None` if
/// it holds nothing.
type Places = Vec<Option<(u64, u32)>>;

/// Maximal runs `i..j` of `places` held at consecutive physical blocks.
fn runs(places: &Places) -> Vec<(usize, usize, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < places.len() {
        let Some((p, _)) = places[i] else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        while j < places.len() && matches!(places[j], Some((q, _)) if q == p + (j - i) as u64) {
            j += 1;
        }
        out.push((i, j, p));
        i = j;
    }
    out
}

/// Physical blocks per row of the crc cache (format v3).
pub(super) const CRC_GROUP: u32 = 256;

/// Physical blocks `p .. p + n` split by crc-cache row: `(row, first
/// block in the row, index in the range, count)`.
fn groups(p: u64, n: usize) -> impl Iterator<Item = (u64, u32, usize, usize)> {
    let g = u64::from(CRC_GROUP);
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= n {
            return None;
        }
        let q = p + i as u64;
        let at = (q % g) as usize;
        let k = (g as usize - at).min(n - i);
        let item = (q / g, at as u32, i, k);
        i += k;
        Some(item)
    })
}

/// Maximal runs of consecutive values in a sorted list: `(first, count)`.
fn spans(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &b in sorted {
        match out.last_mut() {
            Some((f, n)) if *f + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

impl Disk {
    /// Reads whole blocks `first ..` into `img` (a multiple of 4 KiB):
    /// held blocks verified against their crcs, the others zeros.
    fn thin_fill(
        &self,
        key: &Key,
        first: u32,
        places: &Places,
        img: &mut [u8],
    ) -> Result<(), Error> {
        let l = &self.sb.layout;
        for (i, p) in places.iter().enumerate() {
            if p.is_none() {
                img[i * BS..(i + 1) * BS].fill(0);
            }
        }
        for (i, j, p) in runs(places) {
            let part = &mut img[i * BS..j * BS];
            self.read_chunk_at(key, part, l.block_data_offset(p))?;
            let crcs = self.read_block_crcs(key, p, j - i)?;
            for (k, (block, crc)) in part.chunks_exact(BS).zip(crcs).enumerate() {
                let tag = places[i + k].map_or(0, |(_, t)| t);
                if tessera_crc::crc32c(block) ^ tag != crc {
                    return Err(Error::Checksum {
                        vdisk: key.0,
                        chunk: key.1,
                        block: first + (i + k) as u32,
                    });
                }
            }
        }
        Ok(())
    }

    /// The stored crcs of physical blocks `p .. p + n`: from the cache
    /// when it knows them all, else read (and kept).
    fn read_block_crcs(&self, key: &Key, p: u64, n: usize) -> Result<Vec<u32>, Error> {
        let mut out = vec![0u32; n];
        let cached = groups(p, n).all(|(g, at, i, k)| self.crcs.get(g, at, &mut out[i..i + k]));
        if cached {
            return Ok(out);
        }
        let out = self.table_crcs(key, p, n)?;
        self.cache_crcs(p, &out);
        Ok(out)
    }

    /// Physical blocks `p ..` store `crcs` (in the table, or dirty in the
    /// crc journal): the cache keeps them. Every access to a block's crc happens under the stripe lock
    /// of the chunk that holds it, as with extents; a block changes hands
    /// only by a free and an allocation, each under its chunk's lock, and
    /// the new holder writes the block's crc before anyone reads it.
    pub(super) fn cache_crcs(&self, p: u64, crcs: &[u32]) {
        for (g, at, i, k) in groups(p, crcs.len()) {
            self.crcs.fill(g, at, &crcs[i..i + k]);
        }
    }

    /// Writes the data of the held blocks among `places` (whole blocks of
    /// `img`), one write per run, and journals their crcs (committed by
    /// the caller).
    fn thin_store(&self, places: &Places, img: &[u8]) -> Result<(), Error> {
        let l = &self.sb.layout;
        for (i, j, p) in runs(places) {
            let part = &img[i * BS..j * BS];
            self.write_at(part, l.block_data_offset(p), "write chunk data")?;
            let crcs: Vec<u32> = part
                .chunks_exact(BS)
                .enumerate()
                .map(|(k, b)| tessera_crc::crc32c(b) ^ places[i + k].map_or(0, |(_, t)| t))
                .collect();
            self.journal_crcs(p, &crcs)?;
        }
        Ok(())
    }

    /// [`Disk::read`] on a format-v3 disk. `uncertain`: a block that holds
    /// nothing may be one whose record was lost (it reads as an error).
    pub(super) fn thin_read(
        &self,
        key: &Key,
        offset: u32,
        buf: &mut [u8],
        uncertain: bool,
    ) -> Result<(), Error> {
        let range = blocks(offset, buf.len());
        let places = self.thin_lookup(key, range.start, range.len() as u32);
        if uncertain && places.iter().any(Option::is_none) {
            return Err(Error::OwnershipUnknown {
                vdisk: key.0,
                chunk: key.1,
            });
        }
        if offset as usize % BS == 0 && buf.len() % BS == 0 {
            return self.thin_fill(key, range.start, &places, buf);
        }
        let mut tmp = vec![0u8; range.len() * BS];
        self.thin_fill(key, range.start, &places, &mut tmp)?;
        let skip = offset as usize - range.start as usize * BS;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    /// The whole-block image of a write: `data` at `offset`, its partial
    /// edge blocks merged with what they hold (verified).
    fn thin_image<'a>(
        &self,
        key: &Key,
        offset: u32,
        data: &'a [u8],
        places: &Places,
    ) -> Result<Cow<'a, [u8]>, Error> {
        let range = blocks(offset, data.len());
        let end = offset as usize + data.len();
        if offset as usize % BS == 0 && end % BS == 0 {
            return Ok(Cow::Borrowed(data));
        }
        let mut img = vec![0u8; range.len() * BS];
        let last = range.len() - 1;
        let mut edges = vec![0];
        if last != 0 {
            edges.push(last);
        }
        for i in edges {
            let one = vec![places[i]];
            self.thin_fill(
                key,
                range.start + i as u32,
                &one,
                &mut img[i * BS..(i + 1) * BS],
            )?;
        }
        let skip = offset as usize - range.start as usize * BS;
        img[skip..skip + data.len()].copy_from_slice(data);
        Ok(Cow::Owned(img))
    }

    /// [`Disk::write`] on a format-v3 disk.
    pub(super) fn thin_write(&self, key: &Key, offset: u32, data: &[u8]) -> Result<(), Error> {
        let range = blocks(offset, data.len());
        let mut places = self.thin_lookup(key, range.start, range.len() as u32);
        let img = self.thin_image(key, offset, data, &places)?;
        let need: Vec<u32> = places
            .iter()
            .enumerate()
            .filter(|(i, p)| p.is_none() && img[i * BS..(i + 1) * BS].iter().any(|b| *b != 0))
            .map(|(i, _)| range.start + i as u32)
            .collect();
        if need.is_empty() {
            // Nothing logged: no checkpoint can have become due.
            return self.thin_store(&places, &img);
        }
        self.thin_allocate(key, &need)?;
        places = self.thin_lookup(key, range.start, range.len() as u32);
        let stored = self.thin_store(&places, &img);
        self.checkpoint_if_due()?;
        stored
    }

    /// Allocates the chunk's blocks `need` (sorted, none held) and logs
    /// it: all of them, or none ([`Error::NoSpace`]).
    fn thin_allocate(&self, key: &Key, need: &[u32]) -> Result<(), Error> {
        self.reserve_generations_if_low()?;
        let mut ix = self.thin().index();
        let generation = match ix.map.current_generation(key) {
            Some(g) => g,
            None => self.state().take_generation().ok_or(Error::NoSpace)?,
        };
        if ix.map.free_blocks() < need.len() as u64 {
            return Err(Error::NoSpace);
        }
        let mut records = Vec::new();
        for (first, count) in spans(need) {
            match ix.map.allocate(*key, first, count, generation) {
                Ok(r) => records.extend(r),
                Err(NoSpace) => unreachable!("free blocks were counted"),
            }
        }
        if let Err(e) = self.log(&mut ix, &records) {
            // What reached the log is unknown: give the blocks back (and
            // say so in the log, best effort).
            let mut frees = Vec::new();
            for (first, count) in spans(need) {
                frees.extend(ix.map.free(*key, first, count));
            }
            let _ = self.log(&mut ix, &frees);
            return Err(e);
        }
        Ok(())
    }

    /// Frees the chunk's blocks `first .. first + count` that it holds, and
    /// logs it.
    pub(super) fn thin_free(&self, key: &Key, first: u32, count: u32) -> Result<u64, Error> {
        let records: Vec<Record> = {
            let mut ix = self.thin().index();
            let records = ix.map.free(*key, first, count);
            self.log(&mut ix, &records)?;
            records
        };
        self.checkpoint_if_due()?;
        Ok(records
            .iter()
            .map(|r| match r {
                Record::Free { count, .. } => u64::from(*count),
                Record::Alloc { .. } | Record::Trusted { .. } => 0,
            })
            .sum())
    }

    /// [`Disk::discard`] on a format-v3 disk: whole blocks are freed,
    /// partial ones zeroed in place (if they hold anything).
    pub(super) fn thin_discard(&self, key: &Key, offset: u32, len: u32) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let bs = BLOCK_SIZE;
        let end = offset + len;
        let whole = offset.div_ceil(bs)..end / bs;
        if whole.start < whole.end {
            self.thin_free(key, whole.start, whole.end - whole.start)?;
        }
        let mut partial = Vec::new();
        if offset % bs != 0 {
            partial.push((offset, end.min(offset.div_ceil(bs) * bs)));
        }
        let tail = end / bs * bs;
        if end % bs != 0 && tail >= offset.div_ceil(bs) * bs {
            partial.push((tail, end));
        }
        for (from, to) in partial {
            let zeros = vec![0u8; (to - from) as usize];
            self.thin_write(key, from, &zeros)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_spans() {
        let places: Places = vec![
            Some((10, 1)),
            Some((11, 2)),
            None,
            Some((5, 3)),
            Some((7, 4)),
        ];
        assert_eq!(runs(&places), vec![(0, 2, 10), (3, 4, 5), (4, 5, 7)]);
        assert_eq!(spans(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert!(spans(&[]).is_empty());
        let g: Vec<_> = groups(250, 300).collect();
        assert_eq!(g, vec![(0, 250, 0, 6), (1, 0, 6, 256), (2, 0, 262, 38)]);
    }
}
