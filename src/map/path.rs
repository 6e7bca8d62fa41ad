//! Paths on both sides of a rule: HL7 source paths (`PID-3[5=NH].1`) and FHIR target paths
//! (`identifier[+].system`). Both are parsed once, when mappings load, into small structs, so a
//! message never pays for string parsing and a typo is an error at load time, with its position.

use std::fmt;

/// Which repetitions of a field a path selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepSelect {
    /// The first repetition (no brackets).
    First,
    /// `[*]`: all repetitions.
    All,
    /// `[n]`: the n-th repetition, 1-based.
    Index(usize),
    /// `[c=A,B]` (also written `[CX.5=A,B]`): the repetitions whose component `c`
    /// (subcomponent `s`) is one of the values; `!=`: none of them.
    Filter {
        component: usize,
        sub: usize,
        values: Vec<String>,
        negate: bool,
    },
}

/// An HL7 source path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hl7Path {
    /// `SEG`, `SEG-f`, `SEG-f[r]`, `SEG-f.c`, `SEG-f.c.s`, and `SEG[n]-...` for the n-th
    /// occurrence of the segment.
    Absolute {
        segment: String,
        /// 1-based occurrence of the segment within the scope being read (default 1).
        occurrence: usize,
        field: Option<usize>,
        rep: RepSelect,
        component: Option<usize>,
        sub: Option<usize>,
    },
    /// `.c` or `.c.s`: relative to the repetition being iterated (in a datatype map or `for`).
    Relative {
        component: usize,
        sub: Option<usize>,
    },
}

impl Hl7Path {
    /// Parses a path; the error says what was expected.
    pub fn parse(s: &str) -> Result<Hl7Path, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('.') {
            let (component, sub) = parse_comp_sub(rest)?;
            return Ok(Hl7Path::Relative { component, sub });
        }
        let (head, rest) = match s.find('-') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let (segment, occurrence) = match head.split_once('[') {
            None => (head, 1),
            Some((seg, occ)) => {
                let n = occ
                    .strip_suffix(']')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        format!("`{s}`: a segment occurrence is `{seg}[n]` with n from 1, e.g. `OBX[2]-5`")
                    })?;
                (seg, n)
            }
        };
        if segment.len() != 3
            || !segment
                .chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_uppercase() || (i > 0 && c.is_ascii_digit()))
        {
            return Err(format!(
                "`{s}`: expected a segment name of 3 capitals/digits such as `PID`, then `-field`"
            ));
        }
        let Some(rest) = rest else {
            return Ok(Hl7Path::Absolute {
                segment: segment.to_string(),
                occurrence,
                field: None,
                rep: RepSelect::First,
                component: None,
                sub: None,
            });
        };
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let field: usize = rest[..digits_end]
            .parse()
            .map_err(|_| format!("`{s}`: expected a field number after `{segment}-`"))?;
        if field == 0 || field > 999 {
            return Err(format!("`{s}`: field numbers run from 1 to 999"));
        }
        let mut rest = &rest[digits_end..];
        let mut rep = RepSelect::First;
        if let Some(r) = rest.strip_prefix('[') {
            let end = r
                .find(']')
                .ok_or_else(|| format!("`{s}`: `[` without a closing `]`"))?;
            rep = parse_rep(&r[..end]).map_err(|e| format!("`{s}`: {e}"))?;
            rest = &r[end + 1..];
        }
        let (component, sub) = if rest.is_empty() {
            (None, None)
        } else if let Some(cs) = rest.strip_prefix('.') {
            let (c, sub) = parse_comp_sub(cs).map_err(|e| format!("`{s}`: {e}"))?;
            (Some(c), sub)
        } else {
            return Err(format!("`{s}`: unexpected `{rest}` after the field"));
        };
        Ok(Hl7Path::Absolute {
            segment: segment.to_string(),
            occurrence,
            field: Some(field),
            rep,
            component,
            sub,
        })
    }

    /// The segment an absolute path names.
    pub fn segment(&self) -> Option<&str> {
        match self {
            Hl7Path::Absolute { segment, .. } => Some(segment),
            Hl7Path::Relative { .. } => None,
        }
    }
}

fn parse_rep(inner: &str) -> Result<RepSelect, String> {
    let inner = inner.trim();
    if inner == "*" {
        return Ok(RepSelect::All);
    }
    if let Some((lhs, vals)) = inner.split_once('=') {
        let (lhs, negate) = match lhs.strip_suffix('!') {
            Some(l) => (l, true),
            None => (lhs, false),
        };
        // `CX.5` names the datatype for the reader; only the numbers count.
        let lhs = lhs.trim();
        let numbers = match lhs.split_once('.') {
            Some((dt, rest)) if dt.chars().all(|c| c.is_ascii_uppercase()) && !dt.is_empty() => {
                rest
            }
            _ => lhs,
        };
        let (component, sub) = parse_comp_sub(numbers).map_err(|_| {
            format!("`[{inner}]`: expected `[component=value]`, e.g. `[5=NH]` or `[CX.5=NH,NHS]`")
        })?;
        let values: Vec<String> = vals.split(',').map(|v| v.trim().to_string()).collect();
        return Ok(RepSelect::Filter {
            component,
            sub: sub.unwrap_or(1),
            values,
            negate,
        });
    }
    match inner.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!(
            "`[{inner}]`: expected `[*]`, a repetition number from 1, or `[component=value]`"
        )),
        Ok(n) => Ok(RepSelect::Index(n)),
    }
}

fn parse_comp_sub(s: &str) -> Result<(usize, Option<usize>), String> {
    let mut parts = s.split('.');
    let c = parts.next().unwrap_or("");
    let component: usize = c
        .parse()
        .map_err(|_| format!("expected a component number, found `{c}`"))?;
    let sub = match parts.next() {
        None => None,
        Some(x) => Some(
            x.parse::<usize>()
                .map_err(|_| format!("expected a subcomponent number, found `{x}`"))?,
        ),
    };
    if parts.next().is_some() {
        return Err("a path goes no deeper than field.component.subcomponent".into());
    }
    if component == 0 || sub == Some(0) {
        return Err("components and subcomponents are numbered from 1".into());
    }
    Ok((component, sub))
}

impl fmt::Display for Hl7Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let comp_sub = |f: &mut fmt::Formatter<'_>, c: Option<usize>, s: Option<usize>| {
            if let Some(c) = c {
                write!(f, ".{c}")?;
            }
            if let Some(s) = s {
                write!(f, ".{s}")?;
            }
            Ok(())
        };
        match self {
            Hl7Path::Relative { component, sub } => comp_sub(f, Some(*component), *sub),
            Hl7Path::Absolute {
                segment,
                occurrence,
                field,
                rep,
                component,
                sub,
            } => {
                f.write_str(segment)?;
                if *occurrence != 1 {
                    write!(f, "[{occurrence}]")?;
                }
                if let Some(field) = field {
                    write!(f, "-{field}")?;
                }
                match rep {
                    RepSelect::First => {}
                    RepSelect::All => f.write_str("[*]")?,
                    RepSelect::Index(n) => write!(f, "[{n}]")?,
                    RepSelect::Filter {
                        component,
                        sub,
                        values,
                        negate,
                    } => {
                        let op = if *negate { "!=" } else { "=" };
                        write!(f, "[{component}.{sub}{op}{}]", values.join(","))?
                    }
                }
                comp_sub(f, *component, *sub)
            }
        }
    }
}

/// Where in an array a target step writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// Not an array step.
    None,
    /// `[n]`, 0-based as in FHIRPath.
    At(usize),
    /// `[+]`: a new element at the end.
    Append,
    /// `[=]`: the last element (created if the array is empty).
    Last,
}

/// One step of a FHIR target path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The element name; once the path is checked against the FHIR R4 catalogue, the
    /// catalogue's own `&'static str`, so the elements a rule writes carry it at no cost.
    pub name: crate::fhir::tree::Key,
    pub index: Index,
}

/// A FHIR element path relative to the element being built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPath(pub Vec<Step>);

impl TargetPath {
    pub fn parse(s: &str) -> Result<TargetPath, String> {
        let mut steps = Vec::new();
        for raw in s.trim().split('.') {
            let (name, index) = match raw.find('[') {
                None => (raw, Index::None),
                Some(i) => {
                    let inner = raw[i + 1..]
                        .strip_suffix(']')
                        .ok_or_else(|| format!("`{s}`: `{raw}` has `[` without a final `]`"))?;
                    let index = match inner {
                        "+" => Index::Append,
                        "=" => Index::Last,
                        n => Index::At(n.parse().map_err(|_| {
                            format!("`{s}`: `[{inner}]` must be a number from 0, `[+]` (new) or `[=]` (last)")
                        })?),
                    };
                    (&raw[..i], index)
                }
            };
            let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "`{s}`: `{name}` is not an element name (letters and digits, e.g. `name[0].family`)"
                ));
            }
            steps.push(Step {
                name: name.to_string().into(),
                index,
            });
        }
        Ok(TargetPath(steps))
    }
}

impl fmt::Display for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(&s.name)?;
            match s.index {
                Index::None => {}
                Index::At(n) => write!(f, "[{n}]")?,
                Index::Append => f.write_str("[+]")?,
                Index::Last => f.write_str("[=]")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hl7_paths() {
        assert_eq!(
            Hl7Path::parse("PID-3[5=NH,NHS].1").unwrap(),
            Hl7Path::Absolute {
                segment: "PID".into(),
                occurrence: 1,
                field: Some(3),
                rep: RepSelect::Filter {
                    component: 5,
                    sub: 1,
                    values: vec!["NH".into(), "NHS".into()],
                    negate: false,
                },
                component: Some(1),
                sub: None
            }
        );
        assert_eq!(
            Hl7Path::parse("MSH-9.2").unwrap(),
            Hl7Path::Absolute {
                segment: "MSH".into(),
                occurrence: 1,
                field: Some(9),
                rep: RepSelect::First,
                component: Some(2),
                sub: None
            }
        );
        assert_eq!(
            Hl7Path::parse(".1.2").unwrap(),
            Hl7Path::Relative {
                component: 1,
                sub: Some(2)
            }
        );
        assert!(matches!(
            Hl7Path::parse("PV1-3[*]").unwrap(),
            Hl7Path::Absolute {
                rep: RepSelect::All,
                ..
            }
        ));
        assert_eq!(
            Hl7Path::parse("PID-3[CX.5 = NH]").unwrap(),
            Hl7Path::parse("PID-3[5=NH]").unwrap()
        );
        assert!(matches!(
            Hl7Path::parse("PID-3[CX.4.1!=RRV]").unwrap(),
            Hl7Path::Absolute {
                rep: RepSelect::Filter {
                    component: 4,
                    sub: 1,
                    negate: true,
                    ..
                },
                ..
            }
        ));
        assert!(matches!(
            Hl7Path::parse("OBX[2]-5").unwrap(),
            Hl7Path::Absolute { occurrence: 2, .. }
        ));
        for p in [
            "OBX[2]-5.1",
            "PID-3[4.1!=A,B].1",
            "PID-3[*]",
            ".1.2",
            "PV1",
            "PID-11[2].5",
        ] {
            assert_eq!(Hl7Path::parse(p).unwrap().to_string(), p);
        }
        for bad in [
            "OBX[0]-5",
            "OBX[x]-5",
            "PID-3[CX.x=1]",
            "pid-3",
            "PID-",
            "PID-0",
            "PID-3[",
            "PID-3[0]",
            "PID-3.0",
            "PID-3.1.2.3",
            "PID3",
            "PID-3x",
            ".",
        ] {
            assert!(Hl7Path::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn target_paths() {
        let p = TargetPath::parse("identifier[+].type.coding[0].code").unwrap();
        assert_eq!(p.0.len(), 4);
        assert_eq!(p.0[0].index, Index::Append);
        assert_eq!(p.0[2].index, Index::At(0));
        assert_eq!(p.to_string(), "identifier[+].type.coding[0].code");
        for bad in ["", "a..b", "name[", "name[x]", "1abc", "na-me"] {
            assert!(TargetPath::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
