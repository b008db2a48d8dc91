//! The writer's activity log: which extents may have writes in flight.
//!
//! Kept in one of two places. With `node_marks` (every node of the vDisk
//! keeps activity marks, protocol version 5), the nodes keep it: a node
//! marks an extent ([`tessera_proto::activity_extent_chunks`] chunks)
//! durably before it runs the first write of a writer's epoch into it, so a
//! write into a cold extent waits for nothing here; cooling an extent sends
//! `Unmark` to every copy, and the open reconciles the extents the fence
//! replies list. Otherwise the zone keeps it: before a write touches an
//! extent ([`ACTIVITY_EXTENT_CHUNKS`] chunks) that is not *hot*, the extent
//! is recorded in the vDisk record. Either way an extent cools — leaves the
//! log — once it has had no write in flight for [`COOL_AFTER`] (for
//! [`COOL_AFTER_MARKS`] with the marks) and a flush covered its writes. If
//! the writer dies, the next open makes every current copy of the logged
//! extents agree before serving (see `reconcile`), so a crash mid-write
//! never leaves copies that answer differently.
//!
//! The write path touches only per-extent atomics while an extent is hot.
//! Entering an extent and cooling it pair up Dekker-style (SeqCst): a write
//! counts itself in flight and then reads the state; cooling marks the
//! extent cooling and then reads the in-flight count; one of them sees the
//! other and the extent stays hot (or is recorded again).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use tessera_zone::records::{Vdisk, ACTIVITY_EXTENT_CHUNKS};
use tessera_zone::service::MarkActive;

use super::copies::CopyHealth;
use super::scheme::Redundancy;
use super::Inner;
use super::Links;
use crate::VolumeError;

const COLD: u8 = 0;
const HOT: u8 = 1;
const COOLING: u8 = 2;

/// An extent of the zone-kept log leaves it after this long without
/// writes (each entry lengthens the vDisk's record).
pub(super) const COOL_AFTER: Duration = Duration::from_secs(5);

/// An extent the nodes mark leaves the log after this long without writes.
/// Marking an extent again costs a durable commit on every copy's node
/// before the write runs (an `fdatasync`, tens of milliseconds when the
/// node's disk is busy with writeback), and a guest writes in periodic
/// bursts (a file system's journal commit every 5 s, its writeback every
/// 30 s): with 5 s the same extents cooled and were marked again at every
/// burst. Longer here costs only a larger reconcile after a writer crash.
pub(super) const COOL_AFTER_MARKS: Duration = Duration::from_secs(60);

/// Per-extent state of the activity log.
pub(crate) struct Activity {
    /// Chunks per extent.
    pub(super) extent_chunks: u64,
    state: Vec<AtomicU8>,
    in_flight: Vec<AtomicU32>,
    /// Milliseconds since `epoch` of the last write's end.
    last: Vec<AtomicU64>,
    /// The volume's sequence number at the last write's end: the extent
    /// may cool only once a flush that started later succeeded.
    last_seq: Vec<AtomicU64>,
    /// Flushes that started before this sequence number succeeded.
    pub(super) flushed_upto: AtomicU64,
    epoch: Instant,
}

impl Activity {
    /// All extents start cold (an inherited log is reconciled and cleared
    /// by the open).
    pub(super) fn new(size: u64, chunk_size: u64, hot: &[u64], extent_chunks: u64) -> Activity {
        let extents = size.div_ceil(chunk_size.saturating_mul(extent_chunks)) as usize;
        let a = Activity {
            extent_chunks,
            state: (0..extents).map(|_| AtomicU8::new(COLD)).collect(),
            in_flight: (0..extents).map(|_| AtomicU32::new(0)).collect(),
            last: (0..extents).map(|_| AtomicU64::new(0)).collect(),
            last_seq: (0..extents).map(|_| AtomicU64::new(0)).collect(),
            flushed_upto: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        for e in hot {
            if let Some(s) = a.state.get(*e as usize) {
                s.store(HOT, Ordering::SeqCst);
            }
        }
        a
    }
}

/// A write in an extent; leaves it on drop.
pub(super) struct InExtent<'a> {
    activity: &'a Activity,
    seq: &'a AtomicU64,
    extent: usize,
}

impl Drop for InExtent<'_> {
    fn drop(&mut self) {
        let a = self.activity;
        a.last[self.extent].store(a.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.last_seq[self.extent].store(self.seq.load(Ordering::SeqCst), Ordering::SeqCst);
        a.in_flight[self.extent].fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    async fn log_activity(&self, add: Vec<u64>, remove: Vec<u64>) -> Result<(), VolumeError> {
        let req = MarkActive {
            session: self.session,
            add,
            remove,
        };
        self.zone_retry(|| {
            self.config
                .zone
                .mark_active(&self.config.datastore, &self.config.name, &req)
        })
        .await
        .map(|_| ())
        .map_err(|err| self.zone_error(err))
    }

    /// Counts a write into the extent of `chunk`, recording the extent in
    /// the zone first if it is not hot (with `node_marks` the node marks
    /// it: nothing to wait for but a cooling of it under way).
    pub(super) async fn enter_extent(&self, chunk: u64) -> Result<InExtent<'_>, VolumeError> {
        let a = &self.activity;
        let e = (chunk / a.extent_chunks) as usize;
        a.in_flight[e].fetch_add(1, Ordering::SeqCst);
        let guard = InExtent {
            activity: a,
            seq: &self.seq,
            extent: e,
        };
        if a.state[e].load(Ordering::SeqCst) == HOT {
            return Ok(guard);
        }
        // Held by a cooling of this extent until its `Unmark` answered: the
        // write must reach the nodes after it, so that they mark again.
        let _one = self.recording.lock().await;
        if a.state[e].load(Ordering::SeqCst) != HOT {
            if !self.node_marks {
                // Boxed (a zone call's state is large): see `record_dirty`.
                Box::pin(self.log_activity(vec![e as u64], Vec::new())).await?;
            }
            a.state[e].store(HOT, Ordering::SeqCst);
        }
        Ok(guard)
    }

    /// Takes idle extents out of the log: those without a write for
    /// [`COOL_AFTER`] (or [`COOL_AFTER_MARKS`]) whose writes a flush made stable (the volume flushes
    /// by itself if the guest has not).
    pub(super) async fn cool_extents(&self, links: &Links) -> Result<(), VolumeError> {
        let a = &self.activity;
        let now = a.epoch.elapsed().as_millis() as u64;
        let idle = if self.node_marks {
            COOL_AFTER_MARKS
        } else {
            COOL_AFTER
        };
        let idle = idle.as_millis() as u64;
        let idle_extents = || {
            (0..a.state.len()).filter(move |e| {
                a.state[*e].load(Ordering::SeqCst) == HOT
                    && a.in_flight[*e].load(Ordering::SeqCst) == 0
                    && now.saturating_sub(a.last[*e].load(Ordering::Relaxed)) >= idle
            })
        };
        let unflushed = idle_extents()
            .any(|e| a.last_seq[e].load(Ordering::SeqCst) >= a.flushed_upto.load(Ordering::SeqCst));
        if unflushed {
            self.flush_with(links, 1).await?;
        }
        let _one = self.recording.lock().await;
        let mut cooling = Vec::new();
        let flushed = a.flushed_upto.load(Ordering::SeqCst);
        for e in idle_extents().collect::<Vec<_>>() {
            if a.last_seq[e].load(Ordering::SeqCst) >= flushed {
                continue;
            }
            a.state[e].store(COOLING, Ordering::SeqCst);
            if a.in_flight[e].load(Ordering::SeqCst) != 0 {
                a.state[e].store(HOT, Ordering::SeqCst);
                continue;
            }
            cooling.push(e);
        }
        if cooling.is_empty() {
            return Ok(());
        }
        let extents: Vec<u64> = cooling.iter().map(|e| *e as u64).collect();
        let recorded = if self.node_marks {
            self.unmark(links, &extents, None).await;
            Ok(())
        } else {
            self.log_activity(Vec::new(), extents).await
        };
        // Cold either way: if the zone did not take the removal, the extent
        // stays in its log (harmless: the next open reconciles it), and the
        // next write here records it again rather than going unlogged.
        for e in &cooling {
            a.state[*e].store(COLD, Ordering::SeqCst);
        }
        recorded
    }

    /// After a writer crash: makes every current copy of each extent in
    /// the inherited activity log agree with what a read returns, makes
    /// the rewrites stable, then clears the log. Returns the chunks
    /// rewritten.
    pub(super) async fn reconcile(
        &self,
        links: &Links,
        extents: &[u64],
    ) -> Result<u64, VolumeError> {
        let mut rewritten = 0;
        // Copies that are not current when their chunk is reconciled (one
        // failed a checksum on an earlier chunk): each may lack what the
        // previous writer had in flight, so each is dirty for the chunk
        // (simulation seed 263645 on 4 nodes).
        let mut missed = Vec::new();
        for c in extent_chunks(&self.vdisk, extents) {
            let piece = self.whole_chunk(c);
            // The source: what a read would return now.
            let mut good = vec![0u8; piece.len as usize];
            self.scheme
                .read_piece(self, links, piece, &mut [&mut good[..]], None)
                .await?;
            // Copies whose own content became the source because they had
            // no space for the first one's (each at most once).
            let mut full: Vec<Uuid> = Vec::new();
            'chunk: loop {
                let layout = self.layout();
                for (i, copy) in layout.group(c).iter().enumerate() {
                    if copy.health() != CopyHealth::Current {
                        if !missed.contains(&(copy.disk, c)) {
                            missed.push((copy.disk, c));
                        }
                        continue;
                    }
                    let mut other = vec![0u8; piece.len as usize];
                    let read = match self
                        .scheme
                        .read_piece(self, links, piece, &mut [&mut other[..]], Some(i))
                        .await
                    {
                        Ok(()) => true,
                        Err(VolumeError::Node { .. }) => false,
                        Err(err) => return Err(err),
                    };
                    if read && other == good {
                        continue;
                    }
                    let range = self.range(&piece, copy);
                    let result = if good.iter().all(|b| *b == 0) {
                        self.call(
                            links,
                            copy,
                            tessera_proto::Request::Discard(range),
                            &[],
                            None,
                        )
                        .await
                    } else {
                        self.call(
                            links,
                            copy,
                            tessera_proto::Request::Write(range, &[]),
                            &[&good],
                            None,
                        )
                        .await
                    };
                    match result {
                        Ok(()) => rewritten += 1,
                        // Its disk is full: the writer that crashed had
                        // acknowledged neither content, so the copies may
                        // agree on this one's instead, which it holds
                        // without more space (an open must not fail for a
                        // full disk). Every copy is compared again.
                        Err(VolumeError::Node {
                            status: tessera_proto::Status::NoSpace,
                            ..
                        }) if read && !full.contains(&copy.disk) => {
                            tracing::warn!(chunk = c, disk = %copy.disk, "no space to reconcile a copy: the others take its content");
                            full.push(copy.disk);
                            good = other;
                            continue 'chunk;
                        }
                        Err(err) => return Err(err),
                    }
                }
                break;
            }
        }
        self.record_dirty(&missed).await?;
        // The copies agree in the page cache; they must agree on stable
        // media before the log that names these extents is gone.
        if !extents.is_empty() {
            self.flush_with(links, 1).await?;
        }
        if !self.vdisk.activity.is_empty() {
            self.log_activity(Vec::new(), self.vdisk.activity.clone())
                .await?;
        }
        if self.node_marks {
            // Every mark older than this writer (and its reconciling
            // rewrites'): no guest write has run yet.
            self.unmark(links, &[], None).await;
        }
        Ok(rewritten)
    }

    /// Sends `Unmark` for `extents` (none: all) to every copy's node that
    /// takes writes, clearing marks up to `upto` (`None`: this writer's
    /// own too). Best effort: a mark left behind costs a needless
    /// reconcile of its extent after a writer crash, nothing more.
    pub(super) async fn unmark(&self, links: &Links, extents: &[u64], upto: Option<u64>) {
        let layout = self.layout();
        let slots: Vec<_> = layout
            .disk_slots()
            .into_iter()
            .filter(|s| layout.disk_any(s.disk, |h| h.takes_flushes()))
            .collect();
        drop(layout);
        self.unmark_on(links, &slots, extents, upto).await;
    }

    /// [`Inner::unmark`] on the nodes of `slots`.
    pub(super) async fn unmark_on(
        &self,
        links: &Links,
        slots: &[super::CopySlot],
        extents: &[u64],
        upto: Option<u64>,
    ) {
        let list = tessera_proto::UnmarkRef::encode_extents(extents);
        let calls = slots.iter().map(|slot| {
            let epoch = self.wire_epoch(slot);
            let req = tessera_proto::Request::Unmark(
                tessera_proto::UnmarkRef {
                    vref: tessera_proto::VdiskRef {
                        vdisk: *self.vdisk.uuid.as_bytes(),
                        disk: *slot.disk.as_bytes(),
                        epoch,
                    },
                    count: extents.len() as u32,
                    upto: upto.unwrap_or(u64::MAX),
                },
                &list,
            );
            async move { (slot.disk, self.call(links, slot, req, &[], None).await) }
        });
        for (disk, r) in futures_util::future::join_all(calls).await {
            if let Err(e) = r {
                tracing::debug!(%disk, error = %e, "cannot clear activity marks; they stay");
            }
        }
    }

    /// Which extents an earlier writer may have left in flight, in the
    /// zone's extents of [`ACTIVITY_EXTENT_CHUNKS`] chunks.
    pub(super) fn inherited_extents(&self) -> Vec<u64> {
        let mut all = self.vdisk.activity.clone();
        all.extend(self.inherited.lock().expect("inherited poisoned").iter());
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The zone extents covering node extents `marks` (a fence reply's), or
    /// every extent of the vDisk if the node lost its marks.
    pub(super) fn marked_extents(&self, reply: &tessera_proto::FenceReply) -> Vec<u64> {
        let chunk_size = self.vdisk.placement.chunk_size;
        let chunks = self.vdisk.size.div_ceil(chunk_size);
        let zone_extents = chunks.div_ceil(ACTIVITY_EXTENT_CHUNKS);
        if reply.marks_lost {
            return (0..zone_extents).collect();
        }
        let n = self.activity.extent_chunks;
        let mut out = Vec::new();
        for (x, epoch) in &reply.marks {
            if epoch >> super::GENERATION_BITS >= self.epoch {
                continue;
            }
            let first = x.saturating_mul(n).min(chunks);
            let end = x.saturating_add(1).saturating_mul(n).min(chunks);
            if first >= end {
                continue;
            }
            let (lo, hi) = (
                first / ACTIVITY_EXTENT_CHUNKS,
                end.div_ceil(ACTIVITY_EXTENT_CHUNKS),
            );
            out.extend(lo..hi.min(zone_extents));
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The chunks of the activity-log `extents` that lie inside `vdisk`.
pub(super) fn extent_chunks<'a>(
    vdisk: &'a Vdisk,
    extents: &'a [u64],
) -> impl Iterator<Item = u64> + 'a {
    let chunks = vdisk.size.div_ceil(vdisk.placement.chunk_size);
    extents.iter().flat_map(move |e| {
        let first = e.saturating_mul(ACTIVITY_EXTENT_CHUNKS);
        let end = e
            .saturating_add(1)
            .saturating_mul(ACTIVITY_EXTENT_CHUNKS)
            .min(chunks);
        first..end.max(first)
    })
}
