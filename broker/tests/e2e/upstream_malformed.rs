//! Malformed messages from other publishers on the cluster (a subject that
//! is not UTF-8, a header value with a lone CR) cost only themselves: the
//! relay's link stays up and every other subject keeps flowing.

use crate::support::{metric, scrape, wait_until_async, within, Stack};
use futures::StreamExt;
use holdfast_client::LinkStatus;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

/// A raw NATS client that sends what async-nats never would.
struct RawPublisher {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl RawPublisher {
    fn connect(nats_url: &str) -> RawPublisher {
        let address = nats_url.trim_start_matches("nats://");
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut publisher = RawPublisher {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        publisher.send(b"CONNECT {\"verbose\":false,\"headers\":true}\r\n");
        publisher
    }

    /// Sends `bytes` and waits for the server's PONG, so they were taken.
    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
        self.writer.write_all(b"PING\r\n").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            assert!(!line.starts_with("-ERR"), "nats-server refused: {line}");
            if line.starts_with("PONG") {
                return;
            }
        }
    }

    fn subject_not_utf8(&mut self) {
        self.send(b"PUB u.\xff 1\r\nx\r\n");
    }

    fn header_with_lone_cr(&mut self) {
        let header = "NATS/1.0\r\nX-Bad: a\rb\r\n\r\n";
        let frame = format!(
            "HPUB u.cr {} {}\r\n{header}z\r\n",
            header.len(),
            header.len() + 1
        );
        self.send(frame.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_from_other_publishers_cost_only_themselves() {
    const GOOD: usize = 1_000;
    let stack = Stack::start();
    let client = stack.client().await;
    let mut wildcard = client.subscribe("u.>").await.unwrap();
    let mut good = client.subscribe("good.>").await.unwrap();
    client.flush().await.unwrap();
    let direct = stack.direct_nats().await;
    let mut raw = RawPublisher::connect(&stack.nats.url());
    // The relay's subscriptions are active upstream once a message on one
    // arrives.
    within("the subscriptions upstream", async {
        loop {
            direct.publish("good.warmup", "w".into()).await.unwrap();
            direct.flush().await.unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), good.next()).await
            {
                return;
            }
        }
    })
    .await;

    // Bad messages ten times a second while 1,000 good ones are published,
    // as in the repro.
    let started = Instant::now();
    let publisher = direct.clone();
    let publishing = tokio::spawn(async move {
        for index in 0..GOOD {
            publisher
                .publish(format!("good.{index}"), format!("{index}").into())
                .await
                .unwrap();
            if index % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        publisher.flush().await.unwrap();
    });
    let poisoning = tokio::task::spawn_blocking(move || {
        for round in 0..10 {
            if round % 2 == 0 {
                raw.subject_not_utf8();
            } else {
                raw.header_with_lone_cr();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        raw
    });
    let mut received = Vec::with_capacity(GOOD);
    while received.len() < GOOD {
        let message = within("every good message", good.next()).await.unwrap();
        received.push(String::from_utf8_lossy(&message.payload).to_string());
    }
    publishing.await.unwrap();
    let mut raw = poisoning.await.unwrap();
    let expected: Vec<String> = (0..GOOD).map(|index| index.to_string()).collect();
    assert_eq!(received, expected, "good messages lost or reordered");
    eprintln!(
        "1,000 good messages among 10 malformed ones in {:?}",
        started.elapsed()
    );

    // The link never went down, and the same subscription still delivers.
    assert_eq!(client.nats_status(), LinkStatus::Up);
    let status = stack.relay.status();
    assert_eq!(status["nats"]["outages"], 0, "{status}");
    assert_eq!(
        status["nats"]["subscriptions_connection"]["reconnects"], 0,
        "{status}"
    );
    raw.send(b"PUB u.fine 2\r\nok\r\n");
    let next = within("a good message on the wildcard", wildcard.next())
        .await
        .unwrap();
    assert_eq!(next.subject.as_str(), "u.fine");

    // Each one counted and logged, at most every 10 s.
    wait_until_async("the drops counted", || async {
        metric(
            &scrape(&stack.relay),
            "holdfast_messages_dropped_total",
            &[("reason", "malformed_upstream")],
        ) == Some(10.0)
    })
    .await;
    let logs = stack.relay.logs();
    let lines = logs.matches("could not be decoded").count();
    assert!((1..=2).contains(&lines), "{lines} log lines:\n{logs}");
}
