//! A local NATS leaf node in front of the measured nats-server (the hub):
//! what an operator deploys on a node instead of holdfast. The hub listens
//! for leaf connections, the leaf connects to it as a `nats-leaf://`
//! remote, and a publisher on the leaf reaches subscribers on the hub
//! through that one connection.
//!
//! The leaf learns which subjects the hub has subscribers for over the same
//! connection, a moment after they subscribed; a message published on the
//! leaf before then goes nowhere. [`wait_for_interest`] waits for that.

use crate::error::{BenchError, Context, Result};
use crate::harness::NatsServer;
use bytes::Bytes;
use futures::StreamExt;
use std::time::{Duration, Instant};

/// How long the leaf connection and a subscription's interest may take to
/// reach the leaf.
const INTEREST_LIMIT: Duration = Duration::from_secs(15);
/// How long one probe request waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between probes answered "no responders".
const PROBE_PAUSE: Duration = Duration::from_millis(10);

/// The hub's configuration: accept leaf connections on `leaf_port`.
pub fn hub_config(leaf_port: u16) -> String {
    format!("leafnodes {{\n  listen: \"127.0.0.1:{leaf_port}\"\n}}\n")
}

/// The leaf's configuration: one remote, the hub's leaf port.
fn leaf_config(hub_leaf_port: u16) -> String {
    format!(
        "leafnodes {{\n  remotes [\n    {{ url: \"nats-leaf://127.0.0.1:{hub_leaf_port}\" }}\n  ]\n}}\n"
    )
}

/// A leaf nats-server connected to a hub, and an async-nats publisher
/// connected to the leaf. The server is killed when this is dropped.
pub struct LeafNode {
    /// Held for its `Drop`, which kills the leaf.
    _server: NatsServer,
    pub publisher: async_nats::Client,
}

impl LeafNode {
    /// Starts a leaf whose remote is the hub's leaf port and connects a
    /// publisher to it. The leaf connection may still be coming up:
    /// [`wait_for_interest`] covers that too.
    pub async fn start(hub_leaf_port: u16) -> Result<LeafNode> {
        let server = NatsServer::start_with(false, Some(leaf_config(hub_leaf_port))).await?;
        let publisher = async_nats::connect(server.url())
            .await
            .context("connecting the publisher to the leaf node")?;
        Ok(LeafNode {
            _server: server,
            publisher,
        })
    }
}

/// Returns once the leaf knows of every subscription the hub had when this
/// was called — the hub connection `hub` must be a client of the hub, and
/// the subscriptions that matter must have been confirmed by a round trip
/// on their own connections before.
///
/// A responder subscribes on the hub after them, so the hub sends the
/// leaf its interest after theirs over the same leaf connection; a request
/// from the leaf that the responder answers proves the leaf has it. Until
/// then the leaf answers "no responders" (or, before the leaf connection
/// is up, nothing at all), and the probe is repeated, bounded in time.
pub async fn wait_for_interest(
    leaf_publisher: &async_nats::Client,
    hub: &async_nats::Client,
    subject: &str,
) -> Result<()> {
    let probe_subject = format!("{subject}.leaf-interest-probe");
    let mut probes = hub
        .subscribe(probe_subject.clone())
        .await
        .context("subscribing the interest probe on the hub")?;
    crate::scenarios::load::nats_round_trip(hub).await?;
    let responder_client = hub.clone();
    let responder = tokio::spawn(async move {
        while let Some(request) = probes.next().await {
            if let Some(reply) = request.reply {
                let _ = responder_client.publish(reply, Bytes::new()).await;
                let _ = responder_client.flush().await;
            }
        }
    });
    let deadline = Instant::now() + INTEREST_LIMIT;
    let mut attempts = 0u32;
    let outcome = loop {
        attempts += 1;
        let answer = tokio::time::timeout(
            PROBE_TIMEOUT,
            leaf_publisher.request(probe_subject.clone(), Bytes::new()),
        )
        .await;
        match answer {
            Ok(Ok(_)) => break Ok(()),
            Ok(Err(_)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(PROBE_PAUSE).await;
            }
            Ok(Err(error)) => {
                break Err(BenchError::Timeout(format!(
                    "the leaf node to learn the hub's interest in {subject} ({attempts} probes, \
                     last: {error})"
                )))
            }
            Err(_) => {
                break Err(BenchError::Timeout(format!(
                    "the leaf node to learn the hub's interest in {subject} ({attempts} probes, \
                     last: no answer)"
                )))
            }
        }
    };
    responder.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_the_leaf_port() {
        assert!(hub_config(7422).contains("listen: \"127.0.0.1:7422\""));
        assert!(leaf_config(7422).contains("url: \"nats-leaf://127.0.0.1:7422\""));
    }
}
