//! The relay in-process on paused tokio time: deadlines of seconds and
//! minutes, at their shipped defaults, pass in no wall-clock time.
//!
//! No NATS or etcd runs here: both point at a loopback port nobody listens
//! on, so the links stay down, as in an outage. Time only moves when every
//! task waits on a timer (tokio's paused clock), so each deadline is
//! checked to the millisecond: not before it, not long after. The metrics
//! recorder is global to a process, so this binary runs one relay, in one
//! test.

use bytes::BytesMut;
use holdfast_broker::{Config, Overrides};
use holdfast_wire::{
    encode, ErrorCode, Frame, FrameDecoder, Hello, Register, RegisterAck, RegistrationOutcome,
    Text, PROTOCOL_VERSION,
};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// How late a deadline may fire on paused time: one turn of the loops that
/// check it, not a scheduling delay of a busy machine.
const SLACK: Duration = Duration::from_millis(50);

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut buffer = BytesMut::new();
    encode(frame, u32::MAX, &mut buffer).expect("encodable frame");
    buffer.to_vec()
}

fn hello() -> Vec<u8> {
    frame_bytes(&Frame::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client_name: Text::from_static("paused-time"),
        instance_id: 0,
    }))
}

/// Connects, sends `chunks`, then reads until the relay closes the
/// connection; returns the frames and when the connection closed, counted
/// from the connect.
async fn silent_after(socket: &Path, chunks: &[Vec<u8>]) -> (Vec<Frame>, Duration) {
    let started = Instant::now();
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    for chunk in chunks {
        stream.write_all(chunk).await.expect("write");
    }
    let mut received = BytesMut::new();
    loop {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&chunk[..read]),
        }
    }
    let closed = started.elapsed();
    let mut decoder = FrameDecoder::new(u32::MAX);
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = decoder.decode(&mut received) {
        frames.push(frame);
    }
    (frames, closed)
}

fn go_away(frames: &[Frame]) -> Option<(ErrorCode, String)> {
    frames.iter().find_map(|frame| match frame {
        Frame::GoAway(go_away) => Some((go_away.code, go_away.message.to_string())),
        _ => None,
    })
}

fn assert_closed_at(what: &str, closed: Duration, deadline: Duration) {
    assert!(
        closed >= deadline && closed <= deadline + SLACK,
        "{what}: closed after {closed:?}, the deadline is {deadline:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn session_deadlines_hold_at_their_defaults_on_paused_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Port 9 (discard) on loopback: nothing listens, connects are refused.
    let overrides = Overrides {
        socket: Some(dir.path().join("holdfast.sock")),
        data_dir: Some(dir.path().join("data")),
        nats_servers: Some("nats://127.0.0.1:9".to_string()),
        etcd_endpoints: Some("http://127.0.0.1:9".to_string()),
        metrics_addr: Some("127.0.0.1:0".to_string()),
        ..Overrides::default()
    };
    let config = Config::load(None, &overrides).expect("the defaults are a valid config");
    let sessions = config.sessions.clone();
    let liveness_timeout = config.etcd.liveness_timeout;
    let socket = config.relay.socket.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(holdfast_broker::run(config, async {
        let _ = stopped.await;
        "the test is over"
    }));
    // The socket is bound before anything is awaited that could take time.
    for _ in 0..1000 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        socket.exists(),
        "the relay did not bind {}",
        socket.display()
    );
    // Startup goes on after the bind (the journal opens, the first
    // connection attempts run on their own timers) and may hold up the
    // first accept; a second of paused time, free in wall-clock time, lets
    // it settle so each deadline below counts from the accept.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Connects and never says HELLO.
    let (frames, closed) = silent_after(&socket, &[]).await;
    let (code, message) = go_away(&frames).expect("a GO_AWAY before the close");
    assert_eq!(code, ErrorCode::Timeout, "{message}");
    assert!(message.contains("hello_timeout"), "{message}");
    assert_closed_at("no HELLO", closed, sessions.hello_timeout);

    // Says HELLO, then nothing.
    let (frames, closed) = silent_after(&socket, &[hello()]).await;
    assert!(
        matches!(frames.first(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );
    let (code, message) = go_away(&frames).expect("a GO_AWAY before the close");
    assert_eq!(code, ErrorCode::Timeout, "{message}");
    assert!(message.contains("idle_timeout"), "{message}");
    assert_closed_at("idle after HELLO", closed, sessions.idle_timeout);

    // Registers a key (etcd is down: the relay holds it, Buffered), then
    // goes silent: the liveness timeout, far shorter than the idle one,
    // ends the session so a dead worker does not stay registered.
    let register = frame_bytes(&Frame::Register(Register {
        request_id: 1,
        key: b"v1/instances/paused".to_vec().into(),
        value: b"w".to_vec().into(),
    }));
    let (frames, closed) = silent_after(&socket, &[hello(), register]).await;
    let buffered = frames.iter().any(|frame| {
        matches!(
            frame,
            Frame::RegisterAck(RegisterAck {
                request_id: 1,
                outcome: RegistrationOutcome::Buffered,
            })
        )
    });
    assert!(buffered, "{frames:?}");
    let (code, message) = go_away(&frames).expect("a GO_AWAY before the close");
    assert_eq!(code, ErrorCode::Timeout, "{message}");
    assert!(message.contains("liveness"), "{message}");
    assert!(liveness_timeout < sessions.idle_timeout);
    assert_closed_at("silent with a registration", closed, liveness_timeout);

    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(60), relay)
        .await
        .expect("the relay stops when told");
    stopped
        .expect("the relay task did not panic")
        .expect("the relay stopped cleanly");
}
