//! Small pieces every layer uses: durations, secret files, URLs with
//! credentials, rate-limited logging, atomic file writes, the wall clock,
//! PEM certificates, the shape of an upstream link's state, typed one-shot
//! replies.

pub mod atomic_file;
pub mod drop_log;
pub mod duration;
pub mod failure_log;
pub mod link_snapshot;
pub mod pem;
pub mod reply;
pub mod secret_file;
pub mod sparse_map;
pub mod url_credentials;
pub mod wall_clock;
