//! A single-member etcd on free loopback client and peer ports, with its
//! data and logs in a temp dir: killed, paused, and restarted on the same
//! ports with its data or wiped.

use crate::binaries::find_etcd;
use crate::error::{io, Result};
use crate::http::http_get;
use crate::logs;
use crate::ports::free_port;
use crate::process::Process;
use crate::startup::{bring_up, Launch, Policy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Default for how long etcd may take to elect itself and serve.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How often a starting etcd is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// How long one probe of `/health` may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default `--name` of the member.
const MEMBER_NAME: &str = "holdfast";

/// How to start an [`EtcdServer`]; [`EtcdServer::builder`] makes one.
#[derive(Debug, Clone)]
pub struct EtcdBuilder {
    binary: Option<PathBuf>,
    member_name: String,
    start_limit: Duration,
}

impl EtcdBuilder {
    /// The program to run, instead of [`find_etcd`]'s.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// The member's `--name` (and its entry in `--initial-cluster`).
    pub fn member_name(mut self, name: impl Into<String>) -> Self {
        self.member_name = name.into();
        self
    }

    /// How long etcd may take to serve, restarts included.
    pub fn start_limit(mut self, limit: Duration) -> Self {
        self.start_limit = limit;
        self
    }

    /// Starts etcd and returns once it reports itself healthy.
    pub fn start(self) -> Result<EtcdServer> {
        let binary = match self.binary {
            Some(binary) => binary,
            None => find_etcd()?,
        };
        let mut server = EtcdServer {
            process: Process::default(),
            binary,
            member_name: self.member_name,
            client_port: free_port()?,
            peer_port: free_port()?,
            dir: tempfile::tempdir().map_err(io("creating etcd's temp dir"))?,
            start_limit: self.start_limit,
            starts: 0,
        };
        server.start_again()?;
        Ok(server)
    }
}

/// A single-member etcd process, killed by PID when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    // First, so the process dies before its temp dir is removed.
    process: Process,
    binary: PathBuf,
    member_name: String,
    client_port: u16,
    peer_port: u16,
    dir: TempDir,
    start_limit: Duration,
    starts: u32,
}

impl EtcdServer {
    /// etcd with the default member name and start limit.
    pub fn start() -> Result<EtcdServer> {
        EtcdServer::builder().start()
    }

    pub fn builder() -> EtcdBuilder {
        EtcdBuilder {
            binary: None,
            member_name: MEMBER_NAME.to_string(),
            start_limit: START_LIMIT,
        }
    }

    /// Client URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `127.0.0.1:PORT` of the client URL.
    pub fn client_address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The member's data dir (kept across [`EtcdServer::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Everything every start of this etcd logged, oldest first.
    pub fn logs(&self) -> String {
        logs::read_all(self.dir.path(), "etcd", self.starts)
    }

    fn log_path(&self) -> PathBuf {
        logs::numbered(self.dir.path(), "etcd", self.starts)
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: clients' connections stay open but nothing answers.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// SIGCONT after [`EtcdServer::pause`].
    pub fn resume(&self) {
        self.process.resume();
    }

    /// A fresh process on the same ports and data (an etcd that crashed
    /// and came back with everything it had committed).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start_again()
    }

    /// A fresh process on the same ports with its data wiped (an etcd that
    /// came back empty).
    pub fn restart_empty(&mut self) -> Result<()> {
        self.kill();
        match std::fs::remove_dir_all(self.data_dir()) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io("wiping etcd's data dir")(error)),
        }
        self.start_again()
    }

    /// Starts the process again after [`EtcdServer::kill`]; returns once
    /// it reports itself healthy.
    pub fn start_again(&mut self) -> Result<()> {
        let policy = Policy {
            limit: self.start_limit,
            interval: PROBE_INTERVAL,
            respawn_on_exit: true,
        };
        bring_up(self, policy)
    }
}

impl Launch for EtcdServer {
    fn binary_name(&self) -> String {
        self.binary.display().to_string()
    }

    fn listen_address(&self) -> String {
        self.url()
    }

    fn spawn_once(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).map_err(io("creating etcd's log"))?;
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .args(["--name", &self.member_name])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args([
                "--initial-cluster",
                &format!("{}={peer_url}", self.member_name),
            ])
            // A single member elects itself after one election timeout.
            .args(["--heartbeat-interval", "25", "--election-timeout", "250"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.process.spawn(&mut command)
    }

    fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Ready once `/health` says so: etcd answers it only with a leader
    /// and after a read through raft, which is what a client needs.
    fn probe(&mut self) -> bool {
        http_get(self.client_address(), "/health", PROBE_TIMEOUT).is_ok_and(|response| {
            response.status == 200 && response.body.contains(r#""health":"true""#)
        })
    }

    fn current_log_tail(&self) -> String {
        logs::tail(&self.log_path(), logs::TAIL_BYTES)
    }
}
