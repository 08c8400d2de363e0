//! What holdfastd checks before it starts, beyond the configuration's shape:
//! the upstream TLS and credential settings (which read files), and the
//! warnings an operator should see but that do not stop the relay.
//!
//! Separate from `config` so the configuration stays a leaf every layer may
//! read, while the security modules that interpret it sit above it.

use crate::config::{Config, ConfigError, Overrides};
use crate::keys::etcd::security::EtcdSecurity;
use crate::messaging::nats::security::NatsSecurity;
use crate::util::secret_file::readable_by_others;
use crate::util::url_credentials;
use std::path::Path;

/// A configuration ready to start the relay from.
#[derive(Debug)]
pub struct CheckedConfig {
    pub config: Config,
    /// What an operator should fix but that does not stop the relay.
    pub warnings: Vec<String>,
}

/// Loads the configuration as `Config::load` does, then checks the `[nats]`
/// and `[etcd]` TLS and authentication settings; errors name the key.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<CheckedConfig, ConfigError> {
    let config = Config::load(path, overrides)?;
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        path: path.map(Path::to_path_buf),
        key,
        message,
    };
    let nats = NatsSecurity::from_config(&config.nats)
        .map_err(|problem| invalid(problem.key, problem.message))?;
    let etcd = EtcdSecurity::from_config(&config.etcd)
        .map_err(|problem| invalid(problem.key, problem.message))?;
    let mut warnings = nats.warnings();
    warnings.extend(etcd.warnings());
    warnings.extend(url_secrets_warning(&config, path));
    Ok(CheckedConfig { config, warnings })
}

/// A config file that puts credentials into NATS URLs must not be readable
/// by every user of the machine.
fn url_secrets_warning(config: &Config, path: Option<&Path>) -> Option<String> {
    let urls_hold_secrets = config
        .nats
        .servers
        .iter()
        .any(|url| url_credentials::split(url).1.is_some());
    let path = path.filter(|path| urls_hold_secrets && readable_by_others(path))?;
    Some(format!(
        "{} holds credentials in server URLs and is readable by every user on this machine; restrict it (chmod o-r) or move them to a password_file",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn a_readable_config_with_credentials_in_a_url_is_warned_about_without_the_secret() {
        use std::os::unix::fs::PermissionsExt;
        let file = write_config("[nats]\nservers = [\"nats://relay:s3cret@10.0.0.5:4222\"]\n");
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let warnings = load(Some(file.path()), &Overrides::default())
            .unwrap()
            .warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("readable by every user"),
            "{warnings:?}"
        );
        assert!(!warnings[0].contains("s3cret"), "{warnings:?}");
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let warnings = load(Some(file.path()), &Overrides::default())
            .unwrap()
            .warnings;
        assert!(warnings.is_empty(), "{warnings:?}");
        // On the command line the same URL is refused outright.
        let overrides = Overrides {
            nats_servers: Some("nats://relay:s3cret@10.0.0.5:4222".to_string()),
            ..Overrides::default()
        };
        let error = load(None, &overrides).unwrap_err().to_string();
        assert!(
            error.contains("nats.servers") && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_credentials_file_is_refused_naming_the_key_and_the_file() {
        let file = write_config("[nats]\ncreds_file = \"/nonexistent/holdfast.creds\"\n");
        let error = load(Some(file.path()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("nats.creds_file"), "{error}");
        assert!(
            error.contains(&file.path().display().to_string()),
            "{error}"
        );
        let file = write_config("[etcd]\ntls_cert = \"/nonexistent/client.pem\"\n");
        let error = load(Some(file.path()), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("etcd.tls"), "{error}");
    }
}
