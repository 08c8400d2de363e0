//! What the etcd front end costs the relay: the disk it writes for leases
//! kept alive, and the connections and descriptors its clients hold.
//! Issue 18: one `etcdctl lease keep-alive` made the relay write 201 MB in
//! 10 s, and 320 idle connections with 300 descriptors made the relay
//! unreachable on its socket and `/livez`, spinning at 114 % CPU.

use crate::bad_input::hello;
use crate::support::{
    free_port, metric, scrape, wait_until_async, within, EtcdServer, NatsServer, Relay, WAIT,
};
use bytes::BytesMut;
use etcd_client::{Client, PutOptions, WatchOptions};
use holdfast_wire::{ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// etcd, NATS and a relay whose etcd front end listens on `port`.
struct FrontStack {
    etcd: EtcdServer,
    _nats: NatsServer,
    relay: Relay,
    port: u16,
}

impl FrontStack {
    /// `tables` are appended to the config (e.g. a `[sessions]` table);
    /// `open_file_limit` starts the relay under that RLIMIT_NOFILE.
    fn start(tables: &str, open_file_limit: Option<u64>) -> FrontStack {
        let etcd = EtcdServer::start();
        let nats = NatsServer::start();
        let port = free_port();
        let config = format!(
            "[relay]\netcd_listen = \"127.0.0.1:{port}\"\n\n{}\n{tables}",
            etcd.relay_config("")
        );
        let relay = match open_file_limit {
            Some(limit) => Relay::start_with_open_file_limit(&nats.url(), &config, limit),
            None => Relay::start_with_config(&nats.url(), &config),
        };
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

    async fn front(&self) -> Client {
        Client::connect([self.endpoint()], None)
            .await
            .expect("connect to the etcd front end")
    }
}

fn count(relay: &Relay, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&scrape(relay), name, labels).unwrap_or(0.0)
}

/// Says HELLO on the relay's socket and reads the first frame back.
async fn first_frame(socket: &Path) -> Option<Frame> {
    let mut stream = UnixStream::connect(socket).await.ok()?;
    // Refused connections are closed as soon as GO_AWAY is out: the HELLO
    // may find the socket closed, the answer is there to read all the same.
    let _ = stream
        .write_all(&hello(PROTOCOL_VERSION, PROTOCOL_VERSION))
        .await;
    let mut decoder = FrameDecoder::new(u32::MAX);
    let mut received = BytesMut::new();
    loop {
        if let Ok(Some(frame)) = decoder.decode(&mut received) {
            return Some(frame);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => received.extend_from_slice(&chunk[..read]),
        }
    }
}

/// GET `path` on the relay's operations endpoint, giving up after `limit`:
/// the status code, or None if no answer came in time.
fn ops_get(relay: &Relay, path: &str, limit: Duration) -> Option<u16> {
    let started = Instant::now();
    let address = relay.metrics_address();
    let mut stream = TcpStream::connect_timeout(&address, limit).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    if started.elapsed() > limit {
        return None;
    }
    response.split(' ').nth(1)?.parse().ok()
}

/// The shortest lease TTL the front end grants (`MIN_TTL_SECONDS`).
const SHORT_TTL: i64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_leases_cost_little_disk_and_survive_a_crash() {
    let mut stack = FrontStack::start("", None);
    let mut front = stack.front().await;
    let mut etcd = stack.etcd.client().await;
    // 12 keys of 500 kB under one lease (binary values: JSON stored each
    // byte as a number).
    let big = front.lease_grant(30, None).await.unwrap().id();
    let value: Vec<u8> = (0..500_000u32).map(|i| (i % 251) as u8).collect();
    for key in 0..12 {
        front
            .put(
                format!("v1/big/{key:02}"),
                value.clone(),
                Some(PutOptions::new().with_lease(big)),
            )
            .await
            .unwrap();
    }
    let everything_upstream = async {
        loop {
            let found = etcd
                .get(
                    "v1/big/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .map(|answer| answer.count())
                .unwrap_or(0);
            if found == 12 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within("the 12 keys in etcd", everything_upstream).await;
    // A short lease (the front end's shortest TTL), whose expiry the
    // keepalives below move past the one saved with its grant (its TTL and
    // a half: 3 s).
    let short = front.lease_grant(SHORT_TTL, None).await.unwrap().id();
    let granted = Instant::now();
    front
        .put("v1/short", "up", Some(PutOptions::new().with_lease(short)))
        .await
        .unwrap();

    // Keep both alive every 500 ms until the short lease's saved expiry
    // has passed, on the relay's clock too (it granted the lease before
    // `granted`): only an expiry the keepalives saved keeps it after the
    // crash below. Nothing shows that time passing but the time.
    let written_before = stack.relay.bytes_written();
    let (mut big_keeper, mut big_answers) = front.lease_keep_alive(big).await.unwrap();
    let (mut short_keeper, mut short_answers) = front.lease_keep_alive(short).await.unwrap();
    let saved_expiry = Duration::from_secs(SHORT_TTL as u64 * 3 / 2);
    let mut rounds = 0;
    while granted.elapsed() < saved_expiry + Duration::from_millis(100) {
        big_keeper.keep_alive().await.unwrap();
        short_keeper.keep_alive().await.unwrap();
        for (answers, ttl) in [(&mut big_answers, 30), (&mut short_answers, SHORT_TTL)] {
            let answer = within("a keepalive answer", answers.message())
                .await
                .unwrap()
                .expect("an answer");
            assert_eq!(answer.ttl(), ttl);
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let written = stack.relay.bytes_written() - written_before;
    eprintln!(
        "the relay wrote {written} bytes during {rounds} rounds of keepalives in {:?}",
        granted.elapsed()
    );
    // The whole table (6 MB) rewritten each second would be 18 MB, on
    // each keepalive 12 times that.
    assert!(rounds >= 4, "{rounds}");
    assert!(written < 1_000_000, "wrote {written} bytes");
    let table = stack.relay.data_dir().join("etcd-front-leases.redb");
    let table_size = std::fs::metadata(&table).expect("the lease table").len();
    eprintln!("lease table with 6 MB of values: {table_size} bytes");
    assert!(
        table_size < 12_000_000,
        "values are stored as bytes: {table_size}"
    );

    // SIGKILL and start again at once: the expiry the keepalives saved
    // keeps the short lease, and the keys are registered again.
    stack.relay.restart();
    let mut front = stack.front().await;
    let alive = front.lease_time_to_live(short, None).await.unwrap();
    eprintln!("after the crash the short lease has {} s left", alive.ttl());
    assert!(alive.ttl() > 0, "the lease survived the crash");
    // Never more than its TTL and half of it (the saved expiry's slack).
    assert!(alive.ttl() <= SHORT_TTL * 3 / 2, "{}", alive.ttl());
    let (mut keeper, mut answers) = front.lease_keep_alive(short).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().ttl(), SHORT_TTL);
    assert!(front.lease_time_to_live(big, None).await.unwrap().ttl() > 0);
    let upstream = etcd.get("v1/big/07", None).await.unwrap();
    assert_eq!(upstream.kvs()[0].value(), value.as_slice());
    let upstream = etcd.get("v1/short", None).await.unwrap();
    assert_eq!(upstream.kvs()[0].value(), b"up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_etcd_connections_beyond_the_descriptors_leave_the_socket_and_livez_answering() {
    const LIMIT: u64 = 256;
    const FLOOD: usize = 300;
    let stack = FrontStack::start("[sessions]\nhello_timeout = \"2s\"\n", Some(LIMIT));
    let front_address: std::net::SocketAddr = format!("127.0.0.1:{}", stack.port).parse().unwrap();
    let flood: Vec<TcpStream> = tokio::task::block_in_place(|| {
        (0..FLOOD)
            .map(|_| TcpStream::connect(front_address).expect("connect to the front end"))
            .collect()
    });
    let flooded = Instant::now();

    // While all of them are open (none has been answered or closed by the
    // client): the operations endpoint and the socket answer.
    let livez =
        tokio::task::block_in_place(|| ops_get(&stack.relay, "/livez", Duration::from_secs(2)));
    assert_eq!(livez, Some(200), "/livez answers within 2 s");
    let answer = tokio::time::timeout(Duration::from_secs(3), first_frame(stack.relay.socket()))
        .await
        .expect("the socket answers HELLO within 3 s (before: no WELCOME within 3s)");
    let socket_refused = match answer {
        Some(Frame::Welcome(_)) => 0.0,
        // All the slots the descriptors allow are held: a clear, retryable no.
        Some(Frame::GoAway(go_away)) => {
            assert_eq!(go_away.code, ErrorCode::LimitExceeded);
            1.0
        }
        other => panic!("{other:?}"),
    };

    // The silent connections are closed after sessions.hello_timeout.
    tokio::task::block_in_place(|| {
        for mut stream in flood {
            stream.set_read_timeout(Some(WAIT)).unwrap();
            // The relay's HTTP/2 settings, then the end.
            let mut settings = Vec::new();
            match stream.read_to_end(&mut settings) {
                Ok(_) => {}
                Err(error) => assert!(
                    matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ),
                    "{error}"
                ),
            }
        }
    });
    let closed_after = flooded.elapsed();
    eprintln!("all {FLOOD} silent connections closed within {closed_after:?}");
    assert!(closed_after < Duration::from_secs(5), "{closed_after:?}");
    let client = within("a WELCOME once the silent connections are gone", async {
        loop {
            match holdfast_client::Client::connect(&stack.relay.url()).await {
                Ok(client) => break client,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    client.flush().await.unwrap();

    let text = scrape(&stack.relay);
    let limit =
        |name| metric(&text, "holdfast_limit_rejections_total", &[("limit", name)]).unwrap_or(0.0);
    eprintln!(
        "refused {} (connections), closed {} (hello_timeout)",
        limit("connections"),
        limit("hello_timeout")
    );
    // The descriptors allow fewer than 300 slots: the rest were refused.
    assert!(limit("connections") >= 1.0);
    assert!(limit("hello_timeout") >= 1.0);
    assert_eq!(
        limit("connections") + limit("hello_timeout"),
        FLOOD as f64 + socket_refused,
        "each silent connection was either refused or timed out"
    );
    assert_eq!(
        metric(&text, "holdfast_etcd_front_connections", &[]),
        Some(0.0)
    );
    assert!(stack
        .relay
        .logs()
        .contains("sessions.max_connections is more than the open-file limit leaves room for"));

    // And etcd clients are served as before.
    let mut front = stack.front().await;
    front.put("v1/after/flood", "ok", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_pauses_each_accept_loop_instead_of_spinning() {
    let stack = FrontStack::start("", None);
    let front_address: std::net::SocketAddr = format!("127.0.0.1:{}", stack.port).parse().unwrap();
    // No descriptor number above stdin, stdout and stderr may be taken: the
    // relay is out of descriptors until the limit is raised again.
    stack.relay.set_open_file_soft_limit(3);
    let cpu_before = stack.relay.cpu_time();
    let measured = Instant::now();
    let flood: Vec<TcpStream> = tokio::task::block_in_place(|| {
        (0..40)
            .map(|_| TcpStream::connect(front_address).expect("connect to the front end"))
            .collect()
    });
    // The socket and the operations endpoint are out of descriptors too.
    let socket = std::os::unix::net::UnixStream::connect(stack.relay.socket())
        .expect("the socket's backlog takes the connection");
    let ops = TcpStream::connect(stack.relay.metrics_address())
        .expect("the endpoint's backlog takes the connection");
    wait_until_async("an accept failing for want of descriptors", || async {
        stack
            .relay
            .logs()
            .contains("accept failed (out of file descriptors?)")
    })
    .await;
    // Every listener has pending connections it cannot accept: a loop that
    // retried at once would spin through this window. One second of CPU
    // time is the measurement itself, not a wait for anything.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = stack.relay.cpu_time() - cpu_before;
    let wall = measured.elapsed();
    eprintln!("out of descriptors: {cpu:?} of CPU in {wall:?}");
    assert!(cpu < wall / 4, "the relay spun: {cpu:?} of CPU in {wall:?}");

    // Descriptors back: every listener serves again within its pause.
    stack.relay.set_open_file_soft_limit(65_536);
    drop((flood, socket, ops));
    let text = within("the operations endpoint answers again", async {
        loop {
            let answered = tokio::task::block_in_place(|| {
                ops_get(&stack.relay, "/metrics", Duration::from_secs(2)).is_some()
            });
            if answered {
                break scrape(&stack.relay);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    for listener in ["etcd_front", "unix", "metrics"] {
        let failures = metric(
            &text,
            "holdfast_accept_failures_total",
            &[("listener", listener)],
        )
        .unwrap_or(0.0);
        eprintln!("{listener}: {failures} paused accepts");
        assert!(failures >= 1.0, "{listener} counted no paused accept");
    }
    let client = within(
        "a WELCOME",
        holdfast_client::Client::connect(&stack.relay.url()),
    )
    .await
    .unwrap();
    client.flush().await.unwrap();
    let mut front = stack.front().await;
    front.put("v1/after/emfile", "ok", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_connection_with_an_open_watch_stays_and_an_idle_one_is_closed() {
    let stack = FrontStack::start("[sessions]\nidle_timeout = \"1s\"\n", None);
    let mut etcd = stack.etcd.client().await;
    let idle_closed = |relay: &Relay| {
        count(
            relay,
            "holdfast_limit_rejections_total",
            &[("limit", "idle_timeout")],
        )
    };

    // A watch stream is a request that stays open; a connection whose
    // requests are all done is closed once idle. The watcher goes quiet
    // first, so by the time the idle connection is closed the watcher has
    // been quiet for longer than the idle timeout too.
    let mut watcher = stack.front().await;
    let mut events = watcher
        .watch("v1/quiet/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut idle = stack.front().await;
    idle.get("v1/quiet/a", None).await.unwrap();
    let closed = within("the idle connection closed", async {
        loop {
            if idle_closed(&stack.relay) >= 1.0 {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(idle_closed(&stack.relay), 1.0, "only the idle one");
    assert_eq!(
        count(&stack.relay, "holdfast_etcd_front_connections", &[]),
        1.0,
        "the watcher's connection is still open"
    );
    // Its connection stayed, and the event still arrives.
    etcd.put("v1/quiet/a", "1", None).await.unwrap();
    let key = within("the watch event", async {
        loop {
            let response = events.message().await.unwrap().expect("a watch response");
            if let Some(event) = response.events().first() {
                break event.kv().unwrap().key().to_vec();
            }
        }
    })
    .await;
    assert_eq!(key, b"v1/quiet/a");
    assert_eq!(idle_closed(&stack.relay), 1.0, "the watcher was not closed");
    // ...and its client simply connects again for its next request.
    tokio::time::sleep_until((closed + Duration::from_millis(200)).into()).await;
    let again = idle.get("v1/quiet/a", None).await.unwrap();
    assert_eq!(again.kvs()[0].value(), b"1");
}
