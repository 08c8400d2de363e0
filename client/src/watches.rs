//! The connection task's live watches: desired state kept across
//! connections, event delivery to watchers, and resyncs.
//!
//! A watch is known by the id its [`Watcher`](crate::Watcher) was created
//! with. On the wire it starts under that id and moves to a fresh one when
//! it is resynced after dropped events, so events still in flight for the
//! abandoned wire id cannot be mistaken for the new snapshot. Watch ids
//! come from the same counter as subscription ids, so the `reference` of an
//! ERROR frame names one or the other, never both.
//!
//! This type decides which frames to send and which events to deliver;
//! the connection task writes the frames.

use crate::command::NewWatch;
use crate::error::Error;
use crate::stream_state::WatchState;
use crate::watch_event::WatchEvent;
use crate::watch_view::WatchView;
use bytes::Bytes;
use holdfast_wire::{Frame, Unwatch, Watch, WatchEventKind};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

struct LiveWatch {
    /// The id the relay knows this watch by on the current connection.
    wire_id: u32,
    prefix: Bytes,
    sender: mpsc::Sender<WatchEvent>,
    state: Arc<WatchState>,
    view: WatchView,
    /// Events were dropped for a full channel. The relay's events for the
    /// current wire id are ignored from then on: a fresh snapshot, requested
    /// once the watcher has caught up, supersedes them.
    needs_resync: bool,
}

impl LiveWatch {
    fn watch_frame(&self) -> Frame {
        Frame::Watch(Watch {
            watch_id: self.wire_id,
            send_initial: true,
            prefix: self.prefix.clone(),
        })
    }
}

/// What offering one event to a watcher came to.
enum Offer {
    Delivered,
    Dropped,
    WatcherGone,
}

#[derive(Default)]
pub(crate) struct Watches {
    /// By the id the watcher was created with.
    live: HashMap<u32, LiveWatch>,
    /// Current wire id → the id the watcher was created with.
    by_wire_id: HashMap<u32, u32>,
}

impl Watches {
    /// Adds a watch and returns its WATCH frame (always with `send_initial`).
    pub(crate) fn insert(&mut self, watch: NewWatch) -> Frame {
        let NewWatch {
            id,
            prefix,
            sender,
            state,
        } = watch;
        let mut view = WatchView::default();
        view.begin_snapshot();
        let live = LiveWatch {
            wire_id: id,
            prefix,
            sender,
            state,
            view,
            needs_resync: false,
        };
        let frame = live.watch_frame();
        self.by_wire_id.insert(id, id);
        self.live.insert(id, live);
        frame
    }

    /// Removes a watch the relay does not have (refused, or never sent).
    pub(crate) fn forget(&mut self, id: u32) {
        if let Some(watch) = self.live.remove(&id) {
            self.by_wire_id.remove(&watch.wire_id);
        }
    }

    /// Removes a watch and returns the UNWATCH that tells the relay.
    pub(crate) fn remove(&mut self, id: u32) -> Option<Frame> {
        let watch = self.live.remove(&id)?;
        self.by_wire_id.remove(&watch.wire_id);
        Some(Frame::Unwatch(Unwatch {
            watch_id: watch.wire_id,
        }))
    }

    /// The watch an ERROR `reference` (a wire id) is about, if any.
    pub(crate) fn id_for_wire_id(&self, wire_id: u32) -> Option<u32> {
        self.by_wire_id.get(&wire_id).copied()
    }

    /// Ends a watch because the relay refused it or the client closed: its
    /// stream ends and [`Watcher::termination`](crate::Watcher::termination)
    /// says why.
    pub(crate) fn terminate(&mut self, id: u32, reason: Error) {
        if let Some(watch) = self.live.remove(&id) {
            self.by_wire_id.remove(&watch.wire_id);
            watch.state.terminate(reason);
        }
    }

    pub(crate) fn terminate_all(&mut self, reason: impl Fn() -> Error) {
        self.by_wire_id.clear();
        for (_, watch) in self.live.drain() {
            watch.state.terminate(reason());
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// The prefix of watch `id`, for logs.
    pub(crate) fn prefix(&self, id: u32) -> Option<&Bytes> {
        self.live.get(&id).map(|watch| &watch.prefix)
    }

    /// A new session has none of our watches: WATCH frames for every live
    /// one, each starting a snapshot that will also report the keys deleted
    /// while the watcher was not told.
    pub(crate) fn replay(&mut self) -> Vec<Frame> {
        self.forget_closed();
        let mut ids: Vec<u32> = self.live.keys().copied().collect();
        ids.sort_unstable();
        let mut frames = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(watch) = self.live.get_mut(&id) {
                watch.needs_resync = false;
                watch.view.begin_snapshot();
                frames.push(watch.watch_frame());
            }
        }
        frames
    }

    /// Delivers one event from the relay; returns an UNWATCH when the
    /// watcher turned out to be gone.
    pub(crate) fn deliver(&mut self, event: holdfast_wire::WatchEvent) -> Option<Frame> {
        let holdfast_wire::WatchEvent {
            watch_id: wire_id,
            revision,
            kind,
            key,
            value,
        } = event;
        let Some(id) = self.id_for_wire_id(wire_id) else {
            // Normal just after an unwatch or a resync: the relay had it in flight.
            debug!(
                watch_id = wire_id,
                "watch event for a watch that no longer exists"
            );
            return None;
        };
        let watch = self.live.get_mut(&id)?;
        match kind {
            WatchEventKind::Put => watch.view.observe_put(&key),
            WatchEventKind::Delete => watch.view.observe_delete(&key),
            WatchEventKind::Synced => {}
        }
        if watch.needs_resync {
            return None;
        }
        let events = match kind {
            WatchEventKind::Put => vec![WatchEvent::Put {
                key,
                value,
                revision,
            }],
            WatchEventKind::Delete => vec![WatchEvent::Delete { key, revision }],
            WatchEventKind::Synced => {
                let mut events: Vec<WatchEvent> = watch
                    .view
                    .finish_snapshot()
                    .into_iter()
                    .map(|key| WatchEvent::Delete { key, revision })
                    .collect();
                events.push(WatchEvent::Synced { revision });
                events
            }
        };
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            match offer(watch, event) {
                Offer::Delivered => {}
                Offer::Dropped => {
                    // The rest would leave the watcher with a gap it cannot
                    // see (a SYNCED after a dropped DELETE); the resync
                    // delivers them instead.
                    for _ in events {
                        watch.state.count_dropped();
                    }
                    break;
                }
                Offer::WatcherGone => return self.remove(id),
            }
        }
        None
    }

    /// The relay reported dropping frames for this connection (a slow
    /// consumer) without saying which: any watch may have lost events, so
    /// every one asks for a fresh snapshot once its watcher has caught up.
    pub(crate) fn relay_dropped(&mut self) {
        for watch in self.live.values_mut() {
            watch.needs_resync = true;
        }
    }

    /// For every watch that dropped events and whose watcher has since
    /// emptied its channel: UNWATCH the old wire id and WATCH again under a
    /// fresh one from `next_wire_id`. Waiting for an empty channel keeps a
    /// watcher that is still behind from dropping the new snapshot too.
    pub(crate) fn resync_caught_up(&mut self, mut next_wire_id: impl FnMut() -> u32) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (id, watch) in &mut self.live {
            let caught_up = watch.sender.capacity() == watch.sender.max_capacity();
            if !watch.needs_resync || !caught_up || watch.sender.is_closed() {
                continue;
            }
            let old_wire_id = watch.wire_id;
            self.by_wire_id.remove(&old_wire_id);
            watch.wire_id = next_wire_id();
            self.by_wire_id.insert(watch.wire_id, *id);
            watch.needs_resync = false;
            watch.view.begin_snapshot();
            let resyncs = watch.state.count_resync();
            info!(
                watch_id = *id,
                prefix = %String::from_utf8_lossy(&watch.prefix),
                resyncs,
                "watcher caught up after dropped events; requesting a fresh snapshot"
            );
            frames.push(Frame::Unwatch(Unwatch {
                watch_id: old_wire_id,
            }));
            frames.push(watch.watch_frame());
        }
        frames
    }

    /// UNWATCH frames for watchers dropped without telling us, except the
    /// ones in `unconfirmed` (their `watch` call is still deciding).
    pub(crate) fn sweep_abandoned(&mut self, unconfirmed: impl Fn(u32) -> bool) -> Vec<Frame> {
        let abandoned: Vec<u32> = self
            .live
            .iter()
            .filter(|(id, watch)| watch.sender.is_closed() && !unconfirmed(**id))
            .map(|(id, _)| *id)
            .collect();
        abandoned
            .into_iter()
            .filter_map(|id| self.remove(id))
            .collect()
    }

    fn forget_closed(&mut self) {
        let closed: Vec<u32> = self
            .live
            .iter()
            .filter(|(_, watch)| watch.sender.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in closed {
            self.forget(id);
        }
    }
}

fn offer(watch: &mut LiveWatch, event: WatchEvent) -> Offer {
    // The view must learn what reached the watcher, and the event itself
    // moves into the channel.
    let effect = match &event {
        WatchEvent::Put { key, .. } => Some((true, key.clone())),
        WatchEvent::Delete { key, .. } => Some((false, key.clone())),
        WatchEvent::Synced { .. } => None,
    };
    match watch.sender.try_send(event) {
        Ok(()) => match effect {
            Some((true, key)) => watch.view.delivered_put(&key),
            Some((false, key)) => watch.view.delivered_delete(&key),
            None => {}
        },
        Err(mpsc::error::TrySendError::Full(_)) => {
            watch.needs_resync = true;
            let total = watch.state.count_dropped();
            // Logged at powers of two so a stuck watcher is visible without
            // one log line per dropped event.
            if total.is_power_of_two() {
                warn!(
                    watch_id = watch.wire_id,
                    prefix = %String::from_utf8_lossy(&watch.prefix),
                    dropped_total = total,
                    "watcher is not keeping up; dropping events and resyncing once it catches up"
                );
            }
            return Offer::Dropped;
        }
        Err(mpsc::error::TrySendError::Closed(_)) => return Offer::WatcherGone,
    }
    Offer::Delivered
}
