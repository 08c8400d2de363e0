//! holdfast-bench: measures holdfastd against what a user would otherwise
//! use — a local NATS leaf node, direct async-nats, a local JetStream file
//! store (default and `sync_interval: always`), raw append+fdatasync, a
//! direct etcd-client — as ratios measured in the same run.
//!
//! This file is the command line: it parses the arguments, runs the chosen
//! scenarios one after another (each starts and kills its own nats-server,
//! etcd and holdfastd), prints one row per figure and writes `--json`.

mod error;
mod harness;
mod leaf;
mod relay_status;
mod report;
mod scenarios;
mod socket_floor;
mod stats;

use clap::{Parser, ValueEnum};
use report::Row;
use scenarios::outage::OutagePlan;
use scenarios::Settings;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Measures holdfastd against a NATS leaf node, direct NATS, local
/// JetStream, the disk and direct etcd.
///
/// Every figure is the median of N repetitions and is compared with a
/// baseline measured in the same run; the ratio is the result. Needs
/// nats-server (HOLDFAST_NATS_SERVER, else .deps/bin from
/// deploy/install-deps.sh, else the system's; 2.10+ for the JetStream
/// `sync_interval: always` row), etcd for `discovery` and
/// `outage` (or HOLDFAST_ETCD) and holdfastd beside this executable (or
/// HOLDFAST_BENCH_HOLDFASTD).
#[derive(Debug, Parser)]
#[command(name = "holdfast-bench", version)]
struct Cli {
    /// What to measure; `all` runs every scenario except `outage`.
    #[arg(required_unless_present = "socket_echo")]
    scenario: Option<Scenario>,
    /// Smaller message counts (said in each row's note); `all --quick` takes
    /// a few minutes.
    #[arg(long)]
    quick: bool,
    /// Also write the rows to FILE as a JSON array of objects.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Repetitions per figure (default 3 with --quick, else 5).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    repetitions: Option<u32>,
    /// outage: how long NATS stays down (e.g. 15m, 90s).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
    nats_outage: Duration,
    /// outage: how long etcd stays down, after NATS is back and drained.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    etcd_outage: Duration,
    /// outage: publishes per second of the steady mixed load.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    outage_rate: u32,
    /// outage: draw accepted, delivered and backlog per class over time,
    /// with the outages shaded, into FILE (SVG).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Internal: serve as the echo process of the socket floor measurement.
    #[arg(long, hide = true, value_name = "PATH")]
    socket_echo: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Publish,
    Latency,
    Journal,
    Replay,
    Footprint,
    Discovery,
    Outage,
    All,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Publish => "publish",
            Scenario::Latency => "latency",
            Scenario::Journal => "journal",
            Scenario::Replay => "replay",
            Scenario::Footprint => "footprint",
            Scenario::Discovery => "discovery",
            Scenario::Outage => "outage",
            Scenario::All => "all",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.socket_echo {
        return socket_floor::serve_echo(path);
    }
    let Some(scenario) = cli.scenario else {
        eprintln!("holdfast-bench: name a scenario (see --help)");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("holdfast-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        // The scenarios run on a worker, as a component's tasks would. On
        // the thread of `block_on` every socket wake-up is handed over from
        // a worker, which on this VM added about 40 µs to a local round
        // trip and would be counted as the relay's or etcd's time.
        let mut scenarios = tokio::spawn(async move { run(scenario, &cli).await });
        tokio::select! {
            finished = &mut scenarios => finished.unwrap_or_else(|error| {
                eprintln!("holdfast-bench: the scenarios' task failed: {error}");
                ExitCode::FAILURE
            }),
            signal = shutdown_signal() => {
                // Dropping `run` drops every process guard: each child is
                // killed by PID. Awaiting the aborted task waits for that.
                eprintln!("holdfast-bench: {signal}; stopping every process it started");
                scenarios.abort();
                let _ = scenarios.await;
                ExitCode::from(130)
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "interrupted",
        _ = terminate.recv() => "terminated",
    }
}

async fn run(scenario: Scenario, cli: &Cli) -> ExitCode {
    let settings = Settings {
        quick: cli.quick,
        repetitions: cli.repetitions.unwrap_or(if cli.quick { 3 } else { 5 }),
    };
    let chosen: Vec<Scenario> = match scenario {
        Scenario::All => vec![
            Scenario::Publish,
            Scenario::Latency,
            Scenario::Journal,
            Scenario::Replay,
            Scenario::Footprint,
            Scenario::Discovery,
        ],
        one => vec![one],
    };
    let plan = if scenario == Scenario::Outage {
        "one run".to_string()
    } else {
        format!(
            "N = {} repetitions per figure (median)",
            settings.repetitions
        )
    };
    // Figures against nats-server depend on its version (JetStream's
    // default sync changed over releases): every run says which it used.
    let nats_server = match harness::NatsServerBinary::find() {
        Ok(binary) => binary.describe(),
        Err(error) => format!("nats-server: {error}"),
    };
    eprintln!(
        "holdfast-bench {}{}: {plan}, on {} CPUs, {nats_server}",
        scenario.name(),
        if cli.quick { " --quick" } else { "" },
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut failures = 0;
    for one in chosen {
        eprintln!("== {} ==", one.name());
        let began = Instant::now();
        match run_one(one, cli, &settings).await {
            Ok(mut measured) => rows.append(&mut measured),
            Err(error) => {
                failures += 1;
                eprintln!("  {} failed: {error}", one.name());
                rows.push(Row {
                    scenario: one.name().to_string(),
                    met: Some(false),
                    repetitions: settings.repetitions,
                    note: format!("failed: {error}"),
                    ..Row::default()
                });
            }
        }
        eprintln!(
            "  {} took {:.1} s",
            one.name(),
            began.elapsed().as_secs_f64()
        );
    }
    println!(
        "holdfast-bench {}{} — each figure is the median of N repetitions; ratio = holdfast / \
         baseline, both measured in this run ({:.0} s); {nats_server}\n",
        scenario.name(),
        if cli.quick { " --quick" } else { "" },
        started.elapsed().as_secs_f64()
    );
    print!("{}", report::table(&rows));
    if let Some(path) = &cli.json {
        if let Err(error) = report::write_json(path, &rows) {
            eprintln!("holdfast-bench: {error}");
            return ExitCode::FAILURE;
        }
    }
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn run_one(scenario: Scenario, cli: &Cli, settings: &Settings) -> error::Result<Vec<Row>> {
    match scenario {
        Scenario::Publish => scenarios::publish::run(settings).await,
        Scenario::Latency => scenarios::latency::run(settings).await,
        Scenario::Journal => scenarios::journal::run(settings).await,
        Scenario::Replay => scenarios::replay::run(settings).await,
        Scenario::Footprint => scenarios::footprint::run(settings).await,
        Scenario::Discovery => scenarios::discovery::run(settings).await,
        Scenario::Outage => {
            scenarios::outage::run(&OutagePlan {
                nats_outage: cli.nats_outage,
                etcd_outage: cli.etcd_outage,
                rate: cli.outage_rate,
                plot: cli.plot.clone(),
            })
            .await
        }
        Scenario::All => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        let cli =
            Cli::try_parse_from(["holdfast-bench", "all", "--quick", "--json", "x.json"]).unwrap();
        assert_eq!(cli.scenario, Some(Scenario::All));
        assert!(cli.quick);
        assert!(Cli::try_parse_from(["holdfast-bench", "nope"]).is_err());
        assert!(Cli::try_parse_from(["holdfast-bench"]).is_err());
        let echo = Cli::try_parse_from(["holdfast-bench", "--socket-echo", "/tmp/x"]).unwrap();
        assert_eq!(echo.socket_echo, Some(PathBuf::from("/tmp/x")));
        assert!(Cli::try_parse_from(["holdfast-bench", "all", "--repetitions", "0"]).is_err());
        let outage = Cli::try_parse_from([
            "holdfast-bench",
            "outage",
            "--nats-outage",
            "20s",
            "--etcd-outage",
            "10s",
            "--plot",
            "o.svg",
        ])
        .unwrap();
        assert_eq!(outage.nats_outage, Duration::from_secs(20));
        assert_eq!(outage.plot, Some(PathBuf::from("o.svg")));
    }
}
