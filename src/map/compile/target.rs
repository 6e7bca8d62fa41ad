//! Target paths checked against the FHIR R4 catalogue: every step must be an element of the type
//! being built, lists need an index and single elements must not have one, and the element's
//! type decides which sources and conversions fit.

use super::suggest::suggest;
use crate::map::fhir_model::{Kind, model};
use crate::map::path::{Index, TargetPath};
use crate::map::plan::Convert;

/// What a target path ends at.
#[derive(Debug, Clone, Copy)]
pub struct TargetInfo {
    pub type_name: &'static str,
    pub primitive: bool,
    /// Required codes of a `code` element (empty: any).
    pub codes: &'static [&'static str],
}

/// Follows `path` from the type `base` (a resource, datatype or backbone type). Each step's
/// name becomes the catalogue's own (`'static`) copy of it.
pub fn resolve(base: &str, path: &mut TargetPath) -> Result<TargetInfo, String> {
    let m = model();
    let mut here = m
        .get(base)
        .ok_or_else(|| format!("`{base}` is not a FHIR R4 type"))?;
    let mut shown = base.to_string();
    let count = path.0.len();
    for (i, step) in path.0.iter_mut().enumerate() {
        if here.kind == Kind::Primitive {
            return Err(format!(
                "`{shown}` is of type {} (a single value); it has no element `{}`",
                here.name, step.name
            ));
        }
        let Some(el) = here.element(&step.name) else {
            let names: Vec<&str> = here.elements.iter().map(|e| e.name).collect();
            let hint = suggest(&step.name, &names);
            return Err(format!(
                "`{}` is not an element of {}{hint}",
                step.name,
                display_type(here.name)
            ));
        };
        step.name = std::borrow::Cow::Borrowed(el.name);
        if step.name == "id" && i == 0 && here.kind == Kind::Resource {
            return Err(
                "resource ids are assigned by hl7-edge (deterministic UUIDv5); declare `key:` on the resource to choose what keys the id".into(),
            );
        }
        match (el.list, step.index) {
            (true, Index::None) => {
                return Err(format!(
                    "`{n}` is a list in {t}: write `{n}[0]` (first), `{n}[+]` (a new one) or `{n}[=]` (the last one)",
                    n = step.name,
                    t = display_type(here.name)
                ));
            }
            (false, idx) if idx != Index::None => {
                return Err(format!(
                    "`{n}` is a single element of {t}, not a list: write `{n}` without `[...]`",
                    n = step.name,
                    t = display_type(here.name)
                ));
            }
            _ => {}
        }
        if matches!(el.type_name, "ResourceList" | "Resource") {
            return Err(format!(
                "`{}` holds whole resources; mappings cannot build contained resources",
                step.name
            ));
        }
        let next = m
            .get(el.type_name)
            .ok_or_else(|| format!("`{}` has an unknown type `{}`", step.name, el.type_name))?;
        shown = format!("{}.{}", display_type(here.name), step.name);
        if i + 1 == count {
            return Ok(TargetInfo {
                type_name: next.name,
                primitive: next.kind == Kind::Primitive,
                codes: codes_of(el),
            });
        }
        here = next;
    }
    Err("an empty target path".into())
}

fn codes_of(el: &'static crate::map::fhir_model::Element) -> &'static [&'static str] {
    &el.codes
}

/// `Patient_Contact` -> `Patient.contact`-like wording for messages.
fn display_type(t: &str) -> String {
    match t.split_once('_') {
        Some((a, b)) => {
            let mut c = b.chars();
            let first = c.next().map(|f| f.to_ascii_lowercase().to_string());
            format!("{a}.{}{}", first.unwrap_or_default(), c.as_str())
        }
        None => t.to_string(),
    }
}

/// The conversion a primitive type needs when a rule gives no `as:`.
pub fn inferred_convert(primitive: &str) -> Convert {
    match primitive {
        "date" => Convert::Date,
        "dateTime" => Convert::DateTime,
        "instant" => Convert::Instant,
        "time" => Convert::Time,
        "boolean" => Convert::Boolean,
        "integer" | "positiveInt" | "unsignedInt" => Convert::Integer,
        "decimal" => Convert::Decimal,
        _ => Convert::String,
    }
}

/// Whether an explicit `as:` suits a primitive target type.
pub fn convert_fits(c: Convert, primitive: &str) -> bool {
    let stringy = matches!(
        primitive,
        "string"
            | "code"
            | "id"
            | "uri"
            | "url"
            | "canonical"
            | "markdown"
            | "oid"
            | "uuid"
            | "base64Binary"
            | "xhtml"
    );
    match c {
        Convert::String | Convert::NhsNumber => stringy,
        Convert::Date => matches!(primitive, "date" | "dateTime"),
        Convert::DateTime => primitive == "dateTime",
        Convert::Instant => matches!(primitive, "instant" | "dateTime"),
        Convert::Time => primitive == "time",
        Convert::Boolean => primitive == "boolean",
        Convert::Integer => matches!(
            primitive,
            "integer" | "positiveInt" | "unsignedInt" | "decimal"
        ),
        Convert::Decimal => primitive == "decimal",
        Convert::None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: &str, p: &str) -> Result<TargetInfo, String> {
        resolve(base, &mut TargetPath::parse(p).expect("syntax"))
    }

    #[test]
    fn lists_need_an_index_and_singles_must_not_have_one() {
        assert_eq!(r("Patient", "name[0].family").unwrap().type_name, "string");
        let e = r("Patient", "name.family").unwrap_err();
        assert!(e.contains("`name` is a list in Patient"), "{e}");
        let e = r("Patient", "gender[0]").unwrap_err();
        assert!(e.contains("single element"), "{e}");
        let e = r("Patient", "nmae[0]").unwrap_err();
        assert!(e.contains("did you mean `name`"), "{e}");
        let e = r("Patient", "birthDate.value").unwrap_err();
        assert!(e.contains("no element `value`"), "{e}");
        assert_eq!(
            r("Patient", "contact[+].name.family").unwrap().type_name,
            "string"
        );
        let e = r("Patient", "contact[0].nmae").unwrap_err();
        assert!(e.contains("Patient.contact"), "{e}");
        assert_eq!(
            r("Extension", "valueCodeableConcept.coding[0].code")
                .unwrap()
                .type_name,
            "code"
        );
        assert_eq!(r("Patient", "gender").unwrap().codes.len(), 4);
        assert!(r("Patient", "id").is_err());
    }
}
