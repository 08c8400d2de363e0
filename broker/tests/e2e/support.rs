//! Test harness: real nats-server, etcd and holdfastd processes on loopback.
//!
//! Every process is started on a free port or a temp-dir socket, owned by a
//! value whose `Drop` kills it by PID, so a failing test leaves nothing
//! behind. NATS can be killed (SIGKILL), paused (SIGSTOP), resumed and
//! restarted on the same port; the relay can be killed, terminated and
//! restarted on the same socket.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// Ports handed out by [`free_port`] in this test process.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Where [`free_port`] looks: below Linux's ephemeral range (32768 on), so
/// no outgoing connection's local port can take a server's port while the
/// server is down for a restart on it.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free loopback TCP port, never handed out twice in this process, so two
/// tests cannot share one even while one of them has its server stopped.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for attempt in 0..span {
        // 7919 is prime to the span, so the walk visits every port once.
        let offset = (seed.wrapping_add(attempt.wrapping_mul(7919))) % span;
        let port = TEST_PORTS.start + offset as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {TEST_PORTS:?}");
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A child process a test started: signalled by its PID, and reaped by
/// `kill`/`interrupt` so a PID is never signalled after it could be reused.
#[derive(Default)]
pub struct Process(Option<Child>);

impl Process {
    pub fn started(&mut self, child: Child) {
        self.0 = Some(child);
    }

    /// The exit status, if the process already exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.0
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    fn take(&mut self) -> Option<Child> {
        self.0.take()
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.end_with(libc::SIGKILL);
    }

    /// SIGINT, and wait until the process is gone.
    pub fn interrupt(&mut self) {
        self.end_with(libc::SIGINT);
    }

    fn end_with(&mut self, signal_number: libc::c_int) {
        if let Some(mut child) = self.0.take() {
            signal(&child, signal_number);
            let _ = child.wait();
        }
    }

    /// SIGSTOP: its connections stay open but it does nothing.
    pub fn pause(&self) {
        if let Some(child) = &self.0 {
            signal(child, libc::SIGSTOP);
        }
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&self) {
        if let Some(child) = &self.0 {
            signal(child, libc::SIGCONT);
        }
    }
}

/// `$env` if set, else the project-local install (`.deps/bin`, where
/// deploy/install-deps.sh puts a current nats-server), else the system's.
pub fn find_binary(name: &str, env: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    let project_local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/bin");
    for dir in [
        project_local.as_path(),
        Path::new("/usr/sbin"),
        Path::new("/usr/bin"),
        Path::new("/usr/local/bin"),
    ] {
        let candidate = Path::new(dir).join(name);
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("{name} not found: install it (deploy/test.sh does) or set {env}");
}

/// Polls `ready` every 20 ms until it is true or `WAIT` passes.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A nats-server process.
pub struct NatsServer {
    port: u16,
    dir: TempDir,
    jetstream: bool,
    /// Extra nats-server configuration (TLS, authorization, cluster).
    config: Option<String>,
    process: Process,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with(false)
    }

    /// With `config` (nats-server's configuration format) in a file passed
    /// with `-c`; the port and loopback address still come from flags.
    pub fn start_configured(config: &str) -> NatsServer {
        NatsServer::start_configured_on(free_port(), config)
    }

    /// As [`NatsServer::start_configured`], on a port chosen beforehand
    /// (cluster members name each other's ports).
    pub fn start_configured_on(port: u16, config: &str) -> NatsServer {
        let mut server = NatsServer {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            jetstream: false,
            config: Some(config.to_string()),
            process: Process::default(),
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the server logged since its last start.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Starts the process again after [`NatsServer::kill`].
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// With JetStream on (file store in its temp dir, kept across restarts).
    pub fn start_jetstream() -> NatsServer {
        NatsServer::start_with(true)
    }

    fn start_with(jetstream: bool) -> NatsServer {
        let mut server = NatsServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            jetstream,
            config: None,
            process: Process::default(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let binary = find_binary("nats-server", "HOLDFAST_NATS_SERVER");
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("log file");
        let mut command = Command::new(binary);
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--store_dir")
            .arg(self.dir.path());
        if self.jetstream {
            command.arg("-js");
        }
        if let Some(config) = &self.config {
            let path = self.dir.path().join("nats.conf");
            std::fs::write(&path, config).expect("write nats-server config");
            command.arg("-c").arg(path);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.process.started(child);
        let address = format!("127.0.0.1:{}", self.port);
        // The port may still be held by the previous process for a moment
        // after a restart; a server that exited is started again.
        let deadline = Instant::now() + WAIT;
        loop {
            if std::net::TcpStream::connect(&address).is_ok() {
                return;
            }
            if self.process.exited().is_some() {
                assert!(Instant::now() < deadline, "nats-server keeps exiting");
                std::thread::sleep(Duration::from_millis(100));
                return self.spawn();
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGINT: a graceful stop (the server flushes its JetStream store).
    pub fn stop(&mut self) {
        self.process.interrupt();
    }

    /// SIGSTOP: the TCP connection stays open but nothing answers.
    pub fn pause(&self) {
        self.process.pause();
    }

    pub fn resume(&self) {
        self.process.resume();
    }

    /// Starts a fresh process on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() && self.config.is_some() {
            eprintln!(
                "--- nats-server (port {}) logs ---\n{}",
                self.port,
                self.logs()
            );
        }
        // A paused process must run again to die promptly.
        self.process.resume();
        self.kill();
    }
}

/// Whether the etcd at `url` answers a read within a second.
fn answers_a_read(url: &str) -> bool {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    runtime.block_on(async {
        let connect = etcd_client::Client::connect([url], None);
        let Ok(Ok(mut client)) = tokio::time::timeout(Duration::from_millis(500), connect).await
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), client.get("probe", None)).await,
            Ok(Ok(_))
        )
    })
}

/// A single-member etcd process with its own data dir.
pub struct EtcdServer {
    client_port: u16,
    peer_port: u16,
    dir: TempDir,
    process: Process,
    starts: u32,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        let mut server = EtcdServer {
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            process: Process::default(),
            starts: 0,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let binary = find_binary("etcd", "HOLDFAST_ETCD");
        let log = std::fs::File::create(self.dir.path().join(format!("etcd.{}.log", self.starts)))
            .expect("log file");
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(binary)
            .args(["--name", "holdfast-test"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("holdfast-test={peer_url}")])
            // A single member elects itself after one election timeout.
            .args(["--heartbeat-interval", "25", "--election-timeout", "250"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.process.started(child);
        let url = self.url();
        let deadline = Instant::now() + WAIT;
        // Ready once it answers a read (it has a leader). The check runs on
        // its own thread: callers are often inside a tokio runtime.
        loop {
            let probe_url = url.clone();
            let answered = std::thread::spawn(move || answers_a_read(&probe_url))
                .join()
                .unwrap_or(false);
            if answered {
                return;
            }
            if let Some(status) = self.process.exited() {
                panic!("etcd exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not start:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn logs(&self) -> String {
        let mut text = String::new();
        for start in 1..=self.starts {
            let path = self.dir.path().join(format!("etcd.{start}.log"));
            let _ = std::fs::File::open(path).map(|mut file| file.read_to_string(&mut text));
        }
        text
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The `[etcd]` table pointing a relay here, with test-sized intervals
    /// and `extra` keys appended.
    pub fn relay_config(&self, extra: &str) -> String {
        let mut config = format!("[etcd]\nendpoints = [\"{}\"]\n{extra}\n", self.url());
        // A single test member elects itself within 250 ms, so a
        // link_timeout of 1 s rides out nothing real and notices a stopped
        // etcd quickly.
        for (key, value) in [
            ("reconcile_interval", "2s"),
            ("reconnect_delay_max", "1s"),
            ("link_timeout", "1s"),
        ] {
            if !extra.contains(key) {
                config.push_str(&format!("{key} = \"{value}\"\n"));
            }
        }
        config
    }

    /// A plain etcd-client, as any other component of the fleet would use.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None)
            .await
            .expect("connect to etcd")
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: connections stay open but nothing answers.
    pub fn pause(&self) {
        self.process.pause();
    }

    pub fn resume(&self) {
        self.process.resume();
    }

    /// Starts a fresh process on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts a fresh process on the same ports with its data wiped: an
    /// etcd that came back empty.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.data_dir());
        self.spawn();
    }

    /// Starts the process again after [`EtcdServer::kill`].
    pub fn start_again(&mut self) {
        self.spawn();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- etcd logs ---\n{}", self.logs());
        }
        // A paused process must run again to die promptly.
        self.process.resume();
        self.kill();
    }
}

/// A holdfastd process on a socket in its own temp dir.
pub struct Relay {
    dir: TempDir,
    socket: PathBuf,
    config: PathBuf,
    nats_url: String,
    metrics_port: u16,
    env: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft and hard) the process is started with.
    open_file_limit: Option<u64>,
    process: Process,
    starts: u32,
    /// A data dir elsewhere (e.g. on a small tmpfs), else `<dir>/data`.
    data_dir: Option<PathBuf>,
}

/// Config for tests: production defaults except where noted by the caller.
pub const TEST_CONFIG: &str = "";

impl Relay {
    pub fn start(nats_url: &str) -> Relay {
        Relay::start_with_config(nats_url, TEST_CONFIG)
    }

    /// Starts with extra TOML (e.g. "[sessions]\nslow_consumer = \"disconnect\"").
    pub fn start_with_config(nats_url: &str, config_toml: &str) -> Relay {
        Relay::start_with(nats_url, config_toml, &[])
    }

    /// Starts with extra TOML under an open-file limit of `limit`
    /// descriptors (as `prlimit --nofile=LIMIT:LIMIT holdfastd ...`).
    pub fn start_with_open_file_limit(nats_url: &str, config_toml: &str, limit: u64) -> Relay {
        Relay::start_configured(nats_url, config_toml, &[], Some(limit), None)
    }

    /// Starts with extra TOML and its journal in `data_dir` (which the
    /// caller keeps, and removes, itself).
    pub fn start_with_data_dir(nats_url: &str, config_toml: &str, data_dir: &Path) -> Relay {
        Relay::start_configured(
            nats_url,
            config_toml,
            &[],
            None,
            Some(data_dir.to_path_buf()),
        )
    }

    /// Starts with extra TOML and extra environment variables.
    pub fn start_with(nats_url: &str, config_toml: &str, env: &[(&str, &str)]) -> Relay {
        Relay::start_configured(nats_url, config_toml, env, None, None)
    }

    fn start_configured(
        nats_url: &str,
        config_toml: &str,
        env: &[(&str, &str)],
        open_file_limit: Option<u64>,
        data_dir: Option<PathBuf>,
    ) -> Relay {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("holdfast.sock");
        let config = dir.path().join("holdfast.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let mut relay = Relay {
            dir,
            socket,
            config,
            nats_url: nats_url.to_string(),
            metrics_port: free_port(),
            env: env
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            open_file_limit,
            process: Process::default(),
            starts: 0,
            data_dir,
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log_path = self.log_path(self.starts);
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_holdfastd"));
        if let Some(limit) = self.open_file_limit {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: runs in the child between fork and exec, and calls
            // only setrlimit, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
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
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .env(
                "RUST_LOG",
                std::env::var("HOLDFAST_TEST_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start holdfastd");
        self.process.started(child);
        let deadline = Instant::now() + WAIT;
        // Ready is what /readyz says: the journal is open, the first NATS
        // connect settled, and clients are being accepted.
        while !self.is_ready() {
            if let Some(status) = self.process.exited() {
                panic!("holdfastd exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "holdfastd did not become ready:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("holdfastd.{start}.log"))
    }

    /// Everything every run of this relay logged.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for start in 1..=self.starts {
            let mut text = String::new();
            if let Ok(mut file) = std::fs::File::open(self.log_path(start)) {
                let _ = file.read_to_string(&mut text);
            }
            all.push_str(&text);
        }
        all
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The relay's data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    fn is_ready(&self) -> bool {
        use std::io::Write;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.1 200")
    }

    /// The status document from `/status`.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.http_get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("the status document is JSON")
    }

    /// GET on the operations endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .expect("connect to the metrics endpoint");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// Where `/metrics`, `/livez` and the rest are served.
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    /// The relay's CPU time so far (user and system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let pid = self.pid().expect("relay is running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th of the line, counted in clock ticks.
        let after_name = stat.rsplit_once(')').expect("stat has a name").1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / per_second)
    }

    /// Bytes the relay has passed to write(2) and its kin so far (files
    /// and sockets alike; /proc's `wchar`).
    pub fn bytes_written(&self) -> u64 {
        let pid = self.pid().expect("relay is running");
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read io");
        io.lines()
            .find_map(|line| line.strip_prefix("wchar: "))
            .and_then(|value| value.trim().parse().ok())
            .expect("wchar in /proc/PID/io")
    }

    /// Sets the running relay's soft open-file limit (the hard one stays).
    pub fn set_open_file_soft_limit(&self, soft: u64) {
        let pid = libc::pid_t::try_from(self.pid().expect("relay is running")).expect("pid");
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit on a process we started, with valid pointers.
        let read =
            unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut current) };
        assert_eq!(read, 0, "{}", std::io::Error::last_os_error());
        let wanted = libc::rlimit {
            rlim_cur: soft.min(current.rlim_max),
            rlim_max: current.rlim_max,
        };
        // SAFETY: as above.
        let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &wanted, std::ptr::null_mut()) };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: the relay's connections stay open but it does nothing.
    pub fn pause(&self) {
        self.process.pause();
    }

    pub fn resume(&self) {
        self.process.resume();
    }

    /// SIGTERM and the exit status, bounded by `WAIT`.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.process.take().expect("relay is running");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                signal(&child, libc::SIGKILL);
                let _ = child.wait();
                panic!("holdfastd ignored SIGTERM:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits, bounded by `WAIT`, for the relay to exit by itself; its status.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.process.exited() {
                // Reaped: it must never be signalled again.
                self.process.take();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "holdfastd did not exit by itself:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the relay again on the same socket (after kill or terminate).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- holdfastd logs ---\n{}", self.logs());
        }
        self.kill();
    }
}

/// A relay in front of its own NATS and etcd servers.
pub struct EtcdStack {
    pub etcd: EtcdServer,
    pub nats: NatsServer,
    pub relay: Relay,
}

impl EtcdStack {
    pub fn start() -> EtcdStack {
        EtcdStack::start_with_config("")
    }

    /// `extra` goes into the `[etcd]` table.
    pub fn start_with_config(extra: &str) -> EtcdStack {
        EtcdStack::start_with_tables(extra, "")
    }

    /// `extra` goes into the `[etcd]` table, `tables` (other TOML tables)
    /// after it.
    pub fn start_with_tables(extra: &str, tables: &str) -> EtcdStack {
        let etcd = EtcdServer::start();
        let nats = NatsServer::start();
        let config = format!("{}\n{tables}", etcd.relay_config(extra));
        let relay = Relay::start_with_config(&nats.url(), &config);
        EtcdStack { etcd, nats, relay }
    }

    pub async fn client(&self) -> holdfast_client::Client {
        holdfast_client::Client::connect(&self.relay.url())
            .await
            .expect("connect to holdfastd")
    }
}

/// A relay in front of its own NATS server, plus a plain async-nats client
/// for "the other side".
pub struct Stack {
    pub nats: NatsServer,
    pub relay: Relay,
}

impl Stack {
    pub fn start() -> Stack {
        Stack::start_with_config(TEST_CONFIG)
    }

    pub fn start_with_config(config_toml: &str) -> Stack {
        let nats = NatsServer::start();
        let relay = Relay::start_with_config(&nats.url(), config_toml);
        Stack { nats, relay }
    }

    pub async fn client(&self) -> holdfast_client::Client {
        holdfast_client::Client::connect(&self.relay.url())
            .await
            .expect("connect to holdfastd")
    }

    pub async fn direct_nats(&self) -> async_nats::Client {
        async_nats::connect(self.nats.url())
            .await
            .expect("connect to nats-server")
    }
}

/// Awaits `future` for at most `WAIT`, failing the test with `what`.
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Async twin of [`wait_until`].
pub async fn wait_until_async<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series in Prometheus text, matched by name and labels.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find_map(|(series, value)| {
            let (series_name, label_text) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let found: BTreeMap<&str, &str> = label_text
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key, value.trim_matches('"')))
                .collect();
            (series_name == name && found == wanted).then(|| value.parse().ok())?
        })
}

pub fn scrape(relay: &Relay) -> String {
    let (status, body) = relay.http_get("/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Returns once nats-server has handled everything `client` sent before:
/// async-nats's `flush` only writes its buffer, but a message to itself
/// comes back only after the server processed the ops ahead of it (a SUB
/// just made is then active).
pub async fn nats_round_trip(client: &async_nats::Client) {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.expect("subscribe");
    client.publish(inbox, "".into()).await.expect("publish");
    within("a round trip through nats-server", echo.next()).await;
}
