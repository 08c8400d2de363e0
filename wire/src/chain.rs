//! The sequence chain: relay-stamped headers that let a consumer check a
//! subject's stream for loss, reordering and corruption after an outage.
//!
//! A relay stamps every message that passes through its outage journal with
//! three headers ([`HEADER_RELAY`], [`HEADER_SEQ`], [`HEADER_CHAIN`]): a
//! per-(relay, subject) sequence number and a running digest over the
//! previous digest and this payload ([`chain_digest`]). [`ChainStamper`] is
//! the relay's side, [`ChainValidator`] the consumer's; both are plain state
//! machines with bounded memory. The rules are written out for other
//! implementers in `PROTOCOL.md`, section "Sequence chain headers".

use crate::{Headers, ShortText, Text};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use xxhash_rust::xxh64::xxh64;

/// Header naming the relay process that stamped the message (its WELCOME
/// `relay_id`, which changes on every relay restart).
pub const HEADER_RELAY: &str = "Holdfast-Relay";

/// Header carrying the per-(relay, subject) sequence number: canonical
/// decimal `u64`, starting at 1.
pub const HEADER_SEQ: &str = "Holdfast-Seq";

/// Header carrying the running chain digest: exactly 16 lowercase hex digits.
pub const HEADER_CHAIN: &str = "Holdfast-Chain";

/// How many (relay, subject) chains a [`ChainValidator`] tracks by default.
pub const DEFAULT_MAX_CHAINS: usize = 4096;

/// The `previous` digest of the first message of every chain.
pub const CHAIN_START: u64 = 0;

/// The chain digest of a message: XXH64 (the 64-bit xxHash, specified in
/// xxHash's `doc/xxhash_spec.md`) of `payload`, with `previous` as the seed.
/// It is part of the wire format, so the vectors in the tests pin it to the
/// reference implementation whatever version of xxhash-rust is linked.
///
/// The first message of a chain uses `previous` = [`CHAIN_START`] (0). The
/// digest detects accidental loss, reordering and corruption; it is not a
/// MAC and does not detect deliberate tampering (anyone can recompute it).
pub fn chain_digest(previous: u64, payload: &[u8]) -> u64 {
    xxh64(payload, previous)
}

/// Whether `name` is one of the chain headers, in any letter case.
///
/// The stamper compares case-insensitively so that a forged `holdfast-seq`
/// cannot survive next to the real one and mislead a consumer whose header
/// map folds case; readers compare exactly, as NATS does.
fn is_chain_header(name: &str) -> bool {
    [HEADER_RELAY, HEADER_SEQ, HEADER_CHAIN]
        .iter()
        .any(|header| name.eq_ignore_ascii_case(header))
}

/// Removes every chain header (in any letter case) from `headers`.
///
/// A relay calls this on publishes it does not stamp (those that bypass the
/// journal), so that a client cannot forge a chain through the relay.
pub fn strip_chain_headers(headers: &mut Headers) {
    headers.0.retain(|(name, _)| !is_chain_header(name));
}

/// Where one chain stands: the last sequence number and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    seq: u64,
    digest: u64,
}

impl Link {
    /// Before the first message of a chain.
    const START: Link = Link {
        seq: 0,
        digest: CHAIN_START,
    };

    /// The link of the message after this one, carrying `payload`.
    fn next(self, payload: &[u8]) -> Link {
        // At u64::MAX (not reachable in practice) the chain restarts, which
        // a validator reads as a new chain rather than a gap.
        let previous = if self.seq == u64::MAX {
            Link::START
        } else {
            self
        };
        Link {
            seq: previous.seq + 1,
            digest: chain_digest(previous.digest, payload),
        }
    }
}

/// A message's place in its chain: [`HEADER_SEQ`] and [`HEADER_CHAIN`]
/// (written as decimal and as 16 lowercase hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainPosition {
    pub seq: u64,
    pub digest: u64,
}

/// The relay's side: stamps messages with the chain headers of their subject.
///
/// Memory is bounded: at most `max_subjects` chains are kept. Stamping a new
/// subject when full evicts the least recently stamped one; if that subject
/// is stamped again later, its sequence restarts at 1 with previous digest
/// 0, which a [`ChainValidator`] reads as a new chain (a baseline), not as a
/// gap. Messages of the evicted chain lost after the eviction go unnoticed,
/// so size `max_subjects` above the number of subjects journaled at once;
/// [`ChainStamper::evictions`] counts how often it was not.
#[derive(Debug)]
pub struct ChainStamper {
    relay_id: Text,
    chains: Lru<Arc<str>, Link>,
    evictions: u64,
}

impl ChainStamper {
    /// A stamper for relay `relay_id` (a valid header value, unique per
    /// relay process) keeping at most `max_subjects` chains (at least 1).
    pub fn new(relay_id: Text, max_subjects: usize) -> ChainStamper {
        ChainStamper {
            relay_id,
            chains: Lru::new(max_subjects),
            evictions: 0,
        }
    }

    /// The relay id this stamper writes into [`HEADER_RELAY`].
    pub fn relay_id(&self) -> &Text {
        &self.relay_id
    }

    /// Advances `subject`'s chain over `payload` and appends the three chain
    /// headers to `headers`, after removing any chain headers already there
    /// (a client must not be able to forge them through the relay).
    pub fn stamp(&mut self, subject: &str, payload: &[u8], headers: &mut Headers) {
        let position = self.advance(subject, payload);
        strip_chain_headers(headers);
        headers.insert(Text::from_static(HEADER_RELAY), self.relay_id.clone());
        headers.insert(
            Text::from_static(HEADER_SEQ),
            ShortText::new().push_decimal(position.seq).finish(),
        );
        headers.insert(
            Text::from_static(HEADER_CHAIN),
            ShortText::new().push_hex16(position.digest).finish(),
        );
    }

    /// Advances `subject`'s chain over `payload` and returns the values its
    /// headers carry, for a caller that writes them itself (the relay's
    /// journal encodes them straight into the stored record).
    pub fn advance(&mut self, subject: &str, payload: &[u8]) -> ChainPosition {
        let link = match self.chains.get_mut(subject) {
            Some(link) => {
                *link = link.next(payload);
                *link
            }
            None => {
                let link = Link::START.next(payload);
                if self.chains.insert(Arc::from(subject), link).is_some() {
                    self.evictions += 1;
                }
                link
            }
        };
        ChainPosition {
            seq: link.seq,
            digest: link.digest,
        }
    }

    /// Subjects whose chain is currently kept.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.len() == 0
    }

    /// Chains evicted to make room since this stamper was created.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

/// What [`ChainValidator::observe`] concluded about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    /// The message carries none of the chain headers (it did not pass
    /// through a journal); nothing was checked or recorded.
    Unstamped,
    /// The message continues its chain: next sequence, matching digest.
    Ok,
    /// A baseline: the first message seen for its (relay, subject), or a
    /// chain restarting at sequence 1 (the relay evicted the subject).
    /// Later messages are checked against it.
    First,
    /// Messages `expected..got` of the chain never arrived (or arrive later,
    /// out of order). The chain re-baselines on this message.
    Gap {
        relay: Text,
        subject: Text,
        expected: u64,
        got: u64,
    },
    /// The digest does not match: this message's payload (or its chain
    /// header) is not what the relay stamped. For the next sequence number
    /// the chain re-baselines on this message's digest; for a sequence
    /// number already seen it keeps its baseline.
    Mismatch {
        relay: Text,
        subject: Text,
        seq: u64,
        expected_digest: u64,
        got_digest: u64,
    },
    /// A sequence number at or below the last one seen: a replayed
    /// duplicate (delivery is at-least-once), or a message arriving after a
    /// later one already reported a [`ChainCheck::Gap`]. Not an error.
    Duplicate {
        relay: Text,
        subject: Text,
        seq: u64,
    },
    /// The chain headers are present but unusable; nothing was recorded.
    Malformed { reason: ChainHeaderError },
}

/// Why a message's chain headers could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainHeaderError {
    /// Some chain headers are present but this one is not.
    #[error("chain header {header} is missing")]
    Missing { header: &'static str },
    /// A chain header appears more than once.
    #[error("chain header {header} appears more than once")]
    Repeated { header: &'static str },
    /// The relay id is empty.
    #[error("chain header {HEADER_RELAY} is empty")]
    EmptyRelay,
    /// The sequence is not a canonical decimal number from 1 to 2^64-1.
    #[error("chain header {HEADER_SEQ} is not a sequence number: {value:?}")]
    InvalidSeq { value: Text },
    /// The digest is not exactly 16 lowercase hex digits.
    #[error("chain header {HEADER_CHAIN} is not 16 lowercase hex digits: {value:?}")]
    InvalidDigest { value: Text },
}

/// The consumer's side: checks each stamped message against the chain of
/// its (relay, subject).
///
/// A consumer may start mid-stream, so the first message seen for a
/// (relay, subject) is a baseline whose digest is taken as given (it cannot
/// be recomputed without its predecessor), except at sequence 1, whose
/// predecessor is known to be 0. A chain only moves forward, or back to 1
/// when it restarts; one lost message yields one [`ChainCheck::Gap`].
///
/// Memory is bounded: at most `max_chains` chains are kept, evicting the
/// least recently observed. A message of an evicted chain becomes a new
/// baseline, so a loss at that moment goes unnoticed;
/// [`ChainValidator::evictions`] counts evictions.
#[derive(Debug)]
pub struct ChainValidator {
    chains: Lru<Arc<[u8]>, Link>,
    /// Reused for the (relay, subject) lookup key so that observing a
    /// message of a known chain allocates nothing.
    key: Vec<u8>,
    evictions: u64,
}

impl Default for ChainValidator {
    fn default() -> ChainValidator {
        ChainValidator::new(DEFAULT_MAX_CHAINS)
    }
}

impl ChainValidator {
    /// A validator keeping at most `max_chains` (relay, subject) chains (at least 1).
    pub fn new(max_chains: usize) -> ChainValidator {
        ChainValidator {
            chains: Lru::new(max_chains),
            key: Vec::new(),
            evictions: 0,
        }
    }

    /// Checks one message delivered on `subject` and advances its chain.
    pub fn observe(&mut self, subject: &str, headers: &Headers, payload: &[u8]) -> ChainCheck {
        let (relay, got) = match read_stamp(headers) {
            Ok(Some(stamp)) => stamp,
            Ok(None) => return ChainCheck::Unstamped,
            Err(reason) => return ChainCheck::Malformed { reason },
        };

        // Length-prefixing the relay id keeps (relay, subject) pairs apart
        // whatever bytes either contains.
        self.key.clear();
        self.key
            .extend_from_slice(&(relay.len() as u64).to_be_bytes());
        self.key.extend_from_slice(relay.as_bytes());
        self.key.extend_from_slice(subject.as_bytes());

        let Some(last) = self.chains.get_mut(self.key.as_slice()) else {
            let check = check_start(&relay, subject, got, payload);
            if self
                .chains
                .insert(Arc::from(self.key.as_slice()), got)
                .is_some()
            {
                self.evictions += 1;
            }
            return check;
        };

        if got.seq == 1 && got != *last {
            // Sequence 1 starts the chain over (the relay evicted and
            // re-created it); an identical sequence 1 is a duplicate below.
            *last = got;
            return check_start(&relay, subject, got, payload);
        }
        match last.seq.checked_add(1) {
            Some(next) if got.seq == next => {
                let expected_digest = chain_digest(last.digest, payload);
                *last = got;
                if got.digest == expected_digest {
                    ChainCheck::Ok
                } else {
                    ChainCheck::Mismatch {
                        relay,
                        subject: Text::from(subject),
                        seq: got.seq,
                        expected_digest,
                        got_digest: got.digest,
                    }
                }
            }
            Some(next) if got.seq > next => {
                *last = got;
                ChainCheck::Gap {
                    relay,
                    subject: Text::from(subject),
                    expected: next,
                    got: got.seq,
                }
            }
            // The same sequence must carry the same digest; older ones can
            // no longer be checked, only recognised as behind the chain.
            _ if got.seq == last.seq && got.digest != last.digest => ChainCheck::Mismatch {
                relay,
                subject: Text::from(subject),
                seq: got.seq,
                expected_digest: last.digest,
                got_digest: got.digest,
            },
            _ => ChainCheck::Duplicate {
                relay,
                subject: Text::from(subject),
                seq: got.seq,
            },
        }
    }

    /// (relay, subject) chains currently kept.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.len() == 0
    }

    /// Chains evicted to make room since this validator was created.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

/// The verdict on a message that starts a chain for this validator: at
/// sequence 1 the digest can be checked (its predecessor is 0), later ones
/// are taken as given.
fn check_start(relay: &Text, subject: &str, got: Link, payload: &[u8]) -> ChainCheck {
    if got.seq == 1 {
        let expected_digest = chain_digest(CHAIN_START, payload);
        if got.digest != expected_digest {
            return ChainCheck::Mismatch {
                relay: relay.clone(),
                subject: Text::from(subject),
                seq: 1,
                expected_digest,
                got_digest: got.digest,
            };
        }
    }
    ChainCheck::First
}

/// The relay id and link a message was stamped with; `None` when it
/// carries no chain header at all.
fn read_stamp(headers: &Headers) -> Result<Option<(Text, Link)>, ChainHeaderError> {
    let mut relay = None;
    let mut seq = None;
    let mut digest = None;
    for (name, value) in headers.iter() {
        let (slot, header) = match name.as_str() {
            HEADER_RELAY => (&mut relay, HEADER_RELAY),
            HEADER_SEQ => (&mut seq, HEADER_SEQ),
            HEADER_CHAIN => (&mut digest, HEADER_CHAIN),
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(ChainHeaderError::Repeated { header });
        }
    }
    let (relay, seq, digest) = match (relay, seq, digest) {
        (None, None, None) => return Ok(None),
        (Some(relay), Some(seq), Some(digest)) => (relay, seq, digest),
        (None, _, _) => return Err(missing(HEADER_RELAY)),
        (_, None, _) => return Err(missing(HEADER_SEQ)),
        (_, _, None) => return Err(missing(HEADER_CHAIN)),
    };
    if relay.is_empty() {
        return Err(ChainHeaderError::EmptyRelay);
    }
    let seq = parse_seq(seq).ok_or_else(|| ChainHeaderError::InvalidSeq { value: seq.clone() })?;
    let digest = parse_digest(digest).ok_or_else(|| ChainHeaderError::InvalidDigest {
        value: digest.clone(),
    })?;
    Ok(Some((relay.clone(), Link { seq, digest })))
}

fn missing(header: &'static str) -> ChainHeaderError {
    ChainHeaderError::Missing { header }
}

/// Canonical decimal (digits only, no sign, no leading zero), 1..=u64::MAX:
/// exactly what a relay writes, so anything else is corruption.
fn parse_seq(value: &str) -> Option<u64> {
    let canonical = !value.is_empty()
        && value.bytes().all(|byte| byte.is_ascii_digit())
        && !value.starts_with('0');
    if !canonical {
        return None;
    }
    value.parse().ok()
}

/// Exactly 16 lowercase hex digits.
fn parse_digest(value: &str) -> Option<u64> {
    let canonical = value.len() == 16
        && value
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
    if !canonical {
        return None;
    }
    u64::from_str_radix(value, 16).ok()
}

/// Marks an empty end of the recency list.
const NIL: usize = usize::MAX;

/// A map of at most `capacity` entries that evicts the least recently used
/// one, in O(1): a hash index into slots threaded on a doubly linked
/// recency list (newest first).
#[derive(Debug)]
struct Lru<K, V> {
    index: HashMap<K, usize>,
    slots: Vec<Slot<K, V>>,
    newest: usize,
    oldest: usize,
    capacity: usize,
}

#[derive(Debug)]
struct Slot<K, V> {
    key: K,
    value: V,
    newer: usize,
    older: usize,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    fn new(capacity: usize) -> Lru<K, V> {
        Lru {
            index: HashMap::new(),
            slots: Vec::new(),
            newest: NIL,
            oldest: NIL,
            // Zero would leave nowhere to put a chain; one is the honest minimum.
            capacity: capacity.max(1),
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// The value under `key`, marked as most recently used.
    fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = *self.index.get(key)?;
        self.unlink(slot);
        self.push_newest(slot);
        Some(&mut self.slots[slot].value)
    }

    /// Inserts `key` as most recently used; returns the key evicted to make
    /// room, if any.
    fn insert(&mut self, key: K, value: V) -> Option<K> {
        if let Some(&slot) = self.index.get(&key) {
            self.slots[slot].value = value;
            self.unlink(slot);
            self.push_newest(slot);
            return None;
        }
        let fresh = Slot {
            key: key.clone(),
            value,
            newer: NIL,
            older: NIL,
        };
        if self.slots.len() < self.capacity {
            let slot = self.slots.len();
            self.slots.push(fresh);
            self.index.insert(key, slot);
            self.push_newest(slot);
            return None;
        }
        // Full, and capacity >= 1, so the list is not empty.
        let slot = self.oldest;
        self.unlink(slot);
        let evicted = std::mem::replace(&mut self.slots[slot], fresh);
        self.index.remove(&evicted.key);
        self.index.insert(key, slot);
        self.push_newest(slot);
        Some(evicted.key)
    }

    fn unlink(&mut self, slot: usize) {
        let Slot { newer, older, .. } = self.slots[slot];
        match newer {
            NIL => self.newest = older,
            newer => self.slots[newer].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            older => self.slots[older].newer = newer,
        }
        self.slots[slot].newer = NIL;
        self.slots[slot].older = NIL;
    }

    fn push_newest(&mut self, slot: usize) {
        self.slots[slot].older = self.newest;
        match self.newest {
            NIL => self.oldest = slot,
            newest => self.slots[newest].newer = slot,
        }
        self.newest = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    /// One stamped message as a consumer receives it.
    #[derive(Debug, Clone)]
    struct Stamped {
        subject: &'static str,
        headers: Headers,
        payload: Vec<u8>,
    }

    fn stamp_all(
        stamper: &mut ChainStamper,
        subject: &'static str,
        payloads: &[&str],
    ) -> Vec<Stamped> {
        payloads
            .iter()
            .map(|payload| stamp_one(stamper, subject, payload.as_bytes()))
            .collect()
    }

    fn stamp_one(stamper: &mut ChainStamper, subject: &'static str, payload: &[u8]) -> Stamped {
        let mut headers = Headers::new();
        stamper.stamp(subject, payload, &mut headers);
        Stamped {
            subject,
            headers,
            payload: payload.to_vec(),
        }
    }

    fn validate(validator: &mut ChainValidator, messages: &[Stamped]) -> Vec<ChainCheck> {
        messages
            .iter()
            .map(|message| validator.observe(message.subject, &message.headers, &message.payload))
            .collect()
    }

    fn header<'a>(headers: &'a Headers, name: &str) -> Vec<&'a str> {
        headers
            .iter()
            .filter(|(key, _)| key.as_str() == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }

    fn stamper() -> ChainStamper {
        ChainStamper::new(Text::from("relay-1"), 16)
    }

    #[test]
    fn worked_example_from_protocol_md() {
        assert_eq!(chain_digest(0, b"a"), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(
            chain_digest(0xd24e_c4f1_a98c_6e5b, b"b"),
            0x76d9_a191_6ddc_a8e6
        );

        let mut stamper = stamper();
        let messages = stamp_all(&mut stamper, "kv.events", &["a", "b"]);
        assert_eq!(header(&messages[0].headers, HEADER_SEQ), ["1"]);
        assert_eq!(
            header(&messages[0].headers, HEADER_CHAIN),
            ["d24ec4f1a98c6e5b"]
        );
        assert_eq!(header(&messages[1].headers, HEADER_SEQ), ["2"]);
        assert_eq!(
            header(&messages[1].headers, HEADER_CHAIN),
            ["76d9a1916ddca8e6"]
        );
        assert_eq!(header(&messages[1].headers, HEADER_RELAY), ["relay-1"]);
    }

    #[test]
    fn an_intact_stream_validates() {
        let messages = stamp_all(&mut stamper(), "kv", &["a", "b", "c", "d"]);
        let checks = validate(&mut ChainValidator::default(), &messages);
        assert_eq!(
            checks,
            [
                ChainCheck::First,
                ChainCheck::Ok,
                ChainCheck::Ok,
                ChainCheck::Ok
            ]
        );
    }

    #[test]
    fn a_consumer_starting_mid_stream_takes_its_first_message_as_baseline() {
        let messages = stamp_all(&mut stamper(), "kv", &["a", "b", "c", "d"]);
        let checks = validate(&mut ChainValidator::default(), &messages[2..]);
        assert_eq!(checks, [ChainCheck::First, ChainCheck::Ok]);
    }

    #[test]
    fn a_removed_message_is_one_gap_with_expected_and_got() {
        let mut messages = stamp_all(&mut stamper(), "kv", &["a", "b", "c", "d", "e"]);
        messages.remove(2);
        let checks = validate(&mut ChainValidator::default(), &messages);
        assert_eq!(
            checks,
            [
                ChainCheck::First,
                ChainCheck::Ok,
                ChainCheck::Gap {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    expected: 3,
                    got: 4,
                },
                ChainCheck::Ok,
            ]
        );
    }

    #[test]
    fn two_swapped_messages_are_a_gap_then_a_duplicate() {
        let mut messages = stamp_all(&mut stamper(), "kv", &["a", "b", "c", "d"]);
        messages.swap(1, 2);
        let checks = validate(&mut ChainValidator::default(), &messages);
        assert_eq!(
            checks,
            [
                ChainCheck::First,
                ChainCheck::Gap {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    expected: 2,
                    got: 3,
                },
                ChainCheck::Duplicate {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    seq: 2,
                },
                ChainCheck::Ok,
            ]
        );
    }

    #[test]
    fn an_altered_payload_is_a_mismatch_and_the_chain_carries_on() {
        let mut messages = stamp_all(&mut stamper(), "kv", &["a", "b", "c", "d"]);
        messages[2].payload = b"C".to_vec();
        let checks = validate(&mut ChainValidator::default(), &messages);
        assert_eq!(
            checks,
            [
                ChainCheck::First,
                ChainCheck::Ok,
                ChainCheck::Mismatch {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    seq: 3,
                    expected_digest: chain_digest(chain_digest(chain_digest(0, b"a"), b"b"), b"C"),
                    got_digest: chain_digest(chain_digest(chain_digest(0, b"a"), b"b"), b"c"),
                },
                ChainCheck::Ok,
            ]
        );
    }

    #[test]
    fn an_altered_first_message_is_a_mismatch_because_seq_1_is_checkable() {
        let mut messages = stamp_all(&mut stamper(), "kv", &["a", "b"]);
        messages[0].payload = b"x".to_vec();
        let checks = validate(&mut ChainValidator::default(), &messages);
        assert_eq!(
            checks,
            [
                ChainCheck::Mismatch {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    seq: 1,
                    expected_digest: chain_digest(0, b"x"),
                    got_digest: chain_digest(0, b"a"),
                },
                ChainCheck::Ok,
            ]
        );
    }

    #[test]
    fn duplicate_deliveries_are_reported_and_do_not_move_the_chain() {
        let messages = stamp_all(&mut stamper(), "kv", &["a", "b", "c", "d"]);
        let delivered = [
            messages[0].clone(),
            messages[0].clone(),
            messages[1].clone(),
            messages[2].clone(),
            messages[2].clone(),
            messages[1].clone(),
            messages[3].clone(),
        ];
        let duplicate = |seq| ChainCheck::Duplicate {
            relay: Text::from("relay-1"),
            subject: Text::from("kv"),
            seq,
        };
        let checks = validate(&mut ChainValidator::default(), &delivered);
        assert_eq!(
            checks,
            [
                ChainCheck::First,
                duplicate(1),
                ChainCheck::Ok,
                ChainCheck::Ok,
                duplicate(3),
                duplicate(2),
                ChainCheck::Ok,
            ]
        );
    }

    #[test]
    fn a_conflicting_copy_of_the_last_sequence_is_a_mismatch_that_keeps_the_baseline() {
        let messages = stamp_all(&mut stamper(), "kv", &["a", "b", "c"]);
        let mut conflicting = messages[1].clone();
        strip_chain_headers(&mut conflicting.headers);
        conflicting.headers.insert(HEADER_RELAY, "relay-1");
        conflicting.headers.insert(HEADER_SEQ, "2");
        conflicting.headers.insert(HEADER_CHAIN, "00000000000000ff");
        let delivered = [
            messages[0].clone(),
            messages[1].clone(),
            conflicting,
            messages[2].clone(),
        ];
        let checks = validate(&mut ChainValidator::default(), &delivered);
        assert_eq!(
            checks,
            [
                ChainCheck::First,
                ChainCheck::Ok,
                ChainCheck::Mismatch {
                    relay: Text::from("relay-1"),
                    subject: Text::from("kv"),
                    seq: 2,
                    expected_digest: chain_digest(chain_digest(0, b"a"), b"b"),
                    got_digest: 0xff,
                },
                ChainCheck::Ok,
            ]
        );
    }

    #[test]
    fn a_restart_at_seq_1_is_a_new_baseline_not_a_gap() {
        let mut validator = ChainValidator::default();
        let old = stamp_all(&mut stamper(), "kv", &["a", "b", "c"]);
        let new = stamp_all(&mut stamper(), "kv", &["x", "y"]);
        assert_eq!(
            validate(&mut validator, &old),
            [ChainCheck::First, ChainCheck::Ok, ChainCheck::Ok]
        );
        assert_eq!(
            validate(&mut validator, &new),
            [ChainCheck::First, ChainCheck::Ok]
        );
    }

    #[test]
    fn stamping_replaces_forged_chain_headers_and_keeps_the_others() {
        let mut headers = Headers::new();
        headers.insert("trace-id", "abc");
        headers.insert(HEADER_RELAY, "evil");
        headers.insert(HEADER_SEQ, "999");
        headers.insert("holdfast-chain", "ffffffffffffffff");
        headers.insert("HOLDFAST-SEQ", "7");
        headers.insert(HEADER_CHAIN, "0000000000000000");
        stamper().stamp("kv", b"a", &mut headers);

        assert_eq!(headers.len(), 4);
        assert_eq!(header(&headers, "trace-id"), ["abc"]);
        assert_eq!(header(&headers, HEADER_RELAY), ["relay-1"]);
        assert_eq!(header(&headers, HEADER_SEQ), ["1"]);
        assert_eq!(header(&headers, HEADER_CHAIN), ["d24ec4f1a98c6e5b"]);
    }

    #[test]
    fn the_stamper_evicts_the_least_recently_stamped_subject() {
        let mut stamper = ChainStamper::new(Text::from("relay-1"), 2);
        let seq = |stamper: &mut ChainStamper, subject| {
            let message = stamp_one(stamper, subject, b"p");
            header(&message.headers, HEADER_SEQ)[0].to_owned()
        };
        assert_eq!(seq(&mut stamper, "a"), "1");
        assert_eq!(seq(&mut stamper, "b"), "1");
        assert_eq!(seq(&mut stamper, "a"), "2");
        // "b" is now the least recently stamped: "c" evicts it, not "a".
        assert_eq!(seq(&mut stamper, "c"), "1");
        assert_eq!((stamper.len(), stamper.evictions()), (2, 1));
        assert_eq!(seq(&mut stamper, "a"), "3");
        assert_eq!(seq(&mut stamper, "b"), "1");
        assert_eq!(stamper.evictions(), 2);
    }

    #[test]
    fn an_evicted_subject_restarts_and_validates_as_a_new_chain() {
        let mut stamper = ChainStamper::new(Text::from("relay-1"), 1);
        let mut validator = ChainValidator::default();
        let delivered = [
            stamp_one(&mut stamper, "a", b"1"),
            stamp_one(&mut stamper, "a", b"2"),
            stamp_one(&mut stamper, "b", b"1"),
            stamp_one(&mut stamper, "a", b"3"),
            stamp_one(&mut stamper, "a", b"4"),
        ];
        assert_eq!(
            validate(&mut validator, &delivered),
            [
                ChainCheck::First,
                ChainCheck::Ok,
                ChainCheck::First,
                ChainCheck::First,
                ChainCheck::Ok,
            ]
        );
    }

    #[test]
    fn the_validator_evicts_the_least_recently_observed_chain() {
        let mut stamper = stamper();
        let a = stamp_all(&mut stamper, "a", &["1", "2", "3"]);
        let b = stamp_all(&mut stamper, "b", &["1", "2"]);
        let c = stamp_all(&mut stamper, "c", &["1"]);
        let mut validator = ChainValidator::new(2);
        let delivered = [
            a[0].clone(),
            b[0].clone(),
            a[1].clone(),
            c[0].clone(), // evicts b, the least recently observed
            a[2].clone(),
            b[1].clone(), // b was forgotten: a new baseline
        ];
        assert_eq!(
            validate(&mut validator, &delivered),
            [
                ChainCheck::First,
                ChainCheck::First,
                ChainCheck::Ok,
                ChainCheck::First,
                ChainCheck::Ok,
                ChainCheck::First,
            ]
        );
        assert_eq!((validator.len(), validator.evictions()), (2, 2));
    }

    #[test]
    fn relays_and_subjects_are_independent_chains() {
        let mut relay_a = ChainStamper::new(Text::from("relay-a"), 16);
        let mut relay_b = ChainStamper::new(Text::from("relay-b"), 16);
        let mut delivered = Vec::new();
        for round in 0..4u8 {
            delivered.push(stamp_one(&mut relay_a, "x", &[round]));
            delivered.push(stamp_one(&mut relay_b, "x", &[round, 1]));
            delivered.push(stamp_one(&mut relay_a, "y", &[round, 2]));
            delivered.push(stamp_one(&mut relay_b, "y", &[round, 3]));
        }
        let mut validator = ChainValidator::default();
        let intact = validate(&mut validator, &delivered);
        assert_eq!(
            intact[..4],
            [
                ChainCheck::First,
                ChainCheck::First,
                ChainCheck::First,
                ChainCheck::First
            ]
        );
        assert!(intact[4..].iter().all(|check| *check == ChainCheck::Ok));

        // Losing relay-b's second message on "x" breaks that chain only.
        let mut lossy = delivered.clone();
        lossy.remove(5);
        let checks = validate(&mut ChainValidator::default(), &lossy);
        let breaks: Vec<_> = checks
            .iter()
            .filter(|check| !matches!(check, ChainCheck::First | ChainCheck::Ok))
            .collect();
        assert_eq!(
            breaks,
            [&ChainCheck::Gap {
                relay: Text::from("relay-b"),
                subject: Text::from("x"),
                expected: 2,
                got: 3,
            }]
        );
    }

    #[test]
    fn unstamped_messages_pass_and_leave_the_chain_alone() {
        let messages = stamp_all(&mut stamper(), "kv", &["a", "b"]);
        let mut validator = ChainValidator::default();
        assert_eq!(
            validator.observe("kv", &messages[0].headers, b"a"),
            ChainCheck::First
        );
        let mut plain = Headers::new();
        plain.insert("trace-id", "abc");
        assert_eq!(validator.observe("kv", &plain, b"z"), ChainCheck::Unstamped);
        assert_eq!(
            validator.observe("kv", &Headers::new(), b""),
            ChainCheck::Unstamped
        );
        assert_eq!(
            validator.observe("kv", &messages[1].headers, b"b"),
            ChainCheck::Ok
        );
    }

    #[test]
    fn malformed_chain_headers_are_reported_and_leave_the_chain_alone() {
        let stamped = |relay: &str, seq: &str, chain: &str| {
            let mut headers = Headers::new();
            headers.insert(HEADER_RELAY, relay);
            headers.insert(HEADER_SEQ, seq);
            headers.insert(HEADER_CHAIN, chain);
            headers
        };
        let good_digest = "d24ec4f1a98c6e5b";
        let mut validator = ChainValidator::default();
        let mut check = |headers: &Headers| match validator.observe("kv", headers, b"a") {
            ChainCheck::Malformed { reason } => reason,
            other => panic!("expected Malformed, got {other:?}"),
        };

        let mut partial = Headers::new();
        partial.insert(HEADER_SEQ, "1");
        assert_eq!(
            check(&partial),
            ChainHeaderError::Missing {
                header: HEADER_RELAY
            }
        );
        partial.insert(HEADER_RELAY, "r");
        assert_eq!(
            check(&partial),
            ChainHeaderError::Missing {
                header: HEADER_CHAIN
            }
        );

        let mut repeated = stamped("r", "1", good_digest);
        repeated.insert(HEADER_SEQ, "2");
        assert_eq!(
            check(&repeated),
            ChainHeaderError::Repeated { header: HEADER_SEQ }
        );

        assert_eq!(
            check(&stamped("", "1", good_digest)),
            ChainHeaderError::EmptyRelay
        );
        for seq in [
            "",
            "0",
            "01",
            "+1",
            "-1",
            "1.0",
            " 1",
            "18446744073709551616",
        ] {
            assert_eq!(
                check(&stamped("r", seq, good_digest)),
                ChainHeaderError::InvalidSeq {
                    value: Text::from(seq)
                },
                "seq {seq:?}"
            );
        }
        for digest in [
            "D24EC4F1A98C6E5B",
            "d24ec4f1a98c6e5",
            "d24ec4f1a98c6e5b0",
            "0xd24ec4f1a98c6e",
            "g604613a248ff1ac",
        ] {
            assert_eq!(
                check(&stamped("r", "1", digest)),
                ChainHeaderError::InvalidDigest {
                    value: Text::from(digest)
                },
                "digest {digest:?}"
            );
        }
        // None of these left a chain behind: the valid one is a baseline.
        assert_eq!(
            validator.observe("kv", &stamped("r", "1", good_digest), b"a"),
            ChainCheck::First
        );
        assert_eq!(validator.len(), 1);
        assert_eq!(
            validator.observe(
                "kv",
                &stamped("r", "18446744073709551615", good_digest),
                b"a"
            ),
            ChainCheck::Gap {
                relay: Text::from("r"),
                subject: Text::from("kv"),
                expected: 2,
                got: u64::MAX,
            }
        );
    }

    #[test]
    fn a_chain_at_the_last_sequence_number_restarts_at_1() {
        let mut stamper = stamper();
        stamp_one(&mut stamper, "kv", b"a");
        if let Some(link) = stamper.chains.get_mut("kv") {
            link.seq = u64::MAX;
        }
        let message = stamp_one(&mut stamper, "kv", b"b");
        assert_eq!(header(&message.headers, HEADER_SEQ), ["1"]);
        assert_eq!(
            header(&message.headers, HEADER_CHAIN),
            [format!("{:016x}", chain_digest(0, b"b")).as_str()]
        );
    }

    #[test]
    fn the_lru_keeps_its_recency_list_consistent() {
        let mut lru: Lru<u32, u32> = Lru::new(3);
        for key in 0..3 {
            assert_eq!(lru.insert(key, key), None);
        }
        assert_eq!(lru.get_mut(&0).copied(), Some(0)); // order now 0, 2, 1
        assert_eq!(lru.insert(3, 3), Some(1));
        assert_eq!(lru.insert(2, 20), None); // update, order 2, 3, 0
        assert_eq!(lru.insert(4, 4), Some(0));
        assert_eq!(lru.insert(5, 5), Some(3));
        assert_eq!(lru.get_mut(&2).copied(), Some(20));
        assert_eq!(lru.get_mut(&1), None);
        assert_eq!(lru.len(), 3);

        let mut single: Lru<u32, u32> = Lru::new(0);
        assert_eq!(single.insert(1, 1), None);
        assert_eq!(single.insert(2, 2), Some(1));
        assert_eq!(single.get_mut(&2).copied(), Some(2));
    }

    proptest! {
        /// Dropping any one message from an otherwise intact stream yields
        /// exactly one event, a Gap naming the dropped sequence number.
        #[test]
        fn one_lost_message_is_exactly_one_gap(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..32), 3..40),
            lost in any::<prop::sample::Index>(),
        ) {
            let mut stamper = stamper();
            let mut messages: Vec<_> =
                payloads.iter().map(|payload| stamp_one(&mut stamper, "kv", payload)).collect();
            // Keep the first message so the consumer has a baseline.
            let lost = 1 + lost.index(messages.len() - 1);
            messages.remove(lost);
            let checks = validate(&mut ChainValidator::default(), &messages);
            let expected = lost as u64 + 1;
            let events: Vec<_> = checks
                .iter()
                .filter(|check| !matches!(check, ChainCheck::First | ChainCheck::Ok))
                .cloned()
                .collect();
            if lost == payloads.len() - 1 {
                // The last message lost: nothing after it can notice.
                prop_assert!(events.is_empty());
            } else {
                prop_assert_eq!(
                    events,
                    vec![ChainCheck::Gap {
                        relay: Text::from("relay-1"),
                        subject: Text::from("kv"),
                        expected,
                        got: expected + 1,
                    }]
                );
            }
            prop_assert_eq!(&checks[0], &ChainCheck::First);
        }
    }
}

#[cfg(test)]
mod digest_vectors {
    use xxhash_rust::xxh64::xxh64;

    fn counting(len: u8) -> Vec<u8> {
        (0..len).collect()
    }

    // Expected values from the reference implementation (python-xxhash
    // 3.x, which wraps the C library); together they take every path:
    // under 4 bytes, the 4-byte step, the 8-byte words and the 32-byte
    // stripes, with zero, small and all-ones seeds.
    #[test]
    fn matches_the_reference_implementation() {
        assert_eq!(xxh64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxh64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(xxh64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
        assert_eq!(xxh64(b"abc", 1), 0xbea9_ca81_9932_8908);
        assert_eq!(xxh64(&counting(7), 5), 0xe487_8bbf_72f5_9115);
        assert_eq!(xxh64(&counting(12), 5), 0x270a_414d_05e5_9a30);
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition", 0),
            0xfbce_a83c_8a37_8bf1
        );
        assert_eq!(xxh64(&[b'a'; 32], 0), 0x856e_8432_98f9_9ad7);
        assert_eq!(xxh64(&counting(100), u64::MAX), 0x09a9_91a0_91c9_f6d7);
        let all_bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(xxh64(&all_bytes, 0), 0x1fac_be84_06cd_904b);
        assert_eq!(
            xxh64(&all_bytes, 0x0123_4567_89ab_cdef),
            0x795a_eafa_cb0b_983b
        );
    }
}
