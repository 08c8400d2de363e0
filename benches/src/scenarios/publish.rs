//! `publish`: end-to-end publish→subscribe throughput through the relay
//! (Unix socket) vs a direct async-nats client to the same nats-server, with
//! 128-byte payloads, for the `default` class (memory path) and the durable
//! `kv_events` class (journaled before forwarding). The subscriber is a plain
//! async-nats subscriber on the NATS side.

use super::load::{direct_publish, relay_publish, Throughput};
use super::{count_words, PassThrough, Settings};
use crate::error::Result;
use crate::report::Row;
use crate::stats::median;

const PAYLOAD_BYTES: usize = 128;
const TARGET_RATIO: f64 = 0.8;
/// Messages sent once through each path before measuring.
const WARM_UP: u64 = 20_000;

pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let count = settings.pick(500_000, 1_000_000);
    let PassThrough {
        nats,
        relay: _relay,
        client,
        direct: publisher,
    } = PassThrough::start().await?;
    let url = nats.url();

    direct_publish(
        &url,
        &publisher,
        "bench.warm.direct",
        WARM_UP,
        PAYLOAD_BYTES,
    )
    .await?;
    relay_publish(
        &url,
        &client,
        "bench.warm.default",
        Some("default"),
        WARM_UP,
        PAYLOAD_BYTES,
    )
    .await?;
    relay_publish(
        &url,
        &client,
        "bench.warm.kv",
        Some("kv_events"),
        WARM_UP,
        PAYLOAD_BYTES,
    )
    .await?;

    let mut direct = Vec::new();
    let mut default = Vec::new();
    let mut durable = Vec::new();
    for rep in 0..settings.repetitions {
        eprintln!(
            "  publish: repetition {} of {}",
            rep + 1,
            settings.repetitions
        );
        let run = direct_publish(
            &url,
            &publisher,
            &format!("bench.publish.direct.{rep}"),
            count,
            PAYLOAD_BYTES,
        )
        .await?;
        direct.push(run);
        let run = relay_publish(
            &url,
            &client,
            &format!("bench.publish.default.{rep}"),
            Some("default"),
            count,
            PAYLOAD_BYTES,
        )
        .await?;
        default.push(run);
        let run = relay_publish(
            &url,
            &client,
            &format!("bench.publish.kv.{rep}"),
            Some("kv_events"),
            count,
            PAYLOAD_BYTES,
        )
        .await?;
        durable.push(run);
    }
    let _ = client.close().await;

    let sizes = if settings.quick {
        format!(
            "{} messages per run (quick; the full run sends 1M)",
            count_words(count)
        )
    } else {
        format!("{} messages per run", count_words(count))
    };
    let direct_rate = median(&rates(&direct));
    let row = |name: &str, runs: &[Throughput]| -> Row {
        let mut note = format!(
            "{sizes} of {PAYLOAD_BYTES} B, fire-and-forget, counted by a plain async-nats subscriber"
        );
        let missing = runs.iter().map(Throughput::missing).sum::<u64>()
            + direct.iter().map(Throughput::missing).sum::<u64>();
        if missing > 0 {
            note.push_str(&format!(
                "; {missing} messages never reached the subscriber"
            ));
        }
        let row = Row {
            scenario: format!("publish/{name}"),
            value: median(&rates(runs)),
            unit: "msg/s".to_string(),
            baseline: "direct async-nats".to_string(),
            baseline_value: direct_rate,
            target: format!("≥ {TARGET_RATIO}× direct"),
            repetitions: settings.repetitions,
            note,
            ..Row::default()
        }
        .with_ratio();
        let met = row.ratio.map(|ratio| ratio >= TARGET_RATIO);
        Row { met, ..row }
    };
    Ok(vec![
        row("default", &default),
        row("kv_events (durable)", &durable),
    ])
}

fn rates(runs: &[Throughput]) -> Vec<f64> {
    runs.iter().map(|run| run.rate).collect()
}
