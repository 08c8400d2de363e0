//! Processes under measurement: nats-server, etcd and holdfastd from
//! `holdfast-testkit` (which the e2e tests share), on free loopback ports,
//! each owned by a guard whose `Drop` kills it by PID — so an error, a
//! panic or Ctrl-C leaves nothing running.
//!
//! What is the bench's own: its limits (a relay restarting on a big
//! journal may take two minutes), holdfastd found beside this executable,
//! a relay that counts as up once its socket accepts (what a restart is
//! timed to) and logs at `warn`, and readings in MiB. The kit blocks while
//! it waits; the waits run in `block_in_place`, so the load a scenario
//! keeps up during an outage runs on while a server restarts.

use crate::error::{failed, BenchError, Context, Result};
use holdfast_testkit as kit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long nats-server may take to accept connections.
const NATS_START_LIMIT: Duration = Duration::from_secs(15);
/// How long etcd may take to elect itself and serve.
const ETCD_START_LIMIT: Duration = Duration::from_secs(30);
/// How long holdfastd may take to accept connections (a restart with a big
/// journal included).
const RELAY_START_LIMIT: Duration = Duration::from_secs(120);
/// How long a graceful stop may take before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// Environment variable naming the holdfastd binary to measure.
pub const HOLDFASTD_ENV: &str = "HOLDFAST_BENCH_HOLDFASTD";

/// Runs one of the kit's blocking calls without stalling this worker's
/// other tasks (every scenario runs on the multi-threaded runtime).
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// holdfastd: `$HOLDFAST_BENCH_HOLDFASTD` if set, else the `holdfastd`
/// beside this executable (both are built into target/release).
pub fn find_holdfastd() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(HOLDFASTD_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating holdfast-bench's own executable")?;
    if let Some(dir) = exe.parent() {
        let candidate = dir.join("holdfastd");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(BenchError::Missing(format!(
        "holdfastd not found beside {} (run `cargo build --release -p holdfast-broker`) \
         and {HOLDFASTD_ENV} is not set",
        exe.display()
    )))
}

/// Development certificates for QUIC with mutual TLS, written into `dir`
/// by `holdfastd gen-cert` (ca.pem, server.pem/.key, client.pem/.key).
pub fn generate_certificates(dir: &Path) -> Result<()> {
    let output = Command::new(find_holdfastd()?)
        .args(["gen-cert", "--out"])
        .arg(dir)
        .output()
        .context("running holdfastd gen-cert")?;
    if !output.status.success() {
        return Err(failed(
            "holdfastd gen-cert",
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    Ok(())
}

/// The nats-server every scenario starts (`$HOLDFAST_NATS_SERVER`, else
/// `.deps/bin`, else the system's) and the version it reports.
#[derive(Debug, Clone)]
pub struct NatsServerBinary {
    pub path: PathBuf,
    /// As `nats-server --version` prints it, e.g. `2.15.1`.
    pub version: String,
}

impl NatsServerBinary {
    /// Finds the binary and asks it for its version.
    pub fn find() -> Result<NatsServerBinary> {
        let path = kit::find_nats_server()?;
        let output = Command::new(&path)
            .arg("--version")
            .output()
            .context(&format!("running {} --version", path.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let version = parse_nats_version(&text).ok_or_else(|| {
            failed(
                &format!("reading the version of {}", path.display()),
                format!("unexpected output {:?}", text.trim()),
            )
        })?;
        Ok(NatsServerBinary { path, version })
    }

    /// Whether JetStream's `sync_interval` exists (nats-server 2.10 on).
    pub fn has_sync_interval(&self) -> bool {
        version_at_least(&self.version, (2, 10))
    }

    /// `nats-server 2.15.1 (/path/to/nats-server)`, for notes and headers;
    /// the path without `..` or links, so it says which install it is.
    pub fn describe(&self) -> String {
        let path = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        format!("nats-server {} ({})", self.version, path.display())
    }
}

/// `2.15.1` from `nats-server: v2.15.1`.
fn parse_nats_version(output: &str) -> Option<String> {
    let version = output.trim().rsplit(' ').next()?.trim_start_matches('v');
    let numeric = version
        .split('.')
        .next()
        .is_some_and(|major| major.parse::<u32>().is_ok());
    numeric.then(|| version.to_string())
}

/// Whether `version` (`MAJOR.MINOR[.PATCH...]`) is at least `minimum`.
fn version_at_least(version: &str, minimum: (u32, u32)) -> bool {
    let mut parts = version.split(['.', '-']).map(|part| part.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= minimum,
        _ => false,
    }
}

/// User + system CPU time of process `pid` so far, in seconds.
pub fn proc_cpu_seconds(pid: u32) -> Result<f64> {
    Ok(kit::proc_stats::cpu_seconds(pid)?)
}

/// A nats-server process.
pub struct NatsServer(kit::NatsServer);

impl NatsServer {
    /// Starts nats-server on a free port; with `jetstream`, a file store in
    /// its temp dir (kept across restarts).
    pub async fn start(jetstream: bool) -> Result<NatsServer> {
        NatsServer::start_with(jetstream, None).await
    }

    /// As [`NatsServer::start`], with `config` (nats-server's config
    /// syntax: leaf nodes, JetStream sync) in a file passed with `-c`.
    pub async fn start_with(jetstream: bool, config: Option<String>) -> Result<NatsServer> {
        let mut builder = kit::NatsServer::builder()
            .jetstream(jetstream)
            .start_limit(NATS_START_LIMIT)
            .stop_limit(STOP_LIMIT);
        if let Some(config) = config {
            builder = builder.config(config);
        }
        Ok(NatsServer(blocking(|| builder.start())?))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    /// CPU time (user + system, every thread) of the running server, in
    /// seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        Ok(self.0.cpu_seconds()?)
    }

    /// SIGKILL: an abrupt outage.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// SIGINT: a graceful stop (the server flushes its JetStream store).
    pub async fn stop(&mut self) {
        blocking(|| self.0.stop());
    }

    /// Starts a fresh process on the same port and store dir.
    pub async fn restart(&mut self) -> Result<()> {
        Ok(blocking(|| self.0.restart())?)
    }
}

/// A single-member etcd process with its own data dir.
pub struct EtcdServer(kit::EtcdServer);

impl EtcdServer {
    /// Starts etcd on free client and peer ports and returns once it is
    /// healthy (it has elected itself leader and serves a read).
    pub async fn start() -> Result<EtcdServer> {
        let builder = kit::EtcdServer::builder()
            .member_name("holdfast-bench")
            .start_limit(ETCD_START_LIMIT);
        Ok(EtcdServer(blocking(|| builder.start())?))
    }

    /// Client URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.0.url()
    }

    /// A plain etcd-client, as any other component of the fleet would use.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        etcd_client::Client::connect([self.url()], None)
            .await
            .context("connecting to etcd")
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Starts a fresh process on the same ports and data dir (an etcd that
    /// crashed and came back with everything it had committed) and returns
    /// once it is healthy.
    pub async fn restart(&mut self) -> Result<()> {
        Ok(blocking(|| self.0.restart())?)
    }

    /// Starts a fresh process on the same ports with its data dir wiped (an
    /// etcd that came back empty) and returns once it is healthy.
    pub async fn restart_empty(&mut self) -> Result<()> {
        Ok(blocking(|| self.0.restart_empty())?)
    }
}

/// A holdfastd process on a socket in its own temp dir.
pub struct Relay(kit::Relay);

impl Relay {
    /// Starts holdfastd against `nats_url` with `config_toml` as its config
    /// file; returns once its socket accepts connections.
    pub async fn start(nats_url: &str, config_toml: &str) -> Result<Relay> {
        let builder = kit::Relay::builder(find_holdfastd()?, nats_url)
            .config(config_toml)
            .log_filter("warn")
            .readiness(kit::Readiness::Socket)
            .start_limit(RELAY_START_LIMIT)
            .stop_limit(STOP_LIMIT);
        Ok(Relay(blocking(|| builder.start())?))
    }

    /// Starts the process again on the same socket and data dir (killing
    /// the running one, if any); returns once its socket accepts.
    pub async fn spawn(&mut self) -> Result<()> {
        Ok(blocking(|| self.0.restart())?)
    }

    /// `unix://` URL of its socket.
    pub fn url(&self) -> String {
        self.0.url()
    }

    /// VmRSS of the running process, in MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        Ok(self.0.rss_kib()? as f64 / 1024.0)
    }

    /// VmHWM (peak RSS) of the running process, in MiB.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        Ok(self.0.peak_rss_kib()? as f64 / 1024.0)
    }

    /// CPU time (user + system, every thread) the running process has used,
    /// in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        Ok(self.0.cpu_seconds()?)
    }

    /// SIGKILL (a crash: the journal must carry everything acknowledged).
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Its `/metrics` text.
    pub fn metrics_text(&self) -> Result<String> {
        Ok(blocking(|| self.0.http_get("/metrics"))?.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nats_server_versions() {
        assert_eq!(
            parse_nats_version("nats-server: v2.15.1\n").as_deref(),
            Some("2.15.1")
        );
        assert_eq!(parse_nats_version("garbage"), None);
        assert!(version_at_least("2.15.1", (2, 10)));
        assert!(version_at_least("2.10.0", (2, 10)));
        assert!(!version_at_least("2.9.10", (2, 10)));
        assert!(version_at_least("3.0.0-beta", (2, 10)));
        assert!(!version_at_least("x.y", (2, 10)));
    }
}
