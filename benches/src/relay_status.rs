//! Reading the relay's status document (schema in wire/PROTOCOL.md,
//! "STATUS_RESPONSE document") and waiting for states in it.

use crate::error::{BenchError, Context, Result};
use serde_json::Value;
use std::time::{Duration, Instant};

/// `nats.status`: "up", "down" or "unknown".
pub fn nats_state(status: &Value) -> &str {
    status["nats"]["status"].as_str().unwrap_or("unknown")
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
    let deadline = Instant::now() + limit;
    loop {
        let status = client
            .status()
            .await
            .context("asking the relay for its status")?;
        if nats_state(&status) == state {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the relay to report its NATS link {state} (it says {})",
                nats_state(&status)
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
        assert_eq!(nats_state(&status), "down");
        assert_eq!(class_backlog(&status, "kv_events"), 5);
        assert_eq!(class_backlog(&status, "decode"), 0);
        assert_eq!(total_backlog(&status), 7);
        assert_eq!(nats_state(&serde_json::json!({})), "unknown");
    }
}
