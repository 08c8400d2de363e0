//! The planner guard with the generic load reports
//! (`holdfast.guard.load.{namespace}`) and decisions written to etcd the way
//! Dynamo's planner writes them: advise mode, garbage reports, and an etcd
//! outage (the guard acts on nothing, says so, and acts again after).

use crate::support::{EtcdServer, NatsServer, Relay, WAIT};
use crate::waiting::poll_for;
use etcd_client::{PutOptions, Txn, TxnOp};
use futures::StreamExt;
use std::time::Duration;

fn config(etcd: &EtcdServer, namespace: &str, mode: &str) -> String {
    format!(
        "{}\n[guard]\nenabled = true\nnamespaces = [\"{namespace}\"]\ninterval = \"300ms\"\nmode = \"{mode}\"\nlease_ttl = \"2s\"\nreport_ttl = \"1s\"\n",
        etcd.relay_config("")
    )
}

/// Decision 0 (1/1) then decision 1 (3/3), as one txn each.
async fn planner_decides(etcd: &EtcdServer, namespace: &str) {
    let mut client = etcd.client().await;
    for (id, workers) in [(0, 1), (1, 3)] {
        let key = |name: &str| format!("v1/{namespace}/planner/{name}");
        client
            .txn(Txn::new().and_then([
                TxnOp::put(
                    key("num_prefill_workers"),
                    workers.to_string(),
                    None::<PutOptions>,
                ),
                TxnOp::put(key("num_decode_workers"), workers.to_string(), None),
                TxnOp::put(key("decision_id"), id.to_string(), None),
            ]))
            .await
            .unwrap();
    }
}

async fn planner_value(etcd: &EtcdServer, namespace: &str, name: &str) -> String {
    let mut client = etcd.client().await;
    let response = client
        .get(format!("v1/{namespace}/planner/{name}"), None)
        .await
        .unwrap();
    response.kvs()[0].value_str().unwrap().to_string()
}

fn guard_status(relay: &Relay) -> serde_json::Value {
    relay.status()["guard"][0].clone()
}

async fn until_guard(relay: &Relay, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    poll_for(what, || async { check(&guard_status(relay)).then_some(()) }).await;
}

/// Publishes an overloaded worker's report every 50 ms until dropped.
fn overload(nats: async_nats::Client, namespace: &str) -> tokio::task::JoinHandle<()> {
    let subject = format!("holdfast.guard.load.{namespace}");
    let report = format!(
        "{{\"namespace\":\"{namespace}\",\"kv_usage\":0.99,\"prefill_queue_depth\":150,\"worker\":\"a\"}}"
    );
    tokio::spawn(async move {
        loop {
            if nats
                .publish(subject.clone(), report.clone().into())
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advise_mode_publishes_the_would_be_rollback_and_garbage_is_counted() {
    let nats = NatsServer::start();
    let etcd = EtcdServer::start();
    let namespace = "advised";
    let relay = Relay::start_with_config(&nats.url(), &config(&etcd, namespace, "advise"));
    until_guard(&relay, "the guard to lead", |guard| guard["leader"] == true).await;
    let direct = async_nats::connect(nats.url()).await.unwrap();
    let mut advice = direct
        .subscribe(format!("holdfast.guard.advice.{namespace}"))
        .await
        .unwrap();
    direct.flush().await.unwrap();
    // Garbage on every subject the guard reads: counted, logged, skipped.
    for (subject, payload) in [
        (
            format!("holdfast.guard.load.{namespace}"),
            b"not json".to_vec(),
        ),
        (
            format!("holdfast.guard.load.{namespace}"),
            format!("{{\"namespace\":\"{namespace}\",\"kv_usage\":7}}").into_bytes(),
        ),
        (
            format!("namespace.{namespace}.component.c.endpoint.e.kv_metrics"),
            b"\x85\xff\x00".to_vec(),
        ),
        (
            format!("namespace.{namespace}.component.c.endpoint.e.forward-pass-metrics"),
            vec![0xc1; 64],
        ),
    ] {
        direct.publish(subject, payload.into()).await.unwrap();
    }
    planner_decides(&etcd, namespace).await;
    until_guard(&relay, "the decision", |guard| {
        guard["decision"]["decision_id"] == 1
    })
    .await;
    let load = overload(direct.clone(), namespace);

    let message = tokio::time::timeout(WAIT, advice.next())
        .await
        .expect("advice within the wait")
        .unwrap();
    load.abort();
    let advice: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(advice["decision_id"], 1, "{advice}");
    assert_eq!(advice["from"]["prefill"], 3);
    assert_eq!(advice["to"]["prefill"], 1);
    assert_eq!(advice["to"]["decode"], 1);
    let triggered = advice["triggered_by"].as_array().unwrap();
    assert_eq!(triggered.len(), 3);
    assert_eq!(triggered[0]["prefill_queue"], 150);
    // Nothing written: the planner's decision stands.
    assert_eq!(planner_value(&etcd, namespace, "decision_id").await, "1");
    assert_eq!(
        planner_value(&etcd, namespace, "num_prefill_workers").await,
        "3"
    );
    let guard = guard_status(&relay);
    assert_eq!(guard["last_advice"]["outcome"], "advised", "{guard}");
    assert!(guard["last_rollback"].is_null());
    assert_eq!(guard["undecodable_reports"], 4, "{guard}");
    let (_, metrics) = relay.http_get("/metrics");
    assert!(
        metrics.contains(
            "holdfast_guard_load_reports_total{namespace=\"advised\",outcome=\"undecodable\"} 4"
        ),
        "{metrics}"
    );
    assert_eq!(relay.http_get("/livez").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_etcd_outage_the_guard_acts_on_nothing_and_acts_again_after() {
    let nats = NatsServer::start();
    let mut etcd = EtcdServer::start();
    let namespace = "outage";
    let relay = Relay::start_with_config(&nats.url(), &config(&etcd, namespace, "enforce"));
    planner_decides(&etcd, namespace).await;
    until_guard(&relay, "the guard to lead with the decision", |guard| {
        guard["leader"] == true && guard["decision"]["decision_id"] == 1
    })
    .await;

    etcd.kill();
    until_guard(&relay, "the guard to say it acts on nothing", |guard| {
        guard["leader"] == false && guard["etcd"] == "unreachable: acting on nothing"
    })
    .await;
    // Overload during the outage: judged, not acted on.
    let direct = async_nats::connect(nats.url()).await.unwrap();
    let load = overload(direct.clone(), namespace);
    until_guard(&relay, "a breach streak during the outage", |guard| {
        guard["breach_streak"].as_u64() >= Some(3)
    })
    .await;
    assert!(guard_status(&relay)["last_rollback"].is_null());

    etcd.start_again();
    until_guard(&relay, "the rollback after etcd returned", |guard| {
        guard["last_rollback"]["outcome"] == "written"
    })
    .await;
    load.abort();
    assert_eq!(planner_value(&etcd, namespace, "decision_id").await, "2");
    assert_eq!(
        planner_value(&etcd, namespace, "num_prefill_workers").await,
        "1"
    );
    let guard = guard_status(&relay);
    assert_eq!(guard["etcd"], "connected");
    assert_eq!(guard["decision"]["origin"], "guard_rollback", "{guard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_cleanly_hands_its_election_over_at_once() {
    let nats = NatsServer::start();
    let etcd = EtcdServer::start();
    let namespace = "guardhandover";
    // An 8 s lease: a leader that just vanished is replaced only once it
    // expires; one that stops cleanly gives it up, and the other relay
    // (trying every quarter TTL) leads within about 2 s.
    let config =
        config(&etcd, namespace, "enforce").replace("lease_ttl = \"2s\"", "lease_ttl = \"8s\"");
    let mut relays = [
        Relay::start_with_config(&nats.url(), &config),
        Relay::start_with_config(&nats.url(), &config),
    ];
    let leader = poll_for("a relay to lead", || async {
        relays
            .iter()
            .position(|relay| guard_status(relay)["leader"] == true)
    })
    .await;
    let follower = 1 - leader;
    let stopped = std::time::Instant::now();
    assert!(relays[leader].terminate().success());
    let survivor = &relays[follower];
    until_guard(survivor, "the other relay to lead", |guard| {
        guard["leader"] == true
    })
    .await;
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(4), "took over after {took:?}");
    assert!(took < WAIT);
}
