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
//!                                │                  │                                 (payloads pruned,
//!                                └──── quarantine ──┴──> Quarantined { reason }        audit row kept)
//! ```
//!
//! * **Received**: the raw HL7 bytes are on disk; ingest may now send `AA`/`CA`.
//! * **Ready**: the signed Bundle is stored and waits for its feed's publisher.
//! * **Delivered**: the broker acknowledged (QoS 1 PUBACK); raw and Bundle are deleted and an
//!   audit row (id, feed, control id, hashes, times) remains until
//!   [`WriterHandle::prune_audit`] removes it after the retention time.
//! * **Quarantined**: mapping/validation failed (or the Bundle cannot be published); kept with
//!   the reason for an operator, never forwarded, and it does *not* block its feed.
//!
//! Crash recovery is "resume every record from its state": [`Outbox::pending_for_mapping`]
//! lists what the mapper must redo, [`Outbox::next_ready`] is where each publisher restarts.
//! A publisher that crashed between PUBLISH and the delivered commit republishes: delivery is
//! at-least-once, and the exchange deduplicates on `Bundle.identifier`.
//!
//! # Durability
//!
//! redb commits with `Durability::Immediate` (its default): `commit()` returns after the data
//! and the new root are fsynced, and a torn write leaves the previous commit intact. Ids,
//! byte counters and per-state counts live in the same transaction as the records, so they are
//! never out of step after a crash. When the limits ([`OutboxLimits`]) are reached, inserts fail
//! with [`StoreError::Full`] so ingest answers a negative ACK: the sender keeps the message,
//! nothing is dropped silently.
//!
//! # Why one writer
//!
//! redb allows one write transaction at a time and each durable commit costs an fsync. One
//! writer thread ([`Writer`]) draining a bounded queue turns N concurrent inserts into one
//! transaction and one fsync (group commit), gives back-pressure when the disk is slow, and
//! answers each caller only after the commit that holds its operation. Readers use MVCC
//! snapshots and never wait for the writer. Consumers learn about new work from a
//! `tokio::sync::watch` ([`Outbox::subscribe_changes`]) instead of polling.

mod error;
mod store;
mod writer;

pub use error::StoreError;
pub use store::{
    AuditEntry, BundleInfo, FeedCounters, ListFilter, NewRecord, Outbox, OutboxLimits, OutboxStats,
    Record, RecordId, RecordMeta, RecordState, StateKind, WriteOp, WriteOutcome, now_ms,
    sha256_hex,
};
pub use writer::{Writer, WriterConfig, WriterHandle};

#[cfg(test)]
mod tests;
