//! What `/status` and `holdfast status` show of the guard, per namespace:
//! whether this relay leads, whether it reaches etcd (without it the guard
//! acts on nothing), the decision in effect, the breach streak, and the
//! last rollback or advice with the numbers that triggered it.

use crate::guard::core::{Counts, GuardSnapshot, IntervalLoad, Origin, Outcome, Rollback};
use serde::Serialize;

/// One namespace's guard, as the status document shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GuardView {
    pub namespace: String,
    /// "enforce" or "advise".
    pub mode: &'static str,
    /// Whether this relay holds the namespace's election and acts.
    pub leader: bool,
    /// The relay id holding the election, as last read.
    pub leader_relay: Option<String>,
    /// "connected", or "unreachable: acting on nothing".
    pub etcd: &'static str,
    pub decision: Option<DecisionView>,
    /// The counts a rollback of `decision` would restore.
    pub previous: Option<Counts>,
    /// The deployment's `scaled_decision_id`.
    pub acknowledged_decision_id: Option<u64>,
    /// Breaching intervals in a row since the decision.
    pub breach_streak: u32,
    pub hold_off_intervals: u32,
    pub last_interval: Option<IntervalLoad>,
    /// The interval under way so far.
    pub current_interval: IntervalLoad,
    pub last_rollback: Option<ActionRecord>,
    pub last_advice: Option<ActionRecord>,
    /// The last decision any relay's guard wrote (the marker in etcd).
    pub last_guard_write: Option<serde_json::Value>,
    pub reissues: u64,
    pub load_reports: u64,
    pub undecodable_reports: u64,
    pub dropped_reports: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionView {
    pub decision_id: u64,
    pub num_prefill_workers: u64,
    pub num_decode_workers: u64,
    /// "planner" or "guard_rollback".
    pub origin: &'static str,
}

/// A rollback or advice and what triggered it.
#[derive(Debug, Clone, Serialize)]
pub struct ActionRecord {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub rolled_back_decision_id: u64,
    pub from: Counts,
    pub to: Counts,
    pub new_decision_id: u64,
    /// The breaching intervals, oldest first.
    pub triggered_by: Vec<IntervalLoad>,
    /// "written", "advised", "superseded" (the planner moved on first) or
    /// "failed" (etcd or NATS did not take it; tried again).
    pub outcome: &'static str,
}

impl ActionRecord {
    pub fn new(rollback: &Rollback, outcome: Outcome) -> ActionRecord {
        ActionRecord {
            at_ms: crate::util::wall_clock::unix_millis(),
            rolled_back_decision_id: rollback.from.id,
            from: rollback.from.counts,
            to: rollback.to,
            new_decision_id: rollback.new_id,
            triggered_by: rollback.triggered_by.clone(),
            outcome: match outcome {
                Outcome::Written => "written",
                Outcome::Advised => "advised",
                Outcome::Superseded => "superseded",
                Outcome::Failed => "failed",
            },
        }
    }
}

impl GuardView {
    pub fn new(namespace: &str, mode: &'static str) -> GuardView {
        GuardView {
            namespace: namespace.to_string(),
            mode,
            leader: false,
            leader_relay: None,
            etcd: "unreachable: acting on nothing",
            decision: None,
            previous: None,
            acknowledged_decision_id: None,
            breach_streak: 0,
            hold_off_intervals: 0,
            last_interval: None,
            current_interval: IntervalLoad::default(),
            last_rollback: None,
            last_advice: None,
            last_guard_write: None,
            reissues: 0,
            load_reports: 0,
            undecodable_reports: 0,
            dropped_reports: 0,
        }
    }

    pub fn update(
        &mut self,
        snapshot: GuardSnapshot,
        leader: bool,
        leader_relay: Option<String>,
        connected: bool,
    ) {
        self.leader = leader;
        self.leader_relay = if connected { leader_relay } else { None };
        self.etcd = if connected {
            "connected"
        } else {
            "unreachable: acting on nothing"
        };
        self.decision = snapshot.decision.map(|decision| DecisionView {
            decision_id: decision.id,
            num_prefill_workers: decision.counts.prefill,
            num_decode_workers: decision.counts.decode,
            origin: match decision.origin {
                Origin::GuardRollback => "guard_rollback",
                Origin::Planner | Origin::GuardReissue => "planner",
            },
        });
        self.previous = snapshot.previous;
        self.acknowledged_decision_id = snapshot.acknowledged;
        self.breach_streak = snapshot.streak;
        self.hold_off_intervals = snapshot.hold_off_intervals;
        self.last_interval = snapshot.last_interval;
        self.current_interval = snapshot.current_interval;
    }
}
