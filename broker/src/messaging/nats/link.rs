//! The relay's connections to the upstream NATS cluster, and its link state.
//!
//! JetStream, requests of the relay's own and the link's probes use
//! async-nats; upstream subscriptions, the forwarder's core publishes and
//! publishes that carry a reply subject use the relay's own subscriber
//! connection ([`crate::messaging::nats::subscriber`]), which survives
//! malformed messages that would end async-nats's and takes a batch of
//! publishes in one write.
//!
//! async-nats owns its socket, reconnects and re-subscribes; this file adds
//! what the relay needs on top: a round-trip probe through the server so a
//! stopped server is noticed within `link_timeout`, a lock-free "is it up"
//! flag for the publish hot path, and a watch channel that sessions follow
//! to tell their clients (LINK_STATE frames).

use crate::config::NatsConfig;
use crate::messaging::nats::link_monitor::LinkMonitor;
use crate::messaging::nats::security::NatsSecurity;
use crate::messaging::nats::subscriber::{
    ServerAddress, SubscriberLink, SubscriberSettings, SubscriberState, UpstreamPublisher,
    UpstreamSubscription,
};
use crate::util::drop_log::DropLog;
use crate::util::failure_log::FailureLog;
use crate::util::link_snapshot::LinkSnapshot;
use async_nats::{
    client::{FlushErrorKind, RequestErrorKind},
    connection::State,
    Event,
};
use futures::StreamExt;
use holdfast_wire::LinkStatus;
use holdfast_wire::Text;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Why the NATS link could not be set up at all (a config problem; an
/// unreachable server is not an error, it is a `Down` link).
#[derive(Debug, thiserror::Error)]
#[error("cannot use NATS servers {servers:?}: {message}")]
pub struct NatsLinkError {
    pub servers: Vec<String>,
    pub message: String,
}

/// How long a probe that failed waits to learn whether the client's
/// connection task is still there (it answers a flush's hand-over at once).
const CLIENT_GONE_CHECK: Duration = Duration::from_millis(200);

/// How often the known servers are checked for reachability (a TCP
/// connect each), and how long one check may take.
const SERVER_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
const SERVER_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// The shortest time between two diagnostic connects that find out why
/// the client cannot connect (async-nats reports only the error's kind).
const DIAGNOSE_INTERVAL: Duration = Duration::from_secs(5);

/// The cluster as the relay sees it, for the status document and metrics.
#[derive(Debug, Clone, Default)]
pub struct ServersView {
    /// The configured seeds and the servers the cluster announced
    /// (`connect_urls`), as `host:port`.
    pub known: Vec<String>,
    /// How many of `known` accepted a TCP connection at the last check;
    /// `None` before the first.
    pub reachable: Option<usize>,
    /// Why the last connect failed (the server's or TLS's words); cleared
    /// by a successful connect. Never holds a secret: errors name files,
    /// not their contents.
    pub last_error: Option<String>,
}

/// A cheap handle to the upstream connection.
#[derive(Clone)]
pub struct NatsLink {
    client: async_nats::Client,
    is_up: Arc<AtomicBool>,
    state: watch::Receiver<LinkSnapshot>,
    /// Cancelled when the client's connection task has ended for good.
    client_gone: CancellationToken,
    upstream_drops: Arc<AtomicU64>,
    /// The server's max_payload as of the last connect; 0 before one.
    max_payload: Arc<AtomicUsize>,
    servers: Arc<Mutex<ServersView>>,
    security: Arc<NatsSecurity>,
    /// The upstream subscriptions' own connection.
    subscriber: SubscriberLink,
}

impl NatsLink {
    /// Connects in the background and starts the link monitor; returns at
    /// once even when no server is reachable.
    pub async fn start(
        config: &NatsConfig,
        security: NatsSecurity,
        relay_id: &str,
        shutdown: CancellationToken,
    ) -> Result<NatsLink, NatsLinkError> {
        let (event_tx, event_rx) = mpsc::channel::<Event>(64);
        let upstream_drops = Arc::new(AtomicU64::new(0));
        let max_payload = Arc::new(AtomicUsize::new(0));
        let event_drops = upstream_drops.clone();
        let reconnect_delay_max = config.reconnect_delay_max;
        let security = Arc::new(security);
        let servers = security.servers().to_vec();
        let options = security
            .connect_options()
            .name(format!("holdfastd {relay_id}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.request_timeout))
            // Every subject was validated when the relay accepted it (the
            // journal only holds accepted messages); a second check per
            // message would only cost time.
            .skip_subject_validation(true)
            .reconnect_delay_callback(move |attempts| {
                let exponent = attempts.min(10) as u32;
                Duration::from_millis(50u64.saturating_mul(1 << exponent)).min(reconnect_delay_max)
            })
            .event_callback(move |event| {
                // async-nats raises one event per message it dropped because
                // an upstream subscription's queue was full. Counted here,
                // before the hand-over below can lose events in a flood.
                if matches!(event, Event::SlowConsumer(_)) {
                    event_drops.fetch_add(1, Ordering::Relaxed);
                }
                let event_tx = event_tx.clone();
                async move {
                    // Events only speed detection up; the probe catches what
                    // a full channel would lose, so never wait here.
                    let _ = event_tx.try_send(event);
                }
            });
        let client = options
            .connect(servers.clone())
            .await
            .map_err(|error| NatsLinkError {
                servers: servers.clone(),
                message: error.to_string(),
            })?;
        let subscriber = SubscriberLink::start(
            SubscriberSettings {
                seeds: servers
                    .iter()
                    .filter_map(|server| ServerAddress::parse(server))
                    .collect(),
                security: security.clone(),
                client_name: format!("holdfastd {relay_id} subscriptions"),
                connect_timeout: config.connect_timeout,
                reconnect_delay_max: config.reconnect_delay_max,
                ping_interval: config.link_timeout,
                upstream_drops: upstream_drops.clone(),
            },
            shutdown.clone(),
        );
        let servers_view = Arc::new(Mutex::new(ServersView {
            known: servers.iter().map(|server| host_port(server)).collect(),
            reachable: None,
            last_error: None,
        }));
        let now = Instant::now();
        let initial = LinkSnapshot {
            status: LinkStatus::Unknown,
            since: SystemTime::now(),
            outages: 0,
            past_downtime: Duration::ZERO,
        };
        let (state_tx, state_rx) = watch::channel(initial);
        let is_up = Arc::new(AtomicBool::new(false));
        let probe_subject: Arc<str> = Arc::from(format!("_HOLDFAST.probe.{relay_id}"));
        answer_probes(&client, &probe_subject, shutdown.clone()).await;
        let client_gone = CancellationToken::new();
        let monitor = MonitorTask {
            client_gone: client_gone.clone(),
            client: client.clone(),
            monitor: LinkMonitor::new(now, config.link_timeout),
            probe_subject: probe_subject.clone(),
            probe_interval: config.probe_interval,
            link_timeout: config.link_timeout,
            connect_timeout: config.connect_timeout,
            seeds: servers.clone(),
            servers: servers.join(","),
            is_up: is_up.clone(),
            state_tx,
            upstream_drops: upstream_drops.clone(),
            drop_log: DropLog::default(),
            failure_log: FailureLog::default(),
            max_payload: max_payload.clone(),
            view: servers_view.clone(),
            security: security.clone(),
            last_diagnosis: None,
        };
        tokio::spawn(monitor.run(event_rx, shutdown));
        Ok(NatsLink {
            client,
            is_up,
            state: state_rx,
            client_gone,
            upstream_drops,
            max_payload,
            servers: servers_view,
            security,
            subscriber,
        })
    }

    /// Subscribes upstream on the subscriber connection (see
    /// `nats_subscriber`): a malformed message there costs that message,
    /// not the link.
    pub async fn subscribe(
        &self,
        subject: Text,
        queue_group: Option<Text>,
    ) -> Result<UpstreamSubscription, String> {
        self.subscriber.subscribe(subject, queue_group).await
    }

    /// Waits until the subscriber connection is up and nats-server has
    /// processed every subscription made before; false when `limit`
    /// passes first.
    pub async fn subscriptions_in_place(&self, limit: Duration) -> bool {
        self.subscriber.in_place(limit).await
    }

    /// Publishes a request (a message with a reply subject) on the
    /// subscriber connection, where its reply subscription lives.
    pub async fn publish_request(
        &self,
        subject: Text,
        reply: Text,
        headers: holdfast_wire::Headers,
        payload: bytes::Bytes,
    ) -> Result<(), String> {
        self.subscriber
            .publish_request(subject, reply, headers, payload)
            .await
    }

    /// The subscriber connection's server and last error.
    pub fn subscriber_state(&self) -> SubscriberState {
        self.subscriber.state()
    }

    /// The forwarder's handle for core publishes: they go on the subscriber
    /// connection, a batch per write (see `subscriber`'s module doc).
    pub fn upstream_publisher(&self) -> UpstreamPublisher {
        self.subscriber.publisher()
    }

    /// The subscriber connection's state as it changes.
    pub fn watch_subscriber(&self) -> watch::Receiver<SubscriberState> {
        self.subscriber.watch_state()
    }

    /// Returns once NATS processed everything handed to either connection
    /// before (core publishes and requests on the subscriber connection,
    /// JetStream on the client's), or once `limit` passed.
    pub async fn flush_publishes(&self, limit: Duration) {
        let client = self.client.clone();
        let both = futures::future::join(self.subscriber.round_trip(limit), async move {
            let _ = client.flush().await;
        });
        let _ = tokio::time::timeout(limit, both).await;
    }

    /// Messages from NATS skipped because they could not be decoded.
    pub fn malformed_upstream(&self) -> u64 {
        self.subscriber.malformed()
    }

    /// The known servers, how many answer, and why the last connect failed.
    pub fn servers_view(&self) -> ServersView {
        self.servers
            .lock()
            .map(|view| view.clone())
            .unwrap_or_default()
    }

    /// "tls" or "plaintext", and the authentication method's name.
    pub fn security(&self) -> (&'static str, &'static str) {
        (self.security.transport(), self.security.method())
    }

    /// The largest message (payload and header block) the NATS server takes,
    /// as of the last connect; `None` before the first.
    pub fn max_payload(&self) -> Option<usize> {
        Some(self.max_payload.load(Ordering::Relaxed)).filter(|max| *max > 0)
    }

    /// Messages the NATS client dropped because an upstream subscription's
    /// queue was full (at least this many: async-nats reports each drop as
    /// an event, and its own event queue can overflow).
    pub fn upstream_drops(&self) -> u64 {
        self.upstream_drops.load(Ordering::Relaxed)
    }

    /// Resolves once the NATS client's connection task has ended for good.
    /// async-nats does not restart it: its reader panics on some malformed
    /// messages from the server (a header value with a lone CR, which any
    /// publisher can send; nats-io/nats.rs#1612), and from then on every
    /// publish fails while the client still reports "connected". The relay
    /// then stops (gracefully, journaling what it holds in memory) and exits
    /// non-zero, so its supervisor starts it again with a new connection.
    pub async fn client_gone(&self) {
        self.client_gone.cancelled().await;
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether publishes should go upstream now. One atomic load: this is
    /// read for every publish.
    pub fn is_up(&self) -> bool {
        self.is_up.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        *self.state.borrow()
    }

    /// Waits until the link has a known state (up, or down after the first
    /// connect attempt timed out), at most `limit`.
    pub async fn settled(&self, limit: Duration) -> LinkStatus {
        let mut state = self.state.clone();
        let known = state.wait_for(|snapshot| snapshot.status != LinkStatus::Unknown);
        let _ = tokio::time::timeout(limit, known).await;
        self.snapshot().status
    }

    /// A receiver that wakes on every status change.
    pub fn watch(&self) -> watch::Receiver<LinkSnapshot> {
        self.state.clone()
    }

    /// The server the client is connected to, if any.
    pub fn connected_server(&self) -> Option<String> {
        if self.client.connection_state() != State::Connected {
            return None;
        }
        self.client
            .try_server_info()
            .map(|info| format!("{}:{}", info.host, info.port))
    }
}

struct MonitorTask {
    client: async_nats::Client,
    client_gone: CancellationToken,
    monitor: LinkMonitor,
    probe_subject: Arc<str>,
    probe_interval: Duration,
    link_timeout: Duration,
    connect_timeout: Duration,
    /// The configured servers, without credentials.
    seeds: Vec<String>,
    /// The same, joined for log lines.
    servers: String,
    is_up: Arc<AtomicBool>,
    state_tx: watch::Sender<LinkSnapshot>,
    upstream_drops: Arc<AtomicU64>,
    drop_log: DropLog,
    failure_log: FailureLog,
    max_payload: Arc<AtomicUsize>,
    view: Arc<Mutex<ServersView>>,
    security: Arc<NatsSecurity>,
    last_diagnosis: Option<Instant>,
}

impl MonitorTask {
    async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeOutcome>(1);
        let (diagnosis_tx, mut diagnosis_rx) = mpsc::channel::<String>(1);
        let (sweep_tx, mut sweep_rx) = mpsc::channel::<(Vec<String>, usize)>(1);
        let mut probe_in_flight = false;
        let mut ticker = tokio::time::interval(self.probe_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep_ticker = tokio::time::interval(SERVER_SWEEP_INTERVAL);
        sweep_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(event) = events.recv() => {
                    if matches!(event, Event::ClientError(_)) && !self.monitor.wants_probe() {
                        self.diagnose(&diagnosis_tx);
                    }
                    self.on_event(event)
                }
                Some(reason) = diagnosis_rx.recv() => {
                    self.on_connect_failure(reason);
                    None
                }
                _ = sweep_ticker.tick() => {
                    let known = self.known_servers();
                    let sweep_tx = sweep_tx.clone();
                    tokio::spawn(async move {
                        let reachable = count_reachable(&known).await;
                        let _ = sweep_tx.send((known, reachable)).await;
                    });
                    None
                }
                Some((known, reachable)) = sweep_rx.recv() => {
                    if let Ok(mut view) = self.view.lock() {
                        view.known = known;
                        view.reachable = Some(reachable);
                    }
                    None
                }
                // Exactly when the silence runs out, not at the next tick, so
                // a stalled server is declared down within `link_timeout`.
                () = tokio::time::sleep_until(self.monitor.silence_deadline().into()),
                    if self.monitor.status() != LinkStatus::Down => {
                    self.monitor.on_tick(Instant::now())
                }
                Some(outcome) = probe_rx.recv() => {
                    probe_in_flight = false;
                    match outcome {
                        ProbeOutcome::Answered => self.monitor.on_probe_ok(Instant::now()),
                        ProbeOutcome::Unanswered => None,
                        ProbeOutcome::ClientGone => {
                            if !self.client_gone.is_cancelled() {
                                error!(
                                    servers = %self.servers,
                                    "the NATS client's connection task has ended and will not reconnect (async-nats stops on some malformed messages from the server, e.g. a header value with a lone CR); stopping the relay so that a restart connects again; acknowledged messages are kept in the journal"
                                );
                                self.client_gone.cancel();
                            }
                            None
                        }
                    }
                }
                _ = ticker.tick() => {
                    let now = Instant::now();
                    // The event channel can miss a connect; the client's own
                    // state is the backstop.
                    let connected = self.client.connection_state() == State::Connected;
                    let mut change = None;
                    if connected && !self.monitor.wants_probe() {
                        change = self.monitor.on_connected(now);
                    } else if !connected && self.monitor.wants_probe() {
                        change = self.monitor.on_disconnected();
                    }
                    change = change.or(self.monitor.on_tick(now));
                    if self.monitor.wants_probe() && !probe_in_flight {
                        probe_in_flight = true;
                        tokio::spawn(probe(
                            self.client.clone(),
                            self.probe_subject.clone(),
                            self.link_timeout,
                            probe_tx.clone(),
                        ));
                    }
                    change
                }
            };
            if let Some(status) = change {
                self.publish(status);
            }
        }
    }

    /// The seeds and the servers the cluster announced, as `host:port`.
    fn known_servers(&self) -> Vec<String> {
        let mut known: Vec<String> = self.seeds.iter().map(|seed| host_port(seed)).collect();
        if let Some(info) = self.client.try_server_info() {
            for url in &info.connect_urls {
                let address = host_port(url);
                if !known.contains(&address) {
                    known.push(address);
                }
            }
        }
        known
    }

    /// Starts a one-off connect with the same settings to learn why the
    /// client's attempts fail: async-nats's events carry only the error's
    /// kind ("TLS error"), its own connect error the cause ("invalid peer
    /// certificate: UnknownIssuer"). At most one per `DIAGNOSE_INTERVAL`.
    fn diagnose(&mut self, done: &mpsc::Sender<String>) {
        let now = Instant::now();
        if self
            .last_diagnosis
            .is_some_and(|at| now.saturating_duration_since(at) < DIAGNOSE_INTERVAL)
        {
            return;
        }
        self.last_diagnosis = Some(now);
        let options = self
            .security
            .connect_options()
            .connection_timeout(self.connect_timeout)
            .skip_subject_validation(true);
        let servers = self.seeds.clone();
        let security = self.security.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let reason = match options.connect(servers).await {
                // The servers are back; the client will follow shortly.
                Ok(client) => {
                    drop(client);
                    return;
                }
                Err(error) => error.to_string(),
            };
            let reason = match security.credential_problem() {
                Some(problem) => format!("{reason} ({problem})"),
                None => reason,
            };
            let _ = done.send(reason).await;
        });
    }

    /// Records and (rate-limited) logs why connecting failed.
    fn on_connect_failure(&mut self, reason: String) {
        if self.monitor.wants_probe() {
            return;
        }
        if self.failure_log.due(&reason, Instant::now()) {
            warn!(
                servers = %self.servers,
                reason = %reason,
                "cannot connect to NATS; retrying with backoff"
            );
        }
        if let Ok(mut view) = self.view.lock() {
            view.last_error = Some(reason);
        }
    }

    fn on_event(&mut self, event: Event) -> Option<LinkStatus> {
        let now = Instant::now();
        match event {
            Event::Connected => {
                let info = self.client.server_info();
                self.max_payload.store(info.max_payload, Ordering::Relaxed);
                self.failure_log.reset();
                if let Ok(mut view) = self.view.lock() {
                    view.last_error = None;
                }
                info!(
                    server = %format!("{}:{}", info.host, info.port),
                    server_name = %info.server_name,
                    "connected to NATS"
                );
                self.monitor.on_connected(now)
            }
            Event::Disconnected | Event::Closed => self.monitor.on_disconnected(),
            // A connect attempt that failed while not connected: the server
            // is not there, so say so now rather than after link_timeout.
            Event::ClientError(error) if !self.monitor.wants_probe() => {
                let reason = error.to_string();
                let known = self
                    .view
                    .lock()
                    .map(|view| view.last_error.is_some())
                    .unwrap_or(true);
                // The diagnosis has the cause; the event only the kind.
                if !known {
                    self.on_connect_failure(reason);
                }
                self.monitor.on_disconnected()
            }
            Event::SlowConsumer(sid) => {
                let total = self.upstream_drops.load(Ordering::Relaxed);
                if let Some(dropped) = self.drop_log.due(total, now) {
                    warn!(
                        upstream_sid = sid,
                        dropped,
                        total,
                        "NATS client dropped messages for an upstream subscription (relay not keeping up); counted in holdfast_messages_dropped_total{{reason=\"upstream_slow_consumer\"}}"
                    );
                }
                None
            }
            other => {
                warn!(event = %other, "NATS connection event");
                None
            }
        }
    }

    fn publish(&mut self, status: LinkStatus) {
        self.is_up
            .store(status == LinkStatus::Up, Ordering::Release);
        let previous = *self.state_tx.borrow();
        let snapshot = LinkSnapshot {
            status,
            since: SystemTime::now(),
            outages: self.monitor.outages(),
            past_downtime: previous.downtime(),
        };
        match status {
            LinkStatus::Down => warn!(
                servers = %self.servers,
                outages = snapshot.outages,
                "NATS link down: publishes are held for replay and delivered to local subscribers; requests fail fast"
            ),
            _ => info!(servers = %self.servers, status = ?status, "NATS link state changed"),
        }
        self.state_tx.send_replace(snapshot);
    }
}

/// `host:port` of a server URL such as `tls://10.0.0.5:4222`.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:4222")
    }
}

/// How many of `servers` (`host:port`) accept a TCP connection now.
async fn count_reachable(servers: &[String]) -> usize {
    let checks = servers.iter().map(|server| async move {
        matches!(
            tokio::time::timeout(
                SERVER_CHECK_TIMEOUT,
                tokio::net::TcpStream::connect(server.as_str())
            )
            .await,
            Ok(Ok(_))
        )
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .filter(|reachable| *reachable)
        .count()
}

/// One round trip through the server: a request to a subject nobody serves
/// comes back at once as "no responders" from a live server.
/// Answers the relay's own probes. A probe that only counted on "no
/// responders" would time out whenever anyone subscribed to `>` (a
/// debugging `nats sub '>'` anywhere on the cluster) and the link would be
/// declared down with NATS healthy; answered here, it comes back either way.
/// async-nats renews the subscription after every reconnect.
async fn answer_probes(client: &async_nats::Client, subject: &str, shutdown: CancellationToken) {
    let mut probes = match client.subscribe(subject.to_string()).await {
        Ok(probes) => probes,
        Err(error) => {
            warn!(%error, "cannot answer NATS probes; a `>` subscriber could then make the link look down");
            return;
        }
    };
    let client = client.clone();
    tokio::spawn(async move {
        loop {
            let probe = tokio::select! {
                _ = shutdown.cancelled() => return,
                probe = probes.next() => probe,
            };
            let Some(probe) = probe else { return };
            if let Some(reply) = probe.reply {
                let _ = client.publish(reply, bytes::Bytes::new()).await;
            }
        }
    });
}

/// One request to a probe subject: true when it came back within `limit`,
/// answered by a subscriber (the relay's own, on the link's probe subject)
/// or with "no responders" (nobody subscribes, as on the forwarder's
/// confirmation subject, or the answering subscription is not renewed yet
/// after a reconnect). Either answer means the server handled everything
/// the connection sent before it.
pub async fn probe_round_trip(client: &async_nats::Client, subject: &str, limit: Duration) -> bool {
    let request = async_nats::Request::new().timeout(Some(limit));
    let answered = client.send_request(subject.to_string(), request);
    match tokio::time::timeout(limit, answered).await {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => error.kind() == RequestErrorKind::NoResponders,
        Err(_) => false,
    }
}

/// What the link monitor's probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeOutcome {
    Answered,
    /// No answer in time: the server is unreachable or slow.
    Unanswered,
    /// The client's connection task is gone (see [`NatsLink::client_gone`]).
    ClientGone,
}

async fn probe(
    client: async_nats::Client,
    subject: Arc<str>,
    timeout: Duration,
    done: mpsc::Sender<ProbeOutcome>,
) {
    let outcome = if probe_round_trip(&client, &subject, timeout).await {
        ProbeOutcome::Answered
    } else if connection_task_gone(&client).await {
        ProbeOutcome::ClientGone
    } else {
        ProbeOutcome::Unanswered
    };
    let _ = done.send(outcome).await;
}

/// Whether the client's connection task has ended: it then refuses the
/// hand-over of every command at once. While it only reconnects, the
/// hand-over succeeds and the flush waits, which the bound cuts short.
async fn connection_task_gone(client: &async_nats::Client) -> bool {
    matches!(
        tokio::time::timeout(CLIENT_GONE_CHECK, client.flush()).await,
        Ok(Err(error)) if error.kind() == FlushErrorKind::SendError
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_become_host_and_port() {
        assert_eq!(host_port("nats://10.0.0.5:4222"), "10.0.0.5:4222");
        assert_eq!(host_port("tls://nats.example"), "nats.example:4222");
        assert_eq!(host_port("10.0.0.7:4333"), "10.0.0.7:4333");
        assert_eq!(host_port("nats://u:p@10.0.0.5:4222/"), "10.0.0.5:4222");
    }
}
