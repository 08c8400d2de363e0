//! Opening a session with the relay: connect, HELLO, wait for WELCOME.

use crate::error::Error;
use crate::transport::{ByteReader, ByteWriter, Connector, Link, Transport};
use crate::url::RelayUrl;
use bytes::BytesMut;
use futures::StreamExt;
use holdfast_wire::codec::CodecError;
use holdfast_wire::{Frame, FrameCodec, Hello, Welcome, PROTOCOL_VERSION};
use std::io;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

/// Bytes read from the socket at a time: large, so one read decodes many frames.
const READ_BUFFER_CAPACITY: usize = 256 * 1024;

pub(crate) type FrameReader = FramedRead<ByteReader, FrameCodec>;

/// A connection on which WELCOME has been received.
pub(crate) struct Session {
    pub(crate) reader: FrameReader,
    pub(crate) writer: ByteWriter,
    pub(crate) welcome: Welcome,
    pub(crate) link: Link,
}

/// Connects to `url` through `connector` and performs the handshake within
/// `handshake_timeout` (which, on QUIC, includes the QUIC and TLS handshakes).
///
/// `instance_id` is 0 on a process's first connection and the id from the
/// previous WELCOME afterwards, so the relay keeps the process's identity.
pub(crate) async fn open(
    url: &RelayUrl,
    connector: &Connector,
    client_name: String,
    instance_id: u64,
    max_frame_bytes: u32,
    handshake_timeout: Duration,
) -> Result<Session, Error> {
    let deadline = Instant::now() + handshake_timeout;
    let hello = Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client_name: client_name.into(),
        instance_id,
    };
    let handshake = async {
        let Transport {
            reader: read_half,
            mut writer,
            link,
        } = connector.connect(deadline).await?;
        let mut hello_bytes = BytesMut::new();
        holdfast_wire::encode(&Frame::Hello(hello), max_frame_bytes, &mut hello_bytes)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        writer.write_all(&hello_bytes).await?;
        let mut reader = FramedRead::with_capacity(
            read_half,
            FrameCodec::new(max_frame_bytes),
            READ_BUFFER_CAPACITY,
        );
        let first = reader.next().await;
        Ok::<_, io::Error>((reader, writer, link, first))
    };
    let connect_error = |source: io::Error| Error::Connect {
        url: url.clone(),
        source,
    };
    let (mut reader, writer, link, first) = match tokio::time::timeout_at(deadline, handshake).await
    {
        Ok(Ok(connected)) => connected,
        Ok(Err(source)) => return Err(connect_error(source)),
        Err(_) => {
            return Err(connect_error(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no WELCOME within {handshake_timeout:?}"),
            )))
        }
    };
    let welcome = match first {
        Some(Ok(Frame::Welcome(welcome))) => welcome,
        Some(Ok(Frame::GoAway(go_away))) => {
            return Err(Error::relay(go_away.code, go_away.message.as_str()))
        }
        Some(Ok(other)) => {
            return Err(connect_error(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "relay answered HELLO with frame type 0x{:02x} instead of WELCOME",
                    other.frame_type()
                ),
            )))
        }
        Some(Err(CodecError::Io(source))) => return Err(connect_error(source)),
        Some(Err(error)) => {
            return Err(connect_error(io::Error::new(
                io::ErrorKind::InvalidData,
                error,
            )))
        }
        None => {
            return Err(connect_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "relay closed the connection during the handshake",
            )))
        }
    };
    if welcome.version != PROTOCOL_VERSION {
        return Err(Error::relay(
            holdfast_wire::ErrorCode::UnsupportedVersion,
            format!(
                "relay chose protocol version {}, this client speaks {PROTOCOL_VERSION}",
                welcome.version
            ),
        ));
    }
    // The protocol's reference behaviour is one limit for both directions.
    reader
        .decoder_mut()
        .set_max_frame_bytes(welcome.max_frame_bytes);
    Ok(Session {
        reader,
        writer,
        welcome,
        link,
    })
}
