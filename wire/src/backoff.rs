//! Reconnect delays: exponential growth to a cap, with jitter.
//!
//! Shared by the client (reconnecting to the relay) and the relay
//! (reconnecting to etcd), so both spread their retries the same way.
//!
//! Jitter keeps the clients of a restarted relay from reconnecting in
//! lockstep. The randomness comes from std's per-process random hash keys
//! mixed with the clock and a counter, which is plenty for spreading retries
//! and avoids a dependency on a random number crate.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exponential backoff with "equal jitter": attempt `n` waits a random time
/// in `[base/2, base]` where `base = min(initial * 2^n, cap)`.
///
/// Never waiting less than half the base keeps a crowd of clients from
/// hammering a relay that is still starting; never waiting more than the cap
/// bounds how long a component stays cut off after the relay is back.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    next_base: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `cap`.
    ///
    /// A zero `initial` is raised to 1 ms (a zero base would never grow), and
    /// a `cap` below `initial` is raised to `initial`.
    pub fn new(initial: Duration, cap: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        let cap = cap.max(initial);
        Backoff {
            initial,
            cap,
            next_base: initial,
        }
    }

    /// The delay before the next attempt, with fresh jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(jitter_source())
    }

    /// The delay before the next attempt, jittered by `random` (any value;
    /// only its distribution matters). Deterministic, for tests.
    pub fn next_delay_with(&mut self, random: u64) -> Duration {
        let base = self.next_base;
        self.next_base = base.saturating_mul(2).min(self.cap);
        let half = base / 2;
        let spread_nanos = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if spread_nanos == 0 {
            0
        } else {
            random % (spread_nanos + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// Starts over at the initial delay, after a successful connection.
    pub fn reset(&mut self) {
        self.next_base = self.initial;
    }

    /// The smallest base delay (the first attempt waits between half of it and it).
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The largest delay ever returned.
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

/// A fresh pseudo-random `u64` for jitter.
pub fn jitter_source() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(since_epoch.as_nanos());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_half_base_and_base_and_grow_to_the_cap() {
        let initial = Duration::from_millis(50);
        let cap = Duration::from_secs(2);
        let mut backoff = Backoff::new(initial, cap);
        let mut base = initial;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay >= base / 2, "{delay:?} below half of {base:?}");
            assert!(delay <= base, "{delay:?} above {base:?}");
            base = (base * 2).min(cap);
        }
        assert_eq!(base, cap);
    }

    #[test]
    fn extreme_random_values_hit_the_bounds_exactly() {
        let mut low = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(low.next_delay_with(0), Duration::from_millis(50));
        let mut high = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let spread = Duration::from_millis(50).as_nanos() as u64;
        assert_eq!(high.next_delay_with(spread), Duration::from_millis(100));
        for _ in 0..10 {
            assert!(high.next_delay_with(u64::MAX) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn reset_returns_to_the_initial_delay() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(50));
    }

    #[test]
    fn degenerate_settings_are_repaired() {
        let backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff.initial(), Duration::from_millis(1));
        assert_eq!(backoff.cap(), Duration::from_millis(1));
    }

    #[test]
    fn jitter_varies_between_calls() {
        let samples: std::collections::HashSet<u64> = (0..32).map(|_| jitter_source()).collect();
        assert!(samples.len() > 30);
    }
}
