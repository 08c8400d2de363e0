//! The NATS client-protocol front end (`--nats-listen`): unmodified NATS
//! clients connect here as they would to nats-server.
//!
//! Each TCP connection becomes an ordinary relay session: the connection
//! task translates NATS protocol operations into frames and hands them to
//! the session as values ([`crate::session::start_decoded`]; nothing is
//! encoded in between), and renders the session's frames, taken from its
//! outbox, as NATS protocol text. So a NATS client gets
//! exactly the relay's semantics (classification, journal, replay, local
//! delivery, shared upstream subscriptions, limits, access defaults) with
//! no second implementation of any of them. See `connection.rs`.

mod connection;

use crate::context::RelayContext;
use crate::front::accept_pressure::{self, AcceptFailures, RefusalLog};
use crate::front::fd_budget::REFUSALS_IN_FLIGHT;
use crate::ops::stats::Limit;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// Why the front end could not listen.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for NATS clients on {address}: {source}")]
pub struct NatsListenError {
    address: SocketAddr,
    source: std::io::Error,
}

/// Binds the front end's TCP listener.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, NatsListenError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| NatsListenError { address, source })
}

/// Accepts NATS clients until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<RelayContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let port = listener
        .local_addr()
        .map(|address| address.port())
        .unwrap_or(0);
    let mut failures = AcceptFailures::new(accept_pressure::Listener::NatsFront);
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut refused = RefusalLog::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, address)) => {
                    failures.accepted();
                    let _ = stream.set_nodelay(true);
                    match ctx.connection_permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let ctx = ctx.clone();
                            tracker.spawn(async move {
                                connection::serve(stream, address, port, ctx).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            ctx.stats.record_limit(Limit::Connections);
                            refused.refused("nats_front", ctx.config.sessions.max_connections);
                            debug!(peer = %address, "NATS client refused: sessions.max_connections reached");
                            // Telling it why holds its descriptor for a
                            // moment; past a few at once, it is just closed.
                            if let Ok(answering) = refusals.clone().try_acquire_owned() {
                                tracker.spawn(async move {
                                    connection::refuse(stream, "Maximum Connections Exceeded").await;
                                    drop(answering);
                                });
                            }
                        }
                    }
                }
                Err(error) => failures.pause(&error, &stop).await,
            },
        }
    }
}
