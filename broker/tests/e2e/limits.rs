//! Limits that keep one client from exhausting the relay: each answers with
//! a clear code, is counted by name, and leaves other connections alone.

use crate::bad_input::{exchange, go_away_code, hello};
use crate::support::{metric, scrape, within, Relay, Stack};
use futures::StreamExt;
use holdfast_client::{ErrorCode, Headers};
use holdfast_wire::{Frame, PROTOCOL_VERSION};
use std::time::{Duration, Instant};

fn limit_count(relay: &Relay, limit: &str) -> Option<f64> {
    metric(
        &scrape(relay),
        "holdfast_limit_rejections_total",
        &[("limit", limit)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_told_why_and_the_rest_keep_working() {
    let stack = Stack::start_with_config("[sessions]\nmax_connections = 2\n");
    let first = stack.client().await;
    let second = stack.client().await;
    // Turned away before it could even say HELLO.
    let frames = exchange(stack.relay.socket(), &[], false).await;
    assert!(
        !frames
            .iter()
            .any(|frame| matches!(frame, Frame::Welcome(_))),
        "{frames:?}"
    );
    assert_eq!(
        go_away_code(&frames),
        Some(ErrorCode::LimitExceeded),
        "{frames:?}"
    );
    assert_eq!(limit_count(&stack.relay, "connections"), Some(1.0));
    // The two admitted clients never noticed.
    first.publish("x", "1").await.unwrap();
    second.flush().await.unwrap();
    // A freed slot admits the next client.
    first.close().await.unwrap();
    drop(first);
    let third = within("a freed slot admits a new client", async {
        loop {
            match holdfast_client::Client::connect(&stack.relay.url()).await {
                Ok(client) => break client,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    third.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_turned_away_always_hears_limit_exceeded() {
    let stack = Stack::start_with_config("[sessions]\nmax_connections = 1\n");
    let _holder = stack.client().await;
    // The client sends HELLO at once; a relay that closed with it unread
    // reset the connection, and the client saw "broken pipe" instead.
    for attempt in 0..20 {
        let error = holdfast_client::Client::connect(&stack.relay.url())
            .await
            .err()
            .unwrap_or_else(|| panic!("attempt {attempt} was admitted"));
        assert_eq!(
            error.code(),
            Some(ErrorCode::LimitExceeded),
            "attempt {attempt}: {error}"
        );
        let text = error.to_string();
        assert!(
            text.contains("sessions.max_connections") && !text.contains("retry later"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_hello_and_idle_deadlines() {
    let stack =
        Stack::start_with_config("[sessions]\nhello_timeout = \"300ms\"\nidle_timeout = \"1s\"\n");
    let steady = stack.client().await;

    // Connects and never says HELLO (slowloris).
    let started = Instant::now();
    let frames = exchange(stack.relay.socket(), &[], false).await;
    assert_eq!(
        go_away_code(&frames),
        Some(ErrorCode::Timeout),
        "{frames:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(limit_count(&stack.relay, "hello_timeout"), Some(1.0));

    // Says HELLO, then nothing.
    let started = Instant::now();
    let frames = exchange(
        stack.relay.socket(),
        &[&hello(PROTOCOL_VERSION, PROTOCOL_VERSION)],
        false,
    )
    .await;
    assert!(
        matches!(frames.first(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );
    assert_eq!(
        go_away_code(&frames),
        Some(ErrorCode::Timeout),
        "{frames:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(limit_count(&stack.relay, "idle_timeout"), Some(1.0));

    // The real client pings, so it is never idle: well past the idle
    // timeout it is still the same session.
    assert!(steady.is_connected());
    let status = steady.status().await.unwrap();
    assert_eq!(status["counters"]["sessions_total"], 3, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_and_request_limits_refuse_only_the_excess() {
    let stack =
        Stack::start_with_config("[sessions]\nmax_subscriptions = 2\nmax_inflight_requests = 1\n");
    let client = stack.client().await;
    let _a = client.subscribe("limit.a").await.unwrap();
    let mut b = client.subscribe("limit.b").await.unwrap();
    let refused = client.subscribe("limit.c").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
    assert_eq!(limit_count(&stack.relay, "subscriptions"), Some(1.0));

    // A responder that never answers holds the one request slot.
    let direct = stack.direct_nats().await;
    let _silent = direct.subscribe("limit.slow").await.unwrap();
    crate::support::nats_round_trip(&direct).await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .request_with("limit.slow", Headers::new(), "q", Duration::from_secs(2))
                .await
        })
    };
    // Once the relay holds the first, a second is refused at once.
    within("the relay holds the first request", async {
        loop {
            let status = client.status().await.unwrap();
            if status["counters"]["requests_total"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let refused = client
        .request_with("limit.slow", Headers::new(), "q", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
    assert_eq!(limit_count(&stack.relay, "inflight_requests"), Some(1.0));
    let first = within("the slow request ends", slow).await.unwrap();
    assert_eq!(
        first.unwrap_err().code(),
        Some(ErrorCode::Timeout),
        "the admitted request ran its course"
    );
    // The subscriptions it kept still deliver.
    client.publish("limit.b", "still here").await.unwrap();
    let message = within("kept subscription delivers", b.next())
        .await
        .unwrap();
    assert_eq!(&message.payload[..], b"still here");
}

/// A raw connection to the relay that has sent its HELLO (the WELCOME is
/// left unread).
async fn raw_session(
    socket: &std::path::Path,
) -> (
    tokio::net::unix::OwnedReadHalf,
    tokio::net::unix::OwnedWriteHalf,
) {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (read_half, mut write_half) = stream.into_split();
    write_half
        .write_all(&hello(PROTOCOL_VERSION, PROTOCOL_VERSION))
        .await
        .unwrap();
    (read_half, write_half)
}

/// Publishes with acks from a raw connection, `count` of them, as fast as
/// the socket takes them.
async fn write_acked_publishes(
    stream: &mut tokio::net::unix::OwnedWriteHalf,
    subject: &'static str,
    count: u64,
) {
    use holdfast_wire::{Headers as WireHeaders, Publish, Text};
    use tokio::io::AsyncWriteExt;
    for ack_id in 1..=count {
        let frame = crate::bad_input::frame_bytes(&Frame::Publish(Publish {
            ack_id,
            subject: Text::from_static(subject),
            reply: None,
            class: None,
            headers: WireHeaders::new(),
            payload: ack_id.to_string().into_bytes().into(),
        }));
        stream.write_all(&frame).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_acks_is_paused_not_buffered() {
    const PUBLISHES: u64 = 50_000;
    let stack =
        Stack::start_with_config("[sessions]\noutbound_queue_frames = 64\nidle_timeout = \"3s\"\n");
    let nats = stack.direct_nats().await;
    let mut upstream = nats.subscribe("unread.>").await.unwrap();
    crate::support::nats_round_trip(&nats).await;

    // Writes everything, reads nothing (yet).
    let (mut read_half, mut write_half) = raw_session(stack.relay.socket()).await;
    let writer = tokio::spawn(async move {
        write_acked_publishes(&mut write_half, "unread.a", PUBLISHES).await;
        write_half
    });
    // The relay stops reading once 64 answers wait unread, so far fewer than
    // all publishes get through while the client does not read.
    crate::support::wait_until_async("the relay notices the unread answers", || async {
        limit_count(&stack.relay, "unread_answers").unwrap_or(0.0) >= 1.0
    })
    .await;
    // What got through arrives until the stream stays quiet for 200 ms; a
    // relay that kept reading would never fall quiet before the end.
    let mut through = 0u64;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), upstream.next()).await
    {
        through += 1;
    }
    assert!(
        through < PUBLISHES / 2,
        "{through} of {PUBLISHES} publishes were read while their acks went unread"
    );
    assert!(
        !writer.is_finished(),
        "the client's writes were not held back"
    );

    // Once the client reads, everything goes through and is answered.
    let mut decoder = holdfast_wire::FrameDecoder::new(u32::MAX);
    let mut received = bytes::BytesMut::new();
    let mut acked = 0u64;
    within("every ack", async {
        use tokio::io::AsyncReadExt;
        while acked < PUBLISHES {
            let mut chunk = [0u8; 65536];
            let read = read_half.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the relay closed the connection");
            received.extend_from_slice(&chunk[..read]);
            while let Ok(Some(frame)) = decoder.decode(&mut received) {
                if let Frame::PubAck(ack) = frame {
                    assert!(
                        !matches!(ack.outcome, holdfast_wire::AckOutcome::Rejected { .. }),
                        "{ack:?}"
                    );
                    acked += 1;
                }
            }
        }
    })
    .await;
    let _write_half = within("the writes", writer).await.unwrap();
    within("every publish on NATS", async {
        while through < PUBLISHES {
            upstream.next().await.unwrap();
            through += 1;
        }
    })
    .await;

    // A client that never reads is closed after the idle timeout.
    let (_never_read, mut write_half) = raw_session(stack.relay.socket()).await;
    let writer = tokio::spawn(async move {
        write_acked_publishes(&mut write_half, "unread.b", PUBLISHES).await;
    });
    crate::support::wait_until_async("the never-reading client is disconnected", || async {
        metric(
            &scrape(&stack.relay),
            "holdfast_slow_consumer_disconnects_total",
            &[],
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    writer.abort();
    assert!(stack
        .relay
        .logs()
        .contains("client read none of its answers within the idle timeout"));
}

/// The relay's resident memory, in MiB.
pub fn relay_rss_mib(relay: &Relay) -> f64 {
    let pid = relay.pid().expect("relay is running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_registrations_do_not_pile_up_in_the_session() {
    // No etcd: every REGISTER is refused, and used to stay in the session's
    // set of keys until it ended.
    const KEYS: usize = 40_000;
    const KEY_BYTES: usize = 8 * 1024;
    let stack = Stack::start();
    let client = stack.client().await;
    let before = relay_rss_mib(&stack.relay);
    let mut workers = Vec::new();
    for worker in 0..8 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            for index in (worker..KEYS).step_by(8) {
                let mut key = format!("big/{index}/").into_bytes();
                key.resize(KEY_BYTES, b'k');
                let refused = client.register(key, "v").await.unwrap_err();
                assert_eq!(
                    refused.code(),
                    Some(ErrorCode::EtcdUnavailable),
                    "{refused}"
                );
            }
        }));
    }
    for worker in workers {
        within("the registrations", worker).await.unwrap();
    }
    let grown = relay_rss_mib(&stack.relay) - before;
    // 40k keys of 8 KiB are 320 MiB; the session keeps 8-byte hashes.
    assert!(grown < 64.0, "the relay grew by {grown:.0} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_the_frame_limit_still_answers_the_request() {
    let stack = Stack::start_with_config("[relay]\nmax_frame_bytes = 1024\n");
    let nats = stack.direct_nats().await;
    let mut requests = nats.subscribe("big.reply").await.unwrap();
    crate::support::nats_round_trip(&nats).await;
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                let _ = responder.publish(reply, vec![b'x'; 4096].into()).await;
            }
        }
    });
    let client = stack.client().await;
    let started = Instant::now();
    let refused = client.request("big.reply", "q").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once, not at the request timeout"
    );
    // The connection carries on.
    client.flush().await.unwrap();
}
