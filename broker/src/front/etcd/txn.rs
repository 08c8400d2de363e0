//! Which etcd transactions the relay evaluates itself, and how. Sans-IO.
//!
//! A put under a relay lease can only be done by the relay (etcd does not
//! know the relay's lease ids), so a transaction writing under one must
//! have a shape the relay can evaluate: create-if-absent (compare the
//! key's create revision or version with 0; success puts the key under a
//! lease; failure reads the key or does nothing), or unconditional puts
//! under leases. Every other transaction, without relay leases, goes to
//! etcd unchanged.

use etcd_client::proto::{
    PbCompare, PbPutRequest, PbRangeRequest, PbTargetUnion, PbTxnOpRequest, PbTxnRequest,
};

/// etcd's `CompareResult::Equal`.
const COMPARE_EQUAL: i32 = 0;
/// etcd's `CompareTarget` values.
const TARGET_VERSION: i32 = 0;
const TARGET_CREATE: i32 = 1;

/// How a transaction is handled.
#[derive(Debug, Clone, PartialEq)]
pub enum TxnPlan {
    /// Put `put` if its key does not exist; otherwise run `failure` reads.
    CreateIfAbsent {
        put: PbPutRequest,
        failure: Vec<PbRangeRequest>,
    },
    /// Puts under leases, no condition.
    LeasedPuts(Vec<PbPutRequest>),
    /// No relay lease involved: etcd evaluates it.
    Forward,
}

/// A transaction writing under a lease in a shape the relay cannot evaluate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("holdfast evaluates transactions that put under a lease only as create-if-absent (compare create_revision or version == 0 on the put's key; failure reads that key or is empty) or as unconditional puts: {0}")]
pub struct Unsupported(pub &'static str);

/// Decides how `txn` is handled.
pub fn plan(txn: &PbTxnRequest) -> Result<TxnPlan, Unsupported> {
    if !writes_under_lease(txn) {
        return Ok(TxnPlan::Forward);
    }
    let puts: Vec<&PbPutRequest> = txn
        .success
        .iter()
        .filter_map(|op| match &op.request {
            Some(PbTxnOpRequest::RequestPut(put)) => Some(put),
            _ => None,
        })
        .collect();
    if puts.len() != txn.success.len() {
        return Err(Unsupported(
            "the success branch mixes puts with other operations",
        ));
    }
    if txn.compare.is_empty() {
        if !txn.failure.is_empty() {
            return Err(Unsupported("a failure branch without a compare"));
        }
        return Ok(TxnPlan::LeasedPuts(puts.into_iter().cloned().collect()));
    }
    let [compare] = txn.compare.as_slice() else {
        return Err(Unsupported("more than one compare"));
    };
    let [put] = puts.as_slice() else {
        return Err(Unsupported("more than one put in the success branch"));
    };
    if !is_absent_check(compare) || compare.key != put.key {
        return Err(Unsupported(
            "the compare is not create_revision/version == 0 on the put's key",
        ));
    }
    let mut failure = Vec::with_capacity(txn.failure.len());
    for op in &txn.failure {
        match &op.request {
            Some(PbTxnOpRequest::RequestRange(range))
                if range.key == put.key && range.range_end.is_empty() =>
            {
                failure.push(range.clone());
            }
            _ => {
                return Err(Unsupported(
                    "the failure branch does more than read the key",
                ))
            }
        }
    }
    Ok(TxnPlan::CreateIfAbsent {
        put: (*put).clone(),
        failure,
    })
}

fn writes_under_lease(txn: &PbTxnRequest) -> bool {
    txn.success
        .iter()
        .chain(txn.failure.iter())
        .any(|op| match &op.request {
            Some(PbTxnOpRequest::RequestPut(put)) => put.lease != 0,
            Some(PbTxnOpRequest::RequestTxn(inner)) => writes_under_lease(inner),
            _ => false,
        })
}

fn is_absent_check(compare: &PbCompare) -> bool {
    compare.result == COMPARE_EQUAL
        && compare.range_end.is_empty()
        && match (compare.target, &compare.target_union) {
            (TARGET_CREATE, Some(PbTargetUnion::CreateRevision(0))) => true,
            (TARGET_VERSION, Some(PbTargetUnion::Version(0))) => true,
            // proto3 leaves a zero value out on the wire.
            (TARGET_CREATE | TARGET_VERSION, None) => true,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::PbTxnRequestOp;

    fn put(key: &str, lease: i64) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                lease,
                ..PbPutRequest::default()
            })),
        }
    }

    fn get(key: &str) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestRange(PbRangeRequest {
                key: key.as_bytes().to_vec(),
                ..PbRangeRequest::default()
            })),
        }
    }

    fn absent(key: &str, target: i32, union: Option<PbTargetUnion>) -> PbCompare {
        PbCompare {
            result: COMPARE_EQUAL,
            target,
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            target_union: union,
        }
    }

    #[test]
    fn create_if_absent_on_create_revision_or_version_is_recognised() {
        for compare in [
            absent("k", TARGET_CREATE, Some(PbTargetUnion::CreateRevision(0))),
            absent("k", TARGET_VERSION, Some(PbTargetUnion::Version(0))),
            absent("k", TARGET_CREATE, None),
        ] {
            let txn = PbTxnRequest {
                compare: vec![compare],
                success: vec![put("k", 5)],
                failure: vec![get("k")],
            };
            assert!(matches!(
                plan(&txn),
                Ok(TxnPlan::CreateIfAbsent { ref put, ref failure }) if put.lease == 5 && failure.len() == 1
            ));
        }
    }

    #[test]
    fn transactions_without_leases_go_to_etcd() {
        let txn = PbTxnRequest {
            compare: vec![absent("k", TARGET_CREATE, None)],
            success: vec![put("k", 0)],
            failure: vec![put("other", 0)],
        };
        assert_eq!(plan(&txn), Ok(TxnPlan::Forward));
    }

    #[test]
    fn unconditional_leased_puts_are_plain_puts() {
        let txn = PbTxnRequest {
            compare: Vec::new(),
            success: vec![put("a", 5), put("b", 5)],
            failure: Vec::new(),
        };
        assert!(matches!(plan(&txn), Ok(TxnPlan::LeasedPuts(puts)) if puts.len() == 2));
    }

    #[test]
    fn other_shapes_with_leases_are_refused() {
        let wrong_key = PbTxnRequest {
            compare: vec![absent("other", TARGET_CREATE, None)],
            success: vec![put("k", 5)],
            failure: Vec::new(),
        };
        assert!(plan(&wrong_key).is_err());
        let value_compare = PbTxnRequest {
            compare: vec![PbCompare {
                target: 3,
                target_union: Some(PbTargetUnion::Value(b"x".to_vec())),
                ..absent("k", 3, None)
            }],
            success: vec![put("k", 5)],
            failure: Vec::new(),
        };
        assert!(plan(&value_compare).is_err());
        let writes_on_failure = PbTxnRequest {
            compare: vec![absent("k", TARGET_CREATE, None)],
            success: vec![put("k", 5)],
            failure: vec![put("k", 0)],
        };
        assert!(plan(&writes_on_failure).is_err());
        let nested = PbTxnRequest {
            compare: Vec::new(),
            success: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(PbTxnRequest {
                    success: vec![put("k", 5)],
                    ..PbTxnRequest::default()
                })),
            }],
            failure: Vec::new(),
        };
        assert!(plan(&nested).is_err());
    }
}
