//! Every Prometheus series the relay exports: name, type, labels and
//! meaning, in one table.
//!
//! The help text `/metrics` shows, the metrics table in
//! `docs/operations.md` and the test that every exported series is
//! documented all read this table, so they cannot drift apart. A leaf
//! module: code anywhere records a histogram by the names below without
//! depending on the exporter.

/// From a publish arriving to its ack being queued.
pub const PUBLISH_ACK_SECONDS: &str = "holdfast_publish_ack_seconds";
/// From a request arriving to its response being queued.
pub const REQUEST_DURATION_SECONDS: &str = "holdfast_request_duration_seconds";
/// From a batch of journal appends being submitted to its durable commit.
pub const JOURNAL_APPEND_SECONDS: &str = "holdfast_journal_append_seconds";
/// Duration of a registry reconcile pass.
pub const RECONCILE_SECONDS: &str = "holdfast_reconcile_duration_seconds";

/// A Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported series.
#[derive(Debug)]
pub struct Series {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    /// Markdown: the table's text, and (without backticks) the HELP line.
    pub meaning: &'static str,
}

/// Every series, in the order the documentation lists them.
pub const SERIES: &[Series] = &[
    Series {
        name: "holdfast_build_info",
        kind: Kind::Gauge,
        labels: &["version"],
        meaning: "always 1; the label says which build runs",
    },
    Series {
        name: "holdfast_uptime_seconds",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "seconds since the relay started",
    },
    Series {
        name: "holdfast_upstream_up",
        kind: Kind::Gauge,
        labels: &["service"],
        meaning: "1 while the link to `service` (`nats`, `etcd` when configured) is up, else 0",
    },
    Series {
        name: "holdfast_upstream_last_change_timestamp_seconds",
        kind: Kind::Gauge,
        labels: &["service"],
        meaning: "Unix time of the link's last state change",
    },
    Series {
        name: "holdfast_upstream_outages_total",
        kind: Kind::Counter,
        labels: &["service"],
        meaning: "times the link went down",
    },
    Series {
        name: "holdfast_upstream_current_outage_seconds",
        kind: Kind::Gauge,
        labels: &["service"],
        meaning: "length of the current outage; 0 while up",
    },
    Series {
        name: "holdfast_upstream_downtime_seconds",
        kind: Kind::Gauge,
        labels: &["service"],
        meaning: "total time down since start, current outage included",
    },
    Series {
        name: "holdfast_sessions",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "client connections open now",
    },
    Series {
        name: "holdfast_sessions_opened_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "client connections accepted",
    },
    Series {
        name: "holdfast_subscriptions",
        kind: Kind::Gauge,
        labels: &["kind"],
        meaning: "`local`: client subscriptions; `upstream`: distinct (subject, queue) subscriptions held with NATS",
    },
    Series {
        name: "holdfast_publishes_total",
        kind: Kind::Counter,
        labels: &["class", "outcome"],
        meaning: "publishes by class (`prefill`, `decode`, `kv_events`, `default`) and outcome (`forwarded`, `journaled`, `queued`, `rejected`)",
    },
    Series {
        name: "holdfast_publish_rejections_total",
        kind: Kind::Counter,
        labels: &["reason"],
        meaning: "rejected publishes by error code (`nats_unavailable`, `invalid_subject`, `unknown_class`, …)",
    },
    Series {
        name: "holdfast_messages_dropped_total",
        kind: Kind::Counter,
        labels: &["reason"],
        meaning: "messages the relay dropped, by reason: `slow_consumer` (a local subscriber's queue was full), `upstream_slow_consumer` (the relay's own NATS client dropped messages of an upstream subscription it did not read fast enough; a lower bound, logged at most every 10 s), `nats_refused` (a journaled message NATS turned out not to take, being larger than its `max_payload`: journaled before the relay first reached NATS; logged at most every 10 s), `drop_oldest` (journaled messages a class with `when_full = \"drop_oldest\"` removed to make room)",
    },
    Series {
        name: "holdfast_slow_consumer_disconnects_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "connections closed because their subscriber did not keep up, or because the client read none of its answers within `sessions.idle_timeout`",
    },
    Series {
        name: "holdfast_local_deliveries_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "messages delivered node-locally while NATS was down",
    },
    Series {
        name: "holdfast_messages_delivered_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "messages queued to local subscribers",
    },
    Series {
        name: "holdfast_frame_errors_total",
        kind: Kind::Counter,
        labels: &["code"],
        meaning: "connections closed for malformed input (`bad_frame`, `frame_too_large`)",
    },
    Series {
        name: "holdfast_requests_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "requests received",
    },
    Series {
        name: "holdfast_request_failures_total",
        kind: Kind::Counter,
        labels: &["code"],
        meaning: "failed requests by error code",
    },
    Series {
        name: "holdfast_requests_served_locally_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "requests answered on this relay while NATS was down",
    },
    Series {
        name: "holdfast_limit_rejections_total",
        kind: Kind::Counter,
        labels: &["limit"],
        meaning: "connections and operations refused by a limit: `connections`, `hello_timeout`, `idle_timeout`, `frame_size`, `subscriptions`, `watches` (`etcd.max_watches_per_session`, per connection or etcd front end watch stream), `inflight_requests`, `registrations`, `discovery_cache_bytes` (GETs and watches of a prefix whose entries do not fit `etcd.max_cached_bytes`), `cached_prefixes` (GETs and watches of a new prefix while every cached prefix is watched), `cached_prefixes_per_session` (watches refused because their connection's watches already hold `etcd.max_cached_prefixes_per_session` prefixes); `unread_answers`: times a connection's reading was paused because its client left `sessions.outbound_queue_frames` answers unread; and `read_budget`: times a connection waited for room in `sessions.read_budget_bytes` (or its QUIC connection's one frame) before reading a large frame",
    },
    Series {
        name: "holdfast_access_denied_total",
        kind: Kind::Counter,
        labels: &["operation"],
        meaning: "operations refused by the access rules: `publish`, `request`, `subscribe`, `register` (also puts, deletes and writing transactions through the etcd front end)",
    },
    Series {
        name: "holdfast_quic_connections",
        kind: Kind::Gauge,
        labels: &["state"],
        meaning: "QUIC connections open now: `state=\"serving\"` (a session on it said HELLO) or `state=\"without_session\"` (closed after `sessions.hello_timeout` if none ever did, or `sessions.idle_timeout` after its last session ended, whatever keepalives it sends; each close counted in `holdfast_limit_rejections_total` with `limit=\"hello_timeout\"` or `limit=\"idle_timeout\"`)",
    },
    Series {
        name: "holdfast_accept_failures_total",
        kind: Kind::Counter,
        labels: &["listener"],
        meaning: "times an accept loop paused because `accept` failed, mostly for want of file descriptors: `unix`, `nats_front`, `etcd_front`, `metrics` (the pause is 100 ms, doubling to 1 s while failures repeat)",
    },
    Series {
        name: "holdfast_quic_handshake_failures_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "QUIC connections that failed the TLS handshake (no or an untrusted client certificate, wrong ALPN, too slow)",
    },
    Series {
        name: PUBLISH_ACK_SECONDS,
        kind: Kind::Histogram,
        labels: &["class"],
        meaning: "from a publish arriving to its ack being queued (publishes that asked for an ack)",
    },
    Series {
        name: REQUEST_DURATION_SECONDS,
        kind: Kind::Histogram,
        labels: &[],
        meaning: "from a request arriving to its response being queued",
    },
    Series {
        name: "holdfast_journal_backlog_messages",
        kind: Kind::Gauge,
        labels: &["class"],
        meaning: "undelivered messages of the class, in memory and in the journal",
    },
    Series {
        name: "holdfast_journal_backlog_bytes",
        kind: Kind::Gauge,
        labels: &["class"],
        meaning: "their bytes (the larger of the in-memory and journaled amounts)",
    },
    Series {
        name: "holdfast_journal_oldest_age_seconds",
        kind: Kind::Gauge,
        labels: &["class"],
        meaning: "age of the oldest undelivered message; 0 when none",
    },
    Series {
        name: "holdfast_replay_messages_total",
        kind: Kind::Counter,
        labels: &["class"],
        meaning: "messages sent to NATS from a backlog",
    },
    Series {
        name: "holdfast_expired_messages_total",
        kind: Kind::Counter,
        labels: &["class"],
        meaning: "undelivered messages removed after `max_age`",
    },
    Series {
        name: JOURNAL_APPEND_SECONDS,
        kind: Kind::Histogram,
        labels: &[],
        meaning: "from a batch of journal appends (one socket read of publishes) being submitted to its durable commit",
    },
    Series {
        name: "holdfast_journal_commits_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "durable group commits",
    },
    Series {
        name: "holdfast_journal_appended_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "messages written to the journal",
    },
    Series {
        name: "holdfast_journal_confirmed_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "journaled messages removed after NATS confirmed them",
    },
    Series {
        name: "holdfast_journal_compactions_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "times a drained journal file was shrunk",
    },
    Series {
        name: "holdfast_journal_file_bytes",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "size of the journal file",
    },
    Series {
        name: "holdfast_journal_quarantines_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "journal files found unreadable at start and moved aside",
    },
    Series {
        name: "holdfast_journal_refusing",
        kind: Kind::Gauge,
        labels: &["reason"],
        meaning: "1 while the journal refuses new messages for `reason`, else 0: `low_space` (free space under `relay.journal_reserve_bytes`), `disk_full` (a commit found the disk full), `storage_error` (an I/O error closed the database; it is being reopened)",
    },
    Series {
        name: "holdfast_journal_free_bytes",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "free space of the journal's filesystem at the last reading (at most every 100 ms while commits come, else every second)",
    },
    Series {
        name: "holdfast_journal_reopens_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "times the journal database was closed and opened again after an I/O error",
    },
    Series {
        name: "holdfast_journal_corrupt_rows_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "damaged journal rows (checksum failed) found and skipped; each costs its own messages only",
    },
    Series {
        name: "holdfast_journal_corrupt_messages_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "messages held by those rows (lost; a validating subscriber sees the gap)",
    },
    Series {
        name: "holdfast_chain_evictions_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "sequence chains the relay forgot because more than 100,000 subjects were journaled since it started (least recently journaled first); that subject's next message starts a new chain at 1 (wire/PROTOCOL.md, \"Restarts\")",
    },
    Series {
        name: "holdfast_kv_consistency_resets_total",
        kind: Kind::Counter,
        labels: &["reason"],
        meaning: "\"cleared\" events the relay sent on a Dynamo worker's KV event subject so routers drop that worker's blocks: `reason=\"gap\"` (an `event_id` skipped: events were lost before NATS, e.g. by `drop_oldest`) or `reason=\"orphan\"` (a block stored under a parent never stored); docs/guarantees.md, \"KV-cache consistency\"",
    },
    Series {
        name: "holdfast_kv_events_checked_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "Dynamo KV event messages of the `kv_events` class the consistency check read as they went to NATS",
    },
    Series {
        name: "holdfast_kv_events_undecodable_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "messages of the `kv_events` class that were not Dynamo KV events; forwarded untouched, not checked",
    },
    Series {
        name: "holdfast_kv_events_duplicates_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "KV events sent again (at or below their stream's last `event_id`: resends after a lost connection or a restart); routers apply them harmlessly",
    },
    Series {
        name: "holdfast_kv_tracked_streams",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "(subject, worker, dp_rank) KV event streams the check follows (at most `kv_consistency.max_tracked_streams`)",
    },
    Series {
        name: "holdfast_kv_tracked_blocks",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "blocks the check follows across all streams (at most `kv_consistency.max_tracked_blocks`; about 40 bytes each at most)",
    },
    Series {
        name: "holdfast_kv_streams_untracked_total",
        kind: Kind::Counter,
        labels: &["reason"],
        meaning: "streams the check stopped following in full: `reason=\"block_limit\"` (over `max_tracked_blocks`; gaps are still found) or `reason=\"stream_limit\"` (the least recently seen, forgotten an eighth of the limit at a time for new ones)",
    },
    Series {
        name: "holdfast_upstream_servers",
        kind: Kind::Gauge,
        labels: &["service", "state"],
        meaning: "servers of `service`: `state=\"known\"` (configured, plus for NATS those the cluster announced) and `state=\"reachable\"` (accepting connections at the last check: every 5 s for NATS, every probe round for etcd)",
    },
    Series {
        name: "holdfast_etcd_member_switches_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "times the relay moved its etcd calls to another member because the one in use stopped serving; not an outage",
    },
    Series {
        name: "holdfast_etcd_reconnect_attempts_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "failed etcd connection attempts, each followed by a jittered delay capped at `etcd.reconnect_delay_max`",
    },
    Series {
        name: "holdfast_registrations",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "keys registered by live sessions (in etcd, or buffered while it is down)",
    },
    Series {
        name: "holdfast_registration_changes_pending",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "registration changes (puts, deletes) etcd has not confirmed yet: the buffer during an outage",
    },
    Series {
        name: "holdfast_registration_sessions",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "sessions holding registrations, each with its own lease",
    },
    Series {
        name: "holdfast_registration_acks_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        meaning: "answers to REGISTER/DEREGISTER: `applied`, `buffered`, `rejected`",
    },
    Series {
        name: "holdfast_registration_conflicts_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "changes refused because another live session or etcd front end lease holds the key: REGISTER and DEREGISTER answered `conflict`, and puts, deletes and transactions through the etcd front end answered `FailedPrecondition` (logged at most every 10 s)",
    },
    Series {
        name: "holdfast_leases_total",
        kind: Kind::Counter,
        labels: &["kind"],
        meaning: "`granted`, `revoked` (a session ended), `lost` (etcd dropped a lease the relay still needed: expired, or etcd came back empty)",
    },
    Series {
        name: "holdfast_reconcile_runs_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "completed reconcile passes (when etcd returns, and every `etcd.reconcile_interval`)",
    },
    Series {
        name: "holdfast_reconcile_repairs_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "leases and keys a pass found different in etcd and rewrote",
    },
    Series {
        name: RECONCILE_SECONDS,
        kind: Kind::Histogram,
        labels: &[],
        meaning: "duration of a reconcile pass",
    },
    Series {
        name: "holdfast_discovery_cache_prefixes",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "cached prefixes, each with one upstream etcd watch",
    },
    Series {
        name: "holdfast_discovery_cache_entries",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "keys held in the cache",
    },
    Series {
        name: "holdfast_discovery_cache_bytes",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "bytes of keys and values held in the cache, at most `etcd.max_cached_bytes`",
    },
    Series {
        name: "holdfast_discovery_watchers",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "client watches served from the cache",
    },
    Series {
        name: "holdfast_discovery_staleness_seconds",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "age of the stalest cached prefix etcd does not confirm right now; 0 while all are fresh",
    },
    Series {
        name: "holdfast_discovery_gets_total",
        kind: Kind::Counter,
        labels: &["result"],
        meaning: "GETs: `hit` (from the cache), `miss` (not cached yet, or refused), `linearizable` (sent to etcd)",
    },
    Series {
        name: "holdfast_discovery_relists_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "times a cached prefix was listed again because etcd compacted the history its watch needed or came back reset",
    },
    Series {
        name: "holdfast_etcd_front_requests_total",
        kind: Kind::Counter,
        labels: &["rpc", "outcome"],
        meaning: "etcd front end requests by RPC (`range`, `put`, `delete_range`, `txn`, `lease_grant`, `lease_keep_alive`, `watch_create`, …; `other` for unserved services) and outcome (`ok` or the gRPC status: `unavailable`, `not_found`, `resource_exhausted`, `unimplemented`, …)",
    },
    Series {
        name: "holdfast_etcd_front_connections",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "TCP connections open on the etcd front end, each holding a `sessions.max_connections` slot",
    },
    Series {
        name: "holdfast_etcd_front_leases",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "relay leases held for etcd clients (`--etcd-listen`)",
    },
    Series {
        name: "holdfast_etcd_front_lease_keys",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "keys attached to those leases (registered in etcd, or buffered while it is down)",
    },
    Series {
        name: "holdfast_etcd_front_leases_ended_total",
        kind: Kind::Counter,
        labels: &["reason"],
        meaning: "relay leases ended: `expired` (no keepalive within the TTL; keys deleted upstream at once), `revoked`, or `connection_lost` (the keepalive stream that last renewed it broke)",
    },
    Series {
        name: "holdfast_etcd_front_watches",
        kind: Kind::Gauge,
        labels: &[],
        meaning: "etcd watches open on the front end, served from the discovery cache",
    },
    Series {
        name: "holdfast_etcd_front_watch_events_dropped_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "watch events dropped for an etcd watcher that fell behind (its watches are canceled with a reason, so it watches again)",
    },
    Series {
        name: "holdfast_etcd_front_save_failures_total",
        kind: Kind::Counter,
        labels: &[],
        meaning: "failed writes of the front end's lease table to the data dir",
    },
    Series {
        name: "holdfast_guard_rollbacks_total",
        kind: Kind::Counter,
        labels: &["namespace"],
        meaning: "planner decisions the guard rolled back (written to etcd; `enforce` mode)",
    },
    Series {
        name: "holdfast_guard_advice_total",
        kind: Kind::Counter,
        labels: &["namespace"],
        meaning: "would-be rollbacks published on `holdfast.guard.advice.{namespace}` (`advise` mode)",
    },
    Series {
        name: "holdfast_guard_breaches_total",
        kind: Kind::Counter,
        labels: &["namespace", "reason"],
        meaning: "intervals whose fleet load was over a guard threshold (`kv_usage`, `prefill_queue`), on every relay guarding the namespace",
    },
    Series {
        name: "holdfast_guard_reissues_total",
        kind: Kind::Counter,
        labels: &["namespace"],
        meaning: "planner decisions the guard wrote again under a new id because the deployment had already acknowledged their id (Dynamo's planner reuses ids after a rollback)",
    },
    Series {
        name: "holdfast_guard_load_reports_total",
        kind: Kind::Counter,
        labels: &["namespace", "outcome"],
        meaning: "load reports the guard received: `used`, `ignored` (a topic or report it does not use), `undecodable` (skipped, logged), `too_many_workers` (over `guard.max_workers`, dropped)",
    },
    Series {
        name: "holdfast_guard_leader",
        kind: Kind::Gauge,
        labels: &["namespace"],
        meaning: "1 while this relay holds the namespace's guard election (and reaches etcd), else 0",
    },
];

/// Registers every series' help text with the installed recorder.
pub fn describe_all() {
    for series in SERIES {
        let help = series.meaning.replace('`', "");
        match series.kind {
            Kind::Counter => metrics::describe_counter!(series.name, help),
            Kind::Gauge => metrics::describe_gauge!(series.name, help),
            Kind::Histogram => metrics::describe_histogram!(series.name, help),
        }
    }
}

/// The metrics table of `docs/operations.md`.
pub fn markdown_table() -> String {
    let mut table = String::from("| series | type | meaning |\n| ------ | ---- | ------- |\n");
    for series in SERIES {
        let labels = if series.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", series.labels.join(","))
        };
        table.push_str(&format!(
            "| `{}{labels}` | {} | {} |\n",
            series.name,
            series.kind.name(),
            series.meaning
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const OPERATIONS_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md");
    const TABLE_START: &str =
        "<!-- metrics table: generated from broker/src/ops/metric_catalog.rs -->\n";
    const TABLE_END: &str = "<!-- end of metrics table -->";

    #[test]
    fn names_are_unique_prometheus_names_with_the_suffix_their_type_needs() {
        let mut seen = BTreeSet::new();
        for series in SERIES {
            assert!(seen.insert(series.name), "{} listed twice", series.name);
            assert!(series.name.starts_with("holdfast_"), "{}", series.name);
            assert!(
                series
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                series.name
            );
            assert_eq!(
                series.kind == Kind::Counter,
                series.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                series.name
            );
            assert!(
                !series.meaning.contains('|'),
                "{} breaks the table",
                series.name
            );
            assert!(
                !series.meaning.contains('\n'),
                "{} breaks the table",
                series.name
            );
        }
    }

    /// `HOLDFAST_WRITE_DOCS=1 cargo test -p holdfast-broker metrics_table`
    /// rewrites the table after a change here.
    #[test]
    fn the_operations_guide_shows_this_metrics_table() {
        let doc = std::fs::read_to_string(OPERATIONS_DOC).unwrap();
        let start = doc
            .find(TABLE_START)
            .expect("docs/operations.md lost its table start marker")
            + TABLE_START.len();
        let end = doc
            .find(TABLE_END)
            .expect("docs/operations.md lost its table end marker");
        let table = markdown_table();
        if std::env::var_os("HOLDFAST_WRITE_DOCS").is_some() {
            let updated = format!("{}{table}{}", &doc[..start], &doc[end..]);
            std::fs::write(OPERATIONS_DOC, updated).unwrap();
            return;
        }
        assert!(
            doc[start..end] == table,
            "docs/operations.md's metrics table differs from metric_catalog.rs; run HOLDFAST_WRITE_DOCS=1 cargo test -p holdfast-broker metrics_table"
        );
    }
}
