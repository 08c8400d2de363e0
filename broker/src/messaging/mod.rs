//! Messages: the router and its fan-out to subscribers, the forwarder
//! that carries publishes to NATS (through class queues and the journal),
//! message classes, and the NATS links.

pub mod class_queue;
pub mod classes;
pub mod fanout;
pub mod forward_core;
pub mod forwarder;
pub mod kv_check_view;
pub mod kv_consistency;
pub mod kv_event_check;
pub mod local_message;
pub mod nats;
pub mod nats_convert;
pub mod router;
pub mod subscription_table;
