//! One class's undelivered messages, in acceptance order (sans-IO).
//!
//! The queue is a window of messages held in memory, followed by a tail
//! that lives only in the journal (so a backlog of millions costs a few
//! numbers of RAM, not its payloads). Messages leave the front only when
//! NATS confirmed them; a lost connection makes every unconfirmed message
//! "unsent" again (at-least-once). Invariant that keeps the order: while a
//! journal-only tail exists, new messages join that tail, never the window,
//! so nothing accepted later can be sent before something accepted earlier.

use bytes::{Bytes, BytesMut};
use holdfast_wire::{Headers, Text};
use std::collections::VecDeque;

/// A message the relay holds for NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub subject: Text,
    pub headers: Headers,
    pub payload: Bytes,
    pub accepted_at_ms: u64,
}

impl QueuedMessage {
    /// Bytes this message holds in memory (and counts against budgets).
    pub fn size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum();
        (self.payload.len() + self.subject.len() + headers) as u64
    }

    /// The same message in one allocation of its own, for a message held
    /// until NATS returns. Fields decoded from a socket are slices of the
    /// connection's read buffer, so one long-held message would keep the
    /// whole buffer (up to 64 KiB, with every frame read along with it)
    /// alive, while `memory_bytes` counts only the message's own bytes.
    pub fn detached(&self) -> QueuedMessage {
        // usize from u64: the message is in memory, so its size fits.
        let mut buffer = BytesMut::with_capacity(self.size() as usize);
        let mut copy = |bytes: &[u8]| {
            buffer.extend_from_slice(bytes);
            buffer.split().freeze()
        };
        let payload = copy(&self.payload);
        let mut copy_text =
            |text: &Text| Text::from_utf8(copy(text.as_bytes())).unwrap_or_else(|_| text.clone());
        let subject = copy_text(&self.subject);
        let headers = Headers(
            self.headers
                .iter()
                .map(|(name, value)| (copy_text(name), copy_text(value)))
                .collect(),
        );
        QueuedMessage {
            subject,
            headers,
            payload,
            accepted_at_ms: self.accepted_at_ms,
        }
    }
}

/// Class traffic never carries a reply subject (requests are never queued).
impl From<QueuedMessage> for crate::journal::NewMessage {
    fn from(message: QueuedMessage) -> crate::journal::NewMessage {
        crate::journal::NewMessage {
            subject: message.subject,
            reply: None,
            headers: message.headers,
            payload: message.payload,
            accepted_at_ms: message.accepted_at_ms,
            stamp: None,
        }
    }
}

impl From<crate::journal::StoredMessage> for QueuedMessage {
    fn from(stored: crate::journal::StoredMessage) -> QueuedMessage {
        QueuedMessage {
            subject: stored.subject,
            headers: stored.headers,
            payload: stored.payload,
            accepted_at_ms: stored.accepted_at_ms,
        }
    }
}

/// A message in the window; `journal_seq` when the journal also holds it,
/// `ack` when its publisher still waits to hear it was forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<A> {
    pub message: QueuedMessage,
    pub journal_seq: Option<u64>,
    pub ack: Option<A>,
}

#[derive(Debug)]
pub struct ClassQueue<A> {
    window: VecDeque<Entry<A>>,
    window_bytes: u64,
    memory_limit: u64,
    /// How many entries at the front of the window were sent and await
    /// confirmation.
    sent: usize,
    /// Journal sequences (inclusive) held only in the journal.
    journal_tail: Option<(u64, u64)>,
    /// Messages in the journal tail (the range may have holes after expiry).
    journal_tail_messages: u64,
    refill_in_flight: bool,
}

impl<A> ClassQueue<A> {
    pub fn new(memory_limit: u64) -> ClassQueue<A> {
        ClassQueue {
            window: VecDeque::new(),
            window_bytes: 0,
            memory_limit,
            sent: 0,
            journal_tail: None,
            journal_tail_messages: 0,
            refill_in_flight: false,
        }
    }

    /// Adopts what the journal held at start: all of it is an unsent tail.
    pub fn restore(&mut self, first_seq: u64, last_seq: u64, messages: u64) {
        if messages > 0 && first_seq <= last_seq {
            self.journal_tail = Some((first_seq, last_seq));
            self.journal_tail_messages = messages;
        }
    }

    /// Whether a message of `size` bytes may join the window now. The limit
    /// counts each message's bookkeeping as well as its bytes, so that a
    /// class of tiny messages stays within its memory too.
    pub fn fits_in_memory(&self, size: u64) -> bool {
        let entries = self.window.len() as u64 + 1;
        self.journal_tail.is_none()
            && !self.refill_in_flight
            && self.window_bytes + size + entries * Self::ENTRY_OVERHEAD <= self.memory_limit
    }

    /// Memory one held message takes besides its bytes: its slot in the
    /// window, plus the allocation its bytes were copied into and its
    /// header list (an estimate of the allocator's share).
    pub const ENTRY_OVERHEAD: u64 = std::mem::size_of::<Entry<A>>() as u64 + 64;

    /// Adds a message to the window (held in memory).
    pub fn push_memory(
        &mut self,
        message: QueuedMessage,
        journal_seq: Option<u64>,
        ack: Option<A>,
    ) {
        self.window_bytes += message.size();
        self.window.push_back(Entry {
            message,
            journal_seq,
            ack,
        });
    }

    /// Adds a journaled message that is not kept in memory. Commits of one
    /// group are reported in any order, so the range only ever widens.
    pub fn push_journal_only(&mut self, seq: u64) {
        self.journal_tail = Some(match self.journal_tail {
            Some((first, last)) => (first.min(seq), last.max(seq)),
            None => (seq, seq),
        });
        self.journal_tail_messages += 1;
    }

    /// Nothing queued, in memory or in the journal.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty() && self.journal_tail.is_none()
    }

    /// Messages waiting to be sent or confirmed, and the bytes held in memory.
    pub fn backlog(&self) -> (u64, u64) {
        (
            self.window.len() as u64 + self.journal_tail_messages,
            self.window_bytes,
        )
    }

    /// Acceptance time of the oldest message in memory.
    pub fn oldest_in_memory_ms(&self) -> Option<u64> {
        self.window
            .front()
            .map(|entry| entry.message.accepted_at_ms)
    }

    pub fn has_unsent_in_window(&self) -> bool {
        self.sent < self.window.len()
    }

    /// Entries in memory not yet sent.
    pub fn unsent_in_window(&self) -> usize {
        self.window.len() - self.sent
    }

    /// Anything not yet sent, in memory or still in the journal.
    pub fn has_unsent(&self) -> bool {
        self.has_unsent_in_window() || self.journal_tail.is_some()
    }

    /// Marks up to `limit` unsent entries as sent; returns where they start
    /// in the window and their acks in order (a waiting ack goes with its
    /// entry once; a resend carries none). The messages stay where they are
    /// ([`ClassQueue::window_messages`]): cloning each (its `Bytes` share a
    /// session's read buffer, so every clone and drop is an atomic on a
    /// line other threads write) cost more than encoding it.
    pub fn take_unsent_acks(&mut self, limit: usize) -> (usize, Vec<Option<A>>) {
        let first = self.sent;
        let end = (self.sent + limit).min(self.window.len());
        let acks = self
            .window
            .range_mut(first..end)
            .map(|entry| entry.ack.take())
            .collect();
        self.sent = end;
        (first, acks)
    }

    /// `count` messages of the window from position `first`.
    pub fn window_messages(
        &self,
        first: usize,
        count: usize,
    ) -> impl Iterator<Item = &QueuedMessage> {
        self.window
            .range(first..first + count)
            .map(|entry| &entry.message)
    }

    /// As [`ClassQueue::take_unsent_acks`], with a copy of each message.
    #[cfg(test)]
    pub fn take_unsent(&mut self, limit: usize) -> Vec<Entry<A>> {
        let (first, acks) = self.take_unsent_acks(limit);
        self.window
            .range(first..first + acks.len())
            .zip(acks)
            .map(|(entry, ack)| Entry {
                message: entry.message.clone(),
                journal_seq: entry.journal_seq,
                ack,
            })
            .collect()
    }

    /// Removes the acks still waiting on unsent entries (the link dropped:
    /// their publishers learn now that the messages are queued).
    pub fn take_waiting_acks(&mut self) -> Vec<A> {
        self.window
            .iter_mut()
            .skip(self.sent)
            .filter_map(|entry| entry.ack.take())
            .collect()
    }

    /// Takes every message only memory holds (the relay is stopping and
    /// will journal them); journaled entries stay where they are.
    pub fn take_memory_only(&mut self) -> Vec<QueuedMessage> {
        let (memory_only, journaled): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.window)
            .into_iter()
            .partition(|entry| entry.journal_seq.is_none());
        self.window = journaled;
        self.window_bytes = self.window.iter().map(|entry| entry.message.size()).sum();
        self.sent = 0;
        memory_only.into_iter().map(|entry| entry.message).collect()
    }

    /// Entries sent and not yet confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.sent
    }

    /// Nothing held in memory (sent or not).
    pub fn window_is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// Bytes of the messages held in memory.
    pub fn window_bytes(&self) -> u64 {
        self.window_bytes
    }

    /// Whether [`ClassQueue::start_refill`] would start a read now.
    pub fn wants_refill(&self, low_water: usize) -> bool {
        self.unsent_in_window() <= low_water
            && !self.refill_in_flight
            && self.journal_tail.is_some()
    }

    /// When at most `low_water` messages in the window are still unsent and
    /// the journal holds more: read the journal after this sequence (with a
    /// low water above zero, the read overlaps sending what is left instead
    /// of the sends pausing for it). Marks the read as in flight.
    pub fn start_refill(&mut self, low_water: usize) -> Option<u64> {
        if self.unsent_in_window() > low_water || self.refill_in_flight {
            return None;
        }
        let (first, _) = self.journal_tail?;
        self.refill_in_flight = true;
        Some(first.saturating_sub(1))
    }

    /// The journal read came back: those messages move into the window.
    /// Sequences the read skipped (expired or dropped in the journal) leave
    /// the tail too, and so do the `skipped` ranges (damaged rows, whose
    /// messages never come).
    pub fn finish_refill(&mut self, stored: Vec<(u64, QueuedMessage)>, skipped: &[(u64, u64)]) {
        self.refill_in_flight = false;
        let Some((first, last)) = self.journal_tail else {
            return;
        };
        let mut next_first = first;
        for &(from, to) in skipped {
            let (from, to) = (from.max(first), to.min(last));
            if from <= to {
                self.journal_tail_messages =
                    self.journal_tail_messages.saturating_sub(to - from + 1);
                next_first = next_first.max(to + 1);
            }
        }
        for (seq, message) in stored {
            if seq < first || seq > last {
                continue;
            }
            self.push_memory(message, Some(seq), None);
            self.journal_tail_messages = self.journal_tail_messages.saturating_sub(1);
            next_first = next_first.max(seq + 1);
        }
        self.journal_tail = if next_first > last || self.journal_tail_messages == 0 {
            self.journal_tail_messages = 0;
            None
        } else {
            Some((next_first, last))
        };
    }

    /// A refill failed; it may be retried.
    pub fn abort_refill(&mut self) {
        self.refill_in_flight = false;
    }

    /// NATS confirmed the first `count` sent entries; they leave the queue.
    /// Returns the highest journal sequence among them, to trim the journal.
    pub fn confirm(&mut self, count: usize) -> Option<u64> {
        let count = count.min(self.sent);
        let mut highest = None;
        for entry in self.window.drain(..count) {
            self.window_bytes -= entry.message.size();
            if entry.journal_seq.is_some() {
                highest = entry.journal_seq.max(highest);
            }
        }
        self.sent -= count;
        highest
    }

    /// The connection dropped before confirmation: send everything again.
    pub fn unsend_all(&mut self) {
        self.sent = 0;
    }

    /// Drops unsent messages accepted before `cutoff_ms` from the front of
    /// the window; returns the (messages, bytes) that only memory held — the
    /// journal expires and counts its own copies. Sent-but-unconfirmed
    /// messages are left alone: they may be in NATS.
    pub fn expire_before(&mut self, cutoff_ms: u64) -> (u64, u64) {
        if self.sent > 0 {
            return (0, 0);
        }
        let mut expired = (0, 0);
        while let Some(front) = self.window.front() {
            if front.message.accepted_at_ms >= cutoff_ms {
                break;
            }
            let size = front.message.size();
            let memory_only = front.journal_seq.is_none();
            self.window_bytes -= size;
            self.window.pop_front();
            if memory_only {
                expired.0 += 1;
                expired.1 += size;
            }
        }
        expired
    }

    /// The journal expired `messages` of the tail (count only).
    pub fn tail_expired(&mut self, messages: u64) {
        self.journal_tail_messages = self.journal_tail_messages.saturating_sub(messages);
        if self.journal_tail_messages == 0 && !self.refill_in_flight {
            self.journal_tail = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str, at: u64) -> QueuedMessage {
        QueuedMessage {
            subject: Text::from("s"),
            headers: Headers::new(),
            payload: Bytes::copy_from_slice(text.as_bytes()),
            accepted_at_ms: at,
        }
    }

    type Queue = ClassQueue<u32>;

    fn payloads(entries: &[Entry<u32>]) -> Vec<&[u8]> {
        entries
            .iter()
            .map(|entry| entry.message.payload.as_ref())
            .collect()
    }

    #[test]
    fn the_memory_limit_counts_each_messages_bookkeeping() {
        let per_message = 1 + Queue::ENTRY_OVERHEAD + 1; // payload "x", subject "s"
        let mut queue = Queue::new(10 * per_message);
        let mut held = 0;
        while queue.fits_in_memory(2) {
            queue.push_memory(message("x", 0), None, None);
            held += 1;
        }
        assert_eq!(held, 10);
    }

    #[test]
    fn a_detached_message_keeps_nothing_of_the_buffer_it_was_read_from() {
        let read_buffer = Bytes::from(b"xxxxorders.newk1v1payloadyyyy".repeat(1000));
        let field = |from: usize, to: usize| read_buffer.slice(from..to);
        let text = |from: usize, to: usize| Text::from_utf8(field(from, to)).unwrap();
        let mut headers = Headers::new();
        headers.insert(text(14, 16), text(16, 18));
        let read = QueuedMessage {
            subject: text(4, 14),
            headers,
            payload: field(18, 25),
            accepted_at_ms: 9,
        };

        let detached = read.detached();

        assert_eq!(detached, read);
        let buffer = read_buffer.as_ptr_range();
        let mut fields = vec![detached.payload.as_ref(), detached.subject.as_bytes()];
        for (name, value) in detached.headers.iter() {
            fields.extend([name.as_bytes().as_ref(), value.as_bytes().as_ref()]);
        }
        for field in fields {
            let range = field.as_ptr_range();
            assert!(
                range.end <= buffer.start || range.start >= buffer.end,
                "a field still points into the read buffer"
            );
        }
    }

    #[test]
    fn sends_in_order_and_confirmation_releases_the_front() {
        let mut queue = Queue::new(1_000);
        queue.push_memory(message("a", 1), None, None);
        queue.push_memory(message("b", 2), Some(7), None);
        queue.push_memory(message("c", 3), None, None);
        assert_eq!(payloads(&queue.take_unsent(2)), [b"a", b"b"]);
        assert_eq!(payloads(&queue.take_unsent(5)), [b"c"]);
        assert!(queue.take_unsent(5).is_empty());
        assert_eq!(queue.confirm(2), Some(7));
        assert_eq!(queue.backlog(), (1, 2));
        assert_eq!(queue.confirm(1), None);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_waiting_ack_travels_with_the_first_send_only() {
        let mut queue = Queue::new(1_000);
        queue.push_memory(message("a", 1), None, Some(42));
        assert_eq!(queue.take_unsent(1)[0].ack, Some(42));
        queue.unsend_all();
        assert_eq!(queue.take_unsent(1)[0].ack, None);
    }

    #[test]
    fn a_lost_connection_resends_everything_unconfirmed() {
        let mut queue = Queue::new(1_000);
        queue.push_memory(message("a", 1), None, None);
        queue.push_memory(message("b", 2), None, None);
        queue.take_unsent(2);
        queue.unsend_all();
        assert_eq!(queue.unconfirmed(), 0);
        assert_eq!(payloads(&queue.take_unsent(9)), [b"a", b"b"]);
    }

    #[test]
    fn once_a_journal_tail_exists_newcomers_join_it_not_the_window() {
        let mut queue = Queue::new(3 + Queue::ENTRY_OVERHEAD);
        queue.push_memory(message("aa", 1), None, None);
        assert!(!queue.fits_in_memory(2), "over the memory budget");
        queue.push_journal_only(10);
        assert!(
            !queue.fits_in_memory(0),
            "tail exists: order demands the journal"
        );
        queue.push_journal_only(11);
        assert_eq!(queue.backlog().0, 3);

        // The window drains first...
        assert_eq!(queue.start_refill(0), None, "window still has unsent work");
        queue.take_unsent(9);
        queue.confirm(1);
        // ...then the tail is read back from the journal, in order.
        assert_eq!(queue.start_refill(0), Some(9));
        assert_eq!(queue.start_refill(0), None, "one read at a time");
        queue.finish_refill(vec![(10, message("j1", 2)), (11, message("j2", 3))], &[]);
        assert_eq!(payloads(&queue.take_unsent(9)), [b"j1", b"j2"]);
        assert_eq!(queue.confirm(2), Some(11));
        assert!(queue.is_empty());
        assert!(queue.fits_in_memory(1));
    }

    #[test]
    fn a_refill_may_start_before_the_window_is_sent_and_lands_behind_it() {
        let mut queue: ClassQueue<u32> = ClassQueue::new(1 << 20);
        queue.push_memory(message("w1", 1), Some(1), None);
        queue.push_memory(message("w2", 1), Some(2), None);
        queue.push_memory(message("w3", 1), Some(3), None);
        for seq in 4..=6 {
            queue.push_journal_only(seq);
        }
        assert_eq!(
            queue.start_refill(1),
            None,
            "three unsent is above the low water"
        );
        assert_eq!(payloads(&queue.take_unsent(2)), vec![&b"w1"[..], b"w2"]);
        assert_eq!(queue.start_refill(1), Some(3), "one unsent: read ahead");
        queue.finish_refill(vec![(4, message("j4", 2)), (5, message("j5", 2))], &[]);
        assert_eq!(
            payloads(&queue.take_unsent(10)),
            vec![&b"w3"[..], b"j4", b"j5"],
            "what was read joins behind the unsent rest, in order"
        );
        assert_eq!(queue.start_refill(1), Some(5));
    }

    #[test]
    fn journal_commits_reported_out_of_order_keep_the_whole_range() {
        let mut queue = Queue::new(0);
        for seq in [12, 10, 11] {
            queue.push_journal_only(seq);
        }
        assert_eq!(queue.start_refill(0), Some(9));
        queue.finish_refill(
            vec![
                (10, message("a", 1)),
                (11, message("b", 1)),
                (12, message("c", 1)),
            ],
            &[],
        );
        assert_eq!(payloads(&queue.take_unsent(9)), [b"a", b"b", b"c"]);
    }

    #[test]
    fn damaged_rows_a_refill_skipped_leave_the_tail_and_never_come() {
        let mut queue: ClassQueue<u32> = ClassQueue::new(1_000_000);
        queue.restore(1, 10, 10);
        assert_eq!(queue.start_refill(0), Some(0));
        // Rows 1..=3 and 7..=10 damaged: only 4..=6 come back.
        let stored = (4..=6).map(|seq| (seq, message("m", seq))).collect();
        queue.finish_refill(stored, &[(1, 3), (7, 10)]);
        assert_eq!(queue.backlog().0, 3, "only what came is left to send");
        assert!(
            queue.start_refill(0).is_none(),
            "nothing left in the journal to read"
        );
        // A read that found nothing but damage still moves past it.
        let mut queue: ClassQueue<u32> = ClassQueue::new(1_000_000);
        queue.restore(5, 9, 5);
        assert_eq!(queue.start_refill(0), Some(4));
        queue.finish_refill(Vec::new(), &[(5, 9)]);
        assert!(
            queue.is_empty(),
            "a tail of damaged rows does not wait forever"
        );
    }

    #[test]
    fn partial_refills_keep_the_rest_of_the_tail() {
        let mut queue = Queue::new(1_000);
        queue.restore(5, 8, 4);
        assert_eq!(queue.start_refill(0), Some(4));
        queue.finish_refill(vec![(5, message("x", 1)), (6, message("y", 1))], &[]);
        assert_eq!(queue.backlog().0, 4);
        queue.take_unsent(9);
        assert_eq!(queue.start_refill(0), Some(6));
        queue.finish_refill(vec![(7, message("z", 1)), (8, message("w", 1))], &[]);
        assert_eq!(payloads(&queue.take_unsent(9)), [b"z", b"w"]);
    }

    #[test]
    fn expiry_takes_only_old_unsent_messages() {
        let mut queue = Queue::new(1_000);
        queue.push_memory(message("old", 10), None, None);
        queue.push_memory(message("new", 50), None, None);
        assert_eq!(queue.expire_before(20), (1, 4));
        assert_eq!(payloads(&queue.take_unsent(9)), [b"new"]);
        assert_eq!(queue.expire_before(100), (0, 0), "sent messages stay");
    }

    #[test]
    fn tail_expiry_clears_an_empty_tail() {
        let mut queue = Queue::new(1_000);
        queue.restore(1, 3, 3);
        queue.tail_expired(3);
        assert!(queue.is_empty());
    }
}
