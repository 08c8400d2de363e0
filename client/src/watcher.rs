//! `Watcher`: the stream of changes under one watched key prefix.

use crate::command::Command;
use crate::error::{Error, Result};
use crate::stream_state::WatchState;
pub use crate::watch_event::WatchEvent;
use bytes::Bytes;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot};

/// The changes under one key prefix, as a [`Stream`] of [`WatchEvent`]s,
/// from [`Client::watch`](crate::Client::watch).
///
/// It starts with the prefix's current entries as `Put` events followed by
/// one `Synced`, then live changes. Applying the events in order always
/// converges to etcd's state, also across disruptions:
///
/// - After a reconnect to the relay (a new session) the watch is
///   re-established and the current entries are replayed as `Put`s followed
///   by `Synced`. Keys that disappeared meanwhile arrive as `Delete`s (at the
///   `Synced` revision) just before that `Synced`.
/// - The connection task never waits for a watcher: when this watcher's
///   channel (capacity [`ConnectOptions::subscription_capacity`]) is full,
///   events are dropped and counted in [`Watcher::dropped`]. Once the
///   watcher has caught up (its channel is empty), the client asks the relay
///   for a fresh snapshot and replays it the same way as after a reconnect
///   (counted in [`Watcher::resyncs`]). A snapshot arrives in one burst, so
///   the capacity should exceed the number of entries under the prefix.
///
/// A `Put` may therefore repeat a value the watcher already has. The stream
/// ends when the watch ends (unwatched, closed client, or refused by the
/// relay — see [`Watcher::termination`]). Dropping a `Watcher` unwatches.
///
/// [`ConnectOptions::subscription_capacity`]: crate::ConnectOptions::subscription_capacity
#[derive(Debug)]
pub struct Watcher {
    id: u32,
    prefix: Bytes,
    events: mpsc::Receiver<WatchEvent>,
    state: Arc<WatchState>,
    commands: mpsc::Sender<Command>,
    /// Whether dropping must still tell the connection task to unwatch.
    unwatch_on_drop: bool,
}

impl Watcher {
    pub(crate) fn new(
        id: u32,
        prefix: Bytes,
        events: mpsc::Receiver<WatchEvent>,
        state: Arc<WatchState>,
        commands: mpsc::Sender<Command>,
    ) -> Watcher {
        Watcher {
            id,
            prefix,
            events,
            state,
            commands,
            unwatch_on_drop: true,
        }
    }

    /// The id this watch was created with (the `watch_id` of its first
    /// WATCH frame; a resync after dropped events uses a fresh one on the wire).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The key prefix watched.
    pub fn prefix(&self) -> &Bytes {
        &self.prefix
    }

    /// Events this client dropped because this watcher did not keep up.
    pub fn dropped(&self) -> u64 {
        self.state.dropped()
    }

    /// Snapshots re-requested because events were dropped.
    pub fn resyncs(&self) -> u64 {
        self.state.resyncs()
    }

    /// Why the watch ended, when the relay ended it or the client closed;
    /// `None` while it is live.
    pub fn termination(&self) -> Option<&Error> {
        self.state.termination()
    }

    /// Ends the watch and waits until the connection task has dropped it
    /// (the UNWATCH is then on its way to the relay).
    pub async fn unwatch(mut self) -> Result<()> {
        self.unwatch_on_drop = false;
        let (done, unwatched) = oneshot::channel();
        self.commands
            .send(Command::Unwatch {
                id: self.id,
                done: Some(done),
            })
            .await
            .map_err(|_| Error::Closed)?;
        unwatched.await.map_err(|_| Error::Closed)
    }

    /// Gives up the watch without telling the connection task, which has
    /// already forgotten it.
    pub(crate) fn forget(mut self) {
        self.unwatch_on_drop = false;
    }
}

impl Stream for Watcher {
    type Item = WatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.unwatch_on_drop {
            // Best effort: if the command queue is full, the connection task
            // still unwatches when it finds this watcher's channel closed.
            let _ = self.commands.try_send(Command::Unwatch {
                id: self.id,
                done: None,
            });
        }
    }
}
