//! The relay-wide state every connection shares: the configuration, the
//! message classes, handles to the upstream links and to the tasks that own
//! the router, forwarder, registry and discovery, the counters, and the
//! limits shared across connections.

use crate::config::Config;
use crate::front::access::AccessPolicy;
use crate::keys::discovery::DiscoveryHandle;
use crate::keys::etcd::link::EtcdLink;
use crate::keys::registry::RegistryHandle;
use crate::messaging::classes::Classes;
use crate::messaging::forwarder::ForwarderHandle;
use crate::messaging::nats::link::NatsLink;
use crate::messaging::router::RouterHandle;
use crate::ops::stats::RelayStats;
use holdfast_wire::Text;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What every session shares: configuration and handles to the relay's tasks.
pub struct RelayContext {
    pub config: Arc<Config>,
    pub classes: Classes,
    pub nats: NatsLink,
    pub etcd: EtcdLink,
    pub registry: RegistryHandle,
    pub discovery: DiscoveryHandle,
    pub router: RouterHandle,
    pub forwarder: ForwarderHandle,
    pub stats: Arc<RelayStats>,
    pub relay_id: Text,
    pub started_at: Instant,
    pub shutdown: CancellationToken,
    /// Who may do what; looked up once per session.
    pub access: AccessPolicy,
    /// One permit per open connection (`sessions.max_connections`).
    pub connection_permits: Arc<Semaphore>,
    /// Bytes of large frames being read, relay-wide
    /// (`sessions.read_budget_bytes`).
    pub read_budget: Arc<Semaphore>,
    /// Where the QUIC listener listens, if it does.
    pub quic_address: Option<std::net::SocketAddr>,
    /// Where the NATS client-protocol front end listens, if it does.
    pub nats_front_address: Option<std::net::SocketAddr>,
    /// The planner guard, when `guard.enabled`.
    pub guard: Option<crate::guard::GuardHandle>,
    next_session_id: AtomicU64,
}

/// The upstream services as sessions use them.
pub struct Upstreams {
    pub nats: NatsLink,
    pub etcd: EtcdLink,
    pub registry: RegistryHandle,
    pub discovery: DiscoveryHandle,
}

impl RelayContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        classes: Classes,
        upstreams: Upstreams,
        router: RouterHandle,
        forwarder: ForwarderHandle,
        stats: Arc<RelayStats>,
        relay_id: Text,
        access: AccessPolicy,
        shutdown: CancellationToken,
    ) -> RelayContext {
        let connection_permits = Arc::new(Semaphore::new(config.sessions.max_connections));
        let read_budget = Arc::new(Semaphore::new(config.sessions.read_budget_bytes));
        RelayContext {
            access,
            connection_permits,
            read_budget,
            quic_address: None,
            nats_front_address: None,
            guard: None,
            config,
            classes,
            nats: upstreams.nats,
            etcd: upstreams.etcd,
            registry: upstreams.registry,
            discovery: upstreams.discovery,
            router,
            forwarder,
            stats,
            relay_id,
            started_at: Instant::now(),
            shutdown,
            next_session_id: AtomicU64::new(1),
        }
    }
}

impl RelayContext {
    /// A new session's id, unique in this process.
    pub fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }
}
