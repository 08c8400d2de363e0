//! `latency`: delivery latency (publish → a plain async-nats subscriber)
//! through the relay vs a direct async-nats publisher, one message at a
//! time, with the send time in the payload.
//!
//! The judged comparison is with a local NATS leaf node in front of the
//! same nats-server (its hub), which adds a hop as the relay does:
//! `latency/vs leaf node` sets the p50 the relay adds to a direct publish
//! against the p50 the leaf adds.
//!
//! A message through the relay crosses one more process boundary than a
//! direct one (publisher → relay), so `latency/p50 added vs socket floor`
//! sets the added p50 against half a bare round trip between two processes
//! over a Unix socket ([`SocketFloor`]), measured alongside: the part of
//! the added latency no relay on this machine could avoid.

use super::{count_words, PassThrough, Settings};
use crate::error::{BenchError, Context, Result};
use crate::report::Row;
use crate::socket_floor::SocketFloor;
use crate::stats::{median, percentile};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use std::time::{Duration, Instant};

const PAYLOAD_BYTES: usize = 128;
const WARM_UP: u64 = 200;
/// The p50 the relay adds against the p50 a leaf node adds.
const TARGET_VS_LEAF: f64 = 1.0;
/// Longest a single message may take before the run counts as failed.
const MESSAGE_LIMIT: Duration = Duration::from_secs(5);

/// Who sends the timestamped messages.
enum Sender<'a> {
    Direct(&'a async_nats::Client),
    /// A client of a leaf node whose hub the subscriber is on.
    Leaf(&'a async_nats::Client),
    Relay(&'a holdfast_client::Client),
}

impl Sender<'_> {
    async fn send(&self, subject: &str, payload: Bytes) -> Result<()> {
        match self {
            Sender::Direct(client) => client
                .publish(subject.to_string(), payload)
                .await
                .context("publishing directly to NATS"),
            Sender::Leaf(client) => client
                .publish(subject.to_string(), payload)
                .await
                .context("publishing to the leaf node"),
            Sender::Relay(client) => client
                .publish(subject, payload)
                .await
                .context("publishing through the relay"),
        }
    }
}

/// Latencies in µs of `samples` messages sent one at a time, each after the
/// previous one arrived.
async fn measure(
    sender: Sender<'_>,
    nats_url: &str,
    subject: &str,
    samples: u64,
) -> Result<Vec<f64>> {
    let receiver = async_nats::connect(nats_url)
        .await
        .context("connecting the latency subscriber")?;
    let mut subscription = receiver
        .subscribe(subject.to_string())
        .await
        .context("subscribing on NATS")?;
    super::load::nats_round_trip(&receiver).await?;
    if let Sender::Leaf(publisher) = &sender {
        crate::leaf::wait_for_interest(publisher, &receiver, subject).await?;
    }
    let base = Instant::now();
    let mut latencies = Vec::with_capacity(usize::try_from(samples).unwrap_or(0));
    for index in 0..WARM_UP + samples {
        let mut payload = BytesMut::with_capacity(PAYLOAD_BYTES);
        payload.put_u64(nanos_since(base));
        payload.resize(PAYLOAD_BYTES, b'x');
        sender.send(subject, payload.freeze()).await?;
        let message = tokio::time::timeout(MESSAGE_LIMIT, subscription.next())
            .await
            .map_err(|_| BenchError::Timeout(format!("message {index} on {subject}")))?
            .ok_or_else(|| BenchError::Timeout(format!("subscription to {subject} ended")))?;
        let received = nanos_since(base);
        let mut stamp = [0u8; 8];
        if let Some(head) = message.payload.get(..8) {
            stamp.copy_from_slice(head);
        }
        let sent = u64::from_be_bytes(stamp);
        if index >= WARM_UP {
            latencies.push(received.saturating_sub(sent) as f64 / 1000.0);
        }
    }
    Ok(latencies)
}

fn nanos_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let samples = settings.pick(5_000, 20_000);
    let PassThrough {
        nats,
        relay: _relay,
        client,
        direct: publisher,
        leaf,
    } = PassThrough::start_with(super::RELAY_CONFIG).await?;
    let url = nats.url();

    let mut floor = SocketFloor::start().await?;
    let mut direct = (Vec::new(), Vec::new());
    let mut through = (Vec::new(), Vec::new());
    let mut via_leaf = Vec::new();
    let mut floor_p50 = Vec::new();
    for rep in 0..settings.repetitions {
        eprintln!(
            "  latency: repetition {} of {}",
            rep + 1,
            settings.repetitions
        );
        let subject = format!("bench.latency.direct.{rep}");
        let run = measure(Sender::Direct(&publisher), &url, &subject, samples).await?;
        direct.0.extend(percentile(&run, 50.0));
        direct.1.extend(percentile(&run, 99.0));
        let subject = format!("bench.latency.relay.{rep}");
        let run = measure(Sender::Relay(&client), &url, &subject, samples).await?;
        through.0.extend(percentile(&run, 50.0));
        through.1.extend(percentile(&run, 99.0));
        let subject = format!("bench.latency.leaf.{rep}");
        let run = measure(Sender::Leaf(&leaf.publisher), &url, &subject, samples).await?;
        via_leaf.extend(percentile(&run, 50.0));
        floor_p50.extend(percentile(&floor.round_trips(samples).await?, 50.0));
    }
    drop(floor);
    let _ = client.close().await;

    let note = format!(
        "{} messages of {PAYLOAD_BYTES} B per run{}, one at a time (each sent after the previous \
         arrived), {WARM_UP} warm-up; send time in the payload; per-run percentile, median over runs",
        count_words(samples),
        if settings.quick { " (quick; the full run uses 20k)" } else { "" }
    );
    let row = |name: &str, relay: &[f64], direct: &[f64], budget: f64| -> Row {
        let value = median(relay);
        let baseline_value = median(direct);
        let added = value.zip(baseline_value).map(|(value, base)| value - base);
        Row {
            scenario: format!("latency/{name}"),
            value,
            unit: "µs".to_string(),
            baseline: "direct async-nats".to_string(),
            baseline_value,
            target: format!("≤ +{budget:.0} µs"),
            met: added.map(|added| added <= budget),
            repetitions: settings.repetitions,
            added,
            note: note.clone(),
            ..Row::default()
        }
        .with_ratio()
    };
    let added_p50 = median(&through.0)
        .zip(median(&direct.0))
        .map(|(relay, direct)| relay - direct);
    let leaf_added = median(&via_leaf)
        .zip(median(&direct.0))
        .map(|(leaf, direct)| leaf - direct);
    let mut versus_leaf = Row {
        scenario: "latency/vs leaf node".to_string(),
        value: added_p50,
        unit: "µs".to_string(),
        baseline: "p50 a local leaf nats-server adds (async-nats → leaf → hub)".to_string(),
        baseline_value: leaf_added,
        target: format!("≤ {TARGET_VS_LEAF:.1}× the leaf's; lower is better"),
        repetitions: settings.repetitions,
        note: format!(
            "p50 added to a direct publish, by the relay (the value) and by the leaf node (the \
             baseline), the same runs as latency/p50; leaf p50 {}; per-run p50, median over runs",
            crate::report::format_value(median(&via_leaf), "µs")
        ),
        ..Row::default()
    };
    // A leaf that added nothing (or less than nothing, in noise) leaves no
    // meaningful ratio; say so instead of judging a sign flip.
    if leaf_added.is_some_and(|added| added > 0.0) {
        versus_leaf = versus_leaf.with_ratio();
        versus_leaf.met = versus_leaf.ratio.map(|ratio| ratio <= TARGET_VS_LEAF);
    } else {
        versus_leaf
            .note
            .push_str("; the leaf added no latency in this run, so there is no ratio");
    }
    let one_crossing = median(&floor_p50).map(|round_trip| round_trip / 2.0);
    let versus_floor = Row {
        scenario: "latency/p50 added vs socket floor".to_string(),
        value: added_p50,
        unit: "µs".to_string(),
        baseline: "half a bare 64 B round trip between two processes over a Unix socket, p50"
            .to_string(),
        baseline_value: one_crossing,
        target: "context, not judged: the relay's own share is the difference".to_string(),
        met: None,
        repetitions: settings.repetitions,
        added: added_p50
            .zip(one_crossing)
            .map(|(added, floor)| added - floor),
        note: format!(
            "the added p50 of the row above; the floor: {} round trips per run, tokio on both \
             sides, alternating with the messages; per-run p50, median over runs",
            count_words(samples)
        ),
        ..Row::default()
    }
    .with_ratio();
    Ok(vec![
        row("p50", &through.0, &direct.0, 30.0),
        row("p99", &through.1, &direct.1, 100.0),
        versus_leaf,
        versus_floor,
    ])
}
