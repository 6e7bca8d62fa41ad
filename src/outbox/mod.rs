//! The durable outbox: every accepted message lives here until the exchange has it.
//!
//! # Promise
//!
//! *Nothing accepted is ever lost; records leave in order per feed; a record is removed only
//! after the broker's PUBACK.* The rest of this module is how that promise is kept.
//!
//! # States
//!
//! ```text
//!            insert (durable)          set_ready               PUBACK -> mark_delivered
//!  (new) ───────────────────> Received ─────────> Ready ───────────────────────────> Delivered
//!                              │    ▲               │  ▲                              (payloads pruned,
//!                   quarantine │    │ retry         │  │ retry                         audit row kept)
//!                              ▼    │               ▼  │
//!                            Quarantined { reason }  DeadLettered { reason }
//! ```
//!
//! * **Received**: the raw HL7 bytes are on disk; ingest may now send `AA`/`CA`.
//! * **Ready**: mapped, validated and signed: the Bundle is stored and waits for its feed's
//!   publisher. Mapping and signing are one step (a pure function of the raw message, redone
//!   from scratch after a crash), so "mapped" and "signed" are not separate durable states.
//! * **Delivered**: the broker acknowledged (PUBACK, or PUBCOMP with QoS 2); raw and Bundle are
//!   deleted and an audit row (id, feed, control id, message id, hashes, times) remains until
//!   [`WriterHandle::prune_audit`] removes it after the retention time (the daemon prunes
//!   hourly) or an operator purges it (`hl7-edge outbox purge --delivered`).
//! * **Quarantined**: mapping/validation failed; kept with the raw message and the reason for an
//!   operator, never forwarded, and it does *not* block its feed. `retry` maps it again.
//! * **DeadLettered**: the broker refused the Bundle for good (too large, not authorised); kept
//!   with its Bundle and the reason instead of being retried forever; does not block its feed.
//!   `retry` makes it Ready again (publishers rewind: see [`Outbox::retry_epoch`]).
//!
//! Crash recovery is "resume every record from its state": [`Outbox::pending_for_mapping`]
//! lists what the mapper must redo (Received), [`Outbox::next_ready`] is where each publisher
//! restarts (Ready, including what was in flight), parked records stay parked, delivered ones
//! are gone. A publisher that crashed between PUBLISH and the delivered commit republishes:
//! delivery is at-least-once, and the exchange deduplicates on `Bundle.identifier`.
//!
//! # Limits
//!
//! [`OutboxLimits`]: total bytes and records not yet delivered, and the age of the oldest
//! message still waiting for delivery. Beyond any of them inserts fail with
//! [`StoreError::Full`] / [`StoreError::TooOld`] and ingest answers a negative ACK: the sender
//! keeps the message, nothing is dropped silently. Entering and leaving that state is logged
//! once each (warn / info); [`OutboxStats::refusing`] and `refused_total` and the per-feed
//! `refused` counters ([`Outbox::feed_counters`]) show it in `hl7-edge outbox stats` and in
//! the feed heartbeats.
//!
//! # Durability
//!
//! An insert is durable when the writer answers, but not through a full redb commit per batch:
//! batches commit to redb non-durably and the messages they stored are appended to the intake
//! journal with one `fdatasync` (`journal.rs` says why and how); a durable redb commit (a
//! checkpoint) follows at most [`OutboxLimits::checkpoint_interval_ms`] later, at an operator's
//! command and at shutdown. After a crash, redb opens at its last checkpoint, where ids, byte
//! counters and per-state counts are in step with the records (same transactions), and
//! [`Outbox::open`] stores the journal's messages again under their ids. What a crash undoes
//! besides is only work the pipeline redoes from the records' states (mapping, publishing).
//!
//! # Duplicates window
//!
//! Two more tables hold the duplicates window of ingest (`dedup.rs`): checked and updated in
//! the same transaction as the insert they guard ([`WriterHandle::insert_dedup`]).
//!
//! # Why one writer
//!
//! redb allows one write transaction at a time and making a batch durable costs an fsync. One
//! writer thread ([`Writer`]) draining a bounded queue turns N concurrent inserts into one
//! transaction and one fsync (group commit), gives back-pressure when the disk is slow, and
//! answers each caller only after the commit that holds its operation. Readers use MVCC
//! snapshots and never wait for the writer. Consumers learn about new work from a
//! `tokio::sync::watch` ([`Outbox::subscribe_changes`]) instead of polling.
//!
//! # One process
//!
//! redb locks the file: only the daemon opens it. Operators' commands reach the store of a
//! running daemon through its admin socket ([`crate::ops::admin`]), which executes them with the
//! daemon's own handle and writer; on a stopped daemon the command opens the file itself.

mod codec;
mod dedup;
mod error;
mod journal;
mod store;
mod writer;

pub use dedup::{ConflictPolicy, DedupInsert, DedupKey, DedupOutcome, content_hash};
pub use error::StoreError;
pub use store::{
    AuditEntry, BundleInfo, DEFAULT_CHECKPOINT_INTERVAL_MS, FeedCounters, ListFilter, NewRecord,
    Outbox, OutboxLimits, OutboxStats, Record, RecordId, RecordMeta, RecordState, StateKind,
    WriteOp, WriteOutcome, now_ms, sha256_hex,
};
pub use writer::{Writer, WriterConfig, WriterHandle};

#[cfg(test)]
mod tests;
