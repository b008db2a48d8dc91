//! Error answers: every refusal is one line of JSON, `{"error": "..."}`.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tessera_zone::ZoneError;

use crate::routes::MAX_BODY;

/// An HTTP error answer: a status and a one-line explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        // One line, whatever the source said.
        let message = message.into().replace(['\n', '\r'], " ");
        Self { status, message }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "no such route; the API lives under /v1",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "this route does not accept that method",
        )
    }

    /// Maps a JSON body rejection: 413 for a body over the limit, 400 for
    /// everything else (a missing content type included).
    pub fn from_json(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                Self::bad_request("the request needs the header Content-Type: application/json")
            }
            JsonRejection::JsonSyntaxError(error) => Self::bad_request(format!(
                "the request body is not valid JSON: {}",
                inner(&error, error.body_text())
            )),
            JsonRejection::JsonDataError(error) => Self::bad_request(format!(
                "the request body does not fit the request: {}",
                inner(&error, error.body_text())
            )),
            JsonRejection::BytesRejection(error)
                if error.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {} bytes", MAX_BODY),
                )
            }
            other => Self::bad_request(format!(
                "the request body cannot be read: {}",
                other.body_text()
            )),
        }
    }

    pub fn from_path(rejection: PathRejection) -> Self {
        Self::bad_request(format!(
            "the URL path is invalid: {}",
            inner(&rejection, rejection.body_text())
        ))
    }

    pub fn from_query(rejection: QueryRejection) -> Self {
        Self::bad_request(format!(
            "the query string is invalid: {}",
            inner(&rejection, rejection.body_text())
        ))
    }
}

/// The innermost explanation of a rejection, without axum's generic prefix.
fn inner(error: &dyn std::error::Error, fallback: String) -> String {
    let mut source = error.source();
    let mut deepest = None;
    while let Some(e) = source {
        deepest = Some(e);
        source = e.source();
    }
    deepest.map_or(fallback, |e| e.to_string())
}

/// The error and its sources as one sentence chain: "a: b: c".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl From<ZoneError> for HttpError {
    fn from(error: ZoneError) -> Self {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            let message = chain(&error);
            tracing::error!(error = %message, "a zone operation failed");
            Self::new(status, message)
        } else {
            Self::new(status, error.to_string())
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut body = serde_json::to_string(&ErrorBody {
            error: &self.message,
        })
        .unwrap_or_else(|_| r#"{"error":"unprintable error"}"#.to_owned());
        body.push('\n');
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_errors_keep_their_status_and_message() {
        let e = HttpError::from(ZoneError::NotFound("vDisk a/b".into()));
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::NOT_FOUND, "vDisk a/b does not exist")
        );
        let e = HttpError::from(ZoneError::Store(tessera_zone::store::StoreError::Corrupt(
            "x".into(),
        )));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.message,
            "the zone metadata store failed: the metadata store is corrupt: x"
        );
    }

    #[test]
    fn messages_are_one_line() {
        assert_eq!(HttpError::bad_request("a\nb\r\nc").message, "a b  c");
    }
}
