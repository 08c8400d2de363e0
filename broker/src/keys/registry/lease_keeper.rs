//! Keeps one session's etcd lease alive, and says when etcd lost it.
//!
//! One small task per lease renews it every third of its TTL over etcd's
//! keep-alive stream. While etcd is unreachable it waits for the link to
//! come back rather than spin; when etcd answers that the lease is gone
//! (TTL 0: it expired, or etcd came back without its data) the registry is
//! told, grants a new lease and writes the session's keys again.

use super::model::{LeaseId, SessionId};
use crate::keys::etcd::link::EtcdLink;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::debug;

/// Renews `lease` until the task is aborted or etcd says the lease is gone.
pub async fn keep_alive(
    link: EtcdLink,
    session: SessionId,
    lease: LeaseId,
    ttl: Duration,
    answer_timeout: Duration,
    lost: mpsc::UnboundedSender<(SessionId, LeaseId)>,
) {
    let interval = ttl / 3;
    let mut state = link.watch();
    loop {
        let client = match state.wait_for(|state| state.client.is_some()).await {
            Ok(state) => state.client.clone(),
            // The link task is gone: the relay is stopping.
            Err(_) => return,
        };
        let Some(mut client) = client else {
            continue;
        };
        if let Ok((mut keeper, mut answers)) = client.lease_keep_alive(lease).await {
            loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(answer_timeout, answers.message()).await {
                    Ok(Ok(Some(answer))) if answer.ttl() <= 0 => {
                        debug!(session, lease, "etcd no longer has the session's lease");
                        let _ = lost.send((session, lease));
                        return;
                    }
                    Ok(Ok(Some(_))) => {}
                    // The stream broke or etcd is slow: start a new stream
                    // once the link is up again (on whichever member it
                    // moved to).
                    _ => {
                        link.call_failed();
                        break;
                    }
                }
                tokio::time::sleep(interval).await;
            }
        }
        tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
    }
}
