//! A tiny QUIC relay for the tests: a CA with server and client
//! certificates, a quinn endpoint with configurable TLS, and sessions that
//! speak the framed protocol on the client's bidirectional stream.

use super::within;
use futures::{SinkExt, StreamExt};
use holdfast_client::RelayUrl;
use holdfast_wire::{
    Frame, FrameCodec, Hello, LinkStatus, Pong, Text, Welcome, DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::codec::{FramedRead, FramedWrite};

/// A CA with a server certificate for localhost and a client certificate,
/// all also written as PEM files for the client's options.
pub struct Pki {
    dir: tempfile::TempDir,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
    ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        Pki::with_ca_name("holdfast test CA")
    }

    pub fn with_ca_name(ca_name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();

        let client_key = rcgen::KeyPair::generate().unwrap();
        let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "prefill-worker-3");
        let client = client_params.signed_by(&client_key, &issuer).unwrap();

        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
        Pki {
            dir,
            server_chain: vec![server.der().clone(), ca.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
            ca_der: ca.der().clone(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// How the test relay's TLS is set up.
pub struct RelayTls {
    pub alpn: &'static [u8],
    pub require_client_cert: bool,
}

impl Default for RelayTls {
    fn default() -> RelayTls {
        RelayTls {
            alpn: b"holdfast/1",
            require_client_cert: false,
        }
    }
}

pub struct QuicRelay {
    pub endpoint: Endpoint,
}

impl QuicRelay {
    pub fn start(pki: &Pki, tls: RelayTls) -> QuicRelay {
        QuicRelay::bind(pki, tls, "127.0.0.1:0".parse().unwrap())
    }

    pub fn bind(pki: &Pki, tls: RelayTls, address: SocketAddr) -> QuicRelay {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap();
        let builder = if tls.require_client_cert {
            let mut roots = RootCertStore::empty();
            roots.add(pki.ca_der.clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut crypto = builder
            .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
            .unwrap();
        crypto.alpn_protocols = vec![tls.alpn.to_vec()];
        let config =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto).unwrap()));
        QuicRelay {
            endpoint: Endpoint::server(config, address).unwrap(),
        }
    }

    pub fn port(&self) -> u16 {
        self.endpoint.local_addr().unwrap().port()
    }

    pub fn url(&self) -> RelayUrl {
        format!("quic://127.0.0.1:{}", self.port()).parse().unwrap()
    }

    /// A connection whose handshake completed.
    pub async fn accept_connection(&self) -> Connection {
        let incoming = within("a QUIC connection", self.endpoint.accept())
            .await
            .unwrap();
        within("the QUIC handshake", incoming.accept().unwrap())
            .await
            .unwrap()
    }

    /// Accepts a connection and its session stream, checks HELLO and
    /// answers WELCOME with `instance_id`.
    pub async fn accept_session(&self, instance_id: u64) -> Session {
        let connection = self.accept_connection().await;
        let (send, recv) = within("the session stream", connection.accept_bi())
            .await
            .unwrap();
        let mut session = Session {
            connection,
            reader: FramedRead::new(recv, FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)),
            writer: FramedWrite::new(send, FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)),
            hello: None,
        };
        let hello = match session.recv().await {
            Some(Frame::Hello(hello)) => hello,
            other => panic!("expected HELLO first, got {other:?}"),
        };
        assert_eq!(hello.min_version, PROTOCOL_VERSION);
        session
            .send(Frame::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                session_id: 7,
                instance_id,
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                nats: LinkStatus::Up,
                etcd: LinkStatus::Up,
                relay_id: Text::from("quic-test-relay"),
            }))
            .await;
        session.hello = Some(hello);
        session
    }
}

pub struct Session {
    pub connection: Connection,
    pub reader: FramedRead<RecvStream, FrameCodec>,
    pub writer: FramedWrite<SendStream, FrameCodec>,
    pub hello: Option<Hello>,
}

impl Session {
    /// The next frame, or `None` once the client finished its stream.
    pub async fn recv(&mut self) -> Option<Frame> {
        within("a frame from the client", self.reader.next())
            .await
            .map(|frame| frame.unwrap())
    }

    /// The next frame that is not a PING, answering PINGs on the way.
    pub async fn recv_answering_pings(&mut self) -> Option<Frame> {
        loop {
            match self.recv().await {
                Some(Frame::Ping(ping)) => self.send(Frame::Pong(Pong { nonce: ping.nonce })).await,
                other => return other,
            }
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        within("sending a frame", self.writer.send(frame))
            .await
            .unwrap();
    }
}
