//! Processes under measurement: nats-server, etcd and holdfastd on free
//! loopback ports, each with its own temp dir, each owned by a guard whose
//! `Drop` kills it by PID — so an error, a panic or Ctrl-C leaves nothing
//! running.
//!
//! NATS can be killed (SIGKILL), stopped (SIGINT, flushing its JetStream
//! store) and restarted on the same port; etcd can be killed and restarted
//! on the same ports, with its data or empty; the relay can be killed and
//! restarted on the same socket and data dir (its journal stays).

use crate::error::{failed, BenchError, Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long nats-server may take to accept connections.
const NATS_START_LIMIT: Duration = Duration::from_secs(15);
/// How long etcd may take to elect itself and answer a read.
const ETCD_START_LIMIT: Duration = Duration::from_secs(30);
/// How long one readiness probe of etcd (connect, then a read) may take.
const ETCD_PROBE_LIMIT: Duration = Duration::from_millis(500);
/// How long holdfastd may take to accept connections (a restart with a big
/// journal included).
const RELAY_START_LIMIT: Duration = Duration::from_secs(120);
/// How long a graceful stop may take before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// Environment variable naming the holdfastd binary to measure.
pub const HOLDFASTD_ENV: &str = "HOLDFAST_BENCH_HOLDFASTD";
/// Environment variable naming the nats-server binary.
pub const NATS_SERVER_ENV: &str = "HOLDFAST_NATS_SERVER";
/// Environment variable naming the etcd binary.
pub const ETCD_ENV: &str = "HOLDFAST_ETCD";

/// Where [`free_port`] looks: below Linux's ephemeral range (32768 on), so
/// no outgoing connection's local port (the relay's reconnect attempts
/// among them) can take a server's port while the server is down for an
/// outage and restarted on it.
const BENCH_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// Ports handed out by [`free_port`] in this run.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A free TCP port on 127.0.0.1, never handed out twice in one run.
pub fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let span = u64::from(BENCH_PORTS.end - BENCH_PORTS.start);
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for attempt in 0..span {
        // 7919 is prime to the span, so the walk visits every port once.
        let port = BENCH_PORTS.start + ((seed.wrapping_add(attempt * 7919)) % span) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Err(failed(
        "finding a free loopback port",
        format!("none free in {BENCH_PORTS:?}"),
    ))
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

/// nats-server: `$HOLDFAST_NATS_SERVER` if set, else the project-local
/// one, else the usual system paths.
pub fn find_nats_server() -> Result<PathBuf> {
    find_system_binary("nats-server", NATS_SERVER_ENV)
}

/// etcd: `$HOLDFAST_ETCD` if set, else the usual system paths.
pub fn find_etcd() -> Result<PathBuf> {
    find_system_binary("etcd", ETCD_ENV)
}

/// `$env` if set, else `name` in the project-local `.deps/bin` (where
/// deploy/install-deps.sh puts a current nats-server), /usr/sbin, /usr/bin
/// or /usr/local/bin.
fn find_system_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let project_local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/bin");
    for dir in [
        project_local.as_path(),
        Path::new("/usr/sbin"),
        Path::new("/usr/bin"),
        Path::new("/usr/local/bin"),
    ] {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(BenchError::Missing(format!(
        "{name} not found in .deps/bin, /usr/sbin, /usr/bin or /usr/local/bin \
         (deploy/install-deps.sh installs it) and {env} is not set"
    )))
}

fn send_signal(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on a pid this process spawned and has not reaped
        // yet, so it cannot name an unrelated process.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// SIGKILL and reap.
fn kill_child(child: &mut Child) {
    send_signal(child, libc::SIGKILL);
    let _ = child.wait();
}

/// A value read from /proc/PID/status, in KiB (e.g. `VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).context(&format!("reading {path}"))?;
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .ok_or_else(|| failed(&format!("reading {field} from {path}"), "field not found"))
}

/// User + system CPU time of process `pid` so far, in seconds (from
/// /proc/PID/stat, in clock ticks: 10 ms resolution on most kernels).
pub fn proc_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).context(&format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its
    // closing parenthesis start with field 3, so utime (14) and stime (15)
    // are the 12th and 13th of them.
    let after_name = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse().ok())
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match ticks.as_slice() {
        [user, system] if per_second > 0 => Ok((user + system) as f64 / per_second as f64),
        _ => Err(failed(
            &format!("reading the CPU time from {path}"),
            "unexpected format",
        )),
    }
}

/// The last `max_bytes` of a log file, for error messages.
fn log_tail(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(max_bytes)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text
}

/// A nats-server process.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    jetstream: bool,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts nats-server on a free port; with `jetstream`, a file store in
    /// its temp dir (kept across restarts).
    pub async fn start(jetstream: bool) -> Result<NatsServer> {
        let mut server = NatsServer {
            binary: find_nats_server()?,
            port: free_port()?,
            dir: tempfile::tempdir().context("creating nats-server's temp dir")?,
            jetstream,
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<()> {
        let deadline = Instant::now() + NATS_START_LIMIT;
        let address = format!("127.0.0.1:{}", self.port);
        loop {
            let log = std::fs::File::create(self.dir.path().join("nats.log"))
                .context("creating nats-server's log")?;
            let mut command = Command::new(&self.binary);
            command
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
                .arg("--store_dir")
                .arg(self.dir.path());
            if self.jetstream {
                command.arg("-js");
            }
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context(&format!("starting {}", self.binary.display()))?;
            self.child = Some(child);
            // The port may still be held by the previous process for a moment
            // after a restart; a server that exited is started again.
            loop {
                if std::net::TcpStream::connect(&address).is_ok() {
                    return Ok(());
                }
                let exited = match self.child.as_mut() {
                    Some(child) => matches!(child.try_wait(), Ok(Some(_))),
                    None => true,
                };
                if Instant::now() > deadline {
                    self.kill();
                    return Err(BenchError::Timeout(format!(
                        "nats-server to accept on {address}; its log:\n{}",
                        log_tail(&self.dir.path().join("nats.log"), 2000)
                    )));
                }
                if exited {
                    self.child = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// CPU time (user + system, every thread) of the running server, in
    /// seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| failed("reading nats-server's CPU time", "not running"))?;
        proc_cpu_seconds(pid)
    }

    /// SIGKILL: an abrupt outage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// SIGINT: a graceful stop (the server flushes its JetStream store).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, libc::SIGINT);
            let deadline = Instant::now() + STOP_LIMIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            kill_child(&mut child);
        }
    }

    /// Starts a fresh process on the same port and store dir.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single-member etcd process with its own data dir.
pub struct EtcdServer {
    binary: PathBuf,
    client_port: u16,
    peer_port: u16,
    dir: TempDir,
    child: Option<Child>,
    starts: u32,
}

impl EtcdServer {
    /// Starts etcd on free client and peer ports and returns once it answers
    /// a read (it has elected itself leader).
    pub async fn start() -> Result<EtcdServer> {
        let mut server = EtcdServer {
            binary: find_etcd()?,
            client_port: free_port()?,
            peer_port: free_port()?,
            dir: tempfile::tempdir().context("creating etcd's temp dir")?,
            child: None,
            starts: 0,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<()> {
        let deadline = Instant::now() + ETCD_START_LIMIT;
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        loop {
            self.starts += 1;
            let log = std::fs::File::create(self.log_path()).context("creating etcd's log")?;
            let child = Command::new(&self.binary)
                .args(["--name", "holdfast-bench"])
                .arg("--data-dir")
                .arg(self.data_dir())
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("holdfast-bench={peer_url}")])
                // A single member elects itself after one election timeout.
                .args(["--heartbeat-interval", "25", "--election-timeout", "250"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context(&format!("starting {}", self.binary.display()))?;
            self.child = Some(child);
            // Ready once it answers a read. A process that exited (a port
            // still held by its predecessor a moment after a restart) is
            // started again.
            loop {
                if answers_a_read(&client_url).await {
                    return Ok(());
                }
                let exited = match self.child.as_mut() {
                    Some(child) => matches!(child.try_wait(), Ok(Some(_))),
                    None => true,
                };
                if Instant::now() > deadline {
                    self.kill();
                    return Err(BenchError::Timeout(format!(
                        "etcd to answer a read on {client_url}; its log:\n{}",
                        log_tail(&self.log_path(), 2000)
                    )));
                }
                if exited {
                    self.child = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd.{}.log", self.starts))
    }

    /// Client URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A plain etcd-client, as any other component of the fleet would use.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        etcd_client::Client::connect([self.url()], None)
            .await
            .context("connecting to etcd")
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts a fresh process on the same ports and data dir (an etcd that
    /// crashed and came back with everything it had committed) and returns
    /// once it answers a read.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Starts a fresh process on the same ports with its data dir wiped (an
    /// etcd that came back empty) and returns once it answers a read.
    pub async fn restart_empty(&mut self) -> Result<()> {
        self.kill();
        match std::fs::remove_dir_all(self.data_dir()) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(failed("wiping etcd's data dir", error)),
        }
        self.spawn().await
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether etcd at `url` accepts a connection and answers a read, each
/// within [`ETCD_PROBE_LIMIT`].
async fn answers_a_read(url: &str) -> bool {
    let connect = etcd_client::Client::connect([url], None);
    let Ok(Ok(mut client)) = tokio::time::timeout(ETCD_PROBE_LIMIT, connect).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(ETCD_PROBE_LIMIT, client.get("probe", None)).await,
        Ok(Ok(_))
    )
}

/// A holdfastd process on a socket in its own temp dir.
pub struct Relay {
    binary: PathBuf,
    dir: TempDir,
    socket: PathBuf,
    config: PathBuf,
    nats_url: String,
    metrics_port: u16,
    child: Option<Child>,
    starts: u32,
}

impl Relay {
    /// Starts holdfastd against `nats_url` with `config_toml` as its config file.
    pub async fn start(nats_url: &str, config_toml: &str) -> Result<Relay> {
        let dir = tempfile::tempdir().context("creating holdfastd's temp dir")?;
        let socket = dir.path().join("holdfast.sock");
        let config = dir.path().join("holdfast.toml");
        std::fs::write(&config, config_toml).context("writing holdfastd's config")?;
        let mut relay = Relay {
            binary: find_holdfastd()?,
            dir,
            socket,
            config,
            nats_url: nats_url.to_string(),
            metrics_port: free_port()?,
            child: None,
            starts: 0,
        };
        relay.spawn().await?;
        Ok(relay)
    }

    /// Starts the process and returns once its socket accepts connections.
    pub async fn spawn(&mut self) -> Result<()> {
        self.kill();
        self.starts += 1;
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path).context("creating holdfastd's log")?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--nats")
            .arg(&self.nats_url)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context(&format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + RELAY_START_LIMIT;
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(failed(
                    "starting holdfastd",
                    format!("exited with {status}; its log:\n{}", self.log_tail()),
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(BenchError::Timeout(format!(
                    "holdfastd to accept on {}; its log:\n{}",
                    self.socket.display(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("holdfastd.{}.log", self.starts))
    }

    /// The end of the current run's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 4000)
    }

    /// `unix://` URL of its socket.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The journal's directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// VmRSS of the running process, in MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        let pid = self
            .pid()
            .ok_or_else(|| failed("reading holdfastd's RSS", "not running"))?;
        Ok(proc_status_kib(pid, "VmRSS")? as f64 / 1024.0)
    }

    /// VmHWM (peak RSS) of the running process, in MiB.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        let pid = self
            .pid()
            .ok_or_else(|| failed("reading holdfastd's peak RSS", "not running"))?;
        Ok(proc_status_kib(pid, "VmHWM")? as f64 / 1024.0)
    }

    /// CPU time (user + system, every thread) the running process has used,
    /// in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let pid = self
            .pid()
            .ok_or_else(|| failed("reading holdfastd's CPU time", "not running"))?;
        proc_cpu_seconds(pid)
    }

    /// SIGKILL (a crash: the journal must carry everything acknowledged).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss() {
        let rss = proc_status_kib(std::process::id(), "VmRSS").unwrap();
        assert!(rss > 0);
        assert!(proc_status_kib(std::process::id(), "NoSuchField").is_err());
    }

    #[test]
    fn reads_own_cpu_time_as_it_grows() {
        let before = proc_cpu_seconds(std::process::id()).unwrap();
        // Spin until the clock-tick counter moves (bounded: a few ticks).
        let started = Instant::now();
        let mut spins = 0u64;
        while started.elapsed() < Duration::from_millis(200) {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        let after = proc_cpu_seconds(std::process::id()).unwrap();
        assert!(
            after > before,
            "{before} s then {after} s after 200 ms of spinning"
        );
        assert!(proc_cpu_seconds(u32::MAX).is_err());
    }
}
