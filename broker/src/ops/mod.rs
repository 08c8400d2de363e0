//! For operators: the HTTP endpoint, metrics, the status document,
//! counters and systemd notifications.

pub mod http;
pub mod metric_catalog;
pub mod notify;
pub mod stats;
pub mod status;
pub mod telemetry;
