//! The QUIC listener: accepting connections and running a session on each
//! bidirectional stream a client opens.
//!
//! A connection holds one of the relay's connection permits for its life;
//! past `sessions.max_connections` new ones are refused before the
//! handshake. The peer is identified once per connection (its address and,
//! under mutual TLS, its certificate's common name) and every stream on it
//! is a session with that identity. A connection carries sessions or goes:
//! one where no stream's session said HELLO within `sessions.hello_timeout`
//! of the handshake, or none has run for `sessions.idle_timeout` since the
//! last ended, is closed however many QUIC keepalives it sends. On
//! shutdown the connection stops
//! taking streams, lets its sessions say GO_AWAY, then closes.

use crate::context::RelayContext;
use crate::front::accept_pressure::RefusalLog;
use crate::front::cert_subject;
use crate::front::peer::Peer;
use crate::ops::stats::{bump, Limit};
use crate::session;
use quinn::{Connection, Endpoint, Incoming};
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

/// Application close code when the relay ends a connection.
const CLOSE_CODE: u32 = 0;

/// Why the QUIC listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum QuicListenError {
    #[error(transparent)]
    Tls(#[from] crate::front::tls::TlsError),
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
    ctx: Arc<RelayContext>,
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
    ctx: Arc<RelayContext>,
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
    let _open = GaugeGuard::new(&ctx.stats.quic_connections);
    let mut idle_gauge = Some(GaugeGuard::new(&ctx.stats.quic_connections_without_session));
    let sessions = TaskTracker::new();
    let (events_tx, mut events) = mpsc::unbounded_channel::<StreamEvent>();
    let mut activity = Activity::new(tokio::time::Instant::now());
    // The connection's streams share one frame's worth of reading.
    let read_budget = Arc::new(tokio::sync::Semaphore::new(
        ctx.config.relay.max_frame_bytes as usize,
    ));
    loop {
        let deadline = activity.deadline(&ctx.config.sessions);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = connection.accept_bi() => match accepted {
                Ok((send, receive)) => {
                    let (hello_tx, hello_rx) = oneshot::channel();
                    let events_tx = events_tx.clone();
                    let session = session::run_on_stream(
                        Box::new(receive),
                        Box::new(send),
                        peer.clone(),
                        ctx.clone(),
                        session::StreamContext {
                            hello: Some(hello_tx),
                            read_budget: Some(read_budget.clone()),
                        },
                    );
                    sessions.spawn(async move {
                        let hello_events = events_tx.clone();
                        let hello = async move {
                            let said = hello_rx.await.is_ok();
                            if said {
                                let _ = hello_events.send(StreamEvent::Hello);
                            }
                            said
                        };
                        let ((), said_hello) = tokio::join!(session, hello);
                        let _ = events_tx.send(StreamEvent::Ended { said_hello });
                    });
                    activity.stream_opened();
                }
                Err(error) => {
                    debug!(peer = %peer, %error, "QUIC connection ended");
                    break;
                }
            },
            Some(event) = events.recv() => activity.on(event, tokio::time::Instant::now()),
            () = sleep_until(deadline) => {
                // QUIC keepalives keep a connection alive, not in use: one
                // that carries no session must not hold a connection slot.
                let (limit, reason) = if activity.ever_served() {
                    (Limit::IdleTimeout, "sessions.idle_timeout")
                } else {
                    (Limit::HelloTimeout, "sessions.hello_timeout")
                };
                ctx.stats.record_limit(limit);
                info!(peer = %peer, reason, "QUIC connection closed: no session on it within {reason}");
                break;
            }
        }
        let without_session = activity.serving() == 0;
        if without_session && idle_gauge.is_none() {
            idle_gauge = Some(GaugeGuard::new(&ctx.stats.quic_connections_without_session));
        } else if !without_session {
            idle_gauge = None;
        }
    }
    sessions.close();
    // Sessions bound their own goodbye by shutdown_grace.
    let _ = tokio::time::timeout(ctx.config.relay.shutdown_grace, sessions.wait()).await;
    connection.close(CLOSE_CODE.into(), b"closed");
}

/// What a stream's session reports to its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEvent {
    /// The session's HELLO was accepted.
    Hello,
    /// The session ended, having said HELLO or not.
    Ended { said_hello: bool },
}

/// Whether a QUIC connection serves sessions, and since when it has not
/// (sans-IO: the caller passes the time).
#[derive(Debug)]
struct Activity {
    /// Streams whose session is running (with or without a HELLO yet).
    running: usize,
    /// Running sessions that said HELLO.
    serving: usize,
    /// Whether any session on the connection ever said HELLO.
    ever_served: bool,
    /// When the connection last had no serving session.
    idle_since: tokio::time::Instant,
}

impl Activity {
    fn new(now: tokio::time::Instant) -> Activity {
        Activity {
            running: 0,
            serving: 0,
            ever_served: false,
            idle_since: now,
        }
    }

    fn stream_opened(&mut self) {
        self.running += 1;
    }

    fn on(&mut self, event: StreamEvent, now: tokio::time::Instant) {
        match event {
            StreamEvent::Hello => {
                self.serving += 1;
                self.ever_served = true;
            }
            StreamEvent::Ended { said_hello } => {
                self.running = self.running.saturating_sub(1);
                if said_hello {
                    self.serving = self.serving.saturating_sub(1);
                    if self.serving == 0 {
                        self.idle_since = now;
                    }
                }
            }
        }
    }

    fn serving(&self) -> usize {
        self.serving
    }

    fn ever_served(&self) -> bool {
        self.ever_served
    }

    /// When the connection is closed unless a session says HELLO first:
    /// `hello_timeout` after it opened if none ever did, `idle_timeout`
    /// after the last one ended otherwise.
    fn deadline(&self, sessions: &crate::config::SessionConfig) -> Option<tokio::time::Instant> {
        if self.serving > 0 {
            return None;
        }
        let wait = if self.ever_served {
            sessions.idle_timeout
        } else {
            sessions.hello_timeout
        };
        Some(self.idle_since + wait)
    }
}

/// Adds one to a gauge while alive.
struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a AtomicU64) -> GaugeGuard<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The subject CN of the client certificate, when mutual TLS gave one.
fn client_common_name(connection: &Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_subject::common_name(chain.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sessions() -> crate::config::SessionConfig {
        crate::config::SessionConfig {
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            ..crate::config::SessionConfig::default()
        }
    }

    #[test]
    fn a_connection_without_a_hello_is_due_after_hello_timeout_whatever_streams_it_opens() {
        let start = tokio::time::Instant::now();
        let mut activity = Activity::new(start);
        assert_eq!(
            activity.deadline(&sessions()),
            Some(start + Duration::from_secs(5))
        );
        // Streams that never say HELLO do not push the deadline.
        for _ in 0..3 {
            activity.stream_opened();
            activity.on(
                StreamEvent::Ended { said_hello: false },
                start + Duration::from_secs(4),
            );
        }
        assert_eq!(
            activity.deadline(&sessions()),
            Some(start + Duration::from_secs(5))
        );
        assert!(!activity.ever_served());
    }

    #[test]
    fn a_serving_connection_has_no_deadline_until_its_last_session_ends() {
        let start = tokio::time::Instant::now();
        let mut activity = Activity::new(start);
        activity.stream_opened();
        activity.on(StreamEvent::Hello, start);
        activity.stream_opened();
        assert_eq!(activity.deadline(&sessions()), None);
        activity.on(
            StreamEvent::Ended { said_hello: false },
            start + Duration::from_secs(9),
        );
        assert_eq!(activity.deadline(&sessions()), None, "one still serves");
        let ended = start + Duration::from_secs(30);
        activity.on(StreamEvent::Ended { said_hello: true }, ended);
        assert_eq!(activity.serving(), 0);
        assert_eq!(
            activity.deadline(&sessions()),
            Some(ended + Duration::from_secs(60)),
            "idle_timeout after the last session"
        );
    }
}
