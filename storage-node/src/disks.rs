//! The disks a node serves, by uuid.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tessera_chunkstore::{Disk, FormatOptions, DEFAULT_EXTENT_SIZE};
use thiserror::Error;
use uuid::Uuid;

use crate::config::DiskSpec;

/// Why the node's disks could not be opened.
#[derive(Debug, Error)]
pub enum DisksError {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: tessera_chunkstore::Error,
    },
    #[error("cannot create disk file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: tessera_chunkstore::Error,
    },
    #[error("disks {a} and {b} carry the same uuid {uuid}")]
    Duplicate { a: PathBuf, b: PathBuf, uuid: Uuid },
    #[error("the node has no disk to serve")]
    None,
    #[error("flushing disk {uuid} failed")]
    Flush {
        uuid: Uuid,
        #[source]
        source: tessera_chunkstore::Error,
    },
}

/// The node's open disks.
pub struct DiskSet {
    by_uuid: HashMap<Uuid, Arc<Disk>>,
    order: Vec<Uuid>,
}

impl DiskSet {
    /// Opens every disk; a missing file with a `create_size` is created and formatted.
    pub fn open(specs: &[DiskSpec]) -> Result<Self, DisksError> {
        if specs.is_empty() {
            return Err(DisksError::None);
        }
        let mut by_uuid = HashMap::new();
        let mut order = Vec::new();
        for spec in specs {
            let disk = match (spec.path.exists(), spec.create_size) {
                (false, Some(size)) => {
                    tracing::info!(path = %spec.path.display(), size, "formatting new disk file");
                    Disk::format(
                        &spec.path,
                        &FormatOptions {
                            disk_uuid: Uuid::new_v4(),
                            extent_size: DEFAULT_EXTENT_SIZE,
                            size: Some(size),
                            force: false,
                            thin: spec.create_format >= 3,
                        },
                    )
                    .map_err(|source| DisksError::Create {
                        path: spec.path.clone(),
                        source,
                    })?
                }
                _ => Disk::open(&spec.path).map_err(|source| DisksError::Open {
                    path: spec.path.clone(),
                    source,
                })?,
            };
            let uuid = disk.uuid();
            if let Some(other) = by_uuid.get(&uuid) {
                let other: &Arc<Disk> = other;
                return Err(DisksError::Duplicate {
                    a: other.path().to_path_buf(),
                    b: spec.path.clone(),
                    uuid,
                });
            }
            let info = disk.info();
            tracing::info!(
                disk = %uuid,
                path = %spec.path.display(),
                capacity = info.capacity,
                used = info.used,
                "disk opened"
            );
            disk.set_boot(crate::server::boot_tag());
            order.push(uuid);
            by_uuid.insert(uuid, Arc::new(disk));
        }
        Ok(DiskSet { by_uuid, order })
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn get(&self, uuid: &Uuid) -> Option<&Arc<Disk>> {
        self.by_uuid.get(uuid)
    }

    /// Disks in the order they were configured.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Disk>> {
        self.order.iter().map(|u| &self.by_uuid[u])
    }

    pub fn uuids(&self) -> &[Uuid] {
        &self.order
    }

    /// Makes everything written to every disk stable.
    pub fn flush_all(&self) -> Result<(), DisksError> {
        for d in self.iter() {
            d.flush().map_err(|source| DisksError::Flush {
                uuid: d.uuid(),
                source,
            })?;
        }
        Ok(())
    }
}
