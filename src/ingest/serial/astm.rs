//! The receiving side of the ASTM E1381 / CLSI LIS01-A2 low-level protocol, as a pure state
//! machine.
//!
//! ```text
//! device                      appliance
//! ENQ                  ->                 establishment
//!                      <-     ACK
//! STX 1 text ETB C1 C2 CR LF  ->          intermediate frame (text continues)
//!                      <-     ACK         (NAK: bad frame, the device sends it again)
//! STX 2 text ETX C1 C2 CR LF  ->          end frame: the message is complete
//!                      <-     ACK         only once the message is durably stored
//! EOT                  ->                 termination: the line is neutral again
//! ```
//!
//! * A **message** is the text of one intermediate-frames-plus-end-frame run (`ETB`* `ETX`),
//!   which is E1381's own definition; several messages may follow each other in one transfer.
//!   The HL7 message text is the concatenation of those frame texts.
//! * Frame numbers run 1..7, 0, 1... from the first frame after ENQ. A frame is accepted when its
//!   number is the expected one; a valid frame repeating the last accepted number (the device
//!   missed our ACK and sent it again) is acknowledged again and its text discarded. Anything
//!   else is answered NAK.
//! * The checksum is the mod-256 sum of the bytes from the frame number through ETB/ETX, as two
//!   hex characters. A bad checksum, a missing CR LF, a control character in the text, a frame
//!   longer than the limit or a parity/framing error on the line while it arrived: NAK. The
//!   device retransmits (LIS01-A2 allows six attempts, then it gives up with EOT).
//! * **The end frame is answered only after the caller has tried to store the message**
//!   ([`Receiver::verdict`]): ACK when it is stored (or refused for good: resending it would not
//!   help), NAK when it could not be stored, so that the device sends the end frame again and the
//!   store is retried. A transfer that ends (EOT, a new ENQ, or the receive timeout) before its
//!   end frame was acknowledged loses nothing that was acknowledged: the device still holds the
//!   message.
//!
//! The appliance never bids for the line (it has nothing to send on it), so it never contends
//! with the device; the device's 15-second reply timer is respected because every frame is
//! answered at once except the end frame, which waits for one group commit.

use super::LineError;
use super::ascii::{ACK, CR, ENQ, EOT, ETB, ETX, LF, NAK, STX};
use super::{hex_val, hex2};

/// What the receiver asks of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write this byte (ACK or NAK) to the line.
    Reply(u8),
    /// A complete message. The caller must store it and then call [`Receiver::verdict`], whose
    /// byte is the answer to the end frame; [`Receiver::feed`] stops right after this output.
    Message(Vec<u8>),
    /// A complete message over the size limit; its text was dropped. Its end frame was
    /// acknowledged (resending would not make it smaller).
    Oversize { len: usize },
    /// A line error (already answered, when it needed an answer).
    Error(LineError),
    /// The device sent EOT: the transfer ended normally.
    TransferEnded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for ENQ.
    Neutral,
    /// Between frames, waiting for STX or EOT.
    Transfer,
    /// After STX, collecting the frame number and text.
    Frame,
    /// After ETB/ETX, collecting C1 C2 CR LF.
    Trailer { term: u8, got: [u8; 4], n: usize },
    /// An end frame was handed out as [`Output::Message`]; waiting for [`Receiver::verdict`].
    Verdict { fn_: u8, prior_len: usize },
}

/// Incremental E1381 receiver.
#[derive(Debug)]
pub struct Receiver {
    max_text: usize,
    max_message: usize,
    state: State,
    /// The frame number the next new frame must carry.
    expected: u8,
    /// The number of the last accepted frame in this transfer.
    last: Option<u8>,
    /// Frame number and text of the frame being received (capped at `max_text + 1`).
    frame: Vec<u8>,
    frame_len: usize,
    /// Text of the message being assembled.
    message: Vec<u8>,
    /// Set once the message exceeded `max_message` (its text is no longer kept).
    message_over: Option<usize>,
    damaged: bool,
    skipped: u64,
}

/// The frame number after `n`: 1..7, 0, 1...
fn next_fn(n: u8) -> u8 {
    (n + 1) % 8
}

/// Characters LIS01-A2 forbids in frame text (CR is allowed: it ends records/segments).
fn restricted(b: u8) -> bool {
    matches!(b, 0x01..=0x06 | 0x0A | 0x10..=0x17)
}

impl Receiver {
    pub fn new(max_text: usize, max_message: usize) -> Receiver {
        Receiver {
            max_text,
            max_message,
            state: State::Neutral,
            expected: 1,
            last: None,
            frame: Vec::new(),
            frame_len: 0,
            message: Vec::new(),
            message_over: None,
            damaged: false,
            skipped: 0,
        }
    }

    /// Bytes ignored outside frames so far (noise, bytes before ENQ).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// True between ENQ and EOT (the receive timer runs).
    pub fn in_transfer(&self) -> bool {
        !matches!(self.state, State::Neutral | State::Verdict { .. })
    }

    /// True while an unfinished message is held (lost, unacknowledged, if the line drops).
    pub fn holds_partial(&self) -> bool {
        !self.message.is_empty() || self.message_over.is_some() || self.state == State::Frame
    }

    /// A character was lost to a line error; spoils the frame in progress. Returns whether a
    /// frame was in progress.
    pub fn damage(&mut self) -> bool {
        let in_frame = matches!(self.state, State::Frame | State::Trailer { .. });
        self.damaged |= in_frame;
        in_frame
    }

    /// The receive timer expired: the transfer is abandoned.
    pub fn timeout(&mut self, out: &mut Vec<Output>) {
        if self.in_transfer() {
            out.push(Output::Error(LineError::Timeout));
            self.reset_transfer();
            self.state = State::Neutral;
        }
    }

    fn reset_transfer(&mut self) {
        self.expected = 1;
        self.last = None;
        self.message.clear();
        self.message_over = None;
        self.frame.clear();
        self.frame_len = 0;
        self.damaged = false;
    }

    /// Answers the end frame of the message last output: `stored` true gives ACK and moves on,
    /// false gives NAK and rewinds so that the device's retransmission is taken as new.
    /// Returns the byte to write (nothing is pending: NAK, which is harmless).
    pub fn verdict(&mut self, stored: bool) -> u8 {
        let State::Verdict { fn_, prior_len } = self.state else {
            return NAK;
        };
        self.state = State::Transfer;
        if stored {
            self.last = Some(fn_);
            self.expected = next_fn(fn_);
            self.message.clear();
            self.message_over = None;
            ACK
        } else {
            self.message.truncate(prior_len);
            NAK
        }
    }

    /// Feeds `input`, appending outputs to `out`; returns how many bytes were consumed. Stops
    /// after an [`Output::Message`] (feed the rest after [`Receiver::verdict`]); otherwise
    /// consumes everything.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Output>) -> usize {
        for (i, &b) in input.iter().enumerate() {
            if matches!(self.state, State::Verdict { .. }) {
                return i;
            }
            self.step(b, out);
        }
        input.len()
    }

    fn step(&mut self, b: u8, out: &mut Vec<Output>) {
        match self.state {
            State::Verdict { .. } => {}
            State::Neutral => {
                if b == ENQ {
                    self.reset_transfer();
                    self.state = State::Transfer;
                    out.push(Output::Reply(ACK));
                } else {
                    self.skipped += 1;
                }
            }
            State::Transfer => match b {
                STX => self.start_frame(),
                EOT => {
                    if !self.message.is_empty() || self.message_over.is_some() {
                        // Intermediate frames without their end frame: never acknowledged as a
                        // message; the device still holds it.
                        out.push(Output::Error(LineError::Framing));
                    }
                    self.reset_transfer();
                    self.state = State::Neutral;
                    out.push(Output::TransferEnded);
                }
                ENQ => {
                    // The device started over (it missed our EOT handling or timed out).
                    if !self.message.is_empty() {
                        out.push(Output::Error(LineError::Framing));
                    }
                    self.reset_transfer();
                    out.push(Output::Reply(ACK));
                }
                _ => self.skipped += 1,
            },
            State::Frame => match b {
                ETB | ETX => {
                    self.state = State::Trailer {
                        term: b,
                        got: [0; 4],
                        n: 0,
                    }
                }
                STX => {
                    // A new frame before this one ended: drop the partial one, unanswered.
                    self.skipped += self.frame_len as u64 + 1;
                    out.push(Output::Error(LineError::Framing));
                    self.start_frame();
                }
                EOT => {
                    // The device gave up in the middle of a frame.
                    out.push(Output::Error(LineError::Framing));
                    self.reset_transfer();
                    self.state = State::Neutral;
                    out.push(Output::TransferEnded);
                }
                _ => {
                    self.frame_len += 1;
                    if self.frame.len() <= self.max_text {
                        self.frame.push(b);
                    }
                }
            },
            State::Trailer { term, mut got, n } => {
                if matches!(b, STX | EOT | ENQ) {
                    // The trailer was cut short: the frame is bad; this byte starts something.
                    self.reject(out, LineError::Framing);
                    self.step(b, out);
                    return;
                }
                got[n] = b;
                if n + 1 < 4 {
                    self.state = State::Trailer {
                        term,
                        got,
                        n: n + 1,
                    };
                } else {
                    self.end_frame(term, got, out);
                }
            }
        }
    }

    fn start_frame(&mut self) {
        self.frame.clear();
        self.frame_len = 0;
        self.damaged = false;
        self.state = State::Frame;
    }

    fn reject(&mut self, out: &mut Vec<Output>, e: LineError) {
        out.push(Output::Error(e));
        out.push(Output::Reply(NAK));
        self.frame.clear();
        self.frame_len = 0;
        self.damaged = false;
        self.state = State::Transfer;
    }

    fn end_frame(&mut self, term: u8, trailer: [u8; 4], out: &mut Vec<Output>) {
        if self.damaged {
            return self.reject(out, LineError::Parity);
        }
        if trailer[2] != CR || trailer[3] != LF {
            return self.reject(out, LineError::Framing);
        }
        if self.frame_len > self.max_text + 1 {
            return self.reject(out, LineError::Oversize);
        }
        let sum = self
            .frame
            .iter()
            .fold(term, |a: u8, b: &u8| a.wrapping_add(*b));
        let want = hex2(sum);
        let ok = hex_val(trailer[0]).is_some()
            && hex_val(trailer[1]).is_some()
            && trailer[0].eq_ignore_ascii_case(&want[0])
            && trailer[1].eq_ignore_ascii_case(&want[1]);
        if !ok {
            return self.reject(out, LineError::Checksum);
        }
        let Some((&fn_char, text)) = self.frame.split_first() else {
            return self.reject(out, LineError::Framing);
        };
        let fn_ = match fn_char {
            b'0'..=b'7' => fn_char - b'0',
            _ => return self.reject(out, LineError::FrameNumber),
        };
        if text.iter().any(|&b| restricted(b)) {
            return self.reject(out, LineError::Framing);
        }
        if fn_ != self.expected {
            if Some(fn_) == self.last {
                // A repeat of the frame we accepted last: our ACK was lost. Acknowledge again.
                out.push(Output::Reply(ACK));
                self.frame.clear();
                self.state = State::Transfer;
                return;
            }
            return self.reject(out, LineError::FrameNumber);
        }
        let prior_len = self.message.len();
        match self.message_over {
            Some(len) => self.message_over = Some(len.saturating_add(text.len())),
            None if prior_len + text.len() > self.max_message => {
                self.message_over = Some(prior_len + text.len());
                self.message = Vec::new();
            }
            None => self.message.extend_from_slice(text),
        }
        self.frame.clear();
        self.frame_len = 0;
        if term == ETB {
            self.last = Some(fn_);
            self.expected = next_fn(fn_);
            self.state = State::Transfer;
            out.push(Output::Reply(ACK));
        } else if let Some(len) = self.message_over.take() {
            self.last = Some(fn_);
            self.expected = next_fn(fn_);
            self.message.clear();
            self.state = State::Transfer;
            out.push(Output::Oversize { len });
            out.push(Output::Reply(ACK));
        } else {
            self.state = State::Verdict { fn_, prior_len };
            out.push(Output::Message(self.message.clone()));
        }
    }
}

/// One E1381 frame (for tests and simulators): `<STX> FN text <ETB|ETX> C1 C2 <CR><LF>`.
pub fn encode_frame(fn_: u8, text: &[u8], last: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 7);
    v.push(STX);
    v.push(b'0' + (fn_ % 8));
    v.extend_from_slice(text);
    v.push(if last { ETX } else { ETB });
    let sum = v[1..].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    v.extend_from_slice(&hex2(sum));
    v.extend_from_slice(&[CR, LF]);
    v
}

/// Splits `message` into E1381 frames of at most `max_text` bytes, numbered from `first_fn`.
pub fn encode_message(message: &[u8], max_text: usize, first_fn: u8) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = message.chunks(max_text.max(1)).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| encode_frame((first_fn + i as u8) % 8, c, i + 1 == n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(r: &mut Receiver, input: &[u8], verdict: bool, out: &mut Vec<Output>) {
        let mut rest = input;
        loop {
            let n = r.feed(rest, out);
            rest = &rest[n..];
            if matches!(out.last(), Some(Output::Message(_))) {
                out.push(Output::Reply(r.verdict(verdict)));
            }
            if rest.is_empty() {
                break;
            }
        }
    }

    fn run(input: &[u8]) -> Vec<Output> {
        let mut r = Receiver::new(240, 10_000);
        let mut out = Vec::new();
        feed_all(&mut r, input, true, &mut out);
        out
    }

    fn session(msg: &[u8], max_text: usize) -> Vec<u8> {
        let mut wire = vec![ENQ];
        for f in encode_message(msg, max_text, 1) {
            wire.extend(f);
        }
        wire.push(EOT);
        wire
    }

    const MSG: &[u8] = b"MSH|^~\\&|LAB|RRV|HIS|RRV|20260101||ORU^R01|C1|P|2.4\rPID|1||123\rOBX|1|NM|GLU||5.5|mmol/L\r";

    #[test]
    fn checksum_is_the_mod_256_sum_from_fn_through_etx() {
        // By hand: 31 48 7C 5C 5E 26 0D 03 sums to 0x1E5, so "E5".
        assert_eq!(
            encode_frame(1, b"H|\\^&\r", true),
            b"\x021H|\\^&\r\x03E5\r\n".to_vec()
        );
        // An intermediate frame ends with ETB (0x17): 0x1E5 - 0x03 + 0x17 = 0x1F9.
        assert_eq!(
            encode_frame(1, b"H|\\^&\r", false),
            b"\x021H|\\^&\r\x17F9\r\n".to_vec()
        );
    }

    #[test]
    fn a_session_in_many_frames() {
        let out = run(&session(MSG, 20));
        let frames = MSG.len().div_ceil(20);
        let acks = out.iter().filter(|o| **o == Output::Reply(ACK)).count();
        assert_eq!(acks, frames + 1, "ENQ and every frame: {out:?}");
        let msgs: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(msgs, vec![MSG.to_vec()]);
        assert_eq!(out.last(), Some(&Output::TransferEnded));
        assert!(
            !out.iter().any(|o| matches!(o, Output::Error(_))),
            "{out:?}"
        );
    }

    #[test]
    fn frame_numbers_wrap_after_seven() {
        // 20 frames: numbers 1..7,0,1..7,0,1..4.
        let out = run(&session(&MSG.repeat(5)[..400], 20));
        assert!(
            out.contains(&Output::Message(MSG.repeat(5)[..400].to_vec())),
            "{out:?}"
        );
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let wire = session(MSG, 30);
        let want = run(&wire);
        for cut in 0..=wire.len() {
            let mut r = Receiver::new(240, 10_000);
            let mut out = Vec::new();
            feed_all(&mut r, &wire[..cut], true, &mut out);
            feed_all(&mut r, &wire[cut..], true, &mut out);
            assert_eq!(out, want, "cut at {cut}");
        }
    }

    #[test]
    fn bad_checksum_is_naked_and_the_retransmission_accepted() {
        let mut bad = encode_frame(1, b"MSH|x\r", true);
        let n = bad.len();
        bad[n - 4] = if bad[n - 4] == b'0' { b'1' } else { b'0' };
        let mut wire = vec![ENQ];
        wire.extend(&bad);
        wire.extend(encode_frame(1, b"MSH|x\r", true));
        wire.push(EOT);
        let out = run(&wire);
        assert_eq!(
            out,
            vec![
                Output::Reply(ACK),
                Output::Error(LineError::Checksum),
                Output::Reply(NAK),
                Output::Message(b"MSH|x\r".to_vec()),
                Output::Reply(ACK),
                Output::TransferEnded,
            ]
        );
    }

    #[test]
    fn frame_number_rules() {
        // Wrong number: NAK. Repeat of the last accepted (lost ACK): ACK, text not duplicated.
        let mut wire = vec![ENQ];
        wire.extend(encode_frame(2, b"x", false)); // expected 1
        wire.extend(encode_frame(1, b"ab", false));
        wire.extend(encode_frame(1, b"ab", false)); // repeat
        wire.extend(encode_frame(2, b"cd", true));
        wire.extend(encode_frame(2, b"cd", true)); // repeat of the end frame: no second message
        wire.push(EOT);
        let out = run(&wire);
        assert_eq!(
            out,
            vec![
                Output::Reply(ACK),
                Output::Error(LineError::FrameNumber),
                Output::Reply(NAK),
                Output::Reply(ACK),
                Output::Reply(ACK),
                Output::Message(b"abcd".to_vec()),
                Output::Reply(ACK),
                Output::Reply(ACK),
                Output::TransferEnded,
            ]
        );
        // A non-digit frame number.
        let mut f = encode_frame(1, b"x", true);
        f[1] = b'9';
        let sum = f[1..f.len() - 4]
            .iter()
            .fold(0u8, |a, b| a.wrapping_add(*b));
        let n = f.len();
        f[n - 4..n - 2].copy_from_slice(&hex2(sum));
        let mut wire = vec![ENQ];
        wire.extend(f);
        let out = run(&wire);
        assert!(
            out.contains(&Output::Error(LineError::FrameNumber)),
            "{out:?}"
        );
    }

    #[test]
    fn failed_store_naks_the_end_frame_and_the_resend_is_stored() {
        let mut r = Receiver::new(240, 10_000);
        let mut out = Vec::new();
        let mut wire = vec![ENQ];
        wire.extend(encode_frame(1, b"ab", false));
        wire.extend(encode_frame(2, b"cd", true));
        feed_all(&mut r, &wire, false, &mut out);
        assert_eq!(
            out[out.len() - 2..],
            [Output::Message(b"abcd".to_vec()), Output::Reply(NAK)]
        );
        out.clear();
        feed_all(&mut r, &encode_frame(2, b"cd", true), true, &mut out);
        assert_eq!(
            out,
            vec![Output::Message(b"abcd".to_vec()), Output::Reply(ACK)]
        );
    }

    #[test]
    fn noise_malformed_frames_and_restricted_characters() {
        let mut wire = b"garbage\r\n".to_vec();
        wire.push(ENQ);
        wire.extend(b"\r\n"); // stray bytes between frames
        // Missing CR LF.
        let mut f = encode_frame(1, b"a", true);
        let n = f.len();
        f[n - 1] = b'X';
        wire.extend(f);
        // LF inside text.
        wire.extend(encode_frame(1, b"a\nb", true));
        // Cut short by a new STX.
        wire.extend(b"\x021partial");
        wire.extend(encode_frame(1, b"ok", true));
        wire.push(EOT);
        let mut r = Receiver::new(240, 10_000);
        let mut out = Vec::new();
        feed_all(&mut r, &wire, true, &mut out);
        let errors: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Error(e) => Some(*e),
                _ => None,
            })
            .collect();
        assert_eq!(
            errors,
            vec![LineError::Framing, LineError::Framing, LineError::Framing]
        );
        assert!(out.contains(&Output::Message(b"ok".to_vec())));
        assert_eq!(r.skipped(), 9 + 2 + 9);
    }

    #[test]
    fn oversize_frame_and_message() {
        let mut r = Receiver::new(10, 15);
        let mut out = Vec::new();
        let mut wire = vec![ENQ];
        wire.extend(encode_frame(1, &[b'x'; 11], false));
        feed_all(&mut r, &wire, true, &mut out);
        assert_eq!(
            out[1..],
            [Output::Error(LineError::Oversize), Output::Reply(NAK)]
        );
        out.clear();
        for f in encode_message(&[b'y'; 30], 10, 1) {
            feed_all(&mut r, &f, true, &mut out);
        }
        assert_eq!(
            out,
            vec![
                Output::Reply(ACK),
                Output::Reply(ACK),
                Output::Oversize { len: 30 },
                Output::Reply(ACK)
            ]
        );
        // The next message in the same transfer is fine (frame numbers carry on: 4).
        out.clear();
        feed_all(&mut r, &encode_frame(4, b"ok", true), true, &mut out);
        assert_eq!(
            out,
            vec![Output::Message(b"ok".to_vec()), Output::Reply(ACK)]
        );
    }

    #[test]
    fn timeout_and_eot_abandon_an_unfinished_message() {
        let mut r = Receiver::new(240, 10_000);
        let mut out = Vec::new();
        let mut wire = vec![ENQ];
        wire.extend(encode_frame(1, b"ab", false));
        feed_all(&mut r, &wire, true, &mut out);
        assert!(r.in_transfer() && r.holds_partial());
        out.clear();
        r.timeout(&mut out);
        assert_eq!(out, vec![Output::Error(LineError::Timeout)]);
        assert!(!r.in_transfer());
        // Frames without ENQ are ignored (noise) until the device establishes again.
        out.clear();
        feed_all(&mut r, &encode_frame(2, b"cd", true), true, &mut out);
        assert!(out.is_empty(), "{out:?}");
        out.clear();
        let mut wire = vec![ENQ];
        wire.extend(encode_frame(1, b"ab", false));
        wire.push(EOT);
        feed_all(&mut r, &wire, true, &mut out);
        assert_eq!(
            out,
            vec![
                Output::Reply(ACK),
                Output::Reply(ACK),
                Output::Error(LineError::Framing),
                Output::TransferEnded
            ]
        );
    }

    #[test]
    fn damage_naks_the_frame() {
        let mut r = Receiver::new(240, 10_000);
        let mut out = Vec::new();
        feed_all(&mut r, b"\x05\x021MSH", true, &mut out);
        assert!(r.damage());
        let f = encode_frame(1, b"MSH", true);
        feed_all(&mut r, &f[5..], true, &mut out);
        assert_eq!(
            out,
            vec![
                Output::Reply(ACK),
                Output::Error(LineError::Parity),
                Output::Reply(NAK)
            ]
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u32 = 99;
        let mut r = Receiver::new(8, 64);
        let mut out = Vec::new();
        for i in 0..300_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let b = match x % 13 {
                0 => STX,
                1 => ETX,
                2 => ETB,
                3 => ENQ,
                4 => EOT,
                5 => CR,
                6 => LF,
                _ => x as u8,
            };
            if r.feed(&[b], &mut out) == 0 {
                r.verdict(x.is_multiple_of(2));
            }
            if i % 1000 == 0 {
                r.timeout(&mut out);
            }
            out.clear();
        }
    }
}
