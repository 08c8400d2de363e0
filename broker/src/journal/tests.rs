//! Behaviour of the journal through its public API, on temp files.

use super::*;
use redb::ReadableTable;
use std::fs;
use std::path::Path;
use tempfile::TempDir;

const BIG: u64 = u64::MAX;

fn settings(dir: &TempDir, classes: &[(&str, u64, WhenFull)]) -> JournalSettings {
    JournalSettings {
        path: dir.path().join("data").join("journal.redb"),
        classes: classes
            .iter()
            .map(|(name, max_bytes, when_full)| ClassLimits {
                name: (*name).to_owned(),
                max_bytes: *max_bytes,
                when_full: *when_full,
            })
            .collect(),
        reserve_bytes: 0,
    }
}

fn two_classes(dir: &TempDir) -> JournalSettings {
    settings(
        dir,
        &[
            ("prefill", BIG, WhenFull::Reject),
            ("decode", BIG, WhenFull::Reject),
        ],
    )
}

fn msg(i: u64) -> NewMessage {
    let mut headers = Headers::new();
    headers.insert("n", i.to_string());
    NewMessage {
        subject: Text::from(format!("subj.{i}")),
        reply: (i % 5 == 0).then(|| Text::from("reply.to")),
        headers,
        payload: Bytes::from(format!("payload-{i:06}")),
        accepted_at_ms: 1_000 + i,
        stamp: None,
    }
}

/// A message of exactly `size` budget bytes (1-byte subject, no headers).
fn sized(size: usize, accepted_at_ms: u64) -> NewMessage {
    NewMessage {
        subject: Text::from("s"),
        reply: None,
        headers: Headers::new(),
        payload: Bytes::from(vec![b'x'; size - 1]),
        accepted_at_ms,
        stamp: None,
    }
}

fn size_of(message: &NewMessage) -> u64 {
    record::EncodedBatch::encode(message).messages[0].size
}

async fn append_range(journal: &Journal, class: usize, range: std::ops::Range<u64>) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in range {
        seqs.push(journal.append(class, msg(i)).await.unwrap().seq);
    }
    seqs
}

/// Keeps the writer thread out of its next transaction until dropped, so
/// that commands queue up meanwhile. Holding it across `.await` is the
/// point and harmless: only the writer thread (and reads, which tests do
/// not start while holding it) ever wait on this lock.
#[allow(clippy::readonly_write_lock)] // exclusive on purpose: it shuts out the writer
fn hold_writer(journal: &Journal) -> std::sync::RwLockWriteGuard<'_, Option<redb::Database>> {
    journal.inner.shared.db.write().unwrap()
}

/// Appends `messages` in call order while the writer is held off the
/// database, so (nearly) all of them share one group commit.
#[allow(clippy::await_holding_lock)] // see `hold_writer`
async fn append_grouped(
    journal: &Journal,
    class: usize,
    messages: impl IntoIterator<Item = NewMessage>,
) -> Vec<Appended> {
    let gate = hold_writer(journal);
    let mut pending = Vec::new();
    for message in messages {
        pending.push(journal.submit(class, message).await.unwrap());
    }
    drop(gate);
    futures::future::join_all(pending)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

fn payload_index(message: &StoredMessage) -> u64 {
    std::str::from_utf8(&message.payload).unwrap()["payload-".len()..]
        .parse()
        .unwrap()
}

#[tokio::test]
async fn appends_read_back_in_order_per_class() {
    let dir = TempDir::new().unwrap();
    let (journal, report) = Journal::open(two_classes(&dir)).unwrap();
    assert!(report.quarantined.is_none());
    assert_eq!(report.classes, vec![ClassBacklog::default(); 2]);
    assert_eq!(
        append_range(&journal, 0, 0..10).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(append_range(&journal, 1, 100..103).await, vec![1, 2, 3]);

    let read = journal.read_after(0, 0, 100).await.unwrap().messages;
    assert_eq!(read.len(), 10);
    for (i, message) in read.iter().enumerate() {
        let original = msg(i as u64);
        assert_eq!(message.seq, i as u64 + 1);
        assert_eq!(message.subject, original.subject);
        assert_eq!(message.reply, original.reply);
        assert_eq!(message.headers, original.headers);
        assert_eq!(message.payload, original.payload);
        assert_eq!(message.accepted_at_ms, original.accepted_at_ms);
    }
    let page = journal.read_after(0, 4, 3).await.unwrap().messages;
    assert_eq!(
        page.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert!(journal
        .read_after(0, 10, 5)
        .await
        .unwrap()
        .messages
        .is_empty());
    assert!(journal
        .read_after(0, 0, 0)
        .await
        .unwrap()
        .messages
        .is_empty());
    let decode = journal.read_after(1, 0, 10).await.unwrap().messages;
    assert_eq!(
        decode.iter().map(payload_index).collect::<Vec<_>>(),
        vec![100, 101, 102]
    );
    assert!(matches!(
        journal.append(2, msg(0)).await,
        Err(JournalError::UnknownClass(2))
    ));
}

#[tokio::test]
async fn reads_span_many_rows_of_a_large_group() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    // 2,000 appends of 1 KiB in about one group: many rows per group.
    let messages = (0..2_000u64).map(|i| {
        let mut message = sized(1024, i);
        message.payload = Bytes::from(format!("{i:0>1023}"));
        message
    });
    let seqs: Vec<u64> = append_grouped(&journal, 0, messages)
        .await
        .iter()
        .map(|a| a.seq)
        .collect();
    assert_eq!(seqs, (1..=2_000).collect::<Vec<_>>());
    assert!(journal.stats().commits <= 2);
    let mut after = 0;
    let mut seen = 0;
    loop {
        let page = journal.read_after(0, after, 333).await.unwrap().messages;
        if page.is_empty() {
            break;
        }
        for message in &page {
            seen += 1;
            assert_eq!(message.seq, after + 1);
            after = message.seq;
        }
    }
    assert_eq!(seen, 2_000);
    assert_eq!(journal.backlog(0).bytes, 2_000 * 1024);
}

#[tokio::test]
async fn sequence_survives_confirm_and_reopen() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    {
        let (journal, _) = Journal::open(settings.clone()).unwrap();
        append_range(&journal, 0, 0..5).await;
        journal.confirm(0, 5).await.unwrap();
        assert_eq!(journal.backlog(0).messages, 0);
        assert_eq!(journal.backlog(0).last_seq, 5);
        assert_eq!(journal.append(0, msg(5)).await.unwrap().seq, 6);
    }
    let (journal, report) = Journal::open(settings.clone()).unwrap();
    assert_eq!(report.classes[0].last_seq, 6);
    assert_eq!(report.classes[0].first_seq, 6);
    journal.confirm(0, 6).await.unwrap();
    assert!(journal.compact_if_empty().await.is_ok());
    drop(journal);
    let (journal, report) = Journal::open(settings).unwrap();
    assert_eq!(report.classes[0].messages, 0);
    assert_eq!(report.classes[0].last_seq, 6);
    assert_eq!(journal.append(0, msg(7)).await.unwrap().seq, 7);
}

#[tokio::test]
async fn reopen_keeps_everything_and_classes_are_found_by_name() {
    let dir = TempDir::new().unwrap();
    {
        let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
        append_range(&journal, 0, 0..50).await;
        append_range(&journal, 1, 50..60).await;
    }
    // Same classes, other order: ids change, contents follow the names.
    let reordered = settings(
        &dir,
        &[
            ("decode", BIG, WhenFull::Reject),
            ("prefill", BIG, WhenFull::Reject),
        ],
    );
    let (journal, report) = Journal::open(reordered).unwrap();
    assert!(report.quarantined.is_none());
    assert_eq!(report.classes[0].messages, 10);
    assert_eq!(report.classes[1].messages, 50);
    assert_eq!(report.classes[1].oldest_accepted_ms, Some(1_000));
    let prefill = journal.read_after(1, 0, 1_000).await.unwrap().messages;
    assert_eq!(
        prefill.iter().map(payload_index).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    let decode = journal.read_after(0, 0, 1_000).await.unwrap().messages;
    assert_eq!(
        decode.iter().map(payload_index).collect::<Vec<_>>(),
        (50..60).collect::<Vec<_>>()
    );
    assert_eq!(journal.backlog(0), report.classes[0]);
}

#[tokio::test]
async fn confirm_trims_rows_and_skips_confirmed_part_of_a_row() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    // One group, one row: confirming 1..=37 leaves a partial row.
    append_grouped(&journal, 0, (0..100).map(msg)).await;
    let all_bytes = journal.backlog(0).bytes;
    journal.confirm(0, 37).await.unwrap();
    let backlog = journal.backlog(0);
    assert_eq!(backlog.messages, 63);
    assert_eq!(backlog.first_seq, 38);
    assert_eq!(backlog.oldest_accepted_ms, Some(1_000 + 37));
    {
        let db = journal.inner.shared.db.read().unwrap();
        let txn = redb::ReadableDatabase::begin_read(db.as_ref().unwrap()).unwrap();
        let rows = txn.open_table(store::BATCHES).unwrap();
        let (first, _) = rows.first().unwrap().unwrap();
        assert!(first.value().1 <= 37, "the partly confirmed row stays");
    }
    let read = journal.read_after(0, 0, 1_000).await.unwrap().messages;
    assert_eq!(read.first().map(|m| m.seq), Some(38));
    assert_eq!(read.len(), 63);
    let gone: u64 = (0..37).map(|i| size_of(&msg(i))).sum();
    assert_eq!(backlog.bytes, all_bytes - gone);
    // Confirming backwards or twice changes nothing.
    journal.confirm(0, 10).await.unwrap();
    journal.confirm(0, 37).await.unwrap();
    assert_eq!(journal.backlog(0), backlog);
    // Rows are gone once fully confirmed, also across a reopen.
    journal.confirm(0, 100).await.unwrap();
    assert_eq!(journal.backlog(0).messages, 0);
    assert_eq!(journal.backlog(0).bytes, 0);
    assert_eq!(journal.backlog(0).oldest_accepted_ms, None);
    let path = journal.path().to_path_buf();
    drop(journal);
    let db = redb::Database::open(&path).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let rows = txn.open_table(store::BATCHES).unwrap();
    assert_eq!(redb::ReadableTableMetadata::len(&rows).unwrap(), 0);
}

#[tokio::test]
async fn partial_rows_survive_reopen() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    {
        let (journal, _) = Journal::open(settings.clone()).unwrap();
        append_grouped(&journal, 0, (0..100).map(msg)).await;
        journal.confirm(0, 50).await.unwrap();
    }
    let (journal, report) = Journal::open(settings).unwrap();
    assert!(report.quarantined.is_none(), "{:?}", report.reason);
    assert_eq!(report.classes[0].first_seq, 51);
    assert_eq!(report.classes[0].oldest_accepted_ms, Some(1_050));
    let read = journal.read_after(0, 0, 10).await.unwrap().messages;
    assert_eq!(read[0].seq, 51);
}

#[tokio::test]
async fn reject_budget_refuses_and_keeps_everything() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(settings(&dir, &[("kv", 1_000, WhenFull::Reject)])).unwrap();
    for i in 0..10 {
        journal.append(0, sized(100, i)).await.unwrap();
    }
    match journal.append(0, sized(1, 10)).await {
        Err(JournalError::Full { class, max_bytes }) => {
            assert_eq!(class, "kv");
            assert_eq!(max_bytes, 1_000);
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(matches!(
        journal.append(0, sized(2_000, 0)).await,
        Err(JournalError::Full { .. })
    ));
    assert_eq!(journal.stats().rejected_full, 2);
    let backlog = journal.backlog(0);
    assert_eq!((backlog.messages, backlog.bytes), (10, 1_000));
    assert_eq!(
        journal.read_after(0, 0, 100).await.unwrap().messages.len(),
        10
    );
    // Room again after a confirm; the rejected appends used no sequence.
    journal.confirm(0, 1).await.unwrap();
    assert_eq!(journal.append(0, sized(100, 11)).await.unwrap().seq, 11);
}

#[tokio::test]
async fn drop_oldest_makes_room_and_counts() {
    let dir = TempDir::new().unwrap();
    let (journal, _) =
        Journal::open(settings(&dir, &[("kv", 1_000, WhenFull::DropOldest)])).unwrap();
    for i in 0..10 {
        assert_eq!(
            journal
                .append(0, sized(100, i))
                .await
                .unwrap()
                .dropped_oldest,
            0
        );
    }
    let appended = journal.append(0, sized(250, 10)).await.unwrap();
    assert_eq!(appended.seq, 11);
    assert_eq!(appended.dropped_oldest, 3);
    let backlog = journal.backlog(0);
    assert_eq!(backlog.messages, 8);
    assert_eq!(backlog.bytes, 950);
    assert_eq!(backlog.first_seq, 4);
    assert_eq!(backlog.oldest_accepted_ms, Some(3));
    assert_eq!(journal.stats().dropped_oldest, 3);
    let seqs: Vec<u64> = journal
        .read_after(0, 0, 100)
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, (4..=11).collect::<Vec<_>>());
    // Many concurrent appends in one group: drops reach into the same group's messages.
    let results = append_grouped(&journal, 0, (0..50).map(|i| sized(300, 100 + i))).await;
    let dropped: u64 = results.iter().map(|r| r.dropped_oldest).sum();
    let backlog = journal.backlog(0);
    assert!(backlog.bytes <= 1_000, "{backlog:?}");
    assert_eq!(backlog.messages, 3);
    assert_eq!(dropped, 8 + 50 - 3);
    assert_eq!(backlog.last_seq, 61);
    let seqs: Vec<u64> = journal
        .read_after(0, 0, 100)
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, vec![59, 60, 61]);
}

#[tokio::test]
async fn expiry_removes_the_old_head_only() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    for t in [10, 20, 30, 40, 50] {
        journal.append(0, sized(10, t)).await.unwrap();
    }
    assert_eq!(
        journal.expire_older_than(0, 5).await.unwrap(),
        Removed::default()
    );
    let removed = journal.expire_older_than(0, 35).await.unwrap();
    assert_eq!(
        removed,
        Removed {
            messages: 3,
            bytes: 30
        }
    );
    let backlog = journal.backlog(0);
    assert_eq!(backlog.oldest_accepted_ms, Some(40));
    assert_eq!(backlog.first_seq, 4);
    assert_eq!(journal.stats().expired, 3);
    assert_eq!(
        journal.read_after(0, 0, 10).await.unwrap().messages[0].seq,
        4
    );
    let removed = journal.expire_older_than(0, 1_000).await.unwrap();
    assert_eq!(removed.messages, 2);
    assert_eq!(journal.backlog(0).messages, 0);
    assert_eq!(journal.backlog(1), ClassBacklog::default());
}

#[tokio::test]
async fn backlog_numbers() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    let a = sized(40, 7_000);
    let b = sized(60, 8_000);
    journal.append(1, a).await.unwrap();
    journal.append(1, b).await.unwrap();
    assert_eq!(
        journal.backlog(1),
        ClassBacklog {
            messages: 2,
            bytes: 100,
            oldest_accepted_ms: Some(7_000),
            first_seq: 1,
            last_seq: 2,
        }
    );
    assert_eq!(journal.backlog(0), ClassBacklog::default());
    assert_eq!(journal.backlog(9), ClassBacklog::default());
    let message = msg(3);
    let expected = message.subject.len()
        + message.reply.as_ref().map_or(0, |r| r.len())
        + message
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
        + message.payload.len();
    journal.append(0, message).await.unwrap();
    assert_eq!(journal.backlog(0).bytes, expected as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // see `hold_writer`
async fn group_commit_batches_concurrent_appends() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    // Hold the writer off the database while the appends queue up, so the
    // outcome does not depend on how fast this machine produces them.
    let gate = hold_writer(&journal);
    // Counted once queued: the writer may already have taken some of them
    // into its first group (blocked on the gate), so the channel's length
    // alone cannot say when all are in.
    let submitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..10_000u64)
        .map(|i| {
            let journal = journal.clone();
            let submitted = Arc::clone(&submitted);
            tokio::spawn(async move {
                let pending = journal.submit((i % 2) as usize, msg(i)).await?;
                submitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                pending.await
            })
        })
        .collect();
    while submitted.load(std::sync::atomic::Ordering::Relaxed) < 10_000 {
        tokio::task::yield_now().await;
    }
    drop(gate);
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let commits = journal.stats().commits;
    assert!(commits <= 10, "10k appends took {commits} commits");
    assert_eq!(journal.stats().appended, 10_000);
    assert_eq!(journal.backlog(0).messages, 5_000);
    assert_eq!(journal.backlog(1).last_seq, 5_000);
    // Per class, sequence order is the order the writer received them.
    let read = journal.read_after(0, 0, 10_000).await.unwrap().messages;
    assert_eq!(read.len(), 5_000);
    assert!(read.windows(2).all(|pair| pair[1].seq == pair[0].seq + 1));
}

#[tokio::test]
async fn submit_keeps_call_order_with_many_in_flight() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    let mut pending = Vec::new();
    for i in 0..3_000u64 {
        pending.push(journal.submit(0, msg(i)).await.unwrap());
    }
    let results = futures::future::join_all(pending).await;
    let seqs: Vec<u64> = results.into_iter().map(|r| r.unwrap().seq).collect();
    assert_eq!(seqs, (1..=3_000).collect::<Vec<_>>());
    assert!(journal.stats().commits < 3_000);
    let read = journal.read_after(0, 0, 10_000).await.unwrap().messages;
    let order: Vec<u64> = read.iter().map(payload_index).collect();
    assert_eq!(order, (0..3_000).collect::<Vec<_>>());
}

#[tokio::test]
async fn compact_only_when_empty_and_the_file_shrinks() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    let path = journal.path().to_path_buf();
    for chunk in 0..8u64 {
        append_grouped(
            &journal,
            0,
            (0..1_000).map(|i| sized(4_000, chunk * 1_000 + i)),
        )
        .await;
    }
    journal.append(1, msg(1)).await.unwrap();
    let full = fs::metadata(&path).unwrap().len();
    assert!(full > 30_000_000, "file is {full} bytes");
    journal.confirm(0, 8_000).await.unwrap();
    assert!(
        !journal.compact_if_empty().await.unwrap(),
        "class 1 is not empty"
    );
    journal.confirm(1, 1).await.unwrap();
    assert!(journal.compact_if_empty().await.unwrap());
    assert_eq!(journal.stats().compactions, 1);
    let compacted = fs::metadata(&path).unwrap().len();
    assert!(compacted < full / 4, "{full} -> {compacted} bytes");
    // Still a working journal, sequence intact, also after a reopen.
    assert_eq!(journal.append(0, msg(0)).await.unwrap().seq, 8_001);
    assert_eq!(
        journal.read_after(0, 0, 10).await.unwrap().messages.len(),
        1
    );
    assert!(!journal.compact_if_empty().await.unwrap(), "not empty");
    drop(journal);
    assert!(!reclaim::fresh_path(&path).exists());
    let (journal, report) = Journal::open(two_classes(&dir)).unwrap();
    assert!(report.quarantined.is_none());
    assert_eq!(report.classes[0].first_seq, 8_001);
    assert_eq!(report.classes[1].last_seq, 1);
    assert_eq!(journal.append(1, msg(2)).await.unwrap().seq, 2);
}

#[tokio::test]
async fn compaction_keeps_rows_of_unconfigured_classes() {
    let dir = TempDir::new().unwrap();
    {
        let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
        journal.append(1, msg(7)).await.unwrap();
    }
    // `decode` is no longer configured; its message stays in the file.
    let only_prefill = settings(&dir, &[("prefill", BIG, WhenFull::Reject)]);
    let path = only_prefill.path.clone();
    let (journal, _) = Journal::open(only_prefill).unwrap();
    append_grouped(&journal, 0, (0..3_000).map(|i| sized(4_000, i))).await;
    journal.confirm(0, 3_000).await.unwrap();
    let before = fs::metadata(&path).unwrap().len();
    assert!(journal.compact_if_empty().await.unwrap());
    assert!(fs::metadata(&path).unwrap().len() < before / 2);
    drop(journal);
    let classes = inspect(&path).unwrap();
    assert_eq!(classes[0].0, "decode");
    assert_eq!(classes[0].1.messages, 1);
    let (journal, _) = Journal::open(two_classes(&dir)).unwrap();
    let read = journal.read_after(1, 0, 10).await.unwrap().messages;
    assert_eq!(read.iter().map(payload_index).collect::<Vec<_>>(), vec![7]);
    assert_eq!(journal.backlog(0).last_seq, 3_000);
}

#[tokio::test]
async fn second_open_of_the_same_file_is_in_use() {
    let dir = TempDir::new().unwrap();
    let (_journal, _) = Journal::open(two_classes(&dir)).unwrap();
    match Journal::open(two_classes(&dir)) {
        Err(JournalError::InUse(path)) => assert!(path.ends_with("journal.redb")),
        other => panic!("expected InUse, got {:?}", other.map(|(_, report)| report)),
    }
    assert!(matches!(
        inspect(&two_classes(&dir).path),
        Err(JournalError::InUse(_))
    ));
}

fn quarantined_files(dir: &TempDir) -> Vec<PathBuf> {
    fs::read_dir(dir.path().join("data"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().contains(".quarantined-"))
        .collect()
}

async fn assert_fresh_and_working(journal: &Journal, report: &OpenReport) {
    assert!(report
        .quarantined
        .as_ref()
        .is_some_and(|path| path.exists()));
    assert!(report.reason.is_some());
    assert_eq!(report.classes, vec![ClassBacklog::default(); 2]);
    assert_eq!(journal.append(0, msg(0)).await.unwrap().seq, 1);
    assert_eq!(
        journal.read_after(0, 0, 10).await.unwrap().messages.len(),
        1
    );
}

#[tokio::test]
async fn garbage_file_is_quarantined() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    fs::create_dir_all(settings.path.parent().unwrap()).unwrap();
    let garbage: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&settings.path, &garbage).unwrap();
    let (journal, report) = Journal::open(settings).unwrap();
    assert_fresh_and_working(&journal, &report).await;
    let moved = quarantined_files(&dir);
    assert_eq!(moved.len(), 1);
    assert_eq!(fs::read(&moved[0]).unwrap(), garbage);
}

#[tokio::test]
async fn truncated_file_is_quarantined() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    {
        let (journal, _) = Journal::open(settings.clone()).unwrap();
        for chunk in 0..4u64 {
            append_grouped(&journal, 0, (0..500).map(|i| sized(2_000, chunk * 500 + i))).await;
        }
    }
    let len = fs::metadata(&settings.path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&settings.path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (journal, report) = Journal::open(settings).unwrap();
    assert_fresh_and_working(&journal, &report).await;
    assert_eq!(quarantined_files(&dir).len(), 1);
}

#[tokio::test]
async fn counters_that_disagree_with_rows_are_quarantined() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    {
        let (journal, _) = Journal::open(settings.clone()).unwrap();
        append_range(&journal, 0, 0..10).await;
    }
    {
        let db = redb::Database::open(&settings.path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(store::META).unwrap();
            let key = store::meta_key("prefill", store::MetaField::NextSeq);
            meta.insert(key.as_str(), 20).unwrap();
            let key = store::meta_key("prefill", store::MetaField::Messages);
            meta.insert(key.as_str(), 19).unwrap();
        }
        txn.commit().unwrap();
    }
    let (journal, report) = Journal::open(settings).unwrap();
    assert!(
        report
            .reason
            .as_deref()
            .unwrap()
            .contains("last row ends at 10"),
        "{report:?}"
    );
    assert_fresh_and_working(&journal, &report).await;
}

/// Rewrites the row of `class` starting at `first_seq` in the closed
/// journal at `path` with `damage` applied to its bytes.
fn damage_row(path: &Path, class: &str, first_seq: u64, damage: impl FnOnce(&mut Vec<u8>)) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut rows = txn.open_table(store::BATCHES).unwrap();
        let mut row = rows
            .get((class, first_seq))
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        damage(&mut row);
        rows.insert((class, first_seq), row.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

/// Three rows of `prefill`: 1..=10, 11..=20, 21..=30 (one command each).
async fn three_rows(settings: &JournalSettings) {
    let (journal, _) = Journal::open(settings.clone()).unwrap();
    for rows in [0..10u64, 10..20, 20..30] {
        let pending = journal.submit_many(0, rows.map(msg).collect()).await;
        for result in pending.unwrap().await.unwrap() {
            result.unwrap();
        }
    }
}

#[tokio::test]
async fn a_damaged_row_costs_that_row_only() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    three_rows(&settings).await;
    damage_row(&settings.path, "prefill", 11, |row| {
        let middle = row.len() / 2;
        for byte in &mut row[middle..middle + 8] {
            *byte ^= 0xff;
        }
    });
    let (journal, report) = Journal::open(settings.clone()).unwrap();
    assert!(report.quarantined.is_none(), "{report:?}");
    assert_eq!(journal.backlog(0).messages, 30, "counted until they leave");
    let read = journal.read_after(0, 0, 100).await.unwrap();
    let seqs: Vec<u64> = read.messages.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (1..=10).chain(21..=30).collect();
    assert_eq!(seqs, expected, "the rows around it are delivered");
    assert_eq!(read.skipped, vec![(11, 20)]);
    // Found again by the next read: counted once.
    let again = journal.read_after(0, 10, 5).await.unwrap();
    assert_eq!(again.messages[0].seq, 21);
    let stats = journal.stats();
    assert_eq!((stats.corrupt_rows, stats.corrupt_messages), (1, 10));
    // Confirming what came before it takes it along: nothing else would.
    journal.confirm(0, 10).await.unwrap();
    assert_eq!(journal.backlog(0).first_seq, 21);
    assert_eq!(
        journal.stats().confirmed,
        10,
        "the damaged row is not counted as confirmed"
    );
    journal.confirm(0, 30).await.unwrap();
    assert_eq!(
        journal.backlog(0),
        ClassBacklog {
            last_seq: 30,
            ..ClassBacklog::default()
        }
    );
    drop(journal);
    let (_, report) = Journal::open(settings).unwrap();
    assert!(report.quarantined.is_none() && report.classes[0].messages == 0);
}

#[tokio::test]
async fn a_damaged_head_row_found_at_open_leaves_with_maintenance() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    three_rows(&settings).await;
    // The header's own checksum fails: where the row ends comes from the next row.
    damage_row(&settings.path, "prefill", 1, |row| row[10] ^= 1);
    let (journal, report) = Journal::open(settings.clone()).unwrap();
    assert!(report.quarantined.is_none(), "{report:?}");
    assert_eq!(
        journal.stats().corrupt_rows,
        1,
        "counted when found at open"
    );
    let read = journal.read_after(0, 0, 100).await.unwrap();
    assert_eq!(read.skipped, vec![(1, 10)]);
    assert_eq!(read.messages.first().map(|m| m.seq), Some(11));
    let health = journal.maintain().await.unwrap();
    assert_eq!(health.refusing, None);
    let backlog = journal.backlog(0);
    assert_eq!((backlog.first_seq, backlog.messages), (11, 20));
    assert_eq!(journal.stats().corrupt_rows, 1, "still counted once");
}

#[tokio::test]
async fn a_damaged_last_row_does_not_quarantine_or_wedge_the_class() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    three_rows(&settings).await;
    damage_row(&settings.path, "prefill", 21, |row| {
        let last = row.len() - 1;
        row[last] ^= 1;
    });
    let (journal, report) = Journal::open(settings.clone()).unwrap();
    assert!(report.quarantined.is_none(), "{report:?}");
    let read = journal.read_after(0, 0, 100).await.unwrap();
    assert_eq!(read.messages.len(), 20);
    assert_eq!(read.skipped, vec![(21, 30)]);
    journal.confirm(0, 20).await.unwrap();
    assert_eq!(
        journal.backlog(0).messages,
        0,
        "the damaged tail left with the rest"
    );
    // New messages carry on after it.
    assert_eq!(journal.append(0, msg(99)).await.unwrap().seq, 31);
}

#[tokio::test]
async fn inspect_a_closed_journal() {
    let dir = TempDir::new().unwrap();
    let settings = two_classes(&dir);
    {
        let (journal, _) = Journal::open(settings.clone()).unwrap();
        append_range(&journal, 0, 0..20).await;
        journal.confirm(0, 5).await.unwrap();
        append_range(&journal, 1, 0..3).await;
        journal.confirm(1, 3).await.unwrap();
    }
    let classes = inspect(&settings.path).unwrap();
    let names: Vec<&str> = classes.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, vec!["decode", "prefill"]);
    let prefill = classes[1].1;
    assert_eq!(prefill.messages, 15);
    assert_eq!((prefill.first_seq, prefill.last_seq), (6, 20));
    assert_eq!(prefill.oldest_accepted_ms, Some(1_005));
    let decode = classes[0].1;
    assert_eq!(
        decode,
        ClassBacklog {
            last_seq: 3,
            ..ClassBacklog::default()
        }
    );
    // Read-only: the relay opens it afterwards with the same picture.
    let (journal, report) = Journal::open(settings.clone()).unwrap();
    assert!(report.quarantined.is_none());
    assert_eq!(journal.backlog(0), prefill);
    assert!(matches!(
        inspect(&dir.path().join("missing.redb")),
        Err(JournalError::Storage(_))
    ));
}

#[test]
fn an_empty_file_left_by_an_interrupted_first_start_is_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let settings = two_classes(&dir);
    fs::create_dir_all(dir.path().join("data")).unwrap();
    fs::write(&settings.path, b"").unwrap();
    let (journal, report) = Journal::open(settings).unwrap();
    assert!(report.quarantined.is_none(), "{report:?}");
    drop(journal);
    let names: Vec<_> = fs::read_dir(dir.path().join("data"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["journal.redb"]);
}

#[tokio::test]
async fn submit_many_keeps_order_and_answers_each_message() {
    let dir = tempfile::tempdir().unwrap();
    // Room for about three messages: the rest of the group is refused one
    // by one, and nothing accepted is lost.
    let size = record::EncodedBatch::encode(&msg(0)).messages[0].size;
    let (journal, _) =
        Journal::open(settings(&dir, &[("kv", size * 3, WhenFull::Reject)])).unwrap();
    let first = journal
        .submit_many(0, (0..2).map(msg).collect())
        .await
        .unwrap();
    let second = journal
        .submit_many(0, (2..5).map(msg).collect())
        .await
        .unwrap();
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    let seqs: Vec<u64> = first
        .iter()
        .chain(second.iter())
        .filter_map(|result| result.as_ref().ok().map(|appended| appended.seq))
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(matches!(second[1], Err(JournalError::Full { .. })));
    assert!(matches!(second[2], Err(JournalError::Full { .. })));
    let stored = journal.read_after(0, 0, 10).await.unwrap().messages;
    let payloads: Vec<_> = stored
        .iter()
        .map(|message| message.payload.clone())
        .collect();
    assert_eq!(payloads, (0..3).map(|i| msg(i).payload).collect::<Vec<_>>());
}
