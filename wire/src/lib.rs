//! holdfast's framed protocol, sans-IO: bytes in, frames out.
//!
//! The relay (`holdfastd`) and its clients exchange length-prefixed binary
//! frames. This crate owns the frame types ([`Frame`]), the byte layout
//! ([`codec`], documented for other implementers in `PROTOCOL.md`), the error
//! codes both sides share ([`ErrorCode`]) and NATS subject rules
//! ([`subject`]). Nothing here does I/O; [`FrameCodec`] adapts the codec to
//! `tokio_util::codec` for the tasks that do.
//!
//! [`nats_protocol`] is the server side of the NATS client protocol, for the
//! relay's NATS-compatible front end.

pub mod backoff;
pub mod chain;
pub mod codec;
pub mod digits;
mod error_code;
mod frame;
pub mod nats_protocol;
mod short_text;
pub mod subject;
mod text;

pub use codec::{
    encode, encoded_len, CodecError, DecodeError, EncodeError, FrameCodec, FrameDecoder,
};
pub use error_code::ErrorCode;
pub use frame::*;
pub use short_text::ShortText;
pub use text::{Text, Utf8Error};

/// The protocol version this crate speaks; negotiated in HELLO/WELCOME.
pub const PROTOCOL_VERSION: u16 = 1;

/// Default upper bound on one frame (type byte plus body), in bytes.
///
/// Large enough for NATS's default 1 MiB payload plus subject and headers.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 4 * 1024 * 1024;
