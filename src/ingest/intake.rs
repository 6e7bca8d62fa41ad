//! From one framed message to one ACK: charset, parse, checks, durable store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tracing::{debug, info, warn};

use super::adapter::FeedConfig;
use crate::hl7::{self, AckCode, AckError, ErrorCode, Header, Separators};
use crate::outbox::{NewRecord, RecordId, StoreError, WriterHandle, now_ms};

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
    /// Refused (AR/CR): the sender must fix the message.
    Rejected,
    /// Not stored for a reason on our side (AE/CE): the sender should retry.
    Failed,
}

/// Shared by every connection of one feed.
pub struct Intake {
    feed: Arc<FeedConfig>,
    writer: WriterHandle,
    /// Hands stored record ids to the mapping workers (the store is the source of truth; this
    /// only saves them a scan).
    mapped_tx: tokio::sync::mpsc::UnboundedSender<RecordId>,
    ack_seq: AtomicU32,
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
            ack_seq: AtomicU32::new(0),
        }
    }

    pub fn feed(&self) -> &FeedConfig {
        &self.feed
    }

    /// Handles one message and returns the ACK bytes (unframed, in the sender's charset).
    pub async fn handle(&self, raw: Vec<u8>, peer: &str) -> (Vec<u8>, Outcome) {
        let feed = &self.feed.name;
        let (text, encoding) = match hl7::decode_to_utf8(&raw, self.feed.fallback_encoding()) {
            Ok(t) => t,
            Err(e) => {
                // Still answer with a best-effort ACK so the sender sees MSA-2 and the reason.
                let lossy = String::from_utf8_lossy(&raw);
                let (h, seps) = hl7::sniff_header(&lossy);
                warn!(feed, peer, control_id = %h.control_id, error = %e, "refused: character set");
                let err = AckError {
                    code: ErrorCode::DataTypeError,
                    location: Some("MSH^1^18".into()),
                    message: e.to_string(),
                    severity: 'E',
                };
                return (
                    self.ack(&h, &seps, reject_code(&h), &[err], encoding_rs::UTF_8),
                    Outcome::Rejected,
                );
            }
        };
        let msg = match hl7::parse(&text) {
            Ok(m) => m,
            Err(e) => {
                let (h, seps) = hl7::sniff_header(&text);
                warn!(feed, peer, control_id = %h.control_id, error = %e, "refused: unparseable message");
                let err = AckError {
                    code: e.error_code(),
                    location: e.location(),
                    message: e.to_string(),
                    severity: 'E',
                };
                return (
                    self.ack(&h, &seps, reject_code(&h), &[err], encoding),
                    Outcome::Rejected,
                );
            }
        };
        let h = msg.header().clone();
        let seps = *msg.separators();
        if !SUPPORTED_VERSIONS.contains(&h.version.as_str()) {
            warn!(feed, peer, control_id = %h.control_id, version = %h.version, "refused: unsupported HL7 version");
            let err = AckError {
                code: ErrorCode::UnsupportedVersionId,
                location: Some("MSH^1^12".into()),
                message: format!(
                    "HL7 version {:?} is not supported (2.1 to 2.8.2 are)",
                    h.version
                ),
                severity: 'E',
            };
            return (
                self.ack(&h, &seps, reject_code(&h), &[err], encoding),
                Outcome::Rejected,
            );
        }
        if h.message_type.code == "ACK" {
            // An ACK sent to us is not a message to forward; acknowledge it so the sender moves on.
            debug!(feed, peer, control_id = %h.control_id, "ignored an ACK sent as a message");
            return (
                self.ack(&h, &seps, accept_code(&h), &[], encoding),
                Outcome::Rejected,
            );
        }
        let record = NewRecord {
            feed: feed.clone(),
            control_id: h.control_id.clone(),
            message_type: format!("{}_{}", h.message_type.code, h.message_type.trigger),
            raw,
            received_at_ms: now_ms(),
        };
        match self.writer.insert(record).await {
            Ok(id) => {
                info!(feed, peer, control_id = %h.control_id, message_type = %format!("{}^{}", h.message_type.code, h.message_type.trigger), record = id.0, "stored");
                // A closed receiver means the daemon is stopping; the record is recovered on start.
                let _ = self.mapped_tx.send(id);
                (
                    self.ack(&h, &seps, accept_code(&h), &[], encoding),
                    Outcome::Stored(id),
                )
            }
            Err(e) => {
                let full = matches!(e, StoreError::Full { .. });
                warn!(feed, peer, control_id = %h.control_id, error = %e, "not stored: negative ACK");
                let err = AckError {
                    code: ErrorCode::ApplicationInternalError,
                    location: None,
                    message: if full {
                        "storage full on the receiving appliance, retry later".into()
                    } else {
                        "the receiving appliance could not store the message, retry later".into()
                    },
                    severity: 'E',
                };
                (
                    self.ack(&h, &seps, error_code(&h), &[err], encoding),
                    Outcome::Failed,
                )
            }
        }
    }

    /// The ACK for an oversize frame (its content was dropped unread).
    pub fn oversize(&self, len: usize) -> Vec<u8> {
        let h = Header::default();
        let seps = Separators::default();
        let err = AckError {
            code: ErrorCode::ApplicationInternalError,
            location: None,
            message: format!(
                "message of {len} bytes exceeds this feed's limit of {} bytes",
                self.max_frame()
            ),
            severity: 'E',
        };
        self.ack(&h, &seps, AckCode::AR, &[err], encoding_rs::UTF_8)
    }

    /// The ACK for a message that arrived damaged on a serial line (bad checksum, parity
    /// error): `AE`/`CE`, "resend", echoing the control id when it can still be read. Nothing
    /// is stored.
    pub fn damaged(&self, raw: &[u8], reason: &str) -> Vec<u8> {
        let lossy = String::from_utf8_lossy(raw);
        let (h, seps) = hl7::sniff_header(&lossy);
        warn!(feed = %self.feed.name, control_id = %h.control_id, reason, "damaged on the line: not stored (negative answer where the mode has one)");
        let err = AckError {
            code: ErrorCode::ApplicationInternalError,
            location: None,
            message: format!("transmission error ({reason}), please resend"),
            severity: 'E',
        };
        self.ack(&h, &seps, error_code(&h), &[err], encoding_rs::UTF_8)
    }

    fn max_frame(&self) -> usize {
        match &self.feed.transport {
            super::adapter::Transport::Mllp(m) => m.max_frame_bytes,
            super::adapter::Transport::Serial(s) => s.max_frame_bytes,
        }
    }

    fn ack(
        &self,
        h: &Header,
        seps: &Separators,
        code: AckCode,
        errors: &[AckError],
        encoding: &'static encoding_rs::Encoding,
    ) -> Vec<u8> {
        let seq = self.ack_seq.fetch_add(1, Ordering::Relaxed);
        // Unique and at most 20 characters (the v2.3 limit for MSH-10).
        let control_id = format!("E{:x}{:04x}", now_ms(), seq & 0xffff);
        let now = jiff::Zoned::now().strftime("%Y%m%d%H%M%S%z").to_string();
        let text = hl7::build_ack(h, seps, code, errors, &control_id, &now);
        let (bytes, _, _) = encoding.encode(&text);
        bytes.into_owned()
    }
}

/// Enhanced mode (MSH-15 present) answers with commit codes; original mode with AA/AE/AR.
fn enhanced(h: &Header) -> bool {
    h.accept_ack_type.as_deref().is_some_and(|s| !s.is_empty())
}

fn accept_code(h: &Header) -> AckCode {
    if enhanced(h) {
        AckCode::CA
    } else {
        AckCode::AA
    }
}

fn reject_code(h: &Header) -> AckCode {
    if enhanced(h) {
        AckCode::CR
    } else {
        AckCode::AR
    }
}

fn error_code(h: &Header) -> AckCode {
    if enhanced(h) {
        AckCode::CE
    } else {
        AckCode::AE
    }
}
