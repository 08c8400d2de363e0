//! The etcd half of `outage`: registrations held through the relay, etcd
//! killed for the planned length while the publish load goes on, discovery
//! GETs and registration changes made during the outage, and the time from
//! etcd answering again until it holds every registration, current, and the
//! relay has nothing pending.
//!
//! etcd is restarted on its own data dir (a crash, not a wipe): it comes back
//! with the keys and leases it had before the kill, so the relay has to
//! delete the keys deregistered during the outage, rewrite the values
//! updated during it and add the keys registered during it. etcd also gives
//! every lease a fresh TTL when it restarts, so a key the relay left on a
//! lease it no longer keeps alive would vanish about one TTL later; the keys
//! are therefore checked a second time one lease TTL after the reconcile.

use super::StopOnDrop;
use crate::error::{failed, BenchError, Context, Result};
use crate::harness::{EtcdServer, Relay};
use crate::relay_status::{
    etcd_figure, etcd_state, total_backlog, wait_for_etcd_settled, wait_for_etcd_state,
};
use holdfast_client::{Client, LinkStatus, RegistrationStatus};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the registrations live.
const PREFIX: &str = "v1/instances/outage/";
/// Relay connections holding registrations (each has its own lease).
pub const SESSIONS: u64 = 4;
/// Registrations per connection before the outage.
pub const KEYS_PER_SESSION: u64 = 25;
/// Per connection during the outage: this many value updates, this many new
/// keys and this many deregistrations.
pub const CHANGES: u64 = 2;
/// Period of the discovery GETs during the outage.
pub const GET_EVERY: Duration = Duration::from_millis(100);
/// Longest one relay or etcd call may take before it counts as failed.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// The relay's default `etcd.reconcile_interval`: the reconcile target.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);
/// The relay's default `etcd.lease_ttl`.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// Extra wait beyond one lease TTL before the second check.
const TTL_MARGIN: Duration = Duration::from_secs(2);
/// How long the reconcile may take before it counts as not done.
const RECONCILE_LIMIT: Duration = Duration::from_secs(120);
/// How long the relay may take to report a killed etcd down.
const NOTICE_LIMIT: Duration = Duration::from_secs(10);
/// Poll period while waiting for the reconcile.
const POLL: Duration = Duration::from_millis(50);
/// How long registering and warming the cache may take before the outage.
const SETUP_LIMIT: Duration = Duration::from_secs(30);
/// How often the outage prints progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// The relay configuration: the scenario's classes plus etcd, every other
/// `[etcd]` setting at its production default.
pub fn relay_config(classes: &str, etcd_url: &str) -> String {
    format!("{classes}\n[etcd]\nendpoints = [\"{etcd_url}\"]\n")
}

fn key(session: u64, n: u64) -> String {
    format!("{PREFIX}{session}/{n}")
}

/// Version 1 is registered before the outage, version 2 during it.
fn value(session: u64, n: u64, version: u32) -> String {
    format!(
        "{{\"session\":{session},\"instance\":{n},\"endpoint\":\"10.1.{session}.{n}:8000\",\
         \"version\":{version}}}"
    )
}

/// How `found` differs from `expected`, or `None` when they are the same.
fn difference(
    found: &BTreeMap<String, String>,
    expected: &BTreeMap<String, String>,
) -> Option<String> {
    let missing = expected.keys().filter(|k| !found.contains_key(*k)).count();
    let extra = found.keys().filter(|k| !expected.contains_key(*k)).count();
    let outdated = expected
        .iter()
        .filter(|(k, v)| found.get(*k).is_some_and(|found| found != *v))
        .count();
    if missing + extra + outdated == 0 {
        None
    } else {
        Some(format!(
            "{} keys in etcd: {missing} missing, {extra} extra, {outdated} with an old value",
            found.len()
        ))
    }
}

/// Every key under [`PREFIX`] in etcd with its value, and how many of them
/// carry no lease.
async fn read_etcd(direct: &mut etcd_client::Client) -> Result<(BTreeMap<String, String>, usize)> {
    let options = etcd_client::GetOptions::new().with_prefix();
    let answer = tokio::time::timeout(CALL_LIMIT, direct.get(PREFIX, Some(options)))
        .await
        .map_err(|_| BenchError::Timeout("reading the registrations from etcd".to_string()))?
        .context("reading the registrations from etcd")?;
    let mut found = BTreeMap::new();
    let mut unleased = 0;
    for kv in answer.kvs() {
        if kv.lease() == 0 {
            unleased += 1;
        }
        found.insert(
            String::from_utf8_lossy(kv.key()).into_owned(),
            String::from_utf8_lossy(kv.value()).into_owned(),
        );
    }
    Ok((found, unleased))
}

/// Polls etcd every [`POLL`] until it holds exactly `expected`.
async fn wait_for_etcd_to_hold(
    direct: &mut etcd_client::Client,
    expected: &BTreeMap<String, String>,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match read_etcd(direct).await {
            Ok((found, _)) => match difference(&found, expected) {
                None => return Ok(()),
                Some(difference) => difference,
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "etcd to hold the {} registrations (last: {last})",
                expected.len()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Awaits a relay call for at most [`CALL_LIMIT`]; the error's name on failure.
async fn bounded<T>(
    future: impl std::future::Future<Output = holdfast_client::Result<T>>,
) -> std::result::Result<T, String> {
    match tokio::time::timeout(CALL_LIMIT, future).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(error.name().to_string()),
        Err(_) => Err("no answer".to_string()),
    }
}

/// Discovery GETs through the relay during the outage.
#[derive(Debug, Default)]
pub struct Gets {
    /// Answered and flagged fresh (before the relay noticed the outage).
    pub fresh: u64,
    /// Answered and flagged stale.
    pub stale: u64,
    /// Failed or not answered within [`CALL_LIMIT`], by error name.
    pub failed: BTreeMap<String, u64>,
    /// Kill → the first answer flagged stale.
    pub first_stale: Option<Duration>,
    /// Fewest and most entries in one answer.
    pub entries: Option<(usize, usize)>,
    /// Largest `age` of a stale answer.
    pub max_age: Duration,
}

impl Gets {
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// GETs [`PREFIX`] every [`GET_EVERY`] until `stop` (or `deadline`).
async fn keep_getting(
    client: Client,
    killed: Instant,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Gets {
    let mut gets = Gets::default();
    let mut ticker = tokio::time::interval(GET_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        ticker.tick().await;
        match bounded(client.get(PREFIX)).await {
            Ok(snapshot) => {
                if snapshot.stale {
                    gets.stale += 1;
                    gets.first_stale.get_or_insert_with(|| killed.elapsed());
                    gets.max_age = gets.max_age.max(snapshot.age);
                } else {
                    gets.fresh += 1;
                }
                let count = snapshot.entries.len();
                let (fewest, most) = gets.entries.unwrap_or((count, count));
                gets.entries = Some((fewest.min(count), most.max(count)));
            }
            Err(name) => *gets.failed.entry(name).or_default() += 1,
        }
    }
    gets
}

/// Registration changes made during the outage.
#[derive(Debug, Default)]
pub struct Changes {
    pub buffered: u64,
    pub applied: u64,
    /// By error name.
    pub failed: BTreeMap<String, u64>,
}

impl Changes {
    pub fn total(&self) -> u64 {
        self.buffered + self.applied + self.failed.values().sum::<u64>()
    }

    fn count(&mut self, answer: std::result::Result<RegistrationStatus, String>) {
        match answer {
            Ok(RegistrationStatus::Buffered) => self.buffered += 1,
            Ok(RegistrationStatus::Applied) => self.applied += 1,
            Err(name) => *self.failed.entry(name).or_default() += 1,
        }
    }
}

/// The registering connections and what etcd should hold.
struct Registrants {
    sessions: Vec<Client>,
    expected: BTreeMap<String, String>,
}

impl Registrants {
    /// Connects [`SESSIONS`] clients, registers [`KEYS_PER_SESSION`] keys
    /// through each, and returns once etcd holds them all and the relay
    /// answers GETs of [`PREFIX`] fresh from its cache. Returns how many
    /// registrations answered Buffered (none should: etcd is up).
    async fn register(relay: &Relay, etcd: &EtcdServer) -> Result<(Registrants, u64)> {
        let mut registrants = Registrants {
            sessions: Vec::new(),
            expected: BTreeMap::new(),
        };
        let mut buffered = 0;
        for session in 0..SESSIONS {
            let client = Client::connect(&relay.url())
                .await
                .context("connecting a registering client to holdfastd")?;
            for n in 0..KEYS_PER_SESSION {
                let (key, value) = (key(session, n), value(session, n, 1));
                let answer = bounded(client.register(key.clone(), value.clone()))
                    .await
                    .map_err(|name| failed("registering through the relay", name))?;
                if answer == RegistrationStatus::Buffered {
                    buffered += 1;
                }
                registrants.expected.insert(key, value);
            }
            registrants.sessions.push(client);
        }
        let mut direct = etcd.client().await?;
        wait_for_etcd_to_hold(&mut direct, &registrants.expected, SETUP_LIMIT).await?;
        let status = registrants.status_client()?;
        wait_for_etcd_settled(status, SETUP_LIMIT).await?;
        registrants.warm_cache().await?;
        Ok((registrants, buffered))
    }

    fn status_client(&self) -> Result<&Client> {
        self.sessions
            .first()
            .ok_or_else(|| failed("registering through the relay", "no connection"))
    }

    /// GETs [`PREFIX`] until the relay answers every key, fresh: the prefix
    /// is then cached and watched, as it would be in a running fleet.
    async fn warm_cache(&self) -> Result<()> {
        let client = self.status_client()?;
        let deadline = Instant::now() + SETUP_LIMIT;
        loop {
            let snapshot = bounded(client.get(PREFIX))
                .await
                .map_err(|name| failed("GET through the relay", name))?;
            if snapshot.entries.len() == self.expected.len() && !snapshot.stale {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(format!(
                    "the relay to answer {} fresh entries under {PREFIX} (it has {}, stale: {})",
                    self.expected.len(),
                    snapshot.entries.len(),
                    snapshot.stale
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Per connection: [`CHANGES`] value updates, new keys and
    /// deregistrations, one at a time; `expected` follows each change.
    async fn change(&mut self) -> Changes {
        let mut changes = Changes::default();
        for (session, client) in (0..).zip(&self.sessions) {
            for n in 0..CHANGES {
                let (key, value) = (key(session, n), value(session, n, 2));
                changes.count(bounded(client.register(key.clone(), value.clone())).await);
                self.expected.insert(key, value);
            }
            for n in KEYS_PER_SESSION..KEYS_PER_SESSION + CHANGES {
                let (key, value) = (key(session, n), value(session, n, 2));
                changes.count(bounded(client.register(key.clone(), value.clone())).await);
                self.expected.insert(key, value);
            }
            for n in CHANGES..2 * CHANGES {
                let key = key(session, n);
                changes.count(bounded(client.deregister(key.clone())).await);
                self.expected.remove(&key);
            }
        }
        changes
    }

    /// How many connections were told (LINK_STATE) that etcd is `state`.
    fn told(&self, state: LinkStatus) -> usize {
        self.sessions
            .iter()
            .filter(|client| client.etcd_status() == state)
            .count()
    }

    async fn close(&self) {
        for client in &self.sessions {
            let _ = client.close().await;
        }
    }
}

/// From etcd answering again to the registrations being reconciled.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// → etcd holds exactly the expected keys and values.
    pub keys_back: Option<Duration>,
    /// → the relay reports etcd up.
    pub up: Option<Duration>,
    /// → the relay reports etcd up with no pending change.
    pub settled: Option<Duration>,
    /// → both at once: the figure.
    pub done: Option<Duration>,
    /// What was still different when [`RECONCILE_LIMIT`] ran out.
    pub last: Option<String>,
    /// Keys without a lease once reconciled.
    pub unleased: usize,
    /// What differed one lease TTL after the reconcile (`None`: nothing).
    pub later: Option<String>,
}

/// Polls etcd and the relay every [`POLL`] from `answered` on.
async fn wait_reconciled(
    direct: &mut etcd_client::Client,
    status: &Client,
    expected: &BTreeMap<String, String>,
    answered: Instant,
) -> Reconciled {
    let mut reconciled = Reconciled::default();
    let deadline = answered + RECONCILE_LIMIT;
    loop {
        let (keys, unleased) = match read_etcd(direct).await {
            Ok((found, unleased)) => (difference(&found, expected), unleased),
            Err(error) => (Some(error.to_string()), 0),
        };
        let relay = match bounded(status.status()).await {
            Ok(document) => {
                let pending = etcd_figure(&document, "pending_changes");
                if etcd_state(&document) == "up" {
                    reconciled.up.get_or_insert_with(|| answered.elapsed());
                }
                if etcd_state(&document) == "up" && pending == 0 {
                    None
                } else {
                    Some(format!(
                        "the relay says etcd is {} with {pending} changes pending",
                        etcd_state(&document)
                    ))
                }
            }
            Err(name) => Some(format!("the relay's status failed: {name}")),
        };
        if keys.is_none() {
            reconciled
                .keys_back
                .get_or_insert_with(|| answered.elapsed());
        }
        if relay.is_none() {
            reconciled.settled.get_or_insert_with(|| answered.elapsed());
        }
        if keys.is_none() && relay.is_none() {
            reconciled.done = Some(answered.elapsed());
            reconciled.unleased = unleased;
            return reconciled;
        }
        if Instant::now() > deadline {
            let what: Vec<String> = keys.into_iter().chain(relay).collect();
            reconciled.last = Some(what.join("; "));
            return reconciled;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What the etcd outage showed.
#[derive(Debug, Default)]
pub struct EtcdRun {
    /// Registrations held through the relay when etcd was killed.
    pub registered: usize,
    /// Of those, answered Buffered with etcd up.
    pub buffered_at_start: u64,
    /// Publish sequence numbers sent before the kill and before the restart:
    /// `kill_seq..back_seq` were published while etcd was down.
    pub kill_seq: u64,
    pub back_seq: u64,
    /// Kill → the relay reporting etcd down.
    pub noticed: Option<Duration>,
    /// Connections told etcd is down (by the end of the outage) and up
    /// (once reconciled), of [`SESSIONS`].
    pub told_down: usize,
    pub told_up: usize,
    pub gets: Gets,
    pub changes: Changes,
    /// The relay's `etcd` figures at the end of the outage.
    pub pending_at_end: u64,
    pub max_staleness_ms: u64,
    /// When etcd was killed (its outage ends `down_for` later).
    pub killed: Option<Instant>,
    /// Kill → etcd answering again.
    pub down_for: Duration,
    pub reconciled: Reconciled,
    /// Reconcile passes, outages and reconnect attempts the relay counted
    /// over the phase.
    pub reconcile_runs: u64,
    pub outages: u64,
    pub reconnect_attempts: u64,
}

/// Registers, kills etcd for `length` while the load goes on (`sent` is the
/// load's publish counter), GETs and changes registrations during the
/// outage, restarts etcd on its data dir and times the reconcile.
pub async fn outage(
    etcd: &mut EtcdServer,
    relay: &Relay,
    length: Duration,
    sent: &AtomicU64,
) -> Result<EtcdRun> {
    eprintln!(
        "  outage: registering {} keys through {SESSIONS} relay connections",
        SESSIONS * KEYS_PER_SESSION
    );
    let (mut registrants, buffered_at_start) = Registrants::register(relay, etcd).await?;
    let mut run = EtcdRun {
        registered: registrants.expected.len(),
        buffered_at_start,
        ..EtcdRun::default()
    };
    let status = registrants.status_client()?.clone();
    let before = status
        .status()
        .await
        .context("asking the relay for its status")?;
    let getter = registrants
        .sessions
        .last()
        .cloned()
        .ok_or_else(|| failed("registering through the relay", "no connection"))?;

    eprintln!("  outage: killing etcd for {}", super::words(length));
    let stop_gets = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(vec![Arc::clone(&stop_gets)]);
    run.kill_seq = sent.load(Ordering::Relaxed);
    etcd.kill();
    let killed = Instant::now();
    run.killed = Some(killed);
    let end = killed + length;
    let gets = tokio::spawn(keep_getting(
        getter,
        killed,
        Arc::clone(&stop_gets),
        end + RECONCILE_LIMIT,
    ));
    // Changes are made once the relay says etcd is down: before that, the
    // relay does not know yet and a change would wait for etcd to answer.
    if wait_for_etcd_state(&status, "down", NOTICE_LIMIT.min(length))
        .await
        .is_ok()
    {
        run.noticed = Some(killed.elapsed());
        run.changes = registrants.change().await;
    } else {
        eprintln!("  outage: the relay did not report etcd down; no registration changes made");
    }
    while Instant::now() < end {
        let step = end
            .saturating_duration_since(Instant::now())
            .min(PROGRESS_EVERY);
        tokio::time::sleep(step).await;
        if let Ok(document) = status.status().await {
            eprintln!(
                "  outage: etcd {:.0} s down, {} sent, backlog {}, relay says etcd {}, {} \
                 changes pending",
                killed.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                total_backlog(&document),
                etcd_state(&document),
                etcd_figure(&document, "pending_changes")
            );
        }
    }
    let during = status
        .status()
        .await
        .context("asking the relay for its status")?;
    run.pending_at_end = etcd_figure(&during, "pending_changes");
    run.max_staleness_ms = etcd_figure(&during, "max_staleness_ms");
    run.told_down = registrants.told(LinkStatus::Down);
    run.back_seq = sent.load(Ordering::Relaxed);
    stop_gets.store(true, Ordering::Relaxed);
    run.gets = gets.await.context("the GET task")?;

    eprintln!("  outage: starting etcd again on its data dir");
    etcd.restart().await?;
    let answered = Instant::now();
    run.down_for = answered.duration_since(killed);
    let mut direct = etcd.client().await?;
    run.reconciled = wait_reconciled(&mut direct, &status, &registrants.expected, answered).await;
    eprintln!(
        "  outage: registrations reconciled after {}",
        run.reconciled
            .done
            .map_or("(never)".to_string(), |took| format!(
                "{:.2} s",
                took.as_secs_f64()
            ))
    );
    run.told_up = registrants.told(LinkStatus::Up);
    if run.reconciled.done.is_some() {
        // Keys left on a lease the relay no longer keeps alive would go
        // when etcd expires it, one TTL after the restart at the latest.
        tokio::time::sleep(LEASE_TTL + TTL_MARGIN).await;
        run.reconciled.later = match read_etcd(&mut direct).await {
            Ok((found, _)) => difference(&found, &registrants.expected),
            Err(error) => Some(error.to_string()),
        };
    }
    let after = status
        .status()
        .await
        .context("asking the relay for its status")?;
    run.reconcile_runs = etcd_figure(&after, "reconcile_runs")
        .saturating_sub(etcd_figure(&before, "reconcile_runs"));
    run.outages = etcd_figure(&after, "outages").saturating_sub(etcd_figure(&before, "outages"));
    run.reconnect_attempts = etcd_figure(&after, "reconnect_attempts")
        .saturating_sub(etcd_figure(&before, "reconnect_attempts"));
    registrants.close().await;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etcd_table_follows_the_classes() {
        let config = relay_config(
            "[classes.default]\njetstream = true\n",
            "http://127.0.0.1:2379",
        );
        assert!(config.starts_with("[classes.default]"));
        assert!(config.ends_with("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n"));
    }

    #[test]
    fn keys_and_values_are_distinct_per_session_and_version() {
        assert_eq!(key(3, 7), "v1/instances/outage/3/7");
        assert_ne!(value(3, 7, 1), value(3, 7, 2));
        assert_ne!(value(1, 2, 1), value(2, 1, 1));
    }

    #[test]
    fn difference_counts_missing_extra_and_old_values() {
        let expected: BTreeMap<String, String> = [("a", "1"), ("b", "2"), ("c", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(difference(&expected, &expected), None);
        let found: BTreeMap<String, String> = [("a", "1"), ("b", "old"), ("d", "4")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            difference(&found, &expected).as_deref(),
            Some("3 keys in etcd: 1 missing, 1 extra, 1 with an old value")
        );
    }

    #[test]
    fn changes_are_counted_by_outcome() {
        let mut changes = Changes::default();
        changes.count(Ok(RegistrationStatus::Buffered));
        changes.count(Ok(RegistrationStatus::Applied));
        changes.count(Err("no answer".to_string()));
        assert_eq!((changes.buffered, changes.applied), (1, 1));
        assert_eq!(changes.total(), 3);
    }
}
