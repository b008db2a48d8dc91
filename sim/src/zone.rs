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
}

impl SimZone {
    pub fn new(service: ZoneService, seed: u64) -> Arc<SimZone> {
        Arc::new(SimZone {
            service,
            faults: Mutex::new(Faults {
                rng: Some(Rng::new(seed)),
                ..Faults::default()
            }),
        })
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
        self.before()?;
        let r = ZoneLink::open(&self.service, ds, name, req).await;
        self.after(r)
    }
    async fn renew(
        &self,
        ds: &str,
        name: &str,
        req: &SessionRef,
    ) -> Result<Renewed, ZoneCallError> {
        self.before()?;
        let r = ZoneLink::renew(&self.service, ds, name, req).await;
        self.after(r)
    }
    async fn mark_stale(
        &self,
        ds: &str,
        name: &str,
        req: &MarkStale,
    ) -> Result<Vdisk, ZoneCallError> {
        self.before()?;
        let r = ZoneLink::mark_stale(&self.service, ds, name, req).await;
        self.after(r)
    }
    async fn mark_clean(
        &self,
        ds: &str,
        name: &str,
        req: &MarkClean,
    ) -> Result<Vdisk, ZoneCallError> {
        self.before()?;
        let r = ZoneLink::mark_clean(&self.service, ds, name, req).await;
        self.after(r)
    }
    async fn mark_active(
        &self,
        ds: &str,
        name: &str,
        req: &MarkActive,
    ) -> Result<Vdisk, ZoneCallError> {
        self.before()?;
        let r = ZoneLink::mark_active(&self.service, ds, name, req).await;
        self.after(r)
    }
    async fn close(&self, ds: &str, name: &str, req: &SessionRef) -> Result<(), ZoneCallError> {
        self.before()?;
        let r = ZoneLink::close(&self.service, ds, name, req).await;
        self.after(r)
    }
    async fn vdisk(&self, ds: &str, name: &str) -> Result<VdiskView, ZoneCallError> {
        self.before()?;
        ZoneLink::vdisk(&self.service, ds, name).await
    }
    async fn vdisks(&self) -> Result<Vec<VdiskView>, ZoneCallError> {
        self.before()?;
        ZoneLink::vdisks(&self.service).await
    }
    async fn disks(&self) -> Result<Vec<Disk>, ZoneCallError> {
        self.before()?;
        ZoneLink::disks(&self.service).await
    }
    async fn nodes(&self) -> Result<Vec<NodeStatus>, ZoneCallError> {
        self.before()?;
        ZoneLink::nodes(&self.service).await
    }
}
