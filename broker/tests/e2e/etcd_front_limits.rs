//! What the etcd front end costs the relay: the disk it writes for leases
//! kept alive. Issue 18: one `etcdctl lease keep-alive` made the relay
//! write 201 MB in 10 s.

use crate::support::{free_port, within, EtcdServer, NatsServer, Relay};
use etcd_client::{Client, PutOptions};
use std::time::{Duration, Instant};

/// etcd, NATS and a relay whose etcd front end listens on `port`.
struct FrontStack {
    etcd: EtcdServer,
    _nats: NatsServer,
    relay: Relay,
    port: u16,
}

impl FrontStack {
    fn start() -> FrontStack {
        let etcd = EtcdServer::start();
        let nats = NatsServer::start();
        let port = free_port();
        let config = format!(
            "[relay]\netcd_listen = \"127.0.0.1:{port}\"\n\n{}",
            etcd.relay_config("")
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

    async fn front(&self) -> Client {
        Client::connect([self.endpoint()], None)
            .await
            .expect("connect to the etcd front end")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_leases_cost_little_disk_and_survive_a_crash() {
    let mut stack = FrontStack::start();
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
    // A short lease, whose expiry the keepalives below move well past the
    // one saved with its grant (its TTL and a half).
    let short = front.lease_grant(4, None).await.unwrap().id();
    front
        .put("v1/short", "up", Some(PutOptions::new().with_lease(short)))
        .await
        .unwrap();

    // Keep both alive every 500 ms for 7 s.
    let written_before = stack.relay.bytes_written();
    let (mut big_keeper, mut big_answers) = front.lease_keep_alive(big).await.unwrap();
    let (mut short_keeper, mut short_answers) = front.lease_keep_alive(short).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        big_keeper.keep_alive().await.unwrap();
        short_keeper.keep_alive().await.unwrap();
        for (answers, ttl) in [(&mut big_answers, 30), (&mut short_answers, 4)] {
            let answer = within("a keepalive answer", answers.message())
                .await
                .unwrap()
                .expect("an answer");
            assert_eq!(answer.ttl(), ttl);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let written = stack.relay.bytes_written() - written_before;
    eprintln!("the relay wrote {written} bytes during 7 s of keepalives");
    // The whole table rewritten each second would be 140 MB.
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
    assert!(alive.ttl() <= 6, "{}", alive.ttl());
    let (mut keeper, mut answers) = front.lease_keep_alive(short).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().ttl(), 4);
    assert!(front.lease_time_to_live(big, None).await.unwrap().ttl() > 0);
    let upstream = etcd.get("v1/big/07", None).await.unwrap();
    assert_eq!(upstream.kvs()[0].value(), value.as_slice());
    let upstream = etcd.get("v1/short", None).await.unwrap();
    assert_eq!(upstream.kvs()[0].value(), b"up");
}
