//! What slow subscribers and many subscriptions cost the relay in resident
//! memory, while they last and after their connections close.
//!
//! The first test checks what an operator would: N subscribers that stop reading
//! grow the relay by at most N × `sessions.outbound_queue_bytes` (plus a
//! stated slack), and a second round of them does not grow it further.
//! A second test checks that thousands of subscriptions closed at once all
//! end upstream too. Two ignored tests take the measurements behind them,
//! before and after each round, against a release build:
//! `cargo test --release -p holdfast-broker --test e2e memory::measure -- --ignored --nocapture`
//! (`HOLDFAST_MEM_GDB=1` adds glibc's own account of the heap, via gdb:
//! memory in use against memory the allocator keeps).

use crate::limits::relay_rss_mib;
use crate::support::{free_port, metric, scrape, within, NatsServer, Relay, Stack, WAIT};
use bytes::{Bytes, BytesMut};
use holdfast_wire::{encode, Frame, FrameDecoder, Hello, Ping, Subscribe, Text, PROTOCOL_VERSION};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

/// A connection that said HELLO and subscribed to `subjects` (sids from 1);
/// it reads nothing until told to.
async fn subscriber(socket: &std::path::Path, subjects: &[String]) -> UnixStream {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    let mut bytes = BytesMut::new();
    let hello = Frame::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client_name: Text::from_static("memory"),
        instance_id: 0,
    });
    encode(&hello, u32::MAX, &mut bytes).expect("encode");
    for (index, subject) in subjects.iter().enumerate() {
        let subscribe = Frame::Subscribe(Subscribe {
            sid: u32::try_from(index + 1).expect("sid"),
            subject: Text::from(subject.as_str()),
            queue_group: None,
        });
        encode(&subscribe, u32::MAX, &mut bytes).expect("encode");
    }
    stream.write_all(&bytes).await.expect("send");
    barrier(&mut stream).await;
    stream
}

/// Sends a PING and reads until its PONG: every SUBSCRIBE before it is in
/// place, upstream too.
async fn barrier(stream: &mut UnixStream) {
    const NONCE: u64 = 77;
    let mut bytes = BytesMut::new();
    encode(&Frame::Ping(Ping { nonce: NONCE }), u32::MAX, &mut bytes).expect("encode");
    stream.write_all(&bytes).await.expect("send");
    let mut decoder = FrameDecoder::new(u32::MAX);
    let mut buffer = BytesMut::new();
    within("the PONG", async {
        loop {
            while let Ok(Some(frame)) = decoder.decode(&mut buffer) {
                if matches!(frame, Frame::Pong(pong) if pong.nonce == NONCE) {
                    return;
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => panic!("connection closed before the PONG"),
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
}

/// Reads and discards everything the connection gets: a subscriber that
/// keeps up. Aborted by the caller.
fn keep_reading(mut stream: UnixStream) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut chunk = vec![0u8; 1024 * 1024];
        while let Ok(read) = stream.read(&mut chunk).await {
            if read == 0 {
                return;
            }
        }
    })
}

/// Messages the relay has handled for its local subscribers: queued for
/// one, or dropped for one whose queue was full.
fn handled(relay: &Relay) -> f64 {
    let text = scrape(relay);
    metric(&text, "holdfast_messages_delivered_total", &[]).unwrap_or(0.0) + slow_drops_in(&text)
}

fn slow_drops_in(metrics: &str) -> f64 {
    metric(
        metrics,
        "holdfast_messages_dropped_total",
        &[("reason", "slow_consumer")],
    )
    .unwrap_or(0.0)
}

/// Waits until the relay has handled `count` messages.
async fn handled_at_least(relay: &Relay, count: f64) {
    let deadline = Instant::now() + WAIT;
    while handled(relay) < count {
        assert!(
            Instant::now() < deadline,
            "the relay handled {} of {count} messages",
            handled(relay)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `sessions` connections with `upstream` upstream
/// subscriptions are left.
async fn down_to(relay: &Relay, sessions: u64, upstream: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = relay.status();
        if status["sessions"] == sessions && status["subscriptions"]["upstream"] == upstream {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sessions did not close: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscribers_hold_at_most_their_queue_bound_and_a_second_round_reuses_it() {
    const QUEUE_MIB: usize = 4;
    const SLOW: usize = 4;
    // Each slow subscriber's subject is quiet next to a busy one that a
    // reader keeps up with: a 16 KiB message, then 48 KiB of another
    // subject's. The relay reads NATS 64 KiB at a time, so a message it
    // kept as a slice of its read buffer held four times its size.
    const MESSAGE: usize = 16 * 1024;
    const BUSY: usize = 48 * 1024;
    // 6 MiB to each slow subscriber, more than its queue takes; published
    // in steps the relay has handled before the next, so that what NATS
    // sends faster than the relay reads does not blur the figure.
    const PER_SUBSCRIBER: usize = 384;
    const STEP: usize = 8;
    // The relay's own growth unrelated to the queues: sessions' write
    // buffers, tasks, the allocator's rounding, and memory glibc keeps
    // after the messages that went through were freed.
    const SLACK_MIB: f64 = 16.0;
    // glibc keeps freed memory in per-thread arenas, and a second round's
    // allocations may come from another arena than the one the first
    // round's went back to: 1 to 5 MiB more here. Leaking the queues would
    // be 16 MiB more.
    const SECOND_ROUND_MIB: f64 = 8.0;
    let stack = Stack::start_with_config(&format!(
        "[sessions]\noutbound_queue_bytes = {}\n",
        QUEUE_MIB * 1024 * 1024
    ));
    let nats = stack.direct_nats().await;
    let busy_reader = keep_reading(subscriber(stack.relay.socket(), &["busy".to_string()]).await);
    let message = Bytes::from(vec![b'm'; MESSAGE]);
    let busy = Bytes::from(vec![b'b'; BUSY]);
    let before = relay_rss_mib(&stack.relay);
    let mut expected = handled(&stack.relay);
    let mut grown = Vec::new();
    for _round in 0..2 {
        let drops_before = slow_drops_in(&scrape(&stack.relay));
        let mut slow = Vec::new();
        for index in 0..SLOW {
            slow.push(subscriber(stack.relay.socket(), &[format!("slow.{index}")]).await);
        }
        for _ in 0..PER_SUBSCRIBER / STEP {
            for _ in 0..STEP {
                for index in 0..SLOW {
                    nats.publish(format!("slow.{index}"), message.clone())
                        .await
                        .expect("publish");
                    nats.publish("busy", busy.clone()).await.expect("publish");
                }
            }
            nats.flush().await.expect("flush");
            expected += (STEP * SLOW * 2) as f64;
            handled_at_least(&stack.relay, expected).await;
        }
        grown.push(relay_rss_mib(&stack.relay) - before);
        assert!(
            slow_drops_in(&scrape(&stack.relay)) > drops_before,
            "the slow subscribers' queues never filled"
        );
        drop(slow);
        down_to(&stack.relay, 1, 1).await;
    }
    busy_reader.abort();
    println!("grown by {:.1} MiB, then {:.1} MiB", grown[0], grown[1]);
    // The busy subject's reader holds at most a queue's worth too.
    let bound = ((SLOW + 1) * QUEUE_MIB) as f64 + SLACK_MIB;
    assert!(
        grown[0] <= bound,
        "{SLOW} slow subscribers with {QUEUE_MIB} MiB queues grew the relay by {:.1} MiB (bound {bound} MiB)",
        grown[0]
    );
    assert!(
        grown[1] <= grown[0] + SECOND_ROUND_MIB,
        "a second round grew the relay further: {:.1} MiB after the first, {:.1} MiB after the second",
        grown[0],
        grown[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_thousands_of_subscriptions_at_once_ends_every_one_upstream() {
    // Each connection's subscriptions are released at once when it
    // closes. The relay's unsubscribes used to go through a queue of 4096
    // that dropped them when full: the rest stayed subscribed on NATS for
    // the relay's life, each with its table entry and channel (30k closed
    // at once left 12k to 16k behind, about 6 KB each).
    const CONNECTIONS: usize = 2;
    const PER_CONNECTION: usize = 8_000;
    let monitor = free_port();
    let nats = NatsServer::start_configured(&format!("http: \"127.0.0.1:{monitor}\"\n"));
    let relay = Relay::start(&nats.url());
    for round in 0..2 {
        let mut streams = Vec::new();
        for connection in 0..CONNECTIONS {
            let subjects: Vec<String> = (0..PER_CONNECTION)
                .map(|n| format!("many.{round}.{connection}.{n}"))
                .collect();
            streams.push(subscriber(relay.socket(), &subjects).await);
        }
        let subscribed = (CONNECTIONS * PER_CONNECTION) as u64;
        assert_eq!(nats_subscriptions(monitor), subscribed);
        drop(streams);
        down_to(&relay, 0, 0).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let left = nats_subscriptions(monitor);
            if left == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {left} of the {subscribed} subscriptions are still on NATS after their connections closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// VmRSS and VmHWM of the relay, in MiB.
fn memory_mib(relay: &Relay) -> (f64, f64) {
    let pid = relay.pid().expect("relay is running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Waits until the relay stopped handling messages (the count unchanged
/// for half a second).
async fn settle(relay: &Relay) {
    let mut last = -1.0;
    let deadline = Instant::now() + WAIT * 6;
    loop {
        let now = handled(relay);
        if now == last {
            return;
        }
        assert!(Instant::now() < deadline, "the relay keeps delivering");
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// With `HOLDFAST_MEM_GDB=1`: glibc's own account of the relay's heap
/// (`malloc_stats`, which prints to the relay's log) and, with `trim`, its
/// RSS after `malloc_trim(0)`, to tell memory in use from memory the
/// allocator keeps for reuse. gdb runs to completion each time.
fn allocator_report(relay: &Relay, when: &str, trim: bool) {
    if env_or("HOLDFAST_MEM_GDB", 0) != 1 {
        return;
    }
    let pid = relay.pid().expect("relay is running").to_string();
    let gdb = |call: &str| {
        let output = std::process::Command::new("gdb")
            .args(["-p", &pid, "-batch", "-ex", call])
            .output()
            .expect("run gdb");
        assert!(output.status.success(), "{output:?}");
    };
    let logged = relay.logs().len();
    gdb("call (void)malloc_stats()");
    std::thread::sleep(Duration::from_millis(200));
    let logs = relay.logs();
    let total: Vec<&str> = logs[logged.min(logs.len())..]
        .lines()
        .skip_while(|line| !line.starts_with("Total"))
        .skip(1)
        .take(2)
        .map(str::trim)
        .collect();
    println!("{when}: malloc_stats {}", total.join(", "));
    if trim {
        gdb("call (int)malloc_trim(0)");
        println!(
            "{when}: rss after malloc_trim(0) {:.1} MiB",
            memory_mib(relay).0
        );
    }
}

/// Subscriptions nats-server holds for the relay's subscriber connection
/// (named "holdfastd ... subscriptions"), from its monitoring port.
fn nats_subscriptions(monitor_port: u16) -> u64 {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", monitor_port)).expect("connect to monitor");
    write!(
        stream,
        "GET /connz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or("");
    let connz: serde_json::Value = serde_json::from_str(body).expect("connz JSON");
    connz["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|connection| {
            connection["name"].as_str().is_some_and(|name| {
                name.starts_with("holdfastd ") && name.ends_with(" subscriptions")
            })
        })
        .map(|connection| connection["subscriptions"].as_u64().unwrap_or(0))
        .sum()
}

/// Scenario (a): subscribers that never read, while plain NATS publishes
/// `HOLDFAST_MEM_MESSAGES` (200k) × `HOLDFAST_MEM_SIZE` (1 KiB), for
/// `HOLDFAST_MEM_ROUNDS` (2) rounds. `HOLDFAST_MEM_SUBSCRIBERS` (4) of them,
/// on one subject, or on one each with `HOLDFAST_MEM_DISTINCT=1`; with
/// `HOLDFAST_MEM_SPREAD=K`, publishes go round-robin to K subjects, the
/// subscribers take the first ones and a reader that keeps up takes all.
/// `HOLDFAST_MEM_CONFIG`: extra relay TOML (`\n` for newlines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_slow_subscribers() {
    let subscribers = env_or("HOLDFAST_MEM_SUBSCRIBERS", 4);
    let messages = env_or("HOLDFAST_MEM_MESSAGES", 200_000);
    let size = env_or("HOLDFAST_MEM_SIZE", 1024);
    let rounds = env_or("HOLDFAST_MEM_ROUNDS", 2);
    let distinct = env_or("HOLDFAST_MEM_DISTINCT", 0) == 1;
    let spread = env_or("HOLDFAST_MEM_SPREAD", 0);
    let config = std::env::var("HOLDFAST_MEM_CONFIG").unwrap_or_default();
    let nats = NatsServer::start();
    let relay = Relay::start_with_config(&nats.url(), &config.replace("\\n", "\n"));
    let direct = async_nats::connect(nats.url()).await.expect("connect");
    let payload = Bytes::from(vec![b'x'; size]);
    println!("config {config:?}: {subscribers} subscribers, {messages} x {size} B, distinct {distinct}, spread {spread}");
    let (rss, hwm) = memory_mib(&relay);
    println!("start: rss {rss:.1} MiB hwm {hwm:.1} MiB");
    let subjects: Vec<String> = (0..subscribers.max(spread))
        .map(|n| {
            if distinct || spread > 0 {
                format!("flood.{n}")
            } else {
                "flood".to_string()
            }
        })
        .collect();
    for round in 1..=rounds {
        let reader = if spread > 0 {
            Some(keep_reading(
                subscriber(relay.socket(), &["flood.>".to_string()]).await,
            ))
        } else {
            None
        };
        let mut streams = Vec::new();
        for subject in subjects.iter().take(subscribers) {
            streams.push(subscriber(relay.socket(), std::slice::from_ref(subject)).await);
        }
        let started = Instant::now();
        let cpu_before = relay.cpu_time();
        for index in 0..messages {
            direct
                .publish(subjects[index % subjects.len()].clone(), payload.clone())
                .await
                .expect("publish");
        }
        direct.flush().await.expect("flush");
        settle(&relay).await;
        let cpu = relay.cpu_time() - cpu_before;
        let (rss, hwm) = memory_mib(&relay);
        println!(
            "round {round} during: rss {rss:.1} MiB hwm {hwm:.1} MiB ({:.1}s, relay cpu {:.2} us/message)",
            started.elapsed().as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / messages as f64
        );
        allocator_report(&relay, &format!("round {round} during"), false);
        drop(streams);
        if let Some(reader) = reader {
            reader.abort();
        }
        down_to(&relay, 0, 0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss, hwm) = memory_mib(&relay);
        println!("round {round} after close: rss {rss:.1} MiB hwm {hwm:.1} MiB");
        allocator_report(&relay, &format!("round {round} after close"), true);
    }
}

/// Scenario (b): `HOLDFAST_MEM_SUBSCRIPTIONS` (30k) subscriptions on
/// distinct subjects, 10k per connection, then closed; `HOLDFAST_MEM_ROUNDS`
/// (2) rounds. Also shows nats-server's count of subscriptions, which
/// must fall back once they are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_many_subscriptions() {
    let total = env_or("HOLDFAST_MEM_SUBSCRIPTIONS", 30_000);
    let per_connection = 10_000;
    let rounds = env_or("HOLDFAST_MEM_ROUNDS", 2);
    let monitor = free_port();
    let nats = NatsServer::start_configured(&format!("http: \"127.0.0.1:{monitor}\"\n"));
    let relay = Relay::start(&nats.url());
    let (rss, hwm) = memory_mib(&relay);
    println!(
        "start: rss {rss:.1} MiB hwm {hwm:.1} MiB, nats subscriptions {}",
        nats_subscriptions(monitor)
    );
    for round in 1..=rounds {
        let mut streams = Vec::new();
        let mut next = 0;
        while next < total {
            let end = (next + per_connection).min(total);
            let subjects: Vec<String> = (next..end).map(|n| format!("many.{n}")).collect();
            streams.push(subscriber(relay.socket(), &subjects).await);
            next = end;
        }
        let (rss, hwm) = memory_mib(&relay);
        println!(
            "round {round} during: rss {rss:.1} MiB hwm {hwm:.1} MiB, nats subscriptions {}",
            nats_subscriptions(monitor)
        );
        allocator_report(&relay, &format!("round {round} during"), false);
        drop(streams);
        down_to(&relay, 0, 0).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (rss, hwm) = memory_mib(&relay);
        println!(
            "round {round} after close: rss {rss:.1} MiB hwm {hwm:.1} MiB, nats subscriptions {}",
            nats_subscriptions(monitor)
        );
        allocator_report(&relay, &format!("round {round} after close"), true);
    }
}
