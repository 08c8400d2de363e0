//! Opening the journal file: validate what is there, quarantine it if it is
//! damaged, and hand the writer the ledgers to continue from.
//!
//! A journal file that redb cannot open (or panics on), or whose contents
//! fail validation, is renamed to `<file>.quarantined-<unix-seconds>` and a
//! fresh journal is created: the relay must start, never crash-loop on a bad
//! file, and the damaged file is kept for a human. Validation is cheap on
//! purpose (restart-to-ready with millions of messages journaled): per class
//! it checks the meta counters against each other and fully decodes only the
//! first and last rows, never the rows in between.

use super::ledger::ClassLedger;
use super::store::{self, RowReadError, BATCHES, FORMAT_KEY, FORMAT_VERSION, META};
use super::writer::panic_message;
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

/// redb's page cache. Its default (1 GiB) would let the cache alone break
/// the relay's memory budget; the journal reads rows once, sequentially, so
/// a small cache costs little.
pub(super) const CACHE_BYTES: usize = 16 * 1024 * 1024;

pub(super) struct Opened {
    pub db: Database,
    /// One per configured class, in configuration order.
    pub ledgers: Vec<ClassLedger>,
    pub quarantined: Option<PathBuf>,
    pub reason: Option<String>,
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
        Ok((db, ledgers)) => {
            return Ok(Opened {
                db,
                ledgers,
                quarantined: None,
                reason: None,
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
        Ok((db, ledgers)) => Ok(Opened {
            db,
            ledgers,
            quarantined: Some(quarantined),
            reason: Some(reason),
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

/// One open: redb open, validation, then the writes a valid file may need
/// (tables, format key, meta for classes new to it).
fn attempt(path: &Path, classes: &[String]) -> Result<(Database, Vec<ClassLedger>), Failure> {
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
        let ledgers = validate(&db, classes)?;
        prepare(&db, classes)
            .map_err(|error| Failure::Environment(format!("cannot initialise: {error}")))?;
        Ok((db, ledgers))
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
/// configured classes (new classes start empty).
fn validate(db: &Database, classes: &[String]) -> Result<Vec<ClassLedger>, Failure> {
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
    for (class, ledger) in &mut contents.classes {
        ledger
            .check()
            .map_err(|error| bad(format!("class {class:?}: {error}")))?;
        let edges = match &batches {
            Some(batches) => match store::edge_rows(batches, class, ledger.confirmed) {
                Ok(edges) => edges,
                Err(RowReadError::Storage(error)) => return Err(redb(error)),
                Err(corrupt) => return Err(bad(corrupt.into_journal_error(class).to_string())),
            },
            None => None,
        };
        ledger.oldest_accepted_ms =
            check_edges(ledger, edges).map_err(|error| bad(format!("class {class:?}: {error}")))?;
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
    Ok(ledgers)
}

/// Matches the counters against the first and last rows; returns the time
/// of the first live message.
fn check_edges(
    ledger: &ClassLedger,
    edges: Option<(store::RowFacts, store::RowFacts)>,
) -> Result<Option<u64>, String> {
    let Some((first, last)) = edges else {
        return if ledger.messages == 0 {
            Ok(None)
        } else {
            Err(format!("{} messages counted but no rows", ledger.messages))
        };
    };
    let head = ledger.confirmed + 1;
    let tail = ledger.next_seq - 1;
    if ledger.messages == 0 {
        return Err(format!(
            "no messages counted but rows from sequence {} remain",
            first.first_seq
        ));
    }
    if first.first_seq > head || first.last_seq < head {
        return Err(format!(
            "first row holds {}..={} but the first live sequence is {head}",
            first.first_seq, first.last_seq
        ));
    }
    if last.last_seq != tail {
        return Err(format!(
            "last row ends at {} but the last sequence is {tail}",
            last.last_seq
        ));
    }
    // Rows after the first are wholly live, so the edges bound the bytes.
    let edge_bytes = if first == last {
        first.live_bytes
    } else {
        first.live_bytes + last.live_bytes
    };
    let exact = first == last;
    if (exact && ledger.bytes != edge_bytes) || ledger.bytes < edge_bytes {
        return Err(format!(
            "{} bytes counted but the edge rows alone hold {edge_bytes}",
            ledger.bytes
        ));
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
