//! How the relay proves itself to a secured etcd cluster: TLS (the CA that
//! signs etcd's certificates, a client certificate for etcd's
//! `--client-cert-auth`) and etcd's user/password authentication.
//!
//! The files are read each time a connection to a member is built, so a
//! renewed certificate or a corrected password file is used at the next
//! reconnect. etcd's auth tokens expire (`--auth-token-ttl`, 5 minutes by
//! default); etcd-client re-authenticates and retries a call refused with
//! `invalid auth token` by itself, so an expired token is never an outage.

use crate::config::EtcdConfig;
use crate::util::secret_file::SecretFile;
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use std::path::PathBuf;

/// Why the `[etcd]` security settings cannot be used; names the key.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EtcdSecurityError {
    pub key: &'static str,
    pub message: String,
}

fn error(key: &'static str, message: impl Into<String>) -> EtcdSecurityError {
    EtcdSecurityError {
        key,
        message: message.into(),
    }
}

/// The resolved `[etcd]` security settings.
#[derive(Debug, Clone, Default)]
pub struct EtcdSecurity {
    tls: bool,
    ca: Option<PathBuf>,
    client_certificate: Option<(PathBuf, SecretFile)>,
    user: Option<(String, SecretFile)>,
}

impl EtcdSecurity {
    /// Checks the settings against the endpoints' schemes, and that every
    /// named file can be read now.
    pub fn from_config(config: &EtcdConfig) -> Result<EtcdSecurity, EtcdSecurityError> {
        let set = |path: &PathBuf| !path.as_os_str().is_empty();
        let https = config
            .endpoints
            .iter()
            .filter(|endpoint| endpoint.starts_with("https://"))
            .count();
        let http = config
            .endpoints
            .iter()
            .filter(|endpoint| endpoint.starts_with("http://"))
            .count();
        if config
            .endpoints
            .iter()
            .any(|endpoint| crate::util::url_credentials::split(endpoint).1.is_some())
        {
            return Err(error(
                "etcd.endpoints",
                "etcd endpoint URLs do not carry credentials; use etcd.user and etcd.password_file",
            ));
        }
        let tls_keys = set(&config.tls_ca) || set(&config.tls_cert) || set(&config.tls_key);
        if https > 0 && http > 0 {
            return Err(error(
                "etcd.endpoints",
                "mixes http:// and https:// endpoints; an etcd cluster serves one or the other",
            ));
        }
        if tls_keys && http > 0 {
            return Err(error(
                "etcd.endpoints",
                "etcd.tls_* is set, so the endpoints must be https:// URLs (or host:port)",
            ));
        }
        let readable = |key: &'static str, path: &PathBuf| {
            std::fs::read(path)
                .map(|_| ())
                .map_err(|problem| error(key, format!("cannot read {}: {problem}", path.display())))
        };
        let secret = |key: &'static str, path: &PathBuf| {
            let file =
                SecretFile::from_config(path).map_err(|problem| error(key, problem.to_string()))?;
            file.read()
                .map_err(|problem| error(key, problem.to_string()))?;
            Ok::<SecretFile, EtcdSecurityError>(file)
        };
        let ca = if set(&config.tls_ca) {
            readable("etcd.tls_ca", &config.tls_ca)?;
            Some(config.tls_ca.clone())
        } else {
            None
        };
        let client_certificate = match (set(&config.tls_cert), set(&config.tls_key)) {
            (false, false) => None,
            (true, true) => {
                readable("etcd.tls_cert", &config.tls_cert)?;
                Some((
                    config.tls_cert.clone(),
                    secret("etcd.tls_key", &config.tls_key)?,
                ))
            }
            _ => {
                return Err(error(
                    "etcd.tls_key",
                    "etcd.tls_cert and etcd.tls_key go together",
                ))
            }
        };
        let user = match (config.user.is_empty(), set(&config.password_file)) {
            (true, false) => None,
            (false, true) => Some((
                config.user.clone(),
                secret("etcd.password_file", &config.password_file)?,
            )),
            _ => {
                return Err(error(
                    "etcd.password_file",
                    "etcd.user and etcd.password_file go together",
                ))
            }
        };
        Ok(EtcdSecurity {
            tls: https > 0 || tls_keys,
            ca,
            client_certificate,
            user,
        })
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls
    }

    /// "tls" or "plaintext", for the status document.
    pub fn transport(&self) -> &'static str {
        if self.tls {
            "tls"
        } else {
            "plaintext"
        }
    }

    /// The authentication method's name, for the status document.
    pub fn method(&self) -> &'static str {
        match (&self.user, &self.client_certificate) {
            (Some(_), _) => "user_password",
            (None, Some(_)) => "client_certificate",
            (None, None) => "none",
        }
    }

    /// The TLS settings for one connection, with the files read now.
    pub fn tls_options(&self) -> Result<Option<TlsOptions>, String> {
        if !self.tls {
            return Ok(None);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|problem| format!("cannot read {}: {problem}", path.display()))
        };
        let mut tls = TlsOptions::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
            // Without a CA of its own, the system's trusted roots.
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.client_certificate {
            let key = key.read().map_err(|problem| problem.to_string())?;
            tls = tls.identity(Identity::from_pem(read(cert)?, key));
        }
        Ok(Some(tls))
    }

    /// etcd-client options for one connection: `base` plus TLS and the
    /// user's credentials, read from their files now.
    pub fn connect_options(&self, base: ConnectOptions) -> Result<ConnectOptions, String> {
        let mut options = base;
        if let Some(tls) = self.tls_options()? {
            options = options.with_tls(tls);
        }
        if let Some((user, password_file)) = &self.user {
            let password = password_file
                .read_line()
                .map_err(|problem| problem.to_string())?;
            options = options
                .with_user(user.clone(), password)
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }

    /// The user name and password, read from the file now.
    pub fn credentials(&self) -> Result<Option<(String, String)>, String> {
        match &self.user {
            None => Ok(None),
            Some((user, file)) => Ok(Some((
                user.clone(),
                file.read_line().map_err(|problem| problem.to_string())?,
            ))),
        }
    }

    /// Warnings for the start-up log: secret files others may read.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some((_, key)) = &self.client_certificate {
            warnings.extend(key.exposure_warning("etcd.tls_key"));
        }
        if let Some((_, file)) = &self.user {
            warnings.extend(file.exposure_warning("etcd.password_file"));
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(edit: impl FnOnce(&mut EtcdConfig)) -> EtcdConfig {
        let mut config = EtcdConfig::default();
        edit(&mut config);
        config
    }

    #[test]
    fn tls_follows_the_endpoints_and_the_keys() {
        let plain = EtcdSecurity::from_config(&config_with(|config| {
            config.endpoints = vec!["http://127.0.0.1:2379".to_string()]
        }))
        .unwrap();
        assert!(!plain.uses_tls());
        assert!(plain.tls_options().unwrap().is_none());
        let https = EtcdSecurity::from_config(&config_with(|config| {
            config.endpoints = vec!["https://etcd-0:2379".to_string()]
        }))
        .unwrap();
        assert!(https.uses_tls());
        assert_eq!(https.method(), "none");
    }

    #[test]
    fn contradictions_name_the_key() {
        let mixed = config_with(|config| {
            config.endpoints = vec![
                "http://127.0.0.1:2379".to_string(),
                "https://127.0.0.1:2380".to_string(),
            ]
        });
        assert_eq!(
            EtcdSecurity::from_config(&mixed).unwrap_err().key,
            "etcd.endpoints"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let http_with_ca = config_with(|config| {
            config.endpoints = vec!["http://127.0.0.1:2379".to_string()];
            config.tls_ca = ca.clone();
        });
        let problem = EtcdSecurity::from_config(&http_with_ca).unwrap_err();
        assert_eq!(problem.key, "etcd.endpoints");
        let user_only = config_with(|config| config.user = "relay".to_string());
        assert_eq!(
            EtcdSecurity::from_config(&user_only).unwrap_err().key,
            "etcd.password_file"
        );
        let missing = config_with(|config| {
            config.user = "relay".to_string();
            config.password_file = dir.path().join("absent");
        });
        let problem = EtcdSecurity::from_config(&missing).unwrap_err();
        assert!(problem.message.contains("absent"), "{problem}");
    }

    #[test]
    fn the_password_is_read_when_a_connection_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "first\n").unwrap();
        let security = EtcdSecurity::from_config(&config_with(|config| {
            config.user = "relay".to_string();
            config.password_file = password.clone();
        }))
        .unwrap();
        assert_eq!(security.method(), "user_password");
        assert_eq!(
            security.credentials().unwrap(),
            Some(("relay".to_string(), "first".to_string()))
        );
        std::fs::write(&password, "second\n").unwrap();
        assert_eq!(
            security.credentials().unwrap(),
            Some(("relay".to_string(), "second".to_string()))
        );
        assert!(!format!("{security:?}").contains("second"));
    }
}
