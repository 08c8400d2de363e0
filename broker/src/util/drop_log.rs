//! When to log a stream of drops: at most one line per interval, naming how
//! many happened since the previous line (sans-IO; the caller passes the
//! time). Every drop is counted in a metric as it happens; this only keeps
//! a flood of them from flooding the log as well.

use std::time::{Duration, Instant};

/// The shortest time between two log lines about the same kind of drop.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct DropLog {
    /// The running total at the last line, and when it was written.
    logged: Option<(u64, Instant)>,
}

impl DropLog {
    /// The running total of drops is `total` at `now`: returns how many to
    /// report if a line is due (the first drop always is), else `None`.
    pub fn due(&mut self, total: u64, now: Instant) -> Option<u64> {
        let since = match self.logged {
            Some((_, at)) if now.saturating_duration_since(at) < DROP_LOG_INTERVAL => return None,
            Some((at_total, _)) => total.saturating_sub(at_total),
            None => total,
        };
        self.logged = Some((total, now));
        Some(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_drop_is_logged_then_at_most_one_line_per_interval_with_the_count() {
        let start = Instant::now();
        let mut log = DropLog::default();
        assert_eq!(log.due(1, start), Some(1));
        assert_eq!(log.due(2, start + Duration::from_secs(1)), None);
        assert_eq!(log.due(500, start + Duration::from_secs(9)), None);
        assert_eq!(log.due(501, start + DROP_LOG_INTERVAL), Some(500));
        assert_eq!(log.due(502, start + DROP_LOG_INTERVAL), None);
        assert_eq!(log.due(503, start + Duration::from_secs(60)), Some(2));
    }
}
