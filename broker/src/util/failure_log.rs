//! When to log a connection failure that repeats: at once when its reason
//! is new, then at most once per interval while the same reason persists
//! (sans-IO; the caller passes the time). A relay whose password was
//! refused retries every second; its log should say so, not fill up.

use std::time::{Duration, Instant};

/// The shortest time between two lines about the same failure.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct FailureLog {
    last: Option<(String, Instant)>,
}

impl FailureLog {
    /// Whether a failure for `reason` at `now` should be logged.
    pub fn due(&mut self, reason: &str, now: Instant) -> bool {
        let due = match &self.last {
            Some((last, at)) if last == reason => {
                now.saturating_duration_since(*at) >= REPEAT_INTERVAL
            }
            _ => true,
        };
        if due {
            self.last = Some((reason.to_string(), now));
        }
        due
    }

    /// The connection succeeded: the next failure is news again.
    pub fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_reason_is_logged_at_once_and_a_repeat_once_per_interval() {
        let start = Instant::now();
        let mut log = FailureLog::default();
        assert!(log.due("authorization violation", start));
        assert!(!log.due("authorization violation", start + Duration::from_secs(1)));
        assert!(log.due("TLS error", start + Duration::from_secs(2)));
        assert!(!log.due("TLS error", start + Duration::from_secs(31)));
        assert!(log.due("TLS error", start + Duration::from_secs(32)));
        log.reset();
        assert!(log.due("TLS error", start + Duration::from_secs(33)));
    }
}
