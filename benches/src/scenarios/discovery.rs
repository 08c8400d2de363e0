//! `discovery`: the relay's etcd half against a direct etcd-client on the
//! same single-member etcd, in the same run.
//!
//! - `discovery/p50`, `discovery/p99`: a cached GET of a 100-key prefix
//!   through the relay (Unix socket), one at a time, vs a direct
//!   serializable range read of the same prefix.
//! - `discovery/p99 vs socket floor`: the same p99 against this machine's
//!   floor for any local request/response, a bare round trip between two
//!   processes over a Unix socket ([`SocketFloor`]), measured alongside.
//! - `discovery/rebuild 10k`: 10,000 registrations held by 10 relay
//!   connections; etcd is killed right after a reconcile pass finished and
//!   at once restarted with its data dir wiped, and the figure is the time
//!   from etcd answering again until every key is back in etcd, vs writing
//!   the same keys directly (10 leases, puts in txns of 128). The restart
//!   (~0.2 s) often slips between two probes of the relay, which then only
//!   finds the empty etcd at its next periodic reconcile pass: close to the
//!   worst case. `discovery/rebuild 10k, noticed` is the same with etcd kept
//!   down until the relay reported it down (and at least 2 s): the pass
//!   that starts when etcd returns does the rebuild.
//!
//! Each kill waits until the relay finished the reconcile pass that rebuilt
//! the keys before: an etcd lost in the middle of a pass is a different
//! case, not measured here.
//!
//! The relay runs with the production `[etcd]` defaults (reconcile every
//! 10 s, lease TTL 10 s), only `endpoints` set.

use super::{count_words, Settings, RELAY_CONFIG};
use crate::error::{failed, BenchError, Context, Result};
use crate::harness::{EtcdServer, NatsServer, Relay};
use crate::relay_status::{
    etcd_figure, wait_for_etcd_settled, wait_for_etcd_state, wait_for_reconcile,
};
use crate::report::Row;
use crate::socket_floor::SocketFloor;
use crate::stats::{median, percentile};
use futures::StreamExt;
use holdfast_client::{Client, RegistrationStatus};
use std::time::{Duration, Instant};

/// The prefix read by the GET rows.
const GET_PREFIX: &str = "v1/bench/discovery/";
/// Keys under [`GET_PREFIX`].
const GET_KEYS: usize = 100;
/// Bytes per value under [`GET_PREFIX`].
const GET_VALUE_BYTES: usize = 128;
/// GETs before the timed ones, per side and repetition.
const WARM_UP: u64 = 200;
/// The relay's cached GET p99 against a bare local round trip's p99: no
/// GET through a local socket can beat the floor, so the target is how
/// little the relay adds to it.
const GET_P99_VS_FLOOR_TARGET: f64 = 1.25;
/// Longest one direct GET may take before the run counts as failed (the
/// relay's client applies its own request timeout).
const GET_LIMIT: Duration = Duration::from_secs(5);
/// How long the relay may take to cache the prefix.
const WARM_LIMIT: Duration = Duration::from_secs(10);

/// Where the relay's registrations live.
const RELAY_PREFIX: &str = "v1/instances/bench/";
/// Where the direct baseline writes the same keys.
const DIRECT_PREFIX: &str = "v1/instances/direct/";
/// Relay connections holding the registrations, each with its own lease.
const SESSIONS: u64 = 10;
/// Registrations per connection.
const KEYS_PER_SESSION: u64 = 1_000;
/// REGISTERs each connection keeps outstanding while registering.
const REGISTER_CONCURRENCY: usize = 64;
/// Operations per direct txn (etcd's default `--max-txn-ops`).
const TXN_OPS: u64 = 128;
/// TTL of the direct baseline's leases, the relay's default `lease_ttl`.
const LEASE_TTL_SECONDS: i64 = 10;
/// The relay's default `etcd.reconcile_interval`: the rebuild target.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);
/// How long the registering and the rebuild may take before the run
/// counts as failed.
const REBUILD_LIMIT: Duration = Duration::from_secs(120);
/// Longest one direct etcd call of the rebuild part may take.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Poll period of the count-only reads that watch keys arrive.
const POLL: Duration = Duration::from_millis(10);
/// How long etcd stays down, at least, in the `noticed` variant.
const DOWN_FOR: Duration = Duration::from_secs(2);
/// How long the relay may take to report a killed etcd down.
const NOTICE_LIMIT: Duration = Duration::from_secs(10);

/// The scenario's relay configuration: the shared one plus etcd.
fn relay_config(etcd_url: &str) -> String {
    format!("{RELAY_CONFIG}\n[etcd]\nendpoints = [\"{etcd_url}\"]\n")
}

/// Starts etcd, NATS and a relay pointed at both, and measures the GET rows
/// then the rebuild rows; every process is killed when this returns.
pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let mut etcd = EtcdServer::start().await?;
    let nats = NatsServer::start(false).await?;
    let relay = Relay::start(&nats.url(), &relay_config(&etcd.url())).await?;
    let client = Client::connect(&relay.url())
        .await
        .context("connecting to holdfastd")?;
    wait_for_etcd_settled(&client, Duration::from_secs(10)).await?;
    let mut rows = cached_get(settings, &etcd, &client).await?;
    rows.extend(rebuild(settings, &mut etcd, &relay, &client).await?);
    let _ = client.close().await;
    Ok(rows)
}

// --------------------------------------------------------------------------
// Cached GET vs direct serializable GET.

async fn cached_get(settings: &Settings, etcd: &EtcdServer, client: &Client) -> Result<Vec<Row>> {
    let samples = settings.pick(5_000, 20_000);
    let mut direct = etcd.client().await?;
    seed_get_prefix(&mut direct).await?;
    warm_cache(client).await?;
    let mut floor = SocketFloor::start().await?;

    let mut stale = 0u64;
    let mut through = (Vec::new(), Vec::new());
    let mut baseline = (Vec::new(), Vec::new());
    let mut floor_p99 = Vec::new();
    for rep in 0..settings.repetitions {
        eprintln!(
            "  discovery get: repetition {} of {}",
            rep + 1,
            settings.repetitions
        );
        let run = relay_gets(client, samples, &mut stale).await?;
        through.0.extend(percentile(&run, 50.0));
        through.1.extend(percentile(&run, 99.0));
        let run = direct_gets(&mut direct, samples).await?;
        baseline.0.extend(percentile(&run, 50.0));
        baseline.1.extend(percentile(&run, 99.0));
        floor_p99.extend(percentile(&floor.round_trips(samples).await?, 99.0));
    }
    drop(floor);

    let mut note = format!(
        "{} GETs of a {GET_KEYS}-key prefix ({GET_VALUE_BYTES} B values) per run{}, one at a \
         time, {WARM_UP} warm-up, relay and direct alternating on one etcd; per-run percentile, \
         median over runs",
        count_words(samples),
        if settings.quick {
            " (quick; the full run uses 20k)"
        } else {
            ""
        }
    );
    if stale > 0 {
        note.push_str(&format!(
            "; {stale} relay answers were flagged stale with etcd up"
        ));
    }
    let row = |name: &str, relay: &[f64], direct: &[f64], target: &str, budget: Option<f64>| {
        let value = median(relay);
        Row {
            scenario: format!("discovery/{name}"),
            value,
            unit: "µs".to_string(),
            baseline: format!("direct etcd serializable get, {GET_KEYS}-key prefix"),
            baseline_value: median(direct),
            target: target.to_string(),
            met: budget.zip(value).map(|(budget, value)| value <= budget),
            repetitions: settings.repetitions,
            note: note.clone(),
            ..Row::default()
        }
        .with_ratio()
    };
    let relay_p99 = median(&through.1);
    let floor_p99 = median(&floor_p99);
    let versus_floor = Row {
        scenario: "discovery/p99 vs socket floor".to_string(),
        value: relay_p99,
        unit: "µs".to_string(),
        baseline: "bare 64 B round trip between two processes over a Unix socket, p99".to_string(),
        baseline_value: floor_p99,
        target: format!("≤ {GET_P99_VS_FLOOR_TARGET}× the floor"),
        met: None,
        repetitions: settings.repetitions,
        added: relay_p99.zip(floor_p99).map(|(relay, floor)| relay - floor),
        note: format!(
            "the relay's cached GET p99 above; the floor: {} round trips per run, tokio on both \
             sides, alternating with the GETs; per-run p99, median over runs",
            count_words(samples)
        ),
        ..Row::default()
    }
    .with_ratio();
    let versus_floor = Row {
        met: versus_floor
            .ratio
            .map(|ratio| ratio <= GET_P99_VS_FLOOR_TARGET),
        ..versus_floor
    };
    Ok(vec![
        row(
            "p50",
            &through.0,
            &baseline.0,
            "lower is better (p99 vs socket floor judged)",
            None,
        ),
        row(
            "p99",
            &through.1,
            &baseline.1,
            "lower is better (judged against the socket floor, below)",
            None,
        ),
        versus_floor,
    ])
}

/// Writes the [`GET_KEYS`] keys under [`GET_PREFIX`] in one txn.
async fn seed_get_prefix(etcd: &mut etcd_client::Client) -> Result<()> {
    let puts: Vec<etcd_client::TxnOp> = (0..GET_KEYS)
        .map(|n| {
            let mut value = format!(
                "{{\"instance\":{n},\"endpoint\":\"127.0.0.1:{}\"}}",
                8000 + n
            )
            .into_bytes();
            value.resize(GET_VALUE_BYTES, b' ');
            etcd_client::TxnOp::put(format!("{GET_PREFIX}{n:03}"), value, None)
        })
        .collect();
    call(
        etcd.txn(etcd_client::Txn::new().and_then(puts)),
        "writing the GET prefix to etcd",
    )
    .await
    .map(drop)
}

/// GETs through the relay until its answer has every key and is fresh: the
/// prefix is then cached and watched.
async fn warm_cache(client: &Client) -> Result<()> {
    let deadline = Instant::now() + WARM_LIMIT;
    loop {
        let snapshot = client
            .get(GET_PREFIX)
            .await
            .context("GET through the relay")?;
        if snapshot.entries.len() == GET_KEYS && !snapshot.stale {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the relay to answer {GET_KEYS} fresh entries under {GET_PREFIX} (it has {}, \
                 stale: {})",
                snapshot.entries.len(),
                snapshot.stale
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Latencies in µs of `samples` relay GETs, one at a time; counts answers
/// flagged stale in `stale`.
async fn relay_gets(client: &Client, samples: u64, stale: &mut u64) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(usize::try_from(samples).unwrap_or(0));
    for index in 0..WARM_UP + samples {
        let started = Instant::now();
        let snapshot = client
            .get(GET_PREFIX)
            .await
            .context("GET through the relay")?;
        let took = started.elapsed();
        if snapshot.entries.len() != GET_KEYS {
            return Err(failed(
                "GET through the relay",
                format!("{} entries, expected {GET_KEYS}", snapshot.entries.len()),
            ));
        }
        if index >= WARM_UP {
            *stale += u64::from(snapshot.stale);
            latencies.push(took.as_secs_f64() * 1e6);
        }
    }
    Ok(latencies)
}

/// Latencies in µs of `samples` direct serializable prefix GETs.
async fn direct_gets(etcd: &mut etcd_client::Client, samples: u64) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(usize::try_from(samples).unwrap_or(0));
    for index in 0..WARM_UP + samples {
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_serializable();
        let started = Instant::now();
        let answer = tokio::time::timeout(GET_LIMIT, etcd.get(GET_PREFIX, Some(options)))
            .await
            .map_err(|_| BenchError::Timeout(format!("direct etcd GET {index}")))?
            .context("direct etcd GET")?;
        let took = started.elapsed();
        if answer.kvs().len() != GET_KEYS {
            return Err(failed(
                "direct etcd GET",
                format!("{} entries, expected {GET_KEYS}", answer.kvs().len()),
            ));
        }
        if index >= WARM_UP {
            latencies.push(took.as_secs_f64() * 1e6);
        }
    }
    Ok(latencies)
}

// --------------------------------------------------------------------------
// Registration rebuild after etcd came back empty.

/// Key `n` under `prefix`.
fn instance_key(prefix: &str, n: u64) -> String {
    format!("{prefix}{n}")
}

/// Value of instance `n` (the same bytes for the relay and the baseline).
fn instance_value(n: u64) -> String {
    format!(
        "{{\"instance\":{n},\"endpoint\":\"10.0.{}.{}:8000\"}}",
        n / 256,
        n % 256
    )
}

/// Awaits an etcd call for at most [`CALL_LIMIT`].
async fn call<T>(
    future: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    what: &str,
) -> Result<T> {
    tokio::time::timeout(CALL_LIMIT, future)
        .await
        .map_err(|_| BenchError::Timeout(what.to_string()))?
        .context(what)
}

/// Keys under `prefix` in etcd, by a count-only read.
async fn count_keys(etcd: &mut etcd_client::Client, prefix: &str) -> Result<i64> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    call(etcd.get(prefix, Some(options)), "counting keys in etcd")
        .await
        .map(|answer| answer.count())
}

/// Polls every [`POLL`] until etcd holds `want` keys under `prefix`;
/// a read that fails (etcd just restarted) counts as "not yet".
async fn wait_for_keys(
    etcd: &mut etcd_client::Client,
    prefix: &str,
    want: u64,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match count_keys(etcd, prefix).await {
            Ok(count) if u64::try_from(count).is_ok_and(|count| count >= want) => return Ok(()),
            Ok(count) => format!("{count} keys"),
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "{want} keys under {prefix} in etcd within {} s (last: {last})",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Registers `KEYS_PER_SESSION` keys through `client`, starting at `first`,
/// [`REGISTER_CONCURRENCY`] at a time; returns how many answered Buffered.
async fn register_session(client: &Client, first: u64) -> Result<u64> {
    let answers: Vec<_> = futures::stream::iter(first..first + KEYS_PER_SESSION)
        .map(|n| client.register(instance_key(RELAY_PREFIX, n), instance_value(n)))
        .buffer_unordered(REGISTER_CONCURRENCY)
        .collect()
        .await;
    let mut buffered = 0;
    for answer in answers {
        if answer.context("registering through the relay")? == RegistrationStatus::Buffered {
            buffered += 1;
        }
    }
    Ok(buffered)
}

/// The baseline: one etcd-client grants one lease per session and writes
/// `total` keys under [`DIRECT_PREFIX`] in txns of [`TXN_OPS`]; returns the
/// time that took. The leases are revoked afterwards (untimed).
async fn direct_writes(etcd: &mut etcd_client::Client, total: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut leases = Vec::new();
    for _ in 0..SESSIONS {
        let granted = call(
            etcd.lease_grant(LEASE_TTL_SECONDS, None),
            "granting a lease directly",
        )
        .await?;
        leases.push(granted.id());
    }
    let mut next = 0;
    while next < total {
        let end = (next + TXN_OPS).min(total);
        let puts: Vec<etcd_client::TxnOp> = (next..end)
            .map(|n| {
                let lease = usize::try_from(n / KEYS_PER_SESSION)
                    .ok()
                    .and_then(|session| leases.get(session))
                    .copied()
                    .unwrap_or(0);
                etcd_client::TxnOp::put(
                    instance_key(DIRECT_PREFIX, n),
                    instance_value(n),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        call(
            etcd.txn(etcd_client::Txn::new().and_then(puts)),
            "writing keys directly",
        )
        .await?;
        next = end;
    }
    let took = started.elapsed();
    for lease in leases {
        call(etcd.lease_revoke(lease), "revoking a direct lease").await?;
    }
    Ok(took)
}

/// Keys under `prefix` without a lease (a rebuilt key must be leased again).
async fn unleased_keys(etcd: &mut etcd_client::Client, prefix: &str) -> Result<usize> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let answer = call(etcd.get(prefix, Some(options)), "reading keys from etcd").await?;
    Ok(answer.kvs().iter().filter(|kv| kv.lease() == 0).count())
}

/// How etcd goes away before it comes back empty.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Killed right after a reconcile pass finished and restarted at once:
    /// back before the relay's probe notices, so only the next periodic
    /// pass finds it empty (close to the worst case).
    AtOnce,
    /// Killed, and restarted once the relay reports it down and at least
    /// [`DOWN_FOR`] have passed.
    Noticed,
}

/// One kill and empty restart of etcd, timed.
#[derive(Debug, Clone, Copy)]
struct Rebuilt {
    /// etcd answering again → every registration back in etcd.
    rebuild: Duration,
    /// Kill → etcd answering again.
    restart: Duration,
    /// Kill → the relay reporting etcd down ([`Outage::Noticed`] only).
    noticed: Option<Duration>,
    /// Whether the relay counted an etcd outage (its probe caught the
    /// restart, which starts a reconcile pass when etcd is back).
    seen: bool,
    /// Rebuilt keys without a lease.
    unleased: usize,
}

/// Kills etcd, restarts it empty as `outage` says, and times until every
/// one of the `total` registrations is back. Returns once the reconcile
/// pass that rebuilt them has finished too, so that the next kill does not
/// land in the middle of one.
async fn empty_restart(
    etcd: &mut EtcdServer,
    status: &Client,
    total: u64,
    outage: Outage,
) -> Result<(Rebuilt, etcd_client::Client)> {
    let mut before = status
        .status()
        .await
        .context("asking the relay for its status")?;
    if let Outage::AtOnce = outage {
        before = wait_for_reconcile(
            status,
            etcd_figure(&before, "reconcile_runs"),
            RECONCILE_INTERVAL * 3,
        )
        .await?;
    }
    let runs_before = etcd_figure(&before, "reconcile_runs");
    let killed = Instant::now();
    etcd.kill();
    let noticed = match outage {
        Outage::AtOnce => None,
        Outage::Noticed => {
            wait_for_etcd_state(status, "down", NOTICE_LIMIT).await?;
            let noticed = killed.elapsed();
            if let Some(rest) = DOWN_FOR.checked_sub(noticed) {
                tokio::time::sleep(rest).await;
            }
            Some(noticed)
        }
    };
    etcd.restart_empty().await?;
    let answered = Instant::now();
    let mut direct = etcd.client().await?;
    wait_for_keys(&mut direct, RELAY_PREFIX, total, REBUILD_LIMIT).await?;
    let rebuild = answered.elapsed();
    let unleased = unleased_keys(&mut direct, RELAY_PREFIX).await?;
    wait_for_etcd_settled(status, REBUILD_LIMIT).await?;
    let after = wait_for_reconcile(status, runs_before, REBUILD_LIMIT).await?;
    Ok((
        Rebuilt {
            rebuild,
            restart: answered.duration_since(killed),
            noticed,
            seen: etcd_figure(&after, "outages") > etcd_figure(&before, "outages"),
            unleased,
        },
        direct,
    ))
}

async fn rebuild(
    settings: &Settings,
    etcd: &mut EtcdServer,
    relay: &Relay,
    status: &Client,
) -> Result<Vec<Row>> {
    let total = SESSIONS * KEYS_PER_SESSION;
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(
            Client::connect(&relay.url())
                .await
                .context("connecting a registering client to holdfastd")?,
        );
    }
    eprintln!("  discovery rebuild: registering {total} keys through the relay");
    let started = Instant::now();
    let registering = futures::future::try_join_all(
        sessions
            .iter()
            .zip((0..).step_by(usize::try_from(KEYS_PER_SESSION).unwrap_or(1)))
            .map(|(client, first)| register_session(client, first)),
    );
    let buffered: u64 = tokio::time::timeout(REBUILD_LIMIT, registering)
        .await
        .map_err(|_| BenchError::Timeout(format!("registering {total} keys")))??
        .iter()
        .sum();
    let acked = started.elapsed();
    let mut direct = etcd.client().await?;
    wait_for_keys(&mut direct, RELAY_PREFIX, total, REBUILD_LIMIT).await?;
    let registered = started.elapsed();
    let settled = wait_for_etcd_settled(status, REBUILD_LIMIT).await?;
    let held = etcd_figure(&settled, "registrations");
    if held < total {
        return Err(failed(
            "registering through the relay",
            format!("the relay holds {held} registrations, expected {total}"),
        ));
    }

    let mut baselines = Vec::new();
    let mut at_once = Vec::new();
    let mut noticed = Vec::new();
    for rep in 0..settings.repetitions {
        eprintln!(
            "  discovery rebuild: repetition {} of {}",
            rep + 1,
            settings.repetitions
        );
        baselines.push(direct_writes(&mut direct, total).await?.as_secs_f64());
        for (outage, results) in [
            (Outage::AtOnce, &mut at_once),
            (Outage::Noticed, &mut noticed),
        ] {
            let (rebuilt, client) = empty_restart(etcd, status, total, outage).await?;
            results.push(rebuilt);
            direct = client;
        }
    }
    for client in &sessions {
        let _ = client.close().await;
    }

    let setup = format!(
        "{} keys registered through {SESSIONS} relay connections ({} each, \
         {REGISTER_CONCURRENCY} outstanding per connection; acked in {:.2} s, all in etcd after \
         {:.2} s{}); figure = etcd answering again → every key back in etcd (count-only prefix \
         read every {} ms); baseline = one etcd-client granting {SESSIONS} leases and putting the \
         same keys in txns of {TXN_OPS}; relay with the default [etcd] settings \
         (reconcile_interval {} s)",
        count_words(total),
        count_words(KEYS_PER_SESSION),
        acked.as_secs_f64(),
        registered.as_secs_f64(),
        if buffered > 0 {
            format!(", {buffered} answered Buffered")
        } else {
            String::new()
        },
        POLL.as_millis(),
        RECONCILE_INTERVAL.as_secs(),
    );
    let baseline_value = median(&baselines);
    let row = |name: String, results: &[Rebuilt], how: String, setup: &str| -> Row {
        let seconds = |pick: fn(&Rebuilt) -> Option<Duration>| -> Vec<f64> {
            results
                .iter()
                .filter_map(pick)
                .map(|duration| duration.as_secs_f64())
                .collect()
        };
        let rebuilds = seconds(|rebuilt| Some(rebuilt.rebuild));
        let value = median(&rebuilds);
        let slowest = rebuilds.iter().copied().reduce(f64::max);
        let runs: Vec<String> = results
            .iter()
            .map(|rebuilt| {
                format!(
                    "{:.2}{}",
                    rebuilt.rebuild.as_secs_f64(),
                    if rebuilt.seen { "" } else { "*" }
                )
            })
            .collect();
        let legend = if results.iter().any(|rebuilt| !rebuilt.seen) {
            " (* = the restart fell between two probes, so the relay counted no outage; it \
             reconciled on seeing etcd's revision go back)"
        } else {
            ""
        };
        let mut note = format!(
            "{how} (etcd answered {:.2} s after the kill, median{}); runs: {} s{legend}; {setup}",
            median(&seconds(|rebuilt| Some(rebuilt.restart))).unwrap_or(0.0),
            median(&seconds(|rebuilt| rebuilt.noticed)).map_or_else(String::new, |noticed| {
                format!("; the relay reported it down {noticed:.2} s after the kill")
            }),
            runs.join(", "),
        );
        let unleased: usize = results.iter().map(|rebuilt| rebuilt.unleased).sum();
        if unleased > 0 {
            note.push_str(&format!("; {unleased} rebuilt keys had no lease"));
        }
        Row {
            scenario: name,
            value,
            unit: "s".to_string(),
            baseline: format!("direct etcd-client puts, txns of {TXN_OPS}"),
            baseline_value,
            target: format!(
                "slowest run ≤ {} s (one reconcile interval)",
                RECONCILE_INTERVAL.as_secs()
            ),
            met: slowest.map(|slowest| slowest <= RECONCILE_INTERVAL.as_secs_f64()),
            repetitions: settings.repetitions,
            note,
            ..Row::default()
        }
        .with_ratio()
    };
    Ok(vec![
        row(
            format!("discovery/rebuild {}", count_words(total)),
            &at_once,
            "etcd killed right after a reconcile pass finished and at once restarted with its \
             data wiped, usually between two of the relay's probes (the link never goes down)"
                .to_string(),
            &setup,
        ),
        row(
            format!("discovery/rebuild {}, noticed", count_words(total)),
            &noticed,
            format!(
                "etcd killed, restarted with its data wiped once the relay reported it down and \
                 at least {} s had passed",
                DOWN_FOR.as_secs()
            ),
            &format!(
                "registrations, figure and baseline as in discovery/rebuild {}",
                count_words(total)
            ),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etcd_table_follows_the_shared_config() {
        let config = relay_config("http://127.0.0.1:2379");
        assert!(config.starts_with(RELAY_CONFIG));
        assert!(config.ends_with("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n"));
    }

    #[test]
    fn relay_and_baseline_write_the_same_values_under_their_own_prefixes() {
        assert_eq!(instance_key(RELAY_PREFIX, 7), "v1/instances/bench/7");
        assert_eq!(instance_key(DIRECT_PREFIX, 7), "v1/instances/direct/7");
        assert_eq!(
            instance_value(300),
            r#"{"instance":300,"endpoint":"10.0.1.44:8000"}"#
        );
    }
}
