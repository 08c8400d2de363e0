//! NATS goes away: fast typed errors, node-local traffic keeps flowing, and
//! everything comes back without the clients doing anything.

use crate::support::{within, Stack, WAIT};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{
    AckStatus, Client, ErrorCode, LinkEvent, LinkStatus, OutboundMessage, Service,
};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

async fn wait_for_nats(
    events: &mut broadcast::Receiver<LinkEvent>,
    wanted: LinkStatus,
) -> Duration {
    let started = Instant::now();
    within("NATS link event", async {
        loop {
            match events.recv().await {
                Ok(LinkEvent::Upstream {
                    service: Service::Nats,
                    status,
                }) if status == wanted => return started.elapsed(),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(error) => panic!("link events ended: {error}"),
            }
        }
    })
    .await
}

/// While NATS is down: a publish is held (acked `Queued` at once, never a
/// hang); request traffic and requests fail fast with NatsUnavailable.
async fn assert_nats_unavailable_fast(client: &Client) {
    let started = Instant::now();
    let ack = client
        .publish_with_ack(OutboundMessage::new("remote.only", "x"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Queued);
    let reply_traffic = OutboundMessage::new("remote.only", "x").reply("_INBOX.someone");
    let error = client
        .publish_with_ack(reply_traffic)
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NatsUnavailable), "{error}");
    assert!(error.is_retryable());
    let error = client.request("remote.service", "x").await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NatsUnavailable), "{error}");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_then_restarted() {
    let mut stack = Stack::start();
    let client = stack.client().await;
    let mut events = client.link_events();
    let mut local = client.subscribe("node.kv.>").await.unwrap();
    let mut worker = client
        .queue_subscribe("node.work", "workers")
        .await
        .unwrap();
    let second = stack.client().await;
    let mut other_worker = second
        .queue_subscribe("node.work", "workers")
        .await
        .unwrap();
    let mut service = second.subscribe("node.service").await.unwrap();
    let answering = second.clone();
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            if let Some(reply) = request.reply {
                let _ = answering.publish(reply, "served locally").await;
            }
        }
    });

    stack.nats.kill();
    let detected = wait_for_nats(&mut events, LinkStatus::Down).await;
    assert!(
        detected < Duration::from_millis(1500),
        "outage noticed after {detected:?}"
    );
    assert_eq!(client.nats_status(), LinkStatus::Down);

    assert_nats_unavailable_fast(&client).await;

    // Node-local delivery: the publish is held for NATS and reaches the
    // subscriber on this relay at once; the ack says both.
    let ack = client
        .publish_with_ack(OutboundMessage::new("node.kv.block", "local-1"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Queued);
    assert_eq!(ack.local_deliveries, 1);
    let message = within("local delivery", local.next()).await.unwrap();
    assert_eq!(message.payload, Bytes::from("local-1"));

    // A queue group gets each local message once.
    for index in 0..10 {
        let _ = client.publish("node.work", format!("w{index}")).await;
    }
    let mut got = 0;
    while got < 10 {
        tokio::select! {
            Some(_) = worker.next() => got += 1,
            Some(_) = other_worker.next() => got += 1,
            _ = tokio::time::sleep(WAIT) => panic!("only {got} of 10 queued jobs arrived"),
        }
    }

    // A request a local subscriber can answer is served during the outage.
    let reply = client.request("node.service", "q").await.unwrap();
    assert_eq!(reply.payload, Bytes::from("served locally"));

    stack.nats.restart();
    let recovered = wait_for_nats(&mut events, LinkStatus::Up).await;
    assert!(recovered < WAIT);

    // The messages held during the outage reach NATS; "local-1" comes back
    // on the upstream subscription but this relay's subscriber, which had
    // it already, must not see it twice.
    crate::support::wait_until_async("held messages replayed", || async {
        let status = client.status().await.unwrap();
        status["classes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|class| class["backlog_messages"] == 0)
    })
    .await;
    // The subscription made before the outage works again, untouched, and
    // its next message is the new one, not a replayed duplicate.
    let nats = stack.direct_nats().await;
    nats.publish("node.kv.after", "remote".into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let message = within("delivery after recovery", local.next())
        .await
        .unwrap();
    assert_eq!(message.payload, Bytes::from("remote"));
    let ack = client
        .publish_with_ack(OutboundMessage::new("node.kv.after2", "x"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, holdfast_client::AckStatus::Forwarded);

    let status = client.status().await.unwrap();
    assert_eq!(status["nats"]["status"], "up");
    assert!(status["nats"]["outages"].as_u64().unwrap() >= 1, "{status}");
    assert!(
        status["counters"]["local_deliveries"].as_u64().unwrap() >= 11,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_nats_is_noticed_within_the_link_timeout() {
    let stack = Stack::start();
    let client = stack.client().await;
    let mut events = client.link_events();
    let mut subscriber = client.subscribe("paused.>").await.unwrap();

    stack.nats.pause();
    let detected = wait_for_nats(&mut events, LinkStatus::Down).await;
    // link_timeout is 1 s after the last answered probe; allow scheduling
    // slack on a busy machine.
    assert!(
        detected < Duration::from_millis(1500),
        "stall noticed after {detected:?}"
    );
    assert_nats_unavailable_fast(&client).await;

    stack.nats.resume();
    wait_for_nats(&mut events, LinkStatus::Up).await;
    let nats = stack.direct_nats().await;
    nats.publish("paused.after", "back".into()).await.unwrap();
    nats.flush().await.unwrap();
    let message = within("delivery after resume", subscriber.next())
        .await
        .unwrap();
    assert_eq!(message.payload, Bytes::from("back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_starts_degraded_without_nats_and_recovers() {
    let mut nats = crate::support::NatsServer::start();
    nats.kill();
    let relay = crate::support::Relay::start(&nats.url());
    let client = Client::connect(&relay.url()).await.unwrap();
    let mut events = client.link_events();
    if client.nats_status() != LinkStatus::Down {
        wait_for_nats(&mut events, LinkStatus::Down).await;
    }
    let status = client.status().await.unwrap();
    assert_eq!(status["nats"]["status"], "down");
    assert_nats_unavailable_fast(&client).await;

    nats.restart();
    wait_for_nats(&mut events, LinkStatus::Up).await;
    let mut subscriber = client.subscribe("late.start").await.unwrap();
    // The barrier: the relay's SUB is on nats-server.
    client.flush().await.unwrap();
    let direct = async_nats::connect(nats.url()).await.unwrap();
    direct.publish("late.start", "ok".into()).await.unwrap();
    direct.flush().await.unwrap();
    let message = within("delivery once NATS appeared", subscriber.next())
        .await
        .unwrap();
    assert_eq!(message.payload, Bytes::from("ok"));
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_caught_in_a_stalled_connection_are_still_answered() {
    let stack = Stack::start();
    let client = stack.client().await;
    stack.nats.pause();
    // Far more than the NATS client's queue and the socket buffers hold, so
    // some publishes are caught mid-handover when the stall is detected.
    let payload = Bytes::from(vec![b'z'; 1024]);
    let mut acks = Vec::new();
    for _ in 0..20_000 {
        let message = OutboundMessage::new("stalled.flood", payload.clone());
        acks.push(client.publish_with_ack(message).await.unwrap());
    }
    let (mut forwarded, mut queued) = (0, 0);
    within("every ack arrives although NATS is stopped", async {
        for ack in acks {
            match ack.await.map(|ack| ack.outcome) {
                Ok(AckStatus::Forwarded) => forwarded += 1,
                Ok(AckStatus::Queued) => queued += 1,
                other => panic!("unexpected outcome: {other:?}"),
            }
        }
    })
    .await;
    assert!(queued > 0, "{forwarded} forwarded, none held back");
    stack.nats.resume();
}
