//! virtio-blk requests: a descriptor chain parsed and validated into a typed
//! [`Request`] before anything is executed.
//!
//! The chain is treated as the spec's byte stream: the device-readable
//! descriptors (which must all come before the device-writable ones) carry
//! the 16-byte header and, for writes and discards, the data; the
//! device-writable descriptors carry the data of reads and GET_ID, and the
//! status byte as their very last byte. Any framing of that stream into
//! descriptors is accepted.

use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory};

/// Bytes per virtio-blk sector (the unit of `sector` fields, whatever the block size).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a GET_ID answer.
pub const ID_LEN: usize = 20;

/// Limits the device advertises and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size in bytes.
    pub capacity: u64,
    /// Largest data segment (`size_max`).
    pub size_max: u32,
    /// Most data segments in one request (`seg_max`).
    pub seg_max: u32,
    /// Most ranges in one DISCARD / WRITE_ZEROES request.
    pub max_discard_seg: u32,
    /// Largest range of a DISCARD / WRITE_ZEROES, in sectors.
    pub max_discard_sectors: u32,
}

impl Limits {
    /// Largest data length of one request.
    pub fn max_request_bytes(&self) -> u64 {
        self.size_max as u64 * self.seg_max as u64
    }
}

/// A contiguous piece of guest memory holding request data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at `offset` into `segments`.
    Read {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    /// Write `len` bytes from `segments` at `offset`.
    Write {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    Flush,
    /// Write the device id into `segments` (at least [`ID_LEN`] bytes).
    GetId {
        segments: Vec<Segment>,
    },
    Discard {
        ranges: Vec<Range>,
    },
    WriteZeroes {
        ranges: Vec<Range>,
        unmap: bool,
    },
}

/// A validated request and where its status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub status_addr: GuestAddress,
    /// Bytes the device writes into the chain on success (data + status).
    pub used_len_ok: u32,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("descriptor chain is malformed: {0}")]
    Chain(String),
    #[error("the chain has no writable status byte")]
    NoStatus,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request header is {0} bytes, expected 16")]
    ShortHeader(u64),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sector {sector} + {len} bytes is beyond the capacity")]
    OutOfRange { sector: u64, len: u64 },
    #[error("request carries {0} bytes of data, more than the device limit")]
    TooLarge(u64),
    #[error("request carries {0} data segments, more than seg_max")]
    TooManySegments(usize),
    #[error("data in the wrong direction for this request type")]
    WrongDirection,
    #[error("GET_ID buffer is {0} bytes, fewer than 20")]
    ShortIdBuffer(u64),
    #[error("discard/write-zeroes segment list of {0} bytes is malformed")]
    BadRanges(u64),
    #[error("discard/write-zeroes range has reserved flags {0:#x}")]
    ReservedFlags(u32),
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
}

impl RequestError {
    /// The virtio-blk status this error is reported with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::ReservedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain that failed validation; `status_addr` is where its status can
/// still be written, if the chain has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub error: RequestError,
    pub status_addr: Option<GuestAddress>,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Header {
    type_: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: `Header` is plain old data of fixed layout (two u32 and one u64,
// no padding); every bit pattern is a valid value.
unsafe impl ByteValued for Header {}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DiscardRange {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

// SAFETY: plain old data of fixed layout (u64, u32, u32; no padding); every
// bit pattern is a valid value.
unsafe impl ByteValued for DiscardRange {}

/// Reads `buf.len()` bytes at byte `skip` of the stream made by `segments`.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segments: &[Segment],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segments {
        if done == buf.len() {
            break;
        }
        let len = s.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(buf.len() - done);
        let addr = s
            .addr
            .checked_add(skip)
            .ok_or(RequestError::Memory(s.addr.raw_value()))?;
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|_| RequestError::Memory(addr.raw_value()))?;
        done += n;
        skip = 0;
    }
    if done != buf.len() {
        return Err(RequestError::ShortHeader(done as u64));
    }
    Ok(())
}

/// The part of the stream made by `segments` from byte `skip`, `take` bytes long.
fn sub_segments(segments: &[Segment], mut skip: u64, mut take: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        if take == 0 {
            break;
        }
        let len = s.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        if let Some(addr) = s.addr.checked_add(skip) {
            out.push(Segment {
                addr,
                len: n as u32,
            });
        }
        take -= n;
        skip = 0;
    }
    out
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.len as u64).sum()
}

impl Request {
    /// Parses and validates the chain of one request.
    pub fn parse<M>(
        chain: &DescriptorChain<M>,
        mem: &M::Target,
        limits: &Limits,
    ) -> Result<Request, ParseError>
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemory,
    {
        let mut readable = Vec::new();
        let mut writable: Vec<Segment> = Vec::new();
        let mut order_error = false;
        for desc in chain.clone() {
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else {
                if !writable.is_empty() {
                    order_error = true;
                }
                readable.push(seg);
            }
        }
        // The status byte: the last byte of the device-writable part.
        let status_addr = writable
            .iter()
            .rev()
            .find(|s| s.len > 0)
            .and_then(|s| s.addr.checked_add(s.len as u64 - 1));
        let fail = |error| ParseError { error, status_addr };
        let Some(status_addr) = status_addr else {
            return Err(fail(RequestError::NoStatus));
        };
        if order_error {
            return Err(fail(RequestError::ReadableAfterWritable));
        }
        let readable_len = total(&readable);
        let writable_len = total(&writable);
        if readable_len < 16 {
            return Err(fail(RequestError::ShortHeader(readable_len)));
        }
        let mut header = Header::default();
        read_stream(mem, &readable, 0, header.as_mut_slice()).map_err(fail)?;
        let header_type = u32::from_le(header.type_);
        let sector = u64::from_le(header.sector);
        // Data in each direction, without the header and the status byte.
        let out_len = readable_len - 16;
        let in_len = writable_len - 1;
        let out_data = || sub_segments(&readable, 16, out_len);
        let in_data = || sub_segments(&writable, 0, in_len);

        let check_range = |len: u64| -> Result<u64, RequestError> {
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::OutOfRange { sector, len })?;
            match offset.checked_add(len) {
                Some(end) if end <= limits.capacity => Ok(offset),
                _ => Err(RequestError::OutOfRange { sector, len }),
            }
        };
        let check_data = |len: u64, segments: &[Segment]| -> Result<(), RequestError> {
            if len % SECTOR_SIZE != 0 {
                return Err(RequestError::Unaligned(len));
            }
            if len > limits.max_request_bytes() {
                return Err(RequestError::TooLarge(len));
            }
            if segments.len() > limits.seg_max as usize {
                return Err(RequestError::TooManySegments(segments.len()));
            }
            Ok(())
        };

        let (kind, used_len_ok) = match header_type {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    return Err(fail(RequestError::WrongDirection));
                }
                let segments = in_data();
                check_data(in_len, &segments).map_err(fail)?;
                let offset = check_range(in_len).map_err(fail)?;
                (
                    Kind::Read {
                        offset,
                        len: in_len,
                        segments,
                    },
                    in_len as u32 + 1,
                )
            }
            VIRTIO_BLK_T_OUT => {
                if in_len != 0 {
                    return Err(fail(RequestError::WrongDirection));
                }
                let segments = out_data();
                check_data(out_len, &segments).map_err(fail)?;
                let offset = check_range(out_len).map_err(fail)?;
                (
                    Kind::Write {
                        offset,
                        len: out_len,
                        segments,
                    },
                    1,
                )
            }
            VIRTIO_BLK_T_FLUSH => (Kind::Flush, 1),
            VIRTIO_BLK_T_GET_ID => {
                if in_len < ID_LEN as u64 {
                    return Err(fail(RequestError::ShortIdBuffer(in_len)));
                }
                (
                    Kind::GetId {
                        segments: sub_segments(&writable, 0, ID_LEN as u64),
                    },
                    ID_LEN as u32 + 1,
                )
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let write_zeroes = header_type == VIRTIO_BLK_T_WRITE_ZEROES;
                let entry = std::mem::size_of::<DiscardRange>() as u64;
                if out_len == 0 || out_len % entry != 0 {
                    return Err(fail(RequestError::BadRanges(out_len)));
                }
                let count = out_len / entry;
                if count > limits.max_discard_seg as u64 {
                    return Err(fail(RequestError::TooManySegments(count as usize)));
                }
                let mut ranges = Vec::with_capacity(count as usize);
                let mut unmap = true;
                for i in 0..count {
                    let mut r = DiscardRange::default();
                    read_stream(mem, &readable, 16 + i * entry, r.as_mut_slice()).map_err(fail)?;
                    let flags = u32::from_le(r.flags);
                    let allowed = if write_zeroes {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    } else {
                        0
                    };
                    if flags & !allowed != 0 {
                        return Err(fail(RequestError::ReservedFlags(flags)));
                    }
                    unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                    let num = u32::from_le(r.num_sectors);
                    if num > limits.max_discard_sectors {
                        return Err(fail(RequestError::TooLarge(num as u64 * SECTOR_SIZE)));
                    }
                    let sector = u64::from_le(r.sector);
                    let len = num as u64 * SECTOR_SIZE;
                    let offset = sector
                        .checked_mul(SECTOR_SIZE)
                        .filter(|o| o.checked_add(len).is_some_and(|e| e <= limits.capacity))
                        .ok_or(fail(RequestError::OutOfRange { sector, len }))?;
                    ranges.push(Range { offset, len });
                }
                let kind = if write_zeroes {
                    Kind::WriteZeroes { ranges, unmap }
                } else {
                    Kind::Discard { ranges }
                };
                (kind, 1)
            }
            other => return Err(fail(RequestError::Unsupported(other))),
        };
        Ok(Request {
            kind,
            status_addr,
            used_len_ok,
        })
    }
}
