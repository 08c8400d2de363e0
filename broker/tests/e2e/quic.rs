//! The QUIC transport against real nats-server and etcd: the same flows as
//! on the Unix socket, mutual TLS that refuses strangers, access rules by
//! certificate common name, liveness of a killed QUIC client, and many
//! connections held at once.

use crate::registry::{etcd_value, holdfast_cli, wait_for_value};
use crate::support::{metric, nats_round_trip, scrape, within, EtcdStack, Relay, Stack, WAIT};
use futures::StreamExt;
use holdfast_client::{
    Client, ConnectOptions, ErrorCode, OutboundMessage, RegistrationStatus, RelayUrl,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A development CA with server and client certificates, made by
/// `holdfastd gen-cert` as an operator would.
fn certificates(client_cn: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_holdfastd"))
        .args(["gen-cert", "--out"])
        .arg(dir.path())
        .args(["--client-cn", client_cn])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "gen-cert failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

/// The `[quic]` table: a free loopback port, the server certificate and,
/// for mutual TLS, the client CA.
fn quic_table(certs: &Path, mutual_tls: bool) -> String {
    let mut table = format!(
        "[quic]\naddr = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        certs.join("server.pem").display(),
        certs.join("server.key").display()
    );
    if mutual_tls {
        table.push_str(&format!(
            "client_ca = \"{}\"\n",
            certs.join("ca.pem").display()
        ));
    }
    table
}

/// The relay's QUIC URL, from the address its status reports.
fn quic_url(relay: &Relay) -> String {
    let status = relay.status();
    let address = status["quic"].as_str().expect("the relay listens on QUIC");
    format!("quic://{address}")
}

fn options(url: &str, ca: &Path, client_cert: Option<&Path>) -> ConnectOptions {
    let url: RelayUrl = url.parse().unwrap();
    let options = ConnectOptions::new(url).tls_ca(ca.join("ca.pem"));
    match client_cert {
        Some(dir) => options.tls_client_cert(dir.join("client.pem"), dir.join("client.key")),
        None => options,
    }
}

async fn quic_client(url: &str, certs: &Path) -> Client {
    within(
        "connect over QUIC",
        Client::connect_with(options(url, certs, Some(certs))),
    )
    .await
    .expect("connect over QUIC")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_request_and_register_work_over_quic_with_mutual_tls() {
    let certs = certificates("quic-worker");
    let stack = EtcdStack::start_with_tables("", &quic_table(certs.path(), true));
    let url = quic_url(&stack.relay);
    let client = quic_client(&url, certs.path()).await;
    let direct = async_nats::connect(stack.nats.url()).await.unwrap();

    // Publish through QUIC, received by a plain NATS subscriber.
    let mut direct_sub = direct.subscribe("quic.up").await.unwrap();
    nats_round_trip(&direct).await;
    let ack = client
        .publish_with_ack(OutboundMessage::new("quic.up", "over quic"))
        .await
        .unwrap();
    within("ack over QUIC", ack).await.unwrap();
    let received = within("NATS receives", direct_sub.next()).await.unwrap();
    assert_eq!(&received.payload[..], b"over quic");

    // Subscribe through QUIC to what a plain NATS client publishes.
    let mut subscriber = client.subscribe("quic.down").await.unwrap();
    direct.publish("quic.down", "to quic".into()).await.unwrap();
    direct.flush().await.unwrap();
    let delivered = within("QUIC subscriber receives", subscriber.next())
        .await
        .unwrap();
    assert_eq!(&delivered.payload[..], b"to quic");

    // A request answered by a plain NATS responder.
    let mut service = direct.subscribe("quic.svc").await.unwrap();
    nats_round_trip(&direct).await;
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            let mut answer = b"re: ".to_vec();
            answer.extend_from_slice(&request.payload);
            let _ = direct.publish(request.reply.unwrap(), answer.into()).await;
            let _ = direct.flush().await;
        }
    });
    let reply = within("request over QUIC", client.request("quic.svc", "ping"))
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"re: ping");

    // A registration lands in etcd and leaves when the client closes.
    let key = format!("v1/instances/quic/{:x}", client.instance_id());
    let status = client.register(key.clone(), "quic-endpoint").await.unwrap();
    assert_eq!(status, RegistrationStatus::Applied);
    let mut etcd = stack.etcd.client().await;
    assert_eq!(
        etcd_value(&mut etcd, &key).await.map(|(value, _)| value),
        Some("quic-endpoint".to_string())
    );
    let status = client.status().await.unwrap();
    assert_eq!(status["mutual_tls"], true, "{status}");
    client.close().await.unwrap();
    drop(client);
    wait_for_value(&mut etcd, &key, None, Duration::from_secs(2)).await;
    assert!(stack.relay.logs().contains("cn=quic-worker"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let certs = certificates("member");
    let stranger = certificates("stranger");
    let stack = Stack::start_with_config(&quic_table(certs.path(), true));
    let url = quic_url(&stack.relay);

    // No client certificate at all.
    let refused = within(
        "connect without a client certificate",
        Client::connect_with(options(&url, certs.path(), None)),
    )
    .await;
    assert!(refused.is_err(), "connected without a client certificate");
    // A certificate signed by another CA (trusting the relay's CA is not enough).
    let refused = within(
        "connect with a foreign client certificate",
        Client::connect_with(options(&url, certs.path(), None).tls_client_cert(
            stranger.path().join("client.pem"),
            stranger.path().join("client.key"),
        )),
    )
    .await;
    assert!(refused.is_err(), "connected with a foreign certificate");
    // A relay certificate the client does not trust.
    let refused = within(
        "connect to an untrusted relay",
        Client::connect_with(options(&url, stranger.path(), Some(certs.path()))),
    )
    .await;
    let error = refused.expect_err("an untrusted relay is refused");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );

    // A member still gets in, and the refusals were counted.
    let member = quic_client(&url, certs.path()).await;
    member.flush().await.unwrap();
    let metrics = scrape(&stack.relay);
    let failures = metric(&metrics, "holdfast_quic_handshake_failures_total", &[]).unwrap();
    assert!(failures >= 2.0, "handshake failures counted: {failures}");
    let status = member.status().await.unwrap();
    assert_eq!(status["sessions"], 1, "only the member has a session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_follow_the_client_certificate_common_name() {
    let certs = certificates("decode-worker");
    let config = format!(
        "{}\n[access]\ndefault = \"deny\"\n[[access.rule]]\ncert_cn = \"decode-worker\"\n\
         publish = [\"decode.>\"]\nsubscribe = [\"decode.>\"]\n",
        quic_table(certs.path(), true)
    );
    let stack = Stack::start_with_config(&config);
    let client = quic_client(&quic_url(&stack.relay), certs.path()).await;
    let ack = client
        .publish_with_ack(OutboundMessage::new("decode.tokens", "ok"))
        .await
        .unwrap();
    within("allowed publish", ack).await.unwrap();
    let ack = client
        .publish_with_ack(OutboundMessage::new("prefill.tokens", "no"))
        .await
        .unwrap();
    let error = within("denied publish", ack).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}");
    assert!(error.to_string().contains("cn=decode-worker"), "{error}");
    // The Unix socket peer (this process's uid) matches no rule: denied.
    let local = stack.client().await;
    let ack = local
        .publish_with_ack(OutboundMessage::new("decode.tokens", "no"))
        .await
        .unwrap();
    let error = within("unix peer denied", ack).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_quic_client_loses_its_registrations_within_the_liveness_timeout() {
    let certs = certificates("registrant");
    let stack = EtcdStack::start_with_tables("", &quic_table(certs.path(), true));
    let url = quic_url(&stack.relay);
    let mut etcd = stack.etcd.client().await;
    let mut registrant = Command::new(holdfast_cli())
        .env("HOLDFAST_URL", &url)
        .env("HOLDFAST_CA", certs.path().join("ca.pem"))
        .env("HOLDFAST_CERT", certs.path().join("client.pem"))
        .env("HOLDFAST_KEY", certs.path().join("client.key"))
        .args(["register", "v1/instances/quic-killed", "alive"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_value(&mut etcd, "v1/instances/quic-killed", Some("alive"), WAIT).await;
    registrant.kill().unwrap();
    let killed = Instant::now();
    let _ = registrant.wait();
    // No CONNECTION_CLOSE comes from a killed process: the relay's liveness
    // timeout (1 s) has to notice the silence.
    wait_for_value(
        &mut etcd,
        "v1/instances/quic-killed",
        None,
        Duration::from_secs(3),
    )
    .await;
    eprintln!(
        "killed QUIC client's key removed after {:?}",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_per_transport_are_held_open() {
    const CONNECTIONS: usize = 1000;
    let certs = certificates("many");
    let stack = Stack::start_with_config(&quic_table(certs.path(), true));
    let url = quic_url(&stack.relay);
    let unix_url = stack.relay.url();
    let connect_all = |quic: bool| {
        let url = url.clone();
        let unix_url = unix_url.clone();
        let certs: PathBuf = certs.path().to_path_buf();
        async move {
            let mut clients = Vec::with_capacity(CONNECTIONS);
            // Ten at a time keeps the handshakes from all landing in one instant.
            for batch in 0..CONNECTIONS / 10 {
                let mut pending = Vec::new();
                for index in 0..10 {
                    let options = if quic {
                        options(&url, &certs, Some(&certs))
                    } else {
                        ConnectOptions::new(unix_url.parse().unwrap())
                    };
                    let name = format!("many-{}", batch * 10 + index);
                    // What is measured is holding the connections, not how
                    // fast a debug build does TLS beside other tests: the
                    // handshake (bounded by the pong timeout) gets room.
                    let options = options
                        .client_name(name)
                        .pong_timeout(Duration::from_secs(15));
                    pending.push(Client::connect_with(options));
                }
                for connected in futures::future::join_all(pending).await {
                    clients.push(connected.expect("every connection is accepted"));
                }
            }
            clients
        }
    };
    let quic_clients = tokio::time::timeout(Duration::from_secs(120), connect_all(true))
        .await
        .expect("1000 QUIC connections within 2 minutes");
    let unix_clients = tokio::time::timeout(Duration::from_secs(120), connect_all(false))
        .await
        .expect("1000 Unix connections within 2 minutes");
    let all_connected = Instant::now();
    let observer = stack.client().await;
    let status = observer.status().await.unwrap();
    assert_eq!(
        status["sessions"].as_u64(),
        Some(2 * CONNECTIONS as u64 + 1),
        "{status}"
    );
    // Held open for several ping rounds (every 250 ms), every one of them
    // still works: the first connections have been held open for as long
    // as the others took to connect, the last ones for four rounds. Only
    // the time shows the rounds going by.
    tokio::time::sleep_until((all_connected + Duration::from_secs(1)).into()).await;
    let mut checks = Vec::new();
    for client in quic_clients.iter().chain(unix_clients.iter()) {
        checks.push(client.flush());
    }
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(checks))
        .await
        .expect("2000 flushes answered");
    let failed = results.iter().filter(|result| result.is_err()).count();
    assert_eq!(failed, 0, "flushes failed on {failed} connections");
    assert!(quic_clients.iter().all(Client::is_connected));
    assert!(unix_clients.iter().all(Client::is_connected));
    let metrics = scrape(&stack.relay);
    assert_eq!(
        metric(
            &metrics,
            "holdfast_limit_rejections_total",
            &[("limit", "connections")]
        ),
        Some(0.0)
    );
}

/// A bare QUIC connection to the relay that completes the handshake and
/// keeps itself alive with QUIC pings, but never opens a stream.
async fn idle_quic_connection(
    endpoint: &quinn::Endpoint,
    address: std::net::SocketAddr,
) -> quinn::Connection {
    within(
        "a QUIC handshake",
        endpoint.connect(address, "localhost").unwrap(),
    )
    .await
    .expect("the relay completes the handshake")
}

fn quic_client_endpoint(ca: &Path) -> quinn::Endpoint {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pki_types::CertificateDer::pem_file_iter(ca.join("ca.pem")).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"holdfast/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(200)));
    config.transport_config(std::sync::Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_that_never_open_a_session_give_their_slot_back() {
    const SLOTS: usize = 10;
    let certs = certificates("idle");
    let stack = Stack::start_with_config(&format!(
        "[sessions]\nmax_connections = {SLOTS}\nhello_timeout = \"3s\"\n{}",
        quic_table(certs.path(), false)
    ));
    let address: std::net::SocketAddr = stack.relay.status()["quic"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let endpoint = quic_client_endpoint(certs.path());
    let mut idle = Vec::new();
    for _ in 0..SLOTS {
        idle.push(idle_quic_connection(&endpoint, address).await);
    }
    // The relay counts each once its side of the handshake is done.
    crate::support::wait_until("every idle connection in the gauge", || {
        metric(
            &scrape(&stack.relay),
            "holdfast_quic_connections",
            &[("state", "without_session")],
        ) == Some(SLOTS as f64)
    });
    // Keepalives do not keep them: each is closed after hello_timeout.
    for connection in &idle {
        let reason = within("the relay closes the idle connection", connection.closed()).await;
        assert!(
            matches!(reason, quinn::ConnectionError::ApplicationClosed(_)),
            "{reason:?}"
        );
    }
    // And the slots are free for clients that use them.
    let client = stack.client().await;
    client.publish("after.idle", "x").await.unwrap();
    client.flush().await.unwrap();
    let metrics = scrape(&stack.relay);
    assert!(
        metric(
            &metrics,
            "holdfast_limit_rejections_total",
            &[("limit", "hello_timeout")]
        ) >= Some(SLOTS as f64),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "holdfast_quic_connections",
            &[("state", "without_session")]
        ),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_large_frames_on_many_quic_streams_stay_within_the_read_budget() {
    const CONNECTIONS: usize = 3;
    const STREAMS: usize = 16;
    const FRAME: usize = 4 * 1024 * 1024;
    let certs = certificates("reader");
    let stack = Stack::start_with_config(&format!(
        "[sessions]\nhello_timeout = \"20s\"\n{}",
        quic_table(certs.path(), false)
    ));
    let address: std::net::SocketAddr = stack.relay.status()["quic"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let before = crate::limits::relay_rss_mib(&stack.relay);
    let endpoint = quic_client_endpoint(certs.path());
    let mut connections = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..CONNECTIONS {
        let connection = idle_quic_connection(&endpoint, address).await;
        for _ in 0..STREAMS {
            let (mut send, _receive) = connection.open_bi().await.unwrap();
            // A frame announced at 4 MiB, all of it sent but its last byte.
            writers.push(tokio::spawn(async move {
                let mut frame = ((FRAME - 4) as u32).to_be_bytes().to_vec();
                frame.resize(FRAME - 1, 0x7f);
                let _ = send.write_all(&frame).await;
                // Held open, unfinished, until the test ends (aborted there).
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(send);
            }));
        }
        connections.push(connection);
    }
    // The relay makes streams wait for room, at least one per connection
    // (each connection's one frame is taken by a stream of its own)...
    crate::waiting::poll_for("streams waiting for room to read", || async {
        let waited = metric(
            &scrape(&stack.relay),
            "holdfast_limit_rejections_total",
            &[("limit", "read_budget")],
        )
        .unwrap_or(0.0);
        (waited >= CONNECTIONS as f64).then_some(())
    })
    .await;
    // ...and the waiting streams' unread data soon fills each connection's
    // QUIC window (2 MiB), after which the clients get nothing more in.
    // Nothing shows the windows full; on loopback they take milliseconds,
    // a second is plenty.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = crate::limits::relay_rss_mib(&stack.relay) - before;
    eprintln!(
        "{CONNECTIONS} connections x {STREAMS} streams of unfinished 4 MiB frames: relay grew {grown:.0} MiB"
    );
    // One frame per connection in the relay's buffers, plus what QUIC may
    // hold unread (2 MiB per connection); 48 frames would be 192 MiB.
    assert!(grown < 40.0, "the relay grew by {grown:.0} MiB");
    // Other clients are served meanwhile.
    let client = stack.client().await;
    client.publish("budget.other", "x").await.unwrap();
    client.flush().await.unwrap();
    let metrics = scrape(&stack.relay);
    assert!(
        metric(
            &metrics,
            "holdfast_limit_rejections_total",
            &[("limit", "read_budget")]
        ) >= Some(1.0),
        "{metrics}"
    );
    for writer in writers {
        writer.abort();
    }
    drop(connections);
}
