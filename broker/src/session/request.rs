//! REQUEST: a request to NATS (or, while NATS is down, to a subscriber
//! on this relay), served on its own task so requests run concurrently,
//! within the connection's `max_inflight_requests` slots.

use super::{Flow, Session};
use crate::context::RelayContext;
use crate::front::access::Operation;
use crate::messaging::local_message::LocalMessage;
use crate::messaging::nats_convert::{check_headers, from_header_map, to_header_map, to_subject};
use crate::ops::metric_catalog::REQUEST_DURATION_SECONDS;
use crate::ops::stats::{bump, Limit};
use async_nats::client::RequestErrorKind;
use holdfast_wire::subject::validate_publish_subject;
use holdfast_wire::{ErrorCode, Frame, Request, Response, ResponseOutcome, Text};
use std::time::{Duration, Instant};
use tracing::debug;

impl Session {
    /// One of the connection's `max_inflight_requests` slots, shared by
    /// requests and linearizable GETs; without one the refusal is counted
    /// and its message returned.
    pub(super) fn in_flight_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
        self.requests_in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.ctx.stats.record_limit(Limit::InflightRequests);
                format!(
                    "more than {} requests and linearizable gets in flight on this connection",
                    self.ctx.config.sessions.max_inflight_requests
                )
            })
    }

    pub(super) async fn on_request(&mut self, request: Request) -> Flow {
        bump(&self.ctx.stats.requests_total);
        let request_id = request.request_id;
        let permit = match self.in_flight_permit() {
            Ok(permit) => permit,
            Err(message) => {
                return self
                    .fail_request(request_id, ErrorCode::LimitExceeded, message)
                    .await
            }
        };
        if let Err(error) = validate_publish_subject(&request.subject) {
            return self
                .fail_request(request_id, ErrorCode::InvalidSubject, error.to_string())
                .await;
        }
        if let Err(error) = check_headers(&request.headers) {
            return self
                .fail_request(request_id, ErrorCode::ProtocolViolation, error.to_string())
                .await;
        }
        if !self.permissions.may_publish(&request.subject) {
            let message = self.denied(Operation::Request, &request.subject);
            return self
                .fail_request(request_id, ErrorCode::Unauthorized, message)
                .await;
        }
        let nats_config = &self.ctx.config.nats;
        let timeout = match request.timeout_ms {
            0 => nats_config.request_timeout,
            millis => Duration::from_millis(u64::from(millis)).min(nats_config.max_request_timeout),
        };
        let ctx = self.ctx.clone();
        let outbox = self.outbox.clone();
        // Requests run concurrently; their answers may overtake each other,
        // which the request ids make harmless.
        let started = Instant::now();
        tokio::spawn(async move {
            let outcome = serve_request(&ctx, request, timeout).await;
            if let ResponseOutcome::Failed { code, .. } = &outcome {
                ctx.stats.request_failures.bump(*code);
                debug!(request_id, %code, "request failed");
            }
            let _ = outbox
                .send(Frame::Response(Response {
                    request_id,
                    outcome,
                }))
                .await;
            metrics::histogram!(REQUEST_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
            drop(permit);
        });
        Flow::Continue
    }

    async fn fail_request(&mut self, request_id: u64, code: ErrorCode, message: String) -> Flow {
        self.ctx.stats.request_failures.bump(code);
        self.send(Frame::Response(Response {
            request_id,
            outcome: ResponseOutcome::Failed {
                code,
                message: Text::from(message),
            },
        }))
        .await
    }
}

async fn serve_request(ctx: &RelayContext, request: Request, timeout: Duration) -> ResponseOutcome {
    let failed = |code: ErrorCode, message: String| ResponseOutcome::Failed {
        code,
        message: Text::from(message),
    };
    if !ctx.nats.is_up() {
        let message = LocalMessage {
            subject: request.subject,
            reply: None,
            headers: request.headers,
            payload: request.payload,
        };
        return match ctx.router.request_local(message, timeout).await {
            Ok(reply) => ResponseOutcome::Reply {
                headers: reply.headers,
                payload: reply.payload,
            },
            Err(ErrorCode::NatsUnavailable) => failed(
                ErrorCode::NatsUnavailable,
                "NATS is unreachable and no subscriber on this relay serves the subject".into(),
            ),
            Err(code) => failed(code, "no local responder answered in time".into()),
        };
    }
    let headers = match to_header_map(&request.headers) {
        Ok(headers) => headers,
        Err(error) => return failed(ErrorCode::ProtocolViolation, error.to_string()),
    };
    let mut nats_request = async_nats::Request::new()
        .payload(request.payload)
        .timeout(Some(timeout));
    if let Some(headers) = headers {
        nats_request = nats_request.headers(headers);
    }
    match ctx
        .nats
        .client()
        .send_request(to_subject(&request.subject), nats_request)
        .await
    {
        Ok(reply) => ResponseOutcome::Reply {
            headers: from_header_map(reply.headers.as_ref()),
            payload: reply.payload,
        },
        Err(error) => {
            let subject = &request.subject;
            let (code, message) = match error.kind() {
                RequestErrorKind::TimedOut => (
                    ErrorCode::Timeout,
                    format!("no reply on {subject} within {} ms", timeout.as_millis()),
                ),
                RequestErrorKind::NoResponders => (
                    ErrorCode::NoResponders,
                    format!("nobody subscribes to {subject}"),
                ),
                RequestErrorKind::InvalidSubject => (ErrorCode::InvalidSubject, error.to_string()),
                _ => (ErrorCode::NatsUnavailable, error.to_string()),
            };
            failed(code, message)
        }
    }
}
