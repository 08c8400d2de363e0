//! The journal's disk filling up, on a real (small) tmpfs: a commit that
//! finds it full refuses its publishes with the retryable `journal_full`,
//! the relay reopens its database by itself and takes messages again once
//! space is freed, with nothing acknowledged lost; below the configured
//! free-space reserve it refuses before the disk is full at all. `/readyz`,
//! `/status` and the metrics say so meanwhile.
//!
//! Mounting needs root (CI runs as root); where it is not permitted the
//! tests print why and pass without running.

use crate::journal::{
    capture_stream, captured_count, read_captured, wait_for_nats, DURABLE_CLASSES,
};
use crate::support::{metric, scrape, wait_until, within, NatsServer, Relay};
use holdfast_client::{AckStatus, Client, Error, ErrorCode, LinkStatus, OutboundMessage};
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

const MIB: usize = 1024 * 1024;

/// A tmpfs mounted on a temp dir, unmounted (and the dir removed) on drop.
pub struct Tmpfs {
    dir: Option<TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as mount's `size=` option, e.g. "20m"), or
    /// prints why it cannot and returns `None` (the caller then skips).
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tmpfs { dir: Some(dir) }),
            Ok(output) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here (the disk-full tests need root): {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("SKIPPED: cannot run mount (the disk-full tests need it): {error}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |dir| dir.path())
    }

    /// Writes a file of `bytes` on it (to take up space).
    pub fn fill(&self, name: &str, bytes: usize) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, vec![0x5a; bytes]).expect("write the filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let unmounted = Command::new("umount").arg(dir.path()).status();
            if !unmounted.is_ok_and(|status| status.success()) {
                // Lazily, so a file still open (a relay being killed) does
                // not leave the mount behind.
                let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
            }
        }
    }
}

/// Publishes `count` durable messages of `bytes` each, pipelined, and
/// returns the indexes journaled and the error of each refused one.
async fn publish_durable(client: &Client, count: usize, bytes: usize) -> (Vec<usize>, Vec<Error>) {
    let mut acks = Vec::with_capacity(count);
    for index in 0..count {
        let mut payload = format!("disk:{index}:").into_bytes();
        payload.resize(bytes, b'.');
        let message = OutboundMessage::new("load.other.disk", payload);
        acks.push((index, client.publish_with_ack(message).await.unwrap()));
    }
    let mut journaled = Vec::new();
    let mut refused = Vec::new();
    within("every ack", async {
        for (index, ack) in acks {
            match ack.await {
                Ok(ack) => {
                    assert_eq!(ack.outcome, AckStatus::Journaled);
                    journaled.push(index);
                }
                Err(error) => refused.push(error),
            }
        }
    })
    .await;
    (journaled, refused)
}

fn readyz(relay: &Relay) -> (u16, String) {
    relay.http_get("/readyz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_journal_full_and_the_relay_recovers_by_itself() {
    let Some(disk) = Tmpfs::mount("20m") else {
        return;
    };
    let filler = disk.fill("filler", 8 * MIB);
    let mut nats = NatsServer::start_jetstream();
    capture_stream(&nats.url()).await;
    // No reserve: the relay runs into the full disk itself.
    let config = format!("[relay]\njournal_reserve_bytes = 0\n{DURABLE_CLASSES}");
    let mut relay = Relay::start_with_data_dir(&nats.url(), &config, &disk.path().join("data"));
    let client = Client::connect(&relay.url()).await.unwrap();
    nats.kill();
    wait_for_nats(&client, LinkStatus::Down).await;

    // 3,000 x 4 KiB do not fit in the 12 MiB left.
    let (journaled, refused) = publish_durable(&client, 3_000, 4096).await;
    eprintln!("{} journaled, {} refused", journaled.len(), refused.len());
    assert!(
        !journaled.is_empty() && !refused.is_empty(),
        "{} journaled, {} refused",
        journaled.len(),
        refused.len()
    );
    for error in &refused {
        assert_eq!(error.code(), Some(ErrorCode::JournalFull), "{error}");
        assert!(error.is_retryable());
    }
    let (code, body) = readyz(&relay);
    assert_eq!(code, 503, "{body}");
    let status = relay.status();
    let reason = status["journal"]["refusing"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ["disk_full", "storage_error"].contains(&reason.as_str()),
        "{status}"
    );
    assert!(body.contains(&reason), "{body}");
    let metrics = scrape(&relay);
    assert_eq!(
        metric(
            &metrics,
            "holdfast_journal_refusing",
            &[("reason", &reason)]
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &metrics,
            "holdfast_publish_rejections_total",
            &[("reason", "journal_full")]
        )
        .unwrap_or(0.0)
            >= refused.len() as f64,
        "{metrics}"
    );

    // Space comes back: the relay takes messages again without a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_until("/readyz is 200 again", || readyz(&relay).0 == 200);
    let status = relay.status();
    assert!(status["journal"]["refusing"].is_null(), "{status}");
    let (late, late_refused) = publish_durable(&client, 1, 4096).await;
    assert!(late_refused.is_empty(), "{late_refused:?}");
    assert_eq!(late.len(), 1);

    // Everything acknowledged reaches NATS, in order, and is trimmed.
    nats.restart();
    let seen = read_captured(&nats.url(), journaled.len() + 1).await;
    let mut expected: Vec<String> = journaled
        .iter()
        .map(|index| format!("disk:{index}:"))
        .collect();
    expected.push("disk:0:".to_string());
    for ((_, payload), prefix) in seen.iter().zip(&expected) {
        assert!(
            payload.starts_with(prefix.as_str()),
            "{payload:.20} is not {prefix}"
        );
    }
    within("the journal trimmed", async {
        while client.status().await.unwrap()["classes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|class| class["backlog_messages"] != 0)
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        captured_count(&nats.url()).await,
        journaled.len() as u64 + 1
    );

    // And a restart has nothing left to resend.
    drop(client);
    assert!(relay.terminate().success());
    relay.restart();
    let status = relay.status();
    for class in status["classes"].as_array().unwrap() {
        assert_eq!(class["backlog_messages"], 0, "{status}");
    }
    let logs = relay.logs();
    assert!(
        logs.contains("journal reopened; its backlog is intact"),
        "{logs}"
    );
    assert_eq!(
        logs.matches("Previous I/O error").count(),
        0,
        "redb's latched error must not come back:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_reserve_durable_publishes_are_refused_before_the_disk_is_full() {
    let Some(disk) = Tmpfs::mount("20m") else {
        return;
    };
    let nats = NatsServer::start();
    let config = format!(
        "[relay]\njournal_reserve_bytes = {}\n[classes.default]\ndurability = \"durable\"\n",
        6 * MIB
    );
    let relay = Relay::start_with_data_dir(&nats.url(), &config, &disk.path().join("data"));
    let client = Client::connect(&relay.url()).await.unwrap();
    let durable = || OutboundMessage::new("other.reserve", vec![b'r'; 4096]);
    let ack = client
        .publish_with_ack(durable())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Journaled);

    // Something else takes the disk down to about 4 MiB free.
    let filler = disk.fill("filler", 15 * MIB);
    wait_until("/readyz says the journal refuses", || {
        readyz(&relay).0 == 503
    });
    assert!(readyz(&relay).1.contains("low_space"));
    let error = client
        .publish_with_ack(durable())
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::JournalFull), "{error}");
    assert!(
        error.to_string().contains("relay.journal_reserve_bytes"),
        "{error}"
    );
    let status = relay.status();
    assert_eq!(status["journal"]["refusing"], "low_space", "{status}");
    assert!(
        status["journal"]["free_bytes"].as_u64().unwrap() < 6 * MIB as u64,
        "{status}"
    );
    let metrics = scrape(&relay);
    assert_eq!(
        metric(
            &metrics,
            "holdfast_journal_refusing",
            &[("reason", "low_space")]
        ),
        Some(1.0)
    );
    assert!(metric(&metrics, "holdfast_journal_free_bytes", &[]).unwrap() < (6 * MIB) as f64);
    // What does not go to the journal is not refused.
    let spill = OutboundMessage::new("decode.reserve", "k").class("decode");
    let ack = client.publish_with_ack(spill).await.unwrap().await.unwrap();
    assert_eq!(ack.outcome, AckStatus::Forwarded);

    std::fs::remove_file(&filler).unwrap();
    wait_until("/readyz is 200 again", || readyz(&relay).0 == 200);
    let ack = client
        .publish_with_ack(durable())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.outcome, AckStatus::Journaled);
    let logs = relay.logs();
    assert!(
        !logs.contains("No space left"),
        "the reserve kept the disk from filling:\n{logs}"
    );
    assert!(logs.contains("journal refuses new messages"), "{logs}");
}
