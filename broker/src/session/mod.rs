//! One client connection: handshake, then frames in, answers out.
//!
//! The session task reads frames (many per socket read) and handles them in
//! order; a separate writer task drains the session's [`Outbox`] and writes
//! everything queued in one syscall. Publishes go straight to the NATS
//! client; subscriptions and node-local delivery go through the router.

pub mod frame_reader;
pub mod outbox;

use crate::context::RelayContext;
use crate::front::access::{Operation, Permissions};
use crate::front::peer::Peer;
use crate::keys::discovery::GetTo;
use crate::keys::registry::model::{Claimant, Process};
use crate::keys::registry::AckTo as RegistrationAckTo;
use crate::messaging::class_queue::QueuedMessage;
use crate::messaging::fanout::DELIVERED_LOCALLY_HEADER;
use crate::messaging::forwarder::{Accept, AcceptBatch, AckRequest};
use crate::messaging::local_message::LocalMessage;
use crate::messaging::nats_convert::{check_headers, from_header_map, to_header_map, to_subject};
use crate::messaging::subscription_table::SubscriptionKey;
use crate::ops::metric_catalog::REQUEST_DURATION_SECONDS;
use crate::ops::stats::{bump, Limit, PublishOutcome, RelayStats};
use crate::ops::status;
use crate::session::frame_reader::{BudgetedFrames, ReadBudgets};
use crate::session::outbox::{charged_bytes, outbox, Outbox, OutboxReceiver};
use async_nats::client::RequestErrorKind;
use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use holdfast_wire::chain::strip_chain_headers;
use holdfast_wire::subject::{
    validate_publish_subject, validate_queue_group, validate_subscribe_subject,
};
use holdfast_wire::{
    encode, AckOutcome, CodecError, Deregister, ErrorCode, ErrorFrame, Frame, Get, GetOutcome,
    GetResponse, GoAway, Hello, LinkState, LinkStatus, Pong, PubAck, Publish, Register,
    RegisterAck, RegistrationOutcome, Request, Response, ResponseOutcome, Service, StatusResponse,
    Subscribe, Text, Watch, Welcome, PROTOCOL_VERSION,
};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// How long a PING barrier waits for the NATS client to flush.
const BARRIER_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Publishes handed to the forwarder at most per hand-over.
const ACCEPT_BATCH: usize = 1024;
/// Frames handled per turn of the session loop before it looks at its
/// timers, link watches and shutdown again.
const FRAMES_PER_TURN: usize = 4096;
/// Frames the writer takes from the outbox per batch.
const WRITE_BATCH_FRAMES: usize = 512;
/// Flush the write buffer early once it holds this much.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// The read half of a connection, whatever the transport.
pub type ByteReader = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection, whatever the transport.
pub type ByteWriter = Box<dyn AsyncWrite + Send + Unpin>;

type Reader = BudgetedFrames<ByteReader>;

/// Whether the session goes on after a frame.
enum Flow {
    Continue,
    Close,
}

struct Session {
    id: u64,
    ctx: Arc<RelayContext>,
    peer: Peer,
    permissions: Arc<Permissions>,
    /// Operations already logged as denied, so a client retrying a denied
    /// publish in a loop logs once, not once per message (all are counted).
    denials_logged: std::sync::Mutex<HashSet<&'static str>>,
    outbox: Outbox,
    requests_in_flight: Arc<Semaphore>,
    /// Publishes read but not yet handed to the forwarder. Only this
    /// session's task touches it; the mutex is never contended.
    accepts: std::sync::Mutex<Vec<Accept>>,
    /// Keys this session registered, as hashes: while any exist the
    /// session must keep sending within the liveness timeout. Only this
    /// session's task touches it (as `accepts`). Hashes, and at most
    /// `etcd.max_registrations_per_session` of them: a key the registry
    /// refuses stays here until DEREGISTER or the end of the session, and
    /// keys may be 64 KiB each.
    registered: std::sync::Mutex<HashSet<u64>>,
    registered_hasher: std::collections::hash_map::RandomState,
    /// The client process behind this session, once HELLO named it: a
    /// later session of the same process may take its keys over.
    process: std::sync::OnceLock<Process>,
    watches: std::sync::Mutex<HashSet<u32>>,
    /// A SUBSCRIBE was taken since the last PING barrier: that barrier must
    /// wait until NATS has the subscription, not just until it is written.
    subscribed_since_barrier: std::sync::atomic::AtomicBool,
    /// A PUBLISH was taken since the last PING barrier that completed. If
    /// not, a PING (most are keepalives, four a second per connection by
    /// default) is answered at once: there is nothing of this session's to
    /// wait for, and thousands of idle connections would otherwise keep the
    /// forwarder and the NATS client busy with barriers and flushes.
    published_since_barrier: std::sync::atomic::AtomicBool,
    /// A publish with a reply subject went to NATS since the last PING
    /// barrier (on the subscriber connection, which the barrier must then
    /// round-trip too).
    requested_since_barrier: std::sync::atomic::AtomicBool,
}

/// How a session ended, as far as its registrations care.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Closed,
    LivenessExpired,
}

/// Keeps the active-sessions gauge right however the session ends.
struct ActiveGuard(Arc<RelayStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.sessions_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection until it closes, errs, or the relay shuts down.
pub async fn run(
    read_half: ByteReader,
    write_half: ByteWriter,
    peer: Peer,
    ctx: Arc<RelayContext>,
) {
    run_on_stream(read_half, write_half, peer, ctx, StreamContext::default()).await;
}

/// What a QUIC connection shares with the sessions on its streams.
#[derive(Default)]
pub struct StreamContext {
    /// Told when the client's HELLO was accepted (a connection that serves
    /// is told from one that only holds a slot).
    pub hello: Option<tokio::sync::oneshot::Sender<()>>,
    /// The connection's read budget, shared by its streams.
    pub read_budget: Option<Arc<Semaphore>>,
}

/// As [`run`], for one stream of a connection that carries several.
pub async fn run_on_stream(
    read_half: ByteReader,
    write_half: ByteWriter,
    peer: Peer,
    ctx: Arc<RelayContext>,
    stream: StreamContext,
) {
    let hello = stream.hello;
    let id = ctx.next_session_id();
    bump(&ctx.stats.sessions_total);
    ctx.stats.sessions_active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(ctx.stats.clone());

    let max_frame = ctx.config.relay.max_frame_bytes;
    let budgets = ReadBudgets::new(
        stream
            .read_budget
            .into_iter()
            .chain(std::iter::once(ctx.read_budget.clone()))
            .collect(),
    );
    let mut reader = BudgetedFrames::new(read_half, max_frame, budgets, ctx.stats.clone());
    let sessions = &ctx.config.sessions;
    let (outbox, outbox_receiver) = outbox(
        id,
        sessions.outbound_queue_frames,
        sessions.outbound_queue_bytes,
        sessions.slow_consumer,
        ctx.stats.clone(),
    );
    let writer = tokio::spawn(write_loop(write_half, outbox_receiver, max_frame));
    let session = Session {
        id,
        ctx: ctx.clone(),
        permissions: ctx.access.permissions(&peer),
        peer,
        denials_logged: Default::default(),
        outbox,
        requests_in_flight: Arc::new(Semaphore::new(sessions.max_inflight_requests)),
        accepts: std::sync::Mutex::new(Vec::new()),
        registered: Default::default(),
        registered_hasher: Default::default(),
        process: Default::default(),
        watches: Default::default(),
        subscribed_since_barrier: Default::default(),
        published_since_barrier: Default::default(),
        requested_since_barrier: Default::default(),
    };
    let ending = session.serve(&mut reader, hello).await;
    ctx.router.remove_session(id).await;
    if session.has_registrations() {
        ctx.registry
            .session_closed(id, ending == Ending::LivenessExpired)
            .await;
    }
    if session.has_watches() {
        ctx.discovery.session_closed(id).await;
    }
    drop(session);
    // The writer ends once it has written GO_AWAY or every outbox handle is
    // gone; bound the wait so a peer that stopped reading cannot hold us.
    if tokio::time::timeout(ctx.config.relay.shutdown_grace, writer)
        .await
        .is_err()
    {
        debug!(
            session = id,
            "writer did not finish in time; connection dropped"
        );
    }
}

impl Session {
    async fn serve(
        &self,
        reader: &mut Reader,
        said_hello: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Ending {
        let Some(hello) = self.handshake(reader).await else {
            return Ending::Closed;
        };
        if let Some(said_hello) = said_hello {
            let _ = said_hello.send(());
        }
        info!(
            session = self.id,
            client = %hello.client_name,
            peer = %self.peer,
            access = %self.permissions.source,
            "session started"
        );
        let mut link = self.ctx.nats.watch();
        link.borrow_and_update();
        let mut etcd = self.ctx.etcd.watch();
        let mut etcd_status = etcd.borrow_and_update().link.status;
        let mut etcd_watching = self.ctx.etcd.is_enabled();
        let liveness_timeout = self.ctx.config.etcd.liveness_timeout;
        let idle_timeout = self.ctx.config.sessions.idle_timeout;
        let mut last_heard = tokio::time::Instant::now();
        let mut answers_unread = false;
        let mut pauses = 0u64;
        loop {
            let liveness_deadline = last_heard + liveness_timeout;
            let idle_deadline = last_heard + idle_timeout;
            // A client that sends but does not read its answers gets no
            // more of its requests read until it catches up: the answers
            // wait in memory, and this keeps them bounded.
            let at_limit = self.outbox.unread_answers_at_limit();
            if at_limit && !answers_unread {
                self.ctx.stats.record_limit(Limit::UnreadAnswers);
                pauses += 1;
                // Counted every time; logged at warn once per connection,
                // as a client that lags behind its answers may pause often.
                if pauses == 1 {
                    warn!(
                        session = self.id,
                        client = %hello.client_name,
                        peer = %self.peer,
                        "client is not reading its answers; its requests are not read until it does (further pauses on this connection are logged at debug)"
                    );
                } else {
                    debug!(
                        session = self.id,
                        pauses, "reading paused for unread answers"
                    );
                }
            }
            answers_unread = at_limit;
            let flow = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => {
                    // Everything this client sent is answered before goodbye.
                    self.flush_accepts().await;
                    let _ = tokio::time::timeout(BARRIER_FLUSH_TIMEOUT, self.ctx.forwarder.barrier()).await;
                    self.go_away(ErrorCode::ShuttingDown, "relay is shutting down; reconnect").await;
                    Flow::Close
                }
                _ = self.outbox.close_requested() => {
                    self.go_away(ErrorCode::SlowConsumer, "subscriber did not keep up; disconnected").await;
                    Flow::Close
                }
                changed = link.changed() => match changed {
                    Ok(()) => {
                        let status = link.borrow_and_update().status;
                        let frame = Frame::LinkState(LinkState { service: Service::Nats, status });
                        self.send(frame).await
                    }
                    Err(_) => Flow::Continue,
                },
                changed = etcd.changed(), if etcd_watching => match changed {
                    Ok(()) => {
                        let status = etcd.borrow_and_update().link.status;
                        if status == etcd_status {
                            Flow::Continue
                        } else {
                            etcd_status = status;
                            let frame = Frame::LinkState(LinkState { service: Service::Etcd, status });
                            self.send(frame).await
                        }
                    }
                    // The link task stopped: the relay is shutting down.
                    Err(_) => {
                        etcd_watching = false;
                        Flow::Continue
                    }
                },
                // Not while reading is paused for unread answers: that
                // client is sending, and its requests wait in the socket.
                _ = tokio::time::sleep_until(liveness_deadline), if self.has_registrations() && !at_limit => {
                    // Frames may be waiting behind a slow handler; only a
                    // client that really sent nothing is dead.
                    match self.handle_ready_frame(reader).await {
                        Some(flow) => {
                            last_heard = tokio::time::Instant::now();
                            flow
                        }
                        None => {
                            warn!(
                                session = self.id,
                                client = %hello.client_name,
                                liveness_timeout_ms = liveness_timeout.as_millis() as u64,
                                "client sent nothing within the liveness timeout; ending its session and removing its registrations"
                            );
                            // Whatever it did send is still answered.
                            self.flush_accepts().await;
                            self.go_away(ErrorCode::Timeout, "no heartbeat within the liveness timeout").await;
                            return Ending::LivenessExpired;
                        }
                    }
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    if at_limit {
                        // It read none of its answers for the whole idle
                        // timeout; a GO_AWAY would wait behind them too.
                        crate::ops::stats::bump(&self.ctx.stats.slow_consumer_disconnects);
                        warn!(
                            session = self.id,
                            client = %hello.client_name,
                            peer = %self.peer,
                            idle_timeout_ms = idle_timeout.as_millis() as u64,
                            reason = "slow_consumer",
                            "client read none of its answers within the idle timeout; closing its connection"
                        );
                        return Ending::Closed;
                    }
                    if let Some(flow) = self.handle_ready_frame(reader).await {
                        last_heard = tokio::time::Instant::now();
                        flow
                    } else {
                        self.ctx.stats.record_limit(Limit::IdleTimeout);
                        info!(
                            session = self.id,
                            client = %hello.client_name,
                            peer = %self.peer,
                            idle_timeout_ms = idle_timeout.as_millis() as u64,
                            "client sent nothing within the idle timeout; closing its connection"
                        );
                        self.flush_accepts().await;
                        let message = format!(
                            "nothing received for {idle_timeout:?} (sessions.idle_timeout)"
                        );
                        self.go_away(ErrorCode::Timeout, &message).await;
                        return Ending::Closed;
                    }
                }
                () = self.outbox.unread_answers_drained(), if at_limit => Flow::Continue,
                frame = reader.next(), if !at_limit => {
                    let flow = self.on_ready_frames(frame, reader).await;
                    // The liveness clock runs only while the relay waits
                    // on the socket: a client waiting for a PONG the
                    // relay holds (a PING barrier) is not silent.
                    last_heard = tokio::time::Instant::now();
                    flow
                }
            };
            if matches!(flow, Flow::Close) {
                self.flush_accepts().await;
                break;
            }
        }
        debug!(session = self.id, "session ended");
        Ending::Closed
    }

    /// Counts and logs a refusal by the access rules; returns the message
    /// for the client.
    fn denied(&self, operation: Operation, target: &str) -> String {
        self.ctx.stats.record_access_denial(operation);
        let first = lock(&self.denials_logged).insert(operation.name());
        if first {
            warn!(
                session = self.id,
                peer = %self.peer,
                access = %self.permissions.source,
                operation = operation.name(),
                target,
                "operation denied by the access rules (further denials of this kind on this connection are logged at debug)"
            );
        } else {
            debug!(
                session = self.id,
                operation = operation.name(),
                target,
                "operation denied by the access rules"
            );
        }
        format!(
            "{} `{target}` is not allowed for {} (by {})",
            operation.name(),
            self.peer,
            self.permissions.source
        )
    }

    /// Handles `first` and then every frame that can be read without
    /// waiting, up to [`FRAMES_PER_TURN`]. The select loop around this (its
    /// timers, link watches and shutdown) then runs once per read instead of
    /// once per frame, which is most of a small publish's cost otherwise.
    async fn on_ready_frames(
        &self,
        first: Option<Result<Frame, CodecError>>,
        reader: &mut Reader,
    ) -> Flow {
        let mut next = first;
        let mut handled = 0;
        loop {
            let frame = match next {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    // What was accepted before the bad bytes is answered.
                    self.flush_accepts().await;
                    self.on_read_error(error).await;
                    return Flow::Close;
                }
                None => return Flow::Close,
            };
            // Publishes wait in a batch until this read is used up; anything
            // else first hands them over, in order.
            if !matches!(frame, Frame::Publish(_)) {
                self.flush_accepts().await;
            }
            if let Flow::Close = self.on_frame(frame).await {
                return Flow::Close;
            }
            handled += 1;
            // Checked before the next read: a frame taken off the reader
            // must be handled, never dropped at the end of a turn.
            if handled == FRAMES_PER_TURN {
                break;
            }
            match reader.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
        self.flush_accepts().await;
        Flow::Continue
    }

    /// Handles the frames that can be read without waiting, as a turn of
    /// the loop does; `None` when the client has really sent nothing.
    async fn handle_ready_frame(&self, reader: &mut Reader) -> Option<Flow> {
        let first = reader.next().now_or_never()?;
        Some(self.on_ready_frames(first, reader).await)
    }

    fn has_registrations(&self) -> bool {
        !lock(&self.registered).is_empty()
    }

    fn has_watches(&self) -> bool {
        !lock(&self.watches).is_empty()
    }

    async fn handshake(&self, reader: &mut Reader) -> Option<Hello> {
        let hello_timeout = self.ctx.config.sessions.hello_timeout;
        let first = match tokio::time::timeout(hello_timeout, reader.next()).await {
            Err(_) => {
                self.ctx.stats.record_limit(Limit::HelloTimeout);
                debug!(session = self.id, peer = %self.peer, "no HELLO in time; closing");
                let message = format!("no HELLO within {hello_timeout:?} (sessions.hello_timeout)");
                self.go_away(ErrorCode::Timeout, &message).await;
                return None;
            }
            Ok(None) => return None,
            Ok(Some(Err(error))) => {
                self.on_read_error(error).await;
                return None;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Frame::Hello(hello) = first else {
            self.go_away(
                ErrorCode::ProtocolViolation,
                "the first frame must be HELLO",
            )
            .await;
            return None;
        };
        if !(hello.min_version..=hello.max_version).contains(&PROTOCOL_VERSION) {
            let message = format!(
                "client speaks versions {}..={}, relay speaks {PROTOCOL_VERSION}",
                hello.min_version, hello.max_version
            );
            self.go_away(ErrorCode::UnsupportedVersion, &message).await;
            return None;
        }
        let instance_id = if hello.instance_id == 0 {
            new_instance_id()
        } else {
            hello.instance_id
        };
        let _ = self.process.set(Process {
            instance_id,
            identity: self.peer.identity(),
        });
        let link = self.ctx.nats.snapshot();
        let welcome = Frame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session_id: self.id,
            instance_id,
            relay_id: self.ctx.relay_id.clone(),
            max_frame_bytes: self.ctx.config.relay.max_frame_bytes,
            nats: link.status,
            etcd: self.ctx.etcd.snapshot().status,
        });
        match self.send(welcome).await {
            Flow::Continue => Some(hello),
            Flow::Close => None,
        }
    }

    async fn on_frame(&self, frame: Frame) -> Flow {
        match frame {
            Frame::Publish(publish) => self.on_publish(publish).await,
            Frame::Subscribe(subscribe) => self.on_subscribe(subscribe).await,
            Frame::Unsubscribe(unsubscribe) => {
                self.ctx
                    .router
                    .unsubscribe((self.id, unsubscribe.sid))
                    .await;
                Flow::Continue
            }
            Frame::Request(request) => self.on_request(request).await,
            Frame::Ping(ping) => {
                // Barrier: everything before this PING was answered by the
                // forwarder (journaled, queued or handed to the NATS client);
                // flushing the client makes "handed" mean "written". PING is
                // also the client's keepalive, so the wait is bounded: a
                // slow upstream must not look like a dead relay.
                let published = self.published_since_barrier.swap(false, Ordering::Relaxed);
                if published {
                    let barrier = self.ctx.forwarder.barrier();
                    if tokio::time::timeout(BARRIER_FLUSH_TIMEOUT, barrier)
                        .await
                        .is_err()
                    {
                        // Not everything was answered: the next PING waits again.
                        self.published_since_barrier.store(true, Ordering::Relaxed);
                    }
                }
                if self.ctx.nats.is_up() {
                    // Subscriptions and requests go on the subscriber
                    // connection, everything else on the NATS client's.
                    let subscribed = self.subscribed_since_barrier.swap(false, Ordering::Relaxed);
                    let requested = self.requested_since_barrier.swap(false, Ordering::Relaxed);
                    if subscribed || requested {
                        self.ctx
                            .nats
                            .subscriptions_round_trip(BARRIER_FLUSH_TIMEOUT)
                            .await;
                    }
                    if published {
                        let flush = self.ctx.nats.client().flush();
                        let _ = tokio::time::timeout(BARRIER_FLUSH_TIMEOUT, flush).await;
                    }
                }
                self.send(Frame::Pong(Pong { nonce: ping.nonce })).await
            }
            Frame::StatusRequest(request) => {
                let document = status::document(&self.ctx).await;
                let json = serde_json::to_vec(&document).unwrap_or_default();
                self.send(Frame::StatusResponse(StatusResponse {
                    request_id: request.request_id,
                    json: json.into(),
                }))
                .await
            }
            Frame::Register(register) => self.on_register(register).await,
            Frame::Deregister(deregister) => self.on_deregister(deregister).await,
            Frame::Get(get) => self.on_get(get).await,
            Frame::Watch(watch) => self.on_watch(watch).await,
            Frame::Unwatch(unwatch) => {
                if lock(&self.watches).remove(&unwatch.watch_id) {
                    self.ctx.discovery.unwatch(self.id, unwatch.watch_id).await;
                }
                Flow::Continue
            }
            Frame::Pong(_) => Flow::Continue,
            Frame::Error(error) => {
                debug!(session = self.id, code = %error.code, message = %error.message, "client reported an error");
                Flow::Continue
            }
            Frame::GoAway(_) => Flow::Close,
            Frame::Hello(_) => {
                self.go_away(
                    ErrorCode::ProtocolViolation,
                    "HELLO after WELCOME: a connection says HELLO once",
                )
                .await;
                Flow::Close
            }
            other => {
                let message = format!(
                    "frame type 0x{:02x} is only sent by the relay",
                    other.frame_type()
                );
                self.go_away(ErrorCode::ProtocolViolation, &message).await;
                Flow::Close
            }
        }
    }

    /// Handles a publish. Class traffic goes to the forwarder, which answers
    /// it; requests and replies (a reply subject, or an `_INBOX.` subject)
    /// are never queued or journaled: a late answer is worse than an error.
    async fn on_publish(&self, publish: Publish) -> Flow {
        self.published_since_barrier.store(true, Ordering::Relaxed);
        let classes = &self.ctx.classes;
        let class = match classes.classify(publish.class.as_deref(), &publish.subject) {
            Ok(class) => class,
            Err(unknown) => {
                let code = ErrorCode::UnknownClass;
                self.ctx
                    .stats
                    .record_rejection(classes.default_class(), code);
                let known: Vec<&str> = classes.names().collect();
                let reason = format!(
                    "unknown message class {unknown:?}; known classes: {}",
                    known.join(", ")
                );
                return self.reject(publish.ack_id, code, reason, 0).await;
            }
        };
        if let Some((code, reason)) = check_publish(&publish, self.ctx.nats.max_payload()) {
            self.ctx.stats.record_rejection(class, code);
            return self.reject(publish.ack_id, code, reason, 0).await;
        }
        if !self.permissions.may_publish(&publish.subject) {
            let code = ErrorCode::Unauthorized;
            self.ctx.stats.record_rejection(class, code);
            let reason = self.denied(Operation::Publish, &publish.subject);
            return self.reject(publish.ack_id, code, reason, 0).await;
        }
        let is_request_traffic = publish.reply.is_some() || publish.subject.starts_with("_INBOX.");
        let mut message = LocalMessage {
            subject: publish.subject,
            reply: publish.reply,
            headers: publish.headers,
            payload: publish.payload,
        };
        // Only the relay stamps chain and local-delivery headers; a client's
        // own are removed, so nobody can forge a chain or hide a message
        // from this relay's subscribers.
        strip_chain_headers(&mut message.headers);
        message
            .headers
            .0
            .retain(|(name, _)| !name.eq_ignore_ascii_case(DELIVERED_LOCALLY_HEADER));
        if is_request_traffic {
            return self
                .publish_request_traffic(publish.ack_id, class, message)
                .await;
        }
        let mut local_deliveries = 0;
        if !self.ctx.nats.is_up() && self.ctx.router.has_local_subscribers() {
            // Node-local subscribers get it now; the header keeps them from
            // getting it a second time when the replay reaches NATS.
            local_deliveries = self.ctx.router.deliver_local(message.clone()).await;
            if local_deliveries > 0 {
                message
                    .headers
                    .insert(DELIVERED_LOCALLY_HEADER, self.ctx.relay_id.clone());
            }
        }
        let accept = Accept {
            class,
            message: QueuedMessage {
                subject: message.subject,
                headers: message.headers,
                payload: message.payload,
                // Stamped for the whole batch when it is handed over.
                accepted_at_ms: 0,
            },
            ack: AckRequest {
                ack_id: publish.ack_id,
                local_deliveries,
                // Only acked publishes are timed.
                received: (publish.ack_id != 0).then(Instant::now),
            },
        };
        let full = {
            let mut batch = self
                .accepts
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            batch.push(accept);
            batch.len() >= ACCEPT_BATCH
        };
        if full {
            self.flush_accepts().await;
        }
        Flow::Continue
    }

    /// Hands the publishes gathered from this read to the forwarder.
    async fn flush_accepts(&self) {
        let batch = {
            let mut batch = self
                .accepts
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if batch.is_empty() {
                return;
            }
            std::mem::take(&mut *batch)
        };
        // One clock read per hand-over, not per message: the batch is at
        // most one socket read old.
        let accepted_at_ms = crate::util::wall_clock::unix_millis();
        let mut accepts = batch;
        for accept in &mut accepts {
            accept.message.accepted_at_ms = accepted_at_ms;
        }
        let batch = AcceptBatch {
            outbox: self.outbox.clone(),
            accepts,
        };
        if let Err(refused) = self.ctx.forwarder.accept(batch).await {
            for accept in refused {
                let outcome = AckOutcome::Rejected {
                    code: ErrorCode::ShuttingDown,
                    message: Text::from("relay is shutting down"),
                };
                crate::messaging::forwarder::answer(&self.outbox, &accept.ack, None, outcome);
            }
        }
    }

    /// Replies to requests and publishes that carry a reply subject: sent
    /// straight to NATS, or to a local requester, or refused while NATS is down.
    async fn publish_request_traffic(
        &self,
        ack_id: u64,
        class: usize,
        message: LocalMessage,
    ) -> Flow {
        if message
            .subject
            .starts_with(self.ctx.router.local_inbox_prefix())
        {
            self.ctx.router.reply_local(message).await;
            self.ctx
                .stats
                .record_publish(class, PublishOutcome::Forwarded);
            return self.ack(ack_id, AckOutcome::Forwarded, 1).await;
        }
        if self.ctx.nats.is_up() {
            return match self.forward(message).await {
                Ok(()) => {
                    self.ctx
                        .stats
                        .record_publish(class, PublishOutcome::Forwarded);
                    self.ack(ack_id, AckOutcome::Forwarded, 0).await
                }
                Err((code, reason)) => {
                    self.ctx.stats.record_rejection(class, code);
                    self.reject(ack_id, code, reason, 0).await
                }
            };
        }
        let delivered = self.ctx.router.deliver_local(message).await;
        self.ctx
            .stats
            .record_rejection(class, ErrorCode::NatsUnavailable);
        let reason = format!(
            "NATS is unreachable and request traffic is never queued; delivered to {delivered} subscriber(s) on this relay"
        );
        self.reject(ack_id, ErrorCode::NatsUnavailable, reason, delivered)
            .await
    }

    async fn forward(&self, message: LocalMessage) -> Result<(), (ErrorCode, String)> {
        if let Some(reply) = message.reply {
            // On the connection that holds the reply subscriptions, so
            // nats-server's no-responders answer reaches the requester.
            crate::messaging::nats_convert::check_headers(&message.headers)
                .map_err(|error| (ErrorCode::ProtocolViolation, error.to_string()))?;
            self.requested_since_barrier.store(true, Ordering::Relaxed);
            return self
                .ctx
                .nats
                .publish_request(message.subject, reply, message.headers, message.payload)
                .await
                .map_err(|reason| (ErrorCode::NatsUnavailable, reason));
        }
        let headers = to_header_map(&message.headers)
            .map_err(|error| (ErrorCode::ProtocolViolation, error.to_string()))?;
        let client = self.ctx.nats.client();
        let subject = to_subject(&message.subject);
        let handover = async move {
            match headers {
                None => client.publish(subject, message.payload).await,
                Some(headers) => {
                    client
                        .publish_with_headers(subject, headers, message.payload)
                        .await
                }
            }
        };
        // The NATS client's queue blocks when its connection stalls; a
        // publish caught there must not hang the session for the whole
        // outage. `biased` keeps the common case free of any watch access:
        // the link check is only built when the handover did not finish at once.
        let link_lost = async {
            let mut link = self.ctx.nats.watch();
            let _ = link
                .wait_for(|snapshot| snapshot.status != LinkStatus::Up)
                .await;
        };
        let result = tokio::select! {
            biased;
            result = handover => result,
            () = link_lost => {
                return Err((
                    ErrorCode::NatsUnavailable,
                    "NATS link went down before the message was handed over; not forwarded".to_string(),
                ));
            }
        };
        result.map_err(|error| (ErrorCode::NatsUnavailable, error.to_string()))
    }

    async fn on_subscribe(&self, subscribe: Subscribe) -> Flow {
        let sid = subscribe.sid;
        let valid = validate_subscribe_subject(&subscribe.subject).and_then(|()| {
            subscribe
                .queue_group
                .as_deref()
                .map_or(Ok(()), validate_queue_group)
        });
        if let Err(error) = valid {
            return self
                .error(ErrorCode::InvalidSubject, u64::from(sid), error.to_string())
                .await;
        }
        if !self.permissions.may_subscribe(&subscribe.subject) {
            let message = self.denied(Operation::Subscribe, &subscribe.subject);
            return self
                .error(ErrorCode::Unauthorized, u64::from(sid), message)
                .await;
        }
        // Held for the life of the subscription: copied out of the read
        // buffer, which the slices decoded from it would otherwise keep.
        let key = SubscriptionKey {
            subject: Text::from(subscribe.subject.as_str()),
            queue_group: subscribe.queue_group.as_deref().map(Text::from),
        };
        match self
            .ctx
            .router
            .subscribe((self.id, sid), key, self.outbox.clone())
            .await
        {
            Ok(()) => {
                self.subscribed_since_barrier.store(true, Ordering::Relaxed);
                Flow::Continue
            }
            Err(refusal) => {
                if refusal.code == ErrorCode::LimitExceeded {
                    self.ctx.stats.record_limit(Limit::Subscriptions);
                }
                self.error(refusal.code, u64::from(sid), refusal.message)
                    .await
            }
        }
    }

    async fn on_register(&self, register: Register) -> Flow {
        if register.key.is_empty() {
            return self
                .answer_registration(
                    register.request_id,
                    ErrorCode::InvalidSubject,
                    "a registration key must not be empty",
                )
                .await;
        }
        if !self.permissions.may_register(&register.key) {
            let key = String::from_utf8_lossy(&register.key).into_owned();
            let message = self.denied(Operation::Register, &key);
            return self
                .answer_registration(register.request_id, ErrorCode::Unauthorized, &message)
                .await;
        }
        {
            let hash = std::hash::BuildHasher::hash_one(&self.registered_hasher, &register.key);
            let mut registered = lock(&self.registered);
            // Past the per-session limit the registry refuses the key anyway.
            if registered.len() < self.ctx.config.etcd.max_registrations_per_session {
                registered.insert(hash);
            }
        }
        let ack = RegistrationAckTo {
            outbox: self.outbox.clone(),
            request_id: register.request_id,
        };
        // Held until deregistered, so copied out of the read buffer that
        // the decoded slices share with every frame read along with them.
        let claimant = self.claimant(&register.key);
        let key = Bytes::copy_from_slice(&register.key);
        let value = Bytes::copy_from_slice(&register.value);
        self.ctx.registry.register(claimant, key, value, ack).await;
        Flow::Continue
    }

    /// This session as the registry sees it when it changes `key`.
    fn claimant(&self, key: &[u8]) -> Claimant {
        Claimant {
            session: self.id,
            process: self.process.get().cloned(),
            may_take_over: self.permissions.may_take_over(key),
        }
    }

    async fn on_deregister(&self, deregister: Deregister) -> Flow {
        lock(&self.registered).remove(&std::hash::BuildHasher::hash_one(
            &self.registered_hasher,
            &deregister.key,
        ));
        let ack = RegistrationAckTo {
            outbox: self.outbox.clone(),
            request_id: deregister.request_id,
        };
        let claimant = self.claimant(&deregister.key);
        self.ctx
            .registry
            .deregister(claimant, deregister.key, ack)
            .await;
        Flow::Continue
    }

    async fn answer_registration(&self, request_id: u64, code: ErrorCode, message: &str) -> Flow {
        self.send(Frame::RegisterAck(RegisterAck {
            request_id,
            outcome: RegistrationOutcome::Rejected {
                code,
                message: Text::from(message),
            },
        }))
        .await
    }

    async fn on_get(&self, get: Get) -> Flow {
        if get.prefix.is_empty() {
            return self
                .send(Frame::GetResponse(GetResponse {
                    request_id: get.request_id,
                    outcome: GetOutcome::Failed {
                        code: ErrorCode::InvalidSubject,
                        message: Text::from("a discovery prefix must not be empty"),
                    },
                }))
                .await;
        }
        let to = GetTo {
            outbox: self.outbox.clone(),
            request_id: get.request_id,
        };
        if get.linearizable {
            // A read from etcd is outstanding work, like a request: it counts
            // against the same limit, so a client cannot pile them up.
            let permit = match self.in_flight_permit() {
                Ok(permit) => permit,
                Err(message) => {
                    return self
                        .send(Frame::GetResponse(GetResponse {
                            request_id: get.request_id,
                            outcome: GetOutcome::Failed {
                                code: ErrorCode::LimitExceeded,
                                message: Text::from(message),
                            },
                        }))
                        .await
                }
            };
            self.ctx.discovery.get_linearizable(get.prefix, to, permit);
        } else {
            // The prefix may become a cached prefix, kept for hours: copied
            // out of the read buffer (see on_register).
            let prefix = Bytes::copy_from_slice(&get.prefix);
            self.ctx.discovery.get(prefix, to).await;
        }
        Flow::Continue
    }

    async fn on_watch(&self, watch: Watch) -> Flow {
        let reference = u64::from(watch.watch_id);
        if watch.prefix.is_empty() {
            let message = "a discovery prefix must not be empty".to_string();
            return self
                .error(ErrorCode::InvalidSubject, reference, message)
                .await;
        }
        let max_watches = self.ctx.config.etcd.max_watches_per_session;
        let admitted = {
            let mut watches = lock(&self.watches);
            let admitted = watches.contains(&watch.watch_id) || watches.len() < max_watches;
            if admitted {
                watches.insert(watch.watch_id);
            }
            admitted
        };
        if !admitted {
            self.ctx.stats.record_limit(Limit::Watches);
            let message = format!(
                "at most {max_watches} watches per connection (etcd.max_watches_per_session)"
            );
            return self
                .error(ErrorCode::LimitExceeded, reference, message)
                .await;
        }
        let started = self
            .ctx
            .discovery
            .watch(
                self.id,
                watch.watch_id,
                // Held for the watch's life (and maybe as a cached prefix).
                Bytes::copy_from_slice(&watch.prefix),
                watch.send_initial,
                self.outbox.clone(),
            )
            .await;
        match started {
            Ok(()) => Flow::Continue,
            Err(refused) => {
                lock(&self.watches).remove(&watch.watch_id);
                self.error(refused.code, reference, refused.message).await
            }
        }
    }

    /// One of the connection's `max_inflight_requests` slots, shared by
    /// requests and linearizable GETs; without one the refusal is counted
    /// and its message returned.
    fn in_flight_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
        self.requests_in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.ctx.stats.record_limit(Limit::InflightRequests);
                format!(
                    "more than {} requests and linearizable gets in flight on this connection",
                    self.ctx.config.sessions.max_inflight_requests
                )
            })
    }

    async fn on_request(&self, request: Request) -> Flow {
        bump(&self.ctx.stats.requests_total);
        let request_id = request.request_id;
        let permit = match self.in_flight_permit() {
            Ok(permit) => permit,
            Err(message) => {
                return self
                    .fail_request(request_id, ErrorCode::LimitExceeded, message)
                    .await
            }
        };
        if let Err(error) = validate_publish_subject(&request.subject) {
            return self
                .fail_request(request_id, ErrorCode::InvalidSubject, error.to_string())
                .await;
        }
        if let Err(error) = check_headers(&request.headers) {
            return self
                .fail_request(request_id, ErrorCode::ProtocolViolation, error.to_string())
                .await;
        }
        if !self.permissions.may_publish(&request.subject) {
            let message = self.denied(Operation::Request, &request.subject);
            return self
                .fail_request(request_id, ErrorCode::Unauthorized, message)
                .await;
        }
        let nats_config = &self.ctx.config.nats;
        let timeout = match request.timeout_ms {
            0 => nats_config.request_timeout,
            millis => Duration::from_millis(u64::from(millis)).min(nats_config.max_request_timeout),
        };
        let ctx = self.ctx.clone();
        let outbox = self.outbox.clone();
        // Requests run concurrently; their answers may overtake each other,
        // which the request ids make harmless.
        let started = Instant::now();
        tokio::spawn(async move {
            let outcome = serve_request(&ctx, request, timeout).await;
            if let ResponseOutcome::Failed { code, .. } = &outcome {
                ctx.stats.request_failures.bump(*code);
                debug!(request_id, %code, "request failed");
            }
            let _ = outbox
                .send(Frame::Response(Response {
                    request_id,
                    outcome,
                }))
                .await;
            metrics::histogram!(REQUEST_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
            drop(permit);
        });
        Flow::Continue
    }

    async fn fail_request(&self, request_id: u64, code: ErrorCode, message: String) -> Flow {
        self.ctx.stats.request_failures.bump(code);
        self.send(Frame::Response(Response {
            request_id,
            outcome: ResponseOutcome::Failed {
                code,
                message: Text::from(message),
            },
        }))
        .await
    }

    async fn on_read_error(&self, error: CodecError) {
        match error {
            CodecError::Decode(error) => {
                self.ctx.stats.frame_errors.bump(error.code());
                if error.code() == ErrorCode::FrameTooLarge {
                    self.ctx.stats.record_limit(Limit::FrameSize);
                }
                warn!(session = self.id, %error, "bad frame from client; closing the connection");
                self.go_away(error.code(), &error.to_string()).await;
            }
            CodecError::Io(error) => {
                // The tokio codec reports a stream that ended mid-frame as an
                // I/O error; the peer gets told if it is still listening.
                self.ctx.stats.frame_errors.bump(ErrorCode::BadFrame);
                debug!(session = self.id, %error, "connection read failed");
                self.go_away(
                    ErrorCode::BadFrame,
                    &format!("truncated frame or read error: {error}"),
                )
                .await;
            }
            CodecError::Encode(error) => {
                warn!(session = self.id, %error, "unexpected encode error on the read side");
            }
        }
    }

    async fn ack(&self, ack_id: u64, outcome: AckOutcome, local_deliveries: u32) -> Flow {
        if ack_id == 0 {
            return Flow::Continue;
        }
        self.send(Frame::PubAck(PubAck {
            ack_id,
            outcome,
            local_deliveries,
        }))
        .await
    }

    async fn reject(
        &self,
        ack_id: u64,
        code: ErrorCode,
        message: String,
        local_deliveries: u32,
    ) -> Flow {
        if ack_id == 0 {
            return self.error(code, 0, message).await;
        }
        let outcome = AckOutcome::Rejected {
            code,
            message: Text::from(message),
        };
        self.ack(ack_id, outcome, local_deliveries).await
    }

    async fn error(&self, code: ErrorCode, reference: u64, message: String) -> Flow {
        self.send(Frame::Error(ErrorFrame {
            code,
            reference,
            message: Text::from(message),
        }))
        .await
    }

    async fn go_away(&self, code: ErrorCode, message: &str) {
        let frame = Frame::GoAway(GoAway {
            code,
            message: Text::from(message),
        });
        let _ = self.outbox.send(frame).await;
    }

    async fn send(&self, frame: Frame) -> Flow {
        match self.outbox.send(frame).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }
}

/// What the relay's own headers (sequence chain, message id, local
/// delivery) add to a message's size at most.
pub const RELAY_HEADERS_ALLOWANCE: usize = 256;

/// Checks a publish before anything is done with it.
fn check_publish(
    publish: &Publish,
    nats_max_payload: Option<usize>,
) -> Option<(ErrorCode, String)> {
    if let Err(error) = check_headers(&publish.headers) {
        return Some((ErrorCode::ProtocolViolation, error.to_string()));
    }
    // NATS refuses a message larger than its max_payload whenever it is
    // sent; refused now, its publisher hears so rather than the relay
    // holding, journaling and then dropping it.
    if let Some(max) = nats_max_payload {
        // "NATS/1.0\r\n", "Name: value\r\n" per header, "\r\n".
        let headers: usize = 12
            + publish
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len() + 4)
                .sum::<usize>();
        let size = publish.payload.len() + headers + RELAY_HEADERS_ALLOWANCE;
        if size > max {
            return Some((
                ErrorCode::LimitExceeded,
                format!(
                    "the message is larger than NATS accepts: {size} bytes with its headers and the relay's, max_payload {max}"
                ),
            ));
        }
    }
    if let Err(error) = validate_publish_subject(&publish.subject) {
        return Some((ErrorCode::InvalidSubject, format!("subject: {error}")));
    }
    if let Some(reply) = &publish.reply {
        if let Err(error) = validate_publish_subject(reply) {
            return Some((ErrorCode::InvalidSubject, format!("reply subject: {error}")));
        }
    }
    None
}

async fn serve_request(ctx: &RelayContext, request: Request, timeout: Duration) -> ResponseOutcome {
    let failed = |code: ErrorCode, message: String| ResponseOutcome::Failed {
        code,
        message: Text::from(message),
    };
    if !ctx.nats.is_up() {
        let message = LocalMessage {
            subject: request.subject,
            reply: None,
            headers: request.headers,
            payload: request.payload,
        };
        return match ctx.router.request_local(message, timeout).await {
            Ok(reply) => ResponseOutcome::Reply {
                headers: reply.headers,
                payload: reply.payload,
            },
            Err(ErrorCode::NatsUnavailable) => failed(
                ErrorCode::NatsUnavailable,
                "NATS is unreachable and no subscriber on this relay serves the subject".into(),
            ),
            Err(code) => failed(code, "no local responder answered in time".into()),
        };
    }
    let headers = match to_header_map(&request.headers) {
        Ok(headers) => headers,
        Err(error) => return failed(ErrorCode::ProtocolViolation, error.to_string()),
    };
    let mut nats_request = async_nats::Request::new()
        .payload(request.payload)
        .timeout(Some(timeout));
    if let Some(headers) = headers {
        nats_request = nats_request.headers(headers);
    }
    match ctx
        .nats
        .client()
        .send_request(to_subject(&request.subject), nats_request)
        .await
    {
        Ok(reply) => ResponseOutcome::Reply {
            headers: from_header_map(reply.headers.as_ref()),
            payload: reply.payload,
        },
        Err(error) => {
            let subject = &request.subject;
            let (code, message) = match error.kind() {
                RequestErrorKind::TimedOut => (
                    ErrorCode::Timeout,
                    format!("no reply on {subject} within {} ms", timeout.as_millis()),
                ),
                RequestErrorKind::NoResponders => (
                    ErrorCode::NoResponders,
                    format!("nobody subscribes to {subject}"),
                ),
                RequestErrorKind::InvalidSubject => (ErrorCode::InvalidSubject, error.to_string()),
                _ => (ErrorCode::NatsUnavailable, error.to_string()),
            };
            failed(code, message)
        }
    }
}

/// An instance id for a client that has none yet: 64 random bits, since
/// components build fleet-wide etcd keys from it.
fn new_instance_id() -> u64 {
    // 0 means "none" on the wire.
    holdfast_wire::backoff::jitter_source().max(1)
}

/// Locks a mutex only this session's task uses; a poisoned one is still
/// consistent (the holder panicked between statements, not mid-update).
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The answer that replaces `frame` when it cannot be encoded (too large
/// for this connection), for frames whose requester waits for one.
fn too_large_answer(frame: &Frame, error: &impl std::fmt::Display) -> Option<Frame> {
    let message = |what: &str| {
        Text::from(format!(
            "{what} does not fit in a frame on this connection: {error}"
        ))
    };
    match frame {
        Frame::Response(response) => Some(Frame::Response(Response {
            request_id: response.request_id,
            outcome: ResponseOutcome::Failed {
                code: ErrorCode::LimitExceeded,
                message: message("the reply"),
            },
        })),
        Frame::GetResponse(response) => Some(Frame::GetResponse(GetResponse {
            request_id: response.request_id,
            outcome: GetOutcome::Failed {
                code: ErrorCode::LimitExceeded,
                message: message("the snapshot (GET a narrower prefix)"),
            },
        })),
        _ => None,
    }
}

/// Writes everything the outbox holds, batch by batch, until GO_AWAY is
/// written or every sender is gone.
async fn write_loop(mut socket: ByteWriter, mut outbox: OutboxReceiver, max_frame: u32) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_FRAMES);
    let mut buffer = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
    // The outbox's charge of the frames encoded into `buffer`: given back
    // once the socket took them, so frames held here while the client does
    // not read count against `sessions.outbound_queue_bytes` like queued ones.
    let mut unwritten = 0;
    loop {
        if outbox.take(&mut batch, WRITE_BATCH_FRAMES).await == 0 {
            break;
        }
        let drops = outbox.take_unreported_drops();
        if drops > 0 {
            let report = Frame::Error(ErrorFrame {
                code: ErrorCode::SlowConsumer,
                reference: 0,
                message: Text::from(format!(
                    "{drops} message(s) dropped: this connection's subscriptions are not keeping up"
                )),
            });
            let _ = encode(&report, max_frame, &mut buffer);
        }
        let mut closing = false;
        for frame in batch.drain(..) {
            closing = matches!(frame, Frame::GoAway(_));
            unwritten += charged_bytes(&frame);
            if let Err(error) = encode(&frame, max_frame, &mut buffer) {
                // Only frames built from validated input reach here; a frame
                // that still cannot be encoded is skipped, not fatal. A
                // reply too large for this connection (NATS allows larger
                // payloads than a small relay.max_frame_bytes) still gets
                // its request an answer, and so does a GET whose snapshot
                // is too large.
                warn!(%error, frame_type = frame.frame_type(), "frame not sent: cannot be encoded");
                if let Some(failed) = too_large_answer(&frame, &error) {
                    let _ = encode(&failed, max_frame, &mut buffer);
                }
            }
            if buffer.len() >= WRITE_BUFFER_BYTES || closing {
                if socket.write_all(&buffer).await.is_err() {
                    return;
                }
                buffer.clear();
                outbox.written(std::mem::take(&mut unwritten));
            }
            if closing {
                break;
            }
        }
        if !buffer.is_empty() {
            if socket.write_all(&buffer).await.is_err() {
                return;
            }
            buffer.clear();
        }
        outbox.written(std::mem::take(&mut unwritten));
        if closing {
            let _ = socket.shutdown().await;
            return;
        }
        if buffer.capacity() > 4 * WRITE_BUFFER_BYTES {
            // One huge frame should not pin its buffer for the session's life.
            buffer = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
        }
    }
}
