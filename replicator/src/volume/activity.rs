//! The writer's activity log: which extents may have writes in flight.
//!
//! Before a write touches an extent ([`ACTIVITY_EXTENT_CHUNKS`] chunks) that
//! is not *hot*, the extent is recorded in the zone (batched, like dirty
//! chunks). An extent cools — leaves the log — once it has had no write in
//! flight for [`COOL_AFTER`]. If the writer dies, the next open finds the
//! log non-empty and makes every current copy of those extents agree before
//! serving (see `reconcile`), so a crash mid-write never leaves copies that
//! answer differently.
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

/// An extent leaves the log after this long without writes.
pub(super) const COOL_AFTER: Duration = Duration::from_secs(5);

/// Per-extent state of the activity log.
pub(crate) struct Activity {
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
    pub(super) fn new(size: u64, chunk_size: u64, hot: &[u64]) -> Activity {
        let extents = size.div_ceil(chunk_size * ACTIVITY_EXTENT_CHUNKS) as usize;
        let a = Activity {
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
    /// the zone first if it is not hot.
    pub(super) async fn enter_extent(&self, chunk: u64) -> Result<InExtent<'_>, VolumeError> {
        let a = &self.activity;
        let e = (chunk / ACTIVITY_EXTENT_CHUNKS) as usize;
        a.in_flight[e].fetch_add(1, Ordering::SeqCst);
        let guard = InExtent {
            activity: a,
            seq: &self.seq,
            extent: e,
        };
        if a.state[e].load(Ordering::SeqCst) == HOT {
            return Ok(guard);
        }
        let _one = self.recording.lock().await;
        if a.state[e].load(Ordering::SeqCst) != HOT {
            // Boxed (a zone call's state is large): see `record_dirty`.
            Box::pin(self.log_activity(vec![e as u64], Vec::new())).await?;
            a.state[e].store(HOT, Ordering::SeqCst);
        }
        Ok(guard)
    }

    /// Takes idle extents out of the log: those without a write for
    /// [`COOL_AFTER`] whose writes a flush made stable (the volume flushes
    /// by itself if the guest has not).
    pub(super) async fn cool_extents(&self, links: &Links) -> Result<(), VolumeError> {
        let a = &self.activity;
        let now = a.epoch.elapsed().as_millis() as u64;
        let idle = COOL_AFTER.as_millis() as u64;
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
        let recorded = self
            .log_activity(Vec::new(), cooling.iter().map(|e| *e as u64).collect())
            .await;
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
        self.flush_with(links, 1).await?;
        self.log_activity(Vec::new(), extents.to_vec()).await?;
        Ok(rewritten)
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
