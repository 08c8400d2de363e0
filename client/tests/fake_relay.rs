//! The client library against a scripted stand-in for holdfastd
//! (`support::FakeRelay`): handshake, reconnect, desired-state replay
//! (subscriptions, registrations, watches), ack and error mapping,
//! discovery answers and watch streams. No NATS or etcd is involved.

mod support;

use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{
    AckStatus, Client, ConnectOptions, Entry, Error, ErrorCode, LinkEvent, OfflinePolicy,
    OutboundMessage, RegistrationStatus, RelayUrl, TlsError, WatchEvent, Watcher,
};
use holdfast_wire as wire;
use holdfast_wire::{
    AckOutcome, ErrorFrame, Frame, GoAway, LinkStatus, Message, Pong, PubAck, Publish, Response,
    ResponseOutcome, StatusResponse, Text, DEFAULT_MAX_FRAME_BYTES,
};
use std::time::Duration;
use support::{within, FakeRelay, RelayConnection};
use tokio::sync::broadcast;

async fn connect(
    relay: &FakeRelay,
    options: ConnectOptions,
    instance_id: u64,
) -> (Client, RelayConnection) {
    let (client, (connection, hello)) = tokio::join!(
        within("connect", Client::connect_with(options)),
        relay.accept_session(instance_id)
    );
    assert_eq!(
        hello.instance_id, 0,
        "a new process asks for an instance id"
    );
    assert_eq!(hello.client_name, "fake-relay-test");
    (client.unwrap(), connection)
}

async fn wait_for_event(
    events: &mut broadcast::Receiver<LinkEvent>,
    wanted: impl Fn(&LinkEvent) -> bool,
) -> LinkEvent {
    within("a link event", async {
        loop {
            let event = events.recv().await.unwrap();
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
}

fn payload_text(publish: &Publish) -> &str {
    std::str::from_utf8(&publish.payload).unwrap()
}

#[tokio::test]
async fn reconnect_keeps_identity_and_replays_subscriptions_then_buffered_publishes_in_order() {
    let relay = FakeRelay::start();
    let (client, mut first) = connect(&relay, relay.options(), 77).await;
    assert_eq!(client.instance_id(), 77);
    assert_eq!(client.nats_status(), LinkStatus::Up);

    let (subscriber, subscribe) = tokio::join!(
        within("subscribe", client.subscribe("jobs.>")),
        first.accept_subscribe()
    );
    let mut subscriber = subscriber.unwrap();
    assert_eq!(subscribe.subject, "jobs.>");
    assert_eq!(subscribe.sid, subscriber.sid());

    let mut events = client.link_events();
    drop(first);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;
    assert!(!client.is_connected());
    assert_eq!(client.nats_status(), LinkStatus::Unknown);

    // The client is reconnecting in the background; nobody accepts yet, so
    // these go to the offline buffer.
    client.publish("jobs.a", "1").await.unwrap();
    client
        .publish_message(OutboundMessage::new("jobs.b", "2").class("prefill"))
        .await
        .unwrap();
    let ack = within(
        "enqueueing an acked publish",
        client.publish_with_ack(OutboundMessage::new("jobs.c", "3")),
    )
    .await
    .unwrap();

    let (mut second, hello) = relay.accept_session(77).await;
    assert_eq!(
        hello.instance_id, 77,
        "a reconnect keeps the assigned identity"
    );

    match second.recv_answering_pings().await {
        Frame::Subscribe(resubscribe) => {
            assert_eq!(resubscribe.sid, subscribe.sid);
            assert_eq!(resubscribe.subject, "jobs.>");
            assert_eq!(resubscribe.queue_group, None);
        }
        other => panic!("expected the subscription first, got {other:?}"),
    }
    let one = second.recv_publish().await;
    let two = second.recv_publish().await;
    let three = second.recv_publish().await;
    assert_eq!(
        [payload_text(&one), payload_text(&two), payload_text(&three)],
        ["1", "2", "3"]
    );
    assert_eq!(one.ack_id, 0);
    assert_eq!(two.class.as_deref(), Some("prefill"));
    assert_ne!(three.ack_id, 0);

    second
        .send(Frame::PubAck(PubAck {
            ack_id: three.ack_id,
            outcome: AckOutcome::Journaled,
            local_deliveries: 0,
        }))
        .await;
    let ack = within("the ack of a buffered publish", ack).await.unwrap();
    assert_eq!(ack.outcome, AckStatus::Journaled);

    let connected = wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayConnected { .. })
    })
    .await;
    assert_eq!(
        connected,
        LinkEvent::RelayConnected {
            relay_id: "fake-relay".into(),
            session_id: 1077
        }
    );

    // The restored subscription delivers on the new connection.
    second
        .send(Frame::Message(Message {
            sid: subscribe.sid,
            subject: Text::from("jobs.x"),
            reply: None,
            headers: Default::default(),
            payload: Bytes::from_static(b"after reconnect"),
        }))
        .await;
    let delivered = within("a message on the restored subscription", subscriber.next())
        .await
        .unwrap();
    assert_eq!(delivered.subject, "jobs.x");
    assert_eq!(delivered.payload, "after reconnect");
}

#[tokio::test]
async fn publish_with_ack_maps_every_outcome() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;

    let mut acks = Vec::new();
    for subject in [
        "a.forwarded",
        "a.journaled",
        "a.queued",
        "a.outage",
        "a.badclass",
    ] {
        acks.push(
            client
                .publish_with_ack(OutboundMessage::new(subject, "x"))
                .await
                .unwrap(),
        );
    }
    let mut ack_ids = Vec::new();
    for _ in 0..5 {
        ack_ids.push(connection.recv_publish().await.ack_id);
    }
    let outcomes = [
        (AckOutcome::Forwarded, 0),
        (AckOutcome::Journaled, 0),
        (AckOutcome::Queued, 2),
        (
            AckOutcome::Rejected {
                code: ErrorCode::NatsUnavailable,
                message: Text::from("nats is down and class has no journal"),
            },
            0,
        ),
        (
            AckOutcome::Rejected {
                code: ErrorCode::UnknownClass,
                message: Text::from("no class `x`"),
            },
            0,
        ),
    ];
    // Answered out of order: acks are matched by id, not position.
    for (ack_id, (outcome, local_deliveries)) in ack_ids.iter().zip(outcomes).rev() {
        connection
            .send(Frame::PubAck(PubAck {
                ack_id: *ack_id,
                outcome,
                local_deliveries,
            }))
            .await;
    }
    let mut results = Vec::new();
    for ack in acks {
        results.push(within("an ack", ack).await);
    }
    let forwarded = results[0].as_ref().unwrap();
    assert_eq!(forwarded.outcome, AckStatus::Forwarded);
    assert_eq!(results[1].as_ref().unwrap().outcome, AckStatus::Journaled);
    let queued = results[2].as_ref().unwrap();
    assert_eq!(queued.outcome, AckStatus::Queued);
    assert_eq!(queued.local_deliveries, 2);

    let outage = results[3].as_ref().unwrap_err();
    assert_eq!(outage.code(), Some(ErrorCode::NatsUnavailable));
    assert!(outage.is_retryable());
    assert!(matches!(outage, Error::Relay { message, .. } if message.contains("nats is down")));

    let bad_class = results[4].as_ref().unwrap_err();
    assert_eq!(bad_class.code(), Some(ErrorCode::UnknownClass));
    assert!(!bad_class.is_retryable());
}

#[tokio::test]
async fn subscribe_fails_when_the_relay_reports_an_error_before_the_pong() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;

    let relay_side = async {
        let subscribe = match connection.recv().await {
            Frame::Subscribe(subscribe) => subscribe,
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        };
        let nonce = match connection.recv().await {
            Frame::Ping(ping) => ping.nonce,
            other => panic!("expected PING, got {other:?}"),
        };
        connection
            .send(Frame::Error(ErrorFrame {
                code: ErrorCode::LimitExceeded,
                reference: u64::from(subscribe.sid),
                message: Text::from("too many subscriptions"),
            }))
            .await;
        connection.send(Frame::Pong(Pong { nonce })).await;
    };
    let (subscribed, ()) = tokio::join!(
        within("subscribe", client.queue_subscribe("work.>", "workers")),
        relay_side
    );
    let error = subscribed.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::LimitExceeded));
    assert!(!error.is_retryable());

    // The refused subscription is not desired state: the next subscription
    // works and is the only one the relay hears about.
    let (second, subscribe) = tokio::join!(
        within("second subscribe", client.subscribe("other")),
        connection.accept_subscribe()
    );
    assert_eq!(second.unwrap().sid(), subscribe.sid);
}

#[tokio::test]
async fn fail_fast_policy_fails_operations_while_disconnected() {
    let relay = FakeRelay::start();
    let options = relay.options().offline_policy(OfflinePolicy::FailFast);
    let (client, connection) = connect(&relay, options, 1).await;
    let mut events = client.link_events();
    drop(connection);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;

    assert!(matches!(
        client.publish("a.b", "x").await,
        Err(Error::RelayUnavailable)
    ));
    assert!(matches!(
        client
            .publish_with_ack(OutboundMessage::new("a.b", "x"))
            .await,
        Err(Error::RelayUnavailable)
    ));
    assert!(matches!(
        client.request("a.b", "x").await,
        Err(Error::RelayUnavailable)
    ));
    assert!(matches!(client.flush().await, Err(Error::RelayUnavailable)));
    assert!(Error::RelayUnavailable.is_retryable());
}

#[tokio::test]
async fn offline_buffer_is_bounded() {
    let relay = FakeRelay::start();
    let options = relay.options().offline_policy(OfflinePolicy::Buffer {
        max_messages: 2,
        max_bytes: 1024 * 1024,
    });
    let (client, connection) = connect(&relay, options, 1).await;
    let mut events = client.link_events();
    drop(connection);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;

    client.publish("a.b", "1").await.unwrap();
    let acked = client
        .publish_with_ack(OutboundMessage::new("a.b", "2"))
        .await
        .unwrap();
    assert!(matches!(
        client.publish("a.b", "3").await,
        Err(Error::BufferFull)
    ));
    assert!(matches!(
        client
            .publish_with_ack(OutboundMessage::new("a.b", "4"))
            .await,
        Err(Error::BufferFull)
    ));

    // What was accepted is delivered after reconnecting, and nothing else.
    let (mut connection, _) = relay.accept_session(1).await;
    assert_eq!(payload_text(&connection.recv_publish().await), "1");
    let second = connection.recv_publish().await;
    assert_eq!(payload_text(&second), "2");
    connection
        .send(Frame::PubAck(PubAck {
            ack_id: second.ack_id,
            outcome: AckOutcome::Forwarded,
            local_deliveries: 0,
        }))
        .await;
    assert_eq!(
        within("ack", acked).await.unwrap().outcome,
        AckStatus::Forwarded
    );
    let (flushed, ()) = tokio::join!(within("flush", client.flush()), async {
        match connection.recv().await {
            Frame::Ping(ping) => {
                connection
                    .send(Frame::Pong(Pong { nonce: ping.nonce }))
                    .await
            }
            other => panic!("expected only the flush PING, got {other:?}"),
        }
    });
    flushed.unwrap();
}

#[tokio::test]
async fn acks_outstanding_when_the_connection_dies_fail_with_connection_lost() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;
    let ack = client
        .publish_with_ack(OutboundMessage::new("a.b", "x"))
        .await
        .unwrap();
    connection.recv_publish().await;
    drop(connection);
    let error = within("the ack", ack).await.unwrap_err();
    assert!(matches!(error, Error::ConnectionLost));
    assert!(error.is_retryable());
}

#[tokio::test]
async fn requests_get_replies_and_relay_failures() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;

    let relay_side = async {
        let request = match connection.recv().await {
            Frame::Request(request) => request,
            other => panic!("expected REQUEST, got {other:?}"),
        };
        assert_eq!(request.timeout_ms, 750);
        assert_eq!(request.payload, "question");
        connection
            .send(Frame::Response(Response {
                request_id: request.request_id,
                outcome: ResponseOutcome::Reply {
                    headers: Default::default(),
                    payload: Bytes::from_static(b"answer"),
                },
            }))
            .await;
        let request = match connection.recv().await {
            Frame::Request(request) => request,
            other => panic!("expected REQUEST, got {other:?}"),
        };
        connection
            .send(Frame::Response(Response {
                request_id: request.request_id,
                outcome: ResponseOutcome::Failed {
                    code: ErrorCode::NoResponders,
                    message: Text::from("nobody listens on svc.none"),
                },
            }))
            .await;
    };
    let requests = async {
        let reply = client
            .request_with(
                "svc.echo",
                Default::default(),
                "question",
                Duration::from_millis(750),
            )
            .await;
        let failure = client.request("svc.none", "question").await;
        (reply, failure)
    };
    let ((reply, failure), ()) = tokio::join!(within("requests", requests), relay_side);
    assert_eq!(reply.unwrap().payload, "answer");
    let failure = failure.unwrap_err();
    assert_eq!(failure.code(), Some(ErrorCode::NoResponders));
    assert!(failure.is_retryable());
}

#[tokio::test]
async fn status_returns_the_relay_document() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;
    let relay_side = async {
        let request_id = match connection.recv().await {
            Frame::StatusRequest(request) => request.request_id,
            other => panic!("expected STATUS_REQUEST, got {other:?}"),
        };
        connection
            .send(Frame::StatusResponse(StatusResponse {
                request_id,
                json: Bytes::from_static(br#"{"relay_id":"fake-relay","sessions":1}"#),
            }))
            .await;
    };
    let (status, ()) = tokio::join!(within("status", client.status()), relay_side);
    let status = status.unwrap();
    assert_eq!(status["relay_id"], "fake-relay");
    assert_eq!(status["sessions"], 1);
}

#[tokio::test]
async fn connect_fails_clearly_without_a_relay_unless_asked_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.sock");
    let url = RelayUrl::Unix { path: path.clone() };

    let error = Client::connect(&url.to_string()).await.unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert!(error.to_string().contains("later.sock"));

    // QUIC without a CA cannot check the relay: a configuration error, not
    // a connection attempt.
    let quic = Client::connect("quic://relay.local:4433")
        .await
        .unwrap_err();
    assert!(matches!(quic, Error::Tls(TlsError::MissingCa)), "{quic:?}");
    assert!(!quic.is_retryable());

    // With retries the client comes up disconnected, buffers, and connects
    // once the relay appears.
    let options = ConnectOptions::new(url)
        .client_name("fake-relay-test")
        .ping_interval(Duration::from_secs(60))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .retry_initial_connect(true);
    let client = within("connect with retries", Client::connect_with(options))
        .await
        .unwrap();
    assert!(!client.is_connected());
    assert_eq!(client.instance_id(), 0);
    client.publish("early.bird", "first").await.unwrap();

    let relay = FakeRelay::bind(dir, path);
    let (mut connection, hello) = relay.accept_session(5).await;
    assert_eq!(hello.instance_id, 0);
    assert_eq!(payload_text(&connection.recv_publish().await), "first");
    assert_eq!(client.instance_id(), 5);
}

#[tokio::test]
async fn unanswered_pings_make_the_client_reconnect() {
    let relay = FakeRelay::start();
    let options = relay
        .options()
        .ping_interval(Duration::from_millis(20))
        .pong_timeout(Duration::from_millis(200));
    let (client, mut silent) = connect(&relay, options, 9).await;
    let mut events = client.link_events();
    // Read (so the client is not blocked on writing) but never answer.
    let drain = tokio::spawn(async move { while silent.framed.next().await.is_some() {} });
    let lost = wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;
    assert!(matches!(lost, LinkEvent::RelayLost { reason } if reason.contains("PONG")));
    let (_connection, hello) = relay.accept_session(9).await;
    assert_eq!(hello.instance_id, 9);
    drain.abort();
}

#[tokio::test]
async fn go_away_and_link_state_are_reported() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 3).await;
    let mut events = client.link_events();
    connection
        .send(Frame::LinkState(holdfast_wire::LinkState {
            service: holdfast_wire::Service::Nats,
            status: LinkStatus::Down,
        }))
        .await;
    let event = wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::Upstream { .. })
    })
    .await;
    assert_eq!(
        event,
        LinkEvent::Upstream {
            service: holdfast_wire::Service::Nats,
            status: LinkStatus::Down
        }
    );
    assert_eq!(client.nats_status(), LinkStatus::Down);

    connection
        .send(Frame::GoAway(GoAway {
            code: ErrorCode::ShuttingDown,
            message: Text::from("relay restarting"),
        }))
        .await;
    let lost = wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;
    assert!(matches!(lost, LinkEvent::RelayLost { reason } if reason.contains("shutting_down")));
    let (_connection, hello) = relay.accept_session(3).await;
    assert_eq!(hello.instance_id, 3);
}

#[tokio::test]
async fn a_slow_subscriber_loses_messages_without_stalling_the_connection() {
    let relay = FakeRelay::start();
    let options = relay.options().subscription_capacity(2);
    let (client, mut connection) = connect(&relay, options, 1).await;
    let (subscriber, subscribe) = tokio::join!(
        within("subscribe", client.subscribe("firehose")),
        connection.accept_subscribe()
    );
    let mut subscriber = subscriber.unwrap();
    for index in 0..10u8 {
        connection
            .send(Frame::Message(Message {
                sid: subscribe.sid,
                subject: Text::from("firehose"),
                reply: None,
                headers: Default::default(),
                payload: Bytes::from(vec![index]),
            }))
            .await;
    }
    // The flush's PONG is read after the ten messages, so they have all
    // been dispatched once it returns: the connection was never blocked.
    let (flushed, ()) = tokio::join!(within("flush", client.flush()), async {
        match connection.recv().await {
            Frame::Ping(ping) => {
                connection
                    .send(Frame::Pong(Pong { nonce: ping.nonce }))
                    .await
            }
            other => panic!("expected PING, got {other:?}"),
        }
    });
    flushed.unwrap();
    assert_eq!(subscriber.dropped(), 8);
    assert_eq!(
        within("first", subscriber.next()).await.unwrap().payload,
        vec![0u8]
    );
    assert_eq!(
        within("second", subscriber.next()).await.unwrap().payload,
        vec![1u8]
    );
}

#[tokio::test]
async fn dropping_a_subscriber_unsubscribes() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;
    let (subscriber, subscribe) = tokio::join!(
        within("subscribe", client.subscribe("drop.me")),
        connection.accept_subscribe()
    );
    drop(subscriber.unwrap());
    match connection.recv_answering_pings().await {
        Frame::Unsubscribe(unsubscribe) => assert_eq!(unsubscribe.sid, subscribe.sid),
        other => panic!("expected UNSUBSCRIBE, got {other:?}"),
    }
    // Closing flushes first: answer its PING, then see the connection end.
    let (closed, ()) = tokio::join!(within("close", client.close()), async {
        while let Some(Ok(frame)) = connection.framed.next().await {
            if let Frame::Ping(ping) = frame {
                connection
                    .send(Frame::Pong(Pong { nonce: ping.nonce }))
                    .await;
            }
        }
    });
    closed.unwrap();
    assert!(matches!(
        client.publish("a.b", "x").await,
        Err(Error::Closed)
    ));
}

#[tokio::test]
async fn invalid_subjects_are_rejected_locally() {
    let relay = FakeRelay::start();
    let (client, _connection) = connect(&relay, relay.options(), 1).await;
    let error = client.publish("a.*", "x").await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::InvalidSubject));
    assert!(!error.is_retryable());
    assert!(client.subscribe("a..b").await.is_err());
}

#[tokio::test]
async fn every_frame_of_a_large_burst_is_delivered() {
    const BURST: usize = 10_000;
    let relay = FakeRelay::start();
    let options = relay.options().subscription_capacity(BURST);
    let (client, mut connection) = connect(&relay, options, 1).await;
    let (subscriber, subscribe) = tokio::join!(
        within("subscribe", client.subscribe("burst")),
        connection.accept_subscribe()
    );
    let mut subscriber = subscriber.unwrap();
    // One buffer, so the client decodes far more frames per read than it
    // handles per turn.
    let mut burst = bytes::BytesMut::new();
    for index in 0..BURST {
        let frame = Frame::Message(Message {
            sid: subscribe.sid,
            subject: Text::from("burst"),
            reply: None,
            headers: Default::default(),
            payload: Bytes::from(index.to_string()),
        });
        holdfast_wire::encode(&frame, DEFAULT_MAX_FRAME_BYTES, &mut burst).unwrap();
    }
    tokio::io::AsyncWriteExt::write_all(connection.framed.get_mut(), &burst)
        .await
        .unwrap();
    for index in 0..BURST {
        let message = within("a burst message", subscriber.next()).await.unwrap();
        assert_eq!(message.payload, index.to_string());
    }
    assert_eq!(subscriber.dropped(), 0);
}

#[tokio::test]
async fn relay_errors_for_fire_and_forget_publishes_become_events() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;
    let mut events = client.link_events();
    client.publish("a.b", "x").await.unwrap();
    assert_eq!(connection.recv_publish().await.ack_id, 0);
    connection
        .send(Frame::Error(ErrorFrame {
            code: ErrorCode::JournalFull,
            reference: 0,
            message: Text::from("class default is over budget"),
        }))
        .await;
    let event = wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayError { .. })
    })
    .await;
    assert_eq!(
        event,
        LinkEvent::RelayError {
            code: ErrorCode::JournalFull,
            message: "class default is over budget".into()
        }
    );
}

#[tokio::test]
async fn a_relay_error_for_a_live_subscription_ends_its_stream_with_the_reason() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;
    let (subscriber, subscribe) = tokio::join!(
        within("subscribe", client.subscribe("secrets.>")),
        connection.accept_subscribe()
    );
    let mut subscriber = subscriber.unwrap();
    // A slow-consumer report is a warning: the subscription stays.
    connection
        .send(Frame::Error(ErrorFrame {
            code: ErrorCode::SlowConsumer,
            reference: u64::from(subscribe.sid),
            message: Text::from("dropped 12 messages"),
        }))
        .await;
    connection
        .send(Frame::Error(ErrorFrame {
            code: ErrorCode::Unauthorized,
            reference: u64::from(subscribe.sid),
            message: Text::from("permission revoked"),
        }))
        .await;
    assert!(within("the stream to end", subscriber.next())
        .await
        .is_none());
    let reason = subscriber.termination().unwrap();
    assert_eq!(reason.code(), Some(ErrorCode::Unauthorized));
    assert!(!reason.is_retryable());
}

// --------------------------------------------------------------------------
// Registrations, discovery and the etcd link.

fn bytes(text: &'static str) -> Bytes {
    Bytes::from_static(text.as_bytes())
}

async fn send_watch_event(
    connection: &mut RelayConnection,
    watch_id: u32,
    revision: u64,
    kind: wire::WatchEventKind,
    key: &'static str,
    value: &'static str,
) {
    connection
        .send(Frame::WatchEvent(wire::WatchEvent {
            watch_id,
            revision,
            kind,
            key: bytes(key),
            value: bytes(value),
        }))
        .await;
}

async fn next_event(watcher: &mut Watcher) -> WatchEvent {
    within("a watch event", watcher.next())
        .await
        .expect("the watch ended")
}

fn put(key: &'static str, value: &'static str, revision: u64) -> WatchEvent {
    WatchEvent::Put {
        key: bytes(key),
        value: bytes(value),
        revision,
    }
}

#[tokio::test]
async fn register_and_deregister_return_the_relays_outcome() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;

    let outcomes = [
        (
            "svc/applied",
            wire::RegistrationOutcome::Applied,
            RegistrationStatus::Applied,
        ),
        (
            "svc/buffered",
            wire::RegistrationOutcome::Buffered,
            RegistrationStatus::Buffered,
        ),
    ];
    for (key, outcome, expected) in outcomes {
        let relay_side = async {
            let register = connection.recv_register().await;
            assert_eq!(register.key, key);
            assert_eq!(register.value, "10.0.0.1:9000");
            connection
                .ack_registration(register.request_id, outcome)
                .await;
        };
        let (registered, ()) = tokio::join!(
            within("register", client.register(key, "10.0.0.1:9000")),
            relay_side
        );
        assert_eq!(registered.unwrap(), expected);
    }

    let relay_side = async {
        let register = connection.recv_register().await;
        connection
            .ack_registration(
                register.request_id,
                wire::RegistrationOutcome::Rejected {
                    code: ErrorCode::Unauthorized,
                    message: Text::from("svc/ is not yours"),
                },
            )
            .await;
    };
    let (refused, ()) = tokio::join!(
        within("register", client.register("svc/refused", "x")),
        relay_side
    );
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized));
    assert!(!refused.is_retryable());
    assert!(refused.to_string().contains("not yours"));

    let relay_side = async {
        let deregister = match connection.recv_answering_pings().await {
            Frame::Deregister(deregister) => deregister,
            other => panic!("expected DEREGISTER, got {other:?}"),
        };
        assert_eq!(deregister.key, "svc/applied");
        connection
            .ack_registration(deregister.request_id, wire::RegistrationOutcome::Applied)
            .await;
    };
    let (deregistered, ()) = tokio::join!(
        within("deregister", client.deregister("svc/applied")),
        relay_side
    );
    assert_eq!(deregistered.unwrap(), RegistrationStatus::Applied);

    let empty = client.register("", "x").await.unwrap_err();
    assert!(matches!(empty, Error::InvalidKey { .. }));
    assert!(!empty.is_retryable());
}

#[tokio::test]
async fn registrations_while_the_relay_is_away_are_buffered_and_sent_on_reconnect() {
    let relay = FakeRelay::start();
    let (client, mut first) = connect(&relay, relay.options(), 21).await;

    // In flight when the connection dies: still desired, so `Buffered`.
    let in_flight = async {
        let register = first.recv_register().await;
        assert_eq!(register.key, "svc/early");
        drop(first);
    };
    let (early, ()) = tokio::join!(
        within("register", client.register("svc/early", "1")),
        in_flight
    );
    assert_eq!(early.unwrap(), RegistrationStatus::Buffered);
    assert!(!client.is_connected());

    // Nobody accepts yet: answered at once, without the relay.
    let late = within("offline register", client.register("svc/late", "2"))
        .await
        .unwrap();
    assert_eq!(late, RegistrationStatus::Buffered);
    let gone = within("offline deregister", client.deregister("svc/gone"))
        .await
        .unwrap();
    assert_eq!(gone, RegistrationStatus::Buffered);

    let (mut second, hello) = relay.accept_session(21).await;
    assert_eq!(hello.instance_id, 21);
    let mut replayed = Vec::new();
    for _ in 0..2 {
        let register = second.recv_register().await;
        replayed.push((register.key.clone(), register.value.clone()));
        second
            .ack_registration(register.request_id, wire::RegistrationOutcome::Applied)
            .await;
    }
    replayed.sort();
    assert_eq!(
        replayed,
        vec![
            (bytes("svc/early"), bytes("1")),
            (bytes("svc/late"), bytes("2"))
        ]
    );
}

#[tokio::test]
async fn reconnect_sends_the_same_instance_id_then_live_registrations_then_watches_then_subscriptions(
) {
    let relay = FakeRelay::start();
    let (client, mut first) = connect(&relay, relay.options(), 42).await;
    assert_eq!(client.instance_id(), 42);

    for (key, value) in [("svc/a", "1"), ("svc/b", "2"), ("svc/a", "3")] {
        let relay_side = async {
            let register = first.recv_register().await;
            first
                .ack_registration(register.request_id, wire::RegistrationOutcome::Applied)
                .await;
        };
        let (registered, ()) =
            tokio::join!(within("register", client.register(key, value)), relay_side);
        registered.unwrap();
    }
    let relay_side = async {
        let request_id = match first.recv_answering_pings().await {
            Frame::Deregister(deregister) => deregister.request_id,
            other => panic!("expected DEREGISTER, got {other:?}"),
        };
        first
            .ack_registration(request_id, wire::RegistrationOutcome::Applied)
            .await;
    };
    let (deregistered, ()) =
        tokio::join!(within("deregister", client.deregister("svc/b")), relay_side);
    deregistered.unwrap();

    let (watcher, watch) = tokio::join!(
        within("watch", client.watch("workers/")),
        first.accept_watch()
    );
    let _watcher = watcher.unwrap();
    assert!(watch.send_initial);
    let (subscriber, subscribe) = tokio::join!(
        within("subscribe", client.subscribe("jobs.>")),
        first.accept_subscribe()
    );
    let _subscriber = subscriber.unwrap();

    let mut events = client.link_events();
    drop(first);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;

    let (mut second, hello) = relay.accept_session(42).await;
    assert_eq!(hello.instance_id, 42, "a reconnect keeps the identity");
    let register = second.recv_register().await;
    assert_eq!(
        (register.key, register.value),
        (bytes("svc/a"), bytes("3")),
        "only the live key, with its current value"
    );
    match second.recv_answering_pings().await {
        Frame::Watch(rewatch) => {
            assert_eq!(rewatch.watch_id, watch.watch_id);
            assert_eq!(rewatch.prefix, "workers/");
            assert!(rewatch.send_initial);
        }
        other => panic!("expected the watch after the registrations, got {other:?}"),
    }
    match second.recv_answering_pings().await {
        Frame::Subscribe(resubscribe) => assert_eq!(resubscribe.sid, subscribe.sid),
        other => panic!("expected the subscription after the watch, got {other:?}"),
    }
    // Nothing else: in particular no REGISTER for the deregistered key.
    let (flushed, ()) = tokio::join!(within("flush", client.flush()), async {
        match second.recv().await {
            Frame::Ping(ping) => second.send(Frame::Pong(Pong { nonce: ping.nonce })).await,
            other => panic!("expected only the flush PING, got {other:?}"),
        }
    });
    flushed.unwrap();
}

#[tokio::test]
async fn a_replayed_registration_the_relay_refuses_is_reported_and_dropped() {
    let relay = FakeRelay::start();
    let (client, first) = connect(&relay, relay.options(), 8).await;
    let mut events = client.link_events();
    drop(first);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;
    client.register("svc/x", "1").await.unwrap();

    let (mut second, _) = relay.accept_session(8).await;
    let register = second.recv_register().await;
    second
        .ack_registration(
            register.request_id,
            wire::RegistrationOutcome::Rejected {
                code: ErrorCode::LimitExceeded,
                message: Text::from("too many keys"),
            },
        )
        .await;
    let event = wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayError { .. })
    })
    .await;
    assert!(
        matches!(&event, LinkEvent::RelayError { code: ErrorCode::LimitExceeded, message } if message.contains("svc/x")),
        "{event:?}"
    );

    // Not desired state any more: the next session does not get it.
    drop(second);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;
    let (mut third, _) = relay.accept_session(8).await;
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayConnected { .. })
    })
    .await;
    let (flushed, ()) = tokio::join!(within("flush", client.flush()), async {
        match third.recv().await {
            Frame::Ping(ping) => third.send(Frame::Pong(Pong { nonce: ping.nonce })).await,
            other => panic!("expected only the flush PING, got {other:?}"),
        }
    });
    flushed.unwrap();
}

#[tokio::test]
async fn get_decodes_snapshots_and_maps_failures() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;

    let relay_side = async {
        let get = match connection.recv().await {
            Frame::Get(get) => get,
            other => panic!("expected GET, got {other:?}"),
        };
        assert!(!get.linearizable);
        assert_eq!(get.prefix, "workers/");
        connection
            .send(Frame::GetResponse(wire::GetResponse {
                request_id: get.request_id,
                outcome: wire::GetOutcome::Snapshot(wire::Snapshot {
                    revision: 42,
                    stale: true,
                    age_ms: 1500,
                    entries: vec![
                        wire::KeyValue {
                            key: bytes("workers/a"),
                            value: bytes("10.0.0.1"),
                        },
                        wire::KeyValue {
                            key: bytes("workers/b"),
                            value: bytes("10.0.0.2"),
                        },
                    ],
                }),
            }))
            .await;
        let get = match connection.recv().await {
            Frame::Get(get) => get,
            other => panic!("expected GET, got {other:?}"),
        };
        assert!(get.linearizable);
        connection
            .send(Frame::GetResponse(wire::GetResponse {
                request_id: get.request_id,
                outcome: wire::GetOutcome::Failed {
                    code: ErrorCode::EtcdUnavailable,
                    message: Text::from("etcd is unreachable"),
                },
            }))
            .await;
    };
    let gets = async {
        let cached = client.get("workers/").await;
        let linearizable = client.get_linearizable("workers/").await;
        (cached, linearizable)
    };
    let ((cached, linearizable), ()) = tokio::join!(within("gets", gets), relay_side);
    let snapshot = cached.unwrap();
    assert_eq!(snapshot.revision, 42);
    assert!(snapshot.stale);
    assert_eq!(snapshot.age, Duration::from_millis(1500));
    assert_eq!(
        snapshot.entries,
        vec![
            Entry {
                key: bytes("workers/a"),
                value: bytes("10.0.0.1")
            },
            Entry {
                key: bytes("workers/b"),
                value: bytes("10.0.0.2")
            },
        ]
    );
    let failure = linearizable.unwrap_err();
    assert_eq!(failure.code(), Some(ErrorCode::EtcdUnavailable));
    assert!(failure.is_retryable());

    let mut events = client.link_events();
    drop(connection);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;
    let offline = client.get("workers/").await.unwrap_err();
    assert!(matches!(offline, Error::RelayUnavailable));
    assert!(offline.is_retryable());
}

#[tokio::test]
async fn a_watcher_yields_puts_deletes_and_synced_and_dropping_it_unwatches() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;
    let (watcher, watch) = tokio::join!(
        within("watch", client.watch("workers/")),
        connection.accept_watch()
    );
    let mut watcher = watcher.unwrap();
    assert_eq!(watch.watch_id, watcher.id());
    assert_eq!(watch.prefix, "workers/");
    assert!(watch.send_initial);

    use wire::WatchEventKind::{Delete, Put, Synced};
    let id = watch.watch_id;
    send_watch_event(&mut connection, id, 10, Put, "workers/a", "1").await;
    send_watch_event(&mut connection, id, 10, Synced, "", "").await;
    send_watch_event(&mut connection, id, 11, Put, "workers/b", "2").await;
    send_watch_event(&mut connection, id, 12, Delete, "workers/a", "").await;
    assert_eq!(next_event(&mut watcher).await, put("workers/a", "1", 10));
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Synced { revision: 10 }
    );
    assert_eq!(next_event(&mut watcher).await, put("workers/b", "2", 11));
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Delete {
            key: bytes("workers/a"),
            revision: 12
        }
    );

    drop(watcher);
    match connection.recv_answering_pings().await {
        Frame::Unwatch(unwatch) => assert_eq!(unwatch.watch_id, id),
        other => panic!("expected UNWATCH, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reconnected_watch_replays_the_entries_and_deletes_what_went_away() {
    let relay = FakeRelay::start();
    let (client, mut first) = connect(&relay, relay.options(), 4).await;
    let (watcher, watch) = tokio::join!(
        within("watch", client.watch("workers/")),
        first.accept_watch()
    );
    let mut watcher = watcher.unwrap();
    use wire::WatchEventKind::{Put, Synced};
    let id = watch.watch_id;
    send_watch_event(&mut first, id, 10, Put, "workers/a", "1").await;
    send_watch_event(&mut first, id, 10, Put, "workers/b", "2").await;
    send_watch_event(&mut first, id, 10, Synced, "", "").await;
    for _ in 0..3 {
        next_event(&mut watcher).await;
    }

    drop(first);
    // While away, workers/a went away and workers/b changed.
    let (mut second, _) = relay.accept_session(4).await;
    let rewatch = match second.recv_answering_pings().await {
        Frame::Watch(rewatch) => rewatch,
        other => panic!("expected WATCH, got {other:?}"),
    };
    assert!(rewatch.send_initial);
    send_watch_event(&mut second, rewatch.watch_id, 15, Put, "workers/b", "3").await;
    send_watch_event(&mut second, rewatch.watch_id, 15, Synced, "", "").await;
    assert_eq!(next_event(&mut watcher).await, put("workers/b", "3", 15));
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Delete {
            key: bytes("workers/a"),
            revision: 15
        }
    );
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Synced { revision: 15 }
    );
}

#[tokio::test]
async fn watch_errors_fail_the_call_or_end_the_stream() {
    let relay = FakeRelay::start();
    let (client, mut connection) = connect(&relay, relay.options(), 1).await;

    let relay_side = async {
        let watch = match connection.recv().await {
            Frame::Watch(watch) => watch,
            other => panic!("expected WATCH, got {other:?}"),
        };
        let nonce = match connection.recv().await {
            Frame::Ping(ping) => ping.nonce,
            other => panic!("expected PING, got {other:?}"),
        };
        connection
            .send(Frame::Error(ErrorFrame {
                code: ErrorCode::Unauthorized,
                reference: u64::from(watch.watch_id),
                message: Text::from("prefix not allowed"),
            }))
            .await;
        connection.send(Frame::Pong(Pong { nonce })).await;
    };
    let (refused, ()) = tokio::join!(within("watch", client.watch("secrets/")), relay_side);
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized));

    let (watcher, watch) = tokio::join!(
        within("watch", client.watch("workers/")),
        connection.accept_watch()
    );
    let mut watcher = watcher.unwrap();
    connection
        .send(Frame::Error(ErrorFrame {
            code: ErrorCode::LimitExceeded,
            reference: u64::from(watch.watch_id),
            message: Text::from("too many watches"),
        }))
        .await;
    assert!(within("the stream to end", watcher.next()).await.is_none());
    assert_eq!(
        watcher.termination().unwrap().code(),
        Some(ErrorCode::LimitExceeded)
    );
}

#[tokio::test]
async fn a_slow_watcher_drops_events_then_resyncs_under_a_fresh_id() {
    let relay = FakeRelay::start();
    // Short ticks: the resync is decided on the keepalive tick.
    let options = relay
        .options()
        .subscription_capacity(3)
        .ping_interval(Duration::from_millis(20));
    let (client, mut connection) = connect(&relay, options, 1).await;
    let (watcher, watch) = tokio::join!(
        within("watch", client.watch("workers/")),
        connection.accept_watch()
    );
    let mut watcher = watcher.unwrap();
    use wire::WatchEventKind::{Delete, Put, Synced};
    let id = watch.watch_id;
    send_watch_event(&mut connection, id, 10, Put, "workers/a", "1").await;
    send_watch_event(&mut connection, id, 10, Synced, "", "").await;
    assert_eq!(next_event(&mut watcher).await, put("workers/a", "1", 10));
    next_event(&mut watcher).await;

    // A burst the watcher cannot take: the DELETE does not fit.
    send_watch_event(&mut connection, id, 11, Put, "workers/b", "1").await;
    send_watch_event(&mut connection, id, 12, Put, "workers/a", "2").await;
    send_watch_event(&mut connection, id, 13, Put, "workers/a", "3").await;
    send_watch_event(&mut connection, id, 14, Delete, "workers/b", "").await;
    within("the drop", async {
        while watcher.dropped() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(watcher.dropped(), 1);
    assert_eq!(next_event(&mut watcher).await, put("workers/b", "1", 11));
    assert_eq!(next_event(&mut watcher).await, put("workers/a", "2", 12));
    assert_eq!(next_event(&mut watcher).await, put("workers/a", "3", 13));

    // Caught up: the client abandons the old wire id and asks again.
    match connection.recv_answering_pings().await {
        Frame::Unwatch(unwatch) => assert_eq!(unwatch.watch_id, id),
        other => panic!("expected UNWATCH, got {other:?}"),
    }
    let rewatch = match connection.recv_answering_pings().await {
        Frame::Watch(rewatch) => rewatch,
        other => panic!("expected WATCH, got {other:?}"),
    };
    assert_ne!(rewatch.watch_id, id);
    assert_eq!(rewatch.prefix, "workers/");
    assert!(rewatch.send_initial);
    // Late events for the abandoned id are ignored.
    send_watch_event(&mut connection, id, 15, Put, "workers/stale", "x").await;
    send_watch_event(&mut connection, rewatch.watch_id, 15, Put, "workers/a", "3").await;
    send_watch_event(&mut connection, rewatch.watch_id, 15, Synced, "", "").await;
    assert_eq!(next_event(&mut watcher).await, put("workers/a", "3", 15));
    // The DELETE the watcher missed, repaired.
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Delete {
            key: bytes("workers/b"),
            revision: 15
        }
    );
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Synced { revision: 15 }
    );
    assert_eq!(watcher.resyncs(), 1);
}

#[tokio::test]
async fn a_relay_side_drop_makes_every_watch_resync() {
    // The relay reports dropped frames for the whole connection (reference
    // 0); watch events may be among them, so watches start over.
    let relay = FakeRelay::start();
    let options = relay.options().ping_interval(Duration::from_millis(20));
    let (client, mut connection) = connect(&relay, options, 1).await;
    let (watcher, watch) = tokio::join!(
        within("watch", client.watch("workers/")),
        connection.accept_watch()
    );
    let mut watcher = watcher.unwrap();
    use wire::WatchEventKind::{Put, Synced};
    let id = watch.watch_id;
    send_watch_event(&mut connection, id, 10, Put, "workers/a", "1").await;
    send_watch_event(&mut connection, id, 10, Synced, "", "").await;
    assert_eq!(next_event(&mut watcher).await, put("workers/a", "1", 10));
    next_event(&mut watcher).await;

    connection
        .send(Frame::Error(ErrorFrame {
            code: wire::ErrorCode::SlowConsumer,
            reference: 0,
            message: wire::Text::from("3 message(s) dropped"),
        }))
        .await;
    match connection.recv_answering_pings().await {
        Frame::Unwatch(unwatch) => assert_eq!(unwatch.watch_id, id),
        other => panic!("expected UNWATCH, got {other:?}"),
    }
    let rewatch = match connection.recv_answering_pings().await {
        Frame::Watch(rewatch) => rewatch,
        other => panic!("expected WATCH, got {other:?}"),
    };
    assert_ne!(rewatch.watch_id, id);
    assert!(rewatch.send_initial);
    // The fresh snapshot lacks workers/a: the watcher hears it is gone.
    send_watch_event(&mut connection, rewatch.watch_id, 12, Put, "workers/b", "2").await;
    send_watch_event(&mut connection, rewatch.watch_id, 12, Synced, "", "").await;
    assert_eq!(next_event(&mut watcher).await, put("workers/b", "2", 12));
    assert_eq!(
        next_event(&mut watcher).await,
        WatchEvent::Delete {
            key: bytes("workers/a"),
            revision: 12
        }
    );
    assert_eq!(watcher.resyncs(), 1);
}

#[tokio::test]
async fn etcd_link_changes_update_etcd_status_and_are_link_events() {
    let relay = FakeRelay::start();
    let (client, connection) = tokio::join!(
        within("connect", Client::connect_with(relay.options())),
        relay.accept_session_with_etcd(1, LinkStatus::Up)
    );
    let client = client.unwrap();
    let (mut connection, _) = connection;
    assert_eq!(client.etcd_status(), LinkStatus::Up);

    let mut events = client.link_events();
    connection
        .send(Frame::LinkState(holdfast_wire::LinkState {
            service: holdfast_wire::Service::Etcd,
            status: LinkStatus::Down,
        }))
        .await;
    let event = wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::Upstream { .. })
    })
    .await;
    assert_eq!(
        event,
        LinkEvent::Upstream {
            service: holdfast_wire::Service::Etcd,
            status: LinkStatus::Down
        }
    );
    assert_eq!(client.etcd_status(), LinkStatus::Down);
    assert_eq!(client.nats_status(), LinkStatus::Up);

    drop(connection);
    wait_for_event(&mut events, |event| {
        matches!(event, LinkEvent::RelayLost { .. })
    })
    .await;
    assert_eq!(client.etcd_status(), LinkStatus::Unknown);
}

#[tokio::test]
async fn keepalive_pings_wait_for_the_previous_pong() {
    // The relay answers PINGs in order, each after a barrier; PINGs sent
    // faster than a busy relay answers would pile up until the oldest looked
    // lost and the client dropped a healthy relay.
    let relay = FakeRelay::start();
    let options = relay
        .options()
        .ping_interval(Duration::from_millis(20))
        .pong_timeout(Duration::from_secs(5));
    let (_client, mut connection) = connect(&relay, options, 1).await;
    let first = match connection.recv().await {
        Frame::Ping(ping) => ping.nonce,
        other => panic!("expected PING, got {other:?}"),
    };
    // Ten ticks with the PONG held: nothing more is sent.
    let quiet = tokio::time::timeout(Duration::from_millis(200), connection.recv()).await;
    assert!(
        quiet.is_err(),
        "sent {quiet:?} while a PING was outstanding"
    );
    connection.send(Frame::Pong(Pong { nonce: first })).await;
    match connection.recv().await {
        Frame::Ping(ping) => assert_ne!(ping.nonce, first),
        other => panic!("expected the next PING, got {other:?}"),
    }
}
