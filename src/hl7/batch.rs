//! HL7 batch envelopes: `[FHS] { [BHS] { MSH ... } [BTS] } [FTS]` in one frame, and the batch
//! acknowledgement that answers them.
//!
//! # Reading
//!
//! [`split_batch`] works on the raw bytes (every HL7 charset we accept is ASCII-compatible for
//! segment names and delimiters), so each message keeps its exact bytes and goes through the
//! ordinary single-message path (MSH-18 charset, parse, duplicates, store) on its own.
//! Segments end at `\r`, `\n` or `\r\n`; blank lines are ignored. The grammar, with the same
//! tolerance as python-hl7's `parse_file`:
//!
//! * missing trailers (BTS, FTS) are tolerated; a BTS without BHS or an FTS without FHS is
//!   ignored; messages outside any BHS form an implicit batch;
//! * refused as a whole ([`BatchError`]): a second FHS, a BHS inside an open batch, a segment
//!   other than an envelope segment before the first MSH of a batch, anything after FTS, and an
//!   envelope header whose delimiters are unusable. Then every message found is answered `AR`
//!   with the reason and none is stored: a malformed envelope is not trusted in part.
//! * a BTS-1 / FTS-1 count that differs from what was found is reported (BHS-10/FHS-10 comment
//!   of the answer and a log line) but does not refuse the messages.
//!
//! # The batch acknowledgement
//!
//! HL7 v2.5 §2.10.3 lets the receiver answer a batch with a response batch; hl7-edge always
//! acknowledges **every** message, in order, mirroring the envelope it received:
//!
//! ```text
//! FHS|^~\&|<FHS-5>|<FHS-6>|<FHS-3>|<FHS-4>|<now>|||<comment>|<new id>|<incoming FHS-11>   (if FHS came)
//! BHS|^~\&|<BHS-5>|<BHS-6>|<BHS-3>|<BHS-4>|<now>|||<comment>|<new id>|<incoming BHS-11>   (per BHS that came)
//! MSH|...|ACK^A04^ACK|...        one ordinary ACK per message (AA/AE/AR or CA/CE/CR, ERR)
//! MSA|AA|<MSH-10 of that message>
//! ...
//! BTS|<number of ACK messages in this batch>
//! FTS|<number of batches>
//! ```
//!
//! Sender and receiver are swapped as in an ACK's MSH; BHS-12/FHS-12 (reference control id)
//! echo the incoming BHS-11/FHS-11; BHS-10/FHS-10 carries a short summary ("2 accepted,
//! 1 refused") or the envelope problem. Messages whose MSH-15 asks for no accept
//! acknowledgement (NE, or ER/SU when not applicable) are left out and not counted in BTS-1.

use super::escape::encode_escapes;
use super::header::sniff_header;
use super::separators::Separators;

/// FHS or BHS, interpreted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvelopeHeader {
    /// X-3.1, X-4.1, X-5.1, X-6.1 (decoded).
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    /// FHS-11 / BHS-11.
    pub control_id: String,
    pub separators: Separators,
}

/// One BHS..BTS group (or the implicit group of messages outside any BHS).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchGroup {
    pub header: Option<EnvelopeHeader>,
    /// Each message's raw bytes (from its MSH to the end of its last segment's terminator).
    pub messages: Vec<Vec<u8>>,
    /// BTS-1 as sent, if a BTS came.
    pub declared_count: Option<String>,
}

/// A frame that holds an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchFrame {
    pub file_header: Option<EnvelopeHeader>,
    pub groups: Vec<BatchGroup>,
    /// FTS-1 as sent.
    pub declared_batches: Option<String>,
    /// When set, the envelope is refused and no message may be stored.
    pub error: Option<BatchError>,
    /// Count mismatches and other notes (no patient data).
    pub warnings: Vec<String>,
}

/// Why an envelope is refused (line numbers are 1-based in the frame).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch envelope: line {line} is a second FHS (one file per frame)")]
    SecondFileHeader { line: usize },
    #[error("batch envelope: line {line} opens a BHS inside a batch that has no BTS yet")]
    NestedBatch { line: usize },
    #[error("batch envelope: line {line} (`{name}`) comes before the first MSH of its batch")]
    SegmentOutsideMessage { line: usize, name: String },
    #[error("batch envelope: line {line} comes after the FTS file trailer")]
    AfterFileTrailer { line: usize },
    #[error("batch envelope: line {line} (`{name}`) has unusable delimiters in its first field")]
    BadHeader { line: usize, name: &'static str },
}

/// Whether a frame starts (after a BOM and whitespace) with FHS or BHS.
pub fn is_batch(raw: &[u8]) -> bool {
    let body = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let body = body.get(start..).unwrap_or_default();
    (body.starts_with(b"FHS") || body.starts_with(b"BHS"))
        && body.get(3).is_some_and(|b| !b.is_ascii_alphanumeric())
}

/// Lines of `raw` as (1-based line number, byte range without terminator, end incl. terminator).
fn lines(raw: &[u8]) -> Vec<(usize, std::ops::Range<usize>, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut number = 1;
    let mut i = 0;
    while i <= raw.len() {
        let at_end = i == raw.len();
        let b = raw.get(i).copied();
        if at_end || b == Some(b'\r') || b == Some(b'\n') {
            let mut end = i;
            if b == Some(b'\r') && raw.get(i + 1) == Some(&b'\n') {
                end += 1;
            }
            let full_end = if at_end { i } else { end + 1 };
            let text = raw.get(start..i).unwrap_or_default();
            if !text.iter().all(u8::is_ascii_whitespace) {
                out.push((number, start..i, full_end));
            }
            number += 1;
            start = full_end;
            i = full_end;
            if at_end {
                break;
            }
        } else {
            i += 1;
        }
    }
    out
}

fn envelope_header(line: &[u8]) -> Option<EnvelopeHeader> {
    // FHS/BHS fields 1-12 sit where MSH's do, so sniff_header reads them once the name is
    // swapped: X-11 (control id) lands in `processing_id`.
    let text = String::from_utf8_lossy(line);
    let rest = text.get(3..)?;
    if rest.chars().next().is_none_or(|c| c.is_alphanumeric()) {
        return None;
    }
    let (h, seps) = sniff_header(&format!("MSH{rest}"));
    if !rest.starts_with(seps.field) {
        return None;
    }
    Some(EnvelopeHeader {
        sending_application: h.sending_application,
        sending_facility: h.sending_facility,
        receiving_application: h.receiving_application,
        receiving_facility: h.receiving_facility,
        control_id: h.processing_id,
        separators: seps,
    })
}

/// First field of a trailer (`BTS|3` -> `3`).
fn trailer_count(line: &[u8]) -> Option<String> {
    let sep = *line.get(3)?;
    let field = line.get(4..)?.split(|b| *b == sep).next()?;
    let s = String::from_utf8_lossy(field).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// Splits an envelope into messages; see the module docs for what is tolerated.
pub fn split_batch(raw: &[u8]) -> BatchFrame {
    let body_offset = if raw.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let body = raw.get(body_offset..).unwrap_or_default();
    let mut frame = BatchFrame::default();
    let mut open_group: Option<BatchGroup> = None;
    // The message being collected: (start, end) byte offsets in `body`.
    let mut current: Option<(usize, usize)> = None;
    let mut after_fts = false;
    let mut first = true;

    fn flush(current: &mut Option<(usize, usize)>, body: &[u8], group: &mut BatchGroup) {
        if let Some((s, e)) = current.take() {
            group
                .messages
                .push(body.get(s..e).unwrap_or_default().to_vec());
        }
    }

    for (number, range, full_end) in lines(body) {
        let line = body.get(range.clone()).unwrap_or_default();
        let trimmed_start = line
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(0);
        let line = line.get(trimmed_start..).unwrap_or_default();
        let name = line.get(..3).unwrap_or(line);
        let is_seg = |n: &[u8]| name == n && line.get(3).is_none_or(|b| !b.is_ascii_alphanumeric());
        if after_fts {
            frame
                .error
                .get_or_insert(BatchError::AfterFileTrailer { line: number });
            continue;
        }
        if is_seg(b"FHS") {
            if !first {
                frame
                    .error
                    .get_or_insert(BatchError::SecondFileHeader { line: number });
                continue;
            }
            match envelope_header(line) {
                Some(h) => frame.file_header = Some(h),
                None => {
                    frame.error.get_or_insert(BatchError::BadHeader {
                        line: number,
                        name: "FHS",
                    });
                }
            }
        } else if is_seg(b"BHS") {
            let open = open_group.as_ref().is_some_and(|g| g.header.is_some());
            if open {
                frame
                    .error
                    .get_or_insert(BatchError::NestedBatch { line: number });
                continue;
            }
            if let Some(mut g) = open_group.take() {
                flush(&mut current, body, &mut g);
                frame.groups.push(g);
            }
            let header = envelope_header(line);
            if header.is_none() {
                frame.error.get_or_insert(BatchError::BadHeader {
                    line: number,
                    name: "BHS",
                });
            }
            open_group = Some(BatchGroup {
                header,
                ..BatchGroup::default()
            });
        } else if is_seg(b"BTS") {
            // A BTS without BHS closes the implicit group (tolerated).
            if let Some(mut g) = open_group.take() {
                flush(&mut current, body, &mut g);
                g.declared_count = trailer_count(line);
                frame.groups.push(g);
            }
        } else if is_seg(b"FTS") {
            if let Some(mut g) = open_group.take() {
                flush(&mut current, body, &mut g);
                frame.groups.push(g);
            }
            frame.declared_batches = trailer_count(line);
            after_fts = true;
        } else if is_seg(b"MSH") {
            let g = open_group.get_or_insert_with(BatchGroup::default);
            flush(&mut current, body, g);
            current = Some((range.start + trimmed_start, full_end));
        } else {
            match current.as_mut() {
                Some((_, end)) => *end = full_end,
                None => {
                    frame
                        .error
                        .get_or_insert(BatchError::SegmentOutsideMessage {
                            line: number,
                            name: String::from_utf8_lossy(name)
                                .chars()
                                .filter(|c| c.is_ascii_alphanumeric())
                                .collect(),
                        });
                }
            }
        }
        first = false;
    }
    if let Some(mut g) = open_group.take() {
        flush(&mut current, body, &mut g);
        frame.groups.push(g);
    }
    for (i, g) in frame.groups.iter().enumerate() {
        if let Some(d) = &g.declared_count
            && d.parse::<usize>().ok() != Some(g.messages.len())
        {
            frame.warnings.push(format!(
                "batch {}: BTS-1 declares {d:?} messages, {} found",
                i + 1,
                g.messages.len()
            ));
        }
    }
    if let Some(d) = &frame.declared_batches
        && frame.file_header.is_some()
        && d.parse::<usize>().ok() != Some(frame.groups.len())
    {
        frame.warnings.push(format!(
            "FTS-1 declares {d:?} batches, {} found",
            frame.groups.len()
        ));
    }
    frame
}

impl BatchFrame {
    /// Every message, in order.
    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        self.groups
            .iter()
            .flat_map(|g| g.messages.iter().map(Vec::as_slice))
    }
}

/// Builds one FHS or BHS of the answer (sender and receiver swapped; X-12 = the incoming X-11).
fn answer_header(
    name: &str,
    incoming: &EnvelopeHeader,
    comment: &str,
    control_id: &str,
    now: &str,
) -> String {
    let seps = if incoming.separators.is_usable() && incoming.separators.escape.is_some() {
        incoming.separators
    } else {
        Separators::default()
    };
    let e = |s: &str| encode_escapes(s, &seps);
    [
        format!("{name}{}{}", seps.field, seps.encoding_characters()),
        e(&incoming.receiving_application),
        e(&incoming.receiving_facility),
        e(&incoming.sending_application),
        e(&incoming.sending_facility),
        e(now),
        String::new(),
        String::new(),
        e(comment),
        e(control_id),
        e(&incoming.control_id),
    ]
    .join(&seps.field.to_string())
}

fn trailer(name: &str, field: char, count: usize) -> String {
    format!("{name}{field}{count}")
}

/// One group's answer: its ACK messages (each already built, segments `\r`-terminated).
#[derive(Debug, Clone, Default)]
pub struct GroupAnswer {
    pub acks: Vec<String>,
    pub comment: String,
}

/// Assembles the batch acknowledgement (see the module docs). `new_id` yields fresh control
/// ids for FHS-11/BHS-11.
pub fn build_batch_ack(
    frame: &BatchFrame,
    answers: &[GroupAnswer],
    file_comment: &str,
    now: &str,
    new_id: &mut dyn FnMut() -> String,
) -> String {
    let mut out = String::new();
    let push = |seg: String, out: &mut String| {
        out.push_str(&seg);
        out.push('\r');
    };
    if let Some(fh) = &frame.file_header {
        push(
            answer_header("FHS", fh, file_comment, &new_id(), now),
            &mut out,
        );
    }
    for (g, a) in frame.groups.iter().zip(answers) {
        if let Some(bh) = &g.header {
            push(
                answer_header("BHS", bh, &a.comment, &new_id(), now),
                &mut out,
            );
        }
        for ack in &a.acks {
            out.push_str(ack);
        }
        if let Some(bh) = &g.header {
            push(trailer("BTS", bh.separators.field, a.acks.len()), &mut out);
        }
    }
    if let Some(fh) = &frame.file_header {
        push(
            trailer("FTS", fh.separators.field, frame.groups.len()),
            &mut out,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &[u8] = b"FHS|^~\\&|LAB|HOSP|EDGE|GW|20070101123401||f.hl7||F1\r\
BHS|^~\\&|LAB|HOSP|EDGE|GW|20070101123401||||B1\r\
MSH|^~\\&|LAB|HOSP|EDGE|GW|2007||ADT^A04|M1|P|2.5\rPID|1\r\
MSH|^~\\&|LAB|HOSP|EDGE|GW|2007||ADT^A04|M2|P|2.5\r\nPID|2\r\n\
BTS|2\rBHS|^~\\&|LAB|HOSP|EDGE|GW|2007||||B2\rMSH|^~\\&|LAB|HOSP|EDGE|GW|2007||ADT^A04|M3|P|2.5\rBTS|1\rFTS|2\r";

    #[test]
    fn detects_batches() {
        assert!(is_batch(b"\xEF\xBB\xBF\r\nBHS|^~\\&|"));
        assert!(is_batch(b"FHS|^~\\&|"));
        assert!(!is_batch(b"MSH|^~\\&|"));
        assert!(!is_batch(b"BHSX|"));
        assert!(!is_batch(b""));
    }

    #[test]
    fn splits_a_file_of_two_batches() {
        let f = split_batch(FILE);
        assert_eq!(f.error, None);
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
        assert_eq!(
            f.file_header.as_ref().map(|h| h.control_id.as_str()),
            Some("F1")
        );
        assert_eq!(f.groups.len(), 2);
        assert_eq!(
            f.groups[0].header.as_ref().map(|h| h.control_id.as_str()),
            Some("B1")
        );
        let msgs: Vec<&[u8]> = f.messages().collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!(
            msgs[0],
            b"MSH|^~\\&|LAB|HOSP|EDGE|GW|2007||ADT^A04|M1|P|2.5\rPID|1\r"
        );
        assert_eq!(
            msgs[1],
            b"MSH|^~\\&|LAB|HOSP|EDGE|GW|2007||ADT^A04|M2|P|2.5\r\nPID|2\r\n"
        );
        assert_eq!(
            msgs[2],
            b"MSH|^~\\&|LAB|HOSP|EDGE|GW|2007||ADT^A04|M3|P|2.5\r"
        );
    }

    #[test]
    fn tolerated_and_refused_shapes() {
        // Missing trailers, messages under FHS without BHS: fine.
        let f = split_batch(b"FHS|^~\\&|A\rMSH|^~\\&|x\rMSH|^~\\&|y\r");
        assert_eq!(f.error, None);
        assert_eq!(f.messages().count(), 2);
        let f = split_batch(b"BHS|^~\\&|A\rMSH|^~\\&|x\rBTS|5\r");
        assert_eq!(f.error, None);
        assert_eq!(f.warnings.len(), 1, "count mismatch noted");
        // Refused, with every message still found (each gets an AR).
        let f = split_batch(b"BHS|^~\\&|A\rMSH|^~\\&|x\rBHS|^~\\&|B\rBTS|1\r");
        assert_eq!(f.error, Some(BatchError::NestedBatch { line: 3 }));
        assert_eq!(f.messages().count(), 1);
        let f = split_batch(b"FHS|^~\\&|A\rBHS|^~\\&|A\rMSH|^~\\&|x\rFHS|^~\\&|A\rBTS|1\rFTS|1");
        assert_eq!(f.error, Some(BatchError::SecondFileHeader { line: 4 }));
        let f = split_batch(b"BHS|^~\\&|A\rPID|1\rMSH|^~\\&|x\rBTS|1\r");
        assert!(matches!(
            f.error,
            Some(BatchError::SegmentOutsideMessage { line: 2, .. })
        ));
        let f = split_batch(b"FHS|^~\\&|A\rFTS|0\rMSH|^~\\&|x\r");
        assert_eq!(f.error, Some(BatchError::AfterFileTrailer { line: 3 }));
        // Hostile bytes never panic.
        for input in [
            &b"BHS"[..],
            b"BHS|",
            b"FHS\xff\xfe",
            b"BHS|\r\r\n\n",
            b"FHS|^^^^|",
        ] {
            let _ = split_batch(input);
        }
    }

    #[test]
    fn batch_ack_mirrors_the_envelope() {
        let f = split_batch(FILE);
        let answers = vec![
            GroupAnswer {
                acks: vec!["MSH|a\rMSA|AA|M1\r".into(), "MSH|b\rMSA|AR|M2\r".into()],
                comment: "1 accepted, 1 refused".into(),
            },
            GroupAnswer {
                acks: vec!["MSH|c\rMSA|AA|M3\r".into()],
                comment: "1 accepted".into(),
            },
        ];
        let mut n = 0;
        let ack = build_batch_ack(&f, &answers, "3 messages", "20260101", &mut || {
            n += 1;
            format!("R{n}")
        });
        let segs: Vec<&str> = ack.split_terminator('\r').collect();
        assert_eq!(
            segs[0],
            "FHS|^~\\&|EDGE|GW|LAB|HOSP|20260101|||3 messages|R1|F1"
        );
        assert_eq!(
            segs[1],
            "BHS|^~\\&|EDGE|GW|LAB|HOSP|20260101|||1 accepted, 1 refused|R2|B1"
        );
        assert_eq!(segs[6], "BTS|2");
        assert_eq!(
            segs[7],
            "BHS|^~\\&|EDGE|GW|LAB|HOSP|20260101|||1 accepted|R3|B2"
        );
        assert_eq!(segs[10], "BTS|1");
        assert_eq!(segs[11], "FTS|2");
        assert_eq!(segs.len(), 12);
    }
}
