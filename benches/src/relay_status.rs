//! Reading the relay's status document (schema in wire/PROTOCOL.md,
//! "STATUS_RESPONSE document") and waiting for states in it.

use crate::error::{BenchError, Context, Result};
use serde_json::Value;
use std::time::{Duration, Instant};

/// `etcd.status`: "up", "down" or "unknown".
pub fn etcd_state(status: &Value) -> &str {
    link_state(status, "etcd")
}

/// `<service>.status` of an upstream link.
fn link_state<'a>(status: &'a Value, service: &str) -> &'a str {
    status[service]["status"].as_str().unwrap_or("unknown")
}

/// A counter or gauge of the `etcd` object (`registrations`,
/// `pending_changes`, `reconcile_runs`, ...); 0 when absent.
pub fn etcd_figure(status: &Value, field: &str) -> u64 {
    status["etcd"][field].as_u64().unwrap_or(0)
}

/// A counter of the `counters` object (`slow_consumer_drops`, ...); 0
/// when absent.
pub fn counter(status: &Value, field: &str) -> u64 {
    status["counters"][field].as_u64().unwrap_or(0)
}

/// The value of the Prometheus series `name` with the label
/// `reason="{reason}"` in `/metrics` text (0 when absent).
pub fn dropped_total(metrics: &str, reason: &str) -> u64 {
    let series = format!("holdfast_messages_dropped_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// `backlog_messages` of one class (0 when the class is absent).
pub fn class_backlog(status: &Value, class: &str) -> u64 {
    classes(status)
        .iter()
        .find(|entry| entry["name"].as_str() == Some(class))
        .and_then(|entry| entry["backlog_messages"].as_u64())
        .unwrap_or(0)
}

/// `backlog_messages` summed over every class.
pub fn total_backlog(status: &Value) -> u64 {
    classes(status)
        .iter()
        .filter_map(|entry| entry["backlog_messages"].as_u64())
        .sum()
}

fn classes(status: &Value) -> &[Value] {
    status["classes"].as_array().map_or(&[], Vec::as_slice)
}

/// Polls the relay's status every 20 ms until its NATS link is `state`.
pub async fn wait_for_nats(
    client: &holdfast_client::Client,
    state: &str,
    limit: Duration,
) -> Result<()> {
    wait_for_link(client, "nats", state, limit).await
}

/// Polls the relay's status every 20 ms until its etcd link is `state`.
pub async fn wait_for_etcd_state(
    client: &holdfast_client::Client,
    state: &str,
    limit: Duration,
) -> Result<()> {
    wait_for_link(client, "etcd", state, limit).await
}

async fn wait_for_link(
    client: &holdfast_client::Client,
    service: &str,
    state: &str,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let status = client
            .status()
            .await
            .context("asking the relay for its status")?;
        let now = link_state(&status, service);
        if now == state {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the relay to report its {service} link {state} (it says {now})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the relay's status every 20 ms until its etcd link is up and
/// etcd has confirmed every registration change (`pending_changes` = 0).
pub async fn wait_for_etcd_settled(
    client: &holdfast_client::Client,
    limit: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let status = client
            .status()
            .await
            .context("asking the relay for its status")?;
        let pending = etcd_figure(&status, "pending_changes");
        if etcd_state(&status) == "up" && pending == 0 {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the relay to report its etcd link up with nothing pending (it says {}, \
                 {pending} pending)",
                etcd_state(&status)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the relay's status every 20 ms until more than `after` reconcile
/// passes have finished (`etcd.reconcile_runs`); returns that status.
pub async fn wait_for_reconcile(
    client: &holdfast_client::Client,
    after: u64,
    limit: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let status = client
            .status()
            .await
            .context("asking the relay for its status")?;
        let runs = etcd_figure(&status, "reconcile_runs");
        if runs > after {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the relay to finish reconcile pass {} (it finished {runs})",
                after + 1
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the relay's status every 20 ms until `class` holds `count` messages.
pub async fn wait_for_backlog(
    client: &holdfast_client::Client,
    class: &str,
    count: u64,
    limit: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + limit;
    loop {
        let status = client
            .status()
            .await
            .context("asking the relay for its status")?;
        let backlog = class_backlog(&status, class);
        if backlog == count || Instant::now() > deadline {
            return Ok(backlog);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_link_and_backlogs() {
        let status = serde_json::json!({
            "nats": {"status": "down"},
            "classes": [
                {"name": "prefill", "backlog_messages": 2},
                {"name": "kv_events", "backlog_messages": 5}
            ]
        });
        assert_eq!(link_state(&status, "nats"), "down");
        assert_eq!(class_backlog(&status, "kv_events"), 5);
        assert_eq!(class_backlog(&status, "decode"), 0);
        assert_eq!(total_backlog(&status), 7);
        assert_eq!(link_state(&serde_json::json!({}), "nats"), "unknown");
        let status = serde_json::json!({
            "etcd": {"status": "up", "registrations": 10000, "pending_changes": 0}
        });
        assert_eq!(etcd_state(&status), "up");
        assert_eq!(etcd_figure(&status, "registrations"), 10_000);
        assert_eq!(etcd_figure(&status, "reconcile_runs"), 0);
        let status = serde_json::json!({"counters": {"slow_consumer_drops": 7}});
        assert_eq!(counter(&status, "slow_consumer_drops"), 7);
        assert_eq!(counter(&status, "frame_errors"), 0);
    }
}
