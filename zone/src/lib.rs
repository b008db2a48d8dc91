//! Tessera's zone metadata: the records of a zone (hosts, storage nodes, disks,
//! datastores, vDisks), the etcd-like store that holds them, placement of
//! vDisk chunks on disks, and the operations the management API performs.
//!
//! Layers, each knowing only the ones above it in this list:
//!
//! - [`records`]: the versioned JSON records and the key space;
//! - [`store`]: the [`MetaStore`](store::MetaStore) interface (etcd-like KV
//!   with revisions, compare-and-swap, leases, watches), and its
//!   [`conformance`] suite (with the `conformance` feature or in tests);
//! - [`sled_store`]: the embedded implementation over sled;
//! - [`mem_store`]: an in-memory implementation on tokio's clock, for
//!   deterministic simulations and tests;
//! - [`placement`]: weighted rendezvous hashing of vDisk groups onto disks;
//! - [`service`]: [`ZoneService`](service::ZoneService), the zone operations,
//!   each mutation a compare-and-swap loop; errors are [`ZoneError`], each
//!   with a stable code ([`error::code`]) that callers act on; it reads the
//!   time and makes ids through its [`env::Env`] (the wall clock and random
//!   ids, or a simulation's).
//!
//! With the `testing` feature, [`testing`] offers fault-injecting stores for
//! other crates' tests.

pub mod env;
pub mod error;
pub mod mem_store;
pub mod placement;
pub mod records;
pub mod service;
pub mod sled_store;
pub mod store;

#[cfg(any(test, doc, feature = "conformance"))]
pub mod conformance;
#[cfg(any(test, doc, feature = "testing"))]
pub mod testing;

pub use error::ZoneError;
