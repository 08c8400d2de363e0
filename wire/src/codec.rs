//! The byte layout of every frame: a sans-IO encoder and incremental decoder.
//!
//! [`encode`] appends a frame to a `BytesMut`; [`FrameDecoder::decode`] takes
//! whole frames off the front of one. Neither touches a socket, so the relay
//! and the client drive them from whatever I/O they have, and
//! [`FrameCodec`] packages both for `tokio_util::codec::Framed`.
//!
//! The layout is the contract in `PROTOCOL.md`: a big-endian `u32` length
//! (type byte plus body), the type byte, then the body. The decoder is strict
//! (unknown types, bad enum values and leftover bytes are errors, because a
//! peer that disagrees about the layout must not be half-understood) and
//! defensive (the length prefix is checked against the limit before a single
//! byte is reserved for the frame). Decoded subjects, headers and payloads are
//! slices of the receive buffer, not copies.
//!
//! Optional strings (`reply`, `class`, `queue_group`) encode absence as length
//! 0, so `Some("")` encodes exactly like `None` and decodes as `None`. That is
//! not a loss in practice: subjects, reply subjects, class names and queue
//! groups are never legitimately empty.

use crate::frame::frame_type;
use crate::{
    AckOutcome, Deregister, ErrorCode, ErrorFrame, Frame, Get, GetOutcome, GetResponse, GoAway,
    Headers, Hello, KeyValue, LinkState, LinkStatus, Message, Ping, Pong, PubAck, Publish,
    Register, RegisterAck, RegistrationOutcome, Request, Response, ResponseOutcome, Service,
    Snapshot, StatusRequest, StatusResponse, Subscribe, Text, Unsubscribe, Unwatch, Watch,
    WatchEvent, WatchEventKind, Welcome,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the length prefix in front of every frame.
const PREFIX_LEN: usize = 4;

/// Longest string a `str16` field can carry.
const MAX_STR16: usize = u16::MAX as usize;

/// Longest byte string a `bytes32` field can carry.
const MAX_BYTES32: usize = u32::MAX as usize;

/// Why bytes received from a peer are not a valid frame.
///
/// Every variant means the peer does not speak the protocol as documented;
/// the stream cannot be trusted afterwards and should be closed after telling
/// the peer [`DecodeError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u32, max: u32 },
    /// The length prefix is 0, so there is not even a type byte.
    #[error("frame has length 0 (no type byte)")]
    EmptyFrame,
    /// The type byte names no frame this version knows (reserved ranges included).
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// The body ends before all of the frame's fields were read.
    #[error("frame type 0x{frame_type:02x} is truncated")]
    Truncated { frame_type: u8 },
    /// The body has bytes left after all of the frame's fields were read.
    #[error("frame type 0x{frame_type:02x} has trailing bytes")]
    TrailingBytes { frame_type: u8 },
    /// A string field is not UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// An enum field holds a value with no meaning.
    #[error("field `{field}` has invalid value {value}")]
    InvalidValue { field: &'static str, value: u64 },
}

impl DecodeError {
    /// The code to report to the peer before closing the connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Why a frame cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string, byte string or header list is longer than its length field
    /// can express (`len` is the header count for `field == "headers"`).
    #[error("field `{field}` is {len} long, more than the {max} the wire allows")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// The encoded frame (type byte plus body, as in the length prefix) is
    /// larger than the limit the peer accepts.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: u32 },
}

/// Any failure of [`FrameCodec`]: the socket, or the bytes on it.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Incremental frame decoder: feed it a growing buffer, take whole frames out.
///
/// It holds no partial state of its own (the length prefix is re-read from
/// the buffer on every call), so the buffer is the only thing to keep.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_bytes: u32,
}

impl FrameDecoder {
    /// A decoder accepting frames whose length prefix is at most `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameDecoder { max_frame_bytes }
    }

    /// The largest length prefix accepted.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// Changes the limit, e.g. after WELCOME negotiated one.
    pub fn set_max_frame_bytes(&mut self, max: u32) {
        self.max_frame_bytes = max;
    }

    /// Takes the next frame off the front of `buf`.
    ///
    /// `Ok(None)` means the frame is not complete yet; `buf`'s contents are
    /// untouched, but once the length prefix has passed the limit check,
    /// `buf` is asked for room for the whole frame (at most
    /// `max_frame_bytes + 4` bytes) so the next read can complete it. On
    /// `Ok(Some)` the frame's bytes are consumed from `buf`.
    ///
    /// On error: [`DecodeError::FrameTooLarge`] and
    /// [`DecodeError::EmptyFrame`] leave `buf` as it was; every other error
    /// has consumed the offending frame. The protocol has no way to
    /// resynchronise after a bad frame, so callers should close either way.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len == 0 {
            return Err(DecodeError::EmptyFrame);
        }
        if len > self.max_frame_bytes {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        let total = (len as usize).saturating_add(PREFIX_LEN);
        if buf.len() < total {
            // Safe to reserve now: `total` is bounded by the limit checked
            // above. Reserving the whole frame lets one read complete it.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(PREFIX_LEN);
        decode_frame(frame).map(Some)
    }
}

/// Appends one encoded frame to `dst`.
///
/// `max_frame_bytes` is the limit the receiving peer enforces on the length
/// prefix. On error `dst` is left exactly as it was: the frame is measured
/// and checked in full before anything is written.
pub fn encode(frame: &Frame, max_frame_bytes: u32, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let mut measure = Measure::default();
    write_frame(frame, &mut measure);
    if let Some(error) = measure.error {
        return Err(error);
    }
    let len = measure.len;
    if len > max_frame_bytes as usize {
        return Err(EncodeError::FrameTooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    dst.reserve(PREFIX_LEN + len);
    // `len <= max_frame_bytes`, a u32, so the cast is lossless.
    dst.put_u32(len as u32);
    let start = dst.len();
    write_frame(frame, &mut Writer(dst));
    debug_assert_eq!(dst.len() - start, len, "measure and write disagree");
    Ok(())
}

/// The exact number of bytes [`encode`] appends for `frame`, including the
/// 4-byte length prefix (for a frame that cannot be encoded, the size it
/// would have).
pub fn encoded_len(frame: &Frame) -> usize {
    let mut measure = Measure::default();
    write_frame(frame, &mut measure);
    PREFIX_LEN.saturating_add(measure.len)
}

/// [`FrameDecoder`] and [`encode`] as a `tokio_util` codec.
///
/// One limit serves both directions: frames larger than it are neither
/// accepted nor sent.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    decoder: FrameDecoder,
}

impl FrameCodec {
    /// A codec with the same frame limit for reading and writing.
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameCodec {
            decoder: FrameDecoder::new(max_frame_bytes),
        }
    }

    /// The limit currently applied in both directions.
    pub fn max_frame_bytes(&self) -> u32 {
        self.decoder.max_frame_bytes()
    }

    /// Changes the limit for both directions.
    pub fn set_max_frame_bytes(&mut self, max: u32) {
        self.decoder.set_max_frame_bytes(max);
    }
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decoder.decode(src)?)
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(encode(&frame, self.decoder.max_frame_bytes(), dst)?)
    }
}

impl tokio_util::codec::Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(encode(frame, self.decoder.max_frame_bytes(), dst)?)
    }
}

// ---------------------------------------------------------------------------
// Encoding
//
// The layout is written once, in `write_frame`, against the `Sink` trait. It
// runs twice per frame: against `Measure` to size and validate it, then
// against `Writer` to emit it. Sharing one description is what guarantees
// that `encoded_len` is exact and that a failed `encode` writes nothing.

/// Where `write_frame` puts fields.
trait Sink {
    fn u8(&mut self, value: u8);
    fn u16(&mut self, value: u16);
    fn u32(&mut self, value: u32);
    fn u64(&mut self, value: u64);
    /// A `u16` length (or count) of `field`.
    fn len16(&mut self, field: &'static str, len: usize);
    /// A `u32` length of `field`.
    fn len32(&mut self, field: &'static str, len: usize);
    fn raw(&mut self, bytes: &[u8]);

    fn str16(&mut self, field: &'static str, text: &Text) {
        self.len16(field, text.len());
        self.raw(text.as_bytes());
    }

    fn opt_str16(&mut self, field: &'static str, text: Option<&Text>) {
        match text {
            Some(text) => self.str16(field, text),
            None => self.u16(0),
        }
    }

    fn bytes32(&mut self, field: &'static str, bytes: &[u8]) {
        self.len32(field, bytes.len());
        self.raw(bytes);
    }

    fn bytes16(&mut self, field: &'static str, bytes: &[u8]) {
        self.len16(field, bytes.len());
        self.raw(bytes);
    }

    fn headers(&mut self, headers: &Headers) {
        self.len16("headers", headers.len());
        for (name, value) in headers.iter() {
            self.str16("header name", name);
            self.str16("header value", value);
        }
    }

    fn error_code(&mut self, code: ErrorCode) {
        self.u16(code.to_u16());
    }
}

/// Sizes a frame and remembers the first field that does not fit.
#[derive(Default)]
struct Measure {
    len: usize,
    error: Option<EncodeError>,
}

impl Measure {
    fn add(&mut self, n: usize) {
        self.len = self.len.saturating_add(n);
    }

    fn check(&mut self, field: &'static str, len: usize, max: usize) {
        if len > max && self.error.is_none() {
            self.error = Some(EncodeError::FieldTooLong { field, len, max });
        }
    }
}

impl Sink for Measure {
    fn u8(&mut self, _: u8) {
        self.add(1);
    }
    fn u16(&mut self, _: u16) {
        self.add(2);
    }
    fn u32(&mut self, _: u32) {
        self.add(4);
    }
    fn u64(&mut self, _: u64) {
        self.add(8);
    }
    fn len16(&mut self, field: &'static str, len: usize) {
        self.check(field, len, MAX_STR16);
        self.add(2);
    }
    fn len32(&mut self, field: &'static str, len: usize) {
        self.check(field, len, MAX_BYTES32);
        self.add(4);
    }
    fn raw(&mut self, bytes: &[u8]) {
        self.add(bytes.len());
    }
}

/// Emits a frame that `Measure` has already accepted.
struct Writer<'a>(&'a mut BytesMut);

impl Sink for Writer<'_> {
    fn u8(&mut self, value: u8) {
        self.0.put_u8(value);
    }
    fn u16(&mut self, value: u16) {
        self.0.put_u16(value);
    }
    fn u32(&mut self, value: u32) {
        self.0.put_u32(value);
    }
    fn u64(&mut self, value: u64) {
        self.0.put_u64(value);
    }
    fn len16(&mut self, _: &'static str, len: usize) {
        // `Measure` rejected anything above u16::MAX before we got here.
        self.0.put_u16(len as u16);
    }
    fn len32(&mut self, _: &'static str, len: usize) {
        // `Measure` rejected anything above u32::MAX before we got here.
        self.0.put_u32(len as u32);
    }
    fn raw(&mut self, bytes: &[u8]) {
        self.0.put_slice(bytes);
    }
}

/// The type byte and body of `frame`, in wire order.
fn write_frame<S: Sink>(frame: &Frame, out: &mut S) {
    out.u8(frame.frame_type());
    match frame {
        Frame::Hello(hello) => {
            out.u16(hello.min_version);
            out.u16(hello.max_version);
            out.u64(hello.instance_id);
            out.str16("client_name", &hello.client_name);
        }
        Frame::Welcome(welcome) => {
            out.u16(welcome.version);
            out.u64(welcome.session_id);
            out.u64(welcome.instance_id);
            out.u32(welcome.max_frame_bytes);
            out.u8(link_status_to_u8(welcome.nats));
            out.u8(link_status_to_u8(welcome.etcd));
            out.str16("relay_id", &welcome.relay_id);
        }
        Frame::Publish(publish) => {
            out.u64(publish.ack_id);
            out.str16("subject", &publish.subject);
            out.opt_str16("reply", publish.reply.as_ref());
            out.opt_str16("class", publish.class.as_ref());
            out.headers(&publish.headers);
            out.bytes32("payload", &publish.payload);
        }
        Frame::PubAck(ack) => {
            out.u64(ack.ack_id);
            out.u32(ack.local_deliveries);
            match &ack.outcome {
                AckOutcome::Forwarded => out.u8(ACK_FORWARDED),
                AckOutcome::Journaled => out.u8(ACK_JOURNALED),
                AckOutcome::Queued => out.u8(ACK_QUEUED),
                AckOutcome::Rejected { code, message } => {
                    out.u8(ACK_REJECTED);
                    out.error_code(*code);
                    out.str16("message", message);
                }
            }
        }
        Frame::Subscribe(subscribe) => {
            out.u32(subscribe.sid);
            out.str16("subject", &subscribe.subject);
            out.opt_str16("queue_group", subscribe.queue_group.as_ref());
        }
        Frame::Unsubscribe(unsubscribe) => out.u32(unsubscribe.sid),
        Frame::Message(message) => {
            out.u32(message.sid);
            out.str16("subject", &message.subject);
            out.opt_str16("reply", message.reply.as_ref());
            out.headers(&message.headers);
            out.bytes32("payload", &message.payload);
        }
        Frame::Request(request) => {
            out.u64(request.request_id);
            out.u32(request.timeout_ms);
            out.str16("subject", &request.subject);
            out.headers(&request.headers);
            out.bytes32("payload", &request.payload);
        }
        Frame::Response(response) => {
            out.u64(response.request_id);
            match &response.outcome {
                ResponseOutcome::Reply { headers, payload } => {
                    out.u8(RESPONSE_REPLY);
                    out.headers(headers);
                    out.bytes32("payload", payload);
                }
                ResponseOutcome::Failed { code, message } => {
                    out.u8(RESPONSE_FAILED);
                    out.error_code(*code);
                    out.str16("message", message);
                }
            }
        }
        Frame::Ping(ping) => out.u64(ping.nonce),
        Frame::Pong(pong) => out.u64(pong.nonce),
        Frame::Error(error) => {
            out.error_code(error.code);
            out.u64(error.reference);
            out.str16("message", &error.message);
        }
        Frame::GoAway(go_away) => {
            out.error_code(go_away.code);
            out.str16("message", &go_away.message);
        }
        Frame::LinkState(link) => {
            out.u8(service_to_u8(link.service));
            out.u8(link_status_to_u8(link.status));
        }
        Frame::StatusRequest(request) => out.u64(request.request_id),
        Frame::StatusResponse(response) => {
            out.u64(response.request_id);
            out.bytes32("json", &response.json);
        }
        Frame::Register(register) => {
            out.u64(register.request_id);
            out.bytes16("key", &register.key);
            out.bytes32("value", &register.value);
        }
        Frame::Deregister(deregister) => {
            out.u64(deregister.request_id);
            out.bytes16("key", &deregister.key);
        }
        Frame::RegisterAck(ack) => {
            out.u64(ack.request_id);
            match &ack.outcome {
                RegistrationOutcome::Applied => out.u8(REGISTRATION_APPLIED),
                RegistrationOutcome::Buffered => out.u8(REGISTRATION_BUFFERED),
                RegistrationOutcome::Rejected { code, message } => {
                    out.u8(REGISTRATION_REJECTED);
                    out.error_code(*code);
                    out.str16("message", message);
                }
            }
        }
        Frame::Get(get) => {
            out.u64(get.request_id);
            out.u8(u8::from(get.linearizable));
            out.bytes16("prefix", &get.prefix);
        }
        Frame::GetResponse(response) => {
            out.u64(response.request_id);
            match &response.outcome {
                GetOutcome::Snapshot(snapshot) => {
                    out.u8(GET_SNAPSHOT);
                    out.u64(snapshot.revision);
                    out.u8(u8::from(snapshot.stale));
                    out.u64(snapshot.age_ms);
                    out.len32("entries", snapshot.entries.len());
                    for entry in &snapshot.entries {
                        out.bytes16("key", &entry.key);
                        out.bytes32("value", &entry.value);
                    }
                }
                GetOutcome::Failed { code, message } => {
                    out.u8(GET_FAILED);
                    out.error_code(*code);
                    out.str16("message", message);
                }
            }
        }
        Frame::Watch(watch) => {
            out.u32(watch.watch_id);
            out.u8(u8::from(watch.send_initial));
            out.bytes16("prefix", &watch.prefix);
        }
        Frame::Unwatch(unwatch) => out.u32(unwatch.watch_id),
        Frame::WatchEvent(event) => {
            out.u32(event.watch_id);
            out.u64(event.revision);
            out.u8(watch_event_kind_to_u8(event.kind));
            out.bytes16("key", &event.key);
            out.bytes32("value", &event.value);
        }
    }
}

// Enum values on the wire.
const ACK_FORWARDED: u8 = 0;
const ACK_JOURNALED: u8 = 1;
const ACK_QUEUED: u8 = 2;
const ACK_REJECTED: u8 = 3;
const RESPONSE_REPLY: u8 = 0;
const RESPONSE_FAILED: u8 = 1;
const REGISTRATION_APPLIED: u8 = 0;
const REGISTRATION_BUFFERED: u8 = 1;
const REGISTRATION_REJECTED: u8 = 2;
const GET_SNAPSHOT: u8 = 0;
const GET_FAILED: u8 = 1;
const WATCH_PUT: u8 = 1;
const WATCH_DELETE: u8 = 2;
const WATCH_SYNCED: u8 = 3;

fn watch_event_kind_to_u8(kind: WatchEventKind) -> u8 {
    match kind {
        WatchEventKind::Put => WATCH_PUT,
        WatchEventKind::Delete => WATCH_DELETE,
        WatchEventKind::Synced => WATCH_SYNCED,
    }
}

fn link_status_to_u8(status: LinkStatus) -> u8 {
    match status {
        LinkStatus::Unknown => 0,
        LinkStatus::Up => 1,
        LinkStatus::Down => 2,
    }
}

fn service_to_u8(service: Service) -> u8 {
    match service {
        Service::Nats => 1,
        Service::Etcd => 2,
    }
}

// ---------------------------------------------------------------------------
// Decoding

/// Parses one frame: `frame` is the type byte and body, prefix already removed.
fn decode_frame(frame: Bytes) -> Result<Frame, DecodeError> {
    let mut r = Reader {
        frame_type: frame.first().copied().unwrap_or(0),
        buf: frame,
    };
    // The caller guarantees length >= 1, so this never reports Truncated.
    let ty = r.u8()?;
    let decoded = match ty {
        frame_type::HELLO => Frame::Hello(Hello {
            min_version: r.u16()?,
            max_version: r.u16()?,
            instance_id: r.u64()?,
            client_name: r.str16("client_name")?,
        }),
        frame_type::WELCOME => Frame::Welcome(Welcome {
            version: r.u16()?,
            session_id: r.u64()?,
            instance_id: r.u64()?,
            max_frame_bytes: r.u32()?,
            nats: r.link_status("nats")?,
            etcd: r.link_status("etcd")?,
            relay_id: r.str16("relay_id")?,
        }),
        frame_type::PUBLISH => Frame::Publish(Publish {
            ack_id: r.u64()?,
            subject: r.str16("subject")?,
            reply: r.opt_str16("reply")?,
            class: r.opt_str16("class")?,
            headers: r.headers()?,
            payload: r.bytes32()?,
        }),
        frame_type::PUB_ACK => {
            let ack_id = r.u64()?;
            let local_deliveries = r.u32()?;
            let outcome = match r.u8()? {
                ACK_FORWARDED => AckOutcome::Forwarded,
                ACK_JOURNALED => AckOutcome::Journaled,
                ACK_QUEUED => AckOutcome::Queued,
                ACK_REJECTED => AckOutcome::Rejected {
                    code: r.error_code()?,
                    message: r.str16("message")?,
                },
                other => return Err(invalid("outcome", other)),
            };
            Frame::PubAck(PubAck {
                ack_id,
                outcome,
                local_deliveries,
            })
        }
        frame_type::SUBSCRIBE => Frame::Subscribe(Subscribe {
            sid: r.u32()?,
            subject: r.str16("subject")?,
            queue_group: r.opt_str16("queue_group")?,
        }),
        frame_type::UNSUBSCRIBE => Frame::Unsubscribe(Unsubscribe { sid: r.u32()? }),
        frame_type::MESSAGE => Frame::Message(Message {
            sid: r.u32()?,
            subject: r.str16("subject")?,
            reply: r.opt_str16("reply")?,
            headers: r.headers()?,
            payload: r.bytes32()?,
        }),
        frame_type::REQUEST => Frame::Request(Request {
            request_id: r.u64()?,
            timeout_ms: r.u32()?,
            subject: r.str16("subject")?,
            headers: r.headers()?,
            payload: r.bytes32()?,
        }),
        frame_type::RESPONSE => {
            let request_id = r.u64()?;
            let outcome = match r.u8()? {
                RESPONSE_REPLY => ResponseOutcome::Reply {
                    headers: r.headers()?,
                    payload: r.bytes32()?,
                },
                RESPONSE_FAILED => ResponseOutcome::Failed {
                    code: r.error_code()?,
                    message: r.str16("message")?,
                },
                other => return Err(invalid("outcome", other)),
            };
            Frame::Response(Response {
                request_id,
                outcome,
            })
        }
        frame_type::PING => Frame::Ping(Ping { nonce: r.u64()? }),
        frame_type::PONG => Frame::Pong(Pong { nonce: r.u64()? }),
        frame_type::ERROR => Frame::Error(ErrorFrame {
            code: r.error_code()?,
            reference: r.u64()?,
            message: r.str16("message")?,
        }),
        frame_type::GO_AWAY => Frame::GoAway(GoAway {
            code: r.error_code()?,
            message: r.str16("message")?,
        }),
        frame_type::LINK_STATE => Frame::LinkState(LinkState {
            service: r.service()?,
            status: r.link_status("status")?,
        }),
        frame_type::STATUS_REQUEST => Frame::StatusRequest(StatusRequest {
            request_id: r.u64()?,
        }),
        frame_type::STATUS_RESPONSE => Frame::StatusResponse(StatusResponse {
            request_id: r.u64()?,
            json: r.bytes32()?,
        }),
        frame_type::REGISTER => Frame::Register(Register {
            request_id: r.u64()?,
            key: r.bytes16()?,
            value: r.bytes32()?,
        }),
        frame_type::DEREGISTER => Frame::Deregister(Deregister {
            request_id: r.u64()?,
            key: r.bytes16()?,
        }),
        frame_type::REGISTER_ACK => {
            let request_id = r.u64()?;
            let outcome = match r.u8()? {
                REGISTRATION_APPLIED => RegistrationOutcome::Applied,
                REGISTRATION_BUFFERED => RegistrationOutcome::Buffered,
                REGISTRATION_REJECTED => RegistrationOutcome::Rejected {
                    code: r.error_code()?,
                    message: r.str16("message")?,
                },
                other => return Err(invalid("outcome", other)),
            };
            Frame::RegisterAck(RegisterAck {
                request_id,
                outcome,
            })
        }
        frame_type::GET => Frame::Get(Get {
            request_id: r.u64()?,
            linearizable: r.flag("linearizable")?,
            prefix: r.bytes16()?,
        }),
        frame_type::GET_RESPONSE => {
            let request_id = r.u64()?;
            let outcome = match r.u8()? {
                GET_SNAPSHOT => GetOutcome::Snapshot(r.snapshot()?),
                GET_FAILED => GetOutcome::Failed {
                    code: r.error_code()?,
                    message: r.str16("message")?,
                },
                other => return Err(invalid("outcome", other)),
            };
            Frame::GetResponse(GetResponse {
                request_id,
                outcome,
            })
        }
        frame_type::WATCH => Frame::Watch(Watch {
            watch_id: r.u32()?,
            send_initial: r.flag("send_initial")?,
            prefix: r.bytes16()?,
        }),
        frame_type::UNWATCH => Frame::Unwatch(Unwatch { watch_id: r.u32()? }),
        frame_type::WATCH_EVENT => Frame::WatchEvent(WatchEvent {
            watch_id: r.u32()?,
            revision: r.u64()?,
            kind: match r.u8()? {
                WATCH_PUT => WatchEventKind::Put,
                WATCH_DELETE => WatchEventKind::Delete,
                WATCH_SYNCED => WatchEventKind::Synced,
                other => return Err(invalid("kind", other)),
            },
            key: r.bytes16()?,
            value: r.bytes32()?,
        }),
        other => return Err(DecodeError::UnknownFrameType(other)),
    };
    r.finish()?;
    Ok(decoded)
}

fn invalid(field: &'static str, value: impl Into<u64>) -> DecodeError {
    DecodeError::InvalidValue {
        field,
        value: value.into(),
    }
}

/// Reads fields off the front of one frame's bytes, bounds-checked.
struct Reader {
    buf: Bytes,
    /// For error reports.
    frame_type: u8,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                frame_type: self.frame_type,
            });
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    /// The next `n` bytes, sharing the frame's buffer.
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        if n == self.buf.len() {
            // The frame's last field (a publish's payload) takes the rest
            // as it is: splitting would add a reference to the read buffer
            // here and drop the frame's own a moment later, two atomic
            // operations on a count other threads change, per message.
            return Ok(std::mem::take(&mut self.buf));
        }
        Ok(self.buf.split_to(n))
    }

    fn str16(&mut self, field: &'static str) -> Result<Text, DecodeError> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        Text::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    fn opt_str16(&mut self, field: &'static str) -> Result<Option<Text>, DecodeError> {
        let text = self.str16(field)?;
        Ok((!text.is_empty()).then_some(text))
    }

    fn bytes32(&mut self) -> Result<Bytes, DecodeError> {
        // A length that does not fit in usize cannot fit in the frame either.
        let len = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        self.take(len)
    }

    fn bytes16(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    /// A `u8` that must be 0 or 1.
    fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(invalid(field, other)),
        }
    }

    fn snapshot(&mut self) -> Result<Snapshot, DecodeError> {
        let revision = self.u64()?;
        let stale = self.flag("stale")?;
        let age_ms = self.u64()?;
        let count = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        // Each entry takes at least 6 bytes (two empty lengths), so a count
        // the frame cannot hold must not size the allocation.
        let mut entries = Vec::with_capacity(count.min(self.buf.len() / 6));
        for _ in 0..count {
            entries.push(KeyValue {
                key: self.bytes16()?,
                value: self.bytes32()?,
            });
        }
        Ok(Snapshot {
            revision,
            stale,
            age_ms,
            entries,
        })
    }

    fn headers(&mut self) -> Result<Headers, DecodeError> {
        let count = usize::from(self.u16()?);
        if count == 0 {
            return Ok(Headers::new());
        }
        // Each header takes at least 4 bytes (two empty str16s), so a count
        // the frame cannot hold must not size the allocation.
        let mut headers = Vec::with_capacity(count.min(self.buf.len() / 4));
        for _ in 0..count {
            let name = self.str16("header name")?;
            let value = self.str16("header value")?;
            headers.push((name, value));
        }
        Ok(Headers(headers))
    }

    fn error_code(&mut self) -> Result<ErrorCode, DecodeError> {
        Ok(ErrorCode::from_u16(self.u16()?))
    }

    fn link_status(&mut self, field: &'static str) -> Result<LinkStatus, DecodeError> {
        match self.u8()? {
            0 => Ok(LinkStatus::Unknown),
            1 => Ok(LinkStatus::Up),
            2 => Ok(LinkStatus::Down),
            other => Err(invalid(field, other)),
        }
    }

    fn service(&mut self) -> Result<Service, DecodeError> {
        match self.u8()? {
            1 => Ok(Service::Nats),
            2 => Ok(Service::Etcd),
            other => Err(invalid("service", other)),
        }
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                frame_type: self.frame_type,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1024;

    fn headers() -> Headers {
        let mut headers = Headers::new();
        headers.insert("Nats-Msg-Id", "m-1");
        headers.insert("trace", "ab");
        headers
    }

    fn one_of_each() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                min_version: 1,
                max_version: 3,
                client_name: Text::from("prefill-worker-3"),
                instance_id: 0x0102_0304_0506_0708,
            }),
            Frame::Welcome(Welcome {
                version: 1,
                session_id: 42,
                instance_id: 7,
                relay_id: Text::from("relay-a"),
                max_frame_bytes: 4 << 20,
                nats: LinkStatus::Up,
                etcd: LinkStatus::Down,
            }),
            Frame::Publish(Publish {
                ack_id: 9,
                subject: Text::from("kv.events.1"),
                reply: Some(Text::from("_INBOX.x")),
                class: Some(Text::from("kv_events")),
                headers: headers(),
                payload: Bytes::from_static(b"\x00\x01payload\xff"),
            }),
            Frame::PubAck(PubAck {
                ack_id: 9,
                outcome: AckOutcome::Journaled,
                local_deliveries: 2,
            }),
            Frame::PubAck(PubAck {
                ack_id: 10,
                outcome: AckOutcome::Rejected {
                    code: ErrorCode::JournalFull,
                    message: Text::from("class kv_events is full"),
                },
                local_deliveries: 0,
            }),
            Frame::Subscribe(Subscribe {
                sid: 3,
                subject: Text::from("kv.>"),
                queue_group: Some(Text::from("routers")),
            }),
            Frame::Unsubscribe(Unsubscribe { sid: 3 }),
            Frame::Message(Message {
                sid: 3,
                subject: Text::from("kv.events.1"),
                reply: None,
                headers: Headers::new(),
                payload: Bytes::from_static(b"event"),
            }),
            Frame::Request(Request {
                request_id: 11,
                timeout_ms: 500,
                subject: Text::from("svc.echo"),
                headers: headers(),
                payload: Bytes::from_static(b"ping"),
            }),
            Frame::Response(Response {
                request_id: 11,
                outcome: ResponseOutcome::Reply {
                    headers: headers(),
                    payload: Bytes::from_static(b"pong"),
                },
            }),
            Frame::Response(Response {
                request_id: 12,
                outcome: ResponseOutcome::Failed {
                    code: ErrorCode::NoResponders,
                    message: Text::from("nobody home"),
                },
            }),
            Frame::Ping(Ping { nonce: u64::MAX }),
            Frame::Pong(Pong { nonce: 1 }),
            Frame::Error(ErrorFrame {
                code: ErrorCode::Unknown(4242),
                reference: 3,
                message: Text::from("ünïcödé"),
            }),
            Frame::GoAway(GoAway {
                code: ErrorCode::ShuttingDown,
                message: Text::from("bye"),
            }),
            Frame::LinkState(LinkState {
                service: Service::Etcd,
                status: LinkStatus::Unknown,
            }),
            Frame::StatusRequest(StatusRequest { request_id: 5 }),
            Frame::StatusResponse(StatusResponse {
                request_id: 5,
                json: Bytes::from_static(br#"{"ok":true}"#),
            }),
            Frame::Register(Register {
                request_id: 6,
                key: Bytes::from_static(b"v1/instances/ns/worker/generate/1f"),
                value: Bytes::from_static(b"{\"port\":9000}"),
            }),
            Frame::Deregister(Deregister {
                request_id: 7,
                key: Bytes::from_static(b"v1/instances/ns/worker/generate/1f"),
            }),
            Frame::RegisterAck(RegisterAck {
                request_id: 6,
                outcome: RegistrationOutcome::Buffered,
            }),
            Frame::RegisterAck(RegisterAck {
                request_id: 8,
                outcome: RegistrationOutcome::Rejected {
                    code: ErrorCode::LimitExceeded,
                    message: Text::from("too many"),
                },
            }),
            Frame::Get(Get {
                request_id: 9,
                linearizable: true,
                prefix: Bytes::from_static(b"v1/"),
            }),
            Frame::GetResponse(GetResponse {
                request_id: 9,
                outcome: GetOutcome::Snapshot(Snapshot {
                    revision: 41,
                    stale: true,
                    age_ms: 1500,
                    entries: vec![
                        KeyValue {
                            key: Bytes::from_static(b"v1/a"),
                            value: Bytes::from_static(b"1"),
                        },
                        KeyValue {
                            key: Bytes::from_static(b"v1/b"),
                            value: Bytes::new(),
                        },
                    ],
                }),
            }),
            Frame::GetResponse(GetResponse {
                request_id: 10,
                outcome: GetOutcome::Failed {
                    code: ErrorCode::EtcdUnavailable,
                    message: Text::from("etcd is down"),
                },
            }),
            Frame::Watch(Watch {
                watch_id: 3,
                send_initial: true,
                prefix: Bytes::from_static(b"v1/"),
            }),
            Frame::Unwatch(Unwatch { watch_id: 3 }),
            Frame::WatchEvent(WatchEvent {
                watch_id: 3,
                revision: 42,
                kind: WatchEventKind::Delete,
                key: Bytes::from_static(b"v1/a"),
                value: Bytes::new(),
            }),
        ]
    }

    fn encoded(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(frame, MAX, &mut buf).expect("encodes");
        buf
    }

    /// Decodes one whole frame from `bytes`, insisting nothing is left over.
    fn decode_all(bytes: &[u8]) -> Result<Option<Frame>, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let result = FrameDecoder::new(MAX).decode(&mut buf);
        if let Ok(Some(_)) = result {
            assert!(buf.is_empty(), "decoder left bytes behind");
        }
        result
    }

    /// A frame from a type byte and raw body, with a correct length prefix.
    fn raw_frame(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
        out.push(ty);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn every_frame_type_round_trips() {
        let frames = one_of_each();
        let mut types: Vec<u8> = frames.iter().map(Frame::frame_type).collect();
        types.dedup();
        assert_eq!(types.len(), 24, "every frame type is covered");
        for frame in frames {
            let buf = encoded(&frame);
            assert_eq!(buf.len(), encoded_len(&frame), "{frame:?}");
            assert_eq!(buf[4], frame.frame_type());
            assert_eq!(decode_all(&buf), Ok(Some(frame)));
        }
    }

    // The same bytes as the worked example in PROTOCOL.md.
    #[test]
    fn publish_matches_the_documented_bytes() {
        let mut headers = Headers::new();
        headers.insert("k", "v");
        let frame = Frame::Publish(Publish {
            ack_id: 1,
            subject: Text::from("jobs.new"),
            reply: None,
            class: Some(Text::from("prefill")),
            headers,
            payload: Bytes::from_static(b"hi"),
        });
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x00, 0x00, 0x00, 0x2c,                         // length 44
            0x10,                                           // PUBLISH
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // ack_id 1
            0x00, 0x08, b'j', b'o', b'b', b's', b'.', b'n', b'e', b'w',
            0x00, 0x00,                                     // no reply
            0x00, 0x07, b'p', b'r', b'e', b'f', b'i', b'l', b'l',
            0x00, 0x01,                                     // 1 header
            0x00, 0x01, b'k',
            0x00, 0x01, b'v',
            0x00, 0x00, 0x00, 0x02, b'h', b'i',
        ];
        assert_eq!(&encoded(&frame)[..], expected);
        assert_eq!(decode_all(expected), Ok(Some(frame)));
    }

    #[test]
    fn decoded_fields_share_the_receive_buffer() {
        let frame = &one_of_each()[2];
        let mut buf = encoded(frame);
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let Some(Frame::Publish(publish)) = FrameDecoder::new(MAX).decode(&mut buf).unwrap() else {
            panic!("not a publish");
        };
        for ptr in [
            publish.payload.as_ptr(),
            publish.subject.as_ptr(),
            publish.headers.0[0].0.as_ptr(),
        ] {
            assert!((start..end).contains(&(ptr as usize)), "field was copied");
        }
    }

    #[test]
    fn empty_optional_strings_encode_as_absent() {
        let frame = Frame::Subscribe(Subscribe {
            sid: 1,
            subject: Text::from("a"),
            queue_group: Some(Text::new()),
        });
        let Ok(Some(Frame::Subscribe(subscribe))) = decode_all(&encoded(&frame)) else {
            panic!("not a subscribe");
        };
        assert_eq!(subscribe.queue_group, None);
    }

    #[test]
    fn oversized_prefix_is_rejected_without_reserving() {
        let mut buf = BytesMut::with_capacity(8);
        buf.extend_from_slice(&(MAX + 1).to_be_bytes());
        let capacity = buf.capacity();
        let mut decoder = FrameDecoder::new(MAX);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(DecodeError::FrameTooLarge {
                len: MAX + 1,
                max: MAX
            })
        );
        assert_eq!(buf.capacity(), capacity);
        assert_eq!(buf.len(), 4, "the prefix is left in place");

        let mut huge = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(
            decoder.decode(&mut huge),
            Err(DecodeError::FrameTooLarge { len: u32::MAX, .. })
        ));
        assert!(huge.capacity() < 64);
    }

    #[test]
    fn frame_exactly_at_the_limit_is_accepted() {
        let frame = Frame::StatusResponse(StatusResponse {
            request_id: 1,
            json: Bytes::from(vec![b' '; MAX as usize - 1 - 8 - 4]),
        });
        let buf = encoded(&frame);
        assert_eq!(buf.len(), MAX as usize + 4);
        assert_eq!(decode_all(&buf), Ok(Some(frame)));
    }

    #[test]
    fn empty_frame_is_rejected() {
        assert_eq!(decode_all(&[0, 0, 0, 0]), Err(DecodeError::EmptyFrame));
    }

    #[test]
    fn unknown_and_reserved_types_are_rejected() {
        for ty in [0x00, 0x03, 0x73, 0x7f, 0x85, 0x8f, 0xff] {
            assert_eq!(
                decode_all(&raw_frame(ty, &[])),
                Err(DecodeError::UnknownFrameType(ty))
            );
        }
    }

    #[test]
    fn short_body_is_truncated() {
        assert_eq!(
            decode_all(&raw_frame(frame_type::PING, &[0; 7])),
            Err(DecodeError::Truncated {
                frame_type: frame_type::PING
            })
        );
        // A string length pointing past the end of the frame.
        assert_eq!(
            decode_all(&raw_frame(frame_type::GO_AWAY, &[0, 1, 0, 5, b'a'])),
            Err(DecodeError::Truncated {
                frame_type: frame_type::GO_AWAY
            })
        );
    }

    #[test]
    fn leftover_body_is_trailing_bytes() {
        assert_eq!(
            decode_all(&raw_frame(frame_type::UNSUBSCRIBE, &[0, 0, 0, 1, 0])),
            Err(DecodeError::TrailingBytes {
                frame_type: frame_type::UNSUBSCRIBE
            })
        );
    }

    #[test]
    fn non_utf8_string_is_rejected() {
        let body = [0, 0, 0, 1, 0, 2, 0xc3, 0x28, 0, 0];
        assert_eq!(
            decode_all(&raw_frame(frame_type::SUBSCRIBE, &body)),
            Err(DecodeError::InvalidUtf8 { field: "subject" })
        );
    }

    #[test]
    fn bad_enum_bytes_are_invalid_values() {
        assert_eq!(
            decode_all(&raw_frame(frame_type::LINK_STATE, &[3, 1])),
            Err(DecodeError::InvalidValue {
                field: "service",
                value: 3
            })
        );
        assert_eq!(
            decode_all(&raw_frame(frame_type::LINK_STATE, &[1, 9])),
            Err(DecodeError::InvalidValue {
                field: "status",
                value: 9
            })
        );
        let mut ack = vec![0; 12];
        ack.push(4);
        assert_eq!(
            decode_all(&raw_frame(frame_type::PUB_ACK, &ack)),
            Err(DecodeError::InvalidValue {
                field: "outcome",
                value: 4
            })
        );
        let mut response = vec![0; 8];
        response.push(2);
        assert_eq!(
            decode_all(&raw_frame(frame_type::RESPONSE, &response)),
            Err(DecodeError::InvalidValue {
                field: "outcome",
                value: 2
            })
        );
    }

    #[test]
    fn decode_errors_map_to_codes() {
        let too_large = DecodeError::FrameTooLarge { len: 2, max: 1 };
        assert_eq!(too_large.code(), ErrorCode::FrameTooLarge);
        for error in [
            DecodeError::EmptyFrame,
            DecodeError::UnknownFrameType(0x70),
            DecodeError::Truncated { frame_type: 1 },
            DecodeError::TrailingBytes { frame_type: 1 },
            DecodeError::InvalidUtf8 { field: "subject" },
            DecodeError::InvalidValue {
                field: "status",
                value: 3,
            },
        ] {
            assert_eq!(error.code(), ErrorCode::BadFrame, "{error}");
        }
    }

    #[test]
    fn partial_input_waits_for_the_rest() {
        let frame = one_of_each().swap_remove(2);
        let bytes = encoded(&frame);
        let mut decoder = FrameDecoder::new(MAX);
        let mut buf = BytesMut::new();
        for (i, byte) in bytes.iter().enumerate() {
            assert_eq!(decoder.decode(&mut buf), Ok(None), "after {i} bytes");
            buf.extend_from_slice(&[*byte]);
        }
        assert_eq!(decoder.decode(&mut buf), Ok(Some(frame)));
        assert!(buf.is_empty());
    }

    #[test]
    fn complete_prefix_reserves_room_for_the_frame() {
        let frame = one_of_each().swap_remove(2);
        let bytes = encoded(&frame);
        let mut buf = BytesMut::from(&bytes[..5]);
        assert_eq!(FrameDecoder::new(MAX).decode(&mut buf), Ok(None));
        assert!(buf.capacity() >= bytes.len());
        assert_eq!(&buf[..], &bytes[..5]);
    }

    #[test]
    fn frames_in_one_buffer_decode_in_order() {
        let first = Frame::Ping(Ping { nonce: 1 });
        let second = one_of_each().swap_remove(2);
        let mut buf = encoded(&first);
        buf.extend_from_slice(&encoded(&second));
        buf.extend_from_slice(&[0, 0]); // start of a third frame
        let mut decoder = FrameDecoder::new(MAX);
        assert_eq!(decoder.decode(&mut buf), Ok(Some(first)));
        assert_eq!(decoder.decode(&mut buf), Ok(Some(second)));
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[0, 0]);
    }

    #[test]
    fn body_errors_consume_the_bad_frame() {
        let mut buf = BytesMut::from(&raw_frame(0x7f, &[1, 2, 3])[..]);
        buf.extend_from_slice(&encoded(&Frame::Pong(Pong { nonce: 2 })));
        let mut decoder = FrameDecoder::new(MAX);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(DecodeError::UnknownFrameType(0x7f))
        );
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Frame::Pong(Pong { nonce: 2 })))
        );
    }

    #[test]
    fn encode_rejects_overlong_strings_and_leaves_dst_alone() {
        let frame = Frame::GoAway(GoAway {
            code: ErrorCode::Internal,
            message: Text::from("x".repeat(MAX_STR16 + 1)),
        });
        let mut dst = BytesMut::from(&b"keep"[..]);
        assert_eq!(
            encode(&frame, u32::MAX, &mut dst),
            Err(EncodeError::FieldTooLong {
                field: "message",
                len: MAX_STR16 + 1,
                max: MAX_STR16
            })
        );
        assert_eq!(&dst[..], b"keep");
    }

    #[test]
    fn encode_rejects_too_many_headers() {
        let mut headers = Headers::new();
        for _ in 0..=MAX_STR16 {
            headers.insert(Text::new(), Text::new());
        }
        let frame = Frame::Message(Message {
            sid: 1,
            subject: Text::from("a"),
            reply: None,
            headers,
            payload: Bytes::new(),
        });
        assert_eq!(
            encode(&frame, u32::MAX, &mut BytesMut::new()),
            Err(EncodeError::FieldTooLong {
                field: "headers",
                len: MAX_STR16 + 1,
                max: MAX_STR16
            })
        );
    }

    #[test]
    fn encode_respects_the_frame_limit() {
        let frame = Frame::Ping(Ping { nonce: 0 });
        let mut dst = BytesMut::new();
        assert_eq!(
            encode(&frame, 8, &mut dst),
            Err(EncodeError::FrameTooLarge { len: 9, max: 8 })
        );
        assert!(dst.is_empty());
        encode(&frame, 9, &mut dst).unwrap();
        assert_eq!(dst.len(), 13);
    }

    #[test]
    fn tokio_codec_round_trips() {
        use tokio_util::codec::{Decoder, Encoder};
        let mut codec = FrameCodec::new(MAX);
        let mut buf = BytesMut::new();
        let frames = one_of_each();
        for frame in &frames {
            codec.encode(frame, &mut buf).unwrap();
        }
        codec.encode(frames[0].clone(), &mut buf).unwrap();
        for frame in frames.iter().chain(&frames[..1]) {
            assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(frame));
        }
        assert!(codec.decode(&mut buf).unwrap().is_none());

        codec.set_max_frame_bytes(4);
        assert_eq!(codec.max_frame_bytes(), 4);
        assert!(matches!(
            codec.encode(&frames[0], &mut buf),
            Err(CodecError::Encode(EncodeError::FrameTooLarge { .. }))
        ));
        buf.extend_from_slice(&encoded(&frames[0]));
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::Decode(DecodeError::FrameTooLarge { .. }))
        ));
    }
}
