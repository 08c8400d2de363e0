//! What the KV event check shows outside the forwarder: its counts (for
//! `/metrics`) and the last reset with the numbers behind it (for
//! `/status`). The forwarder writes, scrapes and status requests read; the
//! counts are atomics stored once per turn of the forwarder's loop (with
//! its other gauges), the last reset sits behind a lock taken only when a
//! reset happens or status is read.

use crate::messaging::kv_consistency::{KvCheckCounts, Reset};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The check's live numbers.
#[derive(Debug, Default)]
pub struct KvCheckView {
    pub enabled: bool,
    checked: AtomicU64,
    undecodable: AtomicU64,
    duplicates: AtomicU64,
    gap_resets: AtomicU64,
    orphan_resets: AtomicU64,
    restart_resets: AtomicU64,
    over_block_limit: AtomicU64,
    forgotten: AtomicU64,
    tracked_streams: AtomicU64,
    tracked_blocks: AtomicU64,
    last_reset: Mutex<Option<LastReset>>,
}

/// The most recent reset, as `/status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LastReset {
    pub subject: String,
    pub worker_id: u64,
    pub dp_rank: u32,
    /// "gap", "orphan" or "restart".
    pub reason: &'static str,
    /// What was seen ("expected event 4, got 6").
    pub detail: String,
    pub at_unix_ms: u64,
}

/// `kv_consistency` in the status document.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KvCheckStatus {
    pub enabled: bool,
    /// KV event messages read (Dynamo envelopes on the `kv_events` class).
    pub checked: u64,
    /// Messages of the class that were not Dynamo KV events, forwarded as
    /// they were.
    pub undecodable: u64,
    /// Events sent again (at or below their stream's last event id).
    pub duplicates: u64,
    pub resets_gap: u64,
    pub resets_orphan: u64,
    pub resets_restart: u64,
    /// (subject, worker, dp_rank) streams followed now.
    pub tracked_streams: u64,
    pub tracked_blocks: u64,
    /// Streams that outgrew `kv_consistency.max_tracked_blocks` and are
    /// checked for gaps only.
    pub over_block_limit: u64,
    /// Streams forgotten to stay within `kv_consistency.max_tracked_streams`.
    pub forgotten: u64,
    pub last_reset: Option<LastReset>,
}

impl KvCheckView {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    pub fn publish(&self, counts: &KvCheckCounts, streams: usize, blocks: usize) {
        let store = |cell: &AtomicU64, value: u64| cell.store(value, Ordering::Relaxed);
        store(&self.checked, counts.checked);
        store(&self.undecodable, counts.undecodable);
        store(&self.duplicates, counts.duplicates);
        store(&self.gap_resets, counts.gap_resets);
        store(&self.orphan_resets, counts.orphan_resets);
        store(&self.restart_resets, counts.restart_resets);
        store(&self.over_block_limit, counts.over_block_limit);
        store(&self.forgotten, counts.forgotten);
        store(&self.tracked_streams, streams as u64);
        store(&self.tracked_blocks, blocks as u64);
    }

    pub fn note_reset(&self, subject: &str, reset: &Reset, at_unix_ms: u64) {
        let last = LastReset {
            subject: subject.to_string(),
            worker_id: reset.worker_id,
            dp_rank: reset.dp_rank,
            reason: reset.reason.as_str(),
            detail: reset.detail.clone(),
            at_unix_ms,
        };
        if let Ok(mut slot) = self.last_reset.lock() {
            *slot = Some(last);
        }
    }

    pub fn status(&self) -> KvCheckStatus {
        let read = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        KvCheckStatus {
            enabled: self.enabled,
            checked: read(&self.checked),
            undecodable: read(&self.undecodable),
            duplicates: read(&self.duplicates),
            resets_gap: read(&self.gap_resets),
            resets_orphan: read(&self.orphan_resets),
            resets_restart: read(&self.restart_resets),
            tracked_streams: read(&self.tracked_streams),
            tracked_blocks: read(&self.tracked_blocks),
            over_block_limit: read(&self.over_block_limit),
            forgotten: read(&self.forgotten),
            last_reset: self.last_reset.lock().ok().and_then(|slot| slot.clone()),
        }
    }
}
