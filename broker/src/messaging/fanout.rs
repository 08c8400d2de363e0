//! One upstream subscription and the local subscribers that share it.
//!
//! Each distinct (subject, queue group) gets one task that owns the
//! upstream subscription (on the relay's subscriber connection) and the
//! list of local subscribers; the router
//! changes that list through a channel, so delivering a message takes no
//! lock. Plain subscriptions get every message; a queue group gets each
//! message once, round-robin over members that have room. While NATS is
//! down the router feeds node-local publishes in through the same path.

use crate::messaging::local_message::{compact, LocalMessage};
use crate::messaging::nats::link::NatsLink;
use crate::messaging::nats::subscriber::{UpstreamMessage, UpstreamSubscription};
use crate::messaging::subscription_table::{MemberId, SubscriptionKey};
use crate::ops::stats::{add, RelayStats};
use crate::session::outbox::{message_charge, Delivery, Outbox};
use holdfast_wire::{Frame, Headers, Message, Text};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Header a relay puts on a message it already delivered to its own
/// subscribers while NATS was down. When the message later reaches NATS
/// (journal replay) and comes back on an upstream subscription, the relay
/// named in the header skips it, so its subscribers do not see it twice.
pub const DELIVERED_LOCALLY_HEADER: &str = "Holdfast-Delivered-Locally";
/// Carries the status code of a NATS status message (e.g. 503, no
/// responders) to subscribers, since the framed protocol has no status line.
pub const NATS_STATUS_HEADER: &str = "Nats-Status";
/// The status message's description, when NATS gave one.
pub const NATS_STATUS_DESCRIPTION_HEADER: &str = "Nats-Status-Description";

pub enum FanoutCommand {
    Add {
        member: MemberId,
        outbox: Outbox,
        done: oneshot::Sender<()>,
    },
    Remove {
        member: MemberId,
    },
    /// Boxed because it is by far the largest variant and is rare (node-
    /// local delivery while NATS is down): tokio allocates a channel's
    /// slots 32 at a time, the first 32 when the channel is made, so every
    /// subscribed subject paid 32 slots of this size up front.
    Deliver(Box<LocalMessage>),
}

pub struct Fanout {
    key: SubscriptionKey,
    members: Vec<(MemberId, Outbox)>,
    next_queue_member: usize,
    relay_id: Text,
    stats: Arc<RelayStats>,
}

impl Fanout {
    pub fn new(key: SubscriptionKey, relay_id: Text, stats: Arc<RelayStats>) -> Fanout {
        Fanout {
            key,
            members: Vec::new(),
            next_queue_member: 0,
            relay_id,
            stats,
        }
    }

    /// Subscribes upstream, then serves commands and upstream messages until
    /// the router drops its sender (the last local subscriber left).
    pub async fn run(
        mut self,
        nats: NatsLink,
        mut commands: mpsc::Receiver<FanoutCommand>,
        subscribed: oneshot::Sender<()>,
    ) {
        let upstream = nats
            .subscribe(self.key.subject.clone(), self.key.queue_group.clone())
            .await;
        let mut upstream = match upstream {
            Ok(subscriber) => Some(subscriber),
            Err(error) => {
                warn!(subject = %self.key.subject, %error, "upstream subscribe failed; serving local publishes only");
                None
            }
        };
        let _ = subscribed.send(());
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => break,
                    Some(command) => self.on_command(command),
                },
                Some(message) = next_upstream(&mut upstream) => self.on_upstream(message),
            }
        }
        debug!(subject = %self.key.subject, "upstream subscription released");
    }

    fn on_command(&mut self, command: FanoutCommand) {
        match command {
            FanoutCommand::Add {
                member,
                outbox,
                done,
            } => {
                self.members.push((member, outbox));
                let _ = done.send(());
            }
            FanoutCommand::Remove { member } => {
                self.members.retain(|(id, _)| *id != member);
            }
            FanoutCommand::Deliver(message) => {
                self.deliver(*message);
            }
        }
    }

    fn on_upstream(&mut self, message: UpstreamMessage) {
        let mut headers = message.headers;
        if let Some(status) = message.status {
            // A status-only message (503: nobody answered a request whose
            // reply subject this subscription covers) keeps its meaning for
            // clients that cannot see NATS status lines.
            headers.insert(NATS_STATUS_HEADER, Text::from(status.code.to_string()));
            if let Some(description) = status.description {
                headers.insert(NATS_STATUS_DESCRIPTION_HEADER, description);
            }
        }
        if self.already_delivered_here(&headers) {
            return;
        }
        self.deliver(LocalMessage {
            subject: message.subject,
            reply: message.reply,
            headers,
            payload: message.payload,
        });
    }

    fn already_delivered_here(&self, headers: &Headers) -> bool {
        headers
            .get(DELIVERED_LOCALLY_HEADER)
            .is_some_and(|relay| *relay == self.relay_id)
    }

    /// Hands a message to the local subscribers; returns how many got it.
    pub fn deliver(&mut self, message: LocalMessage) -> u32 {
        if self.members.is_empty() {
            return 0;
        }
        let mut message = Compacted::new(message);
        let delivered = if self.key.queue_group.is_some() {
            self.deliver_to_one(&mut message)
        } else {
            self.deliver_to_all(&mut message)
        };
        add(&self.stats.messages_delivered, u64::from(delivered));
        delivered
    }

    fn deliver_to_all(&mut self, message: &mut Compacted) -> u32 {
        let mut delivered = 0;
        for ((_, sid), outbox) in &self.members {
            let queued = outbox.offer_with(message.charge, || message.frame(*sid));
            if queued == Delivery::Queued {
                delivered += 1;
            }
        }
        delivered
    }

    /// Queue group: the first member in round-robin order that has room.
    fn deliver_to_one(&mut self, message: &mut Compacted) -> u32 {
        let count = self.members.len();
        for attempt in 0..count {
            let index = (self.next_queue_member + attempt) % count;
            let ((_, sid), outbox) = &self.members[index];
            if outbox.try_offer_with(message.charge, || message.frame(*sid)) == Delivery::Queued {
                self.next_queue_member = index + 1;
                return 1;
            }
        }
        // Every member is full: the message is dropped once, charged to the
        // member whose turn it was.
        let (_, outbox) = &self.members[self.next_queue_member % count];
        outbox.overflow();
        0
    }
}

/// A message on its way to subscribers, copied into an allocation of its
/// own (see [`crate::messaging::compact`]) when the first subscriber has room for it:
/// queued, it must not keep the buffer it was read into alive, and a
/// message every subscriber is too full for is not copied at all.
struct Compacted {
    original: LocalMessage,
    copy: Option<LocalMessage>,
    /// What each subscriber's outbox is charged for it.
    charge: usize,
}

impl Compacted {
    fn new(original: LocalMessage) -> Compacted {
        let charge = message_charge(
            &original.subject,
            original.reply.as_ref(),
            &original.headers,
            original.payload.len(),
        );
        Compacted {
            original,
            copy: None,
            charge,
        }
    }

    fn frame(&mut self, sid: u32) -> Frame {
        let original = &self.original;
        let message = self.copy.get_or_insert_with(|| compact(original));
        Frame::Message(Message {
            sid,
            subject: message.subject.clone(),
            reply: message.reply.clone(),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
        })
    }
}

async fn next_upstream(upstream: &mut Option<UpstreamSubscription>) -> Option<UpstreamMessage> {
    match upstream {
        Some(subscription) => subscription.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::session::outbox::{outbox, OutboxReceiver};
    use bytes::Bytes;

    fn message(payload: &'static str) -> LocalMessage {
        LocalMessage {
            subject: Text::from_static("work.item"),
            reply: None,
            headers: Headers::new(),
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    fn member(fanout: &mut Fanout, session: u64, sid: u32, capacity: usize) -> OutboxReceiver {
        let (outbox, receiver) = outbox(
            session,
            capacity,
            usize::MAX,
            SlowConsumerPolicy::Drop,
            fanout.stats.clone(),
        );
        fanout.members.push(((session, sid), outbox));
        receiver
    }

    async fn payloads(receiver: &mut OutboxReceiver) -> Vec<(u32, Bytes)> {
        let mut batch = Vec::new();
        let mut out = Vec::new();
        while let Ok(received) = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            receiver.recv_many(&mut batch, 100),
        )
        .await
        {
            if received == 0 {
                break;
            }
            for frame in batch.drain(..) {
                if let Frame::Message(message) = frame {
                    out.push((message.sid, message.payload));
                }
            }
        }
        out
    }

    fn fanout(queue: Option<&str>) -> Fanout {
        Fanout::new(
            SubscriptionKey {
                subject: Text::from_static("work.>"),
                queue_group: queue.map(Text::from),
            },
            Text::from_static("relay-a"),
            Arc::new(RelayStats::default()),
        )
    }

    #[tokio::test]
    async fn a_nats_status_message_reaches_subscribers_as_a_header() {
        let mut fanout = fanout(None);
        let mut receiver = member(&mut fanout, 1, 10, 16);
        fanout.on_upstream(UpstreamMessage {
            subject: Text::from_static("work.reply"),
            reply: None,
            headers: Headers::new(),
            status: Some(Box::new(
                crate::messaging::nats::subscriber::UpstreamStatus {
                    code: 503,
                    description: Some(Text::from_static("No Responders")),
                },
            )),
            payload: Bytes::new(),
        });
        let mut batch = Vec::new();
        receiver.recv_many(&mut batch, 10).await;
        let Some(Frame::Message(message)) = batch.pop() else {
            panic!("expected a message, got {batch:?}");
        };
        assert_eq!(
            message.headers.get(NATS_STATUS_HEADER).map(Text::as_str),
            Some("503")
        );
        assert_eq!(
            message
                .headers
                .get(NATS_STATUS_DESCRIPTION_HEADER)
                .map(Text::as_str),
            Some("No Responders")
        );
    }

    #[tokio::test]
    async fn plain_subscribers_each_get_every_message_with_their_sid() {
        let mut fanout = fanout(None);
        let mut first = member(&mut fanout, 1, 10, 16);
        let mut second = member(&mut fanout, 2, 20, 16);
        assert_eq!(fanout.deliver(message("a")), 2);
        assert_eq!(fanout.deliver(message("b")), 2);
        assert_eq!(
            payloads(&mut first).await,
            vec![(10, "a".into()), (10, "b".into())]
        );
        assert_eq!(
            payloads(&mut second).await,
            vec![(20, "a".into()), (20, "b".into())]
        );
    }

    #[tokio::test]
    async fn queue_group_gives_each_message_to_one_member_skipping_full_ones() {
        let mut fanout = fanout(Some("workers"));
        let mut first = member(&mut fanout, 1, 1, 1);
        let mut second = member(&mut fanout, 2, 2, 16);
        for payload in ["a", "b", "c", "d"] {
            assert_eq!(fanout.deliver(message(payload)), 1);
        }
        // The first member holds one message and is then full; the rest go
        // to the second member instead of being dropped.
        assert_eq!(payloads(&mut first).await, vec![(1, "a".into())]);
        assert_eq!(
            payloads(&mut second).await,
            vec![(2, "b".into()), (2, "c".into()), (2, "d".into())]
        );
    }

    #[tokio::test]
    async fn slow_subscriber_does_not_hold_back_a_fast_one() {
        let mut fanout = fanout(None);
        let _slow = member(&mut fanout, 1, 1, 1);
        let mut fast = member(&mut fanout, 2, 2, 64);
        for _ in 0..10 {
            fanout.deliver(message("x"));
        }
        assert_eq!(payloads(&mut fast).await.len(), 10);
        assert_eq!(fanout.stats.snapshot().slow_consumer_drops, 9);
    }

    #[tokio::test]
    async fn a_queued_message_does_not_keep_the_buffer_it_was_read_into() {
        let mut fanout = fanout(None);
        let mut first = member(&mut fanout, 1, 10, 16);
        let mut second = member(&mut fanout, 2, 20, 16);
        let read_buffer = Bytes::from(vec![b'x'; 64 * 1024]);
        fanout.deliver(LocalMessage {
            subject: Text::from_static("work.item"),
            reply: None,
            headers: Headers::new(),
            payload: read_buffer.slice(100..1124),
        });
        let start = read_buffer.as_ptr() as usize;
        let (_, one) = payloads(&mut first).await.remove(0);
        let (_, other) = payloads(&mut second).await.remove(0);
        assert_eq!(one, read_buffer.slice(100..1124));
        let address = one.as_ptr() as usize;
        assert!(!(start..start + read_buffer.len()).contains(&address));
        // One copy, shared by every subscriber it went to.
        assert_eq!(one.as_ptr(), other.as_ptr());
    }

    #[test]
    fn replayed_copy_of_a_locally_delivered_message_is_recognised() {
        let fanout = fanout(None);
        let mut headers = Headers::new();
        headers.insert(DELIVERED_LOCALLY_HEADER, "relay-a");
        assert!(fanout.already_delivered_here(&headers));
        let mut other = Headers::new();
        other.insert(DELIVERED_LOCALLY_HEADER, "relay-b");
        assert!(!fanout.already_delivered_here(&other));
        assert!(!fanout.already_delivered_here(&Headers::new()));
    }
}
