//! The upstream etcd cluster: the link, member failover and security.

pub mod failover;
pub mod link;
pub mod security;
