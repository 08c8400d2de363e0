//! `IdHash`: the hasher of the maps keyed by ids this client hands out
//! itself (ack and request ids, counting up from 1).
//!
//! std's default SipHash guards against keys an attacker picks; these keys
//! come from this client's own counter, and hashing one with SipHash twice
//! per acked publish (insert, then remove) showed in the publishing
//! thread's profile. A multiply by an odd constant spreads consecutive ids
//! over the table's buckets and control bytes.

use std::hash::{BuildHasherDefault, Hasher};

/// `HashMap<u64, V, IdHash>`: for ids this client counts out itself.
pub(crate) type IdHash = BuildHasherDefault<IdHasher>;

#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than `u64`; none are used, but a
        // correct (if slower) fold keeps it a valid hasher.
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // 2^64 / golden ratio, odd: consecutive ids land far apart in both
        // the low bits (bucket) and the high bits (hashbrown's tag).
        self.0 = (self.0.rotate_left(5) ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::hash::BuildHasher;

    #[test]
    fn consecutive_ids_spread_over_buckets_and_tags() {
        let hasher = IdHash::default();
        let hashes: Vec<u64> = (1..=4096u64).map(|id| hasher.hash_one(id)).collect();
        let low: HashSet<u64> = hashes.iter().map(|hash| hash & 4095).collect();
        let high: HashSet<u64> = hashes.iter().map(|hash| hash >> 57).collect();
        assert!(low.len() > 2500, "bucket bits collide: {}", low.len());
        assert_eq!(high.len(), 128, "every tag value is used");
    }

    #[test]
    fn a_map_keyed_by_ids_finds_what_it_holds() {
        let mut map: HashMap<u64, u64, IdHash> = HashMap::default();
        for id in 1..=10_000u64 {
            map.insert(id, id * 2);
        }
        for id in (1..=10_000u64).step_by(7) {
            assert_eq!(map.remove(&id), Some(id * 2));
        }
        assert_eq!(map.len(), 10_000 - 1_429);
        assert_eq!(map.get(&8), None, "removed");
        assert_eq!(map.get(&9), Some(&18));
    }
}
