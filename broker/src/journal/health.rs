//! Whether the journal takes new messages now, and why not: the free space
//! of the data directory's filesystem against the configured reserve, a
//! commit that found the disk full, and a database closed by an I/O error
//! that the writer has not reopened yet.
//!
//! `SpaceGuard` is the decision, sans-IO: the writer passes in free-space
//! readings and the time. `HealthCells` is what the writer publishes for
//! the forwarder, `/readyz`, `/status` and the metrics to read without
//! waiting for it.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Free space is read at most this often while commits keep coming (a
/// `statvfs` per group commit would be cheap, but there is no need).
pub(super) const SPACE_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Once refusing, new messages are taken again only when this much more
/// than the reserve is free (or an eighth of the reserve, if larger), so a
/// disk hovering at the reserve does not flip readiness with every commit.
pub(super) const RESUME_MARGIN_MIN: u64 = 1024 * 1024;
/// A database closed by an I/O error is reopened at most this often.
pub(super) const REOPEN_INTERVAL: Duration = Duration::from_millis(250);

/// Why the journal refuses new messages (each also a label value of the
/// `holdfast_journal_refusing` metric and the status's `refusing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The data directory's filesystem has less free space than the reserve.
    LowSpace,
    /// A commit failed because the disk was full; waits for free space.
    DiskFull,
    /// An I/O error closed the database; the writer is reopening it.
    StorageError,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::LowSpace, Refusal::DiskFull, Refusal::StorageError];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::LowSpace => "low_space",
            Refusal::DiskFull => "disk_full",
            Refusal::StorageError => "storage_error",
        }
    }

    fn code(self) -> u8 {
        match self {
            Refusal::LowSpace => 1,
            Refusal::DiskFull => 2,
            Refusal::StorageError => 3,
        }
    }

    fn from_code(code: u8) -> Option<Refusal> {
        Refusal::ALL
            .into_iter()
            .find(|refusal| refusal.code() == code)
    }
}

/// The free-space rule: refuse below `reserve`, and take messages again
/// once `resume_at` is free. After a disk-full commit, also refuse until
/// the margin more than was free right after it is free: the disk was full
/// at whatever it showed then, so only space freed since counts.
#[derive(Debug, Clone)]
pub(super) struct SpaceGuard {
    reserve: u64,
    free: Option<u64>,
    low: bool,
    /// Set by a disk-full commit: the free bytes that end the refusal.
    full_until: Option<u64>,
    last_check: Option<Instant>,
}

impl SpaceGuard {
    pub(super) fn new(reserve: u64) -> SpaceGuard {
        SpaceGuard {
            reserve,
            free: None,
            low: false,
            full_until: None,
            last_check: None,
        }
    }

    pub(super) fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Free bytes needed to take messages again after a refusal.
    pub(super) fn resume_at(&self) -> u64 {
        self.reserve
            .saturating_add((self.reserve / 8).max(RESUME_MARGIN_MIN))
    }

    /// Whether free space should be read again now.
    pub(super) fn check_due(&self, now: Instant) -> bool {
        self.last_check
            .is_none_or(|at| now.saturating_duration_since(at) >= SPACE_CHECK_INTERVAL)
    }

    /// A reading of the filesystem's free bytes (available to the relay).
    pub(super) fn observe(&mut self, free: u64, now: Instant) {
        self.free = Some(free);
        self.last_check = Some(now);
        if self.full_until.is_some_and(|until| free >= until) {
            self.full_until = None;
        }
        if self.low {
            self.low = free < self.resume_at();
        } else {
            self.low = free < self.reserve;
        }
    }

    /// A commit failed for want of space, with `free` bytes free right
    /// after (if that could be read): refuse until space is freed.
    pub(super) fn disk_full(&mut self, free: Option<u64>, now: Instant) {
        let since = free.or(self.free).unwrap_or(0);
        self.full_until = Some(
            self.resume_at()
                .max(since.saturating_add(RESUME_MARGIN_MIN)),
        );
        if let Some(free) = free {
            self.observe(free, now);
        }
    }

    /// A reading failed: not due again before the interval.
    pub(super) fn observe_failed(&mut self, now: Instant) {
        self.last_check = Some(now);
    }

    pub(super) fn free(&self) -> Option<u64> {
        self.free
    }

    pub(super) fn refusal(&self) -> Option<Refusal> {
        if self.full_until.is_some() {
            Some(Refusal::DiskFull)
        } else if self.low {
            Some(Refusal::LowSpace)
        } else {
            None
        }
    }
}

/// What the journal can do now, as the writer last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalHealth {
    /// `None` while new messages are taken.
    pub refusing: Option<Refusal>,
    /// Free bytes of the data directory's filesystem at the last reading.
    pub free_bytes: Option<u64>,
    pub reserve_bytes: u64,
    /// The error behind a [`Refusal::StorageError`] or [`Refusal::DiskFull`].
    pub last_error: Option<String>,
    /// Times the database was reopened after an I/O error.
    pub reopens: u64,
}

/// [`JournalHealth`] as cells the writer stores and anyone loads.
#[derive(Default)]
pub(super) struct HealthCells {
    refusing: AtomicU8,
    /// `u64::MAX`: not read yet.
    free_bytes: AtomicU64,
    reserve_bytes: AtomicU64,
    reopens: AtomicU64,
    /// Written only on a change of state, read by status: never per message.
    last_error: Mutex<Option<String>>,
}

impl HealthCells {
    pub(super) fn new(reserve: u64) -> HealthCells {
        let cells = HealthCells::default();
        cells.free_bytes.store(u64::MAX, Ordering::Relaxed);
        cells.reserve_bytes.store(reserve, Ordering::Relaxed);
        cells
    }

    /// Whether new messages are refused, without a lock (read per publish batch).
    pub(super) fn refusing(&self) -> Option<Refusal> {
        Refusal::from_code(self.refusing.load(Ordering::Acquire))
    }

    pub(super) fn store(&self, refusing: Option<Refusal>, free: Option<u64>) {
        self.free_bytes
            .store(free.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.refusing
            .store(refusing.map_or(0, Refusal::code), Ordering::Release);
    }

    pub(super) fn set_last_error(&self, error: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = error;
        }
    }

    pub(super) fn count_reopen(&self) {
        self.reopens.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn load(&self) -> JournalHealth {
        let free = self.free_bytes.load(Ordering::Relaxed);
        JournalHealth {
            refusing: self.refusing(),
            free_bytes: (free != u64::MAX).then_some(free),
            reserve_bytes: self.reserve_bytes.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|last| last.clone()),
            reopens: self.reopens.load(Ordering::Relaxed),
        }
    }
}

/// Free bytes of the filesystem holding `dir`, as an unprivileged writer
/// sees them (`f_bavail`: root's reserved blocks do not count).
pub(super) fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `stats` is written by statvfs
    // before it is read (only on success).
    let result = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn refuses_below_the_reserve_and_resumes_past_the_margin() {
        let start = Instant::now();
        let mut guard = SpaceGuard::new(64 * MIB);
        assert_eq!(guard.refusal(), None);
        guard.observe(65 * MIB, start);
        assert_eq!(guard.refusal(), None);
        guard.observe(63 * MIB, start + SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), Some(Refusal::LowSpace));
        // Back at the reserve is not enough: an eighth of it more must be free.
        guard.observe(64 * MIB, start + 2 * SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), Some(Refusal::LowSpace));
        guard.observe(72 * MIB - 1, start + 3 * SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), Some(Refusal::LowSpace));
        guard.observe(72 * MIB, start + 4 * SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), None);
    }

    #[test]
    fn a_disk_full_commit_refuses_until_space_is_freed_even_without_a_reserve() {
        let start = Instant::now();
        let mut guard = SpaceGuard::new(0);
        guard.observe(10, start);
        assert_eq!(
            guard.refusal(),
            None,
            "no reserve: nothing is refused early"
        );
        // The failed commit's pages were given back: 3 MiB show free, but
        // the disk was full at that, so only space freed after it counts.
        guard.disk_full(Some(3 * MIB), start);
        assert_eq!(guard.refusal(), Some(Refusal::DiskFull));
        guard.observe(4 * MIB - 1, start + SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), Some(Refusal::DiskFull));
        guard.observe(4 * MIB, start + 2 * SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), None);
        // Unreadable right after the failure: the last reading stands in.
        guard.disk_full(None, start + 3 * SPACE_CHECK_INTERVAL);
        guard.observe(5 * MIB - 1, start + 4 * SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), Some(Refusal::DiskFull));
        guard.observe(5 * MIB, start + 5 * SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), None);
    }

    #[test]
    fn after_a_disk_full_commit_the_reserve_still_applies() {
        let start = Instant::now();
        let mut guard = SpaceGuard::new(8 * MIB);
        guard.observe(9 * MIB, start);
        guard.disk_full(Some(0), start);
        guard.observe(9 * MIB - 1, start + SPACE_CHECK_INTERVAL);
        assert!(guard.refusal().is_some(), "under reserve + margin");
        guard.observe(9 * MIB, start + 2 * SPACE_CHECK_INTERVAL);
        assert_eq!(guard.refusal(), None);
    }

    #[test]
    fn free_space_is_read_at_most_once_per_interval() {
        let start = Instant::now();
        let mut guard = SpaceGuard::new(MIB);
        assert!(guard.check_due(start), "the first reading is always due");
        guard.observe(2 * MIB, start);
        assert!(!guard.check_due(start + SPACE_CHECK_INTERVAL / 2));
        assert!(guard.check_due(start + SPACE_CHECK_INTERVAL));
    }

    #[test]
    fn the_published_state_round_trips() {
        let cells = HealthCells::new(5);
        assert_eq!(cells.load().free_bytes, None);
        for refusal in Refusal::ALL {
            cells.store(Some(refusal), Some(7));
            assert_eq!(cells.refusing(), Some(refusal));
        }
        cells.store(None, Some(9));
        let health = cells.load();
        assert_eq!((health.refusing, health.free_bytes), (None, Some(9)));
        assert_eq!(health.reserve_bytes, 5);
    }

    #[test]
    fn free_bytes_reads_a_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
