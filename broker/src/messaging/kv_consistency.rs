//! The check of Dynamo KV event streams the forwarder sends, sans-IO: per
//! (subject, worker, dp_rank) it follows the `event_id`s and the blocks
//! routers hold, and says when routers must be told to drop a worker's
//! blocks because the stream they get is no longer whole.
//!
//! It sees messages in the order they go to NATS (after the journal, the
//! class queue and any replay), which is the order routers apply them, so
//! what it tracks is what a router that got every message believes:
//! - A **gap** (an `event_id` more than one past the last) means events
//!   were lost on the way (a `drop_oldest` class, expired or salvaged
//!   rows): a lost removal would leave routers routing to blocks that are
//!   gone. Routers get a "cleared" event for that worker before the message.
//! - An **orphan** (a stored block whose parent was never stored) in a
//!   stream followed from its first event means the same from the other
//!   side; routers drop the orphan themselves, and get a "cleared" if they
//!   hold any of the worker's blocks.
//! - An `event_id` at or below the last is a resent copy (after a lost
//!   connection or a relay restart, delivery is at least once, in order)
//!   and changes nothing — except that the message a reset was sent before
//!   gets its reset again, since the first may have been lost with it.
//!
//! After a reset the worker's blocks stay known (as held by no router), so
//! later blocks stored under them are neither orphans nor held by routers:
//! routers rebuild that worker's tree from new sequences, never from a
//! wrong one. A stream first seen mid-way (the relay started after the
//! worker) is checked for gaps only, since the blocks stored before are
//! unknown. Memory is bounded by `max_tracked_blocks` (a stream over it
//! keeps only its gap check) and `max_tracked_streams` (the least recently
//! seen eighth is forgotten when it is reached).

use crate::dynamo::kv_event::{self, CacheEventData, ClearedEvent, RouterEvent};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Why routers were told to drop a worker's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    Gap,
    Orphan,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Gap => "gap",
            ResetReason::Orphan => "orphan",
        }
    }
}

/// A "cleared" message to send on the subject, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    pub worker_id: u64,
    pub dp_rank: u32,
    pub reason: ResetReason,
    /// What was seen, for the log and `/status`.
    pub detail: String,
    /// The whole message (Dynamo envelope and payload).
    pub message: Vec<u8>,
}

/// What the check made of one message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Send these first (the message showed a gap or an orphan at a
    /// worker's first event in it).
    pub before: Vec<Reset>,
    /// Send these after it (the problem was later in the message: routers
    /// apply the whole message, so its earlier events must not survive).
    pub after: Vec<Reset>,
}

/// Limits of what the check keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCheckLimits {
    pub max_tracked_blocks: usize,
    pub max_tracked_streams: usize,
}

/// Running counts, for metrics and `/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCheckCounts {
    /// Messages read as KV events.
    pub checked: u64,
    /// Messages that were not Dynamo KV events (forwarded untouched).
    pub undecodable: u64,
    /// Events at or below their stream's last `event_id` (resent copies).
    pub duplicates: u64,
    pub gap_resets: u64,
    pub orphan_resets: u64,
    /// Streams that outgrew `max_tracked_blocks` and kept only the gap check.
    pub over_block_limit: u64,
    /// Streams forgotten to stay within `max_tracked_streams`.
    pub forgotten: u64,
}

/// A stream's place, kept across a clean restart so a gap that falls
/// across it is still seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStream {
    pub subject: String,
    pub worker_id: u64,
    pub dp_rank: u32,
    pub last_event_id: u64,
    pub reset_before: Option<u64>,
}

/// One worker's stream on one subject.
#[derive(Debug)]
struct Stream {
    last_event_id: u64,
    /// Every block the worker stored and has not removed, and whether
    /// routers hold it. `Some` only while every event since the worker's
    /// first (or since it cleared) was seen.
    blocks: Option<HashMap<u64, bool>>,
    /// Blocks routers hold (entries of `blocks` set to true).
    held: usize,
    /// The `event_id` a reset was sent before: a resent copy of it gets
    /// the reset again.
    reset_before: Option<u64>,
    /// The check's message count when this stream was last seen.
    last_seen: u64,
}

/// The check; one per forwarder.
#[derive(Debug)]
pub struct KvConsistencyCheck {
    streams: HashMap<Box<str>, HashMap<(u64, u32), Stream>>,
    stream_count: usize,
    /// Entries of every stream's `blocks`.
    block_count: usize,
    limits: KvCheckLimits,
    /// The envelope's `publisher_id` of the relay's own "cleared" messages.
    publisher_id: u64,
    next_sequence: u64,
    messages_seen: u64,
    counts: KvCheckCounts,
}

/// How a worker's event in a message turned out.
enum EventOutcome {
    Applied,
    Duplicate,
    Reset(ResetReason, String),
}

impl KvConsistencyCheck {
    pub fn new(limits: KvCheckLimits, publisher_id: u64) -> Self {
        Self {
            streams: HashMap::new(),
            stream_count: 0,
            block_count: 0,
            limits,
            publisher_id,
            next_sequence: 0,
            messages_seen: 0,
            counts: KvCheckCounts::default(),
        }
    }

    /// Every stream's place, for the next start.
    pub fn save(&self) -> Vec<SavedStream> {
        self.streams
            .iter()
            .flat_map(|(subject, streams)| {
                streams
                    .iter()
                    .map(|(&(worker_id, dp_rank), stream)| SavedStream {
                        subject: subject.to_string(),
                        worker_id,
                        dp_rank,
                        last_event_id: stream.last_event_id,
                        reset_before: stream.reset_before,
                    })
            })
            .collect()
    }

    /// Picks up streams where a clean stop left them. Their blocks were not
    /// kept, so they are checked for gaps only until a "cleared" of their
    /// own; within `max_tracked_streams`, the rest are left out.
    pub fn restore(&mut self, saved: Vec<SavedStream>) {
        for place in saved.into_iter().take(self.limits.max_tracked_streams) {
            let stream = Stream {
                last_event_id: place.last_event_id,
                blocks: None,
                held: 0,
                reset_before: place.reset_before,
                last_seen: 0,
            };
            let streams = self.streams.entry(place.subject.into()).or_default();
            if streams
                .insert((place.worker_id, place.dp_rank), stream)
                .is_none()
            {
                self.stream_count += 1;
            }
        }
    }

    pub fn counts(&self) -> KvCheckCounts {
        self.counts
    }

    pub fn tracked_streams(&self) -> usize {
        self.stream_count
    }

    pub fn tracked_blocks(&self) -> usize {
        self.block_count
    }

    /// Reads one message about to go to NATS on `subject`; `now_ms` (Unix
    /// milliseconds) stamps any "cleared" message it asks for.
    pub fn observe(&mut self, subject: &str, payload: &[u8], now_ms: u64) -> Verdict {
        let Ok(events) = kv_event::decode_message(payload) else {
            self.counts.undecodable += 1;
            return Verdict::default();
        };
        self.counts.checked += 1;
        self.messages_seen += 1;
        let mut verdict = Verdict::default();
        // Workers with a reset in this message: one per message is enough.
        let mut reset_in_message: Vec<(u64, u32)> = Vec::new();
        let mut seen_in_message: Vec<(u64, u32)> = Vec::new();
        for event in &events {
            let key = (event.worker_id, event.event.dp_rank);
            let first_in_message = !seen_in_message.contains(&key);
            if first_in_message {
                seen_in_message.push(key);
            }
            let already_reset = reset_in_message.contains(&key);
            let outcome = self.apply(subject, key, event, already_reset);
            let (reason, detail) = match outcome {
                EventOutcome::Applied => continue,
                EventOutcome::Duplicate => {
                    self.counts.duplicates += 1;
                    continue;
                }
                EventOutcome::Reset(reason, detail) => (reason, detail),
            };
            reset_in_message.push(key);
            let reset = self.reset_message(event, reason, detail, now_ms);
            if first_in_message {
                verdict.before.push(reset);
            } else {
                verdict.after.push(reset);
            }
        }
        // A reset sent after the message also drops what the message's
        // earlier events stored.
        for reset in &verdict.after {
            if let Some(stream) = self
                .streams
                .get_mut(subject)
                .and_then(|streams| streams.get_mut(&(reset.worker_id, reset.dp_rank)))
            {
                stream.drop_held();
            }
        }
        verdict
    }

    fn apply(
        &mut self,
        subject: &str,
        key: (u64, u32),
        event: &RouterEvent<'_>,
        already_reset: bool,
    ) -> EventOutcome {
        let id = event.event.event_id;
        let messages_seen = self.messages_seen;
        let Some(stream) = self.stream(subject, key, id, &event.event.data) else {
            // A new stream: nothing to compare with yet.
            return self.apply_data(subject, key, &event.event.data, already_reset);
        };
        stream.last_seen = messages_seen;
        if id <= stream.last_event_id {
            return match stream.reset_before {
                Some(reset_id) if reset_id == id && !already_reset => EventOutcome::Reset(
                    ResetReason::Gap,
                    format!("event {id} sent again after a reset was sent before it"),
                ),
                _ => EventOutcome::Duplicate,
            };
        }
        let expected = stream.last_event_id + 1;
        stream.last_event_id = id;
        if id > expected && !already_reset {
            stream.drop_held();
            stream.reset_before = Some(id);
            self.apply_data(subject, key, &event.event.data, true);
            return EventOutcome::Reset(
                ResetReason::Gap,
                format!("expected event {expected}, got {id}"),
            );
        }
        self.apply_data(subject, key, &event.event.data, already_reset)
    }

    /// The stream of `key` on `subject`, or `None` after starting a new one.
    fn stream(
        &mut self,
        subject: &str,
        key: (u64, u32),
        id: u64,
        data: &CacheEventData,
    ) -> Option<&mut Stream> {
        let known = self
            .streams
            .get(subject)
            .is_some_and(|streams| streams.contains_key(&key));
        if known {
            return self
                .streams
                .get_mut(subject)
                .and_then(|streams| streams.get_mut(&key));
        }
        if self.stream_count >= self.limits.max_tracked_streams {
            self.forget_least_recent();
        }
        // Followed from its start (or from a clear of its own), a stream's
        // blocks are all known; else only its gaps can be checked.
        let whole = id == 1 || matches!(data, CacheEventData::Cleared);
        let stream = Stream {
            last_event_id: id,
            blocks: whole.then(HashMap::new),
            held: 0,
            reset_before: None,
            last_seen: self.messages_seen,
        };
        self.streams
            .entry(subject.into())
            .or_default()
            .insert(key, stream);
        self.stream_count += 1;
        None
    }

    /// Forgets the least recently seen eighth of the streams at once, so a
    /// peer that keeps inventing worker ids costs one pass per many new
    /// streams, not a scan of every stream for each.
    fn forget_least_recent(&mut self) {
        let mut by_age: Vec<(u64, Box<str>, (u64, u32))> = self
            .streams
            .iter()
            .flat_map(|(subject, streams)| {
                streams
                    .iter()
                    .map(move |(key, stream)| (stream.last_seen, subject.clone(), *key))
            })
            .collect();
        let count = (by_age.len() / 8).max(1).min(by_age.len());
        if count == 0 {
            return;
        }
        by_age.select_nth_unstable_by_key(count - 1, |(last_seen, _, _)| *last_seen);
        for (_, subject, key) in by_age.into_iter().take(count) {
            let Some(streams) = self.streams.get_mut(&subject) else {
                continue;
            };
            if let Some(stream) = streams.remove(&key) {
                self.block_count -= stream.blocks.map_or(0, |blocks| blocks.len());
                self.stream_count -= 1;
                self.counts.forgotten += 1;
            }
            if streams.is_empty() {
                self.streams.remove(&subject);
            }
        }
    }

    /// Applies an event's data to its stream's blocks, as a router would.
    fn apply_data(
        &mut self,
        subject: &str,
        key: (u64, u32),
        data: &CacheEventData,
        already_reset: bool,
    ) -> EventOutcome {
        let Some(stream) = self
            .streams
            .get_mut(subject)
            .and_then(|streams| streams.get_mut(&key))
        else {
            return EventOutcome::Applied;
        };
        let mut outcome = EventOutcome::Applied;
        match data {
            CacheEventData::Cleared => {
                self.block_count -= stream.blocks.as_ref().map_or(0, HashMap::len);
                stream.blocks = Some(HashMap::new());
                stream.held = 0;
                stream.reset_before = None;
            }
            CacheEventData::Removed(removed) => {
                if let Some(blocks) = stream.blocks.as_mut() {
                    for hash in &removed.block_hashes {
                        if let Some(held) = blocks.remove(hash) {
                            self.block_count -= 1;
                            stream.held -= usize::from(held);
                        }
                    }
                }
            }
            CacheEventData::Stored(stored) => {
                let Some(blocks) = stream.blocks.as_mut() else {
                    return outcome;
                };
                let held = match stored.parent_hash {
                    None => true,
                    Some(parent) => match blocks.get(&parent) {
                        Some(held) => *held,
                        None => {
                            // A router drops a block whose parent it lacks;
                            // it only needs telling if it holds others.
                            if stream.held > 0 && !already_reset {
                                for held in blocks.values_mut() {
                                    *held = false;
                                }
                                stream.held = 0;
                                let first =
                                    stored.blocks.first().map_or(0, |block| block.block_hash);
                                outcome = EventOutcome::Reset(
                                    ResetReason::Orphan,
                                    format!("block {first} stored under {parent}, which was never stored"),
                                );
                            }
                            false
                        }
                    },
                };
                for block in &stored.blocks {
                    match blocks.insert(block.block_hash, held) {
                        None => self.block_count += 1,
                        Some(was_held) => stream.held -= usize::from(was_held),
                    }
                    stream.held += usize::from(held);
                }
                if self.block_count > self.limits.max_tracked_blocks {
                    self.block_count -= blocks.len();
                    stream.blocks = None;
                    stream.held = 0;
                    self.counts.over_block_limit += 1;
                }
            }
        }
        outcome
    }

    fn reset_message(
        &mut self,
        event: &RouterEvent<'_>,
        reason: ResetReason,
        detail: String,
        now_ms: u64,
    ) -> Reset {
        match reason {
            ResetReason::Gap => self.counts.gap_resets += 1,
            ResetReason::Orphan => self.counts.orphan_resets += 1,
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let cleared = ClearedEvent {
            worker_id: event.worker_id,
            dp_rank: event.event.dp_rank,
            // In a gap, an id the worker's lost events had, so a router
            // that orders by id takes it as coming before this message.
            event_id: event.event.event_id.saturating_sub(1),
            storage_tier: event.storage_tier,
            residency_domain: event.residency_domain,
        };
        Reset {
            worker_id: event.worker_id,
            dp_rank: event.event.dp_rank,
            reason,
            detail,
            message: kv_event::encode_cleared(&cleared, self.publisher_id, sequence, now_ms),
        }
    }
}

impl Stream {
    /// Routers were (or are about to be) told to drop this worker's blocks.
    fn drop_held(&mut self) {
        if let Some(blocks) = self.blocks.as_mut() {
            for held in blocks.values_mut() {
                *held = false;
            }
        }
        self.held = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamo::kv_event::decode_message;

    const SUBJECT: &str = "namespace.ns.component.backend.endpoint.generate.kv-events";
    const LIMITS: KvCheckLimits = KvCheckLimits {
        max_tracked_blocks: 1000,
        max_tracked_streams: 16,
    };

    enum Data<'a> {
        Stored(Option<u64>, &'a [u64]),
        Removed(&'a [u64]),
        Cleared,
    }

    /// A message as a Dynamo worker's publisher writes it.
    fn message(worker: u64, dp_rank: u32, events: &[(u64, Data<'_>)]) -> Vec<u8> {
        use rmp::encode::*;
        let mut payload = Vec::new();
        write_array_len(&mut payload, events.len() as u32).unwrap();
        for (id, data) in events {
            write_map_len(&mut payload, 2).unwrap();
            write_str(&mut payload, "worker_id").unwrap();
            write_uint(&mut payload, worker).unwrap();
            write_str(&mut payload, "event").unwrap();
            write_map_len(&mut payload, 3).unwrap();
            write_str(&mut payload, "event_id").unwrap();
            write_uint(&mut payload, *id).unwrap();
            write_str(&mut payload, "data").unwrap();
            match data {
                Data::Stored(parent, blocks) => {
                    write_map_len(&mut payload, 1).unwrap();
                    write_str(&mut payload, "stored").unwrap();
                    write_map_len(&mut payload, 2).unwrap();
                    write_str(&mut payload, "parent_hash").unwrap();
                    match parent {
                        Some(parent) => write_uint(&mut payload, *parent).map(|_| ()).unwrap(),
                        None => write_nil(&mut payload).unwrap(),
                    }
                    write_str(&mut payload, "blocks").unwrap();
                    write_array_len(&mut payload, blocks.len() as u32).unwrap();
                    for block in *blocks {
                        write_map_len(&mut payload, 1).unwrap();
                        write_str(&mut payload, "block_hash").unwrap();
                        write_uint(&mut payload, *block).unwrap();
                    }
                }
                Data::Removed(blocks) => {
                    write_map_len(&mut payload, 1).unwrap();
                    write_str(&mut payload, "removed").unwrap();
                    write_map_len(&mut payload, 1).unwrap();
                    write_str(&mut payload, "block_hashes").unwrap();
                    write_array_len(&mut payload, blocks.len() as u32).unwrap();
                    for block in *blocks {
                        write_uint(&mut payload, *block).unwrap();
                    }
                }
                Data::Cleared => write_str(&mut payload, "cleared").unwrap(),
            }
            write_str(&mut payload, "dp_rank").unwrap();
            write_uint(&mut payload, u64::from(dp_rank)).unwrap();
        }
        crate::dynamo::envelope::encode(&crate::dynamo::envelope::Envelope {
            publisher_id: worker ^ 0xabc,
            sequence: 0,
            published_at: 0,
            topic: "kv-events",
            payload: &payload,
        })
    }

    fn one(worker: u64, id: u64, data: Data<'_>) -> Vec<u8> {
        message(worker, 0, &[(id, data)])
    }

    fn check() -> KvConsistencyCheck {
        KvConsistencyCheck::new(LIMITS, 99)
    }

    fn quiet(verdict: Verdict) {
        assert_eq!(verdict, Verdict::default());
    }

    /// A stream from event 1: blocks 10 <- 11 <- 12, then 20 <- 21.
    fn started(check: &mut KvConsistencyCheck, worker: u64) {
        quiet(check.observe(SUBJECT, &one(worker, 1, Data::Stored(None, &[10, 11])), 0));
        quiet(check.observe(SUBJECT, &one(worker, 2, Data::Stored(Some(11), &[12])), 0));
        quiet(check.observe(SUBJECT, &one(worker, 3, Data::Stored(None, &[20, 21])), 0));
    }

    #[test]
    fn a_whole_stream_needs_no_reset() {
        let mut check = check();
        started(&mut check, 7);
        quiet(check.observe(SUBJECT, &one(7, 4, Data::Removed(&[12, 21])), 0));
        quiet(check.observe(SUBJECT, &one(7, 5, Data::Stored(Some(11), &[13])), 0));
        assert_eq!(check.tracked_blocks(), 4);
        assert_eq!(check.tracked_streams(), 1);
        assert_eq!(check.counts().checked, 5);
        assert_eq!(check.counts().gap_resets + check.counts().orphan_resets, 0);
    }

    #[test]
    fn a_gap_sends_that_worker_a_cleared_event_first() {
        let mut check = check();
        started(&mut check, 7);
        let verdict = check.observe(SUBJECT, &message(7, 0, &[(6, Data::Removed(&[10]))]), 1234);
        assert!(verdict.after.is_empty());
        let [reset] = &verdict.before[..] else {
            panic!("{verdict:?}")
        };
        assert_eq!((reset.worker_id, reset.dp_rank), (7, 0));
        assert_eq!(reset.reason, ResetReason::Gap);
        assert_eq!(reset.detail, "expected event 4, got 6");
        let events = decode_message(&reset.message).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].worker_id, 7);
        assert_eq!(events[0].event.data, CacheEventData::Cleared);
        assert_eq!(events[0].event.event_id, 5);
        assert_eq!(check.counts().gap_resets, 1);
    }

    #[test]
    fn after_a_reset_blocks_under_cleared_ones_are_no_orphans() {
        let mut check = check();
        started(&mut check, 7);
        assert_eq!(
            check
                .observe(SUBJECT, &one(7, 9, Data::Stored(None, &[30])), 0)
                .before
                .len(),
            1
        );
        // Routers dropped 10..21; a block under 12 is dropped by them too,
        // silently: it is no reason for another reset.
        for (id, parent, block) in [(10, 12, 40), (11, 40, 41), (12, 21, 50)] {
            quiet(check.observe(
                SUBJECT,
                &one(7, id, Data::Stored(Some(parent), &[block])),
                0,
            ));
        }
        quiet(check.observe(SUBJECT, &one(7, 13, Data::Stored(Some(30), &[31])), 0));
        assert_eq!(check.counts().gap_resets, 1);
        assert_eq!(check.counts().orphan_resets, 0);
    }

    #[test]
    fn a_resent_copy_changes_nothing_but_gets_its_reset_again() {
        let mut check = check();
        started(&mut check, 7);
        let gap = one(7, 6, Data::Stored(Some(12), &[13]));
        assert_eq!(check.observe(SUBJECT, &gap, 0).before.len(), 1);
        quiet(check.observe(SUBJECT, &one(7, 7, Data::Removed(&[13])), 0));
        // The connection dropped: NATS gets everything unconfirmed again.
        quiet(check.observe(SUBJECT, &one(7, 3, Data::Stored(None, &[20, 21])), 0));
        let again = check.observe(SUBJECT, &gap, 0);
        assert_eq!(again.before.len(), 1, "{again:?}");
        quiet(check.observe(SUBJECT, &one(7, 7, Data::Removed(&[13])), 0));
        quiet(check.observe(SUBJECT, &one(7, 8, Data::Stored(None, &[60])), 0));
        assert_eq!(check.counts().duplicates, 2);
        assert_eq!(check.counts().gap_resets, 2);
    }

    #[test]
    fn an_orphan_resets_a_worker_routers_hold_blocks_of() {
        let mut check = check();
        started(&mut check, 7);
        let verdict = check.observe(SUBJECT, &one(7, 4, Data::Stored(Some(999), &[70])), 0);
        let [reset] = &verdict.before[..] else {
            panic!("{verdict:?}")
        };
        assert_eq!(reset.reason, ResetReason::Orphan);
        assert_eq!(
            reset.detail,
            "block 70 stored under 999, which was never stored"
        );
        // Routers now hold nothing of 7: another orphan needs no reset.
        quiet(check.observe(SUBJECT, &one(7, 5, Data::Stored(Some(998), &[71])), 0));
        assert_eq!(check.counts().orphan_resets, 1);
    }

    #[test]
    fn a_stream_first_seen_midway_is_checked_for_gaps_only() {
        let mut check = check();
        quiet(check.observe(SUBJECT, &one(7, 40, Data::Stored(Some(5), &[6])), 0));
        quiet(check.observe(SUBJECT, &one(7, 41, Data::Stored(Some(4), &[8])), 0));
        assert_eq!(check.tracked_blocks(), 0);
        assert_eq!(
            check
                .observe(SUBJECT, &one(7, 43, Data::Removed(&[6])), 0)
                .before
                .len(),
            1
        );
        // Its own "cleared" makes it whole from there on.
        quiet(check.observe(SUBJECT, &one(7, 44, Data::Cleared), 0));
        quiet(check.observe(SUBJECT, &one(7, 45, Data::Stored(None, &[1])), 0));
        assert_eq!(
            check
                .observe(SUBJECT, &one(7, 46, Data::Stored(Some(77), &[2])), 0)
                .before
                .len(),
            1
        );
    }

    #[test]
    fn workers_ranks_and_subjects_are_separate_streams() {
        let mut check = check();
        started(&mut check, 7);
        started(&mut check, 8);
        quiet(check.observe(
            SUBJECT,
            &message(7, 1, &[(1, Data::Stored(None, &[10]))]),
            0,
        ));
        quiet(check.observe("other.kv-events", &one(7, 1, Data::Stored(None, &[10])), 0));
        quiet(check.observe(SUBJECT, &one(8, 4, Data::Removed(&[20])), 0));
        assert_eq!(check.tracked_streams(), 4);
    }

    #[test]
    fn a_problem_later_in_a_message_resets_after_it() {
        let mut check = check();
        started(&mut check, 7);
        let batch = message(
            7,
            0,
            &[
                (4, Data::Stored(Some(21), &[22])),
                (5, Data::Stored(Some(555), &[23])),
            ],
        );
        let verdict = check.observe(SUBJECT, &batch, 0);
        assert!(verdict.before.is_empty());
        assert_eq!(verdict.after.len(), 1);
        // Block 22 came with the message, before the reset: not held.
        quiet(check.observe(SUBJECT, &one(7, 6, Data::Stored(Some(22), &[24])), 0));
        quiet(check.observe(SUBJECT, &one(7, 7, Data::Stored(Some(666), &[25])), 0));
    }

    #[test]
    fn other_payloads_pass_counted() {
        let mut check = check();
        quiet(check.observe(SUBJECT, b"hello", 0));
        quiet(check.observe(SUBJECT, &[0x85, 0x01], 0));
        assert_eq!(check.counts().undecodable, 2);
        assert_eq!(check.counts().checked, 0);
    }

    #[test]
    fn memory_stays_within_the_limits() {
        let mut check = KvConsistencyCheck::new(
            KvCheckLimits {
                max_tracked_blocks: 10,
                max_tracked_streams: 3,
            },
            99,
        );
        let blocks: Vec<u64> = (100..108).collect();
        quiet(check.observe(SUBJECT, &one(1, 1, Data::Stored(None, &blocks)), 0));
        quiet(check.observe(SUBJECT, &one(2, 1, Data::Stored(None, &[1, 2, 3])), 0));
        assert_eq!(check.counts().over_block_limit, 1);
        assert!(check.tracked_blocks() <= 10);
        // Over the limit, worker 2 keeps its gap check.
        assert_eq!(
            check
                .observe(SUBJECT, &one(2, 3, Data::Removed(&[1])), 0)
                .before
                .len(),
            1
        );
        for worker in 3..6 {
            quiet(check.observe(SUBJECT, &one(worker, 1, Data::Stored(None, &[worker])), 0));
        }
        assert_eq!(check.tracked_streams(), 3);
        assert_eq!(check.counts().forgotten, 2);
    }

    #[test]
    fn a_gap_across_a_clean_restart_is_seen() {
        let mut before = check();
        started(&mut before, 7);
        let saved = before.save();
        let mut after = check();
        after.restore(saved);
        assert_eq!(after.tracked_streams(), 1);
        // The first messages after the restart were dropped meanwhile.
        let verdict = after.observe(SUBJECT, &one(7, 9, Data::Stored(Some(21), &[22])), 0);
        assert_eq!(verdict.before.len(), 1);
        assert_eq!(verdict.before[0].detail, "expected event 4, got 9");
        // A resent copy of what was sent before the stop is a duplicate.
        quiet(after.observe(SUBJECT, &one(7, 3, Data::Stored(None, &[20, 21])), 0));
    }

    #[test]
    fn invented_worker_ids_stay_within_the_stream_limit() {
        let mut check = KvConsistencyCheck::new(
            KvCheckLimits {
                max_tracked_blocks: 1000,
                max_tracked_streams: 64,
            },
            99,
        );
        started(&mut check, 7);
        for worker in 1000..11_000 {
            quiet(check.observe(SUBJECT, &one(worker, 1, Data::Stored(None, &[1])), 0));
            // A worker seen all along is not the one forgotten.
            if worker % 16 == 0 {
                quiet(check.observe(
                    SUBJECT,
                    &one(7, 4 + (worker - 1000) / 16, Data::Removed(&[99])),
                    0,
                ));
            }
        }
        assert!(check.tracked_streams() <= 64);
        assert_eq!(
            check.counts().forgotten,
            10_001 - check.tracked_streams() as u64
        );
        assert!(check.tracked_blocks() <= 64 + 3);
        assert_eq!(check.counts().gap_resets, 0);
    }
}
