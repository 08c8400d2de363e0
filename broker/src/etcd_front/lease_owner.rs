//! The task that owns the front end's lease table: grants, keepalives,
//! revocations, expiry, the keys under each lease, and saving it all.
//!
//! Each relay lease is an owner in the registry (a pseudo-session whose id
//! has the top bit set, so it never meets a real session id): its keys get
//! the registry's upstream lease, buffering, reconcile after an outage and
//! rebuild after an empty etcd unchanged. When a lease expires or is
//! revoked, or the keepalive stream that last renewed it is lost with its
//! connection, the pseudo-session is closed and the registry deletes its
//! keys upstream at once (or as soon as etcd is back).
//!
//! Changes to leases and keys are saved before they are answered, several
//! at a time (one file write for everything that arrived meanwhile);
//! keepalives only move deadlines and are saved about once a second.

use super::leases::{FrontLease, FrontLeaseId, KeeperId, LeaseError, LeaseInfo, LeaseTable};
use super::persist::{self, SavedLease};
use super::range::Entry;
use crate::registry::model::{Claimant, SessionId};
use crate::registry::{AckTo, RegistryHandle};
use crate::wall_clock::unix_millis;
use bytes::Bytes;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Commands waiting for the task, at most.
const COMMAND_QUEUE: usize = 4096;
/// Commands handled before one save covers them all.
const BATCH: usize = 256;
/// How often deadlines moved by keepalives are saved.
const DEADLINE_SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// Registry owners with this bit are relay leases, never sessions.
const FRONT_OWNER_BIT: u64 = 1 << 63;

/// The registry owner of a relay lease.
pub fn registry_owner(lease: FrontLeaseId) -> SessionId {
    FRONT_OWNER_BIT | (lease as u64)
}

/// Whether a registry owner is a client session (not a relay lease).
pub fn is_session(owner: SessionId) -> bool {
    owner & FRONT_OWNER_BIT == 0
}

/// Why the task did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("the relay is shutting down")]
    ShuttingDown,
}

type Reply<T> = oneshot::Sender<Result<T, OwnerError>>;

enum Command {
    Grant {
        id: FrontLeaseId,
        ttl: i64,
        reply: Reply<(FrontLeaseId, i64)>,
    },
    KeepAlive {
        id: FrontLeaseId,
        keeper: KeeperId,
        reply: Reply<i64>,
    },
    KeeperLost {
        keeper: KeeperId,
        leases: Vec<FrontLeaseId>,
    },
    Revoke {
        id: FrontLeaseId,
        reply: Reply<()>,
    },
    TimeToLive {
        id: FrontLeaseId,
        reply: Reply<LeaseInfo>,
    },
    Leases {
        reply: Reply<Vec<FrontLeaseId>>,
    },
    Put {
        lease: FrontLeaseId,
        key: Bytes,
        value: Bytes,
        ack: AckTo,
        reply: Reply<Option<Bytes>>,
    },
    Delete {
        key: Bytes,
        ack: AckTo,
        reply: Reply<Option<Bytes>>,
    },
    Refused {
        lease: FrontLeaseId,
        key: Bytes,
        value: Bytes,
        reply: Reply<()>,
    },
    InRange {
        key: Bytes,
        range_end: Bytes,
        reply: Reply<Vec<Entry>>,
    },
}

/// Gauges and counters the task keeps for metrics.
fn publish(table: &LeaseTable) {
    metrics::gauge!("holdfast_etcd_front_leases").set(table.len() as f64);
    metrics::gauge!("holdfast_etcd_front_lease_keys").set(table.key_count() as f64);
}

/// The handle the gRPC services use.
#[derive(Clone)]
pub struct LeaseOwner {
    commands: mpsc::Sender<Command>,
}

impl LeaseOwner {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, OwnerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| OwnerError::ShuttingDown)?;
        answer.await.map_err(|_| OwnerError::ShuttingDown)?
    }

    pub async fn grant(
        &self,
        id: FrontLeaseId,
        ttl: i64,
    ) -> Result<(FrontLeaseId, i64), OwnerError> {
        self.ask(|reply| Command::Grant { id, ttl, reply }).await
    }

    /// Renews lease `id` on keepalive stream `keeper`.
    pub async fn keep_alive(&self, id: FrontLeaseId, keeper: KeeperId) -> Result<i64, OwnerError> {
        self.ask(|reply| Command::KeepAlive { id, keeper, reply })
            .await
    }

    /// Keepalive stream `keeper`, which renewed `leases`, was lost with its
    /// connection: those it renewed last end now.
    pub async fn keeper_lost(&self, keeper: KeeperId, leases: Vec<FrontLeaseId>) {
        // Nobody waits for the outcome; at shutdown there is none (leases
        // are saved, not revoked).
        let _ = self
            .commands
            .send(Command::KeeperLost { keeper, leases })
            .await;
    }

    pub async fn revoke(&self, id: FrontLeaseId) -> Result<(), OwnerError> {
        self.ask(|reply| Command::Revoke { id, reply }).await
    }

    pub async fn time_to_live(&self, id: FrontLeaseId) -> Result<LeaseInfo, OwnerError> {
        self.ask(|reply| Command::TimeToLive { id, reply }).await
    }

    pub async fn leases(&self) -> Result<Vec<FrontLeaseId>, OwnerError> {
        self.ask(|reply| Command::Leases { reply }).await
    }

    /// Attaches `key` to `lease` and registers it; the registry answers on
    /// `ack`. Returns the key's previous value if `lease` held it; a key
    /// another relay lease holds is refused.
    pub async fn put(
        &self,
        lease: FrontLeaseId,
        key: Bytes,
        value: Bytes,
        ack: AckTo,
    ) -> Result<Option<Bytes>, OwnerError> {
        self.ask(|reply| Command::Put {
            lease,
            key,
            value,
            ack,
            reply,
        })
        .await
    }

    /// Removes `key` if a relay lease holds it (the registry answers on
    /// `ack`); returns its value then, `None` (and `ack` unused) otherwise.
    pub async fn delete(&self, key: Bytes, ack: AckTo) -> Result<Option<Bytes>, OwnerError> {
        self.ask(|reply| Command::Delete { key, ack, reply }).await
    }

    /// The registry refused the put of `key` = `value` under `lease` that
    /// attached a key no relay lease held: it is detached again, so that
    /// reads do not show a key the client was told was not written (unless
    /// a later put has changed it since).
    pub async fn refused(
        &self,
        lease: FrontLeaseId,
        key: Bytes,
        value: Bytes,
    ) -> Result<(), OwnerError> {
        self.ask(|reply| Command::Refused {
            lease,
            key,
            value,
            reply,
        })
        .await
    }

    /// The keys relay leases hold in etcd's range `[key, range_end)`.
    pub async fn in_range(&self, key: Bytes, range_end: Bytes) -> Result<Vec<Entry>, OwnerError> {
        self.ask(|reply| Command::InRange {
            key,
            range_end,
            reply,
        })
        .await
    }
}

/// Restores the table saved at `path`, registers its keys again and starts
/// the task. Returns the handle and the task (it saves once more on `stop`).
pub async fn start(
    path: PathBuf,
    max_leases: usize,
    max_keys_per_lease: usize,
    registry: RegistryHandle,
    orphan_acks: impl Fn() -> AckTo,
    stop: CancellationToken,
) -> (LeaseOwner, tokio::task::JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    let mut task = OwnerTask {
        table: LeaseTable::new(max_leases, max_keys_per_lease),
        registry,
        path,
        structural_change: false,
        deadlines_moved: false,
        answers: Vec::new(),
        ids: RandomState::new(),
        id_counter: 0,
        stop: stop.clone(),
    };
    task.restore(&orphan_acks).await;
    publish(&task.table);
    let handle = tokio::spawn(task.run(receiver, stop));
    (LeaseOwner { commands }, handle)
}

struct OwnerTask {
    table: LeaseTable,
    registry: RegistryHandle,
    path: PathBuf,
    /// Leases or keys changed since the last save.
    structural_change: bool,
    /// Only deadlines changed since the last save.
    deadlines_moved: bool,
    /// Answers held back until the change they confirm is saved.
    answers: Vec<Box<dyn FnOnce() + Send>>,
    ids: RandomState,
    id_counter: u64,
    stop: CancellationToken,
}

impl OwnerTask {
    async fn restore(&mut self, orphan_acks: &impl Fn() -> AckTo) {
        let saved = match persist::load(&self.path) {
            Ok(saved) => saved,
            Err(error) => {
                warn!(error = %error, "the etcd front end's lease table is unreadable; starting without leases");
                return;
            }
        };
        let now = unix_millis();
        let (mut live, mut expired, mut keys) = (0usize, 0usize, 0usize);
        for lease in saved {
            let (id, lease) = lease.into_lease();
            let owner = registry_owner(id);
            keys += lease.keys.len();
            // Their keys go back to the registry either way: a live lease's
            // to be written under a new upstream lease, an expired one's to
            // be deleted (the relay that wrote them is gone).
            for (key, value) in &lease.keys {
                self.registry
                    .register(
                        Claimant::plain(owner),
                        key.clone(),
                        value.clone(),
                        orphan_acks(),
                    )
                    .await;
            }
            if lease.deadline_ms > now && self.table.restore(id, lease) {
                live += 1;
            } else {
                expired += 1;
                self.registry.session_closed(owner, true).await;
            }
        }
        if live + expired > 0 {
            info!(
                leases = live,
                expired,
                keys,
                path = %self.path.display(),
                "etcd front end: lease table restored; keys of live leases are registered again, those of expired ones deleted"
            );
            if expired > 0 {
                metrics::counter!("holdfast_etcd_front_leases_ended_total", "reason" => "expired")
                    .increment(expired as u64);
                self.structural_change = true;
            }
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(DEADLINE_SAVE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_expiry = self.table.next_deadline();
            tokio::select! {
                _ = stop.cancelled() => break,
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    self.on_command(command).await;
                    for _ in 1..BATCH {
                        match commands.try_recv() {
                            Ok(command) => self.on_command(command).await,
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until_unix_ms(next_expiry) => self.expire().await,
                _ = ticker.tick() => {
                    if self.deadlines_moved {
                        self.save().await;
                    }
                }
            }
            if self.structural_change {
                self.save().await;
            }
            for answer in self.answers.drain(..) {
                answer();
            }
            publish(&self.table);
        }
        // Leases stay valid across a restart: saved, not revoked.
        self.save().await;
        for answer in self.answers.drain(..) {
            answer();
        }
        debug!("etcd front end lease owner stopped");
    }

    /// Holds `answer` back until the table is saved.
    fn after_save<T: Send + 'static>(&mut self, reply: Reply<T>, answer: Result<T, OwnerError>) {
        self.structural_change = true;
        self.answers.push(Box::new(move || {
            let _ = reply.send(answer);
        }));
    }

    async fn on_command(&mut self, command: Command) {
        let now = unix_millis();
        match command {
            Command::Grant { id, ttl, reply } => {
                let ids = &self.ids;
                let counter = &mut self.id_counter;
                let granted = self
                    .table
                    .grant(id, ttl, now, || fresh_id(ids, counter, now));
                match granted {
                    Ok(granted) => self.after_save(reply, Ok(granted)),
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Command::KeepAlive { id, keeper, reply } => {
                let renewed = self.table.keep_alive(id, keeper, now);
                self.deadlines_moved |= renewed.is_ok();
                let _ = reply.send(renewed.map_err(OwnerError::from));
            }
            Command::KeeperLost { keeper, leases } => {
                // Streams break when the relay stops too; its leases stay
                // valid across the restart.
                if self.stop.is_cancelled() {
                    return;
                }
                for (lease, keys) in self.table.keeper_lost(keeper, leases) {
                    self.end_lease(lease, keys.len(), "connection_lost").await;
                    self.structural_change = true;
                }
            }
            Command::Revoke { id, reply } => match self.table.revoke(id) {
                Ok(keys) => {
                    self.end_lease(id, keys.len(), "revoked").await;
                    self.after_save(reply, Ok(()));
                }
                Err(error) => {
                    let _ = reply.send(Err(error.into()));
                }
            },
            Command::TimeToLive { id, reply } => {
                let _ = reply.send(self.table.time_to_live(id, now).map_err(OwnerError::from));
            }
            Command::Leases { reply } => {
                let _ = reply.send(Ok(self.table.ids()));
            }
            Command::Put {
                lease,
                key,
                value,
                ack,
                reply,
            } => match self.table.attach(lease, key.clone(), value.clone()) {
                Ok(previous) => {
                    self.registry
                        .register(Claimant::plain(registry_owner(lease)), key, value, ack)
                        .await;
                    self.after_save(reply, Ok(previous));
                }
                Err(error) => {
                    let _ = reply.send(Err(error.into()));
                }
            },
            Command::Delete { key, ack, reply } => {
                let value = self.table.get(&key).map(|(_, value)| value);
                match self.table.detach(&key) {
                    Some(lease) => {
                        self.registry
                            .deregister(Claimant::plain(registry_owner(lease)), key, ack)
                            .await;
                        self.after_save(reply, Ok(value));
                    }
                    None => {
                        let _ = reply.send(Ok(None));
                    }
                }
            }
            Command::Refused {
                lease,
                key,
                value,
                reply,
            } => {
                if self.table.get(&key) == Some((lease, value)) {
                    self.table.detach(&key);
                    self.after_save(reply, Ok(()));
                } else {
                    let _ = reply.send(Ok(()));
                }
            }
            Command::InRange {
                key,
                range_end,
                reply,
            } => {
                let found = self
                    .table
                    .in_range(&key, &range_end)
                    .into_iter()
                    .map(|(key, value, lease)| Entry { key, value, lease })
                    .collect();
                let _ = reply.send(Ok(found));
            }
        }
    }

    async fn expire(&mut self) {
        let now = unix_millis();
        for (lease, keys) in self.table.expire(now) {
            self.end_lease(lease, keys.len(), "expired").await;
            self.structural_change = true;
        }
    }

    /// The lease is gone from the table: its keys leave etcd.
    async fn end_lease(&mut self, lease: FrontLeaseId, keys: usize, reason: &'static str) {
        self.registry
            .session_closed(registry_owner(lease), reason == "expired")
            .await;
        metrics::counter!("holdfast_etcd_front_leases_ended_total", "reason" => reason)
            .increment(1);
        info!(
            lease = format_args!("{lease:x}"),
            keys, reason, "etcd front end: lease ended; deleting its keys upstream"
        );
    }

    async fn save(&mut self) {
        self.structural_change = false;
        self.deadlines_moved = false;
        let saved: Vec<SavedLease> = self
            .table
            .leases()
            .map(|(id, lease): (&FrontLeaseId, &FrontLease)| SavedLease::from_lease(*id, lease))
            .collect();
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || persist::save(&path, saved)).await;
        let failure = match written {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        metrics::counter!("holdfast_etcd_front_save_failures_total").increment(1);
        warn!(
            path = %self.path.display(),
            error = %failure,
            "cannot save the etcd front end's lease table; leases work but would not survive a restart"
        );
    }
}

/// An unpredictable lease id: relays on many nodes write keys named after
/// their lease ids into one etcd, so ids must not repeat across relays.
fn fresh_id(ids: &RandomState, counter: &mut u64, now_ms: u64) -> FrontLeaseId {
    *counter += 1;
    let mut hasher = ids.build_hasher();
    hasher.write_u64(*counter);
    hasher.write_u64(now_ms);
    hasher.write_u32(std::process::id());
    hasher.finish() as i64
}

async fn sleep_until_unix_ms(deadline: Option<u64>) {
    match deadline {
        Some(deadline) => {
            let wait = deadline.saturating_sub(unix_millis());
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        None => std::future::pending().await,
    }
}
