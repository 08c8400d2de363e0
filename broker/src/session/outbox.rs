//! A session's outbound queue: bounded in frames and in bytes, with the
//! slow-consumer policy applied at the door.
//!
//! Two kinds of producers write here. The session itself (acks, pongs,
//! responses) waits for room: that only slows the client that is not reading
//! its own answers. Fan-out tasks delivering subscription messages never
//! wait: a full outbox drops the message (counted, reported to the client)
//! or asks the session to disconnect, so one slow subscriber cannot stall
//! delivery to anyone else. Answers from the forwarder, the registry and
//! discovery never wait either; they are counted instead, and the session
//! stops reading new requests while a client leaves too many unread.
//!
//! The byte bound is on what the frames hold in memory, and a frame is
//! charged from the moment it is queued until its bytes are written: a
//! session's writer takes frames with [`OutboxReceiver::take`] and gives
//! their charge back with [`OutboxReceiver::written`] once the socket took
//! them. (Giving it back when the writer merely took them let a subscriber
//! that stopped reading hold a whole batch more than the bound: with 64 KiB
//! messages and the default 64 MiB, half as much again.)

use crate::config::SlowConsumerPolicy;
use crate::ops::stats::{bump, RelayStats};
use holdfast_wire::{Frame, Headers, Text};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tracing::warn;

/// What became of a message offered by a fan-out task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The outbox was full; nothing was counted yet (see [`Outbox::try_offer_with`]).
    Full,
    /// The outbox was full; the message was dropped for this subscriber.
    Dropped,
    /// The session is gone or going.
    Closed,
}

/// The session has ended; nothing more can be sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session closed")]
pub struct OutboxClosed;

struct Shared {
    session_id: u64,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Answers in the ack channel, and how many the session lets wait
    /// before it stops reading (`sessions.outbound_queue_frames`).
    queued_acks: AtomicUsize,
    max_acks: usize,
    acks_drained: Notify,
    policy: SlowConsumerPolicy,
    /// Drops not yet reported to the client.
    unreported_drops: AtomicU64,
    close_requested: AtomicBool,
    close_notify: Notify,
    stats: Arc<RelayStats>,
}

/// The sending side; clones go to every fan-out task the session subscribes
/// to and with every publish whose answer waits for a journal commit. A
/// clone is one shared counter: cloning the two channel senders and the
/// shared state instead touched five, on the session's and the forwarder's
/// threads, for every such publish.
#[derive(Clone)]
pub struct Outbox {
    senders: Arc<Senders>,
}

struct Senders {
    sender: mpsc::Sender<Frame>,
    /// Answers from the forwarder, the registry and discovery. Unbounded so
    /// none of them ever waits on one session; bounded because the session
    /// stops reading while `max_acks` are unread (see
    /// [`Outbox::unread_answers_at_limit`]).
    acks: mpsc::UnboundedSender<Frame>,
    shared: Arc<Shared>,
}

/// The receiving side, owned by the session's writer.
pub struct OutboxReceiver {
    receiver: mpsc::Receiver<Frame>,
    acks: mpsc::UnboundedReceiver<Frame>,
    shared: Arc<Shared>,
}

/// Creates a session's outbox.
pub fn outbox(
    session_id: u64,
    max_frames: usize,
    max_bytes: usize,
    policy: SlowConsumerPolicy,
    stats: Arc<RelayStats>,
) -> (Outbox, OutboxReceiver) {
    let (sender, receiver) = mpsc::channel(max_frames);
    let (acks, ack_receiver) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        session_id,
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        queued_acks: AtomicUsize::new(0),
        max_acks: max_frames,
        acks_drained: Notify::new(),
        policy,
        unreported_drops: AtomicU64::new(0),
        close_requested: AtomicBool::new(false),
        close_notify: Notify::new(),
        stats,
    });
    (
        Outbox {
            senders: Arc::new(Senders {
                sender,
                acks,
                shared: shared.clone(),
            }),
        },
        OutboxReceiver {
            receiver,
            acks: ack_receiver,
            shared,
        },
    )
}

/// What a charged frame costs beyond its bytes: its slot in the channel,
/// and the allocator's header and rounding of the one allocation that
/// holds a message's bytes (see [`crate::messaging::fanout`], which gives each
/// message exactly one).
pub const FRAME_OVERHEAD_BYTES: usize = std::mem::size_of::<Frame>() + 32;

/// Bytes a frame holds in memory while queued. Subscription messages, watch
/// events and discovery snapshots count: the first two are pushed at a
/// session uninvited, and a snapshot can be large. A message also holds its
/// own copy of its header list (the names and values are shared).
pub fn charged_bytes(frame: &Frame) -> usize {
    match frame {
        Frame::WatchEvent(event) => event.key.len() + event.value.len() + FRAME_OVERHEAD_BYTES,
        Frame::GetResponse(_) => holdfast_wire::encoded_len(frame) + FRAME_OVERHEAD_BYTES,
        Frame::Message(message) => message_charge(
            &message.subject,
            message.reply.as_ref(),
            &message.headers,
            message.payload.len(),
        ),
        _ => 0,
    }
}

/// [`charged_bytes`] of a message frame with these parts, known before the
/// frame is made.
pub fn message_charge(
    subject: &Text,
    reply: Option<&Text>,
    headers: &Headers,
    payload_len: usize,
) -> usize {
    let header_list = if headers.is_empty() {
        0
    } else {
        headers.len() * std::mem::size_of::<(Text, Text)>() + 16
    };
    payload_len
        + subject.len()
        + reply.map_or(0, |reply| reply.len())
        + headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
        + header_list
        + FRAME_OVERHEAD_BYTES
}

impl Outbox {
    fn shared(&self) -> &Shared {
        &self.senders.shared
    }

    /// Queues a frame of the session's own, waiting for room.
    pub async fn send(&self, frame: Frame) -> Result<(), OutboxClosed> {
        // Counted like an offered frame: the writer gives back the charge
        // of every frame it wrote, whichever way it came.
        let size = charged_bytes(&frame);
        self.shared().queued_bytes.fetch_add(size, Ordering::AcqRel);
        self.senders.sender.send(frame).await.map_err(|_| {
            self.shared().queued_bytes.fetch_sub(size, Ordering::AcqRel);
            OutboxClosed
        })
    }

    /// Queues an ack from the forwarder without waiting; `Err` when the
    /// session is gone.
    pub fn send_ack(&self, frame: Frame) -> Result<(), OutboxClosed> {
        let size = charged_bytes(&frame);
        self.shared().queued_bytes.fetch_add(size, Ordering::AcqRel);
        self.shared().queued_acks.fetch_add(1, Ordering::AcqRel);
        self.senders.acks.send(frame).map_err(|_| {
            self.shared().queued_acks.fetch_sub(1, Ordering::AcqRel);
            self.shared().queued_bytes.fetch_sub(size, Ordering::AcqRel);
            OutboxClosed
        })
    }

    /// Whether the client has left as many answers unread as it may: the
    /// session then reads nothing more from it until they drain.
    pub fn unread_answers_at_limit(&self) -> bool {
        let shared = self.shared();
        shared.queued_acks.load(Ordering::Acquire) >= shared.max_acks
    }

    /// Resolves once the unread answers are below the limit again.
    pub async fn unread_answers_drained(&self) {
        loop {
            let notified = self.shared().acks_drained.notified();
            if !self.unread_answers_at_limit() {
                return;
            }
            notified.await;
        }
    }

    /// Offers a subscription message without waiting; a full outbox
    /// applies the slow-consumer policy.
    pub fn offer(&self, frame: Frame) -> Delivery {
        let size = charged_bytes(&frame);
        self.offer_with(size, || frame)
    }

    /// Like [`Outbox::offer`] for a frame of [`charged_bytes`] `size` that
    /// `make` builds only once there is room for it, so a message for a
    /// subscriber that is full costs no work.
    pub fn offer_with(&self, size: usize, make: impl FnOnce() -> Frame) -> Delivery {
        match self.try_offer_with(size, make) {
            Delivery::Full => self.overflow(),
            other => other,
        }
    }

    /// Like [`Outbox::offer_with`], but a full outbox only answers `Full`,
    /// so a queue group can try another member before anything counts as
    /// dropped.
    pub fn try_offer_with(&self, size: usize, make: impl FnOnce() -> Frame) -> Delivery {
        if self.shared().close_requested.load(Ordering::Relaxed) {
            return Delivery::Closed;
        }
        let queued = self.shared().queued_bytes.fetch_add(size, Ordering::AcqRel);
        if queued + size > self.shared().max_bytes {
            self.shared().queued_bytes.fetch_sub(size, Ordering::AcqRel);
            return Delivery::Full;
        }
        match self.senders.sender.try_reserve() {
            Ok(permit) => {
                let frame = make();
                debug_assert_eq!(charged_bytes(&frame), size, "charged as announced");
                permit.send(frame);
                Delivery::Queued
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                self.shared().queued_bytes.fetch_sub(size, Ordering::AcqRel);
                Delivery::Full
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                self.shared().queued_bytes.fetch_sub(size, Ordering::AcqRel);
                Delivery::Closed
            }
        }
    }

    /// Applies the slow-consumer policy to one message that found no room.
    pub fn overflow(&self) -> Delivery {
        let shared = self.shared();
        match shared.policy {
            SlowConsumerPolicy::Drop => {
                bump(&shared.stats.slow_consumer_drops);
                let earlier = shared.unreported_drops.fetch_add(1, Ordering::Relaxed);
                if earlier == 0 {
                    warn!(
                        session = shared.session_id,
                        reason = "slow_consumer",
                        "dropping messages for a subscriber whose outbound queue is full"
                    );
                }
                Delivery::Dropped
            }
            SlowConsumerPolicy::Disconnect => {
                if !shared.close_requested.swap(true, Ordering::AcqRel) {
                    bump(&shared.stats.slow_consumer_disconnects);
                    warn!(
                        session = shared.session_id,
                        reason = "slow_consumer",
                        "disconnecting a subscriber whose outbound queue is full"
                    );
                    shared.close_notify.notify_one();
                }
                // The message is lost for this subscriber along with the
                // connection; count it like any other drop.
                bump(&shared.stats.slow_consumer_drops);
                Delivery::Dropped
            }
        }
    }

    /// Resolves when a fan-out task asked for this session to be closed.
    pub async fn close_requested(&self) {
        loop {
            let notified = self.shared().close_notify.notified();
            if self.shared().close_requested.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl OutboxReceiver {
    /// Moves up to `limit` queued frames into `batch` and gives back their
    /// charge at once, for a consumer that is done with them when it has
    /// handled them; 0 means every sender is gone.
    pub async fn recv_many(&mut self, batch: &mut Vec<Frame>, limit: usize) -> usize {
        let start = batch.len();
        let received = self.take(batch, limit).await;
        let released: usize = batch[start..].iter().map(charged_bytes).sum();
        self.written(released);
        received
    }

    /// Like [`OutboxReceiver::recv_many`], but the frames stay charged
    /// until [`OutboxReceiver::written`] gives back their
    /// [`charged_bytes`]: for a writer that may hold them while its socket
    /// is slow.
    pub async fn take(&mut self, batch: &mut Vec<Frame>, limit: usize) -> usize {
        let start = batch.len();
        let mut acks_taken = 0;
        // Acks first: they are small and their publishers are waiting.
        while batch.len() - start < limit {
            match self.acks.try_recv() {
                Ok(frame) => {
                    batch.push(frame);
                    acks_taken += 1;
                }
                Err(_) => break,
            }
        }
        if batch.len() == start {
            tokio::select! {
                _ = self.receiver.recv_many(batch, limit) => {}
                Some(frame) = self.acks.recv() => {
                    batch.push(frame);
                    acks_taken += 1;
                }
            }
            if batch.len() == start {
                // The frame queue is closed (every sender gone), but an ack
                // sent just before the last sender went may still wait.
                while batch.len() - start < limit {
                    match self.acks.try_recv() {
                        Ok(frame) => {
                            batch.push(frame);
                            acks_taken += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
        } else {
            while batch.len() - start < limit {
                match self.receiver.try_recv() {
                    Ok(frame) => batch.push(frame),
                    Err(_) => break,
                }
            }
        }
        let received = batch.len() - start;
        if acks_taken > 0 {
            let before = self
                .shared
                .queued_acks
                .fetch_sub(acks_taken, Ordering::AcqRel);
            if before >= self.shared.max_acks && before - acks_taken < self.shared.max_acks {
                self.shared.acks_drained.notify_waiters();
            }
        }
        received
    }

    /// Gives back the charge of frames taken with [`OutboxReceiver::take`]
    /// that are now written (or dropped).
    pub fn written(&self, bytes: usize) {
        if bytes > 0 {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Takes the count of drops since the last call, to report to the
    /// client; each report is also one log line with the count, so the log
    /// accounts for every drop (the first of a run is logged as it happens).
    pub fn take_unreported_drops(&self) -> u64 {
        let dropped = self.shared.unreported_drops.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            warn!(
                session = self.shared.session_id,
                dropped,
                reason = "slow_consumer",
                "messages dropped for a subscriber whose outbound queue was full"
            );
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use holdfast_wire::{Headers, Message, Ping, Text};

    fn message(size: usize) -> Frame {
        Frame::Message(Message {
            sid: 1,
            subject: Text::from_static("s"),
            reply: None,
            headers: Headers::new(),
            payload: Bytes::from(vec![0u8; size]),
        })
    }

    #[tokio::test]
    async fn frames_sent_rather_than_offered_are_counted_on_the_way_in_too() {
        let stats = Arc::new(RelayStats::default());
        let (outbox, mut receiver) = outbox(7, 100, 1_000, SlowConsumerPolicy::Drop, stats.clone());
        outbox.send(message(400)).await.unwrap();
        outbox.send_ack(message(400)).unwrap();
        assert_eq!(
            outbox.offer(message(400)),
            Delivery::Dropped,
            "800 of 1000 bytes queued"
        );
        let mut batch = Vec::new();
        while batch.len() < 2 {
            receiver.recv_many(&mut batch, 10).await;
        }
        // Taking them released exactly what they had counted: a byte
        // count that went below zero would refuse every later offer.
        assert_eq!(outbox.offer(message(600)), Delivery::Queued);
        assert_eq!(outbox.offer(message(600)), Delivery::Dropped);
    }

    #[tokio::test]
    async fn frames_the_writer_took_stay_charged_until_written() {
        let stats = Arc::new(RelayStats::default());
        let charge = charged_bytes(&message(1000));
        let (outbox, mut receiver) =
            outbox(7, 100, 2 * charge, SlowConsumerPolicy::Drop, stats.clone());
        assert_eq!(outbox.offer(message(1000)), Delivery::Queued);
        assert_eq!(outbox.offer(message(1000)), Delivery::Queued);
        assert_eq!(outbox.offer(message(1000)), Delivery::Dropped);
        let mut batch = Vec::new();
        assert_eq!(receiver.take(&mut batch, 10).await, 2);
        // Taken but not yet written: a client that does not read holds
        // them, and they still count.
        assert_eq!(outbox.offer(message(1000)), Delivery::Dropped);
        receiver.written(charge);
        assert_eq!(outbox.offer(message(1000)), Delivery::Queued);
        assert_eq!(outbox.offer(message(1000)), Delivery::Dropped);
    }

    #[test]
    fn a_message_is_charged_its_bytes_its_slot_and_its_header_list() {
        let mut headers = Headers::new();
        headers.insert("Seq", "42");
        let frame = Frame::Message(Message {
            sid: 1,
            subject: Text::from_static("work"),
            reply: Some(Text::from_static("inbox")),
            headers,
            payload: Bytes::from(vec![0u8; 1000]),
        });
        let header_list = std::mem::size_of::<(Text, Text)>() + 16;
        assert_eq!(
            charged_bytes(&frame),
            1000 + 4 + 5 + 5 + header_list + FRAME_OVERHEAD_BYTES
        );
    }

    #[tokio::test]
    async fn a_full_outbox_has_nothing_built_for_it() {
        let stats = Arc::new(RelayStats::default());
        let charge = charged_bytes(&message(10));
        let (outbox, _receiver) = outbox(7, 100, charge, SlowConsumerPolicy::Drop, stats);
        assert_eq!(outbox.offer_with(charge, || message(10)), Delivery::Queued);
        let built = std::cell::Cell::new(false);
        let offered = outbox.offer_with(charge, || {
            built.set(true);
            message(10)
        });
        assert_eq!(offered, Delivery::Dropped);
        assert!(!built.get());
    }

    #[tokio::test]
    async fn byte_budget_drops_and_counts_then_recovers_after_drain() {
        let stats = Arc::new(RelayStats::default());
        let (outbox, mut receiver) = outbox(7, 100, 1_000, SlowConsumerPolicy::Drop, stats.clone());
        assert_eq!(outbox.offer(message(600)), Delivery::Queued);
        assert_eq!(outbox.offer(message(600)), Delivery::Dropped);
        assert_eq!(stats.snapshot().slow_consumer_drops, 1);
        assert_eq!(receiver.take_unreported_drops(), 1);
        assert_eq!(receiver.take_unreported_drops(), 0);
        let mut batch = Vec::new();
        assert_eq!(receiver.recv_many(&mut batch, 10).await, 1);
        assert_eq!(outbox.offer(message(600)), Delivery::Queued);
    }

    #[tokio::test]
    async fn unread_answers_reach_the_limit_and_drain_below_it() {
        let stats = Arc::new(RelayStats::default());
        let (outbox, mut receiver) = outbox(7, 3, usize::MAX, SlowConsumerPolicy::Drop, stats);
        for nonce in 0..3 {
            assert!(!outbox.unread_answers_at_limit(), "{nonce} unread");
            outbox.send_ack(Frame::Ping(Ping { nonce })).unwrap();
        }
        assert!(outbox.unread_answers_at_limit());
        // A waiter made before the drain is woken by it.
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.unread_answers_drained().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let mut batch = Vec::new();
        assert_eq!(receiver.recv_many(&mut batch, 1).await, 1);
        assert!(!outbox.unread_answers_at_limit());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter is woken")
            .unwrap();
        // Answers to a session that is gone are not counted.
        drop(receiver);
        assert!(outbox.send_ack(Frame::Ping(Ping { nonce: 9 })).is_err());
        assert!(!outbox.unread_answers_at_limit());
    }

    #[tokio::test]
    async fn an_ack_sent_just_before_the_last_sender_goes_is_not_lost() {
        let stats = Arc::new(RelayStats::default());
        // The ack and the close both land while the receiver waits, so both
        // of its wake-ups are ready at once; run often enough that either
        // order comes up.
        for _ in 0..200 {
            let (outbox, mut receiver) =
                outbox(7, 10, usize::MAX, SlowConsumerPolicy::Drop, stats.clone());
            let sender = tokio::spawn(async move {
                tokio::task::yield_now().await;
                outbox.send_ack(Frame::Ping(Ping { nonce: 9 })).unwrap();
                drop(outbox);
            });
            let mut batch = Vec::new();
            let first = receiver.recv_many(&mut batch, 10).await;
            sender.await.unwrap();
            assert_eq!(first, 1, "the ack came before the end of the queue");
            assert_eq!(receiver.recv_many(&mut batch, 10).await, 0);
        }
    }

    #[tokio::test]
    async fn frame_budget_drops_without_blocking() {
        let stats = Arc::new(RelayStats::default());
        let (outbox, _receiver) = outbox(7, 2, usize::MAX, SlowConsumerPolicy::Drop, stats);
        assert_eq!(outbox.offer(message(1)), Delivery::Queued);
        assert_eq!(outbox.offer(message(1)), Delivery::Queued);
        assert_eq!(outbox.offer(message(1)), Delivery::Dropped);
    }

    #[tokio::test]
    async fn disconnect_policy_requests_close_once() {
        let stats = Arc::new(RelayStats::default());
        let (outbox, _receiver) = outbox(
            7,
            1,
            usize::MAX,
            SlowConsumerPolicy::Disconnect,
            stats.clone(),
        );
        outbox.send(Frame::Ping(Ping { nonce: 1 })).await.unwrap();
        assert_eq!(outbox.offer(message(1)), Delivery::Dropped);
        assert_eq!(outbox.offer(message(1)), Delivery::Closed);
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.close_requested())
            .await
            .unwrap();
        assert_eq!(stats.snapshot().slow_consumer_disconnects, 1);
    }

    #[tokio::test]
    async fn offers_to_a_closed_session_say_closed() {
        let stats = Arc::new(RelayStats::default());
        let (outbox, receiver) = outbox(7, 4, usize::MAX, SlowConsumerPolicy::Drop, stats);
        drop(receiver);
        assert_eq!(outbox.offer(message(1)), Delivery::Closed);
        assert_eq!(
            outbox.send(Frame::Ping(Ping { nonce: 1 })).await,
            Err(OutboxClosed)
        );
    }
}
