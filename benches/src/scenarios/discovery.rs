//! `discovery`: cached get of a 100-key prefix vs a direct etcd serializable
//! get. The relay has no etcd support yet, so this reports that instead of a
//! number.

use crate::report::Row;

/// The row saying the scenario cannot run yet.
pub fn run() -> Row {
    Row {
        scenario: "discovery".to_string(),
        unit: "µs".to_string(),
        baseline: "direct etcd serializable get, 100-key prefix".to_string(),
        target: "cached get p99 ≤ 50 µs".to_string(),
        note: "not available yet: holdfastd has no etcd support, nothing was measured".to_string(),
        ..Row::default()
    }
}
