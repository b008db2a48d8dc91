//! What stale copies miss, what no flush has made stable yet, and how both
//! reach the zone.
//!
//! **Dirty sets.** A copy that missed a write is *stale* and its dirty set
//! lists the chunks it may lack. The writer records both in the zone
//! **before** acknowledging a write that skipped the copy. Records are
//! batched: callers queue their pairs in `pending`, one of them records
//! everything queued (one zone call per disk, in bounded parts), and a
//! failed call puts back everything it did not record.
//!
//! **Unflushed writes.** Every handle keeps the chunks it wrote since the
//! last flush, each with the sequence number of its latest acknowledged
//! write. When a copy fails, every unflushed chunk of its groups becomes
//! dirty for it at that moment (its node may lose power with them in its
//! page cache) — under the same lock that takes the pending records, so no
//! record can miss them. A flush that started at sequence `s` and succeeded
//! forgets only the entries older than `s`, so concurrent flushes never
//! lose each other's chunks and a write acknowledged during a flush stays
//! unflushed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_zone::records::Vdisk;
use tessera_zone::service::{MarkClean, MarkStale};
use uuid::Uuid;

use super::copies::CopyHealth;
use super::{Inner, Layout};
use crate::zone_link::{ZoneCallError, ZoneFailure};
use crate::VolumeError;

/// Chunks named in one `mark_stale` call, at most (bounds the request body).
pub(crate) const STALE_BATCH: usize = 16 * 1024;

/// Dirty chunks of stale copies.
#[derive(Default)]
pub(crate) struct DirtyState {
    /// Recorded in the zone (or being copied by resync).
    pub(crate) known: HashMap<Uuid, HashSet<u64>>,
    /// Waiting to be recorded.
    pub(crate) pending: Vec<(Uuid, u64)>,
    /// Chunks resync wrote to a copy (or is writing) that no flush of that
    /// copy has covered yet. Its machine restarting loses them, and a flush
    /// that reaches the restarted machine says nothing about them: the
    /// failure that notices the restart makes them dirty again (see
    /// [`Inner::fail_disk`]).
    pub(crate) copied: HashMap<Uuid, HashSet<u64>>,
    /// Disks whose node doubted the whole copy (a fence reply's token):
    /// every chunk it holds was recorded dirty; once resync has rebuilt
    /// them all, the node is told so (`Vouch`).
    pub(crate) doubted: HashMap<Uuid, u64>,
}

impl DirtyState {
    /// Queues for recording every chunk resync copied to `disk` that no
    /// flush covered, among those `keep` accepts.
    fn recopy(&mut self, disk: Uuid, keep: impl Fn(u64) -> bool) {
        if let Some(copied) = self.copied.get_mut(&disk) {
            let lost: Vec<u64> = copied.iter().copied().filter(|c| keep(*c)).collect();
            for c in &lost {
                copied.remove(c);
            }
            self.pending.extend(lost.into_iter().map(|c| (disk, c)));
        }
    }
}

/// A handle's own bookkeeping.
#[derive(Default)]
pub(crate) struct ForkState {
    /// Chunk → sequence number of its latest acknowledged mutation that no
    /// flush has covered yet.
    unflushed: std::sync::Mutex<HashMap<u64, u64>>,
    /// Mutations of this handle in flight (`close` waits for them).
    in_flight: AtomicU64,
}

/// A mutation in flight on one handle; ends on drop.
pub(crate) struct Running<'a>(&'a ForkState);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ForkState {
    /// Counts a mutation in, unless the volume is closing or fenced.
    pub(crate) fn start_mutation(&self, inner: &Inner) -> Result<Running<'_>, VolumeError> {
        // Counted before the check (and `close` sets the flag before it
        // reads the counts): one of the two sees the other.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let running = Running(self);
        inner.check_fenced()?;
        if inner.closing.load(Ordering::SeqCst) {
            return Err(VolumeError::Closing);
        }
        Ok(running)
    }
}

/// What recording chunks clean achieved.
pub(crate) enum Cleaned {
    /// Nothing to record.
    Nothing,
    /// Recorded; the vDisk record as it is now.
    Recorded(Box<Vdisk>),
    /// `complete` was refused: the zone knows of chunks the copy still
    /// misses (a move or another record added them); they were added to
    /// the copy's dirty set. The vDisk record is the zone's: a move that
    /// added them may have put the disk in a group the volume's layout does
    /// not have it in yet, so the caller adopts that placement before it
    /// copies them.
    StillDirty(Box<Vdisk>),
}

impl Inner {
    pub(super) fn new_fork(&self) -> Arc<ForkState> {
        let fork = Arc::new(ForkState::default());
        let mut forks = self.forks.lock().expect("forks poisoned");
        forks.retain(|f| f.strong_count() > 0);
        forks.push(Arc::downgrade(&fork));
        fork
    }

    fn live_forks(&self) -> Vec<Arc<ForkState>> {
        self.forks
            .lock()
            .expect("forks poisoned")
            .iter()
            .filter_map(|f| f.upgrade())
            .collect()
    }

    /// Notes an acknowledged mutation of `chunk` as not yet flushed.
    pub(crate) fn note_unflushed(&self, fork: &ForkState, chunk: u64) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        fork.unflushed
            .lock()
            .expect("unflushed poisoned")
            .insert(chunk, seq);
    }

    /// A flush that started at `covered` succeeded: forget what it covered.
    pub(crate) fn forget_unflushed(&self, covered: u64) {
        for f in self.live_forks() {
            f.unflushed
                .lock()
                .expect("unflushed poisoned")
                .retain(|_, seq| *seq >= covered);
        }
    }

    /// Every live handle's unflushed chunks.
    fn all_unflushed(&self) -> BTreeSet<u64> {
        let mut all = BTreeSet::new();
        for f in self.live_forks() {
            all.extend(f.unflushed.lock().expect("unflushed poisoned").keys());
        }
        all
    }

    /// Waits until no handle has a mutation in flight.
    pub(crate) async fn wait_idle(&self) {
        let started = tokio::time::Instant::now();
        let mut warned = false;
        loop {
            let busy: u64 = self
                .live_forks()
                .iter()
                .map(|f| f.in_flight.load(Ordering::SeqCst))
                .sum();
            if busy == 0 {
                return;
            }
            if !warned && started.elapsed() > Duration::from_secs(5) {
                tracing::warn!(busy, "closing: still waiting for writes in flight");
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Whether `disk` misses `chunk` (recorded or about to be).
    pub(crate) fn is_dirty(&self, disk: Uuid, chunk: u64) -> bool {
        let d = self.dirty.lock().expect("dirty poisoned");
        d.known.get(&disk).is_some_and(|k| k.contains(&chunk)) || d.pending.contains(&(disk, chunk))
    }

    /// Every current or resyncing slot of `disk` fails; each one that
    /// changed makes the disk dirty for every unflushed chunk it holds.
    /// Whatever resync copied to it and no flush covered is dirty again in
    /// any case: this is how a restart of its machine is handled, and a
    /// copy that had failed before its resync ended is still being written.
    pub(crate) fn fail_disk(&self, layout: &Layout, disk: Uuid) {
        let mut d = self.dirty.lock().expect("dirty poisoned");
        let mut changed = false;
        for st in layout.slots(disk) {
            changed |= st.fail();
        }
        if changed {
            let unflushed = self.all_unflushed();
            d.pending.extend(
                unflushed
                    .into_iter()
                    .filter(|c| layout.holds(disk, *c))
                    .map(|c| (disk, c)),
            );
        }
        d.recopy(disk, |_| true);
    }

    /// Fails one group's copy (a chunk of it missed a write or failed its
    /// checksum), as `fail_disk` does for the chunks of that group.
    pub(crate) fn fail_slot(&self, layout: &Layout, slot: &super::CopySlot) {
        self.fail_slot_with(layout, slot, |st| st.fail());
    }

    /// A resync of `slot`'s copy stopped: if it was resyncing, it fails.
    pub(crate) fn abort_sync(&self, layout: &Layout, slot: &super::CopySlot) {
        self.fail_slot_with(layout, slot, |st| st.abort_sync());
    }

    fn fail_slot_with(
        &self,
        layout: &Layout,
        slot: &super::CopySlot,
        transition: impl Fn(&super::CopyState) -> bool,
    ) {
        let mut d = self.dirty.lock().expect("dirty poisoned");
        if transition(&slot.state) {
            let group = layout
                .groups
                .iter()
                .position(|g| g.iter().any(|c| Arc::ptr_eq(&c.state, &slot.state)));
            let unflushed = self.all_unflushed();
            d.pending.extend(
                unflushed
                    .into_iter()
                    .filter(|c| Some(layout.group_index(*c)) == group)
                    .map(|c| (slot.disk, c)),
            );
            d.recopy(slot.disk, |c| Some(layout.group_index(c)) == group);
        }
    }

    /// Records in the zone that `missed` (disk, chunk) pairs are dirty, and
    /// every failing copy stale with the chunks it may have lost. Returns
    /// once the zone holds all of it, so writes that skipped those copies
    /// may then be acknowledged. Concurrent callers are batched. A zone that
    /// does not answer is retried for up to `degraded_wait`.
    pub(crate) async fn record_dirty(&self, missed: &[(Uuid, u64)]) -> Result<(), VolumeError> {
        {
            let mut d = self.dirty.lock().expect("dirty poisoned");
            let DirtyState { known, pending, .. } = &mut *d;
            let new: Vec<(Uuid, u64)> = missed
                .iter()
                .filter(|(disk, c)| !known.get(disk).is_some_and(|k| k.contains(c)))
                .copied()
                .collect();
            let failing = self
                .layout()
                .disks
                .iter()
                .any(|(_, _, st)| st.get() == CopyHealth::Failing);
            if new.is_empty() && pending.is_empty() && !failing {
                return Ok(());
            }
            pending.extend(new);
        }
        // Boxed: the zone calls' state is large, and every mutation's
        // future would otherwise carry it.
        Box::pin(self.record_all_pending()).await
    }

    /// Records everything pending, retrying transient zone failures within
    /// the degraded wait.
    async fn record_all_pending(&self) -> Result<(), VolumeError> {
        let _one = self.recording.lock().await;
        let deadline = tokio::time::Instant::now() + self.config.degraded_wait;
        loop {
            match self.record_pending().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot record stale copies yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(self.zone_error(e)),
            }
        }
    }

    /// One attempt at recording everything pending (the caller holds
    /// `recording`). On failure, whatever was not recorded is pending again.
    async fn record_pending(&self) -> Result<(), ZoneCallError> {
        let layout = self.layout();
        let (failing, mut batch) = {
            let mut d = self.dirty.lock().expect("dirty poisoned");
            let failing: Vec<Uuid> = layout
                .disks
                .iter()
                .filter(|(_, _, st)| st.get() == CopyHealth::Failing)
                .map(|(d, _, _)| *d)
                .collect();
            let mut batch: BTreeMap<Uuid, BTreeSet<u64>> = BTreeMap::new();
            for (disk, c) in std::mem::take(&mut d.pending) {
                // A disk that left the placement meanwhile holds nothing to record.
                if layout.has_disk(disk) {
                    batch.entry(disk).or_default().insert(c);
                }
            }
            for disk in &failing {
                batch.entry(*disk).or_default();
            }
            (failing, batch)
        };
        drop(layout);
        while let Some((disk, chunks)) = batch.pop_first() {
            let all: Vec<u64> = chunks.iter().copied().collect();
            let mut parts: Vec<&[u64]> = all.chunks(STALE_BATCH).collect();
            if parts.is_empty() {
                parts.push(&[]);
            }
            for (i, part) in parts.iter().enumerate() {
                let recorded = self
                    .config
                    .zone
                    .mark_stale(
                        &self.config.datastore,
                        &self.config.name,
                        &MarkStale {
                            session: self.session,
                            disks: vec![disk],
                            chunks: part.to_vec(),
                        },
                    )
                    .await;
                if let Err(e) = recorded {
                    // Not recorded: everything from here on is pending again.
                    let mut d = self.dirty.lock().expect("dirty poisoned");
                    d.pending
                        .extend(parts[i..].iter().flat_map(|p| p.iter()).map(|c| (disk, *c)));
                    for (other, rest) in &batch {
                        d.pending.extend(rest.iter().map(|c| (*other, *c)));
                    }
                    return Err(e);
                }
                self.dirty
                    .lock()
                    .expect("dirty poisoned")
                    .known
                    .entry(disk)
                    .or_default()
                    .extend(part.iter().copied());
            }
        }
        for (d, _, st) in &self.layout().disks {
            if failing.contains(d) && st.recorded_stale() {
                tracing::warn!(disk = %d, "copy recorded stale: it serves nothing until resynced");
            }
        }
        Ok(())
    }

    /// Records in the zone that `chunks` of `disk` are clean (those no write
    /// dirtied again meanwhile); with `complete`, that the copy is current.
    /// `chunks` is emptied only once the zone recorded them.
    pub(crate) async fn record_clean(
        &self,
        disk: Uuid,
        chunks: &mut Vec<u64>,
        complete: bool,
    ) -> Result<Cleaned, VolumeError> {
        if chunks.is_empty() && !complete {
            return Ok(Cleaned::Nothing);
        }
        let _one = self.recording.lock().await;
        let clean: Vec<u64> = {
            let d = self.dirty.lock().expect("dirty poisoned");
            chunks
                .iter()
                .copied()
                .filter(|c| {
                    !d.known.get(&disk).is_some_and(|k| k.contains(c))
                        && !d.pending.contains(&(disk, *c))
                })
                .collect()
        };
        let deadline = tokio::time::Instant::now() + self.config.degraded_wait;
        loop {
            let result = self
                .config
                .zone
                .mark_clean(
                    &self.config.datastore,
                    &self.config.name,
                    &MarkClean {
                        session: self.session,
                        disk,
                        chunks: clean.clone(),
                        complete,
                    },
                )
                .await;
            match result {
                Ok(vdisk) => {
                    chunks.clear();
                    return Ok(Cleaned::Recorded(Box::new(vdisk)));
                }
                Err(e) if e.kind == ZoneFailure::StillDirty => {
                    // The zone knows of chunks this copy misses that we do
                    // not (a move's): take them and carry on.
                    let view = self
                        .config
                        .zone
                        .vdisk(&self.config.datastore, &self.config.name)
                        .await
                        .map_err(|e| self.zone_error(e))?;
                    let mut d = self.dirty.lock().expect("dirty poisoned");
                    for e in view.vdisk.dirty.iter().filter(|e| e.disk == disk) {
                        d.known.entry(disk).or_default().extend(e.chunks());
                    }
                    drop(d);
                    tracing::info!(%disk, "the zone lists more chunks for this copy; resync continues");
                    return Ok(Cleaned::StillDirty(Box::new(view.vdisk)));
                }
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(self.zone_error(e)),
            }
        }
    }
}
