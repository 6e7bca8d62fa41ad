//! The duplicates window: a re-sent message is acknowledged again but stored (and forwarded)
//! only once.
//!
//! # Why in the outbox database
//!
//! The check and the insert must be one atomic step: if "seen" were recorded in another file or
//! another transaction, a crash between the two would either store a message twice or remember
//! one that was never stored. So the window is two extra tables in the outbox's redb file,
//! read and written inside the same group-commit transaction as the record itself
//! ([`WriteOp::InsertDedup`](super::WriteOp::InsertDedup)). It survives restarts like the
//! records do, and costs no extra fsync.
//!
//! # Key, content and window
//!
//! * **Key**: feed, sending application (MSH-3.1), sending facility (MSH-4.1) and control id
//!   (MSH-10), joined by U+001F.
//! * **Content**: SHA-256 of the message with its line endings normalised (`\r`, `\n`, `\r\n`
//!   alike, blank lines and a UTF-8 BOM ignored), so a sender re-framing the same message is
//!   still recognised.
//! * **Window**: an entry is valid for the feed's `duplicates.window_hours` after the first
//!   acceptance (a repeat does not extend it). Expired entries are ignored at once and removed a
//!   few at a time by later inserts (an index by expiry time keeps that O(1) per insert).
//!
//! # Outcomes
//!
//! Same key and same content within the window: [`DedupOutcome::Duplicate`], nothing written
//! (ingest answers `AA`/`CA` again). Same key, different content: the control id was reused
//! for another message; per feed policy it is stored as a new record and flagged
//! ([`DedupOutcome::StoredConflict`], the window then remembers the new content) or refused
//! ([`DedupOutcome::ConflictRefused`], ingest answers `AR`/`CR` with error 205).

use redb::{ReadableTable, StorageError, Table, TableDefinition};

use super::error::StoreError;
use super::store::{NewRecord, RecordId, WriteOp, WriteOutcome};
use super::writer::WriterHandle;

/// key -> [`Entry`] (56 bytes).
pub(super) const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new("dedup_window");
/// (expires_ms, key) -> (): what to prune next.
pub(super) const DEDUP_BY_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("dedup_by_expiry");

/// Expired entries removed per insert (keeps the table bounded without a sweeper task).
const PRUNE_PER_INSERT: usize = 8;

/// What identifies a message for duplicate detection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupKey {
    key: String,
    content_sha256: [u8; 32],
}

impl DedupKey {
    /// The key of a message of `feed` from `application`/`facility` (MSH-3.1/MSH-4.1) with
    /// control id `control_id` (MSH-10) and these raw bytes.
    pub fn new(
        feed: &str,
        application: &str,
        facility: &str,
        control_id: &str,
        raw: &[u8],
    ) -> DedupKey {
        DedupKey {
            key: [feed, application, facility, control_id].join("\u{1f}"),
            content_sha256: content_hash(raw),
        }
    }

    /// A key as the journal stored it.
    pub(super) fn from_parts(key: String, content_sha256: [u8; 32]) -> DedupKey {
        DedupKey {
            key,
            content_sha256,
        }
    }

    pub(super) fn key(&self) -> &str {
        &self.key
    }

    pub(super) fn content_sha256(&self) -> &[u8; 32] {
        &self.content_sha256
    }
}

/// SHA-256 of the message with line endings normalised and blank lines and a BOM dropped.
pub fn content_hash(raw: &[u8]) -> [u8; 32] {
    let body = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for line in body
        .split(|b| *b == b'\r' || *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
    {
        ctx.update(line);
        ctx.update(b"\r");
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// What to do when a control id comes back with different content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConflictPolicy {
    /// Store it as a new message and log a warning (default: never refuse clinical data
    /// because a sender's counter was reset).
    #[default]
    Accept,
    /// Refuse it (`AR`/`CR`, error 205 duplicate key identifier).
    Reject,
}

/// An insert guarded by the duplicates window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupInsert {
    pub record: NewRecord,
    pub key: DedupKey,
    /// How long an accepted message is remembered.
    pub window_ms: u64,
    pub on_conflict: ConflictPolicy,
}

/// The result of [`WriterHandle::insert_dedup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DedupOutcome {
    /// New: durably stored.
    Stored(RecordId),
    /// Seen before with the same content: nothing stored now.
    Duplicate {
        original: RecordId,
        first_seen_ms: u64,
    },
    /// Same key, different content, stored as a new record (policy `accept`).
    StoredConflict { id: RecordId, previous: RecordId },
    /// Same key, different content, refused (policy `reject`): nothing stored.
    ConflictRefused { previous: RecordId },
}

/// One remembered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    hash: [u8; 32],
    id: u64,
    seen_ms: u64,
    expires_ms: u64,
}

impl Entry {
    fn encode(&self) -> [u8; 56] {
        let mut b = [0u8; 56];
        b[..32].copy_from_slice(&self.hash);
        b[32..40].copy_from_slice(&self.id.to_be_bytes());
        b[40..48].copy_from_slice(&self.seen_ms.to_be_bytes());
        b[48..].copy_from_slice(&self.expires_ms.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?))
        };
        if b.len() != 56 {
            return None;
        }
        Some(Entry {
            hash: b.get(..32)?.try_into().ok()?,
            id: u64_at(32)?,
            seen_ms: u64_at(40)?,
            expires_ms: u64_at(48)?,
        })
    }
}

/// What the window knows about a key.
pub(super) enum Seen {
    New,
    /// Expired or undecodable entry: treat as new, but replace it.
    Stale(Entry),
    Same(Entry),
    Different(Entry),
}

pub(super) fn lookup(
    table: &Table<'_, &'static str, &'static [u8]>,
    key: &DedupKey,
    now: u64,
) -> Result<Seen, StorageError> {
    let Some(v) = table.get(key.key.as_str())? else {
        return Ok(Seen::New);
    };
    let Some(e) = Entry::decode(v.value()) else {
        tracing::warn!("outbox: an undecodable duplicates-window entry was replaced");
        return Ok(Seen::New);
    };
    Ok(if e.expires_ms <= now {
        Seen::Stale(e)
    } else if e.hash == key.content_sha256 {
        Seen::Same(e)
    } else {
        Seen::Different(e)
    })
}

/// The answer when nothing must be stored; `None`: go ahead and insert.
pub(super) fn short_circuit(seen: &Seen, policy: ConflictPolicy) -> Option<DedupOutcome> {
    match seen {
        Seen::Same(e) => Some(DedupOutcome::Duplicate {
            original: RecordId(e.id),
            first_seen_ms: e.seen_ms,
        }),
        Seen::Different(e) if policy == ConflictPolicy::Reject => {
            Some(DedupOutcome::ConflictRefused {
                previous: RecordId(e.id),
            })
        }
        _ => None,
    }
}

/// Remembers the record just inserted under `key` for `window_ms` (replacing a stale or
/// conflicting entry).
pub(super) fn remember(
    table: &mut Table<'_, &'static str, &'static [u8]>,
    by_expiry: &mut Table<'_, (u64, &'static str), ()>,
    key: &DedupKey,
    window_ms: u64,
    id: RecordId,
    seen: &Seen,
    now: u64,
) -> Result<DedupOutcome, StorageError> {
    let previous = match seen {
        Seen::Stale(e) | Seen::Different(e) | Seen::Same(e) => Some(*e),
        Seen::New => None,
    };
    if let Some(p) = previous {
        by_expiry.remove((p.expires_ms, key.key.as_str()))?;
    }
    let entry = Entry {
        hash: key.content_sha256,
        id: id.0,
        seen_ms: now,
        expires_ms: now.saturating_add(window_ms.max(1)),
    };
    table.insert(key.key.as_str(), entry.encode().as_slice())?;
    by_expiry.insert((entry.expires_ms, key.key.as_str()), ())?;
    prune(table, by_expiry, now)?;
    Ok(match seen {
        Seen::Different(p) => DedupOutcome::StoredConflict {
            id,
            previous: RecordId(p.id),
        },
        _ => DedupOutcome::Stored(id),
    })
}

/// Removes up to [`PRUNE_PER_INSERT`] expired entries.
fn prune(
    table: &mut Table<'_, &'static str, &'static [u8]>,
    by_expiry: &mut Table<'_, (u64, &'static str), ()>,
    now: u64,
) -> Result<(), StorageError> {
    let mut expired: Vec<(u64, String)> = Vec::new();
    for item in by_expiry.range::<(u64, &str)>(..(now, ""))? {
        let (k, _) = item?;
        let (t, key) = k.value();
        expired.push((t, key.to_owned()));
        if expired.len() >= PRUNE_PER_INSERT {
            break;
        }
    }
    for (t, key) in expired {
        by_expiry.remove((t, key.as_str()))?;
        // Only if the entry is still the expired one (it may have been replaced since).
        let current = table
            .get(key.as_str())?
            .and_then(|v| Entry::decode(v.value()));
        if current.is_none_or(|e| e.expires_ms == t) {
            table.remove(key.as_str())?;
        }
    }
    Ok(())
}

impl WriterHandle {
    /// Stores a new message unless the duplicates window already holds it; returns only after
    /// the durable commit (or definitely not stored).
    pub async fn insert_dedup(&self, insert: DedupInsert) -> Result<DedupOutcome, StoreError> {
        match self.submit(WriteOp::InsertDedup(Box::new(insert))).await? {
            WriteOutcome::Dedup(o) => Ok(o),
            other => Err(StoreError::Corrupt {
                path: Default::default(),
                what: format!("writer answered a dedup insert with {other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Outbox, OutboxLimits, Writer, now_ms};
    use super::*;

    fn rec(raw: &[u8]) -> NewRecord {
        NewRecord {
            feed: "pas".into(),
            control_id: "C1".into(),
            message_type: "ADT_A01".into(),
            raw: raw.to_vec(),
            received_at_ms: now_ms(),
        }
    }

    fn ins(raw: &[u8], window_ms: u64, on_conflict: ConflictPolicy) -> DedupInsert {
        DedupInsert {
            record: rec(raw),
            key: DedupKey::new("pas", "PAS", "RRV", "C1", raw),
            window_ms,
            on_conflict,
        }
    }

    #[test]
    fn content_hash_ignores_line_endings_and_bom() {
        let a = content_hash(b"MSH|x\rPID|1\r");
        assert_eq!(a, content_hash(b"\xEF\xBB\xBFMSH|x\r\nPID|1\r\n\r\n"));
        assert_eq!(a, content_hash(b"MSH|x\nPID|1"));
        assert_ne!(a, content_hash(b"MSH|x\rPID|2\r"));
    }

    #[test]
    fn entry_round_trip_and_garbage() {
        let e = Entry {
            hash: [7; 32],
            id: 42,
            seen_ms: 1,
            expires_ms: 2,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(&[1, 2, 3]), None);
    }

    #[tokio::test]
    async fn duplicates_conflicts_expiry_and_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("outbox.redb");
        let hour = 3_600_000;
        {
            let ob = Outbox::open(&path, OutboxLimits::default()).expect("open");
            let w = Writer::spawn(ob.clone()).expect("writer");
            let first = w
                .insert_dedup(ins(b"MSH|a\r", hour, ConflictPolicy::Accept))
                .await
                .expect("insert");
            let DedupOutcome::Stored(id1) = first else {
                panic!("{first:?}")
            };
            let again = w
                .insert_dedup(ins(b"MSH|a\r\n", hour, ConflictPolicy::Accept))
                .await
                .expect("insert");
            assert!(
                matches!(again, DedupOutcome::Duplicate { original, .. } if original == id1),
                "{again:?}"
            );
            let refused = w
                .insert_dedup(ins(b"MSH|b\r", hour, ConflictPolicy::Reject))
                .await
                .expect("insert");
            assert_eq!(refused, DedupOutcome::ConflictRefused { previous: id1 });
            let flagged = w
                .insert_dedup(ins(b"MSH|b\r", hour, ConflictPolicy::Accept))
                .await
                .expect("insert");
            let DedupOutcome::StoredConflict { id: id2, previous } = flagged else {
                panic!("{flagged:?}")
            };
            assert_eq!(previous, id1);
            assert_eq!(ob.stats().expect("stats").received, 2);
            // The window now remembers the new content.
            let again = w
                .insert_dedup(ins(b"MSH|b\r", hour, ConflictPolicy::Accept))
                .await
                .expect("insert");
            assert!(matches!(again, DedupOutcome::Duplicate { original, .. } if original == id2));
            w.shutdown().await;
        }
        // Survives a reopen.
        let ob = Outbox::open(&path, OutboxLimits::default()).expect("reopen");
        let w = Writer::spawn(ob.clone()).expect("writer");
        let again = w
            .insert_dedup(ins(b"MSH|b\r", hour, ConflictPolicy::Accept))
            .await
            .expect("insert");
        assert!(matches!(again, DedupOutcome::Duplicate { .. }), "{again:?}");
        // A 1 ms window expires at once: the same message is new again, and pruning removes
        // the expired entries.
        let short = |raw: &'static [u8]| ins(raw, 1, ConflictPolicy::Accept);
        let a = w.insert_dedup(short(b"MSH|c\r")).await.expect("insert");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = w.insert_dedup(short(b"MSH|c\r")).await.expect("insert");
        assert!(matches!(
            a,
            DedupOutcome::Stored(_) | DedupOutcome::StoredConflict { .. }
        ));
        assert!(
            matches!(b, DedupOutcome::Stored(_)),
            "expired entry is not a duplicate: {b:?}"
        );
        // A full outbox refuses without remembering.
        w.shutdown().await;
        drop(ob);
        let ob = Outbox::open(
            &path,
            OutboxLimits {
                max_bytes: 1,
                ..OutboxLimits::default()
            },
        )
        .expect("reopen");
        let w = Writer::spawn(ob).expect("writer");
        let mut d = ins(b"MSH|new\r", hour, ConflictPolicy::Accept);
        d.key = DedupKey::new("pas", "PAS", "RRV", "C2", b"MSH|new\r");
        let full = w.insert_dedup(d.clone()).await;
        assert!(matches!(full, Err(StoreError::Full { .. })), "{full:?}");
        w.shutdown().await;
    }
}
