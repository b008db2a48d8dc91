//! Client of Tessera's management REST API.
//!
//! One async method per route of the API server (`tessera-api`), JSON in and
//! out. Each call opens its own HTTP/1.1 connection (management calls are
//! rare; no pool to keep healthy), authenticates with the bearer token, and
//! fails with an [`ApiError`] that carries the server's own explanation and
//! code when the server refuses ([`ApiError::LeaseLost`] for a lost lease).
//! A request refused with code `contention` (others kept updating the
//! record; the update wrote nothing) is sent again a few times, after short
//! randomized pauses, before the error is returned. Every future is `Send`: the client
//! works from any tokio runtime, multi-threaded included.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera_api_client::ApiError> {
//! let api = tessera_api_client::ApiClient::from_token_file("http://127.0.0.1:8080", "/var/lib/tessera/api-token")?;
//! for vdisk in api.vdisks(None).await? {
//!     println!("{}/{}: {:?}", vdisk.vdisk.datastore, vdisk.vdisk.name, vdisk.health);
//! }
//! # Ok(()) }
//! ```

mod endpoint;
mod error;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use uuid::Uuid;

use tessera_zone::records::{Datastore, Disk, Host, NodeStatus, Vdisk, Zone};
use tessera_zone::service::{
    CreateDatastore, CreateVdisk, CreatedVdisk, DatastoreDisk, DatastoreView, Heartbeat,
    HeartbeatReply, MarkActive, MarkClean, MarkStale, OpenVdisk, Opened, RegisterNode, Registered,
    Renewed, ResizeVdisk, SessionRef, VdiskView,
};

use endpoint::{encode, Endpoint};
pub use error::ApiError;

/// How long a call may take, connection included, unless set otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer accepted.
const MAX_RESPONSE: usize = 64 << 20;
/// Times a request refused with code `contention` is sent in all.
const CONTENTION_TRIES: u32 = 5;
/// Pause before the first resend after contention; doubled for each next
/// one, each drawn between half and one and a half of it: about 750 ms over
/// the [`CONTENTION_TRIES`] tries, 1.1 s at most.
const CONTENTION_PAUSE: Duration = Duration::from_millis(50);

/// A client of one API server.
#[derive(Clone)]
pub struct ApiClient {
    endpoint: Endpoint,
    token: String,
    timeout: Duration,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("url", &self.endpoint.url)
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The body of every error answer (`code` is absent from servers before
/// error codes).
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    code: Option<String>,
}

impl ApiClient {
    /// A client of the server at `url` (`http://host:port`, optionally with a
    /// path prefix) authenticating with bearer `token`.
    pub fn new(url: &str, token: String) -> Result<Self, ApiError> {
        Ok(Self {
            endpoint: Endpoint::parse(url)?,
            token: token.trim().to_owned(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// A client whose token is read from `path` (the server's `api-token` file).
    pub fn from_token_file(url: &str, path: impl AsRef<Path>) -> Result<Self, ApiError> {
        let path = path.as_ref();
        let token_error = |source| ApiError::TokenFile {
            path: path.to_owned(),
            source,
        };
        let token = std::fs::read_to_string(path).map_err(token_error)?;
        if token.trim().is_empty() {
            return Err(token_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is empty",
            )));
        }
        Self::new(url, token)
    }

    /// Sets how long a call may take, connection included.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.endpoint.url
    }

    // ---- the zone, hosts, nodes, disks ----

    /// `GET /v1/zone`.
    pub async fn zone(&self) -> Result<Zone, ApiError> {
        self.call(Method::GET, "/v1/zone".into(), None::<&()>).await
    }

    /// `GET /v1/hosts`.
    pub async fn hosts(&self) -> Result<Vec<Host>, ApiError> {
        self.call(Method::GET, "/v1/hosts".into(), None::<&()>)
            .await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>, ApiError> {
        self.call(Method::GET, "/v1/nodes".into(), None::<&()>)
            .await
    }

    /// `POST /v1/nodes`: registers a storage node and its disks.
    pub async fn register_node(&self, req: &RegisterNode) -> Result<Registered, ApiError> {
        self.call(Method::POST, "/v1/nodes".into(), Some(req)).await
    }

    /// `POST /v1/nodes/{uuid}/heartbeat`.
    pub async fn heartbeat(&self, node: Uuid, req: &Heartbeat) -> Result<HeartbeatReply, ApiError> {
        self.call(
            Method::POST,
            format!("/v1/nodes/{node}/heartbeat"),
            Some(req),
        )
        .await
    }

    /// `GET /v1/disks`.
    pub async fn disks(&self) -> Result<Vec<Disk>, ApiError> {
        self.call(Method::GET, "/v1/disks".into(), None::<&()>)
            .await
    }

    // ---- datastores ----

    /// `GET /v1/datastores`.
    pub async fn datastores(&self) -> Result<Vec<DatastoreView>, ApiError> {
        self.call(Method::GET, "/v1/datastores".into(), None::<&()>)
            .await
    }

    /// `GET /v1/datastores/{name}`.
    pub async fn datastore(&self, name: &str) -> Result<DatastoreView, ApiError> {
        self.call(
            Method::GET,
            format!("/v1/datastores/{}", encode(name)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/datastores`.
    pub async fn create_datastore(&self, req: &CreateDatastore) -> Result<Datastore, ApiError> {
        self.call(Method::POST, "/v1/datastores".into(), Some(req))
            .await
    }

    /// `DELETE /v1/datastores/{name}`.
    pub async fn delete_datastore(&self, name: &str) -> Result<(), ApiError> {
        self.call_empty(
            Method::DELETE,
            format!("/v1/datastores/{}", encode(name)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/datastores/{name}/disks`: adds a disk (rebalance onto it).
    pub async fn add_datastore_disk(&self, name: &str, disk: Uuid) -> Result<Datastore, ApiError> {
        self.call(
            Method::POST,
            format!("/v1/datastores/{}/disks", encode(name)),
            Some(&DatastoreDisk { disk }),
        )
        .await
    }

    /// `DELETE /v1/datastores/{name}/disks/{disk}`: removes a disk (its copies drain).
    pub async fn remove_datastore_disk(
        &self,
        name: &str,
        disk: Uuid,
    ) -> Result<Datastore, ApiError> {
        self.call(
            Method::DELETE,
            format!("/v1/datastores/{}/disks/{disk}", encode(name)),
            None::<&()>,
        )
        .await
    }

    /// `DELETE /v1/nodes/{uuid}[?force=true]`: removes a node for good (its
    /// disks leave every datastore); answers the disks removed.
    pub async fn remove_node(&self, node: Uuid, force: bool) -> Result<Vec<Uuid>, ApiError> {
        let query = if force { "?force=true" } else { "" };
        self.call(
            Method::DELETE,
            format!("/v1/nodes/{node}{query}"),
            None::<&()>,
        )
        .await
    }

    // ---- vDisks ----

    /// `GET /v1/vdisks[?datastore=X]`.
    pub async fn vdisks(&self, datastore: Option<&str>) -> Result<Vec<VdiskView>, ApiError> {
        let path = match datastore {
            Some(ds) => format!("/v1/vdisks?datastore={}", encode(ds)),
            None => "/v1/vdisks".into(),
        };
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `GET /v1/vdisks/{datastore}/{name}`.
    pub async fn vdisk(&self, datastore: &str, name: &str) -> Result<VdiskView, ApiError> {
        self.call(Method::GET, vdisk_path(datastore, name, ""), None::<&()>)
            .await
    }

    /// `POST /v1/vdisks`.
    pub async fn create_vdisk(&self, req: &CreateVdisk) -> Result<CreatedVdisk, ApiError> {
        self.call(Method::POST, "/v1/vdisks".into(), Some(req))
            .await
    }

    /// `POST /v1/vdisks/{datastore}/{name}/resize`.
    pub async fn resize_vdisk(
        &self,
        datastore: &str,
        name: &str,
        size: u64,
    ) -> Result<Vdisk, ApiError> {
        self.call(
            Method::POST,
            vdisk_path(datastore, name, "/resize"),
            Some(&ResizeVdisk { size }),
        )
        .await
    }

    /// `DELETE /v1/vdisks/{datastore}/{name}[?force=true]`.
    pub async fn delete_vdisk(
        &self,
        datastore: &str,
        name: &str,
        force: bool,
    ) -> Result<(), ApiError> {
        let query = if force { "?force=true" } else { "" };
        self.call_empty(
            Method::DELETE,
            vdisk_path(datastore, name, query),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/vdisks/{datastore}/{name}/open`: takes the write lease.
    pub async fn open_vdisk(
        &self,
        datastore: &str,
        name: &str,
        req: &OpenVdisk,
    ) -> Result<Opened, ApiError> {
        self.call(
            Method::POST,
            vdisk_path(datastore, name, "/open"),
            Some(req),
        )
        .await
    }

    /// `POST /v1/vdisks/{datastore}/{name}/renew`: extends the write lease.
    pub async fn renew_vdisk(
        &self,
        datastore: &str,
        name: &str,
        req: &SessionRef,
    ) -> Result<Renewed, ApiError> {
        self.call(
            Method::POST,
            vdisk_path(datastore, name, "/renew"),
            Some(req),
        )
        .await
    }

    /// `POST /v1/vdisks/{datastore}/{name}/stale`: records copies that missed writes.
    pub async fn mark_stale(
        &self,
        datastore: &str,
        name: &str,
        req: &MarkStale,
    ) -> Result<Vdisk, ApiError> {
        self.call(
            Method::POST,
            vdisk_path(datastore, name, "/stale"),
            Some(req),
        )
        .await
    }

    /// `POST /v1/vdisks/{datastore}/{name}/clean`: records chunks resynced to a stale copy.
    pub async fn mark_clean(
        &self,
        datastore: &str,
        name: &str,
        req: &MarkClean,
    ) -> Result<Vdisk, ApiError> {
        self.call(
            Method::POST,
            vdisk_path(datastore, name, "/clean"),
            Some(req),
        )
        .await
    }

    /// `POST /v1/vdisks/{datastore}/{name}/activity`: updates the writer's activity log.
    pub async fn mark_active(
        &self,
        datastore: &str,
        name: &str,
        req: &MarkActive,
    ) -> Result<Vdisk, ApiError> {
        self.call(
            Method::POST,
            vdisk_path(datastore, name, "/activity"),
            Some(req),
        )
        .await
    }

    /// `POST /v1/vdisks/{datastore}/{name}/close`: gives the write lease back.
    pub async fn close_vdisk(
        &self,
        datastore: &str,
        name: &str,
        req: &SessionRef,
    ) -> Result<(), ApiError> {
        self.call_empty(
            Method::POST,
            vdisk_path(datastore, name, "/close"),
            Some(req),
        )
        .await
    }

    // ---- transport ----

    /// Sends a request and decodes the JSON answer.
    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let what = format!("{method} {path}");
        let bytes = self.exchange(method, &path, body).await?;
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode { what, source })
    }

    /// Sends a request whose answer has no body.
    async fn call_empty<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: String,
        body: Option<&B>,
    ) -> Result<(), ApiError> {
        self.exchange(method, &path, body).await.map(drop)
    }

    /// Sends a request; answers the body of a 2xx answer, or the error.
    /// Sends it again after a refusal with code `contention` (the update
    /// wrote nothing), [`CONTENTION_TRIES`] times in all, within the call's
    /// timeout.
    async fn exchange<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ApiError> {
        let body = match body {
            None => Bytes::new(),
            Some(body) => serde_json::to_vec(body)
                .map_err(|source| ApiError::Encode {
                    what: format!("{method} {path}"),
                    source,
                })?
                .into(),
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            let request = self.request(method.clone(), path, body.clone())?;
            let (status, bytes) = tokio::time::timeout_at(deadline, self.send(request))
                .await
                .map_err(|_| ApiError::Timeout {
                    url: self.endpoint.url.clone(),
                    after: self.timeout,
                })??;
            if status.is_success() {
                return Ok(bytes);
            }
            let error = refusal(status, &bytes);
            if !error.is_contention() || tries >= CONTENTION_TRIES {
                return Err(error);
            }
            let pause = contention_pause(tries);
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(error);
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// The HTTP request: target, content type, host, bearer token.
    fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        let has_body = !body.is_empty();
        let mut request = Request::builder()
            .method(method)
            .uri(self.endpoint.target(path));
        if has_body {
            request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let mut request = request
            .body(Full::new(body))
            .map_err(|_| ApiError::InvalidUrl {
                url: self.endpoint.url.clone(),
                reason: "it does not form a valid request",
            })?;
        let headers = request.headers_mut();
        if let Ok(host) = HeaderValue::from_str(&self.endpoint.authority) {
            headers.insert(HOST, host);
        }
        if let Ok(auth) = HeaderValue::from_str(&format!("Bearer {}", self.token)) {
            headers.insert(AUTHORIZATION, auth);
        }
        Ok(request)
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), ApiError> {
        let url = &self.endpoint.url;
        let connect_error = |source| ApiError::Connect {
            url: url.clone(),
            source,
        };
        let transport_error = |source| ApiError::Transport {
            url: url.clone(),
            source,
        };
        let stream = TcpStream::connect(&self.endpoint.authority)
            .await
            .map_err(connect_error)?;
        // Management calls are small request/answer exchanges: never wait for Nagle.
        stream.set_nodelay(true).map_err(connect_error)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(transport_error)?;
        // Drives the connection. Its own outcome does not matter: a failure
        // shows in the answer, and once the answer is read it is stopped.
        let driver = tokio::spawn(connection);
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(transport_error)?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|error| match error.downcast::<hyper::Error>() {
                    Ok(error) => transport_error(*error),
                    Err(_) => ApiError::Status {
                        status: status.as_u16(),
                        code: None,
                        message: format!("the answer is larger than {MAX_RESPONSE} bytes"),
                    },
                })?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        drop(sender);
        driver.abort();
        result
    }
}

fn vdisk_path(datastore: &str, name: &str, suffix: &str) -> String {
    format!("/v1/vdisks/{}/{}{suffix}", encode(datastore), encode(name))
}

/// The error of a refusal: its code and explanation are the `code` and
/// `error` fields of the server's JSON answer; without one, there is no
/// code and the explanation is the start of the body, else the status's
/// reason phrase.
fn refusal(status: StatusCode, body: &[u8]) -> ApiError {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => (parsed.code, parsed.error),
        Err(_) => (None, error_text(status, body)),
    };
    ApiError::refused(status.as_u16(), code, message)
}

/// The start of a body that is not the API's JSON, else the status's reason
/// phrase.
fn error_text(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status
            .canonical_reason()
            .unwrap_or("no explanation")
            .to_owned();
    }
    text.chars().take(200).collect()
}

/// The pause after the `tries`-th refusal for contention:
/// [`CONTENTION_PAUSE`] doubled per earlier try, times a random factor
/// between 0.5 and 1.5 so that the contenders do not come back together.
fn contention_pause(tries: u32) -> Duration {
    let base = CONTENTION_PAUSE * 2u32.saturating_pow(tries.saturating_sub(1));
    // The last 32 bits of a v4 uuid are random (the OS generator).
    let random = Uuid::new_v4().as_u128() as u32;
    base.mul_f64(0.5 + f64::from(random) / f64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The `(status, code, message)` of a refusal that is a `Status`.
    fn status_of(error: ApiError) -> (u16, Option<String>, String) {
        match error {
            ApiError::Status {
                status,
                code,
                message,
            } => (status, code, message),
            other => panic!("not a Status: {other:?}"),
        }
    }

    #[test]
    fn refusals_carry_the_code_and_message_of_the_body() {
        let e = refusal(
            StatusCode::NOT_FOUND,
            br#"{"error":"vDisk a/b does not exist","code":"not_found"}"#,
        );
        assert!(e.is_not_found() && !e.is_lease_lost() && !e.is_contention());
        assert_eq!(
            status_of(e),
            (
                404,
                Some("not_found".into()),
                "vDisk a/b does not exist".into()
            )
        );

        let e = refusal(
            StatusCode::CONFLICT,
            b"{\"error\":\"lease lost: vDisk a/b is not open\",\"code\":\"lease_lost\"}\n",
        );
        assert!(
            matches!(&e, ApiError::LeaseLost { message } if message == "lease lost: vDisk a/b is not open"),
            "{e:?}"
        );
        assert!(e.is_lease_lost() && e.is_conflict() && !e.is_not_found());
        assert_eq!((e.status(), e.code()), (Some(409), Some("lease_lost")));
        assert_eq!(
            e.to_string(),
            "lease lost: vDisk a/b is not open (HTTP 409)"
        );

        let e = refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"vDisk a/b is being changed by others too often; try again","code":"contention"}"#,
        );
        assert!(e.is_contention() && !e.is_lease_lost() && !e.is_conflict());
        assert_eq!((e.status(), e.code()), (Some(503), Some("contention")));

        let e = refusal(
            StatusCode::CONFLICT,
            br#"{"error":"disk x still misses 2 chunks of vDisk a/b","code":"still_dirty"}"#,
        );
        assert!(e.is_still_dirty() && e.is_conflict() && !e.is_lease_lost());

        // An unknown route is no missing object; unknown fields are ignored.
        let e = refusal(
            StatusCode::NOT_FOUND,
            br#"{"error":"no such route","code":"no_route","more":1}"#,
        );
        assert!(!e.is_not_found(), "{e:?}");
        assert_eq!(e.code(), Some("no_route"));
    }

    #[test]
    fn refusals_without_a_code_are_status_without_one() {
        // A server from before error codes.
        let e = refusal(
            StatusCode::CONFLICT,
            br#"{"error":"lease lost: vDisk a/b is not open"}"#,
        );
        assert!(!e.is_lease_lost() && e.is_conflict());
        assert_eq!(
            status_of(e),
            (409, None, "lease lost: vDisk a/b is not open".into())
        );
        let e = refusal(
            StatusCode::NOT_FOUND,
            br#"{"error":"vDisk a/b does not exist"}"#,
        );
        assert!(e.is_not_found(), "a 404 without a code is a missing object");
        assert_eq!(e.to_string(), "vDisk a/b does not exist (HTTP 404)");

        // Not the API's JSON.
        assert_eq!(
            status_of(refusal(StatusCode::BAD_GATEWAY, b"  upstream down\n")),
            (502, None, "upstream down".into())
        );
        assert_eq!(
            status_of(refusal(StatusCode::NOT_FOUND, b"")),
            (404, None, "Not Found".into())
        );
        assert_eq!(
            status_of(refusal(StatusCode::CONFLICT, br#"{"error":"x","code":7}"#)),
            (409, None, r#"{"error":"x","code":7}"#.into())
        );
        for error in [
            ApiError::Timeout {
                url: "u".into(),
                after: Duration::from_secs(1),
            },
            ApiError::InvalidUrl {
                url: "u".into(),
                reason: "r",
            },
        ] {
            assert_eq!((error.status(), error.code()), (None, None));
            assert!(!error.is_lease_lost() && !error.is_not_found() && !error.is_contention());
        }
    }

    #[test]
    fn contention_pauses_grow_and_stay_near_a_second_in_all() {
        for _ in 0..100 {
            let pauses: Vec<Duration> = (1..CONTENTION_TRIES).map(contention_pause).collect();
            for (i, pause) in pauses.iter().enumerate() {
                let base = CONTENTION_PAUSE * (1 << i);
                assert!(
                    *pause >= base / 2 && *pause <= base * 3 / 2,
                    "{i}: {pause:?}"
                );
            }
            let total: Duration = pauses.iter().sum();
            assert!(total <= Duration::from_millis(1125), "{total:?}");
        }
    }

    /// A server answering its connections in turn with `answers` (status
    /// line and JSON body; the last one repeated), counting them.
    async fn scripted(answers: Vec<(&'static str, &'static str)>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let (status, body) = answers[n.min(answers.len() - 1)];
                // Requests without a body: the head ends the request.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(len) => head.extend_from_slice(&buf[..len]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        (url, served)
    }

    const CONTENDED: (&str, &str) = (
        "503 Service Unavailable",
        r#"{"error":"vDisk a/b is being changed by others too often; try again","code":"contention"}"#,
    );

    #[tokio::test]
    async fn contention_is_retried_until_the_request_goes_through() {
        let (url, served) = scripted(vec![CONTENDED, CONTENDED, ("204 No Content", "")]).await;
        let client = ApiClient::new(&url, "t".into()).expect("valid");
        client
            .delete_vdisk("a", "b", false)
            .await
            .expect("the third try goes through");
        assert_eq!(served.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn contention_is_returned_after_the_last_try() {
        let (url, served) = scripted(vec![CONTENDED]).await;
        let client = ApiClient::new(&url, "t".into()).expect("valid");
        let started = std::time::Instant::now();
        let error = client
            .delete_vdisk("a", "b", false)
            .await
            .expect_err("always contended");
        assert!(error.is_contention(), "{error:?}");
        assert_eq!(served.load(Ordering::SeqCst), CONTENTION_TRIES as usize);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(375) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn contention_retries_stop_at_the_timeout() {
        let (url, served) = scripted(vec![CONTENDED]).await;
        let client = ApiClient::new(&url, "t".into())
            .expect("valid")
            .with_timeout(Duration::from_millis(120));
        let error = client
            .delete_vdisk("a", "b", false)
            .await
            .expect_err("always contended");
        assert!(error.is_contention(), "{error:?}");
        assert!(served.load(Ordering::SeqCst) < CONTENTION_TRIES as usize);
    }

    #[tokio::test]
    async fn other_refusals_are_not_retried() {
        for answer in [
            (
                "409 Conflict",
                r#"{"error":"lease lost: vDisk a/b is not open","code":"lease_lost"}"#,
            ),
            (
                "503 Service Unavailable",
                r#"{"error":"the zone metadata store failed","code":"store_unavailable"}"#,
            ),
            ("503 Service Unavailable", r#"{"error":"old server"}"#),
        ] {
            let (url, served) = scripted(vec![answer, ("204 No Content", "")]).await;
            let client = ApiClient::new(&url, "t".into()).expect("valid");
            let error = client
                .delete_vdisk("a", "b", false)
                .await
                .expect_err("refused");
            assert_eq!(
                error.status(),
                Some(answer.0[..3].parse().expect("a status"))
            );
            assert_eq!(served.load(Ordering::SeqCst), 1, "{answer:?}");
        }
    }

    #[test]
    fn vdisk_paths_are_encoded() {
        assert_eq!(vdisk_path("ds", "a b", "/open"), "/v1/vdisks/ds/a%20b/open");
    }

    #[test]
    fn the_token_is_not_printed() {
        let client = ApiClient::new("http://127.0.0.1:1", "secret".into()).expect("valid");
        assert!(!format!("{client:?}").contains("secret"));
    }

    #[test]
    fn token_files_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("api-token");
        assert!(matches!(
            ApiClient::from_token_file("http://127.0.0.1:1", &path),
            Err(ApiError::TokenFile { .. })
        ));
        std::fs::write(&path, "\n").expect("write");
        assert!(matches!(
            ApiClient::from_token_file("http://127.0.0.1:1", &path),
            Err(ApiError::TokenFile { .. })
        ));
        std::fs::write(&path, "abc\n").expect("write");
        let client = ApiClient::from_token_file("http://127.0.0.1:1", &path).expect("read");
        assert_eq!(client.token, "abc");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_connect_error() {
        // Bind then drop a listener: the port is closed.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let client =
            ApiClient::new(&format!("http://127.0.0.1:{port}"), "t".into()).expect("valid");
        let error = client.zone().await.expect_err("nothing listens");
        assert!(matches!(error, ApiError::Connect { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!("cannot reach the Tessera API at http://127.0.0.1:{port}")
        );
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _hold = tokio::spawn(async move {
            let (_socket, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let client = ApiClient::new(&format!("http://{addr}"), "t".into())
            .expect("valid")
            .with_timeout(Duration::from_millis(200));
        assert!(matches!(client.zone().await, Err(ApiError::Timeout { .. })));
    }

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let client = ApiClient::new("http://127.0.0.1:1", "t".into()).expect("valid");
        assert_send(&client.zone());
        assert_send(&client.open_vdisk(
            "a",
            "b",
            &OpenVdisk {
                host: "h".into(),
                ttl_ms: 1,
                force: false,
                role: None,
                repair: false,
            },
        ));
        assert_send(&client.delete_vdisk("a", "b", true));
    }
}
