//! A typed, one-shot answer: how a core service (the registry, discovery)
//! answers a caller without knowing who asked. A session's reply turns the
//! outcome into a frame for its client; the etcd front end's reply hands
//! it to the gRPC call waiting on a channel. Dropping a reply unanswered
//! is how a service says "no answer" (the caller sees its channel close).

use tokio::sync::oneshot;

/// Where one answer of type `T` goes.
pub struct Reply<T>(Box<dyn FnOnce(T) + Send>);

impl<T: Send + 'static> Reply<T> {
    /// A reply that calls `deliver` with the answer. `deliver` runs on the
    /// service's task, so it must not block: queue the answer, do not
    /// wait for room.
    pub fn new(deliver: impl FnOnce(T) + Send + 'static) -> Reply<T> {
        Reply(Box::new(deliver))
    }

    /// A reply whose answer arrives on the returned receiver.
    pub fn channel() -> (Reply<T>, oneshot::Receiver<T>) {
        let (sender, receiver) = oneshot::channel();
        let reply = Reply::new(move |answer| {
            // A caller that stopped waiting no longer wants it.
            let _ = sender.send(answer);
        });
        (reply, receiver)
    }

    /// A reply nobody waits for (work the relay does on its own behalf).
    pub fn discarded() -> Reply<T> {
        Reply::new(drop)
    }

    /// Gives the answer to whoever asked.
    pub fn send(self, answer: T) {
        (self.0)(answer);
    }
}

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Reply")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_channel_reply_delivers_its_answer_once() {
        let (reply, receiver) = Reply::channel();
        reply.send(7u32);
        assert_eq!(receiver.await.ok(), Some(7));
    }

    #[tokio::test]
    async fn a_dropped_reply_closes_the_callers_channel() {
        let (reply, receiver) = Reply::<u32>::channel();
        drop(reply);
        assert!(receiver.await.is_err());
    }

    #[test]
    fn a_reply_runs_its_delivery_with_the_answer() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let into = seen.clone();
        Reply::new(move |answer: &'static str| {
            *into.lock().unwrap() = Some(answer);
        })
        .send("applied");
        assert_eq!(*seen.lock().unwrap(), Some("applied"));
    }

    #[test]
    fn a_discarded_reply_takes_its_answer_silently() {
        Reply::<String>::discarded().send("nobody waits".to_string());
    }
}
