//! Reaching a `quic://` relay: one QUIC connection per session, carrying
//! the session on the one bidirectional stream the client opens.
//!
//! A [`QuicConnector`] is made once per client. It holds the TLS
//! configuration (built from the files when the client connects) and the
//! client's UDP endpoints, one per address family, created on first use and
//! reused by every reconnect. Each attempt resolves the host again, so a
//! relay that moved is found.

use crate::options::ConnectOptions;
use crate::tls::{self, TlsError};
use futures::stream::{FuturesUnordered, StreamExt};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{
    ConnectError, Connection, ConnectionError, Endpoint, ReadError, RecvStream, SendStream,
    StoppedError, TransportConfig, VarInt, WriteError,
};
use rustls_pki_types::ServerName;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The application error code of a connection the client closes on purpose.
const CLOSE_CODE: VarInt = VarInt::from_u32(0);

/// How long after one resolved address the next is tried as well (RFC 8305's
/// connection attempt delay): `localhost` resolves to `::1` and `127.0.0.1`,
/// and a relay listening on only one of them must not cost a handshake
/// timeout, while one that answers at once is not dialled twice.
const ATTEMPT_STAGGER: Duration = Duration::from_millis(250);

/// QUIC-level keepalive, independent of the session's PING interval: a
/// client configured with a long ping interval must not have its connection
/// idle-timed-out underneath the session.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// How long a closing client gives its endpoint to put the CONNECTION_CLOSE
/// on the wire. The relay then ends the session at once instead of waiting
/// for its liveness timeout; waiting out the whole drain period (three
/// probe timeouts) would only delay the caller.
const CLOSE_SEND_GRACE: Duration = Duration::from_millis(100);

/// Dials the relay at one `quic://host:port`; cheap to clone.
#[derive(Clone)]
pub(crate) struct QuicConnector {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    port: u16,
    config: quinn::ClientConfig,
    endpoints: Mutex<Endpoints>,
}

#[derive(Default)]
struct Endpoints {
    v4: Option<Endpoint>,
    v6: Option<Endpoint>,
}

/// One session's stream halves and the connection under them.
pub(crate) struct QuicStream {
    pub(crate) reader: QuicReader,
    pub(crate) writer: QuicWriter,
    pub(crate) link: QuicLink,
}

impl QuicConnector {
    /// Reads the TLS files `options` name; every problem with them is
    /// reported here, before any connection attempt.
    pub(crate) fn new(
        host: &str,
        port: u16,
        options: &ConnectOptions,
    ) -> Result<QuicConnector, TlsError> {
        // quinn hands the host to rustls as the server name, which takes an
        // IP literal as an IP address and anything else as a DNS name;
        // checked here so a bad one is a configuration error, not a retry.
        if ServerName::try_from(host).is_err() {
            return Err(TlsError::InvalidServerName {
                host: host.to_owned(),
            });
        }
        let crypto = QuicClientConfig::try_from(tls::client_config(options)?)
            .map_err(|error| TlsError::Unsupported(error.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        config.transport_config(Arc::new(transport));
        Ok(QuicConnector {
            inner: Arc::new(Inner {
                host: host.to_owned(),
                port,
                config,
                endpoints: Mutex::new(Endpoints::default()),
            }),
        })
    }

    /// Resolves the host, completes a QUIC handshake with one of its
    /// addresses before `deadline`, and opens the session's stream.
    pub(crate) async fn connect(&self, deadline: Instant) -> io::Result<QuicStream> {
        let host = self.inner.host.as_str();
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, self.inner.port))
            .await?
            .collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            ));
        }
        let Ok(dialled) = tokio::time::timeout_at(deadline, self.dial_any(&addresses)).await else {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no QUIC handshake with {} in time: is the relay listening for QUIC there?",
                    list(&addresses)
                ),
            ));
        };
        let (connection, endpoint) = dialled?;
        let (writer, reader) = connection.open_bi().await.map_err(|error| {
            io::Error::other(format!(
                "cannot open the session stream: {}",
                describe(&error)
            ))
        })?;
        Ok(QuicStream {
            reader: QuicReader(reader),
            writer: QuicWriter::new(writer),
            link: QuicLink {
                connection,
                endpoint,
            },
        })
    }

    /// Handshakes with the addresses in order, each starting
    /// [`ATTEMPT_STAGGER`] after the previous one; the first to succeed wins
    /// and the others are dropped, which closes them.
    async fn dial_any(&self, addresses: &[SocketAddr]) -> io::Result<(Connection, Endpoint)> {
        let mut attempts: FuturesUnordered<_> = addresses
            .iter()
            .zip(0u32..)
            .map(|(&address, index)| async move {
                tokio::time::sleep(ATTEMPT_STAGGER * index).await;
                (address, self.dial(address).await)
            })
            .collect();
        // The URL already names an IP literal's only address.
        let name_addresses = self.inner.host.parse::<IpAddr>().is_err() || addresses.len() > 1;
        let mut failures = Vec::new();
        while let Some((address, outcome)) = attempts.next().await {
            match outcome {
                Ok(dialled) => return Ok(dialled),
                Err(reason) if name_addresses => failures.push(format!("{address}: {reason}")),
                Err(reason) => failures.push(reason),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("QUIC handshake failed: {}", failures.join("; ")),
        ))
    }

    async fn dial(&self, address: SocketAddr) -> Result<(Connection, Endpoint), String> {
        let endpoint = self
            .endpoint(address)
            .map_err(|error| format!("cannot open a UDP socket: {error}"))?;
        let connecting =
            match endpoint.connect_with(self.inner.config.clone(), address, &self.inner.host) {
                Ok(connecting) => connecting,
                Err(error) => {
                    if let ConnectError::EndpointStopping = error {
                        // Its socket failed: the next attempt gets a fresh one.
                        self.forget_endpoint(address);
                    }
                    return Err(error.to_string());
                }
            };
        let connection = connecting.await.map_err(|error| describe(&error))?;
        Ok((connection, endpoint))
    }

    /// The endpoint for `address`'s family, bound on first use.
    fn endpoint(&self, address: SocketAddr) -> io::Result<Endpoint> {
        let mut endpoints = self.endpoints();
        let (slot, local) = if address.is_ipv6() {
            (
                &mut endpoints.v6,
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            )
        } else {
            (
                &mut endpoints.v4,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            )
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let endpoint = Endpoint::client(local)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    fn forget_endpoint(&self, address: SocketAddr) {
        let mut endpoints = self.endpoints();
        if address.is_ipv6() {
            endpoints.v6 = None;
        } else {
            endpoints.v4 = None;
        }
    }

    fn endpoints(&self) -> std::sync::MutexGuard<'_, Endpoints> {
        // Two optional handles cannot be left half-updated by a panic.
        self.inner
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The connection under a session. The session's streams keep it open; this
/// is how it is closed on purpose.
pub(crate) struct QuicLink {
    connection: Connection,
    /// The UDP socket the connection runs on: held so that the session never
    /// depends on the connector still existing, and waited on when closing.
    endpoint: Endpoint,
}

impl QuicLink {
    /// Closes the connection because the client is done, and gives the
    /// endpoint a moment to send the CONNECTION_CLOSE: a process that exits
    /// right after closing would otherwise leave its session (and its etcd
    /// registrations) to the relay's liveness timeout.
    pub(crate) async fn close(self) {
        let already_closed = self.connection.close_reason().is_some();
        self.connection.close(CLOSE_CODE, b"closed");
        if !already_closed {
            let _ = tokio::time::timeout(CLOSE_SEND_GRACE, self.endpoint.wait_idle()).await;
        }
    }

    /// Closes the connection of a session that failed, so nothing of it
    /// outlives the reconnect.
    pub(crate) fn abandon(self) {
        self.connection.close(CLOSE_CODE, b"session lost");
    }
}

/// A connection error in words, with a hint for the TLS alerts that come
/// from configuration mistakes.
fn describe(error: &ConnectionError) -> String {
    // TLS alerts travel as QUIC crypto errors: 0x100 + the alert number.
    let (alert, from_relay) = match error {
        ConnectionError::TransportError(error) => (u64::from(error.code), false),
        ConnectionError::ConnectionClosed(close) => (u64::from(close.error_code), true),
        _ => return error.to_string(),
    };
    let hint = match (alert.checked_sub(0x100), from_relay) {
        (Some(116), true) => {
            "the relay requires a client certificate: pass --cert and --key, or set HOLDFAST_CERT and HOLDFAST_KEY"
        }
        (Some(42..=49), true) => "the relay does not accept this client certificate",
        // 51 (decrypt_error): a CA with the relay CA's name but another key.
        (Some(42..=49 | 51), false) => {
            "the relay's certificate is not signed by the CA given with --ca / HOLDFAST_CA, or does not name the URL's host"
        }
        (Some(120), _) => "the relay does not offer the ALPN protocol holdfast/1",
        _ => return error.to_string(),
    };
    format!("{error} ({hint})")
}

fn list(addresses: &[SocketAddr]) -> String {
    addresses
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A lost connection, in words: quinn's stream errors say only
/// "connection lost", and the reason is what the user needs.
fn connection_lost(error: &ConnectionError) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        format!("QUIC connection lost: {}", describe(error)),
    )
}

/// The session's receive stream.
pub(crate) struct QuicReader(RecvStream);

impl AsyncRead for QuicReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read_buf(cx, buf).map_err(|error| match error {
            ReadError::ConnectionLost(lost) => connection_lost(&lost),
            other => other.into(),
        })
    }
}

type Stopped = Pin<Box<dyn Future<Output = Result<Option<VarInt>, StoppedError>> + Send + Sync>>;

/// The session's send stream. Shutting it down finishes the stream and then
/// waits until the relay has acknowledged everything on it: closing the
/// connection right after a plain `finish` could discard frames still in
/// flight, which a Unix socket would have delivered.
pub(crate) struct QuicWriter {
    stream: SendStream,
    stopped: Option<Stopped>,
}

impl QuicWriter {
    fn new(stream: SendStream) -> QuicWriter {
        QuicWriter {
            stream,
            stopped: None,
        }
    }
}

impl AsyncWrite for QuicWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream)
            .poll_write(cx, buf)
            .map_err(|error| match error {
                WriteError::ConnectionLost(lost) => connection_lost(&lost),
                other => other.into(),
            })
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.stream), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let stopped = match &mut this.stopped {
            Some(stopped) => stopped,
            None => {
                this.stream.finish().map_err(io::Error::from)?;
                this.stopped.insert(Box::pin(this.stream.stopped()))
            }
        };
        match ready!(stopped.as_mut().poll(cx)) {
            Ok(None) => Poll::Ready(Ok(())),
            Ok(Some(code)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("relay stopped reading the session (code {code})"),
            ))),
            Err(StoppedError::ConnectionLost(lost)) => Poll::Ready(Err(connection_lost(&lost))),
            Err(error) => Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::url::RelayUrl;
    use quinn::crypto::rustls::QuicServerConfig;

    /// A relay endpoint that completes QUIC handshakes and nothing more,
    /// and the options of a client that trusts it.
    fn handshaking_relay(dir: &tempfile::TempDir) -> (Endpoint, ConnectOptions) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();

        let mut crypto = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls_pki_types::PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
        )
        .unwrap();
        crypto.alpn_protocols = vec![tls::ALPN.to_vec()];
        let config =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto).unwrap()));
        let endpoint = Endpoint::server(config, (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                if let Ok(connection) = incoming.await {
                    // Held open until the client goes away.
                    tokio::spawn(async move { connection.closed().await });
                }
            }
        });
        let url = RelayUrl::Quic {
            host: "127.0.0.1".into(),
            port: endpoint.local_addr().unwrap().port(),
        };
        (endpoint, ConnectOptions::new(url).tls_ca(ca_path))
    }

    #[tokio::test]
    async fn a_silent_address_costs_one_stagger_not_the_handshake_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (relay, options) = handshaking_relay(&dir);
        let RelayUrl::Quic { host, port } = &options.url else {
            unreachable!()
        };
        let connector = QuicConnector::new(host, *port, &options).unwrap();
        let silent = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();

        let started = Instant::now();
        let (connection, endpoint) = tokio::time::timeout(
            Duration::from_secs(5),
            connector.dial_any(&[silent.local_addr().unwrap(), relay.local_addr().unwrap()]),
        )
        .await
        .unwrap()
        .unwrap();
        let waited = started.elapsed();
        assert_eq!(connection.remote_address(), relay.local_addr().unwrap());
        assert!(waited >= ATTEMPT_STAGGER, "{waited:?}");
        assert!(waited < ATTEMPT_STAGGER * 4, "{waited:?}");

        // The endpoint is made once and reused.
        let (again, same_endpoint) = connector
            .dial_any(&[relay.local_addr().unwrap()])
            .await
            .unwrap();
        assert_eq!(
            same_endpoint.local_addr().unwrap(),
            endpoint.local_addr().unwrap()
        );
        connection.close(CLOSE_CODE, b"done");
        again.close(CLOSE_CODE, b"done");
    }

    #[tokio::test]
    async fn every_failed_address_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (first, options) = handshaking_relay(&dir);
        let other_dir = tempfile::tempdir().unwrap();
        let (second, _) = handshaking_relay(&other_dir);
        // Certificates for 127.0.0.1, not this name: both handshakes fail.
        let connector = QuicConnector::new("relay.test", 4433, &options).unwrap();
        let addresses = [first.local_addr().unwrap(), second.local_addr().unwrap()];
        let error = tokio::time::timeout(Duration::from_secs(5), connector.dial_any(&addresses))
            .await
            .unwrap()
            .err()
            .unwrap();
        let message = error.to_string();
        for address in addresses {
            assert!(message.contains(&address.to_string()), "{message}");
        }
        assert!(message.contains("not valid for name"), "{message}");
    }
}
