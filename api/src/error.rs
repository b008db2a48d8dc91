//! Error answers: every refusal is one line of JSON,
//! `{"error": "...", "code": "..."}`: a message for people and a stable code
//! for programs. Zone errors carry their own code ([`ZoneError::code`]); the
//! API's own refusals have the codes of [`code`].

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tessera_zone::ZoneError;

use crate::routes::MAX_BODY;

/// The codes of the API's own refusals, beside those of the zone
/// ([`tessera_zone::error::code`]). Never rename one: clients match on them.
pub mod code {
    /// 400: the request is malformed (bad JSON, wrong types, unknown fields,
    /// missing content type, bad path or query); the zone's `invalid` too.
    pub use tessera_zone::error::code::INVALID;
    /// 401: the bearer token is missing or wrong.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 404: no route has this path (an unknown object is `not_found`).
    pub const NO_ROUTE: &str = "no_route";
    /// 405: the route does not accept this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 413: the request body is over [`MAX_BODY`](crate::routes::MAX_BODY).
    pub const TOO_LARGE: &str = "too_large";
}

/// An HTTP error answer: a status, a stable code and a one-line explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: StatusCode,
    /// Stable snake_case code: one of [`code`] or of the zone's.
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: &'a str,
}

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        // One line, whatever the source said.
        let message = message.into().replace(['\n', '\r'], " ");
        Self {
            status,
            code,
            message,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code::INVALID, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code::UNAUTHORIZED, message)
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            code::NO_ROUTE,
            "no such route; the API lives under /v1",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::METHOD_NOT_ALLOWED,
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
                    code::TOO_LARGE,
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
        let code = error.code();
        if matches!(error, ZoneError::Contention(_)) {
            // Nothing changed and the client tries again: not a failure yet.
            tracing::warn!(%error, "a zone update gave up under contention");
            Self::new(status, code, error.to_string())
        } else if status.is_server_error() {
            let message = chain(&error);
            tracing::error!(error = %message, "a zone operation failed");
            Self::new(status, code, message)
        } else {
            Self::new(status, code, error.to_string())
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut body = serde_json::to_string(&ErrorBody {
            error: &self.message,
            code: self.code,
        })
        .unwrap_or_else(|_| format!(r#"{{"error":"unprintable error","code":"{}"}}"#, self.code));
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
    fn zone_errors_keep_their_status_code_and_message() {
        let e = HttpError::from(ZoneError::NotFound("vDisk a/b".into()));
        assert_eq!(
            (e.status, e.code, e.message.as_str()),
            (
                StatusCode::NOT_FOUND,
                "not_found",
                "vDisk a/b does not exist"
            )
        );
        let e = HttpError::from(ZoneError::Store(tessera_zone::store::StoreError::Corrupt(
            "x".into(),
        )));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        );
        assert_eq!(
            e.message,
            "the zone metadata store failed: the metadata store is corrupt: x"
        );
        let e = HttpError::from(ZoneError::LeaseLost("vDisk a/b is not open".into()));
        assert_eq!(
            (e.status, e.code, e.message.as_str()),
            (
                StatusCode::CONFLICT,
                "lease_lost",
                "lease lost: vDisk a/b is not open"
            )
        );
        let e = HttpError::from(ZoneError::Contention("vDisk a/b".into()));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "contention")
        );
    }

    #[test]
    fn messages_are_one_line() {
        assert_eq!(HttpError::bad_request("a\nb\r\nc").message, "a b  c");
    }

    #[tokio::test]
    async fn bodies_carry_the_message_and_the_code() {
        use axum::body::to_bytes;
        let response =
            HttpError::from(ZoneError::LeaseLost("vDisk a/b is not open".into())).into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let body = to_bytes(response.into_body(), 1024).await.expect("a body");
        assert_eq!(
            std::str::from_utf8(&body).expect("utf-8"),
            "{\"error\":\"lease lost: vDisk a/b is not open\",\"code\":\"lease_lost\"}\n"
        );
    }
}
