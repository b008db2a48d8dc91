//! Simulated storage nodes: a chunk store in memory with a page cache that
//! a power loss can tear, reached through [`NodeIo`] with delays, freezes
//! and crashes.
//!
//! A node keeps, per disk, the *durable* content of every chunk and the
//! writes since the disk's last flush (the page cache). Reads see both.
//! `kill -9` of the node (a crash) keeps the page cache; a power loss
//! keeps an arbitrary subset of those writes, block by block (a 4 KiB block
//! is old, new, or torn — a torn block fails its checksum, as the real
//! chunk store's crc makes it). Fences are durable when answered, with
//! the boot they were raised in. A power loss changes the node's boot
//! identity; a link that "connects" again after a crash or power loss
//! reports the boot it finds to the volume's `BootGuard`, as a network link
//! does with the node's `Hello` reply.
//!
//! A request runs as its own task: it sleeps a random delay (reordering
//! requests), waits while the node is frozen, and is dropped if the node
//! crashed meanwhile. Its caller stops waiting after the I/O timeout, but
//! the request stays queued and may still run later — the case that makes
//! late writes land after a resync.
//!
//! A node keeps activity marks for a client whose link says it keeps them
//! (protocol version 5, [`NodeAddr::marks`]), as the real node's mark
//! store does: a write or zero marks its extent for the writer's epoch
//! when it reaches the node — durably, before it runs, so the marks
//! survive a crash and a power loss — a fence reply lists the vDisk's
//! marks, and `Unmark` clears them. [`SimNode::lose_marks`] is the store
//! found damaged at a restart: every extent of every vDisk is in doubt
//! until a writer clears a vDisk's marks as a whole.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tessera_proto::{FenceReply, Request, Status};
use tessera_replicator::{
    BootGuard, BootWatch, ConnError, Connector, NodeAddr, NodeIo, Reply, SharedMemory,
};
use uuid::Uuid;

use crate::rng::Rng;

/// Bytes of a checksummed block.
pub const BLOCK: u64 = 4096;

/// One chunk of one vDisk on one disk.
#[derive(Debug, Clone)]
struct Chunk {
    data: Vec<u8>,
    /// Blocks whose checksum fails.
    torn: BTreeSet<u64>,
}

impl Chunk {
    fn new(chunk_size: u64) -> Self {
        Chunk {
            data: vec![0; chunk_size as usize],
            torn: BTreeSet::new(),
        }
    }
}

/// A mutation in a disk's page cache.
#[derive(Debug, Clone)]
struct Pending {
    vdisk: Uuid,
    chunk: u64,
    offset: u64,
    /// `None`: zeros (discard or write-zeroes).
    data: Option<Vec<u8>>,
    len: u64,
    /// A discard of the whole chunk frees it.
    frees: bool,
}

#[derive(Debug, Default)]
struct SimDisk {
    /// Per vDisk, its epoch and the boot it was last raised in (durable,
    /// as a node syncs an epoch raise).
    epochs: BTreeMap<Uuid, (u64, u64)>,
    durable: BTreeMap<(Uuid, u64), Chunk>,
    cache: Vec<Pending>,
    /// Chunks the disk may hold at most (`NoSpace` beyond).
    capacity_chunks: u64,
    /// The disk is full: a write that needs space — data into a chunk it
    /// does not hold, or into a block that reads as zeros (a thin disk
    /// allocates blocks as they get data) — is refused whole (`NoSpace`).
    /// Not durable: it stands for the space the node's other vDisks take.
    full: bool,
    /// Copies freed because they moved away, with the chunks set whole
    /// since: every other chunk of the vDisk reads as an error, not zeros,
    /// as the real chunk store does (`Disk::free_moved_copy`). In memory:
    /// a restart of the node forgets it.
    moved_away: BTreeMap<Uuid, SimMovedAway>,
    /// The disk lost the metadata saying which chunk is where (a format-3
    /// block map): until a chunk is set whole again, or its vDisk vouched
    /// for, it reads as an error, as the real chunk store does. Durable.
    doubt: Option<SimDoubt>,
}

/// Which chunks of a vDisk moved away from a disk (see
/// [`SimDisk::moved_away`]).
#[derive(Debug, Default)]
struct SimMovedAway {
    /// `None`: the whole copy; else `(stripes, groups)`: chunk `c` is in
    /// group `c % stripes`.
    groups: Option<(u32, BTreeSet<u32>)>,
    /// Chunks set whole since.
    whole: BTreeSet<u64>,
}

impl SimMovedAway {
    /// Whether the chunk moved away and was not set whole since.
    fn uncertain(&self, chunk: u64) -> bool {
        let covered = match &self.groups {
            None => true,
            Some((stripes, groups)) => groups.contains(&((chunk % u64::from(*stripes)) as u32)),
        };
        covered && !self.whole.contains(&chunk)
    }
}

/// What a disk whose map was lost trusts again (see [`SimDisk::doubt`]).
#[derive(Debug, Default)]
struct SimDoubt {
    /// Chunks set whole since.
    resolved: BTreeSet<(Uuid, u64)>,
    /// vDisks whose writer rebuilt the whole copy and said so (`Vouch`).
    vouched: BTreeSet<Uuid>,
}

impl SimDisk {
    /// A `StaleEpoch` reply if `epoch` is older than this disk's fence of
    /// `vdisk` (a writer that lost the vDisk changes nothing).
    fn refuse_stale(&self, vdisk: Uuid, epoch: u64) -> Option<Reply> {
        let stored = self.epochs.get(&vdisk).map_or(0, |e| e.0);
        (epoch < stored).then(|| Reply {
            status: Status::StaleEpoch,
            body: stored.to_le_bytes().to_vec(),
        })
    }

    fn apply(chunks: &mut BTreeMap<(Uuid, u64), Chunk>, p: &Pending, chunk_size: u64) {
        if p.frees {
            chunks.remove(&(p.vdisk, p.chunk));
            return;
        }
        let c = chunks
            .entry((p.vdisk, p.chunk))
            .or_insert_with(|| Chunk::new(chunk_size));
        let range = p.offset as usize..(p.offset + p.len) as usize;
        match &p.data {
            Some(d) => c.data[range].copy_from_slice(d),
            None => c.data[range].fill(0),
        }
        // Whole blocks rewritten are whole again.
        let first = p.offset.div_ceil(BLOCK);
        let end = (p.offset + p.len) / BLOCK;
        for b in first..end {
            c.torn.remove(&b);
        }
    }

    /// Whether an unallocated chunk may hold data this disk no longer has
    /// (its copy was freed after it moved away).
    fn uncertain(&self, vdisk: Uuid, chunk: u64) -> bool {
        self.moved_away
            .get(&vdisk)
            .is_some_and(|m| m.uncertain(chunk))
            || self.doubts(vdisk, chunk)
    }

    /// Whether the chunk, allocated or not, is in doubt since the disk's
    /// map was lost.
    fn doubts(&self, vdisk: Uuid, chunk: u64) -> bool {
        self.doubt
            .as_ref()
            .is_some_and(|d| !d.vouched.contains(&vdisk) && !d.resolved.contains(&(vdisk, chunk)))
    }

    /// The chunk as reads see it (durable content and page cache).
    fn view(&self, vdisk: Uuid, chunk: u64, chunk_size: u64) -> Option<Chunk> {
        let mut one: BTreeMap<(Uuid, u64), Chunk> = BTreeMap::new();
        if let Some(c) = self.durable.get(&(vdisk, chunk)) {
            one.insert((vdisk, chunk), c.clone());
        }
        for p in self
            .cache
            .iter()
            .filter(|p| p.vdisk == vdisk && p.chunk == chunk)
        {
            Self::apply(&mut one, p, chunk_size);
        }
        one.remove(&(vdisk, chunk))
    }

    /// What a read of `len` bytes at `offset` of the chunk returns: the
    /// data, or `None` if a block of the range fails its checksum. Copies
    /// only the range (the whole-chunk `view` is for checks after a run).
    fn read(&self, vdisk: Uuid, chunk: u64, offset: u64, len: u64) -> Option<Vec<u8>> {
        let key = (vdisk, chunk);
        let range = offset as usize..(offset + len) as usize;
        let first = offset / BLOCK;
        let last = (offset + len).div_ceil(BLOCK);
        let (mut out, mut torn): (Vec<u8>, BTreeSet<u64>) = match self.durable.get(&key) {
            Some(c) => (
                c.data[range].to_vec(),
                c.torn.range(first..last).copied().collect(),
            ),
            None => (vec![0; len as usize], BTreeSet::new()),
        };
        for p in self
            .cache
            .iter()
            .filter(|p| p.vdisk == vdisk && p.chunk == chunk)
        {
            if p.frees {
                out.fill(0);
                torn.clear();
                continue;
            }
            let lo = p.offset.max(offset);
            let hi = (p.offset + p.len).min(offset + len);
            if lo < hi {
                let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
                match &p.data {
                    Some(d) => {
                        dst.copy_from_slice(&d[(lo - p.offset) as usize..(hi - p.offset) as usize])
                    }
                    None => dst.fill(0),
                }
            }
            for b in p.offset.div_ceil(BLOCK)..(p.offset + p.len) / BLOCK {
                torn.remove(&b);
            }
        }
        torn.is_empty().then_some(out)
    }

    /// Whether the disk holds the chunk (durably or in its page cache).
    fn holds(&self, key: (Uuid, u64)) -> bool {
        let mut held = self.durable.contains_key(&key);
        for p in self.cache.iter().filter(|p| (p.vdisk, p.chunk) == key) {
            held = !p.frees;
        }
        held
    }

    fn allocated(&self) -> BTreeSet<(Uuid, u64)> {
        let mut all: BTreeSet<(Uuid, u64)> = self.durable.keys().copied().collect();
        for p in &self.cache {
            if p.frees {
                all.remove(&(p.vdisk, p.chunk));
            } else {
                all.insert((p.vdisk, p.chunk));
            }
        }
        all
    }

    fn flush(&mut self, chunk_size: u64) {
        for p in std::mem::take(&mut self.cache) {
            Self::apply(&mut self.durable, &p, chunk_size);
        }
    }

    /// Power loss: each cached write survives whole, partly (block by
    /// block, a block torn in between), or not at all, in any order.
    fn lose_power(&mut self, rng: &mut Rng, chunk_size: u64) {
        let mut cache = std::mem::take(&mut self.cache);
        // Write-back goes in any order.
        for i in (1..cache.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            cache.swap(i, j);
        }
        for p in cache {
            match rng.below(3) {
                0 => {}
                1 => Self::apply(&mut self.durable, &p, chunk_size),
                _ => {
                    if p.frees {
                        if rng.chance(500) {
                            Self::apply(&mut self.durable, &p, chunk_size);
                        }
                        continue;
                    }
                    // Block by block.
                    let first = p.offset / BLOCK;
                    let last = (p.offset + p.len).div_ceil(BLOCK);
                    for b in first..last {
                        let lo = (b * BLOCK).max(p.offset);
                        let hi = ((b + 1) * BLOCK).min(p.offset + p.len);
                        match rng.below(3) {
                            0 => {}
                            1 => {
                                let part = Pending {
                                    offset: lo,
                                    len: hi - lo,
                                    data: p.data.as_ref().map(|d| {
                                        d[(lo - p.offset) as usize..(hi - p.offset) as usize]
                                            .to_vec()
                                    }),
                                    ..p.clone()
                                };
                                Self::apply(&mut self.durable, &part, chunk_size);
                            }
                            _ => {
                                let c = self
                                    .durable
                                    .entry((p.vdisk, p.chunk))
                                    .or_insert_with(|| Chunk::new(chunk_size));
                                c.torn.insert(b);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Faults a node is under.
#[derive(Debug, Default)]
struct NodeState {
    up: bool,
    /// Bumped by every crash: requests of an earlier life are dropped.
    incarnation: u64,
    /// Bumped by every power loss (the machine's boot identity).
    boot: u64,
    frozen: bool,
    /// Longest random delay before a request runs.
    max_delay: Duration,
    /// Requests refused with `BadPayload` (a payload changed in flight), per mille.
    bad_payload: u64,
    /// Writes refused so: a resend (from a stable buffer) passes.
    refused: BTreeSet<(Uuid, u64, u64)>,
    /// Reads of a copy freed after it moved, refused (a lagging reader).
    freed_reads: u64,
    rng: Rng,
    disks: BTreeMap<Uuid, SimDisk>,
    chunk_size: u64,
    /// Deterministic faults set by a test: requests held back or failed.
    rules: Vec<NodeRule>,
    next_rule: u64,
    /// Requests waiting on a hold rule now.
    held: usize,
    /// Activity marks: `(vDisk, extent) → epoch` (see the module doc).
    marks: BTreeMap<(Uuid, u64), u64>,
    /// The marks were lost: every vDisk not in `known` is wholly in doubt.
    marks_lost: bool,
    /// vDisks whose marks a writer cleared as a whole since they were lost.
    known: BTreeSet<Uuid>,
}

impl NodeState {
    /// Marks the extent `op` changes for its epoch (a mark keeps the larger).
    fn mark(&mut self, op: &Op) {
        let (Op::Write {
            vdisk,
            chunk,
            epoch,
            ..
        }
        | Op::Zero {
            vdisk,
            chunk,
            epoch,
            ..
        }) = op
        else {
            return;
        };
        let extent = chunk / tessera_proto::activity_extent_chunks();
        let e = self.marks.entry((*vdisk, extent)).or_insert(*epoch);
        *e = (*e).max(*epoch);
    }

    /// The marks a fence reply lists for `vdisk`.
    fn fence_marks(&self, vdisk: Uuid, reply: &mut FenceReply) {
        if self.marks_lost && !self.known.contains(&vdisk) {
            reply.marks_lost = true;
            return;
        }
        let list: Vec<(u64, u64)> = self
            .marks
            .range((vdisk, 0)..=(vdisk, u64::MAX))
            .map(|((_, x), e)| (*x, *e))
            .collect();
        if list.len() > tessera_proto::MAX_MARKS {
            reply.marks_lost = true;
        } else {
            reply.marks = list;
        }
    }
}

/// Which requests a [`Rule`] applies to (every field given must match).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Match {
    pub kind: Option<OpKind>,
    pub disk: Option<Uuid>,
    pub chunk: Option<u64>,
    /// Only mutations of a whole chunk (`Some(true)`: a resync's copy) or
    /// only of part of one (`Some(false)`: a guest's small write).
    pub whole_chunk: Option<bool>,
}

/// The kind of a request, for [`Match`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    /// A write, discard or write-zeroes.
    Mutation,
    Flush,
    Fence,
}

/// What happens to a request a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// It waits (its caller may time out; it stays queued) until the rule
    /// is released, then runs.
    Hold(Match),
    /// It waits like `Hold`, then fails with the status.
    HoldThenFail(Match, Status),
    /// The disk answers it with this status (and does nothing).
    Fail(Match, Status),
}

#[derive(Debug)]
struct NodeRule {
    id: u64,
    rule: Rule,
    /// Requests it may still apply to (`None`: any number).
    left: Option<u32>,
}

impl Rule {
    fn matcher(&self) -> &Match {
        match self {
            Rule::Hold(m) | Rule::HoldThenFail(m, _) | Rule::Fail(m, _) => m,
        }
    }

    fn holds(&self) -> bool {
        matches!(self, Rule::Hold(_) | Rule::HoldThenFail(..))
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new(0)
    }
}

/// One simulated storage node.
pub struct SimNode {
    pub uuid: Uuid,
    pub addr: String,
    state: Mutex<NodeState>,
    resumed: tokio::sync::Notify,
}

/// A request with its data, owned (it outlives its caller's wait).
enum Op {
    Read {
        vdisk: Uuid,
        disk: Uuid,
        chunk: u64,
        offset: u64,
        len: u64,
    },
    Write {
        vdisk: Uuid,
        disk: Uuid,
        chunk: u64,
        offset: u64,
        data: Vec<u8>,
        epoch: u64,
    },
    Zero {
        vdisk: Uuid,
        disk: Uuid,
        chunk: u64,
        offset: u64,
        len: u64,
        epoch: u64,
    },
    Flush {
        disk: Uuid,
    },
    Fence {
        vdisk: Uuid,
        disk: Uuid,
        epoch: u64,
    },
    Vouch {
        vdisk: Uuid,
        disk: Uuid,
        epoch: u64,
        token: u64,
    },
    /// Clears the marks of `extents` (all of the vDisk's if empty) whose
    /// epoch is at most `upto`.
    Unmark {
        vdisk: Uuid,
        disk: Uuid,
        epoch: u64,
        upto: u64,
        extents: Vec<u64>,
    },
    Other,
}

impl Op {
    fn matches(&self, m: &Match, chunk_size: u64) -> bool {
        let (kind, disk, chunk, whole) = match self {
            Op::Read {
                disk, chunk, len, ..
            } => (OpKind::Read, *disk, Some(*chunk), *len == chunk_size),
            Op::Write {
                disk, chunk, data, ..
            } => (
                OpKind::Mutation,
                *disk,
                Some(*chunk),
                data.len() as u64 == chunk_size,
            ),
            Op::Zero {
                disk, chunk, len, ..
            } => (OpKind::Mutation, *disk, Some(*chunk), *len == chunk_size),
            Op::Flush { disk } => (OpKind::Flush, *disk, None, false),
            Op::Fence { disk, .. } | Op::Vouch { disk, .. } => (OpKind::Fence, *disk, None, false),
            Op::Unmark { .. } | Op::Other => return false,
        };
        m.kind.is_none_or(|k| k == kind)
            && m.disk.is_none_or(|d| d == disk)
            && m.chunk.is_none_or(|c| Some(c) == chunk)
            && m.whole_chunk
                .is_none_or(|w| w == whole && kind == OpKind::Mutation)
    }
}

impl SimNode {
    pub fn new(
        uuid: Uuid,
        addr: String,
        disks: &[Uuid],
        capacity_chunks: u64,
        chunk_size: u64,
        seed: u64,
    ) -> Arc<SimNode> {
        let disks = disks
            .iter()
            .map(|d| {
                (
                    *d,
                    SimDisk {
                        capacity_chunks,
                        ..SimDisk::default()
                    },
                )
            })
            .collect();
        Arc::new(SimNode {
            uuid,
            addr,
            state: Mutex::new(NodeState {
                up: true,
                rng: Rng::new(seed),
                disks,
                chunk_size,
                ..NodeState::default()
            }),
            resumed: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().expect("node state poisoned")
    }

    pub fn is_up(&self) -> bool {
        self.state().up
    }

    /// The node's life (bumped by every crash) and boot identity, if it is up.
    fn session(&self) -> Option<(u64, [u8; 16])> {
        let s = self.state();
        let mut boot = [0u8; 16];
        boot[..8].copy_from_slice(&s.boot.to_le_bytes());
        boot[8..].copy_from_slice(self.uuid.as_bytes()[..8].try_into().expect("8 bytes"));
        s.up.then_some((s.incarnation, boot))
    }

    /// `kill -9`: the page cache survives; queued requests are dropped.
    pub fn crash(&self) {
        let mut s = self.state();
        s.up = false;
        s.incarnation += 1;
        s.frozen = false;
        for d in s.disks.values_mut() {
            d.moved_away.clear();
        }
        drop(s);
        self.resumed.notify_waiters();
    }

    /// The machine loses power: unflushed writes survive in part, torn.
    pub fn lose_power(&self) {
        let mut s = self.state();
        s.up = false;
        s.incarnation += 1;
        s.boot += 1;
        s.frozen = false;
        let chunk_size = s.chunk_size;
        let mut rng = s.rng.fork();
        for d in s.disks.values_mut() {
            d.lose_power(&mut rng, chunk_size);
            d.moved_away.clear();
        }
        drop(s);
        self.resumed.notify_waiters();
    }

    pub fn restart(&self) {
        self.state().up = true;
    }

    /// The machine loses power and `disk` comes back with its map lost: it
    /// no longer knows where any chunk is. Without the doubt it reports,
    /// every chunk would read as zeros (what is stored is dropped here); with
    /// it, every chunk reads as an error until set whole again or its vDisk
    /// vouched for.
    pub fn lose_map(&self, disk: Uuid) {
        self.lose_power();
        let mut s = self.state();
        let chunk_size = s.chunk_size;
        if let Some(d) = s.disks.get_mut(&disk) {
            d.flush(chunk_size);
            d.durable.clear();
            d.doubt = Some(SimDoubt::default());
        }
    }

    /// SIGSTOP: requests wait (their callers time out) and run on resume.
    pub fn freeze(&self) {
        self.state().frozen = true;
    }

    pub fn resume(&self) {
        self.state().frozen = false;
        self.resumed.notify_waiters();
    }

    pub fn set_delay(&self, max: Duration) {
        self.state().max_delay = max;
    }

    pub fn set_bad_payload(&self, per_mille: u64) {
        self.state().bad_payload = per_mille;
    }

    /// Fills `disk` up (writes that need space are refused) or frees space
    /// on it again.
    pub fn set_full(&self, disk: Uuid, full: bool) {
        if let Some(d) = self.state().disks.get_mut(&disk) {
            d.full = full;
        }
    }

    /// Flips bits in one block of one chunk's stored data: its checksum
    /// fails from now on. `whole_chunk`: the chunk's extent record is
    /// damaged instead, so no block of it is trusted.
    pub fn corrupt(&self, disk: Uuid, vdisk: Uuid, chunk: u64, block: u64, whole_chunk: bool) {
        let mut s = self.state();
        let chunk_size = s.chunk_size;
        let Some(d) = s.disks.get_mut(&disk) else {
            return;
        };
        d.flush(chunk_size);
        if let Some(c) = d.durable.get_mut(&(vdisk, chunk)) {
            if whole_chunk {
                c.torn.extend(0..chunk_size / BLOCK);
            } else {
                c.torn.insert(block % (chunk_size / BLOCK));
            }
        }
    }

    /// Adds a deterministic fault; returns its id (for [`SimNode::release`]).
    pub fn add_rule(&self, rule: Rule) -> u64 {
        self.add_rule_times(rule, None)
    }

    /// Adds a fault that applies to the next `times` matching requests
    /// only (`None`: any number); a request it holds waits until release.
    pub fn add_rule_times(&self, rule: Rule, times: Option<u32>) -> u64 {
        let mut s = self.state();
        s.next_rule += 1;
        let id = s.next_rule;
        s.rules.push(NodeRule {
            id,
            rule,
            left: times,
        });
        id
    }

    /// Ends rule `id`: requests it held run now.
    pub fn release(&self, id: u64) {
        self.state().rules.retain(|r| r.id != id);
        self.resumed.notify_waiters();
    }

    /// The node's activity marks are lost (its mark store found damaged at
    /// a restart): every extent of every vDisk is in doubt until a writer
    /// clears the vDisk's marks as a whole.
    pub fn lose_marks(&self) {
        let mut s = self.state();
        s.marks.clear();
        s.marks_lost = true;
        s.known.clear();
    }

    /// The activity marks this node keeps for `vdisk`, `(extent, epoch)`;
    /// `None` if they were lost and no writer cleared them since.
    pub fn marks(&self, vdisk: Uuid) -> Option<Vec<(u64, u64)>> {
        let s = self.state();
        let mut reply = FenceReply::default();
        s.fence_marks(vdisk, &mut reply);
        (!reply.marks_lost).then_some(reply.marks)
    }

    /// Requests waiting on a hold rule now.
    pub fn held(&self) -> usize {
        self.state().held
    }

    /// The machine loses power and every disk's page cache is lost whole
    /// (`keep_cache`: written back whole instead): the two ends of what
    /// [`SimNode::lose_power`] draws at random.
    pub fn lose_power_with(&self, keep_cache: bool) {
        let mut s = self.state();
        s.up = false;
        s.incarnation += 1;
        s.boot += 1;
        s.frozen = false;
        let chunk_size = s.chunk_size;
        for d in s.disks.values_mut() {
            if keep_cache {
                d.flush(chunk_size);
            } else {
                d.cache.clear();
            }
        }
        drop(s);
        self.resumed.notify_waiters();
    }

    /// Replaces one chunk's stored content with `data` whose checksums
    /// pass: a copy that reads back wrong bytes as good (what an extent
    /// whose record was damaged did when it read as zeros).
    pub fn rot(&self, disk: Uuid, vdisk: Uuid, chunk: u64, data: &[u8]) {
        let mut s = self.state();
        let chunk_size = s.chunk_size;
        let Some(d) = s.disks.get_mut(&disk) else {
            return;
        };
        d.flush(chunk_size);
        let c = d
            .durable
            .entry((vdisk, chunk))
            .or_insert_with(|| Chunk::new(chunk_size));
        c.data[..data.len()].copy_from_slice(data);
        c.torn.clear();
    }

    /// Whether `disk` still doubts its copy of `vdisk` (its map was lost
    /// and no writer vouched for the copy since).
    pub fn doubts(&self, disk: Uuid, vdisk: Uuid) -> bool {
        self.state()
            .disks
            .get(&disk)
            .and_then(|d| d.doubt.as_ref())
            .is_some_and(|d| !d.vouched.contains(&vdisk))
    }

    /// Chunks of `vdisk` this node stores on `disk`.
    pub fn chunks(&self, disk: Uuid, vdisk: Uuid) -> Vec<u64> {
        let s = self.state();
        s.disks
            .get(&disk)
            .map(|d| {
                d.allocated()
                    .into_iter()
                    .filter(|(v, _)| *v == vdisk)
                    .map(|(_, c)| c)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What a read of the whole chunk returns on `disk` (`None`: a block fails
    /// its checksum).
    pub fn peek(&self, disk: Uuid, vdisk: Uuid, chunk: u64) -> Option<Vec<u8>> {
        let s = self.state();
        let chunk_size = s.chunk_size;
        let d = s.disks.get(&disk)?;
        match d.view(vdisk, chunk, chunk_size) {
            None => Some(vec![0; chunk_size as usize]),
            Some(c) if c.torn.is_empty() => Some(c.data),
            Some(_) => None,
        }
    }

    /// Whether the node is frozen (SIGSTOP: it does not heartbeat either).
    pub fn is_frozen(&self) -> bool {
        self.state().frozen
    }

    /// The copies this node reports to the zone: (disk, vDisk) of every
    /// vDisk with chunks or an epoch on the disk, as a real node's heartbeat does.
    pub fn copies(&self) -> Vec<[Uuid; 2]> {
        let s = self.state();
        let mut out = BTreeSet::new();
        for (disk, d) in &s.disks {
            out.extend(d.epochs.keys().map(|v| [*disk, *v]));
            out.extend(d.allocated().into_iter().map(|(v, _)| [*disk, v]));
        }
        out.into_iter().collect()
    }

    /// Frees the copy of `vdisk` on `disk` (the zone said it moved away),
    /// as the real node's `free_moved_copy` does: every chunk (a free record
    /// per extent, unsynced: a power loss may bring some back) and the
    /// epoch; until rewritten whole, its chunks read as errors.
    pub fn free(&self, disk: Uuid, vdisk: Uuid) {
        let mut s = self.state();
        let chunk_size = s.chunk_size;
        let Some(d) = s.disks.get_mut(&disk) else {
            return;
        };
        for (v, chunk) in d.allocated() {
            if v == vdisk {
                d.cache.push(Pending {
                    vdisk,
                    chunk,
                    offset: 0,
                    data: None,
                    len: chunk_size,
                    frees: true,
                });
            }
        }
        d.epochs.remove(&vdisk);
        d.moved_away.insert(vdisk, SimMovedAway::default());
    }

    /// Frees the chunks of groups `groups` (of `stripes`) of the vDisk on
    /// `disk`, which moved away while the disk keeps its other groups, as
    /// the real chunk store does (`Disk::free_moved_groups`).
    pub fn free_groups(&self, disk: Uuid, vdisk: Uuid, stripes: u32, groups: &[u32]) {
        let mut s = self.state();
        let chunk_size = s.chunk_size;
        let Some(d) = s.disks.get_mut(&disk) else {
            return;
        };
        let stripes64 = u64::from(stripes.max(1));
        let in_groups = |c: u64| groups.contains(&((c % stripes64) as u32));
        let m = d.moved_away.entry(vdisk).or_insert_with(|| SimMovedAway {
            groups: Some((stripes, BTreeSet::new())),
            whole: BTreeSet::new(),
        });
        if let Some((_, set)) = &mut m.groups {
            set.extend(groups.iter().copied());
        }
        m.whole.retain(|c| !in_groups(*c));
        for (v, chunk) in d.allocated() {
            if v == vdisk && in_groups(chunk) {
                d.cache.push(Pending {
                    vdisk,
                    chunk,
                    offset: 0,
                    data: None,
                    len: chunk_size,
                    frees: true,
                });
            }
        }
        // Durable before the node tells the zone, as the real node flushes.
        d.flush(chunk_size);
    }

    /// The chunks of `vdisk` that `disk` holds.
    pub fn chunks_of(&self, disk: Uuid, vdisk: Uuid) -> Vec<u64> {
        let s = self.state();
        s.disks.get(&disk).map_or_else(Vec::new, |d| {
            d.allocated()
                .into_iter()
                .filter(|(v, _)| *v == vdisk)
                .map(|(_, c)| c)
                .collect()
        })
    }

    /// Reads this node refused because their copy was freed after it moved.
    pub fn freed_reads(&self) -> u64 {
        self.state().freed_reads
    }

    pub fn disks(&self) -> Vec<Uuid> {
        self.state().disks.keys().copied().collect()
    }

    /// Runs one request as the node would.
    async fn execute(self: Arc<Self>, op: Op, marking: bool) -> Result<Reply, ConnError> {
        let (life, delay) = {
            let mut s = self.state();
            if !s.up {
                return Err(ConnError::Connect {
                    addr: self.addr.clone(),
                    reason: "connection refused".into(),
                });
            }
            // The mark is durable before the write runs, whatever happens
            // to the write after it arrived.
            if marking {
                s.mark(&op);
            }
            // A request takes 50-250 us, plus the injected delay.
            let max = s.max_delay.as_micros() as u64;
            let delay = Duration::from_micros(
                50 + s.rng.below(200) + if max == 0 { 0 } else { s.rng.below(max) },
            );
            (s.incarnation, delay)
        };
        tokio::time::sleep(delay).await;
        // The hold rule this request waits on, and how it ends.
        let mut held_by: Option<(u64, Option<Status>)> = None;
        loop {
            let resumed = self.resumed.notified();
            {
                let mut s = self.state();
                if s.incarnation != life || !s.up {
                    if held_by.is_some() {
                        s.held -= 1;
                    }
                    return Err(ConnError::Broken {
                        addr: self.addr.clone(),
                        reason: "the node went away".into(),
                    });
                }
                if held_by.is_none() {
                    let chunk_size = s.chunk_size;
                    if let Some(r) = s.rules.iter_mut().find(|r| {
                        r.left != Some(0)
                            && r.rule.holds()
                            && op.matches(r.rule.matcher(), chunk_size)
                    }) {
                        if let Some(n) = r.left.as_mut() {
                            *n -= 1;
                        }
                        let then = match r.rule {
                            Rule::HoldThenFail(_, st) => Some(st),
                            _ => None,
                        };
                        held_by = Some((r.id, then));
                        s.held += 1;
                    }
                }
                let holding = held_by.is_some_and(|(id, _)| s.rules.iter().any(|r| r.id == id));
                if !s.frozen && !holding {
                    if held_by.is_some() {
                        s.held -= 1;
                    }
                    let then = held_by.and_then(|(_, then)| then);
                    return Ok(Self::run(&mut s, op, marking, then));
                }
            }
            resumed.await;
        }
    }

    fn run(s: &mut NodeState, op: Op, marking: bool, then_fail: Option<Status>) -> Reply {
        let chunk_size = s.chunk_size;
        let fail = then_fail.or_else(|| {
            let r = s.rules.iter_mut().find(|r| {
                r.left != Some(0)
                    && matches!(r.rule, Rule::Fail(m, _) if op.matches(&m, chunk_size))
            })?;
            if let Some(n) = r.left.as_mut() {
                *n -= 1;
            }
            match r.rule {
                Rule::Fail(_, st) => Some(st),
                _ => None,
            }
        });
        if let Some(status) = fail {
            return Reply {
                status,
                body: b"injected failure".to_vec(),
            };
        }
        let ok = |body: Vec<u8>| Reply {
            status: Status::Ok,
            body,
        };
        let err = |status: Status, msg: &str| Reply {
            status,
            body: msg.as_bytes().to_vec(),
        };
        let disk_of = |s: &NodeState, d: &Uuid| s.disks.contains_key(d);
        match op {
            Op::Read {
                vdisk,
                disk,
                chunk,
                offset,
                len,
            } => {
                if !disk_of(s, &disk) {
                    return err(Status::NoSuchDisk, "no such disk");
                }
                let (freed, doubted) = {
                    let d = &s.disks[&disk];
                    let moved = d.moved_away.get(&vdisk).is_some_and(|m| m.uncertain(chunk));
                    (!d.holds((vdisk, chunk)) && moved, d.doubts(vdisk, chunk))
                };
                if doubted {
                    return err(
                        Status::Checksum,
                        "the disk's map was lost: the chunk is unknown",
                    );
                }
                if freed {
                    s.freed_reads += 1;
                    return err(
                        Status::Checksum,
                        "the copy was freed after it moved: the chunk is unknown",
                    );
                }
                match s.disks[&disk].read(vdisk, chunk, offset, len) {
                    Some(data) => ok(data),
                    None => err(Status::Checksum, "block checksum mismatch"),
                }
            }
            Op::Write {
                vdisk,
                disk,
                chunk,
                offset,
                data,
                epoch,
            } => {
                let key = (disk, chunk, offset);
                if !s.refused.contains(&key) && s.bad_payload > 0 && s.rng.chance(s.bad_payload) {
                    s.refused.insert(key);
                    return err(Status::BadPayload, "payload checksum mismatch");
                }
                Self::mutate(s, disk, vdisk, epoch, |d| {
                    let len = data.len() as u64;
                    Pending {
                        vdisk,
                        chunk,
                        offset,
                        data: Some(data),
                        len,
                        frees: false,
                    }
                    .into_checked(d, chunk_size)
                })
            }
            Op::Zero {
                vdisk,
                disk,
                chunk,
                offset,
                len,
                epoch,
            } => Self::mutate(s, disk, vdisk, epoch, |d| {
                let frees = offset == 0 && len == chunk_size;
                if !frees && d.doubts(vdisk, chunk) {
                    return Err(Status::Checksum);
                }
                let p = Pending {
                    vdisk,
                    chunk,
                    offset,
                    data: None,
                    len,
                    frees,
                };
                // Zeroing a chunk that holds nothing takes no space.
                if !frees && !d.holds((vdisk, chunk)) {
                    if d.uncertain(vdisk, chunk) {
                        return Err(Status::Checksum);
                    }
                    return Ok(None);
                }
                Ok(Some(p))
            }),
            Op::Flush { disk } => {
                if disk.is_nil() {
                    for d in s.disks.values_mut() {
                        d.flush(chunk_size);
                    }
                } else if let Some(d) = s.disks.get_mut(&disk) {
                    d.flush(chunk_size);
                } else {
                    return err(Status::NoSuchDisk, "no such disk");
                }
                ok(Vec::new())
            }
            Op::Fence { vdisk, disk, epoch } => {
                let boot = s.boot;
                let doubt_token = s.incarnation + 1;
                let Some(d) = s.disks.get_mut(&disk) else {
                    return err(Status::NoSuchDisk, "no such disk");
                };
                let e = d.epochs.entry(vdisk).or_insert((0, u64::MAX));
                let same_boot = e.1 == boot;
                if epoch > e.0 {
                    *e = (epoch, boot);
                }
                let epoch = e.0;
                let doubtful = d
                    .doubt
                    .as_ref()
                    .is_some_and(|doubt| !doubt.vouched.contains(&vdisk));
                let mut reply = FenceReply {
                    epoch,
                    same_boot,
                    doubtful,
                    token: if doubtful { doubt_token } else { 0 },
                    doubted: Vec::new(),
                    marks_lost: false,
                    marks: Vec::new(),
                };
                if marking {
                    s.fence_marks(vdisk, &mut reply);
                }
                ok(reply.encode())
            }
            Op::Vouch {
                vdisk,
                disk,
                epoch,
                token,
            } => {
                let doubt_token = s.incarnation + 1;
                let Some(d) = s.disks.get_mut(&disk) else {
                    return err(Status::NoSuchDisk, "no such disk");
                };
                if let Some(stale) = d.refuse_stale(vdisk, epoch) {
                    return stale;
                }
                if token != doubt_token {
                    return err(
                        Status::Invalid,
                        "the disk was reopened since: fence it again",
                    );
                }
                if let Some(doubt) = d.doubt.as_mut() {
                    doubt.vouched.insert(vdisk);
                }
                ok(Vec::new())
            }
            Op::Unmark {
                vdisk,
                disk,
                epoch,
                upto,
                extents,
            } => {
                let Some(d) = s.disks.get(&disk) else {
                    return err(Status::NoSuchDisk, "no such disk");
                };
                // Fenced like a write.
                if let Some(stale) = d.refuse_stale(vdisk, epoch) {
                    return stale;
                }
                let upto = upto.min(epoch);
                if extents.is_empty() {
                    s.marks.retain(|&(v, _), e| v != vdisk || *e > upto);
                    if s.marks_lost {
                        s.known.insert(vdisk);
                    }
                } else {
                    for x in extents {
                        if s.marks.get(&(vdisk, x)).is_some_and(|e| *e <= upto) {
                            s.marks.remove(&(vdisk, x));
                        }
                    }
                }
                ok(Vec::new())
            }
            Op::Other => err(Status::Unsupported, "not simulated"),
        }
    }

    fn mutate(
        s: &mut NodeState,
        disk: Uuid,
        vdisk: Uuid,
        epoch: u64,
        make: impl FnOnce(&SimDisk) -> Result<Option<Pending>, Status>,
    ) -> Reply {
        let Some(d) = s.disks.get_mut(&disk) else {
            return Reply {
                status: Status::NoSuchDisk,
                body: b"no such disk".to_vec(),
            };
        };
        if let Some(stale) = d.refuse_stale(vdisk, epoch) {
            return stale;
        }
        match make(d) {
            Ok(Some(p)) => {
                // A chunk set whole is known again.
                if p.offset == 0 && p.len == s.chunk_size {
                    if let Some(m) = d.moved_away.get_mut(&p.vdisk) {
                        m.whole.insert(p.chunk);
                    }
                    if let Some(doubt) = d.doubt.as_mut() {
                        doubt.resolved.insert((p.vdisk, p.chunk));
                    }
                }
                d.cache.push(p);
                Reply {
                    status: Status::Ok,
                    body: Vec::new(),
                }
            }
            Ok(None) => Reply {
                status: Status::Ok,
                body: Vec::new(),
            },
            Err(status) => Reply {
                status,
                body: match status {
                    Status::NoSpace => b"no space left on the disk".to_vec(),
                    _ => b"the chunk is unknown: write it whole".to_vec(),
                },
            },
        }
    }
}

impl Pending {
    /// Whether applying this write takes space on a thin disk: data into a
    /// chunk it does not hold, or into a block that reads as zeros.
    fn needs_space(&self, d: &SimDisk, new: bool, chunk_size: u64) -> bool {
        let Some(data) = &self.data else {
            return false; // zeros allocate nothing
        };
        if new {
            return data.iter().any(|b| *b != 0);
        }
        let Some(held) = d.view(self.vdisk, self.chunk, chunk_size) else {
            return data.iter().any(|b| *b != 0);
        };
        let first = self.offset / BLOCK;
        let end = (self.offset + self.len).div_ceil(BLOCK);
        (first..end).any(|b| {
            let block = b * BLOCK..(b + 1) * BLOCK;
            let lo = block.start.max(self.offset);
            let hi = block.end.min(self.offset + self.len);
            let gets_data = data[(lo - self.offset) as usize..(hi - self.offset) as usize]
                .iter()
                .any(|x| *x != 0);
            let empty = held.data[block.start as usize..block.end as usize]
                .iter()
                .all(|x| *x == 0);
            gets_data && empty
        })
    }

    /// A write to a chunk the disk does not hold yet needs a free extent.
    fn into_checked(self, d: &SimDisk, chunk_size: u64) -> Result<Option<Pending>, Status> {
        let whole = self.offset == 0 && self.len == chunk_size;
        if !whole && d.doubts(self.vdisk, self.chunk) {
            return Err(Status::Checksum);
        }
        let new = !d.holds((self.vdisk, self.chunk));
        if new
            && d.uncertain(self.vdisk, self.chunk)
            && !(self.offset == 0 && self.len == chunk_size)
        {
            return Err(Status::Checksum);
        }
        if d.full && self.needs_space(d, new, chunk_size) {
            return Err(Status::NoSpace);
        }
        // (Counting what is allocated only when it could be the limit.)
        if new
            && (d.durable.len() + d.cache.len()) as u64 >= d.capacity_chunks
            && d.allocated().len() as u64 >= d.capacity_chunks
        {
            return Err(Status::NoSpace);
        }
        Ok(Some(self))
    }
}

/// Links to simulated nodes, by address.
pub struct SimConnector {
    pub nodes: Vec<Arc<SimNode>>,
    volatile: Arc<Mutex<Option<Volatile>>>,
}

/// A guest buffer that changes while a write from it is in flight: the
/// first `intact` transmissions from it carry what was there when the write
/// began, every later one the changed bytes (one bit flipped). A node
/// refuses bytes that do not match the payload crc the client sent
/// (`BadPayload`); a transmission without a crc is checksummed by the
/// connection as it goes, so the node takes whatever it carries.
#[derive(Debug, Clone, Copy)]
struct Volatile {
    start: usize,
    len: usize,
    intact: u32,
    sent: u32,
}

impl SimConnector {
    pub fn new(nodes: Vec<Arc<SimNode>>) -> Self {
        SimConnector {
            nodes,
            volatile: Arc::default(),
        }
    }

    /// Makes `buf` a guest buffer that changes in flight after `intact`
    /// transmissions from it (see [`Volatile`]); `None` ends it.
    pub fn set_volatile(&self, buf: Option<&[u8]>, intact: u32) {
        *self.volatile.lock().expect("volatile poisoned") = buf.map(|b| Volatile {
            start: b.as_ptr() as usize,
            len: b.len(),
            intact,
            sent: 0,
        });
    }
}

impl Connector for SimConnector {
    fn link(
        &self,
        addr: &NodeAddr,
        _shm: Arc<SharedMemory>,
        _client: [u8; 16],
        timeout: Duration,
        boot: Arc<BootWatch>,
    ) -> Arc<dyn NodeIo> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.addr == addr.addr)
            .cloned()
            .expect("the zone names only simulated nodes");
        Arc::new(SimLink {
            node,
            timeout,
            connected: Mutex::new(None),
            boot: BootGuard::new(boot),
            volatile: self.volatile.clone(),
            marking: addr.marks,
        })
    }
}

/// One volume handle's link to one simulated node.
struct SimLink {
    node: Arc<SimNode>,
    timeout: Duration,
    /// The node life this link's "connection" reached: a crash or a power
    /// loss breaks it, and the next request connects again.
    connected: Mutex<Option<u64>>,
    boot: BootGuard,
    volatile: Arc<Mutex<Option<Volatile>>>,
    /// The client keeps activity marks on the node (protocol version 5).
    marking: bool,
}

impl SimLink {
    async fn send(&self, op: Op) -> Result<Reply, ConnError> {
        // Connecting again after the node's restart tells its boot identity.
        if let Some((life, boot)) = self.node.session() {
            let mut connected = self.connected.lock().expect("poisoned");
            if *connected != Some(life) {
                *connected = Some(life);
                self.boot.connected(Some(boot));
            }
        }
        self.boot.check(&self.node.addr)?;
        let task = tokio::spawn(self.node.clone().execute(op, self.marking));
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ConnError::Broken {
                addr: self.node.addr.clone(),
                reason: "request task failed".into(),
            }),
            Err(_) => Err(ConnError::Timeout {
                addr: self.node.addr.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

impl SimLink {
    /// Whether this transmission of `payload` carries changed bytes (see
    /// [`Volatile`]).
    fn changed_in_flight(&self, payload: &[&[u8]]) -> bool {
        let mut v = self.volatile.lock().expect("volatile poisoned");
        let Some(v) = v.as_mut() else {
            return false;
        };
        let from_it = payload.first().is_some_and(|p| {
            let at = p.as_ptr() as usize;
            at >= v.start && at < v.start + v.len
        });
        if !from_it {
            return false;
        }
        v.sent += 1;
        v.sent > v.intact
    }
}

fn op_of(req: &Request<'_>, payload: &[&[u8]]) -> Op {
    let u = Uuid::from_bytes;
    match req {
        Request::Read(r) => Op::Read {
            vdisk: u(r.vdisk),
            disk: u(r.disk),
            chunk: r.chunk,
            offset: r.offset as u64,
            len: r.len as u64,
        },
        Request::Write(r, _) => Op::Write {
            vdisk: u(r.vdisk),
            disk: u(r.disk),
            chunk: r.chunk,
            offset: r.offset as u64,
            data: payload.concat(),
            epoch: r.epoch,
        },
        Request::Discard(r) | Request::WriteZeroes(r) => Op::Zero {
            vdisk: u(r.vdisk),
            disk: u(r.disk),
            chunk: r.chunk,
            offset: r.offset as u64,
            len: r.len as u64,
            epoch: r.epoch,
        },
        Request::Flush(d) => Op::Flush { disk: u(d.disk) },
        Request::Fence(v) => Op::Fence {
            vdisk: u(v.vdisk),
            disk: u(v.disk),
            epoch: v.epoch,
        },
        Request::Vouch(v) => Op::Vouch {
            vdisk: u(v.vref.vdisk),
            disk: u(v.vref.disk),
            epoch: v.vref.epoch,
            token: v.token,
        },
        Request::Unmark(m, list) => Op::Unmark {
            vdisk: u(m.vref.vdisk),
            disk: u(m.vref.disk),
            epoch: m.vref.epoch,
            upto: m.upto,
            extents: if m.count == 0 {
                Vec::new()
            } else {
                tessera_proto::UnmarkRef::extents(list).collect()
            },
        },
        _ => Op::Other,
    }
}

#[async_trait]
impl NodeIo for SimLink {
    fn addr(&self) -> &str {
        &self.node.addr
    }

    async fn call(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
    ) -> Result<Reply, ConnError> {
        let mut op = op_of(&req, payload);
        if let Op::Write { data, .. } = &mut op {
            if self.changed_in_flight(payload) {
                data[0] ^= 1;
                if crc.is_some_and(|c| c != tessera_crc::crc32c_append(0, data)) {
                    return Ok(Reply {
                        status: Status::BadPayload,
                        body: b"payload checksum mismatch".to_vec(),
                    });
                }
            }
        }
        self.send(op).await
    }

    async fn read(&self, req: Request<'_>, dest: &mut [&mut [u8]]) -> Result<Reply, ConnError> {
        let reply = self.send(op_of(&req, &[])).await?;
        if reply.status != Status::Ok {
            return Ok(reply);
        }
        let mut pos = 0;
        for d in dest.iter_mut() {
            let n = d.len();
            d.copy_from_slice(&reply.body[pos..pos + n]);
            pos += n;
        }
        Ok(Reply {
            status: Status::Ok,
            body: Vec::new(),
        })
    }

    async fn close(&self) {}

    fn accept_reboot(&self) {
        self.boot.accept();
    }
}
