//! Mirroring: every copy of a chunk holds the same bytes.
//!
//! - A read goes to one current copy (a local one first) and fails over to
//!   the next; copies whose checksums fail are handed to resync.
//! - A mutation goes to every copy that takes writes, with one payload crc
//!   for all of them; the [`WriteTracker`] decides when it is acknowledged.
//!   If a node refuses the payload (the guest changed the buffer in
//!   flight), the data is copied once into a private buffer and sent again
//!   to every copy, so all copies end up with the same bytes.
//! - Rebuild copies the chunk from a current copy; a chunk of zeros is
//!   discarded (the copy stays thin).
//! - Scrub reads every current copy and compares: checksum failures are
//!   bad; among copies that differ, the majority wins, and a tie goes to
//!   the copy reads are served from (what the guest has seen).

use std::time::Duration;

use futures_util::future::{join, join3, join_all};
use smallvec::SmallVec;
use tessera_proto::{ChunkRange, Request, Status};
use uuid::Uuid;

use super::copies::CopyHealth;
use super::dirty::ForkState;
use super::placement::Links;
use super::repair::ScrubReport;
use super::scheme::Redundancy;
use super::tracker::{Answer, CopyStates, Decision, WriteTracker, INLINE_COPIES};
use super::{stripe, CopySlot, Inner};
use crate::layout::Piece;
use crate::VolumeError;

/// The mirroring scheme.
pub(crate) struct Mirror;

/// What a mutation does to a piece.
#[derive(Clone, Copy)]
enum Mutation<'a> {
    Write(&'a [&'a [u8]]),
    Zero { discard: bool },
}

impl Mirror {
    /// Sends a mutation of one piece to every copy that takes writes.
    /// Copies that fail are recorded stale, and the chunk dirty for every
    /// copy that did not get it, before the mutation is acknowledged; it is
    /// acknowledged only if at least the policy's minimum of current copies
    /// hold it. Below that minimum it waits (bounded, without its stripe
    /// lock, so resync can bring a copy back) and then fails.
    async fn update_piece(
        &self,
        v: &Inner,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        op: Mutation<'_>,
    ) -> Result<(), VolumeError> {
        let _active = v.enter_extent(p.chunk).await?;
        // Held to the end: a layout change waits for this write.
        let layout = v.layout();
        let copies = layout.group(p.chunk);
        let group = layout.group_index(p.chunk);
        // Shared by every mutation of the stripe's chunks: resync (with a
        // copy missing) and scrub (comparing the copies) take it
        // exclusively, so they never see a write half applied.
        let mut exclusion = Some(v.stripes[stripe(p.chunk)].read().await);
        let deadline = tokio::time::Instant::now() + v.config.degraded_wait;
        let mut tracker = WriteTracker::new();
        // Current copies that had no space for it.
        let mut full: SmallVec<[Uuid; INLINE_COPIES]> = SmallVec::new();
        // A stable copy of the data, once a node saw it change in flight.
        let mut private: Option<Vec<u8>> = None;
        // Times a current copy refused it for our own newer fence.
        let mut overtaken = 0;
        loop {
            // Each target with its failure count as the mutation goes out:
            // one that fails before its answer is read may have lost what
            // it answered for.
            let targets: SmallVec<[(&CopySlot, u64); INLINE_COPIES]> = copies
                .iter()
                .filter(|c| !tracker.holds(c.disk))
                .filter(|c| match c.health() {
                    CopyHealth::Current => true,
                    // Under the stripe lock, so resync cannot be copying
                    // this chunk: a copy that has it gets the write too.
                    CopyHealth::Syncing => !v.is_dirty(c.disk, p.chunk),
                    _ => false,
                })
                .map(|c| (c, c.state.failures()))
                .collect();
            let stable: [&[u8]; 1];
            let payload: &[&[u8]] = match (op, &private) {
                (Mutation::Write(_), Some(buf)) => {
                    stable = [buf];
                    &stable
                }
                (Mutation::Write(data), None) => data,
                (Mutation::Zero { .. }, _) => &[],
            };
            // The payload's checksum, once for every copy. A write to one
            // copy leaves it to the connection: a local session's node
            // checksums its own private copy of the data instead.
            let crc = (!payload.is_empty() && (targets.len() > 1 || private.is_some()))
                .then(|| crate::conn::payload_crc(payload));
            let req = |c: &CopySlot| {
                let range = v.range(&p, c);
                match op {
                    Mutation::Write(_) => Request::Write(range, &[]),
                    Mutation::Zero { discard: true } => Request::Discard(range),
                    Mutation::Zero { discard: false } => Request::WriteZeroes(range),
                }
            };
            // Up to three copies, joined in place (no allocation, no move
            // of the calls' state into one).
            let call = |c| v.call(links, c, req(c), payload, crc);
            let results: SmallVec<[Result<(), VolumeError>; INLINE_COPIES]> = match &targets[..] {
                [(a, _)] => smallvec::smallvec![call(*a).await],
                [(a, _), (b, _)] => {
                    let (ra, rb) = join(call(*a), call(*b)).await;
                    smallvec::smallvec![ra, rb]
                }
                [(a, _), (b, _), (c, _)] => {
                    let (ra, rb, rc) = join3(call(*a), call(*b), call(*c)).await;
                    smallvec::smallvec![ra, rb, rc]
                }
                _ => join_all(targets.iter().map(|(c, _)| call(*c)))
                    .await
                    .into_iter()
                    .collect(),
            };
            let mut fenced = None;
            let mut changed_in_flight = false;
            let mut resend = false;
            for (&(c, failures), r) in targets.iter().zip(results) {
                match r {
                    // It failed (and maybe came back to resync) since the
                    // mutation went out: a restart of its machine may have
                    // taken the mutation with it, and resync does not know
                    // to copy the chunk (simulation seed 157397 on 4 nodes).
                    Ok(()) if c.state.failures() != failures => {
                        tracker.record(c.disk, Answer::Failed)
                    }
                    Ok(()) => tracker.record(c.disk, Answer::Held),
                    Err(e @ VolumeError::Fenced { .. }) => fenced = Some(e),
                    // Resync of another group's copy on this disk fenced it
                    // with a newer generation while this was in flight to a
                    // copy that stays current here: refused, not applied.
                    // Sent again with the new generation (resync never
                    // copies chunks of a group whose copy is current), it
                    // costs that copy nothing; failing it would make its
                    // resync fence again, and so on under load.
                    Err(VolumeError::Node {
                        status: Status::StaleEpoch,
                        ..
                    }) if overtaken < 3 && c.health() == CopyHealth::Current => {
                        resend = true;
                    }
                    Err(VolumeError::Node {
                        status: Status::BadPayload,
                        ..
                    }) if private.is_none() => {
                        tracker.record(c.disk, Answer::Refused);
                        changed_in_flight = true;
                    }
                    // No space for it: refused whole (the node checks
                    // before it applies anything). A current copy that
                    // cannot take it fails the mutation on every copy.
                    Err(
                        e @ VolumeError::Node {
                            status: Status::NoSpace,
                            ..
                        },
                    ) if c.health() == CopyHealth::Current => {
                        tracing::warn!(chunk = p.chunk, disk = %c.disk, error = %e, "copy has no space for a write");
                        tracker.record(c.disk, Answer::Refused);
                        full.push(c.disk);
                    }
                    // Refused whole: the copy wrote nothing and is as it was.
                    Err(
                        e @ VolumeError::Node {
                            status: Status::BadPayload | Status::NoSpace,
                            ..
                        },
                    ) => {
                        tracing::warn!(chunk = p.chunk, disk = %c.disk, error = %e, "copy refused a write");
                        tracker.record(c.disk, Answer::Refused);
                    }
                    Err(e) => {
                        tracing::warn!(chunk = p.chunk, disk = %c.disk, error = %e, "copy missed a write");
                        tracker.record(c.disk, Answer::Failed);
                        v.fail_slot(&layout, c);
                    }
                }
            }
            if let Some(e) = fenced {
                return Err(e);
            }
            if changed_in_flight {
                // The guest rewrote the buffer while it was in flight: send
                // one stable copy to every copy, those that took the first
                // version included, so they cannot differ.
                if let Mutation::Write(data) = op {
                    private = Some(data.concat());
                    tracker = WriteTracker::new();
                    full.clear();
                    continue;
                }
            }
            if !full.is_empty() {
                drop(exclusion.take());
                return Err(Box::pin(self.undo_no_space(v, links, fork, p, &tracker, &full)).await);
            }
            if resend {
                overtaken += 1;
                continue;
            }
            let states: CopyStates = copies.iter().map(|c| (c.disk, c.health())).collect();
            match tracker.decide(&states, v.min_copies) {
                Decision::Acknowledge => break,
                Decision::Short { current } => {
                    if tokio::time::Instant::now() >= deadline {
                        // A copy that refused it lacks what others took.
                        if tracker.holders().next().is_some() {
                            for c in copies
                                .iter()
                                .filter(|c| tracker.refusers().any(|d| d == c.disk))
                            {
                                v.fail_slot(&layout, c);
                            }
                        }
                        let states: CopyStates =
                            copies.iter().map(|c| (c.disk, c.health())).collect();
                        let missed: Vec<(Uuid, u64)> = tracker
                            .missed_on_failure(&states)
                            .into_iter()
                            .map(|d| (d, p.chunk))
                            .collect();
                        if let Err(e) = v.record_dirty(&missed).await {
                            tracing::warn!(error = %e, "cannot record copies that missed a failed write");
                        }
                        return Err(VolumeError::Degraded {
                            group,
                            current,
                            needed: v.min_copies,
                        });
                    }
                }
            }
            // Below the policy's minimum: let resync take this chunk
            // meanwhile; it works on copies the zone knows stale, so record
            // the ones that just failed.
            drop(exclusion.take());
            if let Err(e @ VolumeError::Fenced { .. }) = v.record_dirty(&[]).await {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            exclusion = Some(v.stripes[stripe(p.chunk)].read().await);
        }
        // Copies that refused it lack it: they are no longer current.
        for c in copies
            .iter()
            .filter(|c| tracker.refusers().any(|d| d == c.disk))
        {
            v.fail_slot(&layout, c);
        }
        // Noted before the states are read again: a copy failing from now
        // on takes this chunk into its dirty set itself (see `dirty`).
        v.note_unflushed(fork, p.chunk);
        let states: CopyStates = copies.iter().map(|c| (c.disk, c.health())).collect();
        let missed: Vec<(Uuid, u64)> = tracker
            .missed_on_ack(&states)
            .into_iter()
            .map(|d| (d, p.chunk))
            .collect();
        v.record_dirty(&missed).await
    }

    /// Current copies (on the disks `full`) had no space for a mutation of `p`: the
    /// mutation fails, and no copy goes stale for it. Copies that took it
    /// get back what the full copy holds there — they hold those blocks
    /// already, so that needs no space; zeros are discarded, giving back
    /// what the mutation took — under the stripe's exclusive lock, so no
    /// other mutation of the chunk interleaves. A copy that cannot be
    /// rolled back (its node failed) is failed, as for any missed write;
    /// if the full copy cannot be read, it is the one that fails, and the
    /// others keep the mutation. Returns the error for the guest.
    async fn undo_no_space(
        &self,
        v: &Inner,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        tracker: &WriteTracker,
        full: &[Uuid],
    ) -> VolumeError {
        let err = VolumeError::NoSpace {
            disk: full[0],
            chunk: p.chunk,
        };
        // A copy that failed with it in flight may still take it (a request
        // that timed out may run late): the full copy does not hold it, so
        // that copy is dirty for the chunk whatever happens here.
        let mut missed: SmallVec<[(Uuid, u64); INLINE_COPIES]> =
            tracker.failed().map(|d| (d, p.chunk)).collect();
        let holders: SmallVec<[Uuid; INLINE_COPIES]> = tracker.holders().collect();
        if holders.is_empty() {
            return match v.record_dirty(&missed).await {
                Ok(()) => err,
                Err(e) => e,
            };
        }
        let _exclusive = v.stripes[stripe(p.chunk)].write().await;
        let layout = v.layout();
        let copies = layout.group(p.chunk);
        // Any full copy still in the group holds what the chunk held before
        // (simulation seed 881752 on 4 nodes: the first full copy was a
        // drain's source and left the placement meanwhile; the second,
        // which stays, is what the holders are rolled back to).
        let Some(source) = full
            .iter()
            .find_map(|d| copies.iter().position(|c| c.disk == *d))
        else {
            // Every full copy left the placement while the mutation was in
            // flight (a move off it finished): there is nothing to roll back
            // to, and the holders keep it (it failed for the guest, which may
            // then read either content). Copies that failed with it in flight
            // are dirty for the chunk, and so is every other copy of the
            // group that does not hold it (a stale one was no target):
            // simulation seed 117778 on 4 nodes, where a stale copy resynced
            // without the chunk and a move then filled from it.
            missed.extend(
                copies
                    .iter()
                    .filter(|c| !holders.contains(&c.disk))
                    .map(|c| (c.disk, p.chunk)),
            );
            return match v.record_dirty(&missed).await {
                Ok(()) => err,
                Err(e) => e,
            };
        };
        let mut old = vec![0u8; p.len as usize];
        let read = self
            .read_piece(v, links, p, &mut [&mut old[..]], Some(source))
            .await;
        // Rolled back: the holders, and every other copy that may hold what
        // a holder holds. The stripe lock was let go between the mutation
        // and here, so resync may have copied the chunk from a holder to a
        // copy it is filling (simulation seed 609276 on 4 nodes: a drain's
        // target took the failed write that way and kept it). A current
        // copy, or a resyncing one the chunk is not dirty for, reads as the
        // full copy does once it gets the full copy's content.
        let targets: SmallVec<[&CopySlot; INLINE_COPIES]> = match read {
            Ok(()) => copies
                .iter()
                .enumerate()
                .filter(|&(i, c)| {
                    i != source
                        && (holders.contains(&c.disk)
                            || match c.health() {
                                CopyHealth::Current => true,
                                CopyHealth::Syncing => !v.is_dirty(c.disk, p.chunk),
                                _ => false,
                            })
                })
                .map(|(_, c)| c)
                .collect(),
            Err(e @ VolumeError::Fenced { .. }) => return e,
            Err(e) => {
                // The holders keep it; every full copy lacks it.
                let source = copies[source].disk;
                tracing::warn!(chunk = p.chunk, disk = %source, error = %e, "cannot read the full copy to roll a write back: the full copies are failed instead");
                for c in copies.iter().filter(|c| full.contains(&c.disk)) {
                    v.fail_slot(&layout, c);
                    missed.push((c.disk, p.chunk));
                }
                SmallVec::new()
            }
        };
        let zeros = old.iter().all(|b| *b == 0);
        for c in targets {
            let range = v.range(&p, c);
            let mut tries = 0;
            let result = loop {
                let r = if zeros {
                    v.call(links, c, Request::Discard(range), &[], None).await
                } else {
                    v.call(links, c, Request::Write(range, &[]), &[&old], None)
                        .await
                };
                match r {
                    // Our buffer is stable: damaged in transit, send again.
                    Err(VolumeError::Node {
                        status: Status::BadPayload,
                        ..
                    }) if tries < 3 => tries += 1,
                    r => break r,
                }
            };
            // Read back: the copies must agree from here on (a copy that
            // does not is resynced rather than left to differ).
            let result = match result {
                Ok(()) => {
                    let i = copies
                        .iter()
                        .position(|x| x.disk == c.disk)
                        .expect("a copy of the group");
                    let mut back = vec![0u8; p.len as usize];
                    match self
                        .read_piece(v, links, p, &mut [&mut back[..]], Some(i))
                        .await
                    {
                        Ok(()) if back == old => Ok(()),
                        Ok(()) => {
                            let at = back.iter().zip(&old).position(|(a, b)| a != b);
                            tracing::error!(chunk = p.chunk, offset = p.offset, len = p.len, disk = %c.disk, first_difference = ?at, "a rolled-back copy still differs from the full copy");
                            Err(VolumeError::CopyFailed { disk: c.disk })
                        }
                        Err(e) => Err(e),
                    }
                }
                r => r,
            };
            match result {
                Ok(()) => {}
                Err(e @ VolumeError::Fenced { .. }) => return e,
                Err(e) => {
                    tracing::warn!(chunk = p.chunk, disk = %c.disk, error = %e, "cannot roll back a write the disk had no space for");
                    v.fail_slot(&layout, c);
                    missed.push((c.disk, p.chunk));
                }
            }
        }
        // The rollbacks are writes like others: unflushed until a flush.
        v.note_unflushed(fork, p.chunk);
        if let Err(e) = v.record_dirty(&missed).await {
            return e;
        }
        err
    }

    /// Reads every current copy of `chunk` (bounded by the vDisk size).
    async fn read_copies(
        &self,
        v: &Inner,
        links: &Links,
        chunk: u64,
        report: &mut ScrubReport,
    ) -> Result<Vec<(Uuid, Result<Vec<u8>, VolumeError>)>, VolumeError> {
        let piece = v.whole_chunk(chunk);
        let layout = v.layout();
        let mut out = Vec::new();
        for (i, copy) in layout.group(chunk).iter().enumerate() {
            if copy.health() != CopyHealth::Current {
                continue;
            }
            let mut buf = vec![0u8; piece.len as usize];
            let read = self
                .read_piece(v, links, piece, &mut [&mut buf[..]], Some(i))
                .await;
            report.bytes_read += piece.len as u64;
            match read {
                Ok(()) => out.push((copy.disk, Ok(buf))),
                Err(e @ VolumeError::Fenced { .. }) => return Err(e),
                Err(e) => out.push((copy.disk, Err(e))),
            }
        }
        Ok(out)
    }
}

/// How long a read that found no copy to serve it waits for the copies of
/// its group to change (a move finishing) before it fails.
const READ_SETTLE: Duration = Duration::from_secs(1);

/// The disks of `chunk`'s group that are current now.
fn current_disks(v: &Inner, chunk: u64) -> Vec<Uuid> {
    v.layout()
        .group(chunk)
        .iter()
        .filter(|c| c.health() == CopyHealth::Current)
        .map(|c| c.disk)
        .collect()
}

impl Mirror {
    /// One pass of a read over the copies of its group as they are now.
    async fn read_once(
        &self,
        v: &Inner,
        links: &Links,
        p: Piece,
        out: &mut [&mut [u8]],
        only: Option<usize>,
    ) -> Result<(), VolumeError> {
        let layout = v.layout();
        let copies = layout.group(p.chunk);
        if only.is_some_and(|c| c >= copies.len()) {
            return Err(VolumeError::NoSuchCopy(only.unwrap_or(0)));
        }
        let first = match only {
            Some(c) => c,
            None => layout.read_first[layout.group_index(p.chunk)],
        };
        let tries = if only.is_some() { 1 } else { copies.len() };
        let mut last_err = None;
        let mut corrupt: Vec<&CopySlot> = Vec::new();
        for i in 0..tries {
            let c = &copies[(first + i) % copies.len()];
            if only.is_none() && c.health() != CopyHealth::Current {
                continue;
            }
            let range = v.range(&p, c);
            let link = links.get(c.node);
            let result = match link.read(Request::Read(range), out).await {
                Ok(reply) => v.check_reply(&reply, &link),
                Err(e) => Err(v.node_error(c.node, &link, e)),
            };
            // A copy that failed while the read was in flight (its node
            // rebooted, it missed a write) may have answered with what it
            // lacks: read another.
            let result = match result {
                Ok(()) if only.is_none() && c.health() != CopyHealth::Current => {
                    Err(VolumeError::CopyFailed { disk: c.disk })
                }
                r => r,
            };
            match result {
                Ok(()) => {
                    if !corrupt.is_empty() {
                        // The copies whose checksums failed are repaired by
                        // resync: dirty for this chunk, stale until rewritten.
                        for c in &corrupt {
                            v.fail_slot(&layout, c);
                        }
                        let missed: Vec<(Uuid, u64)> =
                            corrupt.iter().map(|c| (c.disk, p.chunk)).collect();
                        if let Err(e) = v.record_dirty(&missed).await {
                            tracing::warn!(error = %e, "cannot record a corrupt copy for repair");
                        }
                    }
                    return Ok(());
                }
                Err(e @ VolumeError::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(chunk = p.chunk, disk = %c.disk, error = %e, "read from copy failed");
                    if matches!(
                        e,
                        VolumeError::Node {
                            status: Status::Checksum,
                            ..
                        }
                    ) && only.is_none()
                    {
                        corrupt.push(c);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(VolumeError::Degraded {
            group: layout.group_index(p.chunk),
            current: 0,
            needed: 1,
        }))
    }
}

impl Redundancy for Mirror {
    /// Reads from one current copy, failing over to the others. If none
    /// could serve it while the group's copies are changing — a move's
    /// target became current and its source, which the zone already told
    /// its node to free, refused the read before this writer adopted the
    /// new placement — it reads again once they changed, for a bounded
    /// time.
    async fn read_piece(
        &self,
        v: &Inner,
        links: &Links,
        p: Piece,
        out: &mut [&mut [u8]],
        only: Option<usize>,
    ) -> Result<(), VolumeError> {
        let deadline = tokio::time::Instant::now() + READ_SETTLE;
        loop {
            let before = current_disks(v, p.chunk);
            let e = match self.read_once(v, links, p, out, only).await {
                Ok(()) => return Ok(()),
                Err(e @ (VolumeError::Fenced { .. } | VolumeError::NoSuchCopy(_))) => {
                    return Err(e)
                }
                Err(e) if only.is_some() => return Err(e),
                Err(e) => e,
            };
            loop {
                if current_disks(v, p.chunk) != before {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    async fn write_piece(
        &self,
        v: &Inner,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        data: &[&[u8]],
    ) -> Result<(), VolumeError> {
        self.update_piece(v, links, fork, p, Mutation::Write(data))
            .await
    }

    async fn zero_piece(
        &self,
        v: &Inner,
        links: &Links,
        fork: &ForkState,
        p: Piece,
        discard: bool,
    ) -> Result<(), VolumeError> {
        self.update_piece(v, links, fork, p, Mutation::Zero { discard })
            .await
    }

    async fn rebuild_chunk(
        &self,
        v: &Inner,
        links: &Links,
        chunk: u64,
        disk: Uuid,
    ) -> Result<(), VolumeError> {
        let piece = v.whole_chunk(chunk);
        if piece.len == 0 {
            return Ok(());
        }
        let layout = v.layout();
        let Some(slot) = layout.group(chunk).iter().find(|c| c.disk == disk) else {
            // The disk no longer holds this chunk's group: nothing to do.
            return Ok(());
        };
        // The whole extent, zeros past the end of the vDisk: a node that
        // doubts a chunk (a damaged record) trusts it again only once it
        // is rewritten whole.
        let full = Piece {
            len: v.vdisk.placement.chunk_size as u32,
            ..piece
        };
        let mut buf = vec![0u8; full.len as usize];
        self.read_piece(v, links, piece, &mut [&mut buf[..piece.len as usize]], None)
            .await?;
        let range: ChunkRange = v.range(&full, slot);
        // A chunk of zeros is discarded, not written: the copy stays thin.
        if buf.iter().all(|b| *b == 0) {
            return v
                .call(links, slot, Request::Discard(range), &[], None)
                .await;
        }
        // The buffer is ours and stable: a refused payload was damaged in
        // transit, and is sent again.
        let mut tries = 0;
        loop {
            match v
                .call(links, slot, Request::Write(range, &[]), &[&buf], None)
                .await
            {
                Err(VolumeError::Node {
                    status: Status::BadPayload,
                    ..
                }) if tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    async fn scrub_chunk(
        &self,
        v: &Inner,
        links: &Links,
        chunk: u64,
        report: &mut ScrubReport,
    ) -> Result<Vec<Uuid>, VolumeError> {
        let read = self.read_copies(v, links, chunk, report).await?;
        let mut bad = Vec::new();
        let mut good: Vec<(Uuid, Vec<u8>)> = Vec::new();
        for (disk, r) in read {
            match r {
                Ok(data) => good.push((disk, data)),
                Err(VolumeError::Node {
                    status: Status::Checksum,
                    ..
                }) => {
                    tracing::warn!(chunk, %disk, "scrub: checksum failed");
                    report.checksum_errors.push((disk, chunk));
                    bad.push(disk);
                }
                Err(e) => return Err(e),
            }
        }
        // Which content is right: the one most copies hold; on a tie, the
        // one reads are served from.
        let layout = v.layout();
        let copies = layout.group(chunk);
        let preferred = copies[layout.read_first[layout.group_index(chunk)]].disk;
        let votes = |data: &Vec<u8>| good.iter().filter(|(_, d)| d == data).count();
        let winner = good
            .iter()
            .max_by_key(|(disk, data)| (votes(data), *disk == preferred))
            .map(|(_, data)| data.clone());
        if let Some(winner) = winner {
            for (disk, data) in &good {
                if *data != winner {
                    tracing::warn!(chunk, %disk, "scrub: copy differs from the majority");
                    report.mismatches.push((*disk, chunk));
                    bad.push(*disk);
                }
            }
        }
        Ok(bad)
    }
}
