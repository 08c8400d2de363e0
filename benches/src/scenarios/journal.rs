//! `journal`: durable ingest into the relay's journal with NATS down (acks
//! awaited, pipelined), vs (a) raw append + fdatasync of a file in batches of
//! the pipeline window, the disk's limit, and (b) async publish into a local
//! JetStream file-store stream (acks awaited, same window), both with
//! nats-server's default background sync and with `sync_interval: always`
//! (every write fsynced before its PubAck: the relay's durability, which
//! answers `Journaled` only after the commit's fdatasync; nats-server 2.10
//! and later). 256-byte payloads.
//! A third row compares the ack latency p99 of the two pipelined ingests,
//! a fourth the CPU time each server spent per durable message (relay vs
//! nats-server, all threads, user + system, read from /proc): what a node
//! pays per message. It rises with contention too (smaller group commits,
//! more context switches): 2.1 µs in a quiet run and 2.9 µs in a busy one
//! of the same build.

use super::load::{ingest, payload, PIPELINE_WINDOW};
use super::{count_words, Settings, RELAY_CONFIG};
use crate::error::{failed, BenchError, Context, Result};
use crate::harness::{NatsServer, NatsServerBinary, Relay};
use crate::relay_status::wait_for_nats;
use crate::report::Row;
use crate::stats::median;
use async_nats::jetstream;
use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

const PAYLOAD_BYTES: usize = 256;
/// Relay ingest against raw append + fdatasync, the disk's limit.
const TARGET_VS_RAW: f64 = 0.25;
/// Relay ingest against JetStream with its default (background) sync.
const TARGET_VS_JETSTREAM: f64 = 3.0;
/// nats-server's JetStream setting for an fsync before every PubAck.
const SYNC_ALWAYS_CONFIG: &str = "jetstream {\n  sync_interval: always\n}\n";
/// Ack latency p99 of the durable ingest, in milliseconds.
const ACK_P99_TARGET_MS: f64 = 10.0;
const ACK_LIMIT: Duration = Duration::from_secs(60);

/// One durable ingest, through the relay or into JetStream.
struct DurableIngest {
    rate: f64,
    /// Relay acks that were not `Journaled`.
    not_journaled: u64,
    ack_p99_ms: Option<f64>,
    /// CPU time of the server (relay or nats-server) per message, in µs.
    cpu_us_per_message: f64,
}

/// `cpu_seconds` spent on `count` messages, in µs per message.
fn per_message_us(cpu_seconds: f64, count: u64) -> f64 {
    cpu_seconds * 1e6 / count.max(1) as f64
}

/// One relay ingest with NATS killed.
async fn relay_ingest(count: u64) -> Result<DurableIngest> {
    let mut nats = NatsServer::start(false).await?;
    let relay = Relay::start(&nats.url(), RELAY_CONFIG).await?;
    let client = holdfast_client::Client::connect(&relay.url())
        .await
        .context("connecting to holdfastd")?;
    wait_for_nats(&client, "up", Duration::from_secs(10)).await?;
    nats.kill();
    wait_for_nats(&client, "down", Duration::from_secs(10)).await?;
    let cpu_before = relay.cpu_seconds()?;
    let run = ingest(
        &client,
        "bench.journal.ingest",
        "kv_events",
        count,
        PAYLOAD_BYTES,
    )
    .await?;
    let cpu_seconds = relay.cpu_seconds()? - cpu_before;
    let _ = client.close().await;
    drop(relay);
    Ok(DurableIngest {
        rate: run.rate,
        not_journaled: run.other,
        ack_p99_ms: run.ack_p99_ms,
        cpu_us_per_message: per_message_us(cpu_seconds, count),
    })
}

/// Appends `count` records of `PAYLOAD_BYTES` to a fresh file (in the same
/// temp file system as the relay's data dir), fdatasync after each batch of
/// `PIPELINE_WINDOW`.
fn raw_append(count: u64) -> Result<f64> {
    let dir = tempfile::tempdir().context("creating the raw-append temp dir")?;
    let path = dir.path().join("raw.log");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .context("creating the raw-append file")?;
    let batch = vec![b'x'; PAYLOAD_BYTES * PIPELINE_WINDOW];
    let window = PIPELINE_WINDOW as u64;
    let start = Instant::now();
    let mut written = 0u64;
    while written < count {
        let records = window.min(count - written);
        let bytes = usize::try_from(records).unwrap_or(PIPELINE_WINDOW) * PAYLOAD_BYTES;
        file.write_all(&batch[..bytes])
            .context("appending to the raw file")?;
        file.sync_data().context("fdatasync of the raw file")?;
        written += records;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

/// When JetStream's file store syncs to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JetStreamSync {
    /// nats-server's default: in the background, every 2 minutes.
    Background,
    /// `sync_interval: always`: before every PubAck.
    Always,
}

/// Async publishes into a JetStream file-store stream with `PIPELINE_WINDOW`
/// acks in flight.
async fn jetstream_publish(count: u64, sync: JetStreamSync) -> Result<DurableIngest> {
    let config = (sync == JetStreamSync::Always).then(|| SYNC_ALWAYS_CONFIG.to_string());
    let nats = NatsServer::start_with(true, config).await?;
    let client = async_nats::connect(nats.url())
        .await
        .context("connecting to the JetStream server")?;
    let context = jetstream::new(client);
    context
        .create_stream(jetstream::stream::Config {
            name: "BENCH".to_string(),
            subjects: vec!["bench.js.>".to_string()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    let body = payload(PAYLOAD_BYTES);
    // Built once and shared, as the relay's publisher does.
    let subject = async_nats::Subject::from("bench.js.ingest");
    let mut pending = VecDeque::with_capacity(PIPELINE_WINDOW + 1);
    let mut latencies_ms = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let cpu_before = nats.cpu_seconds()?;
    let start = Instant::now();
    for _ in 0..count {
        let sent = Instant::now();
        let ack = context
            .publish(subject.clone(), body.clone())
            .await
            .context("publishing to JetStream")?;
        pending.push_back((sent, ack));
        if pending.len() >= PIPELINE_WINDOW {
            if let Some((sent, ack)) = pending.pop_front() {
                await_puback(ack).await?;
                latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    while let Some((sent, ack)) = pending.pop_front() {
        await_puback(ack).await?;
        latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    let rate = count as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let cpu_seconds = nats.cpu_seconds()? - cpu_before;
    drop(nats);
    Ok(DurableIngest {
        rate,
        not_journaled: 0,
        ack_p99_ms: crate::stats::percentile(&latencies_ms, 99.0),
        cpu_us_per_message: per_message_us(cpu_seconds, count),
    })
}

async fn await_puback(ack: jetstream::context::PublishAckFuture) -> Result<()> {
    tokio::time::timeout(ACK_LIMIT, ack)
        .await
        .map_err(|_| BenchError::Timeout("a JetStream PubAck".to_string()))?
        .context("a JetStream publish")?;
    Ok(())
}

pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let count = settings.pick(500_000, 1_000_000);
    let js_count = settings.pick(200_000, 500_000);
    // An fsync per write runs at a few thousand messages a second here.
    let sync_count = settings.pick(10_000, 50_000);
    let nats_binary = NatsServerBinary::find()?;
    let sync_always = nats_binary.has_sync_interval();
    let mut js_sync = Vec::new();
    let mut js_sync_p99 = Vec::new();
    let mut relay = Vec::new();
    let mut raw = Vec::new();
    let mut js = Vec::new();
    let mut relay_p99 = Vec::new();
    let mut js_p99 = Vec::new();
    let mut relay_cpu = Vec::new();
    let mut js_cpu = Vec::new();
    let mut not_journaled = 0;
    for rep in 0..settings.repetitions {
        eprintln!(
            "  journal: repetition {} of {}",
            rep + 1,
            settings.repetitions
        );
        let ingest = relay_ingest(count).await?;
        relay.push(ingest.rate);
        relay_p99.extend(ingest.ack_p99_ms);
        relay_cpu.push(ingest.cpu_us_per_message);
        not_journaled += ingest.not_journaled;
        let rate = tokio::task::spawn_blocking(move || raw_append(count))
            .await
            .map_err(|error| failed("raw-append task", error))??;
        raw.push(rate);
        let ingest = jetstream_publish(js_count, JetStreamSync::Background).await?;
        js.push(ingest.rate);
        js_p99.extend(ingest.ack_p99_ms);
        js_cpu.push(ingest.cpu_us_per_message);
        if sync_always {
            let ingest = jetstream_publish(sync_count, JetStreamSync::Always).await?;
            js_sync.push(ingest.rate);
            js_sync_p99.extend(ingest.ack_p99_ms);
        }
    }
    let quick = if settings.quick {
        " (quick; the full run uses 1M and 500k)"
    } else {
        ""
    };
    let mut note = format!(
        "relay: {} messages of {PAYLOAD_BYTES} B into kv_events (durable) with NATS killed, \
         acks awaited, {PIPELINE_WINDOW} in flight; raw file: same count and size, fdatasync \
         every {PIPELINE_WINDOW}; JetStream: {} messages{quick}",
        count_words(count),
        count_words(js_count)
    );
    if not_journaled > 0 {
        note.push_str(&format!(
            "; {not_journaled} acks said something other than journaled"
        ));
    }
    let value = median(&relay);
    let disk = Row {
        scenario: "journal/vs raw fdatasync".to_string(),
        value,
        unit: "msg/s".to_string(),
        baseline: format!("raw append+fdatasync, batches of {PIPELINE_WINDOW}"),
        baseline_value: median(&raw),
        target: format!("≥ {TARGET_VS_RAW}× raw"),
        repetitions: settings.repetitions,
        note: note.clone(),
        ..Row::default()
    }
    .with_ratio();
    let disk_met = disk.ratio.map(|ratio| ratio >= TARGET_VS_RAW);
    let jetstream = Row {
        scenario: "journal/vs JetStream".to_string(),
        value,
        unit: "msg/s".to_string(),
        baseline: format!(
            "JetStream file store (default sync), async publish, {PIPELINE_WINDOW} in flight"
        ),
        baseline_value: median(&js),
        target: format!("≥ {TARGET_VS_JETSTREAM:.0}× JetStream"),
        repetitions: settings.repetitions,
        note: format!(
            "the same runs, {}; not equally durable: nats-server answers a PubAck before the \
             message is fsynced (its file store syncs in the background, by default every \
             2 minutes), the relay answers Journaled only after the commit's fdatasync",
            nats_binary.describe()
        ),
        ..Row::default()
    }
    .with_ratio();
    let mut equal = Row {
        scenario: "journal/vs JetStream sync always".to_string(),
        value,
        unit: "msg/s".to_string(),
        baseline: format!(
            "JetStream file store, sync_interval: always, async publish, {PIPELINE_WINDOW} in flight"
        ),
        target: "context, not judged: equal durability (an fsync before every ack)".to_string(),
        repetitions: settings.repetitions,
        ..Row::default()
    };
    if sync_always {
        equal.baseline_value = median(&js_sync);
        equal.note = format!(
            "the same relay runs; JetStream: {} messages per run{}, {}, server started with \
             `jetstream {{ sync_interval: always }}`; its PubAck p99 {}",
            count_words(sync_count),
            if settings.quick {
                " (quick; the full run uses 50k)"
            } else {
                ""
            },
            nats_binary.describe(),
            median(&js_sync_p99).map_or("-".to_string(), |p99| format!("{p99:.2} ms"))
        );
        equal = equal.with_ratio();
    } else {
        equal.repetitions = 0;
        equal.note = format!(
            "not measured: {} has no sync_interval (nats-server 2.10 or later has; \
             deploy/install-deps.sh installs one into .deps/bin, or set HOLDFAST_NATS_SERVER)",
            nats_binary.describe()
        );
    }
    let met = jetstream.ratio.map(|ratio| ratio >= TARGET_VS_JETSTREAM);
    let ack_p99 = median(&relay_p99);
    let latency = Row {
        scenario: "journal/ack p99".to_string(),
        value: ack_p99,
        unit: "ms".to_string(),
        baseline: format!("JetStream PubAck, {PIPELINE_WINDOW} in flight"),
        baseline_value: median(&js_p99),
        target: format!("≤ {ACK_P99_TARGET_MS} ms"),
        met: ack_p99.map(|p99| p99 <= ACK_P99_TARGET_MS),
        repetitions: settings.repetitions,
        note: format!(
            "the same runs; publish call to ack received, timed by the publisher with \
             {PIPELINE_WINDOW} in flight; per-run percentile, median over runs"
        ),
        ..Row::default()
    }
    .with_ratio();
    let cpu = Row {
        scenario: "journal/cpu per message".to_string(),
        value: median(&relay_cpu),
        unit: "µs".to_string(),
        baseline: "nats-server CPU per JetStream message".to_string(),
        baseline_value: median(&js_cpu),
        target: "context, not judged; lower is better".to_string(),
        repetitions: settings.repetitions,
        note: "the same runs; CPU time (user + system, all threads) of the relay, resp. \
               nats-server, during the ingest, divided by the messages; per-run figure, median \
               over runs"
            .to_string(),
        ..Row::default()
    }
    .with_ratio();
    Ok(vec![
        Row {
            met: disk_met,
            ..disk
        },
        Row { met, ..jetstream },
        equal,
        latency,
        cpu,
    ])
}
