//! The frames of the holdfast protocol, as plain data.
//!
//! Byte layouts live in [`crate::codec`] and `PROTOCOL.md`; this file only
//! says what each frame means and who sends it.

use crate::{ErrorCode, Text};
use bytes::Bytes;

/// Frame type bytes. Ranges `0x70..=0x7F` (registration) and `0x80..=0x8F`
/// (discovery) are reserved for upcoming frames; a decoder rejects them today.
pub mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const PUBLISH: u8 = 0x10;
    pub const PUB_ACK: u8 = 0x11;
    pub const SUBSCRIBE: u8 = 0x20;
    pub const UNSUBSCRIBE: u8 = 0x21;
    pub const MESSAGE: u8 = 0x22;
    pub const REQUEST: u8 = 0x30;
    pub const RESPONSE: u8 = 0x31;
    pub const PING: u8 = 0x40;
    pub const PONG: u8 = 0x41;
    pub const ERROR: u8 = 0x50;
    pub const GO_AWAY: u8 = 0x51;
    pub const LINK_STATE: u8 = 0x52;
    pub const STATUS_REQUEST: u8 = 0x60;
    pub const STATUS_RESPONSE: u8 = 0x61;
    /// First and last type byte reserved for registration frames.
    pub const RESERVED_REGISTRATION: std::ops::RangeInclusive<u8> = 0x70..=0x7F;
    /// First and last type byte reserved for discovery frames.
    pub const RESERVED_DISCOVERY: std::ops::RangeInclusive<u8> = 0x80..=0x8F;
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Publish(Publish),
    PubAck(PubAck),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Message(Message),
    Request(Request),
    Response(Response),
    Ping(Ping),
    Pong(Pong),
    Error(ErrorFrame),
    GoAway(GoAway),
    LinkState(LinkState),
    StatusRequest(StatusRequest),
    StatusResponse(StatusResponse),
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> u8 {
        use frame_type::*;
        match self {
            Frame::Hello(_) => HELLO,
            Frame::Welcome(_) => WELCOME,
            Frame::Publish(_) => PUBLISH,
            Frame::PubAck(_) => PUB_ACK,
            Frame::Subscribe(_) => SUBSCRIBE,
            Frame::Unsubscribe(_) => UNSUBSCRIBE,
            Frame::Message(_) => MESSAGE,
            Frame::Request(_) => REQUEST,
            Frame::Response(_) => RESPONSE,
            Frame::Ping(_) => PING,
            Frame::Pong(_) => PONG,
            Frame::Error(_) => ERROR,
            Frame::GoAway(_) => GO_AWAY,
            Frame::LinkState(_) => LINK_STATE,
            Frame::StatusRequest(_) => STATUS_REQUEST,
            Frame::StatusResponse(_) => STATUS_RESPONSE,
        }
    }
}

/// Client → relay, first frame on a connection: the versions the client speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Free-form name for logs and `holdfast status` (e.g. "prefill-worker-3").
    pub client_name: Text,
    /// The client process's instance id from an earlier WELCOME, so a
    /// reconnecting process keeps its identity; 0 asks the relay to assign one.
    pub instance_id: u64,
}

/// Relay → client, answer to HELLO: the chosen version and the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    /// Unique per connection on this relay.
    pub session_id: u64,
    /// Stable for the client process (echoed from HELLO, or newly assigned).
    pub instance_id: u64,
    /// Identifies the relay process (differs after every restart).
    pub relay_id: Text,
    /// Largest frame the relay accepts from this client.
    pub max_frame_bytes: u32,
    pub nats: LinkStatus,
    pub etcd: LinkStatus,
}

/// Ordered NATS message headers; a name may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(Text, Text)>);

impl Headers {
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn insert(&mut self, name: impl Into<Text>, value: impl Into<Text>) {
        self.0.push((name.into(), value.into()));
    }

    /// The first value under `name` (case-sensitive, as NATS compares).
    pub fn get(&self, name: &str) -> Option<&Text> {
        self.0
            .iter()
            .find(|(key, _)| key.as_str() == name)
            .map(|(_, value)| value)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(Text, Text)> {
        self.0.iter()
    }
}

/// Client → relay: publish one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Non-zero asks for a PUBACK carrying this id; 0 means fire-and-forget
    /// (errors then arrive as ERROR frames referencing 0).
    pub ack_id: u64,
    pub subject: Text,
    pub reply: Option<Text>,
    /// Message class (e.g. "prefill"); `None` classifies by subject.
    pub class: Option<Text>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Relay → client: what happened to an acknowledged publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    pub ack_id: u64,
    pub outcome: AckOutcome,
    /// How many subscribers on this relay received the message directly
    /// (non-zero when NATS was down and the relay delivered node-locally).
    pub local_deliveries: u32,
}

/// The outcome of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Handed to the NATS connection.
    Forwarded,
    /// Durably written to the relay's journal; will reach NATS later.
    Journaled,
    /// Held in the relay's memory queue; will reach NATS later.
    Queued,
    /// Not accepted; see the code.
    Rejected { code: ErrorCode, message: Text },
}

/// Client → relay: start a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Chosen by the client, unique among its live subscriptions.
    pub sid: u32,
    /// NATS subject, `*` and `>` wildcards allowed.
    pub subject: Text,
    pub queue_group: Option<Text>,
}

/// Client → relay: end a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub sid: u32,
}

/// Relay → client: a message for subscription `sid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub sid: u32,
    pub subject: Text,
    pub reply: Option<Text>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Client → relay: a NATS request expecting one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the client, unique among its outstanding requests.
    pub request_id: u64,
    /// How long the relay waits for a responder; 0 uses the relay's default.
    pub timeout_ms: u32,
    pub subject: Text,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Relay → client: the answer to REQUEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub request_id: u64,
    pub outcome: ResponseOutcome,
}

/// A request's answer, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseOutcome {
    Reply { headers: Headers, payload: Bytes },
    Failed { code: ErrorCode, message: Text },
}

/// Either side: liveness probe; a PING from the client also acts as a
/// barrier (the relay answers only after everything sent before it reached
/// NATS, when NATS is up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub nonce: u64,
}

/// Answer to PING, echoing its nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    pub nonce: u64,
}

/// Either side: something went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// The id the error is about: a sid for subscription errors, an ack id or
    /// request id otherwise, 0 for the connection as a whole.
    pub reference: u64,
    pub message: Text,
}

/// Either side: the sender closes the connection after this frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    pub code: ErrorCode,
    pub message: Text,
}

/// An upstream service the relay depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Nats,
    Etcd,
}

/// Whether the relay can reach an upstream service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkStatus {
    /// Not configured, or not yet known.
    Unknown,
    Up,
    Down,
}

/// Relay → client: an upstream link changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub service: Service,
    pub status: LinkStatus,
}

/// Client → relay: ask for the relay's status document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRequest {
    pub request_id: u64,
}

/// Relay → client: the status document as UTF-8 JSON (schema in PROTOCOL.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusResponse {
    pub request_id: u64,
    pub json: Bytes,
}
