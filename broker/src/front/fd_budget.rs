//! The relay's file descriptor budget: how many client connections
//! (`sessions.max_connections`) the process's open-file limit can carry
//! while leaving the relay descriptors for its own work.
//!
//! Every connection on the Unix socket and the TCP front ends takes a
//! descriptor. Had they been allowed to take the last ones, the operations
//! endpoint (`/livez`), upstream reconnects and the data dir's files would
//! fail with EMFILE, and so would every other listener. So at start the
//! relay raises its soft limit to the hard one, counts what it has open,
//! keeps [`RESERVED_DESCRIPTORS`] aside, and admits at most what is left
//! as connections, warning when that is below the configured maximum.

use tracing::{info, warn};

/// Descriptors kept for the relay itself beyond those open at start: the
/// operations endpoint's 32 concurrent requests, connections being told
/// they are over the limit (at most [`REFUSALS_IN_FLIGHT`] per listener),
/// upstream reconnects and probes, and files written in the data dir.
pub const RESERVED_DESCRIPTORS: u64 = 160;
/// Connections over the limit a listener may be answering at once; beyond
/// it, they are closed without an answer (still counted), so a flood of
/// them cannot hold descriptors either.
pub const REFUSALS_IN_FLIGHT: usize = 16;
/// Connections admitted however low the limit: a relay that admits none
/// is of no use, and the accept loops back off if descriptors do run out.
pub const MIN_CONNECTIONS: usize = 16;

/// How many connections the relay admits, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub connections: usize,
    /// The open-file limit allowed fewer than `sessions.max_connections`.
    pub capped: bool,
}

/// Connections to admit given the configured maximum, the open-file limit
/// and the descriptors open now.
pub fn budget(max_connections: usize, open_file_limit: u64, open_now: u64) -> Budget {
    let room = open_file_limit
        .saturating_sub(open_now)
        .saturating_sub(RESERVED_DESCRIPTORS);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    let connections = room.max(MIN_CONNECTIONS).min(max_connections);
    Budget {
        connections,
        capped: connections < max_connections,
    }
}

/// Raises the soft open-file limit to the hard one (a server has no use for
/// the low soft default meant for select(2)); returns the soft limit now.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                from = limit.rlim_cur,
                to = limit.rlim_max,
                "raised the open-file limit to its hard limit"
            );
            return Some(limit.rlim_max);
        }
    }
    Some(limit.rlim_cur)
}

/// Descriptors the process has open now (Linux: the entries of
/// /proc/self/fd, less the one reading it).
fn open_descriptors() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some((entries.count() as u64).saturating_sub(1))
}

/// The connections to admit for `sessions.max_connections` =
/// `max_connections`, logged when the open-file limit lowers it.
pub fn connections_to_admit(max_connections: usize) -> usize {
    let Some(limit) = raise_open_file_limit() else {
        return max_connections;
    };
    let open_now = open_descriptors().unwrap_or(RESERVED_DESCRIPTORS);
    let budget = budget(max_connections, limit, open_now);
    if budget.capped {
        warn!(
            max_connections,
            open_file_limit = limit,
            open_now,
            reserved = RESERVED_DESCRIPTORS,
            admitted = budget.connections,
            "sessions.max_connections is more than the open-file limit leaves room for; admitting fewer connections (raise LimitNOFILE / ulimit -n)"
        );
    }
    budget.connections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roomy_limit_admits_the_configured_maximum() {
        assert_eq!(
            budget(4096, 65_536, 40),
            Budget {
                connections: 4096,
                capped: false
            }
        );
    }

    #[test]
    fn a_low_limit_admits_what_is_left_after_the_reserve() {
        // prlimit --nofile=300: 40 open at start, 160 kept aside.
        assert_eq!(
            budget(4096, 300, 40),
            Budget {
                connections: 100,
                capped: true
            }
        );
    }

    #[test]
    fn a_limit_below_the_reserve_still_admits_a_few() {
        assert_eq!(budget(4096, 100, 40).connections, MIN_CONNECTIONS);
        // ...but never more than configured.
        assert_eq!(
            budget(4, 100, 40),
            Budget {
                connections: 4,
                capped: false
            }
        );
    }
}
