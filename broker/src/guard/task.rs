//! The shell around one namespace's [`NamespaceGuard`]: one task that owns
//! it and feeds it etcd's planner keys (a prefix watch, re-read at one
//! revision on every change), the load reports from NATS, the election and
//! the clock; it carries out the actions (etcd writes, advice) and keeps
//! the namespace's status view current.

use crate::config::{GuardConfig, GuardMode};
use crate::guard::core::{
    Action, ClosedInterval, GuardSettings, NamespaceGuard, Outcome, Rollback,
};
use crate::guard::election::Candidate;
use crate::guard::load;
use crate::guard::planner_store::{self, Marker, PlannerKeys};
use crate::guard::view::{ActionRecord, GuardView};
use crate::keys::etcd::link::EtcdLink;
use crate::messaging::nats::link::NatsLink;
use crate::messaging::nats::subscriber::UpstreamMessage;
use crate::util::drop_log::DropLog;
use etcd_client::{Client, WatchOptions, WatchStream};
use holdfast_wire::Text;
use metrics::{counter, gauge};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A bound on each etcd call the task makes.
const CALL_LIMIT: Duration = Duration::from_secs(2);

/// An etcd connection in use: the client and the planner prefix's watch.
struct Session {
    client: Client,
    watch: WatchStream,
}

pub struct NamespaceTask {
    pub namespace: String,
    pub config: GuardConfig,
    pub relay_id: String,
    pub nats: NatsLink,
    pub etcd: EtcdLink,
    pub view: Arc<Mutex<GuardView>>,
}

impl NamespaceTask {
    pub async fn run(self, stop: CancellationToken) {
        let namespace = self.namespace.clone();
        let keys = PlannerKeys::new(&namespace);
        let mut core = NamespaceGuard::new(GuardSettings {
            interval: self.config.interval,
            kv_usage_threshold: self.config.kv_usage_threshold,
            prefill_queue_threshold: self.config.prefill_queue_threshold,
            consecutive: self.config.consecutive,
            max_sources: self.config.max_workers,
            report_ttl: self.config.report_ttl,
        });
        let mut candidate = Candidate::new(
            keys.leader.clone(),
            self.relay_id.clone(),
            self.config.lease_ttl,
        );
        let subscribe = |subject: String| self.nats.subscribe(Text::from(subject.as_str()), None);
        let (Ok(mut generic), Ok(mut dynamo_kv), Ok(mut dynamo_fpm)) = (
            subscribe(format!("holdfast.guard.load.{namespace}")).await,
            subscribe(format!(
                "namespace.{namespace}.component.*.endpoint.*.{}",
                load::KV_METRICS_TOPIC
            ))
            .await,
            subscribe(format!(
                "namespace.{namespace}.component.*.endpoint.*.{}",
                load::FORWARD_PASS_TOPIC
            ))
            .await,
        ) else {
            warn!(
                namespace,
                "planner guard: cannot subscribe to load reports; stopping"
            );
            return;
        };
        let mut etcd_state = self.etcd.watch();
        let mut session: Option<Session> = None;
        let mut election = tokio::time::interval(candidate.period());
        election.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut undecodable = DropLog::default();
        let mut shell = Shell {
            task: &self,
            keys: &keys,
            namespace: &namespace,
        };
        info!(namespace, mode = ?self.config.mode, interval = ?self.config.interval, "planner guard started");
        loop {
            let deadline = core
                .next_deadline()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = etcd_state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if !self.etcd.is_up() && session.is_some() {
                        warn!(namespace, "planner guard: etcd unreachable, acting on nothing until it returns");
                        session = None;
                        candidate.lost_etcd();
                    }
                }
                _ = election.tick() => {
                    let now = Instant::now();
                    if session.is_none() && self.etcd.is_up() {
                        session = shell.connect(&mut core, now).await;
                    }
                    if let Some(active) = &mut session {
                        if let Err(error) = candidate.round(&mut active.client, now).await {
                            warn!(namespace, %error, "planner guard: election round failed");
                            self.etcd.call_failed();
                            session = None;
                        }
                    }
                }
                event = next_watch_event(&mut session) => {
                    let now = Instant::now();
                    let alive = match (event, &mut session) {
                        (Ok(Some(_)), Some(active)) => {
                            shell.reread(&mut core, &mut active.client, now, false).await
                        }
                        _ => false,
                    };
                    if !alive {
                        debug!(namespace, "planner guard: watch ended; reconnecting");
                        self.etcd.call_failed();
                        session = None;
                        candidate.lost_etcd();
                    }
                }
                Some(message) = generic.next() => {
                    shell.on_report(&mut core, &message, true, &mut undecodable);
                }
                Some(message) = dynamo_kv.next() => {
                    shell.on_report(&mut core, &message, false, &mut undecodable);
                }
                Some(message) = dynamo_fpm.next() => {
                    shell.on_report(&mut core, &message, false, &mut undecodable);
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let now = Instant::now();
            let term = if session.is_some() {
                candidate.term(now)
            } else {
                None
            };
            core.set_leader(term.is_some());
            let poll = core.poll(now);
            for closed in &poll.closed {
                shell.count_interval(closed);
            }
            if let Some(action) = poll.action {
                let outcome = shell.act(&action, session.as_mut(), term).await;
                core.finished(Instant::now(), outcome);
            }
            shell.refresh(&core, &candidate, session.is_some());
        }
        if let Some(mut active) = session {
            candidate.resign(&mut active.client).await;
        }
        drop((generic, dynamo_kv, dynamo_fpm));
        gauge!("holdfast_guard_leader", "namespace" => namespace.clone()).set(0.0);
        info!(namespace, "planner guard stopped");
    }
}

async fn next_watch_event(
    session: &mut Option<Session>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match session {
        Some(active) => active.watch.message().await,
        None => std::future::pending().await,
    }
}

struct Shell<'a> {
    task: &'a NamespaceTask,
    keys: &'a PlannerKeys,
    namespace: &'a str,
}

impl Shell<'_> {
    /// Opens the watch, then reads the state it starts from.
    async fn connect(&mut self, core: &mut NamespaceGuard, now: Instant) -> Option<Session> {
        let mut client = self.task.etcd.client()?;
        let watch = tokio::time::timeout(
            CALL_LIMIT,
            client.watch(
                self.keys.prefix.as_str(),
                Some(WatchOptions::new().with_prefix()),
            ),
        )
        .await;
        let watch = match watch {
            Ok(Ok(watch)) => watch,
            Ok(Err(error)) => {
                warn!(namespace = self.namespace, %error, "planner guard: cannot watch the planner's keys");
                return None;
            }
            Err(_) => return None,
        };
        core.forget_awaited();
        if !self.reread(core, &mut client, now, true).await {
            return None;
        }
        info!(
            namespace = self.namespace,
            "planner guard: watching the planner's decisions in etcd"
        );
        Some(Session { client, watch })
    }

    /// Reads the planner's keys (and, from etcd's history, the counts
    /// before the decision) and hands them to the core; false when etcd
    /// did not answer.
    async fn reread(
        &mut self,
        core: &mut NamespaceGuard,
        client: &mut Client,
        now: Instant,
        first: bool,
    ) -> bool {
        let read =
            tokio::time::timeout(CALL_LIMIT, planner_store::read(client, self.keys, true)).await;
        match read {
            Ok(Ok(read)) => {
                if let Some(decision) = read.state.decision {
                    debug!(namespace = self.namespace, revision = read.revision, id = decision.id, prefill = decision.counts.prefill, decode = decision.counts.decode, origin = ?decision.origin, "planner guard: decision read");
                }
                if let Ok(mut view) = self.task.view.lock() {
                    if let Some(marker) = &read.marker {
                        view.last_guard_write = serde_json::to_value(marker).ok();
                    }
                }
                core.observe(now, read.state, first);
                true
            }
            Ok(Err(error)) => {
                warn!(namespace = self.namespace, %error, "planner guard: cannot read the planner's keys");
                false
            }
            Err(_) => false,
        }
    }

    fn on_report(
        &mut self,
        core: &mut NamespaceGuard,
        message: &UpstreamMessage,
        generic: bool,
        undecodable: &mut DropLog,
    ) {
        let namespace = self.namespace.to_string();
        let decoded = if generic {
            load::decode_generic(self.namespace, &message.payload).map(Some)
        } else {
            load::decode_dynamo(&message.payload, self.task.config.kv_total_blocks)
        };
        let outcome = match decoded {
            Ok(Some(sample)) => {
                if core.on_load(Instant::now(), &sample) {
                    "used"
                } else {
                    "too_many_workers"
                }
            }
            Ok(None) => "ignored",
            Err(error) => {
                let total = self.bump(|view| &mut view.undecodable_reports);
                if let Some(count) = undecodable.due(total, Instant::now()) {
                    warn!(namespace = self.namespace, subject = %message.subject, %error, count, "planner guard: undecodable load report(s) skipped");
                }
                "undecodable"
            }
        };
        match outcome {
            "used" => {
                self.bump(|view| &mut view.load_reports);
            }
            "too_many_workers" => {
                let total = self.bump(|view| &mut view.dropped_reports);
                if let Some(count) = undecodable.due(total, Instant::now()) {
                    warn!(namespace = self.namespace, count, max_workers = self.task.config.max_workers, "planner guard: load reports from more workers than guard.max_workers dropped");
                }
            }
            _ => {}
        }
        counter!("holdfast_guard_load_reports_total", "namespace" => namespace, "outcome" => outcome).increment(1);
    }

    /// Adds one to a counter of the view; returns the new total.
    fn bump(&mut self, field: impl FnOnce(&mut GuardView) -> &mut u64) -> u64 {
        self.task.view.lock().map_or(0, |mut view| {
            let counter = field(&mut view);
            *counter += 1;
            *counter
        })
    }

    fn count_interval(&mut self, closed: &ClosedInterval) {
        for reason in &closed.breaches {
            counter!("holdfast_guard_breaches_total", "namespace" => self.namespace.to_string(), "reason" => reason.label()).increment(1);
        }
        if closed.breaches.is_empty() {
            debug!(namespace = self.namespace, reports = closed.load.reports, kv_usage = ?closed.load.kv_usage, prefill_queue = ?closed.load.prefill_queue, "planner guard: interval within limits");
        } else {
            info!(
                namespace = self.namespace,
                reasons = ?closed.breaches.iter().map(|reason| reason.label()).collect::<Vec<_>>(),
                kv_usage = ?closed.load.kv_usage,
                prefill_queue = ?closed.load.prefill_queue,
                streak = closed.streak,
                held_off = closed.held_off,
                "planner guard: interval breached"
            );
        }
    }

    async fn act(
        &mut self,
        action: &Action,
        session: Option<&mut Session>,
        term: Option<i64>,
    ) -> Outcome {
        let namespace = self.namespace.to_string();
        match (action, self.task.config.mode) {
            (Action::Rollback(rollback), GuardMode::Advise) => {
                let advice = advice_json(self.namespace, rollback, &self.task.relay_id);
                let subject = format!("holdfast.guard.advice.{namespace}");
                let published = self
                    .task
                    .nats
                    .client()
                    .publish(subject, advice.to_string().into())
                    .await;
                let outcome = if published.is_ok() {
                    counter!("holdfast_guard_advice_total", "namespace" => namespace).increment(1);
                    warn!(namespace = self.namespace, from_id = rollback.from.id, to_prefill = rollback.to.prefill, to_decode = rollback.to.decode, triggered_by = %serde_json::to_value(&rollback.triggered_by).unwrap_or_default(), "planner guard: advised a rollback (advise mode)");
                    Outcome::Advised
                } else {
                    warn!(
                        namespace = self.namespace,
                        "planner guard: cannot publish advice: NATS unavailable"
                    );
                    Outcome::Failed
                };
                self.record(rollback, outcome, true);
                outcome
            }
            (Action::Reissue(_), GuardMode::Advise) => Outcome::Superseded,
            (action, GuardMode::Enforce) => {
                let (Some(session), Some(term)) = (session, term) else {
                    return Outcome::Failed;
                };
                let (counts, new_id, decision, kind) = match action {
                    Action::Rollback(rollback) => {
                        (rollback.to, rollback.new_id, rollback.from, "rollback")
                    }
                    Action::Reissue(reissue) => (
                        reissue.decision.counts,
                        reissue.new_id,
                        reissue.decision,
                        "reissue",
                    ),
                };
                let marker = Marker {
                    kind: kind.to_string(),
                    decision_id: new_id,
                    relay: self.task.relay_id.clone(),
                    at_ms: crate::util::wall_clock::unix_millis(),
                    detail: match action {
                        Action::Rollback(rollback) => {
                            Some(advice_json(self.namespace, rollback, &self.task.relay_id))
                        }
                        Action::Reissue(reissue) => {
                            Some(serde_json::json!({"planner_decision_id": reissue.decision.id}))
                        }
                    },
                };
                let write = planner_store::Write {
                    counts,
                    new_id,
                    expect_revision: decision.revision,
                    leader_revision: term,
                    marker: &marker,
                };
                let written = tokio::time::timeout(
                    CALL_LIMIT,
                    planner_store::write(&mut session.client, self.keys, write),
                )
                .await;
                let outcome = match written {
                    Ok(Ok(true)) => Outcome::Written,
                    Ok(Ok(false)) => Outcome::Superseded,
                    Ok(Err(_)) | Err(_) => {
                        self.task.etcd.call_failed();
                        Outcome::Failed
                    }
                };
                match (action, outcome) {
                    (Action::Rollback(rollback), _) => {
                        if outcome == Outcome::Written {
                            counter!("holdfast_guard_rollbacks_total", "namespace" => namespace)
                                .increment(1);
                            warn!(namespace = self.namespace, from_id = rollback.from.id, from_prefill = rollback.from.counts.prefill, from_decode = rollback.from.counts.decode, new_id, to_prefill = counts.prefill, to_decode = counts.decode, triggered_by = %serde_json::to_value(&rollback.triggered_by).unwrap_or_default(), "planner guard: rolled back a decision");
                        } else {
                            info!(namespace = self.namespace, outcome = ?outcome, "planner guard: rollback not written (the planner moved on, leadership changed, or etcd failed)");
                        }
                        self.record(rollback, outcome, false);
                    }
                    (Action::Reissue(reissue), Outcome::Written) => {
                        counter!("holdfast_guard_reissues_total", "namespace" => namespace)
                            .increment(1);
                        warn!(namespace = self.namespace, planner_id = reissue.decision.id, new_id, prefill = counts.prefill, decode = counts.decode, "planner guard: re-issued a planner decision whose id the deployment had already acknowledged");
                        if let Ok(mut view) = self.task.view.lock() {
                            view.reissues += 1;
                        }
                    }
                    (Action::Reissue(_), _) => {
                        info!(namespace = self.namespace, outcome = ?outcome, "planner guard: re-issue not written");
                    }
                }
                outcome
            }
        }
    }

    fn record(&mut self, rollback: &Rollback, outcome: Outcome, advice: bool) {
        let record = ActionRecord::new(rollback, outcome);
        if let Ok(mut view) = self.task.view.lock() {
            if advice {
                view.last_advice = Some(record);
            } else {
                view.last_rollback = Some(record);
            }
        }
    }

    fn refresh(&mut self, core: &NamespaceGuard, candidate: &Candidate, connected: bool) {
        let leader = core.is_leader();
        gauge!("holdfast_guard_leader", "namespace" => self.namespace.to_string()).set(if leader {
            1.0
        } else {
            0.0
        });
        if let Ok(mut view) = self.task.view.lock() {
            view.update(
                core.snapshot(Instant::now()),
                leader,
                candidate.leader_relay.clone(),
                connected,
            );
        }
    }
}

/// The would-be rollback as published on `holdfast.guard.advice.{ns}` (and
/// kept in the marker of an enforced one).
fn advice_json(namespace: &str, rollback: &Rollback, relay: &str) -> serde_json::Value {
    serde_json::json!({
        "namespace": namespace,
        "relay": relay,
        "decision_id": rollback.from.id,
        "from": rollback.from.counts,
        "to": rollback.to,
        "new_decision_id": rollback.new_id,
        "triggered_by": rollback.triggered_by,
    })
}
