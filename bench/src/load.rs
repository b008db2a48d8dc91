//! A queue-depth-N load generator on one vhost-user-blk queue.
//!
//! [`Client`] connects with libblkio's `virtio-blk-vhost-user` driver (the
//! same driver as `tessera_tests::blk::BlkClient`, but a lower-level loop):
//! it keeps exactly `depth` requests in flight, resubmits a slot as soon as
//! its completion is reaped, and timestamps every request from submission to
//! reaping. Completions are waited for on the queue's eventfd (no polling:
//! the client shares two cores with the servers it measures).
//!
//! Requests larger than the device's `size_max` are split into segments of
//! at most that size in one request (`readv`/`writev`), as a guest's driver
//! does; the device's `seg_max` bounds the number of segments.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blkio::{iovec, Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Access pattern of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random block-aligned offsets in the range.
    Random,
    /// Consecutive blocks, wrapping at the end of the range; in-flight
    /// requests take the next blocks in submission order.
    Sequential,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub write: bool,
    pub pattern: Pattern,
    pub block_size: usize,
    pub depth: usize,
    /// Bytes `[0, range)` of the device are used.
    pub range: u64,
    /// Where a sequential job starts (a multiple of the block size): a
    /// one-pass job covers `[start, range)`.
    pub start: u64,
    /// Unmeasured time before the measurement starts.
    pub warmup: Duration,
    /// Measured time; `None` = one sequential pass over the range (prefill).
    pub duration: Option<Duration>,
    pub seed: u64,
}

/// What one job measured (after warm-up).
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub ios: u64,
    pub bytes: u64,
    /// From the end of the warm-up until the last in-flight request completed.
    pub elapsed: Duration,
    /// Submission-to-completion latency of every measured I/O, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// CPU time (user + sys) of the client thread during the measurement.
    pub client_cpu: Duration,
}

impl Measured {
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1u64 << 20) as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`-quantile (0 < p ≤ 1) of the latencies in microseconds; the
    /// latencies must be sorted (see [`Measured::sort`]).
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        let n = self.latencies_ns.len();
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        self.latencies_ns[rank - 1] as f64 / 1000.0
    }

    pub fn mean_us(&self) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        self.latencies_ns.iter().map(|&l| l as f64).sum::<f64>()
            / self.latencies_ns.len() as f64
            / 1000.0
    }

    pub fn sort(&mut self) {
        self.latencies_ns.sort_unstable();
    }
}

fn blk_err(e: blkio::Error) -> anyhow::Error {
    // `blkio::Error` is not a std::error::Error: keep its text.
    anyhow::anyhow!("{} ({:?})", e.message(), e.errno())
}

/// How long one wait for a completion may take before the run is declared
/// stalled (the server hangs or died).
const STALL: Duration = Duration::from_secs(30);

/// A connected client with one queue and `mem` bytes of shared memory.
pub struct Client {
    // Field order matters: the queue and the driver go before the memory.
    queue: Option<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    /// Largest segment the device takes (`size_max`), 0 = no limit.
    pub max_segment_len: usize,
    /// Most segments in one request (`seg_max`).
    pub max_segments: usize,
}

impl Client {
    /// Connects to the vhost-user-blk socket with one queue and `mem` bytes
    /// of memory shared with the device, filled with a non-zero pattern.
    pub fn connect(socket: &Path, mem: usize) -> Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blk_err)?;
        b.set_str("path", &socket.display().to_string())
            .map_err(blk_err)?;
        b.connect()
            .map_err(blk_err)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        b.set_i32("num-queues", 1).map_err(blk_err)?;
        let started = b.start().map_err(blk_err)?;
        let capacity = b.get_u64("capacity").map_err(blk_err)?;
        let max_segment_len = b.get_i32("max-segment-len").map_err(blk_err)?.max(0) as usize;
        let max_segments = b.get_i32("max-segments").map_err(blk_err)?.max(1) as usize;
        let align = b.get_u64("mem-region-alignment").map_err(blk_err)? as usize;
        let len = mem.div_ceil(align) * align;
        let region = b.alloc_mem_region(len).map_err(blk_err)?;
        b.map_mem_region(&region).map_err(blk_err)?;
        let mut c = Client {
            queue: started.queues.into_iter().next(),
            blkio: b,
            region,
            capacity,
            max_segment_len,
            max_segments,
        };
        ensure!(c.queue.is_some(), "the driver started no queue");
        // Written data is never all zeros (no zero detection shortcut).
        for (i, chunk) in c.mem().chunks_mut(8).enumerate() {
            let bytes = splitmix64(i as u64).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(c)
    }

    /// Capacity in bytes, as the device reports it.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is `region.len` bytes this client allocated and
        // mapped; it stays mapped until `drop`, and the returned borrow of
        // `self` keeps any other access through this client out meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Segments (offset in the slot, length) of one request of `len` bytes.
    fn segments(&self, len: usize) -> Result<Vec<(usize, usize)>> {
        let seg = if self.max_segment_len == 0 {
            len
        } else {
            self.max_segment_len.min(len)
        };
        let segs: Vec<(usize, usize)> = (0..len)
            .step_by(seg)
            .map(|o| (o, seg.min(len - o)))
            .collect();
        ensure!(
            segs.len() <= self.max_segments,
            "a {len}-byte request needs {} segments of {seg} bytes, the device takes {}",
            segs.len(),
            self.max_segments
        );
        Ok(segs)
    }

    /// Runs `job`; `on_measure` is called when the measurement starts (after
    /// the warm-up) so the caller can sample the servers' CPU time.
    pub fn run(&mut self, job: &Job, on_measure: &mut dyn FnMut()) -> Result<Measured> {
        let bs = job.block_size;
        ensure!(
            bs > 0 && bs % 512 == 0,
            "block size must be a multiple of 512"
        );
        ensure!(job.depth > 0, "queue depth must be at least 1");
        ensure!(
            job.range >= bs as u64 && job.range <= self.capacity,
            "range {} must be between the block size and the capacity {}",
            job.range,
            self.capacity
        );
        ensure!(
            job.depth * bs <= self.region.len,
            "{} requests of {bs} bytes do not fit in {} bytes of shared memory",
            job.depth,
            self.region.len
        );
        let segs = self.segments(bs)?;
        let base = self.region.addr as *mut u8;
        // Per slot: its iovecs (they must stay valid until completion:
        // the driver may keep a request in its backlog).
        let iovs: Vec<Vec<iovec>> = (0..job.depth)
            .map(|slot| {
                segs.iter()
                    .map(|&(o, l)| iovec {
                        // SAFETY: slot * bs + o + l ≤ depth * bs ≤ region.len
                        // (checked above): inside the mapped region.
                        iov_base: unsafe { base.add(slot * bs + o) }.cast(),
                        iov_len: l,
                    })
                    .collect()
            })
            .collect();
        let blocks = job.range / bs as u64;
        let mut rng = job.seed;
        let mut cursor = job.start / bs as u64;
        let one_pass = job.duration.is_none();
        let mut next_offset = || -> Option<u64> {
            match job.pattern {
                Pattern::Random => {
                    rng = rng.wrapping_add(1);
                    Some((splitmix64(rng) % blocks) * bs as u64)
                }
                Pattern::Sequential => {
                    if cursor >= blocks {
                        if one_pass {
                            return None;
                        }
                        cursor = 0;
                    }
                    cursor += 1;
                    Some((cursor - 1) * bs as u64)
                }
            }
        };

        let q = self.queue.as_mut().context("no queue")?;
        let mut started = vec![Instant::now(); job.depth];
        let submit = |q: &mut Blkioq, slot: usize, offset: u64, started: &mut [Instant]| {
            started[slot] = Instant::now();
            let iov = &iovs[slot];
            if iov.len() == 1 {
                let p = iov[0].iov_base.cast::<u8>();
                if job.write {
                    q.write(offset, p, bs, slot, ReqFlags::empty());
                } else {
                    q.read(offset, p, bs, slot, ReqFlags::empty());
                }
            } else if job.write {
                q.writev(
                    offset,
                    iov.as_ptr(),
                    iov.len() as u32,
                    slot,
                    ReqFlags::empty(),
                );
            } else {
                q.readv(
                    offset,
                    iov.as_ptr(),
                    iov.len() as u32,
                    slot,
                    ReqFlags::empty(),
                );
            }
        };

        let mut m = Measured::default();
        let expected = job
            .duration
            .map(|d| (d.as_secs_f64() * 200_000.0) as usize)
            .unwrap_or(blocks as usize);
        m.latencies_ns.reserve(expected.min(4 << 20));
        let mut measuring = job.warmup.is_zero();
        let mut t0 = Instant::now();
        let mut cpu0 = thread_cpu();
        if measuring {
            on_measure();
            t0 = Instant::now();
            cpu0 = thread_cpu();
        }
        let warm_end = t0 + job.warmup;
        let mut end = job.duration.map(|d| warm_end + d);
        let mut stopping = false;
        let mut in_flight = 0usize;
        for slot in 0..job.depth {
            match next_offset() {
                Some(off) => {
                    submit(q, slot, off, &mut started);
                    in_flight += 1;
                }
                None => break,
            }
        }
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..job.depth).map(|_| MaybeUninit::uninit()).collect();
        while in_flight > 0 {
            let mut timeout = STALL;
            let n = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
                Ok(n) => n,
                Err(e) => bail!(
                    "waiting for completions ({in_flight} in flight): {}",
                    blk_err(e)
                ),
            };
            let now = Instant::now();
            if !measuring && now >= warm_end {
                measuring = true;
                on_measure();
                t0 = Instant::now();
                cpu0 = thread_cpu();
                end = job.duration.map(|d| t0 + d);
            }
            if let Some(end) = end {
                if measuring && now >= end {
                    stopping = true;
                }
            }
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                let slot = c.user_data;
                if measuring {
                    m.ios += 1;
                    m.bytes += bs as u64;
                    m.latencies_ns
                        .push(now.duration_since(started[slot]).as_nanos() as u64);
                    if c.ret != 0 {
                        m.errors += 1;
                        if m.first_error.is_none() {
                            m.first_error = Some(format!(
                                "{} failed: {}",
                                if job.write { "write" } else { "read" },
                                std::io::Error::from_raw_os_error(-c.ret)
                            ));
                        }
                    }
                }
                in_flight -= 1;
                if !stopping {
                    if let Some(off) = next_offset() {
                        submit(q, slot, off, &mut started);
                        in_flight += 1;
                    }
                }
            }
        }
        m.elapsed = t0.elapsed();
        m.client_cpu = thread_cpu().saturating_sub(cpu0);
        m.sort();
        Ok(m)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.queue = None;
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

/// The CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid `ts`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// SplitMix64's output function: `splitmix64(seed + i)` for i = 0, 1, … is
/// a fast, well-mixed 64-bit sequence (offsets and data).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
