//! The QUIC listener: accepting connections and running a session on each
//! bidirectional stream a client opens.
//!
//! A connection holds one of the relay's connection permits for its life;
//! past `sessions.max_connections` new ones are refused before the
//! handshake. The peer is identified once per connection (its address and,
//! under mutual TLS, its certificate's common name) and every stream on it
//! is a session with that identity. On shutdown the connection stops
//! taking streams, lets its sessions say GO_AWAY, then closes.

use crate::accept_pressure::RefusalLog;
use crate::cert_subject;
use crate::peer::Peer;
use crate::session::{self, SessionContext};
use crate::stats::{bump, Limit};
use quinn::{Connection, Endpoint, Incoming};
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

/// Application close code when the relay ends a connection.
const CLOSE_CODE: u32 = 0;

/// Why the QUIC listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum QuicListenError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen for QUIC on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the QUIC endpoint on `address` with `config`.
pub fn bind(address: SocketAddr, config: quinn::ServerConfig) -> Result<Endpoint, QuicListenError> {
    Endpoint::server(config, address).map_err(|source| QuicListenError::Bind { address, source })
}

/// Accepts connections until `stop` fires. Sessions already running go on
/// until the relay's session shutdown.
pub async fn serve(
    endpoint: Endpoint,
    ctx: Arc<SessionContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut refused = RefusalLog::default();
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(permit) = ctx.connection_permits.clone().try_acquire_owned() else {
            ctx.stats.record_limit(Limit::Connections);
            refused.refused("quic", ctx.config.sessions.max_connections);
            debug!(
                peer = %incoming.remote_address(),
                "QUIC connection refused: sessions.max_connections reached"
            );
            incoming.refuse();
            continue;
        };
        tracker.spawn(serve_connection(incoming, permit, ctx.clone()));
    }
    // Refuse whoever comes now; existing connections are closed by their tasks.
    endpoint.set_server_config(None);
}

async fn serve_connection(
    incoming: Incoming,
    _permit: OwnedSemaphorePermit,
    ctx: Arc<SessionContext>,
) {
    let address = incoming.remote_address();
    let handshake = tokio::time::timeout(ctx.config.sessions.hello_timeout, incoming);
    let connection = match handshake.await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            bump(&ctx.stats.quic_handshake_failures);
            info!(peer = %address, %error, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            bump(&ctx.stats.quic_handshake_failures);
            ctx.stats.record_limit(Limit::HelloTimeout);
            info!(peer = %address, "QUIC handshake did not finish within sessions.hello_timeout");
            return;
        }
    };
    let peer = Peer::Quic {
        address,
        common_name: client_common_name(&connection),
    };
    debug!(peer = %peer, "QUIC connection established");
    let sessions = TaskTracker::new();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = connection.accept_bi() => match accepted {
                Ok((send, receive)) => {
                    sessions.spawn(session::run(
                        Box::new(receive),
                        Box::new(send),
                        peer.clone(),
                        ctx.clone(),
                    ));
                }
                Err(error) => {
                    debug!(peer = %peer, %error, "QUIC connection ended");
                    break;
                }
            },
        }
    }
    sessions.close();
    // Sessions bound their own goodbye by shutdown_grace.
    let _ = tokio::time::timeout(ctx.config.relay.shutdown_grace, sessions.wait()).await;
    connection.close(CLOSE_CODE.into(), b"closed");
}

/// The subject CN of the client certificate, when mutual TLS gave one.
fn client_common_name(connection: &Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_subject::common_name(chain.first()?)
}
