//! The NATS client protocol, server side, sans-IO: what `holdfastd
//! --nats-listen` needs to look like nats-server to unmodified NATS clients.
//!
//! [`ClientOpDecoder`] turns the bytes a client sends into [`ClientOp`]s; the
//! `encode_*` functions write what a server sends. [`ServerOpDecoder`] is the
//! other direction, for the relay's own upstream subscriber connection: it
//! skips a message other publishers made malformed and goes on. Nothing here does I/O or
//! knows about subscriptions: the connection task decides what each op means.
//!
//! # The subset
//!
//! Grammar as in the NATS client protocol reference
//! (<https://docs.nats.io/reference/reference-protocols/nats-protocol>):
//!
//! | client → server | |
//! |---|---|
//! | `CONNECT {json}` | [`Connect`]: unknown fields ignored, omitted/`null` fields get nats-server's defaults (`verbose`, `pedantic`, `echo` true) |
//! | `PUB <subject> [reply] <#bytes>` + payload + CRLF | [`ClientOp::Pub`] |
//! | `HPUB <subject> [reply] <#header bytes> <#total bytes>` + headers + payload + CRLF | [`ClientOp::HPub`] |
//! | `SUB <subject> [queue group] <sid>` | [`ClientOp::Sub`] |
//! | `UNSUB <sid> [max_msgs]` | [`ClientOp::Unsub`] |
//! | `PING`, `PONG` | [`ClientOp::Ping`], [`ClientOp::Pong`] |
//!
//! | server → client | |
//! |---|---|
//! | `INFO {json}` | [`encode_info`] with [`ServerInfo`] |
//! | `MSG` / `HMSG` | [`encode_msg`] (HMSG when there are headers), [`encode_hmsg`], [`encode_status_msg`] (e.g. 503 no responders) |
//! | `PING`, `PONG`, `+OK`, `-ERR '...'` | [`encode_ping`], [`encode_pong`], [`encode_ok`], [`encode_err`] |
//!
//! Operation names are case-insensitive; arguments are separated by one or
//! more spaces or tabs; control lines end in CRLF or a bare LF (as
//! nats-server accepts), but a payload must be followed by exactly CRLF.
//!
//! # Deliberate differences from nats-server
//!
//! - The control-line limit ([`DEFAULT_MAX_CONTROL_LINE`], 4096 bytes, see
//!   [`ClientOpDecoder::with_max_control_line`]) is exact and covers the whole
//!   line, operation included; nats-server checks only arguments, and only
//!   when a line spans reads. `CONNECT` is subject to it too, as there.
//! - Subjects, reply subjects, queue groups and sids must be UTF-8 without
//!   whitespace ([`NatsProtocolError::NotUtf8`], `InvalidArguments`); NATS
//!   subject syntax is left to the relay.
//! - `PING`/`PONG` with arguments, a line starting with a blank, and
//!   `CONNECT{...}` without a blank are errors (nats-server skips junk after
//!   `PING` and accepts a missing blank after `CONNECT`). Ops only servers
//!   send (`INFO`, `MSG`, `+OK`, `-ERR`) are [`NatsProtocolError::UnknownOperation`].
//! - The HPUB header block is parsed, not passed through: strict CRLF lines,
//!   `NATS/1.0` first (a status after it is accepted and dropped), names of
//!   visible ASCII without `:`, values trimmed, folded lines joined with a
//!   space, duplicates kept in order, at most [`MAX_HEADERS`]. An HPUB
//!   declaring 0 header bytes is read as having no headers.
//! - CONNECT: empty strings count as absent; `protocol` outside 0..=1 and
//!   `no_responders` without `headers` are errors, as in nats-server; a
//!   non-standard `no_echo: true` is honoured like `echo: false`; field names
//!   are case-sensitive (Go's JSON decoder is not).
//!
//! Every [`NatsProtocolError`] closes the connection, after `-ERR` with
//! [`NatsProtocolError::err_message`].

mod client_encode;
mod codec;
mod connect;
mod decoder;
mod error;
mod headers;
mod info;
mod server_encode;
mod server_ops;

pub use client_encode::{encode_client_op, encode_publish, is_sendable_subject, publish_size};
pub use codec::NatsCodecError;
pub use connect::Connect;
pub use decoder::{ClientOp, ClientOpDecoder, DEFAULT_MAX_CONTROL_LINE, DEFAULT_MAX_PAYLOAD};
pub use error::NatsProtocolError;
pub use headers::{
    decode_header_block, encode_header_block, header_block_len, is_valid_header_name, HeaderBlock,
    MAX_HEADERS,
};
pub use info::{encode_info, ServerInfo};
pub use server_encode::{
    encode_err, encode_hmsg, encode_msg, encode_ok, encode_ping, encode_pong, encode_status_msg,
};
pub use server_ops::{ServerOp, ServerOpDecoder, SERVER_MAX_CONTROL_LINE, SERVER_MAX_PAYLOAD};

#[cfg(test)]
mod decoder_tests;
