//! The checker: a model of what the guest was promised, block by block.
//!
//! Every write fills each 4 KiB block with content that names the write
//! and the block (a header and a pattern derived from both), so a read
//! tells exactly which write a block came from — or that it is another
//! block's data, or garbage. Per block the model keeps:
//!
//! - the newest acknowledged write (0: zeros, never written or discarded);
//! - writes that may or may not have landed: in flight, failed, or
//!   cut off by a writer crash;
//! - the content a read returned, pinned until the next write to the block
//!   (later reads must return the same: no flapping between copies);
//! - the newest write that a completed flush covered (what must survive
//!   any power loss the policy tolerates).
//!
//! The workload never has two overlapping writes in flight at once.

use std::collections::BTreeSet;

use crate::rng::Rng;

/// The checker's unit.
pub const BLOCK: usize = 4096;

/// The content write `id` puts in block `block` (`id` 0: zeros).
pub fn content(id: u64, block: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    fill(id, block, &mut out);
    out
}

/// Writes block `block`'s content for write `id` into `out` (one block long).
pub fn fill(id: u64, block: u64, out: &mut [u8]) {
    if id == 0 {
        out.fill(0);
        return;
    }
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    let mut r = Rng::new(id.wrapping_mul(0x9e37_79b9).wrapping_add(block));
    for c in out[16..].chunks_exact_mut(8) {
        c.copy_from_slice(&r.next_u64().to_le_bytes());
    }
}

/// Whether `data` is exactly what `fill(id, block, ..)` writes, compared as
/// it is generated (no copy).
fn matches(data: &[u8], id: u64, block: u64) -> bool {
    let mut r = Rng::new(id.wrapping_mul(0x9e37_79b9).wrapping_add(block));
    data[16..]
        .chunks_exact(8)
        .all(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) == r.next_u64())
}

/// What a block read back is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Write(u64),
    /// Another block's data (the write and the block it was written to).
    Misplaced {
        id: u64,
        block: u64,
    },
    Garbage,
}

pub fn decode(data: &[u8], block: u64) -> Seen {
    if data.iter().all(|b| *b == 0) {
        return Seen::Write(0);
    }
    let id = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let at = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    if id == 0 || data.len() != BLOCK || !matches(data, id, at) {
        return Seen::Garbage;
    }
    if at != block {
        return Seen::Misplaced { id, block: at };
    }
    Seen::Write(id)
}

#[derive(Debug, Clone, Default)]
struct Block {
    acked: u64,
    /// May or may not have landed.
    maybe: BTreeSet<u64>,
    /// Pinned by a read, until the next write.
    pinned: Option<u64>,
    /// Ids of the writes to this block, in issue order.
    history: Vec<u64>,
    /// Writes to this block not yet answered.
    in_flight: u64,
    /// Covered by a completed flush.
    flushed: u64,
    /// Writes acknowledged since the last completed flush's start.
    unflushed: BTreeSet<u64>,
}

/// The model of one vDisk.
pub struct Model {
    blocks: Vec<Block>,
    /// Ids of writes acknowledged, and when (the sequence number of the ack).
    next_id: u64,
}

/// What a read may return, taken when it is issued.
#[derive(Debug, Clone)]
pub struct Ticket {
    allowed: BTreeSet<u64>,
    issued: usize,
    /// A write was in flight when the read was issued.
    overlapped: bool,
}

/// A promise a read broke.
#[derive(Debug, Clone)]
pub struct Broken {
    pub block: u64,
    pub what: String,
}

impl Model {
    pub fn new(blocks: u64) -> Self {
        Model {
            blocks: vec![Block::default(); blocks as usize],
            next_id: 1,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// A write to `blocks` is issued; returns its id (`zero`: it writes zeros, id 0).
    pub fn issue(&mut self, blocks: std::ops::Range<u64>, zero: bool) -> u64 {
        let id = if zero {
            0
        } else {
            let id = self.next_id;
            self.next_id += 1;
            id
        };
        for b in blocks {
            let s = &mut self.blocks[b as usize];
            s.maybe.insert(id);
            s.pinned = None;
            s.history.push(id);
            s.in_flight += 1;
        }
        id
    }

    /// The write succeeded.
    pub fn acked(&mut self, blocks: std::ops::Range<u64>, id: u64) {
        for b in blocks {
            let s = &mut self.blocks[b as usize];
            s.acked = id;
            // No overlapping write was in flight: nothing older can show.
            s.maybe.clear();
            s.pinned = None;
            s.in_flight -= 1;
            s.unflushed.insert(id);
        }
    }

    /// The write failed or was cut off: it may have landed or not. Stays
    /// possible until the next acknowledged write.
    pub fn failed(&mut self, blocks: std::ops::Range<u64>, _id: u64) {
        for b in blocks {
            self.blocks[b as usize].in_flight -= 1;
        }
    }

    /// Writes in flight were cut off (a writer crashed): they may land or not.
    pub fn cut_off(&mut self, blocks: impl Iterator<Item = u64>) {
        for b in blocks {
            self.blocks[b as usize].in_flight = 0;
        }
    }

    /// A flush is issued: returns what it covers.
    pub fn flush_issued(&self) -> Vec<u64> {
        self.blocks.iter().map(|b| b.acked).collect()
    }

    /// A flush that was issued when blocks held `covered` completed.
    pub fn flushed(&mut self, covered: &[u64]) {
        for (s, c) in self.blocks.iter_mut().zip(covered) {
            if s.acked == *c || s.unflushed.contains(c) {
                s.flushed = *c;
                // Older acknowledged writes cannot come back now.
                let keep: BTreeSet<u64> = s.unflushed.iter().copied().filter(|u| u >= c).collect();
                s.unflushed = keep;
            }
        }
    }

    /// Every node lost power with nothing flushed since: acknowledged but
    /// unflushed writes may be gone (only when the whole placement lost
    /// power, which is beyond any policy's promise for unflushed data).
    pub fn lose_unflushed(&mut self) {
        for s in &mut self.blocks {
            let unflushed = std::mem::take(&mut s.unflushed);
            s.maybe.extend(unflushed);
            s.maybe.insert(s.flushed);
            s.pinned = None;
        }
    }

    /// What a read of block `b` issued now may return, as far as is known
    /// now (writes issued later are added when it completes).
    pub fn ticket(&self, b: u64) -> Ticket {
        let s = &self.blocks[b as usize];
        let mut allowed = s.maybe.clone();
        allowed.insert(s.acked);
        if let Some(p) = s.pinned {
            allowed = [p].into();
        }
        Ticket {
            allowed,
            issued: s.history.len(),
            overlapped: s.in_flight > 0,
        }
    }

    /// A read by a writer another one took over (it has not learnt it yet)
    /// returned `data` for block `b`; `ticket` was taken when it was taken
    /// over. It may return what it could read then, or anything written
    /// since — never anything older (such as a freed copy's zeros), never
    /// garbage. Nothing is pinned by it.
    pub fn check_lagging(&self, b: u64, data: &[u8], ticket: &Ticket) -> Result<(), Broken> {
        let s = &self.blocks[b as usize];
        let id = match decode(data, b) {
            Seen::Write(id) => id,
            Seen::Misplaced { id, block } => {
                return Err(Broken {
                    block: b,
                    what: format!("holds block {block}'s data (write {id})"),
                })
            }
            Seen::Garbage => {
                return Err(Broken {
                    block: b,
                    what: "holds garbage".into(),
                })
            }
        };
        let since = &s.history[ticket.issued..];
        if ticket.allowed.contains(&id) || since.contains(&id) || s.maybe.contains(&id) {
            return Ok(());
        }
        Err(Broken {
            block: b,
            what: format!(
                "reads write {id}; when its writer was taken over it could read {:?}, and since then {since:?} were written",
                ticket.allowed
            ),
        })
    }

    /// A read of block `b` issued with `ticket` returned `data`.
    pub fn read_done(&mut self, b: u64, data: &[u8], ticket: &Ticket) -> Result<(), Broken> {
        let s = &mut self.blocks[b as usize];
        let seen = decode(data, b);
        let id = match seen {
            Seen::Write(id) => id,
            Seen::Misplaced { id, block } => {
                return Err(Broken {
                    block: b,
                    what: format!("holds block {block}'s data (write {id})"),
                })
            }
            Seen::Garbage => {
                return Err(Broken {
                    block: b,
                    what: "holds garbage".into(),
                })
            }
        };
        // Anything possible when the read was issued, anything written
        // while it ran, and anything possible now.
        let since = &s.history[ticket.issued..];
        let allowed = ticket.allowed.contains(&id)
            || since.contains(&id)
            || id == s.acked
            || s.maybe.contains(&id);
        if !allowed {
            return Err(Broken {
                block: b,
                what: format!(
                    "reads write {id}; when the read was issued it could read {:?}, since then {since:?} were written, and now the newest acknowledged is {} and {:?} may have landed",
                    ticket.allowed, s.acked, s.maybe
                ),
            });
        }
        // Nothing written to the block from the read's issue to its end.
        let quiet = !ticket.overlapped && s.history.len() == ticket.issued && s.in_flight == 0;
        if let Some(p) = s.pinned {
            if quiet && p != id {
                return Err(Broken {
                    block: b,
                    what: format!(
                        "reads write {id}, but an earlier read returned write {p} and nothing was written since"
                    ),
                });
            }
        }
        if quiet {
            s.pinned = Some(id);
            // Once a read returned it, it is the content: what else was
            // possible no longer is (unless written again).
            s.acked = id;
            s.maybe.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_names_its_write_and_block() {
        assert_eq!(decode(&content(7, 3), 3), Seen::Write(7));
        assert_eq!(
            decode(&content(7, 3), 4),
            Seen::Misplaced { id: 7, block: 3 }
        );
        let mut bad = content(7, 3);
        bad[100] ^= 1;
        assert_eq!(decode(&bad, 3), Seen::Garbage);
        assert_eq!(decode(&vec![0; BLOCK], 9), Seen::Write(0));
    }

    #[test]
    fn an_old_acknowledged_write_is_caught() {
        let mut m = Model::new(2);
        let a = m.issue(0..1, false);
        m.acked(0..1, a);
        let b = m.issue(0..1, false);
        m.acked(0..1, b);
        let t = m.ticket(0);
        assert!(m.read_done(0, &content(a, 0), &t).is_err());
        assert!(m.read_done(0, &content(b, 0), &t).is_ok());
    }

    #[test]
    fn a_failed_write_may_show_but_then_stays() {
        let mut m = Model::new(1);
        let a = m.issue(0..1, false);
        m.failed(0..1, a);
        let t = m.ticket(0);
        assert!(m.read_done(0, &content(a, 0), &t).is_ok());
        let t = m.ticket(0);
        assert!(m.read_done(0, &content(0, 0), &t).is_err(), "flapping");
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_return_either() {
        let mut m = Model::new(1);
        let a = m.issue(0..1, false);
        m.acked(0..1, a);
        let t = m.ticket(0);
        let b = m.issue(0..1, false);
        m.acked(0..1, b);
        assert!(m.read_done(0, &content(a, 0), &t).is_ok());
        let t = m.ticket(0);
        assert!(
            m.read_done(0, &content(a, 0), &t).is_err(),
            "b was acknowledged before this read"
        );
    }
}
