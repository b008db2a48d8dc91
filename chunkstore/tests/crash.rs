//! Crash safety: a child process writes in a loop and reports every
//! acknowledged operation; the parent kills it with SIGKILL at a random
//! moment, reopens the disk and checks that every acknowledged write reads
//! back intact.
//!
//! The child is this test binary itself, started with an environment
//! variable that turns `crash_child_writer` into the writer loop.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_chunkstore::{Disk, Error, FormatOptions};
use uuid::Uuid;

const DISK_ENV: &str = "TESSERA_CRASH_CHILD_DISK";
const SEED_ENV: &str = "TESSERA_CRASH_CHILD_SEED";
const ES: u32 = 64 << 10;
const CHUNKS: u64 = 6;
const BLOCK: u32 = 4096;
const V: Uuid = Uuid::from_u128(0xc4a5);

/// xorshift64*: small, deterministic, shared by parent and child.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// One operation of the writer, as printed on its stdout.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Write {
        chunk: u64,
        off: u32,
        len: u32,
        seed: u64,
        epoch: u64,
    },
    Discard {
        chunk: u64,
        off: u32,
        len: u32,
        epoch: u64,
    },
}

impl Op {
    fn random(r: &mut Rng, i: u64) -> Op {
        let chunk = r.below(CHUNKS);
        let sectors = u64::from(ES / 512);
        let start = r.below(sectors) as u32;
        let n = 1 + r.below(sectors - u64::from(start)) as u32;
        let (off, len) = (start * 512, n * 512);
        let epoch = 1 + i / 64;
        match r.below(10) {
            0 => Op::Discard {
                chunk,
                off: 0,
                len: ES,
                epoch,
            },
            1 => Op::Discard {
                chunk,
                off,
                len,
                epoch,
            },
            _ => Op::Write {
                chunk,
                off,
                len,
                seed: r.next(),
                epoch,
            },
        }
    }

    fn line(&self) -> String {
        match *self {
            Op::Write {
                chunk,
                off,
                len,
                seed,
                epoch,
            } => format!("W {chunk} {off} {len} {seed} {epoch}"),
            Op::Discard {
                chunk,
                off,
                len,
                epoch,
            } => format!("D {chunk} {off} {len} {epoch}"),
        }
    }

    fn parse(s: &str) -> Option<Op> {
        let f: Vec<&str> = s.split(' ').collect();
        let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        match *f.first()? {
            "W" => Some(Op::Write {
                chunk: n(1)?,
                off: n(2)? as u32,
                len: n(3)? as u32,
                seed: n(4)?,
                epoch: n(5)?,
            }),
            "D" => Some(Op::Discard {
                chunk: n(1)?,
                off: n(2)? as u32,
                len: n(3)? as u32,
                epoch: n(4)?,
            }),
            _ => None,
        }
    }

    fn apply(&self, disk: &Disk) -> Result<(), Error> {
        match *self {
            Op::Write {
                chunk,
                off,
                len,
                seed,
                epoch,
            } => disk.write(V, chunk, off, &pattern(seed, len as usize), epoch),
            Op::Discard {
                chunk,
                off,
                len,
                epoch,
            } => disk.discard(V, chunk, off, len, epoch),
        }
    }

    fn apply_model(&self, model: &mut [Vec<u8>]) {
        match *self {
            Op::Write {
                chunk,
                off,
                len,
                seed,
                ..
            } => {
                model[chunk as usize][off as usize..(off + len) as usize]
                    .copy_from_slice(&pattern(seed, len as usize));
            }
            Op::Discard {
                chunk, off, len, ..
            } => {
                model[chunk as usize][off as usize..(off + len) as usize].fill(0);
            }
        }
    }

    /// (chunk, block) pairs this operation may have touched.
    fn blocks(&self) -> impl Iterator<Item = (u64, u32)> {
        let (chunk, off, len) = match *self {
            Op::Write {
                chunk, off, len, ..
            }
            | Op::Discard {
                chunk, off, len, ..
            } => (chunk, off, len),
        };
        (off / BLOCK..(off + len).div_ceil(BLOCK)).map(move |b| (chunk, b))
    }
}

/// The writer loop; a no-op unless started by `kill_9_loses_no_acknowledged_write`.
#[test]
fn crash_child_writer() {
    let (Ok(path), Ok(seed)) = (std::env::var(DISK_ENV), std::env::var(SEED_ENV)) else {
        return;
    };
    let disk = Disk::open(Path::new(&path)).unwrap();
    let mut r = Rng(seed.parse::<u64>().unwrap() | 1);
    let mut out = std::io::stdout().lock();
    // libtest has printed "test crash_child_writer ... " without a newline.
    writeln!(out, "\nREADY").unwrap();
    out.flush().unwrap();
    for i in 0.. {
        let op = Op::random(&mut r, i);
        writeln!(out, "BEGIN {}", op.line()).unwrap();
        out.flush().unwrap();
        op.apply(&disk).unwrap();
        writeln!(out, "ACK {}", op.line()).unwrap();
        out.flush().unwrap();
    }
}

fn one_run(iteration: u64, kill_after: Duration, thin: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let opts = FormatOptions {
        extent_size: ES,
        size: Some(4 << 20),
        thin,
        ..FormatOptions::new(Uuid::from_u128(7))
    };
    drop(Disk::format(&path, &opts).unwrap());

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_writer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_ENV, &path)
        .env(SEED_ENV, (iteration + 1).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        // Only complete lines count: a line cut by the kill has no '\n'.
        let mut lines = Vec::new();
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.ends_with('\n') {
                if line == "READY\n" {
                    let _ = tx.send(());
                }
                lines.push(line.trim_end().to_string());
            }
            line.clear();
        }
        lines
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("child did not start");
    std::thread::sleep(kill_after);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let lines = reader.join().unwrap();

    let mut model = vec![vec![0u8; ES as usize]; CHUNKS as usize];
    let mut pending: Option<Op> = None;
    let mut acked = 0;
    let mut max_epoch = 0;
    for l in &lines {
        if let Some(op) = l.strip_prefix("BEGIN ").and_then(Op::parse) {
            pending = Some(op);
        } else if let Some(op) = l.strip_prefix("ACK ").and_then(Op::parse) {
            assert_eq!(pending.take(), Some(op));
            op.apply_model(&mut model);
            acked += 1;
            max_epoch = match op {
                Op::Write { epoch, .. } | Op::Discard { epoch, .. } => epoch,
            };
        }
    }
    assert!(
        acked > 0,
        "the child acknowledged nothing in {kill_after:?}"
    );
    eprintln!("run {iteration}: killed after {kill_after:?}, {acked} ops acknowledged, in flight: {pending:?}");
    // The in-flight operation (if any) may have landed partly: its blocks
    // may read old, new, or fail their checksum. Everything else must match.
    let uncertain: HashSet<(u64, u32)> = pending.iter().flat_map(|op| op.blocks()).collect();

    let disk = Disk::open(&path).expect("disk opens after SIGKILL");
    assert!(disk.epoch(V) >= max_epoch);
    let info = disk.info();
    assert_eq!(info.quarantined_extents, 0);
    for chunk in 0..CHUNKS {
        for b in 0..ES / BLOCK {
            let mut buf = vec![0u8; BLOCK as usize];
            let res = disk.read(V, chunk, b * BLOCK, &mut buf);
            if uncertain.contains(&(chunk, b)) {
                continue;
            }
            res.unwrap_or_else(|e| panic!("chunk {chunk} block {b}: {e}"));
            let want = &model[chunk as usize][(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            assert!(
                buf == want,
                "chunk {chunk} block {b} differs after {acked} acknowledged ops"
            );
        }
    }
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let mut r = Rng(0x5eed_1234);
    for i in 0..6 {
        let after = Duration::from_millis(20 + r.below(250));
        one_run(i, after, false);
    }
}

/// The same on format v3, where a write's crcs go through the crc journal
/// (whose little ring here is written back again and again).
#[test]
fn kill_9_loses_no_acknowledged_write_v3() {
    let mut r = Rng(0x5eed_3333);
    for i in 0..6 {
        let after = Duration::from_millis(20 + r.below(250));
        one_run(i, after, true);
    }
}
