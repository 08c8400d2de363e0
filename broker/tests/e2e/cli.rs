//! The `holdfast` CLI as a user runs it, against a real relay and NATS.

use crate::support::{wait_until_async, within, Stack};
use futures::StreamExt;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub fn holdfast() -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_holdfastd")).with_file_name("holdfast");
    assert!(
        path.exists(),
        "{} missing: build the workspace (cargo test --workspace does)",
        path.display()
    );
    path
}

fn cli(stack: &Stack) -> Command {
    let mut command = Command::new(holdfast());
    command.env("HOLDFAST_URL", stack.relay.url());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_lines_from_stdin_reach_sub_in_order() {
    let stack = Stack::start();
    let observer = stack.client().await;
    let subscriber = cli(&stack)
        .args(["sub", "cli.lines", "--count", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_async("sub is subscribed", || async {
        observer.status().await.unwrap()["subscriptions"]["local"] == 1
    })
    .await;

    let mut publisher = cli(&stack)
        .args(["pub", "cli.lines", "--ack"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(b"first\nsecond\nthird\n")
        .unwrap();
    let published = publisher.wait_with_output().unwrap();
    assert!(published.status.success(), "{published:?}");
    let summary = String::from_utf8_lossy(&published.stderr);
    assert!(summary.contains("3 forwarded"), "{summary}");

    let output = within("sub exits after --count", async {
        tokio::task::spawn_blocking(move || subscriber.wait_with_output().unwrap())
            .await
            .unwrap()
    })
    .await;
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "first\nsecond\nthird\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_ack_reports_held_messages_and_fails_loudly_on_refusals() {
    let mut stack = Stack::start();
    let client = stack.client().await;
    let mut events = client.link_events();
    stack.nats.kill();
    within("relay notices", async {
        loop {
            if let Ok(holdfast_client::LinkEvent::Upstream {
                status: holdfast_client::LinkStatus::Down,
                ..
            }) = events.recv().await
            {
                return;
            }
        }
    })
    .await;
    // Held for NATS: success, and the summary says how.
    let output = cli(&stack)
        .args(["pub", "cli.down", "payload", "--ack"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("1 queued"), "{stderr}");
    let output = cli(&stack)
        .args([
            "pub",
            "cli.down",
            "payload",
            "--ack",
            "--class",
            "kv_events",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 journaled"));
    // Refused: exit 1 and the reason.
    let output = cli(&stack)
        .args(["pub", "cli.down", "payload", "--ack", "--class", "nope"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown_class"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_and_status_print_what_the_relay_says() {
    let stack = Stack::start();
    let nats = stack.direct_nats().await;
    let mut service = nats.subscribe("cli.echo").await.unwrap();
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&request.payload);
            responder
                .publish(request.reply.unwrap(), answer.into())
                .await
                .unwrap();
        }
    });
    nats.flush().await.unwrap();

    let output = cli(&stack)
        .args(["req", "cli.echo", "ping", "--timeout", "5s"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim_end(),
        "echo:ping"
    );

    let output = cli(&stack)
        .args(["req", "cli.nobody", "ping"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no_responders"));

    let output = cli(&stack).args(["status", "--json"]).output().unwrap();
    assert!(output.status.success());
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["nats"]["status"], "up");
    let output = cli(&stack).arg("status").output().unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("up"),
        "{output:?}"
    );
}

/// Journals three `kv_events` messages through `holdfast pub --ack` with
/// NATS killed.
async fn journal_three_with_nats_down(stack: &mut Stack) {
    let client = stack.client().await;
    stack.nats.kill();
    crate::journal::wait_for_nats(&client, holdfast_client::LinkStatus::Down).await;
    let output = cli(stack)
        .args(["pub", "kv.inspect", "--class", "kv_events", "--ack"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(b"a\nb\nc\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

/// What `holdfast journal inspect --json` reports for `kv_events`.
fn inspected_kv_events(stack: &Stack) -> serde_json::Value {
    let output = cli(stack)
        .args(["journal", "inspect", "--json", "--data-dir"])
        .arg(stack.relay.data_dir())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let classes: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    classes
        .as_array()
        .unwrap()
        .iter()
        .find(|class| class["name"] == "kv_events")
        .cloned()
        .unwrap_or_else(|| panic!("no kv_events in {classes}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_inspect_shows_the_backlog_of_a_stopped_relay() {
    let mut stack = Stack::start();
    journal_three_with_nats_down(&mut stack).await;

    // While the relay runs, the file is its own: a clear refusal.
    let data_dir = stack.relay.data_dir();
    let busy = cli(&stack)
        .args(["journal", "inspect", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop it first"),
        "{busy:?}"
    );

    stack.relay.terminate();
    let kv = inspected_kv_events(&stack);
    assert_eq!(kv["messages"], 3, "{kv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_inspect_reads_the_file_of_a_crashed_relay() {
    // The 3 a.m. case: the relay died (kill -9) and the operator wants to
    // know what it still holds before starting it again.
    let mut stack = Stack::start();
    journal_three_with_nats_down(&mut stack).await;
    stack.relay.kill();
    let kv = inspected_kv_events(&stack);
    assert_eq!(kv["messages"], 3, "{kv}");
}
