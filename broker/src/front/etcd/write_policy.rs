//! Who may write which key through the etcd front end: the access rules
//! and key ownership, as the Unix socket and QUIC sessions obey them.
//!
//! A TCP connection on loopback proves no identity, so every front end
//! client gets `access.default`, whose `register` list governs puts,
//! deletes, writing transactions and putting keys under a lease (a
//! refusal is `PermissionDenied`). A key a live session or a relay lease
//! holds belongs to it: a put (leased or not), a delete or a transaction
//! that would change it is refused with `FailedPrecondition` until its
//! holder ends. A plain delete through the front end may remove keys of
//! relay leases (the front end's clients share one identity, and etcd
//! clients delete their leased keys that way), not those of sessions.
//! Both refusals are counted and logged at most once per interval.

use crate::front::access::{Operation, Permissions};
use crate::keys::registry::model::{quoted_key, SessionId};
use crate::keys::registry::RegistryHandle;
use crate::ops::stats::{bump, RelayStats};
use crate::util::drop_log::DropLog;
use bytes::Bytes;
use etcd_client::proto::{PbTxnOpRequest, PbTxnRequest};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tonic::Status;
use tracing::warn;

use super::lease_owner::is_session;

/// Whose keys a write must leave alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holders {
    /// Sessions' and relay leases' keys: the write goes to etcd around
    /// the registry, which would put them back at its next reconcile.
    Everyone,
    /// Sessions' keys only: relay leases' keys are removed through their
    /// lease table.
    Sessions,
}

pub struct WritePolicy {
    permissions: Arc<Permissions>,
    registry: RegistryHandle,
    stats: Arc<RelayStats>,
    denial_log: Mutex<DropLog>,
    conflict_log: Mutex<DropLog>,
}

impl WritePolicy {
    pub fn new(
        permissions: Arc<Permissions>,
        registry: RegistryHandle,
        stats: Arc<RelayStats>,
    ) -> WritePolicy {
        WritePolicy {
            permissions,
            registry,
            stats,
            denial_log: Mutex::new(DropLog::default()),
            conflict_log: Mutex::new(DropLog::default()),
        }
    }

    /// Whether the access rules let a front end client write etcd's range
    /// `[key, range_end)` (an empty `range_end`: `key` alone).
    pub fn may_write(&self, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        if self.permissions.may_register_range(key, range_end) {
            return Ok(());
        }
        self.stats.record_access_denial(Operation::Register);
        let total = self.stats.access_denials(Operation::Register);
        let target = describe(key, range_end);
        if let Some(since) = due(&self.denial_log, total) {
            warn!(
                target = %target,
                access = %self.permissions.source,
                denied_since_last_line = since,
                "etcd front end: a write denied by the access rules (TCP proves no identity: the front end gets access.default)"
            );
        }
        Err(Status::permission_denied(format!(
            "writing {target} is not allowed for etcd front end clients (by {}; TCP proves no identity)",
            self.permissions.source
        )))
    }

    /// Refuses a write of `[key, range_end)` if a live holder of `holders`
    /// holds a key in it.
    pub async fn not_held(
        &self,
        key: &[u8],
        range_end: &[u8],
        holders: Holders,
    ) -> Result<(), Status> {
        let counts: fn(SessionId) -> bool = match holders {
            Holders::Everyone => |_| true,
            Holders::Sessions => is_session,
        };
        let held = self
            .registry
            .first_held(
                Bytes::copy_from_slice(key),
                Bytes::copy_from_slice(range_end),
                counts,
            )
            .await;
        match held {
            None => Ok(()),
            Some((key, owner)) => {
                let holder = if is_session(owner) {
                    format!("a live session ({owner}) of this relay")
                } else {
                    "a relay lease of the etcd front end".to_string()
                };
                Err(self.conflict(format!(
                    "`{}` is held by {holder}; it is free again once its holder ends",
                    quoted_key(&key)
                )))
            }
        }
    }

    /// Checks every write of a transaction etcd evaluates (no relay
    /// lease in it): allowed by the rules, and changing no held key.
    pub async fn check_forwarded_txn(&self, txn: &PbTxnRequest) -> Result<(), Status> {
        let mut writes = Vec::new();
        collect_writes(txn, &mut writes);
        for (key, range_end) in &writes {
            self.may_write(key, range_end)?;
        }
        for (key, range_end) in &writes {
            self.not_held(key, range_end, Holders::Everyone).await?;
        }
        Ok(())
    }

    /// Counts and logs a refusal for a key someone else holds; returns the
    /// status for the client.
    pub fn conflict(&self, message: String) -> Status {
        bump(&self.registry.stats.conflicts);
        let total = self.registry.stats.conflicts.load(Ordering::Relaxed);
        if let Some(since) = due(&self.conflict_log, total) {
            warn!(
                reason = %message,
                refused_since_last_line = since,
                "etcd front end: refused a write of a key another session or lease holds"
            );
        }
        Status::failed_precondition(message)
    }
}

/// Whether a log line is due; a poisoned lock only skips the line.
fn due(log: &Mutex<DropLog>, total: u64) -> Option<u64> {
    log.lock().ok()?.due(total, Instant::now())
}

/// The ranges a transaction writes: every put's key and every delete's
/// range, in both branches and in nested transactions.
fn collect_writes(txn: &PbTxnRequest, writes: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match &op.request {
            Some(PbTxnOpRequest::RequestPut(put)) => writes.push((put.key.clone(), Vec::new())),
            Some(PbTxnOpRequest::RequestDeleteRange(delete)) => {
                writes.push((delete.key.clone(), delete.range_end.clone()))
            }
            Some(PbTxnOpRequest::RequestTxn(inner)) => collect_writes(inner, writes),
            Some(PbTxnOpRequest::RequestRange(_)) | None => {}
        }
    }
}

/// A range for messages: the key, or the key and its range end.
fn describe(key: &[u8], range_end: &[u8]) -> String {
    let key = quoted_key(key);
    match range_end {
        [] => format!("`{key}`"),
        [0] => format!("every key from `{key}` on"),
        end => format!("[`{key}`, `{}`)", quoted_key(end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::{PbDeleteRequest, PbPutRequest, PbRangeRequest, PbTxnRequestOp};

    fn op(request: PbTxnOpRequest) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(request),
        }
    }

    #[test]
    fn every_write_of_a_transaction_is_found_and_reads_are_not() {
        let inner = PbTxnRequest {
            success: vec![op(PbTxnOpRequest::RequestDeleteRange(PbDeleteRequest {
                key: b"c/".to_vec(),
                range_end: b"c0".to_vec(),
                ..PbDeleteRequest::default()
            }))],
            ..PbTxnRequest::default()
        };
        let txn = PbTxnRequest {
            compare: Vec::new(),
            success: vec![
                op(PbTxnOpRequest::RequestPut(PbPutRequest {
                    key: b"a".to_vec(),
                    ..PbPutRequest::default()
                })),
                op(PbTxnOpRequest::RequestRange(PbRangeRequest {
                    key: b"read".to_vec(),
                    ..PbRangeRequest::default()
                })),
            ],
            failure: vec![op(PbTxnOpRequest::RequestTxn(inner))],
        };
        let mut writes = Vec::new();
        collect_writes(&txn, &mut writes);
        assert_eq!(
            writes,
            vec![
                (b"a".to_vec(), Vec::new()),
                (b"c/".to_vec(), b"c0".to_vec())
            ]
        );
    }

    #[test]
    fn ranges_are_named_as_etcd_means_them() {
        assert_eq!(describe(b"k", b""), "`k`");
        assert_eq!(describe(b"k", b"\0"), "every key from `k` on");
        assert_eq!(describe(b"a/", b"a0"), "[`a/`, `a0`)");
    }
}
