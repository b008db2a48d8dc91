//! The chunk store as it was at on-disk format version 1 (commit c72845b),
//! kept verbatim (only `crate::` paths and unit tests changed) so that tests
//! can make version-1 disks with the code that made them in production.
//! Do not change its behaviour.
#![allow(dead_code, unused_imports)]
// Tessera's chunk store: the on-disk format of ONE storage-node disk.
//
// A storage node owns disks (raw block devices or preallocated regular files).
// This crate formats and serves one of them: it stores fixed-size *chunks* of
// vDisks, keyed by `(vdisk uuid, chunk index)`, in *extents* of the disk, with
// a crc32c per 4 KiB block and a per-vDisk fencing *epoch*. It knows nothing
// of networks, zones, replication or virtio.
//
// [`Disk`] is `Send + Sync` and every method takes `&self`: the node calls it
// from its blocking I/O pool. No lock is held across I/O on the data path
// except a striped per-chunk lock (see *Concurrency*).
//
// # On-disk format, version 1
//
// All integers are little-endian. Every structure carries a magic, a version
// and a crc32c (Castagnoli) computed over the structure with its crc field
// (always its last 4 bytes) set to zero.
//
// ```text
// offset                      length                      content
// 0                           4 KiB                       superblock (primary)
// 4096                        4 KiB                       superblock (backup copy)
// 64 KiB                      epoch_slots * 64            epoch table
// (4 KiB aligned)             extents_total * 64, ↑4 KiB  extent table
// (4 KiB aligned)             extents_total * bpe * 4,↑4K crc table
// data_offset                 extents_total * extent_size data region
// ```
// (`bpe` = blocks per extent = `extent_size / 4096`.)
//
// ## Superblock (4096 bytes, at 0 and at 4096)
//
// ```text
// offset size field
//      0    8 magic              b"TESSERA\0"
//      8    4 format_version     1
//     12    4 flags              0 (none defined in version 1)
//     16   16 disk uuid
//     32    4 extent_size        bytes; multiple of 4096, 4 KiB ..= 1 GiB (= chunk size)
//     36    4 block_size         4096 (checksum unit)
//     40    4 sector_size        512 (I/O granularity)
//     44    4 epoch_slots        number of 64-byte epoch slots
//     48    8 device_size        bytes of the device/file when formatted
//     56    8 epoch_table_offset
//     64    8 epoch_table_len    epoch_slots * 64
//     72    8 extent_table_offset
//     80    8 extent_table_len   >= extents_total * 64
//     88    8 crc_table_offset
//     96    8 crc_table_len      >= extents_total * bpe * 4
//    104    8 data_offset        multiple of lcm(extent_size, 1 MiB)
//    112    8 extents_total
//    120    8 created            unix seconds
//    128 3964 reserved           zero
//   4092    4 crc32c
// ```
//
// The magic, the version and the crc's position (last 4 bytes of the block)
// are fixed for all format versions, so any reader can tell "not Tessera"
// from "damaged" from "too new". `open` uses the primary; if it is damaged it
// uses the backup (logging a warning) and rewrites the primary from it.
//
// ## Epoch table: `epoch_slots` slots of 64 bytes
//
// ```text
//  0 4 magic   b"TSEP"    4 2 version 1     6 2 flags (0 free, 1 used)
//  8 16 vdisk uuid       24 8 epoch         32 4 slot index (self-check)
// 36 24 reserved (zero)  60 4 crc32c
// ```
//
// ## Extent table: one 64-byte record per extent
//
// ```text
//  0 4 magic   b"TSXT"    4 2 version 1     6 2 flags (0 free, 1 used)
//  8 16 vdisk uuid       24 8 chunk index   32 8 generation
// 40 8 extent index (self-check)            48 12 reserved (zero)
// 60 4 crc32c
// ```
//
// `generation` is a disk-wide, strictly increasing allocation counter: each
// allocation takes the next value; a free record keeps the highest generation
// handed out so far, so the counter (max seen + 1 at open) never goes back.
// Records and slots are 64-byte aligned, so each lies within one 512-byte
// sector and is written atomically. A record or slot with a bad magic, crc,
// version, flags or self-index is *quarantined*: neither free nor mapped,
// logged with `warn!`, counted in [`DiskInfo`]. Two used records claiming the
// same `(vdisk, chunk)` (possible after power loss) are resolved at open: the
// higher generation wins, the other is freed. Two used slots for one vDisk:
// the higher epoch wins, the other is freed.
//
// ## Crc table and data region
//
// One u32 crc32c per 4 KiB data block; extent `e`'s crcs are contiguous at
// `crc_table_offset + e * bpe * 4`. Extent `e`'s data is at
// `data_offset + e * extent_size`. `extents_total` is the largest count whose
// metadata and data fit in the device.
//
// # Crash discipline
//
// A storage node may be killed with `kill -9` at any instant. Whatever a
// method returned `Ok` for has been `pwrite`n, i.e. is in the kernel page
// cache, and survives the process. Only power loss can lose it, unless
// [`Disk::flush`] (fdatasync) returned since.
//
// * **Write to a new chunk**: (1) take a free extent (memory only); (2) make
//   the parts of it the write does not cover read as zeros (fallocate
//   `ZERO_RANGE`, else `PUNCH_HOLE`, else writing zeros); (3) write the data
//   blocks; (4) write the crcs of the whole extent (crc32c of a zero block for
//   untouched blocks); (5) write the extent record (used). A crash before (5)
//   leaves the extent free: nothing is half-allocated.
// * **Write to an existing chunk**: data, then crcs. A crash between them can
//   leave a block whose crc does not match: this is only possible for a write
//   that was never acknowledged, so the replication layer already treats the
//   copy as stale in that region and resyncs it; reads report
//   [`Error::Checksum`] and never return the torn block.
// * **Partial discard**: zero the range (fallocate or zeros), then set its
//   crcs to crc32c(zero block). Edge blocks that are only partly discarded
//   are read, verified, zeroed in part and rewritten like a write.
// * **Free** (whole-extent discard, vDisk deletion): write the extent record
//   (free) first, then put the extent on the in-memory free list.
// * **Epoch raise** (fence, or a write with a newer epoch): `pwrite` the slot
//   before any write with that epoch is accepted and before `fence` returns.
// * **Format**: invalidate both superblocks, write the tables, fdatasync,
//   write both superblocks, fdatasync.
//
// Plain buffered I/O (`pread`/`pwrite`), no `O_DIRECT`.
//
// # Concurrency
//
// * One mutex guards the in-memory map and allocators; it is never held
//   across I/O.
// * 256 striped `RwLock`s keyed by the chunk key `(vdisk, chunk)` serialise
//   data+crc updates of a chunk's extent (reads share, writes exclude). An
//   allocated extent belongs to exactly one chunk, so this is a per-extent
//   lock whose key is known before the extent is, which makes allocation and
//   free race-free without lock-order inversions.
// * A per-vDisk gate (`RwLock`) is held shared by writes and discards and
//   exclusively by `fence` and `delete_vdisk`: once `fence(e)` returns, no
//   write with an older epoch is still in flight.
//
// Lock order: vDisk gate → chunk stripe → state mutex.
// An exclusive `flock` on the device keeps a second process out.

mod codec;
mod crcmap;
mod disk;
mod error;
mod layout;
mod record;
mod state;
mod superblock;
mod sys;

pub use disk::{ChunkInfo, Disk, DiskInfo, FormatOptions};
pub use error::Error;
pub use layout::LayoutError;
pub use superblock::SuperblockError;

/// Checksum unit: one crc32c per block of this many bytes.
pub const BLOCK_SIZE: u32 = 4096;
/// I/O granularity: offsets and lengths are multiples of this.
pub const SECTOR_SIZE: u32 = 512;
/// Default extent size, equal to the chunk size (1 MiB).
pub const DEFAULT_EXTENT_SIZE: u32 = 1 << 20;
/// The on-disk format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
