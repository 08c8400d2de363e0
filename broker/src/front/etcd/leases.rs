//! The etcd front end's leases: the ids the relay hands out to etcd
//! clients, their TTLs and deadlines, and the keys attached to each.
//!
//! Sans-IO: the wall clock (Unix milliseconds) is passed in, so deadlines
//! survive a relay restart through the saved table and tests need no
//! sleeps. A lease lives as long as its client keeps it alive, whether or
//! not etcd is reachable; the owner task turns expiries and revocations
//! into registry calls that delete the keys upstream.
//!
//! A lease is also tied to the keepalive stream that last renewed it: when
//! that stream is lost with its connection, the lease ends at once rather
//! than a TTL later (a killed client must stop being routed quickly).
//! Streams are not saved: a lease restored after a relay restart is tied
//! to none until its client keeps it alive again, and lives on its TTL.

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A lease id as etcd clients see it (never 0, never negative).
pub type FrontLeaseId = i64;
/// A keepalive stream, numbered by the front end.
pub type KeeperId = u64;

/// Shortest TTL handed out, in seconds (etcd raises short TTLs too).
pub const MIN_TTL_SECONDS: i64 = 2;
/// Longest TTL accepted, in seconds (etcd's `MaxLeaseTTL`).
pub const MAX_TTL_SECONDS: i64 = 9_000_000_000;

/// Why a lease operation was refused; messages follow etcd's where one exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("etcdserver: requested lease not found")]
    NotFound,
    #[error("etcdserver: lease already exists")]
    Exists,
    #[error("etcdserver: too large lease TTL")]
    TtlTooLarge,
    #[error("the relay already holds {max} leases for etcd clients")]
    TooManyLeases { max: usize },
    #[error("lease {lease:x} already holds {max} keys")]
    TooManyKeys { lease: FrontLeaseId, max: usize },
    #[error(
        "`{key}` is held by another lease ({holder:x}); it is free again once that lease ends"
    )]
    HeldByAnotherLease { key: String, holder: FrontLeaseId },
}

/// One lease as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontLease {
    /// The TTL granted, in seconds.
    pub ttl_seconds: i64,
    /// Unix milliseconds after which the lease is gone.
    pub deadline_ms: u64,
    pub keys: BTreeMap<Bytes, Bytes>,
}

/// What `time_to_live` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub remaining_seconds: i64,
    pub granted_seconds: i64,
    pub keys: Vec<Bytes>,
}

/// Every lease and who owns each key.
#[derive(Debug)]
pub struct LeaseTable {
    leases: HashMap<FrontLeaseId, FrontLease>,
    owners: BTreeMap<Bytes, FrontLeaseId>,
    deadlines: BTreeSet<(u64, FrontLeaseId)>,
    /// The keepalive stream that last renewed each lease, if any.
    keepers: HashMap<FrontLeaseId, KeeperId>,
    max_leases: usize,
    max_keys_per_lease: usize,
}

impl LeaseTable {
    pub fn new(max_leases: usize, max_keys_per_lease: usize) -> LeaseTable {
        LeaseTable {
            leases: HashMap::new(),
            owners: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            keepers: HashMap::new(),
            max_leases,
            max_keys_per_lease,
        }
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn key_count(&self) -> usize {
        self.owners.len()
    }

    /// Grants a lease: `requested` if non-zero (and free), otherwise the
    /// first unused id `fresh_id` yields. Returns the id and the TTL.
    pub fn grant(
        &mut self,
        requested: FrontLeaseId,
        ttl_seconds: i64,
        now_ms: u64,
        mut fresh_id: impl FnMut() -> FrontLeaseId,
    ) -> Result<(FrontLeaseId, i64), LeaseError> {
        if ttl_seconds > MAX_TTL_SECONDS {
            return Err(LeaseError::TtlTooLarge);
        }
        if self.leases.len() >= self.max_leases {
            return Err(LeaseError::TooManyLeases {
                max: self.max_leases,
            });
        }
        let id = if requested != 0 {
            if requested < 0 || self.leases.contains_key(&requested) {
                return Err(LeaseError::Exists);
            }
            requested
        } else {
            loop {
                let candidate = fresh_id() & i64::MAX;
                if candidate != 0 && !self.leases.contains_key(&candidate) {
                    break candidate;
                }
            }
        };
        let ttl = ttl_seconds.max(MIN_TTL_SECONDS);
        let deadline_ms = deadline(now_ms, ttl);
        self.leases.insert(
            id,
            FrontLease {
                ttl_seconds: ttl,
                deadline_ms,
                keys: BTreeMap::new(),
            },
        );
        self.deadlines.insert((deadline_ms, id));
        Ok((id, ttl))
    }

    /// Puts back a lease read from the saved table (its deadline as saved).
    /// Returns false, changing nothing, if the id is taken or the table full.
    pub fn restore(&mut self, id: FrontLeaseId, lease: FrontLease) -> bool {
        if id <= 0 || self.leases.contains_key(&id) || self.leases.len() >= self.max_leases {
            return false;
        }
        for key in lease.keys.keys() {
            if let Some(previous) = self.owners.insert(key.clone(), id) {
                if let Some(other) = self.leases.get_mut(&previous) {
                    other.keys.remove(key);
                }
            }
        }
        self.deadlines.insert((lease.deadline_ms, id));
        self.leases.insert(id, lease);
        true
    }

    /// Renews `lease` for a full TTL from `now_ms` on keepalive stream
    /// `keeper`, which it is tied to from now on; returns the TTL.
    pub fn keep_alive(
        &mut self,
        lease: FrontLeaseId,
        keeper: KeeperId,
        now_ms: u64,
    ) -> Result<i64, LeaseError> {
        let entry = self.leases.get_mut(&lease).ok_or(LeaseError::NotFound)?;
        self.deadlines.remove(&(entry.deadline_ms, lease));
        entry.deadline_ms = deadline(now_ms, entry.ttl_seconds);
        self.deadlines.insert((entry.deadline_ms, lease));
        self.keepers.insert(lease, keeper);
        Ok(entry.ttl_seconds)
    }

    /// Keepalive stream `keeper`, which renewed `leases`, was lost with its
    /// connection: removes those of them no other stream has renewed since
    /// and returns them with their keys.
    pub fn keeper_lost(
        &mut self,
        keeper: KeeperId,
        leases: impl IntoIterator<Item = FrontLeaseId>,
    ) -> Vec<(FrontLeaseId, BTreeMap<Bytes, Bytes>)> {
        let mut ended = Vec::new();
        for lease in leases {
            if self.keepers.get(&lease) != Some(&keeper) {
                continue;
            }
            if let Ok(keys) = self.revoke(lease) {
                ended.push((lease, keys));
            }
        }
        ended
    }

    /// Removes `lease`; returns its keys (to be deleted upstream).
    pub fn revoke(&mut self, lease: FrontLeaseId) -> Result<BTreeMap<Bytes, Bytes>, LeaseError> {
        let entry = self.leases.remove(&lease).ok_or(LeaseError::NotFound)?;
        self.keepers.remove(&lease);
        self.deadlines.remove(&(entry.deadline_ms, lease));
        for key in entry.keys.keys() {
            self.owners.remove(key);
        }
        Ok(entry.keys)
    }

    pub fn time_to_live(&self, lease: FrontLeaseId, now_ms: u64) -> Result<LeaseInfo, LeaseError> {
        let entry = self.leases.get(&lease).ok_or(LeaseError::NotFound)?;
        let remaining_ms = entry.deadline_ms.saturating_sub(now_ms);
        Ok(LeaseInfo {
            remaining_seconds: i64::try_from(remaining_ms.div_ceil(1000)).unwrap_or(i64::MAX),
            granted_seconds: entry.ttl_seconds,
            keys: entry.keys.keys().cloned().collect(),
        })
    }

    /// The lease `id`, if the table holds it.
    pub fn lease(&self, id: FrontLeaseId) -> Option<&FrontLease> {
        self.leases.get(&id)
    }

    /// Every lease id, ascending.
    pub fn ids(&self) -> Vec<FrontLeaseId> {
        let mut ids: Vec<FrontLeaseId> = self.leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Attaches `key` = `value` to `lease`. Returns the key's previous
    /// value if `lease` held it. A key another lease holds stays there:
    /// it belongs to that lease until the lease ends.
    pub fn attach(
        &mut self,
        lease: FrontLeaseId,
        key: Bytes,
        value: Bytes,
    ) -> Result<Option<Bytes>, LeaseError> {
        let previous_owner = self.owners.get(&key).copied();
        let entry = self.leases.get_mut(&lease).ok_or(LeaseError::NotFound)?;
        match previous_owner {
            Some(holder) if holder != lease => {
                return Err(LeaseError::HeldByAnotherLease {
                    key: crate::keys::registry::model::quoted_key(&key),
                    holder,
                })
            }
            None if entry.keys.len() >= self.max_keys_per_lease => {
                return Err(LeaseError::TooManyKeys {
                    lease,
                    max: self.max_keys_per_lease,
                })
            }
            _ => {}
        }
        let previous = entry.keys.insert(key.clone(), value);
        self.owners.insert(key, lease);
        Ok(previous)
    }

    /// Removes `key` from whichever lease holds it; returns that lease.
    pub fn detach(&mut self, key: &Bytes) -> Option<FrontLeaseId> {
        let lease = self.owners.remove(key)?;
        if let Some(entry) = self.leases.get_mut(&lease) {
            entry.keys.remove(key);
        }
        Some(lease)
    }

    /// The lease holding `key` and the key's value.
    pub fn get(&self, key: &[u8]) -> Option<(FrontLeaseId, Bytes)> {
        let lease = *self.owners.get(key)?;
        let value = self.leases.get(&lease)?.keys.get(key)?.clone();
        Some((lease, value))
    }

    /// Keys the table holds in etcd's range `[key, range_end)` (an empty
    /// `range_end` is the key alone; `"\0"` is everything from `key` on),
    /// with their values and leases, sorted by key.
    pub fn in_range(&self, key: &[u8], range_end: &[u8]) -> Vec<(Bytes, Bytes, FrontLeaseId)> {
        let start = Bytes::copy_from_slice(key);
        self.owners
            .range(start..)
            .take_while(|(candidate, _)| {
                if range_end.is_empty() {
                    candidate.as_ref() == key
                } else {
                    range_end == [0] || candidate.as_ref() < range_end
                }
            })
            .filter_map(|(candidate, lease)| {
                let value = self.leases.get(lease)?.keys.get(candidate)?.clone();
                Some((candidate.clone(), value, *lease))
            })
            .collect()
    }

    /// When the next lease runs out, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Removes every lease whose deadline passed by `now_ms`; returns them
    /// with their keys.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(FrontLeaseId, BTreeMap<Bytes, Bytes>)> {
        let mut expired = Vec::new();
        while let Some(&(deadline_ms, lease)) = self.deadlines.first() {
            if deadline_ms > now_ms {
                break;
            }
            if let Ok(keys) = self.revoke(lease) {
                expired.push((lease, keys));
            } else {
                self.deadlines.remove(&(deadline_ms, lease));
            }
        }
        expired
    }
}

fn deadline(now_ms: u64, ttl_seconds: i64) -> u64 {
    let ttl_ms = u64::try_from(ttl_seconds).unwrap_or(0).saturating_mul(1000);
    now_ms.saturating_add(ttl_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn table() -> LeaseTable {
        LeaseTable::new(10, 3)
    }

    fn counter() -> impl FnMut() -> FrontLeaseId {
        let mut next = 0;
        move || {
            next += 1;
            next
        }
    }

    #[test]
    fn granted_ids_are_unique_non_zero_and_requested_ones_are_honoured() {
        let mut table = table();
        let mut ids = counter();
        let (first, ttl) = table.grant(0, 30, 0, &mut ids).unwrap();
        let (second, _) = table.grant(0, 30, 0, &mut ids).unwrap();
        assert_ne!(first, 0);
        assert_ne!(first, second);
        assert_eq!(ttl, 30);
        assert_eq!(table.grant(77, 30, 0, &mut ids).unwrap().0, 77);
        assert_eq!(table.grant(77, 30, 0, &mut ids), Err(LeaseError::Exists));
        // A source that yields taken ids or zero is asked again.
        let mut stuck = vec![0, first, 5].into_iter();
        let (fresh, _) = table.grant(0, 30, 0, || stuck.next().unwrap_or(9)).unwrap();
        assert_eq!(fresh, 5);
    }

    #[test]
    fn short_ttls_are_raised_and_huge_ones_refused() {
        let mut table = table();
        assert_eq!(table.grant(0, 0, 0, counter()).unwrap().1, MIN_TTL_SECONDS);
        assert_eq!(
            table.grant(0, MAX_TTL_SECONDS + 1, 0, counter()),
            Err(LeaseError::TtlTooLarge)
        );
    }

    #[test]
    fn the_lease_cap_answers_too_many_leases() {
        let mut table = LeaseTable::new(2, 3);
        let mut ids = counter();
        table.grant(0, 30, 0, &mut ids).unwrap();
        table.grant(0, 30, 0, &mut ids).unwrap();
        assert_eq!(
            table.grant(0, 30, 0, &mut ids),
            Err(LeaseError::TooManyLeases { max: 2 })
        );
    }

    #[test]
    fn keepalive_moves_the_deadline_and_expiry_returns_the_keys() {
        let mut table = table();
        let (lease, _) = table.grant(0, 10, 1_000, counter()).unwrap();
        table.attach(lease, b("k"), b("v")).unwrap();
        assert_eq!(table.next_deadline(), Some(11_000));
        assert!(table.expire(10_999).is_empty());
        assert_eq!(table.keep_alive(lease, 1, 9_000), Ok(10));
        assert!(table.expire(11_000).is_empty(), "renewed");
        let expired = table.expire(19_000);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, lease);
        assert_eq!(expired[0].1.get(&b("k")), Some(&b("v")));
        assert_eq!(
            table.keep_alive(lease, 1, 19_000),
            Err(LeaseError::NotFound)
        );
        assert_eq!(table.get(b"k"), None);
        assert_eq!(table.next_deadline(), None);
    }

    #[test]
    fn time_to_live_rounds_up_and_lists_keys() {
        let mut table = table();
        let (lease, _) = table.grant(0, 30, 0, counter()).unwrap();
        table.attach(lease, b("a"), b("1")).unwrap();
        let info = table.time_to_live(lease, 10_500).unwrap();
        assert_eq!(info.remaining_seconds, 20);
        assert_eq!(info.granted_seconds, 30);
        assert_eq!(info.keys, vec![b("a")]);
        assert_eq!(table.time_to_live(99, 0), Err(LeaseError::NotFound));
    }

    #[test]
    fn a_key_stays_with_its_lease_until_that_lease_ends() {
        let mut table = table();
        let mut ids = counter();
        let (one, _) = table.grant(0, 30, 0, &mut ids).unwrap();
        let (two, _) = table.grant(0, 30, 0, &mut ids).unwrap();
        assert_eq!(table.attach(one, b("k"), b("1")).unwrap(), None);
        assert_eq!(
            table.attach(two, b("k"), b("2")),
            Err(LeaseError::HeldByAnotherLease {
                key: "k".to_string(),
                holder: one
            })
        );
        assert_eq!(table.attach(one, b("k"), b("3")).unwrap(), Some(b("1")));
        assert_eq!(table.revoke(one).unwrap().get(&b("k")), Some(&b("3")));
        assert_eq!(table.attach(two, b("k"), b("2")).unwrap(), None);
        assert_eq!(table.get(b"k"), Some((two, b("2"))));
        assert_eq!(table.detach(&b("k")), Some(two));
        assert_eq!(table.key_count(), 0);
    }

    #[test]
    fn keys_per_lease_are_capped_but_updates_pass() {
        let mut table = LeaseTable::new(10, 2);
        let (lease, _) = table.grant(0, 30, 0, counter()).unwrap();
        table.attach(lease, b("a"), b("1")).unwrap();
        table.attach(lease, b("b"), b("1")).unwrap();
        assert_eq!(
            table.attach(lease, b("c"), b("1")),
            Err(LeaseError::TooManyKeys { lease, max: 2 })
        );
        assert!(table.attach(lease, b("a"), b("2")).is_ok());
        assert_eq!(
            table.attach(12345, b("x"), b("1")),
            Err(LeaseError::NotFound)
        );
    }

    #[test]
    fn ranges_follow_etcd_conventions() {
        let mut table = table();
        let (lease, _) = table.grant(0, 30, 0, counter()).unwrap();
        for key in ["a/1", "a/2", "b/1"] {
            table.attach(lease, b(key), b("v")).unwrap();
        }
        let keys = |found: Vec<(Bytes, Bytes, FrontLeaseId)>| -> Vec<Bytes> {
            found.into_iter().map(|(key, _, _)| key).collect()
        };
        assert_eq!(keys(table.in_range(b"a/1", b"")), vec![b("a/1")]);
        assert_eq!(keys(table.in_range(b"a/", b"a0")), vec![b("a/1"), b("a/2")]);
        assert_eq!(keys(table.in_range(b"a/2", b"\0")).len(), 2);
        assert!(table.in_range(b"c", b"").is_empty());
    }

    #[test]
    fn a_lost_keeper_ends_only_the_leases_it_renewed_last() {
        let mut table = table();
        let mut ids = counter();
        let (mine, _) = table.grant(0, 30, 0, &mut ids).unwrap();
        let (moved, _) = table.grant(0, 30, 0, &mut ids).unwrap();
        let (other, _) = table.grant(0, 30, 0, &mut ids).unwrap();
        table.attach(mine, b("k"), b("v")).unwrap();
        table.keep_alive(mine, 7, 1_000).unwrap();
        table.keep_alive(moved, 7, 1_000).unwrap();
        // The client reconnected and renews `moved` on a newer stream.
        table.keep_alive(moved, 8, 2_000).unwrap();
        table.keep_alive(other, 9, 1_000).unwrap();
        let ended = table.keeper_lost(7, [mine, moved, 12345]);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].0, mine);
        assert_eq!(ended[0].1.get(&b("k")), Some(&b("v")));
        assert_eq!(table.ids(), {
            let mut left = vec![moved, other];
            left.sort_unstable();
            left
        });
        assert!(table.keeper_lost(7, [mine]).is_empty(), "already gone");
    }

    #[test]
    fn a_restored_lease_has_no_keeper_until_renewed() {
        let mut table = table();
        let lease = FrontLease {
            ttl_seconds: 30,
            deadline_ms: 5_000,
            keys: BTreeMap::new(),
        };
        assert!(table.restore(42, lease));
        assert!(table.keeper_lost(1, [42]).is_empty());
        table.keep_alive(42, 2, 1_000).unwrap();
        assert_eq!(table.keeper_lost(2, [42]).len(), 1);
    }

    #[test]
    fn restored_leases_keep_their_deadline_and_keys() {
        let mut table = table();
        let lease = FrontLease {
            ttl_seconds: 30,
            deadline_ms: 5_000,
            keys: [(b("k"), b("v"))].into_iter().collect(),
        };
        assert!(table.restore(42, lease.clone()));
        assert!(!table.restore(42, lease), "the id is taken");
        assert_eq!(table.get(b"k"), Some((42, b("v"))));
        assert_eq!(table.next_deadline(), Some(5_000));
        assert_eq!(table.expire(5_000).len(), 1);
    }
}
