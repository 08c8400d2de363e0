//! How a [`Client`](crate::Client) connects and behaves while the relay is away.

use crate::url::{RelayUrl, UrlError};
use holdfast_wire::backoff::Backoff;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable naming the CA file for `quic://` relays, shared
/// with the CLI's `--ca`.
pub const CA_ENV: &str = "HOLDFAST_CA";

/// The environment variable naming the client certificate for mutual TLS,
/// shared with the CLI's `--cert`.
pub const CERT_ENV: &str = "HOLDFAST_CERT";

/// The environment variable naming the client certificate's private key,
/// shared with the CLI's `--key`.
pub const KEY_ENV: &str = "HOLDFAST_KEY";

/// What publishes do while the client has no connection to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflinePolicy {
    /// Hold publishes (and their ack waiters) in memory, up to both bounds,
    /// and send them in order after reconnecting; beyond the bounds a
    /// publish fails with [`Error::BufferFull`](crate::Error::BufferFull).
    Buffer {
        max_messages: usize,
        max_bytes: usize,
    },
    /// Fail every publish at once with
    /// [`Error::RelayUnavailable`](crate::Error::RelayUnavailable).
    FailFast,
}

impl Default for OfflinePolicy {
    fn default() -> OfflinePolicy {
        OfflinePolicy::Buffer {
            max_messages: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Settings for [`Client::connect_with`](crate::Client::connect_with).
///
/// Every setting has a default suited to a component on the relay's node;
/// the builder methods change one each.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub(crate) url: RelayUrl,
    pub(crate) client_name: String,
    pub(crate) offline_policy: OfflinePolicy,
    pub(crate) reconnect_initial_delay: Duration,
    pub(crate) reconnect_max_delay: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) subscription_capacity: usize,
    pub(crate) max_frame_bytes: u32,
    pub(crate) retry_initial_connect: bool,
    pub(crate) tls_ca: Option<PathBuf>,
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
}

/// Timers below this would spin the connection task.
const MIN_TIMER: Duration = Duration::from_millis(1);

impl ConnectOptions {
    /// Defaults, connecting to `url`.
    pub fn new(url: RelayUrl) -> ConnectOptions {
        ConnectOptions {
            url,
            client_name: default_client_name(),
            offline_policy: OfflinePolicy::default(),
            reconnect_initial_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(2),
            ping_interval: Duration::from_millis(250),
            pong_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            subscription_capacity: 8192,
            max_frame_bytes: holdfast_wire::DEFAULT_MAX_FRAME_BYTES,
            retry_initial_connect: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    /// Defaults, connecting to `HOLDFAST_URL` or the default socket, with
    /// the TLS files named by `HOLDFAST_CA`, `HOLDFAST_CERT` and
    /// `HOLDFAST_KEY` (each ignored when unset or empty).
    pub fn from_env() -> Result<ConnectOptions, UrlError> {
        Ok(ConnectOptions::new(RelayUrl::from_env()?).tls_from(|name| std::env::var_os(name)))
    }

    /// Takes the TLS files from the variables `lookup` finds; apart from
    /// [`ConnectOptions::from_env`] so tests need not touch the process
    /// environment.
    fn tls_from(mut self, lookup: impl Fn(&str) -> Option<OsString>) -> Self {
        let path = |name: &str| {
            lookup(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        self.tls_ca = path(CA_ENV);
        self.tls_cert = path(CERT_ENV);
        self.tls_key = path(KEY_ENV);
        self
    }

    pub fn url(mut self, url: RelayUrl) -> Self {
        self.url = url;
        self
    }

    /// The name the relay shows for this client in logs and `holdfast status`
    /// (default: the executable's file name).
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    pub fn offline_policy(mut self, policy: OfflinePolicy) -> Self {
        self.offline_policy = policy;
        self
    }

    /// Reconnect delays start near `initial` and double up to `cap`
    /// (defaults 50 ms and 2 s), each jittered down by up to half.
    pub fn reconnect_backoff(mut self, initial: Duration, cap: Duration) -> Self {
        self.reconnect_initial_delay = initial;
        self.reconnect_max_delay = cap;
        self
    }

    /// How often the client proves the relay alive with a PING (default 250 ms).
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval.max(MIN_TIMER);
        self
    }

    /// How long a PING may go unanswered before the connection is declared
    /// dead and re-established (default 3 s). Also bounds each connection
    /// attempt: connecting (on QUIC, resolving the host and the QUIC and TLS
    /// handshakes) and the HELLO/WELCOME exchange.
    pub fn pong_timeout(mut self, timeout: Duration) -> Self {
        self.pong_timeout = timeout.max(MIN_TIMER);
        self
    }

    /// The timeout of [`Client::request`](crate::Client::request) and
    /// [`Client::status`](crate::Client::status) (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout.max(MIN_TIMER);
        self
    }

    /// Messages held per subscriber before further ones are dropped and
    /// counted (default 8192).
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity.max(1);
        self
    }

    /// The frame size limit used until the relay's WELCOME states its own
    /// (default [`holdfast_wire::DEFAULT_MAX_FRAME_BYTES`]).
    pub fn max_frame_bytes(mut self, max: u32) -> Self {
        self.max_frame_bytes = max;
        self
    }

    /// With `true`, [`Client::connect_with`](crate::Client::connect_with)
    /// returns a client even when the relay is unreachable, and the client
    /// keeps trying in the background. With `false` (the default) an
    /// unreachable relay is an immediate error.
    pub fn retry_initial_connect(mut self, retry: bool) -> Self {
        self.retry_initial_connect = retry;
        self
    }

    /// The PEM file with the CA certificate(s) that signed the relay's
    /// certificate. Required for `quic://` URLs (the relay's certificate is
    /// checked against it, and against the URL's host); unused for `unix://`.
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// A PEM client certificate (chain) and its PEM private key, presented
    /// to a `quic://` relay that requires mutual TLS. The relay identifies
    /// the client by the certificate's subject common name.
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_cert = Some(cert.into());
        self.tls_key = Some(key.into());
        self
    }

    pub fn get_url(&self) -> &RelayUrl {
        &self.url
    }

    pub fn get_client_name(&self) -> &str {
        &self.client_name
    }

    pub fn get_offline_policy(&self) -> OfflinePolicy {
        self.offline_policy
    }

    pub fn get_ping_interval(&self) -> Duration {
        self.ping_interval
    }

    pub fn get_pong_timeout(&self) -> Duration {
        self.pong_timeout
    }

    pub fn get_request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn get_subscription_capacity(&self) -> usize {
        self.subscription_capacity
    }

    pub fn get_max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    pub fn get_retry_initial_connect(&self) -> bool {
        self.retry_initial_connect
    }

    pub fn get_tls_ca(&self) -> Option<&Path> {
        self.tls_ca.as_deref()
    }

    pub fn get_tls_client_cert(&self) -> Option<&Path> {
        self.tls_cert.as_deref()
    }

    pub fn get_tls_client_key(&self) -> Option<&Path> {
        self.tls_key.as_deref()
    }

    /// A fresh backoff following these settings.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.reconnect_initial_delay, self.reconnect_max_delay)
    }
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions::new(RelayUrl::default())
    }
}

fn default_client_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "holdfast-client".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let options = ConnectOptions::default();
        assert_eq!(
            options.get_offline_policy(),
            OfflinePolicy::Buffer {
                max_messages: 10_000,
                max_bytes: 64 * 1024 * 1024
            }
        );
        assert_eq!(options.get_ping_interval(), Duration::from_millis(250));
        assert_eq!(options.get_pong_timeout(), Duration::from_secs(3));
        assert_eq!(options.get_request_timeout(), Duration::from_secs(5));
        assert_eq!(options.get_subscription_capacity(), 8192);
        assert!(!options.get_retry_initial_connect());
        assert_eq!(options.get_tls_ca(), None);
        assert_eq!(options.get_tls_client_cert(), None);
        assert_eq!(options.get_tls_client_key(), None);
        assert_eq!(options.backoff().initial(), Duration::from_millis(50));
        assert_eq!(options.backoff().cap(), Duration::from_secs(2));
    }

    #[test]
    fn zero_values_that_would_panic_or_spin_are_raised() {
        let options = ConnectOptions::default()
            .ping_interval(Duration::ZERO)
            .pong_timeout(Duration::ZERO)
            .subscription_capacity(0);
        assert_eq!(options.get_ping_interval(), MIN_TIMER);
        assert_eq!(options.get_pong_timeout(), MIN_TIMER);
        assert_eq!(options.get_subscription_capacity(), 1);
    }

    #[test]
    fn tls_files_are_set_by_the_builder() {
        let options = ConnectOptions::default()
            .tls_ca("/etc/holdfast/ca.pem")
            .tls_client_cert("/etc/holdfast/client.pem", "/etc/holdfast/client.key");
        assert_eq!(
            options.get_tls_ca(),
            Some(Path::new("/etc/holdfast/ca.pem"))
        );
        assert_eq!(
            options.get_tls_client_cert(),
            Some(Path::new("/etc/holdfast/client.pem"))
        );
        assert_eq!(
            options.get_tls_client_key(),
            Some(Path::new("/etc/holdfast/client.key"))
        );
    }

    #[test]
    fn tls_files_come_from_the_environment_and_empty_means_unset() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(var, _)| *var == name)
                    .map(|(_, value)| OsString::from(value))
            }
        };
        let options = ConnectOptions::default().tls_from(env(&[
            ("HOLDFAST_CA", "/ca.pem"),
            ("HOLDFAST_CERT", "/client.pem"),
            ("HOLDFAST_KEY", "/client.key"),
        ]));
        assert_eq!(options.get_tls_ca(), Some(Path::new("/ca.pem")));
        assert_eq!(
            options.get_tls_client_cert(),
            Some(Path::new("/client.pem"))
        );
        assert_eq!(options.get_tls_client_key(), Some(Path::new("/client.key")));

        let options = ConnectOptions::default()
            .tls_ca("/set/before.pem")
            .tls_from(env(&[
                ("HOLDFAST_CA", ""),
                ("HOLDFAST_CERT", "/client.pem"),
            ]));
        assert_eq!(options.get_tls_ca(), None);
        assert_eq!(
            options.get_tls_client_cert(),
            Some(Path::new("/client.pem"))
        );
        assert_eq!(options.get_tls_client_key(), None);
    }
}
