//! `holdfast req SUBJECT PAYLOAD [--timeout 5s]`: one request, its reply on stdout.

use clap::Args;
use holdfast_client::{Client, Headers};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct RequestArgs {
    /// Subject to send the request to.
    subject: String,
    /// Request payload.
    payload: String,
    /// How long to wait for a reply (e.g. 500ms, 5s, 2m).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub(crate) async fn run(client: &Client, args: RequestArgs) -> ExitCode {
    let reply = match client
        .request_with(args.subject, Headers::new(), args.payload, args.timeout)
        .await
    {
        Ok(reply) => reply,
        Err(error) => return crate::fail(&error),
    };
    let mut stdout = std::io::stdout().lock();
    let mut written = stdout.write_all(&reply.payload);
    if written.is_ok() && !reply.payload.ends_with(b"\n") {
        written = stdout.write_all(b"\n");
    }
    match written.and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write the reply to stdout: {error}");
            ExitCode::FAILURE
        }
    }
}
