//! Per-class bookkeeping: the sequence counter, the removal floor, the
//! message and byte counts, and the budget rule deciding whether an append
//! fits, is refused, or first needs the oldest messages removed.
//!
//! Plain data with methods and no I/O: the writer thread keeps one ledger per
//! class in memory and persists it in the `meta` table in the same
//! transaction as the rows it describes.

use super::{ClassBacklog, ClassLimits, WhenFull};

/// What the journal knows about one class.
///
/// Live messages are exactly the sequences `confirmed + 1 .. next_seq`:
/// messages only ever leave from the head (confirm, expiry and drop-oldest
/// all remove a prefix), so the count is implied by the two sequences and is
/// kept only as a cross-check for validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ClassLedger {
    /// Sequence the next accepted message gets. Starts at 1 and never goes
    /// back, also across restarts, confirm, expiry and compaction.
    pub next_seq: u64,
    /// Every message with a sequence up to this one is gone (confirmed by
    /// NATS, expired or dropped to make room). Readers skip them even where
    /// they still sit in a partly trimmed row.
    pub confirmed: u64,
    pub messages: u64,
    /// Budget bytes (subject + reply + headers + payload) of live messages.
    pub bytes: u64,
    /// `accepted_at_ms` of the first live message; not persisted, it is read
    /// from the head row at open.
    pub oldest_accepted_ms: Option<u64>,
}

/// How an append of a given size relates to the class budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    Fits,
    /// Refused: `when_full = reject`, or the message alone exceeds the budget.
    Full,
    /// `when_full = drop_oldest`: remove at least this many bytes from the head first.
    MakeRoom {
        free: u64,
    },
}

impl ClassLedger {
    pub(super) fn new() -> ClassLedger {
        ClassLedger {
            next_seq: 1,
            confirmed: 0,
            messages: 0,
            bytes: 0,
            oldest_accepted_ms: None,
        }
    }

    /// Decides whether a message of `size` budget bytes may be appended.
    pub(super) fn admit(&self, size: u64, limits: &ClassLimits) -> Admission {
        if size > limits.max_bytes {
            return Admission::Full;
        }
        let total = self.bytes.saturating_add(size);
        if total <= limits.max_bytes {
            return Admission::Fits;
        }
        match limits.when_full {
            WhenFull::Reject => Admission::Full,
            // Never more than `bytes`, since `size <= max_bytes`.
            WhenFull::DropOldest => Admission::MakeRoom {
                free: total - limits.max_bytes,
            },
        }
    }

    /// Takes a message at the tail and returns its sequence.
    pub(super) fn accept(&mut self, size: u64, accepted_at_ms: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.messages == 0 {
            self.oldest_accepted_ms = Some(accepted_at_ms);
        }
        self.messages += 1;
        self.bytes += size;
        seq
    }

    /// Records that the head up to `through_seq` is gone: `messages` messages
    /// of `bytes` budget bytes; `oldest` is the time of the new head.
    pub(super) fn remove_head(
        &mut self,
        through_seq: u64,
        messages: u64,
        bytes: u64,
        oldest: Option<u64>,
    ) {
        self.confirmed = self.confirmed.max(through_seq);
        self.messages = self.messages.saturating_sub(messages);
        // A damaged row's bytes are estimated; an empty class holds none.
        self.bytes = if self.messages == 0 {
            0
        } else {
            self.bytes.saturating_sub(bytes)
        };
        self.oldest_accepted_ms = if self.messages == 0 { None } else { oldest };
    }

    /// The sequence of the first live message, if any.
    pub(super) fn first_live_seq(&self) -> Option<u64> {
        (self.messages > 0).then_some(self.confirmed + 1)
    }

    pub(super) fn backlog(&self) -> ClassBacklog {
        ClassBacklog {
            messages: self.messages,
            bytes: self.bytes,
            oldest_accepted_ms: if self.messages == 0 {
                None
            } else {
                self.oldest_accepted_ms
            },
            first_seq: self.first_live_seq().unwrap_or(0),
            last_seq: self.next_seq.saturating_sub(1),
        }
    }

    /// Checks the counters against each other (not against rows).
    pub(super) fn check(&self) -> Result<(), String> {
        if self.next_seq == 0 {
            return Err("next_seq is 0".into());
        }
        if self.confirmed >= self.next_seq {
            return Err(format!(
                "confirmed {} is not below next_seq {}",
                self.confirmed, self.next_seq
            ));
        }
        let live = self.next_seq - 1 - self.confirmed;
        if self.messages != live {
            return Err(format!(
                "messages {} but sequences {}..{} are live",
                self.messages,
                self.confirmed + 1,
                self.next_seq
            ));
        }
        if self.messages == 0 && self.bytes != 0 {
            return Err(format!("no messages but {} bytes", self.bytes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_bytes: u64, when_full: WhenFull) -> ClassLimits {
        ClassLimits {
            name: "c".into(),
            max_bytes,
            when_full,
        }
    }

    #[test]
    fn sequences_start_at_one_and_count_up() {
        let mut ledger = ClassLedger::new();
        assert_eq!(ledger.backlog(), ClassBacklog::default());
        assert_eq!(ledger.accept(10, 100), 1);
        assert_eq!(ledger.accept(20, 200), 2);
        let backlog = ledger.backlog();
        assert_eq!(backlog.messages, 2);
        assert_eq!(backlog.bytes, 30);
        assert_eq!(backlog.oldest_accepted_ms, Some(100));
        assert_eq!((backlog.first_seq, backlog.last_seq), (1, 2));
        assert!(ledger.check().is_ok());
    }

    #[test]
    fn removing_the_head_keeps_the_sequence() {
        let mut ledger = ClassLedger::new();
        for i in 0..5 {
            ledger.accept(10, i);
        }
        ledger.remove_head(3, 3, 30, Some(3));
        assert_eq!(ledger.backlog().first_seq, 4);
        assert_eq!(ledger.backlog().oldest_accepted_ms, Some(3));
        ledger.remove_head(5, 2, 20, None);
        let backlog = ledger.backlog();
        assert_eq!(
            (backlog.messages, backlog.bytes, backlog.first_seq),
            (0, 0, 0)
        );
        assert_eq!(backlog.last_seq, 5);
        assert_eq!(ledger.accept(1, 9), 6);
        assert!(ledger.check().is_ok());
    }

    #[test]
    fn budget_rules() {
        let mut ledger = ClassLedger::new();
        ledger.accept(80, 0);
        let reject = limits(100, WhenFull::Reject);
        let drop = limits(100, WhenFull::DropOldest);
        assert_eq!(ledger.admit(20, &reject), Admission::Fits);
        assert_eq!(ledger.admit(21, &reject), Admission::Full);
        assert_eq!(ledger.admit(21, &drop), Admission::MakeRoom { free: 1 });
        assert_eq!(ledger.admit(101, &drop), Admission::Full);
    }

    #[test]
    fn check_catches_disagreeing_counters() {
        let mut ledger = ClassLedger::new();
        ledger.accept(1, 0);
        ledger.messages = 2;
        assert!(ledger.check().is_err());
        let mut ledger = ClassLedger::new();
        ledger.confirmed = 1;
        assert!(ledger.check().is_err());
        let mut ledger = ClassLedger::new();
        ledger.bytes = 3;
        assert!(ledger.check().is_err());
    }
}
