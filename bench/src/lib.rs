//! Pieces shared by Tessera's benchmark binaries.
//!
//! - [`load`]: a queue-depth-N load generator on one vhost-user-blk queue
//!   (libblkio's pure-Rust `virtio-blk-vhost-user` driver, the `blkio`
//!   crate), with a latency sample per I/O;
//! - [`procs`]: server processes (spawned, killed on drop) and their CPU time
//!   from `/proc/PID/stat`;
//! - [`checked`]: self-identifying block contents, a model of what each
//!   block may read as, and an independent reader of a node's disk file,
//!   format versions 1 to 3 (faultcampaign);
//! - [`machine`]: what the machine is (cores, memory, kernel, QEMU version).

pub mod checked;
pub mod load;
pub mod machine;
pub mod procs;
