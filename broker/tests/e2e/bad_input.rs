//! Hostile or broken connections get a typed error and are closed; nobody
//! else notices.

use crate::support::{within, Stack};
use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use holdfast_wire::{
    encode, AckOutcome, ErrorCode, Frame, FrameDecoder, Headers, Hello, Ping, Publish, Request,
    ResponseOutcome, Text, PROTOCOL_VERSION,
};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub(crate) fn hello(min_version: u16, max_version: u16) -> Vec<u8> {
    frame_bytes(&Frame::Hello(Hello {
        min_version,
        max_version,
        client_name: Text::from_static("raw-test"),
        instance_id: 0,
    }))
}

pub(crate) fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut buffer = BytesMut::new();
    encode(frame, u32::MAX, &mut buffer).unwrap();
    buffer.to_vec()
}

/// Sends `bytes` (optionally half-closing), then reads frames until the
/// relay closes the connection.
pub(crate) async fn exchange(socket: &Path, chunks: &[&[u8]], half_close: bool) -> Vec<Frame> {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    for chunk in chunks {
        stream.write_all(chunk).await.unwrap();
    }
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut received = BytesMut::new();
    within("relay closes the connection", async {
        loop {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => received.put_slice(&chunk[..read]),
            }
        }
    })
    .await;
    let mut decoder = FrameDecoder::new(u32::MAX);
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = decoder.decode(&mut received) {
        frames.push(frame);
    }
    frames
}

pub(crate) fn go_away_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|frame| match frame {
        Frame::GoAway(go_away) => Some(go_away.code),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_connections_are_closed_with_a_code_and_others_carry_on() {
    let stack = Stack::start();
    let good = stack.client().await;
    let mut subscriber = good.subscribe("steady").await.unwrap();
    let socket = stack.relay.socket().to_path_buf();

    let publish = frame_bytes(&Frame::Publish(Publish {
        ack_id: 1,
        subject: Text::from_static("steady"),
        reply: None,
        class: None,
        headers: Headers::new(),
        payload: vec![7u8; 100].into(),
    }));
    // (what is sent after HELLO, whether the client then stops sending, the code expected)
    let cases: [(&str, Vec<u8>, bool, ErrorCode); 3] = [
        // A small length prefix and an unknown frame type.
        (
            "garbage",
            vec![0, 0, 0, 5, 0xEE, 1, 2, 3, 4],
            false,
            ErrorCode::BadFrame,
        ),
        // A length prefix far beyond the limit; nothing is allocated for it.
        (
            "oversized",
            vec![0x40, 0, 0, 0, 0x10],
            false,
            ErrorCode::FrameTooLarge,
        ),
        // Half a PUBLISH, then the client stops sending.
        (
            "truncated",
            publish[..publish.len() / 2].to_vec(),
            true,
            ErrorCode::BadFrame,
        ),
    ];
    for (name, bytes, half_close, code) in cases {
        let sent = [hello(PROTOCOL_VERSION, PROTOCOL_VERSION), bytes].concat();
        let frames = exchange(&socket, &[&sent], half_close).await;
        assert!(
            matches!(frames.first(), Some(Frame::Welcome(_))),
            "{name}: {frames:?}"
        );
        assert_eq!(go_away_code(&frames), Some(code), "{name}: {frames:?}");
        // The well-behaved client never noticed.
        let payload = format!("still fine after {name}");
        good.publish("steady", payload.clone()).await.unwrap();
        let received = within("good client", subscriber.next()).await.unwrap();
        assert_eq!(received.payload, payload.into_bytes());
    }

    // Garbage before any HELLO.
    let frames = exchange(&socket, &[b"\x00\x00\x00\x03\xff\xff\xff"], false).await;
    assert_eq!(
        go_away_code(&frames),
        Some(ErrorCode::BadFrame),
        "{frames:?}"
    );

    let status = good.status().await.unwrap();
    assert!(
        status["counters"]["frame_errors"].as_u64().unwrap() >= 4,
        "{status}"
    );
    let metrics = crate::support::scrape(&stack.relay);
    let frame_size_refusals = crate::support::metric(
        &metrics,
        "holdfast_limit_rejections_total",
        &[("limit", "frame_size")],
    );
    assert_eq!(
        frame_size_refusals,
        Some(1.0),
        "the oversized frame is counted"
    );
    // The truncated publish never reached anyone.
    let nothing =
        tokio::time::timeout(std::time::Duration::from_millis(200), subscriber.next()).await;
    assert!(nothing.is_err(), "a partial frame was delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_rules_are_enforced() {
    let stack = Stack::start();
    let socket = stack.relay.socket().to_path_buf();

    let ping_first = frame_bytes(&Frame::Ping(Ping { nonce: 1 }));
    let frames = exchange(&socket, &[&ping_first], false).await;
    assert_eq!(
        go_away_code(&frames),
        Some(ErrorCode::ProtocolViolation),
        "{frames:?}"
    );

    let frames = exchange(&socket, &[&hello(7, 9)], false).await;
    assert_eq!(
        go_away_code(&frames),
        Some(ErrorCode::UnsupportedVersion),
        "{frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_refuses_a_live_socket() {
    let stack = Stack::start();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_holdfastd"))
        .arg("--socket")
        .arg(stack.relay.socket())
        .arg("--nats")
        .arg(stack.nats.url())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");
    // The first relay still serves.
    let client = stack.client().await;
    client.flush().await.unwrap();
}

/// Reads frames from `stream` until `done` says the exchange is complete.
async fn read_until(stream: &mut UnixStream, done: impl Fn(&[Frame]) -> bool) -> Vec<Frame> {
    let mut received = BytesMut::new();
    let mut frames = Vec::new();
    let mut decoder = FrameDecoder::new(u32::MAX);
    within("the relay's answers", async {
        while !done(&frames) {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => received.put_slice(&chunk[..read]),
            }
            while let Ok(Some(frame)) = decoder.decode(&mut received) {
                frames.push(frame);
            }
        }
    })
    .await;
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nats_cannot_carry_are_refused_and_the_session_carries_on() {
    let stack = Stack::start();
    let nats = async_nats::connect(stack.nats.url()).await.unwrap();
    let mut upstream = nats.subscribe("steady").await.unwrap();
    crate::support::nats_round_trip(&nats).await;
    let socket = stack.relay.socket().to_path_buf();
    let headers = |name: &str, value: &str| {
        let mut headers = Headers::new();
        headers.insert("Trace-Id", "t-1");
        headers.insert(name, value);
        headers
    };
    let publish = |ack_id, headers: Headers| {
        frame_bytes(&Frame::Publish(Publish {
            ack_id,
            subject: Text::from_static("steady"),
            reply: None,
            class: None,
            headers,
            payload: format!("message {ack_id}").into_bytes().into(),
        }))
    };
    // A value with a line break used to panic inside async-nats's header
    // conversion, taking the session (and the publish before it) down.
    let sent = [
        hello(PROTOCOL_VERSION, PROTOCOL_VERSION),
        publish(1, headers("X-Fine", "yes")),
        publish(2, headers("X-Split", "a\r\nInjected: yes")),
        publish(3, headers("bad name", "x")),
        publish(4, headers("X-Fine", "still")),
        frame_bytes(&Frame::Request(Request {
            request_id: 5,
            timeout_ms: 1000,
            subject: Text::from_static("service.echo"),
            headers: headers("X-Split", "a\nb"),
            payload: bytes::Bytes::from_static(b"ping"),
        })),
        frame_bytes(&Frame::Ping(Ping { nonce: 9 })),
    ]
    .concat();
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    stream.write_all(&sent).await.unwrap();
    let frames = read_until(&mut stream, |frames| {
        frames.iter().any(|frame| matches!(frame, Frame::Pong(_)))
            && frames
                .iter()
                .any(|frame| matches!(frame, Frame::Response(_)))
    })
    .await;

    let acks: Vec<(u64, AckOutcome)> = frames
        .iter()
        .filter_map(|frame| match frame {
            Frame::PubAck(ack) => Some((ack.ack_id, ack.outcome.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 4, "{frames:?}");
    for (ack_id, outcome) in &acks {
        match (ack_id, outcome) {
            (1 | 4, AckOutcome::Forwarded) => {}
            (2, AckOutcome::Rejected { code, message }) => {
                assert_eq!(*code, ErrorCode::ProtocolViolation);
                assert!(
                    message.contains("X-Split") && message.contains("CR or LF"),
                    "{message}"
                );
            }
            (3, AckOutcome::Rejected { code, message }) => {
                assert_eq!(*code, ErrorCode::ProtocolViolation);
                assert!(message.contains("bad name"), "{message}");
            }
            other => panic!("unexpected ack {other:?}"),
        }
    }
    let response = frames.iter().find_map(|frame| match frame {
        Frame::Response(response) => Some(response.clone()),
        _ => None,
    });
    match response.map(|response| (response.request_id, response.outcome)) {
        Some((5, ResponseOutcome::Failed { code, message })) => {
            assert_eq!(code, ErrorCode::ProtocolViolation);
            assert!(message.contains("X-Split"), "{message}");
        }
        other => panic!("expected the request to be refused, got {other:?}"),
    }
    assert!(
        go_away_code(&frames).is_none(),
        "the session stays open: {frames:?}"
    );

    // Exactly the two good publishes reached NATS, in order, headers intact.
    for expected in ["message 1", "message 4"] {
        let message = within("NATS subscriber", upstream.next()).await.unwrap();
        assert_eq!(message.payload, expected.as_bytes());
        let headers = message.headers.expect("headers");
        assert_eq!(headers.get("Trace-Id").map(|v| v.as_str()), Some("t-1"));
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), upstream.next())
            .await
            .is_err(),
        "nothing else reached NATS"
    );
    assert!(
        !stack.relay.logs().contains("panicked"),
        "{}",
        stack.relay.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_nats_takes_is_refused_and_the_rest_flows() {
    // 2 MiB fits the relay's frame (4 MiB) but not nats-server's default
    // max_payload (1 MiB). It used to be retried forever, every retry
    // taken for a lost connection, and the relay's forwarder spun.
    let stack = Stack::start();
    let nats = stack.direct_nats().await;
    let mut subscriber = nats.subscribe("size.>").await.unwrap();
    crate::support::nats_round_trip(&nats).await;
    let client = stack.client().await;
    let huge = holdfast_client::OutboundMessage::new("size.huge", vec![b'x'; 2 * 1024 * 1024]);
    let refused = within("the refusal", client.publish_with_ack(huge).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(holdfast_wire::ErrorCode::LimitExceeded),
        "{refused}"
    );
    assert!(refused.to_string().contains("max_payload"), "{refused}");
    client.publish("size.small", "after").await.unwrap();
    let message = within("the next message", subscriber.next()).await.unwrap();
    assert_eq!(message.subject.as_str(), "size.small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_is_a_protocol_violation_named_as_such() {
    let stack = Stack::start();
    let hello = hello(PROTOCOL_VERSION, PROTOCOL_VERSION);
    let frames = exchange(stack.relay.socket(), &[&hello, &hello], false).await;
    assert!(
        matches!(frames.first(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );
    let go_away = frames.iter().find_map(|frame| match frame {
        Frame::GoAway(go_away) => Some(go_away.clone()),
        _ => None,
    });
    let go_away = go_away.expect("a GO_AWAY");
    assert_eq!(go_away.code, ErrorCode::ProtocolViolation);
    assert!(
        go_away.message.contains("HELLO after WELCOME"),
        "{}",
        go_away.message
    );
}
