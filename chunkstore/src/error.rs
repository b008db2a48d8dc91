//! The chunk store's public error type.

use std::io;

use uuid::Uuid;

use crate::superblock::SuperblockError;

/// Everything that can go wrong with a [`crate::Disk`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on the device failed.
    #[error("could not {op}")]
    Io {
        /// What was being done, e.g. "read the extent table".
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Neither superblock copy carries the Tessera magic.
    #[error("the device does not carry a Tessera superblock")]
    NotTessera,
    /// The superblock was written by a newer (or unknown) format version.
    #[error("the device uses on-disk format version {found}, which this build does not support")]
    UnsupportedVersion {
        /// The version found in the superblock.
        found: u32,
    },
    /// Both superblock copies are damaged or inconsistent.
    #[error("the Tessera superblock is damaged")]
    BadSuperblock(#[source] SuperblockError),
    /// Another process (or another `Disk` in this one) has the device open.
    #[error("the device is in use by another chunk store")]
    Locked,
    /// `format` found an existing Tessera superblock and `force` was not set.
    #[error("the device already carries a Tessera superblock; use force to overwrite it")]
    AlreadyFormatted,
    /// The device cannot hold the metadata and at least one extent.
    #[error("the device is too small for a Tessera chunk store")]
    TooSmall,
    /// The extent size is not a multiple of 4 KiB in 4 KiB ..= 1 GiB.
    #[error("extent size {extent_size} is not a multiple of 4096 between 4 KiB and 1 GiB")]
    InvalidExtentSize {
        /// The rejected extent size.
        extent_size: u32,
    },
    /// The device is neither a regular file nor a block device.
    #[error("the path is neither a regular file nor a block device")]
    UnsupportedDevice,
    /// An I/O range is not sector-aligned or does not fit in a chunk.
    #[error("range at offset {offset} of length {len} is not sector-aligned or exceeds the chunk")]
    InvalidRange {
        /// Byte offset within the chunk.
        offset: u32,
        /// Length in bytes.
        len: u64,
    },
    /// Placement groups outside `0..stripes` (or no stripes at all).
    #[error("placement groups must be below the stripe count {stripes}")]
    InvalidGroups {
        /// The stripe count given.
        stripes: u32,
    },
    /// The request's epoch is older than the vDisk's stored epoch (fenced).
    #[error("vdisk {vdisk} is fenced at epoch {current}; request epoch {got} is stale")]
    StaleEpoch {
        /// The vDisk.
        vdisk: Uuid,
        /// Its stored epoch.
        current: u64,
        /// The request's epoch.
        got: u64,
    },
    /// No free extent (or no free epoch slot) is left.
    #[error("no free space is left on the disk")]
    NoSpace,
    /// A block's data does not match its stored crc32c (it was damaged, or
    /// a write to it was torn by power loss, or it holds what another owner
    /// of the extent wrote).
    #[error("checksum mismatch in vdisk {vdisk} chunk {chunk} block {block}")]
    Checksum {
        /// The vDisk.
        vdisk: Uuid,
        /// The chunk index.
        chunk: u64,
        /// The 4 KiB block index within the chunk.
        block: u32,
    },
    /// The chunk's data or checksums cannot be read from the device (a
    /// media error).
    #[error("cannot read vdisk {vdisk} chunk {chunk} from the device")]
    Unreadable {
        /// The vDisk.
        vdisk: Uuid,
        /// The chunk index.
        chunk: u64,
        /// The device's error.
        #[source]
        source: io::Error,
    },
    /// The chunk has no extent here, but an extent whose record is damaged
    /// may hold it, or this copy was freed after it moved to another disk
    /// ([`crate::Disk::free_moved_copy`]): reading it as zeros could hide
    /// its data. Reads, and writes or discards of part of it, fail until it
    /// is written or discarded whole.
    #[error("vdisk {vdisk} chunk {chunk} may hold data this disk cannot read (a damaged extent record, or a copy freed after it moved)")]
    OwnershipUnknown {
        /// The vDisk.
        vdisk: Uuid,
        /// The chunk index.
        chunk: u64,
    },
    /// Epoch slots were lost to damage and the vDisk was not fenced since:
    /// its stored epoch may be lower than its fence. Writes and discards
    /// are refused until a [`crate::Disk::fence`] at or above its stored
    /// epoch.
    #[error("the fence of vdisk {vdisk} is unknown since epoch slots were lost; fence it again")]
    FenceUnknown {
        /// The vDisk.
        vdisk: Uuid,
    },
}

impl Error {
    /// Whether this copy of the chunk cannot be trusted for the request's
    /// range ([`Error::Checksum`], [`Error::Unreadable`],
    /// [`Error::OwnershipUnknown`]): the caller should read another copy and
    /// rewrite this one. (The storage node answers `Status::Checksum`.)
    pub fn is_bad_copy(&self) -> bool {
        matches!(
            self,
            Error::Checksum { .. } | Error::Unreadable { .. } | Error::OwnershipUnknown { .. }
        )
    }

    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }
}
