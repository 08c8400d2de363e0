//! Requests the relay does not answer itself, passed to etcd unchanged.
//!
//! The request's protobuf goes to the same RPC on the upstream cluster
//! over a gRPC channel of the front end's own, and etcd's answer (or
//! error status) comes back as it is. Only while the relay's etcd link is
//! up: otherwise the caller gets `Unavailable` at once instead of a hang.

use crate::etcd_link::EtcdLink;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tonic_prost::prost::Message;

/// Why the channel to etcd could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("etcd endpoint {endpoint:?} is not a valid URL: {message}")]
pub struct EndpointError {
    endpoint: String,
    message: String,
}

/// The front end's channel to the upstream etcd cluster.
#[derive(Clone)]
pub struct Upstream {
    channel: Channel,
    link: EtcdLink,
    timeout: Duration,
    /// The highest revision any answer carried, for headers of answers the
    /// relay gives itself.
    revision: Arc<AtomicI64>,
}

impl Upstream {
    pub fn new(
        endpoints: &[String],
        link: EtcdLink,
        timeout: Duration,
    ) -> Result<Upstream, EndpointError> {
        let mut parsed = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let url = if endpoint.contains("://") {
                endpoint.clone()
            } else {
                format!("http://{endpoint}")
            };
            let parsed_endpoint = Endpoint::from_shared(url)
                .map_err(|error| EndpointError {
                    endpoint: endpoint.clone(),
                    message: error.to_string(),
                })?
                .connect_timeout(timeout)
                .tcp_nodelay(true);
            parsed.push(parsed_endpoint);
        }
        Ok(Upstream {
            channel: Channel::balance_list(parsed.into_iter()),
            link,
            timeout,
            revision: Arc::default(),
        })
    }

    pub fn link(&self) -> &EtcdLink {
        &self.link
    }

    /// The highest etcd revision the front end has seen.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// Records a revision seen in an answer.
    pub fn saw_revision(&self, revision: i64) {
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// Sends `request` to the RPC at `path` (e.g. "/etcdserverpb.KV/Range").
    pub async fn call<Request, Response>(
        &self,
        path: &'static str,
        what: &str,
        request: Request,
    ) -> Result<Response, Status>
    where
        Request: Message + Send + Sync + 'static,
        Response: Message + Default + Send + Sync + 'static,
    {
        if !self.link.is_up() {
            return Err(Status::unavailable(format!(
                "etcd is unreachable; holdfast does not answer {what} from its cache"
            )));
        }
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async {
            grpc.ready()
                .await
                .map_err(|error| Status::unavailable(format!("etcd is unreachable: {error}")))?;
            grpc.unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<Request, Response>::default(),
            )
            .await
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => Err(Status::unavailable(format!(
                "etcd did not answer {what} within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}
