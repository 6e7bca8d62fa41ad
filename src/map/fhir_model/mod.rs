//! The FHIR R4 element catalogue that target paths are checked against when mappings load.
//!
//! Why a catalogue of our own: a typo in a target path (`nmae`, `name.family` for a list) must be
//! an error with a position and a suggestion in `hl7-edge check`, not a quarantined message at
//! 3 a.m. fhir-sdk's model only tells us *at run time* that an element was dropped. The catalogue
//! is generated from the FHIR R4 JSON schema by `generate.py` (beside this file) into
//! `r4_elements.txt`, which is compiled into the binary: nothing outside the executable is read.
//!
//! The catalogue knows, for every resource, datatype and backbone element: its elements, whether
//! each is a list, its type, and for `code` elements with a required value set, the codes.

use std::collections::HashMap;
use std::sync::OnceLock;

const TEXT: &str = include_str!("r4_elements.txt");

/// What a type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Resource,
    /// A datatype or a backbone element (`Patient_Contact`).
    Complex,
    Primitive,
}

/// One element of a type.
#[derive(Debug)]
pub struct Element {
    pub name: &'static str,
    pub list: bool,
    pub type_name: &'static str,
    /// Where `type_name` is in the catalogue ([`Model::type_of`]), so walking a tree by type
    /// costs no lookup by name.
    ty: Option<usize>,
    /// The required codes, for `code` elements bound to a required value set.
    pub codes: Vec<&'static str>,
}

#[derive(Debug)]
pub struct TypeDef {
    pub name: &'static str,
    pub kind: Kind,
    pub elements: Vec<Element>,
}

impl TypeDef {
    /// The element `name`. A linear scan: comparing a name rejects on its length first, which
    /// measured cheaper than a binary search's full comparisons (callgrind, the validation bench).
    /// The keys of a mapped Bundle are the catalogue's own strings, so a match is usually the
    /// same pointer, and a miss of the same length usually differs in its first letter: neither
    /// needs a `memcmp` call.
    pub fn element(&self, name: &str) -> Option<&Element> {
        let first = name.as_bytes().first();
        self.elements.iter().find(|e| {
            e.name.len() == name.len()
                && (std::ptr::eq(e.name.as_ptr(), name.as_ptr())
                    || (e.name.as_bytes().first() == first && e.name == name))
        })
    }
}

/// The whole catalogue.
#[derive(Debug)]
pub struct Model {
    defs: Vec<TypeDef>,
    by_name: HashMap<&'static str, usize>,
}

/// The catalogue, parsed on first use.
pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::parse(TEXT))
}

impl Model {
    fn parse(text: &'static str) -> Model {
        let mut defs = Vec::new();
        for line in text.lines() {
            let mut parts = line.split('\t');
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let kind = match kind {
                "R" => Kind::Resource,
                "P" => Kind::Primitive,
                _ => Kind::Complex,
            };
            let elements = parts
                .filter_map(|e| {
                    let (spec, codes) = match e.split_once('=') {
                        Some((s, c)) => (s, c.split('|').collect()),
                        None => (e, Vec::new()),
                    };
                    let (name, list, type_name) = match (spec.find(':'), spec.find('*')) {
                        (Some(i), _) => (&spec[..i], false, &spec[i + 1..]),
                        (None, Some(i)) => (&spec[..i], true, &spec[i + 1..]),
                        _ => return None,
                    };
                    Some(Element {
                        name,
                        list,
                        type_name,
                        ty: None,
                        codes,
                    })
                })
                .collect::<Vec<_>>();
            defs.push(TypeDef {
                name,
                kind,
                elements,
            });
        }
        let by_name: HashMap<&'static str, usize> =
            defs.iter().enumerate().map(|(i, d)| (d.name, i)).collect();
        for d in &mut defs {
            for e in &mut d.elements {
                e.ty = by_name.get(e.type_name).copied();
            }
        }
        Model { defs, by_name }
    }

    pub fn get(&self, name: &str) -> Option<&TypeDef> {
        self.by_name.get(name).map(|&i| &self.defs[i])
    }

    /// The definition of an element's type (`None` for a type the catalogue lacks).
    pub fn type_of(&self, el: &Element) -> Option<&TypeDef> {
        el.ty.and_then(|i| self.defs.get(i))
    }

    pub fn is_resource(&self, name: &str) -> bool {
        self.get(name).is_some_and(|t| t.kind == Kind::Resource)
    }

    /// Every resource type name, sorted (for suggestions).
    pub fn resource_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self
            .defs
            .iter()
            .filter(|t| t.kind == Kind::Resource)
            .map(|t| t.name)
            .collect();
        v.sort_unstable();
        v
    }

    /// Every complex (non-primitive, non-resource) type name, sorted.
    pub fn complex_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self
            .defs
            .iter()
            .filter(|t| t.kind == Kind::Complex && !t.name.contains('_'))
            .map(|t| t.name)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn is_primitive(&self, name: &str) -> bool {
        self.get(name).is_some_and(|t| t.kind == Kind::Primitive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_knows_patient_and_its_lists() {
        let m = model();
        let p = m.get("Patient").expect("Patient");
        assert_eq!(p.kind, Kind::Resource);
        let name = p.element("name").expect("name");
        assert!(name.list);
        assert_eq!(name.type_name, "HumanName");
        let gender = p.element("gender").expect("gender");
        assert!(!gender.list);
        assert_eq!(gender.codes, ["male", "female", "other", "unknown"]);
        assert!(p.element("deceasedDateTime").is_some());
        let hn = m.get("HumanName").expect("HumanName");
        assert!(!hn.element("family").expect("family").list);
        assert!(hn.element("given").expect("given").list);
        assert!(m.is_primitive("dateTime"));
        assert!(m.get("Patient_Contact").is_some());
        assert!(m.resource_names().contains(&"DiagnosticReport"));
        assert!(!m.is_resource("HumanName"));
        assert_eq!(m.type_of(name).map(|t| t.name), Some("HumanName"));
        // Every element of every type is found by name, and every type it names is defined.
        for d in &m.defs {
            for e in &d.elements {
                assert!(std::ptr::eq(d.element(e.name).expect("found"), e));
                // `ResourceList`: any resource, named by the value's `resourceType`.
                assert!(
                    m.type_of(e).is_some() || e.type_name == "ResourceList",
                    "{}.{}: {}",
                    d.name,
                    e.name,
                    e.type_name
                );
            }
        }
    }
}
