//! Golden tests for mappings (`hl7-edge test-mappings`): every `*.hl7` below a tests folder is
//! mapped and compared with the `*.json` beside it.
//!
//! What makes the comparison deterministic: the caller maps with a fixed received time
//! ([`RECEIVED_AT`], which lands in `Provenance.recorded`), a fixed site (the `site.toml` files
//! from the tests root down to the case's folder, see [`site_files`])
//! and a fixed feed name ([`FEED`]); [`normalise`] replaces the software version in
//! `MessageHeader.source.version`, so a release does not invalidate every expectation.
//!
//! A failure prints a line diff of the pretty-printed JSON with a little context, so an author
//! sees the element that changed rather than two walls of JSON.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The received time every golden Bundle is made with.
pub const RECEIVED_AT: &str = "2026-01-01T00:00:00Z";
/// The feed name every golden Bundle is made with.
pub const FEED: &str = "golden";

/// One golden case: a message and its expected Bundle.
#[derive(Debug, Clone)]
pub struct Case {
    pub input: PathBuf,
    pub expected: PathBuf,
}

/// Every `*.hl7` below `dir`, sorted.
pub fn discover(dir: &Path) -> std::io::Result<Vec<Case>> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort_by(|a, b| a.input.cmp(&b.input));
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<Case>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "hl7") {
            out.push(Case {
                expected: p.with_extension("json"),
                input: p,
            });
        }
    }
    Ok(())
}

/// The `site.toml` files that apply to a case, outermost first: the tests root's, then that of
/// each folder on the way down to the case's own. A folder's file is merged over its parents', so
/// `tests/adt-pid19/site.toml` need only hold what differs (`[variables] nhs_number_field = ...`).
pub fn site_files(root: &Path, case: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<&Path> = case
        .ancestors()
        .skip(1)
        .take_while(|d| d.starts_with(root))
        .collect();
    dirs.reverse();
    dirs.into_iter()
        .map(|d| d.join("site.toml"))
        .filter(|f| f.is_file())
        .collect()
}

/// Removes what legitimately changes between runs of the same mapping.
pub fn normalise(bundle: &mut Value) {
    if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
        for e in entries {
            let is_header = e.pointer("/resource/resourceType").and_then(Value::as_str)
                == Some("MessageHeader");
            if let Some(v) = e.pointer_mut("/resource/source/version")
                && is_header
            {
                *v = Value::String("(version)".into());
            }
        }
    }
}

/// The text written to and compared with the `.json` file.
pub fn render(bundle: &Value) -> String {
    let mut s = serde_json::to_string_pretty(bundle).unwrap_or_default();
    s.push('\n');
    s
}

/// A readable line diff (`-` expected, `+` actual) with two lines of context; empty if equal.
pub fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // Longest common subsequence table (files are a few hundred lines: quadratic is fine).
    let (n, m) = (a.len(), b.len());
    if n.saturating_mul(m) > 25_000_000 {
        return format!(
            "(too large to diff line by line: {n} expected lines, {m} actual lines differ)\n"
        );
    }
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // Edit script: (' ', line) / ('-', line) / ('+', line).
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    const CONTEXT: usize = 2;
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c != ' ')
        .map(|(k, _)| k)
        .collect();
    if changed.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    let mut last_shown: Option<usize> = None;
    for (k, (c, line)) in ops.iter().enumerate() {
        let near = changed
            .iter()
            .any(|x| k + CONTEXT >= *x && k <= x + CONTEXT);
        if !near {
            continue;
        }
        let starts_hunk = match last_shown {
            None => true,
            Some(l) => k > l + 1,
        };
        if starts_hunk {
            if last_shown.is_some() {
                out.push_str("   ...\n");
            }
            if let Some(place) = resource_before(ops.get(..=k).unwrap_or_default()) {
                out.push_str(&format!("   in {place}:\n"));
            }
        }
        out.push_str(&format!(" {c} {line}\n"));
        last_shown = Some(k);
    }
    out
}

/// The Bundle entry a hunk of a pretty-printed Bundle is in, as `entry[2] (Patient)`: the last
/// `resourceType` before it (every resource starts with one), and how many `fullUrl`s (one per
/// entry) came before that. The envelope writes `entry` last, so no element of the Bundle's own
/// follows a resource; one before the entries is `in Bundle`.
fn resource_before(ops: &[(char, &str)]) -> Option<String> {
    let at = ops
        .iter()
        .rposition(|(_, l)| l.trim_start().starts_with("\"resourceType\": \""))?;
    let rtype = ops.get(at)?.1.trim().trim_end_matches(',');
    let rtype = rtype.strip_prefix("\"resourceType\": ")?.trim_matches('"');
    let entries = ops
        .get(..at)?
        .iter()
        .filter(|(c, l)| *c != '+' && l.trim_start().starts_with("\"fullUrl\": "))
        .count();
    Some(match entries {
        0 => rtype.to_string(),
        n => format!("entry[{}] ({rtype})", n - 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_files_run_from_the_tests_root_down_to_the_case() {
        let root = tempfile::tempdir().expect("tmp");
        let r = root.path();
        std::fs::create_dir_all(r.join("adt-pid19/deeper")).expect("mkdir");
        std::fs::create_dir_all(r.join("oru")).expect("mkdir");
        std::fs::write(r.join("site.toml"), "").expect("write");
        std::fs::write(r.join("adt-pid19/site.toml"), "").expect("write");
        assert_eq!(
            site_files(r, &r.join("adt-pid19/deeper/x.hl7")),
            vec![r.join("site.toml"), r.join("adt-pid19/site.toml")]
        );
        assert_eq!(
            site_files(r, &r.join("oru/x.hl7")),
            vec![r.join("site.toml")]
        );
        assert_eq!(site_files(r, &r.join("x.hl7")), vec![r.join("site.toml")]);
        // Nothing above the tests root applies.
        std::fs::remove_file(r.join("site.toml")).expect("rm");
        assert!(site_files(r, &r.join("oru/x.hl7")).is_empty());
    }

    #[test]
    fn diff_shows_changed_lines_with_context() {
        let a = "a\nb\nc\nd\ne\nf\ng\nh\n";
        let b = "a\nb\nc\nD\ne\nf\ng\nh\n";
        let d = diff(a, b);
        assert!(d.contains(" - d\n"), "{d}");
        assert!(d.contains(" + D\n"), "{d}");
        assert!(d.contains("   c\n") && d.contains("   e\n"), "{d}");
        assert!(!d.contains("   a\n"), "only two lines of context: {d}");
        assert_eq!(diff(a, a), "");
    }

    #[test]
    fn diff_names_the_entry_of_each_change() {
        let bundle = |family: &str, code: &str| {
            render(&serde_json::json!({
                "resourceType": "Bundle",
                "entry": [
                    { "fullUrl": "urn:uuid:1", "resource": { "resourceType": "MessageHeader", "id": "1" } },
                    { "fullUrl": "urn:uuid:2", "resource": {
                        "resourceType": "Patient", "id": "2",
                        "name": [{ "family": family, "given": ["A", "B", "C", "D", "E"] }],
                        "gender": "female", "birthDate": "1980-01-01", "active": true
                    } },
                    { "fullUrl": "urn:uuid:3", "resource": {
                        "resourceType": "Observation", "id": "3", "status": "final",
                        "code": { "text": code }
                    } }
                ]
            }))
        };
        let d = diff(&bundle("SMITH", "x"), &bundle("SMYTH", "y"));
        assert!(d.contains("   in entry[1] (Patient):\n"), "{d}");
        assert!(d.contains("   in entry[2] (Observation):\n"), "{d}");
        let patient = d.find("(Patient)").unwrap_or(usize::MAX);
        let family = d.find("SMYTH").unwrap_or(0);
        assert!(patient < family, "{d}");
    }
}
