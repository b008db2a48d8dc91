//! The zone as the simulation's volumes see it: the real zone service, in
//! this process, behind faults — unreachable for a while (a restart),
//! compare-and-swap contention, and answers lost after the change was made.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tessera_replicator::{ZoneCallError, ZoneFailure, ZoneLink};
use tessera_zone::records::{Disk, NodeStatus, Vdisk};
use tessera_zone::service::{
    MarkActive, MarkClean, MarkStale, OpenVdisk, Opened, Renewed, SessionRef, VdiskView,
    ZoneService,
};

use crate::rng::Rng;

/// Faults of the zone.
#[derive(Debug, Default)]
struct Faults {
    /// Every fault ends by itself at this time.
    until: Option<tokio::time::Instant>,
    down: bool,
    /// Calls refused with contention (nothing changed), per mille.
    contention: u64,
    /// Calls whose answer is lost after the change was made, per mille.
    lost_answer: u64,
    rng: Option<Rng>,
}

/// The zone service with injected faults.
pub struct SimZone {
    pub service: ZoneService,
    faults: Mutex<Faults>,
    rules: Mutex<Rules>,
    released: tokio::sync::Notify,
}

/// A zone call as a [`ZoneRule`] sees it.
#[derive(Debug, Clone, Copy)]
pub enum ZoneCall<'a> {
    Open(&'a OpenVdisk),
    Renew(&'a SessionRef),
    MarkStale(&'a MarkStale),
    MarkClean(&'a MarkClean),
    MarkActive(&'a MarkActive),
    Close(&'a SessionRef),
    /// A call that reads (vDisk, vDisks, disks, nodes).
    Read,
}

/// What a [`ZoneRule`] does to the calls it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneAction {
    /// Refused before anything changed.
    Refuse(ZoneFailure),
    /// Made, and then its answer is lost (`Unreachable`).
    LoseAnswer,
    /// Waits until the rule is released, then goes through.
    Hold,
}

/// Which calls a rule matches.
pub type ZoneMatch = Box<dyn Fn(&ZoneCall<'_>) -> bool + Send + Sync>;

/// A deterministic fault of the zone, set by a test.
pub struct ZoneRule {
    pub matches: ZoneMatch,
    pub action: ZoneAction,
    /// How many calls it applies to (`None`: until released).
    pub times: Option<u32>,
}

#[derive(Default)]
struct Rules {
    rules: Vec<(u64, ZoneRule)>,
    next: u64,
    /// Calls waiting on a hold rule, by rule.
    held: std::collections::BTreeMap<u64, usize>,
    /// Calls a refusing or answer-losing rule applied to, by rule.
    applied: std::collections::BTreeMap<u64, u32>,
}

impl SimZone {
    pub fn new(service: ZoneService, seed: u64) -> Arc<SimZone> {
        Arc::new(SimZone {
            service,
            faults: Mutex::new(Faults {
                rng: Some(Rng::new(seed)),
                ..Faults::default()
            }),
            rules: Mutex::new(Rules::default()),
            released: tokio::sync::Notify::new(),
        })
    }

    /// Adds a deterministic fault; returns its id (for [`SimZone::release`]).
    pub fn add_rule(&self, rule: ZoneRule) -> u64 {
        let mut r = self.rules.lock().expect("zone rules poisoned");
        r.next += 1;
        let id = r.next;
        r.rules.push((id, rule));
        id
    }

    /// Ends rule `id`: calls it held go through now.
    pub fn release(&self, id: u64) {
        self.rules
            .lock()
            .expect("zone rules poisoned")
            .rules
            .retain(|(r, _)| *r != id);
        self.released.notify_waiters();
    }

    /// Calls waiting on hold rule `id` now.
    pub fn held(&self, id: u64) -> usize {
        let r = self.rules.lock().expect("zone rules poisoned");
        r.held.get(&id).copied().unwrap_or(0)
    }

    /// Calls rule `id` refused or lost the answer of so far.
    pub fn applied(&self, id: u64) -> u32 {
        let r = self.rules.lock().expect("zone rules poisoned");
        r.applied.get(&id).copied().unwrap_or(0)
    }

    /// Applies the rules to a call before it is made: `Ok(lose)` says
    /// whether its answer is to be lost.
    async fn ruled(&self, call: ZoneCall<'_>) -> Result<bool, ZoneCallError> {
        let mut waiting: Option<u64> = None;
        loop {
            let released = self.released.notified();
            {
                let mut r = self.rules.lock().expect("zone rules poisoned");
                let hit = r
                    .rules
                    .iter_mut()
                    .find(|(_, rule)| rule.times != Some(0) && (rule.matches)(&call));
                let Some((id, rule)) = hit else {
                    if let Some(w) = waiting {
                        *r.held.entry(w).or_default() -= 1;
                    }
                    return Ok(false);
                };
                let (id, action) = (*id, rule.action);
                if action == ZoneAction::Hold {
                    if waiting.is_none() {
                        waiting = Some(id);
                        *r.held.entry(id).or_default() += 1;
                    }
                } else {
                    if let Some(t) = rule.times.as_mut() {
                        *t -= 1;
                    }
                    *r.applied.entry(id).or_default() += 1;
                    if let Some(w) = waiting {
                        *r.held.entry(w).or_default() -= 1;
                    }
                    return match action {
                        ZoneAction::Refuse(kind) => {
                            Err(ZoneCallError::new(kind, "a refusal injected by the test"))
                        }
                        _ => Ok(true),
                    };
                }
            }
            released.await;
        }
    }

    /// The answer of a call the rules said to lose.
    fn lost<T>(lose: bool, r: Result<T, ZoneCallError>) -> Result<T, ZoneCallError> {
        match r {
            Ok(_) if lose => Err(ZoneCallError::new(
                ZoneFailure::Unreachable,
                "the answer was lost (injected by the test)",
            )),
            r => r,
        }
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().expect("zone faults poisoned")
    }

    /// Starts a fault that lasts `lasts`: the zone down, or a share (per
    /// mille) of calls refused with contention or answered and then lost.
    pub fn fault(
        &self,
        down: bool,
        contention: u64,
        lost_answers: u64,
        lasts: std::time::Duration,
    ) {
        let mut f = self.faults();
        f.down = down;
        f.contention = contention;
        f.lost_answer = lost_answers;
        f.until = Some(tokio::time::Instant::now() + lasts);
    }

    /// Ends every fault now.
    pub fn heal(&self) {
        let mut f = self.faults();
        f.down = false;
        f.contention = 0;
        f.lost_answer = 0;
        f.until = None;
    }

    /// Whether the zone is down now (its API server, and the move planner
    /// it runs, with it).
    pub fn is_down(&self) -> bool {
        let mut f = self.faults();
        Self::expire(&mut f);
        f.down
    }

    /// Whether a fault is in force.
    pub fn is_faulty(&self) -> bool {
        let mut f = self.faults();
        Self::expire(&mut f);
        f.until.is_some()
    }

    fn expire(f: &mut Faults) {
        if f.until.is_some_and(|u| u <= tokio::time::Instant::now()) {
            f.down = false;
            f.contention = 0;
            f.lost_answer = 0;
            f.until = None;
        }
    }

    /// Before a call: refused whole?
    fn before(&self) -> Result<(), ZoneCallError> {
        let mut f = self.faults();
        Self::expire(&mut f);
        if f.down {
            return Err(ZoneCallError::new(
                ZoneFailure::Unreachable,
                "the simulated zone is down",
            ));
        }
        let p = f.contention;
        if p > 0 && f.rng.as_mut().is_some_and(|r| r.chance(p)) {
            return Err(ZoneCallError::new(
                ZoneFailure::Contention,
                "simulated contention; try again",
            ));
        }
        Ok(())
    }

    /// After a call that changed something: is the answer lost?
    fn after<T>(&self, r: Result<T, ZoneCallError>) -> Result<T, ZoneCallError> {
        let mut f = self.faults();
        Self::expire(&mut f);
        let p = f.lost_answer;
        if r.is_ok() && p > 0 && f.rng.as_mut().is_some_and(|r| r.chance(p)) {
            return Err(ZoneCallError::new(
                ZoneFailure::Unreachable,
                "the simulated zone's answer was lost",
            ));
        }
        r
    }
}

#[async_trait]
impl ZoneLink for SimZone {
    async fn open(&self, ds: &str, name: &str, req: &OpenVdisk) -> Result<Opened, ZoneCallError> {
        let lose = self.ruled(ZoneCall::Open(req)).await?;
        self.before()?;
        let r = ZoneLink::open(&self.service, ds, name, req).await;
        Self::lost(lose, self.after(r))
    }
    async fn renew(
        &self,
        ds: &str,
        name: &str,
        req: &SessionRef,
    ) -> Result<Renewed, ZoneCallError> {
        let lose = self.ruled(ZoneCall::Renew(req)).await?;
        self.before()?;
        let r = ZoneLink::renew(&self.service, ds, name, req).await;
        Self::lost(lose, self.after(r))
    }
    async fn mark_stale(
        &self,
        ds: &str,
        name: &str,
        req: &MarkStale,
    ) -> Result<Vdisk, ZoneCallError> {
        let lose = self.ruled(ZoneCall::MarkStale(req)).await?;
        self.before()?;
        let r = ZoneLink::mark_stale(&self.service, ds, name, req).await;
        Self::lost(lose, self.after(r))
    }
    async fn mark_clean(
        &self,
        ds: &str,
        name: &str,
        req: &MarkClean,
    ) -> Result<Vdisk, ZoneCallError> {
        let lose = self.ruled(ZoneCall::MarkClean(req)).await?;
        self.before()?;
        let r = ZoneLink::mark_clean(&self.service, ds, name, req).await;
        Self::lost(lose, self.after(r))
    }
    async fn mark_active(
        &self,
        ds: &str,
        name: &str,
        req: &MarkActive,
    ) -> Result<Vdisk, ZoneCallError> {
        let lose = self.ruled(ZoneCall::MarkActive(req)).await?;
        self.before()?;
        let r = ZoneLink::mark_active(&self.service, ds, name, req).await;
        Self::lost(lose, self.after(r))
    }
    async fn close(&self, ds: &str, name: &str, req: &SessionRef) -> Result<(), ZoneCallError> {
        let lose = self.ruled(ZoneCall::Close(req)).await?;
        self.before()?;
        let r = ZoneLink::close(&self.service, ds, name, req).await;
        Self::lost(lose, self.after(r))
    }
    async fn vdisk(&self, ds: &str, name: &str) -> Result<VdiskView, ZoneCallError> {
        let lose = self.ruled(ZoneCall::Read).await?;
        self.before()?;
        Self::lost(lose, ZoneLink::vdisk(&self.service, ds, name).await)
    }
    async fn vdisks(&self) -> Result<Vec<VdiskView>, ZoneCallError> {
        let lose = self.ruled(ZoneCall::Read).await?;
        self.before()?;
        Self::lost(lose, ZoneLink::vdisks(&self.service).await)
    }
    async fn disks(&self) -> Result<Vec<Disk>, ZoneCallError> {
        let lose = self.ruled(ZoneCall::Read).await?;
        self.before()?;
        Self::lost(lose, ZoneLink::disks(&self.service).await)
    }
    async fn nodes(&self) -> Result<Vec<NodeStatus>, ZoneCallError> {
        let lose = self.ruled(ZoneCall::Read).await?;
        self.before()?;
        Self::lost(lose, ZoneLink::nodes(&self.service).await)
    }
}
