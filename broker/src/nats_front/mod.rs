//! The NATS client-protocol front end (`--nats-listen`): unmodified NATS
//! clients connect here as they would to nats-server.
//!
//! Each TCP connection becomes an ordinary relay session: the connection
//! task translates NATS protocol operations into framed-protocol frames and
//! feeds them to [`crate::session::run`] over an in-memory pipe, and turns
//! the session's frames back into NATS protocol text. So a NATS client gets
//! exactly the relay's semantics (classification, journal, replay, local
//! delivery, shared upstream subscriptions, limits, access defaults) with
//! no second implementation of any of them. See `connection.rs`.

mod connection;

use crate::session::SessionContext;
use crate::stats::Limit;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

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
    ctx: Arc<SessionContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let port = listener
        .local_addr()
        .map(|address| address.port())
        .unwrap_or(0);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, address)) => {
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
                            warn!(peer = %address, "NATS client refused: sessions.max_connections reached");
                            tracker.spawn(connection::refuse(stream, "Maximum Connections Exceeded"));
                        }
                    }
                }
                Err(error) if error.kind() == ErrorKind::ConnectionAborted => {}
                Err(error) => {
                    error!(%error, "accept failed on the NATS front end");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}
