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
use std::time::{Duration, Instant};

use tessera_proto::{ChunkRange, Request, VdiskRef};
use tessera_zone::service::MarkClean;
use uuid::Uuid;

use super::Links;
use super::{stripe, Inner, CURRENT, STALE, SYNCING};
use crate::layout::Piece;
use crate::VolumeError;

/// A disk's copy slot state, as the repair loop holds it.
type Slot = (Uuid, Arc<super::CopyState>);

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
            if let Err(e) = self.cool_extents().await {
                tracing::warn!(error = %e, "cannot update the activity log");
            }
            // Taken after any placement change settled (see `adopt`), and
            // not held: a layout change must not wait for a whole resync.
            let (stale, slots): (Vec<(Uuid, usize)>, Vec<Slot>) = {
                let _settled = self.adopting.lock().await;
                let layout = self.layout();
                let slots = layout
                    .disks
                    .iter()
                    .map(|(d, _, st)| (*d, st.clone()))
                    .collect();
                (layout.disks_where(|st| st == STALE), slots)
            };
            for (disk, node) in &stale {
                let mine: Vec<&Arc<super::CopyState>> = slots
                    .iter()
                    .filter(|(d, _)| d == disk)
                    .map(|(_, st)| st)
                    .collect();
                // Is its node back? Fencing it is both the probe and the
                // first step: from now on it refuses every older writer.
                if self.fence_one(&links, *disk, *node).await.is_err() {
                    continue;
                }
                // From now on writes to chunks it has go to it as well.
                let mut syncing = false;
                for st in &mine {
                    syncing |=
                        st.0.compare_exchange(STALE, SYNCING, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok();
                }
                if !syncing {
                    continue;
                }
                let started = Instant::now();
                let before = self.resynced_chunks.load(Ordering::Relaxed);
                let result = tokio::select! {
                    _ = &mut stop => return,
                    r = self.resync(&links, *disk, *node) => r,
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
                        for st in &mine {
                            st.fail();
                        }
                        if let Err(e) = self.record_dirty(&[]).await {
                            tracing::warn!(error = %e, "cannot record the interrupted copy stale");
                        }
                    }
                }
            }
        }
    }

    /// Raises the vDisk's epoch on one copy to ours.
    pub(super) async fn fence_one(
        &self,
        links: &Links,
        disk: Uuid,
        node: usize,
    ) -> Result<(), VolumeError> {
        let link = &*links.get(node);
        let frame = link
            .call(
                Request::Fence(VdiskRef {
                    vdisk: *self.vdisk.uuid.as_bytes(),
                    disk: *disk.as_bytes(),
                    epoch: self.epoch,
                }),
                &[],
            )
            .await?;
        self.check_reply(&frame, link)
    }

    /// Copies every dirty chunk of `disk`, then makes it current.
    async fn resync(&self, links: &Links, disk: Uuid, node: usize) -> Result<(), VolumeError> {
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
                    let still_dirty = self
                        .dirty
                        .lock()
                        .expect("dirty poisoned")
                        .known
                        .get_mut(&disk)
                        .is_some_and(|k| k.remove(&c));
                    if !still_dirty {
                        continue;
                    }
                    if let Err(e) = self.copy_chunk(links, c, disk, node).await {
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
                    self.record_clean(disk, &mut cleaned, false).await?;
                    last_clean = Instant::now();
                }
            }
            self.record_clean(disk, &mut cleaned, false).await?;
            // Nothing left? Switch the copy to current with every degraded
            // write held back, so none can slip between the check and the switch.
            let mut barrier = Vec::with_capacity(self.stripes.len());
            for s in &self.stripes {
                barrier.push(s.write().await);
            }
            let clean = {
                let d = self.dirty.lock().expect("dirty poisoned");
                d.known.get(&disk).is_none_or(|k| k.is_empty())
                    && !d.pending.iter().any(|(p, _)| *p == disk)
            };
            if !clean {
                continue;
            }
            self.flush_one(links, disk, node).await?;
            let vdisk = self.record_clean(disk, &mut Vec::new(), true).await?;
            // Every copy slot of the disk: its own, and a move target's.
            for st in self.layout().slots(disk) {
                st.0.store(CURRENT, Ordering::Release);
            }
            self.dirty
                .lock()
                .expect("dirty poisoned")
                .known
                .remove(&disk);
            drop(barrier);
            // A finished move changed the placement: its source leaves.
            if let Some(vdisk) = vdisk {
                self.adopt(&vdisk).await?;
            }
            return Ok(());
        }
    }

    /// Copies chunk `c` from a current copy to `disk`.
    async fn copy_chunk(
        &self,
        links: &Links,
        c: u64,
        disk: Uuid,
        node: usize,
    ) -> Result<(), VolumeError> {
        let chunk_size = self.vdisk.placement.chunk_size;
        let start = c * chunk_size;
        if start >= self.vdisk.size {
            return Ok(());
        }
        let len = chunk_size.min(self.vdisk.size - start) as u32;
        let piece = Piece {
            chunk: c,
            offset: 0,
            len,
        };
        let mut buf = vec![0u8; len as usize];
        self.read_piece(links, piece, &mut [&mut buf[..]], None)
            .await?;
        let range = ChunkRange {
            vdisk: *self.vdisk.uuid.as_bytes(),
            disk: *disk.as_bytes(),
            chunk: c,
            offset: 0,
            len,
            epoch: self.epoch,
        };
        let link = &*links.get(node);
        // A chunk of zeros is discarded, not written: the copy stays thin.
        let frame = if buf.iter().all(|b| *b == 0) {
            link.call(Request::Discard(range), &[]).await?
        } else {
            link.call(Request::Write(range, &[]), &[&buf]).await?
        };
        self.check_reply(&frame, link)
    }

    /// Records in the zone that `chunks` of `disk` are clean (those no write
    /// dirtied again meanwhile); with `complete`, that the copy is current.
    async fn record_clean(
        &self,
        disk: Uuid,
        chunks: &mut Vec<u64>,
        complete: bool,
    ) -> Result<Option<tessera_zone::records::Vdisk>, VolumeError> {
        if chunks.is_empty() && !complete {
            return Ok(None);
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
        chunks.clear();
        let vdisk = self
            .config
            .api
            .mark_clean(
                &self.config.datastore,
                &self.config.name,
                &MarkClean {
                    session: self.session,
                    disk,
                    chunks: clean,
                    complete,
                },
            )
            .await
            .map_err(|e| self.api_error(e))?;
        Ok(Some(vdisk))
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
    /// Reads every chunk from every current copy and compares them. A copy
    /// whose checksum fails, or whose data differs from the first good copy,
    /// is recorded dirty for that chunk: resync rewrites it.
    pub(super) async fn scrub(&self, links: &Links) -> Result<ScrubReport, VolumeError> {
        let chunk_size = self.vdisk.placement.chunk_size;
        let chunks = self.vdisk.size.div_ceil(chunk_size);
        let started = Instant::now();
        let mut report = ScrubReport::default();
        for c in 0..chunks {
            self.check_fenced()?;
            let start = c * chunk_size;
            let len = chunk_size.min(self.vdisk.size - start) as u32;
            let piece = Piece {
                chunk: c,
                offset: 0,
                len,
            };
            let layout = self.layout();
            let copies = layout.group(c);
            let mut first: Option<Vec<u8>> = None;
            let mut bad: Vec<Uuid> = Vec::new();
            for (i, copy) in copies.iter().enumerate() {
                if copy.state.get() != CURRENT {
                    continue;
                }
                let mut buf = vec![0u8; len as usize];
                let read = self
                    .read_piece(links, piece, &mut [&mut buf[..]], Some(i))
                    .await;
                report.bytes_read += len as u64;
                match read {
                    Ok(()) => match &first {
                        None => first = Some(buf),
                        Some(good) if *good != buf => {
                            tracing::warn!(chunk = c, disk = %copy.disk, "scrub: copy differs");
                            report.mismatches.push((copy.disk, c));
                            bad.push(copy.disk);
                        }
                        Some(_) => {}
                    },
                    Err(VolumeError::Node {
                        status: tessera_proto::Status::Checksum,
                        ..
                    }) => {
                        tracing::warn!(chunk = c, disk = %copy.disk, "scrub: checksum failed");
                        report.checksum_errors.push((copy.disk, c));
                        bad.push(copy.disk);
                    }
                    Err(e) => return Err(e),
                }
            }
            report.chunks += 1;
            if first.is_some() && !bad.is_empty() {
                let _exclusive = self.stripes[stripe(c)].write().await;
                for d in &bad {
                    if let Some(copy) = copies.iter().find(|x| x.disk == *d) {
                        let _ = copy.state.0.compare_exchange(
                            CURRENT,
                            super::FAILING,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                }
                let missed: Vec<(Uuid, u64)> = bad.iter().map(|d| (*d, c)).collect();
                self.record_dirty(&missed).await?;
                report.repaired += bad.len() as u64;
            }
            let due = Duration::from_secs_f64(
                report.bytes_read as f64 / self.config.repair_bandwidth.max(1) as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(report)
    }
}
