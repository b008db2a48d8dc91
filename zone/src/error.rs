//! The error of zone operations.

use crate::records::RecordError;
use crate::store::StoreError;

/// Why a zone operation failed. Each variant maps to one HTTP status
/// ([`ZoneError::http_status`]); the message is meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// The named object does not exist (the string names it: "vDisk ds/vm1").
    #[error("{0} does not exist")]
    NotFound(String),
    /// An object of that name exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is malformed or out of range.
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state (a lease, a concurrent update).
    #[error("{0}")]
    Conflict(String),
    /// The zone lacks the nodes or disks the request needs.
    #[error("{0}")]
    Unsatisfiable(String),
    /// The metadata store failed.
    #[error("the zone metadata store failed")]
    Store(#[from] StoreError),
    /// A stored record is unreadable.
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl ZoneError {
    /// The HTTP status that reports this error.
    pub fn http_status(&self) -> u16 {
        match self {
            ZoneError::NotFound(_) => 404,
            ZoneError::AlreadyExists(_) | ZoneError::Conflict(_) | ZoneError::Unsatisfiable(_) => {
                409
            }
            ZoneError::Invalid(_) => 400,
            ZoneError::Store(_) => 503,
            ZoneError::Record(_) => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_messages() {
        let e = ZoneError::NotFound("vDisk ds/vm1".into());
        assert_eq!(
            (e.http_status(), e.to_string().as_str()),
            (404, "vDisk ds/vm1 does not exist")
        );
        let e = ZoneError::AlreadyExists("datastore 'ds'".into());
        assert_eq!(
            (e.http_status(), e.to_string().as_str()),
            (409, "datastore 'ds' already exists")
        );
        assert_eq!(ZoneError::Invalid("x".into()).http_status(), 400);
        assert_eq!(ZoneError::Conflict("x".into()).http_status(), 409);
        assert_eq!(ZoneError::Unsatisfiable("x".into()).http_status(), 409);
        assert_eq!(ZoneError::Store(StoreError::NoRuntime).http_status(), 503);
    }
}
