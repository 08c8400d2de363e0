//! Registrations: the keys this process keeps in etcd through the relay.
//!
//! They are desired state owned by the connection task, like subscriptions.
//! The relay attaches a session's keys to a lease it owns for that session
//! and removes them when the session dies, so a new session starts with
//! none: [`Registrations::replay`] re-sends every live key, with its current
//! value, right after each WELCOME. This type only keeps the books (what is
//! desired, which change is in flight, who waits for its ack); writing frames
//! and routing acks is the connection task's job.

use crate::error::{Error, Result};
use bytes::Bytes;
use holdfast_wire::{Deregister, ErrorCode, Frame, Register, RegistrationOutcome};
use std::collections::{BTreeMap, HashMap};
use tokio::sync::oneshot;

/// Where a registration change stands once the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegistrationStatus {
    /// etcd holds the change now.
    Applied,
    /// The change is not in etcd yet, and nothing more needs to be done for
    /// it: the relay holds it while etcd is unreachable, or the client holds
    /// it while the relay is unreachable, and it is applied when they return.
    Buffered,
}

/// Who waits for the ack of a change sent to the relay.
pub(crate) type RegistrationWaiter = oneshot::Sender<Result<RegistrationStatus>>;

/// What became of an ack the connection task routed here.
pub(crate) enum AckRouting {
    /// A caller was waiting and has been answered.
    Answered,
    /// Nobody waits (a replay after reconnect, or a caller that gave up) and
    /// the relay refused the change: worth telling the application.
    UnclaimedRejection {
        key: Bytes,
        code: ErrorCode,
        message: String,
    },
    /// Nobody waits and nothing went wrong, or the ack was for no change of
    /// this session.
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Register,
    Deregister,
}

struct PendingChange {
    key: Bytes,
    kind: ChangeKind,
    waiter: Option<RegistrationWaiter>,
}

/// The keys this process wants registered, and the changes in flight on the
/// current connection.
#[derive(Default)]
pub(crate) struct Registrations {
    /// key → value. Ordered so that a replay is deterministic.
    desired: BTreeMap<Bytes, Bytes>,
    /// request id → change sent on the current connection, not acked yet.
    pending: HashMap<u64, PendingChange>,
}

impl Registrations {
    /// Records that `key` should hold `value` and returns the REGISTER that
    /// says so, for the connection task to write when connected.
    pub(crate) fn register(&mut self, request_id: u64, key: Bytes, value: Bytes) -> Frame {
        self.desired.insert(key.clone(), value.clone());
        Frame::Register(Register {
            request_id,
            key,
            value,
        })
    }

    /// Forgets `key` and returns the DEREGISTER that says so. Sent even for a
    /// key this client does not hold, so that a key whose registration the
    /// relay refused after an earlier one succeeded can still be removed.
    pub(crate) fn deregister(&mut self, request_id: u64, key: Bytes) -> Frame {
        self.desired.remove(&key);
        Frame::Deregister(Deregister { request_id, key })
    }

    /// Remembers that the change in `frame` (from [`register`](Self::register)
    /// or [`deregister`](Self::deregister)) went out, and who waits for it.
    pub(crate) fn sent(&mut self, frame: &Frame, waiter: Option<RegistrationWaiter>) {
        let (request_id, key, kind) = match frame {
            Frame::Register(register) => (
                register.request_id,
                register.key.clone(),
                ChangeKind::Register,
            ),
            Frame::Deregister(deregister) => (
                deregister.request_id,
                deregister.key.clone(),
                ChangeKind::Deregister,
            ),
            _ => return,
        };
        self.pending
            .insert(request_id, PendingChange { key, kind, waiter });
    }

    /// Drops `key` from the desired state after its REGISTER could not even
    /// be written (too large for the relay), so it is not re-sent forever.
    pub(crate) fn abandon(&mut self, key: &Bytes) {
        self.desired.remove(key);
    }

    /// Routes the relay's answer to the change with `request_id`.
    pub(crate) fn on_ack(&mut self, request_id: u64, outcome: RegistrationOutcome) -> AckRouting {
        let Some(change) = self.pending.remove(&request_id) else {
            return AckRouting::Ignored;
        };
        let result = match outcome {
            RegistrationOutcome::Applied => Ok(RegistrationStatus::Applied),
            RegistrationOutcome::Buffered => Ok(RegistrationStatus::Buffered),
            RegistrationOutcome::Rejected { code, message } => {
                // A refused key is not desired state (re-sending it after
                // every reconnect would only be refused again), unless a
                // newer change of the same key is still on its way.
                let superseded = self.pending.values().any(|other| other.key == change.key);
                if change.kind == ChangeKind::Register && !superseded {
                    self.desired.remove(&change.key);
                }
                Err(Error::relay(code, message.as_str()))
            }
        };
        match change.waiter {
            Some(waiter) if !waiter.is_closed() => {
                let _ = waiter.send(result);
                AckRouting::Answered
            }
            _ => match result {
                Err(Error::Relay { code, message }) => AckRouting::UnclaimedRejection {
                    key: change.key,
                    code,
                    message,
                },
                _ => AckRouting::Ignored,
            },
        }
    }

    /// The connection ended with changes in flight. Their outcome on the old
    /// session no longer matters: the relay drops a dead session's keys, and
    /// the desired state (which already reflects every change) is replayed
    /// on the next session. So every waiter learns `Buffered`.
    pub(crate) fn on_connection_lost(&mut self) {
        for (_, change) in self.pending.drain() {
            if let Some(waiter) = change.waiter {
                let _ = waiter.send(Ok(RegistrationStatus::Buffered));
            }
        }
    }

    /// The client is closing: waiters learn that nothing more will happen.
    pub(crate) fn on_close(&mut self) {
        for (_, change) in self.pending.drain() {
            if let Some(waiter) = change.waiter {
                let _ = waiter.send(Err(Error::Closed));
            }
        }
        self.desired.clear();
    }

    /// One REGISTER per desired key, for a new session; request ids come
    /// from `next_request_id`.
    pub(crate) fn replay(&self, mut next_request_id: impl FnMut() -> u64) -> Vec<Frame> {
        self.desired
            .iter()
            .map(|(key, value)| {
                Frame::Register(Register {
                    request_id: next_request_id(),
                    key: key.clone(),
                    value: value.clone(),
                })
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.desired.len()
    }

    /// Forgets waiters whose callers gave up (timed out or dropped).
    pub(crate) fn sweep_abandoned(&mut self) {
        for change in self.pending.values_mut() {
            if change
                .waiter
                .as_ref()
                .is_some_and(|waiter| waiter.is_closed())
            {
                change.waiter = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_wire::Text;

    fn key(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    fn replayed_keys(registrations: &Registrations) -> Vec<(Bytes, Bytes)> {
        let mut id = 0;
        registrations
            .replay(|| {
                id += 1;
                id
            })
            .into_iter()
            .map(|frame| match frame {
                Frame::Register(register) => (register.key, register.value),
                other => panic!("replay produced {other:?}"),
            })
            .collect()
    }

    #[test]
    fn replay_holds_the_latest_value_of_every_live_key() {
        let mut registrations = Registrations::default();
        registrations.register(1, key("a"), key("1"));
        registrations.register(2, key("b"), key("2"));
        registrations.register(3, key("a"), key("3"));
        registrations.deregister(4, key("b"));
        assert_eq!(replayed_keys(&registrations), vec![(key("a"), key("3"))]);
    }

    #[test]
    fn acks_reach_their_waiter() {
        let mut registrations = Registrations::default();
        let frame = registrations.register(7, key("a"), key("1"));
        let (waiter, mut answer) = oneshot::channel();
        registrations.sent(&frame, Some(waiter));
        assert!(matches!(
            registrations.on_ack(7, RegistrationOutcome::Buffered),
            AckRouting::Answered
        ));
        assert_eq!(
            answer.try_recv().unwrap().unwrap(),
            RegistrationStatus::Buffered
        );
    }

    #[test]
    fn a_rejected_key_is_not_replayed_unless_a_newer_change_is_in_flight() {
        let mut registrations = Registrations::default();
        let refused = registrations.register(1, key("bad"), key("1"));
        registrations.sent(&refused, None);
        let routing = registrations.on_ack(
            1,
            RegistrationOutcome::Rejected {
                code: ErrorCode::Unauthorized,
                message: Text::from("not yours"),
            },
        );
        assert!(matches!(
            routing,
            AckRouting::UnclaimedRejection { key: rejected, .. } if rejected == key("bad")
        ));
        assert!(replayed_keys(&registrations).is_empty());

        let older = registrations.register(2, key("k"), key("1"));
        registrations.sent(&older, None);
        let newer = registrations.register(3, key("k"), key("2"));
        registrations.sent(&newer, None);
        registrations.on_ack(
            2,
            RegistrationOutcome::Rejected {
                code: ErrorCode::LimitExceeded,
                message: Text::from("value too large"),
            },
        );
        assert_eq!(replayed_keys(&registrations), vec![(key("k"), key("2"))]);
    }

    #[test]
    fn changes_in_flight_at_connection_loss_are_buffered() {
        let mut registrations = Registrations::default();
        let frame = registrations.register(1, key("a"), key("1"));
        let (waiter, mut answer) = oneshot::channel();
        registrations.sent(&frame, Some(waiter));
        registrations.on_connection_lost();
        assert_eq!(
            answer.try_recv().unwrap().unwrap(),
            RegistrationStatus::Buffered
        );
        // Still desired: it goes out again on the next session.
        assert_eq!(replayed_keys(&registrations).len(), 1);
        assert!(matches!(
            registrations.on_ack(1, RegistrationOutcome::Applied),
            AckRouting::Ignored
        ));
    }
}
