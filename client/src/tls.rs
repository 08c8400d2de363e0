//! The TLS side of a `quic://` relay: the CA, client certificate and key
//! files turned into one rustls configuration, once per client.
//!
//! Everything here runs when [`Client::connect_with`](crate::Client::connect_with)
//! is called, so a missing or broken file is reported there, with its path,
//! instead of as an endless series of failed reconnects.

use crate::options::{ConnectOptions, CA_ENV, CERT_ENV, KEY_ENV};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol id of the holdfast framed protocol over QUIC.
pub(crate) const ALPN: &[u8] = b"holdfast/1";

/// Why the TLS settings for a `quic://` relay cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error(
        "a quic:// relay URL needs the CA certificate that signed the relay's certificate: \
         pass --ca FILE or set {CA_ENV} (ConnectOptions::tls_ca in code)"
    )]
    MissingCa,
    #[error(
        "client certificate {} has no private key: pass --key FILE or set {KEY_ENV}",
        cert.display()
    )]
    CertWithoutKey { cert: PathBuf },
    #[error(
        "client key {} has no certificate: pass --cert FILE or set {CERT_ENV}",
        key.display()
    )]
    KeyWithoutCert { key: PathBuf },
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is not valid PEM: {source}", path.display())]
    InvalidPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{what} {} contains no PEM certificate", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("client key {} contains no PEM private key", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("CA file {} holds a certificate that cannot be a trust anchor: {source}", path.display())]
    InvalidCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "client certificate {} and key {} cannot be used: {source}",
        cert.display(),
        key.display()
    )]
    InvalidClientCert {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("`{host}` in the relay URL is neither a DNS name nor an IP address")]
    InvalidServerName { host: String },
    /// The crypto provider cannot do what QUIC needs (TLS 1.3 with an
    /// AES-128-GCM suite); not expected with the ring provider.
    #[error("cannot set up TLS for QUIC: {0}")]
    Unsupported(String),
}

/// The rustls configuration `options` describe: TLS 1.3 only, the relay
/// checked against the given CA, ALPN `holdfast/1`, and a client certificate
/// when one is configured.
pub(crate) fn client_config(options: &ConnectOptions) -> Result<ClientConfig, TlsError> {
    let ca = options.tls_ca.as_deref().ok_or(TlsError::MissingCa)?;
    // Checked before any file is read: the pairing mistake is the likelier one.
    let identity = match (options.tls_cert.as_deref(), options.tls_key.as_deref()) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (Some(cert), None) => {
            return Err(TlsError::CertWithoutKey {
                cert: cert.to_owned(),
            })
        }
        (None, Some(key)) => {
            return Err(TlsError::KeyWithoutCert {
                key: key.to_owned(),
            })
        }
        (None, None) => None,
    };

    let mut roots = RootCertStore::empty();
    for cert in read_certificates("CA file", ca)? {
        roots.add(cert).map_err(|source| TlsError::InvalidCa {
            path: ca.to_owned(),
            source,
        })?;
    }

    // An explicit provider: a process-wide default may be missing, or be
    // another one installed by whatever else runs in the process.
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Unsupported(error.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certificates("client certificate", cert)?;
            let private_key = read_private_key(key)?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|source| TlsError::InvalidClientCert {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                    source,
                })?
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Every certificate in the PEM file at `path`; at least one.
fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| pem_error(what, path, source);
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        other => pem_error("client key", path, other),
    })
}

fn pem_error(what: &'static str, path: &Path, source: pem::Error) -> TlsError {
    match source {
        // Kept apart so "no such file" does not read as a format problem.
        pem::Error::Io(source) => TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        },
        source => TlsError::InvalidPem {
            what,
            path: path.to_owned(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::url::RelayUrl;
    use std::fs;

    fn options() -> ConnectOptions {
        ConnectOptions::new(RelayUrl::Quic {
            host: "localhost".into(),
            port: 4433,
        })
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        /// A CA, and a client certificate and key it signed.
        fn new() -> Files {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let client_key = rcgen::KeyPair::generate().unwrap();
            let client = rcgen::CertificateParams::new(vec!["client".to_owned()])
                .unwrap()
                .signed_by(&client_key, &issuer)
                .unwrap();
            fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
            fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
            Files { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.path(name);
            fs::write(&path, contents).unwrap();
            path
        }
    }

    #[test]
    fn a_ca_alone_gives_tls13_with_the_holdfast_alpn() {
        let files = Files::new();
        let config = client_config(&options().tls_ca(files.path("ca.pem"))).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"holdfast/1".to_vec()]);
        assert!(!config.client_auth_cert_resolver.has_certs());
        // QUIC accepts it: TLS 1.3 with an initial cipher suite.
        quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    }

    #[test]
    fn a_client_certificate_is_presented_when_configured() {
        let files = Files::new();
        let config = client_config(
            &options()
                .tls_ca(files.path("ca.pem"))
                .tls_client_cert(files.path("client.pem"), files.path("client.key")),
        )
        .unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_missing_ca_names_the_flag_and_the_variable() {
        let error = client_config(&options()).unwrap_err();
        assert!(matches!(error, TlsError::MissingCa));
        let message = error.to_string();
        assert!(message.contains("--ca"), "{message}");
        assert!(message.contains("HOLDFAST_CA"), "{message}");
    }

    #[test]
    fn a_certificate_needs_its_key_and_a_key_its_certificate() {
        let files = Files::new();
        let mut lone_cert = options().tls_ca(files.path("ca.pem"));
        lone_cert.tls_cert = Some(files.path("client.pem"));
        let error = client_config(&lone_cert).unwrap_err();
        assert!(
            matches!(error, TlsError::CertWithoutKey { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("--key"), "{error}");

        let mut lone_key = options().tls_ca(files.path("ca.pem"));
        lone_key.tls_key = Some(files.path("client.key"));
        let error = client_config(&lone_key).unwrap_err();
        assert!(
            matches!(error, TlsError::KeyWithoutCert { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("--cert"), "{error}");
    }

    #[test]
    fn unreadable_and_invalid_files_are_named() {
        let files = Files::new();
        let missing = files.path("nope.pem");
        let error = client_config(&options().tls_ca(&missing)).unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }), "{error:?}");
        assert!(error.to_string().contains("nope.pem"), "{error}");

        let not_pem = files.write("garbage.pem", "this is not a certificate\n");
        let error = client_config(&options().tls_ca(&not_pem)).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error:?}");
        assert!(error.to_string().contains("garbage.pem"), "{error}");

        let broken = files.write(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        );
        let error = client_config(&options().tls_ca(&broken)).unwrap_err();
        assert!(matches!(error, TlsError::InvalidPem { .. }), "{error:?}");
        assert!(error.to_string().contains("broken.pem"), "{error}");

        let truncated = files.write("truncated.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
        let error = client_config(&options().tls_ca(&truncated)).unwrap_err();
        assert!(matches!(error, TlsError::InvalidPem { .. }), "{error:?}");

        // Valid PEM around bytes that are no certificate.
        let not_der = files.write(
            "not-der.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let error = client_config(&options().tls_ca(&not_der)).unwrap_err();
        assert!(matches!(error, TlsError::InvalidCa { .. }), "{error:?}");
        assert!(error.to_string().contains("not-der.pem"), "{error}");
    }

    #[test]
    fn client_key_problems_are_named() {
        let files = Files::new();
        let ca = files.path("ca.pem");
        // The certificate where the key should be.
        let error = client_config(
            &options()
                .tls_ca(&ca)
                .tls_client_cert(files.path("client.pem"), files.path("client.pem")),
        )
        .unwrap_err();
        assert!(matches!(error, TlsError::NoPrivateKey { .. }), "{error:?}");
        assert!(error.to_string().contains("client.pem"), "{error}");

        // A key that does not belong to the certificate.
        let other_key = files.write(
            "other.key",
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );
        let error = client_config(
            &options()
                .tls_ca(&ca)
                .tls_client_cert(files.path("client.pem"), &other_key),
        )
        .unwrap_err();
        assert!(
            matches!(error, TlsError::InvalidClientCert { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("other.key"), "{error}");
    }
}
