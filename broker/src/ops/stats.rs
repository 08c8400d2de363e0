//! Relay-wide counters, shared by every session as relaxed atomics.
//!
//! Counting is one atomic add per event, never a lock. Two readers: the
//! status document (`holdfast status`, `/status`) takes a snapshot, and the
//! Prometheus exporter copies the same numbers at scrape time
//! (`telemetry.rs`), so there is one set of books.

use crate::front::access::Operation;
use holdfast_wire::ErrorCode;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// What became of a publish, as counted per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    Forwarded,
    Journaled,
    Queued,
    Rejected,
}

impl PublishOutcome {
    pub const ALL: [PublishOutcome; 4] = [
        PublishOutcome::Forwarded,
        PublishOutcome::Journaled,
        PublishOutcome::Queued,
        PublishOutcome::Rejected,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PublishOutcome::Forwarded => "forwarded",
            PublishOutcome::Journaled => "journaled",
            PublishOutcome::Queued => "queued",
            PublishOutcome::Rejected => "rejected",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The limits that protect the relay from one client, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `sessions.max_connections`: a new connection was turned away.
    Connections,
    /// `sessions.hello_timeout`: no HELLO in time after connecting.
    HelloTimeout,
    /// `sessions.idle_timeout`: a connection sent nothing for that long.
    IdleTimeout,
    /// `relay.max_frame_bytes`: a frame announced a larger length.
    FrameSize,
    /// `sessions.max_subscriptions`.
    Subscriptions,
    /// Watches per connection.
    Watches,
    /// `sessions.max_inflight_requests`.
    InflightRequests,
    /// `sessions.outbound_queue_frames` of answers (acks) a client has not
    /// read: the session stops reading its requests until they drain.
    UnreadAnswers,
    /// `sessions.read_budget_bytes` (or a QUIC connection's one frame):
    /// a reader waited for room before taking in a large frame.
    ReadBudget,
}

impl Limit {
    pub const ALL: [Limit; 9] = [
        Limit::Connections,
        Limit::HelloTimeout,
        Limit::IdleTimeout,
        Limit::FrameSize,
        Limit::Subscriptions,
        Limit::Watches,
        Limit::InflightRequests,
        Limit::UnreadAnswers,
        Limit::ReadBudget,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::HelloTimeout => "hello_timeout",
            Limit::IdleTimeout => "idle_timeout",
            Limit::FrameSize => "frame_size",
            Limit::Subscriptions => "subscriptions",
            Limit::Watches => "watches",
            Limit::InflightRequests => "inflight_requests",
            Limit::UnreadAnswers => "unread_answers",
            Limit::ReadBudget => "read_budget",
        }
    }
}

const CODE_SLOTS: usize = ErrorCode::ALL.len() + 1;

/// One counter per error code (plus one for codes this build does not know).
#[derive(Debug, Default)]
pub struct CodeCounters([AtomicU64; CODE_SLOTS]);

impl CodeCounters {
    fn slot(code: ErrorCode) -> usize {
        ErrorCode::ALL
            .iter()
            .position(|known| *known == code)
            .unwrap_or(CODE_SLOTS - 1)
    }

    pub fn bump(&self, code: ErrorCode) {
        bump(&self.0[CodeCounters::slot(code)]);
    }

    pub fn get(&self, code: ErrorCode) -> u64 {
        self.0[CodeCounters::slot(code)].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.0
            .iter()
            .map(|counter| counter.load(Ordering::Relaxed))
            .sum()
    }

    /// Non-zero counters by code name.
    pub fn by_name(&self) -> BTreeMap<&'static str, u64> {
        let mut names = BTreeMap::new();
        for code in ErrorCode::ALL {
            let value = self.get(code);
            if value > 0 {
                names.insert(code.name(), value);
            }
        }
        let unknown = self.0[CODE_SLOTS - 1].load(Ordering::Relaxed);
        if unknown > 0 {
            names.insert("unknown", unknown);
        }
        names
    }
}

/// The counters.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Class names, in the order of [`crate::messaging::classes::Classes`].
    class_names: Vec<String>,
    pub sessions_active: AtomicU64,
    pub sessions_total: AtomicU64,
    publishes: Vec<[AtomicU64; PublishOutcome::ALL.len()]>,
    /// Rejected publishes by reason.
    pub publish_rejections: CodeCounters,
    pub local_deliveries: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub slow_consumer_drops: AtomicU64,
    /// Messages NATS can never take (over its max_payload), dropped.
    pub nats_refused_drops: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    /// Connections closed for bad input, by code.
    pub frame_errors: CodeCounters,
    pub requests_total: AtomicU64,
    /// Failed requests by code.
    pub request_failures: CodeCounters,
    pub requests_served_locally: AtomicU64,
    /// Refusals by limit, indexed as [`Limit::ALL`].
    limit_rejections: [AtomicU64; Limit::ALL.len()],
    /// Operations access rules refused, indexed as [`Operation::ALL`].
    access_denials: [AtomicU64; Operation::ALL.len()],
    /// QUIC connections that failed in the handshake (bad or missing
    /// client certificate, wrong ALPN, timeout).
    pub quic_handshake_failures: AtomicU64,
    /// QUIC connections open now, and how many of them carry no session
    /// that said HELLO (closed after hello_timeout or idle_timeout).
    pub quic_connections: AtomicU64,
    pub quic_connections_without_session: AtomicU64,
    /// Journal files found unreadable at start and moved aside.
    pub journal_quarantines: AtomicU64,
}

/// A point-in-time copy of [`RelayStats`], as the status document shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub sessions_total: u64,
    pub publishes_forwarded: u64,
    pub publishes_rejected_nats_unavailable: u64,
    pub publishes_rejected_invalid: u64,
    pub local_deliveries: u64,
    pub messages_delivered: u64,
    pub slow_consumer_drops: u64,
    pub slow_consumer_disconnects: u64,
    pub frame_errors: u64,
    pub requests_total: u64,
    pub requests_failed: u64,
    pub requests_served_locally: u64,
    pub limit_rejections: u64,
    pub access_denials: u64,
    /// Publishes by class, then by outcome.
    pub publishes_by_class: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Rejected publishes by reason (error code name).
    pub publish_rejections: BTreeMap<&'static str, u64>,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `amount` to a counter.
pub fn add(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::Relaxed);
}

/// Reads a counter.
pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl RelayStats {
    /// Counters for the given classes (names in drain order).
    pub fn new(class_names: Vec<String>) -> RelayStats {
        RelayStats {
            publishes: class_names.iter().map(|_| Default::default()).collect(),
            class_names,
            ..RelayStats::default()
        }
    }

    pub fn record_limit(&self, limit: Limit) {
        bump(&self.limit_rejections[limit as usize]);
    }

    pub fn limit_rejections(&self, limit: Limit) -> u64 {
        read(&self.limit_rejections[limit as usize])
    }

    pub fn record_access_denial(&self, operation: Operation) {
        bump(&self.access_denials[operation as usize]);
    }

    pub fn access_denials(&self, operation: Operation) -> u64 {
        read(&self.access_denials[operation as usize])
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn sessions_active(&self) -> u64 {
        read(&self.sessions_active)
    }

    pub fn record_publish(&self, class: usize, outcome: PublishOutcome) {
        if let Some(counters) = self.publishes.get(class) {
            bump(&counters[outcome.index()]);
        }
    }

    pub fn record_rejection(&self, class: usize, code: ErrorCode) {
        self.record_publish(class, PublishOutcome::Rejected);
        self.publish_rejections.bump(code);
    }

    /// Publishes of class `class` (index into the class list) with `outcome`.
    pub fn publishes(&self, class: usize, outcome: PublishOutcome) -> u64 {
        self.publishes
            .get(class)
            .map_or(0, |counters| read(&counters[outcome.index()]))
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut publishes_by_class = BTreeMap::new();
        let mut forwarded = 0;
        for (class, name) in self.class_names.iter().enumerate() {
            let mut outcomes = BTreeMap::new();
            for outcome in PublishOutcome::ALL {
                outcomes.insert(outcome.name(), self.publishes(class, outcome));
            }
            forwarded += self.publishes(class, PublishOutcome::Forwarded);
            publishes_by_class.insert(name.clone(), outcomes);
        }
        let nats_unavailable = self.publish_rejections.get(ErrorCode::NatsUnavailable);
        StatsSnapshot {
            sessions_total: read(&self.sessions_total),
            publishes_forwarded: forwarded,
            publishes_rejected_nats_unavailable: nats_unavailable,
            publishes_rejected_invalid: self.publish_rejections.total() - nats_unavailable,
            local_deliveries: read(&self.local_deliveries),
            messages_delivered: read(&self.messages_delivered),
            slow_consumer_drops: read(&self.slow_consumer_drops),
            slow_consumer_disconnects: read(&self.slow_consumer_disconnects),
            frame_errors: self.frame_errors.total(),
            requests_total: read(&self.requests_total),
            requests_failed: self.request_failures.total(),
            requests_served_locally: read(&self.requests_served_locally),
            limit_rejections: Limit::ALL
                .iter()
                .map(|limit| self.limit_rejections(*limit))
                .sum(),
            access_denials: Operation::ALL
                .iter()
                .map(|operation| self.access_denials(*operation))
                .sum(),
            publishes_by_class,
            publish_rejections: self.publish_rejections.by_name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_are_counted_by_class_and_rejections_by_reason() {
        let names = ["prefill", "decode", "kv_events", "default"];
        let stats = RelayStats::new(names.iter().map(|name| name.to_string()).collect());
        stats.record_publish(0, PublishOutcome::Forwarded);
        stats.record_publish(3, PublishOutcome::Forwarded);
        stats.record_rejection(1, ErrorCode::NatsUnavailable);
        stats.record_rejection(3, ErrorCode::UnknownClass);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.publishes_forwarded, 2);
        assert_eq!(snapshot.publishes_by_class["prefill"]["forwarded"], 1);
        assert_eq!(snapshot.publishes_by_class["default"]["forwarded"], 1);
        assert_eq!(snapshot.publishes_by_class["decode"]["rejected"], 1);
        assert_eq!(snapshot.publishes_by_class["default"]["rejected"], 1);
        assert_eq!(snapshot.publishes_rejected_nats_unavailable, 1);
        assert_eq!(snapshot.publishes_rejected_invalid, 1);
        assert_eq!(snapshot.publish_rejections["unknown_class"], 1);
    }

    #[test]
    fn codes_this_build_does_not_know_are_still_counted() {
        let counters = CodeCounters::default();
        counters.bump(ErrorCode::Unknown(999));
        counters.bump(ErrorCode::BadFrame);
        assert_eq!(counters.total(), 2);
        assert_eq!(counters.by_name()["unknown"], 1);
        assert_eq!(counters.by_name()["bad_frame"], 1);
    }
}
