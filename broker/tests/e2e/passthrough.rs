//! The relay as a faithful pass-through while NATS is up.

use crate::support::{nats_round_trip, within, Stack};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{AckStatus, OutboundMessage};

const MESSAGES: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holdfast_publishes_reach_a_plain_nats_subscriber_in_order() {
    let stack = Stack::start();
    let nats = stack.direct_nats().await;
    let mut plain = nats.subscribe("orders.>").await.unwrap();
    // A flush only writes the SUB; the round trip makes sure nats-server
    // has it before the relay's first message arrives on its own connection.
    nats_round_trip(&nats).await;
    let client = stack.client().await;

    for index in 0..MESSAGES {
        let mut message =
            OutboundMessage::new(format!("orders.{}", index % 3), format!("m{index}"));
        if index % 10 == 0 {
            message = message.header("Trace-Id", format!("t{index}"));
        }
        client.publish_message(message).await.unwrap();
    }
    client.flush().await.unwrap();

    for index in 0..MESSAGES {
        let message = within("plain subscriber receives", plain.next())
            .await
            .unwrap();
        assert_eq!(message.subject.as_str(), format!("orders.{}", index % 3));
        assert_eq!(message.payload, Bytes::from(format!("m{index}")));
        if index % 10 == 0 {
            let trace = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Trace-Id"));
            assert_eq!(
                trace.map(|value| value.as_str()),
                Some(format!("t{index}").as_str())
            );
        }
    }
}

/// Far more small frames than one turn of a session handles: a frame left
/// over at the end of a turn must be handled, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_burst_of_small_publishes_arrives_complete_and_in_order() {
    const BURST: usize = 50_000;
    let stack = Stack::start();
    let nats = stack.direct_nats().await;
    let mut plain = nats.subscribe("burst").await.unwrap();
    nats_round_trip(&nats).await;
    let client = stack.client().await;

    for index in 0..BURST {
        client
            .publish_message(OutboundMessage::new("burst", index.to_string()))
            .await
            .unwrap();
    }
    client.flush().await.unwrap();

    for index in 0..BURST {
        let message = within("plain subscriber receives the burst", plain.next())
            .await
            .unwrap();
        assert_eq!(
            message.payload,
            Bytes::from(index.to_string()),
            "message {index} of the burst"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_nats_publishes_reach_a_holdfast_subscriber_in_order() {
    let stack = Stack::start();
    let client = stack.client().await;
    let mut subscriber = client.subscribe("events.*").await.unwrap();
    let nats = stack.direct_nats().await;

    for index in 0..MESSAGES {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Seq", index.to_string().as_str());
        nats.publish_with_headers(
            format!("events.e{}", index % 5),
            headers,
            format!("p{index}").into(),
        )
        .await
        .unwrap();
    }
    nats.flush().await.unwrap();

    for index in 0..MESSAGES {
        let message = within("holdfast subscriber receives", subscriber.next())
            .await
            .unwrap();
        assert_eq!(message.subject.as_str(), format!("events.e{}", index % 5));
        assert_eq!(message.payload, Bytes::from(format!("p{index}")));
        assert_eq!(
            message.headers.get("Seq").map(|v| v.to_string()),
            Some(index.to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_publish_says_forwarded() {
    let stack = Stack::start();
    let client = stack.client().await;
    let ack = client
        .publish_with_ack(OutboundMessage::new("work.prefill", "x").class("prefill"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Forwarded);

    let refused = client
        .publish_with_ack(OutboundMessage::new("work.prefill", "x").class("no-such-class"))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(holdfast_client::ErrorCode::UnknownClass)
    );
    assert!(!refused.is_retryable());

    // A header NATS would not accept is refused here, not dropped later.
    let refused = client
        .publish_with_ack(OutboundMessage::new("work.prefill", "x").header("bad name", "v"))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(holdfast_client::ErrorCode::ProtocolViolation)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_work_in_both_directions() {
    let stack = Stack::start();
    let nats = stack.direct_nats().await;
    let client = stack.client().await;

    // holdfast client asks, a plain NATS service answers.
    let mut service = nats.subscribe("svc.upper").await.unwrap();
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            let reply = request.reply.unwrap();
            let text = String::from_utf8_lossy(&request.payload).to_uppercase();
            responder.publish(reply, text.into()).await.unwrap();
        }
    });
    // flush only writes the SUB; a round trip knows the server has it.
    crate::support::nats_round_trip(&nats).await;
    let reply = client.request("svc.upper", "hello").await.unwrap();
    assert_eq!(reply.payload, Bytes::from("HELLO"));

    // A plain NATS client asks, a holdfast subscriber answers.
    let mut requests = client.subscribe("svc.reverse").await.unwrap();
    let answering = client.clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let reversed: String = String::from_utf8_lossy(&request.payload)
                .chars()
                .rev()
                .collect();
            answering
                .publish(request.reply.unwrap(), reversed)
                .await
                .unwrap();
        }
    });
    let reply = within(
        "plain request answered",
        nats.request("svc.reverse", "abc".into()),
    )
    .await
    .unwrap();
    assert_eq!(reply.payload, Bytes::from("cba"));

    // Nobody serves this subject: a typed, retryable error, not a hang.
    let error = client.request("svc.nobody", "x").await.unwrap_err();
    assert_eq!(error.code(), Some(holdfast_client::ErrorCode::NoResponders));
    assert!(error.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_share_one_upstream_and_queue_groups_split_work() {
    let stack = Stack::start();
    let first = stack.client().await;
    let second = stack.client().await;
    let mut plain_a = first.subscribe("jobs.>").await.unwrap();
    let mut plain_b = second.subscribe("jobs.>").await.unwrap();
    let mut worker_a = first.queue_subscribe("jobs.>", "workers").await.unwrap();
    let mut worker_b = second.queue_subscribe("jobs.>", "workers").await.unwrap();

    let status = first.status().await.unwrap();
    assert_eq!(status["subscriptions"]["local"], 4);
    assert_eq!(status["subscriptions"]["upstream"], 2, "{status}");

    let nats = stack.direct_nats().await;
    for index in 0..100 {
        nats.publish(format!("jobs.{index}"), "j".into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    for _ in 0..100 {
        within("plain a", plain_a.next()).await.unwrap();
        within("plain b", plain_b.next()).await.unwrap();
    }
    let mut worked = 0;
    while worked < 100 {
        tokio::select! {
            Some(_) = worker_a.next() => worked += 1,
            Some(_) = worker_b.next() => worked += 1,
            _ = tokio::time::sleep(crate::support::WAIT) => panic!("queue group got only {worked} of 100"),
        }
    }
    // Each job went to exactly one worker: nothing more is waiting.
    let extra = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        tokio::select! { _ = worker_a.next() => (), _ = worker_b.next() => () }
    })
    .await;
    assert!(extra.is_err(), "a job was delivered to both queue members");

    drop(plain_a);
    drop(plain_b);
    crate::support::wait_until_async("upstream subscription released", || async {
        first.status().await.unwrap()["subscriptions"]["upstream"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_subscriber_elsewhere_does_not_make_the_link_look_down() {
    let stack = Stack::start();
    let client = stack.client().await;
    // Someone debugging with `nats sub '>'`: it receives the relay's probes
    // too, and never answers them.
    let watcher = stack.direct_nats().await;
    let mut everything = watcher.subscribe(">").await.unwrap();
    nats_round_trip(&watcher).await;
    // The watcher sees the relay's link probes (one every 250 ms on the
    // relay's clock). Had they gone unanswered since it subscribed, the link
    // would be down one link timeout (1 s) after the last answered one;
    // six probes later that has passed. Then the link is up and publishes
    // are forwarded, not held.
    let mut probes = 0;
    within("six link probes seen by the watcher", async {
        while probes < 6 {
            let message = everything.next().await.expect("the watcher's subscription");
            if message.subject.starts_with("_HOLDFAST.probe.") {
                probes += 1;
            }
        }
    })
    .await;
    assert_eq!(client.nats_status(), holdfast_client::LinkStatus::Up);
    let ack = client
        .publish_with_ack(OutboundMessage::new("probe.check", "x"))
        .await
        .unwrap();
    let ack = within("ack", ack).await.unwrap();
    assert_eq!(ack.outcome, AckStatus::Forwarded);
    assert!(!stack.relay.logs().contains("NATS link down"));
}
