//! INFO: what the server announces to a client first.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

/// The INFO fields a NATS client needs from a server.
///
/// Serialized in nats-server's field order; `client_ip` is omitted when
/// unknown because clients (async-nats among them) read it as a string and
/// reject `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    /// 1: the server may send INFO again (clients use it to enable `echo: false`).
    pub proto: u8,
    pub host: String,
    pub port: u16,
    /// The server accepts HPUB and sends HMSG.
    pub headers: bool,
    pub max_payload: usize,
    pub client_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// Lame duck mode: the server is about to go away and the client should
    /// reconnect (nats-server sends it before a planned shutdown). Omitted
    /// when false, as nats-server does.
    #[serde(skip_serializing_if = "is_false")]
    pub ldm: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Appends `INFO {json}\r\n`.
pub fn encode_info(info: &ServerInfo, out: &mut BytesMut) {
    // Strings, integers and booleans always serialize; the fallback only
    // avoids a panic path.
    let json = serde_json::to_vec(info).unwrap_or_else(|_| b"{}".to_vec());
    out.reserve(5 + json.len() + 2);
    out.put_slice(b"INFO ");
    out.put_slice(&json);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ServerInfo {
        ServerInfo {
            server_id: "NID".into(),
            server_name: "holdfast-1".into(),
            version: "0.1.0".into(),
            proto: 1,
            host: "0.0.0.0".into(),
            port: 4222,
            headers: true,
            max_payload: 1048576,
            client_id: 7,
            client_ip: Some("127.0.0.1".into()),
            ldm: false,
        }
    }

    #[test]
    fn exact_bytes() {
        let mut out = BytesMut::new();
        encode_info(&info(), &mut out);
        assert_eq!(
            &out[..],
            &br#"INFO {"server_id":"NID","server_name":"holdfast-1","version":"0.1.0","proto":1,"host":"0.0.0.0","port":4222,"headers":true,"max_payload":1048576,"client_id":7,"client_ip":"127.0.0.1"}"#[..]
                .iter()
                .chain(b"\r\n")
                .copied()
                .collect::<Vec<u8>>()[..]
        );
    }

    #[test]
    fn lame_duck_mode_is_announced_only_when_on() {
        let mut out = BytesMut::new();
        encode_info(
            &ServerInfo {
                ldm: true,
                ..info()
            },
            &mut out,
        );
        assert!(std::str::from_utf8(&out)
            .unwrap()
            .contains(r#","ldm":true}"#));
    }

    #[test]
    fn unknown_client_ip_is_omitted_and_strings_are_escaped() {
        let mut out = BytesMut::new();
        let info = ServerInfo {
            client_ip: None,
            server_name: "a\"b\r\n".into(),
            ..info()
        };
        encode_info(&info, &mut out);
        let line = std::str::from_utf8(&out).unwrap();
        assert!(!line.contains("client_ip"));
        assert!(line.contains(r#""server_name":"a\"b\r\n""#));
        // The only CRLF is the terminator, so the INFO stays one line.
        assert_eq!(line.find("\r\n"), Some(line.len() - 2));
        let json = &line["INFO ".len()..line.len() - 2];
        assert_eq!(serde_json::from_str::<ServerInfo>(json).unwrap(), info);
    }
}
