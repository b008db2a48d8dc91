//! Local sessions: the storage protocol over a Unix socket, with the
//! client's memory shared with the node.
//!
//! A local session starts with one `MapMemory` frame whose body lists the
//! client's memory regions and whose file descriptors ride along with its
//! first byte (`SCM_RIGHTS`). The node maps them and answers; after that the
//! session speaks the ordinary protocol, plus `ReadShm` and `WriteShm`,
//! whose data is in those regions instead of the frames. The handshake is
//! done with blocking calls on both sides, before the socket goes async.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

mod stream;
pub use stream::{split, ReadHalf, WriteHalf};

use crate::message::{Header, ShmRegion, Status, HEADER_LEN, MAX_BODY, MAX_REGIONS};
use crate::{Opcode, ProtoError};

/// Bytes of control-message space for [`MAX_REGIONS`] descriptors.
const CMSG_BUF: usize = 512;

/// Control-message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// Sends all of `bytes`, with `fds` attached to the first byte.
pub fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_REGIONS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let mut done = 0;
    let mut cmsg = CmsgBuf([0; CMSG_BUF]);
    while done < bytes.len() {
        let rest = &bytes[done..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if done == 0 && !fds.is_empty() {
            let payload = std::mem::size_of_val(fds) as u32;
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
            debug_assert!(space <= CMSG_BUF);
            msg.msg_control = cmsg.0.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` writable, aligned bytes,
            // enough for one header and the descriptors (checked above), so
            // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for `fds`.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    payload as usize,
                );
            }
        }
        // SAFETY: msg points at a live iovec over `rest` and, if set, the
        // control buffer filled above; the socket is a valid descriptor.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes; descriptors that came with them are
/// appended to `fds` (close-on-exec).
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; CMSG_BUF]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF as _;
    let n = loop {
        // SAFETY: msg points at a live iovec over `buf` and a writable,
        // aligned control buffer of the size it says.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR
    // and CMSG_NXTHDR stay inside it, and each SCM_RIGHTS header's data
    // holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors that are now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more descriptors than a local session may pass",
        ));
    }
    Ok(n)
}

/// Client side of the handshake: sends `MapMemory` with one descriptor per
/// region and waits for the node's answer (on a blocking socket).
pub fn client_handshake(
    sock: &mut UnixStream,
    regions: &[ShmRegion],
    fds: &[RawFd],
) -> io::Result<()> {
    let body = ShmRegion::encode_list(regions);
    let mut frame = Header::request(Opcode::MapMemory, 0, body.len() as u32, 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&body);
    send_with_fds(sock, &frame, fds)?;
    let mut h = [0u8; HEADER_LEN];
    sock.read_exact(&mut h)?;
    let header = Header::decode(&h).map_err(invalid)?;
    if !header.is_reply() || header.opcode != Opcode::MapMemory {
        return Err(invalid(ProtoError::Direction));
    }
    let mut body = vec![0u8; header.body_len as usize];
    sock.read_exact(&mut body)?;
    if header.status() != Status::Ok {
        return Err(io::Error::other(format!(
            "node refused the memory map: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(())
}

/// Node side of the handshake, first half: reads the `MapMemory` frame and
/// its descriptors (on a blocking socket). The caller maps them and answers
/// with [`server_answer`].
pub fn server_receive(sock: &UnixStream) -> io::Result<(Vec<ShmRegion>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = recv_with_fds(sock, &mut h[got..], &mut fds)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let header = Header::decode(&h).map_err(invalid)?;
    if header.is_reply() || header.opcode != Opcode::MapMemory {
        return Err(invalid(ProtoError::BadShm(
            "a local session must start with MapMemory",
        )));
    }
    debug_assert!(header.body_len <= MAX_BODY);
    let mut body = vec![0u8; header.body_len as usize];
    let mut got = 0;
    while got < body.len() {
        let n = recv_with_fds(sock, &mut body[got..], &mut fds)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let regions = ShmRegion::decode_list(&body).map_err(invalid)?;
    if fds.len() != regions.len() {
        return Err(invalid(ProtoError::BadShm(
            "descriptor count differs from the region count",
        )));
    }
    Ok((regions, fds))
}

/// Node side of the handshake, second half: `Ok`, or an error and why.
pub fn server_answer(sock: &mut UnixStream, result: Result<(), String>) -> io::Result<()> {
    let (status, body) = match result {
        Ok(()) => (Status::Ok, Vec::new()),
        Err(why) => (Status::Invalid, why.into_bytes()),
    };
    let mut frame = Header::reply(Opcode::MapMemory, 0, status, body.len() as u32, 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&body);
    sock.write_all(&frame)
}

fn invalid(e: ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn handshake_passes_descriptors() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let f1 = tempfile_fd(b"one");
        let f2 = tempfile_fd(b"two");
        let regions = [
            ShmRegion {
                len: 4096,
                offset: 0,
            },
            ShmRegion {
                len: 8192,
                offset: 4096,
            },
        ];
        let node = std::thread::spawn(move || {
            let (got, fds) = server_receive(&b).unwrap();
            assert_eq!(fds.len(), 2);
            server_answer(&mut b, Ok(())).unwrap();
            (got, fds)
        });
        client_handshake(
            &mut a,
            &regions,
            &[f1.as_fd().as_raw_fd(), f2.as_fd().as_raw_fd()],
        )
        .unwrap();
        let (got, fds) = node.join().unwrap();
        assert_eq!(got, regions);
        // The passed descriptors are the same open files.
        let mut s = String::new();
        let mut file = std::fs::File::from(fds.into_iter().nth(1).unwrap());
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        file.read_to_string(&mut s).unwrap();
        assert_eq!(s, "two");
    }

    #[test]
    fn handshake_refuses_a_count_mismatch_and_other_first_frames() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let f = tempfile_fd(b"x");
        let regions = [ShmRegion {
            len: 4096,
            offset: 0,
        }; 2];
        let body = ShmRegion::encode_list(&regions);
        let mut frame = Header::request(Opcode::MapMemory, 0, body.len() as u32, 0)
            .encode()
            .to_vec();
        frame.extend_from_slice(&body);
        send_with_fds(&a, &frame, &[f.as_raw_fd()]).unwrap();
        assert!(server_receive(&b).is_err());
        // A Hello first is not a local session.
        let hello = Header::request(Opcode::Hello, 1, 0, 0).encode();
        a.write_all(&hello).unwrap();
        assert!(server_receive(&b).is_err());
    }

    proptest::proptest! {
        /// Whatever a client sends first (no descriptors), the node's side of
        /// the handshake returns an error or a checked region list, never
        /// panics, and never waits for more than was announced.
        #[test]
        fn arbitrary_first_frames_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), op in 1u8..=11, garbage in proptest::prelude::any::<bool>()) {
            let (mut a, b) = UnixStream::pair().unwrap();
            let mut frame = if garbage {
                body.clone()
            } else {
                let mut h = Header::request(Opcode::try_from(op).unwrap(), 0, body.len() as u32, 0).encode().to_vec();
                h.extend_from_slice(&body);
                h
            };
            frame.resize(frame.len().max(HEADER_LEN), 0);
            a.write_all(&frame).unwrap();
            drop(a); // a short frame ends in EOF, not a wait
            if let Ok((regions, fds)) = server_receive(&b) {
                proptest::prop_assert_eq!(regions.len(), fds.len());
                proptest::prop_assert!(regions.is_empty(), "no descriptors were sent");
            }
        }
    }

    /// An unlinked file holding `content`.
    fn tempfile_fd(content: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(content).unwrap();
        f
    }
}
