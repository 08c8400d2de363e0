//! The CONNECT operation's JSON: the options a client asks for.
//!
//! nats-server unmarshals CONNECT into a struct pre-set to
//! `verbose: true, pedantic: true, echo: true`, so a client that omits a field
//! gets that default, a `null` leaves the default in place, and unknown fields
//! are ignored. [`Connect::from_json`] does the same.

use super::NatsProtocolError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The CONNECT fields a server acts on (unknown fields are ignored).
///
/// `Default` is what nats-server assumes for `CONNECT {}`.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Connect {
    /// Acknowledge every well-formed operation with `+OK`.
    pub verbose: bool,
    /// Ask the server for extra checks (e.g. subject syntax on PUB).
    pub pedantic: bool,
    /// Deliver this connection's own publishes to its own subscriptions.
    /// On the wire this is `echo`; clients' `no_echo` option sends `"echo":false`.
    pub echo: bool,
    /// The client understands HMSG (and may send HPUB).
    pub headers: bool,
    /// The client wants a 503 status message when a request has no responders.
    pub no_responders: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// 0: original protocol; 1: the client accepts asynchronous INFO updates.
    pub protocol: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
}

impl Default for Connect {
    fn default() -> Connect {
        Connect {
            verbose: true,
            pedantic: true,
            echo: true,
            headers: false,
            no_responders: false,
            name: None,
            lang: None,
            version: None,
            protocol: 0,
            user: None,
            pass: None,
            auth_token: None,
        }
    }
}

/// The JSON as sent: every field optional so absence and `null` both mean
/// "nats-server's default".
#[derive(Deserialize)]
struct RawConnect {
    verbose: Option<bool>,
    pedantic: Option<bool>,
    echo: Option<bool>,
    // Not part of the protocol, but some hand-written clients send their
    // option's name; honouring it costs nothing.
    no_echo: Option<bool>,
    headers: Option<bool>,
    no_responders: Option<bool>,
    name: Option<String>,
    lang: Option<String>,
    version: Option<String>,
    protocol: Option<i64>,
    user: Option<String>,
    pass: Option<String>,
    auth_token: Option<String>,
}

/// The protocol versions nats-server accepts (`ClientProtoZero..=ClientProtoInfo`).
const MAX_CLIENT_PROTOCOL: i64 = 1;

impl Connect {
    /// Parses CONNECT's argument, applying nats-server's defaults and checks.
    pub fn from_json(json: &[u8]) -> Result<Connect, NatsProtocolError> {
        // serde accepts a JSON array for a struct (fields by position); a
        // CONNECT argument must be an object.
        if json.first() != Some(&b'{') {
            return Err(NatsProtocolError::InvalidConnect(
                "expected a JSON object".to_owned(),
            ));
        }
        let raw: RawConnect = serde_json::from_slice(json)
            .map_err(|error| NatsProtocolError::InvalidConnect(error.to_string()))?;
        let defaults = Connect::default();
        let protocol = raw.protocol.unwrap_or(0);
        let protocol = match u8::try_from(protocol) {
            Ok(value) if i64::from(value) <= MAX_CLIENT_PROTOCOL => value,
            _ => return Err(NatsProtocolError::InvalidClientProtocol(protocol)),
        };
        let headers = raw.headers.unwrap_or(defaults.headers);
        let no_responders = raw.no_responders.unwrap_or(defaults.no_responders);
        if no_responders && !headers {
            return Err(NatsProtocolError::NoRespondersRequiresHeaders);
        }
        let echo = match (raw.echo, raw.no_echo) {
            (Some(echo), _) => echo && raw.no_echo != Some(true),
            (None, Some(no_echo)) => !no_echo,
            (None, None) => defaults.echo,
        };
        Ok(Connect {
            verbose: raw.verbose.unwrap_or(defaults.verbose),
            pedantic: raw.pedantic.unwrap_or(defaults.pedantic),
            echo,
            headers,
            no_responders,
            name: non_empty(raw.name),
            lang: non_empty(raw.lang),
            version: non_empty(raw.version),
            protocol,
            user: non_empty(raw.user),
            pass: non_empty(raw.pass),
            auth_token: non_empty(raw.auth_token),
        })
    }

    /// The JSON a client would send (absent options omitted).
    pub fn to_json(&self) -> String {
        // Serializing a struct of bools, integers and strings cannot fail;
        // the fallback only exists to avoid a panic path.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// nats-server reads a string field into a Go `string`, where "" is "not
/// given"; mapping it to `None` keeps "no user" a single case.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.is_empty())
}

// Hand-written so that logging a CONNECT never logs its credentials.
impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("Connect")
            .field("verbose", &self.verbose)
            .field("pedantic", &self.pedantic)
            .field("echo", &self.echo)
            .field("headers", &self.headers)
            .field("no_responders", &self.no_responders)
            .field("name", &self.name)
            .field("lang", &self.lang)
            .field("version", &self.version)
            .field("protocol", &self.protocol)
            .field("user", &self.user)
            .field("pass", &redacted(&self.pass))
            .field("auth_token", &redacted(&self.auth_token))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_gets_nats_server_defaults() {
        let connect = Connect::from_json(b"{}").unwrap();
        assert_eq!(connect, Connect::default());
        assert!(connect.verbose && connect.pedantic && connect.echo);
        assert!(!connect.headers && !connect.no_responders);
        assert_eq!(connect.protocol, 0);
    }

    #[test]
    fn typical_client_connect() {
        let json = br#"{"verbose":false,"pedantic":false,"lang":"rust","version":"0.51.0","protocol":1,"echo":true,"headers":true,"no_responders":true,"tls_required":false,"name":"svc","user":"u","pass":"p","auth_token":"t","sig":"x","jwt":"y","nkey":"z"}"#;
        let connect = Connect::from_json(json).unwrap();
        assert_eq!(
            connect,
            Connect {
                verbose: false,
                pedantic: false,
                echo: true,
                headers: true,
                no_responders: true,
                name: Some("svc".into()),
                lang: Some("rust".into()),
                version: Some("0.51.0".into()),
                protocol: 1,
                user: Some("u".into()),
                pass: Some("p".into()),
                auth_token: Some("t".into()),
            }
        );
    }

    #[test]
    fn unknown_fields_of_any_type_are_ignored() {
        let json = br#"{"future":{"nested":[1,2,{"a":null}]},"x":1.5,"verbose":false}"#;
        let connect = Connect::from_json(json).unwrap();
        assert!(!connect.verbose);
        assert!(connect.pedantic);
    }

    #[test]
    fn null_means_default() {
        let connect = Connect::from_json(br#"{"verbose":null,"echo":null,"name":null}"#).unwrap();
        assert_eq!(connect, Connect::default());
    }

    #[test]
    fn echo_false_and_no_echo() {
        assert!(!Connect::from_json(br#"{"echo":false}"#).unwrap().echo);
        assert!(!Connect::from_json(br#"{"no_echo":true}"#).unwrap().echo);
        assert!(Connect::from_json(br#"{"no_echo":false}"#).unwrap().echo);
        // Either way of asking not to echo wins.
        assert!(
            !Connect::from_json(br#"{"echo":true,"no_echo":true}"#)
                .unwrap()
                .echo
        );
        assert!(
            !Connect::from_json(br#"{"echo":false,"no_echo":false}"#)
                .unwrap()
                .echo
        );
    }

    #[test]
    fn empty_strings_are_absent() {
        let connect = Connect::from_json(br#"{"name":"","user":"","auth_token":""}"#).unwrap();
        assert_eq!(connect.name, None);
        assert_eq!(connect.user, None);
        assert_eq!(connect.auth_token, None);
    }

    #[test]
    fn protocol_outside_zero_or_one_is_rejected() {
        for (json, value) in [
            (&br#"{"protocol":2}"#[..], 2),
            (br#"{"protocol":-1}"#, -1),
            (br#"{"protocol":300}"#, 300),
        ] {
            assert_eq!(
                Connect::from_json(json),
                Err(NatsProtocolError::InvalidClientProtocol(value))
            );
        }
        assert!(matches!(
            Connect::from_json(br#"{"protocol":1.5}"#),
            Err(NatsProtocolError::InvalidConnect(_))
        ));
    }

    #[test]
    fn no_responders_needs_headers() {
        assert_eq!(
            Connect::from_json(br#"{"no_responders":true}"#),
            Err(NatsProtocolError::NoRespondersRequiresHeaders)
        );
    }

    #[test]
    fn malformed_json_is_rejected() {
        for json in [
            &b""[..],
            b"[true,true]",
            b"{",
            b"{\"verbose\":\"yes\"}",
            b"{} trailing",
            b"\"string\"",
            b"{\"name\":\"\xff\"}",
        ] {
            assert!(
                matches!(
                    Connect::from_json(json),
                    Err(NatsProtocolError::InvalidConnect(_))
                ),
                "{:?}",
                String::from_utf8_lossy(json)
            );
        }
    }

    #[test]
    fn json_round_trips() {
        let connect = Connect {
            verbose: false,
            echo: false,
            headers: true,
            name: Some("n".into()),
            pass: Some("secret".into()),
            protocol: 1,
            ..Connect::default()
        };
        assert_eq!(
            Connect::from_json(connect.to_json().as_bytes()),
            Ok(connect)
        );
    }

    #[test]
    fn debug_redacts_credentials() {
        let connect = Connect {
            user: Some("alice".into()),
            pass: Some("hunter2".into()),
            auth_token: Some("s3cr3t".into()),
            ..Connect::default()
        };
        let debug = format!("{connect:?}");
        assert!(debug.contains("alice"));
        assert!(!debug.contains("hunter2") && !debug.contains("s3cr3t"));
        assert!(debug.contains("<redacted>"));
    }
}
