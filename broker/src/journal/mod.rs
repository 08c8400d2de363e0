//! The durable outage journal: messages the relay accepted while NATS was
//! unreachable, kept in redb per class in FIFO order until NATS confirms
//! them, expiry removes them, or a full class drops its oldest.
//!
//! One writer thread owns every write and commits in groups (`writer`); each
//! group stores the messages of one class as one row (`record`) keyed by
//! (class name, first sequence) (`store`); removals take a prefix of a class
//! (`trim`) following the counters in `ledger`; reads run on blocking tasks
//! beside the writer. `recovery` opens and validates the file, quarantining
//! a damaged one; `reclaim` gives the space of a drained journal back;
//! `inspect` reads a stopped relay's file and `salvage` exports what can
//! still be read of a set-aside one; `health` decides whether new messages
//! are taken (free space, a disk-full commit, a database an I/O error
//! closed, which the writer reopens); `state` holds what the handle,
//! readers and writer share.
//!
//! Damage: a row whose checksum fails costs that row only. Its messages are
//! skipped wherever it is found (a read, a trim, the edge rows checked at
//! open), it is counted and logged once, and it leaves the file once every
//! message before it is gone. Only a file redb itself cannot open is moved
//! aside.
//!
//! Counting: a class's `messages`/`bytes` are its live messages, those with a
//! sequence above the class's removal floor. A partly confirmed row stays on
//! disk until its last message goes; its dead prefix is not counted against
//! the budget (it is at most one row, under 128 KiB, per class). On disk a
//! journal took up to about twice its budget bytes in tests: row framing,
//! redb rounding large leaves up to a power of two, and free pages redb
//! keeps for reuse.

// The replay/forwarding pipeline is the user of this API.

mod health;
mod inspect;
mod ledger;
mod reclaim;
mod record;
mod recovery;
mod salvage;
mod state;
mod store;
mod trim;
mod writer;

#[cfg(test)]
mod tests;

pub use health::{JournalHealth, Refusal};
pub use holdfast_wire::{Headers, Text};
pub use inspect::inspect;
pub use salvage::{salvage, SalvageReport, SalvagedMessage};

use bytes::Bytes;
use holdfast_wire::ShortText;
use record::EncodedBatch;
use state::Shared;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;
use writer::{Command, Writer, CHANNEL_CAPACITY};

/// What a class does when an append would exceed its byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// The append fails with [`JournalError::Full`]; nothing accepted is dropped.
    Reject,
    /// The oldest messages of the class are removed to make room (counted, logged).
    DropOldest,
}

/// The journal's view of one message class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassLimits {
    /// Identifies the class in the file; renaming a class orphans its backlog.
    pub name: String,
    /// Budget in bytes of subject + reply + headers + payload of live
    /// messages (`u64::MAX`: unlimited). The file is larger than this: row
    /// framing, redb pages and free space (see the module docs).
    pub max_bytes: u64,
    pub when_full: WhenFull,
}

#[derive(Debug, Clone)]
pub struct JournalSettings {
    /// The redb file, e.g. `<data-dir>/journal.redb`.
    pub path: PathBuf,
    /// Index in this Vec = class id used by the other calls.
    pub classes: Vec<ClassLimits>,
    /// New messages are refused while the filesystem holding `path` has
    /// less free space than this (0: only when a commit finds it full).
    pub reserve_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub subject: Text,
    pub reply: Option<Text>,
    pub headers: Headers,
    pub payload: Bytes,
    /// Unix milliseconds; retention and `oldest_accepted_ms` use it.
    pub accepted_at_ms: u64,
    /// Headers the relay stamps as the message is journaled, stored after
    /// `headers`.
    pub stamp: Option<JournalStamp>,
}

/// The NATS header JetStream deduplicates by; the relay stamps it on every
/// journaled message (and every message of a JetStream class).
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// The `Nats-Msg-Id` the relay stamps: `relay.class.counter`, unique per
/// relay process.
pub fn format_message_id(relay_id: &str, class: &str, counter: u64) -> ShortText {
    let mut id = ShortText::new();
    id.push_str(relay_id)
        .push_str(".")
        .push_str(class)
        .push_str(".")
        .push_decimal(counter);
    id
}

/// The headers the relay stamps on a journaled message (the sequence chain
/// and `Nats-Msg-Id`), kept as numbers until they are encoded: formatted
/// straight into the stored record, they cost no allocation per message.
#[derive(Debug, Clone)]
pub struct JournalStamp {
    pub relay_id: Text,
    pub chain: holdfast_wire::chain::ChainPosition,
    /// `Nats-Msg-Id` as `relay.class.counter`; `None` when the message
    /// carries its id already.
    pub message_id: Option<(Text, u64)>,
}

#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub seq: u64,
    pub accepted_at_ms: u64,
    pub subject: Text,
    /// The relay never journals request traffic, so its forwarder ignores
    /// this; the store keeps whatever it was given all the same.
    #[allow(dead_code)]
    pub reply: Option<Text>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// What one read of a class found: the messages, and the rows it skipped
/// because they are damaged (their sequences never come).
#[derive(Clone, Debug, Default)]
pub struct ReadBatch {
    pub messages: Vec<StoredMessage>,
    /// (first, last) sequence of each damaged row skipped, in order.
    pub skipped: Vec<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassBacklog {
    pub messages: u64,
    pub bytes: u64,
    /// Accepted time of the first (lowest sequence) live message.
    pub oldest_accepted_ms: Option<u64>,
    /// Sequence of the first live message; 0 when empty.
    pub first_seq: u64,
    /// Highest sequence ever assigned in this class (0: none yet).
    pub last_seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// Messages removed to make room under [`WhenFull::DropOldest`].
    pub dropped_oldest: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug)]
pub struct OpenReport {
    /// Where a damaged journal file was moved to (a fresh one was created).
    pub quarantined: Option<PathBuf>,
    /// Why it was quarantined.
    pub reason: Option<String>,
    /// Backlog per configured class, by class id.
    pub classes: Vec<ClassBacklog>,
}

/// Totals since the journal was opened (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Durable commits (group commits that changed something, not compactions).
    pub commits: u64,
    pub appended: u64,
    /// Appends refused with [`JournalError::Full`].
    pub rejected_full: u64,
    pub dropped_oldest: u64,
    pub expired: u64,
    pub confirmed: u64,
    pub compactions: u64,
    /// Damaged rows found (each counted once) and the messages they held.
    pub corrupt_rows: u64,
    pub corrupt_messages: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    #[error("journal class {class} is full ({max_bytes} bytes)")]
    Full { class: String, max_bytes: u64 },
    /// The disk holding the journal is full, or has less free space than
    /// the reserve: retry once space is freed.
    #[error("journal disk is full: {0}")]
    NoSpace(String),
    /// An I/O error closed the database; the writer reopens it.
    #[error("journal is reopening after an I/O error: {0}")]
    Unavailable(String),
    /// An I/O error failed a commit (the database must be reopened).
    #[error("journal I/O error: {0}")]
    Io(String),
    #[error("journal is closed")]
    Closed,
    #[error("journal storage: {0}")]
    Storage(String),
    #[error("journal {} is in use by another process", .0.display())]
    InUse(PathBuf),
    #[error("no journal class with id {0}")]
    UnknownClass(usize),
}

impl JournalError {
    /// Whether the journal cannot take this message now but may later
    /// (a full budget or disk, a database being reopened): retryable.
    pub fn is_capacity(&self) -> bool {
        matches!(
            self,
            JournalError::Full { .. } | JournalError::NoSpace(_) | JournalError::Unavailable(_)
        )
    }

    /// Whether redb latched the failure: the database must be closed and
    /// opened again before it commits anything.
    fn needs_reopen(&self) -> bool {
        matches!(
            self,
            JournalError::NoSpace(_) | JournalError::Unavailable(_) | JournalError::Io(_)
        )
    }
}

/// Whether an I/O error means the filesystem is out of space (or quota).
fn is_no_space(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
        || matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl From<redb::StorageError> for JournalError {
    fn from(error: redb::StorageError) -> Self {
        match &error {
            redb::StorageError::Io(io) if is_no_space(io) => {
                JournalError::NoSpace(error.to_string())
            }
            redb::StorageError::Io(_) => JournalError::Io(error.to_string()),
            redb::StorageError::PreviousIo | redb::StorageError::DatabaseClosed => {
                JournalError::Unavailable(error.to_string())
            }
            _ => JournalError::Storage(error.to_string()),
        }
    }
}

impl From<redb::Error> for JournalError {
    fn from(error: redb::Error) -> Self {
        match error {
            redb::Error::Io(io) => redb::StorageError::Io(io).into(),
            redb::Error::PreviousIo => redb::StorageError::PreviousIo.into(),
            redb::Error::DatabaseClosed => redb::StorageError::DatabaseClosed.into(),
            other => JournalError::Storage(other.to_string()),
        }
    }
}

/// The redb errors that wrap a [`redb::StorageError`]: classified by it.
macro_rules! storage_error_from {
    ($($error:ident),*) => {$(
        impl From<redb::$error> for JournalError {
            fn from(error: redb::$error) -> Self {
                match error {
                    redb::$error::Storage(storage) => storage.into(),
                    other => JournalError::Storage(other.to_string()),
                }
            }
        }
    )*};
}

storage_error_from!(TransactionError, TableError, CommitError, CompactionError);

impl From<redb::SetDurabilityError> for JournalError {
    fn from(error: redb::SetDurabilityError) -> Self {
        JournalError::Storage(error.to_string())
    }
}

/// A queued append; resolves once the commit holding it is durable.
#[must_use = "the append is only known durable once this resolves"]
#[derive(Debug)]
pub struct PendingAppend {
    answer: oneshot::Receiver<Result<Appended, JournalError>>,
}

impl Future for PendingAppend {
    type Output = Result<Appended, JournalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(JournalError::Closed)))
    }
}

/// The commit of a [`Journal::submit_many`] group.
#[derive(Debug)]
pub struct PendingAppends {
    answer: oneshot::Receiver<Result<Vec<Result<Appended, JournalError>>, JournalError>>,
}

impl Future for PendingAppends {
    type Output = Result<Vec<Result<Appended, JournalError>>, JournalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(JournalError::Closed)))
    }
}

/// Handle to the journal; clones share one writer. Dropping the last clone
/// stops the writer (after its current commit) and closes the file.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` only while dropping: closing it is what stops the writer.
    commands: Option<mpsc::Sender<Command>>,
    writer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.commands.take());
        // Joined so that the file is closed (and its lock released) when the
        // last handle is gone: a reopen right after must not find it in use.
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                warn!(path = %self.path.display(), "journal writer thread panicked");
            }
        }
    }
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens or creates the file. A file that redb cannot open or whose
    /// contents fail validation (a batch that does not decode, meta counters
    /// that disagree with the rows) is renamed to
    /// `<file>.quarantined-<unix-seconds>`, logged, reported in
    /// [`OpenReport`], and a fresh journal is created. Creates the parent dir.
    pub fn open(settings: JournalSettings) -> Result<(Journal, OpenReport), JournalError> {
        let names: Vec<String> = settings.classes.iter().map(|c| c.name.clone()).collect();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(JournalError::Storage(format!(
                    "journal class {name:?} is configured twice"
                )));
            }
        }
        let opened = recovery::open(&settings.path, &names)?;
        let shared = Arc::new(Shared::new(
            opened.db,
            names,
            &opened.ledgers,
            settings.reserve_bytes,
        ));
        for damaged in &opened.damaged {
            shared.report_corrupt(damaged, "found at open");
        }
        let (commands, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let writer = Writer::new(
            settings.path.clone(),
            Arc::clone(&shared),
            receiver,
            settings.classes,
            opened.ledgers,
            settings.reserve_bytes,
        );
        let writer = std::thread::Builder::new()
            .name("holdfast-journal".into())
            .spawn(move || writer.run())
            .map_err(|error| {
                JournalError::Storage(format!("cannot start the journal writer: {error}"))
            })?;
        let report = OpenReport {
            quarantined: opened.quarantined,
            reason: opened.reason,
            classes: (0..shared.classes.len())
                .map(|class| shared.backlog(class))
                .collect(),
        };
        let inner = Inner {
            path: settings.path,
            commands: Some(commands),
            writer: Some(writer),
            shared,
        };
        Ok((
            Journal {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// Appends one message to `class`; resolves once the commit holding it
    /// is durable (fsync). Waits for room when the writer's queue is full.
    ///
    /// Sequence order is the order appends reach the writer's queue; futures
    /// polled concurrently (e.g. `join_all`) may reach it in any order. A
    /// caller that needs its own order and many appends in flight uses
    /// [`Journal::submit`].
    #[cfg(test)]
    pub async fn append(
        &self,
        class: usize,
        message: NewMessage,
    ) -> Result<Appended, JournalError> {
        self.submit(class, message).await?.await
    }

    /// Like [`Journal::submit`] for several messages of one class, in order,
    /// with one answer: each message's own result, or the error that failed
    /// the whole group.
    pub async fn submit_many(
        &self,
        class: usize,
        messages: Vec<NewMessage>,
    ) -> Result<PendingAppends, JournalError> {
        self.check_class(class)?;
        let messages = EncodedBatch::encode_all(&messages);
        let (done, answer) = oneshot::channel();
        self.send(Command::AppendMany {
            class,
            messages,
            done,
        })
        .await?;
        Ok(PendingAppends { answer })
    }

    /// Queues an append and returns as soon as it is queued (waiting only for
    /// room), so calls made one after another get increasing sequences. The
    /// returned future resolves once the commit holding the message is durable.
    pub async fn submit(
        &self,
        class: usize,
        message: NewMessage,
    ) -> Result<PendingAppend, JournalError> {
        self.check_class(class)?;
        // Encoded here, on the caller's task, so the writer thread only copies.
        let message = EncodedBatch::encode(&message);
        let (done, answer) = oneshot::channel();
        self.send(Command::Append {
            class,
            message,
            done,
        })
        .await?;
        Ok(PendingAppend { answer })
    }

    /// Committed messages of `class` with seq > `after_seq`, in seq order, at
    /// most `max_messages`, and the damaged rows skipped on the way (counted
    /// and logged once each; they leave the file once the head reaches
    /// them). Runs on a blocking task beside the writer.
    pub async fn read_after(
        &self,
        class: usize,
        after_seq: u64,
        max_messages: usize,
    ) -> Result<ReadBatch, JournalError> {
        self.check_class(class)?;
        let shared = Arc::clone(&self.inner.shared);
        tokio::task::spawn_blocking(move || {
            let db = shared.db.read().map_err(|_| {
                JournalError::Storage("journal database lock poisoned by a panic".into())
            })?;
            let db = db.as_ref().ok_or_else(|| {
                JournalError::Unavailable("the database is closed until it reopens".into())
            })?;
            let name = &shared.classes[class].name;
            let (batch, damaged) = store::read_after(db, name, after_seq, max_messages)?;
            for row in &damaged {
                shared.report_corrupt(row, "skipped by a read");
            }
            Ok(batch)
        })
        .await
        .map_err(|error| JournalError::Storage(format!("journal read failed: {error}")))?
    }

    /// Everything of `class` with seq <= `through_seq` was confirmed by NATS
    /// and may be removed. Resolves once that is durable.
    pub async fn confirm(&self, class: usize, through_seq: u64) -> Result<(), JournalError> {
        self.check_class(class)?;
        let (done, answer) = oneshot::channel();
        self.send(Command::Confirm {
            class,
            through_seq,
            done,
        })
        .await?;
        answer.await.map_err(|_| JournalError::Closed)?
    }

    /// Removes messages of `class` accepted before `cutoff_ms` (retention
    /// sweeper), from the head up to the first younger message, so the FIFO
    /// never gets a hole. Returns what was removed (also counted and logged).
    pub async fn expire_older_than(
        &self,
        class: usize,
        cutoff_ms: u64,
    ) -> Result<Removed, JournalError> {
        self.check_class(class)?;
        let (done, answer) = oneshot::channel();
        self.send(Command::Expire {
            class,
            cutoff_ms,
            done,
        })
        .await?;
        answer.await.map_err(|_| JournalError::Closed)?
    }

    /// Cheap, lock-free snapshot of what the last commit left (all zero for
    /// an unknown class id).
    pub fn backlog(&self, class: usize) -> ClassBacklog {
        self.inner.shared.backlog(class)
    }

    /// Totals since open.
    pub fn stats(&self) -> JournalStats {
        self.inner.shared.stats.load()
    }

    /// Whether new messages are taken now, and why not (lock-free).
    pub fn refusing(&self) -> Option<Refusal> {
        self.inner.shared.health.refusing()
    }

    /// The journal's state as the writer last published it.
    pub fn health(&self) -> JournalHealth {
        self.inner.shared.health.load()
    }

    /// Lets the writer read free space again, reopen a database an I/O
    /// error closed, and drop damaged rows the head has reached. The
    /// relay calls it about once a second; resolves once done.
    pub async fn maintain(&self) -> Result<JournalHealth, JournalError> {
        let (done, answer) = oneshot::channel();
        self.send(Command::Maintain { done }).await?;
        answer.await.map_err(|_| JournalError::Closed)?
    }

    /// When every configured class is empty: reclaims file space, so the
    /// file does not grow across outages. Returns whether it did (files
    /// under 8 MiB are left alone). Writes and reads wait while it runs,
    /// which is milliseconds: the file is replaced by a fresh one holding
    /// only the counters (redb `compact()` when rows of unconfigured classes
    /// remain). See `reclaim`.
    pub async fn compact_if_empty(&self) -> Result<bool, JournalError> {
        let (done, answer) = oneshot::channel();
        self.send(Command::Compact { done }).await?;
        answer.await.map_err(|_| JournalError::Closed)?
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn check_class(&self, class: usize) -> Result<(), JournalError> {
        if class < self.inner.shared.classes.len() {
            Ok(())
        } else {
            Err(JournalError::UnknownClass(class))
        }
    }

    async fn send(&self, command: Command) -> Result<(), JournalError> {
        let commands = self.inner.commands.as_ref().ok_or(JournalError::Closed)?;
        commands
            .send(command)
            .await
            .map_err(|_| JournalError::Closed)
    }
}
