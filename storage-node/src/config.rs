//! Node configuration and the node's persistent identity.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_api_client::ApiClient;
use uuid::Uuid;

use crate::NodeError;

/// One disk the node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Block device or file.
    pub path: PathBuf,
    /// If the path does not exist, create a file of this size and format it.
    pub create_size: Option<u64>,
    /// The format version a created file gets: 3 (space taken 4 KiB at a
    /// time as chunks are written) or 2 (a chunk takes its whole size at
    /// its first write).
    pub create_format: u32,
}

/// Everything the node needs to run.
#[derive(Clone)]
pub struct NodeConfig {
    /// Holds the node's identity (`node.json`).
    pub dir: PathBuf,
    /// Storage protocol listen address.
    pub listen: SocketAddr,
    /// Address volume clients use to reach this node (default: the listen address).
    pub advertise: Option<String>,
    /// Host this node runs on.
    pub host: String,
    /// Unix socket for local sessions (clients on this host share their
    /// memory with the node); `None`: TCP only.
    pub local_socket: Option<PathBuf>,
    pub disks: Vec<DiskSpec>,
    /// The zone's management API; `None` runs the node stand-alone.
    pub api: Option<ApiClient>,
    pub heartbeat_interval: Duration,
}

/// The node's identity, kept in `DIR/node.json` across restarts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeIdentity {
    /// Layout version of `node.json`.
    #[serde(default = "schema_v1")]
    pub schema: u32,
    pub uuid: Uuid,
    /// The zone the node joined on first registration; it never serves another.
    pub zone: Option<Uuid>,
}

fn schema_v1() -> u32 {
    1
}

impl NodeIdentity {
    const FILE: &'static str = "node.json";

    pub fn load_or_create(dir: &Path) -> Result<Self, NodeError> {
        let path = dir.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Self::parse(&bytes).map_err(|reason| NodeError::Identity {
                path: path.display().to_string(),
                reason,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = NodeIdentity {
                    schema: 1,
                    uuid: Uuid::new_v4(),
                    zone: None,
                };
                id.save(dir)?;
                Ok(id)
            }
            Err(source) => Err(NodeError::Dir {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// Writes the identity crash-safely: temporary file, fsync, rename, fsync dir.
    pub fn save(&self, dir: &Path) -> Result<(), NodeError> {
        let text = serde_json::to_string(self).expect("identity serialises");
        let path = dir.join(Self::FILE);
        let tmp = dir.join(format!("{}.tmp", Self::FILE));
        let io = |source| NodeError::Dir {
            path: path.display().to_string(),
            source,
        };
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeIdentity::load_or_create(dir.path()).unwrap();
        let b = NodeIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a, b);
        let with_zone = NodeIdentity {
            zone: Some(Uuid::new_v4()),
            ..a
        };
        with_zone.save(dir.path()).unwrap();
        assert_eq!(NodeIdentity::load_or_create(dir.path()).unwrap(), with_zone);
    }

    #[test]
    fn garbage_identity_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.json"), b"\xff\xfe nonsense").unwrap();
        assert!(NodeIdentity::load_or_create(dir.path()).is_err());
    }
}
