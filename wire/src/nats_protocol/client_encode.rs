//! Encoding a [`ClientOp`] as a NATS client would send it: the relay's
//! own upstream connection writes its SUBs and publishes this way, and
//! tests, fuzzers and tools play the client against the decoder with the
//! same types it produces.

use super::headers::{encode_header_block, header_block_len};
use super::server_encode::put_decimal;
use super::ClientOp;
use crate::Headers;
use bytes::{BufMut, BytesMut};

/// Appends one publish as PUB (no headers) or HPUB, from borrowed parts:
/// the relay encodes a batch of queued messages without building a
/// [`ClientOp`] (and cloning its parts) for each.
///
/// The caller checks the subject with [`is_sendable_subject`]; CR and LF
/// inside header names and values become spaces, as in every header block.
pub fn encode_publish(
    out: &mut BytesMut,
    subject: &[u8],
    reply: Option<&[u8]>,
    headers: &Headers,
    payload: &[u8],
) {
    if headers.is_empty() {
        put_pub(out, subject, reply, payload);
    } else {
        put_hpub(out, subject, reply, headers, payload);
    }
}

fn put_pub(out: &mut BytesMut, subject: &[u8], reply: Option<&[u8]>, payload: &[u8]) {
    out.reserve(subject.len() + reply.map_or(0, <[u8]>::len) + payload.len() + 32);
    out.put_slice(b"PUB ");
    put_subject_and_reply(out, subject, reply);
    put_decimal(out, payload.len());
    out.put_slice(b"\r\n");
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

fn put_hpub(
    out: &mut BytesMut,
    subject: &[u8],
    reply: Option<&[u8]>,
    headers: &Headers,
    payload: &[u8],
) {
    let header_len = header_block_len(None, headers);
    out.reserve(subject.len() + reply.map_or(0, <[u8]>::len) + header_len + payload.len() + 48);
    out.put_slice(b"HPUB ");
    put_subject_and_reply(out, subject, reply);
    put_decimal(out, header_len);
    out.put_u8(b' ');
    put_decimal(out, header_len + payload.len());
    out.put_slice(b"\r\n");
    encode_header_block(None, headers, out);
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// `subject [reply] ` of a PUB or HPUB line.
fn put_subject_and_reply(out: &mut BytesMut, subject: &[u8], reply: Option<&[u8]>) {
    out.put_slice(subject);
    if let Some(reply) = reply {
        out.put_u8(b' ');
        out.put_slice(reply);
    }
    out.put_u8(b' ');
}

/// The bytes a publish of these parts counts against the server's
/// `max_payload` (the header block and the payload).
pub fn publish_size(headers: &Headers, payload: &[u8]) -> usize {
    if headers.is_empty() {
        payload.len()
    } else {
        header_block_len(None, headers) + payload.len()
    }
}

/// Whether `subject` can stand in a PUB line: not empty, and no space,
/// tab, CR or LF (any of which would split the line into other
/// operations).
pub fn is_sendable_subject(subject: &[u8]) -> bool {
    !subject.is_empty()
        && !subject
            .iter()
            .any(|byte| matches!(byte, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Appends `op` in its canonical client form (upper-case name, single
/// spaces, CRLF). HPUB always carries a full `NATS/1.0` block, even with no
/// headers.
pub fn encode_client_op(op: &ClientOp, out: &mut BytesMut) {
    match op {
        ClientOp::Connect(connect) => {
            out.put_slice(b"CONNECT ");
            out.put_slice(connect.to_json().as_bytes());
            out.put_slice(b"\r\n");
        }
        ClientOp::Pub {
            subject,
            reply,
            payload,
        } => put_pub(
            out,
            subject.as_bytes(),
            reply.as_ref().map(|reply| &reply.as_bytes()[..]),
            payload,
        ),
        ClientOp::HPub {
            subject,
            reply,
            headers,
            payload,
        } => put_hpub(
            out,
            subject.as_bytes(),
            reply.as_ref().map(|reply| &reply.as_bytes()[..]),
            headers,
            payload,
        ),
        ClientOp::Sub {
            subject,
            queue_group,
            sid,
        } => {
            out.put_slice(b"SUB ");
            out.put_slice(subject.as_bytes());
            if let Some(queue_group) = queue_group {
                out.put_u8(b' ');
                out.put_slice(queue_group.as_bytes());
            }
            out.put_u8(b' ');
            out.put_slice(sid.as_bytes());
            out.put_slice(b"\r\n");
        }
        ClientOp::Unsub { sid, max_msgs } => {
            out.put_slice(b"UNSUB ");
            out.put_slice(sid.as_bytes());
            if let Some(max_msgs) = max_msgs {
                out.put_u8(b' ');
                out.put_slice(max_msgs.to_string().as_bytes());
            }
            out.put_slice(b"\r\n");
        }
        ClientOp::Ping => out.put_slice(b"PING\r\n"),
        ClientOp::Pong => out.put_slice(b"PONG\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats_protocol::ClientOpDecoder;
    use crate::Text;
    use bytes::Bytes;

    fn decode_all(bytes: BytesMut) -> Vec<ClientOp> {
        let mut decoder = ClientOpDecoder::new(1 << 20);
        let mut buffer = bytes;
        let mut ops = Vec::new();
        while let Some(op) = decoder.decode(&mut buffer).expect("valid protocol") {
            ops.push(op);
        }
        assert!(buffer.is_empty(), "left over: {:?}", &buffer[..]);
        ops
    }

    #[test]
    fn a_batch_of_publishes_decodes_as_the_same_messages_in_order() {
        let mut headers = Headers::new();
        headers.insert("Holdfast-Chain", "r1:7");
        headers.insert("X-Line", "a\r\nINJECTED");
        let mut out = BytesMut::new();
        encode_publish(&mut out, b"a.b", None, &Headers::new(), b"plain");
        encode_publish(&mut out, b"c", Some(b"_INBOX.1"), &headers, b"");
        encode_publish(&mut out, b"d", Some(b"r"), &Headers::new(), b"x\r\ny");
        let ops = decode_all(out);
        assert_eq!(
            ops,
            vec![
                ClientOp::Pub {
                    subject: Text::from("a.b"),
                    reply: None,
                    payload: Bytes::from_static(b"plain"),
                },
                ClientOp::HPub {
                    subject: Text::from("c"),
                    reply: Some(Text::from("_INBOX.1")),
                    headers: {
                        let mut expected = Headers::new();
                        expected.insert("Holdfast-Chain", "r1:7");
                        // One header per line: CR LF cannot start another.
                        expected.insert("X-Line", "a  INJECTED");
                        expected
                    },
                    payload: Bytes::new(),
                },
                ClientOp::Pub {
                    subject: Text::from("d"),
                    reply: Some(Text::from("r")),
                    payload: Bytes::from_static(b"x\r\ny"),
                },
            ]
        );
    }

    #[test]
    fn size_counts_what_the_server_counts_against_max_payload() {
        let mut headers = Headers::new();
        assert_eq!(publish_size(&headers, b"12345"), 5);
        headers.insert("A", "1");
        let mut block = BytesMut::new();
        encode_header_block(None, &headers, &mut block);
        assert_eq!(publish_size(&headers, b"12345"), block.len() + 5);
    }

    #[test]
    fn subjects_that_would_split_the_line_are_not_sendable() {
        assert!(is_sendable_subject(b"a.b.>"));
        for bad in [&b""[..], b"a b", b"a\tb", b"a\r\nPUB x 1", b"a\n"] {
            assert!(!is_sendable_subject(bad), "{bad:?}");
        }
    }
}
