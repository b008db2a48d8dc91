//! What each copy of one chunk did with one mutation, and whether the
//! mutation may be acknowledged.
//!
//! A write (or discard, or write-zeroes) of one piece goes to the copies of
//! its group that take writes; the tracker records every answer and then
//! decides against the policy: acknowledged once at least `min_copies`
//! *current* copies hold it (a resyncing copy that holds it counts once it
//! is current), and only after every copy without it — or whose hold on it
//! may not last (a copy that failed after taking it) — is recorded dirty for
//! that chunk.

use smallvec::SmallVec;
use uuid::Uuid;

use super::copies::CopyHealth;

/// Copies of one group, inline up to this many (no allocation per write).
pub(crate) const INLINE_COPIES: usize = 4;

/// Each copy of a group and its state: what [`WriteTracker::decide`] and
/// the lists of missed copies read.
pub(crate) type CopyStates = SmallVec<[(Uuid, CopyHealth); INLINE_COPIES]>;

/// How one copy answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// It holds the mutation (in its node's page cache at least).
    Held,
    /// It failed (no answer, an I/O error): it may or may not hold it.
    Failed,
    /// It refused the mutation whole and wrote nothing (no space; a
    /// payload that failed its checksum on a stable buffer): it still
    /// holds what it held. It needs no repair unless another copy took it.
    Refused,
}

/// One piece's mutation across its copies.
#[derive(Debug, Default)]
pub(crate) struct WriteTracker {
    answers: SmallVec<[(Uuid, Answer); INLINE_COPIES]>,
}

/// What the tracker decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Enough current copies hold it.
    Acknowledge,
    /// Fewer than the minimum: `current` current copies hold it.
    Short { current: usize },
}

impl WriteTracker {
    pub(crate) fn new() -> Self {
        WriteTracker::default()
    }

    /// Records `disk`'s answer (a later answer replaces an earlier one: a
    /// copy that held a write and failed on its resend no longer holds it).
    pub(crate) fn record(&mut self, disk: Uuid, answer: Answer) {
        match self.answers.iter_mut().find(|(d, _)| *d == disk) {
            Some(slot) => slot.1 = answer,
            None => self.answers.push((disk, answer)),
        }
    }

    pub(crate) fn holds(&self, disk: Uuid) -> bool {
        self.answers
            .iter()
            .any(|(d, a)| *d == disk && *a == Answer::Held)
    }

    /// Disks that hold the mutation.
    pub(crate) fn holders(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.answers
            .iter()
            .filter(|(_, a)| *a == Answer::Held)
            .map(|(d, _)| *d)
    }

    /// Current copies (by their state now) that hold the mutation.
    pub(crate) fn current_holders(&self, copies: &[(Uuid, CopyHealth)]) -> usize {
        copies
            .iter()
            .filter(|(d, h)| *h == CopyHealth::Current && self.holds(*d))
            .count()
    }

    /// Whether the mutation may be acknowledged, given each copy's state now.
    pub(crate) fn decide(&self, copies: &[(Uuid, CopyHealth)], min_copies: usize) -> Decision {
        let current = self.current_holders(copies);
        if current >= min_copies {
            Decision::Acknowledge
        } else {
            Decision::Short { current }
        }
    }

    /// Copies that failed with it in flight: they may or may not hold it
    /// (a request that timed out may still run).
    pub(crate) fn failed(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.answers
            .iter()
            .filter(|(_, a)| *a == Answer::Failed)
            .map(|(d, _)| *d)
    }

    /// Copies that refused the mutation whole.
    pub(crate) fn refusers(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.answers
            .iter()
            .filter(|(_, a)| *a == Answer::Refused)
            .map(|(d, _)| *d)
    }

    /// Copies that must be recorded dirty for the chunk before the mutation
    /// is acknowledged: every copy that is not current, unless it is a
    /// resyncing copy that holds it (resync keeps what it holds, and an
    /// interrupted resync dirties everything unflushed). A failing copy
    /// that held it is listed too: it may lose it (power loss) before
    /// anyone flushes it.
    pub(crate) fn missed_on_ack(&self, copies: &[(Uuid, CopyHealth)]) -> Vec<Uuid> {
        copies
            .iter()
            .filter(|(d, h)| match h {
                CopyHealth::Current => false,
                CopyHealth::Syncing => !self.holds(*d),
                CopyHealth::Failing | CopyHealth::Stale => true,
            })
            .map(|(d, _)| *d)
            .collect()
    }

    /// After a mutation that fails (below the minimum): copies that hold it
    /// and those that do not must never pass for equal. If a current copy
    /// holds it, the others are dirty; if none does, the holders are.
    pub(crate) fn missed_on_failure(&self, copies: &[(Uuid, CopyHealth)]) -> Vec<Uuid> {
        let current = self.current_holders(copies) > 0;
        if self.holders().next().is_none() {
            return Vec::new();
        }
        copies
            .iter()
            .filter(|(d, h)| {
                let held = self.holds(*d);
                if current {
                    !held || *h != CopyHealth::Current
                } else {
                    held
                }
            })
            .map(|(d, _)| *d)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn acknowledges_at_the_minimum_of_current_holders() {
        let copies = [
            (id(1), CopyHealth::Current),
            (id(2), CopyHealth::Current),
            (id(3), CopyHealth::Syncing),
        ];
        let mut t = WriteTracker::new();
        t.record(id(1), Answer::Held);
        t.record(id(3), Answer::Held);
        assert_eq!(t.decide(&copies, 2), Decision::Short { current: 1 });
        t.record(id(2), Answer::Held);
        assert_eq!(t.decide(&copies, 2), Decision::Acknowledge);
        assert!(t.missed_on_ack(&copies).is_empty());
    }

    #[test]
    fn a_copy_that_held_and_then_failed_is_dirty() {
        let copies = [(id(1), CopyHealth::Current), (id(2), CopyHealth::Failing)];
        let mut t = WriteTracker::new();
        t.record(id(1), Answer::Held);
        t.record(id(2), Answer::Held);
        assert_eq!(t.decide(&copies, 1), Decision::Acknowledge);
        assert_eq!(t.missed_on_ack(&copies), vec![id(2)]);
    }

    #[test]
    fn a_later_answer_replaces_an_earlier_one() {
        let mut t = WriteTracker::new();
        t.record(id(1), Answer::Held);
        t.record(id(1), Answer::Failed);
        assert!(!t.holds(id(1)));
    }

    #[test]
    fn a_failed_write_never_leaves_holders_and_others_equal() {
        let copies = [
            (id(1), CopyHealth::Current),
            (id(2), CopyHealth::Failing),
            (id(3), CopyHealth::Syncing),
        ];
        let mut t = WriteTracker::new();
        t.record(id(1), Answer::Held);
        t.record(id(3), Answer::Held);
        // A current copy has it: everyone else is dirty, the resyncing
        // holder too (it does not count, and might be cut off).
        assert_eq!(t.missed_on_failure(&copies), vec![id(2), id(3)]);
        let mut t = WriteTracker::new();
        t.record(id(3), Answer::Held);
        // Only a resyncing copy has it: it copies the chunk again.
        assert_eq!(t.missed_on_failure(&copies), vec![id(3)]);
        assert!(WriteTracker::new().missed_on_failure(&copies).is_empty());
    }
}
