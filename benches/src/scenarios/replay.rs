//! `replay`: how fast the relay drains a journaled backlog once NATS
//! returns, vs the direct async-nats publish→subscribe rate of the same
//! messages on the same server.
//!
//! The backlog is journaled with NATS killed; NATS is started again on the
//! same port and a plain subscriber connects at once (the relay reconnects
//! only at its next backoff step). The drain starts when the relay reports
//! its NATS link up and ends when the subscriber saw the whole backlog — or,
//! if it missed some, when the relay's status shows an empty backlog.
//!
//! A second row compares the same drain with direct publish→subscribe of
//! messages carrying the four headers the relay stamps on every journaled
//! message: the subscriber parses those on each replayed message, and that
//! parsing, not the relay, bounded the drain on a 2-core machine.

use super::load::{direct_publish, ingest, CountingSubscriber, DirectMessages};
use super::{count_words, Settings, RELAY_CONFIG};
use crate::error::{BenchError, Context, Result};
use crate::harness::{NatsServer, Relay};
use crate::relay_status::{class_backlog, wait_for_backlog, wait_for_nats};
use crate::report::Row;
use crate::stats::median;
use holdfast_client::{LinkEvent, LinkStatus, Service};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

const PAYLOAD_BYTES: usize = 256;
/// Drain rate against direct publish→subscribe of the same messages.
const TARGET_VS_DIRECT: f64 = 0.35;
const SUBJECT: &str = "bench.replay.backlog";
/// Bound on waiting for the backlog to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// One repetition's figures.
struct Drain {
    direct: f64,
    /// Direct, each message with the four headers the relay stamps.
    direct_stamped: f64,
    /// Backlog / (subscriber saw the last message − link up), or by status.
    delivered: f64,
    /// Backlog / (status shows 0 − link up).
    confirmed: f64,
    subscriber_saw_all: bool,
    journaled: u64,
}

async fn once(count: u64) -> Result<Drain> {
    let mut nats = NatsServer::start(false).await?;
    let relay = Relay::start(&nats.url(), RELAY_CONFIG).await?;
    let client = holdfast_client::Client::connect(&relay.url())
        .await
        .context("connecting to holdfastd")?;
    wait_for_nats(&client, "up", Duration::from_secs(10)).await?;
    let (direct, direct_stamped) = {
        let publisher = async_nats::connect(nats.url())
            .await
            .context("connecting the direct publisher")?;
        let mut rates = Vec::with_capacity(2);
        for (subject, messages) in [
            ("bench.replay.direct", DirectMessages::Bare),
            ("bench.replay.stamped", DirectMessages::StampedLikeTheRelay),
        ] {
            let run = direct_publish(
                &nats.url(),
                &publisher,
                subject,
                count,
                PAYLOAD_BYTES,
                messages,
            )
            .await?;
            rates.push(run.rate);
        }
        (rates[0], rates[1])
    };

    nats.kill();
    wait_for_nats(&client, "down", Duration::from_secs(10)).await?;
    let run = ingest(&client, SUBJECT, "kv_events", count, PAYLOAD_BYTES).await?;
    let journaled = wait_for_backlog(&client, "kv_events", count, Duration::from_secs(30)).await?;

    // Listen for the link coming up before NATS is back, so the moment is exact.
    let mut events = client.link_events();
    let link_up = tokio::spawn(async move {
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(LinkEvent::Upstream {
                        service: Service::Nats,
                        status: LinkStatus::Up,
                    }) => return Some(Instant::now()),
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return None,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .ok()
            .flatten()
    });
    nats.restart().await?;
    let subscriber = CountingSubscriber::start(&nats.url(), SUBJECT, journaled).await?;

    let deadline = Instant::now() + DRAIN_LIMIT;
    let drained_at = loop {
        let status = client
            .status()
            .await
            .context("asking the relay for its status")?;
        if class_backlog(&status, "kv_events") == 0 {
            break Instant::now();
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the relay to drain its backlog (still {} messages)",
                class_backlog(&status, "kv_events")
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let counted = subscriber.finish_within(Duration::from_secs(5)).await;
    let up_at = link_up
        .await
        .context("link event task")?
        .ok_or_else(|| BenchError::Timeout("the relay to report its NATS link up".to_string()))?;
    let _ = client.close().await;
    drop(relay);

    let subscriber_saw_all = counted.received >= journaled;
    let rate_until = |end: Instant| {
        journaled as f64 / end.saturating_duration_since(up_at).as_secs_f64().max(1e-9)
    };
    let confirmed = rate_until(drained_at);
    let delivered = match counted.last {
        Some(last) if subscriber_saw_all => rate_until(last),
        _ => confirmed,
    };
    if run.other > 0 {
        eprintln!("  replay: {} acks were not journaled", run.other);
    }
    Ok(Drain {
        direct,
        direct_stamped,
        delivered,
        confirmed,
        subscriber_saw_all,
        journaled,
    })
}

pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let count = settings.pick(500_000, 1_000_000);
    let mut drains = Vec::new();
    for rep in 0..settings.repetitions {
        eprintln!(
            "  replay: repetition {} of {}",
            rep + 1,
            settings.repetitions
        );
        drains.push(once(count).await?);
    }
    let value = median(&drains.iter().map(|d| d.delivered).collect::<Vec<_>>());
    let confirmed = median(&drains.iter().map(|d| d.confirmed).collect::<Vec<_>>());
    let partial = drains.iter().filter(|d| !d.subscriber_saw_all).count();
    let short = drains.iter().filter(|d| d.journaled != count).count();
    let mut note = format!(
        "backlog of {} messages of {PAYLOAD_BYTES} B in kv_events{}; from the relay reporting \
         NATS up to the subscriber seeing the last message; until the status showed the backlog \
         confirmed (0): {}",
        count_words(count),
        if settings.quick {
            " (quick; the full run uses 1M)"
        } else {
            ""
        },
        crate::report::format_value(confirmed, "msg/s")
    );
    if partial > 0 {
        note.push_str(&format!(
            "; in {partial} run(s) the subscriber missed messages, so the status time was used"
        ));
    }
    if short > 0 {
        note.push_str(&format!(
            "; in {short} run(s) the status showed a backlog other than {count}"
        ));
    }
    let row = Row {
        scenario: "replay".to_string(),
        value,
        unit: "msg/s".to_string(),
        baseline: "direct async-nats publish→subscribe".to_string(),
        baseline_value: median(&drains.iter().map(|d| d.direct).collect::<Vec<_>>()),
        target: format!("≥ {TARGET_VS_DIRECT}× direct"),
        repetitions: settings.repetitions,
        note,
        ..Row::default()
    }
    .with_ratio();
    let met = row.ratio.map(|ratio| ratio >= TARGET_VS_DIRECT);
    let same_headers = Row {
        scenario: "replay/vs direct, same headers".to_string(),
        value,
        unit: "msg/s".to_string(),
        baseline: "direct async-nats publish→subscribe, the relay's four stamped headers on each"
            .to_string(),
        baseline_value: median(&drains.iter().map(|d| d.direct_stamped).collect::<Vec<_>>()),
        target: "context, not judged: the same messages as the replay delivers".to_string(),
        repetitions: settings.repetitions,
        note: "the same replays; the baseline's publisher puts Holdfast-Relay, Holdfast-Seq, \
               Holdfast-Chain and Nats-Msg-Id (values of the relay's lengths) on each message, \
               as the relay stamps every journaled one; parsing them is most of what a \
               subscriber spends per replayed message (async-nats builds a header map)"
            .to_string(),
        ..Row::default()
    }
    .with_ratio();
    Ok(vec![Row { met, ..row }, same_headers])
}
