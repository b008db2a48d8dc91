//! The bearer token: its file, and the middleware that checks it.
//!
//! The token is 32 random bytes in hex, created with the server's directory
//! and kept in `api-token` (mode 0600): whoever can read that file may manage
//! the zone. Clients send it as `Authorization: Bearer <token>`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::error::HttpError;

/// Name of the token file in the server's directory.
pub const TOKEN_FILE: &str = "api-token";

/// Reads the token at `path`, creating the file with a new token if it is
/// missing or empty. Creation is crash-safe: temporary file (0600) → write →
/// fsync → rename → fsync of the directory; a crash leaves the old state or
/// the complete file.
pub fn load_or_create(path: &Path) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => {
            if fs::metadata(path)?.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the API token file is readable by other users");
            }
            return Ok(token.trim().to_owned());
        }
        Ok(_) => {
            tracing::warn!(path = %path.display(), "the API token file is empty; writing a new token")
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let token = generate();
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    tracing::info!(path = %path.display(), "created the API token file");
    Ok(token)
}

/// 32 random bytes in hex. The randomness comes from two v4 uuids (the
/// operating system's generator through `uuid`): 244 random bits, as 12 bits
/// are uuid version and variant markers.
fn generate() -> String {
    let bytes: Vec<u8> = [Uuid::new_v4(), Uuid::new_v4()]
        .iter()
        .flat_map(|u| *u.as_bytes())
        .collect();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: answers 401 unless the request carries the bearer token.
pub async fn require_token(
    State(token): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request.headers().get(AUTHORIZATION).map(|value| {
        value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()))
    });
    let message = match presented {
        Some(true) => return next.run(request).await,
        Some(false) => "the API token is wrong",
        None => "the request needs the header Authorization: Bearer <token>, with the token of the api-token file",
    };
    let mut response = HttpError::unauthorized(message).into_response();
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_64_hex_digits_and_differ() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn the_token_file_is_created_private_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join(TOKEN_FILE);
        let token = load_or_create(&path).expect("created");
        assert_eq!(
            fs::metadata(&path).expect("exists").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create(&path).expect("read"), token);
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            format!("{token}\n")
        );
        fs::write(&path, "").expect("emptied");
        assert_ne!(load_or_create(&path).expect("recreated"), token);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
