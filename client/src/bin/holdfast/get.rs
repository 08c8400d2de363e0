//! `holdfast get PREFIX [--json] [--linearizable]`: the entries under a
//! prefix, with the revision and freshness of the answer.

use crate::render;
use clap::Args;
use holdfast_client::{Client, Snapshot};
use std::fmt::Write as _;
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, Args)]
#[command(after_help = "\
Text output: a header line `revision N  stale BOOL  age_ms N`, then one \
`KEY = VALUE` line per entry, sorted by key. A stale answer (the relay could \
not confirm it with etcd just now) also prints a warning on stderr.

JSON output: one object, \
{\"revision\":N,\"stale\":BOOL,\"age_ms\":N,\"entries\":[{\"key\":\"..\",\"value\":\"..\"}]}.

Keys and values are shown as UTF-8 (invalid bytes replaced).")]
pub(crate) struct GetArgs {
    /// Key prefix; an empty string lists every key.
    prefix: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Read from etcd itself instead of the relay's cache: never stale, and
    /// fails (etcd_unavailable, retryable) while etcd is unreachable.
    #[arg(long)]
    linearizable: bool,
}

pub(crate) async fn run(client: &Client, args: GetArgs) -> ExitCode {
    let answer = if args.linearizable {
        client.get_linearizable(args.prefix).await
    } else {
        client.get(args.prefix).await
    };
    let snapshot = match answer {
        Ok(snapshot) => snapshot,
        Err(error) => return crate::fail(&error),
    };
    if snapshot.stale {
        eprintln!(
            "warning: stale answer: etcd has not confirmed these entries for {} ms",
            snapshot.age.as_millis()
        );
    }
    let output = if args.json {
        json(&snapshot)
    } else {
        text(&snapshot)
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write to stdout: {error}");
            ExitCode::FAILURE
        }
    }
}

fn text(snapshot: &Snapshot) -> String {
    let mut output = format!(
        "revision {}  stale {}  age_ms {}\n",
        snapshot.revision,
        snapshot.stale,
        snapshot.age.as_millis()
    );
    for entry in &snapshot.entries {
        let _ = writeln!(
            output,
            "{} = {}",
            render::text(&entry.key),
            render::text(&entry.value)
        );
    }
    output
}

/// Written by hand rather than through `serde_json::Value` so the fields
/// keep the documented order.
fn json(snapshot: &Snapshot) -> String {
    let entries: Vec<String> = snapshot
        .entries
        .iter()
        .map(|entry| {
            format!(
                "{{\"key\":{},\"value\":{}}}",
                render::json_string(&entry.key),
                render::json_string(&entry.value)
            )
        })
        .collect();
    format!(
        "{{\"revision\":{},\"stale\":{},\"age_ms\":{},\"entries\":[{}]}}\n",
        snapshot.revision,
        snapshot.stale,
        snapshot.age.as_millis(),
        entries.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use holdfast_client::Entry;
    use std::time::Duration;

    fn snapshot() -> Snapshot {
        Snapshot {
            revision: 42,
            stale: true,
            age: Duration::from_millis(1500),
            entries: vec![
                Entry {
                    key: Bytes::from_static(b"workers/a"),
                    value: Bytes::from_static(b"10.0.0.1:9000"),
                },
                Entry {
                    key: Bytes::from_static(b"workers/b"),
                    value: Bytes::from_static(b"say \"hi\""),
                },
            ],
        }
    }

    #[test]
    fn text_has_a_header_and_one_line_per_entry() {
        assert_eq!(
            text(&snapshot()),
            "revision 42  stale true  age_ms 1500\n\
             workers/a = 10.0.0.1:9000\n\
             workers/b = say \"hi\"\n"
        );
    }

    #[test]
    fn json_is_one_object_that_parses() {
        let output = json(&snapshot());
        assert_eq!(
            output,
            "{\"revision\":42,\"stale\":true,\"age_ms\":1500,\"entries\":[\
             {\"key\":\"workers/a\",\"value\":\"10.0.0.1:9000\"},\
             {\"key\":\"workers/b\",\"value\":\"say \\\"hi\\\"\"}]}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&output).unwrap();
        assert_eq!(parsed["entries"][1]["value"], "say \"hi\"");
    }
}
