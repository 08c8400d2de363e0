//! SIGINT and SIGTERM: how a long-running verb (`register`, `watch`) is
//! asked to stop cleanly.
//!
//! Handlers are installed explicitly, before the verb does anything worth
//! undoing, because SIGTERM's default action would end the process without
//! the clean-up (e.g. deregistering) the verb promises.

use tokio::signal::unix::{signal, Signal, SignalKind};

pub(crate) struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    /// From now on SIGINT and SIGTERM no longer end the process; they
    /// complete [`StopSignals::recv`] instead.
    pub(crate) fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Installs the handlers, or explains on stderr why they could not be.
pub(crate) fn install_or_report() -> Option<StopSignals> {
    match StopSignals::install() {
        Ok(signals) => Some(signals),
        Err(error) => {
            eprintln!("error: cannot install the SIGINT/SIGTERM handlers: {error}");
            None
        }
    }
}
