//! Undoes the POSIX `PARMRK` marking, so that parity and framing errors reach the decoders as
//! events instead of silently wrong bytes.
//!
//! The serial source opens the line with `PARMRK` set and `IGNPAR`/`IGNBRK` clear. The kernel
//! then reports a character received with a parity or framing error (or a break) as the three
//! bytes `0xFF 0x00 c`, and a genuine `0xFF` data byte as `0xFF 0xFF`. Without this, a bad
//! character would be delivered as NUL (or dropped, with `IGNPAR`) and could end up inside a
//! stored message. This state machine turns the stream back into data plus error marks; it must
//! only be used when `PARMRK` is known to be in effect.

/// One piece of the unescaped stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes as sent by the device.
    Data(Vec<u8>),
    /// A character lost to a parity or framing error, or a break.
    Error,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Normal,
    /// Saw `0xFF`.
    Mark,
    /// Saw `0xFF 0x00`: the next byte is the damaged character.
    MarkZero,
}

/// Incremental `PARMRK` unescaper; marks may be split across reads at any byte.
#[derive(Debug, Default)]
pub struct Unmarker {
    state: State,
}

impl Unmarker {
    pub fn new() -> Unmarker {
        Unmarker::default()
    }

    /// Appends the pieces of `input` to `out` (adjacent data is merged).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Piece>) {
        let mut data = Vec::with_capacity(input.len());
        for &b in input {
            self.state = match (self.state, b) {
                (State::Normal, 0xFF) => State::Mark,
                (State::Normal, _) => {
                    data.push(b);
                    State::Normal
                }
                (State::Mark, 0xFF) => {
                    data.push(0xFF);
                    State::Normal
                }
                (State::Mark, 0x00) => State::MarkZero,
                (State::Mark, _) => {
                    // Not a sequence the kernel produces; keep both bytes rather than guess.
                    data.push(0xFF);
                    data.push(b);
                    State::Normal
                }
                (State::MarkZero, _) => {
                    if !data.is_empty() {
                        out.push(Piece::Data(std::mem::take(&mut data)));
                    }
                    out.push(Piece::Error);
                    State::Normal
                }
            };
        }
        if !data.is_empty() {
            out.push(Piece::Data(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut u = Unmarker::new();
        let mut out = Vec::new();
        for c in chunks {
            u.feed(c, &mut out);
        }
        // Merge adjacent data for comparison.
        let mut merged: Vec<Piece> = Vec::new();
        for p in out {
            match (merged.last_mut(), p) {
                (Some(Piece::Data(a)), Piece::Data(b)) => a.extend(b),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    #[test]
    fn plain_data_passes() {
        assert_eq!(run(&[b"abc"]), vec![Piece::Data(b"abc".to_vec())]);
    }

    #[test]
    fn marks_and_doubled_ff_at_every_split() {
        let wire = b"a\xff\xffb\xff\x00\x41c\xff\x00\x00d";
        let want = vec![
            Piece::Data(b"a\xffb".to_vec()),
            Piece::Error,
            Piece::Data(b"c".to_vec()),
            Piece::Error,
            Piece::Data(b"d".to_vec()),
        ];
        for cut in 0..=wire.len() {
            assert_eq!(run(&[&wire[..cut], &wire[cut..]]), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(run(&bytes), want);
    }
}
