//! Opening the journal file: validate what is there, quarantine it if it is
//! damaged beyond use, and hand the writer the ledgers to continue from.
//!
//! A journal file that redb cannot open (or panics on), or whose counters
//! contradict each other, is renamed to `<file>.quarantined-<unix-seconds>`
//! and a fresh journal is created: the relay must start, never crash-loop on
//! a bad file, and the damaged file is kept for a human (`holdfastd journal
//! salvage` exports what it still holds). A damaged row costs that row only:
//! an edge row that fails its checksum is reported and dropped when the
//! head reaches it, and a byte count that disagrees with the rows is
//! corrected. Validation is cheap on purpose (restart-to-ready with
//! millions of messages journaled): per class it checks the meta counters
//! against each other and fully decodes only the first and last rows, never
//! the rows in between.

use super::ledger::ClassLedger;
use super::store::{
    self, panic_message, DamagedRow, EdgeRow, BATCHES, CACHE_BYTES, FORMAT_KEY, FORMAT_VERSION,
    META,
};
use super::JournalError;
use redb::{
    Builder, Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError, TableError,
};
use std::cell::Cell;
use std::ffi::OsString;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

pub(super) struct Opened {
    pub db: Database,
    /// One per configured class, in configuration order.
    pub ledgers: Vec<ClassLedger>,
    pub quarantined: Option<PathBuf>,
    pub reason: Option<String>,
    /// Damaged edge rows found while validating (kept, skipped when read).
    pub damaged: Vec<DamagedRow>,
}

/// Why an attempt to open failed.
enum Failure {
    /// Another process (or handle) holds the file.
    InUse,
    /// Not the file's fault (permissions, disk): reported, the file left alone.
    Environment(String),
    /// The file is damaged or not a journal: quarantine it.
    Bad(String),
}

/// Opens (creating if needed) the journal at `path` for the configured
/// class names, quarantining a bad file.
pub(super) fn open(path: &Path, classes: &[String]) -> Result<Opened, JournalError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|error| {
            JournalError::Storage(format!("cannot create {}: {error}", parent.display()))
        })?;
    }
    if let Err(error) = super::reclaim::remove_stale_fresh(path) {
        warn!(%error, path = %path.display(), "journal: cannot remove a leftover replacement file");
    }
    // A relay killed while creating its first journal leaves an empty file.
    // Nothing can have been acknowledged from it, so it is no damage to
    // quarantine and alarm an operator about: start it afresh.
    if std::fs::metadata(path).is_ok_and(|metadata| metadata.len() == 0) {
        let _ = std::fs::remove_file(path);
    }
    let (quarantined, reason) = match attempt(path, classes) {
        Ok((db, ledgers, damaged)) => {
            return Ok(Opened {
                db,
                ledgers,
                quarantined: None,
                reason: None,
                damaged,
            })
        }
        Err(failure) => match failure {
            Failure::InUse => return Err(JournalError::InUse(path.to_path_buf())),
            Failure::Environment(error) => {
                return Err(JournalError::Storage(format!(
                    "cannot open journal {}: {error}",
                    path.display()
                )))
            }
            Failure::Bad(reason) => (quarantine(path)?, reason),
        },
    };
    warn!(
        path = %path.display(),
        quarantined = %quarantined.display(),
        %reason,
        "journal file is damaged: moved it aside and started an empty journal"
    );
    match attempt(path, classes) {
        Ok((db, ledgers, damaged)) => Ok(Opened {
            db,
            ledgers,
            quarantined: Some(quarantined),
            reason: Some(reason),
            damaged,
        }),
        Err(Failure::InUse) => Err(JournalError::InUse(path.to_path_buf())),
        Err(Failure::Environment(error) | Failure::Bad(error)) => {
            Err(JournalError::Storage(format!(
                "cannot create a fresh journal at {}: {error}",
                path.display()
            )))
        }
    }
}

/// Opens the journal again while the relay runs, after an I/O error made
/// redb close it. Never quarantines: the file held acknowledged messages a
/// moment ago, so a failure is reported and the caller tries again later.
pub(super) fn reopen(path: &Path, classes: &[String]) -> Result<Opened, JournalError> {
    match attempt(path, classes) {
        Ok((db, ledgers, damaged)) => Ok(Opened {
            db,
            ledgers,
            quarantined: None,
            reason: None,
            damaged,
        }),
        Err(Failure::InUse) => Err(JournalError::InUse(path.to_path_buf())),
        Err(Failure::Environment(error) | Failure::Bad(error)) => Err(JournalError::Unavailable(
            format!("cannot reopen {}: {error}", path.display()),
        )),
    }
}

type Attempt = (Database, Vec<ClassLedger>, Vec<DamagedRow>);

/// One open: redb open, validation, then the writes a valid file may need
/// (tables, format key, meta for classes new to it).
fn attempt(path: &Path, classes: &[String]) -> Result<Attempt, Failure> {
    // redb documents that it may panic on a file corrupted outside of it.
    panic::catch_unwind(AssertUnwindSafe(|| {
        // A file not closed cleanly is checked whole before it opens (the
        // writer keeps no quick-repair state): say so, since it is what a
        // slow start after a crash is waiting for.
        let repair_started: Rc<Cell<Option<Instant>>> = Rc::default();
        let started = Rc::clone(&repair_started);
        let db = Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_repair_callback(move |_| {
                if started.get().is_none() {
                    started.set(Some(Instant::now()));
                    info!("journal was not closed cleanly (crash or kill -9): checking the whole file before the relay is ready");
                }
            })
            .create(path)
            .map_err(classify)?;
        if let Some(started) = repair_started.get() {
            info!(
                seconds = started.elapsed().as_secs_f64(),
                "journal checked after an unclean stop"
            );
        }
        let (ledgers, damaged) = validate(&db, classes)?;
        prepare(&db, classes)
            .map_err(|error| Failure::Environment(format!("cannot initialise: {error}")))?;
        Ok((db, ledgers, damaged))
    }))
    .unwrap_or_else(|panic| {
        Err(Failure::Bad(format!(
            "redb panicked reading it: {}",
            panic_message(&panic)
        )))
    })
}

fn classify(error: DatabaseError) -> Failure {
    match error {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => Failure::InUse,
        DatabaseError::Storage(StorageError::Io(io))
            if !matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
            ) =>
        {
            Failure::Environment(io.to_string())
        }
        other => Failure::Bad(format!("redb cannot open it: {other}")),
    }
}

/// Checks meta and the edge rows of every class; returns the ledgers of the
/// configured classes (new classes start empty) and the damaged edge rows.
fn validate(
    db: &Database,
    classes: &[String],
) -> Result<(Vec<ClassLedger>, Vec<DamagedRow>), Failure> {
    let bad = |what: String| Failure::Bad(what);
    let redb = |error: StorageError| Failure::Bad(format!("reading it failed: {error}"));
    let txn = db
        .begin_read()
        .map_err(|error| bad(format!("cannot read it: {error}")))?;
    let meta = match txn.open_table(META) {
        Ok(table) => Some(table),
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(error) => return Err(bad(format!("meta table: {error}"))),
    };
    let batches = match txn.open_table(BATCHES) {
        Ok(table) => Some(table),
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(error) => return Err(bad(format!("batches table: {error}"))),
    };
    let mut contents = match &meta {
        Some(meta) => store::read_meta(meta).map_err(redb)?.map_err(bad)?,
        None => store::MetaContents {
            format: None,
            classes: Default::default(),
        },
    };
    if let Some(format) = contents.format.filter(|format| *format != FORMAT_VERSION) {
        return Err(bad(format!(
            "journal format {format}, this build reads {FORMAT_VERSION}"
        )));
    }
    if let Some(batches) = &batches {
        for class in store::classes_with_rows(batches).map_err(redb)? {
            if !contents.classes.contains_key(&class) {
                return Err(bad(format!(
                    "rows of class {class:?} without meta counters"
                )));
            }
        }
    }
    let mut damaged = Vec::new();
    for (class, ledger) in &mut contents.classes {
        ledger
            .check()
            .map_err(|error| bad(format!("class {class:?}: {error}")))?;
        let edges = match &batches {
            Some(batches) => {
                let last_seq = ledger.next_seq.saturating_sub(1);
                store::edge_rows(batches, class, ledger.confirmed, last_seq).map_err(redb)?
            }
            None => None,
        };
        if let Some((first, last)) = &edges {
            for edge in [first, last] {
                if let Err((row, _)) = edge {
                    if !damaged.contains(row) {
                        damaged.push(row.clone());
                    }
                }
            }
        }
        ledger.oldest_accepted_ms = check_edges(class, ledger, edges)
            .map_err(|error| bad(format!("class {class:?}: {error}")))?;
    }
    let mut ledgers = Vec::with_capacity(classes.len());
    for class in classes {
        ledgers.push(
            contents
                .classes
                .remove(class)
                .unwrap_or_else(ClassLedger::new),
        );
    }
    for (class, ledger) in &contents.classes {
        if ledger.messages > 0 {
            warn!(class = %class, messages = ledger.messages, bytes = ledger.bytes, "journal holds messages of a class that is not configured; they stay in the file until the class is configured again");
        }
    }
    Ok((ledgers, damaged))
}

/// What the checks need of an edge row: its sequence range, and its facts
/// when it is intact.
fn edge_range(edge: &EdgeRow) -> (u64, u64) {
    match edge {
        Ok(facts) => (facts.first_seq, facts.last_seq),
        Err((row, _)) => (row.first_seq, row.last_seq),
    }
}

/// Matches the counters against the first and last rows; returns the time
/// of the first live message. A damaged edge row is checked as far as it
/// can be (its range); the byte count, when the rows show it wrong, is
/// corrected rather than condemning the file.
fn check_edges(
    class: &str,
    ledger: &mut ClassLedger,
    edges: Option<(EdgeRow, EdgeRow)>,
) -> Result<Option<u64>, String> {
    let Some((first_edge, last_edge)) = edges else {
        return if ledger.messages == 0 {
            Ok(None)
        } else {
            Err(format!("{} messages counted but no rows", ledger.messages))
        };
    };
    let head = ledger.confirmed + 1;
    let tail = ledger.next_seq - 1;
    let (first_start, first_end) = edge_range(&first_edge);
    let (_, last_end) = edge_range(&last_edge);
    if ledger.messages == 0 {
        return Err(format!(
            "no messages counted but rows from sequence {first_start} remain"
        ));
    }
    if first_start > head || first_end < head {
        return Err(format!(
            "first row holds {first_start}..={first_end} but the first live sequence is {head}"
        ));
    }
    if last_end != tail {
        return Err(format!(
            "last row ends at {last_end} but the last sequence is {tail}"
        ));
    }
    let (first, last) = match (first_edge, last_edge) {
        (Ok(first), Ok(last)) => (first, last),
        (first, _) => {
            // A damaged head row says no more than its header's latest
            // time, if that: an upper bound, so expiry is late, never early.
            return Ok(match first {
                Ok(facts) => facts.first_live_accepted_ms,
                Err((_, header)) => header.map(|header| header.max_accepted_ms),
            });
        }
    };
    // Rows after the first are wholly live, so the edges bound the bytes.
    let edge_bytes = if first == last {
        first.live_bytes
    } else {
        first.live_bytes + last.live_bytes
    };
    let exact = first == last;
    if (exact && ledger.bytes != edge_bytes) || ledger.bytes < edge_bytes {
        // Only a budget figure (a damaged row removed earlier had its bytes
        // estimated): corrected, kept by the next commit of the class.
        warn!(
            class,
            counted = ledger.bytes,
            rows = edge_bytes,
            "journal byte count disagrees with its rows; corrected"
        );
        ledger.bytes = edge_bytes.max(if exact { 0 } else { ledger.bytes });
    }
    Ok(first.first_live_accepted_ms)
}

/// Creates what a fresh or older file lacks; commits only if it wrote.
fn prepare(db: &Database, classes: &[String]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    let mut wrote = false;
    {
        txn.open_table(BATCHES)?;
        let mut meta = txn.open_table(META)?;
        if meta.get(FORMAT_KEY)?.is_none() {
            meta.insert(FORMAT_KEY, FORMAT_VERSION)?;
            wrote = true;
        }
        for class in classes {
            let key = store::meta_key(class, store::MetaField::NextSeq);
            if meta.get(key.as_str())?.is_none() {
                store::write_ledger(&mut meta, class, &ClassLedger::new())?;
                wrote = true;
            }
        }
    }
    if wrote {
        txn.commit()?;
    } else {
        txn.abort()?;
    }
    Ok(())
}

/// Renames the damaged file out of the way; never overwrites an earlier one.
fn quarantine(path: &Path) -> Result<PathBuf, JournalError> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut suffix = 0;
    loop {
        let mut name = OsString::from(path.as_os_str());
        name.push(format!(".quarantined-{seconds}"));
        if suffix > 0 {
            name.push(format!("-{suffix}"));
        }
        let target = PathBuf::from(name);
        if !target.exists() {
            std::fs::rename(path, &target).map_err(|error| {
                JournalError::Storage(format!(
                    "journal {} is damaged and cannot be moved aside: {error}",
                    path.display()
                ))
            })?;
            return Ok(target);
        }
        suffix += 1;
    }
}
