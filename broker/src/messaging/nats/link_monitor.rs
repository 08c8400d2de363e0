//! Decides whether the NATS link is up, from connection events and probes.
//!
//! Sans-IO: the caller feeds events with the current time and gets back the
//! new status when it changes. The rule is deliberately simple so an operator
//! can predict it: the link is down the moment the connection drops, or when
//! no probe has completed a round trip through the server for
//! `link_timeout` (which catches a server that is stopped or wedged but
//! whose TCP connection is still open).

use holdfast_wire::LinkStatus;
use std::time::{Duration, Instant};

/// State of one upstream link.
#[derive(Debug)]
pub struct LinkMonitor {
    status: LinkStatus,
    connected: bool,
    link_timeout: Duration,
    /// Last time the server proved it is alive (connect or probe).
    last_alive: Instant,
    outages: u64,
}

impl LinkMonitor {
    /// A monitor that starts `Unknown` and turns `Down` if nothing proves
    /// the link alive within `link_timeout`.
    pub fn new(now: Instant, link_timeout: Duration) -> LinkMonitor {
        LinkMonitor {
            status: LinkStatus::Unknown,
            connected: false,
            link_timeout,
            last_alive: now,
            outages: 0,
        }
    }

    pub fn status(&self) -> LinkStatus {
        self.status
    }

    /// When the link turns down unless the server proves alive before then.
    pub fn silence_deadline(&self) -> Instant {
        self.last_alive + self.link_timeout
    }

    /// How many times the link went from up (or unknown) to down.
    pub fn outages(&self) -> u64 {
        self.outages
    }

    /// Whether a probe should be sent now: only over a live connection, since
    /// probes queued on a dead one would be replayed stale after reconnect.
    pub fn wants_probe(&self) -> bool {
        self.connected
    }

    /// The client finished a handshake with a server.
    pub fn on_connected(&mut self, now: Instant) -> Option<LinkStatus> {
        self.connected = true;
        self.last_alive = now;
        self.set(LinkStatus::Up)
    }

    /// The connection to the server was lost.
    pub fn on_disconnected(&mut self) -> Option<LinkStatus> {
        self.connected = false;
        self.set(LinkStatus::Down)
    }

    /// A probe made a round trip through the server.
    pub fn on_probe_ok(&mut self, now: Instant) -> Option<LinkStatus> {
        self.last_alive = now;
        if self.connected {
            self.set(LinkStatus::Up)
        } else {
            None
        }
    }

    /// Time passed; turns the link down if the server has been silent too long.
    pub fn on_tick(&mut self, now: Instant) -> Option<LinkStatus> {
        if now >= self.silence_deadline() {
            self.set(LinkStatus::Down)
        } else {
            None
        }
    }

    fn set(&mut self, status: LinkStatus) -> Option<LinkStatus> {
        if self.status == status {
            return None;
        }
        if status == LinkStatus::Down {
            self.outages += 1;
        }
        self.status = status;
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    #[test]
    fn starts_unknown_and_goes_down_if_never_connected() {
        let start = Instant::now();
        let mut monitor = LinkMonitor::new(start, TIMEOUT);
        assert_eq!(monitor.status(), LinkStatus::Unknown);
        assert_eq!(monitor.on_tick(start + Duration::from_millis(900)), None);
        assert_eq!(
            monitor.on_tick(start + Duration::from_millis(1100)),
            Some(LinkStatus::Down)
        );
        assert_eq!(monitor.outages(), 1);
    }

    #[test]
    fn disconnect_is_down_at_once_and_reconnect_is_up() {
        let start = Instant::now();
        let mut monitor = LinkMonitor::new(start, TIMEOUT);
        assert_eq!(monitor.on_connected(start), Some(LinkStatus::Up));
        assert_eq!(monitor.on_disconnected(), Some(LinkStatus::Down));
        assert!(!monitor.wants_probe());
        assert_eq!(
            monitor.on_connected(start + Duration::from_secs(5)),
            Some(LinkStatus::Up)
        );
        assert_eq!(monitor.outages(), 1);
    }

    #[test]
    fn silent_server_on_open_connection_goes_down_then_recovers_on_probe() {
        let start = Instant::now();
        let mut monitor = LinkMonitor::new(start, TIMEOUT);
        monitor.on_connected(start);
        monitor.on_probe_ok(start + Duration::from_millis(250));
        assert_eq!(
            monitor.silence_deadline(),
            start + Duration::from_millis(1250)
        );
        assert_eq!(monitor.on_tick(start + Duration::from_millis(1249)), None);
        assert_eq!(
            monitor.on_tick(start + Duration::from_millis(1250)),
            Some(LinkStatus::Down)
        );
        assert!(monitor.wants_probe(), "still connected, so keep probing");
        assert_eq!(
            monitor.on_probe_ok(start + Duration::from_secs(3)),
            Some(LinkStatus::Up)
        );
    }

    #[test]
    fn late_probe_after_disconnect_does_not_claim_up() {
        let start = Instant::now();
        let mut monitor = LinkMonitor::new(start, TIMEOUT);
        monitor.on_connected(start);
        monitor.on_disconnected();
        assert_eq!(monitor.on_probe_ok(start + Duration::from_millis(6)), None);
        assert_eq!(monitor.status(), LinkStatus::Down);
    }
}
