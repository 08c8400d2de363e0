//! End-to-end tests of holdfastd against real nats-server and etcd processes.
//!
//! One test binary (so it links once); each test starts its own NATS and
//! relay on free loopback ports and a temp-dir socket, so tests run in
//! parallel without sharing anything.

mod access;
mod bad_input;
mod cli;
mod discovery;
mod etcd_front;
mod journal;
mod journal_limits;
mod limits;
mod nats_front;
mod ops;
mod outage;
mod passthrough;
mod quic;
mod registry;
mod restart;
mod slow_consumer;
mod support;
