//! Unit tests of `ClientOpDecoder`: every op, every way of splitting it, and
//! every error.

use super::*;
use crate::{Headers, Text};
use bytes::{Bytes, BytesMut};

const MAX: usize = 1024;

fn decoder() -> ClientOpDecoder {
    ClientOpDecoder::new(MAX)
}

/// Decodes everything in `input` at once; the buffer must end up empty.
fn decode_all(input: &[u8]) -> Result<Vec<ClientOp>, NatsProtocolError> {
    let mut decoder = decoder();
    let mut buffer = BytesMut::from(input);
    let mut ops = Vec::new();
    while let Some(op) = decoder.decode(&mut buffer)? {
        ops.push(op);
    }
    assert!(buffer.is_empty(), "left over: {:?}", &buffer[..]);
    Ok(ops)
}

fn decode_one(input: &[u8]) -> Result<ClientOp, NatsProtocolError> {
    let mut ops = decode_all(input)?;
    assert_eq!(ops.len(), 1, "{ops:?}");
    Ok(ops.remove(0))
}

fn decode_err(input: &[u8]) -> NatsProtocolError {
    let mut decoder = decoder();
    let mut buffer = BytesMut::from(input);
    loop {
        match decoder.decode(&mut buffer) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!(
                "{:?} needs more bytes instead of failing",
                String::from_utf8_lossy(input)
            ),
            Err(error) => return error,
        }
    }
}

/// Feeds `input` one byte at a time.
fn decode_bytewise(input: &[u8]) -> Result<Vec<ClientOp>, NatsProtocolError> {
    let mut decoder = decoder();
    let mut buffer = BytesMut::new();
    let mut ops = Vec::new();
    for &byte in input {
        buffer.extend_from_slice(&[byte]);
        while let Some(op) = decoder.decode(&mut buffer)? {
            ops.push(op);
        }
    }
    assert!(buffer.is_empty());
    Ok(ops)
}

fn publish(subject: &str, reply: Option<&str>, payload: &'static [u8]) -> ClientOp {
    ClientOp::Pub {
        subject: subject.into(),
        reply: reply.map(Text::from),
        payload: Bytes::from_static(payload),
    }
}

fn headers(pairs: &[(&str, &str)]) -> Headers {
    let mut headers = Headers::new();
    for (name, value) in pairs {
        headers.insert(*name, *value);
    }
    headers
}

fn sub(subject: &str, queue: Option<&str>, sid: &str) -> ClientOp {
    ClientOp::Sub {
        subject: subject.into(),
        queue_group: queue.map(Text::from),
        sid: sid.into(),
    }
}

fn unsub(sid: &str, max_msgs: Option<u64>) -> ClientOp {
    ClientOp::Unsub {
        sid: sid.into(),
        max_msgs,
    }
}

// ---- every op -------------------------------------------------------------

#[test]
fn pub_without_and_with_reply() {
    assert_eq!(
        decode_one(b"PUB FOO 11\r\nHello NATS!\r\n"),
        Ok(publish("FOO", None, b"Hello NATS!"))
    );
    assert_eq!(
        decode_one(b"PUB FRONT.DOOR JOKE.22 11\r\nKnock Knock\r\n"),
        Ok(publish("FRONT.DOOR", Some("JOKE.22"), b"Knock Knock"))
    );
}

#[test]
fn pub_empty_and_binary_payloads() {
    assert_eq!(
        decode_one(b"PUB NOTIFY 0\r\n\r\n"),
        Ok(publish("NOTIFY", None, b""))
    );
    // CRLF and NUL inside a payload are data; only the size counts.
    assert_eq!(
        decode_one(b"PUB b 6\r\n\r\n\0PUB\r\n"),
        Ok(publish("b", None, b"\r\n\0PUB"))
    );
}

#[test]
fn hpub_with_multiple_and_duplicate_headers() {
    let input = b"HPUB FOO 52 63\r\nNATS/1.0\r\nFoodGroup: vegetable\r\nFoodGroup: fruit\r\n\r\nHello World\r\n";
    assert_eq!(
        decode_one(input),
        Ok(ClientOp::HPub {
            subject: "FOO".into(),
            reply: None,
            headers: headers(&[("FoodGroup", "vegetable"), ("FoodGroup", "fruit")]),
            payload: Bytes::from_static(b"Hello World"),
        })
    );
}

#[test]
fn hpub_with_reply_and_no_payload() {
    let input = b"HPUB FRONT.DOOR JOKE.22 45 45\r\nNATS/1.0\r\nBREAKFAST: donut\r\nLUNCH: burger\r\n\r\n\r\n";
    assert_eq!(
        decode_one(input),
        Ok(ClientOp::HPub {
            subject: "FRONT.DOOR".into(),
            reply: Some("JOKE.22".into()),
            headers: headers(&[("BREAKFAST", "donut"), ("LUNCH", "burger")]),
            payload: Bytes::new(),
        })
    );
}

#[test]
fn hpub_status_is_dropped_and_empty_blocks_mean_no_headers() {
    let expected = ClientOp::HPub {
        subject: "s".into(),
        reply: None,
        headers: Headers::new(),
        payload: Bytes::from_static(b"x"),
    };
    assert_eq!(
        decode_one(b"HPUB s 16 17\r\nNATS/1.0 503\r\n\r\nx\r\n"),
        Ok(expected.clone())
    );
    assert_eq!(
        decode_one(b"HPUB s 12 13\r\nNATS/1.0\r\n\r\nx\r\n"),
        Ok(expected.clone())
    );
    assert_eq!(decode_one(b"HPUB s 0 1\r\nx\r\n"), Ok(expected));
}

#[test]
fn sub_with_and_without_queue_group() {
    assert_eq!(decode_one(b"SUB FOO 1\r\n"), Ok(sub("FOO", None, "1")));
    assert_eq!(
        decode_one(b"SUB BAR G1 44\r\n"),
        Ok(sub("BAR", Some("G1"), "44"))
    );
    assert_eq!(
        decode_one(b"SUB foo.* sid-x\r\n"),
        Ok(sub("foo.*", None, "sid-x"))
    );
}

#[test]
fn unsub_with_and_without_max() {
    assert_eq!(decode_one(b"UNSUB 1\r\n"), Ok(unsub("1", None)));
    assert_eq!(decode_one(b"UNSUB 1 5\r\n"), Ok(unsub("1", Some(5))));
    assert_eq!(decode_one(b"UNSUB 1 0\r\n"), Ok(unsub("1", Some(0))));
    assert_eq!(
        decode_one(b"UNSUB 1 18446744073709551615\r\n"),
        Ok(unsub("1", Some(u64::MAX)))
    );
}

#[test]
fn ping_and_pong() {
    assert_eq!(decode_one(b"PING\r\n"), Ok(ClientOp::Ping));
    assert_eq!(decode_one(b"PONG\r\n"), Ok(ClientOp::Pong));
    assert_eq!(decode_one(b"PING \t \r\n"), Ok(ClientOp::Ping));
}

#[test]
fn connect_with_unknown_fields_and_defaults() {
    let op = decode_one(
        br#"CONNECT {"verbose":false,"pedantic":false,"tls_required":false,"name":"","lang":"go","version":"1.2.2","protocol":1,"echo":false,"headers":true,"no_responders":true,"future":[1]}"#
            .iter()
            .chain(b"\r\n")
            .copied()
            .collect::<Vec<u8>>()
            .as_slice(),
    );
    assert_eq!(
        op,
        Ok(ClientOp::Connect(Connect {
            verbose: false,
            pedantic: false,
            echo: false,
            headers: true,
            no_responders: true,
            name: None,
            lang: Some("go".into()),
            version: Some("1.2.2".into()),
            protocol: 1,
            user: None,
            pass: None,
            auth_token: None,
        }))
    );
    assert_eq!(
        decode_one(b"CONNECT {}\r\n"),
        Ok(ClientOp::Connect(Connect::default()))
    );
    // Blanks inside and around the JSON are the JSON's business.
    assert_eq!(
        decode_one(b"CONNECT \t { \"no_echo\" : true ,\t\"user\": \"a b\" } \t\r\n"),
        Ok(ClientOp::Connect(Connect {
            echo: false,
            user: Some("a b".into()),
            ..Connect::default()
        }))
    );
}

// ---- framing ----------------------------------------------------------------

const STREAM: &[u8] = b"CONNECT {\"verbose\":false,\"headers\":true}\r\n\
    SUB foo 1\r\n\
    SUB bar q 2\r\n\
    PUB foo 5\r\nhello\r\n\
    PUB foo r.1 0\r\n\r\n\
    HPUB bar 24 26\r\nNATS/1.0\r\nA: 1\r\nA: 2\r\n\r\nhi\r\n\
    UNSUB 1 10\r\n\
    UNSUB 2\r\n\
    PING\r\n\
    PONG\r\n";

fn stream_ops() -> Vec<ClientOp> {
    vec![
        ClientOp::Connect(Connect {
            verbose: false,
            headers: true,
            ..Connect::default()
        }),
        sub("foo", None, "1"),
        sub("bar", Some("q"), "2"),
        publish("foo", None, b"hello"),
        publish("foo", Some("r.1"), b""),
        ClientOp::HPub {
            subject: "bar".into(),
            reply: None,
            headers: headers(&[("A", "1"), ("A", "2")]),
            payload: Bytes::from_static(b"hi"),
        },
        unsub("1", Some(10)),
        unsub("2", None),
        ClientOp::Ping,
        ClientOp::Pong,
    ]
}

#[test]
fn several_ops_in_one_buffer() {
    assert_eq!(decode_all(STREAM), Ok(stream_ops()));
}

#[test]
fn one_byte_at_a_time() {
    assert_eq!(decode_bytewise(STREAM), Ok(stream_ops()));
}

#[test]
fn every_split_point() {
    for split in 0..=STREAM.len() {
        let mut decoder = decoder();
        let mut buffer = BytesMut::from(&STREAM[..split]);
        let mut ops = Vec::new();
        while let Some(op) = decoder.decode(&mut buffer).unwrap() {
            ops.push(op);
        }
        buffer.extend_from_slice(&STREAM[split..]);
        while let Some(op) = decoder.decode(&mut buffer).unwrap() {
            ops.push(op);
        }
        assert_eq!(ops, stream_ops(), "split at {split}");
        assert!(buffer.is_empty());
    }
}

#[test]
fn strict_prefixes_need_more_bytes() {
    let input = b"HPUB bar 24 26\r\nNATS/1.0\r\nA: 1\r\nA: 2\r\n\r\nhi\r\n";
    for end in 0..input.len() {
        let mut buffer = BytesMut::from(&input[..end]);
        assert_eq!(decoder().decode(&mut buffer), Ok(None), "prefix of {end}");
    }
}

#[test]
fn op_names_are_case_insensitive() {
    let input =
        b"connect {}\r\npub a 1\r\nx\r\nPub a 1\r\ny\r\nhPuB a 12 12\r\nNATS/1.0\r\n\r\n\r\n\
        sub a 1\r\nSuB a 2\r\nunsub 1\r\nUnSub 2\r\nping\r\npInG\r\npong\r\nPoNg\r\n";
    let ops = decode_all(input).unwrap();
    assert_eq!(ops.len(), 12);
    assert_eq!(ops[1], publish("a", None, b"x"));
    assert_eq!(ops[2], publish("a", None, b"y"));
    assert!(matches!(ops[3], ClientOp::HPub { .. }));
    assert_eq!(ops[4], sub("a", None, "1"));
    assert_eq!(ops[7], unsub("2", None));
    assert_eq!(
        &ops[8..],
        &[
            ClientOp::Ping,
            ClientOp::Ping,
            ClientOp::Pong,
            ClientOp::Pong
        ]
    );
}

#[test]
fn tabs_and_runs_of_blanks_separate_arguments() {
    assert_eq!(
        decode_one(b"PUB\tfoo \t  reply\t\t3 \t\r\nabc\r\n"),
        Ok(publish("foo", Some("reply"), b"abc"))
    );
    assert_eq!(
        decode_one(b"SUB\t\tfoo\tq\t9\r\n"),
        Ok(sub("foo", Some("q"), "9"))
    );
    assert_eq!(decode_one(b"UNSUB  9   3  \r\n"), Ok(unsub("9", Some(3))));
    assert_eq!(
        decode_one(b"HPUB\ts\t12\t12\r\nNATS/1.0\r\n\r\n\r\n"),
        Ok(ClientOp::HPub {
            subject: "s".into(),
            reply: None,
            headers: Headers::new(),
            payload: Bytes::new(),
        })
    );
}

#[test]
fn bare_lf_ends_control_lines() {
    assert_eq!(
        decode_all(b"PING\nSUB a 1\nPUB a 2\nhi\r\n"),
        Ok(vec![
            ClientOp::Ping,
            sub("a", None, "1"),
            publish("a", None, b"hi")
        ])
    );
}

#[test]
fn utf8_subjects_and_sids() {
    assert_eq!(
        decode_one("SUB ñ.漢.🦀 q-é sid-ü\r\n".as_bytes()),
        Ok(sub("ñ.漢.🦀", Some("q-é"), "sid-ü"))
    );
}

#[test]
fn payload_is_a_slice_of_the_buffer() {
    let mut buffer = BytesMut::from(&b"PUB a 5\r\nhello\r\n"[..]);
    let base = buffer.as_ptr() as usize;
    let Some(ClientOp::Pub {
        subject, payload, ..
    }) = decoder().decode(&mut buffer).unwrap()
    else {
        panic!("expected PUB");
    };
    assert_eq!(payload.as_ptr() as usize, base + 9);
    assert_eq!(subject.as_ptr() as usize, base + 4);
}

#[test]
fn awaiting_a_payload_reserves_room_for_it() {
    let mut decoder = decoder();
    let mut buffer = BytesMut::from(&b"PUB a 1000\r\n"[..]);
    assert_eq!(decoder.decode(&mut buffer), Ok(None));
    assert!(buffer.is_empty(), "the control line is consumed");
    assert!(buffer.capacity() >= 1002);
    buffer.extend_from_slice(&[b'x'; 1000]);
    buffer.extend_from_slice(b"\r\nPING\r\n");
    assert!(
        matches!(decoder.decode(&mut buffer), Ok(Some(ClientOp::Pub { payload, .. })) if payload.len() == 1000)
    );
    assert_eq!(decoder.decode(&mut buffer), Ok(Some(ClientOp::Ping)));
}

#[test]
fn payload_of_exactly_max_is_accepted() {
    let mut input = b"PUB a 1024\r\n".to_vec();
    input.extend_from_slice(&[7; MAX]);
    input.extend_from_slice(b"\r\n");
    assert!(
        matches!(decode_one(&input), Ok(ClientOp::Pub { payload, .. }) if payload.len() == MAX)
    );
}

#[test]
fn control_line_of_exactly_max_is_accepted() {
    let mut decoder = ClientOpDecoder::new(MAX).with_max_control_line(16);
    // "SUB aaaaaaa 123" + padding = 16 bytes before the line end.
    for line in [&b"SUB aaaaaaaa 123\r\n"[..], b"SUB aaaaaaaa 123\n"] {
        let mut buffer = BytesMut::from(line);
        assert_eq!(
            decoder.decode(&mut buffer),
            Ok(Some(sub("aaaaaaaa", None, "123")))
        );
    }
    // Byte by byte, the decoder never gives up early.
    let mut buffer = BytesMut::new();
    for &byte in b"SUB aaaaaaaa 123\r" {
        buffer.extend_from_slice(&[byte]);
        assert_eq!(decoder.decode(&mut buffer), Ok(None));
    }
    buffer.extend_from_slice(b"\n");
    assert_eq!(
        decoder.decode(&mut buffer),
        Ok(Some(sub("aaaaaaaa", None, "123")))
    );
}

#[test]
fn the_tokio_decoder_is_the_same_decoder() {
    use tokio_util::codec::Decoder;
    let mut decoder = decoder();
    let mut buffer = BytesMut::from(&b"PING\r\nFOO\r\n"[..]);
    assert!(matches!(
        Decoder::decode(&mut decoder, &mut buffer),
        Ok(Some(ClientOp::Ping))
    ));
    assert!(matches!(
        Decoder::decode(&mut decoder, &mut buffer),
        Err(NatsCodecError::Protocol(
            NatsProtocolError::UnknownOperation { .. }
        ))
    ));
}

// ---- errors -------------------------------------------------------------------

#[test]
fn unknown_operations() {
    for input in [
        &b"FOO\r\n"[..],
        b"\r\n",
        b"\n",
        b" PING\r\n",
        b"\tSUB a 1\r\n",
        b"PUBX a 1\r\n",
        b"PINGPONG\r\n",
        b"MSG a 1 1\r\nx\r\n",
        b"HMSG a 1 12 12\r\n",
        b"INFO {}\r\n",
        b"+OK\r\n",
        b"-ERR 'x'\r\n",
        b"CONNECT{}\r\n",
        b"\xff\xfe\r\n",
    ] {
        let error = decode_err(input);
        assert!(
            matches!(error, NatsProtocolError::UnknownOperation { .. }),
            "{:?}: {error:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(error.err_message(), "Unknown Protocol Operation");
    }
    assert_eq!(
        decode_err(b"FOO bar\r\n"),
        NatsProtocolError::UnknownOperation { op: "FOO".into() }
    );
}

#[test]
fn unknown_operation_names_are_truncated() {
    let mut input = vec![b'Z'; 1000];
    input.extend_from_slice(b"\r\n");
    let NatsProtocolError::UnknownOperation { op } = decode_err(&input) else {
        panic!("expected UnknownOperation");
    };
    assert_eq!(op.len(), 16);
}

#[test]
fn control_line_too_long_without_line_end() {
    let mut decoder = ClientOpDecoder::new(MAX).with_max_control_line(16);
    let mut buffer = BytesMut::new();
    // 17 bytes could still be 16 + '\r'.
    buffer.extend_from_slice(&[b'a'; 17]);
    assert_eq!(decoder.decode(&mut buffer), Ok(None));
    buffer.extend_from_slice(b"a");
    assert_eq!(
        decoder.decode(&mut buffer),
        Err(NatsProtocolError::ControlLineTooLong { max: 16 })
    );
}

#[test]
fn control_line_too_long_with_line_end() {
    let mut decoder = ClientOpDecoder::new(MAX).with_max_control_line(16);
    for line in [
        &b"SUB aaaaaaaaa 123\r\n"[..],
        b"SUB aaaaaaaaa 123\n",
        b"aaaaaaaaaaaaaaaaa\r\n",
    ] {
        assert_eq!(
            decoder.decode(&mut BytesMut::from(line)),
            Err(NatsProtocolError::ControlLineTooLong { max: 16 })
        );
    }
}

#[test]
fn default_control_line_limit_is_4096() {
    assert_eq!(decoder().max_control_line(), DEFAULT_MAX_CONTROL_LINE);
    assert_eq!(DEFAULT_MAX_CONTROL_LINE, 4096);
    let mut line = b"PUB ".to_vec();
    line.extend_from_slice(&[b'a'; 4090]);
    line.extend_from_slice(b" 0\r\n\r\n");
    assert!(
        matches!(decode_one(&line), Ok(ClientOp::Pub { .. })),
        "4096 bytes fit"
    );
    let mut line = b"PUB ".to_vec();
    line.extend_from_slice(&[b'a'; 4091]);
    line.extend_from_slice(b" 0\r\n\r\n");
    assert!(matches!(
        decode_err(&line),
        NatsProtocolError::ControlLineTooLong { max: 4096 }
    ));
    // A newline-free flood is refused once it passes the limit, whatever it is.
    let error = decode_err(&[b'P'; 5000]);
    assert_eq!(error, NatsProtocolError::ControlLineTooLong { max: 4096 });
    assert_eq!(error.err_message(), "maximum control line exceeded");
}

#[test]
fn long_connect_counts_against_the_limit() {
    let mut line = b"CONNECT {\"name\":\"".to_vec();
    line.extend_from_slice(&[b'n'; 5000]);
    line.extend_from_slice(b"\"}\r\n");
    assert!(matches!(
        decode_err(&line),
        NatsProtocolError::ControlLineTooLong { .. }
    ));
}

#[test]
fn max_payload_is_checked_before_buffering() {
    for input in [
        &b"PUB a 1025\r\n"[..],
        b"PUB a r 99999999\r\n",
        b"HPUB a 12 1025\r\n",
        b"HPUB a r 12 18446744073709551615\r\n",
    ] {
        let mut buffer = BytesMut::with_capacity(64);
        buffer.extend_from_slice(input);
        let error = decoder().decode(&mut buffer).unwrap_err();
        assert!(
            matches!(error, NatsProtocolError::MaxPayloadExceeded { max: MAX, size } if size > MAX),
            "{error:?}"
        );
        assert_eq!(error.err_message(), "Maximum Payload Violation");
        assert!(buffer.capacity() <= 64, "nothing reserved for the payload");
    }
}

#[test]
fn invalid_arguments() {
    let cases: &[(&[u8], &str)] = &[
        (b"PUB\r\n", "PUB"),
        (b"PUB a\r\n", "PUB"),
        (b"PUB a b c 1\r\n", "PUB"),
        (b"PUB a x\r\n", "PUB"),
        (b"PUB a -1\r\n", "PUB"),
        (b"PUB a +1\r\n", "PUB"),
        (b"PUB a 1.0\r\n", "PUB"),
        (b"PUB a 0x10\r\n", "PUB"),
        (b"PUB a 99999999999999999999999\r\n", "PUB"),
        (b"HPUB a 12\r\n", "HPUB"),
        (b"HPUB a r x 12 12\r\n", "HPUB"),
        (b"HPUB a 13 12\r\n", "HPUB"),
        (b"HPUB a x 12\r\n", "HPUB"),
        (b"HPUB a 12 y\r\n", "HPUB"),
        (b"SUB\r\n", "SUB"),
        (b"SUB a\r\n", "SUB"),
        (b"SUB a q 1 x\r\n", "SUB"),
        (b"UNSUB\r\n", "UNSUB"),
        (b"UNSUB 1 2 3\r\n", "UNSUB"),
        (b"UNSUB 1 x\r\n", "UNSUB"),
        (b"UNSUB 1 -5\r\n", "UNSUB"),
        (b"UNSUB 1 99999999999999999999\r\n", "UNSUB"),
        (b"PING x\r\n", "PING"),
        (b"PONG 1\r\n", "PONG"),
        (b"SUB a\x0bb 1\r\n", "SUB"),
        (b"SUB a 1\r2\r\n", "SUB"),
        ("PUB a\u{a0}b 0\r\n\r\n".as_bytes(), "PUB"),
        (b"PUB a r\x0c 0\r\n\r\n", "PUB"),
    ];
    for &(input, expected_op) in cases {
        let error = decode_err(input);
        assert!(
            matches!(error, NatsProtocolError::InvalidArguments { op, .. } if op == expected_op),
            "{:?}: {error:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(error.err_message(), "Parser Error");
    }
}

#[test]
fn invalid_connect() {
    for input in [
        &b"CONNECT\r\n"[..],
        b"CONNECT   \r\n",
        b"CONNECT {\r\n",
        b"CONNECT [true]\r\n",
        b"CONNECT {\"verbose\":1}\r\n",
        b"CONNECT {} {}\r\n",
    ] {
        let error = decode_err(input);
        assert!(
            matches!(error, NatsProtocolError::InvalidConnect(_)),
            "{:?}: {error:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(error.err_message(), "Parser Error");
    }
    let error = decode_err(b"CONNECT {\"protocol\":2}\r\n");
    assert_eq!(error, NatsProtocolError::InvalidClientProtocol(2));
    assert_eq!(error.err_message(), "invalid client protocol");
    let error = decode_err(b"CONNECT {\"no_responders\":true}\r\n");
    assert_eq!(error, NatsProtocolError::NoRespondersRequiresHeaders);
    assert_eq!(
        error.err_message(),
        "no responders requires headers support"
    );
}

#[test]
fn invalid_headers() {
    for input in [
        &b"HPUB a 5 5\r\nNATS/\r\n"[..],
        b"HPUB a 12 12\r\nNATS/2.0\r\n\r\n\r\n",
        b"HPUB a 10 10\r\nNATS/1.0\r\n\r\n",
        b"HPUB a 17 17\r\nNATS/1.0\r\nA 1\r\n\r\n\r\n",
        b"HPUB a 18 18\r\nNATS/1.0\r\nA: \xff\r\n\r\n\r\n",
        // The header size cuts the block short: the rest would be payload.
        b"HPUB a 12 18\r\nNATS/1.0\r\nA: 1\r\n\r\n\r\n",
    ] {
        let error = decode_err(input);
        assert!(
            matches!(error, NatsProtocolError::InvalidHeaders(_)),
            "{:?}: {error:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(error.err_message(), "Parser Error");
    }
}

#[test]
fn missing_payload_terminator() {
    for input in [
        &b"PUB a 2\r\nabc\r\n"[..],
        b"PUB a 2\r\nab\n",
        b"PUB a 2\r\nab\rX",
        b"PUB a 2\r\nab\n\r",
        b"PUB a 0\r\nPING\r\n",
        b"HPUB a 12 13\r\nNATS/1.0\r\n\r\nxy\r\n",
    ] {
        let error = decode_err(input);
        assert_eq!(
            error,
            NatsProtocolError::MissingPayloadTerminator,
            "{:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(error.err_message(), "Unknown Protocol Operation");
    }
}

#[test]
fn wrong_terminator_is_reported_as_soon_as_it_arrives() {
    let mut decoder = decoder();
    let mut buffer = BytesMut::from(&b"PUB a 100\r\n"[..]);
    assert_eq!(decoder.decode(&mut buffer), Ok(None));
    buffer.extend_from_slice(&[b'x'; 101]);
    assert_eq!(
        decoder.decode(&mut buffer),
        Err(NatsProtocolError::MissingPayloadTerminator)
    );
}

#[test]
fn not_utf8() {
    let cases: &[(&[u8], &str)] = &[
        (b"PUB \xff 0\r\n\r\n", "subject"),
        (b"PUB a \xc3 0\r\n\r\n", "reply subject"),
        (b"HPUB \xff 12 12\r\nNATS/1.0\r\n\r\n\r\n", "subject"),
        (b"SUB \xe2\x82 1\r\n", "subject"),
        (b"SUB a \xff 1\r\n", "queue group"),
        (b"SUB a \xff\r\n", "sid"),
        (b"UNSUB \xff\r\n", "sid"),
    ];
    for &(input, expected) in cases {
        let error = decode_err(input);
        assert_eq!(
            error,
            NatsProtocolError::NotUtf8 { field: expected },
            "{:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(error.err_message(), "Parser Error");
    }
}

#[test]
fn every_error_closes_the_connection() {
    let errors = [
        NatsProtocolError::UnknownOperation { op: "X".into() },
        NatsProtocolError::ControlLineTooLong { max: 1 },
        NatsProtocolError::MaxPayloadExceeded { size: 2, max: 1 },
        NatsProtocolError::InvalidArguments {
            op: "PUB",
            reason: "r",
        },
        NatsProtocolError::InvalidConnect("x".into()),
        NatsProtocolError::InvalidClientProtocol(2),
        NatsProtocolError::NoRespondersRequiresHeaders,
        NatsProtocolError::InvalidHeaders("x".into()),
        NatsProtocolError::MissingPayloadTerminator,
        NatsProtocolError::NotUtf8 { field: "sid" },
    ];
    for error in errors {
        assert!(error.closes_connection(), "{error:?}");
        // Messages travel inside '...' on one line.
        let message = error.err_message();
        assert!(
            !message.is_empty() && !message.contains(['\'', '\r', '\n']),
            "{message}"
        );
        assert!(!error.to_string().is_empty());
    }
}

#[test]
fn unlimited_max_payload_does_not_reserve_the_declared_size() {
    let mut decoder = ClientOpDecoder::new(usize::MAX);
    let mut buffer = BytesMut::from(&b"PUB a 18446744073709551615\r\n"[..]);
    assert_eq!(decoder.decode(&mut buffer), Ok(None));
    assert!(buffer.capacity() <= 2 * (DEFAULT_MAX_PAYLOAD + 2));
    buffer.extend_from_slice(b"abc");
    assert_eq!(decoder.decode(&mut buffer), Ok(None));
}
