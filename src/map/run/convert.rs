//! The function library (`fn:`) and conversions to FHIR primitives (`as:`, or the target's type).

use super::{RunContext, Runner};
use crate::fhir::tree::Json;
use crate::fhir::{nhs, time};
use crate::map::plan::{Convert, Func, Plan, RulePlan};

/// Applies one function; `None` means "no value" (an NHS number failing its check).
pub(super) fn apply(f: &Func, text: String, cx: &RunContext<'_>, plan: &Plan) -> Option<String> {
    Some(match f {
        // Most values need no trimming: keep the string then (no copy).
        Func::Trim if !needs_trim(&text) => text,
        Func::Trim => text.trim().to_string(),
        Func::Upper => text.to_uppercase(),
        Func::Lower => text.to_lowercase(),
        Func::Split(sep, n) => {
            let parts: Vec<&str> = text.split(sep.as_str()).collect();
            let i = if *n > 0 {
                usize::try_from(*n - 1).ok()?
            } else {
                parts
                    .len()
                    .checked_sub(usize::try_from(n.unsigned_abs()).ok()?)?
            };
            parts.get(i)?.to_string()
        }
        Func::Prefix(p) => {
            let mut out = String::with_capacity(p.len() + text.len());
            out.push_str(p);
            out.push_str(&text);
            out
        }
        Func::Suffix(s) => {
            let mut text = text;
            text.push_str(s);
            text
        }
        Func::Replace(a, b) => text.replace(a.as_str(), b),
        Func::Hash => {
            let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut out = String::with_capacity(64);
            for b in d.as_ref() {
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
            out
        }
        Func::NhsNumber => {
            let n = nhs::normalise_nhs_number(&text)?;
            if !nhs::is_valid_nhs_number(&n) {
                return None;
            }
            n
        }
        Func::System => cx.site.local_system(text.trim()),
        Func::Lookup(i) => plan.valuemaps.get(*i)?.get(&text)?.0.to_string(),
    })
}

/// Whether `str::trim` would change `text`; settled by its first and last bytes when both are
/// printable ASCII (nearly every value), without the Unicode-aware scan.
fn needs_trim(text: &str) -> bool {
    match (text.as_bytes().first(), text.as_bytes().last()) {
        (Some(a), Some(b)) if a.is_ascii_graphic() && b.is_ascii_graphic() => false,
        _ => text.trim().len() != text.len(),
    }
}

/// HL7 TM (`HHMM[SS[.S+]]`, or the time part of a TS) to FHIR `time` (`hh:mm:ss[.s]`).
fn hl7_time(t: &str) -> Option<String> {
    let t = t.trim();
    // Drop an offset; FHIR `time` has none.
    let t = t.split(['+', '-']).next()?;
    let (main, frac) = match t.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (t, None),
    };
    let main = if main.len() > 6 { main.get(8..)? } else { main };
    if !main.chars().all(|c| c.is_ascii_digit()) || !matches!(main.len(), 2 | 4 | 6) {
        return None;
    }
    let num = |a: usize| main.get(a..a + 2).and_then(|x| x.parse::<u32>().ok());
    let h = num(0)?;
    let m = if main.len() >= 4 { num(2)? } else { 0 };
    let s = if main.len() >= 6 { num(4)? } else { 0 };
    if h > 23 || m > 59 || s > 59 {
        return None;
    }
    let mut out = format!("{h:02}:{m:02}:{s:02}");
    if let Some(f) = frac {
        if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        out.push('.');
        out.push_str(f);
    }
    Some(out)
}

impl Runner<'_, '_> {
    pub(super) fn convert(&mut self, rule: &RulePlan, text: String) -> Option<Json> {
        let policy = self.cx.clock_change;
        let origin = &rule.origin;
        let mut warn = |what: &str| {
            self.warnings
                .push(format!("{origin}: {what}; the element was left out"));
        };
        match rule.convert {
            Convert::String | Convert::None => Some(Json::Str(text)),
            Convert::Date => match time::hl7_to_fhir_date(&text) {
                Ok(d) => Some(Json::Str(d)),
                Err(e) => {
                    warn(&format!("not a date ({e})"));
                    None
                }
            },
            Convert::Time => match hl7_time(&text) {
                Some(t) => Some(Json::Str(t)),
                None => {
                    warn("not a time (HHMM[SS[.S]])");
                    None
                }
            },
            Convert::DateTime | Convert::Instant => {
                let res = if rule.convert == Convert::Instant {
                    time::hl7_to_fhir_instant(&text, self.cx.tz, policy)
                } else {
                    time::hl7_to_fhir_datetime(&text, self.cx.tz, policy)
                };
                match res {
                    Ok(dt) => {
                        if let Some(flag) = dt.flag {
                            self.flags.push(flag);
                            self.clock_flags.push(format!(
                                "{origin}: {} (clock_change = {policy})",
                                flag.code()
                            ));
                        }
                        Some(Json::Str(dt.value))
                    }
                    Err(e @ (time::TimeError::Ambiguous | time::TimeError::Nonexistent)) => {
                        if self.refused.is_none() {
                            self.refused = Some(super::RunError {
                                origin: origin.to_string(),
                                message: e.to_string(),
                                defect: false,
                            });
                        }
                        None
                    }
                    Err(e) => {
                        warn(&format!("not a timestamp ({e})"));
                        None
                    }
                }
            }
            Convert::Boolean => match text.trim().to_ascii_uppercase().as_str() {
                "Y" | "YES" | "TRUE" | "T" | "1" => Some(Json::Bool(true)),
                "N" | "NO" | "FALSE" | "F" | "0" => Some(Json::Bool(false)),
                _ => {
                    warn("not a boolean (Y/N)");
                    None
                }
            },
            Convert::Integer => match text.trim().parse::<i64>() {
                Ok(i) => Some(Json::Num(i.into())),
                Err(_) => {
                    warn("not an integer");
                    None
                }
            },
            Convert::Decimal => {
                let t = text.trim();
                // Keep the decimal text exactly (1.50 stays 1.50): FHIR decimals carry precision.
                let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
                let looks_decimal = !digits.is_empty()
                    && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
                    && digits.matches('.').count() <= 1
                    && digits.chars().any(|c| c.is_ascii_digit())
                    && !digits.starts_with('.')
                    && !digits.ends_with('.');
                let t = t.trim_start_matches('+');
                match (looks_decimal, serde_json::from_str::<serde_json::Number>(t)) {
                    (true, Ok(n)) => Some(Json::Num(n)),
                    _ => {
                        warn("not a decimal");
                        None
                    }
                }
            }
            Convert::NhsNumber => match nhs::normalise_nhs_number(&text) {
                Some(n) if nhs::is_valid_nhs_number(&n) => Some(Json::Str(n)),
                _ => {
                    warn("an NHS number fails the modulus 11 check");
                    None
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn needs_trim_agrees_with_trim() {
        for t in [
            "",
            " ",
            "a",
            " a",
            "a ",
            "a b",
            "\u{a0}x",
            "x\u{3000}",
            "é",
            "\ta",
        ] {
            assert_eq!(super::needs_trim(t), t.trim() != t, "{t:?}");
        }
    }

    #[test]
    fn hl7_times() {
        assert_eq!(super::hl7_time("1430").as_deref(), Some("14:30:00"));
        assert_eq!(super::hl7_time("143005.12").as_deref(), Some("14:30:05.12"));
        assert_eq!(
            super::hl7_time("20260715143005+0100").as_deref(),
            Some("14:30:05")
        );
        assert_eq!(super::hl7_time("2561"), None);
        assert_eq!(super::hl7_time("1"), None);
        assert_eq!(super::hl7_time("12.x"), None);
    }
}
