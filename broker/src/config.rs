//! holdfastd's configuration: the TOML file, its defaults, and flag overrides.
//!
//! Every key is optional. Errors name the file and the key so an operator
//! can fix a typo at 3 a.m. without reading source. `deploy/holdfast.toml`
//! documents every key; keep the two in step.

use crate::classes::{ClassOverrides, Classes};
use crate::duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

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
    pub sessions: SessionConfig,
    /// `[classes.NAME]` tables; see `classes.rs`.
    pub classes: BTreeMap<String, ClassOverrides>,
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
    pub max_frame_bytes: u32,
    #[serde(deserialize_with = "duration::deserialize")]
    pub shutdown_grace: Duration,
    /// Where `/metrics`, `/livez`, `/readyz` and `/status` are served.
    pub metrics_addr: String,
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
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            socket: PathBuf::from("/run/holdfast/holdfast.sock"),
            data_dir: PathBuf::from("/var/lib/holdfast"),
            socket_mode: "0660".to_string(),
            max_frame_bytes: holdfast_wire::DEFAULT_MAX_FRAME_BYTES,
            shutdown_grace: Duration::from_secs(5),
            metrics_addr: "127.0.0.1:9477".to_string(),
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
        }
    }
}

/// Values given on the command line; each one replaces the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub nats_servers: Option<String>,
    pub metrics_addr: Option<String>,
}

impl Config {
    /// Reads `path` (or the defaults when `None`), applies `overrides`, and
    /// validates the result.
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
            config.nats.servers = split_list(servers);
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
        if self.relay.max_frame_bytes < 1024 {
            return Err(invalid(
                "relay.max_frame_bytes",
                "must be at least 1024".to_string(),
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
        let positive = [
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
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0".to_string()));
            }
        }
        Ok(())
    }

    /// The resolved message classes, in drain order.
    pub fn classes(&self) -> Result<Classes, String> {
        Classes::resolve(&self.classes)
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
            metrics_addr: Some("127.0.0.1:19477".to_string()),
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
}
