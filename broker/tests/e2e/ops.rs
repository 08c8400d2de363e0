//! Operations: Prometheus metrics, health endpoints and systemd notify,
//! checked the way an operator and the orchestrator see them.

use crate::support::{
    metric, scrape, wait_until, wait_until_async, within, EtcdStack, NatsServer, Relay, Stack,
};
use holdfast_client::{ErrorCode, LinkStatus, OutboundMessage};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_a_nats_outage() {
    let mut stack = Stack::start();
    let relay = &stack.relay;
    assert_eq!(relay.http_get("/readyz").0, 200);
    assert_eq!(relay.http_get("/livez").0, 200);
    assert_eq!(relay.http_get("/nope").0, 404);

    let client = stack.client().await;
    for _ in 0..5 {
        let ack = client
            .publish_with_ack(OutboundMessage::new("ops.work", "x").class("prefill"))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.outcome, holdfast_client::AckStatus::Forwarded);
    }
    let _subscriber = client.subscribe("ops.>").await.unwrap();
    let text = scrape(relay);
    let nats = [("service", "nats")];
    assert_eq!(
        metric(&text, "holdfast_upstream_up", &nats),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "holdfast_upstream_outages_total", &nats),
        Some(0.0)
    );
    let prefill_forwarded = [("class", "prefill"), ("outcome", "forwarded")];
    assert_eq!(
        metric(&text, "holdfast_publishes_total", &prefill_forwarded),
        Some(5.0)
    );
    assert_eq!(metric(&text, "holdfast_sessions", &[]), Some(1.0));
    assert_eq!(
        metric(&text, "holdfast_subscriptions", &[("kind", "upstream")]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "holdfast_publish_ack_seconds_count",
            &[("class", "prefill")]
        ),
        Some(5.0),
        "{text}"
    );
    assert!(text.contains("# HELP holdfast_publishes_total"), "{text}");

    let mut events = client.link_events();
    stack.nats.kill();
    within("outage noticed", async {
        while client.nats_status() != LinkStatus::Down {
            let _ = events.recv().await;
        }
    })
    .await;
    let ack = client
        .publish_with_ack(OutboundMessage::new("ops.work", "y").class("decode"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, holdfast_client::AckStatus::Queued);
    let error = client.request("nobody.service", "q").await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NatsUnavailable));

    // Degraded, not dead: liveness holds, the outage shows everywhere.
    let relay = &stack.relay;
    assert_eq!(relay.http_get("/livez").0, 200);
    assert_eq!(relay.http_get("/readyz").0, 200);
    // The outage's clock has started and the queued publish shows in the
    // backlog.
    let decode = [("class", "decode")];
    let text = crate::waiting::poll_for("the outage and its backlog in the metrics", || async {
        let text = scrape(relay);
        let started = metric(&text, "holdfast_upstream_current_outage_seconds", &nats)
            .is_some_and(|seconds| seconds > 0.0);
        let queued = metric(&text, "holdfast_journal_backlog_messages", &decode) == Some(1.0);
        (started && queued).then_some(text)
    })
    .await;
    assert_eq!(
        metric(&text, "holdfast_upstream_up", &nats),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "holdfast_upstream_outages_total", &nats),
        Some(1.0)
    );
    assert!(metric(&text, "holdfast_upstream_current_outage_seconds", &nats).unwrap() > 0.0);
    let decode_queued = [("class", "decode"), ("outcome", "queued")];
    assert_eq!(
        metric(&text, "holdfast_publishes_total", &decode_queued),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "holdfast_journal_backlog_messages", &decode),
        Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "holdfast_journal_oldest_age_seconds", &decode).is_some());
    assert_eq!(
        metric(
            &text,
            "holdfast_request_failures_total",
            &[("code", "nats_unavailable")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "holdfast_local_deliveries_total", &[]),
        Some(1.0),
        "{text}"
    );
    let (status, body) = relay.http_get("/status");
    assert_eq!(status, 200);
    let document: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(document["nats"]["status"], "down");

    stack.nats.restart();
    let relay = &stack.relay;
    wait_until_async("NATS back in the metrics", || async {
        metric(&scrape(relay), "holdfast_upstream_up", &nats) == Some(1.0)
    })
    .await;
    // The held message drains once NATS is back: backlog down, replay counted.
    wait_until_async("backlog drained", || async {
        metric(&scrape(relay), "holdfast_journal_backlog_messages", &decode) == Some(0.0)
    })
    .await;
    let text = scrape(relay);
    assert_eq!(
        metric(&text, "holdfast_replay_messages_total", &decode),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "holdfast_upstream_current_outage_seconds", &nats),
        Some(0.0)
    );
    assert!(metric(&text, "holdfast_upstream_downtime_seconds", &nats).unwrap() > 0.0);
}

/// Reads notifications until `wanted` has been seen `times` times.
fn wait_for_notification(socket: &UnixDatagram, wanted: &str, times: usize) {
    let deadline = Instant::now() + crate::support::WAIT;
    let mut seen = 0;
    let mut buffer = [0u8; 4096];
    while seen < times {
        assert!(
            Instant::now() < deadline,
            "saw {wanted} only {seen} of {times} times"
        );
        if let Ok(read) = socket.recv(&mut buffer) {
            let text = String::from_utf8_lossy(&buffer[..read]);
            if text.lines().any(|line| line == wanted) {
                seen += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notifications = UnixDatagram::bind(&notify_path).unwrap();
    notifications
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let nats = NatsServer::start();
    let mut relay = Relay::start_with(
        &nats.url(),
        "",
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            // systemd would set WatchdogSec=0.4s; pings come every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    wait_for_notification(&notifications, "READY=1", 1);
    wait_for_notification(&notifications, "WATCHDOG=1", 3);
    assert!(relay.terminate().success());
    wait_for_notification(&notifications, "STOPPING=1", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_holds_with_nats_never_reachable() {
    let mut nats = NatsServer::start();
    nats.kill();
    let relay = Relay::start(&nats.url());
    wait_until("degraded state reported", || {
        metric(
            &scrape(&relay),
            "holdfast_upstream_up",
            &[("service", "nats")],
        ) == Some(0.0)
    });
    assert_eq!(relay.http_get("/livez").0, 200);
    assert_eq!(relay.http_get("/readyz").0, 200);
}

#[test]
fn systemd_unit_verifies() {
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed; skipping the unit check");
        return;
    };
    let unit_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_holdfastd");
    for unit in [
        "holdfastd.service",
        "holdfast-nats.service",
        "holdfast-etcd.service",
    ] {
        let text = std::fs::read_to_string(unit_dir.join(unit)).unwrap();
        // Point ExecStart at binaries that exist here; the rest is verified as shipped.
        let text = text
            .replace("/usr/local/bin/holdfastd", binary)
            .replace("/usr/sbin/nats-server", "/bin/true")
            .replace("/usr/bin/etcd", "/bin/true");
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let output = std::process::Command::new(analyze)
        .arg("verify")
        .args(
            [
                "holdfastd.service",
                "holdfast-nats.service",
                "holdfast-etcd.service",
            ]
            .map(|unit| dir.path().join(unit)),
        )
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
}

fn which(binary: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([std::path::PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(binary))
        .find(|path| path.exists())
        .ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_metrics_follow_an_outage_and_every_series_is_documented() {
    let mut stack = EtcdStack::start();
    let client = stack.client().await;
    client.register("v1/ops/a", "1").await.unwrap();
    client.get("v1/ops/").await.unwrap();
    let _watch = client.watch("v1/ops/").await.unwrap();
    // Histograms appear with their first sample: one request, one acked
    // publish of a journaled class.
    let _ = client.request("ops.nobody", "ping").await;
    let ack = client
        .publish_with_ack(OutboundMessage::new("ops.kv", "x").class("kv_events"))
        .await
        .unwrap();
    ack.await.unwrap();
    let (_, text) = stack.relay.http_get("/metrics");
    assert_eq!(
        metric(&text, "holdfast_upstream_up", &[("service", "etcd")]),
        Some(1.0)
    );
    assert_eq!(metric(&text, "holdfast_registrations", &[]), Some(1.0));
    assert_eq!(
        metric(&text, "holdfast_discovery_cache_prefixes", &[]),
        Some(1.0)
    );
    assert_eq!(metric(&text, "holdfast_discovery_watchers", &[]), Some(1.0));
    assert_eq!(
        metric(
            &text,
            "holdfast_registration_acks_total",
            &[("outcome", "applied")]
        ),
        Some(1.0)
    );

    // Every exported series is in the metric catalog (which the operations
    // guide's table and the HELP lines are generated from), and every
    // series the Grafana dashboard plots is exported.
    let catalog: std::collections::BTreeSet<&str> = holdfast_broker::metric_catalog::SERIES
        .iter()
        .map(|series| series.name)
        .collect();
    let dashboard = include_str!("../../../deploy/grafana/holdfast-dashboard.json");
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|line| line.starts_with("holdfast_"))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
        })
        .collect();
    for name in &exported {
        assert!(
            catalog.contains(name),
            "{name} is not in broker/src/ops/metric_catalog.rs"
        );
    }
    for used in dashboard.split("holdfast_").skip(1) {
        let name: String = used
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = format!("holdfast_{name}");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            exported.contains(base),
            "the dashboard plots {name}, which the relay does not export"
        );
    }

    stack.etcd.kill();
    wait_until_async("etcd down in the metrics", || async {
        let (_, text) = stack.relay.http_get("/metrics");
        metric(&text, "holdfast_upstream_up", &[("service", "etcd")]) == Some(0.0)
    })
    .await;
    client.register("v1/ops/b", "2").await.unwrap();
    // The buffered change and the cache's staleness show.
    let text = crate::waiting::poll_for("the etcd outage in the metrics", || async {
        let (_, text) = stack.relay.http_get("/metrics");
        let stale = metric(&text, "holdfast_discovery_staleness_seconds", &[])
            .is_some_and(|seconds| seconds > 0.0);
        let pending = metric(&text, "holdfast_registration_changes_pending", &[]) == Some(1.0);
        (stale && pending).then_some(text)
    })
    .await;
    let (code, _) = stack.relay.http_get("/livez");
    assert_eq!(code, 200, "an etcd outage must not fail liveness");
    assert_eq!(
        metric(&text, "holdfast_registration_changes_pending", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "holdfast_upstream_outages_total",
            &[("service", "etcd")]
        ),
        Some(1.0)
    );
    assert!(metric(&text, "holdfast_discovery_staleness_seconds", &[]).unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    // The harness starts holdfastd with the test's own umask (022 here),
    // as an operator running it by hand would.
    let etcd = crate::support::EtcdServer::start();
    let nats = crate::support::NatsServer::start();
    let front = crate::support::free_port();
    let relay = crate::support::Relay::start_with_config(
        &nats.url(),
        &format!(
            "[relay]\netcd_listen = \"127.0.0.1:{front}\"\n{}",
            etcd.relay_config("prefixes = [\"v1/\"]")
        ),
    );
    let client = holdfast_client::Client::connect(&relay.url())
        .await
        .unwrap();
    client.register("v1/private", "x").await.unwrap();
    let data_dir = relay.data_dir();
    crate::support::wait_until("the discovery cache saved", || {
        data_dir.join("discovery-cache.json").exists()
    });
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700, "{}", data_dir.display());
    let mut files = 0;
    for entry in std::fs::read_dir(&data_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files += 1;
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    assert!(
        files >= 2,
        "journal and discovery cache expected in {}",
        data_dir.display()
    );
    // The socket is for its group, as configured.
    assert_eq!(mode(relay.socket()), 0o660);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_socket_file_is_bound_again_and_a_replaced_one_makes_the_relay_unready() {
    let stack = crate::support::Stack::start();
    let connected = stack.client().await;
    let socket = stack.relay.socket().to_path_buf();

    // Removed: new clients can connect again within a couple of seconds.
    std::fs::remove_file(&socket).unwrap();
    let client = within("a client connects after the socket was removed", async {
        loop {
            match holdfast_client::Client::connect(&stack.relay.url()).await {
                Ok(client) => break client,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    client.flush().await.unwrap();
    assert_eq!(stack.relay.http_get("/readyz").0, 200);

    // Replaced by another file: left alone, and not ready, saying why.
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, b"not the relay").unwrap();
    crate::support::wait_until("readyz reports the replaced socket", || {
        let (code, body) = stack.relay.http_get("/readyz");
        code == 503 && body.contains("replaced")
    });
    assert_eq!(std::fs::read(&socket).unwrap(), b"not the relay");
    assert!(stack.relay.logs().contains("replaced by another file"));
    // Connections made before are unaffected throughout.
    connected.publish("still.working", "x").await.unwrap();
    connected.flush().await.unwrap();

    // Once the path is free again, the relay takes it back.
    std::fs::remove_file(&socket).unwrap();
    crate::support::wait_until("ready again", || stack.relay.http_get("/readyz").0 == 200);
    holdfast_client::Client::connect(&stack.relay.url())
        .await
        .unwrap()
        .flush()
        .await
        .unwrap();
}
