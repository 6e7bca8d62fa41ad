//! Writing values into the tree being built, resolving references, removing empty elements.

use super::RunError;
use super::node::{Node, Obj};
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
    obj: &mut Obj,
    path: &TargetPath,
    value: Node,
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
        let slot = here.entry(step.name.clone(), || match step.index {
            Index::None => Node::Obj(Obj::new()),
            _ => Node::Arr(Vec::new()),
        });
        let next = match (step.index, slot) {
            (Index::None, Node::Obj(m)) => {
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
            (idx, Node::Arr(a)) => {
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
                    a.push(Node::Obj(Obj::new()));
                }
                note(&step.name, Some(i));
                match a.get_mut(i) {
                    Some(Node::Obj(m)) => m,
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
            let slot = here.entry(last.name.clone(), || Node::Arr(Vec::new()));
            let Node::Arr(a) = slot else {
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

/// Replaces reference placeholders by `urn:uuid:`s: a list element stands for every resolved
/// target (it is repeated), a single element for the first; with none, the reference is dropped.
pub(super) fn resolve_refs(v: &mut Node, resolved: &[Vec<&str>]) {
    match v {
        // Without a target the placeholder stays, and pruning removes it.
        Node::Ref(i) => {
            if let Some(u) = resolved.get(*i).and_then(|u| u.first()) {
                *v = Node::Str((*u).to_string());
            }
        }
        // Rebuilt only when a placeholder is a direct element (it may expand to several).
        Node::Arr(a) if a.iter().any(|item| item.placeholder().is_some()) => {
            let mut out = Vec::with_capacity(a.len());
            for mut item in a.drain(..) {
                match item.placeholder().map(|i| resolved.get(i)) {
                    Some(Some(urns)) => {
                        for u in urns {
                            let mut copy = item.clone();
                            set_reference(&mut copy, u);
                            out.push(copy);
                        }
                    }
                    Some(None) => {}
                    None => {
                        resolve_refs(&mut item, resolved);
                        out.push(item);
                    }
                }
            }
            *a = out;
        }
        Node::Arr(a) => a.iter_mut().for_each(|item| resolve_refs(item, resolved)),
        Node::Obj(m) => m.iter_mut().for_each(|child| resolve_refs(child, resolved)),
        Node::Str(_) | Node::Bool(_) | Node::Num(_) => {}
    }
}

fn set_reference(v: &mut Node, urn: &str) {
    if let Node::Obj(m) = v {
        m.insert("reference", Node::Str(urn.to_string()));
    }
}
