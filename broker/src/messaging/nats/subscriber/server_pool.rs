//! Which NATS server the subscriber connection tries next, and how long it
//! waits first (sans-IO: the caller reports outcomes and asks for delays).
//!
//! The pool starts with the configured seeds and grows with the servers
//! the cluster announces (`connect_urls` in INFO), as async-nats's does.
//! Attempts go round the pool in order, starting after the server that
//! failed; consecutive failures back off exponentially from 50 ms up to a
//! cap, and a successful connect resets that.

use std::time::Duration;

/// One server: where to connect and which name its certificate must bear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    pub host: String,
    pub port: u16,
    /// Whether the URL said `tls://`.
    pub tls: bool,
}

impl ServerAddress {
    /// Parses `nats://host:port`, `tls://host`, `host:port` (port 4222 by
    /// default); credentials in the URL are not expected here (they were
    /// taken out when the configuration was read).
    pub fn parse(url: &str) -> Option<ServerAddress> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
        let authority = rest.split(['/', '?']).next()?;
        let authority = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal without a port has colons but ends in ']'.
            Some((host, port)) if !port.contains(']') => (host, port.parse().ok()?),
            _ => (authority, 4222),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| ServerAddress {
            host: host.to_string(),
            port,
            tls: scheme.eq_ignore_ascii_case("tls"),
        })
    }

    /// `host:port`, for connecting and for logs.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The servers and where the next attempt goes.
#[derive(Debug)]
pub struct ServerPool {
    servers: Vec<ServerAddress>,
    next: usize,
    failures: u32,
    delay_max: Duration,
}

impl ServerPool {
    pub fn new(seeds: Vec<ServerAddress>, delay_max: Duration) -> ServerPool {
        ServerPool {
            servers: seeds,
            next: 0,
            failures: 0,
            delay_max,
        }
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// The server to try now, if there is any.
    pub fn current(&self) -> Option<&ServerAddress> {
        self.servers.get(self.next % self.servers.len().max(1))
    }

    /// How long to wait before the next attempt.
    pub fn delay(&self) -> Duration {
        if self.failures == 0 {
            return Duration::ZERO;
        }
        let exponent = self.failures.min(10);
        Duration::from_millis(50u64.saturating_mul(1 << exponent)).min(self.delay_max)
    }

    /// The attempt on the current server failed: the next one is tried.
    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.next = (self.next + 1) % self.servers.len().max(1);
    }

    /// The current server accepted the connection.
    pub fn connected(&mut self) {
        self.failures = 0;
    }

    /// The connection to the current server ended: try the next at once
    /// (the cluster most likely lost that member).
    pub fn lost(&mut self) {
        self.next = (self.next + 1) % self.servers.len().max(1);
    }

    /// Adds servers the cluster announced; returns how many were new.
    pub fn learn(&mut self, urls: &[String], tls: bool) -> usize {
        let mut added = 0;
        for url in urls {
            let Some(mut address) = ServerAddress::parse(url) else {
                continue;
            };
            address.tls = tls;
            let known = self
                .servers
                .iter()
                .any(|server| server.host == address.host && server.port == address.port);
            if !known {
                self.servers.push(address);
                added += 1;
            }
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(urls: &[&str]) -> ServerPool {
        ServerPool::new(
            urls.iter()
                .filter_map(|url| ServerAddress::parse(url))
                .collect(),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn urls_parse_into_host_port_and_tls() {
        assert_eq!(
            ServerAddress::parse("tls://nats.example:4333"),
            Some(ServerAddress {
                host: "nats.example".into(),
                port: 4333,
                tls: true
            })
        );
        let plain = ServerAddress::parse("10.0.0.5").unwrap();
        assert_eq!((plain.port, plain.tls), (4222, false));
        assert_eq!(plain.host_port(), "10.0.0.5:4222");
        let v6 = ServerAddress::parse("nats://[::1]:4222").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.host_port(), "[::1]:4222");
        assert_eq!(ServerAddress::parse("nats://:4222"), None);
    }

    #[test]
    fn failures_rotate_and_back_off_until_a_connect_resets_them() {
        let mut pool = pool(&["a:1", "b:2"]);
        assert_eq!(pool.current().unwrap().host, "a");
        assert_eq!(pool.delay(), Duration::ZERO);
        pool.failed();
        assert_eq!(pool.current().unwrap().host, "b");
        assert_eq!(pool.delay(), Duration::from_millis(100));
        pool.failed();
        pool.failed();
        pool.failed();
        assert_eq!(pool.delay(), Duration::from_millis(800));
        pool.failed();
        assert_eq!(pool.delay(), Duration::from_secs(1), "capped");
        pool.connected();
        assert_eq!(pool.delay(), Duration::ZERO);
        let before = pool.current().unwrap().host.clone();
        pool.lost();
        assert_ne!(
            pool.current().unwrap().host,
            before,
            "a lost server is not retried first"
        );
    }

    #[test]
    fn announced_servers_join_once() {
        let mut pool = pool(&["nats://127.0.0.1:4222"]);
        let urls = vec!["127.0.0.1:4222".to_string(), "127.0.0.1:4223".to_string()];
        assert_eq!(pool.learn(&urls, true), 1);
        assert_eq!(pool.learn(&urls, true), 0);
        assert_eq!(pool.len(), 2);
    }
}
