//! Test harness: real nats-server, etcd and holdfastd processes on loopback.
//!
//! A thin layer over `holdfast-testkit` (which holdfast-bench shares): it
//! fixes what the tests want (10 s limits, `/readyz` readiness, the relay's
//! test etcd config, `HOLDFAST_TEST_LOG`), turns the kit's errors into panics,
//! prints a process's logs when a test fails while it runs, and adds the
//! async helpers that need tokio, async-nats or etcd-client.
//!
//! Every process is owned by a value whose `Drop` kills it by PID, so a
//! failing test leaves nothing behind.

#![allow(dead_code)]

use holdfast_testkit as kit;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

pub use holdfast_testkit::Process;

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// A free loopback TCP port, never handed out twice in this process, so two
/// tests cannot share one even while one of them has its server stopped.
pub fn free_port() -> u16 {
    kit::free_port().expect("a free loopback port")
}

/// `$env` if set, else the project-local install (`.deps/bin`, where
/// deploy/install-deps.sh puts a current nats-server), else the system's.
pub fn find_binary(name: &str, env: &str) -> PathBuf {
    kit::find_binary(name, env).expect("a program the tests run")
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
    server: kit::NatsServer,
    /// Whether it runs with a config file (TLS, authorization, cluster),
    /// whose effects a failing test wants to see in the log.
    configured: bool,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_from(kit::NatsServer::builder(), false)
    }

    /// With `config` (nats-server's configuration format) in a file passed
    /// with `-c`; the port and loopback address still come from flags.
    pub fn start_configured(config: &str) -> NatsServer {
        NatsServer::start_from(kit::NatsServer::builder().config(config), true)
    }

    /// As [`NatsServer::start_configured`], on a port chosen beforehand
    /// (cluster members name each other's ports).
    pub fn start_configured_on(port: u16, config: &str) -> NatsServer {
        NatsServer::start_from(kit::NatsServer::builder().port(port).config(config), true)
    }

    /// With JetStream on (file store in its temp dir, kept across restarts).
    pub fn start_jetstream() -> NatsServer {
        NatsServer::start_from(kit::NatsServer::builder().jetstream(true), false)
    }

    fn start_from(builder: kit::NatsBuilder, configured: bool) -> NatsServer {
        let server = builder.start_limit(WAIT).start().expect("nats-server");
        NatsServer { server, configured }
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// What the server logged since its last start.
    pub fn logs(&self) -> String {
        self.server.logs()
    }

    /// Starts the process again after [`NatsServer::kill`].
    pub fn start_again(&mut self) {
        self.server
            .start_again()
            .expect("nats-server started again");
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// SIGINT: a graceful stop (the server flushes its JetStream store).
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// SIGSTOP: the TCP connection stays open but nothing answers.
    pub fn pause(&self) {
        self.server.pause();
    }

    pub fn resume(&self) {
        self.server.resume();
    }

    /// Starts a fresh process on the same port.
    pub fn restart(&mut self) {
        self.server.restart().expect("nats-server restarted");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() && self.configured {
            eprintln!(
                "--- nats-server (port {}) logs ---\n{}",
                self.port(),
                self.logs()
            );
        }
    }
}

/// A single-member etcd process with its own data dir.
pub struct EtcdServer {
    server: kit::EtcdServer,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        let server = kit::EtcdServer::builder()
            .member_name("holdfast-test")
            .start_limit(WAIT)
            .start()
            .expect("etcd");
        EtcdServer { server }
    }

    pub fn logs(&self) -> String {
        self.server.logs()
    }

    pub fn url(&self) -> String {
        self.server.url()
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
        self.server.kill();
    }

    /// SIGSTOP: connections stay open but nothing answers.
    pub fn pause(&self) {
        self.server.pause();
    }

    pub fn resume(&self) {
        self.server.resume();
    }

    /// Starts a fresh process on the same ports and data.
    pub fn restart(&mut self) {
        self.server.restart().expect("etcd restarted");
    }

    /// Starts a fresh process on the same ports with its data wiped: an
    /// etcd that came back empty.
    pub fn restart_empty(&mut self) {
        self.server.restart_empty().expect("etcd restarted empty");
    }

    /// Starts the process again after [`EtcdServer::kill`].
    pub fn start_again(&mut self) {
        self.server.start_again().expect("etcd started again");
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- etcd logs ---\n{}", self.logs());
        }
    }
}

/// A holdfastd process on a socket in its own temp dir.
pub struct Relay {
    relay: kit::Relay,
}

/// Config for tests: production defaults except where noted by the caller.
pub const TEST_CONFIG: &str = "";

impl Relay {
    pub fn start(nats_url: &str) -> Relay {
        Relay::start_with_config(nats_url, TEST_CONFIG)
    }

    /// Starts with extra TOML (e.g. "[sessions]\nslow_consumer = \"disconnect\"").
    pub fn start_with_config(nats_url: &str, config_toml: &str) -> Relay {
        Relay::start_from(Relay::builder(nats_url, config_toml))
    }

    /// Starts with extra TOML under an open-file limit of `limit`
    /// descriptors (as `prlimit --nofile=LIMIT:LIMIT holdfastd ...`).
    pub fn start_with_open_file_limit(nats_url: &str, config_toml: &str, limit: u64) -> Relay {
        Relay::start_from(Relay::builder(nats_url, config_toml).open_file_limit(limit))
    }

    /// Starts with extra TOML and its journal in `data_dir` (which the
    /// caller keeps, and removes, itself).
    pub fn start_with_data_dir(nats_url: &str, config_toml: &str, data_dir: &Path) -> Relay {
        Relay::start_from(Relay::builder(nats_url, config_toml).data_dir(data_dir))
    }

    /// Starts with extra TOML and extra environment variables.
    pub fn start_with(nats_url: &str, config_toml: &str, env: &[(&str, &str)]) -> Relay {
        let builder = env.iter().fold(
            Relay::builder(nats_url, config_toml),
            |builder, (key, value)| builder.env(*key, *value),
        );
        Relay::start_from(builder)
    }

    /// The test binary's holdfastd, ready once `/readyz` says so (the
    /// journal is open, the first NATS connect settled, and clients are
    /// being accepted), logging at `$HOLDFAST_TEST_LOG` or `info`.
    fn builder(nats_url: &str, config_toml: &str) -> kit::RelayBuilder {
        let log_filter = std::env::var("HOLDFAST_TEST_LOG").unwrap_or_else(|_| "info".to_string());
        kit::Relay::builder(env!("CARGO_BIN_EXE_holdfastd"), nats_url)
            .config(config_toml)
            .log_filter(log_filter)
            .readiness(kit::Readiness::Readyz)
            .start_limit(WAIT)
            .stop_limit(WAIT)
    }

    fn start_from(builder: kit::RelayBuilder) -> Relay {
        Relay {
            relay: builder.start().expect("holdfastd"),
        }
    }

    /// Everything every run of this relay logged.
    pub fn logs(&self) -> String {
        self.relay.logs()
    }

    pub fn url(&self) -> String {
        self.relay.url()
    }

    pub fn socket(&self) -> &Path {
        self.relay.socket()
    }

    /// The relay's data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.relay.data_dir().to_path_buf()
    }

    /// The status document from `/status`.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.http_get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("the status document is JSON")
    }

    /// GET on the operations endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let response = self.relay.http_get(path).expect("the operations endpoint");
        (response.status, response.body)
    }

    pub fn pid(&self) -> Option<u32> {
        self.relay.pid()
    }

    /// Where `/metrics`, `/livez` and the rest are served.
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        self.relay.metrics_address()
    }

    /// The relay's CPU time so far (user and system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        self.relay.cpu_time().expect("the relay's CPU time")
    }

    /// Bytes the relay has passed to write(2) and its kin so far (files
    /// and sockets alike; /proc's `wchar`).
    pub fn bytes_written(&self) -> u64 {
        self.relay
            .bytes_written()
            .expect("the relay's bytes written")
    }

    /// Sets the running relay's soft open-file limit (the hard one stays).
    pub fn set_open_file_soft_limit(&self, soft: u64) {
        self.relay
            .set_open_file_soft_limit(soft)
            .expect("the relay's open-file limit");
    }

    pub fn kill(&mut self) {
        self.relay.kill();
    }

    /// SIGSTOP: the relay's connections stay open but it does nothing.
    pub fn pause(&self) {
        self.relay.pause();
    }

    pub fn resume(&self) {
        self.relay.resume();
    }

    /// SIGTERM and the exit status, bounded by `WAIT`.
    pub fn terminate(&mut self) -> ExitStatus {
        self.relay.terminate().expect("holdfastd stops on SIGTERM")
    }

    /// Waits, bounded by `WAIT`, for the relay to exit by itself; its status.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        self.relay
            .wait_for_exit(WAIT)
            .expect("holdfastd exits by itself")
    }

    /// Starts the relay again on the same socket (after kill or terminate).
    pub fn restart(&mut self) {
        self.relay.restart().expect("holdfastd restarted");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- holdfastd logs ---\n{}", self.logs());
        }
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
