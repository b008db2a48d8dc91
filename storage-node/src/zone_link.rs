//! The node's link to its zone: registration, heartbeats, and freeing the
//! space of vDisks the zone no longer has.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_api_client::{ApiClient, ApiError};
use tessera_zone::service::{CopyUsage, GroupsToFree, Heartbeat, RegisterDisk, RegisterNode};
use uuid::Uuid;

use crate::config::NodeIdentity;
use crate::disks::DiskSet;

/// Background task keeping the node registered and alive in the zone.
pub struct ZoneLink {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

struct Link {
    api: ApiClient,
    identity: NodeIdentity,
    dir: PathBuf,
    advertise: Advertise,
    disks: Arc<DiskSet>,
    interval: Duration,
    /// Groups freed since the last heartbeat that said so.
    freed_groups: Vec<GroupsToFree>,
}

/// Where clients find the node, as registered in the zone.
#[derive(Debug, Clone)]
pub struct Advertise {
    /// The host it runs on.
    pub host: String,
    /// Storage protocol address, `ip:port`.
    pub addr: String,
    /// Local-session socket, for clients on the same host.
    pub socket: Option<String>,
}

impl ZoneLink {
    pub fn start(
        api: ApiClient,
        identity: NodeIdentity,
        dir: PathBuf,
        advertise: Advertise,
        disks: Arc<DiskSet>,
        interval: Duration,
    ) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let mut link = Link {
            api,
            identity,
            dir,
            advertise,
            disks,
            interval,
            freed_groups: Vec::new(),
        };
        let task = tokio::spawn(async move {
            let mut lease: Option<u64> = None;
            let mut period = link.interval;
            loop {
                let next = match lease {
                    None => match link.register().await {
                        Ok((l, hb)) => {
                            lease = Some(l);
                            period = link.interval.min(hb);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    Some(l) => match link.heartbeat(l).await {
                        Err(LinkError::Api(e)) if matches!(e.status(), Some(404 | 409 | 410)) => {
                            tracing::warn!(error = %e, "zone lost this node's lease; registering again");
                            lease = None;
                            Ok(())
                        }
                        other => other,
                    },
                };
                if let Err(e) = next {
                    tracing::warn!(error = %e, "zone link");
                }
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(period) => {}
                }
            }
        });
        ZoneLink { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(
        "this node belongs to zone {ours}, but the API serves zone {theirs}; refusing to join"
    )]
    WrongZone { ours: Uuid, theirs: Uuid },
    #[error(transparent)]
    Node(#[from] crate::NodeError),
}

impl Link {
    fn disk_usage(&self) -> Vec<RegisterDisk> {
        self.disks
            .iter()
            .map(|d| {
                let info = d.info();
                RegisterDisk {
                    uuid: d.uuid(),
                    path: d.path().display().to_string(),
                    capacity: info.capacity,
                    used: info.used,
                }
            })
            .collect()
    }

    /// The space each vDisk takes on each disk.
    fn copy_usage(&self) -> Vec<CopyUsage> {
        self.disks
            .iter()
            .flat_map(|d| {
                let disk = d.uuid();
                d.usage()
                    .into_iter()
                    .map(move |(vdisk, bytes)| CopyUsage { disk, vdisk, bytes })
            })
            .collect()
    }

    async fn register(&mut self) -> Result<(u64, Duration), LinkError> {
        let reg = self
            .api
            .register_node(&RegisterNode {
                uuid: self.identity.uuid,
                host: self.advertise.host.clone(),
                addr: self.advertise.addr.clone(),
                socket: self.advertise.socket.clone(),
                disks: self.disk_usage(),
                protocol: Some(tessera_proto::PROTOCOL_MAX),
            })
            .await?;
        match self.identity.zone {
            Some(ours) if ours != reg.zone => {
                return Err(LinkError::WrongZone {
                    ours,
                    theirs: reg.zone,
                })
            }
            Some(_) => {}
            None => {
                self.identity.zone = Some(reg.zone);
                self.identity.save(&self.dir)?;
            }
        }
        tracing::info!(zone = %reg.zone, lease = reg.lease, "registered with the zone");
        Ok((reg.lease, Duration::from_millis(reg.heartbeat_ms.max(100))))
    }

    async fn heartbeat(&mut self, lease: u64) -> Result<(), LinkError> {
        let mut vdisks: Vec<Uuid> = self
            .disks
            .iter()
            .flat_map(|d| d.vdisks().into_iter().map(|(v, _, _)| v))
            .collect();
        vdisks.sort();
        vdisks.dedup();
        let mut copies: Vec<[Uuid; 2]> = self
            .disks
            .iter()
            .flat_map(|d| {
                let disk = d.uuid();
                d.vdisks().into_iter().map(move |(v, _, _)| [disk, v])
            })
            .collect();
        copies.sort();
        copies.dedup();
        let reply = self
            .api
            .heartbeat(
                self.identity.uuid,
                &Heartbeat {
                    lease,
                    disks: self.disk_usage(),
                    vdisks,
                    copies,
                    usage: Some(self.copy_usage()),
                    freed_groups: self.freed_groups.clone(),
                },
            )
            .await?;
        // The zone has them (it forgets what it asked us to free).
        self.freed_groups.clear();
        for orphan in reply.orphans {
            let disks = self.disks.clone();
            let freed = tokio::task::spawn_blocking(move || {
                disks
                    .iter()
                    .map(|d| d.delete_vdisk(orphan).unwrap_or(0))
                    .sum::<u64>()
            })
            .await
            .unwrap_or(0);
            tracing::info!(vdisk = %orphan, extents = freed, "freed the space of a deleted vDisk");
        }
        for [disk, vdisk] in reply.free {
            let Some(d) = self.disks.iter().find(|d| d.uuid() == disk).cloned() else {
                continue;
            };
            let freed = tokio::task::spawn_blocking(move || d.free_moved_copy(vdisk).unwrap_or(0))
                .await
                .unwrap_or(0);
            tracing::info!(%vdisk, %disk, extents = freed, "freed a copy that moved to another disk");
        }
        for f in reply.free_groups {
            let Some(d) = self.disks.iter().find(|d| d.uuid() == f.disk).cloned() else {
                continue;
            };
            let (stripes, groups, vdisk) = (f.stripes, f.groups.clone(), f.vdisk);
            // Durable before the zone forgets it asked (else a power loss
            // could bring the chunks back with nobody left to free them).
            let freed = tokio::task::spawn_blocking(move || {
                let chunks = d.free_moved_groups(vdisk, stripes, &groups)?;
                d.flush()?;
                Ok::<_, tessera_chunkstore::Error>(chunks)
            })
            .await;
            match freed {
                Ok(Ok(chunks)) => {
                    tracing::info!(vdisk = %f.vdisk, disk = %f.disk, groups = ?f.groups, chunks, "freed placement groups that moved to another disk");
                    self.freed_groups.push(f);
                }
                Ok(Err(error)) => {
                    tracing::warn!(vdisk = %f.vdisk, disk = %f.disk, groups = ?f.groups, %error, "could not free placement groups that moved away (asked again at the next heartbeat)");
                }
                Err(error) => {
                    tracing::warn!(vdisk = %f.vdisk, %error, "freeing placement groups failed");
                }
            }
        }
        Ok(())
    }
}
