//! One client connection: handshake, then frames in, answers out.
//!
//! The session task owns its state (plain fields on `&mut self`: only this
//! task touches them) and handles frames in order, many per socket read; a
//! separate writer task (`writer.rs`) drains the session's [`Outbox`] and
//! writes everything queued in one syscall. What each kind of frame does
//! lives beside this file: `publish.rs` (publishes and PING barriers),
//! `subscribe.rs`, `request.rs`, `keys.rs` (registrations, discovery reads
//! and watches).

mod decoded;
pub mod frame_reader;
mod keys;
pub mod outbox;
mod publish;
mod request;
mod subscribe;
mod writer;

pub use decoded::{FrameBatch, FrameSender};
pub use publish::RELAY_HEADERS_ALLOWANCE;

use crate::context::RelayContext;
use crate::front::access::{Operation, Permissions};
use crate::front::peer::Peer;
use crate::keys::registry::model::Process;
use crate::messaging::forwarder::{Accept, PublishAnswers};
use crate::ops::stats::{bump, Limit, RelayStats};
use crate::ops::status;
use crate::session::frame_reader::{BudgetedFrames, ReadBudgets};
use crate::session::outbox::{outbox, Outbox, OutboxReceiver};
use futures::{FutureExt, Stream, StreamExt};
use holdfast_wire::{
    AckOutcome, CodecError, ErrorCode, ErrorFrame, Frame, GoAway, Hello, LinkState, LinkStatus,
    PubAck, Service, StatusResponse, Text, Welcome, PROTOCOL_VERSION,
};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// How long a PING barrier (and the goodbye at shutdown) waits for the
/// forwarder and the NATS client.
const BARRIER_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Frames handled per turn of the session loop before it looks at its
/// timers, link watches and shutdown again.
const FRAMES_PER_TURN: usize = 4096;
/// Frames handled under one reading of the clock for their receive time:
/// at a few hundred nanoseconds a frame, the stamp is at most tens of
/// microseconds early, where the ack latency it feeds is counted in
/// milliseconds.
const RECEIVED_STAMP_EVERY: usize = 64;

/// The read half of a connection, whatever the transport.
pub type ByteReader = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection, whatever the transport.
pub type ByteWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// Where a session's frames come from: a byte stream decoded by
/// [`BudgetedFrames`], or frames a front end decoded from its own protocol.
trait FrameSource: Stream<Item = Result<Frame, CodecError>> + Unpin + Send + 'static {}

impl<T: Stream<Item = Result<Frame, CodecError>> + Unpin + Send + 'static> FrameSource for T {}

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
    denials_logged: HashSet<&'static str>,
    outbox: Outbox,
    /// The forwarder answers this session's publishes through it.
    publish_answers: Arc<dyn PublishAnswers>,
    /// Shared with the tasks that serve this connection's requests.
    requests_in_flight: Arc<Semaphore>,
    /// Publishes read but not yet handed to the forwarder.
    accepts: Vec<Accept>,
    /// Keys this session registered, as hashes: while any exist the
    /// session must keep sending within the liveness timeout. Hashes, and
    /// at most `etcd.max_registrations_per_session` of them: a key the
    /// registry refuses stays here until DEREGISTER or the end of the
    /// session, and keys may be 64 KiB each.
    registered: HashSet<u64>,
    registered_hasher: std::collections::hash_map::RandomState,
    /// The client process behind this session, once HELLO named it: a
    /// later session of the same process may take its keys over.
    process: Option<Process>,
    watches: HashSet<u32>,
    /// A SUBSCRIBE was taken since the last PING barrier: that barrier must
    /// wait until NATS has the subscription, not just until it is written.
    subscribed_since_barrier: bool,
    /// A PUBLISH was taken since the last PING barrier that completed. If
    /// not, a PING (most are keepalives, four a second per connection by
    /// default) is answered at once: there is nothing of this session's to
    /// wait for, and thousands of idle connections would otherwise keep the
    /// forwarder and the NATS client busy with barriers and flushes.
    published_since_barrier: bool,
    /// When the frames being handled were read (for publish ack latency):
    /// read once per [`RECEIVED_STAMP_EVERY`] frames of a turn and after
    /// anything that may have waited, not per publish, which showed in
    /// profiles.
    received_at: Instant,
    /// A publish with a reply subject went to NATS since the last PING
    /// barrier (on the subscriber connection, which the barrier must then
    /// round-trip too).
    requested_since_barrier: bool,
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
    let max_frame = ctx.config.relay.max_frame_bytes;
    let budgets = ReadBudgets::new(
        stream
            .read_budget
            .into_iter()
            .chain(std::iter::once(ctx.read_budget.clone()))
            .collect(),
    );
    let reader = BudgetedFrames::new(read_half, max_frame, budgets, ctx.stats.clone());
    let (id, outbox, outbox_receiver) = open_outbox(&ctx);
    let writer = tokio::spawn(writer::write_loop(write_half, outbox_receiver, max_frame));
    serve_connection(id, reader, outbox, peer, ctx.clone(), stream.hello).await;
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

/// A session for a front end that speaks another protocol (the NATS front
/// end): it hands the session frames it decoded itself and renders the
/// session's frames itself, with no byte stream in between.
pub struct DecodedSession {
    /// Where the front end sends the client's frames, a batch per read;
    /// dropping it ends the session as a closed connection would.
    pub frames: FrameSender,
    /// The session's frames for the client. Take them with
    /// [`OutboxReceiver::take`] and give their charge back with
    /// [`OutboxReceiver::written`] once the client has their bytes, as the
    /// session's own writer does; it ends (0 frames) when the session has.
    pub answers: OutboxReceiver,
    /// The session's task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a session whose frames arrive decoded.
pub fn start_decoded(peer: Peer, ctx: Arc<RelayContext>) -> DecodedSession {
    let (frames, reader) = decoded::frame_channel();
    let (id, outbox, answers) = open_outbox(&ctx);
    let task = tokio::spawn(serve_connection(id, reader, outbox, peer, ctx, None));
    DecodedSession {
        frames,
        answers,
        task,
    }
}

/// A new session's id and its outbox.
fn open_outbox(ctx: &RelayContext) -> (u64, Outbox, OutboxReceiver) {
    let id = ctx.next_session_id();
    let sessions = &ctx.config.sessions;
    let (outbox, receiver) = outbox(
        id,
        sessions.outbound_queue_frames,
        sessions.outbound_queue_bytes,
        sessions.slow_consumer,
        ctx.stats.clone(),
    );
    (id, outbox, receiver)
}

/// Runs session `id` on frames from `reader` until it ends, then releases
/// what it held (subscriptions, registrations, watches).
async fn serve_connection<R: FrameSource>(
    id: u64,
    mut reader: R,
    outbox: Outbox,
    peer: Peer,
    ctx: Arc<RelayContext>,
    hello: Option<tokio::sync::oneshot::Sender<()>>,
) {
    bump(&ctx.stats.sessions_total);
    ctx.stats.sessions_active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(ctx.stats.clone());
    let mut session = Session {
        id,
        ctx: ctx.clone(),
        permissions: ctx.access.permissions(&peer),
        peer,
        denials_logged: HashSet::new(),
        publish_answers: Arc::new(publish::AnswersToOutbox(outbox.clone())),
        outbox,
        requests_in_flight: Arc::new(Semaphore::new(ctx.config.sessions.max_inflight_requests)),
        accepts: Vec::new(),
        registered: HashSet::new(),
        registered_hasher: Default::default(),
        process: None,
        watches: HashSet::new(),
        subscribed_since_barrier: false,
        published_since_barrier: false,
        received_at: Instant::now(),
        requested_since_barrier: false,
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
}

impl Session {
    async fn serve(
        &mut self,
        reader: &mut impl FrameSource,
        said_hello: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Ending {
        // Watched from before the WELCOME that reports them, so a change
        // while the handshake runs is still sent as LINK_STATE afterwards.
        let mut link = self.ctx.nats.watch();
        let nats_status = link.borrow_and_update().status;
        let mut etcd = self.ctx.etcd.watch();
        let mut etcd_status = etcd.borrow_and_update().link.status;
        let Some(hello) = self.handshake(reader, nats_status, etcd_status).await else {
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
    fn denied(&mut self, operation: Operation, target: &str) -> String {
        self.ctx.stats.record_access_denial(operation);
        let first = self.denials_logged.insert(operation.name());
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
        &mut self,
        first: Option<Result<Frame, CodecError>>,
        reader: &mut impl FrameSource,
    ) -> Flow {
        let mut next = first;
        let mut handled = 0;
        // Also after anything that may have waited (a hand-over to the
        // forwarder, a frame's own handling): frames read after a wait must
        // not be timed from before it.
        let mut stamp_due = true;
        loop {
            if stamp_due || handled % RECEIVED_STAMP_EVERY == 0 {
                self.received_at = Instant::now();
                stamp_due = false;
            }
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
            let frame = match frame {
                Frame::Publish(publish) => match self.plain_publish_class(&publish) {
                    Some(class) => {
                        if self.accept_plain_publish(class, publish) {
                            self.flush_accepts().await;
                            stamp_due = true;
                        }
                        None
                    }
                    None => Some(Frame::Publish(publish)),
                },
                other => {
                    self.flush_accepts().await;
                    Some(other)
                }
            };
            if let Some(frame) = frame {
                if let Flow::Close = self.on_frame(frame).await {
                    return Flow::Close;
                }
                stamp_due = true;
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
    async fn handle_ready_frame(&mut self, reader: &mut impl FrameSource) -> Option<Flow> {
        let first = reader.next().now_or_never()?;
        Some(self.on_ready_frames(first, reader).await)
    }

    fn has_registrations(&self) -> bool {
        !self.registered.is_empty()
    }

    fn has_watches(&self) -> bool {
        !self.watches.is_empty()
    }

    /// Reads HELLO and answers WELCOME, which tells the client the link
    /// states `nats` and `etcd`.
    async fn handshake(
        &mut self,
        reader: &mut impl FrameSource,
        nats: LinkStatus,
        etcd: LinkStatus,
    ) -> Option<Hello> {
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
        self.process = Some(Process {
            instance_id,
            identity: self.peer.identity(),
        });
        let welcome = Frame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session_id: self.id,
            instance_id,
            relay_id: self.ctx.relay_id.clone(),
            max_frame_bytes: self.ctx.config.relay.max_frame_bytes,
            nats,
            etcd,
        });
        match self.send(welcome).await {
            Flow::Continue => Some(hello),
            Flow::Close => None,
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Flow {
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
            Frame::Ping(ping) => self.on_ping(ping).await,
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
                if self.watches.remove(&unwatch.watch_id) {
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

    async fn on_read_error(&mut self, error: CodecError) {
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

/// An instance id for a client that has none yet: 64 random bits, since
/// components build fleet-wide etcd keys from it.
fn new_instance_id() -> u64 {
    // 0 means "none" on the wire.
    holdfast_wire::backoff::jitter_source().max(1)
}
