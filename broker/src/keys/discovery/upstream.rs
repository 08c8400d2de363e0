//! One upstream etcd watch per cached prefix, re-established whenever the
//! link comes back.
//!
//! On every (re)connect the task asks etcd for its current revision (a
//! count-only read of the prefix). A cache that never synced, or an etcd
//! whose revision went backwards (it came back empty), gets a full listing;
//! otherwise the watch resumes right after the last revision the cache saw,
//! so every change made in between is delivered as an event. If etcd
//! compacted that history away, the task lists again and the cache hands
//! watchers the difference instead.
//!
//! A watch whose member dies (a cluster member killed) is resumed on the
//! member the link moved to, from the last revision seen, without listing
//! the prefix again. The cache is only reported stale when that takes
//! longer than `grace` (the link's own `link_timeout`) or the link goes
//! down: a member dying is not an outage, and the resumed watch delivers
//! every change made in between.
//!
//! etcd's answers are decoded up to a limit derived from the cache's byte
//! budget (gRPC's default, 4 MiB, would make a larger prefix fail to list
//! forever); a prefix whose listing or watch response exceeds it is
//! reported once as too large and the task ends.

use super::cache::Change;
use crate::keys::etcd::link::EtcdLink;
use bytes::Bytes;
use etcd_client::{GetOptions, WatchOptions};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// etcd's `mvccpb.Event.EventType` values.
const EVENT_PUT: i32 = 0;
const EVENT_DELETE: i32 = 1;

/// What the watch reports to the discovery task.
#[derive(Debug)]
pub enum Upstream {
    /// A full listing of the prefix at `revision`.
    Listed {
        prefix: Bytes,
        entries: Vec<(Bytes, Bytes)>,
        revision: u64,
    },
    /// The watch is established: the cache is confirmed from here on.
    Watching { prefix: Bytes },
    /// Changes, in etcd's order; `revision` is the last one's.
    Changes {
        prefix: Bytes,
        changes: Vec<Change>,
        revision: u64,
    },
    /// The watch broke; the cache is stale until `Watching` again.
    Lost { prefix: Bytes },
    /// An answer for the prefix was larger than `decode_limit`; the task
    /// has ended.
    TooLarge { prefix: Bytes, detail: String },
}

/// Whether `error` is gRPC refusing a message over the decode limit.
fn is_too_large(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::OutOfRange
            && status.message().contains("message length too large"))
}

/// Why a watch stream ended.
enum WatchEnd {
    /// A new link generation: the cache is stale until watched again.
    NewGeneration,
    /// The stream broke (its member died): resume elsewhere within grace.
    Broke,
    /// The history is gone or unreadable: list the prefix again.
    Relist,
}

/// A watch that ended and has not been resumed yet.
struct Interruption {
    since: Instant,
    reported: bool,
}

/// Follows `prefix` from `revision` (0: never synced) until the discovery
/// task goes away or aborts it; answers larger than `decode_limit` bytes
/// end it with [`Upstream::TooLarge`].
pub async fn follow(
    prefix: Bytes,
    mut revision: u64,
    link: EtcdLink,
    report: mpsc::Sender<Upstream>,
    call_timeout: Duration,
    decode_limit: usize,
    grace: Duration,
) {
    let too_large = |error: &etcd_client::Error| Upstream::TooLarge {
        prefix: prefix.clone(),
        detail: error.to_string(),
    };
    let mut state = link.watch();
    let mut must_list = revision == 0;
    let mut interrupted: Option<Interruption> = None;
    loop {
        // A watch not resumed within the grace (or with the link down) is
        // an interruption the cache must own up to.
        if let Some(interruption) = interrupted.as_mut() {
            let overdue = interruption.since.elapsed() >= grace || !link.is_up();
            if overdue && !interruption.reported {
                interruption.reported = true;
                if report
                    .send(Upstream::Lost {
                        prefix: prefix.clone(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let (client, generation) = match state.wait_for(|state| state.client.is_some()).await {
            Ok(state) => (state.client.clone(), state.generation),
            Err(_) => return,
        };
        let Some(client) = client else {
            continue;
        };
        let mut kv = client.kv_client().max_decoding_message_size(decode_limit);
        // Only the revision is needed unless the entries are.
        let with_entries = must_list;
        let options = if with_entries {
            GetOptions::new().with_prefix()
        } else {
            GetOptions::new().with_prefix().with_count_only()
        };
        let listing =
            tokio::time::timeout(call_timeout, kv.get(prefix.to_vec(), Some(options))).await;
        let listing = match listing {
            Ok(Ok(listing)) => listing,
            Ok(Err(error)) if is_too_large(&error) => {
                let _ = report.send(too_large(&error)).await;
                return;
            }
            Ok(Err(error)) => {
                debug!(error = %error, "listing a discovery prefix failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let current = listing
            .header()
            .map_or(0, |header| header.revision().max(0) as u64);
        link.saw_revision(i64::try_from(current).unwrap_or(i64::MAX));
        if current < revision {
            warn!(
                prefix = %String::from_utf8_lossy(&prefix),
                cached_revision = revision,
                etcd_revision = current,
                "etcd's revision went backwards (restored or wiped); re-listing the prefix"
            );
            must_list = true;
        }
        if must_list && !with_entries {
            continue;
        }
        if must_list {
            let entries = listing
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        Bytes::copy_from_slice(kv.key()),
                        Bytes::copy_from_slice(kv.value()),
                    )
                })
                .collect();
            revision = current;
            must_list = false;
            if report
                .send(Upstream::Listed {
                    prefix: prefix.clone(),
                    entries,
                    revision,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(i64::try_from(revision + 1).unwrap_or(i64::MAX));
        let mut watch = client
            .watch_client()
            .max_decoding_message_size(decode_limit);
        let mut stream = match watch.watch(prefix.to_vec(), Some(options)).await {
            Ok(stream) => stream,
            Err(error) => {
                debug!(error = %error, "starting a discovery watch failed; retrying");
                link.call_failed();
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let end = loop {
            let message = tokio::select! {
                message = stream.message() => message,
                // A new link generation means a new connection: follow it.
                changed = state.wait_for(|state| state.generation != generation) => {
                    if changed.is_err() {
                        return;
                    }
                    break WatchEnd::NewGeneration;
                }
            };
            let response = match message {
                Ok(Some(response)) => response,
                Err(error) if is_too_large(&error) => {
                    let _ = report.send(too_large(&error)).await;
                    return;
                }
                Ok(None) | Err(_) => break WatchEnd::Broke,
            };
            if response.compact_revision() > 0 || response.canceled() {
                info!(
                    prefix = %String::from_utf8_lossy(&prefix),
                    from_revision = revision + 1,
                    compacted_to = response.compact_revision(),
                    "etcd compacted the history the watch needed; re-listing the prefix"
                );
                must_list = true;
                break WatchEnd::Relist;
            }
            if response.created() {
                interrupted = None;
                if report
                    .send(Upstream::Watching {
                        prefix: prefix.clone(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let mut unknown_event = None;
            let changes: Vec<Change> = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    let key = Bytes::copy_from_slice(kv.key());
                    let at = kv.mod_revision().max(0) as u64;
                    // The raw type: etcd-client's `event_type` panics on a
                    // value other than PUT (0) and DELETE (1), which only a
                    // broken or impostor etcd sends.
                    match event.0.r#type {
                        EVENT_PUT => Some(Change::put(key, Bytes::copy_from_slice(kv.value()), at)),
                        EVENT_DELETE => Some(Change::delete(key, at)),
                        other => {
                            unknown_event = Some(other);
                            None
                        }
                    }
                })
                .collect();
            if let Some(event_type) = unknown_event {
                warn!(
                    prefix = %String::from_utf8_lossy(&prefix),
                    event_type,
                    "etcd sent a watch event of an unknown type; re-listing the prefix"
                );
                must_list = true;
                break WatchEnd::Relist;
            }
            // Only events advance the resume point: a response's header
            // revision can run ahead of catch-up events still to come.
            let last_event = changes.last().map_or(0, |change| change.revision);
            revision = revision.max(last_event);
            link.saw_revision(i64::try_from(last_event).unwrap_or(i64::MAX));
            if !changes.is_empty()
                && report
                    .send(Upstream::Changes {
                        prefix: prefix.clone(),
                        changes,
                        revision,
                    })
                    .await
                    .is_err()
            {
                return;
            }
        };
        match end {
            WatchEnd::Broke => {
                link.call_failed();
                interrupted.get_or_insert(Interruption {
                    since: Instant::now(),
                    reported: false,
                });
            }
            WatchEnd::NewGeneration | WatchEnd::Relist => {
                interrupted = Some(Interruption {
                    since: Instant::now(),
                    reported: true,
                });
                if report
                    .send(Upstream::Lost {
                        prefix: prefix.clone(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
