//! In-memory state of an open disk: chunk map, extent and slot allocators,
//! per-vDisk epochs and gates. Pure bookkeeping: no I/O happens here, and the
//! caller decides (per the crash discipline) when a change may be made.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use uuid::Uuid;

/// A chunk's identity: (vDisk, chunk index).
pub(crate) type ChunkKey = (Uuid, u64);

/// Where a chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// Extent index.
    pub extent: u64,
    /// Allocation generation.
    pub generation: u64,
    /// False while the first write is still filling the extent (its record
    /// is not written yet); such mappings are hidden from listings.
    pub committed: bool,
}

/// What a vDisk gate protects beyond the epoch itself.
#[derive(Debug, Default)]
pub(crate) struct GateState {
    /// Set once `delete_vdisk` removed the vDisk: holders must look it up again.
    pub retired: bool,
}

/// Held shared by writes and discards, exclusively by fence and delete.
pub(crate) type Gate = Arc<RwLock<GateState>>;

#[derive(Debug, Default)]
struct VdiskEntry {
    gate: Gate,
    slot: Option<u32>,
    epoch: u64,
}

/// Counters for [`crate::legacy_v1::DiskInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub extents_free: u64,
    pub extents_quarantined: u64,
    pub slots_free: u64,
    pub slots_quarantined: u64,
}

/// The in-memory state. Guarded by one mutex in `Disk`.
#[derive(Debug)]
pub(crate) struct State {
    chunks: BTreeMap<ChunkKey, Mapping>,
    /// Kept in descending order at load; `pop` hands out the lowest first.
    free_extents: Vec<u64>,
    extents_quarantined: u64,
    next_generation: u64,
    vdisks: HashMap<Uuid, VdiskEntry>,
    free_slots: Vec<u32>,
    slots_quarantined: u64,
}

impl State {
    /// An empty state, to be filled by the loader.
    pub(crate) fn new() -> Self {
        State {
            chunks: BTreeMap::new(),
            free_extents: Vec::new(),
            extents_quarantined: 0,
            next_generation: 1,
            vdisks: HashMap::new(),
            free_slots: Vec::new(),
            slots_quarantined: 0,
        }
    }

    // ---- loading -------------------------------------------------------

    /// Loader: extent `e` is free.
    pub(crate) fn load_free_extent(&mut self, e: u64) {
        self.free_extents.push(e);
    }

    /// Loader: one more extent with a damaged record.
    pub(crate) fn load_quarantined_extent(&mut self) {
        self.extents_quarantined += 1;
    }

    /// Loader: a committed chunk.
    pub(crate) fn load_chunk(&mut self, key: ChunkKey, extent: u64, generation: u64) {
        let m = Mapping {
            extent,
            generation,
            committed: true,
        };
        self.chunks.insert(key, m);
    }

    /// Loader: the next generation to hand out.
    pub(crate) fn load_next_generation(&mut self, next: u64) {
        self.next_generation = next;
    }

    /// Loader: slot `s` is free.
    pub(crate) fn load_free_slot(&mut self, s: u32) {
        self.free_slots.push(s);
    }

    /// Loader: one more slot with a damaged record.
    pub(crate) fn load_quarantined_slot(&mut self) {
        self.slots_quarantined += 1;
    }

    /// Loader: the vDisk's epoch lives in slot `slot`.
    pub(crate) fn load_epoch(&mut self, vdisk: Uuid, slot: u32, epoch: u64) {
        let entry = self.vdisks.entry(vdisk).or_default();
        entry.slot = Some(slot);
        entry.epoch = epoch;
    }

    /// Loader: done; orders the free lists so the lowest index goes first.
    pub(crate) fn finish_load(&mut self) {
        self.free_extents.sort_unstable_by(|a, b| b.cmp(a));
        self.free_slots.sort_unstable_by(|a, b| b.cmp(a));
    }

    // ---- chunks --------------------------------------------------------

    /// The chunk's mapping, committed or not.
    pub(crate) fn lookup(&self, key: &ChunkKey) -> Option<Mapping> {
        self.chunks.get(key).copied()
    }

    /// Takes a free extent for `key` with a fresh generation (uncommitted).
    pub(crate) fn allocate(&mut self, key: ChunkKey) -> Option<Mapping> {
        let extent = self.free_extents.pop()?;
        let generation = self.next_generation;
        // Saturates rather than wraps: 2^64 allocations do not happen, a
        // forged record must not make the counter go back.
        self.next_generation = self.next_generation.saturating_add(1);
        let m = Mapping {
            extent,
            generation,
            committed: false,
        };
        self.chunks.insert(key, m);
        Some(m)
    }

    /// The extent record of a fresh allocation is written.
    pub(crate) fn commit(&mut self, key: &ChunkKey) {
        if let Some(m) = self.chunks.get_mut(key) {
            m.committed = true;
        }
    }

    /// A fresh allocation failed before its record was written: the extent
    /// is free again.
    pub(crate) fn abort_allocation(&mut self, key: &ChunkKey) {
        if let Some(m) = self.chunks.remove(key) {
            self.free_extents.push(m.extent);
        }
    }

    /// Writing a record failed and its on-disk state is unknown: the extent
    /// is neither free nor mapped until the next open.
    pub(crate) fn quarantine(&mut self, key: &ChunkKey) {
        if self.chunks.remove(key).is_some() {
            self.extents_quarantined += 1;
        }
    }

    /// The chunk's free record is written: its extent goes to the free list.
    pub(crate) fn release(&mut self, key: &ChunkKey) -> Option<Mapping> {
        let m = self.chunks.remove(key)?;
        self.free_extents.push(m.extent);
        Some(m)
    }

    /// The highest generation handed out so far.
    pub(crate) fn high_generation(&self) -> u64 {
        self.next_generation - 1
    }

    /// The vDisk's mappings (committed or not), by chunk index.
    pub(crate) fn chunks_of(&self, vdisk: Uuid) -> Vec<(u64, Mapping)> {
        self.chunks
            .range((vdisk, 0)..=(vdisk, u64::MAX))
            .map(|(&(_, chunk), &m)| (chunk, m))
            .collect()
    }

    // ---- vDisks and epochs ---------------------------------------------

    /// The vDisk's gate, created if the vDisk is not known yet.
    pub(crate) fn gate(&mut self, vdisk: Uuid) -> Gate {
        Arc::clone(&self.vdisks.entry(vdisk).or_default().gate)
    }

    /// The vDisk's stored epoch (0 if unknown).
    pub(crate) fn epoch(&self, vdisk: Uuid) -> u64 {
        self.vdisks.get(&vdisk).map_or(0, |e| e.epoch)
    }

    /// The vDisk's epoch slot, if it has one.
    pub(crate) fn slot(&self, vdisk: Uuid) -> Option<u32> {
        self.vdisks.get(&vdisk).and_then(|e| e.slot)
    }

    /// Takes a free epoch slot.
    pub(crate) fn take_slot(&mut self) -> Option<u32> {
        self.free_slots.pop()
    }

    /// Gives back a slot taken with [`State::take_slot`] but never written.
    pub(crate) fn return_slot(&mut self, slot: u32) {
        self.free_slots.push(slot);
    }

    /// The vDisk's slot now durably holds `epoch`.
    pub(crate) fn set_epoch(&mut self, vdisk: Uuid, slot: u32, epoch: u64) {
        let entry = self.vdisks.entry(vdisk).or_default();
        entry.slot = Some(slot);
        entry.epoch = epoch;
    }

    /// Forgets the vDisk; its slot (whose free record is written) is free.
    pub(crate) fn remove_vdisk(&mut self, vdisk: Uuid) {
        if let Some(slot) = self.vdisks.remove(&vdisk).and_then(|e| e.slot) {
            self.free_slots.push(slot);
        }
    }

    /// Every vDisk with an epoch slot or a committed chunk:
    /// (vdisk, epoch, committed chunks), sorted by vDisk.
    pub(crate) fn vdisks(&self) -> Vec<(Uuid, u64, u64)> {
        let mut counts: BTreeMap<Uuid, u64> = BTreeMap::new();
        for (&(vdisk, _), m) in &self.chunks {
            if m.committed {
                *counts.entry(vdisk).or_default() += 1;
            }
        }
        for (&vdisk, e) in &self.vdisks {
            if e.slot.is_some() {
                counts.entry(vdisk).or_default();
            }
        }
        counts
            .into_iter()
            .map(|(v, n)| (v, self.epoch(v), n))
            .collect()
    }

    /// Free and quarantined counts.
    pub(crate) fn counts(&self) -> Counts {
        Counts {
            extents_free: self.free_extents.len() as u64,
            extents_quarantined: self.extents_quarantined,
            slots_free: self.free_slots.len() as u64,
            slots_quarantined: self.slots_quarantined,
        }
    }
}
