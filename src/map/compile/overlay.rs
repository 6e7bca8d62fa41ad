//! Site overlays: a site file changes a shipped definition without copying it.
//!
//! An overlay names one definition (`message:`, `datatype:` or `valuemap:`) and lists changes;
//! overlays apply in file order after every base definition is known. Rules are appended (a later
//! rule that sets the same single element wins, so appending is how a value is overridden), or
//! replaced / removed by the `id:` the base rule carries.

use std::collections::BTreeMap;

use serde_saphyr::Spanned;

use super::suggest::suggest;
use super::{Defs, Diag};
use crate::map::model::{Overlay, Rule};

pub(crate) fn apply(defs: &mut Defs, o: &Overlay, diag: &mut Diag) {
    let file = o.file.clone();
    let named = [o.message.as_ref(), o.datatype.as_ref(), o.valuemap.as_ref()]
        .iter()
        .filter(|x| x.is_some())
        .count();
    if named != 1 {
        diag.whole(
            &file,
            "an overlay names exactly one of `message:`, `datatype:` or `valuemap:`",
        );
        return;
    }
    if let Some(name) = &o.message {
        let names: Vec<String> = defs.messages.keys().cloned().collect();
        let Some(m) = defs.messages.get_mut(&name.value) else {
            let hint = suggest(&name.value, &names);
            diag.at(
                &file,
                name,
                format!(
                    "overlay of an unknown message mapping `{}`{hint}",
                    name.value
                ),
            );
            return;
        };
        if let Some(v) = &o.matches {
            m.matches = v.clone();
        }
        if let Some(v) = &o.versions {
            m.versions = v.clone();
        }
        if let Some(v) = &o.focus {
            m.focus = v.clone();
        }
        if let Some(v) = &o.sender {
            m.sender = Some(v.clone());
        }
        m.constants
            .extend(o.constants.iter().map(|(k, v)| (k.clone(), v.clone())));
        m.vars
            .extend(o.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        m.groups
            .extend(o.groups.iter().map(|(k, v)| (k.clone(), v.clone())));
        for ro in &o.resources {
            let names: Vec<String> = m.resources.iter().map(|r| r.name.value.clone()).collect();
            let Some(r) = m
                .resources
                .iter_mut()
                .find(|r| r.name.value == ro.name.value)
            else {
                let hint = suggest(&ro.name.value, &names);
                diag.at(
                    &file,
                    &ro.name,
                    format!(
                        "`{}` is not a resource of `{}`{hint}",
                        ro.name.value, name.value
                    ),
                );
                continue;
            };
            if let Some(p) = &ro.profile {
                r.profile = Some(p.clone());
            }
            if let Some(w) = &ro.when {
                r.when = Some(w.clone());
            }
            if let Some(k) = &ro.key {
                r.key = k.clone();
            }
            r.vars
                .extend(ro.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
            edit_rules(
                &mut r.rules,
                &ro.rules,
                &ro.replace,
                &ro.remove_rules,
                &file,
                diag,
            );
        }
        for rm in &o.remove {
            let before = m.resources.len();
            m.resources.retain(|r| r.name.value != rm.value);
            if m.resources.len() == before {
                let names: Vec<String> = m.resources.iter().map(|r| r.name.value.clone()).collect();
                let hint = suggest(&rm.value, &names);
                diag.at(
                    &file,
                    rm,
                    format!("`{}` is not a resource of `{}`{hint}", rm.value, name.value),
                );
            }
        }
        m.resources.extend(o.add.iter().cloned());
        if !o.rules.is_empty() || !o.replace.is_empty() || !o.remove_rules.is_empty() {
            diag.whole(
                &file,
                format!(
                    "overlay of `{}`: rules belong to a resource; list them under `resources: - name: ...`",
                    name.value
                ),
            );
        }
    } else if let Some(name) = &o.datatype {
        let names: Vec<String> = defs.datatypes.keys().cloned().collect();
        let Some(d) = defs.datatypes.get_mut(&name.value) else {
            let hint = suggest(&name.value, &names);
            diag.at(
                &file,
                name,
                format!("overlay of an unknown datatype map `{}`{hint}", name.value),
            );
            return;
        };
        edit_rules(
            &mut d.rules,
            &o.rules,
            &o.replace,
            &o.remove_rules,
            &file,
            diag,
        );
    } else if let Some(name) = &o.valuemap {
        let names: Vec<String> = defs.valuemaps.keys().cloned().collect();
        let Some((_, v)) = defs.valuemaps.get_mut(&name.value) else {
            let hint = suggest(&name.value, &names);
            diag.at(
                &file,
                name,
                format!("overlay of an unknown value map `{}`{hint}", name.value),
            );
            return;
        };
        merge(&mut v.entries, &o.entries);
        merge(&mut v.display, &o.display);
        for code in &o.remove_entries {
            v.entries.remove(code);
        }
        if let Some(d) = &o.default {
            v.default = Some(d.clone());
        }
        if let Some(s) = &o.system {
            v.system = Some(s.clone());
        }
        if let Some(s) = &o.source_system {
            v.source_system = Some(s.clone());
        }
    }
}

fn merge(into: &mut BTreeMap<String, String>, from: &BTreeMap<String, String>) {
    into.extend(from.iter().map(|(k, v)| (k.clone(), v.clone())));
}

fn edit_rules(
    rules: &mut Vec<Rule>,
    append: &[Rule],
    replace: &[Rule],
    remove: &[Spanned<String>],
    file: &str,
    diag: &mut Diag,
) {
    let ids = |rules: &[Rule]| -> Vec<String> {
        rules
            .iter()
            .filter_map(|r| r.id.as_ref().map(|i| i.value.clone()))
            .collect()
    };
    for rep in replace {
        let Some(id) = &rep.id else {
            diag.at(
                file,
                &rep.set,
                "a replacing rule needs the `id:` of the rule it replaces",
            );
            continue;
        };
        match rules
            .iter_mut()
            .find(|r| r.id.as_ref().is_some_and(|i| i.value == id.value))
        {
            Some(slot) => *slot = rep.clone(),
            None => {
                let hint = suggest(&id.value, &ids(rules));
                diag.at(file, id, format!("no rule has `id: {}`{hint}", id.value));
            }
        }
    }
    for id in remove {
        let before = rules.len();
        rules.retain(|r| r.id.as_ref().is_none_or(|i| i.value != id.value));
        if rules.len() == before {
            let hint = suggest(&id.value, &ids(rules));
            diag.at(file, id, format!("no rule has `id: {}`{hint}", id.value));
        }
    }
    rules.extend(append.iter().cloned());
}
