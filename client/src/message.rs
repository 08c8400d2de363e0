//! Messages in both directions, and request replies.

use bytes::Bytes;
use holdfast_wire::{Headers, Text};

/// A message delivered to a [`Subscriber`](crate::Subscriber).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: Text,
    pub reply: Option<Text>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// A message to publish, with optional class, headers and reply subject.
///
/// ```
/// # use holdfast_client::OutboundMessage;
/// let message = OutboundMessage::new("prefill.requests", "payload")
///     .class("prefill")
///     .header("trace-id", "abc")
///     .reply("_INBOX.1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    pub subject: Text,
    pub payload: Bytes,
    pub headers: Headers,
    pub reply: Option<Text>,
    /// The relay's message class (e.g. `prefill`); `None` lets the relay
    /// classify by subject.
    pub class: Option<Text>,
}

impl OutboundMessage {
    pub fn new(subject: impl Into<Text>, payload: impl Into<Bytes>) -> OutboundMessage {
        OutboundMessage {
            subject: subject.into(),
            payload: payload.into(),
            headers: Headers::new(),
            reply: None,
            class: None,
        }
    }

    pub fn class(mut self, class: impl Into<Text>) -> Self {
        self.class = Some(class.into());
        self
    }

    /// Appends a header (names may repeat).
    pub fn header(mut self, name: impl Into<Text>, value: impl Into<Text>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Replaces all headers.
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    pub fn reply(mut self, reply: impl Into<Text>) -> Self {
        self.reply = Some(reply.into());
        self
    }
}

/// The answer to a [`Client::request`](crate::Client::request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub headers: Headers,
    pub payload: Bytes,
}
