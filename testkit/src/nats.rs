//! A nats-server on a free loopback port, with its store and logs in a
//! temp dir: killed (an abrupt outage), stopped (SIGINT, flushing
//! JetStream), paused, and restarted on the same port and store.

use crate::binaries::find_nats_server;
use crate::error::{io, Result};
use crate::logs;
use crate::ports::free_port;
use crate::process::{Process, Signal, Stopped};
use crate::startup::{bring_up, Launch, Policy};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Default for how long nats-server may take to accept clients.
const START_LIMIT: Duration = Duration::from_secs(15);
/// Default for how long a graceful stop may take before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// How often a starting server is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
/// How long one probe (a connect) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How to start a [`NatsServer`]; [`NatsServer::builder`] makes one.
#[derive(Debug, Clone)]
pub struct NatsBuilder {
    binary: Option<PathBuf>,
    port: Option<u16>,
    jetstream: bool,
    config: Option<String>,
    start_limit: Duration,
    stop_limit: Duration,
}

impl NatsBuilder {
    /// The program to run, instead of [`find_nats_server`]'s.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// A port chosen beforehand (cluster members name each other's ports),
    /// instead of a [`free_port`].
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// JetStream on, its file store in the server's temp dir (kept across
    /// restarts).
    pub fn jetstream(mut self, on: bool) -> Self {
        self.jetstream = on;
        self
    }

    /// nats-server configuration (TLS, authorization, cluster) in a file
    /// passed with `-c`; the port and loopback address still come from
    /// flags, which take precedence.
    pub fn config(mut self, config: impl Into<String>) -> Self {
        self.config = Some(config.into());
        self
    }

    /// How long the server may take to accept clients, restarts included.
    pub fn start_limit(mut self, limit: Duration) -> Self {
        self.start_limit = limit;
        self
    }

    /// How long [`NatsServer::stop`] waits before SIGKILL.
    pub fn stop_limit(mut self, limit: Duration) -> Self {
        self.stop_limit = limit;
        self
    }

    /// Starts the server and returns once it greets a client.
    pub fn start(self) -> Result<NatsServer> {
        let binary = match self.binary {
            Some(binary) => binary,
            None => find_nats_server()?,
        };
        let port = match self.port {
            Some(port) => port,
            None => free_port()?,
        };
        let dir = tempfile::tempdir().map_err(io("creating nats-server's temp dir"))?;
        let config = match &self.config {
            Some(text) => {
                let path = dir.path().join("nats.conf");
                std::fs::write(&path, text).map_err(io("writing nats-server's config"))?;
                Some(path)
            }
            None => None,
        };
        let mut server = NatsServer {
            process: Process::default(),
            binary,
            port,
            dir,
            jetstream: self.jetstream,
            config,
            start_limit: self.start_limit,
            stop_limit: self.stop_limit,
            starts: 0,
        };
        server.start_again()?;
        Ok(server)
    }
}

/// A nats-server process, killed by PID when dropped.
#[derive(Debug)]
pub struct NatsServer {
    // First, so the process dies before its temp dir is removed.
    process: Process,
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    jetstream: bool,
    config: Option<PathBuf>,
    start_limit: Duration,
    stop_limit: Duration,
    starts: u32,
}

impl NatsServer {
    /// Plain nats-server (no JetStream, no config file) on a free port.
    pub fn start() -> Result<NatsServer> {
        NatsServer::builder().start()
    }

    pub fn builder() -> NatsBuilder {
        NatsBuilder {
            binary: None,
            port: None,
            jetstream: false,
            config: None,
            start_limit: START_LIMIT,
            stop_limit: STOP_LIMIT,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The temp dir holding the JetStream store, the config and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// What the server logged since its last start.
    pub fn logs(&self) -> String {
        logs::read(&self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        logs::numbered(self.dir.path(), "nats", self.starts)
    }

    /// CPU time (user + system, every thread) of the running server, in
    /// seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let pid = self.pid().ok_or_else(|| crate::Error::NotRunning {
            binary: self.binary.display().to_string(),
        })?;
        crate::proc_stats::cpu_seconds(pid)
    }

    /// SIGKILL, and wait until the process is gone: an abrupt outage.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGINT, a graceful stop (the server flushes its JetStream store);
    /// SIGKILL if it takes longer than the stop limit.
    pub fn stop(&mut self) -> Stopped {
        self.process.stop(Signal::Interrupt, self.stop_limit)
    }

    /// SIGSTOP: clients' TCP connections stay open but nothing answers.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// SIGCONT after [`NatsServer::pause`].
    pub fn resume(&self) {
        self.process.resume();
    }

    /// A fresh process on the same port and store (killing the running
    /// one, if any).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start_again()
    }

    /// Starts the process again after [`NatsServer::kill`] or
    /// [`NatsServer::stop`]; returns once it greets a client.
    pub fn start_again(&mut self) -> Result<()> {
        let policy = Policy {
            limit: self.start_limit,
            interval: PROBE_INTERVAL,
            respawn_on_exit: true,
        };
        bring_up(self, policy)
    }
}

impl Launch for NatsServer {
    fn binary_name(&self) -> String {
        self.binary.display().to_string()
    }

    fn listen_address(&self) -> String {
        self.address().to_string()
    }

    fn spawn_once(&mut self) -> Result<()> {
        self.starts += 1;
        let log =
            std::fs::File::create(self.log_path()).map_err(io("creating nats-server's log"))?;
        let mut command = Command::new(&self.binary);
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--store_dir")
            .arg(self.dir.path());
        if self.jetstream {
            command.arg("-js");
        }
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.process.spawn(&mut command)
    }

    fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Ready once it accepts a connection: nats-server opens its client
    /// port last, when it can serve. Waiting for its `INFO` line instead
    /// would never end for a server configured with TLS `handshake_first`,
    /// which says nothing before the client's TLS hello.
    fn probe(&mut self) -> bool {
        TcpStream::connect_timeout(&self.address(), PROBE_TIMEOUT).is_ok()
    }

    fn current_log_tail(&self) -> String {
        logs::tail(&self.log_path(), logs::TAIL_BYTES)
    }
}
