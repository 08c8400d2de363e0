//! The operations endpoint: `/metrics`, `/livez`, `/readyz`, `/status`.
//!
//! Four fixed GET routes for Prometheus and probes, served over HTTP/1.1 by
//! hyper (already in the relay through tonic): one request per connection,
//! its head bounded in time, then close. An upstream outage never fails
//! `/livez`: a degraded relay must not get itself restarted.
//! `/readyz` is 503 while the journal refuses new messages (disk full or
//! under its reserve, or reopening after an I/O error), and while the
//! socket path is not the relay's (replaced by another file).

use crate::context::RelayContext;
use crate::front::accept_pressure::{AcceptFailures, Listener};
use crate::ops::status;
use crate::ops::telemetry::Telemetry;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Largest request head accepted (hyper's smallest buffer).
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A client must send its request head within this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/livez` waits for the router to answer.
const LIVENESS_DEADLINE: Duration = Duration::from_secs(2);
/// Concurrent scrapes/probes served; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 32;

/// Shared state the endpoint reports on.
pub struct OpsState {
    pub ctx: Arc<RelayContext>,
    pub telemetry: Telemetry,
    /// Set once clients are being accepted; cleared when shutting down.
    pub ready: AtomicBool,
    /// Whether clients can find the relay at its socket path.
    pub socket: Arc<crate::front::socket_guard::SocketHealth>,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {address}: {source}")]
pub struct OpsListenError {
    pub address: SocketAddr,
    pub source: std::io::Error,
}

pub async fn bind(address: SocketAddr) -> Result<TcpListener, OpsListenError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| OpsListenError { address, source })
}

/// Serves until `stop` fires.
pub async fn serve(listener: TcpListener, state: Arc<OpsState>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut failures = AcceptFailures::new(Listener::Metrics);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    failures.pause(&error, &stop).await;
                    continue;
                }
            },
        };
        failures.accepted();
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, state).await {
                debug!(%error, "metrics endpoint connection failed");
            }
            drop(permit);
        });
    }
}

async fn handle(stream: TcpStream, state: Arc<OpsState>) -> Result<(), hyper::Error> {
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&request, &state).await) }
    });
    hyper::server::conn::http1::Builder::new()
        // One request, then close: probes and scrapes open a connection
        // each, and an idle keep-alive would hold one of the few slots.
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

async fn answer(
    request: &hyper::Request<Incoming>,
    state: &OpsState,
) -> hyper::Response<Full<Bytes>> {
    let response = if request.method() == hyper::Method::GET {
        route(request.uri().path(), state).await
    } else {
        Response::text(405, "method not allowed\n")
    };
    response.into_hyper()
}

async fn route(path: &str, state: &OpsState) -> Response {
    match path {
        "/metrics" => {
            let router = state.ctx.router.stats().await;
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: state.telemetry.render(&state.ctx, router).into_bytes(),
            }
        }
        "/livez" => {
            // The router answering proves the runtime schedules tasks and the
            // relay's central loop is not wedged. NATS state is irrelevant.
            match tokio::time::timeout(LIVENESS_DEADLINE, state.ctx.router.stats()).await {
                Ok(_) => Response::text(200, "ok\n"),
                Err(_) => Response::text(503, "router unresponsive\n"),
            }
        }
        "/readyz" => {
            // A journal that refuses new messages makes the relay unready:
            // its durable publishes fail until the disk has room again.
            let refusing = state.ctx.forwarder.view().journal.refusing();
            if let Some(problem) = state.socket.problem() {
                return Response::text(503, &format!("not ready: {problem}\n"));
            }
            match (state.ready.load(Ordering::Acquire), refusing) {
                (true, None) => Response::text(200, "ready\n"),
                (true, Some(refusal)) => Response::text(
                    503,
                    &format!(
                        "not ready: journal refuses new messages ({})\n",
                        refusal.name()
                    ),
                ),
                (false, _) => Response::text(503, "not ready\n"),
            }
        }
        "/status" => {
            let document = status::document(&state.ctx).await;
            match serde_json::to_vec_pretty(&document) {
                Ok(body) => Response {
                    status: 200,
                    content_type: "application/json",
                    body,
                },
                Err(_) => Response::text(500, "status not serialisable\n"),
            }
        }
        _ => Response::text(404, "not found: try /metrics, /livez, /readyz or /status\n"),
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }

    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = hyper::StatusCode::from_u16(self.status)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(self.content_type),
        );
        response
    }
}
