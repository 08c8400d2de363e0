//! The planner guard's judgement for one namespace, sans-IO: which decision
//! is in effect and which one it replaced, the load of each interval since
//! the decision, the breach streak, the hold-off after a rollback, and what
//! to write (a rollback, or a re-issue of a planner decision the deployment
//! would otherwise ignore). Driven by the states read from etcd, the load
//! samples decoded from NATS and the time passed in; the shell
//! (`task.rs`) does the I/O and reports back.
//!
//! Rules (docs/operations.md, "The planner guard"):
//! - Intervals are counted from the moment a decision is seen, one
//!   `interval` long each. An interval breaches when its fleet KV usage
//!   (the highest reported) is above `kv_usage_threshold` or its prefill
//!   queue depth (each source's highest report, summed) is above
//!   `prefill_queue_threshold`. An interval without reports breaks the
//!   streak: no evidence is not overload.
//! - `consecutive` breaching intervals in a row after a planner decision
//!   roll it back to the counts in effect before it, as decision
//!   `max(decision_id, acknowledged, last guard id) + 1`, conditional on
//!   the decision not having changed since it was read.
//! - A rollback is never rolled back; after a rollback (or advice) the
//!   guard holds off for `consecutive` intervals, which count towards no
//!   streak.
//! - Dynamo 1.6.1's planner keeps its `decision_id` in memory: after an
//!   outside write (a rollback) its next decision reuses an id the
//!   deployment has already acknowledged, and would be ignored. A planner
//!   write whose id is not above the highest acknowledged or guard-written
//!   id is re-issued under the next id with the same counts.
//! - Only the elected leader gets actions; the others follow the same
//!   state, so a new leader continues the streak where the old one was.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Intervals closed in one call at most; beyond that (the process was
/// stopped, the clock jumped) the rest are skipped as empty.
const MAX_CATCH_UP_INTERVALS: u32 = 64;

/// After a write etcd did not answer, the next attempt waits this long, so
/// a stream of load reports does not become a stream of failing writes.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// The guard's limits for one namespace.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub interval: Duration,
    pub kv_usage_threshold: f64,
    pub prefill_queue_threshold: u64,
    pub consecutive: u32,
    /// Sources (workers) remembered at once.
    pub max_sources: usize,
    /// How long a source's last report stands for it.
    pub report_ttl: Duration,
}

/// Worker counts of a scaling decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub prefill: u64,
    pub decode: u64,
}

/// Who wrote the decision in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Planner,
    /// A guard rollback: never rolled back itself.
    GuardRollback,
    /// A planner decision the guard re-issued under a new id.
    GuardReissue,
}

/// A decision as read from etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub id: u64,
    pub counts: Counts,
    /// mod_revision of the `decision_id` key: what a write compares.
    pub revision: i64,
    pub origin: Origin,
}

/// One read of the planner's keys (and the guard's marker).
#[derive(Debug, Clone, Default)]
pub struct PlannerState {
    /// Absent when the planner's keys are gone (its lease ended).
    pub decision: Option<Decision>,
    /// The deployment's `scaled_decision_id`.
    pub acknowledged: Option<u64>,
    /// `scaled_decision_id` as it was when `decision` was written (its
    /// mod_revision is older): an id the deployment had acknowledged by
    /// then is one it ignores. A later acknowledgement (of this very
    /// decision, read in the same go) does not count.
    pub acknowledged_before: Option<u64>,
    /// The id of the last decision the guard wrote, from its marker.
    pub guard_written: Option<u64>,
    /// The counts just before `decision`, from etcd's history (absent when
    /// compacted away: then the last decision the guard saw counts).
    pub previous: Option<Counts>,
}

/// One load report, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSample {
    /// The reporting worker (and dp rank); `None` when the report names
    /// none, and then each report counts as its own source.
    pub source: Option<String>,
    /// Fraction of the worker's KV cache in use.
    pub kv_usage: Option<f64>,
    pub prefill_queue: Option<u64>,
}

/// The fleet's load over one interval.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct IntervalLoad {
    /// The highest KV usage reported; `None` when no report carried one.
    pub kv_usage: Option<f64>,
    /// Each source's highest queue depth, summed.
    pub prefill_queue: Option<u64>,
    /// Reports received in the interval.
    pub reports: u64,
    /// Sources counted: those that reported, and those whose last report
    /// still stands.
    pub sources: u64,
}

/// Why an interval breached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreachReason {
    KvUsage,
    PrefillQueue,
}

impl BreachReason {
    /// The `reason` label of `holdfast_guard_breaches_total`.
    pub fn label(self) -> &'static str {
        match self {
            BreachReason::KvUsage => "kv_usage",
            BreachReason::PrefillQueue => "prefill_queue",
        }
    }
}

/// An interval that ended, and what the guard made of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedInterval {
    pub load: IntervalLoad,
    pub breaches: Vec<BreachReason>,
    /// Whether it fell in the hold-off after a rollback.
    pub held_off: bool,
    /// The breach streak after it.
    pub streak: u32,
}

/// A rollback to write (or, in advise mode, to publish).
#[derive(Debug, Clone, PartialEq)]
pub struct Rollback {
    /// The decision rolled back.
    pub from: Decision,
    pub to: Counts,
    pub new_id: u64,
    /// The breaching intervals that triggered it, oldest first.
    pub triggered_by: Vec<IntervalLoad>,
}

/// A planner decision to write again under a new id.
#[derive(Debug, Clone, PartialEq)]
pub struct Reissue {
    pub decision: Decision,
    pub new_id: u64,
}

/// What the shell should write.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Rollback(Rollback),
    Reissue(Reissue),
}

/// How an action ended, as the shell reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written to etcd; the watch will bring it back.
    Written,
    /// Published as advice (advise mode); nothing changes in etcd.
    Advised,
    /// The decision changed before the write: nothing written, no retry.
    Superseded,
    /// etcd did not answer: nothing known written; retried later.
    Failed,
}

/// What `poll` found.
#[derive(Debug, Default, PartialEq)]
pub struct Poll {
    pub closed: Vec<ClosedInterval>,
    pub action: Option<Action>,
}

/// A read-only picture for the status document.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardSnapshot {
    pub decision: Option<Decision>,
    pub previous: Option<Counts>,
    pub acknowledged: Option<u64>,
    pub streak: u32,
    pub hold_off_intervals: u32,
    pub last_interval: Option<IntervalLoad>,
    pub current_interval: IntervalLoad,
}

/// One named source's reports.
#[derive(Debug, Clone, Copy)]
struct Source {
    last_kv: Option<f64>,
    last_queue: Option<u64>,
    /// The highest values since the interval began, its last value
    /// included while that still stands.
    interval_kv: Option<f64>,
    interval_queue: Option<u64>,
    last_seen: Instant,
    reported_in_interval: bool,
}

fn max_of<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b > a { b } else { a }),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The reports of the interval under way. A named source's last report
/// stands for it until it reports again or `report_ttl` passes (Dynamo's
/// `kv_metrics` are published only when they change); reports that name
/// no source count in their interval only, each as its own source.
#[derive(Debug, Default)]
struct Accumulator {
    sources: HashMap<String, Source>,
    anonymous_kv: Option<f64>,
    anonymous_queue: Option<u64>,
    anonymous_reports: u64,
    reports: u64,
}

impl Accumulator {
    fn add(&mut self, now: Instant, sample: &LoadSample, max_sources: usize) -> bool {
        match &sample.source {
            Some(name) => {
                let room = self.sources.len() < max_sources;
                let source = match self.sources.get_mut(name) {
                    Some(source) => source,
                    None if !room => return false,
                    None => self.sources.entry(name.clone()).or_insert(Source {
                        last_kv: None,
                        last_queue: None,
                        interval_kv: None,
                        interval_queue: None,
                        last_seen: now,
                        reported_in_interval: true,
                    }),
                };
                // A report replaces what it carries; the other value stands.
                if sample.kv_usage.is_some() {
                    source.last_kv = sample.kv_usage;
                }
                if sample.prefill_queue.is_some() {
                    source.last_queue = sample.prefill_queue;
                }
                source.interval_kv = max_of(source.interval_kv, sample.kv_usage);
                source.interval_queue = max_of(source.interval_queue, sample.prefill_queue);
                source.last_seen = now;
                source.reported_in_interval = true;
            }
            None => {
                self.anonymous_kv = max_of(self.anonymous_kv, sample.kv_usage);
                if let Some(queue) = sample.prefill_queue {
                    self.anonymous_queue =
                        Some(self.anonymous_queue.unwrap_or(0).saturating_add(queue));
                }
                self.anonymous_reports += 1;
            }
        }
        self.reports += 1;
        true
    }

    /// The load so far, counting sources heard from within `report_ttl`
    /// of `now`.
    fn load(&self, now: Instant, report_ttl: Duration) -> IntervalLoad {
        let mut load = IntervalLoad {
            kv_usage: self.anonymous_kv,
            prefill_queue: self.anonymous_queue,
            reports: self.reports,
            sources: self.anonymous_reports,
        };
        for source in self.sources.values() {
            if !source.reported_in_interval
                && now.saturating_duration_since(source.last_seen) > report_ttl
            {
                continue;
            }
            load.sources += 1;
            load.kv_usage = max_of(load.kv_usage, source.interval_kv);
            if let Some(queue) = source.interval_queue {
                load.prefill_queue = Some(load.prefill_queue.unwrap_or(0).saturating_add(queue));
            }
        }
        load
    }

    /// Ends the interval at `now`: forgets sources silent for longer than
    /// `report_ttl`, carries the others' last values into the next.
    fn next_interval(&mut self, now: Instant, report_ttl: Duration) {
        self.sources
            .retain(|_, source| now.saturating_duration_since(source.last_seen) <= report_ttl);
        for source in self.sources.values_mut() {
            source.interval_kv = source.last_kv;
            source.interval_queue = source.last_queue;
            source.reported_in_interval = false;
        }
        self.anonymous_kv = None;
        self.anonymous_queue = None;
        self.anonymous_reports = 0;
        self.reports = 0;
    }
}

/// The guard's state for one namespace.
#[derive(Debug)]
pub struct NamespaceGuard {
    settings: GuardSettings,
    leader: bool,
    decision: Option<Decision>,
    /// Counts in effect before `decision`: what a rollback restores.
    previous: Option<Counts>,
    acknowledged: Option<u64>,
    /// The highest id the guard wrote (itself or, via the marker, a peer).
    guard_written: u64,
    /// Start of the interval under way; `None` until a decision is seen.
    interval_start: Option<Instant>,
    accumulator: Accumulator,
    last_interval: Option<IntervalLoad>,
    /// The breaching intervals in a row, newest last, at most `consecutive`.
    streak: VecDeque<IntervalLoad>,
    hold_off: u32,
    /// A decision to re-issue, once leader.
    reissue_due: Option<Reissue>,
    /// An action handed out and not yet reported back.
    in_flight: Option<Action>,
    /// A guard write reported written but not yet seen in etcd.
    awaiting: Option<u64>,
    /// Intervals closed by `on_load`, handed out by the next `poll`.
    pending_closed: Vec<ClosedInterval>,
    /// No action before this, after a failed write.
    retry_at: Option<Instant>,
}

impl NamespaceGuard {
    pub fn new(settings: GuardSettings) -> NamespaceGuard {
        NamespaceGuard {
            settings,
            leader: false,
            decision: None,
            previous: None,
            acknowledged: None,
            guard_written: 0,
            interval_start: None,
            accumulator: Accumulator::default(),
            last_interval: None,
            streak: VecDeque::new(),
            hold_off: 0,
            reissue_due: None,
            in_flight: None,
            awaiting: None,
            pending_closed: Vec::new(),
            retry_at: None,
        }
    }

    /// Whether this relay holds the namespace's election.
    pub fn set_leader(&mut self, leader: bool) {
        self.leader = leader;
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// A new read of etcd. `first` is the first read after (re)connecting:
    /// what happened before it is unknown, so nothing read then is
    /// re-issued.
    pub fn observe(&mut self, now: Instant, state: PlannerState, first: bool) {
        self.acknowledged = state.acknowledged.or(self.acknowledged);
        if let Some(written) = state.guard_written {
            self.guard_written = self.guard_written.max(written);
        }
        let Some(decision) = state.decision else {
            // The planner's keys are gone: nothing to judge until it writes.
            self.decision = None;
            self.previous = None;
            self.interval_start = None;
            self.streak.clear();
            self.reissue_due = None;
            return;
        };
        let known = self.decision;
        if known.is_some_and(|known| known.revision == decision.revision) {
            return;
        }
        if self.awaiting == Some(decision.id) {
            self.awaiting = None;
        }
        match decision.origin {
            Origin::GuardRollback => {
                // Peers learn of a rollback here; the writer already holds off.
                if self.hold_off == 0 {
                    self.hold_off = self.settings.consecutive;
                }
                self.previous = state.previous.or(known.map(|known| known.counts));
                self.start_decision(now, decision);
            }
            Origin::GuardReissue
                if known.is_some_and(|known| {
                    known.counts == decision.counts && known.origin == Origin::Planner
                }) =>
            {
                // The same planner decision under a new id: its streak and
                // intervals go on.
                self.decision = Some(Decision {
                    origin: Origin::Planner,
                    ..decision
                });
                self.reissue_due = None;
            }
            Origin::GuardReissue | Origin::Planner => {
                let stale_id = state
                    .acknowledged_before
                    .unwrap_or(0)
                    .max(self.guard_written);
                self.reissue_due = (decision.origin == Origin::Planner
                    && !first
                    && known.is_some()
                    && decision.id <= stale_id)
                    .then_some(Reissue {
                        decision,
                        new_id: stale_id + 1,
                    });
                // etcd's history knows the counts just before this write
                // even when the guard missed writes in between.
                self.previous = state.previous.or(known.map(|known| known.counts));
                self.start_decision(
                    now,
                    Decision {
                        origin: Origin::Planner,
                        ..decision
                    },
                );
            }
        }
    }

    fn start_decision(&mut self, now: Instant, decision: Decision) {
        self.decision = Some(decision);
        self.interval_start = Some(now);
        // Reports so far stand for their sources, as at an interval's start.
        self.accumulator
            .next_interval(now, self.settings.report_ttl);
        self.streak.clear();
    }

    /// Adds a load report to the interval under way. False when it was
    /// dropped because `max_sources` sources already reported.
    pub fn on_load(&mut self, now: Instant, sample: &LoadSample) -> bool {
        // Closes intervals that ended, so the sample lands in its own.
        let closed = self.close_intervals(now);
        self.pending_closed.extend(closed);
        let excess = self
            .pending_closed
            .len()
            .saturating_sub(MAX_CATCH_UP_INTERVALS as usize);
        self.pending_closed.drain(..excess);
        self.accumulator.add(now, sample, self.settings.max_sources)
    }

    /// When the interval under way ends, if one is.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.interval_start
            .map(|start| start + self.settings.interval)
    }

    /// Closes the intervals that ended by `now` and says what to do.
    pub fn poll(&mut self, now: Instant) -> Poll {
        let mut closed = std::mem::take(&mut self.pending_closed);
        closed.extend(self.close_intervals(now));
        Poll {
            closed,
            action: self.next_action(now),
        }
    }

    fn close_intervals(&mut self, now: Instant) -> Vec<ClosedInterval> {
        let mut closed = Vec::new();
        let Some(mut start) = self.interval_start else {
            return closed;
        };
        let interval = self.settings.interval;
        let mut rounds = 0;
        while start + interval <= now {
            start += interval;
            rounds += 1;
            if rounds > MAX_CATCH_UP_INTERVALS {
                // Skipped intervals had no reports: they break the streak.
                let behind = now.saturating_duration_since(start).as_nanos() / interval.as_nanos();
                start += interval * u32::try_from(behind).unwrap_or(u32::MAX);
                self.streak.clear();
                self.hold_off = 0;
                continue;
            }
            let load = self.accumulator.load(start, self.settings.report_ttl);
            self.accumulator
                .next_interval(start, self.settings.report_ttl);
            closed.push(self.judge(load));
        }
        self.interval_start = Some(start);
        closed
    }

    fn judge(&mut self, load: IntervalLoad) -> ClosedInterval {
        let mut breaches = Vec::new();
        if load
            .kv_usage
            .is_some_and(|usage| usage > self.settings.kv_usage_threshold)
        {
            breaches.push(BreachReason::KvUsage);
        }
        if load
            .prefill_queue
            .is_some_and(|depth| depth > self.settings.prefill_queue_threshold)
        {
            breaches.push(BreachReason::PrefillQueue);
        }
        let held_off = self.hold_off > 0;
        if held_off {
            self.hold_off -= 1;
            self.streak.clear();
        } else if breaches.is_empty() {
            self.streak.clear();
        } else {
            if self.streak.len() >= self.settings.consecutive as usize {
                self.streak.pop_front();
            }
            self.streak.push_back(load);
        }
        self.last_interval = Some(load);
        ClosedInterval {
            load,
            breaches,
            held_off,
            streak: self.streak.len() as u32,
        }
    }

    fn next_action(&mut self, now: Instant) -> Option<Action> {
        if !self.leader || self.in_flight.is_some() || self.awaiting.is_some() {
            return None;
        }
        if self.retry_at.is_some_and(|retry_at| now < retry_at) {
            return None;
        }
        let action = if let Some(reissue) = self.reissue_due.take() {
            Action::Reissue(reissue)
        } else {
            Action::Rollback(self.rollback_due()?)
        };
        self.in_flight = Some(action.clone());
        Some(action)
    }

    fn rollback_due(&self) -> Option<Rollback> {
        let decision = self.decision?;
        let to = self.previous?;
        let due = decision.origin == Origin::Planner
            && self.hold_off == 0
            && self.streak.len() >= self.settings.consecutive as usize
            && to != decision.counts;
        due.then(|| Rollback {
            from: decision,
            to,
            new_id: decision
                .id
                .max(self.acknowledged.unwrap_or(0))
                .max(self.guard_written)
                + 1,
            triggered_by: self.streak.iter().copied().collect(),
        })
    }

    /// The shell reports how the last action ended.
    pub fn finished(&mut self, now: Instant, outcome: Outcome) {
        let Some(action) = self.in_flight.take() else {
            return;
        };
        let new_id = match &action {
            Action::Rollback(rollback) => rollback.new_id,
            Action::Reissue(reissue) => reissue.new_id,
        };
        let rollback = matches!(action, Action::Rollback(_));
        match outcome {
            Outcome::Written => {
                self.guard_written = self.guard_written.max(new_id);
                self.awaiting = Some(new_id);
                if rollback {
                    self.hold_off = self.settings.consecutive;
                    self.streak.clear();
                }
            }
            Outcome::Advised => {
                self.hold_off = self.settings.consecutive;
                self.streak.clear();
            }
            Outcome::Superseded => {}
            // Tried again at the next poll: the write compares the
            // revision, so a decision changed meanwhile is not hit. A
            // rollback is retried while its streak lasts.
            Outcome::Failed => {
                self.retry_at = Some(now + RETRY_DELAY);
                if let Action::Reissue(reissue) = action {
                    self.reissue_due = Some(reissue);
                }
            }
        }
    }

    /// Whether etcd has shown a write the guard reported written. Cleared
    /// when the decision arrives; the shell clears it after a reconnect.
    pub fn forget_awaited(&mut self) {
        self.awaiting = None;
    }

    pub fn snapshot(&self, now: Instant) -> GuardSnapshot {
        GuardSnapshot {
            decision: self.decision,
            previous: self.previous,
            acknowledged: self.acknowledged,
            streak: self.streak.len() as u32,
            hold_off_intervals: self.hold_off,
            last_interval: self.last_interval,
            current_interval: self.accumulator.load(now, self.settings.report_ttl),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);

    fn settings() -> GuardSettings {
        GuardSettings {
            interval: INTERVAL,
            kv_usage_threshold: 0.95,
            prefill_queue_threshold: 100,
            consecutive: 3,
            max_sources: 8,
            report_ttl: Duration::from_secs(5),
        }
    }

    fn counts(prefill: u64, decode: u64) -> Counts {
        Counts { prefill, decode }
    }

    fn decision(id: u64, counts: Counts, revision: i64, origin: Origin) -> PlannerState {
        PlannerState {
            decision: Some(Decision {
                id,
                counts,
                revision,
                origin,
            }),
            ..PlannerState::default()
        }
    }

    fn kv(usage: f64) -> LoadSample {
        LoadSample {
            source: Some("w1".to_string()),
            kv_usage: Some(usage),
            prefill_queue: None,
        }
    }

    fn queue(source: &str, depth: u64) -> LoadSample {
        LoadSample {
            source: Some(source.to_string()),
            kv_usage: None,
            prefill_queue: Some(depth),
        }
    }

    /// A leader that saw decision 0 (1/1), then decision 1 (2/4) at `t0`.
    fn guard_after_scale_up(t0: Instant) -> NamespaceGuard {
        let mut guard = NamespaceGuard::new(settings());
        guard.set_leader(true);
        guard.observe(t0, decision(0, counts(1, 1), 10, Origin::Planner), true);
        guard.observe(t0, decision(1, counts(2, 4), 11, Origin::Planner), false);
        guard
    }

    /// Feeds one interval (from `start`) with `sample` and polls at its end.
    fn interval_with(guard: &mut NamespaceGuard, start: Instant, samples: &[LoadSample]) -> Poll {
        for sample in samples {
            assert!(guard.on_load(start + INTERVAL / 2, sample));
        }
        guard.poll(start + INTERVAL)
    }

    fn at(t0: Instant, intervals: u32) -> Instant {
        t0 + INTERVAL * intervals
    }

    #[test]
    fn thresholds_are_exceeded_not_reached() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        let poll = interval_with(&mut guard, t0, &[kv(0.95), queue("w1", 100)]);
        assert_eq!(poll.closed.len(), 1);
        assert!(poll.closed[0].breaches.is_empty(), "{poll:?}");
        let poll = interval_with(&mut guard, at(t0, 1), &[kv(0.951)]);
        assert_eq!(poll.closed[0].breaches, vec![BreachReason::KvUsage]);
        // Queue depth: each source's highest report, summed over sources.
        let poll = interval_with(
            &mut guard,
            at(t0, 2),
            &[
                queue("w3", 40),
                queue("w3", 60),
                queue("w4", 41),
                queue("w4", 3),
            ],
        );
        assert_eq!(poll.closed[0].load.prefill_queue, Some(101));
        assert_eq!(poll.closed[0].breaches, vec![BreachReason::PrefillQueue]);
    }

    #[test]
    fn exactly_consecutive_breaching_intervals_roll_back() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        for n in 0..2 {
            let poll = interval_with(&mut guard, at(t0, n), &[kv(0.99)]);
            assert_eq!(poll.closed[0].streak, n + 1);
            assert_eq!(poll.action, None, "interval {n}");
        }
        let poll = interval_with(&mut guard, at(t0, 2), &[kv(0.99), queue("w1", 150)]);
        let Some(Action::Rollback(rollback)) = poll.action else {
            panic!("no rollback: {poll:?}");
        };
        assert_eq!(rollback.to, counts(1, 1));
        assert_eq!(rollback.from.id, 1);
        assert_eq!(rollback.from.revision, 11);
        assert_eq!(rollback.new_id, 2);
        assert_eq!(rollback.triggered_by.len(), 3);
        assert_eq!(rollback.triggered_by[2].prefill_queue, Some(150));
    }

    #[test]
    fn an_interval_without_reports_breaks_the_streak() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        interval_with(&mut guard, at(t0, 0), &[kv(0.99)]);
        interval_with(&mut guard, at(t0, 1), &[kv(0.99)]);
        let poll = interval_with(&mut guard, at(t0, 2), &[]);
        assert_eq!(poll.closed[0].load.reports, 0);
        assert_eq!(poll.closed[0].streak, 0);
        interval_with(&mut guard, at(t0, 3), &[kv(0.99)]);
        let poll = interval_with(&mut guard, at(t0, 4), &[kv(0.99)]);
        assert_eq!(poll.action, None);
        let poll = interval_with(&mut guard, at(t0, 5), &[kv(0.99)]);
        assert!(matches!(poll.action, Some(Action::Rollback(_))));
    }

    #[test]
    fn a_late_poll_closes_every_interval_that_ended() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        guard.on_load(t0 + Duration::from_secs(1), &kv(0.99));
        let poll = guard.poll(at(t0, 3));
        assert_eq!(poll.closed.len(), 3);
        assert_eq!(poll.closed[2].streak, 0);
        assert_eq!(poll.action, None);
    }

    #[test]
    fn a_decision_superseded_mid_streak_starts_over_from_the_new_one() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        interval_with(&mut guard, at(t0, 0), &[kv(0.99)]);
        interval_with(&mut guard, at(t0, 1), &[kv(0.99)]);
        // The planner moves on to 3/6 halfway through the third interval.
        let t1 = at(t0, 2) + INTERVAL / 2;
        guard.observe(t1, decision(2, counts(3, 6), 12, Origin::Planner), false);
        assert_eq!(guard.snapshot(Instant::now()).streak, 0);
        for n in 0..2 {
            let poll = interval_with(&mut guard, at(t1, n), &[kv(0.99)]);
            assert_eq!(poll.action, None);
        }
        let poll = interval_with(&mut guard, at(t1, 2), &[kv(0.99)]);
        let Some(Action::Rollback(rollback)) = poll.action else {
            panic!("no rollback: {poll:?}");
        };
        assert_eq!(rollback.to, counts(2, 4), "back to the superseded decision");
        assert_eq!(rollback.new_id, 3);
    }

    /// Rolls back decision 1 and sees the rollback (id 2) come back from
    /// etcd, acknowledged; returns when that happened.
    fn rolled_back(guard: &mut NamespaceGuard, t0: Instant) -> Instant {
        for n in 0..3 {
            interval_with(guard, at(t0, n), &[kv(0.99)]);
        }
        guard.finished(t0, Outcome::Written);
        let t1 = at(t0, 3) + Duration::from_millis(5);
        let mut state = decision(2, counts(1, 1), 13, Origin::GuardRollback);
        state.guard_written = Some(2);
        state.acknowledged = Some(2);
        guard.observe(t1, state, false);
        t1
    }

    #[test]
    fn a_rollback_is_never_rolled_back() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        let t1 = rolled_back(&mut guard, t0);
        for n in 0..12 {
            let poll = interval_with(&mut guard, at(t1, n), &[kv(1.0)]);
            assert_eq!(poll.action, None, "interval {n}");
        }
    }

    #[test]
    fn after_a_rollback_the_guard_holds_off_for_consecutive_intervals() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        let t1 = rolled_back(&mut guard, t0);
        assert_eq!(guard.snapshot(Instant::now()).hold_off_intervals, 3);
        // The planner scales up again at once (its id is 3: it had seen
        // none of the guard's writes, and 2 is taken... see the re-issue
        // test for the reused-id case).
        let mut state = decision(3, counts(4, 4), 14, Origin::Planner);
        state.acknowledged = Some(2);
        guard.observe(t1, state, false);
        for n in 0..3 {
            let poll = interval_with(&mut guard, at(t1, n), &[kv(0.99)]);
            assert!(poll.closed[0].held_off, "interval {n}");
            assert_eq!(poll.closed[0].breaches, vec![BreachReason::KvUsage]);
            assert_eq!(poll.action, None, "interval {n}");
        }
        for n in 3..5 {
            let poll = interval_with(&mut guard, at(t1, n), &[kv(0.99)]);
            assert!(!poll.closed[0].held_off);
            assert_eq!(poll.action, None, "interval {n}");
        }
        let poll = interval_with(&mut guard, at(t1, 5), &[kv(0.99)]);
        let Some(Action::Rollback(rollback)) = poll.action else {
            panic!("no rollback: {poll:?}");
        };
        assert_eq!(rollback.to, counts(1, 1));
        assert_eq!(rollback.new_id, 4);
    }

    #[test]
    fn a_planner_decision_under_an_acknowledged_id_is_reissued_under_the_next() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        let t1 = rolled_back(&mut guard, t0);
        // Dynamo's coordinator still counts from 1: its next decision is 2
        // again, which the deployment has acknowledged already.
        let mut state = decision(2, counts(5, 5), 15, Origin::Planner);
        state.acknowledged = Some(2);
        state.acknowledged_before = Some(2);
        guard.observe(t1, state, false);
        let poll = guard.poll(t1);
        let Some(Action::Reissue(reissue)) = poll.action else {
            panic!("no re-issue: {poll:?}");
        };
        assert_eq!(reissue.new_id, 3);
        assert_eq!(reissue.decision.counts, counts(5, 5));
        assert_eq!(reissue.decision.revision, 15);
        guard.finished(t0, Outcome::Written);
        // The re-issue comes back: the same decision, its intervals go on.
        let t2 = t1 + Duration::from_secs(1);
        let mut state = decision(3, counts(5, 5), 16, Origin::GuardReissue);
        state.guard_written = Some(3);
        guard.observe(t2, state, false);
        let snapshot = guard.snapshot(Instant::now());
        assert_eq!(snapshot.decision.map(|decision| decision.id), Some(3));
        assert_eq!(snapshot.previous, Some(counts(1, 1)));
        assert_eq!(guard.next_deadline(), Some(t1 + INTERVAL));
        // Its next decision is 3, taken by the re-issue: re-issued as 4.
        let t3 = t2 + Duration::from_secs(1);
        let mut state = decision(3, counts(6, 6), 17, Origin::Planner);
        state.acknowledged = Some(3);
        state.acknowledged_before = Some(3);
        guard.observe(t3, state, false);
        let Some(Action::Reissue(reissue)) = guard.poll(t3).action else {
            panic!("no second re-issue");
        };
        assert_eq!(reissue.new_id, 4);
    }

    #[test]
    fn a_decision_acknowledged_before_the_guard_read_it_is_not_reissued() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        // Decision 2 was written, then acknowledged, then read.
        let mut state = decision(2, counts(5, 5), 12, Origin::Planner);
        state.acknowledged = Some(2);
        state.acknowledged_before = Some(1);
        guard.observe(t0, state, false);
        assert_eq!(guard.poll(t0).action, None);
    }

    #[test]
    fn nothing_seen_at_start_is_reissued() {
        let t0 = Instant::now();
        let mut guard = NamespaceGuard::new(settings());
        guard.set_leader(true);
        let mut state = decision(2, counts(5, 5), 15, Origin::Planner);
        state.acknowledged = Some(2);
        state.previous = Some(counts(1, 1));
        guard.observe(t0, state, true);
        assert_eq!(guard.poll(t0).action, None);
        assert_eq!(guard.snapshot(Instant::now()).previous, Some(counts(1, 1)));
    }

    #[test]
    fn only_the_leader_acts_and_a_new_leader_continues_the_streak() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        guard.set_leader(false);
        for n in 0..4 {
            let poll = interval_with(&mut guard, at(t0, n), &[kv(0.99)]);
            assert_eq!(poll.action, None);
        }
        guard.set_leader(true);
        let poll = guard.poll(at(t0, 4));
        assert!(matches!(poll.action, Some(Action::Rollback(_))), "{poll:?}");
    }

    #[test]
    fn a_rollback_the_planner_beat_is_dropped_without_a_hold_off() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        for n in 0..3 {
            interval_with(&mut guard, at(t0, n), &[kv(0.99)]);
        }
        guard.finished(t0, Outcome::Superseded);
        assert_eq!(guard.snapshot(Instant::now()).hold_off_intervals, 0);
        let t1 = at(t0, 3);
        guard.observe(t1, decision(2, counts(8, 8), 12, Origin::Planner), false);
        for n in 0..2 {
            assert_eq!(
                interval_with(&mut guard, at(t1, n), &[kv(0.99)]).action,
                None
            );
        }
        let poll = interval_with(&mut guard, at(t1, 2), &[kv(0.99)]);
        let Some(Action::Rollback(rollback)) = poll.action else {
            panic!("no rollback");
        };
        assert_eq!(rollback.to, counts(2, 4));
    }

    #[test]
    fn a_failed_write_is_tried_again_and_nothing_runs_twice_at_once() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        for n in 0..3 {
            interval_with(&mut guard, at(t0, n), &[kv(0.99)]);
        }
        // In flight: no second action until it is reported.
        let poll = interval_with(&mut guard, at(t0, 3), &[kv(0.99)]);
        assert_eq!(poll.action, None);
        let failed_at = at(t0, 4);
        guard.finished(failed_at, Outcome::Failed);
        // Not again at once (a report arriving right after), but a second later.
        assert!(guard.on_load(failed_at, &kv(0.99)));
        assert_eq!(guard.poll(failed_at).action, None);
        let poll = guard.poll(failed_at + RETRY_DELAY);
        assert!(matches!(poll.action, Some(Action::Rollback(_))), "{poll:?}");
    }

    #[test]
    fn advice_holds_off_and_leaves_the_decision() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        for n in 0..3 {
            interval_with(&mut guard, at(t0, n), &[kv(0.99)]);
        }
        guard.finished(t0, Outcome::Advised);
        for n in 3..8 {
            assert_eq!(
                interval_with(&mut guard, at(t0, n), &[kv(0.99)]).action,
                None
            );
        }
        let poll = interval_with(&mut guard, at(t0, 8), &[kv(0.99)]);
        assert!(matches!(poll.action, Some(Action::Rollback(_))));
    }

    #[test]
    fn reports_from_too_many_sources_are_dropped() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        for n in 0..8 {
            assert!(guard.on_load(t0, &queue(&format!("w{n}"), 1)));
        }
        assert!(!guard.on_load(t0, &queue("w8", 1)));
        assert!(guard.on_load(t0, &queue("w7", 5)));
        assert_eq!(
            guard
                .snapshot(Instant::now())
                .current_interval
                .prefill_queue,
            Some(12)
        );
    }

    #[test]
    fn the_planners_keys_vanishing_stops_the_judging() {
        let t0 = Instant::now();
        let mut guard = guard_after_scale_up(t0);
        interval_with(&mut guard, at(t0, 0), &[kv(0.99)]);
        guard.observe(at(t0, 1), PlannerState::default(), false);
        assert_eq!(guard.next_deadline(), None);
        let poll = guard.poll(at(t0, 9));
        assert!(poll.closed.is_empty());
        assert_eq!(poll.action, None);
    }

    #[test]
    fn a_sources_last_report_stands_until_report_ttl_passes() {
        let t0 = Instant::now();
        let mut guard = NamespaceGuard::new(GuardSettings {
            report_ttl: Duration::from_secs(25),
            ..settings()
        });
        guard.set_leader(true);
        guard.observe(t0, decision(0, counts(1, 1), 10, Origin::Planner), true);
        guard.observe(t0, decision(1, counts(2, 4), 11, Origin::Planner), false);
        guard.on_load(t0 + Duration::from_secs(1), &kv(0.99));
        let poll = guard.poll(at(t0, 3));
        let streaks: Vec<_> = poll.closed.iter().map(|closed| closed.streak).collect();
        assert_eq!(streaks, vec![1, 2, 0]);
        assert_eq!(poll.closed[1].load.reports, 0);
        assert_eq!(poll.closed[1].load.sources, 1);
        assert_eq!(poll.closed[2].load.sources, 0);
    }

    #[test]
    fn writes_the_guard_missed_are_filled_in_from_etcds_history() {
        let t0 = Instant::now();
        let mut guard = NamespaceGuard::new(settings());
        guard.set_leader(true);
        guard.observe(t0, PlannerState::default(), true);
        // Decisions 0 (1/1) and 1 (3/3) landed before the guard's read.
        let mut state = decision(1, counts(3, 3), 11, Origin::Planner);
        state.previous = Some(counts(1, 1));
        guard.observe(t0, state, false);
        for n in 0..2 {
            interval_with(&mut guard, at(t0, n), &[kv(0.99)]);
        }
        let poll = interval_with(&mut guard, at(t0, 2), &[kv(0.99)]);
        let Some(Action::Rollback(rollback)) = poll.action else {
            panic!("no rollback: {poll:?}");
        };
        assert_eq!(rollback.to, counts(1, 1));
    }
}
