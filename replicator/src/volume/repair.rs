//! Resync: bringing a stale copy back to current while the volume serves.
//!
//! The writer owns resync of its vDisk (it is the only one that can order
//! the copy of a chunk with its own writes to that chunk). For each stale
//! copy whose node answers again, resync:
//!
//! 1. fences the copy with the writer's epoch;
//! 2. copies every chunk the copy missed (its dirty set) from a current
//!    copy, holding the chunk's stripe lock so no write to that chunk runs
//!    meanwhile (writes to degraded groups take it shared); all-zero chunks
//!    are discarded rather than written (thin); chunks that writes dirty
//!    again while resync runs are copied again;
//! 3. records the copied chunks clean in the zone, in batches, only those no
//!    write re-dirtied (both recordings go through one mutex, in order);
//! 4. when nothing is dirty, stops all degraded writes for a moment (every
//!    stripe), flushes the copy, records it current in the zone, and lets
//!    writes go to it again.
//!
//! Its progress is the dirty count in the zone (`tessera vdisk show`); it
//! resumes from the zone's dirty sets after any restart.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::copies::CopyHealth;
use super::dirty::Cleaned;
use super::scheme::Redundancy;
use super::Links;
use super::{stripe, CopySlot, Inner};
use crate::layout::Piece;
use crate::VolumeError;

/// How often stale copies are checked for a returning node.
const PERIOD: Duration = Duration::from_millis(500);
/// Chunks recorded clean per zone update, at most.
const CLEAN_BATCH: usize = 256;

impl Inner {
    /// Runs until `stop` fires or the volume is fenced.
    pub(super) async fn repair_loop(self: Arc<Self>, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let links = self.connect();
        let mut last_scrub = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(PERIOD) => {}
            }
            if let Some(every) = self.config.scrub_interval {
                if last_scrub.elapsed() >= every {
                    last_scrub = Instant::now();
                    let report = tokio::select! {
                        _ = &mut stop => return,
                        r = self.scrub(&links) => r,
                    };
                    match report {
                        Ok(r) => tracing::info!(
                            chunks = r.chunks,
                            checksum_errors = r.checksum_errors.len(),
                            mismatches = r.mismatches.len(),
                            repaired = r.repaired,
                            "background scrub done"
                        ),
                        Err(e) => tracing::warn!(error = %e, "background scrub failed"),
                    }
                }
            }
            if self.fenced.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = self.cool_extents(&links).await {
                tracing::warn!(error = %e, "cannot update the activity log");
            }
            // A copy that failed when nothing was written since (a read's
            // checksum error whose record failed) is recorded now, so that
            // resync takes it.
            if let Err(e) = self.record_dirty(&[]).await {
                tracing::warn!(error = %e, "cannot record failed copies yet");
            }
            // Taken after any placement change settled (see `adopt`), and
            // not held: a layout change must not wait for a whole resync.
            let (stale, slots): (Vec<CopySlot>, Vec<CopySlot>) = {
                let _settled = self.adopting.lock().await;
                let layout = self.layout();
                let slots: Vec<CopySlot> = layout.groups.iter().flatten().cloned().collect();
                let stale = layout
                    .disk_slots()
                    .into_iter()
                    .filter(|s| layout.disk_any(s.disk, |h| h == CopyHealth::Stale))
                    .collect();
                (stale, slots)
            };
            for slot in &stale {
                let mine: Vec<&CopySlot> = slots.iter().filter(|s| s.disk == slot.disk).collect();
                // A request of ours still queued at the node from before the
                // copy failed must not land after resync copied its chunk:
                // fence with the next generation, which refuses it.
                slot.generation.fetch_add(1, Ordering::AcqRel);
                // Is its node back? Fencing it is both the probe and the
                // first step: from now on it refuses every older writer.
                // What its node doubts is recorded dirty first.
                if self.fence_for_resync(&links, slot).await.is_err() {
                    continue;
                }
                // From now on writes to chunks it has go to it as well.
                let mut syncing = false;
                for s in &mine {
                    syncing |= s.state.begin_sync();
                }
                if !syncing {
                    continue;
                }
                let disk = slot.disk;
                let started = Instant::now();
                let before = self.resynced_chunks.load(Ordering::Relaxed);
                let result = tokio::select! {
                    biased;
                    _ = &mut stop => return,
                    r = self.resync(&links, disk) => r,
                };
                let copied = self.resynced_chunks.load(Ordering::Relaxed) - before;
                match result {
                    Ok(()) => tracing::info!(
                        %disk,
                        chunks = copied,
                        bytes = copied * self.vdisk.placement.chunk_size,
                        secs = started.elapsed().as_secs_f64(),
                        "resync done: the copy is current again"
                    ),
                    Err(e) => {
                        tracing::warn!(%disk, chunks = copied, error = %e, "resync interrupted; will retry");
                        // It may have lost writes it took but did not make
                        // stable: record those dirty, and the copy stale.
                        let layout = self.layout();
                        for s in &mine {
                            self.abort_sync(&layout, s);
                        }
                        drop(layout);
                        if let Err(e) = self.record_dirty(&[]).await {
                            tracing::warn!(error = %e, "cannot record the interrupted copy stale");
                        }
                    }
                }
            }
        }
    }

    /// Makes the chunks resync copied to `disk` stable, then records them
    /// clean: a copy that loses power must not come back with chunks the
    /// zone thinks it has.
    async fn settle_copied(
        &self,
        links: &Links,
        disk: Uuid,
        cleaned: &mut Vec<u64>,
    ) -> Result<(), VolumeError> {
        if cleaned.is_empty() {
            return Ok(());
        }
        let slot = self
            .layout()
            .groups
            .iter()
            .flatten()
            .find(|s| s.disk == disk)
            .cloned();
        let Some(slot) = slot else {
            return Ok(());
        };
        self.flush_copied(links, &slot).await?;
        self.record_clean(disk, cleaned, false).await?;
        Ok(())
    }

    /// Flushes `slot`'s copy; then what resync had copied to it before is
    /// stable. (A chunk that a restart of its machine made dirty again
    /// meanwhile is pending, not copied: recording it clean skips it.)
    async fn flush_copied(&self, links: &Links, slot: &CopySlot) -> Result<(), VolumeError> {
        let before: Vec<u64> = {
            let d = self.dirty.lock().expect("dirty poisoned");
            d.copied
                .get(&slot.disk)
                .map(|c| c.iter().copied().collect())
                .unwrap_or_default()
        };
        self.flush_one(links, slot).await?;
        let mut d = self.dirty.lock().expect("dirty poisoned");
        if let Some(copied) = d.copied.get_mut(&slot.disk) {
            for c in &before {
                copied.remove(c);
            }
        }
        Ok(())
    }

    /// Copies every dirty chunk of `disk`, then makes it current.
    async fn resync(&self, links: &Links, disk: Uuid) -> Result<(), VolumeError> {
        let chunk_size = self.vdisk.placement.chunk_size;
        let started = Instant::now();
        let mut copied_bytes = 0u64;
        let mut cleaned: Vec<u64> = Vec::new();
        let mut last_clean = Instant::now();
        loop {
            let mut todo: Vec<u64> = {
                let d = self.dirty.lock().expect("dirty poisoned");
                d.known
                    .get(&disk)
                    .map(|k| k.iter().copied().collect())
                    .unwrap_or_default()
            };
            todo.sort_unstable();
            for c in todo {
                self.check_fenced()?;
                {
                    let _exclusive = self.stripes[stripe(c)].write().await;
                    // Writes take the stripe lock only in groups with a
                    // copy that is not current: a chunk whose group still
                    // has this disk's copy current cannot be copied safely.
                    // Fail that copy first (resync then comes back to it).
                    let layout = self.layout();
                    if !layout.holds(disk, c) {
                        // Not in this chunk's group as far as our layout
                        // knows: a group it left, or one a move put it in
                        // that we have not adopted yet. Copying nothing
                        // must not record the chunk clean: if the zone
                        // still wants it, completing the copy is refused
                        // (still dirty), we adopt its placement and copy it.
                        drop(layout);
                        if let Some(k) = self
                            .dirty
                            .lock()
                            .expect("dirty poisoned")
                            .known
                            .get_mut(&disk)
                        {
                            k.remove(&c);
                        }
                        continue;
                    }
                    if let Some(slot) = layout
                        .group(c)
                        .iter()
                        .find(|s| s.disk == disk && s.health() == CopyHealth::Current)
                    {
                        self.fail_slot(&layout, slot);
                        return Err(VolumeError::Placement(format!(
                            "chunk {c} is dirty for disk {disk} while its copy there is current"
                        )));
                    }
                    drop(layout);
                    let still_dirty = {
                        let mut d = self.dirty.lock().expect("dirty poisoned");
                        let dirty = d.known.get_mut(&disk).is_some_and(|k| k.remove(&c));
                        // Noted before a byte is sent: a restart of its
                        // machine noticed from now on makes it dirty again.
                        if dirty {
                            d.copied.entry(disk).or_default().insert(c);
                        }
                        dirty
                    };
                    if !still_dirty {
                        continue;
                    }
                    if let Err(e) = self.scheme.rebuild_chunk(self, links, c, disk).await {
                        self.dirty
                            .lock()
                            .expect("dirty poisoned")
                            .known
                            .entry(disk)
                            .or_default()
                            .insert(c);
                        return Err(e);
                    }
                }
                self.resynced_chunks.fetch_add(1, Ordering::Relaxed);
                cleaned.push(c);
                copied_bytes += chunk_size;
                // Bandwidth limit: stay under the configured rate on average.
                let due = Duration::from_secs_f64(
                    copied_bytes as f64 / self.config.repair_bandwidth.max(1) as f64,
                );
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
                if cleaned.len() >= CLEAN_BATCH || last_clean.elapsed() > Duration::from_secs(1) {
                    self.settle_copied(links, disk, &mut cleaned).await?;
                    last_clean = Instant::now();
                }
            }
            self.settle_copied(links, disk, &mut cleaned).await?;
            // Nothing left? Switch the copy to current with every degraded
            // write held back, so none can slip between the check and the switch.
            let mut barrier = Vec::with_capacity(self.stripes.len());
            for s in &self.stripes {
                barrier.push(s.write().await);
            }
            let (known_clean, pending) = {
                let d = self.dirty.lock().expect("dirty poisoned");
                (
                    d.known.get(&disk).is_none_or(|k| k.is_empty()),
                    d.pending.iter().any(|(p, _)| *p == disk),
                )
            };
            if pending {
                // A write failed on the copy meanwhile: what it may lack
                // waits to be recorded. Record it (nothing else may, with
                // the guest idle), then copy it.
                drop(barrier);
                self.record_dirty(&[]).await?;
                continue;
            }
            if !known_clean {
                continue;
            }
            let layout = self.layout();
            let first_slot = layout
                .groups
                .iter()
                .flatten()
                .find(|s| s.disk == disk)
                .cloned();
            drop(layout);
            // Every chunk the node doubted is rebuilt: it may trust the copy.
            if let Some(slot) = &first_slot {
                if let Err(e) = self.vouch(links, slot).await {
                    drop(barrier);
                    return Err(e);
                }
            }
            let layout = self.layout();
            let slots: Vec<CopySlot> = layout
                .groups
                .iter()
                .flatten()
                .filter(|s| s.disk == disk)
                .cloned()
                .collect();
            drop(layout);
            let Some(first) = slots.first() else {
                // The disk left the placement meanwhile.
                return Ok(());
            };
            self.flush_copied(links, first).await?;
            // A failure noticed while the flush ran (a restart of the
            // copy's machine, which the flush may not see if another
            // connection accepted it) made it dirty again: the copy is not
            // complete, and the zone must not hear that it is.
            let failed = slots
                .iter()
                .any(|s| matches!(s.health(), CopyHealth::Failing | CopyHealth::Stale));
            let redirtied = {
                let d = self.dirty.lock().expect("dirty poisoned");
                d.pending.iter().any(|(p, _)| *p == disk)
                    || d.known.get(&disk).is_some_and(|k| !k.is_empty())
                    || d.copied.get(&disk).is_some_and(|k| !k.is_empty())
            };
            if failed {
                return Err(VolumeError::Placement(format!(
                    "copy on disk {disk} failed as its resync finished"
                )));
            }
            if redirtied {
                drop(barrier);
                continue;
            }
            let vdisk = match self.record_clean(disk, &mut Vec::new(), true).await? {
                Cleaned::Recorded(v) => Some(v),
                Cleaned::StillDirty(vdisk) => {
                    // A move may have made this disk a target in a group
                    // our layout does not have it in: copying "nothing"
                    // there would record its chunks clean. Adopt the
                    // zone's placement first (writes held by the barrier
                    // must be let go for the old layout to drain).
                    drop(barrier);
                    self.adopt(&vdisk).await?;
                    continue;
                }
                Cleaned::Nothing => None,
            };
            // Every copy slot of the disk: its own, and a move target's. A
            // slot that failed meanwhile stays failing, and whatever a
            // failure recorded dirty meanwhile stays dirty (its set is not
            // dropped: it was empty when checked above).
            for s in &slots {
                s.state.mark_current();
            }
            drop(barrier);
            // A finished move changed the placement: its source leaves.
            if let Some(vdisk) = vdisk {
                self.adopt(&vdisk).await?;
            }
            return Ok(());
        }
    }
}

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubReport {
    /// Chunks whose copies were compared.
    pub chunks: u64,
    /// Bytes read from all copies.
    pub bytes_read: u64,
    /// (disk, chunk) pairs whose stored checksums failed.
    pub checksum_errors: Vec<(Uuid, u64)>,
    /// (disk, chunk) pairs whose data differed from the first good copy.
    pub mismatches: Vec<(Uuid, u64)>,
    /// Copies handed to resync for repair.
    pub repaired: u64,
}

impl Inner {
    /// Verifies every chunk of every current copy (see the scheme's
    /// `scrub_chunk`). A bad copy is recorded dirty for that chunk (resync
    /// rewrites it), unless no copy of the chunk is good.
    pub(super) async fn scrub(&self, links: &Links) -> Result<ScrubReport, VolumeError> {
        let chunk_size = self.vdisk.placement.chunk_size;
        let chunks = self.vdisk.size.div_ceil(chunk_size);
        let started = Instant::now();
        let mut report = ScrubReport::default();
        for c in 0..chunks {
            self.check_fenced()?;
            // No write of the chunk is in flight while its copies are read
            // and compared: a write that reached one copy and not yet the
            // other is not a mismatch (simulation seed 105324 on 4 nodes).
            let exclusive = self.stripes[stripe(c)].write().await;
            let bad = self.scheme.scrub_chunk(self, links, c, &mut report).await?;
            report.chunks += 1;
            let layout = self.layout();
            let current = layout
                .group(c)
                .iter()
                .filter(|s| s.health() == CopyHealth::Current)
                .count();
            if !bad.is_empty() && bad.len() < current {
                for s in layout.group(c).iter().filter(|s| bad.contains(&s.disk)) {
                    self.fail_slot(&layout, s);
                }
                drop(layout);
                let missed: Vec<(Uuid, u64)> = bad.iter().map(|d| (*d, c)).collect();
                self.record_dirty(&missed).await?;
                report.repaired += bad.len() as u64;
            } else if !bad.is_empty() {
                tracing::error!(chunk = c, "scrub: no copy of this chunk is good");
            }
            drop(exclusive);
            let due = Duration::from_secs_f64(
                report.bytes_read as f64 / self.config.repair_bandwidth.max(1) as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(report)
    }

    /// The piece covering all of `chunk` (shorter for the last chunk).
    pub(crate) fn whole_chunk(&self, chunk: u64) -> Piece {
        let chunk_size = self.vdisk.placement.chunk_size;
        let start = chunk * chunk_size;
        let len = chunk_size.min(self.vdisk.size.saturating_sub(start)) as u32;
        Piece {
            chunk,
            offset: 0,
            len,
        }
    }
}
