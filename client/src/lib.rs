//! `holdfast-client`: the thin client for `holdfastd`, the node-local relay.
//!
//! A [`Client`] is a cheap, clonable handle onto one connection to the relay
//! (a Unix socket, or QUIC; see the end). One background task owns it and all the
//! state that must survive the relay restarting: registrations, watches,
//! live subscriptions, publishes buffered while the relay is unreachable,
//! and the process's instance id. When the relay goes away the task
//! reconnects with backoff (keeping the instance id), registers every live
//! key again, re-establishes watches and subscriptions and replays the
//! buffered publishes in order, so a component sees a relay restart as
//! delay, not as loss.
//!
//! Messaging goes to NATS through the relay:
//!
//! ```no_run
//! # async fn demo() -> Result<(), holdfast_client::Error> {
//! use futures::StreamExt;
//! use holdfast_client::{Client, OutboundMessage};
//!
//! let client = Client::from_env().await?;
//! let mut events = client.subscribe("kv.events.>").await?;
//! client.publish("kv.events.block", "hello").await?;
//! let ack = client
//!     .publish_with_ack(OutboundMessage::new("prefill.req", "payload").class("prefill"))
//!     .await?
//!     .await?;
//! println!("{:?}", ack.outcome);
//! if let Some(message) = events.next().await {
//!     println!("{}: {:?}", message.subject, message.payload);
//! }
//! # Ok(()) }
//! ```
//!
//! Discovery goes to etcd through the relay. A registration lives as long as
//! the process's session with the relay: it leaves etcd about a second after
//! the process dies, and survives etcd outages (the relay holds it and
//! applies it when etcd is back). Answers say how fresh they are.
//!
//! ```no_run
//! # async fn demo() -> Result<(), holdfast_client::Error> {
//! use futures::StreamExt;
//! use holdfast_client::{Client, WatchEvent};
//!
//! let client = Client::from_env().await?;
//! let key = format!("workers/decode/{:x}", client.instance_id());
//! let status = client.register(key, "10.0.0.7:9000").await?;
//! println!("registered: {status:?}"); // Applied, or Buffered during an outage
//!
//! let snapshot = client.get("workers/").await?;
//! println!("{} workers at revision {} (stale: {})", snapshot.entries.len(), snapshot.revision, snapshot.stale);
//!
//! let mut workers = client.watch("workers/").await?;
//! while let Some(event) = workers.next().await {
//!     match event {
//!         WatchEvent::Put { key, value, .. } => println!("+ {key:?} = {value:?}"),
//!         WatchEvent::Delete { key, .. } => println!("- {key:?}"),
//!         WatchEvent::Synced { revision } => println!("in sync at {revision}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The relay's address is a [`RelayUrl`]: `unix:///path/to.sock` on the
//! relay's node, or `quic://host:port` from elsewhere. Over QUIC (TLS 1.3,
//! ALPN `holdfast/1`) the client opens one bidirectional stream per
//! connection and runs the same session on it; the relay's certificate is
//! checked against a CA file and the URL's host, and a relay that requires
//! mutual TLS gets the client certificate. The TLS files are read when the
//! client connects, so a missing or broken one is an [`Error::Tls`] there;
//! [`ConnectOptions::from_env`] takes them from `HOLDFAST_CA`,
//! `HOLDFAST_CERT` and `HOLDFAST_KEY`, as the CLI's `--ca`, `--cert` and
//! `--key` do.
//!
//! ```no_run
//! # async fn demo() -> Result<(), holdfast_client::Error> {
//! use holdfast_client::{Client, ConnectOptions};
//!
//! let options = ConnectOptions::new("quic://relay.example:4433".parse()?)
//!     .tls_ca("/etc/holdfast/ca.pem")
//!     .tls_client_cert("/etc/holdfast/client.pem", "/etc/holdfast/client.key");
//! let client = Client::connect_with(options).await?;
//! # drop(client);
//! # Ok(()) }
//! ```
//!
//! Latency: call the client from spawned tasks on a multi-threaded tokio
//! runtime, not from the future handed to `block_on` (the body of a
//! `#[tokio::main]` function). That thread is not a worker: every answer
//! reaches it through a hand-over from a worker thread. On a 2-vCPU VM this
//! added about 40 µs to each local round trip (a cached `get` took 92 µs
//! at p50 from there and 26 µs from a spawned task).

mod ack;
mod chain_validation;
mod client;
mod command;
mod connection;
mod discovery;
mod error;
mod events;
mod id_hash;
mod message;
mod offline_buffer;
mod options;
mod quic;
mod registration;
mod session;
mod shared;
mod stream_state;
mod subscription;
mod tls;
mod transport;
mod url;
mod watch_event;
mod watch_view;
mod watcher;
mod watches;

pub use ack::{Ack, AckFuture, AckStatus};
pub use chain_validation::{ChainBreak, Validated, ValidatedStream, ValidatedSubscriber};
pub use client::Client;
pub use discovery::{Entry, Snapshot};
pub use error::{Error, Result};
pub use events::LinkEvent;
pub use holdfast_wire::backoff::Backoff;
pub use message::{Message, OutboundMessage, Reply};
pub use options::{ConnectOptions, OfflinePolicy, CA_ENV, CERT_ENV, KEY_ENV};
pub use registration::RegistrationStatus;
pub use subscription::Subscriber;
pub use tls::TlsError;
pub use url::{RelayUrl, UrlError, DEFAULT_URL, URL_ENV};
pub use watcher::{WatchEvent, Watcher};

pub use holdfast_wire::chain::{ChainHeaderError, ChainValidator};
pub use holdfast_wire::subject::SubjectError;
pub use holdfast_wire::{ErrorCode, Headers, LinkStatus, Service, Text};
