//! Removing messages from the head of a class. Confirm, expiry and
//! drop-oldest all take a prefix of the class in sequence order (FIFO is
//! never broken by a hole), so they share one walk: over the class's stored
//! rows, oldest first, then over the messages accepted earlier in the same
//! group commit and not yet written.
//!
//! Planning only reads; the writer applies a plan (deletes the fully removed
//! rows, raises the floor) only when the whole plan was computed, so a damaged
//! row fails one command instead of leaving a half-applied removal.

use super::record::{self, EncodedMessage, RowHeader};
use super::store::RowReadError;
use redb::ReadableTable;

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
}

/// Plans `cut` over the rows of `class` above `floor`, then over `pending`
/// (the class's unwritten messages, whose first sequence is `pending_first_seq`).
pub(super) fn plan(
    batches: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    class: &str,
    floor: u64,
    pending: &[EncodedMessage],
    pending_first_seq: u64,
    cut: Cut,
) -> Result<HeadRemoval, RowReadError> {
    let mut out = HeadRemoval {
        through_seq: floor,
        ..HeadRemoval::default()
    };
    for entry in batches.range((class, 0)..=(class, u64::MAX))? {
        let (key, value) = entry?;
        let first_seq = key.value().1;
        let row = value.value();
        let corrupt = |error| RowReadError::Corrupt { first_seq, error };
        let header = record::parse_header(row).map_err(corrupt)?;
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
        let (_, walk) = record::walk(row).map_err(corrupt)?;
        for (seq, span) in (first_seq..).zip(walk) {
            let span = span.map_err(corrupt)?;
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
