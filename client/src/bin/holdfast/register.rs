//! `holdfast register KEY VALUE`: registers a key through the relay and
//! holds it until SIGINT or SIGTERM, reporting etcd link changes meanwhile.
//!
//! The registration lives as long as this process's session with the relay,
//! which is the point: a service's wrapper script can run this next to the
//! service and the key disappears when the wrapper dies.

use crate::signals;
use clap::Args;
use holdfast_client::{Client, ErrorCode, LinkEvent, LinkStatus, RegistrationStatus, Service};
use std::io::Write;
use std::process::ExitCode;
use tokio::sync::broadcast::error::RecvError;

/// Replaced in KEY by the instance id in lowercase hex.
const INSTANCE_ID_PLACEHOLDER: &str = "{instance_id}";

#[derive(Debug, Args)]
#[command(after_help = "\
Output (stdout, one line each): `instance_id <hex>`, `key <key>`, \
`registered: applied|buffered`, then one line per change while held \
(`etcd down: registration held by the relay`, `etcd up`, `relay lost: ...`, \
`relay connected: ...`), and `deregistered: applied|buffered` after SIGINT \
or SIGTERM, which exits 0. A key another live session holds is refused \
(`error: conflict (not retryable): ...`, exit 1), also when that happens \
while registering it again after a reconnect.

Example: holdfast register 'workers/decode/{instance_id}' 10.0.0.7:9000")]
pub(crate) struct RegisterArgs {
    /// Key to register. `{instance_id}` in it is replaced by this process's
    /// instance id in lowercase hex, e.g. `workers/decode/{instance_id}`.
    key: String,
    /// Value to store under the key.
    value: String,
}

pub(crate) async fn run(client: &Client, args: RegisterArgs) -> ExitCode {
    let Some(mut stop) = signals::install_or_report() else {
        return ExitCode::FAILURE;
    };
    let instance_id = client.instance_id();
    let key = instance_key(&args.key, instance_id);
    // Subscribed before registering, so no change after the answer is missed.
    let mut events = client.link_events();
    let status = match client.register(key.clone(), args.value).await {
        Ok(status) => status,
        Err(error) => return crate::fail(&error),
    };
    say(&format!("instance_id {instance_id:x}"));
    say(&format!("key {key}"));
    say(&format!("registered: {}", status_name(status)));
    loop {
        tokio::select! {
            () = stop.recv() => break,
            event = events.recv() => match event {
                Ok(event) => {
                    if let Some((code, message)) = refusal(&event, &key) {
                        // Refused again after a reconnect: nothing is held
                        // any more, which a wrapper script must notice.
                        eprintln!(
                            "error: {code} ({}): {message}",
                            crate::retryability(code.is_retryable())
                        );
                        return ExitCode::FAILURE;
                    }
                    if let Some(line) = describe(&event) {
                        say(line);
                    }
                }
                // Missed events are only missed lines; the state is current.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => {
                    eprintln!("error: the connection to the relay closed");
                    return ExitCode::FAILURE;
                }
            },
        }
    }
    match client.deregister(key).await {
        Ok(status) => {
            say(&format!("deregistered: {}", status_name(status)));
            ExitCode::SUCCESS
        }
        Err(error) => crate::fail(&error),
    }
}

fn instance_key(key: &str, instance_id: u64) -> String {
    key.replace(INSTANCE_ID_PLACEHOLDER, &format!("{instance_id:x}"))
}

fn status_name(status: RegistrationStatus) -> &'static str {
    match status {
        RegistrationStatus::Applied => "applied",
        RegistrationStatus::Buffered => "buffered",
    }
}

/// The line for a link change that matters to a held registration.
fn describe(event: &LinkEvent) -> Option<&'static str> {
    match event {
        LinkEvent::Upstream {
            service: Service::Etcd,
            status: LinkStatus::Up,
        } => Some("etcd up"),
        LinkEvent::Upstream {
            service: Service::Etcd,
            status: LinkStatus::Down,
        } => Some("etcd down: registration held by the relay"),
        LinkEvent::RelayLost { .. } => {
            Some("relay lost: registration will be sent again on reconnect")
        }
        LinkEvent::RelayConnected { .. } => Some("relay connected: registration sent again"),
        _ => None,
    }
}

/// The relay's refusal of `key`, if `event` is one: the client library
/// reports a registration refused without a caller waiting (one sent again
/// after a reconnect) as a relay error naming the key.
fn refusal<'a>(event: &'a LinkEvent, key: &str) -> Option<(ErrorCode, &'a str)> {
    match event {
        LinkEvent::RelayError { code, message }
            if message.starts_with(&format!("registration of {key} refused")) =>
        {
            Some((*code, message))
        }
        _ => None,
    }
}

/// One line on stdout, flushed. Failing to write (nobody reads any more) is
/// no reason to drop the registration, so errors are ignored.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_of_this_key_is_recognised_and_others_are_not() {
        let refused = LinkEvent::RelayError {
            code: ErrorCode::Conflict,
            message: "registration of w/1 refused: `w/1` is held by another live session (3)"
                .to_string(),
        };
        assert_eq!(
            refusal(&refused, "w/1").map(|(code, _)| code),
            Some(ErrorCode::Conflict)
        );
        assert_eq!(refusal(&refused, "w/2"), None);
        let other = LinkEvent::RelayError {
            code: ErrorCode::SlowConsumer,
            message: "dropped 3 messages".to_string(),
        };
        assert_eq!(refusal(&other, "w/1"), None);
    }

    #[test]
    fn the_instance_id_placeholder_becomes_lowercase_hex() {
        assert_eq!(
            instance_key("workers/{instance_id}/x", 0xAB12),
            "workers/ab12/x"
        );
        assert_eq!(instance_key("plain", 7), "plain");
    }

    #[test]
    fn only_etcd_and_relay_changes_are_described() {
        assert_eq!(
            describe(&LinkEvent::Upstream {
                service: Service::Nats,
                status: LinkStatus::Down
            }),
            None
        );
        assert_eq!(
            describe(&LinkEvent::Upstream {
                service: Service::Etcd,
                status: LinkStatus::Down
            }),
            Some("etcd down: registration held by the relay")
        );
    }
}
