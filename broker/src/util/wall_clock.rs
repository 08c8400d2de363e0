//! Wall-clock time as the relay stores it: Unix milliseconds.
//!
//! Acceptance times in the journal, ages in the status document and the
//! retention cutoffs all use this one reading, so they agree.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}
