//! The etcd front end's way into the registry and discovery: the same
//! handles sessions use, answered through a small outbox of its own.
//!
//! A registration or a GET answers with a frame into an outbox; here each
//! call gets a private outbox, waits for that one frame and turns it into
//! a result or a gRPC status. Watches get an outbox per gRPC stream (see
//! `watch.rs`).

use crate::config::SlowConsumerPolicy;
use crate::keys::discovery::{DiscoveryHandle, GetTo};
use crate::keys::registry::AckTo;
use crate::ops::stats::RelayStats;
use crate::session::outbox::{self, Outbox, OutboxReceiver};
use holdfast_wire::{ErrorCode, Frame, GetOutcome, RegistrationOutcome, Snapshot};
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// Outbox of one answer: a few frames, bytes up to `max_bytes`.
const ANSWER_FRAMES: usize = 4;

/// Makes outboxes for the front end; the session id space is its own.
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

    /// An ack destination and the receiver its answer arrives on.
    pub fn ack(&self) -> (AckTo, OutboxReceiver) {
        let (outbox, receiver) = self.make(ANSWER_OWNER, ANSWER_FRAMES);
        (
            AckTo {
                outbox,
                request_id: 0,
            },
            receiver,
        )
    }
}

/// Pseudo-session id of one-answer outboxes (only named in logs).
const ANSWER_OWNER: u64 = u64::MAX;

/// Waits for a registration's answer: Applied and Buffered are both a
/// success (Buffered: etcd is down and the relay holds the write).
pub async fn registered(receiver: OutboxReceiver, limit: Duration) -> Result<bool, Status> {
    match registration_outcome(receiver, limit).await? {
        RegistrationOutcome::Applied => Ok(true),
        RegistrationOutcome::Buffered => Ok(false),
        RegistrationOutcome::Rejected { code, message } => Err(status_for(code, message.as_str())),
    }
}

/// Waits for a registration's answer, as the registry gave it; `Err` when
/// none came (the registration may still be applied later).
pub async fn registration_outcome(
    mut receiver: OutboxReceiver,
    limit: Duration,
) -> Result<RegistrationOutcome, Status> {
    match next_frame(&mut receiver, limit).await? {
        Frame::RegisterAck(ack) => Ok(ack.outcome),
        other => Err(Status::internal(format!(
            "the registry answered with an unexpected frame {other:?}"
        ))),
    }
}

/// Reads `prefix` from the discovery cache.
pub async fn cached(
    discovery: &DiscoveryHandle,
    outboxes: &Outboxes,
    prefix: bytes::Bytes,
    limit: Duration,
) -> Result<Snapshot, Status> {
    let (outbox, mut receiver) = outboxes.make(ANSWER_OWNER, ANSWER_FRAMES);
    discovery
        .get(
            prefix,
            GetTo {
                outbox,
                request_id: 0,
            },
        )
        .await;
    let frame = next_frame(&mut receiver, limit).await;
    if receiver.take_unreported_drops() > 0 {
        return Err(Status::resource_exhausted(format!(
            "the cached answer is larger than sessions.outbound_queue_bytes ({} bytes)",
            outboxes.max_bytes
        )));
    }
    match frame? {
        Frame::GetResponse(response) => match response.outcome {
            GetOutcome::Snapshot(snapshot) => Ok(snapshot),
            GetOutcome::Failed { code, message } => Err(status_for(code, message.as_str())),
        },
        other => Err(Status::internal(format!(
            "discovery answered with an unexpected frame {other:?}"
        ))),
    }
}

async fn next_frame(receiver: &mut OutboxReceiver, limit: Duration) -> Result<Frame, Status> {
    let mut batch = Vec::with_capacity(1);
    let received = tokio::time::timeout(limit, async {
        // The answer's sender drops the outbox right after answering: the
        // first call may see the closed queue before the answer, the
        // second takes the answer (or finds nothing: it was dropped).
        for _ in 0..2 {
            if receiver.recv_many(&mut batch, 1).await > 0 {
                break;
            }
        }
    })
    .await;
    if received.is_err() {
        return Err(Status::deadline_exceeded(
            "the relay did not answer in time; retry",
        ));
    }
    batch.pop().ok_or_else(|| {
        Status::unavailable(
            "the relay dropped the request (its lease was revoked, or the relay is shutting down)",
        )
    })
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
