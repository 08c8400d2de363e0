//! `Subscriber`: the stream of messages for one subscription.

use crate::command::Command;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::stream_state::SubscriptionState;
use futures::Stream;
use holdfast_wire::Text;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot};

/// The messages of one subscription, as a [`Stream`].
///
/// The connection task never waits for a subscriber: when this subscriber's
/// channel is full, further messages are dropped and counted in
/// [`Subscriber::dropped`]. The stream ends when the subscription ends
/// (unsubscribed, closed client, or refused by the relay — see
/// [`Subscriber::termination`]). Dropping a `Subscriber` unsubscribes.
#[derive(Debug)]
pub struct Subscriber {
    sid: u32,
    subject: Text,
    messages: mpsc::Receiver<Message>,
    state: Arc<SubscriptionState>,
    commands: mpsc::Sender<Command>,
    /// Whether dropping must still tell the connection task to unsubscribe.
    unsubscribe_on_drop: bool,
}

impl Subscriber {
    pub(crate) fn new(
        sid: u32,
        subject: Text,
        messages: mpsc::Receiver<Message>,
        state: Arc<SubscriptionState>,
        commands: mpsc::Sender<Command>,
    ) -> Subscriber {
        Subscriber {
            sid,
            subject,
            messages,
            state,
            commands,
            unsubscribe_on_drop: true,
        }
    }

    /// The subscription id on the wire (stable across reconnects).
    pub fn sid(&self) -> u32 {
        self.sid
    }

    /// The subject (pattern) subscribed to.
    pub fn subject(&self) -> &Text {
        &self.subject
    }

    /// Messages this client dropped because this subscriber did not keep up.
    pub fn dropped(&self) -> u64 {
        self.state.dropped()
    }

    /// Why the subscription ended, when the relay ended it or the client
    /// closed; `None` while it is live.
    pub fn termination(&self) -> Option<&Error> {
        self.state.termination()
    }

    /// Ends the subscription and waits until the connection task has
    /// dropped it (the UNSUBSCRIBE is then on its way to the relay).
    pub async fn unsubscribe(mut self) -> Result<()> {
        self.unsubscribe_on_drop = false;
        let (done, unsubscribed) = oneshot::channel();
        self.commands
            .send(Command::Unsubscribe {
                sid: self.sid,
                done: Some(done),
            })
            .await
            .map_err(|_| Error::Closed)?;
        unsubscribed.await.map_err(|_| Error::Closed)
    }

    /// Gives up the subscription without telling the connection task, which
    /// has already forgotten it.
    pub(crate) fn forget(mut self) {
        self.unsubscribe_on_drop = false;
    }
}

impl Stream for Subscriber {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.messages.poll_recv(cx)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if self.unsubscribe_on_drop {
            // Best effort: if the command queue is full, the connection task
            // still unsubscribes when it finds this subscriber's channel closed.
            let _ = self.commands.try_send(Command::Unsubscribe {
                sid: self.sid,
                done: None,
            });
        }
    }
}
