//! Encoding a [`ClientOp`] as a NATS client would send it.
//!
//! The relay never sends these; they exist so tests, fuzzers and tools can
//! play the client against the decoder with the same types it produces.

use super::headers::{encode_header_block, header_block_len};
use super::server_encode::put_decimal;
use super::ClientOp;
use bytes::{BufMut, BytesMut};

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
        } => {
            out.reserve(subject.len() + payload.len() + 40);
            out.put_slice(b"PUB ");
            out.put_slice(subject.as_bytes());
            if let Some(reply) = reply {
                out.put_u8(b' ');
                out.put_slice(reply.as_bytes());
            }
            out.put_u8(b' ');
            put_decimal(out, payload.len());
            out.put_slice(b"\r\n");
            out.put_slice(payload);
            out.put_slice(b"\r\n");
        }
        ClientOp::HPub {
            subject,
            reply,
            headers,
            payload,
        } => {
            let header_len = header_block_len(None, headers);
            out.put_slice(b"HPUB ");
            out.put_slice(subject.as_bytes());
            if let Some(reply) = reply {
                out.put_u8(b' ');
                out.put_slice(reply.as_bytes());
            }
            out.put_u8(b' ');
            put_decimal(out, header_len);
            out.put_u8(b' ');
            put_decimal(out, header_len + payload.len());
            out.put_slice(b"\r\n");
            encode_header_block(None, headers, out);
            out.put_slice(payload);
            out.put_slice(b"\r\n");
        }
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
