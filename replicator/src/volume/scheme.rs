//! The per-piece interface of a redundancy scheme.
//!
//! A scheme decides how one chunk lives on its group's copies: mirroring
//! keeps the same bytes on every copy; erasure coding (next) keeps `k` data
//! and `m` parity fragments. Everything else — the lease and fencing, the
//! copy states, dirty tracking, the activity log, resync scheduling,
//! placement changes — is the volume's and shared by every scheme.

use uuid::Uuid;

use super::dirty::ForkState;
use super::placement::Links;
use super::repair::ScrubReport;
use super::Inner;
use crate::layout::Piece;
use crate::VolumeError;

/// How a scheme reads, writes, rebuilds and scrubs one piece or chunk.
pub(crate) trait Redundancy {
    /// Reads piece `p` into `out`: from the group's current copies, or only
    /// from copy number `only` (placement order) when given.
    async fn read_piece(
        &self,
        v: &Inner,
        links: &Links,
        p: Piece,
        out: &mut [&mut [u8]],
        only: Option<usize>,
    ) -> Result<(), VolumeError>;

    /// Writes `data` over piece `p`; acknowledged only as the policy allows
    /// (see `tracker`).
    async fn write_piece(
        &self,
        v: &Inner,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        data: &[&[u8]],
    ) -> Result<(), VolumeError>;

    /// Zeroes piece `p` (`discard`: and gives whole chunks' space back).
    async fn zero_piece(
        &self,
        v: &Inner,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        discard: bool,
    ) -> Result<(), VolumeError>;

    /// Makes `disk`'s copy (on node `node`) of `chunk` whole again from the
    /// group's current copies. The caller holds the chunk's stripe lock.
    async fn rebuild_chunk(
        &self,
        v: &Inner,
        links: &Links,
        chunk: u64,
        disk: Uuid,
    ) -> Result<(), VolumeError>;

    /// Verifies every current copy of `chunk`; returns the disks whose copy
    /// is bad (a checksum failure, or data that disagrees with the copy
    /// reads are served from), noting what it found in `report`.
    async fn scrub_chunk(
        &self,
        v: &Inner,
        links: &Links,
        chunk: u64,
        report: &mut ScrubReport,
    ) -> Result<Vec<Uuid>, VolumeError>;
}
