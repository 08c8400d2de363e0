//! NATS subject rules: validation and wildcard matching.
//!
//! Subjects are dot-separated tokens. In subscriptions, `*` matches exactly
//! one token and `>` (last token only) matches one or more. Both the relay
//! and the client use these functions so that a subject the client accepts
//! is one the relay accepts.

use thiserror::Error;

/// Longest subject accepted, matching nats-server's practical limits.
pub const MAX_SUBJECT_BYTES: usize = 1024;

/// Why a subject is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubjectError {
    #[error("subject is empty")]
    Empty,
    #[error("subject is longer than {MAX_SUBJECT_BYTES} bytes")]
    TooLong,
    #[error("subject has an empty token (leading, trailing or double dot)")]
    EmptyToken,
    #[error("subject contains whitespace")]
    Whitespace,
    #[error("wildcards are only allowed in subscriptions")]
    WildcardNotAllowed,
    #[error("'>' may only be the last token")]
    FullWildcardNotLast,
    #[error("a wildcard must be a whole token")]
    PartialWildcard,
}

/// Checks a subject to publish to: no wildcards.
pub fn validate_publish_subject(subject: &str) -> Result<(), SubjectError> {
    validate(subject, false)
}

/// Checks a subscription subject: `*` and a trailing `>` allowed.
pub fn validate_subscribe_subject(subject: &str) -> Result<(), SubjectError> {
    validate(subject, true)
}

/// Checks a queue group name: one non-empty token without whitespace.
pub fn validate_queue_group(group: &str) -> Result<(), SubjectError> {
    if group.is_empty() {
        return Err(SubjectError::Empty);
    }
    if group.len() > MAX_SUBJECT_BYTES {
        return Err(SubjectError::TooLong);
    }
    if group.chars().any(char::is_whitespace) {
        return Err(SubjectError::Whitespace);
    }
    Ok(())
}

fn validate(subject: &str, wildcards_allowed: bool) -> Result<(), SubjectError> {
    if subject.is_empty() {
        return Err(SubjectError::Empty);
    }
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err(SubjectError::TooLong);
    }
    if subject.is_ascii() {
        return validate_ascii(subject.as_bytes(), wildcards_allowed);
    }
    validate_tokens(subject, wildcards_allowed)
}

/// [`validate_tokens`] in one pass over the bytes, for the subjects nearly
/// every publish has (it is checked for each, at up to a million a
/// second); the same answer for every ASCII subject.
fn validate_ascii(bytes: &[u8], wildcards_allowed: bool) -> Result<(), SubjectError> {
    let mut token_start = 0;
    for end in 0..=bytes.len() {
        if let Some(&byte) = bytes.get(end).filter(|byte| **byte != b'.') {
            // `char::is_whitespace` over ASCII.
            if matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
                return Err(SubjectError::Whitespace);
            }
            continue;
        }
        let token = &bytes[token_start..end];
        if token.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        let is_last = end == bytes.len();
        match token {
            b"*" | b">" if !wildcards_allowed => return Err(SubjectError::WildcardNotAllowed),
            b">" if !is_last => return Err(SubjectError::FullWildcardNotLast),
            b"*" | b">" => {}
            _ if wildcards_allowed && token.iter().any(|byte| matches!(byte, b'*' | b'>')) => {
                return Err(SubjectError::PartialWildcard)
            }
            _ => {}
        }
        token_start = end + 1;
    }
    Ok(())
}

/// Token by token, for any subject (Unicode whitespace included).
fn validate_tokens(subject: &str, wildcards_allowed: bool) -> Result<(), SubjectError> {
    let mut tokens = subject.split('.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        if token.chars().any(char::is_whitespace) {
            return Err(SubjectError::Whitespace);
        }
        let is_last = tokens.peek().is_none();
        match token {
            "*" | ">" if !wildcards_allowed => return Err(SubjectError::WildcardNotAllowed),
            ">" if !is_last => return Err(SubjectError::FullWildcardNotLast),
            "*" | ">" => {}
            _ if token.contains(['*', '>']) && wildcards_allowed => {
                return Err(SubjectError::PartialWildcard)
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `subject` (a literal subject) matches `pattern` (which may hold
/// wildcards). Both are assumed valid.
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (pattern_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(expected), Some(actual)) if expected == actual => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a pattern contains wildcards (and so cannot be published to).
pub fn has_wildcards(pattern: &str) -> bool {
    pattern.split('.').any(|token| token == "*" || token == ">")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subject of up to four characters from an alphabet of the
    /// characters that matter: the one-pass check answers as the token
    /// walk does.
    #[test]
    fn the_ascii_pass_answers_as_the_token_walk_does() {
        const ALPHABET: [&str; 8] = ["a", "b", ".", "*", ">", " ", "\u{b}", "\t"];
        let mut subjects = vec![String::new()];
        let mut checked = 0;
        for _ in 0..4 {
            let longer: Vec<String> = subjects
                .iter()
                .flat_map(|subject| ALPHABET.iter().map(move |c| format!("{subject}{c}")))
                .collect();
            for subject in &longer {
                for wildcards in [false, true] {
                    assert_eq!(
                        validate_ascii(subject.as_bytes(), wildcards),
                        validate_tokens(subject, wildcards),
                        "{subject:?} wildcards {wildcards}"
                    );
                    checked += 1;
                }
            }
            subjects = longer;
        }
        assert_eq!(checked, 2 * (8 + 64 + 512 + 4096));
    }

    #[test]
    fn literal_and_wildcard_matching() {
        assert!(matches("a.b.c", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.y.c"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c.d"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*", "one"));
        assert!(!matches("*", "one.two"));
    }

    #[test]
    fn publish_subjects_reject_wildcards_and_malformed_tokens() {
        assert_eq!(validate_publish_subject("a.b"), Ok(()));
        assert_eq!(validate_publish_subject(""), Err(SubjectError::Empty));
        assert_eq!(
            validate_publish_subject("a..b"),
            Err(SubjectError::EmptyToken)
        );
        assert_eq!(
            validate_publish_subject(".a"),
            Err(SubjectError::EmptyToken)
        );
        assert_eq!(
            validate_publish_subject("a b"),
            Err(SubjectError::Whitespace)
        );
        assert_eq!(
            validate_publish_subject("a.*"),
            Err(SubjectError::WildcardNotAllowed)
        );
        let long = "a".repeat(MAX_SUBJECT_BYTES + 1);
        assert_eq!(validate_publish_subject(&long), Err(SubjectError::TooLong));
    }

    #[test]
    fn subscribe_subjects_allow_whole_token_wildcards_only() {
        assert_eq!(validate_subscribe_subject("a.*.c"), Ok(()));
        assert_eq!(validate_subscribe_subject("a.>"), Ok(()));
        assert_eq!(
            validate_subscribe_subject("a.>.c"),
            Err(SubjectError::FullWildcardNotLast)
        );
        assert_eq!(
            validate_subscribe_subject("a.b*"),
            Err(SubjectError::PartialWildcard)
        );
    }

    #[test]
    fn queue_groups_are_single_names() {
        assert_eq!(validate_queue_group("workers"), Ok(()));
        assert_eq!(validate_queue_group(""), Err(SubjectError::Empty));
        assert_eq!(validate_queue_group("a b"), Err(SubjectError::Whitespace));
    }
}
