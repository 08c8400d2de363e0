//! The redb layout of the journal and the reads against it.
//!
//! Two tables:
//! - `batches`: (class name, first sequence) → one row of messages (see
//!   `record`). One row per class per group commit keeps redb at a few rows
//!   per commit instead of one per message.
//! - `meta`: `"<class>/<field>"` → u64 for the fields of a [`ClassLedger`],
//!   plus `"@format"`. Written in the same transaction as the rows, so the
//!   counters and the rows never disagree after a crash.
//!
//! Classes are keyed by name, so reordering classes in the config is harmless.

use super::ledger::ClassLedger;
use super::record::{self, CorruptRow};
use super::{JournalError, StoredMessage};
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, StorageError, Table, TableDefinition};
use std::collections::BTreeMap;
use std::ops::Bound;

pub(super) const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("batches");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Meta key holding the layout version of this file.
pub(super) const FORMAT_KEY: &str = "@format";
pub(super) const FORMAT_VERSION: u64 = 1;

/// The persisted fields of a ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MetaField {
    NextSeq,
    Confirmed,
    Messages,
    Bytes,
}

impl MetaField {
    const ALL: [MetaField; 4] = [
        MetaField::NextSeq,
        MetaField::Confirmed,
        MetaField::Messages,
        MetaField::Bytes,
    ];

    fn as_str(self) -> &'static str {
        match self {
            MetaField::NextSeq => "next_seq",
            MetaField::Confirmed => "confirmed",
            MetaField::Messages => "messages",
            MetaField::Bytes => "bytes",
        }
    }

    fn parse(field: &str) -> Option<MetaField> {
        MetaField::ALL.into_iter().find(|f| f.as_str() == field)
    }
}

/// `"<class>/<field>"`; parsed from the last `/`, so class names may contain one.
pub(super) fn meta_key(class: &str, field: MetaField) -> String {
    format!("{class}/{}", field.as_str())
}

/// Persists `ledger` (everything but the oldest time, which is derived).
pub(super) fn write_ledger(
    meta: &mut Table<&str, u64>,
    class: &str,
    ledger: &ClassLedger,
) -> Result<(), StorageError> {
    for field in MetaField::ALL {
        let value = match field {
            MetaField::NextSeq => ledger.next_seq,
            MetaField::Confirmed => ledger.confirmed,
            MetaField::Messages => ledger.messages,
            MetaField::Bytes => ledger.bytes,
        };
        meta.insert(meta_key(class, field).as_str(), value)?;
    }
    Ok(())
}

/// Everything in `meta`: the format version (if recorded) and the ledger of
/// every class named there. A key that does not parse, or a class missing a
/// field, is reported as a problem with the file.
pub(super) struct MetaContents {
    pub format: Option<u64>,
    pub classes: BTreeMap<String, ClassLedger>,
}

pub(super) fn read_meta(
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<Result<MetaContents, String>, StorageError> {
    let mut format = None;
    let mut fields: BTreeMap<String, [Option<u64>; 4]> = BTreeMap::new();
    for entry in meta.range::<&str>(..)? {
        let (key, value) = entry?;
        let (key, value) = (key.value(), value.value());
        if key == FORMAT_KEY {
            format = Some(value);
            continue;
        }
        let Some((class, field)) = key
            .rsplit_once('/')
            .and_then(|(class, field)| Some((class, MetaField::parse(field)?)))
        else {
            return Ok(Err(format!("unknown meta key {key:?}")));
        };
        let slot = fields.entry(class.to_owned()).or_default();
        slot[field as usize] = Some(value);
    }
    let mut classes = BTreeMap::new();
    for (class, values) in fields {
        let [Some(next_seq), Some(confirmed), Some(messages), Some(bytes)] = values else {
            return Ok(Err(format!("class {class:?} is missing meta fields")));
        };
        let ledger = ClassLedger {
            next_seq,
            confirmed,
            messages,
            bytes,
            oldest_accepted_ms: None,
        };
        classes.insert(class, ledger);
    }
    Ok(Ok(MetaContents { format, classes }))
}

/// Either redb failed or a row is damaged.
#[derive(Debug)]
pub(super) enum RowReadError {
    Storage(StorageError),
    Corrupt { first_seq: u64, error: CorruptRow },
}

impl From<StorageError> for RowReadError {
    fn from(error: StorageError) -> Self {
        RowReadError::Storage(error)
    }
}

impl RowReadError {
    pub(super) fn into_journal_error(self, class: &str) -> JournalError {
        match self {
            RowReadError::Storage(error) => JournalError::Storage(error.to_string()),
            RowReadError::Corrupt { first_seq, error } => JournalError::Storage(format!(
                "class {class:?}, row at sequence {first_seq}: {error}"
            )),
        }
    }
}

/// Facts about one row gathered by [`inspect_row`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowFacts {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Budget bytes of the messages above `floor`.
    pub live_bytes: u64,
    /// Time of the first message above `floor`.
    pub first_live_accepted_ms: Option<u64>,
}

/// Fully checks a row (both checksums, every message) and sums what lies above `floor`.
pub(super) fn inspect_row(first_seq: u64, row: &[u8], floor: u64) -> Result<RowFacts, CorruptRow> {
    let (header, walk) = record::walk(row)?;
    let mut facts = RowFacts {
        first_seq,
        last_seq: header.last_seq(first_seq),
        live_bytes: 0,
        first_live_accepted_ms: None,
    };
    let mut total = 0;
    for (seq, span) in (first_seq..).zip(walk) {
        let span = span?;
        total += span.size;
        if seq > floor {
            facts.live_bytes += span.size;
            facts
                .first_live_accepted_ms
                .get_or_insert(span.accepted_at_ms);
        }
    }
    if total != header.total_bytes {
        return Err(CorruptRow("header byte total disagrees with the messages"));
    }
    Ok(facts)
}

/// The first and last rows of `class`, fully checked; `None` when it has no rows.
pub(super) fn edge_rows(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    class: &str,
    floor: u64,
) -> Result<Option<(RowFacts, RowFacts)>, RowReadError> {
    let mut rows = batches.range((class, 0)..=(class, u64::MAX))?;
    let Some(first) = rows.next() else {
        return Ok(None);
    };
    let (key, value) = first?;
    let first_seq = key.value().1;
    let first = inspect_row(first_seq, value.value(), floor)
        .map_err(|error| RowReadError::Corrupt { first_seq, error })?;
    let last = match rows.next_back() {
        None => first,
        Some(entry) => {
            let (key, value) = entry?;
            let first_seq = key.value().1;
            inspect_row(first_seq, value.value(), floor)
                .map_err(|error| RowReadError::Corrupt { first_seq, error })?
        }
    };
    Ok(Some((first, last)))
}

/// The distinct class names that have rows, found by skipping from class to
/// class rather than reading every row.
pub(super) fn classes_with_rows(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
) -> Result<Vec<String>, StorageError> {
    let mut names = Vec::new();
    let mut next = batches.first()?.map(|(key, _)| key.value().0.to_owned());
    while let Some(name) = next {
        let after = (Bound::Excluded((name.as_str(), u64::MAX)), Bound::Unbounded);
        next = match batches.range::<(&str, u64)>(after)?.next() {
            Some(entry) => Some(entry?.0.value().0.to_owned()),
            None => None,
        };
        names.push(name);
    }
    Ok(names)
}

/// Committed messages of `class` with a sequence above `after_seq` (and
/// above the class's removal floor), oldest first, at most `max`.
pub(super) fn read_after(
    db: &impl ReadableDatabase,
    class: &str,
    after_seq: u64,
    max: usize,
) -> Result<Vec<StoredMessage>, JournalError> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    // The floor from the same snapshot as the rows: a partly trimmed head row
    // still holds messages that are gone.
    let confirmed = meta
        .get(meta_key(class, MetaField::Confirmed).as_str())?
        .map_or(0, |value| value.value());
    let from = after_seq.max(confirmed).saturating_add(1);
    let batches = txn.open_table(BATCHES)?;
    let read = || -> Result<Vec<StoredMessage>, RowReadError> {
        // The row holding `from` is the last one starting at or before it.
        let start = match batches.range((class, 0)..=(class, from))?.next_back() {
            Some(entry) => entry?.0.value().1,
            None => from,
        };
        let mut out = Vec::with_capacity(max.min(4096));
        for entry in batches.range((class, start)..=(class, u64::MAX))? {
            let (key, value) = entry?;
            let first_seq = key.value().1;
            let corrupt = |error| RowReadError::Corrupt { first_seq, error };
            let header = record::parse_header(value.value()).map_err(corrupt)?;
            if header.last_seq(first_seq) < from {
                continue;
            }
            // One copy of the row; the decoded fields are slices of it.
            let row = Bytes::copy_from_slice(value.value());
            let (_, walk) = record::walk(&row).map_err(corrupt)?;
            for (seq, span) in (first_seq..).zip(walk) {
                let span = span.map_err(corrupt)?;
                if seq < from {
                    continue;
                }
                out.push(record::decode_message(&row, &span, seq).map_err(corrupt)?);
                if out.len() >= max {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    };
    read().map_err(|error| error.into_journal_error(class))
}
