//! PUBLISH and the PING barrier behind it: a publish is checked,
//! stripped of headers only the relay may set, delivered to node-local
//! subscribers while NATS is down, and gathered into a batch that one
//! channel send hands to the forwarder; request traffic (a reply subject,
//! an `_INBOX.` subject) goes straight to NATS or a local requester, never
//! queued. A PING answers once everything published before it is.

use super::{Flow, Session, BARRIER_FLUSH_TIMEOUT};
use crate::front::access::Operation;
use crate::messaging::class_queue::QueuedMessage;
use crate::messaging::classes::ClassId;
use crate::messaging::fanout::DELIVERED_LOCALLY_HEADER;
use crate::messaging::forwarder::{Accept, AcceptBatch, AckRequest, PublishAnswers};
use crate::messaging::local_message::LocalMessage;
use crate::messaging::nats_convert::{check_headers, to_header_map, to_subject};
use crate::ops::stats::PublishOutcome;
use crate::session::outbox::Outbox;
use holdfast_wire::chain::strip_chain_headers;
use holdfast_wire::nats_protocol::header_block_len;
use holdfast_wire::subject::validate_publish_subject;
use holdfast_wire::{
    AckOutcome, ErrorCode, ErrorFrame, Frame, LinkStatus, Ping, Pong, PubAck, Publish, Text,
};

/// Publishes handed to the forwarder at most per hand-over.
const ACCEPT_BATCH: usize = 1024;

/// The forwarder's answers to this session's publishes, as frames in its
/// outbox.
pub(super) struct AnswersToOutbox(pub(super) Outbox);

impl PublishAnswers for AnswersToOutbox {
    fn answer(&self, request: &AckRequest, outcome: AckOutcome) {
        let frame = match outcome {
            // A fire-and-forget publisher hears of a refusal as an ERROR.
            AckOutcome::Rejected { code, message } if request.ack_id == 0 => {
                Frame::Error(ErrorFrame {
                    code,
                    reference: 0,
                    message,
                })
            }
            _ if request.ack_id == 0 => return,
            outcome => Frame::PubAck(PubAck {
                ack_id: request.ack_id,
                outcome,
                local_deliveries: request.local_deliveries,
            }),
        };
        // A session that left no longer needs its answer.
        let _ = self.0.send_ack(frame);
    }
}

impl Session {
    /// A PING is a barrier: everything before it was answered by the
    /// forwarder (journaled, queued or handed to the NATS client), and
    /// flushing the client makes "handed" mean "written". PING is also the
    /// client's keepalive, so the wait is bounded: a slow upstream must not
    /// look like a dead relay.
    pub(super) async fn on_ping(&mut self, ping: Ping) -> Flow {
        let published = std::mem::take(&mut self.published_since_barrier);
        if published {
            let barrier = self.ctx.forwarder.barrier();
            if tokio::time::timeout(BARRIER_FLUSH_TIMEOUT, barrier)
                .await
                .is_err()
            {
                // Not everything was answered: the next PING waits again.
                self.published_since_barrier = true;
            }
        }
        if self.ctx.nats.is_up() {
            // Subscriptions, requests and core class traffic go on the
            // subscriber connection, JetStream classes on the NATS client's.
            let subscribed = std::mem::take(&mut self.subscribed_since_barrier);
            let requested = std::mem::take(&mut self.requested_since_barrier);
            if subscribed || requested {
                // Also when the subscriber connection is still coming back
                // after an outage: its SUBs go out as it connects.
                self.ctx
                    .nats
                    .subscriptions_in_place(BARRIER_FLUSH_TIMEOUT)
                    .await;
            }
            if published {
                self.ctx.nats.flush_publishes(BARRIER_FLUSH_TIMEOUT).await;
            }
        }
        self.send(Frame::Pong(Pong { nonce: ping.nonce })).await
    }

    /// The class of a common publish, which can be taken without an
    /// await: class traffic that passes every check, while NATS is up or
    /// no local subscriber waits. `None` for any other, which
    /// [`Session::on_publish`] handles (and answers, if refused).
    ///
    /// At 800k publishes a second, building the `on_frame` and
    /// `on_publish` futures for each (and moving the frame into each) cost
    /// several per cent of the relay's CPU in `perf`.
    pub(super) fn plain_publish_class(&self, publish: &Publish) -> Option<ClassId> {
        if is_request_traffic(publish) || self.delivers_locally_now() {
            return None;
        }
        self.admit(publish).ok()
    }

    /// The class of a publish, or why it is refused: its class, its
    /// limits, then the access rules. Both paths take a publish through
    /// this, so the fast one cannot let through what the other refuses.
    fn admit(&self, publish: &Publish) -> Result<ClassId, PublishRefused> {
        let class = self
            .ctx
            .classes
            .classify(publish.class.as_deref(), &publish.subject)
            .map_err(PublishRefused::UnknownClass)?;
        if let Some((code, reason)) = check_publish(publish, self.ctx.nats.max_payload()) {
            return Err(PublishRefused::Check(class, code, reason));
        }
        if !self.permissions.may_publish(&publish.subject) {
            return Err(PublishRefused::Denied(class));
        }
        Ok(class)
    }

    /// Takes a publish [`Session::plain_publish_class`] gave `class`; true
    /// when the batch for the forwarder is full (hand it over).
    pub(super) fn accept_plain_publish(&mut self, class: ClassId, publish: Publish) -> bool {
        self.published_since_barrier = true;
        let mut message = LocalMessage {
            subject: publish.subject,
            reply: None,
            headers: publish.headers,
            payload: publish.payload,
        };
        strip_relay_headers(&mut message);
        self.queue_accept(class, message, publish.ack_id, 0);
        self.accepts.len() >= ACCEPT_BATCH
    }

    /// Whether a publish goes to this node's subscribers at once: NATS is
    /// down and somebody here listens.
    fn delivers_locally_now(&self) -> bool {
        !self.ctx.nats.is_up() && self.ctx.router.has_local_subscribers()
    }

    /// Gathers an accepted publish into the batch for the forwarder.
    fn queue_accept(
        &mut self,
        class: ClassId,
        message: LocalMessage,
        ack_id: u64,
        local_deliveries: u32,
    ) {
        self.accepts.push(Accept {
            class,
            message: QueuedMessage {
                subject: message.subject,
                headers: message.headers,
                payload: message.payload,
                // Stamped for the whole batch when it is handed over.
                accepted_at_ms: 0,
            },
            ack: AckRequest {
                ack_id,
                local_deliveries,
                // Only acked publishes are timed.
                received: (ack_id != 0).then_some(self.received_at),
            },
        });
    }

    /// Handles a publish. Class traffic goes to the forwarder, which answers
    /// it; requests and replies (a reply subject, or an `_INBOX.` subject)
    /// are never queued or journaled: a late answer is worse than an error.
    pub(super) async fn on_publish(&mut self, publish: Publish) -> Flow {
        self.published_since_barrier = true;
        let class = match self.admit(&publish) {
            Ok(class) => class,
            Err(PublishRefused::UnknownClass(unknown)) => {
                let classes = &self.ctx.classes;
                let code = ErrorCode::UnknownClass;
                self.ctx
                    .stats
                    .record_rejection(classes.default_class(), code);
                let known: Vec<&str> = classes.names().collect();
                let reason = format!(
                    "unknown message class {unknown:?}; known classes: {}",
                    known.join(", ")
                );
                return self.reject(publish.ack_id, code, reason, 0).await;
            }
            Err(PublishRefused::Check(class, code, reason)) => {
                self.ctx.stats.record_rejection(class, code);
                return self.reject(publish.ack_id, code, reason, 0).await;
            }
            Err(PublishRefused::Denied(class)) => {
                let code = ErrorCode::Unauthorized;
                self.ctx.stats.record_rejection(class, code);
                let reason = self.denied(Operation::Publish, &publish.subject);
                return self.reject(publish.ack_id, code, reason, 0).await;
            }
        };
        let is_request_traffic = is_request_traffic(&publish);
        let mut message = LocalMessage {
            subject: publish.subject,
            reply: publish.reply,
            headers: publish.headers,
            payload: publish.payload,
        };
        strip_relay_headers(&mut message);
        if is_request_traffic {
            return self
                .publish_request_traffic(publish.ack_id, class, message)
                .await;
        }
        let mut local_deliveries = 0;
        if self.delivers_locally_now() {
            // Node-local subscribers get it now; the header keeps them from
            // getting it a second time when the replay reaches NATS.
            local_deliveries = self.ctx.router.deliver_local(message.clone()).await;
            if local_deliveries > 0 {
                message
                    .headers
                    .insert(DELIVERED_LOCALLY_HEADER, self.ctx.relay_id.clone());
            }
        }
        self.queue_accept(class, message, publish.ack_id, local_deliveries);
        if self.accepts.len() >= ACCEPT_BATCH {
            self.flush_accepts().await;
        }
        Flow::Continue
    }

    /// Hands the publishes gathered from this read to the forwarder.
    pub(super) async fn flush_accepts(&mut self) {
        if self.accepts.is_empty() {
            return;
        }
        let mut accepts = std::mem::take(&mut self.accepts);
        // One clock read per hand-over, not per message: the batch is at
        // most one socket read old.
        let accepted_at_ms = crate::util::wall_clock::unix_millis();
        for accept in &mut accepts {
            accept.message.accepted_at_ms = accepted_at_ms;
        }
        let batch = AcceptBatch {
            answers: self.publish_answers.clone(),
            accepts,
        };
        if let Err(refused) = self.ctx.forwarder.accept(batch).await {
            for accept in refused {
                let outcome = AckOutcome::Rejected {
                    code: ErrorCode::ShuttingDown,
                    message: Text::from("relay is shutting down"),
                };
                self.publish_answers.answer(&accept.ack, outcome);
            }
        }
    }

    /// Replies to requests and publishes that carry a reply subject: sent
    /// straight to NATS, or to a local requester, or refused while NATS is down.
    async fn publish_request_traffic(
        &mut self,
        ack_id: u64,
        class: usize,
        message: LocalMessage,
    ) -> Flow {
        if message
            .subject
            .starts_with(self.ctx.router.local_inbox_prefix())
        {
            self.ctx.router.reply_local(message).await;
            self.ctx
                .stats
                .record_publish(class, PublishOutcome::Forwarded);
            return self.ack(ack_id, AckOutcome::Forwarded, 1).await;
        }
        if self.ctx.nats.is_up() {
            return match self.forward(message).await {
                Ok(()) => {
                    self.ctx
                        .stats
                        .record_publish(class, PublishOutcome::Forwarded);
                    self.ack(ack_id, AckOutcome::Forwarded, 0).await
                }
                Err((code, reason)) => {
                    self.ctx.stats.record_rejection(class, code);
                    self.reject(ack_id, code, reason, 0).await
                }
            };
        }
        let delivered = self.ctx.router.deliver_local(message).await;
        self.ctx
            .stats
            .record_rejection(class, ErrorCode::NatsUnavailable);
        let reason = format!(
            "NATS is unreachable and request traffic is never queued; delivered to {delivered} subscriber(s) on this relay"
        );
        self.reject(ack_id, ErrorCode::NatsUnavailable, reason, delivered)
            .await
    }

    async fn forward(&mut self, message: LocalMessage) -> Result<(), (ErrorCode, String)> {
        if let Some(reply) = message.reply {
            // On the connection that holds the reply subscriptions, so
            // nats-server's no-responders answer reaches the requester.
            check_headers(&message.headers)
                .map_err(|error| (ErrorCode::ProtocolViolation, error.to_string()))?;
            self.requested_since_barrier = true;
            return self
                .ctx
                .nats
                .publish_request(message.subject, reply, message.headers, message.payload)
                .await
                .map_err(|reason| (ErrorCode::NatsUnavailable, reason));
        }
        let headers = to_header_map(&message.headers)
            .map_err(|error| (ErrorCode::ProtocolViolation, error.to_string()))?;
        let client = self.ctx.nats.client();
        let subject = to_subject(&message.subject);
        let handover = async move {
            match headers {
                None => client.publish(subject, message.payload).await,
                Some(headers) => {
                    client
                        .publish_with_headers(subject, headers, message.payload)
                        .await
                }
            }
        };
        // The NATS client's queue blocks when its connection stalls; a
        // publish caught there must not hang the session for the whole
        // outage. `biased` keeps the common case free of any watch access:
        // the link check is only built when the handover did not finish at once.
        let link_lost = async {
            let mut link = self.ctx.nats.watch();
            let _ = link
                .wait_for(|snapshot| snapshot.status != LinkStatus::Up)
                .await;
        };
        let result = tokio::select! {
            biased;
            result = handover => result,
            () = link_lost => {
                return Err((
                    ErrorCode::NatsUnavailable,
                    "NATS link went down before the message was handed over; not forwarded".to_string(),
                ));
            }
        };
        result.map_err(|error| (ErrorCode::NatsUnavailable, error.to_string()))
    }
}

/// Why [`Session::admit`] refused a publish.
enum PublishRefused {
    /// No class by the name it gave.
    UnknownClass(String),
    /// Its class, and what [`check_publish`] found.
    Check(ClassId, ErrorCode, String),
    /// Its class; the access rules do not let this client publish there.
    Denied(ClassId),
}

/// What the relay's own headers (sequence chain, message id, local
/// delivery) add to a message's size at most.
pub const RELAY_HEADERS_ALLOWANCE: usize = 256;

/// Requests and replies: a reply subject, or an `_INBOX.` subject.
fn is_request_traffic(publish: &Publish) -> bool {
    publish.reply.is_some() || publish.subject.starts_with("_INBOX.")
}

/// Only the relay stamps chain and local-delivery headers; a client's own
/// are removed, so nobody can forge a chain or hide a message from this
/// relay's subscribers.
fn strip_relay_headers(message: &mut LocalMessage) {
    if message.headers.is_empty() {
        return;
    }
    strip_chain_headers(&mut message.headers);
    message
        .headers
        .0
        .retain(|(name, _)| !name.eq_ignore_ascii_case(DELIVERED_LOCALLY_HEADER));
}

/// Checks a publish before anything is done with it.
fn check_publish(
    publish: &Publish,
    nats_max_payload: Option<usize>,
) -> Option<(ErrorCode, String)> {
    if let Err(error) = check_headers(&publish.headers) {
        return Some((ErrorCode::ProtocolViolation, error.to_string()));
    }
    // NATS refuses a message larger than its max_payload whenever it is
    // sent; refused now, its publisher hears so rather than the relay
    // holding, journaling and then dropping it.
    if let Some(max) = nats_max_payload {
        // A header block counts even when the client sent no headers: the
        // relay's own go into one.
        let headers = header_block_len(None, &publish.headers);
        let size = publish.payload.len() + headers + RELAY_HEADERS_ALLOWANCE;
        if size > max {
            return Some((
                ErrorCode::LimitExceeded,
                format!(
                    "the message is larger than NATS accepts: {size} bytes with its headers and the relay's, max_payload {max}"
                ),
            ));
        }
    }
    if let Err(error) = validate_publish_subject(&publish.subject) {
        return Some((ErrorCode::InvalidSubject, format!("subject: {error}")));
    }
    if let Some(reply) = &publish.reply {
        if let Err(error) = validate_publish_subject(reply) {
            return Some((ErrorCode::InvalidSubject, format!("reply subject: {error}")));
        }
    }
    None
}
