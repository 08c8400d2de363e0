//! Removing messages from the head of a class. Confirm, expiry and
//! drop-oldest all take a prefix of the class in sequence order (FIFO is
//! never broken by a hole), so they share one walk: over the class's stored
//! rows, oldest first, then over the messages accepted earlier in the same
//! group commit and not yet written.
//!
//! Planning only reads; the writer applies a plan (deletes the fully removed
//! rows, raises the floor) only when the whole plan was computed.
//!
//! A damaged row (its checksum fails, or it was found damaged before) goes
//! whole as soon as the head reaches it, whatever the cut: its messages
//! cannot be delivered, and keeping it would stop every later removal.

use super::record::{self, EncodedMessage, RowHeader, HEADER_LEN};
use super::store::{self, DamagedRow};
use redb::{ReadableTable, StorageError};

/// Which head messages to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// Confirmed by NATS: sequences up to and including this one.
    Through(u64),
    /// Retention: messages accepted before this time, up to the first younger one.
    AcceptedBefore(u64),
    /// Drop-oldest: as few messages as free at least this many budget bytes.
    FreeBytes(u64),
}

impl Cut {
    /// Whether the next head message goes, given what was removed so far.
    fn takes(&self, seq: u64, accepted_at_ms: u64, removed_bytes: u64) -> bool {
        match *self {
            Cut::Through(through) => seq <= through,
            Cut::AcceptedBefore(cutoff) => accepted_at_ms < cutoff,
            Cut::FreeBytes(need) => removed_bytes < need,
        }
    }

    /// Whether a row with no removed messages in it goes whole, judged from
    /// its header alone (saves walking and checksumming the body).
    fn takes_row(&self, first_seq: u64, header: &RowHeader, removed_bytes: u64) -> bool {
        match *self {
            Cut::Through(through) => header.last_seq(first_seq) <= through,
            Cut::AcceptedBefore(cutoff) => header.max_accepted_ms < cutoff,
            Cut::FreeBytes(need) => removed_bytes.saturating_add(header.total_bytes) <= need,
        }
    }
}

/// What a cut removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct HeadRemoval {
    /// Keys (first sequences) of rows left with nothing live.
    pub rows_to_delete: Vec<u64>,
    pub messages: u64,
    pub bytes: u64,
    /// The new floor: the last removed sequence.
    pub through_seq: u64,
    /// How many not-yet-written messages at the front of the pending list go.
    pub pending_taken: usize,
    /// `accepted_at_ms` of the first message that stays (None: the class is empty).
    pub oldest_left: Option<u64>,
    /// Damaged rows among those removed; their messages are in `messages`
    /// too, and also in `damaged_messages`.
    pub damaged: Vec<DamagedRow>,
    pub damaged_messages: u64,
}

/// Plans `cut` over the rows of `class` above `floor`, then over `pending`
/// (the class's unwritten messages, whose first sequence is `pending_first_seq`).
/// `known_damaged` says whether the row starting at a sequence was found
/// damaged earlier.
pub(super) fn plan(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    class: &str,
    floor: u64,
    pending: &[EncodedMessage],
    pending_first_seq: u64,
    cut: Cut,
    known_damaged: &dyn Fn(u64) -> bool,
) -> Result<HeadRemoval, StorageError> {
    let mut out = HeadRemoval {
        through_seq: floor,
        ..HeadRemoval::default()
    };
    for entry in batches.range((class, 0)..=(class, u64::MAX))? {
        let (key, value) = entry?;
        let first_seq = key.value().1;
        let row = value.value();
        let header = match record::parse_header(row) {
            Ok(header) if !known_damaged(first_seq) => header,
            Ok(header) => {
                let error = record::CorruptRow("found damaged earlier");
                take_damaged(
                    batches,
                    class,
                    first_seq,
                    row,
                    Some(&header),
                    error,
                    pending_first_seq,
                    &mut out,
                )?;
                continue;
            }
            Err(error) => {
                take_damaged(
                    batches,
                    class,
                    first_seq,
                    row,
                    None,
                    error,
                    pending_first_seq,
                    &mut out,
                )?;
                continue;
            }
        };
        let last_seq = header.last_seq(first_seq);
        if last_seq <= out.through_seq {
            // Nothing live left in it (normally already deleted).
            out.rows_to_delete.push(first_seq);
            continue;
        }
        if first_seq > out.through_seq && cut.takes_row(first_seq, &header, out.bytes) {
            out.messages += u64::from(header.count);
            out.bytes += header.total_bytes;
            out.through_seq = last_seq;
            out.rows_to_delete.push(first_seq);
            continue;
        }
        let spans =
            match record::walk(row).and_then(|(_, walk)| walk.collect::<Result<Vec<_>, _>>()) {
                Ok(spans) => spans,
                Err(error) => {
                    take_damaged(
                        batches,
                        class,
                        first_seq,
                        row,
                        Some(&header),
                        error,
                        pending_first_seq,
                        &mut out,
                    )?;
                    continue;
                }
            };
        for (seq, span) in (first_seq..).zip(spans) {
            if seq <= out.through_seq {
                continue;
            }
            if !cut.takes(seq, span.accepted_at_ms, out.bytes) {
                out.oldest_left = Some(span.accepted_at_ms);
                return Ok(out);
            }
            out.messages += 1;
            out.bytes += span.size;
            out.through_seq = seq;
        }
        out.rows_to_delete.push(first_seq);
    }
    for (seq, message) in (pending_first_seq..).zip(pending) {
        if !cut.takes(seq, message.accepted_at_ms, out.bytes) {
            out.oldest_left = Some(message.accepted_at_ms);
            return Ok(out);
        }
        out.messages += 1;
        out.bytes += message.size;
        out.through_seq = seq;
        out.pending_taken += 1;
    }
    Ok(out)
}

/// Removes a damaged row whole. Its budget bytes are its header's total
/// when the header is intact, else an upper bound from its length (the
/// ledger clamps at zero), shared out by the part of it still live.
#[allow(clippy::too_many_arguments)] // one call shape, from three places in `plan`
fn take_damaged(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    class: &str,
    first_seq: u64,
    row: &[u8],
    header: Option<&RowHeader>,
    error: record::CorruptRow,
    pending_first_seq: u64,
    out: &mut HeadRemoval,
) -> Result<(), StorageError> {
    let last_seq = store::row_end(
        batches,
        class,
        first_seq,
        header,
        pending_first_seq.saturating_sub(1),
    )?;
    out.rows_to_delete.push(first_seq);
    if last_seq <= out.through_seq {
        return Ok(());
    }
    let held = last_seq - first_seq + 1;
    let live = last_seq - out.through_seq.max(first_seq.saturating_sub(1));
    let bytes = header.map_or((row.len().saturating_sub(HEADER_LEN)) as u64, |header| {
        header.total_bytes
    });
    out.messages += live;
    out.damaged_messages += live;
    let share = u128::from(bytes) * u128::from(live) / u128::from(held);
    out.bytes += u64::try_from(share).unwrap_or(bytes);
    out.through_seq = last_seq;
    out.damaged.push(DamagedRow {
        class: class.to_owned(),
        first_seq,
        last_seq,
        error,
    });
    Ok(())
}
