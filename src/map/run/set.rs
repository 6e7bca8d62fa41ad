//! Writing values into the resource being built, and resolving its references afterwards.
//!
//! A resource is built directly as the Bundle's [`Json`] tree: no intermediate tree, no
//! conversion walk at the end (that walk, and the one looking for reference placeholders, were
//! ~15% of mapping a message). Two rules make that possible:
//! - nothing empty is ever written (FHIR forbids empty strings, objects and arrays): a value
//!   that is empty is skipped before any container is created for it;
//! - a reference whose target is not known yet is written as `{"reference": null}` (mapped
//!   content never holds a `null` otherwise), and its concrete location (keys and array
//!   indexes, see [`Step`]) is recorded. Once every resource of the message is built,
//!   [`resolve`] goes straight to each placeholder: it becomes the target's `urn:uuid:`,
//!   one copy per target for a list element that takes every match, or it is removed with any
//!   element left empty by its removal.

use super::RunError;
use crate::fhir::tree::{Json, Key, Obj};
use crate::map::path::{Index, TargetPath};
use crate::map::plan::RulePlan;

/// One step of a concrete location inside a resource: a member, or a list element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Key(Key),
    Index(usize),
}

/// A location as authors write it (`name[1].given[0]`), for `--explain`.
pub(super) fn show(loc: &[Step]) -> String {
    let mut s = String::new();
    for step in loc {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

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

/// Whether `v` is a value FHIR forbids (an empty string, object or list).
fn is_empty(v: &Json) -> bool {
    match v {
        Json::Str(s) => s.is_empty(),
        Json::Obj(o) => o.is_empty(),
        Json::Arr(a) => a.is_empty(),
        Json::Null | Json::Bool(_) | Json::Num(_) => false,
    }
}

/// Writes `value` at `path` inside `obj`, creating objects and lists on the way; false (and
/// nothing created) when the value is empty. With `loc`, the concrete location written is
/// pushed onto it.
pub(super) fn set_path(
    obj: &mut Obj,
    path: &TargetPath,
    value: Json,
    rule: &RulePlan,
    mut loc: Option<&mut Vec<Step>>,
) -> Result<bool, RunError> {
    let steps = &path.0;
    let Some((last, init)) = steps.split_last() else {
        return Ok(false);
    };
    if is_empty(&value) {
        return Ok(false);
    }
    let mut note = |name: &Key, i: Option<usize>| {
        if let Some(l) = loc.as_deref_mut() {
            l.push(Step::Key(name.clone()));
            if let Some(i) = i {
                l.push(Step::Index(i));
            }
        }
    };
    let mut here = obj;
    for step in init {
        let slot = here.entry(step.name.clone(), || match step.index {
            Index::None => Json::Obj(Obj::new()),
            _ => Json::Arr(Vec::new()),
        });
        let next = match (step.index, slot) {
            (Index::None, Json::Obj(m)) => {
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
            (idx, Json::Arr(a)) => {
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
                    a.push(Json::Obj(Obj::new()));
                }
                note(&step.name, Some(i));
                match a.get_mut(i) {
                    Some(Json::Obj(m)) => m,
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
            let slot = here.entry(last.name.clone(), || Json::Arr(Vec::new()));
            let Json::Arr(a) = slot else {
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
    Ok(true)
}

/// The placeholder written for a reference resolved later.
pub(super) fn placeholder() -> Json {
    let mut m = Obj::with_capacity(1);
    m.insert("reference", Json::Null);
    Json::Obj(m)
}

/// A reference placeholder of one resource: where it is, whether a list element stands for
/// every target, and the targets' `urn:uuid:`s.
pub(super) struct Placed<'a> {
    pub loc: &'a [Step],
    pub all: bool,
    pub urns: &'a [&'a str],
}

/// Replaces the placeholders of one resource by their targets (see the module docs).
///
/// Placeholders are handled from the last location to the first, so that expanding or removing
/// a list element never moves one not handled yet. A location whose element no longer holds a
/// placeholder (a later rule wrote over it) is skipped.
pub(super) fn resolve(root: &mut Obj, mut refs: Vec<Placed<'_>>) {
    // Stable: of two placeholders at one location, the later-written (the one there now) goes
    // first, and the earlier then finds it resolved.
    refs.reverse();
    refs.sort_by(|a, b| cmp_loc(b.loc, a.loc));
    for r in refs {
        let Some(Json::Obj(el)) = get_mut(root, r.loc) else {
            continue;
        };
        if !matches!(el.get("reference"), Some(Json::Null)) {
            continue;
        }
        let in_list = match r.loc.split_last() {
            Some((Step::Index(i), parent)) if r.all => Some((*i, parent)),
            _ => None,
        };
        match (in_list, r.urns) {
            (Some((i, parent)), urns) if urns.len() > 1 => {
                let template = el.clone();
                // The element was found at `loc`, so its parent is a list holding index `i`.
                if let Some(Json::Arr(a)) = get_mut(root, parent)
                    && i < a.len()
                {
                    let copies = urns.iter().map(|u| {
                        let mut copy = template.clone();
                        copy.insert("reference", Json::Str((*u).to_string()));
                        Json::Obj(copy)
                    });
                    a.splice(i..=i, copies);
                }
            }
            (_, [first, ..]) => el.insert("reference", Json::Str((*first).to_string())),
            (_, []) => {
                el.remove("reference");
                if el.is_empty() {
                    remove(root, r.loc);
                }
            }
        }
    }
}

/// Orders locations; list indexes by number (which is what the order of resolution needs).
fn cmp_loc(a: &[Step], b: &[Step]) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for (x, y) in a.iter().zip(b) {
        let o = match (x, y) {
            (Step::Key(p), Step::Key(q)) => p.as_ref().cmp(q.as_ref()),
            (Step::Index(p), Step::Index(q)) => p.cmp(q),
            (Step::Key(_), Step::Index(_)) => Ordering::Less,
            (Step::Index(_), Step::Key(_)) => Ordering::Greater,
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// The element at `loc`.
fn get_mut<'a>(root: &'a mut Obj, loc: &[Step]) -> Option<&'a mut Json> {
    let (Step::Key(first), rest) = loc.split_first()? else {
        return None;
    };
    let mut here = root.get_mut(first)?;
    for step in rest {
        here = match (step, here) {
            (Step::Key(k), Json::Obj(o)) => o.get_mut(k)?,
            (Step::Index(i), Json::Arr(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(here)
}

/// Removes the element at `loc`, then each container its removal left empty.
fn remove(root: &mut Obj, loc: &[Step]) {
    let mut n = loc.len();
    while let Some(last) = n.checked_sub(1).and_then(|i| loc.get(i)) {
        let parent = &loc[..n - 1];
        let emptied = if parent.is_empty() {
            if let Step::Key(k) = last {
                root.remove(k);
            }
            return;
        } else {
            match (get_mut(root, parent), last) {
                (Some(Json::Obj(o)), Step::Key(k)) => {
                    o.remove(k);
                    o.is_empty()
                }
                (Some(Json::Arr(a)), Step::Index(i)) => {
                    if *i < a.len() {
                        a.remove(*i);
                    }
                    a.is_empty()
                }
                _ => return,
            }
        };
        if !emptied {
            return;
        }
        n -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &'static str) -> Step {
        Step::Key(Key::Borrowed(k))
    }

    fn resource() -> Obj {
        let v = serde_json::json!({
            "subject": { "reference": null },
            "result": [
                { "reference": null },
                { "reference": null, "display": "kept" },
                { "reference": null }
            ],
            "performer": [{ "actor": { "reference": null } }]
        });
        match Json::from(v) {
            Json::Obj(o) => o,
            _ => Obj::new(),
        }
    }

    #[test]
    fn placeholders_expand_resolve_or_go_with_what_they_leave_empty() {
        let mut r = resource();
        let subject = [key("subject")];
        let r0 = [key("result"), Step::Index(0)];
        let r1 = [key("result"), Step::Index(1)];
        let r2 = [key("result"), Step::Index(2)];
        let actor = [key("performer"), Step::Index(0), key("actor")];
        let two = ["urn:uuid:a", "urn:uuid:b"];
        let one = ["urn:uuid:c"];
        let placed = |loc, all, urns| Placed { loc, all, urns };
        resolve(
            &mut r,
            vec![
                placed(&subject, false, &one),
                placed(&r0, true, &two),
                placed(&r1, true, &[]),
                placed(&r2, true, &one),
                placed(&actor, false, &[]),
            ],
        );
        assert_eq!(
            Json::Obj(r).to_value(),
            serde_json::json!({
                "subject": { "reference": "urn:uuid:c" },
                "result": [
                    { "reference": "urn:uuid:a" },
                    { "reference": "urn:uuid:b" },
                    { "display": "kept" },
                    { "reference": "urn:uuid:c" }
                ]
            })
        );
    }

    #[test]
    fn locations_read_as_authors_write_them() {
        assert_eq!(
            show(&[key("name"), Step::Index(1), key("given"), Step::Index(0)]),
            "name[1].given[0]"
        );
    }
}
