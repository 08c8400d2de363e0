//! The status document: the relay's view, for `holdfast status`.
//!
//! Its shape is documented in the README ("holdfast status"); clients parse
//! it as JSON, so fields are only ever added, never renamed.

use crate::session::SessionContext;
use crate::stats::StatsSnapshot;
use holdfast_wire::LinkStatus;
use serde::Serialize;
use std::time::SystemTime;

#[derive(Debug, Serialize)]
pub struct StatusDocument {
    pub relay_id: String,
    pub version: &'static str,
    pub protocol_version: u16,
    pub uptime_seconds: u64,
    pub socket: String,
    pub nats: NatsStatus,
    pub sessions: u64,
    pub subscriptions: SubscriptionStatus,
    pub counters: StatsSnapshot,
}

#[derive(Debug, Serialize)]
pub struct NatsStatus {
    /// "up", "down" or "unknown".
    pub status: &'static str,
    /// The server currently connected to, if any.
    pub server: Option<String>,
    pub servers: Vec<String>,
    /// Seconds since the status last changed.
    pub since_seconds: u64,
    pub outages: u64,
}

#[derive(Debug, Serialize)]
pub struct SubscriptionStatus {
    pub local: usize,
    pub upstream: usize,
    pub pending_local_requests: usize,
}

pub fn link_status_name(status: LinkStatus) -> &'static str {
    match status {
        LinkStatus::Up => "up",
        LinkStatus::Down => "down",
        LinkStatus::Unknown => "unknown",
    }
}

/// Builds the document from the relay's live state.
pub async fn document(ctx: &SessionContext) -> StatusDocument {
    let link = ctx.nats.snapshot();
    let router = ctx.router.stats().await;
    StatusDocument {
        relay_id: ctx.relay_id.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        protocol_version: holdfast_wire::PROTOCOL_VERSION,
        uptime_seconds: ctx.started_at.elapsed().as_secs(),
        socket: ctx.config.relay.socket.display().to_string(),
        nats: NatsStatus {
            status: link_status_name(link.status),
            server: ctx.nats.connected_server(),
            servers: ctx.config.nats.servers.clone(),
            since_seconds: SystemTime::now()
                .duration_since(link.since)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or_default(),
            outages: link.outages,
        },
        sessions: ctx.stats.sessions_active(),
        subscriptions: SubscriptionStatus {
            local: router.local_subscriptions,
            upstream: router.upstream_subscriptions,
            pending_local_requests: router.pending_local_requests,
        },
        counters: ctx.stats.snapshot(),
    }
}
