//! A damaged journal against real nats-server and relay processes: bytes
//! flipped inside one message cost that message's row only (the rest is
//! replayed, and a validating subscriber sees the gap), and a file redb
//! cannot open is moved aside, salvaged with `holdfastd journal salvage`
//! and republished with `holdfast pub --from-salvage`.

use crate::cli::holdfast;
use crate::journal::{outage_under_way, DURABLE_CLASSES};
use crate::support::{metric, scrape, within};
use futures::StreamExt;
use holdfast_client::{AckStatus, ChainBreak, Client, OutboundMessage, Validated};
use std::path::Path;
use std::process::Command;

/// A payload naming its index, long enough to damage inside.
fn payload(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:04}:{}", "abcdefgh".repeat(12))
}

/// Publishes `count` durable messages one at a time (each its own commit,
/// so each its own journal row).
async fn publish_one_by_one(client: &Client, subject: &str, prefix: &str, count: usize) {
    for index in 0..count {
        let message = OutboundMessage::new(subject.to_string(), payload(prefix, index));
        let ack = client
            .publish_with_ack(message)
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.outcome, AckStatus::Journaled);
    }
}

/// Flips `len` bytes after every copy of `needle` in `path`, as a failing
/// disk would (redb keeps older copies of pages until it reuses them).
fn flip_after(path: &Path, needle: &[u8], len: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut copies = 0;
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
        let start = at + found + needle.len();
        for byte in &mut bytes[start..start + len] {
            *byte ^= 0xff;
        }
        copies += 1;
        at = start + len;
    }
    assert!(copies > 0, "{needle:?} not found in {}", path.display());
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_damaged_row_costs_only_its_message_and_the_chain_shows_the_gap() {
    let (mut nats, mut relay, client) = outage_under_way(DURABLE_CLASSES).await;
    publish_one_by_one(&client, "load.other.chain", "m", 500).await;
    drop(client);
    assert!(relay.terminate().success());
    let journal = relay.data_dir().join("journal.redb");
    // 64 bytes inside message 250 (chain sequence 251).
    flip_after(&journal, b"m0250:", 64);

    relay.restart();
    let client = Client::connect(&relay.url()).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status["journal"]["quarantined_at_start"], false, "{status}");
    let mut validated = client
        .subscribe("load.other.chain")
        .await
        .unwrap()
        .validate_chain();
    client.flush().await.unwrap();
    nats.restart();

    let mut received = Vec::new();
    let mut breaks = Vec::new();
    within("the 499 intact messages", async {
        while received.len() < 499 {
            match validated.next().await.unwrap() {
                Validated::Message(message) => {
                    received.push(String::from_utf8_lossy(&message.payload).into_owned())
                }
                Validated::Break(chain_break) => breaks.push(chain_break),
            }
        }
    })
    .await;
    let expected: Vec<String> = (0..500)
        .filter(|index| *index != 250)
        .map(|index| payload("m", index))
        .collect();
    assert_eq!(received, expected, "every intact message, in order");
    match breaks.as_slice() {
        [ChainBreak::Gap { expected, got, .. }] => assert_eq!((*expected, *got), (251, 252)),
        other => panic!("expected one gap before sequence 252, got {other:?}"),
    }

    let metrics = scrape(&relay);
    assert_eq!(
        metric(&metrics, "holdfast_journal_corrupt_rows_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    let logs = relay.logs();
    let line = logs
        .lines()
        .find(|line| line.contains("journal row damaged"))
        .unwrap_or_else(|| panic!("no log line for the damaged row:\n{logs}"));
    assert!(
        line.contains("default") && line.contains("first_seq=251"),
        "{line}"
    );
    assert!(!logs.contains("moved it aside"), "{logs}");
    within("the backlog trimmed, the damaged row with it", async {
        loop {
            let status = client.status().await.unwrap();
            if status["classes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|class| class["backlog_messages"] == 0)
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_aside_journal_is_salvaged_and_republished() {
    let (mut nats, mut relay, client) = outage_under_way(DURABLE_CLASSES).await;
    publish_one_by_one(&client, "load.other.salvage", "s", 40).await;
    drop(client);
    assert!(relay.terminate().success());
    let data_dir = relay.data_dir();
    let journal = data_dir.join("journal.redb");
    // redb's own header destroyed: it cannot open the file, so the relay
    // sets it aside; and one message damaged as well.
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes[..512].fill(0xa5);
    std::fs::write(&journal, bytes).unwrap();
    flip_after(&journal, b"s0007:", 16);

    relay.restart();
    let client = Client::connect(&relay.url()).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status["journal"]["quarantined_at_start"], true, "{status}");

    let out = data_dir.join("salvaged.jsonl");
    let salvage = Command::new(env!("CARGO_BIN_EXE_holdfastd"))
        .args(["journal", "salvage", "--data-dir"])
        .arg(&data_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&salvage.stdout);
    assert!(salvage.status.success(), "{salvage:?}");
    assert!(
        report.contains("wrote 39 messages") && report.contains("1 damaged rows"),
        "{report}"
    );
    let first_line = std::fs::read_to_string(&out).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(first_line.lines().next().unwrap()).unwrap();
    assert_eq!(first["class"], "default", "{first}");
    assert_eq!(first["sequence"], 1, "{first}");
    assert_eq!(first["subject"], "load.other.salvage", "{first}");

    let mut subscriber = client.subscribe("load.other.salvage").await.unwrap();
    client.flush().await.unwrap();
    nats.restart();
    let republish = Command::new(holdfast())
        .args(["pub", "--from-salvage"])
        .arg(&out)
        .env("HOLDFAST_URL", relay.url())
        .output()
        .unwrap();
    assert!(republish.status.success(), "{republish:?}");
    let summary = String::from_utf8_lossy(&republish.stderr);
    assert!(
        summary.contains("published 39 messages") && summary.contains("0 failed"),
        "{summary}"
    );
    let mut received = Vec::new();
    within("the salvaged messages", async {
        while received.len() < 39 {
            let message = subscriber.next().await.unwrap();
            received.push(String::from_utf8_lossy(&message.payload).into_owned());
        }
    })
    .await;
    let expected: Vec<String> = (0..40)
        .filter(|index| *index != 7)
        .map(|index| payload("s", index))
        .collect();
    assert_eq!(received, expected);
    drop(relay);
}
