//! The etcd front end's lease table on disk (`etcd-front-leases.redb` in
//! the data dir), so a relay restarted within a lease's TTL still knows the
//! lease and registers its keys again.
//!
//! Written incrementally: one durable redb transaction per batch of
//! changes, holding only the rows that changed. A lease's row is its TTL
//! and its saved expiry; a key's row is its lease and its value, as bytes.
//! A keepalive writes nothing until its lease's expiry passes the saved
//! one ([`must_save`]), and then only that lease's row.
//!
//! Relays before this kept the table as one JSON document
//! (`etcd-front-leases.json`), rewritten whole on every change: it is read
//! once at start, written here in one transaction, and removed. A redb
//! file that cannot be opened is moved aside (`.quarantined-<seconds>`) and
//! the relay starts without leases, logged, as it does without a file.

use super::leases::{FrontLease, FrontLeaseId};
use bytes::Bytes;
use redb::{
    Builder, Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

/// Lease id → (TTL in seconds, saved expiry in Unix milliseconds).
const LEASES: TableDefinition<i64, (i64, u64)> = TableDefinition::new("leases");
/// Key → (lease id, value).
const KEYS: TableDefinition<&[u8], (i64, &[u8])> = TableDefinition::new("keys");
/// `format` → [`FORMAT`]; written with the first transaction (and the
/// JSON import, if any), so a file that has it needs no import.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FORMAT_KEY: &str = "format";
const FORMAT: u64 = 1;
/// The JSON table's format number.
const LEGACY_FORMAT: u32 = 1;
/// redb's page cache: the table is read once at start and written in
/// small transactions, so little cache is needed.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The saved expiry runs ahead of the true one by this fraction of the TTL
/// (one half), so a lease kept alive is written about once per half TTL.
const SLACK_DIVISOR: u64 = 2;

/// Why the table could not be written (or opened).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the lease table {path} could not be opened, so nothing is saved")]
    Unavailable { path: String },
    #[error("cannot write the lease table {path}: {message}")]
    Write { path: String, message: String },
}

/// One lease as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedLease {
    pub id: FrontLeaseId,
    pub ttl_seconds: i64,
    /// The saved expiry: never earlier than what the client was promised.
    pub expiry_ms: u64,
    pub keys: BTreeMap<Bytes, Bytes>,
}

impl SavedLease {
    pub fn into_lease(self) -> (FrontLeaseId, FrontLease) {
        (
            self.id,
            FrontLease {
                ttl_seconds: self.ttl_seconds,
                deadline_ms: self.expiry_ms,
                keys: self.keys,
            },
        )
    }
}

/// Rows to write in one transaction: a new row, or `None` to remove it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Per lease: (TTL in seconds, expiry to save).
    pub leases: BTreeMap<FrontLeaseId, Option<(i64, u64)>>,
    /// Per key: (lease, value).
    pub keys: BTreeMap<Bytes, Option<(FrontLeaseId, Bytes)>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.keys.is_empty()
    }
}

/// The expiry to save for a lease whose true expiry is `deadline_ms`: half
/// a TTL later, so keepalives need not write again for half a TTL.
///
/// Why a relay that crashed can trust it: the saved expiry S is only ever
/// written as the true expiry E of that moment plus half the TTL, and a
/// keepalive that promises an E beyond S is answered only once a new S is
/// committed ([`must_save`]). So E <= S <= E + TTL/2 holds whenever an
/// answer is out (E only moves forward, with the wall clock). A lease
/// restored with S therefore never ends before what its live client was
/// promised, and the lease of a client that died meanwhile outlives its
/// promise by at most half its TTL: less than the TTL, as etcd allows
/// itself when a leader changes.
pub fn expiry_to_save(deadline_ms: u64, ttl_seconds: i64) -> u64 {
    let ttl_ms = u64::try_from(ttl_seconds).unwrap_or(0).saturating_mul(1000);
    deadline_ms.saturating_add(ttl_ms / SLACK_DIVISOR)
}

/// Whether a lease whose true expiry moved to `deadline_ms` must be saved
/// before the keepalive that moved it is answered.
pub fn must_save(deadline_ms: u64, saved_expiry_ms: Option<u64>) -> bool {
    saved_expiry_ms.is_none_or(|saved| deadline_ms > saved)
}

/// The open table.
pub struct LeaseStore {
    path: PathBuf,
    db: Option<Database>,
}

/// What [`LeaseStore::open`] found.
pub struct Opened {
    pub store: LeaseStore,
    pub leases: Vec<SavedLease>,
    /// Keys whose lease has no row (none, unless the file was edited):
    /// removed with the next write.
    pub orphan_keys: Vec<Bytes>,
}

impl Opened {
    /// No table: nothing restored, every save fails (counted and logged).
    pub fn unavailable(path: PathBuf) -> Opened {
        Opened {
            store: LeaseStore { path, db: None },
            leases: Vec::new(),
            orphan_keys: Vec::new(),
        }
    }
}

impl LeaseStore {
    /// Opens (creating if needed) the table at `path`, importing and
    /// removing the JSON table at `legacy` once. Blocking.
    pub fn open(path: &Path, legacy: &Path) -> Opened {
        let db = match open_or_quarantine(path) {
            Ok(db) => db,
            Err(error) => {
                warn!(
                    path = %path.display(),
                    %error,
                    "cannot open the etcd front end's lease table; leases work but will not survive a restart"
                );
                return Opened::unavailable(path.to_path_buf());
            }
        };
        let store = LeaseStore {
            path: path.to_path_buf(),
            db: Some(db),
        };
        if let Err(error) = store.initialize(legacy) {
            warn!(path = %path.display(), %error, "cannot initialize the etcd front end's lease table");
        }
        match store.read_all() {
            Ok((leases, orphan_keys)) => Opened {
                store,
                leases,
                orphan_keys,
            },
            Err(error) => {
                warn!(
                    path = %path.display(),
                    %error,
                    "the etcd front end's lease table is unreadable; starting without leases"
                );
                Opened {
                    store,
                    leases: Vec::new(),
                    orphan_keys: Vec::new(),
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `changes` in one durable transaction. Blocking.
    pub fn write(&self, changes: &Changes) -> Result<(), StoreError> {
        let Some(db) = &self.db else {
            return Err(StoreError::Unavailable {
                path: self.path.display().to_string(),
            });
        };
        write_changes(db, changes, false).map_err(|error| StoreError::Write {
            path: self.path.display().to_string(),
            message: error.to_string(),
        })
    }

    /// Creates the tables on a new file, importing the JSON table if one
    /// is there; removes a JSON table an earlier start already imported.
    fn initialize(&self, legacy: &Path) -> Result<(), redb::Error> {
        let Some(db) = &self.db else { return Ok(()) };
        let initialized = {
            let txn = db.begin_read()?;
            match txn.open_table(META) {
                Ok(meta) => meta.get(FORMAT_KEY)?.is_some(),
                Err(redb::TableError::TableDoesNotExist(_)) => false,
                Err(error) => return Err(error.into()),
            }
        };
        if initialized {
            if legacy.exists() {
                // Imported before, and the relay stopped before removing it.
                remove_legacy(legacy);
            }
            return Ok(());
        }
        let imported = match read_legacy(legacy) {
            Ok(imported) => imported,
            Err(error) => {
                let aside = move_aside(legacy, "unreadable");
                warn!(
                    path = %legacy.display(),
                    moved_to = ?aside.ok(),
                    %error,
                    "the etcd front end's old JSON lease table is unreadable; not imported"
                );
                Vec::new()
            }
        };
        let mut changes = Changes::default();
        for lease in &imported {
            changes
                .leases
                .insert(lease.id, Some((lease.ttl_seconds, lease.expiry_ms)));
            for (key, value) in &lease.keys {
                changes
                    .keys
                    .insert(key.clone(), Some((lease.id, value.clone())));
            }
        }
        write_changes(db, &changes, true)?;
        if legacy.exists() {
            info!(
                from = %legacy.display(),
                to = %self.path.display(),
                leases = imported.len(),
                keys = changes.keys.len(),
                "etcd front end: lease table moved from JSON to redb"
            );
            remove_legacy(legacy);
        }
        Ok(())
    }

    /// Every saved lease with its keys, and keys no lease holds.
    fn read_all(&self) -> Result<(Vec<SavedLease>, Vec<Bytes>), redb::Error> {
        let Some(db) = &self.db else {
            return Ok((Vec::new(), Vec::new()));
        };
        let txn = db.begin_read()?;
        let leases_table = txn.open_table(LEASES)?;
        let keys_table = txn.open_table(KEYS)?;
        let mut leases: BTreeMap<FrontLeaseId, SavedLease> = BTreeMap::new();
        for row in leases_table.iter()? {
            let (id, value) = row?;
            let (ttl_seconds, expiry_ms) = value.value();
            leases.insert(
                id.value(),
                SavedLease {
                    id: id.value(),
                    ttl_seconds,
                    expiry_ms,
                    keys: BTreeMap::new(),
                },
            );
        }
        let mut orphans = Vec::new();
        for row in keys_table.iter()? {
            let (key, value) = row?;
            let key = Bytes::copy_from_slice(key.value());
            let (lease, value) = value.value();
            match leases.get_mut(&lease) {
                Some(saved) => {
                    saved.keys.insert(key, Bytes::copy_from_slice(value));
                }
                None => orphans.push(key),
            }
        }
        if !orphans.is_empty() {
            warn!(
                path = %self.path.display(),
                keys = orphans.len(),
                rows = keys_table.len()?,
                "etcd front end's lease table: keys without a lease are dropped"
            );
        }
        Ok((leases.into_values().collect(), orphans))
    }
}

fn write_changes(db: &Database, changes: &Changes, set_format: bool) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut leases = txn.open_table(LEASES)?;
        let mut keys = txn.open_table(KEYS)?;
        for (id, row) in &changes.leases {
            match row {
                Some(row) => leases.insert(*id, *row)?,
                None => leases.remove(*id)?,
            };
        }
        for (key, row) in &changes.keys {
            match row {
                Some((lease, value)) => keys.insert(key.as_ref(), (*lease, value.as_ref()))?,
                None => keys.remove(key.as_ref())?,
            };
        }
        if set_format {
            txn.open_table(META)?.insert(FORMAT_KEY, FORMAT)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Opens `path` with redb; a file redb rejects (or panics on, which it
/// documents for files corrupted outside of it) is moved aside and a new
/// one created.
fn open_or_quarantine(path: &Path) -> Result<Database, String> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
    }
    // A relay killed while creating the file leaves it empty: nothing was
    // ever saved in it.
    if std::fs::metadata(path).is_ok_and(|metadata| metadata.len() == 0) {
        let _ = std::fs::remove_file(path);
    }
    let open = || {
        panic::catch_unwind(AssertUnwindSafe(|| {
            Builder::new().set_cache_size(CACHE_BYTES).create(path)
        }))
    };
    let reason = match open() {
        Ok(Ok(db)) => return Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            return Err("another process has it open".to_string())
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => "redb panicked reading it".to_string(),
    };
    let aside = move_aside(path, "quarantined")
        .map_err(|error| format!("{reason}; cannot move it aside: {error}"))?;
    warn!(
        path = %path.display(),
        moved_to = %aside.display(),
        %reason,
        "the etcd front end's lease table is damaged: moved it aside, starting without leases"
    );
    match open() {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("redb panicked creating it".to_string()),
    }
}

/// Renames `path` to `<path>.<label>-<unix seconds>[-n]`, never over an
/// earlier one.
fn move_aside(path: &Path, label: &str) -> std::io::Result<PathBuf> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    for suffix in 0..1000u32 {
        let mut name = OsString::from(path.as_os_str());
        name.push(format!(".{label}-{seconds}"));
        if suffix > 0 {
            name.push(format!("-{suffix}"));
        }
        let target = PathBuf::from(name);
        if !target.exists() {
            std::fs::rename(path, &target)?;
            return Ok(target);
        }
    }
    Err(std::io::Error::other("no free name to move it to"))
}

fn remove_legacy(legacy: &Path) {
    let removed = std::fs::remove_file(legacy).and_then(|()| match legacy.parent() {
        Some(directory) if !directory.as_os_str().is_empty() => {
            std::fs::File::open(directory)?.sync_all()
        }
        _ => Ok(()),
    });
    if let Err(error) = removed {
        warn!(path = %legacy.display(), %error, "cannot remove the etcd front end's old JSON lease table (already imported)");
    }
}

/// The JSON table of earlier relays.
#[derive(Deserialize)]
struct LegacyFile {
    format: u32,
    leases: Vec<LegacyLease>,
}

#[derive(Deserialize)]
struct LegacyLease {
    id: FrontLeaseId,
    ttl_seconds: i64,
    deadline_ms: u64,
    keys: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The leases of the JSON table at `path`; none when there is no file.
fn read_legacy(path: &Path) -> Result<Vec<SavedLease>, String> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error.to_string()),
    };
    let file: LegacyFile = serde_json::from_slice(&text).map_err(|error| error.to_string())?;
    if file.format != LEGACY_FORMAT {
        return Err(format!("unknown format {}", file.format));
    }
    Ok(file
        .leases
        .into_iter()
        .map(|lease| SavedLease {
            id: lease.id,
            ttl_seconds: lease.ttl_seconds,
            expiry_ms: lease.deadline_ms,
            keys: lease
                .keys
                .into_iter()
                .map(|(key, value)| (Bytes::from(key), Bytes::from(value)))
                .collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &[u8]) -> Bytes {
        Bytes::copy_from_slice(text)
    }

    fn paths(directory: &tempfile::TempDir) -> (PathBuf, PathBuf) {
        (
            directory.path().join("etcd-front-leases.redb"),
            directory.path().join("etcd-front-leases.json"),
        )
    }

    #[test]
    fn changes_are_saved_row_by_row_and_come_back_with_values_as_bytes() {
        let directory = tempfile::tempdir().unwrap();
        let (path, legacy) = paths(&directory);
        let opened = LeaseStore::open(&path, &legacy);
        assert!(opened.leases.is_empty());
        let mut changes = Changes::default();
        changes.leases.insert(7, Some((30, 123_456)));
        changes.leases.insert(8, Some((10, 99)));
        changes
            .keys
            .insert(b(b"v1/a"), Some((7, b(b"\x00\xff binary"))));
        changes.keys.insert(b(b"v1/b"), Some((8, b(b"2"))));
        opened.store.write(&changes).unwrap();
        // Lease 8 ends; the key moves to 7; lease 7's expiry moves.
        let mut later = Changes::default();
        later.leases.insert(8, None);
        later.leases.insert(7, Some((30, 200_000)));
        later.keys.insert(b(b"v1/b"), Some((7, b(b"3"))));
        opened.store.write(&later).unwrap();
        drop(opened);

        let reopened = LeaseStore::open(&path, &legacy);
        assert!(reopened.orphan_keys.is_empty());
        assert_eq!(
            reopened.leases,
            vec![SavedLease {
                id: 7,
                ttl_seconds: 30,
                expiry_ms: 200_000,
                keys: [(b(b"v1/a"), b(b"\x00\xff binary")), (b(b"v1/b"), b(b"3"))]
                    .into_iter()
                    .collect(),
            }]
        );
    }

    #[test]
    fn large_values_cost_about_their_size_on_disk() {
        let directory = tempfile::tempdir().unwrap();
        let (path, legacy) = paths(&directory);
        let opened = LeaseStore::open(&path, &legacy);
        let value = Bytes::from(vec![0xa5u8; 500_000]);
        let mut changes = Changes::default();
        changes.leases.insert(1, Some((10, 1)));
        for key in 0..12 {
            changes.keys.insert(
                Bytes::from(format!("v1/big/{key}")),
                Some((1, value.clone())),
            );
        }
        opened.store.write(&changes).unwrap();
        // A lease row rewritten many times (keepalives) does not grow it.
        for expiry in 2..50 {
            let mut renewal = Changes::default();
            renewal.leases.insert(1, Some((10, expiry)));
            opened.store.write(&renewal).unwrap();
        }
        let size = std::fs::metadata(&path).unwrap().len();
        // 6 MB of values; JSON number arrays took 3.4 times that.
        assert!(size < 9_000_000, "{size} bytes");
    }

    #[test]
    fn a_json_table_is_imported_once_and_removed() {
        let directory = tempfile::tempdir().unwrap();
        let (path, legacy) = paths(&directory);
        std::fs::write(
            &legacy,
            br#"{"format":1,"leases":[{"id":31295,"ttl_seconds":30,"deadline_ms":123456,"keys":[[[118,49,47,97],[0,255]]]}]}"#,
        )
        .unwrap();
        let opened = LeaseStore::open(&path, &legacy);
        let expected = vec![SavedLease {
            id: 31295,
            ttl_seconds: 30,
            expiry_ms: 123_456,
            keys: [(b(b"v1/a"), b(b"\x00\xff"))].into_iter().collect(),
        }];
        assert_eq!(opened.leases, expected);
        assert!(!legacy.exists(), "the JSON table is removed once imported");
        drop(opened);
        // A JSON file that reappears (a stop before its removal) is stale:
        // removed, not imported over newer rows.
        std::fs::write(&legacy, br#"{"format":1,"leases":[]}"#).unwrap();
        let reopened = LeaseStore::open(&path, &legacy);
        assert_eq!(reopened.leases, expected);
        assert!(!legacy.exists());
    }

    #[test]
    fn an_unreadable_json_table_is_moved_aside_and_a_damaged_redb_file_quarantined() {
        let directory = tempfile::tempdir().unwrap();
        let (path, legacy) = paths(&directory);
        std::fs::write(&legacy, b"{not json").unwrap();
        let opened = LeaseStore::open(&path, &legacy);
        assert!(opened.leases.is_empty());
        assert!(!legacy.exists());
        drop(opened);
        std::fs::write(&path, vec![0x5au8; 8192]).unwrap();
        let reopened = LeaseStore::open(&path, &legacy);
        assert!(reopened.leases.is_empty());
        let mut changes = Changes::default();
        changes.leases.insert(1, Some((10, 1)));
        reopened.store.write(&changes).unwrap();
        let names: Vec<String> = std::fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|name| name.contains(".json.unreadable-")),
            "{names:?}"
        );
        assert!(
            names.iter().any(|name| name.contains(".redb.quarantined-")),
            "{names:?}"
        );
    }

    #[test]
    fn the_saved_expiry_runs_half_a_ttl_ahead_and_keepalives_save_only_past_it() {
        let saved = expiry_to_save(10_000, 10);
        assert_eq!(saved, 15_000);
        assert!(must_save(10_000, None), "never saved");
        // Renewals every TTL/3 move the expiry by 3.3 s: the first fits.
        assert!(!must_save(13_333, Some(saved)));
        assert!(!must_save(15_000, Some(saved)));
        assert!(must_save(16_667, Some(saved)));
    }
}
