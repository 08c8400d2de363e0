//! The operations endpoint: `/metrics`, `/livez`, `/readyz`, `/status`.
//!
//! Four fixed GET routes for Prometheus and probes, so a small HTTP/1.1
//! responder we own instead of a web framework: read one request head
//! (bounded in size and time), answer, close. An upstream outage never
//! fails `/livez`: a degraded relay must not get itself restarted.
//! `/readyz` is 503 while the journal refuses new messages (disk full or
//! under its reserve, or reopening after an I/O error), and while the
//! socket path is not the relay's (replaced by another file).

use crate::accept_pressure::{AcceptFailures, Listener};
use crate::session::SessionContext;
use crate::status;
use crate::telemetry::Telemetry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Largest request head accepted.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A client must send its request head within this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/livez` waits for the router to answer.
const LIVENESS_DEADLINE: Duration = Duration::from_secs(2);
/// Concurrent scrapes/probes served; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 32;

/// Shared state the endpoint reports on.
pub struct OpsState {
    pub ctx: Arc<SessionContext>,
    pub telemetry: Telemetry,
    /// Set once clients are being accepted; cleared when shutting down.
    pub ready: AtomicBool,
    /// Whether clients can find the relay at its socket path.
    pub socket: Arc<crate::socket_guard::SocketHealth>,
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
            if let Err(error) = handle(stream, &state).await {
                debug!(%error, "metrics endpoint connection failed");
            }
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, state: &OpsState) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match parse_request_line(&head) {
        Some(("GET", path)) => route(path, state).await,
        Some((_, _)) => Response::text(405, "method not allowed\n"),
        None => Response::text(400, "bad request\n"),
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_BYTES {
            break;
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    Ok(head)
}

/// Method and path (query string dropped) of an HTTP/1.x request line.
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.windows(2).position(|window| window == b"\r\n")?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
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

    fn into_bytes(self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            500 => "Internal Server Error",
            _ => "Service Unavailable",
        };
        let mut bytes = format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_and_queries_are_dropped() {
        assert_eq!(
            parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line(b"POST /livez HTTP/1.0\r\n\r\n"),
            Some(("POST", "/livez"))
        );
        assert_eq!(parse_request_line(b"GET /livez\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"GET /livez SPDY/3\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"no line end"), None);
    }

    #[test]
    fn responses_carry_length_and_close() {
        let bytes = Response::text(503, "not ready\n").into_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("content-length: 10\r\n"));
        assert!(text.ends_with("\r\n\r\nnot ready\n"));
    }
}
