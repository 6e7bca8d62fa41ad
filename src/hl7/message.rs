//! The owned message model: segments of raw (still escaped) fields, plus path look-ups.
//!
//! Why owned and raw: the message outlives the frame buffer it came from (it travels through
//! the mapping pipeline), and keeping the escaped text lets the mapper choose between the
//! exact value (`get_raw`, e.g. to re-emit or hash) and the human value (`get`). hl7-parser's
//! borrowed tree is only used while parsing (see `parse.rs`).
//!
//! Numbering follows HL7: fields, repetitions, components and subcomponents are 1-based, and
//! for MSH field 1 is the field separator itself and field 2 the encoding characters.

use encoding_rs::Encoding;

use super::escape::decode_escapes;
use super::header::Header;
use super::separators::Separators;
use super::split::{nth_part, parts};

/// One segment: its line of raw text and where each field lies in it.
///
/// One allocation for the text and one for the field bounds, however many fields, repetitions
/// and components the segment has: repetitions and components are found on demand by splitting
/// a field's slice, which is cheaper than building a tree the mapping mostly never reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The whole line, name included (`PID|1||...`), still escaped.
    line: String,
    /// Byte range in `line` of each field: `fields[0]` is HL7 field 1.
    fields: Vec<(usize, usize)>,
    pub(crate) seps: Separators,
    /// Whether the escape character occurs in the segment's values (MSH-2, which holds it,
    /// excluded): set by the parser once separators are known. A value of a segment without
    /// one is its own decoded text, so reads skip the scan for escape sequences.
    pub(crate) escaped: bool,
}

impl Segment {
    /// A non-MSH segment line (`SEG` followed by the field separator, or `SEG` alone).
    pub(crate) fn split(line: &str, field_sep: char) -> Self {
        let mut fields = Vec::new();
        if line.len() > 3 {
            push_fields(line, 3 + field_sep.len_utf8(), field_sep, &mut fields);
        }
        Segment {
            line: line.to_owned(),
            fields,
            seps: Separators::default(),
            escaped: false,
        }
    }

    /// The MSH line: field 1 is the field separator itself, field 2 the encoding characters
    /// (`msh2_len` bytes, 4 or 5 with the truncation character), then ordinary fields.
    pub(crate) fn msh(line: &str, field_sep: char, msh2_len: usize) -> Self {
        let msh2_start = 3 + field_sep.len_utf8();
        let msh2_end = msh2_start + msh2_len;
        let mut fields = vec![(3, msh2_start), (msh2_start, msh2_end)];
        if msh2_end < line.len() {
            push_fields(
                line,
                msh2_end + field_sep.len_utf8(),
                field_sep,
                &mut fields,
            );
        }
        Segment {
            line: line.to_owned(),
            fields,
            seps: Separators::default(),
            escaped: false,
        }
    }

    /// Whether any value of the segment may hold an escape sequence: when not, the raw text of
    /// each of its values is the decoded text. Most segments have none, even in a message
    /// that has one (an OBX note with `\T\`), and this spares every other read a scan (~4%
    /// of mapping).
    pub fn has_escapes(&self) -> bool {
        self.escaped
    }

    /// The whole line, still escaped.
    pub(crate) fn line(&self) -> &str {
        &self.line
    }

    /// The 3-character segment name (`PID`).
    pub fn name(&self) -> &str {
        self.line.get(..3).unwrap_or_default()
    }

    /// Whether this is a `code` segment (see [`segment_code`]): a compare of three bytes in
    /// registers, where comparing names as strings calls `memcmp` (mapping looks segments up
    /// by name ~100 times per message, scanning the message each time).
    pub fn is(&self, code: [u8; 3]) -> bool {
        matches!(self.line.as_bytes(), [a, b, c, ..] if [*a, *b, *c] == code)
    }

    /// Raw (escaped) text of HL7 field `n` (1-based). `None` when the segment has fewer fields.
    pub fn field_raw(&self, n: usize) -> Option<&str> {
        let &(a, b) = self.fields.get(n.checked_sub(1)?)?;
        self.line.get(a..b)
    }

    /// Number of fields present (for MSH, counting MSH-1 and MSH-2).
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// Whether field `n` is one that must not be split (MSH-1 and MSH-2 contain delimiters).
    fn is_delimiter_field(&self, n: usize) -> bool {
        self.name() == "MSH" && (n == 1 || n == 2)
    }

    /// Raw repetitions of field `n`; empty when the field is absent or empty.
    pub fn repetitions(&self, n: usize) -> Vec<&str> {
        match self.field_raw(n) {
            None | Some("") => Vec::new(),
            Some(raw) if self.is_delimiter_field(n) => vec![raw],
            Some(raw) => parts(raw, self.seps.repetition).collect(),
        }
    }

    /// Component `comp` (1-based) of a raw repetition, and within it subcomponent `sub`
    /// (1-based; `0` means the whole component, subcomponent separators included).
    /// `None` when absent; `Some("")` when present but empty.
    pub fn component<'a>(
        &self,
        seps: &Separators,
        rep_raw: &'a str,
        comp: usize,
        sub: usize,
    ) -> Option<&'a str> {
        component_of(seps, rep_raw, comp, sub)
    }
}

/// A segment name as the three bytes [`Segment::is`] compares; `None` for a name that is not
/// three bytes long (no segment has it).
pub fn segment_code(name: &str) -> Option<[u8; 3]> {
    name.as_bytes().try_into().ok()
}

/// Pushes the byte ranges of the fields of `line[from..]`, separated by `sep`, as absolute
/// ranges in `line` (at least one field: the text after the last separator, maybe empty).
///
/// The field separator is ASCII (the parser refuses others), and an ASCII byte never occurs
/// inside a multi-byte UTF-8 character, so the line is scanned by byte, twice: once to size the
/// vector, once to fill it. Not through [`parts`]: its search per part measured 16 k
/// instructions more per message (callgrind, `parse_map_json`), and a general `char` search
/// cost more than the rest of parsing.
fn push_fields(line: &str, from: usize, sep: char, out: &mut Vec<(usize, usize)>) {
    let rest = line.get(from..).unwrap_or_default();
    if !sep.is_ascii() {
        let mut start = from;
        for part in parts(rest, sep) {
            out.push((start, start + part.len()));
            start += part.len() + sep.len_utf8();
        }
        return;
    }
    let b = sep as u8;
    let bytes = rest.as_bytes();
    out.reserve(bytes.iter().filter(|x| **x == b).count() + 1);
    let mut start = from;
    for (i, x) in bytes.iter().enumerate() {
        if *x == b {
            out.push((start, from + i));
            start = from + i + 1;
        }
    }
    out.push((start, line.len()));
}

/// Free-function form of [`Segment::component`].
pub fn component_of<'a>(
    seps: &Separators,
    rep_raw: &'a str,
    comp: usize,
    sub: usize,
) -> Option<&'a str> {
    let c = nth_part(rep_raw, seps.component, comp.checked_sub(1)?)?;
    if sub == 0 {
        return Some(c);
    }
    nth_part(c, seps.subcomponent, sub - 1)
}

/// A parsed, validated HL7 v2 message (owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub(crate) seps: Separators,
    pub(crate) segments: Vec<Segment>,
    pub(crate) header: Header,
    pub(crate) encoding: &'static Encoding,
}

/// A parsed HL7 path: `SEG[occurrence]-field[repetition].component.subcomponent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path<'p> {
    pub segment: &'p str,
    /// 1-based occurrence of the segment (default 1).
    pub occurrence: usize,
    pub field: usize,
    /// 1-based repetition (default 1).
    pub repetition: usize,
    /// 1-based component; `None` = the whole repetition.
    pub component: Option<usize>,
    /// 1-based subcomponent; `None` = the whole component.
    pub subcomponent: Option<usize>,
}

impl<'p> Path<'p> {
    /// Parses `PID-5`, `PID-5.1`, `PID-5[2].1.2`, `OBX[3]-5`, `MSH-9.2`. `.` is also accepted
    /// instead of `-` after the segment name (`PID.5.1`). Returns `None` for malformed paths
    /// or zero indexes.
    pub fn parse(path: &'p str) -> Option<Self> {
        let path = path.trim();
        let seg = path.get(..3)?;
        if !seg
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return None;
        }
        let mut rest = path.get(3..)?;
        let occurrence = take_index(&mut rest)?.unwrap_or(1);
        rest = rest.strip_prefix(['-', '.'])?;
        let mut parts = rest.split('.');
        let field_part = parts.next()?;
        let (field, repetition) = match field_part.split_once('[') {
            Some((f, r)) => (f, Some(r.strip_suffix(']')?)),
            None => (field_part, None),
        };
        let field = positive(field)?;
        let repetition = repetition.map(positive).unwrap_or(Some(1))?;
        let component = match parts.next() {
            Some(c) => Some(positive(c)?),
            None => None,
        };
        let subcomponent = match parts.next() {
            Some(s) => Some(positive(s)?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Path {
            segment: seg,
            occurrence,
            field,
            repetition,
            component,
            subcomponent,
        })
    }
}

/// Parses an optional `[n]` at the start of `rest`. `Some(None)` when absent.
fn take_index(rest: &mut &str) -> Option<Option<usize>> {
    let Some(inner) = rest.strip_prefix('[') else {
        return Some(None);
    };
    let (num, after) = inner.split_once(']')?;
    *rest = after;
    positive(num).map(Some)
}

fn positive(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<usize>().ok().filter(|n| *n > 0)
}

impl Message {
    /// Whether any value may hold an escape sequence (see [`decode_escapes`]); when not, the
    /// raw text of every value is its decoded text.
    pub fn has_escapes(&self) -> bool {
        self.segments.iter().any(Segment::has_escapes)
    }

    /// The message's delimiters.
    pub fn separators(&self) -> &Separators {
        &self.seps
    }

    /// All segments in order (MSH first).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Segments with the given name, in order.
    pub fn segments_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Segment> + 'a {
        self.segments.iter().filter(move |s| s.name() == name)
    }

    /// The validated MSH.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The charset used for `\Xhh\` escapes: by default the one MSH-18 declares (UTF-8 when
    /// absent). Set it with [`Message::with_encoding`] to what `decode_to_utf8` reported
    /// when it had to fall back.
    pub fn encoding(&self) -> &'static Encoding {
        self.encoding
    }

    /// Replaces the charset used for `\Xhh\` escapes.
    pub fn with_encoding(mut self, encoding: &'static Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Raw (still escaped) value at an HL7 path (see [`Path::parse`]). `None` if the path is
    /// malformed or the position is absent. MSH-1 and MSH-2 are returned whole.
    pub fn get_raw(&self, path: &str) -> Option<&str> {
        let p = Path::parse(path)?;
        let seg = self
            .segments
            .iter()
            .filter(|s| s.name() == p.segment)
            .nth(p.occurrence.checked_sub(1)?)?;
        let field = seg.field_raw(p.field)?;
        if seg.is_delimiter_field(p.field) {
            let whole = p.repetition == 1
                && p.component.unwrap_or(1) == 1
                && p.subcomponent.unwrap_or(1) == 1;
            return whole.then_some(field);
        }
        let rep = nth_part(field, self.seps.repetition, p.repetition - 1)?;
        match (p.component, p.subcomponent) {
            (None, _) => Some(rep),
            (Some(c), None) => component_of(&self.seps, rep, c, 0),
            (Some(c), Some(s)) => component_of(&self.seps, rep, c, s),
        }
    }

    /// Decoded value at an HL7 path like `PID-5`, `PID-5.1`, `PID-5[2].1.2`, `MSH-9.2`
    /// (first repetition and first segment occurrence by default; `OBX[2]-5` selects the
    /// second OBX). Escapes are resolved. `None` if absent, empty, or the HL7 null `""`.
    ///
    /// A path without a component returns the whole repetition with its delimiters; since
    /// escaped delimiters are resolved too, use component paths for composite types.
    pub fn get(&self, path: &str) -> Option<String> {
        let raw = self.get_raw(path)?;
        if raw.is_empty() || raw == "\"\"" {
            return None;
        }
        if path.trim().starts_with("MSH") && matches!(Path::parse(path), Some(p) if p.field <= 2) {
            return Some(raw.to_owned());
        }
        let decoded = decode_escapes(raw, &self.seps, self.encoding);
        (!decoded.is_empty()).then_some(decoded)
    }

    /// True when the value at `path` is the HL7 explicit null `""` ("delete this value").
    pub fn is_null(&self, path: &str) -> bool {
        self.get_raw(path) == Some("\"\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_grammar() {
        let p = Path::parse("PID-5[2].1.2").unwrap();
        assert_eq!(
            (
                p.segment,
                p.occurrence,
                p.field,
                p.repetition,
                p.component,
                p.subcomponent
            ),
            ("PID", 1, 5, 2, Some(1), Some(2))
        );
        let p = Path::parse("OBX[3]-5").unwrap();
        assert_eq!((p.segment, p.occurrence, p.field), ("OBX", 3, 5));
        assert!(Path::parse("PID.5.1").is_some());
        for bad in [
            "",
            "PI",
            "PID",
            "PID-",
            "PID-0",
            "PID-5.0",
            "PID-5[0]",
            "PID-5[x]",
            "pid-5",
            "PID-5.1.2.3",
            "PID-5[2",
            "PÏD-5",
            "PID-5.",
            "OBX[]-5",
            "PID-99999999999999999999",
        ] {
            assert!(Path::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn segments_are_told_by_their_three_letter_code() {
        let pid = Segment::split("PID|1", '|');
        let bare = Segment::split("NTE", '|');
        let code = |n| segment_code(n).expect("three letters");
        assert!(pid.is(code("PID")));
        assert!(!pid.is(code("PV1")));
        assert!(bare.is(code("NTE")));
        assert_eq!(segment_code("PI"), None);
        assert_eq!(segment_code("PIDX"), None);
    }

    #[test]
    fn component_helper() {
        let seps = Separators::default();
        assert_eq!(component_of(&seps, "A^B&C^", 2, 0), Some("B&C"));
        assert_eq!(component_of(&seps, "A^B&C^", 2, 2), Some("C"));
        assert_eq!(component_of(&seps, "A^B&C^", 3, 0), Some(""));
        assert_eq!(component_of(&seps, "A^B&C^", 4, 0), None);
        assert_eq!(component_of(&seps, "A^B&C^", 0, 0), None);
    }
}
