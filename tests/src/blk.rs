//! A vhost-user-blk client for tests and benchmarks, on libblkio's pure-Rust
//! `virtio-blk-vhost-user` driver (the `blkio` crate): an independent
//! implementation of the front-end side, so the device is tested against
//! something other than itself, without booting a guest.

use std::path::Path;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// One I/O. Buffers are byte ranges of the queue's slice of shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64, buf: usize, len: usize },
    Write { offset: u64, buf: usize, len: usize },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// A connected client with `queues` queues, each owning `per_queue` bytes of
/// memory shared with the device.
pub struct BlkClient {
    // Field order matters: queues and the driver go before the memory region.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    per_queue: usize,
    capacity: u64,
}

/// A queue and its memory, for one thread.
pub struct QueueHandle<'a> {
    q: &'a mut Blkioq,
    mem: &'a mut [u8],
}

fn err(e: blkio::Error) -> String {
    // `blkio::Error` is neither Clone nor std::error::Error: keep its text.
    format!("{} ({:?})", e.message(), e.errno())
}

impl BlkClient {
    pub fn connect(socket: &Path, queues: usize, per_queue: usize) -> Result<BlkClient, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err)?;
        b.set_str("path", &socket.display().to_string())
            .map_err(err)?;
        b.connect().map_err(err)?;
        b.set_i32("num-queues", queues as i32).map_err(err)?;
        let started = b.start().map_err(err)?;
        let capacity = b.get_u64("capacity").map_err(err)?;
        let align = b.get_u64("mem-region-alignment").map_err(err)? as usize;
        let per_queue = per_queue.div_ceil(align) * align;
        let region = b.alloc_mem_region(per_queue * queues).map_err(err)?;
        b.map_mem_region(&region).map_err(err)?;
        Ok(BlkClient {
            queues: started.queues,
            blkio: b,
            region,
            per_queue,
            capacity,
        })
    }

    /// Capacity in bytes, as the device reports it.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// A property of the device (`max-segments`, `max-queues`, …).
    pub fn property_u64(&self, name: &str) -> Result<u64, String> {
        self.blkio.get_u64(name).map_err(err)
    }

    pub fn property_i32(&self, name: &str) -> Result<i32, String> {
        self.blkio.get_i32(name).map_err(err)
    }

    /// Every queue with its own memory, to use from as many threads.
    pub fn queues(&mut self) -> Vec<QueueHandle<'_>> {
        // SAFETY: the region is `per_queue * queues.len()` bytes of memory
        // this client mapped and owns until it is dropped, which outlives the
        // returned borrows of `self`; the per-queue slices are disjoint.
        let all =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        self.queues
            .iter_mut()
            .zip(all.chunks_mut(self.per_queue))
            .map(|(q, mem)| QueueHandle { q, mem })
            .collect()
    }

    /// The first queue.
    pub fn queue(&mut self) -> QueueHandle<'_> {
        self.queues().swap_remove(0)
    }
}

impl Drop for BlkClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

impl QueueHandle<'_> {
    /// This queue's shared memory.
    pub fn mem(&mut self) -> &mut [u8] {
        self.mem
    }

    /// Submits every op at once and waits for all; the result of each, in order.
    pub fn run(&mut self, ops: &[Op]) -> Vec<Result<(), String>> {
        let base = self.mem.as_mut_ptr();
        let len = self.mem.len();
        let mut results: Vec<Option<Result<(), String>>> = vec![None; ops.len()];
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Read {
                    offset,
                    buf,
                    len: n,
                } => {
                    assert!(buf + n <= len, "buffer outside the queue's memory");
                    // SAFETY: `buf + n` is within this queue's slice of the mapped region.
                    let p = unsafe { base.add(buf) };
                    self.q.read(offset, p, n, i, ReqFlags::empty());
                }
                Op::Write {
                    offset,
                    buf,
                    len: n,
                } => {
                    assert!(buf + n <= len, "buffer outside the queue's memory");
                    // SAFETY: `buf + n` is within this queue's slice of the mapped region.
                    let p = unsafe { base.add(buf) };
                    self.q.write(offset, p, n, i, ReqFlags::empty());
                }
                Op::Flush => self.q.flush(i, ReqFlags::empty()),
                Op::Discard { offset, len } => self.q.discard(offset, len, i, ReqFlags::empty()),
                Op::WriteZeroes { offset, len, unmap } => {
                    let flags = if unmap {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    self.q.write_zeroes(offset, len, i, flags)
                }
            }
        }
        let mut done = 0;
        let mut completions: Vec<std::mem::MaybeUninit<Completion>> = (0..ops.len())
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();
        while done < ops.len() {
            let n = match self.q.do_io(&mut completions, 1, None, None) {
                Ok(n) => n,
                Err(e) => {
                    let msg = err(e);
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(Err(msg.clone()));
                    }
                    break;
                }
            };
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                results[c.user_data] = Some(if c.ret == 0 {
                    Ok(())
                } else {
                    Err(format!("request failed with {}", c.ret))
                });
            }
            done += n;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("no completion".into())))
            .collect()
    }

    /// Writes `data` at `offset` through the queue's memory (one request).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.mem[..data.len()].copy_from_slice(data);
        self.run(&[Op::Write {
            offset,
            buf: 0,
            len: data.len(),
        }])
        .remove(0)
    }

    /// Reads `len` bytes at `offset` (one request).
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.run(&[Op::Read {
            offset,
            buf: 0,
            len,
        }])
        .remove(0)?;
        Ok(self.mem[..len].to_vec())
    }

    pub fn flush(&mut self) -> Result<(), String> {
        self.run(&[Op::Flush]).remove(0)
    }
}
