//! YAML files -> [`Plan`]. Every problem in every file is collected (not just the first), each
//! with `file:line:column`, what is wrong, and where possible a suggestion.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::model::{DatatypeMap, MappingFile, Rule, When};
use super::path::{Hl7Path, TargetPath};
use super::plan::*;

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

/// A parsed file waiting to be compiled, with its display name.
pub struct Parsed {
    pub file: String,
    pub content: MappingFile,
}

/// Parses one YAML text. Syntax and shape errors carry the parser's position.
pub fn parse_file(file: &str, text: &str) -> Result<Parsed, LoadError> {
    match serde_saphyr::from_str::<MappingFile>(text) {
        Ok(content) => Ok(Parsed {
            file: file.to_string(),
            content,
        }),
        Err(e) => {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            Err(LoadError {
                file: file.to_string(),
                line,
                column,
                message: first_line(&e.to_string()),
            })
        }
    }
}

fn first_line(s: &str) -> String {
    // serde-saphyr renders a snippet under the message; the message itself is what we need.
    s.lines().next().unwrap_or(s).trim().to_string()
}

struct Ctx<'a> {
    file: &'a str,
    errors: &'a mut Vec<LoadError>,
}

impl Ctx<'_> {
    fn err<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        self.errors.push(LoadError {
            file: self.file.to_string(),
            line: at.referenced.line(),
            column: at.referenced.column(),
            message: message.into(),
        });
    }
    fn origin<T>(&self, at: &Spanned<T>) -> Arc<str> {
        format!(
            "{}:{}:{}",
            self.file,
            at.referenced.line(),
            at.referenced.column()
        )
        .into()
    }
}

/// Compiles parsed files into one plan, or every error found.
pub fn compile(files: &[Parsed]) -> Result<Plan, Vec<LoadError>> {
    let mut errors = Vec::new();

    // Gather named definitions across files; a name defined twice is an error naming both files.
    let mut datatypes: BTreeMap<&str, (&str, &DatatypeMap)> = BTreeMap::new();
    let mut valuemap_index: HashMap<String, usize> = HashMap::new();
    let mut valuemaps = Vec::new();
    for f in files {
        for (name, dt) in &f.content.datatypes {
            if let Some((other, _)) = datatypes.insert(name, (&f.file, dt)) {
                errors.push(LoadError {
                    file: f.file.clone(),
                    line: 0,
                    column: 0,
                    message: format!("datatype map `{name}` is also defined in {other}"),
                });
            }
        }
        for (name, vm) in &f.content.valuemaps {
            if valuemap_index.contains_key(name) {
                errors.push(LoadError {
                    file: f.file.clone(),
                    line: 0,
                    column: 0,
                    message: format!("value map `{name}` is defined more than once"),
                });
                continue;
            }
            let entries = vm
                .entries
                .iter()
                .map(|(k, v)| {
                    let k = if vm.ignore_case {
                        k.to_ascii_uppercase()
                    } else {
                        k.clone()
                    };
                    (k, v.clone())
                })
                .collect();
            valuemap_index.insert(name.clone(), valuemaps.len());
            valuemaps.push(ValueMap {
                name: name.clone(),
                default: vm.default.clone(),
                ignore_case: vm.ignore_case,
                entries,
            });
        }
    }

    let mut compiler = Compiler {
        datatypes: &datatypes,
        valuemaps: &valuemap_index,
        compiled: HashMap::new(),
    };

    // Datatype maps are compiled even when unused, so their errors show up in `check`.
    for (name, (file, dt)) in &datatypes {
        let mut ctx = Ctx {
            file,
            errors: &mut errors,
        };
        compiler.datatype(name, dt, &mut ctx, 0);
    }

    let mut messages = Vec::new();
    let mut message_names: HashMap<&str, &str> = HashMap::new();
    for f in files {
        let mut ctx = Ctx {
            file: &f.file,
            errors: &mut errors,
        };
        for (name, m) in &f.content.messages {
            if let Some(other) = message_names.insert(name, &f.file) {
                ctx.errors.push(LoadError {
                    file: f.file.clone(),
                    line: 0,
                    column: 0,
                    message: format!("message mapping `{name}` is also defined in {other}"),
                });
                continue;
            }
            let mut matches = Vec::new();
            for pat in &m.matches {
                match parse_match(&pat.value) {
                    Ok(p) => matches.push(p),
                    Err(e) => ctx.err(pat, e),
                }
            }
            if m.matches.is_empty() {
                ctx.errors.push(LoadError {
                    file: f.file.clone(),
                    line: 0,
                    column: 0,
                    message: format!("message mapping `{name}` has an empty `match` list"),
                });
            }
            let mut resources = Vec::new();
            let mut names: Vec<&str> = Vec::new();
            for r in &m.resources {
                if names.contains(&r.name.value.as_str()) {
                    ctx.err(
                        &r.name,
                        format!("resource name `{}` is used twice", r.name.value),
                    );
                }
                names.push(&r.name.value);
                if !KNOWN_RESOURCES.contains(&r.resource_type.value.as_str()) {
                    let hint = suggest(&r.resource_type.value, KNOWN_RESOURCES);
                    ctx.err(
                        &r.resource_type,
                        format!(
                            "`{}` is not a FHIR R4 resource type this project emits{hint}",
                            r.resource_type.value
                        ),
                    );
                }
                let for_each = r.for_each.as_ref().map(|s| {
                    if Hl7Path::parse(&s.value)
                        .ok()
                        .is_some_and(|p| p.segment().is_some() && is_bare_segment(&p))
                    {
                        s.value.clone()
                    } else {
                        ctx.err(
                            s,
                            format!(
                                "`for: {}` on a resource must name a segment, such as `NK1`",
                                s.value
                            ),
                        );
                        String::new()
                    }
                });
                let when = compiler.when(r.when.as_ref(), &mut ctx, false);
                let rules = compiler.rules(&r.rules, &mut ctx, false, 0);
                resources.push(ResourcePlan {
                    name: r.name.value.clone(),
                    resource_type: r.resource_type.value.clone(),
                    profile: r.profile.clone(),
                    for_each,
                    when,
                    rules,
                });
            }
            // References must name a resource of this mapping.
            for r in &m.resources {
                check_refs(&r.rules, &names, &mut ctx);
            }
            for fo in m.focus.iter().chain(m.sender.iter()) {
                if !names.contains(&fo.value.as_str()) {
                    let hint = suggest(&fo.value, &names);
                    ctx.err(
                        fo,
                        format!("`{}` is not a resource of this mapping{hint}", fo.value),
                    );
                }
            }
            messages.push(MessagePlan {
                name: name.clone(),
                matches,
                focus: m.focus.iter().map(|s| s.value.clone()).collect(),
                sender: m.sender.as_ref().map(|s| s.value.clone()),
                resources,
            });
        }
    }

    if errors.is_empty() {
        Ok(Plan {
            messages,
            valuemaps,
        })
    } else {
        Err(errors)
    }
}

fn is_bare_segment(p: &Hl7Path) -> bool {
    matches!(p, Hl7Path::Absolute { field: None, .. })
}

fn check_refs(rules: &[Rule], names: &[&str], ctx: &mut Ctx<'_>) {
    for r in rules {
        if let Some(target) = &r.reference
            && !names.contains(&target.value.as_str())
        {
            let hint = suggest(&target.value, names);
            ctx.err(
                target,
                format!(
                    "`ref: {}` names no resource of this mapping{hint}",
                    target.value
                ),
            );
        }
        if let Some(children) = &r.object {
            check_refs(children, names, ctx);
        }
    }
}

fn parse_match(s: &str) -> Result<MatchPattern, String> {
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

struct Compiler<'a> {
    datatypes: &'a BTreeMap<&'a str, (&'a str, &'a DatatypeMap)>,
    valuemaps: &'a HashMap<String, usize>,
    compiled: HashMap<String, Arc<Vec<RulePlan>>>,
}

const MAX_NESTING: usize = 8;

impl Compiler<'_> {
    fn datatype(
        &mut self,
        name: &str,
        dt: &DatatypeMap,
        ctx: &mut Ctx<'_>,
        depth: usize,
    ) -> Arc<Vec<RulePlan>> {
        if let Some(done) = self.compiled.get(name) {
            return done.clone();
        }
        let rules = Arc::new(self.rules(&dt.rules, ctx, true, depth + 1));
        self.compiled.insert(name.to_string(), rules.clone());
        rules
    }

    fn when(&mut self, w: Option<&When>, ctx: &mut Ctx<'_>, in_rep: bool) -> Vec<Cond> {
        let Some(w) = w else { return Vec::new() };
        let Some(path_s) = &w.path else {
            ctx.errors.push(LoadError {
                file: ctx.file.to_string(),
                line: 0,
                column: 0,
                message: "a `when` needs a `path` to test".into(),
            });
            return Vec::new();
        };
        let Some(path) = self.hl7_path(path_s, ctx, in_rep) else {
            return Vec::new();
        };
        let mut conds = Vec::new();
        let mut push = |test| {
            conds.push(Cond {
                path: path.clone(),
                test,
            })
        };
        if let Some(e) = w.exists {
            push(Test::Exists(e));
        }
        if let Some(v) = &w.equals {
            push(Test::Equals(v.clone()));
        }
        if let Some(v) = &w.one_of {
            push(Test::In(v.clone()));
        }
        if let Some(v) = &w.not_in {
            push(Test::NotIn(v.clone()));
        }
        if let Some(v) = &w.nhs_number {
            match v.value.as_str() {
                "valid" => push(Test::NhsNumber { valid: true }),
                "invalid" => push(Test::NhsNumber { valid: false }),
                other => ctx.err(
                    v,
                    format!("`nhs_number: {other}`: expected `valid` or `invalid`"),
                ),
            }
        }
        if conds.is_empty() {
            ctx.err(
                path_s,
                "this `when` tests nothing: add `exists`, `equals`, `in`, `not_in` or `nhs_number`",
            );
        }
        conds
    }

    fn hl7_path(&self, s: &Spanned<String>, ctx: &mut Ctx<'_>, in_rep: bool) -> Option<Hl7Path> {
        match Hl7Path::parse(&s.value) {
            Ok(p @ Hl7Path::Relative { .. }) if !in_rep => {
                ctx.err(
                    s,
                    format!(
                        "`{}` is relative (starts with `.`) but this rule is not inside a datatype map or a `for`",
                        s.value
                    ),
                );
                let _ = p;
                None
            }
            Ok(p) => Some(p),
            Err(e) => {
                ctx.err(s, format!("invalid HL7 path {e}"));
                None
            }
        }
    }

    fn rules(
        &mut self,
        rules: &[Rule],
        ctx: &mut Ctx<'_>,
        in_rep: bool,
        depth: usize,
    ) -> Vec<RulePlan> {
        let mut out = Vec::new();
        for r in rules {
            if let Some(p) = self.rule(r, ctx, in_rep, depth) {
                out.push(p);
            }
        }
        out
    }

    fn rule(
        &mut self,
        r: &Rule,
        ctx: &mut Ctx<'_>,
        in_rep: bool,
        depth: usize,
    ) -> Option<RulePlan> {
        let origin = ctx.origin(&r.set);
        let target = match TargetPath::parse(&r.set.value) {
            Ok(t) => Some(t),
            Err(e) => {
                ctx.err(&r.set, format!("invalid target path {e}"));
                None
            }
        };
        let for_each = r
            .for_each
            .as_ref()
            .and_then(|f| self.hl7_path(f, ctx, in_rep));
        let inner_rep = in_rep || for_each.is_some();
        let when = self.when(r.when.as_ref(), ctx, inner_rep);

        let given = [
            r.from.is_some(),
            r.value.is_some(),
            r.reference.is_some(),
            r.object.is_some(),
            r.map.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            ctx.err(
                &r.set,
                format!(
                    "`set: {}` needs exactly one source: `from`, `value`, `ref`, `object` or `map` (found {given})",
                    r.set.value
                ),
            );
            return None;
        }
        let source = if let Some(f) = &r.from {
            Source::From(self.hl7_path(f, ctx, inner_rep)?)
        } else if let Some(v) = &r.value {
            Source::Value(template(v, ctx)?)
        } else if let Some(t) = &r.reference {
            Source::Ref(t.value.clone())
        } else if let Some(children) = &r.object {
            if depth > MAX_NESTING {
                ctx.err(&r.set, "objects nest too deeply");
                return None;
            }
            Source::Object(Arc::new(self.rules(children, ctx, inner_rep, depth + 1)))
        } else if let Some(m) = &r.map {
            let Some((file, dt)) = self.datatypes.get(m.value.as_str()).copied() else {
                let names: Vec<&str> = self.datatypes.keys().copied().collect();
                let hint = suggest(&m.value, &names);
                ctx.err(m, format!("unknown datatype map `{}`{hint}", m.value));
                return None;
            };
            if depth > MAX_NESTING {
                ctx.err(
                    m,
                    format!(
                        "datatype map `{}` nests too deeply (does it use itself?)",
                        m.value
                    ),
                );
                return None;
            }
            if r.for_each.is_none() && !in_rep {
                ctx.err(
                    m,
                    format!(
                        "`map: {}` applies to field repetitions: add `for:` with the field, e.g. `for: PID-5[*]`",
                        m.value
                    ),
                );
                return None;
            }
            let mut dctx = Ctx {
                file,
                errors: ctx.errors,
            };
            Source::Object(self.datatype(&m.value, dt, &mut dctx, depth))
        } else {
            return None;
        };

        let mut functions = Vec::new();
        for f in &r.functions {
            match f.value.as_str() {
                "trim" => functions.push(Func::Trim),
                "upper" => functions.push(Func::Upper),
                "lower" => functions.push(Func::Lower),
                other => {
                    let hint = suggest(other, &["trim", "upper", "lower"]);
                    ctx.err(f, format!("unknown function `{other}`{hint}"));
                }
            }
        }
        let lookup = match &r.lookup {
            None => None,
            Some(l) => match self.valuemaps.get(&l.value) {
                Some(i) => Some(*i),
                None => {
                    let names: Vec<&str> = self.valuemaps.keys().map(String::as_str).collect();
                    let hint = suggest(&l.value, &names);
                    ctx.err(l, format!("unknown value map `{}`{hint}", l.value));
                    None
                }
            },
        };
        let convert = match r.convert.as_ref().map(|c| c.value.as_str()) {
            None | Some("string") => Convert::String,
            Some("date") => Convert::Date,
            Some("dateTime") => Convert::DateTime,
            Some("instant") => Convert::Instant,
            Some("boolean") => Convert::Boolean,
            Some("integer") => Convert::Integer,
            Some("decimal") => Convert::Decimal,
            Some("nhs-number") => Convert::NhsNumber,
            Some(other) => {
                const KINDS: &[&str] = &[
                    "string",
                    "date",
                    "dateTime",
                    "instant",
                    "boolean",
                    "integer",
                    "decimal",
                    "nhs-number",
                ];
                let hint = suggest(other, KINDS);
                if let Some(c) = &r.convert {
                    ctx.err(c, format!("unknown conversion `as: {other}`{hint}"));
                }
                Convert::String
            }
        };
        Some(RulePlan {
            target: target?,
            source,
            for_each,
            when,
            functions,
            lookup,
            convert,
            origin,
        })
    }
}

fn template(v: &Spanned<String>, ctx: &mut Ctx<'_>) -> Option<Template> {
    let mut parts = Vec::new();
    let mut rest = v.value.as_str();
    while let Some(start) = rest.find("${") {
        if start > 0 {
            parts.push(TplPart::Lit(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            ctx.err(v, format!("`{}`: `${{` without a closing `}}`", v.value));
            return None;
        };
        let name = &after[..end];
        match Var::parse(name) {
            Some(var) => parts.push(TplPart::Var(var)),
            None => {
                ctx.err(
                    v,
                    format!(
                        "unknown variable `${{{name}}}`: use site.ods_code, site.appliance_id, system.<kind>, feed, message.code or message.trigger"
                    ),
                );
                return None;
            }
        }
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        parts.push(TplPart::Lit(rest.to_string()));
    }
    Some(Template(parts))
}

/// ", did you mean `x`?" for the closest candidate within a small edit distance.
pub fn suggest(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| {
            (
                levenshtein(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
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

/// FHIR R4 resource types a mapping may produce.
pub const KNOWN_RESOURCES: &[&str] = &[
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DiagnosticReport",
    "Encounter",
    "Location",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "RelatedPerson",
    "ServiceRequest",
    "Specimen",
];
