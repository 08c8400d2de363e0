//! One NATS client connection, translated to and from a relay session.
//!
//! Two halves run concurrently so neither direction can stall the other:
//! the inbound half decodes the client's operations and hands the session
//! frames, a batch per read (no encoding: `session::start_decoded`); the
//! outbound half takes the session's frames from its outbox and writes
//! NATS protocol text to the client. The inbound half tells the outbound
//! half what it needs to render answers (subscription ids, pending
//! requests, verbose acks) over a channel it reads first, so a MESSAGE is
//! never rendered before the SUB that caused it is known.
//!
//! How NATS semantics map onto the session:
//! - PING from the client is a session PING, a barrier: its PONG means
//!   everything sent before it was handled, as nats-server's PONG does.
//! - A PUB with a reply subject (a request) asks for an ack. When the relay
//!   rejects it because NATS is down and no subscriber on this node took
//!   it, the client gets a 503 no-responders status on its reply subject at
//!   once instead of waiting out its timeout.
//! - A status message from NATS (503) travels as a `Nats-Status` header and
//!   is rendered back into an HMSG status line.
//! - `no_echo`: publishes of such a connection carry a `Holdfast-Origin`
//!   header with a per-connection token; the connection drops messages
//!   bearing its own token and strips the header from every message.
//! - The relay pings the client every 20 s and closes it after two
//!   unanswered pings; the client's PONGs keep the session's idle clock
//!   running.

use crate::context::RelayContext;
use crate::front::peer::Peer;
use crate::messaging::fanout::{NATS_STATUS_DESCRIPTION_HEADER, NATS_STATUS_HEADER};
use crate::ops::stats::RelayStats;
use crate::session;
use crate::session::frame_reader::{self, ReadBudgets, SMALL_FRAME_BYTES};
use crate::session::outbox::{charged_bytes, OutboxReceiver};
use bytes::{Bytes, BytesMut};
use holdfast_wire::nats_protocol::{
    encode_err, encode_info, encode_msg, encode_ok, encode_ping, encode_pong, encode_status_msg,
    ClientOp, ClientOpDecoder, ServerInfo, DEFAULT_MAX_PAYLOAD,
};
use holdfast_wire::subject::matches;
use holdfast_wire::{
    AckOutcome, ErrorCode, Frame, Headers, Hello, Ping, Pong, Publish, Subscribe, Text,
    Unsubscribe, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Frames taken from the session's outbox at a time; their text goes out
/// in one write. They stay charged to the outbox until written, so a client
/// reading slowly holds at most `sessions.outbound_queue_bytes` of them.
const TAKE_FRAMES: usize = 256;
/// Client bytes read at a time.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// A batch for the session is handed over early once it holds this many
/// frames or this many payload bytes: with two batches in flight, what a
/// connection has waiting for its session stays within a few hundred KiB.
const BATCH_FRAMES: usize = 512;
const BATCH_BYTES: usize = 64 * 1024;
/// How often the relay pings a NATS client, and how many may go unanswered.
const SERVER_PING_INTERVAL: Duration = Duration::from_secs(20);
const MAX_PINGS_OUTSTANDING: u32 = 2;
/// Room for subjects and framing inside one relay frame.
const FRAME_OVERHEAD_BYTES: usize = 16 * 1024;
/// Events from the inbound to the outbound half waiting at once.
const EVENT_QUEUE: usize = 1024;
/// Header marking the publishes of a `no_echo` connection.
const ORIGIN_HEADER: &str = "Holdfast-Origin";
/// The NATS protocol level the front end speaks. Clients gate features on
/// the server version; the relay passes JetStream and service API requests
/// through to a real nats-server, so it reports the level it implements.
const NATS_VERSION: &str = "2.10.0";

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// What the inbound half tells the outbound half.
enum Event {
    Connected {
        headers: bool,
    },
    Subscribed {
        sid: u32,
        nats_sid: Text,
        subject: Text,
    },
    Unsubscribed {
        sid: u32,
    },
    UnsubscribeAfter {
        sid: u32,
        max_messages: u64,
    },
    Request {
        ack_id: u64,
        reply: Text,
    },
    Ok,
    PongReceived,
    Fatal(String),
}

/// Tells a client turned away (too many connections) why, and closes.
pub async fn refuse(mut stream: TcpStream, reason: &'static str) {
    let mut text = BytesMut::new();
    encode_err(reason, &mut text);
    let write = async {
        stream.write_all(&text).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Serves one NATS client until it or its session ends.
pub async fn serve(stream: TcpStream, address: SocketAddr, port: u16, ctx: Arc<RelayContext>) {
    let (client_read, client_write) = stream.into_split();
    let session = session::start_decoded(Peer::NatsProtocol { address }, ctx.clone());
    let client_id = NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed);
    let max_frame = ctx.config.relay.max_frame_bytes;
    // What nats-server takes (its default until the relay has connected),
    // less what the relay's own headers may add: a larger publish would be
    // refused, and a NATS client that knows the limit refuses it itself.
    let upstream = ctx.nats.max_payload().unwrap_or(DEFAULT_MAX_PAYLOAD);
    let max_payload = upstream
        .saturating_sub(crate::session::RELAY_HEADERS_ALLOWANCE)
        .min((max_frame as usize).saturating_sub(FRAME_OVERHEAD_BYTES));
    let info = ServerInfo {
        server_id: ctx.relay_id.to_string(),
        server_name: "holdfastd".to_string(),
        version: NATS_VERSION.to_string(),
        proto: 1,
        host: "0.0.0.0".to_string(),
        port,
        headers: true,
        max_payload,
        client_id,
        client_ip: Some(address.ip().to_string()),
        ldm: false,
    };
    let (events, event_receiver) = mpsc::channel(EVENT_QUEUE);
    let (unsubscribes, unsubscribe_receiver) = mpsc::unbounded_channel();
    let closed = CancellationToken::new();
    // Distinguishes this connection's own messages for no_echo.
    let origin = Text::from(format!("{}.{client_id}", ctx.relay_id));
    let outbound = Outbound {
        info: info.clone(),
        client: client_write,
        answers: session.answers,
        taken: Vec::with_capacity(TAKE_FRAMES),
        unwritten: 0,
        events: event_receiver,
        unsubscribes,
        origin: origin.clone(),
        headers_allowed: true,
        subscriptions: HashMap::new(),
        requests: HashMap::new(),
        pings_outstanding: 0,
        text: BytesMut::new(),
    };
    let mut info_text = BytesMut::new();
    encode_info(&info, &mut info_text);
    let outbound_task = tokio::spawn(outbound.run(info_text, closed.clone()));
    let inbound = Inbound {
        client: client_read,
        session: session.frames,
        decoder: ClientOpDecoder::new(max_payload),
        events,
        unsubscribes: unsubscribe_receiver,
        origin,
        echo: true,
        verbose: false,
        said_hello: false,
        subscriptions: HashMap::new(),
        nats_sids: HashMap::new(),
        next_sid: 1,
        next_ack_id: 1,
        next_ping: 1,
        frames: Vec::new(),
        batch_bytes: 0,
        read_budgets: ReadBudgets::new(vec![ctx.read_budget.clone()]),
        read_budget_bytes: ctx.config.sessions.read_budget_bytes,
        stats: ctx.stats.clone(),
    };
    inbound.run(closed.clone()).await;
    // Dropping the frame sender ended the session's input; the outbound
    // half writes what is left (an -ERR, the last PONG) and ends when the
    // session does.
    let grace = ctx.config.relay.shutdown_grace;
    if tokio::time::timeout(grace, outbound_task).await.is_err() {
        debug!(peer = %address, "NATS client did not take its last bytes in time");
    }
    let _ = tokio::time::timeout(grace, session.task).await;
    debug!(peer = %address, "NATS client connection ended");
}

/// Client → session.
struct Inbound {
    client: OwnedReadHalf,
    session: session::FrameSender,
    decoder: ClientOpDecoder,
    events: mpsc::Sender<Event>,
    unsubscribes: mpsc::UnboundedReceiver<u32>,
    origin: Text,
    echo: bool,
    verbose: bool,
    said_hello: bool,
    /// The client's subscription ids and the session's for them, and the
    /// way back (the outbound half names subscriptions to forget by the
    /// session's id; a scan per name would be quadratic in a flood).
    subscriptions: HashMap<Text, u32>,
    nats_sids: HashMap<u32, Text>,
    next_sid: u32,
    next_ack_id: u64,
    next_ping: u64,
    /// Frames of the current read, handed to the session in one batch.
    frames: Vec<Frame>,
    /// Payload bytes in `frames`.
    batch_bytes: usize,
    /// The relay-wide read budget a large batch is reserved from, its
    /// size, and where a wait for it is counted.
    read_budgets: ReadBudgets,
    read_budget_bytes: usize,
    stats: Arc<RelayStats>,
}

impl Inbound {
    async fn run(mut self, closed: CancellationToken) {
        let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
        loop {
            tokio::select! {
                _ = closed.cancelled() => return,
                read = self.client.read_buf(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if !self.handle_bytes(&mut buffer).await {
                            return;
                        }
                    }
                },
                Some(sid) = self.unsubscribes.recv() => {
                    self.forget(sid);
                    // All that are waiting: a client flooding SUBs over the
                    // limit must not outpace their removal.
                    while let Ok(sid) = self.unsubscribes.try_recv() {
                        self.forget(sid);
                    }
                    if !self.flush().await {
                        return;
                    }
                }
            }
            if buffer.capacity() > 4 * READ_BUFFER_BYTES && buffer.is_empty() {
                buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
            }
        }
    }

    /// Forgets subscription `sid`, which the outbound half dropped (the
    /// session refused it, or it reached its message count), and tells the
    /// session.
    fn forget(&mut self, sid: u32) {
        if let Some(nats_sid) = self.nats_sids.remove(&sid) {
            self.subscriptions.remove(&nats_sid);
        }
        self.push(Frame::Unsubscribe(Unsubscribe { sid }));
    }

    /// Handles every complete operation in `buffer`; false ends the connection.
    async fn handle_bytes(&mut self, buffer: &mut BytesMut) -> bool {
        loop {
            match self.decoder.decode(buffer) {
                Ok(Some(op)) => {
                    if !self.handle(op).await {
                        return false;
                    }
                    // A read full of tiny operations is handed over in
                    // parts, so what waits for the session stays small.
                    if (self.frames.len() >= BATCH_FRAMES || self.batch_bytes >= BATCH_BYTES)
                        && !self.flush().await
                    {
                        return false;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    info!(%error, "NATS client sent an invalid operation; closing");
                    let _ = self.flush().await;
                    let _ = self.events.send(Event::Fatal(error.err_message())).await;
                    return false;
                }
            }
        }
        self.flush().await
    }

    async fn handle(&mut self, op: ClientOp) -> bool {
        tracing::trace!(?op, "nats front op");
        if !self.said_hello {
            let name = match &op {
                ClientOp::Connect(connect) => connect.name.clone(),
                _ => None,
            };
            self.push(Frame::Hello(Hello {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                client_name: Text::from(name.unwrap_or_else(|| "nats-client".to_string())),
                instance_id: 0,
            }));
            self.said_hello = true;
        }
        let acknowledge = match op {
            ClientOp::Connect(connect) => {
                self.verbose = connect.verbose;
                self.echo = connect.echo;
                let headers = connect.headers;
                if !self.send_event(Event::Connected { headers }).await {
                    return false;
                }
                true
            }
            ClientOp::Pub {
                subject,
                reply,
                payload,
            } => {
                self.publish(subject, reply, Headers::new(), payload).await;
                true
            }
            ClientOp::HPub {
                subject,
                reply,
                headers,
                payload,
            } => {
                self.publish(subject, reply, headers, payload).await;
                true
            }
            ClientOp::Sub {
                subject,
                queue_group,
                sid: nats_sid,
            } => {
                if let Some(old) = self.subscriptions.remove(&nats_sid) {
                    self.nats_sids.remove(&old);
                    self.push(Frame::Unsubscribe(Unsubscribe { sid: old }));
                    self.send_event(Event::Unsubscribed { sid: old }).await;
                }
                let sid = self.next_sid;
                self.next_sid = self.next_sid.wrapping_add(1).max(1);
                self.subscriptions.insert(nats_sid.clone(), sid);
                self.nats_sids.insert(sid, nats_sid.clone());
                let event = Event::Subscribed {
                    sid,
                    nats_sid,
                    subject: subject.clone(),
                };
                if !self.send_event(event).await {
                    return false;
                }
                self.push(Frame::Subscribe(Subscribe {
                    sid,
                    subject,
                    queue_group,
                }));
                true
            }
            ClientOp::Unsub {
                sid: nats_sid,
                max_msgs,
            } => {
                if let Some(&sid) = self.subscriptions.get(&nats_sid) {
                    match max_msgs {
                        Some(max_messages) if max_messages > 0 => {
                            let event = Event::UnsubscribeAfter { sid, max_messages };
                            self.send_event(event).await;
                        }
                        _ => {
                            self.subscriptions.remove(&nats_sid);
                            self.nats_sids.remove(&sid);
                            self.push(Frame::Unsubscribe(Unsubscribe { sid }));
                            self.send_event(Event::Unsubscribed { sid }).await;
                        }
                    }
                }
                true
            }
            ClientOp::Ping => {
                let nonce = self.next_ping;
                self.next_ping += 1;
                self.push(Frame::Ping(Ping { nonce }));
                false
            }
            ClientOp::Pong => {
                // Heard from the client: keeps the session's idle clock going.
                self.push(Frame::Pong(Pong { nonce: 0 }));
                self.send_event(Event::PongReceived).await;
                false
            }
        };
        if acknowledge && self.verbose {
            return self.send_event(Event::Ok).await;
        }
        true
    }

    async fn publish(
        &mut self,
        subject: Text,
        reply: Option<Text>,
        mut headers: Headers,
        payload: Bytes,
    ) {
        if !self.echo {
            headers.insert(ORIGIN_HEADER, self.origin.clone());
        }
        let ack_id = match &reply {
            Some(reply) => {
                let ack_id = self.next_ack_id;
                self.next_ack_id += 1;
                let event = Event::Request {
                    ack_id,
                    reply: reply.clone(),
                };
                self.send_event(event).await;
                ack_id
            }
            None => 0,
        };
        self.batch_bytes += payload.len();
        self.push(Frame::Publish(Publish {
            ack_id,
            subject,
            reply,
            class: None,
            headers,
            payload,
        }));
    }

    fn push(&mut self, frame: Frame) {
        self.frames.push(frame);
    }

    async fn send_event(&mut self, event: Event) -> bool {
        // Sent before the batch holding the frame it is about, so the
        // outbound half learns of a subscription no later than the session.
        self.events.send(event).await.is_ok()
    }

    /// Hands the session the frames of this read; false once it is gone.
    async fn flush(&mut self) -> bool {
        if self.frames.is_empty() {
            return true;
        }
        // Like a large frame read from a socket, a large batch waits for
        // its share of the relay-wide read budget (the client is not read
        // meanwhile), so many clients flooding large messages at once
        // cannot hold more than `sessions.read_budget_bytes` between them.
        let reservation = if self.batch_bytes > SMALL_FRAME_BYTES {
            let amount = self.batch_bytes.min(self.read_budget_bytes);
            let reserving =
                frame_reader::reserve(self.read_budgets.clone(), amount, self.stats.clone());
            match reserving.await {
                Some(permits) => permits,
                // The budget is closed: the relay is stopping.
                None => return false,
            }
        } else {
            Vec::new()
        };
        let batch = session::FrameBatch {
            frames: std::mem::take(&mut self.frames),
            reservation,
        };
        self.batch_bytes = 0;
        self.session.send(batch).await.is_ok()
    }
}

/// What the outbound half knows of one subscription.
struct OutboundSubscription {
    nats_sid: Text,
    subject: Text,
    delivered: u64,
    max_messages: Option<u64>,
}

/// Session → client.
struct Outbound {
    /// What the client was told at connect, repeated (in lame duck mode)
    /// when the relay stops.
    info: ServerInfo,
    client: OwnedWriteHalf,
    /// The session's frames for this client.
    answers: OutboxReceiver,
    /// Frames taken from `answers`, rendered one by one.
    taken: Vec<Frame>,
    /// The outbox charge of frames rendered but not yet written.
    unwritten: usize,
    events: mpsc::Receiver<Event>,
    unsubscribes: mpsc::UnboundedSender<u32>,
    origin: Text,
    headers_allowed: bool,
    subscriptions: HashMap<u32, OutboundSubscription>,
    /// Requests (PUBs with a reply subject) waiting for their ack.
    requests: HashMap<u64, Text>,
    pings_outstanding: u32,
    text: BytesMut,
}

/// Whether the outbound half goes on.
enum Next {
    Continue,
    Close,
}

impl Outbound {
    async fn run(mut self, info: BytesMut, closed: CancellationToken) {
        self.text = info;
        let mut pings = tokio::time::interval_at(
            tokio::time::Instant::now() + SERVER_PING_INTERVAL,
            SERVER_PING_INTERVAL,
        );
        loop {
            if !self.write_text().await {
                break;
            }
            let next = tokio::select! {
                biased;
                event = self.events.recv() => match event {
                    Some(event) => self.on_event(event),
                    // The inbound half is gone: the session ends next and
                    // its last frames still get rendered.
                    None => self.drain_session().await,
                },
                taken = self.answers.take(&mut self.taken, TAKE_FRAMES) => match taken {
                    // The session ended and every frame was rendered.
                    0 => Next::Close,
                    _ => self.on_taken(),
                },
                _ = pings.tick() => {
                    if self.pings_outstanding >= MAX_PINGS_OUTSTANDING {
                        encode_err("Stale Connection", &mut self.text);
                        Next::Close
                    } else {
                        self.pings_outstanding += 1;
                        encode_ping(&mut self.text);
                        Next::Continue
                    }
                }
            };
            if let Next::Close = next {
                let _ = self.write_text().await;
                break;
            }
        }
        let _ = self.client.shutdown().await;
        closed.cancel();
    }

    /// Writes the rendered text, then gives the outbox back the charge of
    /// the frames it came from; false when the client is gone.
    async fn write_text(&mut self) -> bool {
        if !self.text.is_empty() {
            if self.client.write_all(&self.text).await.is_err() {
                return false;
            }
            self.text.clear();
        }
        self.answers.written(std::mem::take(&mut self.unwritten));
        true
    }

    /// Renders the frames just taken from the outbox.
    fn on_taken(&mut self) -> Next {
        let drops = self.answers.take_unreported_drops();
        if drops > 0 {
            // As the session's own writer tells a framed client.
            let message = Text::from(format!(
                "{drops} message(s) dropped: this connection's subscriptions are not keeping up"
            ));
            self.report(ErrorCode::SlowConsumer, &message, None);
        }
        let mut taken = std::mem::take(&mut self.taken);
        let mut next = Next::Continue;
        for frame in taken.drain(..) {
            self.unwritten += charged_bytes(&frame);
            if matches!(next, Next::Close) {
                // Not rendered, but still charged: given back with the rest.
                continue;
            }
            // Events first, before each frame, as in the biased select: the
            // inbound half announces a SUB before it sends it, and the
            // answer to it (a refusal) must find what was announced, or
            // both halves would keep the subscription forever.
            next = self.take_events();
            if matches!(next, Next::Continue) {
                next = self.on_frame(frame);
            }
        }
        self.taken = taken;
        next
    }

    /// Renders the session's remaining frames after the client stopped sending.
    async fn drain_session(&mut self) -> Next {
        while self.answers.take(&mut self.taken, TAKE_FRAMES).await > 0 {
            let next = self.on_taken();
            if !self.write_text().await || matches!(next, Next::Close) {
                break;
            }
        }
        Next::Close
    }

    /// Handles the events already queued, without waiting.
    fn take_events(&mut self) -> Next {
        while let Ok(event) = self.events.try_recv() {
            if let Next::Close = self.on_event(event) {
                return Next::Close;
            }
        }
        Next::Continue
    }

    fn on_event(&mut self, event: Event) -> Next {
        match event {
            Event::Connected { headers } => self.headers_allowed = headers,
            Event::Subscribed {
                sid,
                nats_sid,
                subject,
            } => {
                let subscription = OutboundSubscription {
                    nats_sid,
                    subject,
                    delivered: 0,
                    max_messages: None,
                };
                self.subscriptions.insert(sid, subscription);
            }
            Event::Unsubscribed { sid } => {
                self.subscriptions.remove(&sid);
            }
            Event::UnsubscribeAfter { sid, max_messages } => {
                if let Some(subscription) = self.subscriptions.get_mut(&sid) {
                    if subscription.delivered >= max_messages {
                        self.subscriptions.remove(&sid);
                        let _ = self.unsubscribes.send(sid);
                    } else {
                        subscription.max_messages = Some(max_messages);
                    }
                }
            }
            Event::Request { ack_id, reply } => {
                self.requests.insert(ack_id, reply);
            }
            Event::Ok => encode_ok(&mut self.text),
            Event::PongReceived => self.pings_outstanding = 0,
            Event::Fatal(message) => {
                encode_err(&message, &mut self.text);
                return Next::Close;
            }
        }
        Next::Continue
    }

    fn on_frame(&mut self, frame: Frame) -> Next {
        tracing::trace!(?frame, "nats front frame");
        match frame {
            Frame::Message(message) => {
                let mut headers = message.headers;
                if headers
                    .get(ORIGIN_HEADER)
                    .is_some_and(|origin| *origin == self.origin)
                {
                    return Next::Continue;
                }
                headers
                    .0
                    .retain(|(name, _)| !name.eq_ignore_ascii_case(ORIGIN_HEADER));
                self.deliver(
                    message.sid,
                    &message.subject,
                    message.reply.as_ref(),
                    headers,
                    &message.payload,
                );
            }
            Frame::PubAck(ack) => {
                let Some(reply) = self.requests.remove(&ack.ack_id) else {
                    return Next::Continue;
                };
                if let AckOutcome::Rejected { code, message } = ack.outcome {
                    if code == ErrorCode::NatsUnavailable && ack.local_deliveries == 0 {
                        self.no_responders(&reply);
                    } else if ack.local_deliveries == 0 {
                        self.report(code, &message, None);
                    }
                }
            }
            Frame::Pong(_) => encode_pong(&mut self.text),
            Frame::Error(error) => {
                let refused = u32::try_from(error.reference)
                    .ok()
                    .filter(|sid| *sid != 0)
                    .and_then(|sid| Some((sid, self.subscriptions.remove(&sid)?)));
                let subject = refused.map(|(sid, subscription)| {
                    // The client side forgets it too, or SUBs refused over
                    // a limit would pile up there.
                    let _ = self.unsubscribes.send(sid);
                    subscription.subject
                });
                self.report(error.code, &error.message, subject.as_ref());
            }
            Frame::GoAway(go_away) => {
                match go_away.code {
                    // As nats-server before a planned stop: INFO in lame
                    // duck mode, then the connection closes. Clients
                    // reconnect; an -ERR here would be final for nats.py
                    // and the Go client, which close for good on an
                    // -ERR they do not know.
                    ErrorCode::ShuttingDown => {
                        let farewell = ServerInfo {
                            ldm: true,
                            ..self.info.clone()
                        };
                        encode_info(&farewell, &mut self.text);
                    }
                    // nats-server closes a slow consumer without a word,
                    // and clients reconnect; do the same.
                    ErrorCode::SlowConsumer => {}
                    _ => encode_err(&go_away.message, &mut self.text),
                }
                return Next::Close;
            }
            // WELCOME, LINK_STATE and answers to frames this front end
            // never sends carry nothing a NATS client can use.
            _ => {}
        }
        Next::Continue
    }

    fn deliver(
        &mut self,
        sid: u32,
        subject: &Text,
        reply: Option<&Text>,
        mut headers: Headers,
        payload: &[u8],
    ) {
        let Some(subscription) = self.subscriptions.get_mut(&sid) else {
            return;
        };
        let status = headers
            .get(NATS_STATUS_HEADER)
            .and_then(|status| status.parse::<u16>().ok());
        if let Some(status) = status {
            let description = headers
                .get(NATS_STATUS_DESCRIPTION_HEADER)
                .map(|text| text.to_string());
            encode_status_msg(
                subject,
                &subscription.nats_sid,
                status,
                description.as_deref(),
                &mut self.text,
            );
        } else {
            if !self.headers_allowed {
                headers = Headers::new();
            }
            encode_msg(
                subject,
                &subscription.nats_sid,
                reply.map(Text::as_str),
                &headers,
                payload,
                &mut self.text,
            );
        }
        subscription.delivered += 1;
        if subscription
            .max_messages
            .is_some_and(|max| subscription.delivered >= max)
        {
            self.subscriptions.remove(&sid);
            let _ = self.unsubscribes.send(sid);
        }
    }

    /// A 503 on the subscription that would receive the reply, as
    /// nats-server sends when a request has no responders.
    fn no_responders(&mut self, reply: &Text) {
        let Some(subscription) = self
            .subscriptions
            .values()
            .find(|subscription| matches(&subscription.subject, reply))
        else {
            return;
        };
        let nats_sid = subscription.nats_sid.clone();
        encode_status_msg(reply, &nats_sid, 503, None, &mut self.text);
    }

    /// An -ERR for a refused operation, in nats-server's words where it has them.
    fn report(&mut self, code: ErrorCode, message: &Text, subscription: Option<&Text>) {
        let text = match (code, subscription) {
            (ErrorCode::Unauthorized, Some(subject)) => {
                format!("Permissions Violation for Subscription to \"{subject}\"")
            }
            (ErrorCode::Unauthorized, None) => format!("Permissions Violation: {message}"),
            (ErrorCode::InvalidSubject, _) => format!("Invalid Subject: {message}"),
            (ErrorCode::LimitExceeded, Some(_)) => "Maximum Subscriptions Exceeded".to_string(),
            (ErrorCode::SlowConsumer, _) => format!("Slow Consumer: {message}"),
            (code, _) => format!("{}: {message}", code.name()),
        };
        encode_err(&text, &mut self.text);
    }
}
