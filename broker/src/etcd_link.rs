//! The relay's connection to the upstream etcd cluster, and its link state.
//!
//! One task connects, probes and reconnects; everyone else reads the current
//! state (and the connected client) from a watch channel. A probe is a
//! linearizable count-only read, so it fails when the cluster has no leader,
//! not only when the socket is gone; with the default 250 ms interval and
//! 500 ms timeout an outage is noticed within 750 ms. Reconnects wait an
//! exponential, jittered delay capped at `reconnect_delay_max`, so a fleet
//! of relays does not hammer an etcd that is coming back.
//!
//! An etcd restarted faster than a probe notices (or a new leader elected)
//! keeps the link up, yet leases may be gone and watches broken; probes
//! compare each answer's raft term, cluster and revision with the last one
//! and start a new link generation when they change, so the registry
//! reconciles and watches resynchronise as after an outage.

use crate::config::EtcdConfig;
use crate::nats_link::LinkSnapshot;
use etcd_client::{Client, ConnectOptions, GetOptions};
use holdfast_wire::backoff::{jitter_source, Backoff};
use holdfast_wire::LinkStatus;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Base period of the TCP check that cuts a reconnect backoff short.
const REACHABILITY_CHECK: Duration = Duration::from_millis(500);

/// The key read by probes; it need not exist.
const PROBE_KEY: &[u8] = b"\0holdfast-probe";

/// The link's state plus the client to use while it is up.
#[derive(Clone)]
pub struct EtcdState {
    pub link: LinkSnapshot,
    /// Present while the link is up.
    pub client: Option<Client>,
    /// Counts up transitions, so a task can tell "up again" from "still up".
    pub generation: u64,
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
        }
    }

    /// Starts connecting in the background; returns at once.
    pub fn start(config: &EtcdConfig, shutdown: CancellationToken) -> EtcdLink {
        if config.endpoints.is_empty() {
            return EtcdLink::disabled();
        }
        let (sender, state) = watch::channel(initial_state());
        let link = EtcdLink {
            state,
            reconnect_attempts: Arc::default(),
            highest_revision: Arc::default(),
            endpoints: Arc::new(config.endpoints.clone()),
        };
        let task = LinkTask {
            config: config.clone(),
            sender,
            reconnect_attempts: link.reconnect_attempts.clone(),
            highest_revision: link.highest_revision.clone(),
            past_downtime: Duration::ZERO,
            outages: 0,
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

    pub fn snapshot(&self) -> LinkSnapshot {
        self.state.borrow().link
    }

    pub fn is_up(&self) -> bool {
        self.state.borrow().link.status == LinkStatus::Up
    }

    /// The connected client, while the link is up.
    pub fn client(&self) -> Option<Client> {
        self.state.borrow().client.clone()
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

    /// Connection attempts made after the first one failed or the link fell.
    pub fn reconnect_attempts(&self) -> u64 {
        self.reconnect_attempts.load(Ordering::Relaxed)
    }
}

/// How long one connection attempt (connect plus first probe) may take.
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
    }
}

struct LinkTask {
    config: EtcdConfig,
    sender: watch::Sender<EtcdState>,
    reconnect_attempts: Arc<AtomicU64>,
    highest_revision: Arc<AtomicI64>,
    past_downtime: Duration,
    outages: u64,
}

impl LinkTask {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.probe_interval, self.config.reconnect_delay_max);
        let mut first = true;
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = self.connect() => connected,
            };
            match connected {
                Ok((client, first_answer)) => {
                    backoff.reset();
                    // A new connection starts a new generation anyway; the
                    // revision floor restarts from what this etcd says.
                    self.highest_revision
                        .store(first_answer.revision, Ordering::Relaxed);
                    self.set(LinkStatus::Up, Some(client.clone()));
                    info!(endpoints = %self.config.endpoints.join(","), "etcd link up");
                    let reason = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        reason = self.probe_until_failure(client, first_answer) => reason,
                    };
                    self.set(LinkStatus::Down, None);
                    warn!(reason = %reason, "etcd link down; registrations are buffered and discovery answers from the cache");
                }
                Err(error) => {
                    if first || self.sender.borrow().link.status != LinkStatus::Down {
                        self.set(LinkStatus::Down, None);
                        warn!(error = %error, "cannot reach etcd; registrations are buffered and discovery answers from the cache");
                    }
                    let delay = backoff.next_delay();
                    self.reconnect_attempts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %error, retry_in_ms = delay.as_millis() as u64, "etcd connect failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.accepting_again() => {
                            tracing::debug!("an etcd endpoint accepts connections again; reconnecting before the backoff ran out");
                        }
                    }
                }
            }
            first = false;
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
                let connect = tokio::net::TcpStream::connect(address.as_str());
                if let Ok(Ok(_)) = tokio::time::timeout(self.config.probe_timeout, connect).await {
                    return;
                }
            }
        }
    }

    /// A fresh client that answered one probe, and that answer.
    async fn connect(&self) -> Result<(Client, ServerView), String> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.config.probe_timeout)
            .with_keep_alive(self.config.probe_interval * 4, self.config.probe_timeout);
        let attempt = async {
            let mut client = Client::connect(&self.config.endpoints, Some(options))
                .await
                .map_err(|error| error.to_string())?;
            let view = probe(&mut client).await?;
            Ok((client, view))
        };
        tokio::time::timeout(connect_limit(&self.config), attempt)
            .await
            .map_err(|_| "connect timed out".to_string())?
    }

    /// Probes every `probe_interval` until one fails; returns why.
    async fn probe_until_failure(&mut self, mut client: Client, mut last: ServerView) -> String {
        let mut ticker = tokio::time::interval(self.config.probe_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // Read before asking: a write answered while the probe is in
            // flight may carry a higher revision than the probe's answer.
            let highest = self.highest_revision.load(Ordering::Relaxed);
            match tokio::time::timeout(self.config.probe_timeout, probe(&mut client)).await {
                Ok(Ok(view)) => {
                    let seen = ServerView {
                        revision: last.revision.max(highest),
                        ..last
                    };
                    if let Some(change) = seen.changed_to(&view) {
                        warn!(change = %change, "etcd restarted or changed leader while the link stayed up; reconciling as after an outage");
                        self.highest_revision
                            .store(view.revision, Ordering::Relaxed);
                        self.new_generation();
                    }
                    last = view;
                }
                Ok(Err(error)) => return error,
                Err(_) => {
                    return format!(
                        "no answer within {} ms",
                        self.config.probe_timeout.as_millis()
                    )
                }
            }
        }
    }

    /// Same link, but what was built on it (leases, watches) must be
    /// checked again.
    fn new_generation(&mut self) {
        self.sender.send_modify(|state| state.generation += 1);
    }

    fn set(&mut self, status: LinkStatus, client: Option<Client>) {
        let now = SystemTime::now();
        let previous = self.sender.borrow().link;
        if previous.status == LinkStatus::Down {
            self.past_downtime += now.duration_since(previous.since).unwrap_or_default();
        }
        if status == LinkStatus::Down && previous.status != LinkStatus::Down {
            self.outages += 1;
        }
        let generation = self.sender.borrow().generation + u64::from(status == LinkStatus::Up);
        self.sender.send_replace(EtcdState {
            link: LinkSnapshot {
                status,
                since: now,
                outages: self.outages,
                past_downtime: self.past_downtime,
            },
            client,
            generation,
        });
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

/// What a probe's answer says about the etcd that gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServerView {
    cluster_id: u64,
    raft_term: u64,
    revision: i64,
}

impl ServerView {
    /// Why `next` is not the same etcd history as `self`, if it is not.
    fn changed_to(&self, next: &ServerView) -> Option<String> {
        if next.cluster_id != self.cluster_id {
            return Some(format!(
                "cluster id {:x} became {:x}",
                self.cluster_id, next.cluster_id
            ));
        }
        if next.raft_term != self.raft_term {
            return Some(format!(
                "raft term {} became {}",
                self.raft_term, next.raft_term
            ));
        }
        if next.revision < self.revision {
            return Some(format!(
                "revision went back from {} to {}",
                self.revision, next.revision
            ));
        }
        None
    }
}

async fn probe(client: &mut Client) -> Result<ServerView, String> {
    let answer = client
        .get(PROBE_KEY, Some(GetOptions::new().with_count_only()))
        .await
        .map_err(|error| error.to_string())?;
    let header = answer
        .header()
        .ok_or_else(|| "etcd answered without a response header".to_string())?;
    Ok(ServerView {
        cluster_id: header.cluster_id(),
        raft_term: header.raft_term(),
        revision: header.revision(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(cluster_id: u64, raft_term: u64, revision: i64) -> ServerView {
        ServerView {
            cluster_id,
            raft_term,
            revision,
        }
    }

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
    fn only_a_different_history_counts_as_a_change() {
        let before = view(7, 3, 100);
        assert_eq!(
            before.changed_to(&view(7, 3, 150)),
            None,
            "writes are not a change"
        );
        assert!(
            before.changed_to(&view(7, 4, 150)).is_some(),
            "restart or new leader"
        );
        assert!(
            before.changed_to(&view(7, 3, 1)).is_some(),
            "came back empty"
        );
        assert!(
            before.changed_to(&view(8, 3, 150)).is_some(),
            "another cluster"
        );
    }
}
