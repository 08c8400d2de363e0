//! Publish acknowledgements: what the relay did with a message.

use crate::error::{Error, Result};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// Where an acknowledged publish went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckStatus {
    /// Handed to NATS.
    Forwarded,
    /// Durably written to the relay's journal; reaches NATS later.
    Journaled,
    /// Held in the relay's memory queue; reaches NATS later.
    Queued,
}

/// The relay's acknowledgement of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub outcome: AckStatus,
    /// Subscribers on this relay that received the message directly.
    pub local_deliveries: u32,
}

/// Resolves to the relay's acknowledgement of one publish.
///
/// A publish the relay rejected resolves to [`Error::Relay`] with its code;
/// one whose connection died first resolves to [`Error::ConnectionLost`].
#[derive(Debug)]
#[must_use = "an AckFuture does nothing unless awaited; drop it to ignore the outcome"]
pub struct AckFuture {
    receiver: oneshot::Receiver<Result<Ack>>,
}

impl AckFuture {
    pub(crate) fn new(receiver: oneshot::Receiver<Result<Ack>>) -> AckFuture {
        AckFuture { receiver }
    }
}

impl Future for AckFuture {
    type Output = Result<Ack>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Ack>> {
        Pin::new(&mut self.receiver)
            .poll(cx)
            .map(|received| received.unwrap_or(Err(Error::Closed)))
    }
}
