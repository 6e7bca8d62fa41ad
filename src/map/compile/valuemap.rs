//! Value maps: entries from YAML and/or a CSV file, compiled to sorted tables.
//!
//! CSV because terminology teams keep code tables in spreadsheets: a file with a header row
//! `source,target[,display]` beside the YAML, quoted fields as in RFC 4180.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use super::rules::template_static;
use super::{Defs, Diag, Options};
use crate::map::plan::ValueMap;

pub(crate) fn compile_all(
    defs: &Defs,
    opts: &Options<'_>,
    diag: &mut Diag,
) -> (Vec<ValueMap>, HashMap<String, usize>) {
    let mut out = Vec::new();
    let mut index = HashMap::new();
    for (name, (file, vm)) in &defs.valuemaps {
        let norm = |k: &str| {
            if vm.ignore_case {
                k.to_ascii_uppercase()
            } else {
                k.to_string()
            }
        };
        let mut entries: HashMap<String, String> = HashMap::new();
        let mut display: HashMap<String, String> = vm
            .display
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(csv) = &vm.csv {
            let path = resolve(file, &csv.value);
            match opts.files.get(&path) {
                None => diag.at(
                    file,
                    csv,
                    format!(
                        "value map `{name}`: CSV file `{}` not found (looked for {path})",
                        csv.value
                    ),
                ),
                Some(text) => match parse_csv(text) {
                    Err(e) => diag.at(file, csv, format!("{path}: {e}")),
                    Ok(rows) => {
                        for (line, row) in rows {
                            let (Some(src), Some(tgt)) = (row.first(), row.get(1)) else {
                                diag.at(
                                    file,
                                    csv,
                                    format!("{path}:{line}: expected `source,target[,display]`"),
                                );
                                continue;
                            };
                            if let Some(d) = row.get(2).filter(|d| !d.is_empty()) {
                                display.insert(tgt.clone(), d.clone());
                            }
                            entries.insert(norm(src), tgt.clone());
                        }
                    }
                },
            }
        }
        // YAML entries win over CSV rows: the YAML is the more deliberate edit.
        for (k, v) in &vm.entries {
            entries.insert(norm(k), v.clone());
        }
        if entries.is_empty() {
            diag.whole(file, format!("value map `{name}` has no entries"));
        }
        let system = vm
            .system
            .as_ref()
            .and_then(|s| template_static(file, s, diag));
        let source_system = vm
            .source_system
            .as_ref()
            .and_then(|s| template_static(file, s, diag));
        index.insert(name.clone(), out.len());
        out.push(ValueMap {
            name: name.clone(),
            system,
            source_system,
            default: vm.default.as_ref().map(|d| d.value.clone()),
            ignore_case: vm.ignore_case,
            entries: entries.into_iter().collect(),
            display: display.into_iter().collect(),
        });
    }
    (out, index)
}

/// The display name of `rel` next to the YAML file `file`, normalised (`a/./b/../c` -> `a/c`).
pub fn resolve(file: &str, rel: &str) -> String {
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.display().to_string()
}

/// RFC 4180 CSV: the header row is checked and skipped; rows are (line, fields). Blank lines and
/// lines starting with `#` are skipped.
pub fn parse_csv(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let mut rows = Vec::new();
    let mut header_seen = false;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = split_csv_line(line).map_err(|e| format!("line {line_no}: {e}"))?;
        if !header_seen {
            header_seen = true;
            let h: Vec<String> = fields
                .iter()
                .map(|f| f.trim().to_ascii_lowercase())
                .collect();
            if h.first().map(String::as_str) != Some("source")
                || h.get(1).map(String::as_str) != Some("target")
            {
                return Err(format!(
                    "line {line_no}: the first row must be the header `source,target[,display]`"
                ));
            }
            continue;
        }
        rows.push((
            line_no,
            fields.into_iter().map(|f| f.trim().to_string()).collect(),
        ));
    }
    Ok(rows)
}

fn split_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') => {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            }
            (true, c) => cur.push(c),
            (false, '"') if cur.trim().is_empty() && !was_quoted => {
                cur.clear();
                quoted = true;
                was_quoted = true;
            }
            (false, ',') => {
                fields.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            (false, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    fields.push(cur);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_and_header() {
        let rows =
            parse_csv("source,target,display\nM,male,\"Male, adult\"\n# note\n\"A\"\"B\",x\n")
                .expect("csv");
        assert_eq!(rows[0].1, ["M", "male", "Male, adult"]);
        assert_eq!(rows[1].1, ["A\"B", "x"]);
        assert!(parse_csv("code,target\nA,B\n").is_err());
        assert!(parse_csv("source,target\n\"A,B\n").is_err());
    }

    #[test]
    fn resolves_beside_the_yaml() {
        assert_eq!(
            resolve("mappings/valuemaps/core.yaml", "tables/sex.csv"),
            "mappings/valuemaps/tables/sex.csv"
        );
        assert_eq!(
            resolve("mappings/valuemaps/core.yaml", "../shared.csv"),
            "mappings/shared.csv"
        );
    }
}
