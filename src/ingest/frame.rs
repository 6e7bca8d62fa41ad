//! MLLP framing: `<VT> message <FS><CR>` (0x0B ... 0x1C 0x0D), as HL7's MLLP release 2 defines it.
//! Odd senders use other bytes (STX/ETX, no trailing CR): [`Framing`] makes them configurable
//! per feed (`start_byte`, `end_bytes`).
//!
//! The decoder is a pure state machine over a byte buffer so that it can be tested byte by byte and
//! reused for serial lines. It never holds more than `max_frame` bytes of one message: an oversize
//! frame is *drained* (bytes counted and dropped until its end marker) and reported as
//! [`Frame::Oversize`], so the connection stays usable and the sender gets a negative ACK instead
//! of a dropped socket. Bytes outside a frame (line noise, keep-alive newlines, a sender that
//! forgot the start byte) are skipped and counted, never treated as a message.

/// MLLP start block (VT).
pub const START: u8 = 0x0B;
/// MLLP end block (FS), followed by [`END_CR`].
pub const END: u8 = 0x1C;
/// The carriage return that must follow [`END`].
pub const END_CR: u8 = 0x0D;

/// The framing bytes of one feed: a start byte, an end byte and an optional trailer byte
/// (MLLP: `0x0B`, `0x1C`, `0x0D`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub start: u8,
    pub end: u8,
    /// Expected after `end`; tolerated when missing. `None`: the end byte alone ends a frame.
    pub trailer: Option<u8>,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            start: START,
            end: END,
            trailer: Some(END_CR),
        }
    }
}

impl Framing {
    /// Wraps `body` in these framing bytes.
    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(body.len() + 3);
        v.push(self.start);
        v.extend_from_slice(body);
        v.push(self.end);
        v.extend(self.trailer);
        v
    }
}

/// One event produced by the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete message body (without framing bytes).
    Message(Vec<u8>),
    /// A frame longer than the limit; its content was dropped. `len` is the full body length.
    Oversize { len: usize },
}

/// Incremental MLLP decoder.
#[derive(Debug)]
pub struct Decoder {
    max_frame: usize,
    framing: Framing,
    state: State,
    body: Vec<u8>,
    /// Bytes seen outside any frame since the decoder was created.
    skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a start byte.
    Idle,
    /// Inside a frame, collecting the body.
    InFrame,
    /// Inside a frame, saw FS: expecting CR.
    SawEnd,
    /// Inside an oversize frame: counting, not keeping.
    Draining { len: usize, saw_end: bool },
}

impl Decoder {
    pub fn new(max_frame: usize) -> Self {
        Self::with_framing(max_frame, Framing::default())
    }

    /// A decoder for non-standard framing bytes.
    pub fn with_framing(max_frame: usize, framing: Framing) -> Self {
        Decoder {
            max_frame,
            framing,
            state: State::Idle,
            body: Vec::new(),
            skipped: 0,
        }
    }

    /// Bytes discarded outside frames so far (for metrics and a debug log).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// True when a frame has started but not ended (a drop now loses a half-received message,
    /// which is never ACKed).
    pub fn in_frame(&self) -> bool {
        self.state != State::Idle
    }

    /// Feeds `input`, appending complete frames to `out`. Every byte is consumed: a partial
    /// frame is kept internally until its end arrives.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Frame>) {
        let Framing {
            start,
            end,
            trailer,
        } = self.framing;
        for &b in input {
            self.state = match self.state {
                State::Idle => {
                    if b == start {
                        self.body.clear();
                        State::InFrame
                    } else {
                        self.skipped += 1;
                        State::Idle
                    }
                }
                State::InFrame => {
                    if b == end {
                        if trailer.is_none() {
                            out.push(Frame::Message(std::mem::take(&mut self.body)));
                            State::Idle
                        } else {
                            State::SawEnd
                        }
                    } else if b == start {
                        // A new start inside a frame: the sender restarted. The partial body is
                        // dropped (it was never ACKed) and counted.
                        self.skipped += self.body.len() as u64 + 1;
                        self.body.clear();
                        State::InFrame
                    } else {
                        self.push(b)
                    }
                }
                State::SawEnd => {
                    out.push(Frame::Message(std::mem::take(&mut self.body)));
                    if Some(b) == trailer {
                        State::Idle
                    } else if b == start {
                        // End byte not followed by the trailer: tolerate (some senders omit
                        // the CR) by treating the frame as complete and re-examining this byte.
                        State::InFrame
                    } else {
                        self.skipped += 1;
                        State::Idle
                    }
                }
                State::Draining { len, saw_end } => {
                    if saw_end && Some(b) == trailer {
                        out.push(Frame::Oversize { len });
                        State::Idle
                    } else if b == end {
                        if trailer.is_none() {
                            out.push(Frame::Oversize { len });
                            State::Idle
                        } else {
                            State::Draining { len, saw_end: true }
                        }
                    } else if saw_end {
                        out.push(Frame::Oversize { len });
                        if b == start {
                            State::InFrame
                        } else {
                            State::Idle
                        }
                    } else {
                        State::Draining {
                            len: len.saturating_add(1),
                            saw_end: false,
                        }
                    }
                }
            };
        }
    }

    fn push(&mut self, b: u8) -> State {
        if self.body.len() >= self.max_frame {
            let len = self.body.len() + 1;
            self.body = Vec::new(); // release the memory now, not at the end of the frame
            State::Draining {
                len,
                saw_end: false,
            }
        } else {
            self.body.push(b);
            State::InFrame
        }
    }
}

/// Wraps `body` in MLLP framing.
pub fn encode(body: &[u8]) -> Vec<u8> {
    Framing::default().encode(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: usize, chunks: &[&[u8]]) -> (Vec<Frame>, u64) {
        let mut d = Decoder::new(max);
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, &mut out);
        }
        (out, d.skipped())
    }

    #[test]
    fn one_frame() {
        let (f, s) = run(100, &[b"\x0bMSH|x\r\x1c\x0d"]);
        assert_eq!(f, vec![Frame::Message(b"MSH|x\r".to_vec())]);
        assert_eq!(s, 0);
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let wire = b"\x0bMSH|a\r\x1c\x0d\x0bMSH|b\r\x1c\x0d";
        for cut in 0..=wire.len() {
            let (f, _) = run(100, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(
                f,
                vec![
                    Frame::Message(b"MSH|a\r".to_vec()),
                    Frame::Message(b"MSH|b\r".to_vec())
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_between_frames_is_skipped_and_counted() {
        let (f, s) = run(100, &[b"\r\n  junk\x0bA\x1c\x0d\n\n\x0bB\x1c\x0d"]);
        assert_eq!(
            f,
            vec![Frame::Message(b"A".to_vec()), Frame::Message(b"B".to_vec())]
        );
        assert_eq!(s, 10);
    }

    #[test]
    fn oversize_frame_is_drained_and_next_frame_still_works() {
        let mut wire = vec![START];
        wire.extend(std::iter::repeat_n(b'x', 50));
        wire.extend([END, END_CR, START, b'o', b'k', END, END_CR]);
        let (f, _) = run(10, &[&wire]);
        assert_eq!(
            f,
            vec![Frame::Oversize { len: 50 }, Frame::Message(b"ok".to_vec())]
        );
    }

    #[test]
    fn missing_cr_after_fs_is_tolerated() {
        let (f, _) = run(100, &[b"\x0bA\x1c\x0bB\x1c\x0d"]);
        assert_eq!(
            f,
            vec![Frame::Message(b"A".to_vec()), Frame::Message(b"B".to_vec())]
        );
    }

    #[test]
    fn restart_inside_frame_drops_partial() {
        let (f, _) = run(100, &[b"\x0bpartial\x0bwhole\x1c\x0d"]);
        assert_eq!(f, vec![Frame::Message(b"whole".to_vec())]);
    }

    #[test]
    fn custom_framing_stx_etx_without_trailer() {
        let framing = Framing {
            start: 0x02,
            end: 0x03,
            trailer: None,
        };
        let mut d = Decoder::with_framing(100, framing);
        let mut out = Vec::new();
        d.feed(b"\r\n\x02MSH|a\r\x03\x02MSH|b\x03", &mut out);
        assert_eq!(
            out,
            vec![
                Frame::Message(b"MSH|a\r".to_vec()),
                Frame::Message(b"MSH|b".to_vec())
            ]
        );
        // VT and FS are ordinary bytes for this feed.
        d.feed(b"\x02\x0bx\x1c\x03", &mut out);
        assert_eq!(out[2], Frame::Message(b"\x0bx\x1c".to_vec()));
        let mut big = vec![0x02];
        big.extend(std::iter::repeat_n(b'x', 500));
        big.extend([0x03, 0x02, b'k', 0x03]);
        d.feed(&big, &mut out);
        assert_eq!(out[3], Frame::Oversize { len: 500 });
        assert_eq!(out[4], Frame::Message(b"k".to_vec()));
        assert_eq!(framing.encode(b"A"), b"\x02A\x03");
    }

    #[test]
    fn encode_round_trip() {
        let (f, _) = run(100, &[&encode(b"MSH|^~\\&|")]);
        assert_eq!(f, vec![Frame::Message(b"MSH|^~\\&|".to_vec())]);
    }
}
