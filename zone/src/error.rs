//! The error of zone operations.

use uuid::Uuid;

use crate::records::RecordError;
use crate::store::StoreError;

/// The stable, machine-readable codes of [`ZoneError`]s
/// ([`ZoneError::code`]): the management API sends them beside the message,
/// and callers act on them (a volume client is fenced by
/// [`LEASE_LOST`](code::LEASE_LOST), never by
/// [`CONTENTION`](code::CONTENTION)). Never rename one: clients match on them.
pub mod code {
    /// [`ZoneError::NotFound`](super::ZoneError::NotFound).
    pub const NOT_FOUND: &str = "not_found";
    /// [`ZoneError::AlreadyExists`](super::ZoneError::AlreadyExists).
    pub const ALREADY_EXISTS: &str = "already_exists";
    /// [`ZoneError::Invalid`](super::ZoneError::Invalid).
    pub const INVALID: &str = "invalid";
    /// [`ZoneError::Conflict`](super::ZoneError::Conflict).
    pub const CONFLICT: &str = "conflict";
    /// [`ZoneError::Unsatisfiable`](super::ZoneError::Unsatisfiable).
    pub const UNSATISFIABLE: &str = "unsatisfiable";
    /// [`ZoneError::LeaseLost`](super::ZoneError::LeaseLost).
    pub const LEASE_LOST: &str = "lease_lost";
    /// [`ZoneError::Contention`](super::ZoneError::Contention).
    pub const CONTENTION: &str = "contention";
    /// [`ZoneError::StillDirty`](super::ZoneError::StillDirty).
    pub const STILL_DIRTY: &str = "still_dirty";
    /// [`ZoneError::Store`](super::ZoneError::Store).
    pub const STORE_UNAVAILABLE: &str = "store_unavailable";
    /// [`ZoneError::Record`](super::ZoneError::Record).
    pub const RECORD_UNREADABLE: &str = "record_unreadable";
}

/// Why a zone operation failed. Each variant has one stable code
/// ([`ZoneError::code`]) and one HTTP status ([`ZoneError::http_status`]);
/// the message is meant for the operator.
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
    /// The request conflicts with the current state of the zone (the vDisk
    /// is open elsewhere, the datastore is not empty, the node is up…).
    #[error("{0}")]
    Conflict(String),
    /// The zone lacks the nodes or disks the request needs.
    #[error("{0}")]
    Unsatisfiable(String),
    /// The session does not hold the vDisk's lease (taken over, closed,
    /// never opened): the update is refused, and the writer is fenced. The
    /// string says why ("vDisk ds/vm1 was taken over by host hv2").
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// The compare-and-swap loop of an update gave up: others changed the
    /// record (named by the string) on every attempt. The update wrote
    /// nothing; sending the request again is safe.
    #[error("{0} is being changed by others too often; try again")]
    Contention(String),
    /// `mark_clean` with `complete` was refused: the copy still misses
    /// chunks, so it stays stale (the call recorded nothing).
    #[error("disk {disk} still misses {missing} chunks of vDisk {vdisk}")]
    StillDirty {
        /// The copy's disk.
        disk: Uuid,
        /// The vDisk, as "datastore/name".
        vdisk: String,
        /// Chunks still dirty on the disk.
        missing: u64,
    },
    /// The metadata store failed.
    #[error("the zone metadata store failed")]
    Store(#[from] StoreError),
    /// A stored record is unreadable.
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl ZoneError {
    /// The stable snake_case code of this error (see [`code`]).
    pub fn code(&self) -> &'static str {
        match self {
            ZoneError::NotFound(_) => code::NOT_FOUND,
            ZoneError::AlreadyExists(_) => code::ALREADY_EXISTS,
            ZoneError::Invalid(_) => code::INVALID,
            ZoneError::Conflict(_) => code::CONFLICT,
            ZoneError::Unsatisfiable(_) => code::UNSATISFIABLE,
            ZoneError::LeaseLost(_) => code::LEASE_LOST,
            ZoneError::Contention(_) => code::CONTENTION,
            ZoneError::StillDirty { .. } => code::STILL_DIRTY,
            ZoneError::Store(_) => code::STORE_UNAVAILABLE,
            ZoneError::Record(_) => code::RECORD_UNREADABLE,
        }
    }

    /// The HTTP status that reports this error.
    ///
    /// Contention is 503, not 409: nothing changed and the same request may
    /// succeed a moment later (a transient condition of the service, not of
    /// the caller's request), and volume clients from before error codes
    /// fence themselves on every 409, which contention must never do.
    pub fn http_status(&self) -> u16 {
        match self {
            ZoneError::NotFound(_) => 404,
            ZoneError::AlreadyExists(_)
            | ZoneError::Conflict(_)
            | ZoneError::Unsatisfiable(_)
            | ZoneError::LeaseLost(_)
            | ZoneError::StillDirty { .. } => 409,
            ZoneError::Invalid(_) => 400,
            ZoneError::Contention(_) | ZoneError::Store(_) => 503,
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
        let e = ZoneError::LeaseLost("vDisk ds/vm1 is not open".into());
        assert_eq!(
            (e.http_status(), e.to_string().as_str()),
            (409, "lease lost: vDisk ds/vm1 is not open")
        );
        let e = ZoneError::Contention("vDisk ds/vm1".into());
        assert_eq!(
            (e.http_status(), e.to_string().as_str()),
            (
                503,
                "vDisk ds/vm1 is being changed by others too often; try again"
            )
        );
        let e = ZoneError::StillDirty {
            disk: Uuid::from_u128(7),
            vdisk: "ds/vm1".into(),
            missing: 3,
        };
        assert_eq!(
            (e.http_status(), e.to_string().as_str()),
            (
                409,
                "disk 00000000-0000-0000-0000-000000000007 still misses 3 chunks of vDisk ds/vm1"
            )
        );
        assert_eq!(ZoneError::Invalid("x".into()).http_status(), 400);
        assert_eq!(ZoneError::Conflict("x".into()).http_status(), 409);
        assert_eq!(ZoneError::Unsatisfiable("x".into()).http_status(), 409);
        assert_eq!(ZoneError::Store(StoreError::NoRuntime).http_status(), 503);
    }

    #[test]
    fn every_variant_has_its_own_code() {
        let all = [
            ZoneError::NotFound("x".into()),
            ZoneError::AlreadyExists("x".into()),
            ZoneError::Invalid("x".into()),
            ZoneError::Conflict("x".into()),
            ZoneError::Unsatisfiable("x".into()),
            ZoneError::LeaseLost("x".into()),
            ZoneError::Contention("x".into()),
            ZoneError::StillDirty {
                disk: Uuid::nil(),
                vdisk: "x".into(),
                missing: 1,
            },
            ZoneError::Store(StoreError::NoRuntime),
            ZoneError::Record(RecordError::TooNew {
                key: "k".into(),
                found: 99,
            }),
        ];
        let codes: Vec<&str> = all.iter().map(ZoneError::code).collect();
        assert_eq!(
            codes,
            [
                "not_found",
                "already_exists",
                "invalid",
                "conflict",
                "unsatisfiable",
                "lease_lost",
                "contention",
                "still_dirty",
                "store_unavailable",
                "record_unreadable",
            ]
        );
    }
}
