//! Runs a compiled [`MessagePlan`] over one parsed message, producing the Bundle's resources.
//!
//! Rules of evaluation (documented for authors in `mappings/README.md`):
//! - A path without a component yields component 1 (subcomponent 1) of the first selected
//!   repetition; `for:` iterates whole repetitions, and `.c` paths read inside them.
//! - HL7's explicit null `""` and empty values are "absent".
//! - An element (`object:`/`map:`) or a resource is emitted only if at least one value *from the
//!   message* (a `from:` or a `ref:`) landed in it: constants alone never make an element, so a
//!   missing PID-32 never leaves a half-built extension behind.
//! - Ids are deterministic: UUIDv5 of (site ODS code, resource type, first identifier's system and
//!   value), or, for resources without an identifier, of the message's sender and control id, the
//!   resource's local name and its occurrence. A re-sent message yields the same ids.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::path::{Hl7Path, Index, RepSelect, TargetPath};
use super::plan::*;
use crate::config::SiteConfig;
use crate::fhir::{ids, nhs, time};
use crate::hl7::{Message, Segment, decode_escapes};

/// Per-message inputs besides the message itself.
pub struct RunContext<'a> {
    pub site: &'a SiteConfig,
    pub tz: &'a jiff::tz::TimeZone,
    pub feed: &'a str,
    pub encoding: &'static encoding_rs::Encoding,
}

/// One built resource.
#[derive(Debug, Clone)]
pub struct BuiltResource {
    pub name: String,
    pub resource_type: String,
    pub id: uuid::Uuid,
    pub json: Map<String, Value>,
}

/// What a mapping produced: resources in mapping order, plus warnings (no patient data).
#[derive(Debug, Default)]
pub struct MapResult {
    pub resources: Vec<BuiltResource>,
    pub focus: Vec<usize>,
    pub sender: Option<usize>,
    pub warnings: Vec<String>,
}

/// A mapping defect found while running (a target path that conflicts with an earlier rule).
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct RunError {
    pub origin: String,
    pub message: String,
}

const REF_MARK: &str = "\u{1}ref:";

struct Cursor<'m> {
    seg: Option<&'m Segment>,
    rep: Option<&'m str>,
}

struct Runner<'a, 'm> {
    msg: &'m Message,
    cx: &'a RunContext<'a>,
    plan: &'a Plan,
    warnings: Vec<String>,
}

/// Maps `msg` with `mp`.
pub fn run(
    plan: &Plan,
    mp: &MessagePlan,
    msg: &Message,
    cx: &RunContext<'_>,
) -> Result<MapResult, RunError> {
    let mut r = Runner {
        msg,
        cx,
        plan,
        warnings: Vec::new(),
    };
    let header = msg.header();
    let mut built: Vec<BuiltResource> = Vec::new();
    // name -> index of its first occurrence, for `ref:`.
    let mut first_of: HashMap<&str, usize> = HashMap::new();

    for rp in &mp.resources {
        let occurrences: Vec<Option<&Segment>> = match &rp.for_each {
            Some(seg) => msg.segments_named(seg).map(Some).collect(),
            None => vec![None],
        };
        for (occ, seg) in occurrences.into_iter().enumerate() {
            let cur = Cursor { seg, rep: None };
            if !r.conds(&rp.when, &cur) {
                continue;
            }
            let mut content = Map::new();
            if !r.rules(&rp.rules, &cur, &mut content)? {
                continue;
            }
            let id = resource_id(cx.site, &rp.resource_type, &content, || {
                vec![
                    header.sending_application.clone(),
                    header.sending_facility.clone(),
                    header.control_id.clone(),
                    rp.name.clone(),
                    occ.to_string(),
                ]
            });
            let mut json = Map::new();
            json.insert(
                "resourceType".into(),
                Value::String(rp.resource_type.clone()),
            );
            json.insert("id".into(), Value::String(id.to_string()));
            let mut meta = Map::new();
            if let Some(p) = &rp.profile {
                meta.insert(
                    "profile".into(),
                    Value::Array(vec![Value::String(p.clone())]),
                );
            }
            meta.insert("source".into(), Value::String(cx.site.appliance_uri()));
            json.insert("meta".into(), Value::Object(meta));
            json.extend(content);
            first_of.entry(rp.name.as_str()).or_insert(built.len());
            built.push(BuiltResource {
                name: rp.name.clone(),
                resource_type: rp.resource_type.clone(),
                id,
                json,
            });
        }
    }

    // Resolve references now that every id is known; drop those whose target was not produced.
    let urns: HashMap<String, String> = first_of
        .iter()
        .map(|(n, i)| (n.to_string(), ids::urn(&built[*i].id)))
        .collect();
    for b in &mut built {
        let mut v = Value::Object(std::mem::take(&mut b.json));
        resolve_refs(&mut v, &urns);
        prune(&mut v);
        if let Value::Object(m) = v {
            b.json = m;
        }
    }
    let focus = mp
        .focus
        .iter()
        .filter_map(|n| first_of.get(n.as_str()).copied())
        .take(1)
        .collect();
    let sender = mp
        .sender
        .as_ref()
        .and_then(|n| first_of.get(n.as_str()).copied());
    Ok(MapResult {
        resources: built,
        focus,
        sender,
        warnings: r.warnings,
    })
}

fn resource_id(
    site: &SiteConfig,
    rtype: &str,
    content: &Map<String, Value>,
    fallback: impl FnOnce() -> Vec<String>,
) -> uuid::Uuid {
    let first_identifier = content
        .get("identifier")
        .and_then(|v| match v {
            Value::Array(a) => a.first(),
            other => Some(other),
        })
        .and_then(|i| {
            let system = i.get("system")?.as_str()?;
            let value = i.get("value")?.as_str()?;
            Some((system, value))
        });
    match first_identifier {
        Some((system, value)) => ids::resource_uuid(&[&site.ods_code, rtype, system, value]),
        None => {
            let parts = fallback();
            let mut all: Vec<&str> = vec![&site.ods_code, rtype, "message"];
            all.extend(parts.iter().map(String::as_str));
            ids::resource_uuid(&all)
        }
    }
}

impl<'m> Runner<'_, 'm> {
    /// Applies `rules` into `obj`; true if a message-derived value landed.
    fn rules(
        &mut self,
        rules: &[RulePlan],
        cur: &Cursor<'m>,
        obj: &mut Map<String, Value>,
    ) -> Result<bool, RunError> {
        let mut any = false;
        for rule in rules {
            match &rule.for_each {
                Some(p) => {
                    for rep in self.reps(p, cur) {
                        let c = Cursor {
                            seg: cur.seg,
                            rep: Some(rep),
                        };
                        any |= self.rule(rule, &c, obj)?;
                    }
                }
                None => any |= self.rule(rule, cur, obj)?,
            }
        }
        Ok(any)
    }

    fn rule(
        &mut self,
        rule: &RulePlan,
        cur: &Cursor<'m>,
        obj: &mut Map<String, Value>,
    ) -> Result<bool, RunError> {
        if !self.conds(&rule.when, cur) {
            return Ok(false);
        }
        let (text, from_message) = match &rule.source {
            Source::From(p) => (self.scalar(p, cur), true),
            Source::Value(t) => (Some(self.render(t)), false),
            Source::Ref(name) => {
                let mut m = Map::new();
                m.insert(
                    "reference".into(),
                    Value::String(format!("{REF_MARK}{name}")),
                );
                set_path(obj, &rule.target, Value::Object(m), rule)?;
                return Ok(true);
            }
            Source::Object(children) => {
                let mut child = Map::new();
                if self.rules(children, cur, &mut child)? {
                    set_path(obj, &rule.target, Value::Object(child), rule)?;
                    return Ok(true);
                }
                return Ok(false);
            }
        };
        let Some(mut text) = text else {
            return Ok(false);
        };
        for f in &rule.functions {
            text = match f {
                Func::Trim => text.trim().to_string(),
                Func::Upper => text.to_uppercase(),
                Func::Lower => text.to_lowercase(),
            };
        }
        if let Some(i) = rule.lookup {
            let Some(vm) = self.plan.valuemaps.get(i) else {
                return Ok(false);
            };
            match vm.get(&text) {
                Some(v) => text = v.to_string(),
                None => {
                    self.warnings.push(format!(
                        "{}: value map `{}` has no entry for the code in this message and no default",
                        rule.origin, vm.name
                    ));
                    return Ok(false);
                }
            }
        }
        let Some(value) = self.convert(rule, text) else {
            return Ok(false);
        };
        set_path(obj, &rule.target, value, rule)?;
        Ok(from_message)
    }

    fn convert(&mut self, rule: &RulePlan, text: String) -> Option<Value> {
        let policy = time::AmbiguityPolicy::Earlier;
        let warn = |w: &mut Vec<String>, what: &str| {
            w.push(format!("{}: {what}; the element was left out", rule.origin));
        };
        match rule.convert {
            Convert::String => Some(Value::String(text)),
            Convert::Date => match time::hl7_to_fhir_date(&text) {
                Ok(d) => Some(Value::String(d)),
                Err(e) => {
                    warn(&mut self.warnings, &format!("not a date ({e})"));
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
                            self.warnings.push(format!(
                                "{}: local time falls in a clock change ({flag:?}); resolved to the earlier offset",
                                rule.origin
                            ));
                        }
                        Some(Value::String(dt.value))
                    }
                    Err(e) => {
                        warn(&mut self.warnings, &format!("not a timestamp ({e})"));
                        None
                    }
                }
            }
            Convert::Boolean => match text.to_ascii_uppercase().as_str() {
                "Y" | "YES" | "TRUE" | "T" | "1" => Some(Value::Bool(true)),
                "N" | "NO" | "FALSE" | "F" | "0" => Some(Value::Bool(false)),
                _ => {
                    warn(&mut self.warnings, "not a boolean (Y/N)");
                    None
                }
            },
            Convert::Integer => match text.trim().parse::<i64>() {
                Ok(i) => Some(Value::from(i)),
                Err(_) => {
                    warn(&mut self.warnings, "not an integer");
                    None
                }
            },
            Convert::Decimal => {
                let t = text.trim();
                // Keep the decimal text exactly (1.50 stays 1.50): FHIR decimals carry precision.
                let looks_decimal = !t.is_empty()
                    && t.trim_start_matches(['-', '+'])
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '.')
                    && t.matches('.').count() <= 1
                    && t.chars().any(|c| c.is_ascii_digit());
                let t = t.trim_start_matches('+');
                match (looks_decimal, serde_json::from_str::<serde_json::Number>(t)) {
                    (true, Ok(n)) => Some(Value::Number(n)),
                    _ => {
                        warn(&mut self.warnings, "not a decimal");
                        None
                    }
                }
            }
            Convert::NhsNumber => match nhs::normalise_nhs_number(&text) {
                Some(n) if nhs::is_valid_nhs_number(&n) => Some(Value::String(n)),
                _ => {
                    warn(
                        &mut self.warnings,
                        "an NHS number fails the modulus 11 check",
                    );
                    None
                }
            },
        }
    }

    fn render(&self, t: &Template) -> String {
        let h = self.msg.header();
        let mut s = String::new();
        for p in &t.0 {
            match p {
                TplPart::Lit(l) => s.push_str(l),
                TplPart::Var(Var::SiteOds) => s.push_str(&self.cx.site.ods_code),
                TplPart::Var(Var::ApplianceId) => s.push_str(&self.cx.site.appliance_id),
                TplPart::Var(Var::System(kind)) => s.push_str(&self.cx.site.local_system(kind)),
                TplPart::Var(Var::Feed) => s.push_str(self.cx.feed),
                TplPart::Var(Var::MessageCode) => s.push_str(&h.message_type.code),
                TplPart::Var(Var::MessageTrigger) => s.push_str(&h.message_type.trigger),
            }
        }
        s
    }

    fn conds(&self, conds: &[Cond], cur: &Cursor<'m>) -> bool {
        conds.iter().all(|c| {
            let v = self.scalar(&c.path, cur);
            match &c.test {
                Test::Exists(e) => {
                    let present = match &c.path {
                        Hl7Path::Absolute {
                            segment,
                            field: None,
                            ..
                        } => self.msg.segments_named(segment).next().is_some(),
                        _ => v.is_some(),
                    };
                    present == *e
                }
                Test::Equals(x) => v.as_deref() == Some(x.as_str()),
                Test::In(xs) => v.is_some_and(|v| xs.contains(&v)),
                Test::NotIn(xs) => v.is_none_or(|v| !xs.contains(&v)),
                Test::NhsNumber { valid } => {
                    let ok = v
                        .and_then(|v| nhs::normalise_nhs_number(&v))
                        .is_some_and(|n| nhs::is_valid_nhs_number(&n));
                    // `invalid` means "present but failing": an absent number is neither.
                    if *valid {
                        ok
                    } else {
                        !ok && self.scalar(&c.path, cur).is_some()
                    }
                }
            }
        })
    }

    /// The segment an absolute path reads: the cursor's occurrence when it is of that type,
    /// else the first occurrence in the message.
    fn segment(&self, name: &str, cur: &Cursor<'m>) -> Option<&'m Segment> {
        match cur.seg {
            Some(s) if s.name() == name => Some(s),
            _ => self.msg.segments().iter().find(|s| s.name() == name),
        }
    }

    /// Raw repetitions selected by an absolute field path (components ignored).
    fn reps(&self, p: &Hl7Path, cur: &Cursor<'m>) -> Vec<&'m str> {
        let seps = self.msg.separators();
        match p {
            Hl7Path::Relative { .. } => cur.rep.into_iter().collect(),
            Hl7Path::Absolute {
                segment,
                field: Some(field),
                rep,
                ..
            } => {
                let Some(seg) = self.segment(segment, cur) else {
                    return Vec::new();
                };
                let all = seg.repetitions(*field);
                match rep {
                    RepSelect::First => all.into_iter().take(1).collect(),
                    RepSelect::All => all,
                    RepSelect::Index(n) => all.into_iter().nth(n - 1).into_iter().collect(),
                    RepSelect::Filter { component, values } => all
                        .into_iter()
                        .filter(|r| {
                            let c =
                                component_of(r, seps.component, seps.subcomponent, *component, 1);
                            let c = decode_escapes(c, seps, self.cx.encoding);
                            values.contains(&c)
                        })
                        .collect(),
                }
            }
            Hl7Path::Absolute { field: None, .. } => Vec::new(),
        }
    }

    /// The decoded scalar a path points at, or None when absent, empty or `""`.
    fn scalar(&self, p: &Hl7Path, cur: &Cursor<'m>) -> Option<String> {
        let seps = self.msg.separators();
        let (rep, component, sub) = match p {
            Hl7Path::Relative { component, sub } => (cur.rep?, *component, sub.unwrap_or(1)),
            Hl7Path::Absolute {
                segment,
                field: Some(field),
                component,
                sub,
                ..
            } => {
                // MSH-1 and MSH-2 are the separators themselves: never split them.
                if segment == "MSH" && *field <= 2 {
                    let seg = self.segment(segment, cur)?;
                    return seg
                        .field_raw(*field)
                        .map(str::to_string)
                        .filter(|s| !s.is_empty());
                }
                let first = self.reps(p, cur).into_iter().next()?;
                (first, component.unwrap_or(1), sub.unwrap_or(1))
            }
            Hl7Path::Absolute { field: None, .. } => return None,
        };
        let raw = component_of(rep, seps.component, seps.subcomponent, component, sub);
        if raw.is_empty() || raw == "\"\"" {
            return None;
        }
        let text = decode_escapes(raw, seps, self.cx.encoding);
        if text.trim().is_empty() {
            None
        } else {
            Some(text)
        }
    }
}

/// Component `c`, subcomponent `s` (1-based) of a raw repetition.
fn component_of(rep: &str, comp_sep: char, sub_sep: char, c: usize, s: usize) -> &str {
    let comp = rep.split(comp_sep).nth(c - 1).unwrap_or("");
    comp.split(sub_sep).nth(s - 1).unwrap_or("")
}

fn conflict(rule: &RulePlan, what: String) -> RunError {
    RunError {
        origin: rule.origin.to_string(),
        message: format!("`set: {}`: {what}", rule.target),
    }
}

/// Writes `value` at `path` inside `obj`, creating objects and arrays on the way.
fn set_path(
    obj: &mut Map<String, Value>,
    path: &TargetPath,
    value: Value,
    rule: &RulePlan,
) -> Result<(), RunError> {
    let steps = &path.0;
    let Some((last, init)) = steps.split_last() else {
        return Ok(());
    };
    let mut here = obj;
    for step in init {
        let slot = here
            .entry(step.name.clone())
            .or_insert_with(|| match step.index {
                Index::None => Value::Object(Map::new()),
                _ => Value::Array(Vec::new()),
            });
        let next = match (step.index, slot) {
            (Index::None, Value::Object(m)) => m,
            (Index::None, _) => {
                return Err(conflict(
                    rule,
                    format!(
                        "`{}` is a list here: give an index such as `{}[0]`",
                        step.name, step.name
                    ),
                ));
            }
            (idx, Value::Array(a)) => {
                let i = match idx {
                    Index::At(n) => n,
                    Index::Append => a.len(),
                    Index::Last => a.len().saturating_sub(1),
                    Index::None => 0,
                };
                if i > a.len() {
                    return Err(conflict(
                        rule,
                        format!(
                            "`{}[{i}]` would skip elements (the list has {})",
                            step.name,
                            a.len()
                        ),
                    ));
                }
                if i == a.len() {
                    a.push(Value::Object(Map::new()));
                }
                match a.get_mut(i) {
                    Some(Value::Object(m)) => m,
                    _ => {
                        return Err(conflict(
                            rule,
                            format!("`{}[{i}]` holds a value, not an element", step.name),
                        ));
                    }
                }
            }
            (_, _) => {
                return Err(conflict(
                    rule,
                    format!("`{}` is a single element here, not a list", step.name),
                ));
            }
        };
        here = next;
    }
    match last.index {
        Index::None => {
            here.insert(last.name.clone(), value);
        }
        idx => {
            let slot = here
                .entry(last.name.clone())
                .or_insert_with(|| Value::Array(Vec::new()));
            let Value::Array(a) = slot else {
                return Err(conflict(
                    rule,
                    format!("`{}` is a single element here, not a list", last.name),
                ));
            };
            let i = match idx {
                Index::At(n) => n,
                Index::Append => a.len(),
                Index::Last => a.len().saturating_sub(1),
                Index::None => 0,
            };
            if i > a.len() {
                return Err(conflict(
                    rule,
                    format!(
                        "`{}[{i}]` would skip elements (the list has {})",
                        last.name,
                        a.len()
                    ),
                ));
            }
            if i == a.len() {
                a.push(value);
            } else if let Some(slot) = a.get_mut(i) {
                *slot = value;
            }
        }
    }
    Ok(())
}

fn resolve_refs(v: &mut Value, urns: &HashMap<String, String>) {
    match v {
        Value::Object(m) => {
            let mut drop_reference = false;
            if let Some(Value::String(s)) = m.get_mut("reference")
                && let Some(name) = s.strip_prefix(REF_MARK)
            {
                match urns.get(name) {
                    Some(u) => *s = u.clone(),
                    None => drop_reference = true,
                }
            }
            if drop_reference {
                m.remove("reference");
            }
            for (_, child) in m.iter_mut() {
                resolve_refs(child, urns);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| resolve_refs(c, urns)),
        _ => {}
    }
}

/// Removes empty objects, arrays and strings: FHIR forbids them.
fn prune(v: &mut Value) -> bool {
    match v {
        Value::Object(m) => {
            m.retain(|_, c| !prune(c));
            m.is_empty()
        }
        Value::Array(a) => {
            a.retain_mut(|c| !prune(c));
            a.is_empty()
        }
        Value::String(s) => s.is_empty(),
        Value::Null => true,
        _ => false,
    }
}
