//! `ServerOpDecoder`: incremental decoding of what a NATS server sends to a
//! client, tolerant of messages that other publishers made malformed.
//!
//! A server forwards whatever any publisher on the cluster sent: a subject
//! that is not UTF-8, or a header value with a lone CR, reaches every
//! subscriber whose subscription matches. The framing around such a
//! message is the server's own and is sound (the sizes are the server's),
//! so this decoder skips exactly that message's bytes and reports it as
//! [`ServerOp::Malformed`]; the connection goes on. Only framing the
//! decoder cannot trust (an unknown operation, sizes that are not numbers,
//! a payload not followed by CRLF) is an error that ends the connection.
//!
//! | server → client | |
//! |---|---|
//! | `INFO {json}` | [`ServerOp::Info`] (the JSON, undecoded) |
//! | `MSG <subject> <sid> [reply] <#bytes>` | [`ServerOp::Msg`] |
//! | `HMSG <subject> <sid> [reply] <#header bytes> <#total bytes>` | [`ServerOp::Msg`] with a [`HeaderBlock`] |
//! | `PING`, `PONG`, `+OK`, `-ERR '...'` | [`ServerOp::Ping`], [`ServerOp::Pong`], [`ServerOp::Ok`], [`ServerOp::Err`] |

use super::decoder::{invalid_args, parse_size, take_line, trim_blanks, unknown, Tokens};
use super::headers::{decode_header_block, HeaderBlock};
use super::NatsProtocolError;
use crate::Text;
use bytes::{Buf, Bytes, BytesMut};

/// The longest control line taken from a server: an INFO of a large
/// cluster lists every member's URLs, and a MSG line carries a subject and
/// a reply subject that the publisher's own limit bounded.
pub const SERVER_MAX_CONTROL_LINE: usize = 1024 * 1024;

/// The largest message taken from a server: NATS's own upper bound on
/// `max_payload`.
pub const SERVER_MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// One operation sent by a NATS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// The INFO JSON, as sent.
    Info(Bytes),
    /// A message for subscription `sid`; `headers` for HMSG.
    Msg {
        sid: u64,
        subject: Text,
        reply: Option<Text>,
        headers: Option<HeaderBlock>,
        payload: Bytes,
    },
    /// A message whose bytes were skipped because its subject, reply
    /// subject or header block is not valid; `sid` when it could be read.
    Malformed {
        sid: Option<u64>,
        reason: String,
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR`, with the text between the quotes.
    Err(String),
}

/// A MSG/HMSG whose control line was consumed and whose payload is awaited.
#[derive(Debug, Clone)]
struct PendingMsg {
    sid: Option<u64>,
    subject: Bytes,
    reply: Option<Bytes>,
    /// `Some` for HMSG: how many of the `total` bytes are the header block.
    header_len: Option<usize>,
    total: usize,
}

/// Decodes [`ServerOp`]s off the front of a receive buffer.
#[derive(Debug, Clone)]
pub struct ServerOpDecoder {
    max_payload: usize,
    max_control_line: usize,
    scanned: usize,
    pending: Option<PendingMsg>,
}

impl Default for ServerOpDecoder {
    fn default() -> ServerOpDecoder {
        ServerOpDecoder::new(SERVER_MAX_PAYLOAD)
    }
}

impl ServerOpDecoder {
    /// `max_payload`: the largest message (headers included) taken.
    pub fn new(max_payload: usize) -> ServerOpDecoder {
        ServerOpDecoder {
            max_payload,
            max_control_line: SERVER_MAX_CONTROL_LINE,
            scanned: 0,
            pending: None,
        }
    }

    /// Decodes one op from the front of `buffer`, consuming its bytes;
    /// `Ok(None)` = need more bytes. After an error the connection must be
    /// closed.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<ServerOp>, NatsProtocolError> {
        if self.pending.is_some() {
            return self.decode_payload(buffer);
        }
        let Some(line) = take_line(buffer, &mut self.scanned, self.max_control_line)? else {
            return Ok(None);
        };
        let tokens = Tokens::split(&line);
        let Some(&(op_start, op_end)) = tokens.get(0) else {
            return Err(unknown(&line[..]));
        };
        let op = &line[op_start..op_end];
        let args = &tokens.as_slice()[1..];
        if op.eq_ignore_ascii_case(b"MSG") {
            self.pending = Some(self.parse_msg(&line, args, false)?);
            self.decode_payload(buffer)
        } else if op.eq_ignore_ascii_case(b"HMSG") {
            self.pending = Some(self.parse_msg(&line, args, true)?);
            self.decode_payload(buffer)
        } else if op.eq_ignore_ascii_case(b"PING") {
            Ok(Some(ServerOp::Ping))
        } else if op.eq_ignore_ascii_case(b"PONG") {
            Ok(Some(ServerOp::Pong))
        } else if op.eq_ignore_ascii_case(b"+OK") {
            Ok(Some(ServerOp::Ok))
        } else if op.eq_ignore_ascii_case(b"-ERR") {
            let text = trim_blanks(&line[op_end..]);
            let text = text
                .strip_prefix(b"'")
                .and_then(|inner| inner.strip_suffix(b"'"))
                .unwrap_or(text);
            Ok(Some(ServerOp::Err(
                String::from_utf8_lossy(text).into_owned(),
            )))
        } else if op.eq_ignore_ascii_case(b"INFO") {
            Ok(Some(ServerOp::Info(
                line.slice_ref(trim_blanks(&line[op_end..])),
            )))
        } else {
            Err(unknown(op))
        }
    }

    /// The sizes must be numbers (they are the server's, and without them
    /// the stream cannot be followed); the subject, reply and sid are kept
    /// as bytes and checked once the message is complete.
    fn parse_msg(
        &self,
        line: &Bytes,
        args: &[(usize, usize)],
        with_headers: bool,
    ) -> Result<PendingMsg, NatsProtocolError> {
        let op = if with_headers { "HMSG" } else { "MSG" };
        let slice = |(start, end): (usize, usize)| line.slice(start..end);
        let (subject, sid, reply, header_size, total_size) = match (with_headers, args) {
            (false, [subject, sid, total]) => (subject, sid, None, None, total),
            (false, [subject, sid, reply, total]) => (subject, sid, Some(reply), None, total),
            (true, [subject, sid, header, total]) => (subject, sid, None, Some(header), total),
            (true, [subject, sid, reply, header, total]) => {
                (subject, sid, Some(reply), Some(header), total)
            }
            _ => return Err(invalid_args(op, "unexpected number of arguments")),
        };
        let total = parse_size(op, &line[total_size.0..total_size.1])?;
        let header_len = header_size
            .map(|size| parse_size(op, &line[size.0..size.1]))
            .transpose()?;
        if header_len.is_some_and(|header_len| header_len > total) {
            return Err(invalid_args(op, "header size exceeds total size"));
        }
        if total > self.max_payload {
            return Err(NatsProtocolError::MaxPayloadExceeded {
                size: total,
                max: self.max_payload,
            });
        }
        let sid = std::str::from_utf8(&line[sid.0..sid.1])
            .ok()
            .and_then(|sid| sid.parse().ok());
        Ok(PendingMsg {
            sid,
            subject: slice(*subject),
            reply: reply.map(|reply| slice(*reply)),
            header_len,
            total,
        })
    }

    fn decode_payload(
        &mut self,
        buffer: &mut BytesMut,
    ) -> Result<Option<ServerOp>, NatsProtocolError> {
        let Some(pending) = &self.pending else {
            return Ok(None);
        };
        let total = pending.total;
        let needed = total.saturating_add(2);
        if let Some(terminator) = buffer.get(total..buffer.len().min(needed)) {
            if !b"\r\n".starts_with(terminator) {
                return Err(NatsProtocolError::MissingPayloadTerminator);
            }
        }
        if buffer.len() < needed {
            buffer.reserve((needed - buffer.len()).min(SERVER_MAX_PAYLOAD + 2));
            return Ok(None);
        }
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        let mut payload = buffer.split_to(total).freeze();
        buffer.advance(2);
        let malformed = |reason: &str| {
            Ok(Some(ServerOp::Malformed {
                sid: pending.sid,
                reason: reason.to_owned(),
            }))
        };
        let Some(sid) = pending.sid else {
            return malformed("sid is not a number");
        };
        let Some(subject) = subject_text(pending.subject.clone()) else {
            return malformed("subject is not UTF-8 without whitespace");
        };
        let reply = match pending.reply.clone().map(subject_text) {
            Some(None) => return malformed("reply subject is not UTF-8 without whitespace"),
            Some(Some(reply)) => Some(reply),
            None => None,
        };
        let headers = match pending.header_len {
            None => None,
            Some(header_len) => {
                let block = payload.split_to(header_len);
                match decode_header_block(block) {
                    Ok(headers) => Some(headers),
                    Err(error) => return malformed(&error.to_string()),
                }
            }
        };
        Ok(Some(ServerOp::Msg {
            sid,
            subject,
            reply,
            headers,
            payload,
        }))
    }
}

fn subject_text(bytes: Bytes) -> Option<Text> {
    Text::from_utf8(bytes)
        .ok()
        .filter(|text| !text.chars().any(char::is_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<Vec<ServerOp>, NatsProtocolError> {
        let mut decoder = ServerOpDecoder::default();
        let mut buffer = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = decoder.decode(&mut buffer)? {
            ops.push(op);
        }
        assert!(buffer.is_empty(), "left over: {buffer:?}");
        Ok(ops)
    }

    #[test]
    fn messages_and_control_operations_decode() {
        let ops = decode_all(
            b"INFO {\"server_id\":\"x\"}\r\nPING\r\nPONG\r\n+OK\r\n-ERR 'Authorization Violation'\r\n\
              MSG a.b 7 5\r\nhello\r\nMSG a.c 8 _INBOX.1 0\r\n\r\n\
              HMSG h.x 9 18 20\r\nNATS/1.0\r\nK: v\r\n\r\nhi\r\n",
        )
        .unwrap();
        assert_eq!(
            ops[0],
            ServerOp::Info(Bytes::from_static(b"{\"server_id\":\"x\"}"))
        );
        assert_eq!(ops[1..4], [ServerOp::Ping, ServerOp::Pong, ServerOp::Ok]);
        assert_eq!(ops[4], ServerOp::Err("Authorization Violation".to_string()));
        assert_eq!(
            ops[5],
            ServerOp::Msg {
                sid: 7,
                subject: Text::from("a.b"),
                reply: None,
                headers: None,
                payload: Bytes::from_static(b"hello"),
            }
        );
        let ServerOp::Msg { reply, payload, .. } = &ops[6] else {
            panic!("{:?}", ops[6]);
        };
        assert_eq!(reply.as_deref(), Some("_INBOX.1"));
        assert!(payload.is_empty());
        let ServerOp::Msg {
            headers: Some(block),
            payload,
            ..
        } = &ops[7]
        else {
            panic!("{:?}", ops[7]);
        };
        assert_eq!(
            block.headers.get("K").map(|value| value.as_str()),
            Some("v")
        );
        assert_eq!(&payload[..], b"hi");
    }

    #[test]
    fn a_status_message_keeps_its_status() {
        let ops = decode_all(b"HMSG _INBOX.a 3 16 16\r\nNATS/1.0 503\r\n\r\n\r\n").unwrap();
        let ServerOp::Msg {
            headers: Some(block),
            ..
        } = &ops[0]
        else {
            panic!("{ops:?}");
        };
        assert_eq!(block.status, Some(503));
    }

    #[test]
    fn a_subject_that_is_not_utf8_costs_that_message_only() {
        let ops = decode_all(b"MSG u.\xff 4 1\r\nx\r\nMSG u.ok 4 2\r\nok\r\n").unwrap();
        assert!(
            matches!(&ops[0], ServerOp::Malformed { sid: Some(4), reason } if reason.contains("subject")),
            "{ops:?}"
        );
        assert!(matches!(&ops[1], ServerOp::Msg { payload, .. } if &payload[..] == b"ok"));
    }

    #[test]
    fn a_header_value_with_a_lone_cr_costs_that_message_only() {
        // "NATS/1.0\r\nK: a\rb\r\n\r\n" is 20 bytes.
        let ops =
            decode_all(b"HMSG h.1 5 20 21\r\nNATS/1.0\r\nK: a\rb\r\n\r\nz\r\nMSG h.2 5 1\r\ny\r\n")
                .unwrap();
        assert!(
            matches!(&ops[0], ServerOp::Malformed { sid: Some(5), .. }),
            "{ops:?}"
        );
        assert!(matches!(&ops[1], ServerOp::Msg { subject, .. } if subject == "h.2"));
    }

    #[test]
    fn a_message_split_across_reads_waits_for_its_payload() {
        let mut decoder = ServerOpDecoder::default();
        let mut buffer = BytesMut::from(&b"MSG a 1 10\r\n01234"[..]);
        assert_eq!(decoder.decode(&mut buffer).unwrap(), None);
        buffer.extend_from_slice(b"56789\r\nPING\r\n");
        assert!(matches!(
            decoder.decode(&mut buffer).unwrap(),
            Some(ServerOp::Msg { .. })
        ));
        assert_eq!(decoder.decode(&mut buffer).unwrap(), Some(ServerOp::Ping));
    }

    #[test]
    fn framing_that_cannot_be_followed_is_an_error() {
        assert!(decode_all(b"MSG a 1 ten\r\n").is_err());
        assert!(decode_all(b"MSG a 1 2\r\nabcd\r\n").is_err());
        assert!(decode_all(b"BOGUS\r\n").is_err());
        assert!(decode_all(b"HMSG a 1 9 3\r\n").is_err());
        let mut small = ServerOpDecoder::new(4);
        let mut buffer = BytesMut::from(&b"MSG a 1 5\r\n"[..]);
        assert!(small.decode(&mut buffer).is_err());
    }
}
