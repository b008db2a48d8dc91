//! The hasher of the maps looked up on every request of a format-v3 disk
//! (block map, crc cache, dirty crcs of the crc journal): keys are the
//! disk's own numbers (physical blocks, chunk keys), so the standard
//! library's keyed SipHash, 4–5 % of a node's CPU on 1 MiB transfers with
//! a look-up per block, buys nothing here. Multiply-rotate per word, then a
//! final mix so that the high bits hashbrown keeps as tags depend on every
//! input bit. Chunk numbers come from writers, so the hash starts from a
//! key drawn once per process: nobody outside can choose chunks that all
//! land in one bucket and make every look-up of the node slow.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

const K: u64 = 0xf135_7aea_2e62_a9c5;

#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(26) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u8(&mut self, v: u8) {
        self.add(u64::from(v));
    }

    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 32;
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }
}

/// Builds [`FastHasher`]s that start from the process's key.
#[derive(Clone, Copy)]
pub(crate) struct FastBuild(u64);

impl Default for FastBuild {
    fn default() -> Self {
        static KEY: OnceLock<u64> = OnceLock::new();
        // The standard library's random keys (from the OS) as the source.
        FastBuild(
            *KEY.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0u64)),
        )
    }
}

impl BuildHasher for FastBuild {
    type Hasher = FastHasher;

    #[inline]
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

/// A `HashMap` with [`FastHasher`].
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, FastBuild>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearby_keys_spread_over_buckets_and_tags() {
        let b = FastBuild::default();
        let mut low = std::collections::HashSet::new();
        let mut high = std::collections::HashSet::new();
        for k in 0u64..4096 {
            let h = b.hash_one(k);
            low.insert(h & 1023);
            high.insert(h >> 57);
        }
        assert!(low.len() > 950, "{} of 1024 low buckets", low.len());
        assert_eq!(high.len(), 128);
        let u = uuid::Uuid::from_u128(7);
        assert_ne!(b.hash_one((u, 1u64)), b.hash_one((u, 2u64)));
    }
}
