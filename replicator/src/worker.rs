//! The zone's repair worker: resyncs (and rebuilds, and rebalances) vDisks
//! nobody has open.
//!
//! A vDisk that is open is repaired by its writer, the only one that can
//! order a chunk's copy with its own writes. A vDisk that is offline has no
//! writer, so the worker opens it, with a lease that yields to any other
//! open (a VM starting takes it over at once and continues the repair from
//! the zone's dirty sets), lets the volume's resync run until every copy it
//! can reach is current, and closes it.

use std::time::{Duration, Instant};

use std::sync::Arc;

use tessera_zone::records::VdiskState;
use tessera_zone::service::VdiskView;

use crate::{Volume, VolumeConfig, VolumeError};

/// How the worker runs.
#[derive(Clone)]
pub struct WorkerConfig {
    pub zone: Arc<dyn crate::ZoneLink>,
    /// The host the worker opens vDisks from.
    pub host: String,
    /// Bandwidth each repair may use, bytes per second.
    pub bandwidth: u64,
    /// How often the zone is checked for offline vDisks needing repair.
    pub period: Duration,
}

/// Runs until `stop` fires.
pub async fn run(config: WorkerConfig, mut stop: tokio::sync::oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(config.period) => {}
        }
        let views = match config.zone.vdisks().await {
            Ok(v) => v,
            Err(error) => {
                tracing::warn!(%error, "repair worker cannot list vDisks");
                continue;
            }
        };
        let now = now_ms();
        for view in views.iter().filter(|v| needs_offline_repair(v, now)) {
            let name = format!("{}/{}", view.vdisk.datastore, view.vdisk.name);
            let done = tokio::select! {
                _ = &mut stop => return,
                r = repair_one(&config, view) => r,
            };
            match done {
                Ok(copied) => {
                    tracing::info!(vdisk = %name, chunks = copied, "offline repair pass done")
                }
                Err(VolumeError::Fenced { .. }) => {
                    tracing::info!(vdisk = %name, "offline repair yielded to a new writer")
                }
                Err(error) => {
                    tracing::warn!(vdisk = %name, %error, "offline repair failed; will retry")
                }
            }
        }
    }
}

/// Nobody writes it — no lease, or a lease that expired at `now_ms` (its
/// writer died) — and repair can make progress: a stale copy's node is up,
/// or a dead writer left an activity log to reconcile.
pub fn needs_offline_repair(view: &VdiskView, now_ms: u64) -> bool {
    let unwritten = match &view.vdisk.lease {
        None => matches!(view.vdisk.state, VdiskState::Offline),
        Some(lease) => lease.expires_ms <= now_ms,
    };
    unwritten && (view.repair.iter().any(|r| r.node_up) || !view.vdisk.activity.is_empty())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Opens the vDisk as the repair worker and waits until resync has done
/// what it can; returns the chunks copied.
async fn repair_one(config: &WorkerConfig, view: &VdiskView) -> Result<u64, VolumeError> {
    let mut vc = VolumeConfig::with_zone(
        config.zone.clone(),
        &view.vdisk.datastore,
        &view.vdisk.name,
        &config.host,
    );
    vc.repair_worker = true;
    vc.repair_bandwidth = config.bandwidth;
    let volume = Volume::open(vc).await?;
    let mut last_check = Instant::now();
    let result = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if volume.is_fenced() {
            break Err(VolumeError::Fenced {
                epoch: volume.epoch(),
                by: 0,
            });
        }
        if volume.all_current() {
            break Ok(());
        }
        // Stop when what is left waits for nodes that are down.
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            match config
                .zone
                .vdisk(&view.vdisk.datastore, &view.vdisk.name)
                .await
            {
                Ok(v) if !v.repair.iter().any(|r| r.node_up) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            }
        }
    };
    let copied = volume.resynced_chunks();
    let closed = volume.close().await;
    result?;
    closed?;
    Ok(copied)
}
