//! What the client reports about its link to the relay and the relay's links upstream.

use holdfast_wire::{ErrorCode, LinkStatus, Service};

/// A change in connectivity, delivered through
/// [`Client::link_events`](crate::Client::link_events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// A session with the relay started (first connect or reconnect);
    /// live registrations, watches, subscriptions and buffered publishes
    /// have been sent on it.
    RelayConnected { relay_id: String, session_id: u64 },
    /// The session with the relay ended; the client is reconnecting.
    RelayLost { reason: String },
    /// The relay's link to an upstream service (NATS or etcd) changed.
    /// Becomes [`LinkStatus::Unknown`] while the relay itself is unreachable.
    Upstream {
        service: Service,
        status: LinkStatus,
    },
    /// The relay reported an error that no pending operation was waiting
    /// for: typically a fire-and-forget publish it could not accept.
    RelayError { code: ErrorCode, message: String },
}
