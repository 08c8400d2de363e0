//! A message for node-local subscribers, and `compact`, which gives one
//! about to be queued an allocation of its own, so that what a slow
//! subscriber holds is what its outbox charges.
//!
//! Decoders hand out subjects, headers and payloads as slices of the
//! buffer they read into (64 KiB at a time from NATS, and a session's read
//! buffer for node-local publishes), and a slice keeps that whole buffer
//! alive. A message queued for a subscriber that does not read then held
//! its read buffer, not its own bytes: with 64 KiB messages about twice
//! their size, and a subscriber of one quiet subject among busy ones up to
//! a whole buffer per message. The outbox charges a message's bytes
//! (`outbox::charged_bytes`), so the bound held only on paper. One copy
//! per message, shared by every subscriber it goes to, makes it hold.

use bytes::{Bytes, BytesMut};
use holdfast_wire::{Headers, Text};

/// A message published on this relay, for node-local delivery.
#[derive(Debug, Clone)]
pub struct LocalMessage {
    pub subject: Text,
    pub reply: Option<Text>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// The message with its subject, reply subject, header names and values
/// and payload copied, in that order, into one allocation of their size.
pub fn compact(message: &LocalMessage) -> LocalMessage {
    let header_bytes: usize = message
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    let total = message.subject.len()
        + message.reply.as_ref().map_or(0, |reply| reply.len())
        + header_bytes
        + message.payload.len();
    let mut bytes = BytesMut::with_capacity(total);
    bytes.extend_from_slice(message.subject.as_bytes());
    if let Some(reply) = &message.reply {
        bytes.extend_from_slice(reply.as_bytes());
    }
    for (name, value) in message.headers.iter() {
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(value.as_bytes());
    }
    bytes.extend_from_slice(&message.payload);
    let bytes = bytes.freeze();
    let mut at = 0;
    let mut next = |len: usize| {
        let piece = bytes.slice(at..at + len);
        at += len;
        piece
    };
    let subject = text(next(message.subject.len()), &message.subject);
    let reply = message
        .reply
        .as_ref()
        .map(|reply| text(next(reply.len()), reply));
    let mut headers = Headers(Vec::with_capacity(message.headers.len()));
    for (name, value) in message.headers.iter() {
        let name = text(next(name.len()), name);
        let value = text(next(value.len()), value);
        headers.0.push((name, value));
    }
    let payload = next(message.payload.len());
    LocalMessage {
        subject,
        reply,
        headers,
        payload,
    }
}

/// `copy` as text: it holds the same bytes as `original`, so it is UTF-8;
/// checking costs little next to the copy (subjects and header fields are
/// short), and keeps this free of `unsafe`.
fn text(copy: Bytes, original: &Text) -> Text {
    Text::from_utf8(copy).unwrap_or_else(|_| original.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compacted_message_equals_the_original_and_shares_nothing_with_it() {
        let buffer = Bytes::from_static(b"work.item_INBOX.1Seq42payload bytes");
        let mut headers = Headers::new();
        headers.insert("Seq", "42");
        headers.insert("Empty", "");
        let original = LocalMessage {
            subject: Text::from_utf8(buffer.slice(0..9)).unwrap(),
            reply: Some(Text::from_utf8(buffer.slice(9..17)).unwrap()),
            headers,
            payload: buffer.slice(22..),
        };
        let copy = compact(&original);
        assert_eq!(copy.subject, original.subject);
        assert_eq!(copy.reply, original.reply);
        assert_eq!(copy.headers, original.headers);
        assert_eq!(copy.payload, original.payload);
        let inside = |piece: &[u8]| {
            let start = buffer.as_ptr() as usize;
            let at = piece.as_ptr() as usize;
            (start..start + buffer.len()).contains(&at)
        };
        assert!(!inside(&copy.payload));
        assert!(!inside(copy.subject.as_bytes()));
    }

    #[test]
    fn a_message_without_reply_or_headers_keeps_none() {
        let original = LocalMessage {
            subject: Text::from_static("s"),
            reply: None,
            headers: Headers::new(),
            payload: Bytes::new(),
        };
        let copy = compact(&original);
        assert_eq!(copy.subject, "s");
        assert!(copy.reply.is_none());
        assert!(copy.headers.is_empty());
        assert!(copy.payload.is_empty());
    }
}
