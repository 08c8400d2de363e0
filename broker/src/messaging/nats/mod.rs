//! The upstream NATS cluster: the link (async-nats, state, probes), its
//! security settings, and the subscriber connection.

pub mod link;
pub mod link_monitor;
pub mod security;
pub mod subscriber;
