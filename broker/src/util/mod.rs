//! Small pieces every layer uses: durations, secret files, URLs with
//! credentials, rate-limited logging, atomic file writes, the wall clock.

pub mod atomic_file;
pub mod drop_log;
pub mod duration;
pub mod failure_log;
pub mod secret_file;
pub mod sparse_map;
pub mod url_credentials;
pub mod wall_clock;
