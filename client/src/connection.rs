//! The connection task: the one owner of the relay socket and of the
//! client's desired state.
//!
//! Handles talk to it through a bounded command queue. It keeps what must
//! survive a relay restart (registrations, watches, live subscriptions, the
//! offline buffer, the instance id) and what belongs to one connection
//! (pending acks, requests, gets, pings). On connection loss it fails the
//! operations whose outcome is now unknown, reconnects with backoff, and
//! re-sends on the new session, in this order: every live registration
//! (so the process is discoverable again before anything else happens),
//! every watch, every subscription, then the publishes buffered meanwhile.
//!
//! The hot path batches: all ready commands are encoded into one buffer that
//! goes out in as few writes as the socket allows, and one read decodes as
//! many frames as it brought in.

use crate::ack::{Ack, AckStatus};
use crate::command::{Command, NewSubscription, NewWatch, OutgoingPublish};
use crate::discovery::Snapshot;
use crate::error::{Error, Result};
use crate::events::LinkEvent;
use crate::id_hash::IdHash;
use crate::message::{Message, Reply};
use crate::offline_buffer::{OfflineBuffer, Refused};
use crate::options::ConnectOptions;
use crate::registration::{AckRouting, RegistrationStatus, RegistrationWaiter, Registrations};
use crate::session::{self, FrameReader, Session};
use crate::shared::{SharedState, UpstreamLinks};
use crate::stream_state::SubscriptionState;
use crate::transport::{ByteWriter, Connector, Link};
use crate::url::RelayUrl;
use crate::watches::Watches;
use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use holdfast_wire::backoff::Backoff;
use holdfast_wire::codec::CodecError;
use holdfast_wire::{
    AckOutcome, EncodeError, ErrorCode, ErrorFrame, Frame, Get, GetOutcome, GetResponse, GoAway,
    LinkStatus, Ping, Pong, PubAck, Response, ResponseOutcome, Service, Subscribe, Text,
    Unsubscribe, Welcome,
};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

/// Commands handled per wake-up before the socket gets a turn, so a busy
/// publisher cannot starve reads.
const MAX_COMMANDS_PER_BATCH: usize = 4096;

/// Frames decoded per wake-up before commands get a turn.
const MAX_FRAMES_PER_BATCH: usize = 4096;

/// While this much is waiting to be written, no new commands are taken: the
/// command queue fills and publishers wait (backpressure instead of memory).
const OUTBOX_HIGH_WATER: usize = 1024 * 1024;

/// Initial capacity of the outgoing buffer.
const OUTBOX_CAPACITY: usize = 256 * 1024;

/// How long to try writing what is left when the client closes.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything the connection task owns.
pub(crate) struct Connection {
    url: RelayUrl,
    /// Made once per client: on QUIC it holds the TLS configuration and the
    /// endpoint every reconnect reuses.
    connector: Connector,
    client_name: String,
    ping_interval: Duration,
    pong_timeout: Duration,
    initial_max_frame_bytes: u32,
    commands: mpsc::Receiver<Command>,
    shared: Arc<SharedState>,
    events: broadcast::Sender<LinkEvent>,
    upstream: watch::Sender<UpstreamLinks>,
    backoff: Backoff,

    // Desired state, kept across connections.
    registrations: Registrations,
    watches: Watches,
    subscriptions: HashMap<u32, LiveSubscription>,
    offline: OfflineBuffer<OutgoingPublish>,

    // Per-connection state, failed with `ConnectionLost` when it ends.
    pending_acks: HashMap<u64, oneshot::Sender<Result<Ack>>, IdHash>,
    pending_requests: HashMap<u64, oneshot::Sender<Result<Reply>>, IdHash>,
    pending_statuses: HashMap<u64, oneshot::Sender<Result<Bytes>>, IdHash>,
    pending_gets: HashMap<u64, oneshot::Sender<Result<Snapshot>>, IdHash>,
    /// In the order sent; the relay answers pings in order.
    pending_pings: VecDeque<PendingPing>,
    /// Subscribers waiting for the PONG behind their SUBSCRIBE.
    unconfirmed_subscriptions: HashMap<u32, oneshot::Sender<Result<()>>>,
    /// Watchers waiting for the PONG behind their WATCH.
    unconfirmed_watches: HashMap<u32, oneshot::Sender<Result<()>>>,

    next_status_id: u64,
    next_ping_nonce: u64,
    close_requested: Option<oneshot::Sender<()>>,
}

struct LiveSubscription {
    subject: Text,
    queue_group: Option<Text>,
    sender: mpsc::Sender<Message>,
    state: Arc<SubscriptionState>,
}

struct PendingPing {
    nonce: u64,
    sent_at: Instant,
    purpose: PingPurpose,
}

enum PingPurpose {
    /// Our own liveness check.
    Keepalive,
    /// A handle's `flush()`.
    Flush(oneshot::Sender<Result<()>>),
    /// The barrier behind a SUBSCRIBE: its PONG means the relay accepted it.
    ConfirmSubscription(u32),
    /// The barrier behind a WATCH, likewise.
    ConfirmWatch(u32),
}

/// A session whose WELCOME has been handled, ready to be driven.
pub(crate) struct LiveSession {
    reader: FrameReader,
    writer: ByteWriter,
    outbox: Outbox,
    link: Link,
}

/// Where encoded frames wait for the socket.
struct Outbox {
    buffer: BytesMut,
    max_frame_bytes: u32,
}

impl Outbox {
    fn push(&mut self, frame: &Frame) -> Result<(), EncodeError> {
        holdfast_wire::encode(frame, self.max_frame_bytes, &mut self.buffer)
    }
}

/// Whether the task keeps going after a command.
enum Flow {
    Continue,
    Close,
}

/// Why frames from the relay ended the session.
struct SessionFailure {
    reason: String,
    /// The relay sent bad bytes and is told so with a GO_AWAY before closing.
    relay_is_owed_go_away: bool,
}

/// How a session ended.
enum SessionEnd {
    Lost(String),
    Shutdown,
}

/// Channels the task is created with.
pub(crate) struct ConnectionChannels {
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) shared: Arc<SharedState>,
    pub(crate) events: broadcast::Sender<LinkEvent>,
    pub(crate) upstream: watch::Sender<UpstreamLinks>,
}

impl Connection {
    pub(crate) fn new(
        options: &ConnectOptions,
        connector: Connector,
        channels: ConnectionChannels,
    ) -> Connection {
        Connection {
            url: options.url.clone(),
            connector,
            client_name: options.client_name.clone(),
            ping_interval: options.ping_interval,
            pong_timeout: options.pong_timeout,
            initial_max_frame_bytes: options.max_frame_bytes,
            commands: channels.commands,
            shared: channels.shared,
            events: channels.events,
            upstream: channels.upstream,
            backoff: options.backoff(),
            registrations: Registrations::default(),
            watches: Watches::default(),
            subscriptions: HashMap::new(),
            offline: OfflineBuffer::new(options.offline_policy),
            pending_acks: HashMap::default(),
            pending_requests: HashMap::default(),
            pending_statuses: HashMap::default(),
            pending_gets: HashMap::default(),
            pending_pings: VecDeque::new(),
            unconfirmed_subscriptions: HashMap::new(),
            unconfirmed_watches: HashMap::new(),
            next_status_id: 1,
            next_ping_nonce: 1,
            close_requested: None,
        }
    }

    /// Runs until the client is closed or every handle is dropped.
    /// `established` is the session `connect` already opened and began, if any.
    pub(crate) async fn run(mut self, established: Option<LiveSession>) {
        let mut next_session = established;
        let mut wait_before_connecting = false;
        loop {
            let live = match next_session.take() {
                Some(live) => live,
                None => match self.reconnect(wait_before_connecting).await {
                    Some(session) => self.begin_session(session),
                    None => break,
                },
            };
            match self.drive_session(live).await {
                SessionEnd::Lost(reason) => {
                    self.on_session_lost(reason);
                    wait_before_connecting = true;
                }
                SessionEnd::Shutdown => break,
            }
        }
        self.shut_down();
    }

    // ----------------------------------------------------------------------
    // Disconnected: connecting with backoff while serving commands.

    /// Tries until a session is open; `None` when the client closed meanwhile.
    async fn reconnect(&mut self, wait_first: bool) -> Option<Session> {
        let mut wait = wait_first;
        let mut failed_attempts: u64 = 0;
        loop {
            if wait {
                let delay = self.backoff.next_delay();
                self.serve_offline_until(tokio::time::sleep(delay)).await?;
            }
            wait = true;
            // Owned copies: the attempt runs while `serve_offline_until`
            // has `self` borrowed.
            let (url, connector) = (self.url.clone(), self.connector.clone());
            let (client_name, instance_id) = (self.client_name.clone(), self.shared.instance_id());
            let (max_frame_bytes, handshake_timeout) =
                (self.initial_max_frame_bytes, self.pong_timeout);
            let attempt = async move {
                session::open(
                    &url,
                    &connector,
                    client_name,
                    instance_id,
                    max_frame_bytes,
                    handshake_timeout,
                )
                .await
            };
            match self.serve_offline_until(attempt).await? {
                Ok(session) => return Some(session),
                Err(error) => {
                    failed_attempts += 1;
                    // The first failure and then every tenth: a relay that
                    // is down for minutes must not flood the log.
                    if failed_attempts == 1 || failed_attempts % 10 == 0 {
                        warn!(url = %self.url, attempts = failed_attempts, %error, "cannot reach the holdfast relay; retrying");
                    } else {
                        debug!(url = %self.url, attempts = failed_attempts, %error, "reconnect attempt failed");
                    }
                }
            }
        }
    }

    /// Handles commands (offline rules) until `until` completes; `None` if
    /// the client closed first.
    async fn serve_offline_until<F: Future>(&mut self, until: F) -> Option<F::Output> {
        tokio::pin!(until);
        let mut sweep = tokio::time::interval(self.ping_interval);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                output = &mut until => return Some(output),
                command = self.commands.recv() => match command {
                    None => return None,
                    Some(command) => {
                        if let Flow::Close = self.handle_command(command, None) {
                            return None;
                        }
                    }
                },
                _ = sweep.tick() => self.sweep_abandoned(None),
            }
        }
    }

    // ----------------------------------------------------------------------
    // Connected.

    /// Takes a freshly welcomed session into use: re-sends desired state
    /// and marks the client connected. Synchronous so that `connect` can run
    /// it before returning, and callers never observe a half-begun session.
    pub(crate) fn begin_session(&mut self, session: Session) -> LiveSession {
        let Session {
            reader,
            writer,
            welcome,
            link,
        } = session;
        let mut outbox = Outbox {
            buffer: BytesMut::with_capacity(OUTBOX_CAPACITY),
            max_frame_bytes: welcome.max_frame_bytes,
        };
        self.on_welcome(welcome, &mut outbox);
        LiveSession {
            reader,
            writer,
            outbox,
            link,
        }
    }

    /// Runs the session until it ends, then ends its transport: closed on
    /// purpose when the client is done, so the relay drops the session at
    /// once, and released before any reconnect when the session was lost.
    async fn drive_session(&mut self, live: LiveSession) -> SessionEnd {
        let LiveSession {
            mut reader,
            mut writer,
            mut outbox,
            link,
        } = live;
        let end = self
            .exchange_frames(&mut reader, &mut writer, &mut outbox)
            .await;
        match end {
            SessionEnd::Shutdown => link.close().await,
            SessionEnd::Lost(_) => link.abandon(),
        }
        end
    }

    async fn exchange_frames(
        &mut self,
        reader: &mut FrameReader,
        writer: &mut ByteWriter,
        outbox: &mut Outbox,
    ) -> SessionEnd {
        // The WELCOME just proved the relay alive: the first PING can wait.
        let mut ticker =
            tokio::time::interval_at(Instant::now() + self.ping_interval, self.ping_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let accepting_commands = outbox.buffer.len() < OUTBOX_HIGH_WATER;
            tokio::select! {
                frame = reader.next() => {
                    if let Err(ended) = self.on_frames(frame, reader, outbox) {
                        if ended.relay_is_owed_go_away {
                            finish_writing(writer, outbox, CLOSE_FLUSH_TIMEOUT).await;
                        }
                        return SessionEnd::Lost(ended.reason);
                    }
                }
                command = self.commands.recv(), if accepting_commands => {
                    let Some(command) = command else {
                        finish_writing(writer, outbox, CLOSE_FLUSH_TIMEOUT).await;
                        return SessionEnd::Shutdown;
                    };
                    if let Flow::Close = self.on_commands(command, outbox) {
                        finish_writing(writer, outbox, CLOSE_FLUSH_TIMEOUT).await;
                        return SessionEnd::Shutdown;
                    }
                }
                written = writer.write_buf(&mut outbox.buffer), if !outbox.buffer.is_empty() => {
                    match written {
                        Ok(0) => return SessionEnd::Lost("relay stopped accepting data".to_owned()),
                        Ok(_) => {}
                        Err(error) => return SessionEnd::Lost(format!("write to relay failed: {error}")),
                    }
                }
                _ = ticker.tick() => {
                    if let Some(overdue) = self.pong_overdue() {
                        return SessionEnd::Lost(format!("no PONG from the relay for {overdue:?}"));
                    }
                    // One keepalive at a time: the relay answers PINGs in
                    // order, each after a barrier, so PINGs sent faster
                    // than a busy relay answers would pile up until the
                    // oldest looked lost. The relay's liveness clock counts
                    // from when it last finished handling a frame, so
                    // waiting for a held PONG never looks like silence.
                    if self.pending_pings.is_empty() {
                        self.send_ping(outbox, PingPurpose::Keepalive);
                    }
                    self.sweep_abandoned(Some(outbox));
                }
            }
        }
    }

    /// Handles `first` and then every further command already queued, so
    /// they leave in one write.
    fn on_commands(&mut self, first: Command, outbox: &mut Outbox) -> Flow {
        if let Flow::Close = self.handle_command(first, Some(outbox)) {
            return Flow::Close;
        }
        for _ in 1..MAX_COMMANDS_PER_BATCH {
            if outbox.buffer.len() >= OUTBOX_HIGH_WATER {
                break;
            }
            match self.commands.try_recv() {
                Ok(command) => {
                    if let Flow::Close = self.handle_command(command, Some(outbox)) {
                        return Flow::Close;
                    }
                }
                // Disconnected is noticed by the next `recv`.
                Err(_) => break,
            }
        }
        Flow::Continue
    }

    /// Handles `first` and every further frame that is already buffered or
    /// readable without waiting.
    fn on_frames(
        &mut self,
        first: Option<Result<Frame, CodecError>>,
        reader: &mut FrameReader,
        outbox: &mut Outbox,
    ) -> Result<(), SessionFailure> {
        let mut next = first;
        let mut handled = 0;
        loop {
            match next {
                Some(Ok(frame)) => {
                    self.handle_frame(frame, outbox)
                        .map_err(|reason| SessionFailure {
                            reason,
                            relay_is_owed_go_away: false,
                        })?
                }
                Some(Err(CodecError::Decode(error))) => {
                    // As the protocol asks: tell the relay why before closing.
                    // Appended, not substituted: the outbox may end mid-frame.
                    let _ = outbox.push(&Frame::GoAway(GoAway {
                        code: error.code(),
                        message: Text::from(error.to_string()),
                    }));
                    return Err(SessionFailure {
                        reason: format!("relay sent an invalid frame: {error}"),
                        relay_is_owed_go_away: true,
                    });
                }
                Some(Err(error)) => {
                    return Err(SessionFailure {
                        reason: format!("read from relay failed: {error}"),
                        relay_is_owed_go_away: false,
                    })
                }
                None => {
                    return Err(SessionFailure {
                        reason: "relay closed the connection".to_owned(),
                        relay_is_owed_go_away: false,
                    })
                }
            }
            handled += 1;
            if handled == MAX_FRAMES_PER_BATCH {
                // The rest stays in the read buffer for the next turn.
                return Ok(());
            }
            // Polling without waiting: decodes frames left in the read
            // buffer, or reads more if the socket has some.
            match reader.next().now_or_never() {
                Some(frame) => next = frame,
                None => return Ok(()),
            }
        }
    }

    fn on_welcome(&mut self, welcome: Welcome, outbox: &mut Outbox) {
        let Welcome {
            session_id,
            instance_id,
            relay_id,
            max_frame_bytes,
            nats,
            etcd,
            ..
        } = welcome;
        self.shared.set_instance_id(instance_id);
        self.shared.set_max_frame_bytes(max_frame_bytes);

        // A new session holds none of this process's keys (the relay
        // removed them with the old session): registrations go first, so
        // the process is discoverable again before anything that relies on it.
        let shared = Arc::clone(&self.shared);
        for frame in self.registrations.replay(|| shared.next_request_id()) {
            match outbox.push(&frame) {
                Ok(()) => self.registrations.sent(&frame, None),
                Err(error) => {
                    if let Frame::Register(register) = &frame {
                        warn!(key = %String::from_utf8_lossy(&register.key), %error, "cannot re-register after reconnect; dropping the registration");
                        self.registrations.abandon(&register.key);
                    }
                }
            }
        }

        // Then watches, each replaying its prefix's entries.
        for frame in self.watches.replay() {
            if let Err(error) = outbox.push(&frame) {
                if let Frame::Watch(watch) = &frame {
                    warn!(watch_id = watch.watch_id, %error, "cannot re-watch after reconnect; ending the watch");
                    if let Some(id) = self.watches.id_for_wire_id(watch.watch_id) {
                        self.watches.terminate(id, too_large(error));
                    }
                }
            }
        }

        // A new connection starts with no subscriptions on the relay:
        // re-register every live one under its old sid.
        self.subscriptions
            .retain(|_, subscription| !subscription.sender.is_closed());
        let mut sids: Vec<u32> = self.subscriptions.keys().copied().collect();
        sids.sort_unstable();
        for sid in sids {
            let Some(subscription) = self.subscriptions.get(&sid) else {
                continue;
            };
            let frame = Frame::Subscribe(Subscribe {
                sid,
                subject: subscription.subject.clone(),
                queue_group: subscription.queue_group.clone(),
            });
            if let Err(error) = outbox.push(&frame) {
                warn!(sid, %error, "cannot re-subscribe after reconnect; ending the subscription");
                if let Some(subscription) = self.subscriptions.remove(&sid) {
                    subscription.state.terminate(too_large(error));
                }
            }
        }

        // Then what was published while away, in the order it was published.
        let buffered = self.offline.take_all();
        let replayed = buffered.len();
        for publish in buffered {
            self.write_publish(publish, outbox);
        }

        self.shared.set_relay_connected(true);
        self.backoff.reset();
        info!(relay_id = %relay_id, session_id, instance_id, registrations = self.registrations.len(), watches = self.watches.len(), subscriptions = self.subscriptions.len(), replayed, "connected to the holdfast relay");
        let _ = self.events.send(LinkEvent::RelayConnected {
            relay_id: relay_id.to_string(),
            session_id,
        });
        self.set_upstream(Service::Nats, nats);
        self.set_upstream(Service::Etcd, etcd);
    }

    /// The connection is gone: everything written on it has an unknown outcome.
    fn on_session_lost(&mut self, reason: String) {
        self.shared.set_relay_connected(false);
        warn!(%reason, "lost the connection to the holdfast relay; reconnecting");
        for (_, waiter) in self.pending_acks.drain() {
            let _ = waiter.send(Err(Error::ConnectionLost));
        }
        for (_, waiter) in self.pending_requests.drain() {
            let _ = waiter.send(Err(Error::ConnectionLost));
        }
        for (_, waiter) in self.pending_statuses.drain() {
            let _ = waiter.send(Err(Error::ConnectionLost));
        }
        for (_, waiter) in self.pending_gets.drain() {
            let _ = waiter.send(Err(Error::ConnectionLost));
        }
        // Unlike a publish, a registration change in flight is not lost:
        // it is desired state and goes out again on the next session.
        self.registrations.on_connection_lost();
        for ping in std::mem::take(&mut self.pending_pings) {
            if let PingPurpose::Flush(done) = ping.purpose {
                let _ = done.send(Err(Error::ConnectionLost));
            }
        }
        // The relay may or may not have registered these; the caller is
        // told so and gets no subscriber, so none is re-sent either.
        for (sid, waiter) in self.unconfirmed_subscriptions.drain() {
            self.subscriptions.remove(&sid);
            let _ = waiter.send(Err(Error::ConnectionLost));
        }
        for (id, waiter) in self.unconfirmed_watches.drain() {
            self.watches.forget(id);
            let _ = waiter.send(Err(Error::ConnectionLost));
        }
        let _ = self.events.send(LinkEvent::RelayLost { reason });
        self.set_upstream(Service::Nats, LinkStatus::Unknown);
        self.set_upstream(Service::Etcd, LinkStatus::Unknown);
    }

    fn shut_down(&mut self) {
        self.shared.set_relay_connected(false);
        self.shared.set_closed();
        self.commands.close();
        // Commands queued before the close still get an answer.
        while let Ok(command) = self.commands.try_recv() {
            self.reject_after_close(command);
        }
        for (_, waiter) in self.pending_acks.drain() {
            let _ = waiter.send(Err(Error::Closed));
        }
        for (_, waiter) in self.pending_requests.drain() {
            let _ = waiter.send(Err(Error::Closed));
        }
        for (_, waiter) in self.pending_statuses.drain() {
            let _ = waiter.send(Err(Error::Closed));
        }
        for (_, waiter) in self.pending_gets.drain() {
            let _ = waiter.send(Err(Error::Closed));
        }
        self.registrations.on_close();
        for ping in std::mem::take(&mut self.pending_pings) {
            if let PingPurpose::Flush(done) = ping.purpose {
                let _ = done.send(Err(Error::Closed));
            }
        }
        for (_, waiter) in self.unconfirmed_subscriptions.drain() {
            let _ = waiter.send(Err(Error::Closed));
        }
        for (_, waiter) in self.unconfirmed_watches.drain() {
            let _ = waiter.send(Err(Error::Closed));
        }
        self.watches.terminate_all(|| Error::Closed);
        let abandoned = self.offline.take_all();
        if !abandoned.is_empty() {
            warn!(
                messages = abandoned.len(),
                "client closed with publishes still buffered for the relay; they are dropped"
            );
        }
        for publish in abandoned {
            self.fail_publish(publish, Error::Closed);
        }
        for (_, subscription) in self.subscriptions.drain() {
            subscription.state.terminate(Error::Closed);
        }
        if let Some(done) = self.close_requested.take() {
            let _ = done.send(());
        }
    }

    fn reject_after_close(&mut self, command: Command) {
        match command {
            Command::Publish(publish) => {
                self.fail_publish(publish, Error::Closed);
            }
            Command::Subscribe { confirmed, .. } => {
                let _ = confirmed.send(Err(Error::Closed));
            }
            Command::Request { reply, .. } => {
                let _ = reply.send(Err(Error::Closed));
            }
            Command::Flush { done } => {
                let _ = done.send(Err(Error::Closed));
            }
            Command::Status { reply } => {
                let _ = reply.send(Err(Error::Closed));
            }
            Command::Unsubscribe { done, .. } | Command::Unwatch { done, .. } => {
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Command::Register { reply, .. } | Command::Deregister { reply, .. } => {
                let _ = reply.send(Err(Error::Closed));
            }
            Command::Get { reply, .. } => {
                let _ = reply.send(Err(Error::Closed));
            }
            Command::Watch { confirmed, .. } => {
                let _ = confirmed.send(Err(Error::Closed));
            }
            Command::Close { done } => {
                let _ = done.send(());
            }
        }
    }

    // ----------------------------------------------------------------------
    // Commands. `outbox` is `None` while disconnected.

    fn handle_command(&mut self, command: Command, outbox: Option<&mut Outbox>) -> Flow {
        match command {
            Command::Publish(publish) => match outbox {
                Some(outbox) => self.write_publish(publish, outbox),
                None => self.hold_offline(publish),
            },
            Command::Subscribe {
                subscription,
                confirmed,
            } => self.subscribe(subscription, confirmed, outbox),
            Command::Unsubscribe { sid, done } => {
                self.unconfirmed_subscriptions.remove(&sid);
                if self.subscriptions.remove(&sid).is_some() {
                    if let Some(outbox) = outbox {
                        let _ = outbox.push(&Frame::Unsubscribe(Unsubscribe { sid }));
                    }
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Command::Request {
                request_id,
                frame,
                reply,
            } => {
                let Some(outbox) = outbox else {
                    let _ = reply.send(Err(Error::RelayUnavailable));
                    return Flow::Continue;
                };
                match outbox.push(&frame) {
                    Ok(()) => {
                        self.pending_requests.insert(request_id, reply);
                    }
                    Err(error) => {
                        let _ = reply.send(Err(too_large(error)));
                    }
                }
            }
            Command::Flush { done } => match outbox {
                Some(outbox) => self.send_ping(outbox, PingPurpose::Flush(done)),
                None => {
                    let _ = done.send(Err(Error::RelayUnavailable));
                }
            },
            Command::Status { reply } => {
                let Some(outbox) = outbox else {
                    let _ = reply.send(Err(Error::RelayUnavailable));
                    return Flow::Continue;
                };
                let request_id = self.next_status_id;
                self.next_status_id = self.next_status_id.wrapping_add(1).max(1);
                let frame = Frame::StatusRequest(holdfast_wire::StatusRequest { request_id });
                match outbox.push(&frame) {
                    Ok(()) => {
                        self.pending_statuses.insert(request_id, reply);
                    }
                    Err(error) => {
                        let _ = reply.send(Err(too_large(error)));
                    }
                }
            }
            Command::Register { key, value, reply } => {
                let request_id = self.shared.next_request_id();
                let frame = self.registrations.register(request_id, key, value);
                self.send_registration_change(frame, reply, outbox);
            }
            Command::Deregister { key, reply } => {
                let request_id = self.shared.next_request_id();
                let frame = self.registrations.deregister(request_id, key);
                self.send_registration_change(frame, reply, outbox);
            }
            Command::Get {
                linearizable,
                prefix,
                reply,
            } => {
                let Some(outbox) = outbox else {
                    let _ = reply.send(Err(Error::RelayUnavailable));
                    return Flow::Continue;
                };
                let request_id = self.shared.next_request_id();
                let frame = Frame::Get(Get {
                    request_id,
                    linearizable,
                    prefix,
                });
                match outbox.push(&frame) {
                    Ok(()) => {
                        self.pending_gets.insert(request_id, reply);
                    }
                    Err(error) => {
                        let _ = reply.send(Err(too_large(error)));
                    }
                }
            }
            Command::Watch { watch, confirmed } => self.watch(watch, confirmed, outbox),
            Command::Unwatch { id, done } => {
                self.unconfirmed_watches.remove(&id);
                if let Some(unwatch) = self.watches.remove(id) {
                    if let Some(outbox) = outbox {
                        let _ = outbox.push(&unwatch);
                    }
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Command::Close { done } => {
                self.close_requested = Some(done);
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Sends a REGISTER or DEREGISTER whose desired state is already
    /// recorded; offline, the caller learns at once that it is buffered.
    fn send_registration_change(
        &mut self,
        frame: Frame,
        reply: RegistrationWaiter,
        outbox: Option<&mut Outbox>,
    ) {
        let Some(outbox) = outbox else {
            let _ = reply.send(Ok(RegistrationStatus::Buffered));
            return;
        };
        match outbox.push(&frame) {
            Ok(()) => self.registrations.sent(&frame, Some(reply)),
            Err(error) => {
                if let Frame::Register(register) = &frame {
                    self.registrations.abandon(&register.key);
                }
                let _ = reply.send(Err(too_large(error)));
            }
        }
    }

    fn watch(
        &mut self,
        watch: NewWatch,
        confirmed: oneshot::Sender<Result<()>>,
        outbox: Option<&mut Outbox>,
    ) {
        let id = watch.id;
        let frame = self.watches.insert(watch);
        let Some(outbox) = outbox else {
            // Desired state: it is sent with the others on the next WELCOME.
            let _ = confirmed.send(Ok(()));
            return;
        };
        match outbox.push(&frame) {
            Ok(()) => {
                self.unconfirmed_watches.insert(id, confirmed);
                self.send_ping(outbox, PingPurpose::ConfirmWatch(id));
            }
            Err(error) => {
                self.watches.forget(id);
                let _ = confirmed.send(Err(too_large(error)));
            }
        }
    }

    fn write_publish(&mut self, mut publish: OutgoingPublish, outbox: &mut Outbox) {
        match outbox.push(&publish.frame) {
            Ok(()) => {
                if let Some(ack) = publish.ack.take() {
                    self.pending_acks.insert(ack.ack_id, ack.sender);
                }
                if let Some(enqueued) = publish.enqueued.take() {
                    let _ = enqueued.send(Ok(()));
                }
            }
            Err(error) => self.fail_publish(publish, too_large(error)),
        }
    }

    fn hold_offline(&mut self, mut publish: OutgoingPublish) {
        let enqueued = publish.enqueued.take();
        let size = publish.encoded_len;
        match self.offline.push(publish, size) {
            Ok(()) => {
                if let Some(enqueued) = enqueued {
                    let _ = enqueued.send(Ok(()));
                }
            }
            Err(refused) => {
                let (mut publish, error) = match refused {
                    Refused::Full(publish) => (publish, Error::BufferFull),
                    // Fail-fast: nothing waits for the relay.
                    Refused::Disabled(publish) => (publish, Error::RelayUnavailable),
                };
                publish.enqueued = enqueued;
                self.fail_publish(publish, error);
            }
        }
    }

    /// Tells whoever waits on `publish` that it failed; a fire-and-forget
    /// publish nobody waits on is counted and logged instead.
    fn fail_publish(&self, mut publish: OutgoingPublish, error: Error) {
        // A handle waiting for the enqueue result has not handed out its
        // ack future yet, so the enqueue result is the one to fail.
        if let Some(enqueued) = publish.enqueued.take() {
            let _ = enqueued.send(Err(error));
            return;
        }
        if let Some(ack) = publish.ack.take() {
            let _ = ack.sender.send(Err(error));
            return;
        }
        let dropped = self.shared.count_dropped_publish();
        let subject = match &publish.frame {
            Frame::Publish(frame) => frame.subject.as_str(),
            _ => "",
        };
        warn!(
            subject,
            dropped_total = dropped,
            reason = %error,
            "dropped a fire-and-forget publish"
        );
    }

    fn subscribe(
        &mut self,
        subscription: NewSubscription,
        confirmed: oneshot::Sender<Result<()>>,
        outbox: Option<&mut Outbox>,
    ) {
        let NewSubscription {
            sid,
            subject,
            queue_group,
            sender,
            state,
        } = subscription;
        let frame = Frame::Subscribe(Subscribe {
            sid,
            subject: subject.clone(),
            queue_group: queue_group.clone(),
        });
        self.subscriptions.insert(
            sid,
            LiveSubscription {
                subject,
                queue_group,
                sender,
                state,
            },
        );
        let Some(outbox) = outbox else {
            // Desired state: it is sent with the others on the next WELCOME.
            let _ = confirmed.send(Ok(()));
            return;
        };
        match outbox.push(&frame) {
            Ok(()) => {
                self.unconfirmed_subscriptions.insert(sid, confirmed);
                self.send_ping(outbox, PingPurpose::ConfirmSubscription(sid));
            }
            Err(error) => {
                self.subscriptions.remove(&sid);
                let _ = confirmed.send(Err(too_large(error)));
            }
        }
    }

    fn send_ping(&mut self, outbox: &mut Outbox, purpose: PingPurpose) {
        let nonce = self.next_ping_nonce;
        self.next_ping_nonce = self.next_ping_nonce.wrapping_add(1);
        match outbox.push(&Frame::Ping(Ping { nonce })) {
            Ok(()) => self.pending_pings.push_back(PendingPing {
                nonce,
                sent_at: Instant::now(),
                purpose,
            }),
            // Only a relay limit below a dozen bytes gets here.
            Err(error) => self.complete_ping(purpose, Err(too_large(error))),
        }
    }

    fn complete_ping(&mut self, purpose: PingPurpose, result: Result<()>) {
        match purpose {
            PingPurpose::Keepalive => {}
            PingPurpose::Flush(done) => {
                let _ = done.send(result);
            }
            PingPurpose::ConfirmSubscription(sid) => {
                if let Some(waiter) = self.unconfirmed_subscriptions.remove(&sid) {
                    if result.is_err() {
                        self.subscriptions.remove(&sid);
                    }
                    let _ = waiter.send(result);
                }
            }
            PingPurpose::ConfirmWatch(id) => {
                if let Some(waiter) = self.unconfirmed_watches.remove(&id) {
                    if result.is_err() {
                        self.watches.forget(id);
                    }
                    let _ = waiter.send(result);
                }
            }
        }
    }

    /// How long the oldest unanswered PING has waited, if longer than allowed.
    fn pong_overdue(&self) -> Option<Duration> {
        let oldest = self.pending_pings.front()?;
        let waited = oldest.sent_at.elapsed();
        (waited > self.pong_timeout).then_some(waited)
    }

    /// Forgets waiters whose handles gave up (timed out or dropped), so an
    /// unanswered relay cannot grow these maps without bound.
    /// Also resyncs watchers that dropped events and have caught up since.
    fn sweep_abandoned(&mut self, mut outbox: Option<&mut Outbox>) {
        self.pending_requests
            .retain(|_, waiter| !waiter.is_closed());
        self.pending_statuses
            .retain(|_, waiter| !waiter.is_closed());
        self.pending_gets.retain(|_, waiter| !waiter.is_closed());
        self.pending_acks.retain(|_, waiter| !waiter.is_closed());
        self.registrations.sweep_abandoned();
        let unconfirmed = &self.unconfirmed_watches;
        let unwatches = self
            .watches
            .sweep_abandoned(|id| unconfirmed.contains_key(&id));
        if let Some(outbox) = outbox.as_deref_mut() {
            for unwatch in unwatches {
                let _ = outbox.push(&unwatch);
            }
            let shared = Arc::clone(&self.shared);
            for frame in self.watches.resync_caught_up(|| shared.next_sid()) {
                let _ = outbox.push(&frame);
            }
        }
        let abandoned: Vec<u32> = self
            .subscriptions
            .iter()
            .filter(|(sid, subscription)| {
                subscription.sender.is_closed() && !self.unconfirmed_subscriptions.contains_key(sid)
            })
            .map(|(sid, _)| *sid)
            .collect();
        if abandoned.is_empty() {
            return;
        }
        for sid in &abandoned {
            self.subscriptions.remove(sid);
        }
        if let Some(outbox) = outbox {
            for sid in abandoned {
                let _ = outbox.push(&Frame::Unsubscribe(Unsubscribe { sid }));
            }
        }
    }

    // ----------------------------------------------------------------------
    // Frames from the relay. `Err` means the session is over.

    fn handle_frame(&mut self, frame: Frame, outbox: &mut Outbox) -> Result<(), String> {
        match frame {
            Frame::Message(message) => self.deliver(message, outbox),
            Frame::PubAck(ack) => self.on_pub_ack(ack),
            Frame::Response(response) => self.on_response(response),
            Frame::Pong(Pong { nonce }) => self.on_pong(nonce),
            Frame::Ping(Ping { nonce }) => {
                let _ = outbox.push(&Frame::Pong(Pong { nonce }));
            }
            Frame::Error(error) => self.on_error(error),
            Frame::LinkState(link) => self.set_upstream(link.service, link.status),
            Frame::StatusResponse(status) => {
                if let Some(waiter) = self.pending_statuses.remove(&status.request_id) {
                    let _ = waiter.send(Ok(status.json));
                }
            }
            Frame::RegisterAck(ack) => {
                if let AckRouting::UnclaimedRejection { key, code, message } =
                    self.registrations.on_ack(ack.request_id, ack.outcome)
                {
                    let key = String::from_utf8_lossy(&key);
                    warn!(%key, %code, %message, "relay refused a registration; it is no longer kept");
                    let _ = self.events.send(LinkEvent::RelayError {
                        code,
                        message: format!("registration of {key} refused: {message}"),
                    });
                }
            }
            Frame::GetResponse(response) => self.on_get_response(response),
            Frame::WatchEvent(event) => {
                if let Some(unwatch) = self.watches.deliver(event) {
                    let _ = outbox.push(&unwatch);
                }
            }
            Frame::GoAway(GoAway { code, message }) => {
                return Err(format!("relay sent GO_AWAY {code}: {message}"));
            }
            other @ (Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::Publish(_)
            | Frame::Subscribe(_)
            | Frame::Unsubscribe(_)
            | Frame::Request(_)
            | Frame::StatusRequest(_)
            | Frame::Register(_)
            | Frame::Deregister(_)
            | Frame::Get(_)
            | Frame::Watch(_)
            | Frame::Unwatch(_)) => {
                warn!(
                    frame_type = other.frame_type(),
                    "relay sent a frame only clients send; ignoring it"
                );
            }
        }
        Ok(())
    }

    fn deliver(&mut self, message: holdfast_wire::Message, outbox: &mut Outbox) {
        let sid = message.sid;
        let Some(subscription) = self.subscriptions.get(&sid) else {
            // Normal just after an unsubscribe: the relay had it in flight.
            debug!(sid, "message for a subscription that no longer exists");
            return;
        };
        let delivery = Message {
            subject: message.subject,
            reply: message.reply,
            headers: message.headers,
            payload: message.payload,
        };
        match subscription.sender.try_send(delivery) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(dropped)) => {
                let total = subscription.state.count_dropped();
                // Logged at powers of two so a stuck subscriber is visible
                // without one log line per dropped message.
                if total.is_power_of_two() {
                    warn!(
                        sid,
                        subscription = %subscription.subject,
                        subject = %dropped.subject,
                        dropped_total = total,
                        "subscriber is not keeping up; dropping messages for it"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.subscriptions.remove(&sid);
                let _ = outbox.push(&Frame::Unsubscribe(Unsubscribe { sid }));
            }
        }
    }

    fn on_pub_ack(&mut self, ack: PubAck) {
        let Some(waiter) = self.pending_acks.remove(&ack.ack_id) else {
            return;
        };
        let outcome = match ack.outcome {
            AckOutcome::Forwarded => Ok(AckStatus::Forwarded),
            AckOutcome::Journaled => Ok(AckStatus::Journaled),
            AckOutcome::Queued => Ok(AckStatus::Queued),
            AckOutcome::Rejected { code, message } => Err(Error::relay(code, message.as_str())),
        };
        let _ = waiter.send(outcome.map(|outcome| Ack {
            outcome,
            local_deliveries: ack.local_deliveries,
        }));
    }

    fn on_response(&mut self, response: Response) {
        let Some(waiter) = self.pending_requests.remove(&response.request_id) else {
            return;
        };
        let result = match response.outcome {
            ResponseOutcome::Reply { headers, payload } => Ok(Reply { headers, payload }),
            ResponseOutcome::Failed { code, message } => Err(Error::relay(code, message.as_str())),
        };
        let _ = waiter.send(result);
    }

    fn on_get_response(&mut self, response: GetResponse) {
        let Some(waiter) = self.pending_gets.remove(&response.request_id) else {
            return;
        };
        let result = match response.outcome {
            GetOutcome::Snapshot(snapshot) => Ok(Snapshot::from(snapshot)),
            GetOutcome::Failed { code, message } => Err(Error::relay(code, message.as_str())),
        };
        let _ = waiter.send(result);
    }

    fn on_pong(&mut self, nonce: u64) {
        if !self.pending_pings.iter().any(|ping| ping.nonce == nonce) {
            debug!(nonce, "PONG for no pending PING");
            return;
        }
        // The relay answers in order, so a PONG also answers every earlier PING.
        while let Some(ping) = self.pending_pings.pop_front() {
            let answered = ping.nonce == nonce;
            self.complete_ping(ping.purpose, Ok(()));
            if answered {
                break;
            }
        }
    }

    fn on_error(&mut self, error: ErrorFrame) {
        let ErrorFrame {
            code,
            reference,
            message,
        } = error;
        let subscription_id = u32::try_from(reference).ok().filter(|sid| *sid != 0);
        if let Some(sid) = subscription_id {
            if let Some(waiter) = self.unconfirmed_subscriptions.remove(&sid) {
                // Refused before its barrier PONG: the relay does not have it.
                self.subscriptions.remove(&sid);
                let _ = waiter.send(Err(Error::relay(code, message.as_str())));
                return;
            }
            if let Some(subscription) = self.subscriptions.get(&sid) {
                if code == ErrorCode::SlowConsumer {
                    warn!(sid, subscription = %subscription.subject, %message, "relay dropped messages for this subscription");
                    return;
                }
                warn!(sid, subscription = %subscription.subject, %code, %message, "relay ended the subscription");
                if let Some(subscription) = self.subscriptions.remove(&sid) {
                    subscription
                        .state
                        .terminate(Error::relay(code, message.as_str()));
                }
                return;
            }
            // Watch ids share the subscription id counter, so a reference
            // that is no subscription's may be a watch's.
            if let Some(id) = self.watches.id_for_wire_id(sid) {
                if let Some(waiter) = self.unconfirmed_watches.remove(&id) {
                    self.watches.forget(id);
                    let _ = waiter.send(Err(Error::relay(code, message.as_str())));
                    return;
                }
                let prefix = self
                    .watches
                    .prefix(id)
                    .map(|prefix| String::from_utf8_lossy(prefix).into_owned())
                    .unwrap_or_default();
                warn!(watch_id = id, %prefix, %code, %message, "relay ended the watch");
                self.watches
                    .terminate(id, Error::relay(code, message.as_str()));
                return;
            }
        }
        if code == ErrorCode::SlowConsumer && reference == 0 && self.watches.len() > 0 {
            // The relay dropped frames it does not name: watch events may
            // be among them, and a watcher with a gap would never converge.
            self.watches.relay_dropped();
        }
        warn!(reference, %code, %message, "error from the relay");
        let _ = self.events.send(LinkEvent::RelayError {
            code,
            message: message.to_string(),
        });
    }

    fn set_upstream(&mut self, service: Service, status: LinkStatus) {
        let changed = self.upstream.send_if_modified(|links| {
            let slot = match service {
                Service::Nats => &mut links.nats,
                Service::Etcd => &mut links.etcd,
            };
            let changed = *slot != status;
            *slot = status;
            changed
        });
        if changed {
            let _ = self.events.send(LinkEvent::Upstream { service, status });
        }
    }
}

fn too_large(error: EncodeError) -> Error {
    match error {
        EncodeError::FrameTooLarge { len, max } => Error::MessageTooLarge { size: len, max },
        EncodeError::FieldTooLong { len, .. } => Error::MessageTooLarge {
            size: len,
            max: u32::MAX,
        },
    }
}

/// Writes what is left for the relay and ends the stream, bounded in time:
/// used when the session ends on purpose or because the relay sent
/// something bad. On QUIC the shutdown also waits for the relay to
/// acknowledge the data, since the connection is closed right after.
async fn finish_writing(writer: &mut ByteWriter, outbox: &mut Outbox, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        writer.write_all_buf(&mut outbox.buffer).await?;
        writer.shutdown().await
    })
    .await;
}
