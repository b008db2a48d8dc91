//! Malformed wire messages and API bodies never take a process down: the
//! node drops the offending connection and keeps serving everyone else; the
//! API answers 4xx with a one-line JSON error.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use tessera_proto::{ChunkRange, Header, Opcode, Request, HEADER_LEN, MAX_BODY};
use tessera_tests::{pattern, TestZone};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

/// Sends `bytes` and expects the node to close the connection.
async fn expect_dropped(addr: &str, bytes: &[u8]) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    if bytes.len() < HEADER_LEN {
        // Fewer bytes than a header may just be a slow sender: hang up so
        // the node sees the frame cut short.
        let _ = s.shutdown().await;
    }
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // replies to well-formed frames before the bad one
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "node kept a connection that sent garbage open"
    );
}

fn with_crc(mut h: [u8; HEADER_LEN]) -> [u8; HEADER_LEN] {
    let crc = tessera_crc::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_drops_malformed_connections_and_keeps_serving() {
    let zone = TestZone::start(1, 64 * MIB).await;
    zone.datastore("ds", 1).await;
    zone.vdisk("ds", "v", 4 * MIB).await;
    let vol = zone.open("ds", "v").await;
    let data = pattern(1, 0, 8192);
    vol.write(0, &data).await.unwrap();
    let addr = zone.nodes[0].listen.to_string();

    let range = ChunkRange {
        vdisk: [1; 16],
        disk: [2; 16],
        chunk: 0,
        offset: 0,
        len: 512,
        epoch: 1,
    };
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Bad magic.
    cases.push(vec![0xAB; HEADER_LEN + 8]);
    // Header checksum wrong.
    let mut h = Header::request(Opcode::Read, 1, ChunkRange::LEN as u32, 0).encode();
    h[28] ^= 1;
    cases.push(h.to_vec());
    // Body larger than the limit.
    let mut h = Header::request(Opcode::Write, 1, 0, 0).encode();
    h[16..20].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
    cases.push(with_crc(h).to_vec());
    // Unknown opcode.
    let mut h = Header::request(Opcode::Read, 1, 0, 0).encode();
    h[5] = 200;
    cases.push(with_crc(h).to_vec());
    // Body shorter than the fixed fields.
    let mut f = Header::request(Opcode::Read, 1, 10, 0).encode().to_vec();
    f.extend_from_slice(&[0; 10]);
    cases.push(f);
    // Unaligned range.
    let mut f = Vec::new();
    Request::Read(ChunkRange { offset: 3, ..range }).encode_head(1, &mut f);
    cases.push(f);
    // A reply frame sent as a request.
    let h = Header::reply(Opcode::Read, 1, tessera_proto::Status::Ok, 0, 0).encode();
    cases.push(h.to_vec());
    // Random garbage.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..40 {
        let n = rng.random_range(1..300);
        cases.push((0..n).map(|_| rng.random()).collect());
    }
    for (i, c) in cases.iter().enumerate() {
        expect_dropped(&addr, c).await;
        // The node still serves its real client after every bad connection.
        if i % 8 == 0 {
            let mut buf = vec![0u8; 8192];
            vol.read(0, &mut buf).await.expect("node still serves");
            assert_eq!(buf, data);
        }
    }
    // A write whose payload fails its checksum is refused alone: the
    // connection stays usable.
    {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut f = Vec::new();
        Request::Write(range, &[0u8; 512]).encode_head(5, &mut f);
        f.extend_from_slice(&[1u8; 512]);
        s.write_all(&f).await.unwrap();
        let reply = tessera_proto::read_frame(&mut s).await.unwrap().unwrap();
        assert_eq!(reply.header.id, 5);
        assert_eq!(reply.header.status(), tessera_proto::Status::BadPayload);
        let mut f = Vec::new();
        Request::Flush(tessera_proto::DiskRef { disk: [0; 16] }).encode_head(6, &mut f);
        s.write_all(&f).await.unwrap();
        let reply = tessera_proto::read_frame(&mut s).await.unwrap().unwrap();
        assert_eq!(reply.header.id, 6);
        assert_eq!(reply.header.status(), tessera_proto::Status::Ok);
    }

    // A half-sent frame followed by a hang-up.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut f = Vec::new();
    Request::Write(range, &[0u8; 512]).encode_head(1, &mut f);
    s.write_all(&f).await.unwrap();
    drop(s);

    let mut buf = vec![0u8; 8192];
    vol.read(0, &mut buf).await.expect("node still serves");
    assert_eq!(buf, data);
    vol.write(8192, &data).await.expect("node still writes");
    vol.close().await.unwrap();
}

/// A raw HTTP/1.1 request; returns (status, body).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("API answered")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_malformed_bodies_with_4xx_json() {
    let zone = TestZone::start(2, 64 * MIB).await;
    let addr = zone.url.trim_start_matches("http://").to_string();
    let token = std::fs::read_to_string(&zone.token_file).unwrap();
    let token = token.trim();
    let bad: Vec<(&str, &str, Option<&str>, &[u8])> = vec![
        ("POST", "/v1/datastores", Some(token), b"{not json"),
        (
            "POST",
            "/v1/datastores",
            Some(token),
            b"{\"name\": 5, \"mirrors\": 2}",
        ),
        (
            "POST",
            "/v1/datastores",
            Some(token),
            b"{\"name\": \"a\", \"mirrors\": -1}",
        ),
        (
            "POST",
            "/v1/datastores",
            Some(token),
            b"{\"name\": \"a\", \"mirrors\": 99999999999999999999}",
        ),
        (
            "POST",
            "/v1/datastores",
            Some(token),
            b"{\"name\": \"a\", \"mirrors\": 2, \"bogus\": 1}",
        ),
        (
            "POST",
            "/v1/datastores",
            Some(token),
            b"{\"name\": \"a\", \"mirrors\": 9}",
        ),
        (
            "POST",
            "/v1/datastores",
            Some(token),
            b"{\"name\": \"../x\", \"mirrors\": 1}",
        ),
        (
            "POST",
            "/v1/vdisks",
            Some(token),
            b"{\"datastore\": \"none\", \"name\": \"v\", \"size\": 1024}",
        ),
        ("POST", "/v1/vdisks", Some(token), b"\xff\xfe\x00"),
        ("POST", "/v1/vdisks", Some(token), b""),
        ("GET", "/v1/vdisks/none/v", Some(token), b""),
        ("GET", "/v1/nope", Some(token), b""),
        (
            "POST",
            "/v1/datastores",
            None,
            b"{\"name\": \"a\", \"mirrors\": 1}",
        ),
        (
            "POST",
            "/v1/datastores",
            Some("wrong"),
            b"{\"name\": \"a\", \"mirrors\": 1}",
        ),
    ];
    for (method, path, tok, body) in bad {
        let (status, text) = http(&addr, method, path, tok, body).await;
        assert!(
            (400..500).contains(&status),
            "{method} {path} {:?} gave {status}",
            String::from_utf8_lossy(body)
        );
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
        let msg = v["error"].as_str().expect("an error field");
        assert!(
            !msg.is_empty() && !msg.contains('\n'),
            "one-line error: {msg:?}"
        );
    }
    // Still serving.
    zone.datastore("ds", 2).await;
}
