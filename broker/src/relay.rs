//! Starting and stopping the relay: the order things come up and go down.
//!
//! Up: bind the socket and the optional listeners (QUIC, the NATS front
//! end) first, reading the TLS files, so a second relay or a bad path fails
//! before touching NATS; connect NATS and etcd in the background and give
//! the first connects a moment to settle; start the registry, discovery,
//! the router, the etcd front end and the operations endpoint; accept on
//! every listener; then tell systemd READY=1. Down (SIGTERM/SIGINT): not
//! ready, stop accepting everywhere, save (not revoke) the etcd front end's
//! leases, tell every session GO_AWAY after the frames it already read,
//! wait for them within `shutdown_grace`, flush NATS, close QUIC
//! connections, exit 0. The same way down, ending in an error (exit 1), when
//! the NATS client's connection task ended for good: only a new process
//! gets a new connection, and the supervisor starts one.

use crate::config::Config;
use crate::context::{RelayContext, Upstreams};
use crate::front::quic::{self, QuicListenError};
use crate::front::unix::{self, ListenError};
use crate::journal::{ClassLimits, Journal, JournalSettings};
use crate::keys::discovery;
use crate::keys::etcd::link::EtcdLink;
use crate::keys::etcd::security::EtcdSecurity;
use crate::keys::registry;
use crate::messaging::classes::WhenFull;
use crate::messaging::forwarder;
use crate::messaging::nats::link::{NatsLink, NatsLinkError};
use crate::messaging::nats::security::NatsSecurity;
use crate::messaging::router::{self, RouterHandle};
use crate::ops::http::{self, OpsListenError, OpsState};
use crate::ops::notify::Notifier;
use crate::ops::stats::RelayStats;
use crate::ops::status::link_status_name;
use crate::ops::telemetry::Telemetry;
use holdfast_wire::Text;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How often systemd's STATUS= line is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How long a stop waits for the planner guard to give its elections up
/// (one etcd call each, itself bounded at 2 s).
const GUARD_STOP_LIMIT: Duration = Duration::from_secs(3);

/// Why the relay could not start, or (one case) why it stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Quic(#[from] QuicListenError),
    #[error(transparent)]
    Nats(#[from] NatsLinkError),
    #[error(transparent)]
    NatsFront(#[from] crate::front::nats::NatsListenError),
    #[error(transparent)]
    Ops(#[from] OpsListenError),
    #[error("cannot install the metrics recorder: {0}")]
    Telemetry(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open the journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    #[error(transparent)]
    EtcdFront(#[from] crate::front::etcd::EtcdFrontError),
    /// Not a start failure: the relay ran, and stopped because its NATS
    /// client cannot recover (see `NatsLink::client_gone`).
    #[error("stopped because the NATS client's connection task ended; a restart reconnects")]
    NatsClientGone,
}

/// Runs the relay until `shutdown` resolves (`Ok`; its output, e.g.
/// "SIGTERM", is logged as the reason), or until its NATS client cannot
/// recover (`Err(RelayError::NatsClientGone)`, after the same orderly stop).
pub async fn run(
    mut config: Config,
    shutdown: impl std::future::Future<Output = &'static str>,
) -> Result<(), RelayError> {
    let mode = config.socket_mode().map_err(RelayError::Config)?;
    let metrics_addr = config.metrics_addr().map_err(RelayError::Config)?;
    let socket = config.relay.socket.clone();
    let listener = unix::bind(&socket, mode, &config.relay.socket_group)?;
    let socket_identity = unix::file_identity(&socket);
    // TLS files are read now, so a bad path fails the start, not the first client.
    let quic_endpoint = match config.quic_addr().map_err(RelayError::Config)? {
        Some(address) => {
            let server_config = crate::front::tls::server_config(&config.tls_files())
                .map_err(QuicListenError::from)?;
            Some(quic::bind(address, server_config)?)
        }
        None => None,
    };
    let access = config.access_policy().map_err(RelayError::Config)?;
    let nats_front_listener = match config.nats_listen().map_err(RelayError::Config)? {
        Some(address) => Some(crate::front::nats::bind(address).await?),
        None => None,
    };
    let nats_front_address = nats_front_listener
        .as_ref()
        .and_then(|listener| listener.local_addr().ok());
    let ops_listener = http::bind(metrics_addr).await?;
    // The address actually bound (port 0 in the config picks a free one).
    let metrics_addr = ops_listener.local_addr().unwrap_or(metrics_addr);
    let telemetry = Telemetry::install()?;
    let notifier = Arc::new(Notifier::from_env());
    let classes = config.classes().map_err(RelayError::Config)?;
    let journal_settings = JournalSettings {
        path: config.journal_path(),
        classes: classes
            .specs()
            .iter()
            .map(|spec| ClassLimits {
                name: spec.name.clone(),
                max_bytes: spec.max_bytes,
                when_full: match spec.when_full {
                    WhenFull::Reject => crate::journal::WhenFull::Reject,
                    WhenFull::DropOldest => crate::journal::WhenFull::DropOldest,
                },
            })
            .collect(),
        reserve_bytes: config.relay.journal_reserve_bytes,
    };
    let journal_path = journal_settings.path.clone();
    // Opening is synchronous file work; keep it off the async workers.
    let (journal, report) = tokio::task::spawn_blocking(move || Journal::open(journal_settings))
        .await
        .map_err(|error| RelayError::Config(format!("journal open task failed: {error}")))??;
    if let Some(quarantined) = &report.quarantined {
        warn!(
            journal = %journal_path.display(),
            quarantined = %quarantined.display(),
            reason = report.reason.as_deref().unwrap_or("unknown"),
            "journal was unreadable: moved aside, starting with an empty journal"
        );
    }

    let relay_id = new_relay_id();
    let background = CancellationToken::new();
    let nats_security = NatsSecurity::from_config(&config.nats)
        .map_err(|problem| RelayError::Config(format!("{}: {problem}", problem.key)))?;
    let nats = NatsLink::start(&config.nats, nats_security, &relay_id, background.clone()).await?;
    // Clients that connect now wait in the listen backlog rather than
    // being told "NATS unavailable" during the first connect's round trip.
    let settle_limit = config.nats.link_timeout + config.nats.probe_interval;
    let initial_link = nats.settled(settle_limit).await;
    let stats = Arc::new(RelayStats::new(
        classes.names().map(str::to_string).collect(),
    ));
    stats
        .journal_quarantines
        .store(u64::from(report.quarantined.is_some()), Ordering::Relaxed);
    let forwarder_stop = CancellationToken::new();
    let (forwarder, forwarder_task) = forwarder::start(
        forwarder::ForwarderSettings {
            classes: classes.clone(),
            relay_id: Text::from(relay_id.as_str()),
            kv_check: config.kv_consistency.limits(),
            kv_check_state: config.kv_check_state_path(),
        },
        journal,
        &report.classes,
        nats.clone(),
        stats.clone(),
        forwarder_stop.clone(),
    );
    // etcd: connect in the background like NATS; registrations and
    // discovery answer (Buffered, stale, or an error) until it is up.
    let etcd_security = EtcdSecurity::from_config(&config.etcd)
        .map_err(|problem| RelayError::Config(format!("{}: {problem}", problem.key)))?;
    let etcd = EtcdLink::start(&config.etcd, etcd_security, background.clone());
    if etcd.is_enabled() {
        // As with NATS: a registration arriving in the first moments is
        // answered Applied, not Buffered because the connect was under way.
        let limit =
            crate::keys::etcd::link::connect_limit(&config.etcd) + config.etcd.probe_interval;
        etcd.settled(limit).await;
    }
    let registry_stop = CancellationToken::new();
    let registry = registry::start(&config.etcd, etcd.clone(), registry_stop.clone());
    let (discovery, discovery_task) = discovery::start(
        &config.etcd,
        etcd.clone(),
        config.discovery_cache_path(),
        registry_stop.clone(),
    );
    let etcd_listen = config.etcd_listen().map_err(RelayError::Config)?;
    let router = router::start(
        nats.clone(),
        Text::from(relay_id.as_str()),
        stats.clone(),
        config.sessions.max_subscriptions,
    );
    let sessions_stop = CancellationToken::new();
    let guard_stop = CancellationToken::new();
    let shutdown_grace = config.relay.shutdown_grace;
    // Every connection takes a descriptor: admit no more than the open-file
    // limit leaves after the relay's own (fd_budget.rs).
    config.sessions.max_connections =
        crate::front::fd_budget::connections_to_admit(config.sessions.max_connections);
    let mut context = RelayContext::new(
        Arc::new(config),
        classes,
        Upstreams {
            nats: nats.clone(),
            etcd,
            registry,
            discovery,
        },
        router.clone(),
        forwarder,
        stats,
        Text::from(relay_id.as_str()),
        access,
        sessions_stop.clone(),
    );
    context.quic_address = quic_endpoint
        .as_ref()
        .and_then(|endpoint| endpoint.local_addr().ok());
    context.nats_front_address = nats_front_address;
    // The planner guard reuses the relay's NATS and etcd connections.
    let mut guard_tasks = Vec::new();
    if context.config.guard.enabled {
        let (guard, tasks) = crate::guard::start(
            &context.config.guard,
            &relay_id,
            nats.clone(),
            context.etcd.clone(),
            guard_stop.clone(),
        );
        context.guard = Some(guard);
        guard_tasks = tasks;
    }
    let ctx = Arc::new(context);
    // The etcd front end: unmodified etcd clients, through the same
    // registry and discovery cache as sessions, and the same connection
    // limit.
    let etcd_front_stop = CancellationToken::new();
    let etcd_front = match etcd_listen {
        Some(address) => {
            Some(crate::front::etcd::start(address, &ctx, etcd_front_stop.clone()).await?)
        }
        None => None,
    };
    let ops = Arc::new(OpsState {
        ctx: ctx.clone(),
        telemetry,
        ready: Default::default(),
        socket: Default::default(),
    });
    ops.telemetry.spawn_upkeep(background.clone());
    tokio::spawn(http::serve(ops_listener, ops.clone(), background.clone()));

    let tracker = TaskTracker::new();
    let accept_stop = CancellationToken::new();
    let accept = tokio::spawn(unix::serve(
        listener,
        socket.clone(),
        ctx.clone(),
        tracker.clone(),
        accept_stop.clone(),
    ));
    if let Some(identity) = socket_identity {
        tokio::spawn(crate::front::socket_guard::guard(
            crate::front::socket_guard::Guarded {
                path: socket.clone(),
                mode,
                group: ctx.config.relay.socket_group.clone(),
                identity,
            },
            ctx.clone(),
            tracker.clone(),
            accept_stop.clone(),
            ops.socket.clone(),
        ));
    }
    let quic_accept = quic_endpoint.clone().map(|endpoint| {
        tokio::spawn(quic::serve(
            endpoint,
            ctx.clone(),
            tracker.clone(),
            accept_stop.clone(),
        ))
    });
    let nats_front_accept = nats_front_listener.map(|listener| {
        tokio::spawn(crate::front::nats::serve(
            listener,
            ctx.clone(),
            tracker.clone(),
            accept_stop.clone(),
        ))
    });
    ops.ready.store(true, Ordering::Release);
    notifier.notify(&format!("READY=1\nSTATUS={}", status_line(&ctx)));
    tokio::spawn(report_to_systemd(
        notifier.clone(),
        ctx.clone(),
        router,
        background.clone(),
    ));
    info!(
        relay_id = %relay_id,
        socket = %socket.display(),
        quic = %ctx.quic_address.map_or_else(|| "off".to_string(), |address| address.to_string()),
        mutual_tls = !ctx.config.quic.client_ca.as_os_str().is_empty(),
        nats_listen = %nats_front_address.map_or_else(|| "off".to_string(), |address| address.to_string()),
        metrics = %metrics_addr,
        nats = %ctx.config.nats.servers.iter().map(|server| crate::util::url_credentials::redact(server)).collect::<Vec<_>>().join(","),
        nats_link = link_status_name(initial_link),
        etcd = %ctx.config.etcd.endpoints.join(","),
        "holdfastd ready"
    );

    let (reason, outcome) = tokio::select! {
        reason = shutdown => (reason, Ok(())),
        () = nats.client_gone() => ("NATS client gone", Err(RelayError::NatsClientGone)),
    };
    ops.ready.store(false, Ordering::Release);
    notifier.notify("STOPPING=1");
    info!(
        reason,
        sessions = ctx.stats.sessions_active(),
        "shutting down: no new connections, draining sessions"
    );
    accept_stop.cancel();
    // The guard resigns its elections, so a peer takes over at once rather
    // than a lease TTL later (each resignation is one etcd call, bounded).
    guard_stop.cancel();
    let _ = tokio::time::timeout(GUARD_STOP_LIMIT, futures::future::join_all(guard_tasks)).await;
    let _ = accept.await;
    if let Some(task) = quic_accept {
        let _ = task.await;
    }
    if let Some(task) = nats_front_accept {
        let _ = task.await;
    }
    // etcd clients' leases are saved, not revoked: a restart within their
    // TTL keeps them.
    etcd_front_stop.cancel();
    if let Some(front) = etcd_front {
        let _ = tokio::time::timeout(shutdown_grace, front.stopped()).await;
    }
    // Registrations are not revoked as sessions close for shutdown: their
    // leases run out after the TTL unless the clients register again with
    // the next relay first, so a relay restart does not blink their keys.
    registry_stop.cancel();
    if let Some(task) = discovery_task {
        let _ = tokio::time::timeout(shutdown_grace, task).await;
    }
    sessions_stop.cancel();
    tracker.close();
    if tokio::time::timeout(shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            sessions = ctx.stats.sessions_active(),
            "sessions still open after the shutdown grace period; closing them"
        );
    }
    // Sessions are gone, so nothing new arrives: the forwarder journals what
    // it held only in memory, then stops.
    forwarder_stop.cancel();
    if tokio::time::timeout(shutdown_grace, forwarder_task)
        .await
        .is_err()
    {
        warn!("the forwarder did not finish journaling its memory backlog in time");
    }
    if nats.is_up() {
        let _ = tokio::time::timeout(Duration::from_secs(1), nats.client().flush()).await;
    }
    if let Some(endpoint) = quic_endpoint {
        // Lets the connections' CONNECTION_CLOSE reach the clients.
        endpoint.close(0u32.into(), b"relay stopped");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
    background.cancel();
    info!("holdfastd stopped");
    outcome
}

/// One line for systemd's STATUS=: the link and the load.
fn status_line(ctx: &RelayContext) -> String {
    let etcd = if ctx.etcd.is_enabled() {
        format!(
            "; etcd {}; {} registration(s), {} pending",
            link_status_name(ctx.etcd.snapshot().status),
            ctx.registry.stats.registrations.load(Ordering::Relaxed),
            ctx.registry.stats.pending_changes.load(Ordering::Relaxed),
        )
    } else {
        String::new()
    };
    format!(
        "nats {}{etcd}; {} session(s)",
        link_status_name(ctx.nats.snapshot().status),
        ctx.stats.sessions_active()
    )
}

/// Keeps systemd informed: STATUS= on every link change and periodically,
/// and WATCHDOG=1 only while the router answers, so a wedged relay stops
/// pinging and gets restarted.
async fn report_to_systemd(
    notifier: Arc<Notifier>,
    ctx: Arc<RelayContext>,
    router: RouterHandle,
    stop: CancellationToken,
) {
    let watchdog = Notifier::watchdog_interval();
    let tick = watchdog.map_or(STATUS_INTERVAL, |interval| interval.min(STATUS_INTERVAL));
    let mut ticker = tokio::time::interval(tick);
    let mut link = ctx.nats.watch();
    let mut etcd = ctx.etcd.watch();
    let mut etcd_watching = ctx.etcd.is_enabled();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
                notifier.notify(&format!("STATUS={}", status_line(&ctx)));
            }
            changed = etcd.changed(), if etcd_watching => {
                etcd_watching = changed.is_ok();
                notifier.notify(&format!("STATUS={}", status_line(&ctx)));
            }
            _ = ticker.tick() => {
                if let Some(interval) = watchdog {
                    if tokio::time::timeout(interval, router.stats()).await.is_ok() {
                        notifier.notify(&format!("WATCHDOG=1\nSTATUS={}", status_line(&ctx)));
                    } else {
                        warn!("router unresponsive; withholding the systemd watchdog ping");
                    }
                } else {
                    notifier.notify(&format!("STATUS={}", status_line(&ctx)));
                }
            }
        }
    }
}

/// An id for this relay process: a single NATS subject token, different on
/// every start.
fn new_relay_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    format!("hf{:x}{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}
