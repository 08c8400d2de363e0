//! Journal limits and damage: retention expiry, the disk budget, a corrupt
//! journal file, and chain validation catching a lost or reordered message.

use crate::journal::{capture_stream, outage_under_way, read_captured};
use crate::limits::relay_rss_mib;
use crate::support::{metric, scrape, wait_until_async, within, NatsServer, Relay};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{AckStatus, Client, ErrorCode, OutboundMessage, Validated};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_past_max_age_expire_and_are_counted() {
    let config =
        "[classes.kv_events]\njetstream = true\nsubjects = [\"load.>\"]\nretention = \"2s\"\nmax_age = \"2s\"\n";
    let (mut nats, _relay, client) = outage_under_way(config).await;

    for index in 0..10 {
        client
            .publish("load.kv.old", format!("old:{index}"))
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // The relay's once-a-second sweep expires them 2 to 3 s from now.
    let kv_events = || async {
        let status = client.status().await.unwrap();
        status["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|class| class["name"] == "kv_events")
            .unwrap()
            .clone()
    };
    wait_until_async("the old messages expired", || async {
        kv_events().await["expired"] == 10
    })
    .await;
    for index in 0..10 {
        client
            .publish("load.kv.new", format!("new:{index}"))
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let kv = kv_events().await;
    assert_eq!(kv["expired"], 10, "{kv}");
    assert_eq!(kv["backlog_messages"], 10, "{kv}");

    nats.restart();
    let seen = read_captured(&nats.url(), 10).await;
    let payloads: Vec<&str> = seen.iter().map(|(_, payload)| payload.as_str()).collect();
    let expected: Vec<String> = (0..10).map(|index| format!("new:{index}")).collect();
    assert_eq!(payloads, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_rejects_new_publishes_and_keeps_what_it_accepted() {
    let config =
        "[classes.kv_events]\njetstream = true\nsubjects = [\"load.>\"]\nmax_bytes = 20000\n";
    let (mut nats, _relay, client) = outage_under_way(config).await;

    let mut accepted = Vec::new();
    let mut full = 0;
    for index in 0..1000 {
        let payload = format!("{index:0>100}");
        let ack = client
            .publish_with_ack(OutboundMessage::new("load.kv.x", payload.clone()))
            .await
            .unwrap()
            .await;
        match ack {
            Ok(ack) => {
                assert_eq!(ack.outcome, AckStatus::Journaled);
                accepted.push(payload);
            }
            Err(error) => {
                assert_eq!(error.code(), Some(ErrorCode::JournalFull), "{error}");
                assert!(error.is_retryable());
                full += 1;
            }
        }
    }
    assert!(
        full > 0 && !accepted.is_empty(),
        "{} accepted, {full} refused",
        accepted.len()
    );
    // Still serving: another class takes traffic, status answers.
    let ack = client
        .publish_with_ack(OutboundMessage::new("other.subject", "x").class("decode"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Queued);

    nats.restart();
    let seen = read_captured(&nats.url(), accepted.len()).await;
    let payloads: Vec<String> = seen.into_iter().map(|(_, payload)| payload).collect();
    assert_eq!(payloads, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_in_memory_during_an_outage_do_not_keep_their_read_buffers() {
    // kv_events refuses everything (its journal budget is 1 KiB), so each
    // large publish is let go at once, while the small prefill message read
    // along with it is held in memory until NATS returns.
    const PAIRS: usize = 16_000;
    let config = "[classes.kv_events]\nmax_bytes = 1024\n";
    let (mut nats, relay, client) = outage_under_way(config).await;
    let before = relay_rss_mib(&relay);
    let refused = Bytes::from(vec![b'r'; 8 * 1024]);
    let mut acks = Vec::with_capacity(PAIRS);
    for index in 0..PAIRS {
        let big = OutboundMessage::new("load.bulk", refused.clone()).class("kv_events");
        acks.push(client.publish_with_ack(big).await.unwrap());
        let held = OutboundMessage::new("load.held", format!("held:{index}")).class("prefill");
        client.publish_message(held).await.unwrap();
    }
    client.flush().await.unwrap();
    let grown = relay_rss_mib(&relay) - before;
    for ack in acks {
        let error = within("a refusal", ack).await.unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::JournalFull), "{error}");
    }
    // 125 MiB were read; what is held is 16k messages of about 40 bytes.
    assert!(grown < 40.0, "the relay grew by {grown:.0} MiB");

    nats.restart();
    let seen = read_captured(&nats.url(), PAIRS).await;
    let expected: Vec<(String, String)> = (0..PAIRS)
        .map(|index| ("load.held".to_string(), format!("held:{index}")))
        .collect();
    assert!(
        seen == expected,
        "the held messages did not arrive in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_forgotten_to_make_room_are_counted() {
    // The relay keeps the chains of 100,000 subjects; 30 more journaled
    // subjects make it forget the 30 least recently journaled.
    const SUBJECTS: usize = 100_030;
    let (_nats, relay, client) = outage_under_way("").await;
    for index in 0..SUBJECTS {
        let message = OutboundMessage::new(format!("load.s.{index}"), "x").class("kv_events");
        client.publish_message(message).await.unwrap();
    }
    within("the journal appends", client.flush()).await.unwrap();
    let metrics = scrape(&relay);
    assert_eq!(
        metric(&metrics, "holdfast_chain_evictions_total", &[]),
        Some(30.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journaled_message_nats_refuses_is_dropped_counted_and_does_not_block_the_rest() {
    // The relay has never reached NATS, so it cannot know max_payload and
    // journals a 2 MiB message that nats-server (1 MiB) will refuse.
    let mut nats = NatsServer::start_jetstream();
    capture_stream(&nats.url()).await;
    nats.kill();
    let relay = Relay::start(&nats.url());
    let client = Client::connect(&relay.url()).await.unwrap();
    for (subject, payload) in [
        ("load.kv.huge", vec![b'x'; 2 * 1024 * 1024]),
        ("load.kv.after", b"after".to_vec()),
    ] {
        let message = OutboundMessage::new(subject, payload).class("kv_events");
        let ack = client
            .publish_with_ack(message)
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.outcome, AckStatus::Journaled);
    }
    nats.restart();
    let seen = read_captured(&nats.url(), 1).await;
    assert_eq!(seen, [("load.kv.after".to_string(), "after".to_string())]);
    let dropped = || {
        metric(
            &scrape(&relay),
            "holdfast_messages_dropped_total",
            &[("reason", "nats_refused")],
        )
    };
    within("the drop is counted", async {
        while dropped() != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Once NATS is known, the same message is refused when published.
    let message =
        OutboundMessage::new("load.kv.huge", vec![b'x'; 2 * 1024 * 1024]).class("kv_events");
    let refused = client
        .publish_with_ack(message)
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_journal_is_quarantined_and_the_relay_starts() {
    let nats = NatsServer::start();
    let mut relay = Relay::start_with_config(&nats.url(), "");
    let client = Client::connect(&relay.url()).await.unwrap();
    // Put something in the journal so the file has real content.
    let ack = client
        .publish_with_ack(OutboundMessage::new("kv.x", "x").class("kv_events"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Journaled);
    drop(client);
    relay.kill();

    let journal = relay.data_dir().join("journal.redb");
    let length = std::fs::metadata(&journal).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    file.set_len(length / 2).unwrap();
    drop(file);

    relay.restart();
    let client = Client::connect(&relay.url()).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status["journal"]["quarantined_at_start"], true, "{status}");
    let quarantined = std::fs::read_dir(relay.data_dir())
        .unwrap()
        .filter_map(Result::ok)
        .any(|entry| entry.file_name().to_string_lossy().contains("quarantined"));
    assert!(quarantined, "the damaged file was not kept aside");
    let (_, metrics) = relay.http_get("/metrics");
    assert!(
        metrics.contains("holdfast_journal_quarantines_total 1"),
        "{metrics}"
    );
    // And it works.
    let ack = client
        .publish_with_ack(OutboundMessage::new("kv.y", "y").class("kv_events"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Journaled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_validation_reports_a_lost_or_reordered_message() {
    let config = "[classes.kv_events]\njetstream = true\nsubjects = [\"load.>\"]\n";
    let (mut nats, _relay, client) = outage_under_way(config).await;
    for index in 0..5 {
        client
            .publish("load.kv.chain", format!("c{index}"))
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    nats.restart();

    // The stamped copies as NATS received them, headers included.
    let url = nats.url();
    crate::support::wait_until_async("replayed into the stream", || async {
        crate::journal::captured_count(&url).await >= 5
    })
    .await;
    let stream = capture_stream(&nats.url()).await;
    let mut stamped = Vec::new();
    for sequence in 1..=5 {
        let message = within("captured", stream.get_raw_message(sequence))
            .await
            .unwrap();
        stamped.push(message);
    }

    // Replay them to a validating subscriber with #2 lost and #3/#4 swapped.
    let validating = client
        .subscribe("replayed.chain")
        .await
        .unwrap()
        .validate_chain();
    let direct = async_nats::connect(nats.url()).await.unwrap();
    for index in [0usize, 1, 3, 2, 4].into_iter().filter(|index| *index != 1) {
        let message = &stamped[index];
        direct
            .publish_with_headers(
                "replayed.chain",
                message.headers.clone(),
                message.payload.clone(),
            )
            .await
            .unwrap();
    }
    direct.flush().await.unwrap();
    let mut validating = validating;
    let mut breaks = Vec::new();
    let mut messages = 0;
    // Sent: seq 1, 4, 3, 5. Expected: seq 1; a Gap (2 missing) before 4;
    // 3 arriving late is a duplicate of the past and dropped; 5 follows 4.
    within("validated stream", async {
        while messages < 3 {
            match validating.next().await.unwrap() {
                Validated::Message(_) => messages += 1,
                Validated::Break(chain_break) => breaks.push(chain_break),
            }
        }
    })
    .await;
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    match &breaks[0] {
        holdfast_client::ChainBreak::Gap { expected, got, .. } => {
            assert_eq!((*expected, *got), (2, 4));
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(validating.duplicates(), 1);
}
