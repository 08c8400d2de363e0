//! `holdfastd journal salvage`: writes every readable, undelivered message
//! of the journal files a relay moved aside (or of one named file) as JSON
//! lines that `holdfast pub --from-salvage FILE` republishes.
//!
//! One line per message: `{"class", "sequence", "subject", "headers"
//! (a list of [name, value] pairs, in order), "payload" (base64, standard
//! alphabet), "accepted_at_ms"}`. Set-aside files are taken oldest first,
//! each in class and sequence order.

use crate::journal::{self, SalvageReport, SalvagedMessage};
use base64::Engine;
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The name a set-aside journal file starts with (see `journal::recovery`).
const SET_ASIDE_PREFIX: &str = "journal.redb.quarantined-";

#[derive(Serialize)]
struct Line<'a> {
    class: &'a str,
    sequence: u64,
    subject: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    payload: String,
    accepted_at_ms: u64,
}

/// The set-aside journal files in `data_dir`, oldest first (by the time in
/// their name, then their suffix).
fn set_aside_files(data_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<(u64, String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(SET_ASIDE_PREFIX) else {
            continue;
        };
        let seconds = rest
            .split('-')
            .next()
            .and_then(|seconds| seconds.parse().ok())
            .unwrap_or(u64::MAX);
        files.push((seconds, name, entry.path()));
    }
    files.sort();
    Ok(files.into_iter().map(|(_, _, path)| path).collect())
}

fn write_line(out: &mut impl Write, salvaged: &SalvagedMessage) -> std::io::Result<()> {
    let message = &salvaged.message;
    let line = Line {
        class: &salvaged.class,
        sequence: message.seq,
        subject: message.subject.as_str(),
        headers: message
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect(),
        payload: base64::engine::general_purpose::STANDARD.encode(&message.payload),
        accepted_at_ms: message.accepted_at_ms,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

/// Salvages `file`, or every set-aside file in `data_dir`, into `out`;
/// exit 1 when there is nothing to read or a file cannot be read.
pub fn run(data_dir: &Path, file: Option<&Path>, out: &Path) -> ExitCode {
    let files = match file {
        Some(file) => vec![file.to_path_buf()],
        None => match set_aside_files(data_dir) {
            Ok(files) if files.is_empty() => {
                eprintln!(
                    "holdfastd: no set-aside journal ({SET_ASIDE_PREFIX}*) in {}; name one with --file",
                    data_dir.display()
                );
                return ExitCode::FAILURE;
            }
            Ok(files) => files,
            Err(error) => {
                eprintln!("holdfastd: cannot list {}: {error}", data_dir.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let mut writer = match File::create(out) {
        Ok(output) => BufWriter::new(output),
        Err(error) => {
            eprintln!("holdfastd: cannot create {}: {error}", out.display());
            return ExitCode::FAILURE;
        }
    };
    let mut total = SalvageReport::default();
    for path in &files {
        let mut emit = |message: SalvagedMessage| write_line(&mut writer, &message);
        match journal::salvage(path, &mut emit) {
            Ok(report) => {
                println!(
                    "{}: {} messages from {} rows; {} damaged rows skipped; {} already delivered left out",
                    path.display(),
                    report.messages,
                    report.rows,
                    report.damaged_rows,
                    report.delivered
                );
                total.messages += report.messages;
                total.damaged_rows += report.damaged_rows;
            }
            Err(error) => {
                eprintln!("holdfastd: cannot salvage {}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if let Err(error) = writer.flush() {
        eprintln!("holdfastd: cannot write {}: {error}", out.display());
        return ExitCode::FAILURE;
    }
    println!(
        "wrote {} messages to {} ({} damaged rows skipped); republish with `holdfast pub --from-salvage {}`",
        total.messages,
        out.display(),
        total.damaged_rows,
        out.display()
    );
    ExitCode::SUCCESS
}
