//! The relay restarts: clients reconnect and their subscriptions come back;
//! SIGTERM is a clean, announced exit.

use crate::support::{within, Stack};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::LinkEvent;

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
