//! Waiting on signals instead of sleeping: helpers that end as soon as a
//! server shows that something happened (or that the moment it would have
//! happened has passed), bounded by [`WAIT`].
//!
//! Timing is read from the servers' own clocks where they show one: a
//! lease's remaining TTL as etcd or the relay's etcd front end report it,
//! the relay's count of etcd reconnect attempts.

use crate::support::{Relay, WAIT};
use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `ready` every 20 ms until it yields a value or `WAIT` passes.
pub async fn poll_for<T, F, Fut>(what: &str, mut ready: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = ready().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the remaining TTL of a lease, read by `remaining` in whole
/// seconds, proves the lease was renewed `renewals` times after this call;
/// returns how long that took. Fails if the lease runs out (a reading of
/// zero or less) or `WAIT` passes.
///
/// A reading is within a second of the true remaining time, always on the
/// same side (etcd truncates it, the relay's front end rounds it up).
/// Without a renewal the remaining time only shrinks with the time that
/// passed, so a reading of `later` taken `elapsed` after a reading of
/// `earlier` is impossible unless the lease was renewed in between once
/// `elapsed >= earlier + 1 - later` seconds. The elapsed time is counted
/// from when the earlier answer arrived to when the later request was sent,
/// which is less than what passed on the server between its two readings.
/// Each proof starts from the reading that completed the one before, so the
/// renewals proven happened in distinct intervals.
pub async fn lease_renewed<F, Fut>(what: &str, mut remaining: F, renewals: u32) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = i64>,
{
    let started = Instant::now();
    let deadline = started + WAIT;
    let mut earlier = remaining().await;
    let mut earlier_at = Instant::now();
    let mut proven = 0;
    while proven < renewals {
        assert!(earlier > 0, "{what}: the lease ran out");
        assert!(
            Instant::now() < deadline,
            "{what}: only {proven} of {renewals} renewals seen in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = Instant::now();
        let later = remaining().await;
        let at = Instant::now();
        assert!(later > 0, "{what}: the lease ran out");
        let needed = Duration::from_secs(u64::try_from(earlier + 1 - later).unwrap_or(0));
        if sent.duration_since(earlier_at) >= needed {
            proven += 1;
            earlier = later;
            earlier_at = at;
        }
    }
    started.elapsed()
}

/// The remaining TTL of `lease` as etcd (or the relay's etcd front end)
/// reports it: -1 once it is gone, or if the call fails.
pub async fn lease_ttl(client: &mut etcd_client::Client, lease: i64) -> i64 {
    client
        .lease_time_to_live(lease, None)
        .await
        .map(|answer| answer.ttl())
        .unwrap_or(-1)
}

/// Waits until etcd says `lease` is gone (it expired on etcd's own clock,
/// or was revoked); returns how long that took.
pub async fn lease_gone(etcd: &mut etcd_client::Client, lease: i64) -> Duration {
    let started = Instant::now();
    loop {
        let ttl = lease_ttl(etcd, lease).await;
        if ttl < 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < WAIT,
            "lease {lease:x} still has {ttl} s after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relay's count of etcd connection attempts that failed, each
/// followed by a backoff delay (from its status document).
pub fn etcd_reconnect_attempts(relay: &Relay) -> u64 {
    relay.status()["etcd"]["reconnect_attempts"]
        .as_u64()
        .expect("etcd.reconnect_attempts in the status")
}

/// Waits until the relay has started its `attempts`th backoff delay after
/// failing to reach etcd.
pub async fn etcd_backoff_started(relay: &Relay, attempts: u64) {
    poll_for(&format!("etcd reconnect attempt {attempts}"), || async {
        (etcd_reconnect_attempts(relay) >= attempts).then_some(())
    })
    .await;
}
