//! `holdfast journal inspect --data-dir DIR`: the journal's per-class picture
//! while the relay is stopped.
//!
//! The journal's format belongs to the daemon, so this verb runs
//! `holdfastd journal inspect` (found beside this binary, else on PATH)
//! rather than teaching the thin client to read redb files.

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub(crate) struct JournalArgs {
    #[command(subcommand)]
    action: JournalAction,
}

#[derive(Debug, Subcommand)]
enum JournalAction {
    /// Per class: messages, bytes, oldest age, sequence range (read-only).
    Inspect {
        /// The relay's data directory.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/holdfast")]
        data_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("holdfastd"))
        .filter(|candidate| candidate.exists())
        .unwrap_or_else(|| PathBuf::from("holdfastd"))
}

pub(crate) fn run(args: JournalArgs) -> ExitCode {
    let JournalAction::Inspect { data_dir, json } = args.action;
    let mut command = std::process::Command::new(daemon_binary());
    command
        .args(["journal", "inspect", "--data-dir"])
        .arg(&data_dir);
    if json {
        command.arg("--json");
    }
    match command.status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: cannot run holdfastd (needed to read the journal): {error}");
            ExitCode::FAILURE
        }
    }
}
