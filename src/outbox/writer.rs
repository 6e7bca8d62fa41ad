//! The single store writer: group commit.
//!
//! A durable commit costs an fsync (milliseconds on an appliance SSD, worse on SD cards), and
//! redb serialises write transactions anyway. So instead of every ingest connection opening its
//! own transaction, one dedicated thread owns all writes: it takes everything queued on a bounded
//! channel (up to a batch cap), applies it in ONE write transaction, makes it durable (one
//! journal fsync, or a checkpoint: see `journal.rs`), and only then answers each caller through
//! its oneshot. With many senders, N messages cost one fsync, and a caller never hears "stored"
//! before its bytes are on disk. When idle, it checkpoints once the interval is over.
//!
//! A dedicated OS thread (not a tokio worker) runs the redb work because commits block on disk
//! I/O; the bounded channel gives back-pressure to ingest when the disk cannot keep up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::error::StoreError;
use super::store::{BundleInfo, NewRecord, Outbox, RecordId, StateKind, WriteOp, WriteOutcome};

/// Tuning of the writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Capacity of the request channel; callers wait (back-pressure) when it is full.
    pub queue_capacity: usize,
    /// At most this many operations per transaction.
    pub max_batch: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_capacity: 1024,
            max_batch: 512,
        }
    }
}

type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

enum Msg {
    Op(WriteOp, Reply),
    Shutdown,
}

/// Spawns the writer.
pub struct Writer;

impl Writer {
    /// Starts the writer thread with default tuning.
    pub fn spawn(outbox: Outbox) -> Result<WriterHandle, StoreError> {
        Writer::spawn_with(outbox, WriterConfig::default())
    }

    /// Starts the writer thread.
    pub fn spawn_with(outbox: Outbox, config: WriterConfig) -> Result<WriterHandle, StoreError> {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let changes = outbox.subscribe_changes();
        let ob = outbox.clone();
        let max_batch = config.max_batch.max(1);
        let spawn_error = |e| StoreError::Storage {
            path: outbox.path().to_path_buf(),
            what: "spawn writer thread",
            source: Box::new(redb::Error::Io(e)),
        };
        // The writer's own timer (a current-thread runtime used only for `recv` with a
        // timeout): the thread stays off the tokio workers, which must never block on disk.
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(spawn_error)?;
        let join = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || run(ob, rx, max_batch, clock))
            .map_err(spawn_error)?;
        Ok(WriterHandle {
            tx,
            changes,
            join: Arc::new(Mutex::new(Some(join))),
        })
    }
}

/// Sends operations to the writer. Cheap to clone; every method returns only after the
/// operation is durably committed (or definitely not stored).
#[derive(Clone, Debug)]
pub struct WriterHandle {
    tx: mpsc::Sender<Msg>,
    changes: watch::Receiver<u64>,
    join: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Op(..) => f.write_str("Op"),
            Msg::Shutdown => f.write_str("Shutdown"),
        }
    }
}

impl WriterHandle {
    pub(super) async fn submit(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Op(op, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        // A dropped reply means the writer stopped before committing this op.
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores a new message durably; the caller may ACK the sender once this returns `Ok`.
    pub async fn insert(&self, record: NewRecord) -> Result<RecordId, StoreError> {
        match self.submit(WriteOp::Insert(record)).await? {
            WriteOutcome::Inserted(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// Stores the signed Bundle: `Received` -> `Ready`.
    pub async fn set_ready(&self, id: RecordId, bundle: Vec<u8>) -> Result<(), StoreError> {
        self.set_ready_with(id, bundle, BundleInfo::default()).await
    }

    /// [`Self::set_ready`] with the Bundle's message id and signing key id (MQTT 5 properties).
    pub async fn set_ready_with(
        &self,
        id: RecordId,
        bundle: Vec<u8>,
        info: BundleInfo,
    ) -> Result<(), StoreError> {
        self.submit(WriteOp::SetReady { id, bundle, info })
            .await
            .map(drop)
    }

    /// `Ready` -> `DeadLettered`: the broker refused the Bundle for good (reason kept).
    pub async fn dead_letter(&self, id: RecordId, reason: String) -> Result<(), StoreError> {
        self.submit(WriteOp::DeadLetter { id, reason })
            .await
            .map(drop)
    }

    /// An operator's retry: `Quarantined` -> `Received`, `DeadLettered` -> `Ready`. Returns the
    /// new state.
    pub async fn retry(&self, id: RecordId) -> Result<StateKind, StoreError> {
        match self.submit(WriteOp::Retry { id }).await? {
            WriteOutcome::Retried(k) => Ok(k),
            other => Err(unexpected(other)),
        }
    }

    /// Removes every audit row of a delivered record (an operator's `purge --delivered`).
    pub async fn purge_delivered(&self) -> Result<u64, StoreError> {
        match self
            .submit(WriteOp::PruneAudit {
                cutoff_ms: u64::MAX,
            })
            .await?
        {
            WriteOutcome::Pruned(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// `Received`/`Ready` -> `Quarantined`: kept with the reason, never forwarded.
    /// The reason must not contain patient data (it is shown to operators and logged).
    pub async fn quarantine(&self, id: RecordId, reason: String) -> Result<(), StoreError> {
        self.submit(WriteOp::Quarantine { id, reason })
            .await
            .map(drop)
    }

    /// `Ready` -> `Delivered`: payloads removed, audit row written. Idempotent.
    pub async fn mark_delivered(&self, id: RecordId) -> Result<(), StoreError> {
        self.submit(WriteOp::MarkDelivered { id }).await.map(drop)
    }

    /// Removes audit rows of records delivered more than `older_than` ago; returns how many.
    pub async fn prune_audit(&self, older_than: Duration) -> Result<u64, StoreError> {
        let age = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
        let cutoff_ms = super::store::now_ms().saturating_sub(age);
        match self.submit(WriteOp::PruneAudit { cutoff_ms }).await? {
            WriteOutcome::Pruned(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Changes after every commit that modified records (see [`Outbox::subscribe_changes`]).
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Stops the writer: operations queued before this call are committed, later ones get
    /// [`StoreError::Closed`]. Returns once the writer thread has exited (so the database file
    /// is released when the last [`Outbox`] clone is dropped).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown).await;
        let join = self.join.lock().ok().and_then(|mut j| j.take());
        if let Some(join) = join {
            let _ = tokio::task::spawn_blocking(move || join.join()).await;
        }
    }
}

fn unexpected(outcome: WriteOutcome) -> StoreError {
    StoreError::Corrupt {
        path: Default::default(),
        what: format!("writer answered with an unexpected outcome {outcome:?}"),
    }
}

fn run(
    outbox: Outbox,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    clock: tokio::runtime::Runtime,
) {
    let mut ops: Vec<WriteOp> = Vec::with_capacity(max_batch);
    let mut replies: Vec<Reply> = Vec::with_capacity(max_batch);
    let mut stop = false;
    let mut total_ops = 0u64;
    let idle_tick = outbox.checkpoint_interval().max(Duration::from_millis(20));
    while !stop {
        // Idle: make the last non-durable commits durable once the interval is over (see
        // `journal.rs`), so a quiet appliance has nothing to redo after a power cut.
        let first = clock.block_on(async { tokio::time::timeout(idle_tick, rx.recv()).await });
        match first {
            Err(_idle) => {
                if let Err(e) = outbox.checkpoint_if_due() {
                    tracing::error!(path = %outbox.path().display(), error = %e, "outbox: checkpoint failed");
                }
                continue;
            }
            Ok(Some(Msg::Op(op, reply))) => {
                ops.push(op);
                replies.push(reply);
            }
            Ok(Some(Msg::Shutdown) | None) => break,
        }
        // Group commit: take whatever else is already queued.
        while ops.len() < max_batch {
            match rx.try_recv() {
                Ok(Msg::Op(op, reply)) => {
                    ops.push(op);
                    replies.push(reply);
                }
                Ok(Msg::Shutdown) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        total_ops += ops.len() as u64;
        commit(&outbox, &mut ops, &mut replies);
    }
    // Refuse what is still queued: dropping the replies answers `Closed`.
    rx.close();
    while rx.try_recv().is_ok() {}
    if let Err(e) = outbox.checkpoint() {
        tracing::error!(path = %outbox.path().display(), error = %e, "outbox: final checkpoint failed; the journal will be replayed at the next start");
    }
    // Operations per commit tell how well group commit is batching (`RUST_LOG` with
    // `hl7_edge::outbox::writer=debug`).
    tracing::debug!(path = %outbox.path().display(), commits = outbox.commit_count(), ops = total_ops, "outbox writer stopped");
}

fn commit(outbox: &Outbox, ops: &mut Vec<WriteOp>, replies: &mut Vec<Reply>) {
    let n = ops.len();
    match outbox.apply_batch(ops) {
        Ok(results) => {
            for (reply, result) in replies.drain(..).zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(
                path = %outbox.path().display(),
                ops = n,
                error = %e,
                "outbox: write batch not committed"
            );
            let shared = Arc::new(e);
            for reply in replies.drain(..) {
                let _ = reply.send(Err(StoreError::BatchFailed {
                    ops: n,
                    source: shared.clone(),
                }));
            }
        }
    }
    ops.clear();
}
