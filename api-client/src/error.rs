//! The error of API calls.

use std::path::PathBuf;
use std::time::Duration;

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
    /// The server refused the request; `message` is its explanation.
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
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
    /// The HTTP status of a refused request, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the server answered 404 Not Found.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether the server answered 409 Conflict.
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}
