//! The forwarder: the one task that owns every class queue and decides what
//! goes to NATS, in which order, and when it may be let go.
//!
//! Sessions hand it class traffic (everything but requests and replies) over
//! a bounded channel. It answers each publish with what happened to it:
//! `Forwarded` (sent to NATS now), `Queued` (held in memory), `Journaled`
//! (durably in the journal) or a rejection. It sends classes in priority
//! order — strictly: a class is only sent from while no higher class has
//! anything unsent, so prefills drain before decodes, and live traffic of a
//! higher class is never starved by a lower class's backlog. A message
//! leaves a queue (and the journal) only once NATS confirmed it: a probe
//! request after a batch comes back only after the server processed
//! everything this connection sent before it. A lost connection makes every
//! unconfirmed message unsent again (at-least-once; `Nats-Msg-Id` lets
//! consumers and JetStream drop the duplicates).

use crate::journal::{
    format_message_id, Journal, JournalError, JournalStamp, NewMessage, MESSAGE_ID_HEADER,
};
use crate::messaging::class_queue::{ClassQueue, Entry, QueuedMessage};
use crate::messaging::classes::{ClassId, Classes, Durability, WhenFull};
use crate::messaging::nats::link::{probe_round_trip, NatsLink};
use crate::messaging::nats_convert::{to_header_map, to_subject};
use crate::ops::stats::{PublishOutcome, RelayStats};
use crate::session::outbox::Outbox;
use crate::util::drop_log::DropLog;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use holdfast_wire::chain::ChainStamper;
use holdfast_wire::{AckOutcome, ErrorCode, ErrorFrame, Frame, LinkStatus, PubAck, Text};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Messages sent per class before the forwarder looks at other events.
const SEND_BATCH: usize = 512;
/// Messages read back from the journal at a time.
const REFILL_BATCH: usize = 4096;
/// The next journal read starts once this few read messages are unsent, so
/// the read overlaps the sending of the rest.
const REFILL_LOW_WATER: usize = REFILL_BATCH / 2;
/// How long a confirmation probe may take before the link is suspect.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Confirmation probes start at most this often while messages keep
/// coming. Each is a request through nats-server on the connection the
/// messages take, and one after every send (at low rates, one per message)
/// added about 13 µs to a message's p50 delivery latency. Confirmation only
/// frees memory and journal rows, which may wait this long.
const PROBE_SPACING: Duration = Duration::from_millis(1);
/// With this many core messages unconfirmed a probe starts without waiting
/// out [`PROBE_SPACING`], so a burst does not pile up in memory.
const PROBE_EARLY_AT: usize = 8 * SEND_BATCH;
/// How often retention is enforced and idle compaction considered.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A drained journal is compacted after this long without traffic.
const COMPACT_AFTER_IDLE: Duration = Duration::from_secs(10);
/// Commands the forwarder's intake holds before publishers wait (each
/// carries up to one socket read's worth of publishes).
const INTAKE: usize = 1_024;
/// Subjects the chain stamper keeps state for.
const CHAIN_SUBJECTS: usize = 100_000;

/// What a publisher asked to hear about one publish.
#[derive(Debug, Clone, Copy)]
pub struct AckRequest {
    /// 0: no ack wanted; failures are reported as ERROR frames.
    pub ack_id: u64,
    pub local_deliveries: u32,
    /// When an acked publish arrived, for the ack latency histogram.
    pub received: Option<Instant>,
}

/// Where a publish's answer goes, kept while the answer waits (on a send
/// or a commit).
pub struct AckTo {
    /// `None` for a fire-and-forget publish on the memory path: its only
    /// possible answers (forwarded, queued) are not sent, so it holds no
    /// handle on the session (three shared counters per message otherwise).
    outbox: Option<Outbox>,
    request: AckRequest,
    latency: Option<metrics::Histogram>,
}

impl AckTo {
    pub fn answer(&self, outcome: AckOutcome) {
        if let Some(outbox) = &self.outbox {
            answer(outbox, &self.request, self.latency.as_ref(), outcome);
        }
    }
}

/// Sends `outcome` for `request` to its session: a PUB_ACK, or an ERROR
/// for a fire-and-forget publish that was refused.
pub fn answer(
    outbox: &Outbox,
    request: &AckRequest,
    latency: Option<&metrics::Histogram>,
    outcome: AckOutcome,
) {
    if let (Some(histogram), Some(received)) = (latency, request.received) {
        histogram.record(received.elapsed().as_secs_f64());
    }
    let frame = match outcome {
        AckOutcome::Rejected { code, message } if request.ack_id == 0 => Frame::Error(ErrorFrame {
            code,
            reference: 0,
            message,
        }),
        _ if request.ack_id == 0 => return,
        outcome => Frame::PubAck(PubAck {
            ack_id: request.ack_id,
            outcome,
            local_deliveries: request.local_deliveries,
        }),
    };
    // A session that left no longer needs its answer.
    let _ = outbox.send_ack(frame);
}

/// One publish handed to the forwarder.
pub struct Accept {
    pub class: ClassId,
    pub message: QueuedMessage,
    pub ack: AckRequest,
}

/// Publishes of one session in the order it read them, and where their
/// answers go (batched per socket read, so the hand-over costs one channel
/// operation per read, not per message).
pub struct AcceptBatch {
    pub outbox: Outbox,
    pub accepts: Vec<Accept>,
}

enum Command {
    Accept(AcceptBatch),
    /// Answered once everything accepted before it was answered and the
    /// NATS client flushed.
    Barrier(oneshot::Sender<()>),
}

/// Per-class numbers for status and metrics, written by the forwarder.
#[derive(Debug, Default)]
pub struct ClassGauges {
    pub backlog_messages: AtomicU64,
    pub backlog_bytes: AtomicU64,
    pub oldest_accepted_ms: AtomicU64,
    pub replayed: AtomicU64,
    pub expired: AtomicU64,
    pub dropped_oldest: AtomicU64,
}

/// What status and metrics can see of the forwarder.
pub struct ForwarderView {
    pub classes: Classes,
    pub gauges: Vec<ClassGauges>,
    pub journal: Journal,
    /// Sequence chains the stamper forgot to make room (see
    /// [`ChainStamper::evictions`]).
    pub chain_evictions: AtomicU64,
}

/// A cheap handle sessions use.
#[derive(Clone)]
pub struct ForwarderHandle {
    commands: mpsc::Sender<Command>,
    view: Arc<ForwarderView>,
}

impl ForwarderHandle {
    pub fn view(&self) -> &ForwarderView {
        &self.view
    }

    /// Hands publishes over, in order; waits only for room in the intake.
    /// `Err` gives them back when the forwarder is gone.
    pub async fn accept(&self, batch: AcceptBatch) -> Result<(), Vec<Accept>> {
        self.commands
            .send(Command::Accept(batch))
            .await
            .map_err(|error| match error.0 {
                Command::Accept(batch) => batch.accepts,
                Command::Barrier(_) => Vec::new(),
            })
    }

    /// Waits until everything accepted before this call was answered.
    pub async fn barrier(&self) {
        let (done, answered) = oneshot::channel();
        if self.commands.send(Command::Barrier(done)).await.is_ok() {
            let _ = answered.await;
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One class's journal appends of a batch, handed to the writer together,
/// waiting for their commit.
struct Submitted {
    class: ClassId,
    acks: Vec<AckTo>,
    pending: Result<crate::journal::PendingAppends, JournalError>,
}

enum Completion {
    /// The commits of one batch of appends (they complete in order).
    Appended {
        results: Vec<(
            ClassId,
            AckTo,
            Result<crate::journal::Appended, JournalError>,
        )>,
        started: Instant,
    },
    Refilled {
        class: ClassId,
        result: Result<crate::journal::ReadBatch, JournalError>,
    },
    /// A journal trim failed (e.g. the disk was full); it is retried.
    ConfirmFailed {
        class: ClassId,
        through_seq: u64,
    },
    /// What the journal's periodic maintenance found.
    Maintained(Option<crate::journal::JournalHealth>),
    Probed {
        generation: u64,
        marks: Vec<usize>,
        confirmed: bool,
    },
    /// Every PubAck of a JetStream class's batch came back (or one failed).
    JetStreamAcked {
        class: ClassId,
        generation: u64,
        count: usize,
        confirmed: bool,
    },
    /// The journal expired `messages` of `class` (retention).
    Expired {
        class: ClassId,
        messages: u64,
    },
    Background,
}

struct Forwarder {
    classes: Classes,
    queues: Vec<ClassQueue<AckTo>>,
    journal: Journal,
    nats: NatsLink,
    stats: Arc<RelayStats>,
    view: Arc<ForwarderView>,
    relay_id: Text,
    stamper: ChainStamper,
    chain_eviction_log: DropLog,
    nats_refusal_log: DropLog,
    /// Publishes refused because the journal could not take them (disk
    /// full or below its reserve, or reopening), and when that was logged.
    journal_refusals: u64,
    journal_refusal_log: DropLog,
    /// Per class: the highest trim that failed, retried at the next sweep
    /// (otherwise delivered messages would stay, and a restart resend them).
    confirm_retry: Vec<Option<u64>>,
    maintenance_in_flight: bool,
    /// Journal appends not yet answered, per class (they fix the order).
    appends_in_flight: Vec<u64>,
    next_message_id: u64,
    /// Publishes whose answer waits on a commit or a send, and how many of
    /// those were answered; barriers wait on these counts.
    deferred_acks: u64,
    answered_deferred_acks: u64,
    barriers: Vec<(u64, oneshot::Sender<()>)>,
    probe_in_flight: bool,
    /// The earliest time the next probe may start (see [`PROBE_SPACING`]),
    /// and whether one waits for it.
    next_probe_at: tokio::time::Instant,
    probe_waiting: bool,
    /// JetStream classes wait for a batch's PubAcks before sending more.
    jetstream_in_flight: Vec<bool>,
    /// Whether a JetStream class's stream stored a message on this
    /// connection. Until then one message goes at a time: right after a
    /// restart a stream may still be loading, and a pipelined batch would
    /// be stored with holes that the resend then fills out of order.
    jetstream_verified: Vec<bool>,
    /// After a failed journal read, when that class may read again (a
    /// damaged row must not turn into a busy loop of failing reads).
    refill_retry_at: Vec<Option<Instant>>,
    generation: u64,
    last_activity: Instant,
    pending: FuturesUnordered<BoxFuture<Completion>>,
    /// Journal commits, answered strictly in submission order: a later
    /// batch must never reach the class queue before an earlier one, or a
    /// refill in between would send it first.
    appends: FuturesOrdered<BoxFuture<Completion>>,
    probe_subject: String,
    append_latency: metrics::Histogram,
    /// Per class: time from an acked publish's arrival to its answer.
    ack_latency: Vec<metrics::Histogram>,
    /// Class names as header text, shared by every message id stamped.
    class_texts: Vec<Text>,
}

/// Starts the forwarder, adopting the backlog the journal recovered.
pub fn start(
    classes: Classes,
    journal: Journal,
    recovered: &[crate::journal::ClassBacklog],
    nats: NatsLink,
    stats: Arc<RelayStats>,
    relay_id: Text,
    stop: CancellationToken,
) -> (ForwarderHandle, tokio::task::JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(INTAKE);
    let mut queues = Vec::with_capacity(classes.len());
    for (class, spec) in classes.specs().iter().enumerate() {
        let mut queue = ClassQueue::new(spec.memory_bytes);
        if let Some(backlog) = recovered.get(class) {
            queue.restore(backlog.first_seq, backlog.last_seq, backlog.messages);
            if backlog.messages > 0 {
                info!(
                    class = %spec.name,
                    messages = backlog.messages,
                    bytes = backlog.bytes,
                    "journal backlog recovered; it will be replayed when NATS is up"
                );
            }
        }
        queues.push(queue);
    }
    let class_texts = classes.names().map(Text::from).collect();
    let ack_latency = classes
        .names()
        .map(|class| {
            metrics::histogram!(crate::ops::metric_catalog::PUBLISH_ACK_SECONDS, "class" => class.to_string())
        })
        .collect();
    let view = Arc::new(ForwarderView {
        gauges: (0..classes.len()).map(|_| ClassGauges::default()).collect(),
        classes: classes.clone(),
        journal: journal.clone(),
        chain_evictions: AtomicU64::new(0),
    });
    let forwarder = Forwarder {
        appends_in_flight: vec![0; classes.len()],
        jetstream_in_flight: vec![false; classes.len()],
        jetstream_verified: vec![false; classes.len()],
        refill_retry_at: vec![None; classes.len()],
        confirm_retry: vec![None; classes.len()],
        classes,
        queues,
        journal,
        stamper: ChainStamper::new(relay_id.clone(), CHAIN_SUBJECTS),
        chain_eviction_log: DropLog::default(),
        nats_refusal_log: DropLog::default(),
        journal_refusals: 0,
        journal_refusal_log: DropLog::default(),
        maintenance_in_flight: false,
        probe_subject: format!("_HOLDFAST.confirm.{relay_id}"),
        nats,
        stats,
        view: view.clone(),
        relay_id,
        next_message_id: 0,
        deferred_acks: 0,
        answered_deferred_acks: 0,
        barriers: Vec::new(),
        probe_in_flight: false,
        next_probe_at: tokio::time::Instant::now(),
        probe_waiting: false,
        generation: 0,
        last_activity: Instant::now(),
        pending: FuturesUnordered::new(),
        appends: FuturesOrdered::new(),
        append_latency: metrics::histogram!(crate::ops::metric_catalog::JOURNAL_APPEND_SECONDS),
        ack_latency,
        class_texts,
    };
    let task = tokio::spawn(forwarder.run(receiver, stop));
    (ForwarderHandle { commands, view }, task)
}

impl Forwarder {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut link = self.nats.watch();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut replaying = false;
        self.publish_gauges();
        loop {
            let can_send = self.nats.is_up() && self.has_unsent();
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    self.persist_memory_backlog().await;
                    break;
                }
                changed = link.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if link.borrow_and_update().status == LinkStatus::Up {
                        let backlog = self.backlog_total();
                        if backlog > 0 {
                            replaying = true;
                            info!(backlog, "NATS is back: replay started");
                        }
                    } else {
                        self.connection_lost();
                    }
                }
                Some(completion) = self.appends.next() => self.on_completion(completion),
                Some(completion) = self.pending.next() => self.on_completion(completion),
                command = commands.recv() => match command {
                    Some(command) => {
                        self.on_command(command).await;
                        // Take whatever else is waiting in the same turn.
                        for _ in 0..SEND_BATCH {
                            match commands.try_recv() {
                                Ok(command) => self.on_command(command).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = sweep.tick() => self.sweep(),
                () = tokio::time::sleep_until(self.next_probe_at),
                    if self.probe_waiting && !self.probe_in_flight => {
                    self.probe_waiting = false;
                    if self.nats.is_up() && self.unconfirmed_core() > 0 {
                        self.start_probe();
                    }
                }
                () = std::future::ready(()), if can_send => self.send_batch().await,
            }
            self.start_refills();
            self.release_barriers();
            // A probe that timed out leaves messages unconfirmed: ask again
            // rather than wait for the next send that may never come.
            if self.nats.is_up() && !self.probe_in_flight && self.unconfirmed_core() > 0 {
                self.start_probe();
            }
            if replaying && self.backlog_total() == 0 {
                replaying = false;
                let replayed: u64 = self
                    .view
                    .gauges
                    .iter()
                    .map(|gauges| crate::ops::stats::read(&gauges.replayed))
                    .sum();
                info!(
                    replayed_since_start = replayed,
                    "replay finished: every backlog is confirmed by NATS"
                );
            }
            self.publish_gauges();
        }
    }

    /// On shutdown: messages held only in memory (acked `Queued`, or sent
    /// and not yet confirmed) go to the journal, so a restart replays them
    /// instead of losing them. They land behind anything of their class
    /// already journaled: a class that had both loses order here, not data.
    async fn persist_memory_backlog(&mut self) {
        let mut submitted = Vec::new();
        for class in 0..self.queues.len() {
            for message in self.queues[class].take_memory_only() {
                match self.journal.submit(class, message.into()).await {
                    Ok(pending) => submitted.push(pending),
                    Err(error) => {
                        warn!(%error, class = self.class_name(class), reason = "shutdown", "a queued message could not be journaled and is lost");
                    }
                }
            }
        }
        if submitted.is_empty() {
            return;
        }
        let count = submitted.len();
        let mut lost = 0;
        for pending in submitted {
            if pending.await.is_err() {
                lost += 1;
            }
        }
        info!(
            journaled = count - lost,
            lost, "queued messages journaled for the next start"
        );
    }

    fn has_unsent(&self) -> bool {
        self.sendable_class().is_some()
    }

    /// The class to send from now: the highest-priority class with anything
    /// unsent, if it can send right now. A lower class never goes ahead
    /// while a higher one waits for a journal read or for PubAcks, so a
    /// backlog drains strictly class by class.
    fn sendable_class(&self) -> Option<ClassId> {
        let class = self.queues.iter().position(ClassQueue::has_unsent)?;
        let queue = &self.queues[class];
        (queue.has_unsent_in_window() && !self.jetstream_in_flight[class]).then_some(class)
    }

    fn backlog_total(&self) -> u64 {
        self.queues.iter().map(|queue| queue.backlog().0).sum()
    }

    /// Unconfirmed messages of classes confirmed by a core round trip.
    fn unconfirmed_core(&self) -> usize {
        self.queues
            .iter()
            .enumerate()
            .filter(|(class, _)| !self.classes.get(*class).is_some_and(|spec| spec.jetstream))
            .map(|(_, queue)| queue.unconfirmed())
            .sum()
    }

    async fn on_command(&mut self, command: Command) {
        self.last_activity = Instant::now();
        match command {
            Command::Accept(AcceptBatch { outbox, accepts }) => {
                // Journal-bound messages, per class in acceptance order, go
                // to the writer as one group each: one channel operation and
                // one commit wait per class per batch, not per message.
                let mut to_journal: Vec<(Vec<NewMessage>, Vec<AckTo>)> = (0..self.queues.len())
                    .map(|_| (Vec::new(), Vec::new()))
                    .collect();
                for accept in accepts {
                    if let Some((class, message, ack)) = self.accept(&outbox, accept) {
                        to_journal[class].0.push(message);
                        to_journal[class].1.push(ack);
                    }
                }
                self.note_chain_evictions();
                let mut submitted = Vec::new();
                for (class, (messages, acks)) in to_journal.into_iter().enumerate() {
                    if messages.is_empty() {
                        continue;
                    }
                    let pending = self.journal.submit_many(class, messages).await;
                    submitted.push(Submitted {
                        class,
                        acks,
                        pending,
                    });
                }
                if !submitted.is_empty() {
                    let started = Instant::now();
                    self.appends.push_back(Box::pin(async move {
                        let mut results = Vec::new();
                        for group in submitted {
                            let outcomes = match group.pending {
                                Ok(pending) => pending.await,
                                Err(error) => Err(error),
                            };
                            match outcomes {
                                Ok(outcomes) => {
                                    for (ack, outcome) in group.acks.into_iter().zip(outcomes) {
                                        results.push((group.class, ack, outcome));
                                    }
                                }
                                Err(error) => {
                                    for ack in group.acks {
                                        results.push((group.class, ack, Err(error.clone())));
                                    }
                                }
                            }
                        }
                        Completion::Appended { results, started }
                    }));
                }
            }
            Command::Barrier(done) => {
                // A PING whose wait timed out left its barrier behind; while
                // answers stay outstanding (a stalled commit) those would
                // pile up, one per PING.
                if self.barriers.len() >= self.barriers.capacity() {
                    self.barriers.retain(|(_, waiter)| !waiter.is_closed());
                }
                self.barriers.push((self.deferred_acks, done));
            }
        }
    }

    /// Takes one publish: queued in memory and answered (or waiting to be
    /// forwarded), or bound for the journal — then it is returned, stamped,
    /// for the caller to submit with the rest of its batch.
    fn accept(&mut self, outbox: &Outbox, accept: Accept) -> Option<(ClassId, NewMessage, AckTo)> {
        let Accept {
            class,
            mut message,
            ack: request,
        } = accept;
        let jetstream = self.classes.get(class)?.jetstream;
        if jetstream {
            // JetStream drops a resent copy only if it carries the same id,
            // so every message of such a class gets one, in memory or not.
            self.stamp_message_id(class, &mut message);
        }
        let spec = self.classes.get(class)?;
        let size = message.size();
        let queue = &mut self.queues[class];
        let must_journal = spec.durability == Durability::Durable
            || !queue.fits_in_memory(size)
            || self.appends_in_flight[class] > 0;
        // Only acked publishes are timed; skip the handle otherwise.
        let latency = (request.ack_id != 0)
            .then(|| self.ack_latency.get(class).cloned())
            .flatten();
        if !must_journal {
            // Its publisher waits to hear `Forwarded` only when it goes out
            // within the next send or two; behind a real backlog (a replay,
            // a JetStream stream not confirmed yet) it hears `Queued` now.
            let jetstream_waiting = spec.jetstream && !self.jetstream_verified[class];
            let forward_now = self.nats.is_up()
                && !jetstream_waiting
                && queue.unsent_in_window() < 2 * SEND_BATCH;
            if forward_now {
                // Answered `Forwarded` when the send step hands it to NATS;
                // counted even without an ack, for the PING barrier.
                self.deferred_acks += 1;
                let ack = AckTo {
                    outbox: (request.ack_id != 0).then(|| outbox.clone()),
                    request,
                    latency,
                };
                queue.push_memory(message, None, Some(ack));
            } else {
                // Held until NATS returns, possibly for the whole outage:
                // copied out of the read buffer it shares with other frames.
                // While NATS is up a queued message leaves within moments,
                // so the copy is skipped on that path.
                let message = if self.nats.is_up() {
                    message
                } else {
                    message.detached()
                };
                queue.push_memory(message, None, None);
                self.stats.record_publish(class, PublishOutcome::Queued);
                answer(outbox, &request, latency.as_ref(), AckOutcome::Queued);
            }
            return None;
        }
        if let Some(refusal) = self.journal.refusing() {
            // Refused before it is stamped, so the chain has no hole for it.
            self.stats.record_rejection(class, ErrorCode::JournalFull);
            let health = self.journal.health();
            let why = match refusal {
                crate::journal::Refusal::LowSpace => format!(
                    "the journal's filesystem has {} bytes free, under the reserve of {} (relay.journal_reserve_bytes)",
                    health.free_bytes.unwrap_or(0),
                    health.reserve_bytes
                ),
                crate::journal::Refusal::DiskFull => {
                    "the journal's disk is full; retry once space is freed".to_string()
                }
                crate::journal::Refusal::StorageError => {
                    "the journal is reopening after an I/O error; retry shortly".to_string()
                }
            };
            self.note_journal_refusal(class, refusal.name(), &why);
            let outcome = AckOutcome::Rejected {
                code: ErrorCode::JournalFull,
                message: Text::from(why),
            };
            answer(outbox, &request, latency.as_ref(), outcome);
            return None;
        }
        let budget_used = self.journal.backlog(class).bytes;
        if spec.when_full == WhenFull::Reject && budget_used + size > spec.max_bytes {
            self.stats.record_rejection(class, ErrorCode::JournalFull);
            let message = Text::from(format!(
                "class {} has {} of its {} journal bytes in use",
                spec.name, budget_used, spec.max_bytes
            ));
            let outcome = AckOutcome::Rejected {
                code: ErrorCode::JournalFull,
                message,
            };
            answer(outbox, &request, latency.as_ref(), outcome);
            return None;
        }
        // Stamped once, as the journal keeps it, so every copy that ever
        // reaches NATS (including resends after a crash) carries the same
        // chain position and id. A client's own chain headers were removed
        // when the relay accepted the message.
        let chain = self.stamper.advance(&message.subject, &message.payload);
        let message_id = (!jetstream).then(|| {
            self.next_message_id += 1;
            (self.class_texts[class].clone(), self.next_message_id)
        });
        let mut new_message = NewMessage::from(message);
        new_message.stamp = Some(JournalStamp {
            relay_id: self.relay_id.clone(),
            chain,
            message_id,
        });
        // Counted now: later publishes of this batch must queue behind it.
        self.appends_in_flight[class] += 1;
        self.deferred_acks += 1;
        // A commit can still fail, and even a fire-and-forget publisher
        // hears of that (an ERROR frame), so this one keeps its session.
        let ack = AckTo {
            outbox: Some(outbox.clone()),
            request,
            latency,
        };
        Some((class, new_message, ack))
    }

    /// Counts a publish the journal could not take for want of space (or
    /// while it reopens) and logs it, at most one line per interval.
    fn note_journal_refusal(&mut self, class: ClassId, reason: &str, why: &str) {
        self.journal_refusals += 1;
        if let Some(refused) = self
            .journal_refusal_log
            .due(self.journal_refusals, Instant::now())
        {
            warn!(
                class = self.class_name(class),
                reason,
                refused,
                total = self.journal_refusals,
                "journal-bound publishes refused with journal_full (retryable): {why}"
            );
        }
    }

    /// Publishes the stamper's eviction count. An eviction is normal once
    /// more subjects were journaled than it keeps, but a message lost just
    /// before its chain restarted goes unnoticed by validators, so it is
    /// counted and, at most every few seconds, logged.
    fn note_chain_evictions(&mut self) {
        let evictions = self.stamper.evictions();
        if evictions == self.view.chain_evictions.load(Ordering::Relaxed) {
            return;
        }
        self.view
            .chain_evictions
            .store(evictions, Ordering::Relaxed);
        if let Some(evicted) = self.chain_eviction_log.due(evictions, Instant::now()) {
            info!(
                evicted,
                total = evictions,
                kept = CHAIN_SUBJECTS,
                "sequence chains of the least recently journaled subjects forgotten to make room; their next message starts a new chain"
            );
        }
    }

    /// `Nats-Msg-Id`: relay, class and a relay-wide counter. Stamped once,
    /// at acceptance, so every copy that reaches NATS (resends after a lost
    /// connection or a crash included) carries the same id.
    fn stamp_message_id(&mut self, class: ClassId, message: &mut QueuedMessage) {
        self.next_message_id += 1;
        let id = format_message_id(&self.relay_id, self.class_name(class), self.next_message_id)
            .finish();
        message
            .headers
            .insert(Text::from_static(MESSAGE_ID_HEADER), id);
    }

    /// A journal commit answered one append.
    fn on_appended(
        &mut self,
        class: ClassId,
        ack: AckTo,
        result: Result<crate::journal::Appended, JournalError>,
    ) {
        self.appends_in_flight[class] = self.appends_in_flight[class].saturating_sub(1);
        self.answered_deferred_acks += 1;
        match result {
            Ok(appended) => {
                if appended.dropped_oldest > 0 {
                    crate::ops::stats::add(
                        &self.view.gauges[class].dropped_oldest,
                        appended.dropped_oldest,
                    );
                }
                self.queues[class].push_journal_only(appended.seq);
                self.stats.record_publish(class, PublishOutcome::Journaled);
                ack.answer(AckOutcome::Journaled);
            }
            Err(error) => {
                // Full budget, full disk, a database reopening: retry later.
                let code = if error.is_capacity() {
                    ErrorCode::JournalFull
                } else {
                    ErrorCode::Internal
                };
                self.stats.record_rejection(class, code);
                ack.answer(AckOutcome::Rejected {
                    code,
                    message: Text::from(error.to_string()),
                });
            }
        }
    }

    fn on_completion(&mut self, completion: Completion) {
        match completion {
            Completion::Appended { results, started } => {
                // One sample per batch: the wait for its commits.
                self.append_latency.record(started.elapsed().as_secs_f64());
                // A failed commit fails every message in it: one log line
                // per class and batch, not one per message.
                let mut failures: Vec<(ClassId, u64, JournalError)> = Vec::new();
                for (class, ack, result) in results {
                    if let Err(error) = &result {
                        match failures.iter_mut().find(|(failed, _, _)| *failed == class) {
                            Some((_, count, _)) => *count += 1,
                            None => failures.push((class, 1, error.clone())),
                        }
                    }
                    self.on_appended(class, ack, result);
                }
                for (class, count, error) in failures {
                    if error.is_capacity() && !matches!(error, JournalError::Full { .. }) {
                        self.journal_refusals += count - 1;
                        self.note_journal_refusal(class, "journal_unavailable", &error.to_string());
                    } else {
                        warn!(%error, class = self.class_name(class), messages = count, "journal append failed; the publishers were told");
                    }
                }
            }
            Completion::Refilled { class, result } => match result {
                Ok(batch) => {
                    let messages = batch
                        .messages
                        .into_iter()
                        .map(|stored| (stored.seq, QueuedMessage::from(stored)))
                        .collect();
                    self.queues[class].finish_refill(messages, &batch.skipped);
                }
                Err(error) => {
                    warn!(%error, class = self.class_name(class), "journal read failed; retrying in 1 s");
                    self.queues[class].abort_refill();
                    self.refill_retry_at[class] = Some(Instant::now() + SWEEP_INTERVAL);
                }
            },
            Completion::Probed {
                generation,
                marks,
                confirmed,
            } => {
                self.probe_in_flight = false;
                if generation != self.generation || !confirmed {
                    return;
                }
                for (class, mark) in marks.into_iter().enumerate() {
                    if mark > 0 {
                        self.confirm(class, mark);
                    }
                }
            }
            Completion::JetStreamAcked {
                class,
                generation,
                count,
                confirmed,
            } => {
                self.jetstream_in_flight[class] = false;
                if generation != self.generation {
                    return;
                }
                self.jetstream_verified[class] = confirmed;
                if confirmed {
                    self.confirm(class, count);
                } else {
                    // Not stored (stream not ready, JetStream down): the
                    // whole unconfirmed part of the class goes again.
                    self.queues[class].unsend_all();
                }
            }
            Completion::ConfirmFailed { class, through_seq } => {
                let retry = &mut self.confirm_retry[class];
                *retry = Some(retry.map_or(through_seq, |seq| seq.max(through_seq)));
            }
            Completion::Maintained(health) => {
                self.maintenance_in_flight = false;
                if health.is_some_and(|health| health.refusing.is_none()) {
                    // Trims that failed while the journal could not commit.
                    for class in 0..self.confirm_retry.len() {
                        if let Some(seq) = self.confirm_retry[class].take() {
                            self.trim(class, seq);
                        }
                    }
                }
            }
            Completion::Expired { class, messages } => {
                crate::ops::stats::add(&self.view.gauges[class].expired, messages);
                self.queues[class].tail_expired(messages);
            }
            Completion::Background => {}
        }
    }

    /// NATS has the first `count` sent messages of `class`: let them go.
    fn confirm(&mut self, class: ClassId, count: usize) {
        if let Some(seq) = self.queues[class].confirm(count) {
            self.trim(class, seq);
        }
    }

    /// Removes what NATS confirmed from the journal; a failure is retried
    /// once the journal commits again.
    fn trim(&mut self, class: ClassId, through_seq: u64) {
        let journal = self.journal.clone();
        self.pending.push(Box::pin(async move {
            match journal.confirm(class, through_seq).await {
                Ok(()) => Completion::Background,
                Err(error) => {
                    warn!(%error, through_seq, "journal trim failed; retrying once the journal commits again");
                    Completion::ConfirmFailed { class, through_seq }
                }
            }
        }));
    }

    fn class_name(&self, class: ClassId) -> &str {
        self.classes
            .get(class)
            .map_or("unknown", |spec| spec.name.as_str())
    }

    /// Sends from the highest-priority class with unsent work, then asks
    /// NATS to confirm.
    async fn send_batch(&mut self) {
        let Some(class) = self.sendable_class() else {
            return;
        };
        let jetstream = self.classes.get(class).is_some_and(|spec| spec.jetstream);
        if jetstream {
            return self.send_jetstream_batch(class).await;
        }
        let batch = self.queues[class].take_unsent(SEND_BATCH);
        let nats = self.nats.clone();
        let client = nats.client().clone();
        let mut sent = 0u64;
        let mut entries = batch.into_iter();
        while let Some(entry) = entries.next() {
            let result = match to_header_map(&entry.message.headers) {
                // Polled once first: with room in the client's command
                // queue a publish completes at once, and racing it against
                // the link (a watch receiver per message) cost more than
                // the publish. Only one that must wait for room takes the
                // race. A send that did not complete enqueued nothing (tokio
                // mpsc's send is cancel-safe), so the retry sends it once.
                Ok(headers) => match publish(&client, &entry.message, headers).now_or_never() {
                    Some(result) => not_sent(result),
                    None => {
                        let headers = to_header_map(&entry.message.headers).ok().flatten();
                        match with_link(&nats, publish(&client, &entry.message, headers)).await {
                            Some(result) => not_sent(result),
                            None => Err(NotSent::Link),
                        }
                    }
                },
                // Validated when accepted; a message from an older journal
                // might still fail.
                Err(error) => Err(NotSent::Refused(error.to_string())),
            };
            match result {
                Ok(()) => self.answer_sent(class, entry.ack),
                Err(NotSent::Link) => {
                    self.batch_interrupted(class, entry, entries);
                    return;
                }
                Err(NotSent::Refused(reason)) => self.refused_by_nats(class, entry.ack, &reason),
            }
            sent += 1;
        }
        if sent > 0 {
            self.start_probe();
        }
    }

    /// A JetStream class's batch: each message's PubAck is its confirmation.
    async fn send_jetstream_batch(&mut self, class: ClassId) {
        let limit = if self.jetstream_verified[class] {
            SEND_BATCH
        } else {
            1
        };
        let batch = self.queues[class].take_unsent(limit);
        let nats = self.nats.clone();
        let jetstream = async_nats::jetstream::new(nats.client().clone());
        let mut acks = Vec::with_capacity(batch.len());
        let mut entries = batch.into_iter();
        while let Some(entry) = entries.next() {
            let headers = to_header_map(&entry.message.headers)
                .ok()
                .flatten()
                .unwrap_or_default();
            let publish = jetstream.publish_with_headers(
                to_subject(&entry.message.subject),
                headers,
                entry.message.payload.clone(),
            );
            let sent = tokio::select! {
                biased;
                result = publish => Some(result),
                () = link_lost(&nats) => None,
            };
            match sent {
                Some(Ok(ack)) => {
                    acks.push(ack);
                    self.answer_sent(class, entry.ack);
                }
                Some(Err(error))
                    if error.kind()
                        == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded =>
                {
                    // Counted as sent, with no PubAck to wait for: the next
                    // confirmation releases it in order.
                    self.refused_by_nats(class, entry.ack, &error.to_string());
                }
                _ => {
                    self.batch_interrupted(class, entry, entries);
                    return;
                }
            }
        }
        if acks.is_empty() {
            return;
        }
        self.jetstream_in_flight[class] = true;
        let generation = self.generation;
        let count = acks.len();
        self.pending.push(Box::pin(async move {
            let mut confirmed = true;
            for ack in acks {
                if let Err(error) = ack.await {
                    warn!(%error, "JetStream did not store a replayed message; sending again");
                    confirmed = false;
                    break;
                }
            }
            if !confirmed {
                // Typically a stream still loading after a restart: give it
                // a moment instead of resending in a tight loop.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Completion::JetStreamAcked {
                class,
                generation,
                count,
                confirmed,
            }
        }));
    }

    /// NATS can never take this message (larger than its max_payload): it
    /// is dropped, counted and logged, and its publisher, if it waits, is
    /// told. It counts as sent, so the confirmation that follows releases
    /// it (and its journal row) in order instead of sending it forever.
    fn refused_by_nats(&mut self, class: ClassId, ack: Option<AckTo>, reason: &str) {
        let total = self
            .stats
            .nats_refused_drops
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if let Some(dropped) = self.nats_refusal_log.due(total, Instant::now()) {
            warn!(
                class = self.class_name(class),
                reason,
                dropped,
                total,
                "NATS refuses a message (larger than its max_payload); dropped, counted in holdfast_messages_dropped_total{{reason=\"nats_refused\"}}"
            );
        }
        if let Some(ack) = ack {
            self.answered_deferred_acks += 1;
            self.stats.record_rejection(class, ErrorCode::LimitExceeded);
            ack.answer(AckOutcome::Rejected {
                code: ErrorCode::LimitExceeded,
                message: Text::from(format!("NATS refused the message: {reason}")),
            });
        }
    }

    /// The send step handed an entry to NATS: answer its publisher, if one waits.
    fn answer_sent(&mut self, class: ClassId, ack: Option<AckTo>) {
        match ack {
            Some(ack) => {
                self.answered_deferred_acks += 1;
                self.stats.record_publish(class, PublishOutcome::Forwarded);
                ack.answer(AckOutcome::Forwarded);
            }
            None => crate::ops::stats::add(&self.view.gauges[class].replayed, 1),
        }
    }

    fn start_probe(&mut self) {
        if self.probe_in_flight {
            return;
        }
        let now = tokio::time::Instant::now();
        if now < self.next_probe_at && self.unconfirmed_core() < PROBE_EARLY_AT {
            self.probe_waiting = true;
            return;
        }
        self.next_probe_at = now + PROBE_SPACING;
        self.probe_waiting = false;
        self.probe_in_flight = true;
        let marks: Vec<usize> = self
            .queues
            .iter()
            .enumerate()
            .map(|(class, queue)| {
                // JetStream classes are confirmed by their PubAcks.
                let jetstream = self.classes.get(class).is_some_and(|spec| spec.jetstream);
                if jetstream {
                    0
                } else {
                    queue.unconfirmed()
                }
            })
            .collect();
        let generation = self.generation;
        let client = self.nats.client().clone();
        let subject = self.probe_subject.clone();
        self.pending.push(Box::pin(async move {
            // Nobody answers this subject: the server says "no responders"
            // only after processing every message this connection sent
            // before the probe.
            let confirmed = probe_round_trip(&client, &subject, PROBE_TIMEOUT).await;
            Completion::Probed {
                generation,
                marks,
                confirmed,
            }
        }));
    }

    fn connection_lost(&mut self) {
        self.generation += 1;
        self.jetstream_verified.fill(false);
        for class in 0..self.queues.len() {
            self.queues[class].unsend_all();
            for ack in self.queues[class].take_waiting_acks() {
                self.answer_queued(class, ack);
            }
        }
    }

    /// The link dropped while a batch was being handed over: the entry that
    /// failed and the rest stay queued (sent again later), and publishers
    /// still waiting hear `Queued`.
    fn batch_interrupted(
        &mut self,
        class: ClassId,
        failed: Entry<AckTo>,
        rest: impl Iterator<Item = Entry<AckTo>>,
    ) {
        for ack in std::iter::once(failed.ack)
            .chain(rest.map(|entry| entry.ack))
            .flatten()
        {
            self.answer_queued(class, ack);
        }
        self.connection_lost();
    }

    /// A publish that was to be forwarded now waits in memory instead.
    fn answer_queued(&mut self, class: ClassId, ack: AckTo) {
        self.answered_deferred_acks += 1;
        self.stats.record_publish(class, PublishOutcome::Queued);
        ack.answer(AckOutcome::Queued);
    }

    fn start_refills(&mut self) {
        if !self.nats.is_up() {
            // Nothing would be sent; keep the backlog on disk, not in memory.
            return;
        }
        let now = Instant::now();
        for class in 0..self.queues.len() {
            if self.refill_retry_at[class].is_some_and(|at| now < at) {
                continue;
            }
            // As many as fit the class's memory budget beside what the
            // window holds, at the journal's average message size (at most
            // REFILL_BATCH; one when the window is empty, so a budget smaller
            // than one message still makes progress).
            let queue = &self.queues[class];
            let backlog = self.journal.backlog(class);
            let average = backlog
                .bytes
                .checked_div(backlog.messages)
                .unwrap_or(1)
                .max(1);
            let memory = self.classes.get(class).map_or(0, |spec| spec.memory_bytes);
            let room = memory.saturating_sub(queue.window_bytes());
            let mut count = usize::try_from(room / average)
                .unwrap_or(REFILL_BATCH)
                .min(REFILL_BATCH);
            if count == 0 {
                if !queue.window_is_empty() {
                    // Confirmations will make room.
                    continue;
                }
                count = 1;
            }
            let Some(after) = self.queues[class].start_refill(REFILL_LOW_WATER) else {
                continue;
            };
            let journal = self.journal.clone();
            self.pending.push(Box::pin(async move {
                let result = journal.read_after(class, after, count).await;
                Completion::Refilled { class, result }
            }));
        }
    }

    fn release_barriers(&mut self) {
        if self.barriers.is_empty() {
            return;
        }
        // Answers may complete out of order across classes; counting them
        // is close enough for a flush barrier and never waits forever.
        let completed = self.answered_deferred_acks;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.barriers)
            .into_iter()
            .partition(|(ticket, _)| *ticket <= completed);
        self.barriers = waiting;
        for (_, done) in ready {
            let _ = done.send(());
        }
    }

    /// Removes (and counts) undelivered messages older than their class's
    /// `max_age`, in memory and in the journal.
    fn expire(&mut self, now: u64) {
        for (class, spec) in self.classes.specs().iter().enumerate() {
            let cutoff = now.saturating_sub(spec.max_age.as_millis() as u64);
            let (messages, bytes) = self.queues[class].expire_before(cutoff);
            if messages > 0 {
                crate::ops::stats::add(&self.view.gauges[class].expired, messages);
                warn!(class = %spec.name, messages, bytes, reason = "max_age", "undelivered messages expired");
            }
            let journal_oldest = self.journal.backlog(class).oldest_accepted_ms;
            if journal_oldest.is_some_and(|oldest| oldest < cutoff) {
                let journal = self.journal.clone();
                let name = spec.name.clone();
                self.pending.push(Box::pin(async move {
                    match journal.expire_older_than(class, cutoff).await {
                        Ok(removed) => {
                            if removed.messages > 0 {
                                warn!(class = %name, messages = removed.messages, bytes = removed.bytes, reason = "max_age", "journaled messages expired");
                            }
                            Completion::Expired {
                                class,
                                messages: removed.messages,
                            }
                        }
                        Err(error) => {
                            warn!(%error, "journal expiry failed");
                            Completion::Background
                        }
                    }
                }));
            }
        }
    }

    /// Retention, and compaction of a drained journal.
    fn sweep(&mut self) {
        // Expiry bounds what an outage can pile up. Once NATS is back the
        // backlog drains within seconds, and expiring it then would only
        // turn late messages into lost ones.
        if !self.nats.is_up() {
            self.expire(crate::util::wall_clock::unix_millis());
        }
        self.sync_tails_with_journal();
        if !self.maintenance_in_flight {
            // Free space, a database to reopen, damaged rows at the head.
            self.maintenance_in_flight = true;
            let journal = self.journal.clone();
            self.pending.push(Box::pin(async move {
                let health = match journal.maintain().await {
                    Ok(health) => Some(health),
                    Err(error) => {
                        warn!(%error, "journal maintenance failed");
                        None
                    }
                };
                Completion::Maintained(health)
            }));
        }
        let idle = self.last_activity.elapsed() >= COMPACT_AFTER_IDLE;
        if idle && self.queues.iter().all(ClassQueue::is_empty) {
            let journal = self.journal.clone();
            self.pending.push(Box::pin(async move {
                match journal.compact_if_empty().await {
                    Ok(true) => info!("journal drained and idle: file space reclaimed"),
                    Ok(false) => {}
                    Err(error) => warn!(%error, "journal compaction failed"),
                }
                Completion::Background
            }));
            // Once per idle period is enough.
            self.last_activity = Instant::now();
        }
    }

    /// The journal expires messages on its own; tails that no longer exist
    /// there are dropped from the queues so nothing waits for them.
    fn sync_tails_with_journal(&mut self) {
        for class in 0..self.queues.len() {
            let in_journal = self.journal.backlog(class).messages;
            let (queued, _) = self.queues[class].backlog();
            if in_journal == 0 && queued > 0 && self.appends_in_flight[class] == 0 {
                self.queues[class].tail_expired(queued);
            }
        }
    }

    fn publish_gauges(&self) {
        for (class, queue) in self.queues.iter().enumerate() {
            let gauges = &self.view.gauges[class];
            let (messages, memory_bytes) = queue.backlog();
            let journal = self.journal.backlog(class);
            gauges.backlog_messages.store(messages, Ordering::Relaxed);
            gauges
                .backlog_bytes
                .store(memory_bytes.max(journal.bytes), Ordering::Relaxed);
            let oldest = [queue.oldest_in_memory_ms(), journal.oldest_accepted_ms]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(0);
            gauges.oldest_accepted_ms.store(oldest, Ordering::Relaxed);
        }
    }
}

/// Hands `message` to the NATS client (its command queue; the client's
/// connection task writes it out).
fn publish<'a>(
    client: &'a async_nats::Client,
    message: &QueuedMessage,
    headers: Option<async_nats::HeaderMap>,
) -> impl Future<Output = Result<(), async_nats::PublishError>> + 'a {
    let subject = to_subject(&message.subject);
    let payload = message.payload.clone();
    async move {
        match headers {
            Some(headers) => client.publish_with_headers(subject, headers, payload).await,
            None => client.publish(subject, payload).await,
        }
    }
}

/// Why a message was not handed to NATS.
enum NotSent {
    /// The link is gone: the message stays queued and goes again.
    Link,
    /// NATS can never take it (larger than its max_payload).
    Refused(String),
}

fn not_sent(result: Result<(), async_nats::PublishError>) -> Result<(), NotSent> {
    result.map_err(|error| match error.kind() {
        async_nats::client::PublishErrorKind::Send => NotSent::Link,
        async_nats::client::PublishErrorKind::MaxPayloadExceeded
        | async_nats::client::PublishErrorKind::InvalidSubject => {
            NotSent::Refused(error.to_string())
        }
    })
}

/// Runs a NATS client call unless the link drops first (a stalled
/// connection would otherwise hold the forwarder for the whole outage);
/// `None` then.
async fn with_link<F, T>(nats: &NatsLink, call: F) -> Option<T>
where
    F: Future<Output = T>,
{
    tokio::select! {
        biased;
        result = call => Some(result),
        () = link_lost(nats) => None,
    }
}

/// Resolves once the NATS link is not up.
async fn link_lost(nats: &NatsLink) {
    let mut link = nats.watch();
    let _ = link
        .wait_for(|snapshot| snapshot.status != LinkStatus::Up)
        .await;
}
