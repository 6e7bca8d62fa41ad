//! The byte layout of the outbox's per-record rows (`records_meta`, `audit_delivered`).
//!
//! Why not JSON (the first layout): every record's meta is read and written again at each state
//! change (insert, ready, publish, delivered), and an audit row is written per delivery. With
//! `serde_json` that was about 3% of the daemon's CPU in the end-to-end benchmark, for rows
//! nobody reads as text (`hl7-edge outbox show` prints them through serde, not from the store).
//!
//! Layout: a tag byte, then the fields in a fixed order. Strings are a little-endian `u32`
//! length and UTF-8 bytes; integers are little-endian `u64`; an optional string is a `0`/`1`
//! byte and, if `1`, the string; a state is a byte (`0` received, `1` ready, `2` delivered,
//! `3` quarantined, `4` dead-lettered) followed, for the last two, by the reason.
//!
//! Rows written by earlier versions are JSON objects, whose first byte is `{`, never one of the
//! tags: they are still read, so an upgraded appliance keeps its outbox as it is. (An older
//! binary cannot read the new rows; it reports them as corrupt rather than misreading them.)
//! Decoding never panics: a short, truncated or unknown row is an error naming what is wrong.

use serde::de::DeserializeOwned;

use super::store::{AuditEntry, RecordId, RecordMeta, RecordState};

/// First byte of a binary meta row.
const META_V1: u8 = 0x01;
/// First byte of a binary audit row.
const AUDIT_V1: u8 = 0x02;

/// The row of `meta` (its `id` and `delivered_at_ms` are not stored: the key and the audit
/// table hold them).
pub(super) fn encode_meta(m: &RecordMeta) -> Vec<u8> {
    let strings = m.feed.len()
        + m.control_id.len()
        + m.message_type.len()
        + m.raw_sha256.len()
        + m.bundle_sha256.as_ref().map_or(0, String::len)
        + m.message_id.as_ref().map_or(0, String::len)
        + m.key_id.as_ref().map_or(0, String::len)
        + reason(&m.state).map_or(0, str::len);
    let mut out = Vec::with_capacity(1 + 3 * 8 + 9 * 5 + strings);
    out.push(META_V1);
    put_str(&mut out, &m.feed);
    put_str(&mut out, &m.control_id);
    put_str(&mut out, &m.message_type);
    put_u64(&mut out, m.received_at_ms);
    put_state(&mut out, &m.state);
    put_str(&mut out, &m.raw_sha256);
    put_u64(&mut out, m.raw_len);
    put_opt(&mut out, m.bundle_sha256.as_deref());
    put_u64(&mut out, m.bundle_len);
    put_opt(&mut out, m.message_id.as_deref());
    put_opt(&mut out, m.key_id.as_deref());
    out
}

/// The meta of record `id` from its row (binary, or JSON from an earlier version).
pub(super) fn decode_meta(id: u64, bytes: &[u8]) -> Result<RecordMeta, String> {
    let mut meta = decode(bytes, META_V1, |r| {
        Ok(RecordMeta {
            id: RecordId(id),
            feed: r.string("feed")?,
            control_id: r.string("control id")?,
            message_type: r.string("message type")?,
            received_at_ms: r.u64("received at")?,
            state: r.state()?,
            raw_sha256: r.string("raw hash")?,
            raw_len: r.u64("raw length")?,
            bundle_sha256: r.opt("bundle hash")?,
            bundle_len: r.u64("bundle length")?,
            message_id: r.opt("message id")?,
            key_id: r.opt("key id")?,
            delivered_at_ms: None,
        })
    })?;
    meta.id = RecordId(id);
    Ok(meta)
}

/// The row of `e` (its `id` is the key).
pub(super) fn encode_audit(e: &AuditEntry) -> Vec<u8> {
    let strings = e.feed.len()
        + e.control_id.len()
        + e.message_type.len()
        + e.raw_sha256.len()
        + e.bundle_sha256.as_ref().map_or(0, String::len)
        + e.message_id.as_ref().map_or(0, String::len);
    let mut out = Vec::with_capacity(1 + 2 * 8 + 8 * 4 + strings);
    out.push(AUDIT_V1);
    put_str(&mut out, &e.feed);
    put_str(&mut out, &e.control_id);
    put_str(&mut out, &e.message_type);
    put_u64(&mut out, e.received_at_ms);
    put_u64(&mut out, e.delivered_at_ms);
    put_str(&mut out, &e.raw_sha256);
    put_opt(&mut out, e.bundle_sha256.as_deref());
    put_opt(&mut out, e.message_id.as_deref());
    out
}

/// The audit entry of record `id` from its row (binary, or JSON from an earlier version).
pub(super) fn decode_audit(id: u64, bytes: &[u8]) -> Result<AuditEntry, String> {
    let mut entry = decode(bytes, AUDIT_V1, |r| {
        Ok(AuditEntry {
            id: RecordId(id),
            feed: r.string("feed")?,
            control_id: r.string("control id")?,
            message_type: r.string("message type")?,
            received_at_ms: r.u64("received at")?,
            delivered_at_ms: r.u64("delivered at")?,
            raw_sha256: r.string("raw hash")?,
            bundle_sha256: r.opt("bundle hash")?,
            message_id: r.opt("message id")?,
        })
    })?;
    entry.id = RecordId(id);
    Ok(entry)
}

/// A row: binary after the `tag` byte (read whole by `read`), or an earlier version's JSON.
fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    tag: u8,
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, String>,
) -> Result<T, String> {
    match bytes.split_first() {
        Some((&first, rest)) if first == tag => {
            let mut r = Reader::new(rest);
            let value = read(&mut r)?;
            r.end()?;
            Ok(value)
        }
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        other => Err(unknown(other.map(|(first, _)| first))),
    }
}

fn unknown(first: Option<&u8>) -> String {
    match first {
        None => "empty row".into(),
        Some(b) => {
            format!("unknown row format (first byte 0x{b:02x}; written by a newer hl7-edge?)")
        }
    }
}

fn reason(s: &RecordState) -> Option<&str> {
    match s {
        RecordState::Quarantined { reason } | RecordState::DeadLettered { reason } => Some(reason),
        _ => None,
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // A row field longer than 4 GiB cannot occur (frames are limited far below); saturating
    // keeps the encoder total, and the decoder would then refuse the row as truncated.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn put_state(out: &mut Vec<u8>, s: &RecordState) {
    match s {
        RecordState::Received => out.push(0),
        RecordState::Ready => out.push(1),
        RecordState::Delivered => out.push(2),
        RecordState::Quarantined { reason } => {
            out.push(3);
            put_str(out, reason);
        }
        RecordState::DeadLettered { reason } => {
            out.push(4);
            put_str(out, reason);
        }
    }
}

/// Reads a row front to back; every read checks the length left.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Reader { rest }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        match (self.rest.get(..n), self.rest.get(n..)) {
            (Some(head), Some(tail)) => {
                self.rest = tail;
                Ok(head)
            }
            _ => Err(format!("row truncated in {what}")),
        }
    }

    fn byte(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4, what)?);
        let len = u32::from_le_bytes(b) as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn opt(&mut self, what: &str) -> Result<Option<String>, String> {
        match self.byte(what)? {
            0 => Ok(None),
            1 => self.string(what).map(Some),
            b => Err(format!("{what}: bad presence byte {b}")),
        }
    }

    fn state(&mut self) -> Result<RecordState, String> {
        Ok(match self.byte("state")? {
            0 => RecordState::Received,
            1 => RecordState::Ready,
            2 => RecordState::Delivered,
            3 => RecordState::Quarantined {
                reason: self.string("quarantine reason")?,
            },
            4 => RecordState::DeadLettered {
                reason: self.string("dead-letter reason")?,
            },
            b => return Err(format!("unknown state {b}")),
        })
    }

    fn end(&self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes after the last field", self.rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(state: RecordState) -> RecordMeta {
        RecordMeta {
            id: RecordId(7),
            feed: "pas-adt".into(),
            control_id: "MSG0001".into(),
            message_type: "ADT^A01".into(),
            received_at_ms: 1_784_000_000_123,
            state,
            raw_sha256: "ab".repeat(32),
            raw_len: 1_600,
            bundle_sha256: Some("cd".repeat(32)),
            bundle_len: 23_000,
            message_id: Some("urn:uuid:0b9a".into()),
            key_id: None,
            delivered_at_ms: None,
        }
    }

    #[test]
    fn meta_rows_round_trip_in_every_state() {
        for state in [
            RecordState::Received,
            RecordState::Ready,
            RecordState::Delivered,
            RecordState::Quarantined {
                reason: "PID-3: no identifier".into(),
            },
            RecordState::DeadLettered {
                reason: "broker: not authorised".into(),
            },
        ] {
            let m = meta(state);
            assert_eq!(decode_meta(7, &encode_meta(&m)), Ok(m));
        }
    }

    #[test]
    fn json_rows_of_earlier_versions_are_still_read() {
        let m = meta(RecordState::Quarantined {
            reason: "bad".into(),
        });
        let json = serde_json::to_vec(&m).expect("json");
        assert_eq!(decode_meta(7, &json), Ok(m));

        let a = AuditEntry {
            id: RecordId(9),
            feed: "lab".into(),
            control_id: "C1".into(),
            message_type: "ORU^R01".into(),
            received_at_ms: 1,
            delivered_at_ms: 2,
            raw_sha256: "ef".repeat(32),
            bundle_sha256: None,
            message_id: Some("m".into()),
        };
        let json = serde_json::to_vec(&a).expect("json");
        assert_eq!(decode_audit(9, &json), Ok(a.clone()));
        assert_eq!(decode_audit(9, &encode_audit(&a)), Ok(a));
    }

    #[test]
    fn damaged_rows_are_errors_not_panics() {
        let row = encode_meta(&meta(RecordState::Ready));
        // Every truncation, and every row with one byte changed at the front, decodes to a
        // value or an error; none panics.
        for n in 0..row.len() {
            assert!(decode_meta(1, &row[..n]).is_err(), "truncated at {n}");
        }
        for b in 0..=255u8 {
            let mut r = row.clone();
            r[1] = b;
            let _ = decode_meta(1, &r);
        }
        let mut long = row.clone();
        long.push(0);
        assert!(
            decode_meta(1, &long)
                .unwrap_err()
                .contains("after the last field")
        );
        assert!(
            decode_meta(1, &[0x7f])
                .unwrap_err()
                .contains("unknown row format")
        );
        assert!(
            decode_meta(
                1,
                &encode_audit(&AuditEntry {
                    id: RecordId(1),
                    feed: String::new(),
                    control_id: String::new(),
                    message_type: String::new(),
                    received_at_ms: 0,
                    delivered_at_ms: 0,
                    raw_sha256: String::new(),
                    bundle_sha256: None,
                    message_id: None,
                })
            )
            .is_err()
        );
    }
}
