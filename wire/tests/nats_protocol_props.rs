//! Property tests of the NATS client-protocol codec: whatever a client
//! encodes decodes back however it is split and spelled, and no input makes
//! the decoder panic, stall or buffer past its limits. The same for the
//! server-side decoder the relay's subscriber connection reads with.

use bytes::{Bytes, BytesMut};
use holdfast_wire::nats_protocol::*;
use holdfast_wire::{Headers, Text};
use proptest::prelude::*;

/// Small, so valid-looking PUBs from the strategies sometimes exceed it.
const MAX_PAYLOAD: usize = 32;
const MAX_CONTROL_LINE: usize = 64;

fn decoder() -> ClientOpDecoder {
    ClientOpDecoder::new(MAX_PAYLOAD).with_max_control_line(MAX_CONTROL_LINE)
}

// ---- strategies -------------------------------------------------------------

fn token() -> impl Strategy<Value = Text> {
    "[a-zA-Z0-9._>*é漢🦀-]{1,8}".prop_map(Text::from)
}

fn payload(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn headers() -> impl Strategy<Value = Headers> {
    // Names as async-nats accepts them; values as the decoder returns them
    // (trimmed, single-line).
    let value =
        "[a-z0-9é漢 \t:;]{0,8}".prop_map(|value| value.trim_matches([' ', '\t']).to_owned());
    prop::collection::vec(("[!-9;-~]{1,6}", value), 0..4).prop_map(|pairs| {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.insert(name, value);
        }
        headers
    })
}

fn opt_string() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[a-z \"\\\\é{}]{1,6}")
}

fn connect() -> impl Strategy<Value = Connect> {
    (
        any::<[bool; 5]>(),
        [
            opt_string(),
            opt_string(),
            opt_string(),
            opt_string(),
            opt_string(),
            opt_string(),
        ],
        0u8..=1,
    )
        .prop_map(
            |(flags, [name, lang, version, user, pass, auth_token], protocol)| Connect {
                verbose: flags[0],
                pedantic: flags[1],
                echo: flags[2],
                headers: flags[3],
                // nats-server refuses no_responders without headers.
                no_responders: flags[3] && flags[4],
                name,
                lang,
                version,
                protocol,
                user,
                pass,
                auth_token,
            },
        )
}

fn client_op() -> impl Strategy<Value = ClientOp> {
    prop_oneof![
        connect().prop_map(ClientOp::Connect),
        (token(), prop::option::of(token()), payload(40)).prop_map(|(subject, reply, payload)| {
            ClientOp::Pub {
                subject,
                reply,
                payload,
            }
        }),
        (token(), prop::option::of(token()), headers(), payload(20)).prop_map(
            |(subject, reply, headers, payload)| ClientOp::HPub {
                subject,
                reply,
                headers,
                payload
            }
        ),
        (token(), prop::option::of(token()), token()).prop_map(|(subject, queue_group, sid)| {
            ClientOp::Sub {
                subject,
                queue_group,
                sid,
            }
        }),
        (token(), prop::option::of(any::<u64>()))
            .prop_map(|(sid, max_msgs)| ClientOp::Unsub { sid, max_msgs }),
        Just(ClientOp::Ping),
        Just(ClientOp::Pong),
    ]
}

/// How a particular client spells an op: name case, blanks, line end.
#[derive(Debug, Clone)]
struct Style {
    case_mask: u16,
    separator: &'static str,
    line_end: &'static str,
    trailing_blank: bool,
}

fn style() -> impl Strategy<Value = Style> {
    (
        any::<u16>(),
        prop::sample::select(vec![" ", "\t", "  ", " \t ", "\t\t"]),
        prop::sample::select(vec!["\r\n", "\n"]),
        any::<bool>(),
    )
        .prop_map(|(case_mask, separator, line_end, trailing_blank)| Style {
            case_mask,
            separator,
            line_end,
            trailing_blank,
        })
}

/// Encodes `op` the way a client might, independently of `encode_client_op`.
fn encode_styled(op: &ClientOp, style: &Style, out: &mut Vec<u8>) {
    let name = |name: &str| -> String {
        name.chars()
            .enumerate()
            .map(|(i, c)| {
                if style.case_mask >> (i % 16) & 1 == 1 {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
            .collect()
    };
    let line = |out: &mut Vec<u8>, parts: Vec<String>| {
        out.extend_from_slice(parts.join(style.separator).as_bytes());
        if style.trailing_blank {
            out.extend_from_slice(style.separator.as_bytes());
        }
        out.extend_from_slice(style.line_end.as_bytes());
    };
    match op {
        ClientOp::Connect(connect) => {
            line(out, vec![name("CONNECT"), connect.to_json()]);
        }
        ClientOp::Pub {
            subject,
            reply,
            payload,
        } => {
            let mut parts = vec![name("PUB"), subject.to_string()];
            parts.extend(reply.iter().map(Text::to_string));
            parts.push(payload.len().to_string());
            line(out, parts);
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        ClientOp::HPub {
            subject,
            reply,
            headers,
            payload,
        } => {
            let mut block = b"NATS/1.0\r\n".to_vec();
            for (key, value) in headers.iter() {
                block.extend_from_slice(format!("{key}:{}{value}\r\n", style.separator).as_bytes());
            }
            block.extend_from_slice(b"\r\n");
            let mut parts = vec![name("HPUB"), subject.to_string()];
            parts.extend(reply.iter().map(Text::to_string));
            parts.push(block.len().to_string());
            parts.push((block.len() + payload.len()).to_string());
            line(out, parts);
            out.extend_from_slice(&block);
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
        }
        ClientOp::Sub {
            subject,
            queue_group,
            sid,
        } => {
            let mut parts = vec![name("SUB"), subject.to_string()];
            parts.extend(queue_group.iter().map(Text::to_string));
            parts.push(sid.to_string());
            line(out, parts);
        }
        ClientOp::Unsub { sid, max_msgs } => {
            let mut parts = vec![name("UNSUB"), sid.to_string()];
            parts.extend(max_msgs.iter().map(u64::to_string));
            line(out, parts);
        }
        ClientOp::Ping => line(out, vec![name("PING")]),
        ClientOp::Pong => line(out, vec![name("PONG")]),
    }
}

/// Input that is mostly protocol-shaped, so random cases reach deep states:
/// valid ops, valid ops with one byte changed, lines of protocol-ish
/// fragments, raw bytes and newline-free runs.
fn hostile_input() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        prop::sample::select(vec![
            &b"PUB "[..],
            b"pub\t",
            b"HPUB ",
            b"SUB ",
            b"UNSUB ",
            b"PING",
            b"PONG",
            b"CONNECT ",
            b"{}",
            b"{\"verbose\":false}",
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b"0",
            b"1",
            b"5",
            b"12",
            b"16",
            b"99",
            b"97",
            b"4294967296",
            b"NATS/1.0",
            b"NATS/1.0 503",
            b"A: b",
            b"foo",
            b"\xff",
            b"-",
            b":",
            b"MSG ",
        ])
        .prop_map(<[u8]>::to_vec),
        prop::collection::vec(any::<u8>(), 0..4),
    ];
    let valid = (client_op(), style()).prop_map(|(op, style)| {
        let mut bytes = Vec::new();
        encode_styled(&op, &style, &mut bytes);
        bytes
    });
    let mutated = (
        client_op(),
        style(),
        any::<prop::sample::Index>(),
        any::<u8>(),
        0u8..3,
    )
        .prop_map(|(op, style, at, byte, how)| {
            let mut bytes = Vec::new();
            encode_styled(&op, &style, &mut bytes);
            let at = at.index(bytes.len());
            match how {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => {
                    bytes.remove(at);
                }
            }
            bytes
        });
    let junk_line = (
        prop::collection::vec(fragment, 0..6),
        prop::sample::select(vec!["\r\n", "\n"]),
    )
        .prop_map(|(fragments, end)| [fragments.concat(), end.as_bytes().to_vec()].concat());
    let piece = prop_oneof![
        4 => valid,
        3 => mutated,
        3 => junk_line,
        1 => prop::collection::vec(any::<u8>(), 0..16),
        1 => (1usize..200).prop_map(|n| vec![b'x'; n]),
    ];
    prop::collection::vec(piece, 0..10).prop_map(|pieces| pieces.concat())
}

// ---- drivers ---------------------------------------------------------------

/// Everything the decoder said about an input: its ops, then its error (if any).
#[derive(Debug, PartialEq)]
struct Outcome {
    ops: Vec<ClientOp>,
    error: Option<NatsProtocolError>,
}

/// Feeds `input` in chunks of the given sizes (cycled), checking the
/// decoder's bounds after every call.
fn decode_in_chunks(
    decoder: &mut ClientOpDecoder,
    input: &[u8],
    chunks: &[usize],
) -> Result<Outcome, TestCaseError> {
    let mut buffer = BytesMut::new();
    let mut ops = Vec::new();
    let mut offset = 0;
    let mut sizes = chunks.iter().cycle();
    // Bytes may sit in the buffer: an unfinished control line (at most the
    // limit plus a possible '\r'), or a payload and its terminator still
    // missing at least one byte.
    let most_buffered = (decoder.max_control_line() + 1).max(decoder.max_payload() + 1);
    loop {
        loop {
            let before = buffer.len();
            match decoder.decode(&mut buffer) {
                Ok(Some(op)) => {
                    prop_assert!(buffer.len() < before, "an op consumed nothing");
                    ops.push(op);
                }
                Ok(None) => {
                    prop_assert!(
                        buffer.len() <= most_buffered,
                        "{} bytes buffered",
                        buffer.len()
                    );
                    break;
                }
                Err(error) => {
                    return Ok(Outcome {
                        ops,
                        error: Some(error),
                    })
                }
            }
        }
        // What was reserved is bounded by the limits, not by the input.
        prop_assert!(buffer.capacity() <= 2 * (input.len() + decoder.max_payload() + 2).max(64));
        if offset == input.len() {
            return Ok(Outcome { ops, error: None });
        }
        let size = (*sizes.next().unwrap_or(&1))
            .max(1)
            .min(input.len() - offset);
        buffer.extend_from_slice(&input[offset..offset + size]);
        offset += size;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hostile_bytes_never_panic_stall_or_overbuffer(
        input in hostile_input(),
        chunks in prop::collection::vec(1usize..50, 1..6),
    ) {
        let whole = decode_in_chunks(&mut decoder(), &input, &[input.len().max(1)])?;
        let chunked = decode_in_chunks(&mut decoder(), &input, &chunks)?;
        // Where the reads happen to split the stream changes nothing.
        prop_assert_eq!(&chunked, &whole);
        let bytewise = decode_in_chunks(&mut decoder(), &input, &[1])?;
        prop_assert_eq!(&bytewise, &whole);
    }

    #[test]
    fn random_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..512)) {
        let whole = decode_in_chunks(&mut decoder(), &input, &[input.len().max(1)])?;
        let bytewise = decode_in_chunks(&mut decoder(), &input, &[1])?;
        prop_assert_eq!(bytewise, whole);
    }

    #[test]
    fn client_ops_round_trip_however_spelled_and_split(
        ops in prop::collection::vec((client_op(), style()), 1..8),
        chunks in prop::collection::vec(1usize..64, 1..6),
    ) {
        let mut input = Vec::new();
        for (op, style) in &ops {
            encode_styled(op, style, &mut input);
        }
        let mut decoder = ClientOpDecoder::new(DEFAULT_MAX_PAYLOAD);
        let outcome = decode_in_chunks(&mut decoder, &input, &chunks)?;
        let expected: Vec<ClientOp> = ops.into_iter().map(|(op, _)| op).collect();
        prop_assert_eq!(outcome, Outcome { ops: expected, error: None });
    }

    #[test]
    fn encode_client_op_round_trips(ops in prop::collection::vec(client_op(), 1..8)) {
        let mut buffer = BytesMut::new();
        for op in &ops {
            encode_client_op(op, &mut buffer);
        }
        let mut decoder = ClientOpDecoder::new(DEFAULT_MAX_PAYLOAD);
        let mut decoded = Vec::new();
        while let Some(op) = decoder.decode(&mut buffer).map_err(|e| TestCaseError::fail(e.to_string()))? {
            decoded.push(op);
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(decoded, ops);
    }

    #[test]
    fn server_messages_frame_their_headers_and_payload(
        subject in token(),
        sid in token(),
        reply in prop::option::of(token()),
        headers in headers(),
        payload in payload(64),
    ) {
        let mut out = BytesMut::new();
        encode_msg(&subject, &sid, reply.as_deref(), &headers, &payload, &mut out);
        let newline = out.iter().position(|&b| b == b'\n').expect("a control line");
        prop_assert_eq!(out[newline - 1], b'\r');
        let line = std::str::from_utf8(&out[..newline - 1]).expect("UTF-8 control line");
        let fields: Vec<&str> = line.split(' ').collect();
        let body = &out[newline + 1..];
        prop_assert!(body.ends_with(b"\r\n"));
        let body = &body[..body.len() - 2];
        let with_reply = usize::from(reply.is_some());
        prop_assert_eq!(fields[1], subject.as_str());
        prop_assert_eq!(fields[2], sid.as_str());
        if let Some(reply) = &reply {
            prop_assert_eq!(fields[3], reply.as_str());
        }
        if headers.is_empty() {
            prop_assert_eq!(fields[0], "MSG");
            prop_assert_eq!(fields.len(), 4 + with_reply);
            prop_assert_eq!(fields[3 + with_reply].parse::<usize>().ok(), Some(payload.len()));
            prop_assert_eq!(body, &payload[..]);
        } else {
            prop_assert_eq!(fields[0], "HMSG");
            prop_assert_eq!(fields.len(), 5 + with_reply);
            let header_len: usize = fields[3 + with_reply].parse().expect("header size");
            let total: usize = fields[4 + with_reply].parse().expect("total size");
            prop_assert_eq!(total, body.len());
            let block = decode_header_block(Bytes::copy_from_slice(&body[..header_len]))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(block.headers, headers);
            prop_assert_eq!(block.status, None);
            prop_assert_eq!(&body[header_len..], &payload[..]);
        }
    }

    #[test]
    fn server_messages_decode_back_however_split(
        messages in prop::collection::vec(
            (token(), 1u64..100_000, prop::option::of(token()), headers(), payload(64)),
            1..6,
        ),
        cuts in prop::collection::vec(1usize..40, 0..12),
    ) {
        let mut out = BytesMut::new();
        for (subject, sid, reply, headers, payload) in &messages {
            encode_msg(subject, &sid.to_string(), reply.as_deref(), headers, payload, &mut out);
        }
        let mut decoder = ServerOpDecoder::default();
        let mut buffer = BytesMut::new();
        let mut decoded = Vec::new();
        let mut rest = &out[..];
        for cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
            let (chunk, tail) = rest.split_at((*cut).min(rest.len()));
            rest = tail;
            buffer.extend_from_slice(chunk);
            while let Some(op) = decoder
                .decode(&mut buffer)
                .map_err(|e| TestCaseError::fail(e.to_string()))?
            {
                decoded.push(op);
            }
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(decoded.len(), messages.len());
        for (op, (subject, sid, reply, headers, payload)) in decoded.iter().zip(&messages) {
            let ServerOp::Msg { sid: got_sid, subject: got_subject, reply: got_reply, headers: got_headers, payload: got_payload } = op else {
                return Err(TestCaseError::fail(format!("{op:?}")));
            };
            prop_assert_eq!(got_sid, sid);
            prop_assert_eq!(got_subject, subject);
            prop_assert_eq!(got_reply, reply);
            let got = got_headers.as_ref().map(|block| block.headers.clone()).unwrap_or_default();
            prop_assert_eq!(&got, headers);
            prop_assert_eq!(got_payload, payload);
        }
    }

    #[test]
    fn random_bytes_never_panic_the_server_op_decoder(
        input in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut decoder = ServerOpDecoder::new(64);
        let mut buffer = BytesMut::from(&input[..]);
        for _ in 0..input.len() + 1 {
            match decoder.decode(&mut buffer) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn status_messages_decode_as_status(
        status in 100u16..1000,
        description in prop::option::of("[A-Za-z][A-Za-z ]{0,10}[A-Za-z]"),
    ) {
        let mut out = BytesMut::new();
        encode_status_msg("_INBOX.x", "1", status, description.as_deref(), &mut out);
        let newline = out.iter().position(|&b| b == b'\n').expect("a control line");
        let line = std::str::from_utf8(&out[..newline - 1]).expect("UTF-8");
        let fields: Vec<&str> = line.split(' ').collect();
        prop_assert_eq!(fields.len(), 5);
        prop_assert_eq!(fields[3], fields[4]);
        let block = &out[newline + 1..out.len() - 2];
        prop_assert_eq!(fields[3].parse::<usize>().ok(), Some(block.len()));
        let block = decode_header_block(Bytes::copy_from_slice(block))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(block.status, Some(status));
        prop_assert_eq!(block.description.as_deref(), description.as_deref());
        prop_assert!(block.headers.is_empty());
    }
}
