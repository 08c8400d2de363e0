//! Credentials embedded in server URLs (`nats://user:password@host:4222`,
//! `nats://token@host`): taken out of the URL before it is used or shown.
//!
//! A URL is printed in logs, in `/status` and by async-nats's own debug
//! logging; the secret in it must not be. The relay therefore hands its
//! clients the URL without the user part and passes the credentials the
//! way it passes those read from files.

/// The user part of a URL, percent-decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlCredentials {
    /// The user name, or a token when there is no password.
    pub user: String,
    pub password: Option<String>,
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlCredentials(***)")
    }
}

/// `url` without its user part, and that part if there was one.
pub fn split(url: &str) -> (String, Option<UrlCredentials>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => UrlCredentials {
            user: percent_decode(user),
            password: Some(percent_decode(password)),
        },
        None => UrlCredentials {
            user: percent_decode(userinfo),
            password: None,
        },
    };
    let bare = match scheme {
        Some(scheme) => format!("{scheme}://{host}{tail}"),
        None => format!("{host}{tail}"),
    };
    (bare, Some(credentials))
}

/// `url` with any user part replaced by `***`, for logs and status.
pub fn redact(url: &str) -> String {
    let (bare, credentials) = split(url);
    if credentials.is_none() {
        return bare;
    }
    match bare.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://***@{rest}"),
        None => format!("***@{bare}"),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| text.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_password_are_taken_out() {
        let (bare, credentials) = split("nats://relay:p%40ss:w@10.0.0.5:4222");
        assert_eq!(bare, "nats://10.0.0.5:4222");
        let credentials = credentials.unwrap();
        assert_eq!(credentials.user, "relay");
        assert_eq!(credentials.password.as_deref(), Some("p@ss:w"));
    }

    #[test]
    fn a_token_has_no_password() {
        let (bare, credentials) = split("tls://s3cr3t@nats.example/");
        assert_eq!(bare, "tls://nats.example/");
        assert_eq!(credentials.unwrap().password, None);
    }

    #[test]
    fn urls_without_credentials_are_unchanged() {
        for url in [
            "nats://127.0.0.1:4222",
            "127.0.0.1:4222",
            "https://etcd-0:2379/path@x",
        ] {
            assert_eq!(split(url), (url.to_string(), None));
            assert_eq!(redact(url), url);
        }
    }

    #[test]
    fn redaction_hides_the_secret_and_keeps_the_host() {
        assert_eq!(
            redact("nats://relay:secret@10.0.0.5:4222"),
            "nats://***@10.0.0.5:4222"
        );
        assert_eq!(redact("token@10.0.0.5:4222"), "***@10.0.0.5:4222");
        assert!(!format!("{:?}", split("nats://a:secret@h").1).contains("secret"));
    }
}
