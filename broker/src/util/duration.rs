//! Durations in the config file ("250ms", "1s", "15m", "2h", "1h 30m"),
//! parsed by humantime; this file is only the serde glue.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Parses a duration, saying what is wrong in terms an operator can act on.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|error| format!("duration {text:?}: {error} (write e.g. 250ms, 5s, 15m, 2h)"))
}

/// Serde adapter: `#[serde(deserialize_with = "duration::deserialize")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// Serde adapter for optional durations:
/// `#[serde(default, deserialize_with = "duration::deserialize_option")]`.
pub fn deserialize_option<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_forms_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn malformed_durations_name_the_text_and_the_forms() {
        for text in ["10", "ms", "5 parsecs", "99999999999999999999h"] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains(text) && error.contains("250ms"), "{error}");
        }
    }
}
