//! RFC 8785 JSON Canonicalization Scheme (JCS).
//!
//! Why JCS: a signature covers bytes, but a FHIR Bundle travels as JSON that any hop may re-serialise
//! (key order, whitespace, `1.50` vs `1.5`, `\u00e9` vs `é`). JCS defines one byte sequence per
//! JSON value (members sorted by UTF-16 code units, no whitespace, ECMAScript string and number
//! serialisation), so the exchange can verify the Bundle it parsed without needing our exact
//! bytes, using any RFC 8785 implementation.
//!
//! Two entry points:
//!
//! - [`canonicalize`] is RFC 8785 as written: every number is taken as an IEEE 754 double.
//! - [`canonicalize_strict`] (what signing and verification use) additionally refuses numbers
//!   whose *decimal value* would be altered by that rounding (e.g. `9007199254740993`, or a
//!   decimal with more than ~17 significant digits), and negative zero (RFC 8785 erratum 7920).
//!   `serde_json` here keeps number text exactly (`arbitrary_precision`), and FHIR servers read
//!   `decimal` as arbitrary-precision decimals, so two Bundles that differ only beyond double
//!   precision would otherwise share one signature while meaning different things.
//!
//! Documented property (both entry points): numbers are canonicalised by **value**, so `1.50`,
//! `1.5`, `15e-1` and `1.500` produce the same bytes. A signature therefore does not protect
//! FHIR's trailing-zero precision convention for `decimal` (`1.50` meaning "two decimal places").
//! The signature proves the numeric value; it does not prove how many trailing zeros were sent.

use crate::fhir::json::write_string;
use crate::fhir::tree::Json;
use serde_json::{Number, Value};

/// A JSON tree JCS can read: a `serde_json::Value` (what a verifier parses) or the Bundle's own
/// [`Json`] tree (what the appliance signs), through one canonicaliser so both give the same
/// bytes by construction.
pub trait Tree: Sized {
    fn view(&self) -> View<'_, Self>;
}

/// One node of a [`Tree`]; an object's members in any order (JCS sorts them).
pub enum View<'a, T> {
    Null,
    Bool(bool),
    Num(&'a Number),
    Str(&'a str),
    Arr(&'a [T]),
    Obj(Vec<(&'a str, &'a T)>),
}

impl Tree for Value {
    fn view(&self) -> View<'_, Value> {
        match self {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Number(n) => View::Num(n),
            Value::String(s) => View::Str(s),
            Value::Array(a) => View::Arr(a),
            Value::Object(m) => View::Obj(m.iter().map(|(k, v)| (k.as_str(), v)).collect()),
        }
    }
}

impl Tree for Json {
    fn view(&self) -> View<'_, Json> {
        match self {
            Json::Null => View::Null,
            Json::Bool(b) => View::Bool(*b),
            Json::Num(n) => View::Num(n),
            Json::Str(s) => View::Str(s),
            Json::Arr(a) => View::Arr(a),
            Json::Obj(o) => View::Obj(o.iter().collect()),
        }
    }
}

/// Nesting deeper than this is refused rather than risking the stack (FHIR Bundles are a few
/// dozen levels deep at most; `serde_json` itself refuses more than 128 when parsing).
pub const MAX_DEPTH: usize = 256;

/// Why a value has no canonical form. `path` is a JSON Pointer (RFC 6901) to the offending
/// member; it names FHIR elements, never their values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JcsError {
    /// The number is outside the IEEE 754 double range (it would be Infinity).
    #[error("number at {path:?} is outside the IEEE 754 double range, which JCS (I-JSON) requires")]
    NumberOutOfRange {
        /// JSON Pointer to the number.
        path: String,
    },
    /// Strict mode: the double nearest the number is a different decimal value.
    #[error(
        "number at {path:?} has more precision than an IEEE 754 double holds; a signature over \
         its canonical form would not protect its exact value. Send it with at most 15 significant \
         digits or as a string"
    )]
    InexactNumber {
        /// JSON Pointer to the number.
        path: String,
    },
    /// Strict mode: `-0` canonicalises to `0`, so it could be swapped undetected.
    #[error("number at {path:?} is negative zero, which JCS cannot distinguish from 0; send 0")]
    NegativeZero {
        /// JSON Pointer to the number.
        path: String,
    },
    /// The number's text is not a JSON number (only possible for hand-built `Number`s).
    #[error("number at {path:?} is not valid JSON number text")]
    MalformedNumber {
        /// JSON Pointer to the number.
        path: String,
    },
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("JSON nesting at {path:?} is deeper than {MAX_DEPTH} levels")]
    TooDeep {
        /// JSON Pointer to where the limit was hit.
        path: String,
    },
}

impl JcsError {
    /// Prefixes the pointer with one more (outer) reference token while unwinding.
    fn within(mut self, token: &str) -> JcsError {
        let escaped = token.replace('~', "~0").replace('/', "~1");
        let path = match &mut self {
            JcsError::NumberOutOfRange { path }
            | JcsError::InexactNumber { path }
            | JcsError::NegativeZero { path }
            | JcsError::MalformedNumber { path }
            | JcsError::TooDeep { path } => path,
        };
        *path = format!("/{escaped}{path}");
        self
    }
}

#[derive(Clone, Copy)]
struct Mode<'a> {
    strict: bool,
    /// A member of the top-level object to leave out (e.g. `Bundle.signature`).
    skip_top: Option<&'a str>,
}

/// RFC 8785 canonical form of `value`. Numbers are rounded to IEEE 754 doubles as the RFC
/// prescribes; only out-of-range numbers are refused.
pub fn canonicalize<T: Tree>(value: &T) -> Result<Vec<u8>, JcsError> {
    let mut out = Vec::new();
    let mode = Mode {
        strict: false,
        skip_top: None,
    };
    write_value(value, &mut out, mode, 0)?;
    Ok(out)
}

/// [`canonicalize`], but refusing numbers whose value the double rounding would change and
/// negative zero (see the module docs). Output, when produced, is identical to
/// [`canonicalize`]'s, so any RFC 8785 implementation verifies it.
pub fn canonicalize_strict<T: Tree>(value: &T) -> Result<Vec<u8>, JcsError> {
    let mut out = Vec::new();
    let mode = Mode {
        strict: true,
        skip_top: None,
    };
    write_value(value, &mut out, mode, 0)?;
    Ok(out)
}

/// [`canonicalize_strict`] of `value` as if its top-level member `member` were absent, without
/// copying or modifying it (used for "the Bundle without its `signature`").
pub fn canonicalize_strict_without<T: Tree>(value: &T, member: &str) -> Result<Vec<u8>, JcsError> {
    let mut out = Vec::new();
    let mode = Mode {
        strict: true,
        skip_top: Some(member),
    };
    write_value(value, &mut out, mode, 0)?;
    Ok(out)
}

fn write_value<T: Tree>(
    v: &T,
    out: &mut Vec<u8>,
    mode: Mode,
    depth: usize,
) -> Result<(), JcsError> {
    if depth > MAX_DEPTH {
        return Err(JcsError::TooDeep {
            path: String::new(),
        });
    }
    match v.view() {
        View::Null => out.extend_from_slice(b"null"),
        View::Bool(true) => out.extend_from_slice(b"true"),
        View::Bool(false) => out.extend_from_slice(b"false"),
        View::Num(n) => write_number(n, out, mode)?,
        View::Str(s) => write_string(s, out),
        View::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out, mode, depth + 1).map_err(|e| e.within(&i.to_string()))?;
            }
            out.push(b']');
        }
        View::Obj(mut members) => {
            if depth == 0
                && let Some(skip) = mode.skip_top
            {
                members.retain(|(name, _)| *name != skip);
            }
            members.sort_unstable_by(|a, b| utf16_order(a.0, b.0));
            out.push(b'{');
            for (i, (name, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(name, out);
                out.push(b':');
                write_value(member, out, mode, depth + 1).map_err(|e| e.within(name))?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// The order of `a` and `b` as UTF-16 code units (RFC 8785 3.2.3), without transcoding.
///
/// UTF-8 byte order is code point order, and so is UTF-16 order except in one case: a character
/// at or above U+10000 is a surrogate pair (0xD800..0xDBFF), which sorts *before* U+E000..U+FFFF.
/// So the first differing byte decides, unless it is the lead byte of a U+E000..U+FFFF character
/// (0xEE, 0xEF) facing the lead byte of a four-byte character (0xF0..0xF4). (Keys are unique,
/// and member names sort once per object of every Bundle signed: transcoding each comparison
/// cost more than the sorting itself.)
fn utf16_order(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    match a.iter().zip(b).find(|(x, y)| x != y) {
        None => a.len().cmp(&b.len()),
        Some((&x, &y)) => match (x, y) {
            (0xEE..=0xEF, 0xF0..) => std::cmp::Ordering::Greater,
            (0xF0.., 0xEE..=0xEF) => std::cmp::Ordering::Less,
            _ => x.cmp(&y),
        },
    }
}

fn write_number(n: &Number, out: &mut Vec<u8>, mode: Mode) -> Result<(), JcsError> {
    let text = n.as_str();
    let Some(decimal) = Decimal::parse(text) else {
        return Err(JcsError::MalformedNumber {
            path: String::new(),
        });
    };
    // Rust's float parsing is correctly rounded (round-half-even), as ECMAScript's is.
    let f: f64 = text.parse().map_err(|_| JcsError::MalformedNumber {
        path: String::new(),
    })?;
    let formatted = format_f64(f).ok_or(JcsError::NumberOutOfRange {
        path: String::new(),
    })?;
    if mode.strict {
        if decimal.negative && decimal.digits.is_empty() {
            return Err(JcsError::NegativeZero {
                path: String::new(),
            });
        }
        if Decimal::parse(&formatted).as_ref() != Some(&decimal) {
            return Err(JcsError::InexactNumber {
                path: String::new(),
            });
        }
    }
    out.extend_from_slice(formatted.as_bytes());
    Ok(())
}

/// ECMAScript `Number.prototype.toString` of a finite double (`-0` gives `0`); `None` for NaN
/// and the infinities, which JSON cannot express.
pub fn format_f64(f: f64) -> Option<String> {
    if !f.is_finite() {
        return None;
    }
    if f == 0.0 {
        return Some("0".to_owned());
    }
    let mut buf = ryu_js::Buffer::new();
    Some(buf.format_finite(f).to_owned())
}

/// An exact decimal value: `(-1)^negative × digits × 10^exponent`, with `digits` free of leading
/// and trailing zeros (empty for zero), so equal values compare equal.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    /// Parses JSON number text (RFC 8259 grammar; also the `e+` that ECMAScript emits).
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, text),
        };
        let (mantissa, exp_text) = match rest.find(['e', 'E']) {
            Some(p) => (&rest[..p], Some(&rest[p + 1..])),
            None => (rest, None),
        };
        let (int, frac) = match mantissa.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (mantissa, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || (int.len() > 1 && int.starts_with('0')) {
            return None;
        }
        if let Some(f) = frac
            && !all_digits(f)
        {
            return None;
        }
        let mut exponent: i64 = match exp_text {
            None => 0,
            Some(e) => {
                let (neg, digits) = match e.as_bytes().first() {
                    Some(b'+') => (false, &e[1..]),
                    Some(b'-') => (true, &e[1..]),
                    _ => (false, e),
                };
                if !all_digits(digits) {
                    return None;
                }
                let mut v: i64 = 0;
                for b in digits.bytes() {
                    // Saturate: such exponents are far outside double range either way, and the
                    // caller's f64 parse decides between Infinity (refused) and 0 (inexact).
                    v = v.saturating_mul(10).saturating_add(i64::from(b - b'0'));
                }
                if neg { -v } else { v }
            }
        };
        let frac = frac.unwrap_or("");
        exponent = exponent.saturating_sub(i64::try_from(frac.len()).ok()?);
        let mut digits: String = int.chars().chain(frac.chars()).collect();
        while digits.ends_with('0') {
            digits.pop();
            exponent = exponent.saturating_add(1);
        }
        let digits = digits.trim_start_matches('0').to_owned();
        if digits.is_empty() {
            exponent = 0;
        }
        Some(Decimal {
            negative,
            digits,
            exponent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_order_is_utf16_order_for_every_class_of_character() {
        let chars = [
            "",
            "a",
            "z",
            "\u{7f}",
            "\u{80}",
            "\u{7ff}",
            "\u{800}",
            "\u{d7ff}",
            "\u{e000}",
            "\u{efff}",
            "\u{f000}",
            "\u{ffff}",
            "\u{10000}",
            "\u{1f600}",
            "\u{10ffff}",
        ];
        let mut names = Vec::new();
        for a in chars {
            for b in chars {
                names.push(format!("{a}{b}"));
                names.push(format!("k{a}x{b}"));
            }
        }
        for a in &names {
            for b in &names {
                assert_eq!(
                    utf16_order(a, b),
                    a.encode_utf16().cmp(b.encode_utf16()),
                    "{a:?} {b:?}"
                );
            }
        }
    }
    use serde_json::json;

    fn jcs(v: &Value) -> String {
        String::from_utf8(canonicalize(v).unwrap()).unwrap()
    }

    fn number(text: &str) -> Value {
        Value::Number(serde_json::from_str::<Number>(text).unwrap())
    }

    /// RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
    #[test]
    fn rfc8785_appendix_b_numbers() {
        let vectors: &[(u64, &str)] = &[
            (0x0000_0000_0000_0000, "0"),
            (0x8000_0000_0000_0000, "0"),
            (0x0000_0000_0000_0001, "5e-324"),
            (0x8000_0000_0000_0001, "-5e-324"),
            (0x7fef_ffff_ffff_ffff, "1.7976931348623157e+308"),
            (0xffef_ffff_ffff_ffff, "-1.7976931348623157e+308"),
            (0x4340_0000_0000_0000, "9007199254740992"),
            (0xc340_0000_0000_0000, "-9007199254740992"),
            (0x4430_0000_0000_0000, "295147905179352830000"),
            (0x44b5_2d02_c7e1_4af5, "9.999999999999997e+22"),
            (0x44b5_2d02_c7e1_4af6, "1e+23"),
            (0x44b5_2d02_c7e1_4af7, "1.0000000000000001e+23"),
            (0x444b_1ae4_d6e2_ef4e, "999999999999999700000"),
            (0x444b_1ae4_d6e2_ef4f, "999999999999999900000"),
            (0x444b_1ae4_d6e2_ef50, "1e+21"),
            (0x3eb0_c6f7_a0b5_ed8c, "9.999999999999997e-7"),
            (0x3eb0_c6f7_a0b5_ed8d, "0.000001"),
            (0x41b3_de43_5555_5553, "333333333.3333332"),
            (0x41b3_de43_5555_5554, "333333333.33333325"),
            (0x41b3_de43_5555_5555, "333333333.3333333"),
            (0x41b3_de43_5555_5556, "333333333.3333334"),
            (0x41b3_de43_5555_5557, "333333333.33333343"),
            (0xbecb_f647_612f_3696, "-0.0000033333333333333333"),
            (0x4314_3ff3_c1cb_0959, "1424953923781206.2"),
        ];
        for &(bits, expected) in vectors {
            let f = f64::from_bits(bits);
            assert_eq!(format_f64(f).as_deref(), Some(expected), "{bits:#018x}");
            // And through a JSON value holding the shortest text, in both modes.
            if f != 0.0 || !f.is_sign_negative() {
                let v = number(expected);
                assert_eq!(jcs(&v), expected, "{bits:#018x}");
                assert_eq!(canonicalize_strict(&v).unwrap(), expected.as_bytes());
            }
        }
        // NaN and Infinity have no JSON form.
        for bits in [0x7fff_ffff_ffff_ffff_u64, 0x7ff0_0000_0000_0000] {
            assert_eq!(format_f64(f64::from_bits(bits)), None);
        }
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        for text in ["1e400", "-1e309", "2e308"] {
            assert_eq!(
                canonicalize(&json!({"a": [number(text)]})),
                Err(JcsError::NumberOutOfRange {
                    path: "/a/0".into()
                })
            );
        }
    }

    /// RFC 8785 section 3.2.3: sorting by UTF-16 code units (the emoji's surrogates sort below
    /// U+FB33 although its code point is higher).
    #[test]
    fn rfc8785_sorting_example() {
        let input = r#"{
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\ud83d\ude00": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        let expected = "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\
                        \"ö\":\"Latin Small Letter O With Diaeresis\",\"€\":\"Euro Sign\",\
                        \"😀\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
        assert_eq!(jcs(&v), expected);
    }

    /// RFC 8785 section 3.2.2 (and its Appendix-style example of all primitive types).
    #[test]
    fn rfc8785_primitive_example() {
        let input = r#"{
            "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
            "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
            "literals": [null, true, false]
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        assert_eq!(jcs(&v), expected);
        // 333333333.33333329 is not exactly a double: strict mode refuses it.
        assert_eq!(
            canonicalize_strict(&v),
            Err(JcsError::InexactNumber {
                path: "/numbers/0".into()
            })
        );
    }

    #[test]
    fn string_escapes() {
        let s: String = (0u8..0x20).map(char::from).collect::<String>() + "\u{7f}\u{2028}\"\\/é";
        let got = jcs(&Value::String(s));
        assert_eq!(
            got,
            "\"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\
             \\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\\u0019\
             \\u001a\\u001b\\u001c\\u001d\\u001e\\u001f\u{7f}\u{2028}\\\"\\\\/é\""
        );
    }

    #[test]
    fn whitespace_and_order_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{ "b" : [1, {"y":2,"x":1}], "a":"A" }"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":"A","b":[1.0,{"x":1e0,"y":20e-1}]}"#).unwrap();
        assert_eq!(jcs(&a), r#"{"a":"A","b":[1,{"x":1,"y":2}]}"#);
        assert_eq!(canonicalize_strict(&a), canonicalize_strict(&b));
    }

    /// Documented property: numbers are canonicalised by value, so trailing zeros are not
    /// protected.
    #[test]
    fn trailing_zeros_canonicalise_identically() {
        for text in ["1.50", "1.5", "1.500", "15e-1", "0.15E1"] {
            assert_eq!(
                canonicalize_strict(&number(text)).unwrap(),
                b"1.5",
                "{text}"
            );
        }
    }

    #[test]
    fn strict_mode_refuses_values_a_double_would_change() {
        for text in [
            "9007199254740993",
            "0.10000000000000000001",
            "1.23456789012345678",
            "1e-400",
        ] {
            let v = json!({"x": number(text)});
            assert!(canonicalize(&v).is_ok(), "{text}");
            assert_eq!(
                canonicalize_strict(&v),
                Err(JcsError::InexactNumber { path: "/x".into() }),
                "{text}"
            );
        }
        assert_eq!(
            canonicalize_strict(&json!({"a/b~": number("-0")})),
            Err(JcsError::NegativeZero {
                path: "/a~1b~0".into()
            })
        );
        assert_eq!(canonicalize(&number("-0.0")).unwrap(), b"0");
        // Large but exact values are fine.
        for text in [
            "9007199254740992",
            "1e+300",
            "123456789012345680000",
            "0.1",
            "-0.5",
        ] {
            assert!(canonicalize_strict(&number(text)).is_ok(), "{text}");
        }
    }

    #[test]
    fn decimal_normalisation() {
        let d = |s| Decimal::parse(s).unwrap();
        assert_eq!(d("1.50"), d("15e-1"));
        assert_eq!(d("0"), d("0.000e10"));
        assert_eq!(d("100"), d("1e+2"));
        assert_ne!(d("1"), d("-1"));
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "1e+", "+1", "NaN", "Infinity", "0x10", "1_0",
        ] {
            assert_eq!(Decimal::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn skipping_a_top_level_member() {
        let with = json!({"b": 1, "signature": {"x": 1}, "a": {"signature": 2}});
        let without = json!({"a": {"signature": 2}, "b": 1});
        assert_eq!(
            canonicalize_strict_without(&with, "signature").unwrap(),
            canonicalize_strict(&without).unwrap()
        );
    }

    #[test]
    fn depth_limit() {
        let mut v = json!(1);
        for _ in 0..(MAX_DEPTH + 5) {
            v = json!([v]);
        }
        assert!(matches!(canonicalize(&v), Err(JcsError::TooDeep { .. })));
        // Dropping a deeply nested Value recurses too; keep it well within the default stack.
    }
}
