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
//!
//! Also what every path that opens the file shares (opening, recovery,
//! reclaim, inspection): the page cache size and the text of a panic caught
//! around a redb call.

use super::ledger::ClassLedger;
use super::record::{self, CorruptRow, RowHeader};
use super::{JournalError, ReadBatch};
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, StorageError, Table, TableDefinition};
use std::collections::BTreeMap;
use std::ops::Bound;

pub(super) const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("batches");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb's page cache. Its default (1 GiB) would let the cache alone break
/// the relay's memory budget; the journal reads rows once, sequentially, so
/// a small cache costs little.
pub(super) const CACHE_BYTES: usize = 16 * 1024 * 1024;

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

/// A row whose checksum failed: the sequences it held and why it is bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DamagedRow {
    pub class: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub error: CorruptRow,
}

/// Where the row after the one starting at `first_seq` starts, if any.
pub(super) fn next_row_start(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    class: &str,
    first_seq: u64,
) -> Result<Option<u64>, StorageError> {
    let after = (
        Bound::Excluded((class, first_seq)),
        Bound::Included((class, u64::MAX)),
    );
    Ok(match batches.range::<(&str, u64)>(after)?.next() {
        Some(entry) => Some(entry?.0.value().1),
        None => None,
    })
}

/// The last sequence of a row, from its header when that is intact, else
/// from where the next row starts (or the class's last sequence).
pub(super) fn row_end(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    class: &str,
    first_seq: u64,
    header: Option<&RowHeader>,
    last_seq_of_class: u64,
) -> Result<u64, StorageError> {
    if let Some(header) = header {
        return Ok(header.last_seq(first_seq));
    }
    Ok(next_row_start(batches, class, first_seq)?
        .map_or(last_seq_of_class, |next| next.saturating_sub(1))
        .max(first_seq))
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

/// An edge row as checked at open: its facts, or what is known of it when
/// its checksum fails (with its header, when that much is intact).
pub(super) type EdgeRow = Result<RowFacts, (DamagedRow, Option<RowHeader>)>;

/// The first and last rows of `class`, fully checked; `None` when it has
/// no rows. `last_seq_of_class` bounds a damaged last row whose header
/// cannot say where it ends.
pub(super) fn edge_rows(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    class: &str,
    floor: u64,
    last_seq_of_class: u64,
) -> Result<Option<(EdgeRow, EdgeRow)>, StorageError> {
    let check = |first_seq: u64, row: &[u8]| -> Result<EdgeRow, StorageError> {
        match inspect_row(first_seq, row, floor) {
            Ok(facts) => Ok(Ok(facts)),
            Err(error) => {
                let header = record::parse_header(row).ok();
                let last_seq = row_end(
                    batches,
                    class,
                    first_seq,
                    header.as_ref(),
                    last_seq_of_class,
                )?;
                let damaged = DamagedRow {
                    class: class.to_owned(),
                    first_seq,
                    last_seq,
                    error,
                };
                Ok(Err((damaged, header)))
            }
        }
    };
    let mut rows = batches.range((class, 0)..=(class, u64::MAX))?;
    let Some(first) = rows.next() else {
        return Ok(None);
    };
    let (key, value) = first?;
    let first = check(key.value().1, value.value())?;
    let last = match rows.next_back() {
        None => first.clone(),
        Some(entry) => {
            let (key, value) = entry?;
            check(key.value().1, value.value())?
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
/// above the class's removal floor), oldest first, at most `max`; damaged
/// rows on the way are skipped and returned (with their ranges in the batch).
pub(super) fn read_after(
    db: &impl ReadableDatabase,
    class: &str,
    after_seq: u64,
    max: usize,
) -> Result<(ReadBatch, Vec<DamagedRow>), JournalError> {
    let mut batch = ReadBatch::default();
    let mut damaged = Vec::new();
    if max == 0 {
        return Ok((batch, damaged));
    }
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    // The floor from the same snapshot as the rows: a partly trimmed head row
    // still holds messages that are gone.
    let field = |field| -> Result<u64, StorageError> {
        Ok(meta
            .get(meta_key(class, field).as_str())?
            .map_or(0, |value| value.value()))
    };
    let confirmed = field(MetaField::Confirmed)?;
    let last_seq_of_class = field(MetaField::NextSeq)?.saturating_sub(1);
    let from = after_seq.max(confirmed).saturating_add(1);
    let batches = txn.open_table(BATCHES)?;
    // The row holding `from` is the last one starting at or before it.
    let start = match batches.range((class, 0)..=(class, from))?.next_back() {
        Some(entry) => entry?.0.value().1,
        None => from,
    };
    let out = &mut batch.messages;
    for entry in batches.range((class, start)..=(class, u64::MAX))? {
        let (key, value) = entry?;
        let first_seq = key.value().1;
        let mut damage = |error, header: Option<&RowHeader>| -> Result<(), StorageError> {
            let last_seq = row_end(&batches, class, first_seq, header, last_seq_of_class)?;
            if last_seq >= from {
                damaged.push(DamagedRow {
                    class: class.to_owned(),
                    first_seq,
                    last_seq,
                    error,
                });
            }
            Ok(())
        };
        let header = match record::parse_header(value.value()) {
            Ok(header) => header,
            Err(error) => {
                damage(error, None)?;
                continue;
            }
        };
        if header.last_seq(first_seq) < from {
            continue;
        }
        // One copy of the row; the decoded fields are slices of it.
        let row = Bytes::copy_from_slice(value.value());
        let kept = out.len();
        let decoded = record::walk(&row).and_then(|(_, walk)| {
            for (seq, span) in (first_seq..).zip(walk) {
                let span = span?;
                if seq < from {
                    continue;
                }
                out.push(record::decode_message(&row, &span, seq)?);
                if out.len() >= max {
                    break;
                }
            }
            Ok(())
        });
        if let Err(error) = decoded {
            // Nothing of a row that fails its checks is delivered.
            out.truncate(kept);
            damage(error, Some(&header))?;
            continue;
        }
        if out.len() >= max {
            break;
        }
    }
    batch.skipped = damaged
        .iter()
        .map(|row| (row.first_seq.max(from), row.last_seq))
        .collect();
    Ok((batch, damaged))
}

/// What a panic caught around a redb call said, for the error it becomes.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
