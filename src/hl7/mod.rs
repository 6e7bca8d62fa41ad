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
//! # Design: hl7-parser behind a module of ours
//!
//! The structural parse (message -> segments -> fields) is done by `hl7-parser` 0.3, but no
//! hl7-parser type leaves this module: callers get an owned [`Message`] holding the raw
//! (still escaped) text of every field. The wrapper exists because hl7-parser, as measured,
//! has defects that would either crash the daemon or silently lose clinical data. Each one
//! and how it is neutralised:
//!
//! 1. **`display()` panics on an escape after non-ASCII text** (byte/char offset mix-up).
//!    We never call `display()` or any hl7-parser decoding; [`decode_escapes`] (`escape.rs`)
//!    is ours and works on char boundaries only.
//! 2. **Wrong decoding of `\Xhh\`, `\H\`, `\N\`.** Same fix: our decoder turns `\Xhh..\` into
//!    bytes decoded in the message charset, removes `\H\`/`\N\`, handles `\.br\` & co. and
//!    keeps unknown or unterminated sequences literally (table in `escape.rs`).
//! 3. **Silent stop at blank or field-less segments; strict mode truncates `\r\n` input.**
//!    `parse` splits lines itself (`\r`, `\n`, `\r\n`), drops blank lines, gives field-less
//!    segments a field separator for hl7-parser, and afterwards verifies that hl7-parser
//!    returned one segment per line, each spanning the whole line; otherwise it fails with
//!    [`ParseError::Truncated`] naming the first unconsumed segment and input line.
//! 4. **MSH fields shift when MSH-2 carries the v2.7 truncation character (`^~\&#`).** `parse`
//!    reads MSH-1/MSH-2 itself, hides the 5th character from hl7-parser and restores it in
//!    our MSH-2, so MSH-3.. keep their numbers; [`Separators::truncation`] exposes it.
//! 5. **UTF-8 only.** [`decode_to_utf8`] runs first (callers do this), reading MSH-18 from the
//!    raw bytes and transcoding with `encoding_rs` (`charset.rs`).
//!
//! Further hl7-parser 0.3 behaviours found while wrapping it (each guarded against here):
//!
//! * Escape decoding after non-ASCII text is not only a panic risk (`日本\F\語`, `ééééé\E\`
//!   panic in `separators.rs`) but also silently wrong when it does not panic
//!   (`Müller\S\x` -> `Müller\x`, `é\.br\x` -> `é\.bx`, `ü\X41\` -> `ü\X4`).
//! * Segment names are accepted if they are any three Unicode alphanumerics (`pid`, `ÄÖÜ`);
//!   we require `[A-Z0-9]{3}`.
//! * MSH-2 is always read as exactly 4 characters after MSH-1: with 3 (`MSH|^~\|A|B`) the
//!   field separator becomes the subcomponent separator and `A|B` is one field. We require
//!   4 or 5 distinct encoding characters.
//! * A second MSH is parsed as an ordinary segment, so its field numbers are off by one
//!   (field 1 = encoding characters). We refuse it (one message per frame).
//! * A BOM or leading whitespace before `MSH` is a parse error; we trim them.
//! * `MSH|^~\&` with nothing after gets a phantom empty MSH-3 (we drop it).
//! * Its parse errors quote the next 7 characters of input, i.e. possibly patient data; we
//!   keep only the offset.
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

#[cfg(test)]
mod tests;

pub use ack::{AckCode, AckError, build_ack};
pub use charset::{decode_to_utf8, encode_from_utf8};
pub use error::{CharsetError, ErrorCode, ParseError};
pub use escape::{decode_escapes, encode_escapes};
pub use header::{Header, MessageType, sniff_header};
pub use message::{Message, Path, Segment, component_of};
pub use parse::parse;
pub use separators::Separators;
