//! `footprint`: the relay's resident memory while it holds N journaled
//! messages, and the time from process start to ready (socket accepts and
//! the status answers) when it restarts with those N in its journal, each
//! against the same relay with an empty journal.

use super::load::ingest;
use super::{count_words, Settings, RELAY_CONFIG};
use crate::error::{Context, Result};
use crate::harness::{NatsServer, Relay};
use crate::relay_status::{class_backlog, wait_for_backlog, wait_for_nats};
use crate::report::Row;
use crate::stats::median;
use holdfast_client::Client;
use std::time::{Duration, Instant};

const PAYLOAD_BYTES: usize = 256;
const TARGET_RSS_MIB: f64 = 100.0;
const TARGET_RESTART_SECONDS: f64 = 2.0;
/// The message count the targets are stated for.
const TARGET_COUNT: u64 = 5_000_000;

/// How long a restart took until each step answered, in seconds from spawn.
#[derive(Debug, Clone, Copy)]
struct Restart {
    accepting: f64,
    welcomed: f64,
    ready: f64,
}

/// Kills the relay, starts it again and returns the restart's timings, the
/// client and the status it answered.
async fn restart(
    relay: &mut Relay,
    client: Client,
) -> Result<(Restart, Client, serde_json::Value)> {
    let _ = client.close().await;
    drop(client);
    relay.kill();
    let start = Instant::now();
    relay.spawn().await?;
    let accepting = start.elapsed().as_secs_f64();
    let client = Client::connect(&relay.url())
        .await
        .context("connecting to the restarted holdfastd")?;
    let welcomed = start.elapsed().as_secs_f64();
    let status = client
        .status()
        .await
        .context("asking the restarted relay for its status")?;
    let timings = Restart {
        accepting,
        welcomed,
        ready: start.elapsed().as_secs_f64(),
    };
    Ok((timings, client, status))
}

/// "accepting 0.005 s, welcomed 0.010 s" from the medians of `restarts`.
fn steps(restarts: &[Restart]) -> String {
    let of = |pick: fn(&Restart) -> f64| {
        median(&restarts.iter().map(pick).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    format!(
        "socket accepting after {:.3} s, client welcomed after {:.3} s, status answered after {:.3} s",
        of(|r| r.accepting),
        of(|r| r.welcomed),
        of(|r| r.ready)
    )
}

pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let count = settings.pick(1_000_000, TARGET_COUNT);
    let mut nats = NatsServer::start(false).await?;
    let mut relay = Relay::start(&nats.url(), RELAY_CONFIG).await?;
    let mut client = Client::connect(&relay.url())
        .await
        .context("connecting to holdfastd")?;
    wait_for_nats(&client, "up", Duration::from_secs(10)).await?;
    let idle_rss = relay.rss_mib()?;

    // Restarts are measured with NATS down, as they will be with a backlog.
    nats.kill();
    wait_for_nats(&client, "down", Duration::from_secs(10)).await?;
    let mut empty_restarts = Vec::new();
    for _ in 0..settings.repetitions {
        let (timings, next, _) = restart(&mut relay, client).await?;
        client = next;
        empty_restarts.push(timings);
    }

    eprintln!("  footprint: journaling {} messages", count_words(count));
    let run = ingest(
        &client,
        "bench.footprint",
        "kv_events",
        count,
        PAYLOAD_BYTES,
    )
    .await?;
    let backlog = wait_for_backlog(&client, "kv_events", count, Duration::from_secs(60)).await?;
    let loaded_rss = relay.rss_mib()?;
    let peak_rss = relay.peak_rss_mib()?;

    let mut loaded_restarts = Vec::new();
    let mut restarted_rss = Vec::new();
    let mut backlog_after = Vec::new();
    for rep in 0..settings.repetitions {
        eprintln!(
            "  footprint: restart {} of {}",
            rep + 1,
            settings.repetitions
        );
        let (timings, next, status) = restart(&mut relay, client).await?;
        client = next;
        loaded_restarts.push(timings);
        backlog_after.push(class_backlog(&status, "kv_events"));
        restarted_rss.push(relay.rss_mib()?);
    }
    let _ = client.close().await;

    // A target stated for 5M is judged only when 5M were journaled.
    let at_scale = count >= TARGET_COUNT;
    let scale = if at_scale {
        format!("{} journaled", count_words(count))
    } else {
        format!(
            "{} journaled (quick; the target is for {} and judged only by the full run)",
            count_words(count),
            count_words(TARGET_COUNT)
        )
    };
    let mut rss_note = format!(
        "{scale}, {PAYLOAD_BYTES} B each, NATS down; VmRSS right after ingest (one measurement); \
         peak during ingest (VmHWM) {peak_rss:.1} MiB; after restart {:.1} MiB (median)",
        median(&restarted_rss).unwrap_or(f64::NAN)
    );
    if backlog != count || run.other > 0 {
        rss_note.push_str(&format!(
            "; status showed a backlog of {backlog}, {} acks not journaled",
            run.other
        ));
    }
    let rss = Row {
        scenario: "footprint/rss".to_string(),
        value: Some(loaded_rss),
        unit: "MiB".to_string(),
        baseline: "same relay, empty journal".to_string(),
        baseline_value: Some(idle_rss),
        target: format!("≤ {TARGET_RSS_MIB:.0} MiB at {}", count_words(TARGET_COUNT)),
        met: at_scale.then_some(loaded_rss <= TARGET_RSS_MIB),
        repetitions: 1,
        note: rss_note,
        ..Row::default()
    }
    .with_ratio();

    let mut restart_note = format!(
        "{scale}; SIGKILL, then from spawn to the socket accepting and the status answering \
         (medians with the backlog: {}; empty: {})",
        steps(&loaded_restarts),
        steps(&empty_restarts)
    );
    if backlog_after.iter().any(|after| *after != backlog) {
        restart_note.push_str(&format!(
            "; the first status after restart showed backlogs {backlog_after:?} (expected {backlog})"
        ));
    }
    let ready =
        |restarts: &[Restart]| median(&restarts.iter().map(|r| r.ready).collect::<Vec<_>>());
    let value = ready(&loaded_restarts);
    let restart = Row {
        scenario: "footprint/restart".to_string(),
        value,
        unit: "s".to_string(),
        baseline: "same relay, empty journal".to_string(),
        baseline_value: ready(&empty_restarts),
        target: format!(
            "≤ {TARGET_RESTART_SECONDS:.0} s at {}",
            count_words(TARGET_COUNT)
        ),
        met: value
            .filter(|_| at_scale)
            .map(|value| value <= TARGET_RESTART_SECONDS),
        repetitions: settings.repetitions,
        note: restart_note,
        ..Row::default()
    }
    .with_ratio();
    Ok(vec![rss, restart])
}
