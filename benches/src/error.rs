//! The bench's error type: which step failed and why.

use std::fmt::Display;

/// Why a scenario (or the whole run) could not produce a figure.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A step failed; `what` names the step, `detail` the cause.
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    /// Something the bench waits for did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A required program is missing.
    #[error("{0}")]
    Missing(String),
    /// Starting, stopping or reading a server failed; the kit's message
    /// names the binary, its address and the end of its log.
    #[error(transparent)]
    Processes(#[from] holdfast_testkit::Error),
}

/// `Result` with [`BenchError`].
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Attaches the name of the failed step to any displayable error.
pub trait Context<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|error| BenchError::Step {
            what: what.to_string(),
            detail: error.to_string(),
        })
    }
}

/// A failed step whose cause the bench found itself.
pub fn failed(what: &str, detail: impl Display) -> BenchError {
    BenchError::Step {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}
