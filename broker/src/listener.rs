//! The Unix socket: binding it safely and accepting connections.
//!
//! A socket file left by a relay that died is replaced; a socket a live
//! relay still answers on is not, so two relays never fight over one path.

use crate::session::{self, SessionContext};
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another holdfastd is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create the socket directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds `path` with permission bits `mode`, replacing a stale socket file.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|source| ListenError::Directory {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_path_buf()));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::AlreadyRunning(path.to_path_buf()));
            }
            info!(socket = %path.display(), "replacing stale socket file");
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    let bind_error = |source| ListenError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    Ok(listener)
}

/// Accepts connections until `stop` fires, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    ctx: Arc<SessionContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tracker.spawn(session::run(stream, ctx.clone()));
                }
                Err(error) if error.kind() == ErrorKind::ConnectionAborted => {}
                Err(error) => {
                    // Typically out of file descriptors: back off instead of
                    // spinning, and keep serving the sessions we have.
                    error!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    if let Err(error) = std::fs::remove_file(&path) {
        warn!(socket = %path.display(), %error, "could not remove the socket file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_but_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/holdfast.sock");
        let live = bind(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(
            bind(&path, 0o660),
            Err(ListenError::AlreadyRunning(_))
        ));
        drop(live);
        // The file is still there, but nobody answers: it is stale.
        assert!(path.exists());
        assert!(bind(&path, 0o600).is_ok());
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holdfast.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            bind(&path, 0o660),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
