//! Loads shared by several scenarios: timed publish→subscribe runs (direct
//! and through the relay), counting subscribers on the NATS side, and
//! pipelined acknowledged publishing into the relay's journal.

use crate::error::{failed, BenchError, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{AckFuture, AckStatus, OutboundMessage, Text};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Acknowledged publishes kept in flight before the oldest is awaited; the
/// raw-file baseline syncs in batches of the same size.
pub const PIPELINE_WINDOW: usize = 1000;

/// A counting subscriber gives up after this long without a message.
const IDLE_LIMIT: Duration = Duration::from_secs(15);

/// Upper bound for one ack.
const ACK_LIMIT: Duration = Duration::from_secs(60);

/// `size` bytes of filler.
pub fn payload(size: usize) -> Bytes {
    Bytes::from(vec![b'x'; size])
}

/// What a counting subscriber saw.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    pub received: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

/// A subscriber's queue large enough for `expected` messages, so that the
/// client never drops for a slow consumer.
fn capacity_for(expected: u64) -> usize {
    usize::try_from(expected)
        .unwrap_or(usize::MAX)
        .saturating_add(1024)
        .min(8_000_000)
}

/// A plain async-nats subscriber on its own connection, counting messages
/// until it saw `expected` or none came for a while.
pub struct CountingSubscriber {
    task: Option<JoinHandle<()>>,
    counted: Arc<Mutex<Counted>>,
}

impl CountingSubscriber {
    /// Subscribes to `subject` and returns once NATS registered the subscription.
    pub async fn start(nats_url: &str, subject: &str, expected: u64) -> Result<CountingSubscriber> {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(capacity_for(expected))
            .connect(nats_url)
            .await
            .context("connecting the counting subscriber to NATS")?;
        let subscriber = client
            .subscribe(subject.to_string())
            .await
            .context("subscribing on NATS")?;
        nats_round_trip(&client).await?;
        Ok(CountingSubscriber::count(
            subscriber,
            client,
            expected,
            |_| true,
        ))
    }

    /// Counts the items of `stream` for which `counts` holds, until
    /// `expected` or none came for a while; `keep_alive` (the stream's
    /// connection) lives as long as the count.
    pub fn count<S, K, F>(
        mut stream: S,
        keep_alive: K,
        expected: u64,
        counts: F,
    ) -> CountingSubscriber
    where
        S: futures::Stream + Unpin + Send + 'static,
        K: Send + 'static,
        F: Fn(&S::Item) -> bool + Send + 'static,
    {
        let counted = Arc::new(Mutex::new(Counted {
            received: 0,
            first: None,
            last: None,
        }));
        let shared = Arc::clone(&counted);
        let task = tokio::spawn(async move {
            let _keep_alive = keep_alive;
            let mut received = 0;
            while received < expected {
                match tokio::time::timeout(IDLE_LIMIT, stream.next()).await {
                    Ok(Some(item)) => {
                        if !counts(&item) {
                            continue;
                        }
                        let now = Instant::now();
                        received += 1;
                        if let Ok(mut counted) = shared.lock() {
                            counted.first.get_or_insert(now);
                            counted.last = Some(now);
                            counted.received = received;
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        });
        CountingSubscriber {
            task: Some(task),
            counted,
        }
    }

    /// What it saw so far.
    pub fn snapshot(&self) -> Counted {
        match self.counted.lock() {
            Ok(counted) => *counted,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Waits until the subscriber saw everything or gave up.
    pub async fn finish(mut self) -> Result<Counted> {
        if let Some(task) = self.task.take() {
            task.await.context("counting subscriber task")?;
        }
        Ok(self.snapshot())
    }

    /// Like [`CountingSubscriber::finish`], but waits at most `limit`.
    pub async fn finish_within(mut self, limit: Duration) -> Counted {
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.snapshot()
    }
}

impl Drop for CountingSubscriber {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Returns once nats-server has handled everything `client` sent before, so
/// a subscription just made is active there. async-nats's `flush` only
/// writes its buffer; a message to the client's own inbox comes back only
/// after the server processed the operations ahead of it. Without this a
/// run's first messages can reach the server before its subscriber does.
pub async fn nats_round_trip(client: &async_nats::Client) -> Result<()> {
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .context("subscribing to the round-trip inbox")?;
    client
        .publish(inbox, Bytes::new())
        .await
        .context("publishing the round-trip message")?;
    match tokio::time::timeout(ACK_LIMIT, echo.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(BenchError::Timeout(
            "a round trip through nats-server".to_string(),
        )),
    }
}

/// A timed publish→subscribe run.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Messages received per second, from the first publish to the last receipt.
    pub rate: f64,
    pub sent: u64,
    pub received: u64,
}

impl Throughput {
    fn from_counted(start: Instant, sent: u64, counted: Counted) -> Result<Throughput> {
        let last = counted
            .last
            .ok_or_else(|| failed("publish→subscribe run", "the subscriber received nothing"))?;
        let seconds = last.duration_since(start).as_secs_f64().max(1e-9);
        Ok(Throughput {
            rate: counted.received as f64 / seconds,
            sent,
            received: counted.received,
        })
    }

    /// Messages sent but never seen by the subscriber.
    pub fn missing(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// What a direct publisher puts on each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectMessages {
    /// Subject and payload only.
    Bare,
    /// Also the four headers the relay stamps on a journaled message
    /// (chain and `Nats-Msg-Id`, values of the same lengths), so the
    /// subscriber parses what it parses on a replay.
    StampedLikeTheRelay,
}

/// A relay id as holdfastd makes them (`hf` + pid + clock, in hex).
const RELAY_ID_LIKE: &str = "hf1a2b3c4d5e6f7a8b";

/// The headers the relay would stamp on its `seq`th journaled message.
fn relay_stamp(seq: u64) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Holdfast-Relay", RELAY_ID_LIKE);
    headers.insert("Holdfast-Seq", seq.to_string().as_str());
    headers.insert(
        "Holdfast-Chain",
        format!("{:016x}", seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)).as_str(),
    );
    headers.insert(
        "Nats-Msg-Id",
        format!("{RELAY_ID_LIKE}.kv_events.{seq}").as_str(),
    );
    headers
}

/// `count` messages of `size` bytes from a direct async-nats client to a
/// plain subscriber on the same server.
pub async fn direct_publish(
    nats_url: &str,
    publisher: &async_nats::Client,
    subject: &str,
    count: u64,
    size: usize,
    messages: DirectMessages,
) -> Result<Throughput> {
    let subscriber = CountingSubscriber::start(nats_url, subject, count).await?;
    publish_counted(publisher, subscriber, subject, count, size, messages).await
}

/// `count` messages of `size` bytes from `publisher` to `subject`, timed
/// until `subscriber` (already subscribed, and reachable from the
/// publisher's server) counted them.
pub async fn publish_counted(
    publisher: &async_nats::Client,
    subscriber: CountingSubscriber,
    subject: &str,
    count: u64,
    size: usize,
    messages: DirectMessages,
) -> Result<Throughput> {
    let body = payload(size);
    // Built once and shared, as a publisher at these rates would.
    let subject = async_nats::Subject::from(subject);
    let start = Instant::now();
    for seq in 1..=count {
        let published = match messages {
            DirectMessages::Bare => publisher.publish(subject.clone(), body.clone()).await,
            DirectMessages::StampedLikeTheRelay => {
                publisher
                    .publish_with_headers(subject.clone(), relay_stamp(seq), body.clone())
                    .await
            }
        };
        published.context("publishing directly to NATS")?;
    }
    publisher
        .flush()
        .await
        .context("flushing the direct publisher")?;
    let counted = subscriber.finish().await?;
    Throughput::from_counted(start, count, counted)
}

/// `count` fire-and-forget messages of `size` bytes through the relay (in
/// `class`, or the relay's choice) to a plain subscriber on NATS.
pub async fn relay_publish(
    nats_url: &str,
    client: &holdfast_client::Client,
    subject: &str,
    class: Option<&str>,
    count: u64,
    size: usize,
) -> Result<Throughput> {
    let subscriber = CountingSubscriber::start(nats_url, subject, count).await?;
    let body = payload(size);
    // Built once and shared, as a publisher at these rates would.
    let subject = Text::from(subject);
    let class = class.map(Text::from);
    let start = Instant::now();
    for _ in 0..count {
        let mut message = OutboundMessage::new(subject.clone(), body.clone());
        if let Some(class) = &class {
            message = message.class(class.clone());
        }
        client
            .publish_message(message)
            .await
            .context("publishing through the relay")?;
    }
    client.flush().await.context("flushing the relay client")?;
    let counted = subscriber.finish().await?;
    Throughput::from_counted(start, count, counted)
}

/// How long the relay's upstream subscription may take to reach NATS.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(15);

/// `count` fire-and-forget messages of `size` bytes through the relay to
/// NATS and back through the relay to a holdfast-client subscriber on its
/// own connection (the path between two components on relays).
///
/// The subscriber takes `{prefix}.>`; messages go to `{prefix}.data`.
/// Before the run, `probe` (a direct NATS client) publishes to
/// `{prefix}.probe` until one arrives: then the relay's subscription is in
/// place at nats-server, which the relay's confirmation of the SUBSCRIBE
/// does not promise.
pub async fn relay_to_relay_publish(
    publisher: &holdfast_client::Client,
    relay_url: &str,
    probe: &async_nats::Client,
    prefix: &str,
    count: u64,
    size: usize,
) -> Result<Throughput> {
    let url: holdfast_client::RelayUrl = relay_url.parse().context("parsing the relay's URL")?;
    let options =
        holdfast_client::ConnectOptions::new(url).subscription_capacity(capacity_for(count));
    let subscriber_client = holdfast_client::Client::connect_with(options)
        .await
        .context("connecting the relay subscriber")?;
    let mut subscriber = subscriber_client
        .subscribe(format!("{prefix}.>"))
        .await
        .context("subscribing through the relay")?;
    let data = Text::from(format!("{prefix}.data"));
    let probe_subject = format!("{prefix}.probe");
    let deadline = Instant::now() + SUBSCRIBE_LIMIT;
    loop {
        probe
            .publish(probe_subject.clone(), Bytes::new())
            .await
            .context("publishing a subscription probe")?;
        probe.flush().await.context("flushing the probe")?;
        match tokio::time::timeout(Duration::from_millis(20), subscriber.next()).await {
            Ok(Some(_)) => break,
            Ok(None) => {
                return Err(failed(
                    "the relay subscription",
                    "ended before its first message",
                ))
            }
            Err(_) if Instant::now() > deadline => {
                return Err(BenchError::Timeout(format!(
                    "the relay's subscription to {prefix}.> to reach nats-server"
                )))
            }
            Err(_) => {}
        }
    }
    let wanted = data.clone();
    let counter = CountingSubscriber::count(
        subscriber,
        subscriber_client,
        count,
        move |message: &holdfast_client::Message| message.subject == wanted,
    );
    let body = payload(size);
    let class = Text::from("default");
    let start = Instant::now();
    for _ in 0..count {
        publisher
            .publish_message(OutboundMessage::new(data.clone(), body.clone()).class(class.clone()))
            .await
            .context("publishing through the relay")?;
    }
    publisher
        .flush()
        .await
        .context("flushing the relay client")?;
    let counted = counter.finish().await?;
    Throughput::from_counted(start, count, counted)
}

/// A pipelined, acknowledged ingest into the relay.
#[derive(Debug, Clone, Copy)]
pub struct Ingest {
    /// Acknowledged messages per second, from the first publish to the last ack.
    pub rate: f64,
    pub journaled: u64,
    /// Acks with another outcome (forwarded or queued).
    pub other: u64,
    /// 99th percentile, in milliseconds, of publish call to ack received.
    pub ack_p99_ms: Option<f64>,
}

/// Publishes `count` messages of `size` bytes in `class` with acks,
/// keeping [`PIPELINE_WINDOW`] in flight; every ack must be positive.
pub async fn ingest(
    client: &holdfast_client::Client,
    subject: &str,
    class: &str,
    count: u64,
    size: usize,
) -> Result<Ingest> {
    let body = payload(size);
    // Built once and shared, as a publisher at these rates would.
    let subject = Text::from(subject);
    let class = Text::from(class);
    let mut pending: VecDeque<(Instant, AckFuture)> = VecDeque::with_capacity(PIPELINE_WINDOW + 1);
    let mut latencies_ms = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut result = Ingest {
        rate: 0.0,
        journaled: 0,
        other: 0,
        ack_p99_ms: None,
    };
    let start = Instant::now();
    for _ in 0..count {
        let sent = Instant::now();
        let ack = client
            .publish_with_ack(
                OutboundMessage::new(subject.clone(), body.clone()).class(class.clone()),
            )
            .await
            .context("publishing with an ack through the relay")?;
        pending.push_back((sent, ack));
        if pending.len() >= PIPELINE_WINDOW {
            if let Some((sent, ack)) = pending.pop_front() {
                settle(ack, &mut result).await?;
                // Acks arrive in publish order, so the oldest is the next
                // to come: awaiting it times it within scheduling noise.
                latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    while let Some((sent, ack)) = pending.pop_front() {
        settle(ack, &mut result).await?;
        latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    result.rate = count as f64 / start.elapsed().as_secs_f64().max(1e-9);
    result.ack_p99_ms = crate::stats::percentile(&latencies_ms, 99.0);
    Ok(result)
}

async fn settle(ack: AckFuture, result: &mut Ingest) -> Result<()> {
    let ack = tokio::time::timeout(ACK_LIMIT, ack)
        .await
        .map_err(|_| BenchError::Timeout("a publish ack from the relay".to_string()))?
        .context("a publish the relay did not accept")?;
    if ack.outcome == AckStatus::Journaled {
        result.journaled += 1;
    } else {
        result.other += 1;
    }
    Ok(())
}
