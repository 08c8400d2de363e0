//! Discovery through the relay against a real etcd: cached gets with their
//! revision and staleness, watches that converge across etcd restarts and
//! compaction, and a saved snapshot that outlives a relay restart.

use crate::support::{metric, scrape, wait_until_async, within, EtcdStack, WAIT};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_client::{Client, ConnectOptions, ErrorCode, WatchEvent, Watcher};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

async fn put(etcd: &mut etcd_client::Client, key: &str, value: &str) -> u64 {
    let answer = etcd.put(key, value, None).await.unwrap();
    answer.header().unwrap().revision() as u64
}

/// How many entries the relay's saved discovery cache (`path`) holds for
/// `prefix`; None while it has no such prefix (or no file yet).
fn saved_entries(path: &std::path::Path, prefix: &[u8]) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let file: serde_json::Value = serde_json::from_str(&text).ok()?;
    let wanted: Vec<serde_json::Value> = prefix.iter().map(|byte| (*byte).into()).collect();
    file["prefixes"]
        .as_array()?
        .iter()
        .find(|saved| saved["prefix"].as_array() == Some(&wanted))
        .and_then(|saved| saved["entries"].as_array())
        .map(Vec::len)
}

/// Applies watch events to a map until it equals `expected` (or `WAIT`).
async fn converge(
    watcher: &mut Watcher,
    state: &mut BTreeMap<Bytes, Bytes>,
    expected: &BTreeMap<Bytes, Bytes>,
    seen: &mut Vec<WatchEvent>,
) {
    let deadline = Instant::now() + WAIT;
    while state != expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(remaining, watcher.next())
            .await
            .unwrap_or_else(|_| panic!("watch state {state:?} never became {expected:?}"))
            .expect("watch ended");
        match &event {
            WatchEvent::Put { key, value, .. } => {
                state.insert(key.clone(), value.clone());
            }
            WatchEvent::Delete { key, .. } => {
                state.remove(key);
            }
            WatchEvent::Synced { .. } => {}
        }
        seen.push(event);
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<Bytes, Bytes> {
    pairs
        .iter()
        .map(|(key, value)| {
            (
                Bytes::copy_from_slice(key.as_bytes()),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_answers_from_the_cache_with_revision_and_a_watch_streams_changes() {
    let stack = EtcdStack::start_with_config("prefixes = [\"v1/instances/\"]");
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/instances/a", "1").await;
    let revision = put(&mut etcd, "v1/instances/b", "2").await;
    put(&mut etcd, "v1/other/c", "3").await;
    let client = stack.client().await;

    let mut watcher = client.watch("v1/instances/").await.unwrap();
    let mut state = BTreeMap::new();
    let mut seen = Vec::new();
    let expected = map(&[("v1/instances/a", "1"), ("v1/instances/b", "2")]);
    converge(&mut watcher, &mut state, &expected, &mut seen).await;

    let snapshot = client.get("v1/instances/").await.unwrap();
    assert!(!snapshot.stale);
    assert_eq!(snapshot.age, Duration::ZERO);
    assert!(
        snapshot.revision >= revision,
        "{} < {revision}",
        snapshot.revision
    );
    let keys: Vec<&[u8]> = snapshot.entries.iter().map(|e| e.key.as_ref()).collect();
    assert_eq!(keys, vec![&b"v1/instances/a"[..], b"v1/instances/b"]);
    // A narrower prefix is served from the same cache.
    let narrow = client.get("v1/instances/b").await.unwrap();
    assert_eq!(narrow.entries.len(), 1);

    put(&mut etcd, "v1/instances/c", "3").await;
    etcd.delete("v1/instances/a", None).await.unwrap();
    let expected = map(&[("v1/instances/b", "2"), ("v1/instances/c", "3")]);
    converge(&mut watcher, &mut state, &expected, &mut seen).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let snapshot = client.get("v1/instances/").await.unwrap();
        if snapshot.entries.len() == 2 && snapshot.entries[1].key.as_ref() == b"v1/instances/c" {
            break;
        }
        assert!(Instant::now() < deadline, "cache never saw the changes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = client.status().await.unwrap();
    assert_eq!(status["etcd"]["cached_prefixes"], 1);
    assert_eq!(status["etcd"]["watchers"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_gets_are_stale_linearizable_gets_fail_and_watches_resume() {
    let mut stack = EtcdStack::start();
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/out/a", "1").await;
    let client = stack.client().await;
    let fresh = client.get("v1/out/").await.unwrap();
    assert_eq!(fresh.entries.len(), 1);
    assert!(!fresh.stale);
    let mut watcher = client.watch("v1/out/").await.unwrap();
    let mut state = BTreeMap::new();
    let mut seen = Vec::new();
    converge(
        &mut watcher,
        &mut state,
        &map(&[("v1/out/a", "1")]),
        &mut seen,
    )
    .await;

    stack.etcd.kill();
    let deadline = Instant::now() + WAIT;
    let stale = loop {
        let snapshot = client.get("v1/out/").await.unwrap();
        if snapshot.stale {
            break snapshot;
        }
        assert!(Instant::now() < deadline, "the cache never turned stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        stale.entries.len(),
        1,
        "stale answers keep the last entries"
    );
    assert_eq!(stale.revision, fresh.revision);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let older = client.get("v1/out/").await.unwrap();
    assert!(
        older.age >= Duration::from_millis(300),
        "age {:?}",
        older.age
    );
    match client.get_linearizable("v1/out/").await {
        Err(error) => {
            assert_eq!(error.code(), Some(ErrorCode::EtcdUnavailable), "{error}");
            assert!(error.is_retryable());
        }
        Ok(snapshot) => panic!("a linearizable get answered during the outage: {snapshot:?}"),
    }
    // A prefix never cached has nothing to serve.
    let never = client.get("v1/never/").await.unwrap_err();
    assert_eq!(never.code(), Some(ErrorCode::EtcdUnavailable), "{never}");

    stack.etcd.start_again();
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/out/b", "2").await;
    // The watch stayed open and picks up what happened meanwhile.
    converge(
        &mut watcher,
        &mut state,
        &map(&[("v1/out/a", "1"), ("v1/out/b", "2")]),
        &mut seen,
    )
    .await;
    let back = client.get_linearizable("v1/out/").await.unwrap();
    assert_eq!(back.entries.len(), 2);
    assert!(!back.stale);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_during_an_outage_serves_the_saved_snapshot_stale() {
    let mut stack = EtcdStack::start();
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/saved/a", "1").await;
    put(&mut etcd, "v1/saved/b", "2").await;
    {
        let client = stack.client().await;
        assert_eq!(client.get("v1/saved/").await.unwrap().entries.len(), 2);
    }
    // Saved within a second of the change: in the file once it holds both
    // entries.
    let saved = stack.relay.data_dir().join("discovery-cache.json");
    wait_until_async("the snapshot saved", || async {
        saved_entries(&saved, b"v1/saved/") == Some(2)
    })
    .await;
    stack.etcd.kill();
    stack.relay.restart();
    let client = stack.client().await;
    let snapshot = within("a get after the restart", client.get("v1/saved/"))
        .await
        .unwrap();
    assert!(snapshot.stale);
    assert_eq!(snapshot.entries.len(), 2);
    assert_eq!(snapshot.entries[1].value.as_ref(), b"2");
    assert!(snapshot.revision > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_converge_across_an_etcd_restart_and_after_compaction() {
    let mut stack = EtcdStack::start();
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/w/a", "1").await;
    put(&mut etcd, "v1/w/gone", "1").await;
    // The relay is paused while etcd restarts, changes and compacts, so
    // the history it needs is gone when it reconnects; a long pong timeout
    // keeps the watcher's own connection through the pause.
    let url = stack.relay.url().parse().unwrap();
    let client =
        Client::connect_with(ConnectOptions::new(url).pong_timeout(Duration::from_secs(30)))
            .await
            .unwrap();
    let mut watcher = client.watch("v1/w/").await.unwrap();
    let mut state = BTreeMap::new();
    let mut seen = Vec::new();
    converge(
        &mut watcher,
        &mut state,
        &map(&[("v1/w/a", "1"), ("v1/w/gone", "1")]),
        &mut seen,
    )
    .await;

    // 1. etcd restarts with its data; changes made before the relay is
    //    back are delivered as events.
    stack.etcd.restart();
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/w/b", "2").await;
    put(&mut etcd, "v1/w/a", "3").await;
    converge(
        &mut watcher,
        &mut state,
        &map(&[("v1/w/a", "3"), ("v1/w/b", "2"), ("v1/w/gone", "1")]),
        &mut seen,
    )
    .await;

    // 2. The relay cannot follow while etcd changes and compacts.
    stack.relay.pause();
    stack.etcd.restart();
    let mut etcd = stack.etcd.client().await;
    etcd.delete("v1/w/gone", None).await.unwrap();
    put(&mut etcd, "v1/w/c", "4").await;
    let last = put(&mut etcd, "v1/w/b", "5").await;
    etcd.compact(last as i64, None).await.unwrap();
    stack.relay.resume();
    let expected = map(&[("v1/w/a", "3"), ("v1/w/b", "5"), ("v1/w/c", "4")]);
    converge(&mut watcher, &mut state, &expected, &mut seen).await;
    assert!(
        seen.iter().any(|event| matches!(
            event,
            WatchEvent::Delete { key, .. } if key.as_ref() == b"v1/w/gone"
        )),
        "the delete behind the compaction reached the watcher"
    );
    let snapshot = client.get("v1/w/").await.unwrap();
    assert_eq!(snapshot.entries.len(), 3);
    assert!(snapshot.revision >= last);
    // The operator can see that the relay had to re-list.
    let (_, metrics) = stack.relay.http_get("/metrics");
    let relists: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("holdfast_discovery_relists_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("relists metric");
    assert!(relists >= 1.0, "{relists}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_holds_at_most_its_limit_of_prefixes_and_never_drops_a_watched_one() {
    let stack = EtcdStack::start_with_config("max_cached_prefixes = 2");
    let client = stack.client().await;
    client.get("v1/a/").await.unwrap();
    client.get("v1/b/").await.unwrap();
    // A third prefix makes room by dropping the least recently used.
    client.get("v1/c/").await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status["etcd"]["cached_prefixes"], 2);
    // With both slots watched, a new prefix is refused, not served by
    // dropping a watch.
    let _b = client.watch("v1/b/").await.unwrap();
    let _c = client.watch("v1/c/").await.unwrap();
    let refused = client.get("v1/d/").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
    // A narrower prefix of a watched one is still served from its cache.
    client.get("v1/b/x").await.unwrap();
}

/// Writes `count` values of 100 KiB under `prefix` straight into etcd.
async fn fill(etcd: &mut etcd_client::Client, prefix: &str, count: usize) {
    let value = "v".repeat(100 * 1024);
    for index in 0..count {
        etcd.put(format!("{prefix}{index:03}"), value.clone(), None)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_larger_than_a_grpc_message_is_cached() {
    // 6 MiB: over gRPC's default 4 MiB message limit, which used to make
    // the listing fail (and be retried four times a second) forever.
    let stack = EtcdStack::start();
    let mut etcd = stack.etcd.client().await;
    fill(&mut etcd, "big/", 60).await;
    let client = stack.client().await;
    // The whole prefix is cached but is more than one frame (4 MiB) holds:
    // the GET is answered, not left waiting.
    let whole = within("the GET", client.get("big/")).await.unwrap_err();
    assert_eq!(whole.code(), Some(ErrorCode::LimitExceeded), "{whole}");
    assert!(whole.to_string().contains("narrower prefix"), "{whole}");
    // A narrower GET is served from it.
    let part = within("the narrower GET", client.get("big/00"))
        .await
        .unwrap();
    assert_eq!(part.entries.len(), 10);
    assert!(part
        .entries
        .iter()
        .all(|entry| entry.value.len() == 100 * 1024));
    let status = client.status().await.unwrap();
    assert_eq!(status["etcd"]["cached_prefixes"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_over_the_byte_budget_is_refused_and_a_narrower_one_is_served() {
    let stack = EtcdStack::start_with_config("max_cached_bytes = 1048576");
    let mut etcd = stack.etcd.client().await;
    // 4 MiB is more than etcd's answer may be at this budget (the listing
    // is refused as it arrives); 1.5 MiB arrives and is counted.
    fill(&mut etcd, "big/", 40).await;
    fill(&mut etcd, "mid/", 15).await;
    fill(&mut etcd, "grow/", 5).await;
    let client = stack.client().await;

    for prefix in ["big/", "mid/"] {
        let started = Instant::now();
        let refused = client.get(prefix).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
        assert!(
            refused.to_string().contains("etcd.max_cached_bytes"),
            "{refused}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused at once, not timed out"
        );
    }
    // Asked again at once: refused without listing 4 MiB again.
    let again = client.get("big/").await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::LimitExceeded), "{again}");
    let narrow = client.get("big/001").await.unwrap();
    assert_eq!(narrow.entries.len(), 1);

    // A watched prefix that outgrows the budget ends its watches with the
    // same error rather than holding more.
    let mut watcher = client.watch("grow/").await.unwrap();
    let mut events = 0;
    while !matches!(
        within("the initial entries", watcher.next()).await,
        Some(WatchEvent::Synced { .. })
    ) {
        events += 1;
    }
    assert_eq!(events, 5);
    fill(&mut etcd, "grow/more/", 10).await;
    while within("the end of the watch", watcher.next())
        .await
        .is_some()
    {}
    let ended = watcher.termination().expect("the relay ended the watch");
    assert_eq!(ended.code(), Some(ErrorCode::LimitExceeded), "{ended}");

    let metrics = scrape(&stack.relay);
    let refusals = metric(
        &metrics,
        "holdfast_limit_rejections_total",
        &[("limit", "discovery_cache_bytes")],
    );
    assert_eq!(refusals, Some(4.0), "three GETs and one watch");
    let cached = metric(&metrics, "holdfast_discovery_cache_bytes", &[]).unwrap();
    assert!(cached <= 1048576.0, "{cached}");
    assert!(stack.relay.logs().contains("does not fit the cache"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linearizable_get_counts_against_the_in_flight_limit() {
    let stack = EtcdStack::start_with_tables("", "[sessions]\nmax_inflight_requests = 1\n");
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/lin/a", "1").await;
    // A responder that never answers holds the connection's one slot.
    let direct = async_nats::connect(stack.nats.url()).await.unwrap();
    let _silent = direct.subscribe("lin.slow").await.unwrap();
    crate::support::nats_round_trip(&direct).await;
    let client = stack.client().await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .request_with("lin.slow", Default::default(), "q", Duration::from_secs(2))
                .await
        })
    };
    // Once the relay holds the request, a linearizable GET is refused.
    within("the relay holds the request", async {
        while client.status().await.unwrap()["counters"]["requests_total"] != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let refused = client.get_linearizable("v1/lin/").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
    // A cached GET is not held back by the limit.
    let cached = client.get("v1/lin/").await;
    if cached.is_err() {
        eprintln!("{}", stack.relay.logs());
    }
    assert_eq!(cached.unwrap().entries.len(), 1);
    within("the slow request ends", slow)
        .await
        .unwrap()
        .unwrap_err();
    let read = client.get_linearizable("v1/lin/").await.unwrap();
    assert_eq!(read.entries.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_watching_many_prefixes_cannot_take_the_cache_from_others() {
    // The default limits: 256 cached prefixes for the relay.
    let stack = EtcdStack::start();
    let greedy = stack.client().await;
    let watches = futures::future::join_all(
        (0..300).map(|index| greedy.watch(format!("v1/greedy/{index:03}/"))),
    )
    .await;
    let (kept, refused): (Vec<_>, Vec<_>) = watches.into_iter().partition(Result::is_ok);
    assert!(!kept.is_empty());
    for error in refused.iter().filter_map(|watch| watch.as_ref().err()) {
        assert_eq!(error.code(), Some(ErrorCode::LimitExceeded), "{error}");
        assert!(error.to_string().contains("per connection"), "{error}");
    }
    // Everyone else still gets answers for prefixes of their own.
    let other = stack.client().await;
    for index in 0..20 {
        let prefix = format!("v1/other/{index}/");
        within("another client's GET", other.get(prefix.clone()))
            .await
            .unwrap_or_else(|error| panic!("GET {prefix}: {error}"));
    }
    let mut watcher = other.watch("v1/other/watched/").await.unwrap();
    let mut etcd = stack.etcd.client().await;
    put(&mut etcd, "v1/other/watched/k", "v").await;
    loop {
        match within("the other client's watch", watcher.next()).await {
            Some(WatchEvent::Put { key, .. }) if key.as_ref() == b"v1/other/watched/k" => break,
            Some(_) => continue,
            None => panic!("watch ended"),
        }
    }
    let metrics = scrape(&stack.relay);
    assert_eq!(
        metric(
            &metrics,
            "holdfast_limit_rejections_total",
            &[("limit", "cached_prefixes_per_session")]
        ),
        Some(refused.len() as f64),
        "{metrics}"
    );
    assert!(stack
        .relay
        .logs()
        .contains("a watch refused: its connection's watches already hold"));
    drop(kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_watches_and_the_prefixes_they_hold_are_capped_as_configured() {
    let stack = EtcdStack::start_with_config(
        "max_cached_prefixes_per_session = 2\nmax_watches_per_session = 3",
    );
    let client = stack.client().await;
    let _one = client.watch("v1/a/").await.unwrap();
    let _two = client.watch("v1/b/").await.unwrap();
    let third = client.watch("v1/c/").await.unwrap_err();
    assert_eq!(third.code(), Some(ErrorCode::LimitExceeded), "{third}");
    assert!(
        third
            .to_string()
            .contains("max_cached_prefixes_per_session"),
        "{third}"
    );
    // Under a prefix its watches hold already, a watch costs no slot ...
    let _narrow = client.watch("v1/a/x/").await.unwrap();
    // ... but counts as a watch.
    let fourth = client.watch("v1/a/y/").await.unwrap_err();
    assert_eq!(fourth.code(), Some(ErrorCode::LimitExceeded), "{fourth}");
    assert!(
        fourth.to_string().contains("max_watches_per_session"),
        "{fourth}"
    );
    // Another connection has its own allowance.
    let other = stack.client().await;
    let _other = other.watch("v1/c/").await.unwrap();
    let metrics = scrape(&stack.relay);
    for (limit, count) in [("cached_prefixes_per_session", 1.0), ("watches", 1.0)] {
        assert_eq!(
            metric(
                &metrics,
                "holdfast_limit_rejections_total",
                &[("limit", limit)]
            ),
            Some(count),
            "{limit}: {metrics}"
        );
    }
}
