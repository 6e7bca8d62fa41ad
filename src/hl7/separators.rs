//! The delimiters a message declares in MSH-1 and MSH-2.
//!
//! HL7 v2 lets every message choose its own delimiters, so nothing in this module may assume
//! `|^~\&`. MSH-2 holds, in order: component, repetition, escape, subcomponent and (since v2.7,
//! optional) truncation. hl7-parser only knows the first four, which is why the truncation
//! character is handled here and hidden from it (see `parse.rs`).

/// The delimiters of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Separators {
    /// MSH-1, usually `|`.
    pub field: char,
    /// Usually `^`.
    pub component: char,
    /// Usually `~`.
    pub repetition: char,
    /// Usually `\`. `parse` always yields `Some`; `None` only comes from `sniff_header` on
    /// input whose MSH-2 was too short to contain one.
    pub escape: Option<char>,
    /// Usually `&`.
    pub subcomponent: char,
    /// v2.7 truncation character (usually `#`), the optional 5th character of MSH-2.
    pub truncation: Option<char>,
}

impl Default for Separators {
    /// The conventional `|^~\&` with no truncation character.
    fn default() -> Self {
        Separators {
            field: '|',
            component: '^',
            repetition: '~',
            escape: Some('\\'),
            subcomponent: '&',
            truncation: None,
        }
    }
}

impl Separators {
    /// The MSH-2 text for these separators (`^~\&`, or `^~\&#` with a truncation character).
    pub fn encoding_characters(&self) -> String {
        let mut s = String::with_capacity(5);
        s.push(self.component);
        s.push(self.repetition);
        if let Some(e) = self.escape {
            s.push(e);
        }
        s.push(self.subcomponent);
        if let Some(t) = self.truncation {
            s.push(t);
        }
        s
    }

    /// All delimiter characters in use (field first).
    pub fn all(&self) -> Vec<char> {
        let mut v = vec![
            self.field,
            self.component,
            self.repetition,
            self.subcomponent,
        ];
        v.extend(self.escape);
        v.extend(self.truncation);
        v
    }

    /// True when every delimiter is distinct and usable (printable ASCII: not a line break,
    /// whitespace or control character). Separators from `parse` always satisfy this; `build_ack` checks it
    /// before trusting separators that came from `sniff_header`.
    pub fn is_usable(&self) -> bool {
        let all = self.all();
        all.iter().all(|c| usable_delimiter(*c))
            && all
                .iter()
                .enumerate()
                .all(|(i, c)| !all[i + 1..].contains(c))
    }

    /// Builds separators from MSH-1 and the MSH-2 text, validating them.
    ///
    /// Returns a static reason on failure (it never echoes message content).
    pub(crate) fn from_msh(field: char, msh2: &str) -> Result<Self, &'static str> {
        let chars: Vec<char> = msh2.chars().collect();
        if chars.len() < 4 {
            return Err(
                "has fewer than 4 characters (component, repetition, escape, subcomponent)",
            );
        }
        if chars.len() > 5 {
            return Err(
                "has more than 5 characters (at most 4 delimiters and a v2.7 truncation character)",
            );
        }
        // hl7-parser reads the delimiters as single ASCII characters; HL7 itself only uses
        // printable ASCII for them.
        if !field.is_ascii() || chars.iter().any(|c| !c.is_ascii()) {
            return Err("contains a non-ASCII character");
        }
        let seps = Separators {
            field,
            component: chars[0],
            repetition: chars[1],
            escape: Some(chars[2]),
            subcomponent: chars[3],
            truncation: chars.get(4).copied(),
        };
        if !seps.all().iter().all(|c| usable_delimiter(*c)) {
            return Err("contains whitespace or a control character");
        }
        if !seps.is_usable() {
            return Err("repeats a delimiter (all delimiters, including MSH-1, must be distinct)");
        }
        Ok(seps)
    }
}

fn usable_delimiter(c: char) -> bool {
    c.is_ascii() && !c.is_ascii_whitespace() && !c.is_ascii_control()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msh2_with_and_without_truncation() {
        let s = Separators::from_msh('|', "^~\\&").unwrap();
        assert_eq!(s, Separators::default());
        assert_eq!(s.encoding_characters(), "^~\\&");
        let t = Separators::from_msh('|', "^~\\&#").unwrap();
        assert_eq!(t.truncation, Some('#'));
        assert_eq!(t.encoding_characters(), "^~\\&#");
    }

    #[test]
    fn msh2_rejections() {
        assert!(Separators::from_msh('|', "^~\\").is_err());
        assert!(Separators::from_msh('|', "^~\\&#$").is_err());
        assert!(Separators::from_msh('|', "^&&^").is_err());
        assert!(Separators::from_msh('|', "^~|&").is_err());
        assert!(Separators::from_msh('|', "^~ &").is_err());
        assert!(Separators::from_msh('|', "^~\\é").is_err());
        // Unusual but legal: hl7apy's `MSH!$r?@!` sample.
        let odd = Separators::from_msh('!', "$r?@").unwrap();
        assert_eq!(odd.repetition, 'r');
        assert_eq!(odd.escape, Some('?'));
    }
}
