//! One multiplexed connection to a storage node.
//!
//! Any number of requests may be in flight: each caller registers its request
//! id, hands its frame to the connection's sender, and awaits its reply, which
//! a reader task routes back by id. A connection that fails in any way is
//! marked broken and every pending caller gets an error; the next request to
//! the node opens a new one.
//!
//! Sending is batched: a small frame (header, fixed fields and a payload of
//! at most [`COPY_MAX`] bytes) is appended to the connection's outbox, and a
//! writer task sends everything the outbox holds with one `write` once the
//! tasks that are ready to run have run, so the frames of a burst of
//! requests (a queue depth of 32 makes 32 writes per copy) leave in one
//! system call instead of one each. The copy into the outbox costs less
//! than the system calls it saves, and a frame in the outbox is sent whole
//! even if its caller gives up, so the stream never gets out of step. A
//! larger write is sent by its caller straight from its buffers (header,
//! fixed fields and payload slices in one `writev`, no copy), under the same
//! lock as the writer task's sends, so frames never interleave.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::{
    read_header, Frame, Header, Hello, HelloReply, Request, ShmRange, ShmSeg, Status, HEADER_LEN,
    MAX_FIXED, PROTOCOL_MARKS, PROTOCOL_MAX, PROTOCOL_MIN, SHM_CHECK_CRC,
};
use thiserror::Error;
use tokio::io::BufReader;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::link::{BootGuard, BootWatch, NodeAddr};
use crate::shm::{SharedMemory, ShmTable};

/// The protocol versions a link offers: with `marks` (the volume keeps its
/// activity log on the nodes) only versions whose nodes keep activity
/// marks, else only those that do not (a node keeps marks for a client that
/// speaks their version, and only this volume would clear them).
fn offer(marks: bool) -> (u16, u16) {
    if marks {
        (PROTOCOL_MARKS, PROTOCOL_MAX)
    } else {
        (PROTOCOL_MIN, PROTOCOL_MARKS - 1)
    }
}

/// The receiving side, buffered: many replies come in with one `read`.
type Rx = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
/// The sending side (a TCP or Unix socket).
type Tx = Box<dyn AsyncWrite + Send + Unpin>;

/// Bytes of the receive buffer; larger read bodies bypass it.
const RX_BUFFER: usize = 64 * 1024;

/// Payloads up to this size are copied into the outbox and sent in batches;
/// larger ones are sent from the caller's buffers.
pub(crate) const COPY_MAX: usize = 64 * 1024;

/// An outbox buffer grown beyond this by a burst is not kept for reuse.
const OUTBOX_KEEP: usize = 1 << 20;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Why a request to a node got no answer.
#[derive(Debug, Clone, Error)]
pub enum ConnError {
    #[error("cannot connect to storage node {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to storage node {addr} failed: {reason}")]
    Broken { addr: String, reason: String },
    #[error("storage node {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("storage node {addr} speaks no protocol version in {min}..={max}")]
    Version { addr: String, min: u16, max: u16 },
    /// The node's machine restarted since this volume last reached it: what
    /// it acknowledged but had not made stable is gone. Every request fails
    /// so until the volume accepts the new boot ([`crate::link::BootGuard`]).
    #[error("storage node {addr} restarted its machine: its unflushed writes may be lost")]
    Rebooted { addr: String },
}

/// How a reply reaches its caller.
pub(crate) enum Delivery {
    /// The whole frame, read by the connection's reader.
    Frame(Frame),
    /// The header only: the caller reads the body straight off the socket
    /// into its own buffers, then hands the socket back through `back`.
    Stream {
        header: Header,
        rd: Rx,
        back: oneshot::Sender<Rx>,
    },
}

struct Waiter {
    tx: oneshot::Sender<Result<Delivery, ConnError>>,
    /// The caller takes an `Ok` reply's body off the socket itself.
    stream: bool,
    /// The watchdog tick after which the caller gets `Timeout`.
    deadline: u64,
    timeout: Duration,
}

/// Hashes request ids (sequential numbers) with one multiplication: no
/// SipHash on every request and reply.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Pending = Mutex<HashMap<u64, Waiter, BuildHasherDefault<IdHasher>>>;

/// Timeouts are kept by one watchdog per connection, not one timer per
/// request: it ticks every `timeout / 8` (10 ms..1 s) and fails the callers
/// whose deadline tick has passed, so a request times out between `timeout`
/// and `timeout` plus one tick after it was sent.
fn watchdog_tick(timeout: Duration) -> Duration {
    (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

async fn watchdog(pending: Arc<Pending>, clock: Arc<AtomicU64>, tick: Duration, addr: String) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = clock.fetch_add(1, Ordering::AcqRel) + 1;
        let expired: Vec<Waiter> = {
            let mut p = pending.lock().expect("pending map poisoned");
            let ids: Vec<u64> = p
                .iter()
                .filter(|(_, w)| w.deadline < now)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| p.remove(id)).collect()
        };
        for w in expired {
            let _ = w.tx.send(Err(ConnError::Timeout {
                addr: addr.clone(),
                timeout: w.timeout,
            }));
        }
    }
}

/// Reads and drops `len` bytes.
async fn drain(rd: &mut Rx, mut len: usize) -> std::io::Result<()> {
    // On the heap: in the future's state it would make every read's future
    // 8 KiB larger.
    let mut scratch = vec![0u8; 8192];
    while len > 0 {
        let n = scratch.len().min(len);
        rd.read_exact(&mut scratch[..n]).await?;
        len -= n;
    }
    Ok(())
}

/// Frames waiting for the writer task: complete frames, back to back.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
}

/// What a local session adds to a connection.
#[derive(Default)]
struct Local {
    /// The shared memory the node mapped (none if the table was empty).
    shm: Option<Arc<ShmTable>>,
    /// The table's generation (`None`: a TCP connection).
    generation: Option<u64>,
}

/// A live connection.
pub(crate) struct Conn {
    addr: String,
    /// Every send holds it for the whole of its frames.
    writer: Arc<tokio::sync::Mutex<Tx>>,
    outbox: Arc<Mutex<Outbox>>,
    /// Wakes the writer task when the outbox gets frames.
    wake_writer: Arc<tokio::sync::Notify>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    broken: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    sender: tokio::task::JoinHandle<()>,
    /// Watchdog ticks since the connection opened.
    clock: Arc<AtomicU64>,
    tick: Duration,
    watchdog: tokio::task::JoinHandle<()>,
    pub(crate) hello: HelloReply,
    /// A local session's shared memory (the node mapped it).
    shm: Option<Arc<ShmTable>>,
    /// A local session's table generation.
    generation: Option<u64>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.sender.abort();
        self.watchdog.abort();
    }
}

/// Marks the connection broken and fails every pending caller.
fn fail_pending(pending: &Pending, broken: &AtomicBool, addr: &str, reason: &str) {
    broken.store(true, Ordering::SeqCst);
    let waiters: Vec<_> = pending
        .lock()
        .expect("pending map poisoned")
        .drain()
        .collect();
    for (_, w) in waiters {
        let _ = w.tx.send(Err(ConnError::Broken {
            addr: addr.to_string(),
            reason: reason.to_string(),
        }));
    }
}

/// The writer task: sends what the outbox holds, in as few system calls as
/// the socket allows, after letting the tasks that are ready run (so the
/// frames they queue go out together).
async fn send_loop(
    writer: Arc<tokio::sync::Mutex<Tx>>,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<tokio::sync::Notify>,
    pending: Arc<Pending>,
    broken: Arc<AtomicBool>,
    addr: String,
) {
    let mut spare: Vec<u8> = Vec::new();
    loop {
        let empty = outbox.lock().expect("outbox poisoned").buf.is_empty();
        if empty {
            wake.notified().await;
        }
        // Deferred until this worker has run every other ready task.
        tokio::task::yield_now().await;
        let mut wr = writer.lock().await;
        loop {
            {
                let mut ob = outbox.lock().expect("outbox poisoned");
                if ob.buf.is_empty() {
                    break;
                }
                std::mem::swap(&mut ob.buf, &mut spare);
            }
            if let Err(e) = wr.write_all(&spare).await {
                fail_pending(&pending, &broken, &addr, &e.to_string());
                return;
            }
            spare.clear();
            if spare.capacity() > OUTBOX_KEEP {
                spare = Vec::new();
            }
        }
    }
}

/// Marks a connection broken if a frame write is abandoned half way (the
/// caller's future was dropped): the byte stream would be out of step.
struct SendGuard<'a> {
    broken: &'a AtomicBool,
    done: bool,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.broken.store(true, Ordering::Release);
        }
    }
}

impl Conn {
    /// Opens a local session on the node's Unix socket `path`: passes it
    /// `table`'s regions, then says hello.
    pub(crate) async fn connect_local(
        path: &str,
        client: [u8; 16],
        timeout: Duration,
        table: Arc<ShmTable>,
        marks: bool,
    ) -> Result<Arc<Conn>, ConnError> {
        let fail = |reason: String| ConnError::Connect {
            addr: path.to_string(),
            reason,
        };
        let handshake = {
            let path = path.to_string();
            let table = table.clone();
            tokio::task::spawn_blocking(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&path)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                let (regions, fds) = table.wire();
                tessera_proto::local::client_handshake(&mut s, &regions, &fds)?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            })
        };
        let std = handshake
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
        // Registered for reading only (see `tessera_proto::local::split`).
        let (rd, wr) = tessera_proto::local::split(std).map_err(|e| fail(e.to_string()))?;
        let generation = Some(table.generation);
        let shm = (!table.is_empty()).then_some(table);
        let local = Local { shm, generation };
        Self::start(
            path,
            Box::new(rd),
            Box::new(wr),
            client,
            timeout,
            local,
            marks,
        )
        .await
    }

    /// Connects over TCP and says hello.
    pub(crate) async fn connect(
        addr: &str,
        client: [u8; 16],
        timeout: Duration,
        marks: bool,
    ) -> Result<Arc<Conn>, ConnError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnError::Timeout {
                addr: addr.to_string(),
                timeout,
            })?
            .map_err(|e| ConnError::Connect {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        stream.set_nodelay(true).map_err(|e| ConnError::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        let (rd, wr) = stream.into_split();
        Self::start(
            addr,
            Box::new(rd),
            Box::new(wr),
            client,
            timeout,
            Local::default(),
            marks,
        )
        .await
    }

    /// Starts the connection's tasks and says hello.
    async fn start(
        addr: &str,
        rd: Box<dyn AsyncRead + Send + Unpin>,
        wr: Tx,
        client: [u8; 16],
        timeout: Duration,
        local: Local,
        marks: bool,
    ) -> Result<Arc<Conn>, ConnError> {
        let (min_version, max_version) = offer(marks);
        let mut rd = BufReader::with_capacity(RX_BUFFER, rd);
        let pending: Arc<Pending> = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let reader = {
            let pending = pending.clone();
            let broken = broken.clone();
            let addr = addr.to_string();
            tokio::spawn(async move {
                let reason = loop {
                    let header = match read_header(&mut rd).await {
                        Ok(Some(h)) => h,
                        Ok(None) => break "node closed the connection".to_string(),
                        Err(e) => break format!("{e}: {:?}", std::error::Error::source(&e)),
                    };
                    if !header.is_reply() {
                        break "node sent a request frame".to_string();
                    }
                    let len = header.body_len as usize;
                    let waiter = pending
                        .lock()
                        .expect("pending map poisoned")
                        .remove(&header.id);
                    let Some(waiter) = waiter else {
                        tracing::debug!(id = header.id, "reply for an abandoned request");
                        if let Err(e) = drain(&mut rd, len).await {
                            break e.to_string();
                        }
                        continue;
                    };
                    if waiter.stream && header.status() == Status::Ok && len > 0 {
                        let (back, returned) = oneshot::channel();
                        match waiter.tx.send(Ok(Delivery::Stream { header, rd, back })) {
                            Ok(()) => match returned.await {
                                Ok(r) => rd = r,
                                // The caller went away half way through the body.
                                Err(_) => break "a reader abandoned a reply body".to_string(),
                            },
                            Err(Ok(Delivery::Stream { rd: r, .. })) => {
                                rd = r;
                                if let Err(e) = drain(&mut rd, len).await {
                                    break e.to_string();
                                }
                            }
                            Err(_) => unreachable!("a stream delivery comes back as sent"),
                        }
                        continue;
                    }
                    let mut body = vec![0u8; len];
                    if let Err(e) = rd.read_exact(&mut body).await {
                        break e.to_string();
                    }
                    let _ = waiter.tx.send(Ok(Delivery::Frame(Frame { header, body })));
                };
                fail_pending(&pending, &broken, &addr, &reason);
            })
        };
        let writer = Arc::new(tokio::sync::Mutex::new(wr));
        let outbox: Arc<Mutex<Outbox>> = Arc::default();
        let wake_writer = Arc::new(tokio::sync::Notify::new());
        let sender = tokio::spawn(send_loop(
            writer.clone(),
            outbox.clone(),
            wake_writer.clone(),
            pending.clone(),
            broken.clone(),
            addr.to_string(),
        ));
        let clock = Arc::new(AtomicU64::new(0));
        let tick = watchdog_tick(timeout);
        let watchdog = tokio::spawn(watchdog(
            pending.clone(),
            clock.clone(),
            tick,
            addr.to_string(),
        ));
        let mut conn = Conn {
            addr: addr.to_string(),
            writer,
            outbox,
            wake_writer,
            pending,
            next_id: AtomicU64::new(1),
            broken,
            reader,
            sender,
            clock,
            tick,
            watchdog,
            hello: HelloReply {
                version: 0,
                node: [0; 16],
                disks: Vec::new(),
                boot: None,
            },
            shm: local.shm,
            generation: local.generation,
        };
        let reply = conn
            .call(
                Request::Hello(Hello {
                    min_version,
                    max_version,
                    client,
                }),
                &[],
                None,
                timeout,
            )
            .await?;
        if reply.header.status() != Status::Ok {
            return Err(ConnError::Version {
                addr: addr.to_string(),
                min: min_version,
                max: max_version,
            });
        }
        conn.hello = HelloReply::decode(&reply.body).map_err(|e| ConnError::Broken {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(conn))
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Sends a request and waits for its reply. `payload` is the data of a
    /// write, sent as is after the fixed fields; `crc` its crc32c if the
    /// caller has it.
    ///
    /// On a local session, a write whose payload lies in shared memory goes
    /// as `WriteShm`: the node takes the data from there, checking it
    /// against `crc` if given (the same data goes to other copies).
    pub(crate) async fn call(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
        timeout: Duration,
    ) -> Result<Frame, ConnError> {
        if let (Request::Write(range, _), Some(shm)) = (req, &self.shm) {
            if let Some(segs) = shm.translate(payload) {
                let req = Request::WriteShm(
                    ShmRange {
                        range,
                        flags: if crc.is_some() { SHM_CHECK_CRC } else { 0 },
                        segments: (segs.len() / ShmSeg::LEN) as u32,
                    },
                    &segs,
                );
                return match self
                    .exchange(req, &[], Some(crc.unwrap_or(0)), timeout, false)
                    .await?
                {
                    Delivery::Frame(f) => Ok(f),
                    Delivery::Stream { .. } => unreachable!("only asked for whole frames"),
                };
            }
        }
        match self.exchange(req, payload, crc, timeout, false).await? {
            Delivery::Frame(f) => Ok(f),
            Delivery::Stream { .. } => unreachable!("only asked for whole frames"),
        }
    }

    /// Sends a read and places an `Ok` reply's data straight into `dest`
    /// from the socket (no intermediate buffer). Returns the reply's header,
    /// and its body when it is not `Ok` (an error message).
    pub(crate) async fn call_read(
        &self,
        req: Request<'_>,
        dest: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(Header, Vec<u8>), ConnError> {
        // A local session places the data in shared memory itself.
        if let (Request::Read(range), Some(shm)) = (req, &self.shm) {
            if let Some(segs) = shm.translate(dest) {
                let req = Request::ReadShm(
                    ShmRange {
                        range,
                        flags: 0,
                        segments: (segs.len() / ShmSeg::LEN) as u32,
                    },
                    &segs,
                );
                return match self.exchange(req, &[], Some(0), timeout, false).await? {
                    Delivery::Frame(f) => Ok((f.header, f.body)),
                    Delivery::Stream { .. } => unreachable!("only asked for whole frames"),
                };
            }
        }
        let delivery = self.exchange(req, &[], None, timeout, true).await?;
        let (header, mut rd, back) = match delivery {
            Delivery::Frame(f) => return Ok((f.header, f.body)),
            Delivery::Stream { header, rd, back } => (header, rd, back),
        };
        let want: usize = dest.iter().map(|d| d.len()).sum();
        let len = header.body_len as usize;
        let placed = tokio::time::timeout(timeout, async {
            if len != want {
                drain(&mut rd, len).await?;
                return Ok(false);
            }
            let mut crc = 0u32;
            for d in dest.iter_mut() {
                rd.read_exact(d).await?;
                crc = tessera_crc::crc32c_append(crc, d);
            }
            Ok::<bool, std::io::Error>(crc == header.payload_crc)
        })
        .await;
        match placed {
            Ok(Ok(true)) => {
                let _ = back.send(rd);
                Ok((header, Vec::new()))
            }
            Ok(Ok(false)) => {
                let _ = back.send(rd);
                Err(ConnError::Broken {
                    addr: self.addr.clone(),
                    reason: "read reply of the wrong length or checksum".into(),
                })
            }
            // Dropping `rd` ends the connection: its stream is out of step.
            Ok(Err(e)) => Err(self.broken_error(&e.to_string())),
            Err(_) => Err(self.broken_error("read reply body timed out")),
        }
    }

    async fn exchange(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
        timeout: Duration,
        stream: bool,
    ) -> Result<Delivery, ConnError> {
        if self.is_broken() {
            return Err(self.broken_error("connection already failed"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A local request's segment list (or a memory map) travels as its payload.
        let listed = [req.payload()];
        let payload: &[&[u8]] = match req {
            Request::Write(..) => payload,
            _ if !listed[0].is_empty() => &listed,
            _ => &[],
        };
        let (head, head_len) = encode_head(&req, id, payload, crc);
        let head = &head[..head_len];
        let (tx, mut rx) = oneshot::channel();
        // Ticks of the watchdog, rounded up, plus the one in progress.
        let ticks = timeout.as_nanos().div_ceil(self.tick.as_nanos().max(1)) as u64 + 1;
        let deadline = self.clock.load(Ordering::Acquire) + ticks;
        self.pending.lock().expect("pending map poisoned").insert(
            id,
            Waiter {
                tx,
                stream,
                deadline,
                timeout,
            },
        );
        let sent = if Self::copied(payload) {
            self.send_copy(head, payload)
        } else {
            // A large frame may wait for the socket: the watchdog's
            // timeout (through `rx`) ends the wait.
            tokio::select! {
                biased;
                r = &mut rx => {
                    return r.unwrap_or_else(|_| Err(self.broken_error("reader stopped")));
                }
                r = self.send_direct(head, payload) => r,
            }
        };
        if let Err(e) = sent {
            self.pending
                .lock()
                .expect("pending map poisoned")
                .remove(&id);
            return Err(e);
        }
        rx.await
            .unwrap_or_else(|_| Err(self.broken_error("reader stopped")))
    }

    /// Whether a frame with this payload goes through the outbox.
    fn copied(payload: &[&[u8]]) -> bool {
        payload.iter().map(|s| s.len()).sum::<usize>() <= COPY_MAX
    }

    /// Queues a small frame in the outbox for the writer task.
    fn send_copy(&self, head: &[u8], payload: &[&[u8]]) -> Result<(), ConnError> {
        {
            let len: usize = payload.iter().map(|s| s.len()).sum();
            let mut ob = self.outbox.lock().expect("outbox poisoned");
            ob.buf.reserve(head.len() + len);
            ob.buf.extend_from_slice(head);
            for s in payload {
                ob.buf.extend_from_slice(s);
            }
        }
        self.wake_writer.notify_one();
        // The writer task may have failed before it could take the frame.
        if self.is_broken() {
            return Err(self.broken_error("connection failed"));
        }
        Ok(())
    }

    /// Sends a large frame straight from the caller's buffers.
    async fn send_direct(&self, head: &[u8], payload: &[&[u8]]) -> Result<(), ConnError> {
        let mut wr = self.writer.lock().await;
        let mut guard = SendGuard {
            broken: &self.broken,
            done: false,
        };
        let mut slices = [IoSlice::new(&[]); 8];
        let mut more = Vec::new();
        let slices: &mut [IoSlice<'_>] = if payload.len() < slices.len() {
            slices[0] = IoSlice::new(head);
            for (d, s) in slices[1..].iter_mut().zip(payload) {
                *d = IoSlice::new(s);
            }
            &mut slices[..1 + payload.len()]
        } else {
            more.push(IoSlice::new(head));
            more.extend(payload.iter().map(|s| IoSlice::new(s)));
            &mut more
        };
        let mut rest: &mut [IoSlice<'_>] = slices;
        // Skip empty slices (a zero-length write would read as a closed socket).
        while rest.first().is_some_and(|s| s.is_empty()) {
            rest = &mut rest[1..];
        }
        while !rest.is_empty() {
            match wr.write_vectored(rest).await {
                Ok(0) => return Err(self.broken_error("socket closed")),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) => {
                    return Err(self.broken_error(&e.to_string()));
                }
            }
        }
        guard.done = true;
        Ok(())
    }

    fn broken_error(&self, reason: &str) -> ConnError {
        self.broken.store(true, Ordering::Release);
        ConnError::Broken {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    pub(crate) async fn close(&self) {
        let mut wr = self.writer.lock().await;
        // What the writer task has not taken yet goes out first.
        let rest = std::mem::take(&mut self.outbox.lock().expect("outbox poisoned").buf);
        if !rest.is_empty() && wr.write_all(&rest).await.is_err() {
            return;
        }
        let _ = wr.shutdown().await;
    }
}

/// Bytes of the largest frame head: header and fixed fields.
const MAX_HEAD: usize = HEADER_LEN + MAX_FIXED;

/// Encodes the head of `req` (header and fixed fields; for a write, the
/// payload is the concatenation of `payload`) into a stack buffer.
/// Encodes a request's header and fixed fields; the payload's crc32c is
/// `crc` if the caller computed it already (one write to several copies).
fn encode_head(
    req: &Request<'_>,
    id: u64,
    payload: &[&[u8]],
    crc: Option<u32>,
) -> ([u8; MAX_HEAD], usize) {
    let mut fixed = [0u8; MAX_FIXED];
    let n = req.encode_fixed(&mut fixed);
    let crc = crc.unwrap_or_else(|| payload_crc(payload));
    let len: usize = payload.iter().map(|s| s.len()).sum();
    let header = Header::request(req.opcode(), id, (n + len) as u32, crc).encode();
    let mut head = [0u8; MAX_HEAD];
    head[..HEADER_LEN].copy_from_slice(&header);
    head[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&fixed[..n]);
    (head, HEADER_LEN + n)
}

/// The crc32c of a payload given as slices.
pub(crate) fn payload_crc(payload: &[&[u8]]) -> u32 {
    payload
        .iter()
        .fold(0u32, |crc, s| tessera_crc::crc32c_append(crc, s))
}

/// A node's address and its (re)connectable connection.
pub(crate) struct NodeLink {
    pub(crate) addr: String,
    /// The node's local-session socket (it is on this host).
    socket: Option<String>,
    shm: Arc<SharedMemory>,
    client: [u8; 16],
    timeout: Duration,
    /// The volume keeps its activity log on the nodes (see [`offer`]).
    marks: bool,
    /// The live connection; read on every request (uncontended read lock).
    current: std::sync::RwLock<Option<Arc<Conn>>>,
    /// Serialises reconnects so a failed node is dialled once, not once per request.
    connecting: tokio::sync::Mutex<()>,
    /// Whether the node rebooted since the volume last reached it.
    pub(crate) boot: BootGuard,
}

impl NodeLink {
    pub(crate) fn new(
        addr: NodeAddr,
        shm: Arc<SharedMemory>,
        client: [u8; 16],
        timeout: Duration,
        boot: Arc<BootWatch>,
    ) -> Self {
        NodeLink {
            addr: addr.addr,
            socket: addr.socket,
            marks: addr.marks,
            shm,
            client,
            timeout,
            current: std::sync::RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            boot: BootGuard::new(boot),
        }
    }

    /// The current connection, unless it failed or is a local session
    /// whose memory table has been replaced since it opened.
    fn live(&self) -> Option<Arc<Conn>> {
        self.current
            .read()
            .expect("connection slot poisoned")
            .as_ref()
            .filter(|c| !c.is_broken())
            .filter(|c| {
                c.generation
                    .is_none_or(|g| g == self.shm.current().generation)
            })
            .cloned()
    }

    /// The live connection, reconnecting if the last one failed.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, ConnError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        // Boxed: dialing's state is large, and every request's future
        // would otherwise carry it.
        Box::pin(self.dial()).await
    }

    /// Connects (one dialer at a time), unless another caller just did.
    async fn dial(&self) -> Result<Arc<Conn>, ConnError> {
        let _one_dialer = self.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let local = match &self.socket {
            Some(path) => {
                let table = self.shm.current();
                match Conn::connect_local(path, self.client, self.timeout, table, self.marks).await
                {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, addr = %self.addr, "no local session: using TCP");
                        None
                    }
                }
            }
            None => None,
        };
        let c = match local {
            Some(c) => c,
            None => Conn::connect(&self.addr, self.client, self.timeout, self.marks).await?,
        };
        // Before any request can go on it.
        self.boot.connected(c.hello.boot);
        *self.current.write().expect("connection slot poisoned") = Some(c.clone());
        Ok(c)
    }

    /// Sends a request with its payload; `crc` is the payload's crc32c when
    /// a caller that sends the same payload to several copies computed it once.
    pub(crate) async fn call_crc(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
        crc: Option<u32>,
    ) -> Result<Frame, ConnError> {
        let conn = self.conn().await?;
        self.boot.check(&self.addr)?;
        conn.call(req, payload, crc, self.timeout).await
    }

    /// A read whose data the node's reply places straight into `dest`.
    pub(crate) async fn call_read(
        &self,
        req: Request<'_>,
        dest: &mut [&mut [u8]],
    ) -> Result<(Header, Vec<u8>), ConnError> {
        let conn = self.conn().await?;
        self.boot.check(&self.addr)?;
        conn.call_read(req, dest, self.timeout).await
    }

    pub(crate) async fn close(&self) {
        let c = self
            .current
            .write()
            .expect("connection slot poisoned")
            .take();
        if let Some(c) = c {
            c.close().await;
        }
    }
}
