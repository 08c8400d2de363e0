//! Test kit for production-like upstreams: certificates, secret files, a
//! 3-node NATS cluster and a 3-member etcd cluster (either with TLS), all
//! real processes on loopback that a test kills and restarts by member.

#![allow(dead_code)]

use crate::support::{find_binary, free_port, wait_until, NatsServer, Process, WAIT};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A development CA with a server certificate for localhost/127.0.0.1 and
/// a client certificate, made by `holdfastd gen-cert`.
pub struct Certificates {
    dir: TempDir,
}

impl Certificates {
    /// Client certificate subject CN `client_cn`.
    pub fn generate(client_cn: &str) -> Certificates {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = Command::new(env!("CARGO_BIN_EXE_holdfastd"))
            .args(["gen-cert", "--client-cn", client_cn, "--out"])
            .arg(dir.path())
            .output()
            .expect("run holdfastd gen-cert");
        assert!(
            output.status.success(),
            "gen-cert failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Certificates { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// The nats-server `tls { }` block that verifies client certificates.
    pub fn nats_tls_block(&self, verify_clients: bool) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify_clients}\n  timeout: 2\n}}\n",
            self.server_cert().display(),
            self.server_key().display(),
            self.ca().display()
        )
    }

    /// etcd-client TLS options trusting this CA, with the client certificate.
    pub fn etcd_tls(&self) -> etcd_client::TlsOptions {
        let read = |path: PathBuf| std::fs::read(path).expect("read certificate file");
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(self.ca())))
            .identity(etcd_client::Identity::from_pem(
                read(self.client_cert()),
                read(self.client_key()),
            ))
    }
}

/// Writes `contents` to a new file only its owner may read (a secret).
pub fn secret_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("create secret file");
    file.write_all(contents.as_bytes())
        .expect("write secret file");
    path
}

/// GET on an HTTP endpoint of a local process: the body (HTTP/1.0, so
/// never chunked).
pub fn http_body(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// A NATS cluster of full-mesh routed servers.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    monitor_ports: Vec<u16>,
}

impl NatsCluster {
    /// `size` servers, each with `extra` configuration (TLS, auth) added.
    pub fn start(size: usize, extra: &str) -> NatsCluster {
        let ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let servers = (0..size)
            .map(|member| {
                let config = format!(
                    "server_name: n{member}\nhttp: \"127.0.0.1:{}\"\ncluster {{\n  name: holdfast-test\n  host: 127.0.0.1\n  port: {}\n  routes: [{routes}]\n}}\n{extra}",
                    monitor_ports[member], route_ports[member]
                );
                NatsServer::start_configured_on(ports[member], &config)
            })
            .collect();
        let cluster = NatsCluster {
            servers,
            monitor_ports,
        };
        cluster.wait_for_routes();
        cluster
    }

    /// Waits until every running server routes to every other running one.
    pub fn wait_for_routes(&self) {
        let running = self.servers.len();
        wait_until("the NATS cluster's routes", || {
            self.monitor_ports
                .iter()
                .all(|port| distinct_routes(*port).is_some_and(|routes| routes + 1 >= running))
        });
    }

    /// Waits until the running servers other than `down` route to each other.
    pub fn wait_for_routes_without(&self, down: usize) {
        let expected = self.servers.len() - 2;
        wait_until("the surviving NATS servers' routes", || {
            self.monitor_ports
                .iter()
                .enumerate()
                .filter(|(member, _)| *member != down)
                .all(|(_, port)| distinct_routes(*port).is_some_and(|routes| routes >= expected))
        });
    }

    /// The seed URLs, with `scheme` (`nats` or `tls`).
    pub fn urls(&self, scheme: &str) -> Vec<String> {
        self.servers
            .iter()
            .map(|server| format!("{scheme}://127.0.0.1:{}", server.port()))
            .collect()
    }

    /// The member listening on `host_port` ("127.0.0.1:PORT").
    pub fn member_at(&self, host_port: &str) -> Option<usize> {
        let port: u16 = host_port.rsplit(':').next()?.parse().ok()?;
        self.servers.iter().position(|server| server.port() == port)
    }
}

/// How many other servers the server with monitor port `port` routes to.
fn distinct_routes(port: u16) -> Option<usize> {
    let body = http_body(port, "/routez")?;
    let routez: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut remotes: Vec<&str> = routez["routes"]
        .as_array()?
        .iter()
        .filter_map(|route| route["remote_id"].as_str())
        .collect();
    remotes.sort_unstable();
    remotes.dedup();
    Some(remotes.len())
}

/// One member of an [`EtcdCluster`].
pub struct EtcdMember {
    pub name: String,
    client_port: u16,
    peer_port: u16,
    dir: TempDir,
    process: Process,
    starts: u32,
}

impl EtcdMember {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn logs(&self) -> String {
        let mut text = String::new();
        for start in 1..=self.starts {
            let path = self.dir.path().join(format!("etcd.{start}.log"));
            let _ = std::fs::File::open(path).map(|mut file| file.read_to_string(&mut text));
        }
        text
    }
}

/// A static etcd cluster, optionally serving clients over TLS with client
/// certificates required. Members talk to each other in plaintext.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    tls: Option<Certificates>,
    token: String,
    /// Extra etcd flags for every member.
    extra_args: Vec<String>,
}

impl EtcdCluster {
    /// `size` members with etcd's default election timing (heartbeat
    /// 100 ms, election 1 s), as a production cluster has.
    pub fn start(size: usize, tls: Option<Certificates>) -> EtcdCluster {
        EtcdCluster::start_with(size, tls, &[])
    }

    /// As [`EtcdCluster::start`], with `extra_args` given to every member.
    pub fn start_with(size: usize, tls: Option<Certificates>, extra_args: &[&str]) -> EtcdCluster {
        let members = (0..size)
            .map(|member| EtcdMember {
                name: format!("m{member}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                process: Process::default(),
                starts: 0,
            })
            .collect();
        let mut cluster = EtcdCluster {
            members,
            tls,
            token: format!("holdfast-test-{}", free_port()),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
        };
        for member in 0..size {
            cluster.spawn(member);
        }
        let deadline = Instant::now() + WAIT;
        while cluster.leader().is_none() {
            assert!(
                Instant::now() < deadline,
                "the etcd cluster elected no leader:\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// The certificates of a TLS cluster.
    pub fn certificates(&self) -> Option<&Certificates> {
        self.tls.as_ref()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client URL of `member`.
    pub fn url(&self, member: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[member].client_port
        )
    }

    pub fn urls(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|member| self.url(member))
            .collect()
    }

    fn spawn(&mut self, member: usize) {
        let initial_cluster = self
            .members
            .iter()
            .map(|other| format!("{}=http://127.0.0.1:{}", other.name, other.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let client_url = self.url(member);
        let this = &mut self.members[member];
        this.starts += 1;
        let log = std::fs::File::create(this.dir.path().join(format!("etcd.{}.log", this.starts)))
            .expect("log file");
        let peer_url = format!("http://127.0.0.1:{}", this.peer_port);
        let mut command = Command::new(find_binary("etcd", "HOLDFAST_ETCD"));
        command
            .args(["--name", &this.name])
            .arg("--data-dir")
            .arg(this.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(&self.extra_args);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(tls.server_cert())
                .arg("--key-file")
                .arg(tls.server_key())
                .arg("--trusted-ca-file")
                .arg(tls.ca())
                .arg("--client-cert-auth");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        this.process.adopt(child);
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, member: usize) {
        self.members[member].process.kill();
    }

    /// Starts a killed member again on its data.
    pub fn start_again(&mut self, member: usize) {
        self.spawn(member);
    }

    /// A client of `member` alone, with the cluster's TLS if any.
    pub async fn client(&self, member: usize) -> etcd_client::Client {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.etcd_tls());
        }
        etcd_client::Client::connect([self.url(member)], Some(options))
            .await
            .expect("etcd client")
    }

    /// A client of every member, as a fleet component would use.
    pub async fn cluster_client(&self) -> etcd_client::Client {
        let mut options =
            etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_millis(500));
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.etcd_tls());
        }
        etcd_client::Client::connect(self.urls(), Some(options))
            .await
            .expect("etcd client")
    }

    /// The index of the member that leads now, as the members report it.
    pub fn leader(&self) -> Option<usize> {
        let urls = self.urls();
        let tls = self.tls.as_ref().map(Certificates::etcd_tls);
        // On its own thread with its own runtime: callers are often inside
        // a tokio runtime, where another cannot block or be dropped.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    runtime.block_on(async {
                        for url in &urls {
                            let mut options = etcd_client::ConnectOptions::new()
                                .with_connect_timeout(Duration::from_millis(300))
                                .with_timeout(Duration::from_millis(500));
                            if let Some(tls) = &tls {
                                options = options.with_tls(tls.clone());
                            }
                            let Ok(mut client) =
                                etcd_client::Client::connect([url.as_str()], Some(options)).await
                            else {
                                continue;
                            };
                            let Ok(status) = client.status().await else {
                                continue;
                            };
                            if status.leader() == 0 {
                                continue;
                            }
                            let Ok(members) = client.member_list().await else {
                                continue;
                            };
                            let leader = members
                                .members()
                                .iter()
                                .find(|member| member.id() == status.leader())?;
                            return self
                                .members
                                .iter()
                                .position(|member| member.name == leader.name());
                        }
                        None
                    })
                })
                .join()
                .ok()
                .flatten()
        })
    }

    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|member| format!("--- etcd {} ---\n{}", member.name, member.logs()))
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for member in &mut self.members {
            member.process.resume();
            member.process.kill();
        }
    }
}
