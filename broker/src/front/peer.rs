//! Who is on the other end of a connection, as far as the transport proves.
//!
//! A Unix-socket peer is known by the kernel's credentials (`SO_PEERCRED`),
//! a QUIC peer by the common name of the client certificate it presented
//! (none without mutual TLS), a NATS-protocol client by its address only.
//! Access rules and logs use this; nothing the
//! client says about itself (HELLO's client name) counts as identity.

use std::fmt;
use std::net::SocketAddr;

/// The proven identity of a connection's peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on this node, by its credentials at connect time.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// A QUIC client: its address and, under mutual TLS, its certificate's
    /// subject common name.
    Quic {
        address: SocketAddr,
        common_name: Option<String>,
    },
    /// A client of the NATS client-protocol front end: TCP, no proven
    /// identity, so it matches no access rule and gets `access.default`.
    NatsProtocol { address: SocketAddr },
    /// A Unix-socket peer whose credentials the kernel would not give; it
    /// matches no access rule.
    Unknown,
}

impl Peer {
    /// The peer of a freshly accepted Unix-socket connection.
    pub fn of_unix_stream(stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(credentials) => Peer::Unix {
                uid: credentials.uid(),
                gid: credentials.gid(),
                pid: credentials.pid(),
            },
            Err(_) => Peer::Unknown,
        }
    }

    /// What the transport proved about the peer, without what changes from
    /// one connection of the same process to the next (its pid, its QUIC
    /// address): two sessions with equal identities may be the same
    /// process reconnecting.
    pub fn identity(&self) -> String {
        match self {
            Peer::Unix { uid, .. } => format!("uid={uid}"),
            Peer::Quic {
                common_name: Some(name),
                ..
            } => format!("cn={name}"),
            Peer::Quic {
                common_name: None, ..
            } => "quic".to_string(),
            Peer::NatsProtocol { .. } => "nats-protocol".to_string(),
            Peer::Unknown => "unknown".to_string(),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { uid, gid, pid } => {
                write!(f, "unix uid={uid} gid={gid}")?;
                match pid {
                    Some(pid) => write!(f, " pid={pid}"),
                    None => Ok(()),
                }
            }
            Peer::Quic {
                address,
                common_name: Some(name),
            } => write!(f, "quic {address} cn={name}"),
            Peer::Quic {
                address,
                common_name: None,
            } => write!(f, "quic {address}"),
            Peer::NatsProtocol { address } => write!(f, "nats-protocol {address}"),
            Peer::Unknown => f.write_str("unix (credentials unavailable)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unix_peer_is_this_process() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let peer = Peer::of_unix_stream(&ours);
        let expected_uid = unsafe { libc::geteuid() };
        match peer {
            Peer::Unix { uid, pid, .. } => {
                assert_eq!(uid, expected_uid);
                assert_eq!(pid, Some(std::process::id() as i32));
            }
            other => panic!("expected unix credentials, got {other:?}"),
        }
    }
}
