//! The relay's connection to the upstream etcd cluster, and its link state.
//!
//! One task probes the members and decides, through [`Failover`], which
//! member calls go to and whether etcd is up; everyone else reads the
//! current state (and that member's client) from a watch channel. A probe
//! is a linearizable count-only read sent with etcd's "require leader"
//! flag, so a member without a leader says so at once instead of hanging.
//! While the member in use serves, only it is probed (every
//! `probe_interval`); when it stops, every member is probed and calls move
//! to one that serves, with no outage reported. The link is down when every
//! member refuses connections, or when none has served for `link_timeout`
//! (quorum lost, the cluster stopped). While down, rounds wait an
//! exponential, jittered delay capped at `reconnect_delay_max`, cut short
//! by a cheap TCP check, so a fleet of relays does not hammer an etcd that
//! is coming back.
//!
//! An etcd restarted faster than a probe notices keeps the link up, yet
//! may have lost its data: probes compare each answer's cluster and
//! revision with the last one and start a new link generation when they
//! change, so the registry reconciles and watches resynchronise as after
//! an outage. A new leader (a new raft term) loses nothing; the registry
//! just checks its keys once ([`EtcdState::leader_changes`]).

use crate::config::EtcdConfig;
use crate::keys::etcd::failover::{Failover, MemberAnswer, RoundOutcome, ServerView, ViewChange};
use crate::keys::etcd::security::EtcdSecurity;
use crate::util::failure_log::FailureLog;
use crate::util::link_snapshot::LinkSnapshot;
use etcd_client::{Client, ConnectOptions, GetOptions};
use holdfast_wire::backoff::{jitter_source, Backoff};
use holdfast_wire::LinkStatus;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often every member is probed, even while the one in use serves.
const HEALTH_REFRESH: Duration = Duration::from_secs(5);

/// Base period of the TCP check that cuts a reconnect backoff short.
const REACHABILITY_CHECK: Duration = Duration::from_millis(500);

/// The link's state plus the client to use while it is up.
#[derive(Clone)]
pub struct EtcdState {
    pub link: LinkSnapshot,
    /// The client of the member calls go to; present while the link is up.
    pub client: Option<Client>,
    /// Counts up transitions and changes of etcd's history (another
    /// cluster, lost data), so a task can tell "up again" from "still up".
    pub generation: u64,
    /// Counts leader elections seen while up.
    pub leader_changes: u64,
    /// Counts moves of the calls to another member while up.
    pub member_changes: u64,
    /// Index into the endpoints of the member calls go to.
    pub member: Option<usize>,
}

/// One member as the status document shows it.
#[derive(Debug, Clone)]
pub struct MemberView {
    pub endpoint: String,
    /// "serving", "not_serving", "unreachable" or "unknown".
    pub health: &'static str,
    /// Why its last probe failed.
    pub error: Option<String>,
}

impl MemberView {
    /// Whether it served or at least accepted a connection when last probed.
    pub fn is_reachable(&self) -> bool {
        matches!(self.health, "serving" | "not_serving")
    }
}

/// A cheap handle to the etcd link.
#[derive(Clone)]
pub struct EtcdLink {
    state: watch::Receiver<EtcdState>,
    reconnect_attempts: Arc<AtomicU64>,
    /// The highest revision any answer from etcd carried: a probe finding
    /// a lower one means etcd lost its data, even if it came back between
    /// two probes.
    highest_revision: Arc<AtomicI64>,
    endpoints: Arc<Vec<String>>,
    members: Arc<Mutex<Vec<MemberView>>>,
    security: Arc<EtcdSecurity>,
    /// Wakes the link task for a round now: a call just failed.
    nudge: Arc<Notify>,
}

impl EtcdLink {
    /// A link that is never up: etcd is not configured.
    pub fn disabled() -> EtcdLink {
        let (_, state) = watch::channel(initial_state());
        EtcdLink {
            state,
            reconnect_attempts: Arc::default(),
            highest_revision: Arc::default(),
            endpoints: Arc::default(),
            members: Arc::default(),
            security: Arc::default(),
            nudge: Arc::default(),
        }
    }

    /// Starts probing in the background; returns at once.
    pub fn start(
        config: &EtcdConfig,
        security: EtcdSecurity,
        shutdown: CancellationToken,
    ) -> EtcdLink {
        if config.endpoints.is_empty() {
            return EtcdLink::disabled();
        }
        let (sender, state) = watch::channel(initial_state());
        let members = config
            .endpoints
            .iter()
            .map(|endpoint| MemberView {
                endpoint: endpoint.clone(),
                health: "unknown",
                error: None,
            })
            .collect();
        let link = EtcdLink {
            state,
            reconnect_attempts: Arc::default(),
            highest_revision: Arc::default(),
            endpoints: Arc::new(config.endpoints.clone()),
            members: Arc::new(Mutex::new(members)),
            security: Arc::new(security),
            nudge: Arc::default(),
        };
        let task = LinkTask {
            config: config.clone(),
            security: link.security.clone(),
            sender,
            reconnect_attempts: link.reconnect_attempts.clone(),
            highest_revision: link.highest_revision.clone(),
            members: link.members.clone(),
            nudge: link.nudge.clone(),
            failover: Failover::new(config.endpoints.len(), config.link_timeout),
            clients: vec![None; config.endpoints.len()],
            last_view: None,
            past_downtime: Duration::ZERO,
            outages: 0,
            failure_log: FailureLog::default(),
            warned_blind: false,
        };
        tokio::spawn(task.run(shutdown));
        link
    }

    /// Whether etcd is configured at all.
    pub fn is_enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The TLS and authentication settings connections use.
    pub fn security(&self) -> &EtcdSecurity {
        &self.security
    }

    /// Every member's health as of its last probe.
    pub fn members(&self) -> Vec<MemberView> {
        self.members
            .lock()
            .map(|members| members.clone())
            .unwrap_or_default()
    }

    /// The endpoint calls go to now, if any.
    pub fn member_in_use(&self) -> Option<String> {
        let member = self.state.borrow().member?;
        self.endpoints.get(member).cloned()
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        self.state.borrow().link
    }

    pub fn is_up(&self) -> bool {
        self.state.borrow().link.status == LinkStatus::Up
    }

    /// The client of the member in use, while the link is up.
    pub fn client(&self) -> Option<Client> {
        self.state.borrow().client.clone()
    }

    /// Tells the link a call to the member in use failed, so that it checks
    /// the members now rather than at the next probe.
    pub fn call_failed(&self) {
        self.nudge.notify_one();
    }

    /// Waits until the first connection attempt has decided the link's
    /// status, at most `limit`; returns the status.
    pub async fn settled(&self, limit: Duration) -> LinkStatus {
        let mut state = self.state.clone();
        let decided = state.wait_for(|state| state.link.status != LinkStatus::Unknown);
        let _ = tokio::time::timeout(limit, decided).await;
        self.snapshot().status
    }

    pub fn watch(&self) -> watch::Receiver<EtcdState> {
        self.state.clone()
    }

    /// Records the revision of an answer from etcd.
    pub fn saw_revision(&self, revision: i64) {
        self.highest_revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// Times calls moved to another member while the link stayed up.
    pub fn member_switches(&self) -> u64 {
        self.state.borrow().member_changes
    }

    /// Probe rounds made while the link was down.
    pub fn reconnect_attempts(&self) -> u64 {
        self.reconnect_attempts.load(Ordering::Relaxed)
    }
}

/// How long one member's probe (building its client included) may take.
pub fn connect_limit(config: &EtcdConfig) -> Duration {
    config.probe_timeout * 2
}

fn initial_state() -> EtcdState {
    EtcdState {
        link: LinkSnapshot {
            status: LinkStatus::Unknown,
            since: SystemTime::now(),
            outages: 0,
            past_downtime: Duration::ZERO,
        },
        client: None,
        generation: 0,
        leader_changes: 0,
        member_changes: 0,
        member: None,
    }
}

struct LinkTask {
    config: EtcdConfig,
    security: Arc<EtcdSecurity>,
    sender: watch::Sender<EtcdState>,
    reconnect_attempts: Arc<AtomicU64>,
    highest_revision: Arc<AtomicI64>,
    members: Arc<Mutex<Vec<MemberView>>>,
    nudge: Arc<Notify>,
    failover: Failover,
    /// One client per member, built when first probed and dropped when
    /// the member stops accepting connections (or refuses credentials),
    /// so a rebuilt one reads the credential files again.
    clients: Vec<Option<Client>>,
    /// The last answer that served, to spot a changed history.
    last_view: Option<ServerView>,
    past_downtime: Duration,
    outages: u64,
    failure_log: FailureLog,
    /// Whether the log already said the probe key may not be read.
    warned_blind: bool,
}

impl LinkTask {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.probe_interval, self.config.reconnect_delay_max);
        let mut last_full_round = Instant::now();
        loop {
            // Every member now and then, so the status shows a member that
            // came back as serving, not as it was when last left.
            let members = if last_full_round.elapsed() >= HEALTH_REFRESH {
                (0..self.config.endpoints.len()).collect()
            } else {
                self.failover.round_members()
            };
            let swept = members.len() == self.config.endpoints.len();
            if swept {
                last_full_round = Instant::now();
            }
            // Read before asking: a write answered while the probe is in
            // flight may carry a higher revision than the probe's answer.
            let floor = self.highest_revision.load(Ordering::Relaxed);
            let started = Instant::now();
            let answers = tokio::select! {
                _ = shutdown.cancelled() => return,
                answers = self.probe_round(&members) => answers,
            };
            let blind = answers
                .iter()
                .any(|(_, answer)| *answer == MemberAnswer::Served(None));
            if blind && !self.warned_blind {
                self.warned_blind = true;
                warn!(
                    probe_key = %self.config.probe_key,
                    "the relay's etcd user may not read etcd.probe_key; etcd serves, but an etcd that lost its data between two probes goes unnoticed until the next reconcile pass; grant read on that key"
                );
            }
            let outcome = self.failover.on_round(answers, started, Instant::now());
            let served = outcome.served;
            self.apply(outcome, served, floor);
            if self.failover.status() == LinkStatus::Down {
                let delay = backoff.next_delay();
                self.reconnect_attempts.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.accepting_again() => {
                        debug!("an etcd endpoint accepts connections again; probing before the backoff ran out");
                    }
                }
            } else {
                backoff.reset();
                // The member in use stopped serving: look at all of them
                // now. While none serves (an election), sweep twice as
                // often as the probe. A call that failed brings a round
                // forward.
                let wait = match (self.failover.wants_sweep(), swept) {
                    (true, false) => Duration::ZERO,
                    (true, true) => self.config.probe_interval / 2,
                    (false, _) => self.config.probe_interval,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.nudge.notified() => {}
                }
            }
        }
    }

    /// Probes `members` at once; their answers, in the configured order.
    async fn probe_round(&mut self, members: &[usize]) -> Vec<(usize, MemberAnswer)> {
        let probes = members.iter().map(|&member| {
            let endpoint = self.config.endpoints[member].clone();
            let client = self.clients[member].clone();
            let security = self.security.clone();
            let config = self.config.clone();
            async move {
                let (answer, client) = probe_member(&endpoint, client, &security, &config).await;
                (member, answer, client)
            }
        });
        let results = futures::future::join_all(probes).await;
        let mut answers = Vec::with_capacity(results.len());
        for (member, answer, client) in results {
            if let (MemberAnswer::NotServing(error), false) = (&answer, client.is_some()) {
                debug!(endpoint = %self.config.endpoints[member], error = %error, "etcd member does not serve");
            }
            self.clients[member] = client;
            answers.push((member, answer));
        }
        answers
    }

    /// Publishes what a round (or the passing of time) changed.
    /// `floor`: the highest revision seen before the round's probes went out.
    fn apply(&mut self, outcome: RoundOutcome, served: Option<ServerView>, floor: i64) {
        self.publish_members();
        let mut history_changed = None;
        let mut leader_changed = None;
        if let Some(view) = served {
            if let Some(last) = self.last_view {
                let seen = ServerView {
                    revision: last.revision.max(floor),
                    ..last
                };
                match seen.changed_to(&view) {
                    Some(ViewChange::History(change)) => history_changed = Some(change),
                    Some(ViewChange::Leader { from, to }) => leader_changed = Some((from, to)),
                    None => {}
                }
            }
            self.last_view = Some(view);
        }
        let endpoints = self.config.endpoints.clone();
        let endpoint = |member: Option<usize>| {
            member
                .and_then(|member| endpoints.get(member))
                .cloned()
                .unwrap_or_default()
        };
        match outcome.status {
            Some(LinkStatus::Up) => {
                if let Some(view) = served {
                    // A new link generation; the revision floor restarts
                    // from what this etcd says.
                    self.highest_revision
                        .store(view.revision, Ordering::Relaxed);
                }
                self.failure_log.reset();
                self.set_status(LinkStatus::Up);
                info!(endpoint = %endpoint(self.failover.current()), "etcd link up");
                return;
            }
            Some(LinkStatus::Down) => {
                self.set_status(LinkStatus::Down);
                warn!(reason = %self.why_down(), "etcd link down: no member serves; registrations are buffered and discovery answers from the cache");
                return;
            }
            _ => {}
        }
        if self.failover.status() == LinkStatus::Down {
            let reason = self.why_down();
            if self.failure_log.due(&reason, Instant::now()) {
                warn!(reason = %reason, "cannot reach etcd; retrying with backoff");
            }
            return;
        }
        if let Some(change) = history_changed {
            warn!(change = %change, "etcd restarted or changed under the link; reconciling as after an outage");
            if let Some(view) = served {
                self.highest_revision
                    .store(view.revision, Ordering::Relaxed);
            }
            self.sender.send_modify(|state| state.generation += 1);
        } else if let Some((from, to)) = leader_changed {
            info!(
                from_term = from,
                to_term = to,
                "etcd elected a new leader; checking the registrations once"
            );
            self.sender.send_modify(|state| state.leader_changes += 1);
        }
        if let Some(member) = outcome.switched_to {
            let client = member.and_then(|member| self.clients[member].clone());
            let from = self.sender.borrow().member;
            info!(
                from = %endpoint(from),
                to = %endpoint(member),
                reason = %from.and_then(|from| self.failover.error(from)).unwrap_or("it stopped serving"),
                "etcd calls moved to another member; not an outage"
            );
            self.sender.send_modify(|state| {
                state.client = client;
                state.member = member;
                state.member_changes += 1;
            });
        }
    }

    /// Every member's last problem, for the log line of an outage.
    fn why_down(&self) -> String {
        self.config
            .endpoints
            .iter()
            .enumerate()
            .map(|(member, endpoint)| {
                format!(
                    "{endpoint}: {}",
                    self.failover.error(member).unwrap_or("no answer")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn publish_members(&self) {
        let Ok(mut members) = self.members.lock() else {
            return;
        };
        for (member, view) in members.iter_mut().enumerate() {
            view.health = self.failover.health(member).name();
            view.error = self.failover.error(member).map(str::to_string);
        }
    }

    /// Resolves once an endpoint accepts a TCP connection, checked about
    /// once a second with jitter.
    ///
    /// The backoff (up to 30 s by default) keeps a fleet of relays from
    /// hammering an etcd that refuses or fails handshakes; but a relay that
    /// sleeps out the cap after etcd is back would break the promise that
    /// registrations are rebuilt within one reconcile interval. A bare TCP
    /// connect is cheap for etcd, and the jitter spreads the fleet's
    /// reconnects over a second.
    async fn accepting_again(&self) {
        let addresses: Vec<String> = self
            .config
            .endpoints
            .iter()
            .filter_map(|endpoint| socket_address(endpoint))
            .collect();
        if addresses.is_empty() {
            return std::future::pending().await;
        }
        loop {
            let jitter = jitter_source() % 1000;
            tokio::time::sleep(REACHABILITY_CHECK + Duration::from_millis(jitter)).await;
            for address in &addresses {
                if accepts_connections(address, self.config.probe_timeout).await {
                    return;
                }
            }
        }
    }

    fn set_status(&mut self, status: LinkStatus) {
        let now = SystemTime::now();
        let previous = self.sender.borrow().link;
        if previous.status == LinkStatus::Down {
            self.past_downtime += now.duration_since(previous.since).unwrap_or_default();
        }
        if status == LinkStatus::Down && previous.status != LinkStatus::Down {
            self.outages += 1;
        }
        let member = self.failover.current();
        let client = member.and_then(|member| self.clients[member].clone());
        let up = status == LinkStatus::Up;
        self.sender.send_modify(|state| {
            state.link = LinkSnapshot {
                status,
                since: now,
                outages: self.outages,
                past_downtime: self.past_downtime,
            };
            state.generation += u64::from(up);
            state.client = if up { client } else { None };
            state.member = if up { member } else { None };
        });
    }
}

/// Probes one member, building its client first if it has none. Returns
/// the answer and the client to keep (none when it should be rebuilt).
async fn probe_member(
    endpoint: &str,
    client: Option<Client>,
    security: &EtcdSecurity,
    config: &EtcdConfig,
) -> (MemberAnswer, Option<Client>) {
    let attempt = async {
        let mut client = match client {
            Some(client) => client,
            None => build_client(endpoint, security, config)
                .await
                .map_err(|error| (error, None))?,
        };
        match tokio::time::timeout(config.probe_timeout, probe(&mut client, &config.probe_key))
            .await
        {
            Ok(Ok(view)) => Ok((view, client)),
            Ok(Err(error)) => Err((error, Some(client))),
            Err(_) => Err((
                format!("no answer within {} ms", config.probe_timeout.as_millis()),
                Some(client),
            )),
        }
    };
    let (error, client) = match tokio::time::timeout(connect_limit(config), attempt).await {
        Ok(Ok((view, client))) => return (MemberAnswer::Served(view), Some(client)),
        Ok(Err(failure)) => failure,
        Err(_) => (
            format!("no answer within {} ms", connect_limit(config).as_millis()),
            None,
        ),
    };
    let connectable = match socket_address(endpoint) {
        Some(address) => connect_check(&address, config.probe_timeout).await,
        None => Err(format!("{endpoint} names no port")),
    };
    if let Err(refused) = connectable {
        // The socket's own words ("Connection refused") say it plainest.
        return (MemberAnswer::Unreachable(refused), None);
    }
    // Refused credentials are read again from their files by a new client.
    let keep = client.filter(|_| !is_credentials_error(&error));
    (MemberAnswer::NotServing(error), keep)
}

/// A client of one member, with the relay's TLS and credentials.
async fn build_client(
    endpoint: &str,
    security: &EtcdSecurity,
    config: &EtcdConfig,
) -> Result<Client, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(config.probe_timeout)
        .with_keep_alive(config.probe_interval * 4, config.probe_timeout)
        // A member that lost its leader refuses calls (and ends watches)
        // instead of hanging or serving a partitioned view.
        .with_require_leader(true);
    let options = security.connect_options(options)?;
    Client::connect([endpoint], Some(options))
        .await
        .map_err(|error| error.to_string())
}

/// Whether `error` says the relay's credentials were refused.
fn is_credentials_error(error: &str) -> bool {
    [
        "authentication failed",
        "invalid auth token",
        "permission denied",
        "user name",
    ]
    .iter()
    .any(|marker| error.contains(marker))
}

/// Whether `address` accepts a TCP connection within `limit`.
async fn accepts_connections(address: &str, limit: Duration) -> bool {
    connect_check(address, limit).await.is_ok()
}

/// A TCP connect to `address` within `limit`, or why it failed.
async fn connect_check(address: &str, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("cannot connect to {address}: {error}")),
        Err(_) => Err(format!(
            "{address} accepted no connection within {} ms",
            limit.as_millis()
        )),
    }
}

/// `host:port` of an endpoint URL such as `http://10.0.0.5:2379`.
fn socket_address(endpoint: &str) -> Option<String> {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    (!authority.is_empty() && authority.contains(':')).then(|| authority.to_string())
}

/// A linearizable count-only read of `key`: what the member that answered
/// says about its cluster, or `None` when the relay's user may not read the
/// key (etcd checks permissions after the read reached a quorum, so that
/// refusal still proves the member serves).
async fn probe(client: &mut Client, key: &str) -> Result<Option<ServerView>, String> {
    let answer = match client
        .get(key, Some(GetOptions::new().with_count_only()))
        .await
    {
        Ok(answer) => answer,
        Err(etcd_client::Error::GRpcStatus(status))
            if status.code() == tonic::Code::PermissionDenied =>
        {
            return Ok(None)
        }
        Err(error) => return Err(error.to_string()),
    };
    let header = answer
        .header()
        .ok_or_else(|| "etcd answered without a response header".to_string())?;
    Ok(Some(ServerView {
        cluster_id: header.cluster_id(),
        raft_term: header.raft_term(),
        revision: header.revision(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_name_the_address_to_check() {
        assert_eq!(
            socket_address("http://10.0.0.5:2379").as_deref(),
            Some("10.0.0.5:2379")
        );
        assert_eq!(
            socket_address("https://etcd.example:2379/").as_deref(),
            Some("etcd.example:2379")
        );
        assert_eq!(
            socket_address("127.0.0.1:2379").as_deref(),
            Some("127.0.0.1:2379")
        );
        assert_eq!(socket_address("http://no-port"), None);
    }

    #[test]
    fn refused_credentials_are_told_from_other_failures() {
        assert!(is_credentials_error(
            "grpc request error: status: InvalidArgument, message: \"etcdserver: authentication failed, invalid user ID or password\""
        ));
        assert!(!is_credentials_error("etcdserver: no leader"));
    }
}
