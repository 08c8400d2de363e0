//! Starting and stopping the relay: the order things come up and go down.
//!
//! Up: bind the socket first (so a second relay fails before touching
//! NATS), connect NATS in the background, start the router, accept.
//! Down (SIGTERM/SIGINT): stop accepting, tell every session GO_AWAY after
//! the frames it already read, wait for them within `shutdown_grace`, flush
//! NATS, exit 0.

use crate::config::Config;
use crate::listener::{self, ListenError};
use crate::nats_link::{NatsLink, NatsLinkError};
use crate::router;
use crate::session::SessionContext;
use crate::stats::RelayStats;
use holdfast_wire::Text;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Nats(#[from] NatsLinkError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), RelayError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(RelayError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RelayError::Signals)?;
    let mode = config.socket_mode().map_err(RelayError::Config)?;
    let socket = config.relay.socket.clone();
    let listener = listener::bind(&socket, mode)?;

    let relay_id = new_relay_id();
    let background = CancellationToken::new();
    let nats = NatsLink::start(&config.nats, &relay_id, background.clone()).await?;
    // Clients that connect now wait in the listen backlog rather than
    // being told "NATS unavailable" during the first connect's round trip.
    let settle_limit = config.nats.link_timeout + config.nats.probe_interval;
    let initial_link = nats.settled(settle_limit).await;
    let stats = Arc::new(RelayStats::default());
    let router = router::start(
        nats.clone(),
        Text::from(relay_id.as_str()),
        stats.clone(),
        config.sessions.max_subscriptions,
    );
    let sessions_stop = CancellationToken::new();
    let shutdown_grace = config.relay.shutdown_grace;
    let ctx = Arc::new(SessionContext::new(
        Arc::new(config),
        nats.clone(),
        router,
        stats,
        Text::from(relay_id.as_str()),
        sessions_stop.clone(),
    ));
    let tracker = TaskTracker::new();
    let accept_stop = CancellationToken::new();
    let accept = tokio::spawn(listener::serve(
        listener,
        socket.clone(),
        ctx.clone(),
        tracker.clone(),
        accept_stop.clone(),
    ));
    info!(
        relay_id = %relay_id,
        socket = %socket.display(),
        nats = %ctx.config.nats.servers.join(","),
        nats_link = crate::status::link_status_name(initial_link),
        "holdfastd ready"
    );

    let signal_name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    info!(signal = signal_name, sessions = ctx.stats.sessions_active(), "shutting down: no new connections, draining sessions");
    accept_stop.cancel();
    let _ = accept.await;
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
    if nats.is_up() {
        let _ = tokio::time::timeout(Duration::from_secs(1), nats.client().flush()).await;
    }
    background.cancel();
    info!("holdfastd stopped");
    Ok(())
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
