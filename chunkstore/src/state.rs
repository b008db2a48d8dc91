//! In-memory state of an open disk: chunk map, extent and slot allocators,
//! per-vDisk epochs and gates, and what is known about damaged metadata.
//! Pure bookkeeping: no I/O happens here, and the caller decides (per the
//! crash discipline) when a change may be made.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use uuid::Uuid;

/// The chunk number a `Trusted` record names to vouch for a whole vDisk
/// (no chunk has it: a vDisk's size is bounded far below).
pub(crate) const VOUCHED: u64 = u64::MAX;

/// A chunk's identity: (vDisk, chunk index).
pub(crate) type ChunkKey = (Uuid, u64);

/// Where a chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// Extent index.
    pub extent: u64,
    /// Allocation generation.
    pub generation: u64,
    /// The owner tag of the extent's block crcs (0: plain, version 1).
    pub tag: u32,
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
    /// The loss serial the slot was written under (see `confirmed`).
    trust: u64,
    /// The boot tag the slot was written under.
    boot: u64,
}

/// Counters for [`crate::DiskInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub extents_free: u64,
    pub extents_quarantined: u64,
    pub suspect_chunks: u64,
    pub ownerless_extents: u64,
    pub slots_free: u64,
    pub slots_lost: u64,
    pub loss_serial: u64,
}

/// Extents whose every record copy is damaged, so that their owner is not
/// known for sure (see the crate documentation, *Damage*).
#[derive(Debug, Default)]
struct Damaged {
    /// Damaged extents whose stamp and blocks name one owner: that chunk
    /// reads as an error (not as zeros) until it is rewritten or discarded
    /// whole, which frees these extents.
    suspects: HashMap<ChunkKey, Vec<u64>>,
    /// Damaged extents whose owner could be any chunk: while there is one,
    /// every unallocated chunk reads as an error until rewritten or
    /// discarded whole in this session.
    ownerless: Vec<u64>,
    /// Format v3: the block map could not be read back whole, so any
    /// block it does not name may be one whose record was lost.
    index_lost: bool,
    /// Chunks rewritten or discarded whole while `ownerless` is not empty
    /// (or the index is lost).
    resolved: HashSet<ChunkKey>,
    /// vDisks whose writer rebuilt every chunk of the copy here since the
    /// damage was found (`Disk::vouch`): none of their chunks is uncertain
    /// for want of an owner.
    vouched: HashSet<Uuid>,
    /// Extents whose record write failed while running: their on-disk state
    /// is unknown until the next open.
    unknown: u64,
}

impl Damaged {
    /// Whether a chunk that is not mapped may still own data somewhere.
    fn any_ownerless(&self) -> bool {
        !self.ownerless.is_empty() || self.index_lost
    }
}

/// The in-memory state. Guarded by one mutex in `Disk`.
#[derive(Debug)]
pub(crate) struct State {
    chunks: BTreeMap<ChunkKey, Mapping>,
    /// Kept in descending order at load; `pop` hands out the lowest first.
    free_extents: Vec<u64>,
    damaged: Damaged,
    next_generation: u64,
    /// Generations from here on are not reserved on disk yet.
    generation_ceiling: u64,
    vdisks: HashMap<Uuid, VdiskEntry>,
    free_slots: Vec<u32>,
    slots_lost: u64,
    /// Bumped (on disk, in the lost slots' markers) every time epoch slots
    /// are found lost; 0 if none ever was.
    loss_serial: u64,
    /// Copies (or some placement groups of them) freed because they moved
    /// to another disk, with the chunks set whole since: every other chunk
    /// they cover is uncertain (a writer still on the placement of before
    /// the move may read it; it must get an error, not zeros). Kept in
    /// memory only.
    moved_away: HashMap<Uuid, MovedAway>,
}

/// Which chunks of a vDisk moved away from this disk.
#[derive(Debug, Default)]
struct MovedAway {
    /// `None`: the whole copy. Otherwise the groups `(stripes, groups)`:
    /// chunk `c` is in group `c % stripes`.
    groups: Option<(u32, HashSet<u32>)>,
    /// Chunks set whole since.
    whole: HashSet<u64>,
}

impl MovedAway {
    fn covers(&self, chunk: u64) -> bool {
        match &self.groups {
            None => true,
            Some((stripes, groups)) => groups.contains(&((chunk % u64::from(*stripes)) as u32)),
        }
    }
}

impl State {
    /// An empty state, to be filled by the loader.
    pub(crate) fn new() -> Self {
        State {
            chunks: BTreeMap::new(),
            free_extents: Vec::new(),
            damaged: Damaged::default(),
            next_generation: 1,
            generation_ceiling: u64::MAX,
            vdisks: HashMap::new(),
            free_slots: Vec::new(),
            slots_lost: 0,
            loss_serial: 0,
            moved_away: HashMap::new(),
        }
    }

    // ---- loading -------------------------------------------------------

    /// Loader: extent `e` is free.
    pub(crate) fn load_free_extent(&mut self, e: u64) {
        self.free_extents.push(e);
    }

    /// Loader: extent `e`'s record is damaged and its stamp and blocks name
    /// `suspect` as its owner.
    pub(crate) fn load_suspect(&mut self, suspect: ChunkKey, e: u64) {
        self.damaged.suspects.entry(suspect).or_default().push(e);
    }

    /// Loader (format v3): the block map is not whole.
    pub(crate) fn load_index_lost(&mut self) {
        self.damaged.index_lost = true;
    }

    /// Loader (format v3, map not whole): `key` was written whole since
    /// (a chunk of [`VOUCHED`]: the whole vDisk was vouched for).
    pub(crate) fn load_trusted(&mut self, key: ChunkKey) {
        if key.1 == VOUCHED {
            self.damaged.vouched.insert(key.0);
        } else {
            self.damaged.resolved.insert(key);
        }
    }

    /// Whether the block map (format v3) was not read back whole.
    pub(crate) fn index_lost(&self) -> bool {
        self.damaged.index_lost
    }

    /// The chunks trusted again since the map was lost: first a
    /// `(vdisk, VOUCHED)` per vDisk vouched for (sorted), then the other
    /// vDisks' chunks, sorted.
    pub(crate) fn trusted_chunks(&self) -> Vec<ChunkKey> {
        if !self.damaged.index_lost {
            return Vec::new();
        }
        let mut whole: Vec<ChunkKey> = self.damaged.vouched.iter().map(|v| (*v, VOUCHED)).collect();
        whole.sort_unstable();
        let mut v: Vec<ChunkKey> = self
            .damaged
            .resolved
            .iter()
            .filter(|k| !self.damaged.vouched.contains(&k.0))
            .copied()
            .collect();
        v.sort_unstable();
        whole.extend(v);
        whole
    }

    /// What a writer must rebuild before this disk's copy of `vdisk` can
    /// be trusted whole: (every chunk not set whole since, the chunks
    /// damaged records name). See [`crate::Disk::fence_report`].
    pub(crate) fn doubt(&self, vdisk: Uuid) -> (bool, Vec<u64>) {
        let whole = self.damaged.any_ownerless() && !self.damaged.vouched.contains(&vdisk);
        let mut named: Vec<u64> = self
            .damaged
            .suspects
            .keys()
            .filter(|k| k.0 == vdisk)
            .map(|k| k.1)
            .collect();
        named.sort_unstable();
        (whole, named)
    }

    /// The writer rebuilt every chunk of the copy of `vdisk` here.
    pub(crate) fn vouch(&mut self, vdisk: Uuid) {
        if self.damaged.any_ownerless() {
            self.damaged.vouched.insert(vdisk);
        }
    }

    /// A fresh generation for a chunk's new life; `None` if none is
    /// reserved.
    pub(crate) fn take_generation(&mut self) -> Option<u64> {
        if self.generations_left() == 0 {
            return None;
        }
        let g = self.next_generation;
        self.next_generation += 1;
        Some(g)
    }

    /// Loader: extent `e`'s record is damaged and its owner cannot be told.
    pub(crate) fn load_ownerless(&mut self, e: u64) {
        self.damaged.ownerless.push(e);
    }

    /// Loader: a committed chunk.
    pub(crate) fn load_chunk(&mut self, key: ChunkKey, extent: u64, generation: u64, tag: u32) {
        let m = Mapping {
            extent,
            generation,
            tag,
            committed: true,
        };
        self.chunks.insert(key, m);
    }

    /// Loader: the next generation to hand out.
    pub(crate) fn load_next_generation(&mut self, next: u64) {
        self.next_generation = next;
    }

    /// The next generation to hand out.
    pub(crate) fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Generations below `ceiling` are reserved on disk (the superblock's
    /// floor): allocations may hand them out.
    pub(crate) fn set_generation_ceiling(&mut self, ceiling: u64) {
        self.generation_ceiling = ceiling;
    }

    /// How many generations are left below the reserved ceiling.
    pub(crate) fn generations_left(&self) -> u64 {
        self.generation_ceiling.saturating_sub(self.next_generation)
    }

    /// Loader: slot `s` is free.
    pub(crate) fn load_free_slot(&mut self, s: u32) {
        self.free_slots.push(s);
    }

    /// Loader: one more slot whose content was lost (never reused).
    pub(crate) fn load_lost_slot(&mut self) {
        self.slots_lost += 1;
    }

    /// Loader: the highest loss serial.
    pub(crate) fn load_loss_serial(&mut self, serial: u64) {
        self.loss_serial = serial;
    }

    /// Loader: the vDisk's epoch lives in slot `slot`.
    pub(crate) fn load_epoch(&mut self, vdisk: Uuid, slot: u32, epoch: u64, trust: u64, boot: u64) {
        self.set_epoch(vdisk, slot, epoch, trust, boot);
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

    /// Whether an unmapped chunk may own a damaged extent, so that reading
    /// it as zeros could hide its data.
    pub(crate) fn uncertain(&self, key: &ChunkKey) -> bool {
        self.damaged.suspects.contains_key(key)
            || (self.damaged.any_ownerless()
                && !self.damaged.resolved.contains(key)
                && !self.damaged.vouched.contains(&key.0))
            || self
                .moved_away
                .get(&key.0)
                .is_some_and(|m| m.covers(key.1) && !m.whole.contains(&key.1))
    }

    /// Format v3: the block map was not read back whole and the chunk was
    /// not set whole since, so even the blocks the map names may be stale
    /// (a lost record may have freed or moved them).
    pub(crate) fn map_untrusted(&self, key: &ChunkKey) -> bool {
        self.damaged.index_lost
            && !self.damaged.resolved.contains(key)
            && !self.damaged.vouched.contains(&key.0)
    }

    /// The vDisk's copy here moved away and is being freed (`true`), or the
    /// vDisk is deleted (`false`: nobody reads it any more).
    pub(crate) fn set_moved_away(&mut self, vdisk: Uuid, moved: bool) {
        if moved {
            self.moved_away.insert(vdisk, MovedAway::default());
        } else {
            self.moved_away.remove(&vdisk);
        }
    }

    /// Groups `groups` of the vDisk's copy here (of `stripes`; chunk `c` is
    /// in group `c % stripes`) moved away and are being freed; its other
    /// groups stay. Adds to groups that moved away before (the stripe
    /// count of a vDisk never changes); a whole copy that moved away stays
    /// whole.
    pub(crate) fn set_groups_moved_away(&mut self, vdisk: Uuid, stripes: u32, groups: &[u32]) {
        let m = self.moved_away.entry(vdisk).or_insert_with(|| MovedAway {
            groups: Some((stripes, HashSet::new())),
            whole: HashSet::new(),
        });
        if let Some((_, set)) = &mut m.groups {
            set.extend(groups.iter().copied());
        }
        // Chunks of those groups set whole before are freed now: uncertain
        // again.
        let stripes = u64::from(stripes.max(1));
        m.whole
            .retain(|c| !groups.contains(&((c % stripes) as u32)));
    }

    /// The chunk's whole content was just written or discarded: it is no
    /// longer uncertain. Returns the damaged extents that named it as their
    /// owner: the caller writes their records free, then calls
    /// [`State::release_damaged`].
    pub(crate) fn resolve(&mut self, key: ChunkKey) -> Vec<u64> {
        if self.damaged.any_ownerless() {
            self.damaged.resolved.insert(key);
        }
        if let Some(m) = self.moved_away.get_mut(&key.0) {
            if m.covers(key.1) {
                m.whole.insert(key.1);
            }
        }
        self.damaged.suspects.remove(&key).unwrap_or_default()
    }

    /// Damaged extents whose free records are written go to the free list.
    pub(crate) fn release_damaged(&mut self, extents: &[u64]) {
        self.free_extents.extend_from_slice(extents);
    }

    /// Damaged extents whose free records could not be written stay out of
    /// use until the next open.
    pub(crate) fn keep_damaged(&mut self, extents: &[u64]) {
        self.damaged.unknown += extents.len() as u64;
    }

    /// Takes a free extent for `key` with a fresh generation (uncommitted);
    /// `tag` computes the owner tag from the generation.
    /// `None` if no extent is free or no generation is reserved.
    pub(crate) fn allocate(&mut self, key: ChunkKey, tag: impl Fn(u64) -> u32) -> Option<Mapping> {
        if self.generations_left() == 0 {
            return None;
        }
        let extent = self.free_extents.pop()?;
        let generation = self.next_generation;
        // Saturates rather than wraps: 2^64 allocations do not happen, a
        // forged record must not make the counter go back.
        self.next_generation = self.next_generation.saturating_add(1);
        let m = Mapping {
            extent,
            generation,
            tag: tag(generation),
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
            self.damaged.unknown += 1;
        }
    }

    /// The chunk's free record is written: its extent goes to the free list.
    pub(crate) fn release(&mut self, key: &ChunkKey) -> Option<Mapping> {
        let m = self.chunks.remove(key)?;
        self.free_extents.push(m.extent);
        if self.damaged.any_ownerless() {
            // Known to read as zeros now, whatever an ownerless extent holds.
            self.damaged.resolved.insert(*key);
        }
        Some(m)
    }

    /// The vDisk is being deleted: none of its chunks is needed, so the
    /// damaged extents that name one of them can be freed. Returns them:
    /// the caller writes their records free, then calls
    /// [`State::release_damaged`].
    pub(crate) fn take_suspects_of(&mut self, vdisk: Uuid) -> Vec<u64> {
        let keys: Vec<ChunkKey> = self
            .damaged
            .suspects
            .keys()
            .filter(|k| k.0 == vdisk)
            .copied()
            .collect();
        keys.iter()
            .flat_map(|k| self.damaged.suspects.remove(k).unwrap_or_default())
            .collect()
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

    /// Whether the vDisk's stored epoch is known to be its fence: always,
    /// unless epoch slots were lost (then the vDisk might have had a higher
    /// epoch in one of them) and the vDisk was not fenced again since.
    pub(crate) fn confirmed(&self, vdisk: Uuid) -> bool {
        self.loss_serial == 0
            || self
                .vdisks
                .get(&vdisk)
                .is_some_and(|e| e.slot.is_some() && e.trust >= self.loss_serial)
    }

    /// The loss serial new slots are written under.
    pub(crate) fn loss_serial(&self) -> u64 {
        self.loss_serial
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

    /// The vDisk's slot now durably holds `epoch`, written under `trust`.
    pub(crate) fn set_epoch(&mut self, vdisk: Uuid, slot: u32, epoch: u64, trust: u64, boot: u64) {
        let entry = self.vdisks.entry(vdisk).or_default();
        entry.slot = Some(slot);
        entry.epoch = epoch;
        entry.trust = trust;
        entry.boot = boot;
    }

    /// The boot tag the vDisk's epoch was last written under (0: unknown).
    pub(crate) fn epoch_boot(&self, vdisk: Uuid) -> u64 {
        self.vdisks.get(&vdisk).map_or(0, |e| e.boot)
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
        let d = &self.damaged;
        let suspected: u64 = d.suspects.values().map(|v| v.len() as u64).sum();
        Counts {
            extents_free: self.free_extents.len() as u64,
            extents_quarantined: suspected + d.ownerless.len() as u64 + d.unknown,
            suspect_chunks: d.suspects.len() as u64,
            ownerless_extents: d.ownerless.len() as u64,
            slots_free: self.free_slots.len() as u64,
            slots_lost: self.slots_lost,
            loss_serial: self.loss_serial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(extents: u64, slots: u32) -> State {
        let mut s = State::new();
        (0..extents).for_each(|e| s.load_free_extent(e));
        (0..slots).for_each(|i| s.load_free_slot(i));
        s.finish_load();
        s
    }

    #[test]
    fn allocation_lowest_first_and_generations_increase() {
        let mut s = loaded(3, 1);
        let v = Uuid::from_u128(1);
        let a = s.allocate((v, 0), |g| g as u32 + 100).unwrap();
        let b = s.allocate((v, 1), |g| g as u32 + 100).unwrap();
        assert_eq!((a.extent, b.extent), (0, 1));
        assert!(b.generation > a.generation);
        assert_eq!(a.tag, a.generation as u32 + 100);
        assert!(!a.committed);
        s.commit(&(v, 0));
        assert!(s.lookup(&(v, 0)).unwrap().committed);
        assert_eq!(s.high_generation(), b.generation);
    }

    #[test]
    fn abort_release_quarantine() {
        let mut s = loaded(2, 0);
        let v = Uuid::from_u128(1);
        s.allocate((v, 0), |_| 1).unwrap();
        s.abort_allocation(&(v, 0));
        assert_eq!(s.lookup(&(v, 0)), None);
        assert_eq!(s.counts().extents_free, 2);
        s.allocate((v, 0), |_| 1).unwrap();
        s.allocate((v, 1), |_| 1).unwrap();
        assert_eq!(s.allocate((v, 2), |_| 1), None);
        s.commit(&(v, 0));
        assert_eq!(s.release(&(v, 0)).map(|m| m.extent), Some(0));
        s.quarantine(&(v, 1));
        let c = s.counts();
        assert_eq!((c.extents_free, c.extents_quarantined), (1, 1));
        assert!(s.chunks_of(v).is_empty());
    }

    #[test]
    fn suspects_and_ownerless_extents() {
        let mut s = State::new();
        let v = Uuid::from_u128(1);
        s.load_suspect((v, 3), 7);
        s.finish_load();
        assert!(s.uncertain(&(v, 3)));
        assert!(!s.uncertain(&(v, 4)));
        assert_eq!(s.counts().extents_quarantined, 1);
        assert_eq!(s.resolve((v, 3)), vec![7]);
        s.release_damaged(&[7]);
        assert!(!s.uncertain(&(v, 3)));
        assert_eq!(s.counts().extents_free, 1);
        // An ownerless extent makes every chunk uncertain until resolved.
        s.load_ownerless(9);
        assert!(s.uncertain(&(v, 4)) && s.uncertain(&(Uuid::from_u128(2), 0)));
        assert!(s.resolve((v, 4)).is_empty());
        assert!(!s.uncertain(&(v, 4)));
        assert!(s.uncertain(&(v, 5)));
        assert_eq!(s.counts().ownerless_extents, 1);
        // A chunk freed meanwhile is known to read as zeros.
        s.load_free_extent(3);
        s.allocate((v, 6), |_| 1).unwrap();
        s.commit(&(v, 6));
        s.release(&(v, 6));
        assert!(!s.uncertain(&(v, 6)));
        // Deleting a vDisk frees the damaged extents that name its chunks.
        s.load_suspect((v, 8), 11);
        s.load_suspect((Uuid::from_u128(2), 8), 12);
        assert_eq!(s.take_suspects_of(v), vec![11]);
        assert!(s.uncertain(&(Uuid::from_u128(2), 8)));
    }

    #[test]
    fn epochs_and_listing() {
        let mut s = loaded(4, 2);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert_eq!(s.epoch(a), 0);
        let slot = s.take_slot().unwrap();
        s.set_epoch(a, slot, 5, 0, 0);
        s.allocate((b, 3), |_| 1).unwrap();
        assert_eq!(s.vdisks(), vec![(a, 5, 0)]);
        s.commit(&(b, 3));
        assert_eq!(s.vdisks(), vec![(a, 5, 0), (b, 0, 1)]);
        s.remove_vdisk(a);
        assert_eq!(s.epoch(a), 0);
        assert_eq!(s.counts().slots_free, 2);
    }

    #[test]
    fn lost_slots_unconfirm_until_fenced_again() {
        let mut s = loaded(0, 2);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        s.load_epoch(a, 5, 3, 0, 0);
        assert!(s.confirmed(a) && s.confirmed(b));
        s.load_loss_serial(1);
        assert!(!s.confirmed(a) && !s.confirmed(b));
        s.set_epoch(a, 5, 3, 1, 0);
        assert!(s.confirmed(a) && !s.confirmed(b));
    }

    #[test]
    fn gate_is_shared_until_removed() {
        let mut s = loaded(0, 0);
        let v = Uuid::from_u128(1);
        let g1 = s.gate(v);
        assert!(Arc::ptr_eq(&g1, &s.gate(v)));
        s.remove_vdisk(v);
        assert!(!Arc::ptr_eq(&g1, &s.gate(v)));
    }
}
