//! The byte stream a session runs on, whatever the transport: a Unix socket
//! or a QUIC stream. Above this file a session is a reader, a writer and a
//! [`Link`] to end it with.

use crate::options::ConnectOptions;
use crate::quic::{QuicConnector, QuicLink};
use crate::tls::TlsError;
use crate::url::RelayUrl;
use std::io;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// The receiving half of a session's byte stream.
pub(crate) type ByteReader = Box<dyn AsyncRead + Send + Unpin>;

/// The sending half of a session's byte stream.
pub(crate) type ByteWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// How one client reaches its relay; made once, cloned into every attempt.
#[derive(Clone)]
pub(crate) enum Connector {
    Unix { path: PathBuf },
    Quic(QuicConnector),
}

/// A connected byte stream, before any handshake.
pub(crate) struct Transport {
    pub(crate) reader: ByteReader,
    pub(crate) writer: ByteWriter,
    pub(crate) link: Link,
}

/// What, besides its two halves, a session's transport needs to end well.
pub(crate) enum Link {
    /// Dropping the halves closes the socket.
    Unix,
    Quic(QuicLink),
}

impl Connector {
    /// Everything that can be checked before connecting is checked here:
    /// for `quic://`, the TLS files are read and validated.
    pub(crate) fn new(options: &ConnectOptions) -> Result<Connector, TlsError> {
        match &options.url {
            RelayUrl::Unix { path } => Ok(Connector::Unix { path: path.clone() }),
            RelayUrl::Quic { host, port } => {
                QuicConnector::new(host, *port, options).map(Connector::Quic)
            }
        }
    }

    /// Connects; a QUIC handshake must complete before `deadline`.
    pub(crate) async fn connect(&self, deadline: Instant) -> io::Result<Transport> {
        match self {
            Connector::Unix { path } => {
                let (reader, writer) = UnixStream::connect(path).await?.into_split();
                Ok(Transport {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    link: Link::Unix,
                })
            }
            Connector::Quic(connector) => {
                let stream = connector.connect(deadline).await?;
                Ok(Transport {
                    reader: Box::new(stream.reader),
                    writer: Box::new(stream.writer),
                    link: Link::Quic(stream.link),
                })
            }
        }
    }
}

impl Link {
    /// Ends the transport because the client is done, once the writer has
    /// been shut down: on QUIC, closes the connection so the relay ends the
    /// session at once.
    pub(crate) async fn close(self) {
        match self {
            Link::Unix => {}
            Link::Quic(link) => link.close().await,
        }
    }

    /// Ends the transport of a session that failed, before reconnecting.
    pub(crate) fn abandon(self) {
        match self {
            Link::Unix => {}
            Link::Quic(link) => link.abandon(),
        }
    }
}
