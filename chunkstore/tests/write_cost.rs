//! Micro-benchmark of the data path's cost per operation (page cache only,
//! no flush): `cargo test --release -p tessera-chunkstore --test write_cost
//! -- --ignored --nocapture`. Ignored by default: it measures, it does not
//! check. Uses only the public API, so it runs unchanged against older
//! versions of the crate for before/after comparisons. `WRITE_COST_THIN=0`
//! formats version 2 instead of the default; `WRITE_COST_CHUNKS=N` writes
//! over N chunks (64 by default; 1024 is the 1 GiB range `blkbench` uses,
//! where single runs vary by a third from one to the next: alternate and
//! repeat); `WRITE_COST_SIZES=4096,1048576` runs only those sizes.

use tessera_chunkstore::{Disk, FormatOptions};
use uuid::Uuid;

const MIB: u64 = 1 << 20;
const ES: u32 = 1 << 20;
const V: Uuid = Uuid::from_u128(0xbe7c);

/// xorshift64*: deterministic offsets.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// This thread's CPU time (user + system) in seconds: unlike wall time,
/// it does not count the time other processes had the CPU.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which
    // points to a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `op` `n` times (after a warm-up of `n / 10`) and returns the CPU
/// µs per op (the system calls' kernel time included).
fn per_op(n: u64, mut op: impl FnMut(u64)) -> f64 {
    for i in 0..n / 10 {
        op(i);
    }
    let t = thread_cpu();
    for i in 0..n {
        op(i);
    }
    (thread_cpu() - t) * 1e6 / n as f64
}

#[test]
#[ignore = "a measurement, run explicitly"]
fn write_path_cost() {
    // `WRITE_COST_THIN=0`: a version-2 disk (extents); else the default.
    let thin = std::env::var("WRITE_COST_THIN").map_or(true, |v| v != "0");
    // `WRITE_COST_CHUNKS=N`: chunks written over (64 by default).
    let chunks: u64 = std::env::var("WRITE_COST_CHUNKS").map_or(64, |v| v.parse().unwrap());
    println!("thin (format 3): {thin}, {chunks} chunks");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let opts = FormatOptions {
        extent_size: ES,
        size: Some((chunks + chunks / 8 + 16) * MIB),
        thin,
        ..FormatOptions::new(Uuid::from_u128(1))
    };
    let disk = Disk::format(&path, &opts).unwrap();
    let full = vec![0x5au8; ES as usize];
    for c in 0..chunks {
        disk.write(V, c, 0, &full, 1).unwrap();
    }
    disk.flush().unwrap();
    // `WRITE_COST_DROP=1`: the file's page cache dropped after the prefill
    // (what formatting and the prefill left in large folios goes).
    if std::env::var("WRITE_COST_DROP").is_ok_and(|v| v == "1") {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: posix_fadvise only reads its arguments; the descriptor is
        // open for the call's duration.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        println!("page cache dropped");
    }
    let mut r = Rng(0x1234_5678);
    let sizes: [(&str, usize); 4] = [
        ("512 B (partial block)", 512),
        ("4 KiB", 4096),
        ("64 KiB", 64 << 10),
        ("1 MiB", ES as usize),
    ];
    // `WRITE_COST_SIZES=4096,1048576`: only these overwrite sizes.
    let only: Option<Vec<usize>> = std::env::var("WRITE_COST_SIZES")
        .ok()
        .map(|v| v.split(',').map(|x| x.parse().unwrap()).collect());
    let sizes: Vec<(&str, usize)> = sizes
        .into_iter()
        .filter(|(_, len)| only.as_ref().is_none_or(|o| o.contains(len)))
        .collect();
    for &(name, len) in &sizes {
        let data = vec![0xa5u8; len];
        let n = if len >= 1 << 20 { 500 } else { 20_000 };
        let slots = u64::from(ES) / len as u64;
        let us = per_op(n, |_| {
            let c = r.below(chunks);
            let off = (r.below(slots) * len as u64) as u32;
            disk.write(V, c, off, &data, 1).unwrap();
        });
        println!("overwrite {name:>22}: {us:8.2} us/op");
    }
    for &(name, len) in &sizes {
        let mut buf = vec![0u8; len];
        let n = if len >= 1 << 20 { 500 } else { 20_000 };
        let slots = u64::from(ES) / len as u64;
        let us = per_op(n, |_| {
            let c = r.below(chunks);
            let off = (r.below(slots) * len as u64) as u32;
            disk.read(V, c, off, &mut buf).unwrap();
        });
        println!("read      {name:>22}: {us:8.2} us/op");
    }
    // First writes: allocate, zero the rest, data, crcs, record; then free.
    let data = vec![0x33u8; 4096];
    let us = per_op(2000, |i| {
        let c = chunks + 1_000 + i;
        disk.write(V, c, 0, &data, 1).unwrap();
        disk.discard(V, c, 0, ES, 1).unwrap();
    });
    println!("first 4 KiB write + free of a chunk: {us:8.2} us/op");
}
