//! Tessera's chunk store: the on-disk format of ONE storage-node disk.
//!
//! A storage node owns disks (raw block devices or preallocated regular files).
//! This crate formats and serves one of them: it stores fixed-size *chunks* of
//! vDisks, keyed by `(vdisk uuid, chunk index)`, in *extents* of the disk, with
//! a crc32c per 4 KiB block and a per-vDisk fencing *epoch*. It knows nothing
//! of networks, zones, replication or virtio.
//!
//! [`Disk`] is `Send + Sync` and every method takes `&self`: the node calls it
//! from its blocking I/O pool. No lock is held across I/O on the data path
//! except a striped per-chunk lock (see *Concurrency*).
//!
//! All I/O goes through a [`Device`]: [`FileDevice`] in production (buffered
//! `pread`/`pwrite`/`fdatasync` on a file or block device, no `O_DIRECT`, no
//! memory mapping), [`PowerLossDevice`] in tests and simulations (it keeps
//! what was written since the last sync volatile and loses any part of it
//! on a crash).
//!
//! # On-disk format, version 2
//!
//! All integers are little-endian. Every structure carries a magic, a version
//! and a crc32c (Castagnoli) computed over the structure with its crc field
//! (always its last 4 bytes) set to zero.
//!
//! ```text
//! offset                      length                      content
//! 0                           4 KiB                       superblock (primary)
//! 4096                        4 KiB                       superblock (backup copy)
//! 64 KiB                      epoch_slots * 64, ↑4 KiB    epoch table
//! epoch_mirror_offset         same                        epoch table, second copy
//! (4 KiB aligned)             extents_total * 64, ↑4 KiB  extent table
//! extent_mirror_offset        same                        extent table, second copy
//! (4 KiB aligned)             extents_total * run, ↑4 KiB crc table
//! data_offset                 extents_total * extent_size data region
//! ```
//! (`bpe` = blocks per extent = `extent_size / 4096`; `run` = 64 +
//! `bpe * 4` rounded up to 64: an extent's stamp and its crcs.)
//!
//! ## Superblock (4096 bytes, at 0 and at 4096)
//!
//! ```text
//! offset size field
//!      0    8 magic              b"TESSERA\0"
//!      8    4 format_version     2 (1: see *Version 1*)
//!     12    4 flags              0 (none defined)
//!     16   16 disk uuid
//!     32    4 extent_size        bytes; multiple of 4096, 4 KiB ..= 1 GiB (= chunk size)
//!     36    4 block_size         4096 (checksum unit)
//!     40    4 sector_size        512 (I/O granularity)
//!     44    4 epoch_slots        number of 64-byte epoch slots
//!     48    8 device_size        bytes of the device/file when formatted
//!     56    8 epoch_table_offset
//!     64    8 epoch_table_len    epoch_slots * 64
//!     72    8 extent_table_offset
//!     80    8 extent_table_len   >= extents_total * 64
//!     88    8 crc_table_offset
//!     96    8 crc_table_len      >= extents_total * run
//!    104    8 data_offset        multiple of lcm(extent_size, 1 MiB)
//!    112    8 extents_total
//!    120    8 created            unix seconds
//!    128    8 epoch_mirror_offset   0: no mirrors (a disk upgraded from version 1)
//!    136    8 extent_mirror_offset  0 exactly when epoch_mirror_offset is 0
//!    144    4 upgraded_from      0, or 1 for a disk upgraded from version 1
//!    148    4 reserved           zero
//!    152    8 generation_floor   every allocation generation handed out so far is below it
//!    160 3932 reserved           zero
//!   4092    4 crc32c
//! ```
//!
//! The magic, the version and the crc's position (last 4 bytes of the block)
//! are fixed for all format versions, so any reader can tell "not Tessera"
//! from "damaged" from "too new". `open` uses the primary; if it is damaged it
//! uses the backup (logging a warning) and rewrites the primary from it.
//!
//! ## Epoch table: `epoch_slots` slots of 64 bytes, in two copies
//!
//! ```text
//!  0 4 magic   b"TSEP"    4 2 version 2     6 2 flags (0 free, 1 used, 2 lost)
//!  8 16 vdisk uuid       24 8 epoch (lost: the loss serial)
//! 32 4 slot index (self-check)              36 1 table copy (0, 1)  37 3 reserved
//! 40 8 trust: the loss serial when written  48 8 boot tag (0: unknown)
//! 56 4 reserved (zero)                       60 4 crc32c
//! ```
//!
//! ## Extent table: one 64-byte record per extent, in two copies
//!
//! ```text
//!  0 4 magic   b"TSXT"    4 2 version 2     6 2 flags (0 free, 1 used)
//!  8 16 vdisk uuid       24 8 chunk index   32 8 generation
//! 40 8 extent index (self-check)            48 1 table copy (0, 1)
//! 49 11 reserved (zero)                      60 4 crc32c
//! ```
//!
//! `generation` is a disk-wide, strictly increasing allocation counter: each
//! allocation takes the next value; a free record keeps the highest
//! generation handed out when it was written. No generation is handed out
//! twice, even across crashes that lose the records carrying it: every open
//! starts at or above the superblock's `generation_floor` and then raises the
//! floor 2^32 above (both superblocks, synced) before it allocates.
//!
//! Records and slots are 64-byte aligned, so each lies within one 512-byte
//! sector and is written atomically; every change is written to the primary
//! copy, then to the mirror. A copy with a bad magic, crc, version, flags,
//! self-index or table copy is *damaged*; open takes the other copy and
//! rewrites the damaged one. Two valid copies that differ (possible only
//! while the last change is not durable) are resolved by the newer: for
//! records the higher generation (equal: the free one), for slots a used slot
//! over a free one and then the higher epoch. Two used records claiming one
//! `(vdisk, chunk)` (possible after power loss) are resolved at open: the
//! higher generation wins, the other is freed. Two used slots for one vDisk:
//! the higher epoch wins, the other is freed.
//!
//! ## Crc table: per extent, a stamp and the block crcs
//!
//! ```text
//! stamp (64 bytes):
//!  0 4 magic   b"TSST"    4 2 version 1     6 2 flags 0
//!  8 16 vdisk uuid       24 8 chunk index   32 8 generation
//! 40 8 extent index      48 12 reserved     60 4 crc32c
//! then one u32 per block: crc32c(block) XOR owner tag
//! ```
//!
//! The *owner tag* of an allocation is `crc32c(vdisk uuid ‖ chunk LE ‖
//! generation LE)` (1 if that is 0). Storing `crc32c(block) ^ tag` costs
//! nothing, and a block only verifies under the allocation that wrote it:
//! after power loss, data that another chunk, another vDisk or an earlier
//! allocation of the same chunk left in a reused extent fails its checksum
//! instead of reading as good. The stamp is written with the crcs in one
//! write at allocation, never changed by a free: it names the extent's last
//! owner, and is read only to identify an extent whose record is damaged in
//! both copies. Extent `e`'s stamp is at `crc_table_offset + e * run`, its
//! crcs follow; its data is at `data_offset + e * extent_size`.
//! `extents_total` is the largest count whose metadata and data fit.
//!
//! ## Version 3 (space taken 4 KiB at a time)
//!
//! [`FormatOptions::thin`]. The superblock (version 3) adds, at 160–231:
//! the log ring's offset and its second copy's, its pages, the two
//! checkpoint areas' offsets, their pages, the data blocks, and the crc
//! journal's offset and pages; the extent table's fields are 0 (there is
//! none). The crc table holds one u32 per physical data block
//! (`crc32c(block) ^ tag`, the tag naming vDisk, chunk, generation and the
//! block's place in the chunk); a write's crcs reach it through the crc
//! journal (`crcjournal`: records appended in one write per batch of
//! requests, stored into the table before every fdatasync). The block map lives in
//! the metadata log and the checkpoints: see `mlog` (pages, replay, what
//! tells a flushed page lost), `ckpt` (checkpoint pages), `blockmap` (runs,
//! generations, homes) and `disk::thin` (how they are written and read).
//!
//! ## Version 1 (read and upgraded)
//!
//! Version 1 has one copy of each table, no stamps (`run` = `bpe * 4`),
//! plain crcs (`crc32c(block)`, tag 0), version-1 records and slots (no copy
//! byte, no trust, no lost flag). `open` upgrades a version-1 disk in place:
//! it rewrites both superblocks at version 2 with the same geometry and
//! mirror offsets 0 (primary, sync, backup, sync: a crash leaves a disk that
//! opens and finishes the upgrade), so a version-1 build refuses it from then
//! on. Its version-1 records keep meaning "plain crcs" (a record is rewritten
//! in the version it was read in); extents allocated from then on get
//! version-2 records and tagged crcs. An upgraded disk has no mirrors and no
//! stamps: a damaged record there cannot be recovered nor identified (see
//! *Damage*). Reformat (after draining) to get them.
//!
//! # Crash discipline
//!
//! A storage node may be killed with `kill -9` at any instant, and its
//! machine may lose power. Whatever a method returned `Ok` for has been
//! written to the device, i.e. is in the kernel page cache, and survives the
//! process. Power loss keeps what was written before the last
//! [`Disk::flush`] (fdatasync) and an arbitrary part of what was written
//! since, in any order, writes torn at sector boundaries. The rule that
//! holds after power loss: every block reads as its content at the last
//! flush, as content written to it after that flush, or fails its checksum
//! ([`Error::Checksum`]) — never as data another chunk, another vDisk or an
//! earlier allocation wrote; and an epoch raise that returned survives.
//! `chunkstore/tests/power_loss.rs` checks exactly this.
//!
//! * **Write to a new chunk**: (1) take a free extent and the next
//!   generation (memory only); (2) make the parts of the extent the write
//!   does not cover read as zeros (fallocate `ZERO_RANGE`, else
//!   `PUNCH_HOLE`, else writing zeros); (3) write the data blocks; (4) write
//!   the stamp and the tagged crcs of the whole extent (one write); (5) write
//!   the extent record (used), primary then mirror. No sync: in any order,
//!   any subset of (2)–(5) may survive power loss. The record may survive
//!   alone: the extent's old blocks then fail their checksums under the new
//!   owner's tag. The old owner's record may come back (its free was lost):
//!   the new owner's blocks fail under the old owner's tag. A crash (or an
//!   error) before (5) leaves the extent free.
//! * **Write to an existing chunk**: data, then crcs (one write). A crash
//!   between them can leave a block whose crc does not match: possible only
//!   for a write that was never acknowledged (kill -9) or never flushed
//!   (power loss), so the replication layer already treats the copy as
//!   stale in that region and resyncs it; reads report [`Error::Checksum`]
//!   and never return the torn block.
//! * **Partial discard**: zero the range (fallocate or zeros), then write its
//!   crcs (crc32c of a zero block, tagged). Edge blocks that are only partly
//!   discarded are read, verified, zeroed in part and rewritten like a write.
//! * **Free** (whole-chunk discard, vDisk deletion): write the extent record
//!   (free), primary then mirror, then put the extent on the in-memory free
//!   list. No sync: the free may be lost (the chunk then reads as it was at
//!   the last flush, or as what was written since), and the extent may be
//!   reused at once (the tags keep the owners apart).
//! * **Epoch raise** (fence, or a write with a newer epoch): write the slot
//!   (primary, mirror), fdatasync, then admit the epoch and answer. A raise
//!   that returned is durable.
//! * **Format**: invalidate both superblocks, sync, write the tables and zero
//!   the crc table, sync, write both superblocks, sync.
//! * **Open**: choose and repair the superblock, upgrade a version-1 disk,
//!   scan the tables, rewrite damaged or stale copies and duplicate losers,
//!   fdatasync (what was read may have been in the page cache only, after
//!   kill -9), reserve generations (superblocks, synced), serve.
//!
//! # Damage
//!
//! Media errors and flipped bits are detected by the crcs and never crash
//! the node: no memory mapping (no SIGBUS), every decoder validates before
//! it trusts a length or an offset, a read error fails only the request it
//! hits. What each kind of damage does:
//!
//! * **A data block or its crc**: the block fails its checksum
//!   ([`Error::Checksum`]) or its read fails ([`Error::Unreadable`]); the
//!   node answers `Checksum`, the replicator reads another copy and rewrites
//!   this one.
//! * **One copy of a record or slot**: the other copy serves and the damaged
//!   one is rewritten at open.
//! * **Both copies of an extent record**: the extent is neither free nor
//!   used (quarantined) and is identified: if its stamp is valid and every
//!   block's crc carries the stamp's owner tag, the stamp's chunk is a
//!   *suspect*: if it has no other extent it reads as
//!   [`Error::OwnershipUnknown`] (never as zeros), and so do writes and
//!   discards of part of it, until it is written or discarded whole (the
//!   replicator's repair), which frees the damaged extent. Stamp and crcs all
//!   zero: never used, freed. Otherwise the extent is *ownerless*: every
//!   unallocated chunk reads as `OwnershipUnknown` until written or
//!   discarded whole (in memory only: again after each open). Ownerless is
//!   the fate of a damaged record on a disk upgraded from version 1, and
//!   otherwise needs three damaged structures.
//! * **Both copies of an epoch slot**: the slot is *lost*: marked lost (both
//!   copies) under a new *loss serial*, above every serial and trust on the
//!   disk, and never reused. A vDisk is confirmed only if its slot was
//!   written under the current loss serial: every other vDisk (the lost slot
//!   may have been any of them) is refused writes and discards
//!   with [`Error::FenceUnknown`] until a [`Disk::fence`] at or above its
//!   stored epoch confirms it (the writer's open or resync fences every copy
//!   it uses). So a damaged slot never lowers a fence; a writer older than
//!   the lost epoch could only pass if it sent that fence itself.
//! * **A superblock**: the other copy serves; both damaged: the disk does
//!   not open ([`Error::BadSuperblock`]).
//!
//! # Concurrency
//!
//! * One mutex guards the in-memory map and allocators; it is never held
//!   across I/O.
//! * 256 striped `RwLock`s keyed by the chunk key `(vdisk, chunk)` serialise
//!   data+crc updates of a chunk's extent (reads share, writes exclude). An
//!   allocated extent belongs to exactly one chunk, so this is a per-extent
//!   lock whose key is known before the extent is, which makes allocation and
//!   free race-free without lock-order inversions.
//! * A per-vDisk gate (`RwLock`) is held shared by writes and discards and
//!   exclusively by `fence` and `delete_vdisk`: once `fence(e)` returns, no
//!   write with an older epoch is still in flight.
//!
//! Lock order: vDisk gate → chunk stripe → state mutex.
//! An exclusive `flock` on the device keeps a second process out.

mod blockmap;
mod ckpt;
mod codec;
mod crcjournal;
mod device;
mod disk;
mod error;
mod fasthash;
mod layout;
mod mlog;
mod powerloss;
mod record;
mod state;
mod superblock;
mod sys;

pub use device::{Device, FileDevice};
pub use disk::{ChunkInfo, Disk, DiskInfo, Doubt, Fenced, FormatOptions};
pub use error::Error;
pub use layout::LayoutError;
pub use powerloss::{CrashPlan, PendingWrite, PowerLossDevice, Survivor};
pub use superblock::SuperblockError;

/// Checksum unit: one crc32c per block of this many bytes.
pub const BLOCK_SIZE: u32 = 4096;
/// I/O granularity: offsets and lengths are multiples of this.
pub const SECTOR_SIZE: u32 = 512;
/// Default extent size, equal to the chunk size (1 MiB).
pub const DEFAULT_EXTENT_SIZE: u32 = 1 << 20;
/// The newest on-disk format version this build reads and writes: 3,
/// allocation at 4 KiB ([`FormatOptions::thin`]).
pub const FORMAT_VERSION: u32 = 3;
/// The version of disks allocated by extents (a chunk takes a whole
/// extent): disks formatted so, and version-1 disks once opened.
pub const EXTENT_FORMAT_VERSION: u32 = 2;
