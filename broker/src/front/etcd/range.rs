//! Serializable Range requests answered from the relay: which cached
//! prefix can answer a request, and the etcd answer built from the cached
//! entries plus the keys the front end's own leases hold. Sans-IO.
//!
//! The discovery cache keeps keys and values, not etcd's per-key metadata:
//! an answer from the cache gives every key `create_revision` and
//! `mod_revision` equal to the revision the cache reflects, and version 1.
//! Requests that depend on that metadata (revision filters, sorting by
//! revision or version, reads at an old revision) go to etcd.

use bytes::Bytes;
use etcd_client::proto::{PbKeyValue, PbRangeRequest, PbRangeResponse, PbResponseHeader};

/// etcd's `SortOrder` values.
const SORT_DESCEND: i32 = 2;
/// etcd's `SortTarget` values.
const SORT_BY_KEY: i32 = 0;
const SORT_BY_VALUE: i32 = 4;

/// One key as answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Bytes,
    pub value: Bytes,
    pub lease: i64,
}

/// What to read from the discovery cache for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachePlan {
    /// One key: read it as a prefix and keep the exact match.
    Key(Bytes),
    /// Every key under the prefix.
    Prefix(Bytes),
}

impl CachePlan {
    /// The prefix to ask the discovery cache for.
    pub fn prefix(&self) -> &Bytes {
        match self {
            CachePlan::Key(key) | CachePlan::Prefix(key) => key,
        }
    }
}

/// Why a request cannot be answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotCacheable {
    #[error("a read at an old revision")]
    OldRevision,
    #[error("revision filters")]
    RevisionFilter,
    #[error("sorting by revision or version")]
    SortTarget,
    #[error("a range that is neither one key nor a prefix")]
    Range,
}

/// The end of the range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from the prefix on.
    vec![0]
}

/// How a serializable Range can be served from the cache.
pub fn cache_plan(request: &PbRangeRequest) -> Result<CachePlan, NotCacheable> {
    if request.revision > 0 {
        return Err(NotCacheable::OldRevision);
    }
    if request.min_mod_revision != 0
        || request.max_mod_revision != 0
        || request.min_create_revision != 0
        || request.max_create_revision != 0
    {
        return Err(NotCacheable::RevisionFilter);
    }
    if request.sort_order != 0
        && request.sort_target != SORT_BY_KEY
        && request.sort_target != SORT_BY_VALUE
    {
        return Err(NotCacheable::SortTarget);
    }
    let key = Bytes::copy_from_slice(&request.key);
    if request.range_end.is_empty() {
        return Ok(CachePlan::Key(key));
    }
    if request.key == [0] && request.range_end == [0] {
        return Ok(CachePlan::Prefix(Bytes::new()));
    }
    if request.range_end == prefix_end(&request.key) && !request.key.is_empty() {
        return Ok(CachePlan::Prefix(key));
    }
    Err(NotCacheable::Range)
}

/// The cached entries with the front end's own keys laid over them (its
/// keys win: they may be buffered, not in etcd yet), sorted by key.
pub fn overlay(cached: Vec<Entry>, own: Vec<Entry>) -> Vec<Entry> {
    let mut merged: std::collections::BTreeMap<Bytes, Entry> = cached
        .into_iter()
        .map(|entry| (entry.key.clone(), entry))
        .collect();
    for entry in own {
        merged.insert(entry.key.clone(), entry);
    }
    merged.into_values().collect()
}

/// Whether `key` lies in the request's range.
pub fn in_range(key: &[u8], start: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return key == start;
    }
    key >= start && (range_end == [0] || key < range_end)
}

/// The Range answer over `entries` (sorted by key) at `revision`.
pub fn answer(request: &PbRangeRequest, entries: Vec<Entry>, revision: i64) -> PbRangeResponse {
    let mut matched: Vec<Entry> = entries
        .into_iter()
        .filter(|entry| in_range(&entry.key, &request.key, &request.range_end))
        .collect();
    if request.sort_order != 0 && request.sort_target == SORT_BY_VALUE {
        matched.sort_by(|a, b| a.value.cmp(&b.value).then_with(|| a.key.cmp(&b.key)));
    }
    if request.sort_order == SORT_DESCEND {
        matched.reverse();
    }
    let count = matched.len();
    let limit = usize::try_from(request.limit).unwrap_or(0);
    let more = limit > 0 && count > limit;
    if limit > 0 {
        matched.truncate(limit);
    }
    let kvs = if request.count_only {
        Vec::new()
    } else {
        matched
            .into_iter()
            .map(|entry| key_value(entry, revision, request.keys_only))
            .collect()
    };
    PbRangeResponse {
        header: Some(header(revision)),
        kvs,
        more,
        count: i64::try_from(count).unwrap_or(i64::MAX),
    }
}

/// An etcd key-value with the metadata the relay can vouch for.
pub fn key_value(entry: Entry, revision: i64, keys_only: bool) -> PbKeyValue {
    PbKeyValue {
        key: entry.key.to_vec(),
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        value: if keys_only {
            Vec::new()
        } else {
            entry.value.to_vec()
        },
        lease: entry.lease,
    }
}

/// A response header saying the answer reflects `revision`.
pub fn header(revision: i64) -> PbResponseHeader {
    PbResponseHeader {
        cluster_id: 0,
        member_id: 0,
        revision,
        raft_term: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn entry(key: &str, value: &str, lease: i64) -> Entry {
        Entry {
            key: b(key),
            value: b(value),
            lease,
        }
    }

    fn request(key: &[u8], range_end: &[u8]) -> PbRangeRequest {
        PbRangeRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            serializable: true,
            ..PbRangeRequest::default()
        }
    }

    #[test]
    fn single_keys_and_prefixes_come_from_the_cache_other_ranges_do_not() {
        assert_eq!(
            cache_plan(&request(b"v1/a", b"")),
            Ok(CachePlan::Key(b("v1/a")))
        );
        assert_eq!(
            cache_plan(&request(b"v1/", b"v10")),
            Ok(CachePlan::Prefix(b("v1/")))
        );
        assert_eq!(
            cache_plan(&request(b"\0", b"\0")),
            Ok(CachePlan::Prefix(Bytes::new()))
        );
        assert_eq!(cache_plan(&request(b"a", b"c")), Err(NotCacheable::Range));
        let mut old = request(b"v1/", b"v10");
        old.revision = 5;
        assert_eq!(cache_plan(&old), Err(NotCacheable::OldRevision));
        let mut sorted = request(b"v1/", b"v10");
        sorted.sort_order = 1;
        sorted.sort_target = 3;
        assert_eq!(cache_plan(&sorted), Err(NotCacheable::SortTarget));
    }

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"abc"), b"abd".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn a_single_key_read_keeps_only_the_exact_match() {
        let entries = vec![entry("v1/a", "1", 0), entry("v1/ab", "2", 0)];
        let answer = answer(&request(b"v1/a", b""), entries, 9);
        assert_eq!(answer.count, 1);
        assert_eq!(answer.kvs[0].key, b"v1/a".to_vec());
        assert_eq!(answer.kvs[0].mod_revision, 9);
        assert_eq!(answer.header.map(|header| header.revision), Some(9));
    }

    #[test]
    fn own_keys_win_over_cached_ones() {
        let merged = overlay(
            vec![entry("a", "old", 0), entry("c", "3", 0)],
            vec![entry("a", "new", 7), entry("b", "2", 7)],
        );
        assert_eq!(
            merged,
            vec![entry("a", "new", 7), entry("b", "2", 7), entry("c", "3", 0)]
        );
    }

    #[test]
    fn limit_sort_keys_only_and_count_only_behave_like_etcd() {
        let entries = vec![
            entry("p/a", "3", 0),
            entry("p/b", "1", 0),
            entry("p/c", "2", 0),
        ];
        let mut limited = request(b"p/", b"p0");
        limited.limit = 2;
        limited.sort_order = SORT_DESCEND;
        let answer_limited = answer(&limited, entries.clone(), 1);
        assert_eq!(answer_limited.count, 3);
        assert!(answer_limited.more);
        assert_eq!(answer_limited.kvs[0].key, b"p/c".to_vec());
        let mut by_value = request(b"p/", b"p0");
        by_value.sort_order = 1;
        by_value.sort_target = SORT_BY_VALUE;
        by_value.keys_only = true;
        let answer_by_value = answer(&by_value, entries.clone(), 1);
        assert_eq!(answer_by_value.kvs[0].key, b"p/b".to_vec());
        assert!(answer_by_value.kvs[0].value.is_empty());
        let mut counted = request(b"p/", b"p0");
        counted.count_only = true;
        let answer_counted = answer(&counted, entries, 1);
        assert_eq!(answer_counted.count, 3);
        assert!(answer_counted.kvs.is_empty());
    }
}
