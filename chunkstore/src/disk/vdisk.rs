//! Per-vDisk operations: epoch fencing and deletion.
//!
//! A vDisk's *gate* is held shared by every write and discard (for the whole
//! operation, epoch check included) and exclusively by `fence` and
//! `delete_vdisk`. So once `fence(e)` returns, no write with an older epoch is
//! still in flight, and a deletion never races an allocation of its vDisk.
//!
//! An epoch raise is written to every copy of the vDisk's slot and synced
//! before it takes effect: a raise that returned survives power loss.

use uuid::Uuid;

use super::{read, write, Disk};
use crate::record::EpochSlot;
use crate::Error;

/// What a fence found (see [`Disk::fence_report`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// The vDisk's epoch after the fence.
    pub epoch: u64,
    /// The vDisk's epoch was last raised during the machine's current boot
    /// (as [`Disk::set_boot`] names it): whatever the writers since then
    /// wrote is still here, page cache included. False when the machine
    /// restarted since, or when that is not known.
    pub same_boot: bool,
    /// Chunks of the vDisk this disk cannot vouch for; `None` if none.
    pub doubt: Option<Doubt>,
}

/// What a disk doubts of a vDisk's copy: damaged metadata (a lost block
/// map, an extent record naming no owner or naming these chunks) may hide
/// where their data is, so they read as [`Error::OwnershipUnknown`] until
/// rewritten whole. A writer rebuilds what is doubted; after it rebuilt the
/// whole copy, [`Disk::vouch`] with `token` makes the rest trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doubt {
    /// Names this open of the disk: a vouch quoting another is refused.
    pub token: u64,
    /// Every chunk not set whole since this open (or the damage) is in
    /// doubt: the writer must rebuild the whole copy.
    pub whole: bool,
    /// Chunks damaged extent records name (sorted).
    pub named: Vec<u64>,
}

/// A token no other open of any disk has had in this process, nor likely
/// in any other: the time mixed with a counter, never 0.
pub(super) fn new_doubt_token() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (now ^ u64::from(std::process::id()).rotate_left(40))
        .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .max(1)
}

impl Disk {
    /// Names the machine's current boot (a tag of its boot identity, not 0)
    /// for the epoch raises from now on.
    pub fn set_boot(&self, boot: u64) {
        self.boot.store(boot, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`Disk::fence`], also telling whether the previous raise of the
    /// vDisk's epoch happened during this boot — a new writer learns so
    /// whether this copy may have lost writes its predecessor had
    /// acknowledged but not flushed: the machine lost power in between —
    /// and which chunks of the copy the disk doubts ([`Doubt`]).
    pub fn fence_report(&self, vdisk: Uuid, epoch: u64) -> Result<Fenced, Error> {
        let boot = self.boot.load(std::sync::atomic::Ordering::Relaxed);
        let before = self.state().epoch_boot(vdisk);
        let epoch = self.fence(vdisk, epoch)?;
        let (whole, named) = self.state().doubt(vdisk);
        Ok(Fenced {
            epoch,
            same_boot: boot != 0 && before == boot,
            doubt: (whole || !named.is_empty()).then_some(Doubt {
                token: self.doubt_token,
                whole,
                named,
            }),
        })
    }

    /// The writer at `epoch` rebuilt every chunk of its copy of `vdisk` on
    /// this disk since a fence reported [`Doubt`] with `token`: from now on
    /// no chunk of the vDisk is in doubt for want of an owner (on format
    /// v3 this outlives a restart; on v2 it lasts until the disk is
    /// closed). Returns `false`, changing nothing, if `token` is not this
    /// open's (the disk was reopened since: what was rebuilt before may be
    /// in doubt again). Fails with [`Error::StaleEpoch`] for an older
    /// writer.
    pub fn vouch(&self, vdisk: Uuid, epoch: u64, token: u64) -> Result<bool, Error> {
        self.admitted(vdisk, epoch, || {
            if token != self.doubt_token {
                return Ok(false);
            }
            let (whole, lost) = {
                let st = self.state();
                (st.doubt(vdisk).0, st.index_lost())
            };
            if !whole {
                return Ok(true);
            }
            if let (Some(t), true) = (&self.thin, lost) {
                let mut ix = t.index();
                self.log(
                    &mut ix,
                    &[crate::mlog::Record::Trusted {
                        vdisk,
                        chunk: crate::state::VOUCHED,
                    }],
                )?;
            }
            self.state().vouch(vdisk);
            tracing::info!(%vdisk, "every chunk of the vDisk's copy was rebuilt: trusted again");
            Ok(true)
        })
    }

    /// Raises the vDisk's stored epoch to `max(stored, epoch)` and returns it.
    ///
    /// A raise is written to every copy of the epoch slot and synced
    /// (fdatasync) before this returns, and waits for in-flight writes of the
    /// vDisk. After epoch slots were lost ([`Error::FenceUnknown`]), a fence
    /// at or above the stored epoch confirms the vDisk's fence (and is
    /// written likewise). Fails with [`Error::NoSpace`] if a new vDisk needs
    /// a slot and the epoch table is full.
    pub fn fence(&self, vdisk: Uuid, epoch: u64) -> Result<u64, Error> {
        loop {
            let gate = self.state().gate(vdisk);
            let g = write(&gate);
            if g.retired {
                continue; // deleted meanwhile: use the new entry
            }
            let (slot, current, confirmed, trust) = {
                let st = self.state();
                (
                    st.slot(vdisk),
                    st.epoch(vdisk),
                    st.confirmed(vdisk),
                    st.loss_serial(),
                )
            };
            if epoch < current || (epoch == current && confirmed) {
                return Ok(current);
            }
            let (slot, fresh) = match slot {
                Some(s) => (s, false),
                None => (self.state().take_slot().ok_or(Error::NoSpace)?, true),
            };
            let boot = self.boot.load(std::sync::atomic::Ordering::Relaxed);
            let written = self
                .write_slot(
                    slot,
                    &EpochSlot::Used {
                        vdisk,
                        epoch,
                        trust,
                        boot,
                    },
                )
                .and_then(|()| self.sync("make an epoch raise durable (fdatasync)"));
            if let Err(e) = written {
                if fresh {
                    self.state().return_slot(slot);
                }
                return Err(e);
            }
            self.state().set_epoch(vdisk, slot, epoch, trust, boot);
            return Ok(epoch);
        }
    }

    /// Frees every extent of the vDisk and its epoch slot; returns the
    /// number of extents freed.
    pub fn delete_vdisk(&self, vdisk: Uuid) -> Result<u64, Error> {
        self.free_vdisk(vdisk, false)
    }

    /// Frees the vDisk's copy on this disk because it moved to another
    /// disk, as [`Disk::delete_vdisk`] does; then, until this `Disk` is
    /// closed, every chunk of the vDisk reads as
    /// [`Error::OwnershipUnknown`] instead of zeros (and takes only a write
    /// or discard of the whole chunk) until it is set whole again: a writer
    /// that has not adopted the placement without this copy yet may still
    /// read it, and must fail over to another copy rather than read zeros.
    /// A move back to this disk rewrites every chunk of its group whole.
    pub fn free_moved_copy(&self, vdisk: Uuid) -> Result<u64, Error> {
        self.free_vdisk(vdisk, true)
    }

    /// Frees the chunks of placement groups `groups` of the vDisk's copy
    /// on this disk (chunk `c` is in group `c % stripes`) because they
    /// moved to another disk, while the disk keeps the vDisk's other
    /// groups (and its epoch). As with [`Disk::free_moved_copy`], until
    /// this `Disk` is closed every chunk of those groups reads as
    /// [`Error::OwnershipUnknown`] until it is set whole again. Returns the
    /// number of chunks freed. Idempotent.
    pub fn free_moved_groups(
        &self,
        vdisk: Uuid,
        stripes: u32,
        groups: &[u32],
    ) -> Result<u64, Error> {
        if stripes == 0 || groups.iter().any(|g| *g >= stripes) {
            return Err(Error::InvalidGroups { stripes });
        }
        let in_groups = |c: u64| groups.contains(&((c % u64::from(stripes)) as u32));
        loop {
            let gate = self.state().gate(vdisk);
            let g = write(&gate);
            if g.retired {
                continue;
            }
            // Before any chunk is freed: a read that finds a chunk gone
            // finds it uncertain too.
            self.state().set_groups_moved_away(vdisk, stripes, groups);
            return self.free_chunks_of(vdisk, in_groups);
        }
    }

    /// Frees the vDisk's chunks that `which` selects (the caller holds the
    /// vDisk's gate exclusively); returns how many held space.
    fn free_chunks_of(&self, vdisk: Uuid, which: impl Fn(u64) -> bool) -> Result<u64, Error> {
        let mut freed = 0;
        if let Some(t) = &self.thin {
            let chunks = t.index().map.chunks_of(vdisk);
            for chunk in chunks.into_iter().filter(|c| which(*c)) {
                let key = (vdisk, chunk);
                let _stripe = write(self.stripe(&key));
                if self.thin_free(&key, 0, t.blocks_per_chunk)? > 0 {
                    freed += 1;
                }
            }
        }
        let chunks = self.state().chunks_of(vdisk);
        for (chunk, _) in chunks.into_iter().filter(|(c, _)| which(*c)) {
            let key = (vdisk, chunk);
            let _stripe = write(self.stripe(&key));
            let mapping = self.state().lookup(&key);
            if let Some(m) = mapping {
                self.free_chunk(&key, m.extent)?;
                freed += 1;
            }
        }
        Ok(freed)
    }

    fn free_vdisk(&self, vdisk: Uuid, moved: bool) -> Result<u64, Error> {
        loop {
            let gate = self.state().gate(vdisk);
            let mut g = write(&gate);
            if g.retired {
                continue;
            }
            // Before any chunk is freed: a read that finds a chunk gone
            // finds it uncertain too.
            self.state().set_moved_away(vdisk, moved);
            // No write of this vDisk is in flight (we hold its gate), so every
            // mapping is committed and stays put.
            let freed = self.free_chunks_of(vdisk, |_| true)?;
            let damaged = self.state().take_suspects_of(vdisk);
            self.free_damaged(&damaged);
            let slot = self.state().slot(vdisk);
            if let Some(s) = slot {
                self.write_slot(s, &EpochSlot::Free)?;
            }
            self.state().remove_vdisk(vdisk);
            g.retired = true;
            return Ok(freed);
        }
    }

    /// Runs `f` (a write or discard at `epoch`) while holding the vDisk's
    /// gate shared, after checking `epoch` against the stored one. A newer
    /// epoch is fenced first.
    pub(super) fn admitted<T>(
        &self,
        vdisk: Uuid,
        epoch: u64,
        f: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        loop {
            let gate = self.state().gate(vdisk);
            let g = read(&gate);
            if g.retired {
                continue;
            }
            let (current, confirmed) = {
                let st = self.state();
                (st.epoch(vdisk), st.confirmed(vdisk))
            };
            if epoch < current {
                return Err(Error::StaleEpoch {
                    vdisk,
                    current,
                    got: epoch,
                });
            }
            if !confirmed {
                return Err(Error::FenceUnknown { vdisk });
            }
            if epoch > current {
                drop(g);
                self.fence(vdisk, epoch)?;
                continue;
            }
            return f();
        }
    }
}
