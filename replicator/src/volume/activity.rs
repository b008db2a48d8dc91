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
use std::time::{Duration, Instant};

use tessera_zone::records::ACTIVITY_EXTENT_CHUNKS;
use tessera_zone::service::MarkActive;

use super::Links;
use super::{Inner, CURRENT};
use crate::layout::Piece;
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
    extent: usize,
}

impl Drop for InExtent<'_> {
    fn drop(&mut self) {
        let a = self.activity;
        a.last[self.extent].store(a.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.in_flight[self.extent].fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    async fn log_activity(&self, add: Vec<u64>, remove: Vec<u64>) -> Result<(), VolumeError> {
        self.config
            .api
            .mark_active(
                &self.config.datastore,
                &self.config.name,
                &MarkActive {
                    session: self.session,
                    add,
                    remove,
                },
            )
            .await
            .map(|_| ())
            .map_err(|err| self.api_error(err))
    }

    /// Counts a write into the extent of `chunk`, recording the extent in
    /// the zone first if it is not hot.
    pub(super) async fn enter_extent(&self, chunk: u64) -> Result<InExtent<'_>, VolumeError> {
        let a = &self.activity;
        let e = (chunk / ACTIVITY_EXTENT_CHUNKS) as usize;
        a.in_flight[e].fetch_add(1, Ordering::SeqCst);
        let guard = InExtent {
            activity: a,
            extent: e,
        };
        if a.state[e].load(Ordering::SeqCst) == HOT {
            return Ok(guard);
        }
        let _one = self.recording.lock().await;
        if a.state[e].load(Ordering::SeqCst) != HOT {
            self.log_activity(vec![e as u64], Vec::new()).await?;
            a.state[e].store(HOT, Ordering::SeqCst);
        }
        Ok(guard)
    }

    /// Takes idle extents out of the log.
    pub(super) async fn cool_extents(&self) -> Result<(), VolumeError> {
        let a = &self.activity;
        let now = a.epoch.elapsed().as_millis() as u64;
        let idle = COOL_AFTER.as_millis() as u64;
        let _one = self.recording.lock().await;
        let mut cooling = Vec::new();
        for e in 0..a.state.len() {
            if a.state[e].load(Ordering::SeqCst) != HOT
                || a.in_flight[e].load(Ordering::SeqCst) != 0
                || now.saturating_sub(a.last[e].load(Ordering::Relaxed)) < idle
            {
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
        let next = if recorded.is_ok() { COLD } else { HOT };
        for e in &cooling {
            a.state[*e].store(next, Ordering::SeqCst);
        }
        recorded
    }

    /// After a writer crash: makes every current copy of each extent in
    /// the inherited activity log agree with one current copy, then clears
    /// the log. Returns the chunks rewritten.
    pub(super) async fn reconcile(
        &self,
        links: &Links,
        extents: &[u64],
    ) -> Result<u64, VolumeError> {
        let chunk_size = self.vdisk.placement.chunk_size;
        let mut rewritten = 0;
        for e in extents {
            for c in e * ACTIVITY_EXTENT_CHUNKS..(e + 1) * ACTIVITY_EXTENT_CHUNKS {
                let start = c * chunk_size;
                if start >= self.vdisk.size {
                    break;
                }
                let len = chunk_size.min(self.vdisk.size - start) as u32;
                let piece = Piece {
                    chunk: c,
                    offset: 0,
                    len,
                };
                // The source: what a read would return now.
                let mut good = vec![0u8; len as usize];
                self.read_piece(links, piece, &mut [&mut good[..]], None)
                    .await?;
                let layout = self.layout();
                let copies = layout.group(c);
                for (i, copy) in copies.iter().enumerate() {
                    if copy.state.get() != CURRENT {
                        continue;
                    }
                    let mut other = vec![0u8; len as usize];
                    let same = match self
                        .read_piece(links, piece, &mut [&mut other[..]], Some(i))
                        .await
                    {
                        Ok(()) => other == good,
                        Err(VolumeError::Node { .. }) => false,
                        Err(err) => return Err(err),
                    };
                    if same {
                        continue;
                    }
                    let range = self.range(&piece, copy.disk);
                    let link = &*links.get(copy.node);
                    let frame = if good.iter().all(|b| *b == 0) {
                        link.call(tessera_proto::Request::Discard(range), &[])
                            .await?
                    } else {
                        link.call(tessera_proto::Request::Write(range, &[]), &[&good])
                            .await?
                    };
                    self.check_reply(&frame, link)?;
                    rewritten += 1;
                }
            }
        }
        self.log_activity(Vec::new(), extents.to_vec()).await?;
        Ok(rewritten)
    }
}
