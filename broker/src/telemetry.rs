//! Prometheus metrics: names, help texts, and the copy from the relay's
//! counters at scrape time.
//!
//! Counters live in [`RelayStats`] (one atomic add per event on the hot
//! path); a scrape copies them into the `metrics` recorder and renders the
//! exposition text. Histograms are recorded where the latency happens. The
//! README's metrics table lists every series below; keep the two in step.

use crate::router::RouterStats;
use crate::session::SessionContext;
use crate::stats::{read, PublishOutcome};
use holdfast_wire::{ErrorCode, LinkStatus};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use std::time::{SystemTime, UNIX_EPOCH};

/// Latency buckets in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// How often histogram samples are folded into buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

pub const PUBLISH_ACK_SECONDS: &str = "holdfast_publish_ack_seconds";
pub const REQUEST_DURATION_SECONDS: &str = "holdfast_request_duration_seconds";
pub const JOURNAL_APPEND_SECONDS: &str = "holdfast_journal_append_seconds";

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
        describe();
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
    pub fn render(&self, ctx: &SessionContext, router: RouterStats) -> String {
        copy_counters(ctx, router);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

fn describe() {
    describe_gauge!(
        "holdfast_build_info",
        "Always 1; the version label says which build runs."
    );
    describe_gauge!(
        "holdfast_uptime_seconds",
        Unit::Seconds,
        "Seconds since the relay started."
    );
    describe_gauge!(
        "holdfast_upstream_up",
        "1 while the link to the upstream service is up, else 0."
    );
    describe_gauge!(
        "holdfast_upstream_last_change_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the link's last state change."
    );
    describe_counter!(
        "holdfast_upstream_outages_total",
        "Times the link went down."
    );
    describe_gauge!(
        "holdfast_upstream_current_outage_seconds",
        Unit::Seconds,
        "Length of the current outage; 0 while the link is up."
    );
    describe_gauge!(
        "holdfast_upstream_downtime_seconds",
        Unit::Seconds,
        "Total time the link has been down since the relay started."
    );
    describe_gauge!("holdfast_sessions", "Client connections open now.");
    describe_counter!(
        "holdfast_sessions_opened_total",
        "Client connections accepted."
    );
    describe_gauge!(
        "holdfast_subscriptions",
        "Subscriptions: kind=local counts client subscriptions, kind=upstream the distinct ones held with NATS."
    );
    describe_counter!(
        "holdfast_publishes_total",
        "Publishes by class and outcome."
    );
    describe_counter!(
        "holdfast_publish_rejections_total",
        "Rejected publishes by reason (error code)."
    );
    describe_counter!(
        "holdfast_messages_dropped_total",
        "Messages dropped by the relay, by reason."
    );
    describe_counter!(
        "holdfast_slow_consumer_disconnects_total",
        "Connections closed because their subscriber did not keep up."
    );
    describe_counter!(
        "holdfast_local_deliveries_total",
        "Messages delivered node-locally while NATS was down."
    );
    describe_counter!(
        "holdfast_messages_delivered_total",
        "Messages queued to local subscribers (from NATS or node-local)."
    );
    describe_counter!(
        "holdfast_frame_errors_total",
        "Connections closed for malformed input, by error code."
    );
    describe_counter!("holdfast_requests_total", "Requests received from clients.");
    describe_counter!(
        "holdfast_request_failures_total",
        "Failed requests by error code."
    );
    describe_counter!(
        "holdfast_requests_served_locally_total",
        "Requests answered by subscribers on this relay while NATS was down."
    );
    describe_counter!(
        "holdfast_limit_rejections_total",
        "Operations refused because a per-connection limit was reached."
    );
    describe_histogram!(
        PUBLISH_ACK_SECONDS,
        Unit::Seconds,
        "From a publish arriving to its ack being queued, for publishes that asked for one."
    );
    describe_gauge!(
        "holdfast_journal_backlog_messages",
        "Undelivered messages per class (in memory and in the journal)."
    );
    describe_gauge!(
        "holdfast_journal_backlog_bytes",
        Unit::Bytes,
        "Bytes of undelivered messages per class (the larger of memory and journal)."
    );
    describe_gauge!(
        "holdfast_journal_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest undelivered message per class; 0 when none."
    );
    describe_counter!(
        "holdfast_replay_messages_total",
        "Messages sent to NATS from a backlog (queued or journaled), per class."
    );
    describe_counter!(
        "holdfast_expired_messages_total",
        "Undelivered messages removed after max_age, per class."
    );
    describe_counter!(
        "holdfast_journal_quarantines_total",
        "Journal files found unreadable at start and moved aside."
    );
    describe_counter!(
        "holdfast_journal_commits_total",
        "Durable group commits of the journal."
    );
    describe_counter!(
        "holdfast_journal_appended_total",
        "Messages written to the journal."
    );
    describe_counter!(
        "holdfast_journal_confirmed_total",
        "Journaled messages removed after NATS confirmed them."
    );
    describe_counter!(
        "holdfast_journal_compactions_total",
        "Times a drained journal file was shrunk."
    );
    describe_gauge!(
        "holdfast_journal_file_bytes",
        Unit::Bytes,
        "Size of the journal file on disk."
    );
    describe_histogram!(
        JOURNAL_APPEND_SECONDS,
        Unit::Seconds,
        "From a batch of journal appends being submitted to their durable commit."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "From a request arriving to its response being queued."
    );
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

fn gauges_for_class(name: &str, gauges: &crate::forwarder::ClassGauges, now_ms: f64) {
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

fn copy_counters(ctx: &SessionContext, router: RouterStats) {
    let stats = &ctx.stats;
    gauge!("holdfast_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!("holdfast_uptime_seconds").set(ctx.started_at.elapsed().as_secs_f64());

    let link = ctx.nats.snapshot();
    let up = if link.status == LinkStatus::Up {
        1.0
    } else {
        0.0
    };
    gauge!("holdfast_upstream_up", "service" => "nats").set(up);
    gauge!("holdfast_upstream_last_change_timestamp_seconds", "service" => "nats")
        .set(unix_seconds(link.since));
    counter!("holdfast_upstream_outages_total", "service" => "nats").absolute(link.outages);
    gauge!("holdfast_upstream_current_outage_seconds", "service" => "nats")
        .set(link.current_outage().as_secs_f64());
    gauge!("holdfast_upstream_downtime_seconds", "service" => "nats")
        .set(link.downtime().as_secs_f64());

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
    let journal = view.journal.stats();
    counter!("holdfast_journal_commits_total").absolute(journal.commits);
    counter!("holdfast_journal_appended_total").absolute(journal.appended);
    counter!("holdfast_journal_confirmed_total").absolute(journal.confirmed);
    counter!("holdfast_journal_compactions_total").absolute(journal.compactions);
    if let Ok(metadata) = std::fs::metadata(view.journal.path()) {
        gauge!("holdfast_journal_file_bytes").set(metadata.len() as f64);
    }
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
    counter!("holdfast_limit_rejections_total").absolute(read(&stats.limit_rejections));
}
