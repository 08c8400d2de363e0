//! What handles ask of the connection task.

use crate::ack::Ack;
use crate::discovery::Snapshot;
use crate::error::Result;
use crate::message::{Message, Reply};
use crate::registration::RegistrationWaiter;
use crate::stream_state::{SubscriptionState, WatchState};
use crate::watch_event::WatchEvent;
use bytes::Bytes;
use holdfast_wire::{Frame, Text};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// How many commands may wait for the connection task; senders wait beyond
/// that, which is the client's backpressure.
pub(crate) const COMMAND_QUEUE_CAPACITY: usize = 1024;

pub(crate) enum Command {
    Publish(OutgoingPublish),
    Subscribe {
        subscription: NewSubscription,
        /// Answered after the relay's PONG for the barrier behind the
        /// SUBSCRIBE, or with the relay's ERROR for the sid.
        confirmed: oneshot::Sender<Result<()>>,
    },
    Unsubscribe {
        sid: u32,
        done: Option<oneshot::Sender<()>>,
    },
    Request {
        request_id: u64,
        /// A `Frame::Request` carrying `request_id`.
        frame: Frame,
        reply: oneshot::Sender<Result<Reply>>,
    },
    Flush {
        done: oneshot::Sender<Result<()>>,
    },
    Status {
        reply: oneshot::Sender<Result<Bytes>>,
    },
    /// Desired state: answered with the relay's ack, or `Buffered` at once
    /// while disconnected.
    Register {
        key: Bytes,
        value: Bytes,
        reply: RegistrationWaiter,
    },
    Deregister {
        key: Bytes,
        reply: RegistrationWaiter,
    },
    Get {
        linearizable: bool,
        prefix: Bytes,
        reply: oneshot::Sender<Result<Snapshot>>,
    },
    Watch {
        watch: NewWatch,
        /// Answered like `Subscribe::confirmed`.
        confirmed: oneshot::Sender<Result<()>>,
    },
    Unwatch {
        id: u32,
        done: Option<oneshot::Sender<()>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A publish on its way to the relay, possibly via the offline buffer.
pub(crate) struct OutgoingPublish {
    /// Always a `Frame::Publish`, kept as a `Frame` so it encodes without
    /// being moved again.
    pub(crate) frame: Frame,
    /// Bytes on the wire, counted against the offline buffer's byte bound.
    pub(crate) encoded_len: usize,
    pub(crate) ack: Option<AckWaiter>,
    /// Present when the handle saw the relay disconnected: it waits to learn
    /// whether the publish was buffered, failed, or (reconnected meanwhile)
    /// written.
    pub(crate) enqueued: Option<oneshot::Sender<Result<()>>>,
}

pub(crate) struct AckWaiter {
    pub(crate) ack_id: u64,
    pub(crate) sender: oneshot::Sender<Result<Ack>>,
}

pub(crate) struct NewSubscription {
    pub(crate) sid: u32,
    pub(crate) subject: Text,
    pub(crate) queue_group: Option<Text>,
    pub(crate) sender: mpsc::Sender<Message>,
    pub(crate) state: Arc<SubscriptionState>,
}

pub(crate) struct NewWatch {
    /// From the subscription id counter, so ERROR references stay unambiguous.
    pub(crate) id: u32,
    pub(crate) prefix: Bytes,
    pub(crate) sender: mpsc::Sender<WatchEvent>,
    pub(crate) state: Arc<WatchState>,
}
