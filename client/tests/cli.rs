//! The `holdfast` binary against the scripted fake relay: exit codes, output
//! formats, the summary line, and the long-running verbs' signal handling.

mod support;

use holdfast_wire::{
    AckOutcome, ErrorCode, Frame, Pong, PubAck, Response, ResponseOutcome, StatusResponse, Text,
};
use std::process::{Output, Stdio};
use support::quic_relay::{Pki, QuicRelay, RelayTls};
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
async fn quic_urls_need_tls_files_that_come_in_pairs() {
    let url = "quic://127.0.0.1:4433";
    // An empty variable counts as unset.
    let mut command = holdfast(url, &["status"]);
    command
        .env("HOLDFAST_CA", "")
        .env_remove("HOLDFAST_CERT")
        .env_remove("HOLDFAST_KEY");
    let output = finish(command.spawn().unwrap()).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("error: invalid_tls_config (not retryable): "),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("--ca"), "{}", stderr(&output));

    let mut command = holdfast(url, &["status", "--ca", "/nonexistent/ca.pem"]);
    command
        .env_remove("HOLDFAST_CERT")
        .env_remove("HOLDFAST_KEY");
    let output = finish(command.spawn().unwrap()).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("/nonexistent/ca.pem"),
        "{}",
        stderr(&output)
    );

    let mut command = holdfast(url, &["status", "--ca", "/ca.pem"]);
    command
        .env("HOLDFAST_CERT", "/client.pem")
        .env_remove("HOLDFAST_KEY");
    let output = finish(command.spawn().unwrap()).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--key"), "{}", stderr(&output));
}

#[tokio::test]
async fn tls_flags_reach_a_quic_relay_that_requires_client_certificates() {
    let pki = Pki::new();
    let relay = QuicRelay::start(
        &pki,
        RelayTls {
            require_client_cert: true,
            ..RelayTls::default()
        },
    );
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let mut command = holdfast(&relay.url().to_string(), &["status", "--ca"]);
    command
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .env("HOLDFAST_KEY", &key)
        .env_remove("HOLDFAST_CERT");
    let child = command.spawn().unwrap();
    let mut session = relay.accept_session(1).await;
    assert!(session.connection.peer_identity().is_some());
    let request_id = match session.recv_answering_pings().await {
        Some(Frame::StatusRequest(request)) => request.request_id,
        other => panic!("expected STATUS_REQUEST, got {other:?}"),
    };
    session
        .send(Frame::StatusResponse(StatusResponse {
            request_id,
            json: bytes::Bytes::from_static(br#"{"relay_id":"r-quic"}"#),
        }))
        .await;
    let answering =
        tokio::spawn(async move { while session.recv_answering_pings().await.is_some() {} });
    let output = finish(child).await;
    answering.abort();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "relay_id: r-quic\n"
    );
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

/// Reads stdout lines of a running CLI as they come.
fn stdout_lines(
    child: &mut Child,
) -> tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>> {
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(child.stdout.take().unwrap()).lines()
}

async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> String {
    within("a line from the CLI", lines.next_line())
        .await
        .unwrap()
        .expect("the CLI closed stdout")
}

/// Sends `signal` to the child, as an operator or supervisor would.
fn send_signal(child: &Child, signal: holdfast_testkit::Signal) {
    let pid = child.id().expect("the CLI is running");
    holdfast_testkit::send_signal(pid, signal).unwrap();
}

#[tokio::test]
async fn get_prints_text_or_one_json_object_and_fails_with_a_typed_error() {
    let relay = FakeRelay::start();
    let url = relay.url().to_string();
    let snapshot = holdfast_wire::Snapshot {
        revision: 42,
        stale: false,
        age_ms: 0,
        entries: vec![
            holdfast_wire::KeyValue {
                key: bytes::Bytes::from_static(b"workers/a"),
                value: bytes::Bytes::from_static(b"10.0.0.1:9000"),
            },
            holdfast_wire::KeyValue {
                key: bytes::Bytes::from_static(b"workers/b"),
                value: bytes::Bytes::from_static(b"10.0.0.2:9000"),
            },
        ],
    };
    for (args, expected) in [
        (
            vec!["get", "workers/"],
            "revision 42  stale false  age_ms 0\n\
             workers/a = 10.0.0.1:9000\n\
             workers/b = 10.0.0.2:9000\n",
        ),
        (
            vec!["get", "workers/", "--json"],
            "{\"revision\":42,\"stale\":false,\"age_ms\":0,\"entries\":[\
             {\"key\":\"workers/a\",\"value\":\"10.0.0.1:9000\"},\
             {\"key\":\"workers/b\",\"value\":\"10.0.0.2:9000\"}]}\n",
        ),
    ] {
        let child = holdfast(&url, &args).spawn().unwrap();
        let (mut connection, _) = relay.accept_session(1).await;
        let get = match connection.recv_answering_pings().await {
            Frame::Get(get) => get,
            other => panic!("expected GET, got {other:?}"),
        };
        assert_eq!(get.prefix, "workers/");
        assert!(!get.linearizable);
        connection
            .send(Frame::GetResponse(holdfast_wire::GetResponse {
                request_id: get.request_id,
                outcome: holdfast_wire::GetOutcome::Snapshot(snapshot.clone()),
            }))
            .await;
        let answering =
            tokio::spawn(async move { while connection.framed_next_answering().await {} });
        let output = finish(child).await;
        answering.abort();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
    }

    let child = holdfast(&url, &["get", "workers/", "--linearizable"])
        .spawn()
        .unwrap();
    let (mut connection, _) = relay.accept_session(2).await;
    let get = match connection.recv_answering_pings().await {
        Frame::Get(get) => get,
        other => panic!("expected GET, got {other:?}"),
    };
    assert!(get.linearizable);
    connection
        .send(Frame::GetResponse(holdfast_wire::GetResponse {
            request_id: get.request_id,
            outcome: holdfast_wire::GetOutcome::Failed {
                code: ErrorCode::EtcdUnavailable,
                message: Text::from("etcd is unreachable"),
            },
        }))
        .await;
    let answering = tokio::spawn(async move { while connection.framed_next_answering().await {} });
    let output = finish(child).await;
    answering.abort();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert_eq!(
        stderr(&output).trim_end(),
        "error: etcd_unavailable (retryable): etcd is unreachable"
    );
}

#[tokio::test]
async fn register_holds_the_key_reports_etcd_changes_and_deregisters_on_sigterm() {
    let relay = FakeRelay::start();
    let mut child = holdfast(
        &relay.url().to_string(),
        &["register", "workers/{instance_id}", "10.0.0.7:9000"],
    )
    .spawn()
    .unwrap();
    let mut lines = stdout_lines(&mut child);
    let (mut connection, _) = relay
        .accept_session_with_etcd(0xbeef, holdfast_wire::LinkStatus::Up)
        .await;
    let register = connection.recv_register().await;
    assert_eq!(register.key, "workers/beef");
    assert_eq!(register.value, "10.0.0.7:9000");
    connection
        .ack_registration(
            register.request_id,
            holdfast_wire::RegistrationOutcome::Applied,
        )
        .await;
    assert_eq!(next_line(&mut lines).await, "instance_id beef");
    assert_eq!(next_line(&mut lines).await, "key workers/beef");
    assert_eq!(next_line(&mut lines).await, "registered: applied");

    for status in [
        holdfast_wire::LinkStatus::Down,
        holdfast_wire::LinkStatus::Up,
    ] {
        connection
            .send(Frame::LinkState(holdfast_wire::LinkState {
                service: holdfast_wire::Service::Etcd,
                status,
            }))
            .await;
    }
    assert_eq!(
        next_line(&mut lines).await,
        "etcd down: registration held by the relay"
    );
    assert_eq!(next_line(&mut lines).await, "etcd up");

    send_signal(&child, holdfast_testkit::Signal::Terminate);
    let deregister = match connection.recv_answering_pings().await {
        Frame::Deregister(deregister) => deregister,
        other => panic!("expected DEREGISTER, got {other:?}"),
    };
    assert_eq!(deregister.key, "workers/beef");
    connection
        .ack_registration(
            deregister.request_id,
            holdfast_wire::RegistrationOutcome::Applied,
        )
        .await;
    assert_eq!(next_line(&mut lines).await, "deregistered: applied");
    let answering = tokio::spawn(async move { while connection.framed_next_answering().await {} });
    let status = within("the CLI to exit", child.wait()).await.unwrap();
    answering.abort();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn watch_prints_one_line_per_event_until_sigint() {
    let relay = FakeRelay::start();
    let mut child = holdfast(&relay.url().to_string(), &["watch", "workers/"])
        .spawn()
        .unwrap();
    let mut lines = stdout_lines(&mut child);
    let (mut connection, _) = relay.accept_session(1).await;
    let watch = connection.accept_watch().await;
    assert_eq!(watch.prefix, "workers/");
    assert!(watch.send_initial);
    use holdfast_wire::WatchEventKind::{Delete, Put, Synced};
    for (revision, kind, key, value) in [
        (5, Put, "workers/a", "10.0.0.1"),
        (5, Synced, "", ""),
        (6, Delete, "workers/a", ""),
    ] {
        connection
            .send(Frame::WatchEvent(holdfast_wire::WatchEvent {
                watch_id: watch.watch_id,
                revision,
                kind,
                key: bytes::Bytes::from_static(key.as_bytes()),
                value: bytes::Bytes::from_static(value.as_bytes()),
            }))
            .await;
    }
    assert_eq!(next_line(&mut lines).await, "PUT workers/a 10.0.0.1 rev=5");
    assert_eq!(next_line(&mut lines).await, "SYNCED rev=5");
    assert_eq!(next_line(&mut lines).await, "DELETE workers/a rev=6");

    send_signal(&child, holdfast_testkit::Signal::Interrupt);
    match connection.recv_answering_pings().await {
        Frame::Unwatch(unwatch) => assert_eq!(unwatch.watch_id, watch.watch_id),
        other => panic!("expected UNWATCH, got {other:?}"),
    }
    let answering = tokio::spawn(async move { while connection.framed_next_answering().await {} });
    let status = within("the CLI to exit", child.wait()).await.unwrap();
    answering.abort();
    assert_eq!(status.code(), Some(0));
}
