//! The storage protocol server: one task reads a connection's frames and runs
//! the small requests itself; large ones and metadata work run on the blocking
//! pool. The reading task writes the replies it produced in batches, once no
//! whole frame is left in its buffer (so a lone request is answered by the
//! thread that read it, with no hand-off); a second task writes the blocking
//! pool's replies.
//!
//! A malformed frame drops its connection (and only that connection); a
//! well-formed request that fails gets an error status in its reply.

use std::io::IoSlice;
use std::sync::Arc;

use tessera_chunkstore::{Disk, Error as StoreError};
use tessera_proto::{
    read_frame, ChunkRange, FenceReply, Frame, Header, HelloReply, Opcode, Request, ShmRange,
    Status, UnmarkRef, VdiskRef, VouchRef, HEADER_LEN, MAX_DOUBTED, MAX_MARKS, PROTOCOL_MARKS,
    PROTOCOL_MAX, PROTOCOL_MIN, SHM_CHECK_CRC,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::disks::DiskSet;
use crate::marks::{MarkOp, MarkStore, VdiskMarks};
use crate::shm::ShmTable;

/// How long a local client may take to send its memory map.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Requests one connection may have in flight before the node stops reading it.
const MAX_IN_FLIGHT: usize = 256;
/// Replies written with one `writev`.
const MAX_BATCH: usize = 64;
/// Reads and writes up to this size run on the connection's own task.
const INLINE_MAX: u32 = 64 * 1024;

/// The identity of this machine's current boot, sent in every `Hello`
/// reply: a volume client that finds it changed since it last reached this
/// node knows the node's page cache is gone, and with it every write the
/// node acknowledged but had not made stable. Linux's `boot_id`; where it
/// cannot be read, a random identity per process (every restart then looks
/// like a reboot: copies are resynced that need not be, nothing is lost).
/// `TESSERA_BOOT_ID` (a uuid) overrides it, for tests that restart a node
/// as if its machine had rebooted.
pub fn boot_id() -> [u8; 16] {
    static BOOT: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        let read = std::env::var("TESSERA_BOOT_ID")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok());
        match read.as_deref().map(|s| Uuid::parse_str(s.trim())) {
            Some(Ok(u)) => *u.as_bytes(),
            _ => {
                tracing::warn!("no boot identity readable: using one per process");
                *Uuid::new_v4().as_bytes()
            }
        }
    })
}

/// [`boot_id`] folded to the non-zero tag disks record with epoch raises.
pub fn boot_tag() -> u64 {
    let b = boot_id();
    let tag = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
        ^ u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
    tag.max(1)
}

/// A running server; [`Server::stop`] ends it and its connections.
pub struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves the storage protocol on `listener`, and local sessions on
/// `local` (a Unix socket on this host), until stopped.
pub fn serve(
    listener: TcpListener,
    local: Option<UnixListener>,
    node: Uuid,
    disks: Arc<DiskSet>,
    marks: Arc<MarkStore>,
) -> Server {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let disks = disks.clone();
                        let marks = marks.clone();
                        conns.spawn(async move {
                            tracing::debug!(%peer, "connection opened");
                            tcp_connection(stream, node, disks, marks).await;
                            tracing::debug!(%peer, "connection closed");
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                accepted = accept_local(local.as_ref()) => match accepted {
                    Ok(stream) => {
                        let disks = disks.clone();
                        let marks = marks.clone();
                        conns.spawn(async move {
                            tracing::debug!("local session opened");
                            local_connection(stream, node, disks, marks).await;
                            tracing::debug!("local session closed");
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "local accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
    });
    Server { stop, task }
}

/// The next local session, or never without a local listener.
async fn accept_local(local: Option<&UnixListener>) -> std::io::Result<UnixStream> {
    match local {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// One encoded reply.
struct Reply {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
}

impl Reply {
    fn new(op: Opcode, id: u64, status: Status, body: Vec<u8>) -> Self {
        let crc = if status == Status::Ok && op == Opcode::Read {
            tessera_crc::crc32c(&body)
        } else {
            0
        };
        let header = Header::reply(op, id, status, body.len() as u32, crc).encode();
        Reply { header, body }
    }

    fn error(op: Opcode, id: u64, status: Status, message: &str) -> Self {
        Reply::new(op, id, status, message.as_bytes().to_vec())
    }
}

async fn tcp_connection(stream: TcpStream, node: Uuid, disks: Arc<DiskSet>, marks: Arc<MarkStore>) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY");
    }
    let (rd, wr) = stream.into_split();
    connection(rd, wr, peer, node, disks, marks, None).await;
}

/// A local session: the memory-map handshake (blocking, bounded by
/// [`HANDSHAKE_TIMEOUT`]), then the protocol with shared-memory requests.
async fn local_connection(
    stream: UnixStream,
    node: Uuid,
    disks: Arc<DiskSet>,
    marks: Arc<MarkStore>,
) {
    let handshake = tokio::task::spawn_blocking(move || {
        let mut std = stream.into_std()?;
        std.set_nonblocking(false)?;
        std.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        std.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let (regions, fds) = tessera_proto::local::server_receive(&std)?;
        let table = ShmTable::map(&regions, &fds);
        let answer = table.as_ref().map(|_| ()).map_err(Clone::clone);
        tessera_proto::local::server_answer(&mut std, answer)?;
        let table = table.map_err(std::io::Error::other)?;
        std.set_read_timeout(None)?;
        std.set_write_timeout(None)?;
        std.set_nonblocking(true)?;
        Ok::<_, std::io::Error>((std, table, regions.len()))
    })
    .await;
    let (std, table, regions) = match handshake {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "local session handshake failed");
            return;
        }
        Err(_) => return,
    };
    // Registered for reading only (see `tessera_proto::local::split`).
    let (rd, wr) = match tessera_proto::local::split(std) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register a local session");
            return;
        }
    };
    tracing::info!(regions, "local session: mapped the client's memory");
    connection(
        rd,
        wr,
        "local".into(),
        node,
        disks,
        marks,
        Some(Arc::new(table)),
    )
    .await;
}

async fn connection<R, W>(
    rd: R,
    wr: W,
    peer: String,
    node: Uuid,
    disks: Arc<DiskSet>,
    marks: Arc<MarkStore>,
    shm: Option<Arc<ShmTable>>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Buffered: a burst of pipelined requests is read with one syscall.
    let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
    let wr = Arc::new(Mutex::new(wr));
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_loop(wr.clone(), rx));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Replies of this task, written before it would wait for more requests.
    let mut ready: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    // Activity marks are kept for clients that speak a version with them.
    let mut session = Arc::new(Session {
        marks: marks.clone(),
        marking: false,
    });
    loop {
        if !ready.is_empty() && (ready.len() >= MAX_BATCH || !whole_frame(rd.buffer())) {
            if let Err(e) = answer(&wr, &mut ready, &disks).await {
                tracing::debug!(%peer, error = %e, "reply write failed");
                break;
            }
        }
        let frame = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%peer, error = %e, cause = ?std::error::Error::source(&e), "dropping connection");
                break;
            }
        };
        let op = match Op::decode(&frame) {
            Ok(op) => op,
            Err(tessera_proto::ProtoError::PayloadChecksum) => {
                // The frame is whole and the stream in step: refuse this
                // write alone.
                tracing::warn!(
                    %peer,
                    id = frame.header.id,
                    "write payload failed its checksum"
                );
                ready.push(Reply::error(
                    frame.header.opcode,
                    frame.header.id,
                    Status::BadPayload,
                    "payload checksum mismatch",
                ));
                continue;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "malformed request, dropping connection");
                break;
            }
        };
        let id = frame.header.id;
        if let Op::Hello { min, max } = op {
            let reply = if min > PROTOCOL_MAX || max < PROTOCOL_MIN {
                Reply::error(
                    Opcode::Hello,
                    id,
                    Status::Unsupported,
                    &format!("node speaks protocol versions {PROTOCOL_MIN}..={PROTOCOL_MAX}"),
                )
            } else {
                let version = max.min(PROTOCOL_MAX);
                session = Arc::new(Session {
                    marks: marks.clone(),
                    marking: version >= PROTOCOL_MARKS,
                });
                let body = HelloReply {
                    version,
                    node: *node.as_bytes(),
                    disks: disks.uuids().iter().map(|u| *u.as_bytes()).collect(),
                    boot: Some(boot_id()),
                }
                .encode();
                Reply::new(Opcode::Hello, id, Status::Ok, body)
            };
            ready.push(reply);
            continue;
        }
        // Small data requests land in (or come from) the page cache in a few
        // microseconds: running them here saves two thread hand-offs. Large
        // ones, flushes and metadata work go to the blocking pool.
        if op.is_small() && !session.must_mark(&op) {
            ready.push(execute(
                &disks,
                &session,
                shm.as_deref(),
                op,
                frame,
                Commit::BeforeReply,
            ));
            continue;
        }
        // About to wait for the blocking pool: answer what is done first.
        if !ready.is_empty() && in_flight.available_permits() == 0 {
            if let Err(e) = answer(&wr, &mut ready, &disks).await {
                tracing::debug!(%peer, error = %e, "reply write failed");
                break;
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let disks = disks.clone();
        let shm = shm.clone();
        let tx = tx.clone();
        let session = session.clone();
        tokio::task::spawn_blocking(move || {
            let reply = execute(&disks, &session, shm.as_deref(), op, frame, Commit::Now);
            drop(permit);
            let _ = tx.send(reply);
        });
    }
    // What this task answered goes out first; outstanding blocking tasks
    // hold their own senders: the writer finishes once every accepted
    // request has been answered.
    if !ready.is_empty() {
        if let Err(e) = answer(&wr, &mut ready, &disks).await {
            tracing::debug!(%peer, error = %e, "reply write failed");
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Whether `buf` starts with a whole frame (or with bytes that are no frame
/// header: reading them fails at once). Otherwise reading the next request
/// may wait for the client.
fn whole_frame(buf: &[u8]) -> bool {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return false;
    };
    match Header::decode(head) {
        Ok(h) => buf.len() - HEADER_LEN >= h.body_len as usize,
        Err(_) => true,
    }
}

/// Answers the requests the connection's task ran: first commits the
/// block crcs their writes left in the disks' crc journals (one write per
/// disk for the whole batch), so that nothing is acknowledged that a
/// `kill -9` of the node would lose. A commit that fails answers nothing:
/// the connection is dropped, and the client fails every request it had
/// in flight here.
async fn answer<W: AsyncWrite + Unpin>(
    wr: &Mutex<W>,
    replies: &mut Vec<Reply>,
    disks: &DiskSet,
) -> std::io::Result<()> {
    for d in disks.iter() {
        if let Err(e) = d.commit() {
            tracing::error!(disk = %d.uuid(), error = %e, "cannot commit block checksums");
            replies.clear();
            return Err(std::io::Error::other(e));
        }
    }
    write_replies(wr, replies).await
}

/// Writes `replies` (emptied) with as few `writev` calls as the socket allows.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: &Mutex<W>,
    replies: &mut Vec<Reply>,
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(replies.len() * 2);
    for r in replies.iter() {
        slices.push(IoSlice::new(&r.header));
        if !r.body.is_empty() {
            slices.push(IoSlice::new(&r.body));
        }
    }
    let result = write_all_vectored(&mut *wr.lock().await, &mut slices).await;
    replies.clear();
    result
}

/// Writes the blocking pool's replies, in batches, then closes the sending side.
async fn write_loop<W: AsyncWrite + Unpin>(
    wr: Arc<Mutex<W>>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) {
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Err(e) = write_replies(&wr, &mut batch).await {
            tracing::debug!(error = %e, "reply write failed");
            return;
        }
    }
    let _ = wr.lock().await.shutdown().await;
}

/// Writes every slice, in as few `writev` calls as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// A validated request that owns nothing but fixed fields; a write's payload
/// stays in the frame body it arrived in.
#[derive(Debug, Clone, Copy)]
enum Op {
    Hello {
        min: u16,
        max: u16,
    },
    Read(ChunkRange),
    Write(ChunkRange),
    Flush([u8; 16]),
    Discard(ChunkRange),
    WriteZeroes(ChunkRange),
    Fence(VdiskRef),
    DeleteVdisk(VdiskRef),
    Vouch(VouchRef),
    Unmark(UnmarkRef),
    /// A local session's first frame, anywhere else: refused.
    MapMemory,
    ReadShm(ShmRange),
    WriteShm(ShmRange),
}

impl Op {
    fn decode(frame: &Frame) -> Result<Op, tessera_proto::ProtoError> {
        Ok(match Request::decode(&frame.header, &frame.body)? {
            Request::Hello(h) => Op::Hello {
                min: h.min_version,
                max: h.max_version,
            },
            Request::Read(r) => Op::Read(r),
            Request::Write(r, _) => Op::Write(r),
            Request::Flush(d) => Op::Flush(d.disk),
            Request::Discard(r) => Op::Discard(r),
            Request::WriteZeroes(r) => Op::WriteZeroes(r),
            Request::Fence(v) => Op::Fence(v),
            Request::DeleteVdisk(v) => Op::DeleteVdisk(v),
            Request::Vouch(v) => Op::Vouch(v),
            Request::Unmark(u, _) => Op::Unmark(u),
            Request::MapMemory(_) => Op::MapMemory,
            Request::ReadShm(r, _) => Op::ReadShm(r),
            Request::WriteShm(r, _) => Op::WriteShm(r),
        })
    }

    /// Reads and writes of at most [`INLINE_MAX`] bytes, and every
    /// local-session read and write: with no socket copy left, the hand-off
    /// to the blocking pool and back was a quarter of the CPU of a 1 MiB
    /// request (bench/results/perf/12). A page-cache miss then delays that
    /// session (one VM queue) and what shares its runtime worker, which the
    /// other worker steals from.
    fn is_small(&self) -> bool {
        match self {
            Op::Read(r) | Op::Write(r) => r.len <= INLINE_MAX,
            Op::ReadShm(_) | Op::WriteShm(_) => true,
            _ => false,
        }
    }

    /// The range a request changes (writes, discards, zeroes).
    fn changes(&self) -> Option<&ChunkRange> {
        match self {
            Op::Write(r) | Op::Discard(r) | Op::WriteZeroes(r) => Some(r),
            Op::WriteShm(sr) => Some(&sr.range),
            _ => None,
        }
    }

    fn opcode(&self) -> Opcode {
        match self {
            Op::Hello { .. } => Opcode::Hello,
            Op::Read(_) => Opcode::Read,
            Op::Write(_) => Opcode::Write,
            Op::Flush(_) => Opcode::Flush,
            Op::Discard(_) => Opcode::Discard,
            Op::WriteZeroes(_) => Opcode::WriteZeroes,
            Op::Fence(_) => Opcode::Fence,
            Op::DeleteVdisk(_) => Opcode::DeleteVdisk,
            Op::Vouch(_) => Opcode::Vouch,
            Op::Unmark(_) => Opcode::Unmark,
            Op::MapMemory => Opcode::MapMemory,
            Op::ReadShm(_) => Opcode::ReadShm,
            Op::WriteShm(_) => Opcode::WriteShm,
        }
    }
}

/// Whether a write's block crcs are committed by the write itself, or by
/// the connection's task before it answers ([`Disk::write_uncommitted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    Now,
    BeforeReply,
}

/// What a connection's requests share: the node's activity marks, and
/// whether its client speaks a protocol version that keeps them.
struct Session {
    marks: Arc<MarkStore>,
    marking: bool,
}

impl Session {
    /// The extent of `chunk`, as the marks name it.
    fn extent(chunk: u64) -> Result<u32, OpError> {
        u32::try_from(chunk / tessera_proto::activity_extent_chunks()).map_err(|_| {
            OpError::Status(
                Status::Invalid,
                format!("chunk {chunk} is beyond any extent"),
            )
        })
    }

    /// Whether `op` changes an extent its writer's epoch has not durably
    /// marked yet (the mark must be made first: blocking work).
    fn must_mark(&self, op: &Op) -> bool {
        let Some(r) = op.changes().filter(|_| self.marking) else {
            return false;
        };
        match Self::extent(r.chunk) {
            Ok(x) => !self.marks.is_marked(Uuid::from_bytes(r.vdisk), x, r.epoch),
            Err(_) => false,
        }
    }

    /// Marks the extent `op` changes, durably, before it runs (blocking).
    fn mark(&self, op: &Op) -> Result<(), OpError> {
        let Some(r) = op.changes().filter(|_| self.marking) else {
            return Ok(());
        };
        let x = Self::extent(r.chunk)?;
        self.marks
            .mark(Uuid::from_bytes(r.vdisk), x, r.epoch)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot mark an extent active: refusing the write");
                OpError::Status(Status::IoError, e.to_string())
            })
    }

    /// The marks of `vdisk` for a fence reply (none for older clients).
    fn fence_marks(&self, vdisk: Uuid, reply: &mut FenceReply) {
        if !self.marking {
            return;
        }
        match self.marks.marks_of(vdisk) {
            VdiskMarks::Any => reply.marks_lost = true,
            VdiskMarks::Extents(list) if list.len() > MAX_MARKS => reply.marks_lost = true,
            VdiskMarks::Extents(list) => {
                reply.marks = list.into_iter().map(|(x, e)| (u64::from(x), e)).collect();
            }
        }
    }
}

/// Runs one request against the disks (blocking).
fn execute(
    disks: &DiskSet,
    session: &Session,
    shm: Option<&ShmTable>,
    op: Op,
    frame: Frame,
    commit: Commit,
) -> Reply {
    let id = frame.header.id;
    let opcode = op.opcode();
    let result = session.mark(&op).and_then(|()| match op {
        Op::ReadShm(_) | Op::WriteShm(_) | Op::MapMemory => run_shm(disks, shm, op, &frame, commit),
        _ => run_op(disks, session, op, &frame.body, commit),
    });
    match result {
        Ok(body) => Reply::new(opcode, id, Status::Ok, body),
        Err(OpError::Status(status, msg)) => Reply::error(opcode, id, status, &msg),
        Err(OpError::Stale(current)) => Reply::new(
            opcode,
            id,
            Status::StaleEpoch,
            current.to_le_bytes().to_vec(),
        ),
    }
}

enum OpError {
    Status(Status, String),
    Stale(u64),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::StaleEpoch { current, .. } => return OpError::Stale(*current),
            // This copy's data cannot be trusted here (checksum, media
            // error, or a chunk a damaged extent may hold): the client
            // reads another copy and has this one rewritten.
            e if e.is_bad_copy() => Status::Checksum,
            StoreError::NoSpace => Status::NoSpace,
            StoreError::InvalidRange { .. } => Status::Invalid,
            // FenceUnknown among them: the writer fails this copy, and
            // fences it again before it resyncs it.
            _ => Status::IoError,
        };
        tracing::warn!(error = %e, "request failed");
        OpError::Status(status, error_chain(&e))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn disk<'a>(disks: &'a DiskSet, uuid: &[u8; 16]) -> Result<&'a Arc<Disk>, OpError> {
    let uuid = Uuid::from_bytes(*uuid);
    disks
        .get(&uuid)
        .ok_or_else(|| OpError::Status(Status::NoSuchDisk, format!("no disk {uuid} on this node")))
}

/// The disks a fence/delete applies to: one, or all when the uuid is nil.
fn targets<'a>(disks: &'a DiskSet, uuid: &[u8; 16]) -> Result<Vec<&'a Arc<Disk>>, OpError> {
    if *uuid == [0u8; 16] {
        Ok(disks.iter().collect())
    } else {
        Ok(vec![disk(disks, uuid)?])
    }
}

/// The shared-memory requests of a local session.
fn run_shm(
    disks: &DiskSet,
    shm: Option<&ShmTable>,
    op: Op,
    frame: &Frame,
    commit: Commit,
) -> Result<Vec<u8>, OpError> {
    let invalid = |msg: &str| OpError::Status(Status::Invalid, msg.to_string());
    let Some(shm) = shm else {
        return Err(invalid("shared-memory requests need a local session"));
    };
    let list = &frame.body[ShmRange::LEN..];
    let mut segs = shm
        .segments(list)
        .ok_or_else(|| invalid("a segment lies outside the session's memory"))?;
    match op {
        Op::ReadShm(sr) => {
            let r = sr.range;
            let d = disk(disks, &r.disk)?;
            let vdisk = Uuid::from_bytes(r.vdisk);
            if segs.len() == 1 {
                // Straight into the client's memory; verified there.
                let one = segs.pop().expect("one segment").into_slice();
                match d.read(vdisk, r.chunk, r.offset, one) {
                    Err(StoreError::Checksum { .. }) => {}
                    other => return other.map(|()| Vec::new()).map_err(OpError::from),
                }
                // The client's memory may have changed under the check:
                // only a failure in private memory means a bad copy.
                segs = shm.segments(list).expect("checked above");
            }
            let mut buf = vec![0u8; r.len as usize];
            d.read(vdisk, r.chunk, r.offset, &mut buf)?;
            let mut at = 0;
            for s in segs {
                s.copy_in(&buf[at..at + s.len()]);
                at += s.len();
            }
            Ok(Vec::new())
        }
        Op::WriteShm(sr) => {
            let r = sr.range;
            let d = disk(disks, &r.disk)?;
            // A private copy: what is checked, checksummed and stored is one
            // and the same, whatever the client does to its memory meanwhile.
            let mut data = Vec::with_capacity(r.len as usize);
            for s in &segs {
                s.copy_out(&mut data);
            }
            if sr.flags & SHM_CHECK_CRC != 0
                && tessera_crc::crc32c(&data) != frame.header.payload_crc
            {
                return Err(OpError::Status(
                    Status::BadPayload,
                    "payload checksum mismatch".into(),
                ));
            }
            write(d, r, &data, commit)?;
            Ok(Vec::new())
        }
        _ => Err(invalid("MapMemory only starts a local session")),
    }
}

/// Writes `data` where `r` says, committing as `commit` says.
fn write(d: &Disk, r: ChunkRange, data: &[u8], commit: Commit) -> Result<(), StoreError> {
    let vdisk = Uuid::from_bytes(r.vdisk);
    match commit {
        Commit::Now => d.write(vdisk, r.chunk, r.offset, data, r.epoch),
        Commit::BeforeReply => d.write_uncommitted(vdisk, r.chunk, r.offset, data, r.epoch),
    }
}

fn run_op(
    disks: &DiskSet,
    session: &Session,
    op: Op,
    body: &[u8],
    commit: Commit,
) -> Result<Vec<u8>, OpError> {
    match op {
        Op::Hello { .. } => Ok(Vec::new()),
        Op::MapMemory | Op::ReadShm(_) | Op::WriteShm(_) => Err(OpError::Status(
            Status::Invalid,
            "shared-memory requests are run by run_shm".into(),
        )),
        Op::Read(r) => {
            let d = disk(disks, &r.disk)?;
            let mut buf = vec![0u8; r.len as usize];
            d.read(Uuid::from_bytes(r.vdisk), r.chunk, r.offset, &mut buf)?;
            Ok(buf)
        }
        Op::Write(r) => {
            let d = disk(disks, &r.disk)?;
            write(d, r, &body[ChunkRange::LEN..], commit)?;
            Ok(Vec::new())
        }
        Op::Discard(r) | Op::WriteZeroes(r) => {
            let d = disk(disks, &r.disk)?;
            d.discard(Uuid::from_bytes(r.vdisk), r.chunk, r.offset, r.len, r.epoch)?;
            Ok(Vec::new())
        }
        Op::Flush(uuid) => {
            for d in targets(disks, &uuid)? {
                d.flush()?;
            }
            Ok(Vec::new())
        }
        Op::Fence(v) => {
            let mut reply = FenceReply {
                same_boot: true,
                ..FenceReply::default()
            };
            let all = targets(disks, &v.disk)?;
            let one = all.len() == 1;
            for d in all {
                let f = d.fence_report(Uuid::from_bytes(v.vdisk), v.epoch)?;
                reply.epoch = reply.epoch.max(f.epoch);
                reply.same_boot &= f.same_boot;
                if let Some(doubt) = f.doubt {
                    // A vouch names one disk: only a fence of one disk
                    // hands out its token.
                    reply.token = if one { doubt.token } else { 0 };
                    reply.doubtful |= doubt.whole || doubt.named.len() > MAX_DOUBTED;
                    reply.doubted.extend(doubt.named);
                }
            }
            if reply.doubtful || reply.doubted.len() > MAX_DOUBTED {
                reply.doubtful = true;
                reply.doubted.clear();
            }
            session.fence_marks(Uuid::from_bytes(v.vdisk), &mut reply);
            Ok(reply.encode())
        }
        Op::Vouch(v) => {
            let vdisk = Uuid::from_bytes(v.vref.vdisk);
            for d in targets(disks, &v.vref.disk)? {
                if !d.vouch(vdisk, v.vref.epoch, v.token)? {
                    return Err(OpError::Status(
                        Status::Invalid,
                        "the disk was reopened since it named its doubt: fence it again".into(),
                    ));
                }
            }
            Ok(Vec::new())
        }
        Op::DeleteVdisk(v) => {
            let vdisk = Uuid::from_bytes(v.vdisk);
            for d in targets(disks, &v.disk)? {
                let current = d.epoch(vdisk);
                if v.epoch < current {
                    return Err(OpError::Stale(current));
                }
                d.delete_vdisk(vdisk)?;
            }
            // Its marks go with the node's last copy of it (they are kept
            // per node, not per disk).
            let held = |d: &Arc<Disk>| d.vdisks().iter().any(|(u, _, n)| *u == vdisk && *n > 0);
            if v.disk == [0u8; 16] || !disks.iter().any(held) {
                if let Err(e) = session.marks.apply(&[MarkOp::ClearVdisk {
                    vdisk,
                    upto: u64::MAX,
                }]) {
                    tracing::warn!(%vdisk, error = %e, "cannot clear a deleted vDisk's activity marks");
                }
            }
            Ok(Vec::new())
        }
        Op::Unmark(u) => {
            let vdisk = Uuid::from_bytes(u.vref.vdisk);
            // Fenced like a write: a writer that lost the vDisk clears nothing.
            let current = disk(disks, &u.vref.disk)?.epoch(vdisk);
            if u.vref.epoch < current {
                return Err(OpError::Stale(current));
            }
            let upto = u.upto.min(u.vref.epoch);
            let payload = &body[UnmarkRef::LEN..];
            let ops: Vec<MarkOp> = if u.count == 0 {
                vec![MarkOp::ClearVdisk { vdisk, upto }]
            } else {
                UnmarkRef::extents(payload)
                    .filter_map(|x| u32::try_from(x).ok())
                    .map(|extent| MarkOp::Clear {
                        vdisk,
                        extent,
                        upto,
                    })
                    .collect()
            };
            session
                .marks
                .apply(&ops)
                .map_err(|e| OpError::Status(Status::IoError, e.to_string()))?;
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body_len: u32) -> Vec<u8> {
        let mut f = Header::request(Opcode::Write, 7, body_len, 0)
            .encode()
            .to_vec();
        f.resize(HEADER_LEN + body_len as usize, 0xab);
        f
    }

    /// Replies wait only while a whole request is buffered: a partial
    /// header or body means the next read may wait for the client.
    #[test]
    fn whole_frame_needs_header_and_body() {
        assert!(!whole_frame(&[]));
        let f = frame(100);
        for cut in 0..f.len() {
            assert!(!whole_frame(&f[..cut]), "{cut} bytes of {}", f.len());
        }
        assert!(whole_frame(&f));
        let mut two = f.clone();
        two.extend_from_slice(&frame(0)[..5]);
        assert!(whole_frame(&two));
        // Not a header: reading it fails at once, no wait.
        assert!(whole_frame(&[0u8; HEADER_LEN]));
    }

    fn status_of(e: StoreError) -> Option<Status> {
        match OpError::from(e) {
            OpError::Status(s, _) => Some(s),
            OpError::Stale(_) => None,
        }
    }

    /// A copy that cannot be trusted answers Checksum, so that the client
    /// reads another copy and has this one rewritten; a lost fence answers
    /// IoError, so that the writer fails the copy and fences it again.
    #[test]
    fn store_errors_map_to_statuses() {
        let v = Uuid::from_u128(1);
        let eio = || std::io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(
            status_of(StoreError::Checksum {
                vdisk: v,
                chunk: 0,
                block: 1
            }),
            Some(Status::Checksum)
        );
        assert_eq!(
            status_of(StoreError::Unreadable {
                vdisk: v,
                chunk: 0,
                source: eio()
            }),
            Some(Status::Checksum)
        );
        assert_eq!(
            status_of(StoreError::OwnershipUnknown { vdisk: v, chunk: 0 }),
            Some(Status::Checksum)
        );
        assert_eq!(
            status_of(StoreError::FenceUnknown { vdisk: v }),
            Some(Status::IoError)
        );
        assert_eq!(
            status_of(StoreError::Io {
                op: "write",
                source: eio()
            }),
            Some(Status::IoError)
        );
        assert!(status_of(StoreError::StaleEpoch {
            vdisk: v,
            current: 2,
            got: 1
        })
        .is_none());
    }
}
