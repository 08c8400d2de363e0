//! `Client`: the cheap, clonable handle applications use.
//!
//! Every method validates locally what it can (subjects, sizes, whether the
//! relay is reachable) and then hands a command to the connection task. The
//! fast path (connected, fire-and-forget) never waits for the task.

use crate::ack::{Ack, AckFuture};
use crate::command::{
    AckWaiter, Command, NewSubscription, NewWatch, OutgoingPublish, COMMAND_QUEUE_CAPACITY,
};
use crate::connection::{Connection, ConnectionChannels};
use crate::discovery::Snapshot;
use crate::error::{Error, Result};
use crate::events::LinkEvent;
use crate::message::{OutboundMessage, Reply};
use crate::options::{ConnectOptions, OfflinePolicy};
use crate::registration::RegistrationStatus;
use crate::session;
use crate::shared::{SharedState, UpstreamLinks};
use crate::stream_state::{SubscriptionState, WatchState};
use crate::subscription::Subscriber;
use crate::transport::Connector;
use crate::url::RelayUrl;
use crate::watcher::Watcher;
use bytes::Bytes;
use holdfast_wire::codec::encoded_len;
use holdfast_wire::subject::{
    validate_publish_subject, validate_queue_group, validate_subscribe_subject,
};
use holdfast_wire::{Frame, Headers, LinkStatus, Publish, Register, Request, Text};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// How much longer than the relay the client waits for a request's answer,
/// so that the relay's own `timeout` answer normally arrives first.
const REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Link events buffered per receiver before a slow receiver lags.
const LINK_EVENT_CAPACITY: usize = 256;

/// Bytes of the length prefix, which the relay's frame limit does not count.
const LENGTH_PREFIX_BYTES: usize = 4;

/// A connection to the holdfast relay. Clone it freely: clones share the
/// connection, its subscriptions and its offline buffer.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    commands: mpsc::Sender<Command>,
    shared: Arc<SharedState>,
    events: broadcast::Sender<LinkEvent>,
    upstream: watch::Receiver<UpstreamLinks>,
    offline_policy: OfflinePolicy,
    request_timeout: Duration,
    subscription_capacity: usize,
}

impl Client {
    /// Connects to the relay at `url` with default options.
    ///
    /// A `quic://host:port` relay needs at least a CA file, so connect to one
    /// with [`Client::connect_with`] and [`ConnectOptions::tls_ca`], or with
    /// [`Client::from_env`] and `HOLDFAST_CA`.
    pub async fn connect(url: &str) -> Result<Client> {
        let url: RelayUrl = url.parse()?;
        Client::connect_with(ConnectOptions::new(url)).await
    }

    /// Connects to the relay named by `HOLDFAST_URL`, or the default socket,
    /// with the TLS files named by `HOLDFAST_CA`, `HOLDFAST_CERT` and
    /// `HOLDFAST_KEY` (see [`ConnectOptions::from_env`]).
    pub async fn from_env() -> Result<Client> {
        Client::connect_with(ConnectOptions::from_env()?).await
    }

    /// Connects with `options`.
    ///
    /// Unless [`ConnectOptions::retry_initial_connect`] is set, this returns
    /// only once the relay has welcomed the client, and an unreachable relay
    /// (or, on QUIC, a failed TLS handshake) is an [`Error::Connect`].
    /// Missing or unusable TLS files for a `quic://` URL are an [`Error::Tls`]
    /// either way. Must be called within a tokio runtime: the connection
    /// task is spawned on it.
    pub async fn connect_with(options: ConnectOptions) -> Result<Client> {
        // Before any attempt, so unusable TLS files are an error here even
        // when the connection itself is retried in the background.
        let connector = Connector::new(&options)?;
        let established = if options.retry_initial_connect {
            None
        } else {
            Some(
                session::open(
                    &options.url,
                    &connector,
                    options.client_name.clone(),
                    0,
                    options.max_frame_bytes,
                    options.pong_timeout,
                )
                .await?,
            )
        };
        let (command_sender, command_receiver) = mpsc::channel(COMMAND_QUEUE_CAPACITY);
        let (events, _) = broadcast::channel(LINK_EVENT_CAPACITY);
        let (upstream_sender, upstream) = watch::channel(UpstreamLinks::UNKNOWN);
        let shared = Arc::new(SharedState::new(options.max_frame_bytes));
        let mut connection = Connection::new(
            &options,
            connector,
            ConnectionChannels {
                commands: command_receiver,
                shared: Arc::clone(&shared),
                events: events.clone(),
                upstream: upstream_sender,
            },
        );
        // Begun before returning, so the first operation already sees the
        // session's instance id, frame limit and upstream link states.
        let live = established.map(|session| connection.begin_session(session));
        tokio::spawn(connection.run(live));
        Ok(Client {
            inner: Arc::new(ClientInner {
                commands: command_sender,
                shared,
                events,
                upstream,
                offline_policy: options.offline_policy,
                request_timeout: options.request_timeout,
                subscription_capacity: options.subscription_capacity,
            }),
        })
    }

    // ----------------------------------------------------------------------
    // Publishing.

    /// Publishes `payload` to `subject`, fire-and-forget.
    ///
    /// Returns once the message is queued for the relay (or, while the relay
    /// is unreachable, held in the offline buffer). Failures the relay
    /// reports later arrive as [`LinkEvent::RelayError`]; use
    /// [`Client::publish_with_ack`] to learn each message's fate.
    pub async fn publish(&self, subject: impl Into<Text>, payload: impl Into<Bytes>) -> Result<()> {
        self.publish_message(OutboundMessage::new(subject, payload))
            .await
    }

    /// Publishes a message with class, headers or reply subject, fire-and-forget.
    pub async fn publish_message(&self, message: OutboundMessage) -> Result<()> {
        let publish = self.prepare_publish(message, None)?;
        self.submit_publish(publish).await
    }

    /// Publishes a message and asks the relay for an acknowledgement.
    ///
    /// Awaiting this only enqueues the message, so many publishes can be in
    /// flight; awaiting the returned [`AckFuture`] yields the relay's answer.
    /// A rejected publish resolves to [`Error::Relay`] with the relay's code.
    pub async fn publish_with_ack(&self, message: OutboundMessage) -> Result<AckFuture> {
        let (sender, receiver) = oneshot::channel::<Result<Ack>>();
        let ack_id = self.inner.shared.next_ack_id();
        let publish = self.prepare_publish(message, Some(AckWaiter { ack_id, sender }))?;
        self.submit_publish(publish).await?;
        Ok(AckFuture::new(receiver))
    }

    fn prepare_publish(
        &self,
        message: OutboundMessage,
        ack: Option<AckWaiter>,
    ) -> Result<OutgoingPublish> {
        let OutboundMessage {
            subject,
            payload,
            headers,
            reply,
            class,
        } = message;
        validate_publish_subject(&subject)?;
        if let Some(reply) = &reply {
            validate_publish_subject(reply)?;
        }
        let frame = Frame::Publish(Publish {
            ack_id: ack.as_ref().map_or(0, |ack| ack.ack_id),
            subject,
            reply,
            class,
            headers,
            payload,
        });
        let encoded_len = self.check_frame_size(&frame)?;
        Ok(OutgoingPublish {
            frame,
            encoded_len,
            ack,
            enqueued: None,
        })
    }

    /// The frame's size on the wire, or an error if the relay would refuse it.
    fn check_frame_size(&self, frame: &Frame) -> Result<usize> {
        let size = encoded_len(frame);
        let max = self.inner.shared.max_frame_bytes();
        if size.saturating_sub(LENGTH_PREFIX_BYTES) > max as usize {
            return Err(Error::MessageTooLarge { size, max });
        }
        Ok(size)
    }

    async fn submit_publish(&self, mut publish: OutgoingPublish) -> Result<()> {
        self.ensure_open()?;
        if self.inner.shared.is_relay_connected() {
            return self.send(Command::Publish(publish)).await;
        }
        if self.inner.offline_policy == OfflinePolicy::FailFast {
            return Err(Error::RelayUnavailable);
        }
        // Offline: only the connection task knows whether the buffer has
        // room, so wait for its verdict. This round trip happens only while
        // the relay is away.
        let (enqueued, verdict) = oneshot::channel();
        publish.enqueued = Some(enqueued);
        self.send(Command::Publish(publish)).await?;
        verdict.await.unwrap_or(Err(Error::Closed))
    }

    // ----------------------------------------------------------------------
    // Subscribing.

    /// Subscribes to `subject` (wildcards `*` and `>` allowed).
    ///
    /// While connected, returns after the relay confirmed the subscription
    /// (an error the relay reports for it is returned instead). While the
    /// relay is unreachable, returns at once: the subscription is desired
    /// state and is sent on the next connection.
    pub async fn subscribe(&self, subject: impl Into<Text>) -> Result<Subscriber> {
        self.subscribe_inner(subject.into(), None).await
    }

    /// Subscribes to `subject` as a member of queue group `group`: each
    /// message goes to one member of the group.
    pub async fn queue_subscribe(
        &self,
        subject: impl Into<Text>,
        group: impl Into<Text>,
    ) -> Result<Subscriber> {
        self.subscribe_inner(subject.into(), Some(group.into()))
            .await
    }

    async fn subscribe_inner(
        &self,
        subject: Text,
        queue_group: Option<Text>,
    ) -> Result<Subscriber> {
        validate_subscribe_subject(&subject)?;
        if let Some(group) = &queue_group {
            validate_queue_group(group)?;
        }
        self.ensure_open()?;
        let sid = self.inner.shared.next_sid();
        let (sender, receiver) = mpsc::channel(self.inner.subscription_capacity);
        let state = Arc::new(SubscriptionState::default());
        let (confirmed, confirmation) = oneshot::channel();
        self.send(Command::Subscribe {
            subscription: NewSubscription {
                sid,
                subject: subject.clone(),
                queue_group,
                sender,
                state: Arc::clone(&state),
            },
            confirmed,
        })
        .await?;
        // Built before waiting so that a cancelled `subscribe` unsubscribes
        // through the subscriber's drop.
        let subscriber =
            Subscriber::new(sid, subject, receiver, state, self.inner.commands.clone());
        match confirmation.await {
            Ok(Ok(())) => Ok(subscriber),
            Ok(Err(error)) => {
                subscriber.forget();
                Err(error)
            }
            Err(_) => {
                subscriber.forget();
                Err(Error::Closed)
            }
        }
    }

    // ----------------------------------------------------------------------
    // Registrations.

    /// Registers `key` = `value` in etcd through the relay, for as long as
    /// this client lives (a later `register` of the same key updates the value).
    ///
    /// The relay puts the key under a lease it owns for this client's
    /// session, so the key leaves etcd within about a second of the process
    /// dying or hanging. Registrations are desired state kept by the client:
    /// after a reconnect to the relay every live one is registered again,
    /// with its current value, before anything else is sent.
    ///
    /// Returns [`RegistrationStatus::Applied`] once etcd holds it, or
    /// [`RegistrationStatus::Buffered`] when etcd (relay answer) or the relay
    /// (at once, without waiting) is unreachable; either way nothing more
    /// needs to be done. A refusal is [`Error::Relay`] with the relay's code,
    /// and the key is then not kept: [`crate::ErrorCode::Conflict`] when another
    /// live session holds the key (it is free again once that session
    /// ends), `unauthorized` or `limit_exceeded` otherwise. [`Error::Timeout`] means the relay did
    /// not answer in time; the registration stays desired state.
    pub async fn register(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<RegistrationStatus> {
        let key = key.into();
        let value = value.into();
        validate_key(&key)?;
        // Checked here, before it becomes desired state that every
        // reconnect would try (and fail) to send again.
        self.check_frame_size(&Frame::Register(Register {
            request_id: 0,
            key: key.clone(),
            value: value.clone(),
        }))?;
        self.ensure_open()?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Register { key, value, reply }).await?;
        self.await_answer(answer).await
    }

    /// Removes a key this client registered. Outcomes as for
    /// [`Client::register`]; while the relay is unreachable the key is
    /// simply forgotten (the relay already dropped it with the old session).
    pub async fn deregister(&self, key: impl Into<Bytes>) -> Result<RegistrationStatus> {
        let key = key.into();
        validate_key(&key)?;
        self.ensure_open()?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Deregister { key, reply }).await?;
        self.await_answer(answer).await
    }

    // ----------------------------------------------------------------------
    // Discovery.

    /// The entries under `prefix` (empty: all keys), answered from the
    /// relay's cache of etcd.
    ///
    /// The answer carries the etcd revision, and whether the relay could not
    /// confirm it with etcd just now (`stale`, with its `age`): during an
    /// etcd outage this keeps answering with the last known entries. Fails
    /// at once with [`Error::RelayUnavailable`] while the relay is unreachable.
    pub async fn get(&self, prefix: impl Into<Bytes>) -> Result<Snapshot> {
        self.get_inner(prefix.into(), false).await
    }

    /// Like [`Client::get`], but read from etcd itself: never stale, and an
    /// [`Error::Relay`] with [`ErrorCode::EtcdUnavailable`] (retryable)
    /// while etcd is unreachable.
    ///
    /// [`ErrorCode::EtcdUnavailable`]: crate::ErrorCode::EtcdUnavailable
    pub async fn get_linearizable(&self, prefix: impl Into<Bytes>) -> Result<Snapshot> {
        self.get_inner(prefix.into(), true).await
    }

    async fn get_inner(&self, prefix: Bytes, linearizable: bool) -> Result<Snapshot> {
        validate_prefix(&prefix)?;
        self.ensure_connected()?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Get {
            linearizable,
            prefix,
            reply,
        })
        .await?;
        self.await_answer(answer).await
    }

    /// Watches the keys under `prefix` (empty: all keys): the [`Watcher`]
    /// yields the current entries as `Put`s, then `Synced`, then every change.
    ///
    /// Like a subscription, a watch is desired state: it is re-established
    /// after a reconnect, replaying the current entries (see [`Watcher`] for
    /// how the stream stays convergent). While connected, returns after the
    /// relay accepted the watch (an error it reports is returned instead);
    /// while the relay is unreachable, returns at once.
    pub async fn watch(&self, prefix: impl Into<Bytes>) -> Result<Watcher> {
        let prefix = prefix.into();
        validate_prefix(&prefix)?;
        self.ensure_open()?;
        // Same counter as subscription ids: an ERROR's reference then names
        // either a subscription or a watch, never both.
        let id = self.inner.shared.next_sid();
        let (sender, receiver) = mpsc::channel(self.inner.subscription_capacity);
        let state = Arc::new(WatchState::default());
        let (confirmed, confirmation) = oneshot::channel();
        self.send(Command::Watch {
            watch: NewWatch {
                id,
                prefix: prefix.clone(),
                sender,
                state: Arc::clone(&state),
            },
            confirmed,
        })
        .await?;
        // Built before waiting so that a cancelled `watch` unwatches through
        // the watcher's drop.
        let watcher = Watcher::new(id, prefix, receiver, state, self.inner.commands.clone());
        match confirmation.await {
            Ok(Ok(())) => Ok(watcher),
            Ok(Err(error)) => {
                watcher.forget();
                Err(error)
            }
            Err(_) => {
                watcher.forget();
                Err(Error::Closed)
            }
        }
    }

    // ----------------------------------------------------------------------
    // Requests, barriers, status.

    /// Sends a request and waits for one reply, with the default timeout.
    pub async fn request(
        &self,
        subject: impl Into<Text>,
        payload: impl Into<Bytes>,
    ) -> Result<Reply> {
        self.request_with(subject, Headers::new(), payload, self.inner.request_timeout)
            .await
    }

    /// Sends a request with headers and waits up to `timeout` for the reply.
    ///
    /// The relay enforces `timeout` (answering `timeout` or `no_responders`);
    /// the client gives up one second later in case the relay cannot answer.
    /// Fails at once with [`Error::RelayUnavailable`] while the relay is
    /// unreachable: a late answer is worse than a clear error.
    pub async fn request_with(
        &self,
        subject: impl Into<Text>,
        headers: Headers,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Reply> {
        let subject = subject.into();
        validate_publish_subject(&subject)?;
        self.ensure_connected()?;
        let timeout_ms = u32::try_from(timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        let request_id = self.inner.shared.next_request_id();
        let frame = Frame::Request(Request {
            request_id,
            timeout_ms,
            subject,
            headers,
            payload: payload.into(),
        });
        self.check_frame_size(&frame)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Request {
            request_id,
            frame,
            reply,
        })
        .await?;
        match tokio::time::timeout(timeout.saturating_add(REQUEST_GRACE), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Waits until the relay has handled everything this client sent before
    /// (publishes handed to NATS or journaled, subscriptions registered).
    pub async fn flush(&self) -> Result<()> {
        self.ensure_connected()?;
        let (done, flushed) = oneshot::channel();
        self.send(Command::Flush { done }).await?;
        flushed.await.unwrap_or(Err(Error::Closed))
    }

    /// The relay's status document (JSON; schema in wire/PROTOCOL.md).
    pub async fn status(&self) -> Result<serde_json::Value> {
        self.ensure_connected()?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status { reply }).await?;
        let json = self.await_answer(answer).await?;
        serde_json::from_slice(&json).map_err(Error::InvalidStatus)
    }

    // ----------------------------------------------------------------------
    // Observing the link.

    /// A receiver of connectivity changes from now on.
    pub fn link_events(&self) -> broadcast::Receiver<LinkEvent> {
        self.inner.events.subscribe()
    }

    /// The relay's NATS link as last reported; `Unknown` while the relay
    /// itself is unreachable.
    pub fn nats_status(&self) -> LinkStatus {
        self.inner.upstream.borrow().nats
    }

    /// The relay's etcd link as last reported; `Unknown` while the relay
    /// itself is unreachable.
    pub fn etcd_status(&self) -> LinkStatus {
        self.inner.upstream.borrow().etcd
    }

    /// Whether a session with the relay is established right now.
    pub fn is_connected(&self) -> bool {
        self.inner.shared.is_relay_connected()
    }

    /// The identity the relay gave this process: kept across reconnects
    /// (sent back in every HELLO), so the relay and etcd see one instance
    /// however often the connection drops. 0 until the first WELCOME, which
    /// [`Client::connect_with`] waits for unless
    /// [`ConnectOptions::retry_initial_connect`] is set.
    pub fn instance_id(&self) -> u64 {
        self.inner.shared.instance_id()
    }

    /// Fire-and-forget publishes dropped inside the client (each also logged):
    /// ones caught by a connection loss between the handle's check and the
    /// connection task (fail-fast policy or a full buffer), or still buffered
    /// at close.
    pub fn dropped_publishes(&self) -> u64 {
        self.inner.shared.publishes_dropped()
    }

    /// Flushes (best effort, when connected) and closes the connection for
    /// every clone of this client. Later operations fail with [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        if self.inner.shared.is_closed() {
            return Ok(());
        }
        if self.inner.shared.is_relay_connected() {
            // Whatever happens here, closing goes ahead.
            let _ = self.flush().await;
        }
        let (done, closed) = oneshot::channel();
        if self.send(Command::Close { done }).await.is_ok() {
            let _ = closed.await;
        }
        Ok(())
    }

    // ----------------------------------------------------------------------

    /// Waits for the connection task's answer, at most the request timeout.
    async fn await_answer<T>(&self, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.inner.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    async fn send(&self, command: Command) -> Result<()> {
        self.inner
            .commands
            .send(command)
            .await
            .map_err(|_| Error::Closed)
    }

    fn ensure_open(&self) -> Result<()> {
        if self.inner.shared.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn ensure_connected(&self) -> Result<()> {
        self.ensure_open()?;
        if !self.inner.shared.is_relay_connected() {
            return Err(Error::RelayUnavailable);
        }
        Ok(())
    }
}

/// Keys must be non-empty (etcd refuses empty keys) and fit a `bytes16`.
fn validate_key(key: &Bytes) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "a key must not be empty",
        });
    }
    validate_prefix(key)
}

/// Prefixes (and keys) travel as `bytes16`; an empty prefix means all keys.
fn validate_prefix(prefix: &Bytes) -> Result<()> {
    if prefix.len() > usize::from(u16::MAX) {
        return Err(Error::InvalidKey {
            reason: "keys and prefixes are at most 65535 bytes",
        });
    }
    Ok(())
}
