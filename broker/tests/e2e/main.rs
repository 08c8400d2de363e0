//! End-to-end tests of holdfastd against real nats-server and etcd processes.
//!
//! One test binary (so it links once); each test starts its own NATS and
//! relay on free loopback ports and a temp-dir socket, so tests run in
//! parallel without sharing anything.

mod access;
mod bad_input;
mod cli;
mod cluster_failover;
mod clusters;
mod deploy_manifests;
mod discovery;
mod etcd_front;
mod etcd_front_limits;
mod guard;
mod guard_generic;
mod journal;
mod journal_damage;
mod journal_disk_full;
mod journal_limits;
mod kv_consistency;
mod limits;
mod memory;
mod nats_front;
mod nats_jwt;
mod ops;
mod outage;
mod passthrough;
mod quic;
mod registry;
mod restart;
mod secured_upstreams;
mod slow_consumer;
mod support;
mod upstream_loss;
mod upstream_malformed;
mod waiting;
