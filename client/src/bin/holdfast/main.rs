//! `holdfast`: the command line for the node-local holdfast relay.
//!
//! Each verb lives in its own file; this one parses arguments, connects and
//! maps outcomes to exit codes (0 success, 1 operation failed, 2 usage).

mod get;
mod journal;
mod publish;
mod register;
mod render;
mod request;
mod salvage;
mod signals;
mod status;
mod subscribe;
mod watch;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use holdfast_client::{Client, ConnectOptions, Error, RelayUrl, DEFAULT_URL};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Talk to the node-local holdfast relay",
    after_help = "A quic://host:port relay needs --ca; add --cert and --key when it requires \
                  client certificates. Empty HOLDFAST_CA/CERT/KEY count as unset."
)]
struct Cli {
    /// Relay URL: unix:///path/to.sock or quic://host:port (QUIC needs --ca).
    #[arg(long, global = true, env = "HOLDFAST_URL", default_value = DEFAULT_URL)]
    url: RelayUrl,

    // The TLS flags' ids differ from their names: verbs have a positional `key`.
    /// PEM file of the CA that signed the relay's certificate (quic:// only).
    #[arg(id = "tls_ca", long = "ca", global = true, env = "HOLDFAST_CA", value_name = "FILE", value_parser = path_or_unset())]
    tls_ca: Option<PathBuf>,

    /// PEM client certificate for a relay that requires mutual TLS; needs --key.
    #[arg(id = "tls_cert", long = "cert", global = true, env = "HOLDFAST_CERT", value_name = "FILE", value_parser = path_or_unset())]
    tls_cert: Option<PathBuf>,

    /// PEM private key of the --cert certificate.
    #[arg(id = "tls_key", long = "key", global = true, env = "HOLDFAST_KEY", value_name = "FILE", value_parser = path_or_unset())]
    tls_key: Option<PathBuf>,

    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Publish one message, or one per line of stdin.
    #[command(name = "pub")]
    Publish(publish::PublishArgs),
    /// Print the payload of each message on a subject, one per line.
    #[command(name = "sub")]
    Subscribe(subscribe::SubscribeArgs),
    /// Send a request and print the reply's payload.
    #[command(name = "req")]
    Request(request::RequestArgs),
    /// Register a key in etcd through the relay and hold it until SIGINT/SIGTERM.
    Register(register::RegisterArgs),
    /// Print the entries under a key prefix, with revision and staleness.
    Get(get::GetArgs),
    /// Print each change under a key prefix, one per line, until SIGINT/SIGTERM.
    Watch(watch::WatchArgs),
    /// Show the relay's view of itself and its links.
    Status(status::StatusArgs),
    /// Offline journal tools (the relay must be stopped).
    Journal(journal::JournalArgs),
}

/// Accepts an empty value, which [`Cli::tls_files`] treats as unset: an
/// exported-but-empty `HOLDFAST_CA` should not make every command a usage error.
fn path_or_unset() -> impl TypedValueParser<Value = PathBuf> {
    OsStringValueParser::new().map(PathBuf::from)
}

/// The TLS files for [`ConnectOptions`]: the CA, and the client
/// certificate and key, which only come together.
struct TlsFiles {
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
}

impl Cli {
    fn tls_files(&mut self) -> Result<TlsFiles, clap::Error> {
        let set = |path: Option<PathBuf>| path.filter(|path| !path.as_os_str().is_empty());
        let identity =
            match (set(self.tls_cert.take()), set(self.tls_key.take())) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (Some(_), None) => return Err(Cli::command().error(
                    ErrorKind::MissingRequiredArgument,
                    "--cert needs --key FILE (or HOLDFAST_KEY) with the certificate's private key",
                )),
                (None, Some(_)) => {
                    return Err(Cli::command().error(
                        ErrorKind::MissingRequiredArgument,
                        "--key needs --cert FILE (or HOLDFAST_CERT) with the client certificate",
                    ))
                }
            };
        Ok(TlsFiles {
            ca: set(self.tls_ca.take()),
            identity,
        })
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let tls = match cli.tls_files() {
        Ok(tls) => tls,
        Err(error) => error.exit(),
    };
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli, tls))
}

async fn run(cli: Cli, tls: TlsFiles) -> ExitCode {
    // Offline: needs no relay connection.
    let verb = match cli.verb {
        Verb::Journal(args) => return journal::run(args),
        verb => verb,
    };
    let mut options = ConnectOptions::new(cli.url).client_name("holdfast-cli");
    if let Some(ca) = tls.ca {
        options = options.tls_ca(ca);
    }
    if let Some((cert, key)) = tls.identity {
        options = options.tls_client_cert(cert, key);
    }
    let client = match Client::connect_with(options).await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let exit = match verb {
        Verb::Publish(args) => publish::run(&client, args).await,
        Verb::Subscribe(args) => subscribe::run(&client, args).await,
        Verb::Request(args) => request::run(&client, args).await,
        Verb::Register(args) => register::run(&client, args).await,
        Verb::Get(args) => get::run(&client, args).await,
        Verb::Watch(args) => watch::run(&client, args).await,
        Verb::Status(args) => status::run(&client, args).await,
        Verb::Journal(args) => journal::run(args),
    };
    // Nothing useful to report if closing fails: the verb's outcome stands.
    let _ = client.close().await;
    exit
}

/// Prints `error: <code> (retryable|not retryable): <message>` and returns
/// the exit code for a failed operation.
pub(crate) fn fail(error: &Error) -> ExitCode {
    eprintln!(
        "error: {} ({}): {}",
        error.name(),
        retryability(error.is_retryable()),
        error.detail()
    );
    ExitCode::FAILURE
}

pub(crate) fn retryability(retryable: bool) -> &'static str {
    if retryable {
        "retryable"
    } else {
        "not retryable"
    }
}

/// Logs go to stderr (stdout carries payloads); `RUST_LOG` overrides the
/// default of warnings only.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_url_is_accepted_after_the_verb() {
        let cli =
            Cli::try_parse_from(["holdfast", "status", "--url", "unix:///tmp/x.sock"]).unwrap();
        assert_eq!(cli.url.to_string(), "unix:///tmp/x.sock");
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        let error = Cli::try_parse_from(["holdfast", "--url", "nats://x:1", "status"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn tls_flags_are_global_and_come_in_pairs() {
        let mut cli = Cli::try_parse_from([
            "holdfast",
            "status",
            "--ca",
            "/etc/holdfast/ca.pem",
            "--cert",
            "/etc/holdfast/client.pem",
            "--key",
            "/etc/holdfast/client.key",
        ])
        .unwrap();
        let tls = cli.tls_files().unwrap();
        assert_eq!(tls.ca, Some(PathBuf::from("/etc/holdfast/ca.pem")));
        assert_eq!(
            tls.identity,
            Some((
                PathBuf::from("/etc/holdfast/client.pem"),
                PathBuf::from("/etc/holdfast/client.key")
            ))
        );

        let mut cli =
            Cli::try_parse_from(["holdfast", "--cert", "/client.pem", "--ca", "", "get", "x/"])
                .unwrap();
        let error = cli.tls_files().err().unwrap();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("--key"), "{error}");

        let mut cli = Cli::try_parse_from(["holdfast", "--key", "/client.key", "status"]).unwrap();
        let error = cli.tls_files().err().unwrap();
        assert!(error.to_string().contains("--cert"), "{error}");

        // A verb's own `key` argument is not the global --key.
        let mut cli = Cli::try_parse_from([
            "holdfast",
            "register",
            "workers/a",
            "10.0.0.7:9000",
            "--key",
            "/client.key",
            "--cert",
            "/client.pem",
        ])
        .unwrap();
        assert!(cli.tls_files().unwrap().identity.is_some());
        let mut cli = Cli::try_parse_from(["holdfast", "register", "workers/a", "v"]).unwrap();
        assert!(cli.tls_files().unwrap().identity.is_none());

        // An empty value is no value.
        let mut cli =
            Cli::try_parse_from(["holdfast", "--ca", "", "--cert", "", "--key", "", "status"])
                .unwrap();
        let tls = cli.tls_files().unwrap();
        assert_eq!(tls.ca, None);
        assert_eq!(tls.identity, None);
    }
}
