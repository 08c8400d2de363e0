//! Requests the relay does not answer itself, passed to etcd unchanged.
//!
//! The request's protobuf goes to the same RPC on the member the relay's
//! etcd link uses now (so a dead member is left behind for these calls as
//! for the relay's own), over gRPC channels of the front end's own with the
//! relay's TLS settings, and etcd's answer (or error status) comes back as
//! it is. With `[etcd] user` set, the calls carry the relay's etcd auth
//! token, fetched on first use and fetched again when etcd says it expired
//! (or the member does not know it). Only while the relay's etcd link is
//! up: otherwise the caller gets `Unavailable` at once instead of a hang.

use crate::keys::etcd::link::EtcdLink;
use etcd_client::proto::{PbAuthenticateRequest, PbAuthenticateResponse};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_prost::prost::Message;

const AUTHENTICATE: &str = "/etcdserverpb.Auth/Authenticate";

/// Why the channels to etcd could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("etcd endpoint {endpoint:?} is not usable: {message}")]
pub struct EndpointError {
    endpoint: String,
    message: String,
}

/// A member's channel, built for one link generation (a rebuilt one reads
/// the TLS files again).
struct MemberChannel {
    generation: u64,
    channel: Channel,
}

/// The front end's channels to the upstream etcd members.
#[derive(Clone)]
pub struct Upstream {
    endpoints: Arc<Vec<String>>,
    channels: Arc<Mutex<Vec<Option<MemberChannel>>>>,
    link: EtcdLink,
    timeout: Duration,
    /// The relay's etcd auth token, when etcd auth is on.
    token: Arc<tokio::sync::Mutex<Option<MetadataValue<tonic::metadata::Ascii>>>>,
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
        let upstream = Upstream {
            endpoints: Arc::new(endpoints.to_vec()),
            channels: Arc::new(Mutex::new(
                std::iter::repeat_with(|| None)
                    .take(endpoints.len())
                    .collect(),
            )),
            link,
            timeout,
            token: Arc::default(),
            revision: Arc::default(),
        };
        // Check every endpoint (and the TLS files) now: a typo is a start-up
        // error, not a failure of the first client's call.
        for member in 0..endpoints.len() {
            upstream.build_channel(member)?;
        }
        Ok(upstream)
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

    fn build_channel(&self, member: usize) -> Result<Channel, EndpointError> {
        let endpoint = &self.endpoints[member];
        let security = self.link.security();
        let failed = |message: String| EndpointError {
            endpoint: endpoint.clone(),
            message,
        };
        let url = if endpoint.contains("://") {
            endpoint.clone()
        } else if security.uses_tls() {
            format!("https://{endpoint}")
        } else {
            format!("http://{endpoint}")
        };
        let mut parsed = Endpoint::from_shared(url)
            .map_err(|error| failed(error.to_string()))?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true);
        if let Some(tls) = security.tls_options().map_err(failed)? {
            parsed = parsed
                .tls_config(tls)
                .map_err(|error| failed(error.to_string()))?;
        }
        Ok(parsed.connect_lazy())
    }

    /// The channel to the member the link uses now.
    fn channel(&self) -> Result<Channel, Status> {
        let state = self.link.watch().borrow().clone();
        let member = state
            .member
            .ok_or_else(|| Status::unavailable("etcd is unreachable"))?;
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| Status::internal("the front end's channel table is unusable"))?;
        let slot = channels
            .get_mut(member)
            .ok_or_else(|| Status::internal("the link names an unknown etcd member"))?;
        if let Some(existing) = slot
            .as_ref()
            .filter(|slot| slot.generation == state.generation)
        {
            return Ok(existing.channel.clone());
        }
        let channel = self
            .build_channel(member)
            .map_err(|error| Status::unavailable(error.to_string()))?;
        *slot = Some(MemberChannel {
            generation: state.generation,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// The auth token to send, fetching one when there is none (or
    /// `renew`); `None` when etcd auth is off.
    async fn token(
        &self,
        channel: &Channel,
        renew: bool,
    ) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, Status> {
        let credentials = self
            .link
            .security()
            .credentials()
            .map_err(Status::unavailable)?;
        let Some((name, password)) = credentials else {
            return Ok(None);
        };
        let mut token = self.token.lock().await;
        if let (Some(token), false) = (token.as_ref(), renew) {
            return Ok(Some(token.clone()));
        }
        let request = PbAuthenticateRequest { name, password };
        let answer: PbAuthenticateResponse =
            unary(channel.clone(), AUTHENTICATE, request, None).await?;
        let fresh: MetadataValue<tonic::metadata::Ascii> = answer
            .token
            .parse()
            .map_err(|_| Status::internal("etcd sent an auth token that is not ASCII"))?;
        *token = Some(fresh.clone());
        Ok(Some(fresh))
    }

    /// Sends `request` to the RPC at `path` (e.g. "/etcdserverpb.KV/Range").
    pub async fn call<Request, Response>(
        &self,
        path: &'static str,
        what: &str,
        request: Request,
    ) -> Result<Response, Status>
    where
        Request: Message + Clone + Send + Sync + 'static,
        Response: Message + Default + Send + Sync + 'static,
    {
        if !self.link.is_up() {
            return Err(Status::unavailable(format!(
                "etcd is unreachable; holdfast does not answer {what} from its cache"
            )));
        }
        let call = async {
            let channel = self.channel()?;
            let token = self.token(&channel, false).await?;
            let answer = unary(channel.clone(), path, request.clone(), token).await;
            match answer {
                // Expired, or issued by another member (etcd's default
                // "simple" tokens are known only to the member that made
                // them): fetch one and try once more.
                Err(status) if is_invalid_token(&status) => {
                    let token = self.token(&channel, true).await?;
                    unary(channel, path, request, token).await
                }
                answer => answer,
            }
        };
        let answer = match tokio::time::timeout(self.timeout, call).await {
            Ok(answer) => answer,
            Err(_) => Err(Status::unavailable(format!(
                "etcd did not answer {what} within {} ms",
                self.timeout.as_millis()
            ))),
        };
        if let Err(status) = &answer {
            if status.code() == Code::Unavailable {
                self.link.call_failed();
            }
        }
        answer
    }
}

/// One unary call over `channel`, with the token when there is one.
async fn unary<Request, Response>(
    channel: Channel,
    path: &'static str,
    request: Request,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
) -> Result<Response, Status>
where
    Request: Message + Send + Sync + 'static,
    Response: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(format!("etcd is unreachable: {error}")))?;
    let mut request = tonic::Request::new(request);
    if let Some(token) = token {
        request.metadata_mut().insert("token", token);
    }
    grpc.unary(
        request,
        PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::<Request, Response>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Whether etcd refused the call's auth token (expired or unknown).
fn is_invalid_token(status: &Status) -> bool {
    status.code() == Code::Unauthenticated || status.message().contains("invalid auth token")
}
