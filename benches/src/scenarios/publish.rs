//! `publish`: end-to-end publish→subscribe throughput through the relay
//! (Unix socket), 128-byte payloads, against what a node would use instead:
//! a local NATS leaf node in front of the same nats-server (the judged row,
//! `publish/vs leaf node`), and, as context, a direct async-nats client;
//! for the `default` class (memory path) and the durable `kv_events` class
//! (journaled before forwarding); the `default` class over QUIC (mutual TLS
//! on loopback) vs the Unix socket; and relay to relay (a holdfast-client
//! subscriber on a second connection) vs direct. Except in the last, the
//! subscriber is a plain async-nats subscriber on the nats-server (the
//! leaf's hub). A row gives the CPU each message costs the relay: with
//! every process on the same cores, that is what bounds the ratio.

use super::load::{
    direct_publish, relay_publish, relay_to_relay_publish, DirectMessages, Throughput,
};
use super::load::{publish_counted, CountingSubscriber};
use super::{count_words, PassThrough, Settings, RELAY_CONFIG};
use crate::error::{Context, Result};
use crate::harness::{generate_certificates, proc_cpu_seconds, NatsServer, Relay};
use crate::leaf::{wait_for_interest, LeafNode};
use crate::report::Row;
use crate::stats::median;
use holdfast_client::{Client, ConnectOptions, RelayUrl};
use std::path::Path;

const PAYLOAD_BYTES: usize = 128;
/// Through the relay against through a local leaf node.
const TARGET_VS_LEAF: f64 = 1.0;
/// The relay's own CPU per `default` message, in µs.
const TARGET_CPU_US: f64 = 0.6;
/// QUIC relay throughput against the Unix socket's.
const QUIC_TARGET_RATIO: f64 = 0.5;
/// Messages sent once through each path before measuring.
const WARM_UP: u64 = 20_000;

pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let count = settings.pick(500_000, 1_000_000);
    let certificates = tempfile::tempdir().context("creating a certificate directory")?;
    generate_certificates(certificates.path())?;
    let config = format!("{RELAY_CONFIG}\n{}", quic_table(certificates.path()));
    let PassThrough {
        nats,
        relay,
        client,
        direct: publisher,
        leaf,
    } = PassThrough::start_with(&config).await?;
    let url = nats.url();
    let quic = quic_client(&client, certificates.path()).await?;

    direct_publish(
        &url,
        &publisher,
        "bench.warm.direct",
        WARM_UP,
        PAYLOAD_BYTES,
        DirectMessages::Bare,
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
    relay_publish(
        &url,
        &quic,
        "bench.warm.quic",
        Some("default"),
        WARM_UP,
        PAYLOAD_BYTES,
    )
    .await?;
    leaf_publish(&url, &leaf, &publisher, "bench.warm.leaf", WARM_UP).await?;
    relay_to_relay_publish(
        &client,
        &relay.url(),
        &publisher,
        "bench.warm.relay-sub",
        WARM_UP,
        PAYLOAD_BYTES,
    )
    .await?;

    let mut via_leaf = Vec::new();
    let mut relay_to_relay = Vec::new();
    // Messages the relay dropped for its subscriber in those runs.
    let mut relay_drops = RelayDrops::default();
    let mut direct = Vec::new();
    let mut default = Vec::new();
    let mut durable = Vec::new();
    let mut over_quic = Vec::new();
    let mut direct_cpu = Vec::new();
    let mut default_cpu = Vec::new();
    for rep in 0..settings.repetitions {
        eprintln!(
            "  publish: repetition {} of {}",
            rep + 1,
            settings.repetitions
        );
        let before = CpuTimes::read(&nats, &relay)?;
        let run = direct_publish(
            &url,
            &publisher,
            &format!("bench.publish.direct.{rep}"),
            count,
            PAYLOAD_BYTES,
            DirectMessages::Bare,
        )
        .await?;
        direct.push(run);
        let after_direct = CpuTimes::read(&nats, &relay)?;
        direct_cpu.push(after_direct.since(&before).per_message_us(count));
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
        let after_default = CpuTimes::read(&nats, &relay)?;
        default_cpu.push(after_default.since(&after_direct).per_message_us(count));
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
        let run = relay_publish(
            &url,
            &quic,
            &format!("bench.publish.quic.{rep}"),
            Some("default"),
            count,
            PAYLOAD_BYTES,
        )
        .await?;
        over_quic.push(run);
        let run = leaf_publish(
            &url,
            &leaf,
            &publisher,
            &format!("bench.publish.leaf.{rep}"),
            count,
        )
        .await?;
        via_leaf.push(run);
        let drops_before = RelayDrops::read(&client, &relay).await?;
        let run = relay_to_relay_publish(
            &client,
            &relay.url(),
            &publisher,
            &format!("bench.publish.relay-sub.{rep}"),
            count,
            PAYLOAD_BYTES,
        )
        .await?;
        relay_to_relay.push(run);
        relay_drops.add(
            &RelayDrops::read(&client, &relay)
                .await?
                .since(&drops_before),
        );
    }
    let _ = quic.close().await;
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
    let leaf_rate = median(&rates(&via_leaf));
    let row = |name: &str, runs: &[Throughput], against: Against| -> Row {
        let mut note = format!(
            "{sizes} of {PAYLOAD_BYTES} B, fire-and-forget, counted by {}",
            if matches!(against, Against::DirectToRelaySubscriber) {
                "a holdfast-client subscriber on a second relay connection (relay → NATS → relay)"
            } else {
                "a plain async-nats subscriber on the nats-server (the leaf's hub)"
            }
        );
        let baseline_runs = match against {
            Against::Leaf => &via_leaf,
            Against::Direct | Against::DirectToRelaySubscriber => &direct,
        };
        let missing = runs.iter().map(Throughput::missing).sum::<u64>();
        let baseline_missing = baseline_runs.iter().map(Throughput::missing).sum::<u64>();
        if missing > 0 {
            note.push_str(&format!(
                "; {missing} messages never reached the subscriber (all runs)"
            ));
        }
        if baseline_missing > 0 {
            note.push_str(&format!(
                "; {baseline_missing} never reached the baseline's subscriber"
            ));
        }
        if matches!(against, Against::DirectToRelaySubscriber) && missing > 0 {
            note.push_str(&format!("; {}", relay_drops.describe()));
        }
        let (baseline, baseline_value, target) = match against {
            Against::Leaf => (
                "async-nats → local leaf nats-server → hub (leafnodes remote)".to_string(),
                leaf_rate,
                format!("≥ {TARGET_VS_LEAF:.1}× leaf node"),
            ),
            Against::Direct => (
                "direct async-nats".to_string(),
                direct_rate,
                "context, not judged (the relay adds a hop; see publish/vs leaf node)".to_string(),
            ),
            Against::DirectToRelaySubscriber => (
                "direct async-nats publish→subscribe".to_string(),
                direct_rate,
                "context, not judged: two relay hops against none".to_string(),
            ),
        };
        let row = Row {
            scenario: format!("publish/{name}"),
            value: median(&rates(runs)),
            unit: "msg/s".to_string(),
            baseline,
            baseline_value,
            target,
            repetitions: settings.repetitions,
            note,
            ..Row::default()
        }
        .with_ratio();
        let met = match against {
            Against::Leaf => row.ratio.map(|ratio| ratio >= TARGET_VS_LEAF),
            Against::Direct | Against::DirectToRelaySubscriber => None,
        };
        Row { met, ..row }
    };
    let unix_rate = median(&rates(&default));
    let missing: u64 = over_quic.iter().map(Throughput::missing).sum();
    let mut quic_note =
        format!("{sizes} of {PAYLOAD_BYTES} B, class default, QUIC with mutual TLS on loopback");
    if missing > 0 {
        quic_note.push_str(&format!(
            "; {missing} messages never reached the subscriber"
        ));
    }
    let quic_row = Row {
        scenario: "publish/quic (default)".to_string(),
        value: median(&rates(&over_quic)),
        unit: "msg/s".to_string(),
        baseline: "holdfast over the Unix socket".to_string(),
        baseline_value: unix_rate,
        target: format!("≥ {QUIC_TARGET_RATIO}× Unix socket"),
        repetitions: settings.repetitions,
        note: quic_note,
        ..Row::default()
    }
    .with_ratio();
    let quic_met = quic_row.ratio.map(|ratio| ratio >= QUIC_TARGET_RATIO);
    Ok(vec![
        row("vs leaf node", &default, Against::Leaf),
        row("default", &default, Against::Direct),
        row("kv_events (durable)", &durable, Against::Direct),
        Row {
            met: quic_met,
            ..quic_row
        },
        row(
            "to relay subscriber",
            &relay_to_relay,
            Against::DirectToRelaySubscriber,
        ),
        cpu_row(settings, &direct_cpu, &default_cpu),
    ])
}

/// The relay's count of messages it dropped because a local subscriber's
/// queue was full.
/// What the relay counted of messages it could not deliver to its
/// subscriber: where a relay-to-relay run's missing messages went.
#[derive(Debug, Clone, Copy, Default)]
struct RelayDrops {
    /// Its subscriber's queue was full (`slow_consumer` policy drop).
    local: u64,
    /// Its own NATS client dropped them (an upstream subscription not read
    /// fast enough).
    upstream: u64,
    /// Its subscriber connection to NATS was lost and made again (what
    /// nats-server sent meanwhile is gone, uncounted).
    reconnects: u64,
}

impl RelayDrops {
    async fn read(client: &Client, relay: &Relay) -> Result<RelayDrops> {
        let status = client
            .status()
            .await
            .context("asking the relay for its status")?;
        let metrics = relay.metrics_text()?;
        Ok(RelayDrops {
            local: crate::relay_status::counter(&status, "slow_consumer_drops"),
            upstream: crate::relay_status::dropped_total(&metrics, "upstream_slow_consumer"),
            reconnects: status["nats"]["subscriptions_connection"]["reconnects"]
                .as_u64()
                .unwrap_or(0),
        })
    }

    fn since(&self, earlier: &RelayDrops) -> RelayDrops {
        RelayDrops {
            local: self.local.saturating_sub(earlier.local),
            upstream: self.upstream.saturating_sub(earlier.upstream),
            reconnects: self.reconnects.saturating_sub(earlier.reconnects),
        }
    }

    fn add(&mut self, more: &RelayDrops) {
        self.local += more.local;
        self.upstream += more.upstream;
        self.reconnects += more.reconnects;
    }

    fn describe(&self) -> String {
        format!(
            "the relay counted {} drops for its full subscriber queue (slow_consumer), {} by its \
             own NATS client (upstream_slow_consumer), and {} reconnects of its subscriber \
             connection (messages nats-server sent meanwhile are not counted)",
            self.local, self.upstream, self.reconnects
        )
    }
}

/// What a throughput row is compared with.
#[derive(Debug, Clone, Copy)]
enum Against {
    /// The same messages through a local leaf node to the hub.
    Leaf,
    /// A direct async-nats publisher to the same server.
    Direct,
    /// Direct publish→subscribe, for the relay-to-relay path.
    DirectToRelaySubscriber,
}

/// `count` messages from the leaf's publisher to a plain subscriber on the
/// hub (`hub_url`), once the leaf knows of the subscription.
async fn leaf_publish(
    hub_url: &str,
    leaf: &LeafNode,
    hub: &async_nats::Client,
    subject: &str,
    count: u64,
) -> Result<Throughput> {
    let subscriber = CountingSubscriber::start(hub_url, subject, count).await?;
    wait_for_interest(&leaf.publisher, hub, subject).await?;
    publish_counted(
        &leaf.publisher,
        subscriber,
        subject,
        count,
        PAYLOAD_BYTES,
        DirectMessages::Bare,
    )
    .await
}

/// CPU seconds (user + system, all threads) of the processes a publish run
/// keeps busy.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    nats: f64,
    relay: f64,
    /// This process: the publishers and the counting subscriber.
    bench: f64,
}

impl CpuTimes {
    fn read(nats: &NatsServer, relay: &Relay) -> Result<CpuTimes> {
        Ok(CpuTimes {
            nats: nats.cpu_seconds()?,
            relay: relay.cpu_seconds()?,
            bench: proc_cpu_seconds(std::process::id())?,
        })
    }

    fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            nats: self.nats - earlier.nats,
            relay: self.relay - earlier.relay,
            bench: self.bench - earlier.bench,
        }
    }

    /// Seconds per `count` messages, in µs per message.
    fn per_message_us(&self, count: u64) -> CpuTimes {
        let scale = 1e6 / count.max(1) as f64;
        CpuTimes {
            nats: self.nats * scale,
            relay: self.relay * scale,
            bench: self.bench * scale,
        }
    }
}

/// The relay's CPU per message of `publish/default` against the whole
/// direct path's (nats-server, publisher and subscriber) per message. Every
/// process shares the same cores, so a CPU-bound run's throughput ratio is
/// about direct CPU / (direct CPU + what the relay path adds).
fn cpu_row(settings: &Settings, direct: &[CpuTimes], default: &[CpuTimes]) -> Row {
    let field = |runs: &[CpuTimes], pick: fn(&CpuTimes) -> f64| {
        median(&runs.iter().map(pick).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let direct_total = field(direct, |cpu| cpu.nats + cpu.bench);
    let relay_cpu = field(default, |cpu| cpu.relay);
    let relay_total = field(default, |cpu| cpu.relay + cpu.nats + cpu.bench);
    let note = format!(
        "the publish/default and direct runs; CPU time (user + system, all threads) per message. \
         Direct: nats-server {:.2} µs, publisher and subscriber {:.2} µs. Through the relay: \
         relay {:.2} µs, nats-server {:.2} µs, publisher and subscriber {:.2} µs. All share the \
         machine's cores, so the throughput ratio follows the CPU: these figures predict \
         {:.2}× direct; the row's value (judged) is the relay's own share; per-run figures, \
         median over runs",
        field(direct, |cpu| cpu.nats),
        field(direct, |cpu| cpu.bench),
        relay_cpu,
        field(default, |cpu| cpu.nats),
        field(default, |cpu| cpu.bench),
        direct_total / relay_total,
    );
    Row {
        scenario: "publish/cpu per message".to_string(),
        // NaN only without runs: then there is no figure.
        value: Some(relay_cpu).filter(|cpu| cpu.is_finite()),
        unit: "µs".to_string(),
        baseline: "direct path: nats-server, publisher and subscriber".to_string(),
        baseline_value: Some(direct_total).filter(|total| total.is_finite()),
        target: format!("relay ≤ {TARGET_CPU_US} µs; lower is better"),
        met: Some(relay_cpu)
            .filter(|cpu| cpu.is_finite())
            .map(|cpu| cpu <= TARGET_CPU_US),
        repetitions: settings.repetitions,
        note,
        ..Row::default()
    }
    .with_ratio()
}

/// The relay's `[quic]` table: loopback, any free port, mutual TLS.
fn quic_table(certificates: &Path) -> String {
    format!(
        "[quic]\naddr = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        certificates.join("server.pem").display(),
        certificates.join("server.key").display(),
        certificates.join("ca.pem").display()
    )
}

/// A client connected over QUIC to the relay `unix_client` is connected to,
/// at the address the relay's status reports.
async fn quic_client(unix_client: &Client, certificates: &Path) -> Result<Client> {
    let status = unix_client
        .status()
        .await
        .context("reading the relay's status")?;
    let Some(address) = status["quic"].as_str() else {
        return Err(crate::error::failed(
            "finding the QUIC listener",
            "the relay's status has no `quic` address",
        ));
    };
    let url: RelayUrl = format!("quic://{address}")
        .parse()
        .context("parsing the QUIC URL")?;
    let options = ConnectOptions::new(url)
        .tls_ca(certificates.join("ca.pem"))
        .tls_client_cert(
            certificates.join("client.pem"),
            certificates.join("client.key"),
        );
    Client::connect_with(options)
        .await
        .context("connecting to holdfastd over QUIC")
}

fn rates(runs: &[Throughput]) -> Vec<f64> {
    runs.iter().map(|run| run.rate).collect()
}
