//! `ShortText`: a header value assembled on the stack and stored in one
//! exact allocation.
//!
//! The relay writes several such values for every journaled message (chain
//! sequence and digest, `Nats-Msg-Id`). `format!` costs the formatting
//! machinery, and a `String` whose capacity is not its length costs a second
//! allocation when it becomes a [`Text`].

use crate::digits::{hex16, Decimal};
use crate::Text;

/// Bytes kept on the stack before the builder falls back to a `String`.
const INLINE_BYTES: usize = 128;

/// Appends pieces, then [`ShortText::finish`] makes the [`Text`].
pub struct ShortText {
    inline: [u8; INLINE_BYTES],
    len: usize,
    /// Set once a piece did not fit; everything is then written here.
    spilled: Option<String>,
}

impl Default for ShortText {
    fn default() -> ShortText {
        ShortText::new()
    }
}

impl ShortText {
    pub fn new() -> ShortText {
        ShortText {
            inline: [0; INLINE_BYTES],
            len: 0,
            spilled: None,
        }
    }

    pub fn push_str(&mut self, piece: &str) -> &mut ShortText {
        if let Some(spilled) = &mut self.spilled {
            spilled.push_str(piece);
            return self;
        }
        let end = self.len + piece.len();
        if end <= INLINE_BYTES {
            self.inline[self.len..end].copy_from_slice(piece.as_bytes());
            self.len = end;
        } else {
            let mut spilled = String::with_capacity(end);
            spilled.push_str(self.as_inline_str());
            spilled.push_str(piece);
            self.spilled = Some(spilled);
        }
        self
    }

    /// `value` in canonical decimal.
    pub fn push_decimal(&mut self, value: u64) -> &mut ShortText {
        self.push_ascii(Decimal::new(value).as_bytes())
    }

    /// `value` as exactly 16 lowercase hex digits.
    pub fn push_hex16(&mut self, value: u64) -> &mut ShortText {
        self.push_ascii(&hex16(value))
    }

    pub fn finish(&self) -> Text {
        Text::from(self.as_str())
    }

    /// What was written so far, without allocating.
    pub fn as_str(&self) -> &str {
        match &self.spilled {
            Some(spilled) => spilled.as_str(),
            None => self.as_inline_str(),
        }
    }

    /// `ascii` is digits this module wrote: always UTF-8, copied unchecked.
    fn push_ascii(&mut self, ascii: &[u8]) -> &mut ShortText {
        let end = self.len + ascii.len();
        match &mut self.spilled {
            None if end <= INLINE_BYTES => {
                self.inline[self.len..end].copy_from_slice(ascii);
                self.len = end;
                self
            }
            _ => self.push_str(std::str::from_utf8(ascii).unwrap_or_default()),
        }
    }

    fn as_inline_str(&self) -> &str {
        // Only whole `&str` pieces and ASCII digits are ever copied in, so
        // this never fails.
        std::str::from_utf8(&self.inline[..self.len]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_format_writes_them() {
        for value in [0, 7, 10, 255, 1_000_000, u64::MAX] {
            assert_eq!(
                ShortText::new().push_decimal(value).finish().as_str(),
                value.to_string()
            );
            assert_eq!(
                ShortText::new().push_hex16(value).finish().as_str(),
                format!("{value:016x}")
            );
        }
    }

    #[test]
    fn pieces_join_and_long_values_spill_intact() {
        let relay = "r".repeat(100);
        let text = ShortText::new()
            .push_str(&relay)
            .push_str(".kv_events.")
            .push_decimal(42)
            .finish();
        assert_eq!(text.as_str(), format!("{relay}.kv_events.42"));
        let short = ShortText::new().push_str("a").push_str("é").finish();
        assert_eq!(short.as_str(), "aé");
        let mut long = ShortText::new();
        long.push_str(&relay).push_decimal(u64::MAX).push_hex16(7);
        assert_eq!(long.as_str(), format!("{relay}{}{:016x}", u64::MAX, 7));
    }
}
