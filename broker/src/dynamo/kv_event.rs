//! Dynamo's KV cache events, as a worker's `KvEventPublisher` puts them in
//! an envelope's payload: a msgpack array of router events, each naming the
//! worker, its data-parallel rank, a per-publisher `event_id` (from 1, one
//! more per event) and what changed — blocks stored under a parent, blocks
//! removed, or everything cleared.

use super::envelope::{self, Envelope};
use super::DecodeError;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;

/// The envelope topic of KV cache events.
pub const TOPIC: &str = "kv-events";

/// One router event: what a worker's cache did.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RouterEvent<'a> {
    #[serde(deserialize_with = "any_u64")]
    pub worker_id: u64,
    #[serde(borrow, default)]
    pub storage_tier: Option<&'a str>,
    #[serde(borrow, default)]
    pub residency_domain: Option<&'a str>,
    pub event: CacheEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CacheEvent {
    #[serde(deserialize_with = "any_u64")]
    pub event_id: u64,
    pub data: CacheEventData,
    #[serde(default)]
    pub dp_rank: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheEventData {
    Stored(Stored),
    Removed(Removed),
    Cleared,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Stored {
    /// `None` for a sequence's first block.
    #[serde(default, deserialize_with = "any_u64_option")]
    pub parent_hash: Option<u64>,
    /// A chain: each block's parent is the one before it.
    pub blocks: Vec<StoredBlock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StoredBlock {
    #[serde(deserialize_with = "any_u64")]
    pub block_hash: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Removed {
    #[serde(deserialize_with = "any_u64_seq")]
    pub block_hashes: Vec<u64>,
}

/// Reads the router events of a KV event message (envelope and payload).
pub fn decode_message(bytes: &[u8]) -> Result<Vec<RouterEvent<'_>>, DecodeError> {
    let envelope = envelope::decode(bytes)?;
    if envelope.topic != TOPIC {
        return Err(DecodeError::new(
            "KV event",
            format!("envelope topic is {:?}", envelope.topic),
        ));
    }
    decode_payload(envelope.payload)
}

/// Reads an envelope's payload: an array of router events (a lone event,
/// as older runtimes sent, is taken as an array of one).
pub fn decode_payload(payload: &[u8]) -> Result<Vec<RouterEvent<'_>>, DecodeError> {
    let is_array = matches!(payload.first(), Some(0x90..=0x9f | 0xdc | 0xdd));
    let events = if is_array {
        rmp_serde::from_slice(payload)
    } else {
        rmp_serde::from_slice(payload).map(|event| vec![event])
    };
    events.map_err(|error| DecodeError::new("KV event", error))
}

/// What a "cleared" message says and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClearedEvent<'a> {
    pub worker_id: u64,
    pub dp_rank: u32,
    pub event_id: u64,
    pub storage_tier: Option<&'a str>,
    pub residency_domain: Option<&'a str>,
}

/// A whole message (envelope and payload) telling routers that every block
/// of `event.worker_id` at `event.dp_rank` is gone: what Dynamo's radix
/// tree applies as "all blocks cleared" for that worker.
pub fn encode_cleared(
    event: &ClearedEvent<'_>,
    publisher_id: u64,
    sequence: u64,
    published_at_ms: u64,
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(128);
    // Writing into a Vec cannot fail.
    let _ = write_cleared(&mut payload, event);
    envelope::encode(&Envelope {
        publisher_id,
        sequence,
        published_at: published_at_ms,
        topic: TOPIC,
        payload: &payload,
    })
}

fn write_cleared(
    out: &mut Vec<u8>,
    event: &ClearedEvent<'_>,
) -> Result<(), rmp::encode::ValueWriteError> {
    use rmp::encode::{write_array_len, write_map_len, write_str, write_uint};
    let tags = [
        ("storage_tier", event.storage_tier),
        ("residency_domain", event.residency_domain),
    ];
    let present = tags.iter().filter(|(_, value)| value.is_some()).count();
    write_array_len(out, 1)?;
    write_map_len(out, 2 + present as u32)?;
    write_str(out, "worker_id")?;
    write_uint(out, event.worker_id)?;
    for (key, value) in tags {
        if let Some(value) = value {
            write_str(out, key)?;
            write_str(out, value)?;
        }
    }
    write_str(out, "event")?;
    write_map_len(out, 3)?;
    write_str(out, "event_id")?;
    write_uint(out, event.event_id)?;
    write_str(out, "data")?;
    write_str(out, "cleared")?;
    write_str(out, "dp_rank")?;
    write_uint(out, u64::from(event.dp_rank))?;
    Ok(())
}

/// Dynamo's hashes are u64 in Rust but signed 64-bit integers on its
/// Python side, so either may arrive; the bits are what identify a block.
struct AnyU64;

impl Visitor<'_> for AnyU64 {
    type Value = u64;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a 64-bit integer")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        Ok(value as u64)
    }
}

fn any_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(AnyU64)
}

#[derive(Deserialize)]
struct Hash(#[serde(deserialize_with = "any_u64")] u64);

fn any_u64_option<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<Hash>::deserialize(deserializer)?.map(|hash| hash.0))
}

fn any_u64_seq<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    Ok(Vec::<Hash>::deserialize(deserializer)?
        .into_iter()
        .map(|hash| hash.0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamo::envelope::tests::{hex, REMOVED_13, STORED_13_AFTER_12};

    const WORKER: u64 = 0x694d_a252_1b98_6205;

    #[test]
    fn reads_a_stored_event_a_dynamo_worker_published() {
        let bytes = hex(STORED_13_AFTER_12);
        let events = decode_message(&bytes).unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.worker_id, WORKER);
        assert_eq!(event.event.event_id, 2);
        assert_eq!(event.event.dp_rank, 0);
        assert_eq!(
            event.event.data,
            CacheEventData::Stored(Stored {
                parent_hash: Some(12),
                blocks: vec![StoredBlock { block_hash: 13 }],
            })
        );
    }

    #[test]
    fn reads_a_removed_event_a_dynamo_worker_published() {
        let bytes = hex(REMOVED_13);
        let events = decode_message(&bytes).unwrap();
        assert_eq!(events[0].event.event_id, 3);
        assert_eq!(
            events[0].event.data,
            CacheEventData::Removed(Removed {
                block_hashes: vec![13]
            })
        );
    }

    #[test]
    fn a_cleared_message_reads_back_as_cleared() {
        let event = ClearedEvent {
            worker_id: WORKER,
            dp_rank: 3,
            event_id: 41,
            storage_tier: Some("device"),
            residency_domain: Some("worker"),
        };
        let bytes = encode_cleared(&event, 7, 0, 1_700_000_000_000);
        let envelope = envelope::decode(&bytes).unwrap();
        assert_eq!((envelope.publisher_id, envelope.topic), (7, TOPIC));
        let events = decode_payload(envelope.payload).unwrap();
        assert_eq!(
            events,
            vec![RouterEvent {
                worker_id: WORKER,
                storage_tier: Some("device"),
                residency_domain: Some("worker"),
                event: CacheEvent {
                    event_id: 41,
                    data: CacheEventData::Cleared,
                    dp_rank: 3,
                },
            }]
        );
    }

    #[test]
    fn negative_hashes_keep_their_bits() {
        // {"block_hashes": [-1]} as msgpack.
        let removed: Removed = rmp_serde::from_slice(&[
            0x81, 0xac, b'b', b'l', b'o', b'c', b'k', b'_', b'h', b'a', b's', b'h', b'e', b's',
            0x91, 0xff,
        ])
        .unwrap();
        assert_eq!(removed.block_hashes, vec![u64::MAX]);
    }

    #[test]
    fn other_topics_and_garbage_are_errors() {
        let mut other = hex(REMOVED_13);
        // "kv-events" -> "kv_events" in the topic.
        let at = other.windows(9).position(|w| w == b"kv-events").unwrap();
        other[at + 2] = b'_';
        assert!(decode_message(&other).is_err());
        assert!(decode_payload(b"\x91\x01").is_err());
        assert!(decode_payload(b"").is_err());
    }
}
