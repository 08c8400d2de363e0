//! The relay's upstream subscriptions and core publishes, on a NATS
//! connection of its own that the relay reads with the project's own
//! protocol decoder.
//!
//! async-nats drops its whole connection on a message it cannot parse (a
//! subject that is not UTF-8, a header value with a lone CR: anything any
//! publisher on the cluster may send; nats-io/nats.rs #1572, #1612, still
//! so in 0.52). Had the upstream subscriptions stayed on the async-nats
//! client, one such message would cut the relay's link and lose every
//! other subject's messages while it reconnected. Here a malformed message
//! costs that message only: it is skipped, counted in
//! `holdfast_messages_dropped_total{reason="malformed_upstream"}`, logged
//! at most every 10 s, and the connection goes on. The relay's own
//! requests, JetStream and the link's probes stay on async-nats; publishes
//! that carry a reply subject come here, since nats-server answers "no
//! responders" only on the connection that published and the reply
//! subscription is here.
//!
//! The forwarder's core publishes come here too ([`UpstreamPublisher`]):
//! a batch of up to 512 messages arrives already encoded as PUB/HPUB
//! operations and leaves in one write, where async-nats took one command,
//! one channel hop and one formatted write per message (together 40 % of
//! the relay's CPU per message). A PING after a batch confirms it: the
//! server answers only once it processed everything sent before, on the
//! same connection, and a batch lost with a connection (or dropped while
//! there is none) shows as a new count of [`SubscriberState::losses`].
//!
//! One task ([`connection`]) owns the connection and the subscription
//! table; [`SubscriberLink`] talks to it over a bounded channel, and a
//! dropped [`UpstreamSubscription`] tells it over an unbounded one. Each
//! subscription gets its messages on a bounded channel of its own: one that
//! does not keep up loses messages (counted as
//! `reason="upstream_slow_consumer"`), never holds up the others.

mod connection;
mod server_pool;
mod transport;

use crate::messaging::nats::security::NatsSecurity;
use bytes::{Bytes, BytesMut};
use holdfast_wire::{Headers, Text};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

pub use server_pool::ServerAddress;

/// Encoded publish batches handed over and not yet taken into the
/// connection's write buffer, at most: the bound on what a slow server
/// makes the relay hold here (a batch is up to 512 messages).
const PUBLISH_BATCHES_IN_FLIGHT: usize = 8;

/// Messages one subscription may have waiting, as async-nats's default.
pub const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;

/// Commands waiting for the connection task, at most.
const COMMAND_QUEUE: usize = 4096;

/// A message from an upstream subscription.
#[derive(Debug, Clone)]
pub struct UpstreamMessage {
    pub subject: Text,
    pub reply: Option<Text>,
    pub headers: Headers,
    /// Boxed, as status messages are rare: every subscription's channel
    /// allocates 32 slots of this type when it is made.
    pub status: Option<Box<UpstreamStatus>>,
    pub payload: Bytes,
}

/// The status line of a status message.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    /// e.g. 503: no responders.
    pub code: u16,
    pub description: Option<Text>,
}

/// The connection as the status document shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberState {
    /// `host:port` of the server while connected.
    pub server: Option<String>,
    /// Why the last attempt or connection failed.
    pub last_error: Option<String>,
    pub reconnects: u64,
    /// Connections lost, plus publish batches dropped because there was no
    /// connection: whatever was handed over before a change of this count
    /// may not have reached the server and must be sent again.
    pub losses: u64,
    /// The connected server's max_payload (0 while not connected): a
    /// larger PUB would cost the connection, so the forwarder refuses it.
    pub max_payload: usize,
}

enum Command {
    Subscribe {
        subject: Text,
        queue_group: Option<Text>,
        messages: mpsc::Sender<UpstreamMessage>,
        done: oneshot::Sender<u64>,
    },
    /// Answered once the server processed everything sent before.
    RoundTrip { done: oneshot::Sender<()> },
    /// A publish with a reply subject: sent here, where the subscription
    /// for its reply lives, so nats-server's 503 no-responders answer
    /// (which goes only to the publishing connection) reaches it.
    Publish {
        subject: Text,
        reply: Text,
        headers: Headers,
        payload: Bytes,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Core publishes, encoded; written as they are, or dropped (and
    /// counted as a loss) without a connection.
    PublishBatch {
        operations: BytesMut,
        /// Released once the batch is in the write buffer.
        permit: OwnedSemaphorePermit,
    },
    /// Answered with [`SubscriberState::losses`] once the server processed
    /// everything sent before; never answered (the sender dropped) when
    /// the connection goes first.
    Confirm { done: oneshot::Sender<u64> },
}

/// Counters the connection task keeps for metrics.
#[derive(Debug, Default)]
pub struct SubscriberCounters {
    /// Messages skipped because they could not be decoded.
    pub malformed: AtomicU64,
}

/// A cheap handle to the subscriber connection.
#[derive(Clone)]
pub struct SubscriberLink {
    commands: mpsc::Sender<Command>,
    /// Sids of dropped subscriptions. Unbounded so that no unsubscribe is
    /// ever lost: a full command queue used to swallow them (30k
    /// subscriptions closing at once left 12k behind, each keeping its
    /// upstream SUB, its table entry and its channel for the relay's
    /// life). At most one per subscription ever made, taken in batches.
    unsubscribes: mpsc::UnboundedSender<u64>,
    state: watch::Receiver<SubscriberState>,
    counters: Arc<SubscriberCounters>,
}

/// Where and how the subscriber connection connects.
pub struct SubscriberSettings {
    pub seeds: Vec<ServerAddress>,
    pub security: Arc<NatsSecurity>,
    /// The connection's name as the server shows it.
    pub client_name: String,
    pub connect_timeout: Duration,
    pub reconnect_delay_max: Duration,
    /// How often the server is pinged; three unanswered pings end the
    /// connection (a stopped server keeps its TCP connection open).
    pub ping_interval: Duration,
    /// Shared with the main link: messages dropped for a full subscription.
    pub upstream_drops: Arc<AtomicU64>,
}

impl SubscriberLink {
    /// Starts connecting in the background; returns at once.
    pub fn start(settings: SubscriberSettings, shutdown: CancellationToken) -> SubscriberLink {
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let (unsubscribes, unsubscribed) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(SubscriberState::default());
        let counters = Arc::new(SubscriberCounters::default());
        let task = connection::ConnectionTask::new(settings, state_tx, counters.clone());
        tokio::spawn(task.run(receiver, unsubscribed, shutdown));
        SubscriberLink {
            commands,
            unsubscribes,
            state,
            counters,
        }
    }

    /// Subscribes to `subject` (in `queue_group`); the subscription is
    /// (re)established on every connection until dropped.
    pub async fn subscribe(
        &self,
        subject: Text,
        queue_group: Option<Text>,
    ) -> Result<UpstreamSubscription, String> {
        let (messages, receiver) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        let (done, sid) = oneshot::channel();
        let gone = || "the relay's subscriber connection has stopped".to_string();
        self.commands
            .send(Command::Subscribe {
                subject,
                queue_group,
                messages,
                done,
            })
            .await
            .map_err(|_| gone())?;
        let sid = sid.await.map_err(|_| gone())?;
        Ok(UpstreamSubscription {
            sid,
            messages: receiver,
            unsubscribes: self.unsubscribes.clone(),
        })
    }

    /// Returns once the server processed every subscription made before
    /// (or at once while disconnected: they are made on connect), at most
    /// `limit`. False when it did not answer in time.
    pub async fn round_trip(&self, limit: Duration) -> bool {
        let (done, answered) = oneshot::channel();
        if self
            .commands
            .send(Command::RoundTrip { done })
            .await
            .is_err()
        {
            return false;
        }
        matches!(tokio::time::timeout(limit, answered).await, Ok(Ok(())))
    }

    /// Publishes a request (a message with a reply subject) on this
    /// connection; returns once it is handed over, or an error while the
    /// connection is down (request traffic is never queued).
    pub async fn publish_request(
        &self,
        subject: Text,
        reply: Text,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), String> {
        let (done, handed) = oneshot::channel();
        let gone = || "the relay's subscriber connection has stopped".to_string();
        self.commands
            .send(Command::Publish {
                subject,
                reply,
                headers,
                payload,
                done,
            })
            .await
            .map_err(|_| gone())?;
        handed.await.map_err(|_| gone())?
    }

    pub fn state(&self) -> SubscriberState {
        self.state.borrow().clone()
    }

    /// Waits until this connection is up and a PING on it has come back,
    /// so every subscription it holds (re-sent first thing on a connect)
    /// is in place on the server; false when `limit` passes first.
    pub async fn in_place(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut state = self.state.clone();
        // The guard `wait_for` returns must not live across the next await.
        let connected = matches!(
            tokio::time::timeout_at(deadline, state.wait_for(|state| state.server.is_some())).await,
            Ok(Ok(_))
        );
        if !connected {
            return false;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.round_trip(left).await
    }

    /// The forwarder's handle for core publishes on this connection.
    pub fn publisher(&self) -> UpstreamPublisher {
        UpstreamPublisher {
            commands: self.commands.clone(),
            in_flight: Arc::new(Semaphore::new(PUBLISH_BATCHES_IN_FLIGHT)),
        }
    }

    /// The connection's state as it changes (its `losses` tell a publisher
    /// what to send again).
    pub fn watch_state(&self) -> watch::Receiver<SubscriberState> {
        self.state.clone()
    }

    /// Messages skipped because they could not be decoded.
    pub fn malformed(&self) -> u64 {
        self.counters
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The connection task has stopped (the relay is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionStopped;

/// Hands encoded core publishes to the connection and asks for their
/// confirmation.
#[derive(Clone)]
pub struct UpstreamPublisher {
    commands: mpsc::Sender<Command>,
    in_flight: Arc<Semaphore>,
}

impl UpstreamPublisher {
    /// Hands a batch of encoded PUB/HPUB operations over, waiting while
    /// [`PUBLISH_BATCHES_IN_FLIGHT`] batches are still on their way to
    /// the write buffer.
    pub async fn send(&self, operations: BytesMut) -> Result<(), ConnectionStopped> {
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ConnectionStopped)?;
        self.commands
            .send(Command::PublishBatch { operations, permit })
            .await
            .map_err(|_| ConnectionStopped)
    }

    /// Resolves with the connection's loss count once the server processed
    /// everything handed over before; `None` when the connection went
    /// first (or the task stopped).
    pub async fn confirm(&self) -> Option<u64> {
        let (done, answered) = oneshot::channel();
        self.commands.send(Command::Confirm { done }).await.ok()?;
        answered.await.ok()
    }
}

/// One upstream subscription; dropping it unsubscribes.
pub struct UpstreamSubscription {
    sid: u64,
    messages: mpsc::Receiver<UpstreamMessage>,
    unsubscribes: mpsc::UnboundedSender<u64>,
}

impl UpstreamSubscription {
    /// The next message; `None` once the relay is stopping.
    pub async fn next(&mut self) -> Option<UpstreamMessage> {
        self.messages.recv().await
    }
}

impl Drop for UpstreamSubscription {
    fn drop(&mut self) {
        // Fails only once the connection task has stopped.
        let _ = self.unsubscribes.send(self.sid);
    }
}
