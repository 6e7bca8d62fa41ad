//! `parse`: text -> validated [`Message`], split by a zero-copy index of field positions.
//!
//! The pipeline, and why each step exists:
//!
//! 1. **Normalise lines.** Trim a BOM, leading whitespace and MLLP framing bytes; split on
//!    `\r`, `\n` and `\r\n` alike (senders and files disagree); skip lines that are empty or
//!    whitespace-only. Each line keeps its input line number for errors.
//! 2. **Read MSH-1/MSH-2.** Validate the 4 or 5 encoding characters (5 with the v2.7
//!    truncation character `^~\&#`), so MSH-3.. keep their numbers whatever MSH-2 holds.
//! 3. **Check segment names** (`[A-Z0-9]{3}`, then the field separator or the end of the
//!    line: a field-less segment like `NTE` alone is legal, all fields empty), refuse a
//!    second MSH (one message per frame), and report the segment and input line otherwise.
//! 4. **Index the fields.** Each segment keeps its line and the byte range of every field;
//!    repetitions and components are split on demand when a mapping reads them. Then MSH is
//!    validated (see `header.rs`).
//!
//! Why not hl7-parser's tree: it allocates a vector per field, repetition, component and
//! subcomponent, and building and freeing that tree was 95% of parse time (`perf`, 60 µs of a
//! 1.6 KB ADT^A01), while the mapping reads a few dozen positions. HL7 v2 structure is only
//! delimiters, so any text that passes steps 1-3 has exactly one split; the test suite checks
//! that this index and hl7-parser agree on every field of every corpus message (see
//! `hl7/tests.rs`). Escapes are decoded by `escape.rs`, charsets before parsing by
//! `decode_to_utf8`.

use encoding_rs::UTF_8;

use super::charset::{Declared, lookup_charset};
use super::error::ParseError;
use super::header::Header;
use super::message::{Message, Segment};
use super::separators::Separators;
use super::split::contains_char;

/// One non-blank input line.
struct Line<'a> {
    text: &'a str,
    /// 1-based line number in the (trimmed) input.
    number: usize,
}

/// Splits on `\r\n`, `\r` or `\n`, dropping empty and whitespace-only lines.
fn split_lines(text: &str) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let mut number = 1;
    let mut rest = text;
    loop {
        // By byte: a line end is ASCII, never inside a multi-byte character (a `char` pattern
        // search walked every character of the message).
        let end = rest.bytes().position(|b| b == b'\r' || b == b'\n');
        let (line, next) = match end {
            Some(i) => {
                let skip = if rest.get(i..).is_some_and(|r| r.starts_with("\r\n")) {
                    2
                } else {
                    1
                };
                (
                    rest.get(..i).unwrap_or_default(),
                    Some(rest.get(i + skip..).unwrap_or_default()),
                )
            }
            None => (rest, None),
        };
        if !line.trim().is_empty() {
            lines.push(Line { text: line, number });
        }
        match next {
            Some(n) => {
                rest = n;
                number += 1;
            }
            None => break,
        }
    }
    lines
}

fn is_framing(c: char) -> bool {
    matches!(c, '\u{FEFF}' | '\u{0B}' | '\u{1C}' | '\0') || c.is_whitespace()
}

/// A 3-character segment name `[A-Z0-9]`.
fn valid_name(name: &str) -> bool {
    name.len() == 3
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Parses one message (already UTF-8; see `decode_to_utf8`). See the module docs.
pub fn parse(text: &str) -> Result<Message, ParseError> {
    // Trailing: only line ends and framing, so trailing spaces of the last field survive.
    let trimmed = text
        .trim_start_matches(is_framing)
        .trim_end_matches(['\r', '\n', '\u{0B}', '\u{1C}', '\0']);
    let lines = split_lines(trimmed);
    let Some(first) = lines.first() else {
        return Err(ParseError::Empty);
    };

    // --- MSH-1 / MSH-2 ---------------------------------------------------------------
    let Some(after_msh) = first.text.strip_prefix("MSH") else {
        let found = first
            .text
            .get(..3)
            .filter(|n| valid_name(n))
            .map(str::to_owned);
        return Err(ParseError::MissingMsh {
            line: first.number,
            found,
        });
    };
    let mut chars = after_msh.chars();
    let field = chars.next().ok_or(ParseError::BadFieldSeparator {
        reason: "is missing: the line ends after `MSH`",
    })?;
    if field.is_alphanumeric() || field.is_whitespace() || field.is_control() || !field.is_ascii() {
        return Err(ParseError::BadFieldSeparator {
            reason: "must be a printable ASCII character that is not a letter or digit",
        });
    }
    let after_field = chars.as_str();
    let msh2 = match after_field.find(field) {
        Some(i) => &after_field[..i],
        None => after_field,
    };
    let seps = Separators::from_msh(field, msh2)
        .map_err(|reason| ParseError::BadEncodingCharacters { reason })?;

    // --- segments ----------------------------------------------------------------------
    let mut segments: Vec<Segment> = Vec::with_capacity(lines.len());
    segments.push(Segment::msh(first.text, field, msh2.len()));
    for (i, line) in lines.iter().enumerate().skip(1) {
        let index = i + 1;
        let name = line.text.get(..3).filter(|n| valid_name(n));
        let tail = line.text.get(3..).and_then(|t| t.chars().next());
        match (name, tail) {
            (Some("MSH"), _) => {
                return Err(ParseError::UnexpectedMsh {
                    index,
                    line: line.number,
                });
            }
            (Some(_), Some(c)) if c == field => segments.push(Segment::split(line.text, field)),
            // A field-less segment (`NTE` alone on its line): legal, all fields empty.
            (Some(_), None) => segments.push(Segment::split(line.text, field)),
            _ => {
                return Err(ParseError::BadSegmentName {
                    index,
                    line: line.number,
                });
            }
        }
    }
    for seg in &mut segments {
        seg.seps = seps;
    }

    let msh = segments.first().ok_or(ParseError::Empty)?;
    let header = Header::from_msh(msh)?;
    let encoding = match header.charset.as_deref().map(lookup_charset) {
        Some(Declared::Known(e)) => e,
        _ => UTF_8,
    };
    if let Some(esc) = seps.escape {
        for (i, seg) in segments.iter_mut().enumerate() {
            // MSH-2 holds the escape character itself.
            let from = if i == 0 {
                3 + field.len_utf8() + msh2.len()
            } else {
                3
            };
            seg.escaped = seg
                .line()
                .get(from..)
                .is_some_and(|t| contains_char(t, esc));
        }
    }
    Ok(Message {
        seps,
        segments,
        header,
        encoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSH: &str = "MSH|^~\\&|APP|FAC|RAPP|RFAC|20240101120000||ADT^A01^ADT_A01|CTRL1|P|2.5.1";

    #[test]
    fn split_lines_handles_all_terminators() {
        let l = split_lines("a\rb\nc\r\nd\r\r\n \n\re");
        let got: Vec<(&str, usize)> = l.iter().map(|l| (l.text, l.number)).collect();
        assert_eq!(got, [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 8)]);
    }

    #[test]
    fn field_bounds_cover_every_shape() {
        let m = parse(&format!("{MSH}\rNTE\rPID|\rOBX||a|\rZU1|é|ü|")).unwrap();
        let fields = |i: usize| -> Vec<&str> {
            let s = &m.segments()[i];
            (1..=s.field_count())
                .filter_map(|n| s.field_raw(n))
                .collect()
        };
        assert_eq!(fields(1), Vec::<&str>::new());
        assert_eq!(fields(2), [""]);
        assert_eq!(fields(3), ["", "a", ""]);
        assert_eq!(fields(4), ["é", "ü", ""]);
        assert_eq!(&fields(0)[..4], ["|", "^~\\&", "APP", "FAC"]);
        let bare = parse("MSH|^~\\&#").map(|m| m.segments()[0].field_count());
        assert!(
            matches!(bare, Err(ParseError::MissingMessageType)),
            "{bare:?}"
        );
        // Another field separator, with the truncation character in MSH-2.
        let m = parse("MSH#^~\\&%#A#B#C#D#T##ADT^A01#1#P#2.5\rPID#1##x").unwrap();
        assert_eq!(m.get_raw("PID-3"), Some("x"));
        assert_eq!(m.get_raw("MSH-10"), Some("1"));
    }

    #[test]
    fn trailing_spaces_of_last_field_survive() {
        let m = parse(&format!("{MSH}\rNTE|1||a  \r\n")).unwrap();
        assert_eq!(m.get_raw("NTE-3"), Some("a  "));
    }

    #[test]
    fn basic_parse() {
        let m = parse(&format!("{MSH}\rPID|1||123^^^H^MR~456^^^N^NH||DOE^JOHN\r")).unwrap();
        assert_eq!(m.segments().len(), 2);
        assert_eq!(m.header().control_id, "CTRL1");
        assert_eq!(
            m.header().message_type.structure.as_deref(),
            Some("ADT_A01")
        );
        assert_eq!(m.get("PID-3[2].1").as_deref(), Some("456"));
    }

    #[test]
    fn validation_errors() {
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::Empty),
            ("\r\n\n", ParseError::Empty),
            (
                "PID|1\rMSH|^~\\&",
                ParseError::MissingMsh {
                    line: 1,
                    found: Some("PID".into()),
                },
            ),
            (
                "MSH",
                ParseError::BadFieldSeparator {
                    reason: "is missing: the line ends after `MSH`",
                },
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||ADT|1|P|2.5",
                ParseError::MissingTriggerEvent { code: "ADT".into() },
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||^A01|1|P|2.5",
                ParseError::MissingMessageType,
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||ADT^A01||P|2.5",
                ParseError::MissingControlId,
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||ADT^A01|1|P",
                ParseError::MissingVersion,
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||ADT^A01|1|P|2.5\rPID|1\rMSH|^~\\&|x",
                ParseError::UnexpectedMsh { index: 3, line: 3 },
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||ADT^A01|1|P|2.5\rPID|1\r\rSMITH, JOHN|x",
                ParseError::BadSegmentName { index: 3, line: 4 },
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||ADT^A01|1|P|2.5\rpid|1",
                ParseError::BadSegmentName { index: 2, line: 2 },
            ),
            (
                "MSH|^~\\&|A|B|C|D|T||ADT^A01|1|P|2.5\rPIDX|1",
                ParseError::BadSegmentName { index: 2, line: 2 },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).as_ref().err(), Some(want), "{text:?}");
        }
        // ACK may lack a trigger.
        assert!(parse("MSH|^~\\&|A|B|C|D|T||ACK|1|P|2.5\rMSA|AA|9").is_ok());
    }

    #[test]
    fn errors_know_code_and_location_and_leak_nothing() {
        let e = parse("MSH|^~\\&|A|B|C|D|T||ADT|1|P|2.5").unwrap_err();
        assert_eq!(
            e.error_code(),
            super::super::ErrorCode::RequiredFieldMissing
        );
        assert_eq!(e.location().as_deref(), Some("MSH^1^9^1^2"));
        assert!(e.to_string().contains("MSH-9"), "{e}");
        let e = parse("MSH|^~\\&|A|B|C|D|T||ADT^A01|1|P|2.5\rPID|1\nSMITH^JOHN|x").unwrap_err();
        assert!(!e.to_string().contains("SMITH"), "{e}");
        assert!(e.to_string().contains("segment 3"), "{e}");
        let e = parse("MSH|^~\\&|A|B|C|D|T||Müller Hans|1|P|2.5").unwrap_err();
        assert!(!e.to_string().contains("Müller"), "{e}");
    }
}
