//! Memory this process shares with the storage nodes on its host.
//!
//! A device adapter whose buffers live in file-backed shared memory (the
//! vhost-user device: guest memory comes from QEMU as file descriptors)
//! lists those regions with [`Volume::share_memory`](crate::Volume). Each
//! local session (a Unix-socket connection to a node on this host) passes
//! the regions to its node when it opens, and from then on a read or write
//! whose buffers all lie in them travels as a list of (region, offset,
//! length) segments: the node reads straight into, or copies straight out
//! of, the caller's memory, and no data crosses the socket.
//!
//! A session carries the table it opened with. When the adapter lists new
//! regions, the table's generation changes and each link opens a new
//! session on its next request; requests on the old session finish there.
//!
//! Translating a buffer by its address is sound because a table is
//! replaced before the memory it no longer lists can be reused: the
//! adapter lists new regions from the same thread, and before, any later
//! mapping change (see the vhost-user device's `update_memory`).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tessera_proto::{ShmRegion, ShmSeg, MAX_REGIONS, MAX_SEGMENTS};

/// One region of this process's memory, backed by `file` from `offset`.
#[derive(Debug, Clone)]
pub struct SharedRegion {
    /// Address of the region's first byte in this process.
    pub addr: usize,
    pub len: usize,
    pub file: Arc<File>,
    pub offset: u64,
}

/// The regions listed at one point in time.
#[derive(Debug, Default)]
pub(crate) struct ShmTable {
    pub(crate) generation: u64,
    regions: Vec<SharedRegion>,
}

impl ShmTable {
    pub(crate) fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The `MapMemory` list and its descriptors.
    pub(crate) fn wire(&self) -> (Vec<ShmRegion>, Vec<RawFd>) {
        self.regions
            .iter()
            .map(|r| {
                (
                    ShmRegion {
                        len: r.len as u64,
                        offset: r.offset,
                    },
                    r.file.as_raw_fd(),
                )
            })
            .unzip()
    }

    /// The encoded segment list of `bufs`, if every byte of them lies in a
    /// region (adjacent pieces of one region are merged).
    pub(crate) fn translate<B: AsRef<[u8]>>(&self, bufs: &[B]) -> Option<Vec<u8>> {
        if self.regions.is_empty() {
            return None;
        }
        let mut out: Vec<u8> = Vec::with_capacity(bufs.len() * ShmSeg::LEN);
        let mut last: Option<ShmSeg> = None;
        for b in bufs {
            let b = b.as_ref();
            if b.is_empty() {
                continue;
            }
            let start = b.as_ptr() as usize;
            let (i, r) = self
                .regions
                .iter()
                .enumerate()
                .find(|(_, r)| start >= r.addr && start - r.addr < r.len)?;
            let offset = start - r.addr;
            if b.len() > r.len - offset {
                return None;
            }
            let seg = ShmSeg {
                region: i as u32,
                len: u32::try_from(b.len()).ok()?,
                offset: offset as u64,
            };
            last = match last {
                Some(l)
                    if l.region == seg.region
                        && l.offset + u64::from(l.len) == seg.offset
                        && l.len.checked_add(seg.len).is_some() =>
                {
                    Some(ShmSeg {
                        len: l.len + seg.len,
                        ..l
                    })
                }
                Some(l) => {
                    out.extend_from_slice(&l.encode());
                    Some(seg)
                }
                None => Some(seg),
            };
        }
        out.extend_from_slice(&last?.encode());
        (out.len() / ShmSeg::LEN <= MAX_SEGMENTS).then_some(out)
    }
}

/// The current table, shared by every handle of a volume.
#[derive(Default)]
pub struct SharedMemory {
    table: ArcSwap<ShmTable>,
    generations: AtomicU64,
}

impl SharedMemory {
    pub(crate) fn current(&self) -> Arc<ShmTable> {
        self.table.load_full()
    }

    /// Replaces the table (at most [`MAX_REGIONS`] regions are shared; a
    /// request in others goes through the socket).
    pub(crate) fn set(&self, mut regions: Vec<SharedRegion>) {
        regions.truncate(MAX_REGIONS);
        let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        self.table.store(Arc::new(ShmTable {
            generation,
            regions,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(buf: &[u8]) -> ShmTable {
        let file = Arc::new(File::open("/dev/null").unwrap());
        ShmTable {
            generation: 1,
            regions: vec![
                SharedRegion {
                    addr: buf.as_ptr() as usize,
                    len: 8192,
                    file: file.clone(),
                    offset: 0,
                },
                SharedRegion {
                    addr: buf.as_ptr() as usize + 8192,
                    len: 8192,
                    file,
                    offset: 1 << 20,
                },
            ],
        }
    }

    proptest::proptest! {
        /// Any pieces inside the two regions translate to segments that name
        /// exactly those bytes, in order; a piece outside makes it `None`.
        #[test]
        fn segments_name_exactly_the_pieces(cuts in proptest::collection::vec((0usize..16384, 1usize..3000), 1..12), outside in proptest::prelude::any::<bool>()) {
            let buf = vec![0u8; 16384];
            let t = table(&buf);
            let mut pieces: Vec<&[u8]> = cuts
                .iter()
                .map(|&(at, len)| &buf[at..(at + len).min(16384)])
                .collect();
            let crosses = pieces.iter().any(|p| {
                let start = p.as_ptr() as usize - buf.as_ptr() as usize;
                start < 8192 && start + p.len() > 8192
            });
            let other = [0u8; 64];
            if outside {
                pieces.push(&other[..]);
            }
            let got = t.translate(&pieces);
            if outside || crosses {
                proptest::prop_assert!(got.is_none());
            } else {
                let segs: Vec<ShmSeg> = ShmSeg::iter(&got.unwrap()).collect();
                let mut named = Vec::new();
                for s in &segs {
                    let base = s.region as usize * 8192 + s.offset as usize;
                    named.extend(base..base + s.len as usize);
                }
                let mut want = Vec::new();
                for p in &pieces {
                    let start = p.as_ptr() as usize - buf.as_ptr() as usize;
                    want.extend(start..start + p.len());
                }
                proptest::prop_assert_eq!(named, want);
            }
        }
    }

    #[test]
    fn translates_and_merges_adjacent_pieces() {
        let buf = vec![0u8; 16384];
        let t = table(&buf);
        let segs = t
            .translate(&[&buf[0..512], &buf[512..4096], &buf[8192..8704]])
            .unwrap();
        let segs: Vec<ShmSeg> = ShmSeg::iter(&segs).collect();
        assert_eq!(
            segs,
            vec![
                ShmSeg {
                    region: 0,
                    len: 4096,
                    offset: 0
                },
                ShmSeg {
                    region: 1,
                    len: 512,
                    offset: 0
                },
            ]
        );
        // A piece crossing a region's end, or outside every region: no.
        assert!(t.translate(&[&buf[8000..8704]]).is_none());
        let other = vec![0u8; 512];
        assert!(t.translate(&[&other[..]]).is_none());
        assert!(ShmTable::default().translate(&[&buf[..512]]).is_none());
    }
}
