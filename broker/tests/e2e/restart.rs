//! The relay restarts: clients reconnect and their subscriptions come back;
//! SIGTERM is a clean, announced exit; a NATS client that cannot recover
//! makes the relay stop the same way and exit non-zero, for a restart.

use crate::support::{within, Stack};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{LinkEvent, OutboundMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_comes_back_and_subscriptions_work_again() {
    let mut stack = Stack::start();
    let client = stack.client().await;
    let mut events = client.link_events();
    let mut subscriber = client.subscribe("restart.>").await.unwrap();

    stack.relay.kill();
    stack.relay.restart();
    // Lost first, then connected again: a RelayConnected from the first
    // connection may still be in the channel.
    within("client reconnects", async {
        let mut lost = false;
        loop {
            match events.recv().await {
                Ok(LinkEvent::RelayLost { .. }) => lost = true,
                Ok(LinkEvent::RelayConnected { .. }) if lost => return,
                _ => {}
            }
        }
    })
    .await;
    // The re-subscription travels with the reconnect; a barrier makes sure
    // the relay has handed it to NATS.
    client.flush().await.unwrap();

    let nats = stack.direct_nats().await;
    nats.publish("restart.after", "again".into()).await.unwrap();
    nats.flush().await.unwrap();
    let message = within("delivery after relay restart", subscriber.next())
        .await
        .unwrap();
    assert_eq!(message.payload, Bytes::from("again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye_and_exits_zero() {
    let mut stack = Stack::start();
    let client = stack.client().await;
    let mut events = client.link_events();
    client.publish("bye.before", "x").await.unwrap();
    client.flush().await.unwrap();

    let status = stack.relay.terminate();
    assert!(status.success(), "holdfastd exited with {status}");
    within("client learns the relay left", async {
        loop {
            if let Ok(LinkEvent::RelayLost { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(!stack.relay.socket().exists(), "socket file left behind");
    let logs = stack.relay.logs();
    assert!(logs.contains("shutting down"), "{logs}");

    // A clean exit closes the journal: the next start does not check the
    // whole file as it must after a crash.
    stack.relay.restart();
    let logs = stack.relay.logs();
    assert!(!logs.contains("not closed cleanly"), "{logs}");
}

/// What any client of the cluster can send: an HPUB whose header value holds
/// a lone CR. nats-server forwards it as is, and async-nats 0.51's reader
/// panics on it (nats-io/nats.rs#1612), ending the relay's NATS connection
/// task for good.
pub fn publish_header_with_lone_cr(nats_url: &str, subject: &str) {
    use std::io::{BufRead, BufReader, Write};
    let address = nats_url.trim_start_matches("nats://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let header = "NATS/1.0\r\nX-Bad: a\rb\r\n\r\n";
    let payload = "hi";
    let frames = format!(
        "CONNECT {{\"verbose\":false,\"headers\":true}}\r\nHPUB {subject} {} {}\r\n{header}{payload}\r\nPING\r\n",
        header.len(),
        header.len() + payload.len()
    );
    stream.write_all(frames.as_bytes()).unwrap();
    // PONG: the server has taken the message.
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "nats-server refused: {line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_client_that_cannot_recover_stops_the_relay_for_a_restart() {
    const KEPT: usize = 200;
    // Probes 2 s apart: the relay notices the dead client at the next one,
    // and the publishes below must be taken before that even on a loaded
    // machine (at the default 250 ms a busy CI run saw none acknowledged).
    let mut stack =
        Stack::start_with_config("[nats]\nprobe_interval = \"2s\"\nlink_timeout = \"4s\"\n");
    let client = stack.client().await;
    let mut events = client.link_events();
    let mut subscriber = client.subscribe("poison.>").await.unwrap();
    client.flush().await.unwrap();
    let nats = stack.direct_nats().await;
    let mut plain = nats.subscribe("kept.>").await.unwrap();
    crate::support::nats_round_trip(&nats).await;

    // Clients' subscriptions are on the relay's own subscriber connection,
    // which survives such a message (see upstream_malformed.rs); the NATS
    // client still holds the link's probe subscription, so a message to
    // the probe subject is how someone who knows it can end that client.
    let relay_id = stack.relay.status()["relay_id"]
        .as_str()
        .expect("relay_id")
        .to_string();
    publish_header_with_lone_cr(&stack.nats.url(), &format!("_HOLDFAST.probe.{relay_id}"));
    // Publishes made while the NATS client is gone, before and while the
    // relay notices and stops: whatever it acknowledged must reach NATS
    // after the restart.
    let publisher = client.clone();
    let publishing = tokio::spawn(async move {
        let mut acks = Vec::with_capacity(KEPT);
        for index in 0..KEPT {
            let message = OutboundMessage::new(format!("kept.{index}"), format!("{index}"))
                .class("kv_events");
            acks.push((index, publisher.publish_with_ack(message).await));
        }
        acks
    });
    let status = stack.relay.wait_for_exit();
    assert!(!status.success(), "holdfastd exited with {status}");
    let logs = stack.relay.logs();
    assert!(
        logs.contains("connection task has ended") && logs.contains("shutting down"),
        "{logs}"
    );
    within("client learns the relay left", async {
        loop {
            if let Ok(LinkEvent::RelayLost { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;

    // What the supervisor does: start it again. The client reconnects and
    // its subscription works on the new NATS connection.
    stack.relay.restart();
    within("client reconnects", async {
        loop {
            if let Ok(LinkEvent::RelayConnected { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;
    client.flush().await.unwrap();
    nats.publish("poison.after", "fine again".into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    loop {
        let message = within("delivery after the restart", subscriber.next())
            .await
            .unwrap();
        // The poisoned message itself may or may not have been delivered.
        if message.subject.as_str() == "poison.after" {
            assert_eq!(message.payload, Bytes::from("fine again"));
            break;
        }
    }

    let mut acknowledged = std::collections::BTreeSet::new();
    for (index, ack) in within("the publishes after the poison", publishing)
        .await
        .unwrap()
    {
        let Ok(ack) = ack else { continue };
        if within("an ack", ack).await.is_ok() {
            acknowledged.insert(index);
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "no publish was acknowledged at all"
    );
    eprintln!(
        "{} of {KEPT} publishes made after the poison were acknowledged",
        acknowledged.len()
    );
    let mut seen = std::collections::BTreeSet::new();
    within("every acknowledged publish on NATS", async {
        while !acknowledged.is_subset(&seen) {
            let message = plain.next().await.unwrap();
            let index: usize = std::str::from_utf8(&message.payload)
                .unwrap()
                .parse()
                .unwrap();
            seen.insert(index);
        }
    })
    .await;
}
