//! Store and writer tests on real files (with fsync) in a temporary directory.

use std::time::Duration;

use super::*;

fn rec(feed: &str, n: u32) -> NewRecord {
    NewRecord {
        feed: feed.to_string(),
        control_id: format!("MSG{n:05}"),
        message_type: "ADT_A01".to_string(),
        raw: format!("MSH|^~\\&|LAB|SITE|||20240101||ADT^A01|MSG{n:05}|P|2.5\r").into_bytes(),
        received_at_ms: 1_700_000_000_000 + u64::from(n),
    }
}

fn open(dir: &tempfile::TempDir, limits: OutboxLimits) -> (Outbox, WriterHandle) {
    let outbox = Outbox::open(&dir.path().join("outbox.redb"), limits).expect("open outbox");
    let writer = Writer::spawn(outbox.clone()).expect("spawn writer");
    (outbox, writer)
}

async fn close(outbox: Outbox, writer: WriterHandle) {
    writer.shutdown().await;
    drop(writer);
    drop(outbox);
}

#[tokio::test]
async fn insert_commit_reopen_keeps_everything_and_ids_stay_monotonic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (outbox, writer) = open(&dir, OutboxLimits::default());
    let a = writer.insert(rec("lab", 1)).await.expect("insert 1");
    let b = writer.insert(rec("lab", 2)).await.expect("insert 2");
    let c = writer.insert(rec("adt", 3)).await.expect("insert 3");
    assert!(a < b && b < c, "ids increase: {a} {b} {c}");
    writer
        .set_ready(b, b"{\"resourceType\":\"Bundle\"}".to_vec())
        .await
        .expect("set ready");
    writer
        .quarantine(c, "PID-3 missing".into())
        .await
        .expect("quarantine");
    let before = outbox.stats().expect("stats");
    close(outbox, writer).await;

    let (outbox, writer) = open(&dir, OutboxLimits::default());
    assert_eq!(outbox.stats().expect("stats"), before);
    let ra = outbox.get(a).expect("get").expect("a exists");
    assert_eq!(ra.meta.state, RecordState::Received);
    assert_eq!(ra.raw.as_deref(), Some(rec("lab", 1).raw.as_slice()));
    assert_eq!(ra.meta.raw_sha256, sha256_hex(&rec("lab", 1).raw));
    assert_eq!(ra.meta.control_id, "MSG00001");
    let rb = outbox.get(b).expect("get").expect("b exists");
    assert_eq!(rb.meta.state, RecordState::Ready);
    assert_eq!(
        rb.bundle.as_deref(),
        Some(&b"{\"resourceType\":\"Bundle\"}"[..])
    );
    let rc = outbox.get(c).expect("get").expect("c exists");
    assert_eq!(
        rc.meta.state,
        RecordState::Quarantined {
            reason: "PID-3 missing".into()
        }
    );
    assert_eq!(outbox.pending_for_mapping().expect("pending"), vec![a]);

    // Ids continue after the reopen, never reused.
    let d = writer.insert(rec("lab", 4)).await.expect("insert 4");
    assert!(d > c, "id after reopen {d} must exceed {c}");
    close(outbox, writer).await;
}

#[tokio::test]
async fn full_limit_refuses_inserts_and_delivery_frees_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = rec("lab", 1).raw.len() as u64;
    let limits = OutboxLimits {
        max_bytes: one * 2 + one / 2,
        max_records: 100,
        max_age_ms: 0,
        ..OutboxLimits::default()
    };
    let (outbox, writer) = open(&dir, limits);
    let a = writer.insert(rec("lab", 1)).await.expect("insert 1");
    writer.insert(rec("lab", 2)).await.expect("insert 2");
    let err = writer
        .insert(rec("lab", 3))
        .await
        .expect_err("third must be refused");
    assert!(matches!(err, StoreError::Full { .. }), "got {err:?}");
    assert!(
        err.to_string().contains("outbox.redb"),
        "error names the file: {err}"
    );
    let stats = outbox.stats().expect("stats");
    assert_eq!(stats.received, 2);
    assert_eq!(stats.bytes, one * 2);

    writer.set_ready(a, vec![b'x'; 3]).await.expect("ready");
    writer.mark_delivered(a).await.expect("delivered");
    assert_eq!(outbox.stats().expect("stats").bytes, one);
    writer
        .insert(rec("lab", 3))
        .await
        .expect("space freed by delivery");

    // Record-count limit too.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let (outbox2, writer2) = open(
        &dir2,
        OutboxLimits {
            max_bytes: u64::MAX,
            max_records: 1,
            max_age_ms: 0,
            ..OutboxLimits::default()
        },
    );
    writer2.insert(rec("lab", 1)).await.expect("insert");
    assert!(matches!(
        writer2.insert(rec("lab", 2)).await,
        Err(StoreError::Full { .. })
    ));
    close(outbox2, writer2).await;
    close(outbox, writer).await;
}

#[tokio::test]
async fn state_transitions_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (outbox, writer) = open(&dir, OutboxLimits::default());
    let a = writer.insert(rec("lab", 1)).await.expect("insert");

    // Received cannot be delivered.
    let err = writer.mark_delivered(a).await.expect_err("not ready");
    assert!(
        matches!(
            err,
            StoreError::InvalidTransition {
                state: StateKind::Received,
                ..
            }
        ),
        "{err:?}"
    );
    writer
        .set_ready(a, b"bundle".to_vec())
        .await
        .expect("ready");
    assert!(matches!(
        writer.set_ready(a, b"again".to_vec()).await,
        Err(StoreError::InvalidTransition {
            state: StateKind::Ready,
            ..
        })
    ));
    writer.mark_delivered(a).await.expect("delivered");
    // A second PUBACK (republished record) is fine.
    writer.mark_delivered(a).await.expect("idempotent");
    let got = outbox.get(a).expect("get").expect("audit row");
    assert_eq!(got.meta.state, RecordState::Delivered);
    assert!(got.raw.is_none() && got.bundle.is_none(), "payloads pruned");
    assert_eq!(
        got.meta.bundle_sha256.as_deref(),
        Some(sha256_hex(b"bundle").as_str())
    );
    assert!(got.meta.delivered_at_ms.is_some());
    assert!(matches!(
        writer.quarantine(a, "late".into()).await,
        Err(StoreError::InvalidTransition {
            state: StateKind::Delivered,
            ..
        })
    ));
    assert!(matches!(
        writer.set_ready(RecordId(999), vec![]).await,
        Err(StoreError::NotFound { .. })
    ));

    let q = writer.insert(rec("lab", 2)).await.expect("insert");
    writer
        .quarantine(q, "bad".into())
        .await
        .expect("quarantine");
    assert!(matches!(
        writer.set_ready(q, vec![]).await,
        Err(StoreError::InvalidTransition {
            state: StateKind::Quarantined,
            ..
        })
    ));

    let stats = outbox.stats().expect("stats");
    assert_eq!(
        (
            stats.received,
            stats.ready,
            stats.quarantined,
            stats.delivered_total
        ),
        (0, 0, 1, 1)
    );
    assert_eq!(stats.audit_rows, 1);

    let listed = outbox
        .list(&ListFilter {
            state: Some(StateKind::Quarantined),
            ..Default::default()
        })
        .expect("list");
    assert_eq!(listed.iter().map(|m| m.id).collect::<Vec<_>>(), vec![q]);
    let all = outbox.list(&ListFilter::default()).expect("list all");
    assert_eq!(all.iter().map(|m| m.id).collect::<Vec<_>>(), vec![a, q]);

    // Audit pruning honours the retention.
    assert_eq!(
        writer
            .prune_audit(Duration::from_secs(3600))
            .await
            .expect("prune"),
        0
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(writer.prune_audit(Duration::ZERO).await.expect("prune"), 1);
    assert!(outbox.get(a).expect("get").is_none());
    close(outbox, writer).await;
}

#[tokio::test]
async fn next_ready_keeps_feed_order_and_waits_for_a_received_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (outbox, writer) = open(&dir, OutboxLimits::default());
    let l1 = writer.insert(rec("lab", 1)).await.expect("insert");
    let a1 = writer.insert(rec("adt", 2)).await.expect("insert");
    let l2 = writer.insert(rec("lab", 3)).await.expect("insert");
    let l3 = writer.insert(rec("lab", 4)).await.expect("insert");
    writer.set_ready(l2, b"b2".to_vec()).await.expect("ready");
    writer.set_ready(l3, b"b3".to_vec()).await.expect("ready");

    // Head of "lab" is still Received: it is returned (the publisher must wait), not skipped.
    let head = outbox.next_ready("lab", None).expect("next").expect("head");
    assert_eq!(head.id(), l1);
    assert_eq!(head.meta.state, RecordState::Received);
    assert!(head.bundle.is_none());

    // Quarantine of the head unblocks the feed; the next is l2 with its bundle.
    writer.quarantine(l1, "unmappable".into()).await.expect("q");
    let head = outbox.next_ready("lab", None).expect("next").expect("head");
    assert_eq!((head.id(), head.bundle.as_deref()), (l2, Some(&b"b2"[..])));
    let next = outbox
        .next_ready("lab", Some(l2))
        .expect("next")
        .expect("l3");
    assert_eq!(next.id(), l3);
    assert!(outbox.next_ready("lab", Some(l3)).expect("next").is_none());
    assert!(
        outbox
            .next_ready("lab", Some(RecordId(u64::MAX)))
            .expect("next")
            .is_none()
    );

    // Feeds are independent.
    assert_eq!(
        outbox
            .next_ready("adt", None)
            .expect("next")
            .map(|r| r.id()),
        Some(a1)
    );
    assert!(outbox.next_ready("nope", None).expect("next").is_none());

    writer.mark_delivered(l2).await.expect("delivered");
    assert_eq!(
        outbox
            .next_ready("lab", None)
            .expect("next")
            .map(|r| r.id()),
        Some(l3)
    );
    close(outbox, writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_concurrent_inserts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (outbox, writer) = open(&dir, OutboxLimits::default());
    let base = outbox.commit_count();
    let mut changes = outbox.subscribe_changes();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200u32 {
        let w = writer.clone();
        tasks.spawn(async move { w.insert(rec(&format!("feed{}", n % 7), n)).await });
    }
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ids.push(r.expect("task").expect("insert"));
    }
    let commits = outbox.commit_count() - base;
    eprintln!("group commit: 200 inserts in {commits} commits");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every insert got its own id");
    assert!(
        commits < 100,
        "200 inserts took {commits} commits: group commit is not batching"
    );
    assert!(
        changes.has_changed().expect("watch alive"),
        "watchers were told"
    );
    changes.borrow_and_update();
    assert_eq!(outbox.stats().expect("stats").received, 200);
    assert_eq!(outbox.pending_for_mapping().expect("pending").len(), 200);
    close(outbox, writer).await;
}

#[tokio::test]
async fn shutdown_refuses_later_ops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (outbox, writer) = open(&dir, OutboxLimits::default());
    writer.insert(rec("lab", 1)).await.expect("insert");
    writer.shutdown().await;
    assert!(matches!(
        writer.insert(rec("lab", 2)).await,
        Err(StoreError::Closed)
    ));
    drop(outbox);
    // The file is released: it can be opened again.
    let (outbox, writer) = open(&dir, OutboxLimits::default());
    assert_eq!(outbox.stats().expect("stats").received, 1);
    close(outbox, writer).await;
}

#[test]
fn corrupt_meta_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.redb");
    {
        let outbox = Outbox::open(&path, OutboxLimits::default()).expect("open");
        drop(outbox);
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("write");
        {
            let def: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("records_meta");
            let mut t = txn.open_table(def).expect("table");
            t.insert(7, &b"{not json"[..]).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let outbox = Outbox::open(&path, OutboxLimits::default()).expect("open");
    let err = outbox.get(RecordId(7)).expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("#7"), "{err}");
}

#[tokio::test]
async fn dead_letter_and_retry_move_records_and_keep_counts_right() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (outbox, writer) = open(&dir, OutboxLimits::default());
    let a = writer.insert(rec("adt", 1)).await.expect("insert");
    let b = writer.insert(rec("adt", 2)).await.expect("insert");
    // Dead-lettering needs a Bundle (Ready).
    assert!(matches!(
        writer.dead_letter(a, "x".into()).await,
        Err(StoreError::InvalidTransition { .. })
    ));
    writer
        .set_ready_with(
            a,
            b"{}".to_vec(),
            BundleInfo {
                message_id: Some("M1".into()),
                key_id: Some("k".into()),
            },
        )
        .await
        .expect("ready");
    writer
        .dead_letter(a, "broker refused: NotAuthorized (0x87)".into())
        .await
        .expect("dead-letter");
    writer
        .quarantine(b, "PID-3 missing".into())
        .await
        .expect("q");
    let s = outbox.stats().expect("stats");
    assert_eq!((s.ready, s.dead_lettered, s.quarantined), (0, 1, 1));
    // Parked records do not block their feed.
    assert_eq!(outbox.next_ready("adt", None).expect("next"), None);
    let meta = outbox.get_meta(a).expect("meta").expect("a");
    assert_eq!(meta.message_id.as_deref(), Some("M1"));
    assert_eq!(meta.key_id.as_deref(), Some("k"));

    let epoch = outbox.retry_epoch();
    assert_eq!(writer.retry(a).await.expect("retry"), StateKind::Ready);
    assert_eq!(writer.retry(b).await.expect("retry"), StateKind::Received);
    assert!(
        outbox.retry_epoch() > epoch,
        "publishers are told to rewind"
    );
    assert_eq!(outbox.pending_for_mapping().expect("pending"), vec![b]);
    assert_eq!(
        outbox
            .next_ready("adt", None)
            .expect("next")
            .map(|r| r.id()),
        Some(a)
    );
    assert_eq!(outbox.pending_count("adt").expect("count"), 2);
    let s = outbox.stats().expect("stats");
    assert_eq!(
        (s.received, s.ready, s.dead_lettered, s.quarantined),
        (1, 1, 0, 0)
    );
    // Retrying a live record is refused.
    assert!(matches!(
        writer.retry(a).await,
        Err(StoreError::InvalidTransition { .. })
    ));
    writer.mark_delivered(a).await.expect("delivered");
    assert!(matches!(
        writer.retry(a).await,
        Err(StoreError::InvalidTransition {
            state: StateKind::Delivered,
            ..
        })
    ));
    assert_eq!(writer.purge_delivered().await.expect("purge"), 1);
    assert_eq!(outbox.get_meta(a).expect("meta"), None);
    let c = outbox.feed_counters();
    assert_eq!(c["adt"].received, 2);
    assert_eq!(c["adt"].delivered, 1);
    assert_eq!(c["adt"].dead_lettered, 1);
    assert_eq!(c["adt"].quarantined, 1);
    close(outbox, writer).await;
}

#[tokio::test]
async fn max_age_refuses_new_messages_while_the_oldest_pending_is_too_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = OutboxLimits {
        max_age_ms: 60_000,
        ..OutboxLimits::default()
    };
    let (outbox, writer) = open(&dir, limits);
    // rec() is received in 2023: far older than a minute.
    let old = writer.insert(rec("lab", 1)).await.expect("first insert");
    let err = writer
        .insert(rec("adt", 2))
        .await
        .expect_err("oldest pending is too old");
    assert!(matches!(err, StoreError::TooOld { .. }), "{err:?}");
    assert!(err.is_full());
    assert!(err.to_string().contains("max_age_secs"), "{err}");
    let s = outbox.stats().expect("stats");
    assert!(s.refusing);
    assert_eq!(s.refused_total, 1);
    assert_eq!(s.oldest_pending_ms, Some(rec("lab", 1).received_at_ms));
    // Parking the old record (quarantine) lifts the refusal.
    writer.quarantine(old, "bad".into()).await.expect("q");
    let mut fresh = rec("adt", 3);
    fresh.received_at_ms = now_ms();
    writer.insert(fresh).await.expect("accepted again");
    assert!(!outbox.stats().expect("stats").refusing);
    close(outbox, writer).await;
}

#[test]
fn state_names_round_trip() {
    for k in [
        StateKind::Received,
        StateKind::Ready,
        StateKind::Delivered,
        StateKind::Quarantined,
        StateKind::DeadLettered,
    ] {
        assert_eq!(StateKind::parse(&k.to_string()), Some(k));
    }
    assert_eq!(StateKind::parse("bogus"), None);
}

#[test]
fn a_second_process_sees_the_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.redb");
    let _held = Outbox::open(&path, OutboxLimits::default()).expect("first open");
    let err = Outbox::open(&path, OutboxLimits::default()).expect_err("second open");
    assert!(err.is_locked(), "{err:?}");
}

/// A power cut between checkpoints, in one process: the files are copied while the daemon's
/// handle is still open (what is on disk then is what a crash leaves: redb at its last
/// checkpoint, the journal with every batch since). Opening the copy stores every accepted
/// message again, under its id, with its duplicates-window entry; a later id never reuses one.
#[tokio::test]
async fn a_crash_between_checkpoints_is_repaired_from_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = OutboxLimits {
        checkpoint_interval_ms: 3_600_000,
        ..OutboxLimits::default()
    };
    let (outbox, writer) = open(&dir, limits.clone());
    let a = writer.insert(rec("lab", 1)).await.expect("insert 1");
    let b = writer.insert(rec("lab", 2)).await.expect("insert 2");
    let raw = b"MSH|^~\\&|PAS|RRV|||20240101||ADT^A01|D1|P|2.4\r".to_vec();
    let dedup = DedupInsert {
        record: NewRecord {
            raw: raw.clone(),
            ..rec("adt", 3)
        },
        key: DedupKey::new("adt", "PAS", "RRV", "D1", &raw),
        window_ms: 3_600_000,
        on_conflict: ConflictPolicy::Accept,
    };
    let DedupOutcome::Stored(c) = writer.insert_dedup(dedup.clone()).await.expect("dedup") else {
        panic!("first sighting must be stored");
    };
    writer.set_ready(a, b"{}".to_vec()).await.expect("ready");

    let crashed = tempfile::tempdir().expect("tempdir");
    for name in ["outbox.redb", "outbox.redb.journal"] {
        std::fs::copy(dir.path().join(name), crashed.path().join(name)).expect("copy");
    }
    close(outbox, writer).await;

    let (outbox, writer) = open(&crashed, limits);
    for (id, n) in [(a, 1), (b, 2)] {
        let r = outbox.get(id).expect("get").expect("restored");
        // Restored as received: the Bundle of `a` was not checkpointed and is mapped again.
        assert_eq!(r.meta.state, RecordState::Received);
        assert_eq!(r.raw.as_deref(), Some(rec("lab", n).raw.as_slice()));
    }
    assert_eq!(
        outbox.pending_for_mapping().expect("pending"),
        vec![a, b, c]
    );
    let stats = outbox.stats().expect("stats");
    assert_eq!(stats.received, 3);
    // The duplicates window came back too: the re-sent message is recognised.
    let again = writer.insert_dedup(dedup).await.expect("dedup again");
    assert!(
        matches!(again, DedupOutcome::Duplicate { original, .. } if original == c),
        "{again:?}"
    );
    let d = writer.insert(rec("lab", 4)).await.expect("insert 4");
    assert!(d > c, "id after recovery {d} must exceed {c}");
    close(outbox, writer).await;
}
