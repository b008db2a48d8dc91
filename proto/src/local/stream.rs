//! The async halves of a local session's socket, registered for reading
//! only.
//!
//! A Unix stream socket wakes its writer's waiters every time the peer
//! consumes data (`unix_write_space`), whether or not the writer was
//! waiting for room. A socket registered with epoll for writability (as
//! `tokio::net::UnixStream` always is) therefore gets one spurious wakeup
//! of the runtime's poller per request the peer reads: on a small-request
//! workload that is a thread wakeup per I/O on each side. TCP wakes a
//! writer only after it ran out of room.
//!
//! So these halves register the socket for readability alone. A write goes
//! straight to the (non-blocking) socket; only when the socket is full does
//! the write half register a duplicate descriptor for writability, and it
//! drops that registration once the write went through.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits a connected, non-blocking socket into halves registered with the
/// current Tokio runtime (readability only; see the module docs).
pub fn split(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    let fd = Arc::new(register(stream, Interest::READABLE)?);
    Ok((
        ReadHalf { fd: fd.clone() },
        WriteHalf {
            fd,
            room: None,
            shut: false,
        },
    ))
}

/// Registers `stream` with the current runtime for `interest`.
fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: `stream` owns its descriptor, which stays open, and is the
    // one `as_raw_fd` returns, for as long as the `AsyncFd` that takes the
    // stream lives.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

/// The reading half of [`split`].
pub struct ReadHalf {
    fd: Arc<AsyncFd<UnixStream>>,
}

/// The writing half of [`split`]. Dropping it shuts the socket down for
/// writing, as Tokio's owned halves do.
pub struct WriteHalf {
    fd: Arc<AsyncFd<UnixStream>>,
    /// A duplicate of the socket registered for writability while a write
    /// waits for room.
    room: Option<AsyncFd<UnixStream>>,
    shut: bool,
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Readiness was stale (cleared by `try_io`): wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

impl WriteHalf {
    /// Runs `op` on the socket; when it is full, waits for room through a
    /// temporary writability registration.
    fn poll_op<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&UnixStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            if self.room.is_none() {
                match op(self.fd.get_ref()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    done => return Poll::Ready(done),
                }
                // Full: a registration made now reports room that is
                // already there (epoll polls the socket when it is added),
                // so no wakeup is lost between the write and this.
                let dup = self.fd.get_ref().try_clone()?;
                self.room = Some(register(dup, Interest::WRITABLE)?);
            }
            let room = self.room.as_ref().expect("set above");
            let mut guard = ready!(room.poll_write_ready(cx))?;
            match guard.try_io(|s| op(s.get_ref())) {
                Ok(done) => {
                    self.room = None;
                    return Poll::Ready(done);
                }
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_op(cx, |mut s| s.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_op(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut = true;
        Poll::Ready(this.fd.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        if !self.shut {
            let _ = self.fd.get_ref().shutdown(std::net::Shutdown::Write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Far more than a socket buffer holds, written while the peer reads
    /// slowly: the writer waits for room and nothing is lost or reordered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_socket_waits_for_room_and_loses_nothing() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ra, mut wa) = split(a).unwrap();
        let (mut rb, _wb) = split(b).unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(300_001) {
                wa.write_all(piece).await.unwrap();
            }
            drop(wa);
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = rb.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() % (1 << 20) < 65_536 {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(
            got == data,
            "the stream's bytes differ from what was written"
        );
    }

    /// Both directions at once, vectored writes included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_directions_carry_vectored_writes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut ra, mut wa) = split(a).unwrap();
        let (mut rb, mut wb) = split(b).unwrap();
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 3 << 20];
            rb.read_exact(&mut buf).await.unwrap();
            let (x, y) = buf.split_at(1 << 20);
            let mut bufs = [io::IoSlice::new(y), io::IoSlice::new(x)];
            let mut slices = &mut bufs[..];
            while !slices.is_empty() {
                let n = wb.write_vectored(slices).await.unwrap();
                io::IoSlice::advance_slices(&mut slices, n);
            }
        });
        let out: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        wa.write_all(&out).await.unwrap();
        let mut back = vec![0u8; 3 << 20];
        ra.read_exact(&mut back).await.unwrap();
        echo.await.unwrap();
        let mut want = out[1 << 20..].to_vec();
        want.extend_from_slice(&out[..1 << 20]);
        assert!(back == want, "the echoed bytes differ");
    }

    /// Dropping the write half ends the peer's stream (end of file).
    #[tokio::test]
    async fn dropping_the_write_half_ends_the_peers_stream() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ra, wa) = split(a).unwrap();
        let (mut rb, _wb) = split(b).unwrap();
        drop(wa);
        let mut buf = [0u8; 8];
        assert_eq!(rb.read(&mut buf).await.unwrap(), 0);
    }
}
