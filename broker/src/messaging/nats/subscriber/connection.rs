//! The task that owns the subscriber connection: connects (and reconnects
//! round the server pool), keeps the subscription table, sends SUB, UNSUB
//! and PING, and hands each decoded message to its subscription's channel.

use super::server_pool::ServerPool;
use super::transport::{establish, Established, UpstreamInfo};
use super::{
    Command, SubscriberCounters, SubscriberSettings, SubscriberState, UpstreamMessage,
    UpstreamStatus,
};
use crate::util::drop_log::DropLog;
use crate::util::failure_log::FailureLog;
use crate::util::sparse_map::shrink_if_sparse;
use bytes::{BufMut, BytesMut};
use holdfast_wire::nats_protocol::{encode_client_op, ClientOp, ServerOp};
use holdfast_wire::{Headers, Text};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Bytes a read asks for at least.
const READ_CHUNK: usize = 64 * 1024;

/// Unsubscribes handled per turn of the loop (one write for all of them).
const UNSUBSCRIBE_BATCH: usize = 1024;

/// Unanswered keepalive PINGs after which the connection counts as dead.
const MAX_UNANSWERED_PINGS: usize = 3;

/// One subscription as the task keeps it.
struct Entry {
    subject: Text,
    queue_group: Option<Text>,
    messages: mpsc::Sender<UpstreamMessage>,
}

/// A connection in use.
struct Live {
    connection: Established,
    server: String,
    /// Bytes to write after the current event.
    out: BytesMut,
    /// One entry per PING sent, in order.
    pongs_due: VecDeque<PongDue>,
}

/// Who waits for the PONG of a PING.
enum PongDue {
    Keepalive,
    /// Told when the PONG comes or the connection goes (what was sent
    /// before is then as processed as it will get).
    RoundTrip(oneshot::Sender<()>),
    /// Told only when the PONG comes, with the loss count.
    Confirm(oneshot::Sender<u64>),
}

type Attempt = Pin<Box<dyn Future<Output = Result<Established, String>> + Send>>;

pub struct ConnectionTask {
    settings: SubscriberSettings,
    state: watch::Sender<SubscriberState>,
    counters: Arc<SubscriberCounters>,
    pool: ServerPool,
    subscriptions: HashMap<u64, Entry>,
    next_sid: u64,
    malformed_log: DropLog,
    slow_log: DropLog,
    failure_log: FailureLog,
}

impl ConnectionTask {
    pub fn new(
        settings: SubscriberSettings,
        state: watch::Sender<SubscriberState>,
        counters: Arc<SubscriberCounters>,
    ) -> ConnectionTask {
        let pool = ServerPool::new(settings.seeds.clone(), settings.reconnect_delay_max);
        ConnectionTask {
            settings,
            state,
            counters,
            pool,
            subscriptions: HashMap::new(),
            next_sid: 1,
            malformed_log: DropLog::default(),
            slow_log: DropLog::default(),
            failure_log: FailureLog::default(),
        }
    }

    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut unsubscribes: mpsc::UnboundedReceiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut unsubscribed = Vec::with_capacity(UNSUBSCRIBE_BATCH);
        let mut live: Option<Live> = None;
        let mut attempt: Option<Attempt> = None;
        let mut retry_at = Some(Instant::now());
        let mut ping = tokio::time::interval(self.settings.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => self.on_command(command, live.as_mut()),
                },
                taken = unsubscribes.recv_many(&mut unsubscribed, UNSUBSCRIBE_BATCH) => {
                    if taken == 0 {
                        return;
                    }
                    for sid in unsubscribed.drain(..) {
                        self.unsubscribe(sid, live.as_mut());
                    }
                }
                result = poll_attempt(&mut attempt) => {
                    attempt = None;
                    match result {
                        Ok(established) => live = Some(self.on_connected(established)),
                        Err(reason) => {
                            self.on_attempt_failed(reason);
                            retry_at = Some(Instant::now() + self.pool.delay());
                        }
                    }
                }
                () = sleep_until(retry_at), if live.is_none() && attempt.is_none() => {
                    retry_at = None;
                    attempt = self.start_attempt();
                    if attempt.is_none() {
                        retry_at = Some(Instant::now() + self.settings.reconnect_delay_max);
                    }
                }
                read = read_more(&mut live) => {
                    let outcome = match read {
                        Ok(0) => Err("the server closed the connection".to_string()),
                        Ok(_) => self.on_bytes(live.as_mut()),
                        Err(error) => Err(format!("read failed: {error}")),
                    };
                    if let Err(reason) = outcome {
                        self.on_lost(&mut live, reason);
                        retry_at = Some(Instant::now());
                    }
                }
                _ = ping.tick(), if live.is_some() => {
                    if let Some(current) = live.as_mut() {
                        let unanswered = current
                            .pongs_due
                            .iter()
                            .filter(|due| matches!(due, PongDue::Keepalive))
                            .count();
                        if unanswered >= MAX_UNANSWERED_PINGS {
                            self.on_lost(&mut live, format!("no PONG to {unanswered} PINGs"));
                            retry_at = Some(Instant::now());
                        } else {
                            current.out.put_slice(b"PING\r\n");
                            current.pongs_due.push_back(PongDue::Keepalive);
                        }
                    }
                }
            }
            if let Err(reason) = self.flush(&mut live).await {
                self.on_lost(&mut live, reason);
                retry_at = Some(Instant::now());
            }
        }
    }

    fn start_attempt(&mut self) -> Option<Attempt> {
        let address = self.pool.current()?.clone();
        let security = self.settings.security.clone();
        let name = self.settings.client_name.clone();
        let limit = self.settings.connect_timeout;
        Some(Box::pin(async move {
            establish(&address, &security, &name, limit).await
        }))
    }

    fn on_connected(&mut self, established: Established) -> Live {
        self.pool.connected();
        self.failure_log.reset();
        let server = self
            .pool
            .current()
            .map(|address| address.host_port())
            .unwrap_or_default();
        self.learn(&established.info, established.tls);
        info!(
            server = %server,
            server_name = %established.info.server_name,
            subscriptions = self.subscriptions.len(),
            "subscriber connection to NATS up"
        );
        let max_payload = established.info.max_payload;
        self.state.send_modify(|state| {
            state.server = Some(server.clone());
            state.last_error = None;
            state.max_payload = max_payload;
        });
        let mut live = Live {
            connection: established,
            server,
            out: BytesMut::new(),
            pongs_due: VecDeque::new(),
        };
        for (sid, entry) in &self.subscriptions {
            encode_sub(
                &mut live.out,
                &entry.subject,
                entry.queue_group.as_ref(),
                *sid,
            );
        }
        live
    }

    fn on_attempt_failed(&mut self, reason: String) {
        let server = self
            .pool
            .current()
            .map(|address| address.host_port())
            .unwrap_or_default();
        self.pool.failed();
        if self.failure_log.due(&reason, std::time::Instant::now()) {
            warn!(server = %server, reason = %reason, "subscriber connection to NATS failed; retrying with backoff");
        }
        self.state
            .send_modify(|state| state.last_error = Some(reason));
    }

    fn on_lost(&mut self, live: &mut Option<Live>, reason: String) {
        let Some(lost) = live.take() else {
            return;
        };
        for due in lost.pongs_due {
            // What was sent before is as processed as it will get; a
            // confirmation waiter hears nothing (its sender drops).
            if let PongDue::RoundTrip(waiter) = due {
                let _ = waiter.send(());
            }
        }
        self.pool.lost();
        warn!(server = %lost.server, reason = %reason, "subscriber connection to NATS lost; reconnecting");
        self.state.send_modify(|state| {
            state.server = None;
            state.max_payload = 0;
            state.last_error = Some(reason);
            state.reconnects += 1;
            state.losses += 1;
        });
    }

    fn on_command(&mut self, command: Command, live: Option<&mut Live>) {
        match command {
            Command::Subscribe {
                subject,
                queue_group,
                messages,
                done,
            } => {
                let sid = self.next_sid;
                self.next_sid += 1;
                if let Some(live) = live {
                    encode_sub(&mut live.out, &subject, queue_group.as_ref(), sid);
                }
                self.subscriptions.insert(
                    sid,
                    Entry {
                        subject,
                        queue_group,
                        messages,
                    },
                );
                let _ = done.send(sid);
            }
            Command::Publish {
                subject,
                reply,
                headers,
                payload,
                done,
            } => match live {
                Some(live) => {
                    let op = if headers.is_empty() {
                        ClientOp::Pub {
                            subject,
                            reply: Some(reply),
                            payload,
                        }
                    } else {
                        ClientOp::HPub {
                            subject,
                            reply: Some(reply),
                            headers,
                            payload,
                        }
                    };
                    encode_client_op(&op, &mut live.out);
                    let _ = done.send(Ok(()));
                }
                None => {
                    let _ = done.send(Err(
                        "the relay's subscriber connection to NATS is reconnecting".to_string(),
                    ));
                }
            },
            Command::PublishBatch {
                mut operations,
                permit,
            } => {
                match live {
                    Some(live) if live.out.is_empty() => {
                        std::mem::swap(&mut live.out, &mut operations)
                    }
                    Some(live) => live.out.extend_from_slice(&operations),
                    None => self.state.send_modify(|state| state.losses += 1),
                }
                drop(permit);
            }
            Command::Confirm { done } => {
                if let Some(live) = live {
                    live.out.put_slice(b"PING\r\n");
                    live.pongs_due.push_back(PongDue::Confirm(done));
                }
            }
            Command::RoundTrip { done } => match live {
                Some(live) => {
                    live.out.put_slice(b"PING\r\n");
                    live.pongs_due.push_back(PongDue::RoundTrip(done));
                }
                // Made on connect, before anything else: nothing to wait for.
                None => {
                    let _ = done.send(());
                }
            },
        }
    }

    fn unsubscribe(&mut self, sid: u64, live: Option<&mut Live>) {
        if self.subscriptions.remove(&sid).is_some() {
            shrink_if_sparse(&mut self.subscriptions);
            if let Some(live) = live {
                encode_unsub(&mut live.out, sid);
            }
        }
    }

    /// Decodes and handles everything read; an error ends the connection.
    fn on_bytes(&mut self, live: Option<&mut Live>) -> Result<(), String> {
        let Some(live) = live else {
            return Ok(());
        };
        loop {
            let op = live
                .connection
                .decoder
                .decode(&mut live.connection.buffer)
                .map_err(|error| {
                    format!("the server sent bytes that are not the NATS protocol: {error}")
                })?;
            let Some(op) = op else {
                return Ok(());
            };
            match op {
                ServerOp::Msg {
                    sid,
                    subject,
                    reply,
                    headers,
                    payload,
                } => {
                    let (headers, status, description) = match headers {
                        Some(block) => (block.headers, block.status, block.description),
                        None => (Headers::new(), None, None),
                    };
                    let status = status.map(|code| Box::new(UpstreamStatus { code, description }));
                    let message = UpstreamMessage {
                        subject,
                        reply,
                        headers,
                        status,
                        payload,
                    };
                    self.deliver(sid, message, &mut live.out);
                }
                ServerOp::Malformed { sid, reason } => self.on_malformed(sid, &reason),
                ServerOp::Ping => live.out.put_slice(b"PONG\r\n"),
                ServerOp::Pong => match live.pongs_due.pop_front() {
                    Some(PongDue::RoundTrip(waiter)) => {
                        let _ = waiter.send(());
                    }
                    Some(PongDue::Confirm(waiter)) => {
                        let _ = waiter.send(self.state.borrow().losses);
                    }
                    Some(PongDue::Keepalive) | None => {}
                },
                ServerOp::Info(json) => {
                    if let Ok(info) = serde_json::from_slice::<UpstreamInfo>(&json) {
                        let tls = live.connection.tls;
                        self.learn(&info, tls);
                        if info.ldm {
                            info!(server = %live.server, "NATS server entering lame duck mode; the subscriber connection moves when it closes");
                        }
                    }
                }
                ServerOp::Err(message) => {
                    // Permission refusals leave the connection open; other
                    // errors are followed by the server closing it.
                    warn!(server = %live.server, error = %message, "NATS server error on the subscriber connection");
                }
                ServerOp::Ok => {}
            }
        }
    }

    fn deliver(&mut self, sid: u64, message: UpstreamMessage, out: &mut BytesMut) {
        let Some(entry) = self.subscriptions.get(&sid) else {
            // Unsubscribed a moment ago; the server had it on the way.
            return;
        };
        match entry.messages.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let total = self.settings.upstream_drops.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(dropped) = self.slow_log.due(total, std::time::Instant::now()) {
                    warn!(
                        subject = %entry.subject,
                        dropped,
                        total,
                        "an upstream subscription's queue is full (relay not keeping up); message dropped, counted in holdfast_messages_dropped_total{{reason=\"upstream_slow_consumer\"}}"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.subscriptions.remove(&sid);
                encode_unsub(out, sid);
            }
        }
    }

    fn on_malformed(&mut self, sid: Option<u64>, reason: &str) {
        let total = self.counters.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(dropped) = self.malformed_log.due(total, std::time::Instant::now()) {
            let subscription = sid
                .and_then(|sid| self.subscriptions.get(&sid))
                .map(|entry| entry.subject.to_string())
                .unwrap_or_default();
            warn!(
                subscription = %subscription,
                reason,
                dropped,
                total,
                "a message from NATS could not be decoded (some publisher sent it malformed); dropped, the connection goes on; counted in holdfast_messages_dropped_total{{reason=\"malformed_upstream\"}}"
            );
        }
    }

    fn learn(&mut self, info: &UpstreamInfo, tls: bool) {
        let added = self.pool.learn(&info.connect_urls, tls);
        if added > 0 {
            info!(
                added,
                servers = self.pool.len(),
                "learned NATS servers from the cluster"
            );
        }
    }

    /// Writes what the last event queued, bounded so a server that stopped
    /// reading cannot stall the task.
    async fn flush(&mut self, live: &mut Option<Live>) -> Result<(), String> {
        let Some(current) = live.as_mut() else {
            return Ok(());
        };
        if current.out.is_empty() {
            return Ok(());
        }
        let limit = self.settings.ping_interval * MAX_UNANSWERED_PINGS as u32;
        let write = current.connection.writer.write_all(&current.out);
        match tokio::time::timeout(limit, write).await {
            Ok(Ok(())) => {
                current.out.clear();
                Ok(())
            }
            Ok(Err(error)) => Err(format!("write failed: {error}")),
            Err(_) => Err(format!(
                "the server took nothing for {} ms",
                limit.as_millis()
            )),
        }
    }
}

fn encode_sub(out: &mut BytesMut, subject: &Text, queue_group: Option<&Text>, sid: u64) {
    out.put_slice(b"SUB ");
    out.put_slice(subject.as_bytes());
    if let Some(queue_group) = queue_group {
        out.put_u8(b' ');
        out.put_slice(queue_group.as_bytes());
    }
    out.put_slice(format!(" {sid}\r\n").as_bytes());
}

fn encode_unsub(out: &mut BytesMut, sid: u64) {
    out.put_slice(format!("UNSUB {sid}\r\n").as_bytes());
}

async fn poll_attempt(attempt: &mut Option<Attempt>) -> Result<Established, String> {
    match attempt {
        Some(attempt) => attempt.await,
        None => std::future::pending().await,
    }
}

async fn read_more(live: &mut Option<Live>) -> std::io::Result<usize> {
    match live {
        Some(live) => {
            let connection = &mut live.connection;
            // BytesMut grows by 64 bytes when full; reads that small would
            // cost a system call per message.
            if connection.buffer.capacity() - connection.buffer.len() < READ_CHUNK / 4 {
                connection.buffer.reserve(READ_CHUNK);
            }
            connection.reader.read_buf(&mut connection.buffer).await
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
