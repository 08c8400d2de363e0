//! The byte encoding of one journal row: the messages of one class that one
//! group commit wrote, behind a header with checksums.
//!
//! ```text
//! 0..4    CRC-32 (IEEE, as zlib's) of the body (bytes HEADER_LEN..)
//! 4..8    CRC-32 of bytes 8..HEADER_LEN (the header fields)
//! 8       format version (1)
//! 9..13   message count, u32 LE
//! 13..21  budget bytes of all messages in the row, u64 LE
//! 21..29  largest accepted_at_ms in the row, u64 LE
//! 29..    messages, each:
//!           accepted_at_ms   varint
//!           subject          varint length, bytes
//!           reply            varint (0 = none, else length + 1), bytes
//!           headers          varint count, then per header name and value
//!                            (varint length, bytes each)
//!           payload          varint length, bytes
//! ```
//!
//! The row's key is (class name, first sequence); message `i` has sequence
//! `first + i`, so sequences cost nothing per message. The header has its own
//! checksum so that trimming a whole row only has to trust 21 header bytes
//! instead of re-checking the full body (the body is checked whenever its
//! messages are walked or decoded).

use super::{Headers, JournalStamp, NewMessage, StoredMessage, Text, MESSAGE_ID_HEADER};
use bytes::{BufMut, Bytes, BytesMut};
use crc32fast::hash as crc32;
use holdfast_wire::chain;
use holdfast_wire::digits::{hex16, Decimal};
use std::ops::Range;

/// Version byte of the row layout above.
const ROW_VERSION: u8 = 1;
pub(super) const HEADER_LEN: usize = 29;

/// Rows are cut below 128 KiB: redb stores an oversized leaf in a
/// power-of-two allocation, so a row just over a power of two would waste
/// nearly half its page. 128 KiB also bounds what a reader copies to fetch a
/// few messages from a partly consumed row.
pub(super) const ROW_TARGET_BYTES: usize = 128 * 1024 - 1024;

/// A row failed its checksum or does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("corrupt journal row: {0}")]
pub(super) struct CorruptRow(pub &'static str);

/// Messages already in row encoding, back to back in one buffer. Appending
/// tasks encode their own messages so the single writer thread only copies
/// bytes; one buffer per batch (not a slice per message) spares both
/// threads a reference count per message, which showed in profiles.
#[derive(Debug, Clone)]
pub(super) struct EncodedBatch {
    pub buffer: Bytes,
    pub messages: Vec<EncodedMessage>,
}

/// Where one message of an [`EncodedBatch`] lies, and what it counts.
#[derive(Debug, Clone)]
pub(super) struct EncodedMessage {
    pub accepted_at_ms: u64,
    /// What the message counts against the class budget.
    pub size: u64,
    /// Which buffer holds its bytes: 0 in its batch; the writer renumbers
    /// it when it queues the batch's buffer beside others.
    pub buffer: usize,
    /// Its bytes within that buffer.
    pub range: Range<usize>,
}

impl EncodedBatch {
    pub(super) fn encode(message: &NewMessage) -> EncodedBatch {
        EncodedBatch::encode_all(std::slice::from_ref(message))
    }

    /// Encodes `messages` into one buffer: a batch costs one allocation
    /// instead of one per message, and the writer thread frees one buffer
    /// per batch instead of a buffer per message allocated on another
    /// thread.
    pub(super) fn encode_all(messages: &[NewMessage]) -> EncodedBatch {
        let estimate: usize = messages.iter().map(encoded_len_estimate).sum();
        let mut buf = BytesMut::with_capacity(estimate);
        let messages = messages
            .iter()
            .map(|message| EncodedMessage::encode_into(message, &mut buf))
            .collect();
        EncodedBatch {
            buffer: buf.freeze(),
            messages,
        }
    }

    /// The bytes of one of its messages.
    #[cfg(test)]
    pub(super) fn bytes(&self, message: &EncodedMessage) -> &[u8] {
        &self.buffer[message.range.clone()]
    }
}

impl EncodedMessage {
    /// Appends `message` to `buf` and says where it went.
    fn encode_into(message: &NewMessage, buf: &mut BytesMut) -> EncodedMessage {
        let start = buf.len();
        let stamped = message.stamp.as_ref().map(StampValues::new);
        let reply_len = message.reply.as_ref().map_or(0, |reply| reply.len());
        let header_len: usize = message
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
            + stamped.as_ref().map_or(0, StampValues::len);
        let header_count = message.headers.len()
            + stamped
                .as_ref()
                .map_or(0, |values| values.headers().count());
        let size = message.subject.len() + reply_len + header_len + message.payload.len();
        buf.reserve(size + VARINT_ALLOWANCE + HEADER_VARINT_ALLOWANCE * header_count);
        put_varint(buf, message.accepted_at_ms);
        put_bytes(buf, message.subject.as_bytes());
        match &message.reply {
            None => put_varint(buf, 0),
            Some(reply) => {
                put_varint(buf, reply.len() as u64 + 1);
                buf.extend_from_slice(reply.as_bytes());
            }
        }
        put_varint(buf, header_count as u64);
        for (name, value) in message.headers.iter() {
            put_bytes(buf, name.as_bytes());
            put_bytes(buf, value.as_bytes());
        }
        if let Some(values) = &stamped {
            for (name, value) in values.headers() {
                put_bytes(buf, name);
                put_varint(buf, value_len(&value) as u64);
                for piece in value {
                    buf.extend_from_slice(piece);
                }
            }
        }
        put_bytes(buf, &message.payload);
        EncodedMessage {
            accepted_at_ms: message.accepted_at_ms,
            size: size as u64,
            buffer: 0,
            range: start..buf.len(),
        }
    }
}

/// Varint bytes of a message's fields (at most 10 each), generously.
const VARINT_ALLOWANCE: usize = 50;
/// Varint bytes per header (name and value lengths), generously.
const HEADER_VARINT_ALLOWANCE: usize = 20;
/// Bytes of the stamp's header names, numbers and varints, generously,
/// besides the relay id (twice: its own header and `Nats-Msg-Id`) and the
/// class name.
const STAMP_ALLOWANCE: usize = 128;

/// About the encoded size of `message`, to size a batch's buffer at once
/// (a batch that needs more grows it).
fn encoded_len_estimate(message: &NewMessage) -> usize {
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len() + HEADER_VARINT_ALLOWANCE)
        .sum();
    message.subject.len()
        + message.reply.as_ref().map_or(0, |reply| reply.len())
        + message.payload.len()
        + headers
        + VARINT_ALLOWANCE
        + message.stamp.as_ref().map_or(0, |stamp| {
            let class = stamp
                .message_id
                .as_ref()
                .map_or(0, |(class, _)| class.len());
            STAMP_ALLOWANCE + 2 * stamp.relay_id.len() + class
        })
}

/// A [`JournalStamp`]'s header values as digits on the stack, copied
/// straight into the row (the three `ShortText`s per message this built
/// before, each zeroing and moving a 128-byte buffer, were 7 % of the
/// worker's CPU journaling).
struct StampValues<'a> {
    relay_id: &'a [u8],
    seq: Decimal,
    digest: [u8; 16],
    /// `Nats-Msg-Id` (as [`super::format_message_id`] writes it): the class and
    /// the counter.
    message_id: Option<(&'a [u8], Decimal)>,
}

/// One stamped header: its name and its value in up to five pieces.
type StampedHeader<'a> = (&'static [u8], [&'a [u8]; 5]);

impl<'a> StampValues<'a> {
    fn new(stamp: &'a JournalStamp) -> StampValues<'a> {
        StampValues {
            relay_id: stamp.relay_id.as_str().as_bytes(),
            seq: Decimal::new(stamp.chain.seq),
            digest: hex16(stamp.chain.digest),
            message_id: stamp
                .message_id
                .as_ref()
                .map(|(class, counter)| (class.as_str().as_bytes(), Decimal::new(*counter))),
        }
    }

    /// In the order the relay has always stamped them: chain, then id.
    fn headers(&self) -> impl Iterator<Item = StampedHeader<'_>> {
        const NONE: &[u8] = &[];
        [
            Some((
                chain::HEADER_RELAY.as_bytes(),
                [self.relay_id, NONE, NONE, NONE, NONE],
            )),
            Some((
                chain::HEADER_SEQ.as_bytes(),
                [self.seq.as_bytes(), NONE, NONE, NONE, NONE],
            )),
            Some((
                chain::HEADER_CHAIN.as_bytes(),
                [self.digest.as_slice(), NONE, NONE, NONE, NONE],
            )),
            self.message_id.as_ref().map(|(class, counter)| {
                (
                    MESSAGE_ID_HEADER.as_bytes(),
                    [self.relay_id, b".", class, b".", counter.as_bytes()],
                )
            }),
        ]
        .into_iter()
        .flatten()
    }

    /// Bytes of names and values, as message sizes count headers.
    fn len(&self) -> usize {
        self.headers()
            .map(|(name, value)| name.len() + value_len(&value))
            .sum()
    }
}

fn value_len(pieces: &[&[u8]]) -> usize {
    pieces.iter().map(|piece| piece.len()).sum()
}

/// Collects encoded messages into one row.
pub(super) struct RowBuilder {
    buf: Vec<u8>,
    count: u32,
    total_bytes: u64,
    max_accepted_ms: u64,
}

impl RowBuilder {
    pub(super) fn new() -> RowBuilder {
        let mut buf = Vec::with_capacity(ROW_TARGET_BYTES.min(16 * 1024));
        buf.resize(HEADER_LEN, 0);
        RowBuilder {
            buf,
            count: 0,
            total_bytes: 0,
            max_accepted_ms: 0,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether adding `message` would take a non-empty row past the target
    /// size (an oversized message still gets a row of its own).
    pub(super) fn would_overflow(&self, message: &EncodedMessage) -> bool {
        !self.is_empty() && self.buf.len() + message.range.len() > ROW_TARGET_BYTES
    }

    /// Adds `message`, whose encoded bytes are `bytes`.
    pub(super) fn push(&mut self, message: &EncodedMessage, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.count += 1;
        self.total_bytes += message.size;
        self.max_accepted_ms = self.max_accepted_ms.max(message.accepted_at_ms);
    }

    /// The finished row, checksums filled in.
    pub(super) fn finish(mut self) -> Vec<u8> {
        self.buf[8] = ROW_VERSION;
        self.buf[9..13].copy_from_slice(&self.count.to_le_bytes());
        self.buf[13..21].copy_from_slice(&self.total_bytes.to_le_bytes());
        self.buf[21..29].copy_from_slice(&self.max_accepted_ms.to_le_bytes());
        let header_crc = crc32(&self.buf[8..HEADER_LEN]);
        self.buf[4..8].copy_from_slice(&header_crc.to_le_bytes());
        let body_crc = crc32(&self.buf[HEADER_LEN..]);
        self.buf[0..4].copy_from_slice(&body_crc.to_le_bytes());
        self.buf
    }
}

/// The fixed fields at the start of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowHeader {
    pub count: u32,
    pub total_bytes: u64,
    pub max_accepted_ms: u64,
}

impl RowHeader {
    /// Sequence of the last message in a row whose first message is `first_seq`.
    pub(super) fn last_seq(&self, first_seq: u64) -> u64 {
        (first_seq + u64::from(self.count)).saturating_sub(1)
    }
}

/// Reads and checks the header only (not the body).
pub(super) fn parse_header(row: &[u8]) -> Result<RowHeader, CorruptRow> {
    if row.len() < HEADER_LEN {
        return Err(CorruptRow("shorter than its header"));
    }
    let stored = u32::from_le_bytes([row[4], row[5], row[6], row[7]]);
    if stored != crc32(&row[8..HEADER_LEN]) {
        return Err(CorruptRow("header checksum mismatch"));
    }
    if row[8] != ROW_VERSION {
        return Err(CorruptRow("unknown row version"));
    }
    let count = u32::from_le_bytes([row[9], row[10], row[11], row[12]]);
    if count == 0 {
        return Err(CorruptRow("row without messages"));
    }
    let mut total = [0u8; 8];
    total.copy_from_slice(&row[13..21]);
    let mut max_accepted = [0u8; 8];
    max_accepted.copy_from_slice(&row[21..29]);
    Ok(RowHeader {
        count,
        total_bytes: u64::from_le_bytes(total),
        max_accepted_ms: u64::from_le_bytes(max_accepted),
    })
}

/// Checks both checksums and returns the header and an iterator over the
/// messages' positions.
pub(super) fn walk(row: &[u8]) -> Result<(RowHeader, MessageWalk<'_>), CorruptRow> {
    let header = parse_header(row)?;
    let stored = u32::from_le_bytes([row[0], row[1], row[2], row[3]]);
    if stored != crc32(&row[HEADER_LEN..]) {
        return Err(CorruptRow("body checksum mismatch"));
    }
    Ok((
        header,
        MessageWalk {
            row,
            pos: HEADER_LEN,
            remaining: header.count,
            done: false,
        },
    ))
}

/// Where one message sits in its row, and what it counts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MessageSpan {
    pub range: Range<usize>,
    pub accepted_at_ms: u64,
    pub size: u64,
}

/// Iterates over a row's messages without allocating. Yields an error (once)
/// if the body does not hold exactly `count` messages.
pub(super) struct MessageWalk<'a> {
    row: &'a [u8],
    pos: usize,
    remaining: u32,
    done: bool,
}

impl Iterator for MessageWalk<'_> {
    type Item = Result<MessageSpan, CorruptRow>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.remaining == 0 {
            self.done = true;
            return (self.pos != self.row.len())
                .then_some(Err(CorruptRow("bytes after the last message")));
        }
        let start = self.pos;
        match skip_message(self.row, &mut self.pos) {
            Ok((accepted_at_ms, size)) => {
                self.remaining -= 1;
                Some(Ok(MessageSpan {
                    range: start..self.pos,
                    accepted_at_ms,
                    size,
                }))
            }
            Err(err) => {
                self.done = true;
                Some(Err(err))
            }
        }
    }
}

/// Parses one message at `pos` for its time and budget size, moving `pos` past it.
fn skip_message(row: &[u8], pos: &mut usize) -> Result<(u64, u64), CorruptRow> {
    let accepted_at_ms = get_varint(row, pos)?;
    let mut size = get_slice(row, pos)?.len();
    let reply = get_varint(row, pos)?;
    if reply > 0 {
        size += take(row, pos, reply - 1)?.len();
    }
    let headers = get_varint(row, pos)?;
    for _ in 0..headers {
        size += get_slice(row, pos)?.len();
        size += get_slice(row, pos)?.len();
    }
    size += get_slice(row, pos)?.len();
    Ok((accepted_at_ms, size as u64))
}

/// Decodes the message at `span` of `row` (a copy of the whole row, which the
/// fields then share without further copies).
pub(super) fn decode_message(
    row: &Bytes,
    span: &MessageSpan,
    seq: u64,
) -> Result<StoredMessage, CorruptRow> {
    let buf = &row[..span.range.end];
    let mut pos = span.range.start;
    let accepted_at_ms = get_varint(buf, &mut pos)?;
    let subject = text(row, get_slice(buf, &mut pos)?)?;
    let reply = match get_varint(buf, &mut pos)? {
        0 => None,
        len => Some(text(row, take(buf, &mut pos, len - 1)?)?),
    };
    let header_count = get_varint(buf, &mut pos)?;
    // Bounded by the bytes present: each header takes at least two bytes.
    let capacity = usize::try_from(header_count)
        .unwrap_or(usize::MAX)
        .min(buf.len() / 2);
    let mut headers = Vec::with_capacity(capacity);
    for _ in 0..header_count {
        let name = header_name(row, get_slice(buf, &mut pos)?)?;
        let value = text(row, get_slice(buf, &mut pos)?)?;
        headers.push((name, value));
    }
    let payload = row.slice(get_slice(buf, &mut pos)?);
    if pos != span.range.end {
        return Err(CorruptRow("message length disagrees with its fields"));
    }
    Ok(StoredMessage {
        seq,
        accepted_at_ms,
        subject,
        reply,
        headers: Headers(headers),
        payload,
    })
}

/// The names the relay stamps on every journaled message, shared by every
/// copy read back instead of each being a checked slice of its row.
const STAMPED_NAMES: [&str; 4] = [
    chain::HEADER_RELAY,
    chain::HEADER_SEQ,
    chain::HEADER_CHAIN,
    MESSAGE_ID_HEADER,
];

/// A header name: one of [`STAMPED_NAMES`] as a static text (no UTF-8
/// check, no reference on the row: replay decodes four per message), any
/// other as [`text`].
fn header_name(row: &Bytes, range: Range<usize>) -> Result<Text, CorruptRow> {
    let bytes = &row[range.clone()];
    match STAMPED_NAMES.iter().find(|name| name.as_bytes() == bytes) {
        Some(name) => Ok(Text::from_static(name)),
        None => text(row, range),
    }
}

fn text(row: &Bytes, range: Range<usize>) -> Result<Text, CorruptRow> {
    Text::from_utf8(row.slice(range)).map_err(|_| CorruptRow("text field is not UTF-8"))
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, CorruptRow> {
    let mut value = 0u64;
    let mut shift = 0u32;
    loop {
        let byte = *buf.get(*pos).ok_or(CorruptRow("truncated varint"))?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return Err(CorruptRow("varint overflows u64"));
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 63 {
            return Err(CorruptRow("varint overflows u64"));
        }
    }
}

/// A varint length followed by that many bytes; returns their range.
fn get_slice(buf: &[u8], pos: &mut usize) -> Result<Range<usize>, CorruptRow> {
    let len = get_varint(buf, pos)?;
    take(buf, pos, len)
}

fn take(buf: &[u8], pos: &mut usize, len: u64) -> Result<Range<usize>, CorruptRow> {
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| pos.checked_add(len))
        .filter(|end| *end <= buf.len())
        .ok_or(CorruptRow("field runs past the end of the row"))?;
    let range = *pos..end;
    *pos = end;
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_checksummed_with_the_standard_crc32() {
        // Journals already on disk were written with these values; a
        // different CRC would quarantine every one of them at start.
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    fn message(i: u64, reply: bool) -> NewMessage {
        let mut headers = Headers::new();
        if i % 2 == 0 {
            headers.insert("Nats-Msg-Id", format!("id-{i}"));
            headers.insert("x", "");
        }
        NewMessage {
            subject: Text::from(format!("kv.events.{i}")),
            reply: reply.then(|| Text::from("_INBOX.abc")),
            headers,
            payload: Bytes::from(vec![i as u8; (i as usize * 7) % 300]),
            accepted_at_ms: 1_700_000_000_000 + i,
            stamp: None,
        }
    }

    fn build(messages: &[NewMessage]) -> Vec<u8> {
        let mut row = RowBuilder::new();
        let batch = EncodedBatch::encode_all(messages);
        for message in &batch.messages {
            row.push(message, batch.bytes(message));
        }
        row.finish()
    }

    #[test]
    fn a_batch_encodes_each_message_as_alone() {
        // Stamped and unstamped, with and without replies and headers, and
        // more bytes than the batch estimate (the buffer must grow).
        let mut messages: Vec<NewMessage> = (0..40).map(|i| message(i, i % 3 == 0)).collect();
        for (i, m) in messages.iter_mut().enumerate().filter(|(i, _)| i % 4 == 1) {
            m.stamp = Some(JournalStamp {
                relay_id: Text::from("relay-a"),
                chain: holdfast_wire::chain::ChainPosition {
                    seq: i as u64,
                    digest: 0xdead_beef_0000 + i as u64,
                },
                message_id: Some((Text::from("kv_events"), i as u64)),
            });
            m.headers.insert("big", "v".repeat(1000));
        }
        let batch = EncodedBatch::encode_all(&messages);
        assert_eq!(batch.messages.len(), messages.len());
        let mut end = 0;
        for (encoded, message) in batch.messages.iter().zip(&messages) {
            let alone = EncodedBatch::encode(message);
            let alone_message = &alone.messages[0];
            assert_eq!(batch.bytes(encoded), alone.bytes(alone_message));
            assert_eq!(encoded.size, alone_message.size);
            assert_eq!(encoded.accepted_at_ms, alone_message.accepted_at_ms);
            assert_eq!(encoded.range.start, end, "back to back");
            end = encoded.range.end;
        }
        assert_eq!(end, batch.buffer.len());
    }

    #[test]
    fn round_trips_every_field() {
        let messages: Vec<NewMessage> = (0..20).map(|i| message(i, i % 3 == 0)).collect();
        let row = Bytes::from(build(&messages));
        let (header, walk) = walk(&row).unwrap();
        assert_eq!(header.count, 20);
        assert_eq!(header.max_accepted_ms, 1_700_000_000_019);
        let spans: Vec<MessageSpan> = walk.collect::<Result<_, _>>().unwrap();
        assert_eq!(spans.len(), 20);
        let mut total = 0;
        for (i, (span, original)) in spans.iter().zip(&messages).enumerate() {
            let decoded = decode_message(&row, span, 100 + i as u64).unwrap();
            assert_eq!(decoded.seq, 100 + i as u64);
            assert_eq!(decoded.subject, original.subject);
            assert_eq!(decoded.reply, original.reply);
            assert_eq!(decoded.headers, original.headers);
            assert_eq!(decoded.payload, original.payload);
            assert_eq!(decoded.accepted_at_ms, original.accepted_at_ms);
            assert_eq!(span.size, EncodedBatch::encode(original).messages[0].size);
            total += span.size;
        }
        assert_eq!(header.total_bytes, total);
    }

    #[test]
    fn budget_size_counts_subject_reply_headers_payload() {
        let mut headers = Headers::new();
        headers.insert("ab", "cde");
        let m = NewMessage {
            subject: Text::from("subj"),
            reply: Some(Text::from("rep")),
            headers,
            payload: Bytes::from_static(b"0123456789"),
            accepted_at_ms: 5,
            stamp: None,
        };
        assert_eq!(EncodedBatch::encode(&m).messages[0].size, 4 + 3 + 5 + 10);
    }

    #[test]
    fn a_stamp_is_stored_as_the_headers_stamping_them_gives() {
        let payload = Bytes::from_static(b"hello");
        let mut own = Headers::new();
        own.insert("x", "1");
        let mut stamped = own.clone();
        chain::ChainStamper::new(Text::from("relay-1"), 8).stamp("kv.a", &payload, &mut stamped);
        stamped.insert(MESSAGE_ID_HEADER, "relay-1.kv_events.9");
        let position = chain::ChainStamper::new(Text::from("relay-1"), 8).advance("kv.a", &payload);
        let message = NewMessage {
            subject: Text::from("kv.a"),
            reply: None,
            headers: own,
            payload: payload.clone(),
            accepted_at_ms: 5,
            stamp: Some(JournalStamp {
                relay_id: Text::from("relay-1"),
                chain: position,
                message_id: Some((Text::from("kv_events"), 9)),
            }),
        };
        let row = Bytes::from(build(std::slice::from_ref(&message)));
        let (_, mut walk) = walk(&row).unwrap();
        let span = walk.next().unwrap().unwrap();
        let decoded = decode_message(&row, &span, 1).unwrap();
        assert_eq!(decoded.headers, stamped);
        assert_eq!(decoded.payload, payload);
        let as_headers = NewMessage {
            headers: stamped,
            stamp: None,
            ..message.clone()
        };
        assert_eq!(
            EncodedBatch::encode(&message).messages[0].size,
            EncodedBatch::encode(&as_headers).messages[0].size,
            "stamped headers count against the budget like any others"
        );
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let messages: Vec<NewMessage> = (0..5).map(|i| message(i, true)).collect();
        let row = build(&messages);
        for at in 0..row.len() {
            let mut bad = row.clone();
            bad[at] ^= 0x40;
            let result =
                walk(&bad).and_then(|(_, walk)| walk.collect::<Result<Vec<_>, _>>().map(|_| ()));
            assert!(result.is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn truncated_rows_are_rejected() {
        let row = build(&[message(1, false), message(2, true)]);
        for len in 0..row.len() {
            assert!(walk(&row[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            let mut pos = 0;
            assert_eq!(get_varint(&buf, &mut pos), Ok(value));
            assert_eq!(pos, buf.len());
        }
        let mut pos = 0;
        assert!(get_varint(&[0xff; 11], &mut pos).is_err());
    }

    #[test]
    fn rows_are_cut_near_the_target() {
        let big_bytes = vec![0; ROW_TARGET_BYTES];
        let big = EncodedMessage {
            accepted_at_ms: 0,
            size: 0,
            buffer: 0,
            range: 0..big_bytes.len(),
        };
        let mut row = RowBuilder::new();
        assert!(!row.would_overflow(&big), "an empty row takes anything");
        row.push(&big, &big_bytes);
        let small = EncodedBatch::encode(&message(1, false));
        assert!(row.would_overflow(&small.messages[0]));
    }
}
