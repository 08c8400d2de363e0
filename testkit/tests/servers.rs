//! The kit against the real programs: a server it starts serves on
//! loopback, pauses and resumes, comes back on the same port, and is gone
//! (its PID reaped) once its guard drops; a relay that cannot start says
//! why. Needs nats-server and etcd (deploy/install-deps.sh).

use holdfast_testkit::{Error, EtcdServer, NatsServer, Readiness, Relay, TEST_PORTS};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

/// The first line a NATS server sends a new client, if it sends one
/// within `timeout`.
fn greeting(server: &NatsServer, timeout: Duration) -> Option<String> {
    let stream = TcpStream::connect_timeout(&server.address(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}

/// Whether a process with this PID exists (a zombie counts).
fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn nats_serves_on_loopback_and_is_gone_once_dropped() {
    let server = NatsServer::start().unwrap();
    assert!(TEST_PORTS.contains(&server.port()));
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let line = greeting(&server, Duration::from_secs(5)).unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    let pid = server.pid().unwrap();
    assert!(exists(pid));
    let address = server.address();
    drop(server);
    assert!(!exists(pid), "nats-server (PID {pid}) outlived its guard");
    assert!(TcpStream::connect(address).is_err());
}

#[test]
fn nats_runs_with_the_config_it_is_given() {
    let server = NatsServer::builder()
        .config("max_payload: 4096\n")
        .start()
        .unwrap();
    let line = greeting(&server, Duration::from_secs(5)).unwrap();
    assert!(line.contains(r#""max_payload":4096"#), "{line}");
}

#[test]
fn a_paused_nats_accepts_but_answers_only_once_resumed() {
    let server = NatsServer::start().unwrap();
    server.pause();
    assert_eq!(greeting(&server, Duration::from_millis(300)), None);
    server.resume();
    let line = greeting(&server, Duration::from_secs(5)).unwrap();
    assert!(line.starts_with("INFO "), "{line}");
}

#[test]
fn nats_comes_back_on_the_same_port_with_its_jetstream_store() {
    let mut server = NatsServer::builder().jetstream(true).start().unwrap();
    let port = server.port();
    let first = server.pid().unwrap();
    server.kill();
    assert!(!exists(first));
    assert!(greeting(&server, Duration::from_millis(300)).is_none());
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), Some(first));
    assert!(greeting(&server, Duration::from_secs(5)).is_some());
    assert!(server.dir().join("jetstream").is_dir());
    assert!(matches!(
        server.stop(),
        holdfast_testkit::Stopped::Exited(_)
    ));
    assert_eq!(server.pid(), None);
}

#[test]
fn etcd_is_healthy_and_comes_back_empty_or_with_its_data() {
    let mut etcd = EtcdServer::start().unwrap();
    let address = etcd.client_address();
    let health = || holdfast_testkit::http_get(address, "/health", Duration::from_secs(2)).unwrap();
    assert_eq!(health().status, 200);
    etcd.restart().unwrap();
    assert!(etcd.data_dir().is_dir());
    etcd.restart_empty().unwrap();
    assert_eq!(health().status, 200);
    let pid = etcd.pid().unwrap();
    drop(etcd);
    assert!(!exists(pid), "etcd (PID {pid}) outlived its guard");
}

#[test]
fn a_relay_that_exits_at_start_is_an_error_with_its_status() {
    let error = Relay::builder("/bin/false", "nats://127.0.0.1:1")
        .readiness(Readiness::Socket)
        .start_limit(Duration::from_secs(10))
        .start()
        .unwrap_err();
    assert!(matches!(error, Error::Exited { .. }), "{error}");
    assert!(error.to_string().contains("/bin/false"), "{error}");
}

#[test]
fn a_relay_binary_that_does_not_exist_names_itself() {
    let error = Relay::builder("/nonexistent/holdfastd", "nats://127.0.0.1:1")
        .start()
        .unwrap_err();
    assert!(
        error.to_string().contains("/nonexistent/holdfastd"),
        "{error}"
    );
}
