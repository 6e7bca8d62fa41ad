//! Picking the n-th part of a delimited HL7 value (`A^B^C`, `X~Y`, `a&b`) without an iterator.
//!
//! Why not `str::split(sep).nth(n)`: mapping a message reads ~600 components, each by walking its
//! repetition from the start, and `split` with a `char` pattern goes through a general searcher
//! (a `memchr` call set up per part, then a UTF-8 check of the match). That was ~15% of mapping
//! time in `perf`. HL7 delimiters are ASCII (`Separators::from_msh` refuses others), and an
//! ASCII byte never occurs inside a multi-byte UTF-8 sequence, so counting that byte in
//! `as_bytes()` finds the same boundaries, and slicing there cannot split a character. Other
//! separators (only possible for a hand-built `Separators`) keep the general path.

/// Part `n` (0-based) of `s` split on `sep`: `Some("")` for an empty part, `None` when `s` has
/// fewer than `n + 1` parts. The same answer as `s.split(sep).nth(n)`.
pub fn nth_part(s: &str, sep: char, n: usize) -> Option<&str> {
    if !sep.is_ascii() {
        return s.split(sep).nth(n);
    }
    let b = sep as u8;
    let bytes = s.as_bytes();
    let mut start = 0;
    if n > 0 {
        let mut left = n;
        let mut found = None;
        for (i, &x) in bytes.iter().enumerate() {
            if x == b {
                left -= 1;
                if left == 0 {
                    found = Some(i + 1);
                    break;
                }
            }
        }
        start = found?;
    }
    let rest = bytes.get(start..)?;
    let end = rest
        .iter()
        .position(|&x| x == b)
        .map_or(bytes.len(), |p| start + p);
    s.get(start..end)
}

/// The parts of `s` split on `sep`, in order: the same items as `s.split(sep)`, found by the
/// byte scan of [`nth_part`] when `sep` is ASCII.
pub fn parts(s: &str, sep: char) -> Parts<'_> {
    Parts { rest: Some(s), sep }
}

/// Iterator returned by [`parts`].
#[derive(Debug, Clone)]
pub struct Parts<'a> {
    /// What is left to split; `None` once the last part was returned.
    rest: Option<&'a str>,
    sep: char,
}

impl<'a> Iterator for Parts<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        let at = if self.sep.is_ascii() {
            let b = self.sep as u8;
            rest.as_bytes().iter().position(|&x| x == b)
        } else {
            rest.find(self.sep)
        };
        match at {
            Some(i) => {
                self.rest = rest.get(i + self.sep.len_utf8()..);
                rest.get(..i)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

/// Whether `s` contains `c` (a byte scan for ASCII `c`; see the module docs).
pub fn contains_char(s: &str, c: char) -> bool {
    if c.is_ascii() {
        s.as_bytes().contains(&(c as u8))
    } else {
        s.contains(c)
    }
}

#[cfg(test)]
mod tests {
    use super::{contains_char, nth_part, parts};

    #[test]
    fn parts_agree_with_split() {
        for s in ["", "A", "A~B", "~", "~~", "A~~C", "Zoë~Ñ~", "~é~", "ü"] {
            for sep in ['~', '^', 'é'] {
                let want: Vec<&str> = s.split(sep).collect();
                assert_eq!(parts(s, sep).collect::<Vec<_>>(), want, "{s:?} {sep}");
                assert_eq!(contains_char(s, sep), s.contains(sep));
            }
        }
    }

    #[test]
    fn agrees_with_split_nth() {
        let cases = [
            "",
            "A",
            "A^B",
            "^",
            "^^",
            "A^^C",
            "Zoë^Ñ^",
            "^é^",
            "a^b^c^d^e^f^g^h",
            "ü",
        ];
        for s in cases {
            for sep in ['^', '&', '~', 'é'] {
                for n in 0..10 {
                    assert_eq!(nth_part(s, sep, n), s.split(sep).nth(n), "{s:?} {sep} {n}");
                }
            }
        }
    }
}
