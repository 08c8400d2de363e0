//! What can go wrong while running the processes: each variant names the
//! binary, where it listens and, for a failed start or stop, the end of its
//! log, so a failure report needs no digging through temp dirs.

use std::ops::Range;
use std::process::ExitStatus;
use std::time::Duration;

/// Why the kit could not start, probe, stop or measure a process.
#[derive(thiserror::Error)]
pub enum Error {
    /// A program to run is not installed.
    #[error("{binary} not found in {searched} (deploy/install-deps.sh installs it) and {env} is not set")]
    Missing {
        binary: String,
        env: String,
        searched: String,
    },
    /// Every port of the range is in use or was handed out already.
    #[error("no free loopback port in {range:?}")]
    NoFreePort { range: Range<u16> },
    /// A file, directory or spawn failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The process ran but did not answer its readiness probe in time.
    #[error(
        "{binary} did not become ready at {address} within {limit:?} ({spawns} start(s)); \
         the end of its log:\n{log_tail}"
    )]
    NotReady {
        binary: String,
        address: String,
        limit: Duration,
        spawns: u32,
        log_tail: String,
    },
    /// The process exited before it became ready.
    #[error("{binary} (at {address}) exited with {status} before it was ready; the end of its log:\n{log_tail}")]
    Exited {
        binary: String,
        address: String,
        status: ExitStatus,
        log_tail: String,
    },
    /// The process outlived `signal` by `limit` and was killed.
    #[error("{binary} (at {address}) ignored {signal} for {limit:?} and was killed; the end of its log:\n{log_tail}")]
    DidNotStop {
        binary: String,
        address: String,
        signal: &'static str,
        limit: Duration,
        log_tail: String,
    },
    /// The process was expected to exit by itself and did not.
    #[error("{binary} (at {address}) did not exit by itself within {limit:?}; the end of its log:\n{log_tail}")]
    DidNotExit {
        binary: String,
        address: String,
        limit: Duration,
        log_tail: String,
    },
    /// A reading of a process that is not running (never started, killed,
    /// or exited).
    #[error("{binary} is not running")]
    NotRunning { binary: String },
    /// A /proc file could not be read or parsed.
    #[error("reading {path}: {detail}")]
    Proc { path: String, detail: String },
    /// A plain HTTP GET failed before a response was read.
    #[error("GET http://{address}{path}: {detail}")]
    Http {
        address: String,
        path: String,
        detail: String,
    },
}

// `expect` and `fn main() -> Result` print `Debug`; a log tail with its
// newlines escaped would be unreadable, so `Debug` is the message itself.
impl std::fmt::Debug for Error {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, formatter)
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with the step that failed.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
