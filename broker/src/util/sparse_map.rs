//! Giving back a hash map's room once most of it is empty.
//!
//! A `HashMap` keeps the capacity of its largest size: after 30,000
//! subscriptions ended, the tables that had held them kept about 20 MiB
//! until the relay stopped. Shrinking once the map is under a quarter
//! full, to twice what it holds, costs one rehash per halving, so a map
//! that empties one entry at a time does O(1) amortised work per removal.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Maps smaller than this are left alone: their room is not worth a rehash.
const SMALLEST_SHRUNK: usize = 1024;

/// Shrinks `map` when it uses less than a quarter of its capacity.
pub fn shrink_if_sparse<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    let capacity = map.capacity();
    if capacity > SMALLEST_SHRUNK && map.len() < capacity / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_map_gives_its_room_back_and_a_small_one_is_left_alone() {
        let mut map: HashMap<u32, u64> = (0..100_000).map(|key| (key, 0)).collect();
        let full = map.capacity();
        for key in 0..100_000 {
            map.remove(&key);
            shrink_if_sparse(&mut map);
            assert!(map.capacity() <= full);
        }
        assert!(map.capacity() <= SMALLEST_SHRUNK * 2, "{}", map.capacity());
        let mut small: HashMap<u32, u64> = (0..500).map(|key| (key, 0)).collect();
        let room = small.capacity();
        small.clear();
        shrink_if_sparse(&mut small);
        assert_eq!(small.capacity(), room);
    }
}
