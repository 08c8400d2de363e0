//! Prometheus metrics: the recorder, and the copy from the relay's
//! counters at scrape time.
//!
//! Counters live in [`RelayStats`] (one atomic add per event on the hot
//! path); a scrape copies them into the `metrics` recorder and renders the
//! exposition text. Histograms are recorded where the latency happens.
//! Names, types and help texts are in `metric_catalog`.

use crate::context::RelayContext;
use crate::front::access::Operation;
use crate::messaging::router::RouterStats;
use crate::ops::metric_catalog;
use crate::ops::stats::{read, Limit, PublishOutcome};
use crate::util::link_snapshot::LinkSnapshot;
use holdfast_wire::{ErrorCode, LinkStatus};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use std::time::{SystemTime, UNIX_EPOCH};

/// Latency buckets in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// How often histogram samples are folded into buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The installed Prometheus recorder.
#[derive(Clone)]
pub struct Telemetry {
    handle: PrometheusHandle,
}

impl Telemetry {
    /// Installs the process-wide recorder; call once, before sessions start.
    pub fn install() -> Result<Telemetry, BuildError> {
        let handle = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)?
            .install_recorder()?;
        metric_catalog::describe_all();
        Ok(Telemetry { handle })
    }

    /// Drains recorded histogram samples into their buckets every few
    /// seconds. Without it every sample stays in memory until the next
    /// scrape, and a relay nobody scrapes grows by each message it acks.
    pub fn spawn_upkeep(&self, stop: tokio_util::sync::CancellationToken) {
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => handle.run_upkeep(),
                }
            }
        });
    }

    /// The exposition text, with counters brought up to date.
    pub fn render(&self, ctx: &RelayContext, router: RouterStats) -> String {
        copy_counters(ctx, router);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

fn gauges_for_class(name: &str, gauges: &crate::messaging::forwarder::ClassGauges, now_ms: f64) {
    let class = name.to_string();
    gauge!("holdfast_journal_backlog_messages", "class" => class.clone())
        .set(read(&gauges.backlog_messages) as f64);
    gauge!("holdfast_journal_backlog_bytes", "class" => class.clone())
        .set(read(&gauges.backlog_bytes) as f64);
    let oldest = read(&gauges.oldest_accepted_ms);
    let age = if oldest == 0 {
        0.0
    } else {
        ((now_ms - oldest as f64) / 1000.0).max(0.0)
    };
    gauge!("holdfast_journal_oldest_age_seconds", "class" => class.clone()).set(age);
    counter!("holdfast_replay_messages_total", "class" => class.clone())
        .absolute(read(&gauges.replayed));
    counter!("holdfast_expired_messages_total", "class" => class).absolute(read(&gauges.expired));
}

fn link_gauges(service: &'static str, link: LinkSnapshot) {
    let up = if link.status == LinkStatus::Up {
        1.0
    } else {
        0.0
    };
    gauge!("holdfast_upstream_up", "service" => service).set(up);
    gauge!("holdfast_upstream_last_change_timestamp_seconds", "service" => service)
        .set(unix_seconds(link.since));
    counter!("holdfast_upstream_outages_total", "service" => service).absolute(link.outages);
    gauge!("holdfast_upstream_current_outage_seconds", "service" => service)
        .set(link.current_outage().as_secs_f64());
    gauge!("holdfast_upstream_downtime_seconds", "service" => service)
        .set(link.downtime().as_secs_f64());
}

fn copy_etcd_counters(ctx: &RelayContext) {
    counter!("holdfast_etcd_reconnect_attempts_total").absolute(ctx.etcd.reconnect_attempts());
    counter!("holdfast_etcd_member_switches_total").absolute(ctx.etcd.member_switches());
    let members = ctx.etcd.members();
    gauge!("holdfast_upstream_servers", "service" => "etcd", "state" => "known")
        .set(members.len() as f64);
    gauge!("holdfast_upstream_servers", "service" => "etcd", "state" => "reachable").set(
        members
            .iter()
            .filter(|member| member.is_reachable())
            .count() as f64,
    );
    let registry = &ctx.registry.stats;
    gauge!("holdfast_registrations").set(read(&registry.registrations) as f64);
    gauge!("holdfast_registration_changes_pending").set(read(&registry.pending_changes) as f64);
    gauge!("holdfast_registration_sessions").set(read(&registry.sessions) as f64);
    for (outcome, value) in [
        ("applied", &registry.acks_applied),
        ("buffered", &registry.acks_buffered),
        ("rejected", &registry.acks_rejected),
    ] {
        counter!("holdfast_registration_acks_total", "outcome" => outcome).absolute(read(value));
    }
    counter!("holdfast_limit_rejections_total", "limit" => "registrations")
        .absolute(read(&registry.limit_refusals));
    counter!("holdfast_registration_conflicts_total").absolute(read(&registry.conflicts));
    for (kind, value) in [
        ("granted", &registry.leases_granted),
        ("revoked", &registry.leases_revoked),
        ("lost", &registry.leases_lost),
    ] {
        counter!("holdfast_leases_total", "kind" => kind).absolute(read(value));
    }
    counter!("holdfast_reconcile_runs_total").absolute(read(&registry.reconcile_runs));
    counter!("holdfast_reconcile_repairs_total").absolute(read(&registry.reconcile_repairs));
    let discovery = &ctx.discovery.stats;
    gauge!("holdfast_discovery_cache_prefixes").set(read(&discovery.prefixes) as f64);
    gauge!("holdfast_discovery_cache_entries").set(read(&discovery.entries) as f64);
    gauge!("holdfast_discovery_cache_bytes").set(read(&discovery.bytes) as f64);
    counter!("holdfast_limit_rejections_total", "limit" => "discovery_cache_bytes")
        .absolute(read(&discovery.refused));
    counter!("holdfast_limit_rejections_total", "limit" => "cached_prefixes")
        .absolute(read(&discovery.slots_full));
    counter!("holdfast_limit_rejections_total", "limit" => "cached_prefixes_per_session")
        .absolute(read(&discovery.session_limit));
    gauge!("holdfast_discovery_watchers").set(read(&discovery.watchers) as f64);
    gauge!("holdfast_discovery_staleness_seconds")
        .set(read(&discovery.max_stale_ms) as f64 / 1000.0);
    for (result, value) in [
        ("hit", &discovery.hits),
        ("miss", &discovery.misses),
        ("linearizable", &discovery.linearizable_gets),
    ] {
        counter!("holdfast_discovery_gets_total", "result" => result).absolute(read(value));
    }
    counter!("holdfast_discovery_relists_total").absolute(read(&discovery.relists));
}

fn copy_counters(ctx: &RelayContext, router: RouterStats) {
    let stats = &ctx.stats;
    gauge!("holdfast_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!("holdfast_uptime_seconds").set(ctx.started_at.elapsed().as_secs_f64());

    link_gauges("nats", ctx.nats.snapshot());
    let nats_servers = ctx.nats.servers_view();
    gauge!("holdfast_upstream_servers", "service" => "nats", "state" => "known")
        .set(nats_servers.known.len() as f64);
    gauge!("holdfast_upstream_servers", "service" => "nats", "state" => "reachable")
        .set(nats_servers.reachable.unwrap_or(0) as f64);
    if ctx.etcd.is_enabled() {
        link_gauges("etcd", ctx.etcd.snapshot());
        copy_etcd_counters(ctx);
    }

    gauge!("holdfast_sessions").set(stats.sessions_active() as f64);
    counter!("holdfast_sessions_opened_total").absolute(read(&stats.sessions_total));
    gauge!("holdfast_subscriptions", "kind" => "local").set(router.local_subscriptions as f64);
    gauge!("holdfast_subscriptions", "kind" => "upstream")
        .set(router.upstream_subscriptions as f64);

    let view = ctx.forwarder.view();
    let now_ms = unix_seconds(SystemTime::now()) * 1000.0;
    for (class, name) in stats.class_names().iter().enumerate() {
        for outcome in PublishOutcome::ALL {
            counter!("holdfast_publishes_total", "class" => name.clone(), "outcome" => outcome.name())
                .absolute(stats.publishes(class, outcome));
        }
        let Some(gauges) = view.gauges.get(class) else {
            continue;
        };
        gauges_for_class(name, gauges, now_ms);
    }
    counter!("holdfast_journal_quarantines_total").absolute(read(&stats.journal_quarantines));
    counter!("holdfast_chain_evictions_total").absolute(read(&view.chain_evictions));
    let kv = view.kv_check.status();
    counter!("holdfast_kv_consistency_resets_total", "reason" => "gap").absolute(kv.resets_gap);
    counter!("holdfast_kv_consistency_resets_total", "reason" => "orphan")
        .absolute(kv.resets_orphan);
    counter!("holdfast_kv_events_checked_total").absolute(kv.checked);
    counter!("holdfast_kv_events_undecodable_total").absolute(kv.undecodable);
    counter!("holdfast_kv_events_duplicates_total").absolute(kv.duplicates);
    gauge!("holdfast_kv_tracked_streams").set(kv.tracked_streams as f64);
    gauge!("holdfast_kv_tracked_blocks").set(kv.tracked_blocks as f64);
    counter!("holdfast_kv_streams_untracked_total", "reason" => "block_limit")
        .absolute(kv.over_block_limit);
    counter!("holdfast_kv_streams_untracked_total", "reason" => "stream_limit")
        .absolute(kv.forgotten);
    let journal = view.journal.stats();
    counter!("holdfast_journal_commits_total").absolute(journal.commits);
    counter!("holdfast_journal_appended_total").absolute(journal.appended);
    counter!("holdfast_journal_confirmed_total").absolute(journal.confirmed);
    counter!("holdfast_journal_compactions_total").absolute(journal.compactions);
    if let Ok(metadata) = std::fs::metadata(view.journal.path()) {
        gauge!("holdfast_journal_file_bytes").set(metadata.len() as f64);
    }
    counter!("holdfast_journal_corrupt_rows_total").absolute(journal.corrupt_rows);
    counter!("holdfast_journal_corrupt_messages_total").absolute(journal.corrupt_messages);
    let health = view.journal.health();
    for refusal in crate::journal::Refusal::ALL {
        let refusing = health.refusing == Some(refusal);
        gauge!("holdfast_journal_refusing", "reason" => refusal.name()).set(if refusing {
            1.0
        } else {
            0.0
        });
    }
    if let Some(free) = health.free_bytes {
        gauge!("holdfast_journal_free_bytes").set(free as f64);
    }
    counter!("holdfast_journal_reopens_total").absolute(health.reopens);
    let dropped_oldest: u64 = view
        .gauges
        .iter()
        .map(|gauges| read(&gauges.dropped_oldest))
        .sum();
    counter!("holdfast_messages_dropped_total", "reason" => "drop_oldest").absolute(dropped_oldest);
    // Always show the outage reason so dashboards have a series before the
    // first outage; other reasons appear once they happen.
    counter!("holdfast_publish_rejections_total", "reason" => ErrorCode::NatsUnavailable.name())
        .absolute(stats.publish_rejections.get(ErrorCode::NatsUnavailable));
    for (reason, value) in stats.publish_rejections.by_name() {
        counter!("holdfast_publish_rejections_total", "reason" => reason).absolute(value);
    }
    counter!("holdfast_messages_dropped_total", "reason" => "slow_consumer")
        .absolute(read(&stats.slow_consumer_drops));
    counter!("holdfast_messages_dropped_total", "reason" => "upstream_slow_consumer")
        .absolute(ctx.nats.upstream_drops());
    counter!("holdfast_messages_dropped_total", "reason" => "malformed_upstream")
        .absolute(ctx.nats.malformed_upstream());
    counter!("holdfast_messages_dropped_total", "reason" => "nats_refused")
        .absolute(read(&stats.nats_refused_drops));
    counter!("holdfast_slow_consumer_disconnects_total")
        .absolute(read(&stats.slow_consumer_disconnects));
    counter!("holdfast_local_deliveries_total").absolute(read(&stats.local_deliveries));
    counter!("holdfast_messages_delivered_total").absolute(read(&stats.messages_delivered));
    for code in [ErrorCode::BadFrame, ErrorCode::FrameTooLarge] {
        counter!("holdfast_frame_errors_total", "code" => code.name())
            .absolute(stats.frame_errors.get(code));
    }
    for (code, value) in stats.frame_errors.by_name() {
        counter!("holdfast_frame_errors_total", "code" => code).absolute(value);
    }
    counter!("holdfast_requests_total").absolute(read(&stats.requests_total));
    for (code, value) in stats.request_failures.by_name() {
        counter!("holdfast_request_failures_total", "code" => code).absolute(value);
    }
    counter!("holdfast_requests_served_locally_total")
        .absolute(read(&stats.requests_served_locally));
    for limit in Limit::ALL {
        counter!("holdfast_limit_rejections_total", "limit" => limit.name())
            .absolute(stats.limit_rejections(limit));
    }
    for operation in Operation::ALL {
        counter!("holdfast_access_denied_total", "operation" => operation.name())
            .absolute(stats.access_denials(operation));
    }
    counter!("holdfast_quic_handshake_failures_total")
        .absolute(read(&stats.quic_handshake_failures));
    gauge!("holdfast_quic_connections", "state" => "serving").set(
        read(&stats.quic_connections).saturating_sub(read(&stats.quic_connections_without_session))
            as f64,
    );
    gauge!("holdfast_quic_connections", "state" => "without_session")
        .set(read(&stats.quic_connections_without_session) as f64);
}
