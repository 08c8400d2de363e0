//! RPCs the front end does not serve answer `Unimplemented` with a message
//! naming them, instead of gRPC's bare "unknown service".
//!
//! A layer in front of the router: requests for the KV, Lease and Watch
//! services pass; every other path (Maintenance, Cluster, Auth, Lock,
//! Election) is answered here. KV Compact and RangeStream are answered by
//! the KV service itself.

use futures::future::Either;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::Status;
use tower_layer::Layer;

/// Path prefixes of the services the front end serves.
const SERVED: [&str; 3] = [
    "/etcdserverpb.KV/",
    "/etcdserverpb.Lease/",
    "/etcdserverpb.Watch/",
];

/// Wraps the router in [`NameUnknownRpcs`].
#[derive(Debug, Clone, Copy)]
pub struct NameUnknownRpcsLayer;

impl<S> Layer<S> for NameUnknownRpcsLayer {
    type Service = NameUnknownRpcs<S>;

    fn layer(&self, inner: S) -> NameUnknownRpcs<S> {
        NameUnknownRpcs { inner }
    }
}

/// Passes served RPCs on, answers the rest `Unimplemented`.
#[derive(Debug, Clone)]
pub struct NameUnknownRpcs<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for NameUnknownRpcs<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if SERVED.iter().any(|served| path.starts_with(served)) {
            return Either::Left(self.inner.call(request));
        }
        let rpc = path.trim_start_matches('/');
        metrics::counter!(
            "holdfast_etcd_front_requests_total",
            "rpc" => "other",
            "outcome" => "unimplemented"
        )
        .increment(1);
        let status = Status::unimplemented(format!(
            "{rpc} is not served by holdfast's etcd front end (it serves KV Range/Put/DeleteRange/Txn, Lease and Watch); use etcd directly"
        ));
        let (parts, ()) = status.into_http::<()>().into_parts();
        Either::Right(std::future::ready(Ok(Response::from_parts(
            parts,
            Body::default(),
        ))))
    }
}
