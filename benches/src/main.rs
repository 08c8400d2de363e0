//! holdfast-bench: placeholder until the benchmarks issue lands its scenarios.
//!
//! It exists so the workspace shape is final and CI builds it; it measures
//! nothing yet and says so instead of printing numbers.

fn main() {
    eprintln!("holdfast-bench: no scenarios yet (see the benchmarks issue); nothing was measured");
    std::process::exit(2);
}
