//! `outage`: a real-duration NATS outage (then etcd outage) under a steady
//! mixed load through the relay. Reports what was accepted, what reached
//! NATS, what was lost (must be 0), duplicates, the largest backlog and how
//! long the replay took. Not part of `all`.
//!
//! What reached NATS is captured by a JetStream file-store stream on the
//! NATS server, and every class is configured `jetstream = true`, so the
//! relay lets go of a message only after the stream stored it. NATS is
//! stopped with SIGINT so the capture stream keeps everything it
//! acknowledged; the relay sees the connection drop either way.

use crate::error::{BenchError, Context, Result};
use crate::harness::{NatsServer, Relay};
use crate::relay_status::{total_backlog, wait_for_nats};
use crate::report::Row;
use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use holdfast_client::{AckFuture, AckStatus, Client, OutboundMessage};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How the outage run is shaped (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct OutagePlan {
    pub nats_outage: Duration,
    pub etcd_outage: Duration,
    /// Publishes per second, spread over the four classes.
    pub rate: u32,
}

/// Production classes, each confirmed by a JetStream PubAck.
const OUTAGE_CONFIG: &str = r#"
[classes.prefill]
jetstream = true
[classes.decode]
jetstream = true
[classes.kv_events]
durability = "durable"
jetstream = true
max_bytes = 17179869184
[classes.default]
jetstream = true
"#;

/// (class, subject) pairs the load cycles through.
const CLASSES: [(&str, &str); 4] = [
    ("prefill", "outage.prefill"),
    ("decode", "outage.decode"),
    ("kv_events", "outage.kv"),
    ("default", "outage.default"),
];
const PAYLOAD_BYTES: usize = 128;
const SEQ_DIGITS: usize = 20;
const WARM_UP: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(10);
const ACK_LIMIT: Duration = Duration::from_secs(120);
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// What the ack collector learned.
#[derive(Debug, Default)]
struct Acks {
    /// Per sequence number: whether the relay accepted it.
    accepted: Vec<bool>,
    outcomes: BTreeMap<&'static str, u64>,
    rejected: BTreeMap<String, u64>,
}

fn outcome_name(outcome: AckStatus) -> &'static str {
    match outcome {
        AckStatus::Forwarded => "forwarded",
        AckStatus::Journaled => "journaled",
        AckStatus::Queued => "queued",
    }
}

/// Publishes `rate` messages per second until `stop`, round-robin over the
/// classes; each ack goes to the collector with its sequence number.
async fn generate(
    client: Client,
    rate: u32,
    stop: Arc<AtomicBool>,
    acks: mpsc::Sender<(u64, AckFuture)>,
    sent: Arc<AtomicU64>,
) -> Result<()> {
    let per_tick = f64::from(rate) * TICK.as_secs_f64();
    let mut owed = 0.0;
    let mut seq = 0u64;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let index = usize::try_from(seq % 4).unwrap_or(0);
            let (class, subject) = CLASSES[index];
            let mut payload = BytesMut::with_capacity(PAYLOAD_BYTES);
            payload.put_slice(format!("{seq:0width$}", width = SEQ_DIGITS).as_bytes());
            payload.resize(PAYLOAD_BYTES, b'x');
            let ack = client
                .publish_with_ack(OutboundMessage::new(subject, payload.freeze()).class(class))
                .await
                .context("publishing through the relay")?;
            if acks.send((seq, ack)).await.is_err() {
                return Ok(());
            }
            seq += 1;
            sent.store(seq, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Awaits every ack in order.
async fn collect(mut receiver: mpsc::Receiver<(u64, AckFuture)>) -> Acks {
    let mut acks = Acks::default();
    while let Some((seq, ack)) = receiver.recv().await {
        let index = usize::try_from(seq).unwrap_or(usize::MAX);
        if acks.accepted.len() <= index {
            acks.accepted.resize(index + 1, false);
        }
        match tokio::time::timeout(ACK_LIMIT, ack).await {
            Ok(Ok(ack)) => {
                acks.accepted[index] = true;
                *acks.outcomes.entry(outcome_name(ack.outcome)).or_default() += 1;
            }
            Ok(Err(error)) => *acks.rejected.entry(error.name().to_string()).or_default() += 1,
            Err(_) => *acks.rejected.entry("no ack".to_string()).or_default() += 1,
        }
    }
    acks
}

/// Samples the relay's total backlog every second; keeps the largest.
async fn watch_backlog(client: Client, stop: Arc<AtomicBool>, max: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(status) = client.status().await {
            max.fetch_max(total_backlog(&status), Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn capture_stream(nats_url: &str) -> Result<async_nats::jetstream::stream::Stream> {
    let client = async_nats::connect(nats_url)
        .await
        .context("connecting to NATS for the capture stream")?;
    async_nats::jetstream::new(client)
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "OUTAGE".to_string(),
            subjects: vec!["outage.>".to_string()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the capture stream")
}

/// Reads the whole capture stream: how often each sequence number arrived.
async fn read_capture(nats_url: &str) -> Result<Vec<u32>> {
    let mut stream = capture_stream(nats_url).await?;
    let stored = stream
        .info()
        .await
        .context("reading the capture stream's info")?
        .state
        .messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .context("creating the capture consumer")?;
    let mut messages = consumer
        .messages()
        .await
        .context("reading the capture stream")?;
    let mut seen: Vec<u32> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut read = 0u64;
    while read < stored {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(remaining.min(Duration::from_secs(30)), messages.next())
            .await
            .map_err(|_| {
                BenchError::Timeout(format!("the capture stream ({read} of {stored} read)"))
            })?;
        let Some(message) = next else { break };
        let message = message.context("a message from the capture stream")?;
        read += 1;
        let seq = message
            .payload
            .get(..SEQ_DIGITS)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse::<usize>().ok());
        if let Some(seq) = seq {
            if seen.len() <= seq {
                seen.resize(seq + 1, 0);
            }
            seen[seq] = seen[seq].saturating_add(1);
        }
    }
    Ok(seen)
}

/// Waits until the relay's backlog is empty; returns when, or `None` at `limit`.
async fn wait_drained(client: &Client, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(status) = client.status().await {
            if total_backlog(&status) == 0 {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn words(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds >= 60 && seconds % 60 == 0 {
        format!("{} min", seconds / 60)
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

pub async fn run(plan: &OutagePlan) -> Result<Vec<Row>> {
    let mut nats = NatsServer::start(true).await?;
    let relay = Relay::start(&nats.url(), OUTAGE_CONFIG).await?;
    let client = Client::connect(&relay.url())
        .await
        .context("connecting to holdfastd")?;
    wait_for_nats(&client, "up", Duration::from_secs(10)).await?;
    capture_stream(&nats.url()).await?;

    let stop_load = Arc::new(AtomicBool::new(false));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let max_backlog = Arc::new(AtomicU64::new(0));
    let (ack_sender, ack_receiver) = mpsc::channel(100_000);
    let collector = tokio::spawn(collect(ack_receiver));
    let generator = tokio::spawn(generate(
        client.clone(),
        plan.rate.max(1),
        Arc::clone(&stop_load),
        ack_sender,
        Arc::clone(&sent),
    ));
    let watcher = tokio::spawn(watch_backlog(
        client.clone(),
        Arc::clone(&stop_watch),
        Arc::clone(&max_backlog),
    ));
    // Whatever happens below, the load stops when this guard goes.
    let _stop_guard = StopOnDrop(vec![Arc::clone(&stop_load), Arc::clone(&stop_watch)]);

    eprintln!("  outage: {} of load before the outage", words(WARM_UP));
    tokio::time::sleep(WARM_UP).await;
    eprintln!("  outage: stopping NATS for {}", words(plan.nats_outage));
    nats.stop().await;
    let outage_start = Instant::now();
    let outage_end = outage_start + plan.nats_outage;
    while Instant::now() < outage_end {
        let step = outage_end
            .saturating_duration_since(Instant::now())
            .min(PROGRESS_EVERY);
        tokio::time::sleep(step).await;
        if let Ok(status) = client.status().await {
            eprintln!(
                "  outage: {:.0} s down, {} sent, backlog {}",
                outage_start.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                total_backlog(&status)
            );
        }
    }
    eprintln!("  outage: starting NATS again");
    nats.restart().await?;
    let restarted = Instant::now();
    let drain_limit = (plan.nats_outage * 2).max(Duration::from_secs(600));
    let drained = wait_drained(&client, drain_limit).await;
    let replay_seconds = drained.map(|at| at.duration_since(restarted).as_secs_f64());
    eprintln!(
        "  outage: backlog drained after {}",
        replay_seconds.map_or("(never)".to_string(), |s| format!("{s:.1} s"))
    );
    eprintln!(
        "  outage: etcd outage of {} skipped: holdfastd has no etcd support yet",
        words(plan.etcd_outage)
    );

    tokio::time::sleep(SETTLE).await;
    stop_load.store(true, Ordering::Relaxed);
    generator
        .await
        .context("load generator task")?
        .map_err(|error| BenchError::Step {
            what: "steady load".to_string(),
            detail: error.to_string(),
        })?;
    let acks = collector.await.context("ack collector task")?;
    wait_drained(&client, Duration::from_secs(120)).await;
    stop_watch.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    let _ = client.close().await;

    eprintln!("  outage: reading the capture stream");
    let seen = read_capture(&nats.url()).await?;
    drop(relay);

    let accepted = acks.accepted.iter().filter(|ok| **ok).count() as u64;
    let mut delivered = 0u64;
    let mut lost = 0u64;
    for (seq, ok) in acks.accepted.iter().enumerate() {
        if !ok {
            continue;
        }
        if seen.get(seq).copied().unwrap_or(0) > 0 {
            delivered += 1;
        } else {
            lost += 1;
        }
    }
    let duplicates: u64 = seen
        .iter()
        .map(|count| u64::from(count.saturating_sub(1)))
        .sum();
    let rejected: u64 = acks.rejected.values().sum();
    let outcomes: Vec<String> = acks
        .outcomes
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    let note = format!(
        "NATS outage {} (SIGINT, then restart on the same port), load {} msg/s over prefill, \
         decode, kv_events, default (jetstream = true), {} s before and after; accepted {accepted} \
         ({}), rejected {rejected}{}, delivered {delivered}, lost {lost}, duplicates \
         {duplicates} (as stored by the capture stream, which drops a repeated Nats-Msg-Id within \
         2 min), max backlog {}, replay {}",
        words(plan.nats_outage),
        plan.rate,
        WARM_UP.as_secs(),
        outcomes.join(", "),
        if acks.rejected.is_empty() {
            String::new()
        } else {
            format!(" {:?}", acks.rejected)
        },
        max_backlog.load(Ordering::Relaxed),
        replay_seconds.map_or("did not finish".to_string(), |s| format!("{s:.1} s")),
    );
    Ok(vec![
        Row {
            scenario: "outage/nats lost".to_string(),
            value: Some(lost as f64),
            unit: "messages".to_string(),
            baseline: "accepted".to_string(),
            baseline_value: Some(accepted as f64),
            target: "lost = 0".to_string(),
            met: Some(lost == 0 && accepted > 0),
            repetitions: 1,
            note,
            ..Row::default()
        }
        .with_ratio(),
        Row {
            scenario: "outage/nats replay".to_string(),
            value: replay_seconds,
            unit: "s".to_string(),
            baseline: "outage length".to_string(),
            baseline_value: Some(plan.nats_outage.as_secs_f64()),
            target: "drains (no time target)".to_string(),
            met: Some(replay_seconds.is_some()),
            repetitions: 1,
            note: format!(
                "from NATS accepting connections again to the relay's status showing no backlog \
                 (max backlog {})",
                max_backlog.load(Ordering::Relaxed)
            ),
            ..Row::default()
        }
        .with_ratio(),
        Row {
            scenario: "outage/etcd".to_string(),
            unit: "s".to_string(),
            baseline: format!("etcd outage of {}", words(plan.etcd_outage)),
            target: "pub/sub keeps working".to_string(),
            repetitions: 1,
            note: ETCD_NOT_MEASURED.to_string(),
            ..Row::default()
        },
    ])
}

/// The `outage/etcd` row's note until this scenario takes etcd down.
const ETCD_NOT_MEASURED: &str = "not available yet: this scenario does not take etcd down yet, \
     nothing was measured (`holdfast-bench discovery` measures the rebuild after an etcd restart)";

/// Sets every flag when dropped, so background load stops on any exit path.
struct StopOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for flag in &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}
