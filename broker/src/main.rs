//! `holdfastd`: command line, logging, signals, and the runtime around
//! [`holdfast_broker::run`].

use clap::{Parser, ValueEnum};
use holdfast_broker::cli::{gen_cert, journal_inspect, journal_salvage};
use holdfast_broker::preflight::{self, CheckedConfig};
use holdfast_broker::{config, relay};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// holdfastd: the node-local relay that keeps inference components working
/// through NATS and etcd outages.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see deploy/holdfast.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket clients connect to [default: /run/holdfast/holdfast.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Directory of the journal [default: /var/lib/holdfast].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Upstream NATS servers, comma-separated [default: nats://127.0.0.1:4222].
    #[arg(long, value_name = "URLS")]
    nats: Option<String>,
    /// Upstream etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379);
    /// without any, registration and discovery are off.
    #[arg(long, value_name = "URLS")]
    etcd: Option<String>,
    /// Address of /metrics, /livez, /readyz and /status [default: 127.0.0.1:9477].
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Also speak the NATS client protocol on this address (e.g.
    /// 127.0.0.1:4223), so unmodified NATS clients get the relay's protection.
    #[arg(long, value_name = "ADDR")]
    nats_listen: Option<String>,
    /// Also speak the etcd v3 gRPC API on this address (e.g.
    /// 127.0.0.1:2389), so unmodified etcd clients get the relay's
    /// protection; needs --etcd.
    #[arg(long, value_name = "ADDR")]
    etcd_listen: Option<String>,
    /// Also accept QUIC connections on this address (e.g. 0.0.0.0:4443);
    /// needs --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR")]
    quic_addr: Option<String>,
    /// The QUIC listener's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The QUIC listener's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signs client certificates; when given, QUIC clients
    /// must present one (mutual TLS).
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// CA (PEM) that signs the NATS servers' certificates; turns TLS on
    /// (nats.tls_ca).
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients.
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    nats_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    nats_tls_key: Option<PathBuf>,
    /// NATS JWT credentials file (.creds) (nats.creds_file).
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    nats_creds: Option<PathBuf>,
    /// File holding an nkey seed for NATS (nats.nkey_seed_file).
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    nats_nkey_seed: Option<PathBuf>,
    /// NATS user; the password comes from --nats-password-file.
    #[arg(long, value_name = "NAME", help_heading = "Upstream security")]
    nats_user: Option<String>,
    /// File holding the NATS user's password (never the password itself).
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    nats_password_file: Option<PathBuf>,
    /// File holding a NATS authorization token.
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    nats_token_file: Option<PathBuf>,
    /// CA (PEM) that signs the etcd members' certificates (etcd.tls_ca).
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    etcd_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members run with --client-cert-auth.
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    etcd_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-tls-cert.
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    etcd_tls_key: Option<PathBuf>,
    /// etcd user; the password comes from --etcd-password-file.
    #[arg(long, value_name = "NAME", help_heading = "Upstream security")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (never the password itself).
    #[arg(long, value_name = "FILE", help_heading = "Upstream security")]
    etcd_password_file: Option<PathBuf>,
    /// Log format; the level comes from RUST_LOG (default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check the configuration (the file, the flags given with it, and that
    /// every certificate and secret file it names can be read), print any
    /// warnings, and exit: 0 when the relay would start with it, 2 when not.
    CheckConfig,
    /// Offline tools for the journal (run while the relay is stopped).
    Journal {
        #[command(subcommand)]
        action: JournalAction,
    },
    /// Write a development CA (ca.pem), a server certificate and key
    /// (server.pem, server.key) and a client certificate and key
    /// (client.pem, client.key) for QUIC with mutual TLS. Not for production.
    GenCert {
        /// Directory to write the files into (created if missing; existing
        /// files are never overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Extra DNS name or IP address the server certificate is valid
        /// for, besides localhost, 127.0.0.1 and ::1 (repeatable).
        #[arg(long = "san", value_name = "NAME")]
        server_names: Vec<String>,
        /// Subject common name of the client certificate, as access rules
        /// name it (`cert_cn`).
        #[arg(long, value_name = "NAME", default_value = "holdfast-client")]
        client_cn: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum JournalAction {
    /// Per class: messages, bytes, oldest age and sequence range.
    Inspect {
        /// The relay's data directory [default: /var/lib/holdfast].
        #[arg(long, value_name = "DIR", default_value = "/var/lib/holdfast")]
        data_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Export every readable, undelivered message of the journal files the
    /// relay moved aside as damaged (journal.redb.quarantined-*, oldest
    /// first) as JSON lines, for `holdfast pub --from-salvage FILE`.
    Salvage {
        /// The relay's data directory [default: /var/lib/holdfast].
        #[arg(long, value_name = "DIR", default_value = "/var/lib/holdfast")]
        data_dir: PathBuf,
        /// Salvage this journal file instead of the set-aside ones.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Where to write the JSON lines (created or replaced).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // Everything the relay writes (journal, lease table, discovery cache,
    // salvage files, development keys) holds messages or secrets: nobody
    // else may read it, whatever umask the relay was started with. Files
    // meant for others (the socket) get their mode explicitly.
    // SAFETY: umask(2) only sets the process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let args = Args::parse();
    init_logging(args.log_format);
    if let Some(Command::Journal {
        action: JournalAction::Inspect { data_dir, json },
    }) = &args.command
    {
        return journal_inspect::run(data_dir, *json);
    }
    if let Some(Command::Journal {
        action:
            JournalAction::Salvage {
                data_dir,
                file,
                out,
            },
    }) = &args.command
    {
        return journal_salvage::run(data_dir, file.as_deref(), out);
    }
    if let Some(Command::GenCert {
        out,
        server_names,
        client_cn,
    }) = &args.command
    {
        let request = gen_cert::GenCertRequest {
            out,
            server_names,
            client_common_name: client_cn,
        };
        return match gen_cert::generate(&request) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("holdfastd gen-cert: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let overrides = config::Overrides {
        socket: args.socket,
        data_dir: args.data_dir,
        nats_servers: args.nats,
        etcd_endpoints: args.etcd,
        metrics_addr: args.metrics_addr,
        quic_addr: args.quic_addr,
        nats_listen: args.nats_listen,
        etcd_listen: args.etcd_listen,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
        nats_tls_ca: args.nats_tls_ca,
        nats_tls_cert: args.nats_tls_cert,
        nats_tls_key: args.nats_tls_key,
        nats_creds: args.nats_creds,
        nats_nkey_seed: args.nats_nkey_seed,
        nats_user: args.nats_user,
        nats_password_file: args.nats_password_file,
        nats_token_file: args.nats_token_file,
        etcd_tls_ca: args.etcd_tls_ca,
        etcd_tls_cert: args.etcd_tls_cert,
        etcd_tls_key: args.etcd_tls_key,
        etcd_user: args.etcd_user,
        etcd_password_file: args.etcd_password_file,
    };
    let CheckedConfig { config, warnings } =
        match preflight::load(args.config.as_deref(), &overrides) {
            Ok(checked) => checked,
            Err(error) => {
                eprintln!("holdfastd: {error}");
                return ExitCode::from(2);
            }
        };
    if matches!(args.command, Some(Command::CheckConfig)) {
        for warning in &warnings {
            eprintln!("warning: {warning}");
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Named so `top -H` and profilers tell the relay's workers apart
        // from those of other tokio programs on the node.
        .thread_name("holdfastd-worker")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("holdfastd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        // Installed before the relay starts, so a SIGTERM while it starts
        // up is an orderly stop too.
        let shutdown = match stop_signals() {
            Ok(shutdown) => shutdown,
            Err(error) => return Err(relay::RelayError::Signals(error)),
        };
        relay::run(config, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ relay::RelayError::NatsClientGone) => {
            tracing::error!(%error, "holdfastd stopped");
            ExitCode::FAILURE
        }
        Err(error) => {
            tracing::error!(%error, "holdfastd cannot start");
            eprintln!("holdfastd: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A future that resolves with the signal's name on SIGTERM or SIGINT.
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never into journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
