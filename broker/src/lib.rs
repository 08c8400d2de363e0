//! holdfastd as a library: the relay ([`run`]) and the offline tools the
//! `holdfastd` binary offers (journal inspection and salvage, development
//! certificates). `main.rs` is only the command line around them, so tests
//! and tools can run a relay in-process.

pub mod cli;
pub mod config;
mod context;
mod dynamo;
mod front;
mod guard;
mod journal;
mod keys;
mod messaging;
mod ops;
pub mod preflight;
pub mod relay;
mod session;
mod util;

pub use config::{Config, ConfigError, Overrides};
pub use ops::metric_catalog;
pub use relay::{run, RelayError};
