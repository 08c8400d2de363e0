//! The `holdfast` binary against the scripted fake relay: exit codes, output
//! formats and the summary line.

mod support;

use holdfast_wire::{
    AckOutcome, ErrorCode, Frame, Pong, PubAck, Response, ResponseOutcome, StatusResponse, Text,
};
use std::process::{Output, Stdio};
use support::{within, FakeRelay};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

fn holdfast(relay_url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    command
        .args(args)
        .env("HOLDFAST_URL", relay_url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn finish(child: Child) -> Output {
    within("the CLI to exit", child.wait_with_output())
        .await
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn pub_with_ack_reads_stdin_lines_and_summarises_outcomes() {
    let relay = FakeRelay::start();
    let mut command = holdfast(
        &relay.url().to_string(),
        &[
            "pub", "jobs.in", "--ack", "--class", "prefill", "--header", "k: v",
        ],
    );
    command.stdin(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"one\ntwo\r\nthree\n").await.unwrap();
    drop(stdin);

    let (mut connection, hello) = relay.accept_session(1).await;
    assert_eq!(hello.client_name, "holdfast-cli");
    let outcomes = [
        AckOutcome::Forwarded,
        AckOutcome::Journaled,
        AckOutcome::Rejected {
            code: ErrorCode::NatsUnavailable,
            message: Text::from("nats down"),
        },
    ];
    for (expected, outcome) in ["one", "two", "three"].into_iter().zip(outcomes) {
        let publish = connection.recv_publish().await;
        assert_eq!(publish.payload, expected);
        assert_eq!(publish.class.as_deref(), Some("prefill"));
        assert_eq!(publish.headers.get("k").map(|v| v.as_str()), Some("v"));
        connection
            .send(Frame::PubAck(PubAck {
                ack_id: publish.ack_id,
                outcome,
                local_deliveries: 0,
            }))
            .await;
    }
    let closing = tokio::spawn(async move {
        // Answer the close-time flush until the CLI hangs up.
        while let Some(Ok(frame)) = futures::StreamExt::next(&mut connection.framed).await {
            if let Frame::Ping(ping) = frame {
                connection
                    .send(Frame::Pong(Pong { nonce: ping.nonce }))
                    .await;
            }
        }
    });
    let output = finish(child).await;
    closing.abort();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(
            "published 3 messages: 1 forwarded, 1 journaled, 0 queued, 1 failed (nats_unavailable, retryable)"
        ),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn req_prints_the_reply_or_a_typed_error() {
    let relay = FakeRelay::start();
    let url = relay.url().to_string();

    let child = holdfast(&url, &["req", "svc.echo", "ping", "--timeout", "750ms"])
        .spawn()
        .unwrap();
    let (mut connection, _) = relay.accept_session(1).await;
    let request = match connection.recv_answering_pings().await {
        Frame::Request(request) => request,
        other => panic!("expected REQUEST, got {other:?}"),
    };
    assert_eq!(request.timeout_ms, 750);
    connection
        .send(Frame::Response(Response {
            request_id: request.request_id,
            outcome: ResponseOutcome::Reply {
                headers: Default::default(),
                payload: bytes::Bytes::from_static(b"pong"),
            },
        }))
        .await;
    let answering = tokio::spawn(async move { while connection.framed_next_answering().await {} });
    let output = finish(child).await;
    answering.abort();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(output.stdout, b"pong\n");

    let child = holdfast(&url, &["req", "svc.none", "ping"])
        .spawn()
        .unwrap();
    let (mut connection, _) = relay.accept_session(2).await;
    let request = match connection.recv_answering_pings().await {
        Frame::Request(request) => request,
        other => panic!("expected REQUEST, got {other:?}"),
    };
    connection
        .send(Frame::Response(Response {
            request_id: request.request_id,
            outcome: ResponseOutcome::Failed {
                code: ErrorCode::NoResponders,
                message: Text::from("no responders on svc.none"),
            },
        }))
        .await;
    let answering = tokio::spawn(async move { while connection.framed_next_answering().await {} });
    let output = finish(child).await;
    answering.abort();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output).trim_end(),
        "error: no_responders (retryable): no responders on svc.none"
    );
}

#[tokio::test]
async fn status_prints_a_summary_or_json() {
    let relay = FakeRelay::start();
    let url = relay.url().to_string();
    for (args, expected) in [
        (vec!["status"], "relay_id: r-1\nsessions: 2\n"),
        (
            vec!["status", "--json"],
            "{\n  \"relay_id\": \"r-1\",\n  \"sessions\": 2\n}\n",
        ),
    ] {
        let child = holdfast(&url, &args).spawn().unwrap();
        let (mut connection, _) = relay.accept_session(1).await;
        let request_id = match connection.recv_answering_pings().await {
            Frame::StatusRequest(request) => request.request_id,
            other => panic!("expected STATUS_REQUEST, got {other:?}"),
        };
        connection
            .send(Frame::StatusResponse(StatusResponse {
                request_id,
                json: bytes::Bytes::from_static(br#"{"relay_id":"r-1","sessions":2}"#),
            }))
            .await;
        let answering =
            tokio::spawn(async move { while connection.framed_next_answering().await {} });
        let output = finish(child).await;
        answering.abort();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
    }
}

#[tokio::test]
async fn an_unreachable_relay_and_bad_usage_have_distinct_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("absent.sock").display());
    let output = finish(holdfast(&url, &["pub", "a.b", "x"]).spawn().unwrap()).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("error: relay_unavailable (retryable): cannot connect"),
        "{}",
        stderr(&output)
    );

    let output = finish(holdfast(&url, &["pub"]).spawn().unwrap()).await;
    assert_eq!(output.status.code(), Some(2));
    let output = finish(
        holdfast(&url, &["req", "a.b", "x", "--timeout", "soon"])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test]
async fn sub_prints_one_payload_per_line_and_stops_after_count() {
    let relay = FakeRelay::start();
    let child = holdfast(
        &relay.url().to_string(),
        &["sub", "events.>", "--queue", "printers", "--count", "2"],
    )
    .spawn()
    .unwrap();
    let (mut connection, _) = relay.accept_session(1).await;
    let subscribe = connection.accept_subscribe().await;
    assert_eq!(subscribe.subject, "events.>");
    assert_eq!(subscribe.queue_group.as_deref(), Some("printers"));
    for payload in ["first", "second", "third"] {
        connection
            .send(Frame::Message(holdfast_wire::Message {
                sid: subscribe.sid,
                subject: Text::from("events.x"),
                reply: None,
                headers: Default::default(),
                payload: bytes::Bytes::from_static(payload.as_bytes()),
            }))
            .await;
    }
    let answering = tokio::spawn(async move { while connection.framed_next_answering().await {} });
    let output = finish(child).await;
    answering.abort();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(output.stdout, b"first\nsecond\n");
}
