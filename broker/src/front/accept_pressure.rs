//! What an accept loop does under pressure: when `accept` fails, and when
//! connections arrive over `sessions.max_connections`.
//!
//! A failure the kernel reports for one pending connection is skipped at
//! once; any other (typically the process out of file descriptors, EMFILE
//! or ENFILE) pauses that loop, 100 ms doubling to 1 s while it repeats,
//! instead of spinning.
//!
//! A listening socket with connections waiting stays readable, so a loop
//! that retried at once after EMFILE would take a core and starve the other
//! listeners and the operations endpoint of CPU, while freeing no
//! descriptor. Each pause is counted in
//! `holdfast_accept_failures_total{listener}` and logged at most every 10 s
//! with the count since the previous line. The decision is sans-IO (the
//! caller passes the time); [`AcceptFailures::pause`] is the async shell.
//!
//! Connections over the limit are counted by the caller as each happens;
//! [`RefusalLog`] keeps a flood of them from flooding the log as well.

use crate::util::drop_log::DropLog;
use std::io;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The first pause after a failure.
pub const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause while failures repeat.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Which accept loop, as the metric's `listener` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Unix,
    NatsFront,
    EtcdFront,
    Metrics,
}

impl Listener {
    pub fn name(self) -> &'static str {
        match self {
            Listener::Unix => "unix",
            Listener::NatsFront => "nats_front",
            Listener::EtcdFront => "etcd_front",
            Listener::Metrics => "metrics",
        }
    }
}

/// One accept loop's failures: the next pause and the log's pacing.
#[derive(Debug)]
pub struct AcceptFailures {
    listener: Listener,
    next_pause: Duration,
    total: u64,
    log: DropLog,
}

impl AcceptFailures {
    pub fn new(listener: Listener) -> AcceptFailures {
        AcceptFailures {
            listener,
            next_pause: FIRST_PAUSE,
            total: 0,
            log: DropLog::default(),
        }
    }

    /// A connection was accepted: the next failure starts from the first pause.
    pub fn accepted(&mut self) {
        self.next_pause = FIRST_PAUSE;
    }

    /// `accept` failed with `error` at `now`: how long the loop must pause
    /// before accepting again (zero for a failure of one pending
    /// connection), and whether to log it, with the count since the last line.
    pub fn failed(&mut self, error: &io::Error, now: Instant) -> Pause {
        if concerns_one_connection(error) {
            return Pause {
                wait: Duration::ZERO,
                log_count: None,
            };
        }
        self.total += 1;
        let wait = self.next_pause;
        self.next_pause = (self.next_pause * 2).min(MAX_PAUSE);
        Pause {
            wait,
            log_count: self.log.due(self.total, now),
        }
    }

    /// Counts, logs (paced) and sleeps out a failure; returns early if
    /// `stop` fires.
    pub async fn pause(&mut self, error: &io::Error, stop: &CancellationToken) {
        let pause = self.failed(error, Instant::now());
        if pause.wait.is_zero() {
            debug!(listener = self.listener.name(), %error, "a pending connection failed before it was accepted");
            return;
        }
        metrics::counter!("holdfast_accept_failures_total", "listener" => self.listener.name())
            .increment(1);
        if let Some(count) = pause.log_count {
            warn!(
                listener = self.listener.name(),
                %error,
                failures = count,
                pause_ms = pause.wait.as_millis() as u64,
                "accept failed (out of file descriptors?); pausing this listener, the others keep serving"
            );
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(pause.wait) => {}
        }
    }
}

/// Paces the log lines about connections refused at
/// `sessions.max_connections`: the first at once, then at most one per
/// interval naming how many since.
#[derive(Debug, Default)]
pub struct RefusalLog {
    total: u64,
    log: DropLog,
}

impl RefusalLog {
    /// One more connection on `listener` was refused.
    pub fn refused(&mut self, listener: &str, max_connections: usize) {
        self.total += 1;
        if let Some(count) = self.log.due(self.total, Instant::now()) {
            warn!(
                listener,
                refused = count,
                max_connections,
                "connections refused: sessions.max_connections reached"
            );
        }
    }
}

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    pub wait: Duration,
    /// Failures to report in a log line now, if one is due.
    pub log_count: Option<u64>,
}

/// Errors accept(2) passes on from one pending connection (its client
/// already gave up, or the network failed under it): the next one may
/// well succeed, so there is nothing to wait for.
fn concerns_one_connection(error: &io::Error) -> bool {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) {
        return true;
    }
    matches!(
        error.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[test]
    fn out_of_descriptors_pauses_doubling_to_a_second_and_an_accept_resets_it() {
        let start = Instant::now();
        let mut failures = AcceptFailures::new(Listener::EtcdFront);
        let waits: Vec<Duration> = (0..6)
            .map(|_| failures.failed(&emfile(), start).wait)
            .collect();
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(
            waits,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        failures.accepted();
        let enfile = io::Error::from_raw_os_error(libc::ENFILE);
        assert_eq!(failures.failed(&enfile, start).wait, FIRST_PAUSE);
    }

    #[test]
    fn a_failure_of_one_pending_connection_is_skipped_without_pause_or_count() {
        let start = Instant::now();
        let mut failures = AcceptFailures::new(Listener::Unix);
        for error in [
            io::Error::from(io::ErrorKind::ConnectionAborted),
            io::Error::from_raw_os_error(libc::EPROTO),
            io::Error::from_raw_os_error(libc::ENETUNREACH),
        ] {
            assert_eq!(
                failures.failed(&error, start),
                Pause {
                    wait: Duration::ZERO,
                    log_count: None
                }
            );
        }
        // Not counted: the first real failure is still the first.
        assert_eq!(failures.failed(&emfile(), start).log_count, Some(1));
    }

    #[test]
    fn repeated_failures_are_logged_once_per_interval_with_their_count() {
        let start = Instant::now();
        let mut failures = AcceptFailures::new(Listener::Metrics);
        assert_eq!(failures.failed(&emfile(), start).log_count, Some(1));
        for second in 1..10 {
            let now = start + Duration::from_secs(second);
            assert_eq!(failures.failed(&emfile(), now).log_count, None);
        }
        let later = start + crate::util::drop_log::DROP_LOG_INTERVAL;
        assert_eq!(failures.failed(&emfile(), later).log_count, Some(10));
    }
}
