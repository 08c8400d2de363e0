//! holdfastd as a library: the relay ([`run`]) and the offline tools the
//! `holdfastd` binary offers (journal inspection and salvage, development
//! certificates). `main.rs` is only the command line around them, so tests
//! and tools can run a relay in-process.

mod accept_pressure;
mod access;
mod atomic_file;
mod cert_subject;
mod class_queue;
mod classes;
mod compact;
pub mod config;
mod context;
mod discovery;
mod drop_log;
mod duration;
mod etcd_failover;
mod etcd_front;
mod etcd_link;
mod etcd_security;
mod failure_log;
mod fanout;
mod fd_budget;
mod forwarder;
mod frame_reader;
pub mod gen_cert;
mod journal;
pub mod journal_inspect;
pub mod journal_salvage;
mod link_monitor;
mod listener;
mod nats_convert;
mod nats_front;
mod nats_link;
mod nats_security;
mod nats_subscriber;
mod notify;
mod ops_http;
mod outbox;
mod peer;
mod quic_listener;
mod registry;
pub mod relay;
mod router;
mod secret_file;
mod session;
mod socket_guard;
mod sparse_map;
mod stats;
mod status;
mod subscription_table;
mod telemetry;
mod tls;
mod url_credentials;
mod wall_clock;

pub use config::{Config, ConfigError, Overrides};
pub use relay::{run, RelayError};
