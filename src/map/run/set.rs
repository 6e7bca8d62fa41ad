//! Writing values into the JSON being built, resolving references, removing empty elements.

use serde_json::{Map, Value};

use super::{REF_MARK, RunError};
use crate::map::path::{Index, TargetPath};
use crate::map::plan::RulePlan;

fn conflict(rule: &RulePlan, what: String) -> RunError {
    RunError {
        defect: true,
        origin: rule.origin.to_string(),
        message: format!("`set: {}`: {what}", rule.target),
    }
}

fn position(idx: Index, len: usize) -> usize {
    match idx {
        Index::At(n) => n,
        Index::Append => len,
        Index::Last => len.saturating_sub(1),
        Index::None => 0,
    }
}

/// Writes `value` at `path` inside `obj`, creating objects and arrays on the way. With `want`,
/// returns the concrete path written (`name[1].given[0]`), for `--explain`.
pub(super) fn set_path(
    obj: &mut Map<String, Value>,
    path: &TargetPath,
    value: Value,
    rule: &RulePlan,
    want: bool,
) -> Result<Option<String>, RunError> {
    let steps = &path.0;
    let Some((last, init)) = steps.split_last() else {
        return Ok(None);
    };
    let mut shown = String::new();
    let mut note = |name: &str, i: Option<usize>| {
        if want {
            if !shown.is_empty() {
                shown.push('.');
            }
            shown.push_str(name);
            if let Some(i) = i {
                shown.push_str(&format!("[{i}]"));
            }
        }
    };
    let mut here = obj;
    for step in init {
        // Look up before inserting: an `entry` would allocate the key on every write. A new key
        // goes through `entry`, so it is hashed twice rather than three times (insert, get).
        let slot = if here.contains_key(&step.name) {
            let Some(slot) = here.get_mut(&step.name) else {
                return Ok(None);
            };
            slot
        } else {
            here.entry(step.name.clone()).or_insert(match step.index {
                Index::None => Value::Object(Map::new()),
                _ => Value::Array(Vec::new()),
            })
        };
        let next = match (step.index, slot) {
            (Index::None, Value::Object(m)) => {
                note(&step.name, None);
                m
            }
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
                let i = position(idx, a.len());
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
                note(&step.name, Some(i));
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
            note(&last.name, None);
            here.insert(last.name.clone(), value);
        }
        idx => {
            let slot = if here.contains_key(&last.name) {
                let Some(slot) = here.get_mut(&last.name) else {
                    return Ok(None);
                };
                slot
            } else {
                here.entry(last.name.clone())
                    .or_insert(Value::Array(Vec::new()))
            };
            let Value::Array(a) = slot else {
                return Err(conflict(
                    rule,
                    format!("`{}` is a single element here, not a list", last.name),
                ));
            };
            let i = position(idx, a.len());
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
            note(&last.name, Some(i));
            if i == a.len() {
                a.push(value);
            } else if let Some(slot) = a.get_mut(i) {
                *slot = value;
            }
        }
    }
    Ok(want.then_some(shown))
}

/// The pending reference a placeholder stands for.
///
/// Called on every element of every resource: the key is found by a scan rather than
/// `Value::get`, which hashes `"reference"` (SipHash) for each object, and a FHIR element has
/// only a handful of keys.
fn placeholder(v: &Value) -> Option<usize> {
    let Value::Object(m) = v else {
        return None;
    };
    let (_, r) = m.iter().find(|(k, _)| k.as_str() == "reference")?;
    r.as_str()?.strip_prefix(REF_MARK)?.parse().ok()
}

/// Replaces reference placeholders by `urn:uuid:`s: a list element stands for every resolved
/// target (it is repeated), a single element for the first; with none, the reference is dropped.
pub(super) fn resolve_refs(v: &mut Value, resolved: &[Vec<&str>]) {
    resolve_one(v, resolved);
}

fn resolve_one(v: &mut Value, resolved: &[Vec<&str>]) {
    if let Some(i) = placeholder(v) {
        match resolved.get(i).and_then(|u| u.first()) {
            Some(u) => set_reference(v, u),
            None => {
                if let Value::Object(m) = v {
                    m.remove("reference");
                }
            }
        }
        return;
    }
    resolve_inside(v, resolved);
}

/// [`resolve_one`] for the elements of `v`, which is not itself a placeholder.
fn resolve_inside(v: &mut Value, resolved: &[Vec<&str>]) {
    match v {
        // Rebuilt only when a placeholder is a direct element (it may expand to several); else
        // each element is known not to be one, so it is not checked again.
        Value::Array(a) if !a.iter().any(|item| placeholder(item).is_some()) => {
            for item in a.iter_mut() {
                resolve_inside(item, resolved);
            }
        }
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for mut item in a.drain(..) {
                match placeholder(&item).map(|i| resolved.get(i)) {
                    Some(Some(urns)) => {
                        for u in urns {
                            let mut copy = item.clone();
                            set_reference(&mut copy, u);
                            out.push(copy);
                        }
                    }
                    Some(None) => {}
                    None => {
                        resolve_inside(&mut item, resolved);
                        out.push(item);
                    }
                }
            }
            *a = out;
        }
        Value::Object(m) => {
            for (_, child) in m.iter_mut() {
                resolve_one(child, resolved);
            }
        }
        _ => {}
    }
}

fn set_reference(v: &mut Value, urn: &str) {
    if let Value::Object(m) = v {
        m.insert("reference".into(), Value::String(urn.to_string()));
    }
}

/// Removes empty objects, arrays and strings: FHIR forbids them.
pub(super) fn prune(v: &mut Value) -> bool {
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
