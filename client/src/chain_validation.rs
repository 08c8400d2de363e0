//! `ValidatedStream`: a subscription's messages checked against the relay's
//! sequence chain, with breaks reported in the stream.
//!
//! Relays stamp messages that went through their outage journal with a
//! per-(relay, subject) sequence and running digest (see
//! [`holdfast_wire::chain`] and `PROTOCOL.md`). A consumer that must not
//! build on a broken stream (a KV router mirroring a worker's cache) wraps
//! its subscription with [`Subscriber::validate_chain`] and learns of a lost,
//! reordered or corrupted message as a [`Validated::Break`] instead of
//! silently diverging.

use crate::message::Message;
use crate::subscription::Subscriber;
use futures::Stream;
use holdfast_wire::chain::{ChainCheck, ChainHeaderError, ChainValidator};
use holdfast_wire::Text;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

impl Subscriber {
    /// Checks this subscription's messages against the relay's sequence
    /// chain: lost, reordered or corrupted messages become
    /// [`Validated::Break`](crate::Validated::Break) items and duplicates
    /// are dropped. Opt-in, because only consumers that mirror a stream
    /// (e.g. a KV router) need it.
    pub fn validate_chain(self) -> ValidatedSubscriber {
        ValidatedStream::new(self)
    }
}

/// One item of a [`ValidatedStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validated {
    /// A message that continues its chain, starts one, or is unstamped.
    Message(Message),
    /// The chain of one (relay, subject) broke. The message that revealed
    /// the break follows as the next item, so the consumer sees what
    /// arrived and decides; after a [`ChainBreak::Mismatch`] its payload is
    /// suspect.
    Break(ChainBreak),
}

/// How a (relay, subject) chain broke: what was expected against what came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// Sequence numbers `expected..got` are missing: lost, or (arriving
    /// later) out of order. Validation continues from `got`.
    Gap {
        relay: Text,
        subject: Text,
        expected: u64,
        got: u64,
    },
    /// Message `seq` does not hash to the digest the relay stamped: its
    /// payload or its chain header changed on the way.
    Mismatch {
        relay: Text,
        subject: Text,
        seq: u64,
        expected_digest: u64,
        got_digest: u64,
    },
    /// A message carries chain headers that cannot be read, so its place
    /// in the chain is unknown (the next message of that chain will
    /// usually also report a gap).
    Malformed {
        subject: Text,
        reason: ChainHeaderError,
    },
}

impl ChainBreak {
    /// The subject whose stream broke (the consumer resyncs its source).
    pub fn subject(&self) -> &Text {
        match self {
            ChainBreak::Gap { subject, .. }
            | ChainBreak::Mismatch { subject, .. }
            | ChainBreak::Malformed { subject, .. } => subject,
        }
    }

    /// The relay that stamped the chain, when the headers said.
    pub fn relay(&self) -> Option<&Text> {
        match self {
            ChainBreak::Gap { relay, .. } | ChainBreak::Mismatch { relay, .. } => Some(relay),
            ChainBreak::Malformed { .. } => None,
        }
    }
}

/// A [`Subscriber`] whose messages are checked against the sequence chain.
pub type ValidatedSubscriber = ValidatedStream<Subscriber>;

/// Any stream of [`Message`]s, checked against the sequence chain.
///
/// Messages that continue, start or restart their chain pass through, as do
/// unstamped ones (they never went through a journal). A break yields a
/// [`Validated::Break`] followed by the message that revealed it. Duplicates
/// (a sequence number already passed, from at-least-once replay) are dropped
/// and counted in [`ValidatedStream::duplicates`].
#[derive(Debug)]
pub struct ValidatedStream<S> {
    inner: S,
    validator: ChainValidator,
    /// The message that revealed the break just yielded, due next.
    pending: Option<Message>,
    duplicates: u64,
}

impl<S> ValidatedStream<S> {
    /// Validates `inner` with a validator of default capacity
    /// ([`holdfast_wire::chain::DEFAULT_MAX_CHAINS`] chains).
    pub fn new(inner: S) -> ValidatedStream<S> {
        ValidatedStream::with_validator(inner, ChainValidator::default())
    }

    /// Validates `inner` with `validator` (e.g. one sized for more chains).
    pub fn with_validator(inner: S, validator: ChainValidator) -> ValidatedStream<S> {
        ValidatedStream {
            inner,
            validator,
            pending: None,
            duplicates: 0,
        }
    }

    /// Duplicate messages dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The validator, e.g. for its eviction count.
    pub fn validator(&self) -> &ChainValidator {
        &self.validator
    }

    /// The wrapped stream (for a [`Subscriber`]: its sid, drop count,
    /// termination).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gives back the wrapped stream (e.g. to unsubscribe). A message held
    /// back behind a just-yielded break is lost with the validator.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Stream<Item = Message> + Unpin> Stream for ValidatedStream<S> {
    type Item = Validated;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Validated>> {
        let this = &mut *self;
        if let Some(message) = this.pending.take() {
            return Poll::Ready(Some(Validated::Message(message)));
        }
        loop {
            let Some(message) = ready!(Pin::new(&mut this.inner).poll_next(cx)) else {
                return Poll::Ready(None);
            };
            let check =
                this.validator
                    .observe(&message.subject, &message.headers, &message.payload);
            let broken = match check {
                ChainCheck::Unstamped | ChainCheck::Ok | ChainCheck::First => {
                    return Poll::Ready(Some(Validated::Message(message)));
                }
                ChainCheck::Duplicate { .. } => {
                    this.duplicates += 1;
                    continue;
                }
                ChainCheck::Gap {
                    relay,
                    subject,
                    expected,
                    got,
                } => ChainBreak::Gap {
                    relay,
                    subject,
                    expected,
                    got,
                },
                ChainCheck::Mismatch {
                    relay,
                    subject,
                    seq,
                    expected_digest,
                    got_digest,
                } => ChainBreak::Mismatch {
                    relay,
                    subject,
                    seq,
                    expected_digest,
                    got_digest,
                },
                ChainCheck::Malformed { reason } => ChainBreak::Malformed {
                    subject: message.subject.clone(),
                    reason,
                },
            };
            this.pending = Some(message);
            return Poll::Ready(Some(Validated::Break(broken)));
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let pending = usize::from(self.pending.is_some());
        let (_, upper) = self.inner.size_hint();
        // Duplicates shrink the stream and breaks grow it (at most doubling it).
        (
            pending,
            upper.and_then(|upper| upper.checked_mul(2)?.checked_add(pending)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::StreamExt;
    use holdfast_wire::chain::{ChainStamper, HEADER_SEQ};
    use holdfast_wire::Headers;

    fn stamped(stamper: &mut ChainStamper, subject: &str, payload: &'static str) -> Message {
        let mut headers = Headers::new();
        stamper.stamp(subject, payload.as_bytes(), &mut headers);
        Message {
            subject: Text::from(subject),
            reply: None,
            headers,
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    fn unstamped(subject: &str, payload: &'static str) -> Message {
        Message {
            subject: Text::from(subject),
            reply: None,
            headers: Headers::new(),
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    async fn validate(messages: Vec<Message>) -> (Vec<Validated>, u64) {
        let mut stream = ValidatedStream::new(futures::stream::iter(messages));
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(item);
        }
        (items, stream.duplicates())
    }

    #[tokio::test]
    async fn an_intact_stream_passes_unchanged_with_unstamped_messages() {
        let mut stamper = ChainStamper::new(Text::from("relay-1"), 16);
        let messages = vec![
            stamped(&mut stamper, "kv", "a"),
            unstamped("kv", "live"),
            stamped(&mut stamper, "kv", "b"),
            stamped(&mut stamper, "other", "c"),
        ];
        let (items, duplicates) = validate(messages.clone()).await;
        let expected: Vec<_> = messages.into_iter().map(Validated::Message).collect();
        assert_eq!(items, expected);
        assert_eq!(duplicates, 0);
    }

    #[tokio::test]
    async fn a_lost_message_is_a_break_before_the_message_that_revealed_it() {
        let mut stamper = ChainStamper::new(Text::from("relay-1"), 16);
        let a = stamped(&mut stamper, "kv", "a");
        let _lost = stamped(&mut stamper, "kv", "b");
        let c = stamped(&mut stamper, "kv", "c");
        let d = stamped(&mut stamper, "kv", "d");
        let (items, _) = validate(vec![a.clone(), c.clone(), d.clone()]).await;
        let gap = ChainBreak::Gap {
            relay: Text::from("relay-1"),
            subject: Text::from("kv"),
            expected: 2,
            got: 3,
        };
        assert_eq!(gap.subject(), "kv");
        assert_eq!(gap.relay().map(Text::as_str), Some("relay-1"));
        assert_eq!(
            items,
            [
                Validated::Message(a),
                Validated::Break(gap),
                Validated::Message(c),
                Validated::Message(d),
            ]
        );
    }

    #[tokio::test]
    async fn duplicates_are_dropped_and_counted() {
        let mut stamper = ChainStamper::new(Text::from("relay-1"), 16);
        let a = stamped(&mut stamper, "kv", "a");
        let b = stamped(&mut stamper, "kv", "b");
        let c = stamped(&mut stamper, "kv", "c");
        // b replayed right away, then again after c (at-least-once replay).
        let delivered = vec![a.clone(), b.clone(), b.clone(), c.clone(), b.clone()];
        let (items, duplicates) = validate(delivered).await;
        assert_eq!(
            items,
            [
                Validated::Message(a),
                Validated::Message(b),
                Validated::Message(c),
            ]
        );
        assert_eq!(duplicates, 2);
    }

    #[tokio::test]
    async fn a_swap_is_a_gap_and_the_overtaken_message_is_dropped_as_behind() {
        let mut stamper = ChainStamper::new(Text::from("relay-1"), 16);
        let a = stamped(&mut stamper, "kv", "a");
        let b = stamped(&mut stamper, "kv", "b");
        let c = stamped(&mut stamper, "kv", "c");
        let (items, duplicates) = validate(vec![a.clone(), c.clone(), b]).await;
        assert_eq!(
            items,
            [
                Validated::Message(a),
                Validated::Break(ChainBreak::Gap {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    expected: 2,
                    got: 3,
                }),
                Validated::Message(c),
            ]
        );
        assert_eq!(duplicates, 1);
    }

    #[tokio::test]
    async fn an_altered_payload_is_a_mismatch_with_expected_and_got() {
        let mut stamper = ChainStamper::new(Text::from("relay-1"), 16);
        let a = stamped(&mut stamper, "kv", "a");
        let mut b = stamped(&mut stamper, "kv", "b");
        b.payload = Bytes::from_static(b"B");
        let (items, _) = validate(vec![a.clone(), b.clone()]).await;
        let first = holdfast_wire::chain::chain_digest(0, b"a");
        assert_eq!(
            items,
            [
                Validated::Message(a),
                Validated::Break(ChainBreak::Mismatch {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    seq: 2,
                    expected_digest: holdfast_wire::chain::chain_digest(first, b"B"),
                    got_digest: holdfast_wire::chain::chain_digest(first, b"b"),
                }),
                Validated::Message(b),
            ]
        );
    }

    #[tokio::test]
    async fn malformed_chain_headers_are_a_break() {
        let mut message = unstamped("kv", "a");
        message.headers.insert(HEADER_SEQ, "1");
        let (items, _) = validate(vec![message.clone()]).await;
        assert_eq!(
            items,
            [
                Validated::Break(ChainBreak::Malformed {
                    subject: Text::from("kv"),
                    reason: ChainHeaderError::Missing {
                        header: holdfast_wire::chain::HEADER_RELAY,
                    },
                }),
                Validated::Message(message),
            ]
        );
    }
}
