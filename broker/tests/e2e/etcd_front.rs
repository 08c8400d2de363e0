//! The etcd v3 front end (`relay.etcd_listen`) against real etcd: the Rust
//! etcd-client and etcdctl talk to the relay as to etcd, and get leases
//! that live as long as the client keeps them alive, through an etcd
//! outage, an empty etcd and a relay restart.

use crate::support::{free_port, within, EtcdServer, NatsServer, Relay, WAIT};
use crate::waiting::{lease_gone, lease_renewed, lease_ttl};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// etcd, NATS and a relay whose etcd front end listens on `port`.
struct FrontStack {
    etcd: EtcdServer,
    _nats: NatsServer,
    relay: Relay,
    port: u16,
}

impl FrontStack {
    fn start(etcd_extra: &str) -> FrontStack {
        let etcd = EtcdServer::start();
        let nats = NatsServer::start();
        let port = free_port();
        let config = format!(
            "[relay]\netcd_listen = \"127.0.0.1:{port}\"\n\n{}",
            etcd.relay_config(etcd_extra)
        );
        let relay = Relay::start_with_config(&nats.url(), &config);
        FrontStack {
            etcd,
            _nats: nats,
            relay,
            port,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An unmodified etcd client pointed at the relay.
    async fn front(&self) -> Client {
        Client::connect([self.endpoint()], None)
            .await
            .expect("connect to the etcd front end")
    }
}

async fn value_in(client: &mut Client, key: &str, options: Option<GetOptions>) -> Option<String> {
    let found = client.get(key, options).await.ok()?;
    found
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// Waits until etcd itself holds `expected` under `key` (None: absent).
async fn wait_in_etcd(etcd: &mut Client, key: &str, expected: Option<&str>, limit: Duration) {
    let started = Instant::now();
    loop {
        let found = value_in(etcd, key, None).await;
        if found.as_deref() == expected {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{key} is {found:?} in etcd after {limit:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn create_if_absent(key: &str, value: &str, lease: i64) -> Txn {
    Txn::new()
        .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then(vec![TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else(vec![TxnOp::get(key, None)])
}

/// Keeps `lease` alive through the front end every `every` until dropped.
fn keep_alive(mut client: Client, lease: i64, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok((mut keeper, mut answers)) = client.lease_keep_alive(lease).await {
                loop {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(2), answers.message()).await {
                        Ok(Ok(Some(answer))) => assert!(answer.ttl() > 0, "lease {lease:x} lost"),
                        _ => break,
                    }
                    tokio::time::sleep(every).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_txn_watch_and_leases_through_the_front_end() {
    let stack = FrontStack::start("");
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;

    let granted = front.lease_grant(30, None).await.unwrap();
    let lease = granted.id();
    assert!(lease > 0);
    assert_eq!(granted.ttl(), 30);
    let key = format!("v1/instances/ns/worker/generate/{lease:x}");

    // A watch on the prefix, opened before anything is written.
    let mut events = front
        .watch("v1/instances/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();

    // Create-if-absent, as the Dynamo runtime registers an instance.
    let created = front
        .txn(create_if_absent(&key, "{\"port\":9000}", lease))
        .await
        .unwrap();
    assert!(created.succeeded());
    wait_in_etcd(&mut etcd, &key, Some("{\"port\":9000}"), WAIT).await;
    let upstream = etcd.get(key.as_str(), None).await.unwrap();
    assert_ne!(
        upstream.kvs()[0].lease(),
        0,
        "held under a relay-kept lease"
    );
    let again = front
        .txn(create_if_absent(&key, "other", lease))
        .await
        .unwrap();
    assert!(!again.succeeded(), "the key exists");
    match again.op_responses().first() {
        Some(TxnOpResponse::Get(read)) => assert_eq!(read.kvs()[0].value(), b"{\"port\":9000}"),
        other => panic!("expected the failure branch's read, got {other:?}"),
    }

    // Reads: serializable from the cache, linearizable from etcd.
    let serializable = front
        .get(
            "v1/instances/",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(serializable.kvs().len(), 1);
    assert_eq!(serializable.kvs()[0].lease(), lease);
    assert!(serializable.header().unwrap().revision() > 0);
    assert_eq!(
        value_in(&mut front, &key, None).await.as_deref(),
        Some("{\"port\":9000}")
    );

    // The watch sees the put, a put straight into etcd, and a delete.
    let mut seen = Vec::new();
    etcd.put("v1/instances/direct", "d", None).await.unwrap();
    front.delete(key.as_str(), None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 3 {
        assert!(Instant::now() < deadline, "watch saw only {seen:?}");
        let Ok(Ok(Some(response))) =
            tokio::time::timeout(Duration::from_secs(5), events.message()).await
        else {
            panic!("watch ended; saw {seen:?}");
        };
        for event in response.events() {
            let kv = event.kv().unwrap();
            seen.push((event.event_type(), kv.key_str().unwrap().to_string()));
        }
    }
    assert_eq!(seen[0], (EventType::Put, key.clone()));
    assert!(seen.contains(&(EventType::Put, "v1/instances/direct".to_string())));
    assert!(seen.contains(&(EventType::Delete, key.clone())));
    wait_in_etcd(&mut etcd, &key, None, WAIT).await;

    // A put without a lease goes to etcd as it is.
    front.put("v1/config/plain", "p", None).await.unwrap();
    assert_eq!(
        value_in(&mut etcd, "v1/config/plain", None)
            .await
            .as_deref(),
        Some("p")
    );

    // Lease RPCs answer from the relay's table.
    let (mut keeper, mut answers) = front.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().ttl(), 30);
    let alive = front.lease_time_to_live(lease, None).await.unwrap();
    assert!(alive.ttl() > 25 && alive.ttl() <= 30);
    let all = front.leases().await.unwrap();
    assert!(all.leases().iter().any(|status| status.id() == lease));
    front.lease_revoke(lease).await.unwrap();
    assert_eq!(
        front.lease_time_to_live(lease, None).await.unwrap().ttl(),
        -1
    );

    // Unserved RPCs are named.
    let status = front.status().await.unwrap_err().to_string();
    assert!(
        status.contains("Maintenance/Status") && status.contains("not implemented"),
        "{status}"
    );

    let metrics = crate::support::scrape(&stack.relay);
    assert!(
        crate::support::metric(
            &metrics,
            "holdfast_etcd_front_requests_total",
            &[("rpc", "txn"), ("outcome", "ok")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_the_clients_request_half() {
    // etcd-client closes the request half when the caller drops its
    // watcher handle and keeps only the events (the Dynamo runtime does);
    // etcd keeps the watches, so the relay must too.
    let stack = FrontStack::start("");
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;
    let lease = front.lease_grant(30, None).await.unwrap().id();
    let watch = front
        .watch("v1/halfclosed/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let (requests, mut events) = watch.split();
    drop(requests);
    // Let the half-close reach the relay before anything is written.
    tokio::time::sleep(Duration::from_millis(300)).await;

    etcd.put("v1/halfclosed/direct", "d", None).await.unwrap();
    front
        .put(
            "v1/halfclosed/front",
            "f",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "watch saw only {seen:?}");
        let response = match tokio::time::timeout(Duration::from_secs(5), events.message()).await {
            Ok(Ok(Some(response))) => response,
            other => panic!("watch ended ({other:?}); saw {seen:?}"),
        };
        for event in response.events() {
            let kv = event.kv().unwrap();
            seen.push((event.event_type(), kv.key_str().unwrap().to_string()));
        }
    }
    assert!(seen.contains(&(EventType::Put, "v1/halfclosed/direct".to_string())));
    assert!(seen.contains(&(EventType::Put, "v1/halfclosed/front".to_string())));
    // Still open: nothing more arrives, and it does not end either.
    match tokio::time::timeout(Duration::from_millis(500), events.message()).await {
        Err(_) => {}
        Ok(other) => panic!("the watch stream should stay open, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_start_revision_skips_keys_changed_before_it() {
    let stack = FrontStack::start("");
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;
    let old = etcd.put("v1/rev/old", "o", None).await.unwrap();
    let old_revision = old.header().unwrap().revision();
    let new = etcd.put("v1/rev/new", "n", None).await.unwrap();
    let start = new.header().unwrap().revision();
    assert!(start > old_revision);
    // The cache holds the prefix (and has passed `start`) before the watch.
    let cached = front
        .get(
            "v1/rev/",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(cached.kvs().len(), 2);

    let mut events = front
        .watch(
            "v1/rev/",
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        )
        .await
        .unwrap();
    etcd.put("v1/rev/later", "l", None).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !seen.iter().any(|(key, _)| key == "v1/rev/later") {
        assert!(Instant::now() < deadline, "watch saw only {seen:?}");
        let response = match tokio::time::timeout(Duration::from_secs(5), events.message()).await {
            Ok(Ok(Some(response))) => response,
            other => panic!("watch ended ({other:?}); saw {seen:?}"),
        };
        for event in response.events() {
            let kv = event.kv().unwrap();
            seen.push((kv.key_str().unwrap().to_string(), kv.mod_revision()));
        }
    }
    assert!(
        !seen.iter().any(|(key, _)| key == "v1/rev/old"),
        "a key last changed before the start revision is not replayed: {seen:?}"
    );
    assert!(
        seen.contains(&("v1/rev/new".to_string(), start)),
        "replayed with its own revision: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_kept_alive_or_revoked_takes_its_keys_out_of_etcd() {
    let stack = FrontStack::start("");
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;

    let lapsing = front.lease_grant(2, None).await.unwrap().id();
    front
        .put(
            "v1/lapse/a",
            "1",
            Some(PutOptions::new().with_lease(lapsing)),
        )
        .await
        .unwrap();
    let revoked = front.lease_grant(60, None).await.unwrap().id();
    front
        .put(
            "v1/lapse/b",
            "2",
            Some(PutOptions::new().with_lease(revoked)),
        )
        .await
        .unwrap();
    wait_in_etcd(&mut etcd, "v1/lapse/a", Some("1"), WAIT).await;
    wait_in_etcd(&mut etcd, "v1/lapse/b", Some("2"), WAIT).await;

    // Revoked: gone at once.
    let started = Instant::now();
    front.lease_revoke(revoked).await.unwrap();
    wait_in_etcd(&mut etcd, "v1/lapse/b", None, Duration::from_secs(2)).await;
    eprintln!("revoked lease's key gone after {:?}", started.elapsed());

    // Not kept alive: gone once its 2 s TTL passes, not before.
    assert_eq!(
        value_in(&mut etcd, "v1/lapse/a", None).await.as_deref(),
        Some("1")
    );
    wait_in_etcd(&mut etcd, "v1/lapse/a", None, Duration::from_secs(5)).await;
    // The relay answers TTL 0, which etcd-client reports as the lease gone.
    let kept = match front.lease_keep_alive(lapsing).await {
        Ok((mut keeper, mut answers)) => match keeper.keep_alive().await {
            Ok(()) => answers.message().await.map(|_| ()),
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    assert!(
        matches!(kept, Err(etcd_client::Error::LeaseKeepAliveError(_))),
        "{kept:?}"
    );
    assert!(
        front
            .put(
                "v1/lapse/c",
                "3",
                Some(PutOptions::new().with_lease(lapsing))
            )
            .await
            .is_err(),
        "an expired lease cannot be written under"
    );
}

/// Grants `ttl` through etcdctl, puts `key` under it and returns the id.
fn etcdctl_lease_with_key(etcdctl: &Path, endpoint: &str, ttl: &str, key: &str) -> String {
    let granted = etcdctl_run(etcdctl, endpoint, &["lease", "grant", ttl]);
    let lease = granted
        .split_whitespace()
        .nth(1)
        .expect("a lease id")
        .to_string();
    etcdctl_run(etcdctl, endpoint, &["put", "--lease", &lease, key, "up"]);
    lease
}

fn etcdctl_run(etcdctl: &Path, endpoint: &str, args: &[&str]) -> String {
    let output = Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        output.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn connection_lost_count(relay: &crate::support::Relay) -> f64 {
    ended_count(relay, "connection_lost")
}

/// Relay leases ended for `reason`.
fn ended_count(relay: &crate::support::Relay, reason: &str) -> f64 {
    crate::support::metric(
        &crate::support::scrape(relay),
        "holdfast_etcd_front_leases_ended_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// The upstream lease etcd itself holds `key` under.
async fn upstream_lease(etcd: &mut Client, key: &str) -> i64 {
    let found = etcd.get(key, None).await.unwrap();
    let lease = found.kvs().first().map(|kv| kv.lease()).unwrap_or(0);
    assert_ne!(lease, 0, "{key} is in etcd under a lease");
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_etcdctl_keepalive_takes_its_keys_out_of_etcd_within_2s() {
    let Ok(etcdctl) = which("etcdctl") else {
        eprintln!("etcdctl not on PATH; skipped (deploy/install-deps.sh installs it)");
        return;
    };
    let stack = FrontStack::start("");
    let endpoint = stack.endpoint();
    let mut etcd = stack.etcd.client().await;
    let lease = tokio::task::block_in_place(|| {
        etcdctl_lease_with_key(&etcdctl, &endpoint, "5", "v1/killed/ctl")
    });
    wait_in_etcd(&mut etcd, "v1/killed/ctl", Some("up"), WAIT).await;

    let mut keeper = Command::new(&etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["lease", "keep-alive", &lease])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcdctl lease keep-alive");
    // "lease 694d7c5b1e0e4f0a keepalived with TTL(5)", every TTL/3: twice
    // makes the stream a long-lived keeper rather than a one-shot renewal.
    let stdout = keeper.stdout.take().expect("piped stdout");
    let lines = tokio::task::block_in_place(|| {
        let mut reader = BufReader::new(stdout);
        let mut lines = String::new();
        for _ in 0..2 {
            let _ = reader.read_line(&mut lines);
        }
        lines
    });
    assert_eq!(lines.matches("keepalived").count(), 2, "{lines:?}");

    keeper.kill().expect("SIGKILL etcdctl");
    let _ = keeper.wait();
    let killed = Instant::now();
    // Well inside the 5 s TTL just renewed.
    wait_in_etcd(&mut etcd, "v1/killed/ctl", None, Duration::from_secs(2)).await;
    eprintln!("killed keeper's key gone after {:?}", killed.elapsed());
    assert!(connection_lost_count(&stack.relay) >= 1.0);
    assert!(
        stack.relay.logs().contains("lease keepalive stream broke"),
        "the revocation is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rust_client_takes_its_keys_out_of_etcd_within_2s() {
    // The Dynamo runtime's pattern: one keepalive stream for the life of
    // the process. Its own runtime, shut down at once, drops the
    // connection as a kill -9 does.
    let stack = FrontStack::start("");
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;
    let lease = front.lease_grant(30, None).await.unwrap().id();
    front
        .put(
            "v1/killed/rust",
            "up",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    wait_in_etcd(&mut etcd, "v1/killed/rust", Some("up"), WAIT).await;

    let endpoint = stack.endpoint();
    let worker = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (kept, was_kept) = tokio::sync::oneshot::channel();
    worker.spawn(async move {
        let mut client = Client::connect([endpoint], None).await.unwrap();
        // Opening the stream renews the lease once, this renews it again:
        // a stream that renewed twice is a long-lived keeper to the relay,
        // not a one-shot renewal (etcdctl keep-alive --once) whose process
        // exited, so breaking it ends its leases.
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.unwrap();
        keeper.keep_alive().await.unwrap();
        let _ = answers.message().await.unwrap();
        let _ = kept.send(());
        std::future::pending::<()>().await;
        drop((client, keeper, answers));
    });
    was_kept.await.unwrap();
    worker.shutdown_background();
    let killed = Instant::now();
    wait_in_etcd(&mut etcd, "v1/killed/rust", None, Duration::from_secs(2)).await;
    eprintln!("killed client's key gone after {:?}", killed.elapsed());
    assert_eq!(
        front.lease_time_to_live(lease, None).await.unwrap().ttl(),
        -1,
        "the lease is gone"
    );
    assert!(connection_lost_count(&stack.relay) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_stream_the_client_ends_leaves_the_lease_to_its_ttl() {
    let stack = FrontStack::start("");
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;
    let lease = front.lease_grant(3, None).await.unwrap().id();
    front
        .put(
            "v1/ended/a",
            "up",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();

    // The client closes its sending half, then drops the answers too.
    let (mut keeper, mut answers) = front.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let _ = answers.message().await.unwrap();
    drop(keeper);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(answers);
    // A keepalive stream canceled as soon as it is answered (etcdctl's
    // `lease keep-alive --once`, clientv3's KeepAliveOnce).
    if let Ok(etcdctl) = which("etcdctl") {
        let endpoint = stack.endpoint();
        let hex = format!("{lease:x}");
        let once = tokio::task::block_in_place(|| {
            etcdctl_run(
                &etcdctl,
                &endpoint,
                &["lease", "keep-alive", "--once", &hex],
            )
        });
        assert!(once.contains("TTL(3)"), "{once}");
    }
    let ended = Instant::now();
    assert_eq!(
        value_in(&mut etcd, "v1/ended/a", None).await.as_deref(),
        Some("up"),
        "the lease lives on its TTL"
    );
    assert!(front.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
    // Then the TTL passes, and the lease ends by expiring, not with its
    // stream: well after the stream ended (about 3 s, not at once).
    wait_in_etcd(&mut etcd, "v1/ended/a", None, Duration::from_secs(6)).await;
    let gone_after = ended.elapsed();
    eprintln!("the ended stream's key gone after {gone_after:?}");
    assert!(gone_after > Duration::from_millis(1500), "{gone_after:?}");
    assert_eq!(ended_count(&stack.relay, "expired"), 1.0);
    assert_eq!(connection_lost_count(&stack.relay), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_reads_and_registrations_carry_on_through_an_etcd_outage() {
    let mut stack = FrontStack::start("");
    let mut front = stack.front().await;
    let lease = front.lease_grant(3, None).await.unwrap().id();
    let keeper = keep_alive(stack.front().await, lease, Duration::from_millis(500));
    front
        .put(
            "v1/out/before",
            "b",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let serializable = || Some(GetOptions::new().with_prefix().with_serializable());
    let cached = front.get("v1/out/", serializable()).await.unwrap();
    assert_eq!(cached.kvs().len(), 1);

    stack.etcd.kill();
    // The front end notices: a linearizable read fails Unavailable.
    let deadline = Instant::now() + WAIT;
    loop {
        match front.get("v1/out/before", None).await {
            Err(etcd_client::Error::GRpcStatus(status))
                if status.code() == tonic::Code::Unavailable =>
            {
                break
            }
            other => assert!(Instant::now() < deadline, "still answered: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The relay's own account of the lease's remaining TTL shows it renewed
    // during the outage, twice: it lives because it is kept alive.
    let renewed = lease_renewed(
        "the front end lease during the etcd outage",
        || {
            let mut reader = front.clone();
            async move { lease_ttl(&mut reader, lease).await }
        },
        2,
    )
    .await;
    eprintln!("lease renewed twice within {renewed:?} during the outage");
    let stale = front.get("v1/out/", serializable()).await.unwrap();
    assert_eq!(stale.kvs().len(), 1, "answered from the cache");
    // Registrations made now are buffered.
    front
        .put(
            "v1/out/during",
            "d",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let created = front
        .txn(create_if_absent("v1/out/created", "c", lease))
        .await
        .unwrap();
    assert!(created.succeeded());
    let own = front.get("v1/out/", serializable()).await.unwrap();
    assert_eq!(own.kvs().len(), 3, "the relay's own keys show in its reads");

    stack.etcd.start_again();
    let mut etcd = stack.etcd.client().await;
    for (key, value) in [
        ("v1/out/before", "b"),
        ("v1/out/during", "d"),
        ("v1/out/created", "c"),
    ] {
        wait_in_etcd(&mut etcd, key, Some(value), WAIT).await;
    }
    keeper.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_the_registry_refuses_is_not_read_back() {
    let stack = FrontStack::start("max_registrations = 2\n");
    let mut front = stack.front().await;
    let lease = front.lease_grant(30, None).await.unwrap().id();
    let leased = || Some(PutOptions::new().with_lease(lease));
    front.put("v1/full/a", "a", leased()).await.unwrap();
    front.put("v1/full/b", "b", leased()).await.unwrap();
    match front.put("v1/full/c", "c", leased()).await {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        }
        other => panic!("a third registration was not refused: {other:?}"),
    }
    let serializable = Some(GetOptions::new().with_prefix().with_serializable());
    let read = front.get("v1/full/", serializable).await.unwrap();
    let keys: Vec<&str> = read.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["v1/full/a", "v1/full/b"]);
    // An update of a key already held is not a new registration.
    front.put("v1/full/a", "a2", leased()).await.unwrap();
    let mut etcd = stack.etcd.client().await;
    wait_in_etcd(&mut etcd, "v1/full/a", Some("a2"), WAIT).await;
    assert_eq!(value_in(&mut etcd, "v1/full/c", None).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_back_after_etcd_restarts_empty() {
    let mut stack = FrontStack::start("");
    let mut front = stack.front().await;
    let lease = front.lease_grant(5, None).await.unwrap().id();
    let keeper = keep_alive(stack.front().await, lease, Duration::from_secs(1));
    front
        .put("v1/empty/a", "1", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    stack.etcd.restart_empty();
    let mut etcd = stack.etcd.client().await;
    // Rebuilt within a reconcile interval (2 s in tests) of etcd's return.
    wait_in_etcd(&mut etcd, "v1/empty/a", Some("1"), WAIT).await;
    keeper.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_within_the_ttl_keeps_leases_and_keys() {
    // Short upstream leases: the killed relay's run out quickly, so the
    // keys staying proves the restarted relay registered them again.
    let mut stack = FrontStack::start("lease_ttl = \"2s\"");
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;
    let lease = front.lease_grant(30, None).await.unwrap().id();
    front
        .put(
            "v1/restart/a",
            "1",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    wait_in_etcd(&mut etcd, "v1/restart/a", Some("1"), WAIT).await;

    // A clean stop with a keepalive stream and a watch open ends both and
    // saves the table; then a start after a SIGKILL-style gap.
    let (_keeper, _answers) = front.lease_keep_alive(lease).await.unwrap();
    let _watch = front
        .watch("v1/restart/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let first_upstream = upstream_lease(&mut etcd, "v1/restart/a").await;
    let status = tokio::task::block_in_place(|| stack.relay.terminate());
    assert!(status.success(), "holdfastd exited with {status:?}");
    stack.relay.restart();
    // The stopped relay's upstream lease runs out (etcd's clock); the key
    // outlives it only if the restarted relay registered it again.
    lease_gone(&mut etcd, first_upstream).await;
    let mut front = stack.front().await;
    let alive = front.lease_time_to_live(lease, None).await.unwrap();
    assert!(alive.ttl() > 0, "the lease survived the restart");
    let (mut keeper, mut answers) = front.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().ttl(), 30);
    assert_eq!(
        value_in(&mut etcd, "v1/restart/a", None).await.as_deref(),
        Some("1"),
        "registered again under the new relay"
    );
    let second_upstream = upstream_lease(&mut etcd, "v1/restart/a").await;
    assert_ne!(second_upstream, first_upstream);

    // SIGKILL right after an acknowledged put: the table was saved before
    // the answer, so the key is registered again too.
    front
        .put(
            "v1/restart/b",
            "2",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    stack.relay.restart();
    lease_gone(&mut etcd, second_upstream).await;
    let mut front = stack.front().await;
    assert!(front.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
    for (key, value) in [("v1/restart/a", "1"), ("v1/restart/b", "2")] {
        assert_eq!(
            value_in(&mut etcd, key, None).await.as_deref(),
            Some(value),
            "{key} registered again after SIGKILL"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_grants_puts_and_gets_through_the_front_end() {
    let Ok(etcdctl) = which("etcdctl") else {
        eprintln!("etcdctl not on PATH; skipped (deploy/install-deps.sh installs it)");
        return;
    };
    let stack = FrontStack::start("");
    let endpoint = stack.endpoint();
    let run = |args: &[&str]| -> String {
        let output = Command::new(&etcdctl)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            output.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // "lease 694d7c5b1e0e4f0a granted with TTL(30s)"
    let granted = tokio::task::block_in_place(|| run(&["lease", "grant", "30"]));
    let lease = granted
        .split_whitespace()
        .nth(1)
        .expect("a lease id")
        .to_string();
    tokio::task::block_in_place(|| {
        run(&["put", "--lease", &lease, "v1/ctl/a", "hello"]);
        let got = run(&["get", "v1/ctl/a"]);
        assert_eq!(got, "v1/ctl/a\nhello\n");
        let serial = run(&["get", "--consistency=s", "--prefix", "v1/ctl/"]);
        assert_eq!(serial, "v1/ctl/a\nhello\n");
        let ttl = run(&["lease", "timetolive", "--keys", &lease]);
        assert!(ttl.contains("v1/ctl/a"), "{ttl}");
        let keepalive = run(&["lease", "keep-alive", "--once", &lease]);
        assert!(keepalive.contains("TTL(30)"), "{keepalive}");
    });
    let mut etcd = stack.etcd.client().await;
    wait_in_etcd(&mut etcd, "v1/ctl/a", Some("hello"), WAIT).await;
    tokio::task::block_in_place(|| run(&["lease", "revoke", &lease]));
    wait_in_etcd(&mut etcd, "v1/ctl/a", None, WAIT).await;
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or(())
}

/// Runs etcdctl against `endpoint`, expecting it to fail; returns its stderr.
fn etcdctl_refused(etcdctl: &Path, endpoint: &str, args: &[&str]) -> String {
    let output = Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "etcdctl {args:?} succeeded: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_end_applies_the_access_default_to_writes() {
    let Ok(etcdctl) = which("etcdctl") else {
        eprintln!("etcdctl not on PATH; skipped (deploy/install-deps.sh installs it)");
        return;
    };
    // This process's user may register through the socket; TCP on
    // loopback proves no identity, so the front end gets the default.
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let etcd = EtcdServer::start();
    let nats = NatsServer::start();
    let port = free_port();
    let config = format!(
        "[relay]\netcd_listen = \"127.0.0.1:{port}\"\n\n{}\n\
         [access]\ndefault = \"deny\"\n[[access.rule]]\nuid = {uid}\nregister = [\"v1/\"]\n",
        etcd.relay_config("")
    );
    let relay = Relay::start_with_config(&nats.url(), &config);
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = holdfast_client::Client::connect(&relay.url())
        .await
        .unwrap();
    client.register("v1/instances/w", "worker").await.unwrap();
    let mut upstream = etcd.client().await;
    wait_in_etcd(&mut upstream, "v1/instances/w", Some("worker"), WAIT).await;

    tokio::task::block_in_place(|| {
        for args in [
            &["put", "bad/key", "v"][..],
            &["put", "v1/instances/w", "stolen"][..],
            &["del", "v1/instances/w"][..],
            &["del", "--prefix", "v1/"][..],
        ] {
            let refused = etcdctl_refused(&etcdctl, &endpoint, args);
            assert!(refused.contains("PermissionDenied"), "{args:?}: {refused}");
        }
        let granted = etcdctl_run(&etcdctl, &endpoint, &["lease", "grant", "30"]);
        let lease = granted.split_whitespace().nth(1).expect("a lease id");
        let refused = etcdctl_refused(
            &etcdctl,
            &endpoint,
            &["put", "--lease", lease, "v1/leased", "v"],
        );
        assert!(refused.contains("PermissionDenied"), "{refused}");
        // Reads stay open, as GET and WATCH do on the socket.
        assert_eq!(
            etcdctl_run(&etcdctl, &endpoint, &["get", "v1/instances/w"]),
            "v1/instances/w\nworker\n"
        );
    });
    // A transaction that writes is governed the same way.
    let mut front = Client::connect([endpoint.as_str()], None).await.unwrap();
    let txn = Txn::new().and_then(vec![TxnOp::delete("v1/instances/w", None)]);
    match front.txn(txn).await {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        }
        other => panic!("a deleting transaction was not refused: {other:?}"),
    }
    assert_eq!(value_in(&mut upstream, "bad/key", None).await, None);
    assert_eq!(value_in(&mut upstream, "v1/leased", None).await, None);
    assert_eq!(
        value_in(&mut upstream, "v1/instances/w", None)
            .await
            .as_deref(),
        Some("worker")
    );
    let metrics = crate::support::scrape(&relay);
    assert_eq!(
        crate::support::metric(
            &metrics,
            "holdfast_access_denied_total",
            &[("operation", "register")]
        ),
        Some(6.0),
        "{metrics}"
    );
    assert!(relay
        .logs()
        .contains("etcd front end: a write denied by the access rules"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_end_cannot_change_keys_another_session_or_lease_holds() {
    let Ok(etcdctl) = which("etcdctl") else {
        eprintln!("etcdctl not on PATH; skipped (deploy/install-deps.sh installs it)");
        return;
    };
    let stack = FrontStack::start("");
    let endpoint = stack.endpoint();
    let mut upstream = stack.etcd.client().await;
    let worker = holdfast_client::Client::connect(&stack.relay.url())
        .await
        .unwrap();
    worker.register("v1/instances/w", "worker").await.unwrap();
    wait_in_etcd(&mut upstream, "v1/instances/w", Some("worker"), WAIT).await;

    tokio::task::block_in_place(|| {
        let lease = etcdctl_lease_with_key(&etcdctl, &endpoint, "30", "v1/front/a");
        for args in [
            &["put", "v1/instances/w", "stolen"][..],
            &["put", "--lease", &lease, "v1/instances/w", "stolen"][..],
            &["del", "v1/instances/w"][..],
            &["del", "--prefix", "v1/instances/"][..],
        ] {
            let refused = etcdctl_refused(&etcdctl, &endpoint, args);
            assert!(
                refused.contains("FailedPrecondition") && refused.contains("held by"),
                "{args:?}: {refused}"
            );
        }
        // A key another relay lease holds does not move to a second one.
        let other = etcdctl_run(&etcdctl, &endpoint, &["lease", "grant", "30"]);
        let other = other.split_whitespace().nth(1).expect("a lease id");
        let refused = etcdctl_refused(
            &etcdctl,
            &endpoint,
            &["put", "--lease", other, "v1/front/a", "moved"],
        );
        assert!(refused.contains("FailedPrecondition"), "{refused}");
        // Its own lease may update it, and a delete through the front end
        // may remove it (front end clients share one identity).
        etcdctl_run(
            &etcdctl,
            &endpoint,
            &["put", "--lease", &lease, "v1/front/a", "updated"],
        );
    });
    let mut front = stack.front().await;
    let txn = Txn::new().and_then(vec![TxnOp::put("v1/instances/w", "stolen", None)]);
    match front.txn(txn).await {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        }
        other => panic!("a transaction over a held key was not refused: {other:?}"),
    }
    wait_in_etcd(&mut upstream, "v1/front/a", Some("updated"), WAIT).await;
    front.delete("v1/front/a", None).await.unwrap();
    wait_in_etcd(&mut upstream, "v1/front/a", None, WAIT).await;
    assert_eq!(
        value_in(&mut upstream, "v1/instances/w", None)
            .await
            .as_deref(),
        Some("worker")
    );
    // The worker's key is free once its session ends.
    worker.close().await.unwrap();
    wait_in_etcd(&mut upstream, "v1/instances/w", None, WAIT).await;
    front.put("v1/instances/w", "next", None).await.unwrap();
    let metrics = crate::support::scrape(&stack.relay);
    assert_eq!(
        crate::support::metric(&metrics, "holdfast_registration_conflicts_total", &[]),
        Some(6.0),
        "{metrics}"
    );
}

/// Reads the answer to a watch request: created, and canceled with a
/// reason containing `refused` unless that is empty.
async fn watch_answer(stream: &mut etcd_client::WatchStream, refused: &str) {
    let response = within("a watch answer", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(response.created(), "{response:?}");
    assert_eq!(response.canceled(), !refused.is_empty(), "{response:?}");
    assert!(response.cancel_reason().contains(refused), "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_holds_at_most_its_share_of_watches_and_prefixes() {
    let stack =
        FrontStack::start("max_cached_prefixes_per_session = 2\nmax_watches_per_session = 3\n");
    let mut front = stack.front().await;
    let prefix = || Some(WatchOptions::new().with_prefix());
    let mut stream = front.watch("v1/a/", prefix()).await.unwrap();
    watch_answer(&mut stream, "").await;
    stream.watch("v1/b/", prefix()).await.unwrap();
    watch_answer(&mut stream, "").await;
    stream.watch("v1/c/", prefix()).await.unwrap();
    watch_answer(&mut stream, "max_cached_prefixes_per_session").await;
    stream.watch("v1/a/x/", prefix()).await.unwrap();
    watch_answer(&mut stream, "").await;
    stream.watch("v1/a/y/", prefix()).await.unwrap();
    watch_answer(&mut stream, "max_watches_per_session").await;
}
