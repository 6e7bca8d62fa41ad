//! HL7 v2 TS/DTM values to FHIR `date`, `dateTime` and `instant`.
//!
//! HL7 v2 timestamps (`YYYY[MM[DD[HH[MM[SS[.S{1,4}]]]]]][+/-ZZZZ]`) are usually sent *without* a
//! UTC offset, meaning "local time at the sender". FHIR requires an offset whenever a time is
//! present, so a local time has to be placed in a zone (Europe/London for this deployment) before
//! it can be emitted. Two hours a year make that lossy:
//!
//! - the **October repeated hour** (01:00-01:59 happens twice, at +01:00 and then at +00:00) is
//!   *ambiguous*: it is resolved by [`AmbiguityPolicy`] and flagged [`TimeFlag::Ambiguous`];
//! - the **March skipped hour** (01:00-01:59 never happens) is *nonexistent*: it is shifted forward
//!   by the length of the gap (01:30 becomes 02:30+01:00, what a wall clock set an hour late would
//!   have read) and flagged [`TimeFlag::Nonexistent`], unless the policy is `Reject`.
//!
//! The flag exists so the mapper can record the guess (e.g. as an extension or a log line) rather
//! than hiding it: a medication time that is off by an hour matters.
//!
//! Precision is preserved: FHIR distinguishes `2026`, `2026-07` and `2026-07-15` from a full
//! date-time, and a reduced-precision date must not be padded into a false "midnight on the 1st".
//! When a time is present FHIR requires seconds, so `HHMM` becomes `HH:MM:00` and a bare `HH`
//! becomes `HH:00:00`. Fractional seconds are kept digit for digit. An explicit offset is kept
//! exactly as sent (it is what the sender's clock said); the zone is then not consulted.
//!
//! Errors never quote the input: a timestamp can be a date of birth.

use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};

/// The zone applied to HL7 timestamps without an offset unless configured otherwise.
pub const DEFAULT_ZONE: &str = "Europe/London";

/// [`DEFAULT_ZONE`] from jiff's bundled tz database (independent of the appliance's tzdata).
pub fn default_zone() -> Result<TimeZone, TimeError> {
    TimeZone::get(DEFAULT_ZONE).map_err(|_| TimeError::UnknownZone)
}

/// What to do with a local time that the zone makes ambiguous (repeated hour) or nonexistent
/// (skipped hour).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmbiguityPolicy {
    /// Repeated hour: take the first occurrence (the summer-time offset). Skipped hour: shift
    /// forward by the gap.
    #[default]
    Earlier,
    /// Repeated hour: take the second occurrence (the winter-time offset). Skipped hour: shift
    /// forward by the gap.
    Later,
    /// Refuse both with [`TimeError::Ambiguous`] / [`TimeError::Nonexistent`].
    Reject,
}

impl std::fmt::Display for AmbiguityPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AmbiguityPolicy::Earlier => "earlier",
            AmbiguityPolicy::Later => "later",
            AmbiguityPolicy::Reject => "reject",
        })
    }
}

/// Marks a value whose offset was chosen by [`AmbiguityPolicy`] rather than known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFlag {
    /// The local time occurred twice; the policy picked one.
    Ambiguous,
    /// The local time never occurred; it was shifted forward across the gap.
    Nonexistent,
}

/// The code system of the `meta.tag` that marks a resource holding a [`TimeFlag`]ged value
/// (`<site.identifier_base>/CodeSystem/hl7-edge-flag`).
pub const FLAG_CODE_SYSTEM_PATH: &str = "CodeSystem/hl7-edge-flag";

impl TimeFlag {
    /// The tag code (`clock-change-ambiguous`, `clock-change-nonexistent`).
    pub fn code(self) -> &'static str {
        match self {
            TimeFlag::Ambiguous => "clock-change-ambiguous",
            TimeFlag::Nonexistent => "clock-change-nonexistent",
        }
    }

    /// The tag display: what happened, without the value.
    pub fn display(self) -> &'static str {
        match self {
            TimeFlag::Ambiguous => {
                "a local time in the repeated hour of the autumn clock change; the offset was chosen by the site's clock_change policy"
            }
            TimeFlag::Nonexistent => {
                "a local time in the skipped hour of the spring clock change; moved forward across the gap"
            }
        }
    }
}

/// A FHIR `date`/`dateTime`/`instant` string and whether a daylight-saving guess went into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirDateTime {
    /// The FHIR value, e.g. `2026-07-15T10:15:00+01:00` or `2026-07`.
    pub value: String,
    /// `Some` when the offset was chosen by policy (see [`TimeFlag`]).
    pub flag: Option<TimeFlag>,
}

/// Why an HL7 timestamp could not be converted. Messages describe the problem, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// The field was empty.
    #[error("HL7 timestamp is empty")]
    Empty,
    /// The text does not follow the TS/DTM grammar.
    #[error(
        "HL7 timestamp is malformed ({0}); expected YYYY[MM[DD[HH[MM[SS[.S{{1,4}}]]]]]][+/-ZZZZ]"
    )]
    Malformed(&'static str),
    /// A component is outside its range (month 13, 30 February, hour 24, offset +1500...).
    #[error("HL7 timestamp has an out-of-range {0}")]
    OutOfRange(&'static str),
    /// The value is less precise than the FHIR type needs.
    #[error("HL7 timestamp is precise only to the {have}, but a FHIR {target} needs {need}")]
    TooImprecise {
        /// The FHIR type asked for.
        target: &'static str,
        /// What it needs.
        need: &'static str,
        /// What was sent.
        have: &'static str,
    },
    /// Repeated local hour under [`AmbiguityPolicy::Reject`].
    #[error(
        "local time falls in the repeated hour when clocks go back in the configured zone, and the \
         policy is Reject; the sender should include a UTC offset, or choose Earlier/Later"
    )]
    Ambiguous,
    /// Skipped local hour under [`AmbiguityPolicy::Reject`].
    #[error(
        "local time falls in the skipped hour when clocks go forward in the configured zone, and \
         the policy is Reject; the sender's clock or the configured zone is probably wrong"
    )]
    Nonexistent,
    /// The zone's offset at that time has a seconds part (pre-1900 local mean time), which FHIR
    /// cannot express.
    #[error(
        "the configured zone's UTC offset at that date has a seconds component, which FHIR cannot \
         express; send an explicit offset"
    )]
    OffsetNotRepresentable,
    /// The time zone database does not know the configured zone.
    #[error("the configured time zone is not in the bundled tz database")]
    UnknownZone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Precision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
}

impl Precision {
    fn name(self) -> &'static str {
        match self {
            Precision::Year => "year",
            Precision::Month => "month",
            Precision::Day => "day",
            Precision::Hour => "hour",
            Precision::Minute => "minute",
            Precision::Second => "second",
        }
    }
}

/// A syntactically and range-checked HL7 TS. Missing components are 1/0 and `precision` says
/// which are real.
struct Parsed<'a> {
    precision: Precision,
    year: i16,
    month: i8,
    day: i8,
    hour: i8,
    minute: i8,
    second: i8,
    /// Fractional-second digits as sent (1-4 ASCII digits).
    frac: Option<&'a str>,
    /// Explicit offset as sent, already in FHIR form (`+hh:mm`/`-hh:mm`; `-0000` stays `-00:00`).
    offset: Option<String>,
}

fn digits_to_u32(s: &str) -> u32 {
    // Callers have checked that `s` is a short run of ASCII digits.
    s.bytes()
        .fold(0u32, |acc, b| acc * 10 + u32::from(b.wrapping_sub(b'0')))
}

fn parse(ts: &str) -> Result<Parsed<'_>, TimeError> {
    if ts.is_empty() {
        return Err(TimeError::Empty);
    }
    let (main, offset_text) = match ts.find(['+', '-']) {
        Some(p) => (&ts[..p], Some(&ts[p..])),
        None => (ts, None),
    };
    let (digits, frac) = match main.split_once('.') {
        Some((d, f)) => (d, Some(f)),
        None => (main, None),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TimeError::Malformed("non-digit in date/time"));
    }
    let precision = match digits.len() {
        4 => Precision::Year,
        6 => Precision::Month,
        8 => Precision::Day,
        10 => Precision::Hour,
        12 => Precision::Minute,
        14 => Precision::Second,
        _ => {
            return Err(TimeError::Malformed(
                "date/time must have 4, 6, 8, 10, 12 or 14 digits",
            ));
        }
    };
    if let Some(f) = frac {
        if precision != Precision::Second {
            return Err(TimeError::Malformed("fractional seconds without seconds"));
        }
        if f.is_empty() || f.len() > 4 || !f.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TimeError::Malformed(
                "fractional seconds must be 1 to 4 digits",
            ));
        }
    }
    let field = |from: usize, to: usize| -> u32 { digits.get(from..to).map_or(0, digits_to_u32) };
    let year = field(0, 4);
    if year == 0 {
        return Err(TimeError::OutOfRange(
            "year (0000 is not a valid FHIR year)",
        ));
    }
    let month = if precision >= Precision::Month {
        field(4, 6)
    } else {
        1
    };
    if !(1..=12).contains(&month) {
        return Err(TimeError::OutOfRange("month"));
    }
    let day = if precision >= Precision::Day {
        field(6, 8)
    } else {
        1
    };
    let hour = field(8, 10);
    if hour > 23 {
        return Err(TimeError::OutOfRange("hour"));
    }
    let minute = field(10, 12);
    if minute > 59 {
        return Err(TimeError::OutOfRange("minute"));
    }
    let second = field(12, 14);
    if second > 59 {
        return Err(TimeError::OutOfRange(
            "second (leap seconds are not supported)",
        ));
    }
    // All values are range-checked to fit; the conversions cannot fail.
    let (year, month, day) = (year as i16, month as i8, day as i8);
    if day == 0 || Date::new(year, month, day).is_err() {
        return Err(TimeError::OutOfRange("day of month"));
    }
    let offset = offset_text.map(parse_offset).transpose()?;
    Ok(Parsed {
        precision,
        year,
        month,
        day,
        hour: hour as i8,
        minute: minute as i8,
        second: second as i8,
        frac,
        offset,
    })
}

/// `+HHMM` / `-HHMM` to FHIR's `+hh:mm` / `-hh:mm`, limited to -14:00..+14:00. The sign is kept
/// as sent, even for zero.
fn parse_offset(s: &str) -> Result<String, TimeError> {
    let b = s.as_bytes();
    if b.len() != 5 || !b[1..].iter().all(u8::is_ascii_digit) {
        return Err(TimeError::Malformed("UTC offset must be +HHMM or -HHMM"));
    }
    let hh = digits_to_u32(&s[1..3]);
    let mm = digits_to_u32(&s[3..5]);
    if mm > 59 || hh > 14 || (hh == 14 && mm != 0) {
        return Err(TimeError::OutOfRange("UTC offset"));
    }
    Ok(format!("{}{hh:02}:{mm:02}", char::from(b[0])))
}

/// Appends a UTC offset of `seconds` as FHIR's `+hh:mm` / `-hh:mm`.
fn push_offset(out: &mut String, seconds: i32) -> Result<(), TimeError> {
    if seconds % 60 != 0 {
        return Err(TimeError::OffsetNotRepresentable);
    }
    out.push(if seconds < 0 { '-' } else { '+' });
    let abs = seconds.unsigned_abs();
    push_digits(out, abs / 3600, 2);
    out.push(':');
    push_digits(out, (abs % 3600) / 60, 2);
    Ok(())
}

/// Appends `n` zero-padded to `width` digits, as `{:0width$}` would. An ADT^A01 has ~15
/// date-times, and a `format!` of one cost ~1.7 k instructions (callgrind).
fn push_digits(out: &mut String, n: u32, width: usize) {
    let mut buf = [b'0'; 10];
    let mut at = buf.len();
    let mut rest = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let start = at.min(buf.len().saturating_sub(width));
    for &b in &buf[start..] {
        out.push(char::from(b));
    }
}

/// Appends a year as `{:04}` would (negative years, possible after a shift, keep the sign).
fn push_year(out: &mut String, year: i16) {
    match u32::try_from(year) {
        Ok(y) => push_digits(out, y, 4),
        Err(_) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{year:04}");
        }
    }
}

fn format_date(p: &Parsed<'_>) -> String {
    let mut out = String::with_capacity(10);
    push_year(&mut out, p.year);
    if p.precision > Precision::Year {
        out.push('-');
        push_digits(&mut out, p.month.unsigned_abs().into(), 2);
    }
    if p.precision > Precision::Month {
        out.push('-');
        push_digits(&mut out, p.day.unsigned_abs().into(), 2);
    }
    out
}

fn convert(
    p: &Parsed<'_>,
    tz: &TimeZone,
    policy: AmbiguityPolicy,
) -> Result<FhirDateTime, TimeError> {
    if p.precision < Precision::Hour {
        return Ok(FhirDateTime {
            value: format_date(p),
            flag: None,
        });
    }
    let out_of_range = |_| TimeError::OutOfRange("date-time");
    let dt = DateTime::new(p.year, p.month, p.day, p.hour, p.minute, p.second, 0)
        .map_err(out_of_range)?;
    // The offset: as sent, or the zone's (seconds) for the local time.
    let (dt, offset, flag) = match &p.offset {
        Some(sent) => (dt, Err(sent.as_str()), None),
        None => match tz.to_ambiguous_timestamp(dt).offset() {
            AmbiguousOffset::Unambiguous { offset } => (dt, Ok(offset.seconds()), None),
            AmbiguousOffset::Fold { before, after } => {
                let chosen = match policy {
                    AmbiguityPolicy::Earlier => before,
                    AmbiguityPolicy::Later => after,
                    AmbiguityPolicy::Reject => return Err(TimeError::Ambiguous),
                };
                (dt, Ok(chosen.seconds()), Some(TimeFlag::Ambiguous))
            }
            AmbiguousOffset::Gap { before, after } => {
                if policy == AmbiguityPolicy::Reject {
                    return Err(TimeError::Nonexistent);
                }
                // Read the wall time with the pre-gap offset, then show that instant in the
                // post-gap offset: 01:30 (+00:00) is 02:30+01:00.
                let shifted = shift_across_gap(dt, before, after).map_err(out_of_range)?;
                (shifted, Ok(after.seconds()), Some(TimeFlag::Nonexistent))
            }
        },
    };
    // `YYYY-MM-DDThh:mm:ss[.ffff]+hh:mm`
    let mut value = String::with_capacity(30);
    push_year(&mut value, dt.year());
    for (sep, n) in [
        ('-', dt.month()),
        ('-', dt.day()),
        ('T', dt.hour()),
        (':', dt.minute()),
        (':', dt.second()),
    ] {
        value.push(sep);
        push_digits(&mut value, n.unsigned_abs().into(), 2);
    }
    if let Some(f) = p.frac {
        value.push('.');
        value.push_str(f);
    }
    match offset {
        Ok(seconds) => push_offset(&mut value, seconds)?,
        Err(sent) => value.push_str(sent),
    }
    Ok(FhirDateTime { value, flag })
}

fn shift_across_gap(dt: DateTime, before: Offset, after: Offset) -> Result<DateTime, jiff::Error> {
    Ok(after.to_datetime(before.to_timestamp(dt)?))
}

/// HL7 TS/DTM to a FHIR `dateTime` (or `date`-shaped `dateTime` when the value has no time),
/// keeping the sent precision. Local times get `tz`'s offset; see the module docs for the
/// daylight-saving cases and [`AmbiguityPolicy`]. An explicit offset is kept as sent; on a value
/// with no time it is dropped, since FHIR dates carry no offset.
pub fn hl7_to_fhir_datetime(
    ts: &str,
    tz: &TimeZone,
    policy: AmbiguityPolicy,
) -> Result<FhirDateTime, TimeError> {
    convert(&parse(ts)?, tz, policy)
}

/// HL7 TS/DTM to a FHIR `date` (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`), e.g. for `birthDate`. A time
/// part, if sent, is validated and then dropped: the date is the sender's local calendar date,
/// which is what a date of birth means.
pub fn hl7_to_fhir_date(ts: &str) -> Result<String, TimeError> {
    Ok(format_date(&parse(ts)?))
}

/// HL7 TS/DTM to a FHIR `instant`, which needs seconds and an offset: the value must be precise to
/// the second; the offset comes from the value or from `tz` as in [`hl7_to_fhir_datetime`].
pub fn hl7_to_fhir_instant(
    ts: &str,
    tz: &TimeZone,
    policy: AmbiguityPolicy,
) -> Result<FhirDateTime, TimeError> {
    let p = parse(ts)?;
    if p.precision < Precision::Second {
        return Err(TimeError::TooImprecise {
            target: "instant",
            need: "seconds",
            have: p.precision.name(),
        });
    }
    convert(&p, tz, policy)
}

/// `true` if `s` is a FHIR R4 `instant`: `YYYY-MM-DDThh:mm:ss[.f{1,9}](Z|+hh:mm|-hh:mm)` with a
/// real calendar date and in-range fields (a leap second `:60` is not accepted).
pub fn is_fhir_instant(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |from: usize, to: usize| -> Option<u32> {
        let part = b.get(from..to)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |a, d| a * 10 + u32::from(d - b'0')))
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) = (
        num(0, 4),
        num(5, 7),
        num(8, 10),
        num(11, 13),
        num(14, 16),
        num(17, 19),
    ) else {
        return false;
    };
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return false;
    }
    if y == 0 || !(1..=12).contains(&mo) || h > 23 || mi > 59 || sec > 59 {
        return false;
    }
    if Date::new(y as i16, mo as i8, d as i8).is_err() {
        return false;
    }
    let mut i = 19;
    if sep(i, b'.') {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=9).contains(&n) {
            return false;
        }
        i += 1 + n;
    }
    match b.get(i..) {
        Some(b"Z") => true,
        Some(rest)
            if rest.len() == 6 && (rest[0] == b'+' || rest[0] == b'-') && rest[3] == b':' =>
        {
            match (num(i + 1, i + 3), num(i + 4, i + 6)) {
                (Some(oh), Some(om)) => om <= 59 && (oh < 14 || (oh == 14 && om == 0)),
                _ => false,
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn london() -> TimeZone {
        default_zone().unwrap()
    }

    fn dt(ts: &str) -> Result<FhirDateTime, TimeError> {
        hl7_to_fhir_datetime(ts, &london(), AmbiguityPolicy::Earlier)
    }

    #[test]
    fn summer_and_winter_offsets() {
        assert_eq!(
            dt("20260715101500").unwrap(),
            FhirDateTime {
                value: "2026-07-15T10:15:00+01:00".into(),
                flag: None
            }
        );
        assert_eq!(
            dt("20260115101500").unwrap().value,
            "2026-01-15T10:15:00+00:00"
        );
    }

    #[test]
    fn october_repeated_hour_is_flagged_and_resolved_by_policy() {
        let tz = london();
        let e = hl7_to_fhir_datetime("20261025013000", &tz, AmbiguityPolicy::Earlier).unwrap();
        assert_eq!(e.value, "2026-10-25T01:30:00+01:00");
        assert_eq!(e.flag, Some(TimeFlag::Ambiguous));
        let l = hl7_to_fhir_datetime("20261025013000", &tz, AmbiguityPolicy::Later).unwrap();
        assert_eq!(l.value, "2026-10-25T01:30:00+00:00");
        assert_eq!(l.flag, Some(TimeFlag::Ambiguous));
        assert_eq!(
            hl7_to_fhir_datetime("20261025013000", &tz, AmbiguityPolicy::Reject),
            Err(TimeError::Ambiguous)
        );
        // Just outside the repeated hour: no flag.
        assert_eq!(dt("20261025020000").unwrap().flag, None);
        assert_eq!(dt("20261025005959").unwrap().flag, None);
    }

    #[test]
    fn march_skipped_hour_is_shifted_forward_and_flagged() {
        let tz = london();
        for policy in [AmbiguityPolicy::Earlier, AmbiguityPolicy::Later] {
            let v = hl7_to_fhir_datetime("20260329013000", &tz, policy).unwrap();
            assert_eq!(v.value, "2026-03-29T02:30:00+01:00");
            assert_eq!(v.flag, Some(TimeFlag::Nonexistent));
        }
        assert_eq!(
            hl7_to_fhir_datetime("20260329013000", &tz, AmbiguityPolicy::Reject),
            Err(TimeError::Nonexistent)
        );
        // Fractional seconds survive the shift.
        assert_eq!(
            dt("20260329013000.25").unwrap().value,
            "2026-03-29T02:30:00.25+01:00"
        );
    }

    #[test]
    fn explicit_offset_is_kept_and_zone_ignored() {
        let v = dt("20260715101500-0500").unwrap();
        assert_eq!(v.value, "2026-07-15T10:15:00-05:00");
        assert_eq!(v.flag, None);
        // Even inside London's ambiguous hour: the offset was sent, nothing to guess.
        let v = hl7_to_fhir_datetime("20261025013000+0000", &london(), AmbiguityPolicy::Reject)
            .unwrap();
        assert_eq!(
            v,
            FhirDateTime {
                value: "2026-10-25T01:30:00+00:00".into(),
                flag: None
            }
        );
        assert_eq!(
            dt("202607151015+0530").unwrap().value,
            "2026-07-15T10:15:00+05:30"
        );
    }

    #[test]
    fn precision_is_preserved() {
        assert_eq!(dt("2026").unwrap().value, "2026");
        assert_eq!(dt("202607").unwrap().value, "2026-07");
        assert_eq!(dt("20260715").unwrap().value, "2026-07-15");
        assert_eq!(dt("2026071510").unwrap().value, "2026-07-15T10:00:00+01:00");
        assert_eq!(
            dt("202607151015").unwrap().value,
            "2026-07-15T10:15:00+01:00"
        );
        // Offset on a date-only value is dropped: FHIR dates have none.
        assert_eq!(dt("20260715+0100").unwrap().value, "2026-07-15");
    }

    #[test]
    fn digits_are_padded_as_format_pads_them() {
        for width in [2, 4] {
            for n in [0u32, 1, 9, 10, 59, 99, 100, 999, 1000, 9999, 10000, 123456] {
                let mut s = String::new();
                push_digits(&mut s, n, width);
                assert_eq!(s, format!("{n:0width$}"));
            }
        }
        for year in [i16::MIN, -1000, -1, 0, 7, 1980, 9999, i16::MAX] {
            let mut s = String::new();
            push_year(&mut s, year);
            assert_eq!(s, format!("{year:04}"));
        }
    }

    #[test]
    fn fractional_seconds_kept_digit_for_digit() {
        assert_eq!(
            dt("20260715101500.1").unwrap().value,
            "2026-07-15T10:15:00.1+01:00"
        );
        assert_eq!(
            dt("20260715101500.0120").unwrap().value,
            "2026-07-15T10:15:00.0120+01:00"
        );
        assert_eq!(
            dt("20260115101500.123-0000").unwrap().value,
            "2026-01-15T10:15:00.123-00:00"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(hl7_to_fhir_date("19800229").unwrap(), "1980-02-29");
        assert_eq!(hl7_to_fhir_date("198002").unwrap(), "1980-02");
        assert_eq!(hl7_to_fhir_date("1980").unwrap(), "1980");
        assert_eq!(hl7_to_fhir_date("198002291230").unwrap(), "1980-02-29");
        assert_eq!(
            hl7_to_fhir_date("19810229"),
            Err(TimeError::OutOfRange("day of month"))
        );
    }

    #[test]
    fn instants_need_seconds() {
        let tz = london();
        let p = AmbiguityPolicy::Earlier;
        assert_eq!(
            hl7_to_fhir_instant("20260715101500", &tz, p).unwrap().value,
            "2026-07-15T10:15:00+01:00"
        );
        assert!(matches!(
            hl7_to_fhir_instant("202607151015", &tz, p),
            Err(TimeError::TooImprecise { have: "minute", .. })
        ));
        assert!(hl7_to_fhir_instant("20260715", &tz, p).is_err());
        let v = hl7_to_fhir_instant("20261025013000", &tz, AmbiguityPolicy::Later).unwrap();
        assert_eq!(v.flag, Some(TimeFlag::Ambiguous));
        assert!(is_fhir_instant(&v.value));
    }

    #[test]
    fn ranges_are_validated() {
        assert_eq!(dt("202613"), Err(TimeError::OutOfRange("month")));
        assert_eq!(dt("202600"), Err(TimeError::OutOfRange("month")));
        assert_eq!(dt("20260230"), Err(TimeError::OutOfRange("day of month")));
        assert_eq!(dt("20260100"), Err(TimeError::OutOfRange("day of month")));
        assert_eq!(dt("2026071524"), Err(TimeError::OutOfRange("hour")));
        assert_eq!(dt("202607151060"), Err(TimeError::OutOfRange("minute")));
        assert!(matches!(
            dt("20260715101560"),
            Err(TimeError::OutOfRange(_))
        ));
        assert_eq!(
            dt("20260715101500+1500"),
            Err(TimeError::OutOfRange("UTC offset"))
        );
        assert_eq!(
            dt("20260715101500+1401"),
            Err(TimeError::OutOfRange("UTC offset"))
        );
        assert_eq!(
            dt("20260715101500+0160"),
            Err(TimeError::OutOfRange("UTC offset"))
        );
        assert!(dt("0000").is_err());
        assert_eq!(dt("9999").unwrap().value, "9999");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for s in [
            "",
            " ",
            "2026-07-15",
            "20260715T1015",
            "2026071510150",
            "20260715101500.",
            "20260715101500.12345",
            "2026071510.5",
            "20260715101500+01",
            "20260715101500+01:00",
            "20260715101500++0100",
            "-2026",
            "+0100",
            "2026é",
            "２０２６",
            "20260715 101500",
            "20260715101500Z",
            "abcd",
            "2026\u{0}",
            "20260715101500-0100-0100",
        ] {
            let r = dt(s);
            assert!(r.is_err(), "{s:?} gave {r:?}");
            // No input echoed back.
            if let Err(e) = r {
                assert!(!e.to_string().contains("2026071"), "{e}");
            }
        }
    }

    #[test]
    fn fhir_instant_check() {
        for ok in [
            "2026-07-15T10:15:00Z",
            "2026-07-15T10:15:00+01:00",
            "2026-07-15T10:15:00.123456789-05:00",
            "2024-02-29T00:00:00+14:00",
        ] {
            assert!(is_fhir_instant(ok), "{ok}");
        }
        for bad in [
            "",
            "2026-07-15",
            "2026-07-15T10:15Z",
            "2026-07-15T10:15:00",
            "2026-02-30T10:15:00Z",
            "2026-07-15T24:00:00Z",
            "2026-07-15T10:15:00.Z",
            "2026-07-15T10:15:00.1234567890Z",
            "2026-07-15T10:15:00+15:00",
            "2026-07-15T10:15:00+0100",
            "2026-07-15T10:15:00Zjunk",
            "2026-07-15t10:15:00Z",
        ] {
            assert!(!is_fhir_instant(bad), "{bad}");
        }
    }
}
