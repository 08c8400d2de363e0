//! `holdfastd journal inspect`: the per-class picture of a journal file
//! while the relay is stopped, without changing what the journal holds.

use super::ledger::ClassLedger;
use super::store::{self, panic_message, BATCHES, CACHE_BYTES, META};
use super::{ClassBacklog, JournalError};
use redb::{Builder, DatabaseError, ReadableDatabase, TableError};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use tracing::info;

/// Every class found in the file (by name, sorted) with its backlog.
///
/// Opens read-only. A file left by a crashed relay cannot be opened
/// read-only (redb must first recover its allocator state); then it is
/// opened for writing just long enough for redb to do that recovery, which
/// is what the relay's next start would do anyway: journal contents are not
/// touched. Fails with [`JournalError::InUse`] while a relay holds the file.
pub fn inspect(path: &Path) -> Result<Vec<(String, ClassBacklog)>, JournalError> {
    if !path.exists() {
        return Err(JournalError::Storage(format!(
            "no journal at {}",
            path.display()
        )));
    }
    panic::catch_unwind(AssertUnwindSafe(|| inspect_file(path))).unwrap_or_else(|panic| {
        Err(JournalError::Storage(format!(
            "journal {} is damaged (redb panicked reading it: {})",
            path.display(),
            panic_message(&panic)
        )))
    })
}

fn inspect_file(path: &Path) -> Result<Vec<(String, ClassBacklog)>, JournalError> {
    let opened = |error: DatabaseError| match error {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            JournalError::InUse(path.to_path_buf())
        }
        other => JournalError::Storage(format!("cannot open {}: {other}", path.display())),
    };
    let mut builder = Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    match builder.open_read_only(path) {
        Ok(db) => summarize(&db),
        Err(DatabaseError::RepairAborted) => {
            info!(path = %path.display(), "journal was not closed cleanly; letting redb recover it before inspecting");
            let db = builder.open(path).map_err(opened)?;
            summarize(&db)
        }
        Err(other) => Err(opened(other)),
    }
}

fn summarize(db: &impl ReadableDatabase) -> Result<Vec<(String, ClassBacklog)>, JournalError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(table) => table,
        Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    let contents = store::read_meta(&meta)?.map_err(JournalError::Storage)?;
    let batches = match txn.open_table(BATCHES) {
        Ok(table) => Some(table),
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(error) => return Err(error.into()),
    };
    let mut out = Vec::with_capacity(contents.classes.len());
    for (class, mut ledger) in contents.classes {
        if let (Some(batches), true) = (&batches, ledger.messages > 0) {
            let last_seq = ledger.next_seq.saturating_sub(1);
            ledger.oldest_accepted_ms =
                store::edge_rows(batches, &class, ledger.confirmed, last_seq)?.and_then(
                    |(first, _)| match first {
                        Ok(facts) => facts.first_live_accepted_ms,
                        // A damaged head row: its header's latest time, if readable.
                        Err((_, header)) => header.map(|header| header.max_accepted_ms),
                    },
                );
        }
        let backlog = ClassLedger::backlog(&ledger);
        out.push((class, backlog));
    }
    Ok(out)
}
