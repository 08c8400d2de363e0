//! `holdfast-client`: the thin client for `holdfastd`, the node-local relay.
//!
//! A [`Client`] is a cheap, clonable handle onto one connection to the relay
//! (a Unix socket today). One background task owns the socket and all the
//! state that must survive the relay restarting: live subscriptions, publishes
//! buffered while the relay is unreachable, and the process's instance id.
//! When the relay goes away the task reconnects with backoff, re-registers
//! every live subscription and replays the buffered publishes in order, so a
//! component sees a relay restart as delay, not as loss.
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

mod ack;
mod chain_validation;
mod client;
mod command;
mod connection;
mod error;
mod events;
mod message;
mod offline_buffer;
mod options;
mod session;
mod shared;
mod subscription;
mod url;

pub use ack::{Ack, AckFuture, AckStatus};
pub use chain_validation::{ChainBreak, Validated, ValidatedStream, ValidatedSubscriber};
pub use client::Client;
pub use error::{Error, Result};
pub use events::LinkEvent;
pub use holdfast_wire::backoff::Backoff;
pub use message::{Message, OutboundMessage, Reply};
pub use options::{ConnectOptions, OfflinePolicy};
pub use subscription::Subscriber;
pub use url::{RelayUrl, UrlError, DEFAULT_URL, URL_ENV};

pub use holdfast_wire::chain::{ChainHeaderError, ChainValidator};
pub use holdfast_wire::subject::SubjectError;
pub use holdfast_wire::{ErrorCode, Headers, LinkStatus, Service, Text};
