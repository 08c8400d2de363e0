//! `holdfastd journal salvage`: every readable message of a journal file,
//! including one moved aside because redb could not open it.
//!
//! It does not ask redb: a set-aside file is one redb refused. Instead it
//! scans the file's pages for redb leaf pages holding journal rows (key:
//! class name and first sequence; value: a row whose two checksums hold),
//! and for the `meta` leaves' `<class>/confirmed` counters. A row is
//! exported once even where copy-on-write left several copies of it;
//! messages at or below the highest `confirmed` found for their class were
//! already delivered and are left out. A row whose checksum fails is
//! counted and skipped; a row written by a commit that failed (its
//! publisher was told so) may be exported, as it cannot be told apart.
//!
//! Memory: one page header at a time, one row at a time, and an index of
//! one entry per row found (rows hold up to 128 KiB of messages).

use super::record;
use super::{JournalError, StoredMessage};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// redb's page size: every page, and so every leaf, starts at a multiple.
const PAGE: u64 = 4096;
/// redb's tag for a leaf page.
const LEAF: u8 = 1;
/// A leaf larger than this is taken for garbage (a row is at most one
/// message of 64 MiB, the largest frame, plus framing).
const MAX_LEAF_BYTES: u64 = 80 * 1024 * 1024;
/// Width of a `meta` value (u64).
const META_VALUE_BYTES: usize = 8;

/// One exported message.
#[derive(Debug, Clone)]
pub struct SalvagedMessage {
    pub class: String,
    pub message: StoredMessage,
}

/// What a salvage found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalvageReport {
    pub messages: u64,
    /// Distinct rows found intact.
    pub rows: u64,
    /// Rows whose checksum failed and of which no intact copy was found.
    pub damaged_rows: u64,
    /// Messages left out as already delivered (at or below `confirmed`).
    pub delivered: u64,
}

/// Where an intact row's bytes are in the file.
#[derive(Debug, Clone, Copy)]
struct RowAt {
    offset: u64,
    len: usize,
}

/// Everything the page scan found.
#[derive(Default)]
struct Index {
    rows: BTreeMap<(String, u64), RowAt>,
    damaged: BTreeSet<(String, u64)>,
    confirmed: BTreeMap<String, u64>,
}

/// Exports every readable, undelivered message of the journal file at
/// `path`, per class in sequence order, handing each to `emit`.
pub fn salvage(
    path: &Path,
    emit: &mut dyn FnMut(SalvagedMessage) -> std::io::Result<()>,
) -> Result<SalvageReport, JournalError> {
    let io = |what: &str, error: std::io::Error| {
        JournalError::Storage(format!("{what} {}: {error}", path.display()))
    };
    let file = File::open(path).map_err(|error| io("cannot open", error))?;
    let len = file
        .metadata()
        .map_err(|error| io("cannot read", error))?
        .len();
    let mut index = Index::default();
    let mut page = 0;
    while page < len {
        scan_page(&file, page, len, &mut index).map_err(|error| io("cannot read", error))?;
        page += PAGE;
    }
    let mut report = SalvageReport {
        damaged_rows: index
            .damaged
            .iter()
            .filter(|key| !index.rows.contains_key(*key))
            .count() as u64,
        ..SalvageReport::default()
    };
    for ((class, first_seq), at) in &index.rows {
        let mut row = vec![0; at.len];
        file.read_exact_at(&mut row, at.offset)
            .map_err(|error| io("cannot read", error))?;
        let row = Bytes::from(row);
        let floor = index.confirmed.get(class).copied().unwrap_or(0);
        let Ok((_, walk)) = record::walk(&row) else {
            report.damaged_rows += 1;
            continue;
        };
        report.rows += 1;
        for (seq, span) in (*first_seq..).zip(walk) {
            let Ok(span) = span else {
                break;
            };
            if seq <= floor {
                report.delivered += 1;
                continue;
            }
            let Ok(message) = record::decode_message(&row, &span, seq) else {
                break;
            };
            report.messages += 1;
            emit(SalvagedMessage {
                class: class.clone(),
                message,
            })
            .map_err(|error| JournalError::Storage(format!("cannot write: {error}")))?;
        }
    }
    Ok(report)
}

/// Looks at the page at `offset` as a leaf of either table.
fn scan_page(file: &File, offset: u64, len: u64, index: &mut Index) -> std::io::Result<()> {
    let mut head = [0u8; 4];
    if file.read_exact_at(&mut head, offset).is_err() || head[0] != LEAF {
        return Ok(());
    }
    let pairs = usize::from(u16::from_le_bytes([head[2], head[3]]));
    if pairs == 0 {
        return Ok(());
    }
    // `batches` leaves have variable keys and values: two offset arrays.
    if let Some(leaf) = read_leaf(file, offset, len, pairs, true)? {
        for (key, range) in &leaf.ranges {
            let (key, value) = (&leaf.bytes[key.clone()], &leaf.bytes[range.clone()]);
            let Some((class, first_seq)) = parse_row_key(key) else {
                continue;
            };
            if record::parse_header(value).is_err() {
                continue;
            }
            let key = (class.to_owned(), first_seq);
            if record::walk(value).is_ok() {
                let at = RowAt {
                    offset: offset + range.start as u64,
                    len: value.len(),
                };
                index.rows.entry(key).or_insert(at);
            } else {
                index.damaged.insert(key);
            }
        }
        return Ok(());
    }
    // `meta` leaves: variable keys, u64 values.
    if let Some(leaf) = read_leaf(file, offset, len, pairs, false)? {
        for (key, value) in &leaf.ranges {
            let (key, value) = (&leaf.bytes[key.clone()], &leaf.bytes[value.clone()]);
            let (Ok(key), Ok(value)) = (std::str::from_utf8(key), <[u8; 8]>::try_from(value))
            else {
                continue;
            };
            if let Some(class) = key.strip_suffix("/confirmed") {
                let confirmed = index.confirmed.entry(class.to_owned()).or_default();
                *confirmed = (*confirmed).max(u64::from_le_bytes(value));
            }
        }
    }
    Ok(())
}

/// A leaf page's bytes and the (key, value) ranges in them.
struct Leaf {
    bytes: Vec<u8>,
    ranges: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

/// Reads a leaf of `pairs` entries at `offset` if its offset arrays are
/// consistent; `variable_values`: values have their own offset array (else
/// they are u64s).
fn read_leaf(
    file: &File,
    offset: u64,
    len: u64,
    pairs: usize,
    variable_values: bool,
) -> std::io::Result<Option<Leaf>> {
    let arrays = if variable_values { 2 } else { 1 };
    let keys_start = 4 + 4 * pairs * arrays;
    let mut offsets = vec![0u8; 4 * pairs * arrays];
    if offset + keys_start as u64 > len {
        return Ok(None);
    }
    file.read_exact_at(&mut offsets, offset + 4)?;
    let at = |i: usize| {
        let bytes = [
            offsets[4 * i],
            offsets[4 * i + 1],
            offsets[4 * i + 2],
            offsets[4 * i + 3],
        ];
        u32::from_le_bytes(bytes) as usize
    };
    let mut ranges = Vec::with_capacity(pairs);
    let mut key_start = keys_start;
    let keys_end = at(pairs - 1);
    let mut value_start = keys_end;
    for i in 0..pairs {
        let key_end = at(i);
        let value_end = if variable_values {
            at(pairs + i)
        } else {
            keys_end + META_VALUE_BYTES * (i + 1)
        };
        if key_end <= key_start || value_end < value_start {
            return Ok(None);
        }
        ranges.push((key_start..key_end, value_start..value_end));
        key_start = key_end;
        value_start = value_end;
    }
    let total = value_start as u64;
    if total > MAX_LEAF_BYTES || offset + total > len {
        return Ok(None);
    }
    let mut bytes = vec![0u8; value_start];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(Some(Leaf { bytes, ranges }))
}

/// A `batches` key: redb's encoding of `(&str, u64)` (the name's length as
/// redb's varint, the name, the sequence little-endian).
fn parse_row_key(key: &[u8]) -> Option<(&str, u64)> {
    let (name_len, skip) = match *key.first()? {
        len @ 0..=253 => (usize::from(len), 1),
        254 => (
            usize::from(u16::from_le_bytes([*key.get(1)?, *key.get(2)?])),
            3,
        ),
        255 => (
            u32::from_le_bytes([*key.get(1)?, *key.get(2)?, *key.get(3)?, *key.get(4)?]) as usize,
            5,
        ),
    };
    if key.len() != skip + name_len + 8 {
        return None;
    }
    let name = std::str::from_utf8(&key[skip..skip + name_len]).ok()?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&key[skip + name_len..]);
    let seq = u64::from_le_bytes(seq);
    (seq > 0).then_some((name, seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{
        ClassLimits, Headers, Journal, JournalSettings, NewMessage, Text, WhenFull,
    };
    use std::fs;
    use tempfile::TempDir;

    fn settings(dir: &TempDir) -> JournalSettings {
        let class = |name: &str| ClassLimits {
            name: name.to_owned(),
            max_bytes: u64::MAX,
            when_full: WhenFull::Reject,
        };
        JournalSettings {
            path: dir.path().join("journal.redb"),
            classes: vec![class("prefill"), class("decode")],
            reserve_bytes: 0,
        }
    }

    fn message(i: u64) -> NewMessage {
        NewMessage {
            subject: Text::from(format!("subj.{i}")),
            reply: None,
            headers: Headers::new(),
            payload: Bytes::from(format!("payload-{i:06}")),
            accepted_at_ms: 1_000 + i,
            stamp: None,
        }
    }

    /// `prefill` rows 1..=10, 11..=20, 21..=30 (one command each, so one
    /// row each), 5 of them delivered; `decode` 1..=3.
    async fn journal_with_rows(settings: &JournalSettings) {
        let (journal, _) = Journal::open(settings.clone()).unwrap();
        for (class, rows) in [(0, 0..10u64), (0, 10..20), (0, 20..30), (1, 0..3)] {
            let pending = journal
                .submit_many(class, rows.map(message).collect())
                .await;
            for result in pending.unwrap().await.unwrap() {
                result.unwrap();
            }
        }
        journal.confirm(0, 5).await.unwrap();
    }

    /// Flips every byte of every copy of `needle` in the file, as a disk would
    /// (redb keeps older copies of pages until it reuses them).
    fn damage_in_file(path: &Path, needle: &[u8]) {
        let mut bytes = fs::read(path).unwrap();
        let mut copies = 0;
        let mut at = 0;
        while let Some(found) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
            let start = at + found;
            for byte in &mut bytes[start..start + needle.len()] {
                *byte ^= 0xff;
            }
            copies += 1;
            at = start + needle.len();
        }
        assert!(copies > 0, "{needle:?} not in the file");
        fs::write(path, bytes).unwrap();
    }

    fn salvaged(path: &Path) -> (Vec<(String, u64, String)>, SalvageReport) {
        let mut found = Vec::new();
        let report = salvage(path, &mut |salvaged| {
            let payload = String::from_utf8_lossy(&salvaged.message.payload).into_owned();
            found.push((salvaged.class, salvaged.message.seq, payload));
            Ok(())
        })
        .unwrap();
        (found, report)
    }

    #[tokio::test]
    async fn exports_what_is_undelivered_and_readable_in_order() {
        let dir = TempDir::new().unwrap();
        let settings = settings(&dir);
        journal_with_rows(&settings).await;
        damage_in_file(&settings.path, b"payload-000015");
        let (found, report) = salvaged(&settings.path);
        let mut expected: Vec<(String, u64, String)> = (0..3)
            .map(|i| ("decode".into(), i + 1, format!("payload-{i:06}")))
            .collect();
        expected.extend(
            (6..=10)
                .chain(21..=30)
                .map(|seq| ("prefill".into(), seq, format!("payload-{:06}", seq - 1))),
        );
        assert_eq!(found, expected);
        assert_eq!(report.messages, 18);
        assert_eq!(report.damaged_rows, 1);
        assert_eq!(report.delivered, 5);
    }

    #[tokio::test]
    async fn reads_a_file_redb_cannot_open() {
        let dir = TempDir::new().unwrap();
        let settings = settings(&dir);
        journal_with_rows(&settings).await;
        // redb's own header gone: redb refuses the file, the rows are still there.
        let mut bytes = fs::read(&settings.path).unwrap();
        bytes[..512].fill(0xa5);
        fs::write(&settings.path, &bytes).unwrap();
        assert!(redb::Database::open(&settings.path).is_err());
        let (found, report) = salvaged(&settings.path);
        assert_eq!(report.messages, 28);
        let prefill: Vec<u64> = found
            .iter()
            .filter(|(class, _, _)| class == "prefill")
            .map(|(_, seq, _)| *seq)
            .collect();
        assert_eq!(prefill, (6..=30).collect::<Vec<u64>>());
    }

    #[test]
    fn row_keys_decode_as_redb_encodes_them() {
        let mut key = vec![7u8];
        key.extend_from_slice(b"prefill");
        key.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(parse_row_key(&key), Some(("prefill", 42)));
        assert_eq!(
            parse_row_key(&key[..key.len() - 1]),
            None,
            "length must add up"
        );
        assert_eq!(parse_row_key(&[]), None);
    }
}
