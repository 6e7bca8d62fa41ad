//! The YAML a mapping author writes, as serde types. Positions are kept (`Spanned`) on every
//! string a later check can reject, so errors say `file:line:column`.
//!
//! Every item that can travel between files (a rule or resource added by a site overlay) records
//! the file it was written in (`file`, filled in after parsing), so an error in an overlaid rule
//! names the overlay, not the base file.
//!
//! The reference for authors is `mappings/README.md`; keep the two in step.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// One YAML file. Every section is optional, so a site overlay can hold just the parts it changes.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct MappingFile {
    /// Message mappings by name.
    pub messages: BTreeMap<String, MessageMap>,
    /// Reusable datatype maps by name (XPN -> HumanName, CX -> Identifier, ...).
    pub datatypes: BTreeMap<String, DatatypeMap>,
    /// Vocabulary tables by name.
    pub valuemaps: BTreeMap<String, ValueMapDef>,
    /// Changes to definitions made elsewhere (a site's changes to the shipped set).
    pub overlays: Vec<Overlay>,
    /// The file this was read from (not YAML).
    #[serde(skip)]
    pub file: Arc<str>,
}

/// A message mapping: which messages it applies to and which resources it produces.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MessageMap {
    #[serde(default)]
    pub description: Option<String>,
    /// Message types this mapping handles: `ADT^A01`, `ADT^A03^ADT_A02` (with structure),
    /// `ADT^*` (any trigger). The most specific match wins.
    #[serde(rename = "match")]
    pub matches: Vec<Spanned<String>>,
    /// HL7 versions (MSH-12) this mapping is for: `2.4`, `2.5.1`, `2.5*` (prefix). Empty: any.
    #[serde(default)]
    pub versions: Vec<Spanned<String>>,
    /// `MessageHeader.focus`: the first of these resources that the message produced.
    #[serde(default)]
    pub focus: Vec<Spanned<String>>,
    /// `MessageHeader.sender`: the resource (an Organization) that sent the message.
    #[serde(default)]
    pub sender: Option<Spanned<String>>,
    /// Named constants, `${name}` in values.
    #[serde(default)]
    pub constants: BTreeMap<String, Spanned<String>>,
    /// Named values read once per message, `$name` in `from:`/`when:`, `${name}` in values.
    #[serde(default)]
    pub vars: BTreeMap<String, VarDef>,
    /// Segment groups (`order`: each OBR with its ORC, NTE, OBX ...), for `for:`.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupDef>,
    pub resources: Vec<ResourceMap>,
    #[serde(skip)]
    pub file: Arc<str>,
}

/// A segment group: instances start at a `begin` segment and run over the `members` that follow.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    /// The segment that starts an instance (`OBR`).
    pub begin: Spanned<String>,
    /// Segments right before `begin` that belong to its instance (`ORC` before `OBR`).
    #[serde(default)]
    pub lead: Vec<Spanned<String>>,
    /// Segments after `begin` that belong to the instance, in any order (`NTE`, `OBX`, `SPM`).
    #[serde(default)]
    pub members: Vec<Spanned<String>>,
    /// The enclosing group: instances are looked for inside each instance of that group.
    #[serde(default, rename = "in")]
    pub parent: Option<Spanned<String>>,
}

/// One resource (or one per group instance with `for`, or per field repetition with `each`).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ResourceMap {
    /// Local name, used by `ref:` and `focus:`.
    pub name: Spanned<String>,
    /// FHIR resource type (`Patient`, `Encounter`, ...).
    #[serde(rename = "type")]
    pub resource_type: Spanned<String>,
    /// `meta.profile` (UK Core StructureDefinition URL).
    #[serde(default)]
    pub profile: Option<String>,
    /// A segment (`NK1`) or group name (`order`): one resource per occurrence.
    #[serde(default, rename = "for")]
    pub for_each: Option<Spanned<String>>,
    /// A field path (`PV1-7[*]`): one resource per repetition; `.1` paths read it.
    #[serde(default)]
    pub each: Option<Spanned<String>>,
    /// A datatype map building the resource body (with `each`: `XCN` -> `Practitioner`).
    #[serde(default)]
    pub map: Option<Spanned<String>>,
    /// Conditions for producing the resource at all.
    #[serde(default)]
    pub when: Option<When>,
    /// The fields whose values key the resource's id (default: its first identifier).
    #[serde(default)]
    pub key: Vec<Spanned<String>>,
    /// Named values read once per resource.
    #[serde(default)]
    pub vars: BTreeMap<String, VarDef>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(skip)]
    pub file: Arc<str>,
}

/// A reusable map from one HL7 datatype instance (a field repetition) to a FHIR element.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DatatypeMap {
    #[serde(default)]
    pub description: Option<String>,
    /// The FHIR type it builds (`HumanName`, `Identifier`, or a resource type such as
    /// `Practitioner`); the rules' targets are checked against it.
    #[serde(rename = "type")]
    pub fhir_type: Spanned<String>,
    pub rules: Vec<Rule>,
    #[serde(skip)]
    pub file: Arc<str>,
}

/// One assignment to a target element.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A name for site overlays to `replace` or `remove` this rule by.
    #[serde(default)]
    pub id: Option<Spanned<String>>,
    /// The FHIR element path, relative to the resource or element being built:
    /// `gender`, `name[+]`, `identifier[0].system`, `period.start`.
    pub set: Spanned<String>,
    /// Source: an HL7 path (`PID-8`, `PID-3[*]`, `.1` inside a datatype map or `for`), or `$var`.
    #[serde(default)]
    pub from: Option<Spanned<String>>,
    /// Source: the first of several HL7 paths or `$vars` that has a value (`[EVN-6, EVN-2]`).
    #[serde(default)]
    pub first: Option<Vec<Spanned<String>>>,
    /// Source: several HL7 paths or `$vars`, joined by `sep` (absent ones skipped).
    #[serde(default)]
    pub join: Option<Vec<Spanned<String>>>,
    /// Separator for `join` (default one space).
    #[serde(default)]
    pub sep: Option<String>,
    /// Source: a constant, with `${...}` variables.
    #[serde(default)]
    pub value: Option<Spanned<String>>,
    /// Source: a reference to another resource of the Bundle, by local name.
    #[serde(default, rename = "ref")]
    pub reference: Option<Spanned<String>>,
    /// Build an element with nested rules.
    #[serde(default)]
    pub object: Option<Vec<Rule>>,
    /// Build an element with a datatype map.
    #[serde(default)]
    pub map: Option<Spanned<String>>,
    /// Repeat this rule for every repetition an HL7 path yields (`PID-3[*]`), or for every
    /// occurrence of a segment or group (`NK1`).
    #[serde(default, rename = "for")]
    pub for_each: Option<Spanned<String>>,
    #[serde(default)]
    pub when: Option<When>,
    /// Functions applied in order to the value: `trim`, `upper`, `split(',', 1)`, ...
    #[serde(default, rename = "fn")]
    pub functions: Vec<Spanned<String>>,
    /// Translate the value through a value map.
    #[serde(default)]
    pub lookup: Option<Spanned<String>>,
    /// Convert the value (default: from the target element's type).
    #[serde(default, rename = "as")]
    pub convert: Option<Spanned<String>>,
    /// A constant used when the source has no value (it does not count as message data).
    #[serde(default)]
    pub default: Option<Spanned<String>>,
    /// Emit this `object:` element even when only constants landed in it (a fixed coding).
    #[serde(default)]
    pub always: bool,
    #[serde(skip)]
    pub file: Arc<str>,
}

/// A named value: a message or resource variable.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct VarDef {
    #[serde(default)]
    pub from: Option<Spanned<String>>,
    #[serde(default)]
    pub first: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub join: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub sep: Option<String>,
    #[serde(default)]
    pub value: Option<Spanned<String>>,
    #[serde(default, rename = "fn")]
    pub functions: Vec<Spanned<String>>,
    #[serde(default)]
    pub lookup: Option<Spanned<String>>,
    #[serde(default)]
    pub default: Option<Spanned<String>>,
    #[serde(default)]
    pub when: Option<When>,
}

/// Conditions, all of which must hold.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct When {
    /// The HL7 path (or `$var`) the other tests look at.
    pub path: Option<Spanned<String>>,
    /// The path has (true) or lacks (false) a value.
    pub exists: Option<bool>,
    /// The value equals this text.
    pub equals: Option<String>,
    /// The value is one of these.
    #[serde(rename = "in")]
    pub one_of: Option<Vec<String>>,
    /// The value is none of these (an absent value passes).
    pub not_in: Option<Vec<String>>,
    /// The value starts with this text.
    pub starts_with: Option<String>,
    /// `valid` or `invalid`: the value passes (fails) the NHS number modulus 11 check.
    pub nhs_number: Option<Spanned<String>>,
    /// The value has an entry in this value map.
    pub in_map: Option<Spanned<String>>,
    /// At least one of these holds.
    pub any: Option<Vec<When>>,
    /// Every one of these holds.
    pub all: Option<Vec<When>>,
    /// This does not hold.
    pub not: Option<Box<When>>,
}

/// A vocabulary table.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ValueMapDef {
    #[serde(default)]
    pub description: Option<String>,
    /// The code system of the translated codes (for `Coding`/`CodeableConcept` targets).
    #[serde(default)]
    pub system: Option<Spanned<String>>,
    /// The code system of the original codes: the original is then kept as an extra coding
    /// (for `CodeableConcept` targets) or used when a code has no translation (`Coding`).
    /// May use `${system.kind}`.
    #[serde(default)]
    pub source_system: Option<Spanned<String>>,
    /// Used for codes not in `entries`; without it an unknown code yields no value and a warning.
    #[serde(default)]
    pub default: Option<Spanned<String>>,
    /// Match codes ignoring case.
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub entries: BTreeMap<String, String>,
    /// Display texts of translated codes.
    #[serde(default)]
    pub display: BTreeMap<String, String>,
    /// A CSV file (relative to this YAML file) with columns `source,target[,display]`.
    #[serde(default)]
    pub csv: Option<Spanned<String>>,
}

/// A change to a definition made in another file (a site overlay).
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Overlay {
    /// The message mapping changed.
    pub message: Option<Spanned<String>>,
    /// The datatype map changed.
    pub datatype: Option<Spanned<String>>,
    /// The value map changed.
    pub valuemap: Option<Spanned<String>>,

    // --- messages ---
    #[serde(rename = "match")]
    pub matches: Option<Vec<Spanned<String>>>,
    pub versions: Option<Vec<Spanned<String>>>,
    pub focus: Option<Vec<Spanned<String>>>,
    pub sender: Option<Spanned<String>>,
    pub constants: BTreeMap<String, Spanned<String>>,
    pub vars: BTreeMap<String, VarDef>,
    pub groups: BTreeMap<String, GroupDef>,
    /// Changes to resources of the mapping, by name.
    pub resources: Vec<ResourceOverlay>,
    /// New resources, produced after the base mapping's.
    pub add: Vec<ResourceMap>,
    /// Resources (by name) no longer produced.
    pub remove: Vec<Spanned<String>>,

    // --- datatypes (and `rules`/`replace`/`remove_rules` also for resources) ---
    /// Rules appended (later rules overwrite single elements set earlier).
    pub rules: Vec<Rule>,
    /// Rules replaced, by `id`.
    pub replace: Vec<Rule>,
    /// Rules removed, by `id`.
    pub remove_rules: Vec<Spanned<String>>,

    // --- value maps ---
    /// Entries added or changed.
    pub entries: BTreeMap<String, String>,
    /// Codes removed.
    pub remove_entries: Vec<String>,
    pub display: BTreeMap<String, String>,
    pub default: Option<Spanned<String>>,
    pub system: Option<Spanned<String>>,
    pub source_system: Option<Spanned<String>>,
    #[serde(skip)]
    pub file: Arc<str>,
}

/// Changes to one resource of a message mapping.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ResourceOverlay {
    pub name: Spanned<String>,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub when: Option<When>,
    #[serde(default)]
    pub key: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub vars: BTreeMap<String, VarDef>,
    /// Rules appended.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Rules replaced, by `id`.
    #[serde(default)]
    pub replace: Vec<Rule>,
    /// Rules removed, by `id`.
    #[serde(default)]
    pub remove_rules: Vec<Spanned<String>>,
}

/// Records `file` on everything parsed from it.
pub fn stamp(f: &mut MappingFile, file: &Arc<str>) {
    f.file = file.clone();
    for m in f.messages.values_mut() {
        m.file = file.clone();
        for r in &mut m.resources {
            stamp_resource(r, file);
        }
    }
    for d in f.datatypes.values_mut() {
        d.file = file.clone();
        stamp_rules(&mut d.rules, file);
    }
    for o in &mut f.overlays {
        o.file = file.clone();
        for r in &mut o.add {
            stamp_resource(r, file);
        }
        stamp_rules(&mut o.rules, file);
        stamp_rules(&mut o.replace, file);
        for ro in &mut o.resources {
            stamp_rules(&mut ro.rules, file);
            stamp_rules(&mut ro.replace, file);
        }
    }
}

fn stamp_resource(r: &mut ResourceMap, file: &Arc<str>) {
    r.file = file.clone();
    stamp_rules(&mut r.rules, file);
}

fn stamp_rules(rules: &mut [Rule], file: &Arc<str>) {
    for r in rules {
        r.file = file.clone();
        if let Some(children) = &mut r.object {
            stamp_rules(children, file);
        }
    }
}
