//! One actor per namespace: an election through an etcd lease.
//!
//! Each candidate keeps a lease of `guard.lease_ttl` alive and, every
//! quarter TTL, tries to create `holdfast/guard/{ns}/leader` under it
//! (a transaction that succeeds only while the key does not exist). The
//! key's create_revision identifies the term: the guard's writes compare
//! it, so a relay that lost the lease without noticing writes nothing. A
//! dead leader's lease expires within one TTL, its key goes with it, and
//! the next candidate's attempt (at most a quarter TTL later) wins.

use etcd_client::{
    Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use std::time::{Duration, Instant};

/// A bound on each etcd call of a round.
const CALL_LIMIT: Duration = Duration::from_secs(2);

/// This relay's candidacy for one namespace.
pub struct Candidate {
    key: String,
    relay_id: String,
    ttl: Duration,
    lease: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
    /// The election key's create_revision while this relay leads.
    leading: Option<i64>,
    /// When etcd last confirmed the lease alive.
    confirmed_at: Option<Instant>,
    /// Who leads, as last read.
    pub leader_relay: Option<String>,
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the lease expired")]
    LeaseLost,
}

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ElectionError> {
    tokio::time::timeout(CALL_LIMIT, call)
        .await
        .map_err(|_| ElectionError::Timeout(CALL_LIMIT))?
        .map_err(ElectionError::from)
}

impl Candidate {
    pub fn new(key: String, relay_id: String, ttl: Duration) -> Candidate {
        Candidate {
            key,
            relay_id,
            ttl,
            lease: None,
            leading: None,
            confirmed_at: None,
            leader_relay: None,
        }
    }

    /// How often `round` should run.
    pub fn period(&self) -> Duration {
        self.ttl / 4
    }

    /// The term while this relay leads and its lease is known alive.
    pub fn term(&self, now: Instant) -> Option<i64> {
        let alive = self
            .confirmed_at
            .is_some_and(|confirmed| now.saturating_duration_since(confirmed) < self.ttl);
        self.leading.filter(|_| alive)
    }

    /// etcd is unreachable: this relay cannot know it leads.
    pub fn lost_etcd(&mut self) {
        self.lease = None;
        self.leading = None;
        self.confirmed_at = None;
    }

    /// Keeps the lease alive and tries to lead.
    pub async fn round(&mut self, client: &mut Client, now: Instant) -> Result<(), ElectionError> {
        let result = self.try_round(client, now).await;
        if result.is_err() {
            self.lost_etcd();
        }
        result
    }

    async fn try_round(&mut self, client: &mut Client, now: Instant) -> Result<(), ElectionError> {
        match &mut self.lease {
            Some((_, keeper, stream)) => {
                bounded(keeper.keep_alive()).await?;
                let answer = bounded(stream.message()).await?;
                if answer.is_none_or(|answer| answer.ttl() <= 0) {
                    return Err(ElectionError::LeaseLost);
                }
            }
            None => {
                let seconds = i64::try_from(self.ttl.as_secs().max(2)).unwrap_or(10);
                let granted = bounded(client.lease_grant(seconds, None)).await?;
                let (keeper, stream) = bounded(client.lease_keep_alive(granted.id())).await?;
                self.lease = Some((granted.id(), keeper, stream));
            }
        }
        self.confirmed_at = Some(now);
        let Some((lease, _, _)) = &self.lease else {
            return Err(ElectionError::LeaseLost);
        };
        let lease = *lease;
        let response = bounded(
            client.txn(
                Txn::new()
                    .when([Compare::create_revision(
                        self.key.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(
                        self.key.as_str(),
                        self.relay_id.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(self.key.as_str(), None)]),
            ),
        )
        .await?;
        if response.succeeded() {
            self.leading = response.header().map(|header| header.revision());
            self.leader_relay = Some(self.relay_id.clone());
            return Ok(());
        }
        self.leading = None;
        self.leader_relay = None;
        for op in response.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                if let Some(kv) = get.kvs().first() {
                    self.leader_relay = kv.value_str().ok().map(str::to_string);
                    if kv.lease() == lease {
                        self.leading = Some(kv.create_revision());
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives the election up at once (a clean stop), so a peer takes over
    /// without waiting for the TTL.
    pub async fn resign(&mut self, client: &mut Client) {
        if let Some((lease, _, _)) = self.lease.take() {
            let _ = bounded(client.lease_revoke(lease)).await;
        }
        self.leading = None;
    }
}
