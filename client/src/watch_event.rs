//! `WatchEvent`: one change under a watched prefix, as a [`crate::Watcher`]
//! yields it and the connection task queues it.

use bytes::Bytes;

/// One change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WatchEvent {
    /// `key` now holds `value` (created or updated).
    Put {
        key: Bytes,
        value: Bytes,
        revision: u64,
    },
    /// `key` is gone.
    Delete { key: Bytes, revision: u64 },
    /// Every entry of a (re)sent snapshot has been delivered: applying the
    /// events so far gives the prefix's state as of `revision`.
    Synced { revision: u64 },
}
