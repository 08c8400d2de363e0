//! Open-file limits of a process under test: fixed at its start (as
//! `prlimit --nofile=N:N holdfastd ...` would) or lowered while it runs, to
//! drive the relay into descriptor exhaustion.

use crate::error::{Error, Result};
use std::process::Command;

/// Makes `command` start with RLIMIT_NOFILE at `limit` (soft and hard).
pub(crate) fn start_with_open_file_limit(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: runs in the child between fork and exec, and calls only
    // setrlimit, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Sets the soft open-file limit of running process `pid` to `soft`
/// (capped at its hard limit, which stays).
pub fn set_open_file_soft_limit(pid: u32, soft: u64) -> Result<()> {
    let failed = |source| Error::Io {
        what: format!("setting the open-file limit of PID {pid}"),
        source,
    };
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| failed(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only writes `current`, a valid
    // pointer to an rlimit.
    let read = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut current) };
    if read != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    let wanted = libc::rlimit {
        rlim_cur: soft.min(current.rlim_max),
        rlim_max: current.rlim_max,
    };
    // SAFETY: prlimit reads `wanted`, a valid rlimit, and writes nothing.
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &wanted, std::ptr::null_mut()) };
    if set != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft "Max open files" of `pid`, from /proc.
    fn soft_limit(pid: u32) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .unwrap();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    }

    #[test]
    fn a_limit_set_at_start_and_one_lowered_later_show_in_proc() {
        let mut command = Command::new("sleep");
        command.arg("30");
        start_with_open_file_limit(&mut command, 64);
        let mut process = crate::Process::default();
        process.spawn(&mut command).unwrap();
        let pid = process.pid().unwrap();
        assert_eq!(soft_limit(pid), 64);
        set_open_file_soft_limit(pid, 32).unwrap();
        assert_eq!(soft_limit(pid), 32);
    }
}
