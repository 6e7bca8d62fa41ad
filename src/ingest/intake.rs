//! From one framed message to one ACK: charset, parse, checks, duplicates, durable store.
//!
//! # The acknowledgement rules
//!
//! * **Original mode** (MSH-15 and MSH-16 empty): `AA` only after the durable commit; `AR` for
//!   what the sender must fix (undecodable charset, unparseable MSH, unsupported version, sender
//!   not allowed, control id reused with other content under `on_conflict = "reject"`); `AE`
//!   for what is our side's problem or the mapping's verdict (storage full, disk nearly full,
//!   store failure, `ack_after = "mapping"` refusals). Every negative ACK has an ERR segment with
//!   an HL7 table 0357 code, the location when known, and a reason without patient data.
//! * **Enhanced mode** (MSH-15 or MSH-16 valued): the same verdicts as accept
//!   acknowledgements `CA` / `CE` / `CR`, sent according to MSH-15: `AL` (or empty) always,
//!   `NE` never, `ER` only for `CE`/`CR`, `SU` only for `CA`. The ACK itself carries
//!   MSH-15/16 = `NE`.
//! * **MSH-16 (application acknowledgement)**: hl7-edge is a store-and-forward gateway, not the
//!   application: it never sends application acknowledgements, neither on this connection nor
//!   on another one. What the exchange does with the Bundle is not reported back over HL7;
//!   `ack_after = "mapping"` is the way to have the mapping verdict in the (accept) ACK.
//! * MSA-2 is always the incoming MSH-10 (sniffed from the raw text when the message cannot be
//!   parsed); MSH-10 of the ACK is new and unique across feeds and restarts; MSH-12 and the
//!   delimiters follow the incoming message; the ACK is encoded in the charset the message was
//!   decoded with and declares its MSH-18 when the message did.
//! * **Duplicates** (feed `[duplicates]`, see `outbox/dedup.rs`): a message already accepted is
//!   acknowledged again with the accept code but not stored or forwarded twice.
//! * **Batches** (FHS/BHS): every message goes through the same path; the answer is a batch
//!   acknowledgement (see `hl7/batch.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use encoding_rs::Encoding;
use tracing::{debug, info, warn};

use super::adapter::{AckAfter, DuplicatesMode, FeedConfig, Transport};
use super::disk::DiskGuard;
use crate::hl7::batch::{self, BatchFrame, GroupAnswer};
use crate::hl7::{self, AckCode, AckError, ErrorCode, Header, Separators};
use crate::outbox::{
    DedupInsert, DedupKey, DedupOutcome, NewRecord, RecordId, StoreError, WriterHandle, now_ms,
};

/// HL7 versions this appliance accepts (MSH-12).
const SUPPORTED_VERSIONS: &[&str] = &[
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1",
    "2.8.2",
];

/// What happened to a message, for the caller's logs and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durably stored as this record.
    Stored(RecordId),
    /// Already stored earlier as this record (duplicates window): acknowledged again only.
    Duplicate(RecordId),
    /// Refused (AR/CR): the sender must fix the message.
    Rejected,
    /// Not stored for a reason on our side or the mapping's verdict (AE/CE).
    Failed,
    /// A batch: how many of its messages were stored (new or duplicate) and refused.
    Batch { accepted: usize, refused: usize },
}

/// The answer to one frame.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The ACK (unframed, in the sender's charset).
    pub ack: Vec<u8>,
    /// False when the sender asked not to get this ACK (MSH-15 `NE`, `ER` on success, `SU` on
    /// failure); the transport then sends nothing.
    pub send: bool,
    pub outcome: Outcome,
}

/// Who sent a frame.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    /// Peer address (or serial port).
    pub peer: &'a str,
    /// The verified client-certificate identity (mTLS), if any.
    pub identity: Option<&'a str>,
}

/// The mapping verdict for `ack_after = "mapping"` (implemented by the pipeline's
/// `Processor`). Runs on the blocking pool; the error text must not contain patient data.
pub trait MessageCheck: Send + Sync {
    fn check(&self, raw: &[u8], feed: &FeedConfig) -> Result<(), String>;
}

impl MessageCheck for crate::pipeline::Processor {
    fn check(&self, raw: &[u8], feed: &FeedConfig) -> Result<(), String> {
        self.bundle(raw, feed, jiff::Timestamp::now())
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Last ACK control id handed out, as `(unix ms << 16) | sequence`: strictly increasing across
/// every feed of the process, and (with a clock that does not go back) across restarts. A
/// process-wide counter because uniqueness is a property of the appliance, not of a feed.
static LAST_ACK_ID: AtomicU64 = AtomicU64::new(0);

/// A new ACK control id (MSH-10 of the ACK; also FHS-11/BHS-11 of batch answers): `E` and at
/// most 16 hex digits, within the 20-character limit of v2.3.
pub fn new_control_id() -> String {
    let floor = now_ms() << 16;
    let prev = LAST_ACK_ID
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(last.saturating_add(1).max(floor))
        })
        .unwrap_or(floor);
    format!("E{:x}", prev.saturating_add(1).max(floor))
}

/// One message's verdict before encoding.
struct Processed {
    text: String,
    encoding: &'static Encoding,
    send: bool,
    outcome: Outcome,
}

/// Shared by every connection of one feed.
pub struct Intake {
    feed: Arc<FeedConfig>,
    writer: WriterHandle,
    /// Hands stored record ids to the mapping workers (the store is the source of truth; this
    /// only saves them a scan).
    mapped_tx: tokio::sync::mpsc::UnboundedSender<RecordId>,
    disk: Option<Arc<DiskGuard>>,
    check: Option<Arc<dyn MessageCheck>>,
}

impl Intake {
    pub fn new(
        feed: Arc<FeedConfig>,
        writer: WriterHandle,
        mapped_tx: tokio::sync::mpsc::UnboundedSender<RecordId>,
    ) -> Intake {
        Intake {
            feed,
            writer,
            mapped_tx,
            disk: None,
            check: None,
        }
    }

    /// Refuse messages (`AE`/`CE`, storage full) while the state directory's filesystem has
    /// less free space than the guard's minimum.
    pub fn with_disk_guard(mut self, guard: Arc<DiskGuard>) -> Intake {
        self.disk = Some(guard);
        self
    }

    /// The mapping verdict used when the feed says `ack_after = "mapping"`.
    pub fn with_check(mut self, check: Arc<dyn MessageCheck>) -> Intake {
        self.check = Some(check);
        self
    }

    pub fn feed(&self) -> &FeedConfig {
        &self.feed
    }

    /// Handles one frame and returns the ACK bytes (unframed, in the sender's charset) as if
    /// the sender wanted every acknowledgement; transports that honour MSH-15 use
    /// [`Self::receive`].
    pub async fn handle(&self, raw: Vec<u8>, peer: &str) -> (Vec<u8>, Outcome) {
        let r = self
            .receive(
                raw,
                Sender {
                    peer,
                    identity: None,
                },
            )
            .await;
        (r.ack, r.outcome)
    }

    /// Handles one frame (a message or a batch) and returns the answer.
    pub async fn receive(&self, raw: Vec<u8>, sender: Sender<'_>) -> Reply {
        if batch::is_batch(&raw) {
            return self.receive_batch(&raw, sender).await;
        }
        let p = self.process(raw, sender).await;
        Reply {
            ack: hl7::encode_from_utf8(&p.text, p.encoding),
            send: p.send,
            outcome: p.outcome,
        }
    }

    fn fallback(&self) -> &'static Encoding {
        self.feed.fallback_encoding().unwrap_or(encoding_rs::UTF_8)
    }

    /// Text and header for a message we refuse before (or without) parsing it.
    fn sniff(&self, raw: &[u8]) -> (Header, Separators, &'static Encoding) {
        match hl7::decode_to_utf8(raw, self.feed.fallback_encoding()) {
            Ok((text, enc)) => {
                let (h, s) = hl7::sniff_header(&text);
                (h, s, enc)
            }
            Err(_) => {
                let (h, s) = hl7::sniff_header(&String::from_utf8_lossy(raw));
                (h, s, self.fallback())
            }
        }
    }

    fn verdict(
        &self,
        h: &Header,
        seps: &Separators,
        kind: Verdict,
        errors: &[AckError],
        encoding: &'static Encoding,
        outcome: Outcome,
    ) -> Processed {
        let code = kind.code(enhanced(h));
        Processed {
            text: hl7::build_ack(h, seps, code, errors, &new_control_id(), &now_text()),
            encoding,
            send: wants_ack(h, code),
            outcome,
        }
    }

    async fn process(&self, raw: Vec<u8>, sender: Sender<'_>) -> Processed {
        let feed = &self.feed.name;
        let peer = sender.peer;
        let (text, encoding) = match hl7::decode_to_utf8(&raw, self.feed.fallback_encoding()) {
            Ok(t) => t,
            Err(e) => {
                let (h, seps, enc) = self.sniff(&raw);
                warn!(feed, peer, control_id = %h.control_id, error = %e, "refused: character set");
                return self.verdict(
                    &h,
                    &seps,
                    Verdict::Reject,
                    &[e.to_ack_error()],
                    enc,
                    Outcome::Rejected,
                );
            }
        };
        let msg = match hl7::parse(&text) {
            Ok(m) => m,
            Err(e) => {
                let (h, seps) = hl7::sniff_header(&text);
                warn!(feed, peer, control_id = %h.control_id, error = %e, "refused: unparseable message");
                return self.verdict(
                    &h,
                    &seps,
                    Verdict::Reject,
                    &[e.to_ack_error()],
                    encoding,
                    Outcome::Rejected,
                );
            }
        };
        let h = msg.header().clone();
        let seps = *msg.separators();
        drop(msg);
        if !SUPPORTED_VERSIONS.contains(&h.version.as_str()) {
            warn!(feed, peer, control_id = %h.control_id, version = %h.version, "refused: unsupported HL7 version");
            let err = AckError::error(
                ErrorCode::UnsupportedVersionId,
                Some("MSH^1^12"),
                format!(
                    "HL7 version {:?} is not supported (2.1 to 2.8.2 are)",
                    h.version
                ),
            );
            return self.verdict(
                &h,
                &seps,
                Verdict::Reject,
                &[err],
                encoding,
                Outcome::Rejected,
            );
        }
        if h.message_type.code == "ACK" {
            // An ACK sent to us is not a message to forward; acknowledge it so the sender moves on.
            debug!(feed, peer, control_id = %h.control_id, "ignored an ACK sent as a message");
            return self.verdict(&h, &seps, Verdict::Accept, &[], encoding, Outcome::Rejected);
        }
        let message_type = format!("{}_{}", h.message_type.code, h.message_type.trigger);

        if self.feed.ack_after == AckAfter::Mapping
            && let Some(check) = &self.check
        {
            let check = check.clone();
            let feed_cfg = self.feed.clone();
            let bytes = raw.clone();
            let verdict = tokio::task::spawn_blocking(move || check.check(&bytes, &feed_cfg)).await;
            let reason = match verdict {
                Ok(Ok(())) => None,
                Ok(Err(reason)) => Some(reason),
                Err(_) => Some("internal error while mapping (see the appliance log)".into()),
            };
            if let Some(reason) = reason {
                warn!(feed, peer, control_id = %h.control_id, message_type, reason = %reason, "refused: cannot be mapped (ack_after = mapping)");
                let err = AckError::error(
                    ErrorCode::ApplicationInternalError,
                    None,
                    format!("message cannot be mapped: {reason}"),
                );
                return self.verdict(&h, &seps, Verdict::Error, &[err], encoding, Outcome::Failed);
            }
        }

        if let Some(disk) = &self.disk
            && let Err(free) = disk.has_room(raw.len() as u64)
        {
            warn!(feed, peer, control_id = %h.control_id, free_bytes = free, "not stored: disk nearly full; negative ACK");
            let err = AckError::error(
                ErrorCode::ApplicationInternalError,
                None,
                "storage full on the receiving appliance (disk nearly full), retry later",
            );
            return self.verdict(&h, &seps, Verdict::Error, &[err], encoding, Outcome::Failed);
        }

        let record = NewRecord {
            feed: feed.clone(),
            control_id: h.control_id.clone(),
            message_type: message_type.clone(),
            raw,
            received_at_ms: now_ms(),
        };
        let stored = match self.feed.duplicates.mode {
            DuplicatesMode::Off => self.writer.insert(record).await.map(DedupOutcome::Stored),
            DuplicatesMode::Drop => {
                let key = DedupKey::new(
                    feed,
                    &h.sending_application,
                    &h.sending_facility,
                    &h.control_id,
                    &record.raw,
                );
                let window_ms = u64::from(self.feed.duplicates.window_hours) * 3_600_000;
                self.writer
                    .insert_dedup(DedupInsert {
                        record,
                        key,
                        window_ms,
                        on_conflict: self.feed.duplicates.on_conflict,
                    })
                    .await
            }
        };
        let sender_id = sender.identity.unwrap_or("-");
        match stored {
            Ok(DedupOutcome::Stored(id)) => {
                info!(feed, peer, sender = sender_id, control_id = %h.control_id, message_type, record = id.0, "stored");
                // A closed receiver means the daemon is stopping; the record is recovered on start.
                let _ = self.mapped_tx.send(id);
                self.verdict(
                    &h,
                    &seps,
                    Verdict::Accept,
                    &[],
                    encoding,
                    Outcome::Stored(id),
                )
            }
            Ok(DedupOutcome::StoredConflict { id, previous }) => {
                warn!(feed, peer, sender = sender_id, control_id = %h.control_id, message_type, record = id.0, previous = previous.0,
                    "stored, but this control id was already used for a different message (flagged)");
                let _ = self.mapped_tx.send(id);
                self.verdict(
                    &h,
                    &seps,
                    Verdict::Accept,
                    &[],
                    encoding,
                    Outcome::Stored(id),
                )
            }
            Ok(DedupOutcome::Duplicate {
                original,
                first_seen_ms,
            }) => {
                info!(feed, peer, sender = sender_id, control_id = %h.control_id, message_type, record = original.0, first_seen_ms,
                    "duplicate of a stored message: acknowledged again, not stored twice");
                self.verdict(
                    &h,
                    &seps,
                    Verdict::Accept,
                    &[],
                    encoding,
                    Outcome::Duplicate(original),
                )
            }
            Ok(DedupOutcome::ConflictRefused { previous }) => {
                warn!(feed, peer, sender = sender_id, control_id = %h.control_id, message_type, previous = previous.0,
                    "refused: control id already used for a different message");
                let err = AckError::error(
                    ErrorCode::DuplicateKeyIdentifier,
                    Some("MSH^1^10"),
                    "this message control id was already used for a different message; send it with a new MSH-10",
                );
                self.verdict(
                    &h,
                    &seps,
                    Verdict::Reject,
                    &[err],
                    encoding,
                    Outcome::Rejected,
                )
            }
            Err(e) => {
                let full = matches!(e, StoreError::Full { .. });
                warn!(feed, peer, control_id = %h.control_id, error = %e, "not stored: negative ACK");
                let err = AckError::error(
                    ErrorCode::ApplicationInternalError,
                    None,
                    if full {
                        "storage full on the receiving appliance, retry later"
                    } else {
                        "the receiving appliance could not store the message, retry later"
                    },
                );
                self.verdict(&h, &seps, Verdict::Error, &[err], encoding, Outcome::Failed)
            }
        }
    }

    /// A refusal of a message we did not even try to store (envelope error, sender not
    /// allowed): `AR`/`CR` with `err`, MSA-2 sniffed from the raw bytes.
    fn refuse(&self, raw: &[u8], err: AckError) -> Processed {
        let (h, seps, enc) = self.sniff(raw);
        self.verdict(&h, &seps, Verdict::Reject, &[err], enc, Outcome::Rejected)
    }

    /// The answer to a frame from a sender outside the feed's allow-list (or an mTLS identity
    /// not in `allowed_clients`): `AR` "sender not allowed"; nothing is stored.
    pub fn not_allowed(&self, raw: &[u8], who: &str) -> Reply {
        let err = AckError::error(
            ErrorCode::ApplicationInternalError,
            None,
            format!("sender {who} is not allowed to send to this feed"),
        );
        let p = self.refuse(raw, err);
        Reply {
            ack: hl7::encode_from_utf8(&p.text, p.encoding),
            send: true,
            outcome: Outcome::Rejected,
        }
    }

    async fn receive_batch(&self, raw: &[u8], sender: Sender<'_>) -> Reply {
        let feed = &self.feed.name;
        let frame = batch::split_batch(raw);
        for w in &frame.warnings {
            warn!(feed, peer = sender.peer, note = %w, "batch envelope");
        }
        if let Some(e) = &frame.error {
            warn!(feed, peer = sender.peer, error = %e, messages = frame.messages().count(), "refused: batch envelope; no message of it is stored");
        }
        let mut answers = Vec::with_capacity(frame.groups.len());
        let mut encoding = None;
        let (mut accepted, mut refused) = (0, 0);
        for g in &frame.groups {
            let results = self.process_group(&frame, &g.messages, sender).await;
            let mut ok = 0;
            let mut acks = Vec::new();
            for p in results {
                encoding.get_or_insert(p.encoding);
                if matches!(p.outcome, Outcome::Stored(_) | Outcome::Duplicate(_)) {
                    ok += 1;
                }
                if p.send {
                    acks.push(p.text);
                }
            }
            let bad = g.messages.len() - ok;
            accepted += ok;
            refused += bad;
            let comment = match &frame.error {
                Some(e) => e.to_string(),
                None => format!("{ok} accepted, {bad} not accepted"),
            };
            answers.push(GroupAnswer { acks, comment });
        }
        let file_comment = match &frame.error {
            Some(e) => e.to_string(),
            None => format!("{accepted} accepted, {refused} not accepted"),
        };
        info!(
            feed,
            peer = sender.peer,
            batches = frame.groups.len(),
            accepted,
            refused,
            "batch processed"
        );
        let text = batch::build_batch_ack(
            &frame,
            &answers,
            &file_comment,
            &now_text(),
            &mut new_control_id,
        );
        Reply {
            ack: hl7::encode_from_utf8(&text, encoding.unwrap_or_else(|| self.fallback())),
            send: true,
            outcome: Outcome::Batch { accepted, refused },
        }
    }

    async fn process_group(
        &self,
        frame: &BatchFrame,
        messages: &[Vec<u8>],
        sender: Sender<'_>,
    ) -> Vec<Processed> {
        if let Some(e) = &frame.error {
            return messages
                .iter()
                .map(|m| {
                    self.refuse(
                        m,
                        AckError::error(ErrorCode::SegmentSequenceError, None, e.to_string()),
                    )
                })
                .collect();
        }
        if self.feed.ack_after == AckAfter::Mapping {
            // The mapping checks finish in any order; one at a time keeps the feed's order.
            let mut out = Vec::with_capacity(messages.len());
            for m in messages {
                out.push(self.process(m.clone(), sender).await);
            }
            return out;
        }
        // Polled in order, the inserts reach the writer's FIFO queue in order, and the whole
        // batch usually shares one group commit.
        join_in_order(
            messages
                .iter()
                .map(|m| self.process(m.clone(), sender))
                .collect(),
        )
        .await
    }

    /// The ACK for an oversize frame (its content was dropped unread).
    pub fn oversize(&self, len: usize) -> Vec<u8> {
        let h = Header::default();
        let seps = Separators::default();
        let err = AckError::error(
            ErrorCode::ApplicationInternalError,
            None,
            format!(
                "message of {len} bytes exceeds this feed's limit of {} bytes",
                self.max_frame()
            ),
        );
        let text = hl7::build_ack(
            &h,
            &seps,
            AckCode::AR,
            &[err],
            &new_control_id(),
            &now_text(),
        );
        hl7::encode_from_utf8(&text, self.fallback())
    }

    /// The ACK for a message that arrived damaged on a serial line (bad checksum, parity
    /// error): `AE`/`CE`, "resend", echoing the control id when it can still be read. Nothing
    /// is stored.
    pub fn damaged(&self, raw: &[u8], reason: &str) -> Vec<u8> {
        let (h, seps, enc) = self.sniff(raw);
        warn!(feed = %self.feed.name, control_id = %h.control_id, reason, "damaged on the line: not stored (negative answer where the mode has one)");
        let err = AckError::error(
            ErrorCode::ApplicationInternalError,
            None,
            format!("transmission error ({reason}), please resend"),
        );
        let p = self.verdict(&h, &seps, Verdict::Error, &[err], enc, Outcome::Failed);
        hl7::encode_from_utf8(&p.text, p.encoding)
    }

    fn max_frame(&self) -> usize {
        match &self.feed.transport {
            Transport::Mllp(m) => m.max_frame_bytes,
            Transport::Serial(s) => s.max_frame_bytes,
        }
    }
}

/// Polls every future in index order until all are done (a tiny ordered `join_all`).
async fn join_in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

fn now_text() -> String {
    jiff::Zoned::now().strftime("%Y%m%d%H%M%S%z").to_string()
}

/// The verdict, before the mode picks the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accept,
    Error,
    Reject,
}

impl Verdict {
    fn code(self, enhanced: bool) -> AckCode {
        match (self, enhanced) {
            (Verdict::Accept, false) => AckCode::AA,
            (Verdict::Error, false) => AckCode::AE,
            (Verdict::Reject, false) => AckCode::AR,
            (Verdict::Accept, true) => AckCode::CA,
            (Verdict::Error, true) => AckCode::CE,
            (Verdict::Reject, true) => AckCode::CR,
        }
    }
}

/// Enhanced mode: MSH-15 or MSH-16 valued.
fn enhanced(h: &Header) -> bool {
    h.accept_ack_type.is_some() || h.application_ack_type.is_some()
}

/// Whether MSH-15 asks for this accept acknowledgement (table 0155: AL, NE, ER, SU).
fn wants_ack(h: &Header, code: AckCode) -> bool {
    if !enhanced(h) {
        return true;
    }
    match h
        .accept_ack_type
        .as_deref()
        .map(|s| s.trim().to_ascii_uppercase())
        .as_deref()
    {
        Some("NE") => false,
        Some("ER") => !code.is_accept(),
        Some("SU") => code.is_accept(),
        // AL, empty (only MSH-16 valued) or an unknown value: answer, the safe choice for a
        // sender waiting on a socket.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_ids_are_unique_and_short() {
        let ids: Vec<String> = (0..10_000).map(|_| new_control_id()).collect();
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
        assert!(ids.iter().all(|i| i.len() <= 20), "{}", ids[0]);
    }

    #[test]
    fn msh15_decides_whether_to_answer() {
        let h = |accept: Option<&str>, app: Option<&str>| Header {
            accept_ack_type: accept.map(str::to_owned),
            application_ack_type: app.map(str::to_owned),
            ..Header::default()
        };
        assert!(wants_ack(&h(None, None), AckCode::AA));
        assert!(wants_ack(&h(Some("AL"), None), AckCode::CA));
        assert!(!wants_ack(&h(Some("NE"), Some("NE")), AckCode::CR));
        assert!(!wants_ack(&h(Some("ER"), None), AckCode::CA));
        assert!(wants_ack(&h(Some("ER"), None), AckCode::CE));
        assert!(wants_ack(&h(Some("SU"), None), AckCode::CA));
        assert!(!wants_ack(&h(Some("SU"), None), AckCode::CR));
        assert!(wants_ack(&h(None, Some("AL")), AckCode::CA));
        assert!(enhanced(&h(None, Some("AL"))));
        assert_eq!(Verdict::Error.code(true), AckCode::CE);
    }
}
