//! The NATS header block carried by HPUB and HMSG.
//!
//! ```text
//! NATS/1.0[ <status>[ <description>]]\r\n
//! <Name>: <Value>\r\n        (zero or more; names may repeat)
//! \r\n
//! ```
//!
//! Decoding is strict about the framing (CRLF line ends, the version line,
//! the closing empty line) because a block that parses differently here than
//! at the receiving client would deliver different headers. Names are checked
//! as async-nats checks them (visible ASCII, no `:`) so everything decoded
//! here can be republished through it; values are trimmed of surrounding
//! spaces and tabs, and obsolete folded continuation lines are joined with a
//! space, as Go's `textproto` (nats-server, nats.go) does.

use super::NatsProtocolError;
use crate::{Headers, Text};
use bytes::{BufMut, Bytes, BytesMut};

const VERSION: &[u8] = b"NATS/1.0";

/// Most headers one block may carry: what a holdfast frame can encode, so a
/// message decoded here can always be forwarded.
pub const MAX_HEADERS: usize = u16::MAX as usize;
const CRLF: &[u8] = b"\r\n";

/// A decoded header block: an optional status line and the headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    /// The status code after `NATS/1.0`, e.g. 503 for "no responders".
    pub status: Option<u16>,
    /// The text after the status code, e.g. "No Messages".
    pub description: Option<Text>,
    pub headers: Headers,
}

fn invalid(reason: &str) -> NatsProtocolError {
    NatsProtocolError::InvalidHeaders(reason.to_owned())
}

fn is_blank(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// `bytes` without leading and trailing spaces and tabs, as a range.
fn trim_range(bytes: &[u8], start: usize, end: usize) -> (usize, usize) {
    let mut start = start;
    let mut end = end;
    while start < end && is_blank(bytes[start]) {
        start += 1;
    }
    while end > start && is_blank(bytes[end - 1]) {
        end -= 1;
    }
    (start, end)
}

fn text(block: &Bytes, start: usize, end: usize, what: &str) -> Result<Text, NatsProtocolError> {
    Text::from_utf8(block.slice(start..end))
        .map_err(|_| NatsProtocolError::InvalidHeaders(format!("{what} is not valid UTF-8")))
}

/// Whether async-nats (and so the relay's upstream) accepts `name`.
pub fn is_valid_header_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| b.is_ascii_graphic() && b != b':')
}

/// Decodes a whole header block; the returned texts are slices of `block`.
pub fn decode_header_block(block: Bytes) -> Result<HeaderBlock, NatsProtocolError> {
    if !block.ends_with(b"\r\n\r\n") {
        return Err(invalid("header block does not end with an empty line"));
    }
    // Everything before the closing empty line is CRLF-terminated lines.
    let body_end = block.len() - CRLF.len();
    let mut lines = Vec::new();
    let mut start = 0;
    while start < body_end {
        let Some(offset) = block[start..body_end]
            .windows(2)
            .position(|pair| pair == CRLF)
        else {
            return Err(invalid("header line without CRLF"));
        };
        let end = start + offset;
        if block[start..end].iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err(invalid("bare CR or LF in a header line"));
        }
        lines.push((start, end));
        start = end + CRLF.len();
    }
    let mut lines = lines.into_iter();
    let Some((version_start, version_end)) = lines.next() else {
        return Err(invalid("missing NATS/1.0 version line"));
    };
    let (status, description) = decode_version_line(&block, version_start, version_end)?;

    let mut headers: Vec<(Text, Text)> = Vec::new();
    // The last header's value while continuation lines are appended to it.
    // Built in one growing string: re-joining per line would make a block of
    // many short folds quadratic.
    let mut folded: Option<String> = None;
    for (start, end) in lines {
        if start == end {
            return Err(invalid("empty line inside the header block"));
        }
        if is_blank(block[start]) {
            let Some((_, value)) = headers.last() else {
                return Err(invalid("continuation line before any header"));
            };
            let (from, to) = trim_range(&block, start, end);
            let more = text(&block, from, to, "header value")?;
            if !more.is_empty() {
                let joined = folded.get_or_insert_with(|| value.to_string());
                if !joined.is_empty() {
                    joined.push(' ');
                }
                joined.push_str(&more);
            }
            continue;
        }
        finish_fold(&mut headers, &mut folded);
        let Some(colon) = block[start..end].iter().position(|&b| b == b':') else {
            return Err(invalid("header line without ':'"));
        };
        let name_end = start + colon;
        if !is_valid_header_name(&block[start..name_end]) {
            return Err(invalid("header name is empty or not visible ASCII"));
        }
        let (from, to) = trim_range(&block, name_end + 1, end);
        let name = text(&block, start, name_end, "header name")?;
        let value = text(&block, from, to, "header value")?;
        if headers.len() == MAX_HEADERS {
            return Err(invalid("too many headers"));
        }
        headers.push((name, value));
    }
    finish_fold(&mut headers, &mut folded);
    Ok(HeaderBlock {
        status,
        description,
        headers: Headers(headers),
    })
}

/// Replaces the last header's value with its folded continuation, if any.
fn finish_fold(headers: &mut [(Text, Text)], folded: &mut Option<String>) {
    if let (Some(joined), Some((_, value))) = (folded.take(), headers.last_mut()) {
        *value = Text::from(joined);
    }
}

fn decode_version_line(
    block: &Bytes,
    start: usize,
    end: usize,
) -> Result<(Option<u16>, Option<Text>), NatsProtocolError> {
    let line = &block[start..end];
    if !line.starts_with(VERSION) {
        return Err(invalid("header block does not start with NATS/1.0"));
    }
    let rest = start + VERSION.len();
    if rest < end && !is_blank(block[rest]) {
        return Err(invalid("unexpected text after NATS/1.0"));
    }
    let (from, to) = trim_range(block, rest, end);
    if from == to {
        return Ok((None, None));
    }
    let code_end = block[from..to]
        .iter()
        .position(|&b| is_blank(b))
        .map_or(to, |offset| from + offset);
    let code = &block[from..code_end];
    // Status codes are three digits; anything else is not a status line.
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(invalid("status is not a three-digit code"));
    }
    let status = code
        .iter()
        .fold(0u16, |acc, digit| acc * 10 + u16::from(digit - b'0'));
    let (from, to) = trim_range(block, code_end, to);
    let description = if from == to {
        None
    } else {
        Some(text(block, from, to, "status description")?)
    };
    Ok((Some(status), description))
}

/// Appends `bytes` with CR and LF replaced by spaces.
///
/// Headers reach the relay from holdfast clients, not only from NATS ones; a
/// CR or LF in a name or value would split one header into two at the
/// receiving client. Replacing keeps the length, so [`header_block_len`]
/// stays exact.
fn put_single_line(out: &mut BytesMut, bytes: &[u8]) {
    // A scan without an early exit leaves the compiler free to vectorize
    // it; header names and values are short and almost never hold a line
    // break, and the early-exit form was 4 % of the relay's CPU replaying a
    // journal.
    let has_line_break = bytes
        .iter()
        .fold(false, |found, &b| found | (b == b'\r') | (b == b'\n'));
    if !has_line_break {
        out.put_slice(bytes);
        return;
    }
    out.reserve(bytes.len());
    for &byte in bytes {
        out.put_u8(if byte == b'\r' || byte == b'\n' {
            b' '
        } else {
            byte
        });
    }
}

/// How many bytes [`encode_header_block`] appends for these arguments.
pub fn header_block_len(status: Option<(u16, Option<&str>)>, headers: &Headers) -> usize {
    let status_len = match status {
        None => 0,
        Some((code, description)) => {
            1 + decimal_len(code) + description.map_or(0, |text| 1 + text.len())
        }
    };
    let headers_len: usize = headers
        .iter()
        .map(|(name, value)| name.len() + 2 + value.len() + CRLF.len())
        .sum();
    VERSION.len() + status_len + CRLF.len() + headers_len + CRLF.len()
}

fn decimal_len(mut value: u16) -> usize {
    let mut len = 1;
    while value >= 10 {
        value /= 10;
        len += 1;
    }
    len
}

/// Appends a header block: `NATS/1.0[ status[ description]]`, the headers, an empty line.
///
/// `description` is written only with a status (the grammar has no place for
/// it otherwise). CR and LF inside names, values or the description become
/// spaces so every header stays one line.
pub fn encode_header_block(
    status: Option<(u16, Option<&str>)>,
    headers: &Headers,
    out: &mut BytesMut,
) {
    out.reserve(header_block_len(status, headers));
    out.put_slice(VERSION);
    if let Some((code, description)) = status {
        out.put_u8(b' ');
        out.put_slice(code.to_string().as_bytes());
        if let Some(description) = description {
            out.put_u8(b' ');
            put_single_line(out, description.as_bytes());
        }
    }
    out.put_slice(CRLF);
    for (name, value) in headers.iter() {
        put_single_line(out, name.as_bytes());
        out.put_slice(b": ");
        put_single_line(out, value.as_bytes());
        out.put_slice(CRLF);
    }
    out.put_slice(CRLF);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Result<HeaderBlock, NatsProtocolError> {
        decode_header_block(Bytes::copy_from_slice(block))
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.insert(*name, *value);
        }
        headers
    }

    #[test]
    fn minimal_block() {
        assert_eq!(decode(b"NATS/1.0\r\n\r\n"), Ok(HeaderBlock::default()));
    }

    #[test]
    fn repeated_names_keep_order() {
        let block = decode(b"NATS/1.0\r\nA: 1\r\nB:2\r\nA:   3  \r\nEmpty:\r\n\r\n").unwrap();
        assert_eq!(
            block.headers,
            headers(&[("A", "1"), ("B", "2"), ("A", "3"), ("Empty", "")])
        );
        assert_eq!(block.status, None);
    }

    #[test]
    fn status_and_description() {
        let block = decode(b"NATS/1.0 503\r\n\r\n").unwrap();
        assert_eq!(block.status, Some(503));
        assert_eq!(block.description, None);
        let block = decode(b"NATS/1.0 404 No Messages\r\nX: y\r\n\r\n").unwrap();
        assert_eq!(block.status, Some(404));
        assert_eq!(block.description, Some(Text::from("No Messages")));
        assert_eq!(block.headers, headers(&[("X", "y")]));
        assert_eq!(decode(b"NATS/1.0  \r\n\r\n"), Ok(HeaderBlock::default()));
    }

    #[test]
    fn folded_values_are_joined() {
        let block = decode(b"NATS/1.0\r\nA: one\r\n  two\r\n\tthree\r\nB: x\r\n\r\n").unwrap();
        assert_eq!(
            block.headers,
            headers(&[("A", "one two three"), ("B", "x")])
        );
    }

    #[test]
    fn folds_onto_empty_values_and_blank_folds() {
        let block = decode(b"NATS/1.0\r\nA:\r\n x\r\n \t\r\nB: y\r\n\r\n").unwrap();
        assert_eq!(block.headers, headers(&[("A", "x"), ("B", "y")]));
    }

    #[test]
    fn many_folds_stay_cheap() {
        // 1 MiB of three-byte folds: quadratic joining would take minutes.
        let mut block = b"NATS/1.0\r\nA: a\r\n".to_vec();
        for _ in 0..(1 << 18) {
            block.extend_from_slice(b" b\r\n");
        }
        block.extend_from_slice(b"\r\n");
        let decoded = decode(&block).unwrap();
        assert_eq!(decoded.headers.len(), 1);
        assert_eq!(decoded.headers.0[0].1.len(), 1 + 2 * (1 << 18));
    }

    #[test]
    fn header_count_is_limited() {
        let block = |count: usize| {
            let mut block = b"NATS/1.0\r\n".to_vec();
            for _ in 0..count {
                block.extend_from_slice(b"a:\r\n");
            }
            block.extend_from_slice(b"\r\n");
            block
        };
        assert_eq!(
            decode(&block(MAX_HEADERS)).unwrap().headers.len(),
            MAX_HEADERS
        );
        assert!(matches!(
            decode(&block(MAX_HEADERS + 1)),
            Err(NatsProtocolError::InvalidHeaders(_))
        ));
    }

    #[test]
    fn values_may_contain_colons_and_unicode() {
        let block = decode("NATS/1.0\r\nUrl: http://x:1/é\r\n\r\n".as_bytes()).unwrap();
        assert_eq!(block.headers, headers(&[("Url", "http://x:1/é")]));
    }

    #[test]
    fn malformed_blocks_are_rejected() {
        for block in [
            &b""[..],
            b"NATS/1.0\r\n",
            b"NATS/1.0\r\nA: 1\r\n",
            b"NATS/2.0\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
            b"NATS/1.0x\r\n\r\n",
            b"NATS/1.0 50\r\n\r\n",
            b"NATS/1.0 5034\r\n\r\n",
            b"NATS/1.0 abc\r\n\r\n",
            b"NATS/1.0\nA: 1\n\n",
            b"NATS/1.0\r\nA: 1\nB: 2\r\n\r\n",
            b"NATS/1.0\r\nA 1\r\n\r\n",
            b"NATS/1.0\r\n: 1\r\n\r\n",
            b"NATS/1.0\r\nA B: 1\r\n\r\n",
            b"NATS/1.0\r\n\r\nA: 1\r\n\r\n",
            b"NATS/1.0\r\n continued\r\n\r\n",
            b"NATS/1.0\r\nA: \xff\r\n\r\n",
            b"NATS/1.0\r\n\xc3\xa9: 1\r\n\r\n",
            b"NATS/1.0 503 \xff\r\n\r\n",
            b"NATS/1.0\r\nA: 1\r\r\n\r\n",
        ] {
            assert!(
                matches!(decode(block), Err(NatsProtocolError::InvalidHeaders(_))),
                "{:?}",
                String::from_utf8_lossy(block)
            );
        }
    }

    #[test]
    fn encode_exact_bytes() {
        let mut out = BytesMut::new();
        encode_header_block(None, &headers(&[("A", "1"), ("A", "2")]), &mut out);
        assert_eq!(&out[..], b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n");

        let mut out = BytesMut::new();
        encode_header_block(Some((503, None)), &Headers::new(), &mut out);
        assert_eq!(&out[..], b"NATS/1.0 503\r\n\r\n");

        let mut out = BytesMut::new();
        encode_header_block(
            Some((408, Some("Request Timeout"))),
            &Headers::new(),
            &mut out,
        );
        assert_eq!(&out[..], b"NATS/1.0 408 Request Timeout\r\n\r\n");
    }

    #[test]
    fn encode_keeps_every_header_on_one_line() {
        let mut out = BytesMut::new();
        let evil = headers(&[("A\r\nB", "1\r\nInjected: yes")]);
        encode_header_block(Some((503, Some("x\ny"))), &evil, &mut out);
        assert_eq!(
            &out[..],
            b"NATS/1.0 503 x y\r\nA  B: 1  Injected: yes\r\n\r\n"
        );
        assert_eq!(
            out.len(),
            header_block_len(Some((503, Some("x\ny"))), &evil)
        );
    }

    #[test]
    fn len_matches_encoding() {
        for status in [
            None,
            Some((0, None)),
            Some((9, None)),
            Some((503, Some("No"))),
            Some((65535, Some(""))),
        ] {
            let hs = headers(&[("Name", "vålue"), ("K", "")]);
            let mut out = BytesMut::new();
            encode_header_block(status, &hs, &mut out);
            assert_eq!(out.len(), header_block_len(status, &hs), "{status:?}");
        }
    }

    #[test]
    fn encode_then_decode() {
        let hs = headers(&[("Nats-Msg-Id", "m-1"), ("trace", "a b"), ("trace", "")]);
        let mut out = BytesMut::new();
        encode_header_block(Some((404, Some("No Messages"))), &hs, &mut out);
        let block = decode_header_block(out.freeze()).unwrap();
        assert_eq!(block.headers, hs);
        assert_eq!(block.status, Some(404));
        assert_eq!(block.description, Some(Text::from("No Messages")));
    }
}
