//! The storage node daemon: serves chunk I/O on its local disks to volume
//! clients over the storage protocol, and keeps the zone informed of its
//! disks and liveness.
//!
//! It knows the chunk store (disk format) and the wire protocol; it knows
//! nothing of vDisk layout, replication or virtio: every request names one
//! chunk range of one disk, and the node does exactly that.

mod config;
mod disks;
pub mod marks;
mod server;
mod shm;
mod zone_link;

pub use config::{DiskSpec, NodeConfig, NodeIdentity};
pub use disks::{DiskSet, DisksError};
pub use server::{serve, Server};
pub use zone_link::{Advertise, ZoneLink};

use std::sync::Arc;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};

/// Why the node could not start or stopped.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error("cannot use the node directory {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Disks(#[from] DisksError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node identity file {path} is unreadable: {reason}")]
    Identity { path: String, reason: String },
    #[error("{0}")]
    Zone(String),
}

/// Binds the local-session socket, replacing a socket file a previous run
/// left. A failure only costs the local path: clients fall back to TCP.
fn bind_local(path: &std::path::Path) -> Option<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    match UnixListener::bind(path) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no local sessions: cannot bind the socket");
            None
        }
    }
}

/// The activity marks' file in the node's directory.
pub const MARKS_FILE: &str = "activity-marks";

/// Opens (or creates) the node's activity marks. A file that is there but
/// unreadable is not an error: the marks are then lost, which the node
/// says for every vDisk until its writers have made their copies agree.
fn open_marks(dir: &std::path::Path) -> Result<marks::MarkStore, NodeError> {
    let path = dir.join(MARKS_FILE);
    let fail = |source: std::io::Error| NodeError::Dir {
        path: path.display().to_string(),
        source,
    };
    let new = !path.exists();
    if new {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(fail)?;
        file.set_len(marks::DEFAULT_SIZE).map_err(fail)?;
        file.sync_all().map_err(fail)?;
    }
    let dev = tessera_chunkstore::FileDevice::open(&path)
        .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
    let (store, opened) = marks::MarkStore::open(Arc::new(dev), new)
        .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
    match opened {
        marks::Opened::Lost(why) => tracing::error!(
            path = %path.display(),
            why,
            "the activity marks are lost: every extent of every vDisk counts as written until its writer reconciles it"
        ),
        marks::Opened::New => tracing::info!(path = %path.display(), "activity marks created"),
        marks::Opened::Recovered => {}
    }
    Ok(store)
}

/// Runs a storage node until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    std::fs::create_dir_all(&config.dir).map_err(|source| NodeError::Dir {
        path: config.dir.display().to_string(),
        source,
    })?;
    let identity = NodeIdentity::load_or_create(&config.dir)?;
    let disks = Arc::new(DiskSet::open(&config.disks)?);
    let marks = Arc::new(open_marks(&config.dir)?);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Listen {
        addr: config.listen.to_string(),
        source,
    })?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    let local = config.local_socket.as_deref().and_then(bind_local);
    let socket = local.as_ref().and(config.local_socket.clone());
    tracing::info!(node = %identity.uuid, %addr, local = ?socket, disks = disks.len(), "storage node serving");

    let server = serve(listener, local, identity.uuid, disks.clone(), marks);
    let link = match &config.api {
        Some(api) => Some(ZoneLink::start(
            api.clone(),
            identity.clone(),
            config.dir.clone(),
            Advertise {
                host: config.host.clone(),
                addr: advertise,
                socket: socket.map(|p| p.display().to_string()),
            },
            disks.clone(),
            config.heartbeat_interval,
        )),
        None => None,
    };
    shutdown.await;
    tracing::info!("storage node stopping");
    if let Some(link) = link {
        link.stop().await;
    }
    server.stop().await;
    // Leave everything acknowledged on stable media on a clean stop.
    if let Err(e) = disks.flush_all() {
        tracing::warn!(error = %e, "final flush failed");
    }
    Ok(())
}
