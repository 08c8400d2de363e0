//! Encoders for what the server sends: MSG, HMSG, PING, PONG, +OK, -ERR.
//!
//! Infallible by design: the relay calls them with subjects it validated and
//! sids the decoder produced, neither of which can contain blanks or line
//! ends. Header names, values and messages, which can come from anywhere,
//! have CR and LF replaced by spaces so they cannot end a line early.

use super::headers::{encode_header_block, header_block_len};
use crate::Headers;
use bytes::{BufMut, BytesMut};

/// Appends `n` in decimal without allocating.
pub(super) fn put_decimal(out: &mut BytesMut, n: usize) {
    out.put_slice(crate::digits::Decimal::new(n as u64).as_bytes());
}

/// Writes `<op> <subject> <sid> [reply]` (without sizes or line end).
fn put_msg_prefix(op: &[u8], subject: &str, sid: &str, reply: Option<&str>, out: &mut BytesMut) {
    out.put_slice(op);
    out.put_u8(b' ');
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    out.put_slice(sid.as_bytes());
    if let Some(reply) = reply {
        out.put_u8(b' ');
        out.put_slice(reply.as_bytes());
    }
}

/// Appends `MSG <subject> <sid> [reply] <#bytes>\r\n<payload>\r\n`, or, when
/// `headers` is not empty, `HMSG <subject> <sid> [reply] <#header bytes>
/// <#total bytes>\r\n<NATS/1.0 block><payload>\r\n`.
pub fn encode_msg(
    subject: &str,
    sid: &str,
    reply: Option<&str>,
    headers: &Headers,
    payload: &[u8],
    out: &mut BytesMut,
) {
    if headers.is_empty() {
        out.reserve(subject.len() + sid.len() + reply.map_or(0, str::len) + payload.len() + 40);
        put_msg_prefix(b"MSG", subject, sid, reply, out);
        out.put_u8(b' ');
        put_decimal(out, payload.len());
        out.put_slice(b"\r\n");
        out.put_slice(payload);
        out.put_slice(b"\r\n");
    } else {
        encode_hmsg(subject, sid, reply, None, headers, payload, out);
    }
}

/// Appends an HMSG whose header block has a status line and no headers, and
/// no payload: e.g. status 503 gives `NATS/1.0 503\r\n\r\n` (no responders).
///
/// `status` should be a three-digit code, which is what clients parse.
pub fn encode_status_msg(
    subject: &str,
    sid: &str,
    status: u16,
    description: Option<&str>,
    out: &mut BytesMut,
) {
    encode_hmsg(
        subject,
        sid,
        None,
        Some((status, description)),
        &Headers::new(),
        &[],
        out,
    );
}

/// Appends an HMSG with any combination of status, headers and payload.
pub fn encode_hmsg(
    subject: &str,
    sid: &str,
    reply: Option<&str>,
    status: Option<(u16, Option<&str>)>,
    headers: &Headers,
    payload: &[u8],
    out: &mut BytesMut,
) {
    let header_len = header_block_len(status, headers);
    let total = header_len + payload.len();
    out.reserve(subject.len() + sid.len() + reply.map_or(0, str::len) + total + 64);
    put_msg_prefix(b"HMSG", subject, sid, reply, out);
    out.put_u8(b' ');
    put_decimal(out, header_len);
    out.put_u8(b' ');
    put_decimal(out, total);
    out.put_slice(b"\r\n");
    encode_header_block(status, headers, out);
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

pub fn encode_ping(out: &mut BytesMut) {
    out.put_slice(b"PING\r\n");
}

pub fn encode_pong(out: &mut BytesMut) {
    out.put_slice(b"PONG\r\n");
}

pub fn encode_ok(out: &mut BytesMut) {
    out.put_slice(b"+OK\r\n");
}

/// Appends `-ERR 'message'\r\n`; CR and LF in `message` become spaces.
pub fn encode_err(message: &str, out: &mut BytesMut) {
    out.reserve(message.len() + 9);
    out.put_slice(b"-ERR '");
    for &byte in message.as_bytes() {
        out.put_u8(if byte == b'\r' || byte == b'\n' {
            b' '
        } else {
            byte
        });
    }
    out.put_slice(b"'\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        write(&mut out);
        out.to_vec()
    }

    #[test]
    fn msg_exact_bytes() {
        assert_eq!(
            encoded(|out| encode_msg("foo.bar", "9", None, &Headers::new(), b"Hello", out)),
            b"MSG foo.bar 9 5\r\nHello\r\n"
        );
        assert_eq!(
            encoded(|out| encode_msg("foo", "s1", Some("_INBOX.x"), &Headers::new(), b"", out)),
            b"MSG foo s1 _INBOX.x 0\r\n\r\n"
        );
    }

    #[test]
    fn hmsg_exact_bytes() {
        let mut headers = Headers::new();
        headers.insert("FoodGroup", "vegetable");
        headers.insert("FoodGroup", "fruit");
        // 10 + 22 + 18 + 2 = 52 header bytes.
        assert_eq!(
            encoded(|out| encode_msg("FOO.BAR", "9", Some("BAZ.69"), &headers, b"Hello World", out)),
            b"HMSG FOO.BAR 9 BAZ.69 52 63\r\nNATS/1.0\r\nFoodGroup: vegetable\r\nFoodGroup: fruit\r\n\r\nHello World\r\n"
        );
    }

    #[test]
    fn status_msg_exact_bytes() {
        assert_eq!(
            encoded(|out| encode_status_msg("_INBOX.a.b", "3", 503, None, out)),
            b"HMSG _INBOX.a.b 3 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
        );
        assert_eq!(
            encoded(|out| encode_status_msg("i", "3", 408, Some("Request Timeout"), out)),
            b"HMSG i 3 32 32\r\nNATS/1.0 408 Request Timeout\r\n\r\n\r\n"
        );
    }

    #[test]
    fn hmsg_with_status_headers_and_payload() {
        let mut headers = Headers::new();
        headers.insert("K", "v");
        assert_eq!(
            encoded(|out| encode_hmsg(
                "s",
                "1",
                Some("r"),
                Some((100, Some("Idle Heartbeat"))),
                &headers,
                b"p",
                out
            )),
            b"HMSG s 1 r 37 38\r\nNATS/1.0 100 Idle Heartbeat\r\nK: v\r\n\r\np\r\n"
        );
    }

    #[test]
    fn control_ops_exact_bytes() {
        assert_eq!(encoded(encode_ping), b"PING\r\n");
        assert_eq!(encoded(encode_pong), b"PONG\r\n");
        assert_eq!(encoded(encode_ok), b"+OK\r\n");
        assert_eq!(
            encoded(|out| encode_err("Unknown Protocol Operation", out)),
            b"-ERR 'Unknown Protocol Operation'\r\n"
        );
        assert_eq!(
            encoded(|out| encode_err("two\r\nlines", out)),
            b"-ERR 'two  lines'\r\n"
        );
    }

    #[test]
    fn decimals() {
        for n in [0usize, 7, 10, 99, 1048576, usize::MAX] {
            assert_eq!(encoded(|out| put_decimal(out, n)), n.to_string().as_bytes());
        }
    }
}
