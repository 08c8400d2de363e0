//! XXH64, the 64-bit xxHash, for the sequence chain's digest.
//!
//! Written out here rather than taken from a crate because the chain needs
//! only the one-shot function (about forty lines), and its result is part of
//! the wire format, so it is pinned by the test vectors below rather than by
//! a dependency's version. The algorithm is specified in xxHash's
//! `doc/xxhash_spec.md`; any conforming implementation in another language
//! gives the same digests.
//!
//! It replaced FNV-1a, which hashes one byte per dependent multiply: at full
//! journal ingest that took about an eighth of the relay's CPU. XXH64 works
//! on four independent 8-byte lanes, a 256-byte payload in a few dozen
//! multiplies.

const PRIME_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME_5: u64 = 0x27D4_EB2F_1656_67C5;

/// XXH64 of `input` with `seed`.
pub fn xxh64(input: &[u8], seed: u64) -> u64 {
    let mut rest = input;
    let mut hash = if input.len() >= 32 {
        let mut lanes = [
            seed.wrapping_add(PRIME_1).wrapping_add(PRIME_2),
            seed.wrapping_add(PRIME_2),
            seed,
            seed.wrapping_sub(PRIME_1),
        ];
        let mut stripes = input.chunks_exact(32);
        for stripe in &mut stripes {
            for (lane, word) in lanes.iter_mut().zip(stripe.chunks_exact(8)) {
                *lane = round(*lane, read_u64(word));
            }
        }
        rest = stripes.remainder();
        let mut hash = lanes[0]
            .rotate_left(1)
            .wrapping_add(lanes[1].rotate_left(7))
            .wrapping_add(lanes[2].rotate_left(12))
            .wrapping_add(lanes[3].rotate_left(18));
        for lane in lanes {
            hash = (hash ^ round(0, lane))
                .wrapping_mul(PRIME_1)
                .wrapping_add(PRIME_4);
        }
        hash
    } else {
        seed.wrapping_add(PRIME_5)
    };
    // usize to u64 is lossless on every target Rust supports.
    hash = hash.wrapping_add(input.len() as u64);

    let mut words = rest.chunks_exact(8);
    for word in &mut words {
        hash = (hash ^ round(0, read_u64(word)))
            .rotate_left(27)
            .wrapping_mul(PRIME_1)
            .wrapping_add(PRIME_4);
    }
    rest = words.remainder();
    if rest.len() >= 4 {
        let (word, tail) = rest.split_at(4);
        hash = (hash ^ u64::from(read_u32(word)).wrapping_mul(PRIME_1))
            .rotate_left(23)
            .wrapping_mul(PRIME_2)
            .wrapping_add(PRIME_3);
        rest = tail;
    }
    for &byte in rest {
        hash = (hash ^ u64::from(byte).wrapping_mul(PRIME_5))
            .rotate_left(11)
            .wrapping_mul(PRIME_1);
    }

    hash ^= hash >> 33;
    hash = hash.wrapping_mul(PRIME_2);
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(PRIME_3);
    hash ^ (hash >> 32)
}

fn round(lane: u64, word: u64) -> u64 {
    lane.wrapping_add(word.wrapping_mul(PRIME_2))
        .rotate_left(31)
        .wrapping_mul(PRIME_1)
}

/// `word` is exactly 8 bytes (a `chunks_exact(8)` chunk).
fn read_u64(word: &[u8]) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(word);
    u64::from_le_bytes(bytes)
}

/// `word` is exactly 4 bytes.
fn read_u32(word: &[u8]) -> u32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(word);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::xxh64;

    fn counting(len: u8) -> Vec<u8> {
        (0..len).collect()
    }

    // Expected values from the reference implementation (python-xxhash
    // 3.x, which wraps the C library); together they take every path:
    // under 4 bytes, the 4-byte step, the 8-byte words and the 32-byte
    // stripes, with zero, small and all-ones seeds.
    #[test]
    fn matches_the_reference_implementation() {
        assert_eq!(xxh64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxh64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(xxh64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
        assert_eq!(xxh64(b"abc", 1), 0xbea9_ca81_9932_8908);
        assert_eq!(xxh64(&counting(7), 5), 0xe487_8bbf_72f5_9115);
        assert_eq!(xxh64(&counting(12), 5), 0x270a_414d_05e5_9a30);
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition", 0),
            0xfbce_a83c_8a37_8bf1
        );
        assert_eq!(xxh64(&[b'a'; 32], 0), 0x856e_8432_98f9_9ad7);
        assert_eq!(xxh64(&counting(100), u64::MAX), 0x09a9_91a0_91c9_f6d7);
        let all_bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(xxh64(&all_bytes, 0), 0x1fac_be84_06cd_904b);
        assert_eq!(
            xxh64(&all_bytes, 0x0123_4567_89ab_cdef),
            0x795a_eafa_cb0b_983b
        );
    }
}
