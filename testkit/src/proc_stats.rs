//! Readings of a running process from /proc: resident and peak memory, CPU
//! time and bytes written — what the bench reports and what the memory and
//! journal tests bound.

use crate::error::{Error, Result};
use std::time::Duration;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|error| Error::Proc {
        path: path.to_string(),
        detail: error.to_string(),
    })
}

/// A `Name: value kB` line of /proc/PID/status, in KiB (e.g. `VmRSS`,
/// `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    read(&path)?
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .ok_or_else(|| Error::Proc {
            path,
            detail: format!("no {field} field"),
        })
}

/// Resident memory now, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// The most resident memory so far (high-water mark), in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM")
}

/// User + system CPU time so far (every thread), in clock ticks, and the
/// ticks per second.
fn cpu_ticks(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after its last `)` start with field 3, so utime (14) and
    // stime (15) are the 12th and 13th of them.
    let after_name = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse().ok())
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match (ticks.as_slice(), u64::try_from(per_second)) {
        ([user, system], Ok(per_second)) if per_second > 0 => Ok((user + system, per_second)),
        _ => Err(Error::Proc {
            path,
            detail: "no utime and stime fields".to_string(),
        }),
    }
}

/// CPU time (user + system, every thread) so far, in seconds; clock-tick
/// resolution (10 ms on most kernels).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let (ticks, per_second) = cpu_ticks(pid)?;
    Ok(ticks as f64 / per_second as f64)
}

/// As [`cpu_seconds`], as a `Duration` (whole milliseconds).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let (ticks, per_second) = cpu_ticks(pid)?;
    Ok(Duration::from_millis(ticks * 1000 / per_second))
}

/// Bytes passed to write(2) and its kin so far, files and sockets alike
/// (`wchar` of /proc/PID/io).
pub fn bytes_written(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/io");
    read(&path)?
        .lines()
        .find_map(|line| line.strip_prefix("wchar: "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| Error::Proc {
            path,
            detail: "no wchar field".to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn reads_own_memory() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(peak_rss_kib(pid).unwrap() > 0);
        assert!(status_kib(pid, "NoSuchField").is_err());
    }

    #[test]
    fn reads_own_cpu_time_as_it_grows() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).unwrap();
        // Spin until the clock-tick counter moves (bounded: a few ticks).
        let started = Instant::now();
        let mut spins = 0u64;
        while started.elapsed() < Duration::from_millis(200) {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        let after = cpu_seconds(pid).unwrap();
        assert!(
            after > before,
            "{before} s then {after} s after 200 ms of spinning"
        );
        assert!(cpu_time(pid).unwrap() >= Duration::from_secs_f64(before));
        assert!(cpu_seconds(u32::MAX).is_err());
    }

    #[test]
    fn counts_own_writes() {
        let pid = std::process::id();
        let before = bytes_written(pid).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), [0u8; 4096]).unwrap();
        assert!(bytes_written(pid).unwrap() >= before + 4096);
    }
}
