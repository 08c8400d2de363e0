//! TLS for the QUIC listener: certificate, key and optional client CA
//! loaded from PEM files into a quinn server configuration.
//!
//! TLS 1.3 only (QUIC requires it), ALPN `holdfast/1`, ring as the crypto
//! provider (the one async-nats already links). With a client CA every
//! connection must present a certificate it signed: mutual TLS.

use crate::util::pem::{certificates, PemError};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The application protocol both ends must name.
pub const ALPN: &[u8] = b"holdfast/1";

/// Bidirectional streams (sessions) one QUIC connection may have open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Bytes a QUIC connection (all its streams), and one stream, may have in
/// flight unread by the relay.
pub const QUIC_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
pub const QUIC_STREAM_WINDOW: u32 = 1024 * 1024;

/// A QUIC connection silent this long is gone; clients ping every 250 ms.
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the listener's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS configuration could not be built; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Certificates(#[from] PemError),
    #[error("cannot read a private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the client CA {path} is not usable: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not make a usable pair: {reason}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Builds the quinn server configuration from `files`.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| TlsError::Key {
        path: files.key.clone(),
        reason: error.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: error.to_string(),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_error = |reason: String| TlsError::ClientCa {
                path: path.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for certificate in certificates(path)? {
                roots
                    .add(certificate)
                    .map_err(|error| ca_error(error.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| ca_error(error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: error.to_string(),
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(Arc::new(tls)).map_err(|error| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: error.to_string(),
    })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into())
        .max_concurrent_uni_streams(0u32.into())
        // What QUIC itself buffers for a connection before the relay reads
        // it (quinn's default connection window is unlimited): sixteen
        // streams at 1.25 MiB each would otherwise sit in memory per
        // connection, beyond the relay's read budget.
        .receive_window(QUIC_CONNECTION_WINDOW.into())
        .stream_receive_window(QUIC_STREAM_WINDOW.into());
    if let Ok(idle) = QUIC_IDLE_TIMEOUT.try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::gen_cert::{generate, GenCertRequest};

    fn dev_certificates() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        generate(&GenCertRequest {
            out: dir.path(),
            server_names: &[],
            client_common_name: "test-client",
        })
        .unwrap();
        dir
    }

    #[test]
    fn generated_certificates_make_a_server_config_with_and_without_client_ca() {
        let dir = dev_certificates();
        let mut files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: None,
        };
        assert!(server_config(&files).is_ok());
        files.client_ca = Some(dir.path().join("ca.pem"));
        assert!(server_config(&files).is_ok());
    }

    #[test]
    fn errors_name_the_file_at_fault() {
        let dir = dev_certificates();
        let missing = dir.path().join("missing.pem");
        let files = TlsFiles {
            cert: missing.clone(),
            key: dir.path().join("server.key"),
            client_ca: None,
        };
        let error = server_config(&files).unwrap_err().to_string();
        assert!(error.contains("missing.pem"), "{error}");

        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.pem"),
            client_ca: None,
        };
        let error = server_config(&files).unwrap_err().to_string();
        assert!(error.contains("private key"), "{error}");

        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("client.key"),
            client_ca: None,
        };
        let error = server_config(&files).unwrap_err().to_string();
        assert!(error.contains("usable pair"), "{error}");

        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: Some(dir.path().join("server.key")),
        };
        let error = server_config(&files).unwrap_err().to_string();
        assert!(error.contains("server.key"), "{error}");
    }
}
