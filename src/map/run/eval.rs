//! Evaluating rules, values, conditions and HL7 paths against one message.

use super::scope::{Cursor, RepFrame};
use super::{PendingRef, Runner, Val, rep_id, set};
use crate::fhir::nhs;
use crate::fhir::tree::{Json, Obj};
use std::borrow::Cow;

use crate::hl7::{component_of, decode_escapes_cow, nth_part, parts};
use crate::map::path::{Hl7Path, RepSelect};
use crate::map::plan::*;

/// A rule's result before it is written.
enum Out {
    Text(String),
    Element(Json),
}

impl<'a, 'm> Runner<'a, 'm> {
    /// Applies `rules` into `obj`; true if a message-derived value landed.
    pub(super) fn rules(
        &mut self,
        rules: &'a [RulePlan],
        cur: &Cursor<'_>,
        obj: &mut Obj,
    ) -> Result<bool, super::RunError> {
        let mut any = false;
        for rule in rules {
            match &rule.for_each {
                None => any |= self.rule(rule, cur, obj)?,
                Some(Iter::Reps(p, key)) => {
                    for (seg, idx, raw) in self.reps(p, cur) {
                        let frame = RepFrame::new(raw, seg, *key, rep_id(seg, idx), cur.rep);
                        let c = Cursor {
                            groups: cur.groups,
                            rep: Some(&frame),
                        };
                        any |= self.rule(rule, &c, obj)?;
                    }
                }
                Some(Iter::Group(g)) => {
                    for stack in self.expand(*g, cur.groups, 0) {
                        let mut groups = cur.groups.to_vec();
                        groups.extend(stack);
                        let c = Cursor {
                            groups: &groups,
                            rep: cur.rep,
                        };
                        any |= self.rule(rule, &c, obj)?;
                    }
                }
            }
        }
        Ok(any)
    }

    fn rule(
        &mut self,
        rule: &'a RulePlan,
        cur: &Cursor<'_>,
        obj: &mut Obj,
    ) -> Result<bool, super::RunError> {
        if let Some(c) = &rule.when
            && !self.cond(c, cur)
        {
            return Ok(false);
        }
        let tracing = self.trace.is_some();
        // Placeholders written while building this value: their locations are relative to
        // it until it is placed (below).
        let refs_before = self.pending.len();
        let (value, from_message, child_mark) = match &rule.source {
            Source::Ref { resource, all } => {
                self.pending.push(PendingRef {
                    resource: *resource,
                    scope: self.scope_of(cur),
                    all: *all,
                    loc: Vec::new(),
                });
                (set::placeholder(), true, None)
            }
            Source::Object {
                rules: children,
                width,
                needs,
            } => {
                // Rules that could only take message values from empty components would build
                // an element to drop (see `rep_components`). With `--explain` they run anyway:
                // what their conditions read is part of the answer.
                if let Some(mask) = needs
                    && !rule.always
                    && !tracing
                    && !self.any_component(cur, *mask)
                {
                    return Ok(false);
                }
                let mark = self.trace.as_ref().map(|t| t.elements.len());
                let mut child = Obj::with_capacity(*width);
                let from_message = self.rules(children, cur, &mut child)?;
                if !from_message && !rule.always {
                    if let (Some(t), Some(m)) = (&mut self.trace, mark) {
                        t.elements.truncate(m);
                    }
                    self.pending.truncate(refs_before);
                    return Ok(false);
                }
                (Json::Obj(child), from_message, mark)
            }
            Source::Scalar(spec) => {
                let Some((out, from_message)) = self.value(spec, cur, rule) else {
                    return Ok(false);
                };
                let v = match out {
                    Out::Element(v) => v,
                    Out::Text(t) => match self.convert(rule, t) {
                        Some(v) => v,
                        None => return Ok(false),
                    },
                };
                (v, from_message, None)
            }
        };
        let placed = self.pending.len() > refs_before;
        let mut loc = Vec::new();
        let want = (tracing || placed).then_some(&mut loc);
        if !set::set_path(obj, &rule.target, value, rule, want)? {
            self.pending.truncate(refs_before);
            return Ok(false);
        }
        if placed {
            for p in &mut self.pending[refs_before..] {
                p.loc.splice(0..0, loc.iter().cloned());
            }
        }
        if let Some(t) = &mut self.trace {
            let p = set::show(&loc);
            if let Some(m) = child_mark {
                for e in &mut t.elements[m..] {
                    e.0 = format!("{p}.{}", e.0);
                }
            }
            t.elements.push((p, rule.origin.clone()));
        }
        Ok(from_message)
    }

    /// Whether any component in `mask` (bit `c - 1` for component `c`) of the repetition being
    /// iterated holds anything.
    fn any_component(&self, cur: &Cursor<'_>, mask: u64) -> bool {
        let Some(frame) = cur.rep else {
            return false;
        };
        let seps = self.msg.separators();
        let mut rest = mask;
        while rest != 0 {
            let c = rest.trailing_zeros() as usize + 1;
            if frame.component(seps, c).is_some_and(|t| !t.is_empty()) {
                return true;
            }
            rest &= rest - 1;
        }
        false
    }

    /// A value's text (variables), without conversion or shaping beyond a code lookup.
    pub(super) fn text(&mut self, spec: &ValueSpec, cur: &Cursor<'_>, origin: &str) -> Option<Val> {
        let (text, from_message) = self.raw_value(spec, cur)?;
        let text = match spec.lookup {
            None => text,
            Some(l) => {
                let vm = self.plan.valuemaps.get(l.map)?;
                match vm.get(&text) {
                    Some((v, _)) => v.to_string(),
                    None => {
                        self.warnings.push(format!(
                            "{origin}: value map `{}` has no entry for the code in this message and no default",
                            vm.name
                        ));
                        return None;
                    }
                }
            }
        };
        Some(Val { text, from_message })
    }

    /// Source, default and functions: the text before lookup.
    fn raw_value(&mut self, spec: &ValueSpec, cur: &Cursor<'_>) -> Option<(String, bool)> {
        if let Some(c) = &spec.when
            && !self.cond(c, cur)
        {
            return None;
        }
        let got = match &spec.source {
            Scalar::Path(p) => self.scalar(p, cur).map(|t| (t, true)),
            Scalar::Var(slot) => self.var_value(*slot),
            Scalar::First(ops) => ops.iter().find_map(|o| match o {
                Operand::Path(p) => self.scalar(p, cur).map(|t| (t, true)),
                Operand::Var(slot) => self.var_value(*slot),
            }),
            Scalar::Join(ops, sep) => {
                let mut parts = Vec::new();
                let mut msg = false;
                for o in ops {
                    match o {
                        Operand::Path(p) => {
                            if let Some(t) = self.scalar(p, cur) {
                                parts.push(t);
                                msg = true;
                            }
                        }
                        Operand::Var(slot) => {
                            if let Some((t, from_message)) = self.var_value(*slot) {
                                parts.push(t);
                                msg |= from_message;
                            }
                        }
                    }
                }
                (!parts.is_empty()).then(|| (parts.join(sep), msg))
            }
            Scalar::Value(t) => Some(self.render(t, cur)),
        };
        let (mut text, from_message) = match got {
            Some(g) => g,
            None => (self.render(spec.default.as_ref()?, cur).0, false),
        };
        for f in &spec.functions {
            text = super::convert::apply(f, text, self.cx, self.plan)?;
        }
        (!text.is_empty()).then_some((text, from_message))
    }

    /// The full value of a scalar rule: text, or an element built by a value map.
    fn value(
        &mut self,
        spec: &ValueSpec,
        cur: &Cursor<'_>,
        rule: &RulePlan,
    ) -> Option<(Out, bool)> {
        let (text, from_message) = self.raw_value(spec, cur)?;
        let Some(l) = spec.lookup else {
            return Some((Out::Text(text), from_message));
        };
        let vm = self.plan.valuemaps.get(l.map)?;
        let hit = vm.get(&text);
        let render = |t: &Option<Template>, me: &mut Self| {
            t.as_ref()
                .map(|t| me.render(t, cur).0)
                .filter(|s| !s.is_empty())
        };
        let coding = |system: Option<String>, code: &str, display: Option<&str>| {
            let mut m = Obj::new();
            if let Some(s) = system {
                m.insert("system", Json::Str(s));
            }
            // Nothing empty is written (see `set`): a table may translate a code to "".
            if !code.is_empty() {
                m.insert("code", Json::Str(code.to_string()));
            }
            if let Some(d) = display.filter(|d| !d.is_empty()) {
                m.insert("display", Json::Str(d.to_string()));
            }
            Json::Obj(m)
        };
        let missing = |me: &mut Self| {
            me.warnings.push(format!(
                "{}: value map `{}` has no entry for the code in this message and no default",
                rule.origin, vm.name
            ));
        };
        let out = match l.shape {
            Shape::Code => match hit {
                Some((v, _)) => Out::Text(v.to_string()),
                None => {
                    missing(self);
                    return None;
                }
            },
            Shape::Coding => {
                let source_system = render(&vm.source_system, self);
                match (hit, source_system) {
                    (Some((v, true)), _) | (Some((v, false)), None) => {
                        Out::Element(coding(render(&vm.system, self), v, vm.display.get(v)))
                    }
                    // Not in the table: the original code in its own system, never a guess.
                    (Some((_, false)), Some(src)) | (None, Some(src)) => {
                        Out::Element(coding(Some(src), &text, None))
                    }
                    (None, None) => {
                        missing(self);
                        return None;
                    }
                }
            }
            Shape::CodeableConcept => {
                let mut codings = Vec::new();
                if let Some((v, _)) = hit {
                    codings.push(coding(render(&vm.system, self), v, vm.display.get(v)));
                }
                if let Some(src) = render(&vm.source_system, self) {
                    codings.push(coding(Some(src), &text, None));
                }
                codings.retain(|c| !matches!(c, Json::Obj(o) if o.is_empty()));
                if codings.is_empty() {
                    missing(self);
                    return None;
                }
                let mut m = Obj::new();
                m.insert("coding", Json::Arr(codings));
                Out::Element(Json::Obj(m))
            }
        };
        Some((out, from_message))
    }

    /// Renders a template; the flag says whether any part came from the message.
    fn render(&mut self, t: &Template, cur: &Cursor<'_>) -> (String, bool) {
        let h = self.msg.header();
        // Sized for the literal text and a short value per other part, so most renders
        // allocate once.
        let size = t.0.iter().fold(0, |n, p| match p {
            TplPart::Lit(l) => n + l.len(),
            _ => n + 24,
        });
        let mut s = String::with_capacity(size);
        let mut msg = false;
        for p in &t.0 {
            match p {
                TplPart::Lit(l) => s.push_str(l),
                TplPart::Var(v) => match v {
                    Var::SiteOds => s.push_str(&self.cx.site.ods_code),
                    Var::ApplianceId => s.push_str(&self.cx.site.appliance_id),
                    Var::IdentifierBase => s.push_str(&self.cx.site.identifier_base),
                    Var::Site(name) => match self
                        .cx
                        .feed_variables
                        .and_then(|f| f.get(name))
                        .map(String::as_str)
                        .or_else(|| self.cx.site.variable(name))
                    {
                        Some(v) => s.push_str(v),
                        None => self.warnings.push(format!(
                            "site variable `{name}` is not configured ([site.variables]); left empty"
                        )),
                    },
                    Var::System(kind) => self.cx.site.push_local_system(&mut s, kind),
                    Var::Feed => s.push_str(self.cx.feed),
                    Var::MessageCode => s.push_str(&h.message_type.code),
                    Var::MessageTrigger => s.push_str(&h.message_type.trigger),
                    Var::MessageStructure => {
                        s.push_str(h.message_type.structure.as_deref().unwrap_or(""))
                    }
                    Var::MessageVersion => s.push_str(&h.version),
                    Var::MessageControlId => s.push_str(&h.control_id),
                },
                TplPart::User(slot) => {
                    if let Some(Some(v)) = self.vars.get(*slot) {
                        s.push_str(&v.text);
                        msg |= v.from_message;
                    }
                }
                TplPart::Path(p) => {
                    if let Some(v) = self.scalar_ref(p, cur) {
                        s.push_str(&v);
                        msg = true;
                    }
                }
            }
        }
        (s, msg)
    }

    /// An operand's text; borrowed from the message where it can be (conditions only compare).
    pub(super) fn operand<'c>(&mut self, o: &Operand, cur: &Cursor<'c>) -> Option<Cow<'c, str>>
    where
        'm: 'c,
    {
        match o {
            Operand::Path(p) => self.scalar_ref(p, cur),
            Operand::Var(slot) => self.var(*slot).map(|v| Cow::Owned(v.text.clone())),
        }
    }

    /// The value of variable `slot`, if it has one.
    fn var(&self, slot: usize) -> Option<&Val> {
        self.vars.get(slot).and_then(Option::as_ref)
    }

    /// [`Self::var`] as a source's text and whether it came from the message.
    fn var_value(&self, slot: usize) -> Option<(String, bool)> {
        self.var(slot).map(|v| (v.text.clone(), v.from_message))
    }

    pub(super) fn cond(&mut self, c: &Cond, cur: &Cursor<'_>) -> bool {
        match c {
            Cond::All(cs) => cs.iter().all(|c| self.cond(c, cur)),
            Cond::Any(cs) => cs.iter().any(|c| self.cond(c, cur)),
            Cond::Not(c) => !self.cond(c, cur),
            Cond::Test { subject, test } => {
                if let (
                    Test::Exists(e),
                    Operand::Path(Hl7Path::Absolute {
                        segment,
                        occurrence,
                        field: None,
                        ..
                    }),
                ) = (test, subject)
                {
                    let present = self.find_segment(segment, *occurrence, cur);
                    if let (Some(t), Some(i)) = (&mut self.trace, present) {
                        t.used.insert((i, 0));
                    }
                    return present.is_some() == *e;
                }
                // A variable is compared where it is, not copied.
                let from_path;
                let v: Option<&str> = match subject {
                    Operand::Var(slot) => self.var(*slot).map(|v| v.text.as_str()),
                    Operand::Path(p) => {
                        from_path = self.scalar_ref(p, cur);
                        from_path.as_deref()
                    }
                };
                match test {
                    Test::Exists(e) => v.is_some() == *e,
                    Test::Equals(x) => v == Some(x.as_str()),
                    Test::In(xs) => v.is_some_and(|v| xs.iter().any(|x| *x == v)),
                    Test::NotIn(xs) => v.is_none_or(|v| !xs.iter().any(|x| *x == v)),
                    Test::StartsWith(x) => v.is_some_and(|v| v.starts_with(x.as_str())),
                    Test::InMap(i) => v.is_some_and(|v| {
                        self.plan
                            .valuemaps
                            .get(*i)
                            .is_some_and(|m| m.get(v).is_some_and(|(_, hit)| hit))
                    }),
                    Test::NhsNumber { valid } => {
                        let ok = v
                            .and_then(nhs::normalise_nhs_number)
                            .is_some_and(|n| nhs::is_valid_nhs_number(&n));
                        // `invalid` means "present but failing": an absent number is neither.
                        if *valid { ok } else { !ok && v.is_some() }
                    }
                }
            }
        }
    }

    /// Raw repetitions selected by a field path: (segment index, repetition index, text). An
    /// iterator over the message, not a list: a mapping walks ~90 of these per message, and
    /// collecting each (twice, with the field's repetitions) was an allocation for nothing.
    pub(super) fn reps<'c, 'p>(&mut self, p: &'p Hl7Path, cur: &Cursor<'c>) -> Reps<'c, 'p>
    where
        'm: 'c,
    {
        let msg: &'m crate::hl7::Message = self.msg;
        let mut out = Reps {
            seg: 0,
            single: None,
            parts: None,
            next: 0,
            select: &RepSelect::All,
            msg,
            encoding: self.cx.encoding,
        };
        match p {
            Hl7Path::Relative { .. } => {
                out.single = cur.rep.map(|f| (f.seg, (f.id & 0xF_FFFF) as usize, f.raw));
            }
            Hl7Path::Absolute {
                segment,
                occurrence,
                field: Some(field),
                rep,
                ..
            } => {
                let Some((si, raw)) = self.field_of(segment, *occurrence, *field, cur) else {
                    return out;
                };
                out.seg = si;
                if raw.is_empty() {
                    return out;
                }
                // MSH-1 and MSH-2 are the separators themselves: never split them.
                if segment == "MSH" && *field <= 2 {
                    out.single = Some((si, 0, raw));
                } else {
                    out.parts = Some(parts(raw, msg.separators().repetition));
                    out.select = rep;
                }
            }
            Hl7Path::Absolute { field: None, .. } => {}
        }
        out
    }

    /// The raw text of field `field` of the segment an absolute path reads (see
    /// [`Runner::find_segment`]), with that segment's index; recorded as read for `--explain`.
    fn field_of(
        &mut self,
        segment: &str,
        occurrence: usize,
        field: usize,
        cur: &Cursor<'_>,
    ) -> Option<(usize, &'m str)> {
        let si = self.find_segment(segment, occurrence, cur)?;
        if let Some(t) = &mut self.trace {
            t.used.insert((si, field));
        }
        let msg: &'m crate::hl7::Message = self.msg;
        Some((si, msg.segments().get(si)?.field_raw(field)?))
    }

    /// The decoded scalar a path points at, or None when absent, empty or `""`.
    pub(super) fn scalar(&mut self, p: &Hl7Path, cur: &Cursor<'_>) -> Option<String> {
        self.scalar_ref(p, cur).map(Cow::into_owned)
    }

    /// [`Self::scalar`], borrowed from the message when it has no escapes (most values): a
    /// condition or a template only reads it.
    pub(super) fn scalar_ref<'c>(&mut self, p: &Hl7Path, cur: &Cursor<'c>) -> Option<Cow<'c, str>>
    where
        'm: 'c,
    {
        let seps = *self.msg.separators();
        let (seg, raw) = match p {
            Hl7Path::Relative { component, sub } => {
                let f = cur.rep?;
                let raw = f.part(&seps, *component, sub.unwrap_or(1)).unwrap_or("");
                (f.seg, raw)
            }
            Hl7Path::Absolute {
                segment,
                occurrence,
                field: Some(field),
                rep: RepSelect::All | RepSelect::First,
                component,
                sub,
            } if !(segment == "MSH" && *field <= 2) => {
                // The first repetition, without a repetition filter: found in the same pass
                // as the component and subcomponent (most absolute reads).
                let (seg, raw) = self.field_of(segment, *occurrence, *field, cur)?;
                let part = first_rep_part(raw, &seps, component.unwrap_or(1), sub.unwrap_or(1));
                (seg, part)
            }
            Hl7Path::Absolute {
                segment,
                field: Some(field),
                component,
                sub,
                ..
            } => {
                // The first repetition selected (an iterator: no allocation).
                let (seg, _, first) = self.reps(p, cur).next()?;
                // MSH-1 and MSH-2 are the separators themselves: never split them.
                if segment == "MSH" && *field <= 2 {
                    return Some(Cow::Borrowed(first));
                }
                let raw = component_of(&seps, first, component.unwrap_or(1), sub.unwrap_or(1))
                    .unwrap_or("");
                (seg, raw)
            }
            Hl7Path::Absolute { field: None, .. } => return None,
        };
        if raw.is_empty() || raw == "\"\"" {
            return None;
        }
        // Most values have no escape sequence: their answer is built straight from `raw`.
        // Going through the general `Cow` first, then copying it out, stalled the processor
        // on reading back a value it had just written (`perf`: this function's own time fell
        // from ~6% to ~2% of the mapping benchmark).
        if !may_escape(self.msg, seg) {
            return if blank(raw) {
                None
            } else {
                Some(Cow::Borrowed(raw))
            };
        }
        let text = decode_escapes_cow(raw, &seps, self.cx.encoding);
        if blank(&text) { None } else { Some(text) }
    }
}

/// See [`Runner::reps`].
pub(super) struct Reps<'c, 'p> {
    seg: usize,
    /// The one repetition of a relative path (the one being iterated) or of MSH-1/MSH-2.
    single: Option<(usize, usize, &'c str)>,
    parts: Option<crate::hl7::Parts<'c>>,
    /// Index of the repetition `parts` yields next.
    next: usize,
    select: &'p RepSelect,
    msg: &'c crate::hl7::Message,
    encoding: &'static encoding_rs::Encoding,
}

impl<'c> Iterator for Reps<'c, '_> {
    type Item = (usize, usize, &'c str);

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(one) = self.single.take() {
            return Some(one);
        }
        loop {
            let r = self.parts.as_mut()?.next()?;
            let i = self.next;
            self.next += 1;
            let take = match self.select {
                RepSelect::All => true,
                RepSelect::First => {
                    self.parts = None;
                    true
                }
                RepSelect::Index(n) => {
                    let want = n.saturating_sub(1);
                    if i < want {
                        false
                    } else {
                        self.parts = None;
                        i == want
                    }
                }
                RepSelect::Filter {
                    component,
                    sub,
                    values,
                    negate,
                } => passes(
                    r,
                    self.seg,
                    (*component, *sub),
                    values,
                    *negate,
                    self.msg,
                    self.encoding,
                ),
            };
            if take {
                return Some((self.seg, i, r));
            }
        }
    }
}

/// The text of raw value `raw` of segment `seg` of `msg`: escape sequences decoded, borrowed
/// when the segment has none.
fn decode_in<'c>(
    msg: &crate::hl7::Message,
    seg: usize,
    raw: &'c str,
    encoding: &'static encoding_rs::Encoding,
) -> Cow<'c, str> {
    if may_escape(msg, seg) {
        decode_escapes_cow(raw, msg.separators(), encoding)
    } else {
        Cow::Borrowed(raw)
    }
}

/// Whether segment `seg` of `msg` may hold escape sequences (an unknown segment may).
fn may_escape(msg: &crate::hl7::Message, seg: usize) -> bool {
    msg.segments().get(seg).is_none_or(|s| s.has_escapes())
}

/// Whether repetition `r` passes a `[c.s=A,B]` filter (`[c.s!=A,B]` with `negate`).
fn passes(
    r: &str,
    seg: usize,
    (component, sub): (usize, usize),
    values: &[String],
    negate: bool,
    msg: &crate::hl7::Message,
    encoding: &'static encoding_rs::Encoding,
) -> bool {
    let seps = msg.separators();
    let c = component_of(seps, r, component, sub).unwrap_or("");
    let c = decode_in(msg, seg, c, encoding);
    values.iter().any(|v| *v == c) != negate
}

/// Whether `text` is only white space (`str::trim` would leave nothing). Nearly every value
/// starts with a printable ASCII character, which settles it without the Unicode-aware scan
/// from both ends (~2% of mapping when done for every value read).
fn blank(text: &str) -> bool {
    match text.as_bytes().first() {
        None => true,
        Some(b) if b.is_ascii_graphic() => false,
        Some(_) => text.trim().is_empty(),
    }
}

/// Component `c`, subcomponent `s` (1-based) of the first repetition of field text `raw`; `""`
/// when absent. The same answer as splitting off the repetition, then the component, then the
/// subcomponent, in one pass that stops where the part ends: three scans of the field were
/// most of the cost of an absolute read. Delimiters are ASCII bytes (the parser refuses
/// others), which never occur inside a multi-byte character; other separators (a hand-built
/// `Separators`) take the general path.
fn first_rep_part<'r>(raw: &'r str, seps: &crate::hl7::Separators, c: usize, s: usize) -> &'r str {
    let (rep, comp, sub) = (seps.repetition, seps.component, seps.subcomponent);
    if !(rep.is_ascii() && comp.is_ascii() && sub.is_ascii()) {
        let first = nth_part(raw, rep, 0).unwrap_or("");
        return component_of(seps, first, c, s).unwrap_or("");
    }
    let (rep, comp, sub) = (rep as u8, comp as u8, sub as u8);
    let (mut ci, mut si, mut start, mut end) = (1, 1, 0, raw.len());
    for (i, &b) in raw.as_bytes().iter().enumerate() {
        let next = if b == comp {
            (ci + 1, 1)
        } else if b == sub {
            (ci, si + 1)
        } else if b == rep {
            end = i;
            break;
        } else {
            continue;
        };
        if (ci, si) == (c, s) {
            return raw.get(start..i).unwrap_or("");
        }
        (ci, si) = next;
        if ci > c {
            return "";
        }
        start = i + 1;
    }
    // The last part: from the last delimiter to the end of the repetition.
    if (ci, si) == (c, s) {
        raw.get(start..end).unwrap_or("")
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_rep_part_agrees_with_splitting() {
        let seps = crate::hl7::Separators::default();
        let fields = [
            "",
            "a",
            "a^b",
            "a^b&c^d",
            "^&^",
            "a~b^c",
            "x&y&z^q~r",
            "~",
            "é^ü&ö~ä",
            "1^2^3^4^5^6^7^8^9^10^11^12^13^14^15^16^17^18^19^20",
        ];
        for f in fields {
            let first = f.split('~').next().unwrap_or("");
            for c in 1..=22 {
                for s in 1..=4 {
                    let want = crate::hl7::component_of(&seps, first, c, s).unwrap_or("");
                    assert_eq!(
                        super::first_rep_part(f, &seps, c, s),
                        want,
                        "{f:?} .{c}.{s}"
                    );
                }
            }
        }
        // A hand-built, non-ASCII component separator takes the general path.
        let odd = crate::hl7::Separators {
            component: '§',
            ..seps
        };
        assert_eq!(super::first_rep_part("a§b&c~d", &odd, 2, 2), "c");
    }

    #[test]
    fn blank_agrees_with_trim() {
        for t in [
            "",
            " ",
            "\t \r",
            "\u{a0}",
            "\u{2003}x",
            "a",
            " a",
            "é",
            "\u{a0}\u{3000}",
            "~",
        ] {
            assert_eq!(super::blank(t), t.trim().is_empty(), "{t:?}");
        }
    }
}
