//! One connection of the subscriber link: TCP, TLS when the server or the
//! configuration asks for it (or before anything else with `tls_first`),
//! INFO, CONNECT with the relay's credentials, and the PONG that says the
//! server accepted them.
//!
//! The credentials and certificates come from the same `[nats]` settings
//! (and the same files, read at every connect) as the relay's main NATS
//! client, so both connections are one identity to the server.

use super::server_pool::ServerAddress;
use crate::messaging::nats::security::NatsSecurity;
use base64::Engine;
use bytes::BytesMut;
use holdfast_wire::nats_protocol::{ServerOp, ServerOpDecoder};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A byte stream, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// The INFO fields the subscriber link uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct UpstreamInfo {
    pub server_name: String,
    pub tls_required: bool,
    pub nonce: Option<String>,
    pub connect_urls: Vec<String>,
    /// Lame duck mode: the server is about to stop.
    pub ldm: bool,
    /// The largest message (header block and payload) the server takes.
    pub max_payload: usize,
}

/// An established, authenticated connection.
pub struct Established {
    pub reader: tokio::io::ReadHalf<Box<dyn Stream>>,
    pub writer: tokio::io::WriteHalf<Box<dyn Stream>>,
    /// Bytes read past the handshake, and the decoder's state for them.
    pub buffer: BytesMut,
    pub decoder: ServerOpDecoder,
    pub info: UpstreamInfo,
    /// Whether the connection is TLS (servers it learns of get the same).
    pub tls: bool,
}

/// Connects to `address` and authenticates as the relay, within `limit`.
pub async fn establish(
    address: &ServerAddress,
    security: &NatsSecurity,
    client_name: &str,
    limit: Duration,
) -> Result<Established, String> {
    tokio::time::timeout(limit, handshake(address, security, client_name))
        .await
        .map_err(|_| {
            format!(
                "no answer from {} within {} ms",
                address.host_port(),
                limit.as_millis()
            )
        })?
}

async fn handshake(
    address: &ServerAddress,
    security: &NatsSecurity,
    client_name: &str,
) -> Result<Established, String> {
    let tcp = TcpStream::connect(address.host_port())
        .await
        .map_err(|error| format!("cannot connect to {}: {error}", address.host_port()))?;
    let _ = tcp.set_nodelay(true);
    let settings = security.tls_settings();
    let mut decoder = ServerOpDecoder::default();
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let (mut stream, info, tls): (Box<dyn Stream>, UpstreamInfo, bool) = if settings.first {
        let mut stream: Box<dyn Stream> = Box::new(upgrade(tcp, address, security).await?);
        let info = read_info(&mut stream, &mut decoder, &mut buffer).await?;
        (stream, info, true)
    } else {
        let mut tcp = tcp;
        let info = read_info(&mut tcp, &mut decoder, &mut buffer).await?;
        if info.tls_required || settings.require || address.tls {
            if !buffer.is_empty() {
                return Err("the server sent more than INFO before TLS".to_string());
            }
            (Box::new(upgrade(tcp, address, security).await?), info, true)
        } else {
            (Box::new(tcp), info, false)
        }
    };
    let nonce = info.nonce.clone().unwrap_or_default();
    let auth = security.credentials(nonce.as_bytes())?;
    let mut connect = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "headers": true,
        "no_responders": true,
        "echo": true,
        "tls_required": tls,
        "name": client_name,
    });
    let fields = [
        ("user", auth.username),
        ("pass", auth.password),
        ("auth_token", auth.token),
        ("jwt", auth.jwt),
        ("nkey", auth.nkey),
        (
            "sig",
            auth.signature.map(|signature| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
            }),
        ),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            connect[name] = serde_json::Value::String(value);
        }
    }
    let hello = format!("CONNECT {connect}\r\nPING\r\n");
    stream
        .write_all(hello.as_bytes())
        .await
        .map_err(|error| format!("cannot write CONNECT: {error}"))?;
    loop {
        match next_op(&mut stream, &mut decoder, &mut buffer).await? {
            ServerOp::Pong => break,
            ServerOp::Err(message) => return Err(message),
            ServerOp::Ping => {
                let _ = stream.write_all(b"PONG\r\n").await;
            }
            _ => {}
        }
    }
    let (reader, writer) = tokio::io::split(stream);
    Ok(Established {
        reader,
        writer,
        buffer,
        decoder,
        info,
        tls,
    })
}

async fn read_info<S: AsyncRead + Unpin>(
    stream: &mut S,
    decoder: &mut ServerOpDecoder,
    buffer: &mut BytesMut,
) -> Result<UpstreamInfo, String> {
    match next_op(stream, decoder, buffer).await? {
        ServerOp::Info(json) => serde_json::from_slice(&json)
            .map_err(|error| format!("the server's INFO is not valid JSON: {error}")),
        ServerOp::Err(message) => Err(message),
        other => Err(format!("the server sent {other:?} before INFO")),
    }
}

/// Reads until one operation is decoded.
async fn next_op<S: AsyncRead + Unpin>(
    stream: &mut S,
    decoder: &mut ServerOpDecoder,
    buffer: &mut BytesMut,
) -> Result<ServerOp, String> {
    loop {
        if let Some(op) = decoder.decode(buffer).map_err(|error| {
            format!("the server sent bytes that are not the NATS protocol: {error}")
        })? {
            return Ok(op);
        }
        let read = stream
            .read_buf(buffer)
            .await
            .map_err(|error| format!("read failed: {error}"))?;
        if read == 0 {
            return Err("the server closed the connection".to_string());
        }
    }
}

/// TLS over `tcp`, verified against the configured CA (or the system's
/// roots), with the client certificate when one is configured.
async fn upgrade(
    tcp: TcpStream,
    address: &ServerAddress,
    security: &NatsSecurity,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let settings = security.tls_settings();
    let mut roots = RootCertStore::empty();
    match &settings.ca {
        Some(ca) => {
            for certificate in
                crate::util::pem::certificates(ca).map_err(|error| error.to_string())?
            {
                roots
                    .add(certificate)
                    .map_err(|error| format!("{}: {error}", ca.display()))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots);
    let config = match &settings.client_certificate {
        Some((cert, key)) => {
            let chain = crate::util::pem::certificates(cert).map_err(|error| error.to_string())?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|error| {
                format!("cannot read a private key from {}: {error}", key.display())
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| error.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(address.host.clone())
        .map_err(|error| format!("{} is not a valid TLS server name: {error}", address.host))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|error| format!("TLS handshake with {} failed: {error}", address.host_port()))
}
