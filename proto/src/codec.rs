//! Reading whole frames from an async byte stream.

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
    let mut body = vec![0u8; header.body_len as usize];
    r.read_exact(&mut body).await?;
    Ok(Some(Frame { header, body }))
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
