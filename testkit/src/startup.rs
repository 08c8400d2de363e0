//! Bringing a server up: spawn it, probe it until it is ready, and give up
//! with its log once a limit passes. nats-server, etcd and holdfastd differ
//! only in how they are spawned and probed ([`Launch`]).

use crate::error::{Error, Result};
use crate::process::{polls, Process};
use std::time::{Duration, Instant};

/// Pause before starting again a server that exited while starting.
const RESPAWN_DELAY: Duration = Duration::from_millis(100);

/// A server the kit can bring up.
pub(crate) trait Launch {
    /// The program's name, for errors.
    fn binary_name(&self) -> String;
    /// Where it listens, for errors.
    fn listen_address(&self) -> String;
    /// Starts one process (with a fresh log file) into [`Launch::process_mut`].
    fn spawn_once(&mut self) -> Result<()>;
    fn process_mut(&mut self) -> &mut Process;
    /// Whether it serves now; bounded in time by the probe itself.
    fn probe(&mut self) -> bool;
    /// The end of the current start's log.
    fn current_log_tail(&self) -> String;
}

/// How long and how often to probe, and what an early exit means.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub limit: Duration,
    pub interval: Duration,
    /// Start again a process that exits before it is ready. After a
    /// restart the previous process may hold the port for a moment, and a
    /// NATS or etcd server that cannot bind exits; the relay is not
    /// retried, since its early exit is what a test wants to see.
    pub respawn_on_exit: bool,
}

/// Spawns `server` and returns once it is ready; on failure nothing of it
/// is left running.
pub(crate) fn bring_up(server: &mut impl Launch, policy: Policy) -> Result<()> {
    let deadline = Instant::now() + policy.limit;
    let mut spawns = 0;
    for _ in 0..polls(policy.limit, RESPAWN_DELAY) {
        server.spawn_once()?;
        spawns += 1;
        let mut exited = false;
        for _ in 0..polls(policy.limit, policy.interval) {
            if server.probe() {
                return Ok(());
            }
            if let Some(status) = server.process_mut().exited() {
                if !policy.respawn_on_exit {
                    return Err(Error::Exited {
                        binary: server.binary_name(),
                        address: server.listen_address(),
                        status,
                        log_tail: server.current_log_tail(),
                    });
                }
                exited = true;
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(policy.interval);
        }
        if !exited || Instant::now() + RESPAWN_DELAY >= deadline {
            break;
        }
        std::thread::sleep(RESPAWN_DELAY);
    }
    server.process_mut().kill();
    Err(Error::NotReady {
        binary: server.binary_name(),
        address: server.listen_address(),
        limit: policy.limit,
        spawns,
        log_tail: server.current_log_tail(),
    })
}
