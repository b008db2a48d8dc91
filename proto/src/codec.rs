//! Reading whole frames from an async byte stream.

use bytes::BufMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::message::{Header, ProtoError, HEADER_LEN};

/// Why a frame could not be read.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("malformed frame")]
    Proto(#[from] ProtoError),
}

/// A frame read off the wire: its checked header and its body.
#[derive(Debug)]
pub struct Frame {
    pub header: Header,
    pub body: Vec<u8>,
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream between
/// frames. The header is validated before the body is read, so a bad length
/// never makes the reader allocate or wait for bytes that will not come.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let Some(header) = read_header(r).await? else {
        return Ok(None);
    };
    let body = read_body(r, header.body_len as usize).await?;
    Ok(Some(Frame { header, body }))
}

/// Reads exactly `len` bytes into a new vector, straight into its spare
/// capacity: a 1 MiB write's body is not zeroed first only to be
/// overwritten (that memset, and the page faults of the fresh memory it
/// touches, were a tenth of a storage node's CPU on 1 MiB writes).
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        let want = len - body.len();
        // At most `want` more bytes: the next frame's bytes stay on the stream.
        if r.read_buf(&mut (&mut body).limit(want)).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
    }
    Ok(body)
}

/// Reads and checks one frame header, leaving its body on the stream (for a
/// reader that places the body itself). `Ok(None)` on a clean end of stream.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Header>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    Ok(Some(Header::decode(&h)?))
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;
    use tokio::io::ReadBuf;

    use super::*;
    use crate::message::Opcode;

    /// Hands out its bytes at most `step` at a time, as a socket may.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self
                .step
                .min(buf.remaining())
                .min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn frame(id: u64, body: &[u8]) -> Vec<u8> {
        let h = Header::request(Opcode::Write, id, body.len() as u32, 0);
        let mut out = h.encode().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn read_all(stream: Vec<u8>, step: usize) -> Vec<Result<Option<Frame>, FrameError>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = Trickle {
                data: stream,
                at: 0,
                step,
            };
            let mut out = Vec::new();
            loop {
                let f = read_frame(&mut r).await;
                let end = !matches!(f, Ok(Some(_)));
                out.push(f);
                if end {
                    return out;
                }
            }
        })
    }

    proptest! {
        /// Frames come back whole and in order however the stream splits
        /// them: a body is read to its length and not a byte further.
        #[test]
        fn frames_split_anywhere_read_back_whole(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..5),
            step in 1usize..700,
        ) {
            let stream: Vec<u8> = bodies
                .iter()
                .enumerate()
                .flat_map(|(i, b)| frame(i as u64, b))
                .collect();
            let got = read_all(stream, step);
            prop_assert_eq!(got.len(), bodies.len() + 1);
            for (i, (f, b)) in got.iter().zip(&bodies).enumerate() {
                let f = f.as_ref().unwrap().as_ref().unwrap();
                prop_assert_eq!(f.header.id, i as u64);
                prop_assert_eq!(&f.body, b);
            }
            prop_assert!(matches!(got.last(), Some(Ok(None))));
        }

        /// A stream that ends inside a body is an error, never a short frame.
        #[test]
        fn a_body_cut_short_is_an_error(len in 1usize..3000, cut in 0usize..3000, step in 1usize..700) {
            let cut = cut % len;
            let mut stream = frame(7, &vec![0xa5; len]);
            stream.truncate(HEADER_LEN + cut);
            let got = read_all(stream, step);
            prop_assert_eq!(got.len(), 1);
            let unexpected_eof = matches!(&got[0], Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof);
            prop_assert!(unexpected_eof);
        }
    }
}
