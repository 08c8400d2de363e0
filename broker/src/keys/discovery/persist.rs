//! The discovery cache on disk, so a relay restarted while etcd is down
//! still answers with the last snapshot (flagged stale).
//!
//! The file is JSON (an operator can read it) and replaced atomically:
//! written beside the old one, synced, renamed over it. A file that cannot
//! be read is logged and ignored; the cache only saves a round trip, it is
//! never the source of truth.

use super::cache::PrefixCache;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::path::Path;

const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    prefixes: Vec<SavedPrefix>,
}

/// One prefix as saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedPrefix {
    prefix: Vec<u8>,
    revision: u64,
    confirmed_at_ms: u64,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl SavedPrefix {
    pub fn from_cache(cache: &PrefixCache) -> SavedPrefix {
        SavedPrefix {
            prefix: cache.prefix().to_vec(),
            revision: cache.revision(),
            confirmed_at_ms: cache.confirmed_at_ms(),
            entries: cache
                .entries()
                .map(|(key, value)| (key.to_vec(), value.to_vec()))
                .collect(),
        }
    }

    pub fn into_cache(self) -> PrefixCache {
        PrefixCache::restored(
            Bytes::from(self.prefix),
            self.revision,
            self.confirmed_at_ms,
            self.entries
                .into_iter()
                .map(|(key, value)| (Bytes::from(key), Bytes::from(value))),
        )
    }
}

/// The saved prefixes; none when there is no file yet.
pub fn load(path: &Path) -> Result<Vec<SavedPrefix>, String> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error.to_string()),
    };
    let file: CacheFile = serde_json::from_slice(&text).map_err(|error| error.to_string())?;
    if file.format != FORMAT {
        return Err(format!("unknown format {}", file.format));
    }
    Ok(file.prefixes)
}

/// Replaces the file with `prefixes`, durably.
pub fn save(path: &Path, prefixes: Vec<SavedPrefix>) -> std::io::Result<()> {
    let file = CacheFile {
        format: FORMAT,
        prefixes,
    };
    let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    crate::util::atomic_file::replace(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_caches_come_back_stale_with_their_entries_and_revision() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("discovery-cache.json");
        let mut cache = PrefixCache::new(Bytes::from_static(b"v1/"));
        cache.replace(
            vec![(Bytes::from_static(b"v1/a"), Bytes::from_static(b"\x00\xff"))],
            7,
            1_000,
        );
        save(&path, vec![SavedPrefix::from_cache(&cache)]).unwrap();
        let restored: Vec<PrefixCache> = load(&path)
            .unwrap()
            .into_iter()
            .map(SavedPrefix::into_cache)
            .collect();
        assert_eq!(restored.len(), 1);
        let snapshot = restored[0].snapshot(&Bytes::from_static(b"v1/"), 3_000);
        assert!(snapshot.stale);
        assert_eq!(snapshot.revision, 7);
        assert_eq!(snapshot.age_ms, 2_000);
        assert_eq!(snapshot.entries[0].value, Bytes::from_static(b"\x00\xff"));
    }

    #[test]
    fn a_missing_file_is_empty_and_a_garbled_one_is_an_error() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("discovery-cache.json");
        assert!(load(&path).unwrap().is_empty());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).is_err());
    }
}
