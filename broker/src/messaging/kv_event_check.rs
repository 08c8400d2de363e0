//! The forwarder's side of the Dynamo KV event check: the class it
//! watches, the "cleared" messages its resets become, their log lines and
//! status, and the streams a clean stop leaves for the next start. The
//! check itself is the sans-IO [`KvConsistencyCheck`].

use crate::messaging::class_queue::QueuedMessage;
use crate::messaging::classes::ClassId;
use crate::messaging::kv_check_view::KvCheckView;
use crate::messaging::kv_consistency::{KvCheckLimits, KvConsistencyCheck, Reset, SavedStream};
use crate::util::drop_log::DropLog;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// The check of one class's messages as the forwarder sends them.
pub struct KvEventCheck {
    check: KvConsistencyCheck,
    class: ClassId,
    /// Where a clean stop leaves the streams' places.
    state: PathBuf,
    reset_log: DropLog,
    view: Arc<KvCheckView>,
}

impl KvEventCheck {
    /// Checks `class`, picking up the streams a clean stop left in `state`
    /// (the file is read once and removed: after a crash the next start
    /// must not trust places older than what was sent since).
    pub fn resume(
        class: ClassId,
        limits: KvCheckLimits,
        publisher_id: u64,
        state: PathBuf,
        view: Arc<KvCheckView>,
    ) -> KvEventCheck {
        KvEventCheck {
            check: resume(limits, publisher_id, &state),
            class,
            state,
            reset_log: DropLog::default(),
            view,
        }
    }

    pub fn watches(&self, class: ClassId) -> bool {
        class == self.class
    }

    /// Runs a message of the watched class through the check: the
    /// "cleared" messages to send before and after it.
    pub fn check(&mut self, message: &QueuedMessage) -> (Vec<QueuedMessage>, Vec<QueuedMessage>) {
        let now_ms = crate::util::wall_clock::unix_millis();
        let verdict = self
            .check
            .observe(message.subject.as_str(), &message.payload, now_ms);
        if verdict.before.is_empty() && verdict.after.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let mut to_message = |reset: Reset| {
            self.note_reset(message.subject.as_str(), &reset, now_ms);
            QueuedMessage {
                subject: message.subject.clone(),
                headers: Default::default(),
                payload: reset.message.into(),
                accepted_at_ms: now_ms,
            }
        };
        let before = verdict.before.into_iter().map(&mut to_message).collect();
        let after = verdict.after.into_iter().map(&mut to_message).collect();
        (before, after)
    }

    /// Logs a reset (the first of a burst, then a count at most every few
    /// seconds) and shows it in `/status`.
    fn note_reset(&mut self, subject: &str, reset: &Reset, now_ms: u64) {
        self.view.note_reset(subject, reset, now_ms);
        let counts = self.check.counts();
        let total = counts.gap_resets + counts.orphan_resets + counts.restart_resets;
        if let Some(resets) = self.reset_log.due(total, Instant::now()) {
            warn!(
                subject,
                worker_id = reset.worker_id,
                dp_rank = reset.dp_rank,
                reason = reset.reason.as_str(),
                detail = %reset.detail,
                resets,
                total,
                "Dynamo KV event stream is not whole: routers are told to drop this worker's blocks (a \"cleared\" event), counted in holdfast_kv_consistency_resets_total"
            );
        }
    }

    /// Shows the check's counts (with the forwarder's other gauges).
    pub fn publish_counts(&self) {
        self.view.publish(
            &self.check.counts(),
            self.check.tracked_streams(),
            self.check.tracked_blocks(),
        );
    }

    /// Leaves the streams for the next start (after a clean stop only).
    pub fn save(&self) {
        let saved = self.check.save();
        if saved.is_empty() {
            return;
        }
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::util::atomic_file::replace(&self.state, &bytes));
        if let Err(error) = written {
            warn!(%error, path = %self.state.display(), "cannot save the KV event check's streams; the next start checks them afresh");
        }
    }
}

fn resume(limits: KvCheckLimits, publisher_id: u64, state: &Path) -> KvConsistencyCheck {
    let mut check = KvConsistencyCheck::new(limits, publisher_id);
    let saved = match std::fs::read(state) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return check,
        Err(error) => {
            warn!(%error, path = %state.display(), "cannot read the KV event check's saved streams; starting afresh");
            return check;
        }
    };
    match serde_json::from_slice::<Vec<SavedStream>>(&saved) {
        Ok(streams) => {
            info!(
                streams = streams.len(),
                "KV event check resumed its streams from the last clean stop"
            );
            check.restore(streams);
        }
        Err(error) => {
            warn!(%error, path = %state.display(), "the KV event check's saved streams are unreadable; starting afresh");
        }
    }
    if let Err(error) = std::fs::remove_file(state) {
        warn!(%error, path = %state.display(), "cannot remove the KV event check's saved streams");
    }
    check
}
