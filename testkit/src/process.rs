//! A child process owned by a guard: signalled only by the PID it was
//! spawned with, and only while that PID cannot have been reused (it is
//! not reaped yet); killed and reaped when the guard drops.

use crate::error::{io, Result};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How many polls at `interval` fit in `limit` (at least one): the count
/// bound of every wait loop, next to its deadline.
pub(crate) fn polls(limit: Duration, interval: Duration) -> u64 {
    let polls = limit.as_nanos() / interval.as_nanos().max(1);
    u64::try_from(polls).unwrap_or(u64::MAX).saturating_add(1)
}

/// How often a bounded wait for an exit looks again.
const EXIT_POLL: Duration = Duration::from_millis(10);
/// How long [`Process::pause`] waits for every thread to stop.
const PAUSE_LIMIT: Duration = Duration::from_secs(2);
/// How often [`Process::pause`] looks.
const PAUSE_POLL: Duration = Duration::from_millis(1);

/// Whether every thread of `pid` is stopped (state `T`), per /proc; false
/// if that cannot be read.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks {
        let Ok(task) = task else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return false;
        };
        // The state follows the command name, which may hold `)`.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if state != Some('T') {
            return false;
        }
        any = true;
    }
    any
}

/// The signals the kit sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGKILL: a crash, nothing flushed.
    Kill,
    /// SIGINT: Ctrl-C; nats-server flushes its JetStream store.
    Interrupt,
    /// SIGTERM: what a supervisor sends for a graceful stop.
    Terminate,
    /// SIGSTOP: connections stay open but nothing answers.
    Stop,
    /// SIGCONT after [`Signal::Stop`].
    Continue,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Kill => libc::SIGKILL,
            Signal::Interrupt => libc::SIGINT,
            Signal::Terminate => libc::SIGTERM,
            Signal::Stop => libc::SIGSTOP,
            Signal::Continue => libc::SIGCONT,
        }
    }

    /// The usual name, e.g. `SIGTERM`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Kill => "SIGKILL",
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
            Signal::Stop => "SIGSTOP",
            Signal::Continue => "SIGCONT",
        }
    }
}

/// Sends `signal` to `pid`.
///
/// Only for a child the caller spawned and has not reaped (waited for)
/// yet: after that, the PID may name an unrelated process. [`Process`]
/// keeps to this by itself; this is for children spawned elsewhere (e.g.
/// by tokio).
pub fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    let failed = |source| crate::Error::Io {
        what: format!("sending {} to PID {pid}", signal.name()),
        source,
    };
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| failed(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: kill(2) takes plain integers; which process it reaches is
    // the caller's promise above.
    if unsafe { libc::kill(pid, signal.number()) } == 0 {
        Ok(())
    } else {
        Err(failed(std::io::Error::last_os_error()))
    }
}

/// How a bounded stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Nothing was running.
    NotRunning,
    /// The process exited within the limit.
    Exited(ExitStatus),
    /// The limit passed; the process was killed.
    Killed,
}

/// A child process, or none yet (or no more).
///
/// Signals go to the PID only while the child is unreaped; once an exit
/// was seen (by [`Process::exited`], a stop or a kill) the child is gone
/// from the guard, so a recycled PID is never signalled.
#[derive(Debug, Default)]
pub struct Process {
    child: Option<Child>,
}

impl Process {
    /// Spawns `command`, first killing whatever this guard ran before, so a
    /// restart never leaves the previous process behind.
    pub fn spawn(&mut self, command: &mut Command) -> Result<()> {
        self.kill();
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command.spawn().map_err(io(format!("starting {program}")))?;
        self.child = Some(child);
        Ok(())
    }

    /// Takes ownership of a child spawned elsewhere (killing whatever this
    /// guard ran before).
    pub fn adopt(&mut self, child: Child) {
        self.kill();
        self.child = Some(child);
    }

    /// The running child's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the child exited; it is reaped and released.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Whether a child is running (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            // The child is unreaped, so its PID is still its own; a child
            // that already exited (a zombie) ignores the signal.
            let _ = send_signal(pid, signal);
        }
    }

    /// SIGKILL (which ends a paused process too), and wait until the
    /// process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = send_signal(child.id(), Signal::Kill);
            let _ = child.wait();
        }
    }

    /// `signal`, then wait up to `limit` for the exit; SIGKILL after that.
    pub fn stop(&mut self, signal: Signal, limit: Duration) -> Stopped {
        if !self.is_running() {
            return Stopped::NotRunning;
        }
        self.signal(signal);
        // A paused process would act on the signal only once running.
        self.signal(Signal::Continue);
        match self.wait_for_exit(limit) {
            Some(status) => Stopped::Exited(status),
            None => {
                self.kill();
                Stopped::Killed
            }
        }
    }

    /// Waits up to `limit` for the child to exit by itself: its status, or
    /// `None` if it is still running (or there is none).
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let polls = polls(limit, EXIT_POLL);
        for _ in 0..polls {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(EXIT_POLL);
        }
        self.exited()
    }

    /// SIGSTOP: its connections stay open but it does nothing. Returns
    /// once every thread has stopped (bounded by [`PAUSE_LIMIT`]): the
    /// kernel stops a process's threads one after another, and a thread
    /// woken by a connection before its turn would still answer it.
    pub fn pause(&self) {
        let Some(pid) = self.pid() else {
            return;
        };
        self.signal(Signal::Stop);
        let deadline = Instant::now() + PAUSE_LIMIT;
        for _ in 0..polls(PAUSE_LIMIT, PAUSE_POLL) {
            if all_threads_stopped(pid) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(PAUSE_POLL);
        }
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&self) {
        self.signal(Signal::Continue);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_cover_the_limit() {
        assert_eq!(
            polls(Duration::from_secs(1), Duration::from_millis(10)),
            101
        );
        assert_eq!(polls(Duration::ZERO, Duration::from_millis(10)), 1);
        assert_eq!(polls(Duration::from_secs(1), Duration::ZERO), 1_000_000_001);
    }

    /// The state letter of /proc/PID/stat: R, S, T (stopped), Z, ...
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    fn sleeper() -> Process {
        let mut process = Process::default();
        process.spawn(Command::new("sleep").arg("30")).unwrap();
        process
    }

    #[test]
    fn pause_stops_the_process_and_resume_lets_it_run() {
        let process = sleeper();
        let pid = process.pid().unwrap();
        process.pause();
        assert_eq!(state(pid), Some('T'));
        assert!(all_threads_stopped(pid));
        process.resume();
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(pid) == Some('T') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(state(pid), Some('R' | 'S')), "{:?}", state(pid));
    }

    #[test]
    fn drop_kills_and_reaps_even_a_paused_process() {
        let process = sleeper();
        let pid = process.pid().unwrap();
        process.pause();
        drop(process);
        // Reaped, so not even a zombie is left under this PID.
        assert_eq!(state(pid), None);
    }

    #[test]
    fn a_stop_signal_that_is_ignored_ends_in_a_kill() {
        let mut process = Process::default();
        process
            .spawn(Command::new("sh").args(["-c", "trap '' TERM; exec sleep 30"]))
            .unwrap();
        // Once the shell became `sleep`, the ignored SIGTERM came along.
        let comm = format!("/proc/{}/comm", process.pid().unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&comm).unwrap_or_default() != "sleep\n"
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            process.stop(Signal::Terminate, Duration::from_millis(200)),
            Stopped::Killed
        );
        assert_eq!(process.pid(), None);
        assert_eq!(
            process.stop(Signal::Terminate, Duration::ZERO),
            Stopped::NotRunning
        );
    }

    #[test]
    fn a_paused_process_still_acts_on_a_stop_signal() {
        let mut process = sleeper();
        process.pause();
        let stopped = process.stop(Signal::Terminate, Duration::from_secs(5));
        assert!(matches!(stopped, Stopped::Exited(_)), "{stopped:?}");
    }

    #[test]
    fn an_exit_is_seen_and_the_pid_is_released() {
        let mut process = Process::default();
        process.spawn(&mut Command::new("true")).unwrap();
        let status = process.wait_for_exit(Duration::from_secs(5)).unwrap();
        assert!(status.success());
        assert_eq!(process.pid(), None);
        assert!(!process.is_running());
    }
}
