//! `holdfastd journal inspect`: the per-class picture of a journal file,
//! read-only, while the relay is stopped.

use crate::journal::{self, ClassBacklog, JournalError};
use serde::Serialize;
use std::path::Path;
use std::process::ExitCode;

#[derive(Debug, Serialize)]
struct ClassReport {
    name: String,
    messages: u64,
    bytes: u64,
    oldest_age_seconds: Option<u64>,
    first_seq: u64,
    last_seq: u64,
}

fn report(name: String, backlog: ClassBacklog, now_ms: u64) -> ClassReport {
    ClassReport {
        name,
        messages: backlog.messages,
        bytes: backlog.bytes,
        oldest_age_seconds: backlog
            .oldest_accepted_ms
            .map(|oldest| now_ms.saturating_sub(oldest) / 1000),
        first_seq: backlog.first_seq,
        last_seq: backlog.last_seq,
    }
}

/// Prints the journal under `data_dir`; exit 1 when it cannot be read.
pub fn run(data_dir: &Path, json: bool) -> ExitCode {
    let path = data_dir.join("journal.redb");
    let classes = match journal::inspect(&path) {
        Ok(classes) => classes,
        Err(JournalError::InUse(_)) => {
            eprintln!(
                "holdfastd: {} is open by a running relay; stop it first, or use `holdfast status`",
                path.display()
            );
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("holdfastd: cannot read {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let now_ms = crate::util::wall_clock::unix_millis();
    let reports: Vec<ClassReport> = classes
        .into_iter()
        .map(|(name, backlog)| report(name, backlog, now_ms))
        .collect();
    if json {
        match serde_json::to_string_pretty(&reports) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("holdfastd: {error}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    println!("journal: {}", path.display());
    if reports.is_empty() {
        println!("  (empty)");
    }
    for class in reports {
        let age = class
            .oldest_age_seconds
            .map_or("-".to_string(), |age| format!("{age}s"));
        println!(
            "  {}: {} messages, {} bytes, oldest {}, seq {}..={}",
            class.name, class.messages, class.bytes, age, class.first_seq, class.last_seq
        );
    }
    ExitCode::SUCCESS
}
