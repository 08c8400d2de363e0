//! What the connection task tells a subscriber or a watcher besides the
//! items on its channel: how many were dropped because the channel was
//! full, how many snapshots were re-requested, and why it ended.

use crate::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// What the connection task tells a subscriber besides its messages.
#[derive(Debug, Default)]
pub(crate) struct SubscriptionState {
    dropped: AtomicU64,
    termination: OnceLock<Error>,
}

impl SubscriptionState {
    /// Messages dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Why the subscription ended, once it has.
    pub(crate) fn termination(&self) -> Option<&Error> {
        self.termination.get()
    }

    /// Counts one message dropped because the subscriber's channel was full;
    /// returns the new total.
    pub(crate) fn count_dropped(&self) -> u64 {
        self.dropped.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records why the relay or client ended the subscription (first reason wins).
    pub(crate) fn terminate(&self, reason: Error) {
        let _ = self.termination.set(reason);
    }
}

/// What the connection task tells a watcher besides its events.
#[derive(Debug, Default)]
pub(crate) struct WatchState {
    dropped: AtomicU64,
    resyncs: AtomicU64,
    termination: OnceLock<Error>,
}

impl WatchState {
    /// Events dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Snapshots re-requested so far.
    pub(crate) fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Why the watch ended, once it has.
    pub(crate) fn termination(&self) -> Option<&Error> {
        self.termination.get()
    }

    /// Counts one event dropped because the watcher's channel was full;
    /// returns the new total.
    pub(crate) fn count_dropped(&self) -> u64 {
        self.dropped.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts one snapshot re-requested after dropped events; returns the new total.
    pub(crate) fn count_resync(&self) -> u64 {
        self.resyncs.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records why the relay or client ended the watch (first reason wins).
    pub(crate) fn terminate(&self, reason: Error) {
        let _ = self.termination.set(reason);
    }
}
