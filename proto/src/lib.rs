//! Tessera's storage wire protocol: how volume clients talk to storage nodes.
//!
//! # Framing
//!
//! Every message — request or reply — is one *frame*: a fixed 32-byte header
//! followed by `body_len` bytes of body. All integers are little-endian.
//!
//! ```text
//! offset size field
//!      0    4 magic         "TSP\x01" (0x0150_5354 little-endian)
//!      4    1 version       layout version of this frame (1)
//!      5    1 opcode        what the frame asks or answers (replies reuse the request's opcode)
//!      6    2 flags         bit 0: reply; other bits reserved, must be 0
//!      8    8 id            request id, chosen by the client, echoed by the reply
//!     16    4 body_len      bytes after the header (fixed fields + payload), <= MAX_BODY
//!     20    4 status        0 in requests; the Status of a reply
//!     24    4 payload_crc   crc32c of the data payload (write requests, read replies), else 0
//!     28    4 header_crc    crc32c of bytes 0..28
//! ```
//!
//! A body starts with the opcode's fixed fields (see [`Request`]) and, for
//! writes and read replies, continues with the data payload. A frame that
//! fails any check (magic, version, crc, unknown opcode, bad length) is a
//! protocol error: the receiver drops the connection, and nothing the frame
//! asked for is done.
//!
//! # Replies
//!
//! | request | reply body when `Ok` | reply body otherwise |
//! |---|---|---|
//! | `Hello` | [`HelloReply`] | UTF-8 message |
//! | `Read` | the data (`len` bytes, `payload_crc` set) | UTF-8 message |
//! | `Fence` | the vDisk's epoch on that disk after the fence (u64); then flags (u64, version 3): bit 0 = the epoch was last raised during the machine's current boot, on every disk fenced | UTF-8 message |
//! | others | empty | UTF-8 message |
//!
//! A `StaleEpoch` reply's body is the node's current epoch (u64) instead of a
//! message, so the fenced writer learns who overtook it.
//!
//! # Sessions
//!
//! A connection starts with `Hello` (the client offers a range of protocol
//! versions, the node picks the highest it speaks); a node takes requests
//! sent without it as protocol version 1. Requests may then be sent
//! back to back without waiting: replies carry the request's id and may come in
//! any order. A node answers every well-formed request exactly once.
//!
//! A *local session* (a Unix socket, client and node on one host) starts
//! instead with `MapMemory`, whose file descriptors travel with it (see
//! [`local`]); then `Hello` and the rest as above, plus `ReadShm` and
//! `WriteShm` (protocol version 2), whose data stays in the mapped memory.
//!
//! # Versioning
//!
//! The frame layout has its own `version` byte; the set of opcodes and their
//! fields is the *protocol version* agreed in `Hello`. New opcodes or fields
//! come with a new protocol version; a node keeps speaking the older ones.

mod codec;
pub mod local;
mod message;

pub use codec::{read_frame, read_header, Frame, FrameError};
pub use message::*;
