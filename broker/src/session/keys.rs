//! REGISTER, DEREGISTER, GET and WATCH: the session's side of the
//! registry and discovery. It remembers which keys and watches are its own
//! (so the liveness timeout and the end of the session know), checks the
//! access rules and limits, and hands the rest to the registry and the
//! discovery cache, whose typed answers become frames here.

use super::{Flow, Session};
use crate::front::access::Operation;
use crate::keys::discovery::GetTo;
use crate::keys::registry::model::Claimant;
use crate::ops::stats::Limit;
use crate::util::reply::Reply;
use bytes::Bytes;
use holdfast_wire::{
    Deregister, ErrorCode, Frame, Get, GetOutcome, GetResponse, Register, RegisterAck,
    RegistrationOutcome, Text, Watch,
};

impl Session {
    pub(super) async fn on_register(&mut self, register: Register) -> Flow {
        if register.key.is_empty() {
            return self
                .answer_registration(
                    register.request_id,
                    ErrorCode::InvalidSubject,
                    "a registration key must not be empty",
                )
                .await;
        }
        if !self.permissions.may_register(&register.key) {
            let key = String::from_utf8_lossy(&register.key).into_owned();
            let message = self.denied(Operation::Register, &key);
            return self
                .answer_registration(register.request_id, ErrorCode::Unauthorized, &message)
                .await;
        }
        {
            let hash = std::hash::BuildHasher::hash_one(&self.registered_hasher, &register.key);
            // Past the per-session limit the registry refuses the key anyway.
            if self.registered.len() < self.ctx.config.etcd.max_registrations_per_session {
                self.registered.insert(hash);
            }
        }
        let ack = self.registration_reply(register.request_id);
        // Held until deregistered, so copied out of the read buffer that
        // the decoded slices share with every frame read along with them.
        let claimant = self.claimant(&register.key);
        let key = Bytes::copy_from_slice(&register.key);
        let value = Bytes::copy_from_slice(&register.value);
        self.ctx.registry.register(claimant, key, value, ack).await;
        Flow::Continue
    }

    /// The registry's answer to request `request_id`, as this client's
    /// REGISTER_ACK.
    fn registration_reply(&self, request_id: u64) -> Reply<RegistrationOutcome> {
        let outbox = self.outbox.clone();
        Reply::new(move |outcome| {
            // A closed session no longer wants its answer.
            let _ = outbox.send_ack(Frame::RegisterAck(RegisterAck {
                request_id,
                outcome,
            }));
        })
    }

    /// Discovery's answer to GET `request_id`, as this client's
    /// GET_RESPONSE.
    fn get_reply(&self, request_id: u64) -> GetTo {
        let outbox = self.outbox.clone();
        GetTo::new(Reply::new(move |outcome| {
            // Within the session's outbound limits: a client that asks for
            // snapshots and never reads them is a slow consumer, not a way
            // to grow the relay's memory.
            outbox.offer(Frame::GetResponse(GetResponse {
                request_id,
                outcome,
            }));
        }))
    }

    /// This session as the registry sees it when it changes `key`.
    fn claimant(&self, key: &[u8]) -> Claimant {
        Claimant {
            session: self.id,
            process: self.process.clone(),
            may_take_over: self.permissions.may_take_over(key),
        }
    }

    pub(super) async fn on_deregister(&mut self, deregister: Deregister) -> Flow {
        self.registered.remove(&std::hash::BuildHasher::hash_one(
            &self.registered_hasher,
            &deregister.key,
        ));
        let ack = self.registration_reply(deregister.request_id);
        let claimant = self.claimant(&deregister.key);
        self.ctx
            .registry
            .deregister(claimant, deregister.key, ack)
            .await;
        Flow::Continue
    }

    async fn answer_registration(
        &mut self,
        request_id: u64,
        code: ErrorCode,
        message: &str,
    ) -> Flow {
        self.send(Frame::RegisterAck(RegisterAck {
            request_id,
            outcome: RegistrationOutcome::Rejected {
                code,
                message: Text::from(message),
            },
        }))
        .await
    }

    pub(super) async fn on_get(&mut self, get: Get) -> Flow {
        if get.prefix.is_empty() {
            return self
                .send(Frame::GetResponse(GetResponse {
                    request_id: get.request_id,
                    outcome: GetOutcome::Failed {
                        code: ErrorCode::InvalidSubject,
                        message: Text::from("a discovery prefix must not be empty"),
                    },
                }))
                .await;
        }
        let to = self.get_reply(get.request_id);
        if get.linearizable {
            // A read from etcd is outstanding work, like a request: it counts
            // against the same limit, so a client cannot pile them up.
            let permit = match self.in_flight_permit() {
                Ok(permit) => permit,
                Err(message) => {
                    return self
                        .send(Frame::GetResponse(GetResponse {
                            request_id: get.request_id,
                            outcome: GetOutcome::Failed {
                                code: ErrorCode::LimitExceeded,
                                message: Text::from(message),
                            },
                        }))
                        .await
                }
            };
            self.ctx.discovery.get_linearizable(get.prefix, to, permit);
        } else {
            // The prefix may become a cached prefix, kept for hours: copied
            // out of the read buffer (see on_register).
            let prefix = Bytes::copy_from_slice(&get.prefix);
            self.ctx.discovery.get(prefix, to).await;
        }
        Flow::Continue
    }

    pub(super) async fn on_watch(&mut self, watch: Watch) -> Flow {
        let reference = u64::from(watch.watch_id);
        if watch.prefix.is_empty() {
            let message = "a discovery prefix must not be empty".to_string();
            return self
                .error(ErrorCode::InvalidSubject, reference, message)
                .await;
        }
        let max_watches = self.ctx.config.etcd.max_watches_per_session;
        let admitted = self.watches.contains(&watch.watch_id) || self.watches.len() < max_watches;
        if admitted {
            self.watches.insert(watch.watch_id);
        }
        if !admitted {
            self.ctx.stats.record_limit(Limit::Watches);
            let message = format!(
                "at most {max_watches} watches per connection (etcd.max_watches_per_session)"
            );
            return self
                .error(ErrorCode::LimitExceeded, reference, message)
                .await;
        }
        let started = self
            .ctx
            .discovery
            .watch(
                self.id,
                watch.watch_id,
                // Held for the watch's life (and maybe as a cached prefix).
                Bytes::copy_from_slice(&watch.prefix),
                watch.send_initial,
                self.outbox.clone(),
            )
            .await;
        match started {
            Ok(()) => Flow::Continue,
            Err(refused) => {
                self.watches.remove(&watch.watch_id);
                self.error(refused.code, reference, refused.message).await
            }
        }
    }
}
