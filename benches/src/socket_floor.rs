//! The machine's floor for local request/response: a bare round trip of a
//! small message between two processes over a Unix socket, tokio on both
//! sides (each end on a worker thread, as a component's task and the
//! relay's session are) and nothing else. Every relay figure in µs includes
//! at least such a crossing, so the latency and discovery scenarios measure
//! it in the same run and report their figures against it: on a shared
//! 2-core VM, waking a parked thread in another process costs 10–30 µs,
//! and an absolute target below the floor cannot be met by any relay.
//!
//! The echo side is this executable started again with `--socket-echo
//! PATH` ([`serve_echo`]); [`SocketFloor`] owns that child in a
//! `holdfast_testkit::Process`, which kills it by PID when dropped, however
//! the measurement ends.

use crate::error::{BenchError, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Bytes each way per round trip: about a small frame.
const MESSAGE_BYTES: usize = 64;
/// Round trips before the timed ones.
const WARM_UP: u64 = 200;
/// How long the echo process may take to listen.
const START_LIMIT: Duration = Duration::from_secs(10);
/// Longest one round trip may take before the run counts as failed.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(5);

/// The echo process and a connection to it.
pub struct SocketFloor {
    stream: UnixStream,
    _echo: holdfast_testkit::Process,
    _dir: TempDir,
}

impl SocketFloor {
    /// Starts the echo process and connects to it.
    pub async fn start() -> Result<SocketFloor> {
        let dir = tempfile::tempdir().context("creating the socket floor's temp dir")?;
        let path = dir.path().join("echo.sock");
        let executable = std::env::current_exe().context("finding holdfast-bench itself")?;
        let mut echo = holdfast_testkit::Process::default();
        echo.spawn(
            Command::new(executable)
                .arg("--socket-echo")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )?;
        let deadline = Instant::now() + START_LIMIT;
        let stream = loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(error) => {
                    return Err(BenchError::Timeout(format!(
                        "the socket floor's echo process to listen on {}: {error}",
                        path.display()
                    )))
                }
            }
        };
        Ok(SocketFloor {
            stream,
            _echo: echo,
            _dir: dir,
        })
    }

    /// Latencies in µs of `samples` round trips, one at a time, after
    /// [`WARM_UP`] untimed ones.
    pub async fn round_trips(&mut self, samples: u64) -> Result<Vec<f64>> {
        let mut latencies = Vec::with_capacity(usize::try_from(samples).unwrap_or(0));
        let mut message = [0u8; MESSAGE_BYTES];
        for index in 0..WARM_UP + samples {
            let started = Instant::now();
            let round_trip = async {
                self.stream.write_all(&message).await?;
                self.stream.read_exact(&mut message).await
            };
            tokio::time::timeout(ROUND_TRIP_LIMIT, round_trip)
                .await
                .map_err(|_| BenchError::Timeout(format!("socket floor round trip {index}")))?
                .context("socket floor round trip")?;
            if index >= WARM_UP {
                latencies.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(latencies)
    }
}

/// The echo process: accepts one connection on `path` and sends back every
/// [`MESSAGE_BYTES`]-byte message until the peer goes. Runs on the same
/// kind of runtime as holdfastd (multi-threaded, one worker per core).
pub fn serve_echo(path: &Path) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("holdfast-bench --socket-echo: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let socket = path.to_path_buf();
    // On a worker, like any server's connection task (see `main`).
    let echo = runtime.spawn(async move {
        let listener = tokio::net::UnixListener::bind(&socket)?;
        let (mut stream, _) = listener.accept().await?;
        let mut message = [0u8; MESSAGE_BYTES];
        loop {
            match stream.read_exact(&mut message).await {
                Ok(_) => stream.write_all(&message).await?,
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok::<(), std::io::Error>(())
                }
                Err(error) => return Err(error),
            }
        }
    });
    let served = runtime
        .block_on(echo)
        .unwrap_or_else(|error| Err(std::io::Error::other(error)));
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("holdfast-bench --socket-echo {}: {error}", path.display());
            std::process::ExitCode::FAILURE
        }
    }
}
