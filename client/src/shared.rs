//! State the connection task publishes for handles to read without a round trip.
//!
//! The connection task is the only writer. Handles read these on every
//! operation, so they are atomics rather than anything behind a lock.

use holdfast_wire::LinkStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

#[derive(Debug)]
pub(crate) struct SharedState {
    /// A session with the relay is established (WELCOME received, desired
    /// state re-sent). Handles use it to pick the online or offline path.
    relay_connected: AtomicBool,
    /// The connection task has exited; nothing more can be done.
    closed: AtomicBool,
    /// 0 until the first WELCOME.
    instance_id: AtomicU64,
    /// The limit the relay accepts, for checking sizes before enqueueing.
    max_frame_bytes: AtomicU32,
    next_sid: AtomicU32,
    next_ack_id: AtomicU64,
    next_request_id: AtomicU64,
    /// Fire-and-forget publishes dropped inside the client (each one logged).
    publishes_dropped: AtomicU64,
}

impl SharedState {
    pub(crate) fn new(max_frame_bytes: u32) -> SharedState {
        SharedState {
            relay_connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            instance_id: AtomicU64::new(0),
            max_frame_bytes: AtomicU32::new(max_frame_bytes),
            next_sid: AtomicU32::new(1),
            next_ack_id: AtomicU64::new(1),
            next_request_id: AtomicU64::new(1),
            publishes_dropped: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_relay_connected(&self) -> bool {
        self.relay_connected.load(Ordering::Acquire)
    }

    pub(crate) fn set_relay_connected(&self, connected: bool) {
        self.relay_connected.store(connected, Ordering::Release);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn set_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub(crate) fn instance_id(&self) -> u64 {
        self.instance_id.load(Ordering::Acquire)
    }

    pub(crate) fn set_instance_id(&self, instance_id: u64) {
        self.instance_id.store(instance_id, Ordering::Release);
    }

    pub(crate) fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn set_max_frame_bytes(&self, max: u32) {
        self.max_frame_bytes.store(max, Ordering::Relaxed);
    }

    /// A subscription id; never 0, because ERROR reference 0 means "no
    /// subscription".
    pub(crate) fn next_sid(&self) -> u32 {
        loop {
            let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
            if sid != 0 {
                return sid;
            }
        }
    }

    /// A publish ack id; never 0, because ack id 0 means fire-and-forget.
    pub(crate) fn next_ack_id(&self) -> u64 {
        loop {
            let ack_id = self.next_ack_id.fetch_add(1, Ordering::Relaxed);
            if ack_id != 0 {
                return ack_id;
            }
        }
    }

    /// A request id, unique among this client's outstanding requests.
    pub(crate) fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn publishes_dropped(&self) -> u64 {
        self.publishes_dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn count_dropped_publish(&self) -> u64 {
        self.publishes_dropped.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The relay's links to its upstream services, as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UpstreamLinks {
    pub(crate) nats: LinkStatus,
    pub(crate) etcd: LinkStatus,
}

impl UpstreamLinks {
    pub(crate) const UNKNOWN: UpstreamLinks = UpstreamLinks {
        nats: LinkStatus::Unknown,
        etcd: LinkStatus::Unknown,
    };
}
