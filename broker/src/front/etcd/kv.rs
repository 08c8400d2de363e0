//! The KV service: Range, Put, DeleteRange and Txn, each either answered
//! by the relay (leased writes, create-if-absent, serializable reads from
//! the cache) or passed to etcd unchanged. Writes are first checked
//! against the access rules and key ownership ([`super::write_policy`]).

use super::bridge;
use super::lease_owner::OwnerError;
use super::leases::LeaseError;
use super::range::{self, Entry};
use super::txn::{self, TxnPlan};
use super::write_policy::Holders;
use super::{count, owner_status, Front, READ_TIMEOUT, WRITE_TIMEOUT};
use bytes::Bytes;
use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKvService,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbResponseOp, PbTxnOpResponse, PbTxnRequest, PbTxnResponse,
};
use holdfast_wire::RegistrationOutcome;
use std::sync::Arc;
use tonic::codegen::tokio_stream;
use tonic::{Request, Response, Status};

const RANGE: &str = "/etcdserverpb.KV/Range";
const PUT: &str = "/etcdserverpb.KV/Put";
const DELETE_RANGE: &str = "/etcdserverpb.KV/DeleteRange";
const TXN: &str = "/etcdserverpb.KV/Txn";

pub struct KvService {
    front: Arc<Front>,
}

impl KvService {
    pub fn new(front: Arc<Front>) -> KvService {
        KvService { front }
    }

    async fn range(&self, request: PbRangeRequest) -> Result<PbRangeResponse, Status> {
        if request.serializable {
            match range::cache_plan(&request) {
                Ok(plan) => return self.range_from_cache(&request, plan.prefix().clone()).await,
                Err(reason) => {
                    if !self.front.upstream.link().is_up() {
                        return Err(Status::unavailable(format!(
                            "etcd is unreachable; holdfast answers serializable reads of one key or a prefix from its cache, not {reason}"
                        )));
                    }
                }
            }
        }
        let answer: PbRangeResponse = self
            .front
            .upstream
            .call(RANGE, "a linearizable read", request)
            .await?;
        self.saw(answer.header.as_ref());
        Ok(answer)
    }

    async fn range_from_cache(
        &self,
        request: &PbRangeRequest,
        prefix: Bytes,
    ) -> Result<PbRangeResponse, Status> {
        let front = &self.front;
        let snapshot = bridge::cached(&front.discovery, prefix, READ_TIMEOUT).await?;
        let cached = snapshot
            .entries
            .into_iter()
            .map(|kv| Entry {
                key: kv.key,
                value: kv.value,
                lease: 0,
            })
            .collect();
        let own = front
            .owner
            .in_range(
                Bytes::copy_from_slice(&request.key),
                Bytes::copy_from_slice(&request.range_end),
            )
            .await
            .map_err(owner_status)?;
        let revision = match i64::try_from(snapshot.revision) {
            Ok(revision) if revision > 0 => revision,
            _ => front.upstream.revision(),
        };
        front.upstream.saw_revision(revision);
        Ok(range::answer(
            request,
            range::overlay(cached, own),
            revision,
        ))
    }

    /// A put under relay lease `lease`: a registration.
    async fn leased_put(&self, request: PbPutRequest) -> Result<PbPutResponse, Status> {
        if request.ignore_value || request.ignore_lease {
            return Err(Status::unimplemented(
                "Put with ignore_value or ignore_lease under a relay lease is not supported by holdfast",
            ));
        }
        let front = &self.front;
        front.writes.may_write(&request.key, &[])?;
        let key = Bytes::from(request.key);
        let value = Bytes::from(request.value);
        let (ack, answer) = bridge::ack();
        let previous = match front
            .owner
            .put(request.lease, key.clone(), value.clone(), ack)
            .await
        {
            Ok(previous) => previous,
            Err(OwnerError::Lease(held @ LeaseError::HeldByAnotherLease { .. })) => {
                return Err(front.writes.conflict(held.to_string()))
            }
            Err(error) => return Err(owner_status(error)),
        };
        if let RegistrationOutcome::Rejected { code, message } =
            bridge::registration_outcome(answer, WRITE_TIMEOUT).await?
        {
            // The registry refuses a key this lease did not hold yet (a
            // limit, or a session holds it); an update of the lease's own
            // key is never refused. So only a new key is taken back out of
            // the lease table.
            if previous.is_none() {
                front
                    .owner
                    .refused(request.lease, key, value)
                    .await
                    .map_err(owner_status)?;
            }
            return Err(bridge::status_for(code, message.as_str()));
        }
        let revision = front.upstream.revision();
        Ok(PbPutResponse {
            header: Some(range::header(revision)),
            prev_kv: previous.filter(|_| request.prev_kv).map(|value| {
                range::key_value(
                    Entry {
                        key,
                        value,
                        lease: request.lease,
                    },
                    revision,
                    false,
                )
            }),
        })
    }

    async fn put(&self, request: PbPutRequest) -> Result<PbPutResponse, Status> {
        if request.lease != 0 {
            return self.leased_put(request).await;
        }
        let writes = &self.front.writes;
        writes.may_write(&request.key, &[])?;
        writes
            .not_held(&request.key, &[], Holders::Everyone)
            .await?;
        let answer: PbPutResponse = self
            .front
            .upstream
            .call(PUT, "a put without a lease", request)
            .await?;
        self.saw(answer.header.as_ref());
        Ok(answer)
    }

    async fn delete_range(&self, request: PbDeleteRequest) -> Result<PbDeleteResponse, Status> {
        let front = &self.front;
        front.writes.may_write(&request.key, &request.range_end)?;
        front
            .writes
            .not_held(&request.key, &request.range_end, Holders::Sessions)
            .await?;
        let own = front
            .owner
            .in_range(
                Bytes::copy_from_slice(&request.key),
                Bytes::copy_from_slice(&request.range_end),
            )
            .await
            .map_err(owner_status)?;
        let mut removed = Vec::with_capacity(own.len());
        for entry in own {
            let (ack, answer) = bridge::ack();
            let deleted = front
                .owner
                .delete(entry.key.clone(), ack)
                .await
                .map_err(owner_status)?;
            if let Some(value) = deleted {
                bridge::registered(answer, WRITE_TIMEOUT).await?;
                removed.push(Entry { value, ..entry });
            }
        }
        let answer_locally =
            !removed.is_empty() && (request.range_end.is_empty() || !front.upstream.link().is_up());
        if answer_locally {
            let revision = front.upstream.revision();
            return Ok(PbDeleteResponse {
                header: Some(range::header(revision)),
                deleted: i64::try_from(removed.len()).unwrap_or(i64::MAX),
                prev_kvs: if request.prev_kv {
                    removed
                        .into_iter()
                        .map(|entry| range::key_value(entry, revision, false))
                        .collect()
                } else {
                    Vec::new()
                },
            });
        }
        let own_deleted = i64::try_from(removed.len()).unwrap_or(i64::MAX);
        let mut answer: PbDeleteResponse = front
            .upstream
            .call(DELETE_RANGE, "a delete", request)
            .await?;
        answer.deleted = answer.deleted.max(own_deleted);
        self.saw(answer.header.as_ref());
        Ok(answer)
    }

    async fn txn(&self, request: PbTxnRequest) -> Result<PbTxnResponse, Status> {
        let plan = txn::plan(&request).map_err(|error| Status::unimplemented(error.to_string()))?;
        match plan {
            TxnPlan::Forward => {
                self.front.writes.check_forwarded_txn(&request).await?;
                let answer: PbTxnResponse = self
                    .front
                    .upstream
                    .call(TXN, "a transaction", request)
                    .await?;
                self.saw(answer.header.as_ref());
                Ok(answer)
            }
            TxnPlan::LeasedPuts(puts) => {
                // The access rules are checked for every put before the
                // first is made, so a denied one leaves nothing half done.
                for put in &puts {
                    self.front.writes.may_write(&put.key, &[])?;
                }
                let mut responses = Vec::with_capacity(puts.len());
                for put in puts {
                    let answer = self.leased_put(put).await?;
                    responses.push(PbResponseOp {
                        response: Some(PbTxnOpResponse::ResponsePut(answer)),
                    });
                }
                Ok(PbTxnResponse {
                    header: Some(range::header(self.front.upstream.revision())),
                    succeeded: true,
                    responses,
                })
            }
            TxnPlan::CreateIfAbsent { put, failure } => {
                self.front.writes.may_write(&put.key, &[])?;
                let existing = self.lookup(Bytes::copy_from_slice(&put.key)).await?;
                let revision = self.front.upstream.revision();
                match existing {
                    None => {
                        let answer = self.leased_put(put).await?;
                        Ok(PbTxnResponse {
                            header: Some(range::header(self.front.upstream.revision())),
                            succeeded: true,
                            responses: vec![PbResponseOp {
                                response: Some(PbTxnOpResponse::ResponsePut(answer)),
                            }],
                        })
                    }
                    Some(entry) => Ok(PbTxnResponse {
                        header: Some(range::header(revision)),
                        succeeded: false,
                        responses: failure
                            .iter()
                            .map(|read| PbResponseOp {
                                response: Some(PbTxnOpResponse::ResponseRange(range::answer(
                                    read,
                                    vec![entry.clone()],
                                    revision,
                                ))),
                            })
                            .collect(),
                    }),
                }
            }
        }
    }

    /// What the relay knows of `key`: its own leases first, then etcd
    /// while it is up, then the discovery cache; a key none of them has
    /// is absent.
    async fn lookup(&self, key: Bytes) -> Result<Option<Entry>, Status> {
        let front = &self.front;
        let own = front
            .owner
            .in_range(key.clone(), Bytes::new())
            .await
            .map_err(owner_status)?;
        if let Some(entry) = own.into_iter().next() {
            return Ok(Some(entry));
        }
        if front.upstream.link().is_up() {
            let read = PbRangeRequest {
                key: key.to_vec(),
                ..PbRangeRequest::default()
            };
            let answer: Result<PbRangeResponse, Status> = front
                .upstream
                .call(RANGE, "the create-if-absent check", read)
                .await;
            if let Ok(answer) = answer {
                self.saw(answer.header.as_ref());
                return Ok(answer.kvs.into_iter().next().map(|kv| Entry {
                    key: Bytes::from(kv.key),
                    value: Bytes::from(kv.value),
                    lease: kv.lease,
                }));
            }
        }
        let cached = bridge::cached(&front.discovery, key.clone(), READ_TIMEOUT).await;
        Ok(cached.ok().and_then(|snapshot| {
            snapshot
                .entries
                .into_iter()
                .find(|entry| entry.key == key)
                .map(|entry| Entry {
                    key: entry.key,
                    value: entry.value,
                    lease: 0,
                })
        }))
    }

    fn saw(&self, header: Option<&etcd_client::proto::PbResponseHeader>) {
        if let Some(header) = header {
            self.front.upstream.saw_revision(header.revision);
        }
    }
}

#[tonic::async_trait]
impl PbKvService for KvService {
    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let answer = KvService::range(self, request.into_inner()).await;
        count("range", &answer);
        answer.map(Response::new)
    }

    type RangeStreamStream = tokio_stream::Empty<Result<PbRangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _request: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let answer = Err(Status::unimplemented(
            "KV RangeStream is not served by holdfast's etcd front end; use Range",
        ));
        count::<()>("range_stream", &answer);
        answer.map(|()| Response::new(tokio_stream::empty()))
    }

    async fn put(&self, request: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        let answer = KvService::put(self, request.into_inner()).await;
        count("put", &answer);
        answer.map(Response::new)
    }

    async fn delete_range(
        &self,
        request: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let answer = KvService::delete_range(self, request.into_inner()).await;
        count("delete_range", &answer);
        answer.map(Response::new)
    }

    async fn txn(&self, request: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        let answer = KvService::txn(self, request.into_inner()).await;
        count("txn", &answer);
        answer.map(Response::new)
    }

    async fn compact(
        &self,
        _request: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        let answer = Err(Status::unimplemented(
            "KV Compact is not served by holdfast's etcd front end; compact etcd directly",
        ));
        count::<()>("compact", &answer);
        answer.map(|()| Response::new(PbCompactionResponse::default()))
    }
}
