//! How the relay proves itself to a secured NATS cluster: TLS (server CA,
//! client certificate, TLS-first handshakes) and one way to authenticate
//! (JWT credentials, an nkey seed, user and password, or a token).
//!
//! Everything goes through async-nats's `ConnectOptions`. Authentication
//! uses its auth callback, which runs at every connect: the credential
//! files are read again each time, so a rotated `.creds` file or a
//! corrected password file is picked up at the next reconnect without a
//! restart. Certificates are read again by async-nats at every connect.

use crate::config::NatsConfig;
use crate::util::secret_file::{SecretFile, SecretFileError};
use crate::util::url_credentials::{self, UrlCredentials};
use async_nats::{AuthError, ConnectOptions};
use base64::Engine;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A secret given in a file, or in the config file's server URL.
#[derive(Debug, Clone)]
enum Secret {
    File(SecretFile),
    FromUrl(UrlSecret),
}

/// A secret that came in a URL's user part; never printed.
#[derive(Clone)]
struct UrlSecret(String);

impl std::fmt::Debug for UrlSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Secret {
    fn read(&self) -> Result<String, SecretFileError> {
        match self {
            Secret::File(file) => file.read_line(),
            Secret::FromUrl(secret) => Ok(secret.0.clone()),
        }
    }
}

/// The one authentication method in use.
#[derive(Debug, Clone)]
enum NatsAuth {
    None,
    /// A `.creds` file: the user JWT and the nkey seed that signs nonces.
    Credentials(SecretFile),
    NkeySeed(SecretFile),
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
}

/// Why the `[nats]` security settings cannot be used; names the key.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NatsSecurityError {
    pub key: &'static str,
    pub message: String,
}

fn error(key: &'static str, message: impl Into<String>) -> NatsSecurityError {
    NatsSecurityError {
        key,
        message: message.into(),
    }
}

/// Where TLS material is and when TLS is used, for connections the relay
/// makes without async-nats (its subscriber connection).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub require: bool,
    pub first: bool,
    pub ca: Option<PathBuf>,
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

/// The resolved `[nats]` security settings.
#[derive(Debug, Clone)]
pub struct NatsSecurity {
    /// The servers as given, without any credentials in their URLs.
    servers: Vec<String>,
    require_tls: bool,
    tls_first: bool,
    ca: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    auth: NatsAuth,
}

impl NatsSecurity {
    /// Checks the settings and that every named file can be read now.
    pub fn from_config(config: &NatsConfig) -> Result<NatsSecurity, NatsSecurityError> {
        let mut servers = Vec::with_capacity(config.servers.len());
        let mut url_credentials: Option<UrlCredentials> = None;
        for server in &config.servers {
            let (bare, credentials) = url_credentials::split(server);
            if let Some(credentials) = credentials {
                if url_credentials
                    .as_ref()
                    .is_some_and(|seen| *seen != credentials)
                {
                    return Err(error(
                        "nats.servers",
                        "the server URLs carry different credentials; the relay uses one identity for the whole cluster",
                    ));
                }
                url_credentials = Some(credentials);
            }
            servers.push(bare);
        }
        let set = |path: &PathBuf| !path.as_os_str().is_empty();
        let secret = |key: &'static str, path: &PathBuf| {
            let file =
                SecretFile::from_config(path).map_err(|problem| error(key, problem.to_string()))?;
            file.read()
                .map_err(|problem| error(key, problem.to_string()))?;
            Ok::<SecretFile, NatsSecurityError>(file)
        };
        let mut methods = Vec::new();
        if set(&config.creds_file) {
            methods.push("nats.creds_file");
        }
        if set(&config.nkey_seed_file) {
            methods.push("nats.nkey_seed_file");
        }
        if !config.user.is_empty() || set(&config.password_file) {
            methods.push("nats.user");
        }
        if set(&config.token_file) {
            methods.push("nats.token_file");
        }
        if url_credentials.is_some() {
            methods.push("credentials in nats.servers URLs");
        }
        if methods.len() > 1 {
            return Err(error(
                methods[1].trim_start_matches("credentials in "),
                format!(
                    "set only one way to authenticate to NATS, not {}",
                    methods.join(" and ")
                ),
            ));
        }
        let auth = if set(&config.creds_file) {
            let file = secret("nats.creds_file", &config.creds_file)?;
            let text = file
                .read()
                .map_err(|problem| error("nats.creds_file", problem.to_string()))?;
            parse_credentials(&text).map_err(|problem| {
                error(
                    "nats.creds_file",
                    format!("{}: {problem}", file.path().display()),
                )
            })?;
            NatsAuth::Credentials(file)
        } else if set(&config.nkey_seed_file) {
            let file = secret("nats.nkey_seed_file", &config.nkey_seed_file)?;
            let seed = file
                .read_line()
                .map_err(|problem| error("nats.nkey_seed_file", problem.to_string()))?;
            nkeys::KeyPair::from_seed(seed.trim()).map_err(|problem| {
                error(
                    "nats.nkey_seed_file",
                    format!("{}: not an nkey seed: {problem}", file.path().display()),
                )
            })?;
            NatsAuth::NkeySeed(file)
        } else if !config.user.is_empty() || set(&config.password_file) {
            if config.user.is_empty() || !set(&config.password_file) {
                return Err(error(
                    "nats.password_file",
                    "nats.user and nats.password_file go together",
                ));
            }
            let file = secret("nats.password_file", &config.password_file)?;
            NatsAuth::UserPassword {
                user: config.user.clone(),
                password: Secret::File(file),
            }
        } else if set(&config.token_file) {
            NatsAuth::Token(Secret::File(secret("nats.token_file", &config.token_file)?))
        } else if let Some(credentials) = url_credentials {
            match credentials.password {
                Some(password) => NatsAuth::UserPassword {
                    user: credentials.user,
                    password: Secret::FromUrl(UrlSecret(password)),
                },
                None => NatsAuth::Token(Secret::FromUrl(UrlSecret(credentials.user))),
            }
        } else {
            NatsAuth::None
        };
        let readable = |key: &'static str, path: &PathBuf| {
            std::fs::metadata(path)
                .map(|_| ())
                .map_err(|problem| error(key, format!("cannot read {}: {problem}", path.display())))
        };
        let ca = if set(&config.tls_ca) {
            readable("nats.tls_ca", &config.tls_ca)?;
            Some(config.tls_ca.clone())
        } else {
            None
        };
        let client_certificate = match (set(&config.tls_cert), set(&config.tls_key)) {
            (false, false) => None,
            (true, true) => {
                readable("nats.tls_cert", &config.tls_cert)?;
                let key = secret("nats.tls_key", &config.tls_key)?;
                Some((config.tls_cert.clone(), key.path().to_path_buf()))
            }
            _ => {
                return Err(error(
                    "nats.tls_key",
                    "nats.tls_cert and nats.tls_key go together",
                ))
            }
        };
        let tls_url = servers
            .iter()
            .any(|server| server.starts_with("tls://") || server.starts_with("wss://"));
        Ok(NatsSecurity {
            servers,
            require_tls: tls_url
                || ca.is_some()
                || client_certificate.is_some()
                || config.tls_first,
            tls_first: config.tls_first,
            ca,
            client_certificate,
            auth,
        })
    }

    /// The server URLs to connect to: as configured, without credentials.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// Connect options with TLS and authentication set; the caller adds
    /// the rest. (async-nats takes an auth callback only as the options'
    /// constructor.)
    pub fn connect_options(&self) -> ConnectOptions {
        let mut options = if matches!(self.auth, NatsAuth::None) {
            ConnectOptions::new()
        } else {
            let auth = Arc::new(self.auth.clone());
            ConnectOptions::with_auth_callback(move |nonce| {
                let auth = auth.clone();
                async move { auth.credentials(&nonce) }
            })
        };
        if self.require_tls {
            options = options.require_tls(true);
        }
        if self.tls_first {
            options = options.tls_first();
        }
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
    }

    /// The TLS settings.
    pub fn tls_settings(&self) -> TlsSettings {
        TlsSettings {
            require: self.require_tls,
            first: self.tls_first,
            ca: self.ca.clone(),
            client_certificate: self.client_certificate.clone(),
        }
    }

    /// The credentials for one connect, signing the server's `nonce`, with
    /// the files read now.
    pub fn credentials(&self, nonce: &[u8]) -> Result<async_nats::Auth, String> {
        self.auth
            .credentials(nonce)
            .map_err(|error| error.to_string())
    }

    /// "tls" or "plaintext", for the status document.
    pub fn transport(&self) -> &'static str {
        if self.require_tls {
            "tls"
        } else {
            "plaintext"
        }
    }

    /// The authentication method's name, for the status document.
    pub fn method(&self) -> &'static str {
        match self.auth {
            NatsAuth::None => "none",
            NatsAuth::Credentials(_) => "creds",
            NatsAuth::NkeySeed(_) => "nkey",
            NatsAuth::UserPassword { .. } => "user_password",
            NatsAuth::Token(_) => "token",
        }
    }

    /// Warnings for the start-up log: secret files others may read.
    pub fn warnings(&self) -> Vec<String> {
        let mut files: Vec<(&str, SecretFile)> = Vec::new();
        match &self.auth {
            NatsAuth::Credentials(file) => files.push(("nats.creds_file", file.clone())),
            NatsAuth::NkeySeed(file) => files.push(("nats.nkey_seed_file", file.clone())),
            NatsAuth::UserPassword {
                password: Secret::File(file),
                ..
            } => files.push(("nats.password_file", file.clone())),
            NatsAuth::Token(Secret::File(file)) => files.push(("nats.token_file", file.clone())),
            _ => {}
        }
        if let Some((_, key)) = &self.client_certificate {
            if let Ok(file) = SecretFile::from_config(key) {
                files.push(("nats.tls_key", file));
            }
        }
        files
            .iter()
            .filter_map(|(key, file)| file.exposure_warning(key))
            .collect()
    }

    /// What is wrong with the credentials as they stand now, beyond what
    /// the server says: an expired user JWT, a file that cannot be read.
    pub fn credential_problem(&self) -> Option<String> {
        let NatsAuth::Credentials(file) = &self.auth else {
            return None;
        };
        let text = match file.read() {
            Ok(text) => text,
            Err(problem) => return Some(problem.to_string()),
        };
        let (jwt, _) = match parse_credentials(&text) {
            Ok(parsed) => parsed,
            Err(problem) => return Some(format!("{}: {problem}", file.path().display())),
        };
        let expires = jwt_expiry(jwt)?;
        (expires <= SystemTime::now()).then(|| {
            let seconds = expires
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs();
            format!(
                "the user JWT in {} expired (exp {seconds}, Unix time)",
                file.path().display()
            )
        })
    }
}

impl NatsAuth {
    /// The credentials for one connect, signing the server's `nonce`.
    fn credentials(&self, nonce: &[u8]) -> Result<async_nats::Auth, AuthError> {
        let mut auth = async_nats::Auth::new();
        let failed = |problem: String| AuthError::new(problem);
        match self {
            NatsAuth::None => {}
            NatsAuth::Credentials(file) => {
                let text = file.read().map_err(|problem| failed(problem.to_string()))?;
                let (jwt, seed) = parse_credentials(&text)
                    .map_err(|problem| failed(format!("{}: {problem}", file.path().display())))?;
                let key = nkeys::KeyPair::from_seed(seed)
                    .map_err(|problem| failed(format!("{}: {problem}", file.path().display())))?;
                auth.jwt = Some(jwt.to_string());
                auth.signature = Some(
                    key.sign(nonce)
                        .map_err(|problem| failed(problem.to_string()))?,
                );
            }
            NatsAuth::NkeySeed(file) => {
                let seed = file
                    .read_line()
                    .map_err(|problem| failed(problem.to_string()))?;
                let key = nkeys::KeyPair::from_seed(seed.trim())
                    .map_err(|problem| failed(format!("{}: {problem}", file.path().display())))?;
                auth.nkey = Some(key.public_key());
                auth.signature = Some(
                    key.sign(nonce)
                        .map_err(|problem| failed(problem.to_string()))?,
                );
            }
            NatsAuth::UserPassword { user, password } => {
                auth.username = Some(user.clone());
                auth.password = Some(
                    password
                        .read()
                        .map_err(|problem| failed(problem.to_string()))?,
                );
            }
            NatsAuth::Token(token) => {
                auth.token = Some(
                    token
                        .read()
                        .map_err(|problem| failed(problem.to_string()))?,
                );
            }
        }
        Ok(auth)
    }
}

/// The user JWT and the nkey seed of a `.creds` file: the first and second
/// blocks framed by `-----BEGIN ...-----` / `------END ...------` lines.
fn parse_credentials(text: &str) -> Result<(&str, &str), &'static str> {
    let mut blocks = text
        .lines()
        .map(str::trim)
        .skip_while(|line| !is_frame(line))
        .collect::<Vec<_>>()
        .into_iter();
    let mut contents = Vec::with_capacity(2);
    while let Some(line) = blocks.next() {
        if is_frame(line) && line.contains("BEGIN") {
            if let Some(content) = blocks.next().filter(|content| !content.is_empty()) {
                contents.push(content);
            }
        }
    }
    match contents.as_slice() {
        [jwt, seed, ..] => Ok((jwt, seed)),
        [_] => Err("no nkey seed block (-----BEGIN USER NKEY SEED-----)"),
        [] => Err("not a NATS credentials file: no -----BEGIN NATS USER JWT----- block"),
    }
}

/// A frame line of a credentials file: three or more dashes on each side.
fn is_frame(line: &str) -> bool {
    line.starts_with("---") && line.ends_with("---") && line.len() > 6
}

/// The `exp` claim of a JWT, if it has one.
fn jwt_expiry(jwt: &str) -> Option<SystemTime> {
    let claims = jwt.split('.').nth(1)?;
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&decoded).ok()?;
    let seconds = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM";

    fn creds(jwt: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------\n"
        )
    }

    fn jwt_with(claims: &str) -> String {
        let encode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        format!(
            "{}.{}.c2ln",
            encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
            encode(claims)
        )
    }

    fn config_with(edit: impl FnOnce(&mut NatsConfig)) -> NatsConfig {
        let mut config = NatsConfig::default();
        edit(&mut config);
        config
    }

    #[test]
    fn credentials_files_are_parsed_into_jwt_and_seed() {
        let jwt = jwt_with(r#"{"sub":"UA"}"#);
        let text = creds(&jwt);
        assert_eq!(parse_credentials(&text), Ok((jwt.as_str(), SEED)));
        assert!(parse_credentials("hello").is_err());
        assert!(parse_credentials(
            "-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n"
        )
        .is_err());
    }

    #[test]
    fn the_callback_signs_the_nonce_with_the_seed_read_at_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.creds");
        let jwt = jwt_with(r#"{"sub":"UA"}"#);
        std::fs::write(&path, creds(&jwt)).unwrap();
        let config = config_with(|config| config.creds_file = path.clone());
        let security = NatsSecurity::from_config(&config).unwrap();
        assert_eq!(security.method(), "creds");
        let auth = security.auth.credentials(b"nonce").unwrap();
        assert_eq!(auth.jwt.as_deref(), Some(jwt.as_str()));
        let key = nkeys::KeyPair::from_seed(SEED).unwrap();
        key.verify(b"nonce", auth.signature.as_deref().unwrap())
            .unwrap();
        // A file replaced after start is what the next connect uses.
        let rotated = jwt_with(r#"{"sub":"UA","name":"rotated"}"#);
        std::fs::write(&path, creds(&rotated)).unwrap();
        let auth = security.auth.credentials(b"nonce").unwrap();
        assert_eq!(auth.jwt.as_deref(), Some(rotated.as_str()));
    }

    #[test]
    fn an_expired_user_jwt_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.creds");
        std::fs::write(&path, creds(&jwt_with(r#"{"sub":"UA","exp":1000}"#))).unwrap();
        let security =
            NatsSecurity::from_config(&config_with(|config| config.creds_file = path.clone()))
                .unwrap();
        let problem = security.credential_problem().unwrap();
        assert!(problem.contains("expired"), "{problem}");
        std::fs::write(&path, creds(&jwt_with(r#"{"sub":"UA","exp":99999999999}"#))).unwrap();
        assert_eq!(security.credential_problem(), None);
    }

    #[test]
    fn url_credentials_move_out_of_the_url() {
        let config = config_with(|config| {
            config.servers = vec![
                "nats://relay:secret@10.0.0.5:4222".to_string(),
                "nats://relay:secret@10.0.0.6:4222".to_string(),
            ]
        });
        let security = NatsSecurity::from_config(&config).unwrap();
        assert_eq!(
            security.servers(),
            ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
        );
        let auth = security.auth.credentials(b"").unwrap();
        assert_eq!(auth.username.as_deref(), Some("relay"));
        assert_eq!(auth.password.as_deref(), Some("secret"));
        assert!(!format!("{security:?}").contains("secret"));
    }

    #[test]
    fn one_method_only_and_pairs_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0k3n\n").unwrap();
        let both = config_with(|config| {
            config.token_file = token.clone();
            config.servers = vec!["nats://u:p@h:4222".to_string()];
        });
        let problem = NatsSecurity::from_config(&both).unwrap_err();
        assert!(problem.message.contains("only one"), "{problem}");
        let user_only = config_with(|config| config.user = "relay".to_string());
        assert_eq!(
            NatsSecurity::from_config(&user_only).unwrap_err().key,
            "nats.password_file"
        );
        let cert_only = config_with(|config| config.tls_cert = token.clone());
        assert_eq!(
            NatsSecurity::from_config(&cert_only).unwrap_err().key,
            "nats.tls_key"
        );
        let missing = config_with(|config| config.creds_file = dir.path().join("nope.creds"));
        let problem = NatsSecurity::from_config(&missing).unwrap_err();
        assert_eq!(problem.key, "nats.creds_file");
        assert!(problem.message.contains("nope.creds"), "{problem}");
        let token_auth =
            NatsSecurity::from_config(&config_with(|config| config.token_file = token.clone()))
                .unwrap();
        assert_eq!(
            token_auth.auth.credentials(b"").unwrap().token.as_deref(),
            Some("t0k3n")
        );
    }

    #[test]
    fn tls_is_required_by_a_tls_url_or_any_tls_key() {
        let plain = NatsSecurity::from_config(&NatsConfig::default()).unwrap();
        assert_eq!(plain.transport(), "plaintext");
        let by_url = NatsSecurity::from_config(&config_with(|config| {
            config.servers = vec!["tls://10.0.0.5:4222".to_string()]
        }))
        .unwrap();
        assert_eq!(by_url.transport(), "tls");
        let first =
            NatsSecurity::from_config(&config_with(|config| config.tls_first = true)).unwrap();
        assert_eq!(first.transport(), "tls");
    }
}
