//! The forwarder: the one task that carries class traffic to NATS, through
//! memory and the journal. Its decisions (order, confirmation, answers)
//! are made by the sans-IO [`ForwardCore`]; this file is the select loop
//! around it, the NATS publishes, the journal calls, stamping, metrics and
//! logs.
//!
//! Sessions hand it class traffic (everything but requests and replies) over
//! a bounded channel. It answers each publish with what happened to it:
//! `Forwarded` (sent to NATS now), `Queued` (held in memory), `Journaled`
//! (durably in the journal) or a rejection. It sends classes in priority
//! order — strictly: a class is only sent from while no higher class has
//! anything unsent, so prefills drain before decodes, and live traffic of a
//! higher class is never starved by a lower class's backlog. A message
//! leaves a queue (and the journal) only once NATS confirmed it: a PING
//! after a batch comes back only after the server processed everything
//! the connection sent before it. A lost connection makes every
//! unconfirmed message unsent again (at-least-once; `Nats-Msg-Id` lets
//! consumers and JetStream drop the duplicates).
//!
//! Core classes go out on the relay's own upstream connection (the
//! subscriber link's), each batch encoded here into one buffer and written
//! at once; JetStream classes go through async-nats, whose PubAcks confirm
//! them.

use crate::journal::{
    format_message_id, ClassBacklog, Journal, JournalError, JournalStamp, NewMessage, Refusal,
    MESSAGE_ID_HEADER,
};
use crate::messaging::class_queue::QueuedMessage;
use crate::messaging::classes::{ClassId, Classes};
use crate::messaging::forward_core::{
    AckHandle, Admission, AppendFailed, ForwardCore, JournalState, Refilled, SendBatch, Trim,
    SEND_BATCH,
};
use crate::messaging::kv_check_view::KvCheckView;
use crate::messaging::kv_consistency::KvCheckLimits;
use crate::messaging::kv_event_check::KvEventCheck;
use crate::messaging::nats::link::NatsLink;
use crate::messaging::nats::subscriber::{SubscriberState, UpstreamPublisher};
use crate::messaging::nats_convert::{to_header_map, to_subject};
use crate::ops::stats::{PublishOutcome, RelayStats};
use crate::util::drop_log::DropLog;
use bytes::BytesMut;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use holdfast_wire::chain::ChainStamper;
use holdfast_wire::nats_protocol::{encode_publish, is_sendable_subject, publish_size};
use holdfast_wire::{AckOutcome, LinkStatus, Text};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a confirmation probe may take before the link is suspect.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often retention is enforced and idle compaction considered.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Commands the forwarder's intake holds before publishers wait (each
/// carries up to one socket read's worth of publishes).
const INTAKE: usize = 1_024;
/// Subjects the chain stamper keeps state for.
const CHAIN_SUBJECTS: usize = 100_000;
/// How long sending waits, after the link comes up, for the relay's own
/// subscriptions to be back on NATS.
const SUBSCRIPTIONS_LIMIT: Duration = Duration::from_secs(2);
/// The class whose Dynamo KV events are checked.
const KV_EVENTS_CLASS: &str = "kv_events";

/// What a publisher asked to hear about one publish.
#[derive(Debug, Clone, Copy)]
pub struct AckRequest {
    /// 0: no ack wanted; failures are reported as ERROR frames.
    pub ack_id: u64,
    pub local_deliveries: u32,
    /// When an acked publish arrived, for the ack latency histogram.
    pub received: Option<Instant>,
}

/// Where a publisher hears how its publishes went. The forwarder answers
/// with a typed outcome; the session turns it into a PUB_ACK, or an ERROR
/// frame for a fire-and-forget publish that was refused.
pub trait PublishAnswers: Send + Sync {
    /// `outcome` for the publish `request` asked about. Called on the
    /// forwarder's task: queue the answer, never wait for room.
    fn answer(&self, request: &AckRequest, outcome: AckOutcome);
}

/// `text` kept for the rest of the process, as a static text: the relay id
/// and the class names go into the stamp of every journaled message, and
/// cloning a static text costs no reference count (two per message before,
/// on a count shared with the journal's thread). One of each per relay.
fn for_process_life(text: &str) -> Text {
    Text::from_static(Box::leak(text.to_owned().into_boxed_str()))
}

/// Where a publish's answer goes, kept while the answer waits (on a send
/// or a commit).
pub struct AckTo {
    /// `None` for a fire-and-forget publish on the memory path: its only
    /// possible answers (forwarded, queued) are not sent, so it holds no
    /// handle on the session.
    answers: Option<Arc<dyn PublishAnswers>>,
    request: AckRequest,
    latency: Option<metrics::Histogram>,
}

impl AckHandle for AckTo {
    fn for_memory(self) -> AckTo {
        AckTo {
            answers: self.answers.filter(|_| self.request.ack_id != 0),
            ..self
        }
    }
}

impl AckTo {
    /// Gives the answer; `now` (read once for a whole run of answers, not
    /// per answer) ends its latency sample.
    pub fn answer(&self, outcome: AckOutcome, now: Instant) {
        let Some(answers) = &self.answers else {
            return;
        };
        if let (Some(histogram), Some(received)) = (&self.latency, self.request.received) {
            histogram.record(now.saturating_duration_since(received).as_secs_f64());
        }
        answers.answer(&self.request, outcome);
    }
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
    pub answers: Arc<dyn PublishAnswers>,
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
    /// The Dynamo KV event check's numbers.
    pub kv_check: Arc<KvCheckView>,
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
        /// The upstream connection's loss count when the PING came back;
        /// `None` without an answer.
        losses: Option<u64>,
    },
    /// Every PubAck of a JetStream class's batch came back (or one failed).
    JetStreamAcked {
        class: ClassId,
        generation: u64,
        count: usize,
        confirmed: bool,
    },
    /// The wait for the relay's subscriptions after link coming up `link_up`
    /// ended: `in_place`, or given up after [`SUBSCRIPTIONS_LIMIT`].
    SubscriptionsInPlace {
        link_up: u64,
        in_place: bool,
    },
    /// The journal expired `messages` of `class` (retention).
    Expired {
        class: ClassId,
        messages: u64,
    },
    Background,
}

/// The journal's state as the core reads it.
struct JournalGate<'a>(&'a Journal);

impl JournalState for JournalGate<'_> {
    fn refusal(&self) -> Option<String> {
        let refusal = self.0.refusing()?;
        let health = self.0.health();
        Some(match refusal {
            Refusal::LowSpace => format!(
                "the journal's filesystem has {} bytes free, under the reserve of {} (relay.journal_reserve_bytes)",
                health.free_bytes.unwrap_or(0),
                health.reserve_bytes
            ),
            Refusal::DiskFull => "the journal's disk is full; retry once space is freed".to_string(),
            Refusal::StorageError => {
                "the journal is reopening after an I/O error; retry shortly".to_string()
            }
        })
    }

    fn backlog(&self, class: ClassId) -> ClassBacklog {
        self.0.backlog(class)
    }
}

/// The time as the core sees it; tokio's clock, so paused-time tests
/// drive it too.
fn now() -> Instant {
    TokioInstant::now().into_std()
}

struct Forwarder {
    core: ForwardCore<AckTo, oneshot::Sender<()>>,
    classes: Classes,
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
    maintenance_in_flight: bool,
    next_message_id: u64,
    pending: FuturesUnordered<BoxFuture<Completion>>,
    /// Journal commits, answered strictly in submission order: a later
    /// batch must never reach the class queue before an earlier one, or a
    /// refill in between would send it first.
    appends: FuturesOrdered<BoxFuture<Completion>>,
    /// Core publishes and their confirmations, on the upstream connection.
    upstream: UpstreamPublisher,
    /// The upstream connection's losses the core has been told of: a
    /// higher count means something handed over may not have arrived.
    upstream_losses: u64,
    /// Whether the upstream connection is up (core classes wait otherwise).
    upstream_up: bool,
    /// Its server's max_payload (0 while unknown).
    upstream_max_payload: usize,
    append_latency: metrics::Histogram,
    /// Per class: time from an acked publish's arrival to its answer.
    ack_latency: Vec<metrics::Histogram>,
    /// Class names as header text, shared by every message id stamped.
    class_texts: Vec<Text>,
    /// Whether the relay's own subscriptions are back on NATS since the
    /// link last came up: until then nothing is sent, or a replay could
    /// reach NATS before this node's subscribers are listening again and
    /// miss them (the subscriber connection reconnects on its own).
    subscriptions_in_place: bool,
    /// Counts the link's comings up, so the answer of an older wait for
    /// the subscriptions is ignored.
    link_ups: u64,
    /// Checks the Dynamo KV event streams of the `kv_events` class as they
    /// are sent.
    kv_check: Option<KvEventCheck>,
}

/// What the forwarder is set up with.
pub struct ForwarderSettings {
    pub classes: Classes,
    /// Stamped into chain headers and message ids.
    pub relay_id: Text,
    /// The Dynamo KV event check's limits; `None` turns it off.
    pub kv_check: Option<KvCheckLimits>,
    /// Where the check leaves its streams' places at a clean stop.
    pub kv_check_state: PathBuf,
}

/// Starts the forwarder, adopting the backlog the journal recovered.
pub fn start(
    settings: ForwarderSettings,
    journal: Journal,
    recovered: &[ClassBacklog],
    nats: NatsLink,
    stats: Arc<RelayStats>,
    stop: CancellationToken,
) -> (ForwarderHandle, tokio::task::JoinHandle<()>) {
    let ForwarderSettings {
        classes,
        relay_id,
        kv_check,
        kv_check_state,
    } = settings;
    let relay_id = for_process_life(&relay_id);
    let (commands, receiver) = mpsc::channel(INTAKE);
    for (spec, backlog) in classes.specs().iter().zip(recovered) {
        if backlog.messages > 0 {
            info!(
                class = %spec.name,
                messages = backlog.messages,
                bytes = backlog.bytes,
                "journal backlog recovered; it will be replayed when NATS is up"
            );
        }
    }
    let class_texts = classes.names().map(for_process_life).collect();
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
        kv_check: Arc::new(KvCheckView::new(kv_check.is_some())),
    });
    let kv_class = classes.by_name(KV_EVENTS_CLASS);
    // Random per start, like a Dynamo publisher's own id: the relay's
    // "cleared" messages are a publisher of their own.
    let kv_publisher_id = std::hash::BuildHasher::hash_one(
        &std::collections::hash_map::RandomState::new(),
        relay_id.as_str(),
    );
    // One reading, so the three fields describe the same moment.
    let upstream = nats.subscriber_state();
    let forwarder = Forwarder {
        core: ForwardCore::new(classes.clone(), recovered, now()),
        classes,
        journal,
        stamper: ChainStamper::new(relay_id.clone(), CHAIN_SUBJECTS),
        chain_eviction_log: DropLog::default(),
        nats_refusal_log: DropLog::default(),
        journal_refusals: 0,
        journal_refusal_log: DropLog::default(),
        maintenance_in_flight: false,
        upstream: nats.upstream_publisher(),
        upstream_losses: upstream.losses,
        upstream_up: upstream.server.is_some(),
        upstream_max_payload: upstream.max_payload,
        nats,
        stats,
        view: view.clone(),
        relay_id,
        next_message_id: 0,
        pending: FuturesUnordered::new(),
        appends: FuturesOrdered::new(),
        append_latency: metrics::histogram!(crate::ops::metric_catalog::JOURNAL_APPEND_SECONDS),
        ack_latency,
        class_texts,
        subscriptions_in_place: false,
        link_ups: 0,
        kv_check: kv_class.zip(kv_check).map(|(class, limits)| {
            KvEventCheck::resume(
                class,
                limits,
                kv_publisher_id,
                kv_check_state,
                view.kv_check.clone(),
            )
        }),
    };
    let task = tokio::spawn(forwarder.run(receiver, stop));
    (ForwarderHandle { commands, view }, task)
}

impl Forwarder {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut link = self.nats.watch();
        let mut upstream = self.nats.watch_subscriber();
        let mut upstream_open = true;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut replaying = false;
        self.publish_gauges();
        if self.nats.is_up() {
            self.wait_for_subscriptions();
        }
        loop {
            let can_send = self
                .core
                .has_sendable(self.link_up() && self.subscriptions_in_place);
            let probe_due = self.core.probe_deadline();
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    self.persist_memory_backlog().await;
                    if let Some(check) = &self.kv_check {
                        check.save();
                    }
                    break;
                }
                changed = link.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if link.borrow_and_update().status == LinkStatus::Up {
                        self.wait_for_subscriptions();
                        let backlog = self.core.backlog_total();
                        if backlog > 0 {
                            replaying = true;
                            info!(backlog, "NATS is back: replay started");
                        }
                    } else {
                        self.core.handle_link_down();
                    }
                }
                changed = upstream.changed(), if upstream_open => match changed {
                    Ok(()) => {
                        let state = upstream.borrow_and_update().clone();
                        self.on_upstream(&state);
                    }
                    // The connection task stopped: the relay is stopping.
                    Err(_) => upstream_open = false,
                },
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
                // Wakes the loop; the probe starts below.
                () = sleep_until(probe_due), if probe_due.is_some() => {}
                () = std::future::ready(()), if can_send => self.send_batch().await,
            }
            let link_up = self.link_up();
            let now = now();
            for refill in self
                .core
                .poll_refills(now, link_up, &JournalGate(&self.journal))
            {
                let journal = self.journal.clone();
                self.pending.push(Box::pin(async move {
                    let result = journal
                        .read_after(refill.class, refill.after, refill.count)
                        .await;
                    Completion::Refilled {
                        class: refill.class,
                        result,
                    }
                }));
            }
            // Also asks again after a probe that timed out, rather than
            // waiting for the next send that may never come.
            if let Some(probe) = self.core.poll_probe(now, link_up) {
                self.start_probe(probe.generation, probe.marks);
            }
            self.give_answers();
            while let Some(barrier) = self.core.poll_barrier() {
                let _ = barrier.send(());
            }
            if replaying && self.core.backlog_total() == 0 {
                replaying = false;
                let replayed: u64 = (0..self.classes.len())
                    .map(|class| self.core.class_view(class).replayed)
                    .sum();
                info!(
                    replayed_since_start = replayed,
                    "replay finished: every backlog is confirmed by NATS"
                );
            }
            self.publish_gauges();
        }
    }

    /// Gives every answer the core decided on, counting each outcome.
    fn give_answers(&mut self) {
        let mut now = None;
        while let Some(answer) = self.core.poll_answer() {
            let now = *now.get_or_insert_with(Instant::now);
            let class = answer.class;
            match &answer.outcome {
                AckOutcome::Forwarded => {
                    self.stats.record_publish(class, PublishOutcome::Forwarded)
                }
                AckOutcome::Queued => self.stats.record_publish(class, PublishOutcome::Queued),
                AckOutcome::Journaled => {
                    self.stats.record_publish(class, PublishOutcome::Journaled)
                }
                AckOutcome::Rejected { code, .. } => self.stats.record_rejection(class, *code),
            }
            answer.ack.answer(answer.outcome, now);
        }
    }

    /// On shutdown: messages held only in memory (acked `Queued`, or sent
    /// and not yet confirmed) go to the journal, so a restart replays them
    /// instead of losing them. They land behind anything of their class
    /// already journaled: a class that had both loses order here, not data.
    async fn persist_memory_backlog(&mut self) {
        let mut submitted = Vec::new();
        for (class, message) in self.core.drain_memory_only() {
            match self.journal.submit(class, message.into()).await {
                Ok(pending) => submitted.push(pending),
                Err(error) => {
                    warn!(%error, class = self.class_name(class), reason = "shutdown", "a queued message could not be journaled and is lost");
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

    async fn on_command(&mut self, command: Command) {
        self.core.handle_activity(now());
        match command {
            Command::Accept(AcceptBatch { answers, accepts }) => {
                // Journal-bound messages, per class in acceptance order, go
                // to the writer as one group each: one channel operation and
                // one commit wait per class per batch, not per message.
                let mut to_journal: Vec<(Vec<NewMessage>, Vec<AckTo>)> = (0..self.classes.len())
                    .map(|_| (Vec::new(), Vec::new()))
                    .collect();
                for accept in accepts {
                    if let Some((class, message, ack)) = self.accept(&answers, accept) {
                        to_journal[class].0.push(message);
                        to_journal[class].1.push(ack);
                    }
                }
                self.give_answers();
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
            // A PING whose wait timed out left its barrier behind; while
            // answers stay outstanding (a stalled commit) those would pile
            // up, one per PING.
            Command::Barrier(done) => self.core.handle_barrier(done, |waiter| !waiter.is_closed()),
        }
    }

    /// Takes one publish through the core: held in memory (answered now or
    /// once sent), refused, or bound for the journal — then it is returned,
    /// stamped, for the caller to submit with the rest of its batch.
    fn accept(
        &mut self,
        answers: &Arc<dyn PublishAnswers>,
        accept: Accept,
    ) -> Option<(ClassId, NewMessage, AckTo)> {
        let Accept {
            class,
            mut message,
            ack: request,
        } = accept;
        let jetstream = self.classes.get(class).is_some_and(|spec| spec.jetstream);
        if jetstream {
            // JetStream drops a resent copy only if it carries the same id,
            // so every message of such a class gets one, in memory or not.
            self.stamp_message_id(class, &mut message);
        }
        // Only acked publishes are timed; skip the handle otherwise. A
        // commit can fail, and even a fire-and-forget publisher hears of
        // that (an ERROR frame), so the handle keeps its session.
        let ack = AckTo {
            answers: Some(answers.clone()),
            request,
            latency: (request.ack_id != 0)
                .then(|| self.ack_latency.get(class).cloned())
                .flatten(),
        };
        let link_up = self.nats.is_up();
        let gate = JournalGate(&self.journal);
        match self.core.handle_accept(class, message, ack, link_up, &gate) {
            Admission::ToJournal(message, ack) => {
                // Stamped once, as the journal keeps it, so every copy that
                // ever reaches NATS (including resends after a crash)
                // carries the same chain position and id. A client's own
                // chain headers were removed when the relay accepted it.
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
                Some((class, new_message, ack))
            }
            Admission::JournalRefusing => {
                let reason = self
                    .journal
                    .refusing()
                    .map_or("journal_unavailable", Refusal::name);
                let why = gate.refusal().unwrap_or_default();
                self.note_journal_refusal(class, reason, &why);
                None
            }
            Admission::Held
            | Admission::Queued
            | Admission::ClassFull
            | Admission::UnknownClass => None,
        }
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

    /// Whether class traffic can go upstream: the NATS link is up, and so
    /// is the connection core publishes take.
    fn link_up(&self) -> bool {
        self.nats.is_up() && self.upstream_up
    }

    /// The upstream connection changed: a loss sends everything
    /// unconfirmed again; a new connection waits for the relay's
    /// subscriptions, as the link's coming up does.
    fn on_upstream(&mut self, state: &SubscriberState) {
        if state.losses != self.upstream_losses {
            self.upstream_losses = state.losses;
            self.core.handle_link_down();
            self.give_answers();
        }
        self.upstream_max_payload = state.max_payload;
        let up = state.server.is_some();
        if up && !self.upstream_up && self.nats.is_up() {
            self.wait_for_subscriptions();
        }
        self.upstream_up = up;
    }

    /// Holds sending back until the subscriber connection has the relay's
    /// subscriptions in place again (see `subscriptions_in_place`).
    fn wait_for_subscriptions(&mut self) {
        self.link_ups += 1;
        self.subscriptions_in_place = false;
        let link_up = self.link_ups;
        let nats = self.nats.clone();
        self.pending.push(Box::pin(async move {
            let in_place = nats.subscriptions_in_place(SUBSCRIPTIONS_LIMIT).await;
            Completion::SubscriptionsInPlace { link_up, in_place }
        }));
    }

    fn on_completion(&mut self, completion: Completion) {
        match completion {
            Completion::SubscriptionsInPlace { link_up, in_place } => {
                if link_up == self.link_ups {
                    self.subscriptions_in_place = true;
                    if !in_place {
                        warn!(
                            limit_ms = SUBSCRIPTIONS_LIMIT.as_millis() as u64,
                            "the relay's subscriber connection to NATS is not back yet; sending anyway (this node's subscribers may miss what is sent until it is)"
                        );
                    }
                }
            }
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
                    let result = result.map_err(|error| AppendFailed {
                        capacity: error.is_capacity(),
                        message: error.to_string(),
                    });
                    self.core.handle_appended(class, ack, result);
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
            Completion::Refilled { class, result } => {
                let read = match result {
                    Ok(batch) => Some(Refilled {
                        messages: batch
                            .messages
                            .into_iter()
                            .map(|stored| (stored.seq, QueuedMessage::from(stored)))
                            .collect(),
                        skipped: batch.skipped,
                    }),
                    Err(error) => {
                        warn!(%error, class = self.class_name(class), "journal read failed; retrying in 1 s");
                        None
                    }
                };
                self.core.handle_refilled(class, read, now());
            }
            Completion::Probed {
                generation,
                marks,
                losses,
            } => {
                // Confirmed only if nothing was lost since the core last
                // heard of a loss: otherwise part of what the marks cover
                // may never have reached the server.
                let confirmed = losses == Some(self.upstream_losses);
                for trim in self.core.handle_probed(generation, &marks, confirmed) {
                    self.trim(trim);
                }
                if let Some(losses) = losses.filter(|losses| *losses > self.upstream_losses) {
                    self.upstream_losses = losses;
                    self.core.handle_link_down();
                }
            }
            Completion::JetStreamAcked {
                class,
                generation,
                count,
                confirmed,
            } => {
                if let Some(trim) = self
                    .core
                    .handle_jetstream_acked(class, generation, count, confirmed)
                {
                    self.trim(trim);
                }
            }
            Completion::ConfirmFailed { class, through_seq } => {
                self.core.handle_trim_failed(Trim { class, through_seq });
            }
            Completion::Maintained(health) => {
                self.maintenance_in_flight = false;
                if health.is_some_and(|health| health.refusing.is_none()) {
                    // Trims that failed while the journal could not commit.
                    for trim in self.core.handle_journal_healthy() {
                        self.trim(trim);
                    }
                }
            }
            Completion::Expired { class, messages } => {
                self.core.handle_journal_expired(class, messages);
            }
            Completion::Background => {}
        }
    }

    /// Removes what NATS confirmed from the journal; a failure is retried
    /// once the journal commits again.
    fn trim(&mut self, trim: Trim) {
        let journal = self.journal.clone();
        let Trim { class, through_seq } = trim;
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

    /// Hands the core's next batch to NATS.
    async fn send_batch(&mut self) {
        let Some(batch) = self.core.poll_send(self.link_up()) else {
            return;
        };
        if batch.jetstream {
            return self.send_jetstream_batch(batch).await;
        }
        let class = batch.class;
        // The whole batch as PUB/HPUB operations, one write upstream.
        let bytes: usize = self
            .core
            .batch_messages(&batch)
            .map(|message| message.subject.len() + message.payload.len() + 32)
            .sum();
        let mut operations = BytesMut::with_capacity(bytes);
        // The server this connection reached decides (a cluster's members
        // may differ); before it says, the link's.
        let max_payload = Some(self.upstream_max_payload)
            .filter(|max| *max > 0)
            .or(self.nats.max_payload());
        // Messages NATS can never take, by position, with the reason.
        let mut refused = Vec::new();
        let mut kv_check = self.kv_check.as_mut().filter(|check| check.watches(class));
        for (position, message) in self.core.batch_messages(&batch).enumerate() {
            let (before, after) = match kv_check.as_mut() {
                Some(check) => check.check(message),
                None => (Vec::new(), Vec::new()),
            };
            encode_resets(&mut operations, &before, max_payload);
            match encode_upstream(&mut operations, message, max_payload) {
                Ok(()) => encode_resets(&mut operations, &after, max_payload),
                Err(reason) => refused.push((position, reason)),
            }
        }
        let handed = if operations.is_empty() {
            Some(Ok(()))
        } else {
            with_link(&self.nats, self.upstream.send(operations)).await
        };
        if !matches!(handed, Some(Ok(()))) {
            // The link went, or the relay is stopping: all of it goes again.
            self.core.handle_interrupted(class, batch.acks);
            self.give_answers();
            return;
        }
        let mut refused = refused.into_iter().peekable();
        for (position, ack) in batch.acks.into_iter().enumerate() {
            match refused.next_if(|(at, _)| *at == position) {
                Some((_, reason)) => {
                    self.note_nats_refusal(class, &reason);
                    self.core.handle_refused_by_nats(class, ack, &reason);
                }
                None => self.core.handle_handed(class, ack),
            }
        }
        self.give_answers();
    }

    /// A JetStream class's batch: each message's PubAck is its confirmation.
    async fn send_jetstream_batch(&mut self, batch: SendBatch<AckTo>) {
        let messages: Vec<QueuedMessage> = self.core.batch_messages(&batch).cloned().collect();
        let SendBatch {
            class,
            generation,
            acks: waiting,
            ..
        } = batch;
        let nats = self.nats.clone();
        let jetstream = async_nats::jetstream::new(nats.client().clone());
        let mut acks = Vec::with_capacity(messages.len());
        let mut entries = messages.into_iter().zip(waiting);
        while let Some((message, ack)) = entries.next() {
            // Core publishes on the same connection, so ahead of the
            // message; the stream captures them like any publish.
            let (before, after) = match self.kv_check.as_mut() {
                Some(check) if check.watches(class) => check.check(&message),
                _ => (Vec::new(), Vec::new()),
            };
            if hand_over_resets(&nats, nats.client(), &before)
                .await
                .is_err()
            {
                let unsent = std::iter::once(ack).chain(entries.map(|(_, ack)| ack));
                self.core.handle_interrupted(class, unsent);
                self.give_answers();
                return;
            }
            let headers = to_header_map(&message.headers)
                .ok()
                .flatten()
                .unwrap_or_default();
            let publish = jetstream.publish_with_headers(
                to_subject(&message.subject),
                headers,
                message.payload.clone(),
            );
            let sent = tokio::select! {
                biased;
                result = publish => Some(result),
                () = link_lost(&nats) => None,
            };
            match sent {
                Some(Ok(pub_ack)) => {
                    acks.push(pub_ack);
                    self.core.handle_handed(class, ack);
                    let _ = hand_over_resets(&nats, nats.client(), &after).await;
                }
                Some(Err(error))
                    if error.kind()
                        == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded =>
                {
                    // Counted as sent, with no PubAck to wait for: the next
                    // confirmation releases it in order.
                    let reason = error.to_string();
                    self.note_nats_refusal(class, &reason);
                    self.core.handle_refused_by_nats(class, ack, &reason);
                }
                _ => {
                    let unsent = std::iter::once(ack).chain(entries.map(|(_, ack)| ack));
                    self.core.handle_interrupted(class, unsent);
                    self.give_answers();
                    return;
                }
            }
            self.give_answers();
        }
        if acks.is_empty() {
            return;
        }
        self.core.handle_jetstream_sent(class);
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
    /// is dropped, counted and logged (the core tells its publisher).
    fn note_nats_refusal(&mut self, class: ClassId, reason: &str) {
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
    }

    fn start_probe(&mut self, generation: u64, marks: Vec<usize>) {
        let upstream = self.upstream.clone();
        self.pending.push(Box::pin(async move {
            // The server answers a PING only after processing everything
            // the connection sent before it.
            let losses = tokio::time::timeout(PROBE_TIMEOUT, upstream.confirm())
                .await
                .ok()
                .flatten();
            Completion::Probed {
                generation,
                marks,
                losses,
            }
        }));
    }

    /// Retention, journal maintenance, and compaction of a drained journal.
    fn sweep(&mut self) {
        let sweep = self.core.handle_sweep(
            now(),
            crate::util::wall_clock::unix_millis(),
            self.nats.is_up(),
            &JournalGate(&self.journal),
        );
        for (class, messages, bytes) in sweep.expired_in_memory {
            warn!(
                class = self.class_name(class),
                messages,
                bytes,
                reason = "max_age",
                "undelivered messages expired"
            );
        }
        for (class, cutoff) in sweep.expire_journal {
            let journal = self.journal.clone();
            let name = self.class_name(class).to_string();
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
        if sweep.compact {
            let journal = self.journal.clone();
            self.pending.push(Box::pin(async move {
                match journal.compact_if_empty().await {
                    Ok(true) => info!("journal drained and idle: file space reclaimed"),
                    Ok(false) => {}
                    Err(error) => warn!(%error, "journal compaction failed"),
                }
                Completion::Background
            }));
        }
    }

    fn publish_gauges(&self) {
        if let Some(check) = &self.kv_check {
            check.publish_counts();
        }
        for class in 0..self.classes.len() {
            let gauges = &self.view.gauges[class];
            let view = self.core.class_view(class);
            let journal = self.journal.backlog(class);
            gauges
                .backlog_messages
                .store(view.messages, Ordering::Relaxed);
            gauges
                .backlog_bytes
                .store(view.memory_bytes.max(journal.bytes), Ordering::Relaxed);
            let oldest = [view.oldest_in_memory_ms, journal.oldest_accepted_ms]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(0);
            gauges.oldest_accepted_ms.store(oldest, Ordering::Relaxed);
            gauges.replayed.store(view.replayed, Ordering::Relaxed);
            gauges.expired.store(view.expired, Ordering::Relaxed);
            gauges
                .dropped_oldest
                .store(view.dropped_oldest, Ordering::Relaxed);
        }
    }
}

/// Resolves at `deadline`; never when there is none (the branch is
/// disabled then anyway).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(TokioInstant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}

/// Appends `message` to a batch for the upstream connection, or says why
/// NATS can never take it (checked here, where async-nats used to check
/// before its own writes: a PUB over the server's limit would cost the
/// connection).
fn encode_upstream(
    operations: &mut BytesMut,
    message: &QueuedMessage,
    max_payload: Option<usize>,
) -> Result<(), String> {
    let subject = message.subject.as_bytes();
    if !is_sendable_subject(subject) {
        return Err(format!("invalid subject {:?}", message.subject.as_str()));
    }
    let size = publish_size(&message.headers, &message.payload);
    if let Some(max) = max_payload.filter(|max| size > *max) {
        return Err(format!(
            "message of {size} bytes exceeds the server's max_payload of {max}"
        ));
    }
    encode_publish(
        operations,
        subject,
        None,
        &message.headers,
        &message.payload,
    );
    Ok(())
}

/// Appends KV "cleared" events to a batch; one NATS would refuse (it
/// cannot be, at a few hundred bytes) is skipped, never its message.
fn encode_resets(operations: &mut BytesMut, resets: &[QueuedMessage], max_payload: Option<usize>) {
    for reset in resets {
        if let Err(reason) = encode_upstream(operations, reset, max_payload) {
            warn!(subject = %reset.subject, reason, "NATS would refuse a KV \"cleared\" event; routers keep that worker's tree");
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

/// Hands `message` to the NATS client, waiting for room in its command
/// queue only while the link is up.
async fn hand_over(
    nats: &NatsLink,
    client: &async_nats::Client,
    message: &QueuedMessage,
) -> Result<(), NotSent> {
    match to_header_map(&message.headers) {
        // Polled once first: with room in the client's command queue a
        // publish completes at once, and racing it against the link (a
        // watch receiver per message) cost more than the publish. Only one
        // that must wait for room takes the race. A send that did not
        // complete enqueued nothing (tokio mpsc's send is cancel-safe), so
        // the retry sends it once.
        Ok(headers) => match publish(client, message, headers).now_or_never() {
            Some(result) => not_sent(result),
            None => {
                let headers = to_header_map(&message.headers).ok().flatten();
                match with_link(nats, publish(client, message, headers)).await {
                    Some(result) => not_sent(result),
                    None => Err(NotSent::Link),
                }
            }
        },
        // Validated when accepted; a message from an older journal might
        // still fail.
        Err(error) => Err(NotSent::Refused(error.to_string())),
    }
}

/// Hands "cleared" messages to the NATS client, in order; `Err` only when
/// the link went (the message they go with must wait for the next
/// connection, and its resent copy brings them again). One that NATS refuses
/// (larger than its max_payload: it cannot be, at a few hundred bytes) is
/// skipped, never its message.
async fn hand_over_resets(
    nats: &NatsLink,
    client: &async_nats::Client,
    resets: &[QueuedMessage],
) -> Result<(), NotSent> {
    for reset in resets {
        match hand_over(nats, client, reset).await {
            Err(NotSent::Link) => return Err(NotSent::Link),
            Err(NotSent::Refused(reason)) => {
                warn!(subject = %reset.subject, reason, "NATS refused a KV \"cleared\" event; routers keep that worker's tree");
            }
            Ok(()) => {}
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(subject: &str, payload: &'static [u8]) -> QueuedMessage {
        QueuedMessage {
            subject: Text::from(subject),
            headers: Default::default(),
            payload: Bytes::from_static(payload),
            accepted_at_ms: 0,
        }
    }

    #[test]
    fn a_message_the_server_would_refuse_is_refused_here_and_not_written() {
        let mut operations = BytesMut::new();
        let too_big = encode_upstream(&mut operations, &message("a", b"12345"), Some(4));
        assert!(too_big.unwrap_err().contains("max_payload of 4"));
        let split = encode_upstream(&mut operations, &message("a b", b"x"), None);
        assert!(split.unwrap_err().contains("invalid subject"));
        assert!(operations.is_empty(), "nothing half-written");
        encode_upstream(&mut operations, &message("a", b"1234"), Some(4)).unwrap();
        assert_eq!(&operations[..], b"PUB a 4\r\n1234\r\n");
    }
}
