//! Deterministic simulation of Tessera's failure rules.
//!
//! The real volume client (`tessera-replicator`) and the real zone service
//! (`tessera-zone`) run on one thread with simulated time against simulated
//! storage nodes ([`node`]) and a zone behind injected faults ([`zone`]); a
//! seeded timeline of faults ([`schedule`]) hits them while a workload
//! checks every read against the model of what was acknowledged and
//! flushed ([`model`]). A failure prints its seed; `tessera-sim --seed S`
//! replays it.

pub mod harness;
pub mod model;
pub mod node;
pub mod rng;
pub mod schedule;
pub mod zone;

pub use schedule::{run, Config, Outcome};
