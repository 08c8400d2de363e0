//! `holdfast pub SUBJECT [PAYLOAD] [--class NAME] [--header K:V]... [--ack]`
//! and `holdfast pub --from-salvage FILE`.
//!
//! Without PAYLOAD every line of stdin is one message, in order. With
//! `--ack` publishes are pipelined (a bounded window of outstanding acks)
//! and every ack is awaited; without it they are fire-and-forget followed by
//! one flush. `--from-salvage` republishes what `holdfastd journal salvage`
//! exported (each message with its subject, headers and class), always
//! with acks. Either way one summary line goes to stderr.

use crate::salvage::{SalvageError, SalvageLines};
use clap::Args;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use holdfast_client::{
    AckStatus, Client, Error, Headers, LinkEvent, OutboundMessage, Result, Text,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::broadcast;

/// Acks outstanding at once with `--ack`: enough to keep the relay busy,
/// few enough that memory stays small.
const ACK_WINDOW: usize = 4096;

/// Read buffer for stdin; large because lines are usually small and many.
const STDIN_BUFFER_BYTES: usize = 256 * 1024;

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Subject to publish to.
    #[arg(required_unless_present = "from_salvage")]
    subject: Option<String>,
    /// Message payload; without it, each line of stdin is one message.
    payload: Option<String>,
    /// Message class (e.g. prefill, decode, kv_events, default).
    #[arg(long)]
    class: Option<String>,
    /// A header as NAME:VALUE; repeat for more.
    #[arg(long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Ask the relay to acknowledge every message and wait for all acks.
    #[arg(long)]
    ack: bool,
    /// Republish the messages of a `holdfastd journal salvage` file (JSON
    /// lines), each with its subject, headers and class, waiting for acks.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["subject", "payload", "class", "headers"])]
    from_salvage: Option<PathBuf>,
}

pub(crate) async fn run(client: &Client, args: PublishArgs) -> ExitCode {
    let mut messages = match &args.from_salvage {
        Some(path) => match tokio::fs::File::open(path).await {
            Ok(file) => Messages::Salvage(SalvageLines::new(file)),
            Err(error) => {
                eprintln!("error: cannot open {}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => {
            let payloads = match args.payload.clone() {
                Some(payload) => Payloads::single(payload.into_bytes()),
                None => Payloads::lines(tokio::io::stdin()),
            };
            Messages::Payloads(MessageTemplate::new(&args), payloads)
        }
    };
    // Subscribed before the first publish, so no relay error is missed.
    let relay_errors = client.link_events();
    let mut tally = Tally::default();
    let acknowledged = args.ack || args.from_salvage.is_some();
    let outcome = if acknowledged {
        publish_acknowledged(client, &mut messages, &mut tally).await
    } else {
        publish_unacknowledged(client, &mut messages, &mut tally, relay_errors).await
    };
    eprintln!("{}", tally.summary(acknowledged));
    match outcome {
        Err(failure) => {
            failure.report();
            ExitCode::FAILURE
        }
        Ok(()) if tally.failed() > 0 => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
    }
}

/// Pipelines publishes with acks through a bounded window.
async fn publish_acknowledged<R: AsyncRead + Unpin>(
    client: &Client,
    messages: &mut Messages<R>,
    tally: &mut Tally,
) -> Result<(), Failure> {
    let mut in_flight = FuturesUnordered::new();
    let read_result = loop {
        let message = match messages.next().await {
            Ok(Some(message)) => message,
            Ok(None) => break Ok(()),
            Err(failure) => break Err(failure),
        };
        while in_flight.len() >= ACK_WINDOW {
            if let Some(ack) = in_flight.next().await {
                tally.record_ack(ack);
            }
        }
        tally.attempted += 1;
        match client.publish_with_ack(message).await {
            Ok(ack) => in_flight.push(ack),
            Err(error) => tally.record_failure(&error),
        }
    };
    // Whatever stopped the input, every message already sent gets its answer.
    while let Some(ack) = in_flight.next().await {
        tally.record_ack(ack);
    }
    read_result
}

/// Publishes fire-and-forget, then waits for the relay to have handled all of it.
async fn publish_unacknowledged<R: AsyncRead + Unpin>(
    client: &Client,
    messages: &mut Messages<R>,
    tally: &mut Tally,
    mut relay_errors: broadcast::Receiver<LinkEvent>,
) -> Result<(), Failure> {
    let read_result = loop {
        let message = match messages.next().await {
            Ok(Some(message)) => message,
            Ok(None) => break Ok(()),
            Err(failure) => break Err(failure),
        };
        tally.attempted += 1;
        if let Err(error) = client.publish_message(message).await {
            tally.record_failure(&error);
        }
    };
    let flushed = client.flush().await;
    // The relay reports failed fire-and-forget publishes before the PONG
    // that ends the flush, so they are all in the channel by now.
    loop {
        match relay_errors.try_recv() {
            Ok(LinkEvent::RelayError { code, message }) => {
                tally.record_failure(&Error::Relay { code, message });
            }
            Ok(_) => {}
            Err(broadcast::error::TryRecvError::Lagged(missed)) => tally.unreported += missed,
            Err(_) => break,
        }
    }
    read_result?;
    flushed.map_err(Failure::Client)
}

/// Why `pub` stopped early.
enum Failure {
    Stdin(std::io::Error),
    Salvage(SalvageError),
    Client(Error),
}

impl Failure {
    fn report(&self) {
        match self {
            Failure::Stdin(error) => eprintln!("error: cannot read stdin: {error}"),
            Failure::Salvage(error) => eprintln!("error: {error}"),
            Failure::Client(error) => {
                crate::fail(error);
            }
        }
    }
}

/// Everything but the payload, shared by every message.
struct MessageTemplate {
    subject: Text,
    class: Option<Text>,
    headers: Headers,
}

/// Where the messages come from: payloads under one template, or a
/// salvage file.
enum Messages<R> {
    Payloads(MessageTemplate, Payloads<R>),
    Salvage(SalvageLines<tokio::fs::File>),
}

impl<R: AsyncRead + Unpin> Messages<R> {
    async fn next(&mut self) -> Result<Option<OutboundMessage>, Failure> {
        match self {
            Messages::Payloads(template, payloads) => match payloads.next().await {
                Ok(payload) => Ok(payload.map(|payload| template.message(payload))),
                Err(error) => Err(Failure::Stdin(error)),
            },
            Messages::Salvage(lines) => lines.next().await.map_err(Failure::Salvage),
        }
    }
}

impl MessageTemplate {
    fn new(args: &PublishArgs) -> MessageTemplate {
        let mut headers = Headers::new();
        for (name, value) in &args.headers {
            headers.insert(name.as_str(), value.as_str());
        }
        MessageTemplate {
            subject: Text::from(args.subject.as_deref().unwrap_or_default()),
            class: args.class.as_deref().map(Text::from),
            headers,
        }
    }

    fn message(&self, payload: Vec<u8>) -> OutboundMessage {
        // Cloning `Text` shares its bytes: no per-message copy of the subject.
        let mut message =
            OutboundMessage::new(self.subject.clone(), payload).headers(self.headers.clone());
        message.class = self.class.clone();
        message
    }
}

/// The payloads to publish: one from the command line, or one per stdin line.
enum Payloads<R> {
    Single(Option<Vec<u8>>),
    Lines(BufReader<R>),
}

impl Payloads<tokio::io::Stdin> {
    fn single(payload: Vec<u8>) -> Self {
        Payloads::Single(Some(payload))
    }
}

impl<R: AsyncRead + Unpin> Payloads<R> {
    fn lines(input: R) -> Self {
        Payloads::Lines(BufReader::with_capacity(STDIN_BUFFER_BYTES, input))
    }

    /// The next payload; a line's `\n` (or `\r\n`) is not part of it.
    async fn next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            Payloads::Single(payload) => Ok(payload.take()),
            Payloads::Lines(reader) => {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(None);
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                Ok(Some(line))
            }
        }
    }
}

/// Counts of what happened to the messages, for the summary line.
#[derive(Debug, Default)]
struct Tally {
    attempted: u64,
    forwarded: u64,
    journaled: u64,
    queued: u64,
    /// Failures by error name, with whether that error is retryable.
    failures: BTreeMap<&'static str, (u64, bool)>,
    /// Relay error reports lost because the event channel overflowed.
    unreported: u64,
}

impl Tally {
    fn record_ack(&mut self, ack: Result<holdfast_client::Ack>) {
        match ack {
            Ok(ack) => match ack.outcome {
                AckStatus::Forwarded => self.forwarded += 1,
                AckStatus::Journaled => self.journaled += 1,
                AckStatus::Queued => self.queued += 1,
            },
            Err(error) => self.record_failure(&error),
        }
    }

    fn record_failure(&mut self, error: &Error) {
        let entry = self
            .failures
            .entry(error.name())
            .or_insert((0, error.is_retryable()));
        entry.0 += 1;
    }

    fn failed(&self) -> u64 {
        self.failures.values().map(|(count, _)| count).sum::<u64>() + self.unreported
    }

    fn summary(&self, acknowledged: bool) -> String {
        let failed = self.failed();
        let mut line = format!("published {} messages: ", self.attempted);
        if acknowledged {
            let _ = write!(
                line,
                "{} forwarded, {} journaled, {} queued, {failed} failed",
                self.forwarded, self.journaled, self.queued
            );
        } else {
            let sent = self.attempted.saturating_sub(failed);
            let _ = write!(line, "{sent} sent, {failed} failed");
        }
        let mut reasons: Vec<String> = self
            .failures
            .iter()
            .map(|(name, (count, retryable))| {
                let retryability = crate::retryability(*retryable);
                if self.failures.len() == 1 && self.unreported == 0 {
                    format!("{name}, {retryability}")
                } else {
                    format!("{count} {name}, {retryability}")
                }
            })
            .collect();
        if self.unreported > 0 {
            reasons.push(format!("{} unreported", self.unreported));
        }
        if !reasons.is_empty() {
            let _ = write!(line, " ({})", reasons.join("; "));
        }
        line
    }
}

/// Parses `NAME:VALUE` (split at the first colon; spaces around either trimmed).
fn parse_header(text: &str) -> Result<(String, String), String> {
    let Some((name, value)) = text.split_once(':') else {
        return Err(format!("`{text}` is not NAME:VALUE"));
    };
    let name = name.trim();
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{text}` has an invalid header name"));
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_client::ErrorCode;

    #[test]
    fn headers_split_at_the_first_colon() {
        assert_eq!(
            parse_header("trace-id: abc:def"),
            Ok(("trace-id".to_owned(), "abc:def".to_owned()))
        );
        assert_eq!(parse_header("k:"), Ok(("k".to_owned(), String::new())));
        assert!(parse_header("no-colon").is_err());
        assert!(parse_header(":value").is_err());
        assert!(parse_header("two words:value").is_err());
    }

    #[tokio::test]
    async fn stdin_lines_become_payloads_without_newlines() {
        let input: &[u8] = b"one\ntwo\r\n\nlast-without-newline";
        let mut payloads = Payloads::lines(input);
        let mut seen = Vec::new();
        while let Some(payload) = payloads.next().await.unwrap() {
            seen.push(String::from_utf8(payload).unwrap());
        }
        assert_eq!(seen, ["one", "two", "", "last-without-newline"]);
    }

    #[test]
    fn summary_with_acks_names_each_failure_kind() {
        let mut tally = Tally {
            attempted: 1000,
            forwarded: 998,
            ..Tally::default()
        };
        for _ in 0..2 {
            tally.record_failure(&Error::Relay {
                code: ErrorCode::NatsUnavailable,
                message: "down".into(),
            });
        }
        assert_eq!(
            tally.summary(true),
            "published 1000 messages: 998 forwarded, 0 journaled, 0 queued, 2 failed (nats_unavailable, retryable)"
        );
        tally.record_failure(&Error::Relay {
            code: ErrorCode::UnknownClass,
            message: "no such class".into(),
        });
        assert!(tally
            .summary(true)
            .ends_with("3 failed (2 nats_unavailable, retryable; 1 unknown_class, not retryable)"));
    }

    #[test]
    fn summary_without_acks_counts_sent_messages() {
        let tally = Tally {
            attempted: 5,
            ..Tally::default()
        };
        assert_eq!(
            tally.summary(false),
            "published 5 messages: 5 sent, 0 failed"
        );
    }
}
