//! Load reports as they cross NATS, decoded into the guard's samples: the
//! generic JSON form any planner's workers may publish, and the two reports
//! a Dynamo 1.6.1 worker publishes on its event plane (inside the envelope
//! `crate::dynamo::envelope` reads): `kv_metrics` (KV blocks in use) and
//! `forward-pass-metrics` (queued prefill requests).

use crate::dynamo::envelope;
use crate::guard::core::LoadSample;
use serde::Deserialize;
use thiserror::Error;

/// The event-plane topic of `WorkerMetricsPublisher`'s reports.
pub const KV_METRICS_TOPIC: &str = "kv_metrics";
/// The event-plane topic of the forward-pass metrics (`FpmDirectPublisher`,
/// vLLM's instrumented scheduler).
pub const FORWARD_PASS_TOPIC: &str = "forward-pass-metrics";

/// Why a report was not used.
#[derive(Debug, Error)]
pub enum LoadReportError {
    #[error("not a JSON load report: {0}")]
    Json(String),
    #[error("load report for namespace {found:?} on the subject of {expected:?}")]
    WrongNamespace { expected: String, found: String },
    #[error("kv_usage {0} is not a fraction between 0 and 1")]
    BadUsage(f64),
    #[error("the report carries neither kv_usage nor prefill_queue_depth")]
    Empty,
    #[error(transparent)]
    Dynamo(#[from] crate::dynamo::DecodeError),
    #[error("not a Dynamo {topic} payload: {reason}")]
    DynamoPayload { topic: &'static str, reason: String },
}

/// `{"namespace": NS, "kv_usage": 0.0-1.0, "prefill_queue_depth": N}` on
/// `holdfast.guard.load.{namespace}`; `worker` optional.
#[derive(Debug, Deserialize)]
struct GenericReport {
    namespace: String,
    #[serde(default)]
    kv_usage: Option<f64>,
    #[serde(default)]
    prefill_queue_depth: Option<u64>,
    #[serde(default)]
    worker: Option<String>,
}

/// Reads a generic report published for `namespace`.
pub fn decode_generic(namespace: &str, payload: &[u8]) -> Result<LoadSample, LoadReportError> {
    let report: GenericReport = serde_json::from_slice(payload)
        .map_err(|error| LoadReportError::Json(error.to_string()))?;
    if report.namespace != namespace {
        return Err(LoadReportError::WrongNamespace {
            expected: namespace.to_string(),
            found: report.namespace,
        });
    }
    if let Some(usage) = report.kv_usage {
        if !(0.0..=1.0).contains(&usage) {
            return Err(LoadReportError::BadUsage(usage));
        }
    }
    if report.kv_usage.is_none() && report.prefill_queue_depth.is_none() {
        return Err(LoadReportError::Empty);
    }
    Ok(LoadSample {
        source: report.worker.map(|worker| format!("generic:{worker}")),
        kv_usage: report.kv_usage,
        prefill_queue: report.prefill_queue_depth,
    })
}

/// A worker id: a number in `kv_metrics`, a string in forward-pass metrics.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WorkerId {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerId::Number(id) => write!(formatter, "{id}"),
            WorkerId::Text(id) => formatter.write_str(id),
        }
    }
}

/// `WorkerMetricsPublisher.publish(dp_rank, active_decode_blocks,
/// kv_used_blocks)`: `{worker_id, dp_rank, active_decode_blocks,
/// active_prefill_tokens, kv_used_blocks}`.
#[derive(Debug, Deserialize)]
struct KvMetrics {
    worker_id: WorkerId,
    #[serde(default)]
    dp_rank: Option<u32>,
    /// Optional in `publish`: absent (nil) from a worker that reports only
    /// its decode blocks.
    #[serde(default)]
    kv_used_blocks: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct QueuedRequests {
    num_prefill_requests: u64,
}

/// ForwardPassMetrics: `{version, worker_id, dp_rank, counter_id,
/// wall_time, scheduled_requests, queued_requests}`.
#[derive(Debug, Deserialize)]
struct ForwardPassMetrics {
    worker_id: WorkerId,
    #[serde(default)]
    dp_rank: Option<u32>,
    queued_requests: QueuedRequests,
}

/// Reads a Dynamo event-plane message. `Ok(None)`: a topic the guard does
/// not use, or `kv_metrics` without `kv_total_blocks` configured or without
/// `kv_used_blocks`.
pub fn decode_dynamo(
    message: &[u8],
    kv_total_blocks: u64,
) -> Result<Option<LoadSample>, LoadReportError> {
    let envelope = envelope::decode(message)?;
    match envelope.topic {
        KV_METRICS_TOPIC => {
            if kv_total_blocks == 0 {
                return Ok(None);
            }
            let metrics: KvMetrics = rmp_serde::from_slice(envelope.payload).map_err(|error| {
                LoadReportError::DynamoPayload {
                    topic: KV_METRICS_TOPIC,
                    reason: error.to_string(),
                }
            })?;
            let Some(used) = metrics.kv_used_blocks else {
                return Ok(None);
            };
            Ok(Some(LoadSample {
                source: Some(format!(
                    "kv:{}:{}",
                    metrics.worker_id,
                    metrics.dp_rank.unwrap_or(0)
                )),
                kv_usage: Some(used as f64 / kv_total_blocks as f64),
                prefill_queue: None,
            }))
        }
        FORWARD_PASS_TOPIC => {
            let metrics: ForwardPassMetrics =
                rmp_serde::from_slice(envelope.payload).map_err(|error| {
                    LoadReportError::DynamoPayload {
                        topic: FORWARD_PASS_TOPIC,
                        reason: error.to_string(),
                    }
                })?;
            Ok(Some(LoadSample {
                source: Some(format!(
                    "fpm:{}:{}",
                    metrics.worker_id,
                    metrics.dp_rank.unwrap_or(0)
                )),
                kv_usage: None,
                prefill_queue: Some(metrics.queued_requests.num_prefill_requests),
            }))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from ai-dynamo-runtime 1.6.1: `WorkerMetricsPublisher`
    /// `publish(0, 5, 17)` on endpoint ns1.comp.gen.
    const KV_METRICS: &[u8] = b"\x85\xacpublisher_id\xcf\x00\x1d\x1b\n\xee\xe1fb\xa8sequence\x00\xacpublished_at\xcf\x00\x00\x01\xa2R\x1d\xf2\x8e\xa5topic\xaakv_metrics\xa7payload\xc4Z\x85\xa9worker_id\xcfiM\xa2R\x1d\xe7\x9e\x05\xa7dp_rank\x00\xb4active_decode_blocks\x05\xb5active_prefill_tokens\xc0\xaekv_used_blocks\x11";

    /// Captured from ai-dynamo-runtime 1.6.1: `FpmDirectPublisher(ep, "w1")`
    /// `publish(..., queued_num_prefill_requests=77, ...)`.
    const FORWARD_PASS: &[u8] = b"\x85\xacpublisher_id\xcf\x00\x08i\xbfS\xf5\x9b\x1b\xa8sequence\x00\xacpublished_at\xcf\x00\x00\x01\xa2R\x1d\xf2\x8c\xa5topic\xb4forward-pass-metrics\xa7payload\xc5\x01\x99\x87\xa7version\x01\xa9worker_id\xa2w1\xa7dp_rank\x00\xaacounter_id\x01\xa9wall_time\xcb?\xe0\x00\x00\x00\x00\x00\x00\xb2scheduled_requests\x87\xb4num_prefill_requests\x01\xb2sum_prefill_tokens\x02\xb2var_prefill_length\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xb5sum_prefill_kv_tokens\x03\xb3num_decode_requests\x04\xb4sum_decode_kv_tokens\x05\xb4var_decode_kv_tokens\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xafqueued_requests\x86\xb4num_prefill_requestsM\xb2sum_prefill_tokens\x07\xb2var_prefill_length\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xb3num_decode_requests\x08\xb4sum_decode_kv_tokens\t\xb4var_decode_kv_tokens\xcb\x00\x00\x00\x00\x00\x00\x00\x00";

    #[test]
    fn dynamo_kv_metrics_give_usage_against_the_configured_total() {
        let sample = decode_dynamo(KV_METRICS, 20).unwrap().unwrap();
        assert_eq!(sample.kv_usage, Some(17.0 / 20.0));
        assert_eq!(sample.prefill_queue, None);
        assert!(sample.source.unwrap().starts_with("kv:"));
        assert!(decode_dynamo(KV_METRICS, 0).unwrap().is_none());
    }

    #[test]
    fn dynamo_kv_metrics_without_used_blocks_are_ignored_not_errors() {
        // `publish(0, 5, None)`: the same report with kv_used_blocks nil.
        let mut report = KV_METRICS.to_vec();
        let last = report.len() - 1;
        report[last] = 0xc0;
        assert!(decode_dynamo(&report, 20).unwrap().is_none());
    }

    #[test]
    fn dynamo_forward_pass_metrics_give_the_prefill_queue() {
        let sample = decode_dynamo(FORWARD_PASS, 0).unwrap().unwrap();
        assert_eq!(sample.prefill_queue, Some(77));
        assert_eq!(sample.source.as_deref(), Some("fpm:w1:0"));
    }

    #[test]
    fn garbage_is_an_error_not_a_sample() {
        assert!(decode_dynamo(b"\xff\x00garbage", 10).is_err());
        assert!(decode_dynamo(&KV_METRICS[..40], 10).is_err());
        assert!(decode_generic("ns", b"{").is_err());
        assert!(decode_generic("ns", b"{\"namespace\":\"ns\"}").is_err());
        assert!(matches!(
            decode_generic("ns", b"{\"namespace\":\"ns\",\"kv_usage\":1.5}"),
            Err(LoadReportError::BadUsage(_))
        ));
        assert!(matches!(
            decode_generic("ns", b"{\"namespace\":\"other\",\"kv_usage\":0.5}"),
            Err(LoadReportError::WrongNamespace { .. })
        ));
    }

    #[test]
    fn generic_reports_are_read() {
        let sample = decode_generic(
            "ns",
            b"{\"namespace\":\"ns\",\"kv_usage\":0.97,\"prefill_queue_depth\":12,\"worker\":\"a\"}",
        )
        .unwrap();
        assert_eq!(sample.kv_usage, Some(0.97));
        assert_eq!(sample.prefill_queue, Some(12));
        assert_eq!(sample.source.as_deref(), Some("generic:a"));
    }
}
