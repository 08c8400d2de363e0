//! Whether an etcd front end connection is in use: how many gRPC requests
//! it has started, how many are still open, and when the last one ended.
//!
//! A tower layer in front of the services marks each request started, and
//! ended when its response body is dropped: for a unary call once the
//! answer is sent, for a Watch or LeaseKeepAlive stream only when the
//! stream ends. So a connection with an open stream is never idle, however
//! long the stream is quiet. [`Deadlines`] turns that into the connection's
//! fate (sans-IO: the caller passes the time): no request within
//! `sessions.hello_timeout` of connecting, or none open for
//! `sessions.idle_timeout` since the last one ended, closes it.

use crate::ops::stats::Limit;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::transport::server::TcpConnectInfo;
use tower_layer::Layer;

/// The requests of one connection, shared by its requests and its socket.
#[derive(Debug)]
pub struct ConnectionActivity {
    opened: Instant,
    started: AtomicU64,
    open: AtomicU64,
    /// Milliseconds after `opened` at which the last request ended.
    last_ended_ms: AtomicU64,
}

/// A copy of [`ConnectionActivity`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub started: u64,
    pub open: u64,
    /// When the last request ended (the connection's opening if none did).
    pub last_ended: Instant,
}

impl ConnectionActivity {
    pub fn new(opened: Instant) -> Arc<ConnectionActivity> {
        Arc::new(ConnectionActivity {
            opened,
            started: AtomicU64::new(0),
            open: AtomicU64::new(0),
            last_ended_ms: AtomicU64::new(0),
        })
    }

    pub fn opened(&self) -> Instant {
        self.opened
    }

    pub fn snapshot(&self) -> Activity {
        // `open` first: a request ending in between then reads as still
        // open, which only keeps the connection a little longer.
        let open = self.open.load(Ordering::Acquire);
        Activity {
            started: self.started.load(Ordering::Acquire),
            open,
            last_ended: self.opened
                + Duration::from_millis(self.last_ended_ms.load(Ordering::Acquire)),
        }
    }

    fn start(self: Arc<ConnectionActivity>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        OpenRequest(self)
    }
}

/// One request, open until dropped.
#[derive(Debug)]
struct OpenRequest(Arc<ConnectionActivity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let activity = &self.0;
        let since_opened = Instant::now().saturating_duration_since(activity.opened);
        let ms = u64::try_from(since_opened.as_millis()).unwrap_or(u64::MAX);
        activity.last_ended_ms.fetch_max(ms, Ordering::AcqRel);
        activity.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What each request of a front end connection carries in its extensions.
#[derive(Debug, Clone)]
pub struct FrontConnectInfo {
    pub activity: Arc<ConnectionActivity>,
    /// Passed on as tonic's own, so `Request::remote_addr` works.
    pub tcp: TcpConnectInfo,
}

/// The connection timeouts, from `[sessions]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub hello: Duration,
    pub idle: Duration,
}

/// What becomes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Look again at this instant (or when something changes).
    OpenUntil(Instant),
    /// Close it: it passed this limit.
    Close(Limit),
}

impl Deadlines {
    pub fn verdict(&self, opened: Instant, activity: Activity, now: Instant) -> Verdict {
        if activity.open > 0 {
            return Verdict::OpenUntil(now + self.idle);
        }
        let (deadline, limit) = if activity.started == 0 {
            (opened + self.hello, Limit::HelloTimeout)
        } else {
            (activity.last_ended + self.idle, Limit::IdleTimeout)
        };
        if now >= deadline {
            Verdict::Close(limit)
        } else {
            Verdict::OpenUntil(deadline)
        }
    }
}

/// Marks each request of a front end connection open until its response
/// body is dropped.
#[derive(Debug, Clone, Copy)]
pub struct ActivityLayer;

impl<S> Layer<S> for ActivityLayer {
    type Service = ActivityTracking<S>;

    fn layer(&self, inner: S) -> ActivityTracking<S> {
        ActivityTracking { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ActivityTracking<S> {
    inner: S,
}

type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

impl<S, B> Service<Request<B>> for ActivityTracking<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let info = request.extensions().get::<FrontConnectInfo>().cloned();
        let open = info.map(|info| {
            request.extensions_mut().insert(info.tcp);
            info.activity.start()
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match open {
                Some(open) => response.map(|body| {
                    Body::new(OpenBody {
                        inner: body,
                        _open: open,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that keeps its request open while it lives.
struct OpenBody {
    inner: Body,
    _open: OpenRequest,
}

impl http_body::Body for OpenBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINES: Deadlines = Deadlines {
        hello: Duration::from_secs(5),
        idle: Duration::from_secs(60),
    };

    fn at(opened: Instant, seconds: u64) -> Instant {
        opened + Duration::from_secs(seconds)
    }

    #[test]
    fn a_connection_without_a_request_closes_at_the_hello_deadline() {
        let opened = Instant::now();
        let quiet = Activity {
            started: 0,
            open: 0,
            last_ended: opened,
        };
        assert_eq!(
            DEADLINES.verdict(opened, quiet, at(opened, 1)),
            Verdict::OpenUntil(at(opened, 5))
        );
        assert_eq!(
            DEADLINES.verdict(opened, quiet, at(opened, 5)),
            Verdict::Close(Limit::HelloTimeout)
        );
    }

    #[test]
    fn an_open_stream_keeps_a_connection_however_long_it_is_quiet() {
        let opened = Instant::now();
        let watching = Activity {
            started: 1,
            open: 1,
            last_ended: opened,
        };
        let hours_later = at(opened, 7200);
        assert_eq!(
            DEADLINES.verdict(opened, watching, hours_later),
            Verdict::OpenUntil(hours_later + DEADLINES.idle)
        );
    }

    #[test]
    fn a_connection_idles_out_a_full_timeout_after_its_last_request_ended() {
        let opened = Instant::now();
        let done = Activity {
            started: 3,
            open: 0,
            last_ended: at(opened, 10),
        };
        assert_eq!(
            DEADLINES.verdict(opened, done, at(opened, 11)),
            Verdict::OpenUntil(at(opened, 70))
        );
        assert_eq!(
            DEADLINES.verdict(opened, done, at(opened, 70)),
            Verdict::Close(Limit::IdleTimeout)
        );
    }

    #[test]
    fn requests_are_open_until_their_response_body_is_dropped() {
        let activity = ConnectionActivity::new(Instant::now());
        let first = activity.clone().start();
        let second = activity.clone().start();
        assert_eq!(activity.snapshot().started, 2);
        assert_eq!(activity.snapshot().open, 2);
        drop(first);
        assert_eq!(activity.snapshot().open, 1);
        drop(second);
        let ended = activity.snapshot();
        assert_eq!((ended.started, ended.open), (2, 0));
        assert!(ended.last_ended >= activity.opened());
    }
}
