//! The registry: every session's registrations, kept in etcd under a lease
//! the relay owns for that session.
//!
//! One task owns the [`model::Registry`]; sessions send it commands over a
//! bounded channel and get a typed answer through the reply they pass. The
//! task never waits on etcd itself: one etcd step at a time runs in a
//! spawned future while commands keep being accepted, so a stopped etcd
//! delays registrations (answered Buffered) and nothing else.
//!
//! After the link comes back, and every `reconcile_interval`, an audit
//! checks each lease and each key against etcd and queues whatever differs,
//! which covers an etcd that came back empty, expired leases, and keys
//! changed or deleted behind the relay's back.
//!
//! A key belongs to the live session that registered it (see
//! [`model`]); another session's change of it is answered `conflict`.

mod etcd_steps;
mod lease_keeper;
pub mod model;

use crate::config::EtcdConfig;
use crate::keys::etcd::link::EtcdLink;
use crate::ops::stats::{add, bump};
use crate::util::drop_log::DropLog;
use crate::util::reply::Reply;
use bytes::Bytes;
use etcd_steps::{Step, StepResult};
use holdfast_wire::LinkStatus;
use holdfast_wire::{ErrorCode, RegistrationOutcome, Text};
use model::{
    Change, Claimant, LeaseId, RegisterError, Registry, SessionId, MAX_TXN_BYTES, MAX_TXN_OPS,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Commands waiting for the registry task, at most.
const COMMAND_QUEUE: usize = 8192;
/// Leases revoked or granted per step.
const LEASES_PER_STEP: usize = 64;
/// Pause after a failed step before the next one.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Counters and gauges for metrics and the status document.
#[derive(Debug, Default)]
pub struct RegistryStats {
    pub registrations: AtomicU64,
    pub pending_changes: AtomicU64,
    pub sessions: AtomicU64,
    pub acks_applied: AtomicU64,
    pub acks_buffered: AtomicU64,
    pub acks_rejected: AtomicU64,
    /// Registrations refused for a limit (of keys, or of a key's size).
    pub limit_refusals: AtomicU64,
    /// Changes refused because another live session (or etcd front end
    /// lease) holds the key: registrations, deregistrations, and writes
    /// through the etcd front end.
    pub conflicts: AtomicU64,
    pub leases_granted: AtomicU64,
    pub leases_revoked: AtomicU64,
    pub leases_lost: AtomicU64,
    pub reconcile_runs: AtomicU64,
    pub reconcile_repairs: AtomicU64,
}

/// Where a registration's answer goes: a session turns it into its
/// client's REGISTER_ACK, the etcd front end into a gRPC answer.
pub type AckTo = Reply<RegistrationOutcome>;

/// Which owners a [`RegistryHandle::first_held`] question is about.
pub type OwnerFilter = fn(SessionId) -> bool;

enum Command {
    Register {
        claimant: Claimant,
        key: Bytes,
        value: Bytes,
        ack: AckTo,
    },
    Deregister {
        claimant: Claimant,
        key: Bytes,
        ack: AckTo,
    },
    FirstHeld {
        key: Bytes,
        range_end: Bytes,
        counts: OwnerFilter,
        reply: oneshot::Sender<Option<(Bytes, SessionId)>>,
    },
    SessionClosed {
        session: SessionId,
        liveness_expired: bool,
    },
}

/// Sessions' way into the registry.
#[derive(Clone)]
pub struct RegistryHandle {
    commands: Option<mpsc::Sender<Command>>,
    pub stats: Arc<RegistryStats>,
}

impl RegistryHandle {
    /// A registry that refuses everything: etcd is not configured.
    pub fn disabled() -> RegistryHandle {
        RegistryHandle {
            commands: None,
            stats: Arc::default(),
        }
    }

    /// Registers `key` = `value` for the claimant's session; the answer
    /// goes to `ack`.
    pub async fn register(&self, claimant: Claimant, key: Bytes, value: Bytes, ack: AckTo) {
        self.send(Command::Register {
            claimant,
            key,
            value,
            ack,
        })
        .await;
    }

    /// Removes `key` from the claimant's registrations.
    pub async fn deregister(&self, claimant: Claimant, key: Bytes, ack: AckTo) {
        self.send(Command::Deregister { claimant, key, ack }).await;
    }

    /// The first key of etcd's range `[key, range_end)` that a live owner
    /// `counts` holds, with that owner; `None` also when the registry is
    /// off or stopping.
    pub async fn first_held(
        &self,
        key: Bytes,
        range_end: Bytes,
        counts: OwnerFilter,
    ) -> Option<(Bytes, SessionId)> {
        let commands = self.commands.as_ref()?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::FirstHeld {
                key,
                range_end,
                counts,
                reply,
            })
            .await
            .ok()?;
        answer.await.ok().flatten()
    }

    /// The session is gone: delete its keys and revoke its lease.
    pub async fn session_closed(&self, session: SessionId, liveness_expired: bool) {
        if let Some(commands) = &self.commands {
            let _ = commands
                .send(Command::SessionClosed {
                    session,
                    liveness_expired,
                })
                .await;
        }
    }

    async fn send(&self, command: Command) {
        let Some(commands) = &self.commands else {
            let ack = match command {
                Command::Register { ack, .. } | Command::Deregister { ack, .. } => ack,
                Command::SessionClosed { .. } | Command::FirstHeld { .. } => return,
            };
            bump(&self.stats.acks_rejected);
            ack.send(RegistrationOutcome::Rejected {
                code: ErrorCode::EtcdUnavailable,
                message: Text::from("etcd is not configured on this relay (--etcd)"),
            });
            return;
        };
        if let Err(error) = commands.send(command).await {
            // The task stops only at shutdown.
            let ack = match error.0 {
                Command::Register { ack, .. } | Command::Deregister { ack, .. } => ack,
                Command::SessionClosed { .. } | Command::FirstHeld { .. } => return,
            };
            ack.send(RegistrationOutcome::Rejected {
                code: ErrorCode::ShuttingDown,
                message: Text::from("the relay is shutting down"),
            });
        }
    }
}

/// Starts the registry task over `link`.
pub fn start(config: &EtcdConfig, link: EtcdLink, stop: CancellationToken) -> RegistryHandle {
    if !link.is_enabled() {
        return RegistryHandle::disabled();
    }
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    let stats = Arc::new(RegistryStats::default());
    let (lost, lost_receiver) = mpsc::unbounded_channel();
    let task = RegistryTask {
        model: Registry::new(
            config.max_registrations,
            config.max_registrations_per_session,
        ),
        link,
        lease_ttl: config.lease_ttl,
        step_timeout: (config.probe_timeout * 4).max(Duration::from_secs(2)),
        reconcile_interval: config.reconcile_interval,
        stats: stats.clone(),
        waiting: HashMap::new(),
        keepers: HashMap::new(),
        lost,
        audit: None,
        retry_at: None,
        conflict_log: DropLog::default(),
    };
    tokio::spawn(task.run(receiver, lost_receiver, stop));
    RegistryHandle {
        commands: Some(commands),
        stats,
    }
}

/// An audit in progress: leases first, then keys in batches.
struct Audit {
    /// After the link (re)connected or etcd restarted, or periodic.
    after_reconnect: bool,
    started: Instant,
    leases_checked: bool,
    keys: VecDeque<Bytes>,
    repairs: u64,
}

struct RegistryTask {
    model: Registry,
    link: EtcdLink,
    lease_ttl: Duration,
    step_timeout: Duration,
    reconcile_interval: Duration,
    stats: Arc<RegistryStats>,
    /// Acks waiting for their key's change to reach etcd.
    waiting: HashMap<Bytes, Vec<AckTo>>,
    keepers: HashMap<SessionId, AbortHandle>,
    lost: mpsc::UnboundedSender<(SessionId, LeaseId)>,
    audit: Option<Audit>,
    retry_at: Option<tokio::time::Instant>,
    /// Conflicts are logged at most once per interval: a client retrying a
    /// refused key in a loop must not flood the log.
    conflict_log: DropLog,
}

impl RegistryTask {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut lost: mpsc::UnboundedReceiver<(SessionId, LeaseId)>,
        stop: CancellationToken,
    ) {
        let mut link = self.link.watch();
        let mut seen_generation = 0;
        let mut seen_leader_changes = 0;
        let mut seen_member_changes = 0;
        let mut in_flight: Option<JoinHandle<StepResult>> = None;
        let mut audit_ticker = tokio::time::interval(self.reconcile_interval);
        audit_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                _ = stop.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some((session, lease)) = lost.recv() => {
                    if self.model.lease_lost(session, lease) {
                        bump(&self.stats.leases_lost);
                        warn!(session, lease, "etcd lost a session's lease; granting a new one and writing its keys again");
                    }
                }
                changed = link.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let (status, generation, leader_changes, member_changes) = {
                        let state = link.borrow_and_update();
                        (
                            state.link.status,
                            state.generation,
                            state.leader_changes,
                            state.member_changes,
                        )
                    };
                    if member_changes != seen_member_changes {
                        // Calls go to another member now: what failed on
                        // the old one is tried there at once.
                        seen_member_changes = member_changes;
                        self.retry_at = None;
                    }
                    if leader_changes != seen_leader_changes {
                        // Nothing is lost in an election; one check of the
                        // keys costs little and proves it.
                        seen_leader_changes = leader_changes;
                        if status == LinkStatus::Up {
                            self.start_audit(false);
                        }
                    }
                    if status == LinkStatus::Up && generation != seen_generation {
                        // A new connection, or etcd restarted under the old
                        // one: what an earlier pass checked proves nothing
                        // now, so a fresh pass starts.
                        seen_generation = generation;
                        self.retry_at = None;
                        self.audit = None;
                        self.start_audit(true);
                    } else if status != LinkStatus::Up {
                        self.audit = None;
                        self.answer_all_waiting_buffered();
                    }
                }
                result = wait_step(&mut in_flight) => {
                    in_flight = None;
                    self.on_step_result(result);
                }
                _ = audit_ticker.tick() => {
                    if self.audit.is_none() && self.link.is_up() {
                        self.start_audit(false);
                    }
                }
                _ = sleep_until(retry_at) => self.retry_at = None,
            }
            if in_flight.is_none() && self.retry_at.is_none() {
                if let Some(client) = self.link.client() {
                    if let Some(step) = self.next_step() {
                        let ttl = self.lease_ttl;
                        let timeout = self.step_timeout;
                        let link = self.link.clone();
                        in_flight = Some(tokio::spawn(etcd_steps::run(
                            client, link, step, ttl, timeout,
                        )));
                    }
                }
            }
            self.publish_gauges();
        }
        // Leases are left to expire: a relay restarting under its clients
        // should not make their keys blink; the clients register again
        // with the next relay and its new leases take the keys over.
        for keeper in self.keepers.values() {
            keeper.abort();
        }
        debug!("registry stopped");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Register {
                claimant,
                key,
                value,
                ack,
            } => match self.model.register(&claimant, key.clone(), value) {
                Ok(()) => self.answer_when_written(key, ack),
                Err(error) => self.refuse(claimant.session, &error, ack),
            },
            Command::Deregister { claimant, key, ack } => {
                match self.model.deregister(&claimant, &key) {
                    Ok(_) => self.answer_when_written(key, ack),
                    Err(error) => self.refuse(claimant.session, &error, ack),
                }
            }
            Command::FirstHeld {
                key,
                range_end,
                counts,
                reply,
            } => {
                let _ = reply.send(self.model.first_held(&key, &range_end, counts));
            }
            Command::SessionClosed {
                session,
                liveness_expired,
            } => {
                let keys = self.model.session_closed(session);
                if let Some(keeper) = self.keepers.remove(&session) {
                    keeper.abort();
                }
                // Its keys go with the lease; their waiting answers have no
                // reader left (the session is gone), so none is kept.
                let model = &self.model;
                self.waiting.retain(|key, _| model.is_pending(key));
                if keys > 0 {
                    let reason = if liveness_expired {
                        "no heartbeat within liveness_timeout"
                    } else {
                        "connection closed"
                    };
                    info!(
                        session,
                        keys,
                        reason,
                        etcd_up = self.link.is_up(),
                        "session ended: removing its registrations"
                    );
                }
            }
        }
    }

    /// Answers a refused change with its code, counted (and a conflict
    /// logged, at most once per interval).
    fn refuse(&mut self, session: SessionId, error: &RegisterError, ack: AckTo) {
        bump(&self.stats.acks_rejected);
        let code = match error {
            RegisterError::Conflict { key, holder } => {
                bump(&self.stats.conflicts);
                let total = self.stats.conflicts.load(Ordering::Relaxed);
                if let Some(since) = self.conflict_log.due(total, Instant::now()) {
                    warn!(
                        session,
                        key = %key,
                        holder,
                        refused_since_last_line = since,
                        "refused a change of a key another live session holds"
                    );
                }
                ErrorCode::Conflict
            }
            RegisterError::SessionLimit { .. }
            | RegisterError::RelayLimit { .. }
            | RegisterError::TooLarge { .. } => {
                bump(&self.stats.limit_refusals);
                ErrorCode::LimitExceeded
            }
        };
        ack.send(RegistrationOutcome::Rejected {
            code,
            message: Text::from(error.to_string()),
        });
    }

    /// Applied once etcd has the key's latest change; Buffered at once if
    /// etcd is unreachable.
    fn answer_when_written(&mut self, key: Bytes, ack: AckTo) {
        if !self.model.is_pending(&key) {
            bump(&self.stats.acks_applied);
            ack.send(RegistrationOutcome::Applied);
        } else if self.link.is_up() {
            self.waiting.entry(key).or_default().push(ack);
        } else {
            bump(&self.stats.acks_buffered);
            ack.send(RegistrationOutcome::Buffered);
        }
    }

    fn answer_all_waiting_buffered(&mut self) {
        for (_, acks) in self.waiting.drain() {
            for ack in acks {
                bump(&self.stats.acks_buffered);
                ack.send(RegistrationOutcome::Buffered);
            }
        }
    }

    fn start_audit(&mut self, after_reconnect: bool) {
        if self.audit.is_some() {
            return;
        }
        self.audit = Some(Audit {
            after_reconnect,
            started: Instant::now(),
            leases_checked: false,
            keys: self.model.audit_targets().into(),
            repairs: 0,
        });
    }

    /// The most urgent etcd work: removals, then leases, then writes, and
    /// only then audit reads.
    fn next_step(&mut self) -> Option<Step> {
        let revocations = self.model.revocations();
        if !revocations.is_empty() {
            let batch = revocations.len().min(LEASES_PER_STEP);
            return Some(Step::Revoke(revocations[..batch].to_vec()));
        }
        let mut needing = self.model.sessions_needing_lease();
        if !needing.is_empty() {
            needing.truncate(LEASES_PER_STEP);
            return Some(Step::Grant(needing));
        }
        let changes = self.model.next_changes(MAX_TXN_OPS, MAX_TXN_BYTES);
        if !changes.is_empty() {
            return Some(Step::Apply(changes));
        }
        let audit = self.audit.as_mut()?;
        if !audit.leases_checked {
            audit.leases_checked = true;
            let leases = self.model.leases();
            if !leases.is_empty() {
                return Some(Step::CheckLeases(leases));
            }
        }
        if !audit.keys.is_empty() {
            // What etcd should hold for these keys comes back in one answer,
            // so a batch is bounded in bytes as a write is.
            let mut batch = 0;
            let mut bytes = 0;
            for key in audit.keys.iter().take(MAX_TXN_OPS) {
                let size = self.model.registered_bytes(key);
                if batch > 0 && bytes + size > MAX_TXN_BYTES {
                    break;
                }
                bytes += size;
                batch += 1;
            }
            return Some(Step::ReadKeys(audit.keys.drain(..batch).collect()));
        }
        self.finish_audit();
        None
    }

    fn finish_audit(&mut self) {
        let Some(audit) = self.audit.take() else {
            return;
        };
        let elapsed = audit.started.elapsed();
        bump(&self.stats.reconcile_runs);
        add(&self.stats.reconcile_repairs, audit.repairs);
        metrics::histogram!(crate::ops::metric_catalog::RECONCILE_SECONDS)
            .record(elapsed.as_secs_f64());
        // A pass after etcd came back is a state change worth a line even
        // when nothing differed; a quiet periodic pass is not.
        if audit.repairs > 0 || audit.after_reconnect {
            info!(
                repairs = audit.repairs,
                registrations = self.model.registrations(),
                pending = self.model.pending_changes(),
                duration_ms = elapsed.as_millis() as u64,
                after_reconnect = audit.after_reconnect,
                "reconcile pass finished; what differed in etcd is being rewritten"
            );
        } else {
            debug!(
                registrations = self.model.registrations(),
                duration_ms = elapsed.as_millis() as u64,
                "reconcile: etcd matches"
            );
        }
    }

    fn on_step_result(&mut self, result: Result<StepResult, tokio::task::JoinError>) {
        let result = match result {
            Ok(result) => result,
            Err(error) => {
                warn!(error = %error, "registry etcd step failed to run");
                self.retry_at = Some(tokio::time::Instant::now() + RETRY_DELAY);
                return;
            }
        };
        if let Some(error) = result.error() {
            warn!(error = %error, "etcd call failed; registrations stay buffered and are retried");
            self.retry_at = Some(tokio::time::Instant::now() + RETRY_DELAY);
            // The member may be gone: the link checks the others now, and
            // a move to one of them cuts this retry delay short.
            self.link.call_failed();
        }
        match result {
            StepResult::Revoked { done, .. } => {
                self.model.revoked(done);
                add(&self.stats.leases_revoked, done as u64);
            }
            StepResult::Granted { leases, .. } => {
                for (session, lease) in leases {
                    bump(&self.stats.leases_granted);
                    if self.model.lease_granted(session, lease) {
                        self.spawn_keeper(session, lease);
                    }
                }
            }
            StepResult::Applied {
                changes,
                error,
                lease_missing,
            } => {
                if error.is_none() {
                    self.model.applied(&changes);
                }
                if lease_missing {
                    self.leases_missing(&changes);
                }
                for change in &changes {
                    if self.model.is_pending(change.key()) {
                        continue;
                    }
                    for ack in self.waiting.remove(change.key()).unwrap_or_default() {
                        bump(&self.stats.acks_applied);
                        ack.send(RegistrationOutcome::Applied);
                    }
                }
            }
            StepResult::LeasesChecked { lost, .. } => {
                for (session, lease) in lost {
                    if self.model.lease_lost(session, lease) {
                        bump(&self.stats.leases_lost);
                        if let Some(audit) = &mut self.audit {
                            audit.repairs += 1;
                        }
                        if let Some(keeper) = self.keepers.remove(&session) {
                            keeper.abort();
                        }
                    }
                }
            }
            StepResult::KeysRead { observed, .. } => {
                for (key, found) in observed {
                    if self.model.audited(&key, found.as_ref()) {
                        if let Some(audit) = &mut self.audit {
                            audit.repairs += 1;
                        }
                    }
                }
            }
        }
        if self.retry_at.is_some() {
            // Honest answers: nothing waiting is in etcd yet.
            self.answer_all_waiting_buffered();
        }
    }

    /// etcd refused a batch over a lease it does not have. Which one is not
    /// said, so every session whose lease the batch used gets a new one (a
    /// still-valid one is revoked once replaced, which costs nothing).
    fn leases_missing(&mut self, changes: &[Change]) {
        let used: HashSet<LeaseId> = changes
            .iter()
            .filter_map(|change| match change {
                Change::Put { lease, .. } => Some(*lease),
                Change::Delete { .. } => None,
            })
            .collect();
        for (session, lease) in self.model.leases() {
            if used.contains(&lease) && self.model.lease_lost(session, lease) {
                bump(&self.stats.leases_lost);
                if let Some(keeper) = self.keepers.remove(&session) {
                    keeper.abort();
                }
            }
        }
        warn!(
            leases = used.len(),
            "etcd no longer has leases the registrations were written under; granting new ones"
        );
        // The write failed for a known reason: retry at once.
        self.retry_at = None;
    }

    fn spawn_keeper(&mut self, session: SessionId, lease: LeaseId) {
        let keeper = tokio::spawn(lease_keeper::keep_alive(
            self.link.clone(),
            session,
            lease,
            self.lease_ttl,
            self.step_timeout,
            self.lost.clone(),
        ));
        if let Some(old) = self.keepers.insert(session, keeper.abort_handle()) {
            old.abort();
        }
    }

    fn publish_gauges(&self) {
        let stats = &self.stats;
        stats
            .registrations
            .store(self.model.registrations() as u64, Ordering::Relaxed);
        stats
            .pending_changes
            .store(self.model.pending_changes() as u64, Ordering::Relaxed);
        stats
            .sessions
            .store(self.model.sessions() as u64, Ordering::Relaxed);
    }
}

async fn wait_step(
    in_flight: &mut Option<JoinHandle<StepResult>>,
) -> Result<StepResult, tokio::task::JoinError> {
    match in_flight {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
