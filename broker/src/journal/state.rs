//! State shared by the journal handle, reader tasks and the writer thread:
//! the open database, the lock-free counters the writer publishes after
//! each commit, so `backlog()` and `stats()` never wait for a transaction,
//! the journal's health, and the damaged rows found so far.

use super::health::HealthCells;
use super::ledger::ClassLedger;
use super::store::DamagedRow;
use super::{ClassBacklog, JournalStats};
use crate::util::drop_log::DropLog;
use redb::Database;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;
use tracing::warn;

/// `oldest_accepted_ms` of an empty class.
const NONE: u64 = u64::MAX;

pub(super) struct Shared {
    /// Readers and the writer's transactions take it shared; compaction
    /// (which needs `&mut Database` and no live read transaction) and a
    /// reopen exclusive. `None` between closing a database an I/O error
    /// failed and opening it again.
    pub db: RwLock<Option<Database>>,
    pub classes: Vec<ClassShared>,
    pub stats: StatCells,
    pub health: HealthCells,
    /// Damaged rows found, by (class name, first sequence): each is counted
    /// and logged once, and the writer drops it when the head reaches it.
    /// Touched only when damage is found or a damaged row leaves.
    pub damaged: Mutex<BTreeSet<(String, u64)>>,
    /// Past the first [`DAMAGE_LOGGED_EACH`] damaged rows, one log line per
    /// interval (a damaged disk region can hold thousands of rows).
    damage_log: Mutex<DropLog>,
}

/// Damaged rows logged one line each before lines are rate-limited.
const DAMAGE_LOGGED_EACH: u64 = 100;

pub(super) struct ClassShared {
    pub name: String,
    backlog: BacklogCells,
}

impl Shared {
    pub(super) fn new(
        db: Database,
        names: Vec<String>,
        ledgers: &[ClassLedger],
        reserve_bytes: u64,
    ) -> Shared {
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
            db: RwLock::new(Some(db)),
            classes,
            stats: StatCells::default(),
            health: HealthCells::new(reserve_bytes),
            damaged: Mutex::new(BTreeSet::new()),
            damage_log: Mutex::new(DropLog::default()),
        }
    }

    /// Records a damaged row; the first report of each is counted and logged.
    pub(super) fn report_corrupt(&self, row: &DamagedRow, found: &str) {
        let Ok(mut damaged) = self.damaged.lock() else {
            return;
        };
        if !damaged.insert((row.class.clone(), row.first_seq)) {
            return;
        }
        drop(damaged);
        let messages = row.last_seq.saturating_sub(row.first_seq) + 1;
        StatCells::add(&self.stats.corrupt_rows, 1);
        StatCells::add(&self.stats.corrupt_messages, messages);
        let total = self.stats.corrupt_rows.load(Ordering::Relaxed);
        let since_last_line = if total <= DAMAGE_LOGGED_EACH {
            Some(1)
        } else {
            self.damage_log
                .lock()
                .ok()
                .and_then(|mut log| log.due(total - DAMAGE_LOGGED_EACH, Instant::now()))
        };
        let Some(rows) = since_last_line else {
            return;
        };
        warn!(
            rows,
            total,
            class = %row.class,
            first_seq = row.first_seq,
            last_seq = row.last_seq,
            messages,
            error = %row.error,
            found,
            "journal row damaged: its messages are skipped (a gap in their sequence chains), the rest of the journal is kept"
        );
    }

    /// Whether (class, first sequence) is a damaged row found earlier.
    pub(super) fn is_damaged(&self, class: &str, first_seq: u64) -> bool {
        self.damaged
            .lock()
            .is_ok_and(|damaged| damaged.contains(&(class.to_owned(), first_seq)))
    }

    /// Whether any damaged row of `class` is known (a cheap check before
    /// looking for one at the head).
    pub(super) fn has_damaged(&self, class: &str) -> bool {
        self.damaged.lock().is_ok_and(|damaged| {
            damaged
                .range((class.to_owned(), 0)..=(class.to_owned(), u64::MAX))
                .next()
                .is_some()
        })
    }

    /// A damaged row left the file.
    pub(super) fn forget_damaged(&self, class: &str, first_seq: u64) {
        if let Ok(mut damaged) = self.damaged.lock() {
            damaged.remove(&(class.to_owned(), first_seq));
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
    pub corrupt_rows: AtomicU64,
    pub corrupt_messages: AtomicU64,
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
            corrupt_rows: get(&self.corrupt_rows),
            corrupt_messages: get(&self.corrupt_messages),
        }
    }
}
