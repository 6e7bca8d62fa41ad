//! Timeout-delimited framing, for devices that just stream segments: no start or end bytes.
//!
//! A message starts at a line beginning `MSH` plus a field separator, and ends where the next
//! such line starts or when the line falls silent for the configured gap (the I/O loop calls
//! [`Splitter::flush`]). Lines may end with CR, LF or CR LF; the message handed on has its
//! segments terminated by CR, as HL7 requires, and no empty lines. Lines before the first `MSH`
//! (noise, a message whose start was missed) are skipped and counted: the stream resynchronises
//! at the next `MSH`.

use super::ascii::{CR, LF};
use super::{Event, LineError};

/// Incremental splitter.
#[derive(Debug)]
pub struct Splitter {
    max: usize,
    /// Segments of the current message, each ending with CR.
    buf: Vec<u8>,
    /// The line being received.
    line: Vec<u8>,
    /// A message has started (its MSH line was seen).
    started: bool,
    /// Bytes seen for a message that went over the limit (its content is dropped).
    over: Option<usize>,
    /// A line error hit the segments in `buf` / the line in progress.
    buf_damaged: bool,
    line_damaged: bool,
    last_was_cr: bool,
    skipped: u64,
}

impl Splitter {
    pub fn new(max: usize) -> Splitter {
        Splitter {
            max,
            buf: Vec::new(),
            line: Vec::new(),
            started: false,
            over: None,
            buf_damaged: false,
            line_damaged: false,
            last_was_cr: false,
            skipped: 0,
        }
    }

    /// Bytes skipped outside messages so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// True when bytes are held that the next [`Splitter::flush`] would act on.
    pub fn pending(&self) -> bool {
        self.started || !self.line.is_empty()
    }

    /// A character was lost to a line error. Returns whether it hit data being collected.
    pub fn damage(&mut self) -> bool {
        if self.pending() {
            self.line_damaged = true;
        }
        self.pending()
    }

    /// Feeds `input`, appending messages that ended (at the next `MSH`) to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Event>) {
        for &b in input {
            match b {
                LF if self.last_was_cr => {}
                CR | LF => self.end_line(),
                _ => {
                    if self.push(b)
                        && self.line.starts_with(b"MSH")
                        && self.line.get(3).is_some_and(|c| !c.is_ascii_alphanumeric())
                    {
                        if self.started {
                            self.emit(out);
                        }
                        self.started = true;
                    }
                }
            }
            self.last_was_cr = b == CR;
        }
    }

    /// The line fell silent: whatever was collected is one message.
    pub fn flush(&mut self, out: &mut Vec<Event>) {
        self.end_line();
        if self.started {
            self.emit(out);
        }
        self.last_was_cr = false;
    }

    /// Drops whatever is held (the device went away); returns the bytes dropped.
    pub fn discard(&mut self) -> usize {
        let n = self.buf.len() + self.line.len() + self.over.unwrap_or(0);
        self.buf.clear();
        self.line.clear();
        self.started = false;
        self.over = None;
        self.buf_damaged = false;
        self.line_damaged = false;
        n
    }

    /// Adds a byte to the line; true when the line has just reached its fourth byte (the
    /// moment to look for `MSH` plus a separator).
    fn push(&mut self, b: u8) -> bool {
        if let Some(n) = self.over.as_mut() {
            // Dropping an oversize message: keep only enough of the line to spot the next MSH.
            *n = n.saturating_add(1);
            if self.line.len() < 4 {
                self.line.push(b);
                return self.line.len() == 4;
            }
            return false;
        }
        if self.started && self.buf.len() + self.line.len() >= self.max {
            self.over = Some(self.buf.len() + self.line.len() + 1);
            self.buf = Vec::new();
            self.line.clear();
            return false;
        }
        if !self.started && self.line.len() >= self.max {
            // A very long line that is not a message start: noise.
            self.skipped += self.line.len() as u64;
            self.line.clear();
        }
        self.line.push(b);
        self.line.len() == 4
    }

    fn end_line(&mut self) {
        if let Some(n) = self.over.as_mut() {
            *n = n.saturating_add(1);
            self.line.clear();
            return;
        }
        if self.line.is_empty() {
            return;
        }
        if self.started {
            if self.buf.len() + self.line.len() + 1 > self.max {
                self.over = Some(self.buf.len() + self.line.len() + 1);
                self.buf = Vec::new();
            } else {
                self.buf.append(&mut self.line);
                self.buf.push(CR);
            }
            self.buf_damaged |= self.line_damaged;
        } else {
            self.skipped += self.line.len() as u64 + 1;
        }
        self.line.clear();
        self.line_damaged = false;
    }

    fn emit(&mut self, out: &mut Vec<Event>) {
        let body = std::mem::take(&mut self.buf);
        if let Some(len) = self.over.take() {
            out.push(Event::Oversize { len });
        } else if self.buf_damaged {
            out.push(Event::Damaged {
                body,
                error: LineError::Parity,
            });
        } else {
            out.push(Event::Message(body));
        }
        self.buf_damaged = false;
        self.started = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(b: &[u8]) -> Event {
        Event::Message(b.to_vec())
    }

    fn run(max: usize, chunks: &[&[u8]]) -> (Vec<Event>, u64) {
        let mut s = Splitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.flush(&mut out);
        (out, s.skipped())
    }

    #[test]
    fn line_endings_are_normalised_and_messages_split_at_msh() {
        let wire = b"noise\r\nMSH|^~\\&|A\r\nPID|1\n\nMSH|^~\\&|B\rPID|2";
        for cut in 0..=wire.len() {
            let (e, s) = run(1000, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(
                e,
                vec![msg(b"MSH|^~\\&|A\rPID|1\r"), msg(b"MSH|^~\\&|B\rPID|2\r")],
                "cut at {cut}"
            );
            assert_eq!(s, 6, "cut at {cut}");
        }
    }

    #[test]
    fn msh_needs_a_separator_and_a_line_start() {
        let (e, _) = run(1000, &[b"MSH|a\rMSHX|no\rNTE|MSH|no\r"]);
        assert_eq!(e, vec![msg(b"MSH|a\rMSHX|no\rNTE|MSH|no\r")]);
    }

    #[test]
    fn flush_without_a_message_only_counts_noise() {
        let (e, s) = run(1000, &[b"\r\n\r\njunk"]);
        assert!(e.is_empty());
        assert_eq!(s, 5);
    }

    #[test]
    fn oversize_and_recovery() {
        let mut wire = b"MSH|big\r".to_vec();
        wire.extend([b'x'; 100]);
        wire.extend(b"\rMSH|ok\r");
        let (e, _) = run(50, &[&wire]);
        assert!(matches!(e[0], Event::Oversize { len } if len > 50), "{e:?}");
        assert_eq!(e[1], msg(b"MSH|ok\r"));
    }

    #[test]
    fn damage_spoils_the_message_it_hit_only() {
        let mut s = Splitter::new(1000);
        let mut out = Vec::new();
        assert!(!s.damage());
        s.feed(b"MSH|a\rPI", &mut out);
        assert!(s.damage());
        s.feed(b"D|1\rMSH|b\r", &mut out);
        s.flush(&mut out);
        assert_eq!(
            out,
            vec![
                Event::Damaged {
                    body: b"MSH|a\rPID|1\r".to_vec(),
                    error: LineError::Parity
                },
                msg(b"MSH|b\r")
            ]
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u32 = 7;
        let mut s = Splitter::new(32);
        let mut out = Vec::new();
        for i in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let chunk: &[u8] = match x % 9 {
                0 => b"MSH|",
                1 => b"\r",
                2 => b"\n",
                _ => &[x as u8],
            };
            s.feed(chunk, &mut out);
            if i % 97 == 0 {
                s.damage();
            }
            if i % 1000 == 0 {
                s.flush(&mut out);
            }
            out.clear();
        }
    }
}
