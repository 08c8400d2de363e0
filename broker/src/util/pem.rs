//! Certificates read from PEM files, for every TLS configuration the relay
//! builds: its QUIC listener and its own connections to NATS.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};

/// Why a PEM file gave no certificates; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read certificates from {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
}

/// Every certificate in the PEM file at `path` (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let error = |reason: String| PemError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}
