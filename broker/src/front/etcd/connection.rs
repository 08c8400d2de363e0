//! The etcd front end's TCP connections: accepting them, each holding one
//! of the relay's connection slots (`sessions.max_connections`, shared
//! with the Unix socket, QUIC and the NATS front end) for its life, and
//! closing those that sent no request within `sessions.hello_timeout` or
//! have had none open for `sessions.idle_timeout` ([`super::activity`]).
//!
//! A connection over the limit is closed as soon as it is accepted: gRPC
//! has no way to say why before the HTTP/2 handshake, and answering it
//! would hold its descriptor. Its client sees the connection refused
//! (`Unavailable`) and retries. A timed-out connection's socket fails its
//! next read, so the HTTP/2 server drops it; a connection's timer lives in
//! its socket, so there is no task per connection.

use super::activity::{ConnectionActivity, Deadlines, FrontConnectInfo, Verdict};
use crate::front::accept_pressure::{AcceptFailures, Listener, RefusalLog};
use crate::ops::stats::{Limit, RelayStats};
use crate::util::drop_log::DropLog;
use futures::Stream;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info};

/// What the accept loop and every connection share.
pub struct Admission {
    pub slots: Arc<Semaphore>,
    pub max_connections: usize,
    pub deadlines: Deadlines,
    pub stats: Arc<RelayStats>,
    closed: Mutex<ClosedLog>,
}

impl Admission {
    pub fn new(
        slots: Arc<Semaphore>,
        max_connections: usize,
        deadlines: Deadlines,
        stats: Arc<RelayStats>,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            slots,
            max_connections,
            deadlines,
            stats,
            closed: Mutex::new(ClosedLog::default()),
        })
    }

    /// Counts a connection closed for `limit`, and logs it at a pace.
    fn closed(&self, limit: Limit) {
        self.stats.record_limit(limit);
        let Ok(mut log) = self.closed.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if limit == Limit::HelloTimeout {
            log.hello_total += 1;
            let total = log.hello_total;
            if let Some(count) = log.hello.due(total, now) {
                info!(
                    closed = count,
                    "etcd front end: closed connections that sent no request within sessions.hello_timeout"
                );
            }
        } else {
            log.idle_total += 1;
            let total = log.idle_total;
            if let Some(count) = log.idle.due(total, now) {
                info!(
                    closed = count,
                    "etcd front end: closed connections that had no request open for sessions.idle_timeout"
                );
            }
        }
    }
}

/// Log pacing for connections closed by each timeout.
#[derive(Debug, Default)]
struct ClosedLog {
    hello: DropLog,
    hello_total: u64,
    idle: DropLog,
    idle_total: u64,
}

/// The connections accepted on `listener`, each within the limit, until
/// `stop` fires (tonic serves each one).
pub fn incoming(
    listener: TcpListener,
    admission: Arc<Admission>,
    stop: CancellationToken,
) -> impl Stream<Item = Result<FrontConnection, Infallible>> {
    let acceptor = Acceptor {
        listener,
        admission,
        failures: AcceptFailures::new(Listener::EtcdFront),
        refused: RefusalLog::default(),
        stop,
    };
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let connection = acceptor.next().await?;
        Some((Ok(connection), acceptor))
    })
}

struct Acceptor {
    listener: TcpListener,
    admission: Arc<Admission>,
    failures: AcceptFailures,
    refused: RefusalLog,
    stop: CancellationToken,
}

impl Acceptor {
    async fn next(&mut self) -> Option<FrontConnection> {
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => return None,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    self.failures.pause(&error, &self.stop).await;
                    continue;
                }
            };
            self.failures.accepted();
            let Ok(slot) = self.admission.slots.clone().try_acquire_owned() else {
                self.admission.stats.record_limit(Limit::Connections);
                self.refused
                    .refused(Listener::EtcdFront.name(), self.admission.max_connections);
                debug!(%peer, "etcd client refused: sessions.max_connections reached");
                continue;
            };
            return Some(FrontConnection::new(stream, slot, self.admission.clone()));
        }
    }
}

/// One etcd client's connection, as tonic reads and writes it.
pub struct FrontConnection {
    stream: TcpStream,
    info: FrontConnectInfo,
    admission: Arc<Admission>,
    timer: Pin<Box<Sleep>>,
    /// Set once the connection passed a timeout: every read fails.
    closed_for: Option<Limit>,
    _slot: OwnedSemaphorePermit,
}

impl FrontConnection {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        admission: Arc<Admission>,
    ) -> FrontConnection {
        let opened = Instant::now();
        let info = FrontConnectInfo {
            activity: ConnectionActivity::new(opened),
            tcp: TcpConnectInfo {
                local_addr: stream.local_addr().ok(),
                remote_addr: stream.peer_addr().ok(),
            },
        };
        metrics::gauge!("holdfast_etcd_front_connections").increment(1.0);
        FrontConnection {
            stream,
            info,
            timer: Box::pin(tokio::time::sleep_until(opened + admission.deadlines.hello)),
            admission,
            closed_for: None,
            _slot: slot,
        }
    }

    /// Ready with the limit once the connection must close.
    fn poll_deadline(&mut self, context: &mut Context<'_>) -> Poll<Limit> {
        if let Some(limit) = self.closed_for {
            return Poll::Ready(limit);
        }
        // Each turn either closes, or moves the timer to a later instant
        // than now, so the loop ends as soon as the timer is pending.
        loop {
            if self.timer.as_mut().poll(context).is_pending() {
                return Poll::Pending;
            }
            let activity = &self.info.activity;
            let verdict = self.admission.deadlines.verdict(
                activity.opened(),
                activity.snapshot(),
                Instant::now(),
            );
            match verdict {
                Verdict::OpenUntil(at) => self.timer.as_mut().reset(at),
                Verdict::Close(limit) => {
                    self.closed_for = Some(limit);
                    self.admission.closed(limit);
                    debug!(
                        peer = ?self.info.tcp.remote_addr,
                        limit = limit.name(),
                        "etcd front end: closing a connection"
                    );
                    return Poll::Ready(limit);
                }
            }
        }
    }
}

impl Drop for FrontConnection {
    fn drop(&mut self) {
        metrics::gauge!("holdfast_etcd_front_connections").decrement(1.0);
    }
}

impl Connected for FrontConnection {
    type ConnectInfo = FrontConnectInfo;

    fn connect_info(&self) -> FrontConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for FrontConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(limit) = self.poll_deadline(context) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("closed by the relay: sessions.{}", limit.name()),
            )));
        }
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for FrontConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(context, bytes)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}
