//! Where a path reads from: segment groups found in the message, and the cursor (the group
//! instances and field repetitions a rule is inside).
//!
//! A group instance starts at its `begin` segment, takes the `lead` segments right before it, and
//! runs over the following segments that belong to the group (its members and those of groups
//! nested in it). Its *direct* segments are those not inside a nested group's instance, so an
//! OBR's NTE and an OBX's NTE are told apart.
//!
//! An absolute path (`NTE-3`) is read from the innermost group instance whose group claims that
//! segment; if the instance has none, the value is absent (it is never borrowed from a sibling or
//! from elsewhere in the message). Segments no enclosing group claims are read from the whole
//! message.

use std::cell::OnceCell;

use super::Runner;
use crate::hl7::{Separators, contains_char, nth_part, parts, segment_code};

/// One instance of a group.
#[derive(Debug, Clone)]
pub(crate) struct GroupFrame {
    pub group: usize,
    /// Every segment index of the instance, in order.
    pub all: Vec<usize>,
    /// The segment indexes not inside a nested group's instance.
    pub direct: Vec<usize>,
    /// Unique within the message (the index of the `begin` segment).
    pub id: u64,
}

/// One field repetition being iterated.
pub(crate) struct RepFrame<'c> {
    pub raw: &'c str,
    pub seg: usize,
    pub key: u32,
    pub id: u64,
    pub up: Option<&'c RepFrame<'c>>,
    /// Where the components of `raw` end, found on the first relative read: a datatype map
    /// reads ~10 components of each repetition (`.1` to `.13`), and finding each one by
    /// scanning from the start was the largest cost of mapping. Kept inline (no allocation
    /// per repetition: a message iterates ~90).
    comps: OnceCell<Comps>,
}

/// How many component ends a [`RepFrame`] keeps; later components (rare: XCN has 23) are
/// found by scanning on from the last one kept.
const KEPT: usize = 16;

/// The end offsets of the first components of a repetition.
struct Comps {
    ends: [u32; KEPT],
    /// How many of `ends` are set (at most [`KEPT`]).
    len: usize,
    /// Whether the repetition has more components than `len`.
    more: bool,
    /// Whether the repetition holds a subcomponent separator: when not (most), a component is
    /// its own first subcomponent, without a scan of it per read.
    subs: bool,
}

impl<'c> RepFrame<'c> {
    pub fn new(raw: &'c str, seg: usize, key: u32, id: u64, up: Option<&'c RepFrame<'c>>) -> Self {
        RepFrame {
            raw,
            seg,
            key,
            id,
            up,
            comps: OnceCell::new(),
        }
    }

    /// Subcomponent `s` of component `c` (both 1-based) of the repetition; `None` when absent.
    pub fn part(&self, seps: &Separators, c: usize, s: usize) -> Option<&'c str> {
        let comp = self.component(seps, c)?;
        if self.comps.get().is_some_and(|k| k.subs) {
            nth_part(comp, seps.subcomponent, s.saturating_sub(1))
        } else {
            (s <= 1).then_some(comp)
        }
    }

    /// Component `c` (1-based) of the repetition; `None` when absent.
    pub fn component(&self, seps: &Separators, c: usize) -> Option<&'c str> {
        let raw: &'c str = self.raw;
        let sep = seps.component;
        let width = sep.len_utf8();
        let comps = self.comps.get_or_init(|| {
            let mut out = Comps {
                ends: [0; KEPT],
                len: 0,
                more: false,
                subs: contains_char(raw, seps.subcomponent),
            };
            let mut end = 0;
            for part in parts(raw, sep) {
                if out.len == KEPT {
                    out.more = true;
                    break;
                }
                end += part.len();
                // A repetition longer than 4 GiB cannot reach here (frames are far smaller).
                out.ends[out.len] = u32::try_from(end).unwrap_or(u32::MAX);
                out.len += 1;
                end += width;
            }
            out
        });
        let i = c.checked_sub(1)?;
        let start = |i: usize| match i.checked_sub(1) {
            None => 0,
            Some(p) => comps
                .ends
                .get(p)
                .map_or(usize::MAX, |e| *e as usize + width),
        };
        if i < comps.len {
            let end = *comps.ends.get(i)? as usize;
            return raw.get(start(i)..end);
        }
        if !comps.more {
            return None;
        }
        nth_part(raw.get(start(comps.len)..)?, sep, i - comps.len)
    }
}

/// What a rule is inside.
#[derive(Clone, Copy)]
pub(crate) struct Cursor<'c> {
    pub groups: &'c [GroupFrame],
    pub rep: Option<&'c RepFrame<'c>>,
}

/// `(scope key, instance id)` pairs: which instances a value or a resource belongs to.
pub(crate) type ScopeIds = Vec<(u32, u64)>;

/// Whether two scopes agree on every iteration they share.
pub(crate) fn compatible(a: &[(u32, u64)], b: &[(u32, u64)]) -> bool {
    a.iter()
        .all(|(k, i)| b.iter().all(|(k2, j)| k != k2 || i == j))
}

impl Runner<'_, '_> {
    pub(crate) fn scope_of(&self, cur: &Cursor<'_>) -> ScopeIds {
        let mut s: ScopeIds = cur
            .groups
            .iter()
            .filter_map(|f| self.mp.groups.get(f.group).map(|g| (g.scope_key, f.id)))
            .collect();
        let mut r = cur.rep;
        while let Some(f) = r {
            s.push((f.key, f.id));
            r = f.up;
        }
        s
    }

    /// The segment index an absolute path reads (see the module docs).
    pub(crate) fn find_segment(
        &self,
        name: &str,
        occurrence: usize,
        cur: &Cursor<'_>,
    ) -> Option<usize> {
        let nth = occurrence.checked_sub(1)?;
        let code = segment_code(name)?;
        let codes = &self.codes;
        for f in cur.groups.iter().rev() {
            let Some(g) = self.mp.groups.get(f.group) else {
                continue;
            };
            if g.owns.iter().any(|s| segment_code(s) == Some(code)) {
                return f
                    .direct
                    .iter()
                    .copied()
                    .filter(|i| codes.get(*i) == Some(&code))
                    .nth(nth);
            }
        }
        codes
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == code)
            .map(|(i, _)| i)
            .nth(nth)
    }

    /// Every way to enter group `g` from `ctx`: the frames to push, outermost first.
    pub(crate) fn expand(
        &self,
        g: usize,
        ctx: &[GroupFrame],
        depth: usize,
    ) -> Vec<Vec<GroupFrame>> {
        let Some(plan) = self.mp.groups.get(g) else {
            return Vec::new();
        };
        if depth > self.mp.groups.len() {
            return Vec::new();
        }
        let bases: Vec<(Vec<GroupFrame>, Vec<usize>)> = match plan.parent {
            Some(p) => match ctx.iter().rev().find(|f| f.group == p) {
                Some(pf) => vec![(Vec::new(), pf.all.clone())],
                None => self
                    .expand(p, ctx, depth + 1)
                    .into_iter()
                    .map(|stack| {
                        let within = stack.last().map(|f| f.all.clone()).unwrap_or_default();
                        (stack, within)
                    })
                    .collect(),
            },
            None => match ctx.last() {
                Some(f) => vec![(Vec::new(), f.direct.clone())],
                None => vec![(Vec::new(), (0..self.msg.segments().len()).collect())],
            },
        };
        let mut out = Vec::new();
        for (prefix, within) in bases {
            for inst in self.instances(g, &within, 0) {
                let mut stack = prefix.clone();
                stack.push(inst);
                out.push(stack);
            }
        }
        out
    }

    /// The instances of group `g` among the segments `within` (indexes, in order).
    fn instances(&self, g: usize, within: &[usize], depth: usize) -> Vec<GroupFrame> {
        let Some(plan) = self.mp.groups.get(g) else {
            return Vec::new();
        };
        let segs = self.msg.segments();
        let name = |k: usize| within.get(k).and_then(|i| segs.get(*i)).map(|s| s.name());
        let is = |k: usize, list: &[String]| name(k).is_some_and(|n| list.iter().any(|s| s == n));
        let mut out = Vec::new();
        let mut k = 0;
        let mut floor = 0;
        while k < within.len() {
            if name(k) != Some(plan.begin.as_str()) {
                k += 1;
                continue;
            }
            let mut start = k;
            while start > floor && is(start - 1, &plan.lead) {
                start -= 1;
            }
            let mut end = k + 1;
            while end < within.len()
                && is(end, &plan.extend)
                && name(end) != Some(plan.begin.as_str())
            {
                end += 1;
            }
            let all: Vec<usize> = within[start..end].to_vec();
            let mut nested = vec![false; all.len()];
            if depth <= self.mp.groups.len() {
                for c in &plan.children {
                    for inst in self.instances(*c, &all, depth + 1) {
                        for i in &inst.all {
                            if let Some(pos) = all.iter().position(|x| x == i) {
                                nested[pos] = true;
                            }
                        }
                    }
                }
            }
            let direct = all
                .iter()
                .zip(&nested)
                .filter(|(_, n)| !**n)
                .map(|(i, _)| *i)
                .collect();
            out.push(GroupFrame {
                group: g,
                all,
                direct,
                id: within[k] as u64,
            });
            floor = end;
            k = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn components_agree_with_splitting() {
        use super::RepFrame;
        let seps = crate::hl7::Separators::default();
        let long: String = (1..=30)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("^");
        let raws = [
            "",
            "a",
            "a^b",
            "^^",
            "é^ü^",
            "a&b^c",
            "^x&&y^",
            long.as_str(),
        ];
        for raw in raws {
            let want: Vec<&str> = raw.split('^').collect();
            for c in 0..=want.len() + 2 {
                let expected = c.checked_sub(1).and_then(|i| want.get(i).copied());
                let f = RepFrame::new(raw, 0, 0, 0, None);
                assert_eq!(f.component(&seps, c), expected, "{raw:?} component {c}");
                for s in 1..=3 {
                    let sub = expected.and_then(|comp| comp.split('&').nth(s - 1));
                    // A fresh frame, so `part` is also the read that finds the components.
                    let fresh = RepFrame::new(raw, 0, 0, 0, None);
                    assert_eq!(fresh.part(&seps, c, s), sub, "{raw:?} .{c}.{s}");
                    assert_eq!(f.part(&seps, c, s), sub, "{raw:?} .{c}.{s}, second read");
                }
            }
        }
        // A multi-byte separator.
        let odd = crate::hl7::Separators {
            component: '§',
            ..seps
        };
        let f = RepFrame::new("a§bb§", 0, 0, 0, None);
        assert_eq!(f.component(&odd, 2), Some("bb"));
        assert_eq!(f.component(&odd, 3), Some(""));
        assert_eq!(f.component(&odd, 4), None);
    }

    #[test]
    fn scopes_agree_on_shared_keys_only() {
        use super::compatible;
        assert!(compatible(&[], &[(1, 5)]));
        assert!(compatible(&[(1, 5)], &[(1, 5), (2, 7)]));
        assert!(!compatible(&[(1, 5)], &[(1, 6), (2, 7)]));
        assert!(compatible(&[(3, 1)], &[(1, 6)]));
    }
}
