//! Where the relay listens: `unix:///path/to.sock` or `quic://host:port`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The environment variable that names the relay, shared with the CLI's `--url`.
pub const URL_ENV: &str = "HOLDFAST_URL";

/// The relay's address when nothing else is configured.
pub const DEFAULT_URL: &str = "unix:///run/holdfast/holdfast.sock";

/// The address of a relay.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RelayUrl {
    /// A Unix domain socket at an absolute path.
    Unix { path: PathBuf },
    /// A QUIC endpoint; connecting needs TLS settings
    /// ([`ConnectOptions::tls_ca`](crate::ConnectOptions::tls_ca)).
    Quic { host: String, port: u16 },
}

/// Why a string is not a relay URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("relay URL `{0}` has no scheme; expected unix:///path/to.sock or quic://host:port")]
    MissingScheme(String),
    #[error("relay URL scheme `{0}` is not supported; expected `unix` or `quic`")]
    UnsupportedScheme(String),
    #[error("unix relay URL `{0}` needs an absolute socket path, e.g. unix:///run/holdfast/holdfast.sock")]
    NotAbsolutePath(String),
    #[error("quic relay URL `{0}` has no host")]
    MissingHost(String),
    #[error("quic relay URL `{0}` has no port; expected quic://host:port")]
    MissingPort(String),
    #[error("quic relay URL `{url}` has an invalid port `{port}`")]
    InvalidPort { url: String, port: String },
    #[error("quic relay URL `{0}` must not have a path, query or user info")]
    UnexpectedComponent(String),
    #[error("environment variable {URL_ENV} is not valid UTF-8")]
    EnvNotUnicode,
}

impl RelayUrl {
    /// The URL in `HOLDFAST_URL`, or [`DEFAULT_URL`] when it is unset or empty.
    pub fn from_env() -> Result<RelayUrl, UrlError> {
        match std::env::var(URL_ENV) {
            Ok(value) if !value.trim().is_empty() => value.trim().parse(),
            Ok(_) | Err(std::env::VarError::NotPresent) => DEFAULT_URL.parse(),
            Err(std::env::VarError::NotUnicode(_)) => Err(UrlError::EnvNotUnicode),
        }
    }

    /// The URL scheme (`unix` or `quic`).
    pub fn scheme(&self) -> &'static str {
        match self {
            RelayUrl::Unix { .. } => "unix",
            RelayUrl::Quic { .. } => "quic",
        }
    }
}

impl Default for RelayUrl {
    fn default() -> RelayUrl {
        RelayUrl::Unix {
            path: PathBuf::from("/run/holdfast/holdfast.sock"),
        }
    }
}

impl FromStr for RelayUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<RelayUrl, UrlError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(UrlError::MissingScheme(url.to_owned()));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "unix" => parse_unix(url, rest),
            "quic" => parse_quic(url, rest),
            _ => Err(UrlError::UnsupportedScheme(scheme.to_owned())),
        }
    }
}

fn parse_unix(url: &str, rest: &str) -> Result<RelayUrl, UrlError> {
    // `unix://relative/path` would silently make `relative` a host name in
    // every other URL parser, so only the three-slash form is accepted.
    if !rest.starts_with('/') || rest.len() < 2 {
        return Err(UrlError::NotAbsolutePath(url.to_owned()));
    }
    Ok(RelayUrl::Unix {
        path: PathBuf::from(rest),
    })
}

fn parse_quic(url: &str, rest: &str) -> Result<RelayUrl, UrlError> {
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(UrlError::UnexpectedComponent(url.to_owned()));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        // IPv6 literal: the port separator is the colon after the bracket.
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(UrlError::MissingHost(url.to_owned()));
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(UrlError::MissingPort(url.to_owned()));
        };
        (host, port)
    } else {
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(UrlError::MissingPort(url.to_owned()));
        };
        if host.contains(':') {
            // An unbracketed IPv6 address is ambiguous about where the port is.
            return Err(UrlError::MissingPort(url.to_owned()));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(UrlError::MissingHost(url.to_owned()));
    }
    if port.is_empty() {
        return Err(UrlError::MissingPort(url.to_owned()));
    }
    let port = match port.parse::<u16>() {
        Ok(port) if port != 0 => port,
        _ => {
            return Err(UrlError::InvalidPort {
                url: url.to_owned(),
                port: port.to_owned(),
            })
        }
    };
    Ok(RelayUrl::Quic {
        host: host.to_owned(),
        port,
    })
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayUrl::Unix { path } => write!(f, "unix://{}", path.display()),
            RelayUrl::Quic { host, port } if host.contains(':') => {
                write!(f, "quic://[{host}]:{port}")
            }
            RelayUrl::Quic { host, port } => write!(f, "quic://{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_urls_need_an_absolute_path() {
        assert_eq!(
            "unix:///run/holdfast/holdfast.sock".parse(),
            Ok(RelayUrl::Unix {
                path: PathBuf::from("/run/holdfast/holdfast.sock")
            })
        );
        assert_eq!(
            "unix://relative.sock".parse::<RelayUrl>(),
            Err(UrlError::NotAbsolutePath("unix://relative.sock".into()))
        );
        assert_eq!(
            "unix://".parse::<RelayUrl>(),
            Err(UrlError::NotAbsolutePath("unix://".into()))
        );
        assert_eq!(
            "unix:///".parse::<RelayUrl>(),
            Err(UrlError::NotAbsolutePath("unix:///".into()))
        );
    }

    #[test]
    fn quic_urls_need_host_and_port() {
        assert_eq!(
            "quic://relay.local:4433".parse(),
            Ok(RelayUrl::Quic {
                host: "relay.local".into(),
                port: 4433
            })
        );
        assert_eq!(
            "quic://[::1]:4433/".parse(),
            Ok(RelayUrl::Quic {
                host: "::1".into(),
                port: 4433
            })
        );
        assert!(matches!(
            "quic://relay.local".parse::<RelayUrl>(),
            Err(UrlError::MissingPort(_))
        ));
        assert!(matches!(
            "quic://:4433".parse::<RelayUrl>(),
            Err(UrlError::MissingHost(_))
        ));
        assert!(matches!(
            "quic://h:99999".parse::<RelayUrl>(),
            Err(UrlError::InvalidPort { .. })
        ));
        assert!(matches!(
            "quic://h:0".parse::<RelayUrl>(),
            Err(UrlError::InvalidPort { .. })
        ));
        assert!(matches!(
            "quic://h:1/path".parse::<RelayUrl>(),
            Err(UrlError::UnexpectedComponent(_))
        ));
        assert!(matches!(
            "quic://::1:4433".parse::<RelayUrl>(),
            Err(UrlError::MissingPort(_))
        ));
    }

    #[test]
    fn other_schemes_and_bare_paths_are_rejected() {
        assert_eq!(
            "/run/holdfast.sock".parse::<RelayUrl>(),
            Err(UrlError::MissingScheme("/run/holdfast.sock".into()))
        );
        assert_eq!(
            "nats://localhost:4222".parse::<RelayUrl>(),
            Err(UrlError::UnsupportedScheme("nats".into()))
        );
    }

    #[test]
    fn display_round_trips() {
        for url in [
            "unix:///tmp/relay.sock",
            "quic://relay.local:4433",
            "quic://[::1]:4433",
        ] {
            let parsed: RelayUrl = url.parse().unwrap();
            assert_eq!(parsed.to_string(), url);
        }
        assert_eq!(RelayUrl::default().to_string(), DEFAULT_URL);
    }
}
