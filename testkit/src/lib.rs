//! The processes holdfast is tested and measured against — nats-server,
//! etcd and holdfastd itself — started on free loopback ports, each in its
//! own temp dir, each owned by a guard whose `Drop` kills it by PID.
//!
//! The e2e tests (`broker/tests/e2e/support.rs`, which turns these
//! `Result`s into panics) and holdfast-bench (`benches/src/harness.rs`)
//! share this crate, so a fix to how a server is started, probed or
//! stopped reaches both. It is synchronous and needs no async runtime or
//! NATS/etcd client: readiness is probed over plain TCP and HTTP.
//!
//! Every wait is bounded in time and in polls; every start failure names
//! the binary, where it listens and the end of its log.
//!
//! ```no_run
//! use holdfast_testkit::{NatsServer, Relay};
//!
//! let mut nats = NatsServer::builder().jetstream(true).start()?;
//! let relay = Relay::builder("target/debug/holdfastd", &nats.url())
//!     .config("[sessions]\nslow_consumer = \"disconnect\"\n")
//!     .start()?;
//! nats.kill(); // an outage; the relay holds publishes meanwhile
//! nats.restart()?; // same port, same JetStream store
//! println!("{} over {}", relay.url(), nats.url());
//! # Ok::<(), holdfast_testkit::Error>(())
//! ```

mod binaries;
mod error;
mod etcd;
mod http;
mod limits;
mod logs;
mod nats;
mod ports;
pub mod proc_stats;
mod process;
mod relay;
mod startup;

pub use binaries::{find_binary, find_etcd, find_nats_server, ETCD_ENV, NATS_SERVER_ENV};
pub use error::{Error, Result};
pub use etcd::{EtcdBuilder, EtcdServer};
pub use http::{http_get, HttpResponse};
pub use limits::set_open_file_soft_limit;
pub use nats::{NatsBuilder, NatsServer};
pub use ports::{free_port, TEST_PORTS};
pub use process::{send_signal, Process, Signal, Stopped};
pub use relay::{Readiness, Relay, RelayBuilder};
