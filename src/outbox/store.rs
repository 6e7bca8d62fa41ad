//! The durable record store: redb tables, record types, and the read API.
//!
//! Reads go straight to redb (MVCC snapshots, they never block the writer); every write is made
//! by the single writer task in [`super::writer`], which calls [`Outbox::apply_batch`]. Keeping the
//! mutation code here, next to the table layout, keeps the invariants in one file:
//!
//! * `records_meta` holds one meta row per live record (state, feed, hashes, sizes; layout in
//!   `codec.rs`);
//! * `records_raw` / `records_bundle` hold the payloads, removed on delivery;
//! * `pending_by_feed` has `(feed, id)` for every record not yet delivered nor quarantined,
//!   so a publisher reads its feed in id order with one range scan;
//! * `pending_mapping` has every `Received` id, for crash recovery of the mapper;
//! * `audit_delivered` keeps (id, hashes, times) of delivered records until pruned;
//! * `counters` holds the next id, the byte total and per-state counts, updated in the same
//!   transaction as the records, so they can never drift from the data.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::codec;
use super::error::StoreError;
use super::journal::{self, Journal};

const META: TableDefinition<u64, &[u8]> = TableDefinition::new("records_meta");
const RAW: TableDefinition<u64, &[u8]> = TableDefinition::new("records_raw");
const BUNDLE: TableDefinition<u64, &[u8]> = TableDefinition::new("records_bundle");
const PENDING: TableDefinition<(&str, u64), ()> = TableDefinition::new("pending_by_feed");
const TO_MAP: TableDefinition<u64, ()> = TableDefinition::new("pending_mapping");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_delivered");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

const SCHEMA_VERSION: u64 = 1;
/// redb page cache size (see [`Outbox::open`]).
const CACHE_BYTES: usize = 16 * 1024 * 1024;
const C_SCHEMA: &str = "schema_version";
const C_NEXT_ID: &str = "next_id";
const C_BYTES: &str = "bytes";
const C_RECEIVED: &str = "received";
const C_READY: &str = "ready";
const C_QUARANTINED: &str = "quarantined";
const C_DELIVERED: &str = "delivered_total";
const C_DEAD: &str = "dead_lettered";
/// Random id of this database, written at creation: journal records of another database
/// (one deleted and created again beside an old journal) are never replayed into it.
const C_INSTANCE: &str = "instance_id";
/// Advanced by every checkpoint: journal records of an earlier epoch are already in redb.
const C_JOURNAL_EPOCH: &str = "journal_epoch";

/// Default of [`OutboxLimits::checkpoint_interval_ms`]: the longest time non-durable commits
/// wait for a checkpoint (a durable redb commit). It bounds what a crash makes the pipeline
/// redo (mapping again, publishing again what the broker had acknowledged: at-least-once),
/// never what it loses: inserts are in the journal. Longer intervals write fewer pages (a
/// record delivered within one interval never reaches the disk as a Bundle) but make each
/// checkpoint, and the ACKs waiting behind it, slower.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 250;

/// Global, monotonically increasing record id, assigned at insert in commit order and never
/// reused (the counter is persisted in the same transaction as the record).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct RecordId(pub u64);

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where a record is in its life. See the [module documentation](super) for the transitions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// The raw message is durably stored; the sender may have been ACKed; not yet mapped.
    Received,
    /// The signed Bundle is stored and waits to be published.
    Ready,
    /// The broker acknowledged the Bundle; payloads are gone, an audit row remains.
    Delivered,
    /// Mapping or validation failed: kept with the raw message, never forwarded until an
    /// operator retries it (`hl7-edge outbox retry ID` maps it again).
    Quarantined { reason: String },
    /// The broker refused the signed Bundle for good (too large, not authorised, invalid topic):
    /// kept with its Bundle and the reason instead of being retried forever. `retry` makes it
    /// `Ready` again once the cause is fixed.
    DeadLettered { reason: String },
}

impl RecordState {
    pub fn kind(&self) -> StateKind {
        match self {
            RecordState::Received => StateKind::Received,
            RecordState::Ready => StateKind::Ready,
            RecordState::Delivered => StateKind::Delivered,
            RecordState::Quarantined { .. } => StateKind::Quarantined,
            RecordState::DeadLettered { .. } => StateKind::DeadLettered,
        }
    }
}

/// [`RecordState`] without its data, for filters and error messages.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum StateKind {
    Received,
    Ready,
    Delivered,
    Quarantined,
    DeadLettered,
}

impl StateKind {
    /// Parses the names [`Display`](std::fmt::Display) prints (`dead-lettered` also as
    /// `dead_lettered` or `dead`).
    pub fn parse(s: &str) -> Option<StateKind> {
        Some(match s {
            "received" => StateKind::Received,
            "ready" => StateKind::Ready,
            "delivered" => StateKind::Delivered,
            "quarantined" => StateKind::Quarantined,
            "dead-lettered" | "dead_lettered" | "dead" => StateKind::DeadLettered,
            _ => return None,
        })
    }
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateKind::Received => "received",
            StateKind::Ready => "ready",
            StateKind::Delivered => "delivered",
            StateKind::Quarantined => "quarantined",
            StateKind::DeadLettered => "dead-lettered",
        })
    }
}

/// What ingest hands to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// The logical feed (one per source system); publishing is FIFO per feed.
    pub feed: String,
    /// MSH-10, for operators correlating with the sender's logs.
    pub control_id: String,
    /// MSH-9 as `TYPE_EVENT`, e.g. `ADT_A01`; the last level of the MQTT topic.
    pub message_type: String,
    /// The message as received (after MLLP framing removed), byte for byte.
    pub raw: Vec<u8>,
    /// Reception time, Unix milliseconds.
    pub received_at_ms: u64,
}

/// Everything about a record except its payloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMeta {
    #[serde(skip)]
    pub id: RecordId,
    pub feed: String,
    pub control_id: String,
    pub message_type: String,
    pub received_at_ms: u64,
    pub state: RecordState,
    /// Lowercase hex SHA-256 of the raw message.
    pub raw_sha256: String,
    pub raw_len: u64,
    /// Lowercase hex SHA-256 of the Bundle, once `Ready`.
    pub bundle_sha256: Option<String>,
    pub bundle_len: u64,
    /// `Bundle.identifier.value`: the id the exchange deduplicates on (MQTT 5 user property).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The signing key's id (`kid`), for the exchange to pick the verifying key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Set only for `Delivered` records (read from the audit table).
    #[serde(skip)]
    pub delivered_at_ms: Option<u64>,
}

/// What the pipeline knows about a signed Bundle besides its bytes (carried to MQTT 5 user
/// properties without parsing the Bundle again at publish time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleInfo {
    pub message_id: Option<String>,
    pub key_id: Option<String>,
}

/// A record with its payloads (each `None` when not stored or not loaded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub meta: RecordMeta,
    pub raw: Option<Vec<u8>>,
    pub bundle: Option<Vec<u8>>,
}

impl Record {
    pub fn id(&self) -> RecordId {
        self.meta.id
    }
    pub fn state(&self) -> &RecordState {
        &self.meta.state
    }
}

/// What remains of a delivered record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    #[serde(skip)]
    pub id: RecordId,
    pub feed: String,
    pub control_id: String,
    pub message_type: String,
    pub received_at_ms: u64,
    pub delivered_at_ms: u64,
    pub raw_sha256: String,
    pub bundle_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// Limits that turn into negative ACKs instead of an exhausted disk.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxLimits {
    /// Maximum total bytes of raw messages + Bundles of records not yet delivered.
    pub max_bytes: u64,
    /// Maximum number of records not yet delivered (received + ready + quarantined +
    /// dead-lettered).
    pub max_records: u64,
    /// Refuse new messages while the oldest message still waiting for delivery (received or
    /// ready; parked quarantined and dead-lettered records do not count) is older than this, in
    /// milliseconds; 0 disables the check. A sender that gets negative ACKs keeps its messages
    /// and raises its own alarms, instead of the appliance hoarding days of admissions the
    /// exchange has not seen.
    pub max_age_ms: u64,
    /// Longest time, in milliseconds, that non-durable commits wait for a checkpoint (see
    /// `journal.rs`); 0 makes every batch a durable redb commit (no journal).
    pub checkpoint_interval_ms: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_bytes: 1 << 30,
            max_records: 1_000_000,
            max_age_ms: 0,
            checkpoint_interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
        }
    }
}

/// Per-feed counters since the database was opened (in memory), for heartbeats and `stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedCounters {
    pub received: u64,
    /// Inserts refused because the outbox was full or too old (negative ACKs).
    pub refused: u64,
    pub delivered: u64,
    pub quarantined: u64,
    pub dead_lettered: u64,
    /// Unix ms of the last stored message of this feed (`None`: none since open).
    pub last_received_ms: Option<u64>,
    pub last_delivered_ms: Option<u64>,
}

/// Counts and sizes, for health checks and the `outbox` CLI command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub received: u64,
    pub ready: u64,
    pub quarantined: u64,
    pub dead_lettered: u64,
    /// Delivered since the database was created (audit rows may have been pruned).
    pub delivered_total: u64,
    pub audit_rows: u64,
    /// Bytes of raw + Bundle of records not yet delivered.
    pub bytes: u64,
    pub max_bytes: u64,
    pub max_records: u64,
    /// The id the next insert will get.
    pub next_id: RecordId,
    pub max_age_ms: u64,
    /// Reception time (Unix ms) of the oldest record waiting for delivery, if any.
    pub oldest_pending_ms: Option<u64>,
    /// Inserts refused for space or age since open.
    pub refused_total: u64,
    /// True while inserts are being refused (the last insert attempt was refused).
    pub refusing: bool,
}

/// Filter for [`Outbox::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only records in this state (`Delivered` lists audit rows).
    pub state: Option<StateKind>,
    pub feed: Option<String>,
    /// Only ids strictly greater than this (paging).
    pub after: Option<RecordId>,
    /// At most this many results; 0 means 100.
    pub limit: usize,
}

/// A mutation, applied by the writer inside a batch transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Insert(NewRecord),
    SetReady {
        id: RecordId,
        bundle: Vec<u8>,
        info: BundleInfo,
    },
    Quarantine {
        id: RecordId,
        reason: String,
    },
    /// `Ready` -> `DeadLettered`: the broker refused the Bundle for good.
    DeadLetter {
        id: RecordId,
        reason: String,
    },
    /// An operator's retry: `Quarantined` -> `Received` (mapped again), `DeadLettered` ->
    /// `Ready` (published again).
    Retry {
        id: RecordId,
    },
    MarkDelivered {
        id: RecordId,
    },
    PruneAudit {
        cutoff_ms: u64,
    },
    /// An insert guarded by the duplicates window (see `dedup.rs`).
    InsertDedup(Box<super::dedup::DedupInsert>),
}

/// The successful result of one [`WriteOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Inserted(RecordId),
    Done,
    Pruned(u64),
    /// The result of [`WriteOp::InsertDedup`].
    Dedup(super::dedup::DedupOutcome),
    /// A retry moved the record to this state.
    Retried(StateKind),
}

/// Handle to the store. Cheap to clone; all clones share one redb database.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    limits: OutboxLimits,
    commits: AtomicU64,
    changes: watch::Sender<u64>,
    /// Bumped by every committed retry: a publisher whose feed cursor is past a retried record
    /// must start its feed again from the first undelivered record.
    retry_epoch: AtomicU64,
    refused_total: AtomicU64,
    refusing: std::sync::atomic::AtomicBool,
    feeds: Mutex<HashMap<String, FeedCounters>>,
    /// The intake journal and the checkpoint bookkeeping; locked by whoever writes.
    journal: Mutex<JournalState>,
}

impl Drop for Inner {
    /// The last handle closes the database: make the non-durable commits durable, so a clean
    /// stop leaves nothing to redo. (Without this, nothing accepted would be lost either: the
    /// journal holds it. Only mapping and publishing would be repeated.)
    fn drop(&mut self) {
        let js = match self.journal.get_mut() {
            Ok(js) => js,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !js.dirty {
            return;
        }
        let result = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .and_then(|txn| {
                {
                    let mut counters = txn.open_table(COUNTERS)?;
                    counters.insert(C_JOURNAL_EPOCH, js.epoch + 1)?;
                }
                txn.commit()?;
                Ok(())
            });
        if let Err(e) = result {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "outbox: final checkpoint failed; the journal will be replayed at the next start"
            );
        }
    }
}

struct JournalState {
    journal: Journal,
    instance: u64,
    epoch: u64,
    last_checkpoint: Instant,
    /// Non-durable commits were made since the last checkpoint.
    dirty: bool,
}

impl JournalState {
    /// A durable commit that set the journal epoch to `epoch` has just returned: everything is
    /// in redb, and the journal starts again from its beginning.
    fn checkpointed(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.journal.restart(self.instance, epoch);
        self.last_checkpoint = Instant::now();
        self.dirty = false;
    }

    /// [`Self::checkpointed`] with the next epoch (the one the commit wrote).
    fn advance(&mut self) {
        self.checkpointed(self.epoch + 1);
    }
}

/// What a committed op changed, applied to the in-memory counters after the commit.
enum Effect {
    None,
    Received { feed: String, at: u64 },
    Refused { feed: String },
    Delivered { feed: String, at: u64 },
    Quarantined { feed: String },
    DeadLettered { feed: String },
    Retried,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.path)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// Unix time in milliseconds (0 if the clock is before 1970, which only a broken RTC does).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// All tables of a write transaction, opened once per batch.
struct Tables<'txn> {
    meta: Table<'txn, u64, &'static [u8]>,
    raw: Table<'txn, u64, &'static [u8]>,
    bundle: Table<'txn, u64, &'static [u8]>,
    pending: Table<'txn, (&'static str, u64), ()>,
    to_map: Table<'txn, u64, ()>,
    audit: Table<'txn, u64, &'static [u8]>,
    counters: Table<'txn, &'static str, u64>,
    dedup: Table<'txn, &'static str, &'static [u8]>,
    dedup_by_expiry: Table<'txn, (u64, &'static str), ()>,
}

impl Outbox {
    /// Opens (or creates) the outbox database at `path`.
    ///
    /// Creates the tables on first use and checks the schema version, so a later read never
    /// fails with "table does not exist".
    pub fn open(path: &Path, limits: OutboxLimits) -> Result<Outbox, StoreError> {
        // redb's default page cache may grow to 1 GiB: with a large backlog that is the
        // appliance's whole memory budget (942 MiB peak RSS measured with 100,000 messages).
        // Reads here are sequential scans of recent pages; a small cache costs little.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        let journal_path = PathBuf::from(format!("{}.journal", path.display()));
        let journal =
            Journal::open(&journal_path, journal::DEFAULT_CAPACITY).map_err(|source| {
                StoreError::Journal {
                    path: journal_path.clone(),
                    what: "open",
                    source,
                }
            })?;
        let (changes, _) = watch::channel(0);
        let outbox = Outbox {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                limits,
                commits: AtomicU64::new(0),
                changes,
                retry_epoch: AtomicU64::new(0),
                refused_total: AtomicU64::new(0),
                refusing: std::sync::atomic::AtomicBool::new(false),
                feeds: Mutex::new(HashMap::new()),
                journal: Mutex::new(JournalState {
                    journal,
                    instance: 0,
                    epoch: 0,
                    last_checkpoint: Instant::now(),
                    dirty: false,
                }),
            }),
        };
        outbox.init_schema()?;
        outbox.recover_journal()?;
        Ok(outbox)
    }

    /// Stores again every message of the journal's current epoch (accepted after the last
    /// checkpoint, so missing from redb after a crash), then checkpoints.
    fn recover_journal(&self) -> Result<(), StoreError> {
        let mut js = self.journal_state();
        let txn = self.begin_write()?;
        let (instance, epoch, replayed) = {
            let mut t = self.open_tables(&txn)?;
            let mut instance = self.counter(&t.counters, C_INSTANCE)?;
            if instance == 0 {
                instance = random_instance_id();
                t.counters
                    .insert(C_INSTANCE, instance)
                    .map_err(self.storage("write instance id"))?;
            }
            let epoch = self.counter(&t.counters, C_JOURNAL_EPOCH)?;
            let journal_path = js.journal.path().to_path_buf();
            let payloads =
                js.journal
                    .scan(instance, epoch)
                    .map_err(|source| StoreError::Journal {
                        path: journal_path.clone(),
                        what: "read",
                        source,
                    })?;
            let mut replayed = 0u64;
            for payload in payloads {
                let entries = journal::decode(&payload).map_err(|what| StoreError::Corrupt {
                    path: journal_path.clone(),
                    what,
                })?;
                for e in entries {
                    replayed += u64::from(self.restore(&mut t, &e)?);
                }
            }
            t.counters
                .insert(C_JOURNAL_EPOCH, epoch + 1)
                .map_err(self.storage("advance journal epoch"))?;
            (instance, epoch + 1, replayed)
        };
        txn.commit()
            .map_err(self.storage("commit journal recovery"))?;
        js.instance = instance;
        js.checkpointed(epoch);
        if replayed > 0 {
            tracing::info!(
                path = %self.inner.path.display(),
                messages = replayed,
                "outbox: restored messages accepted after the last checkpoint from the journal"
            );
        }
        Ok(())
    }

    /// Puts back one journaled message under its original id; `false` if it is already there.
    fn restore(&self, t: &mut Tables<'_>, e: &journal::Entry) -> Result<bool, StoreError> {
        if t.meta
            .get(e.id.0)
            .map_err(self.storage("read meta"))?
            .is_some()
            || self.is_delivered(t, e.id)?
        {
            return Ok(false);
        }
        self.store_new(t, e.id, &e.record)?;
        if let Some(d) = &e.dedup {
            use super::dedup;
            let key = dedup::DedupKey::from_parts(d.key.clone(), d.content_sha256);
            let seen = dedup::lookup(&t.dedup, &key, e.now_ms)
                .map_err(self.storage("read dedup_window"))?;
            dedup::remember(
                &mut t.dedup,
                &mut t.dedup_by_expiry,
                &key,
                d.window_ms,
                e.id,
                &seen,
                e.now_ms,
            )
            .map_err(self.storage("write dedup_window"))?;
        }
        Ok(true)
    }

    fn journal_state(&self) -> std::sync::MutexGuard<'_, JournalState> {
        match self.inner.journal.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Makes every non-durable commit durable now (a checkpoint), if there is any.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut js = self.journal_state();
        if js.dirty {
            self.checkpoint_locked(&mut js)?;
        }
        Ok(())
    }

    /// [`Self::checkpoint`] once the checkpoint interval has passed since the last one (the
    /// writer calls this when idle).
    pub fn checkpoint_if_due(&self) -> Result<(), StoreError> {
        let mut js = self.journal_state();
        if js.dirty && js.last_checkpoint.elapsed() >= self.checkpoint_interval() {
            self.checkpoint_locked(&mut js)?;
        }
        Ok(())
    }

    /// [`OutboxLimits::checkpoint_interval_ms`].
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.inner.limits.checkpoint_interval_ms)
    }

    fn checkpoint_locked(&self, js: &mut JournalState) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut counters = txn
                .open_table(COUNTERS)
                .map_err(self.storage("open counters"))?;
            counters
                .insert(C_JOURNAL_EPOCH, js.epoch + 1)
                .map_err(self.storage("advance journal epoch"))?;
        }
        txn.commit().map_err(self.storage("commit checkpoint"))?;
        self.inner.commits.fetch_add(1, Ordering::Relaxed);
        js.advance();
        Ok(())
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut t = self.open_tables(&txn)?;
            let found = self.counter(&t.counters, C_SCHEMA)?;
            if found == 0 {
                t.counters
                    .insert(C_SCHEMA, SCHEMA_VERSION)
                    .map_err(self.storage("write schema version"))?;
            } else if found != SCHEMA_VERSION {
                return Err(StoreError::Incompatible {
                    path: self.inner.path.clone(),
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        txn.commit().map_err(self.storage("commit schema"))
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn limits(&self) -> &OutboxLimits {
        &self.inner.limits
    }

    /// Number of successful write transactions since open (group-commit observability).
    pub fn commit_count(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    /// A receiver that changes after every commit that modified records. The mapper and the
    /// publishers wait on it (`changed().await`) instead of polling.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn storage<E: Into<redb::Error>>(&self, what: &'static str) -> impl FnOnce(E) -> StoreError {
        let path = self.inner.path.clone();
        move |e| StoreError::Storage {
            path,
            what,
            source: Box::new(e.into()),
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            path: self.inner.path.clone(),
            what,
        }
    }

    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        // Durability::Immediate is redb's default: commit() returns after fsync.
        self.inner
            .db
            .begin_write()
            .map_err(self.storage("begin write transaction"))
    }

    fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        self.inner
            .db
            .begin_read()
            .map_err(self.storage("begin read transaction"))
    }

    fn open_tables<'txn>(&self, txn: &'txn WriteTransaction) -> Result<Tables<'txn>, StoreError> {
        Ok(Tables {
            meta: txn
                .open_table(META)
                .map_err(self.storage("open records_meta"))?,
            raw: txn
                .open_table(RAW)
                .map_err(self.storage("open records_raw"))?,
            bundle: txn
                .open_table(BUNDLE)
                .map_err(self.storage("open records_bundle"))?,
            pending: txn
                .open_table(PENDING)
                .map_err(self.storage("open pending_by_feed"))?,
            to_map: txn
                .open_table(TO_MAP)
                .map_err(self.storage("open pending_mapping"))?,
            audit: txn
                .open_table(AUDIT)
                .map_err(self.storage("open audit_delivered"))?,
            counters: txn
                .open_table(COUNTERS)
                .map_err(self.storage("open counters"))?,
            dedup: txn
                .open_table(super::dedup::DEDUP)
                .map_err(self.storage("open dedup_window"))?,
            dedup_by_expiry: txn
                .open_table(super::dedup::DEDUP_BY_EXPIRY)
                .map_err(self.storage("open dedup_by_expiry"))?,
        })
    }

    fn counter(
        &self,
        table: &impl ReadableTable<&'static str, u64>,
        key: &str,
    ) -> Result<u64, StoreError> {
        Ok(table
            .get(key)
            .map_err(self.storage("read counter"))?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    fn decode_meta(&self, id: u64, bytes: &[u8]) -> Result<RecordMeta, StoreError> {
        codec::decode_meta(id, bytes)
            .map_err(|e| self.corrupt(format!("meta of record #{id}: {e}")))
    }

    fn decode_audit(&self, id: u64, bytes: &[u8]) -> Result<AuditEntry, StoreError> {
        codec::decode_audit(id, bytes)
            .map_err(|e| self.corrupt(format!("audit row of record #{id}: {e}")))
    }

    // ----------------------------------------------------------------------------------------
    // Reads
    // ----------------------------------------------------------------------------------------

    /// The record with its payloads; a delivered record comes from its audit row (no payloads).
    pub fn get(&self, id: RecordId) -> Result<Option<Record>, StoreError> {
        let txn = self.begin_read()?;
        let meta_t = txn
            .open_table(META)
            .map_err(self.storage("open records_meta"))?;
        if let Some(m) = meta_t.get(id.0).map_err(self.storage("read meta"))? {
            let meta = self.decode_meta(id.0, m.value())?;
            let raw = read_bytes(&txn, RAW, id.0).map_err(self.storage("read raw message"))?;
            let bundle = read_bytes(&txn, BUNDLE, id.0).map_err(self.storage("read bundle"))?;
            return Ok(Some(Record { meta, raw, bundle }));
        }
        let audit_t = txn
            .open_table(AUDIT)
            .map_err(self.storage("open audit_delivered"))?;
        let Some(a) = audit_t.get(id.0).map_err(self.storage("read audit"))? else {
            return Ok(None);
        };
        let entry = self.decode_audit(id.0, a.value())?;
        Ok(Some(Record {
            meta: meta_from_audit(entry),
            raw: None,
            bundle: None,
        }))
    }

    /// The meta of a live record, or of a delivered one (from its audit row).
    pub fn get_meta(&self, id: RecordId) -> Result<Option<RecordMeta>, StoreError> {
        let txn = self.begin_read()?;
        let meta_t = txn
            .open_table(META)
            .map_err(self.storage("open records_meta"))?;
        if let Some(m) = meta_t.get(id.0).map_err(self.storage("read meta"))? {
            return self.decode_meta(id.0, m.value()).map(Some);
        }
        let audit_t = txn
            .open_table(AUDIT)
            .map_err(self.storage("open audit_delivered"))?;
        match audit_t.get(id.0).map_err(self.storage("read audit"))? {
            Some(a) => Ok(Some(meta_from_audit(self.decode_audit(id.0, a.value())?))),
            None => Ok(None),
        }
    }

    /// Ids of every `Received` record, in id order: what the mapper must (re)process after a
    /// restart.
    pub fn pending_for_mapping(&self) -> Result<Vec<RecordId>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn
            .open_table(TO_MAP)
            .map_err(self.storage("open pending_mapping"))?;
        let mut ids = Vec::new();
        for entry in t.iter().map_err(self.storage("scan pending_mapping"))? {
            let (k, _) = entry.map_err(self.storage("scan pending_mapping"))?;
            ids.push(RecordId(k.value()));
        }
        Ok(ids)
    }

    /// The first record of `feed` (id order, ids > `after`) that is neither delivered nor
    /// quarantined, whatever its state: if it is still `Received` the publisher must wait for it,
    /// which is what keeps a feed in order. The Bundle is loaded when `Ready`; `raw` is not.
    pub fn next_ready(
        &self,
        feed: &str,
        after: Option<RecordId>,
    ) -> Result<Option<Record>, StoreError> {
        let start = match after {
            None => 0,
            Some(RecordId(a)) => match a.checked_add(1) {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let txn = self.begin_read()?;
        let pending = txn
            .open_table(PENDING)
            .map_err(self.storage("open pending_by_feed"))?;
        let mut range = pending
            .range((feed, start)..=(feed, u64::MAX))
            .map_err(self.storage("scan pending_by_feed"))?;
        let Some(entry) = range.next() else {
            return Ok(None);
        };
        let (key, _) = entry.map_err(self.storage("scan pending_by_feed"))?;
        let id = key.value().1;
        let meta_t = txn
            .open_table(META)
            .map_err(self.storage("open records_meta"))?;
        let meta = match meta_t.get(id).map_err(self.storage("read meta"))? {
            Some(m) => self.decode_meta(id, m.value())?,
            None => {
                return Err(self.corrupt(format!(
                    "record #{id} is in the pending index of feed {feed:?} but has no meta"
                )));
            }
        };
        let bundle = if meta.state == RecordState::Ready {
            match read_bytes(&txn, BUNDLE, id).map_err(self.storage("read bundle"))? {
                Some(b) => Some(b),
                None => {
                    return Err(self.corrupt(format!("record #{id} is ready but has no bundle")));
                }
            }
        } else {
            None
        };
        Ok(Some(Record {
            meta,
            raw: None,
            bundle,
        }))
    }

    /// Counts per state and byte usage (read from the counters, O(1)).
    pub fn stats(&self) -> Result<OutboxStats, StoreError> {
        let txn = self.begin_read()?;
        let c = txn
            .open_table(COUNTERS)
            .map_err(self.storage("open counters"))?;
        let audit = txn
            .open_table(AUDIT)
            .map_err(self.storage("open audit_delivered"))?;
        use redb::ReadableTableMetadata;
        Ok(OutboxStats {
            received: self.counter(&c, C_RECEIVED)?,
            ready: self.counter(&c, C_READY)?,
            quarantined: self.counter(&c, C_QUARANTINED)?,
            dead_lettered: self.counter(&c, C_DEAD)?,
            delivered_total: self.counter(&c, C_DELIVERED)?,
            audit_rows: audit.len().map_err(self.storage("count audit rows"))?,
            bytes: self.counter(&c, C_BYTES)?,
            max_bytes: self.inner.limits.max_bytes,
            max_records: self.inner.limits.max_records,
            next_id: RecordId(self.counter(&c, C_NEXT_ID)?.max(1)),
            max_age_ms: self.inner.limits.max_age_ms,
            oldest_pending_ms: {
                let pending = txn
                    .open_table(PENDING)
                    .map_err(self.storage("open pending_by_feed"))?;
                let meta = txn
                    .open_table(META)
                    .map_err(self.storage("open records_meta"))?;
                self.oldest_pending(&pending, &meta)?
            },
            refused_total: self.inner.refused_total.load(Ordering::Relaxed),
            refusing: self.inner.refusing.load(Ordering::Relaxed),
        })
    }

    /// Number of records of `feed` waiting for delivery (received or ready). Counts index
    /// entries: meant for heartbeats (once a minute), not for every message.
    pub fn pending_count(&self, feed: &str) -> Result<u64, StoreError> {
        let txn = self.begin_read()?;
        let pending = txn
            .open_table(PENDING)
            .map_err(self.storage("open pending_by_feed"))?;
        let mut n = 0u64;
        for entry in pending
            .range((feed, 0)..=(feed, u64::MAX))
            .map_err(self.storage("scan pending_by_feed"))?
        {
            entry.map_err(self.storage("scan pending_by_feed"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Per-feed counters since open (a snapshot).
    pub fn feed_counters(&self) -> HashMap<String, FeedCounters> {
        match self.inner.feeds.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Changes whenever a retry was committed (see [`WriteOp::Retry`]).
    pub fn retry_epoch(&self) -> u64 {
        self.inner.retry_epoch.load(Ordering::Relaxed)
    }

    /// Metas in id order matching `filter` (for the CLI and the quarantine review).
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<RecordMeta>, StoreError> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let start = match filter.after {
            None => 0,
            Some(RecordId(a)) => match a.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
        };
        let txn = self.begin_read()?;
        let mut out = Vec::new();
        let want_feed = |feed: &str| filter.feed.as_deref().is_none_or(|f| f == feed);
        if filter.state != Some(StateKind::Delivered) {
            let t = txn
                .open_table(META)
                .map_err(self.storage("open records_meta"))?;
            for entry in t
                .range(start..)
                .map_err(self.storage("scan records_meta"))?
            {
                let (k, v) = entry.map_err(self.storage("scan records_meta"))?;
                let meta = self.decode_meta(k.value(), v.value())?;
                if filter.state.is_none_or(|s| s == meta.state.kind()) && want_feed(&meta.feed) {
                    out.push(meta);
                }
                if out.len() >= limit {
                    break;
                }
            }
        }
        if filter.state.is_none() || filter.state == Some(StateKind::Delivered) {
            let t = txn
                .open_table(AUDIT)
                .map_err(self.storage("open audit_delivered"))?;
            let mut delivered = Vec::new();
            for entry in t.range(start..).map_err(self.storage("scan audit"))? {
                let (k, v) = entry.map_err(self.storage("scan audit"))?;
                let meta = meta_from_audit(self.decode_audit(k.value(), v.value())?);
                if want_feed(&meta.feed) {
                    delivered.push(meta);
                }
                if delivered.len() >= limit {
                    break;
                }
            }
            out.extend(delivered);
            out.sort_by_key(|m| m.id);
            out.truncate(limit);
        }
        Ok(out)
    }

    // ----------------------------------------------------------------------------------------
    // Writes (called by the single writer task only)
    // ----------------------------------------------------------------------------------------

    /// Applies `ops` in ONE durable transaction.
    ///
    /// Returns `Err` when the transaction as a whole failed (nothing was stored); otherwise one
    /// result per op: an op refused for its own reason (store full, wrong state, unknown id)
    /// checks everything before writing anything, so it leaves no trace and does not spoil the
    /// rest of the batch.
    pub(crate) fn apply_batch(
        &self,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        let mut js = self.journal_state();
        let mut txn = self.begin_write()?;
        let mut results = Vec::with_capacity(ops.len());
        let mut effects = Vec::with_capacity(ops.len());
        let mut changed = false;
        let mut batch = journal::Batch::new();
        let mut operator = false;
        let checkpoint;
        {
            let mut t = self.open_tables(&txn)?;
            let now = now_ms();
            // The age check needs one index lookup per feed: do it once per batch, and only when
            // the batch inserts (the oldest pending record can only get younger within a batch).
            let mut oldest: Option<Option<u64>> = None;
            for op in ops {
                if matches!(op, WriteOp::Insert(_) | WriteOp::InsertDedup(_))
                    && self.inner.limits.max_age_ms > 0
                    && oldest.is_none()
                {
                    oldest = Some(self.oldest_pending(&t.pending, &t.meta)?);
                }
                let (r, effect) = self.apply_one(&mut t, op, now, oldest.flatten())?;
                journal_stored(&mut batch, op, &r, now);
                // An operator's command is durable when it answers.
                operator |= matches!(
                    (op, &r),
                    (WriteOp::Retry { .. }, _)
                        | (WriteOp::PruneAudit { .. }, Ok(WriteOutcome::Pruned(1..)))
                );
                changed |= matches!(
                    r,
                    Ok(WriteOutcome::Inserted(_)
                        | WriteOutcome::Done
                        | WriteOutcome::Retried(_)
                        | WriteOutcome::Dedup(
                            super::dedup::DedupOutcome::Stored(_)
                                | super::dedup::DedupOutcome::StoredConflict { .. }
                        ))
                );
                results.push(r);
                effects.push(effect);
            }
            // Otherwise checkpoint on time, or when the batch does not fit in the journal.
            checkpoint = operator
                || js.last_checkpoint.elapsed() >= self.checkpoint_interval()
                || !js.journal.fits(batch.payload().len());
            if checkpoint {
                t.counters
                    .insert(C_JOURNAL_EPOCH, js.epoch + 1)
                    .map_err(self.storage("advance journal epoch"))?;
            }
        }
        if checkpoint {
            txn.commit().map_err(self.storage("commit write batch"))?;
            js.advance();
        } else {
            txn.set_durability(Durability::None)
                .map_err(self.storage("set durability"))?;
            txn.commit().map_err(self.storage("commit write batch"))?;
            js.dirty = true;
            if !batch.is_empty()
                && let Err(source) = js.journal.append(batch.payload())
            {
                // The batch is committed in memory only: make it durable the slow way, or
                // fail it (the callers answer negative ACKs; at worst a message is stored
                // and also re-sent, never lost).
                tracing::warn!(
                    path = %js.journal.path().display(),
                    error = %source,
                    "outbox: journal append failed; checkpointing instead"
                );
                self.checkpoint_locked(&mut js)?;
            }
        }
        drop(js);
        self.inner.commits.fetch_add(1, Ordering::Relaxed);
        self.apply_effects(effects);
        if changed {
            self.inner.changes.send_modify(|g| *g = g.wrapping_add(1));
        }
        Ok(results)
    }

    /// Updates the in-memory counters after a commit, and logs entering and leaving the
    /// "refusing" state once each (not once per refused message).
    fn apply_effects(&self, effects: Vec<Effect>) {
        let mut refused_now = 0u64;
        let mut accepted_now = false;
        let mut retried = false;
        {
            let mut feeds = match self.inner.feeds.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            for e in effects {
                match e {
                    Effect::None => {}
                    Effect::Received { feed, at } => {
                        accepted_now = true;
                        let c = feeds.entry(feed).or_default();
                        c.received += 1;
                        c.last_received_ms = Some(at);
                    }
                    Effect::Refused { feed } => {
                        refused_now += 1;
                        feeds.entry(feed).or_default().refused += 1;
                    }
                    Effect::Delivered { feed, at } => {
                        let c = feeds.entry(feed).or_default();
                        c.delivered += 1;
                        c.last_delivered_ms = Some(at);
                    }
                    Effect::Quarantined { feed } => feeds.entry(feed).or_default().quarantined += 1,
                    Effect::DeadLettered { feed } => {
                        feeds.entry(feed).or_default().dead_lettered += 1
                    }
                    Effect::Retried => retried = true,
                }
            }
        }
        if retried {
            self.inner.retry_epoch.fetch_add(1, Ordering::Relaxed);
        }
        if refused_now > 0 {
            self.inner
                .refused_total
                .fetch_add(refused_now, Ordering::Relaxed);
        }
        // The last insert of the batch decides the state; a batch with both means the limit is
        // right at the edge, which the next batch settles.
        if refused_now > 0 && !accepted_now {
            if !self.inner.refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    path = %self.inner.path.display(),
                    refused_total = self.inner.refused_total.load(Ordering::Relaxed),
                    "outbox full (outbox.max_bytes / max_records / max_age reached): new messages \
                     get negative ACKs until delivered records free space"
                );
            }
        } else if accepted_now && self.inner.refusing.swap(false, Ordering::Relaxed) {
            tracing::info!(
                path = %self.inner.path.display(),
                refused_total = self.inner.refused_total.load(Ordering::Relaxed),
                "outbox accepting messages again"
            );
        }
    }

    /// Reception time of the oldest record waiting for delivery: the first pending entry of
    /// each feed (a skip scan over the `(feed, id)` index, one lookup per feed).
    fn oldest_pending(
        &self,
        pending: &impl ReadableTable<(&'static str, u64), ()>,
        meta: &impl ReadableTable<u64, &'static [u8]>,
    ) -> Result<Option<u64>, StoreError> {
        let mut oldest: Option<u64> = None;
        let mut after: Option<String> = None;
        loop {
            let first = {
                let mut range = match &after {
                    None => pending.range::<(&str, u64)>(..),
                    Some(f) => pending.range::<(&str, u64)>((
                        Bound::Excluded((f.as_str(), u64::MAX)),
                        Bound::Unbounded,
                    )),
                }
                .map_err(self.storage("scan pending_by_feed"))?;
                match range.next() {
                    None => None,
                    Some(entry) => {
                        let (k, _) = entry.map_err(self.storage("scan pending_by_feed"))?;
                        let (feed, id) = k.value();
                        Some((feed.to_string(), id))
                    }
                }
            };
            let Some((feed, id)) = first else {
                return Ok(oldest);
            };
            if let Some(m) = meta.get(id).map_err(self.storage("read meta"))? {
                let m = self.decode_meta(id, m.value())?;
                oldest = Some(oldest.map_or(m.received_at_ms, |o| o.min(m.received_at_ms)));
            }
            after = Some(feed);
        }
    }

    fn add_counter(
        &self,
        t: &mut Tables<'_>,
        key: &'static str,
        delta: i64,
    ) -> Result<(), StoreError> {
        let cur = self.counter(&t.counters, key)?;
        let new = cur.checked_add_signed(delta).ok_or_else(|| {
            self.corrupt(format!("counter {key} would leave range ({cur} {delta:+})"))
        })?;
        t.counters
            .insert(key, new)
            .map_err(self.storage("update counter"))?;
        Ok(())
    }

    fn load_meta(&self, t: &Tables<'_>, id: RecordId) -> Result<Option<RecordMeta>, StoreError> {
        match t.meta.get(id.0).map_err(self.storage("read meta"))? {
            Some(m) => self.decode_meta(id.0, m.value()).map(Some),
            None => Ok(None),
        }
    }

    fn is_delivered(&self, t: &Tables<'_>, id: RecordId) -> Result<bool, StoreError> {
        Ok(t.audit
            .get(id.0)
            .map_err(self.storage("read audit"))?
            .is_some())
    }

    fn missing(
        &self,
        t: &Tables<'_>,
        id: RecordId,
        op: &'static str,
    ) -> Result<StoreError, StoreError> {
        Ok(if self.is_delivered(t, id)? {
            StoreError::InvalidTransition {
                id,
                op,
                state: StateKind::Delivered,
            }
        } else {
            StoreError::NotFound { id }
        })
    }

    /// Writes a new `Received` record under `id` (ids only grow: the next id moves past it).
    fn store_new(
        &self,
        t: &mut Tables<'_>,
        id: RecordId,
        new: &NewRecord,
    ) -> Result<(), StoreError> {
        let raw_len = new.raw.len() as u64;
        let meta = RecordMeta {
            id,
            feed: new.feed.clone(),
            control_id: new.control_id.clone(),
            message_type: new.message_type.clone(),
            received_at_ms: new.received_at_ms,
            state: RecordState::Received,
            raw_sha256: sha256_hex(&new.raw),
            raw_len,
            bundle_sha256: None,
            bundle_len: 0,
            message_id: None,
            key_id: None,
            delivered_at_ms: None,
        };
        self.put_meta(t, &meta)?;
        t.raw
            .insert(id.0, new.raw.as_slice())
            .map_err(self.storage("write raw message"))?;
        t.pending
            .insert((new.feed.as_str(), id.0), ())
            .map_err(self.storage("write pending_by_feed"))?;
        t.to_map
            .insert(id.0, ())
            .map_err(self.storage("write pending_mapping"))?;
        let next = self.counter(&t.counters, C_NEXT_ID)?.max(id.0 + 1);
        t.counters
            .insert(C_NEXT_ID, next)
            .map_err(self.storage("update counter"))?;
        self.add_counter(t, C_BYTES, raw_len as i64)?;
        self.add_counter(t, C_RECEIVED, 1)
    }

    fn put_meta(&self, t: &mut Tables<'_>, meta: &RecordMeta) -> Result<(), StoreError> {
        let bytes = codec::encode_meta(meta);
        t.meta
            .insert(meta.id.0, bytes.as_slice())
            .map_err(self.storage("write meta"))?;
        Ok(())
    }

    fn state_counter(kind: StateKind) -> &'static str {
        match kind {
            StateKind::Received => C_RECEIVED,
            StateKind::Ready => C_READY,
            StateKind::Quarantined => C_QUARANTINED,
            StateKind::DeadLettered => C_DEAD,
            StateKind::Delivered => C_DELIVERED,
        }
    }

    /// Outer `Err`: the batch must be aborted. Inner `Err`: this op is refused, nothing written.
    fn apply_one(
        &self,
        t: &mut Tables<'_>,
        op: &WriteOp,
        now: u64,
        oldest_pending_ms: Option<u64>,
    ) -> Result<(Result<WriteOutcome, StoreError>, Effect), StoreError> {
        match op {
            WriteOp::Insert(new) => {
                let raw_len = new.raw.len() as u64;
                let used = self.counter(&t.counters, C_BYTES)?;
                let records = self.counter(&t.counters, C_RECEIVED)?
                    + self.counter(&t.counters, C_READY)?
                    + self.counter(&t.counters, C_QUARANTINED)?
                    + self.counter(&t.counters, C_DEAD)?;
                let limits = &self.inner.limits;
                if used.saturating_add(raw_len) > limits.max_bytes || records >= limits.max_records
                {
                    return Ok((
                        Err(StoreError::Full {
                            path: self.inner.path.clone(),
                            used_bytes: used,
                            max_bytes: limits.max_bytes,
                            incoming_bytes: raw_len,
                            records,
                            max_records: limits.max_records,
                        }),
                        Effect::Refused {
                            feed: new.feed.clone(),
                        },
                    ));
                }
                if limits.max_age_ms > 0
                    && let Some(oldest) = oldest_pending_ms
                    && now.saturating_sub(oldest) > limits.max_age_ms
                {
                    return Ok((
                        Err(StoreError::TooOld {
                            path: self.inner.path.clone(),
                            oldest_age_secs: now.saturating_sub(oldest) / 1000,
                            max_age_secs: limits.max_age_ms / 1000,
                        }),
                        Effect::Refused {
                            feed: new.feed.clone(),
                        },
                    ));
                }
                let id = RecordId(self.counter(&t.counters, C_NEXT_ID)?.max(1));
                self.store_new(t, id, new)?;
                Ok((
                    Ok(WriteOutcome::Inserted(id)),
                    Effect::Received {
                        feed: new.feed.clone(),
                        at: new.received_at_ms,
                    },
                ))
            }
            WriteOp::SetReady { id, bundle, info } => {
                let Some(mut meta) = self.load_meta(t, *id)? else {
                    return Ok((Err(self.missing(t, *id, "set ready")?), Effect::None));
                };
                if meta.state != RecordState::Received {
                    return Ok((
                        Err(StoreError::InvalidTransition {
                            id: *id,
                            op: "set ready",
                            state: meta.state.kind(),
                        }),
                        Effect::None,
                    ));
                }
                meta.state = RecordState::Ready;
                meta.bundle_sha256 = Some(sha256_hex(bundle));
                let old_bundle_len = meta.bundle_len;
                meta.bundle_len = bundle.len() as u64;
                meta.message_id = info.message_id.clone();
                meta.key_id = info.key_id.clone();
                self.put_meta(t, &meta)?;
                t.bundle
                    .insert(id.0, bundle.as_slice())
                    .map_err(self.storage("write bundle"))?;
                t.to_map
                    .remove(id.0)
                    .map_err(self.storage("update pending_mapping"))?;
                // Bundles are not refused for space: the message was already accepted and
                // ACKed; refusing its Bundle would only wedge the feed. New inserts pay instead.
                self.add_counter(t, C_BYTES, bundle.len() as i64 - old_bundle_len as i64)?;
                self.add_counter(t, C_RECEIVED, -1)?;
                self.add_counter(t, C_READY, 1)?;
                Ok((Ok(WriteOutcome::Done), Effect::None))
            }
            WriteOp::Quarantine { id, reason } | WriteOp::DeadLetter { id, reason } => {
                let dead = matches!(op, WriteOp::DeadLetter { .. });
                let name = if dead { "dead-letter" } else { "quarantine" };
                let Some(mut meta) = self.load_meta(t, *id)? else {
                    return Ok((Err(self.missing(t, *id, name)?), Effect::None));
                };
                let from = meta.state.kind();
                let allowed = if dead {
                    from == StateKind::Ready
                } else {
                    matches!(from, StateKind::Received | StateKind::Ready)
                };
                if !allowed {
                    return Ok((
                        Err(StoreError::InvalidTransition {
                            id: *id,
                            op: name,
                            state: from,
                        }),
                        Effect::None,
                    ));
                }
                meta.state = if dead {
                    RecordState::DeadLettered {
                        reason: reason.clone(),
                    }
                } else {
                    RecordState::Quarantined {
                        reason: reason.clone(),
                    }
                };
                self.put_meta(t, &meta)?;
                t.pending
                    .remove((meta.feed.as_str(), id.0))
                    .map_err(self.storage("update pending_by_feed"))?;
                t.to_map
                    .remove(id.0)
                    .map_err(self.storage("update pending_mapping"))?;
                self.add_counter(t, Self::state_counter(from), -1)?;
                self.add_counter(t, if dead { C_DEAD } else { C_QUARANTINED }, 1)?;
                let feed = meta.feed;
                Ok((
                    Ok(WriteOutcome::Done),
                    if dead {
                        Effect::DeadLettered { feed }
                    } else {
                        Effect::Quarantined { feed }
                    },
                ))
            }
            WriteOp::Retry { id } => {
                let Some(mut meta) = self.load_meta(t, *id)? else {
                    return Ok((Err(self.missing(t, *id, "retry")?), Effect::None));
                };
                let from = meta.state.kind();
                let to = match from {
                    StateKind::Quarantined => {
                        // Mapped again from the raw message (a fixed mapping may now accept it);
                        // a Bundle it may have had is dropped.
                        if t.raw.get(id.0).map_err(self.storage("read raw"))?.is_none() {
                            return Err(self.corrupt(format!(
                                "quarantined record #{} has no raw message",
                                id.0
                            )));
                        }
                        t.bundle
                            .remove(id.0)
                            .map_err(self.storage("remove bundle"))?;
                        self.add_counter(t, C_BYTES, -(meta.bundle_len as i64))?;
                        meta.bundle_len = 0;
                        meta.bundle_sha256 = None;
                        meta.state = RecordState::Received;
                        t.to_map
                            .insert(id.0, ())
                            .map_err(self.storage("write pending_mapping"))?;
                        StateKind::Received
                    }
                    StateKind::DeadLettered => {
                        if t.bundle
                            .get(id.0)
                            .map_err(self.storage("read bundle"))?
                            .is_none()
                        {
                            return Err(self
                                .corrupt(format!("dead-lettered record #{} has no bundle", id.0)));
                        }
                        meta.state = RecordState::Ready;
                        StateKind::Ready
                    }
                    other => {
                        return Ok((
                            Err(StoreError::InvalidTransition {
                                id: *id,
                                op: "retry",
                                state: other,
                            }),
                            Effect::None,
                        ));
                    }
                };
                self.put_meta(t, &meta)?;
                t.pending
                    .insert((meta.feed.as_str(), id.0), ())
                    .map_err(self.storage("write pending_by_feed"))?;
                self.add_counter(t, Self::state_counter(from), -1)?;
                self.add_counter(t, Self::state_counter(to), 1)?;
                Ok((Ok(WriteOutcome::Retried(to)), Effect::Retried))
            }
            WriteOp::MarkDelivered { id } => {
                let Some(meta) = self.load_meta(t, *id)? else {
                    // A second PUBACK for a republished record: already delivered is success.
                    if self.is_delivered(t, *id)? {
                        return Ok((Ok(WriteOutcome::Done), Effect::None));
                    }
                    return Ok((Err(StoreError::NotFound { id: *id }), Effect::None));
                };
                if meta.state != RecordState::Ready {
                    return Ok((
                        Err(StoreError::InvalidTransition {
                            id: *id,
                            op: "mark delivered",
                            state: meta.state.kind(),
                        }),
                        Effect::None,
                    ));
                }
                let entry = AuditEntry {
                    id: *id,
                    feed: meta.feed.clone(),
                    control_id: meta.control_id.clone(),
                    message_type: meta.message_type.clone(),
                    received_at_ms: meta.received_at_ms,
                    delivered_at_ms: now,
                    raw_sha256: meta.raw_sha256.clone(),
                    bundle_sha256: meta.bundle_sha256.clone(),
                    message_id: meta.message_id.clone(),
                };
                let bytes = codec::encode_audit(&entry);
                t.audit
                    .insert(id.0, bytes.as_slice())
                    .map_err(self.storage("write audit row"))?;
                t.meta.remove(id.0).map_err(self.storage("remove meta"))?;
                t.raw
                    .remove(id.0)
                    .map_err(self.storage("remove raw message"))?;
                t.bundle
                    .remove(id.0)
                    .map_err(self.storage("remove bundle"))?;
                t.pending
                    .remove((meta.feed.as_str(), id.0))
                    .map_err(self.storage("update pending_by_feed"))?;
                let freed = meta.raw_len.saturating_add(meta.bundle_len);
                self.add_counter(t, C_BYTES, -(freed as i64))?;
                self.add_counter(t, C_READY, -1)?;
                self.add_counter(t, C_DELIVERED, 1)?;
                Ok((
                    Ok(WriteOutcome::Done),
                    Effect::Delivered {
                        feed: meta.feed,
                        at: now,
                    },
                ))
            }
            WriteOp::InsertDedup(d) => {
                use super::dedup;
                let seen = dedup::lookup(&t.dedup, &d.key, now)
                    .map_err(self.storage("read dedup_window"))?;
                if let Some(out) = dedup::short_circuit(&seen, d.on_conflict) {
                    return Ok((Ok(WriteOutcome::Dedup(out)), Effect::None));
                }
                let (inserted, effect) = self.apply_one(
                    t,
                    &WriteOp::Insert(d.record.clone()),
                    now,
                    oldest_pending_ms,
                )?;
                let Ok(WriteOutcome::Inserted(id)) = inserted else {
                    return Ok((inserted, effect));
                };
                let out = dedup::remember(
                    &mut t.dedup,
                    &mut t.dedup_by_expiry,
                    &d.key,
                    d.window_ms,
                    id,
                    &seen,
                    now,
                )
                .map_err(self.storage("write dedup_window"))?;
                Ok((Ok(WriteOutcome::Dedup(out)), effect))
            }
            WriteOp::PruneAudit { cutoff_ms } => {
                let mut pruned = 0u64;
                let mut undecodable = 0u64;
                let cutoff = *cutoff_ms;
                t.audit
                    .retain(|k, v| {
                        match codec::decode_audit(k, v) {
                            Ok(e) if e.delivered_at_ms < cutoff => {
                                pruned += 1;
                                false
                            }
                            Ok(_) => true,
                            Err(_) => {
                                // Keep what we cannot read: pruning must never destroy
                                // evidence by accident.
                                undecodable += 1;
                                true
                            }
                        }
                    })
                    .map_err(self.storage("prune audit rows"))?;
                if undecodable > 0 {
                    tracing::warn!(
                        path = %self.inner.path.display(),
                        undecodable,
                        "outbox: audit rows that cannot be decoded were kept by pruning"
                    );
                }
                Ok((Ok(WriteOutcome::Pruned(pruned)), Effect::None))
            }
        }
    }
}

fn read_bytes(
    txn: &ReadTransaction,
    def: TableDefinition<u64, &[u8]>,
    id: u64,
) -> Result<Option<Vec<u8>>, redb::Error> {
    let t = txn.open_table(def)?;
    Ok(t.get(id)?.map(|g| g.value().to_vec()))
}

fn meta_from_audit(e: AuditEntry) -> RecordMeta {
    RecordMeta {
        id: e.id,
        feed: e.feed,
        control_id: e.control_id,
        message_type: e.message_type,
        received_at_ms: e.received_at_ms,
        state: RecordState::Delivered,
        raw_sha256: e.raw_sha256,
        raw_len: 0,
        bundle_sha256: e.bundle_sha256,
        bundle_len: 0,
        message_id: e.message_id,
        key_id: None,
        delivered_at_ms: Some(e.delivered_at_ms),
    }
}

/// Adds the message `op` stored (if it stored one) to the batch's journal payload.
fn journal_stored(
    batch: &mut journal::Batch,
    op: &WriteOp,
    result: &Result<WriteOutcome, StoreError>,
    now: u64,
) {
    use super::dedup::DedupOutcome;
    match (op, result) {
        (WriteOp::Insert(new), Ok(WriteOutcome::Inserted(id))) => batch.push(*id, now, new, None),
        (
            WriteOp::InsertDedup(d),
            Ok(WriteOutcome::Dedup(
                DedupOutcome::Stored(id) | DedupOutcome::StoredConflict { id, .. },
            )),
        ) => batch.push(
            *id,
            now,
            &d.record,
            Some((d.key.key(), d.key.content_sha256(), d.window_ms)),
        ),
        _ => {}
    }
}

/// A random, non-zero database instance id.
fn random_instance_id() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // Without randomness (never seen on Linux), fall back to the clock: still distinct from
    // any earlier database in practice.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b = now_ms().to_le_bytes();
    }
    u64::from_le_bytes(b).max(1)
}
