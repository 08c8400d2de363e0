//! Access rules by peer identity on the Unix socket (SO_PEERCRED): what a
//! rule allows works, what it does not is refused with `unauthorized` and
//! counted, and the connection stays usable.

use crate::support::{metric, nats_round_trip, scrape, within, EtcdStack, Stack};
use futures::StreamExt;
use holdfast_client::{ErrorCode, Headers, OutboundMessage, RegistrationStatus};
use std::time::Duration;

fn our_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

fn expect_unauthorized<T: std::fmt::Debug>(result: Result<T, holdfast_client::Error>, what: &str) {
    let error = result.expect_err(what);
    assert_eq!(
        error.code(),
        Some(ErrorCode::Unauthorized),
        "{what}: {error}"
    );
    assert!(!error.is_retryable(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_rule_allows_its_subjects_and_keys_and_refuses_the_rest() {
    let uid = our_uid();
    let access = format!(
        "[access]\ndefault = \"deny\"\n[[access.rule]]\nuid = {uid}\n\
         publish = [\"work.>\", \"svc.allowed\"]\nsubscribe = [\"work.*\"]\n\
         register = [\"v1/instances/allowed/\"]\n"
    );
    let stack = EtcdStack::start_with_tables("", &access);
    let client = stack.client().await;
    let direct = async_nats::connect(stack.nats.url()).await.unwrap();
    let mut direct_sub = direct.subscribe("work.>").await.unwrap();
    nats_round_trip(&direct).await;

    // Allowed: publish, subscribe (within the pattern), register.
    let ack = client
        .publish_with_ack(OutboundMessage::new("work.a", "ok"))
        .await
        .unwrap();
    within("allowed publish is acked", ack).await.unwrap();
    let received = within("allowed publish reaches NATS", direct_sub.next())
        .await
        .unwrap();
    assert_eq!(&received.payload[..], b"ok");
    let mut subscriber = client.subscribe("work.*").await.unwrap();
    client.publish("work.b", "for me").await.unwrap();
    let delivered = within("allowed subscription receives", subscriber.next())
        .await
        .unwrap();
    assert_eq!(&delivered.payload[..], b"for me");
    let status = client
        .register("v1/instances/allowed/1", "x")
        .await
        .unwrap();
    assert_eq!(status, RegistrationStatus::Applied);

    // Refused: each kind, with the connection still working afterwards.
    let ack = client
        .publish_with_ack(OutboundMessage::new("other.a", "no"))
        .await
        .unwrap();
    expect_unauthorized(within("denied publish answered", ack).await, "publish");
    expect_unauthorized(
        client.subscribe("work.>").await,
        "subscription wider than allowed",
    );
    expect_unauthorized(client.subscribe("other").await, "subscription");
    expect_unauthorized(
        client.register("v1/instances/other/1", "x").await,
        "registration",
    );
    expect_unauthorized(
        client
            .request_with("svc.denied", Headers::new(), "q", Duration::from_secs(1))
            .await,
        "request",
    );
    let ack = client
        .publish_with_ack(OutboundMessage::new("work.c", "still fine"))
        .await
        .unwrap();
    within("publish after denials", ack).await.unwrap();

    // Nothing refused reached NATS or etcd.
    let next = within("the allowed message after the denials", direct_sub.next())
        .await
        .unwrap();
    assert_eq!(next.subject.as_str(), "work.b");
    let next = within("the last allowed message", direct_sub.next())
        .await
        .unwrap();
    assert_eq!(next.subject.as_str(), "work.c");
    let mut etcd = stack.etcd.client().await;
    let other = etcd.get("v1/instances/other/1", None).await.unwrap();
    assert!(other.kvs().is_empty());

    let metrics = scrape(&stack.relay);
    for (operation, expected) in [
        ("publish", 1.0),
        ("subscribe", 2.0),
        ("register", 1.0),
        ("request", 1.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                "holdfast_access_denied_total",
                &[("operation", operation)]
            ),
            Some(expected),
            "{operation}"
        );
    }
    assert!(stack
        .relay
        .logs()
        .contains("operation denied by the access rules"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_no_rule_names_gets_the_default() {
    // The only rule names another user; this process falls to the default.
    let other_uid = our_uid().wrapping_add(1);
    let config = format!(
        "[access]\ndefault = \"deny\"\n[[access.rule]]\nuid = {other_uid}\npublish = [\">\"]\n"
    );
    let stack = Stack::start_with_config(&config);
    let client = stack.client().await;
    let ack = client
        .publish_with_ack(OutboundMessage::new("anything", "no"))
        .await
        .unwrap();
    expect_unauthorized(within("default deny", ack).await, "publish");
    expect_unauthorized(client.subscribe("anything").await, "subscribe");
    // Status and discovery-free operations still work on the connection.
    let status = client.status().await.unwrap();
    assert_eq!(status["counters"]["access_denials"], 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_rule_lets_an_identity_take_over_keys_under_its_prefixes() {
    let uid = our_uid();
    let access = format!(
        "[access]\ndefault = \"deny\"\n[[access.rule]]\nuid = {uid}\n\
         register = [\"v1/\"]\ntakeover = [\"v1/instances/\"]\n"
    );
    let stack = EtcdStack::start_with_tables("", &access);
    let mut etcd = stack.etcd.client().await;
    let first = stack.client().await;
    first.register("v1/instances/a", "first").await.unwrap();
    first.register("v1/config/a", "first").await.unwrap();
    let second = stack.client().await;
    // Under a takeover prefix the key moves to the second session ...
    assert_eq!(
        second.register("v1/instances/a", "second").await.unwrap(),
        RegistrationStatus::Applied
    );
    // ... elsewhere the first session keeps it.
    let refused = second.register("v1/config/a", "second").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Conflict), "{refused}");
    // The first session leaving takes only what it still holds.
    first.close().await.unwrap();
    crate::registry::wait_for_value(&mut etcd, "v1/config/a", None, crate::support::WAIT).await;
    let kept = crate::registry::etcd_value(&mut etcd, "v1/instances/a").await;
    assert_eq!(kept.map(|(value, _)| value).as_deref(), Some("second"));
}
