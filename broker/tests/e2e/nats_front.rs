//! The NATS client-protocol front end with async-nats as an unmodified
//! client: pub/sub, headers, queue groups, request/reply both ways, no_echo,
//! auto-unsubscribe, bad input, and a NATS outage with fail-fast requests,
//! node-local request/reply and an ordered replay of journaled publishes.

use crate::support::{metric, nats_round_trip, scrape, within, Relay, Stack};
use async_nats::client::RequestErrorKind;
use futures::StreamExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FRONT_CONFIG: &str = "[relay]\nnats_listen = \"127.0.0.1:0\"\n\
    [classes.kv_events]\nsubjects = [\"kv.>\"]\n";

/// The front end's address, from the relay's status document.
fn front_address(relay: &Relay) -> String {
    relay.status()["nats_listen"]
        .as_str()
        .expect("the relay serves the NATS protocol")
        .to_string()
}

/// async-nats's `flush` only writes its buffer, so it cannot tell when the
/// relay has taken a SUB; its status can.
async fn wait_for_local_subscriptions(relay: &Relay, count: u64) {
    within("the relay takes the subscriptions", async {
        loop {
            if relay.status()["subscriptions"]["local"].as_u64() >= Some(count) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn front_client(relay: &Relay) -> async_nats::Client {
    let url = format!("nats://{}", front_address(relay));
    within("connect to the NATS front end", async_nats::connect(url))
        .await
        .expect("an unmodified NATS client connects to the relay")
}

/// async-nats's `flush` does not wait for the server, so a subscription
/// the relay has taken may still have its upstream SUB on the way to
/// nats-server: `direct` publishes warm-ups on `subject` until `receiver`
/// (a subscriber through the relay) gets one.
async fn warm_up(
    direct: &async_nats::Client,
    subject: &str,
    receiver: &mut async_nats::Subscriber,
) {
    within("the relay's subscription reaches nats-server", async {
        loop {
            direct
                .publish(subject.to_string(), WARM_UP.into())
                .await
                .unwrap();
            direct.flush().await.unwrap();
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), receiver.next()).await
            {
                return;
            }
        }
    })
    .await;
}

const WARM_UP: &str = "warm-up";

/// The next message that is not a warm-up (later warm-ups may still come).
async fn next_not_warm_up(receiver: &mut async_nats::Subscriber) -> async_nats::Message {
    loop {
        let message = receiver.next().await.expect("subscription open");
        if &message.payload[..] != WARM_UP.as_bytes() {
            return message;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_nats_client_publishes_subscribes_and_requests_through_the_relay() {
    let stack = Stack::start_with_config(FRONT_CONFIG);
    let front = front_client(&stack.relay).await;
    let direct = stack.direct_nats().await;

    // Relay → NATS, with headers.
    let mut upstream = direct.subscribe("front.up").await.unwrap();
    nats_round_trip(&direct).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Trace-Id", "t-1");
    front
        .publish_with_headers("front.up", headers, "with headers".into())
        .await
        .unwrap();
    front.publish("front.up", "plain".into()).await.unwrap();
    front.flush().await.unwrap();
    let first = within("NATS receives", upstream.next()).await.unwrap();
    assert_eq!(&first.payload[..], b"with headers");
    let trace = first.headers.as_ref().and_then(|h| h.get("Trace-Id"));
    assert_eq!(trace.map(|value| value.as_str()), Some("t-1"));
    let second = within("NATS receives in order", upstream.next())
        .await
        .unwrap();
    assert_eq!(&second.payload[..], b"plain");

    // NATS → relay.
    let mut downstream = front.subscribe("front.down").await.unwrap();
    front.flush().await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 1).await;
    // The relay's own SUB may still be on its way to nats-server (see the
    // request below): published again until one arrives.
    let message = within("front subscriber receives", async {
        loop {
            direct
                .publish("front.down", "to front".into())
                .await
                .unwrap();
            direct.flush().await.unwrap();
            let arrived = tokio::time::timeout(Duration::from_millis(100), downstream.next());
            if let Ok(Some(message)) = arrived.await {
                return message;
            }
        }
    })
    .await;
    assert_eq!(&message.payload[..], b"to front");

    // A request from the front end answered by a plain NATS responder.
    let mut service = direct.subscribe("front.svc").await.unwrap();
    let mut service_api = direct.subscribe("$SRV.PING.echo").await.unwrap();
    nats_round_trip(&direct).await;
    let responder = direct.clone();
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            if let Some(reply) = request.reply {
                let _ = responder.publish(reply, request.payload).await;
                let _ = responder.flush().await;
            }
        }
    });
    let reply = within(
        "request through the front end",
        front.request("front.svc", "ping".into()),
    )
    .await
    .unwrap();
    assert_eq!(&reply.payload[..], b"ping");
    // The NATS service API ($SRV) passes through like any other request.
    let pinging = direct.clone();
    tokio::spawn(async move {
        if let Some(request) = service_api.next().await {
            let _ = pinging
                .publish(request.reply.unwrap(), "{\"name\":\"echo\"}".into())
                .await;
            let _ = pinging.flush().await;
        }
    });
    let reply = within(
        "service API ping",
        front.request("$SRV.PING.echo", "".into()),
    )
    .await
    .unwrap();
    assert_eq!(&reply.payload[..], b"{\"name\":\"echo\"}");

    // A responder behind the front end answering a plain NATS requester.
    let mut echo = front.subscribe("front.echo").await.unwrap();
    front.flush().await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 2).await;
    let answering = front.clone();
    tokio::spawn(async move {
        while let Some(request) = echo.next().await {
            if let Some(reply) = request.reply {
                let _ = answering.publish(reply, "echoed".into()).await;
                let _ = answering.flush().await;
            }
        }
    });
    // The relay's own SUB may still be on its way to nats-server (the
    // relay counts the subscription once it has sent it): until it lands,
    // nats-server answers "no responders".
    let reply = within("request into the front end", async {
        loop {
            match direct.request("front.echo", "x".into()).await {
                Err(error) if error.kind() == RequestErrorKind::NoResponders => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other.unwrap(),
            }
        }
    })
    .await;
    assert_eq!(&reply.payload[..], b"echoed");

    // Nobody listening: no-responders, fast, as from nats-server.
    let started = Instant::now();
    let error = within("no responders", front.request("front.nobody", "x".into()))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), RequestErrorKind::NoResponders, "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A holdfast client and a NATS client on the same relay see each other.
    let holdfast = stack.client().await;
    let mut holdfast_sub = holdfast.subscribe("front.mixed").await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 4).await;
    front
        .publish("front.mixed", "from nats".into())
        .await
        .unwrap();
    front.flush().await.unwrap();
    let message = within("holdfast client receives", holdfast_sub.next())
        .await
        .unwrap();
    assert_eq!(&message.payload[..], b"from nats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_groups_no_echo_and_auto_unsubscribe_behave_as_on_nats_server() {
    let stack = Stack::start_with_config(FRONT_CONFIG);
    let direct = stack.direct_nats().await;
    let worker_a = front_client(&stack.relay).await;
    let worker_b = front_client(&stack.relay).await;
    let mut queue_a = worker_a
        .queue_subscribe("front.jobs", "workers".into())
        .await
        .unwrap();
    let mut queue_b = worker_b
        .queue_subscribe("front.jobs", "workers".into())
        .await
        .unwrap();
    worker_a.flush().await.unwrap();
    worker_b.flush().await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 2).await;
    // The members share one upstream subscription, whose SUB may still be
    // on its way to nats-server: warm-ups until one arrives.
    within("the shared subscription reaches nats-server", async {
        loop {
            direct.publish("front.jobs", WARM_UP.into()).await.unwrap();
            direct.flush().await.unwrap();
            let arrived = tokio::time::timeout(Duration::from_millis(100), async {
                tokio::select! {
                    Some(_) = queue_a.next() => {},
                    Some(_) = queue_b.next() => {},
                }
            });
            if arrived.await.is_ok() {
                break;
            }
        }
    })
    .await;
    for index in 0..40 {
        direct
            .publish("front.jobs", format!("{index}").into())
            .await
            .unwrap();
    }
    direct.flush().await.unwrap();
    let mut received = 0;
    let is_job = |message: &async_nats::Message| &message.payload[..] != WARM_UP.as_bytes();
    within("all 40 jobs are taken, each once", async {
        while received < 40 {
            tokio::select! {
                Some(message) = queue_a.next() => received += usize::from(is_job(&message)),
                Some(message) = queue_b.next() => received += usize::from(is_job(&message)),
            }
        }
    })
    .await;
    let extra = tokio::time::timeout(Duration::from_millis(300), async {
        tokio::select! {
            message = queue_a.next() => message,
            message = queue_b.next() => message,
        }
    })
    .await;
    assert!(extra.is_err(), "a job was delivered twice");

    // no_echo: the publisher does not get its own message; others do.
    let url = format!("nats://{}", front_address(&stack.relay));
    let quiet = async_nats::ConnectOptions::new()
        .no_echo()
        .connect(url)
        .await
        .unwrap();
    let mut own = quiet.subscribe("front.echoless").await.unwrap();
    let mut other = worker_a.subscribe("front.echoless").await.unwrap();
    quiet.flush().await.unwrap();
    worker_a.flush().await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 4).await;
    warm_up(&direct, "front.echoless", &mut other).await;
    quiet
        .publish("front.echoless", "once".into())
        .await
        .unwrap();
    quiet.flush().await.unwrap();
    let seen = within("another connection receives", next_not_warm_up(&mut other)).await;
    assert_eq!(&seen.payload[..], b"once");
    assert!(
        seen.headers
            .as_ref()
            .and_then(|h| h.get("Holdfast-Origin"))
            .is_none(),
        "the relay's origin marker is not shown to clients"
    );
    let echoed = tokio::time::timeout(Duration::from_millis(300), next_not_warm_up(&mut own)).await;
    assert!(echoed.is_err(), "a no_echo connection got its own message");

    // UNSUB with a maximum. Another connection's subscription to the same
    // subject puts the shared upstream one in place first (warm-ups would
    // count against the maximum).
    let mut opener = worker_a.subscribe("front.limited").await.unwrap();
    worker_a.flush().await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 5).await;
    warm_up(&direct, "front.limited", &mut opener).await;
    let mut limited = worker_b.subscribe("front.limited").await.unwrap();
    limited.unsubscribe_after(2).await.unwrap();
    worker_b.flush().await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 6).await;
    for index in 0..5 {
        direct
            .publish("front.limited", format!("{index}").into())
            .await
            .unwrap();
    }
    direct.flush().await.unwrap();
    let mut got = Vec::new();
    within("two messages then the end", async {
        while let Some(message) = limited.next().await {
            got.push(message.payload);
        }
    })
    .await;
    assert_eq!(got.len(), 2, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_nats_outage_requests_fail_fast_local_ones_are_served_and_publishes_replay_in_order(
) {
    let mut stack = Stack::start_with_config(FRONT_CONFIG);
    let publisher = front_client(&stack.relay).await;
    let local_service = front_client(&stack.relay).await;
    let mut requests = local_service.subscribe("local.svc").await.unwrap();
    local_service.flush().await.unwrap();
    wait_for_local_subscriptions(&stack.relay, 1).await;
    let answering = local_service.clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                let _ = answering.publish(reply, "served on the node".into()).await;
                let _ = answering.flush().await;
            }
        }
    });

    stack.nats.kill();
    let holdfast = stack.client().await;
    within("the relay notices NATS is gone", async {
        while holdfast.nats_status() != holdfast_client::LinkStatus::Down {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A request nobody on this node answers fails at once, never hangs.
    let started = Instant::now();
    let error = publisher
        .request("remote.svc", "x".into())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), RequestErrorKind::NoResponders, "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // One a component on this node serves is answered.
    let reply = within("local request", publisher.request("local.svc", "q".into()))
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"served on the node");

    // KV events published during the outage are journaled (class kv_events by subject).
    for index in 0..200 {
        publisher
            .publish("kv.events.block", format!("{index}").into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    within("all 200 are journaled", async {
        loop {
            let status = holdfast.status().await.unwrap();
            let kv_backlog = status["classes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|class| class["name"] == "kv_events")
                .map(|class| class["backlog_messages"].clone());
            if kv_backlog == Some(serde_json::json!(200)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // The relay is held still while NATS comes back, so a plain subscriber
    // is in place before the replay starts.
    stack.relay.pause();
    stack.nats.restart();
    let direct = stack.direct_nats().await;
    let mut events = direct.subscribe("kv.events.>").await.unwrap();
    nats_round_trip(&direct).await;
    stack.relay.resume();
    let mut seen = Vec::new();
    within("all 200 replayed", async {
        while seen.len() < 200 {
            let message = events.next().await.unwrap();
            seen.push(
                String::from_utf8_lossy(&message.payload)
                    .parse::<u32>()
                    .unwrap(),
            );
        }
    })
    .await;
    assert_eq!(
        seen,
        (0..200).collect::<Vec<u32>>(),
        "every message, in publish order"
    );
    let metrics = scrape(&stack.relay);
    let journaled = metric(
        &metrics,
        "holdfast_publishes_total",
        &[("class", "kv_events"), ("outcome", "journaled")],
    );
    assert_eq!(journaled, Some(200.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_protocol_input_gets_an_err_and_a_closed_connection_and_nothing_else_notices() {
    let stack = Stack::start_with_config(FRONT_CONFIG);
    let good = front_client(&stack.relay).await;
    let mut subscriber = good.subscribe("front.steady").await.unwrap();
    good.flush().await.unwrap();
    let address = front_address(&stack.relay);
    for (name, bytes, expected) in [
        (
            "unknown op",
            &b"CONNECT {}\r\nFOO bar\r\n"[..],
            "Unknown Protocol Operation",
        ),
        (
            "oversized",
            &b"CONNECT {}\r\nPUB a 99999999\r\n"[..],
            "Maximum Payload",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        within(
            "the relay closes the connection",
            stream.read_to_end(&mut answer),
        )
        .await
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("INFO {"), "{name}: {answer}");
        assert!(
            answer.contains(&format!("-ERR '{expected}")),
            "{name}: {answer}"
        );
    }
    good.publish("front.steady", "still here".into())
        .await
        .unwrap();
    good.flush().await.unwrap();
    let message = within("good client unaffected", subscriber.next())
        .await
        .unwrap();
    assert_eq!(&message.payload[..], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_refused_over_the_limit_are_not_kept() {
    let config = format!("{FRONT_CONFIG}[sessions]\nmax_subscriptions = 1\n");
    let stack = Stack::start_with_config(&config);
    let mut stream = tokio::net::TcpStream::connect(front_address(&stack.relay))
        .await
        .unwrap();
    stream
        .write_all(b"CONNECT {}\r\nSUB kept 1\r\nPING\r\n")
        .await
        .unwrap();
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    let mut line = String::new();
    let mut read_until = async |wanted: &str| {
        use tokio::io::AsyncBufReadExt;
        let mut refusals = 0;
        loop {
            line.clear();
            assert_ne!(
                reader.read_line(&mut line).await.unwrap(),
                0,
                "connection closed"
            );
            if line.starts_with("-ERR") {
                refusals += 1;
            }
            if line.starts_with(wanted) {
                return refusals;
            }
        }
    };
    within("PONG", read_until("PONG")).await;
    // 50k SUBs over the limit, each with an 800-byte sid (40 MB of ids), twice:
    // the first round sets the relay's high-water mark for passing that
    // many refusals through; kept refusals would grow it again. (Long ids
    // rather than many SUBs: the bytes kept are what a leak shows, and
    // each SUB costs a debug build's parse and refusal.)
    const REFUSED: usize = 50_000;
    let mut rss = Vec::new();
    for round in 0..2 {
        let writing = tokio::spawn(async move {
            let padding = "s".repeat(790);
            let mut batch = String::new();
            for index in 0..REFUSED {
                batch.push_str(&format!(
                    "SUB refused.{index} {padding}{round}{index:09}\r\n"
                ));
                if batch.len() > 64 * 1024 {
                    writer.write_all(batch.as_bytes()).await.unwrap();
                    batch.clear();
                }
            }
            batch.push_str("PING\r\n");
            writer.write_all(batch.as_bytes()).await.unwrap();
            writer
        });
        let refusals = within("every refusal and the PONG", read_until("PONG")).await;
        writer = writing.await.unwrap();
        assert_eq!(refusals, REFUSED);
        rss.push(crate::limits::relay_rss_mib(&stack.relay));
    }
    let grown = rss[1] - rss[0];
    // Kept refusals would add their 40 MB of ids; the allocator's arenas
    // alone moved the high-water mark by up to 18 MiB with three test
    // threads sharing two cores.
    assert!(
        grown < 28.0,
        "the relay grew by {grown:.0} MiB in the second round"
    );
}

/// A nats-py client (the real Python client, installed into .deps/ by
/// deploy/install-deps.sh) that prints one line per event: `ready`, each
/// message's payload, `lame duck`, `reconnected`, `closed`, `error: ...`.
const NATS_PY_CLIENT: &str = r#"
import asyncio, sys
import nats

async def main():
    def say(line):
        print(line, flush=True)

    async def on_lame_duck():
        say("lame duck")

    async def on_reconnected():
        say("reconnected")

    async def on_closed():
        say("closed")

    async def on_error(error):
        say(f"error: {error}")

    client = await nats.connect(
        sys.argv[1],
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        lame_duck_mode_cb=on_lame_duck,
        reconnected_cb=on_reconnected,
        closed_cb=on_closed,
        error_cb=on_error,
    )

    async def on_message(message):
        say(message.data.decode())

    await client.subscribe("restart.test", cb=on_message)
    await client.flush()
    say("ready")
    await asyncio.sleep(60)

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_relay_restart_keeps_nats_py_clients_connected_and_subscribed() {
    use std::io::BufRead;
    let deps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/python");
    assert!(
        deps.join("nats").exists(),
        "nats-py missing in {}: run deploy/install-deps.sh",
        deps.display()
    );
    // A fixed port: the restarted relay must listen where the client
    // reconnects.
    let port = crate::support::free_port();
    let mut stack =
        Stack::start_with_config(&format!("[relay]\nnats_listen = \"127.0.0.1:{port}\"\n"));
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), NATS_PY_CLIENT).unwrap();
    let mut python = std::process::Command::new("python3")
        .arg(script.path())
        .arg(format!("nats://127.0.0.1:{port}"))
        .env("PYTHONPATH", &deps)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start python3");
    let stdout = python.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |wanted: &str, publish: &mut dyn FnMut()| {
        if seen.iter().any(|line| line == wanted) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            publish();
            while let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
                seen.push(line.clone());
                if line == wanted {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {wanted:?}; nats-py said {seen:?}"
            );
        }
    };
    let direct = stack.direct_nats().await;
    wait_for("ready", &mut || {});
    let handle = tokio::runtime::Handle::current();
    let publish = |payload: &'static str| {
        let direct = direct.clone();
        let handle = handle.clone();
        move || {
            let direct = direct.clone();
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let _ = direct.publish("restart.test", payload.into()).await;
                    let _ = direct.flush().await;
                })
            });
        }
    };
    wait_for("before", &mut publish("before"));

    assert!(stack.relay.terminate().success());
    stack.relay.restart();
    wait_for("after", &mut publish("after"));
    // nats-py runs its reconnected callback as a task of its own, which
    // may print after the first message on the new connection.
    wait_for("reconnected", &mut || {});
    let _ = python.kill();
    let _ = python.wait();
    assert!(seen.iter().any(|line| line == "lame duck"), "{seen:?}");
    assert!(seen.iter().any(|line| line == "reconnected"), "{seen:?}");
    assert!(!seen.iter().any(|line| line == "closed"), "{seen:?}");
}

/// A NATS client that subscribes and then stops reading holds the relay to
/// its connection's outbound bound (`sessions.outbound_queue_bytes`, frames
/// and their rendered text alike), the excess is dropped and counted, and
/// once it reads again it hears how many it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_subscriber_that_stops_reading_is_held_to_its_outbound_bound() {
    const QUEUE_BYTES: usize = 1 << 20;
    const MESSAGES: usize = 20_000;
    const PAYLOAD: usize = 4096;
    let config =
        format!("{FRONT_CONFIG}[sessions]\noutbound_queue_bytes = {QUEUE_BYTES}\nslow_consumer = \"drop\"\n");
    let stack = Stack::start_with_config(&config);
    let mut stalled = tokio::net::TcpStream::connect(front_address(&stack.relay))
        .await
        .unwrap();
    stalled
        .write_all(b"CONNECT {\"verbose\":false}\r\nSUB flood 1\r\nPING\r\n")
        .await
        .unwrap();
    wait_for_local_subscriptions(&stack.relay, 1).await;
    let before = crate::limits::relay_rss_mib(&stack.relay);
    // 80 MB for a subscriber that reads none of it.
    let publisher = stack.direct_nats().await;
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    for _ in 0..MESSAGES {
        publisher.publish("flood", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let dropped = within("the excess is dropped and counted", async {
        loop {
            let text = scrape(&stack.relay);
            let dropped = metric(
                &text,
                "holdfast_messages_dropped_total",
                &[("reason", "slow_consumer")],
            )
            .unwrap_or(0.0);
            if dropped > (MESSAGES / 2) as f64 {
                break dropped;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let grown = crate::limits::relay_rss_mib(&stack.relay) - before;
    assert!(
        grown < 32.0,
        "the relay grew by {grown:.0} MiB for one stalled 1 MiB-bound subscriber ({dropped} dropped)"
    );
    // Reading again, the client gets what was kept and then the report.
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 1 << 16];
    within("the drop report", async {
        loop {
            let read = stalled.read(&mut buffer).await.unwrap();
            assert_ne!(read, 0, "the relay closed the connection");
            received.extend_from_slice(&buffer[..read]);
            if received
                .windows(14)
                .any(|window| window == b"not keeping up")
            {
                break;
            }
        }
    })
    .await;
    let kept = received.windows(10).filter(|w| w == b"MSG flood ").count();
    assert!(kept > 0 && kept < MESSAGES / 2, "{kept} messages kept");
}

/// NATS clients flooding large messages at once share the relay-wide read
/// budget (`sessions.read_budget_bytes`) as framed clients do: they wait
/// for room, which is counted, and every message still arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_clients_flooding_large_messages_share_the_read_budget() {
    const CLIENTS: usize = 4;
    const MESSAGES: usize = 40;
    const PAYLOAD: usize = 256 * 1024;
    let config = "[relay]\nnats_listen = \"127.0.0.1:0\"\nmax_frame_bytes = 1048576\n\
        [sessions]\nread_budget_bytes = 1048576\n";
    let stack = Stack::start_with_config(config);
    let direct = stack.direct_nats().await;
    let mut arrivals = direct.subscribe("flood.>").await.unwrap();
    nats_round_trip(&direct).await;
    let mut publishers = Vec::new();
    for client in 0..CLIENTS {
        let front = front_client(&stack.relay).await;
        publishers.push(tokio::spawn(async move {
            for index in 0..MESSAGES {
                let mut payload = vec![b'x'; PAYLOAD];
                payload[..8].copy_from_slice(&(index as u64).to_be_bytes());
                front
                    .publish(format!("flood.{client}"), payload.into())
                    .await
                    .unwrap();
            }
            front.flush().await.unwrap();
            front
        }));
    }
    let mut next = [0u64; CLIENTS];
    within("every message arrives", async {
        for _ in 0..CLIENTS * MESSAGES {
            let message = arrivals.next().await.unwrap();
            let client: usize = message.subject.as_str()["flood.".len()..].parse().unwrap();
            let index = u64::from_be_bytes(message.payload[..8].try_into().unwrap());
            assert_eq!(index, next[client], "client {client}: out of order or lost");
            assert_eq!(message.payload.len(), PAYLOAD);
            next[client] += 1;
        }
    })
    .await;
    for publisher in publishers {
        drop(publisher.await.unwrap());
    }
    let waited = metric(
        &scrape(&stack.relay),
        "holdfast_limit_rejections_total",
        &[("limit", "read_budget")],
    )
    .unwrap_or(0.0);
    assert!(waited > 0.0, "no NATS client waited for the read budget");
}
