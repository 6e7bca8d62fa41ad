//! The HL7 v2 layer: bytes -> text -> validated message, and the ACK that answers it.
//!
//! ```text
//! frame bytes --decode_to_utf8--> text --parse--> Message --(map)--> ...
//!                      \                 \--error--> sniff_header + build_ack(AE/AR)
//!                       \--error--> sniff_header(lossy text) + build_ack(AR)
//! ```
//!
//! Typical use (what `ingest`/`pipeline` do per frame):
//!
//! ```
//! use hl7_edge::hl7::{self, AckCode};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let frame = b"MSH|^~\\&|LAB|HOSP|EDGE|GW|20240101120000||ADT^A01^ADT_A01|MSG1|P|2.5.1||||||8859/1\rPID|1||123^^^HOSP^MR||M\xFCller^Hans\r";
//! let now = "20240101120001+0000";
//! let (text, encoding) = hl7::decode_to_utf8(frame, Some(encoding_rs::WINDOWS_1252))?;
//! let ack = match hl7::parse(&text) {
//!     Ok(msg) => {
//!         let msg = msg.with_encoding(encoding); // for \Xhh\ escapes
//!         assert_eq!(msg.get("PID-5.1").as_deref(), Some("Müller"));
//!         assert_eq!(msg.get("PID-3.4").as_deref(), Some("HOSP"));
//!         hl7::build_ack(msg.header(), msg.separators(), AckCode::AA, &[], "ACK1", now)
//!     }
//!     Err(e) => {
//!         let (header, seps) = hl7::sniff_header(&text);
//!         hl7::build_ack(&header, &seps, AckCode::AR, &[e.to_ack_error()], "ACK1", now)
//!     }
//! };
//! assert!(ack.starts_with("MSH|^~\\&|EDGE|GW|LAB|HOSP|"));
//! assert!(ack.ends_with("\rMSA|AA|MSG1\r"));
//! # Ok(())
//! # }
//! ```
//!
//! # Design: our own splitter, hl7-parser as the reference
//!
//! Callers get an owned [`Message`]: each segment's raw (still escaped) line and the byte range
//! of every field (`parse.rs` explains the steps). The structural split used to be done by
//! `hl7-parser` 0.3; it is now the test oracle instead (every corpus message must split
//! identically, `tests.rs`), for two reasons:
//!
//! * **Cost.** Its tree (a vector per field, repetition, component and subcomponent) was 95% of
//!   parse time and capped parsing at ~16,000 messages/s per core, below the mapping target.
//! * **Defects** found while wrapping it, each of which would crash the daemon or silently
//!   lose clinical data, and each guarded against here:
//!
//! 1. **`display()` panics on an escape after non-ASCII text** (byte/char offset mix-up), and
//!    when it does not panic it is silently wrong (`Müller\S\x` -> `Müller\x`,
//!    `ü\X41\` -> `ü\X4`). [`decode_escapes`] (`escape.rs`) is ours and works on char
//!    boundaries only.
//! 2. **Wrong decoding of `\Xhh\`, `\H\`, `\N\`.** Our decoder turns `\Xhh..\` into bytes
//!    decoded in the message charset, removes `\H\`/`\N\`, handles `\.br\` & co. and keeps
//!    unknown or unterminated sequences literally (table in `escape.rs`).
//! 3. **Silent stop at blank or field-less segments; strict mode truncates `\r\n` input.** We
//!    split lines ourselves and keep field-less segments.
//! 4. **MSH fields shift when MSH-2 carries the v2.7 truncation character (`^~\&#`).** We read
//!    MSH-1/MSH-2 ourselves; [`Separators::truncation`] exposes the 5th character.
//! 5. **UTF-8 only.** [`decode_to_utf8`] runs first (callers do this), reading MSH-18 from the
//!    raw bytes and transcoding with `encoding_rs` (`charset.rs`).
//! 6. Segment names are accepted if they are any three Unicode alphanumerics (`pid`, `ÄÖÜ`);
//!    we require `[A-Z0-9]{3}`. MSH-2 is always read as exactly 4 characters: with 3
//!    (`MSH|^~\|A|B`) the field separator becomes the subcomponent separator; we require 4
//!    or 5 distinct encoding characters. A second MSH is parsed as an ordinary segment with
//!    field numbers off by one; we refuse it. `MSH|^~\&` alone gets a phantom empty MSH-3.
//!    Its parse errors quote the next 7 characters of input (possibly patient data).
//!
//! # Errors and privacy
//!
//! Every error knows its HL7 table 0357 code and ERL location (`error_code()`,
//! `location()`, `to_ack_error()`), and never contains field values; see `error.rs`.

mod ack;
pub mod batch;
mod charset;
mod error;
mod escape;
mod header;
mod message;
mod parse;
mod separators;
mod split;

#[cfg(test)]
mod tests;

pub use ack::{AckCode, AckError, build_ack};
pub use charset::{decode_to_utf8, encode_from_utf8};
pub use error::{CharsetError, ErrorCode, ParseError};
pub use escape::{decode_escapes, decode_escapes_cow, encode_escapes};
pub use header::{Header, MessageType, sniff_header};
pub use message::{Message, Path, Segment, component_of, segment_code};
pub use parse::parse;
pub use separators::Separators;
pub use split::{Parts, contains_char, nth_part, parts};
