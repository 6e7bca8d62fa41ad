//! Building the ACK (original or enhanced mode) for an incoming message.
//!
//! Why here and hand-written: the ACK has to be produced even for messages we could not parse
//! (from a sniffed header), must echo the sender's delimiters, and must never be corrupted by
//! the error text it carries. Every value we write, constants such as `ACK` and `HL70357`
//! included (a sender may declare a letter or digit as a delimiter), passes through
//! `encode_escapes`, which also turns CR/LF and MLLP framing bytes into `\Xhh\`.
//!
//! Version-dependent choices (from the incoming MSH-12):
//! * below v2.5 (v2.1-2.4): ERR is `ERR-1` only (ELD: `segment^sequence^field^code&text`),
//!   and because those versions allow a single optional ERR in an ACK, several errors become
//!   repetitions of ERR-1 in that one segment.
//! * v2.5 and later: one ERR per error with ERR-2 (location, ERL), ERR-3 (`code^text^HL70357`),
//!   ERR-4 (severity) and ERR-8 (user message); ERR-1 is left empty.
//! * MSA-3 (text message) carries the first error's message, truncated to 80 characters (the
//!   ST length of early versions); it is omitted from v2.7 on, where MSA-3 is withdrawn.
//! * An empty or non-numeric incoming version (sniffed garbage) is answered as v2.5.1.
//!
//! Mode and charset (MSH-15 to MSH-18 of the ACK):
//! * In enhanced mode (the incoming MSH-15 or MSH-16 is valued) the ACK carries MSH-15 `NE` and
//!   MSH-16 `NE`: an acknowledgement is never itself acknowledged.
//! * When the incoming message declares MSH-18, the ACK declares the same character set (the
//!   caller encodes the ACK's bytes in it, see `encode_from_utf8`).

use super::error::ErrorCode;
use super::escape::encode_escapes;
use super::header::Header;
use super::separators::Separators;

/// MSA-1 acknowledgment codes (HL7 table 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: application accept.
    AA,
    /// Original mode: application error.
    AE,
    /// Original mode: application reject.
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    /// Whether this code accepts the message.
    pub fn is_accept(self) -> bool {
        matches!(self, AckCode::AA | AckCode::CA)
    }
}

impl std::fmt::Display for AckCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One error (or warning) to report in the ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    pub code: ErrorCode,
    /// ERL with `^` between parts, e.g. `PID^1^3` (segment, sequence, field, repetition,
    /// component, subcomponent). Re-encoded with the message's delimiters.
    pub location: Option<String>,
    /// Human readable; must not contain patient data.
    pub message: String,
    /// `E`, `W` or `I` (anything else is sent as `E`).
    pub severity: char,
}

impl AckError {
    /// An error (severity `E`).
    pub fn error(code: ErrorCode, location: Option<&str>, message: impl Into<String>) -> Self {
        AckError {
            code,
            location: location.map(str::to_owned),
            message: message.into(),
            severity: 'E',
        }
    }
}

/// Parses a dotted version (`2.5.1`) into comparable numbers; unparsable parts count as 0.
fn version_at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version
        .trim()
        .split('.')
        .map(|p| p.trim().parse::<u32>().unwrap_or(0));
    let ma = parts.next().unwrap_or(0);
    let mi = parts.next().unwrap_or(0);
    (ma, mi) >= (major, minor)
}

/// Truncates to at most `max` chars (on a char boundary).
fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Builds the ACK for `incoming`; see the module docs for the version rules.
///
/// MSH swaps sending/receiving application and facility; MSH-7 = `now`;
/// MSH-9 = `ACK^<trigger>^ACK`; MSH-10 = `ack_control_id`; MSH-11/12 echo the incoming
/// processing and version ids; MSH-2 echoes the incoming delimiters (unless they are unusable,
/// then `|^~\&`). MSA-2 = incoming MSH-10. Every segment ends with `\r` (HL7 terminates segments, the last
/// one included); no MLLP framing.
pub fn build_ack(
    incoming: &Header,
    seps: &Separators,
    code: AckCode,
    errors: &[AckError],
    ack_control_id: &str,
    now: &str,
) -> String {
    let mut seps = *seps;
    if seps.escape.is_none() {
        seps.escape = Some('\\');
    }
    if !seps.is_usable() {
        seps = Separators::default();
    }
    let f = seps.field;
    let c = seps.component.to_string();
    let e = |s: &str| encode_escapes(s, &seps);
    let version = match incoming.version.trim() {
        v if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.') => v,
        _ => "2.5.1",
    };
    let enhanced_err = version_at_least(version, 2, 5);

    let msh = [
        format!("MSH{f}{}", seps.encoding_characters()),
        e(&incoming.receiving_application),
        e(&incoming.receiving_facility),
        e(&incoming.sending_application),
        e(&incoming.sending_facility),
        e(now),
        String::new(),
        [e("ACK"), e(&incoming.message_type.trigger), e("ACK")].join(&c),
        e(ack_control_id),
        e(&incoming.processing_id),
        e(version),
    ]
    .join(&f.to_string());
    let enhanced = incoming.accept_ack_type.is_some() || incoming.application_ack_type.is_some();
    // MSH-13 .. MSH-18, written only up to the last valued one.
    let mut tail = vec![String::new(); 6];
    if enhanced {
        tail[2] = e("NE");
        tail[3] = e("NE");
    }
    if let Some(cs) = &incoming.charset {
        tail[5] = e(cs);
    }
    while tail.last().is_some_and(String::is_empty) {
        tail.pop();
    }
    let msh = if tail.is_empty() {
        msh
    } else {
        format!("{msh}{f}{}", tail.join(&f.to_string()))
    };

    let msa_text = match errors.first() {
        Some(first) if !code.is_accept() && !version_at_least(version, 2, 7) => {
            e(truncate_chars(&first.message, 80))
        }
        _ => String::new(),
    };
    let mut msa = vec!["MSA".to_owned(), e(code.as_str()), e(&incoming.control_id)];
    if !msa_text.is_empty() {
        msa.push(msa_text);
    }

    let mut segments = vec![msh, msa.join(&f.to_string())];
    if enhanced_err {
        for err in errors {
            segments.push(err_v25(err, &seps));
        }
    } else if !errors.is_empty() {
        let reps: Vec<String> = errors.iter().map(|err| eld_v23(err, &seps)).collect();
        segments.push(format!("ERR{f}{}", reps.join(&seps.repetition.to_string())));
    }
    // HL7 terminates every segment with CR, the last one included.
    let mut out = segments.join("\r");
    out.push('\r');
    out
}

/// Location parts (`PID^1^3` -> `["PID", "1", "3"]`), each escaped.
fn location_parts(err: &AckError, seps: &Separators) -> Vec<String> {
    err.location
        .as_deref()
        .map(|l| {
            l.split('^')
                .map(|p| encode_escapes(p.trim(), seps))
                .collect()
        })
        .unwrap_or_default()
}

/// v2.5+ ERR: ERR-2 location, ERR-3 code^text^HL70357, ERR-4 severity, ERR-8 user message.
fn err_v25(err: &AckError, seps: &Separators) -> String {
    let c = seps.component.to_string();
    let severity = match err.severity {
        'E' | 'W' | 'I' => err.severity,
        _ => 'E',
    };
    let fields = [
        "ERR".to_owned(),
        String::new(),
        location_parts(err, seps).join(&c),
        [
            encode_escapes(&err.code.code().to_string(), seps),
            encode_escapes(err.code.text(), seps),
            encode_escapes("HL70357", seps),
        ]
        .join(&c),
        encode_escapes(&severity.to_string(), seps),
        String::new(),
        String::new(),
        String::new(),
        encode_escapes(&err.message, seps),
    ];
    fields.join(&seps.field.to_string())
}

/// v2.3/2.4 ERR-1 repetition (ELD): `segment^sequence^field^code&text`.
fn eld_v23(err: &AckError, seps: &Separators) -> String {
    let mut parts = location_parts(err, seps);
    parts.truncate(3);
    parts.resize(3, String::new());
    let s = seps.subcomponent.to_string();
    // The ELD's 4th component is a CE; its text is the specific message, as v2.3 has no
    // other per-error text field.
    parts.push(
        [
            encode_escapes(&err.code.code().to_string(), seps),
            encode_escapes(&err.message, seps),
        ]
        .join(&s),
    );
    parts.join(&seps.component.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hl7::{MessageType, parse};

    fn header(version: &str) -> Header {
        Header {
            sending_application: "LAB".into(),
            sending_facility: "HOSP".into(),
            receiving_application: "EDGE".into(),
            receiving_facility: "GW".into(),
            timestamp: "20240101120000".into(),
            message_type: MessageType {
                code: "ORU".into(),
                trigger: "R01".into(),
                structure: Some("ORU_R01".into()),
            },
            control_id: "MSG|00^1".into(),
            processing_id: "P".into(),
            version: version.into(),
            accept_ack_type: None,
            application_ack_type: None,
            charset: None,
        }
    }

    fn nasty_errors() -> Vec<AckError> {
        vec![
            AckError::error(
                ErrorCode::RequiredFieldMissing,
                Some("PID^1^3"),
                "PID-3 missing | see ^spec~ & \\docs\\\r\nMSH|forged",
            ),
            AckError {
                code: ErrorCode::TableValueNotFound,
                location: Some("OBX^2^5^1^2".into()),
                message: "unit not in table".into(),
                severity: 'W',
            },
        ]
    }

    #[test]
    fn ack_v251_with_errors() {
        let ack = build_ack(
            &header("2.5.1"),
            &Separators::default(),
            AckCode::AE,
            &nasty_errors(),
            "ACK1",
            "20261125101500+0000",
        );
        let segs: Vec<&str> = ack.split_terminator('\r').collect();
        assert_eq!(
            segs[0],
            "MSH|^~\\&|EDGE|GW|LAB|HOSP|20261125101500+0000||ACK^R01^ACK|ACK1|P|2.5.1"
        );
        assert_eq!(
            segs[1],
            r"MSA|AE|MSG\F\00\S\1|PID-3 missing \F\ see \S\spec\R\ \T\ \E\docs\E\\X0D\\X0A\MSH\F\forged"
        );
        assert_eq!(
            segs[2],
            r"ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 missing \F\ see \S\spec\R\ \T\ \E\docs\E\\X0D\\X0A\MSH\F\forged"
        );
        assert_eq!(
            segs[3],
            "ERR||OBX^2^5^1^2|103^Table value not found^HL70357|W||||unit not in table"
        );
        assert_eq!(segs.len(), 4);

        // The ACK parses back, with the same structure and the texts intact.
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.segments().len(), 4);
        assert_eq!(parsed.get("MSA-2").as_deref(), Some("MSG|00^1"));
        assert_eq!(
            parsed.get("ERR-8").as_deref(),
            Some("PID-3 missing | see ^spec~ & \\docs\\\r\nMSH|forged")
        );
        assert_eq!(parsed.get("ERR[2]-2.5").as_deref(), Some("2"));
        assert_eq!(parsed.get("ERR-3.1").as_deref(), Some("101"));
        assert_eq!(parsed.header().message_type.code, "ACK");
        assert_eq!(parsed.header().sending_application, "EDGE");
    }

    #[test]
    fn ack_v23_with_errors() {
        let ack = build_ack(
            &header("2.3"),
            &Separators::default(),
            AckCode::AR,
            &nasty_errors(),
            "ACK2",
            "20261125101500+0000",
        );
        let segs: Vec<&str> = ack.split_terminator('\r').collect();
        assert_eq!(segs.len(), 3);
        assert!(segs[0].ends_with("|ACK^R01^ACK|ACK2|P|2.3"));
        assert_eq!(
            segs[2],
            r"ERR|PID^1^3^101&PID-3 missing \F\ see \S\spec\R\ \T\ \E\docs\E\\X0D\\X0A\MSH\F\forged~OBX^2^5^103&unit not in table"
        );
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.get("ERR-1[2].4.1").as_deref(), Some("103"));
        assert_eq!(
            parsed.get("ERR-1.4.2").as_deref(),
            Some("PID-3 missing | see ^spec~ & \\docs\\\r\nMSH|forged")
        );
    }

    #[test]
    fn ack_v23_without_location_and_accept() {
        let err = AckError::error(ErrorCode::ApplicationInternalError, None, "outbox full");
        let ack = build_ack(
            &header("2.4"),
            &Separators::default(),
            AckCode::AE,
            &[err],
            "A",
            "20261125101500+0000",
        );
        assert!(ack.ends_with("\rERR|^^^207&outbox full\r"), "{ack}");
        let ok = build_ack(
            &header("2.5"),
            &Separators::default(),
            AckCode::AA,
            &[],
            "A",
            "20261125101500+0000",
        );
        assert_eq!(
            ok.split_terminator('\r').nth(1),
            Some("MSA|AA|MSG\\F\\00\\S\\1")
        );
        assert_eq!(ok.split_terminator('\r').count(), 2);
    }

    #[test]
    fn ack_v27_drops_msa3_and_keeps_truncation_char() {
        let seps = Separators {
            truncation: Some('#'),
            ..Separators::default()
        };
        let err = AckError::error(ErrorCode::DataTypeError, Some("PV1^1^44"), "bad date #1");
        let ack = build_ack(
            &header("2.7"),
            &seps,
            AckCode::CE,
            &[err],
            "A",
            "20261125101500+0000",
        );
        let segs: Vec<&str> = ack.split_terminator('\r').collect();
        assert!(segs[0].starts_with("MSH|^~\\&#|"));
        assert_eq!(segs[1], "MSA|CE|MSG\\F\\00\\S\\1");
        assert!(segs[2].ends_with("|bad date \\P\\1"));
    }

    #[test]
    fn ack_uses_incoming_separators() {
        let seps = Separators::from_msh('!', "$r?@").unwrap();
        let mut h = header("2.5");
        h.control_id = "X!Y".into();
        let ack = build_ack(&h, &seps, AckCode::AA, &[], "A1", "20261125101500+0000");
        assert_eq!(
            ack,
            "MSH!$r?@!EDGE!GW!LAB!HOSP!20261125101500+0000!!ACK$R01$ACK!A1!P!2.5\rMSA!AA!X?F?Y\r"
        );
    }

    #[test]
    fn ack_from_garbage_header() {
        let (h, seps) = crate::hl7::sniff_header("not hl7 at all");
        let err = AckError::error(ErrorCode::SegmentSequenceError, Some("MSH^1"), "no MSH");
        let ack = build_ack(&h, &seps, AckCode::AR, &[err], "A1", "20261125101500+0000");
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.header().version, "2.5.1");
        assert_eq!(parsed.get("MSA-1").as_deref(), Some("AR"));
        // Unusable separators (duplicates) are replaced by the defaults.
        let bad = Separators {
            component: '|',
            ..Separators::default()
        };
        let ack = build_ack(
            &header("2.5"),
            &bad,
            AckCode::AA,
            &[],
            "A1",
            "20261125101500+0000",
        );
        assert!(ack.starts_with("MSH|^~\\&|"));
    }

    #[test]
    fn ack_enhanced_mode_and_charset_fields() {
        let mut h = header("2.5");
        h.accept_ack_type = Some("AL".into());
        h.charset = Some("8859/1".into());
        let ack = build_ack(&h, &Separators::default(), AckCode::CA, &[], "A1", "2026");
        let msh = ack.split('\r').next().unwrap_or_default();
        assert_eq!(
            msh,
            "MSH|^~\\&|EDGE|GW|LAB|HOSP|2026||ACK^R01^ACK|A1|P|2.5|||NE|NE||8859/1"
        );
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.header().accept_ack_type.as_deref(), Some("NE"));
        let mut h = header("2.5");
        h.application_ack_type = Some("AL".into());
        let ack = build_ack(&h, &Separators::default(), AckCode::CA, &[], "A1", "2026");
        assert!(
            ack.starts_with("MSH|^~\\&|EDGE|GW|LAB|HOSP|2026||ACK^R01^ACK|A1|P|2.5|||NE|NE\r"),
            "{ack}"
        );
    }

    #[test]
    fn versions() {
        assert!(version_at_least("2.5.1", 2, 5));
        assert!(version_at_least("2.10", 2, 7));
        assert!(!version_at_least("2.4", 2, 5));
        assert!(!version_at_least("garbage", 2, 5));
        assert!(version_at_least("3", 2, 7));
    }
}
