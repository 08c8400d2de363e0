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
