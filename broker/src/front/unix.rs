//! The Unix socket: binding it safely and accepting connections.
//!
//! A socket file left by a relay that died is replaced; a socket a live
//! relay still answers on is not, so two relays never fight over one path.
//! The file's mode and group decide who may connect; each connection holds
//! one of the relay's connection permits and is identified by the kernel's
//! peer credentials.

use crate::context::RelayContext;
use crate::front::accept_pressure::{self, AcceptFailures, RefusalLog};
use crate::front::fd_budget::REFUSALS_IN_FLIGHT;
use crate::front::peer::Peer;
use crate::ops::stats::Limit;
use crate::session;
use holdfast_wire::{encode, ErrorCode, Frame, GoAway, Text};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

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
    #[error("socket group {group:?} does not exist")]
    UnknownGroup { group: String },
    #[error("cannot give {path} to group {group:?}: {source}")]
    Chown {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
}

/// Binds `path` with permission bits `mode` and group `group` (a name or a
/// numeric id; empty keeps the relay's), replacing a stale socket file.
pub fn bind(path: &Path, mode: u32, group: &str) -> Result<UnixListener, ListenError> {
    let gid = if group.is_empty() {
        None
    } else {
        Some(group_id(group)?)
    };
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        let created = !parent.exists();
        std::fs::create_dir_all(parent).map_err(|source| ListenError::Directory {
            path: parent.to_path_buf(),
            source,
        })?;
        // The relay runs with umask 077; clients of the socket's group must
        // still reach it through a directory the relay made.
        if created {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| ListenError::Directory {
                    path: parent.to_path_buf(),
                    source,
                },
            )?;
        }
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
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| ListenError::Chown {
            path: path.to_path_buf(),
            group: group.to_string(),
            source,
        })?;
    }
    Ok(listener)
}

/// The id of group `group`, given by name or number.
fn group_id(group: &str) -> Result<u32, ListenError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || ListenError::UnknownGroup {
        group: group.to_string(),
    };
    let name = std::ffi::CString::new(group).map_err(|_| unknown())?;
    let mut entry = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `name` is NUL-terminated,
    // `entry` and `buffer` are writable and sized as passed, and `found`
    // receives either null or a pointer to `entry`.
    let status = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            entry.as_mut_ptr(),
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return Err(unknown());
    }
    // SAFETY: getgrnam_r succeeded and filled `entry` (found == &entry).
    Ok(unsafe { entry.assume_init() }.gr_gid)
}

/// The file a path names: device and inode.
pub fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|metadata| (metadata.dev(), metadata.ino()))
}

/// Accepts connections until `stop` fires, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    ctx: Arc<RelayContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let own_identity = file_identity(&path);
    let mut failures = AcceptFailures::new(accept_pressure::Listener::Unix);
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut refused = RefusalLog::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    failures.accepted();
                    let peer = Peer::of_unix_stream(&stream);
                    let Ok(permit) = ctx.connection_permits.clone().try_acquire_owned() else {
                        ctx.stats.record_limit(Limit::Connections);
                        refused.refused("unix", ctx.config.sessions.max_connections);
                        // Telling it why holds its descriptor for a moment;
                        // past a few at once, it is just closed.
                        if let Ok(answering) = refusals.clone().try_acquire_owned() {
                            tracker.spawn(turn_away(stream, peer, ctx.clone(), answering));
                        }
                        continue;
                    };
                    let (read_half, write_half) = stream.into_split();
                    let session = session::run(Box::new(read_half), Box::new(write_half), peer, ctx.clone());
                    tracker.spawn(async move {
                        session.await;
                        drop(permit);
                    });
                }
                Err(error) => failures.pause(&error, &stop).await,
            },
        }
    }
    drop(listener);
    // Only the relay's own socket: the path may have been replaced (the
    // socket guard then left it alone) or bound again by the guard, whose
    // listener removes it.
    let ours = match (file_identity(&path), own_identity) {
        (Some(now), Some(own)) => now == own,
        _ => false,
    };
    if ours {
        if let Err(error) = std::fs::remove_file(&path) {
            warn!(socket = %path.display(), %error, "could not remove the socket file");
        }
    }
}

/// Tells a connection over `sessions.max_connections` why it is closed.
async fn turn_away(
    mut stream: tokio::net::UnixStream,
    peer: Peer,
    ctx: Arc<RelayContext>,
    _answering: OwnedSemaphorePermit,
) {
    debug!(%peer, "connection refused: sessions.max_connections reached");
    let max = ctx.config.sessions.max_connections;
    let go_away = Frame::GoAway(GoAway {
        code: ErrorCode::LimitExceeded,
        message: Text::from(format!(
            "the relay is at sessions.max_connections ({max} connections)"
        )),
    });
    let mut bytes = bytes::BytesMut::new();
    if encode(&go_away, ctx.config.relay.max_frame_bytes, &mut bytes).is_ok() {
        let answer = async {
            stream.write_all(&bytes).await?;
            stream.shutdown().await?;
            // Closing a socket with unread bytes in it (the client's HELLO)
            // makes the kernel reset the connection, and the client then
            // sees "broken pipe" instead of the GO_AWAY: read what it sent
            // until it closes too.
            let mut sink = [0u8; 4096];
            let mut taken = 0usize;
            while taken < REFUSAL_DRAIN_BYTES {
                let read = stream.read(&mut sink).await?;
                if read == 0 {
                    break;
                }
                taken += read;
            }
            Ok::<(), std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
    }
}

/// The most a refused connection's bytes are read before it is closed.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_but_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/holdfast.sock");
        let live = bind(&path, 0o660, "").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(
            bind(&path, 0o660, ""),
            Err(ListenError::AlreadyRunning(_))
        ));
        drop(live);
        // The file is still there, but nobody answers: it is stale.
        assert!(path.exists());
        assert!(bind(&path, 0o600, "").is_ok());
    }

    #[tokio::test]
    async fn the_socket_gets_the_configured_group_by_name_or_number() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let own_gid = unsafe { libc::getegid() };
        let path = dir.path().join("numeric.sock");
        let _listener = bind(&path, 0o660, &own_gid.to_string()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), own_gid);
        assert!(matches!(
            bind(&dir.path().join("x.sock"), 0o660, "no-such-group-holdfast"),
            Err(ListenError::UnknownGroup { .. })
        ));
        // "root" exists on every Linux system; naming it resolves to 0.
        assert_eq!(group_id("root").unwrap(), 0);
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holdfast.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            bind(&path, 0o660, ""),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
