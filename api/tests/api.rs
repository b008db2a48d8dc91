//! The API server driven over real HTTP: by the client for every route, and
//! by raw requests for malformed input; the codes of error answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tessera_api::{start, ApiConfig, ApiServer};
use tessera_api_client::{ApiClient, ApiError};
use tessera_zone::records::{NodeState, Redundancy, Role, VdiskState};
use tessera_zone::service::{
    CopyUsage, CreateDatastore, CreateVdisk, Health, Heartbeat, MarkClean, MarkStale, OpenVdisk,
    RegisterDisk, RegisterNode, SessionRef, ZoneService, MAX_VDISK_SIZE,
};
use tessera_zone::sled_store::SledStore;
use tessera_zone::testing::Contended;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

async fn server(dir: &tempfile::TempDir) -> ApiServer {
    let config = ApiConfig::new(
        dir.path().join("api"),
        "127.0.0.1:0".parse().expect("an address"),
        "test",
    );
    start(config).await.expect("the server starts")
}

fn client(server: &ApiServer) -> ApiClient {
    ApiClient::from_token_file(&format!("http://{}", server.addr), &server.token_path)
        .expect("a client")
}

fn registration(n: u128) -> RegisterNode {
    RegisterNode {
        uuid: Uuid::from_u128(n),
        host: format!("hv{n}"),
        addr: format!("127.0.0.{n}:7000"),
        socket: None,
        disks: vec![RegisterDisk {
            uuid: Uuid::from_u128(100 + n),
            path: "/dev/vdb".into(),
            capacity: 1 << 40,
            used: 0,
        }],
        protocol: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_drives_every_route() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = server(&dir).await;
    let api = client(&server);

    let zone = api.zone().await.expect("zone");
    assert_eq!(zone.name, "test");

    let mut leases = Vec::new();
    for n in 1..=3 {
        let registered = api.register_node(&registration(n)).await.expect("register");
        assert_eq!(registered.zone, zone.uuid);
        leases.push(registered.lease);
    }
    let nodes = api.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n.state == NodeState::Up));
    assert_eq!(
        api.hosts().await.expect("hosts")[0].roles,
        vec![Role::BackEnd]
    );
    assert_eq!(api.disks().await.expect("disks").len(), 3);

    let ds = api
        .create_datastore(&CreateDatastore {
            name: "ds".into(),
            mirrors: 2,
            stripes: Some(2),
            disks: None,
        })
        .await
        .expect("create datastore");
    assert_eq!(ds.policy.redundancy, Redundancy::Mirror { copies: 2 });
    let view = api.datastore("ds").await.expect("datastore");
    assert_eq!(view.datastore, ds);
    assert_eq!(view.space.capacity, 3 << 40);
    assert_eq!(view.space.writable, (3 << 40) / 2);
    assert!(view.space.warnings.is_empty());
    assert_eq!(
        api.datastores()
            .await
            .expect("datastores")
            .into_iter()
            .map(|v| v.datastore)
            .collect::<Vec<_>>(),
        vec![ds.clone()]
    );
    let error = api
        .create_datastore(&CreateDatastore {
            name: "ds".into(),
            mirrors: 2,
            stripes: None,
            disks: None,
        })
        .await
        .expect_err("exists");
    assert!(
        matches!(&error, ApiError::Status { status: 409, code: Some(code), message } if code == "already_exists" && message == "datastore 'ds' already exists"),
        "{error}"
    );
    let error = api
        .create_datastore(&CreateDatastore {
            name: "big".into(),
            mirrors: 4,
            stripes: None,
            disks: None,
        })
        .await
        .expect_err("too few nodes");
    assert_eq!(error.to_string(), "datastore 'big' needs 4 nodes for mirrors=4; the zone has 3 nodes with disks up (HTTP 409)");

    let vdisk = api
        .create_vdisk(&CreateVdisk {
            datastore: "ds".into(),
            name: "vm1".into(),
            size: 1 << 30,
        })
        .await
        .expect("create vdisk");
    assert_eq!(vdisk.note, None, "a vDisk that fits has no note");
    let vdisk = vdisk.vdisk;
    assert_eq!((vdisk.epoch, vdisk.state.clone()), (0, VdiskState::Offline));
    let view = api.vdisk("ds", "vm1").await.expect("vdisk");
    assert_eq!(
        (view.vdisk.clone(), view.health),
        (vdisk.clone(), Health::Healthy)
    );
    assert_eq!(api.vdisks(None).await.expect("vdisks").len(), 1);
    assert_eq!(api.vdisks(Some("ds")).await.expect("vdisks").len(), 1);
    assert!(api
        .vdisks(Some("nope"))
        .await
        .expect_err("no datastore")
        .is_not_found());
    assert_eq!(
        api.resize_vdisk("ds", "vm1", 2 << 30)
            .await
            .expect("resize")
            .size,
        2 << 30
    );
    let error = api
        .resize_vdisk("ds", "vm1", 1 << 30)
        .await
        .expect_err("shrink");
    assert!(
        matches!(&error, ApiError::Status { status: 400, code: Some(code), message } if code == "invalid" && message == "shrinking a vDisk is not supported")
    );
    // Sizes over the limit are refused, saying the limit.
    let too_big = format!(
        "a vDisk may be at most 64 TiB ({MAX_VDISK_SIZE} bytes), not {} bytes",
        MAX_VDISK_SIZE + 512
    );
    let error = api
        .resize_vdisk("ds", "vm1", MAX_VDISK_SIZE + 512)
        .await
        .expect_err("too big");
    assert!(
        matches!(&error, ApiError::Status { status: 400, code: Some(code), message } if code == "invalid" && *message == too_big),
        "{error}"
    );
    let error = api
        .create_vdisk(&CreateVdisk {
            datastore: "ds".into(),
            name: "huge".into(),
            size: MAX_VDISK_SIZE + 512,
        })
        .await
        .expect_err("too big");
    assert!(
        matches!(&error, ApiError::Status { status: 400, code: Some(code), message } if code == "invalid" && *message == too_big),
        "{error}"
    );

    let hb = Heartbeat {
        lease: leases[0],
        disks: vec![],
        vdisks: vec![vdisk.uuid, Uuid::from_u128(9)],
        copies: vec![],
        usage: None,
        freed_groups: Vec::new(),
    };
    assert_eq!(
        api.heartbeat(Uuid::from_u128(1), &hb)
            .await
            .expect("heartbeat")
            .orphans,
        vec![Uuid::from_u128(9)]
    );
    let stale = Heartbeat {
        lease: 999_999,
        disks: vec![],
        vdisks: vec![],
        copies: vec![],
        usage: None,
        freed_groups: Vec::new(),
    };
    assert!(api
        .heartbeat(Uuid::from_u128(1), &stale)
        .await
        .expect_err("a stale lease")
        .is_not_found());

    let opened = api
        .open_vdisk(
            "ds",
            "vm1",
            &OpenVdisk {
                host: "hv1".into(),
                ttl_ms: 60_000,
                force: false,
                role: None,
                repair: false,
            },
        )
        .await
        .expect("open");
    assert_eq!(opened.epoch, 1);
    assert_eq!(opened.nodes.len(), opened.disks.len());
    let error = api
        .open_vdisk(
            "ds",
            "vm1",
            &OpenVdisk {
                host: "hv2".into(),
                ttl_ms: 60_000,
                force: false,
                role: None,
                repair: false,
            },
        )
        .await
        .expect_err("open elsewhere");
    assert_eq!(
        error.to_string(),
        "vDisk ds/vm1 is open on host hv1 (HTTP 409)"
    );
    let lease = api
        .renew_vdisk(
            "ds",
            "vm1",
            &SessionRef {
                session: opened.session,
                ttl_ms: Some(30_000),
                keep_activity: false,
                settled: None,
            },
        )
        .await
        .expect("renew");
    assert_eq!(lease.lease.session, opened.session);
    assert!(api
        .delete_vdisk("ds", "vm1", false)
        .await
        .expect_err("open")
        .is_conflict());
    api.close_vdisk(
        "ds",
        "vm1",
        &SessionRef {
            session: opened.session,
            ttl_ms: None,
            keep_activity: false,
            settled: None,
        },
    )
    .await
    .expect("close");
    assert_eq!(
        api.vdisk("ds", "vm1").await.expect("vdisk").vdisk.state,
        VdiskState::Offline
    );

    assert!(api
        .delete_datastore("ds")
        .await
        .expect_err("not empty")
        .is_conflict());
    api.open_vdisk(
        "ds",
        "vm1",
        &OpenVdisk {
            host: "hv1".into(),
            ttl_ms: 60_000,
            force: false,
            role: None,
            repair: false,
        },
    )
    .await
    .expect("open");
    api.delete_vdisk("ds", "vm1", true)
        .await
        .expect("forced delete");
    assert!(api
        .vdisk("ds", "vm1")
        .await
        .expect_err("gone")
        .is_not_found());
    api.delete_datastore("ds").await.expect("delete datastore");
    assert!(api.datastore("ds").await.expect_err("gone").is_not_found());

    // Names that need escaping reach the server intact, and are refused there.
    let error = api.vdisk("d s", "a/b").await.expect_err("bad names");
    assert_eq!(error.status(), Some(400), "{error}");

    server.shutdown().await.expect("a clean shutdown");
}

#[tokio::test]
async fn state_and_token_survive_a_restart() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let first = server(&dir).await;
    let api = client(&first);
    let zone = api.zone().await.expect("zone");
    api.register_node(&registration(1)).await.expect("register");
    api.create_datastore(&CreateDatastore {
        name: "ds".into(),
        mirrors: 1,
        stripes: None,
        disks: None,
    })
    .await
    .expect("datastore");
    let token = std::fs::read_to_string(&first.token_path).expect("the token file");
    first.shutdown().await.expect("shutdown");
    // Let the store's reaper task notice and release the database.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let second = server(&dir).await;
    assert_eq!(
        std::fs::read_to_string(&second.token_path).expect("the token file"),
        token
    );
    let api = client(&second);
    assert_eq!(api.zone().await.expect("zone"), zone);
    assert_eq!(
        api.datastore("ds").await.expect("datastore").datastore.name,
        "ds"
    );
    assert_eq!(api.nodes().await.expect("nodes").len(), 1);
    second.shutdown().await.expect("shutdown");
}

/// An answer to a raw request.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

/// Sends `head` (request line and headers, without the final blank line),
/// `Content-Length`, `Connection: close` and `body`; reads the whole answer.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> Raw {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut request = format!(
            "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        // The server may answer (413) and close before reading everything.
        let _ = stream.write_all(&request).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the server answers in time");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn token(server: &ApiServer) -> String {
    std::fs::read_to_string(&server.token_path)
        .expect("the token file")
        .trim()
        .to_owned()
}

/// Asserts a JSON error answer of one line with this status and code;
/// answers its message.
fn assert_error(answer: &Raw, status: u16, code: &str) -> String {
    assert_eq!(answer.status, status, "{answer:?}");
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer:?}"
    );
    assert_eq!(
        answer.body.trim_end().lines().count(),
        1,
        "one line: {answer:?}"
    );
    let value: serde_json::Value = serde_json::from_str(&answer.body).expect("a JSON body");
    assert_eq!(value["code"].as_str(), Some(code), "{answer:?}");
    value["error"].as_str().expect("an error field").to_owned()
}

#[tokio::test]
async fn malformed_requests_get_json_4xx_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = server(&dir).await;
    let addr = server.addr;
    let auth = format!("Authorization: Bearer {}", token(&server));
    let json = "Content-Type: application/json";
    let post = |path: &str| format!("POST {path} HTTP/1.1\r\n{auth}\r\n{json}");

    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        (
            "garbage",
            post("/v1/datastores"),
            b"\x00\xff garbage".to_vec(),
            400,
        ),
        (
            "truncated",
            post("/v1/datastores"),
            br#"{"name":"ds","mirr"#.to_vec(),
            400,
        ),
        (
            "wrong types",
            post("/v1/datastores"),
            br#"{"name":5,"mirrors":"two"}"#.to_vec(),
            400,
        ),
        (
            "negative",
            post("/v1/datastores"),
            br#"{"name":"ds","mirrors":-1}"#.to_vec(),
            400,
        ),
        (
            "huge integer",
            post("/v1/vdisks"),
            br#"{"datastore":"ds","name":"x","size":184467440737095516160}"#.to_vec(),
            400,
        ),
        (
            "huge float",
            post("/v1/vdisks"),
            br#"{"datastore":"ds","name":"x","size":1e400}"#.to_vec(),
            400,
        ),
        (
            "unknown field",
            post("/v1/datastores"),
            br#"{"name":"ds","mirrors":1,"colour":"red"}"#.to_vec(),
            400,
        ),
        (
            "missing field",
            post("/v1/vdisks"),
            br#"{"datastore":"ds"}"#.to_vec(),
            400,
        ),
        ("not an object", post("/v1/nodes"), b"[1,2,3]".to_vec(), 400),
        ("empty body", post("/v1/vdisks/ds/x/open"), Vec::new(), 400),
        (
            "deep nesting",
            post("/v1/datastores"),
            [b"[".repeat(100_000), b"]".repeat(100_000)].concat(),
            400,
        ),
        (
            "missing content type",
            format!("POST /v1/datastores HTTP/1.1\r\n{auth}"),
            br#"{"name":"ds","mirrors":1}"#.to_vec(),
            400,
        ),
        (
            "wrong content type",
            format!("POST /v1/datastores HTTP/1.1\r\n{auth}\r\nContent-Type: text/plain"),
            br#"{"name":"ds","mirrors":1}"#.to_vec(),
            400,
        ),
        (
            "bad uuid in path",
            post("/v1/nodes/not-a-uuid/heartbeat"),
            br#"{"lease":1}"#.to_vec(),
            400,
        ),
        (
            "bad query",
            format!("DELETE /v1/vdisks/ds/x?force=maybe HTTP/1.1\r\n{auth}"),
            Vec::new(),
            400,
        ),
        (
            "unknown query",
            format!("GET /v1/vdisks?colour=red HTTP/1.1\r\n{auth}"),
            Vec::new(),
            400,
        ),
        (
            "missing token",
            "GET /v1/zone HTTP/1.1".to_owned(),
            Vec::new(),
            401,
        ),
        (
            "bad token",
            "GET /v1/zone HTTP/1.1\r\nAuthorization: Bearer 0123".to_owned(),
            Vec::new(),
            401,
        ),
        (
            "not bearer",
            "GET /v1/zone HTTP/1.1\r\nAuthorization: Basic YTpi".to_owned(),
            Vec::new(),
            401,
        ),
        (
            "unknown route",
            format!("GET /v2/zone HTTP/1.1\r\n{auth}"),
            Vec::new(),
            404,
        ),
        (
            "unknown object",
            format!("GET /v1/datastores/nope HTTP/1.1\r\n{auth}"),
            Vec::new(),
            404,
        ),
        (
            "wrong method",
            format!("PUT /v1/zone HTTP/1.1\r\n{auth}"),
            Vec::new(),
            405,
        ),
        (
            "wrong method on healthz",
            "POST /healthz HTTP/1.1".to_owned(),
            Vec::new(),
            405,
        ),
        (
            "too large",
            post("/v1/datastores"),
            vec![b' '; (1 << 20) + 4096],
            413,
        ),
    ];
    for (name, head, body, status) in cases {
        let code = match (status, name) {
            (400, _) => "invalid",
            (401, _) => "unauthorized",
            (404, "unknown route") => "no_route",
            (404, _) => "not_found",
            (405, _) => "method_not_allowed",
            (413, _) => "too_large",
            _ => unreachable!("{name}: {status}"),
        };
        let answer = raw(addr, &head, &body).await;
        let message = assert_error(&answer, status, code);
        assert!(!message.is_empty(), "{name}: an explanation");
        println!("{name}: {status} {code} {message}");
    }

    let health = raw(addr, "GET /healthz HTTP/1.1", b"").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    let zone = raw(addr, &format!("GET /v1/zone HTTP/1.1\r\n{auth}"), b"").await;
    assert_eq!(zone.status, 200, "the server still serves: {zone:?}");
    let unauthorized = raw(addr, "GET /v1/zone HTTP/1.1", b"").await;
    assert!(unauthorized
        .head
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    server.shutdown().await.expect("shutdown");
}

const POST_ROUTES: &[&str] = &[
    "/v1/nodes",
    "/v1/nodes/00000000-0000-0000-0000-000000000001/heartbeat",
    "/v1/datastores",
    "/v1/vdisks",
    "/v1/vdisks/ds/vd/resize",
    "/v1/vdisks/ds/vd/open",
    "/v1/vdisks/ds/vd/renew",
    "/v1/vdisks/ds/vd/close",
];

#[test]
fn arbitrary_bodies_get_a_4xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = runtime.block_on(server(&dir));
    let addr = server.addr;
    let auth = format!("Authorization: Bearer {}", token(&server));

    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let strategy = (
        0..POST_ROUTES.len(),
        proptest::collection::vec(any::<u8>(), 0..512),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(route, body, typed)| {
            let content_type = if typed {
                "\r\nContent-Type: application/json"
            } else {
                ""
            };
            let head = format!(
                "POST {} HTTP/1.1\r\n{auth}{content_type}",
                POST_ROUTES[route]
            );
            let answer = runtime.block_on(raw(addr, &head, &body));
            prop_assert!(
                (400..500).contains(&answer.status),
                "{:?} → {answer:?}",
                String::from_utf8_lossy(&body)
            );
            let value = serde_json::from_str::<serde_json::Value>(&answer.body);
            prop_assert!(
                value.is_ok_and(|v| v["error"].is_string() && v["code"].is_string()),
                "a JSON error with a code: {answer:?}"
            );
            Ok(())
        })
        .expect("every arbitrary body is refused with a 4xx");

    let zone = runtime.block_on(raw(addr, &format!("GET /v1/zone HTTP/1.1\r\n{auth}"), b""));
    assert_eq!(zone.status, 200);
    runtime.block_on(server.shutdown()).expect("shutdown");
}

const TOKEN: &str = "0123456789abcdef";

/// An API server over a store whose records can be made to lose their
/// compare-and-swaps, as under heavy concurrent updates.
async fn contended_server() -> (SocketAddr, Arc<Contended<SledStore>>) {
    let store = Arc::new(Contended::new(
        SledStore::temporary().expect("a store"),
        "/tessera/",
    ));
    let service = ZoneService::new(store.clone());
    service.ensure_zone("test").await.expect("the zone");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("an address");
    let app = tessera_api::routes::router(service, Arc::from(TOKEN));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, store)
}

fn open_req(host: &str, force: bool) -> OpenVdisk {
    OpenVdisk {
        host: host.into(),
        ttl_ms: 60_000,
        force,
        role: None,
        repair: false,
    }
}

fn renew(session: Uuid, ttl_ms: u64) -> SessionRef {
    SessionRef {
        session,
        ttl_ms: Some(ttl_ms),
        keep_activity: false,
        settled: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_loss_still_dirty_and_contention_answer_their_codes() {
    let (addr, store) = contended_server().await;
    let api = ApiClient::new(&format!("http://{addr}"), TOKEN.into()).expect("a client");
    api.register_node(&registration(1)).await.expect("register");
    api.create_datastore(&CreateDatastore {
        name: "ds".into(),
        mirrors: 1,
        stripes: None,
        disks: None,
    })
    .await
    .expect("datastore");
    let vdisk = api
        .create_vdisk(&CreateVdisk {
            datastore: "ds".into(),
            name: "vm1".into(),
            size: 1 << 30,
        })
        .await
        .expect("vdisk")
        .vdisk;
    let disk = vdisk.placement.groups[0][0];
    let a = api
        .open_vdisk("ds", "vm1", &open_req("hv1", false))
        .await
        .expect("open");
    let b = api
        .open_vdisk("ds", "vm1", &open_req("hv2", true))
        .await
        .expect("take over");

    // The session that was taken over: lease_lost, as its own variant.
    let error = api
        .renew_vdisk("ds", "vm1", &renew(a.session, 30_000))
        .await
        .expect_err("taken over");
    assert!(
        matches!(&error, ApiError::LeaseLost { message } if message == "lease lost: vDisk ds/vm1 was taken over by host hv2"),
        "{error:?}"
    );
    assert_eq!(
        (error.status(), error.code(), error.is_lease_lost()),
        (Some(409), Some("lease_lost"), true)
    );
    let error = api
        .mark_stale(
            "ds",
            "vm1",
            &MarkStale {
                session: a.session,
                disks: vec![disk],
                chunks: vec![1],
            },
        )
        .await
        .expect_err("taken over");
    assert!(error.is_lease_lost(), "{error:?}");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let post =
        |path: &str| format!("POST {path} HTTP/1.1\r\n{auth}\r\nContent-Type: application/json");
    let stranger = format!(r#"{{"session":"{}"}}"#, Uuid::new_v4());
    let answer = raw(addr, &post("/v1/vdisks/ds/vm1/renew"), stranger.as_bytes()).await;
    assert_eq!(
        assert_error(&answer, 409, "lease_lost"),
        "lease lost: vDisk ds/vm1 was taken over by host hv2"
    );

    // Other 409s are no lease loss: the volume client must not be fenced by them.
    let error = api
        .open_vdisk("ds", "vm1", &open_req("hv3", false))
        .await
        .expect_err("open elsewhere");
    assert_eq!(
        (error.status(), error.code()),
        (Some(409), Some("conflict"))
    );
    assert!(!error.is_lease_lost());
    api.mark_stale(
        "ds",
        "vm1",
        &MarkStale {
            session: b.session,
            disks: vec![disk],
            chunks: vec![1, 2],
        },
    )
    .await
    .expect("stale");
    let error = api
        .mark_clean(
            "ds",
            "vm1",
            &MarkClean {
                session: b.session,
                disk,
                chunks: vec![1],
                complete: true,
            },
        )
        .await
        .expect_err("chunk 2 is still dirty");
    assert!(
        error.is_still_dirty() && !error.is_lease_lost(),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("disk {disk} still misses 1 chunks of vDisk ds/vm1 (HTTP 409)")
    );

    // Contention: 503 with its code; the client tries 5 times before it
    // gives up, each try being a full compare-and-swap loop on the server.
    store.lose(u64::MAX);
    let body = format!(r#"{{"session":"{}","ttl_ms":20000}}"#, b.session);
    let answer = raw(addr, &post("/v1/vdisks/ds/vm1/renew"), body.as_bytes()).await;
    assert_eq!(
        assert_error(&answer, 503, "contention"),
        "vDisk ds/vm1 is being changed by others too often; try again"
    );
    let before = store.attempts();
    let error = api
        .renew_vdisk("ds", "vm1", &renew(b.session, 21_000))
        .await
        .expect_err("always contended");
    assert!(error.is_contention() && !error.is_lease_lost(), "{error:?}");
    assert_eq!(error.status(), Some(503));
    // Each try is a compare-and-swap loop of 64 attempts on the server.
    let tries = (store.attempts() - before) / 64;
    assert_eq!(tries, 5, "the client tried 5 times");

    // Contention that ends: the client's next try goes through.
    store.lose(64);
    let renewed = api
        .renew_vdisk("ds", "vm1", &renew(b.session, 22_000))
        .await
        .expect("the second try goes through");
    assert_eq!(renewed.lease.ttl_ms, 22_000);
}

/// Nodes report the space each copy takes and how full their disks are;
/// the API says it per copy, per datastore (with warnings before a disk or
/// the datastore fills), and notes a vDisk created larger than the
/// datastore can still write (thin: allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_is_reported_per_copy_and_datastores_warn_before_they_fill() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = server(&dir).await;
    let api = client(&server);
    let mut leases = Vec::new();
    for n in 1..=2 {
        let mut reg = registration(n);
        reg.disks[0].capacity = 10 << 30;
        leases.push(api.register_node(&reg).await.expect("register").lease);
    }
    api.create_datastore(&CreateDatastore {
        name: "ds".into(),
        mirrors: 2,
        stripes: None,
        disks: None,
    })
    .await
    .expect("datastore");
    let small = api
        .create_vdisk(&CreateVdisk {
            datastore: "ds".into(),
            name: "small".into(),
            size: 1 << 30,
        })
        .await
        .expect("vdisk");
    assert_eq!(small.note, None);
    let big = api
        .create_vdisk(&CreateVdisk {
            datastore: "ds".into(),
            name: "big".into(),
            size: 1 << 40,
        })
        .await
        .expect("a vDisk larger than the free space is created (thin)");
    let note = big.note.expect("a note");
    assert!(note.contains("thin"), "{note}");

    // Before any report: the copies' space is not known.
    let view = api.vdisk("ds", "big").await.expect("vdisk");
    assert_eq!(view.space.len(), 2);
    assert!(view.space.iter().all(|c| c.used.is_none()));

    // Node 1's disk is 92% full, 5 GiB of it for "big"; node 2's 20%.
    let report = |n: u128, used: u64, big_bytes: u64| Heartbeat {
        lease: leases[n as usize - 1],
        disks: vec![RegisterDisk {
            uuid: Uuid::from_u128(100 + n),
            path: "/dev/vdb".into(),
            capacity: 10 << 30,
            used,
        }],
        vdisks: vec![],
        copies: vec![],
        usage: Some(vec![CopyUsage {
            disk: Uuid::from_u128(100 + n),
            vdisk: big.vdisk.uuid,
            bytes: big_bytes,
        }]),
        freed_groups: Vec::new(),
    };
    api.heartbeat(Uuid::from_u128(1), &report(1, 9_500 << 20, 5 << 30))
        .await
        .expect("heartbeat");
    api.heartbeat(Uuid::from_u128(2), &report(2, 2 << 30, 5 << 30))
        .await
        .expect("heartbeat");
    let view = api.vdisk("ds", "big").await.expect("vdisk");
    assert_eq!(
        view.space.iter().map(|c| c.used).collect::<Vec<_>>(),
        vec![Some(5 << 30); 2]
    );
    let small = api.vdisk("ds", "small").await.expect("vdisk");
    assert!(small.space.iter().all(|c| c.used == Some(0)));
    let ds = api.datastore("ds").await.expect("datastore");
    assert_eq!(ds.space.capacity, 20 << 30);
    assert_eq!(ds.space.used, (9_500 << 20) + (2 << 30));
    assert_eq!(ds.space.fullest_disk_percent, 92);
    assert_eq!(ds.space.warnings.len(), 1, "{:?}", ds.space.warnings);
    assert!(
        ds.space.warnings[0].contains("92% full"),
        "{:?}",
        ds.space.warnings
    );
    // Both disks nearly full: the datastore warns as a whole too.
    api.heartbeat(Uuid::from_u128(2), &report(2, 9 << 30, 5 << 30))
        .await
        .expect("heartbeat");
    let ds = &api.datastores().await.expect("datastores")[0];
    assert_eq!(ds.space.warnings.len(), 3, "{:?}", ds.space.warnings);
    assert!(
        ds.space.warnings[0].contains("datastore 'ds' is 91% full"),
        "{:?}",
        ds.space.warnings
    );
}
