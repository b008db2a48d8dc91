//! One multiplexed connection to a storage node.
//!
//! Any number of requests may be in flight: each caller registers its request
//! id, writes its frame (header, fixed fields and payload slices in one
//! `writev`, so write data goes from the caller's buffers to the socket
//! without a copy), and awaits its reply, which a reader task routes back by
//! id. A connection that fails in any way is marked broken and every pending
//! caller gets an error; the next request to the node opens a new one.

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::{
    read_header, ChunkRange, Frame, Header, Hello, HelloReply, Opcode, Request, Status,
    PROTOCOL_MAX, PROTOCOL_MIN,
};
use thiserror::Error;
use tokio::io::BufReader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The receiving side, buffered: many replies come in with one `read`.
type Rx = BufReader<OwnedReadHalf>;

/// Bytes of the receive buffer; larger read bodies bypass it.
const RX_BUFFER: usize = 64 * 1024;
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
}

type Pending = Mutex<HashMap<u64, Waiter>>;

/// Reads and drops `len` bytes.
async fn drain(rd: &mut Rx, mut len: usize) -> std::io::Result<()> {
    let mut scratch = [0u8; 8192];
    while len > 0 {
        let n = scratch.len().min(len);
        rd.read_exact(&mut scratch[..n]).await?;
        len -= n;
    }
    Ok(())
}

/// A live connection.
pub(crate) struct Conn {
    addr: String,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    broken: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    pub(crate) hello: HelloReply,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
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
    /// Connects and says hello.
    pub(crate) async fn connect(
        addr: &str,
        client: [u8; 16],
        timeout: Duration,
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
                broken.store(true, Ordering::Release);
                let waiters: Vec<_> = pending
                    .lock()
                    .expect("pending map poisoned")
                    .drain()
                    .collect();
                for (_, w) in waiters {
                    let _ = w.tx.send(Err(ConnError::Broken {
                        addr: addr.clone(),
                        reason: reason.clone(),
                    }));
                }
            })
        };
        let mut conn = Conn {
            addr: addr.to_string(),
            writer: tokio::sync::Mutex::new(wr),
            pending,
            next_id: AtomicU64::new(1),
            broken,
            reader,
            hello: HelloReply {
                version: 0,
                node: [0; 16],
                disks: Vec::new(),
            },
        };
        let reply = conn
            .call(
                Request::Hello(Hello {
                    min_version: PROTOCOL_MIN,
                    max_version: PROTOCOL_MAX,
                    client,
                }),
                &[],
                timeout,
            )
            .await?;
        if reply.header.status() != Status::Ok {
            return Err(ConnError::Version {
                addr: addr.to_string(),
                min: PROTOCOL_MIN,
                max: PROTOCOL_MAX,
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
    /// write, sent as is after the fixed fields.
    pub(crate) async fn call(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
        timeout: Duration,
    ) -> Result<Frame, ConnError> {
        match self.exchange(req, payload, timeout, false).await? {
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
        let delivery = self.exchange(req, &[], timeout, true).await?;
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
                crc = crc32c::crc32c_append(crc, d);
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
        timeout: Duration,
        stream: bool,
    ) -> Result<Delivery, ConnError> {
        if self.is_broken() {
            return Err(self.broken_error("connection already failed"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut head = Vec::with_capacity(128);
        match req {
            Request::Write(range, _) => encode_write_head(id, &range, payload, &mut head),
            _ => {
                req.encode_head(id, &mut head);
            }
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending map poisoned")
            .insert(id, Waiter { tx, stream });
        let result = tokio::time::timeout(timeout, async {
            self.send(&head, payload).await?;
            rx.await
                .unwrap_or_else(|_| Err(self.broken_error("reader stopped")))
        })
        .await;
        match result {
            Ok(r) => r,
            Err(_) => {
                self.pending
                    .lock()
                    .expect("pending map poisoned")
                    .remove(&id);
                Err(ConnError::Timeout {
                    addr: self.addr.clone(),
                    timeout,
                })
            }
        }
    }

    async fn send(&self, head: &[u8], payload: &[&[u8]]) -> Result<(), ConnError> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + payload.len());
        slices.push(IoSlice::new(head));
        slices.extend(
            payload
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| IoSlice::new(s)),
        );
        let mut wr = self.writer.lock().await;
        let mut guard = SendGuard {
            broken: &self.broken,
            done: false,
        };
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
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
        let _ = self.writer.lock().await.shutdown().await;
    }
}

/// Encodes the head of a write whose payload is the concatenation of `payload`.
fn encode_write_head(id: u64, range: &ChunkRange, payload: &[&[u8]], out: &mut Vec<u8>) {
    let crc = payload
        .iter()
        .fold(0u32, |crc, s| crc32c::crc32c_append(crc, s));
    let len: usize = payload.iter().map(|s| s.len()).sum();
    let body_len = (ChunkRange::LEN + len) as u32;
    out.extend_from_slice(&Header::request(Opcode::Write, id, body_len, crc).encode());
    out.extend_from_slice(&range.encode());
}

/// A node's address and its (re)connectable connection.
pub(crate) struct NodeLink {
    pub(crate) addr: String,
    client: [u8; 16],
    timeout: Duration,
    /// The live connection; read on every request (uncontended read lock).
    current: std::sync::RwLock<Option<Arc<Conn>>>,
    /// Serialises reconnects so a failed node is dialled once, not once per request.
    connecting: tokio::sync::Mutex<()>,
}

impl NodeLink {
    pub(crate) fn new(addr: String, client: [u8; 16], timeout: Duration) -> Self {
        NodeLink {
            addr,
            client,
            timeout,
            current: std::sync::RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> Option<Arc<Conn>> {
        self.current
            .read()
            .expect("connection slot poisoned")
            .as_ref()
            .filter(|c| !c.is_broken())
            .cloned()
    }

    /// The live connection, reconnecting if the last one failed.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, ConnError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _one_dialer = self.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let c = Conn::connect(&self.addr, self.client, self.timeout).await?;
        *self.current.write().expect("connection slot poisoned") = Some(c.clone());
        Ok(c)
    }

    pub(crate) async fn call(
        &self,
        req: Request<'_>,
        payload: &[&[u8]],
    ) -> Result<Frame, ConnError> {
        let conn = self.conn().await?;
        conn.call(req, payload, self.timeout).await
    }

    /// A read whose data the node's reply places straight into `dest`.
    pub(crate) async fn call_read(
        &self,
        req: Request<'_>,
        dest: &mut [&mut [u8]],
    ) -> Result<(Header, Vec<u8>), ConnError> {
        let conn = self.conn().await?;
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
