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
//! at a time (one transaction for everything that arrived meanwhile, with
//! only the rows that changed). A keepalive moves only its lease's expiry,
//! which is saved half a TTL ahead: one keepalive in several writes that
//! one row, and is answered once it is saved (see
//! [`persist::expiry_to_save`] for why that is safe after a crash).

use super::leases::{FrontLeaseId, KeeperId, LeaseError, LeaseInfo, LeaseTable};
use super::persist::{self, Changes, LeaseStore};
use super::range::Entry;
use crate::keys::registry::model::{Claimant, SessionId};
use crate::keys::registry::{AckTo, RegistryHandle};
use crate::util::drop_log::DropLog;
use crate::util::wall_clock::unix_millis;
use bytes::Bytes;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Commands waiting for the task, at most.
const COMMAND_QUEUE: usize = 4096;
/// Commands handled before one save covers them all.
const BATCH: usize = 256;
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

/// Restores the table saved at `path` (importing the JSON table at
/// `legacy_path` once), registers its keys again and starts the task.
/// Returns the handle and the task (it saves once more on `stop`).
pub async fn start(
    path: PathBuf,
    legacy_path: PathBuf,
    max_leases: usize,
    max_keys_per_lease: usize,
    registry: RegistryHandle,
    stop: CancellationToken,
) -> (LeaseOwner, tokio::task::JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    let opening = path.clone();
    let opened =
        tokio::task::spawn_blocking(move || LeaseStore::open(&opening, &legacy_path)).await;
    let opened = match opened {
        Ok(opened) => opened,
        Err(error) => {
            // Only a panic outside redb's own (caught) ones gets here.
            warn!(%error, "opening the etcd front end's lease table failed; starting without leases");
            persist::Opened::unavailable(path)
        }
    };
    let mut task = OwnerTask {
        table: LeaseTable::new(max_leases, max_keys_per_lease),
        registry,
        store: Arc::new(opened.store),
        unsaved_leases: BTreeSet::new(),
        unsaved_keys: opened.orphan_keys.into_iter().collect(),
        saved_expiry: HashMap::new(),
        answers: Vec::new(),
        failures: 0,
        failure_log: DropLog::default(),
        ids: RandomState::new(),
        id_counter: 0,
        stop: stop.clone(),
    };
    task.restore(opened.leases).await;
    // Expired leases found at start leave the file now, not with the
    // first change after.
    task.save(false).await;
    publish(&task.table);
    let handle = tokio::spawn(task.run(receiver, stop));
    (LeaseOwner { commands }, handle)
}

struct OwnerTask {
    table: LeaseTable,
    registry: RegistryHandle,
    store: Arc<LeaseStore>,
    /// Leases whose row is to be written (or removed) with the next save.
    unsaved_leases: BTreeSet<FrontLeaseId>,
    /// Keys whose row is to be written (or removed) with the next save.
    unsaved_keys: BTreeSet<Bytes>,
    /// The expiry the store holds for each lease.
    saved_expiry: HashMap<FrontLeaseId, u64>,
    /// Answers held back until the change they confirm is saved.
    answers: Vec<Box<dyn FnOnce() + Send>>,
    /// Failed saves, and the pace of their log lines.
    failures: u64,
    failure_log: DropLog,
    ids: RandomState,
    id_counter: u64,
    stop: CancellationToken,
}

impl OwnerTask {
    async fn restore(&mut self, saved: Vec<persist::SavedLease>) {
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
                        // Nobody waits: the relay restores these itself.
                        AckTo::discarded(),
                    )
                    .await;
            }
            let expiry = lease.deadline_ms;
            let lease_keys: Vec<Bytes> = lease.keys.keys().cloned().collect();
            if expiry > now && self.table.restore(id, lease) {
                live += 1;
                self.saved_expiry.insert(id, expiry);
            } else {
                expired += 1;
                self.registry.session_closed(owner, true).await;
                self.unsaved_leases.insert(id);
                self.unsaved_keys.extend(lease_keys);
            }
        }
        if live + expired > 0 {
            info!(
                leases = live,
                expired,
                keys,
                path = %self.store.path().display(),
                "etcd front end: lease table restored; keys of live leases are registered again, those of expired ones deleted"
            );
            if expired > 0 {
                metrics::counter!("holdfast_etcd_front_leases_ended_total", "reason" => "expired")
                    .increment(expired as u64);
            }
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
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
            }
            self.save(false).await;
            for answer in self.answers.drain(..) {
                answer();
            }
            publish(&self.table);
        }
        // Leases stay valid across a restart: saved, not revoked, each with
        // the expiry its client was promised (no slack after a clean stop).
        let ids: Vec<FrontLeaseId> = self.table.ids();
        self.unsaved_leases.extend(ids);
        self.save(true).await;
        for answer in self.answers.drain(..) {
            answer();
        }
        debug!("etcd front end lease owner stopped");
    }

    /// Holds `answer` back until the table is saved.
    fn after_save<T: Send + 'static>(&mut self, reply: Reply<T>, answer: Result<T, OwnerError>) {
        self.answers.push(Box::new(move || {
            let _ = reply.send(answer);
        }));
    }

    /// The lease is gone from the table: its row and its keys' rows go too.
    fn forget(&mut self, lease: FrontLeaseId, keys: impl IntoIterator<Item = Bytes>) {
        self.unsaved_leases.insert(lease);
        self.unsaved_keys.extend(keys);
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
                    Ok(granted) => {
                        self.unsaved_leases.insert(granted.0);
                        self.after_save(reply, Ok(granted));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Command::KeepAlive { id, keeper, reply } => {
                match self.table.keep_alive(id, keeper, now) {
                    Ok(ttl) => {
                        let deadline = self.table.lease(id).map_or(0, |lease| lease.deadline_ms);
                        if persist::must_save(deadline, self.saved_expiry.get(&id).copied()) {
                            self.unsaved_leases.insert(id);
                            self.after_save(reply, Ok(ttl));
                        } else {
                            let _ = reply.send(Ok(ttl));
                        }
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Command::KeeperLost { keeper, leases } => {
                // Streams break when the relay stops too; its leases stay
                // valid across the restart.
                if self.stop.is_cancelled() {
                    return;
                }
                for (lease, keys) in self.table.keeper_lost(keeper, leases) {
                    self.end_lease(lease, keys.len(), "connection_lost").await;
                    self.forget(lease, keys.into_keys());
                }
            }
            Command::Revoke { id, reply } => match self.table.revoke(id) {
                Ok(keys) => {
                    self.end_lease(id, keys.len(), "revoked").await;
                    self.forget(id, keys.into_keys());
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
                    self.unsaved_keys.insert(key.clone());
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
                        self.unsaved_keys.insert(key.clone());
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
                    self.unsaved_keys.insert(key);
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
            self.forget(lease, keys.into_keys());
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

    /// The rows of every unsaved lease and key as the table has them now:
    /// a lease's expiry half a TTL ahead, or exactly (`exact`, at a clean
    /// stop, when no keepalive can come before the next start reads it).
    fn changes(&mut self, exact: bool) -> Changes {
        let mut changes = Changes::default();
        for id in std::mem::take(&mut self.unsaved_leases) {
            let row = self.table.lease(id).map(|lease| {
                let expiry = if exact {
                    lease.deadline_ms
                } else {
                    persist::expiry_to_save(lease.deadline_ms, lease.ttl_seconds)
                };
                (lease.ttl_seconds, expiry)
            });
            if exact && row.map(|(_, expiry)| expiry) == self.saved_expiry.get(&id).copied() {
                continue;
            }
            changes.leases.insert(id, row);
        }
        for key in std::mem::take(&mut self.unsaved_keys) {
            let row = self.table.get(&key);
            changes.keys.insert(key, row);
        }
        changes
    }

    /// Writes what changed since the last save, if anything did.
    async fn save(&mut self, exact: bool) {
        let changes = self.changes(exact);
        if changes.is_empty() {
            return;
        }
        let leases: Vec<(FrontLeaseId, Option<u64>)> = changes
            .leases
            .iter()
            .map(|(id, row)| (*id, row.map(|(_, expiry)| expiry)))
            .collect();
        let keys: Vec<Bytes> = changes.keys.keys().cloned().collect();
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || store.write(&changes)).await;
        let failure = match written {
            Ok(Ok(())) => {
                for (id, expiry) in leases {
                    match expiry {
                        Some(expiry) => self.saved_expiry.insert(id, expiry),
                        None => self.saved_expiry.remove(&id),
                    };
                }
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        // Not lost: the rows are written with the next save that succeeds
        // (the table in memory is the truth until then).
        self.unsaved_leases
            .extend(leases.into_iter().map(|(id, _)| id));
        self.unsaved_keys.extend(keys);
        metrics::counter!("holdfast_etcd_front_save_failures_total").increment(1);
        self.failures += 1;
        if let Some(count) = self.failure_log.due(self.failures, Instant::now()) {
            warn!(
                path = %self.store.path().display(),
                error = %failure,
                failures = count,
                "cannot save the etcd front end's lease table; leases work but would not survive a restart"
            );
        }
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
