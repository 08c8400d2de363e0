//! The bounded queue of publishes made while the relay is unreachable.
//!
//! Sans-IO: the connection task pushes while disconnected and drains, in
//! order, right after the next WELCOME. Both bounds (messages and bytes) are
//! hard: memory stays bounded however long the relay is away.

use crate::options::OfflinePolicy;
use std::collections::VecDeque;

/// Why [`OfflineBuffer::push`] did not take an item; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused<T> {
    /// Taking the item would exceed a bound.
    Full(T),
    /// The policy is fail-fast: nothing is buffered.
    Disabled(T),
}

#[derive(Debug)]
pub(crate) struct OfflineBuffer<T> {
    items: VecDeque<T>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
    enabled: bool,
}

impl<T> OfflineBuffer<T> {
    pub(crate) fn new(policy: OfflinePolicy) -> OfflineBuffer<T> {
        let (max_messages, max_bytes, enabled) = match policy {
            OfflinePolicy::Buffer {
                max_messages,
                max_bytes,
            } => (max_messages, max_bytes, true),
            OfflinePolicy::FailFast => (0, 0, false),
        };
        OfflineBuffer {
            items: VecDeque::new(),
            bytes: 0,
            max_messages,
            max_bytes,
            enabled,
        }
    }

    /// Appends `item` of `size` bytes, or refuses it if a bound would be exceeded.
    pub(crate) fn push(&mut self, item: T, size: usize) -> Result<(), Refused<T>> {
        if !self.enabled {
            return Err(Refused::Disabled(item));
        }
        let bytes_after = self.bytes.saturating_add(size);
        if self.items.len() >= self.max_messages || bytes_after > self.max_bytes {
            return Err(Refused::Full(item));
        }
        self.items.push_back(item);
        self.bytes = bytes_after;
        Ok(())
    }

    /// Everything buffered, oldest first, leaving the buffer empty.
    pub(crate) fn take_all(&mut self) -> VecDeque<T> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(max_messages: usize, max_bytes: usize) -> OfflineBuffer<u32> {
        OfflineBuffer::new(OfflinePolicy::Buffer {
            max_messages,
            max_bytes,
        })
    }

    #[test]
    fn message_bound_is_hard() {
        let mut buffer = buffer(3, usize::MAX);
        for item in 0..3 {
            assert_eq!(buffer.push(item, 10), Ok(()));
        }
        assert_eq!(buffer.push(3, 10), Err(Refused::Full(3)));
        assert_eq!(buffer.len(), 3);
    }

    #[test]
    fn byte_bound_is_hard_and_exact() {
        let mut buffer = buffer(100, 100);
        assert_eq!(buffer.push(0, 60), Ok(()));
        assert_eq!(buffer.push(1, 41), Err(Refused::Full(1)));
        assert_eq!(buffer.push(2, 40), Ok(()));
        assert_eq!(buffer.bytes(), 100);
        assert_eq!(buffer.push(3, 0), Ok(()));
        assert_eq!(buffer.push(4, 1), Err(Refused::Full(4)));
    }

    #[test]
    fn a_single_oversized_item_is_refused() {
        let mut buffer = buffer(100, 10);
        assert_eq!(buffer.push(7, 11), Err(Refused::Full(7)));
        assert_eq!(buffer.len(), 0);
    }

    #[test]
    fn take_all_keeps_order_and_frees_the_budget() {
        let mut buffer = buffer(3, 30);
        for item in 0..3 {
            buffer.push(item, 10).unwrap();
        }
        let drained: Vec<u32> = buffer.take_all().into_iter().collect();
        assert_eq!(drained, vec![0, 1, 2]);
        assert_eq!(buffer.len(), 0);
        assert_eq!(buffer.bytes(), 0);
        assert_eq!(buffer.push(9, 30), Ok(()));
    }

    #[test]
    fn fail_fast_buffers_nothing() {
        let mut buffer: OfflineBuffer<u32> = OfflineBuffer::new(OfflinePolicy::FailFast);
        assert_eq!(buffer.push(1, 0), Err(Refused::Disabled(1)));
    }
}
