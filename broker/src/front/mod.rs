//! How clients get in: the Unix socket, QUIC, the NATS and etcd front
//! ends, who a peer is and what it may do, and the limits on accepting.

pub mod accept_pressure;
pub mod access;
pub mod cert_subject;
pub mod etcd;
pub mod fd_budget;
pub mod nats;
pub mod peer;
pub mod quic;
pub mod socket_guard;
pub mod tls;
pub mod unix;
