//! Maps a collection of messages offline and says, per message, whether the daemon would forward
//! its Bundle or quarantine it, and why (`hl7-edge survey`). This is how a mapping author or an
//! integration team judges a new feed from a folder of sample messages before it goes live, and
//! how the test suite holds the third-party corpus to "a valid Bundle or a specific reason".
//!
//! Each message takes exactly the daemon's path after the durable commit: charset, parse, map,
//! envelope, FHIR R4 and London validation ([`Processor::bundle`]). Batch files (FHS/BHS) are
//! split as ingest splits them. Nothing is signed, stored or sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fhir::tree::Json;

use super::{ProcessError, Processor};
use crate::hl7;
use crate::ingest::adapter::FeedConfig;

/// What became of one message.
#[derive(Debug)]
pub struct Outcome {
    /// The file, and the message's position in it when the file is a batch (1-based).
    pub file: PathBuf,
    pub index: Option<usize>,
    /// `CODE^TRIGGER` from MSH-9, or `(unreadable)` when MSH could not be read.
    pub message_type: String,
    /// The validated Bundle, or why the message would be quarantined.
    pub result: Result<Json, ProcessError>,
}

/// Per message type: (would be forwarded, would be quarantined).
pub type Counts = BTreeMap<String, (usize, usize)>;

/// Every `*.hl7` file below `paths` (files are taken as given, folders recursively), sorted.
pub fn collect(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|x| x == "hl7") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    out.sort();
    Ok(out)
}

/// Maps every message of `raw` (one message, or a batch).
pub fn survey_file(
    processor: &Processor,
    feed: &FeedConfig,
    file: &Path,
    raw: &[u8],
    received_at: jiff::Timestamp,
) -> Vec<Outcome> {
    let one = |bytes: &[u8], index: Option<usize>| Outcome {
        file: file.to_path_buf(),
        index,
        message_type: message_type(bytes, feed),
        result: processor.bundle(bytes, feed, received_at).map(|p| p.bundle),
    };
    if hl7::batch::is_batch(raw) {
        let frame = hl7::batch::split_batch(raw);
        frame
            .messages()
            .enumerate()
            .map(|(i, m)| one(m, Some(i + 1)))
            .collect()
    } else {
        vec![one(raw, None)]
    }
}

/// `CODE^TRIGGER` of a message, for grouping (no patient data).
fn message_type(raw: &[u8], feed: &FeedConfig) -> String {
    hl7::decode_to_utf8(raw, feed.fallback_encoding())
        .ok()
        .and_then(|(text, _)| hl7::parse(&text).ok())
        .map(|m| {
            let t = &m.header().message_type;
            format!("{}^{}", t.code, t.trigger)
        })
        .unwrap_or_else(|| "(unreadable)".to_string())
}

/// Counts outcomes per message type.
pub fn count(outcomes: &[Outcome]) -> Counts {
    let mut counts = Counts::new();
    for o in outcomes {
        let c = counts.entry(o.message_type.clone()).or_default();
        if o.result.is_ok() {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    counts
}
