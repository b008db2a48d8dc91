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
        source: std::io::Error,
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
    let (listener, ours) = listen(&config.socket).map_err(|source| ServeError::Listen {
        path: config.socket.clone(),
        source,
    })?;
    let mut listener = Listener::from(listener);
    let result = serve_on(&device, config, &stop, &mut listener);
    // Removed unless another process replaced it since.
    if file_id(&config.socket) == Some(ours) {
        let _ = std::fs::remove_file(&config.socket);
    }
    result
}

/// Which file a path names (device and inode).
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A socket listening at `path`, replacing whatever was there. It is bound
/// under a temporary name and renamed into place once it listens, so the
/// path never names a socket that refuses connections: whoever waits for the
/// path to appear (a qemu hook, a supervisor) may connect at once.
fn listen(
    path: &std::path::Path,
) -> std::io::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let id = file_id(path).ok_or_else(|| std::io::Error::other("the socket vanished"))?;
    Ok((listener, id))
}

fn serve_on<D: BlockDisk>(
    device: &VhostUserBlk<D>,
    config: &ServeConfig,
    stop: &AtomicBool,
    listener: &mut Listener,
) -> Result<(), ServeError> {
    tracing::info!(socket = %config.socket.display(), queues = config.num_queues, "vhost-user-blk device listening");
    while !stop.load(Ordering::Acquire) {
        let mut daemon = VhostUserDaemon::new(
            "tessera-vhost".to_string(),
            device.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        daemon
            .start(listener)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket path names a listening socket as soon as it exists, and
    /// replaces what a dead predecessor left there.
    #[test]
    fn the_socket_path_appears_listening_and_replaces_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("tessera-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        // A stale socket nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        let (listener, id) = listen(&path).unwrap();
        assert_eq!(file_id(&path), Some(id));
        std::os::unix::net::UnixStream::connect(&path).expect("listening once it exists");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("v.sock")],
            "no temporary name left"
        );
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
