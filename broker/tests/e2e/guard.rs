//! The planner guard against Dynamo 1.6.1's real planner connector
//! (VirtualConnectorCoordinator and VirtualConnectorClient from
//! ai-dynamo-runtime, installed into .deps/dynamo by deploy/install-deps.sh)
//! and its real worker load reports (WorkerMetricsPublisher on the event
//! plane), with real etcd and nats-server. Skips, saying why, when the
//! runtime cannot be imported.

use crate::support::{EtcdServer, NatsServer, Relay, WAIT};
use crate::waiting::poll_for;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dynamo_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/dynamo")
}

/// Whether `import dynamo._core` works; says why not when it does not.
fn dynamo_available() -> bool {
    let output = Command::new("python3")
        .args(["-c", "import dynamo._core"])
        .env("PYTHONPATH", dynamo_path())
        .output();
    match output {
        Ok(output) if output.status.success() => true,
        Ok(output) => {
            eprintln!(
                "SKIPPED: ai-dynamo-runtime 1.6.1 is not importable from {} (deploy/install-deps.sh installs it): {}",
                dynamo_path().display(),
                String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
            );
            false
        }
        Err(error) => {
            eprintln!("SKIPPED: python3 cannot be run: {error}");
            false
        }
    }
}

fn guard_config(etcd: &EtcdServer, namespace: &str) -> String {
    // relay_config appends to the [etcd] table: the guard's comes after.
    format!(
        "{}\n[guard]\nenabled = true\nnamespaces = [\"{namespace}\"]\ninterval = \"1s\"\nkv_total_blocks = 100\nlease_ttl = \"2s\"\nreport_ttl = \"30s\"\n",
        etcd.relay_config("")
    )
}

/// A decision the deployment acknowledged: (id, prefill, decode).
type Acked = (u64, u64, u64);

/// Runs guard_planner.py; returns the decisions the deployment acknowledged.
fn drive_planner(
    nats: &NatsServer,
    etcd: &EtcdServer,
    namespace: &str,
    load: &str,
    seconds: u32,
) -> Vec<Acked> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/guard_planner.py");
    let child = Command::new("python3")
        .arg(script)
        .args([
            load,
            "--namespace",
            namespace,
            "--seconds",
            &seconds.to_string(),
        ])
        .env("PYTHONPATH", dynamo_path())
        .env("ETCD_ENDPOINTS", etcd.url())
        .env("NATS_SERVER", nats.url())
        .env("DYN_TCP_RPC_HOST", "127.0.0.1")
        .env("DYN_EVENT_PLANE", "nats")
        .env("DYN_EVENT_PLANE_HOST", "127.0.0.1")
        .env("DYN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let pid = child.id();
    // Bounded: the script ends by itself after `seconds`; a hung runtime is
    // killed by PID.
    let limit = Duration::from_secs(u64::from(seconds) + 15);
    let watchdog = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let output = child.wait_with_output().expect("guard_planner.py output");
    let _ = watchdog.join();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("\"done\""),
        "guard_planner.py did not finish: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["event"] == "acked")
        .map(|event| {
            (
                event["decision_id"].as_u64().unwrap(),
                event["prefill"].as_u64().unwrap(),
                event["decode"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn guard_status(relay: &Relay) -> serde_json::Value {
    relay.status()["guard"][0].clone()
}

async fn wait_for_leader(relays: &[&Relay]) -> usize {
    poll_for("a relay to lead the guard's election", || async {
        relays
            .iter()
            .position(|relay| guard_status(relay)["leader"] == true)
    })
    .await
}

fn metric(relay: &Relay, series: &str) -> f64 {
    let (_, body) = relay.http_get("/metrics");
    body.lines()
        .filter(|line| line.starts_with(series))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_under_sustained_overload_is_rolled_back_and_acknowledged() {
    if !dynamo_available() {
        return;
    }
    let nats = NatsServer::start();
    let etcd = EtcdServer::start();
    let namespace = "guardhigh";
    let relay = Relay::start_with_config(&nats.url(), &guard_config(&etcd, namespace));
    wait_for_leader(&[&relay]).await;

    let acked = drive_planner(&nats, &etcd, namespace, "high", 9);

    // 0: 1/1, 1: 3/3, then the guard's rollback to 1/1 as decision 2, then
    // the planner's next decision (2/2), which Dynamo's coordinator wrote
    // as id 2 again and the guard re-issued as 3.
    assert_eq!(
        acked,
        vec![(0, 1, 1), (1, 3, 3), (2, 1, 1), (3, 2, 2)],
        "{}",
        relay.logs()
    );
    let status = guard_status(&relay);
    let rollback = &status["last_rollback"];
    assert_eq!(rollback["outcome"], "written", "{status}");
    assert_eq!(rollback["rolled_back_decision_id"], 1);
    assert_eq!(rollback["to"]["prefill"], 1);
    let triggered = rollback["triggered_by"].as_array().unwrap();
    assert_eq!(triggered.len(), 3);
    for interval in triggered {
        assert_eq!(interval["kv_usage"].as_f64(), Some(0.99), "{status}");
    }
    assert_eq!(status["reissues"], 1, "{status}");
    assert_eq!(metric(&relay, "holdfast_guard_rollbacks_total"), 1.0);
    assert!(
        metric(
            &relay,
            "holdfast_guard_breaches_total{namespace=\"guardhigh\",reason=\"kv_usage\"}"
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_under_normal_load_is_left_alone() {
    if !dynamo_available() {
        return;
    }
    let nats = NatsServer::start();
    let etcd = EtcdServer::start();
    let namespace = "guardnormal";
    let relay = Relay::start_with_config(&nats.url(), &guard_config(&etcd, namespace));
    wait_for_leader(&[&relay]).await;

    let acked = drive_planner(&nats, &etcd, namespace, "normal", 6);

    assert_eq!(acked, vec![(0, 1, 1), (1, 3, 3)], "{}", relay.logs());
    // (The planner's keys left with its lease when the script ended.)
    let status = guard_status(&relay);
    assert!(status["last_rollback"].is_null(), "{status}");
    assert_eq!(status["breach_streak"], 0);
    assert_eq!(status["last_interval"]["kv_usage"].as_f64(), Some(0.5));
    // Dynamo publishes kv_metrics when they change: one report, standing
    // for the worker in every interval since.
    assert!(status["load_reports"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["last_interval"]["sources"], 1, "{status}");
    assert_eq!(metric(&relay, "holdfast_guard_breaches_total"), 0.0);
    assert_eq!(metric(&relay, "holdfast_guard_rollbacks_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_roll_back_once_and_the_survivor_takes_over() {
    if !dynamo_available() {
        return;
    }
    let nats = NatsServer::start();
    let etcd = EtcdServer::start();
    let namespace = "guardpair";
    let config = guard_config(&etcd, namespace);
    let mut relays = [
        Relay::start_with_config(&nats.url(), &config),
        Relay::start_with_config(&nats.url(), &config),
    ];
    let leader = wait_for_leader(&[&relays[0], &relays[1]]).await;
    let follower = 1 - leader;
    assert_eq!(guard_status(&relays[follower])["leader"], false);

    let acked = drive_planner(&nats, &etcd, namespace, "high", 9);

    let rollbacks: Vec<_> = acked
        .iter()
        .filter(|(_, prefill, _)| *prefill == 1)
        .collect();
    assert_eq!(rollbacks.len(), 2, "decision 0 and one rollback: {acked:?}");
    let total: f64 = relays
        .iter()
        .map(|relay| metric(relay, "holdfast_guard_rollbacks_total"))
        .sum();
    assert_eq!(total, 1.0);
    assert_eq!(
        guard_status(&relays[follower])["last_guard_write"]["kind"],
        "reissue",
        "the follower follows the leader's writes"
    );

    // The leader dies without a word: the follower leads within the TTL
    // (2 s) and a quarter.
    relays[leader].kill();
    let killed = Instant::now();
    let survivor = &relays[follower];
    poll_for("the survivor to lead", || async {
        (guard_status(survivor)["leader"] == true).then_some(())
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "took over after {took:?}"
    );
    assert!(took < WAIT);
}
