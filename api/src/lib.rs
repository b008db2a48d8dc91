//! Tessera's management REST API server.
//!
//! A thin HTTP layer (axum) over [`ZoneService`]: it authenticates the
//! request, decodes it, calls the zone operation, and encodes the answer or
//! the error. It knows nothing of placement or leases beyond what the zone
//! service answers. The [`routes`] module lists the routes.
//!
//! [`start`] opens the embedded metadata store in `dir/meta`, makes sure the
//! zone exists, makes sure the bearer token file `dir/api-token` exists, and
//! serves on `listen` until [`ApiServer::shutdown`]. [`run`] does the same
//! until SIGINT or SIGTERM.

pub mod auth;
pub mod error;
pub mod extract;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_zone::service::ZoneService;
use tessera_zone::sled_store::SledStore;
use tessera_zone::store::StoreError;
use tessera_zone::ZoneError;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use auth::TOKEN_FILE;

/// Name of the metadata store directory in the server's directory.
pub const META_DIR: &str = "meta";
/// How long a shutdown waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What an API server serves and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Holds `meta/` (the sled metadata store) and `api-token`.
    pub dir: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Name of the zone; the store must hold this zone or none.
    pub zone_name: String,
    /// How long a storage node may stay down before its copies are rebuilt
    /// on other disks.
    pub rebuild_after: Duration,
    /// How often copy moves (rebuild, drain, rebalance) are planned.
    pub plan_interval: Duration,
}

impl ApiConfig {
    /// A configuration with the default rebuild delay (10 minutes) and
    /// planning interval (5 s).
    pub fn new(dir: PathBuf, listen: SocketAddr, zone_name: &str) -> Self {
        ApiConfig {
            dir,
            listen,
            zone_name: zone_name.to_string(),
            rebuild_after: DEFAULT_REBUILD_AFTER,
            plan_interval: Duration::from_secs(5),
        }
    }
}

/// Default delay before a down node's copies are rebuilt elsewhere.
pub const DEFAULT_REBUILD_AFTER: Duration = Duration::from_secs(600);

/// Why the API server cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot create the server directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the metadata store in {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("cannot set up zone '{zone}'")]
    Zone {
        zone: String,
        #[source]
        source: ZoneError,
    },
    #[error("cannot read or create the API token file {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the API server failed")]
    Serve(#[source] std::io::Error),
    #[error("cannot wait for termination signals")]
    Signal(#[source] std::io::Error),
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The bearer token file clients authenticate with.
    pub token_path: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
    planner: JoinHandle<()>,
}

impl ApiServer {
    /// Stops accepting connections, lets open ones finish (for a few
    /// seconds at most), and closes the metadata store.
    pub fn shutdown(self) -> impl std::future::Future<Output = Result<(), ApiError>> + Send {
        let Self {
            stop,
            mut task,
            planner,
            ..
        } = self;
        planner.abort();
        async move {
            // The server may have ended already; then there is nobody to tell.
            let _ = stop.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                Ok(Ok(result)) => result.map_err(ApiError::Serve),
                Ok(Err(join)) => Err(ApiError::Serve(std::io::Error::other(join))),
                Err(_) => {
                    tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                    task.abort();
                    let _ = task.await;
                    Ok(())
                }
            }
        }
    }
}

/// Starts an API server as described in the crate documentation.
pub async fn start(config: ApiConfig) -> Result<ApiServer, ApiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(&config.dir)
        .map_err(|source| ApiError::Dir {
            path: config.dir.clone(),
            source,
        })?;
    let meta = config.dir.join(META_DIR);
    let store = SledStore::open(&meta).map_err(|source| ApiError::Store {
        path: meta.clone(),
        source,
    })?;
    let service = ZoneService::new(Arc::new(store));
    let zone = service
        .ensure_zone(&config.zone_name)
        .await
        .map_err(|source| ApiError::Zone {
            zone: config.zone_name.clone(),
            source,
        })?;

    let token_path = config.dir.join(TOKEN_FILE);
    let token = auth::load_or_create(&token_path).map_err(|source| ApiError::Token {
        path: token_path.clone(),
        source,
    })?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: config.listen,
        source,
    })?;
    let planner = tokio::spawn(plan_moves(
        service.clone(),
        config.rebuild_after,
        config.plan_interval,
    ));
    let app = routes::router(service, Arc::from(token));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, zone = %zone.name, zone_uuid = %zone.uuid, "API server listening");
    Ok(ApiServer {
        addr,
        token_path,
        stop,
        task,
        planner,
    })
}

/// Plans copy moves every `interval` (see `tessera_zone::service::MovePlanner`).
async fn plan_moves(service: ZoneService, rebuild_after: Duration, interval: Duration) {
    let mut planner = tessera_zone::service::MovePlanner::new(service, rebuild_after);
    loop {
        tokio::time::sleep(interval).await;
        if let Err(error) = planner.run_once().await {
            tracing::warn!(%error, "planning copy moves failed; will retry");
        }
    }
}

/// Runs an API server until SIGINT (ctrl-c) or SIGTERM.
pub async fn run(config: ApiConfig) -> Result<(), ApiError> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ApiError::Signal)?;
    let server = start(config).await?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.map_err(ApiError::Signal)?,
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping the API server");
    server.shutdown().await
}
