//! What every session wants in etcd and what is left to do to get it there:
//! the registry's bookkeeping and decisions, without I/O.
//!
//! The model is the desired state (keys per session, each session's lease)
//! plus a queue of keys whose etcd copy may differ from it. The queue is
//! coalesced per key (only a key's latest value matters) and ordered by each
//! key's latest change, so etcd sees changes in the order clients made them.
//! The task around the model asks it for the next step (revoke leases, grant
//! leases, apply a batch of changes) and reports the outcome back; while
//! etcd is down, nothing is asked and everything stays queued.
//!
//! A key belongs to the live session that registered it: another session's
//! registration (or removal) of it is refused as a [`RegisterError::Conflict`]
//! until that session ends, except for a new session of the same client
//! process (a reconnect the relay has not noticed yet) and for a session an
//! access rule lets take the key over.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};

pub type SessionId = u64;
pub type LeaseId = i64;

/// Most operations in one etcd transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// Most bytes of keys and values in one etcd transaction. etcd refuses a
/// request over its `--max-request-bytes` (1.5 MiB by default), and a batch
/// it refuses would be retried, and refused, forever; this leaves room for
/// the encoding around the keys and values.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Most bytes of key and value one registration may have: it must fit in a
/// transaction of its own.
pub const MAX_REGISTRATION_BYTES: usize = MAX_TXN_BYTES;

/// Most bytes of a key quoted in a message: a key may have 64 KiB, a
/// message carries at most 64 KiB in all.
const QUOTED_KEY_BYTES: usize = 256;

/// `key` for a message or a log line: lossy UTF-8, cut after
/// [`QUOTED_KEY_BYTES`] bytes.
pub fn quoted_key(key: &[u8]) -> String {
    match key.get(..QUOTED_KEY_BYTES) {
        Some(start) if start.len() < key.len() => {
            format!("{}...", String::from_utf8_lossy(start))
        }
        _ => String::from_utf8_lossy(key).into_owned(),
    }
}

/// One key's change, as it goes to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        key: Bytes,
        value: Bytes,
        lease: LeaseId,
    },
    Delete {
        key: Bytes,
    },
}

impl Change {
    pub fn key(&self) -> &Bytes {
        match self {
            Change::Put { key, .. } | Change::Delete { key } => key,
        }
    }
}

/// A client process as far as key ownership cares: the instance id it
/// claims in HELLO and the identity its transport proved. A new session of
/// the same process may take over the keys of its older session, which
/// may not have been declared dead yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub instance_id: u64,
    pub identity: String,
}

/// Who asks to register or remove a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant {
    pub session: SessionId,
    /// `None` for owners that are not client sessions (the etcd front
    /// end's leases): they never take over by process.
    pub process: Option<Process>,
    /// An access rule lets it take this key from another live session.
    pub may_take_over: bool,
}

impl Claimant {
    /// An owner that takes no key from anyone.
    pub fn plain(session: SessionId) -> Claimant {
        Claimant {
            session,
            process: None,
            may_take_over: false,
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("`{key}` is held by another live session ({holder}); it is free again once that session ends (an [access] rule's `takeover` may allow taking it over)")]
    Conflict { key: String, holder: SessionId },
    #[error("this session already holds {max} registrations (etcd.max_registrations_per_session)")]
    SessionLimit { max: usize },
    #[error("the relay already holds {max} registrations and removals etcd has not confirmed (etcd.max_registrations)")]
    RelayLimit { max: usize },
    #[error("a registration's key and value may have at most {max} bytes together (etcd refuses larger requests); this one has {bytes}")]
    TooLarge { bytes: usize, max: usize },
}

/// What etcd holds for one key, as read by an audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub value: Bytes,
    pub lease: LeaseId,
}

#[derive(Debug, Default)]
struct SessionEntry {
    keys: BTreeMap<Bytes, Bytes>,
    lease: Option<LeaseId>,
    process: Option<Process>,
}

/// Keys waiting to be written to etcd, coalesced and in order of their
/// latest change.
#[derive(Debug, Default)]
struct PendingKeys {
    order: BTreeMap<u64, Bytes>,
    position: HashMap<Bytes, u64>,
    next: u64,
}

impl PendingKeys {
    fn mark(&mut self, key: Bytes) {
        if let Some(old) = self.position.remove(&key) {
            self.order.remove(&old);
        }
        self.order.insert(self.next, key.clone());
        self.position.insert(key, self.next);
        self.next += 1;
    }

    fn remove(&mut self, key: &Bytes) {
        if let Some(old) = self.position.remove(key) {
            self.order.remove(&old);
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn contains(&self, key: &Bytes) -> bool {
        self.position.contains_key(key)
    }

    fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.order.values()
    }
}

/// The registry's desired state and pending work.
#[derive(Debug)]
pub struct Registry {
    sessions: HashMap<SessionId, SessionEntry>,
    /// Ordered, so that the etcd front end can ask who holds keys in a range.
    owners: BTreeMap<Bytes, SessionId>,
    pending: PendingKeys,
    /// Queued keys no session owns: deletes etcd has not confirmed. They
    /// count against `max_total` with the registrations, so registering
    /// and deregistering new keys while etcd is down cannot queue deletes
    /// without bound.
    unowned_pending: usize,
    /// Leases of closed sessions: revoking deletes their keys.
    revocations: Vec<LeaseId>,
    max_total: usize,
    max_per_session: usize,
}

impl Registry {
    pub fn new(max_total: usize, max_per_session: usize) -> Registry {
        Registry {
            sessions: HashMap::new(),
            owners: BTreeMap::new(),
            pending: PendingKeys::default(),
            unowned_pending: 0,
            revocations: Vec::new(),
            max_total,
            max_per_session,
        }
    }

    /// Live registrations across all sessions.
    pub fn registrations(&self) -> usize {
        self.owners.len()
    }

    /// Changes not yet confirmed by etcd (registrations and removals).
    pub fn pending_changes(&self) -> usize {
        self.pending.len()
    }

    /// Sessions holding at least one key.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Bytes of `key` and the value registered for it (0 for the value if
    /// none is).
    pub fn registered_bytes(&self, key: &Bytes) -> usize {
        key.len() + self.value_len(key)
    }

    fn value_len(&self, key: &Bytes) -> usize {
        self.owners
            .get(key)
            .and_then(|session| self.sessions.get(session))
            .and_then(|entry| entry.keys.get(key))
            .map_or(0, Bytes::len)
    }

    /// Whether `key`'s latest change still has to reach etcd.
    pub fn is_pending(&self, key: &Bytes) -> bool {
        self.pending.contains(key)
    }

    /// Sets `key` to `value` for the claimant's session. A key another live
    /// session holds is refused ([`RegisterError::Conflict`]) unless the
    /// claimant may take it over: then it moves to the claimant.
    pub fn register(
        &mut self,
        claimant: &Claimant,
        key: Bytes,
        value: Bytes,
    ) -> Result<(), RegisterError> {
        let session = claimant.session;
        let bytes = key.len() + value.len();
        if bytes > MAX_REGISTRATION_BYTES {
            return Err(RegisterError::TooLarge {
                bytes,
                max: MAX_REGISTRATION_BYTES,
            });
        }
        let owner = self.owners.get(&key).copied();
        if let Some(holder) = owner.filter(|holder| *holder != session) {
            if !self.may_take_from(claimant, holder) {
                return Err(RegisterError::Conflict {
                    key: quoted_key(&key),
                    holder,
                });
            }
        }
        if owner != Some(session) {
            let held = self
                .sessions
                .get(&session)
                .map_or(0, |entry| entry.keys.len());
            if held >= self.max_per_session {
                return Err(RegisterError::SessionLimit {
                    max: self.max_per_session,
                });
            }
            // Re-registering a key whose delete is queued replaces that
            // delete, so it needs no room of its own.
            if owner.is_none()
                && !self.pending.contains(&key)
                && self.owners.len() + self.unowned_pending >= self.max_total
            {
                return Err(RegisterError::RelayLimit {
                    max: self.max_total,
                });
            }
        }
        if let Some(previous) = owner.filter(|previous| *previous != session) {
            self.forget_key(previous, &key);
        }
        let entry = self.sessions.entry(session).or_default();
        if entry.process.is_none() {
            entry.process = claimant.process.clone();
        }
        if entry.keys.get(&key) == Some(&value) && owner == Some(session) {
            return Ok(());
        }
        entry.keys.insert(key.clone(), value);
        self.set_owner(key.clone(), session);
        self.mark_pending(key);
        Ok(())
    }

    /// Removes `key` if the claimant's session holds it; returns whether
    /// it did. A key another live session holds is refused as a conflict,
    /// unless the claimant could take it over (it is then removed).
    pub fn deregister(&mut self, claimant: &Claimant, key: &Bytes) -> Result<bool, RegisterError> {
        let Some(holder) = self.owners.get(key).copied() else {
            return Ok(false);
        };
        if holder != claimant.session && !self.may_take_from(claimant, holder) {
            return Err(RegisterError::Conflict {
                key: quoted_key(key),
                holder,
            });
        }
        self.clear_owner(key);
        self.forget_key(holder, key);
        self.mark_pending(key.clone());
        Ok(true)
    }

    /// Whether `claimant` may take a key from live session `holder`: an
    /// access rule says so, or both are sessions of the same process.
    fn may_take_from(&self, claimant: &Claimant, holder: SessionId) -> bool {
        if claimant.may_take_over {
            return true;
        }
        let holder_process = self
            .sessions
            .get(&holder)
            .and_then(|entry| entry.process.as_ref());
        claimant.process.is_some() && claimant.process.as_ref() == holder_process
    }

    /// The first key of etcd's range `[key, range_end)` (an empty
    /// `range_end` is `key` alone, `"\0"` every key from `key` on) that a
    /// live owner `counts` holds, with that owner.
    pub fn first_held(
        &self,
        key: &[u8],
        range_end: &[u8],
        counts: impl Fn(SessionId) -> bool,
    ) -> Option<(Bytes, SessionId)> {
        self.owners
            .range(Bytes::copy_from_slice(key)..)
            .take_while(|(candidate, _)| match range_end {
                [] => candidate.as_ref() == key,
                [0] => true,
                end => candidate.as_ref() < end,
            })
            .find(|(_, owner)| counts(**owner))
            .map(|(key, owner)| (key.clone(), *owner))
    }

    fn forget_key(&mut self, session: SessionId, key: &Bytes) {
        if let Some(entry) = self.sessions.get_mut(&session) {
            entry.keys.remove(key);
            if entry.keys.is_empty() {
                // A session without keys needs no lease; keep revoking it
                // cheap by doing it now rather than at close.
                if let Some(lease) = entry.lease.take() {
                    self.revocations.push(lease);
                }
                self.sessions.remove(&session);
            }
        }
    }

    /// The session ended: its keys go with its lease. Returns how many keys
    /// it held.
    pub fn session_closed(&mut self, session: SessionId) -> usize {
        let Some(entry) = self.sessions.remove(&session) else {
            return 0;
        };
        for key in entry.keys.keys() {
            self.clear_owner(key);
            match entry.lease {
                // Revoking the lease deletes the key.
                Some(_) => self.unmark_pending(key),
                // Never written under a lease of ours; delete it explicitly
                // in case an earlier relay or session left it behind.
                None => self.mark_pending(key.clone()),
            }
        }
        if let Some(lease) = entry.lease {
            self.revocations.push(lease);
        }
        entry.keys.len()
    }

    /// Leases to revoke before anything else is written.
    pub fn revocations(&self) -> &[LeaseId] {
        &self.revocations
    }

    /// The first `count` revocations are done (or the leases were gone).
    pub fn revoked(&mut self, count: usize) {
        self.revocations.drain(..count.min(self.revocations.len()));
    }

    /// Sessions that hold keys but no lease yet.
    pub fn sessions_needing_lease(&self) -> Vec<SessionId> {
        let mut sessions: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, entry)| entry.lease.is_none())
            .map(|(session, _)| *session)
            .collect();
        sessions.sort_unstable();
        sessions
    }

    /// etcd granted `lease` for `session`. Returns whether the session
    /// keeps it; a lease granted for a session that is gone by now is
    /// queued for revocation instead.
    pub fn lease_granted(&mut self, session: SessionId, lease: LeaseId) -> bool {
        let Some(entry) = self.sessions.get_mut(&session) else {
            self.revocations.push(lease);
            return false;
        };
        if let Some(old) = entry.lease.replace(lease) {
            self.revocations.push(old);
        }
        true
    }

    /// Every session's lease, for an audit.
    pub fn leases(&self) -> Vec<(SessionId, LeaseId)> {
        self.sessions
            .iter()
            .filter_map(|(session, entry)| entry.lease.map(|lease| (*session, lease)))
            .collect()
    }

    /// etcd no longer has `lease` (expired, or etcd lost its data): the
    /// session needs a new one and every key must be written again.
    /// Returns whether `lease` was still the session's.
    pub fn lease_lost(&mut self, session: SessionId, lease: LeaseId) -> bool {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return false;
        };
        if entry.lease != Some(lease) {
            return false;
        }
        entry.lease = None;
        let keys: Vec<Bytes> = entry.keys.keys().cloned().collect();
        for key in keys {
            self.mark_pending(key);
        }
        true
    }

    /// The next changes to write, oldest first: at most `max`, and at most
    /// `max_bytes` of keys and values unless the first change alone is
    /// larger. Keys whose session has no lease yet wait (behind them, order
    /// is still kept per key, which is all etcd can observe).
    pub fn next_changes(&self, max: usize, max_bytes: usize) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut bytes = 0;
        for key in self.pending.iter() {
            if changes.len() >= max {
                break;
            }
            let size = self.registered_bytes(key);
            if !changes.is_empty() && bytes + size > max_bytes {
                break;
            }
            match self.owners.get(key) {
                None => changes.push(Change::Delete { key: key.clone() }),
                Some(session) => {
                    let Some(entry) = self.sessions.get(session) else {
                        continue;
                    };
                    let (Some(lease), Some(value)) = (entry.lease, entry.keys.get(key)) else {
                        continue;
                    };
                    changes.push(Change::Put {
                        key: key.clone(),
                        value: value.clone(),
                        lease,
                    });
                }
            }
            bytes += size;
        }
        changes
    }

    /// etcd applied `changes`; keys changed again since stay queued.
    pub fn applied(&mut self, changes: &[Change]) {
        for change in changes {
            if self.current_change(change.key()).as_ref() == Some(change) {
                self.unmark_pending(change.key());
            }
        }
    }

    // Every change to `owners` and `pending` goes through these four, which
    // keep `unowned_pending` in step.

    fn mark_pending(&mut self, key: Bytes) {
        if !self.pending.contains(&key) && !self.owners.contains_key(&key) {
            self.unowned_pending += 1;
        }
        self.pending.mark(key);
    }

    fn unmark_pending(&mut self, key: &Bytes) {
        if self.pending.contains(key) && !self.owners.contains_key(key) {
            self.unowned_pending = self.unowned_pending.saturating_sub(1);
        }
        self.pending.remove(key);
    }

    fn set_owner(&mut self, key: Bytes, session: SessionId) {
        let queued = self.pending.contains(&key);
        if self.owners.insert(key, session).is_none() && queued {
            self.unowned_pending = self.unowned_pending.saturating_sub(1);
        }
    }

    fn clear_owner(&mut self, key: &Bytes) {
        if self.owners.remove(key).is_some() && self.pending.contains(key) {
            self.unowned_pending += 1;
        }
    }

    /// What the key's change would be now.
    fn current_change(&self, key: &Bytes) -> Option<Change> {
        match self.owners.get(key) {
            None => Some(Change::Delete { key: key.clone() }),
            Some(session) => {
                let entry = self.sessions.get(session)?;
                Some(Change::Put {
                    key: key.clone(),
                    value: entry.keys.get(key)?.clone(),
                    lease: entry.lease?,
                })
            }
        }
    }

    /// Every live key with the value and lease etcd should hold, for an
    /// audit. Keys still queued are skipped: they are being written anyway.
    pub fn audit_targets(&self) -> Vec<Bytes> {
        let mut keys: Vec<Bytes> = self
            .owners
            .keys()
            .filter(|key| !self.pending.contains(key))
            .cloned()
            .collect();
        keys.sort_unstable();
        keys
    }

    /// An audit read `observed` for `key`; queues the key again if etcd
    /// differs from what its session wants. Returns whether it did.
    pub fn audited(&mut self, key: &Bytes, observed: Option<&Observed>) -> bool {
        let Some(Change::Put { value, lease, .. }) = self.current_change(key) else {
            return false;
        };
        let matches =
            observed.is_some_and(|observed| observed.value == value && observed.lease == lease);
        if !matches && !self.pending.contains(key) {
            self.mark_pending(key.clone());
            return true;
        }
        false
    }

    /// Whether anything is left to do with etcd.
    #[cfg(test)]
    fn has_work(&self) -> bool {
        !self.revocations.is_empty()
            || self.sessions.values().any(|entry| entry.lease.is_none())
            || !self.next_changes(1, MAX_TXN_BYTES).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Bytes {
        Bytes::copy_from_slice(name.as_bytes())
    }

    fn registry() -> Registry {
        Registry::new(1000, 100)
    }

    fn process(instance_id: u64, identity: &str) -> Option<Process> {
        Some(Process {
            instance_id,
            identity: identity.to_string(),
        })
    }

    #[test]
    fn a_key_held_by_a_live_session_is_refused_to_another_until_it_ends() {
        let mut registry = registry();
        let worker = Claimant {
            process: process(0xa, "uid=1000"),
            ..Claimant::plain(1)
        };
        let intruder = Claimant {
            process: process(0xb, "uid=1000"),
            ..Claimant::plain(2)
        };
        registry.register(&worker, key("k"), key("worker")).unwrap();
        registry.lease_granted(1, 5);
        registry.applied(&registry.next_changes(10, MAX_TXN_BYTES));
        let conflict = RegisterError::Conflict {
            key: "k".to_string(),
            holder: 1,
        };
        assert_eq!(
            registry.register(&intruder, key("k"), key("intruder")),
            Err(conflict.clone())
        );
        assert_eq!(registry.deregister(&intruder, &key("k")), Err(conflict));
        assert!(!registry.has_work(), "nothing changed for etcd");
        assert_eq!(registry.sessions(), 1, "the intruder holds nothing");
        assert_eq!(registry.session_closed(2), 0);
        assert!(registry.revocations().is_empty());

        // Once the worker's session ends, the key is free.
        registry.session_closed(1);
        registry.revoked(1);
        registry.register(&intruder, key("k"), key("next")).unwrap();
        assert_eq!(
            registry.first_held(b"k", b"", |_| true),
            Some((key("k"), 2))
        );
    }

    #[test]
    fn a_long_key_is_cut_in_messages() {
        assert_eq!(quoted_key(b"short"), "short");
        let long = vec![b'k'; 70_000];
        let quoted = quoted_key(&long);
        assert_eq!(quoted.len(), QUOTED_KEY_BYTES + 3);
        assert!(quoted.ends_with("..."));
    }

    #[test]
    fn a_new_session_of_the_same_process_takes_its_keys_over() {
        let mut registry = registry();
        let old = Claimant {
            process: process(0xa, "uid=1000"),
            ..Claimant::plain(1)
        };
        let reconnected = Claimant {
            session: 2,
            ..old.clone()
        };
        let same_id_other_user = Claimant {
            process: process(0xa, "uid=1001"),
            ..Claimant::plain(3)
        };
        registry.register(&old, key("k"), key("1")).unwrap();
        registry.lease_granted(1, 5);
        // An instance id read from a key proves nothing by itself.
        assert!(matches!(
            registry.register(&same_id_other_user, key("k"), key("x")),
            Err(RegisterError::Conflict { holder: 1, .. })
        ));
        registry.register(&reconnected, key("k"), key("2")).unwrap();
        registry.lease_granted(2, 6);
        // The old session's end (its liveness timeout) leaves the key.
        assert_eq!(registry.session_closed(1), 0);
        assert_eq!(
            registry.next_changes(10, MAX_TXN_BYTES),
            vec![Change::Put {
                key: key("k"),
                value: key("2"),
                lease: 6
            }]
        );
        // Owners that are not client sessions never match by process.
        registry
            .register(&Claimant::plain(7), key("front"), key("1"))
            .unwrap();
        assert!(registry
            .register(&Claimant::plain(8), key("front"), key("2"))
            .is_err());
    }

    #[test]
    fn the_holders_of_a_range_are_found_by_owner() {
        let mut registry = registry();
        for (session, name) in [(1, "a/1"), (2, "a/2"), (1, "b/1")] {
            registry
                .register(&Claimant::plain(session), key(name), key("v"))
                .unwrap();
        }
        assert_eq!(
            registry.first_held(b"a/", b"a0", |_| true),
            Some((key("a/1"), 1))
        );
        assert_eq!(
            registry.first_held(b"a/", b"a0", |owner| owner == 2),
            Some((key("a/2"), 2))
        );
        assert_eq!(
            registry.first_held(b"a/", b"", |_| true),
            None,
            "the key alone"
        );
        assert_eq!(
            registry.first_held(b"b/1", b"", |_| true),
            Some((key("b/1"), 1))
        );
        assert_eq!(
            registry.first_held(b"a/2", b"\0", |owner| owner == 1),
            Some((key("b/1"), 1))
        );
        assert_eq!(registry.first_held(b"c", b"\0", |_| true), None);
    }

    #[test]
    fn a_key_waits_for_its_session_lease_then_is_put() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        assert!(registry.next_changes(10, MAX_TXN_BYTES).is_empty());
        assert_eq!(registry.sessions_needing_lease(), vec![1]);
        assert!(registry.lease_granted(1, 77));
        let changes = registry.next_changes(10, MAX_TXN_BYTES);
        assert_eq!(
            changes,
            vec![Change::Put {
                key: key("a"),
                value: key("1"),
                lease: 77
            }]
        );
        registry.applied(&changes);
        assert!(!registry.has_work());
        assert_eq!(registry.registrations(), 1);
        assert_eq!(registry.pending_changes(), 0);
    }

    #[test]
    fn changes_are_coalesced_per_key_and_ordered_by_latest_change() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry.lease_granted(1, 5);
        registry
            .register(&Claimant::plain(1), key("b"), key("1"))
            .unwrap();
        registry
            .register(&Claimant::plain(1), key("a"), key("2"))
            .unwrap();
        let changes = registry.next_changes(10, MAX_TXN_BYTES);
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].key(), &key("b"));
        assert_eq!(
            changes[1],
            Change::Put {
                key: key("a"),
                value: key("2"),
                lease: 5
            }
        );
    }

    #[test]
    fn a_change_made_while_its_write_was_in_flight_stays_queued() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry.lease_granted(1, 5);
        let in_flight = registry.next_changes(10, MAX_TXN_BYTES);
        registry
            .register(&Claimant::plain(1), key("a"), key("2"))
            .unwrap();
        registry.applied(&in_flight);
        assert!(registry.is_pending(&key("a")));
        assert_eq!(
            registry.next_changes(10, MAX_TXN_BYTES),
            vec![Change::Put {
                key: key("a"),
                value: key("2"),
                lease: 5
            }]
        );
    }

    #[test]
    fn deregistering_queues_a_delete_and_releases_the_lease_of_an_empty_session() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry.lease_granted(1, 5);
        registry.applied(&registry.next_changes(10, MAX_TXN_BYTES));
        assert!(registry.deregister(&Claimant::plain(1), &key("a")).unwrap());
        assert_eq!(
            registry.next_changes(10, MAX_TXN_BYTES),
            vec![Change::Delete { key: key("a") }]
        );
        assert_eq!(registry.revocations(), &[5]);
        assert!(
            !registry.deregister(&Claimant::plain(1), &key("a")).unwrap(),
            "second time is a no-op"
        );
        assert_eq!(registry.registrations(), 0);
    }

    #[test]
    fn a_closed_session_is_removed_by_revoking_its_lease() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry
            .register(&Claimant::plain(1), key("b"), key("1"))
            .unwrap();
        registry.lease_granted(1, 5);
        assert_eq!(registry.session_closed(1), 2);
        assert_eq!(registry.revocations(), &[5]);
        assert!(
            registry.next_changes(10, MAX_TXN_BYTES).is_empty(),
            "revoke deletes the keys"
        );
        registry.revoked(1);
        assert!(!registry.has_work());
    }

    #[test]
    fn a_session_closed_before_its_lease_deletes_its_keys_explicitly() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry.session_closed(1);
        assert_eq!(
            registry.next_changes(10, MAX_TXN_BYTES),
            vec![Change::Delete { key: key("a") }]
        );
        assert!(registry.revocations().is_empty());
    }

    #[test]
    fn a_lease_granted_after_its_session_closed_is_revoked() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry.session_closed(1);
        assert!(!registry.lease_granted(1, 9));
        assert_eq!(registry.revocations(), &[9]);
    }

    #[test]
    fn a_key_taken_over_stays_when_its_old_owner_closes() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("old"))
            .unwrap();
        registry.lease_granted(1, 5);
        let taker = Claimant {
            may_take_over: true,
            ..Claimant::plain(2)
        };
        registry.register(&taker, key("a"), key("new")).unwrap();
        registry.lease_granted(2, 6);
        registry.session_closed(1);
        assert_eq!(
            registry.next_changes(10, MAX_TXN_BYTES),
            vec![Change::Put {
                key: key("a"),
                value: key("new"),
                lease: 6
            }]
        );
        assert_eq!(registry.registrations(), 1);
    }

    #[test]
    fn a_lost_lease_requeues_every_key_of_its_session() {
        let mut registry = registry();
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry
            .register(&Claimant::plain(1), key("b"), key("2"))
            .unwrap();
        registry.lease_granted(1, 5);
        registry.applied(&registry.next_changes(10, MAX_TXN_BYTES));
        assert!(!registry.lease_lost(1, 4), "a stale report is ignored");
        assert!(registry.lease_lost(1, 5));
        assert_eq!(registry.sessions_needing_lease(), vec![1]);
        registry.lease_granted(1, 8);
        let changes = registry.next_changes(10, MAX_TXN_BYTES);
        assert_eq!(changes.len(), 2);
        assert!(changes
            .iter()
            .all(|change| matches!(change, Change::Put { lease: 8, .. })));
    }

    #[test]
    fn an_audit_requeues_missing_or_changed_keys_only() {
        let mut registry = registry();
        for name in ["a", "b", "c"] {
            registry
                .register(&Claimant::plain(1), key(name), key("v"))
                .unwrap();
        }
        registry.lease_granted(1, 5);
        registry.applied(&registry.next_changes(10, MAX_TXN_BYTES));
        assert_eq!(registry.audit_targets().len(), 3);
        let good = Observed {
            value: key("v"),
            lease: 5,
        };
        let changed = Observed {
            value: key("tampered"),
            lease: 5,
        };
        assert!(!registry.audited(&key("a"), Some(&good)));
        assert!(registry.audited(&key("b"), Some(&changed)));
        assert!(registry.audited(&key("c"), None));
        let requeued: Vec<Bytes> = registry
            .next_changes(10, MAX_TXN_BYTES)
            .iter()
            .map(|change| change.key().clone())
            .collect();
        assert_eq!(requeued, vec![key("b"), key("c")]);
    }

    #[test]
    fn limits_refuse_new_keys_but_allow_updates() {
        let mut registry = Registry::new(3, 2);
        registry
            .register(&Claimant::plain(1), key("a"), key("1"))
            .unwrap();
        registry
            .register(&Claimant::plain(1), key("b"), key("1"))
            .unwrap();
        assert_eq!(
            registry.register(&Claimant::plain(1), key("c"), key("1")),
            Err(RegisterError::SessionLimit { max: 2 })
        );
        registry
            .register(&Claimant::plain(1), key("a"), key("2"))
            .unwrap();
        registry
            .register(&Claimant::plain(2), key("c"), key("1"))
            .unwrap();
        assert_eq!(
            registry.register(&Claimant::plain(3), key("d"), key("1")),
            Err(RegisterError::RelayLimit { max: 3 })
        );
    }

    #[test]
    fn a_batch_of_changes_stays_within_what_etcd_takes_in_one_request() {
        let mut registry = Registry::new(1000, 1000);
        let value = Bytes::from(vec![b'v'; 300 * 1024]);
        for name in ["a", "b", "c", "d", "e"] {
            registry
                .register(&Claimant::plain(1), key(name), value.clone())
                .unwrap();
        }
        registry.lease_granted(1, 7);
        let mut batches = Vec::new();
        while registry.pending_changes() > 0 {
            let changes = registry.next_changes(MAX_TXN_OPS, MAX_TXN_BYTES);
            batches.push(changes.len());
            registry.applied(&changes);
        }
        // Three values of 300 KiB fit in 1 MiB, four do not.
        assert_eq!(batches, [3, 2]);

        let too_large = Bytes::from(vec![b'v'; MAX_REGISTRATION_BYTES]);
        assert_eq!(
            registry.register(&Claimant::plain(1), key("huge"), too_large),
            Err(RegisterError::TooLarge {
                bytes: MAX_REGISTRATION_BYTES + 4,
                max: MAX_REGISTRATION_BYTES
            })
        );
        assert_eq!(registry.registrations(), 5, "the refused key is not held");
    }

    #[test]
    fn removals_etcd_has_not_confirmed_count_against_the_relay_limit() {
        // etcd is down throughout: nothing is applied.
        let mut registry = Registry::new(3, 100);
        for name in ["a", "b", "c"] {
            registry
                .register(&Claimant::plain(1), key(name), key("1"))
                .unwrap();
        }
        assert!(registry.deregister(&Claimant::plain(1), &key("a")).unwrap());
        assert!(registry.deregister(&Claimant::plain(1), &key("b")).unwrap());
        assert_eq!(registry.registrations(), 1);
        assert_eq!(
            registry.register(&Claimant::plain(1), key("d"), key("1")),
            Err(RegisterError::RelayLimit { max: 3 }),
            "two deletes and a registration are queued"
        );
        // Registering a key again replaces its queued delete.
        registry
            .register(&Claimant::plain(1), key("a"), key("2"))
            .unwrap();
        assert_eq!(registry.pending_changes(), 3);

        // Once etcd has the delete, its room is free again.
        registry.lease_granted(1, 9);
        let changes = registry.next_changes(10, MAX_TXN_BYTES);
        assert!(changes.contains(&Change::Delete { key: key("b") }));
        registry.applied(&changes);
        registry
            .register(&Claimant::plain(1), key("d"), key("1"))
            .unwrap();
    }

    #[test]
    fn the_count_of_queued_deletes_stays_in_step_with_the_queue() {
        let recount = |registry: &Registry| {
            registry
                .pending
                .iter()
                .filter(|key| !registry.owners.contains_key(*key))
                .count()
        };
        let mut registry = Registry::new(1000, 1000);
        // A fixed pseudo-random walk over every operation that moves a key
        // in or out of the queue or changes its owner.
        let mut state = 0x2545_f491_u64;
        for step in 0..5000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let session = state % 4;
            let name = key(&format!("k{}", (state >> 8) % 12));
            let claimant = Claimant {
                may_take_over: (state >> 24) % 2 == 0,
                ..Claimant::plain(session)
            };
            match (state >> 16) % 12 {
                0..=3 => {
                    let _ = registry.register(&claimant, name, key("v"));
                }
                4..=6 => {
                    let _ = registry.deregister(&claimant, &name);
                }
                7 => {
                    registry.session_closed(session);
                }
                8 | 9 => {
                    registry.lease_granted(session, step);
                }
                10 => {
                    let changes = registry.next_changes(2, MAX_TXN_BYTES);
                    registry.applied(&changes);
                }
                _ => {
                    registry.lease_lost(session, step - 1);
                }
            }
            assert_eq!(registry.unowned_pending, recount(&registry), "step {step}");
        }
    }
}
