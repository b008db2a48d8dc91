//! The seam between the volume client and the zone.
//!
//! The volume client asks the zone to open, renew and close its lease and
//! to record what its copies miss. [`ZoneLink`] is that conversation; the
//! REST client implements it for real zones, and the zone service itself
//! (in one process) for tests and the deterministic simulation.
//!
//! Every answer that changes what the writer does is a kind of its own
//! ([`ZoneFailure`]): only [`ZoneFailure::LeaseLost`] and
//! [`ZoneFailure::Gone`] mean another writer may own the vDisk (the writer
//! fences itself); contention and an unreachable zone are retried; a
//! refused `complete` ([`ZoneFailure::StillDirty`]) makes resync reload the
//! zone's dirty set.

use async_trait::async_trait;
use tessera_api_client::{ApiClient, ApiError};
use tessera_zone::records::{Disk, NodeStatus, Vdisk};
use tessera_zone::service::{
    MarkActive, MarkClean, MarkStale, OpenVdisk, Opened, Renewed, SessionRef, VdiskView,
};
use tessera_zone::ZoneError;

/// What kind of refusal or failure a zone call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneFailure {
    /// The session does not hold the vDisk's lease any more.
    LeaseLost,
    /// The vDisk (or what the call names) does not exist: deleted under us.
    Gone,
    /// `mark_clean … complete` refused: the copy still misses chunks.
    StillDirty,
    /// Concurrent updates kept the zone from applying the change; nothing
    /// changed, try again.
    Contention,
    /// No answer (connection refused, timeout, the store unavailable).
    Unreachable,
    /// Any other refusal (a bad request, an unsatisfiable change).
    Refused,
}

/// A failed zone call: its kind and the zone's one-line explanation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ZoneCallError {
    pub kind: ZoneFailure,
    pub message: String,
}

impl ZoneCallError {
    pub fn new(kind: ZoneFailure, message: impl Into<String>) -> Self {
        ZoneCallError {
            kind,
            message: message.into(),
        }
    }

    /// Whether another writer may own the vDisk now.
    pub fn means_fenced(&self) -> bool {
        matches!(self.kind, ZoneFailure::LeaseLost | ZoneFailure::Gone)
    }

    /// Whether trying the same call again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            ZoneFailure::Contention | ZoneFailure::Unreachable
        )
    }
}

/// The zone calls of one vDisk's writer.
#[async_trait]
pub trait ZoneLink: Send + Sync {
    async fn open(&self, ds: &str, name: &str, req: &OpenVdisk) -> Result<Opened, ZoneCallError>;
    async fn renew(&self, ds: &str, name: &str, req: &SessionRef)
        -> Result<Renewed, ZoneCallError>;
    async fn mark_stale(
        &self,
        ds: &str,
        name: &str,
        req: &MarkStale,
    ) -> Result<Vdisk, ZoneCallError>;
    async fn mark_clean(
        &self,
        ds: &str,
        name: &str,
        req: &MarkClean,
    ) -> Result<Vdisk, ZoneCallError>;
    async fn mark_active(
        &self,
        ds: &str,
        name: &str,
        req: &MarkActive,
    ) -> Result<Vdisk, ZoneCallError>;
    async fn close(&self, ds: &str, name: &str, req: &SessionRef) -> Result<(), ZoneCallError>;
    async fn vdisk(&self, ds: &str, name: &str) -> Result<VdiskView, ZoneCallError>;
    async fn vdisks(&self) -> Result<Vec<VdiskView>, ZoneCallError>;
    async fn disks(&self) -> Result<Vec<Disk>, ZoneCallError>;
    async fn nodes(&self) -> Result<Vec<NodeStatus>, ZoneCallError>;
}

impl From<ApiError> for ZoneCallError {
    fn from(e: ApiError) -> Self {
        let kind = if e.is_lease_lost() {
            ZoneFailure::LeaseLost
        } else if e.is_not_found() {
            ZoneFailure::Gone
        } else if e.is_still_dirty() {
            ZoneFailure::StillDirty
        } else if e.is_contention() {
            ZoneFailure::Contention
        } else {
            match &e {
                ApiError::Connect { .. }
                | ApiError::Transport { .. }
                | ApiError::Timeout { .. } => ZoneFailure::Unreachable,
                ApiError::Status { status, .. } if *status >= 500 => ZoneFailure::Unreachable,
                _ => ZoneFailure::Refused,
            }
        };
        ZoneCallError::new(kind, error_chain(&e))
    }
}

impl From<ZoneError> for ZoneCallError {
    fn from(e: ZoneError) -> Self {
        let kind = match &e {
            ZoneError::LeaseLost(_) => ZoneFailure::LeaseLost,
            ZoneError::NotFound(_) => ZoneFailure::Gone,
            ZoneError::StillDirty { .. } => ZoneFailure::StillDirty,
            ZoneError::Contention(_) => ZoneFailure::Contention,
            ZoneError::Store(_) => ZoneFailure::Unreachable,
            _ => ZoneFailure::Refused,
        };
        ZoneCallError::new(kind, error_chain(&e))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[async_trait]
impl ZoneLink for ApiClient {
    async fn open(&self, ds: &str, name: &str, req: &OpenVdisk) -> Result<Opened, ZoneCallError> {
        Ok(self.open_vdisk(ds, name, req).await?)
    }
    async fn renew(
        &self,
        ds: &str,
        name: &str,
        req: &SessionRef,
    ) -> Result<Renewed, ZoneCallError> {
        Ok(self.renew_vdisk(ds, name, req).await?)
    }
    async fn mark_stale(
        &self,
        ds: &str,
        name: &str,
        req: &MarkStale,
    ) -> Result<Vdisk, ZoneCallError> {
        Ok(ApiClient::mark_stale(self, ds, name, req).await?)
    }
    async fn mark_clean(
        &self,
        ds: &str,
        name: &str,
        req: &MarkClean,
    ) -> Result<Vdisk, ZoneCallError> {
        Ok(ApiClient::mark_clean(self, ds, name, req).await?)
    }
    async fn mark_active(
        &self,
        ds: &str,
        name: &str,
        req: &MarkActive,
    ) -> Result<Vdisk, ZoneCallError> {
        Ok(ApiClient::mark_active(self, ds, name, req).await?)
    }
    async fn close(&self, ds: &str, name: &str, req: &SessionRef) -> Result<(), ZoneCallError> {
        Ok(self.close_vdisk(ds, name, req).await?)
    }
    async fn vdisk(&self, ds: &str, name: &str) -> Result<VdiskView, ZoneCallError> {
        Ok(ApiClient::vdisk(self, ds, name).await?)
    }
    async fn vdisks(&self) -> Result<Vec<VdiskView>, ZoneCallError> {
        Ok(ApiClient::vdisks(self, None).await?)
    }
    async fn disks(&self) -> Result<Vec<Disk>, ZoneCallError> {
        Ok(ApiClient::disks(self).await?)
    }
    async fn nodes(&self) -> Result<Vec<NodeStatus>, ZoneCallError> {
        Ok(ApiClient::nodes(self).await?)
    }
}

/// The zone service in this process (tests, the simulation).
#[async_trait]
impl ZoneLink for tessera_zone::service::ZoneService {
    async fn open(&self, ds: &str, name: &str, req: &OpenVdisk) -> Result<Opened, ZoneCallError> {
        Ok(self.open_vdisk(ds, name, req.clone()).await?)
    }
    async fn renew(
        &self,
        ds: &str,
        name: &str,
        req: &SessionRef,
    ) -> Result<Renewed, ZoneCallError> {
        Ok(self.renew_vdisk(ds, name, req.clone()).await?)
    }
    async fn mark_stale(
        &self,
        ds: &str,
        name: &str,
        req: &MarkStale,
    ) -> Result<Vdisk, ZoneCallError> {
        Ok(tessera_zone::service::ZoneService::mark_stale(self, ds, name, req.clone()).await?)
    }
    async fn mark_clean(
        &self,
        ds: &str,
        name: &str,
        req: &MarkClean,
    ) -> Result<Vdisk, ZoneCallError> {
        Ok(tessera_zone::service::ZoneService::mark_clean(self, ds, name, req.clone()).await?)
    }
    async fn mark_active(
        &self,
        ds: &str,
        name: &str,
        req: &MarkActive,
    ) -> Result<Vdisk, ZoneCallError> {
        Ok(tessera_zone::service::ZoneService::mark_active(self, ds, name, req.clone()).await?)
    }
    async fn close(&self, ds: &str, name: &str, req: &SessionRef) -> Result<(), ZoneCallError> {
        Ok(self.close_vdisk(ds, name, req.clone()).await?)
    }
    async fn vdisk(&self, ds: &str, name: &str) -> Result<VdiskView, ZoneCallError> {
        Ok(tessera_zone::service::ZoneService::vdisk(self, ds, name).await?)
    }
    async fn vdisks(&self) -> Result<Vec<VdiskView>, ZoneCallError> {
        Ok(tessera_zone::service::ZoneService::vdisks(self, None).await?)
    }
    async fn disks(&self) -> Result<Vec<Disk>, ZoneCallError> {
        Ok(tessera_zone::service::ZoneService::disks(self).await?)
    }
    async fn nodes(&self) -> Result<Vec<NodeStatus>, ZoneCallError> {
        Ok(tessera_zone::service::ZoneService::nodes(self).await?)
    }
}
