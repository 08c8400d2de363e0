//! Relay-wide counters, shared by every session as relaxed atomics.
//!
//! Counting is one uncontended-in-practice atomic add per event, never a
//! lock; `/status` and `holdfast status` read a snapshot. (The Prometheus
//! exporter of the operations issue reads the same counters.)

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// The counters. Field names are the names shown in the status document.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub sessions_active: AtomicU64,
    pub sessions_total: AtomicU64,
    pub publishes_forwarded: AtomicU64,
    pub publishes_rejected_nats_unavailable: AtomicU64,
    pub publishes_rejected_invalid: AtomicU64,
    pub local_deliveries: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub slow_consumer_drops: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    pub frame_errors: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_served_locally: AtomicU64,
    pub limit_rejections: AtomicU64,
}

/// A point-in-time copy of [`RelayStats`].
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
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `amount` to a counter.
pub fn add(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::Relaxed);
}

impl RelayStats {
    pub fn sessions_active(&self) -> u64 {
        self.sessions_active.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            sessions_total: read(&self.sessions_total),
            publishes_forwarded: read(&self.publishes_forwarded),
            publishes_rejected_nats_unavailable: read(&self.publishes_rejected_nats_unavailable),
            publishes_rejected_invalid: read(&self.publishes_rejected_invalid),
            local_deliveries: read(&self.local_deliveries),
            messages_delivered: read(&self.messages_delivered),
            slow_consumer_drops: read(&self.slow_consumer_drops),
            slow_consumer_disconnects: read(&self.slow_consumer_disconnects),
            frame_errors: read(&self.frame_errors),
            requests_total: read(&self.requests_total),
            requests_failed: read(&self.requests_failed),
            requests_served_locally: read(&self.requests_served_locally),
            limit_rejections: read(&self.limit_rejections),
        }
    }
}
