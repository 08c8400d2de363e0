//! The forwarder's decisions, sans-IO: where an accepted publish waits
//! (memory or journal), which class sends next, when NATS is asked to
//! confirm, what a confirmation, a lost connection or a journal read
//! changes, and which publisher hears what, when.
//!
//! Inputs are `handle_*` calls carrying the time (`now`) and what the shell
//! observed (the link, the journal's state, a send's result); outputs are
//! return values and `poll_*` calls: answers for publishers, barriers to
//! release, batches to send, probes, journal reads and trims to start. The
//! shell (`forwarder.rs`) runs the select loop, the NATS client and the
//! journal; everything here is plain data and unit tested on a clock the
//! tests set.
//!
//! The rules it keeps:
//! - Classes send in strict priority: a class sends only while no higher
//!   class has anything unsent, even when that class must wait for a
//!   journal read or for PubAcks before it can send.
//! - Within a class, nothing accepted later is sent before something
//!   accepted earlier: while journaled messages are ahead (or appends are
//!   in flight), new messages of the class go to the journal behind them.
//! - A message leaves only once NATS confirmed it (a core round-trip probe
//!   after it, or its JetStream PubAck) on the connection it was sent on;
//!   a lost connection bumps the generation, every unconfirmed message is
//!   sent again, and late confirmations of the old connection are ignored.
//! - A journaled publish is answered `Journaled` only after its commit.
//! - A barrier is released once every answer owed before it was given.

use crate::journal::{Appended, ClassBacklog};
use crate::messaging::class_queue::{ClassQueue, QueuedMessage};
use crate::messaging::classes::{ClassId, Classes, Durability, WhenFull};
use holdfast_wire::{AckOutcome, ErrorCode, Text};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Messages sent per class before the forwarder looks at other events.
pub const SEND_BATCH: usize = 512;
/// Messages read back from the journal at a time.
pub const REFILL_BATCH: usize = 4096;
/// The next journal read starts once this few read messages are unsent, so
/// the read overlaps the sending of the rest.
const REFILL_LOW_WATER: usize = REFILL_BATCH / 2;
/// After a failed journal read, how long before that class reads again (a
/// damaged row must not turn into a busy loop of failing reads).
const REFILL_RETRY: Duration = Duration::from_secs(1);
/// Confirmation probes start at most this often while messages keep
/// coming. Each is a request through nats-server on the connection the
/// messages take, and one after every send (at low rates, one per message)
/// added about 13 µs to a message's p50 delivery latency. Confirmation only
/// frees memory and journal rows, which may wait this long.
pub const PROBE_SPACING: Duration = Duration::from_millis(1);
/// With this many core messages unconfirmed a probe starts without waiting
/// out [`PROBE_SPACING`], so a burst does not pile up in memory.
pub const PROBE_EARLY_AT: usize = 8 * SEND_BATCH;
/// A drained journal is compacted after this long without traffic.
pub const COMPACT_AFTER_IDLE: Duration = Duration::from_secs(10);
/// A publish waits to hear `Forwarded` only while its class has fewer than
/// this many unsent messages in memory; behind more it hears `Queued` now.
const FORWARD_NOW_LIMIT: usize = 2 * SEND_BATCH;

/// What the core needs of a publisher's answer handle.
pub trait AckHandle {
    /// The handle to keep while the message waits in memory to be sent,
    /// where only `Forwarded` or `Queued` can follow (the shell drops what
    /// a fire-and-forget publish will never use).
    fn for_memory(self) -> Self;
}

/// What the core reads of the journal's state; the journal publishes it in
/// shared cells, so reading it is not I/O.
pub trait JournalState {
    /// Why the journal takes no message now (disk full, under its reserve,
    /// reopening), if it does not.
    fn refusal(&self) -> Option<String>;
    fn backlog(&self, class: ClassId) -> ClassBacklog;
}

/// Where an accepted publish went.
#[derive(Debug)]
pub enum Admission<A> {
    /// Held in memory; answered when the send step hands it to NATS (or
    /// `Queued` if the link drops first).
    Held,
    /// Held in memory behind a backlog or an outage; answered `Queued`.
    Queued,
    /// Bound for the journal: the shell stamps it, submits it, and reports
    /// the commit with [`ForwardCore::handle_appended`].
    ToJournal(QueuedMessage, A),
    /// Refused, because the journal takes nothing now; answered.
    JournalRefusing,
    /// Refused, because the class's journal budget is used up; answered.
    ClassFull,
    /// Refused: no such class (the session classified it); answered.
    UnknownClass,
}

/// An answer owed to a publisher.
#[derive(Debug)]
pub struct Answer<A> {
    pub class: ClassId,
    pub ack: A,
    pub outcome: AckOutcome,
}

/// A journal append that failed.
#[derive(Debug, Clone)]
pub struct AppendFailed {
    /// Out of budget or space, or the journal is reopening: retry later.
    pub capacity: bool,
    pub message: String,
}

/// Messages to hand to NATS now, in order.
#[derive(Debug)]
pub struct SendBatch<A> {
    pub class: ClassId,
    /// Confirmed by PubAcks: publish through JetStream.
    pub jetstream: bool,
    /// The connection generation the batch goes out on.
    pub generation: u64,
    /// Where the batch starts in its class's window (see
    /// [`ForwardCore::batch_messages`]).
    pub first: usize,
    /// Each message's ack, if its publisher still waits for one.
    pub acks: Vec<Option<A>>,
}

/// A confirmation probe to start: on success, the first `marks[class]`
/// sent messages of each class are confirmed.
#[derive(Debug, PartialEq, Eq)]
pub struct Probe {
    pub generation: u64,
    pub marks: Vec<usize>,
}

/// A journal read to start: up to `count` messages of `class` after `after`.
#[derive(Debug, PartialEq, Eq)]
pub struct Refill {
    pub class: ClassId,
    pub after: u64,
    pub count: usize,
}

/// What a journal read brought back.
#[derive(Debug, Default)]
pub struct Refilled {
    /// (sequence, message), in order.
    pub messages: Vec<(u64, QueuedMessage)>,
    /// (first, last) sequences of damaged rows the read skipped.
    pub skipped: Vec<(u64, u64)>,
}

/// Journal rows of `class` through `through_seq` may go.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Trim {
    pub class: ClassId,
    pub through_seq: u64,
}

/// What a retention sweep decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Per class: (messages, bytes) only memory held, removed for `max_age`.
    pub expired_in_memory: Vec<(ClassId, u64, u64)>,
    /// Journaled messages of a class accepted before this Unix time (ms)
    /// are to be expired.
    pub expire_journal: Vec<(ClassId, u64)>,
    /// The journal is drained and idle: compact it.
    pub compact: bool,
}

/// One class's numbers for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClassView {
    /// Undelivered messages, in memory and in the journal.
    pub messages: u64,
    pub memory_bytes: u64,
    pub oldest_in_memory_ms: Option<u64>,
    pub replayed: u64,
    pub expired: u64,
    pub dropped_oldest: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct ClassCounters {
    replayed: u64,
    expired: u64,
    dropped_oldest: u64,
}

/// The probe schedule.
#[derive(Debug)]
struct ProbeState {
    in_flight: bool,
    /// The earliest time the next probe may start.
    next_at: Instant,
    /// A probe is due at `next_at`.
    waiting: bool,
}

/// The forwarder's state and decisions. `A` is a publisher's answer
/// handle, `B` a barrier's waiter.
pub struct ForwardCore<A, B> {
    classes: Classes,
    queues: Vec<ClassQueue<A>>,
    /// Journal appends not yet answered, per class (they fix the order).
    appends_in_flight: Vec<u64>,
    /// JetStream classes wait for a batch's PubAcks before sending more.
    jetstream_in_flight: Vec<bool>,
    /// Whether a JetStream class's stream stored a message on this
    /// connection. Until then one message goes at a time: right after a
    /// restart a stream may still be loading, and a pipelined batch would
    /// be stored with holes that the resend then fills out of order.
    jetstream_verified: Vec<bool>,
    refill_retry_at: Vec<Option<Instant>>,
    /// Per class: the highest trim that failed, retried once the journal
    /// commits again (otherwise delivered messages would stay, and a
    /// restart resend them).
    trim_retry: Vec<Option<u64>>,
    counters: Vec<ClassCounters>,
    generation: u64,
    probe: ProbeState,
    /// Answers owed for publishes that wait on a send or a commit, and how
    /// many of those were given; barriers wait on these counts.
    deferred_acks: u64,
    answered_deferred_acks: u64,
    barriers: Vec<(u64, B)>,
    answers: VecDeque<Answer<A>>,
    last_activity: Instant,
}

impl<A: AckHandle, B> ForwardCore<A, B> {
    /// A core for `classes`, adopting the backlog the journal recovered.
    pub fn new(classes: Classes, recovered: &[ClassBacklog], now: Instant) -> ForwardCore<A, B> {
        let count = classes.len();
        let queues = classes
            .specs()
            .iter()
            .enumerate()
            .map(|(class, spec)| {
                let mut queue = ClassQueue::new(spec.memory_bytes);
                if let Some(backlog) = recovered.get(class) {
                    queue.restore(backlog.first_seq, backlog.last_seq, backlog.messages);
                }
                queue
            })
            .collect();
        ForwardCore {
            classes,
            queues,
            appends_in_flight: vec![0; count],
            jetstream_in_flight: vec![false; count],
            jetstream_verified: vec![false; count],
            refill_retry_at: vec![None; count],
            trim_retry: vec![None; count],
            counters: vec![ClassCounters::default(); count],
            generation: 0,
            probe: ProbeState {
                in_flight: false,
                next_at: now,
                waiting: false,
            },
            deferred_acks: 0,
            answered_deferred_acks: 0,
            barriers: Vec::new(),
            answers: VecDeque::new(),
            last_activity: now,
        }
    }

    /// Publishers sent something (compaction waits for a quiet journal).
    pub fn handle_activity(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// Takes one publish of `class`. JetStream classes' messages must
    /// already carry their `Nats-Msg-Id`.
    pub fn handle_accept(
        &mut self,
        class: ClassId,
        message: QueuedMessage,
        ack: A,
        link_up: bool,
        journal: &impl JournalState,
    ) -> Admission<A> {
        let Some(spec) = self.classes.get(class) else {
            self.answers.push_back(Answer {
                class,
                ack,
                outcome: rejected(ErrorCode::UnknownClass, format!("no class {class}")),
            });
            return Admission::UnknownClass;
        };
        let size = message.size();
        let queue = &mut self.queues[class];
        let must_journal = spec.durability == Durability::Durable
            || !queue.fits_in_memory(size)
            || self.appends_in_flight[class] > 0;
        if !must_journal {
            let jetstream_waiting = spec.jetstream && !self.jetstream_verified[class];
            let forward_now =
                link_up && !jetstream_waiting && queue.unsent_in_window() < FORWARD_NOW_LIMIT;
            if forward_now {
                self.deferred_acks += 1;
                queue.push_memory(message, None, Some(ack.for_memory()));
                return Admission::Held;
            }
            // Held until NATS returns, possibly for the whole outage:
            // copied out of the read buffer it shares with other frames.
            // While NATS is up a queued message leaves within moments, so
            // the copy is skipped on that path.
            let message = if link_up { message } else { message.detached() };
            queue.push_memory(message, None, None);
            self.answers.push_back(Answer {
                class,
                ack,
                outcome: AckOutcome::Queued,
            });
            return Admission::Queued;
        }
        if let Some(why) = journal.refusal() {
            self.answers.push_back(Answer {
                class,
                ack,
                outcome: rejected(ErrorCode::JournalFull, why),
            });
            return Admission::JournalRefusing;
        }
        let used = journal.backlog(class).bytes;
        if spec.when_full == WhenFull::Reject && used + size > spec.max_bytes {
            let why = format!(
                "class {} has {used} of its {} journal bytes in use",
                spec.name, spec.max_bytes
            );
            self.answers.push_back(Answer {
                class,
                ack,
                outcome: rejected(ErrorCode::JournalFull, why),
            });
            return Admission::ClassFull;
        }
        // Counted now: later publishes of the class must queue behind it.
        self.appends_in_flight[class] += 1;
        self.deferred_acks += 1;
        Admission::ToJournal(message, ack)
    }

    /// A journal commit answered one append of `class`. Commits must be
    /// reported in the order the appends were submitted.
    pub fn handle_appended(
        &mut self,
        class: ClassId,
        ack: A,
        result: Result<Appended, AppendFailed>,
    ) {
        self.appends_in_flight[class] = self.appends_in_flight[class].saturating_sub(1);
        self.answered_deferred_acks += 1;
        let outcome = match result {
            Ok(appended) => {
                self.counters[class].dropped_oldest += appended.dropped_oldest;
                self.queues[class].push_journal_only(appended.seq);
                AckOutcome::Journaled
            }
            Err(failed) => {
                let code = if failed.capacity {
                    ErrorCode::JournalFull
                } else {
                    ErrorCode::Internal
                };
                rejected(code, failed.message)
            }
        };
        self.answers.push_back(Answer {
            class,
            ack,
            outcome,
        });
    }

    /// Whether a batch is ready to send (see [`ForwardCore::poll_send`]).
    pub fn has_sendable(&self, link_up: bool) -> bool {
        link_up && self.sendable_class().is_some()
    }

    /// The next batch to hand to NATS: from the highest-priority class with
    /// anything unsent, if that class can send right now.
    pub fn poll_send(&mut self, link_up: bool) -> Option<SendBatch<A>> {
        if !link_up {
            return None;
        }
        let class = self.sendable_class()?;
        let jetstream = self.is_jetstream(class);
        let limit = if jetstream && !self.jetstream_verified[class] {
            1
        } else {
            SEND_BATCH
        };
        let (first, acks) = self.queues[class].take_unsent_acks(limit);
        Some(SendBatch {
            class,
            jetstream,
            generation: self.generation,
            first,
            acks,
        })
    }

    /// The messages of `batch`, in order. Valid until the core next
    /// changes (a confirmation moves the window): the shell encodes them
    /// right after [`ForwardCore::poll_send`].
    pub fn batch_messages(&self, batch: &SendBatch<A>) -> impl Iterator<Item = &QueuedMessage> {
        self.queues[batch.class].window_messages(batch.first, batch.acks.len())
    }

    /// The shell handed a message of a batch to NATS.
    pub fn handle_handed(&mut self, class: ClassId, ack: Option<A>) {
        match ack {
            Some(ack) => {
                self.answered_deferred_acks += 1;
                self.answers.push_back(Answer {
                    class,
                    ack,
                    outcome: AckOutcome::Forwarded,
                });
            }
            None => self.counters[class].replayed += 1,
        }
    }

    /// NATS can never take a message of a batch (larger than its
    /// max_payload). It counts as sent, so the confirmation that follows
    /// releases it (and its journal row) in order instead of it being sent
    /// forever; its publisher, if one waits, is told.
    pub fn handle_refused_by_nats(&mut self, class: ClassId, ack: Option<A>, reason: &str) {
        if let Some(ack) = ack {
            self.answered_deferred_acks += 1;
            self.answers.push_back(Answer {
                class,
                ack,
                outcome: rejected(
                    ErrorCode::LimitExceeded,
                    format!("NATS refused the message: {reason}"),
                ),
            });
        }
    }

    /// The link dropped while a batch was being handed over: `unsent` (the
    /// acks of the entry that failed and the rest) stays queued and goes
    /// again later; publishers still waiting hear `Queued`.
    pub fn handle_interrupted(
        &mut self,
        class: ClassId,
        unsent: impl IntoIterator<Item = Option<A>>,
    ) {
        for ack in unsent.into_iter().flatten() {
            self.answer_queued(class, ack);
        }
        self.handle_link_down();
    }

    /// A JetStream batch went out; the class waits for its PubAcks.
    pub fn handle_jetstream_sent(&mut self, class: ClassId) {
        self.jetstream_in_flight[class] = true;
    }

    /// Every PubAck of a JetStream batch came back (`confirmed`), or one
    /// failed: then the class's whole unconfirmed part goes again.
    pub fn handle_jetstream_acked(
        &mut self,
        class: ClassId,
        generation: u64,
        count: usize,
        confirmed: bool,
    ) -> Option<Trim> {
        self.jetstream_in_flight[class] = false;
        if generation != self.generation {
            return None;
        }
        self.jetstream_verified[class] = confirmed;
        if confirmed {
            self.confirm(class, count)
        } else {
            self.queues[class].unsend_all();
            None
        }
    }

    /// A confirmation probe to start now, if one is due: the link is up,
    /// core messages wait for confirmation, none is in flight, and the
    /// spacing allows it (or enough piled up to skip it).
    pub fn poll_probe(&mut self, now: Instant, link_up: bool) -> Option<Probe> {
        if self.probe.in_flight {
            return None;
        }
        let unconfirmed = self.unconfirmed_core();
        if !link_up || unconfirmed == 0 {
            self.probe.waiting = false;
            return None;
        }
        if now < self.probe.next_at && unconfirmed < PROBE_EARLY_AT {
            self.probe.waiting = true;
            return None;
        }
        self.probe.next_at = now + PROBE_SPACING;
        self.probe.waiting = false;
        self.probe.in_flight = true;
        let marks = (0..self.queues.len())
            .map(|class| {
                if self.is_jetstream(class) {
                    0
                } else {
                    self.queues[class].unconfirmed()
                }
            })
            .collect();
        Some(Probe {
            generation: self.generation,
            marks,
        })
    }

    /// When a probe that waits for its spacing is due (wake the shell then).
    pub fn probe_deadline(&self) -> Option<Instant> {
        (self.probe.waiting && !self.probe.in_flight).then_some(self.probe.next_at)
    }

    /// A probe came back: `confirmed` if NATS answered within its timeout.
    /// Returns the journal trims the confirmation allows.
    pub fn handle_probed(
        &mut self,
        generation: u64,
        marks: &[usize],
        confirmed: bool,
    ) -> Vec<Trim> {
        self.probe.in_flight = false;
        if generation != self.generation || !confirmed {
            return Vec::new();
        }
        marks
            .iter()
            .enumerate()
            .filter(|(_, mark)| **mark > 0)
            .filter_map(|(class, mark)| self.confirm(class, *mark))
            .collect()
    }

    /// The NATS connection is gone: a new generation begins, every
    /// unconfirmed message is unsent again, and publishers still waiting
    /// to hear `Forwarded` hear `Queued`.
    pub fn handle_link_down(&mut self) {
        self.generation += 1;
        self.jetstream_verified.fill(false);
        for class in 0..self.queues.len() {
            self.queues[class].unsend_all();
            for ack in self.queues[class].take_waiting_acks() {
                self.answer_queued(class, ack);
            }
        }
    }

    /// Journal reads to start: for each class whose window runs low and
    /// whose journal holds more, as many messages as fit its memory beside
    /// what the window holds (at least one once the window is empty).
    /// Nothing while the link is down: the backlog stays on disk.
    pub fn poll_refills(
        &mut self,
        now: Instant,
        link_up: bool,
        journal: &impl JournalState,
    ) -> Vec<Refill> {
        if !link_up {
            return Vec::new();
        }
        let mut refills = Vec::new();
        for class in 0..self.queues.len() {
            if self.refill_retry_at[class].is_some_and(|at| now < at) {
                continue;
            }
            if !self.queues[class].wants_refill(REFILL_LOW_WATER) {
                continue;
            }
            let backlog = journal.backlog(class);
            let average = backlog
                .bytes
                .checked_div(backlog.messages)
                .unwrap_or(1)
                .max(1);
            let memory = self.classes.get(class).map_or(0, |spec| spec.memory_bytes);
            let queue = &mut self.queues[class];
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
            let Some(after) = queue.start_refill(REFILL_LOW_WATER) else {
                continue;
            };
            refills.push(Refill {
                class,
                after,
                count,
            });
        }
        refills
    }

    /// A journal read came back; `None` if it failed (then the class reads
    /// again after a pause).
    pub fn handle_refilled(&mut self, class: ClassId, read: Option<Refilled>, now: Instant) {
        match read {
            Some(read) => self.queues[class].finish_refill(read.messages, &read.skipped),
            None => {
                self.queues[class].abort_refill();
                self.refill_retry_at[class] = Some(now + REFILL_RETRY);
            }
        }
    }

    /// A trim failed (e.g. the disk was full); retried once the journal
    /// commits again.
    pub fn handle_trim_failed(&mut self, trim: Trim) {
        let retry = &mut self.trim_retry[trim.class];
        *retry = Some(retry.map_or(trim.through_seq, |seq| seq.max(trim.through_seq)));
    }

    /// The journal commits again: the trims that failed meanwhile.
    pub fn handle_journal_healthy(&mut self) -> Vec<Trim> {
        (0..self.trim_retry.len())
            .filter_map(|class| {
                self.trim_retry[class]
                    .take()
                    .map(|through_seq| Trim { class, through_seq })
            })
            .collect()
    }

    /// The journal expired `messages` of `class`'s journaled tail.
    pub fn handle_journal_expired(&mut self, class: ClassId, messages: u64) {
        self.counters[class].expired += messages;
        self.queues[class].tail_expired(messages);
    }

    /// Retention and compaction, once a second. Expiry runs only while the
    /// link is down: it bounds what an outage can pile up, and once NATS
    /// is back the backlog drains within seconds, where expiring it would
    /// only turn late messages into lost ones.
    pub fn handle_sweep(
        &mut self,
        now: Instant,
        now_ms: u64,
        link_up: bool,
        journal: &impl JournalState,
    ) -> Sweep {
        let mut sweep = Sweep::default();
        if !link_up {
            for (class, spec) in self.classes.specs().iter().enumerate() {
                let max_age_ms = u64::try_from(spec.max_age.as_millis()).unwrap_or(u64::MAX);
                let cutoff = now_ms.saturating_sub(max_age_ms);
                let (messages, bytes) = self.queues[class].expire_before(cutoff);
                if messages > 0 {
                    self.counters[class].expired += messages;
                    sweep.expired_in_memory.push((class, messages, bytes));
                }
                let oldest = journal.backlog(class).oldest_accepted_ms;
                if oldest.is_some_and(|oldest| oldest < cutoff) {
                    sweep.expire_journal.push((class, cutoff));
                }
            }
        }
        // The journal expires and damages rows on its own; tails it no
        // longer holds leave the queues so nothing waits for them.
        for class in 0..self.queues.len() {
            let (queued, _) = self.queues[class].backlog();
            if journal.backlog(class).messages == 0
                && queued > 0
                && self.appends_in_flight[class] == 0
            {
                self.queues[class].tail_expired(queued);
            }
        }
        let idle = now.saturating_duration_since(self.last_activity) >= COMPACT_AFTER_IDLE;
        if idle && self.queues.iter().all(ClassQueue::is_empty) {
            sweep.compact = true;
            // Once per idle period is enough.
            self.last_activity = now;
        }
        sweep
    }

    /// On shutdown: every message only memory holds (acked `Queued`, or
    /// sent and not yet confirmed), to be journaled for the next start.
    pub fn drain_memory_only(&mut self) -> Vec<(ClassId, QueuedMessage)> {
        let mut drained = Vec::new();
        for (class, queue) in self.queues.iter_mut().enumerate() {
            drained.extend(
                queue
                    .take_memory_only()
                    .into_iter()
                    .map(|message| (class, message)),
            );
        }
        drained
    }

    /// Registers a barrier: released once every answer owed now was given.
    /// `keep` prunes waiters that gave up, before the list grows.
    pub fn handle_barrier(&mut self, waiter: B, keep: impl FnMut(&B) -> bool) {
        if self.barriers.len() >= self.barriers.capacity() {
            let mut keep = keep;
            self.barriers.retain(|(_, waiter)| keep(waiter));
        }
        self.barriers.push((self.deferred_acks, waiter));
    }

    /// The next answer to give, in the order they became known.
    pub fn poll_answer(&mut self) -> Option<Answer<A>> {
        self.answers.pop_front()
    }

    /// The next barrier to release, in registration order. Give the
    /// answers first: a barrier means "everything before it was answered".
    pub fn poll_barrier(&mut self) -> Option<B> {
        let first = self.barriers.first()?;
        if first.0 > self.answered_deferred_acks {
            return None;
        }
        Some(self.barriers.remove(0).1)
    }

    /// Undelivered messages, all classes.
    pub fn backlog_total(&self) -> u64 {
        self.queues.iter().map(|queue| queue.backlog().0).sum()
    }

    pub fn class_view(&self, class: ClassId) -> ClassView {
        let queue = &self.queues[class];
        let counters = self.counters[class];
        let (messages, memory_bytes) = queue.backlog();
        ClassView {
            messages,
            memory_bytes,
            oldest_in_memory_ms: queue.oldest_in_memory_ms(),
            replayed: counters.replayed,
            expired: counters.expired,
            dropped_oldest: counters.dropped_oldest,
        }
    }

    /// The class to send from now: the highest-priority class with anything
    /// unsent, if it can send right now. A lower class never goes ahead
    /// while a higher one has unsent messages, even ones that wait for a
    /// journal read or for PubAcks, so a backlog drains class by class.
    fn sendable_class(&self) -> Option<ClassId> {
        let class = self.queues.iter().position(ClassQueue::has_unsent)?;
        let queue = &self.queues[class];
        (queue.has_unsent_in_window() && !self.jetstream_in_flight[class]).then_some(class)
    }

    fn is_jetstream(&self, class: ClassId) -> bool {
        self.classes.get(class).is_some_and(|spec| spec.jetstream)
    }

    /// Unconfirmed messages of classes confirmed by a core round trip.
    fn unconfirmed_core(&self) -> usize {
        (0..self.queues.len())
            .filter(|class| !self.is_jetstream(*class))
            .map(|class| self.queues[class].unconfirmed())
            .sum()
    }

    /// NATS has the first `count` sent messages of `class`: they leave, and
    /// the journal rows among them may be trimmed.
    fn confirm(&mut self, class: ClassId, count: usize) -> Option<Trim> {
        self.queues[class]
            .confirm(count)
            .map(|through_seq| Trim { class, through_seq })
    }

    fn answer_queued(&mut self, class: ClassId, ack: A) {
        self.answered_deferred_acks += 1;
        self.answers.push_back(Answer {
            class,
            ack,
            outcome: AckOutcome::Queued,
        });
    }
}

fn rejected(code: ErrorCode, message: String) -> AckOutcome {
    AckOutcome::Rejected {
        code,
        message: Text::from(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::classes::ClassOverrides;
    use bytes::Bytes;
    use holdfast_wire::Headers;
    use std::collections::BTreeMap;

    /// A publisher's answer handle: its number.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Ack(u32);

    impl AckHandle for Ack {
        fn for_memory(self) -> Ack {
            self
        }
    }

    #[derive(Default)]
    struct FakeJournal {
        refusal: Option<String>,
        backlogs: BTreeMap<ClassId, ClassBacklog>,
    }

    impl JournalState for FakeJournal {
        fn refusal(&self) -> Option<String> {
            self.refusal.clone()
        }
        fn backlog(&self, class: ClassId) -> ClassBacklog {
            self.backlogs.get(&class).copied().unwrap_or_default()
        }
    }

    type Core = ForwardCore<Ack, &'static str>;

    const PREFILL: ClassId = 0;
    const DECODE: ClassId = 1;
    const KV_EVENTS: ClassId = 2;

    /// prefill, decode, kv_events (durable), default; `extra` overrides.
    fn classes(extra: &str) -> Classes {
        let overrides: BTreeMap<String, ClassOverrides> = toml::from_str(extra).unwrap();
        Classes::resolve(&overrides).unwrap()
    }

    fn core_with(extra: &str, t0: Instant) -> Core {
        ForwardCore::new(classes(extra), &[], t0)
    }

    fn message(payload: &str) -> QueuedMessage {
        QueuedMessage {
            subject: Text::from("work"),
            headers: Headers::default(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            accepted_at_ms: 1_000,
        }
    }

    fn accept(core: &mut Core, class: ClassId, id: u32, link_up: bool) -> Admission<Ack> {
        core.handle_accept(
            class,
            message(&format!("m{id}")),
            Ack(id),
            link_up,
            &FakeJournal::default(),
        )
    }

    fn answers(core: &mut Core) -> Vec<(u32, AckOutcome)> {
        std::iter::from_fn(|| core.poll_answer())
            .map(|answer| (answer.ack.0, answer.outcome))
            .collect()
    }

    /// The payloads of the next batch, taken as sent.
    fn next_payloads(core: &mut Core) -> Vec<String> {
        let batch = core.poll_send(true).unwrap();
        payloads(core, &batch)
    }

    fn payloads(core: &Core, batch: &SendBatch<Ack>) -> Vec<String> {
        core.batch_messages(batch)
            .map(|message| String::from_utf8(message.payload.to_vec()).unwrap())
            .collect()
    }

    /// Hands every entry of the next batch to NATS; returns its class and
    /// payloads.
    fn send(core: &mut Core) -> Option<(ClassId, Vec<String>)> {
        let batch = core.poll_send(true)?;
        let sent = (batch.class, payloads(core, &batch));
        for ack in batch.acks {
            core.handle_handed(batch.class, ack);
        }
        Some(sent)
    }

    fn journaled(core: &mut Core, class: ClassId, ack: Ack, seq: u64) {
        core.handle_appended(
            class,
            ack,
            Ok(Appended {
                seq,
                dropped_oldest: 0,
            }),
        );
    }

    #[test]
    fn a_publish_while_nats_is_up_is_answered_forwarded_once_handed_over() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        assert!(matches!(
            accept(&mut core, PREFILL, 1, true),
            Admission::Held
        ));
        assert!(answers(&mut core).is_empty(), "not before it is sent");
        assert_eq!(send(&mut core), Some((PREFILL, vec!["m1".to_string()])));
        assert_eq!(answers(&mut core), [(1, AckOutcome::Forwarded)]);
    }

    #[test]
    fn a_publish_during_an_outage_is_answered_queued_and_replayed_once_nats_is_back() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        assert!(matches!(
            accept(&mut core, DECODE, 1, false),
            Admission::Queued
        ));
        assert_eq!(answers(&mut core), [(1, AckOutcome::Queued)]);
        assert!(core.poll_send(false).is_none(), "nothing goes while down");
        assert_eq!(send(&mut core), Some((DECODE, vec!["m1".to_string()])));
        assert!(answers(&mut core).is_empty(), "already answered");
        assert_eq!(core.class_view(DECODE).replayed, 1);
    }

    #[test]
    fn classes_send_in_strict_priority_order() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        for id in 0..3 {
            accept(&mut core, DECODE, id, false);
        }
        for id in 10..13 {
            accept(&mut core, PREFILL, id, false);
        }
        let (first, _) = send(&mut core).unwrap();
        let (second, _) = send(&mut core).unwrap();
        assert_eq!((first, second), (PREFILL, DECODE));
        assert!(send(&mut core).is_none());
    }

    #[test]
    fn a_lower_class_waits_while_a_higher_class_reads_its_journal() {
        let t0 = Instant::now();
        let recovered = [
            ClassBacklog {
                messages: 2,
                bytes: 20,
                oldest_accepted_ms: Some(1),
                first_seq: 1,
                last_seq: 2,
            },
            ClassBacklog::default(),
        ];
        let mut core: Core = ForwardCore::new(classes(""), &recovered, t0);
        accept(&mut core, DECODE, 1, true);
        assert!(
            core.poll_send(true).is_none(),
            "decode must not overtake prefill's journaled backlog"
        );
        let journal = FakeJournal {
            backlogs: [(PREFILL, recovered[0])].into(),
            ..FakeJournal::default()
        };
        let refills = core.poll_refills(t0, true, &journal);
        assert_eq!(
            refills,
            [Refill {
                class: PREFILL,
                after: 0,
                count: REFILL_BATCH
            }]
        );
        core.handle_refilled(
            PREFILL,
            Some(Refilled {
                messages: vec![(1, message("j1")), (2, message("j2"))],
                skipped: Vec::new(),
            }),
            t0,
        );
        assert_eq!(
            send(&mut core),
            Some((PREFILL, vec!["j1".to_string(), "j2".to_string()]))
        );
        assert_eq!(send(&mut core), Some((DECODE, vec!["m1".to_string()])));
    }

    #[test]
    fn live_traffic_never_overtakes_its_class_backlog_in_the_journal() {
        let t0 = Instant::now();
        // A memory budget of two small messages: the third spills.
        let mut core = core_with("[prefill]\nmemory_bytes = 300\n", t0);
        accept(&mut core, PREFILL, 1, false);
        accept(&mut core, PREFILL, 2, false);
        let Admission::ToJournal(_, spilled) = accept(&mut core, PREFILL, 3, false) else {
            panic!("the third message must spill to the journal");
        };
        // Room again (nothing else changed), but an append is in flight:
        // the next one must queue behind it, in the journal.
        core.drain_memory_only();
        assert!(matches!(
            accept(&mut core, PREFILL, 4, false),
            Admission::ToJournal(..)
        ));
        journaled(&mut core, PREFILL, spilled, 1);
        // Now a journaled tail exists: still the journal, not memory.
        assert!(matches!(
            accept(&mut core, PREFILL, 5, true),
            Admission::ToJournal(..)
        ));
    }

    #[test]
    fn a_durable_class_is_answered_journaled_only_after_its_commit() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        let Admission::ToJournal(_, ack) = accept(&mut core, KV_EVENTS, 1, true) else {
            panic!("kv_events is durable");
        };
        assert!(answers(&mut core).is_empty(), "no answer before the commit");
        journaled(&mut core, KV_EVENTS, ack, 1);
        assert_eq!(answers(&mut core), [(1, AckOutcome::Journaled)]);
        assert_eq!(core.class_view(KV_EVENTS).messages, 1);
    }

    #[test]
    fn a_failed_commit_is_a_typed_rejection() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        let Admission::ToJournal(_, full) = accept(&mut core, KV_EVENTS, 1, true) else {
            panic!()
        };
        let Admission::ToJournal(_, broken) = accept(&mut core, KV_EVENTS, 2, true) else {
            panic!()
        };
        let failed = |capacity| AppendFailed {
            capacity,
            message: "no".to_string(),
        };
        core.handle_appended(KV_EVENTS, full, Err(failed(true)));
        core.handle_appended(KV_EVENTS, broken, Err(failed(false)));
        let codes: Vec<_> = answers(&mut core)
            .into_iter()
            .map(|(id, outcome)| match outcome {
                AckOutcome::Rejected { code, .. } => (id, code),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            codes,
            [(1, ErrorCode::JournalFull), (2, ErrorCode::Internal)]
        );
        assert_eq!(core.class_view(KV_EVENTS).messages, 0);
    }

    #[test]
    fn a_journal_that_refuses_or_a_full_class_budget_rejects_without_holding_anything() {
        let t0 = Instant::now();
        let mut core = core_with("[kv_events]\nmax_bytes = 100\n", t0);
        let refusing = FakeJournal {
            refusal: Some("disk full".to_string()),
            ..FakeJournal::default()
        };
        let admission = core.handle_accept(KV_EVENTS, message("a"), Ack(1), true, &refusing);
        assert!(matches!(admission, Admission::JournalRefusing));
        let full = FakeJournal {
            backlogs: [(
                KV_EVENTS,
                ClassBacklog {
                    bytes: 99,
                    ..ClassBacklog::default()
                },
            )]
            .into(),
            ..FakeJournal::default()
        };
        let admission = core.handle_accept(KV_EVENTS, message("b"), Ack(2), true, &full);
        assert!(matches!(admission, Admission::ClassFull));
        let answers = answers(&mut core);
        assert!(matches!(
            &answers[0],
            (1, AckOutcome::Rejected { code: ErrorCode::JournalFull, message }) if message.contains("disk full")
        ));
        assert!(matches!(
            &answers[1],
            (2, AckOutcome::Rejected { code: ErrorCode::JournalFull, message }) if message.contains("kv_events")
        ));
        assert_eq!(core.backlog_total(), 0);
    }

    #[test]
    fn memory_full_spills_to_the_journal() {
        let t0 = Instant::now();
        let mut core = core_with("[decode]\nmemory_bytes = 200\n", t0);
        assert!(matches!(
            accept(&mut core, DECODE, 1, true),
            Admission::Held
        ));
        assert!(matches!(
            accept(&mut core, DECODE, 2, true),
            Admission::ToJournal(..)
        ));
    }

    #[test]
    fn a_confirmation_probe_releases_what_was_sent_before_it() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, true);
        accept(&mut core, DECODE, 2, true);
        send(&mut core);
        send(&mut core);
        let probe = core.poll_probe(t0, true).unwrap();
        assert_eq!(probe.marks, [1, 1, 0, 0]);
        assert!(core.poll_probe(t0, true).is_none(), "one at a time");
        let trims = core.handle_probed(probe.generation, &probe.marks, true);
        assert!(trims.is_empty(), "memory messages have no journal rows");
        assert_eq!(core.backlog_total(), 0);
    }

    #[test]
    fn confirmed_journal_rows_are_trimmed_through_the_highest_sequence() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        for (id, seq) in [(1, 7), (2, 8)] {
            let Admission::ToJournal(_, ack) = accept(&mut core, KV_EVENTS, id, true) else {
                panic!()
            };
            journaled(&mut core, KV_EVENTS, ack, seq);
        }
        let journal = FakeJournal::default();
        let refill = core.poll_refills(t0, true, &journal).pop().unwrap();
        assert_eq!((refill.class, refill.after), (KV_EVENTS, 6));
        core.handle_refilled(
            KV_EVENTS,
            Some(Refilled {
                messages: vec![(7, message("a")), (8, message("b"))],
                skipped: Vec::new(),
            }),
            t0,
        );
        send(&mut core);
        let probe = core.poll_probe(t0, true).unwrap();
        assert_eq!(
            core.handle_probed(probe.generation, &probe.marks, true),
            [Trim {
                class: KV_EVENTS,
                through_seq: 8
            }]
        );
    }

    #[test]
    fn after_a_lost_connection_everything_unconfirmed_goes_again_and_old_confirmations_are_ignored()
    {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, true);
        accept(&mut core, PREFILL, 2, true);
        send(&mut core);
        let probe = core.poll_probe(t0, true).unwrap();
        core.handle_link_down();
        // The probe of the old connection comes back "confirmed": it says
        // nothing about the new one.
        assert!(core
            .handle_probed(probe.generation, &probe.marks, true)
            .is_empty());
        assert_eq!(core.backlog_total(), 2);
        let batch = core.poll_send(true).unwrap();
        assert_eq!(payloads(&core, &batch), ["m1", "m2"]);
        assert_eq!(batch.generation, probe.generation + 1);
    }

    #[test]
    fn a_probe_that_timed_out_confirms_nothing_and_is_asked_again() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, true);
        send(&mut core);
        let probe = core.poll_probe(t0, true).unwrap();
        core.handle_probed(probe.generation, &probe.marks, false);
        assert_eq!(core.backlog_total(), 1);
        let later = t0 + PROBE_SPACING;
        assert_eq!(core.poll_probe(later, true), Some(probe));
    }

    #[test]
    fn probes_are_spaced_unless_a_burst_piles_up() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, true);
        send(&mut core);
        let probe = core.poll_probe(t0, true).unwrap();
        core.handle_probed(probe.generation, &probe.marks, true);
        accept(&mut core, PREFILL, 2, true);
        send(&mut core);
        assert!(core.poll_probe(t0, true).is_none(), "too soon");
        assert_eq!(core.probe_deadline(), Some(t0 + PROBE_SPACING));
        assert!(core.poll_probe(t0 + PROBE_SPACING, true).is_some());
        assert_eq!(core.probe_deadline(), None);
        // A burst of PROBE_EARLY_AT unconfirmed messages does not wait.
        let mut core = core_with("", t0);
        for id in 0..PROBE_EARLY_AT as u32 {
            accept(&mut core, PREFILL, id, false);
        }
        while send(&mut core).is_some() {}
        let first = core.poll_probe(t0, true).unwrap();
        // It came back without confirming anything (lost in a reconnect
        // race, say): the burst is still there, and no spacing applies.
        core.handle_probed(first.generation, &[0, 0, 0, 0], true);
        assert!(core.poll_probe(t0, true).is_some());
    }

    #[test]
    fn no_probe_while_the_link_is_down_and_no_wakeup_left_behind() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, true);
        send(&mut core);
        let probe = core.poll_probe(t0, true).unwrap();
        core.handle_probed(probe.generation, &probe.marks, false);
        assert!(core.poll_probe(t0, true).is_none());
        assert!(core.probe_deadline().is_some());
        core.handle_link_down();
        assert!(core.poll_probe(t0 + PROBE_SPACING, false).is_none());
        assert_eq!(core.probe_deadline(), None, "a due probe would spin");
    }

    #[test]
    fn publishers_waiting_to_hear_forwarded_hear_queued_when_the_link_drops() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, true);
        accept(&mut core, PREFILL, 2, true);
        core.handle_barrier("flush", |_| true);
        assert!(core.poll_barrier().is_none());
        core.handle_link_down();
        assert_eq!(
            answers(&mut core),
            [(1, AckOutcome::Queued), (2, AckOutcome::Queued)]
        );
        assert_eq!(core.poll_barrier(), Some("flush"));
    }

    #[test]
    fn a_batch_interrupted_by_the_link_answers_the_rest_queued_and_keeps_them() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        for id in 1..=3 {
            accept(&mut core, PREFILL, id, true);
        }
        let batch = core.poll_send(true).unwrap();
        let mut acks = batch.acks.into_iter();
        let first = acks.next().unwrap();
        core.handle_handed(PREFILL, first);
        core.handle_interrupted(PREFILL, acks);
        assert_eq!(
            answers(&mut core),
            [
                (1, AckOutcome::Forwarded),
                (2, AckOutcome::Queued),
                (3, AckOutcome::Queued)
            ]
        );
        // All three go again: the first may not have reached NATS either.
        assert_eq!(next_payloads(&mut core), ["m1", "m2", "m3"]);
    }

    #[test]
    fn barriers_are_released_in_order_once_every_answer_before_them_was_given() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        core.handle_barrier("empty", |_| true);
        assert_eq!(core.poll_barrier(), Some("empty"), "nothing owed");
        let Admission::ToJournal(_, first) = accept(&mut core, KV_EVENTS, 1, true) else {
            panic!()
        };
        core.handle_barrier("after 1", |_| true);
        let Admission::ToJournal(_, second) = accept(&mut core, KV_EVENTS, 2, true) else {
            panic!()
        };
        core.handle_barrier("after 2", |_| true);
        assert!(core.poll_barrier().is_none());
        journaled(&mut core, KV_EVENTS, first, 1);
        assert_eq!(core.poll_barrier(), Some("after 1"));
        assert!(core.poll_barrier().is_none());
        journaled(&mut core, KV_EVENTS, second, 2);
        assert_eq!(core.poll_barrier(), Some("after 2"));
    }

    #[test]
    fn barriers_whose_waiters_gave_up_are_pruned_before_the_list_grows() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        let Admission::ToJournal(..) = accept(&mut core, KV_EVENTS, 1, true) else {
            panic!()
        };
        for _ in 0..100 {
            core.handle_barrier("gone", |waiter| *waiter != "gone");
        }
        assert!(core.barriers.len() < 100, "{}", core.barriers.len());
    }

    #[test]
    fn an_unverified_jetstream_class_sends_one_message_until_a_pub_ack_came_back() {
        let t0 = Instant::now();
        let mut core = core_with("[decode]\njetstream = true\n", t0);
        for id in 1..=3 {
            accept(&mut core, DECODE, id, true);
        }
        assert_eq!(
            answers(&mut core).len(),
            3,
            "unverified: answered Queued at once"
        );
        let batch = core.poll_send(true).unwrap();
        assert!(batch.jetstream);
        assert_eq!(payloads(&core, &batch), ["m1"]);
        core.handle_jetstream_sent(DECODE);
        assert!(core.poll_send(true).is_none(), "waits for the PubAck");
        core.handle_jetstream_acked(DECODE, batch.generation, 1, true);
        assert_eq!(next_payloads(&mut core), ["m2", "m3"]);
    }

    #[test]
    fn a_jetstream_batch_not_stored_goes_again_and_a_stale_pub_ack_is_ignored() {
        let t0 = Instant::now();
        let mut core = core_with("[prefill]\njetstream = true\n", t0);
        accept(&mut core, PREFILL, 1, true);
        accept(&mut core, PREFILL, 2, true);
        accept(&mut core, DECODE, 3, true);
        let batch = core.poll_send(true).unwrap();
        core.handle_jetstream_sent(PREFILL);
        assert!(
            core.poll_send(true).is_none(),
            "decode waits while prefill has unsent messages and its PubAcks are out"
        );
        core.handle_jetstream_acked(PREFILL, batch.generation, 1, false);
        assert_eq!(next_payloads(&mut core), ["m1"]);
        core.handle_jetstream_sent(PREFILL);
        core.handle_link_down();
        assert!(core
            .handle_jetstream_acked(PREFILL, batch.generation, 1, true)
            .is_none());
        assert_eq!(core.class_view(PREFILL).messages, 2, "not confirmed");
    }

    #[test]
    fn refills_fit_the_memory_budget_wait_while_nats_is_down_and_pause_after_a_failure() {
        let t0 = Instant::now();
        let mut core = core_with("[decode]\nmemory_bytes = 1000\n", t0);
        let journal = FakeJournal {
            backlogs: [(
                DECODE,
                ClassBacklog {
                    messages: 100,
                    bytes: 10_000,
                    ..ClassBacklog::default()
                },
            )]
            .into(),
            ..FakeJournal::default()
        };
        for seq in 1..=100 {
            let Admission::ToJournal(_, ack) = core.handle_accept(
                DECODE,
                message("x"),
                Ack(seq as u32),
                false,
                &FakeJournal::default(),
            ) else {
                // The first fits in memory.
                continue;
            };
            journaled(&mut core, DECODE, ack, seq);
        }
        assert!(core.poll_refills(t0, false, &journal).is_empty());
        let refill = core.poll_refills(t0, true, &journal).pop().unwrap();
        // 1000 bytes of room minus what the window holds, 100 bytes each.
        assert!(refill.count <= 10 && refill.count > 0, "{refill:?}");
        assert!(
            core.poll_refills(t0, true, &journal).is_empty(),
            "one read at a time"
        );
        core.handle_refilled(DECODE, None, t0);
        assert!(core
            .poll_refills(t0 + Duration::from_millis(500), true, &journal)
            .is_empty());
        assert_eq!(
            core.poll_refills(t0 + REFILL_RETRY, true, &journal).len(),
            1
        );
    }

    #[test]
    fn a_message_nats_refuses_is_answered_and_released_by_the_next_confirmation() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, true);
        let batch = core.poll_send(true).unwrap();
        for ack in batch.acks {
            core.handle_refused_by_nats(PREFILL, ack, "maximum payload exceeded");
        }
        assert!(matches!(
            &answers(&mut core)[..],
            [(
                1,
                AckOutcome::Rejected {
                    code: ErrorCode::LimitExceeded,
                    ..
                }
            )]
        ));
        let probe = core.poll_probe(t0, true).unwrap();
        core.handle_probed(probe.generation, &probe.marks, true);
        assert_eq!(core.backlog_total(), 0);
    }

    #[test]
    fn an_outage_expires_messages_past_max_age_but_a_live_link_never_does() {
        let t0 = Instant::now();
        let mut core = core_with("[decode]\nmax_age = \"1m\"\nretention = \"30s\"\n", t0);
        accept(&mut core, DECODE, 1, false);
        let journal = FakeJournal::default();
        let late = 1_000 + 61_000;
        let sweep = core.handle_sweep(t0, late, true, &journal);
        assert!(sweep.expired_in_memory.is_empty());
        let sweep = core.handle_sweep(t0, late, false, &journal);
        assert_eq!(sweep.expired_in_memory.len(), 1);
        assert_eq!(sweep.expired_in_memory[0].1, 1);
        assert_eq!(core.class_view(DECODE).expired, 1);
        assert_eq!(core.backlog_total(), 0);
    }

    #[test]
    fn journaled_messages_past_max_age_are_handed_to_the_journal_to_expire() {
        let t0 = Instant::now();
        let mut core = core_with("[kv_events]\nmax_age = \"1m\"\nretention = \"30s\"\n", t0);
        let Admission::ToJournal(_, ack) = accept(&mut core, KV_EVENTS, 1, false) else {
            panic!()
        };
        journaled(&mut core, KV_EVENTS, ack, 1);
        let journal = FakeJournal {
            backlogs: [(
                KV_EVENTS,
                ClassBacklog {
                    messages: 1,
                    bytes: 2,
                    oldest_accepted_ms: Some(1_000),
                    first_seq: 1,
                    last_seq: 1,
                },
            )]
            .into(),
            ..FakeJournal::default()
        };
        let sweep = core.handle_sweep(t0, 70_000, false, &journal);
        assert_eq!(sweep.expire_journal, [(KV_EVENTS, 10_000)]);
        core.handle_journal_expired(KV_EVENTS, 1);
        assert_eq!(core.backlog_total(), 0);
        assert_eq!(core.class_view(KV_EVENTS).expired, 1);
    }

    #[test]
    fn a_drained_journal_is_compacted_once_per_idle_period() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        let journal = FakeJournal::default();
        assert!(
            !core
                .handle_sweep(t0 + COMPACT_AFTER_IDLE / 2, 0, true, &journal)
                .compact
        );
        let idle = t0 + COMPACT_AFTER_IDLE;
        assert!(core.handle_sweep(idle, 0, true, &journal).compact);
        assert!(!core.handle_sweep(idle, 0, true, &journal).compact);
        accept(&mut core, DECODE, 1, false);
        assert!(
            !core
                .handle_sweep(idle + COMPACT_AFTER_IDLE, 0, true, &journal)
                .compact,
            "not while anything is queued"
        );
    }

    #[test]
    fn failed_trims_are_retried_once_the_journal_commits_again() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        core.handle_trim_failed(Trim {
            class: KV_EVENTS,
            through_seq: 5,
        });
        core.handle_trim_failed(Trim {
            class: KV_EVENTS,
            through_seq: 3,
        });
        assert_eq!(
            core.handle_journal_healthy(),
            [Trim {
                class: KV_EVENTS,
                through_seq: 5
            }]
        );
        assert!(core.handle_journal_healthy().is_empty());
    }

    #[test]
    fn behind_a_long_unsent_queue_a_publish_hears_queued_at_once() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        for id in 0..FORWARD_NOW_LIMIT as u32 {
            assert!(matches!(
                accept(&mut core, PREFILL, id, true),
                Admission::Held
            ));
        }
        assert!(matches!(
            accept(&mut core, PREFILL, 9_999, true),
            Admission::Queued
        ));
    }

    #[test]
    fn shutdown_takes_every_message_only_memory_holds() {
        let t0 = Instant::now();
        let mut core = core_with("", t0);
        accept(&mut core, PREFILL, 1, false);
        accept(&mut core, DECODE, 2, true);
        send(&mut core);
        let drained: Vec<ClassId> = core
            .drain_memory_only()
            .into_iter()
            .map(|(class, _)| class)
            .collect();
        assert_eq!(drained, [PREFILL, DECODE]);
    }
}
