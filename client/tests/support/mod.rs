//! A scripted stand-in for holdfastd on a Unix socket, shared by the tests.
//!
//! It speaks the real framed protocol through `holdfast_wire::FrameCodec`;
//! each test scripts what it answers. No NATS is involved.

#![allow(dead_code)] // each test file uses a different part of it

pub mod quic_relay;

use futures::{SinkExt, StreamExt};
use holdfast_client::{ConnectOptions, RelayUrl};
use holdfast_wire::{
    Frame, FrameCodec, Hello, LinkStatus, Pong, Publish, Register, RegisterAck,
    RegistrationOutcome, Subscribe, Text, Watch, Welcome, DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

/// Upper bound on every wait in these tests.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(STEP_TIMEOUT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

pub struct FakeRelay {
    listener: UnixListener,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeRelay {
    pub fn start() -> FakeRelay {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        FakeRelay::bind(dir, path)
    }

    /// Listens at `path` (inside `dir`, which lives as long as the relay).
    pub fn bind(dir: tempfile::TempDir, path: PathBuf) -> FakeRelay {
        let listener = UnixListener::bind(&path).unwrap();
        FakeRelay {
            listener,
            path,
            _dir: dir,
        }
    }

    pub fn url(&self) -> RelayUrl {
        RelayUrl::Unix {
            path: self.path.clone(),
        }
    }

    /// Options for tests: no keepalive traffic unless a test asks for it,
    /// quick reconnects.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions::new(self.url())
            .client_name("fake-relay-test")
            .ping_interval(Duration::from_secs(60))
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
    }

    pub async fn accept(&self) -> RelayConnection {
        let (stream, _) = within("a client connection", self.listener.accept())
            .await
            .unwrap();
        RelayConnection {
            framed: Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)),
        }
    }

    /// Accepts a connection, checks its HELLO and welcomes it with `instance_id`.
    pub async fn accept_session(&self, instance_id: u64) -> (RelayConnection, Hello) {
        self.accept_session_with_etcd(instance_id, LinkStatus::Unknown)
            .await
    }

    /// Like [`FakeRelay::accept_session`], announcing `etcd` as the etcd link's state.
    pub async fn accept_session_with_etcd(
        &self,
        instance_id: u64,
        etcd: LinkStatus,
    ) -> (RelayConnection, Hello) {
        let mut connection = self.accept().await;
        let hello = match connection.recv().await {
            Frame::Hello(hello) => hello,
            other => panic!("expected HELLO first, got {other:?}"),
        };
        assert_eq!(hello.min_version, PROTOCOL_VERSION);
        assert_eq!(hello.max_version, PROTOCOL_VERSION);
        connection
            .send(Frame::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                session_id: 1000 + instance_id,
                instance_id,
                relay_id: Text::from("fake-relay"),
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                nats: LinkStatus::Up,
                etcd,
            }))
            .await;
        (connection, hello)
    }
}

pub struct RelayConnection {
    pub framed: Framed<UnixStream, FrameCodec>,
}

impl RelayConnection {
    pub async fn recv(&mut self) -> Frame {
        within("a frame from the client", self.framed.next())
            .await
            .expect("client closed the connection")
            .expect("client sent an invalid frame")
    }

    /// The next frame that is not a PING; PINGs are answered on the way.
    pub async fn recv_answering_pings(&mut self) -> Frame {
        loop {
            match self.recv().await {
                Frame::Ping(ping) => self.send(Frame::Pong(Pong { nonce: ping.nonce })).await,
                other => return other,
            }
        }
    }

    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv_answering_pings().await {
            Frame::Publish(publish) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        within("sending a frame", self.framed.send(frame))
            .await
            .unwrap();
    }

    /// Reads one frame, answering it if it is a PING; `false` once the
    /// client has hung up. For letting a client finish (e.g. its close-time
    /// flush) in the background.
    pub async fn framed_next_answering(&mut self) -> bool {
        match self.framed.next().await {
            Some(Ok(Frame::Ping(ping))) => {
                self.send(Frame::Pong(Pong { nonce: ping.nonce })).await;
                true
            }
            Some(Ok(_)) => true,
            _ => false,
        }
    }

    /// The next frame that is not a PING, which must be a REGISTER.
    pub async fn recv_register(&mut self) -> Register {
        match self.recv_answering_pings().await {
            Frame::Register(register) => register,
            other => panic!("expected REGISTER, got {other:?}"),
        }
    }

    pub async fn ack_registration(&mut self, request_id: u64, outcome: RegistrationOutcome) {
        self.send(Frame::RegisterAck(RegisterAck {
            request_id,
            outcome,
        }))
        .await;
    }

    /// Reads WATCH and its PING barrier, answers the PONG, returns the WATCH.
    pub async fn accept_watch(&mut self) -> Watch {
        let watch = match self.recv().await {
            Frame::Watch(watch) => watch,
            other => panic!("expected WATCH, got {other:?}"),
        };
        match self.recv().await {
            Frame::Ping(ping) => self.send(Frame::Pong(Pong { nonce: ping.nonce })).await,
            other => panic!("expected the PING barrier after WATCH, got {other:?}"),
        }
        watch
    }

    /// Reads SUBSCRIBE and its PING barrier, answers the PONG, returns the SUBSCRIBE.
    pub async fn accept_subscribe(&mut self) -> Subscribe {
        let subscribe = match self.recv().await {
            Frame::Subscribe(subscribe) => subscribe,
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        };
        match self.recv().await {
            Frame::Ping(ping) => self.send(Frame::Pong(Pong { nonce: ping.nonce })).await,
            other => panic!("expected the PING barrier after SUBSCRIBE, got {other:?}"),
        }
        subscribe
    }
}
