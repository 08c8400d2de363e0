//! Which cached prefixes each session's watches hold, and the cap on how
//! many one session may hold. Sans-IO.
//!
//! A watched prefix is never evicted, so without a cap one session opening
//! watches on many distinct prefixes takes every slot of the cache and
//! leaves the other sessions none. With it, that session's excess is
//! refused to it alone.

use bytes::Bytes;
use std::collections::HashMap;

type SessionId = u64;

#[derive(Debug)]
pub struct SessionPins {
    /// Per session, the cached prefixes its watches hold, with how many of
    /// its watches hold each.
    pins: HashMap<SessionId, HashMap<Bytes, usize>>,
    max_per_session: usize,
}

impl SessionPins {
    pub fn new(max_per_session: usize) -> SessionPins {
        SessionPins {
            pins: HashMap::new(),
            max_per_session,
        }
    }

    pub fn max_per_session(&self) -> usize {
        self.max_per_session
    }

    /// How many cached prefixes `session`'s watches hold.
    pub fn held(&self, session: SessionId) -> usize {
        self.pins.get(&session).map_or(0, HashMap::len)
    }

    /// Whether a new watch of `session` may hold `cache_prefix` (`None`: a
    /// prefix not cached yet): one it holds already costs nothing, another
    /// needs room under the cap.
    pub fn admits(&self, session: SessionId, cache_prefix: Option<&Bytes>) -> bool {
        let pinned = self.pins.get(&session);
        let holds_it =
            cache_prefix.is_some_and(|prefix| pinned.is_some_and(|pins| pins.contains_key(prefix)));
        holds_it || self.held(session) < self.max_per_session
    }

    /// A watch of `session` now holds `cache_prefix`.
    pub fn pin(&mut self, session: SessionId, cache_prefix: Bytes) {
        *self
            .pins
            .entry(session)
            .or_default()
            .entry(cache_prefix)
            .or_default() += 1;
    }

    /// A watch of `session` no longer holds `cache_prefix`.
    pub fn unpin(&mut self, session: SessionId, cache_prefix: &Bytes) {
        let Some(pins) = self.pins.get_mut(&session) else {
            return;
        };
        if let Some(count) = pins.get_mut(cache_prefix) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                pins.remove(cache_prefix);
            }
        }
        if pins.is_empty() {
            self.pins.remove(&session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(name: &'static str) -> Bytes {
        Bytes::from_static(name.as_bytes())
    }

    #[test]
    fn a_session_holds_at_most_its_cap_and_others_are_unaffected() {
        let mut pins = SessionPins::new(2);
        pins.pin(1, prefix("a/"));
        pins.pin(1, prefix("b/"));
        assert!(!pins.admits(1, None), "a third, new prefix");
        assert!(
            !pins.admits(1, Some(&prefix("c/"))),
            "a third, cached by others"
        );
        assert!(pins.admits(1, Some(&prefix("a/"))), "one it holds already");
        assert!(pins.admits(2, None), "another session");
        assert_eq!(pins.held(1), 2);
    }

    #[test]
    fn a_prefix_is_released_when_the_last_watch_holding_it_ends() {
        let mut pins = SessionPins::new(1);
        pins.pin(1, prefix("a/"));
        pins.pin(1, prefix("a/"));
        pins.unpin(1, &prefix("a/"));
        assert!(!pins.admits(1, None), "one watch still holds a/");
        pins.unpin(1, &prefix("a/"));
        assert!(pins.admits(1, None));
        assert_eq!(pins.held(1), 0);
        assert!(
            pins.pins.is_empty(),
            "nothing kept for a session without watches"
        );
        pins.unpin(9, &prefix("x/"));
    }
}
