//! Serving the device on a unix socket, one QEMU connection after another.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::disk::BlockDisk;
use crate::vhu_blk::VhostUserBlk;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    /// What GET_ID answers.
    pub serial: String,
    /// Return after the first connection ends instead of waiting for the next.
    pub exit_on_disconnect: bool,
}

/// Why serving stopped.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot create the vhost-user device: {0}")]
    Daemon(String),
    #[error("the vhost-user connection failed: {0}")]
    Connection(String),
}

/// Serves `disk` on `config.socket` until `stop` is set (checked between
/// connections) or, with `exit_on_disconnect`, until the first connection
/// ends. Blocking: run it on its own thread.
pub fn serve<D: BlockDisk>(
    disk: Arc<D>,
    config: &ServeConfig,
    stop: Arc<AtomicBool>,
) -> Result<(), ServeError> {
    let device = device(disk, config)?;
    serve_device(device, config, stop)
}

/// The device `serve` would serve: create it first to keep a handle (to
/// `quiesce` it before closing its disk).
pub fn device<D: BlockDisk>(
    disk: Arc<D>,
    config: &ServeConfig,
) -> Result<VhostUserBlk<D>, ServeError> {
    VhostUserBlk::new(disk, config.num_queues, config.queue_size, &config.serial)
        .map_err(|e| ServeError::Daemon(e.to_string()))
}

/// Serves `device` as [`serve`] does.
pub fn serve_device<D: BlockDisk>(
    device: VhostUserBlk<D>,
    config: &ServeConfig,
    stop: Arc<AtomicBool>,
) -> Result<(), ServeError> {
    // One listening socket for the life of the process: a front-end that
    // connects while the previous one is being torn down waits in its backlog.
    let mut listener =
        Listener::new(&config.socket, true).map_err(|source| ServeError::Listen {
            path: config.socket.clone(),
            source,
        })?;
    tracing::info!(socket = %config.socket.display(), queues = config.num_queues, "vhost-user-blk device listening");
    while !stop.load(Ordering::Acquire) {
        let mut daemon = VhostUserDaemon::new(
            "tessera-vhost".to_string(),
            device.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Connection(e.to_string()))?;
        tracing::info!("front-end connected");
        let ended = daemon.wait();
        // Dropping the daemon stops this connection's queue workers.
        drop(daemon);
        // Requests the guest issued before going away still complete (into
        // memory this device keeps mapped) before the next front-end starts.
        if !device.wait_idle(Duration::from_secs(60)) {
            tracing::warn!("requests still in flight after the front-end left");
        }
        match ended {
            Ok(()) => tracing::info!("front-end disconnected"),
            Err(e) => tracing::info!(reason = %e, "front-end disconnected"),
        }
        if config.exit_on_disconnect {
            break;
        }
    }
    Ok(())
}
