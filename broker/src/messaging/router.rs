//! The router: the one task that owns the subscription table.
//!
//! Sessions ask it (over a bounded channel) to subscribe, unsubscribe, and,
//! while NATS is down, to deliver publishes and requests node-locally. It
//! starts and stops one [`Fanout`] task per upstream subscription. Nothing on
//! the per-message path from NATS goes through here: upstream messages flow
//! straight from a fan-out task to the sessions' outboxes.

use crate::messaging::fanout::{Fanout, FanoutCommand};
use crate::messaging::local_message::LocalMessage;
use crate::messaging::nats::link::NatsLink;
use crate::messaging::subscription_table::{
    Joined, Left, MemberId, SubscriptionKey, SubscriptionTable,
};
use crate::ops::stats::{bump, RelayStats};
use crate::session::outbox::Outbox;
use crate::util::sparse_map::shrink_if_sparse;
use bytes::Bytes;
use holdfast_wire::{ErrorCode, Headers, Text};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

/// Capacity of a fan-out task's command channel.
const FANOUT_COMMANDS: usize = 1024;

/// A refusal, as a code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// An answer to a request served on this relay.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub headers: Headers,
    pub payload: Bytes,
}

/// Counts for the status document.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouterStats {
    pub local_subscriptions: usize,
    pub upstream_subscriptions: usize,
    pub pending_local_requests: usize,
}

enum Command {
    Subscribe {
        member: MemberId,
        key: SubscriptionKey,
        outbox: Outbox,
        done: oneshot::Sender<Result<(), Refusal>>,
    },
    Unsubscribe {
        member: MemberId,
    },
    RemoveSession {
        session: u64,
        done: oneshot::Sender<()>,
    },
    DeliverLocal {
        message: LocalMessage,
        done: oneshot::Sender<u32>,
    },
    RequestLocal {
        message: LocalMessage,
        timeout: Duration,
        reply: oneshot::Sender<Result<LocalReply, ErrorCode>>,
    },
    ReplyLocal {
        message: LocalMessage,
    },
    Stats {
        done: oneshot::Sender<RouterStats>,
    },
}

/// A cheap handle sessions use to talk to the router.
#[derive(Clone)]
pub struct RouterHandle {
    commands: mpsc::Sender<Command>,
    local_inbox_prefix: Arc<str>,
    /// Local subscriptions, kept by the router task: a publish during an
    /// outage asks the router to deliver locally only when there are any,
    /// instead of a round trip to the router task per message.
    local_subscriptions: Arc<AtomicUsize>,
}

fn router_gone() -> Refusal {
    Refusal {
        code: ErrorCode::ShuttingDown,
        message: "relay is shutting down".to_string(),
    }
}

impl RouterHandle {
    /// Subject prefix of inboxes for requests this relay serves locally;
    /// a publish to one of them is a local reply.
    pub fn local_inbox_prefix(&self) -> &str {
        &self.local_inbox_prefix
    }

    /// Adds a subscription; returns once the upstream subscription is
    /// handed to NATS, so a following PING barrier covers it.
    pub async fn subscribe(
        &self,
        member: MemberId,
        key: SubscriptionKey,
        outbox: Outbox,
    ) -> Result<(), Refusal> {
        let (done, answer) = oneshot::channel();
        let command = Command::Subscribe {
            member,
            key,
            outbox,
            done,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| router_gone())?;
        answer.await.map_err(|_| router_gone())?
    }

    pub async fn unsubscribe(&self, member: MemberId) {
        let _ = self.commands.send(Command::Unsubscribe { member }).await;
    }

    pub async fn remove_session(&self, session: u64) {
        let (done, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::RemoveSession { session, done })
            .await
            .is_ok()
        {
            let _ = answer.await;
        }
    }

    /// Whether any session on this relay subscribes to anything.
    pub fn has_local_subscribers(&self) -> bool {
        self.local_subscriptions.load(Ordering::Acquire) > 0
    }

    /// Delivers to matching local subscribers; returns how many got it.
    pub async fn deliver_local(&self, message: LocalMessage) -> u32 {
        if !self.has_local_subscribers() {
            return 0;
        }
        let (done, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::DeliverLocal { message, done })
            .await
            .is_err()
        {
            return 0;
        }
        answer.await.unwrap_or(0)
    }

    /// Serves a request from local subscribers (used while NATS is down).
    pub async fn request_local(
        &self,
        message: LocalMessage,
        timeout: Duration,
    ) -> Result<LocalReply, ErrorCode> {
        let (reply, answer) = oneshot::channel();
        let command = Command::RequestLocal {
            message,
            timeout,
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| ErrorCode::ShuttingDown)?;
        answer.await.map_err(|_| ErrorCode::ShuttingDown)?
    }

    /// Passes a publish to a local inbox on to the waiting requester.
    pub async fn reply_local(&self, message: LocalMessage) {
        let _ = self.commands.send(Command::ReplyLocal { message }).await;
    }

    pub async fn stats(&self) -> RouterStats {
        let (done, answer) = oneshot::channel();
        if self.commands.send(Command::Stats { done }).await.is_err() {
            return RouterStats::default();
        }
        answer.await.unwrap_or_default()
    }
}

struct PendingRequest {
    deadline: Instant,
    reply: oneshot::Sender<Result<LocalReply, ErrorCode>>,
}

struct Router {
    table: SubscriptionTable,
    fanouts: HashMap<SubscriptionKey, mpsc::Sender<FanoutCommand>>,
    nats: NatsLink,
    relay_id: Text,
    stats: Arc<RelayStats>,
    max_subscriptions: usize,
    local_inbox_prefix: Arc<str>,
    next_inbox: u64,
    pending_requests: HashMap<Text, PendingRequest>,
    local_subscriptions: Arc<AtomicUsize>,
}

/// Starts the router task.
pub fn start(
    nats: NatsLink,
    relay_id: Text,
    stats: Arc<RelayStats>,
    max_subscriptions: usize,
) -> RouterHandle {
    let (commands, receiver) = mpsc::channel(4096);
    let local_inbox_prefix: Arc<str> = format!("_INBOX.holdfast.{relay_id}.").into();
    let local_subscriptions = Arc::new(AtomicUsize::new(0));
    let router = Router {
        table: SubscriptionTable::new(),
        fanouts: HashMap::new(),
        nats,
        relay_id,
        stats,
        max_subscriptions,
        local_inbox_prefix: local_inbox_prefix.clone(),
        next_inbox: 0,
        pending_requests: HashMap::new(),
        local_subscriptions: local_subscriptions.clone(),
    };
    tokio::spawn(router.run(receiver));
    RouterHandle {
        commands,
        local_inbox_prefix,
        local_subscriptions,
    }
}

impl Router {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut sweep = tokio::time::interval(Duration::from_millis(100));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    None => break,
                },
                _ = sweep.tick(), if !self.pending_requests.is_empty() => self.expire_requests(),
            }
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Subscribe {
                member,
                key,
                outbox,
                done,
            } => {
                let result = self.subscribe(member, key, outbox).await;
                // Published before the subscriber hears it is subscribed.
                self.publish_local_count();
                let _ = done.send(result);
            }
            Command::Unsubscribe { member } => {
                if let Some((key, left)) = self.table.unsubscribe(member) {
                    self.release(member, key, left).await;
                }
                self.publish_local_count();
            }
            Command::RemoveSession { session, done } => {
                for (member, key, left) in self.table.remove_session(session) {
                    self.release(member, key, left).await;
                }
                self.publish_local_count();
                let _ = done.send(());
            }
            Command::DeliverLocal { message, done } => {
                let delivered = self.deliver_local(&message).await;
                let _ = done.send(delivered);
            }
            Command::RequestLocal {
                message,
                timeout,
                reply,
            } => self.request_local(message, timeout, reply).await,
            Command::ReplyLocal { message } => {
                match self.pending_requests.remove(&message.subject) {
                    Some(pending) => {
                        bump(&self.stats.requests_served_locally);
                        let _ = pending.reply.send(Ok(LocalReply {
                            headers: message.headers,
                            payload: message.payload,
                        }));
                    }
                    None => {
                        debug!(subject = %message.subject, "late or unknown local reply ignored")
                    }
                }
            }
            Command::Stats { done } => {
                let _ = done.send(RouterStats {
                    local_subscriptions: self.table.local_count(),
                    upstream_subscriptions: self.table.upstream_count(),
                    pending_local_requests: self.pending_requests.len(),
                });
            }
        }
    }

    fn publish_local_count(&self) {
        self.local_subscriptions
            .store(self.table.local_count(), Ordering::Release);
    }

    async fn subscribe(
        &mut self,
        member: MemberId,
        key: SubscriptionKey,
        outbox: Outbox,
    ) -> Result<(), Refusal> {
        let joined = self
            .table
            .subscribe(member, key.clone(), self.max_subscriptions)
            .map_err(|error| Refusal {
                code: match error {
                    crate::messaging::subscription_table::TableError::DuplicateSid { .. } => {
                        ErrorCode::ProtocolViolation
                    }
                    crate::messaging::subscription_table::TableError::TooManySubscriptions {
                        ..
                    } => ErrorCode::LimitExceeded,
                },
                message: error.to_string(),
            })?;
        if joined == Joined::NewKey {
            let (sender, receiver) = mpsc::channel(FANOUT_COMMANDS);
            let (subscribed, upstream_ready) = oneshot::channel();
            let fanout = Fanout::new(key.clone(), self.relay_id.clone(), self.stats.clone());
            tokio::spawn(fanout.run(self.nats.clone(), receiver, subscribed));
            self.fanouts.insert(key.clone(), sender);
            let _ = upstream_ready.await;
        }
        let Some(fanout) = self.fanouts.get(&key) else {
            return Err(router_gone());
        };
        let (done, added) = oneshot::channel();
        let command = FanoutCommand::Add {
            member,
            outbox,
            done,
        };
        if fanout.send(command).await.is_err() || added.await.is_err() {
            return Err(Refusal {
                code: ErrorCode::Internal,
                message: "subscription task ended unexpectedly".to_string(),
            });
        }
        Ok(())
    }

    async fn release(&mut self, member: MemberId, key: SubscriptionKey, left: Left) {
        match left {
            // Dropping the sender ends the fan-out task, which drops the
            // upstream subscriber, which unsubscribes from NATS.
            Left::LastMember => {
                self.fanouts.remove(&key);
                shrink_if_sparse(&mut self.fanouts);
            }
            Left::StillShared => {
                if let Some(fanout) = self.fanouts.get(&key) {
                    let _ = fanout.send(FanoutCommand::Remove { member }).await;
                }
            }
        }
    }

    /// Node-local delivery; the count is the subscribers targeted (one per
    /// queue group), as the table knows them.
    async fn deliver_local(&mut self, message: &LocalMessage) -> u32 {
        let targets: Vec<(SubscriptionKey, usize)> = self
            .table
            .matching(&message.subject)
            .map(|(key, members)| (key.clone(), members))
            .collect();
        let mut delivered = 0u32;
        for (key, members) in targets {
            if let Some(fanout) = self.fanouts.get(&key) {
                if fanout
                    .send(FanoutCommand::Deliver(Box::new(message.clone())))
                    .await
                    .is_ok()
                {
                    let reached = if key.queue_group.is_some() {
                        1
                    } else {
                        members
                    };
                    delivered =
                        delivered.saturating_add(u32::try_from(reached).unwrap_or(u32::MAX));
                }
            }
        }
        crate::ops::stats::add(&self.stats.local_deliveries, u64::from(delivered));
        delivered
    }

    async fn request_local(
        &mut self,
        mut message: LocalMessage,
        timeout: Duration,
        reply: oneshot::Sender<Result<LocalReply, ErrorCode>>,
    ) {
        if self.table.matching(&message.subject).next().is_none() {
            let _ = reply.send(Err(ErrorCode::NatsUnavailable));
            return;
        }
        self.next_inbox += 1;
        let inbox = Text::from(format!("{}{}", self.local_inbox_prefix, self.next_inbox));
        message.reply = Some(inbox.clone());
        self.pending_requests.insert(
            inbox,
            PendingRequest {
                deadline: Instant::now() + timeout,
                reply,
            },
        );
        self.deliver_local(&message).await;
    }

    fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<Text> = self
            .pending_requests
            .iter()
            .filter(|(_, pending)| pending.deadline <= now)
            .map(|(inbox, _)| inbox.clone())
            .collect();
        for inbox in expired {
            if let Some(pending) = self.pending_requests.remove(&inbox) {
                let _ = pending.reply.send(Err(ErrorCode::Timeout));
            }
        }
    }
}
