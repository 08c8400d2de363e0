//! The journal's only writer: a thread that applies every append, confirm
//! and expiry in group commits.
//!
//! It blocks for one command, then takes everything else already queued and
//! applies all of it in ONE durable redb transaction, so the fsync cost is
//! shared by however many messages arrived while the previous commit was on
//! disk. Each class's new messages of a group become rows of up to
//! `ROW_TARGET_BYTES`. Waiters are answered only after the commit is durable.

use super::ledger::{Admission, ClassLedger};
use super::reclaim;
use super::record::{EncodedMessage, RowBuilder};
use super::state::{Shared, StatCells};
use super::store::{self, RowReadError, BATCHES, META};
use super::trim::{self, Cut, HeadRemoval};
use super::{Appended, ClassLimits, JournalError, Removed};
use redb::{Durability, StorageError, Table};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

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
        message: EncodedMessage,
        done: Answer<Appended>,
    },
    /// Several appends of one class with one answer: one channel operation
    /// and one wake-up of this thread for a whole socket read of publishes.
    AppendMany {
        class: usize,
        messages: Vec<EncodedMessage>,
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
}

impl Tally {
    fn new(classes: usize) -> Tally {
        Tally {
            appended: 0,
            confirmed: 0,
            dropped: vec![0; classes],
            expired: vec![0; classes],
            dirty: vec![false; classes],
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
    pending: Vec<Vec<EncodedMessage>>,
}

impl Writer {
    pub(super) fn new(
        path: PathBuf,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        limits: Vec<ClassLimits>,
        ledgers: Vec<ClassLedger>,
    ) -> Writer {
        let pending = limits.iter().map(|_| Vec::new()).collect();
        Writer {
            path,
            shared,
            commands,
            limits,
            ledgers,
            pending,
        }
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
        let mut replies = Vec::with_capacity(group.len());
        let mut compactions = Vec::new();
        let mut tally = Tally::new(self.ledgers.len());
        let before = self.ledgers.clone();
        let mut commands = group.drain(..);
        // A panic inside redb (it may panic on a damaged file) must not take
        // the writer down with every later append; it fails this group.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            self.commit_group(&mut commands, &mut replies, &mut compactions, &mut tally)
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
                error!(%error, commands = replies.len(), "journal commit failed; the group is answered with the error");
                self.ledgers = before;
                for pending in &mut self.pending {
                    pending.clear();
                }
                for command in commands {
                    match command {
                        Command::Compact { done } => compactions.push(done),
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
        tally: &mut Tally,
    ) -> Result<bool, JournalError> {
        let shared = Arc::clone(&self.shared);
        let db = shared.db.read().map_err(|_| poisoned())?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(QUICK_REPAIR);
        {
            let mut batches = txn.open_table(BATCHES)?;
            for command in commands.by_ref() {
                match command {
                    Command::Compact { done } => compactions.push(done),
                    Command::Append {
                        class,
                        message,
                        done,
                    } => {
                        let outcome = self.append(&shared, &mut batches, class, message, tally);
                        settle(replies, |result| Reply::Appended(done, result), outcome)?;
                    }
                    Command::AppendMany {
                        class,
                        messages,
                        done,
                    } => {
                        let mut results = Vec::with_capacity(messages.len());
                        let mut fatal = None;
                        for message in messages {
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
                let pending = &mut self.pending[class];
                let removal = match plan(batches, name, ledger, pending, Cut::FreeBytes(free))? {
                    Ok(removal) => removal,
                    Err(error) => return Ok(Err(error)),
                };
                apply(batches, name, &removal, ledger, pending)?;
                tally.dropped[class] += removal.messages;
                removal.messages
            }
        };
        let seq = ledger.accept(message.size, message.accepted_at_ms);
        self.pending[class].push(message);
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
        if ledger.messages == 0 || through_seq <= ledger.confirmed {
            return Ok(Ok(()));
        }
        let name = &shared.classes[class].name;
        let pending = &mut self.pending[class];
        let removal = match plan(batches, name, ledger, pending, Cut::Through(through_seq))? {
            Ok(removal) => removal,
            Err(error) => return Ok(Err(error)),
        };
        apply(batches, name, &removal, ledger, pending)?;
        tally.confirmed += removal.messages;
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
        let pending = &mut self.pending[class];
        let removal = match plan(
            batches,
            name,
            ledger,
            pending,
            Cut::AcceptedBefore(cutoff_ms),
        )? {
            Ok(removal) => removal,
            Err(error) => return Ok(Err(error)),
        };
        apply(batches, name, &removal, ledger, pending)?;
        tally.expired[class] += removal.messages;
        tally.dirty[class] = true;
        Ok(Ok(Removed {
            messages: removal.messages,
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
            if pending.is_empty() {
                continue;
            }
            let name = shared.classes[class].name.as_str();
            let first_seq = self.ledgers[class].next_seq - pending.len() as u64;
            let mut row_first = first_seq;
            let mut row = RowBuilder::new();
            for (seq, message) in (first_seq..).zip(pending.drain(..)) {
                if row.would_overflow(&message) {
                    let full = std::mem::replace(&mut row, RowBuilder::new()).finish();
                    batches.insert((name, row_first), full.as_slice())?;
                    row_first = seq;
                }
                row.push(&message);
            }
            batches.insert((name, row_first), row.finish().as_slice())?;
        }
        Ok(())
    }

    /// After a durable commit: publishes backlogs and counters, logs drops.
    fn committed(&self, tally: &Tally) {
        let stats = &self.shared.stats;
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

    fn compact_if_empty(&self) -> Result<bool, JournalError> {
        if self.ledgers.iter().any(|ledger| ledger.messages > 0) {
            return Ok(false);
        }
        // Exclusive: no read transaction may run on the file being replaced
        // (and compaction refuses to run beside one).
        let mut db = self.shared.db.write().map_err(|_| poisoned())?;
        let reclaimed = reclaim::reclaim(&self.path, &mut db)?;
        if reclaimed {
            StatCells::add(&self.shared.stats.compactions, 1);
        }
        Ok(reclaimed)
    }
}

/// Plans a head removal; the outer error fails the group (redb failed), the
/// inner one only the command (a damaged row).
fn plan(
    batches: &Batches<'_>,
    name: &str,
    ledger: &ClassLedger,
    pending: &[EncodedMessage],
    cut: Cut,
) -> Result<Result<HeadRemoval, JournalError>, JournalError> {
    let pending_first = ledger.next_seq - pending.len() as u64;
    match trim::plan(batches, name, ledger.confirmed, pending, pending_first, cut) {
        Ok(removal) => Ok(Ok(removal)),
        Err(RowReadError::Storage(error)) => Err(error.into()),
        Err(corrupt) => Ok(Err(corrupt.into_journal_error(name))),
    }
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

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
