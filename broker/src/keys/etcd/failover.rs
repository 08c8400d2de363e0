//! Which etcd member the relay talks to, and whether etcd is up, decided
//! from rounds of probes (sans-IO: the caller probes and passes the time).
//!
//! One dead member of a healthy cluster is not an outage. The relay uses
//! one member at a time and probes only it while it serves; the moment it
//! stops serving, the next round probes every member and moves to one that
//! serves. The link goes down only when no member can serve:
//! - at once when every member refuses connections (etcd is not there);
//! - otherwise when no member has served for `link_timeout` since the
//!   first round that found none, which rides out a leader election
//!   (members answer "no leader" for a second or two) and catches a
//!   cluster that lost quorum or a stopped process.
//!
//! While no member serves, the relay still points its calls at a member
//! that accepts connections, so they succeed as soon as a leader is back.

use holdfast_wire::LinkStatus;
use std::time::{Duration, Instant};

/// What a probe's answer says about the etcd that gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerView {
    pub cluster_id: u64,
    pub raft_term: u64,
    pub revision: i64,
}

/// How `next` differs from an earlier answer of the same cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// A different cluster, or one that lost its data: what was built on
    /// the old one (leases, watches) must be checked again.
    History(String),
    /// A new leader was elected; nothing was lost.
    Leader { from: u64, to: u64 },
}

impl ServerView {
    /// How `next` differs from `self`, if it does.
    pub fn changed_to(&self, next: &ServerView) -> Option<ViewChange> {
        if next.cluster_id != self.cluster_id {
            return Some(ViewChange::History(format!(
                "cluster id {:x} became {:x}",
                self.cluster_id, next.cluster_id
            )));
        }
        if next.revision < self.revision {
            return Some(ViewChange::History(format!(
                "revision went back from {} to {}",
                self.revision, next.revision
            )));
        }
        if next.raft_term != self.raft_term {
            return Some(ViewChange::Leader {
                from: self.raft_term,
                to: next.raft_term,
            });
        }
        None
    }
}

/// One member's answer to a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberAnswer {
    /// It answered a linearizable read: it serves. No view when the
    /// relay's etcd user may not read the probe key: etcd checks that
    /// permission only after the read reached a quorum, so the refusal
    /// proves the member serves too.
    Served(Option<ServerView>),
    /// It accepts connections but did not serve: no leader, too slow,
    /// credentials refused.
    NotServing(String),
    /// It does not accept connections.
    Unreachable(String),
}

/// A member's health as of its last probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Unknown,
    Serving,
    NotServing,
    Unreachable,
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Serving => "serving",
            Health::NotServing => "not_serving",
            Health::Unreachable => "unreachable",
        }
    }

    /// Which member to prefer when none serves: a reachable one.
    fn rank(self) -> u8 {
        match self {
            Health::Serving => 3,
            Health::NotServing => 2,
            Health::Unknown => 1,
            Health::Unreachable => 0,
        }
    }
}

/// What one round changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundOutcome {
    /// The link's new status, if it changed.
    pub status: Option<LinkStatus>,
    /// The member calls go to now, if it changed (`None` inside: none).
    pub switched_to: Option<Option<usize>>,
    /// The view of the member that served, if one did.
    pub served: Option<ServerView>,
}

/// The members' health and the link's status.
#[derive(Debug)]
pub struct Failover {
    health: Vec<Health>,
    errors: Vec<Option<String>>,
    current: Option<usize>,
    status: LinkStatus,
    /// When the rounds started finding no member that serves; `None` while
    /// one does.
    failing_since: Option<Instant>,
    link_timeout: Duration,
}

impl Failover {
    /// `members` endpoints, none probed yet; the link is `Unknown`.
    pub fn new(members: usize, link_timeout: Duration) -> Failover {
        Failover {
            health: vec![Health::Unknown; members],
            errors: vec![None; members],
            current: None,
            status: LinkStatus::Unknown,
            failing_since: None,
            link_timeout,
        }
    }

    pub fn status(&self) -> LinkStatus {
        self.status
    }

    /// The member calls go to, if any.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    pub fn health(&self, member: usize) -> Health {
        self.health.get(member).copied().unwrap_or(Health::Unknown)
    }

    /// Why `member`'s last probe failed, if it did.
    pub fn error(&self, member: usize) -> Option<&str> {
        self.errors.get(member).and_then(|error| error.as_deref())
    }

    /// Whether the next round should probe every member: the one in use
    /// does not serve (or there is none).
    pub fn wants_sweep(&self) -> bool {
        self.current
            .is_none_or(|current| self.health(current) != Health::Serving)
    }

    /// The members the next round probes.
    pub fn round_members(&self) -> Vec<usize> {
        match self.current {
            Some(current) if !self.wants_sweep() => vec![current],
            _ => (0..self.health.len()).collect(),
        }
    }

    /// Takes the answers of a round that started at `started` (members in
    /// the order the caller prefers them, e.g. as configured) at `now`. A
    /// failure counts from when its round started: a probe that timed out
    /// says the member was silent since it was sent.
    pub fn on_round(
        &mut self,
        answers: Vec<(usize, MemberAnswer)>,
        started: Instant,
        now: Instant,
    ) -> RoundOutcome {
        let swept_all = answers.len() == self.health.len();
        let mut outcome = RoundOutcome::default();
        let mut first_serving = None;
        let mut probed = Vec::with_capacity(answers.len());
        for (member, answer) in answers {
            if member >= self.health.len() {
                continue;
            }
            probed.push(member);
            let (health, error) = match answer {
                MemberAnswer::Served(view) => {
                    if first_serving.is_none() || Some(member) == self.current {
                        first_serving = Some(member);
                        outcome.served = view;
                    }
                    (Health::Serving, None)
                }
                MemberAnswer::NotServing(error) => (Health::NotServing, Some(error)),
                MemberAnswer::Unreachable(error) => (Health::Unreachable, Some(error)),
            };
            self.health[member] = health;
            self.errors[member] = error;
        }
        let previous = self.current;
        if let Some(serving) = first_serving {
            self.failing_since = None;
            self.current = Some(serving);
            outcome.status = self.set(LinkStatus::Up);
        } else {
            // Keep calls on the best member this round found: one that at
            // least accepts connections answers as soon as it has a leader.
            // (Members not probed now are judged by the next sweep, not by
            // an old answer.)
            let best = probed.iter().copied().max_by_key(|member| {
                (
                    self.health[*member].rank(),
                    // Ties: stay where we are, then the earlier member.
                    Some(*member) == self.current,
                    std::cmp::Reverse(*member),
                )
            });
            if let Some(best) = best {
                let current_rank = self
                    .current
                    .map_or(0, |current| self.health[current].rank());
                if self.health[best].rank() > current_rank {
                    self.current = Some(best);
                }
            }
            let all_refuse = swept_all
                && self
                    .health
                    .iter()
                    .all(|health| *health == Health::Unreachable);
            let since = *self.failing_since.get_or_insert(started);
            if all_refuse || now.saturating_duration_since(since) >= self.link_timeout {
                outcome.status = self.set(LinkStatus::Down);
            }
        }
        if self.status == LinkStatus::Down {
            self.current = None;
        }
        if self.current != previous {
            outcome.switched_to = Some(self.current);
        }
        outcome
    }

    fn set(&mut self, status: LinkStatus) -> Option<LinkStatus> {
        if self.status == status {
            return None;
        }
        self.status = status;
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(3);

    fn view(raft_term: u64, revision: i64) -> ServerView {
        ServerView {
            cluster_id: 7,
            raft_term,
            revision,
        }
    }

    fn served() -> MemberAnswer {
        MemberAnswer::Served(Some(view(2, 10)))
    }

    fn no_leader() -> MemberAnswer {
        MemberAnswer::NotServing("etcdserver: no leader".to_string())
    }

    fn refused() -> MemberAnswer {
        MemberAnswer::Unreachable("connection refused".to_string())
    }

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn the_first_serving_member_is_used_and_only_it_is_probed() {
        let start = Instant::now();
        let mut failover = Failover::new(3, TIMEOUT);
        assert_eq!(failover.round_members(), vec![0, 1, 2]);
        let outcome = failover.on_round(
            vec![(0, refused()), (1, served()), (2, served())],
            start,
            start,
        );
        assert_eq!(outcome.status, Some(LinkStatus::Up));
        assert_eq!(outcome.switched_to, Some(Some(1)));
        assert_eq!(failover.round_members(), vec![1]);
        assert_eq!(failover.health(1), Health::Serving);
        assert_eq!(failover.health(0), Health::Unreachable);
        assert_eq!(failover.error(0), Some("connection refused"));
    }

    #[test]
    fn a_dead_member_in_use_is_left_at_once_without_an_outage() {
        let start = Instant::now();
        let mut failover = Failover::new(3, TIMEOUT);
        failover.on_round(
            vec![(0, served()), (1, served()), (2, served())],
            start,
            start,
        );
        assert_eq!(failover.current(), Some(0));
        // The member in use dies: its probe is refused.
        let outcome = failover.on_round(vec![(0, refused())], at(start, 250), at(start, 250));
        assert_eq!(outcome.status, None, "one member down is not an outage");
        assert!(failover.wants_sweep());
        assert_eq!(failover.round_members(), vec![0, 1, 2]);
        let outcome = failover.on_round(
            vec![(0, refused()), (1, served()), (2, served())],
            at(start, 260),
            at(start, 260),
        );
        assert_eq!(outcome.status, None);
        assert_eq!(outcome.switched_to, Some(Some(1)));
        assert_eq!(failover.status(), LinkStatus::Up);
    }

    #[test]
    fn a_leader_election_within_link_timeout_is_ridden_out_on_a_reachable_member() {
        let start = Instant::now();
        let mut failover = Failover::new(3, TIMEOUT);
        failover.on_round(vec![(0, served())], start, start);
        // The leader (member 0) is killed; the others have no leader yet.
        let outcome = failover.on_round(
            vec![(0, refused()), (1, no_leader()), (2, no_leader())],
            at(start, 500),
            at(start, 500),
        );
        assert_eq!(outcome.status, None);
        assert_eq!(
            outcome.switched_to,
            Some(Some(1)),
            "calls move to a member that accepts connections"
        );
        let outcome = failover.on_round(
            vec![(0, refused()), (1, no_leader()), (2, no_leader())],
            at(start, 2900),
            at(start, 2900),
        );
        assert_eq!(outcome.status, None);
        let outcome = failover.on_round(
            vec![(0, refused()), (1, served()), (2, served())],
            at(start, 2950),
            at(start, 2950),
        );
        assert_eq!(outcome.status, None, "never went down");
        assert_eq!(outcome.switched_to, None, "already on member 1");
        assert_eq!(failover.round_members(), vec![1]);
    }

    #[test]
    fn no_member_serving_for_link_timeout_is_an_outage() {
        let start = Instant::now();
        let mut failover = Failover::new(3, TIMEOUT);
        failover.on_round(vec![(0, served())], start, start);
        // Quorum lost: the survivors accept connections but never serve.
        let survivors = || vec![(0, refused()), (1, no_leader()), (2, refused())];
        assert_eq!(
            failover
                .on_round(survivors(), at(start, 1000), at(start, 1000))
                .status,
            None
        );
        assert_eq!(
            failover
                .on_round(survivors(), at(start, 3999), at(start, 3999))
                .status,
            None
        );
        let outcome = failover.on_round(survivors(), at(start, 4000), at(start, 4000));
        assert_eq!(outcome.status, Some(LinkStatus::Down));
        assert_eq!(outcome.switched_to, Some(None));
        assert_eq!(failover.current(), None);
        // Quorum back: up again on the first member that serves.
        let outcome = failover.on_round(
            vec![(0, refused()), (1, served()), (2, served())],
            at(start, 9000),
            at(start, 9000),
        );
        assert_eq!(outcome.status, Some(LinkStatus::Up));
        assert_eq!(outcome.switched_to, Some(Some(1)));
    }

    #[test]
    fn every_member_refusing_connections_is_an_outage_at_once() {
        let start = Instant::now();
        let mut failover = Failover::new(2, TIMEOUT);
        failover.on_round(vec![(0, served())], start, start);
        assert_eq!(
            failover
                .on_round(vec![(0, refused())], at(start, 250), at(start, 250))
                .status,
            None
        );
        let outcome = failover.on_round(
            vec![(0, refused()), (1, refused())],
            at(start, 260),
            at(start, 260),
        );
        assert_eq!(outcome.status, Some(LinkStatus::Down));
        // A single etcd that is not running at start: down after one round.
        let mut single = Failover::new(1, TIMEOUT);
        assert_eq!(
            single.on_round(vec![(0, refused())], start, start).status,
            Some(LinkStatus::Down)
        );
    }

    #[test]
    fn the_timeout_counts_from_the_first_round_that_found_no_server() {
        let start = Instant::now();
        let mut failover = Failover::new(1, TIMEOUT);
        failover.on_round(vec![(0, served())], start, start);
        // A long probe interval: the first failure comes much later, and
        // is not an outage by itself.
        let stalled = || {
            vec![(
                0,
                MemberAnswer::NotServing("no answer within 500 ms".into()),
            )]
        };
        assert_eq!(
            failover
                .on_round(stalled(), at(start, 10_000), at(start, 10_000))
                .status,
            None
        );
        assert_eq!(
            failover
                .on_round(stalled(), at(start, 12_999), at(start, 12_999))
                .status,
            None
        );
        assert_eq!(
            failover
                .on_round(stalled(), at(start, 13_000), at(start, 13_000))
                .status,
            Some(LinkStatus::Down)
        );
    }

    #[test]
    fn a_silent_member_is_counted_down_from_when_its_probe_was_sent() {
        let start = Instant::now();
        let mut failover = Failover::new(1, TIMEOUT);
        failover.on_round(vec![(0, served())], start, start);
        let stalled = || {
            vec![(
                0,
                MemberAnswer::NotServing("no answer within 500 ms".into()),
            )]
        };
        // Sent at 250 ms, timed out at 750 ms.
        let outcome = failover.on_round(stalled(), at(start, 250), at(start, 750));
        assert_eq!(outcome.status, None);
        let outcome = failover.on_round(stalled(), at(start, 2_750), at(start, 3_250));
        assert_eq!(
            outcome.status,
            Some(LinkStatus::Down),
            "3 s after the first silent probe was sent"
        );
    }

    #[test]
    fn the_member_in_use_is_kept_while_it_serves() {
        let start = Instant::now();
        let mut failover = Failover::new(3, TIMEOUT);
        failover.on_round(
            vec![(0, refused()), (1, refused()), (2, served())],
            start,
            start,
        );
        assert_eq!(failover.current(), Some(2));
        // Member 0 comes back: no reason to move.
        let outcome = failover.on_round(vec![(2, served())], at(start, 250), at(start, 250));
        assert_eq!(outcome.switched_to, None);
        let outcome = failover.on_round(
            vec![(0, served()), (1, served()), (2, served())],
            at(start, 500),
            at(start, 500),
        );
        assert_eq!(outcome.switched_to, None, "prefers the member in use");
        assert_eq!(failover.current(), Some(2));
    }

    #[test]
    fn history_changes_and_leader_changes_are_told_apart() {
        let before = view(3, 100);
        assert_eq!(
            before.changed_to(&view(3, 150)),
            None,
            "writes are not a change"
        );
        assert_eq!(
            before.changed_to(&view(4, 150)),
            Some(ViewChange::Leader { from: 3, to: 4 })
        );
        assert!(matches!(
            before.changed_to(&view(4, 1)),
            Some(ViewChange::History(_))
        ));
        let other = ServerView {
            cluster_id: 8,
            ..before
        };
        assert!(matches!(
            before.changed_to(&other),
            Some(ViewChange::History(_))
        ));
    }
}
