//! [`PowerLossDevice`]: an in-memory [`Device`] that models what power loss
//! does to a disk behind a page cache and a volatile write cache.
//!
//! It keeps a *durable image* and the list of writes made since the last
//! [`Device::sync`] (*pending writes*). Reads see the newest data (the
//! durable image with every pending write applied in order), as a page cache
//! would. A *crash* keeps an arbitrary subset of the pending writes, applies
//! them in an arbitrary order, possibly only in part (whole *tear units*:
//! 512-byte sectors by default, or 4 KiB), drops the rest, and makes the
//! result the new durable image with nothing pending. A
//! [`Disk`](crate::Disk) opened on the device afterwards sees what a node
//! sees after the power came back.
//!
//! It also injects media faults: [`PowerLossDevice::flip_bit`] (silent
//! corruption) and [`PowerLossDevice::fail_reads`] (unreadable sectors).
//!
//! Everything is deterministic given the seed of a crash, and cheap: the
//! image is sparse (4 KiB pages, shared copy-on-write between
//! [`PowerLossDevice::snapshot`]s), so a test can crash the same state in
//! thousands of ways.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::device::Device;

/// Bytes per page of the sparse image.
const PAGE: usize = 4096;

/// One page of the image.
type Page = [u8; PAGE];

/// A sparse image: missing pages read as zeros.
#[derive(Clone, Default)]
struct Image {
    pages: HashMap<u64, Arc<Page>>,
}

impl Image {
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(buf.len() - done);
            match self.pages.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    /// Writes `len` bytes at `offset`, taken from `data` (zeros if `None`).
    fn write(&mut self, data: Option<&[u8]>, offset: u64, len: usize) {
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(len - done);
            if data.is_none() && !self.pages.contains_key(&page) {
                done += n; // zeros over a missing page: nothing to do
                continue;
            }
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| Arc::new([0u8; PAGE]));
            let p = Arc::make_mut(p);
            match data {
                Some(d) => p[within..within + n].copy_from_slice(&d[done..done + n]),
                None => p[within..within + n].fill(0),
            }
            done += n;
        }
    }

    fn flip(&mut self, offset: u64, mask: u8) {
        let (page, within) = (offset / PAGE as u64, (offset % PAGE as u64) as usize);
        let p = self
            .pages
            .entry(page)
            .or_insert_with(|| Arc::new([0u8; PAGE]));
        Arc::make_mut(p)[within] ^= mask;
    }
}

/// The content of a pending write.
#[derive(Clone)]
enum Data {
    Bytes(Arc<[u8]>),
    Zeros(u64),
}

#[derive(Clone)]
struct Pending {
    offset: u64,
    data: Data,
}

impl Pending {
    fn len(&self) -> u64 {
        match &self.data {
            Data::Bytes(b) => b.len() as u64,
            Data::Zeros(n) => *n,
        }
    }

    /// Applies the bytes of `self` within `[from, to)` to `image`.
    fn apply(&self, image: &mut Image, from: u64, to: u64) {
        let skip = (from - self.offset) as usize;
        let n = (to - from) as usize;
        match &self.data {
            Data::Bytes(b) => image.write(Some(&b[skip..skip + n]), from, n),
            Data::Zeros(_) => image.write(None, from, n),
        }
    }
}

/// A write made since the last sync, as listed by
/// [`PowerLossDevice::pending_writes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingWrite {
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Number of tear units it covers (the length of a [`Survivor::units`]
    /// mask for it).
    pub units: usize,
}

/// What of one pending write survives a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survivor {
    /// Index of the pending write (in issue order, from 0).
    pub write: usize,
    /// `None`: the whole write lands. `Some(mask)`: only the tear units
    /// whose entry is `true` land (the write was torn).
    pub units: Option<Vec<bool>>,
}

/// How a crash treats the pending writes: the survivors are applied to the
/// durable image in the order listed; every write not listed is lost.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CrashPlan {
    /// Pending writes that (at least partly) land, in the order they land.
    pub survivors: Vec<Survivor>,
}

/// SplitMix64: a tiny deterministic generator for crash plans.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Inner {
    durable: Image,
    pending: Vec<Pending>,
    /// `durable` with every pending write applied: what reads see.
    current: Image,
    /// Byte ranges whose reads fail with EIO.
    read_faults: Vec<(u64, u64)>,
    syncs: u64,
}

/// An in-memory device that loses unsynced writes on [`crash`]
/// (see the module documentation).
///
/// [`crash`]: PowerLossDevice::crash
pub struct PowerLossDevice {
    size: u64,
    tear_unit: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PowerLossDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("PowerLossDevice")
            .field("size", &self.size)
            .field("tear_unit", &self.tear_unit)
            .field("pending", &g.pending.len())
            .field("syncs", &g.syncs)
            .finish_non_exhaustive()
    }
}

impl PowerLossDevice {
    /// A zeroed device of `size` bytes whose writes tear at 512-byte sectors.
    pub fn new(size: u64) -> Self {
        Self::with_tear_unit(size, 512)
    }

    /// A zeroed device of `size` bytes whose writes tear at `unit`-byte
    /// boundaries (e.g. 512 or 4096; at least 1).
    pub fn with_tear_unit(size: u64, unit: u64) -> Self {
        PowerLossDevice {
            size,
            tear_unit: unit.max(1),
            inner: Mutex::new(Inner {
                durable: Image::default(),
                pending: Vec::new(),
                current: Image::default(),
                read_faults: Vec::new(),
                syncs: 0,
            }),
        }
    }

    /// A device whose durable content is `bytes` (e.g. a disk file made by
    /// another build), tearing at 512-byte sectors.
    pub fn from_image(bytes: &[u8]) -> Self {
        let dev = Self::new(bytes.len() as u64);
        {
            let mut g = dev.lock();
            for (i, page) in bytes.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    g.durable.write(Some(page), (i * PAGE) as u64, page.len());
                }
            }
            g.current = g.durable.clone();
        }
        dev
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current content (what reads see), as one buffer.
    pub fn image(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        self.lock().current.read(&mut out, 0);
        out
    }

    /// An independent copy of this device: same durable image, same pending
    /// writes, same faults. Cheap (pages are shared copy-on-write).
    pub fn snapshot(&self) -> PowerLossDevice {
        let g = self.lock();
        PowerLossDevice {
            size: self.size,
            tear_unit: self.tear_unit,
            inner: Mutex::new(Inner {
                durable: g.durable.clone(),
                pending: g.pending.clone(),
                current: g.current.clone(),
                read_faults: g.read_faults.clone(),
                syncs: g.syncs,
            }),
        }
    }

    /// The writes made since the last sync, in issue order.
    pub fn pending_writes(&self) -> Vec<PendingWrite> {
        let u = self.tear_unit;
        self.lock()
            .pending
            .iter()
            .map(|p| {
                let len = p.len();
                let units = if len == 0 {
                    0
                } else {
                    ((p.offset + len - 1) / u - p.offset / u + 1) as usize
                };
                PendingWrite {
                    offset: p.offset,
                    len,
                    units,
                }
            })
            .collect()
    }

    /// How many times `sync` was called.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// A random crash plan for the current pending writes, determined by
    /// `seed`: each write survives with a probability drawn per crash, the
    /// survivors land in a random order, and some of them are torn.
    pub fn random_plan(&self, seed: u64) -> CrashPlan {
        let writes = self.pending_writes();
        let mut r = SplitMix(seed);
        // Vary how much survives: sometimes nearly all, sometimes nearly none.
        let keep_per_mille = r.below(1001);
        let tear_per_mille = [0, 100, 300][r.below(3) as usize];
        let mut survivors: Vec<Survivor> = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            if r.below(1000) >= keep_per_mille {
                continue;
            }
            let units = (w.units > 1 && r.below(1000) < tear_per_mille)
                .then(|| (0..w.units).map(|_| r.below(2) == 0).collect());
            survivors.push(Survivor { write: i, units });
        }
        // Fisher-Yates: any order.
        for i in (1..survivors.len()).rev() {
            let j = r.below(i as u64 + 1) as usize;
            survivors.swap(i, j);
        }
        CrashPlan { survivors }
    }

    /// Power loss, decided by `seed` (see [`PowerLossDevice::random_plan`]).
    pub fn crash(&self, seed: u64) {
        let plan = self.random_plan(seed);
        self.crash_with(&plan);
    }

    /// Power loss as `plan` says: its survivors land on the durable image in
    /// its order, every other pending write is lost, and nothing is pending
    /// afterwards. Survivors naming no pending write are ignored.
    pub fn crash_with(&self, plan: &CrashPlan) {
        let u = self.tear_unit;
        let mut g = self.lock();
        let mut image = g.durable.clone();
        for s in &plan.survivors {
            let Some(p) = g.pending.get(s.write) else {
                continue;
            };
            let (start, end) = (p.offset, p.offset + p.len());
            match &s.units {
                None => p.apply(&mut image, start, end),
                Some(mask) => {
                    for (k, &lands) in mask.iter().enumerate() {
                        let from = (start / u + k as u64) * u;
                        let (from, to) = (from.max(start), (from + u).min(end));
                        if lands && from < to {
                            p.apply(&mut image, from, to);
                        }
                    }
                }
            }
        }
        g.current = image.clone();
        g.durable = image;
        g.pending.clear();
    }

    /// Silent media corruption: flips bit `bit` (0..8) of the byte at
    /// `offset`, in the durable image and in what reads see.
    pub fn flip_bit(&self, offset: u64, bit: u8) {
        let mask = 1u8 << (bit % 8);
        let mut g = self.lock();
        g.durable.flip(offset, mask);
        g.current.flip(offset, mask);
    }

    /// A media error: reads that touch `[offset, offset + len)` fail with
    /// EIO until [`PowerLossDevice::clear_read_faults`].
    pub fn fail_reads(&self, offset: u64, len: u64) {
        self.lock().read_faults.push((offset, offset + len));
    }

    /// Forgets every [`PowerLossDevice::fail_reads`].
    pub fn clear_read_faults(&self) {
        self.lock().read_faults.clear();
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "access beyond the end of the device",
            )),
        }
    }

    fn push(&self, offset: u64, data: Data) {
        let p = Pending { offset, data };
        let mut g = self.lock();
        p.apply(&mut g.current, offset, offset + p.len());
        g.pending.push(p);
    }
}

impl Device for PowerLossDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let g = self.lock();
        let end = offset + buf.len() as u64;
        if g.read_faults.iter().any(|&(a, b)| a < end && offset < b) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        g.current.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        if !buf.is_empty() {
            self.push(offset, Data::Bytes(Arc::from(buf)));
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        if len > 0 {
            self.push(offset, Data::Zeros(len));
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut g = self.lock();
        g.durable = g.current.clone();
        g.pending.clear();
        g.syncs += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &PowerLossDevice, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn reads_see_pending_writes_and_sync_makes_them_durable() {
        let d = PowerLossDevice::new(1 << 20);
        d.write_at(&[1; 1000], 100).unwrap();
        assert_eq!(read(&d, 100, 1000), vec![1; 1000]);
        d.sync().unwrap();
        d.write_at(&[2; 10], 200).unwrap();
        d.zero(300, 10).unwrap();
        assert_eq!(d.pending_writes().len(), 2);
        let lost = d.snapshot();
        lost.crash_with(&CrashPlan::default());
        assert_eq!(read(&lost, 100, 1000), vec![1; 1000]);
        let kept = d.snapshot();
        kept.crash_with(&CrashPlan {
            survivors: vec![
                Survivor {
                    write: 1,
                    units: None,
                },
                Survivor {
                    write: 0,
                    units: None,
                },
            ],
        });
        assert_eq!(read(&kept, 200, 10), vec![2; 10]);
        assert_eq!(read(&kept, 300, 10), vec![0; 10]);
        assert!(kept.pending_writes().is_empty());
        // The original is untouched by its snapshots' crashes.
        assert_eq!(read(&d, 200, 10), vec![2; 10]);
        assert_eq!(d.sync_count(), 1);
    }

    #[test]
    fn any_order_and_torn_writes() {
        let d = PowerLossDevice::new(8192);
        d.write_at(&[1; 2048], 0).unwrap();
        d.write_at(&[2; 2048], 0).unwrap();
        let w = d.pending_writes();
        assert_eq!(w[0].units, 4);
        // The older write lands last: old data over new.
        let c = d.snapshot();
        c.crash_with(&CrashPlan {
            survivors: vec![
                Survivor {
                    write: 1,
                    units: None,
                },
                Survivor {
                    write: 0,
                    units: None,
                },
            ],
        });
        assert_eq!(read(&c, 0, 2048), vec![1; 2048]);
        // A torn write: only sectors 1 and 3 land.
        let c = d.snapshot();
        c.crash_with(&CrashPlan {
            survivors: vec![Survivor {
                write: 1,
                units: Some(vec![false, true, false, true]),
            }],
        });
        let got = read(&c, 0, 2048);
        assert_eq!(got[..512], [0; 512]);
        assert_eq!(got[512..1024], [2; 512]);
        assert_eq!(got[1024..1536], [0; 512]);
        assert_eq!(got[1536..], [2; 512]);
    }

    #[test]
    fn unaligned_writes_tear_at_unit_boundaries() {
        let d = PowerLossDevice::with_tear_unit(8192, 4096);
        d.write_at(&[7; 100], 4090).unwrap();
        assert_eq!(d.pending_writes()[0].units, 2);
        d.crash_with(&CrashPlan {
            survivors: vec![Survivor {
                write: 0,
                units: Some(vec![false, true]),
            }],
        });
        assert_eq!(read(&d, 4090, 6), vec![0; 6]);
        assert_eq!(read(&d, 4096, 94), vec![7; 94]);
    }

    #[test]
    fn random_crashes_are_deterministic() {
        let d = PowerLossDevice::new(1 << 16);
        for i in 0..20u8 {
            d.write_at(&[i; 700], u64::from(i) * 1000).unwrap();
        }
        assert_eq!(d.random_plan(42), d.random_plan(42));
        let (a, b) = (d.snapshot(), d.snapshot());
        a.crash(7);
        b.crash(7);
        assert_eq!(a.image(), b.image());
    }

    #[test]
    fn faults() {
        let d = PowerLossDevice::from_image(&[0xffu8; 8192]);
        d.flip_bit(10, 0);
        assert_eq!(read(&d, 10, 1), vec![0xfe]);
        d.crash(1);
        assert_eq!(read(&d, 10, 1), vec![0xfe]);
        d.fail_reads(4000, 200);
        let mut b = [0u8; 100];
        assert!(d.read_at(&mut b, 4100).is_err());
        assert!(d.read_at(&mut b, 0).is_ok());
        d.clear_read_faults();
        assert!(d.read_at(&mut b, 4100).is_ok());
        assert!(d.read_at(&mut b, 8100).is_err());
        assert!(d.write_at(&b, 8100).is_err());
    }
}
