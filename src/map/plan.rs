//! The compiled form of a mapping set: what runs per message. Built once by
//! [`super::compile`]; no YAML, no path strings and no names are looked at per message (names
//! are resolved to indexes and slots, paths parsed, conversions chosen from the target type).

use std::sync::Arc;

use super::path::{Hl7Path, TargetPath};

/// Every message mapping and value map of a loaded set.
#[derive(Debug, Default)]
pub struct Plan {
    pub messages: Vec<MessagePlan>,
    pub valuemaps: Vec<ValueMap>,
}

#[derive(Debug)]
pub struct MessagePlan {
    pub name: String,
    pub matches: Vec<MatchPattern>,
    /// MSH-12 patterns (`2.4`, `2.5*`); empty: any version.
    pub versions: Vec<String>,
    /// Indexes into `resources`.
    pub focus: Vec<usize>,
    pub sender: Option<usize>,
    pub groups: Vec<GroupPlan>,
    /// Message variables and constants, evaluated once per message, in order.
    pub vars: Vec<VarPlan>,
    pub resources: Vec<ResourcePlan>,
    /// Variable slots needed (message and resource variables).
    pub var_slots: usize,
    /// Names of the segments some path of this mapping reads (sorted): a message's other
    /// segments are reported as not mapped.
    pub read_segments: Vec<String>,
    /// `file:line:column` of the mapping, for `--explain`.
    pub origin: Arc<str>,
}

/// `CODE^TRIGGER^STRUCTURE`, with `*` or absence as a wildcard for trigger and structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchPattern {
    pub code: String,
    pub trigger: Option<String>,
    pub structure: Option<String>,
}

impl MatchPattern {
    /// How specifically this pattern matches (higher wins), or None.
    pub fn score(&self, code: &str, trigger: &str, structure: Option<&str>) -> Option<u8> {
        if !self.code.eq_ignore_ascii_case(code) {
            return None;
        }
        let mut score = 2;
        if let Some(t) = &self.trigger {
            if !t.eq_ignore_ascii_case(trigger) {
                return None;
            }
            score += 4;
        }
        if let Some(s) = &self.structure {
            if !structure.is_some_and(|x| x.eq_ignore_ascii_case(s)) {
                return None;
            }
            score += 8;
        }
        Some(score)
    }
}

/// Whether `version` (MSH-12) matches one of `patterns` (`2.5*` is a prefix), and how
/// specifically: 0 for "any version" (no patterns), 1 for a match.
pub fn version_score(patterns: &[String], version: &str) -> Option<u8> {
    if patterns.is_empty() {
        return Some(0);
    }
    patterns
        .iter()
        .any(|p| match p.strip_suffix('*') {
            Some(prefix) => version.starts_with(prefix),
            None => p == version,
        })
        .then_some(1)
}

/// A segment group of one message mapping.
#[derive(Debug)]
pub struct GroupPlan {
    pub name: String,
    pub parent: Option<usize>,
    pub begin: String,
    pub lead: Vec<String>,
    /// Segments that extend an instance: the declared members plus every segment of the
    /// groups nested in it.
    pub extend: Vec<String>,
    /// Segments this group (or a group nested in it) claims: never read from an outer scope.
    pub owns: Vec<String>,
    /// Groups declared `in:` this one.
    pub children: Vec<usize>,
    pub scope_key: u32,
}

#[derive(Debug)]
pub struct ResourcePlan {
    pub name: String,
    pub resource_type: String,
    pub profile: Option<String>,
    /// `for:` a group (index into the message's groups).
    pub group: Option<usize>,
    /// `each:` a field path, with its scope key.
    pub each: Option<(Hl7Path, u32)>,
    pub when: Option<Cond>,
    pub vars: Vec<VarPlan>,
    pub key: Vec<Operand>,
    /// `map:`: a datatype map's rules building the resource body, applied before `rules`.
    pub body: Option<Arc<Vec<RulePlan>>>,
    pub rules: Vec<RulePlan>,
    /// How many members the resource can have (see [`width`]), with `resourceType`, `id` and
    /// `meta`.
    pub width: usize,
    pub origin: Arc<str>,
}

/// How many members an element built by `rules` can have: the distinct first steps of their
/// targets. Known when the plan is compiled, so each element is allocated once at its size.
pub fn width(rules: &[RulePlan]) -> usize {
    let mut names: Vec<&str> = rules
        .iter()
        .filter_map(|r| r.target.0.first().map(|s| &*s.name))
        .collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

/// The components of the repetition being iterated that `rules` can take message values from,
/// as bits (component `c` is bit `c - 1`), when those are the only message values they can
/// take. An element built by such rules over a repetition whose listed components are all
/// empty receives no message value, so it is left out (unless `always`), and its rules need
/// not run: a CWE's second and third codings (CWE.4-6, CWE.10-12) are empty in nearly every
/// message, and were a sixth of a message's rule runs.
///
/// `None` when skipping could change anything but the dropped element: the rules read an
/// absolute path, a variable or another repetition (`for:`), make a reference, or give a value
/// without the message (`value:`, `default:`) that a lookup or a conversion could make a
/// note about, or that names a site variable (noted when it is not configured). Conditions
/// have no effect but their answer (`--explain`, which records what they read, runs every
/// rule), so they are free to read anything. A conflict between two constant targets of such
/// an element, a mapping defect, is then reported only for messages that fill the element.
pub fn rep_components(rules: &[RulePlan]) -> Option<u64> {
    let mut mask = 0u64;
    for r in rules {
        if r.for_each.is_some() {
            return None;
        }
        match &r.source {
            Source::Ref { .. } => return None,
            Source::Object { needs, .. } => mask |= (*needs)?,
            Source::Scalar(spec) => {
                let reads = match &spec.source {
                    Scalar::Path(p) => component_bit(p)?,
                    Scalar::Var(_) => return None,
                    Scalar::First(ops) | Scalar::Join(ops, _) => {
                        ops.iter().try_fold(0, |m, o| match o {
                            Operand::Path(p) => Some(m | component_bit(p)?),
                            Operand::Var(_) => None,
                        })?
                    }
                    Scalar::Value(t) => template_bits(t)?,
                };
                let without_message =
                    matches!(spec.source, Scalar::Value(_)) || spec.default.is_some();
                if without_message
                    && (spec.lookup.is_some()
                        || !matches!(r.convert, Convert::String | Convert::None))
                {
                    return None;
                }
                if let Some(d) = &spec.default {
                    template_bits(d)?;
                }
                mask |= reads;
            }
        }
    }
    Some(mask)
}

/// The bit of a relative path's component; `None` for any other path.
fn component_bit(p: &Hl7Path) -> Option<u64> {
    match p {
        Hl7Path::Relative { component, .. } if (1..=64).contains(component) => {
            Some(1 << (component - 1))
        }
        _ => None,
    }
}

/// The components a template reads; `None` if it reads anything else or names a site variable.
fn template_bits(t: &Template) -> Option<u64> {
    t.0.iter().try_fold(0, |m, part| match part {
        TplPart::Lit(_) => Some(m),
        TplPart::Var(Var::Site(_)) | TplPart::User(_) => None,
        TplPart::Var(_) => Some(m),
        TplPart::Path(p) => Some(m | component_bit(p)?),
    })
}

/// A variable: a named value computed once per message or resource instance.
#[derive(Debug)]
pub struct VarPlan {
    pub slot: usize,
    pub value: ValueSpec,
}

/// How a scalar value is obtained and shaped.
#[derive(Debug)]
pub struct ValueSpec {
    pub source: Scalar,
    pub functions: Vec<Func>,
    pub lookup: Option<Lookup>,
    pub default: Option<Template>,
    pub when: Option<Cond>,
}

/// A scalar source.
#[derive(Debug)]
pub enum Scalar {
    Path(Hl7Path),
    Var(usize),
    /// The first operand that has a value.
    First(Vec<Operand>),
    Join(Vec<Operand>, String),
    Value(Template),
}

/// Something read from the message or a variable.
#[derive(Debug, Clone)]
pub enum Operand {
    Path(Hl7Path),
    Var(usize),
}

#[derive(Debug)]
pub struct RulePlan {
    pub target: TargetPath,
    pub source: Source,
    pub for_each: Option<Iter>,
    pub when: Option<Cond>,
    pub convert: Convert,
    /// `always: true`: an object is kept even if no message value landed in it.
    pub always: bool,
    /// `file:line:column` of the rule, for `--explain` and runtime errors.
    pub origin: Arc<str>,
}

/// What a rule repeats over.
#[derive(Debug)]
pub enum Iter {
    /// Field repetitions selected by a path; the key names the iteration for references.
    Reps(Hl7Path, u32),
    /// Instances of a group (or of a segment) inside the current scope.
    Group(usize),
}

// Plans are built once per mapping load, not per message: the size of the largest variant costs
// nothing on the message path, while boxing it would add an indirection to every rule run.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Source {
    Scalar(ValueSpec),
    /// A reference to the resource at this index; `all` expands to one element per matching
    /// instance (the target ends in `[+]`).
    Ref {
        resource: usize,
        all: bool,
    },
    /// An element built by `rules`; `width` is how many members it can have (the distinct
    /// first steps of their targets), so it is allocated once rather than grown.
    Object {
        rules: Arc<Vec<RulePlan>>,
        width: usize,
        /// [`rep_components`] of `rules`.
        needs: Option<u64>,
    },
}

/// Translation through a value map, shaped for the target element.
#[derive(Debug, Clone, Copy)]
pub struct Lookup {
    pub map: usize,
    pub shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A bare code.
    Code,
    /// `{system, code, display}`; an untranslated code becomes a coding in the source system.
    Coding,
    /// `{coding: [translated, original]}`.
    CodeableConcept,
}

#[derive(Debug)]
pub enum Cond {
    Test { subject: Operand, test: Test },
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
}

#[derive(Debug)]
pub enum Test {
    Exists(bool),
    Equals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    StartsWith(String),
    NhsNumber {
        valid: bool,
    },
    /// The value has an entry in the value map at this index.
    InMap(usize),
}

/// The fixed function library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Func {
    Trim,
    Upper,
    Lower,
    /// `split(sep, n)`: the n-th part (1-based; negative counts from the end).
    Split(String, i64),
    Prefix(String),
    Suffix(String),
    Replace(String, String),
    /// SHA-256, lower-case hex.
    Hash,
    /// Normalise an NHS number (spaces, hyphens); no value if it fails modulus 11.
    NhsNumber,
    /// The site's local identifier system for a kind (`mrn` -> `<base>/<ODS>/mrn`).
    System,
    /// `lookup(NAME)`: translate through a value map (its default for unknown codes; without
    /// one, no value).
    Lookup(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
    String,
    Date,
    DateTime,
    Instant,
    Time,
    Boolean,
    Integer,
    Decimal,
    NhsNumber,
    /// No conversion: the value is an element built by a lookup or a reference.
    None,
}

/// A constant with `${...}` variables.
#[derive(Debug, Clone)]
pub struct Template(pub Vec<TplPart>);

#[derive(Debug, Clone)]
pub enum TplPart {
    Lit(String),
    Var(Var),
    /// A mapping variable (slot).
    User(usize),
    /// An HL7 path read from the message.
    Path(Hl7Path),
}

impl Template {
    /// The text when the template has no variables at all.
    pub fn literal(&self) -> Option<String> {
        let mut s = String::new();
        for p in &self.0 {
            match p {
                TplPart::Lit(l) => s.push_str(l),
                _ => return None,
            }
        }
        Some(s)
    }
}

/// The built-in variables a `value:` may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// `${site.ods_code}`
    SiteOds,
    /// `${site.appliance_id}`
    ApplianceId,
    /// `${site.identifier_base}`
    IdentifierBase,
    /// `${site.NAME}`: a site variable from the configuration (`[site.variables]`).
    Site(String),
    /// `${system.KIND}`: the site's local identifier system for KIND (`mrn`, `visit-number`, ...).
    System(String),
    /// `${feed}`: the feed's name.
    Feed,
    /// `${message.code}`, `${message.trigger}`, `${message.structure}`, `${message.version}`,
    /// `${message.control_id}`
    MessageCode,
    MessageTrigger,
    MessageStructure,
    MessageVersion,
    MessageControlId,
}

impl Var {
    pub fn parse(s: &str) -> Option<Var> {
        Some(match s {
            "site.ods_code" => Var::SiteOds,
            "site.appliance_id" => Var::ApplianceId,
            "site.identifier_base" => Var::IdentifierBase,
            "feed" => Var::Feed,
            "message.code" => Var::MessageCode,
            "message.trigger" => Var::MessageTrigger,
            "message.structure" => Var::MessageStructure,
            "message.version" => Var::MessageVersion,
            "message.control_id" => Var::MessageControlId,
            _ => {
                let ok = |k: &str| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                };
                if let Some(kind) = s.strip_prefix("system.") {
                    return ok(kind).then(|| Var::System(kind.to_string()));
                }
                let name = s.strip_prefix("site.")?;
                return ok(name).then(|| Var::Site(name.to_string()));
            }
        })
    }
}

#[derive(Debug)]
pub struct ValueMap {
    pub name: String,
    pub system: Option<Template>,
    pub source_system: Option<Template>,
    pub default: Option<String>,
    pub ignore_case: bool,
    /// Codes (upper-cased with `ignore_case`) to their translations.
    pub entries: Table,
    /// Translations to their display names.
    pub display: Table,
}

impl ValueMap {
    /// The translation of `code`, and whether it came from `entries` (not the default).
    pub fn get(&self, code: &str) -> Option<(&str, bool)> {
        let hit = if self.ignore_case {
            self.entries.get_upper(code)
        } else {
            self.entries.get(code)
        };
        match hit {
            Some(v) => Some((v, true)),
            None => self.default.as_deref().map(|d| (d, false)),
        }
    }
}

/// A value map's table: pairs sorted by key, found by binary search. A message looks codes up
/// ~100 times; hashing each with SipHash (after upper-casing it into a new string) cost more.
///
/// The search runs over the keys' first eight bytes as big-endian numbers (zero-padded), whose
/// order is the keys' order, kept in an array of their own: eight keys to a cache line, and no
/// string comparison until the numbers tie. A key of at most eight bytes is then equal to the
/// code when their lengths are (most codes: `M`, `HL70063`, `LN`), so it needs no comparison
/// of its text at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    prefixes: Vec<u64>,
    /// `(key, translation)`, in key order (that of `prefixes`).
    pairs: Vec<(String, String)>,
}

/// The first eight bytes of a key as a big-endian number, zero-padded.
fn prefix(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes
        .take(8)
        .enumerate()
        .fold(0, |p, (i, b)| p | u64::from(b) << (56 - 8 * i))
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.find(key.as_bytes())
    }

    /// The search itself, by bytes (the order of `str`s is that of their bytes), so that an
    /// upper-cased key need not be checked as UTF-8 again.
    fn find(&self, key: &[u8]) -> Option<&str> {
        let p = prefix(key.iter().copied());
        let start = self.prefixes.partition_point(|q| *q < p);
        // The keys that share these eight bytes follow one another (nearly always one at most).
        let same = self.prefixes.get(start..).unwrap_or_default();
        let pairs = self.pairs.get(start..).unwrap_or_default();
        for (q, (k, v)) in same.iter().zip(pairs) {
            if *q != p {
                break;
            }
            if k.len() == key.len() && (key.len() <= 8 || k.as_bytes() == key) {
                return Some(v);
            }
        }
        None
    }

    /// [`Self::get`] of `key` upper-cased (ASCII), for a table whose keys were upper-cased.
    /// A code (nearly always under 32 bytes) is upper-cased on the stack, then looked up as
    /// any key: comparing through a mapping iterator at every step of the search cost more
    /// than the rest of the lookup.
    pub fn get_upper(&self, key: &str) -> Option<&str> {
        let mut buf = [0u8; 32];
        match buf.get_mut(..key.len()) {
            Some(b) => {
                b.copy_from_slice(key.as_bytes());
                b.make_ascii_uppercase();
                self.find(b)
            }
            None => self.get(&key.to_ascii_uppercase()),
        }
    }

    /// The translations, in key order.
    pub fn values(&self) -> impl Iterator<Item = &String> {
        self.pairs.iter().map(|(_, v)| v)
    }
}

/// From unique keys (a map's).
impl FromIterator<(String, String)> for Table {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let mut pairs: Vec<(String, String)> = pairs.into_iter().collect();
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|a, b| a.0 == b.0);
        Table {
            prefixes: pairs.iter().map(|(k, _)| prefix(k.bytes())).collect(),
            pairs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_find_every_key_and_only_those() {
        let t: Table = [
            ("M", "male"),
            ("F", "female"),
            ("U", "unknown"),
            ("MX", "x"),
            ("ABCDEFGHIJ", "1"),
            ("ABCDEFGHIK", "2"),
            ("ABCDEFGH", "3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in [
            ("M", "male"),
            ("F", "female"),
            ("U", "unknown"),
            ("MX", "x"),
            ("ABCDEFGHIJ", "1"),
            ("ABCDEFGHIK", "2"),
            ("ABCDEFGH", "3"),
        ] {
            assert_eq!(t.get(k), Some(v));
            assert_eq!(t.get_upper(&k.to_lowercase()), Some(v));
        }
        for k in [
            "",
            "m",
            "A",
            "Z",
            "MXX",
            "é",
            "M\0",
            "ABCDEFGHI",
            "ABCDEFGHIJK",
            "ABCDEFG",
        ] {
            assert_eq!(t.get(k), None, "{k}");
        }
        assert_eq!(t.get_upper("mxx"), None);
        assert_eq!(t.values().count(), 7);
        // Keys whose zero-padded first eight bytes are the same: told apart by length, then text.
        let t: Table = ["A", "A\0", "A\0B", "AB", "ABCDEFGH\0", "ABCDEFGH"]
            .into_iter()
            .map(|k| (k.to_string(), format!("{k:?}")))
            .collect();
        for k in ["A", "A\0", "A\0B", "AB", "ABCDEFGH\0", "ABCDEFGH"] {
            assert_eq!(t.get(k), Some(format!("{k:?}").as_str()));
        }
        for k in ["A\0\0", "ABCDEFGH\0\0", "B"] {
            assert_eq!(t.get(k), None, "{k:?}");
        }
        // Keys longer than the stack buffer of `get_upper`.
        let long = "LONG-CODE-".repeat(5);
        let t: Table = [(long.clone(), "v".to_string())].into_iter().collect();
        assert_eq!(t.get_upper(&long.to_lowercase()), Some("v"));
        assert_eq!(t.get_upper(&long[..32].to_lowercase()), None);
    }

    /// `(origin, needs)` of every object rule below `rules`.
    fn objects(rules: &[RulePlan], out: &mut Vec<(String, Option<u64>)>) {
        for r in rules {
            if let Source::Object { rules, needs, .. } = &r.source {
                out.push((r.origin.to_string(), *needs));
                objects(rules, out);
            }
        }
    }

    #[test]
    fn elements_that_read_only_their_repetition_list_its_components() {
        let set = crate::map::MappingSet::embedded().expect("shipped mappings");
        let mut all = Vec::new();
        for m in &set.plan.messages {
            for r in &m.resources {
                objects(&r.rules, &mut all);
                if let Some(b) = &r.body {
                    objects(b, &mut all);
                }
            }
        }
        let needs_of = |at: &str| {
            let found: Vec<Option<u64>> = all
                .iter()
                .filter(|(o, _)| o.contains(at))
                .map(|(_, n)| *n)
                .collect();
            assert!(!found.is_empty(), "no object rule at {at}");
            found
        };
        let bits = |cs: &[u32]| cs.iter().fold(0u64, |m, c| m | 1 << (c - 1));
        // CWE's second coding reads CWE.4, .5, .6 and .8 (its system rules read .6; their
        // conditions do not count); the third CWE.10-12.
        assert!(
            needs_of("datatypes/codes.yaml:12:")
                .iter()
                .all(|n| *n == Some(bits(&[4, 5, 6, 8])))
        );
        assert!(
            needs_of("datatypes/codes.yaml:20:")
                .iter()
                .all(|n| *n == Some(bits(&[10, 11, 12])))
        );
        // An encounter location makes a reference: it always runs.
        assert!(
            needs_of("messages/adt.yaml:328:")
                .iter()
                .all(Option::is_none)
        );
    }
}
