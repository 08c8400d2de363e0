//! What sessions, the status document and the metrics see of an upstream
//! link (NATS or etcd): its state, since when, and its outage history.

use holdfast_wire::LinkStatus;
use std::time::{Duration, SystemTime};

/// An upstream link as sessions, the status document and metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSnapshot {
    pub status: LinkStatus,
    pub since: SystemTime,
    pub outages: u64,
    /// Time spent down before the current state began.
    pub past_downtime: Duration,
}

impl LinkSnapshot {
    /// How long the current outage has lasted; zero while not down.
    pub fn current_outage(&self) -> Duration {
        if self.status != LinkStatus::Down {
            return Duration::ZERO;
        }
        SystemTime::now()
            .duration_since(self.since)
            .unwrap_or_default()
    }

    /// Total time down since the relay started, the current outage included.
    pub fn downtime(&self) -> Duration {
        self.past_downtime + self.current_outage()
    }
}
