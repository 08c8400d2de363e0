//! Which local subscriptions share which upstream subscription (sans-IO).
//!
//! Sessions subscribe with (subject, optional queue group). The relay keeps
//! one upstream NATS subscription per distinct pair, reference-counted over
//! the local subscribers. This table is the bookkeeping only: it says when
//! an upstream subscription must be created or dropped, and which pairs
//! match a subject for node-local delivery while NATS is down.

use crate::util::sparse_map::shrink_if_sparse;
use holdfast_wire::{subject, Text};
use std::collections::{HashMap, HashSet};

/// One upstream subscription: NATS sees exactly one SUB per distinct key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscriptionKey {
    pub subject: Text,
    pub queue_group: Option<Text>,
}

/// A local subscription: the session and the client's subscription id.
pub type MemberId = (u64, u32);

/// Result of adding a local subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// First subscriber of this key: create the upstream subscription.
    NewKey,
    /// The upstream subscription exists; just add the subscriber.
    ExistingKey,
}

/// Result of removing a local subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// That was the last subscriber: drop the upstream subscription.
    LastMember,
    StillShared,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("subscription id {sid} is already in use on this connection")]
    DuplicateSid { sid: u32 },
    #[error("this connection already has the maximum of {limit} subscriptions")]
    TooManySubscriptions { limit: usize },
}

#[derive(Debug, Default)]
pub struct SubscriptionTable {
    member_counts: HashMap<SubscriptionKey, usize>,
    members: HashMap<MemberId, SubscriptionKey>,
    sessions: HashMap<u64, HashSet<u32>>,
}

impl SubscriptionTable {
    pub fn new() -> SubscriptionTable {
        SubscriptionTable::default()
    }

    /// Adds a local subscription, refusing duplicates and sessions over `limit`.
    pub fn subscribe(
        &mut self,
        member: MemberId,
        key: SubscriptionKey,
        limit: usize,
    ) -> Result<Joined, TableError> {
        let (session, sid) = member;
        let sids = self.sessions.entry(session).or_default();
        if sids.contains(&sid) {
            return Err(TableError::DuplicateSid { sid });
        }
        if sids.len() >= limit {
            return Err(TableError::TooManySubscriptions { limit });
        }
        sids.insert(sid);
        self.members.insert(member, key.clone());
        let count = self.member_counts.entry(key).or_insert(0);
        *count += 1;
        Ok(if *count == 1 {
            Joined::NewKey
        } else {
            Joined::ExistingKey
        })
    }

    /// Removes a local subscription; `None` if it did not exist.
    pub fn unsubscribe(&mut self, member: MemberId) -> Option<(SubscriptionKey, Left)> {
        let key = self.members.remove(&member)?;
        if let Some(sids) = self.sessions.get_mut(&member.0) {
            sids.remove(&member.1);
            if sids.is_empty() {
                self.sessions.remove(&member.0);
            }
        }
        let left = match self.member_counts.get_mut(&key) {
            Some(count) if *count > 1 => {
                *count -= 1;
                Left::StillShared
            }
            _ => {
                self.member_counts.remove(&key);
                Left::LastMember
            }
        };
        shrink_if_sparse(&mut self.members);
        shrink_if_sparse(&mut self.member_counts);
        shrink_if_sparse(&mut self.sessions);
        Some((key, left))
    }

    /// Removes every subscription of a session.
    pub fn remove_session(&mut self, session: u64) -> Vec<(MemberId, SubscriptionKey, Left)> {
        let sids = self.sessions.remove(&session).unwrap_or_default();
        let mut removed = Vec::with_capacity(sids.len());
        for sid in sids {
            // Re-insert so `unsubscribe` finds and cleans the session entry.
            self.sessions.entry(session).or_default().insert(sid);
            if let Some((key, left)) = self.unsubscribe((session, sid)) {
                removed.push(((session, sid), key, left));
            }
        }
        removed
    }

    /// Keys whose subject pattern matches `subject`, with their subscriber counts.
    pub fn matching<'a>(
        &'a self,
        subject: &'a str,
    ) -> impl Iterator<Item = (&'a SubscriptionKey, usize)> + 'a {
        self.member_counts
            .iter()
            .filter(move |(key, _)| subject::matches(&key.subject, subject))
            .map(|(key, count)| (key, *count))
    }

    /// Local subscriptions across all sessions.
    pub fn local_count(&self) -> usize {
        self.members.len()
    }

    /// Distinct upstream subscriptions.
    pub fn upstream_count(&self) -> usize {
        self.member_counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(subject: &str, queue: Option<&str>) -> SubscriptionKey {
        SubscriptionKey {
            subject: Text::from(subject),
            queue_group: queue.map(Text::from),
        }
    }

    #[test]
    fn one_upstream_per_distinct_subject_and_queue() {
        let mut table = SubscriptionTable::new();
        assert_eq!(
            table.subscribe((1, 1), key("a.>", None), 10),
            Ok(Joined::NewKey)
        );
        assert_eq!(
            table.subscribe((2, 1), key("a.>", None), 10),
            Ok(Joined::ExistingKey)
        );
        assert_eq!(
            table.subscribe((2, 2), key("a.>", Some("q")), 10),
            Ok(Joined::NewKey)
        );
        assert_eq!(table.upstream_count(), 2);
        assert_eq!(table.local_count(), 3);
        assert_eq!(
            table.unsubscribe((1, 1)),
            Some((key("a.>", None), Left::StillShared))
        );
        assert_eq!(
            table.unsubscribe((2, 1)),
            Some((key("a.>", None), Left::LastMember))
        );
        assert_eq!(table.unsubscribe((2, 1)), None);
        assert_eq!(table.upstream_count(), 1);
    }

    #[test]
    fn duplicate_sids_and_limits_are_refused() {
        let mut table = SubscriptionTable::new();
        table.subscribe((1, 1), key("a", None), 2).unwrap();
        assert_eq!(
            table.subscribe((1, 1), key("b", None), 2),
            Err(TableError::DuplicateSid { sid: 1 })
        );
        table.subscribe((1, 2), key("b", None), 2).unwrap();
        assert_eq!(
            table.subscribe((1, 3), key("c", None), 2),
            Err(TableError::TooManySubscriptions { limit: 2 })
        );
        // Another session has its own budget.
        assert!(table.subscribe((2, 3), key("c", None), 2).is_ok());
    }

    #[test]
    fn removing_a_session_releases_everything_it_held() {
        let mut table = SubscriptionTable::new();
        table.subscribe((1, 1), key("a", None), 10).unwrap();
        table.subscribe((1, 2), key("b", None), 10).unwrap();
        table.subscribe((2, 1), key("a", None), 10).unwrap();
        let mut removed = table.remove_session(1);
        removed.sort_by_key(|(member, _, _)| *member);
        assert_eq!(
            removed,
            vec![
                ((1, 1), key("a", None), Left::StillShared),
                ((1, 2), key("b", None), Left::LastMember),
            ]
        );
        assert_eq!(table.local_count(), 1);
        assert!(table.remove_session(1).is_empty());
        // The session's sids are free again.
        assert!(table.subscribe((1, 1), key("a", None), 10).is_ok());
    }

    #[test]
    fn matching_finds_wildcard_and_literal_keys() {
        let mut table = SubscriptionTable::new();
        table
            .subscribe((1, 1), key("kv.*.events", None), 10)
            .unwrap();
        table
            .subscribe((1, 2), key("kv.>", Some("workers")), 10)
            .unwrap();
        table.subscribe((2, 1), key("other", None), 10).unwrap();
        let mut found: Vec<_> = table
            .matching("kv.node1.events")
            .map(|(key, count)| (key.subject.to_string(), count))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![("kv.*.events".to_string(), 1), ("kv.>".to_string(), 1)]
        );
        assert_eq!(table.matching("nothing").count(), 0);
    }
}
