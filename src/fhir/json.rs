//! Compact JSON output of a Bundle: the bytes stored, signed over (via JCS) and forwarded.
//!
//! `serde_json::to_vec` escapes strings byte by byte through its formatter (about 11
//! instructions per byte, a tenth of mapping a message to JSON); here runs that need no escape
//! are copied whole. The output is byte for byte serde_json's (tested), so nothing downstream
//! can tell the difference.

use std::borrow::Cow;

use super::tree::Json;

/// `value` as compact JSON, exactly as `serde_json::to_vec` writes the same value.
pub fn to_vec(value: &Json) -> Vec<u8> {
    // A 1.5 KB ADT^A01 makes a ~30 KB Bundle. Growing a smaller buffer copied it once more
    // (~2% of parsing, mapping and writing such a message); the buffer lives only until the
    // Bundle is stored.
    let mut out = Vec::with_capacity(64 * 1024);
    write_value(value, &mut out);
    out
}

fn write_value(v: &Json, out: &mut Vec<u8>) {
    match v {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(true) => out.extend_from_slice(b"true"),
        Json::Bool(false) => out.extend_from_slice(b"false"),
        // With `arbitrary_precision` a number keeps the text it was made from (`1.50`).
        Json::Num(n) => out.extend_from_slice(n.as_str().as_bytes()),
        Json::Str(s) => write_string(s, out),
        Json::Arr(a) => {
            out.push(b'[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_member(item, out);
            }
            out.push(b']');
        }
        Json::Obj(m) => {
            out.push(b'{');
            for (i, (k, item)) in m.members().iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match k {
                    // A name from the FHIR catalogue or from hl7-edge's own code (`'static`, so
                    // never from input): letters only, nothing to escape.
                    Cow::Borrowed(name) => {
                        debug_assert!(!needs_escaping(name.as_bytes()), "{name:?}");
                        out.reserve(name.len() + 3);
                        out.push(b'"');
                        out.extend_from_slice(name.as_bytes());
                        out.extend_from_slice(b"\":");
                    }
                    Cow::Owned(name) => {
                        write_string(name, out);
                        out.push(b':');
                    }
                }
                write_member(item, out);
            }
            out.push(b'}');
        }
    }
}

/// A member of an object or a list: most are strings, written without a second dispatch on
/// the value's kind.
fn write_member(v: &Json, out: &mut Vec<u8>) {
    match v {
        Json::Str(s) => write_string(s, out),
        other => write_value(other, out),
    }
}

/// JSON.stringify string serialisation: only `"`, `\`, and C0 controls are escaped; everything
/// else (including U+007F, U+2028 and non-ASCII) is written as UTF-8.
///
/// Nearly every string of a Bundle has nothing to escape, so the string is first tested eight
/// bytes at a time and then copied in one piece. The test is by byte: bytes of a multi-byte
/// UTF-8 character are all >= 0x80, so they never match.
pub fn write_string(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if needs_escaping(bytes) {
        write_escaped(bytes, out);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// Whether any byte of `bytes` must be escaped. Words are tested without a branch each (the
/// flags are OR-ed together), since nearly every string of a Bundle has nothing to escape.
fn needs_escaping(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let mut flags = 0u64;
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        flags |= escape_flags(u64::from_le_bytes(w));
    }
    flags != 0
        || words
            .remainder()
            .iter()
            .any(|b| ESCAPE[usize::from(*b)] != 0)
}

/// The string body of `bytes`, some of which need escaping: runs between escapes are copied
/// whole.
fn write_escaped(bytes: &[u8], out: &mut Vec<u8>) {
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let class = ESCAPE[usize::from(*b)];
        if class == 0 {
            continue;
        }
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        if class == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xF)]);
        } else {
            out.extend_from_slice(&[b'\\', class]);
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
}

/// Per byte: 0 when written as is, else the letter after the backslash (`u` for `\\u00XX`).
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = b'u';
        b += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0A] = b'n';
    t[0x0C] = b'f';
    t[0x0D] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Nonzero exactly when some byte of `w` is a C0 control, `"` or `\` (the classic "has a byte
/// less than n" and "has a zero byte" word tricks).
fn escape_flags(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q & HIGH;
    let b = w ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b & HIGH;
    below_space | quote | backslash
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        // serde_json escapes exactly JSON.stringify's set, so the two must agree byte for byte,
        // whatever mix of plain runs, escapes and multi-byte characters a string holds.
        let samples = [
            "",
            "plain text",
            "\"quoted\"",
            "back\\slash at the end\\",
            "Zoë \u{1}\u{1f}\u{7f} ü\n\ttab",
            "\u{0}",
            "日本語\r\n",
            "exactly8",
            "0123456\"",
            "abcdefgh\\ijklmnop\u{1f}qrstuvwxyz0123456789\"",
            "~~~~~~~~\u{7f}\u{7f}\u{7f}\u{7f}\u{7f}\u{7f}\u{7f}\u{7f}!!!!!!!!####$$$$",
        ];
        for s in samples {
            let mut out = Vec::new();
            write_string(s, &mut out);
            assert_eq!(
                String::from_utf8(out).expect("utf-8"),
                serde_json::to_string(s).expect("json"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn every_ascii_character_at_every_position_of_short_and_long_strings_is_escaped_as_serde_json_does()
     {
        // Word scan, the table scan after a flagged word and the tail scan each see the character.
        for len in 1..=19 {
            for pos in 0..len {
                for c in (0u8..0x80).map(char::from).chain(['é', '\u{2028}']) {
                    let s: String = (0..len).map(|k| if k == pos { c } else { 'a' }).collect();
                    let mut out = Vec::new();
                    write_string(&s, &mut out);
                    assert_eq!(
                        String::from_utf8(out).expect("utf-8"),
                        serde_json::to_string(&s).expect("json"),
                        "{s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_byte_value_in_every_word_position_is_classified_exactly() {
        for b in 0u8..=255 {
            for pos in 0..8 {
                let mut w = [b'a'; 8];
                w[pos] = b;
                let want = b < 0x20 || b == b'"' || b == b'\\';
                assert_eq!(
                    escape_flags(u64::from_le_bytes(w)) != 0,
                    want,
                    "{b:#x} at {pos}"
                );
            }
        }
    }

    #[test]
    fn whole_bundles_match_serde_json() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/tests");
        let mut seen = 0;
        for sub in std::fs::read_dir(&dir).expect("mappings/tests") {
            let Ok(sub) = sub else { continue };
            let Ok(files) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                if f.path().extension().is_some_and(|e| e == "json") {
                    let text = std::fs::read_to_string(f.path()).expect("golden");
                    let v: Value = serde_json::from_str(&text).expect("golden json");
                    assert_eq!(
                        to_vec(&Json::from(v.clone())),
                        serde_json::to_vec(&v).expect("json"),
                        "{}",
                        f.path().display()
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen > 20, "only {seen} golden Bundles found");
        let odd = serde_json::json!({ "n": [1, -2, 1.5, null, true, false], "e": {}, "a": [], "s": "x\u{1}\"y" });
        assert_eq!(
            to_vec(&Json::from(odd.clone())),
            serde_json::to_vec(&odd).expect("json")
        );
    }
}
