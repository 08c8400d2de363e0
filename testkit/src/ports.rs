//! Free loopback ports, each handed out once per process.

use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::ops::Range;
use std::sync::Mutex;

/// Where [`free_port`] looks: below Linux's ephemeral range (32768 on), so
/// no outgoing connection's local port (a relay's reconnect attempts among
/// them) can take a server's port while the server is down for an outage
/// and is about to be restarted on it.
pub const TEST_PORTS: Range<u16> = 20_000..32_000;

/// Ports handed out by [`free_port`] in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free TCP port on 127.0.0.1 in [`TEST_PORTS`], never handed out twice
/// in this process: two tests (or scenarios) cannot share one even while
/// one of them has its server stopped.
pub fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    // A random start, so parallel test binaries rarely probe the same ports.
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for attempt in 0..span {
        // 7919 is prime to the span, so the walk visits every port once.
        let offset = seed.wrapping_add(attempt.wrapping_mul(7919)) % span;
        let Ok(offset) = u16::try_from(offset) else {
            continue;
        };
        let port = TEST_PORTS.start + offset;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Err(Error::NoFreePort { range: TEST_PORTS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_a_port_twice_and_stays_in_range() {
        let mut seen = BTreeSet::new();
        for _ in 0..500 {
            let port = free_port().unwrap();
            assert!(TEST_PORTS.contains(&port), "{port}");
            assert!(seen.insert(port), "{port} handed out twice");
        }
    }
}
