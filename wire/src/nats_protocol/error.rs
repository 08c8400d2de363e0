//! `NatsProtocolError`: why bytes from a NATS client are not the protocol,
//! and what nats-server would tell that client about it.

/// Why bytes received from a NATS client cannot be decoded.
///
/// Every variant is a parse error in nats-server's sense: the stream cannot be
/// trusted afterwards, so the connection is closed after sending
/// `-ERR '`[`err_message`](Self::err_message)`'`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsProtocolError {
    /// The line does not start with an operation a client may send.
    #[error("unknown protocol operation {op:?}")]
    UnknownOperation {
        /// The start of the offending operation name, lossily decoded (for logs).
        op: String,
    },
    /// A control line (operation and arguments, without the line end) is
    /// longer than the decoder's limit.
    #[error("control line exceeds {max} bytes")]
    ControlLineTooLong { max: usize },
    /// PUB/HPUB declared more payload bytes (headers included) than allowed.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes")]
    MaxPayloadExceeded { size: usize, max: usize },
    /// Wrong number of arguments, a size that is not a decimal number, a
    /// header size larger than the total size, whitespace inside a token, ...
    #[error("invalid {op} arguments: {reason}")]
    InvalidArguments {
        op: &'static str,
        reason: &'static str,
    },
    /// The CONNECT argument is not the JSON object it must be.
    #[error("invalid CONNECT: {0}")]
    InvalidConnect(String),
    /// CONNECT asked for a `protocol` other than 0 or 1.
    #[error("unsupported client protocol {0}")]
    InvalidClientProtocol(i64),
    /// CONNECT set `no_responders` without `headers` (503 statuses travel in headers).
    #[error("no_responders requires headers")]
    NoRespondersRequiresHeaders,
    /// The HPUB header block is not `NATS/1.0` + `Name: Value` lines + an empty line.
    #[error("invalid header block: {0}")]
    InvalidHeaders(String),
    /// The payload is not followed by `\r\n`, so the declared size is wrong.
    #[error("payload is not followed by CRLF")]
    MissingPayloadTerminator,
    /// A subject, reply subject, queue group or sid is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
}

impl NatsProtocolError {
    /// The text nats-server sends in `-ERR '...'` for this error.
    ///
    /// Where nats-server has a message of its own, this is it, byte for byte:
    /// a malformed payload terminator is one of its generic parse failures, so
    /// it too reads "Unknown Protocol Operation". For argument, JSON and
    /// header errors nats-server closes without a message; "Parser Error"
    /// (the documented text for "cannot parse the protocol message") gives
    /// the client something to show instead.
    pub fn err_message(&self) -> String {
        let message = match self {
            NatsProtocolError::UnknownOperation { .. }
            | NatsProtocolError::MissingPayloadTerminator => "Unknown Protocol Operation",
            NatsProtocolError::ControlLineTooLong { .. } => "maximum control line exceeded",
            NatsProtocolError::MaxPayloadExceeded { .. } => "Maximum Payload Violation",
            NatsProtocolError::InvalidClientProtocol(_) => "invalid client protocol",
            NatsProtocolError::NoRespondersRequiresHeaders => {
                "no responders requires headers support"
            }
            NatsProtocolError::InvalidArguments { .. }
            | NatsProtocolError::InvalidConnect(_)
            | NatsProtocolError::InvalidHeaders(_)
            | NatsProtocolError::NotUtf8 { .. } => "Parser Error",
        };
        message.to_owned()
    }

    /// Whether nats-server closes the connection after this error.
    ///
    /// Always true: every error here leaves the decoder unsure where the next
    /// operation starts (or, for CONNECT, which options the client wanted).
    /// The recoverable `-ERR`s (invalid subject, permissions, subscription
    /// limits) are the relay's decisions, not decoding errors.
    pub fn closes_connection(&self) -> bool {
        true
    }
}
