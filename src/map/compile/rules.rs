//! The compiler proper: message mappings, resources, rules, conditions, variables, templates
//! and functions, checked against the FHIR catalogue and the HL7 segment table.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::suggest::suggest;
use super::target::{TargetInfo, convert_fits, inferred_convert, resolve};
use super::{Defs, Diag, origin, parse_match};
use crate::config::SiteConfig;
use crate::map::fhir_model::{Kind, model};
use crate::map::model::{DatatypeMap, GroupDef, MessageMap, ResourceMap, Rule, VarDef, When};
use crate::map::path::{Hl7Path, Index, TargetPath};
use crate::map::plan::*;
use crate::map::segments;

const MAX_NESTING: usize = 12;

/// What rules are compiled against.
#[derive(Clone, Copy)]
struct Scope<'s> {
    /// The FHIR type being built (None when the target above was already wrong).
    base: Option<&'static str>,
    /// Relative paths (`.1`) are allowed: inside a datatype map, `each` or a `for` over a field.
    in_rep: bool,
    vars: &'s HashMap<String, usize>,
    /// Inside a datatype map: no groups, references or variables.
    datatype: bool,
    depth: usize,
}

#[derive(Default)]
struct MsgCtx {
    groups: Vec<GroupPlan>,
    group_names: HashMap<String, usize>,
    resources: Vec<String>,
    /// Segments some path of this mapping reads (for reporting what a message held that no
    /// rule could read).
    read_segments: HashSet<String>,
}

/// A compiled datatype map: its file and rules; `None` when it has errors.
type CompiledDatatype = Option<(&'static str, Arc<Vec<RulePlan>>)>;

/// A rule's or a variable's value source, as written (exactly one is given).
#[derive(Clone, Copy)]
struct ScalarSource<'r> {
    from: &'r Option<Spanned<String>>,
    first: &'r Option<Vec<Spanned<String>>>,
    join: &'r Option<Vec<Spanned<String>>>,
    sep: &'r Option<String>,
    value: &'r Option<Spanned<String>>,
}

impl<'r> ScalarSource<'r> {
    fn of_rule(r: &'r Rule) -> Self {
        ScalarSource {
            from: &r.from,
            first: &r.first,
            join: &r.join,
            sep: &r.sep,
            value: &r.value,
        }
    }

    fn of_var(v: &'r VarDef) -> Self {
        ScalarSource {
            from: &v.from,
            first: &v.first,
            join: &v.join,
            sep: &v.sep,
            value: &v.value,
        }
    }

    /// How many of `from`, `first`, `join` and `value` are given.
    fn given(&self) -> usize {
        usize::from(self.from.is_some())
            + usize::from(self.first.is_some())
            + usize::from(self.join.is_some())
            + usize::from(self.value.is_some())
    }

    /// The key of a list source given with nothing in it (`first: []`).
    fn empty_list(&self) -> Option<&'static str> {
        [("first", self.first), ("join", self.join)]
            .into_iter()
            .find(|(_, list)| list.as_ref().is_some_and(Vec::is_empty))
            .map(|(key, _)| key)
    }
}

pub(crate) struct Compiler<'a> {
    defs: &'a Defs,
    valuemaps: &'a [ValueMap],
    vm_index: &'a HashMap<String, usize>,
    site: Option<&'a SiteConfig>,
    diag: &'a mut Diag,
    /// Compiled datatype maps (`None`: it has errors).
    datatypes: HashMap<String, CompiledDatatype>,
    /// Datatype maps being compiled now, to catch a map that uses itself.
    compiling: HashSet<String>,
    keys: HashMap<String, u32>,
    msg: MsgCtx,
}

impl<'a> Compiler<'a> {
    pub fn new(
        defs: &'a Defs,
        valuemaps: &'a [ValueMap],
        vm_index: &'a HashMap<String, usize>,
        site: Option<&'a SiteConfig>,
        diag: &'a mut Diag,
    ) -> Self {
        Compiler {
            defs,
            valuemaps,
            vm_index,
            site,
            diag,
            datatypes: HashMap::new(),
            compiling: HashSet::new(),
            keys: HashMap::new(),
            msg: MsgCtx::default(),
        }
    }

    fn key(&mut self, k: String) -> u32 {
        let n = self.keys.len() as u32;
        *self.keys.entry(k).or_insert(n)
    }

    /// Compiles (once) the datatype map `name`: its FHIR type and rules.
    pub fn datatype(&mut self, name: &str) -> Option<(&'static str, Arc<Vec<RulePlan>>)> {
        if let Some(done) = self.datatypes.get(name) {
            return done.clone();
        }
        let defs = self.defs;
        let d: &DatatypeMap = defs.datatypes.get(name)?;
        if !self.compiling.insert(name.to_string()) {
            return None;
        }
        let m = model();
        let fhir_type = match m.get(&d.fhir_type.value) {
            Some(t) if t.kind != Kind::Primitive => Some(t.name),
            Some(_) => {
                self.diag.at(
                    &d.file,
                    &d.fhir_type,
                    format!(
                        "`{}` is a primitive; a datatype map builds a structure (HumanName, Identifier, Practitioner, ...): use `as:` for primitives",
                        d.fhir_type.value
                    ),
                );
                None
            }
            None => {
                let mut names = m.complex_names();
                names.extend(m.resource_names());
                let hint = suggest(&d.fhir_type.value, &names);
                self.diag.at(
                    &d.file,
                    &d.fhir_type,
                    format!(
                        "`{}` is not a FHIR R4 datatype or resource{hint}",
                        d.fhir_type.value
                    ),
                );
                None
            }
        };
        let empty = HashMap::new();
        let sc = Scope {
            base: fhir_type,
            in_rep: true,
            vars: &empty,
            datatype: true,
            depth: 1,
        };
        let rules = Arc::new(self.rules(&d.rules, &sc));
        let done = fhir_type.map(|t| (t, rules));
        self.compiling.remove(name);
        self.datatypes.insert(name.to_string(), done.clone());
        done
    }

    pub fn message(&mut self, name: &str, m: &MessageMap) -> Option<MessagePlan> {
        let file: &str = &m.file;
        self.msg = MsgCtx::default();
        let before = self.diag.errors.len();

        let mut matches = Vec::new();
        for pat in &m.matches {
            match parse_match(&pat.value) {
                Ok(p) => matches.push(p),
                Err(e) => self.diag.at(file, pat, e),
            }
        }
        if m.matches.is_empty() {
            self.diag.whole(
                file,
                format!("message mapping `{name}` has an empty `match` list"),
            );
        }
        let mut versions = Vec::new();
        for v in &m.versions {
            let body = v.value.strip_suffix('*').unwrap_or(&v.value);
            if body.is_empty() || !body.chars().all(|c| c.is_ascii_digit() || c == '.') {
                self.diag.at(
                    file,
                    v,
                    format!(
                        "`{}`: a version is like `2.4`, `2.5.1`, or `2.5*` for every 2.5.x",
                        v.value
                    ),
                );
            } else {
                versions.push(v.value.clone());
            }
        }

        self.groups(file, &m.groups);

        // Resource names first, so references may point forward.
        for r in &m.resources {
            if self.msg.resources.contains(&r.name.value) {
                self.diag.at(
                    &r.file,
                    &r.name,
                    format!("resource name `{}` is used twice", r.name.value),
                );
            }
            self.msg.resources.push(r.name.value.clone());
        }

        // Message variables and constants.
        let mut vars: HashMap<String, usize> = HashMap::new();
        for k in m.constants.keys().chain(m.vars.keys()) {
            if vars.contains_key(k) {
                self.diag.whole(
                    file,
                    format!("`{k}` is both a constant and a variable of `{name}`"),
                );
            }
            let n = vars.len();
            vars.insert(k.clone(), n);
        }
        let mut var_plans = Vec::new();
        for (k, v) in &m.constants {
            let Some(t) = self.template(file, v, &vars, false) else {
                continue;
            };
            var_plans.push(VarPlan {
                slot: vars[k],
                value: ValueSpec {
                    source: Scalar::Value(t),
                    functions: Vec::new(),
                    lookup: None,
                    default: None,
                    when: None,
                },
            });
        }
        for (k, v) in &m.vars {
            if let Some(spec) = self.var(file, k, v, &vars, false) {
                var_plans.push(VarPlan {
                    slot: vars[k],
                    value: spec,
                });
            }
        }
        let var_plans = self.order_vars(file, name, var_plans, &vars);
        let mut var_slots = vars.len();

        let mut resources = Vec::new();
        for r in &m.resources {
            if let Some(rp) = self.resource(r, &vars, &mut var_slots) {
                resources.push(rp);
            }
        }

        let index_of = |n: &str| self.msg.resources.iter().position(|r| r == n);
        let mut focus = Vec::new();
        let mut sender = None;
        let names = self.msg.resources.clone();
        for (fo, is_sender) in m
            .focus
            .iter()
            .map(|f| (f, false))
            .chain(m.sender.iter().map(|s| (s, true)))
        {
            match index_of(&fo.value) {
                Some(i) if is_sender => sender = Some(i),
                Some(i) => focus.push(i),
                None => {
                    let hint = suggest(&fo.value, &names);
                    self.diag.at(
                        file,
                        fo,
                        format!("`{}` is not a resource of this mapping{hint}", fo.value),
                    );
                }
            }
        }
        let groups = std::mem::take(&mut self.msg.groups);
        if self.diag.errors.len() != before {
            return None;
        }
        let origin = m
            .matches
            .first()
            .map(|s| origin(file, s))
            .unwrap_or_else(|| Arc::from(file));
        // MSH is read by the envelope whatever the mapping says.
        let mut read_segments: Vec<String> = std::mem::take(&mut self.msg.read_segments)
            .into_iter()
            .chain(std::iter::once("MSH".to_string()))
            .collect();
        read_segments.sort_unstable();
        read_segments.dedup();
        Some(MessagePlan {
            read_segments,
            name: name.to_string(),
            matches,
            versions,
            focus,
            sender,
            groups,
            vars: var_plans,
            resources,
            var_slots,
            origin,
        })
    }

    /// Explicit groups: names, segments, nesting; then what each instance extends over and owns.
    fn groups(&mut self, file: &str, defs: &std::collections::BTreeMap<String, GroupDef>) {
        for (name, g) in defs {
            let scope_key = self.key(format!("group:{name}"));
            let idx = self.msg.groups.len();
            self.msg.group_names.insert(name.clone(), idx);
            let seg = |s: &Spanned<String>, diag: &mut Diag| {
                if is_segment_name(&s.value) {
                    s.value.clone()
                } else {
                    diag.at(
                        file,
                        s,
                        format!(
                            "`{}` is not a segment name (3 capitals/digits such as `OBX`)",
                            s.value
                        ),
                    );
                    String::new()
                }
            };
            let begin = seg(&g.begin, self.diag);
            let lead = g.lead.iter().map(|s| seg(s, self.diag)).collect();
            let members = g.members.iter().map(|s| seg(s, self.diag)).collect();
            self.msg.groups.push(GroupPlan {
                name: name.clone(),
                parent: None,
                begin,
                lead,
                extend: members,
                owns: Vec::new(),
                children: Vec::new(),
                scope_key,
            });
        }
        for (name, g) in defs {
            let Some(p) = &g.parent else { continue };
            let idx = self.msg.group_names[name];
            match self.msg.group_names.get(&p.value).copied() {
                Some(pi) if pi != idx => {
                    self.msg.groups[idx].parent = Some(pi);
                    self.msg.groups[pi].children.push(idx);
                }
                Some(_) => self.diag.at(file, p, "a group cannot be inside itself"),
                None => {
                    let names: Vec<&String> = defs.keys().collect();
                    let hint = suggest(&p.value, &names);
                    self.diag
                        .at(file, p, format!("`in: {}` names no group{hint}", p.value));
                }
            }
        }
        // Nesting must be a tree: walk up from each group.
        for i in 0..self.msg.groups.len() {
            let mut seen = HashSet::new();
            let mut at = Some(i);
            while let Some(g) = at {
                if !seen.insert(g) {
                    self.diag.whole(
                        file,
                        format!(
                            "group `{}` is nested in itself (a cycle of `in:`)",
                            self.msg.groups[i].name
                        ),
                    );
                    for g in &mut self.msg.groups {
                        g.parent = None;
                        g.children.clear();
                    }
                    return;
                }
                at = self.msg.groups[g].parent;
            }
        }
        // owns = own segments + descendants'; extend = members + descendants' segments.
        fn owned(groups: &[GroupPlan], i: usize, out: &mut Vec<String>) {
            let g = &groups[i];
            out.push(g.begin.clone());
            out.extend(g.lead.iter().cloned());
            out.extend(g.extend.iter().cloned());
            for c in &g.children {
                owned(groups, *c, out);
            }
        }
        for i in 0..self.msg.groups.len() {
            let mut own = Vec::new();
            owned(&self.msg.groups, i, &mut own);
            own.sort();
            own.dedup();
            let g = &self.msg.groups[i];
            let extend: Vec<String> = own
                .iter()
                .filter(|s| **s != g.begin && !g.lead.contains(s))
                .cloned()
                .collect();
            let g = &mut self.msg.groups[i];
            g.owns = own;
            g.extend = extend;
        }
    }

    /// The group for a bare segment name (`for: NK1`): one instance per occurrence.
    fn segment_group(&mut self, seg: &str) -> usize {
        if let Some(i) = self.msg.group_names.get(seg) {
            return *i;
        }
        let scope_key = self.key(format!("segment:{seg}"));
        let idx = self.msg.groups.len();
        self.msg.groups.push(GroupPlan {
            name: seg.to_string(),
            parent: None,
            begin: seg.to_string(),
            lead: Vec::new(),
            extend: Vec::new(),
            owns: vec![seg.to_string()],
            children: Vec::new(),
            scope_key,
        });
        self.msg.group_names.insert(seg.to_string(), idx);
        idx
    }

    fn resource(
        &mut self,
        r: &ResourceMap,
        msg_vars: &HashMap<String, usize>,
        var_slots: &mut usize,
    ) -> Option<ResourcePlan> {
        let file: &str = &r.file;
        let m = model();
        let rtype = if m.is_resource(&r.resource_type.value) {
            m.get(&r.resource_type.value).map(|t| t.name)
        } else {
            let hint = suggest(&r.resource_type.value, &m.resource_names());
            self.diag.at(
                file,
                &r.resource_type,
                format!(
                    "`{}` is not a FHIR R4 resource type{hint}",
                    r.resource_type.value
                ),
            );
            None
        };
        let group = r.for_each.as_ref().and_then(|f| {
            if let Some(i) = self.msg.group_names.get(&f.value) {
                return Some(*i);
            }
            if is_segment_name(&f.value) {
                return Some(self.segment_group(&f.value));
            }
            let mut names: Vec<String> = self.msg.group_names.keys().cloned().collect();
            names.sort();
            let hint = suggest(&f.value, &names);
            self.diag.at(
                file,
                f,
                format!(
                    "`for: {}` on a resource must name a segment (such as `NK1`) or a group of this mapping{hint}",
                    f.value
                ),
            );
            None
        });
        let each = r.each.as_ref().and_then(|e| {
            let p = self.hl7_path(file, e, false)?;
            if !matches!(p, Hl7Path::Absolute { field: Some(_), .. }) {
                self.diag.at(
                    file,
                    e,
                    format!("`each: {}` needs a field, such as `PV1-7[*]`", e.value),
                );
                return None;
            }
            let key = self.key(format!("path:{p}"));
            Some((p, key))
        });
        let in_rep = each.is_some();

        // Resource variables take slots after the message's.
        let mut vars = msg_vars.clone();
        let first = *var_slots;
        for (i, k) in r.vars.keys().enumerate() {
            vars.insert(k.clone(), first + i);
        }
        *var_slots = (*var_slots).max(first + r.vars.len());
        let mut var_plans = Vec::new();
        for (k, v) in &r.vars {
            if let Some(spec) = self.var(file, k, v, &vars, in_rep) {
                var_plans.push(VarPlan {
                    slot: vars[k],
                    value: spec,
                });
            }
        }
        let var_plans = self.order_vars(file, &r.name.value, var_plans, &vars);

        let sc = Scope {
            base: rtype,
            in_rep,
            vars: &vars,
            datatype: false,
            depth: 0,
        };
        let when = r.when.as_ref().and_then(|w| self.when(file, w, &sc));
        let key = r
            .key
            .iter()
            .filter_map(|k| self.operand(file, k, &sc))
            .collect();
        let body = match &r.map {
            None => None,
            Some(mname) => {
                if each.is_none() {
                    self.diag.at(
                        file,
                        mname,
                        format!(
                            "`map: {}` on a resource reads one field repetition: add `each:`, e.g. `each: PV1-7[*]`",
                            mname.value
                        ),
                    );
                }
                match self.datatype_by_name(file, mname) {
                    Some((t, rules)) => {
                        if rtype.is_some_and(|rt| rt != t) {
                            self.diag.at(
                                file,
                                mname,
                                format!(
                                    "datatype map `{}` builds a {t}, not a {}",
                                    mname.value, r.resource_type.value
                                ),
                            );
                        }
                        Some(rules)
                    }
                    None => None,
                }
            }
        };
        if r.rules.is_empty() && r.map.is_none() {
            self.diag.at(
                file,
                &r.name,
                format!("resource `{}` has no `rules` (and no `map`)", r.name.value),
            );
        }
        let rules = self.rules(&r.rules, &sc);
        let width = 3
            + crate::map::plan::width(&rules)
            + body.as_deref().map_or(0, |b| crate::map::plan::width(b));
        Some(ResourcePlan {
            width,
            name: r.name.value.clone(),
            resource_type: rtype?.to_string(),
            profile: r.profile.clone(),
            group,
            each,
            when,
            vars: var_plans,
            key,
            body,
            rules,
            origin: origin(file, &r.name),
        })
    }

    /// Sorts variables so each comes after those it uses; a cycle is an error.
    fn order_vars(
        &mut self,
        file: &str,
        owner: &str,
        plans: Vec<VarPlan>,
        names: &HashMap<String, usize>,
    ) -> Vec<VarPlan> {
        let mut pending: Vec<(VarPlan, Vec<usize>)> = plans
            .into_iter()
            .map(|p| {
                let mut deps = Vec::new();
                spec_vars(&p.value, &mut deps);
                (p, deps)
            })
            .collect();
        let mine: HashSet<usize> = pending.iter().map(|(p, _)| p.slot).collect();
        let mut done: HashSet<usize> = HashSet::new();
        let mut out = Vec::new();
        while !pending.is_empty() {
            let ready = pending
                .iter()
                .position(|(_, deps)| deps.iter().all(|d| done.contains(d) || !mine.contains(d)));
            match ready {
                Some(i) => {
                    let (p, _) = pending.remove(i);
                    done.insert(p.slot);
                    out.push(p);
                }
                None => {
                    let stuck: Vec<&str> = pending
                        .iter()
                        .filter_map(|(p, _)| {
                            names
                                .iter()
                                .find(|(_, s)| **s == p.slot)
                                .map(|(n, _)| n.as_str())
                        })
                        .collect();
                    self.diag.whole(
                        file,
                        format!(
                            "variables of `{owner}` use each other in a cycle: {}",
                            stuck.join(", ")
                        ),
                    );
                    break;
                }
            }
        }
        out
    }

    fn var(
        &mut self,
        file: &str,
        name: &str,
        v: &VarDef,
        vars: &HashMap<String, usize>,
        in_rep: bool,
    ) -> Option<ValueSpec> {
        let sc = Scope {
            base: None,
            in_rep,
            vars,
            datatype: false,
            depth: 0,
        };
        let source = ScalarSource::of_var(v);
        if source.given() != 1 {
            self.diag.whole(
                file,
                format!(
                    "variable `{name}` needs exactly one of `from`, `first`, `join` or `value`"
                ),
            );
            return None;
        }
        if let Some(key) = source.empty_list() {
            self.diag.whole(
                file,
                format!("variable `{name}`: `{key}:` needs at least one HL7 path or `$var`"),
            );
        }
        let source = self.scalar(file, source, &sc)?;
        let functions = self.functions(file, &v.functions);
        let lookup = v.lookup.as_ref().and_then(|l| {
            self.valuemap(file, l).map(|map| Lookup {
                map,
                shape: Shape::Code,
            })
        });
        let default = v
            .default
            .as_ref()
            .and_then(|d| self.template(file, d, vars, in_rep));
        let when = v.when.as_ref().and_then(|w| self.when(file, w, &sc));
        Some(ValueSpec {
            source,
            functions,
            lookup,
            default,
            when,
        })
    }

    fn datatype_by_name(
        &mut self,
        file: &str,
        m: &Spanned<String>,
    ) -> Option<(&'static str, Arc<Vec<RulePlan>>)> {
        if !self.defs.datatypes.contains_key(&m.value) {
            let names: Vec<&String> = self.defs.datatypes.keys().collect();
            let hint = suggest(&m.value, &names);
            self.diag
                .at(file, m, format!("unknown datatype map `{}`{hint}", m.value));
            return None;
        }
        if self.compiling.contains(&m.value) {
            self.diag
                .at(file, m, format!("datatype map `{}` uses itself", m.value));
            return None;
        }
        self.datatype(&m.value)
    }

    fn rules(&mut self, rules: &[Rule], sc: &Scope<'_>) -> Vec<RulePlan> {
        rules.iter().filter_map(|r| self.rule(r, sc)).collect()
    }

    fn rule(&mut self, r: &Rule, sc: &Scope<'_>) -> Option<RulePlan> {
        let file: &str = &r.file;
        let origin = origin(file, &r.set);
        let mut target = match TargetPath::parse(&r.set.value) {
            Ok(t) => Some(t),
            Err(e) => {
                self.diag
                    .at(file, &r.set, format!("invalid target path {e}"));
                None
            }
        };
        let info: Option<TargetInfo> = match (&mut target, sc.base) {
            (Some(t), Some(base)) => match resolve(base, t) {
                Ok(i) => Some(i),
                Err(e) => {
                    self.diag.at(file, &r.set, e);
                    None
                }
            },
            _ => None,
        };
        let for_each = r.for_each.as_ref().and_then(|f| self.iter(file, f, sc));
        let inner = Scope {
            in_rep: sc.in_rep || matches!(for_each, Some(Iter::Reps(..))),
            ..*sc
        };
        let when = r.when.as_ref().and_then(|w| self.when(file, w, &inner));

        let written = ScalarSource::of_rule(r);
        let given = written.given()
            + usize::from(r.reference.is_some())
            + usize::from(r.object.is_some())
            + usize::from(r.map.is_some());
        if given != 1 {
            self.diag.at(
                file,
                &r.set,
                format!(
                    "`set: {}` needs exactly one source: `from`, `first`, `join`, `value`, `ref`, `object` or `map` (found {given})",
                    r.set.value
                ),
            );
            return None;
        }
        let structural = r.reference.is_some() || r.object.is_some() || r.map.is_some();
        if structural {
            for (what, present) in [
                ("fn", !r.functions.is_empty()),
                ("lookup", r.lookup.is_some()),
                ("as", r.convert.is_some()),
                ("default", r.default.is_some()),
            ] {
                if present {
                    self.diag.at(
                        file,
                        &r.set,
                        format!("`{what}:` applies to values (`from`, `first`, `join`, `value`), not to `ref`, `object` or `map`"),
                    );
                }
            }
        }

        let (source, convert) = if let Some(t) = &r.reference {
            if sc.datatype {
                self.diag.at(
                    file,
                    t,
                    "references are not available in datatype maps (they do not know the message's resources)",
                );
                return None;
            }
            if let Some(i) = info
                && i.type_name != "Reference"
            {
                self.diag.at(
                    file,
                    &r.set,
                    format!(
                        "`{}` is of type {}, not a Reference",
                        r.set.value, i.type_name
                    ),
                );
            }
            let Some(resource) = self.msg.resources.iter().position(|n| *n == t.value) else {
                let hint = suggest(&t.value, &self.msg.resources);
                self.diag.at(
                    file,
                    t,
                    format!("`ref: {}` names no resource of this mapping{hint}", t.value),
                );
                return None;
            };
            let all = target
                .as_ref()
                .and_then(|t| t.0.last())
                .is_some_and(|s| s.index == Index::Append);
            (Source::Ref { resource, all }, Convert::None)
        } else if let Some(children) = &r.object {
            if sc.depth > MAX_NESTING {
                self.diag.at(file, &r.set, "objects nest too deeply");
                return None;
            }
            let child_base = match info {
                Some(i) if i.primitive => {
                    self.diag.at(
                        file,
                        &r.set,
                        format!(
                            "`{}` is of type {} (a single value): give it a value with `from`/`value`, not `object`",
                            r.set.value, i.type_name
                        ),
                    );
                    None
                }
                Some(i) => Some(i.type_name),
                None => None,
            };
            let csc = Scope {
                base: child_base,
                depth: sc.depth + 1,
                ..inner
            };
            let rules = self.rules(children, &csc);
            (
                Source::Object {
                    width: crate::map::plan::width(&rules),
                    needs: crate::map::plan::rep_components(&rules),
                    rules: Arc::new(rules),
                },
                Convert::None,
            )
        } else if let Some(m) = &r.map {
            if !inner.in_rep {
                self.diag.at(
                    file,
                    m,
                    format!(
                        "`map: {}` applies to field repetitions: add `for:` with the field, e.g. `for: PID-5[*]`",
                        m.value
                    ),
                );
                return None;
            }
            if sc.depth > MAX_NESTING {
                self.diag.at(file, m, "datatype maps nest too deeply");
                return None;
            }
            let (t, rules) = self.datatype_by_name(file, m)?;
            if let Some(i) = info
                && i.type_name != t
            {
                self.diag.at(
                    file,
                    m,
                    format!(
                        "datatype map `{}` builds a {t}, but `{}` is of type {}",
                        m.value, r.set.value, i.type_name
                    ),
                );
            }
            (
                Source::Object {
                    width: crate::map::plan::width(&rules),
                    needs: crate::map::plan::rep_components(&rules),
                    rules,
                },
                Convert::None,
            )
        } else {
            if let Some(key) = written.empty_list() {
                self.diag.at(
                    file,
                    &r.set,
                    format!("`{key}:` needs at least one HL7 path or `$var`"),
                );
            }
            let source = self.scalar(file, written, &inner);
            let functions = self.functions(file, &r.functions);
            let default = r
                .default
                .as_ref()
                .and_then(|d| self.template(file, d, inner.vars, inner.in_rep));
            let mut lookup = None;
            if let Some(l) = &r.lookup
                && let Some(map) = self.valuemap(file, l)
            {
                let shape = match info {
                    Some(i) if i.type_name == "Coding" => Shape::Coding,
                    Some(i) if i.type_name == "CodeableConcept" => Shape::CodeableConcept,
                    Some(i) if i.primitive => Shape::Code,
                    Some(i) => {
                        self.diag.at(
                            file,
                            l,
                            format!(
                                "a value map gives a code, a Coding or a CodeableConcept; `{}` is of type {}",
                                r.set.value, i.type_name
                            ),
                        );
                        Shape::Code
                    }
                    None => Shape::Code,
                };
                if shape == Shape::Code
                    && let Some(i) = info
                    && !i.codes.is_empty()
                {
                    self.check_valuemap_codes(file, l, map, i.codes, &r.set.value);
                }
                lookup = Some(Lookup { map, shape });
            }
            let convert = self.convert(file, r, info, lookup)?;
            let source = source?;
            if let (Some(i), Scalar::Value(t)) = (info, &source)
                && !i.codes.is_empty()
                && lookup.is_none()
                && r.functions.is_empty()
                && let Some(lit) = t.literal()
                && !i.codes.contains(&lit.as_str())
                && let Some(v) = &r.value
            {
                let hint = suggest(&lit, i.codes);
                self.diag.at(
                    file,
                    v,
                    format!(
                        "`{lit}` is not a code of `{}` (allowed: {}){hint}",
                        r.set.value,
                        i.codes.join(", ")
                    ),
                );
            }
            (
                Source::Scalar(ValueSpec {
                    source,
                    functions,
                    lookup,
                    default,
                    when: None,
                }),
                convert,
            )
        };
        if r.always && r.object.is_none() {
            self.diag.at(
                file,
                &r.set,
                "`always: true` applies to `object:` rules (values from `value:` are always set)",
            );
        }
        Some(RulePlan {
            target: target?,
            source,
            for_each,
            when,
            convert,
            always: r.always,
            origin,
        })
    }

    /// The conversion of a scalar rule: `as:` if given (checked against the target type), else
    /// the one the target's primitive type needs.
    fn convert(
        &mut self,
        file: &str,
        r: &Rule,
        info: Option<TargetInfo>,
        lookup: Option<Lookup>,
    ) -> Option<Convert> {
        if lookup.is_some_and(|l| l.shape != Shape::Code) {
            if let Some(c) = &r.convert {
                self.diag.at(
                    file,
                    c,
                    "`as:` does not apply when a value map builds a Coding or CodeableConcept",
                );
            }
            return Some(Convert::None);
        }
        if let Some(i) = info
            && !i.primitive
        {
            self.diag.at(
                file,
                &r.set,
                format!(
                    "`{}` is of type {} (a structure): set one of its elements (e.g. `{}.…`), or build it with `object:` or `map:`",
                    r.set.value, i.type_name, r.set.value
                ),
            );
            return None;
        }
        let explicit = match &r.convert {
            None => None,
            Some(c) => {
                let k = match c.value.as_str() {
                    "string" => Convert::String,
                    "date" => Convert::Date,
                    "dateTime" => Convert::DateTime,
                    "instant" => Convert::Instant,
                    "time" => Convert::Time,
                    "boolean" => Convert::Boolean,
                    "integer" => Convert::Integer,
                    "decimal" => Convert::Decimal,
                    "nhs-number" => Convert::NhsNumber,
                    other => {
                        const KINDS: &[&str] = &[
                            "string",
                            "date",
                            "dateTime",
                            "instant",
                            "time",
                            "boolean",
                            "integer",
                            "decimal",
                            "nhs-number",
                        ];
                        let hint = suggest(other, KINDS);
                        self.diag
                            .at(file, c, format!("unknown conversion `as: {other}`{hint}"));
                        return None;
                    }
                };
                if let Some(i) = info
                    && !convert_fits(k, i.type_name)
                {
                    self.diag.at(
                        file,
                        c,
                        format!(
                            "`as: {}` does not fit `{}`, a {} (leave `as:` out to convert to what the element needs)",
                            c.value, r.set.value, i.type_name
                        ),
                    );
                }
                Some(k)
            }
        };
        Some(
            explicit
                .or_else(|| info.map(|i| inferred_convert(i.type_name)))
                .unwrap_or(Convert::String),
        )
    }

    fn check_valuemap_codes(
        &mut self,
        file: &str,
        at: &Spanned<String>,
        map: usize,
        codes: &[&str],
        target: &str,
    ) {
        let Some(vm) = self.valuemaps.get(map) else {
            return;
        };
        let mut bad: Vec<&str> = vm
            .entries
            .values()
            .map(String::as_str)
            .chain(vm.default.as_deref())
            .filter(|v| !codes.contains(v))
            .collect();
        bad.sort_unstable();
        bad.dedup();
        if !bad.is_empty() {
            self.diag.at(
                file,
                at,
                format!(
                    "value map `{}` gives codes that `{target}` does not allow: {} (allowed: {})",
                    vm.name,
                    bad.join(", "),
                    codes.join(", ")
                ),
            );
        }
    }

    fn valuemap(&mut self, file: &str, l: &Spanned<String>) -> Option<usize> {
        match self.vm_index.get(&l.value) {
            Some(i) => Some(*i),
            None => {
                let names: Vec<&String> = self.vm_index.keys().collect();
                let hint = suggest(&l.value, &names);
                self.diag
                    .at(file, l, format!("unknown value map `{}`{hint}", l.value));
                None
            }
        }
    }

    fn scalar(&mut self, file: &str, s: ScalarSource<'_>, sc: &Scope<'_>) -> Option<Scalar> {
        if let Some(f) = s.from {
            return Some(match self.operand(file, f, sc)? {
                Operand::Path(p) => Scalar::Path(p),
                Operand::Var(v) => Scalar::Var(v),
            });
        }
        if let Some(parts) = s.first {
            return self.operands(file, parts, sc).map(Scalar::First);
        }
        if let Some(parts) = s.join {
            let ops = self.operands(file, parts, sc)?;
            return Some(Scalar::Join(
                ops,
                s.sep.clone().unwrap_or_else(|| " ".to_string()),
            ));
        }
        let v = s.value.as_ref()?;
        self.template(file, v, sc.vars, sc.in_rep)
            .map(Scalar::Value)
    }

    /// The operands of `first:` or `join:`; every one is checked (and reported) before `None`.
    fn operands(
        &mut self,
        file: &str,
        parts: &[Spanned<String>],
        sc: &Scope<'_>,
    ) -> Option<Vec<Operand>> {
        if parts.is_empty() {
            return None;
        }
        let ops: Vec<Operand> = parts
            .iter()
            .filter_map(|p| self.operand(file, p, sc))
            .collect();
        (ops.len() == parts.len()).then_some(ops)
    }

    /// `$name` (a variable) or an HL7 path.
    fn operand(&mut self, file: &str, s: &Spanned<String>, sc: &Scope<'_>) -> Option<Operand> {
        if s.value.trim().starts_with("${") {
            self.diag.at(
                file,
                s,
                format!(
                    "`{}` is a template: `from`, `first`, `join`, `key` and `when` take HL7 paths or `$name` variables; templates belong in `value:`",
                    s.value
                ),
            );
            return None;
        }
        if let Some(name) = s.value.trim().strip_prefix('$') {
            return match sc.vars.get(name) {
                Some(slot) => Some(Operand::Var(*slot)),
                None => {
                    let names: Vec<&String> = sc.vars.keys().collect();
                    let hint = suggest(name, &names);
                    let why = if sc.datatype {
                        " (datatype maps see no variables)"
                    } else {
                        ""
                    };
                    self.diag
                        .at(file, s, format!("unknown variable `${name}`{why}{hint}"));
                    None
                }
            };
        }
        self.hl7_path(file, s, sc.in_rep).map(Operand::Path)
    }

    fn hl7_path(&mut self, file: &str, s: &Spanned<String>, in_rep: bool) -> Option<Hl7Path> {
        match Hl7Path::parse(&s.value) {
            Ok(Hl7Path::Relative { .. }) if !in_rep => {
                self.diag.at(
                    file,
                    s,
                    format!(
                        "`{}` is relative (starts with `.`) but this rule is not inside a datatype map, an `each` or a `for` over a field",
                        s.value
                    ),
                );
                None
            }
            Ok(p) => {
                if let Hl7Path::Absolute { segment, .. } = &p {
                    self.msg.read_segments.insert(segment.clone());
                }
                if let Hl7Path::Absolute {
                    segment,
                    field: Some(f),
                    ..
                } = &p
                    && let Some(max) = segments::max_field(segment)
                    && *f > max
                {
                    self.diag.at(
                        file,
                        s,
                        format!(
                            "unknown segment field `{segment}-{f}`: {segment} has fields 1 to {max}"
                        ),
                    );
                    return None;
                }
                Some(p)
            }
            Err(e) => {
                self.diag.at(file, s, format!("invalid HL7 path {e}"));
                None
            }
        }
    }

    fn iter(&mut self, file: &str, f: &Spanned<String>, sc: &Scope<'_>) -> Option<Iter> {
        if !sc.datatype
            && let Some(g) = self.msg.group_names.get(&f.value)
        {
            return Some(Iter::Group(*g));
        }
        if is_segment_name(&f.value) {
            if sc.datatype {
                self.diag.at(
                    file,
                    f,
                    "a datatype map cannot iterate over segments: use `for:` with a field (`.4[*]` is not allowed either; a repetition has no repetitions)",
                );
                return None;
            }
            return Some(Iter::Group(self.segment_group(&f.value)));
        }
        let p = self.hl7_path(file, f, sc.in_rep)?;
        match &p {
            Hl7Path::Absolute { field: Some(_), .. } => {
                let key = self.key(format!("path:{p}"));
                Some(Iter::Reps(p, key))
            }
            Hl7Path::Relative { .. } => {
                let key = self.key(format!("path:{p}"));
                Some(Iter::Reps(p, key))
            }
            Hl7Path::Absolute { .. } => {
                self.diag.at(
                    file,
                    f,
                    format!(
                        "`for: {}`: expected a field (`PID-3[*]`), a segment or a group",
                        f.value
                    ),
                );
                None
            }
        }
    }

    fn when(&mut self, file: &str, w: &When, sc: &Scope<'_>) -> Option<Cond> {
        let mut conds = Vec::new();
        if let Some(path_s) = &w.path {
            let subject = self.operand(file, path_s, sc);
            let mut tests = Vec::new();
            if let Some(e) = w.exists {
                tests.push(Test::Exists(e));
            }
            if let Some(v) = &w.equals {
                tests.push(Test::Equals(v.clone()));
            }
            if let Some(v) = &w.one_of {
                tests.push(Test::In(v.clone()));
            }
            if let Some(v) = &w.not_in {
                tests.push(Test::NotIn(v.clone()));
            }
            if let Some(v) = &w.starts_with {
                tests.push(Test::StartsWith(v.clone()));
            }
            if let Some(v) = &w.nhs_number {
                match v.value.as_str() {
                    "valid" => tests.push(Test::NhsNumber { valid: true }),
                    "invalid" => tests.push(Test::NhsNumber { valid: false }),
                    other => self.diag.at(
                        file,
                        v,
                        format!("`nhs_number: {other}`: expected `valid` or `invalid`"),
                    ),
                }
            }
            if let Some(m) = &w.in_map
                && let Some(i) = self.valuemap(file, m)
            {
                tests.push(Test::InMap(i));
            }
            if tests.is_empty() {
                self.diag.at(
                    file,
                    path_s,
                    "this `when` tests nothing: add `exists`, `equals`, `in`, `not_in`, `starts_with`, `in_map` or `nhs_number`",
                );
            }
            if let Some(subject) = subject {
                for test in tests {
                    conds.push(Cond::Test {
                        subject: subject.clone(),
                        test,
                    });
                }
            }
        } else if w.exists.is_some()
            || w.equals.is_some()
            || w.one_of.is_some()
            || w.not_in.is_some()
            || w.starts_with.is_some()
            || w.nhs_number.is_some()
            || w.in_map.is_some()
        {
            self.diag.whole(
                file,
                "a `when` with `exists`/`equals`/`in`/... needs a `path` to test",
            );
        }
        if let Some(list) = &w.all {
            conds.extend(list.iter().filter_map(|c| self.when(file, c, sc)));
        }
        if let Some(list) = &w.any {
            conds.push(Cond::Any(
                list.iter().filter_map(|c| self.when(file, c, sc)).collect(),
            ));
        }
        if let Some(n) = &w.not
            && let Some(c) = self.when(file, n, sc)
        {
            conds.push(Cond::Not(Box::new(c)));
        }
        match conds.len() {
            0 => {
                if w.path.is_none() && w.any.is_none() && w.all.is_none() && w.not.is_none() {
                    self.diag.whole(file, "an empty `when`");
                }
                None
            }
            1 => conds.pop(),
            _ => Some(Cond::All(conds)),
        }
    }

    fn functions(&mut self, file: &str, fns: &[Spanned<String>]) -> Vec<Func> {
        fns.iter()
            .filter_map(|f| match parse_function(&f.value) {
                Ok(Func::Lookup(_)) => {
                    let name = f
                        .value
                        .trim()
                        .strip_prefix("lookup(")
                        .and_then(|r| r.strip_suffix(')'))
                        .map(|n| n.trim().trim_matches(['\'', '"']).to_string())
                        .unwrap_or_default();
                    let at = Spanned {
                        value: name,
                        referenced: f.referenced,
                        defined: f.defined,
                    };
                    self.valuemap(file, &at).map(Func::Lookup)
                }
                Ok(func) => Some(func),
                Err(e) => {
                    self.diag.at(file, f, e);
                    None
                }
            })
            .collect()
    }

    fn template(
        &mut self,
        file: &str,
        v: &Spanned<String>,
        vars: &HashMap<String, usize>,
        in_rep: bool,
    ) -> Option<Template> {
        let site = self.site;
        let read_segments = &mut self.msg.read_segments;
        let res = parse_template(&v.value, |name| {
            if let Some(var) = Var::parse(name) {
                check_site_var(&var, site)?;
                return Ok(TplPart::Var(var));
            }
            if let Some(slot) = vars.get(name) {
                return Ok(TplPart::User(*slot));
            }
            if name.contains('-') || name.starts_with('.') {
                let p = Hl7Path::parse(name).map_err(|e| format!("invalid HL7 path {e}"))?;
                if matches!(p, Hl7Path::Relative { .. }) && !in_rep {
                    return Err(format!(
                        "`${{{name}}}` is relative but this rule is not inside a repetition"
                    ));
                }
                if let Hl7Path::Absolute { segment, .. } = &p {
                    read_segments.insert(segment.clone());
                }
                return Ok(TplPart::Path(p));
            }
            let mut names: Vec<&str> = vars.keys().map(String::as_str).collect();
            names.extend(BUILTINS);
            let hint = suggest(name, &names);
            Err(format!(
                "unknown variable `${{{name}}}`{hint} (built in: {}, site.NAME, system.KIND; or a variable, constant or HL7 path)",
                BUILTINS.join(", ")
            ))
        });
        match res {
            Ok(t) => Some(t),
            Err(e) => {
                self.diag.at(file, v, e);
                None
            }
        }
    }
}

const BUILTINS: &[&str] = &[
    "site.ods_code",
    "site.appliance_id",
    "site.identifier_base",
    "feed",
    "message.code",
    "message.trigger",
    "message.structure",
    "message.version",
    "message.control_id",
];

fn check_site_var(var: &Var, site: Option<&SiteConfig>) -> Result<(), String> {
    if let (Var::Site(name), Some(site)) = (var, site)
        && site.variable(name).is_none()
    {
        let names = site.variable_names();
        let hint = suggest(name, &names);
        return Err(format!(
            "`${{site.{name}}}` is not set in the configuration (`[site.variables]`){hint}"
        ));
    }
    Ok(())
}

/// A template with only built-in variables (value map systems).
pub(crate) fn template_static(
    file: &str,
    v: &Spanned<String>,
    diag: &mut Diag,
) -> Option<Template> {
    match parse_template(&v.value, |name| {
        Var::parse(name)
            .map(TplPart::Var)
            .ok_or_else(|| format!("unknown variable `${{{name}}}`: use site.NAME or system.KIND"))
    }) {
        Ok(t) => Some(t),
        Err(e) => {
            diag.at(file, v, e);
            None
        }
    }
}

fn parse_template(
    text: &str,
    mut var: impl FnMut(&str) -> Result<TplPart, String>,
) -> Result<Template, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            parts.push(TplPart::Lit(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{text}`: `${{` without a closing `}}`"))?;
        parts.push(var(after[..end].trim())?);
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        parts.push(TplPart::Lit(rest.to_string()));
    }
    Ok(Template(parts))
}

fn is_segment_name(s: &str) -> bool {
    s.len() == 3
        && s.chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_uppercase() || (i > 0 && c.is_ascii_digit()))
}

/// Variable slots a value uses.
fn spec_vars(v: &ValueSpec, out: &mut Vec<usize>) {
    match &v.source {
        Scalar::Var(s) => out.push(*s),
        Scalar::First(ops) | Scalar::Join(ops, _) => ops.iter().for_each(|o| {
            if let Operand::Var(s) = o {
                out.push(*s)
            }
        }),
        Scalar::Value(t) => tpl_vars(t, out),
        Scalar::Path(_) => {}
    }
    if let Some(d) = &v.default {
        tpl_vars(d, out);
    }
    if let Some(c) = &v.when {
        cond_vars(c, out);
    }
}

fn tpl_vars(t: &Template, out: &mut Vec<usize>) {
    for p in &t.0 {
        if let TplPart::User(s) = p {
            out.push(*s);
        }
    }
}

fn cond_vars(c: &Cond, out: &mut Vec<usize>) {
    match c {
        Cond::Test {
            subject: Operand::Var(s),
            ..
        } => out.push(*s),
        Cond::Test { .. } => {}
        Cond::All(cs) | Cond::Any(cs) => cs.iter().for_each(|c| cond_vars(c, out)),
        Cond::Not(c) => cond_vars(c, out),
    }
}

/// `name` or `name(arg, 'arg', "arg")`.
pub fn parse_function(s: &str) -> Result<Func, String> {
    let s = s.trim();
    let (name, args) = match s.find('(') {
        None => (s, Vec::new()),
        Some(i) => {
            let inner = s[i + 1..]
                .strip_suffix(')')
                .ok_or_else(|| format!("`{s}`: `(` without a closing `)`"))?;
            (
                &s[..i],
                split_args(inner).map_err(|e| format!("`{s}`: {e}"))?,
            )
        }
    };
    let want = |n: usize| -> Result<(), String> {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!(
                "`{name}` takes {n} argument(s), e.g. {}",
                match name {
                    "split" => "`split(' ', 1)`",
                    "prefix" => "`prefix('GB-')`",
                    "suffix" => "`suffix(' (local)')`",
                    "replace" => "`replace('-', '')`",
                    "lookup" => "`lookup(identifier-kind)`",
                    _ => "`trim`",
                }
            ))
        }
    };
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    Ok(match name {
        "trim" => {
            want(0)?;
            Func::Trim
        }
        "upper" => {
            want(0)?;
            Func::Upper
        }
        "lower" => {
            want(0)?;
            Func::Lower
        }
        "hash" => {
            want(0)?;
            Func::Hash
        }
        "nhs-number" => {
            want(0)?;
            Func::NhsNumber
        }
        "system" => {
            want(0)?;
            Func::System
        }
        "lookup" => {
            want(1)?;
            // Resolved to the value map's index by the compiler.
            Func::Lookup(usize::MAX)
        }
        "split" => {
            want(2)?;
            let n: i64 = arg(1).parse().ok().filter(|n| *n != 0).ok_or_else(|| {
                format!("`{s}`: the part number counts from 1 (or from -1 at the end)")
            })?;
            if arg(0).is_empty() {
                return Err(format!("`{s}`: the separator is empty"));
            }
            Func::Split(arg(0), n)
        }
        "prefix" => {
            want(1)?;
            Func::Prefix(arg(0))
        }
        "suffix" => {
            want(1)?;
            Func::Suffix(arg(0))
        }
        "replace" => {
            want(2)?;
            if arg(0).is_empty() {
                return Err(format!("`{s}`: the text to replace is empty"));
            }
            Func::Replace(arg(0), arg(1))
        }
        other => {
            const NAMES: &[&str] = &[
                "trim",
                "upper",
                "lower",
                "split",
                "prefix",
                "suffix",
                "replace",
                "hash",
                "nhs-number",
                "system",
                "lookup",
            ];
            let hint = suggest(other, NAMES);
            return Err(format!(
                "unknown function `{other}`{hint} (available: {})",
                NAMES.join(", ")
            ));
        }
    })
}

fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        let mut arg = String::new();
        if c == '\'' || c == '"' {
            chars.next();
            let mut closed = false;
            for ch in chars.by_ref() {
                if ch == c {
                    closed = true;
                    break;
                }
                arg.push(ch);
            }
            if !closed {
                return Err("a quoted argument is not closed".into());
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch == ',' {
                    break;
                }
                arg.push(ch);
                chars.next();
            }
            arg = arg.trim().to_string();
        }
        out.push(arg);
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(other) => return Err(format!("unexpected `{other}` after an argument")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_parse_with_arguments() {
        assert_eq!(parse_function("trim").unwrap(), Func::Trim);
        assert_eq!(
            parse_function("split(' ', -1)").unwrap(),
            Func::Split(" ".into(), -1)
        );
        assert_eq!(
            parse_function("replace(\"-\", '')").unwrap(),
            Func::Replace("-".into(), String::new())
        );
        assert_eq!(
            parse_function("prefix(urn:oid:)").unwrap(),
            Func::Prefix("urn:oid:".into())
        );
        let e = parse_function("trimm").unwrap_err();
        assert!(e.contains("did you mean `trim`"), "{e}");
        assert!(parse_function("split(',')").is_err());
        assert!(parse_function("split(',', 0)").is_err());
        assert!(parse_function("prefix('x)").is_err());
        assert!(parse_function("upper(1)").is_err());
    }
}
