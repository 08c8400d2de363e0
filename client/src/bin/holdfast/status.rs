//! `holdfast status [--json]`: the relay's status document, raw or summarised.

use clap::Args;
use holdfast_client::Client;
use serde_json::Value;
use std::fmt::Write as _;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print the whole status document as pretty JSON.
    #[arg(long)]
    json: bool,
}

/// The keys the summary shows, in order; dotted keys are nested.
const SUMMARY_KEYS: [&str; 15] = [
    "relay_id",
    "version",
    "uptime_seconds",
    "nats.status",
    "nats.server",
    "nats.known_servers",
    "nats.reachable_servers",
    "nats.last_error",
    "etcd",
    "sessions",
    "subscriptions",
    "classes",
    "kv_consistency",
    "guard",
    "counters",
];

pub(crate) async fn run(client: &Client, args: StatusArgs) -> ExitCode {
    let document = match client.status().await {
        Ok(document) => document,
        Err(error) => return crate::fail(&error),
    };
    let text = if args.json {
        pretty(&document)
    } else {
        summarize(&document).unwrap_or_else(|| pretty(&document))
    };
    println!("{text}");
    ExitCode::SUCCESS
}

fn pretty(document: &Value) -> String {
    serde_json::to_string_pretty(document).unwrap_or_else(|_| document.to_string())
}

/// A short human summary, or `None` when the document has none of the
/// known keys (an unknown shape is then shown as JSON instead).
fn summarize(document: &Value) -> Option<String> {
    document.as_object()?;
    let mut summary = String::new();
    for key in SUMMARY_KEYS {
        let Some(value) = lookup(document, key) else {
            continue;
        };
        match value {
            Value::Object(entries) => {
                let _ = writeln!(summary, "{key}:");
                for (name, entry) in entries {
                    write_entry(&mut summary, name, entry, 1);
                }
            }
            Value::Array(items) if key == "classes" => {
                let _ = writeln!(summary, "{key}:");
                for class in items {
                    let _ = writeln!(summary, "  {}", class_line(class));
                }
            }
            Value::Array(items) if key == "guard" => {
                let _ = writeln!(summary, "{key}:");
                for namespace in items {
                    for line in guard_lines(namespace) {
                        let _ = writeln!(summary, "  {line}");
                    }
                }
            }
            Value::Array(items) => {
                let _ = writeln!(summary, "{key}: {}", items.len());
            }
            Value::Number(seconds) if key == "uptime_seconds" => match seconds.as_u64() {
                Some(whole) => {
                    let _ = writeln!(summary, "{key}: {whole} ({})", human_duration(whole));
                }
                None => {
                    let _ = writeln!(summary, "{key}: {seconds}");
                }
            },
            other => {
                let _ = writeln!(summary, "{key}: {}", scalar(other));
            }
        }
    }
    if summary.is_empty() {
        return None;
    }
    summary.truncate(summary.trim_end().len());
    Some(summary)
}

fn lookup<'a>(document: &'a Value, dotted_key: &str) -> Option<&'a Value> {
    dotted_key
        .split('.')
        .try_fold(document, |value, key| value.get(key))
}

/// One namespace of the planner guard: who acts, on what decision, the
/// streak, and the last rollback or advice with what triggered it.
fn guard_lines(guard: &Value) -> Vec<String> {
    let field = |name: &str| {
        lookup(guard, name)
            .map(scalar)
            .unwrap_or_else(|| "?".to_string())
    };
    let role = if guard.get("leader") == Some(&Value::Bool(true)) {
        "leader".to_string()
    } else {
        format!("follower (leader {})", field("leader_relay"))
    };
    let decision = match guard.get("decision") {
        Some(Value::Null) | None => "no decision".to_string(),
        Some(_) => format!(
            "decision {} ({} prefill / {} decode, {})",
            field("decision.decision_id"),
            field("decision.num_prefill_workers"),
            field("decision.num_decode_workers"),
            field("decision.origin")
        ),
    };
    let mut lines = vec![format!(
        "{}: {role}, {}, etcd {}; {decision}; breach streak {}, hold-off {}",
        field("namespace"),
        field("mode"),
        field("etcd"),
        field("breach_streak"),
        field("hold_off_intervals"),
    )];
    for (label, key) in [
        ("last rollback", "last_rollback"),
        ("last advice", "last_advice"),
    ] {
        let Some(record) = guard.get(key).filter(|record| !record.is_null()) else {
            continue;
        };
        let get = |name: &str| {
            lookup(record, name)
                .map(scalar)
                .unwrap_or_else(|| "?".to_string())
        };
        lines.push(format!(
            "  {label}: decision {} ({}/{}) -> {} ({}/{}), {}; triggered by {}",
            get("rolled_back_decision_id"),
            get("from.prefill"),
            get("from.decode"),
            get("new_decision_id"),
            get("to.prefill"),
            get("to.decode"),
            get("outcome"),
            record
                .get("triggered_by")
                .map(Value::to_string)
                .unwrap_or_default()
        ));
    }
    lines
}

/// `prefill: live, 0 messages, 0 bytes, oldest 0s` for one class.
fn class_line(class: &Value) -> String {
    let field = |name: &str| {
        class
            .get(name)
            .map(scalar)
            .unwrap_or_else(|| "?".to_string())
    };
    format!(
        "{}: {}, {} messages, {} bytes, oldest {}s",
        field("name"),
        field("state"),
        field("backlog_messages"),
        field("backlog_bytes"),
        field("oldest_age_seconds")
    )
}

/// One `name: value` line at `depth`; an object of objects becomes an
/// indented block, an object of plain values one `key=value` line.
fn write_entry(summary: &mut String, name: &str, value: &Value, depth: usize) {
    let indent = "  ".repeat(depth);
    match value {
        Value::Object(entries) if entries.values().any(Value::is_object) => {
            let _ = writeln!(summary, "{indent}{name}:");
            for (inner_name, inner) in entries {
                write_entry(summary, inner_name, inner, depth + 1);
            }
        }
        Value::Object(entries) if !entries.is_empty() => {
            let pairs: Vec<String> = entries
                .iter()
                .map(|(key, inner)| format!("{key}={}", scalar(inner)))
                .collect();
            let _ = writeln!(summary, "{indent}{name}: {}", pairs.join(" "));
        }
        Value::Object(_) => {
            let _ = writeln!(summary, "{indent}{name}: none");
        }
        // A list of records (etcd members): one `key=value` line each.
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            let _ = writeln!(summary, "{indent}{name}:");
            for item in items {
                write_entry(summary, "-", item, depth + 1);
            }
        }
        other => {
            let _ = writeln!(summary, "{indent}{name}: {}", scalar(other));
        }
    }
}

/// Strings without quotes; everything else as compact JSON.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn human_duration(total_seconds: u64) -> String {
    let days = total_seconds / 86_400;
    let hours = total_seconds % 86_400 / 3600;
    let minutes = total_seconds % 3600 / 60;
    let seconds = total_seconds % 60;
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m {seconds}s"),
        (0, _, _) => format!("{hours}h {minutes}m {seconds}s"),
        _ => format!("{days}d {hours}h {minutes}m {seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn summary_shows_known_keys_in_order() {
        let document = json!({
            "relay_id": "r-1",
            "version": "0.1.0",
            "uptime_seconds": 3723,
            "nats": {"status": "up", "server": "nats://127.0.0.1:4222", "other": 1},
            "sessions": [{"id": 1}, {"id": 2}],
            "subscriptions": 4,
            "counters": {"published": 10},
            "ignored": true,
        });
        assert_eq!(
            summarize(&document).unwrap(),
            "relay_id: r-1\n\
             version: 0.1.0\n\
             uptime_seconds: 3723 (1h 2m 3s)\n\
             nats.status: up\n\
             nats.server: nats://127.0.0.1:4222\n\
             sessions: 2\n\
             subscriptions: 4\n\
             counters:\n  published: 10"
        );
    }

    #[test]
    fn nested_counters_read_as_indented_lines() {
        let document = json!({
            "counters": {
                "publishes_by_class": {"decode": {"forwarded": 2, "rejected": 1}},
                "publish_rejections": {},
                "frame_errors": 0,
            },
        });
        assert_eq!(
            summarize(&document).unwrap(),
            "counters:\n  \
             frame_errors: 0\n  \
             publish_rejections: none\n  \
             publishes_by_class:\n    \
             decode: forwarded=2 rejected=1"
        );
    }

    #[test]
    fn upstream_servers_and_members_read_as_lines() {
        let document = json!({
            "nats": {"status": "down", "server": null, "known_servers": ["a:1", "b:2"],
                     "reachable_servers": 1, "last_error": "authorization violation"},
            "etcd": {"endpoint": "https://e1:2379", "members": [
                {"endpoint": "https://e1:2379", "health": "serving", "error": null},
            ]},
        });
        assert_eq!(
            summarize(&document).unwrap(),
            "nats.status: down\n\
             nats.server: null\n\
             nats.known_servers: 2\n\
             nats.reachable_servers: 1\n\
             nats.last_error: authorization violation\n\
             etcd:\n  \
             endpoint: https://e1:2379\n  \
             members:\n    \
             -: endpoint=https://e1:2379 error=null health=serving"
        );
    }

    #[test]
    fn classes_read_as_one_line_each() {
        let document = json!({
            "classes": [{"name": "prefill", "state": "backlogged", "backlog_messages": 3,
                         "backlog_bytes": 300, "oldest_age_seconds": 12}],
        });
        assert_eq!(
            summarize(&document).unwrap(),
            "classes:\n  prefill: backlogged, 3 messages, 300 bytes, oldest 12s"
        );
    }

    #[test]
    fn unknown_shapes_fall_back_to_json() {
        assert_eq!(summarize(&json!({"something": "else"})), None);
        assert_eq!(summarize(&json!([1, 2])), None);
        assert_eq!(summarize(&json!("text")), None);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(65), "1m 5s");
        assert_eq!(human_duration(90_061), "1d 1h 1m 1s");
    }

    #[test]
    fn the_guard_shows_its_role_decision_and_last_rollback() {
        let document = json!({
            "guard": [{
                "namespace": "dynamo",
                "mode": "enforce",
                "leader": true,
                "leader_relay": "r-1",
                "etcd": "connected",
                "decision": {"decision_id": 2, "num_prefill_workers": 1, "num_decode_workers": 1, "origin": "guard_rollback"},
                "breach_streak": 0,
                "hold_off_intervals": 3,
                "last_rollback": {
                    "rolled_back_decision_id": 1,
                    "from": {"prefill": 3, "decode": 3},
                    "to": {"prefill": 1, "decode": 1},
                    "new_decision_id": 2,
                    "outcome": "written",
                    "triggered_by": [{"kv_usage": 0.99}]
                },
                "last_advice": null
            }]
        });
        assert_eq!(
            summarize(&document).unwrap(),
            "guard:\n  dynamo: leader, enforce, etcd connected; decision 2 (1 prefill / 1 decode, guard_rollback); breach streak 0, hold-off 3\n    last rollback: decision 1 (3/3) -> 2 (1/1), written; triggered by [{\"kv_usage\":0.99}]"
        );
    }
}
