//! Formatting a device and opening a formatted one: superblock selection and
//! upgrade, table scans that combine the copies of every entry, and the
//! repair of what power loss or damage can leave behind.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::{thin, Disk, FormatOptions};
use crate::device::{Device, FileDevice};
use crate::layout::{check_extent_size, Layout, LayoutError, DEFAULT_EPOCH_SLOTS};
use crate::record::{owner_tag, EpochSlot, ExtentRecord, RecordError, Stamp, ENTRY_SIZE};
use crate::state::{ChunkKey, State};
use crate::superblock::SUPERBLOCK_SIZE;
use crate::superblock::{has_magic, Superblock, SuperblockError, SUPERBLOCK_OFFSETS};
use crate::{Error, BLOCK_SIZE, EXTENT_FORMAT_VERSION, FORMAT_VERSION};

/// Entries read or written per table I/O (1 MiB).
const TABLE_BATCH: u64 = 16384;
/// Damaged entries logged one by one before only a summary is logged.
const WARN_LIMIT: u64 = 16;
/// Allocation generations reserved by one superblock write.
const GENERATION_RESERVE: u64 = 1 << 32;
/// Unit of a media error.
const SECTOR: usize = crate::SECTOR_SIZE as usize;

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

/// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
fn read_padded(dev: &dyn Device, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    buf.fill(0);
    let avail = dev.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    dev.read_at(&mut buf[..avail], offset)
}

/// Whether either superblock copy carries the Tessera magic.
fn has_superblock(dev: &dyn Device) -> Result<bool, Error> {
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    for off in SUPERBLOCK_OFFSETS {
        read_padded(dev, &mut sb, off).map_err(Error::io("read a superblock"))?;
        if has_magic(&sb) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes `count` table entries from `offset` in 1 MiB batches.
fn write_table(
    dev: &dyn Device,
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
        dev.write_at(&buf, offset + i * ENTRY_SIZE as u64)
            .map_err(Error::io("write a metadata table"))?;
        i += n;
    }
    Ok(())
}

/// Reads one batch of table entries into `buf`; returns, per 512-byte
/// sector, whether it could be read (a media error spoils only its own
/// sectors).
fn read_batch(dev: &dyn Device, buf: &mut [u8], offset: u64) -> Vec<bool> {
    let sectors = buf.len().div_ceil(SECTOR);
    if dev.read_at(buf, offset).is_ok() {
        return vec![true; sectors];
    }
    buf.chunks_mut(SECTOR)
        .enumerate()
        .map(|(i, sector)| dev.read_at(sector, offset + (i * SECTOR) as u64).is_ok())
        .collect()
}

/// Calls `visit(index, entries)` for `count` entries of a table kept in
/// copies at `offsets`; `entries[c]` is copy `c`'s bytes, `None` if they
/// could not be read.
fn scan_copies(
    dev: &dyn Device,
    offsets: &[u64],
    count: u64,
    mut visit: impl FnMut(u64, &[Option<&[u8]>]),
) {
    let mut bufs = vec![vec![0u8; (TABLE_BATCH as usize) * ENTRY_SIZE]; offsets.len()];
    let per_sector = SECTOR / ENTRY_SIZE;
    let mut i = 0;
    while i < count {
        let n = (count - i).min(TABLE_BATCH) as usize;
        let readable: Vec<Vec<bool>> = bufs
            .iter_mut()
            .zip(offsets)
            .map(|(buf, &off)| {
                read_batch(dev, &mut buf[..n * ENTRY_SIZE], off + i * ENTRY_SIZE as u64)
            })
            .collect();
        let mut entries: Vec<Option<&[u8]>> = Vec::with_capacity(offsets.len());
        for j in 0..n {
            entries.clear();
            for (c, buf) in bufs.iter().enumerate() {
                let ok = readable[c][j / per_sector];
                entries.push(ok.then(|| &buf[j * ENTRY_SIZE..(j + 1) * ENTRY_SIZE]));
            }
            visit(i + j as u64, &entries);
        }
        i += n as u64;
    }
}

/// Logs a damaged table entry (the first few individually).
fn warn_damaged(what: &str, index: u64, seen: u64, err: &dyn std::fmt::Display) {
    if seen < WARN_LIMIT {
        tracing::warn!(table = what, index, error = %err, "a table entry is damaged in every copy");
    } else if seen == WARN_LIMIT {
        tracing::warn!(table = what, "more damaged entries; not logging each");
    }
}

/// Why an entry copy could not be used.
enum Bad {
    Unreadable,
    Invalid(RecordError),
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Unreadable => f.write_str("unreadable"),
            Bad::Invalid(e) => e.fmt(f),
        }
    }
}

/// Decodes every copy of one entry.
fn decode_copies<T>(
    entries: &[Option<&[u8]>],
    decode: impl Fn(&[u8], u8) -> Result<T, RecordError>,
) -> Vec<Result<T, Bad>> {
    entries
        .iter()
        .enumerate()
        .map(|(c, e)| match e {
            None => Err(Bad::Unreadable),
            Some(b) => decode(b, c as u8).map_err(Bad::Invalid),
        })
        .collect()
}

/// Of the valid copies of one epoch slot, the one to believe (see the
/// crate documentation: a lost marker wins, then a used slot over a free
/// one, then the higher epoch; copies naming different vDisks: the primary).
fn combine_slots(valid: &[EpochSlot]) -> EpochSlot {
    let mut best = valid[0];
    for &s in &valid[1..] {
        best = match (best, s) {
            (EpochSlot::Lost { serial: a }, EpochSlot::Lost { serial: b }) => {
                EpochSlot::Lost { serial: a.max(b) }
            }
            (l @ EpochSlot::Lost { .. }, _) | (_, l @ EpochSlot::Lost { .. }) => l,
            (EpochSlot::Free, o) | (o, EpochSlot::Free) => o,
            (
                a @ EpochSlot::Used {
                    vdisk: va,
                    epoch: ea,
                    trust: ta,
                    ..
                },
                b @ EpochSlot::Used {
                    vdisk: vb,
                    epoch: eb,
                    trust: tb,
                    ..
                },
            ) => {
                if va != vb || ea > eb || (ea == eb && ta <= tb) {
                    a
                } else {
                    b
                }
            }
        };
    }
    best
}

/// What the scans found that must be written back once the disk is open.
#[derive(Default)]
struct Fixes {
    /// Epoch slot copies to rewrite with the believed value: (copy, slot, value).
    slot_copies: Vec<(usize, u32, EpochSlot)>,
    /// Slots to rewrite free in every copy (a vDisk's duplicate slot).
    free_slots: Vec<u32>,
    /// Slots damaged in every copy: they get lost markers.
    lost_slots: Vec<u32>,
    /// Extent record copies to rewrite: (copy, extent, value).
    extent_copies: Vec<(usize, u64, ExtentRecord)>,
    /// Extents to rewrite free in every copy (duplicate claims, damaged
    /// extents known to hold nothing that is needed).
    free_extents: Vec<u64>,
}

impl Disk {
    /// Formats the device or file at `path` and opens it.
    ///
    /// Refuses a device that carries a Tessera superblock (either copy)
    /// unless `opts.force`. Regular files are created with `opts.size` if
    /// missing or empty, then preallocated (fallocate, else set_len).
    pub fn format(path: &Path, opts: &FormatOptions) -> Result<Disk, Error> {
        check_extent_size(opts.extent_size).map_err(layout_error)?;
        let mut dev = FileDevice::open_with(path, opts.size.is_some())?;
        if !opts.force && has_superblock(&dev)? {
            return Err(Error::AlreadyFormatted);
        }
        let size = if dev.is_empty_file() {
            opts.size.ok_or(Error::TooSmall)?
        } else {
            dev.size()
        };
        if opts.thin {
            Layout::compute_thin(size, opts.extent_size, DEFAULT_EPOCH_SLOTS)
        } else {
            Layout::compute(size, opts.extent_size, DEFAULT_EPOCH_SLOTS)
        }
        .map_err(layout_error)?;
        dev.preallocate(size)?;
        Self::format_on(path, Arc::new(dev), opts, DEFAULT_EPOCH_SLOTS, false)
    }

    /// Formats `device` and opens it (same rules as [`Disk::format`];
    /// `opts.size` is ignored).
    pub fn format_device(device: Arc<dyn Device>, opts: &FormatOptions) -> Result<Disk, Error> {
        Self::format_device_with_slots(device, opts, DEFAULT_EPOCH_SLOTS)
    }

    /// [`Disk::format_device`] with `epoch_slots` slots in the epoch table
    /// instead of 16384 (small disks for tests and simulations; the slot
    /// count bounds the vDisks one disk can hold).
    pub fn format_device_with_slots(
        device: Arc<dyn Device>,
        opts: &FormatOptions,
        epoch_slots: u32,
    ) -> Result<Disk, Error> {
        check_extent_size(opts.extent_size).map_err(layout_error)?;
        if epoch_slots == 0 {
            return Err(Error::TooSmall);
        }
        Self::format_on(Path::new(""), device, opts, epoch_slots, !opts.force)
    }

    fn format_on(
        path: &Path,
        dev: Arc<dyn Device>,
        opts: &FormatOptions,
        epoch_slots: u32,
        refuse_existing: bool,
    ) -> Result<Disk, Error> {
        if refuse_existing && has_superblock(&*dev)? {
            return Err(Error::AlreadyFormatted);
        }
        let layout = if opts.thin {
            Layout::compute_thin(dev.size(), opts.extent_size, epoch_slots)
        } else {
            Layout::compute(dev.size(), opts.extent_size, epoch_slots)
        }
        .map_err(layout_error)?;
        let sb = Superblock {
            version: if opts.thin {
                FORMAT_VERSION
            } else {
                EXTENT_FORMAT_VERSION
            },
            upgraded_from: 0,
            generation_floor: 0,
            disk_uuid: opts.disk_uuid,
            flags: 0,
            created: now(),
            layout,
        };
        let d = &*dev;
        let sync = || d.sync().map_err(Error::io("flush the device"));
        // Invalidate the old identity first: a crash mid-format leaves a
        // device that is "not Tessera", never old superblock + new tables.
        d.write_at(&[0u8; 2 * SUPERBLOCK_SIZE], 0)
            .map_err(Error::io("clear the superblocks"))?;
        sync()?;
        for (copy, table) in layout.epoch_tables().into_iter().enumerate() {
            write_table(d, table, epoch_slots.into(), |s| {
                EpochSlot::Free.encode(s as u32, copy as u8)
            })?;
        }
        for (copy, table) in layout.extent_tables().into_iter().enumerate() {
            write_table(d, table, layout.extents_total, |e| {
                ExtentRecord::Free { generation: 0 }.encode(e, copy as u8)
            })?;
        }
        // No stamps yet: an all-zero stamp means "never allocated".
        d.zero(layout.crc_table_offset, layout.crc_table_len)
            .map_err(Error::io("clear the crc table"))?;
        if let Some(t) = &layout.thin {
            thin::Thin::format(d, t)?;
        }
        sync()?;
        let block = sb.encode();
        for off in SUPERBLOCK_OFFSETS {
            d.write_at(&block, off)
                .map_err(Error::io("write a superblock"))?;
        }
        sync()?;
        tracing::info!(path = %path.display(), uuid = %opts.disk_uuid,
            extents = layout.extents_total, extent_size = layout.extent_size, "formatted disk");
        Self::load(path, dev)
    }

    /// Opens a formatted device: validates the superblock (falling back to
    /// the backup copy), upgrades a version-1 disk, scans the epoch and
    /// extent tables and rebuilds the in-memory state. Fails with
    /// [`Error::Locked`] if it is already open.
    pub fn open(path: &Path) -> Result<Disk, Error> {
        let dev = FileDevice::open(path)?;
        Self::load(path, Arc::new(dev))
    }

    /// Opens a formatted `device` (see [`Disk::open`]); [`Disk::path`] is
    /// empty. Nothing locks the device: the caller makes sure that no other
    /// `Disk` uses it meanwhile.
    pub fn open_device(device: Arc<dyn Device>) -> Result<Disk, Error> {
        Self::load(Path::new(""), device)
    }

    fn load(path: &Path, dev: Arc<dyn Device>) -> Result<Disk, Error> {
        let mut sb = read_superblock(&*dev)?;
        if sb.layout.device_size > dev.size() {
            return Err(Error::BadSuperblock(SuperblockError::DeviceShrunk {
                recorded: sb.layout.device_size,
                actual: dev.size(),
            }));
        }
        if sb.version < EXTENT_FORMAT_VERSION {
            sb = upgrade(&*dev, sb)?;
        }
        let l = sb.layout;
        let mut state = State::new();
        let mut fixes = Fixes::default();
        scan_epochs(&*dev, &l, &mut state, &mut fixes);
        let mut thin = None;
        let mut floor = sb.generation_floor;
        if l.thin.is_some() {
            let salt = crate::crcjournal::salt(sb.disk_uuid, sb.created);
            let (t, loaded) = thin::Thin::load(&*dev, &l, salt);
            tracing::info!(
                checkpoint = loaded.checkpoint_seq,
                pages = loaded.pages_replayed,
                records = loaded.records_replayed,
                crcs = loaded.crcs_replayed,
                "read the block map"
            );
            if loaded.lost {
                tracing::error!(
                    inconsistent = loaded.inconsistent,
                    "the block map was not read back whole: every chunk reads as an error until it is written whole"
                );
                state.load_index_lost();
                for key in &loaded.trusted {
                    state.load_trusted(*key);
                }
            }
            floor = floor.max(loaded.generation_floor);
            thin = Some(t);
        } else {
            scan_extents(&*dev, &l, &mut state, &mut fixes);
        }
        // Allocations made before a crash may have lost their records but
        // left blocks tagged with their generations: start above every
        // generation an earlier open may have handed out.
        state.load_next_generation(state.next_generation().max(floor));
        state.finish_load();
        let disk = Disk::new(path, dev, sb, state, thin);
        disk.apply(&fixes);
        // What was read may still be only in the page cache (after kill -9):
        // make it durable before anything is decided on it. Then reserve
        // the generations this session may hand out.
        disk.sync("flush the opened disk (fdatasync)")?;
        disk.reserve_generations()?;
        if let Some(t) = &disk.thin {
            // The map as read, as the log's new start (see `Thin::load`).
            let mut ix = t.index();
            disk.checkpoint_locked(&mut ix)?;
            t.note_durable
                .store(true, std::sync::atomic::Ordering::Release);
        }
        tracing::debug!(path = %path.display(), uuid = %disk.uuid(), "opened disk");
        Ok(disk)
    }

    /// Writes back what the scans found. Best effort: a repair that cannot
    /// be written leaves the disk as it was, and the next open finds the
    /// same thing again (every decision above is remade from the disk).
    fn apply(&self, f: &Fixes) {
        let log = |r: Result<(), Error>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot repair a table entry");
            }
        };
        for &(copy, s, slot) in &f.slot_copies {
            log(self.write_slot_copy(copy, s, &slot));
        }
        for &s in &f.free_slots {
            log(self.write_slot(s, &EpochSlot::Free));
        }
        let serial = self.state().loss_serial();
        for &s in &f.lost_slots {
            log(self.write_slot(s, &EpochSlot::Lost { serial }));
        }
        for &(copy, e, rec) in &f.extent_copies {
            log(self.write_extent_record_copy(copy, e, &rec));
        }
        let generation = self.state().high_generation();
        for &e in &f.free_extents {
            log(self.write_extent_record(e, &ExtentRecord::Free { generation }));
        }
    }
}

impl Disk {
    /// Reserves the next [`GENERATION_RESERVE`] allocation generations: the
    /// superblocks record the floor the next open starts from (primary,
    /// sync, backup, sync), so that no generation is ever handed out twice,
    /// even when a crash loses every record that carried it.
    pub(super) fn reserve_generations(&self) -> Result<(), Error> {
        let _one = self
            .reserving
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ceiling = self
            .state()
            .next_generation()
            .saturating_add(GENERATION_RESERVE);
        let block = Superblock {
            generation_floor: ceiling,
            ..self.sb.clone()
        }
        .encode();
        for off in SUPERBLOCK_OFFSETS {
            self.write_at(&block, off, "write a superblock")?;
            self.sync("flush a superblock (fdatasync)")?;
        }
        self.state().set_generation_ceiling(ceiling);
        Ok(())
    }

    /// Reserves more generations if fewer than half a reservation are left
    /// (every 2^31 allocations: in practice never).
    pub(super) fn reserve_generations_if_low(&self) -> Result<(), Error> {
        if self.state().generations_left() < GENERATION_RESERVE / 2 {
            self.reserve_generations()?;
        }
        Ok(())
    }
}

/// Picks a valid superblock copy, repairing the other one if needed.
fn read_superblock(dev: &dyn Device) -> Result<Superblock, Error> {
    let mut raw = [[0u8; SUPERBLOCK_SIZE]; 2];
    let mut decoded = Vec::with_capacity(2);
    for (buf, off) in raw.iter_mut().zip(SUPERBLOCK_OFFSETS) {
        decoded.push(match read_padded(dev, buf, off) {
            Ok(()) => Superblock::decode(buf),
            Err(e) => {
                tracing::warn!(offset = off, error = %e, "cannot read a superblock copy");
                Err(SuperblockError::Unreadable)
            }
        });
    }
    let backup = decoded.pop().expect("two copies");
    let primary = decoded.pop().expect("two copies");
    let rewrite = |from: usize, to: usize| {
        dev.write_at(&raw[from], SUPERBLOCK_OFFSETS[to])
            .map_err(Error::io("repair a superblock copy"))
    };
    match (primary, backup) {
        (Err(SuperblockError::UnsupportedVersion(found)), _)
        | (_, Err(SuperblockError::UnsupportedVersion(found))) => {
            Err(Error::UnsupportedVersion { found })
        }
        (Ok(mut p), backup) => {
            if backup.as_ref() != Ok(&p) {
                tracing::warn!(reason = ?backup.as_ref().err(), "backup superblock differs from the primary; rewriting it");
                rewrite(0, 1)?;
            }
            // Never below a floor either copy recorded.
            if let Ok(b) = backup {
                p.generation_floor = p.generation_floor.max(b.generation_floor);
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

/// Upgrades a version-1 disk to the current version in place: the geometry
/// stays (one copy of each table, no stamps), the superblocks say version 2
/// so that a version-1 build refuses the disk (it would misread the tagged
/// crcs of extents allocated from now on). Primary, sync, backup, sync: a
/// crash leaves one copy or both upgraded, and the next open finishes.
fn upgrade(dev: &dyn Device, sb: Superblock) -> Result<Superblock, Error> {
    let up = Superblock {
        version: EXTENT_FORMAT_VERSION,
        upgraded_from: sb.version,
        ..sb
    };
    let block = up.encode();
    for off in SUPERBLOCK_OFFSETS {
        dev.write_at(&block, off)
            .map_err(Error::io("upgrade a superblock"))?;
        dev.sync().map_err(Error::io("flush the device"))?;
    }
    tracing::info!(uuid = %up.disk_uuid, from = sb.version, to = EXTENT_FORMAT_VERSION,
        "upgraded the disk's format; its tables stay unmirrored (reformat for mirrored tables)");
    Ok(up)
}

/// Loads the epoch table(s). Duplicate slots of one vDisk: the higher epoch
/// wins. Slots damaged in every copy are lost: the loss serial goes up and
/// every vDisk must be fenced again.
fn scan_epochs(dev: &dyn Device, l: &Layout, state: &mut State, fixes: &mut Fixes) {
    let mut seen: HashMap<Uuid, (u32, u64, u64, u64)> = HashMap::new();
    let mut damaged = 0;
    let mut serial = 0u64;
    let mut max_trust = 0u64;
    scan_copies(
        dev,
        &l.epoch_tables(),
        l.epoch_slots.into(),
        |i, entries| {
            let s = i as u32;
            let copies = decode_copies(entries, |b, c| EpochSlot::decode(b, s, c));
            let valid: Vec<EpochSlot> = copies
                .iter()
                .filter_map(|r| r.as_ref().ok().copied())
                .collect();
            if valid.is_empty() {
                let why = copies
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or(Bad::Unreadable);
                warn_damaged("epoch", i, damaged, &why);
                damaged += 1;
                fixes.lost_slots.push(s);
                state.load_lost_slot();
                return;
            }
            let slot = combine_slots(&valid);
            for (c, r) in copies.iter().enumerate() {
                if r.as_ref().ok() != Some(&slot) {
                    fixes.slot_copies.push((c, s, slot));
                }
            }
            match slot {
                EpochSlot::Free => state.load_free_slot(s),
                EpochSlot::Lost { serial: n } => {
                    serial = serial.max(n);
                    state.load_lost_slot();
                }
                EpochSlot::Used {
                    vdisk,
                    epoch,
                    trust,
                    boot,
                } => {
                    max_trust = max_trust.max(trust);
                    match seen.entry(vdisk) {
                        Entry::Vacant(v) => {
                            v.insert((s, epoch, trust, boot));
                        }
                        Entry::Occupied(mut o) => {
                            tracing::warn!(%vdisk, "two epoch slots for one vdisk; keeping the higher epoch");
                            let (_, e0, t0, _) = *o.get();
                            let loser = if epoch > e0 || (epoch == e0 && trust < t0) {
                                o.insert((s, epoch, trust, boot)).0
                            } else {
                                s
                            };
                            fixes.free_slots.push(loser);
                            state.load_free_slot(loser);
                        }
                    }
                }
            }
        },
    );
    if !fixes.lost_slots.is_empty() {
        // Above every serial and trust on disk: no vDisk is confirmed.
        serial = serial.max(max_trust).saturating_add(1);
        tracing::error!(
            lost = fixes.lost_slots.len(),
            serial,
            "epoch slots were lost: every vdisk must be fenced again before it takes writes"
        );
    }
    state.load_loss_serial(serial);
    for (vdisk, (slot, epoch, trust, boot)) in seen {
        state.load_epoch(vdisk, slot, epoch, trust, boot);
    }
}

/// Loads the extent table(s). Copies that differ are resolved by the newer
/// record; duplicate claims of one chunk by the higher generation; extents
/// damaged in every copy are identified by their stamp and blocks.
fn scan_extents(dev: &dyn Device, l: &Layout, state: &mut State, fixes: &mut Fixes) {
    let mut owners: HashMap<ChunkKey, (u64, u64, u32)> = HashMap::new();
    let mut max_generation = 0;
    let mut damaged: Vec<u64> = Vec::new();
    scan_copies(dev, &l.extent_tables(), l.extents_total, |e, entries| {
        let copies = decode_copies(entries, |b, c| ExtentRecord::decode(b, e, c));
        let Some(rec) = copies
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .reduce(ExtentRecord::newer)
        else {
            let why = copies
                .into_iter()
                .find_map(Result::err)
                .unwrap_or(Bad::Unreadable);
            warn_damaged("extent", e, damaged.len() as u64, &why);
            damaged.push(e);
            return;
        };
        for (c, r) in copies.iter().enumerate() {
            if r.as_ref().ok() != Some(&rec) {
                fixes.extent_copies.push((c, e, rec));
            }
        }
        max_generation = max_generation.max(rec.generation());
        match rec {
            ExtentRecord::Free { .. } => state.load_free_extent(e),
            ExtentRecord::Used {
                vdisk,
                chunk,
                generation,
                ..
            } => match owners.entry((vdisk, chunk)) {
                Entry::Vacant(v) => {
                    v.insert((e, generation, rec.tag()));
                }
                Entry::Occupied(mut o) => {
                    tracing::warn!(%vdisk, chunk, "two extents claim one chunk; keeping the newer generation");
                    let loser = if generation > o.get().1 {
                        o.insert((e, generation, rec.tag())).0
                    } else {
                        e
                    };
                    fixes.free_extents.push(loser);
                    state.load_free_extent(loser);
                }
            },
        }
    });
    for e in damaged {
        match identify(dev, l, e) {
            Owner::Unused => {
                tracing::info!(
                    extent = e,
                    "a damaged extent record belongs to a never-used extent; freeing it"
                );
                fixes.free_extents.push(e);
                state.load_free_extent(e);
            }
            Owner::Chunk(key, generation) => {
                max_generation = max_generation.max(generation);
                if owners.contains_key(&key) {
                    // The chunk lives elsewhere: this is an older copy.
                    fixes.free_extents.push(e);
                    state.load_free_extent(e);
                } else {
                    tracing::warn!(extent = e, vdisk = %key.0, chunk = key.1,
                        "an extent whose record is damaged may hold this chunk: it reads as an error until rewritten");
                    state.load_suspect(key, e);
                }
            }
            Owner::Unknown => {
                tracing::error!(extent = e,
                    "the owner of an extent whose record is damaged cannot be told: unallocated chunks read as errors until rewritten");
                state.load_ownerless(e);
            }
        }
    }
    for (key, (extent, generation, tag)) in owners {
        state.load_chunk(key, extent, generation, tag);
    }
    state.load_next_generation(max_generation.saturating_add(1));
}

/// Who may own an extent whose record is damaged in every copy.
enum Owner {
    /// Never allocated since the format: its stamp and crcs are all zero.
    Unused,
    /// The stamp names this chunk (at this generation), and every block's
    /// stored crc carries that allocation's tag.
    Chunk(ChunkKey, u64),
    /// No telling (no stamps, or a stamp the blocks do not confirm).
    Unknown,
}

/// Identifies the owner of damaged extent `e` from its stamp, confirmed by
/// its blocks: a stamp is written with the crcs at allocation, but a crash
/// may have kept the record and lost the stamp, so only blocks that all
/// carry the stamp's tag prove that the stamp describes their allocation.
fn identify(dev: &dyn Device, l: &Layout, e: u64) -> Owner {
    if !l.mirrored() {
        return Owner::Unknown;
    }
    let bpe = l.blocks_per_extent() as usize;
    let mut run = vec![0u8; ENTRY_SIZE + bpe * 4];
    if dev.read_at(&mut run, l.stamp_offset(e)).is_err() {
        return Owner::Unknown;
    }
    if run.iter().all(|&b| b == 0) {
        return Owner::Unused;
    }
    let Ok(stamp) = Stamp::decode(&run[..ENTRY_SIZE], e) else {
        return Owner::Unknown;
    };
    let tag = owner_tag(stamp.vdisk, stamp.chunk, stamp.generation);
    let mut data = vec![0u8; l.extent_size as usize];
    if dev.read_at(&mut data, l.extent_data_offset(e)).is_err() {
        return Owner::Unknown;
    }
    let crcs = run[ENTRY_SIZE..].chunks_exact(4);
    let confirmed = data
        .chunks_exact(BLOCK_SIZE as usize)
        .zip(crcs)
        .all(|(block, c)| {
            tessera_crc::crc32c(block) ^ tag == u32::from_le_bytes([c[0], c[1], c[2], c[3]])
        });
    if confirmed {
        Owner::Chunk((stamp.vdisk, stamp.chunk), stamp.generation)
    } else {
        Owner::Unknown
    }
}
