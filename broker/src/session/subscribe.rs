//! SUBSCRIBE: a subject (and queue group) checked against the subject
//! rules and the access rules, then shared through the router with every
//! other subscriber of the same (subject, queue group) on this relay.

use super::{Flow, Session};
use crate::front::access::Operation;
use crate::messaging::subscription_table::SubscriptionKey;
use crate::ops::stats::Limit;
use holdfast_wire::subject::{validate_queue_group, validate_subscribe_subject};
use holdfast_wire::{ErrorCode, Subscribe, Text};

impl Session {
    pub(super) async fn on_subscribe(&mut self, subscribe: Subscribe) -> Flow {
        let sid = subscribe.sid;
        let valid = validate_subscribe_subject(&subscribe.subject).and_then(|()| {
            subscribe
                .queue_group
                .as_deref()
                .map_or(Ok(()), validate_queue_group)
        });
        if let Err(error) = valid {
            return self
                .error(ErrorCode::InvalidSubject, u64::from(sid), error.to_string())
                .await;
        }
        if !self.permissions.may_subscribe(&subscribe.subject) {
            let message = self.denied(Operation::Subscribe, &subscribe.subject);
            return self
                .error(ErrorCode::Unauthorized, u64::from(sid), message)
                .await;
        }
        // Held for the life of the subscription: copied out of the read
        // buffer, which the slices decoded from it would otherwise keep.
        let key = SubscriptionKey {
            subject: Text::from(subscribe.subject.as_str()),
            queue_group: subscribe.queue_group.as_deref().map(Text::from),
        };
        match self
            .ctx
            .router
            .subscribe((self.id, sid), key, self.outbox.clone())
            .await
        {
            Ok(()) => {
                self.subscribed_since_barrier = true;
                Flow::Continue
            }
            Err(refusal) => {
                if refusal.code == ErrorCode::LimitExceeded {
                    self.ctx.stats.record_limit(Limit::Subscriptions);
                }
                self.error(refusal.code, u64::from(sid), refusal.message)
                    .await
            }
        }
    }
}
