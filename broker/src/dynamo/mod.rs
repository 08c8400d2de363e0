//! The parts of Dynamo's (ai-dynamo-runtime 1.6.1) wire formats the relay
//! reads and writes: the event-plane envelope its runtime wraps every NATS
//! event in, and the KV cache events its workers publish inside it.
//!
//! Only what the relay acts on is decoded; unknown fields are ignored, so a
//! newer runtime that adds fields still decodes.

pub mod envelope;
pub mod kv_event;

use thiserror::Error;

/// Why bytes could not be read as a Dynamo message.
#[derive(Debug, Error)]
#[error("not a Dynamo {what}: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

impl DecodeError {
    fn new(what: &'static str, reason: impl ToString) -> Self {
        Self {
            what,
            reason: reason.to_string(),
        }
    }
}
