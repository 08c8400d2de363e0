//! `WatchView`: which keys a watcher has been told exist, so that a replayed
//! snapshot can also tell it which keys went away.
//!
//! A snapshot (the relay's answer to WATCH with `send_initial`) only lists
//! the keys that exist. When it is a *re*-snapshot — after a reconnect, or
//! after events were dropped for a slow watcher — the watcher may still hold
//! keys that were deleted while it was not told. This view remembers the
//! keys delivered to the watcher and, at the snapshot's SYNCED, names the
//! ones the snapshot did not contain, so the connection task can deliver a
//! DELETE for each. Plain data, no I/O.

use bytes::Bytes;
use std::collections::{BTreeSet, HashSet};

#[derive(Debug, Default)]
pub(crate) struct WatchView {
    /// Keys the watcher holds as present: delivered PUTs without a later
    /// delivered DELETE.
    present: HashSet<Bytes>,
    /// While a snapshot is arriving (WATCH sent, its SYNCED not yet seen):
    /// the keys it contained so far.
    snapshot: Option<HashSet<Bytes>>,
}

impl WatchView {
    /// A WATCH with `send_initial` went out: what follows up to SYNCED is
    /// the complete set of current keys.
    pub(crate) fn begin_snapshot(&mut self) {
        self.snapshot = Some(HashSet::new());
    }

    /// The relay reported a PUT of `key` (whether or not it reached the watcher).
    pub(crate) fn observe_put(&mut self, key: &Bytes) {
        if let Some(snapshot) = &mut self.snapshot {
            // Short-lived (until SYNCED), so sharing the read buffer is fine.
            snapshot.insert(key.clone());
        }
    }

    /// The relay reported a DELETE of `key` (whether or not it reached the watcher).
    pub(crate) fn observe_delete(&mut self, key: &Bytes) {
        if let Some(snapshot) = &mut self.snapshot {
            snapshot.remove(key);
        }
    }

    /// A PUT of `key` reached the watcher.
    pub(crate) fn delivered_put(&mut self, key: &Bytes) {
        if !self.present.contains(key) {
            // Copied: a key decoded from a frame shares the read buffer's
            // allocation, and keeping it would keep that whole buffer alive.
            self.present.insert(Bytes::copy_from_slice(key));
        }
    }

    /// A DELETE of `key` reached the watcher.
    pub(crate) fn delivered_delete(&mut self, key: &Bytes) {
        self.present.remove(key);
    }

    /// The relay sent SYNCED: the keys the watcher holds that the snapshot
    /// did not contain, sorted. Empty outside a snapshot.
    pub(crate) fn finish_snapshot(&mut self) -> Vec<Bytes> {
        let Some(snapshot) = self.snapshot.take() else {
            return Vec::new();
        };
        let gone: BTreeSet<Bytes> = self
            .present
            .iter()
            .filter(|key| !snapshot.contains(*key))
            .cloned()
            .collect();
        gone.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    fn deliver_put(view: &mut WatchView, name: &'static str) {
        view.observe_put(&key(name));
        view.delivered_put(&key(name));
    }

    #[test]
    fn a_first_snapshot_deletes_nothing() {
        let mut view = WatchView::default();
        view.begin_snapshot();
        deliver_put(&mut view, "a");
        assert!(view.finish_snapshot().is_empty());
    }

    #[test]
    fn a_resnapshot_names_the_keys_that_went_away() {
        let mut view = WatchView::default();
        view.begin_snapshot();
        for name in ["a", "b", "c"] {
            deliver_put(&mut view, name);
        }
        view.finish_snapshot();

        // Reconnected: only `b` still exists.
        view.begin_snapshot();
        deliver_put(&mut view, "b");
        assert_eq!(view.finish_snapshot(), vec![key("a"), key("c")]);
    }

    #[test]
    fn keys_the_watcher_never_received_are_not_deleted() {
        let mut view = WatchView::default();
        view.begin_snapshot();
        // Dropped for a full channel: observed, never delivered.
        view.observe_put(&key("lost"));
        deliver_put(&mut view, "kept");
        view.finish_snapshot();

        view.begin_snapshot();
        assert_eq!(view.finish_snapshot(), vec![key("kept")]);
    }

    #[test]
    fn a_delete_the_watcher_missed_is_repaired_by_the_next_snapshot() {
        let mut view = WatchView::default();
        view.begin_snapshot();
        deliver_put(&mut view, "a");
        view.finish_snapshot();
        // Live DELETE dropped for a full channel.
        view.observe_delete(&key("a"));

        view.begin_snapshot();
        assert_eq!(view.finish_snapshot(), vec![key("a")]);
    }

    #[test]
    fn synced_outside_a_snapshot_changes_nothing() {
        let mut view = WatchView::default();
        deliver_put(&mut view, "a");
        assert!(view.finish_snapshot().is_empty());
    }
}
