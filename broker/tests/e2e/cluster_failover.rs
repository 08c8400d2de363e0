//! Clustered, secured upstreams as production runs them: a member of a
//! 3-node NATS cluster (TLS, JWT credentials) or of a 3-member etcd cluster
//! (TLS, client certificates) dies under load, and the relay moves on
//! without losing anything, without reporting an outage that is not one,
//! and without showing a secret.

use crate::clusters::{secret_file, Certificates, EtcdCluster, NatsCluster};
use crate::nats_jwt::NatsAuthFixture;
use crate::support::{wait_until_async, within, Relay, WAIT};
use futures::StreamExt;
use holdfast_client::{
    AckStatus, Client, ConnectOptions, LinkStatus, OutboundMessage, RegistrationStatus,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A client that waits out a slow relay instead of reconnecting.
async fn patient_client(relay: &Relay) -> Client {
    let url = relay.url().parse().expect("relay URL");
    Client::connect_with(ConnectOptions::new(url).pong_timeout(Duration::from_secs(10)))
        .await
        .expect("connect to holdfastd")
}

/// How many times the relay's log says etcd went down.
fn etcd_outages_logged(relay: &Relay) -> usize {
    relay.logs().matches("etcd link down").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_members_dying_are_ridden_out_until_quorum_is_lost() {
    let mut cluster = EtcdCluster::start(3, Some(Certificates::generate("relay")));
    let leader = cluster.leader().expect("a leader");
    let certificates = cluster.certificates().expect("TLS");
    // The relay starts on the leader (the first endpoint that serves), so
    // killing it tests both the move to another member and the election.
    let mut order: Vec<usize> = vec![leader];
    order.extend((0..3).filter(|member| *member != leader));
    let endpoints: Vec<String> = order
        .iter()
        .map(|member| format!("\"{}\"", cluster.url(*member)))
        .collect();
    let config = format!(
        "[etcd]\nendpoints = [{}]\nprefixes = [\"v1/cluster/\"]\nreconcile_interval = \"2s\"\nreconnect_delay_max = \"1s\"\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        endpoints.join(", "),
        certificates.ca().display(),
        certificates.client_cert().display(),
        certificates.client_key().display()
    );
    let nats = crate::support::NatsServer::start();
    let relay = Relay::start_with_config(&nats.url(), &config);
    let client = patient_client(&relay).await;
    assert_eq!(
        client.register("v1/cluster/worker-1", "w1").await.unwrap(),
        RegistrationStatus::Applied
    );
    let status = relay.status();
    assert_eq!(status["etcd"]["endpoint"], cluster.url(leader), "{status}");
    assert_eq!(status["etcd"]["reachable_endpoints"], 3, "{status}");

    // SIGKILL the leader; two members keep quorum and elect a new one.
    // Until the relay's calls have moved to a member that serves again (a
    // linearizable read through the relay answered), no outage is
    // reported and GETs are answered fresh; once one serves, the link
    // timeout (3 s) that would report one starts over.
    cluster.kill(leader);
    let killed = Instant::now();
    let mut answers = 0;
    loop {
        assert_eq!(
            client.etcd_status(),
            LinkStatus::Up,
            "an outage reported {:?} after the leader died",
            killed.elapsed()
        );
        let snapshot = client.get("v1/cluster/").await.unwrap();
        assert!(
            !snapshot.stale,
            "a GET answered stale {:?} after the leader died",
            killed.elapsed()
        );
        assert_eq!(snapshot.entries.len(), 1);
        answers += 1;
        let status = relay.status();
        let moved = status["etcd"]["endpoint"] != cluster.url(leader)
            && status["etcd"]["member_switches"].as_u64().unwrap() >= 1
            && status["etcd"]["reachable_endpoints"] == 2;
        if moved && client.get_linearizable("v1/cluster/").await.is_ok() {
            break;
        }
        assert!(
            killed.elapsed() < WAIT,
            "the relay did not move to a serving member: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "serving again from another member {:?} after the leader died, {answers} GETs answered meanwhile",
        killed.elapsed()
    );
    assert_eq!(client.etcd_status(), LinkStatus::Up);
    assert_eq!(etcd_outages_logged(&relay), 0, "{}", relay.logs());
    // New registrations land, and the old one is still there.
    assert_eq!(
        client.register("v1/cluster/worker-2", "w2").await.unwrap(),
        RegistrationStatus::Applied
    );
    let survivor = order[1];
    let mut direct = cluster.client(survivor).await;
    for (key, value) in [("v1/cluster/worker-1", "w1"), ("v1/cluster/worker-2", "w2")] {
        let found = direct.get(key, None).await.unwrap();
        assert_eq!(
            found.kvs().first().map(|kv| kv.value()),
            Some(value.as_bytes())
        );
    }

    // A second member dies: one of three cannot serve. A real outage,
    // reported within link_timeout (3 s), with registrations buffered.
    let second = order[2];
    cluster.kill(second);
    let started = Instant::now();
    wait_until_async("the outage reported", || async {
        client.etcd_status() == LinkStatus::Down
    })
    .await;
    let noticed = started.elapsed();
    assert!(noticed < Duration::from_secs(5), "took {noticed:?}");
    assert_eq!(
        client.register("v1/cluster/worker-3", "w3").await.unwrap(),
        RegistrationStatus::Buffered
    );
    assert!(client.get("v1/cluster/").await.unwrap().stale);

    // Quorum back: everything buffered is written.
    cluster.start_again(second);
    cluster.start_again(leader);
    within(
        "etcd back",
        wait_until_async("etcd back", || async {
            client.etcd_status() == LinkStatus::Up
        }),
    )
    .await;
    let direct = cluster.cluster_client().await;
    wait_until_async("the buffered registration in etcd", || {
        let mut direct = direct.clone();
        async move {
            matches!(direct.get("v1/cluster/worker-3", None).await,
                Ok(found) if found.kvs().first().map(|kv| kv.value()) == Some(b"w3".as_slice()))
        }
    })
    .await;
    assert_eq!(etcd_outages_logged(&relay), 1, "{}", relay.logs());
    // Members that came back show as serving, not as last seen.
    crate::support::wait_until("every member serving in the status", || {
        relay.status()["etcd"]["reachable_endpoints"] == 3
    });
    assert!(
        !relay.logs().contains("revision went back"),
        "{}",
        relay.logs()
    );
    drop(client);
}

/// What the subscribers on the cluster's nodes received, per class.
#[derive(Default)]
struct Received {
    /// Per class: every index received on any node, first arrival order
    /// per node kept separately for the order check.
    per_node: BTreeMap<(usize, String), Vec<u64>>,
    /// (receiving node, publishing node) of the readiness messages seen.
    ready: std::collections::BTreeSet<(usize, usize)>,
}

/// The fewest messages acknowledged in any class so far.
fn fewest_acked(acked: &Mutex<BTreeMap<String, u64>>) -> u64 {
    let acked = acked.lock().expect("acked");
    if acked.len() < 2 {
        return 0;
    }
    acked.values().copied().min().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_node_in_use_dying_under_load_loses_nothing_and_is_left_within_2s() {
    let certificates = Certificates::generate("relay");
    let fixture = NatsAuthFixture::generate("relay", None);
    let mut cluster = NatsCluster::start(
        3,
        &format!(
            "{}{}",
            certificates.nats_tls_block(false),
            fixture.server_config()
        ),
    );
    let seeds = cluster.urls("tls").join(",");
    let secrets = tempfile::tempdir().unwrap();
    let creds = secret_file(secrets.path(), "relay.creds", &fixture.user_creds);
    // Durable kv_events and the spill class default, as a worker sends them.
    let relay = Relay::start_with_config(
        &seeds,
        &format!(
            "[nats]\ntls_ca = \"{}\"\ncreds_file = \"{}\"\n",
            certificates.ca().display(),
            creds.display()
        ),
    );
    let client = patient_client(&relay).await;
    wait_until_async("every seed known and reachable", || async {
        let status = relay.status();
        status["nats"]["known_servers"].as_array().map(Vec::len) == Some(3)
            && status["nats"]["reachable_servers"] == 3
    })
    .await;
    let status = relay.status();
    assert_eq!(status["nats"]["transport"], "tls", "{status}");
    assert_eq!(status["nats"]["auth"], "creds", "{status}");

    // One plain subscriber per node: whichever nodes are up, every message
    // routed through the cluster reaches at least one of them.
    let received = Arc::new(Mutex::new(Received::default()));
    let mut subscribers = Vec::new();
    let mut publishers = Vec::new();
    for (node, url) in cluster.urls("tls").into_iter().enumerate() {
        let direct = async_nats::ConnectOptions::with_credentials(&fixture.user_creds)
            .expect("credentials")
            .add_root_certificates(certificates.ca())
            .retry_on_initial_connect()
            .connect(url)
            .await
            .expect("connect to a cluster node");
        let mut messages = direct.subscribe("load.>").await.expect("subscribe");
        crate::support::nats_round_trip(&direct).await;
        publishers.push(direct.clone());
        let received = received.clone();
        subscribers.push(tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let text = String::from_utf8_lossy(&message.payload).to_string();
                if message.subject.as_str() == "load.ready" {
                    if let (Ok(from), Ok(mut received)) = (text.parse(), received.lock()) {
                        received.ready.insert((node, from));
                    }
                    continue;
                }
                let Some((class, index)) = text.split_once(':') else {
                    continue;
                };
                let Ok(index) = index.parse::<u64>() else {
                    continue;
                };
                if let Ok(mut received) = received.lock() {
                    received
                        .per_node
                        .entry((node, class.to_string()))
                        .or_default()
                        .push(index);
                }
            }
            drop(direct);
        }));
    }
    // The subscriptions have reached every node of the cluster once each
    // subscriber hears what is published on every node.
    let nodes = publishers.len();
    wait_until_async("every subscription known on every node", || async {
        for (from, publisher) in publishers.iter().enumerate() {
            let _ = publisher
                .publish("load.ready", from.to_string().into())
                .await;
            let _ = publisher.flush().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        received.lock().expect("received").ready.len() == nodes * nodes
    })
    .await;
    drop(publishers);

    let publishing = Arc::new(AtomicBool::new(true));
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let load = {
        let client = client.clone();
        let publishing = publishing.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut index = 0u64;
            while publishing.load(Ordering::Relaxed) {
                for (class, subject) in [("kv_events", "load.kv"), ("default", "load.spill")] {
                    let message =
                        OutboundMessage::new(subject, format!("{class}:{index}")).class(class);
                    let ack = client
                        .publish_with_ack(message)
                        .await
                        .expect("publish")
                        .await
                        .expect("ack");
                    assert!(
                        matches!(
                            ack.outcome,
                            AckStatus::Forwarded | AckStatus::Journaled | AckStatus::Queued
                        ),
                        "{ack:?}"
                    );
                    if let Ok(mut acked) = acked.lock() {
                        acked.insert(class.to_string(), index + 1);
                    }
                }
                index += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let mut killed_nodes = Vec::new();
    // Load flows through each node before it dies, and through the node
    // the relay moved to before the dead one returns.
    let load_flows = || async {
        let mark = fewest_acked(&acked);
        wait_until_async("more of the load acknowledged", || async {
            fewest_acked(&acked) >= mark + 20
        })
        .await;
    };
    for round in 0..2 {
        load_flows().await;
        let in_use = relay.status()["nats"]["server"]
            .as_str()
            .map(str::to_string)
            .expect("the relay is connected");
        let node = cluster.member_at(&in_use).expect("a cluster node");
        cluster.servers[node].kill();
        let killed = Instant::now();
        let moved = within("the relay on another node", async {
            loop {
                let status = relay.status();
                let now_on = status["nats"]["server"].as_str().map(str::to_string);
                if status["nats"]["status"] == "up"
                    && now_on.is_some()
                    && now_on != Some(in_use.clone())
                {
                    return killed.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        eprintln!("round {round}: killed node {node}, relay on another node after {moved:?}");
        assert!(moved < Duration::from_secs(2), "took {moved:?}");
        killed_nodes.push(node);
        load_flows().await;
        // Back in the cluster before the next node dies.
        cluster.servers[node].start_again();
        cluster.wait_for_routes();
    }
    publishing.store(false, Ordering::Relaxed);
    load.await.expect("the load ran to the end");

    // Every acknowledged message reached the cluster, in order per class.
    let acked = acked.lock().map(|acked| acked.clone()).unwrap_or_default();
    eprintln!("acknowledged per class: {acked:?}");
    let deadline = Instant::now() + WAIT;
    loop {
        let complete = {
            let received = received.lock().expect("received");
            acked.iter().all(|(class, count)| {
                let mut union: Vec<u64> = received
                    .per_node
                    .iter()
                    .filter(|((_, seen_class), _)| seen_class == class)
                    .flat_map(|(_, indexes)| indexes.iter().copied())
                    .collect();
                union.sort_unstable();
                union.dedup();
                union.len() as u64 >= *count
            })
        };
        if complete {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged messages missing; acked {acked:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = received.lock().expect("received");
    for ((node, class), indexes) in &received.per_node {
        // A message resent after the connection broke may arrive twice;
        // first arrivals are in order.
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<u64> = indexes
            .iter()
            .copied()
            .filter(|index| seen.insert(*index))
            .collect();
        assert!(
            firsts.windows(2).all(|pair| pair[0] < pair[1]),
            "node {node}, class {class}: out of order"
        );
    }
    for subscriber in subscribers {
        subscriber.abort();
    }
    assert!(
        relay.logs().matches("connected to NATS").count() >= 3,
        "{}",
        relay.logs()
    );
    assert!(!relay.logs().contains(&fixture.user_seed));
    let (_, status) = relay.http_get("/status");
    assert!(!status.contains(&fixture.user_seed));
    drop(killed_nodes);
}
