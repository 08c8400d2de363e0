//! `holdfast`: the command line for the node-local holdfast relay.
//!
//! Each verb lives in its own file; this one parses arguments, connects and
//! maps outcomes to exit codes (0 success, 1 operation failed, 2 usage).

mod duration;
mod get;
mod journal;
mod publish;
mod register;
mod render;
mod request;
mod signals;
mod status;
mod subscribe;
mod watch;

use clap::{Parser, Subcommand};
use holdfast_client::{Client, ConnectOptions, Error, RelayUrl, DEFAULT_URL};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Talk to the node-local holdfast relay"
)]
struct Cli {
    /// Relay URL: unix:///path/to.sock or quic://host:port.
    #[arg(long, global = true, env = "HOLDFAST_URL", default_value = DEFAULT_URL)]
    url: RelayUrl,

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    // Offline: needs no relay connection.
    let verb = match cli.verb {
        Verb::Journal(args) => return journal::run(args),
        verb => verb,
    };
    let options = ConnectOptions::new(cli.url).client_name("holdfast-cli");
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
    use clap::CommandFactory;

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
}
