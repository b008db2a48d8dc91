//! The vhost-user-blk device driven by an independent client (libblkio's
//! `virtio-blk-vhost-user` driver): random patterns on several queues with
//! many requests in flight, flush, discard and write-zeroes, checked against
//! a model and then on every copy through the volume client.

use rand::{Rng, SeedableRng};
use tessera_tests::blk::{BlkClient, Op};
use tessera_tests::{pattern, TestZone};
use tessera_zone::records::VdiskState;

const MIB: u64 = 1 << 20;
const QUEUES: usize = 4;
const PER_QUEUE_MEM: usize = 8 << 20;

/// Each queue owns a quarter of the disk, so queues never overlap and the
/// model of each quarter is exact; within a queue, every batch is disjoint.
fn queue_workload(
    q: &mut tessera_tests::blk::QueueHandle<'_>,
    base: u64,
    span: u64,
    seed: u64,
) -> Vec<u8> {
    let mut model = vec![0u8; span as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sizes = [512usize, 1024, 4096, 8192, 12288, 65536, 131072, 1 << 20];
    for round in 0..12 {
        // A batch of up to 16 disjoint writes, all in flight at once.
        let mut ops = Vec::new();
        let mut used: Vec<(u64, u64)> = Vec::new();
        let mut buf = 0usize;
        while ops.len() < 16 {
            let len = sizes[rng.random_range(0..sizes.len())];
            if buf + len > PER_QUEUE_MEM {
                break;
            }
            let off = rng.random_range(0..(span - len as u64) / 512) * 512;
            if used
                .iter()
                .any(|(o, l)| off < o + l && *o < off + len as u64)
            {
                continue;
            }
            used.push((off, len as u64));
            let data = pattern(seed * 1000 + round * 100 + ops.len() as u64, off, len);
            q.mem()[buf..buf + len].copy_from_slice(&data);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            ops.push(Op::Write {
                offset: base + off,
                buf,
                len,
            });
            buf += len;
        }
        for (i, r) in q.run(&ops).into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("write {:?} failed: {e}", ops[i]));
        }
        if round % 4 == 3 {
            q.flush().expect("flush");
        }
    }
    // A discard and a write-zeroes inside this queue's span.
    let d_off = span / 4;
    let z_off = span / 2 + 4096;
    let res = q.run(&[
        Op::Discard {
            offset: base + d_off,
            len: MIB,
        },
        Op::WriteZeroes {
            offset: base + z_off,
            len: 64 * 1024,
            unmap: false,
        },
    ]);
    for r in res {
        r.expect("discard / write-zeroes");
    }
    model[d_off as usize..(d_off + MIB) as usize].fill(0);
    model[z_off as usize..(z_off + 64 * 1024) as usize].fill(0);
    // Read everything back in 1 MiB requests, many in flight.
    let mut ops = Vec::new();
    for off in (0..span).step_by(MIB as usize) {
        ops.push(Op::Read {
            offset: base + off,
            buf: ops.len() * MIB as usize,
            len: MIB as usize,
        });
        if ops.len() * MIB as usize == PER_QUEUE_MEM || off + MIB >= span {
            for r in q.run(&ops) {
                r.expect("read");
            }
            for (j, op) in ops.iter().enumerate() {
                if let Op::Read { offset, len, .. } = op {
                    let o = (offset - base) as usize;
                    let got = &q.mem()[j * MIB as usize..j * MIB as usize + len];
                    assert!(
                        got == &model[o..o + len],
                        "queue data at {offset} differs from what was written"
                    );
                }
            }
            ops.clear();
        }
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blkio_client_reads_back_patterns_on_every_queue_and_copy() {
    let zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 2).await;
    let size = 64 * MIB;
    zone.vdisk("ds", "v", size).await;
    let mut vhost = zone.spawn_vhost("ds", "v", QUEUES as u16);

    // The zone shows the vDisk online on this host while it is served.
    let shown = zone.api.vdisk("ds", "v").await.unwrap();
    assert_eq!(
        shown.vdisk.state,
        VdiskState::Online {
            host: tessera_tests::TEST_HOST.into()
        }
    );

    let socket = vhost.socket.clone();
    let models = tokio::task::spawn_blocking(move || {
        let mut client = BlkClient::connect(&socket, QUEUES, PER_QUEUE_MEM).expect("connect");
        assert_eq!(client.capacity(), size);
        assert_eq!(client.num_queues(), QUEUES);
        let span = size / QUEUES as u64;
        let models: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = client
                .queues()
                .into_iter()
                .enumerate()
                .map(|(i, mut q)| {
                    s.spawn(move || queue_workload(&mut q, i as u64 * span, span, i as u64 + 1))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("queue thread"))
                .collect()
        });
        client.queue().flush().expect("final flush");
        models
    })
    .await
    .expect("client thread");
    let model: Vec<u8> = models.concat();

    // A clean stop releases the lease.
    assert!(
        vhost.stop(),
        "vhost serve exits 0 on SIGTERM:\n{}",
        vhost.log_text()
    );
    let shown = zone.api.vdisk("ds", "v").await.unwrap();
    assert_eq!(shown.vdisk.state, VdiskState::Offline);
    assert!(shown.vdisk.lease.is_none());

    // Every copy holds exactly what the client wrote.
    let vol = zone.open("ds", "v").await;
    for copy in 0..2 {
        let mut buf = vec![0u8; size as usize];
        vol.read_copy(0, &mut buf, copy).await.unwrap();
        assert!(
            buf == model,
            "copy {copy} differs from what the client wrote"
        );
    }
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_reports_geometry_and_refuses_out_of_range_io() {
    let zone = TestZone::start(1, 128 * MIB).await;
    zone.datastore("ds", 1).await;
    zone.vdisk("ds", "v", 8 * MIB + 512).await;
    let vhost = zone.spawn_vhost("ds", "v", 2);
    let socket = vhost.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = BlkClient::connect(&socket, 2, MIB as usize).expect("connect");
        assert_eq!(c.capacity(), 8 * MIB + 512);
        assert!(c.property_i32("max-queues").unwrap() >= 2);
        let mut q = c.queue();
        // The last sector is writable; one past it is not.
        q.write(8 * MIB, &[7u8; 512]).expect("last sector");
        assert_eq!(q.read(8 * MIB, 512).unwrap(), vec![7u8; 512]);
        // Reads past the end fail for that request only.
        assert!(q.read(8 * MIB, 1024).is_err());
        assert!(q.write(8 * MIB + 512, &[1u8; 512]).is_err());
        // The device still serves after refusing.
        q.write(0, &pattern(3, 0, 4096)).unwrap();
        assert_eq!(q.read(0, 4096).unwrap(), pattern(3, 0, 4096));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successive_front_ends_are_served_by_one_process() {
    let zone = TestZone::start(1, 64 * MIB).await;
    zone.datastore("ds", 1).await;
    zone.vdisk("ds", "v", 8 * MIB).await;
    let vhost = zone.spawn_vhost("ds", "v", 2);
    let socket = vhost.socket.clone();
    let log = vhost.log.clone();
    tokio::task::spawn_blocking(move || {
        for round in 0..3u64 {
            let mut c = BlkClient::connect(&socket, 2, MIB as usize).unwrap_or_else(|e| {
                panic!(
                    "connect {round}: {e}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            let mut q = c.queue();
            if round > 0 {
                assert_eq!(q.read(0, 4096).unwrap(), pattern(round - 1, 0, 4096));
            }
            q.write(0, &pattern(round, 0, 4096)).unwrap();
        }
    })
    .await
    .unwrap();
}
