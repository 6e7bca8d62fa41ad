//! YAML files -> [`Plan`]. Every problem in every file is collected (not just the first), each
//! with `file:line:column`, what is wrong, and where possible a suggestion.
//!
//! Order of work: parse every file; gather the named definitions (a name defined twice is an
//! error naming both files); apply site overlays in file order; compile value maps, then
//! datatype maps (even unused ones, so their errors show in `check`), then message mappings.

mod overlay;
mod rules;
mod suggest;
mod target;
mod valuemap;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::model::{DatatypeMap, MappingFile, MessageMap, ValueMapDef, stamp};
use super::plan::*;
use crate::config::SiteConfig;
pub use suggest::suggest;

/// One mapping problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// A parsed file waiting to be compiled.
pub struct Parsed {
    pub content: MappingFile,
}

/// Parses one YAML text. Syntax and shape errors carry the parser's position.
pub fn parse_file(file: &str, text: &str) -> Result<Parsed, LoadError> {
    match serde_saphyr::from_str::<MappingFile>(text) {
        Ok(mut content) => {
            stamp(&mut content, &Arc::from(file));
            Ok(Parsed { content })
        }
        Err(e) => {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            Err(LoadError {
                file: file.to_string(),
                line,
                column,
                message: yaml_message(&e.to_string()),
            })
        }
    }
}

/// The YAML parser's message in an author's words. The parser's text starts with its own
/// `error: line L column C:`, which the error's `file:line:column` already says; some of its
/// messages name parser internals (`expected sequence start`, `DuplicateKeyPolicy`); and a
/// misspelt key is answered, like every other name, with the closest valid one.
fn yaml_message(raw: &str) -> String {
    // serde-saphyr renders a snippet under the message; the message itself is what we need.
    let mut m = raw.lines().next().unwrap_or(raw).trim();
    m = m.strip_prefix("error: ").unwrap_or(m);
    if let Some(rest) = m.strip_prefix("line ")
        && let Some((position, message)) = rest.split_once(": ")
        && position.contains(" column ")
    {
        m = message;
    }
    match m {
        "expected sequence start" => {
            return "expected a list here: `[a, b]`, or one `- item` per line".into();
        }
        "expected mapping start" => {
            return "expected a map here: `key: value` lines, or `{ key: value }`".into();
        }
        "invalid boolean" => return "expected `true` or `false`".into(),
        _ => {}
    }
    if m.contains("parsing a flow mapping") || m.contains("parsing a flow sequence") {
        // Nearly always an unquoted FHIR path with an index inside `{ ... }`.
        return format!(
            "{m}: inside `{{ ... }}` or `[ ... ]`, quote a value holding `[`, `]`, `{{`, `}}` or `,` (`set: \"name[0].family\"`)"
        );
    }
    if m.starts_with("tabs disallowed") {
        return "a tab in the indentation: YAML indents with spaces only".into();
    }
    if let Some(rest) = m.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return format!("`{key}` is given twice in this map");
    }
    if let Some(rest) = m.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once("`, expected one of ")
    {
        let candidates: Vec<&str> = expected.split(", ").map(|c| c.trim_matches('`')).collect();
        return format!("{m}{}", suggest(field, &candidates));
    }
    m.to_string()
}

/// Collected errors.
#[derive(Default)]
pub(crate) struct Diag {
    pub errors: Vec<LoadError>,
}

impl Diag {
    pub fn at<T>(&mut self, file: &str, at: &Spanned<T>, message: impl Into<String>) {
        self.errors.push(LoadError {
            file: file.to_string(),
            line: at.referenced.line(),
            column: at.referenced.column(),
            message: message.into(),
        });
    }

    pub fn whole(&mut self, file: &str, message: impl Into<String>) {
        self.errors.push(LoadError {
            file: file.to_string(),
            line: 0,
            column: 0,
            message: message.into(),
        });
    }
}

pub(crate) fn origin<T>(file: &str, at: &Spanned<T>) -> Arc<str> {
    format!(
        "{}:{}:{}",
        file,
        at.referenced.line(),
        at.referenced.column()
    )
    .into()
}

/// What compiling needs besides the YAML.
#[derive(Default)]
pub struct Options<'a> {
    /// The site configuration, when known: `${site.NAME}` variables are then checked at load.
    pub site: Option<&'a SiteConfig>,
    /// Other files of the set by display name (CSV value maps).
    pub files: HashMap<String, String>,
}

/// The definitions of a set after overlays, each remembering its file.
#[derive(Default)]
pub(crate) struct Defs {
    pub messages: BTreeMap<String, MessageMap>,
    pub datatypes: BTreeMap<String, DatatypeMap>,
    pub valuemaps: BTreeMap<String, (Arc<str>, ValueMapDef)>,
}

/// Compiles parsed files into one plan, or every error found.
pub fn compile(files: &[Parsed], opts: &Options<'_>) -> Result<Plan, Vec<LoadError>> {
    let mut diag = Diag::default();
    let mut defs = Defs::default();
    for f in files {
        let c = &f.content;
        for (name, m) in &c.messages {
            if let Some(other) = defs.messages.get(name) {
                diag.whole(
                    &c.file,
                    format!(
                        "message mapping `{name}` is also defined in {} (to change it from a site file, use `overlays:`)",
                        other.file
                    ),
                );
                continue;
            }
            defs.messages.insert(name.clone(), m.clone());
        }
        for (name, d) in &c.datatypes {
            if let Some(other) = defs.datatypes.get(name) {
                diag.whole(
                    &c.file,
                    format!(
                        "datatype map `{name}` is also defined in {} (to change it, use `overlays:`)",
                        other.file
                    ),
                );
                continue;
            }
            defs.datatypes.insert(name.clone(), d.clone());
        }
        for (name, v) in &c.valuemaps {
            if let Some((other, _)) = defs.valuemaps.get(name) {
                diag.whole(
                    &c.file,
                    format!(
                        "value map `{name}` is also defined in {other} (to change it, use `overlays:`)"
                    ),
                );
                continue;
            }
            defs.valuemaps
                .insert(name.clone(), (c.file.clone(), v.clone()));
        }
    }
    for f in files {
        for o in &f.content.overlays {
            overlay::apply(&mut defs, o, &mut diag);
        }
    }

    let (valuemaps, vm_index) = valuemap::compile_all(&defs, opts, &mut diag);
    let mut compiler = rules::Compiler::new(&defs, &valuemaps, &vm_index, opts.site, &mut diag);
    for name in defs.datatypes.keys() {
        compiler.datatype(name);
    }
    let mut messages = Vec::new();
    for (name, m) in &defs.messages {
        if let Some(mp) = compiler.message(name, m) {
            messages.push(mp);
        }
    }
    drop(compiler);

    if diag.errors.is_empty() {
        Ok(Plan {
            messages,
            valuemaps,
        })
    } else {
        Err(diag.errors)
    }
}

/// Parses `CODE^TRIGGER^STRUCTURE`.
pub(crate) fn parse_match(s: &str) -> Result<MatchPattern, String> {
    let mut parts = s.trim().split('^');
    let code = parts.next().unwrap_or("").trim();
    if code.len() != 3
        || !code
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    {
        return Err(format!(
            "`{s}`: expected a message type such as `ADT^A01`, `ADT^A03^ADT_A02` or `ORU^*`"
        ));
    }
    let wild = |p: Option<&str>| {
        p.map(str::trim)
            .filter(|p| !p.is_empty() && *p != "*")
            .map(str::to_string)
    };
    let trigger = wild(parts.next());
    let structure = wild(parts.next());
    if parts.next().is_some() {
        return Err(format!("`{s}`: at most CODE^TRIGGER^STRUCTURE"));
    }
    Ok(MatchPattern {
        code: code.to_string(),
        trigger,
        structure,
    })
}
