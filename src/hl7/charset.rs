//! Bytes to UTF-8, driven by MSH-18.
//!
//! Why this runs before parsing: hl7-parser only accepts `&str`, while hospital senders emit
//! Latin-1, Windows-1252 and friends (and sometimes declare one thing and send another). The
//! charset lives *inside* the message (MSH-18), so we sniff it from the raw bytes first: every
//! HL7 charset we decode is ASCII-compatible for the MSH segment, so reading MSH byte-wise is
//! safe. UTF-16 (MSH-18 `UNICODE`) is the exception and is detected by BOM or by the NUL
//! pattern of `MSH` before sniffing.
//!
//! Decisions:
//! * `8859/1` decodes as Windows-1252 (the WHATWG/encoding_rs meaning of `iso-8859-1`): it is
//!   a superset for printable text, and senders that declare Latin-1 routinely send `€` or
//!   curly quotes from the 0x80..0x9F range.
//! * `ASCII` with only 7-bit bytes decodes as (and reports) UTF-8, its superset. With 8-bit
//!   bytes present the fallback is used if configured, else `CharsetError::NotAscii`.
//! * `UNICODE` / `UNICODE UTF-16` on bytes whose MSH was readable byte-wise means the sender
//!   did not really send UTF-16; such bytes are decoded as UTF-8.
//! * Bytes invalid in the declared charset are retried with the fallback when it differs
//!   ("senders that lie"); a `tracing` warning records it (names and offsets only).
//! * Unknown MSH-18 names use the fallback if configured, else `CharsetError::UnknownCharset`.
//! * No MSH-18: the fallback, else UTF-8.

use encoding_rs::{Encoding, UTF_8, UTF_16BE, UTF_16LE};

use super::error::{CharsetError, safe_token};

/// What MSH-18 asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Declared {
    Ascii,
    Utf16,
    Known(&'static Encoding),
    Unknown(String),
}

/// Maps an HL7 table 0211 charset name (or a WHATWG label such as `windows-1252`) to what we
/// decode it as. Case, spaces, `_` and `-` are ignored for the HL7 names.
pub(crate) fn lookup_charset(name: &str) -> Declared {
    use encoding_rs::*;
    let key: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '/')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let known = |e: &'static Encoding| Declared::Known(e);
    match key.as_str() {
        "ASCII" | "USASCII" | "ISOIR6" => Declared::Ascii,
        "8859/1" | "ISOIR100" | "ISO88591" | "LATIN1" => known(WINDOWS_1252),
        "8859/2" | "ISOIR101" | "ISO88592" => known(ISO_8859_2),
        "8859/3" | "ISOIR109" | "ISO88593" => known(ISO_8859_3),
        "8859/4" | "ISOIR110" | "ISO88594" => known(ISO_8859_4),
        "8859/5" | "ISOIR144" | "ISO88595" => known(ISO_8859_5),
        "8859/6" | "ISOIR127" | "ISO88596" => known(ISO_8859_6),
        "8859/7" | "ISOIR126" | "ISO88597" => known(ISO_8859_7),
        "8859/8" | "ISOIR138" | "ISO88598" => known(ISO_8859_8),
        "8859/9" | "ISOIR148" | "ISO88599" => known(WINDOWS_1254),
        "8859/10" => known(ISO_8859_10),
        "8859/11" => known(WINDOWS_874),
        "8859/13" => known(ISO_8859_13),
        "8859/14" => known(ISO_8859_14),
        "8859/15" | "ISO885915" => known(ISO_8859_15),
        "8859/16" => known(ISO_8859_16),
        "UNICODEUTF8" | "UTF8" => known(UTF_8),
        "UNICODE" | "UNICODEUTF16" | "UTF16" | "UCS2" => Declared::Utf16,
        "ISOIR14" | "ISOIR87" => known(ISO_2022_JP),
        "GB180302000" | "GB18030" => known(GB18030),
        "KSX1001" => known(EUC_KR),
        "BIG5" => known(BIG5),
        "CP1252" | "WINDOWS1252" => known(WINDOWS_1252),
        _ => match Encoding::for_label(name.trim().as_bytes()) {
            // `replacement` is WHATWG's "refuse to decode" encoding; UTF-16 labels would
            // contradict the byte-wise sniff that found the name.
            Some(e) if e != REPLACEMENT && e != UTF_16LE && e != UTF_16BE => known(e),
            _ => Declared::Unknown(name.trim().to_owned()),
        },
    }
}

/// Reads MSH-18 (first repetition, first component) from the raw bytes of one message.
/// Returns `None` when the bytes do not start with an MSH segment or MSH-18 is empty.
pub(crate) fn sniff_msh18(bytes: &[u8]) -> Option<String> {
    let start = bytes
        .iter()
        .position(|b| !(b.is_ascii_whitespace() || *b == 0x0B))?;
    let body = bytes.get(start..)?;
    if !body.starts_with(b"MSH") {
        return None;
    }
    let field_sep = *body.get(3)?;
    let line_end = body
        .iter()
        .position(|b| *b == b'\r' || *b == b'\n')
        .unwrap_or(body.len());
    let line = body.get(..line_end)?;
    // parts[0] = "MSH", parts[1] = MSH-2, parts[n - 1] = MSH-n.
    let mut parts = line.split(|b| *b == field_sep);
    let msh2 = parts.nth(1)?;
    let msh18 = parts.nth(15)?;
    let component = msh2.first().copied();
    let repetition = msh2.get(1).copied();
    let first = msh18
        .split(|b| Some(*b) == repetition)
        .next()?
        .split(|b| Some(*b) == component)
        .next()?;
    let name = String::from_utf8_lossy(first).trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// Decodes `bytes` as a whole in `enc`; on failure returns the byte offset of the first
/// malformed sequence.
fn decode_strict(enc: &'static Encoding, bytes: &[u8]) -> Result<String, usize> {
    if enc == UTF_8 {
        return std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| e.valid_up_to());
    }
    let mut decoder = enc.new_decoder_without_bom_handling();
    let Some(cap) = decoder.max_utf8_buffer_length_without_replacement(bytes.len()) else {
        return Err(0);
    };
    let mut out = String::with_capacity(cap);
    let (result, read) = decoder.decode_to_string_without_replacement(bytes, &mut out, true);
    match result {
        encoding_rs::DecoderResult::InputEmpty => Ok(out),
        encoding_rs::DecoderResult::Malformed(bad, after) => {
            Err(read.saturating_sub(usize::from(bad) + usize::from(after)))
        }
        encoding_rs::DecoderResult::OutputFull => Err(read),
    }
}

/// Decodes with `enc`, retrying with `fallback` when it differs ("senders that lie").
fn decode_with_retry(
    enc: &'static Encoding,
    fallback: Option<&'static Encoding>,
    bytes: &[u8],
) -> Result<(String, &'static Encoding), CharsetError> {
    match decode_strict(enc, bytes) {
        Ok(s) => Ok((s, enc)),
        Err(offset) => match fallback {
            Some(fb) if fb != enc => match decode_strict(fb, bytes) {
                Ok(s) => {
                    tracing::warn!(
                        declared = enc.name(),
                        used = fb.name(),
                        offset,
                        "message bytes invalid in declared charset; decoded with fallback"
                    );
                    Ok((s, fb))
                }
                Err(_) => Err(CharsetError::Malformed {
                    encoding: enc.name(),
                    offset,
                    retried: Some(fb.name()),
                }),
            },
            _ => Err(CharsetError::Malformed {
                encoding: enc.name(),
                offset,
                retried: None,
            }),
        },
    }
}

/// Bytes of one (unframed) message to UTF-8 text, honouring MSH-18. See the module docs for
/// the decisions. Returns the text (without BOM) and the encoding actually used, which is
/// what `decode_escapes` needs for `\Xhh\` sequences.
pub fn decode_to_utf8(
    bytes: &[u8],
    fallback: Option<&'static Encoding>,
) -> Result<(String, &'static Encoding), CharsetError> {
    // UTF-16, by BOM or by the NUL pattern of "MSH".
    let utf16 = if bytes.starts_with(&[0xFF, 0xFE]) {
        Some((UTF_16LE, 2))
    } else if bytes.starts_with(&[0xFE, 0xFF]) {
        Some((UTF_16BE, 2))
    } else if bytes.starts_with(b"M\0S\0H\0") {
        Some((UTF_16LE, 0))
    } else if bytes.starts_with(b"\0M\0S\0H") {
        Some((UTF_16BE, 0))
    } else {
        None
    };
    if let Some((enc, skip)) = utf16 {
        let body = bytes.get(skip..).unwrap_or_default();
        let (text, used) = decode_with_retry(enc, None, body)?;
        return Ok((strip_bom(text), used));
    }

    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let (text, used) = match sniff_msh18(body).map(|n| (lookup_charset(&n), n)) {
        None => decode_with_retry(fallback.unwrap_or(UTF_8), None, body)?,
        Some((Declared::Known(enc), _)) => decode_with_retry(enc, fallback, body)?,
        Some((Declared::Utf16, _)) => decode_with_retry(UTF_8, fallback, body)?,
        Some((Declared::Ascii, _)) => match body.iter().position(|b| !b.is_ascii()) {
            None => decode_with_retry(UTF_8, None, body)?,
            Some(offset) => match fallback {
                Some(fb) => {
                    tracing::warn!(
                        used = fb.name(),
                        offset,
                        "MSH-18 declares ASCII but 8-bit bytes are present; decoded with fallback"
                    );
                    decode_with_retry(fb, None, body)?
                }
                None => {
                    return Err(CharsetError::NotAscii {
                        offset: offset + (bytes.len() - body.len()),
                        byte: body.get(offset).copied().unwrap_or_default(),
                    });
                }
            },
        },
        Some((Declared::Unknown(_), name)) => match fallback {
            Some(fb) => {
                tracing::warn!(
                    declared = %safe_token(&name),
                    used = fb.name(),
                    "unknown MSH-18 charset; decoded with fallback"
                );
                decode_with_retry(fb, None, body)?
            }
            None => {
                return Err(CharsetError::UnknownCharset {
                    name: safe_token(&name),
                });
            }
        },
    };
    Ok((strip_bom(text), used))
}

/// Encodes text (an ACK) in the sender's character set: the encoding `decode_to_utf8` used for
/// its message. UTF-16 is written as UTF-16 (no BOM; encoding_rs would write UTF-8 there), and a
/// character the charset cannot represent becomes `?` (never an HTML entity, which is what
/// encoding_rs substitutes by default).
pub fn encode_from_utf8(text: &str, encoding: &'static Encoding) -> Vec<u8> {
    if encoding == UTF_16LE || encoding == UTF_16BE {
        let le = encoding == UTF_16LE;
        return text
            .encode_utf16()
            .flat_map(|u| if le { u.to_le_bytes() } else { u.to_be_bytes() })
            .collect();
    }
    let encoding = encoding.output_encoding();
    if encoding == UTF_8 {
        return text.as_bytes().to_vec();
    }
    let mut encoder = encoding.new_encoder();
    let mut out = Vec::with_capacity(text.len() + 16);
    let mut rest = text;
    let mut buf = [0u8; 1024];
    loop {
        let (result, read, written) =
            encoder.encode_from_utf8_without_replacement(rest, &mut buf, true);
        out.extend_from_slice(buf.get(..written).unwrap_or_default());
        rest = rest.get(read..).unwrap_or_default();
        match result {
            encoding_rs::EncoderResult::InputEmpty => return out,
            encoding_rs::EncoderResult::OutputFull => {}
            encoding_rs::EncoderResult::Unmappable(_) => out.push(b'?'),
        }
    }
}

fn strip_bom(text: String) -> String {
    match text.strip_prefix('\u{FEFF}') {
        Some(rest) => rest.to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::{ISO_8859_2, WINDOWS_1252};

    fn msg(charset: &str, pid_name: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "MSH|^~\\&|APP|FAC|RAPP|RFAC|20240101120000||ADT^A01|CTRL1|P|2.5||||||{charset}\rPID|1||123||"
        )
        .into_bytes();
        v.extend_from_slice(pid_name);
        v.extend_from_slice(b"^JOHN\r");
        v
    }

    #[test]
    fn encode_back_in_the_senders_charset() {
        use encoding_rs::UTF_16LE;
        assert_eq!(
            encode_from_utf8("MÜLLER €", WINDOWS_1252),
            b"M\xDCLLER \x80"
        );
        assert_eq!(encode_from_utf8("Łódź", ISO_8859_2), b"\xA3\xF3d\xBC");
        assert_eq!(encode_from_utf8("a日b", WINDOWS_1252), b"a?b");
        assert_eq!(encode_from_utf8("MSH", UTF_16LE), b"M\0S\0H\0");
        assert_eq!(encode_from_utf8("Zoë", UTF_8), "Zoë".as_bytes());
        let long = "é".repeat(5000);
        assert_eq!(encode_from_utf8(&long, WINDOWS_1252), vec![0xE9; 5000]);
    }

    #[test]
    fn latin1_declared_8859_1() {
        let bytes = msg("8859/1", b"M\xDCLLER");
        let (text, enc) = decode_to_utf8(&bytes, None).unwrap();
        assert!(text.contains("MÜLLER^JOHN"));
        assert_eq!(enc, WINDOWS_1252);
    }

    #[test]
    fn latin2_declared() {
        let bytes = msg("8859/2", b"\xA3\xF3d\xBC");
        let (text, enc) = decode_to_utf8(&bytes, None).unwrap();
        assert!(text.contains("Łódź"));
        assert_eq!(enc, ISO_8859_2);
    }

    #[test]
    fn utf8_declared_but_sender_lies_windows_1252_fallback() {
        // Declares UTF-8, sends 0xE9 (é in Windows-1252) and 0x80 (€).
        let bytes = msg("UNICODE UTF-8", b"Ren\xE9e \x80");
        assert!(matches!(
            decode_to_utf8(&bytes, None),
            Err(CharsetError::Malformed { retried: None, .. })
        ));
        let (text, enc) = decode_to_utf8(&bytes, Some(WINDOWS_1252)).unwrap();
        assert!(text.contains("Renée €^JOHN"));
        assert_eq!(enc, WINDOWS_1252);
        // Same fallback as declared: no retry, error names the offset.
        match decode_to_utf8(&bytes, Some(UTF_8)) {
            Err(CharsetError::Malformed { offset, .. }) => assert_eq!(bytes[offset], 0xE9),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn no_msh18_uses_fallback_then_utf8() {
        let bytes = msg("", "Zoë".as_bytes());
        let (text, enc) = decode_to_utf8(&bytes, None).unwrap();
        assert!(text.contains("Zoë"));
        assert_eq!(enc, UTF_8);
        let bytes = msg("", b"Zo\xEB");
        let (text, enc) = decode_to_utf8(&bytes, Some(WINDOWS_1252)).unwrap();
        assert!(text.contains("Zoë"));
        assert_eq!(enc, WINDOWS_1252);
        assert!(decode_to_utf8(&bytes, None).is_err());
    }

    #[test]
    fn ascii_declared() {
        let (text, enc) = decode_to_utf8(&msg("ASCII", b"SMITH"), None).unwrap();
        assert!(text.contains("SMITH"));
        assert_eq!(enc, UTF_8);
        let bad = msg("ASCII", b"SM\xC9TH");
        match decode_to_utf8(&bad, None) {
            Err(CharsetError::NotAscii { offset, byte }) => {
                assert_eq!(byte, 0xC9);
                assert_eq!(bad[offset], 0xC9);
            }
            other => panic!("unexpected {other:?}"),
        }
        let (text, _) = decode_to_utf8(&bad, Some(WINDOWS_1252)).unwrap();
        assert!(text.contains("SMÉTH"));
    }

    #[test]
    fn bom_is_stripped() {
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend(msg("UNICODE UTF-8", "Zoë".as_bytes()));
        let (text, enc) = decode_to_utf8(&bytes, None).unwrap();
        assert!(text.starts_with("MSH|"));
        assert_eq!(enc, UTF_8);
    }

    #[test]
    fn utf16_with_bom() {
        let text = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||UNICODE\rPID|1||||Zoë\r";
        let mut bytes = vec![0xFF, 0xFE];
        for u in text.encode_utf16() {
            bytes.extend(u.to_le_bytes());
        }
        let (decoded, enc) = decode_to_utf8(&bytes, None).unwrap();
        assert_eq!(decoded, text);
        assert_eq!(enc, UTF_16LE);
    }

    #[test]
    fn unicode_declared_on_byte_wise_msh_means_utf8() {
        let (text, enc) = decode_to_utf8(&msg("UNICODE", "Zoë".as_bytes()), None).unwrap();
        assert!(text.contains("Zoë"));
        assert_eq!(enc, UTF_8);
    }

    #[test]
    fn unknown_charset() {
        let bytes = msg("KLINGON-8", b"X");
        assert_eq!(
            decode_to_utf8(&bytes, None),
            Err(CharsetError::UnknownCharset {
                name: "KLINGON-8".to_owned()
            })
        );
        assert!(decode_to_utf8(&bytes, Some(WINDOWS_1252)).is_ok());
    }

    #[test]
    fn charset_names() {
        assert_eq!(
            lookup_charset("8859/15"),
            Declared::Known(encoding_rs::ISO_8859_15)
        );
        assert_eq!(lookup_charset(" unicode utf-8 "), Declared::Known(UTF_8));
        assert_eq!(
            lookup_charset("windows-1252"),
            Declared::Known(WINDOWS_1252)
        );
        assert_eq!(lookup_charset("CP1252"), Declared::Known(WINDOWS_1252));
        assert_eq!(lookup_charset("ISO_IR 100"), Declared::Known(WINDOWS_1252));
        assert_eq!(lookup_charset("ASCII"), Declared::Ascii);
        assert_eq!(lookup_charset("UNICODE"), Declared::Utf16);
        assert!(matches!(
            lookup_charset("UNICODE UTF-32"),
            Declared::Unknown(_)
        ));
    }

    #[test]
    fn sniff_handles_repetition_and_oddities() {
        assert_eq!(
            sniff_msh18(b"MSH|^~\\&||||||||||||||||8859/1~UNICODE UTF-8\r").as_deref(),
            Some("8859/1")
        );
        assert_eq!(
            sniff_msh18(b"\x0bMSH|^~\\&#||||||||||||||||ASCII").as_deref(),
            Some("ASCII")
        );
        assert_eq!(
            sniff_msh18(b"MSH|^~\\&|a\rPID|||||||||||||||||8859/1"),
            None
        );
        assert_eq!(sniff_msh18(b"PID|"), None);
        assert_eq!(sniff_msh18(b"MSH"), None);
        assert_eq!(sniff_msh18(b""), None);
    }
}
