//! Runs a compiled [`MessagePlan`] over one parsed message, producing the Bundle's resources.
//!
//! Rules of evaluation (documented for authors in `mappings/README.md`):
//! - A path without a component yields component 1 (subcomponent 1) of the first selected
//!   repetition; `for:`/`each:` iterate whole repetitions, and `.c` paths read inside them.
//! - HL7's explicit null `""` and empty values are "absent".
//! - An element (`object:`/`map:`) or a resource is emitted only if at least one value *from the
//!   message* (a path, a variable read from the message, or a `ref:`) landed in it: constants
//!   alone never make an element, so a missing PID-32 never leaves a half-built extension.
//! - References are resolved after every resource is built, by scope: a reference picks the
//!   instances of the named resource that agree with it on every group instance and repetition
//!   they share (the DiagnosticReport of an order gets that order's Observations).
//! - Ids are deterministic: UUIDv5 of (site ODS code, resource type, declared `key:` values), else
//!   of the first identifier's system and value, else of the message's sender and control id, the
//!   resource's local name and its occurrence. A re-sent message yields the same ids. A `key:`
//!   that repeats within one message is numbered by occurrence (the first keeps the plain key);
//!   instances that end with the same id are one resource (the first is kept).

mod convert;
mod eval;
mod scope;
mod set;

use std::collections::HashSet;
use std::sync::Arc;

use crate::fhir::tree::{Json, Obj};

use super::plan::*;
use crate::config::SiteConfig;
use crate::fhir::{ids, tree};
use crate::hl7::{Message, segment_code};
use scope::{Cursor, RepFrame, ScopeIds, compatible};

/// Per-message inputs besides the message itself.
pub struct RunContext<'a> {
    pub site: &'a SiteConfig,
    pub tz: &'a jiff::tz::TimeZone,
    pub feed: &'a str,
    /// The feed's `[variables]`: they override site variables of the same name.
    pub feed_variables: Option<&'a std::collections::BTreeMap<String, String>>,
    /// How local times in a clock change are resolved (the feed's, else the site's policy).
    pub clock_change: crate::fhir::time::AmbiguityPolicy,
    pub encoding: &'static encoding_rs::Encoding,
}

/// One built resource.
#[derive(Debug, Clone)]
pub struct BuiltResource {
    pub name: String,
    pub resource_type: String,
    pub id: uuid::Uuid,
    pub json: crate::fhir::tree::Obj,
}

/// What a mapping produced: resources in mapping order, plus warnings (no patient data).
#[derive(Debug, Default)]
pub struct MapResult {
    pub resources: Vec<BuiltResource>,
    pub focus: Vec<usize>,
    pub sender: Option<usize>,
    pub warnings: Vec<String>,
    /// Values whose UTC offset was chosen by the clock-change policy rather than known, as
    /// `file:line:column: what` (no values): worth a log line at warning level.
    pub clock_flags: Vec<String>,
    /// Segments of the message that no path of the mapping reads, with how many there were
    /// (names only): reported in the Provenance, never silently dropped.
    pub unmapped_segments: Vec<(String, usize)>,
    /// With [`Explain::On`]: where every element came from, and what was not read.
    pub explain: Option<Explanation>,
}

/// Whether to record where each element came from (costs time; for `map --explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Explain {
    Off,
    On,
}

/// The answer to "which rule produced this, and what did no rule read?". No values, only
/// names and positions, so it carries no patient data.
#[derive(Debug, Default)]
pub struct Explanation {
    /// The message mapping used, and where it is defined.
    pub mapping: String,
    pub mapping_origin: String,
    /// Per built resource: (element path, rule `file:line:column`).
    pub elements: Vec<Vec<(String, Arc<str>)>>,
    /// Segments no rule read: (segment name, 1-based line in the message).
    pub unused_segments: Vec<(String, usize)>,
    /// Non-empty fields no rule read, as `PID-19` (with the segment's line).
    pub unused_fields: Vec<(String, usize)>,
}

/// A mapping defect found while running (a target path that conflicts with an earlier rule).
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct RunError {
    pub origin: String,
    pub message: String,
    /// A defect of the mapping (true), or a message the site's policy refuses (false).
    pub defect: bool,
}

/// A value with whether it came from the message (not only from constants).
#[derive(Debug, Clone)]
pub(crate) struct Val {
    pub text: String,
    pub from_message: bool,
}

/// A reference waiting for every resource to be built.
struct PendingRef {
    resource: usize,
    scope: ScopeIds,
    all: bool,
    /// Where its placeholder is: relative to the element being built until that element is
    /// placed, then to the resource.
    loc: Vec<set::Step>,
}

/// Recording for `--explain`.
#[derive(Default)]
struct Trace {
    used: HashSet<(usize, usize)>,
    elements: Vec<(String, Arc<str>)>,
}

pub(crate) struct Runner<'a, 'm> {
    msg: &'m Message,
    cx: &'a RunContext<'a>,
    plan: &'a Plan,
    mp: &'a MessagePlan,
    warnings: Vec<String>,
    vars: Vec<Option<Val>>,
    pending: Vec<PendingRef>,
    trace: Option<Trace>,
    /// `meta.source` of every resource (formatted once per message).
    appliance_uri: String,
    /// Clock-change flags raised while building the current resource (its `meta.tag`s).
    flags: Vec<crate::fhir::time::TimeFlag>,
    clock_flags: Vec<String>,
    /// A refusal found inside a conversion (clock_change = reject), returned at the end.
    refused: Option<RunError>,
    /// How many instances took each `key:` id so far (a repeated key is numbered, see
    /// [`Runner::resource_id`]).
    keyed: ids::IdMap<usize>,
    /// The name of each segment of the message, as three bytes side by side: absolute paths
    /// find their segment (~170 times per message) by scanning this, not the segments.
    codes: Vec<[u8; 3]>,
}

struct Built<'p> {
    plan_index: usize,
    /// The pending references whose placeholders are in this resource.
    refs: std::ops::Range<usize>,
    scope: ScopeIds,
    name: &'p str,
    resource_type: &'p str,
    id: uuid::Uuid,
    json: Obj,
    trace: Vec<(String, Arc<str>)>,
}

/// Maps `msg` with `mp`.
pub fn run(
    plan: &Plan,
    mp: &MessagePlan,
    msg: &Message,
    cx: &RunContext<'_>,
    explain: Explain,
) -> Result<MapResult, RunError> {
    let mut r = Runner {
        msg,
        cx,
        plan,
        mp,
        warnings: Vec::new(),
        vars: vec![None; mp.var_slots],
        pending: Vec::new(),
        trace: (explain == Explain::On).then(Trace::default),
        appliance_uri: cx.site.appliance_uri(),
        flags: Vec::new(),
        clock_flags: Vec::new(),
        refused: None,
        // Sized for a message's resources, so it does not grow (rehash) while mapping.
        keyed: ids::IdMap::with_capacity_and_hasher(mp.resources.len() * 2, Default::default()),
        codes: msg
            .segments()
            .iter()
            .map(|s| segment_code(s.name()).unwrap_or_default())
            .collect(),
    };
    let root = Cursor {
        groups: &[],
        rep: None,
    };
    for v in &mp.vars {
        let val = r.text(&v.value, &root, &mp.origin);
        if let Some(slot) = r.vars.get_mut(v.slot) {
            *slot = val;
        }
    }

    let mut built: Vec<Built> = Vec::new();
    for (ri, rp) in mp.resources.iter().enumerate() {
        let stacks = match rp.group {
            Some(g) => r.expand(g, &[], 0),
            None => vec![Vec::new()],
        };
        let mut occ = 0usize;
        for stack in &stacks {
            let cur = Cursor {
                groups: stack,
                rep: None,
            };
            match &rp.each {
                None => {
                    r.instance(ri, rp, &cur, occ, &mut built)?;
                    occ += 1;
                }
                Some((p, key)) => {
                    for (seg, idx, raw) in r.reps(p, &cur) {
                        let frame = RepFrame::new(raw, seg, *key, rep_id(seg, idx), None);
                        let c = Cursor {
                            groups: stack,
                            rep: Some(&frame),
                        };
                        r.instance(ri, rp, &c, occ, &mut built)?;
                        occ += 1;
                    }
                }
            }
        }
    }

    // Resolve references now that every id is known; drop those whose target was not produced.
    let targets: Vec<(usize, ScopeIds, String)> = built
        .iter()
        .map(|b| (b.plan_index, b.scope.clone(), ids::urn(&b.id)))
        .collect();
    let resolved: Vec<Vec<&str>> = r
        .pending
        .iter()
        .map(|p| {
            let it = targets
                .iter()
                .filter(|(i, s, _)| *i == p.resource && compatible(&p.scope, s))
                .map(|(_, _, u)| u.as_str());
            if p.all {
                it.collect()
            } else {
                it.take(1).collect()
            }
        })
        .collect();
    if let Some(e) = r.refused.take() {
        return Err(e);
    }
    // One entry per id: a resource built again with the same id (the same ordering clinician on
    // every OBR, keyed by the same identifier) is the same resource; references to it already
    // carry that id. A later copy that differs is dropped with a warning (no values in it).
    let mut seen: ids::IdMap<usize> =
        ids::IdMap::with_capacity_and_hasher(built.len(), Default::default());
    let mut kept: Vec<(Built, tree::Obj)> = Vec::with_capacity(built.len());
    for mut b in built {
        // The resource in its final form: references resolved (see `set`).
        let mut json = std::mem::take(&mut b.json);
        if !b.refs.is_empty() {
            let placed = r
                .pending
                .get(b.refs.clone())
                .unwrap_or_default()
                .iter()
                .zip(resolved.get(b.refs.clone()).unwrap_or_default())
                .map(|(p, urns)| set::Placed {
                    loc: &p.loc,
                    all: p.all,
                    urns,
                })
                .collect();
            set::resolve(&mut json, placed);
        }
        match seen.get(&b.id) {
            Some(&k) => {
                if kept[k].1 != json {
                    r.warnings.push(format!(
                        "resource `{}` ({}): two instances share an id but differ; the first is kept",
                        b.name, b.resource_type
                    ));
                }
            }
            None => {
                seen.insert(b.id, kept.len());
                kept.push((b, json));
            }
        }
    }
    let built = kept;

    let first_of = |i: usize| built.iter().position(|(b, _)| b.plan_index == i);
    let focus = mp
        .focus
        .iter()
        .filter_map(|i| first_of(*i))
        .take(1)
        .collect();
    let sender = mp.sender.and_then(first_of);
    let explain = r.trace.take().map(|t| {
        let traces = built.iter().map(|(b, _)| b.trace.clone()).collect();
        r.explanation(t, traces)
    });
    Ok(MapResult {
        resources: built
            .into_iter()
            .map(|(b, json)| BuiltResource {
                name: b.name.to_string(),
                resource_type: b.resource_type.to_string(),
                id: b.id,
                json,
            })
            .collect(),
        focus,
        sender,
        warnings: r.warnings,
        clock_flags: r.clock_flags,
        unmapped_segments: unmapped_segments(mp, msg),
        explain,
    })
}

/// Segment names of `msg` that `mp` never reads, in order of first appearance, with counts.
fn unmapped_segments(mp: &MessagePlan, msg: &Message) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for seg in msg.segments() {
        let name = seg.name();
        if mp
            .read_segments
            .binary_search_by(|s| s.as_str().cmp(name))
            .is_ok()
        {
            continue;
        }
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, c)) => *c += 1,
            None => out.push((name.to_string(), 1)),
        }
    }
    out
}

/// A unique id for repetition `idx` of a field of segment `seg`.
fn rep_id(seg: usize, idx: usize) -> u64 {
    ((seg as u64) << 20) | (idx as u64 & 0xF_FFFF)
}

impl<'a, 'm> Runner<'a, 'm> {
    /// Builds one instance of a resource (if its conditions hold and the message gave it data).
    fn instance(
        &mut self,
        ri: usize,
        rp: &'a ResourcePlan,
        cur: &Cursor<'_>,
        occ: usize,
        built: &mut Vec<Built<'a>>,
    ) -> Result<(), RunError> {
        for v in &rp.vars {
            let val = self.text(&v.value, cur, &rp.origin);
            if let Some(slot) = self.vars.get_mut(v.slot) {
                *slot = val;
            }
        }
        if let Some(c) = &rp.when
            && !self.cond(c, cur)
        {
            return Ok(());
        }
        let mark = self.trace.as_ref().map(|t| t.elements.len());
        let pending_before = self.pending.len();
        self.flags.clear();
        // `resourceType`, `id` and `meta` come first in a resource, and are filled in once
        // the resource is built (the id can depend on its identifiers): their places are held
        // from the start, so nothing is shifted to put them there. Mappings cannot set the
        // first two (`check` refuses them); rules may add to `meta`.
        let mut content = Obj::with_capacity(rp.width);
        content.insert("resourceType", Json::Null);
        content.insert("id", Json::Null);
        content.insert("meta", Json::Obj(Obj::new()));
        let mut any = false;
        if let Some(body) = &rp.body {
            any |= self.rules(body, cur, &mut content)?;
        }
        any |= self.rules(&rp.rules, cur, &mut content)?;
        let trace = match (&mut self.trace, mark) {
            (Some(t), Some(m)) => t.elements.split_off(m),
            _ => Vec::new(),
        };
        if !any {
            return Ok(());
        }
        let id = self.resource_id(rp, cur, &content, occ);
        content.insert("resourceType", Json::Str(rp.resource_type.clone()));
        content.insert("id", Json::Str(ids::text(&id)));
        let meta = content.entry("meta", || Json::Obj(Obj::new()));
        if !matches!(meta, Json::Obj(_)) {
            // A rule that wrote a value at `meta` itself: the generated meta takes its place.
            *meta = Json::Obj(Obj::new());
        }
        if let Json::Obj(meta) = meta {
            self.fill_meta(rp, meta);
        }
        built.push(Built {
            plan_index: ri,
            refs: pending_before..self.pending.len(),
            scope: self.scope_of(cur),
            name: &rp.name,
            resource_type: &rp.resource_type,
            id,
            json: content,
            trace,
        });
        Ok(())
    }

    /// The generated part of a resource's `meta`: its profile (first), `source`, and a tag per
    /// clock-change flag raised while building it.
    fn fill_meta(&mut self, rp: &ResourcePlan, meta: &mut Obj) {
        // Nothing empty is written (see `set`): a mapping's `profile: ""` adds no profile.
        if let Some(p) = rp.profile.as_ref().filter(|p| !p.is_empty())
            && let Json::Arr(a) = meta.entry("profile", || Json::Arr(Vec::new()))
        {
            a.insert(0, Json::Str(p.clone()));
        }
        meta.insert("source", Json::Str(self.appliance_uri.clone()));
        if self.flags.is_empty() {
            return;
        }
        self.flags.sort_unstable_by_key(|f| f.code());
        self.flags.dedup();
        let system = format!(
            "{}/{}",
            self.cx.site.identifier_base.trim_end_matches('/'),
            crate::fhir::time::FLAG_CODE_SYSTEM_PATH
        );
        if let Json::Arr(a) = meta.entry("tag", || Json::Arr(Vec::new())) {
            for f in self.flags.drain(..) {
                let mut t = Obj::new();
                t.insert("system", Json::Str(system.clone()));
                t.insert("code", Json::Str(f.code().into()));
                t.insert("display", Json::Str(f.display().into()));
                a.push(Json::Obj(t));
            }
        }
    }

    fn resource_id(
        &mut self,
        rp: &ResourcePlan,
        cur: &Cursor<'_>,
        content: &Obj,
        occ: usize,
    ) -> uuid::Uuid {
        let site = self.cx.site;
        if !rp.key.is_empty() {
            let values: Vec<Option<std::borrow::Cow<'_, str>>> =
                rp.key.iter().map(|k| self.operand(k, cur)).collect();
            if values.iter().any(Option::is_some) {
                let mut parts: Vec<&str> = vec![&site.ods_code, &rp.resource_type, "key"];
                parts.extend(values.iter().map(|v| v.as_deref().unwrap_or("")));
                let base = ids::resource_uuid(&parts);
                // The same key again in one message (two OBX with the same OBX-3 and no OBX-4
                // sub-id) is another resource: number it by its order among the instances that
                // share the key, so the first keeps the plain key and a re-send repeats the ids.
                let n = self.keyed.entry(base).or_insert(0);
                *n += 1;
                if *n == 1 {
                    return base;
                }
                let n = n.to_string();
                parts.extend(["occurrence", n.as_str()]);
                return ids::resource_uuid(&parts);
            }
        }
        let first_identifier = content
            .get("identifier")
            .and_then(|v| match v {
                Json::Arr(a) => a.first(),
                other => Some(other),
            })
            .and_then(|i| match i {
                Json::Obj(m) => {
                    let system = m.get("system")?.as_str()?;
                    let value = m.get("value")?.as_str()?;
                    Some((system, value))
                }
                _ => None,
            });
        match first_identifier {
            Some((system, value)) => {
                ids::resource_uuid(&[&site.ods_code, &rp.resource_type, system, value])
            }
            None => {
                let h = self.msg.header();
                let occ = occ.to_string();
                ids::resource_uuid(&[
                    &site.ods_code,
                    &rp.resource_type,
                    "message",
                    &h.sending_application,
                    &h.sending_facility,
                    &h.control_id,
                    &rp.name,
                    &occ,
                ])
            }
        }
    }

    fn explanation(&self, t: Trace, traces: Vec<Vec<(String, Arc<str>)>>) -> Explanation {
        let mut used = t.used;
        // The envelope reads these MSH fields itself.
        for f in [1, 2, 3, 4, 7, 9, 10, 12, 18] {
            used.insert((0, f));
        }
        let mut unused_segments = Vec::new();
        let mut unused_fields = Vec::new();
        for (i, seg) in self.msg.segments().iter().enumerate() {
            let any = used.iter().any(|(s, _)| *s == i);
            if !any && i > 0 {
                unused_segments.push((seg.name().to_string(), i + 1));
                continue;
            }
            for f in 1..=seg.field_count() {
                let present = seg
                    .field_raw(f)
                    .is_some_and(|v| !v.is_empty() && v != "\"\"");
                if present && !used.contains(&(i, f)) {
                    unused_fields.push((format!("{}-{f}", seg.name()), i + 1));
                }
            }
        }
        Explanation {
            mapping: self.mp.name.clone(),
            mapping_origin: self.mp.origin.to_string(),
            elements: traces,
            unused_segments,
            unused_fields,
        }
    }
}
