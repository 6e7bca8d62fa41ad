//! The YAML a mapping author writes, as serde types. Positions are kept (`Spanned`) on every
//! string a later check can reject, so errors say `file:line:column`.
//!
//! The reference for authors is `mappings/README.md`; keep the two in step.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// One YAML file. Every section is optional, so a site overlay can hold just the parts it changes.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MappingFile {
    /// Message mappings by name.
    pub messages: BTreeMap<String, MessageMap>,
    /// Reusable datatype maps by name (XPN -> HumanName, CX -> Identifier, ...).
    pub datatypes: BTreeMap<String, DatatypeMap>,
    /// Vocabulary tables by name.
    pub valuemaps: BTreeMap<String, ValueMapDef>,
}

/// A message mapping: which messages it applies to and which resources it produces.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageMap {
    #[serde(default)]
    pub description: Option<String>,
    /// Message types this mapping handles: `ADT^A01`, `ADT^A03^ADT_A02` (with structure),
    /// `ADT^*` (any trigger). The most specific match wins.
    #[serde(rename = "match")]
    pub matches: Vec<Spanned<String>>,
    /// `MessageHeader.focus`: the first of these resources that the message produced.
    #[serde(default)]
    pub focus: Vec<Spanned<String>>,
    /// `MessageHeader.sender`: the resource (an Organization) that sent the message.
    #[serde(default)]
    pub sender: Option<Spanned<String>>,
    pub resources: Vec<ResourceMap>,
}

/// One resource (or one per segment occurrence, with `for`).
#[derive(Debug, Deserialize)]
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
    /// A segment name: one resource per occurrence of that segment.
    #[serde(default, rename = "for")]
    pub for_each: Option<Spanned<String>>,
    /// Conditions for producing the resource at all.
    #[serde(default)]
    pub when: Option<When>,
    pub rules: Vec<Rule>,
}

/// A reusable map from one HL7 datatype instance (a field repetition) to a FHIR element.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatatypeMap {
    #[serde(default)]
    pub description: Option<String>,
    pub rules: Vec<Rule>,
}

/// One assignment to a target element.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The FHIR element path, relative to the resource or element being built:
    /// `gender`, `name[+]`, `identifier[0].system`, `period.start`.
    pub set: Spanned<String>,
    /// Source: an HL7 path (`PID-8`, `PID-3[*]`, `.1` inside a datatype map or `for`).
    #[serde(default)]
    pub from: Option<Spanned<String>>,
    /// Source: a constant, with `${...}` site variables.
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
    /// Repeat this rule for every repetition an HL7 path yields (`PID-3[*]`).
    #[serde(default, rename = "for")]
    pub for_each: Option<Spanned<String>>,
    #[serde(default)]
    pub when: Option<When>,
    /// Functions applied in order to the value: `trim`, `upper`, `lower`.
    #[serde(default, rename = "fn")]
    pub functions: Vec<Spanned<String>>,
    /// Translate the value through a value map.
    #[serde(default)]
    pub lookup: Option<Spanned<String>>,
    /// Convert the value: `string` (default), `date`, `dateTime`, `instant`, `boolean`,
    /// `integer`, `decimal`, `nhs-number`.
    #[serde(default, rename = "as")]
    pub convert: Option<Spanned<String>>,
}

/// Conditions, all of which must hold.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct When {
    /// The HL7 path the other tests look at.
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
    /// `valid` or `invalid`: the value passes (fails) the NHS number modulus 11 check.
    pub nhs_number: Option<Spanned<String>>,
}

/// A vocabulary table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMapDef {
    #[serde(default)]
    pub description: Option<String>,
    /// Used for codes not in `entries`; without it an unknown code yields no value and a warning.
    #[serde(default)]
    pub default: Option<String>,
    /// Match codes ignoring case.
    #[serde(default)]
    pub ignore_case: bool,
    pub entries: BTreeMap<String, String>,
}
