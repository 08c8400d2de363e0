//! The etcd v3 gRPC front end (`--etcd-listen`): unmodified etcd clients
//! (etcd-client, etcdctl, the Dynamo runtime) point `ETCD_ENDPOINTS` at
//! the relay and get its protection.
//!
//! It is a translation onto the registry and the discovery cache, not a
//! second etcd:
//! - Leases are the relay's own ([`lease_owner`]): ids handed out here,
//!   kept alive against the relay (also through an etcd outage), saved in
//!   the data dir, each one an owner in the registry, whose upstream lease
//!   the relay keeps alive. A lease whose keepalive stream breaks with its
//!   client's connection ends at once ([`lease_service`]).
//! - KV: a put under a relay lease is a registration (buffered while etcd
//!   is down); create-if-absent transactions under a lease are evaluated
//!   here ([`txn`]); serializable reads of one key or a prefix come from
//!   the discovery cache ([`range`]); anything else goes to etcd unchanged
//!   while it is up ([`upstream`]) and fails `Unavailable` while it is not.
//! - Watch: served by the discovery cache's watches ([`watch`]).
//! - Writes obey `access.default` and key ownership ([`write_policy`]).
//! - Every other service (Maintenance, Cluster, Auth, Lock, Election) and
//!   KV Compact answer `Unimplemented` naming the RPC ([`unimplemented`]).

mod activity;
mod bridge;
mod connection;
mod kv;
mod lease_owner;
mod lease_service;
mod leases;
mod persist;
mod range;
mod txn;
mod unimplemented;
mod upstream;
mod watch;
mod write_policy;

use crate::context::RelayContext;
use crate::keys::discovery::DiscoveryHandle;
use bridge::Outboxes;
use etcd_client::proto::{PbKvServer, PbLeaseServer, PbWatchServer};
use lease_owner::{LeaseOwner, OwnerError};
use leases::LeaseError;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{info, warn};

/// Most relay leases held at once; more grants answer ResourceExhausted.
const MAX_LEASES: usize = 65_536;
/// Most watches open at once across all streams.
const MAX_WATCHES: usize = 16_384;
/// How long a write waits for etcd (or for the registry to say Buffered).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cached read waits (a prefix read for the first time waits
/// for its listing).
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the front end could not start.
#[derive(Debug, thiserror::Error)]
pub enum EtcdFrontError {
    #[error("cannot listen for etcd clients on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("the etcd front end needs etcd endpoints (--etcd)")]
    NoUpstream,
    #[error(transparent)]
    Endpoint(#[from] upstream::EndpointError),
    #[error("[access]: {0}")]
    Access(String),
}

/// What every service of the front end shares.
pub struct Front {
    owner: LeaseOwner,
    writes: write_policy::WritePolicy,
    upstream: upstream::Upstream,
    discovery: DiscoveryHandle,
    outboxes: Outboxes,
    watches: AtomicUsize,
    /// `etcd.max_watches_per_session`, per watch stream.
    max_watches_per_stream: usize,
    streams: AtomicU64,
    stop: CancellationToken,
}

/// The running front end: wait on it after cancelling its stop token.
pub struct EtcdFront {
    server: JoinHandle<()>,
    owner: JoinHandle<()>,
}

impl EtcdFront {
    /// Waits until the server and the lease owner have stopped (the table
    /// is saved by then).
    pub async fn stopped(self) {
        let _ = self.server.await;
        let _ = self.owner.await;
    }
}

/// Binds `address` and serves etcd clients until `stop` fires; their
/// connections take slots of `ctx.connection_permits`.
pub async fn start(
    address: SocketAddr,
    ctx: &RelayContext,
    stop: CancellationToken,
) -> Result<EtcdFront, EtcdFrontError> {
    let config = &ctx.config;
    let link = ctx.etcd.clone();
    if !link.is_enabled() {
        return Err(EtcdFrontError::NoUpstream);
    }
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| EtcdFrontError::Bind { address, source })?;
    let address = listener.local_addr().unwrap_or(address);
    // TCP on loopback proves no identity: every client gets the default.
    let permissions = config
        .access_policy()
        .map_err(EtcdFrontError::Access)?
        .default_permissions();
    let writes =
        write_policy::WritePolicy::new(permissions, ctx.registry.clone(), ctx.stats.clone());
    let call_timeout = (config.etcd.probe_timeout * 4).max(Duration::from_secs(2));
    let upstream = upstream::Upstream::new(&config.etcd.endpoints, link, call_timeout)?;
    let outboxes = Outboxes {
        stats: ctx.stats.clone(),
        max_bytes: config.sessions.outbound_queue_bytes,
    };
    let (owner, owner_task) = lease_owner::start(
        config.etcd_front_leases_path(),
        config.etcd_front_legacy_leases_path(),
        MAX_LEASES,
        config.etcd.max_registrations_per_session,
        ctx.registry.clone(),
        stop.clone(),
    )
    .await;
    let front = Arc::new(Front {
        owner,
        writes,
        upstream,
        discovery: ctx.discovery.clone(),
        outboxes,
        watches: AtomicUsize::new(0),
        max_watches_per_stream: config.etcd.max_watches_per_session,
        streams: AtomicU64::new(0),
        stop: stop.clone(),
    });
    let admission = connection::Admission::new(
        ctx.connection_permits.clone(),
        config.sessions.max_connections,
        activity::Deadlines {
            hello: config.sessions.hello_timeout,
            idle: config.sessions.idle_timeout,
        },
        ctx.stats.clone(),
    );
    let incoming = connection::incoming(listener, admission, stop.clone());
    let router = tonic::transport::Server::builder()
        .layer(activity::ActivityLayer)
        .layer(unimplemented::NameUnknownRpcsLayer)
        .add_service(PbKvServer::new(kv::KvService::new(front.clone())))
        .add_service(PbLeaseServer::new(lease_service::LeaseService::new(
            front.clone(),
        )))
        .add_service(PbWatchServer::new(watch::WatchService::new(front)));
    let server = tokio::spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            warn!(error = %error, "the etcd front end stopped with an error");
        }
    });
    info!(address = %address, "etcd front end listening (etcd v3 gRPC: KV, Lease, Watch)");
    Ok(EtcdFront {
        server,
        owner: owner_task,
    })
}

/// Counts one request by RPC and outcome.
fn count<T>(rpc: &'static str, result: &Result<T, Status>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(status) => code_name(status.code()),
    };
    metrics::counter!("holdfast_etcd_front_requests_total", "rpc" => rpc, "outcome" => outcome)
        .increment(1);
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Unavailable => "unavailable",
        Code::Unauthenticated => "unauthenticated",
        Code::Internal | Code::Unknown | Code::DataLoss => "internal",
    }
}

/// The gRPC status for a lease owner error, with etcd's messages.
fn owner_status(error: OwnerError) -> Status {
    match error {
        OwnerError::ShuttingDown => Status::unavailable("the relay is shutting down"),
        OwnerError::Lease(lease) => {
            let message = lease.to_string();
            match lease {
                LeaseError::NotFound => Status::not_found(message),
                LeaseError::Exists | LeaseError::HeldByAnotherLease { .. } => {
                    Status::failed_precondition(message)
                }
                LeaseError::TtlTooLarge => Status::out_of_range(message),
                LeaseError::TooManyLeases { .. } | LeaseError::TooManyKeys { .. } => {
                    Status::resource_exhausted(message)
                }
            }
        }
    }
}
