//! `outage`: a real-duration NATS outage, then a real-duration etcd outage,
//! under one steady mixed publish load through the relay. Not part of `all`.
//!
//! NATS half: what was accepted, what reached NATS, what was lost (must be
//! 0), duplicates, the largest backlog and how long the replay took. What
//! reached NATS is captured by a JetStream file-store stream on the NATS
//! server, and every class is configured `jetstream = true`, so the relay
//! lets go of a message only after the stream stored it. NATS is stopped
//! with SIGINT so the capture stream keeps everything it acknowledged; the
//! relay sees the connection drop either way.
//!
//! etcd half (see [`etcd`]), once NATS is back and the backlog drained: the
//! same accounting for the publishes made while etcd was down, plus a relay
//! subscriber on the load's subjects, discovery GETs and registration
//! changes during the outage, and the time until etcd holds every
//! registration again after it returns.
//!
//! Throughout, the relay's accepted publishes and backlog per class are
//! sampled once a second; with the capture stream's timestamps of what
//! NATS stored, they make the run's [`timeline`], drawn by `--plot`.

mod etcd;
mod plot;
mod timeline;

use crate::error::{BenchError, Context, Result};
use crate::harness::{EtcdServer, NatsServer, Relay};
use crate::relay_status::{class_backlog, total_backlog, wait_for_etcd_settled, wait_for_nats};
use crate::report::Row;
use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use holdfast_client::{AckFuture, AckStatus, Client, OutboundMessage, Subscriber};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use timeline::{Sample, Timeline, Window};
use tokio::sync::mpsc;

/// How the outage run is shaped (from the command line).
#[derive(Debug, Clone)]
pub struct OutagePlan {
    pub nats_outage: Duration,
    pub etcd_outage: Duration,
    /// Publishes per second, spread over the four classes.
    pub rate: u32,
    /// Where to draw the run's timeline as an SVG, if anywhere.
    pub plot: Option<std::path::PathBuf>,
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
            let (class, subject) = CLASSES[class_of(seq)];
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

/// Accepted publishes per class, in [`timeline::CLASSES`] order.
type ClassCounters = Arc<[AtomicU64; 4]>;

/// Awaits every ack in order, counting the accepted ones per class.
async fn collect(
    mut receiver: mpsc::Receiver<(u64, AckFuture)>,
    accepted_by_class: ClassCounters,
) -> Acks {
    let mut acks = Acks::default();
    while let Some((seq, ack)) = receiver.recv().await {
        let index = usize::try_from(seq).unwrap_or(usize::MAX);
        if acks.accepted.len() <= index {
            acks.accepted.resize(index + 1, false);
        }
        match tokio::time::timeout(ACK_LIMIT, ack).await {
            Ok(Ok(ack)) => {
                acks.accepted[index] = true;
                accepted_by_class[class_of(seq)].fetch_add(1, Ordering::Relaxed);
                *acks.outcomes.entry(outcome_name(ack.outcome)).or_default() += 1;
            }
            Ok(Err(error)) => *acks.rejected.entry(error.name().to_string()).or_default() += 1,
            Err(_) => *acks.rejected.entry("no ack".to_string()).or_default() += 1,
        }
    }
    acks
}

/// The class (index into [`CLASSES`] and [`timeline::CLASSES`]) the load
/// gives sequence number `seq`.
fn class_of(seq: u64) -> usize {
    usize::try_from(seq % 4).unwrap_or(0)
}

/// Once a second until `stop`: the accepted publishes and the relay's
/// backlog per class; keeps the largest total backlog in `max`.
async fn sample_timeline(
    client: Client,
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    accepted_by_class: ClassCounters,
    start: Instant,
) -> Vec<Sample> {
    let mut timeline = Timeline::default();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let Ok(status) = client.status().await else {
            continue;
        };
        max.fetch_max(total_backlog(&status), Ordering::Relaxed);
        let mut sample = Sample {
            at: start.elapsed().as_secs_f64(),
            accepted: [0; 4],
            backlog: [0; 4],
        };
        for (class, name) in timeline::CLASSES.iter().enumerate() {
            sample.accepted[class] = accepted_by_class[class].load(Ordering::Relaxed);
            sample.backlog[class] = class_backlog(&status, name);
        }
        timeline.push(sample);
    }
    timeline.samples().to_vec()
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

/// Reads the whole capture stream: how often each sequence number arrived;
/// each stored message is also counted in `timeline` at the time NATS
/// stored it (seconds since `wall_start`).
async fn read_capture(
    nats_url: &str,
    timeline: &mut Timeline,
    wall_start: SystemTime,
) -> Result<Vec<u32>> {
    let start_nanos = wall_start
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i128);
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
        if let Some(seq) = payload_seq(&message.payload) {
            count_seq(&mut seen, seq);
            match message.info() {
                Ok(info) => {
                    let since = info.published.unix_timestamp_nanos() - start_nanos;
                    timeline.count_delivery(class_of(seq as u64), since as f64 / 1e9);
                }
                Err(_) => timeline.untimed_deliveries += 1,
            }
        }
    }
    Ok(seen)
}

/// The sequence number a load payload starts with.
fn payload_seq(payload: &[u8]) -> Option<usize> {
    payload
        .get(..SEQ_DIGITS)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse::<usize>().ok())
}

/// Counts one arrival of `seq` in `seen`.
fn count_seq(seen: &mut Vec<u32>, seq: usize) {
    if seen.len() <= seq {
        seen.resize(seq + 1, 0);
    }
    seen[seq] = seen[seq].saturating_add(1);
}

/// What the relay subscriber of the etcd phase received.
#[derive(Debug, Default)]
struct Heard {
    /// How often each sequence number arrived.
    seen: Vec<u32>,
    /// Messages the client dropped because the subscriber fell behind.
    dropped: u64,
}

/// Receives the load's messages through a relay subscription until `stop`
/// (or `deadline`), counting each sequence number.
async fn listen(mut subscriber: Subscriber, stop: Arc<AtomicBool>, deadline: Instant) -> Heard {
    let mut heard = Heard::default();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // A short timeout so that `stop` is seen while nothing arrives.
        match tokio::time::timeout(Duration::from_millis(100), subscriber.next()).await {
            Ok(Some(message)) => {
                if let Some(seq) = payload_seq(&message.payload) {
                    count_seq(&mut heard.seen, seq);
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    heard.dropped = subscriber.dropped();
    heard
}

/// Accepted, delivered, lost and duplicated publishes among sequence
/// numbers `range`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    published: u64,
    accepted: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
}

impl Tally {
    /// `accepted[seq]`: whether the relay accepted `seq`; `seen[seq]`: how
    /// often it arrived.
    fn of(accepted: &[bool], seen: &[u32], range: Range<usize>) -> Tally {
        let mut tally = Tally::default();
        for seq in range {
            let arrived = seen.get(seq).copied().unwrap_or(0);
            tally.duplicates += u64::from(arrived.saturating_sub(1));
            let Some(ok) = accepted.get(seq) else {
                continue;
            };
            tally.published += 1;
            if !ok {
                continue;
            }
            tally.accepted += 1;
            if arrived > 0 {
                tally.delivered += 1;
            } else {
                tally.lost += 1;
            }
        }
        tally
    }
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
    let start = Instant::now();
    let wall_start = SystemTime::now();
    // etcd runs from the start, as in production: the relay holds its link
    // (and the registrations) through the NATS outage too.
    let mut etcd_server = EtcdServer::start().await?;
    let mut nats = NatsServer::start(true).await?;
    let relay = Relay::start(
        &nats.url(),
        &etcd::relay_config(OUTAGE_CONFIG, &etcd_server.url()),
    )
    .await?;
    let client = Client::connect(&relay.url())
        .await
        .context("connecting to holdfastd")?;
    wait_for_nats(&client, "up", Duration::from_secs(10)).await?;
    wait_for_etcd_settled(&client, Duration::from_secs(10)).await?;
    capture_stream(&nats.url()).await?;

    let stop_load = Arc::new(AtomicBool::new(false));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let stop_listening = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let max_backlog = Arc::new(AtomicU64::new(0));
    let accepted_by_class: ClassCounters = Arc::new(Default::default());
    let (ack_sender, ack_receiver) = mpsc::channel(100_000);
    let collector = tokio::spawn(collect(ack_receiver, Arc::clone(&accepted_by_class)));
    let generator = tokio::spawn(generate(
        client.clone(),
        plan.rate.max(1),
        Arc::clone(&stop_load),
        ack_sender,
        Arc::clone(&sent),
    ));
    let watcher = tokio::spawn(sample_timeline(
        client.clone(),
        Arc::clone(&stop_watch),
        Arc::clone(&max_backlog),
        Arc::clone(&accepted_by_class),
        start,
    ));
    // Whatever happens below, the background tasks stop when this guard goes.
    let _stop_guard = StopOnDrop(vec![
        Arc::clone(&stop_load),
        Arc::clone(&stop_watch),
        Arc::clone(&stop_listening),
    ]);

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
    let seconds_since_start = |at: Instant| at.saturating_duration_since(start).as_secs_f64();
    let mut timeline = Timeline::default();
    timeline.nats_outage = Some(Window {
        from: seconds_since_start(outage_start),
        to: seconds_since_start(restarted),
    });
    let drain_limit = (plan.nats_outage * 2).max(Duration::from_secs(600));
    let drained = wait_drained(&client, drain_limit).await;
    let replay_seconds = drained.map(|at| at.duration_since(restarted).as_secs_f64());
    eprintln!(
        "  outage: backlog drained after {}",
        replay_seconds.map_or("(never)".to_string(), |s| format!("{s:.1} s"))
    );

    // The etcd half. Publishes from here on are its own; a relay subscriber
    // on the load's subjects shows whether subscribing keeps working.
    let phase_start = sent.load(Ordering::Relaxed);
    let listener_client = Client::connect(&relay.url())
        .await
        .context("connecting the subscriber to holdfastd")?;
    let subscriber = listener_client
        .subscribe("outage.>")
        .await
        .context("subscribing through the relay")?;
    let listener = tokio::spawn(listen(
        subscriber,
        Arc::clone(&stop_listening),
        Instant::now() + plan.etcd_outage * 2 + Duration::from_secs(600),
    ));
    let etcd_run = etcd::outage(&mut etcd_server, &relay, plan.etcd_outage, &sent).await;
    if let Err(error) = &etcd_run {
        eprintln!("  outage: the etcd half failed: {error}");
    }

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
    // The last messages may still be on their way to the subscriber.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_listening.store(true, Ordering::Relaxed);
    let heard = listener.await.context("subscriber task")?;
    let _ = listener_client.close().await;
    stop_watch.store(true, Ordering::Relaxed);
    let samples = watcher.await.unwrap_or_default();
    let _ = client.close().await;

    eprintln!("  outage: reading the capture stream");
    let seen = read_capture(&nats.url(), &mut timeline, wall_start).await?;
    drop(relay);
    for sample in samples {
        timeline.push(sample);
    }
    if let Ok(run) = &etcd_run {
        timeline.etcd_outage = run.killed.map(|killed| Window {
            from: seconds_since_start(killed),
            to: seconds_since_start(killed + run.down_for),
        });
    }
    if let Some(path) = &plan.plot {
        let title = format!(
            "holdfast outage run: NATS down {}, etcd down {}, {} msg/s over 4 classes",
            words(plan.nats_outage),
            words(plan.etcd_outage),
            plan.rate
        );
        plot::draw(path, &timeline, &title)?;
        eprintln!(
            "  outage: plot written to {} ({} samples; {} stored messages without a time)",
            path.display(),
            timeline.samples().len(),
            timeline.untimed_deliveries
        );
    }

    let to_index = |seq: u64| usize::try_from(seq).unwrap_or(usize::MAX);
    let everything = 0..acks.accepted.len().max(seen.len());
    let whole = Tally::of(&acks.accepted, &seen, everything);
    let nats_half = Tally::of(&acks.accepted, &seen, 0..to_index(phase_start));
    let rejected: u64 = acks.rejected.values().sum();
    let outcomes: Vec<String> = acks
        .outcomes
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    let max_backlog = max_backlog.load(Ordering::Relaxed);
    let note = format!(
        "NATS outage {} (SIGINT, then restart on the same port), load {} msg/s over prefill, \
         decode, kv_events, default (jetstream = true), {} s before; from the start to the \
         backlog drained: accepted {}, delivered {}, lost {}, duplicates {} (as stored by the \
         capture stream, which drops a repeated Nats-Msg-Id within 2 min), max backlog \
         {max_backlog}, replay {}; whole run (both outages): accepted {} ({}), rejected \
         {rejected}{}, lost {}, duplicates {}",
        words(plan.nats_outage),
        plan.rate,
        WARM_UP.as_secs(),
        nats_half.accepted,
        nats_half.delivered,
        nats_half.lost,
        nats_half.duplicates,
        replay_seconds.map_or("did not finish".to_string(), |s| format!("{s:.1} s")),
        whole.accepted,
        outcomes.join(", "),
        if acks.rejected.is_empty() {
            String::new()
        } else {
            format!(" {:?}", acks.rejected)
        },
        whole.lost,
        whole.duplicates,
    );
    let mut rows = vec![
        Row {
            scenario: "outage/nats lost".to_string(),
            value: Some(nats_half.lost as f64),
            unit: "messages".to_string(),
            baseline: "accepted".to_string(),
            baseline_value: Some(nats_half.accepted as f64),
            target: "lost = 0".to_string(),
            met: Some(nats_half.lost == 0 && nats_half.accepted > 0),
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
                 (max backlog {max_backlog})"
            ),
            ..Row::default()
        }
        .with_ratio(),
    ];
    let end = acks.accepted.len();
    match etcd_run {
        Ok(run) => rows.extend(etcd_rows(
            plan,
            &run,
            &EtcdLoad {
                window: Tally::of(
                    &acks.accepted,
                    &seen,
                    to_index(run.kill_seq)..to_index(run.back_seq),
                ),
                heard: Tally::of(
                    &acks.accepted,
                    &heard.seen,
                    to_index(run.kill_seq)..to_index(run.back_seq),
                ),
                dropped: heard.dropped,
                before: Tally::of(
                    &acks.accepted,
                    &seen,
                    to_index(phase_start)..to_index(run.kill_seq),
                ),
                after: Tally::of(&acks.accepted, &seen, to_index(run.back_seq)..end),
            },
        )),
        Err(error) => {
            let phase = Tally::of(&acks.accepted, &seen, to_index(phase_start)..end);
            for name in ["outage/etcd lost", "outage/etcd"] {
                rows.push(Row {
                    scenario: name.to_string(),
                    unit: "s".to_string(),
                    baseline: format!("etcd outage of {}", words(plan.etcd_outage)),
                    target: ETCD_TARGET.to_string(),
                    met: Some(false),
                    repetitions: 1,
                    note: format!(
                        "failed: {error} (publishes from the etcd half on: accepted {}, lost {})",
                        phase.accepted, phase.lost
                    ),
                    ..Row::default()
                });
            }
        }
    }
    Ok(rows)
}

/// The `outage/etcd` row's target.
const ETCD_TARGET: &str =
    "pub/sub keeps working, lost 0, reconciled within one reconcile_interval (10 s)";

/// The publish load around the etcd outage.
struct EtcdLoad {
    /// Publishes made while etcd was down, as the capture stream stored them.
    window: Tally,
    /// The same publishes as the relay subscriber received them.
    heard: Tally,
    /// Messages the subscriber's client dropped (it fell behind).
    dropped: u64,
    /// Publishes of the etcd half before the kill and after the restart.
    before: Tally,
    after: Tally,
}

/// The `outage/etcd lost` and `outage/etcd` rows.
fn etcd_rows(plan: &OutagePlan, run: &etcd::EtcdRun, load: &EtcdLoad) -> Vec<Row> {
    let window = &load.window;
    let gets = &run.gets;
    let changes = &run.changes;
    let reconciled = &run.reconciled;
    let subscriber_ok = load.heard.lost == 0 && load.dropped == 0;
    let lost_note = format!(
        "publishes made while etcd was down ({:.1} s from the kill to etcd answering again, \
         load {} msg/s): published {}, accepted {}, delivered {} (capture stream), lost {}, \
         duplicates {}; a relay subscriber on outage.> received {} of the {} accepted (dropped \
         {}); the rest of the etcd half (registering before the kill; reconcile, checks and {} \
         s after): accepted {}, lost {}, duplicates {}",
        run.down_for.as_secs_f64(),
        plan.rate,
        window.published,
        window.accepted,
        window.delivered,
        window.lost,
        window.duplicates,
        load.heard.delivered,
        load.heard.accepted,
        load.dropped,
        SETTLE.as_secs(),
        load.before.accepted + load.after.accepted,
        load.before.lost + load.after.lost,
        load.before.duplicates + load.after.duplicates,
    );
    let failed_gets = gets.failures();
    let (fewest, most) = gets.entries.unwrap_or((0, 0));
    let mut summary = format!(
        "etcd SIGKILLed for {} with {} keys registered through {} relay connections ({} \
         answered Buffered), restarted on its data dir; the relay reported it down {} after \
         the kill and {} of {} connections had been told so by the end. During the outage: \
         publishes accepted {}, delivered {}, lost {}, relay subscriber received {} of them; \
         GETs of the prefix every {} ms: {} answered ({} stale, {} fresh; first stale {}; \
         {fewest}–{most} entries; max age {:.1} s), {failed_gets} failed{}; {} registration \
         changes ({} value updates, {} new keys, {} deregistrations) made after the relay \
         reported etcd down: {} Buffered, {} Applied, {} failed{}; at the end the relay had {} \
         changes pending, max_staleness_ms {}. After etcd answered again: etcd held every key \
         with its current value after {}, the relay reported etcd up after {} and up with 0 \
         pending after {}, both after {}",
        words(plan.etcd_outage),
        run.registered,
        etcd::SESSIONS,
        run.buffered_at_start,
        run.noticed.map_or("never".to_string(), |took| format!(
            "{:.2} s",
            took.as_secs_f64()
        )),
        run.told_down,
        etcd::SESSIONS,
        window.accepted,
        window.delivered,
        window.lost,
        load.heard.delivered,
        etcd::GET_EVERY.as_millis(),
        gets.stale + gets.fresh,
        gets.stale,
        gets.fresh,
        gets.first_stale.map_or("never".to_string(), |took| format!(
            "{:.2} s after the kill",
            took.as_secs_f64()
        )),
        gets.max_age.as_secs_f64(),
        if gets.failed.is_empty() {
            String::new()
        } else {
            format!(" {:?}", gets.failed)
        },
        changes.total(),
        etcd::CHANGES * etcd::SESSIONS,
        etcd::CHANGES * etcd::SESSIONS,
        etcd::CHANGES * etcd::SESSIONS,
        changes.buffered,
        changes.applied,
        changes.total() - changes.buffered - changes.applied,
        if changes.failed.is_empty() {
            String::new()
        } else {
            format!(" {:?}", changes.failed)
        },
        run.pending_at_end,
        run.max_staleness_ms,
        seconds(reconciled.keys_back),
        seconds(reconciled.up),
        seconds(reconciled.settled),
        seconds(reconciled.done),
    );
    if let Some(last) = &reconciled.last {
        summary.push_str(&format!(" (still different after 120 s: {last})"));
    }
    if reconciled.done.is_some() {
        summary.push_str(&match &reconciled.later {
            None => "; all still there one lease TTL (10 s) + 2 s later".to_string(),
            Some(difference) => format!("; one lease TTL (10 s) + 2 s later: {difference}"),
        });
    }
    if reconciled.unleased > 0 {
        summary.push_str(&format!("; {} keys had no lease", reconciled.unleased));
    }
    summary.push_str(&format!(
        "; {} reconcile passes, {} etcd outage(s) and {} reconnect attempts counted by the \
         relay over the etcd half, {} of {} connections told etcd is up again; relay with the default [etcd] settings \
         (reconcile_interval {} s)",
        run.reconcile_runs,
        run.outages,
        run.reconnect_attempts,
        run.told_up,
        etcd::SESSIONS,
        etcd::RECONCILE_INTERVAL.as_secs(),
    ));
    let reconciled_in_time = reconciled
        .done
        .is_some_and(|took| took <= etcd::RECONCILE_INTERVAL)
        && reconciled.later.is_none();
    let met = window.accepted > 0
        && window.lost == 0
        && subscriber_ok
        && failed_gets == 0
        && gets.stale > 0
        && changes.total() > 0
        && changes.buffered == changes.total()
        && reconciled_in_time;
    vec![
        Row {
            scenario: "outage/etcd lost".to_string(),
            value: Some(window.lost as f64),
            unit: "messages".to_string(),
            baseline: "accepted during the etcd outage".to_string(),
            baseline_value: Some(window.accepted as f64),
            target: "lost = 0".to_string(),
            met: Some(
                window.accepted > 0 && window.lost == 0 && load.before.lost + load.after.lost == 0,
            ),
            repetitions: 1,
            note: lost_note,
            ..Row::default()
        }
        .with_ratio(),
        Row {
            scenario: "outage/etcd".to_string(),
            value: reconciled.done.map(|took| took.as_secs_f64()),
            unit: "s".to_string(),
            baseline: "etcd outage length".to_string(),
            baseline_value: Some(plan.etcd_outage.as_secs_f64()),
            target: ETCD_TARGET.to_string(),
            met: Some(met),
            repetitions: 1,
            note: summary,
            ..Row::default()
        }
        .with_ratio(),
    ]
}

/// "1.23 s", or "never".
fn seconds(took: Option<Duration>) -> String {
    took.map_or("never".to_string(), |took| {
        format!("{:.2} s", took.as_secs_f64())
    })
}

/// Sets every flag when dropped, so background load stops on any exit path.
struct StopOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for flag in &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_and_the_timeline_name_the_classes_alike() {
        for (index, (class, _)) in CLASSES.iter().enumerate() {
            assert_eq!(*class, timeline::CLASSES[index]);
            assert_eq!(class_of(index as u64 + 4), index);
        }
    }

    #[test]
    fn reads_the_sequence_number_of_a_payload() {
        let payload = format!("{:0width$}xxxx", 42, width = SEQ_DIGITS);
        assert_eq!(payload_seq(payload.as_bytes()), Some(42));
        assert_eq!(payload_seq(b"short"), None);
    }

    #[test]
    fn tallies_a_range_of_sequence_numbers() {
        // 0 delivered, 1 lost, 2 not accepted, 3 delivered twice, 4 never acked.
        let accepted = [true, true, false, true];
        let mut seen = Vec::new();
        for seq in [0, 3, 3, 2] {
            count_seq(&mut seen, seq);
        }
        let all = Tally::of(&accepted, &seen, 0..5);
        assert_eq!(
            all,
            Tally {
                published: 4,
                accepted: 3,
                delivered: 2,
                lost: 1,
                duplicates: 1,
            }
        );
        let tail = Tally::of(&accepted, &seen, 2..4);
        assert_eq!((tail.published, tail.accepted, tail.lost), (2, 1, 0));
        assert_eq!(Tally::of(&accepted, &seen, 3..3), Tally::default());
    }
}
