//! The compiled form of a mapping set: what runs per message. Built once by
//! [`super::compile`]; no YAML and no path strings are looked at per message.

use std::collections::HashMap;
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
    pub focus: Vec<String>,
    pub sender: Option<String>,
    pub resources: Vec<ResourcePlan>,
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
        let mut score = 1;
        if let Some(t) = &self.trigger {
            if !t.eq_ignore_ascii_case(trigger) {
                return None;
            }
            score += 2;
        }
        if let Some(s) = &self.structure {
            if !structure.is_some_and(|x| x.eq_ignore_ascii_case(s)) {
                return None;
            }
            score += 4;
        }
        Some(score)
    }
}

#[derive(Debug)]
pub struct ResourcePlan {
    pub name: String,
    pub resource_type: String,
    pub profile: Option<String>,
    pub for_each: Option<String>,
    pub when: Vec<Cond>,
    pub rules: Vec<RulePlan>,
}

#[derive(Debug)]
pub struct RulePlan {
    pub target: TargetPath,
    pub source: Source,
    pub for_each: Option<Hl7Path>,
    pub when: Vec<Cond>,
    pub functions: Vec<Func>,
    pub lookup: Option<usize>,
    pub convert: Convert,
    /// `file:line:column` of the rule, for `--explain` and runtime errors.
    pub origin: Arc<str>,
}

#[derive(Debug)]
pub enum Source {
    From(Hl7Path),
    Value(Template),
    Ref(String),
    Object(Arc<Vec<RulePlan>>),
}

#[derive(Debug)]
pub struct Cond {
    pub path: Hl7Path,
    pub test: Test,
}

#[derive(Debug)]
pub enum Test {
    Exists(bool),
    Equals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    NhsNumber { valid: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Trim,
    Upper,
    Lower,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
    String,
    Date,
    DateTime,
    Instant,
    Boolean,
    Integer,
    Decimal,
    NhsNumber,
}

/// A constant with `${...}` variables.
#[derive(Debug, Clone)]
pub struct Template(pub Vec<TplPart>);

#[derive(Debug, Clone)]
pub enum TplPart {
    Lit(String),
    Var(Var),
}

/// The variables a `value:` may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// `${site.ods_code}`
    SiteOds,
    /// `${site.appliance_id}`
    ApplianceId,
    /// `${system.KIND}`: the site's local identifier system for KIND (`mrn`, `visit-number`, ...).
    System(String),
    /// `${feed}`: the feed's name.
    Feed,
    /// `${message.code}`, `${message.trigger}`
    MessageCode,
    MessageTrigger,
}

impl Var {
    pub fn parse(s: &str) -> Option<Var> {
        Some(match s {
            "site.ods_code" => Var::SiteOds,
            "site.appliance_id" => Var::ApplianceId,
            "feed" => Var::Feed,
            "message.code" => Var::MessageCode,
            "message.trigger" => Var::MessageTrigger,
            _ => {
                let kind = s.strip_prefix("system.")?;
                if kind.is_empty()
                    || !kind
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return None;
                }
                Var::System(kind.to_string())
            }
        })
    }
}

#[derive(Debug)]
pub struct ValueMap {
    pub name: String,
    pub default: Option<String>,
    pub ignore_case: bool,
    pub entries: HashMap<String, String>,
}

impl ValueMap {
    pub fn get(&self, code: &str) -> Option<&str> {
        let hit = if self.ignore_case {
            self.entries.get(&code.to_ascii_uppercase())
        } else {
            self.entries.get(code)
        };
        hit.or(self.default.as_ref()).map(String::as_str)
    }
}
