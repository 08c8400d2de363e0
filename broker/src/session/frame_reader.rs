//! Reading a connection's frames within a memory budget.
//!
//! A frame may be up to `relay.max_frame_bytes` (4 MiB by default), and the
//! relay holds a frame's bytes until the last one arrives. Without a bound,
//! clients that each send the start of a large frame and stop make the
//! relay hold all of it: sixteen QUIC streams per connection, thousands of
//! connections. So a frame larger than [`SMALL_FRAME_BYTES`] is read only
//! once its size is reserved from the budgets it is subject to: the
//! relay-wide `sessions.read_budget_bytes`, and for a QUIC stream its
//! connection's budget of one frame, shared by the connection's streams.
//! A reader that finds no room waits (it reads nothing more meanwhile);
//! the budget is given back as soon as the frame is complete.

use crate::ops::stats::{Limit, RelayStats};
use bytes::BytesMut;
use futures::Stream;
use holdfast_wire::{CodecError, Frame, FrameCodec};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncRead;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::Decoder;

/// Frames up to this size (prefix included) need no reservation: the
/// read buffer holds them anyway.
pub const SMALL_FRAME_BYTES: usize = 64 * 1024;

/// How much a read asks for at least.
const READ_CHUNK: usize = 64 * 1024;

/// Bytes of the length prefix.
const PREFIX_LEN: usize = 4;

type Reservation = Pin<Box<dyn Future<Output = Option<Vec<OwnedSemaphorePermit>>> + Send>>;

/// The budgets a reader's large frames are reserved from, in the order
/// they are taken (narrowest first, so no two readers wait on each other
/// in opposite orders).
#[derive(Clone, Default)]
pub struct ReadBudgets(Vec<Arc<Semaphore>>);

impl ReadBudgets {
    pub fn new(budgets: Vec<Arc<Semaphore>>) -> ReadBudgets {
        ReadBudgets(budgets)
    }
}

/// The frames of one connection (or QUIC stream), as a stream.
pub struct BudgetedFrames<R> {
    reader: R,
    buffer: BytesMut,
    codec: FrameCodec,
    budgets: ReadBudgets,
    /// The reservation for the large frame being read, once made.
    held: Vec<OwnedSemaphorePermit>,
    reserving: Option<Reservation>,
    stats: Arc<RelayStats>,
    ended: bool,
}

impl<R: AsyncRead + Unpin> BudgetedFrames<R> {
    pub fn new(
        reader: R,
        max_frame_bytes: u32,
        budgets: ReadBudgets,
        stats: Arc<RelayStats>,
    ) -> BudgetedFrames<R> {
        BudgetedFrames {
            reader,
            buffer: BytesMut::with_capacity(READ_CHUNK),
            codec: FrameCodec::new(max_frame_bytes),
            budgets,
            held: Vec::new(),
            reserving: None,
            stats,
            ended: false,
        }
    }

    /// The size (prefix included) of the frame at the front of the buffer,
    /// when it is large and its length is valid; the decoder reports the
    /// invalid ones.
    fn large_frame_ahead(&self) -> Option<usize> {
        let prefix = self.buffer.first_chunk::<PREFIX_LEN>()?;
        let len = u32::from_be_bytes(*prefix);
        let total = (len as usize).saturating_add(PREFIX_LEN);
        (total > SMALL_FRAME_BYTES && len <= self.codec.max_frame_bytes()).then_some(total)
    }
}

impl<R: AsyncRead + Unpin> Stream for BudgetedFrames<R> {
    type Item = Result<Frame, CodecError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // A large frame's bytes are taken in only under a reservation,
            // and the decoder reserves buffer room for the whole frame as
            // soon as it sees the prefix: reserve first.
            if let Some(total) = this.large_frame_ahead() {
                if this.held.is_empty() && !this.budgets.0.is_empty() {
                    let reserving = this.reserving.get_or_insert_with(|| {
                        reserve(this.budgets.clone(), total, this.stats.clone())
                    });
                    let permits = ready!(reserving.as_mut().poll(cx));
                    this.reserving = None;
                    match permits {
                        Some(permits) => this.held = permits,
                        // A budget closed: the relay is stopping.
                        None => return Poll::Ready(None),
                    }
                }
            }
            match this.codec.decode(&mut this.buffer) {
                Ok(Some(frame)) => {
                    this.held.clear();
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) => {}
                Err(error) => return Poll::Ready(Some(Err(error))),
            }
            if this.ended {
                if this.buffer.is_empty() {
                    return Poll::Ready(None);
                }
                this.buffer.clear();
                return Poll::Ready(Some(Err(CodecError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection ended inside a frame",
                )))));
            }
            if this.buffer.capacity() - this.buffer.len() < READ_CHUNK / 4 {
                this.buffer.reserve(READ_CHUNK);
            }
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.reader),
                cx,
                &mut this.buffer
            ));
            match read {
                Ok(0) => this.ended = true,
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(CodecError::Io(error)))),
            }
        }
    }
}

/// Takes `bytes` from every budget in turn; counts a wait when one has to
/// wait. `None` when a budget was closed. Also what a front end that
/// decodes its own protocol reserves its large batches with.
pub(crate) fn reserve(budgets: ReadBudgets, bytes: usize, stats: Arc<RelayStats>) -> Reservation {
    Box::pin(async move {
        let amount = u32::try_from(bytes).unwrap_or(u32::MAX);
        let mut permits = Vec::with_capacity(budgets.0.len());
        for budget in &budgets.0 {
            let permit = match budget.clone().try_acquire_many_owned(amount) {
                Ok(permit) => permit,
                Err(_) => {
                    stats.record_limit(Limit::ReadBudget);
                    budget.clone().acquire_many_owned(amount).await.ok()?
                }
            };
            permits.push(permit);
        }
        Some(permits)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};
    use holdfast_wire::{encode, Ping};
    use tokio::io::AsyncWriteExt;

    /// A PING, or a PUBLISH of `padding` payload bytes.
    fn ping_frame(padding: usize) -> BytesMut {
        let frame = if padding == 0 {
            Frame::Ping(Ping { nonce: 7 })
        } else {
            Frame::Publish(holdfast_wire::Publish {
                ack_id: 1,
                subject: holdfast_wire::Text::from("large"),
                reply: None,
                class: None,
                headers: holdfast_wire::Headers::new(),
                payload: bytes::Bytes::from(vec![b'x'; padding]),
            })
        };
        let mut bytes = BytesMut::new();
        encode(&frame, 8 * 1024 * 1024, &mut bytes).unwrap();
        bytes
    }

    #[tokio::test]
    async fn small_frames_flow_without_touching_the_budget() {
        let budget = Arc::new(Semaphore::new(0));
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut frames = BudgetedFrames::new(
            server,
            8 * 1024 * 1024,
            ReadBudgets::new(vec![budget]),
            Arc::new(RelayStats::new(Vec::new())),
        );
        client.write_all(&ping_frame(0)).await.unwrap();
        assert!(matches!(frames.next().await, Some(Ok(Frame::Ping(_)))));
    }

    #[tokio::test]
    async fn a_large_frame_waits_for_room_and_gives_it_back_when_complete() {
        let size = 200 * 1024;
        let budget = Arc::new(Semaphore::new(size + 1024));
        let stats = Arc::new(RelayStats::new(Vec::new()));
        let (mut first_client, first_server) = tokio::io::duplex(1 << 20);
        let (mut second_client, second_server) = tokio::io::duplex(1 << 20);
        let budgets = ReadBudgets::new(vec![budget.clone()]);
        let mut first = BudgetedFrames::new(first_server, 8 << 20, budgets.clone(), stats.clone());
        let mut second = BudgetedFrames::new(second_server, 8 << 20, budgets, stats.clone());
        let large = ping_frame(size);
        // The first reader holds the room for its unfinished frame...
        first_client.write_all(&large[..1000]).await.unwrap();
        assert!(first.next().now_or_never().is_none());
        assert!(budget.available_permits() < 2048);
        // ...so the second waits without buffering its frame.
        second_client.write_all(&large).await.unwrap();
        assert!(second.next().now_or_never().is_none());
        assert_eq!(stats.limit_rejections(Limit::ReadBudget), 1);
        // The first completes and gives the room back; the second goes on.
        first_client.write_all(&large[1000..]).await.unwrap();
        assert!(matches!(first.next().await, Some(Ok(Frame::Publish(_)))));
        assert!(matches!(second.next().await, Some(Ok(Frame::Publish(_)))));
        assert_eq!(budget.available_permits(), size + 1024);
    }

    #[tokio::test]
    async fn an_unfinished_frame_at_the_end_is_an_error() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut frames = BudgetedFrames::new(
            server,
            8 << 20,
            ReadBudgets::default(),
            Arc::new(RelayStats::new(Vec::new())),
        );
        client.write_all(&ping_frame(0)[..3]).await.unwrap();
        drop(client);
        assert!(matches!(frames.next().await, Some(Err(CodecError::Io(_)))));
        assert!(frames.next().await.is_none());
    }
}
