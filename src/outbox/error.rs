//! Errors of the outbox.
//!
//! Every variant says which database file and which operation failed, so an operator reading a
//! log line can act on it (disk full, permissions, corrupt file) without a debugger. No variant
//! carries message content: HL7 and FHIR payloads hold patient data and never enter an error.

use std::path::PathBuf;
use std::sync::Arc;

use super::store::{RecordId, StateKind};

/// What can go wrong while storing or reading records.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file could not be created or opened (permissions, lock held by another
    /// process, unsupported file format).
    #[error("cannot open outbox database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },

    /// A storage operation failed inside redb (I/O error, disk full, corruption detected).
    #[error("outbox database {path}: {what} failed: {source}")]
    Storage {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Box<redb::Error>,
    },

    /// The intake journal beside the database could not be created, read or written.
    #[error("outbox journal {path}: {what} failed: {source}")]
    Journal {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The configured limits are reached: the message is refused (ingest answers a negative ACK)
    /// instead of being dropped. Space is freed as records are delivered.
    #[error(
        "outbox {path} is full: {used_bytes} of {max_bytes} bytes and {records} of {max_records} \
         records in use, refusing a message of {incoming_bytes} bytes (space is freed as records \
         are delivered; check the MQTT forwarder or raise outbox.max_bytes)"
    )]
    Full {
        path: PathBuf,
        used_bytes: u64,
        max_bytes: u64,
        incoming_bytes: u64,
        records: u64,
        max_records: u64,
    },

    /// The oldest message waiting for delivery is older than `outbox.max_age_secs`: new messages
    /// are refused (negative ACK) so the sender holds them and alarms, until the exchange has
    /// caught up.
    #[error(
        "outbox {path}: the oldest undelivered message is {oldest_age_secs} s old, beyond \
         outbox.max_age_secs = {max_age_secs}; refusing new messages until delivery catches up \
         (check the MQTT forwarder and the broker)"
    )]
    TooOld {
        path: PathBuf,
        oldest_age_secs: u64,
        max_age_secs: u64,
    },

    /// No live record (nor audit row) has this id.
    #[error("outbox record {id} does not exist")]
    NotFound { id: RecordId },

    /// The requested transition is not allowed from the record's current state.
    #[error("outbox record {id}: cannot {op} a record in state {state}")]
    InvalidTransition {
        id: RecordId,
        op: &'static str,
        state: StateKind,
    },

    /// Stored data could not be decoded: the file was damaged or written by an incompatible
    /// version. Reported instead of panicking so the daemon can keep serving other records.
    #[error("outbox database {path}: corrupt data: {what}")]
    Corrupt { path: PathBuf, what: String },

    /// The file was written with a schema this build does not understand.
    #[error(
        "outbox database {path} has schema version {found}, this build understands {expected}; \
         use the matching hl7-edge version or move the file aside"
    )]
    Incompatible {
        path: PathBuf,
        found: u64,
        expected: u64,
    },

    /// The group commit that carried this operation failed; nothing of the batch was stored.
    #[error("outbox write batch of {ops} operations was not committed: {source}")]
    BatchFailed {
        ops: usize,
        #[source]
        source: Arc<StoreError>,
    },

    /// The writer has shut down (daemon stopping): nothing was stored.
    #[error("outbox writer is shut down; the operation was not stored")]
    Closed,
}

impl StoreError {
    /// True for the refusals that mean "full, try later" (space, record count or age).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. } | StoreError::TooOld { .. })
    }

    /// True when the database file is held by another process (a running daemon).
    pub fn is_locked(&self) -> bool {
        matches!(
            self,
            StoreError::Open { source, .. }
                if matches!(**source, redb::DatabaseError::DatabaseAlreadyOpen)
        )
    }
}
