//! The client library against a scripted stand-in for holdfastd
//! (`support::FakeRelay`): handshake, reconnect, desired-state replay, ack
//! and error mapping. No NATS is involved.

mod support;

use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{
    AckStatus, Client, ConnectOptions, Error, ErrorCode, LinkEvent, OfflinePolicy, OutboundMessage,
    RelayUrl,
};
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
    assert_eq!(client.instance_id(), Some(77));
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

    let quic = Client::connect("quic://relay.local:4433")
        .await
        .unwrap_err();
    assert!(matches!(
        quic,
        Error::UnsupportedTransport { scheme: "quic" }
    ));

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
    assert_eq!(client.instance_id(), None);
    client.publish("early.bird", "first").await.unwrap();

    let relay = FakeRelay::bind(dir, path);
    let (mut connection, hello) = relay.accept_session(5).await;
    assert_eq!(hello.instance_id, 0);
    assert_eq!(payload_text(&connection.recv_publish().await), "first");
    assert_eq!(client.instance_id(), Some(5));
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
