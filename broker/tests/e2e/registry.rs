//! Registrations through the relay against a real etcd: visible to any
//! etcd client, gone when their process dies, buffered through an etcd
//! outage and rebuilt when etcd comes back, even empty.

use crate::support::{wait_until_async, within, EtcdStack, WAIT};
use crate::waiting::{etcd_backoff_started, lease_gone, lease_renewed, lease_ttl};
use etcd_client::GetOptions;
use futures::StreamExt;
use holdfast_client::ErrorCode;
use holdfast_client::{Client, ConnectOptions, LinkStatus, RegistrationStatus};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a plain etcd client sees under `key`: the value and its lease.
pub(crate) async fn etcd_value(
    client: &mut etcd_client::Client,
    key: &str,
) -> Option<(String, i64)> {
    let found = client.get(key, None).await.ok()?;
    found
        .kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
}

pub(crate) async fn wait_for_value(
    etcd: &mut etcd_client::Client,
    key: &str,
    expected: Option<&str>,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let found = etcd_value(etcd, key).await;
        if found.as_ref().map(|(value, _)| value.as_str()) == expected {
            if let Some((_, lease)) = found {
                assert_ne!(lease, 0, "{key} must be attached to a lease");
            }
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{key} is {found:?} in etcd after {limit:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_etcd_status(client: &Client, status: LinkStatus) -> Duration {
    let started = Instant::now();
    wait_until_async("the client to see the etcd link change", || async {
        client.etcd_status() == status
    })
    .await;
    started.elapsed()
}

pub(crate) fn holdfast_cli() -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_holdfastd")).with_file_name("holdfast");
    assert!(
        path.exists(),
        "{} missing: build the workspace",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_is_in_etcd_under_a_lease_and_leaves_with_its_connection() {
    let stack = EtcdStack::start();
    let mut etcd = stack.etcd.client().await;
    let client = stack.client().await;
    let instance = client.instance_id();
    assert_ne!(instance, 0);
    let key = format!("v1/instances/ns/worker/generate/{instance:x}");
    let status = within("register", client.register(key.clone(), "{\"port\":9000}"))
        .await
        .unwrap();
    assert_eq!(status, RegistrationStatus::Applied);
    let (value, lease) = etcd_value(&mut etcd, &key).await.expect("key is in etcd");
    assert_eq!(value, "{\"port\":9000}");
    assert_ne!(lease, 0);

    // An update keeps the key, a deregistration removes it.
    client.register(key.clone(), "v2").await.unwrap();
    assert_eq!(etcd_value(&mut etcd, &key).await.unwrap().0, "v2");
    client.register("v1/other", "x").await.unwrap();
    assert_eq!(
        client.deregister("v1/other").await.unwrap(),
        RegistrationStatus::Applied
    );
    assert_eq!(etcd_value(&mut etcd, "v1/other").await, None);

    // The process goes away: its keys leave etcd at once, not after the TTL.
    drop(client);
    let gone_after = wait_for_value(&mut etcd, &key, None, Duration::from_secs(2)).await;
    eprintln!("key removed {gone_after:?} after the client closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_client_loses_its_registrations_after_the_liveness_timeout() {
    let stack = EtcdStack::start();
    let mut etcd = stack.etcd.client().await;
    let mut registrant = Command::new(holdfast_cli())
        .env("HOLDFAST_URL", stack.relay.url())
        .args(["register", "v1/instances/stopped", "alive"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_value(&mut etcd, "v1/instances/stopped", Some("alive"), WAIT).await;
    let pid = libc::pid_t::try_from(registrant.id()).unwrap();
    // SAFETY: kill(2) on the child we spawned and have not reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    // Default liveness_timeout is 1 s; a watcher must see the key go
    // within liveness_timeout + 1 s.
    wait_for_value(
        &mut etcd,
        "v1/instances/stopped",
        None,
        Duration::from_secs(2),
    )
    .await;
    let gone_after = stopped.elapsed();
    assert!(
        gone_after >= Duration::from_millis(900),
        "removed after {gone_after:?}: sooner than the liveness timeout"
    );
    eprintln!("stopped client's key removed after {gone_after:?}");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = registrant.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_buffers_changes_keeps_nats_flowing_and_reconciles_after() {
    let mut stack = EtcdStack::start();
    let client = stack.client().await;
    client.register("v1/outage/kept", "before").await.unwrap();
    client
        .register("v1/outage/dropped", "before")
        .await
        .unwrap();
    let mut subscriber = client.subscribe("outage.events").await.unwrap();

    stack.etcd.kill();
    let detected = wait_for_etcd_status(&client, LinkStatus::Down).await;
    eprintln!("etcd outage reported to the client after {detected:?}");

    assert_eq!(
        client.register("v1/outage/kept", "during").await.unwrap(),
        RegistrationStatus::Buffered
    );
    assert_eq!(
        client.register("v1/outage/new", "during").await.unwrap(),
        RegistrationStatus::Buffered
    );
    assert_eq!(
        client.deregister("v1/outage/dropped").await.unwrap(),
        RegistrationStatus::Buffered
    );
    // NATS traffic is unaffected while etcd is down.
    for n in 0..20 {
        client
            .publish("outage.events", format!("m{n}"))
            .await
            .unwrap();
    }
    for n in 0..20 {
        let message = within("pub/sub during the etcd outage", subscriber.next())
            .await
            .unwrap();
        assert_eq!(message.payload, format!("m{n}").as_bytes());
    }
    let (code, _) = stack.relay.http_get("/livez");
    assert_eq!(code, 200, "an etcd outage must not fail liveness");
    let status = client.status().await.unwrap();
    assert_eq!(status["etcd"]["status"], "down");
    assert!(status["etcd"]["pending_changes"].as_u64().unwrap() >= 3);

    // Down until the backoff has reached the reconnect cap (1 s in the test
    // config): from the probe interval (250 ms) it doubles to the cap by
    // the fourth delay, so the fifth delay is capped where, uncapped, it
    // would be 2 to 4 s. The relay must still be back within about one cap
    // of etcd returning.
    etcd_backoff_started(&stack.relay, 5).await;
    let starting = Instant::now();
    stack.etcd.start_again();
    let serving = Instant::now();
    wait_for_etcd_status(&client, LinkStatus::Up).await;
    eprintln!(
        "etcd took {:?} to start; the relay was back {:?} after it served",
        serving - starting,
        serving.elapsed()
    );
    // Uncapped, the fifth delay would be 2 to 4 s.
    assert!(
        serving.elapsed() < Duration::from_millis(1500),
        "reconnect took {:?} after etcd served; the backoff cap is 1 s",
        serving.elapsed()
    );

    let mut etcd = stack.etcd.client().await;
    // Within one reconcile interval (2 s in the test config).
    let limit = Duration::from_secs(2) + Duration::from_millis(500);
    wait_for_value(&mut etcd, "v1/outage/kept", Some("during"), limit).await;
    wait_for_value(&mut etcd, "v1/outage/new", Some("during"), limit).await;
    wait_for_value(&mut etcd, "v1/outage/dropped", None, limit).await;
    let status = client.status().await.unwrap();
    assert_eq!(status["etcd"]["pending_changes"], 0);
    assert_eq!(status["etcd"]["registrations"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_comes_back_empty_gets_every_registration_rebuilt() {
    let mut stack = EtcdStack::start();
    let first = stack.client().await;
    let second = stack.client().await;
    for n in 0..50 {
        first
            .register(format!("v1/rebuild/a/{n}"), format!("a{n}"))
            .await
            .unwrap();
    }
    second.register("v1/rebuild/b", "b").await.unwrap();
    let mut etcd = stack.etcd.client().await;
    let before = etcd
        .get("v1/rebuild/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(before.kvs().len(), 51);

    stack.etcd.restart_empty();
    let returned = Instant::now();
    let mut etcd = stack.etcd.client().await;
    let deadline = returned + Duration::from_secs(2) + Duration::from_secs(1);
    loop {
        let now = etcd
            .get("v1/rebuild/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        if now.kvs().len() == 51 {
            assert!(now.kvs().iter().all(|kv| kv.lease() != 0));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 51 keys rebuilt after {:?}",
            now.kvs().len(),
            returned.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "empty etcd rebuilt {:?} after it returned",
        returned.elapsed()
    );
    assert_eq!(
        etcd_value(&mut etcd, "v1/rebuild/a/7").await.unwrap().0,
        "a7"
    );
    // The rebuilt keys still follow their sessions.
    drop(second);
    wait_for_value(&mut etcd, "v1/rebuild/b", None, Duration::from_secs(2)).await;
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_changed_or_deleted_behind_the_relays_back_are_repaired() {
    let stack = EtcdStack::start();
    let client = stack.client().await;
    client.register("v1/repair/deleted", "mine").await.unwrap();
    client.register("v1/repair/changed", "mine").await.unwrap();
    let mut etcd = stack.etcd.client().await;
    etcd.delete("v1/repair/deleted", None).await.unwrap();
    etcd.put("v1/repair/changed", "theirs", None).await.unwrap();
    // The anti-entropy pass runs every reconcile_interval (2 s here).
    let limit = Duration::from_secs(2) * 2;
    wait_for_value(&mut etcd, "v1/repair/deleted", Some("mine"), limit).await;
    wait_for_value(&mut etcd, "v1/repair/changed", Some("mine"), limit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_etcd_is_detected_within_link_timeout_and_registrations_buffer() {
    let stack = EtcdStack::start();
    let url = stack.relay.url().parse().unwrap();
    let client =
        Client::connect_with(ConnectOptions::new(url).pong_timeout(Duration::from_secs(10)))
            .await
            .unwrap();
    client.register("v1/paused/before", "1").await.unwrap();
    stack.etcd.pause();
    let detected = wait_for_etcd_status(&client, LinkStatus::Down).await;
    eprintln!("stopped etcd reported after {detected:?}");
    // link_timeout (1 s in the test config) after the first probe that
    // went unanswered, sent within a probe interval (250 ms) of the stop;
    // the slack absorbs a loaded CI machine.
    assert!(detected < Duration::from_millis(1750), "took {detected:?}");
    let registered = within(
        "a registration while etcd is stopped is answered",
        client.register("v1/paused/during", "2"),
    )
    .await
    .unwrap();
    assert_eq!(registered, RegistrationStatus::Buffered);
    stack.etcd.resume();
    wait_for_etcd_status(&client, LinkStatus::Up).await;
    let mut etcd = stack.etcd.client().await;
    wait_for_value(
        &mut etcd,
        "v1/paused/during",
        Some("2"),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        etcd_value(&mut etcd, "v1/paused/before").await.unwrap().0,
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relays_keys_expire_with_their_lease() {
    let mut stack = EtcdStack::start_with_config("lease_ttl = \"2s\"");
    let mut etcd = stack.etcd.client().await;
    let client = stack.client().await;
    client.register("v1/orphan/key", "1").await.unwrap();
    stack.relay.kill();
    let killed = Instant::now();
    // Nobody revokes anything: etcd expires the lease after its TTL.
    wait_for_value(&mut etcd, "v1/orphan/key", None, Duration::from_secs(5)).await;
    let gone_after = killed.elapsed();
    eprintln!("a dead relay's key expired {gone_after:?} after the kill");
    assert!(
        gone_after >= Duration::from_millis(1000),
        "gone after {gone_after:?}: before the lease could have expired"
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_does_not_make_registrations_blink() {
    let mut stack = EtcdStack::start_with_config("lease_ttl = \"2s\"");
    let mut etcd = stack.etcd.client().await;
    let client = stack.client().await;
    let instance = client.instance_id();
    client.register("v1/steady/key", "1").await.unwrap();
    let first_lease = etcd_value(&mut etcd, "v1/steady/key").await.unwrap().1;
    let mut watch = etcd
        .watch("v1/steady/key", None)
        .await
        .expect("plain etcd watch");

    stack.relay.terminate();
    stack.relay.restart();
    // The client reconnects with the same instance id and registers again
    // under the new relay's lease; the old lease runs out (2 s) without
    // taking the key along.
    wait_until_async("the client is back", || async { client.is_connected() }).await;
    assert_eq!(client.instance_id(), instance);
    // Past the old lease's end, on etcd's clock: had the key stayed on it,
    // it would be gone now.
    let expired_after = lease_gone(&mut etcd, first_lease).await;
    eprintln!("the stopped relay's lease expired {expired_after:?} after the client was back");
    let (value, lease) = etcd_value(&mut etcd, "v1/steady/key")
        .await
        .expect("key kept");
    assert_eq!(value, "1");
    assert_ne!(lease, first_lease, "the key moved to the new relay's lease");
    while let Ok(Ok(Some(response))) =
        tokio::time::timeout(Duration::from_millis(100), watch.message()).await
    {
        for event in response.events() {
            assert_ne!(
                event.event_type(),
                etcd_client::EventType::Delete,
                "a watcher saw the key deleted during the relay restart"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_kept_alive_across_an_etcd_restart() {
    // A short TTL: if renewals stopped after the restart, the lease would
    // run out, and a watcher would see the key deleted.
    let mut stack =
        EtcdStack::start_with_config("lease_ttl = \"3s\"\nreconcile_interval = \"60s\"");
    let client = stack.client().await;
    client.register("v1/kept/key", "1").await.unwrap();
    stack.etcd.restart();
    let mut etcd = stack.etcd.client().await;
    let lease = etcd_value(&mut etcd, "v1/kept/key")
        .await
        .expect("key survived")
        .1;
    let mut watch = etcd.watch("v1/kept/key", None).await.unwrap();
    // etcd's own account of the lease's remaining TTL shows renewals made
    // after the restart: two, so the keeper goes on renewing rather than
    // one keepalive having got through.
    let renewed = lease_renewed(
        "the registration's lease after the etcd restart",
        || {
            let mut reader = etcd.clone();
            async move { lease_ttl(&mut reader, lease).await }
        },
        2,
    )
    .await;
    eprintln!("lease {lease:x} renewed twice within {renewed:?} of the restart");
    while let Ok(Ok(Some(response))) =
        tokio::time::timeout(Duration::from_millis(100), watch.message()).await
    {
        for event in response.events() {
            assert_ne!(
                event.event_type(),
                etcd_client::EventType::Delete,
                "the key was deleted after the restart: its lease ran out"
            );
        }
    }
    let (value, now) = etcd_value(&mut etcd, "v1/kept/key")
        .await
        .expect("key kept");
    assert_eq!(value, "1");
    assert_eq!(now, lease, "the key stayed on its lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restarted_empty_faster_than_a_probe_is_still_rebuilt() {
    // The periodic pass is far away: only noticing the restart itself (a
    // new raft term, a revision gone back) can bring the keys back soon.
    let mut stack = EtcdStack::start_with_config("reconcile_interval = \"60s\"");
    let client = stack.client().await;
    for n in 0..20 {
        let status = client
            .register(format!("v1/quick/{n}"), format!("{n}"))
            .await
            .unwrap();
        assert_eq!(status, RegistrationStatus::Applied);
    }
    let mut etcd = stack.etcd.client().await;
    assert_eq!(etcd_value(&mut etcd, "v1/quick/19").await.unwrap().0, "19");
    stack.etcd.restart_empty();
    let returned = Instant::now();
    let mut etcd = stack.etcd.client().await;
    for n in 0..20 {
        wait_for_value(
            &mut etcd,
            &format!("v1/quick/{n}"),
            Some(&n.to_string()),
            Duration::from_secs(5),
        )
        .await;
    }
    eprintln!(
        "rebuilt {:?} after etcd came back empty",
        returned.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backoff_does_not_delay_noticing_that_etcd_is_back() {
    // Backoff from 20 s (the probe interval) capped at 30 s: the first delay
    // after the outage is noticed is 10 to 20 s. etcd comes back as soon as
    // that delay has begun, so sleeping it out would notice etcd 10 s later
    // at the earliest; registrations must not wait for that.
    let mut stack = EtcdStack::start_with_config(
        "probe_interval = \"20s\"\nprobe_timeout = \"1s\"\nreconnect_delay_max = \"30s\"",
    );
    let client = stack.client().await;
    client.register("v1/backoff/key", "1").await.unwrap();
    stack.etcd.kill();
    // A change etcd cannot take makes the relay check the link at once
    // rather than at the next probe, 20 s away.
    let registered = within(
        "a registration while etcd is gone",
        client.register("v1/backoff/key", "2"),
    )
    .await
    .unwrap();
    assert_eq!(registered, RegistrationStatus::Buffered);
    wait_for_etcd_status(&client, LinkStatus::Down).await;
    etcd_backoff_started(&stack.relay, 1).await;
    let backoff_began = Instant::now();
    stack.etcd.start_again();
    let serving = Instant::now();
    wait_for_etcd_status(&client, LinkStatus::Up).await;
    let noticed = serving.elapsed();
    eprintln!(
        "etcd back noticed {noticed:?} after it served, {:?} into the backoff",
        backoff_began.elapsed()
    );
    assert!(noticed < Duration::from_secs(3), "took {noticed:?}");
    assert!(
        backoff_began.elapsed() < Duration::from_secs(10),
        "up {:?} after a delay of at least 10 s began: the delay was not cut short",
        backoff_began.elapsed()
    );
    let mut etcd = stack.etcd.client().await;
    wait_for_value(
        &mut etcd,
        "v1/backoff/key",
        Some("2"),
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_too_large_for_etcd_are_refused_and_many_large_ones_still_land() {
    let mut stack = EtcdStack::start();
    let client = stack.client().await;
    // More than etcd takes in one request (1.5 MiB by default): refused at
    // once, and it does not hold up the registrations after it.
    let huge = vec![b'h'; 2 * 1024 * 1024];
    let refused = client.register("v1/large/huge", huge).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded), "{refused}");
    assert_eq!(
        client.register("v1/large/small", "s").await.unwrap(),
        RegistrationStatus::Applied
    );

    // 200 registrations of 16 KiB buffered through an outage are 3 MiB:
    // more than one etcd request may carry.
    stack.etcd.kill();
    wait_for_etcd_status(&client, LinkStatus::Down).await;
    let value = "v".repeat(16 * 1024);
    for index in 0..200 {
        let key = format!("v1/large/{index:03}");
        let status = client.register(key, value.clone()).await.unwrap();
        assert_eq!(status, RegistrationStatus::Buffered);
    }
    stack.etcd.start_again();
    let mut etcd = stack.etcd.client().await;
    let mut count = 0;
    let deadline = Instant::now() + WAIT;
    while count != 201 {
        assert!(Instant::now() < deadline, "{count} of 201 keys in etcd");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let options = GetOptions::new().with_prefix().with_count_only();
        count = match etcd.get("v1/large/", Some(options)).await {
            Ok(found) => found.count(),
            Err(_) => 0,
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_its_registration_limit_is_refused_and_keeps_what_it_had() {
    let stack = EtcdStack::start_with_config("max_registrations_per_session = 2");
    let client = stack.client().await;
    client.register("v1/limit/a", "1").await.unwrap();
    client.register("v1/limit/b", "1").await.unwrap();
    let refused = client.register("v1/limit/c", "1").await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(holdfast_client::ErrorCode::LimitExceeded),
        "{refused}"
    );
    assert!(!refused.is_retryable());
    // Updating a key it holds is not a new registration.
    client.register("v1/limit/a", "2").await.unwrap();
    let mut etcd = stack.etcd.client().await;
    assert_eq!(etcd_value(&mut etcd, "v1/limit/a").await.unwrap().0, "2");
    assert_eq!(etcd_value(&mut etcd, "v1/limit/b").await.unwrap().0, "1");
    assert_eq!(etcd_value(&mut etcd, "v1/limit/c").await, None);
    let (_, metrics) = stack.relay.http_get("/metrics");
    assert!(
        metrics.contains("holdfast_registration_acks_total{outcome=\"rejected\"} 1"),
        "the refusal is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_registration_and_discovery_requests_get_typed_answers() {
    use holdfast_wire::{
        Deregister, Frame, FrameCodec, Get, GetOutcome, Hello, Register, RegistrationOutcome, Text,
        Watch, PROTOCOL_VERSION,
    };
    use tokio_util::codec::Framed;
    let stack = EtcdStack::start();
    let stream = tokio::net::UnixStream::connect(stack.relay.socket())
        .await
        .unwrap();
    let mut framed = Framed::new(
        stream,
        FrameCodec::new(holdfast_wire::DEFAULT_MAX_FRAME_BYTES),
    );
    use futures::SinkExt;
    framed
        .send(Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_name: Text::from_static("raw"),
            instance_id: 0,
        }))
        .await
        .unwrap();
    let welcome = within("WELCOME", framed.next()).await.unwrap().unwrap();
    assert!(matches!(welcome, Frame::Welcome(_)));
    for frame in [
        Frame::Register(Register {
            request_id: 1,
            key: bytes::Bytes::new(),
            value: bytes::Bytes::from_static(b"x"),
        }),
        Frame::Get(Get {
            request_id: 2,
            linearizable: false,
            prefix: bytes::Bytes::new(),
        }),
        Frame::Watch(Watch {
            watch_id: 3,
            send_initial: true,
            prefix: bytes::Bytes::new(),
        }),
        // Removing a key this session never registered is harmless.
        Frame::Deregister(Deregister {
            request_id: 4,
            key: bytes::Bytes::from_static(b"v1/never"),
        }),
    ] {
        framed.send(frame).await.unwrap();
    }
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let frame = within("answers", framed.next()).await.unwrap().unwrap();
        if !matches!(frame, Frame::LinkState(_)) {
            answers.push(frame);
        }
    }
    assert!(answers.iter().any(|frame| matches!(frame,
        Frame::RegisterAck(ack) if ack.request_id == 1 && matches!(&ack.outcome,
            RegistrationOutcome::Rejected { code, .. } if *code == holdfast_wire::ErrorCode::InvalidSubject))));
    assert!(
        answers.iter().any(|frame| matches!(frame,
        Frame::GetResponse(response) if response.request_id == 2 && matches!(&response.outcome,
            GetOutcome::Failed { code, .. } if *code == holdfast_wire::ErrorCode::InvalidSubject)))
    );
    assert!(answers.iter().any(|frame| matches!(frame,
        Frame::Error(error) if error.reference == 3 && error.code == holdfast_wire::ErrorCode::InvalidSubject)));
    assert!(answers.iter().any(|frame| matches!(frame,
        Frame::RegisterAck(ack) if ack.request_id == 4 && ack.outcome == RegistrationOutcome::Applied)));
    // The connection is still usable.
    framed
        .send(Frame::Register(Register {
            request_id: 5,
            key: bytes::Bytes::from_static(b"v1/raw/ok"),
            value: bytes::Bytes::from_static(b"1"),
        }))
        .await
        .unwrap();
    loop {
        match within("the last answer", framed.next())
            .await
            .unwrap()
            .unwrap()
        {
            Frame::RegisterAck(ack) if ack.request_id == 5 => {
                assert_eq!(ack.outcome, RegistrationOutcome::Applied);
                break;
            }
            _ => continue,
        }
    }
    // And a GET answered from the cache still gets through: the refused
    // GET's answer once made the session's byte count go below zero,
    // after which every cached answer and message was dropped.
    framed
        .send(Frame::Get(Get {
            request_id: 6,
            linearizable: false,
            prefix: bytes::Bytes::from_static(b"v1/raw/"),
        }))
        .await
        .unwrap();
    loop {
        match within("the cached GET", framed.next())
            .await
            .unwrap()
            .unwrap()
        {
            Frame::GetResponse(response) if response.request_id == 6 => {
                assert!(
                    matches!(response.outcome, GetOutcome::Snapshot(_)),
                    "{:?}",
                    response.outcome
                );
                break;
            }
            _ => continue,
        }
    }
}

/// HELLO on a raw Unix-socket connection claiming `instance_id`; returns the
/// framed connection once WELCOME arrived.
async fn raw_session(
    stack: &EtcdStack,
    instance_id: u64,
) -> tokio_util::codec::Framed<tokio::net::UnixStream, holdfast_wire::FrameCodec> {
    use futures::SinkExt;
    use holdfast_wire::{Frame, FrameCodec, Hello, Text, PROTOCOL_VERSION};
    let stream = tokio::net::UnixStream::connect(stack.relay.socket())
        .await
        .unwrap();
    let mut framed = tokio_util::codec::Framed::new(
        stream,
        FrameCodec::new(holdfast_wire::DEFAULT_MAX_FRAME_BYTES),
    );
    framed
        .send(Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_name: Text::from_static("raw"),
            instance_id,
        }))
        .await
        .unwrap();
    let welcome = within("WELCOME", framed.next()).await.unwrap().unwrap();
    assert!(matches!(welcome, Frame::Welcome(_)), "{welcome:?}");
    framed
}

/// Sends REGISTER on a raw connection and returns the REGISTER_ACK's outcome.
async fn raw_register(
    framed: &mut tokio_util::codec::Framed<tokio::net::UnixStream, holdfast_wire::FrameCodec>,
    request_id: u64,
    key: &str,
    value: &str,
) -> holdfast_wire::RegistrationOutcome {
    use futures::SinkExt;
    use holdfast_wire::{Frame, Register};
    framed
        .send(Frame::Register(Register {
            request_id,
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
            value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        }))
        .await
        .unwrap();
    loop {
        match within("REGISTER_ACK", framed.next())
            .await
            .unwrap()
            .unwrap()
        {
            Frame::RegisterAck(ack) if ack.request_id == request_id => return ack.outcome,
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_by_a_live_session_is_refused_to_others_until_that_session_ends() {
    let stack = EtcdStack::start();
    let mut etcd = stack.etcd.client().await;
    let worker = stack.client().await;
    let key = format!("v1/instances/ns/worker/generate/{:x}", worker.instance_id());
    worker.register(key.clone(), "worker").await.unwrap();
    wait_for_value(&mut etcd, &key, Some("worker"), WAIT).await;

    // Another client read the key (GETs are open to all) and registers the
    // same literal key: refused, not retryable, and the worker's value
    // stays.
    let intruder = stack.client().await;
    let listed = intruder.get("v1/instances/").await.unwrap();
    assert_eq!(listed.entries.len(), 1);
    let refused = intruder
        .register(key.clone(), "intruder")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Conflict), "{refused}");
    assert!(!refused.is_retryable(), "{refused}");
    let refused = intruder.deregister(key.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Conflict), "{refused}");
    // The CLI says so and exits 1 instead of holding nothing.
    let mut cli = Command::new(holdfast_cli())
        .env("HOLDFAST_URL", stack.relay.url())
        .args(["register", key.as_str(), "cli"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = cli.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WAIT {
            let _ = cli.kill();
            panic!("holdfast register of a held key did not exit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut cli.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: conflict (not retryable)"),
        "{stderr}"
    );
    assert_eq!(
        etcd_value(&mut etcd, &key).await.map(|(value, _)| value),
        Some("worker".to_string())
    );
    // The intruder leaving takes nothing with it: once its session is
    // gone, the key stays in etcd with the worker's value.
    intruder.close().await.unwrap();
    wait_until_async("the intruder's and the CLI's sessions to end", || async {
        stack.relay.status()["sessions"] == 1
    })
    .await;
    // A session's end reaches the registry before the session count
    // drops, and the registry writes to etcd in order: a change it takes
    // now is in etcd only once anything those ends caused is too.
    let marker = format!("{key}/after-the-intruder");
    assert_eq!(
        worker.register(marker.clone(), "m").await.unwrap(),
        RegistrationStatus::Applied
    );
    assert_eq!(
        etcd_value(&mut etcd, &key).await.map(|(value, _)| value),
        Some("worker".to_string()),
        "the worker's key after the intruder left"
    );
    worker.deregister(marker).await.unwrap();
    let metrics = crate::support::scrape(&stack.relay);
    assert_eq!(
        crate::support::metric(&metrics, "holdfast_registration_conflicts_total", &[]),
        Some(3.0),
        "{metrics}"
    );

    // The same process reconnecting before the relay noticed its old
    // session died (same instance id, same user) takes its key over.
    let instance = 0x5eed_u64;
    let mut old = raw_session(&stack, instance).await;
    let reconnect_key = "v1/instances/ns/worker/generate/5eed";
    assert_eq!(
        raw_register(&mut old, 1, reconnect_key, "before").await,
        holdfast_wire::RegistrationOutcome::Applied
    );
    let mut new = raw_session(&stack, instance).await;
    assert_eq!(
        raw_register(&mut new, 1, reconnect_key, "after").await,
        holdfast_wire::RegistrationOutcome::Applied
    );
    drop(old);
    wait_for_value(&mut etcd, reconnect_key, Some("after"), WAIT).await;

    // Once the worker's session ends, the key is free again.
    worker.close().await.unwrap();
    wait_for_value(&mut etcd, &key, None, WAIT).await;
    let successor = stack.client().await;
    assert_eq!(
        successor.register(key.clone(), "successor").await.unwrap(),
        RegistrationStatus::Applied
    );
    wait_for_value(&mut etcd, &key, Some("successor"), WAIT).await;
    drop(new);
}
