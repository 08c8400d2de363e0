//! systemd integration: READY/STATUS/STOPPING notifications and the watchdog.
//!
//! The sd_notify protocol is one datagram of `KEY=value` lines to the socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace) — a few lines we own rather than a crate. Without
//! `$NOTIFY_SOCKET` every call is a no-op, so the relay runs the same under
//! systemd, Kubernetes or a shell.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;
use tracing::{debug, warn};

/// A handle to the service manager, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; a malformed value is logged and ignored.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        let path = path.to_string_lossy().into_owned();
        match connect(&path) {
            Ok(socket) => Notifier {
                socket: Some(socket),
            },
            Err(error) => {
                warn!(notify_socket = %path, %error, "cannot use NOTIFY_SOCKET; systemd will not hear from holdfastd");
                Notifier { socket: None }
            }
        }
    }

    /// Sends one notification, e.g. `"READY=1"` or `"STATUS=nats up"`.
    pub fn notify(&self, state: &str) {
        if let Some((socket, address)) = &self.socket {
            if let Err(error) = socket.send_to_addr(state.as_bytes(), address) {
                debug!(%error, state, "sd_notify failed");
            }
        }
    }

    /// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the
    /// watchdog is enabled for this process.
    pub fn watchdog_interval() -> Option<Duration> {
        watchdog_interval_from(
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::process::id(),
        )
    }
}

/// [`Notifier::watchdog_interval`] from the two variables' values.
fn watchdog_interval_from(pid: Option<&str>, usec: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim() != own_pid.to_string() {
            return None;
        }
    }
    let micros: u64 = usec?.trim().parse().ok()?;
    // A zero period would stop the reporting task (tokio's interval panics
    // on it), and 1 µs halves to zero.
    let half = Duration::from_micros(micros / 2);
    (!half.is_zero()).then_some(half)
}

fn connect(path: &str) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
    let address = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => std::os::unix::net::SocketAddr::from_pathname(path)?,
    };
    Ok((UnixDatagram::unbound()?, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_arrive_as_datagrams_on_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let (socket, address) = connect(path.to_str().unwrap()).unwrap();
        let notifier = Notifier {
            socket: Some((socket, address)),
        };
        notifier.notify("READY=1\nSTATUS=ok");
        let mut buffer = [0u8; 64];
        let read = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..read], b"READY=1\nSTATUS=ok");
    }

    #[test]
    fn the_watchdog_interval_is_half_the_period_and_never_zero() {
        let interval = |pid, usec| watchdog_interval_from(pid, usec, 42);
        assert_eq!(
            interval(None, Some("10000000")),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            interval(Some("42"), Some(" 2000 ")),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            interval(Some("41"), Some("2000")),
            None,
            "another process's"
        );
        assert_eq!(interval(None, None), None);
        assert_eq!(interval(None, Some("x")), None);
        assert_eq!(interval(None, Some("0")), None);
        assert_eq!(interval(None, Some("1")), None, "halves to zero");
    }

    #[test]
    fn abstract_names_are_accepted() {
        assert!(connect("@holdfast-test-notify").is_ok());
    }
}
