//! Keeps the relay's Unix socket file where clients look for it.
//!
//! Clients find the relay by the socket's path. If the file is removed
//! while the relay runs (a cleanup script, `rm -rf /run/holdfast/*`), the
//! listener still works but nobody can reach it; if it is replaced, new
//! clients reach whoever replaced it. Every second the guard checks the
//! path: a removed socket is bound again (new connections are served as
//! before), a replaced one is left alone and the relay reports itself not
//! ready (`/readyz` 503, with the reason) until the path is its own again.

use crate::context::RelayContext;
use crate::front::unix;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// How often the path is checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What the guard found wrong with the socket file, if anything.
#[derive(Default)]
pub struct SocketHealth {
    problem: Mutex<Option<String>>,
}

impl SocketHealth {
    /// Why new clients cannot reach the relay through its socket path.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|problem| problem.clone())
    }

    fn set(&self, problem: Option<String>) {
        if let Ok(mut slot) = self.problem.lock() {
            *slot = problem;
        }
    }
}

/// Where the socket is and how to bind it again.
pub struct Guarded {
    pub path: PathBuf,
    pub mode: u32,
    pub group: String,
    /// The socket file the relay bound.
    pub identity: (u64, u64),
}

/// Checks the socket path until `stop` fires.
pub async fn guard(
    mut socket: Guarded,
    ctx: Arc<RelayContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
    health: Arc<SocketHealth>,
) {
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let path = socket.path.display().to_string();
        match std::fs::symlink_metadata(&socket.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) == socket.identity => {
                if health.problem().is_some() {
                    info!(socket = %path, "the socket file is the relay's again; ready");
                    health.set(None);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                warn!(socket = %path, "the socket file was removed while the relay runs; binding it again");
                match unix::bind(&socket.path, socket.mode, &socket.group) {
                    Ok(bound) => {
                        if let Some(identity) = unix::file_identity(&socket.path) {
                            socket.identity = identity;
                        }
                        tracker.spawn(unix::serve(
                            bound,
                            socket.path.clone(),
                            ctx.clone(),
                            tracker.clone(),
                            stop.clone(),
                        ));
                        health.set(None);
                    }
                    Err(bind_error) => {
                        let problem = format!("the socket file {path} was removed and cannot be bound again: {bind_error}");
                        if health.problem().as_deref() != Some(problem.as_str()) {
                            error!(socket = %path, error = %bind_error, "cannot bind the removed socket again; not ready");
                        }
                        health.set(Some(problem));
                    }
                }
            }
            Ok(_) | Err(_) => {
                let problem = format!(
                    "the socket file {path} was replaced by another file; new clients do not reach this relay"
                );
                if health.problem().as_deref() != Some(problem.as_str()) {
                    error!(socket = %path, "the socket file was replaced by another file; left alone, and the relay reports itself not ready until the path is its own again");
                }
                health.set(Some(problem));
            }
        }
    }
}
