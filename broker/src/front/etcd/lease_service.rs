//! The Lease service: Grant, KeepAlive, Revoke, TimeToLive and Leases, all
//! answered from the relay's own lease table, whether or not etcd is up.
//!
//! A long-lived KeepAlive stream that breaks (its connection reset or
//! closed under it, as when the client is killed) ends the leases it
//! renewed last at once. One the client ends itself (closing its sending
//! half, or canceling the call) leaves them to their TTL, as etcd does.
//! So does a one-shot stream (`etcdctl lease keep-alive --once`,
//! clientv3's KeepAliveOnce): its process often exits before the cancel
//! reaches the relay, which then sees the same broken connection as a
//! kill. A stream counts as long-lived once it has renewed twice or been
//! open [`ONE_SHOT_GRACE`] since its first renewal; a client killed
//! sooner keeps its leases until their TTL.

use super::lease_owner::OwnerError;
use super::leases::LeaseError;
use super::range::header;
use super::{count, owner_status, Front};
use etcd_client::proto::{
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesRequest, PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseStatus, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info};

/// Keepalive answers queued for one stream, at most.
const KEEPALIVE_QUEUE: usize = 64;
/// How long a stream whose answers were dropped is given to say why
/// (a reset or a broken connection shows on its inbound side).
const END_CAUSE_WAIT: Duration = Duration::from_millis(500);
/// How long after its first renewal a stream that renewed only once may
/// break and still be taken for a one-shot renewal whose process exited.
const ONE_SHOT_GRACE: Duration = Duration::from_secs(2);

pub struct LeaseService {
    front: Arc<Front>,
}

impl LeaseService {
    pub fn new(front: Arc<Front>) -> LeaseService {
        LeaseService { front }
    }

    fn header(&self) -> Option<etcd_client::proto::PbResponseHeader> {
        Some(header(self.front.upstream.revision()))
    }
}

#[tonic::async_trait]
impl PbLeaseService for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .front
            .owner
            .grant(request.id, request.ttl)
            .await
            .map_err(owner_status)
            .map(|(id, ttl)| PbLeaseGrantResponse {
                header: self.header(),
                id,
                ttl,
                error: String::new(),
            });
        count("lease_grant", &answer);
        answer.map(Response::new)
    }

    async fn lease_revoke(
        &self,
        request: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        let answer = self
            .front
            .owner
            .revoke(request.into_inner().id)
            .await
            .map_err(owner_status)
            .map(|()| PbLeaseRevokeResponse {
                header: self.header(),
            });
        count("lease_revoke", &answer);
        answer.map(Response::new)
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<PbLeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let inbound = request.into_inner();
        let (answers, stream) = mpsc::channel(KEEPALIVE_QUEUE);
        let front = self.front.clone();
        let keeper = front.streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(keep_alive_stream(front, keeper, inbound, answers));
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        // etcd answers TTL -1 for a lease it does not have.
        let answer = match self.front.owner.time_to_live(request.id).await {
            Ok(info) => Ok(PbLeaseTimeToLiveResponse {
                header: self.header(),
                id: request.id,
                ttl: info.remaining_seconds,
                granted_ttl: info.granted_seconds,
                keys: if request.keys {
                    info.keys.into_iter().map(|key| key.to_vec()).collect()
                } else {
                    Vec::new()
                },
            }),
            Err(OwnerError::Lease(LeaseError::NotFound)) => Ok(PbLeaseTimeToLiveResponse {
                header: self.header(),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            }),
            Err(error) => Err(owner_status(error)),
        };
        count("lease_time_to_live", &answer);
        answer.map(Response::new)
    }

    async fn lease_leases(
        &self,
        _request: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        let answer = self
            .front
            .owner
            .leases()
            .await
            .map_err(owner_status)
            .map(|ids| PbLeaseLeasesResponse {
                header: self.header(),
                leases: ids.into_iter().map(|id| PbLeaseStatus { id }).collect(),
            });
        count("lease_leases", &answer);
        answer.map(Response::new)
    }
}

/// How a keepalive stream ended.
enum Ending {
    /// The relay is stopping or refused a keepalive: leases stay.
    Relay,
    /// The client closed its sending half or canceled the call.
    Client,
    /// The stream broke under the client (connection reset or closed).
    Broken(Status),
}

/// Serves one KeepAlive stream; when it breaks, the leases it renewed last
/// end.
async fn keep_alive_stream(
    front: Arc<Front>,
    keeper: u64,
    mut inbound: Streaming<PbLeaseKeepAliveRequest>,
    answers: mpsc::Sender<Result<PbLeaseKeepAliveResponse, Status>>,
) {
    let mut kept = BTreeSet::new();
    let mut renewals = 0u64;
    let mut first_renewal = None;
    let ending = loop {
        let request = tokio::select! {
            _ = front.stop.cancelled() => break Ending::Relay,
            _ = answers.closed() => break ending_after_answers_dropped(&mut inbound).await,
            request = inbound.message() => request,
        };
        let request = match request {
            Ok(Some(request)) => request,
            Ok(None) => break Ending::Client,
            Err(status) => break ending_of(status),
        };
        // etcd answers TTL 0 for a lease it does not have.
        let answer = match front.owner.keep_alive(request.id, keeper).await {
            Ok(ttl) => {
                kept.insert(request.id);
                renewals += 1;
                first_renewal.get_or_insert_with(Instant::now);
                Ok(ttl)
            }
            Err(OwnerError::Lease(LeaseError::NotFound)) => Ok(0),
            Err(error) => Err(owner_status(error)),
        }
        .map(|ttl| PbLeaseKeepAliveResponse {
            header: Some(header(front.upstream.revision())),
            id: request.id,
            ttl,
        });
        count("lease_keep_alive", &answer);
        if answer.is_err() {
            let _ = answers.send(answer).await;
            break Ending::Relay;
        }
        if answers.send(answer).await.is_err() {
            break ending_after_answers_dropped(&mut inbound).await;
        }
    };
    let long_lived =
        renewals >= 2 || first_renewal.is_some_and(|first| first.elapsed() >= ONE_SHOT_GRACE);
    match ending {
        Ending::Broken(status) if !long_lived => {
            debug!(
                stream = keeper,
                leases = kept.len(),
                code = ?status.code(),
                "etcd front end: a one-shot lease keepalive stream broke; its leases live on their TTL"
            );
        }
        Ending::Broken(status) if !front.stop.is_cancelled() && !kept.is_empty() => {
            info!(
                stream = keeper,
                leases = kept.len(),
                code = ?status.code(),
                error = status.message(),
                "etcd front end: a lease keepalive stream broke (client gone); ending the leases it kept alive"
            );
            front
                .owner
                .keeper_lost(keeper, kept.into_iter().collect())
                .await;
        }
        Ending::Client if !kept.is_empty() => {
            debug!(
                stream = keeper,
                leases = kept.len(),
                "etcd front end: a client ended its lease keepalive stream; its leases live on their TTL"
            );
        }
        _ => {}
    }
}

/// A reset stream or a broken connection drops the answers and shows on
/// the inbound side too, which tells the two apart.
async fn ending_after_answers_dropped(inbound: &mut Streaming<PbLeaseKeepAliveRequest>) -> Ending {
    let deadline = tokio::time::Instant::now() + END_CAUSE_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, inbound.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Ending::Client,
            Ok(Err(status)) => return ending_of(status),
            // No word: the client is there but stopped reading; its
            // keepalives have stopped too, so the TTL decides.
            Err(_) => return Ending::Client,
        }
    }
}

/// A canceled call is the client's doing (etcd clients cancel a stream
/// they are done with); any other error is the stream breaking under it.
fn ending_of(status: Status) -> Ending {
    if status.code() == Code::Cancelled {
        Ending::Client
    } else {
        Ending::Broken(status)
    }
}
