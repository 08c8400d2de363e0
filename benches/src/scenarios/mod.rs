//! The scenarios, one per file, and what they share: run settings and the
//! relay configuration they measure.

pub mod discovery;
pub mod footprint;
pub mod journal;
pub mod latency;
pub mod load;
pub mod outage;
pub mod publish;
pub mod replay;

/// How a run is sized.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Smaller message counts, so that `all --quick` takes minutes.
    pub quick: bool,
    /// Repetitions each figure is the median of.
    pub repetitions: u32,
}

impl Settings {
    /// `quick` in quick mode, else `full`.
    pub fn pick(&self, quick: u64, full: u64) -> u64 {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// The relay configuration every scenario measures: production defaults
/// (`kv_events` durable, the other classes spill), with the journal budget of
/// `kv_events` raised so that 5 million 256-byte messages fit.
pub const RELAY_CONFIG: &str = r#"
[classes.kv_events]
durability = "durable"
max_bytes = 17179869184
"#;

/// "1.2M" / "200k" / "500" for notes.
pub fn count_words(count: u64) -> String {
    if count >= 1_000_000 && count % 100_000 == 0 {
        format!("{}M", count as f64 / 1e6)
    } else if count >= 1_000 && count % 1_000 == 0 {
        format!("{}k", count / 1_000)
    } else {
        count.to_string()
    }
}

/// A nats-server, a relay in front of it, a relay client, a direct NATS
/// client and a local leaf node whose hub the nats-server is (the
/// alternative the relay is measured against), with the relay's link up:
/// where the pass-through scenarios start. The servers and the relay are
/// stopped when this is dropped.
pub struct PassThrough {
    pub nats: crate::harness::NatsServer,
    pub relay: crate::harness::Relay,
    pub client: holdfast_client::Client,
    pub direct: async_nats::Client,
    pub leaf: crate::leaf::LeafNode,
}

impl PassThrough {
    /// Starts the hub nats-server (leaf connections on a free port), the
    /// relay with `config_toml` as its config, its client, a direct client
    /// and the leaf node; returns once the relay's NATS link is up.
    pub async fn start_with(config_toml: &str) -> crate::error::Result<PassThrough> {
        use crate::error::Context;
        let leaf_port = holdfast_testkit::free_port()?;
        let nats =
            crate::harness::NatsServer::start_with(false, Some(crate::leaf::hub_config(leaf_port)))
                .await?;
        let relay = crate::harness::Relay::start(&nats.url(), config_toml).await?;
        let client = holdfast_client::Client::connect(&relay.url())
            .await
            .context("connecting to holdfastd")?;
        crate::relay_status::wait_for_nats(&client, "up", std::time::Duration::from_secs(10))
            .await?;
        let direct = async_nats::connect(nats.url())
            .await
            .context("connecting the direct publisher")?;
        let leaf = crate::leaf::LeafNode::start(leaf_port).await?;
        Ok(PassThrough {
            nats,
            relay,
            client,
            direct,
            leaf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_in_words() {
        assert_eq!(count_words(5_000_000), "5M");
        assert_eq!(count_words(1_500_000), "1.5M");
        assert_eq!(count_words(200_000), "200k");
        assert_eq!(count_words(1234), "1234");
    }
}
