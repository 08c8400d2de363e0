//! Frames a front end decoded from its own protocol, handed to a session
//! as the stream of frames a byte connection's reader would give it.
//!
//! The front end sends its client's frames in batches, on a channel of
//! [`BATCHES_IN_FLIGHT`] batches: a session that is behind stops the front
//! end from reading more, as a full socket buffer would, so what waits
//! between the two stays within a few batches. A large batch carries its
//! reservation of the relay-wide read budget (as a large frame read from a
//! socket does), given back once the session has taken its last frame.

use futures::Stream;
use holdfast_wire::{CodecError, Frame};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Batches sent but not yet taken by the session.
const BATCHES_IN_FLIGHT: usize = 2;

/// Frames in the client's order, with what they hold of the read budget.
pub struct FrameBatch {
    pub frames: Vec<Frame>,
    /// Empty for a small batch.
    pub reservation: Vec<OwnedSemaphorePermit>,
}

impl From<Vec<Frame>> for FrameBatch {
    fn from(frames: Vec<Frame>) -> FrameBatch {
        FrameBatch {
            frames,
            reservation: Vec::new(),
        }
    }
}

/// The front end's side: send batches in the client's order.
pub type FrameSender = mpsc::Sender<FrameBatch>;

/// The session's side: the frames, one at a time.
pub struct DecodedFrames {
    batches: mpsc::Receiver<FrameBatch>,
    current: std::vec::IntoIter<Frame>,
    /// The reservation of the batch being taken.
    held: Vec<OwnedSemaphorePermit>,
}

/// A sender for the front end and the stream of frames for the session.
pub fn frame_channel() -> (FrameSender, DecodedFrames) {
    let (sender, batches) = mpsc::channel(BATCHES_IN_FLIGHT);
    let frames = DecodedFrames {
        batches,
        current: Vec::new().into_iter(),
        held: Vec::new(),
    };
    (sender, frames)
}

impl Stream for DecodedFrames {
    type Item = Result<Frame, CodecError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.current.next() {
                return Poll::Ready(Some(Ok(frame)));
            }
            // Every frame of the batch is taken: its bytes are the
            // session's now, no longer waiting.
            this.held.clear();
            match this.batches.poll_recv(cx) {
                Poll::Ready(Some(batch)) => {
                    this.current = batch.frames.into_iter();
                    this.held = batch.reservation;
                }
                // The front end is gone: the connection closed.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};
    use holdfast_wire::{Ping, Pong};

    fn ping(nonce: u64) -> Frame {
        Frame::Ping(Ping { nonce })
    }

    fn nonce(frame: Option<Result<Frame, CodecError>>) -> Option<u64> {
        match frame {
            Some(Ok(Frame::Ping(ping))) => Some(ping.nonce),
            _ => None,
        }
    }

    #[tokio::test]
    async fn batches_arrive_as_one_stream_in_order() {
        let (sender, mut frames) = frame_channel();
        sender.send(vec![ping(1), ping(2)].into()).await.unwrap();
        sender.send(vec![ping(3)].into()).await.unwrap();
        drop(sender);
        let mut seen = Vec::new();
        while let Some(frame) = frames.next().await {
            seen.push(nonce(Some(frame)).unwrap());
        }
        assert_eq!(seen, [1, 2, 3]);
    }

    #[tokio::test]
    async fn nothing_sent_is_pending_and_a_dropped_sender_ends_the_stream() {
        let (sender, mut frames) = frame_channel();
        assert!(frames.next().now_or_never().is_none());
        sender
            .send(vec![Frame::Pong(Pong { nonce: 0 })].into())
            .await
            .unwrap();
        assert!(matches!(
            frames.next().now_or_never(),
            Some(Some(Ok(Frame::Pong(_))))
        ));
        drop(sender);
        assert!(matches!(frames.next().now_or_never(), Some(None)));
    }

    #[tokio::test]
    async fn a_session_that_is_behind_holds_the_front_end_back() {
        let (sender, _frames) = frame_channel();
        for batch in 0..BATCHES_IN_FLIGHT as u64 {
            sender.try_send(vec![ping(batch)].into()).unwrap();
        }
        assert!(sender.try_send(vec![ping(99)].into()).is_err());
    }

    #[tokio::test]
    async fn a_batch_holds_its_reservation_until_its_last_frame_is_taken() {
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(10));
        let (sender, mut frames) = frame_channel();
        let reservation = vec![budget.clone().try_acquire_many_owned(10).unwrap()];
        sender
            .send(FrameBatch {
                frames: vec![ping(1), ping(2)],
                reservation,
            })
            .await
            .unwrap();
        assert_eq!(nonce(frames.next().await), Some(1));
        assert_eq!(nonce(frames.next().await), Some(2));
        assert_eq!(
            budget.available_permits(),
            0,
            "the last frame is not handled yet"
        );
        drop(sender);
        assert!(frames.next().await.is_none());
        assert_eq!(budget.available_permits(), 10);
    }
}
