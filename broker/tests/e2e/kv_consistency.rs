//! Dynamo KV events through an outage, as a router on NATS sees them: a
//! whole stream arrives whole and unmarked; a stream that lost events (a
//! `drop_oldest` class over its budget) is preceded by a "cleared" event
//! for that worker, so the router drops its tree instead of routing on a
//! wrong one.

use crate::support::{metric, wait_until, within, Stack};
use futures::StreamExt;
use holdfast_client::{AckStatus, Client, LinkStatus, OutboundMessage};
use serde::Deserialize;

const SUBJECT: &str = "namespace.ns.component.backend.endpoint.generate.kv-events";
const WORKER: u64 = 0x694d_a252_1b98_6205;

/// A message as a Dynamo 1.6.1 worker's `KvEventPublisher` writes it: event
/// `id` stores block `id` under block `id - 1` (event 1 is a root).
fn stored_event(id: u64, padding: usize) -> Vec<u8> {
    use rmp::encode::*;
    let mut payload = Vec::new();
    write_array_len(&mut payload, 1).unwrap();
    write_map_len(&mut payload, 4).unwrap();
    write_str(&mut payload, "worker_id").unwrap();
    write_uint(&mut payload, WORKER).unwrap();
    write_str(&mut payload, "storage_tier").unwrap();
    write_str(&mut payload, "device").unwrap();
    write_str(&mut payload, "residency_domain").unwrap();
    // Long enough to make the class's budget matter.
    write_str(&mut payload, &format!("worker{}", "-".repeat(padding))).unwrap();
    write_str(&mut payload, "event").unwrap();
    write_map_len(&mut payload, 3).unwrap();
    write_str(&mut payload, "event_id").unwrap();
    write_uint(&mut payload, id).unwrap();
    write_str(&mut payload, "data").unwrap();
    write_map_len(&mut payload, 1).unwrap();
    write_str(&mut payload, "stored").unwrap();
    write_map_len(&mut payload, 2).unwrap();
    write_str(&mut payload, "parent_hash").unwrap();
    if id == 1 {
        write_nil(&mut payload).unwrap();
    } else {
        write_uint(&mut payload, id - 1).unwrap();
    }
    write_str(&mut payload, "blocks").unwrap();
    write_array_len(&mut payload, 1).unwrap();
    write_map_len(&mut payload, 1).unwrap();
    write_str(&mut payload, "block_hash").unwrap();
    write_uint(&mut payload, id).unwrap();
    write_str(&mut payload, "dp_rank").unwrap();
    write_uint(&mut payload, 0).unwrap();

    let mut envelope = Vec::new();
    write_map_len(&mut envelope, 5).unwrap();
    write_str(&mut envelope, "publisher_id").unwrap();
    write_uint(&mut envelope, 42).unwrap();
    write_str(&mut envelope, "sequence").unwrap();
    write_uint(&mut envelope, id - 1).unwrap();
    write_str(&mut envelope, "published_at").unwrap();
    write_uint(&mut envelope, 1_765_000_000_000).unwrap();
    write_str(&mut envelope, "topic").unwrap();
    write_str(&mut envelope, "kv-events").unwrap();
    write_str(&mut envelope, "payload").unwrap();
    write_bin(&mut envelope, &payload).unwrap();
    envelope
}

#[derive(Deserialize)]
struct Envelope<'a> {
    publisher_id: u64,
    topic: &'a str,
    payload: &'a [u8],
}

/// What a router reads of a message: (worker, event id, "stored" or
/// "cleared") per event, and the envelope's publisher.
fn read_events(message: &[u8]) -> (u64, Vec<(u64, u64, String)>) {
    let envelope: Envelope = rmp_serde::from_slice(message).expect("a Dynamo envelope");
    assert_eq!(envelope.topic, "kv-events");
    let events: Vec<serde_json::Value> =
        rmp_serde::from_slice(envelope.payload).expect("router events");
    let events = events
        .iter()
        .map(|event| {
            let data = &event["event"]["data"];
            let kind = match data.as_str() {
                Some(unit) => unit.to_string(),
                None => data
                    .as_object()
                    .and_then(|map| map.keys().next().cloned())
                    .unwrap_or_default(),
            };
            (
                event["worker_id"].as_u64().unwrap(),
                event["event"]["event_id"].as_u64().unwrap(),
                kind,
            )
        })
        .collect();
    (envelope.publisher_id, events)
}

async fn publish_acked(client: &Client, id: u64, padding: usize) -> AckStatus {
    client
        .publish_with_ack(OutboundMessage::new(SUBJECT, stored_event(id, padding)))
        .await
        .unwrap()
        .await
        .unwrap()
        .outcome
}

async fn wait_for_link(client: &Client, wanted: LinkStatus) {
    crate::support::wait_until_async("the relay's NATS link", || async {
        client.nats_status() == wanted
    })
    .await;
}

/// Reads the subscriber until event `last` of the worker arrived.
async fn receive_until(
    subscriber: &mut async_nats::Subscriber,
    last: u64,
) -> Vec<(u64, Vec<(u64, u64, String)>)> {
    let mut received = Vec::new();
    within("KV events on NATS", async {
        while let Some(message) = subscriber.next().await {
            let events = read_events(&message.payload);
            let done = events
                .1
                .iter()
                .any(|(_, id, kind)| *id == last && kind == "stored");
            received.push(events);
            if done {
                break;
            }
        }
    })
    .await;
    received
}

/// A relay with `config`, a router subscribed on its nats-server, and the
/// worker's first three events through the relay, seen by the router.
async fn started_with_router(config: &str) -> (Stack, Client, async_nats::Subscriber) {
    let stack = Stack::start_with_config(config);
    let client = stack.client().await;
    let router = stack.direct_nats().await;
    let mut subscriber = router.subscribe(SUBJECT).await.unwrap();
    router.flush().await.unwrap();
    for id in 1..=3 {
        publish_acked(&client, id, 16).await;
    }
    let live = receive_until(&mut subscriber, 3).await;
    assert!(live.iter().all(|(_, events)| events[0].2 == "stored"));
    // Confirmed by NATS too: one still unconfirmed when a test stops NATS
    // would be sent again after it (at-least-once), a copy these tests'
    // exact sequences do not expect.
    wait_until("the first events are confirmed", || {
        stack.relay.status()["classes"]
            .as_array()
            .is_some_and(|classes| classes.iter().all(|class| class["backlog_messages"] == 0))
    });
    (stack, client, subscriber)
}

const DROP_OLDEST: &str = "[classes.kv_events]\nmax_bytes = 65536\nwhen_full = \"drop_oldest\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_lost_to_drop_oldest_make_routers_drop_that_worker() {
    let (stack, client, mut subscriber) = started_with_router(DROP_OLDEST).await;
    // A router on the same node, subscribed through the relay (after the
    // first three events: it sees the rest at publish time).
    let mut local_router = client.subscribe(SUBJECT).await.unwrap();

    stack.nats.pause();
    wait_for_link(&client, LinkStatus::Down).await;
    // 300 messages of ~1 KiB into a 64 KiB budget: the oldest go.
    const LAST: u64 = 303;
    for id in 4..=LAST {
        assert_eq!(publish_acked(&client, id, 900).await, AckStatus::Journaled);
    }
    let status = stack.relay.status();
    let kv_class = status["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|class| class["name"] == "kv_events")
        .unwrap()
        .clone();
    let dropped = kv_class["dropped_oldest"].as_u64().unwrap();
    assert!(dropped > 0, "{kv_class}");

    stack.nats.resume();
    let replayed = receive_until(&mut subscriber, LAST).await;
    // The router hears "cleared" for the worker first, from the relay (a
    // publisher of its own), then the events that survived, in order.
    let (relay_publisher, first) = &replayed[0];
    assert_eq!(first.len(), 1);
    let (worker, cleared_id, kind) = &first[0];
    assert_eq!(
        (*worker, kind.as_str()),
        (WORKER, "cleared"),
        "{replayed:?}"
    );
    assert_ne!(*relay_publisher, 42);
    let ids: Vec<u64> = replayed[1..]
        .iter()
        .flat_map(|(_, events)| events.iter().map(|(_, id, _)| *id))
        .collect();
    let first_kept = ids[0];
    assert_eq!(*cleared_id, first_kept - 1);
    assert_eq!(
        first_kept,
        4 + dropped,
        "dropped {dropped}, kept from {first_kept}"
    );
    assert_eq!(ids, (first_kept..=LAST).collect::<Vec<_>>());

    let status = stack.relay.status();
    let check = &status["kv_consistency"];
    assert_eq!(check["resets_gap"], 1, "{check}");
    assert_eq!(check["resets_orphan"], 0, "{check}");
    assert_eq!(check["last_reset"]["worker_id"], WORKER, "{check}");
    assert_eq!(check["last_reset"]["reason"], "gap", "{check}");
    assert_eq!(
        check["last_reset"]["detail"],
        format!("expected event 4, got {first_kept}"),
        "{check}"
    );
    let (_, metrics) = stack.relay.http_get("/metrics");
    assert_eq!(
        metric(
            &metrics,
            "holdfast_kv_consistency_resets_total",
            &[("reason", "gap")]
        ),
        Some(1.0)
    );
    assert!(stack
        .relay
        .logs()
        .contains("Dynamo KV event stream is not whole"));

    // The local router had every event since it subscribed at publish
    // time, the dropped ones too; the "cleared" reaches it through NATS
    // after them.
    let mut local_ids = Vec::new();
    within("the cleared event on this node", async {
        while let Some(message) = local_router.next().await {
            let (_, events) = read_events(&message.payload);
            let (worker, id, kind) = events[0].clone();
            if kind == "cleared" {
                assert_eq!(worker, WORKER);
                break;
            }
            local_ids.push(id);
        }
    })
    .await;
    assert_eq!(local_ids, (4..=LAST).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_kv_event_stream_passes_an_outage_unmarked() {
    let (stack, client, mut subscriber) = started_with_router("").await;

    stack.nats.pause();
    wait_for_link(&client, LinkStatus::Down).await;
    const LAST: u64 = 200;
    for id in 4..=LAST {
        assert_eq!(publish_acked(&client, id, 16).await, AckStatus::Journaled);
    }
    // Not a Dynamo event: forwarded as it is, counted, not checked.
    client
        .publish_with_ack(OutboundMessage::new(SUBJECT, "plain text"))
        .await
        .unwrap()
        .await
        .unwrap();
    stack.nats.resume();

    let mut ids = Vec::new();
    let mut plain = 0;
    within("the replay", async {
        while let Some(message) = subscriber.next().await {
            if &message.payload[..] == b"plain text" {
                plain += 1;
                break;
            }
            let (_, events) = read_events(&message.payload);
            ids.extend(events.iter().map(|(_, id, kind)| {
                assert_eq!(kind, "stored");
                *id
            }));
        }
    })
    .await;
    assert_eq!(plain, 1);
    assert_eq!(ids, (4..=LAST).collect::<Vec<_>>());
    let check = stack.relay.status()["kv_consistency"].clone();
    assert_eq!(check["checked"], LAST, "{check}");
    assert_eq!(check["undecodable"], 1, "{check}");
    assert_eq!(check["resets_gap"], 0, "{check}");
    assert_eq!(check["resets_orphan"], 0, "{check}");
    assert_eq!(check["tracked_streams"], 1, "{check}");
    assert_eq!(check["tracked_blocks"], LAST, "{check}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_across_a_clean_relay_restart_is_still_seen() {
    let (mut stack, client, mut subscriber) = started_with_router(DROP_OLDEST).await;
    drop(client);

    // An upgrade during a NATS outage: the relay stops cleanly and starts
    // again, then the worker's events overflow the class.
    stack.nats.pause();
    assert!(stack.relay.terminate().success());
    assert!(stack
        .relay
        .data_dir()
        .join("kv-check-streams.json")
        .exists());
    stack.relay.restart();
    let client = stack.client().await;
    wait_for_link(&client, LinkStatus::Down).await;
    const LAST: u64 = 303;
    for id in 4..=LAST {
        assert_eq!(publish_acked(&client, id, 900).await, AckStatus::Journaled);
    }
    stack.nats.resume();
    let replayed = receive_until(&mut subscriber, LAST).await;
    let (_, first) = &replayed[0];
    assert_eq!(first[0].2, "cleared", "{replayed:?}");
    let first_kept = replayed[1].1[0].1;
    assert!(first_kept > 4, "nothing was dropped: {replayed:?}");
    let check = stack.relay.status()["kv_consistency"].clone();
    assert_eq!(
        check["last_reset"]["detail"],
        format!("expected event 4, got {first_kept}"),
        "{check}"
    );
    // Read once: a crash later must not resume from these places.
    assert!(!stack
        .relay
        .data_dir()
        .join("kv-check-streams.json")
        .exists());
}
