//! `holdfastd gen-cert`: a development CA plus server and client
//! certificates, so QUIC with mutual TLS can be tried without a PKI.
//!
//! Writes `ca.pem`, `server.pem`/`server.key` (valid for localhost,
//! 127.0.0.1, ::1 and any extra names given) and `client.pem`/`client.key`
//! (subject CN as given, for access rules). Keys are written with mode 0600.
//! Not for production: the CA key is not kept, so nothing more can be
//! signed with it, and a real deployment uses its own CA.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GenCertError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; remove it or choose another --out directory")]
    Exists(PathBuf),
}

/// What to put in the certificates.
pub struct GenCertRequest<'a> {
    pub out: &'a Path,
    /// Extra DNS names or IP addresses the server certificate is valid for.
    pub server_names: &'a [String],
    pub client_common_name: &'a str,
}

/// The files written, in the order listed in the module doc.
pub const FILES: [&str; 5] = [
    "ca.pem",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
];

/// Generates the CA and both certificates into `request.out`.
pub fn generate(request: &GenCertRequest<'_>) -> Result<Vec<PathBuf>, GenCertError> {
    std::fs::create_dir_all(request.out).map_err(|source| GenCertError::Write {
        path: request.out.to_path_buf(),
        source,
    })?;
    for name in FILES {
        let path = request.out.join(name);
        if path.exists() {
            return Err(GenCertError::Exists(path));
        }
    }

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "holdfast development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut server_names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    server_names.extend(request.server_names.iter().cloned());
    let mut server_params = CertificateParams::new(server_names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "holdfastd");
    // Client use too: etcd dials its own gateway with its server
    // certificate and refuses one that may only serve.
    server_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca)?;

    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, request.client_common_name);
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client = client_params.signed_by(&client_key, &ca)?;

    let contents = [
        (FILES[0], ca.pem(), 0o644),
        (FILES[1], server.pem(), 0o644),
        (FILES[2], server_key.serialize_pem(), 0o600),
        (FILES[3], client.pem(), 0o644),
        (FILES[4], client_key.serialize_pem(), 0o600),
    ];
    let mut written = Vec::with_capacity(contents.len());
    for (name, text, mode) in contents {
        let path = request.out.join(name);
        write_new(&path, text.as_bytes(), mode)?;
        written.push(path);
    }
    Ok(written)
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), GenCertError> {
    let write_error = |source| GenCertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_all_files_with_private_keys_unreadable_by_others_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let request = GenCertRequest {
            out: dir.path(),
            server_names: &["relay.example".to_string()],
            client_common_name: "prefill-worker",
        };
        let written = generate(&request).unwrap();
        assert_eq!(written.len(), FILES.len());
        for name in ["server.key", "client.key"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let client_pem = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
        assert!(client_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(matches!(generate(&request), Err(GenCertError::Exists(_))));
    }
}
