//! holdfastd's configuration: the TOML file, its defaults, and flag overrides.
//!
//! Every key is optional. Errors name the file and the key so an operator
//! can fix a typo at 3 a.m. without reading source. `deploy/holdfast.toml`
//! documents every key; keep the two in step.

use crate::front::access::{AccessConfig, AccessPolicy};
use crate::front::tls::TlsFiles;
use crate::messaging::classes::{ClassOverrides, Classes};
use crate::util::duration;
use crate::util::url_credentials;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// The most a tokio semaphore or bounded channel can be sized to, and so the
/// most any count limit in the config may be.
const MAX_PERMITS: usize = tokio::sync::Semaphore::MAX_PERMITS;
/// The largest `relay.max_frame_bytes`: NATS's own upper bound on a message.
const MAX_FRAME_BYTES_LIMIT: u32 = 64 * 1024 * 1024;
/// The most upstream endpoints the etcd front end's balanced channel takes.
const MAX_FRONT_END_UPSTREAMS: usize = 1024;

/// Why the configuration could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`{}: {message}", file_suffix(.path))]
    Invalid {
        path: Option<PathBuf>,
        key: &'static str,
        message: String,
    },
}

fn file_suffix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|path| format!(" (in {})", path.display()))
        .unwrap_or_default()
}

/// What to do with a subscriber whose outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Drop the message for that subscriber, count it, and tell it with an
    /// ERROR frame; other subscribers are unaffected.
    Drop,
    /// Close the subscriber's connection with GO_AWAY SlowConsumer.
    Disconnect,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub relay: RelayConfig,
    pub nats: NatsConfig,
    pub etcd: EtcdConfig,
    pub sessions: SessionConfig,
    pub quic: QuicConfig,
    /// `[access]`: rules by peer identity; see `access.rs`.
    pub access: AccessConfig,
    /// `[classes.NAME]` tables; see `classes.rs`.
    pub classes: BTreeMap<String, ClassOverrides>,
    /// `[guard]`: the planner guard; see `guard/mod.rs`.
    pub guard: GuardConfig,
    pub kv_consistency: KvConsistencyConfig,
}

/// What the planner guard does when a decision keeps overloading the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardMode {
    /// Write the previous decision back to etcd as a new decision.
    Enforce,
    /// Only publish the would-be rollback on `holdfast.guard.advice.{namespace}`.
    Advise,
}

/// `[guard]`: rolls back planner decisions that overload the fleet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    pub enabled: bool,
    /// Dynamo namespaces whose planner decisions are guarded.
    pub namespaces: Vec<String>,
    /// The planner's adjustment interval: load is judged per interval.
    #[serde(deserialize_with = "duration::deserialize")]
    pub interval: Duration,
    /// Fleet KV-cache usage (0-1) above which an interval breaches.
    pub kv_usage_threshold: f64,
    /// Summed prefill queue depth above which an interval breaches.
    pub prefill_queue_threshold: u64,
    /// Breaching intervals in a row, after a decision, that roll it back.
    pub consecutive: u32,
    pub mode: GuardMode,
    /// KV-cache blocks of one worker (one dp rank): the denominator of
    /// Dynamo's `kv_used_blocks`, which carries no total. 0 ignores
    /// Dynamo's `kv_metrics` reports for KV usage.
    pub kv_total_blocks: u64,
    /// TTL of the lease behind each namespace's election.
    #[serde(deserialize_with = "duration::deserialize")]
    pub lease_ttl: Duration,
    /// Workers (report sources) tracked per namespace and interval.
    pub max_workers: usize,
    /// How long a worker's last report stands for it when it sends no
    /// other (Dynamo's kv_metrics are sent only when they change).
    #[serde(deserialize_with = "duration::deserialize")]
    pub report_ttl: Duration,
}

impl Default for GuardConfig {
    fn default() -> GuardConfig {
        GuardConfig {
            enabled: false,
            namespaces: Vec::new(),
            // Dynamo's planner's default --adjustment-interval.
            interval: Duration::from_secs(180),
            kv_usage_threshold: 0.95,
            prefill_queue_threshold: 100,
            consecutive: 3,
            mode: GuardMode::Enforce,
            kv_total_blocks: 0,
            lease_ttl: Duration::from_secs(10),
            max_workers: 4096,
            report_ttl: Duration::from_secs(180),
        }
    }
}

/// `[kv_consistency]`: the check of Dynamo KV event streams on the
/// `kv_events` class (see `messaging/kv_consistency.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConsistencyConfig {
    pub enabled: bool,
    /// Blocks followed across all streams (at most about 40 bytes each).
    pub max_tracked_blocks: usize,
    /// (subject, worker, dp_rank) streams followed.
    pub max_tracked_streams: usize,
}

impl Default for KvConsistencyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_tracked_blocks: 1_000_000,
            max_tracked_streams: 4096,
        }
    }
}

impl KvConsistencyConfig {
    /// The check's limits, `None` when it is off.
    pub fn limits(&self) -> Option<crate::messaging::kv_consistency::KvCheckLimits> {
        self.enabled
            .then_some(crate::messaging::kv_consistency::KvCheckLimits {
                max_tracked_blocks: self.max_tracked_blocks,
                max_tracked_streams: self.max_tracked_streams,
            })
    }
}

/// `[relay]`: the daemon itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub socket: PathBuf,
    /// Directory of the journal (`journal.redb`).
    pub data_dir: PathBuf,
    /// Octal permission bits for the socket file, as a string ("0660").
    pub socket_mode: String,
    /// Group (name or numeric id) the socket file is given, so members of
    /// that group may connect; empty keeps the relay's own group.
    pub socket_group: String,
    pub max_frame_bytes: u32,
    #[serde(deserialize_with = "duration::deserialize")]
    pub shutdown_grace: Duration,
    /// Where `/metrics`, `/livez`, `/readyz` and `/status` are served.
    pub metrics_addr: String,
    /// Address of the NATS client-protocol front end (unmodified NATS
    /// clients connect here as to nats-server); empty means none.
    pub nats_listen: String,
    /// Address of the etcd v3 gRPC front end (unmodified etcd clients
    /// connect here as to etcd); empty means none. Needs `[etcd] endpoints`.
    pub etcd_listen: String,
    /// Durable publishes are refused (`journal_full`) while the data dir's
    /// filesystem has less free space than this; 0 refuses only once a
    /// commit finds the disk full.
    pub journal_reserve_bytes: u64,
}

/// `[nats]`: the upstream NATS cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub servers: Vec<String>,
    #[serde(deserialize_with = "duration::deserialize")]
    pub probe_interval: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    pub link_timeout: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    pub reconnect_delay_max: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    pub max_request_timeout: Duration,
    /// CA certificates (PEM) that sign the servers' certificates; setting it
    /// turns TLS on. Without it a `tls://` URL uses the system's roots.
    pub tls_ca: PathBuf,
    /// Client certificate (PEM) for servers that verify clients.
    pub tls_cert: PathBuf,
    /// The client certificate's private key (PEM); a secret file.
    pub tls_key: PathBuf,
    /// TLS before the server's INFO line, for servers configured with
    /// `handshake_first`.
    pub tls_first: bool,
    /// JWT credentials (`.creds`: user JWT and nkey seed); a secret file.
    pub creds_file: PathBuf,
    /// An nkey seed (`SU...`) for servers that list the user's public nkey.
    pub nkey_seed_file: PathBuf,
    /// User name; the password comes from `password_file`.
    pub user: String,
    pub password_file: PathBuf,
    /// A file holding the server's authorization token.
    pub token_file: PathBuf,
}

/// `[etcd]`: the upstream etcd cluster, registrations and discovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of the cluster; empty turns registration and discovery off.
    pub endpoints: Vec<String>,
    /// TTL of the lease the relay holds for each registering session; keys
    /// outlive a dead relay by at most this long.
    #[serde(deserialize_with = "duration::deserialize")]
    pub lease_ttl: Duration,
    /// A session with registrations that sends nothing for this long is
    /// dead: its keys are deleted and its lease revoked.
    #[serde(deserialize_with = "duration::deserialize")]
    pub liveness_timeout: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    pub probe_interval: Duration,
    /// A probe (or connect) that takes longer than this marks etcd down.
    #[serde(deserialize_with = "duration::deserialize")]
    pub probe_timeout: Duration,
    /// Cap of the exponential, jittered delay between reconnect attempts.
    #[serde(deserialize_with = "duration::deserialize")]
    pub reconnect_delay_max: Duration,
    /// Period of the anti-entropy pass that repairs keys changed or deleted
    /// behind the relay's back.
    #[serde(deserialize_with = "duration::deserialize")]
    pub reconcile_interval: Duration,
    /// Prefixes whose discovery cache is filled at start.
    pub prefixes: Vec<String>,
    /// Most prefixes cached at once (configured ones included).
    pub max_cached_prefixes: usize,
    /// Most cached prefixes the watches of one session may hold, so that
    /// one client cannot take every slot from the others.
    pub max_cached_prefixes_per_session: usize,
    /// Most watches one session (or etcd front end watch stream) may hold.
    pub max_watches_per_session: usize,
    /// Most bytes of keys and values the discovery cache holds, across all
    /// prefixes; a prefix that does not fit is not cached.
    pub max_cached_bytes: usize,
    /// Most registrations held by the relay across all sessions, counting
    /// removals etcd has not confirmed yet.
    pub max_registrations: usize,
    /// Most registrations one session may hold.
    pub max_registrations_per_session: usize,
    /// How long no member may serve (counted from the first probe that
    /// found none) before etcd is declared down, unless every member
    /// refuses connections (then it is down at once). Rides out a leader
    /// election.
    #[serde(deserialize_with = "duration::deserialize")]
    pub link_timeout: Duration,
    /// The key probes read (count only; it need not exist). With etcd auth
    /// on, the relay's user needs read permission on it.
    pub probe_key: String,
    /// CA certificates (PEM) that sign the members' certificates; `https://`
    /// endpoints without it use the system's roots.
    pub tls_ca: PathBuf,
    /// Client certificate (PEM) for members run with `--client-cert-auth`.
    pub tls_cert: PathBuf,
    /// The client certificate's private key (PEM); a secret file.
    pub tls_key: PathBuf,
    /// etcd user; the password comes from `password_file`.
    pub user: String,
    pub password_file: PathBuf,
}

/// `[quic]`: the QUIC listener and its TLS material.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// Address to listen on ("0.0.0.0:4443"); empty means no QUIC listener.
    pub addr: String,
    /// The relay's certificate chain (PEM).
    pub cert: PathBuf,
    /// The relay's private key (PEM).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign client certificates; when set,
    /// every QUIC client must present one (mutual TLS).
    pub client_ca: PathBuf,
}

/// `[sessions]`: per-connection limits and policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub outbound_queue_frames: usize,
    pub outbound_queue_bytes: usize,
    pub slow_consumer: SlowConsumerPolicy,
    pub max_inflight_requests: usize,
    pub max_subscriptions: usize,
    /// Connections (Unix, QUIC and both front ends) open at once; more are
    /// turned away. The relay admits fewer if its open-file limit says so.
    pub max_connections: usize,
    /// A connection must send HELLO within this long.
    #[serde(with = "duration")]
    pub hello_timeout: Duration,
    /// A connection that sends nothing for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Bytes of partly received large frames held at once across all
    /// connections; a reader waits for room before taking one in.
    pub read_budget_bytes: usize,
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            socket: PathBuf::from("/run/holdfast/holdfast.sock"),
            data_dir: PathBuf::from("/var/lib/holdfast"),
            socket_mode: "0660".to_string(),
            socket_group: String::new(),
            max_frame_bytes: holdfast_wire::DEFAULT_MAX_FRAME_BYTES,
            shutdown_grace: Duration::from_secs(5),
            metrics_addr: "127.0.0.1:9477".to_string(),
            nats_listen: String::new(),
            etcd_listen: String::new(),
            journal_reserve_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for NatsConfig {
    fn default() -> NatsConfig {
        NatsConfig {
            servers: vec!["nats://127.0.0.1:4222".to_string()],
            probe_interval: Duration::from_millis(250),
            link_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            reconnect_delay_max: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            max_request_timeout: Duration::from_secs(60),
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_first: false,
            creds_file: PathBuf::new(),
            nkey_seed_file: PathBuf::new(),
            user: String::new(),
            password_file: PathBuf::new(),
            token_file: PathBuf::new(),
        }
    }
}

impl Default for EtcdConfig {
    fn default() -> EtcdConfig {
        EtcdConfig {
            endpoints: Vec::new(),
            lease_ttl: Duration::from_secs(10),
            liveness_timeout: Duration::from_secs(1),
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_millis(500),
            reconnect_delay_max: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(10),
            prefixes: Vec::new(),
            max_cached_prefixes: 256,
            max_cached_prefixes_per_session: 64,
            max_watches_per_session: 1024,
            max_cached_bytes: 64 * 1024 * 1024,
            max_registrations: 1_000_000,
            max_registrations_per_session: 100_000,
            link_timeout: Duration::from_secs(3),
            probe_key: "\0holdfast-probe".to_string(),
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            user: String::new(),
            password_file: PathBuf::new(),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            outbound_queue_frames: 16_384,
            outbound_queue_bytes: 64 * 1024 * 1024,
            slow_consumer: SlowConsumerPolicy::Drop,
            max_inflight_requests: 1024,
            max_subscriptions: 10_000,
            max_connections: 4096,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            read_budget_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Values given on the command line; each one replaces the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub nats_servers: Option<String>,
    pub etcd_endpoints: Option<String>,
    pub metrics_addr: Option<String>,
    pub quic_addr: Option<String>,
    pub nats_listen: Option<String>,
    pub etcd_listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub nats_tls_ca: Option<PathBuf>,
    pub nats_tls_cert: Option<PathBuf>,
    pub nats_tls_key: Option<PathBuf>,
    pub nats_creds: Option<PathBuf>,
    pub nats_nkey_seed: Option<PathBuf>,
    pub nats_user: Option<String>,
    pub nats_password_file: Option<PathBuf>,
    pub nats_token_file: Option<PathBuf>,
    pub etcd_tls_ca: Option<PathBuf>,
    pub etcd_tls_cert: Option<PathBuf>,
    pub etcd_tls_key: Option<PathBuf>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
}

impl Config {
    /// Reads `path` (or the defaults when `None`), applies `overrides`, and
    /// validates the shape and the numbers. `preflight::load` adds the checks
    /// that read TLS and credential files; the daemon starts from that.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(socket) = &overrides.socket {
            config.relay.socket = socket.clone();
        }
        if let Some(data_dir) = &overrides.data_dir {
            config.relay.data_dir = data_dir.clone();
        }
        if let Some(address) = &overrides.metrics_addr {
            config.relay.metrics_addr = address.clone();
        }
        if let Some(servers) = &overrides.nats_servers {
            // Every user of the node can read a process's command line.
            if split_list(servers)
                .iter()
                .any(|server| url_credentials::split(server).1.is_some())
            {
                return Err(ConfigError::Invalid {
                    path: None,
                    key: "nats.servers",
                    message: "--nats URLs must not carry credentials (every user can read a command line); use [nats] user and password_file, token_file, creds_file or nkey_seed_file".to_string(),
                });
            }
            config.nats.servers = split_list(servers);
        }
        if let Some(endpoints) = &overrides.etcd_endpoints {
            config.etcd.endpoints = split_list(endpoints);
        }
        if let Some(address) = &overrides.nats_listen {
            config.relay.nats_listen = address.clone();
        }
        if let Some(address) = &overrides.etcd_listen {
            config.relay.etcd_listen = address.clone();
        }
        if let Some(address) = &overrides.quic_addr {
            config.quic.addr = address.clone();
        }
        if let Some(cert) = &overrides.tls_cert {
            config.quic.cert = cert.clone();
        }
        if let Some(key) = &overrides.tls_key {
            config.quic.key = key.clone();
        }
        if let Some(client_ca) = &overrides.tls_client_ca {
            config.quic.client_ca = client_ca.clone();
        }
        let nats = &mut config.nats;
        for (value, field) in [
            (&overrides.nats_tls_ca, &mut nats.tls_ca),
            (&overrides.nats_tls_cert, &mut nats.tls_cert),
            (&overrides.nats_tls_key, &mut nats.tls_key),
            (&overrides.nats_creds, &mut nats.creds_file),
            (&overrides.nats_nkey_seed, &mut nats.nkey_seed_file),
            (&overrides.nats_password_file, &mut nats.password_file),
            (&overrides.nats_token_file, &mut nats.token_file),
        ] {
            if let Some(value) = value {
                *field = value.clone();
            }
        }
        if let Some(user) = &overrides.nats_user {
            nats.user = user.clone();
        }
        let etcd = &mut config.etcd;
        for (value, field) in [
            (&overrides.etcd_tls_ca, &mut etcd.tls_ca),
            (&overrides.etcd_tls_cert, &mut etcd.tls_cert),
            (&overrides.etcd_tls_key, &mut etcd.tls_key),
            (&overrides.etcd_password_file, &mut etcd.password_file),
        ] {
            if let Some(value) = value {
                *field = value.clone();
            }
        }
        if let Some(user) = &overrides.etcd_user {
            etcd.user = user.clone();
        }
        config.validate(path)?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: error.to_string(),
        })
    }

    fn validate(&self, path: Option<&Path>) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.map(Path::to_path_buf),
            key,
            message,
        };
        self.socket_mode()
            .map_err(|message| invalid("relay.socket_mode", message))?;
        self.metrics_addr()
            .map_err(|message| invalid("relay.metrics_addr", message))?;
        self.classes()
            .map_err(|message| invalid("classes", message))?;
        self.access_policy()
            .map_err(|message| invalid("access", message))?;
        self.quic_addr()
            .map_err(|message| invalid("quic.addr", message))?;
        self.nats_listen()
            .map_err(|message| invalid("relay.nats_listen", message))?;
        self.etcd_listen()
            .map_err(|message| invalid("relay.etcd_listen", message))?;
        if !self.quic.addr.is_empty() {
            for (key, path) in [("quic.cert", &self.quic.cert), ("quic.key", &self.quic.key)] {
                if path.as_os_str().is_empty() {
                    return Err(invalid(
                        key,
                        "the QUIC listener needs a certificate and key (--tls-cert, --tls-key; `holdfastd gen-cert` makes development ones)".to_string(),
                    ));
                }
            }
        }
        if self.sessions.hello_timeout.is_zero() {
            return Err(invalid(
                "sessions.hello_timeout",
                "must be non-zero".to_string(),
            ));
        }
        // Clients ping every 250 ms; anything shorter would close healthy ones.
        if self.sessions.idle_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "sessions.idle_timeout",
                "must be at least 1s (clients ping every 250ms)".to_string(),
            ));
        }
        // Each connection may hold a buffer this large while a frame
        // arrives, so the bound is memory's; NATS carries nothing larger.
        if !(1024..=MAX_FRAME_BYTES_LIMIT).contains(&self.relay.max_frame_bytes) {
            return Err(invalid(
                "relay.max_frame_bytes",
                format!("must be at least 1024 and at most {MAX_FRAME_BYTES_LIMIT} (64 MiB, the largest NATS max_payload)"),
            ));
        }
        // A frame larger than the whole budget could never be read.
        if self.sessions.read_budget_bytes < self.relay.max_frame_bytes as usize {
            return Err(invalid(
                "sessions.read_budget_bytes",
                format!(
                    "must be at least relay.max_frame_bytes ({})",
                    self.relay.max_frame_bytes
                ),
            ));
        }
        if self.kv_consistency.enabled && self.kv_consistency.max_tracked_streams == 0 {
            return Err(invalid(
                "kv_consistency.max_tracked_streams",
                "must be at least 1 while the check is enabled".to_string(),
            ));
        }
        if self.nats.servers.is_empty() {
            return Err(invalid(
                "nats.servers",
                "at least one NATS server is needed".to_string(),
            ));
        }
        if self.nats.probe_interval.is_zero() || self.nats.probe_interval >= self.nats.link_timeout
        {
            return Err(invalid(
                "nats.probe_interval",
                "must be non-zero and shorter than nats.link_timeout".to_string(),
            ));
        }
        self.validate_guard()
            .map_err(|(key, message)| invalid(key, message))?;
        let etcd = &self.etcd;
        if etcd.lease_ttl < Duration::from_secs(2) {
            return Err(invalid(
                "etcd.lease_ttl",
                "must be at least 2s (etcd grants whole seconds)".to_string(),
            ));
        }
        if etcd.probe_interval.is_zero() || etcd.probe_timeout.is_zero() {
            return Err(invalid(
                "etcd.probe_interval",
                "etcd.probe_interval and etcd.probe_timeout must be non-zero".to_string(),
            ));
        }
        // Clients ping every 250 ms by default; a shorter timeout would end
        // healthy sessions and delete their keys.
        if etcd.liveness_timeout < Duration::from_millis(500) {
            return Err(invalid(
                "etcd.liveness_timeout",
                "must be at least 500ms (clients ping every 250ms)".to_string(),
            ));
        }
        if etcd.reconcile_interval.is_zero() {
            return Err(invalid(
                "etcd.reconcile_interval",
                "must be non-zero".to_string(),
            ));
        }
        if etcd.probe_key.is_empty() {
            return Err(invalid(
                "etcd.probe_key",
                "must not be empty (etcd has no empty key)".to_string(),
            ));
        }
        if etcd.link_timeout.is_zero() {
            return Err(invalid("etcd.link_timeout", "must be non-zero".to_string()));
        }
        if etcd.reconnect_delay_max < etcd.probe_interval {
            return Err(invalid(
                "etcd.reconnect_delay_max",
                "must be at least etcd.probe_interval".to_string(),
            ));
        }
        if let Some(bad) = etcd.prefixes.iter().find(|prefix| prefix.is_empty()) {
            return Err(invalid(
                "etcd.prefixes",
                format!("{bad:?}: a prefix must not be empty"),
            ));
        }
        if etcd.prefixes.len() > etcd.max_cached_prefixes {
            return Err(invalid(
                "etcd.prefixes",
                "more prefixes than etcd.max_cached_prefixes".to_string(),
            ));
        }
        let positive = [
            ("etcd.max_cached_prefixes", etcd.max_cached_prefixes),
            (
                "etcd.max_cached_prefixes_per_session",
                etcd.max_cached_prefixes_per_session,
            ),
            ("etcd.max_watches_per_session", etcd.max_watches_per_session),
            ("etcd.max_cached_bytes", etcd.max_cached_bytes),
            ("etcd.max_registrations", etcd.max_registrations),
            (
                "etcd.max_registrations_per_session",
                etcd.max_registrations_per_session,
            ),
            (
                "sessions.outbound_queue_frames",
                self.sessions.outbound_queue_frames,
            ),
            (
                "sessions.outbound_queue_bytes",
                self.sessions.outbound_queue_bytes,
            ),
            (
                "sessions.max_inflight_requests",
                self.sessions.max_inflight_requests,
            ),
            (
                "sessions.max_subscriptions",
                self.sessions.max_subscriptions,
            ),
            ("sessions.max_connections", self.sessions.max_connections),
            (
                "sessions.read_budget_bytes",
                self.sessions.read_budget_bytes,
            ),
        ];
        // Some size tokio semaphores and channels, which panic above
        // MAX_PERMITS; no limit needs to come anywhere near it.
        for (key, value) in positive {
            if value == 0 || value > MAX_PERMITS {
                return Err(invalid(
                    key,
                    format!("must be greater than 0 and at most {MAX_PERMITS}"),
                ));
            }
        }
        Ok(())
    }

    /// Checks `[guard]`; the error names the key.
    fn validate_guard(&self) -> Result<(), (&'static str, String)> {
        let guard = &self.guard;
        if !guard.enabled {
            return Ok(());
        }
        if guard.namespaces.is_empty() {
            return Err((
                "guard.namespaces",
                "the enabled guard needs at least one namespace".to_string(),
            ));
        }
        // A namespace is one NATS subject token and one etcd path segment.
        let bad_char = |c: char| matches!(c, '.' | '*' | '>' | '/') || c.is_whitespace();
        if let Some(bad) = guard
            .namespaces
            .iter()
            .find(|namespace| namespace.is_empty() || namespace.contains(bad_char))
        {
            return Err((
                "guard.namespaces",
                format!("{bad:?}: a namespace is one non-empty token without '.', '*', '>', '/' or spaces"),
            ));
        }
        if self.etcd.endpoints.is_empty() {
            return Err((
                "guard.enabled",
                "the guard reads decisions from etcd: set etcd.endpoints".to_string(),
            ));
        }
        if guard.interval < Duration::from_millis(100) {
            return Err(("guard.interval", "must be at least 100ms".to_string()));
        }
        if !(guard.kv_usage_threshold > 0.0 && guard.kv_usage_threshold <= 1.0) {
            return Err((
                "guard.kv_usage_threshold",
                "must be above 0 and at most 1 (a fraction of the KV cache)".to_string(),
            ));
        }
        if guard.consecutive == 0 {
            return Err(("guard.consecutive", "must be at least 1".to_string()));
        }
        if guard.lease_ttl < Duration::from_secs(2) {
            return Err((
                "guard.lease_ttl",
                "must be at least 2s (etcd grants whole seconds)".to_string(),
            ));
        }
        if guard.report_ttl.is_zero() {
            return Err(("guard.report_ttl", "must be non-zero".to_string()));
        }
        if guard.max_workers == 0 || guard.max_workers > 1_000_000 {
            return Err((
                "guard.max_workers",
                "must be greater than 0 and at most 1000000".to_string(),
            ));
        }
        Ok(())
    }

    /// The resolved message classes, in drain order.
    pub fn classes(&self) -> Result<Classes, String> {
        Classes::resolve(&self.classes)
    }

    /// The compiled `[access]` rules.
    pub fn access_policy(&self) -> Result<AccessPolicy, String> {
        AccessPolicy::compile(&self.access)
    }

    /// The QUIC listener's address, if one is configured.
    pub fn quic_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.quic.addr.is_empty() {
            return Ok(None);
        }
        self.quic.addr.parse().map(Some).map_err(|_| {
            format!(
                "{:?} is not an IP address and port like \"0.0.0.0:4443\"",
                self.quic.addr
            )
        })
    }

    /// The NATS client-protocol front end's address, if one is configured.
    pub fn nats_listen(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.relay.nats_listen.is_empty() {
            return Ok(None);
        }
        self.relay.nats_listen.parse().map(Some).map_err(|_| {
            format!(
                "{:?} is not an IP address and port like \"127.0.0.1:4223\"",
                self.relay.nats_listen
            )
        })
    }

    /// The etcd v3 gRPC front end's address, if one is configured.
    pub fn etcd_listen(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.relay.etcd_listen.is_empty() {
            return Ok(None);
        }
        if self.etcd.endpoints.is_empty() {
            return Err(
                "the etcd front end needs upstream etcd endpoints ([etcd] endpoints or --etcd)"
                    .to_string(),
            );
        }
        // tonic's balanced channel takes the list through a queue of this
        // size and panics beyond it.
        if self.etcd.endpoints.len() > MAX_FRONT_END_UPSTREAMS {
            return Err(format!(
                "the etcd front end takes at most {MAX_FRONT_END_UPSTREAMS} upstream etcd endpoints, {} are configured",
                self.etcd.endpoints.len()
            ));
        }
        self.relay.etcd_listen.parse().map(Some).map_err(|_| {
            format!(
                "{:?} is not an IP address and port like \"127.0.0.1:2389\"",
                self.relay.etcd_listen
            )
        })
    }

    /// The etcd front end's lease table and the keys under each lease.
    pub fn etcd_front_leases_path(&self) -> PathBuf {
        self.relay.data_dir.join("etcd-front-leases.redb")
    }

    /// Where relays before the redb lease table kept it (read once, then
    /// removed).
    pub fn etcd_front_legacy_leases_path(&self) -> PathBuf {
        self.relay.data_dir.join("etcd-front-leases.json")
    }

    /// The QUIC listener's TLS files.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.quic.cert.clone(),
            key: self.quic.key.clone(),
            client_ca: Some(self.quic.client_ca.clone())
                .filter(|path| !path.as_os_str().is_empty()),
        }
    }

    /// The persisted discovery cache.
    pub fn discovery_cache_path(&self) -> PathBuf {
        self.relay.data_dir.join("discovery-cache.json")
    }

    /// Where the KV event check leaves each stream's place at a clean
    /// stop, for the next start (read once, then removed).
    pub fn kv_check_state_path(&self) -> PathBuf {
        self.relay.data_dir.join("kv-check-streams.json")
    }

    /// The journal file.
    pub fn journal_path(&self) -> PathBuf {
        self.relay.data_dir.join("journal.redb")
    }

    /// The metrics endpoint's address.
    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr, String> {
        self.relay.metrics_addr.parse().map_err(|_| {
            format!(
                "{:?} is not an IP address and port like \"127.0.0.1:9477\"",
                self.relay.metrics_addr
            )
        })
    }

    /// The socket file's permission bits.
    pub fn socket_mode(&self) -> Result<u32, String> {
        let digits = self.relay.socket_mode.trim_start_matches("0o");
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                format!(
                    "{:?} is not an octal file mode like \"0660\"",
                    self.relay.socket_mode
                )
            })
    }
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(
            config.relay.socket,
            Path::new("/run/holdfast/holdfast.sock")
        );
        assert_eq!(config.socket_mode(), Ok(0o660));
        assert_eq!(config.nats.link_timeout, Duration::from_secs(1));
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let file = write_config(
            "[relay]\nsocket = \"/tmp/a.sock\"\n[nats]\nservers = [\"nats://10.0.0.1:4222\"]\nrequest_timeout = \"2s\"\n",
        );
        let overrides = Overrides {
            socket: None,
            data_dir: None,
            nats_servers: Some("nats://127.0.0.1:1, nats://127.0.0.1:2".to_string()),
            etcd_endpoints: Some("http://127.0.0.1:2379".to_string()),
            metrics_addr: Some("127.0.0.1:19477".to_string()),
            ..Overrides::default()
        };
        let config = Config::load(Some(file.path()), &overrides).unwrap();
        assert_eq!(config.relay.socket, Path::new("/tmp/a.sock"));
        assert_eq!(config.nats.request_timeout, Duration::from_secs(2));
        assert_eq!(
            config.metrics_addr(),
            Ok("127.0.0.1:19477".parse().unwrap())
        );
        assert_eq!(
            config.nats.servers,
            vec!["nats://127.0.0.1:1", "nats://127.0.0.1:2"]
        );
    }

    #[test]
    fn the_documented_example_file_is_valid_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/holdfast.toml");
        let documented = Config::load(Some(&path), &Overrides::default()).unwrap();
        let defaults = Config::default();
        assert_eq!(documented.etcd.lease_ttl, defaults.etcd.lease_ttl);
        assert_eq!(
            documented.etcd.liveness_timeout,
            defaults.etcd.liveness_timeout
        );
        assert_eq!(
            documented.etcd.reconnect_delay_max,
            defaults.etcd.reconnect_delay_max
        );
        assert_eq!(
            documented.etcd.reconcile_interval,
            defaults.etcd.reconcile_interval
        );
        assert_eq!(documented.nats.link_timeout, defaults.nats.link_timeout);
        assert_eq!(documented.etcd.link_timeout, defaults.etcd.link_timeout);
        assert_eq!(documented.etcd.probe_key, defaults.etcd.probe_key);
        assert_eq!(
            documented.etcd.max_cached_prefixes_per_session,
            defaults.etcd.max_cached_prefixes_per_session
        );
        assert_eq!(
            documented.etcd.max_watches_per_session,
            defaults.etcd.max_watches_per_session
        );
        assert_eq!(documented.nats.tls_first, defaults.nats.tls_first);
        assert_eq!(documented.nats.creds_file, defaults.nats.creds_file);
        assert_eq!(documented.etcd.user, defaults.etcd.user);
        assert_eq!(documented.relay.socket, defaults.relay.socket);
        assert_eq!(documented.guard.enabled, defaults.guard.enabled);
        assert_eq!(documented.guard.interval, defaults.guard.interval);
        assert_eq!(
            documented.guard.kv_usage_threshold,
            defaults.guard.kv_usage_threshold
        );
        assert_eq!(
            documented.guard.prefill_queue_threshold,
            defaults.guard.prefill_queue_threshold
        );
        assert_eq!(documented.guard.consecutive, defaults.guard.consecutive);
        assert_eq!(documented.guard.mode, defaults.guard.mode);
        assert_eq!(documented.guard.lease_ttl, defaults.guard.lease_ttl);
        assert_eq!(documented.guard.max_workers, defaults.guard.max_workers);
        assert_eq!(documented.guard.report_ttl, defaults.guard.report_ttl);
        assert_eq!(documented.relay.socket_group, defaults.relay.socket_group);
        assert_eq!(
            documented.relay.journal_reserve_bytes,
            defaults.relay.journal_reserve_bytes
        );
        assert_eq!(
            documented.sessions.max_connections,
            defaults.sessions.max_connections
        );
        assert_eq!(
            documented.sessions.hello_timeout,
            defaults.sessions.hello_timeout
        );
        assert_eq!(
            documented.sessions.idle_timeout,
            defaults.sessions.idle_timeout
        );
        assert_eq!(
            documented.sessions.read_budget_bytes,
            defaults.sessions.read_budget_bytes
        );
        assert_eq!(documented.quic.addr, defaults.quic.addr);
        assert_eq!(documented.access.default, defaults.access.default);
        assert!(documented.access.rules.is_empty());
    }

    #[test]
    fn quic_needs_a_certificate_and_key_and_flags_provide_them() {
        let overrides = Overrides {
            quic_addr: Some("127.0.0.1:0".to_string()),
            ..Overrides::default()
        };
        let error = Config::load(None, &overrides).unwrap_err().to_string();
        assert!(error.contains("quic.cert"), "{error}");
        let overrides = Overrides {
            quic_addr: Some("127.0.0.1:0".to_string()),
            tls_cert: Some(PathBuf::from("/etc/holdfast/server.pem")),
            tls_key: Some(PathBuf::from("/etc/holdfast/server.key")),
            tls_client_ca: Some(PathBuf::from("/etc/holdfast/ca.pem")),
            ..Overrides::default()
        };
        let config = Config::load(None, &overrides).unwrap();
        assert_eq!(
            config.quic_addr().unwrap(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        let files = config.tls_files();
        assert_eq!(
            files.client_ca.as_deref(),
            Some(Path::new("/etc/holdfast/ca.pem"))
        );
        let overrides = Overrides {
            quic_addr: Some("not an address".to_string()),
            ..Overrides::default()
        };
        let error = Config::load(None, &overrides).unwrap_err().to_string();
        assert!(error.contains("quic.addr"), "{error}");
        assert_eq!(Config::default().tls_files().client_ca, None);
    }

    #[test]
    fn limits_and_access_rules_are_checked_and_name_the_key() {
        for (text, key) in [
            (
                "[sessions]\nidle_timeout = \"100ms\"\n",
                "sessions.idle_timeout",
            ),
            (
                "[sessions]\nhello_timeout = \"0s\"\n",
                "sessions.hello_timeout",
            ),
            (
                "[sessions]\nmax_connections = 0\n",
                "sessions.max_connections",
            ),
            (
                "[relay]\nmax_frame_bytes = 4294967295\n",
                "relay.max_frame_bytes",
            ),
            // Above tokio's semaphore limit: refused here, not a panic later.
            (
                "[sessions]\nmax_connections = 4000000000000000000\n",
                "sessions.max_connections",
            ),
            (
                "[sessions]\nmax_inflight_requests = 4000000000000000000\n",
                "sessions.max_inflight_requests",
            ),
            (
                "[sessions]\noutbound_queue_frames = 4000000000000000000\n",
                "sessions.outbound_queue_frames",
            ),
            ("[[access.rule]]\npublish = [\"a\"]\n", "access"),
            (
                "[etcd]\nmax_cached_prefixes_per_session = 0\n",
                "etcd.max_cached_prefixes_per_session",
            ),
            (
                "[etcd]\nmax_watches_per_session = 0\n",
                "etcd.max_watches_per_session",
            ),
        ] {
            let file = write_config(text);
            let error = Config::load(Some(file.path()), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn etcd_flag_replaces_the_endpoints_and_bad_etcd_values_name_the_key() {
        let overrides = Overrides {
            etcd_endpoints: Some("http://127.0.0.1:1,http://127.0.0.1:2".to_string()),
            ..Overrides::default()
        };
        let config = Config::load(None, &overrides).unwrap();
        assert_eq!(config.etcd.endpoints.len(), 2);
        let many: Vec<String> = (0..=MAX_FRONT_END_UPSTREAMS)
            .map(|port| format!("http://127.0.0.1:{}", 10_000 + port))
            .collect();
        let overrides = Overrides {
            etcd_endpoints: Some(many.join(",")),
            ..Overrides::default()
        };
        let file = write_config("[relay]\netcd_listen = \"127.0.0.1:2389\"\n");
        let error = Config::load(Some(file.path()), &overrides)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("relay.etcd_listen") && error.contains("at most 1024"),
            "{error}"
        );
        let file = write_config("[etcd]\nlease_ttl = \"500ms\"\n");
        let error = Config::load(Some(file.path()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("etcd.lease_ttl"), "{error}");
    }

    #[test]
    fn unknown_key_names_the_key_and_the_file() {
        let file = write_config("[relay]\nsokcet = \"/tmp/a.sock\"\n");
        let error = Config::load(Some(file.path()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("sokcet"), "{error}");
        assert!(
            error.contains(&file.path().display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let file = write_config("[nats]\nlink_timeout = \"soon\"\n");
        let error = Config::load(Some(file.path()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("link_timeout"), "{error}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let file = write_config("[relay]\nsocket_mode = \"rw-rw----\"\n");
        let error = Config::load(Some(file.path()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("relay.socket_mode"), "{error}");
        let file = write_config("[sessions]\nslow_consumer = \"ignore\"\n");
        let error = Config::load(Some(file.path()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("slow_consumer"), "{error}");
    }

    #[test]
    fn guard_errors_name_the_key_and_the_file() {
        let cases = [
            ("[guard]\nenabled = true\n", "guard.namespaces"),
            (
                "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[guard]\nenabled = true\nnamespaces = [\"a.b\"]\n",
                "guard.namespaces",
            ),
            ("[guard]\nenabled = true\nnamespaces = [\"dynamo\"]\n", "guard.enabled"),
            (
                "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[guard]\nenabled = true\nnamespaces = [\"dynamo\"]\nkv_usage_threshold = 1.5\n",
                "guard.kv_usage_threshold",
            ),
            (
                "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[guard]\nenabled = true\nnamespaces = [\"dynamo\"]\nconsecutive = 0\n",
                "guard.consecutive",
            ),
            ("[guard]\nmode = \"block\"\n", "mode"),
        ];
        for (text, key) in cases {
            let file = write_config(text);
            let error = Config::load(Some(file.path()), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{text}: {error}");
            assert!(
                error.contains(&file.path().display().to_string()),
                "{error}"
            );
        }
        let file = write_config(
            "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[guard]\nenabled = true\nnamespaces = [\"dynamo\"]\ninterval = \"1s\"\nmode = \"advise\"\n",
        );
        let config = Config::load(Some(file.path()), &Overrides::default()).unwrap();
        assert_eq!(config.guard.mode, GuardMode::Advise);
        assert_eq!(config.guard.interval, Duration::from_secs(1));
    }
}
