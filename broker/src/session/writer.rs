//! The connection's writer task: drains the session's outbox in batches,
//! encodes them into one buffer and writes it with one syscall, gives the
//! outbox its byte charge back once the socket took the bytes, and reports
//! dropped deliveries to the client.

use super::outbox::{charged_bytes, OutboxReceiver};
use super::ByteWriter;
use bytes::BytesMut;
use holdfast_wire::{
    encode, ErrorCode, ErrorFrame, Frame, GetOutcome, GetResponse, Response, ResponseOutcome, Text,
};
use tokio::io::AsyncWriteExt;
use tracing::warn;

/// Frames the writer takes from the outbox per batch.
const WRITE_BATCH_FRAMES: usize = 512;
/// Flush the write buffer early once it holds this much.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// The answer that replaces `frame` when it cannot be encoded (too large
/// for this connection), for frames whose requester waits for one.
fn too_large_answer(frame: &Frame, error: &impl std::fmt::Display) -> Option<Frame> {
    let message = |what: &str| {
        Text::from(format!(
            "{what} does not fit in a frame on this connection: {error}"
        ))
    };
    match frame {
        Frame::Response(response) => Some(Frame::Response(Response {
            request_id: response.request_id,
            outcome: ResponseOutcome::Failed {
                code: ErrorCode::LimitExceeded,
                message: message("the reply"),
            },
        })),
        Frame::GetResponse(response) => Some(Frame::GetResponse(GetResponse {
            request_id: response.request_id,
            outcome: GetOutcome::Failed {
                code: ErrorCode::LimitExceeded,
                message: message("the snapshot (GET a narrower prefix)"),
            },
        })),
        _ => None,
    }
}

/// Writes everything the outbox holds, batch by batch, until GO_AWAY is
/// written or every sender is gone.
pub(super) async fn write_loop(mut socket: ByteWriter, mut outbox: OutboxReceiver, max_frame: u32) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_FRAMES);
    let mut buffer = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
    // The outbox's charge of the frames encoded into `buffer`: given back
    // once the socket took them, so frames held here while the client does
    // not read count against `sessions.outbound_queue_bytes` like queued ones.
    let mut unwritten = 0;
    loop {
        if outbox.take(&mut batch, WRITE_BATCH_FRAMES).await == 0 {
            break;
        }
        let drops = outbox.take_unreported_drops();
        if drops > 0 {
            let report = Frame::Error(ErrorFrame {
                code: ErrorCode::SlowConsumer,
                reference: 0,
                message: Text::from(format!(
                    "{drops} message(s) dropped: this connection's subscriptions are not keeping up"
                )),
            });
            let _ = encode(&report, max_frame, &mut buffer);
        }
        let mut closing = false;
        for frame in batch.drain(..) {
            closing = matches!(frame, Frame::GoAway(_));
            unwritten += charged_bytes(&frame);
            if let Err(error) = encode(&frame, max_frame, &mut buffer) {
                // Only frames built from validated input reach here; a frame
                // that still cannot be encoded is skipped, not fatal. A
                // reply too large for this connection (NATS allows larger
                // payloads than a small relay.max_frame_bytes) still gets
                // its request an answer, and so does a GET whose snapshot
                // is too large.
                warn!(%error, frame_type = frame.frame_type(), "frame not sent: cannot be encoded");
                if let Some(failed) = too_large_answer(&frame, &error) {
                    let _ = encode(&failed, max_frame, &mut buffer);
                }
            }
            if buffer.len() >= WRITE_BUFFER_BYTES || closing {
                if socket.write_all(&buffer).await.is_err() {
                    return;
                }
                buffer.clear();
                outbox.written(std::mem::take(&mut unwritten));
            }
            if closing {
                break;
            }
        }
        if !buffer.is_empty() {
            if socket.write_all(&buffer).await.is_err() {
                return;
            }
            buffer.clear();
        }
        outbox.written(std::mem::take(&mut unwritten));
        if closing {
            let _ = socket.shutdown().await;
            return;
        }
        if buffer.capacity() > 4 * WRITE_BUFFER_BYTES {
            // One huge frame should not pin its buffer for the session's life.
            buffer = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
        }
    }
}
