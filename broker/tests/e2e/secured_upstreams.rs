//! Secured upstreams: NATS with TLS, client certificates and each way to
//! authenticate (user and password, JWT credentials, nkey), and etcd with
//! TLS client certificates or users and passwords. The relay carries
//! traffic to and from plain clients using the same credentials, reports a
//! refusal with the server's reason, recovers when the credential file is
//! fixed, and never shows a secret.

use crate::clusters::{secret_file, Certificates, EtcdCluster};
use crate::nats_jwt::{nkey_config, nkey_user, NatsAuthFixture};
use crate::support::{wait_until, wait_until_async, within, NatsServer, Relay};
use futures::StreamExt;
use holdfast_client::{Client, LinkStatus, RegistrationStatus, WatchEvent};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PASSWORD: &str = "correct-horse-battery";

/// Relays publish and subscribe across the secured server with a plain
/// client `direct` that uses the same credentials.
async fn carries_traffic_both_ways(relay: &Relay, direct: &async_nats::Client) {
    let client = Client::connect(&relay.url()).await.expect("connect");
    wait_until_async("NATS up", || async {
        client.nats_status() == LinkStatus::Up
    })
    .await;
    let mut from_direct = client.subscribe("secure.in").await.unwrap();
    client.flush().await.unwrap();
    let mut from_relay = direct.subscribe("secure.out").await.unwrap();
    crate::support::nats_round_trip(direct).await;
    // The relay's subscription reaches the server asynchronously: publish
    // until it arrives.
    let received = within("a direct publish through the relay", async {
        loop {
            direct
                .publish("secure.in", "to-relay".into())
                .await
                .unwrap();
            direct.flush().await.unwrap();
            if let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_millis(200), from_direct.next()).await
            {
                return message;
            }
        }
    })
    .await;
    assert_eq!(received.payload, "to-relay");
    client.publish("secure.out", "to-direct").await.unwrap();
    let received = within("a relay publish at the direct client", from_relay.next())
        .await
        .unwrap();
    assert_eq!(received.payload, "to-direct");
}

/// No log line and no status output holds `secret`.
fn assert_never_shown(relay: &Relay, secret: &str) {
    assert!(!relay.logs().contains(secret), "the log shows a secret");
    let (_, status) = relay.http_get("/status");
    assert!(!status.contains(secret), "/status shows a secret");
    let (_, metrics) = relay.http_get("/metrics");
    assert!(!metrics.contains(secret), "/metrics shows a secret");
    let output = std::process::Command::new(crate::cli::holdfast())
        .args(["--url", &relay.url(), "status", "--json"])
        .output()
        .expect("run holdfast status");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(!shown.contains(secret), "holdfast status shows a secret");
}

fn nats_tls_config(certificates: &Certificates) -> String {
    format!(
        "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        certificates.ca().display(),
        certificates.client_cert().display(),
        certificates.client_key().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_tls_client_certificates_and_a_password() {
    let certificates = Certificates::generate("relay");
    let server = NatsServer::start_configured(&format!(
        "{}authorization {{ users = [ {{ user: relay, password: \"{PASSWORD}\" }} ] }}\n",
        certificates.nats_tls_block(true)
    ));
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secret_file(secrets.path(), "nats-password", "wrong-password\n");
    let url = format!("tls://127.0.0.1:{}", server.port());
    let relay = Relay::start_with_config(
        &url,
        &format!(
            "[nats]\n{}user = \"relay\"\npassword_file = \"{}\"\n",
            nats_tls_config(&certificates),
            password_file.display()
        ),
    );

    // Refused: the relay stays up, says NATS is down and why.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = relay.status();
        let reason = status["nats"]["last_error"].as_str().unwrap_or_default();
        if reason.to_lowercase().contains("authorization violation") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["nats"]["status"], "down", "{status}");
    assert_eq!(status["nats"]["transport"], "tls", "{status}");
    assert_eq!(status["nats"]["auth"], "user_password", "{status}");
    assert_eq!(relay.http_get("/livez").0, 200);
    assert!(
        relay.logs().contains("cannot connect to NATS"),
        "{}",
        relay.logs()
    );

    // The corrected file is read at the next reconnect.
    secret_file(secrets.path(), "nats-password", &format!("{PASSWORD}\n"));
    wait_until("NATS up with the corrected password", || {
        relay.status()["nats"]["status"] == "up"
    });
    let direct = async_nats::ConnectOptions::with_user_and_password(
        "relay".to_string(),
        PASSWORD.to_string(),
    )
    .add_root_certificates(certificates.ca())
    .add_client_certificate(certificates.client_cert(), certificates.client_key())
    .require_tls(true)
    .connect(url.clone())
    .await
    .expect("a plain client with the same credentials");
    carries_traffic_both_ways(&relay, &direct).await;
    let status = relay.status();
    assert_eq!(
        status["nats"]["last_error"],
        serde_json::Value::Null,
        "{status}"
    );
    assert_never_shown(&relay, PASSWORD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_certificate_from_another_ca_is_refused_with_the_tls_reason() {
    let server_side = Certificates::generate("relay");
    let other = Certificates::generate("relay");
    let server = NatsServer::start_configured(&server_side.nats_tls_block(true));
    let relay = Relay::start_with_config(
        &format!("tls://127.0.0.1:{}", server.port()),
        &format!("[nats]\n{}", nats_tls_config(&other)),
    );
    wait_until("the TLS reason in the status", || {
        let status = relay.status();
        let reason = status["nats"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // rustls's words, e.g. "invalid peer certificate: BadSignature".
        reason.contains("invalid peer certificate")
    });
    assert_eq!(relay.status()["nats"]["status"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_jwt_credentials_and_an_expired_user() {
    let fixture = NatsAuthFixture::generate("relay", None);
    let server = NatsServer::start_configured(&fixture.server_config());
    let secrets = tempfile::tempdir().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (expired_creds, _) = fixture.new_user("relay", Some(now - 60));
    let creds = secret_file(secrets.path(), "relay.creds", &expired_creds);
    let relay = Relay::start_with_config(
        &server.url(),
        &format!("[nats]\ncreds_file = \"{}\"\n", creds.display()),
    );
    wait_until("the expired JWT named in the status", || {
        let status = relay.status();
        let reason = status["nats"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        reason.to_lowercase().contains("authorization violation") && reason.contains("expired")
    });
    assert_eq!(relay.status()["nats"]["auth"], "creds");

    // A renewed credentials file is picked up without a restart.
    secret_file(secrets.path(), "relay.creds", &fixture.user_creds);
    wait_until("NATS up with renewed credentials", || {
        relay.status()["nats"]["status"] == "up"
    });
    let direct = async_nats::ConnectOptions::with_credentials(&fixture.user_creds)
        .unwrap()
        .connect(server.url())
        .await
        .expect("a plain client with the same credentials");
    carries_traffic_both_ways(&relay, &direct).await;
    assert_never_shown(&relay, &fixture.user_seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_an_nkey_seed() {
    let (seed, public_key) = nkey_user();
    let server = NatsServer::start_configured(&nkey_config(&[&public_key]));
    let secrets = tempfile::tempdir().unwrap();
    let seed_file = secret_file(secrets.path(), "relay.nk", &format!("{seed}\n"));
    let relay = Relay::start_with_config(
        &server.url(),
        &format!("[nats]\nnkey_seed_file = \"{}\"\n", seed_file.display()),
    );
    let direct = async_nats::ConnectOptions::with_nkey(seed.clone())
        .connect(server.url())
        .await
        .expect("a plain client with the same seed");
    carries_traffic_both_ways(&relay, &direct).await;
    assert_eq!(relay.status()["nats"]["auth"], "nkey");
    assert_never_shown(&relay, &seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_tls_first_and_a_token() {
    let certificates = Certificates::generate("relay");
    let tls_block = certificates
        .nats_tls_block(false)
        .replace("timeout: 2", "timeout: 2\n  handshake_first: true");
    let server = NatsServer::start_configured(&format!(
        "{tls_block}authorization {{ token: \"t0k3n-{PASSWORD}\" }}\n"
    ));
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secret_file(secrets.path(), "nats-token", &format!("t0k3n-{PASSWORD}\n"));
    let url = format!("tls://127.0.0.1:{}", server.port());
    let relay = Relay::start_with_config(
        &url,
        &format!(
            "[nats]\ntls_ca = \"{}\"\ntls_first = true\ntoken_file = \"{}\"\n",
            certificates.ca().display(),
            token_file.display()
        ),
    );
    let direct = async_nats::ConnectOptions::with_token(format!("t0k3n-{PASSWORD}"))
        .add_root_certificates(certificates.ca())
        .tls_first()
        .connect(url)
        .await
        .expect("a plain client with the same token");
    carries_traffic_both_ways(&relay, &direct).await;
    assert_eq!(relay.status()["nats"]["auth"], "token");
    assert_never_shown(&relay, PASSWORD);
}

#[test]
fn secrets_are_refused_on_the_command_line_and_exposed_files_warned_about() {
    // Credentials in --nats would be readable by every user of the node.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_holdfastd"))
        .args([
            "--nats",
            "nats://relay:hunter2@127.0.0.1:4222",
            "--socket",
            "/nonexistent/x.sock",
        ])
        .output()
        .expect("run holdfastd");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nats.servers") && !stderr.contains("hunter2"),
        "{stderr}"
    );

    // A world-readable password file: a warning at start, never the secret.
    let server = NatsServer::start_configured(
        "authorization { users = [ { user: relay, password: \"pw-in-file\" } ] }\n",
    );
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("nats-password");
    std::fs::write(&password_file, "pw-in-file\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let relay = Relay::start_with_config(
        &server.url(),
        &format!(
            "[nats]\nuser = \"relay\"\npassword_file = \"{}\"\n",
            password_file.display()
        ),
    );
    wait_until("NATS up", || relay.status()["nats"]["status"] == "up");
    let logs = relay.logs();
    assert!(
        logs.contains("nats.password_file") && logs.contains("readable by every user"),
        "{logs}"
    );
    assert!(!logs.contains("pw-in-file"), "{logs}");

    // A missing secret file is a config error naming the key.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_holdfastd"))
        .args([
            "--nats-creds",
            "/nonexistent/relay.creds",
            "--socket",
            "/nonexistent/x.sock",
        ])
        .output()
        .expect("run holdfastd");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nats.creds_file"), "{stderr}");
}

/// Registers, reads and watches through the relay; a plain client with
/// `direct` confirms what reached etcd.
async fn registers_reads_and_watches(relay: &Relay, direct: &mut etcd_client::Client) {
    let client = Client::connect(&relay.url()).await.expect("connect");
    wait_until_async("etcd up", || async {
        client.etcd_status() == LinkStatus::Up
    })
    .await;
    let mut watcher = client.watch("v1/secure/").await.unwrap();
    assert_eq!(
        client.register("v1/secure/worker", "w1").await.unwrap(),
        RegistrationStatus::Applied
    );
    let found = direct.get("v1/secure/worker", None).await.unwrap();
    assert_eq!(
        found.kvs().first().map(|kv| kv.value()),
        Some(b"w1".as_slice())
    );
    // The cache follows etcd through its watch, which with one-second
    // tokens may be re-establishing right now: the key shows up shortly
    // after etcd has it, not necessarily at once.
    let snapshot = crate::waiting::poll_for("the cached GET to show the key", || async {
        let snapshot = client.get("v1/secure/").await.unwrap();
        (snapshot.entries.len() == 1).then_some(snapshot)
    })
    .await;
    assert!(!snapshot.stale);
    direct.put("v1/secure/other", "o", None).await.unwrap();
    within("the watch sees a put made directly", async {
        loop {
            match watcher.next().await {
                Some(WatchEvent::Put { key, .. }) if key == "v1/secure/other" => return,
                Some(_) => continue,
                None => panic!("the watch ended"),
            }
        }
    })
    .await;
}

fn etcd_tls_config(certificates: &Certificates, endpoints: &[String]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|url| format!("\"{url}\"")).collect();
    format!(
        "[etcd]\nendpoints = [{}]\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nreconcile_interval = \"2s\"\n",
        endpoints.join(", "),
        certificates.ca().display(),
        certificates.client_cert().display(),
        certificates.client_key().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_tls_client_certificates() {
    let etcd = EtcdCluster::start(1, Some(Certificates::generate("relay")));
    // The relay gets a client certificate from the same CA: a copy of the
    // cluster's files, as an operator would install them.
    let certificates = etcd_certificates(&etcd);
    let nats = NatsServer::start();
    let relay = Relay::start_with_config(&nats.url(), &etcd_tls_config(certificates, &etcd.urls()));
    let mut direct = etcd.client(0).await;
    registers_reads_and_watches(&relay, &mut direct).await;
    let status = relay.status();
    assert_eq!(status["etcd"]["transport"], "tls", "{status}");
    assert_eq!(status["etcd"]["auth"], "client_certificate", "{status}");
}

/// Waits until etcd (started with `--auth-token-ttl 1`) has dropped a
/// token of the relay's user that it issued after this call began and that
/// nobody used; returns how long that took.
///
/// etcd keeps a token alive while it is used and deletes the expired ones
/// about once a second, so once a token issued now is refused, every token
/// the relay last used before now has been deleted too. Each spare client
/// authenticates as it connects and tries its token once (a try that
/// succeeds renews the token), at a quarter-second spacing.
async fn idle_tokens_expired(url: &str) -> Duration {
    let started = std::time::Instant::now();
    let spares = futures::future::join_all((0..12).map(|_| {
        etcd_client::Client::connect(
            [url],
            Some(etcd_client::ConnectOptions::new().with_user("relay", PASSWORD)),
        )
    }))
    .await;
    let issued = std::time::Instant::now();
    for (index, spare) in spares.into_iter().enumerate() {
        let mut spare = spare.expect("connect as the relay's user");
        let wait = Duration::from_secs(1) + Duration::from_millis(250) * index as u32;
        tokio::time::sleep_until((issued + wait).into()).await;
        match spare.get("v1/", None).await {
            Err(error) if error.to_string().contains("invalid auth token") => {
                return started.elapsed();
            }
            Err(error) => panic!("a spare token was refused for another reason: {error}"),
            Ok(_) => {}
        }
    }
    panic!("tokens left unused for 3.75 s are still valid");
}

/// The certificates the cluster was started with.
fn etcd_certificates(etcd: &EtcdCluster) -> &Certificates {
    etcd.certificates().expect("a TLS cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_a_user_limited_to_its_prefix_and_expiring_tokens() {
    // Tokens live one second, so the relay must renew them as it goes.
    let etcd = EtcdCluster::start_with(1, None, &["--auth-token-ttl", "1"]);
    let mut admin = etcd.client(0).await;
    admin.user_add("root", "root-password", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("relay", PASSWORD, None).await.unwrap();
    admin.role_add("relay").await.unwrap();
    admin
        .role_grant_permission(
            "relay",
            etcd_client::Permission::read_write("v1/").with_prefix(),
        )
        .await
        .unwrap();
    admin.user_grant_role("relay", "relay").await.unwrap();
    admin.auth_enable().await.unwrap();

    let secrets = tempfile::tempdir().unwrap();
    let password_file = secret_file(secrets.path(), "etcd-password", &format!("{PASSWORD}\n"));
    let nats = NatsServer::start();
    let front_port = crate::support::free_port();
    let relay = Relay::start_with_config(
        &nats.url(),
        &format!(
            "[relay]\netcd_listen = \"127.0.0.1:{front_port}\"\n[etcd]\nendpoints = [\"{}\"]\nuser = \"relay\"\npassword_file = \"{}\"\nreconcile_interval = \"2s\"\n",
            etcd.url(0),
            password_file.display()
        ),
    );
    let mut direct = etcd_client::Client::connect(
        [etcd.url(0)],
        Some(etcd_client::ConnectOptions::new().with_user("root", "root-password")),
    )
    .await
    .unwrap();
    registers_reads_and_watches(&relay, &mut direct).await;
    // The relay's user may not read the probe key: etcd still serves, and
    // the relay says what to grant.
    assert!(
        relay.logs().contains("may not read etcd.probe_key"),
        "{}",
        relay.logs()
    );
    // Past a token lifetime, on etcd's clock: registrations and
    // linearizable reads through the etcd front end (passed to etcd with
    // the relay's token) still work.
    let expired_after = idle_tokens_expired(&etcd.url(0)).await;
    eprintln!("a token left unused expired after {expired_after:?}");
    let client = Client::connect(&relay.url()).await.unwrap();
    assert_eq!(
        client.register("v1/secure/later", "l").await.unwrap(),
        RegistrationStatus::Applied
    );
    let mut front = etcd_client::Client::connect([format!("http://127.0.0.1:{front_port}")], None)
        .await
        .unwrap();
    let read = front.get("v1/secure/later", None).await.unwrap();
    assert_eq!(
        read.kvs().first().map(|kv| kv.value()),
        Some(b"l".as_slice())
    );
    let status = relay.status();
    assert_eq!(status["etcd"]["status"], "up", "{status}");
    assert_eq!(status["etcd"]["auth"], "user_password", "{status}");
    assert_never_shown(&relay, PASSWORD);
    assert_eq!(
        relay.logs().matches("etcd link down").count(),
        0,
        "{}",
        relay.logs()
    );
}
