//! holdfastd on a Unix socket in its own temp dir, with its operations
//! endpoint on a free loopback port: killed (a crash), terminated, paused,
//! and restarted on the same socket and data dir (its journal stays).
//!
//! The binary is a parameter: the e2e tests run the one Cargo built for
//! them (`CARGO_BIN_EXE_holdfastd`), the bench the one beside itself.

use crate::error::{io, Error, Result};
use crate::http::{http_get, HttpResponse};
use crate::limits::start_with_open_file_limit;
use crate::logs;
use crate::ports::free_port;
use crate::process::{Process, Signal, Stopped};
use crate::startup::{bring_up, Launch, Policy};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Default for how long holdfastd may take to become ready (a restart that
/// opens a big journal included).
const START_LIMIT: Duration = Duration::from_secs(120);
/// Default for how long a SIGTERM may take before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long one `/readyz` probe may take.
const READYZ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a [`Relay::http_get`] may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// When a starting relay counts as up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `/readyz` answers 200: the journal is open, the first NATS connect
    /// settled, and clients are accepted. What a test wants before acting.
    Readyz,
    /// The socket accepts a connection: the first moment a client can
    /// reach it, which is what the bench times a restart to.
    Socket,
}

impl Readiness {
    /// A socket connect costs microseconds, so it is probed closely enough
    /// to time a restart; an HTTP probe less often.
    fn interval(self) -> Duration {
        match self {
            Readiness::Readyz => Duration::from_millis(20),
            Readiness::Socket => Duration::from_millis(1),
        }
    }
}

/// How to start a [`Relay`]; [`Relay::builder`] makes one.
#[derive(Debug, Clone)]
pub struct RelayBuilder {
    binary: PathBuf,
    nats_url: String,
    config: String,
    env: Vec<(String, String)>,
    open_file_limit: Option<u64>,
    data_dir: Option<PathBuf>,
    log_filter: String,
    readiness: Readiness,
    start_limit: Duration,
    stop_limit: Duration,
}

impl RelayBuilder {
    /// The config file's contents (TOML); empty means the defaults.
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = toml.into();
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// RLIMIT_NOFILE, soft and hard, the process starts with (as
    /// `prlimit --nofile=LIMIT:LIMIT holdfastd ...`).
    pub fn open_file_limit(mut self, limit: u64) -> Self {
        self.open_file_limit = Some(limit);
        self
    }

    /// The journal's dir (e.g. on a small tmpfs), which the caller keeps
    /// and removes; else `data` in the relay's temp dir.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// `RUST_LOG` of the process (set after [`RelayBuilder::env`], so it
    /// wins); `info` unless set.
    pub fn log_filter(mut self, filter: impl Into<String>) -> Self {
        self.log_filter = filter.into();
        self
    }

    /// When a start counts as done; [`Readiness::Readyz`] unless set.
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// How long the relay may take to become ready.
    pub fn start_limit(mut self, limit: Duration) -> Self {
        self.start_limit = limit;
        self
    }

    /// How long [`Relay::terminate`] waits before SIGKILL.
    pub fn stop_limit(mut self, limit: Duration) -> Self {
        self.stop_limit = limit;
        self
    }

    /// Writes the config, starts holdfastd and returns once it is ready.
    pub fn start(self) -> Result<Relay> {
        let dir = tempfile::tempdir().map_err(io("creating holdfastd's temp dir"))?;
        let socket = dir.path().join("holdfast.sock");
        let config = dir.path().join("holdfast.toml");
        std::fs::write(&config, &self.config).map_err(io("writing holdfastd's config"))?;
        let data_dir = self.data_dir.unwrap_or_else(|| dir.path().join("data"));
        let mut relay = Relay {
            process: Process::default(),
            binary: self.binary,
            dir,
            socket,
            config,
            data_dir,
            nats_url: self.nats_url,
            metrics_port: free_port()?,
            env: self.env,
            open_file_limit: self.open_file_limit,
            log_filter: self.log_filter,
            readiness: self.readiness,
            start_limit: self.start_limit,
            stop_limit: self.stop_limit,
            starts: 0,
        };
        relay.restart()?;
        Ok(relay)
    }
}

/// A holdfastd process, killed by PID when dropped.
#[derive(Debug)]
pub struct Relay {
    // First, so the process dies before its temp dir is removed.
    process: Process,
    binary: PathBuf,
    dir: TempDir,
    socket: PathBuf,
    config: PathBuf,
    data_dir: PathBuf,
    nats_url: String,
    metrics_port: u16,
    env: Vec<(String, String)>,
    open_file_limit: Option<u64>,
    log_filter: String,
    readiness: Readiness,
    start_limit: Duration,
    stop_limit: Duration,
    starts: u32,
}

impl Relay {
    /// A relay of `binary` in front of the NATS server at `nats_url`.
    pub fn builder(binary: impl Into<PathBuf>, nats_url: &str) -> RelayBuilder {
        RelayBuilder {
            binary: binary.into(),
            nats_url: nats_url.to_string(),
            config: String::new(),
            env: Vec::new(),
            open_file_limit: None,
            data_dir: None,
            log_filter: "info".to_string(),
            readiness: Readiness::Readyz,
            start_limit: START_LIMIT,
            stop_limit: STOP_LIMIT,
        }
    }

    /// `unix://` URL of its socket.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The journal's dir (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where `/metrics`, `/readyz`, `/status` and the rest are served.
    pub fn metrics_address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    fn running_pid(&self) -> Result<u32> {
        self.pid().ok_or_else(|| Error::NotRunning {
            binary: self.binary.display().to_string(),
        })
    }

    /// Everything every start of this relay logged, oldest first.
    pub fn logs(&self) -> String {
        logs::read_all(self.dir.path(), "holdfastd", self.starts)
    }

    /// The end of the current start's log.
    pub fn log_tail(&self) -> String {
        logs::tail(&self.log_path(), logs::TAIL_BYTES)
    }

    fn log_path(&self) -> PathBuf {
        logs::numbered(self.dir.path(), "holdfastd", self.starts)
    }

    /// GET `path` on the operations endpoint.
    pub fn http_get(&self, path: &str) -> Result<HttpResponse> {
        http_get(self.metrics_address(), path, HTTP_TIMEOUT)
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        crate::proc_stats::rss_kib(self.running_pid()?)
    }

    /// The most resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        crate::proc_stats::peak_rss_kib(self.running_pid()?)
    }

    /// CPU time (user + system, every thread) so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        crate::proc_stats::cpu_seconds(self.running_pid()?)
    }

    /// As [`Relay::cpu_seconds`], as a `Duration`.
    pub fn cpu_time(&self) -> Result<Duration> {
        crate::proc_stats::cpu_time(self.running_pid()?)
    }

    /// Bytes passed to write(2) and its kin so far, files and sockets.
    pub fn bytes_written(&self) -> Result<u64> {
        crate::proc_stats::bytes_written(self.running_pid()?)
    }

    /// Lowers (or raises, up to the hard limit) the running relay's soft
    /// open-file limit.
    pub fn set_open_file_soft_limit(&self, soft: u64) -> Result<()> {
        crate::limits::set_open_file_soft_limit(self.running_pid()?, soft)
    }

    /// SIGKILL: a crash (the journal must carry everything acknowledged).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: its connections stay open but it does nothing.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// SIGCONT after [`Relay::pause`].
    pub fn resume(&self) {
        self.process.resume();
    }

    /// SIGTERM and the exit status; a relay that outlives the stop limit is
    /// killed and that is an error.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        match self.process.stop(Signal::Terminate, self.stop_limit) {
            Stopped::Exited(status) => Ok(status),
            Stopped::Killed => Err(Error::DidNotStop {
                binary: self.binary.display().to_string(),
                address: self.socket.display().to_string(),
                signal: Signal::Terminate.name(),
                limit: self.stop_limit,
                log_tail: self.log_tail(),
            }),
            Stopped::NotRunning => Err(Error::NotRunning {
                binary: self.binary.display().to_string(),
            }),
        }
    }

    /// Waits up to `limit` for the relay to exit by itself; its status.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        if self.pid().is_none() {
            return Err(Error::NotRunning {
                binary: self.binary.display().to_string(),
            });
        }
        self.process
            .wait_for_exit(limit)
            .ok_or_else(|| Error::DidNotExit {
                binary: self.binary.display().to_string(),
                address: self.socket.display().to_string(),
                limit,
                log_tail: self.log_tail(),
            })
    }

    /// Starts the relay again on the same socket and data dir (killing the
    /// running one, if any); returns once it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let policy = Policy {
            limit: self.start_limit,
            interval: self.readiness.interval(),
            respawn_on_exit: false,
        };
        bring_up(self, policy)
    }
}

impl Launch for Relay {
    fn binary_name(&self) -> String {
        self.binary.display().to_string()
    }

    fn listen_address(&self) -> String {
        format!(
            "{} (operations on {})",
            self.socket.display(),
            self.metrics_address()
        )
    }

    fn spawn_once(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).map_err(io("creating holdfastd's log"))?;
        let mut command = Command::new(&self.binary);
        if let Some(limit) = self.open_file_limit {
            start_with_open_file_limit(&mut command, limit);
        }
        command
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--nats")
            .arg(&self.nats_url)
            .arg("--metrics-addr")
            .arg(self.metrics_address().to_string())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.process.spawn(&mut command)
    }

    fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    fn probe(&mut self) -> bool {
        match self.readiness {
            Readiness::Readyz => http_get(self.metrics_address(), "/readyz", READYZ_TIMEOUT)
                .is_ok_and(|response| response.status == 200),
            Readiness::Socket => std::os::unix::net::UnixStream::connect(&self.socket).is_ok(),
        }
    }

    fn current_log_tail(&self) -> String {
        logs::tail(&self.log_path(), logs::TAIL_BYTES)
    }
}
