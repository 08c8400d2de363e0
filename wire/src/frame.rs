//! The frames of the holdfast protocol, as plain data.
//!
//! Byte layouts live in [`crate::codec`] and `PROTOCOL.md`; this file only
//! says what each frame means and who sends it.

use crate::{ErrorCode, Text};
use bytes::Bytes;

/// Frame type bytes. Registration frames live in `0x70..=0x7F`, discovery
/// frames in `0x80..=0x8F`; unassigned bytes there are rejected like any
/// other unknown type.
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
    pub const REGISTER: u8 = 0x70;
    pub const DEREGISTER: u8 = 0x71;
    pub const REGISTER_ACK: u8 = 0x72;
    pub const GET: u8 = 0x80;
    pub const GET_RESPONSE: u8 = 0x81;
    pub const WATCH: u8 = 0x82;
    pub const UNWATCH: u8 = 0x83;
    pub const WATCH_EVENT: u8 = 0x84;
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
    Register(Register),
    Deregister(Deregister),
    RegisterAck(RegisterAck),
    Get(Get),
    GetResponse(GetResponse),
    Watch(Watch),
    Unwatch(Unwatch),
    WatchEvent(WatchEvent),
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
            Frame::Register(_) => REGISTER,
            Frame::Deregister(_) => DEREGISTER,
            Frame::RegisterAck(_) => REGISTER_ACK,
            Frame::Get(_) => GET,
            Frame::GetResponse(_) => GET_RESPONSE,
            Frame::Watch(_) => WATCH,
            Frame::Unwatch(_) => UNWATCH,
            Frame::WatchEvent(_) => WATCH_EVENT,
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

/// Client → relay: put `key` = `value` in etcd under this session's lease,
/// for as long as the session lives (a later REGISTER of the same key
/// updates the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    /// Chosen by the client; the REGISTER_ACK carries it back.
    pub request_id: u64,
    pub key: Bytes,
    pub value: Bytes,
}

/// Client → relay: remove a key this session registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deregister {
    pub request_id: u64,
    pub key: Bytes,
}

/// Relay → client: what happened to a REGISTER or DEREGISTER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterAck {
    pub request_id: u64,
    pub outcome: RegistrationOutcome,
}

/// The outcome of a registration change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationOutcome {
    /// etcd holds the change now.
    Applied,
    /// etcd is unreachable; the relay holds the change and applies it when
    /// etcd is back (and rebuilds it if etcd comes back empty).
    Buffered,
    /// Not accepted; see the code.
    Rejected { code: ErrorCode, message: Text },
}

/// Client → relay: the entries under a key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Get {
    pub request_id: u64,
    /// Ask etcd itself (a linearizable read) instead of the relay's cache;
    /// fails with `etcd_unavailable` rather than answer stale.
    pub linearizable: bool,
    pub prefix: Bytes,
}

/// Relay → client: the answer to GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResponse {
    pub request_id: u64,
    pub outcome: GetOutcome,
}

/// A snapshot of a prefix, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetOutcome {
    Snapshot(Snapshot),
    Failed { code: ErrorCode, message: Text },
}

/// The entries under a prefix as of an etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The etcd revision the entries reflect.
    pub revision: u64,
    /// The relay could not confirm the entries with etcd just now (etcd
    /// unreachable, or the prefix's watch not re-established yet).
    pub stale: bool,
    /// Milliseconds since etcd last confirmed these entries (0 when fresh).
    pub age_ms: u64,
    /// Sorted by key.
    pub entries: Vec<KeyValue>,
}

/// One etcd key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
}

/// Client → relay: stream changes under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// Chosen by the client, unique among its live watches.
    pub watch_id: u32,
    /// Send the current entries as PUT events, then a SYNCED event, before
    /// any change.
    pub send_initial: bool,
    pub prefix: Bytes,
}

/// Client → relay: end a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unwatch {
    pub watch_id: u32,
}

/// Relay → client: one change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub watch_id: u32,
    /// The etcd revision of the change (for SYNCED: of the snapshot sent).
    pub revision: u64,
    pub kind: WatchEventKind,
    pub key: Bytes,
    /// Empty for DELETE and SYNCED.
    pub value: Bytes,
}

/// What a watch event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    Put,
    Delete,
    /// Every entry of the initial snapshot has been sent.
    Synced,
}
