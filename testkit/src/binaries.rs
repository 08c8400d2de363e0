//! Where the servers' programs are: an environment variable, else the
//! project-local install, else the usual system paths.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Environment variable naming the nats-server binary.
pub const NATS_SERVER_ENV: &str = "HOLDFAST_NATS_SERVER";
/// Environment variable naming the etcd binary.
pub const ETCD_ENV: &str = "HOLDFAST_ETCD";

/// Where deploy/install-deps.sh puts a current nats-server: distributions'
/// packages lag behind the versions the relay is tested against.
const PROJECT_LOCAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.deps/bin");

/// Searched in this order after the environment variable.
const SYSTEM_DIRS: [&str; 3] = ["/usr/sbin", "/usr/bin", "/usr/local/bin"];

/// nats-server: `$HOLDFAST_NATS_SERVER`, else `.deps/bin`, else the system's.
pub fn find_nats_server() -> Result<PathBuf> {
    find_binary("nats-server", NATS_SERVER_ENV)
}

/// etcd: `$HOLDFAST_ETCD`, else `.deps/bin`, else the system's.
pub fn find_etcd() -> Result<PathBuf> {
    find_binary("etcd", ETCD_ENV)
}

/// `$env` if set (taken as is, so a wrong path fails at spawn and names
/// itself), else `name` in the project-local `.deps/bin`, /usr/sbin,
/// /usr/bin or /usr/local/bin.
pub fn find_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    std::iter::once(PROJECT_LOCAL)
        .chain(SYSTEM_DIRS)
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::Missing {
            binary: name.to_string(),
            env: env.to_string(),
            searched: format!(".deps/bin, {}", SYSTEM_DIRS.join(", ")),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_names_itself_and_its_variable() {
        let error = find_binary(
            "holdfast-no-such-program",
            "HOLDFAST_TESTKIT_UNSET_VARIABLE",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("holdfast-no-such-program"), "{error}");
        assert!(error.contains("HOLDFAST_TESTKIT_UNSET_VARIABLE"), "{error}");
    }

    #[test]
    fn a_program_in_the_system_paths_is_found() {
        let found = find_binary("sh", "HOLDFAST_TESTKIT_UNSET_VARIABLE").unwrap();
        assert!(found.is_file(), "{}", found.display());
    }
}
