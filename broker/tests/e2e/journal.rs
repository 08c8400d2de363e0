//! The outage journal against real nats-server processes: nothing
//! acknowledged is lost across NATS outages and relay crashes, prefills
//! come back first, and order within a class holds.
//!
//! What NATS received is captured by a JetStream stream (file store, kept
//! across NATS restarts), so the check does not depend on a subscriber
//! being connected at the moment the relay starts replaying.

use crate::support::{wait_until_async, within, NatsServer, Relay};
use futures::StreamExt;
use holdfast_client::{AckStatus, Client, LinkEvent, LinkStatus, OutboundMessage};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Every class durable, classified by subject, so every ack is
/// `Journaled`; a JetStream stream captures the subjects, so the relay
/// waits for PubAcks before letting go.
pub const DURABLE_CLASSES: &str = r#"
[classes.prefill]
durability = "durable"
jetstream = true
subjects = ["load.prefill.>"]
[classes.decode]
durability = "durable"
jetstream = true
subjects = ["load.decode.>"]
[classes.kv_events]
jetstream = true
subjects = ["load.kv.>"]
[classes.default]
durability = "durable"
jetstream = true
"#;

/// Class names in drain order, with the subject prefix each one uses.
pub const CLASSES: [(&str, &str); 4] = [
    ("prefill", "load.prefill"),
    ("decode", "load.decode"),
    ("kv_events", "load.kv"),
    ("default", "load.other"),
];

pub async fn capture_stream(nats_url: &str) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(nats_url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "CAPTURE".to_string(),
            subjects: vec!["load.>".to_string()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Reads `count` messages from the capture stream in stream order.
pub async fn read_captured(nats_url: &str, count: usize) -> Vec<(String, String)> {
    let stream = capture_stream(nats_url).await;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = Vec::with_capacity(count);
    tokio::time::timeout(Duration::from_secs(120), async {
        while seen.len() < count {
            let message = messages.next().await.unwrap().unwrap();
            seen.push((
                message.subject.to_string(),
                String::from_utf8_lossy(&message.payload).into_owned(),
            ));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {count} messages reached NATS", seen.len()));
    seen
}

pub async fn captured_count(nats_url: &str) -> u64 {
    let mut stream = capture_stream(nats_url).await;
    stream
        .info()
        .await
        .map(|info| info.state.messages)
        .unwrap_or(0)
}

pub async fn wait_for_nats(client: &Client, wanted: LinkStatus) {
    let mut events = client.link_events();
    within("NATS link state", async {
        while client.nats_status() != wanted {
            match events.recv().await {
                Ok(LinkEvent::Upstream { .. }) | Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
}

/// Publishes `per_class` messages to every class, interleaved, pipelined,
/// and checks every ack says Journaled.
pub async fn publish_load(client: &Client, per_class: usize) {
    let mut acks = Vec::with_capacity(per_class * CLASSES.len());
    for index in 0..per_class {
        for (class, prefix) in CLASSES {
            let message = OutboundMessage::new(format!("{prefix}.m"), format!("{class}:{index}"));
            acks.push(client.publish_with_ack(message).await.unwrap());
        }
    }
    within("every ack", async {
        for ack in acks {
            assert_eq!(ack.await.unwrap().outcome, AckStatus::Journaled);
        }
    })
    .await;
}

/// Every message present once, prefills before decodes before kv_events
/// before default, and strictly in order within each class.
pub fn assert_complete_and_ordered(seen: &[(String, String)], per_class: usize) {
    let rank = |class: &str| CLASSES.iter().position(|(name, _)| *name == class).unwrap();
    let mut next = [0usize; 4];
    let mut last_rank = 0;
    for (_, payload) in seen {
        let (class, index) = payload.split_once(':').unwrap();
        let class_rank = rank(class);
        let index: usize = index.parse().unwrap();
        assert!(
            class_rank >= last_rank,
            "{class} message {index} came after a lower class"
        );
        last_rank = class_rank;
        assert_eq!(index, next[class_rank], "{class}: out of order or missing");
        next[class_rank] += 1;
    }
    assert_eq!(next, [per_class; 4], "messages missing");
}

/// A JetStream-captured NATS, a relay with `config`, a client, and NATS
/// already killed (the relay has noticed): the start of every outage test.
pub async fn outage_under_way(config: &str) -> (NatsServer, Relay, Client) {
    let mut nats = NatsServer::start_jetstream();
    capture_stream(&nats.url()).await;
    let relay = Relay::start_with_config(&nats.url(), config);
    let client = Client::connect(&relay.url()).await.unwrap();
    nats.kill();
    wait_for_nats(&client, LinkStatus::Down).await;
    (nats, relay, client)
}

/// Brings NATS back and returns once the first replayed message is stored.
async fn restart_until_replay_is_under_way(nats: &mut NatsServer) {
    nats.restart();
    let url = nats.url();
    wait_until_async("replay under way", || async {
        captured_count(&url).await > 0
    })
    .await;
}

const PER_CLASS: usize = 12_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_backlog_survives_an_outage_and_replays_prefill_first() {
    let (mut nats, _relay, client) = outage_under_way(DURABLE_CLASSES).await;
    publish_load(&client, PER_CLASS).await;
    let status = client.status().await.unwrap();
    assert_eq!(status["classes"][0]["state"], "backlogged", "{status}");
    assert_eq!(status["classes"][0]["backlog_messages"], PER_CLASS as u64);

    nats.restart();
    let seen = read_captured(&nats.url(), PER_CLASS * 4).await;
    assert_complete_and_ordered(&seen, PER_CLASS);
    wait_until_async("backlog confirmed and trimmed", || async {
        client.status().await.unwrap()["classes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|class| class["backlog_messages"] == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_survives_kill_9_of_the_relay() {
    let (mut nats, mut relay, client) = outage_under_way(DURABLE_CLASSES).await;
    publish_load(&client, PER_CLASS).await;

    relay.kill();
    relay.restart();
    // What an operator reads when a restart after a crash takes a moment.
    assert!(
        relay
            .logs()
            .contains("journal was not closed cleanly (crash or kill -9)"),
        "{}",
        relay.logs()
    );
    nats.restart();
    let seen = read_captured(&nats.url(), PER_CLASS * 4).await;
    assert_complete_and_ordered(&seen, PER_CLASS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_replay_loses_nothing() {
    let (mut nats, mut relay, client) = outage_under_way(DURABLE_CLASSES).await;
    publish_load(&client, PER_CLASS).await;

    restart_until_replay_is_under_way(&mut nats).await;
    relay.kill();
    relay.restart();
    // Resent messages carry the same Nats-Msg-Id, so the stream keeps one
    // copy of each; order within each class still holds.
    let seen = read_captured(&nats.url(), PER_CLASS * 4).await;
    assert_complete_per_class(&seen, PER_CLASS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dropping_again_mid_replay_loses_nothing() {
    let (mut nats, relay, client) = outage_under_way(DURABLE_CLASSES).await;
    publish_load(&client, PER_CLASS).await;

    restart_until_replay_is_under_way(&mut nats).await;
    // The link drops mid-replay: the server stops answering (as in a
    // partition), the relay notices, stops, and resends what was not
    // confirmed once it answers again. (A kill -9 here would test NATS
    // instead: nats-server 2.9's file store can lose messages it already
    // acknowledged when killed, since it syncs on an interval.)
    nats.pause();
    wait_for_nats(&client, LinkStatus::Down).await;
    let status = client.status().await.unwrap();
    let waiting: u64 = status["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|class| class["backlog_messages"].as_u64().unwrap())
        .sum();
    assert!(waiting > 0, "the replay finished before the drop: {status}");
    nats.resume();
    let seen = read_captured(&nats.url(), PER_CLASS * 4).await;
    assert_complete_per_class(&seen, PER_CLASS);
    drop(relay);
}

/// After a crash or outage mid-replay a class may be resent from its last
/// confirmed point, so classes can interleave where the replay restarted;
/// what must hold is: every message present once, in order within its class.
pub fn assert_complete_per_class(seen: &[(String, String)], per_class: usize) {
    let mut next = [0usize; 4];
    for (_, payload) in seen {
        let (class, index) = payload.split_once(':').unwrap();
        let rank = CLASSES.iter().position(|(name, _)| *name == class).unwrap();
        let index: usize = index.parse().unwrap();
        assert_eq!(
            index, next[rank],
            "{class}: out of order, duplicated or missing"
        );
        next[rank] += 1;
    }
    assert_eq!(next, [per_class; 4], "messages missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_in_memory_survive_a_graceful_restart() {
    let (mut nats, mut relay, client) =
        outage_under_way("[classes.default]\njetstream = true\n").await;
    for index in 0..5 {
        let ack = client
            .publish_with_ack(OutboundMessage::new("load.spill", format!("spill:{index}")))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            ack.outcome,
            AckStatus::Queued,
            "a spill class holds it in memory"
        );
    }

    assert!(relay.terminate().success());
    assert!(
        relay.logs().contains("queued messages journaled"),
        "{}",
        relay.logs()
    );
    relay.restart();
    nats.restart();
    let seen = read_captured(&nats.url(), 5).await;
    let payloads: Vec<&str> = seen.iter().map(|(_, payload)| payload.as_str()).collect();
    assert_eq!(
        payloads,
        ["spill:0", "spill:1", "spill:2", "spill:3", "spill:4"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_class_flows_live_in_order_under_steady_load() {
    let stack = crate::support::Stack::start();
    let nats = stack.direct_nats().await;
    let mut plain = nats.subscribe("live.kv").await.unwrap();
    crate::support::nats_round_trip(&nats).await;
    let client = stack.client().await;

    // A steady stream: there is always a journal commit in flight, and the
    // backlog must still drain to NATS while it lasts.
    const MESSAGES: usize = 20_000;
    let publisher = client.clone();
    let publishing = tokio::spawn(async move {
        let mut acks = Vec::with_capacity(MESSAGES);
        for index in 0..MESSAGES {
            let message = OutboundMessage::new("live.kv", format!("{index}")).class("kv_events");
            acks.push(publisher.publish_with_ack(message).await.unwrap());
        }
        for ack in acks {
            assert_eq!(ack.await.unwrap().outcome, AckStatus::Journaled);
        }
    });
    within("every message reaches NATS in order", async {
        for index in 0..MESSAGES {
            let message = plain.next().await.unwrap();
            assert_eq!(message.payload, index.to_string().into_bytes());
        }
    })
    .await;
    publishing.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_traffic_never_overtakes_the_backlog_of_its_class() {
    // A spill class (memory first) and a durable one, both captured by
    // JetStream, published to steadily while NATS goes away and comes back.
    let config = "[classes.default]\njetstream = true\n[classes.kv_events]\njetstream = true\nsubjects = [\"load.kv.>\"]\n";
    let mut nats = NatsServer::start_jetstream();
    capture_stream(&nats.url()).await;
    let relay = Relay::start_with_config(&nats.url(), config);
    let client = Client::connect(&relay.url()).await.unwrap();

    const PER_CLASS: usize = 1_500;
    let publisher = client.clone();
    let acked = Arc::new(AtomicUsize::new(0));
    let progress = acked.clone();
    let publishing = tokio::spawn(async move {
        // Acks are awaited a window at a time, as a busy publisher would:
        // one at a time, each durable one waits out its own commit.
        const WINDOW: usize = 25;
        let mut waiting = Vec::with_capacity(2 * WINDOW);
        for index in 0..PER_CLASS {
            for subject in ["load.other.m", "load.kv.m"] {
                let message = OutboundMessage::new(subject, format!("{subject}:{index}"));
                waiting.push(publisher.publish_with_ack(message).await.unwrap());
            }
            if (index + 1) % WINDOW == 0 || index + 1 == PER_CLASS {
                for ack in waiting.drain(..) {
                    let ack = ack.await;
                    assert!(ack.is_ok(), "{ack:?}");
                }
                progress.store(index + 1, Ordering::Relaxed);
                // Paced (3 s in all) so the outage below, noticed within
                // nats.link_timeout, falls well inside the publishing.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    // Some of each class goes through before NATS goes away, and more is
    // accepted while it is away.
    let more_acked = || async {
        let mark = acked.load(Ordering::Relaxed);
        wait_until_async("more publishes acknowledged", || async {
            acked.load(Ordering::Relaxed) >= mark + 100
        })
        .await;
    };
    more_acked().await;
    nats.kill();
    wait_for_nats(&client, LinkStatus::Down).await;
    more_acked().await;
    nats.restart();
    // 3,000 acks awaited one by one: on a loaded machine that alone can take
    // longer than the usual wait. Order is what this test checks, not speed.
    tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("the publisher finished within a minute")
        .unwrap();

    let seen = read_captured(&nats.url(), PER_CLASS * 2).await;
    let mut next = [0usize; 2];
    for (_, payload) in &seen {
        let (subject, index) = payload.split_once(':').unwrap();
        let slot = usize::from(subject == "load.kv.m");
        let index: usize = index.parse().unwrap();
        assert_eq!(
            index, next[slot],
            "{subject}: out of order, duplicated or missing"
        );
        next[slot] += 1;
    }
    assert_eq!(next, [PER_CLASS; 2]);
}
