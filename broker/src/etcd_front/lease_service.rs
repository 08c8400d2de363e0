//! The Lease service: Grant, KeepAlive, Revoke, TimeToLive and Leases, all
//! answered from the relay's own lease table, whether or not etcd is up.

use super::lease_owner::OwnerError;
use super::leases::LeaseError;
use super::range::header;
use super::{count, owner_status, Front};
use etcd_client::proto::{
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesRequest, PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseStatus, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
};
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Keepalive answers queued for one stream, at most.
const KEEPALIVE_QUEUE: usize = 64;

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
        let mut inbound = request.into_inner();
        let (answers, stream) = mpsc::channel(KEEPALIVE_QUEUE);
        let front = self.front.clone();
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = front.stop.cancelled() => break,
                    _ = answers.closed() => break,
                    request = inbound.message() => request,
                };
                let Ok(Some(request)) = request else { break };
                // etcd answers TTL 0 for a lease it does not have.
                let answer = match front.owner.keep_alive(request.id).await {
                    Ok(ttl) => Ok(ttl),
                    Err(OwnerError::Lease(LeaseError::NotFound)) => Ok(0),
                    Err(error) => Err(owner_status(error)),
                }
                .map(|ttl| PbLeaseKeepAliveResponse {
                    header: Some(header(front.upstream.revision())),
                    id: request.id,
                    ttl,
                });
                count("lease_keep_alive", &answer);
                let failed = answer.is_err();
                if answers.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
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
