//! Discovery answers: the entries under a key prefix, with how fresh they are.

use bytes::Bytes;
use std::time::Duration;

/// One etcd key and its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub key: Bytes,
    pub value: Bytes,
}

/// The entries under a prefix as of an etcd revision, from
/// [`Client::get`](crate::Client::get) or
/// [`Client::get_linearizable`](crate::Client::get_linearizable).
///
/// A stale answer is never presented as fresh: when the relay could not
/// confirm the entries with etcd just now (etcd unreachable, or the
/// prefix's watch not re-established yet), `stale` is set and `age` says
/// how old the entries are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The etcd revision the entries reflect.
    pub revision: u64,
    /// The relay could not confirm these entries with etcd just now.
    pub stale: bool,
    /// Time since etcd last confirmed these entries (zero when fresh).
    pub age: Duration,
    /// Sorted by key.
    pub entries: Vec<Entry>,
}

impl From<holdfast_wire::Snapshot> for Snapshot {
    fn from(snapshot: holdfast_wire::Snapshot) -> Snapshot {
        Snapshot {
            revision: snapshot.revision,
            stale: snapshot.stale,
            age: Duration::from_millis(snapshot.age_ms),
            entries: snapshot
                .entries
                .into_iter()
                .map(|entry| Entry {
                    key: entry.key,
                    value: entry.value,
                })
                .collect(),
        }
    }
}
