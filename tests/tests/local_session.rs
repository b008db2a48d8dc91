//! Local sessions: a vDisk process shares guest memory with the storage
//! nodes on its own host, which read into and write from it directly; nodes
//! on other hosts are reached over TCP. The node's local socket refuses bad
//! input like its TCP port does.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use tessera_proto::{
    ChunkRange, Header, Request, ShmRange, ShmRegion, ShmSeg, Status, HEADER_LEN, SHM_CHECK_CRC,
};
use tessera_tests::blk::{BlkClient, Op};
use tessera_tests::{pattern, TestZone};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_memory_goes_to_local_nodes_and_tcp_to_others() {
    let mut zone = TestZone::start(3, 64 * MIB).await;
    // Node 2 claims another host: the vDisk process must use TCP for it.
    zone.restart_node_on_host(2, "elsewhere");
    zone.wait_nodes_up(3).await;
    zone.datastore("ds", 3).await;
    zone.vdisk("ds", "v", 16 * MIB).await;
    let mut vhost = zone.spawn_vhost("ds", "v", 1);

    let socket = vhost.socket.clone();
    let written = tokio::task::spawn_blocking(move || {
        let mut blk = BlkClient::connect(&socket, 1, 8 << 20).expect("blkio client");
        let mut q = blk.queue();
        // Sizes from one sector to a whole chunk, at unaligned (512-byte)
        // offsets so some cross chunk boundaries and partial 4 KiB blocks.
        let sizes = [512usize, 4096, 12800, 65536, 300 * 1024, 1 << 20];
        let mut model = vec![0u8; (16 * MIB) as usize];
        let mut ops = Vec::new();
        let mut buf = 0usize;
        for (i, len) in sizes.iter().enumerate() {
            let offset = i as u64 * 2 * MIB + MIB - 512 * (i as u64 + 1);
            let data = pattern(i as u64 + 7, offset, *len);
            q.mem()[buf..buf + len].copy_from_slice(&data);
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            ops.push(Op::Write {
                offset,
                buf,
                len: *len,
            });
            buf += len;
        }
        for r in q.run(&ops) {
            r.expect("write");
        }
        q.flush().expect("flush");
        // Read everything back through the device (into guest memory).
        for at in (0..16 * MIB).step_by(MIB as usize) {
            let got = q.read(at, MIB as usize).expect("read");
            assert!(
                got == model[at as usize..(at + MIB) as usize],
                "the device read back other data at {at}"
            );
        }
        model
    })
    .await
    .expect("client");
    assert!(vhost.stop(), "vhost process exits cleanly");

    // The two local nodes mapped the guest's memory (at least one region);
    // the remote one did not.
    for i in 0..2 {
        let log = zone.node_log(i);
        let mapped = log
            .lines()
            .filter(|l| l.contains("local session: mapped the client's memory"))
            .any(|l| !l.contains("regions=0"));
        assert!(
            mapped,
            "node {i} on the vDisk process's host mapped no guest memory; vhost log:\n{}\nnode log:\n{log}",
            vhost.log_text()
        );
    }
    assert!(
        !zone.node_log(2).contains("local session"),
        "a node on another host got a local session"
    );
    // Every copy holds what the guest wrote.
    let vol = zone.open("ds", "v").await;
    for copy in 0..3 {
        let mut buf = vec![0u8; (16 * MIB) as usize];
        vol.read_copy(0, &mut buf, copy).await.expect("read copy");
        assert!(
            buf == written,
            "copy {copy} differs from what the guest wrote"
        );
    }
    vol.close().await.unwrap();
}

/// Opens a local session on `path` sharing one 64 KiB file region.
fn session(path: &std::path::Path) -> (UnixStream, std::fs::File) {
    let file = tempfile();
    file.set_len(64 * 1024).unwrap();
    let mut s = UnixStream::connect(path).expect("connect to the node's local socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tessera_proto::local::client_handshake(
        &mut s,
        &[ShmRegion {
            len: 64 * 1024,
            offset: 0,
        }],
        &[file.as_raw_fd()],
    )
    .expect("handshake");
    (s, file)
}

fn tempfile() -> std::fs::File {
    tempfile::tempfile().unwrap()
}

/// Sends one request and returns the reply's status.
fn roundtrip(s: &mut UnixStream, req: Request<'_>, id: u64, crc: u32) -> Status {
    let mut f = Vec::new();
    let payload = req.encode_head(id, &mut f);
    f.extend_from_slice(payload);
    // encode_head sets a crc only for plain writes; local writes carry the data's.
    if let Request::WriteShm(..) = req {
        let mut h: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        let decoded = Header::decode(&h).unwrap();
        h.copy_from_slice(&Header::request(decoded.opcode, id, decoded.body_len, crc).encode());
        f[..HEADER_LEN].copy_from_slice(&h);
    }
    s.write_all(&f).unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = Header::decode(&h).unwrap();
    assert_eq!(h.id, id);
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).unwrap();
    h.status()
}

fn segs(list: &[ShmSeg]) -> Vec<u8> {
    list.iter().flat_map(|s| s.encode()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_socket_refuses_bad_sessions_and_out_of_bounds_segments() {
    let zone = TestZone::start(1, 64 * MIB).await;
    zone.datastore("ds", 1).await;
    let vdisk = zone.vdisk("ds", "v", 4 * MIB).await;
    let disk = zone.disk_of_node(0).await;
    let path = zone.nodes[0].dir.join("node.sock");
    let range = ChunkRange {
        vdisk: *vdisk.uuid.as_bytes(),
        disk: *disk.as_bytes(),
        chunk: 0,
        offset: 0,
        len: 8192,
        epoch: 1,
    };
    tokio::task::spawn_blocking(move || {
        // A session that does not start with MapMemory is dropped.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = Vec::new();
        Request::Hello(tessera_proto::Hello {
            min_version: 1,
            max_version: 2,
            client: [0; 16],
        })
        .encode_head(1, &mut hello);
        s.write_all(&hello).unwrap();
        let mut b = [0u8; 64];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "node kept a session without a memory map"
        );
        // A map with more regions than descriptors is refused.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let f = tempfile();
        let two = [ShmRegion {
            len: 4096,
            offset: 0,
        }; 2];
        assert!(tessera_proto::local::client_handshake(&mut s, &two, &[f.as_raw_fd()]).is_err());

        let (mut s, mut mem) = session(&path);
        let sr = |segments: &[ShmSeg], flags| ShmRange {
            range,
            flags,
            segments: segments.len() as u32,
        };
        // Segments outside the shared region: refused, nothing written.
        let out = [ShmSeg {
            region: 0,
            len: 8192,
            offset: 60 * 1024,
        }];
        assert_eq!(
            roundtrip(&mut s, Request::WriteShm(sr(&out, 0), &segs(&out)), 2, 0),
            Status::Invalid
        );
        let other = [ShmSeg {
            region: 1,
            len: 8192,
            offset: 0,
        }];
        assert_eq!(
            roundtrip(&mut s, Request::ReadShm(sr(&other, 0), &segs(&other)), 3, 0),
            Status::Invalid
        );
        // A write whose data fails the crc it was sent with: BadPayload.
        let data = pattern(3, 0, 8192);
        mem.write_all(&data).unwrap();
        let two_segs = [
            ShmSeg {
                region: 0,
                len: 4096,
                offset: 0,
            },
            ShmSeg {
                region: 0,
                len: 4096,
                offset: 4096,
            },
        ];
        let w = Request::WriteShm(sr(&two_segs, SHM_CHECK_CRC), &segs(&two_segs));
        assert_eq!(
            roundtrip(&mut s, w, 4, tessera_crc::crc32c(&data) ^ 1),
            Status::BadPayload
        );
        // The session goes on: a good write, then a read into another place.
        assert_eq!(
            roundtrip(&mut s, w, 5, tessera_crc::crc32c(&data)),
            Status::Ok
        );
        let back = [ShmSeg {
            region: 0,
            len: 8192,
            offset: 32 * 1024,
        }];
        assert_eq!(
            roundtrip(&mut s, Request::ReadShm(sr(&back, 0), &segs(&back)), 6, 0),
            Status::Ok
        );
        let mut got = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut got, 32 * 1024).unwrap();
        assert!(got == data, "the node read other data into shared memory");
    })
    .await
    .unwrap();
    // And on TCP, a ReadShm is refused without a session's memory.
    let addr = zone.nodes[0].listen.to_string();
    let mut t = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let seg = [ShmSeg {
        region: 0,
        len: 8192,
        offset: 0,
    }];
    let list = segs(&seg);
    let mut f = Vec::new();
    let payload = Request::ReadShm(
        ShmRange {
            range,
            flags: 0,
            segments: 1,
        },
        &list,
    )
    .encode_head(9, &mut f);
    f.extend_from_slice(payload);
    tokio::io::AsyncWriteExt::write_all(&mut t, &f)
        .await
        .unwrap();
    let reply = tessera_proto::read_frame(&mut t).await.unwrap().unwrap();
    assert_eq!(reply.header.status(), Status::Invalid);
    // The node still serves the volume client.
    let vol = zone.open("ds", "v").await;
    let mut buf = vec![0u8; 8192];
    vol.read(0, &mut buf).await.unwrap();
    assert_eq!(buf, pattern(3, 0, 8192));
    vol.close().await.unwrap();
}
