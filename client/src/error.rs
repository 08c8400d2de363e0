//! The client's error type: every failure says its code and whether a retry may help.

use crate::tls::TlsError;
use crate::url::{RelayUrl, UrlError};
use holdfast_wire::subject::SubjectError;
use holdfast_wire::ErrorCode;

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The relay refused or failed the operation and said why.
    #[error("{code}: {message}")]
    Relay { code: ErrorCode, message: String },
    /// The client is not connected to the relay right now (and the operation
    /// is one that is not buffered while offline).
    #[error("not connected to the holdfast relay")]
    RelayUnavailable,
    /// The first connection to the relay could not be made: unreachable,
    /// or (on QUIC) the TLS handshake failed; the message says which.
    #[error("cannot connect to the holdfast relay at {url}: {source}")]
    Connect {
        url: RelayUrl,
        #[source]
        source: std::io::Error,
    },
    /// The operation was sent to the relay but the connection died before
    /// its outcome arrived: it may or may not have taken effect.
    #[error("connection to the relay was lost before the outcome was known")]
    ConnectionLost,
    /// The relay is unreachable and the offline buffer is at its bound.
    #[error("the offline buffer is full")]
    BufferFull,
    /// No answer within the deadline.
    #[error("timed out")]
    Timeout,
    #[error("invalid subject: {0}")]
    InvalidSubject(#[from] SubjectError),
    /// A registration key or discovery prefix the relay would refuse.
    #[error("invalid key: {reason}")]
    InvalidKey { reason: &'static str },
    /// The message would not fit in one frame the relay accepts.
    #[error("message of {size} bytes exceeds the relay's frame limit of {max} bytes")]
    MessageTooLarge { size: usize, max: u32 },
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The TLS settings a `quic://` relay needs are missing or unusable
    /// (no CA, a file that cannot be read or parsed, a certificate without
    /// its key).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The relay's status document is not JSON.
    #[error("the relay sent an invalid status document: {0}")]
    InvalidStatus(#[source] serde_json::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The client was closed; no further operations are possible.
    #[error("the client is closed")]
    Closed,
}

impl Error {
    /// The protocol error code this error corresponds to, if any: the relay's
    /// code for [`Error::Relay`], and the matching code for local failures
    /// the relay would have reported the same way.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Relay { code, .. } => Some(*code),
            Error::Timeout => Some(ErrorCode::Timeout),
            Error::InvalidSubject(_) => Some(ErrorCode::InvalidSubject),
            Error::MessageTooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            _ => None,
        }
    }

    /// Whether repeating the operation later may succeed (R9).
    ///
    /// Outages, timeouts, lost connections and full buffers are retryable;
    /// malformed input and a closed client are not. A retry after
    /// [`Error::ConnectionLost`] may duplicate the operation, because its
    /// first attempt may have taken effect.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Relay { code, .. } => code.is_retryable(),
            Error::RelayUnavailable
            | Error::Connect { .. }
            | Error::ConnectionLost
            | Error::BufferFull
            | Error::Timeout
            | Error::Io(_) => true,
            Error::InvalidSubject(_)
            | Error::InvalidKey { .. }
            | Error::MessageTooLarge { .. }
            | Error::Url(_)
            | Error::Tls(_)
            | Error::InvalidStatus(_)
            | Error::Closed => false,
        }
    }

    /// A stable snake_case name for the error: the relay's code name for
    /// [`Error::Relay`], otherwise the kind of local failure. For logs,
    /// metric labels and the CLI's `error: <name> ...` line.
    pub fn name(&self) -> &'static str {
        match self {
            Error::Relay { code, .. } => code.name(),
            Error::RelayUnavailable | Error::Connect { .. } => "relay_unavailable",
            Error::ConnectionLost => "connection_lost",
            Error::BufferFull => "buffer_full",
            Error::Timeout => "timeout",
            Error::InvalidSubject(_) => "invalid_subject",
            Error::InvalidKey { .. } => "invalid_key",
            Error::MessageTooLarge { .. } => "frame_too_large",
            Error::Url(_) => "invalid_url",
            Error::Tls(_) => "invalid_tls_config",
            Error::InvalidStatus(_) => "invalid_status",
            Error::Io(_) => "io",
            Error::Closed => "closed",
        }
    }

    /// The human part of the error, without the code: the relay's message
    /// for [`Error::Relay`], the full description otherwise.
    pub fn detail(&self) -> String {
        match self {
            Error::Relay { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    pub(crate) fn relay(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Relay {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_errors_carry_their_code_and_its_retryability() {
        let outage = Error::relay(ErrorCode::NatsUnavailable, "nats down");
        assert_eq!(outage.code(), Some(ErrorCode::NatsUnavailable));
        assert!(outage.is_retryable());
        assert_eq!(outage.name(), "nats_unavailable");
        assert_eq!(outage.detail(), "nats down");

        let refused = Error::relay(ErrorCode::UnknownClass, "no class x");
        assert!(!refused.is_retryable());
    }

    #[test]
    fn local_errors_say_whether_to_retry() {
        assert!(Error::RelayUnavailable.is_retryable());
        assert!(Error::ConnectionLost.is_retryable());
        assert!(Error::BufferFull.is_retryable());
        assert!(Error::Timeout.is_retryable());
        assert!(!Error::Closed.is_retryable());
        assert!(!Error::InvalidSubject(SubjectError::Empty).is_retryable());
        assert!(!Error::InvalidKey { reason: "empty" }.is_retryable());
        assert!(!Error::Tls(TlsError::MissingCa).is_retryable());
        assert_eq!(Error::Tls(TlsError::MissingCa).name(), "invalid_tls_config");
        assert_eq!(Error::Timeout.code(), Some(ErrorCode::Timeout));
        assert_eq!(Error::BufferFull.code(), None);
    }
}
