//! The zone service's environment: where it reads the time and gets new ids.
//!
//! A real zone reads the wall clock ([`SystemTime`]) and makes random ids
//! ([`Uuid::new_v4`]): [`Env::system`], the default. A deterministic
//! simulation runs the service on one thread with tokio's paused clock and
//! needs both to replay from a seed: [`Env::simulated`] reads the time from
//! tokio's clock and makes ids from the seed. Everything the service records
//! with a time (lease expiry, creation times) or an id (zone, datastore,
//! vDisk, session: placement hashes the vDisk's) comes from its `Env`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// A clock: milliseconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A source of new ids.
pub type IdSource = Arc<dyn Fn() -> Uuid + Send + Sync>;

/// What [`Env::simulated`]'s clock reads when it is first read:
/// 2026-01-01T00:00:00Z, in milliseconds since the Unix epoch.
pub const SIMULATED_EPOCH_MS: u64 = 1_767_225_600_000;

/// The clock and id source of a [`ZoneService`](crate::service::ZoneService).
#[derive(Clone)]
pub struct Env {
    clock: Clock,
    ids: IdSource,
}

impl Env {
    /// The wall clock and random (version 4) ids.
    pub fn system() -> Self {
        Env {
            clock: Arc::new(system_ms),
            ids: Arc::new(Uuid::new_v4),
        }
    }

    /// A deterministic environment for a simulation:
    ///
    /// - the clock reads [`SIMULATED_EPOCH_MS`] when first read and then
    ///   advances with tokio's clock ([`tokio::time::Instant`]), so under a
    ///   runtime with paused time it moves only as the simulation advances
    ///   time;
    /// - ids are version 4 uuids drawn from a generator seeded with `seed`
    ///   (splitmix64): the same sequence of calls gets the same ids.
    pub fn simulated(seed: u64) -> Self {
        let start: OnceLock<tokio::time::Instant> = OnceLock::new();
        let clock = move || {
            let start = *start.get_or_init(tokio::time::Instant::now);
            let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            SIMULATED_EPOCH_MS.saturating_add(elapsed)
        };
        Env {
            clock: Arc::new(clock),
            ids: seeded_ids(seed),
        }
    }

    /// This environment with another clock (milliseconds since the Unix
    /// epoch).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// This environment with another id source.
    pub fn with_ids(mut self, ids: IdSource) -> Self {
        self.ids = ids;
        self
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// Seconds since the Unix epoch.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// A new id.
    pub fn new_id(&self) -> Uuid {
        (self.ids)()
    }
}

impl Default for Env {
    /// [`Env::system`].
    fn default() -> Self {
        Env::system()
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Env")
            .field("now_ms", &self.now_ms())
            .finish_non_exhaustive()
    }
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Version 4 uuids from a splitmix64 stream seeded with `seed`.
pub fn seeded_ids(seed: u64) -> IdSource {
    let state = AtomicU64::new(seed);
    Arc::new(move || {
        let mut bytes = [0u8; 16];
        for half in bytes.chunks_exact_mut(8) {
            let z = state.fetch_add(GOLDEN_GAMMA, Ordering::Relaxed);
            half.copy_from_slice(&mix(z.wrapping_add(GOLDEN_GAMMA)).to_le_bytes());
        }
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    })
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn seeded_ids_replay_and_differ_by_seed() {
        let draw = |seed| {
            let env = Env::simulated(seed);
            (0..100).map(|_| env.new_id()).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1), "a seed replays");
        assert_ne!(a, draw(2));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), a.len());
        assert!(a.iter().all(|id| id.get_version_num() == 4));
    }

    #[tokio::test(start_paused = true)]
    async fn the_simulated_clock_follows_tokio_time() {
        let env = Env::simulated(0);
        assert_eq!(env.now_ms(), SIMULATED_EPOCH_MS);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(env.now_ms(), SIMULATED_EPOCH_MS + 1500);
        assert_eq!(env.now_secs(), SIMULATED_EPOCH_MS / 1000 + 1);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(env.now_ms(), SIMULATED_EPOCH_MS + 3_601_500);
    }

    #[test]
    fn the_system_env_reads_the_wall_clock_and_makes_random_ids() {
        let env = Env::default();
        let before = system_ms();
        let now = env.now_ms();
        assert!(now >= before && now <= system_ms());
        assert_ne!(env.new_id(), env.new_id());
        let fixed = env
            .with_clock(Arc::new(|| 42_000))
            .with_ids(Arc::new(|| Uuid::from_u128(9)));
        assert_eq!((fixed.now_ms(), fixed.now_secs()), (42_000, 42));
        assert_eq!(fixed.new_id(), Uuid::from_u128(9));
    }
}
