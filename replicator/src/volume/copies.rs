//! A copy slot's state, changed only through named transitions.
//!
//! ```text
//!            fail                  recorded_stale
//!  Current ───────────► Failing ───────────────► Stale
//!     ▲                    ▲                        │ begin_sync (after fencing)
//!     │ mark_current       │ fail                   ▼
//!     └──────────────── Syncing ◄───────────────────┘
//! ```
//!
//! - **Current**: holds every acknowledged write; serves reads; counts
//!   toward the policy's minimum.
//! - **Failing**: missed a write, a flush, a fence or failed a checksum; the
//!   zone does not know yet. Nothing that skipped it is acknowledged until
//!   the zone records it stale.
//! - **Stale**: recorded stale in the zone with the chunks it misses: no
//!   reads, no writes.
//! - **Syncing**: fenced and being resynced: no reads; writes to chunks it
//!   no longer misses go to it too, and flushes; it never counts toward the
//!   minimum.
//!
//! Reads of the state are lock-free (an atomic per slot, read on every I/O);
//! every change is a compare-and-swap from the states a transition allows,
//! so a concurrent failure is never overwritten by a later success.

use std::sync::atomic::{AtomicU64, Ordering};

/// Whether a copy slot serves the vDisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyHealth {
    Current,
    Failing,
    Stale,
    Syncing,
}

impl CopyHealth {
    fn code(self) -> u8 {
        match self {
            CopyHealth::Current => 0,
            CopyHealth::Failing => 1,
            CopyHealth::Stale => 2,
            CopyHealth::Syncing => 3,
        }
    }

    fn from_code(c: u8) -> CopyHealth {
        match c {
            0 => CopyHealth::Current,
            1 => CopyHealth::Failing,
            2 => CopyHealth::Stale,
            _ => CopyHealth::Syncing,
        }
    }

    /// Holds acknowledged writes that a flush must make stable.
    pub(crate) fn takes_flushes(self) -> bool {
        matches!(self, CopyHealth::Current | CopyHealth::Syncing)
    }
}

/// One copy slot's state: its health in the low byte, and above it how
/// many times it failed (so that an answer can be matched with the copy as
/// it was when the request was sent).
pub(crate) struct CopyState(AtomicU64);

impl CopyState {
    pub(crate) fn new(initial: CopyHealth) -> Self {
        CopyState(AtomicU64::new(initial.code() as u64))
    }

    pub(crate) fn get(&self) -> CopyHealth {
        CopyHealth::from_code(self.0.load(Ordering::SeqCst) as u8)
    }

    /// How many times the copy failed. A copy that answered a request
    /// sent before its latest failure may have lost what it answered for
    /// (its machine restarted), even if it is resyncing by now.
    pub(crate) fn failures(&self) -> u64 {
        self.0.load(Ordering::SeqCst) >> 8
    }

    fn transition(&self, from: &[CopyHealth], to: CopyHealth) -> bool {
        let mut now = self.0.load(Ordering::SeqCst);
        loop {
            if !from.iter().any(|f| f.code() as u64 == now & 0xff) {
                return false;
            }
            let failures = (now >> 8) + u64::from(to == CopyHealth::Failing);
            let next = (failures << 8) | to.code() as u64;
            match self
                .0
                .compare_exchange(now, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(seen) => now = seen,
            }
        }
    }

    /// A current or resyncing copy missed something: it goes (back) to
    /// stale once the zone records it. Returns whether it changed.
    pub(crate) fn fail(&self) -> bool {
        self.transition(
            &[CopyHealth::Current, CopyHealth::Syncing],
            CopyHealth::Failing,
        )
    }

    /// Resync of this copy stopped before it finished: it may have lost
    /// what it took since its last flush. Only a resyncing copy changes.
    pub(crate) fn abort_sync(&self) -> bool {
        self.transition(&[CopyHealth::Syncing], CopyHealth::Failing)
    }

    /// The zone recorded the failing copy stale.
    pub(crate) fn recorded_stale(&self) -> bool {
        self.transition(&[CopyHealth::Failing], CopyHealth::Stale)
    }

    /// The stale copy was fenced with this writer's epoch: resync begins,
    /// and writes to chunks it does not miss go to it.
    pub(crate) fn begin_sync(&self) -> bool {
        self.transition(&[CopyHealth::Stale], CopyHealth::Syncing)
    }

    /// Resync made the copy whole and the zone recorded it current. A copy
    /// that failed meanwhile stays failing.
    pub(crate) fn mark_current(&self) -> bool {
        self.transition(&[CopyHealth::Syncing], CopyHealth::Current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_diagram() {
        let s = CopyState::new(CopyHealth::Current);
        assert!(!s.recorded_stale() && !s.begin_sync() && !s.mark_current());
        assert!(s.fail());
        assert_eq!(s.get(), CopyHealth::Failing);
        assert!(!s.fail(), "failing twice changes nothing");
        assert!(
            !s.begin_sync(),
            "a copy the zone does not know stale is not resynced"
        );
        assert!(s.recorded_stale());
        assert_eq!(s.get(), CopyHealth::Stale);
        assert!(!s.mark_current(), "only a resyncing copy becomes current");
        assert!(s.begin_sync());
        assert_eq!(s.get(), CopyHealth::Syncing);
        assert!(s.mark_current());
        assert_eq!(s.get(), CopyHealth::Current);
        assert_eq!(s.failures(), 1, "one failure on the way round");
    }

    #[test]
    fn every_failure_is_counted_once() {
        let s = CopyState::new(CopyHealth::Current);
        assert_eq!(s.failures(), 0);
        assert!(s.fail() && !s.fail());
        assert!(s.recorded_stale() && s.begin_sync());
        assert_eq!(s.failures(), 1, "recovering is no failure");
        assert!(s.abort_sync());
        assert_eq!((s.get(), s.failures()), (CopyHealth::Failing, 2));
    }

    #[test]
    fn a_failure_during_resync_is_not_overwritten() {
        let s = CopyState::new(CopyHealth::Stale);
        assert!(s.begin_sync());
        assert!(s.fail());
        assert!(!s.mark_current());
        assert_eq!(s.get(), CopyHealth::Failing);
    }
}
