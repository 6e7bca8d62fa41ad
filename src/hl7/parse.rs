//! `parse`: text -> validated [`Message`], with hl7-parser doing the structural split.
//!
//! The pipeline, and why each step exists:
//!
//! 1. **Normalise lines ourselves.** Trim a BOM, leading whitespace and MLLP framing bytes;
//!    split on `\r`, `\n` and `\r\n` alike; skip lines that are empty or whitespace-only.
//!    hl7-parser in strict mode cuts a `\r\n` message after MSH, and in either mode stops
//!    silently at a blank line. We keep each line's input line number for errors.
//! 2. **Read MSH-1/MSH-2 ourselves.** hl7-parser assumes MSH-2 has exactly 4 characters; with
//!    the v2.7 truncation character (`^~\&#`) it takes `#` as MSH-3 and shifts every later MSH
//!    field by one. We validate the 4 or 5 encoding characters and hand hl7-parser the MSH
//!    line without the truncation character, then restore the real MSH-2 in our model.
//! 3. **Check segment names before hl7-parser sees them** (`[A-Z0-9]{3}` then the field
//!    separator or end of line), because hl7-parser accepts any Unicode alphanumerics and stops
//!    silently at anything else. A field-less segment (`NTE` alone on its line) is legal HL7
//!    (all fields empty) but hl7-parser stops at it; we give it a field separator for
//!    hl7-parser and record it with zero fields.
//! 4. **Structural parse with hl7-parser** of the normalised lines joined by `\r` (strict mode,
//!    since we normalised). Its errors carry a fragment of the input, which may be patient
//!    data; we keep only the offset, mapped back to a segment and line.
//! 5. **Verify full consumption.** hl7-parser's segment list parser ends without error at the
//!    first segment it cannot read. We require one hl7-parser segment per normalised line,
//!    each spanning its whole line; anything else is [`ParseError::Truncated`] naming the
//!    first line not consumed. A silently shortened message is never returned.
//! 6. **Copy into the owned model** (raw field text only) and validate MSH (see `header.rs`).
//!
//! Escapes are never decoded with hl7-parser (`display()` panics after non-ASCII text and
//! mis-decodes `\X..\`, `\H\`, `\N\`); see `escape.rs`. Charset handling happens before, in
//! `decode_to_utf8`, because hl7-parser only takes UTF-8 `&str`.

use encoding_rs::UTF_8;

use super::charset::{Declared, lookup_charset};
use super::error::ParseError;
use super::header::Header;
use super::message::{Message, Segment};
use super::separators::Separators;

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
        let (line, next) = match rest.find(['\r', '\n']) {
            Some(i) => {
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                (&rest[..i], Some(&rest[i + skip..]))
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

/// Runs hl7-parser on normalised segment lines joined by `\r` and verifies that it returned
/// exactly one segment per line, each spanning its whole line (`line_numbers[i]` is the input
/// line of segment `i`, for errors). hl7-parser ends its segment list without error at the
/// first segment it cannot read, so this check is what turns a silent truncation into
/// [`ParseError::Truncated`].
fn structural_parse<'j>(
    joined: &'j str,
    line_numbers: &[usize],
) -> Result<hl7_parser::Message<'j>, ParseError> {
    // Byte range of each line within `joined`.
    let mut ranges = Vec::with_capacity(line_numbers.len());
    let mut pos = 0;
    for part in joined.split('\r') {
        ranges.push(pos..pos + part.len());
        pos += part.len() + 1;
    }
    let line_of = |i: usize| line_numbers.get(i).copied().unwrap_or(0);

    let parsed = hl7_parser::parser::parse_message(joined).map_err(|e| {
        // hl7-parser's error also quotes input text (possibly patient data): keep the offset.
        let offset = match e {
            hl7_parser::parser::ParseError::FailedToParse { position, .. } => position,
            hl7_parser::parser::ParseError::IncompleteInput(_) => joined.len(),
        };
        let i = ranges
            .iter()
            .position(|r| offset <= r.end)
            .unwrap_or(ranges.len().saturating_sub(1));
        ParseError::Structure {
            index: i + 1,
            line: line_of(i),
            offset: offset.saturating_sub(ranges.get(i).map_or(0, |r| r.start)),
        }
    })?;

    let expected = ranges.len();
    let first_bad = (0..expected.max(parsed.segments.len())).find(|&i| {
        match (parsed.segments.get(i), ranges.get(i)) {
            (Some(seg), Some(range)) => {
                seg.range != *range || joined.get(range.start..range.start + 3) != Some(seg.name)
            }
            _ => true,
        }
    });
    if let Some(i) = first_bad {
        return Err(ParseError::Truncated {
            parsed: parsed.segments.len().min(i),
            expected,
            index: i + 1,
            line: line_of(i),
        });
    }
    Ok(parsed)
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
    let (msh2, msh_rest) = match after_field.find(field) {
        Some(i) => (&after_field[..i], Some(&after_field[i..])),
        None => (after_field, None),
    };
    let seps = Separators::from_msh(field, msh2)
        .map_err(|reason| ParseError::BadEncodingCharacters { reason })?;

    // --- lines for hl7-parser -----------------------------------------------------------
    // (feed text, our field count override for segments hl7-parser cannot represent)
    let mut feed: Vec<String> = Vec::with_capacity(lines.len());
    let mut fieldless: Vec<bool> = Vec::with_capacity(lines.len());
    let mut msh_line = format!("MSH{field}");
    msh_line.extend(msh2.chars().take(4));
    msh_line.push_str(msh_rest.unwrap_or_default());
    feed.push(msh_line);
    fieldless.push(false);
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
            (Some(_), Some(c)) if c == field => {
                feed.push(line.text.to_owned());
                fieldless.push(false);
            }
            (Some(n), None) => {
                feed.push(format!("{n}{field}"));
                fieldless.push(true);
            }
            _ => {
                return Err(ParseError::BadSegmentName {
                    index,
                    line: line.number,
                });
            }
        }
    }

    // --- structural parse + verification -------------------------------------------------
    let joined = feed.join("\r");
    let line_numbers: Vec<usize> = lines.iter().map(|l| l.number).collect();
    let parsed = structural_parse(&joined, &line_numbers)?;

    // --- owned model --------------------------------------------------------------------
    let segments: Vec<Segment> = parsed
        .segments
        .iter()
        .zip(&fieldless)
        .enumerate()
        .map(|(i, (seg, &no_fields))| {
            let mut fields: Vec<String> = if no_fields {
                Vec::new()
            } else {
                seg.fields
                    .iter()
                    .map(|f| f.raw_value().to_owned())
                    .collect()
            };
            if i == 0 {
                if let Some(f2) = fields.get_mut(1) {
                    // Restore the truncation character hl7-parser never saw.
                    *f2 = msh2.to_owned();
                }
                if msh_rest.is_none() {
                    // `MSH|^~\&` with nothing after: hl7-parser invents an empty MSH-3.
                    fields.truncate(2);
                }
            }
            Segment {
                name: seg.name.to_owned(),
                fields,
                seps,
            }
        })
        .collect();

    let msh = segments.first().ok_or(ParseError::Empty)?;
    let header = Header::from_msh(msh)?;
    let encoding = match header.charset.as_deref().map(lookup_charset) {
        Some(Declared::Known(e)) => e,
        _ => UTF_8,
    };
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

    /// The verification catches hl7-parser's silent stops even when fed un-normalised text
    /// (i.e. if the normalisation above ever missed a case).
    #[test]
    fn verification_catches_hl7_parser_silent_stops() {
        let cases = [
            // blank segment: hl7-parser returns 1 segment, silently.
            (format!("{MSH}\r\rPID|1"), 2),
            // field-less segment: hl7-parser stops before it.
            (format!("{MSH}\rNTE\rPID|1"), 2),
            // lower-case name followed by garbage.
            (format!("{MSH}\rPID|1\r?x|2"), 3),
        ];
        for (joined, bad_index) in cases {
            let n = joined.split('\r').count();
            let numbers: Vec<usize> = (1..=n).collect();
            match structural_parse(&joined, &numbers) {
                Err(ParseError::Truncated { index, line, .. }) => {
                    assert_eq!((index, line), (bad_index, bad_index), "{joined:?}");
                }
                other => panic!("{joined:?}: {other:?}"),
            }
        }
        // hl7-parser 0.3 really does stop silently on these (so the check is load-bearing).
        for text in [format!("{MSH}\r\rPID|1"), format!("{MSH}\r\nPID|1")] {
            let raw = hl7_parser::parser::parse_message(&text).unwrap();
            assert_eq!(raw.segments.len(), 1);
        }
        let ok = format!("{MSH}\rPID|1\rPV1|1");
        assert_eq!(structural_parse(&ok, &[1, 2, 3]).unwrap().segments.len(), 3);
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
