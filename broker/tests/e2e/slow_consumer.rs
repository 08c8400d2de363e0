//! A subscriber that stops reading loses messages (counted, told) or its
//! connection, per policy; a fast subscriber of the same subject loses nothing.

use crate::support::{within, Stack};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use holdfast_wire::{
    encode, ErrorCode, Frame, FrameDecoder, Hello, Subscribe, Text, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const ROUNDS: usize = 20;
const PER_ROUND: usize = 1_000;

/// Connects, subscribes to `subject`, and then never reads.
async fn stalled_subscriber(socket: &std::path::Path, subject: &'static str) -> UnixStream {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let mut bytes = BytesMut::new();
    let hello = Frame::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client_name: Text::from_static("stalled"),
        instance_id: 0,
    });
    let subscribe = Frame::Subscribe(Subscribe {
        sid: 1,
        subject: Text::from_static(subject),
        queue_group: None,
    });
    encode(&hello, u32::MAX, &mut bytes).unwrap();
    encode(&subscribe, u32::MAX, &mut bytes).unwrap();
    stream.write_all(&bytes).await.unwrap();
    stream
}

/// Reads the stalled connection until a frame matches or it closes.
async fn read_until(stream: &mut UnixStream, mut wanted: impl FnMut(&Frame) -> bool) -> bool {
    let mut decoder = FrameDecoder::new(u32::MAX);
    let mut buffer = BytesMut::new();
    within("reading the stalled connection", async {
        loop {
            while let Ok(Some(frame)) = decoder.decode(&mut buffer) {
                if wanted(&frame) {
                    return true;
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await
}

/// Publishes in paced rounds from plain NATS; the fast holdfast subscriber
/// must receive every message in order.
async fn flood_and_check_fast(stack: &Stack, fast: &mut holdfast_client::Subscriber) {
    let nats = stack.direct_nats().await;
    let payload = Bytes::from(vec![b'x'; 512]);
    let mut expected = 0usize;
    let mut next_seen = 0usize;
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Seq", expected.to_string().as_str());
            nats.publish_with_headers("flood", headers, payload.clone())
                .await
                .unwrap();
            expected += 1;
        }
        nats.flush().await.unwrap();
        while next_seen < expected {
            let seen = within("fast subscriber keeps up", fast.next())
                .await
                .unwrap();
            let seq: usize = seen.headers.get("Seq").unwrap().parse().unwrap();
            assert_eq!(
                seq, next_seen,
                "fast subscriber lost or reordered a message"
            );
            next_seen += 1;
        }
    }
    assert_eq!(fast.dropped(), 0);
}

const SMALL_QUEUES: &str =
    "[sessions]\noutbound_queue_frames = 4096\noutbound_queue_bytes = 1048576\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_policy_counts_and_reports_and_spares_the_fast_subscriber() {
    let stack = Stack::start_with_config(SMALL_QUEUES);
    let mut stalled = stalled_subscriber(stack.relay.socket(), "flood").await;
    let client = stack.client().await;
    let mut fast = client.subscribe("flood").await.unwrap();

    flood_and_check_fast(&stack, &mut fast).await;

    let status = client.status().await.unwrap();
    let drops = status["counters"]["slow_consumer_drops"].as_u64().unwrap();
    assert!(drops > 0, "{status}");
    let told = read_until(
        &mut stalled,
        |frame| matches!(frame, Frame::Error(error) if error.code == ErrorCode::SlowConsumer),
    )
    .await;
    assert!(told, "the slow subscriber was not told about its drops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_closes_only_the_slow_connection() {
    let config = format!("{SMALL_QUEUES}slow_consumer = \"disconnect\"\n");
    let stack = Stack::start_with_config(&config);
    let mut stalled = stalled_subscriber(stack.relay.socket(), "flood").await;
    let client = stack.client().await;
    let mut fast = client.subscribe("flood").await.unwrap();

    flood_and_check_fast(&stack, &mut fast).await;

    let got_go_away = read_until(
        &mut stalled,
        |frame| matches!(frame, Frame::GoAway(go_away) if go_away.code == ErrorCode::SlowConsumer),
    )
    .await;
    assert!(
        got_go_away,
        "the slow subscriber was not sent GO_AWAY SlowConsumer"
    );
    let status = client.status().await.unwrap();
    assert_eq!(
        status["counters"]["slow_consumer_disconnects"], 1,
        "{status}"
    );
}
