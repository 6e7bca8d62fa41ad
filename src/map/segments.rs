//! How many fields the standard HL7 v2 segments have, so `PID-55` is an error at load time.
//!
//! The figures are the largest field number any version from 2.3 to 2.8 defines for the segment
//! (later versions only append fields), so a path valid in some version a feed may send is never
//! refused. Segments not listed (site `Z` segments, rarely used standard ones) accept any field up
//! to 999: a missing entry can only make the check more lenient, never wrong.

/// (segment, highest field number).
const FIELDS: &[(&str, usize)] = &[
    ("ACC", 11),
    ("AIG", 14),
    ("AIL", 12),
    ("AIP", 12),
    ("AIS", 12),
    ("AL1", 6),
    ("ARV", 8),
    ("BLG", 4),
    ("CTD", 7),
    ("DB1", 8),
    ("DG1", 26),
    ("DRG", 31),
    ("DSC", 2),
    ("ERR", 12),
    ("EVN", 7),
    ("FT1", 55),
    ("GT1", 57),
    ("IAM", 20),
    ("IN1", 55),
    ("IN2", 72),
    ("IN3", 28),
    ("MRG", 7),
    ("MSA", 8),
    ("MSH", 28),
    ("NK1", 41),
    ("NTE", 8),
    ("OBR", 55),
    ("OBX", 33),
    ("ORC", 38),
    ("PD1", 22),
    ("PID", 40),
    ("PR1", 26),
    ("PRT", 24),
    ("PV1", 54),
    ("PV2", 50),
    ("QRD", 12),
    ("QRF", 10),
    ("ROL", 13),
    ("RXA", 28),
    ("RXR", 6),
    ("SCH", 27),
    ("SFT", 6),
    ("SPM", 35),
    ("TQ1", 14),
    ("TQ2", 10),
    ("TXA", 28),
    ("UB1", 23),
    ("UB2", 17),
];

/// The highest field number of a known segment, or `None` for segments not in the table.
pub fn max_field(segment: &str) -> Option<usize> {
    FIELDS
        .binary_search_by(|(s, _)| (*s).cmp(segment))
        .ok()
        .map(|i| FIELDS[i].1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_is_sorted_and_answers() {
        assert!(super::FIELDS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(super::max_field("PID"), Some(40));
        assert_eq!(super::max_field("ZXY"), None);
    }
}
