//! The planner's keys in etcd as the guard reads and writes them.
//!
//! Dynamo 1.6.1's VirtualConnectorCoordinator writes
//! `v1/{ns}/planner/num_prefill_workers`, `num_decode_workers` and
//! `decision_id` (decimal strings) in one transaction under its lease; the
//! deployment's VirtualConnectorClient acknowledges with
//! `scaled_decision_id`. The guard writes a decision the same way, with
//! `ignore_lease` so the keys stay under the planner's lease, plus a marker
//! (`holdfast/guard/{ns}/last_write`, same revision) that tells every relay
//! which decisions are the guard's. The write compares the `decision_id`
//! key's mod_revision (the planner has not moved on) and the election key's
//! create_revision (this relay still leads).

use crate::guard::core::{Counts, Decision, Origin, PlannerState};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

/// The keys of one namespace.
#[derive(Debug, Clone)]
pub struct PlannerKeys {
    pub prefix: String,
    pub decision_id: String,
    pub num_prefill: String,
    pub num_decode: String,
    pub acknowledged: String,
    pub marker: String,
    pub leader: String,
}

impl PlannerKeys {
    pub fn new(namespace: &str) -> PlannerKeys {
        let prefix = format!("v1/{namespace}/planner/");
        PlannerKeys {
            decision_id: format!("{prefix}decision_id"),
            num_prefill: format!("{prefix}num_prefill_workers"),
            num_decode: format!("{prefix}num_decode_workers"),
            acknowledged: format!("{prefix}scaled_decision_id"),
            prefix,
            marker: format!("holdfast/guard/{namespace}/last_write"),
            leader: format!("holdfast/guard/{namespace}/leader"),
        }
    }
}

/// What the marker says about the guard's last write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    /// "rollback" or "reissue".
    pub kind: String,
    pub decision_id: u64,
    pub relay: String,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// For a rollback: the decision rolled back and the intervals that
    /// triggered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// One read: the state, the marker, and etcd's revision.
#[derive(Debug)]
pub struct Read {
    pub state: PlannerState,
    pub marker: Option<Marker>,
    pub revision: i64,
}

fn parse_number(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Reads the planner's keys and the marker at one revision; with
/// `with_previous`, also the counts just before the current decision from
/// etcd's history (absent when compacted away, or when the decision is the
/// planner's first).
pub async fn read(
    client: &mut Client,
    keys: &PlannerKeys,
    with_previous: bool,
) -> Result<Read, etcd_client::Error> {
    let response = client
        .txn(Txn::new().and_then([
            TxnOp::get(keys.prefix.as_str(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(keys.marker.as_str(), None),
        ]))
        .await?;
    let revision = response.header().map_or(0, |header| header.revision());
    let mut planner = Vec::new();
    let mut marker_kv = None;
    for (index, op) in response.op_responses().into_iter().enumerate() {
        if let TxnOpResponse::Get(get) = op {
            for kv in get.kvs() {
                if index == 0 {
                    planner.push((kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()));
                } else {
                    marker_kv = Some((kv.value().to_vec(), kv.mod_revision()));
                }
            }
        }
    }
    let find = |key: &str| {
        planner
            .iter()
            .find(|(name, _, _)| name.as_slice() == key.as_bytes())
    };
    let number = |key: &str| find(key).and_then(|(_, value, _)| parse_number(value));
    let marker: Option<(Marker, i64)> = marker_kv.and_then(|(value, mod_revision)| {
        serde_json::from_slice(&value)
            .ok()
            .map(|marker| (marker, mod_revision))
    });
    let decision = match (
        find(&keys.decision_id),
        number(&keys.num_prefill),
        number(&keys.num_decode),
    ) {
        (Some((_, id, id_revision)), Some(prefill), Some(decode)) => parse_number(id).map(|id| {
            let origin = match &marker {
                Some((marker, revision)) if revision == id_revision => {
                    if marker.kind == "rollback" {
                        Origin::GuardRollback
                    } else {
                        Origin::GuardReissue
                    }
                }
                _ => Origin::Planner,
            };
            Decision {
                id,
                counts: Counts { prefill, decode },
                revision: *id_revision,
                origin,
            }
        }),
        _ => None,
    };
    let previous = match decision {
        Some(decision) if with_previous => {
            previous_counts(client, keys, decision.revision - 1).await
        }
        _ => None,
    };
    Ok(Read {
        state: PlannerState {
            decision,
            acknowledged: number(&keys.acknowledged),
            acknowledged_before: find(&keys.acknowledged).and_then(|(_, value, revision)| {
                decision
                    .filter(|decision| *revision < decision.revision)
                    .and_then(|_| parse_number(value))
            }),
            guard_written: marker.as_ref().map(|(marker, _)| marker.decision_id),
            previous,
        },
        marker: marker.map(|(marker, _)| marker),
        revision,
    })
}

/// The decision's counts as of `revision`, if etcd still has it.
async fn previous_counts(client: &mut Client, keys: &PlannerKeys, revision: i64) -> Option<Counts> {
    if revision <= 0 {
        return None;
    }
    let response = client
        .get(
            keys.prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_revision(revision)),
        )
        .await
        .ok()?;
    let value = |key: &str| {
        response
            .kvs()
            .iter()
            .find(|kv| kv.key() == key.as_bytes())
            .and_then(|kv| parse_number(kv.value()))
    };
    Some(Counts {
        prefill: value(&keys.num_prefill)?,
        decode: value(&keys.num_decode)?,
    })
}

/// A decision for the guard to write.
pub struct Write<'a> {
    pub counts: Counts,
    pub new_id: u64,
    /// The `decision_id` mod_revision the decision was read at.
    pub expect_revision: i64,
    /// The create_revision of this relay's election key.
    pub leader_revision: i64,
    pub marker: &'a Marker,
}

/// Writes a decision; `Ok(false)` when the planner moved on or this relay
/// no longer leads (nothing written).
pub async fn write(
    client: &mut Client,
    keys: &PlannerKeys,
    write: Write<'_>,
) -> Result<bool, etcd_client::Error> {
    let keep_lease = || Some(PutOptions::new().with_ignore_lease());
    let marker = serde_json::to_vec(write.marker).unwrap_or_default();
    let response = client
        .txn(
            Txn::new()
                .when([
                    Compare::mod_revision(
                        keys.decision_id.as_str(),
                        CompareOp::Equal,
                        write.expect_revision,
                    ),
                    Compare::create_revision(
                        keys.leader.as_str(),
                        CompareOp::Equal,
                        write.leader_revision,
                    ),
                ])
                .and_then([
                    TxnOp::put(
                        keys.num_prefill.as_str(),
                        write.counts.prefill.to_string(),
                        keep_lease(),
                    ),
                    TxnOp::put(
                        keys.num_decode.as_str(),
                        write.counts.decode.to_string(),
                        keep_lease(),
                    ),
                    TxnOp::put(
                        keys.decision_id.as_str(),
                        write.new_id.to_string(),
                        keep_lease(),
                    ),
                    TxnOp::put(keys.marker.as_str(), marker, None),
                ]),
        )
        .await?;
    Ok(response.succeeded())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::PutOptions;

    /// Writes a decision the way Dynamo's coordinator does: one txn, under
    /// its lease.
    async fn planner_writes(client: &mut Client, keys: &PlannerKeys, lease: i64, id: u64, n: u64) {
        let under = || Some(PutOptions::new().with_lease(lease));
        client
            .txn(Txn::new().and_then([
                TxnOp::put(keys.num_prefill.as_str(), n.to_string(), under()),
                TxnOp::put(keys.num_decode.as_str(), n.to_string(), under()),
                TxnOp::put(keys.decision_id.as_str(), id.to_string(), under()),
            ]))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_write_lands_under_the_planners_lease_only_if_nothing_moved() {
        let etcd = holdfast_testkit::EtcdServer::start().unwrap();
        let mut client = Client::connect([etcd.url()], None).await.unwrap();
        let keys = PlannerKeys::new("ns");
        let planner_lease = client.lease_grant(60, None).await.unwrap().id();
        planner_writes(&mut client, &keys, planner_lease, 0, 1).await;
        planner_writes(&mut client, &keys, planner_lease, 1, 3).await;
        let guard_lease = client.lease_grant(60, None).await.unwrap().id();
        let leader = client
            .put(
                keys.leader.as_str(),
                "me",
                Some(PutOptions::new().with_lease(guard_lease)),
            )
            .await
            .unwrap();
        let term = leader.header().unwrap().revision();

        let read_now = read(&mut client, &keys, true).await.unwrap();
        let seen = read_now.state.decision.unwrap();
        assert_eq!(
            seen.counts,
            Counts {
                prefill: 3,
                decode: 3
            }
        );
        assert_eq!(
            read_now.state.previous,
            Some(Counts {
                prefill: 1,
                decode: 1
            })
        );
        // The planner moves on between the read and the write.
        planner_writes(&mut client, &keys, planner_lease, 2, 5).await;
        let marker = Marker {
            kind: "rollback".to_string(),
            decision_id: 2,
            relay: "me".to_string(),
            at_ms: 0,
            detail: None,
        };
        let stale = Write {
            counts: Counts {
                prefill: 1,
                decode: 1,
            },
            new_id: 2,
            expect_revision: seen.revision,
            leader_revision: term,
            marker: &marker,
        };
        assert!(!write(&mut client, &keys, stale).await.unwrap());
        let after = read(&mut client, &keys, false)
            .await
            .unwrap()
            .state
            .decision
            .unwrap();
        assert_eq!((after.id, after.counts.prefill), (2, 5));
        assert_eq!(after.origin, Origin::Planner);

        // Against the current decision, but from a relay that no longer leads.
        let not_leader = Write {
            counts: Counts {
                prefill: 3,
                decode: 3,
            },
            new_id: 3,
            expect_revision: after.revision,
            leader_revision: term + 1000,
            marker: &marker,
        };
        assert!(!write(&mut client, &keys, not_leader).await.unwrap());

        let current = Write {
            counts: Counts {
                prefill: 3,
                decode: 3,
            },
            new_id: 3,
            expect_revision: after.revision,
            leader_revision: term,
            marker: &marker,
        };
        assert!(write(&mut client, &keys, current).await.unwrap());
        let rolled = read(&mut client, &keys, false).await.unwrap();
        let decision = rolled.state.decision.unwrap();
        assert_eq!((decision.id, decision.counts.prefill), (3, 3));
        assert_eq!(decision.origin, Origin::GuardRollback);
        // Still the planner's keys: they go when its lease does.
        let id_key = client.get(keys.decision_id.as_str(), None).await.unwrap();
        assert_eq!(id_key.kvs()[0].lease(), planner_lease);
        client.lease_revoke(planner_lease).await.unwrap();
        let gone = read(&mut client, &keys, false).await.unwrap();
        assert!(gone.state.decision.is_none());
    }
}
