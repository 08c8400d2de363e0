//! The registry's etcd calls: each step the model decides on, done with
//! etcd-client and reported back as plain data.
//!
//! Every step is bounded by a timeout, because a stopped etcd does not
//! refuse a call, it just never answers, and the registry must go on
//! buffering meanwhile.

use super::model::{Change, LeaseId, Observed, SessionId};
use crate::keys::etcd::link::EtcdLink;
use bytes::Bytes;
use etcd_client::proto::PbTxnOpResponse;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use std::time::Duration;

/// One unit of work against etcd.
#[derive(Debug)]
pub enum Step {
    Revoke(Vec<LeaseId>),
    Grant(Vec<SessionId>),
    Apply(Vec<Change>),
    CheckLeases(Vec<(SessionId, LeaseId)>),
    ReadKeys(Vec<Bytes>),
}

/// What a step achieved; `error` is set when it stopped early.
#[derive(Debug)]
pub enum StepResult {
    /// The first `done` leases are revoked (or were already gone).
    Revoked { done: usize, error: Option<String> },
    Granted {
        leases: Vec<(SessionId, LeaseId)>,
        error: Option<String>,
    },
    Applied {
        changes: Vec<Change>,
        error: Option<String>,
        /// etcd refused the batch because a lease in it does not exist
        /// (it expired, or etcd came back without its data).
        lease_missing: bool,
    },
    LeasesChecked {
        lost: Vec<(SessionId, LeaseId)>,
        error: Option<String>,
    },
    KeysRead {
        observed: Vec<(Bytes, Option<Observed>)>,
        error: Option<String>,
    },
}

impl StepResult {
    pub fn error(&self) -> Option<&str> {
        match self {
            StepResult::Revoked { error, .. }
            | StepResult::Granted { error, .. }
            | StepResult::Applied { error, .. }
            | StepResult::LeasesChecked { error, .. }
            | StepResult::KeysRead { error, .. } => error.as_deref(),
        }
    }
}

/// Runs `step`, giving up after `timeout`; tells `link` the revisions seen.
pub async fn run(
    mut client: Client,
    link: EtcdLink,
    step: Step,
    ttl: Duration,
    timeout: Duration,
) -> StepResult {
    match step {
        Step::Revoke(leases) => {
            let mut done = 0;
            for lease in &leases {
                match bounded(timeout, client.lease_revoke(*lease)).await {
                    Ok(_) => done += 1,
                    Err(failure) if failure.lease_not_found => done += 1,
                    Err(failure) => {
                        return StepResult::Revoked {
                            done,
                            error: Some(failure.message),
                        }
                    }
                }
            }
            StepResult::Revoked { done, error: None }
        }
        Step::Grant(sessions) => {
            let ttl_seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
            let mut leases = Vec::with_capacity(sessions.len());
            for session in sessions {
                match bounded(timeout, client.lease_grant(ttl_seconds, None)).await {
                    Ok(granted) => leases.push((session, granted.id())),
                    Err(failure) => {
                        return StepResult::Granted {
                            leases,
                            error: Some(failure.message),
                        }
                    }
                }
            }
            StepResult::Granted {
                leases,
                error: None,
            }
        }
        Step::Apply(changes) => {
            let operations: Vec<TxnOp> = changes
                .iter()
                .map(|change| match change {
                    Change::Put { key, value, lease } => TxnOp::put(
                        key.to_vec(),
                        value.to_vec(),
                        Some(PutOptions::new().with_lease(*lease)),
                    ),
                    Change::Delete { key } => TxnOp::delete(key.to_vec(), None),
                })
                .collect();
            let write = client.txn(Txn::new().and_then(operations));
            let (error, lease_missing) = match bounded(timeout, write).await {
                Ok(response) => {
                    if let Some(header) = response.header() {
                        link.saw_revision(header.revision());
                    }
                    (None, false)
                }
                Err(failure) => (Some(failure.message), failure.lease_not_found),
            };
            StepResult::Applied {
                changes,
                error,
                lease_missing,
            }
        }
        Step::CheckLeases(leases) => {
            let mut lost = Vec::new();
            for (session, lease) in leases {
                match bounded(timeout, client.lease_time_to_live(lease, None)).await {
                    // etcd answers TTL -1 for a lease it does not have.
                    Ok(answer) if answer.ttl() <= 0 => lost.push((session, lease)),
                    Ok(_) => {}
                    Err(failure) if failure.lease_not_found => lost.push((session, lease)),
                    Err(failure) => {
                        return StepResult::LeasesChecked {
                            lost,
                            error: Some(failure.message),
                        }
                    }
                }
            }
            StepResult::LeasesChecked { lost, error: None }
        }
        Step::ReadKeys(keys) => {
            let operations: Vec<TxnOp> = keys
                .iter()
                .map(|key| TxnOp::get(key.to_vec(), None))
                .collect();
            match bounded(timeout, client.txn(Txn::new().and_then(operations))).await {
                Ok(response) => {
                    if let Some(header) = response.header() {
                        link.saw_revision(header.revision());
                    }
                    // Read from the raw answers: etcd-client's
                    // `op_responses` panics on an answer without its
                    // result, which only a broken or impostor etcd sends.
                    let mut observed = Vec::with_capacity(keys.len());
                    for (key, answer) in keys.into_iter().zip(&response.0.responses) {
                        let found = match &answer.response {
                            Some(PbTxnOpResponse::ResponseRange(range)) => {
                                range.kvs.first().map(|kv| Observed {
                                    value: Bytes::copy_from_slice(&kv.value),
                                    lease: kv.lease,
                                })
                            }
                            Some(_) => None,
                            None => {
                                return StepResult::KeysRead {
                                    observed: Vec::new(),
                                    error: Some(
                                        "etcd answered a read without its result".to_string(),
                                    ),
                                }
                            }
                        };
                        observed.push((key, found));
                    }
                    StepResult::KeysRead {
                        observed,
                        error: None,
                    }
                }
                Err(failure) => StepResult::KeysRead {
                    observed: Vec::new(),
                    error: Some(failure.message),
                },
            }
        }
    }
}

/// Why one etcd call gave no answer.
struct CallFailure {
    message: String,
    /// etcd said a lease named in the call does not exist.
    lease_not_found: bool,
}

/// Awaits one etcd call for at most `timeout`.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CallFailure> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(CallFailure {
            message: error.to_string(),
            lease_not_found: is_lease_not_found(&error),
        }),
        Err(_) => Err(CallFailure {
            message: format!("etcd did not answer within {} ms", timeout.as_millis()),
            lease_not_found: false,
        }),
    }
}

fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    error.to_string().contains("lease not found")
}
