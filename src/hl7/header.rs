//! MSH, interpreted: who sent what, which version, which charset.
//!
//! Two ways in: [`Header::from_msh`] for a segment that `parse` accepted (and which is then
//! validated), and [`sniff_header`] for text that `parse` refused, because a negative ACK
//! still has to echo the control id and swap sender and receiver. Sniffing is a separate,
//! deliberately naive splitter so it works on input hl7-parser cannot handle at all.
//!
//! Application/facility fields (HD) keep only their first component (namespace id), decoded.

use encoding_rs::UTF_8;

use super::error::{ParseError, safe_token};
use super::escape::decode_escapes_cow;
use super::message::{Segment, component_of};
use super::separators::Separators;

/// MSH-9.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageType {
    /// MSH-9.1, e.g. `ADT`.
    pub code: String,
    /// MSH-9.2, e.g. `A01`; may be empty only for `ACK`.
    pub trigger: String,
    /// MSH-9.3, e.g. `ADT_A01` (v2.3.1+).
    pub structure: Option<String>,
}

/// The interpreted MSH segment. All values decoded (escapes resolved).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// MSH-3.1
    pub sending_application: String,
    /// MSH-4.1
    pub sending_facility: String,
    /// MSH-5.1
    pub receiving_application: String,
    /// MSH-6.1
    pub receiving_facility: String,
    /// MSH-7.1, as sent (HL7 TS/DTM text).
    pub timestamp: String,
    /// MSH-9
    pub message_type: MessageType,
    /// MSH-10
    pub control_id: String,
    /// MSH-11.1 (`P`, `D`, `T`)
    pub processing_id: String,
    /// MSH-12.1 (`2.5.1`)
    pub version: String,
    /// MSH-15
    pub accept_ack_type: Option<String>,
    /// MSH-16
    pub application_ack_type: Option<String>,
    /// MSH-18, first repetition (the message's main charset).
    pub charset: Option<String>,
}

/// Reads fields of an MSH line given as raw field strings where `fields[n - 1]` is MSH-n.
struct MshView<'a> {
    fields: Vec<&'a str>,
    seps: &'a Separators,
}

impl MshView<'_> {
    /// Decoded component `comp` of the first repetition of MSH-`n`; empty when absent.
    fn comp(&self, n: usize, comp: usize) -> String {
        let Some(raw) = n.checked_sub(1).and_then(|i| self.fields.get(i)) else {
            return String::new();
        };
        let rep = raw.split(self.seps.repetition).next().unwrap_or_default();
        let value = component_of(self.seps, rep, comp, 0).unwrap_or_default();
        // Subcomponents are not expected in these fields; keep the first.
        let value = value
            .split(self.seps.subcomponent)
            .next()
            .unwrap_or_default();
        // One allocation per value: the decoded text is borrowed when it has no escape.
        decode_escapes_cow(value, self.seps, UTF_8)
            .trim()
            .to_owned()
    }

    fn opt(&self, n: usize, comp: usize) -> Option<String> {
        Some(self.comp(n, comp)).filter(|s| !s.is_empty())
    }

    fn header(&self) -> Header {
        Header {
            sending_application: self.comp(3, 1),
            sending_facility: self.comp(4, 1),
            receiving_application: self.comp(5, 1),
            receiving_facility: self.comp(6, 1),
            timestamp: self.comp(7, 1),
            message_type: MessageType {
                code: self.comp(9, 1),
                trigger: self.comp(9, 2),
                structure: self.opt(9, 3),
            },
            control_id: self.comp(10, 1),
            processing_id: self.comp(11, 1),
            version: self.comp(12, 1),
            accept_ack_type: self.opt(15, 1),
            application_ack_type: self.opt(16, 1),
            charset: self.opt(18, 1),
        }
    }
}

impl Header {
    /// Interprets and validates a parsed MSH segment: MSH-9 needs code and trigger (a bare
    /// `ACK` may omit the trigger), MSH-10 and MSH-12 must be non-empty.
    pub(crate) fn from_msh(msh: &Segment) -> Result<Header, ParseError> {
        let header = MshView {
            fields: (1..=msh.field_count())
                .filter_map(|n| msh.field_raw(n))
                .collect(),
            seps: &msh.seps,
        }
        .header();
        if header.message_type.code.is_empty() {
            return Err(ParseError::MissingMessageType);
        }
        if header.message_type.trigger.is_empty() && header.message_type.code != "ACK" {
            return Err(ParseError::MissingTriggerEvent {
                code: safe_token(&header.message_type.code),
            });
        }
        if header.control_id.is_empty() {
            return Err(ParseError::MissingControlId);
        }
        if header.version.is_empty() {
            return Err(ParseError::MissingVersion);
        }
        Ok(header)
    }
}

/// Best-effort MSH extraction from text that `parse` refused, for building a negative ACK.
/// Never fails: missing values are empty, and separators fall back to `|^~\&` piecewise.
/// Skips a BOM, whitespace and MLLP framing before `MSH`; if `MSH` is not at the start, the
/// first `MSH` followed by a non-alphanumeric character is used.
pub fn sniff_header(text: &str) -> (Header, Separators) {
    let defaults = Separators::default();
    let trimmed =
        text.trim_start_matches(|c: char| c == '\u{FEFF}' || c == '\u{0B}' || c.is_whitespace());
    let start = if trimmed.starts_with("MSH") {
        Some(0)
    } else {
        trimmed.match_indices("MSH").map(|(i, _)| i).find(|&i| {
            trimmed
                .get(i + 3..)
                .and_then(|r| r.chars().next())
                .is_some_and(|c| !c.is_alphanumeric())
        })
    };
    let Some(start) = start else {
        return (Header::default(), defaults);
    };
    let msh = trimmed.get(start..).unwrap_or_default();
    let line = msh.split(['\r', '\n']).next().unwrap_or_default();
    let mut chars = line.chars().skip(3);
    let Some(field) = chars
        .next()
        .filter(|c| !c.is_alphanumeric() && !c.is_whitespace())
    else {
        return (Header::default(), defaults);
    };
    let enc: Vec<char> = chars.take_while(|c| *c != field).take(5).collect();
    let pick = |i: usize, d: char| {
        enc.get(i)
            .copied()
            .filter(|c| *c != field && !c.is_whitespace() && !c.is_control())
            .unwrap_or(d)
    };
    let mut seps = Separators {
        field,
        component: pick(0, defaults.component),
        repetition: pick(1, defaults.repetition),
        escape: enc.get(2).copied(),
        subcomponent: pick(3, defaults.subcomponent),
        truncation: enc.get(4).copied(),
    };
    if !seps.is_usable() {
        // Duplicates or odd characters: keep the field separator (needed to split the line),
        // and use the defaults for the rest when they do not collide with it.
        seps = Separators { field, ..defaults };
        if !seps.is_usable() {
            return (Header::default(), defaults);
        }
    }
    // fields[n - 1] = MSH-n: MSH-1 is the separator, MSH-2 the encoding characters.
    let field_text = field.to_string();
    let mut fields: Vec<&str> = vec![&field_text];
    fields.extend(line.split(field).skip(1));
    let header = MshView {
        fields,
        seps: &seps,
    }
    .header();
    (header, seps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_good_header() {
        let (h, s) = sniff_header(
            "\u{FEFF}\r\nMSH|^~\\&|APP^1.2&x|FAC|RAPP|RFAC|20240101||ADT^A01^ADT_A01|C\\F\\1|P|2.5.1^GBR||||AL||UNICODE UTF-8\rPID|broken",
        );
        assert_eq!(s, Separators::default());
        assert_eq!(h.sending_application, "APP");
        assert_eq!(h.receiving_facility, "RFAC");
        assert_eq!(h.control_id, "C|1");
        assert_eq!(h.version, "2.5.1");
        assert_eq!(h.message_type.trigger, "A01");
        assert_eq!(h.message_type.structure.as_deref(), Some("ADT_A01"));
        assert_eq!(h.application_ack_type.as_deref(), Some("AL"));
        assert_eq!(h.charset.as_deref(), Some("UNICODE UTF-8"));
    }

    #[test]
    fn sniff_broken_inputs_never_fail() {
        for text in [
            "",
            "MSH",
            "MSH|",
            "MSH|^~",
            "MSH|^^^^|A|B",
            "garbage\rMSH|^~\\&|A|B|C|D|T||ADT^A01|42|P|2.3",
            "MSHX|nope",
            "MSH|^~\\&#|é|ü|\u{0}|||||",
            "MSH\u{e9}^~\\&|x",
            "\u{b}MSH|^~\\&|A",
        ] {
            let (h, s) = sniff_header(text);
            assert!(s.is_usable(), "{text:?} -> {s:?}");
            let _ = h;
        }
        let (h, _) = sniff_header("garbage\rMSH|^~\\&|A|B|C|D|T||ADT^A01|42|P|2.3");
        assert_eq!(h.control_id, "42");
        assert_eq!(h.version, "2.3");
        let (h, s) = sniff_header("MSH|^^^^|A|B|C|D|T||ADT^A01|42");
        assert_eq!(s.field, '|');
        assert_eq!(h.control_id, "42");
        let (h, s) = sniff_header("MSH!$r?@!LIP!LIP!LB!LB!2011!!RSP$SLI!430102!D!2.5");
        assert_eq!(s.repetition, 'r');
        assert_eq!(h.message_type.trigger, "SLI");
        assert_eq!(h.version, "2.5");
    }
}
