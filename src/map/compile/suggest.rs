//! "did you mean" suggestions for misspelt names.

/// "; did you mean `x`?" for the closest candidate within a small edit distance, or else for
/// one the word abbreviates (`bool` for `boolean`, `CX-Id` for `CX-Identifier`).
pub fn suggest<S: AsRef<str>>(word: &str, candidates: &[S]) -> String {
    let w = word.to_ascii_lowercase();
    candidates
        .iter()
        .filter_map(|c| {
            let c = c.as_ref();
            let lower = c.to_ascii_lowercase();
            let d = levenshtein(&w, &lower);
            if d <= 2.max(c.len() / 4) {
                Some((d, c))
            } else if w.len() >= 3 && lower.starts_with(&w) {
                // After every near spelling; the shortest completion first.
                Some((usize::MAX / 2 + (lower.len() - w.len()), c))
            } else {
                None
            }
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            super::suggest("nmae", &["name", "gender"]),
            "; did you mean `name`?"
        );
        assert_eq!(super::suggest("zzzzzz", &["name"]), "");
        // An abbreviation, when nothing is spelt close to it.
        assert_eq!(
            super::suggest("bool", &["boolean", "integer", "date"]),
            "; did you mean `boolean`?"
        );
        assert_eq!(
            super::suggest("date", &["dateTime", "date"]),
            "; did you mean `date`?"
        );
    }
}
