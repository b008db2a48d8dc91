//! Per-vDisk operations: epoch fencing and deletion.
//!
//! A vDisk's *gate* is held shared by every write and discard (for the whole
//! operation, epoch check included) and exclusively by `fence` and
//! `delete_vdisk`. So once `fence(e)` returns, no write with an older epoch is
//! still in flight, and a deletion never races an allocation of its vDisk.

use uuid::Uuid;

use super::{read, write, Disk};
use crate::legacy_v1::record::EpochSlot;
use crate::legacy_v1::Error;

impl Disk {
    /// Raises the vDisk's stored epoch to `max(stored, epoch)` and returns it.
    ///
    /// A raise is written to the epoch table (pwrite) before this returns and
    /// waits for in-flight writes of the vDisk. Fails with [`Error::NoSpace`]
    /// if a new vDisk needs a slot and the epoch table is full.
    pub fn fence(&self, vdisk: Uuid, epoch: u64) -> Result<u64, Error> {
        loop {
            let gate = self.state().gate(vdisk);
            let g = write(&gate);
            if g.retired {
                continue; // deleted meanwhile: use the new entry
            }
            let (slot, current) = {
                let st = self.state();
                (st.slot(vdisk), st.epoch(vdisk))
            };
            if epoch <= current {
                return Ok(current);
            }
            let (slot, fresh) = match slot {
                Some(s) => (s, false),
                None => (self.state().take_slot().ok_or(Error::NoSpace)?, true),
            };
            if let Err(e) = self.write_slot(slot, &EpochSlot::Used { vdisk, epoch }) {
                if fresh {
                    self.state().return_slot(slot);
                }
                return Err(e);
            }
            self.state().set_epoch(vdisk, slot, epoch);
            return Ok(epoch);
        }
    }

    /// Frees every extent of the vDisk and its epoch slot; returns the
    /// number of extents freed.
    pub fn delete_vdisk(&self, vdisk: Uuid) -> Result<u64, Error> {
        loop {
            let gate = self.state().gate(vdisk);
            let mut g = write(&gate);
            if g.retired {
                continue;
            }
            // No write of this vDisk is in flight (we hold its gate), so every
            // mapping is committed and stays put.
            let mut freed = 0;
            let chunks = self.state().chunks_of(vdisk);
            for (chunk, _) in chunks {
                let key = (vdisk, chunk);
                let _stripe = write(self.stripe(&key));
                let mapping = self.state().lookup(&key);
                if let Some(m) = mapping {
                    self.free_chunk(&key, m.extent)?;
                    freed += 1;
                }
            }
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
            let current = self.state().epoch(vdisk);
            if epoch < current {
                return Err(Error::StaleEpoch {
                    vdisk,
                    current,
                    got: epoch,
                });
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
