//! HL7 escape sequences, both directions, written here rather than borrowed from hl7-parser.
//!
//! Why our own: hl7-parser's `display()` panics when an escape sequence follows non-ASCII text
//! (it mixes byte and char offsets), and it decodes `\X..\`, `\H\` and `\N\` wrongly. Escapes
//! carry patient names, so a panic here would take a whole feed down; this decoder works on
//! `char`s and string slices found by `find`, so it cannot split a UTF-8 sequence.
//!
//! Decoding rules (`esc` is the message's escape character, `\` below):
//!
//! | sequence | result |
//! |---|---|
//! | `\F\ \S\ \T\ \R\ \E\` | the field, component, subcomponent, repetition, escape character |
//! | `\P\` (v2.7) | the truncation character (`#` when the message declares none) |
//! | `\H\` `\N\` | removed: highlighting on/off has no meaning in plain text |
//! | `\.br\` | `"\n"` |
//! | `\.sp\`, `\.sp n\` | `n` line breaks (at least 1, capped at 16) |
//! | `\.sk n\` | `n` spaces (capped at 16) |
//! | `\.ce\` | `"\n"` (ends the line before a centred one) |
//! | `\.fi\ \.nf\ \.in n\ \.ti n\` | removed (fill/indent layout hints) |
//! | `\Xhhhh..\` | the bytes `hh..` decoded in the message charset; kept literally if the hex is odd-length or invalid, or the bytes are invalid in that charset |
//! | `\Zxxx\` | kept literally (locally defined; the receiver cannot know its meaning) |
//! | `\Cxxyy\`, `\Mxxyyzz\` | removed: ISO 2022 charset switches; the text was already transcoded to Unicode by `decode_to_utf8` |
//! | unterminated sequence | kept literally (to the end of the value) |
//! | anything else | the escape character is kept literally and decoding resumes right after it, so a stray `\` does not swallow a following real escape |
//!
//! Without an escape character (`Separators::escape == None`) the text is returned unchanged.

use std::borrow::Cow;

use super::separators::Separators;
use super::split::contains_char;

/// Maximum repeat count honoured for `.sp` / `.sk` so a hostile value cannot balloon memory.
const MAX_LAYOUT_REPEAT: usize = 16;

/// Resolves HL7 escape sequences in `raw` (one field, component or subcomponent value).
///
/// `encoding` is the message's charset, used for `\Xhh\` hex escapes. Never panics.
pub fn decode_escapes(
    raw: &str,
    seps: &Separators,
    encoding: &'static encoding_rs::Encoding,
) -> String {
    decode_escapes_cow(raw, seps, encoding).into_owned()
}

/// [`decode_escapes`] that borrows `raw` when it has no escape character, which is nearly every
/// value: the mapper reads hundreds of values per message and compares or copies most of them
/// once, so a `String` per read was an allocation for nothing.
pub fn decode_escapes_cow<'a>(
    raw: &'a str,
    seps: &Separators,
    encoding: &'static encoding_rs::Encoding,
) -> Cow<'a, str> {
    let Some(esc) = seps.escape else {
        return Cow::Borrowed(raw);
    };
    if !contains_char(raw, esc) {
        return Cow::Borrowed(raw);
    }
    let esc_len = esc.len_utf8();
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(esc) {
        out.push_str(&rest[..start]);
        let after = &rest[start + esc_len..];
        let Some(end) = after.find(esc) else {
            // Unterminated: keep the remainder literally.
            out.push_str(&rest[start..]);
            return Cow::Owned(out);
        };
        let content = &after[..end];
        match expand(content, seps, encoding) {
            Expansion::Text(t) => {
                out.push_str(&t);
                rest = &after[end + esc_len..];
            }
            Expansion::KeepLiteral => {
                out.push_str(&rest[start..start + 2 * esc_len + end]);
                rest = &after[end + esc_len..];
            }
            Expansion::NotAnEscape => {
                out.push(esc);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

enum Expansion {
    /// A recognised sequence and its replacement (possibly empty).
    Text(String),
    /// A recognised sequence we deliberately keep as written.
    KeepLiteral,
    /// Not an escape sequence: keep only the escape character and rescan after it.
    NotAnEscape,
}

fn expand(content: &str, seps: &Separators, encoding: &'static encoding_rs::Encoding) -> Expansion {
    let one = |c: char| Expansion::Text(c.to_string());
    match content {
        "F" => return one(seps.field),
        "S" => return one(seps.component),
        "T" => return one(seps.subcomponent),
        "R" => return one(seps.repetition),
        "E" => return seps.escape.map_or(Expansion::NotAnEscape, one),
        "P" => return one(seps.truncation.unwrap_or('#')),
        "H" | "N" => return Expansion::Text(String::new()),
        _ => {}
    }
    let mut chars = content.chars();
    let Some(first) = chars.next() else {
        return Expansion::NotAnEscape;
    };
    let tail = chars.as_str();
    match first {
        '.' => layout(tail),
        'X' => match hex_bytes(tail) {
            Some(bytes) => encoding
                .decode_without_bom_handling_and_without_replacement(&bytes)
                .map_or(Expansion::KeepLiteral, |s| Expansion::Text(s.into_owned())),
            None => Expansion::KeepLiteral,
        },
        'Z' if !tail.is_empty() => Expansion::KeepLiteral,
        'C' if tail.len() == 4 && is_hex(tail) => Expansion::Text(String::new()),
        'M' if (tail.len() == 4 || tail.len() == 6) && is_hex(tail) => {
            Expansion::Text(String::new())
        }
        _ => Expansion::NotAnEscape,
    }
}

/// Formatted-text (FT) commands: `.br`, `.sp n`, `.sk n`, `.ce`, `.fi`, `.nf`, `.in n`, `.ti n`.
fn layout(cmd: &str) -> Expansion {
    let (name, arg) = cmd.split_at(cmd.len().min(2).min(ascii_prefix_len(cmd)));
    let count = || -> Option<usize> {
        let a = arg.trim().trim_start_matches('+');
        if a.is_empty() {
            return Some(1);
        }
        a.parse::<usize>().ok().map(|n| n.min(MAX_LAYOUT_REPEAT))
    };
    match name {
        "br" if arg.is_empty() => Expansion::Text("\n".to_owned()),
        "ce" if arg.is_empty() => Expansion::Text("\n".to_owned()),
        "fi" | "nf" if arg.is_empty() => Expansion::Text(String::new()),
        "sp" => count().map_or(Expansion::NotAnEscape, |n| {
            Expansion::Text("\n".repeat(n.max(1)))
        }),
        "sk" => count().map_or(Expansion::NotAnEscape, |n| Expansion::Text(" ".repeat(n))),
        "in" | "ti" => {
            let a = arg.trim();
            let a = a.strip_prefix(['+', '-']).unwrap_or(a);
            if a.is_empty() || a.bytes().all(|b| b.is_ascii_digit()) {
                Expansion::Text(String::new())
            } else {
                Expansion::NotAnEscape
            }
        }
        _ => Expansion::NotAnEscape,
    }
}

/// Length in bytes of the leading ASCII run (so `split_at` never lands inside a char).
fn ascii_prefix_len(s: &str) -> usize {
    s.bytes().take_while(u8::is_ascii).count()
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if !is_hex(s) || !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => {
                let hi = char::from(*hi).to_digit(16)?;
                let lo = char::from(*lo).to_digit(16)?;
                u8::try_from(hi * 16 + lo).ok()
            }
            _ => None,
        })
        .collect()
}

/// Escapes `text` so it can be placed in a field, component or subcomponent without changing
/// the message structure: delimiters become `\F\ \S\ \T\ \R\ \E\ \P\`, and control characters
/// (CR, LF, MLLP framing bytes, ...) become `\Xhh\`, so a value can never end a segment or a
/// frame. Without an escape character the delimiters and controls are replaced by spaces.
pub fn encode_escapes(text: &str, seps: &Separators) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        let code = if c == seps.field {
            Some('F')
        } else if c == seps.component {
            Some('S')
        } else if c == seps.subcomponent {
            Some('T')
        } else if c == seps.repetition {
            Some('R')
        } else if Some(c) == seps.escape {
            Some('E')
        } else if Some(c) == seps.truncation {
            Some('P')
        } else {
            None
        };
        match (seps.escape, code) {
            (Some(e), Some(code)) => {
                out.push(e);
                out.push(code);
                out.push(e);
            }
            (Some(e), None) if c.is_control() && (c as u32) < 0x80 => {
                out.push(e);
                out.push_str(&format!("X{:02X}", c as u32));
                out.push(e);
            }
            (None, Some(_)) => out.push(' '),
            (_, None) if c.is_control() => out.push(' '),
            (_, None) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::{UTF_8, WINDOWS_1252};

    fn d(raw: &str) -> String {
        decode_escapes(raw, &Separators::default(), UTF_8)
    }

    #[test]
    fn delimiters() {
        assert_eq!(d(r"a\F\b\S\c\T\d\R\e\E\f"), r"a|b^c&d~e\f");
        let trunc = Separators {
            truncation: Some('#'),
            ..Separators::default()
        };
        assert_eq!(decode_escapes(r"x\P\y", &trunc, UTF_8), "x#y");
    }

    #[test]
    fn non_ascii_then_escape_does_not_panic() {
        // hl7-parser 0.3 panics on exactly this (defect 1).
        assert_eq!(d(r"Müller\S\Zoë\T\ß"), "Müller^Zoë&ß");
        assert_eq!(d(r"日本\F\語\"), "日本|語\\");
        assert_eq!(d("é\\"), "é\\");
    }

    #[test]
    fn hex_escapes_use_message_charset() {
        assert_eq!(d(r"\X41\"), "A");
        assert_eq!(d(r"\X414243\"), "ABC");
        assert_eq!(d(r"caf\XC3A9\"), "café");
        assert_eq!(
            decode_escapes(r"caf\XE9\", &Separators::default(), WINDOWS_1252),
            "café"
        );
        // Invalid in UTF-8: kept literally.
        assert_eq!(d(r"caf\XE9\"), r"caf\XE9\");
        // Odd length / not hex: kept literally.
        assert_eq!(d(r"\X4\"), r"\X4\");
        assert_eq!(d(r"\XZZ\"), r"\XZZ\");
        assert_eq!(d(r"\X\"), r"\X\");
    }

    #[test]
    fn highlight_removed() {
        assert_eq!(
            d(r"\H\HIGHLIGHTED\N\TEXT\H\IMPORTANT\N\"),
            "HIGHLIGHTEDTEXTIMPORTANT"
        );
    }

    #[test]
    fn formatting_commands() {
        assert_eq!(d(r"line1\.br\line2"), "line1\nline2");
        assert_eq!(d(r"a\.sp\b"), "a\nb");
        assert_eq!(d(r"a\.sp 2\b"), "a\n\nb");
        assert_eq!(d(r"a\.sp+3\b"), "a\n\n\nb");
        assert_eq!(
            d(r"a\.sp 999999\b").matches('\n').count(),
            MAX_LAYOUT_REPEAT
        );
        assert_eq!(d(r"a\.sk 3\b"), "a   b");
        assert_eq!(d(r"a\.in +4\b\.ti -2\c\.fi\\.nf\"), "abc");
        assert_eq!(d(r"a\.ce\b"), "a\nb");
        assert_eq!(d(r"a\.xx\b"), r"a\.xx\b");
    }

    #[test]
    fn charset_switches_and_local_escapes() {
        assert_eq!(d(r"a\C2842\b\M2442\c\M244228\d"), "abcd");
        assert_eq!(d(r"a\Zfoo\b"), r"a\Zfoo\b");
    }

    #[test]
    fn unterminated_and_stray() {
        assert_eq!(d(r"abc\F"), r"abc\F");
        assert_eq!(d(r"abc\"), r"abc\");
        assert_eq!(d(r"\\"), r"\\");
        // A stray escape char does not swallow the real escape that follows.
        assert_eq!(d(r"C:\dir\F\x"), r"C:\dir|x");
        assert_eq!(d(r"\é\F\"), r"\é|");
    }

    #[test]
    fn no_escape_char_means_verbatim() {
        let seps = Separators {
            escape: None,
            ..Separators::default()
        };
        assert_eq!(decode_escapes(r"a\F\b", &seps, UTF_8), r"a\F\b");
    }

    #[test]
    fn custom_escape_char() {
        let seps = Separators::from_msh('!', "$r?@").unwrap();
        assert_eq!(decode_escapes("a?F?b?S?c", &seps, UTF_8), "a!b$c");
        assert_eq!(decode_escapes("ü?R?", &seps, UTF_8), "ür");
    }

    #[test]
    fn encode_round_trips_and_neutralises_controls() {
        let seps = Separators {
            truncation: Some('#'),
            ..Separators::default()
        };
        let text = "a|b^c&d~e\\f#g\rh\ni\u{0b}j\u{1c}ü";
        let enc = encode_escapes(text, &seps);
        assert_eq!(enc, r"a\F\b\S\c\T\d\R\e\E\f\P\g\X0D\h\X0A\i\X0B\j\X1C\ü");
        for delim in seps.all() {
            assert!(!enc.replace('\\', "").contains(delim), "{delim} leaked");
        }
        assert_eq!(decode_escapes(&enc, &seps, UTF_8), text);
        let none = Separators {
            escape: None,
            ..Separators::default()
        };
        assert_eq!(encode_escapes("a|b\rc", &none), "a b c");
    }
}
