//! Formatting a device and opening a formatted one (superblock selection,
//! table scans, repair of what power loss can leave behind).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::{DeviceKind, Disk, FormatOptions};
use crate::legacy_v1::layout::{check_extent_size, Layout, LayoutError, DEFAULT_EPOCH_SLOTS};
use crate::legacy_v1::record::{EpochSlot, ExtentRecord, ENTRY_SIZE};
use crate::legacy_v1::state::{ChunkKey, State};
use crate::legacy_v1::superblock::SUPERBLOCK_SIZE;
use crate::legacy_v1::superblock::{has_magic, Superblock, SuperblockError, SUPERBLOCK_OFFSETS};
use crate::legacy_v1::{sys, Error};

/// Entries read or written per table I/O (1 MiB).
const TABLE_BATCH: u64 = 16384;
/// Damaged entries logged one by one before only a summary is logged.
const WARN_LIMIT: u64 = 16;

/// An open, exclusively locked device.
struct Device {
    file: File,
    kind: DeviceKind,
    size: u64,
}

impl Device {
    /// Opens `path` read-write (creating a regular file if `create`) and
    /// takes the exclusive lock.
    fn open(path: &Path, create: bool) -> Result<Device, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(Error::io("open the device"))?;
        if !sys::try_lock_exclusive(&file).map_err(Error::io("lock the device"))? {
            return Err(Error::Locked);
        }
        let meta = file.metadata().map_err(Error::io("stat the device"))?;
        let (kind, size) = if meta.file_type().is_block_device() {
            let size =
                sys::block_device_size(&file).map_err(Error::io("get the block device's size"))?;
            (DeviceKind::BlockDevice, size)
        } else if meta.is_file() {
            (DeviceKind::File, meta.len())
        } else {
            return Err(Error::UnsupportedDevice);
        };
        Ok(Device { file, kind, size })
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_padded(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        buf.fill(0);
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file
            .read_exact_at(&mut buf[..avail], offset)
            .map_err(Error::io("read a superblock"))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn layout_error(e: LayoutError) -> Error {
    match e {
        LayoutError::InvalidExtentSize(extent_size) => Error::InvalidExtentSize { extent_size },
        LayoutError::TooSmall => Error::TooSmall,
        LayoutError::Inconsistent(_) => Error::BadSuperblock(SuperblockError::Geometry(e)),
    }
}

/// Writes `count` table entries from `offset` in 1 MiB batches.
fn write_table(
    file: &File,
    offset: u64,
    count: u64,
    encode: impl Fn(u64) -> [u8; ENTRY_SIZE],
) -> Result<(), Error> {
    let mut buf = Vec::with_capacity((TABLE_BATCH as usize) * ENTRY_SIZE);
    let mut i = 0;
    while i < count {
        let n = (count - i).min(TABLE_BATCH);
        buf.clear();
        (i..i + n).for_each(|j| buf.extend_from_slice(&encode(j)));
        file.write_all_at(&buf, offset + i * ENTRY_SIZE as u64)
            .map_err(Error::io("write a metadata table"))?;
        i += n;
    }
    Ok(())
}

/// Calls `visit(index, entry bytes)` for `count` entries from `offset`.
fn scan_table(
    file: &File,
    offset: u64,
    count: u64,
    mut visit: impl FnMut(u64, &[u8]),
) -> Result<(), Error> {
    let mut buf = vec![0u8; (TABLE_BATCH as usize) * ENTRY_SIZE];
    let mut i = 0;
    while i < count {
        let n = (count - i).min(TABLE_BATCH);
        let bytes = &mut buf[..n as usize * ENTRY_SIZE];
        file.read_exact_at(bytes, offset + i * ENTRY_SIZE as u64)
            .map_err(Error::io("read a metadata table"))?;
        for (j, entry) in bytes.chunks_exact(ENTRY_SIZE).enumerate() {
            visit(i + j as u64, entry);
        }
        i += n;
    }
    Ok(())
}

impl Disk {
    /// Formats the device or file at `path` and opens it.
    ///
    /// Refuses a device that carries a Tessera superblock (either copy)
    /// unless `opts.force`. Regular files are created with `opts.size` if
    /// missing or empty, then preallocated (fallocate, else set_len).
    pub fn format(path: &Path, opts: &FormatOptions) -> Result<Disk, Error> {
        check_extent_size(opts.extent_size).map_err(layout_error)?;
        let mut dev = Device::open(path, opts.size.is_some())?;
        if !opts.force {
            let mut sb = [0u8; SUPERBLOCK_SIZE];
            for off in SUPERBLOCK_OFFSETS {
                dev.read_padded(&mut sb, off)?;
                if has_magic(&sb) {
                    return Err(Error::AlreadyFormatted);
                }
            }
        }
        if dev.kind == DeviceKind::File && dev.size == 0 {
            dev.size = opts.size.ok_or(Error::TooSmall)?;
        }
        let layout = Layout::compute(dev.size, opts.extent_size, DEFAULT_EPOCH_SLOTS)
            .map_err(layout_error)?;
        if dev.kind == DeviceKind::File {
            match sys::fallocate(&dev.file, 0, 0, dev.size) {
                Ok(()) => {}
                Err(e) if sys::is_unsupported(&e) => dev
                    .file
                    .set_len(dev.size)
                    .map_err(Error::io("set the file's size"))?,
                Err(e) => return Err(Error::io("preallocate the file")(e)),
            }
        }
        let sb = Superblock {
            disk_uuid: opts.disk_uuid,
            flags: 0,
            created: now(),
            layout,
        };
        let f = &dev.file;
        let sync = |f: &File| f.sync_data().map_err(Error::io("flush the device"));
        // Invalidate the old identity first: a crash mid-format leaves a
        // device that is "not Tessera", never old superblock + new tables.
        f.write_all_at(&[0u8; 2 * SUPERBLOCK_SIZE], 0)
            .map_err(Error::io("clear the superblocks"))?;
        sync(f)?;
        let slots = u64::from(layout.epoch_slots);
        write_table(f, layout.epoch_table_offset, slots, |s| {
            EpochSlot::Free.encode(s as u32)
        })?;
        write_table(f, layout.extent_table_offset, layout.extents_total, |e| {
            ExtentRecord::Free { generation: 0 }.encode(e)
        })?;
        sync(f)?;
        let block = sb.encode();
        for off in SUPERBLOCK_OFFSETS {
            f.write_all_at(&block, off)
                .map_err(Error::io("write a superblock"))?;
        }
        sync(f)?;
        tracing::info!(path = %path.display(), uuid = %opts.disk_uuid,
            extents = layout.extents_total, extent_size = layout.extent_size, "formatted disk");
        Self::load(path, dev)
    }

    /// Opens a formatted device: validates the superblock (falling back to
    /// the backup copy), scans the epoch and extent tables and rebuilds the
    /// in-memory state. Fails with [`Error::Locked`] if it is already open.
    pub fn open(path: &Path) -> Result<Disk, Error> {
        let dev = Device::open(path, false)?;
        Self::load(path, dev)
    }

    fn load(path: &Path, dev: Device) -> Result<Disk, Error> {
        let sb = read_superblock(&dev)?;
        if sb.layout.device_size > dev.size {
            return Err(Error::BadSuperblock(SuperblockError::DeviceShrunk {
                recorded: sb.layout.device_size,
                actual: dev.size,
            }));
        }
        let mut state = State::new();
        let mut slot_fixes = Vec::new();
        scan_epochs(&dev.file, &sb.layout, &mut state, &mut slot_fixes)?;
        let extent_fixes = scan_extents(&dev.file, &sb.layout, &mut state)?;
        state.finish_load();
        let disk = Disk::new(path, dev.file, dev.kind, sb, state)?;
        for s in slot_fixes {
            disk.write_slot(s, &EpochSlot::Free)?;
        }
        let generation = disk.state().high_generation();
        for e in extent_fixes {
            disk.write_extent_record(e, &ExtentRecord::Free { generation })?;
        }
        tracing::debug!(path = %path.display(), uuid = %disk.uuid(), "opened disk");
        Ok(disk)
    }
}

/// Picks a valid superblock copy, repairing the other one if needed.
fn read_superblock(dev: &Device) -> Result<Superblock, Error> {
    let mut raw = [[0u8; SUPERBLOCK_SIZE]; 2];
    for (buf, off) in raw.iter_mut().zip(SUPERBLOCK_OFFSETS) {
        dev.read_padded(buf, off)?;
    }
    let [primary, backup] = [Superblock::decode(&raw[0]), Superblock::decode(&raw[1])];
    let rewrite = |from: usize, to: usize| {
        dev.file
            .write_all_at(&raw[from], SUPERBLOCK_OFFSETS[to])
            .map_err(Error::io("repair a superblock copy"))
    };
    match (primary, backup) {
        (Err(SuperblockError::UnsupportedVersion(found)), _)
        | (_, Err(SuperblockError::UnsupportedVersion(found))) => {
            Err(Error::UnsupportedVersion { found })
        }
        (Ok(p), backup) => {
            if backup.as_ref() != Ok(&p) {
                tracing::warn!(reason = ?backup.err(), "backup superblock differs from the primary; rewriting it");
                rewrite(0, 1)?;
            }
            Ok(p)
        }
        (Err(why), Ok(b)) => {
            tracing::warn!(reason = %why, "primary superblock is damaged; using the backup copy and rewriting the primary");
            rewrite(1, 0)?;
            Ok(b)
        }
        (Err(SuperblockError::NoMagic), Err(SuperblockError::NoMagic)) => Err(Error::NotTessera),
        (Err(SuperblockError::NoMagic), Err(why)) | (Err(why), Err(_)) => {
            Err(Error::BadSuperblock(why))
        }
    }
}

/// Logs a damaged table entry (the first few individually).
fn warn_damaged(what: &str, index: u64, seen: u64, err: &dyn std::fmt::Display) {
    if seen < WARN_LIMIT {
        tracing::warn!(table = what, index, error = %err, "quarantining a damaged table entry");
    } else if seen == WARN_LIMIT {
        tracing::warn!(table = what, "more damaged entries; not logging each");
    }
}

/// Loads the epoch table; duplicate slots of one vDisk go to `fixes`.
fn scan_epochs(
    file: &File,
    l: &Layout,
    state: &mut State,
    fixes: &mut Vec<u32>,
) -> Result<(), Error> {
    let mut seen: HashMap<Uuid, (u32, u64)> = HashMap::new();
    let mut damaged = 0;
    scan_table(file, l.epoch_table_offset, l.epoch_slots.into(), |i, b| {
        let s = i as u32;
        match EpochSlot::decode(b, s) {
            Ok(EpochSlot::Free) => state.load_free_slot(s),
            Ok(EpochSlot::Used { vdisk, epoch }) => match seen.entry(vdisk) {
                Entry::Vacant(v) => {
                    v.insert((s, epoch));
                }
                Entry::Occupied(mut o) => {
                    tracing::warn!(%vdisk, "two epoch slots for one vdisk; keeping the higher epoch");
                    let loser = if epoch > o.get().1 {
                        o.insert((s, epoch)).0
                    } else {
                        s
                    };
                    fixes.push(loser);
                    state.load_free_slot(loser);
                }
            },
            Err(e) => {
                warn_damaged("epoch", i, damaged, &e);
                damaged += 1;
                state.load_quarantined_slot();
            }
        }
    })?;
    for (vdisk, (slot, epoch)) in seen {
        state.load_epoch(vdisk, slot, epoch);
    }
    Ok(())
}

/// Loads the extent table; returns the extents of records that lost a
/// duplicate claim and must be rewritten as free.
fn scan_extents(file: &File, l: &Layout, state: &mut State) -> Result<Vec<u64>, Error> {
    let mut owners: HashMap<ChunkKey, (u64, u64)> = HashMap::new();
    let mut losers = Vec::new();
    let mut max_generation = 0;
    let mut damaged = 0;
    scan_table(
        file,
        l.extent_table_offset,
        l.extents_total,
        |e, b| match ExtentRecord::decode(b, e) {
            Ok(ExtentRecord::Free { generation }) => {
                max_generation = max_generation.max(generation);
                state.load_free_extent(e);
            }
            Ok(ExtentRecord::Used {
                vdisk,
                chunk,
                generation,
            }) => {
                max_generation = max_generation.max(generation);
                match owners.entry((vdisk, chunk)) {
                    Entry::Vacant(v) => {
                        v.insert((e, generation));
                    }
                    Entry::Occupied(mut o) => {
                        tracing::warn!(%vdisk, chunk, "two extents claim one chunk; keeping the newer generation");
                        let loser = if generation > o.get().1 {
                            o.insert((e, generation)).0
                        } else {
                            e
                        };
                        losers.push(loser);
                        state.load_free_extent(loser);
                    }
                }
            }
            Err(err) => {
                warn_damaged("extent", e, damaged, &err);
                damaged += 1;
                state.load_quarantined_extent();
            }
        },
    )?;
    for (key, (extent, generation)) in owners {
        state.load_chunk(key, extent, generation);
    }
    state.load_next_generation(max_generation.saturating_add(1));
    Ok(losers)
}
