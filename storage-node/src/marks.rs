//! The node's activity marks: the extents of each vDisk that may hold writes
//! not every copy has.
//!
//! A mark `(vDisk, extent) → epoch` says: a writer of that epoch wrote (or
//! was about to write) into this extent on this node, and no writer has yet
//! said that every copy of the extent agrees. The node makes a mark durable
//! *before* it runs a write into an extent not marked for the writer's epoch,
//! so after any crash the marks are a superset of the extents whose copies
//! may differ. The store only keeps marks; when to set and clear them is the
//! node's and the writer's business.
//!
//! # Durability
//!
//! [`MarkStore::apply`] returns once its operations are durable. Concurrent
//! callers share a commit (group commit): while one caller writes and syncs a
//! batch, the others' operations gather into the next.
//!
//! # On-disk format
//!
//! The store is a file (or any [`Device`]) of two equal *halves*. A half is
//! a run of 4 KiB blocks, and every block is written twice, in two adjacent
//! slots, in the same write: block `seq` of a half is in slots `2·seq` and
//! `2·seq + 1`. A half holds, for one *generation*:
//!
//! ```text
//! seq 0              header: generation, snapshot length S, flags
//! seq 1 ..= S        snapshot: the whole state when the generation began
//! seq S+1 ..         log: the operations of later commits, in order
//! ```
//!
//! A commit appends its operations as the next blocks of the active half and
//! syncs. When they do not fit, the state is written as a snapshot into the
//! other half under the next generation (snapshot blocks, sync, header,
//! sync), which then becomes the active half; the older half is left as it
//! is until the next switch. Every open also switches (after recovering),
//! so no block a crash left half-written is ever read as part of a later
//! commit.
//!
//! Block layout (little-endian; crc32c over the block with its last 4 bytes
//! zero, stored in those 4 bytes):
//!
//! ```text
//! offset size field
//!      0    4 magic        b"TSAM"
//!      4    2 version      1
//!      6    2 kind         0 header, 1 operations
//!      8    8 generation
//!     16    8 seq
//!     24    8 synced_upto  every block of this generation with a lower or
//!                          equal seq was durable when this one was written
//!     32    4 count        header: S; operations: number of entries
//!     36    4 flags        header, bit 0: marks were lost before this
//!                          generation (see below)
//!     40    8 reserved     zero
//!     48 32·n entries      16 vDisk uuid, 8 epoch, 4 extent, 1 op, 3 zero
//!   4092    4 crc32c
//! ```
//!
//! Operations: 1 set (the mark's epoch becomes the larger of the two),
//! 2 clear (the mark goes if its epoch is at most the entry's), 3 clear every
//! mark of the vDisk at most the entry's epoch, 4 the vDisk is *known* (see
//! below; only in snapshots and after a loss).
//!
//! # Recovery and damage
//!
//! Open reads both halves and takes the one whose header (either copy) is
//! valid with the higher generation; of it, every snapshot block must be
//! readable (one copy suffices), then the log is replayed up to the first
//! block with neither copy valid. A block after that point whose
//! `synced_upto` says the missing block had been durable proves damage, not
//! a crash: then, like a half whose snapshot is unreadable, or a store with
//! no valid header that is not new, the marks are *lost*.
//!
//! A store whose marks were lost cannot say which extents are in doubt, so
//! it says "every extent" for every vDisk ([`VdiskMarks::Any`]) until a
//! writer clears that vDisk's marks as a whole (after it made every copy of
//! the vDisk agree), which makes the vDisk *known* again. Damage to one copy
//! of any block costs nothing; damage to both copies of the newest block, or
//! of both header copies of the newest half, is not detectable and loses
//! what it held.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tessera_chunkstore::Device;
use tessera_crc::crc32c;
use uuid::Uuid;

const BLOCK: usize = 4096;
const MAGIC: &[u8; 4] = b"TSAM";
const VERSION: u16 = 1;
const KIND_HEADER: u16 = 0;
const KIND_OPS: u16 = 1;
const HEAD: usize = 48;
const ENTRY: usize = 32;
/// Entries in one block.
pub const ENTRIES_PER_BLOCK: usize = (BLOCK - 4 - HEAD) / ENTRY;
const FLAG_LOST: u32 = 1;

const OP_SET: u8 = 1;
const OP_CLEAR: u8 = 2;
const OP_CLEAR_VDISK: u8 = 3;
const OP_KNOWN: u8 = 4;

/// The default size of a node's marks file: two halves of 4 MiB, room for
/// a snapshot of about 64,000 marks.
pub const DEFAULT_SIZE: u64 = 8 << 20;

/// One change to the marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkOp {
    /// Mark `extent` of `vdisk` for `epoch` (a mark keeps the larger epoch).
    Set {
        vdisk: Uuid,
        extent: u32,
        epoch: u64,
    },
    /// Remove the mark of `extent` if its epoch is at most `upto`.
    Clear { vdisk: Uuid, extent: u32, upto: u64 },
    /// Remove every mark of `vdisk` whose epoch is at most `upto`; the
    /// vDisk is then known again after a loss.
    ClearVdisk { vdisk: Uuid, upto: u64 },
}

/// What the store knows of one vDisk's marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VdiskMarks {
    /// The marks were lost: any extent may hold writes not every copy has.
    Any,
    /// These extents, each with the epoch of its newest mark, sorted.
    Extents(Vec<(u32, u64)>),
}

/// How [`MarkStore::open`] found the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A new store, formatted now.
    New,
    /// The marks as the last commit left them.
    Recovered,
    /// The marks were lost (or had been lost before and some vDisks are
    /// still not known again): why.
    Lost(String),
}

/// Why the store cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarksError {
    #[error("the activity marks store is too small: {0}")]
    TooSmall(String),
    #[error("the activity marks store failed: {0}")]
    Io(String),
}

/// The durable marks of one node (see the module documentation).
pub struct MarkStore {
    dev: Arc<dyn Device>,
    /// Slots (block pairs) in one half.
    half_blocks: u64,
    state: Mutex<State>,
    committed: Condvar,
}

impl std::fmt::Debug for MarkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkStore")
            .field("half_blocks", &self.half_blocks)
            .finish_non_exhaustive()
    }
}

#[derive(Default, Clone, PartialEq, Eq, Debug)]
struct Marks {
    /// (vDisk, extent) → epoch.
    map: HashMap<(Uuid, u32), u64>,
    /// Marks were lost at some point: only vDisks in `known` have marks
    /// that say something.
    lost: bool,
    known: BTreeSet<Uuid>,
}

impl Marks {
    fn apply(&mut self, op: &MarkOp) {
        match *op {
            MarkOp::Set {
                vdisk,
                extent,
                epoch,
            } => {
                let e = self.map.entry((vdisk, extent)).or_insert(epoch);
                *e = (*e).max(epoch);
            }
            MarkOp::Clear {
                vdisk,
                extent,
                upto,
            } => {
                if self.map.get(&(vdisk, extent)).is_some_and(|&e| e <= upto) {
                    self.map.remove(&(vdisk, extent));
                }
            }
            MarkOp::ClearVdisk { vdisk, upto } => {
                self.map.retain(|&(v, _), &mut e| v != vdisk || e > upto);
                if self.lost {
                    self.known.insert(vdisk);
                }
            }
        }
    }

    fn of(&self, vdisk: Uuid) -> VdiskMarks {
        if self.lost && !self.known.contains(&vdisk) {
            return VdiskMarks::Any;
        }
        let mut v: Vec<(u32, u64)> = self
            .map
            .iter()
            .filter(|((d, _), _)| *d == vdisk)
            .map(|(&(_, x), &e)| (x, e))
            .collect();
        v.sort_unstable();
        VdiskMarks::Extents(v)
    }
}

struct State {
    /// Every operation applied so far, durable or not.
    marks: Marks,
    /// Operations not yet handed to a commit.
    pending: Vec<MarkOp>,
    /// The batch `pending` will be committed in; batches below it are
    /// committed or being committed.
    next_batch: u64,
    /// Every batch up to this one is durable.
    durable_batch: u64,
    /// A caller is writing a batch.
    committing: bool,
    /// The active half (0 or 1), its generation and its next free seq.
    half: u64,
    generation: u64,
    next_seq: u64,
    /// A commit failed: the store is unusable (why).
    failed: Option<String>,
    /// The batch that last changed each mark: a caller whose mark already
    /// exists waits only for that batch.
    set_in: HashMap<(Uuid, u32), u64>,
}

impl MarkStore {
    /// Opens the store on `dev`. `new` says the device was created just
    /// now (so no valid header means "format it", not "lost").
    pub fn open(dev: Arc<dyn Device>, new: bool) -> Result<(MarkStore, Opened), MarksError> {
        let half_blocks = dev.size() / 2 / (2 * BLOCK as u64);
        if half_blocks < 4 {
            return Err(MarksError::TooSmall(format!(
                "{} bytes; at least {} are needed",
                dev.size(),
                8 * 2 * BLOCK
            )));
        }
        let store = MarkStore {
            dev,
            half_blocks,
            state: Mutex::new(State {
                marks: Marks::default(),
                pending: Vec::new(),
                next_batch: 1,
                durable_batch: 0,
                committing: false,
                half: 1,
                generation: 0,
                next_seq: 0,
                failed: None,
                set_in: HashMap::new(),
            }),
            committed: Condvar::new(),
        };
        let halves = [store.read_half(0)?, store.read_half(1)?];
        let newest = (0..2)
            .filter_map(|h| match &halves[h] {
                Half::Empty => None,
                Half::Damaged { generation, .. } => Some((h, *generation)),
                Half::Valid { generation, .. } => Some((h, *generation)),
            })
            .max_by_key(|&(_, g)| g);
        let (marks, generation, half, opened) = match newest {
            None if new => (Marks::default(), 0, 1, Opened::New),
            None => (
                lost_marks(),
                0,
                1,
                Opened::Lost("no readable header in either half".into()),
            ),
            Some((h, g)) => match &halves[h] {
                Half::Valid { marks, .. } if marks.lost => (
                    marks.clone(),
                    g,
                    h as u64,
                    Opened::Lost("marks were lost before, some vDisks are not known again".into()),
                ),
                Half::Valid { marks, .. } => (marks.clone(), g, h as u64, Opened::Recovered),
                Half::Damaged { why, .. } => (lost_marks(), g, h as u64, Opened::Lost(why.clone())),
                Half::Empty => unreachable!("filtered out above"),
            },
        };
        {
            let mut st = store.lock();
            st.marks = marks;
            st.generation = generation;
            st.half = half;
        }
        // A fresh generation in the other half: what a crash left behind
        // in this one is never read again.
        store.switch_now()?;
        Ok((store, opened))
    }

    /// Applies `ops` and returns once they are durable.
    pub fn apply(&self, ops: &[MarkOp]) -> Result<(), MarksError> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(MarksError::Io(why.clone()));
        }
        let batch = st.next_batch;
        for op in ops {
            st.marks.apply(op);
            if let MarkOp::Set { vdisk, extent, .. } = *op {
                st.set_in.insert((vdisk, extent), batch);
            }
        }
        if ops.iter().any(|op| !matches!(op, MarkOp::Set { .. })) {
            let State { marks, set_in, .. } = &mut *st;
            set_in.retain(|k, _| marks.map.contains_key(k));
        }
        st.pending.extend_from_slice(ops);
        self.wait_for(st, batch)
    }

    /// Makes sure `extent` of `vdisk` is durably marked for `epoch` or a
    /// newer one; returns at once when it already is.
    pub fn mark(&self, vdisk: Uuid, extent: u32, epoch: u64) -> Result<(), MarksError> {
        let st = self.lock();
        if st
            .marks
            .map
            .get(&(vdisk, extent))
            .is_some_and(|&e| e >= epoch)
        {
            let batch = st.set_in.get(&(vdisk, extent)).copied().unwrap_or(0);
            if batch <= st.durable_batch {
                return Ok(());
            }
            return self.wait_for(st, batch);
        }
        drop(st);
        self.apply(&[MarkOp::Set {
            vdisk,
            extent,
            epoch,
        }])
    }

    /// Whether `extent` of `vdisk` is durably marked for `epoch` or a newer
    /// one (no waiting, no I/O).
    pub fn is_marked(&self, vdisk: Uuid, extent: u32, epoch: u64) -> bool {
        let st = self.lock();
        st.marks
            .map
            .get(&(vdisk, extent))
            .is_some_and(|&e| e >= epoch)
            && st
                .set_in
                .get(&(vdisk, extent))
                .is_none_or(|&b| b <= st.durable_batch)
    }

    /// What the store knows of `vdisk`'s marks (durable or being made so).
    pub fn marks_of(&self, vdisk: Uuid) -> VdiskMarks {
        self.lock().marks.of(vdisk)
    }

    /// Whether marks were lost and some vDisk is not known again.
    pub fn lost(&self) -> bool {
        self.lock().marks.lost
    }

    /// Where the next commit's blocks would go: the byte offset of their
    /// first slot pair (for tests that damage the newest blocks).
    #[doc(hidden)]
    pub fn log_end(&self) -> u64 {
        let st = self.lock();
        self.slot_offset(st.half, st.next_seq)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `batch` is durable, committing batches itself while no
    /// one else does.
    fn wait_for<'a>(&'a self, mut st: MutexGuard<'a, State>, batch: u64) -> Result<(), MarksError> {
        loop {
            if st.durable_batch >= batch {
                return Ok(());
            }
            if let Some(why) = &st.failed {
                return Err(MarksError::Io(why.clone()));
            }
            if st.committing {
                st = self.committed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.committing = true;
            let ops = std::mem::take(&mut st.pending);
            let this = st.next_batch;
            st.next_batch += 1;
            let plan = self.plan(&mut st, &ops);
            drop(st);
            let result = plan.and_then(|p| self.write(&p));
            st = self.lock();
            st.committing = false;
            match result {
                Ok(()) => st.durable_batch = this,
                Err(e) => st.failed = Some(e.to_string()),
            }
            self.committed.notify_all();
        }
    }

    /// Decides where a batch goes: appended to the active half, or, when
    /// it does not fit, a snapshot of the whole state in the other half.
    fn plan(&self, st: &mut State, ops: &[MarkOp]) -> Result<Plan, MarksError> {
        if ops.is_empty() {
            return Ok(Plan::default());
        }
        let blocks = ops.len().div_ceil(ENTRIES_PER_BLOCK) as u64;
        if st.next_seq + blocks <= self.half_blocks {
            let entries: Vec<[u8; ENTRY]> = ops.iter().map(encode_op).collect();
            let first = st.next_seq;
            let images = op_blocks(st.generation, first, first - 1, &entries);
            st.next_seq += blocks;
            return Ok(Plan {
                writes: vec![(self.slot_offset(st.half, first), images)],
                ..Plan::default()
            });
        }
        self.plan_switch(st)
    }

    /// A snapshot of `st.marks` into the other half, which becomes active.
    fn plan_switch(&self, st: &mut State) -> Result<Plan, MarksError> {
        let entries = snapshot_entries(&st.marks);
        let s = entries.len().div_ceil(ENTRIES_PER_BLOCK) as u64;
        if s + 1 > self.half_blocks {
            return Err(MarksError::TooSmall(format!(
                "{} marks need {} blocks, a half holds {}",
                entries.len(),
                s + 1,
                self.half_blocks
            )));
        }
        let half = 1 - st.half;
        let generation = st.generation + 1;
        let snapshot = op_blocks(generation, 1, 0, &entries);
        let header = header_block(generation, s as u32, st.marks.lost);
        st.half = half;
        st.generation = generation;
        st.next_seq = s + 1;
        let mut writes = Vec::new();
        if s > 0 {
            writes.push((self.slot_offset(half, 1), snapshot));
        }
        Ok(Plan {
            writes,
            header: Some((self.slot_offset(half, 0), header)),
        })
    }

    /// Switches halves at once (at open).
    fn switch_now(&self) -> Result<(), MarksError> {
        let plan = {
            let mut st = self.lock();
            self.plan_switch(&mut st)?
        };
        self.write(&plan)
    }

    fn write(&self, plan: &Plan) -> Result<(), MarksError> {
        let io = |what: &str, e: std::io::Error| MarksError::Io(format!("{what}: {e}"));
        for (offset, bytes) in &plan.writes {
            self.dev
                .write_at(bytes, *offset)
                .map_err(|e| io("write", e))?;
        }
        if !plan.writes.is_empty() || plan.header.is_some() {
            self.dev.sync().map_err(|e| io("sync", e))?;
        }
        if let Some((offset, bytes)) = &plan.header {
            self.dev
                .write_at(bytes, *offset)
                .map_err(|e| io("write the header", e))?;
            self.dev.sync().map_err(|e| io("sync the header", e))?;
        }
        Ok(())
    }

    fn slot_offset(&self, half: u64, seq: u64) -> u64 {
        (half * self.half_blocks + seq) * 2 * BLOCK as u64
    }

    /// Reads block `seq` of `half`: the first valid copy.
    fn read_block(&self, half: u64, seq: u64) -> Result<Option<Block>, MarksError> {
        let mut buf = vec![0u8; 2 * BLOCK];
        self.dev
            .read_at(&mut buf, self.slot_offset(half, seq))
            .map_err(|e| MarksError::Io(format!("read: {e}")))?;
        Ok(buf.chunks_exact(BLOCK).find_map(Block::decode))
    }

    fn read_half(&self, half: u64) -> Result<Half, MarksError> {
        let Some(head) = self.read_block(half, 0)? else {
            return Ok(Half::Empty);
        };
        if head.kind != KIND_HEADER || head.seq != 0 {
            return Ok(Half::Empty);
        }
        let generation = head.generation;
        let damaged = |why: String| Ok(Half::Damaged { generation, why });
        let s = u64::from(head.count);
        if s + 1 > self.half_blocks {
            return damaged(format!(
                "header of generation {generation} names {s} snapshot blocks"
            ));
        }
        let mut marks = Marks {
            lost: head.flags & FLAG_LOST != 0,
            ..Marks::default()
        };
        let mut seq = 1;
        while seq <= s {
            match self.read_block(half, seq)? {
                Some(b) if b.generation == generation && b.seq == seq && b.kind == KIND_OPS => {
                    b.replay(&mut marks)
                }
                _ => {
                    return damaged(format!(
                        "snapshot block {seq} of generation {generation} is unreadable"
                    ))
                }
            }
            seq += 1;
        }
        while seq < self.half_blocks {
            match self.read_block(half, seq)? {
                Some(b) if b.generation == generation && b.seq == seq && b.kind == KIND_OPS => {
                    b.replay(&mut marks);
                    seq += 1;
                }
                _ => break,
            }
        }
        // Past the end of the log: a later block that counts the missing
        // one as durable proves damage.
        for later in seq + 1..self.half_blocks {
            if let Some(b) = self.read_block(half, later)? {
                if b.generation == generation && b.seq == later && b.synced_upto >= seq {
                    return damaged(format!(
                        "log block {seq} of generation {generation} is unreadable, block {later} counts it durable"
                    ));
                }
            }
        }
        Ok(Half::Valid { generation, marks })
    }
}

fn lost_marks() -> Marks {
    Marks {
        lost: true,
        ..Marks::default()
    }
}

#[derive(Default)]
struct Plan {
    /// (offset, bytes), written in order before one sync.
    writes: Vec<(u64, Vec<u8>)>,
    /// A header written (and synced) after them.
    header: Option<(u64, Vec<u8>)>,
}

enum Half {
    Empty,
    Damaged { generation: u64, why: String },
    Valid { generation: u64, marks: Marks },
}

struct Block {
    kind: u16,
    generation: u64,
    seq: u64,
    synced_upto: u64,
    count: u32,
    flags: u32,
    entries: Vec<[u8; ENTRY]>,
}

impl Block {
    fn decode(b: &[u8]) -> Option<Block> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if b.len() != BLOCK || &b[0..4] != MAGIC || u16_at(4) != VERSION {
            return None;
        }
        if u32_at(BLOCK - 4) != block_crc(b) {
            return None;
        }
        let kind = u16_at(6);
        let count = u32_at(32);
        let entries = match kind {
            KIND_HEADER => Vec::new(),
            KIND_OPS if count as usize <= ENTRIES_PER_BLOCK => (0..count as usize)
                .map(|i| {
                    let o = HEAD + i * ENTRY;
                    b[o..o + ENTRY].try_into().expect("entry")
                })
                .collect(),
            _ => return None,
        };
        Some(Block {
            kind,
            generation: u64_at(8),
            seq: u64_at(16),
            synced_upto: u64_at(24),
            count,
            flags: u32_at(36),
            entries,
        })
    }

    fn replay(&self, marks: &mut Marks) {
        for e in &self.entries {
            let vdisk = Uuid::from_bytes(e[0..16].try_into().expect("16 bytes"));
            let epoch = u64::from_le_bytes(e[16..24].try_into().expect("8 bytes"));
            let extent = u32::from_le_bytes(e[24..28].try_into().expect("4 bytes"));
            match e[28] {
                OP_SET => marks.apply(&MarkOp::Set {
                    vdisk,
                    extent,
                    epoch,
                }),
                OP_CLEAR => marks.apply(&MarkOp::Clear {
                    vdisk,
                    extent,
                    upto: epoch,
                }),
                OP_CLEAR_VDISK => marks.apply(&MarkOp::ClearVdisk { vdisk, upto: epoch }),
                OP_KNOWN => {
                    marks.known.insert(vdisk);
                }
                // An entry of a later version: skipped, like an unknown op
                // in a record whose crc holds.
                _ => {}
            }
        }
    }
}

fn block_crc(b: &[u8]) -> u32 {
    let mut copy = [0u8; BLOCK];
    copy.copy_from_slice(b);
    copy[BLOCK - 4..].fill(0);
    crc32c(&copy)
}

fn encode_entry(vdisk: Uuid, epoch: u64, extent: u32, op: u8) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[0..16].copy_from_slice(vdisk.as_bytes());
    e[16..24].copy_from_slice(&epoch.to_le_bytes());
    e[24..28].copy_from_slice(&extent.to_le_bytes());
    e[28] = op;
    e
}

fn encode_op(op: &MarkOp) -> [u8; ENTRY] {
    match *op {
        MarkOp::Set {
            vdisk,
            extent,
            epoch,
        } => encode_entry(vdisk, epoch, extent, OP_SET),
        MarkOp::Clear {
            vdisk,
            extent,
            upto,
        } => encode_entry(vdisk, upto, extent, OP_CLEAR),
        MarkOp::ClearVdisk { vdisk, upto } => encode_entry(vdisk, upto, 0, OP_CLEAR_VDISK),
    }
}

fn snapshot_entries(marks: &Marks) -> Vec<[u8; ENTRY]> {
    let mut sets: Vec<_> = marks.map.iter().collect();
    sets.sort_unstable();
    let mut entries: Vec<[u8; ENTRY]> = sets
        .into_iter()
        .map(|(&(v, x), &e)| encode_entry(v, e, x, OP_SET))
        .collect();
    if marks.lost {
        entries.extend(marks.known.iter().map(|&v| encode_entry(v, 0, 0, OP_KNOWN)));
    }
    entries
}

/// The block images (each twice) of `entries` from `first` on.
fn op_blocks(generation: u64, first: u64, synced_upto: u64, entries: &[[u8; ENTRY]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, part) in entries.chunks(ENTRIES_PER_BLOCK).enumerate() {
        let mut b = block_head(
            KIND_OPS,
            generation,
            first + i as u64,
            synced_upto,
            part.len() as u32,
            0,
        );
        for (j, e) in part.iter().enumerate() {
            let o = HEAD + j * ENTRY;
            b[o..o + ENTRY].copy_from_slice(e);
        }
        seal(&mut b);
        out.extend_from_slice(&b);
        out.extend_from_slice(&b);
    }
    out
}

fn header_block(generation: u64, snapshot_blocks: u32, lost: bool) -> Vec<u8> {
    let flags = if lost { FLAG_LOST } else { 0 };
    let mut b = block_head(KIND_HEADER, generation, 0, 0, snapshot_blocks, flags);
    seal(&mut b);
    let mut out = b.to_vec();
    out.extend_from_slice(&b);
    out
}

fn block_head(
    kind: u16,
    generation: u64,
    seq: u64,
    synced_upto: u64,
    count: u32,
    flags: u32,
) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[0..4].copy_from_slice(MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&kind.to_le_bytes());
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..32].copy_from_slice(&synced_upto.to_le_bytes());
    b[32..36].copy_from_slice(&count.to_le_bytes());
    b[36..40].copy_from_slice(&flags.to_le_bytes());
    b
}

fn seal(b: &mut [u8; BLOCK]) {
    let crc = block_crc(b);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
}
