//! `holdfast watch PREFIX [--json]`: one line per change under a prefix,
//! until SIGINT or SIGTERM.

use crate::{render, signals};
use clap::Args;
use futures::StreamExt;
use holdfast_client::{Client, WatchEvent};
use std::io::{ErrorKind, Write};
use std::process::ExitCode;

#[derive(Debug, Args)]
#[command(after_help = "\
Output: first the current entries as PUT lines and one SYNCED line, then \
one line per change: `PUT KEY VALUE rev=N`, `DELETE KEY rev=N`, \
`SYNCED rev=N`. After a reconnect to the relay (or after falling behind) \
the current entries are replayed the same way; keys deleted meanwhile \
arrive as DELETE lines before the SYNCED line.

With --json, one object per line: {\"event\":\"put\",\"key\":\"..\",\
\"value\":\"..\",\"revision\":N}, {\"event\":\"delete\",\"key\":\"..\",\
\"revision\":N} or {\"event\":\"synced\",\"revision\":N}.")]
pub(crate) struct WatchArgs {
    /// Key prefix; an empty string watches every key.
    prefix: String,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(client: &Client, args: WatchArgs) -> ExitCode {
    let Some(mut stop) = signals::install_or_report() else {
        return ExitCode::FAILURE;
    };
    let mut watcher = match client.watch(args.prefix).await {
        Ok(watcher) => watcher,
        Err(error) => return crate::fail(&error),
    };
    let exit = loop {
        tokio::select! {
            () = stop.recv() => break ExitCode::SUCCESS,
            event = watcher.next() => {
                let Some(event) = event else {
                    break match watcher.termination() {
                        Some(reason) => crate::fail(reason),
                        None => {
                            eprintln!("error: the watch ended");
                            ExitCode::FAILURE
                        }
                    };
                };
                let line = if args.json { json_line(&event) } else { text_line(&event) };
                match write_line(&line) {
                    Ok(()) => {}
                    // The reader went away (e.g. `| head`): a normal way to stop.
                    Err(error) if error.kind() == ErrorKind::BrokenPipe => break ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: cannot write to stdout: {error}");
                        break ExitCode::FAILURE;
                    }
                }
            }
        }
    };
    let dropped = watcher.dropped();
    if dropped > 0 {
        eprintln!(
            "warning: {dropped} events were dropped because output did not keep up \
             (resynced {} times)",
            watcher.resyncs()
        );
    }
    let _ = watcher.unwatch().await;
    exit
}

fn text_line(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Put {
            key,
            value,
            revision,
        } => format!(
            "PUT {} {} rev={revision}",
            render::text(key),
            render::text(value)
        ),
        WatchEvent::Delete { key, revision } => {
            format!("DELETE {} rev={revision}", render::text(key))
        }
        WatchEvent::Synced { revision } => format!("SYNCED rev={revision}"),
    }
}

fn json_line(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Put {
            key,
            value,
            revision,
        } => format!(
            "{{\"event\":\"put\",\"key\":{},\"value\":{},\"revision\":{revision}}}",
            render::json_string(key),
            render::json_string(value)
        ),
        WatchEvent::Delete { key, revision } => format!(
            "{{\"event\":\"delete\",\"key\":{},\"revision\":{revision}}}",
            render::json_string(key)
        ),
        WatchEvent::Synced { revision } => {
            format!("{{\"event\":\"synced\",\"revision\":{revision}}}")
        }
    }
}

/// Writes one line, flushed so pipelines see it at once.
fn write_line(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(line.as_bytes())?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn every_event_has_a_text_and_a_json_line() {
        let put = WatchEvent::Put {
            key: Bytes::from_static(b"w/a"),
            value: Bytes::from_static(b"v 1"),
            revision: 7,
        };
        let delete = WatchEvent::Delete {
            key: Bytes::from_static(b"w/a"),
            revision: 8,
        };
        let synced = WatchEvent::Synced { revision: 8 };
        assert_eq!(text_line(&put), "PUT w/a v 1 rev=7");
        assert_eq!(text_line(&delete), "DELETE w/a rev=8");
        assert_eq!(text_line(&synced), "SYNCED rev=8");
        assert_eq!(
            json_line(&put),
            r#"{"event":"put","key":"w/a","value":"v 1","revision":7}"#
        );
        assert_eq!(
            json_line(&delete),
            r#"{"event":"delete","key":"w/a","revision":8}"#
        );
        assert_eq!(json_line(&synced), r#"{"event":"synced","revision":8}"#);
    }
}
