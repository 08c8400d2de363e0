//! Giving disk space back once the journal is drained, so the file does not
//! keep the size of the largest outage forever.
//!
//! redb's `compact()` rewrites the file in place and then truncates it; on
//! a multi-GiB file the truncation alone (freeing and discarding the
//! extents) takes on the order of a second, during which every append waits.
//! When no class has rows left, the only state worth keeping is `meta` (the
//! sequence counters), so instead a fresh file holding just `meta` is
//! written beside the journal, opened, and renamed over it; the old file is
//! closed (and its blocks freed) on a background thread. A crash at any
//! point leaves either the old or the new file at the path, both complete.
//! With rows of unconfigured classes still present, `compact()` is used.

use super::store::{BATCHES, CACHE_BYTES, META};
use super::JournalError;
use redb::{Builder, Database, ReadableDatabase, ReadableTableMetadata};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// Below this the file is left alone: there is nothing worth a rewrite.
pub(super) const MIN_RECLAIM_BYTES: u64 = 8 * 1024 * 1024;

/// Where the replacement file is built before it is renamed over `path`.
pub(super) fn fresh_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".fresh");
    PathBuf::from(name)
}

/// Removes a replacement file a crash left behind.
pub(super) fn remove_stale_fresh(path: &Path) -> io::Result<()> {
    match fs::remove_file(fresh_path(path)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Reclaims the space of `db` (at `path`), which must have no live
/// messages in any configured class. Returns whether it did anything.
pub(super) fn reclaim(path: &Path, db: &mut Database) -> Result<bool, JournalError> {
    let size = fs::metadata(path)
        .map(|meta| meta.len())
        .unwrap_or(u64::MAX);
    if size < MIN_RECLAIM_BYTES {
        return Ok(false);
    }
    let (meta, has_rows) = {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let mut entries = Vec::new();
        for entry in meta.range::<&str>(..)? {
            let (key, value) = entry?;
            entries.push((key.value().to_owned(), value.value()));
        }
        let has_rows = !txn.open_table(BATCHES)?.is_empty()?;
        (entries, has_rows)
    };
    if has_rows {
        // Rows of classes no longer configured: keep them, compact around them.
        let compacted = db.compact()?;
        if compacted {
            info!(path = %path.display(), before = size, "journal compacted");
        }
        return Ok(compacted);
    }
    let fresh = fresh_path(path);
    let storage = |what: &str, error: &dyn std::fmt::Display| {
        JournalError::Storage(format!("reclaiming journal space: {what}: {error}"))
    };
    remove_stale_fresh(path).map_err(|error| storage("removing an old replacement", &error))?;
    let replacement = Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(&fresh)
        .map_err(|error| storage("creating the replacement", &error))?;
    let written = (|| -> Result<(), redb::Error> {
        let txn = replacement.begin_write()?;
        {
            txn.open_table(BATCHES)?;
            let mut table = txn.open_table(META)?;
            for (key, value) in &meta {
                table.insert(key.as_str(), *value)?;
            }
        }
        txn.commit()?;
        Ok(())
    })();
    if let Err(error) = written {
        drop(replacement);
        let _ = fs::remove_file(&fresh);
        return Err(storage("writing the replacement", &error));
    }
    // Renamed while open: from here on the replacement is the journal, and
    // no step can leave the relay writing to a file that is no longer at `path`.
    if let Err(error) = fs::rename(&fresh, path) {
        drop(replacement);
        let _ = fs::remove_file(&fresh);
        return Err(storage("renaming the replacement", &error));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Makes the rename durable; if it were lost, the old file (which
        // holds the same counters) would simply come back.
        if let Err(error) = fs::File::open(parent).and_then(|dir| dir.sync_all()) {
            warn!(%error, dir = %parent.display(), "journal: syncing the directory after the swap failed");
        }
    }
    let old = std::mem::replace(db, replacement);
    // Closing frees the old file's blocks, which takes a while for a big file.
    let closer = move || drop(old);
    if let Err(error) = std::thread::Builder::new()
        .name("holdfast-journal-close".into())
        .spawn(closer)
    {
        warn!(%error, "journal: cannot start a thread to close the old file; closing it inline");
    }
    info!(path = %path.display(), before = size, "journal drained: replaced the file with an empty one");
    Ok(true)
}
