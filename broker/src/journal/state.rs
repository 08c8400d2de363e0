//! State shared by the journal handle, reader tasks and the writer thread:
//! the open database and the lock-free counters the writer publishes after
//! each commit, so `backlog()` and `stats()` never wait for a transaction.

use super::ledger::ClassLedger;
use super::{ClassBacklog, JournalStats};
use redb::Database;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// `oldest_accepted_ms` of an empty class.
const NONE: u64 = u64::MAX;

pub(super) struct Shared {
    /// Readers and the writer's transactions take it shared; compaction
    /// (which needs `&mut Database` and no live read transaction) exclusive.
    pub db: RwLock<Database>,
    pub classes: Vec<ClassShared>,
    pub stats: StatCells,
}

pub(super) struct ClassShared {
    pub name: String,
    backlog: BacklogCells,
}

impl Shared {
    pub(super) fn new(db: Database, names: Vec<String>, ledgers: &[ClassLedger]) -> Shared {
        let classes = names
            .into_iter()
            .zip(ledgers)
            .map(|(name, ledger)| {
                let class = ClassShared {
                    name,
                    backlog: BacklogCells::default(),
                };
                class.publish(ledger);
                class
            })
            .collect();
        Shared {
            db: RwLock::new(db),
            classes,
            stats: StatCells::default(),
        }
    }

    pub(super) fn backlog(&self, class: usize) -> ClassBacklog {
        self.classes
            .get(class)
            .map(|class| class.backlog.load())
            .unwrap_or_default()
    }
}

impl ClassShared {
    /// Makes a committed ledger visible to `backlog()`.
    pub(super) fn publish(&self, ledger: &ClassLedger) {
        self.backlog.store(&ledger.backlog());
    }
}

/// A [`ClassBacklog`] as atomics. Fields are stored one by one, so a reader
/// racing a commit may mix two consecutive snapshots; each field is right
/// on its own, which is what gauges need.
#[derive(Default)]
struct BacklogCells {
    messages: AtomicU64,
    bytes: AtomicU64,
    oldest_accepted_ms: AtomicU64,
    first_seq: AtomicU64,
    last_seq: AtomicU64,
}

impl BacklogCells {
    fn store(&self, backlog: &ClassBacklog) {
        self.messages.store(backlog.messages, Ordering::Relaxed);
        self.bytes.store(backlog.bytes, Ordering::Relaxed);
        self.oldest_accepted_ms.store(
            backlog.oldest_accepted_ms.unwrap_or(NONE),
            Ordering::Relaxed,
        );
        self.first_seq.store(backlog.first_seq, Ordering::Relaxed);
        self.last_seq.store(backlog.last_seq, Ordering::Release);
    }

    fn load(&self) -> ClassBacklog {
        let last_seq = self.last_seq.load(Ordering::Acquire);
        let oldest = self.oldest_accepted_ms.load(Ordering::Relaxed);
        ClassBacklog {
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            oldest_accepted_ms: (oldest != NONE).then_some(oldest),
            first_seq: self.first_seq.load(Ordering::Relaxed),
            last_seq,
        }
    }
}

/// Running totals since open.
#[derive(Default)]
pub(super) struct StatCells {
    pub commits: AtomicU64,
    pub appended: AtomicU64,
    pub rejected_full: AtomicU64,
    pub dropped_oldest: AtomicU64,
    pub expired: AtomicU64,
    pub confirmed: AtomicU64,
    pub compactions: AtomicU64,
}

impl StatCells {
    pub(super) fn add(cell: &AtomicU64, n: u64) {
        if n > 0 {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(super) fn load(&self) -> JournalStats {
        let get = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        JournalStats {
            commits: get(&self.commits),
            appended: get(&self.appended),
            rejected_full: get(&self.rejected_full),
            dropped_oldest: get(&self.dropped_oldest),
            expired: get(&self.expired),
            confirmed: get(&self.confirmed),
            compactions: get(&self.compactions),
        }
    }
}
