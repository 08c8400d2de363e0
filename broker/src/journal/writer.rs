//! The journal's only writer: a thread that applies every append, confirm
//! and expiry in group commits.
//!
//! It blocks for one command, then takes everything else already queued and
//! applies all of it in ONE durable redb transaction, so the fsync cost is
//! shared by however many messages arrived while the previous commit was on
//! disk. Each class's new messages of a group become rows of up to
//! `ROW_TARGET_BYTES`. Waiters are answered only after the commit is durable.
//!
//! It also keeps the journal healthy: it reads the filesystem's free space
//! (refusing new messages below the reserve or after a disk-full commit),
//! and when an I/O error made redb fail for good it closes the database and
//! opens it again (what was committed is all there), then carries on.

use super::health::{self, JournalHealth, Refusal, SpaceGuard, REOPEN_INTERVAL, RESUME_MARGIN_MIN};
use super::ledger::{Admission, ClassLedger};
use super::reclaim;
use super::record::{EncodedBatch, EncodedMessage, RowBuilder};
use super::recovery;
use super::state::{Shared, StatCells};
use super::store::{self, panic_message, DamagedRow, BATCHES, META};
use super::trim::{self, Cut, HeadRemoval};
use super::{Appended, ClassLimits, JournalError, Removed};
use crate::util::drop_log::DropLog;
use bytes::Bytes;
use redb::{Durability, StorageError, Table};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// Commands waiting for the writer. Bounded, so a flood of appends waits for
/// room instead of growing memory; also the most one group commit holds.
pub(super) const CHANNEL_CAPACITY: usize = 65_536;

/// Whether each commit also records redb's allocator state. Off: that
/// forces two-phase commits (two fdatasyncs instead of one) and writes state
/// that grows with the file, about 150 bytes per 256-byte message at a
/// million journaled; durable ingest ran 8-9 % faster without it in
/// alternating runs. The price is paid after a crash (`kill -9`) only:
/// reopening walks and checksums the whole file before the relay is ready
/// (0.55 s with 5 million journaled, against 0.1 s with quick repair; the
/// target is 2 s), and `journal inspect` on a crashed file lets redb do that
/// recovery first. The recovery is logged (`recovery::open`).
const QUICK_REPAIR: bool = false;

type Answer<T> = oneshot::Sender<Result<T, JournalError>>;

pub(super) enum Command {
    Append {
        class: usize,
        /// One message.
        message: EncodedBatch,
        done: Answer<Appended>,
    },
    /// Several appends of one class with one answer: one channel operation
    /// and one wake-up of this thread for a whole socket read of publishes.
    AppendMany {
        class: usize,
        messages: EncodedBatch,
        done: Answer<Vec<Result<Appended, JournalError>>>,
    },
    Confirm {
        class: usize,
        through_seq: u64,
        done: Answer<()>,
    },
    Expire {
        class: usize,
        cutoff_ms: u64,
        done: Answer<Removed>,
    },
    Compact {
        done: Answer<bool>,
    },
    /// Read free space, reopen a failed database, drop damaged head rows.
    Maintain {
        done: Answer<JournalHealth>,
    },
}

/// An answer held back until its group's commit is durable.
enum Reply {
    Appended(Answer<Appended>, Result<Appended, JournalError>),
    AppendedMany(
        Answer<Vec<Result<Appended, JournalError>>>,
        Result<Vec<Result<Appended, JournalError>>, JournalError>,
    ),
    Confirmed(Answer<()>, Result<(), JournalError>),
    Expired(Answer<Removed>, Result<Removed, JournalError>),
}

impl Reply {
    /// Turns a success into `error` (the commit it depended on failed).
    fn fail(&mut self, error: &JournalError) {
        match self {
            Reply::Appended(_, result @ Ok(_)) => *result = Err(error.clone()),
            Reply::AppendedMany(_, result @ Ok(_)) => *result = Err(error.clone()),
            Reply::Confirmed(_, result @ Ok(_)) => *result = Err(error.clone()),
            Reply::Expired(_, result @ Ok(_)) => *result = Err(error.clone()),
            _ => {}
        }
    }

    fn send(self) {
        // A waiter that gave up (dropped its future) no longer needs the answer.
        match self {
            Reply::Appended(done, result) => drop(done.send(result)),
            Reply::AppendedMany(done, result) => drop(done.send(result)),
            Reply::Confirmed(done, result) => drop(done.send(result)),
            Reply::Expired(done, result) => drop(done.send(result)),
        }
    }
}

/// What one group did, applied to the counters and logged once it committed.
struct Tally {
    appended: u64,
    confirmed: u64,
    dropped: Vec<u64>,
    expired: Vec<u64>,
    dirty: Vec<bool>,
    /// Damaged rows removed, to count, log and forget once committed.
    damaged: Vec<DamagedRow>,
}

impl Tally {
    fn new(classes: usize) -> Tally {
        Tally {
            appended: 0,
            confirmed: 0,
            dropped: vec![0; classes],
            expired: vec![0; classes],
            dirty: vec![false; classes],
            damaged: Vec::new(),
        }
    }
}

type Batches<'txn> = Table<'txn, (&'static str, u64), &'static [u8]>;

pub(super) struct Writer {
    path: PathBuf,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    limits: Vec<ClassLimits>,
    ledgers: Vec<ClassLedger>,
    /// Per class: messages accepted in the current group, not yet in a row.
    /// Their sequences end at `next_seq - 1`.
    pending: Vec<Pending>,
    space: SpaceGuard,
    /// False between closing a failed database and opening it again.
    db_open: bool,
    last_reopen: Option<Instant>,
    reopen_failures: DropLog,
    reopen_failed: u64,
    space_read_failures: DropLog,
    space_read_failed: u64,
    /// What was last published, so that only changes are logged.
    published_refusal: Option<Refusal>,
    last_error: Option<String>,
}

/// A class's messages accepted in the current group and not yet written
/// as rows, and the batch buffers holding their bytes.
#[derive(Default)]
struct Pending {
    buffers: Vec<Bytes>,
    messages: Vec<EncodedMessage>,
}

impl Pending {
    fn clear(&mut self) {
        self.buffers.clear();
        self.messages.clear();
    }
}

impl Writer {
    pub(super) fn new(
        path: PathBuf,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        limits: Vec<ClassLimits>,
        ledgers: Vec<ClassLedger>,
        reserve_bytes: u64,
    ) -> Writer {
        let pending = limits.iter().map(|_| Pending::default()).collect();
        let mut writer = Writer {
            path,
            shared,
            commands,
            limits,
            ledgers,
            pending,
            space: SpaceGuard::new(reserve_bytes),
            db_open: true,
            last_reopen: None,
            reopen_failures: DropLog::default(),
            reopen_failed: 0,
            space_read_failures: DropLog::default(),
            space_read_failed: 0,
            published_refusal: None,
            last_error: None,
        };
        writer.check_space(Instant::now());
        writer.publish_health();
        writer
    }

    /// Runs until every handle is gone.
    pub(super) fn run(mut self) {
        let mut group = Vec::new();
        while let Some(first) = self.commands.blocking_recv() {
            group.push(first);
            while group.len() < CHANNEL_CAPACITY {
                match self.commands.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            self.process(&mut group);
        }
    }

    fn process(&mut self, group: &mut Vec<Command>) {
        let now = Instant::now();
        self.check_space(now);
        if !self.db_open
            && self
                .last_reopen
                .is_none_or(|at| now.saturating_duration_since(at) >= REOPEN_INTERVAL)
        {
            self.reopen(now);
        }
        self.publish_health();
        let mut replies = Vec::with_capacity(group.len());
        let mut compactions = Vec::new();
        let mut maintained = Vec::new();
        let mut tally = Tally::new(self.ledgers.len());
        let before = self.ledgers.clone();
        let mut commands = group.drain(..);
        // A panic inside redb (it may panic on a damaged file) must not take
        // the writer down with every later append; it fails this group.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            self.commit_group(
                &mut commands,
                &mut replies,
                &mut compactions,
                &mut maintained,
                &mut tally,
            )
        }))
        .unwrap_or_else(|panic| {
            Err(JournalError::Storage(format!(
                "journal writer panicked: {}",
                panic_message(&panic)
            )))
        });
        match outcome {
            Ok(true) => self.committed(&tally),
            Ok(false) => {}
            Err(error) => {
                if matches!(error, JournalError::Unavailable(_)) && !self.db_open {
                    // Already logged when it closed; the reopen is retried.
                } else if error.is_capacity() {
                    warn!(%error, commands = replies.len(), "journal commit failed for want of space; the group is answered with the error (retryable)");
                } else {
                    error!(%error, commands = replies.len(), "journal commit failed; the group is answered with the error");
                }
                self.ledgers = before;
                for pending in &mut self.pending {
                    pending.clear();
                }
                // An I/O error with the disk all but full is the disk being
                // full too, however it surfaced: reopening would only run
                // into the same wall, flipping readiness back and forth.
                let free = self.data_dir_free().ok();
                let out_of_space = matches!(error, JournalError::NoSpace(_))
                    || (error.needs_reopen() && free.is_some_and(|free| free < RESUME_MARGIN_MIN));
                if out_of_space {
                    self.space.disk_full(free, Instant::now());
                }
                if error.needs_reopen() && self.db_open {
                    self.last_error = Some(error.to_string());
                    // redb fails every later call once an I/O error hit it:
                    // close it and open it again (the last commit is intact).
                    self.reopen(Instant::now());
                }
                for command in commands {
                    match command {
                        Command::Compact { done } => compactions.push(done),
                        Command::Maintain { done } => maintained.push(done),
                        Command::Append { done, .. } => {
                            replies.push(Reply::Appended(done, Err(error.clone())))
                        }
                        Command::AppendMany { done, .. } => {
                            replies.push(Reply::AppendedMany(done, Err(error.clone())))
                        }
                        Command::Confirm { done, .. } => {
                            replies.push(Reply::Confirmed(done, Err(error.clone())))
                        }
                        Command::Expire { done, .. } => {
                            replies.push(Reply::Expired(done, Err(error.clone())))
                        }
                    }
                }
                for reply in &mut replies {
                    reply.fail(&error);
                }
            }
        }
        for reply in replies {
            reply.send();
        }
        self.publish_health();
        let health = self.shared.health.load();
        for done in maintained {
            drop(done.send(Ok(health.clone())));
        }
        if !compactions.is_empty() {
            let result = self.compact_if_empty();
            for done in compactions {
                drop(done.send(result.clone()));
            }
        }
    }

    /// Applies the commands in one transaction and commits it if anything
    /// changed. `Err` means the whole group failed.
    fn commit_group(
        &mut self,
        commands: &mut impl Iterator<Item = Command>,
        replies: &mut Vec<Reply>,
        compactions: &mut Vec<Answer<bool>>,
        maintained: &mut Vec<Answer<JournalHealth>>,
        tally: &mut Tally,
    ) -> Result<bool, JournalError> {
        let shared = Arc::clone(&self.shared);
        let db = shared.db.read().map_err(|_| poisoned())?;
        let db = db.as_ref().ok_or_else(|| {
            JournalError::Unavailable(
                "an I/O error closed the database; it is being reopened".into(),
            )
        })?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(QUICK_REPAIR);
        {
            let mut batches = txn.open_table(BATCHES)?;
            for command in commands.by_ref() {
                match command {
                    Command::Compact { done } => compactions.push(done),
                    Command::Maintain { done } => {
                        maintained.push(done);
                        for class in 0..self.ledgers.len() {
                            // A damaged row at the head goes now; nothing
                            // else would remove it while no confirm comes.
                            self.confirm(&shared, &mut batches, class, 0, tally)?
                                .map_err(|error| {
                                    warn!(%error, "journal: dropping a damaged head row failed");
                                })
                                .ok();
                        }
                    }
                    Command::Append {
                        class,
                        message,
                        done,
                    } => {
                        let outcome = match self.queue_buffer(class, message) {
                            Some(message) => {
                                self.append(&shared, &mut batches, class, message, tally)
                            }
                            None => Ok(Err(JournalError::Storage(
                                "an append without a message".into(),
                            ))),
                        };
                        settle(replies, |result| Reply::Appended(done, result), outcome)?;
                    }
                    Command::AppendMany {
                        class,
                        messages,
                        done,
                    } => {
                        let mut results = Vec::with_capacity(messages.messages.len());
                        let mut fatal = None;
                        let buffer = self.queue_buffer_index(class, messages.buffer);
                        for mut message in messages.messages {
                            message.buffer = buffer;
                            match self.append(&shared, &mut batches, class, message, tally) {
                                Ok(result) => results.push(result),
                                Err(error) => {
                                    fatal = Some(error);
                                    break;
                                }
                            }
                        }
                        let outcome = match fatal {
                            Some(error) => Err(error),
                            None => Ok(Ok(results)),
                        };
                        settle(replies, |result| Reply::AppendedMany(done, result), outcome)?;
                    }
                    Command::Confirm {
                        class,
                        through_seq,
                        done,
                    } => {
                        let outcome =
                            self.confirm(&shared, &mut batches, class, through_seq, tally);
                        settle(replies, |result| Reply::Confirmed(done, result), outcome)?;
                    }
                    Command::Expire {
                        class,
                        cutoff_ms,
                        done,
                    } => {
                        let outcome = self.expire(&shared, &mut batches, class, cutoff_ms, tally);
                        settle(replies, |result| Reply::Expired(done, result), outcome)?;
                    }
                }
            }
            self.write_rows(&shared, &mut batches)?;
            let mut meta = txn.open_table(META)?;
            for (class, dirty) in tally.dirty.iter().enumerate() {
                if *dirty {
                    store::write_ledger(
                        &mut meta,
                        &shared.classes[class].name,
                        &self.ledgers[class],
                    )?;
                }
            }
        }
        if !tally.dirty.contains(&true) {
            // Nothing to make durable (e.g. only rejected appends or no-op confirms).
            txn.abort()?;
            return Ok(false);
        }
        txn.commit()?;
        Ok(true)
    }

    /// Keeps `buffer` beside the class's other pending buffers until the
    /// group's rows are written; returns its index (0 for an unknown class,
    /// whose appends fail anyway).
    fn queue_buffer_index(&mut self, class: usize, buffer: Bytes) -> usize {
        match self.pending.get_mut(class) {
            Some(pending) => {
                pending.buffers.push(buffer);
                pending.buffers.len() - 1
            }
            None => 0,
        }
    }

    /// [`Writer::queue_buffer_index`] for a batch of one; its message.
    fn queue_buffer(&mut self, class: usize, batch: EncodedBatch) -> Option<EncodedMessage> {
        let buffer = self.queue_buffer_index(class, batch.buffer);
        let mut message = batch.messages.into_iter().next()?;
        message.buffer = buffer;
        Some(message)
    }

    fn append(
        &mut self,
        shared: &Shared,
        batches: &mut Batches<'_>,
        class: usize,
        message: EncodedMessage,
        tally: &mut Tally,
    ) -> Result<Result<Appended, JournalError>, JournalError> {
        let (Some(limits), Some(ledger)) = (self.limits.get(class), self.ledgers.get_mut(class))
        else {
            return Ok(Err(JournalError::UnknownClass(class)));
        };
        let name = &shared.classes[class].name;
        if let Some(refusal) = self.space.refusal() {
            StatCells::add(&shared.stats.rejected_full, 1);
            return Ok(Err(self.refusal_error(refusal)));
        }
        let dropped_oldest = match ledger.admit(message.size, limits) {
            Admission::Fits => 0,
            Admission::Full => {
                StatCells::add(&shared.stats.rejected_full, 1);
                return Ok(Err(JournalError::Full {
                    class: name.clone(),
                    max_bytes: limits.max_bytes,
                }));
            }
            Admission::MakeRoom { free } => {
                let pending = &mut self.pending[class].messages;
                let removal = plan(shared, batches, name, ledger, pending, Cut::FreeBytes(free))?;
                apply(batches, name, &removal, ledger, pending)?;
                let dropped = removal.messages - removal.damaged_messages;
                tally.dropped[class] += dropped;
                tally.damaged.extend(removal.damaged);
                dropped
            }
        };
        let seq = ledger.accept(message.size, message.accepted_at_ms);
        self.pending[class].messages.push(message);
        tally.dirty[class] = true;
        tally.appended += 1;
        Ok(Ok(Appended {
            seq,
            dropped_oldest,
        }))
    }

    fn confirm(
        &mut self,
        shared: &Shared,
        batches: &mut Batches<'_>,
        class: usize,
        through_seq: u64,
        tally: &mut Tally,
    ) -> Result<Result<(), JournalError>, JournalError> {
        let Some(ledger) = self.ledgers.get_mut(class) else {
            return Ok(Err(JournalError::UnknownClass(class)));
        };
        let name = &shared.classes[class].name;
        // With a damaged row known, a confirm at or below the floor still
        // drops it if it is at the head.
        let damaged_known = shared.has_damaged(name);
        if ledger.messages == 0 || (through_seq <= ledger.confirmed && !damaged_known) {
            return Ok(Ok(()));
        }
        let pending = &mut self.pending[class].messages;
        let removal = plan(
            shared,
            batches,
            name,
            ledger,
            pending,
            Cut::Through(through_seq),
        )?;
        if removal.messages == 0 && removal.rows_to_delete.is_empty() {
            return Ok(Ok(()));
        }
        apply(batches, name, &removal, ledger, pending)?;
        tally.confirmed += removal.messages - removal.damaged_messages;
        tally.damaged.extend(removal.damaged);
        tally.dirty[class] = true;
        Ok(Ok(()))
    }

    fn expire(
        &mut self,
        shared: &Shared,
        batches: &mut Batches<'_>,
        class: usize,
        cutoff_ms: u64,
        tally: &mut Tally,
    ) -> Result<Result<Removed, JournalError>, JournalError> {
        let Some(ledger) = self.ledgers.get_mut(class) else {
            return Ok(Err(JournalError::UnknownClass(class)));
        };
        // The head is the only candidate: expiry stops at the first younger message.
        if ledger
            .oldest_accepted_ms
            .is_none_or(|oldest| oldest >= cutoff_ms)
        {
            return Ok(Ok(Removed::default()));
        }
        let name = &shared.classes[class].name;
        let pending = &mut self.pending[class].messages;
        let removal = plan(
            shared,
            batches,
            name,
            ledger,
            pending,
            Cut::AcceptedBefore(cutoff_ms),
        )?;
        apply(batches, name, &removal, ledger, pending)?;
        let expired = removal.messages - removal.damaged_messages;
        tally.expired[class] += expired;
        tally.damaged.extend(removal.damaged);
        tally.dirty[class] = true;
        Ok(Ok(Removed {
            messages: expired,
            bytes: removal.bytes,
        }))
    }

    /// Turns each class's pending messages into rows.
    fn write_rows(
        &mut self,
        shared: &Shared,
        batches: &mut Batches<'_>,
    ) -> Result<(), StorageError> {
        for (class, pending) in self.pending.iter_mut().enumerate() {
            let Pending { buffers, messages } = pending;
            if messages.is_empty() {
                buffers.clear();
                continue;
            }
            let name = shared.classes[class].name.as_str();
            let first_seq = self.ledgers[class].next_seq - messages.len() as u64;
            let mut row_first = first_seq;
            let mut row = RowBuilder::new();
            for (seq, message) in (first_seq..).zip(messages.drain(..)) {
                if row.would_overflow(&message) {
                    let full = std::mem::replace(&mut row, RowBuilder::new()).finish();
                    batches.insert((name, row_first), full.as_slice())?;
                    row_first = seq;
                }
                let bytes = buffers
                    .get(message.buffer)
                    .and_then(|buffer| buffer.get(message.range.clone()))
                    // Cannot happen: every queued message's buffer stays
                    // until this loop. If it did, the group fails whole.
                    .ok_or_else(|| {
                        StorageError::Corrupted("a queued message's bytes are missing".into())
                    })?;
                row.push(&message, bytes);
            }
            buffers.clear();
            batches.insert((name, row_first), row.finish().as_slice())?;
        }
        Ok(())
    }

    /// After a durable commit: publishes backlogs and counters, logs drops.
    fn committed(&self, tally: &Tally) {
        let stats = &self.shared.stats;
        for row in &tally.damaged {
            // Counted here if no read found it first; gone from the file now.
            self.shared.report_corrupt(row, "reached by the head");
            self.shared.forget_damaged(&row.class, row.first_seq);
        }
        StatCells::add(&stats.commits, 1);
        StatCells::add(&stats.appended, tally.appended);
        StatCells::add(&stats.confirmed, tally.confirmed);
        for (class, shared) in self.shared.classes.iter().enumerate() {
            if !tally.dirty[class] {
                continue;
            }
            shared.publish(&self.ledgers[class]);
            let dropped = tally.dropped[class];
            if dropped > 0 {
                StatCells::add(&stats.dropped_oldest, dropped);
                warn!(class = %shared.name, count = dropped, reason = "drop_oldest", "journal class over its byte budget: dropped its oldest messages");
            }
            let expired = tally.expired[class];
            if expired > 0 {
                StatCells::add(&stats.expired, expired);
                warn!(class = %shared.name, count = expired, reason = "max_age", "journal messages expired undelivered");
            }
        }
    }

    /// The error an append gets while new messages are refused.
    fn refusal_error(&self, refusal: Refusal) -> JournalError {
        let free = self
            .space
            .free()
            .map_or("unknown".to_string(), |free| free.to_string());
        match refusal {
            Refusal::LowSpace => JournalError::NoSpace(format!(
                "{free} bytes free on the journal's filesystem, under its reserve of {} (relay.journal_reserve_bytes)",
                self.space.reserve()
            )),
            Refusal::DiskFull => JournalError::NoSpace(format!(
                "a commit found the disk full; taking messages again once space is freed ({free} bytes free now)"
            )),
            Refusal::StorageError => JournalError::Unavailable(
                self.last_error
                    .clone()
                    .unwrap_or_else(|| "the database is being reopened".into()),
            ),
        }
    }

    /// Free bytes of the data directory's filesystem.
    fn data_dir_free(&self) -> std::io::Result<u64> {
        let dir = self
            .path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        health::free_bytes(dir)
    }

    /// Reads the filesystem's free space when a reading is due.
    fn check_space(&mut self, now: Instant) {
        if !self.space.check_due(now) {
            return;
        }
        match self.data_dir_free() {
            Ok(free) => self.space.observe(free, now),
            Err(error) => {
                // The last reading stands.
                self.space_read_failed += 1;
                if let Some(failed) = self.space_read_failures.due(self.space_read_failed, now) {
                    warn!(%error, failed, "journal: cannot read the free space of the data directory");
                }
                self.space.observe_failed(now);
            }
        }
    }

    /// Closes the database (redb fails every call after an I/O error) and
    /// opens it again; on failure it stays closed until the next try.
    fn reopen(&mut self, now: Instant) {
        self.last_reopen = Some(now);
        // A handle of its own, so the lock can be held while health is
        // published below.
        let shared = self.shared.clone();
        let Ok(mut db) = shared.db.write() else {
            return;
        };
        if self.db_open {
            warn!(error = self.last_error.as_deref().unwrap_or("unknown"), "journal: an I/O error failed the database; closing and reopening it (new messages are refused until it is open)");
        }
        // Closed first: the file's lock must be free for the new handle.
        drop(db.take());
        self.db_open = false;
        // Said before the reopen, which checks the whole file and may take
        // a while: until it is open, /readyz and the status say why new
        // messages are refused.
        self.publish_health();
        let names: Vec<String> = self.shared.classes.iter().map(|c| c.name.clone()).collect();
        match recovery::reopen(&self.path, &names) {
            Ok(opened) => {
                *db = Some(opened.db);
                drop(db);
                self.db_open = true;
                // What is on disk is the truth: a commit that failed may or
                // may not have reached it.
                self.ledgers = opened.ledgers;
                for pending in &mut self.pending {
                    pending.clear();
                }
                for (class, shared) in self.shared.classes.iter().enumerate() {
                    shared.publish(&self.ledgers[class]);
                }
                for row in &opened.damaged {
                    self.shared.report_corrupt(row, "found at reopen");
                }
                self.shared.health.count_reopen();
                self.reopen_failed = 0;
                let messages: u64 = self.ledgers.iter().map(|ledger| ledger.messages).sum();
                info!(messages, "journal reopened; its backlog is intact");
            }
            Err(error) => {
                self.reopen_failed += 1;
                self.last_error = Some(error.to_string());
                if let Some(failed) = self.reopen_failures.due(self.reopen_failed, now) {
                    warn!(%error, failed, "journal: reopening failed; retrying");
                }
            }
        }
    }

    /// Publishes whether new messages are taken, logging a change.
    fn publish_health(&mut self) {
        let refusing = if self.db_open {
            self.space.refusal()
        } else {
            Some(Refusal::StorageError)
        };
        self.shared.health.store(refusing, self.space.free());
        if refusing == self.published_refusal {
            return;
        }
        let free = self.space.free();
        match refusing {
            Some(refusal) => {
                warn!(reason = refusal.name(), free_bytes = free, reserve_bytes = self.space.reserve(), "journal refuses new messages (journal_full) until this clears; /readyz reports not ready");
                self.shared.health.set_last_error(self.last_error.clone());
            }
            None => {
                info!(free_bytes = free, "journal takes new messages again");
                self.last_error = None;
                self.shared.health.set_last_error(None);
            }
        }
        self.published_refusal = refusing;
    }

    fn compact_if_empty(&self) -> Result<bool, JournalError> {
        if self.ledgers.iter().any(|ledger| ledger.messages > 0) {
            return Ok(false);
        }
        // Exclusive: no read transaction may run on the file being replaced
        // (and compaction refuses to run beside one).
        let mut db = self.shared.db.write().map_err(|_| poisoned())?;
        let Some(db) = db.as_mut() else {
            return Ok(false);
        };
        let reclaimed = reclaim::reclaim(&self.path, db)?;
        if reclaimed {
            StatCells::add(&self.shared.stats.compactions, 1);
        }
        Ok(reclaimed)
    }
}

/// Plans a head removal (an error is redb's and fails the group).
fn plan(
    shared: &Shared,
    batches: &Batches<'_>,
    name: &str,
    ledger: &ClassLedger,
    pending: &[EncodedMessage],
    cut: Cut,
) -> Result<HeadRemoval, JournalError> {
    let pending_first = ledger.next_seq - pending.len() as u64;
    let any_damaged = shared.has_damaged(name);
    let known_damaged = |first_seq| any_damaged && shared.is_damaged(name, first_seq);
    Ok(trim::plan(
        batches,
        name,
        ledger.confirmed,
        pending,
        pending_first,
        cut,
        &known_damaged,
    )?)
}

fn apply(
    batches: &mut Batches<'_>,
    name: &str,
    removal: &HeadRemoval,
    ledger: &mut ClassLedger,
    pending: &mut Vec<EncodedMessage>,
) -> Result<(), StorageError> {
    for &first_seq in &removal.rows_to_delete {
        batches.remove((name, first_seq))?;
    }
    pending.drain(..removal.pending_taken);
    ledger.remove_head(
        removal.through_seq,
        removal.messages,
        removal.bytes,
        removal.oldest_left,
    );
    Ok(())
}

/// Queues a command's answer; a group-level failure is also its answer.
fn settle<T>(
    replies: &mut Vec<Reply>,
    reply: impl FnOnce(Result<T, JournalError>) -> Reply,
    outcome: Result<Result<T, JournalError>, JournalError>,
) -> Result<(), JournalError> {
    match outcome {
        Ok(result) => {
            replies.push(reply(result));
            Ok(())
        }
        Err(fatal) => {
            replies.push(reply(Err(fatal.clone())));
            Err(fatal)
        }
    }
}

fn poisoned() -> JournalError {
    JournalError::Storage("journal database lock poisoned by a panic".into())
}
