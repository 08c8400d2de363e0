//! The etcd front end's lease table on disk, so a relay restarted within a
//! lease's TTL still knows the lease and registers its keys again.
//!
//! The file is JSON (an operator can read it) and replaced atomically:
//! written beside the old one, synced, renamed over it, the directory
//! synced. A file that cannot be read is logged by the caller and ignored.

use super::leases::{FrontLease, FrontLeaseId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::path::Path;

const FORMAT: u32 = 1;

/// Why the saved table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a lease table: {message}")]
    Garbled { path: String, message: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseFile {
    format: u32,
    leases: Vec<SavedLease>,
}

/// One lease as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLease {
    pub id: FrontLeaseId,
    pub ttl_seconds: i64,
    pub deadline_ms: u64,
    pub keys: Vec<(Vec<u8>, Vec<u8>)>,
}

impl SavedLease {
    pub fn from_lease(id: FrontLeaseId, lease: &FrontLease) -> SavedLease {
        SavedLease {
            id,
            ttl_seconds: lease.ttl_seconds,
            deadline_ms: lease.deadline_ms,
            keys: lease
                .keys
                .iter()
                .map(|(key, value)| (key.to_vec(), value.to_vec()))
                .collect(),
        }
    }

    pub fn into_lease(self) -> (FrontLeaseId, FrontLease) {
        (
            self.id,
            FrontLease {
                ttl_seconds: self.ttl_seconds,
                deadline_ms: self.deadline_ms,
                keys: self
                    .keys
                    .into_iter()
                    .map(|(key, value)| (Bytes::from(key), Bytes::from(value)))
                    .collect(),
            },
        )
    }
}

/// The saved leases; none when there is no file yet.
pub fn load(path: &Path) -> Result<Vec<SavedLease>, LoadError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LoadError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let garbled = |message: String| LoadError::Garbled {
        path: path.display().to_string(),
        message,
    };
    let file: LeaseFile =
        serde_json::from_slice(&text).map_err(|error| garbled(error.to_string()))?;
    if file.format != FORMAT {
        return Err(garbled(format!("unknown format {}", file.format)));
    }
    Ok(file.leases)
}

/// Replaces the file with `leases`, durably.
pub fn save(path: &Path, leases: Vec<SavedLease>) -> std::io::Result<()> {
    let file = LeaseFile {
        format: FORMAT,
        leases,
    };
    let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    crate::atomic_file::replace(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_leases_come_back_with_their_keys_and_deadlines() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("etcd-front-leases.json");
        let lease = SavedLease {
            id: 0x7a3f,
            ttl_seconds: 30,
            deadline_ms: 123_456,
            keys: vec![(b"v1/instances/a".to_vec(), b"\x00\xff".to_vec())],
        };
        save(&path, vec![lease.clone()]).unwrap();
        assert_eq!(load(&path).unwrap(), vec![lease]);
    }

    #[test]
    fn a_missing_file_is_empty_and_a_garbled_one_is_an_error() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("etcd-front-leases.json");
        assert!(load(&path).unwrap().is_empty());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(load(&path), Err(LoadError::Garbled { .. })));
    }
}
