//! The error codes shared by relay and client, each marked retryable or not.

use std::fmt;

/// Why an operation failed, as carried in ERROR, PUBACK and RESPONSE frames.
///
/// Codes are stable `u16` values on the wire. A code this version does not
/// know decodes as [`ErrorCode::Unknown`] and is treated as not retryable, so
/// a newer relay never makes an older client retry forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The peer sent bytes that are not a valid frame.
    BadFrame,
    /// A frame's length prefix exceeds the negotiated maximum.
    FrameTooLarge,
    /// No protocol version both sides speak.
    UnsupportedVersion,
    /// The peer's identity may not perform this operation.
    Unauthorized,
    /// NATS is unreachable from the relay.
    NatsUnavailable,
    /// etcd is unreachable from the relay.
    EtcdUnavailable,
    /// The journal's budget for this class is used up.
    JournalFull,
    /// The operation did not complete within its deadline.
    Timeout,
    /// A request found no subscriber to answer it.
    NoResponders,
    /// The subscriber did not keep up and messages were dropped for it.
    SlowConsumer,
    /// A fault inside the relay.
    Internal,
    /// The relay is shutting down; reconnect (to it or another relay).
    ShuttingDown,
    /// A subject, reply subject or queue group is malformed.
    InvalidSubject,
    /// A publish named a message class the relay does not have.
    UnknownClass,
    /// A per-session or per-relay limit (subscriptions, connections, memory) was hit.
    LimitExceeded,
    /// A well-formed frame arrived where the protocol does not allow it.
    ProtocolViolation,
    /// Another live session holds the key (a registration, or a write
    /// through the etcd front end); it is free again once that session ends.
    Conflict,
    /// A code this version of the protocol does not know.
    Unknown(u16),
}

impl ErrorCode {
    /// Every known code, for tables and exhaustive tests.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthorized,
        ErrorCode::NatsUnavailable,
        ErrorCode::EtcdUnavailable,
        ErrorCode::JournalFull,
        ErrorCode::Timeout,
        ErrorCode::NoResponders,
        ErrorCode::SlowConsumer,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::InvalidSubject,
        ErrorCode::UnknownClass,
        ErrorCode::LimitExceeded,
        ErrorCode::ProtocolViolation,
        ErrorCode::Conflict,
    ];

    /// The code's value on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 1,
            ErrorCode::FrameTooLarge => 2,
            ErrorCode::UnsupportedVersion => 3,
            ErrorCode::Unauthorized => 4,
            ErrorCode::NatsUnavailable => 5,
            ErrorCode::EtcdUnavailable => 6,
            ErrorCode::JournalFull => 7,
            ErrorCode::Timeout => 8,
            ErrorCode::NoResponders => 9,
            ErrorCode::SlowConsumer => 10,
            ErrorCode::Internal => 11,
            ErrorCode::ShuttingDown => 12,
            ErrorCode::InvalidSubject => 13,
            ErrorCode::UnknownClass => 14,
            ErrorCode::LimitExceeded => 15,
            ErrorCode::ProtocolViolation => 16,
            ErrorCode::Conflict => 17,
            ErrorCode::Unknown(value) => value,
        }
    }

    /// The code for a wire value; unknown values are kept, not rejected.
    pub fn from_u16(value: u16) -> ErrorCode {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|code| code.to_u16() == value)
            .unwrap_or(ErrorCode::Unknown(value))
    }

    /// Whether repeating the same operation later may succeed.
    ///
    /// Retryable codes describe a state of the world (an outage, a full
    /// journal, a busy subscriber); the others describe the operation itself,
    /// which will fail the same way again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NatsUnavailable
                | ErrorCode::EtcdUnavailable
                | ErrorCode::JournalFull
                | ErrorCode::Timeout
                | ErrorCode::NoResponders
                | ErrorCode::SlowConsumer
                | ErrorCode::Internal
                | ErrorCode::ShuttingDown
        )
    }

    /// A stable snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NatsUnavailable => "nats_unavailable",
            ErrorCode::EtcdUnavailable => "etcd_unavailable",
            ErrorCode::JournalFull => "journal_full",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NoResponders => "no_responders",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::InvalidSubject => "invalid_subject",
            ErrorCode::UnknownClass => "unknown_class",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Unknown(value) => write!(f, "unknown error code {value}"),
            code => f.write_str(code.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.to_u16()), "duplicate value for {code}");
            assert_eq!(ErrorCode::from_u16(code.to_u16()), code);
        }
    }

    #[test]
    fn unknown_codes_survive_and_are_not_retryable() {
        let code = ErrorCode::from_u16(4242);
        assert_eq!(code, ErrorCode::Unknown(4242));
        assert_eq!(code.to_u16(), 4242);
        assert!(!code.is_retryable());
    }

    #[test]
    fn outages_are_retryable_and_bad_input_is_not() {
        assert!(ErrorCode::NatsUnavailable.is_retryable());
        assert!(ErrorCode::JournalFull.is_retryable());
        assert!(!ErrorCode::BadFrame.is_retryable());
        assert!(!ErrorCode::Unauthorized.is_retryable());
        // Another session holds the key until it ends; retrying the same
        // registration at once fails the same way.
        assert!(!ErrorCode::Conflict.is_retryable());
        assert_eq!(ErrorCode::from_u16(17), ErrorCode::Conflict);
        assert_eq!(ErrorCode::Conflict.name(), "conflict");
    }
}
