//! The futures of a vDisk's I/O calls stay small. `tessera vhost serve`
//! spawns one task per guest request, so a request's future is allocated
//! and copied for every I/O: when a rare path's state (a zone call, a
//! reconnect, a drain buffer) sat inline in it, every 4 KiB read carried
//! 9.8 KiB and every write 5.8 KiB, and reads at QD32 lost 10 %
//! (`bench/results/blkbench-2026-12-01-0122.md`). Rare, large paths are
//! boxed where they are awaited (`record_dirty`, `enter_extent`, the
//! dial of `NodeLink::conn`, `undo_no_space`), and a write's per-piece
//! state is boxed once.
//!
//! Fails when one of those is inlined again.

use tessera_sim::harness::{run, Cluster, Shape};

#[test]
fn a_requests_future_stays_small() {
    run(async {
        let c = Cluster::new(Shape::default()).await;
        let v = c.open(false).await;
        let data = vec![0u8; 4096];
        let mut buf = vec![0u8; 4096];
        let write = std::mem::size_of_val(&v.writev(0, &[&data]));
        let discard = std::mem::size_of_val(&v.discard(0, 4096));
        let zeroes = std::mem::size_of_val(&v.write_zeroes(0, 4096));
        let flush = std::mem::size_of_val(&v.flush());
        let mut bufs = [&mut buf[..]];
        let read = std::mem::size_of_val(&v.readv(0, &mut bufs));
        for (what, size, limit) in [
            ("writev", write, 1024),
            ("discard", discard, 1024),
            ("write_zeroes", zeroes, 1024),
            ("flush", flush, 1024),
            ("readv", read, 4096),
        ] {
            assert!(
                size <= limit,
                "the future of `{what}` is {size} bytes (at most {limit}): a large state is inline"
            );
        }
    });
}
