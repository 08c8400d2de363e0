//! Reading the JSON lines `holdfastd journal salvage` writes, for
//! `holdfast pub --from-salvage FILE`: one message per line, with its
//! class, subject, headers and base64 payload.

use base64::Engine;
use holdfast_client::{Headers, OutboundMessage, Text};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// A salvage line longer than this is refused (the largest message a relay
/// takes is 64 MiB; base64 and JSON make it about a third larger).
const MAX_LINE_BYTES: usize = 96 * 1024 * 1024;

/// Why a salvage file cannot be republished.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SalvageError {
    #[error("cannot read the salvage file: {0}")]
    Read(#[from] std::io::Error),
    #[error("salvage file line {line}: {problem}")]
    Line { line: u64, problem: String },
}

/// The messages of a salvage file, one per line, in file order.
pub(crate) struct SalvageLines<R> {
    reader: BufReader<R>,
    line: u64,
}

impl<R: AsyncRead + Unpin> SalvageLines<R> {
    pub(crate) fn new(input: R) -> Self {
        SalvageLines {
            reader: BufReader::new(input),
            line: 0,
        }
    }

    /// The next message; blank lines are skipped.
    pub(crate) async fn next(&mut self) -> Result<Option<OutboundMessage>, SalvageError> {
        loop {
            let mut text = Vec::new();
            let read = (&mut self.reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut text)
                .await?;
            if read == 0 {
                return Ok(None);
            }
            self.line += 1;
            if text.len() > MAX_LINE_BYTES {
                return Err(self.problem(format!("longer than {MAX_LINE_BYTES} bytes")));
            }
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return parse(&text)
                .map(Some)
                .map_err(|problem| self.problem(problem));
        }
    }

    fn problem(&self, problem: String) -> SalvageError {
        SalvageError::Line {
            line: self.line,
            problem,
        }
    }
}

/// One line: `{"class", "subject", "headers": [[name, value]...], "payload"}`
/// (other fields, such as the sequence, are informational).
fn parse(line: &[u8]) -> Result<OutboundMessage, String> {
    let value: Value =
        serde_json::from_slice(line).map_err(|error| format!("not JSON: {error}"))?;
    let text = |field: &str| -> Result<&str, String> {
        value
            .get(field)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("`{field}` is missing or not a string"))
    };
    let subject = text("subject")?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(text("payload")?)
        .map_err(|error| format!("`payload` is not base64: {error}"))?;
    let mut headers = Headers::new();
    let pairs = match value.get("headers") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(pairs)) => pairs.as_slice(),
        Some(_) => return Err("`headers` is not a list of [name, value] pairs".into()),
    };
    for pair in pairs {
        let (Some(name), Some(value)) = (
            pair.get(0).and_then(Value::as_str),
            pair.get(1).and_then(Value::as_str),
        ) else {
            return Err("`headers` is not a list of [name, value] pairs".into());
        };
        headers.insert(name, value);
    }
    let mut message = OutboundMessage::new(Text::from(subject), payload).headers(headers);
    if let Some(class) = value.get("class").and_then(Value::as_str) {
        message.class = Some(Text::from(class));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_become_messages_with_class_headers_and_payload() {
        let input: &[u8] = br#"{"class":"kv_events","sequence":7,"subject":"kv.a","headers":[["Nats-Msg-Id","r.kv_events.7"],["x",""]],"payload":"aGVsbG8=","accepted_at_ms":1}

{"class":"default","subject":"b","headers":[],"payload":""}
"#;
        let mut lines = SalvageLines::new(input);
        let first = lines.next().await.unwrap().unwrap();
        assert_eq!(first.subject.as_str(), "kv.a");
        assert_eq!(&first.payload[..], b"hello");
        assert_eq!(first.class.as_ref().map(Text::as_str), Some("kv_events"));
        assert_eq!(
            first.headers.get("Nats-Msg-Id").map(Text::as_str),
            Some("r.kv_events.7")
        );
        let second = lines.next().await.unwrap().unwrap();
        assert_eq!(second.subject.as_str(), "b");
        assert!(second.payload.is_empty());
        assert!(lines.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_bad_line_is_named() {
        let input: &[u8] =
            b"{\"subject\":\"a\",\"payload\":\"\"}\n{\"subject\":\"a\",\"payload\":\"***\"}\n";
        let mut lines = SalvageLines::new(input);
        assert!(lines.next().await.unwrap().is_some());
        let error = lines.next().await.unwrap_err().to_string();
        assert!(
            error.starts_with("salvage file line 2: `payload` is not base64"),
            "{error}"
        );
        let mut lines = SalvageLines::new(&b"[1,2]\n"[..]);
        let error = lines.next().await.unwrap_err().to_string();
        assert!(error.contains("`subject` is missing"), "{error}");
    }
}
