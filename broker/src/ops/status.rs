//! The status document: the relay's view, for `holdfast status`.
//!
//! Its shape is documented in wire/PROTOCOL.md; clients parse
//! it as JSON, so fields are only ever added, never renamed.

use crate::context::RelayContext;
use crate::messaging::kv_check_view::KvCheckStatus;
use crate::ops::stats::StatsSnapshot;
use holdfast_wire::LinkStatus;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

#[derive(Debug, Serialize)]
pub struct StatusDocument {
    pub relay_id: String,
    pub version: &'static str,
    pub protocol_version: u16,
    pub uptime_seconds: u64,
    pub socket: String,
    /// The QUIC listener's bound address, absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<String>,
    /// Whether QUIC clients must present a certificate (mutual TLS).
    pub mutual_tls: bool,
    /// The NATS client-protocol front end's bound address, absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_listen: Option<String>,
    pub nats: NatsStatus,
    pub etcd: EtcdStatus,
    pub sessions: u64,
    pub subscriptions: SubscriptionStatus,
    /// Per class, in drain order.
    pub classes: Vec<ClassStatus>,
    pub journal: JournalStatus,
    /// The check of Dynamo KV event streams (docs/guarantees.md).
    pub kv_consistency: KvCheckStatus,
    pub counters: StatsSnapshot,
    /// The planner guard per namespace; absent when `guard.enabled` is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<Vec<crate::guard::view::GuardView>>,
}

#[derive(Debug, Serialize)]
pub struct ClassStatus {
    pub name: String,
    pub priority: u32,
    /// "durable" or "spill".
    pub durability: &'static str,
    /// "live" (nothing waiting), "backlogged" (waiting for NATS) or
    /// "replaying" (NATS is up and the backlog drains).
    pub state: &'static str,
    pub backlog_messages: u64,
    pub backlog_bytes: u64,
    pub oldest_age_seconds: u64,
    pub replayed: u64,
    pub expired: u64,
    pub dropped_oldest: u64,
}

#[derive(Debug, Serialize)]
pub struct JournalStatus {
    pub path: String,
    pub file_bytes: u64,
    pub quarantined_at_start: bool,
    /// Why the journal refuses new messages (`low_space`, `disk_full`,
    /// `storage_error`); `null` while it takes them.
    pub refusing: Option<&'static str>,
    /// The error behind the refusal, when there is one.
    pub last_error: Option<String>,
    /// Free space of its filesystem at the last reading, and the reserve.
    pub free_bytes: Option<u64>,
    pub reserve_bytes: u64,
    pub reopens: u64,
    /// Damaged rows skipped since start, and the messages they held.
    pub corrupt_rows: u64,
    pub corrupt_messages: u64,
}

#[derive(Debug, Serialize)]
pub struct NatsStatus {
    /// "up", "down" or "unknown".
    pub status: &'static str,
    /// The server currently connected to, if any.
    pub server: Option<String>,
    /// The configured seeds (any credentials in them shown as `***`).
    pub servers: Vec<String>,
    /// The seeds and the servers the cluster announced, as `host:port`.
    pub known_servers: Vec<String>,
    /// How many known servers accepted a connection at the last check
    /// (every 5 s); absent before the first.
    pub reachable_servers: Option<usize>,
    /// "tls" or "plaintext".
    pub transport: &'static str,
    /// "none", "creds", "nkey", "user_password" or "token".
    pub auth: &'static str,
    /// Why the last connect failed, while the link is down.
    pub last_error: Option<String>,
    /// The upstream subscriptions' own connection.
    pub subscriptions_connection: SubscriptionsConnectionStatus,
    /// Seconds since the status last changed.
    pub since_seconds: u64,
    pub outages: u64,
}

#[derive(Debug, Serialize)]
pub struct SubscriptionsConnectionStatus {
    /// `host:port` while connected.
    pub server: Option<String>,
    /// Why it last failed or ended.
    pub last_error: Option<String>,
    pub reconnects: u64,
    /// Connections lost plus publish batches handed over while there was
    /// none: each time, everything NATS had not yet confirmed went again
    /// (at-least-once copies).
    pub losses: u64,
    /// Messages skipped because they could not be decoded.
    pub malformed_messages: u64,
}

#[derive(Debug, Serialize)]
pub struct EtcdMemberStatus {
    pub endpoint: String,
    /// "serving", "not_serving", "unreachable" or "unknown".
    pub health: &'static str,
    /// Why its last probe failed.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EtcdStatus {
    /// "up", "down" or "unknown" ("unknown" also when not configured).
    pub status: &'static str,
    pub configured: bool,
    pub endpoints: Vec<String>,
    /// The member calls go to now.
    pub endpoint: Option<String>,
    /// How many members served or accepted a connection when last probed.
    pub reachable_endpoints: usize,
    /// Every member's health as of its last probe.
    pub members: Vec<EtcdMemberStatus>,
    /// "tls" or "plaintext".
    pub transport: &'static str,
    /// "none", "client_certificate" or "user_password".
    pub auth: &'static str,
    /// Times calls moved to another member while the link stayed up.
    pub member_switches: u64,
    /// Seconds since the status last changed.
    pub since_seconds: u64,
    pub outages: u64,
    pub reconnect_attempts: u64,
    /// Keys registered by live sessions.
    pub registrations: u64,
    /// Registration changes etcd has not confirmed yet.
    pub pending_changes: u64,
    pub reconcile_runs: u64,
    pub reconcile_repairs: u64,
    pub cached_prefixes: u64,
    pub cached_entries: u64,
    pub watchers: u64,
    /// Age of the stalest cached prefix etcd does not confirm right now.
    pub max_staleness_ms: u64,
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
pub async fn document(ctx: &RelayContext) -> StatusDocument {
    let link = ctx.nats.snapshot();
    let nats_servers = ctx.nats.servers_view();
    let (nats_transport, nats_auth) = ctx.nats.security();
    let router = ctx.router.stats().await;
    let view = ctx.forwarder.view();
    let now_ms = crate::util::wall_clock::unix_millis();
    let read =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    let classes = view
        .classes
        .specs()
        .iter()
        .zip(&view.gauges)
        .map(|(spec, gauges)| {
            let backlog_messages = read(&gauges.backlog_messages);
            let oldest = read(&gauges.oldest_accepted_ms);
            ClassStatus {
                name: spec.name.clone(),
                priority: spec.priority,
                durability: match spec.durability {
                    crate::messaging::classes::Durability::Durable => "durable",
                    crate::messaging::classes::Durability::Spill => "spill",
                },
                state: match (backlog_messages, link.status) {
                    (0, _) => "live",
                    (_, LinkStatus::Up) => "replaying",
                    _ => "backlogged",
                },
                backlog_messages,
                backlog_bytes: read(&gauges.backlog_bytes),
                oldest_age_seconds: if oldest == 0 {
                    0
                } else {
                    now_ms.saturating_sub(oldest) / 1000
                },
                replayed: read(&gauges.replayed),
                expired: read(&gauges.expired),
                dropped_oldest: read(&gauges.dropped_oldest),
            }
        })
        .collect();
    let journal_path = view.journal.path();
    let health = view.journal.health();
    let journal_stats = view.journal.stats();
    let journal = JournalStatus {
        path: journal_path.display().to_string(),
        file_bytes: std::fs::metadata(journal_path)
            .map(|metadata| metadata.len())
            .unwrap_or_default(),
        quarantined_at_start: read(&ctx.stats.journal_quarantines) > 0,
        refusing: health.refusing.map(crate::journal::Refusal::name),
        last_error: health.last_error,
        free_bytes: health.free_bytes,
        reserve_bytes: health.reserve_bytes,
        reopens: health.reopens,
        corrupt_rows: journal_stats.corrupt_rows,
        corrupt_messages: journal_stats.corrupt_messages,
    };
    StatusDocument {
        relay_id: ctx.relay_id.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        protocol_version: holdfast_wire::PROTOCOL_VERSION,
        uptime_seconds: ctx.started_at.elapsed().as_secs(),
        socket: ctx.config.relay.socket.display().to_string(),
        quic: ctx.quic_address.map(|address| address.to_string()),
        mutual_tls: ctx.quic_address.is_some() && ctx.config.tls_files().client_ca.is_some(),
        nats_listen: ctx.nats_front_address.map(|address| address.to_string()),
        nats: NatsStatus {
            status: link_status_name(link.status),
            server: ctx.nats.connected_server(),
            servers: ctx
                .config
                .nats
                .servers
                .iter()
                .map(|server| crate::util::url_credentials::redact(server))
                .collect(),
            known_servers: nats_servers.known,
            reachable_servers: nats_servers.reachable,
            transport: nats_transport,
            auth: nats_auth,
            last_error: nats_servers
                .last_error
                .filter(|_| link.status != LinkStatus::Up),
            subscriptions_connection: {
                let state = ctx.nats.subscriber_state();
                SubscriptionsConnectionStatus {
                    server: state.server,
                    last_error: state.last_error,
                    reconnects: state.reconnects,
                    losses: state.losses,
                    malformed_messages: ctx.nats.malformed_upstream(),
                }
            },
            since_seconds: SystemTime::now()
                .duration_since(link.since)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or_default(),
            outages: link.outages,
        },
        etcd: etcd_status(ctx),
        sessions: ctx.stats.sessions_active(),
        subscriptions: SubscriptionStatus {
            local: router.local_subscriptions,
            upstream: router.upstream_subscriptions,
            pending_local_requests: router.pending_local_requests,
        },
        classes,
        journal,
        kv_consistency: view.kv_check.status(),
        counters: ctx.stats.snapshot(),
        guard: ctx.guard.as_ref().map(crate::guard::GuardHandle::views),
    }
}

fn etcd_status(ctx: &RelayContext) -> EtcdStatus {
    let read = |value: &AtomicU64| value.load(Ordering::Relaxed);
    let link = ctx.etcd.snapshot();
    let registry = &ctx.registry.stats;
    let discovery = &ctx.discovery.stats;
    let members = ctx.etcd.members();
    let security = ctx.etcd.security();
    EtcdStatus {
        status: link_status_name(link.status),
        configured: ctx.etcd.is_enabled(),
        endpoints: ctx.etcd.endpoints().to_vec(),
        endpoint: ctx.etcd.member_in_use(),
        reachable_endpoints: members
            .iter()
            .filter(|member| member.is_reachable())
            .count(),
        members: members
            .into_iter()
            .map(|member| EtcdMemberStatus {
                endpoint: member.endpoint,
                health: member.health,
                error: member.error,
            })
            .collect(),
        transport: security.transport(),
        auth: security.method(),
        member_switches: ctx.etcd.member_switches(),
        since_seconds: SystemTime::now()
            .duration_since(link.since)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or_default(),
        outages: link.outages,
        reconnect_attempts: ctx.etcd.reconnect_attempts(),
        registrations: read(&registry.registrations),
        pending_changes: read(&registry.pending_changes),
        reconcile_runs: read(&registry.reconcile_runs),
        reconcile_repairs: read(&registry.reconcile_repairs),
        cached_prefixes: read(&discovery.prefixes),
        cached_entries: read(&discovery.entries),
        watchers: read(&discovery.watchers),
        max_staleness_ms: read(&discovery.max_stale_ms),
    }
}
