//! Cross-module tests: one per hl7-parser defect the wrapper neutralises, path look-ups, the
//! shared corpus, and a no-panic loop over mangled inputs.

use encoding_rs::{UTF_8, WINDOWS_1252};

use super::*;

const MSH: &str = "MSH|^~\\&|APP|FAC|RAPP|RFAC|20240101120000||ADT^A01^ADT_A01|CTRL1|P|2.5.1";

fn msg(body: &str) -> String {
    format!("{MSH}\r{body}")
}

// ---- defect 1: non-ASCII before an escape must not panic -------------------------------

#[test]
fn defect1_non_ascii_then_escape() {
    let m = parse(&msg("PID|1||1||Müller\\S\\Zoë^Renée\\T\\x\\F\\y")).unwrap();
    assert_eq!(m.get("PID-5.1").as_deref(), Some("Müller^Zoë"));
    assert_eq!(m.get("PID-5.2").as_deref(), Some("Renée&x|y"));
    // The hl7-parser tree would split subcomponents of the raw value, we do too; the escaped
    // `\T\` is not a split point.
    assert_eq!(m.get("PID-5.2.1").as_deref(), Some("Renée&x|y"));
}

#[test]
fn escapes_are_noticed_anywhere_but_in_msh2() {
    assert!(!parse(&msg("PID|1||1||Smith^John")).unwrap().has_escapes());
    assert!(
        parse(&msg("PID|1||1||Smith\\T\\Jones"))
            .unwrap()
            .has_escapes()
    );
    // In MSH itself, after the encoding characters.
    let m = parse("MSH|^~\\&|A\\F\\B|FAC|R|F|T||ADT^A01|1|P|2.5").unwrap();
    assert!(m.has_escapes());
    assert!(m.segments()[0].has_escapes());
    // Per segment: only the one that has it.
    let m = parse(&msg("PID|1||1||Smith^John\rNTE|1||A\\T\\E\rNTE|2||plain")).unwrap();
    let flags: Vec<bool> = m.segments().iter().map(|s| s.has_escapes()).collect();
    assert_eq!(flags, [false, false, true, false]);
}

// ---- defect 2: \X..\, \H\, \N\ ----------------------------------------------------------

#[test]
fn defect2_hex_and_highlight() {
    let m = parse(&msg("NTE|1||\\X41\\BC \\H\\bold\\N\\ plain\\.br\\next")).unwrap();
    assert_eq!(m.get("NTE-3").as_deref(), Some("ABC bold plain\nnext"));
    // \X..\ is decoded in the message charset: Latin-1 declared.
    let latin =
        parse("MSH|^~\\&|A|B|C|D|T||ADT^A01|1|P|2.5||||||8859/1\rNTE|1||caf\\XE9\\").unwrap();
    assert_eq!(latin.encoding(), WINDOWS_1252);
    assert_eq!(latin.get("NTE-3").as_deref(), Some("café"));
    // Same bytes under UTF-8 are invalid: kept literally.
    let utf = latin.clone().with_encoding(UTF_8);
    assert_eq!(utf.get("NTE-3").as_deref(), Some("caf\\XE9\\"));
}

// ---- defect 3: blank segments, field-less segments, \r\n -------------------------------

#[test]
fn defect3_blank_segment_in_the_middle() {
    let m = parse(&msg("EVN|A01\r\rPID|1||123\r\n\r\nPV1|1|I\r")).unwrap();
    let names: Vec<&str> = m.segments().iter().map(Segment::name).collect();
    assert_eq!(names, ["MSH", "EVN", "PID", "PV1"]);
    assert_eq!(m.get("PV1-2").as_deref(), Some("I"));
}

#[test]
fn defect3_fieldless_segment() {
    let m = parse(&msg("EVN|A01\rZZZ\rPID|1||123")).unwrap();
    let names: Vec<&str> = m.segments().iter().map(Segment::name).collect();
    assert_eq!(names, ["MSH", "EVN", "ZZZ", "PID"]);
    let zzz = m.segments_named("ZZZ").next().unwrap();
    assert_eq!(zzz.field_count(), 0);
    assert_eq!(zzz.field_raw(1), None);
    assert_eq!(m.get("PID-3").as_deref(), Some("123"));
}

#[test]
fn defect3_strict_crlf_and_lf() {
    for sep in ["\r\n", "\n", "\r"] {
        let text = [MSH, "EVN|A01", "PID|1||123", "PV1|1|O"].join(sep) + sep;
        let m = parse(&text).unwrap();
        assert_eq!(m.segments().len(), 4, "{sep:?}");
        assert_eq!(m.get("PV1-2").as_deref(), Some("O"));
        assert_eq!(m.get("PID-3").as_deref(), Some("123"));
        // No stray CR left in any field.
        assert!(m.segments().iter().all(|s| {
            (1..=s.field_count()).all(|n| !s.field_raw(n).unwrap_or("").contains(['\r', '\n']))
        }));
    }
}

#[test]
fn defect3_never_silently_truncated() {
    // hl7-parser alone stops at these; we must either parse all segments or fail loudly.
    let inputs = [
        msg("PID|1\r\rOBX|1"),
        msg("PID|1\rNTE\rOBX|1"),
        msg("PID|1\r\n\r\nOBX|1"),
        msg("PID|1\rbad line\rOBX|1"),
        msg("PID|1\rPÏD|2\rOBX|1"),
    ];
    for text in &inputs {
        match parse(text) {
            Ok(m) => assert_eq!(
                m.segments().last().map(Segment::name),
                Some("OBX"),
                "{text:?}"
            ),
            Err(e) => assert!(e.to_string().contains("segment 3"), "{e}"),
        }
    }
}

// ---- defect 4: MSH-2 with the truncation character -------------------------------------

#[test]
fn defect4_truncation_character() {
    let text = "MSH|^~\\&#|SEND APP|SEND FAC|REC APP|REC FAC|20110708163514||RSP^K22^RSP_K21|1234|D|2.7\rNTE|1||50\\P\\ off";
    let m = parse(text).unwrap();
    assert_eq!(m.separators().truncation, Some('#'));
    assert_eq!(m.separators().escape, Some('\\'));
    assert_eq!(m.get("MSH-2").as_deref(), Some("^~\\&#"));
    assert_eq!(m.get("MSH-3").as_deref(), Some("SEND APP"));
    assert_eq!(m.get("MSH-9.2").as_deref(), Some("K22"));
    assert_eq!(m.header().control_id, "1234");
    assert_eq!(m.header().version, "2.7");
    assert_eq!(m.get("NTE-3").as_deref(), Some("50# off"));
    // The ACK echoes all five encoding characters.
    let ack = build_ack(
        m.header(),
        m.separators(),
        AckCode::AA,
        &[],
        "A",
        "20261125101500+0000",
    );
    assert!(ack.starts_with("MSH|^~\\&#|REC APP|REC FAC|SEND APP|SEND FAC|"));
}

#[test]
fn msh2_bad_lengths_are_errors() {
    for text in [
        "MSH|^~\\||||||||||2.7",
        "MSH|^~\\&#$||||||||||2.7",
        "MSH|^&&^|A|B|C|D|T||ADT^A01|1|P|2.6",
    ] {
        match parse(text) {
            Err(ParseError::BadEncodingCharacters { .. }) => {}
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

// ---- defect 5 + charset: bytes in, text out -----------------------------------------------

#[test]
fn latin1_bytes_end_to_end() {
    let mut bytes =
        b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.4||||||8859/1\rPID|1||9||M\xFCller^J\xF6rg\r"
            .to_vec();
    bytes.extend_from_slice(b"NTE|1||\\XE9\\t\xE9\r");
    let (text, enc) = decode_to_utf8(&bytes, None).unwrap();
    let m = parse(&text).unwrap().with_encoding(enc);
    assert_eq!(m.get("PID-5.1").as_deref(), Some("Müller"));
    assert_eq!(m.get("PID-5.2").as_deref(), Some("Jörg"));
    assert_eq!(m.get("NTE-3").as_deref(), Some("été"));
    assert_eq!(m.header().charset.as_deref(), Some("8859/1"));
}

#[test]
fn lying_sender_windows_1252_fallback_end_to_end() {
    let bytes =
        b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|1||9||O\x92Brien\r";
    assert!(decode_to_utf8(bytes, None).is_err());
    let (text, enc) = decode_to_utf8(bytes, Some(WINDOWS_1252)).unwrap();
    assert_eq!(enc, WINDOWS_1252);
    let m = parse(&text).unwrap();
    assert_eq!(m.get("PID-5").as_deref(), Some("O\u{2019}Brien"));
}

#[test]
fn bom_bytes_and_bom_text() {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(msg("PID|1||9||Zoë").as_bytes());
    let (text, _) = decode_to_utf8(&bytes, None).unwrap();
    assert!(text.starts_with("MSH"));
    // parse also tolerates a BOM left in text, and MLLP framing.
    let framed = format!("\u{FEFF}\u{0B}{}\r\u{1C}\r", msg("PID|1||9||Zoë"));
    let m = parse(&framed).unwrap();
    assert_eq!(m.get("PID-5").as_deref(), Some("Zoë"));
    assert_eq!(m.segments().len(), 2);
}

// ---- paths ------------------------------------------------------------------------------

#[test]
fn path_lookups() {
    let m = parse(&msg(
        "PID|1||111^^^HOSP&1.2.3&ISO^MR~222^^^NHS^NH~||DOE^JOHN^Q~\"\"^ALIAS||19800101\rOBX|1|ST|A||first\rOBX|2|ST|B||sec\\S\\ond",
    ))
    .unwrap();
    // MSH numbering: MSH-1 is the separator, MSH-2 the encoding characters.
    assert_eq!(m.get("MSH-1").as_deref(), Some("|"));
    assert_eq!(m.get("MSH-2").as_deref(), Some("^~\\&"));
    assert_eq!(m.get("MSH-3").as_deref(), Some("APP"));
    assert_eq!(m.get("MSH-9").as_deref(), Some("ADT^A01^ADT_A01"));
    assert_eq!(m.get("MSH-9.2").as_deref(), Some("A01"));
    assert_eq!(m.get("MSH-12").as_deref(), Some("2.5.1"));
    let msh = &m.segments()[0];
    assert_eq!(msh.field_raw(1), Some("|"));
    assert_eq!(msh.field_raw(2), Some("^~\\&"));
    assert_eq!(msh.field_raw(10), Some("CTRL1"));
    assert_eq!(msh.field_count(), 12);
    // Repetitions, components, subcomponents.
    assert_eq!(m.get("PID-3").as_deref(), Some("111^^^HOSP&1.2.3&ISO^MR"));
    assert_eq!(m.get("PID-3.1").as_deref(), Some("111"));
    assert_eq!(m.get("PID-3[2].1").as_deref(), Some("222"));
    assert_eq!(m.get("PID-3[2].4").as_deref(), Some("NHS"));
    assert_eq!(m.get("PID-3.4.2").as_deref(), Some("1.2.3"));
    assert_eq!(m.get("PID-3.4.3").as_deref(), Some("ISO"));
    assert_eq!(m.get("PID-3.4").as_deref(), Some("HOSP&1.2.3&ISO"));
    assert_eq!(m.get("PID-3.2"), None); // empty
    assert_eq!(m.get("PID-3[3]"), None); // empty trailing repetition
    assert_eq!(m.get("PID-3[4]"), None); // absent
    assert_eq!(m.get("PID-3.4.4"), None);
    assert_eq!(m.get("PID-99"), None);
    assert_eq!(m.get("ZZZ-1"), None);
    assert_eq!(m.get("not a path"), None);
    // HL7 null.
    assert_eq!(m.get("PID-5[2].1"), None);
    assert!(m.is_null("PID-5[2].1"));
    assert_eq!(m.get_raw("PID-5[2].1"), Some("\"\""));
    // Segment occurrences and decoding.
    assert_eq!(m.get("OBX-5").as_deref(), Some("first"));
    assert_eq!(m.get("OBX[2]-5").as_deref(), Some("sec^ond"));
    assert_eq!(m.get_raw("OBX[2]-5"), Some("sec\\S\\ond"));
    assert_eq!(m.get("OBX[3]-5"), None);
    // Segment accessors.
    let pid = m.segments_named("PID").next().unwrap();
    let reps = pid.repetitions(3);
    assert_eq!(reps, ["111^^^HOSP&1.2.3&ISO^MR", "222^^^NHS^NH", ""]);
    assert_eq!(pid.component(m.separators(), reps[0], 4, 2), Some("1.2.3"));
    assert_eq!(pid.component(m.separators(), reps[1], 5, 0), Some("NH"));
    assert!(pid.repetitions(2).is_empty());
    assert!(pid.repetitions(50).is_empty());
    assert_eq!(m.segments_named("OBX").count(), 2);
}

#[test]
fn custom_separators_paths() {
    let m = parse(
        "MSH!$r?@!LIP!LIP!LB!LB!20111207121030!!RSP$SLI$RSP_K11!430102!D!2.5\rPID!1!!a$b@crd?F?e",
    )
    .unwrap();
    assert_eq!(m.get("MSH-9.2").as_deref(), Some("SLI"));
    assert_eq!(m.get("PID-3.2.2").as_deref(), Some("c"));
    assert_eq!(m.get("PID-3[2]").as_deref(), Some("d!e"));
}

// ---- corpus -----------------------------------------------------------------------------

/// Every corpus file: decode (Windows-1252 fallback) and parse must not panic; a parsed
/// message must account for every non-blank line; a refused one must still yield an ACK.
#[test]
fn corpus_no_panics_and_no_silent_truncation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        eprintln!("corpus not found at {}; skipping", root.display());
        return;
    };
    let mut files = Vec::new();
    for d in dirs.flatten() {
        for sub in ["messages", "fragments"] {
            if let Ok(rd) = std::fs::read_dir(d.path().join(sub)) {
                files.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    assert!(files.len() > 100, "corpus too small: {}", files.len());
    let (mut ok, mut refused) = (0, 0);
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let text = match decode_to_utf8(&bytes, Some(WINDOWS_1252)) {
            Ok((t, _)) => t,
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        match parse(&text) {
            Ok(m) => {
                ok += 1;
                let lines = text
                    .trim_start_matches('\u{FEFF}')
                    .split(['\r', '\n'])
                    .filter(|l| {
                        !l.trim().is_empty() && !l.trim_matches(['\u{0B}', '\u{1C}']).is_empty()
                    })
                    .count();
                assert_eq!(m.segments().len(), lines, "{}", path.display());
            }
            Err(e) => {
                refused += 1;
                let (h, seps) = sniff_header(&text);
                let ack = build_ack(
                    &h,
                    &seps,
                    AckCode::AR,
                    &[e.to_ack_error()],
                    "X",
                    "20240101000000+0000",
                );
                assert!(
                    parse(&ack).is_ok(),
                    "{}: ACK does not parse: {ack:?}",
                    path.display()
                );
            }
        }
    }
    assert!(
        ok > 100,
        "only {ok} corpus messages parsed ({refused} refused)"
    );
}

/// hl7-parser is the reference for the structural split: on every corpus message both must
/// agree on every segment name and every field's raw text. (Messages that hit hl7-parser's
/// known defects, listed in `mod.rs`, are left out: a 5-character MSH-2, field-less segments,
/// and lines not ended by a lone `\r`.)
#[test]
fn split_agrees_with_hl7_parser_on_the_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        eprintln!("corpus not found at {}; skipping", root.display());
        return;
    };
    let mut compared = 0;
    let mut fields_compared = 0;
    for d in dirs.flatten() {
        let Ok(rd) = std::fs::read_dir(d.path().join("messages")) else {
            continue;
        };
        for path in rd.flatten().map(|e| e.path()) {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok((text, _)) = decode_to_utf8(&bytes, Some(WINDOWS_1252)) else {
                continue;
            };
            let Ok(ours) = parse(&text) else { continue };
            if ours.separators().truncation.is_some()
                || ours.segments().iter().any(|s| s.field_count() == 0)
            {
                continue;
            }
            let lines: Vec<String> = ours
                .segments()
                .iter()
                .map(|s| {
                    // Rebuilt from our fields: MSH-1 and MSH-2 are written as they are (the
                    // field separator and the encoding characters), every other field after a
                    // field separator.
                    let mut line = s.name().to_owned();
                    for n in 1..=s.field_count() {
                        if !(s.name() == "MSH" && n <= 2) {
                            line.push(ours.separators().field);
                        }
                        line.push_str(s.field_raw(n).unwrap_or_default());
                    }
                    line
                })
                .collect();
            let joined = lines.join("\r");
            let Ok(theirs) = hl7_parser::parse_message(&joined) else {
                panic!("{}: hl7-parser refused what we parsed", path.display());
            };
            assert_eq!(
                theirs.segments.len(),
                ours.segments().len(),
                "{}",
                path.display()
            );
            for (t, o) in theirs.segments.iter().zip(ours.segments()) {
                assert_eq!(t.name, o.name(), "{}", path.display());
                let theirs_fields: Vec<&str> = t.fields.iter().map(|f| f.raw_value()).collect();
                let ours_fields: Vec<&str> = (1..=o.field_count())
                    .filter_map(|n| o.field_raw(n))
                    .collect();
                assert_eq!(
                    theirs_fields,
                    ours_fields,
                    "{} {}",
                    path.display(),
                    o.name()
                );
                fields_compared += ours_fields.len();
            }
            compared += 1;
        }
    }
    assert!(compared > 100, "only {compared} corpus messages compared");
    eprintln!("split agrees with hl7-parser: {compared} messages, {fields_compared} fields");
}

#[test]
fn corpus_truncation_sample() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/corpus/hl7apy/messages/test_parser__L0055.hl7");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let m = parse(&text).unwrap();
    assert_eq!(m.get("MSH-3").as_deref(), Some("SEND APP"));
    assert_eq!(m.header().version, "2.7");
    assert_eq!(m.get("MSA-1").as_deref(), Some("AA"));
}

// ---- fuzz-ish -----------------------------------------------------------------------------

/// Tiny deterministic PRNG (xorshift) so the loop is reproducible without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
    }
}

#[test]
fn fuzzish_no_panics() {
    let seeds: Vec<Vec<u8>> = vec![
        msg("PID|1||1^^^H&1.2&ISO^MR~2||Müller\\S\\Zoë\\X41\\\\H\\x\\N\\||\\.sp 3\\\\Zab\\\\C2842\\").into_bytes(),
        b"MSH|^~\\&#|A|B|C|D|T||ADT^A01|1|P|2.7||||||8859/1\r\nPID|1||\xE9\xFC\r\n\r\nNTE\r\nOBX|1|\\X\\".to_vec(),
        "MSH!$r?@!A!B!!!T!!ADT$A01!1!P!2.5\nPID!1!!a$b@c?F?".as_bytes().to_vec(),
        b"\xEF\xBB\xBFMSH|^~\\&|||||||ACK|1|P|2.3|||||||UNICODE UTF-8\rMSA|AA|1".to_vec(),
    ];
    let specials: &[&[u8]] = &[
        b"\\",
        b"|",
        b"^",
        b"~",
        b"&",
        b"#",
        b"\r",
        b"\n",
        b"\r\n",
        b"\xC3",
        b"\xA9",
        "é".as_bytes(),
        "日".as_bytes(),
        b"\\X",
        b"\\.br\\",
        b"MSH",
        b"\0",
        b"\x0B",
        b"\x1C",
        b"\xFF\xFE",
    ];
    let paths = [
        "MSH-1",
        "MSH-2",
        "MSH-9.2",
        "PID-3[2].4.2",
        "PID-5",
        "PID-5.1",
        "OBX[2]-5",
        "NTE-3",
    ];
    // HL7_FUZZ_ROUNDS / HL7_FUZZ_SEED allow a longer or different run by hand.
    let rounds = std::env::var("HL7_FUZZ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3000usize);
    let seed = std::env::var("HL7_FUZZ_SEED")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15u64);
    let mut rng = Rng(seed | 1);
    for round in 0..rounds {
        let seed = &seeds[round % seeds.len()];
        let mut bytes = seed.clone();
        match round % 4 {
            0 => bytes.truncate(rng.below(bytes.len() + 1)),
            1 => {
                for _ in 0..1 + rng.below(6) {
                    let at = rng.below(bytes.len() + 1);
                    let s = specials[rng.below(specials.len())];
                    bytes.splice(at..at, s.iter().copied());
                }
            }
            2 => {
                for _ in 0..1 + rng.below(6) {
                    if !bytes.is_empty() {
                        let at = rng.below(bytes.len());
                        bytes[at] = u8::try_from(rng.next() & 0xFF).unwrap_or(0);
                    }
                }
            }
            _ => {
                let a = rng.below(bytes.len() + 1);
                let b = rng.below(bytes.len() + 1);
                bytes.drain(a.min(b)..a.max(b));
            }
        }
        let fallback = if round % 2 == 0 {
            Some(WINDOWS_1252)
        } else {
            None
        };
        let (text, enc) = decode_to_utf8(&bytes, fallback)
            .unwrap_or_else(|_| (String::from_utf8_lossy(&bytes).into_owned(), UTF_8));
        let (h, seps) = sniff_header(&text);
        let _ = decode_escapes(&text, &seps, enc);
        match parse(&text) {
            Ok(m) => {
                let m = m.with_encoding(enc);
                for p in paths {
                    let _ = m.get(p);
                }
                for s in m.segments() {
                    for n in 0..=s.field_count() + 1 {
                        for r in s.repetitions(n) {
                            let _ = s.component(m.separators(), r, 1 + n % 3, n % 2);
                        }
                    }
                }
                let ack = build_ack(
                    m.header(),
                    m.separators(),
                    AckCode::AA,
                    &[],
                    "A",
                    "20240101000000+0000",
                );
                assert!(parse(&ack).is_ok(), "{ack:?}");
            }
            Err(e) => {
                let _ = (e.error_code(), e.location());
                let ack = build_ack(
                    &h,
                    &seps,
                    AckCode::AR,
                    &[e.to_ack_error()],
                    "A",
                    "20240101000000+0000",
                );
                assert!(
                    parse(&ack).is_ok(),
                    "ACK for {text:?} does not parse: {ack:?}"
                );
            }
        }
    }
}
