//! One cached etcd prefix: its entries, the revision they reflect, and how
//! fresh they are. Sans-IO: the discovery task feeds it listings and watch
//! events and asks it for snapshots, passing the wall-clock time in.

use bytes::Bytes;
use holdfast_wire::{KeyValue, Snapshot, WatchEventKind};
use std::collections::BTreeMap;

/// A change under a cached prefix, as watchers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: WatchEventKind,
    pub key: Bytes,
    pub value: Bytes,
    pub revision: u64,
}

impl Change {
    pub fn put(key: Bytes, value: Bytes, revision: u64) -> Change {
        Change {
            kind: WatchEventKind::Put,
            key,
            value,
            revision,
        }
    }

    pub fn delete(key: Bytes, revision: u64) -> Change {
        Change {
            kind: WatchEventKind::Delete,
            key,
            value: Bytes::new(),
            revision,
        }
    }
}

/// The entries under one prefix.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    prefix: Bytes,
    entries: BTreeMap<Bytes, Bytes>,
    revision: u64,
    /// Whether the entries ever came from etcd (a listing or the file).
    loaded: bool,
    /// Whether etcd confirms the entries right now (watch established and
    /// the link up); the discovery task sets it.
    fresh: bool,
    /// Unix milliseconds when etcd last confirmed the entries.
    confirmed_at_ms: u64,
    /// Bytes of the keys and values held, which the budget counts.
    bytes: usize,
}

/// Bytes `entries` hold in keys and values.
pub fn entry_bytes<'a>(entries: impl IntoIterator<Item = (&'a Bytes, &'a Bytes)>) -> usize {
    entries
        .into_iter()
        .map(|(key, value)| key.len() + value.len())
        .sum()
}

impl PrefixCache {
    /// An empty cache waiting for its first listing.
    pub fn new(prefix: Bytes) -> PrefixCache {
        PrefixCache {
            prefix,
            entries: BTreeMap::new(),
            revision: 0,
            loaded: false,
            fresh: false,
            confirmed_at_ms: 0,
            bytes: 0,
        }
    }

    /// A cache restored from the data dir: usable, but stale until etcd
    /// confirms it.
    pub fn restored(
        prefix: Bytes,
        revision: u64,
        confirmed_at_ms: u64,
        entries: impl IntoIterator<Item = (Bytes, Bytes)>,
    ) -> PrefixCache {
        let entries: BTreeMap<Bytes, Bytes> = entries.into_iter().collect();
        PrefixCache {
            prefix,
            bytes: entry_bytes(&entries),
            entries,
            revision,
            loaded: true,
            fresh: false,
            confirmed_at_ms,
        }
    }

    pub fn prefix(&self) -> &Bytes {
        &self.prefix
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of the keys and values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn confirmed_at_ms(&self) -> u64 {
        self.confirmed_at_ms
    }

    /// Every entry, for persisting.
    pub fn entries(&self) -> impl Iterator<Item = (&Bytes, &Bytes)> {
        self.entries.iter()
    }

    /// Whether this cache holds every key under `prefix`.
    pub fn covers(&self, prefix: &[u8]) -> bool {
        prefix.starts_with(&self.prefix)
    }

    /// Marks the entries confirmed by etcd as of `now_ms`, or not.
    pub fn set_fresh(&mut self, fresh: bool, now_ms: u64) {
        if fresh || self.fresh {
            // Losing freshness: the last confirmation was just now.
            self.confirmed_at_ms = self.confirmed_at_ms.max(now_ms);
        }
        self.fresh = fresh;
    }

    /// Replaces the entries with a full listing at `revision` and returns
    /// the difference, so watchers converge without a gap.
    pub fn replace(
        &mut self,
        listing: impl IntoIterator<Item = (Bytes, Bytes)>,
        revision: u64,
        now_ms: u64,
    ) -> Vec<Change> {
        let listing: BTreeMap<Bytes, Bytes> = listing.into_iter().collect();
        let mut changes = Vec::new();
        for key in self.entries.keys() {
            if !listing.contains_key(key) {
                changes.push(Change::delete(key.clone(), revision));
            }
        }
        for (key, value) in &listing {
            if self.entries.get(key) != Some(value) {
                changes.push(Change::put(key.clone(), value.clone(), revision));
            }
        }
        self.bytes = entry_bytes(&listing);
        self.entries = listing;
        self.revision = revision;
        self.loaded = true;
        self.confirmed_at_ms = now_ms;
        changes
    }

    /// Applies watch events in order. `revision` is the watch response's
    /// header revision (at least that of its last event).
    pub fn apply(&mut self, changes: &[Change], revision: u64, now_ms: u64) {
        for change in changes {
            match change.kind {
                WatchEventKind::Put => {
                    self.bytes += change.key.len() + change.value.len();
                    if let Some(old) = self
                        .entries
                        .insert(change.key.clone(), change.value.clone())
                    {
                        self.bytes = self.bytes.saturating_sub(change.key.len() + old.len());
                    }
                }
                WatchEventKind::Delete => {
                    if let Some(old) = self.entries.remove(&change.key) {
                        self.bytes = self.bytes.saturating_sub(change.key.len() + old.len());
                    }
                }
                WatchEventKind::Synced => {}
            }
        }
        self.revision = self.revision.max(revision);
        self.confirmed_at_ms = self.confirmed_at_ms.max(now_ms);
    }

    /// The entries under `prefix` (which this cache covers), sorted by key.
    pub fn entries_under(&self, prefix: &Bytes) -> Vec<KeyValue> {
        self.entries
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }

    /// The answer to a GET of `prefix` at `now_ms`.
    pub fn snapshot(&self, prefix: &Bytes, now_ms: u64) -> Snapshot {
        Snapshot {
            revision: self.revision,
            stale: !self.fresh,
            age_ms: if self.fresh {
                0
            } else {
                now_ms.saturating_sub(self.confirmed_at_ms)
            },
            entries: self.entries_under(prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn listing(pairs: &[(&str, &str)]) -> Vec<(Bytes, Bytes)> {
        pairs
            .iter()
            .map(|(key, value)| (b(key), b(value)))
            .collect()
    }

    #[test]
    fn a_relisting_yields_exactly_the_difference() {
        let mut cache = PrefixCache::new(b("v1/"));
        let first = cache.replace(listing(&[("v1/a", "1"), ("v1/b", "2")]), 10, 1_000);
        assert_eq!(first.len(), 2);
        let changes = cache.replace(listing(&[("v1/b", "3"), ("v1/c", "4")]), 20, 2_000);
        assert_eq!(
            changes,
            vec![
                Change::delete(b("v1/a"), 20),
                Change::put(b("v1/b"), b("3"), 20),
                Change::put(b("v1/c"), b("4"), 20),
            ]
        );
        assert_eq!(cache.revision(), 20);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn events_apply_in_order_and_advance_the_revision() {
        let mut cache = PrefixCache::new(b("v1/"));
        cache.replace(listing(&[("v1/a", "1")]), 10, 0);
        cache.apply(
            &[
                Change::put(b("v1/a"), b("2"), 11),
                Change::put(b("v1/b"), b("1"), 12),
                Change::delete(b("v1/a"), 13),
            ],
            13,
            0,
        );
        let snapshot = cache.snapshot(&b("v1/"), 0);
        assert_eq!(snapshot.revision, 13);
        assert_eq!(snapshot.entries.len(), 1);
        assert_eq!(snapshot.entries[0].key, b("v1/b"));
    }

    #[test]
    fn the_byte_count_follows_listings_and_events() {
        let mut cache = PrefixCache::new(b("v1/"));
        cache.replace(listing(&[("v1/a", "1"), ("v1/b", "22")]), 10, 0);
        assert_eq!(cache.bytes(), 5 + 6);
        cache.apply(
            &[
                Change::put(b("v1/a"), b("1111"), 11),
                Change::put(b("v1/c"), b("3"), 12),
                Change::delete(b("v1/b"), 13),
                Change::delete(b("v1/absent"), 14),
            ],
            14,
            0,
        );
        assert_eq!(cache.bytes(), entry_bytes(cache.entries()));
        assert_eq!(cache.bytes(), 8 + 5);
        let restored = PrefixCache::restored(b("v1/"), 1, 0, listing(&[("v1/x", "yy")]));
        assert_eq!(restored.bytes(), 6);
    }

    #[test]
    fn a_narrower_prefix_is_served_from_a_wider_cache() {
        let mut cache = PrefixCache::new(b("v1/"));
        cache.replace(
            listing(&[
                ("v1/a/1", "x"),
                ("v1/a/2", "y"),
                ("v1/ab", "z"),
                ("v1/b/1", "w"),
            ]),
            5,
            0,
        );
        assert!(cache.covers(b"v1/a/"));
        assert!(!cache.covers(b"v2/"));
        let keys: Vec<Bytes> = cache
            .entries_under(&b("v1/a/"))
            .into_iter()
            .map(|entry| entry.key)
            .collect();
        assert_eq!(keys, vec![b("v1/a/1"), b("v1/a/2")]);
    }

    #[test]
    fn staleness_and_age_follow_the_last_confirmation() {
        let mut cache = PrefixCache::new(b("v1/"));
        cache.replace(listing(&[("v1/a", "1")]), 3, 1_000);
        cache.set_fresh(true, 1_000);
        let fresh = cache.snapshot(&b("v1/"), 5_000);
        assert!(!fresh.stale);
        assert_eq!(fresh.age_ms, 0);
        cache.set_fresh(false, 6_000);
        let stale = cache.snapshot(&b("v1/"), 9_500);
        assert!(stale.stale);
        assert_eq!(stale.age_ms, 3_500);
    }

    #[test]
    fn a_restored_cache_is_stale_with_its_recorded_age() {
        let cache = PrefixCache::restored(b("v1/"), 42, 10_000, listing(&[("v1/a", "1")]));
        assert!(cache.is_loaded());
        let snapshot = cache.snapshot(&b("v1/"), 70_000);
        assert!(snapshot.stale);
        assert_eq!(snapshot.age_ms, 60_000);
        assert_eq!(snapshot.revision, 42);
    }
}
