//! Discovery: GET and WATCH of etcd prefixes, answered from the relay's
//! cache.
//!
//! One task owns every cached prefix and every client watch. Each cached
//! prefix has one upstream etcd watch ([`upstream::follow`]) however many
//! clients read or watch under it; a GET or WATCH of a narrower prefix is
//! served by a cached wider one. Configured prefixes are cached at start,
//! others on first use, up to `max_cached_prefixes` (the least recently
//! used one without watchers makes room), and up to `max_cached_bytes` of
//! keys and values (a prefix that does not fit is refused, and the same
//! prefix is refused at once for a while rather than listed again). The
//! watches of one session hold at most `max_cached_prefixes_per_session`
//! cached prefixes, so that one client cannot take every slot (a watched
//! prefix is never evicted) and leave the others none. While
//! etcd is unreachable the cache answers flagged stale with its age, and
//! watches stay open; the cache is saved in the data dir so a restarted
//! relay answers too.

mod cache;
mod persist;
mod session_pins;
mod upstream;

use crate::config::EtcdConfig;
use crate::keys::etcd::link::EtcdLink;
use crate::ops::stats::bump;
use crate::session::outbox::Outbox;
use crate::util::drop_log::DropLog;
use crate::util::reply::Reply;
use crate::util::wall_clock::unix_millis;
use bytes::Bytes;
use cache::{Change, PrefixCache};
use etcd_client::GetOptions;
use holdfast_wire::{
    ErrorCode, Frame, GetOutcome, KeyValue, LinkStatus, Snapshot, Text, WatchEvent, WatchEventKind,
};
use session_pins::SessionPins;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use upstream::Upstream;

/// Commands waiting for the discovery task, at most.
const COMMAND_QUEUE: usize = 8192;
/// How often a changed cache is saved.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a linearizable GET, or a GET waiting for a prefix's first
/// listing, waits for etcd.
const LINEARIZABLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a prefix refused for its size is refused at once, without
/// listing it again (each listing costs etcd the whole prefix).
const REFUSED_FOR: Duration = Duration::from_secs(10);

type SessionId = u64;
type WatchKey = (SessionId, u32);

/// Counters and gauges for metrics and the status document.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    pub prefixes: AtomicU64,
    pub entries: AtomicU64,
    pub watchers: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub linearizable_gets: AtomicU64,
    /// Largest age of a stale cached prefix, in milliseconds (0: all fresh).
    pub max_stale_ms: AtomicU64,
    pub relists: AtomicU64,
    /// Bytes of keys and values cached, across all prefixes.
    pub bytes: AtomicU64,
    /// GETs and watches refused because their prefix did not fit
    /// `max_cached_bytes`.
    pub refused: AtomicU64,
    /// GETs and watches refused because every cached prefix is watched
    /// (`max_cached_prefixes`).
    pub slots_full: AtomicU64,
    /// Watches refused because their session's watches already hold
    /// `max_cached_prefixes_per_session` prefixes.
    pub session_limit: AtomicU64,
}

/// Why a watch was not started; the caller tells its client (before it
/// answers anything sent after the WATCH).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WatchRefused {
    pub code: ErrorCode,
    pub message: String,
}

impl WatchRefused {
    fn new(code: ErrorCode, message: impl Into<String>) -> WatchRefused {
        WatchRefused {
            code,
            message: message.into(),
        }
    }
}

/// Where a GET's answer goes: a session turns it into its client's
/// GET_RESPONSE, the etcd front end into a gRPC answer.
pub struct GetTo(Reply<GetOutcome>);

impl GetTo {
    pub fn new(reply: Reply<GetOutcome>) -> GetTo {
        GetTo(reply)
    }

    fn answer(self, outcome: GetOutcome) {
        self.0.send(outcome);
    }

    fn fail(self, code: ErrorCode, message: &str) {
        self.answer(GetOutcome::Failed {
            code,
            message: Text::from(message),
        });
    }
}

enum Command {
    Get {
        prefix: Bytes,
        to: GetTo,
    },
    Watch {
        key: WatchKey,
        prefix: Bytes,
        send_initial: bool,
        outbox: Outbox,
        reply: oneshot::Sender<Result<(), WatchRefused>>,
    },
    Unwatch {
        key: WatchKey,
    },
    SessionClosed {
        session: SessionId,
    },
}

/// Sessions' way into discovery.
#[derive(Clone)]
pub struct DiscoveryHandle {
    commands: Option<mpsc::Sender<Command>>,
    link: EtcdLink,
    pub stats: Arc<DiscoveryStats>,
}

impl DiscoveryHandle {
    /// Discovery that refuses everything: etcd is not configured.
    pub fn disabled() -> DiscoveryHandle {
        DiscoveryHandle {
            commands: None,
            link: EtcdLink::disabled(),
            stats: Arc::default(),
        }
    }

    /// Answers a GET of `prefix` from the cache.
    pub async fn get(&self, prefix: Bytes, to: GetTo) {
        let Some(commands) = &self.commands else {
            return to.fail(ErrorCode::EtcdUnavailable, NOT_CONFIGURED);
        };
        if let Err(error) = commands.send(Command::Get { prefix, to }).await {
            if let Command::Get { to, .. } = error.0 {
                to.fail(ErrorCode::ShuttingDown, "the relay is shutting down");
            }
        }
    }

    /// Answers a GET of `prefix` from etcd itself, never stale. `permit`
    /// (the session's in-flight limit) is held until it is answered.
    pub fn get_linearizable(&self, prefix: Bytes, to: GetTo, permit: OwnedSemaphorePermit) {
        if !self.link.is_enabled() {
            return to.fail(ErrorCode::EtcdUnavailable, NOT_CONFIGURED);
        }
        let Some(mut client) = self.link.client() else {
            return to.fail(
                ErrorCode::EtcdUnavailable,
                "etcd is unreachable; a linearizable get is not answered from the cache",
            );
        };
        bump(&self.stats.linearizable_gets);
        let link = self.link.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let read = client.get(prefix.to_vec(), Some(GetOptions::new().with_prefix()));
            match tokio::time::timeout(LINEARIZABLE_TIMEOUT, read).await {
                Ok(Ok(listing)) => to.answer(GetOutcome::Snapshot(Snapshot {
                    revision: listing
                        .header()
                        .map_or(0, |header| header.revision().max(0) as u64),
                    stale: false,
                    age_ms: 0,
                    entries: listing
                        .kvs()
                        .iter()
                        .map(|kv| KeyValue {
                            key: Bytes::copy_from_slice(kv.key()),
                            value: Bytes::copy_from_slice(kv.value()),
                        })
                        .collect(),
                })),
                Ok(Err(error)) => {
                    link.call_failed();
                    to.fail(ErrorCode::EtcdUnavailable, &error.to_string())
                }
                Err(_) => {
                    link.call_failed();
                    to.fail(
                        ErrorCode::EtcdUnavailable,
                        "etcd did not answer the linearizable get in time",
                    )
                }
            }
        });
    }

    /// Starts watch `watch_id` of `session` on `prefix`; events go to
    /// `outbox`. Returns once the watch is started or refused, so that the
    /// caller's refusal reaches its client before any later answer.
    pub async fn watch(
        &self,
        session: SessionId,
        watch_id: u32,
        prefix: Bytes,
        send_initial: bool,
        outbox: Outbox,
    ) -> Result<(), WatchRefused> {
        let shutting_down =
            || WatchRefused::new(ErrorCode::ShuttingDown, "the relay is shutting down");
        let Some(commands) = &self.commands else {
            return Err(WatchRefused::new(
                ErrorCode::EtcdUnavailable,
                NOT_CONFIGURED,
            ));
        };
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::Watch {
                key: (session, watch_id),
                prefix,
                send_initial,
                outbox,
                reply,
            })
            .await
            .map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }

    pub async fn unwatch(&self, session: SessionId, watch_id: u32) {
        if let Some(commands) = &self.commands {
            let _ = commands
                .send(Command::Unwatch {
                    key: (session, watch_id),
                })
                .await;
        }
    }

    pub async fn session_closed(&self, session: SessionId) {
        if let Some(commands) = &self.commands {
            let _ = commands.send(Command::SessionClosed { session }).await;
        }
    }
}

const NOT_CONFIGURED: &str = "etcd is not configured on this relay (--etcd)";

/// Starts discovery over `link`, restoring the cache saved at `path`.
/// Returns the handle and the task, which saves the cache once more when
/// `stop` fires.
pub fn start(
    config: &EtcdConfig,
    link: EtcdLink,
    path: PathBuf,
    stop: CancellationToken,
) -> (DiscoveryHandle, Option<JoinHandle<()>>) {
    if !link.is_enabled() {
        return (DiscoveryHandle::disabled(), None);
    }
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    let (report, reports) = mpsc::channel(1024);
    let stats = Arc::new(DiscoveryStats::default());
    let mut task = DiscoveryTask {
        caches: BTreeMap::new(),
        watchers: HashMap::new(),
        link: link.clone(),
        report,
        max_prefixes: config.max_cached_prefixes,
        pins: SessionPins::new(config.max_cached_prefixes_per_session),
        session_limit_log: DropLog::default(),
        slots_full_log: DropLog::default(),
        max_bytes: config.max_cached_bytes,
        refused: HashMap::new(),
        call_timeout: (config.probe_timeout * 4).max(Duration::from_secs(2)),
        watch_grace: config.link_timeout,
        path,
        dirty: false,
        stats: stats.clone(),
    };
    task.restore(&config.prefixes);
    let handle = tokio::spawn(task.run(receiver, reports, stop));
    (
        DiscoveryHandle {
            commands: Some(commands),
            link,
            stats,
        },
        Some(handle),
    )
}

/// A cached prefix and who uses it.
struct CachedPrefix {
    cache: PrefixCache,
    upstream: Option<AbortHandle>,
    /// Whether the upstream watch is established.
    watching: bool,
    configured: bool,
    last_used: Instant,
    watchers: Vec<WatchKey>,
    /// GETs waiting for the first listing, with when they arrived.
    waiting: Vec<(Bytes, GetTo, Instant)>,
}

struct ClientWatch {
    prefix: Bytes,
    cache_prefix: Bytes,
    outbox: Outbox,
    /// Still owed the initial entries (the cache has not loaded yet).
    owes_initial: bool,
}

struct DiscoveryTask {
    caches: BTreeMap<Bytes, CachedPrefix>,
    watchers: HashMap<WatchKey, ClientWatch>,
    link: EtcdLink,
    report: mpsc::Sender<Upstream>,
    max_prefixes: usize,
    /// The cached prefixes each session's watches hold.
    pins: SessionPins,
    /// Refusals for the per-session and the relay's prefix limits are
    /// logged at most once per interval each (a client may retry in a loop).
    session_limit_log: DropLog,
    slots_full_log: DropLog,
    max_bytes: usize,
    /// Prefixes refused for their size, and when.
    refused: HashMap<Bytes, Instant>,
    call_timeout: Duration,
    /// How long a watch whose member died may take to resume elsewhere
    /// before its prefix is reported stale.
    watch_grace: Duration,
    path: PathBuf,
    dirty: bool,
    stats: Arc<DiscoveryStats>,
}

impl DiscoveryTask {
    /// Loads the saved cache and adds the configured prefixes.
    fn restore(&mut self, configured: &[String]) {
        match persist::load(&self.path) {
            Ok(saved) => {
                let mut bytes = 0;
                for prefix in saved {
                    let cache = prefix.into_cache();
                    // The budget may have been lowered since the save.
                    if self.caches.len() < self.max_prefixes
                        && bytes + cache.bytes() <= self.max_bytes
                    {
                        bytes += cache.bytes();
                        self.insert(cache, false);
                    }
                }
                if !self.caches.is_empty() {
                    info!(
                        prefixes = self.caches.len(),
                        path = %self.path.display(),
                        "discovery cache restored (stale until etcd confirms it)"
                    );
                }
            }
            Err(error) => warn!(
                path = %self.path.display(),
                error = %error,
                "discovery cache file unreadable; starting with an empty cache"
            ),
        }
        for prefix in configured {
            let prefix = Bytes::copy_from_slice(prefix.as_bytes());
            match self.caches.get_mut(&prefix) {
                Some(cached) => cached.configured = true,
                None => self.insert(PrefixCache::new(prefix), true),
            }
        }
    }

    fn insert(&mut self, cache: PrefixCache, configured: bool) {
        let prefix = cache.prefix().clone();
        let upstream = tokio::spawn(upstream::follow(
            prefix.clone(),
            cache.revision(),
            self.link.clone(),
            self.report.clone(),
            self.call_timeout,
            // etcd's encoding adds a few dozen bytes per entry to what the
            // budget counts; an answer twice the budget cannot fit anyway.
            self.max_bytes.saturating_mul(2).saturating_add(1 << 20),
            self.watch_grace,
        ));
        self.caches.insert(
            prefix,
            CachedPrefix {
                cache,
                upstream: Some(upstream.abort_handle()),
                watching: false,
                configured,
                last_used: Instant::now(),
                watchers: Vec::new(),
                waiting: Vec::new(),
            },
        );
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut reports: mpsc::Receiver<Upstream>,
        stop: CancellationToken,
    ) {
        let mut link = self.link.watch();
        let mut save_ticker = tokio::time::interval(SAVE_INTERVAL);
        save_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saving: Option<JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(report) = reports.recv() => self.on_upstream(report),
                changed = link.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let up = link.borrow_and_update().link.status == LinkStatus::Up;
                    self.on_link(up);
                }
                _ = save_ticker.tick() => {
                    let idle = saving.as_ref().is_none_or(JoinHandle::is_finished);
                    if self.dirty && idle {
                        saving = Some(self.save());
                    }
                    self.expire_waiting_gets();
                }
            }
            self.publish_gauges();
        }
        for cached in self.caches.values() {
            if let Some(upstream) = &cached.upstream {
                upstream.abort();
            }
        }
        if let Some(saving) = saving {
            let _ = saving.await;
        }
        if self.dirty {
            let _ = self.save().await;
        }
        debug!("discovery stopped");
    }

    fn save(&mut self) -> JoinHandle<()> {
        self.dirty = false;
        let saved: Vec<persist::SavedPrefix> = self
            .caches
            .values()
            .filter(|cached| cached.cache.is_loaded())
            .map(|cached| persist::SavedPrefix::from_cache(&cached.cache))
            .collect();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = persist::save(&path, saved) {
                warn!(path = %path.display(), error = %error, "cannot save the discovery cache");
            }
        })
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Get { prefix, to } => self.on_get(prefix, to),
            Command::Watch {
                key,
                prefix,
                send_initial,
                outbox,
                reply,
            } => {
                let _ = reply.send(self.on_watch(key, prefix, send_initial, outbox));
            }
            Command::Unwatch { key } => self.remove_watch(key),
            Command::SessionClosed { session } => {
                let keys: Vec<WatchKey> = self
                    .watchers
                    .keys()
                    .filter(|(owner, _)| *owner == session)
                    .copied()
                    .collect();
                for key in keys {
                    self.remove_watch(key);
                }
            }
        }
    }

    fn on_get(&mut self, prefix: Bytes, to: GetTo) {
        if let Some(message) = self.recently_refused(&prefix) {
            bump(&self.stats.refused);
            return to.fail(ErrorCode::LimitExceeded, &message);
        }
        let Some(cache_prefix) = self.cache_for(&prefix) else {
            bump(&self.stats.misses);
            self.slots_full();
            return to.fail(
                ErrorCode::LimitExceeded,
                "every cached prefix is in use (etcd.max_cached_prefixes)",
            );
        };
        let link_up = self.link.is_up();
        let Some(cached) = self.caches.get_mut(&cache_prefix) else {
            return to.fail(ErrorCode::Internal, "discovery cache vanished");
        };
        cached.last_used = Instant::now();
        if cached.cache.is_loaded() {
            bump(&self.stats.hits);
            let snapshot = cached.cache.snapshot(&prefix, unix_millis());
            to.answer(GetOutcome::Snapshot(snapshot));
        } else if link_up {
            bump(&self.stats.misses);
            cached.waiting.push((prefix, to, Instant::now()));
        } else {
            bump(&self.stats.misses);
            to.fail(
                ErrorCode::EtcdUnavailable,
                "etcd is unreachable and this prefix was never cached",
            );
        }
    }

    fn on_watch(
        &mut self,
        key: WatchKey,
        prefix: Bytes,
        send_initial: bool,
        outbox: Outbox,
    ) -> Result<(), WatchRefused> {
        self.remove_watch(key);
        if let Some(message) = self.recently_refused(&prefix) {
            bump(&self.stats.refused);
            return Err(WatchRefused::new(ErrorCode::LimitExceeded, message));
        }
        if !self.pins.admits(key.0, self.covering(&prefix).as_ref()) {
            let held = self.pins.held(key.0);
            bump(&self.stats.session_limit);
            let total = self.stats.session_limit.load(Ordering::Relaxed);
            if let Some(since) = self.session_limit_log.due(total, Instant::now()) {
                warn!(
                    session = key.0,
                    prefix = %String::from_utf8_lossy(&prefix),
                    held,
                    refused_since_last_line = since,
                    "a watch refused: its connection's watches already hold etcd.max_cached_prefixes_per_session cached prefixes"
                );
            }
            return Err(WatchRefused::new(
                ErrorCode::LimitExceeded,
                format!(
                    "this connection's watches already hold {held} cached prefixes (etcd.max_cached_prefixes_per_session, at most {} per connection); watch a prefix that covers several",
                    self.pins.max_per_session()
                ),
            ));
        }
        let Some(cache_prefix) = self.cache_for(&prefix) else {
            self.slots_full();
            return Err(WatchRefused::new(
                ErrorCode::LimitExceeded,
                "every cached prefix is in use (etcd.max_cached_prefixes)",
            ));
        };
        let Some(cached) = self.caches.get_mut(&cache_prefix) else {
            return Err(WatchRefused::new(
                ErrorCode::Internal,
                "discovery cache vanished",
            ));
        };
        cached.last_used = Instant::now();
        cached.watchers.push(key);
        self.pins.pin(key.0, cache_prefix.clone());
        let mut watch = ClientWatch {
            prefix,
            cache_prefix,
            outbox,
            owes_initial: send_initial,
        };
        if send_initial && cached.cache.is_loaded() {
            send_initial_entries(&cached.cache, key.1, &mut watch);
        }
        self.watchers.insert(key, watch);
        Ok(())
    }

    /// Counts (and at most once per interval logs) a GET or watch refused
    /// because every cached prefix is watched.
    fn slots_full(&mut self) {
        bump(&self.stats.slots_full);
        let total = self.stats.slots_full.load(Ordering::Relaxed);
        if let Some(since) = self.slots_full_log.due(total, Instant::now()) {
            warn!(
                max_cached_prefixes = self.max_prefixes,
                refused_since_last_line = since,
                "a GET or watch of a new prefix refused: every cached prefix is watched (etcd.max_cached_prefixes)"
            );
        }
    }

    fn remove_watch(&mut self, key: WatchKey) {
        let Some(watch) = self.watchers.remove(&key) else {
            return;
        };
        if let Some(cached) = self.caches.get_mut(&watch.cache_prefix) {
            cached.watchers.retain(|other| *other != key);
        }
        self.pins.unpin(key.0, &watch.cache_prefix);
    }

    /// The cached prefix that covers `prefix` now (the narrowest), if any.
    fn covering(&self, prefix: &Bytes) -> Option<Bytes> {
        if self.caches.contains_key(prefix) {
            return Some(prefix.clone());
        }
        self.caches
            .values()
            .filter(|cached| cached.cache.covers(prefix))
            .map(|cached| cached.cache.prefix())
            .max_by_key(|cached| cached.len())
            .cloned()
    }

    /// The cached prefix that covers `prefix`, cached now if none does.
    fn cache_for(&mut self, prefix: &Bytes) -> Option<Bytes> {
        let covering = self.covering(prefix);
        if covering.is_some() {
            return covering;
        }
        if self.caches.len() >= self.max_prefixes && !self.evict_one_except(None) {
            return None;
        }
        self.insert(PrefixCache::new(prefix.clone()), false);
        self.dirty = true;
        Some(prefix.clone())
    }

    /// Drops the least recently used prefix nobody watches (other than
    /// `keep`); false if none.
    fn evict_one_except(&mut self, keep: Option<&Bytes>) -> bool {
        let victim = self
            .caches
            .iter()
            .filter(|(prefix, cached)| {
                Some(*prefix) != keep
                    && !cached.configured
                    && cached.watchers.is_empty()
                    && cached.waiting.is_empty()
            })
            .min_by_key(|(_, cached)| cached.last_used)
            .map(|(prefix, _)| prefix.clone());
        let Some(victim) = victim else {
            return false;
        };
        if let Some(cached) = self.caches.remove(&victim) {
            if let Some(upstream) = cached.upstream {
                upstream.abort();
            }
        }
        debug!(prefix = %String::from_utf8_lossy(&victim), "evicted a discovery prefix");
        true
    }

    fn on_upstream(&mut self, report: Upstream) {
        let now_ms = unix_millis();
        let link_up = self.link.is_up();
        match report {
            Upstream::Listed {
                prefix,
                entries,
                revision,
            } => {
                let Some(cached) = self.caches.get_mut(&prefix) else {
                    return;
                };
                let first = !cached.cache.is_loaded();
                let changes = cached.cache.replace(entries, revision, now_ms);
                if !first {
                    bump(&self.stats.relists);
                }
                self.dirty = true;
                if !self.fits_budget(&prefix) {
                    return;
                }
                let Some(cached) = self.caches.get_mut(&prefix) else {
                    return;
                };
                for (get_prefix, to, _) in cached.waiting.drain(..) {
                    // Read from etcd this instant: fresh, even though the
                    // watch that keeps it fresh is still being set up.
                    let mut snapshot = cached.cache.snapshot(&get_prefix, now_ms);
                    snapshot.stale = false;
                    snapshot.age_ms = 0;
                    to.answer(GetOutcome::Snapshot(snapshot));
                }
                deliver(
                    &cached.cache,
                    &cached.watchers,
                    &mut self.watchers,
                    &changes,
                );
            }
            Upstream::Watching { prefix } => {
                if let Some(cached) = self.caches.get_mut(&prefix) {
                    cached.watching = true;
                    cached.cache.set_fresh(link_up, now_ms);
                }
            }
            Upstream::Changes {
                prefix,
                changes,
                revision,
            } => {
                let Some(cached) = self.caches.get_mut(&prefix) else {
                    return;
                };
                cached.cache.apply(&changes, revision, now_ms);
                self.dirty = true;
                if !self.fits_budget(&prefix) {
                    return;
                }
                let Some(cached) = self.caches.get_mut(&prefix) else {
                    return;
                };
                deliver(
                    &cached.cache,
                    &cached.watchers,
                    &mut self.watchers,
                    &changes,
                );
            }
            Upstream::Lost { prefix } => {
                if let Some(cached) = self.caches.get_mut(&prefix) {
                    cached.watching = false;
                    cached.cache.set_fresh(false, now_ms);
                }
            }
            Upstream::TooLarge { prefix, detail } => {
                self.refuse(&prefix, &detail);
            }
        }
    }

    /// Whether the cache, with `prefix` as it is now, fits the byte budget;
    /// unused prefixes are evicted to make it fit, and if it still does not,
    /// `prefix` is refused (and false returned).
    fn fits_budget(&mut self, prefix: &Bytes) -> bool {
        loop {
            let total: usize = self
                .caches
                .values()
                .map(|cached| cached.cache.bytes())
                .sum();
            if total <= self.max_bytes {
                return true;
            }
            let own = self
                .caches
                .get(prefix)
                .map_or(0, |cached| cached.cache.bytes());
            if own > self.max_bytes || !self.evict_one_except(Some(prefix)) {
                let reason = format!("{own} bytes of keys and values, {} cached in all", total);
                self.refuse(prefix, &reason);
                return false;
            }
        }
    }

    /// Stops caching `prefix`, which does not fit: its waiting GETs and its
    /// watches get LimitExceeded, and for [`REFUSED_FOR`] so does every GET
    /// or watch of exactly this prefix.
    fn refuse(&mut self, prefix: &Bytes, reason: &str) {
        let Some(cached) = self.caches.remove(prefix) else {
            return;
        };
        if let Some(upstream) = cached.upstream {
            upstream.abort();
        }
        self.dirty = true;
        warn!(
            prefix = %String::from_utf8_lossy(prefix),
            reason,
            max_cached_bytes = self.max_bytes,
            configured = cached.configured,
            "a discovery prefix does not fit the cache (etcd.max_cached_bytes); its GETs and watches are refused"
        );
        let message = format!(
            "the entries under this prefix do not fit the relay's discovery cache (etcd.max_cached_bytes = {}): {reason}",
            self.max_bytes
        );
        for (_, to, _) in cached.waiting {
            bump(&self.stats.refused);
            to.fail(ErrorCode::LimitExceeded, &message);
        }
        for key in cached.watchers {
            if let Some(watch) = self.watchers.remove(&key) {
                self.pins.unpin(key.0, prefix);
                bump(&self.stats.refused);
                let _ = watch
                    .outbox
                    .send_ack(Frame::Error(holdfast_wire::ErrorFrame {
                        code: ErrorCode::LimitExceeded,
                        reference: u64::from(key.1),
                        message: Text::from(message.as_str()),
                    }));
            }
        }
        let now = Instant::now();
        self.refused
            .retain(|_, since| now.duration_since(*since) < REFUSED_FOR);
        // Bounded: with every slot taken, the oldest refusal is forgotten.
        if self.refused.len() >= self.max_prefixes {
            let oldest = self
                .refused
                .iter()
                .min_by_key(|(_, since)| **since)
                .map(|(prefix, _)| prefix.clone());
            if let Some(oldest) = oldest {
                self.refused.remove(&oldest);
            }
        }
        self.refused.insert(prefix.clone(), now);
    }

    /// The refusal to repeat if `prefix` was refused for its size lately.
    fn recently_refused(&self, prefix: &Bytes) -> Option<String> {
        let since = self.refused.get(prefix)?;
        (since.elapsed() < REFUSED_FOR).then(|| {
            format!(
                "the entries under this prefix did not fit the relay's discovery cache (etcd.max_cached_bytes = {}) {} ms ago; a narrower prefix may fit",
                self.max_bytes,
                since.elapsed().as_millis()
            )
        })
    }

    fn on_link(&mut self, up: bool) {
        let now_ms = unix_millis();
        for cached in self.caches.values_mut() {
            cached.cache.set_fresh(up && cached.watching, now_ms);
            if !up {
                for (_, to, _) in cached.waiting.drain(..) {
                    to.fail(
                        ErrorCode::EtcdUnavailable,
                        "etcd became unreachable before this prefix was cached",
                    );
                }
            }
        }
        if !up {
            // Remember when the entries were last confirmed.
            self.dirty = true;
        }
    }

    /// A prefix etcd will not list (no permission, a failing etcd) must not
    /// hold its GETs forever.
    fn expire_waiting_gets(&mut self) {
        for cached in self.caches.values_mut() {
            let (expired, kept): (Vec<_>, Vec<_>) = cached
                .waiting
                .drain(..)
                .partition(|(_, _, since)| since.elapsed() >= LINEARIZABLE_TIMEOUT);
            cached.waiting = kept;
            for (_, to, _) in expired {
                to.fail(
                    ErrorCode::Timeout,
                    "etcd did not list this prefix in time; retry",
                );
            }
        }
    }

    fn publish_gauges(&self) {
        let now_ms = unix_millis();
        let stats = &self.stats;
        stats
            .prefixes
            .store(self.caches.len() as u64, Ordering::Relaxed);
        let entries: usize = self.caches.values().map(|cached| cached.cache.len()).sum();
        stats.entries.store(entries as u64, Ordering::Relaxed);
        let bytes: usize = self
            .caches
            .values()
            .map(|cached| cached.cache.bytes())
            .sum();
        stats.bytes.store(bytes as u64, Ordering::Relaxed);
        stats
            .watchers
            .store(self.watchers.len() as u64, Ordering::Relaxed);
        let max_stale = self
            .caches
            .values()
            .filter(|cached| !cached.cache.is_fresh() && cached.cache.is_loaded())
            .map(|cached| now_ms.saturating_sub(cached.cache.confirmed_at_ms()))
            .max()
            .unwrap_or(0);
        stats.max_stale_ms.store(max_stale, Ordering::Relaxed);
    }
}

/// Sends `changes` to every watch of the cache, each filtered to its prefix;
/// watches still owed their initial entries get those (and SYNCED) instead.
fn deliver(
    cache: &PrefixCache,
    watch_keys: &[WatchKey],
    watchers: &mut HashMap<WatchKey, ClientWatch>,
    changes: &[Change],
) {
    for key in watch_keys {
        let Some(watch) = watchers.get_mut(key) else {
            continue;
        };
        if watch.owes_initial {
            send_initial_entries(cache, key.1, watch);
            continue;
        }
        for change in changes {
            if change.key.starts_with(&watch.prefix) {
                watch.outbox.offer(Frame::WatchEvent(WatchEvent {
                    watch_id: key.1,
                    revision: change.revision,
                    kind: change.kind,
                    key: change.key.clone(),
                    value: change.value.clone(),
                }));
            }
        }
    }
}

fn send_initial_entries(cache: &PrefixCache, watch_id: u32, watch: &mut ClientWatch) {
    let revision = cache.revision();
    for entry in cache.entries_under(&watch.prefix) {
        watch.outbox.offer(Frame::WatchEvent(WatchEvent {
            watch_id,
            revision,
            kind: WatchEventKind::Put,
            key: entry.key,
            value: entry.value,
        }));
    }
    watch.outbox.offer(Frame::WatchEvent(WatchEvent {
        watch_id,
        revision,
        kind: WatchEventKind::Synced,
        key: Bytes::new(),
        value: Bytes::new(),
    }));
    watch.owes_initial = false;
}
