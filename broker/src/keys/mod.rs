//! Keys in etcd: the etcd link, registrations (leases the relay owns)
//! and discovery (the cache and its watches).

pub mod discovery;
pub mod etcd;
pub mod registry;
