//! `holdfast sub SUBJECT [--queue G] [--count N]`: payloads on stdout, one per line.

use clap::Args;
use futures::StreamExt;
use holdfast_client::Client;
use std::io::{ErrorKind, Write};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub(crate) struct SubscribeArgs {
    /// Subject to subscribe to (`*` and `>` wildcards allowed).
    subject: String,
    /// Join this queue group: each message goes to one member.
    #[arg(long)]
    queue: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

pub(crate) async fn run(client: &Client, args: SubscribeArgs) -> ExitCode {
    let subscribed = match args.queue {
        Some(group) => client.queue_subscribe(args.subject, group).await,
        None => client.subscribe(args.subject).await,
    };
    let mut subscriber = match subscribed {
        Ok(subscriber) => subscriber,
        Err(error) => return crate::fail(&error),
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut received: u64 = 0;
    let exit = loop {
        if args.count.is_some_and(|count| received >= count) {
            break ExitCode::SUCCESS;
        }
        tokio::select! {
            message = subscriber.next() => {
                let Some(message) = message else {
                    break match subscriber.termination() {
                        Some(reason) => crate::fail(reason),
                        None => {
                            eprintln!("error: the subscription ended");
                            ExitCode::FAILURE
                        }
                    };
                };
                match write_line(&message.payload) {
                    Ok(()) => received += 1,
                    // The reader went away (e.g. `| head`): a normal way to stop.
                    Err(error) if error.kind() == ErrorKind::BrokenPipe => break ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: cannot write to stdout: {error}");
                        break ExitCode::FAILURE;
                    }
                }
            }
            _ = &mut interrupted => break ExitCode::SUCCESS,
        }
    };
    let dropped = subscriber.dropped();
    if dropped > 0 {
        eprintln!("warning: {dropped} messages were dropped because output did not keep up");
    }
    let _ = subscriber.unsubscribe().await;
    exit
}

/// Writes one payload and a newline, flushed so pipelines see it at once.
fn write_line(payload: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(payload)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}
