//! Dynamo's event-plane envelope: a msgpack map `{publisher_id, sequence,
//! published_at, topic, payload}` around every event its runtime publishes
//! on NATS (subject `namespace.{ns}.component.{c}.endpoint.{e}.{topic}`),
//! with the event itself as msgpack bytes in `payload`.

use super::DecodeError;
use serde::Deserialize;

/// One envelope; `topic` and `payload` borrow from the message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Envelope<'a> {
    /// Random per publisher (per worker and topic), stable for its life.
    pub publisher_id: u64,
    /// Per publisher, from 0.
    pub sequence: u64,
    /// Milliseconds since the Unix epoch.
    pub published_at: u64,
    #[serde(borrow)]
    pub topic: &'a str,
    #[serde(borrow)]
    pub payload: &'a [u8],
}

/// msgpack's first byte of a map of up to 15 entries, which the envelope
/// (five fields) always is: other payloads are turned away without a parse.
fn starts_like_envelope(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

/// Reads an envelope.
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    if !starts_like_envelope(bytes) {
        return Err(DecodeError::new(
            "event envelope",
            "does not start with a msgpack map",
        ));
    }
    rmp_serde::from_slice(bytes).map_err(|error| DecodeError::new("event envelope", error))
}

/// Writes an envelope the way Dynamo's runtime does (a map with named
/// fields, the payload as msgpack bin).
pub fn encode(envelope: &Envelope<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(envelope.payload.len() + 96);
    // Writing into a Vec cannot fail.
    let _ = write(&mut out, envelope);
    out
}

fn write(out: &mut Vec<u8>, envelope: &Envelope<'_>) -> Result<(), rmp::encode::ValueWriteError> {
    use rmp::encode::{write_bin, write_map_len, write_str, write_uint};
    write_map_len(out, 5)?;
    write_str(out, "publisher_id")?;
    write_uint(out, envelope.publisher_id)?;
    write_str(out, "sequence")?;
    write_uint(out, envelope.sequence)?;
    write_str(out, "published_at")?;
    write_uint(out, envelope.published_at)?;
    write_str(out, "topic")?;
    write_str(out, envelope.topic)?;
    write_str(out, "payload")?;
    write_bin(out, envelope.payload)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a Dynamo 1.6.1 worker put on NATS for
    /// `KvEventPublisher::publish_stored([9, 9, 9, 9], [4], [13], 12)`, its
    /// second event (captured from nats-server with `DYN_EVENT_PLANE=nats`).
    pub(crate) const STORED_13_AFTER_12: &str = "85ac7075626c69736865725f6964cf00100c68260b90eea873657175656e636501ac7075626c69736865645f6174cf000001a2521ba4bda5746f706963a96b762d6576656e7473a77061796c6f6164c4bf9184a9776f726b65725f6964cf694da2521b986205ac73746f726167655f74696572a6646576696365b07265736964656e63795f646f6d61696ea6776f726b6572a56576656e7483a86576656e745f696402a46461746181a673746f72656483ab706172656e745f686173680cae73746172745f706f736974696f6ec0a6626c6f636b739183aa626c6f636b5f686173680dab746f6b656e735f68617368cfb53c7478409b7e5bad6d6d5f65787472615f696e666fc0a764705f72616e6b00";
    /// Its third: `publish_removed([13])`.
    pub(crate) const REMOVED_13: &str = "85ac7075626c69736865725f6964cf00100c68260b90eea873657175656e636502ac7075626c69736865645f6174cf000001a2521ba4bda5746f706963a96b762d6576656e7473a77061796c6f6164c4799184a9776f726b65725f6964cf694da2521b986205ac73746f726167655f74696572a6646576696365b07265736964656e63795f646f6d61696ea6776f726b6572a56576656e7483a86576656e745f696403a46461746181a772656d6f76656481ac626c6f636b5f686173686573910da764705f72616e6b00";

    pub(crate) fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn reads_what_a_dynamo_worker_published() {
        let bytes = hex(STORED_13_AFTER_12);
        let envelope = decode(&bytes).unwrap();
        assert_eq!(envelope.publisher_id, 0x0010_0c68_260b_90ee);
        assert_eq!(envelope.sequence, 1);
        assert_eq!(envelope.topic, "kv-events");
        assert_eq!(envelope.payload.len(), 0xbf);
    }

    #[test]
    fn writes_what_it_reads() {
        let bytes = hex(REMOVED_13);
        let envelope = decode(&bytes).unwrap();
        assert_eq!(encode(&envelope), bytes);
    }

    #[test]
    fn other_payloads_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            b"hello",
            &[0x85],
            &[0x81, 0xa1, b'x', 0x01],
            &hex(STORED_13_AFTER_12)[..40],
        ] {
            assert!(decode(bytes).is_err(), "{bytes:?}");
        }
    }
}
