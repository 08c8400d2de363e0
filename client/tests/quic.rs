//! The client over `quic://` against a tiny in-test QUIC relay: TLS against
//! a CA, ALPN, mutual TLS, one bidirectional stream per session, closing,
//! and reconnecting from the same endpoint. The relay here only speaks
//! HELLO/WELCOME, PING/PONG and reads PUBLISH; it checks the client's
//! transport plumbing, not the real relay.

mod support;

use holdfast_client::{Client, ConnectOptions, Error, RelayUrl, TlsError};
use holdfast_wire::Frame;
use quinn::ConnectionError;
use rustls_pki_types::CertificateDer;
use std::time::{Duration, Instant};
use support::quic_relay::{Pki, QuicRelay, RelayTls};
use support::within;

fn options(url: RelayUrl, pki: &Pki) -> ConnectOptions {
    ConnectOptions::new(url)
        .client_name("quic-test")
        .ping_interval(Duration::from_secs(60))
        .pong_timeout(Duration::from_secs(2))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .tls_ca(pki.path("ca.pem"))
}

#[tokio::test]
async fn a_session_runs_on_one_stream_and_closing_closes_the_connection() {
    let pki = Pki::new();
    let relay = QuicRelay::start(&pki, RelayTls::default());
    let (client, mut session) = tokio::join!(
        async {
            within("connect", Client::connect_with(options(relay.url(), &pki)))
                .await
                .unwrap()
        },
        relay.accept_session(41)
    );
    assert!(client.is_connected());
    assert_eq!(client.instance_id(), 41);
    assert_eq!(session.hello.as_ref().unwrap().client_name, "quic-test");
    assert_eq!(session.hello.as_ref().unwrap().instance_id, 0);
    let handshake = session
        .connection
        .handshake_data()
        .unwrap()
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .unwrap();
    assert_eq!(handshake.protocol.as_deref(), Some(&b"holdfast/1"[..]));
    assert_eq!(handshake.server_name.as_deref(), None, "IP literal: no SNI");

    client.publish("jobs.in", "over quic").await.unwrap();
    match session.recv_answering_pings().await {
        Some(Frame::Publish(publish)) => assert_eq!(publish.payload, "over quic"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    let relay_side = async {
        // The close-time flush, then the end of the stream, then the close.
        assert_eq!(session.recv_answering_pings().await, None);
        let started = Instant::now();
        let reason = within("the connection to close", session.connection.closed()).await;
        (reason, started.elapsed())
    };
    let (closed, (reason, waited)) = tokio::join!(within("close", client.close()), relay_side);
    closed.unwrap();
    match reason {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(u64::from(close.error_code), 0);
            assert_eq!(&close.reason[..], b"closed");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(1), "close took {waited:?}");
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection() {
    let pki = Pki::new();
    let relay = QuicRelay::start(&pki, RelayTls::default());
    let (client, session) = tokio::join!(
        async {
            Client::connect_with(options(relay.url(), &pki))
                .await
                .unwrap()
        },
        relay.accept_session(1)
    );
    drop(client);
    match within("the connection to close", session.connection.closed()).await {
        ConnectionError::ApplicationClosed(close) => assert_eq!(&close.reason[..], b"closed"),
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_lost_session_reconnects_from_the_same_endpoint() {
    let pki = Pki::new();
    let relay = QuicRelay::start(&pki, RelayTls::default());
    let (client, first) = tokio::join!(
        async {
            Client::connect_with(options(relay.url(), &pki))
                .await
                .unwrap()
        },
        relay.accept_session(5)
    );
    let client_address = first.connection.remote_address();
    first.connection.close(0u32.into(), b"shutting down");

    let second = relay.accept_session(5).await;
    assert_eq!(second.hello.as_ref().unwrap().instance_id, 5);
    assert_eq!(second.connection.remote_address(), client_address);
    within("reconnected", async {
        while !client.is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(client);
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let pki = Pki::new();
    let relay = QuicRelay::start(
        &pki,
        RelayTls {
            require_client_cert: true,
            ..RelayTls::default()
        },
    );
    let options =
        options(relay.url(), &pki).tls_client_cert(pki.path("client.pem"), pki.path("client.key"));
    let (client, mut session) = tokio::join!(
        async { Client::connect_with(options).await.unwrap() },
        relay.accept_session(2)
    );
    let chain = session
        .connection
        .peer_identity()
        .unwrap()
        .downcast::<Vec<CertificateDer<'static>>>()
        .unwrap();
    assert_eq!(chain.len(), 1);
    let (closed, end) = tokio::join!(client.close(), session.recv_answering_pings());
    closed.unwrap();
    assert_eq!(end, None);
}

#[tokio::test]
async fn localhost_reaches_a_relay_listening_on_one_address_family() {
    let pki = Pki::new();
    let relay = QuicRelay::start(&pki, RelayTls::default());
    let url: RelayUrl = format!("quic://localhost:{}", relay.port())
        .parse()
        .unwrap();
    let (client, _session) = tokio::join!(
        async {
            within("connect", Client::connect_with(options(url, &pki)))
                .await
                .unwrap()
        },
        relay.accept_session(3)
    );
    assert!(client.is_connected());
    drop(client);
}

/// Connects with `options` while the relay accepts (and, for a TLS failure,
/// fails) the handshake; returns the client's error.
async fn connect_error(relay: &QuicRelay, options: ConnectOptions) -> Error {
    let relay_side = async {
        // Whatever the relay sees, the client's error is what is checked.
        if let Ok(Some(incoming)) =
            tokio::time::timeout(Duration::from_secs(3), relay.endpoint.accept()).await
        {
            if let Ok(connection) = incoming.await {
                let _ = tokio::time::timeout(Duration::from_secs(3), connection.accept_bi()).await;
            }
        }
    };
    let (result, ()) = tokio::join!(within("connect", Client::connect_with(options)), relay_side);
    result.unwrap_err()
}

#[tokio::test]
async fn a_relay_certificate_from_another_ca_is_a_connect_error() {
    let pki = Pki::new();
    // Another CA, and one with the same name but its own key (as two runs
    // of a certificate generator would make).
    for (other, detail) in [
        (Pki::with_ca_name("another CA"), "UnknownIssuer"),
        (Pki::new(), "BadSignature"),
    ] {
        let relay = QuicRelay::start(&other, RelayTls::default());
        let error = connect_error(&relay, options(relay.url(), &pki)).await;
        assert!(matches!(error, Error::Connect { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(detail), "{message}");
        assert!(message.contains("--ca"), "{message}");
    }
}

#[tokio::test]
async fn a_relay_requiring_a_client_certificate_refuses_a_client_without_one() {
    let pki = Pki::new();
    let relay = QuicRelay::start(
        &pki,
        RelayTls {
            require_client_cert: true,
            ..RelayTls::default()
        },
    );
    let error = connect_error(&relay, options(relay.url(), &pki)).await;
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("client certificate"), "{message}");
    assert!(message.contains("--cert"), "{message}");
}

#[tokio::test]
async fn a_relay_without_the_holdfast_alpn_is_a_connect_error() {
    let pki = Pki::new();
    let relay = QuicRelay::start(
        &pki,
        RelayTls {
            alpn: b"h3",
            ..RelayTls::default()
        },
    );
    let error = connect_error(&relay, options(relay.url(), &pki)).await;
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(error.to_string().contains("holdfast/1"), "{error}");
}

#[tokio::test]
async fn a_silent_address_times_out_within_the_handshake_timeout() {
    let pki = Pki::new();
    // Bound but never answering: QUIC packets vanish.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let url: RelayUrl = format!("quic://127.0.0.1:{}", silent.local_addr().unwrap().port())
        .parse()
        .unwrap();
    let started = Instant::now();
    let error = within(
        "connect",
        Client::connect_with(options(url, &pki).pong_timeout(Duration::from_millis(300))),
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(error.to_string().contains("QUIC handshake"), "{error}");
}

#[tokio::test]
async fn tls_file_problems_are_reported_at_connect_even_when_retrying() {
    let pki = Pki::new();
    let url: RelayUrl = "quic://127.0.0.1:4433".parse().unwrap();
    let error = Client::connect_with(ConnectOptions::new(url.clone()).retry_initial_connect(true))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Tls(TlsError::MissingCa)),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    assert_eq!(error.name(), "invalid_tls_config");

    let error = Client::connect_with(
        options(url.clone(), &pki)
            .tls_client_cert(pki.path("client.pem"), pki.path("missing.key"))
            .retry_initial_connect(true),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, Error::Tls(TlsError::Read { .. })),
        "{error:?}"
    );
    assert!(error.to_string().contains("missing.key"), "{error}");

    let error = Client::connect_with(
        ConnectOptions::new("quic://bad_host!:4433".parse().unwrap()).tls_ca(pki.path("ca.pem")),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, Error::Tls(TlsError::InvalidServerName { .. })),
        "{error:?}"
    );
}
