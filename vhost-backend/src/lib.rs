//! Tessera's per-VM vhost-user-blk device.
//!
//! QEMU connects to the device's unix socket and shares the guest's memory;
//! the device takes virtio-blk requests straight out of that memory and runs
//! them on a [`BlockDisk`] — the volume client in production. This crate is
//! the only one that knows virtio and vhost-user; the volume client knows
//! nothing of them.
//!
//! - `request`: descriptor chain → validated [`Request`].
//! - `device`: runs a request against the disk.
//! - `vhu_blk`: the `VhostUserBackend` (queues, config space, features).
//! - `serve`: the socket loop, one QEMU connection after another.

mod config;
mod device;
mod disk;
mod request;
mod serve;
mod vhu_blk;

pub use config::DeviceConfig;
pub use disk::{BlockDisk, MemDisk};
pub use request::{Kind, Limits, ParseError, Range, Request, RequestError, Segment};
pub use serve::{device, serve, serve_device, ServeConfig, ServeError};
pub use vhu_blk::VhostUserBlk;
