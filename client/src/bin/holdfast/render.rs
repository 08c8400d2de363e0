//! Keys and values (raw bytes) as text for `get` and `watch` output.
//!
//! etcd keys and values are bytes; they are shown as UTF-8, with invalid
//! sequences replaced by U+FFFD, in text and in JSON alike.

use std::borrow::Cow;

/// The bytes as text, lossily.
pub(crate) fn text(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// The bytes as a quoted, escaped JSON string, lossily.
pub(crate) fn json_string(bytes: &[u8]) -> String {
    serde_json::Value::String(text(bytes).into_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped_and_lossy() {
        assert_eq!(json_string(b"a\"b\n"), r#""a\"b\n""#);
        assert_eq!(json_string(b"\xff"), "\"\u{fffd}\"");
    }
}
