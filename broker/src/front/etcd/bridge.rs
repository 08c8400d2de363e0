//! The etcd front end's way into the registry and discovery: the same
//! handles sessions use. A registration or a GET gets a typed reply whose
//! answer arrives on a channel, turned here into a result or a gRPC
//! status. Watches stream many events, and get an outbox per gRPC stream
//! (see `watch.rs`).

use crate::config::SlowConsumerPolicy;
use crate::keys::discovery::{DiscoveryHandle, GetTo};
use crate::keys::registry::AckTo;
use crate::ops::stats::RelayStats;
use crate::session::outbox::{self, Outbox, OutboxReceiver};
use crate::util::reply::Reply;
use holdfast_wire::{ErrorCode, GetOutcome, RegistrationOutcome, Snapshot};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::Status;

/// Makes the outboxes of watch streams; the session id space is its own.
#[derive(Clone)]
pub struct Outboxes {
    pub stats: Arc<RelayStats>,
    pub max_bytes: usize,
}

impl Outboxes {
    /// An outbox for `frames` frames, owned by pseudo-session `owner`.
    pub fn make(&self, owner: u64, frames: usize) -> (Outbox, OutboxReceiver) {
        outbox::outbox(
            owner,
            frames,
            self.max_bytes,
            SlowConsumerPolicy::Drop,
            self.stats.clone(),
        )
    }
}

/// A registration's reply and the receiver its answer arrives on.
pub fn ack() -> (AckTo, oneshot::Receiver<RegistrationOutcome>) {
    Reply::channel()
}

/// Waits for a registration's answer: Applied and Buffered are both a
/// success (Buffered: etcd is down and the relay holds the write).
pub async fn registered(
    receiver: oneshot::Receiver<RegistrationOutcome>,
    limit: Duration,
) -> Result<bool, Status> {
    match registration_outcome(receiver, limit).await? {
        RegistrationOutcome::Applied => Ok(true),
        RegistrationOutcome::Buffered => Ok(false),
        RegistrationOutcome::Rejected { code, message } => Err(status_for(code, message.as_str())),
    }
}

/// Waits for a registration's answer, as the registry gave it; `Err` when
/// none came (the registration may still be applied later).
pub async fn registration_outcome(
    receiver: oneshot::Receiver<RegistrationOutcome>,
    limit: Duration,
) -> Result<RegistrationOutcome, Status> {
    answer(receiver, limit).await
}

/// Reads `prefix` from the discovery cache.
pub async fn cached(
    discovery: &DiscoveryHandle,
    prefix: bytes::Bytes,
    limit: Duration,
) -> Result<Snapshot, Status> {
    let (reply, receiver) = Reply::channel();
    discovery.get(prefix, GetTo::new(reply)).await;
    match answer(receiver, limit).await? {
        GetOutcome::Snapshot(snapshot) => Ok(snapshot),
        GetOutcome::Failed { code, message } => Err(status_for(code, message.as_str())),
    }
}

async fn answer<T>(receiver: oneshot::Receiver<T>, limit: Duration) -> Result<T, Status> {
    match tokio::time::timeout(limit, receiver).await {
        Err(_) => Err(Status::deadline_exceeded(
            "the relay did not answer in time; retry",
        )),
        Ok(Err(_)) => Err(Status::unavailable(
            "the relay dropped the request (its lease was revoked, or the relay is shutting down)",
        )),
        Ok(Ok(answer)) => Ok(answer),
    }
}
/// The gRPC status for a relay error code.
pub fn status_for(code: ErrorCode, message: &str) -> Status {
    match code {
        ErrorCode::EtcdUnavailable | ErrorCode::ShuttingDown | ErrorCode::NatsUnavailable => {
            Status::unavailable(message)
        }
        ErrorCode::LimitExceeded | ErrorCode::JournalFull | ErrorCode::SlowConsumer => {
            Status::resource_exhausted(message)
        }
        ErrorCode::Timeout => Status::deadline_exceeded(message),
        ErrorCode::Unauthorized => Status::permission_denied(message),
        ErrorCode::Conflict => Status::failed_precondition(message),
        ErrorCode::InvalidSubject | ErrorCode::UnknownClass | ErrorCode::ProtocolViolation => {
            Status::invalid_argument(message)
        }
        _ => Status::internal(message),
    }
}
