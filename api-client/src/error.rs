//! The error of API calls.

use std::path::PathBuf;
use std::time::Duration;

use tessera_zone::error::code;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The URL is not an `http://host:port` URL.
    #[error("{url} is not a Tessera API URL: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    /// No connection could be made.
    #[error("cannot reach the Tessera API at {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection failed during the exchange.
    #[error("the connection to the Tessera API at {url} failed")]
    Transport {
        url: String,
        #[source]
        source: hyper::Error,
    },
    /// No complete answer came in time.
    #[error("the Tessera API at {url} did not answer within {after:?}")]
    Timeout { url: String, after: Duration },
    /// The server refused the request: `code` is the stable reason it gave
    /// (see the API's documentation; `None` from servers before error codes,
    /// or when the answer is not the API's JSON), `message` its explanation.
    #[error("{message} (HTTP {status})")]
    Status {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// The server refused a lease-bound update (renew, stale, clean,
    /// activity) because the session does not hold the vDisk's lease (code
    /// `lease_lost`, HTTP 409): the writer is fenced.
    #[error("{message} (HTTP 409)")]
    LeaseLost { message: String },
    /// The server answered something that is not the expected JSON.
    #[error("the Tessera API answered {what} with an unexpected body")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The request body cannot be encoded.
    #[error("the request to {what} cannot be encoded")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The bearer token file cannot be read.
    #[error("cannot read the API token file {}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ApiError {
    /// The error of a refused request: [`ApiError::LeaseLost`] for code
    /// `lease_lost`, [`ApiError::Status`] otherwise.
    pub(crate) fn refused(status: u16, code: Option<String>, message: String) -> Self {
        match code.as_deref() {
            Some(code::LEASE_LOST) => ApiError::LeaseLost { message },
            _ => ApiError::Status {
                status,
                code,
                message,
            },
        }
    }

    /// The HTTP status of a refused request, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            ApiError::LeaseLost { .. } => Some(409),
            _ => None,
        }
    }

    /// The code of a refused request, if the server gave one: `not_found`,
    /// `lease_lost`, `contention`…
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Status { code, .. } => code.as_deref(),
            ApiError::LeaseLost { .. } => Some(code::LEASE_LOST),
            _ => None,
        }
    }

    /// Whether the session does not hold the vDisk's lease (code
    /// `lease_lost`): the writer is fenced.
    pub fn is_lease_lost(&self) -> bool {
        self.code() == Some(code::LEASE_LOST)
    }

    /// Whether the object named by the request does not exist (code
    /// `not_found`; from a server before error codes, any 404). An unknown
    /// route (`no_route`) is not.
    pub fn is_not_found(&self) -> bool {
        match self.code() {
            Some(code) => code == code::NOT_FOUND,
            None => self.status() == Some(404),
        }
    }

    /// Whether an update gave up because others kept changing the record
    /// (code `contention`, HTTP 503): the update wrote nothing, and the
    /// request may be sent again. The client has already tried a few times when it returns
    /// this.
    pub fn is_contention(&self) -> bool {
        self.code() == Some(code::CONTENTION)
    }

    /// Whether a copy was recorded complete while it still misses chunks
    /// (code `still_dirty`): it stays stale; resync goes on.
    pub fn is_still_dirty(&self) -> bool {
        self.code() == Some(code::STILL_DIRTY)
    }

    /// Whether the server answered 409 Conflict, whatever the code
    /// (`conflict`, `already_exists`, `unsatisfiable`, `lease_lost`,
    /// `still_dirty`).
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}
