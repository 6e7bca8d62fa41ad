//! STX/ETX framing: `<STX> message <ETX> [checksum]`, the simplest framing serial devices use.
//!
//! The checksum, when configured, covers the message bytes and the ETX (not the STX):
//! `sum_hex` is their mod-256 sum as two hex characters (as in ASTM E1381), `lrc` their XOR as
//! one raw byte. Bytes outside frames (noise, the CR LF some devices add) are skipped and
//! counted; an STX inside a frame restarts it (the partial frame is dropped and counted); a frame
//! over the limit is drained to its ETX and reported as [`Event::Oversize`].

use super::ascii::{ETX, STX};
use super::{Checksum, Event, LineError, hex_val, hex2};

/// Incremental STX/ETX decoder.
#[derive(Debug)]
pub struct Decoder {
    max_frame: usize,
    checksum: Checksum,
    state: State,
    body: Vec<u8>,
    sum: u8,
    xor: u8,
    damaged: bool,
    skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    InFrame,
    /// After ETX: `got` checksum bytes read so far.
    Check {
        got: [u8; 2],
        n: usize,
    },
    /// Inside an oversize frame (content dropped); `check` once its ETX was seen.
    Draining {
        len: usize,
        check: Option<usize>,
    },
}

impl Decoder {
    pub fn new(max_frame: usize, checksum: Checksum) -> Decoder {
        Decoder {
            max_frame,
            checksum,
            state: State::Idle,
            body: Vec::new(),
            sum: 0,
            xor: 0,
            damaged: false,
            skipped: 0,
        }
    }

    /// Bytes discarded outside frames so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// True when a frame has started but not ended.
    pub fn in_frame(&self) -> bool {
        self.state != State::Idle
    }

    /// A character was lost to a line error: the frame in progress, if any, is spoiled.
    /// Returns whether a frame was in progress.
    pub fn damage(&mut self) -> bool {
        self.damaged |= self.in_frame();
        self.in_frame()
    }

    fn checksum_len(&self) -> usize {
        match self.checksum {
            Checksum::None => 0,
            Checksum::SumHex => 2,
            Checksum::Lrc => 1,
        }
    }

    fn start(&mut self) -> State {
        self.body.clear();
        self.sum = 0;
        self.xor = 0;
        self.damaged = false;
        State::InFrame
    }

    fn finish(&mut self, out: &mut Vec<Event>, checksum_ok: bool) {
        let body = std::mem::take(&mut self.body);
        if self.damaged {
            out.push(Event::Damaged {
                body,
                error: LineError::Parity,
            });
        } else if !checksum_ok {
            out.push(Event::Damaged {
                body,
                error: LineError::Checksum,
            });
        } else {
            out.push(Event::Message(body));
        }
        self.damaged = false;
    }

    /// Feeds `input`, appending events to `out`. Every byte is consumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Event>) {
        for &b in input {
            self.step(b, out);
        }
    }

    fn step(&mut self, b: u8, out: &mut Vec<Event>) {
        self.state = match self.state {
            State::Idle => {
                if b == STX {
                    self.start()
                } else {
                    self.skipped += 1;
                    State::Idle
                }
            }
            State::InFrame => match b {
                ETX => {
                    self.sum = self.sum.wrapping_add(ETX);
                    self.xor ^= ETX;
                    if self.checksum_len() == 0 {
                        self.finish(out, true);
                        State::Idle
                    } else {
                        State::Check { got: [0; 2], n: 0 }
                    }
                }
                STX => {
                    // The sender restarted: drop the partial frame (never acknowledged).
                    self.skipped += self.body.len() as u64 + 1;
                    out.push(Event::Error(LineError::Framing));
                    self.start()
                }
                _ => {
                    if self.body.len() >= self.max_frame {
                        let len = self.body.len() + 1;
                        self.body = Vec::new();
                        State::Draining { len, check: None }
                    } else {
                        self.body.push(b);
                        self.sum = self.sum.wrapping_add(b);
                        self.xor ^= b;
                        State::InFrame
                    }
                }
            },
            State::Check { mut got, n } => {
                if self.checksum == Checksum::SumHex && hex_val(b).is_none() {
                    // Not a checksum character: the frame is bad; look at this byte afresh.
                    self.finish(out, false);
                    self.state = State::Idle;
                    return self.step(b, out);
                }
                got[n] = b;
                let n = n + 1;
                if n < self.checksum_len() {
                    State::Check { got, n }
                } else {
                    let ok = match self.checksum {
                        Checksum::None => true,
                        Checksum::Lrc => got[0] == self.xor,
                        Checksum::SumHex => {
                            let want = hex2(self.sum);
                            got[0].eq_ignore_ascii_case(&want[0])
                                && got[1].eq_ignore_ascii_case(&want[1])
                        }
                    };
                    self.finish(out, ok);
                    State::Idle
                }
            }
            State::Draining { len, check: None } => match b {
                ETX if self.checksum_len() == 0 => {
                    out.push(Event::Oversize { len });
                    State::Idle
                }
                ETX => State::Draining {
                    len,
                    check: Some(0),
                },
                STX => {
                    // The oversize frame never ended; a new one starts.
                    out.push(Event::Error(LineError::Oversize));
                    self.start()
                }
                _ => State::Draining {
                    len: len.saturating_add(1),
                    check: None,
                },
            },
            State::Draining {
                len,
                check: Some(n),
            } => {
                if n + 1 >= self.checksum_len() {
                    out.push(Event::Oversize { len });
                    State::Idle
                } else {
                    State::Draining {
                        len,
                        check: Some(n + 1),
                    }
                }
            }
        };
    }
}

/// Frames `body` as `<STX> body <ETX> [checksum]`.
pub fn encode(body: &[u8], checksum: Checksum) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 4);
    v.push(STX);
    v.extend_from_slice(body);
    v.push(ETX);
    let covered = &v[1..];
    match checksum {
        Checksum::None => {}
        Checksum::SumHex => {
            let sum = covered.iter().fold(0u8, |a, b| a.wrapping_add(*b));
            v.extend_from_slice(&hex2(sum));
        }
        Checksum::Lrc => {
            let x = covered.iter().fold(0u8, |a, b| a ^ *b);
            v.push(x);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: usize, ck: Checksum, chunks: &[&[u8]]) -> (Vec<Event>, u64) {
        let mut d = Decoder::new(max, ck);
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, &mut out);
        }
        (out, d.skipped())
    }

    fn msg(b: &[u8]) -> Event {
        Event::Message(b.to_vec())
    }

    #[test]
    fn round_trip_every_checksum() {
        for ck in [Checksum::None, Checksum::SumHex, Checksum::Lrc] {
            let (e, s) = run(100, ck, &[&encode(b"MSH|^~\\&|A\r", ck)]);
            assert_eq!(e, vec![msg(b"MSH|^~\\&|A\r")], "{ck:?}");
            assert_eq!(s, 0);
        }
    }

    #[test]
    fn sum_hex_is_the_astm_checksum() {
        // "A" (0x41) + ETX (0x03) = 0x44.
        assert_eq!(encode(b"A", Checksum::SumHex), b"\x02A\x0344");
        // XOR: 0x41 ^ 0x03 = 0x42.
        assert_eq!(encode(b"A", Checksum::Lrc), b"\x02A\x03\x42");
        // Lower-case hex is accepted.
        let (e, _) = run(10, Checksum::SumHex, &[b"\x02\xcc\x03cf"]);
        assert_eq!(e, vec![msg(b"\xcc")]);
    }

    #[test]
    fn split_at_every_byte_boundary_with_noise() {
        for ck in [Checksum::None, Checksum::SumHex, Checksum::Lrc] {
            let mut wire = b"\r\nnoise".to_vec();
            wire.extend(encode(b"MSH|a\r", ck));
            wire.extend(b"\r\n");
            wire.extend(encode(b"MSH|b\r", ck));
            for cut in 0..=wire.len() {
                for cut2 in cut..=wire.len() {
                    let (e, s) = run(100, ck, &[&wire[..cut], &wire[cut..cut2], &wire[cut2..]]);
                    assert_eq!(e, vec![msg(b"MSH|a\r"), msg(b"MSH|b\r")], "{ck:?} {cut}");
                    assert_eq!(s, 9);
                }
            }
        }
    }

    #[test]
    fn wrong_checksum_is_damaged_and_next_frame_works() {
        let mut wire = b"\x02MSH|x\r\x03".to_vec();
        wire.extend(b"00");
        wire.extend(encode(b"ok", Checksum::SumHex));
        let (e, _) = run(100, Checksum::SumHex, &[&wire]);
        assert_eq!(
            e,
            vec![
                Event::Damaged {
                    body: b"MSH|x\r".to_vec(),
                    error: LineError::Checksum
                },
                msg(b"ok")
            ]
        );
        // A missing checksum: the next STX is not taken as a checksum character.
        let (e, _) = run(
            100,
            Checksum::SumHex,
            &[b"\x02a\x03\x02b\x03", &hex2(b'b' + 3)],
        );
        assert_eq!(
            e,
            vec![
                Event::Damaged {
                    body: b"a".to_vec(),
                    error: LineError::Checksum
                },
                msg(b"b")
            ]
        );
    }

    #[test]
    fn restart_and_oversize() {
        let (e, s) = run(100, Checksum::None, &[b"\x02part\x02whole\x03"]);
        assert_eq!(e, vec![Event::Error(LineError::Framing), msg(b"whole")]);
        assert_eq!(s, 5);
        let mut wire = vec![STX];
        wire.extend([b'x'; 50]);
        wire.extend([ETX, b'9', b'9']);
        wire.extend(encode(b"ok", Checksum::SumHex));
        let (e, _) = run(10, Checksum::SumHex, &[&wire]);
        assert_eq!(e, vec![Event::Oversize { len: 50 }, msg(b"ok")]);
    }

    #[test]
    fn damage_spoils_only_the_frame_in_progress() {
        let mut d = Decoder::new(100, Checksum::None);
        let mut out = Vec::new();
        assert!(!d.damage(), "outside a frame");
        d.feed(b"\x02ab", &mut out);
        assert!(d.damage());
        d.feed(b"c\x03\x02ok\x03", &mut out);
        assert_eq!(
            out,
            vec![
                Event::Damaged {
                    body: b"abc".to_vec(),
                    error: LineError::Parity
                },
                msg(b"ok")
            ]
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every decoder state sees every byte value.
        let mut x: u32 = 12345;
        for ck in [Checksum::None, Checksum::SumHex, Checksum::Lrc] {
            let mut d = Decoder::new(16, ck);
            let mut out = Vec::new();
            for _ in 0..200_000 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let b = if x.is_multiple_of(5) {
                    STX
                } else if x.is_multiple_of(7) {
                    ETX
                } else {
                    x as u8
                };
                d.feed(&[b], &mut out);
                if x.is_multiple_of(11) {
                    d.damage();
                }
                out.clear();
            }
        }
    }
}
