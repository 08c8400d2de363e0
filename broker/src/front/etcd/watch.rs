//! The Watch service: etcd watch streams served by the discovery cache's
//! watches, so they keep working (stale) through an etcd outage and
//! resynchronise after it, with one upstream watch per cached prefix
//! however many clients watch.
//!
//! Each gRPC stream is a pseudo-session of discovery with one outbox its
//! events arrive in. Supported: prefix and single-key watches, cancel,
//! `prev_kv`, the NOPUT/NODELETE filters and progress requests. As with
//! etcd, a stream whose client has closed its sending half keeps
//! delivering events until the client drops it or the connection breaks.
//! `start_revision` is best effort: the cache keeps no history, so a
//! revision the cache has already passed is answered by replaying the
//! cache's current entries as PUT events, and events older than
//! `start_revision` are not sent. The cache keeps no per-key revisions
//! either: while etcd is up the replay asks it for the keys' revisions
//! (keys only), skips keys last changed before `start_revision` and
//! reports the real revisions; a key etcd does not report (etcd down, or
//! a write still buffered) is replayed at the cache's revision. Deletes
//! since `start_revision` cannot be replayed. Watches created with
//! `progress_notify` get an empty response carrying the current revision
//! every 10 minutes, as etcd's default interval. A stream whose events
//! overflow its outbox has its watches canceled (counted and logged), so
//! a client never misses an event without knowing it.

use super::range::{header, prefix_end};
use super::{count, Front, MAX_WATCHES};
use bytes::Bytes;
use etcd_client::proto::{
    PbEvent, PbKeyValue, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse, PbWatchService,
};
use etcd_client::proto::{PbRangeRequest, PbRangeResponse};
use holdfast_wire::{Frame, WatchEvent, WatchEventKind};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

/// Responses queued for one stream, at most.
const RESPONSE_QUEUE: usize = 256;
/// How often watches that asked for it hear the current revision (etcd's
/// default `--experimental-watch-progress-notify-interval`).
const PROGRESS_NOTIFY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);
/// Discovery events queued for one stream, at most; more are dropped and
/// the stream's watches canceled.
const EVENT_QUEUE: usize = 16_384;
/// Events taken from the outbox at once.
const EVENT_BATCH: usize = 512;
/// Discovery session ids of watch streams have this bit set; real
/// sessions count up from 1 and never reach it.
const STREAM_OWNER_BIT: u64 = 1 << 63;
/// etcd's event types.
const EVENT_PUT: i32 = 0;
const EVENT_DELETE: i32 = 1;
/// The upstream RPC the replay of a `start_revision` asks revisions of.
const RANGE: &str = "/etcdserverpb.KV/Range";
/// etcd's watch filter types.
const FILTER_NOPUT: i32 = 0;
const FILTER_NODELETE: i32 = 1;

pub struct WatchService {
    front: Arc<Front>,
}

impl WatchService {
    pub fn new(front: Arc<Front>) -> WatchService {
        WatchService { front }
    }
}

#[tonic::async_trait]
impl PbWatchService for WatchService {
    type WatchStream = ReceiverStream<Result<PbWatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inbound = request.into_inner();
        let (responses, stream) = mpsc::channel(RESPONSE_QUEUE);
        let front = self.front.clone();
        let owner = STREAM_OWNER_BIT | front.streams.fetch_add(1, Ordering::Relaxed);
        let (outbox, events) = front.outboxes.make(owner, EVENT_QUEUE);
        let task = StreamTask {
            front,
            owner,
            outbox,
            responses,
            watches: HashMap::new(),
            by_etcd_id: HashMap::new(),
            next_internal: 0,
            next_auto: 0,
            revision: 0,
        };
        tokio::spawn(task.run(inbound, events));
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

/// One watch of a stream.
struct ClientWatch {
    etcd_id: i64,
    key: Vec<u8>,
    /// Only this exact key (a single-key watch read as a prefix).
    exact: bool,
    start_revision: i64,
    prev_kv: bool,
    /// Wants periodic progress notifications.
    progress_notify: bool,
    no_put: bool,
    no_delete: bool,
    /// The initial entries are still arriving.
    replaying: bool,
    /// Current values, for `prev_kv`.
    values: Option<HashMap<Bytes, Bytes>>,
    /// etcd's create and mod revisions and versions of the keys under the
    /// watch when it was created, for replaying from `start_revision`.
    revisions: HashMap<Bytes, KeyRevisions>,
}

/// A key's revisions as etcd reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyRevisions {
    create: i64,
    modified: i64,
    version: i64,
}

struct StreamTask {
    front: Arc<Front>,
    owner: u64,
    outbox: crate::session::outbox::Outbox,
    responses: mpsc::Sender<Result<PbWatchResponse, Status>>,
    /// By discovery watch id.
    watches: HashMap<u32, ClientWatch>,
    by_etcd_id: HashMap<i64, u32>,
    next_internal: u32,
    next_auto: i64,
    /// The highest revision this stream has reported.
    revision: i64,
}

impl StreamTask {
    async fn run(
        mut self,
        mut inbound: Streaming<PbWatchRequest>,
        mut events: crate::session::outbox::OutboxReceiver,
    ) {
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        // etcd keeps serving a stream's watches after the client closes its
        // sending half (etcd-client does when the caller drops its watcher
        // handle and keeps the event stream): only a broken stream or the
        // client dropping the responses ends it.
        let mut requests_open = true;
        let mut progress = tokio::time::interval_at(
            tokio::time::Instant::now() + PROGRESS_NOTIFY_INTERVAL,
            PROGRESS_NOTIFY_INTERVAL,
        );
        loop {
            tokio::select! {
                _ = self.front.stop.cancelled() => break,
                _ = self.responses.closed() => break,
                _ = progress.tick() => {
                    let revision = self.current_revision();
                    for notification in progress_notifications(self.watches.values(), revision) {
                        if !self.send(notification).await {
                            break;
                        }
                    }
                }
                message = inbound.message(), if requests_open => match message {
                    Ok(Some(request)) => {
                        if !self.on_request(request).await {
                            break;
                        }
                    }
                    Ok(None) => requests_open = false,
                    Err(_) => break,
                },
                received = events.recv_many(&mut batch, EVENT_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    let dropped = events.take_unreported_drops();
                    self.on_events(batch.drain(..)).await;
                    if dropped > 0 {
                        self.fell_behind(dropped).await;
                    }
                }
            }
        }
        self.front.discovery.session_closed(self.owner).await;
        self.forget_all();
    }

    fn current_revision(&mut self) -> i64 {
        self.revision = self.revision.max(self.front.upstream.revision());
        self.revision
    }

    async fn send(&self, response: PbWatchResponse) -> bool {
        self.responses.send(Ok(response)).await.is_ok()
    }

    /// Returns false when the stream must end.
    async fn on_request(&mut self, request: PbWatchRequest) -> bool {
        match request.request_union {
            Some(PbWatchRequestUnion::CreateRequest(create)) => {
                if self.front.watches.load(Ordering::Relaxed) >= MAX_WATCHES {
                    let refused = Err(Status::resource_exhausted(format!(
                        "the relay already serves {MAX_WATCHES} etcd watches"
                    )));
                    count::<()>("watch_create", &refused);
                    if let Err(status) = refused {
                        let _ = self.responses.send(Err(status)).await;
                    }
                    return false;
                }
                if self.watches.len() >= self.front.max_watches_per_stream {
                    self.front
                        .outboxes
                        .stats
                        .record_limit(crate::ops::stats::Limit::Watches);
                    let refused = Err(Status::resource_exhausted(""));
                    count::<()>("watch_create", &refused);
                    let revision = self.current_revision();
                    return self
                        .send(PbWatchResponse {
                            header: Some(header(revision)),
                            watch_id: create.watch_id,
                            created: true,
                            canceled: true,
                            cancel_reason: format!(
                                "this stream already holds {} watches (etcd.max_watches_per_session)",
                                self.front.max_watches_per_stream
                            ),
                            ..PbWatchResponse::default()
                        })
                        .await;
                }
                let etcd_id = if create.watch_id != 0 {
                    create.watch_id
                } else {
                    while self.by_etcd_id.contains_key(&self.next_auto) {
                        self.next_auto += 1;
                    }
                    self.next_auto
                };
                let revision = self.current_revision();
                let refuse = |reason: String| PbWatchResponse {
                    header: Some(header(revision)),
                    watch_id: etcd_id,
                    created: true,
                    canceled: true,
                    cancel_reason: reason,
                    ..PbWatchResponse::default()
                };
                if self.by_etcd_id.contains_key(&etcd_id) {
                    count::<()>("watch_create", &Err(Status::already_exists("")));
                    return self
                        .send(refuse(format!("watch id {etcd_id} is already in use")))
                        .await;
                }
                let (prefix, exact) = if create.range_end.is_empty() {
                    (create.key.clone(), true)
                } else if create.key == [0] && create.range_end == [0] {
                    (Vec::new(), false)
                } else if create.range_end == prefix_end(&create.key) {
                    (create.key.clone(), false)
                } else {
                    count::<()>("watch_create", &Err(Status::unimplemented("")));
                    return self
                        .send(refuse(
                            "holdfast watches one key or a prefix, not an arbitrary range"
                                .to_string(),
                        ))
                        .await;
                };
                let internal = self.next_internal;
                self.next_internal = self.next_internal.wrapping_add(1);
                let send_initial = create.start_revision > 0 || create.prev_kv;
                let revisions = if create.start_revision > 0 {
                    self.key_revisions(&create.key, &create.range_end).await
                } else {
                    HashMap::new()
                };
                let started = self
                    .front
                    .discovery
                    .watch(
                        self.owner,
                        internal,
                        Bytes::from(prefix),
                        send_initial,
                        self.outbox.clone(),
                    )
                    .await;
                if let Err(refused) = started {
                    let status = super::bridge::status_for(refused.code, &refused.message);
                    count::<()>("watch_create", &Err(status));
                    return self.send(refuse(refused.message)).await;
                }
                self.watches.insert(
                    internal,
                    ClientWatch {
                        etcd_id,
                        key: create.key,
                        exact,
                        start_revision: create.start_revision,
                        prev_kv: create.prev_kv,
                        progress_notify: create.progress_notify,
                        no_put: create.filters.contains(&FILTER_NOPUT),
                        no_delete: create.filters.contains(&FILTER_NODELETE),
                        replaying: send_initial,
                        values: create.prev_kv.then(HashMap::new),
                        revisions,
                    },
                );
                self.by_etcd_id.insert(etcd_id, internal);
                self.watch_count_changed(1);
                count::<()>("watch_create", &Ok(()));
                self.send(PbWatchResponse {
                    header: Some(header(revision)),
                    watch_id: etcd_id,
                    created: true,
                    ..PbWatchResponse::default()
                })
                .await
            }
            Some(PbWatchRequestUnion::CancelRequest(cancel)) => {
                count::<()>("watch_cancel", &Ok(()));
                self.cancel(cancel.watch_id, String::new()).await
            }
            Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                count::<()>("watch_progress", &Ok(()));
                let revision = self.current_revision();
                self.send(PbWatchResponse {
                    header: Some(header(revision)),
                    watch_id: -1,
                    ..PbWatchResponse::default()
                })
                .await
            }
            None => true,
        }
    }

    /// etcd's revisions of the keys in `[key, range_end)`, for a replay
    /// from a start revision; empty if etcd cannot say (the replay then
    /// falls back to the cache's revision).
    async fn key_revisions(&self, key: &[u8], range_end: &[u8]) -> HashMap<Bytes, KeyRevisions> {
        if !self.front.upstream.link().is_up() {
            return HashMap::new();
        }
        let read = PbRangeRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            keys_only: true,
            ..PbRangeRequest::default()
        };
        let answer: Result<PbRangeResponse, Status> = self
            .front
            .upstream
            .call(RANGE, "the revisions of a watch's start", read)
            .await;
        match answer {
            Ok(answer) => answer
                .kvs
                .into_iter()
                .map(|kv| {
                    let revisions = KeyRevisions {
                        create: kv.create_revision,
                        modified: kv.mod_revision,
                        version: kv.version,
                    };
                    (Bytes::from(kv.key), revisions)
                })
                .collect(),
            Err(_) => HashMap::new(),
        }
    }

    /// Ends watch `etcd_id` and tells the client why (`reason` may be empty).
    async fn cancel(&mut self, etcd_id: i64, reason: String) -> bool {
        if let Some(internal) = self.by_etcd_id.remove(&etcd_id) {
            self.watches.remove(&internal);
            self.front.discovery.unwatch(self.owner, internal).await;
            self.watch_count_changed(-1);
        }
        let revision = self.current_revision();
        self.send(PbWatchResponse {
            header: Some(header(revision)),
            watch_id: etcd_id,
            canceled: true,
            cancel_reason: reason,
            ..PbWatchResponse::default()
        })
        .await
    }

    async fn fell_behind(&mut self, dropped: u64) {
        metrics::counter!("holdfast_etcd_front_watch_events_dropped_total").increment(dropped);
        warn!(
            stream = self.owner & !STREAM_OWNER_BIT,
            dropped,
            watches = self.watches.len(),
            "an etcd watcher fell behind; its watches are canceled so it watches again"
        );
        let ids: Vec<i64> = self.by_etcd_id.keys().copied().collect();
        for etcd_id in ids {
            let reason = format!(
                "holdfast: the watcher fell behind and {dropped} events were dropped; watch again"
            );
            if !self.cancel(etcd_id, reason).await {
                return;
            }
        }
    }

    async fn on_events(&mut self, frames: impl Iterator<Item = Frame>) {
        // Events per watch, in order, with the highest revision among them.
        let mut pending: Vec<(i64, Vec<PbEvent>, i64)> = Vec::new();
        let mut failed: Vec<(u32, String)> = Vec::new();
        for frame in frames {
            match frame {
                Frame::WatchEvent(event) => {
                    let Some(watch) = self.watches.get_mut(&event.watch_id) else {
                        continue;
                    };
                    let Some((pb, revision)) = translate(watch, event) else {
                        continue;
                    };
                    self.front.upstream.saw_revision(revision);
                    self.revision = self.revision.max(revision);
                    match pending.last_mut() {
                        Some((id, events, highest)) if *id == watch.etcd_id => {
                            events.push(pb);
                            *highest = (*highest).max(revision);
                        }
                        _ => pending.push((watch.etcd_id, vec![pb], revision)),
                    }
                }
                Frame::Error(error) => {
                    if let Ok(internal) = u32::try_from(error.reference) {
                        failed.push((internal, error.message.as_str().to_string()));
                    }
                }
                _ => {}
            }
        }
        for (etcd_id, events, revision) in pending {
            let response = PbWatchResponse {
                header: Some(header(revision)),
                watch_id: etcd_id,
                events,
                ..PbWatchResponse::default()
            };
            if !self.send(response).await {
                return;
            }
        }
        for (internal, reason) in failed {
            if let Some(etcd_id) = self.watches.get(&internal).map(|watch| watch.etcd_id) {
                if !self.cancel(etcd_id, reason).await {
                    return;
                }
            }
        }
    }

    fn watch_count_changed(&self, delta: isize) {
        let now = if delta >= 0 {
            self.front
                .watches
                .fetch_add(delta.unsigned_abs(), Ordering::Relaxed)
                + delta.unsigned_abs()
        } else {
            self.front
                .watches
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed)
                .saturating_sub(delta.unsigned_abs())
        };
        metrics::gauge!("holdfast_etcd_front_watches").set(now as f64);
    }

    fn forget_all(&mut self) {
        let open = self.watches.len();
        self.watches.clear();
        self.by_etcd_id.clear();
        if open > 0 {
            self.watch_count_changed(-(open as isize));
        }
    }
}

/// The etcd event for a discovery event, if the watch wants it.
fn translate(watch: &mut ClientWatch, event: WatchEvent) -> Option<(PbEvent, i64)> {
    if event.kind == WatchEventKind::Synced {
        watch.replaying = false;
        watch.revisions = HashMap::new();
        return None;
    }
    if watch.exact && event.key.as_ref() != watch.key.as_slice() {
        return None;
    }
    let revision = i64::try_from(event.revision).unwrap_or(i64::MAX);
    let is_put = event.kind == WatchEventKind::Put;
    let previous = watch.values.as_mut().and_then(|values| {
        if is_put {
            values.insert(event.key.clone(), event.value.clone())
        } else {
            values.remove(&event.key)
        }
    });
    // A replayed key etcd reported is sent with its own revisions, and
    // only if it changed since the start revision.
    let known = if watch.replaying && is_put {
        watch.revisions.get(&event.key).copied()
    } else {
        None
    };
    let wanted = match known {
        Some(known) => watch.start_revision <= known.modified,
        // The cache has passed the requested revision: replay its state.
        None if watch.replaying => watch.start_revision > 0 && watch.start_revision <= revision,
        None => watch.start_revision <= revision,
    };
    if !wanted || (is_put && watch.no_put) || (!is_put && watch.no_delete) {
        return None;
    }
    let prev_kv = previous.filter(|_| watch.prev_kv).map(|value| PbKeyValue {
        key: event.key.to_vec(),
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        value: value.to_vec(),
        lease: 0,
    });
    let kv = match known {
        Some(known) => PbKeyValue {
            key: event.key.to_vec(),
            create_revision: known.create,
            mod_revision: known.modified,
            version: known.version,
            value: event.value.to_vec(),
            lease: 0,
        },
        None => PbKeyValue {
            key: event.key.to_vec(),
            create_revision: if is_put { revision } else { 0 },
            mod_revision: revision,
            version: i64::from(is_put),
            value: event.value.to_vec(),
            lease: 0,
        },
    };
    Some((
        PbEvent {
            r#type: if is_put { EVENT_PUT } else { EVENT_DELETE },
            kv: Some(kv),
            prev_kv,
        },
        revision,
    ))
}

/// The empty responses that tell each watch asking for progress how far
/// the stream has come; skipped for a watch still replaying its start.
fn progress_notifications<'a>(
    watches: impl Iterator<Item = &'a ClientWatch>,
    revision: i64,
) -> Vec<PbWatchResponse> {
    watches
        .filter(|watch| watch.progress_notify && !watch.replaying)
        .map(|watch| PbWatchResponse {
            header: Some(header(revision)),
            watch_id: watch.etcd_id,
            ..PbWatchResponse::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(start_revision: i64, replaying: bool, prev_kv: bool) -> ClientWatch {
        ClientWatch {
            etcd_id: 0,
            key: b"p/".to_vec(),
            exact: false,
            start_revision,
            prev_kv,
            progress_notify: false,
            no_put: false,
            no_delete: false,
            replaying,
            values: prev_kv.then(HashMap::new),
            revisions: HashMap::new(),
        }
    }

    #[test]
    fn progress_goes_only_to_settled_watches_that_asked_for_it() {
        let mut asked = watch(0, false, false);
        asked.etcd_id = 7;
        asked.progress_notify = true;
        let mut replaying = watch(5, true, false);
        replaying.etcd_id = 8;
        replaying.progress_notify = true;
        let quiet = watch(0, false, false);
        let sent = progress_notifications([&asked, &replaying, &quiet].into_iter(), 42);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].watch_id, 7);
        assert_eq!(
            sent[0].header.as_ref().map(|header| header.revision),
            Some(42)
        );
        assert!(sent[0].events.is_empty());
    }

    fn event(kind: WatchEventKind, key: &str, value: &str, revision: u64) -> WatchEvent {
        WatchEvent {
            watch_id: 0,
            revision,
            kind,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    #[test]
    fn an_old_start_revision_replays_the_cached_state_a_newer_one_skips_it() {
        let mut old = watch(3, true, false);
        assert!(translate(&mut old, event(WatchEventKind::Put, "p/a", "1", 10)).is_some());
        let mut newer = watch(11, true, false);
        assert!(translate(&mut newer, event(WatchEventKind::Put, "p/a", "1", 10)).is_none());
        translate(&mut newer, event(WatchEventKind::Synced, "", "", 10));
        assert!(!newer.replaying);
        assert!(
            translate(&mut newer, event(WatchEventKind::Put, "p/a", "2", 11)).is_some(),
            "live events from start_revision on"
        );
    }

    #[test]
    fn a_replay_skips_keys_etcd_reports_older_than_the_start_revision() {
        let mut replay = watch(3, true, false);
        let at = |modified| KeyRevisions {
            create: 2,
            modified,
            version: 1,
        };
        replay.revisions.insert(Bytes::from_static(b"p/old"), at(2));
        replay.revisions.insert(Bytes::from_static(b"p/new"), at(4));
        assert!(translate(&mut replay, event(WatchEventKind::Put, "p/old", "1", 10)).is_none());
        let (sent, _) =
            translate(&mut replay, event(WatchEventKind::Put, "p/new", "1", 10)).unwrap();
        let kv = sent.kv.unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (2, 4));
        // A key etcd did not report is replayed at the cache's revision.
        let (unknown, revision) = translate(
            &mut replay,
            event(WatchEventKind::Put, "p/buffered", "1", 10),
        )
        .unwrap();
        assert_eq!((unknown.kv.unwrap().mod_revision, revision), (10, 10));
        // Live events are not affected by the replay's revisions.
        translate(&mut replay, event(WatchEventKind::Synced, "", "", 10));
        let (live, _) =
            translate(&mut replay, event(WatchEventKind::Put, "p/old", "2", 11)).unwrap();
        assert_eq!(live.kv.unwrap().mod_revision, 11);
    }

    #[test]
    fn prev_kv_comes_from_the_values_seen_and_deletes_carry_it() {
        let mut watching = watch(0, true, true);
        assert!(
            translate(&mut watching, event(WatchEventKind::Put, "p/a", "1", 5)).is_none(),
            "seeding entries are not sent without a start revision"
        );
        translate(&mut watching, event(WatchEventKind::Synced, "", "", 5));
        let (deleted, revision) =
            translate(&mut watching, event(WatchEventKind::Delete, "p/a", "", 6)).unwrap();
        assert_eq!(revision, 6);
        assert_eq!(deleted.r#type, EVENT_DELETE);
        assert_eq!(deleted.prev_kv.map(|kv| kv.value), Some(b"1".to_vec()));
    }

    #[test]
    fn single_key_watches_and_filters_drop_other_events() {
        let mut single = watch(0, false, false);
        single.exact = true;
        single.key = b"p/a".to_vec();
        assert!(translate(&mut single, event(WatchEventKind::Put, "p/ab", "1", 5)).is_none());
        assert!(translate(&mut single, event(WatchEventKind::Put, "p/a", "1", 5)).is_some());
        let mut no_put = watch(0, false, false);
        no_put.no_put = true;
        assert!(translate(&mut no_put, event(WatchEventKind::Put, "p/a", "1", 5)).is_none());
        assert!(translate(&mut no_put, event(WatchEventKind::Delete, "p/a", "", 6)).is_some());
    }
}
