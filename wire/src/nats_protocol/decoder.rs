//! `ClientOpDecoder`: incremental decoding of what a NATS client sends.
//!
//! Control lines are found by their line end, which is searched for only
//! within the control-line limit, so a peer that never sends one costs at
//! most that many buffered bytes. A PUB/HPUB control line is consumed as soon
//! as it is complete and its sizes checked against `max_payload`; the decoder
//! then remembers it and waits until the whole payload and its CRLF are in
//! the buffer, which it asks to reserve (bounded by `max_payload`).

use super::headers::decode_header_block;
use super::{Connect, NatsProtocolError};
use crate::{Headers, Text};
use bytes::{Buf, Bytes, BytesMut};

/// nats-server's default `max_control_line`.
pub const DEFAULT_MAX_CONTROL_LINE: usize = 4096;

/// nats-server's default `max_payload` (1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// One operation sent by a NATS client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    Connect(Connect),
    Pub {
        subject: Text,
        reply: Option<Text>,
        payload: Bytes,
    },
    /// Publish with headers. A status on the client's `NATS/1.0` line is
    /// accepted and dropped: statuses are the server's to set.
    HPub {
        subject: Text,
        reply: Option<Text>,
        headers: Headers,
        payload: Bytes,
    },
    Sub {
        subject: Text,
        queue_group: Option<Text>,
        sid: Text,
    },
    /// `max_msgs: Some(n)` unsubscribes after `n` more messages (nats-server
    /// treats 0 as "now").
    Unsub {
        sid: Text,
        max_msgs: Option<u64>,
    },
    Ping,
    Pong,
}

/// A PUB/HPUB whose control line was consumed and whose payload is awaited.
#[derive(Debug, Clone)]
struct PendingPayload {
    subject: Text,
    reply: Option<Text>,
    /// `Some` for HPUB: how many of the `total` bytes are the header block.
    header_len: Option<usize>,
    total: usize,
}

/// Decodes [`ClientOp`]s off the front of a receive buffer.
///
/// After an error the connection must be closed (see
/// [`NatsProtocolError::closes_connection`]); the decoder's state is then
/// meaningless.
#[derive(Debug, Clone)]
pub struct ClientOpDecoder {
    max_payload: usize,
    max_control_line: usize,
    /// How many bytes at the front of the buffer are known to hold no `\n`,
    /// so feeding a long line piecemeal is linear, not quadratic.
    scanned: usize,
    pending: Option<PendingPayload>,
}

/// Most bytes reserved ahead for a payload that has not arrived yet.
const MAX_RESERVE: usize = DEFAULT_MAX_PAYLOAD + 2;

/// The most tokens any operation has (HMSG from a server: op, subject,
/// sid, reply, two sizes; client operations have at most five).
const MAX_TOKENS: usize = 6;

impl ClientOpDecoder {
    /// `max_payload`: largest PUB/HPUB payload (incl. headers) accepted.
    /// Control lines are limited to [`DEFAULT_MAX_CONTROL_LINE`] bytes.
    pub fn new(max_payload: usize) -> ClientOpDecoder {
        ClientOpDecoder {
            max_payload,
            max_control_line: DEFAULT_MAX_CONTROL_LINE,
            scanned: 0,
            pending: None,
        }
    }

    /// Changes the longest control line accepted (operation and arguments,
    /// without the line end).
    pub fn with_max_control_line(mut self, max_control_line: usize) -> ClientOpDecoder {
        self.max_control_line = max_control_line;
        self
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub fn max_control_line(&self) -> usize {
        self.max_control_line
    }

    /// Decodes one op from the front of `buffer`, consuming its bytes;
    /// `Ok(None)` = need more bytes.
    ///
    /// `Ok(None)` may still have consumed a PUB/HPUB control line (the
    /// decoder keeps it) and reserved room for the payload, at most
    /// `max_payload + 2` bytes (and at most 1 MiB + 2 at a time). Otherwise the buffer holds at most
    /// `max_control_line + 1` unconsumed bytes when more are asked for.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<ClientOp>, NatsProtocolError> {
        if self.pending.is_some() {
            return self.decode_payload(buffer);
        }
        let Some(line) = self.take_line(buffer)? else {
            return Ok(None);
        };
        match self.parse_line(line)? {
            Parsed::Op(op) => Ok(Some(op)),
            Parsed::AwaitPayload(pending) => {
                self.pending = Some(pending);
                self.decode_payload(buffer)
            }
        }
    }

    /// Splits the next control line (without its line end) off `buffer`.
    fn take_line(&mut self, buffer: &mut BytesMut) -> Result<Option<Bytes>, NatsProtocolError> {
        take_line(buffer, &mut self.scanned, self.max_control_line)
    }

    fn decode_payload(
        &mut self,
        buffer: &mut BytesMut,
    ) -> Result<Option<ClientOp>, NatsProtocolError> {
        let Some(pending) = &self.pending else {
            return Ok(None);
        };
        let total = pending.total;
        let needed = total.saturating_add(2);
        // Check whatever part of the terminator has arrived, so a wrong size
        // is reported as soon as it shows instead of after buffering more.
        if let Some(terminator) = buffer.get(total..buffer.len().min(needed)) {
            if !b"\r\n".starts_with(terminator) {
                return Err(NatsProtocolError::MissingPayloadTerminator);
            }
        }
        if buffer.len() < needed {
            // Room for the rest of the op, so the next reads complete it.
            // `total` passed the max_payload check; the cap keeps a caller's
            // "unlimited" max_payload from turning one control line into a
            // huge allocation (the buffer still grows as bytes arrive).
            buffer.reserve((needed - buffer.len()).min(MAX_RESERVE));
            return Ok(None);
        }
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        let mut payload = buffer.split_to(total).freeze();
        buffer.advance(2);
        let op = match pending.header_len {
            None => ClientOp::Pub {
                subject: pending.subject,
                reply: pending.reply,
                payload,
            },
            Some(header_len) => {
                let block = payload.split_to(header_len);
                // An empty block is not valid NATS, but it can only mean "no
                // headers"; HMSG re-encodes it properly downstream.
                let headers = if block.is_empty() {
                    Headers::new()
                } else {
                    decode_header_block(block)?.headers
                };
                ClientOp::HPub {
                    subject: pending.subject,
                    reply: pending.reply,
                    headers,
                    payload,
                }
            }
        };
        Ok(Some(op))
    }

    fn parse_line(&self, line: Bytes) -> Result<Parsed, NatsProtocolError> {
        let tokens = Tokens::split(&line);
        let Some(&(op_start, op_end)) = tokens.get(0) else {
            return Err(unknown(&line[..]));
        };
        let op = &line[op_start..op_end];
        // nats-server's parser expects the operation at the very start.
        if op_start != 0 {
            return Err(unknown(&line[..]));
        }
        let args = &tokens.as_slice()[1..];
        if op.eq_ignore_ascii_case(b"PUB") {
            self.parse_pub(&line, args).map(Parsed::AwaitPayload)
        } else if op.eq_ignore_ascii_case(b"HPUB") {
            self.parse_hpub(&line, args).map(Parsed::AwaitPayload)
        } else if op.eq_ignore_ascii_case(b"SUB") {
            parse_sub(&line, args).map(Parsed::Op)
        } else if op.eq_ignore_ascii_case(b"UNSUB") {
            parse_unsub(&line, args).map(Parsed::Op)
        } else if op.eq_ignore_ascii_case(b"PING") {
            no_args("PING", args).map(|()| Parsed::Op(ClientOp::Ping))
        } else if op.eq_ignore_ascii_case(b"PONG") {
            no_args("PONG", args).map(|()| Parsed::Op(ClientOp::Pong))
        } else if op.eq_ignore_ascii_case(b"CONNECT") {
            // The JSON may contain blanks, so take the rest of the line whole.
            let json = trim_blanks(&line[op_end..]);
            if json.is_empty() {
                return Err(NatsProtocolError::InvalidConnect(
                    "missing JSON argument".to_owned(),
                ));
            }
            Connect::from_json(json).map(|connect| Parsed::Op(ClientOp::Connect(connect)))
        } else {
            Err(unknown(op))
        }
    }

    fn parse_pub(
        &self,
        line: &Bytes,
        args: &[(usize, usize)],
    ) -> Result<PendingPayload, NatsProtocolError> {
        const OP: &str = "PUB";
        let (subject, reply, size) = match args {
            [subject, size] => (subject, None, size),
            [subject, reply, size] => (subject, Some(reply), size),
            _ => return Err(invalid_args(OP, "expected <subject> [reply-to] <#bytes>")),
        };
        let total = parse_size(OP, &line[size.0..size.1])?;
        self.check_payload(total)?;
        Ok(PendingPayload {
            subject: token(OP, line, *subject, "subject")?,
            reply: reply
                .map(|reply| token(OP, line, *reply, "reply subject"))
                .transpose()?,
            header_len: None,
            total,
        })
    }

    fn parse_hpub(
        &self,
        line: &Bytes,
        args: &[(usize, usize)],
    ) -> Result<PendingPayload, NatsProtocolError> {
        const OP: &str = "HPUB";
        let (subject, reply, header_size, total_size) = match args {
            [subject, header, total] => (subject, None, header, total),
            [subject, reply, header, total] => (subject, Some(reply), header, total),
            _ => {
                return Err(invalid_args(
                    OP,
                    "expected <subject> [reply-to] <#header bytes> <#total bytes>",
                ))
            }
        };
        let header_len = parse_size(OP, &line[header_size.0..header_size.1])?;
        let total = parse_size(OP, &line[total_size.0..total_size.1])?;
        if header_len > total {
            return Err(invalid_args(OP, "header size exceeds total size"));
        }
        self.check_payload(total)?;
        Ok(PendingPayload {
            subject: token(OP, line, *subject, "subject")?,
            reply: reply
                .map(|reply| token(OP, line, *reply, "reply subject"))
                .transpose()?,
            header_len: Some(header_len),
            total,
        })
    }

    fn check_payload(&self, size: usize) -> Result<(), NatsProtocolError> {
        if size > self.max_payload {
            return Err(NatsProtocolError::MaxPayloadExceeded {
                size,
                max: self.max_payload,
            });
        }
        Ok(())
    }
}

enum Parsed {
    Op(ClientOp),
    AwaitPayload(PendingPayload),
}

/// Splits the next control line (without its line end) off `buffer`, if
/// one is complete within `max_control_line` bytes. `scanned` remembers how
/// far earlier calls searched, so a long line fed piecemeal costs linear
/// time.
pub(super) fn take_line(
    buffer: &mut BytesMut,
    scanned: &mut usize,
    max_control_line: usize,
) -> Result<Option<Bytes>, NatsProtocolError> {
    // A line of `max` bytes plus "\r\n" is the longest that can be valid.
    let limit = max_control_line.saturating_add(2);
    let search_end = buffer.len().min(limit);
    let start = (*scanned).min(search_end);
    let Some(offset) = buffer[start..search_end].iter().position(|&b| b == b'\n') else {
        if buffer.len() >= limit {
            return Err(NatsProtocolError::ControlLineTooLong {
                max: max_control_line,
            });
        }
        *scanned = search_end;
        return Ok(None);
    };
    let newline = start + offset;
    let end = if newline > 0 && buffer[newline - 1] == b'\r' {
        newline - 1
    } else {
        newline
    };
    if end > max_control_line {
        return Err(NatsProtocolError::ControlLineTooLong {
            max: max_control_line,
        });
    }
    *scanned = 0;
    let mut line = buffer.split_to(newline + 1).freeze();
    line.truncate(end);
    Ok(Some(line))
}

fn parse_sub(line: &Bytes, args: &[(usize, usize)]) -> Result<ClientOp, NatsProtocolError> {
    const OP: &str = "SUB";
    let (subject, queue_group, sid) = match args {
        [subject, sid] => (subject, None, sid),
        [subject, queue, sid] => (subject, Some(queue), sid),
        _ => return Err(invalid_args(OP, "expected <subject> [queue group] <sid>")),
    };
    Ok(ClientOp::Sub {
        subject: token(OP, line, *subject, "subject")?,
        queue_group: queue_group
            .map(|queue| token(OP, line, *queue, "queue group"))
            .transpose()?,
        sid: token(OP, line, *sid, "sid")?,
    })
}

fn parse_unsub(line: &Bytes, args: &[(usize, usize)]) -> Result<ClientOp, NatsProtocolError> {
    const OP: &str = "UNSUB";
    let (sid, max_msgs) = match args {
        [sid] => (sid, None),
        [sid, max] => (sid, Some(max)),
        _ => return Err(invalid_args(OP, "expected <sid> [max_msgs]")),
    };
    let max_msgs = match max_msgs {
        None => None,
        Some(&(start, end)) => Some(
            parse_decimal(&line[start..end])
                .ok_or_else(|| invalid_args(OP, "max_msgs is not a decimal number"))?,
        ),
    };
    Ok(ClientOp::Unsub {
        sid: token(OP, line, *sid, "sid")?,
        max_msgs,
    })
}

fn no_args(op: &'static str, args: &[(usize, usize)]) -> Result<(), NatsProtocolError> {
    if args.is_empty() {
        Ok(())
    } else {
        Err(invalid_args(op, "takes no arguments"))
    }
}

pub(super) fn invalid_args(op: &'static str, reason: &'static str) -> NatsProtocolError {
    NatsProtocolError::InvalidArguments { op, reason }
}

pub(super) fn unknown(op: &[u8]) -> NatsProtocolError {
    // Enough to recognise the operation in a log, bounded for hostile input.
    const SHOWN: usize = 16;
    NatsProtocolError::UnknownOperation {
        op: String::from_utf8_lossy(&op[..op.len().min(SHOWN)]).into_owned(),
    }
}

fn is_blank(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

pub(super) fn trim_blanks(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_blank(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| !is_blank(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// A token of the line as UTF-8 text without whitespace, sliced, not copied.
///
/// Tokens are split on spaces and tabs only (the protocol's separators), so
/// other whitespace (a stray CR, vertical tab, NBSP...) is rejected here
/// rather than forwarded into a subject or echoed back inside a MSG line.
fn token(
    op: &'static str,
    line: &Bytes,
    (start, end): (usize, usize),
    field: &'static str,
) -> Result<Text, NatsProtocolError> {
    let text = Text::from_utf8(line.slice(start..end))
        .map_err(|_| NatsProtocolError::NotUtf8 { field })?;
    if text.chars().any(char::is_whitespace) {
        return Err(invalid_args(op, "argument contains whitespace"));
    }
    Ok(text)
}

/// A non-negative decimal without sign or separators; `None` on anything
/// else, including overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

pub(super) fn parse_size(op: &'static str, digits: &[u8]) -> Result<usize, NatsProtocolError> {
    parse_decimal(digits)
        .and_then(|size| usize::try_from(size).ok())
        .ok_or_else(|| invalid_args(op, "size is not a decimal number in range"))
}

/// The first few blank-separated tokens of a line, as byte ranges.
pub(super) struct Tokens {
    ranges: [(usize, usize); MAX_TOKENS + 1],
    len: usize,
}

impl Tokens {
    /// Collects at most one token more than any operation takes, which is
    /// enough to say "too many arguments" without walking a hostile line.
    pub(super) fn split(line: &[u8]) -> Tokens {
        let mut tokens = Tokens {
            ranges: [(0, 0); MAX_TOKENS + 1],
            len: 0,
        };
        let mut index = 0;
        while index < line.len() && tokens.len < tokens.ranges.len() {
            while index < line.len() && is_blank(line[index]) {
                index += 1;
            }
            let start = index;
            while index < line.len() && !is_blank(line[index]) {
                index += 1;
            }
            if start < index {
                tokens.ranges[tokens.len] = (start, index);
                tokens.len += 1;
            }
        }
        tokens
    }

    pub(super) fn get(&self, index: usize) -> Option<&(usize, usize)> {
        self.as_slice().get(index)
    }

    pub(super) fn as_slice(&self) -> &[(usize, usize)] {
        &self.ranges[..self.len]
    }
}
