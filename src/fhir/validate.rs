//! Validation before a Bundle is signed and leaves the appliance.
//!
//! Two layers:
//! 1. **FHIR R4 structure**, with fhir-sdk's R4B model (identical to R4 for every resource we
//!    emit), read straight from the Bundle's tree: types, required elements, coded values of
//!    required bindings. fhir-sdk silently ignores unknown elements, so every key is also looked
//!    up in the FHIR R4 element catalogue that mappings are checked against at load time.
//! 2. **London profile rules** that the model cannot express: message Bundle shape, `urn:uuid`
//!    fullUrls matching resource ids, references that resolve inside the Bundle, NHS numbers that
//!    pass modulus 11, and date-times with a time that carry an offset.

use super::nhs;
use super::tree::{Json, Obj};
use crate::map::fhir_model::{Kind, TypeDef, model};

/// Every problem found, each with the element path; no patient data.
#[derive(Debug, thiserror::Error)]
#[error("the Bundle is not valid: {}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

/// Validates an unsigned (or signed) Bundle.
pub fn validate(bundle: &Json) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    structural(bundle, &mut problems);
    london(bundle, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid(problems))
    }
}

fn structural(bundle: &Json, problems: &mut Vec<String>) {
    use fhir_sdk::r4b::resources::Bundle;
    use serde::Deserialize;
    // The model borrows from the tree and is dropped: the Bundle we send is never a
    // re-serialised one (fhir-sdk keeps decimals as f64, `1.50` would become `1.5`).
    //
    // The Bundle's own elements are read without the entries' resources, and each resource
    // is then read as the type its `resourceType` names. Read through the Bundle, every
    // resource would go through fhir-sdk's `Resource` enum, which serde buffers whole before
    // it can look at the tag: a copy of each resource, a third of the validation's cost.
    if let Err(e) = Bundle::deserialize(&without_resources(bundle)) {
        problems.push(format!("FHIR R4 structure: Bundle: {e}"));
    }
    for (i, entry) in bundle
        .get("entry")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(resource) = entry.get("resource")
            && let Err(e) = typed_resource(resource)
        {
            let rtype = resource
                .get("resourceType")
                .and_then(Json::as_str)
                .unwrap_or("?");
            problems.push(format!(
                "FHIR R4 structure: Bundle.entry[{i}].resource({rtype}): {e}"
            ));
        }
    }
    if let Some(def) = model().get("Bundle") {
        let mut path = Path(vec![Seg::Key("Bundle")]);
        unknown_elements(bundle, def, &mut path, problems);
    }
}

/// The Bundle with its entries' `resource`s left out (its other members are small: ids,
/// `fullUrl`s, the signature).
fn without_resources(bundle: &Json) -> Json {
    let Json::Obj(top) = bundle else {
        return bundle.clone();
    };
    let entry = |e: &Json| match e {
        Json::Obj(o) => Json::Obj(Obj::from_unique(
            o.members()
                .iter()
                .filter(|(k, _)| k != "resource")
                .cloned()
                .collect(),
        )),
        other => other.clone(),
    };
    Json::Obj(Obj::from_unique(
        top.members()
            .iter()
            .map(|(k, v)| match v {
                Json::Arr(entries) if k == "entry" => {
                    (k.clone(), Json::Arr(entries.iter().map(entry).collect()))
                }
                _ => (k.clone(), v.clone()),
            })
            .collect(),
    ))
}

/// Reads a resource as the fhir-sdk type its `resourceType` names. The types hl7-edge's
/// mappings and envelope produce are read directly (the model's structs ignore the
/// `resourceType` member, which the match has already checked); any other goes through the
/// `Resource` enum, which also rejects a type FHIR R4 does not have.
fn typed_resource(r: &Json) -> Result<(), serde::de::value::Error> {
    use fhir_sdk::r4b::resources as res;
    use serde::Deserialize;
    macro_rules! by_type {
        ($($t:ident)*) => {
            match r.get("resourceType").and_then(Json::as_str) {
                $(Some(stringify!($t)) => res::$t::deserialize(r).map(drop),)*
                _ => res::Resource::deserialize(r).map(drop),
            }
        };
    }
    by_type!(
        AllergyIntolerance Condition DiagnosticReport Encounter Location MessageHeader
        Observation Organization Patient Practitioner PractitionerRole Provenance
        RelatedPerson ServiceRequest Specimen
    )
}

/// Reports every key of `value` (of FHIR type `type_name`) that is not an element of that type
/// in the FHIR R4 catalogue (`map/fhir_model`, generated from the R4 JSON schema), recursively.
/// fhir-sdk skips unknown elements silently, and an element the exchange would drop is data
/// lost, so this is part of the structural check. Types the catalogue does not know, and
/// values of the wrong JSON kind, are left to fhir-sdk's deserialisation, which reports them.
fn unknown_elements<'a>(
    value: &'a Json,
    def: &TypeDef,
    path: &mut Path<'a>,
    problems: &mut Vec<String>,
) {
    let Json::Obj(map) = value else {
        return;
    };
    for (key, v) in map.iter() {
        if key == "resourceType" && def.kind == Kind::Resource {
            continue;
        }
        // `_birthDate` carries the id/extensions of the primitive `birthDate`.
        let (name, primitive_extension) = match key.strip_prefix('_') {
            Some(n) => (n, true),
            None => (key, false),
        };
        path.0.push(Seg::Key(key));
        match def.element(name) {
            None => problems.push(format!("{path} is not an element of FHIR R4")),
            Some(_) if primitive_extension => {}
            Some(el) => {
                // A contained or entry resource is of the type its `resourceType` names.
                let type_of = |item: &Json| {
                    if el.type_name == "ResourceList" {
                        item.get("resourceType")
                            .and_then(Json::as_str)
                            .and_then(|t| model().get(t))
                    } else {
                        model().type_of(el)
                    }
                    .filter(|t| t.kind != Kind::Primitive)
                };
                match v {
                    Json::Arr(items) => {
                        for (i, item) in items.iter().enumerate() {
                            if let Some(ty) = type_of(item) {
                                path.0.push(Seg::Index(i));
                                unknown_elements(item, ty, path, problems);
                                path.0.pop();
                            }
                        }
                    }
                    _ => {
                        if let Some(ty) = type_of(v) {
                            unknown_elements(v, ty, path, problems);
                        }
                    }
                }
            }
        }
        path.0.pop();
    }
}

/// A JSON location, rendered only when a problem is reported (validation walks every node of
/// every Bundle; building a string per node would cost more than the checks themselves).
struct Path<'a>(Vec<Seg<'a>>);

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
    Resource(usize, &'a str),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Resource(n, t) => write!(f, "Bundle.entry[{n}].resource({t})")?,
            }
        }
        Ok(())
    }
}

fn london(bundle: &Json, problems: &mut Vec<String>) {
    if bundle.get("type").and_then(Json::as_str) != Some("message") {
        problems.push("Bundle.type must be `message`".into());
    }
    let Some(entries) = bundle.get("entry").and_then(Json::as_array) else {
        problems.push("Bundle.entry is missing".into());
        return;
    };
    let first_type = entries
        .first()
        .and_then(|e| e.get("resource")?.get("resourceType"))
        .and_then(Json::as_str);
    if first_type != Some("MessageHeader") {
        problems.push("Bundle.entry[0] must be the MessageHeader".into());
    }
    // Sorted, for the reference checks below (a binary search, no hashing per reference).
    let mut full_urls: Vec<(&str, usize)> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let full = e.get("fullUrl").and_then(Json::as_str).unwrap_or("");
        let id = e
            .get("resource")
            .and_then(|r| r.get("id"))
            .and_then(Json::as_str)
            .unwrap_or("");
        if id.is_empty() || full.strip_prefix("urn:uuid:") != Some(id) {
            problems.push(format!(
                "Bundle.entry[{i}].fullUrl must be urn:uuid:<resource id>"
            ));
        }
        full_urls.push((full, i));
    }
    full_urls.sort_unstable();
    let mut duplicates: Vec<usize> = full_urls
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .collect();
    duplicates.sort_unstable();
    for i in duplicates {
        problems.push(format!("Bundle.entry[{i}].fullUrl is a duplicate"));
    }
    let full_urls = FullUrls(full_urls);
    for (i, e) in entries.iter().enumerate() {
        let Some(res) = e.get("resource") else {
            continue;
        };
        let rtype = res
            .get("resourceType")
            .and_then(Json::as_str)
            .unwrap_or("?");
        let mut path = Path(vec![Seg::Resource(i, rtype)]);
        check_tree(res, &mut path, &full_urls, problems);
        if rtype == "Patient" && res.get("identifier").is_none() {
            problems.push(format!(
                "{path}.identifier: a Patient needs at least one identifier"
            ));
        }
    }
}

/// The Bundle's entry `fullUrl`s, sorted (with their entry index).
struct FullUrls<'a>(Vec<(&'a str, usize)>);

impl FullUrls<'_> {
    fn contains(&self, url: &str) -> bool {
        self.0.binary_search_by(|(u, _)| (*u).cmp(url)).is_ok()
    }
}

/// Walks a resource: references resolve, NHS numbers are valid, date-times carry offsets.
fn check_tree<'a>(
    v: &'a Json,
    path: &mut Path<'a>,
    full_urls: &FullUrls<'_>,
    problems: &mut Vec<String>,
) {
    match v {
        Json::Obj(m) => {
            // One pass over the members (this runs on every object of every Bundle).
            let (mut system, mut value) = (None, None);
            for (k, c) in m.iter() {
                match k {
                    "system" => system = c.as_str(),
                    "value" => value = Some(c),
                    _ => {}
                }
                match (k, c) {
                    ("reference", Json::Str(r))
                        if r.starts_with("urn:uuid:") && !full_urls.contains(r) =>
                    {
                        problems.push(format!(
                            "{path}.reference does not resolve inside the Bundle"
                        ));
                    }
                    (_, Json::Str(s)) if is_datetime_key(k) && s.len() > 10 && !has_offset(s) => {
                        problems.push(format!(
                            "{path}.{k}: a date-time with a time must carry an offset"
                        ));
                    }
                    (_, Json::Obj(_) | Json::Arr(_)) => {
                        path.0.push(Seg::Key(k));
                        check_tree(c, path, full_urls, problems);
                        path.0.pop();
                    }
                    _ => {}
                }
            }
            if system == Some("https://fhir.nhs.uk/Id/nhs-number")
                && !value
                    .and_then(Json::as_str)
                    .is_some_and(nhs::is_valid_nhs_number)
            {
                problems.push(format!(
                    "{path}: an nhs-number identifier fails the modulus 11 check"
                ));
            }
        }
        Json::Arr(a) => {
            for (i, c) in a.iter().enumerate() {
                path.0.push(Seg::Index(i));
                check_tree(c, path, full_urls, problems);
                path.0.pop();
            }
        }
        _ => {}
    }
}

fn is_datetime_key(k: &str) -> bool {
    matches!(
        k,
        "start"
            | "end"
            | "timestamp"
            | "recorded"
            | "when"
            | "effectiveDateTime"
            | "issued"
            | "deceasedDateTime"
            | "onsetDateTime"
            | "authoredOn"
    )
}

fn has_offset(s: &str) -> bool {
    // After the time: `Z`, or `+hh:mm` / `-hh:mm`.
    let Some(t) = s.find('T') else { return true };
    let time = &s[t..];
    time.ends_with('Z') || time.contains('+') || time.contains('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn bundle(resources: Vec<Value>) -> Value {
        let mut entries = vec![json!({
            "fullUrl": "urn:uuid:00000000-0000-5000-8000-000000000001",
            "resource": {
                "resourceType": "MessageHeader",
                "id": "00000000-0000-5000-8000-000000000001",
                "eventCoding": { "system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": "A01" },
                "source": { "endpoint": "https://example.org/device/1" }
            }
        })];
        for (i, r) in resources.into_iter().enumerate() {
            let id = format!("00000000-0000-5000-8000-00000000001{i}");
            let mut r = r;
            r["id"] = Value::String(id.clone());
            entries.push(json!({ "fullUrl": format!("urn:uuid:{id}"), "resource": r }));
        }
        json!({ "resourceType": "Bundle", "type": "message", "entry": entries })
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "identifier": [ { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9449305552" } ],
            "birthDate": "1980-01-01"
        })
    }

    #[test]
    fn decimals_with_trailing_zeros_pass_and_a_wrong_type_still_fails() {
        // `4.20` and `0.27` as sent (arbitrary precision), in a Range and a Quantity.
        let decimals: Value = serde_json::from_str(
            r#"{"resourceType":"Observation","status":"final","code":{"text":"WBC"},
                "valueQuantity":{"value":11.50,"unit":"10*9/L"},
                "referenceRange":[{"low":{"value":0.27},"high":{"value":4.20}}]}"#,
        )
        .expect("JSON");
        validate(&Json::from(bundle(vec![patient(), decimals.clone()]))).expect("valid decimals");
        let mut wrong = decimals;
        wrong["referenceRange"][0]["high"]["value"] = json!("4.20");
        assert!(validate(&Json::from(bundle(vec![patient(), wrong]))).is_err());
    }

    #[test]
    fn full_urls_must_match_ids_and_be_unique() {
        let mut b = bundle(vec![patient(), patient(), patient()]);
        // entry 2 repeats entry 1's fullUrl (and so no longer matches its own id); entry 3
        // points at another id.
        b["entry"][2]["fullUrl"] = b["entry"][1]["fullUrl"].clone();
        b["entry"][3]["fullUrl"] = json!("urn:uuid:00000000-0000-5000-8000-0000000000ff");
        let err = validate(&Json::from(b)).expect_err("bad fullUrls");
        let text = err.to_string();
        assert!(
            text.contains("Bundle.entry[2].fullUrl is a duplicate"),
            "{text}"
        );
        assert!(
            !text.contains("Bundle.entry[1].fullUrl is a duplicate"),
            "{text}"
        );
        for i in [2, 3] {
            assert!(
                text.contains(&format!(
                    "Bundle.entry[{i}].fullUrl must be urn:uuid:<resource id>"
                )),
                "{text}"
            );
        }
        assert!(!text.contains("Bundle.entry[1].fullUrl must"), "{text}");
    }

    #[test]
    fn a_minimal_valid_bundle_passes() {
        validate(&Json::from(bundle(vec![patient()]))).expect("valid");
    }

    #[test]
    fn an_unknown_element_is_reported_with_its_path() {
        let mut p = patient();
        p["nmae"] = json!([ { "family": "X" } ]);
        let err = validate(&Json::from(bundle(vec![p]))).expect_err("unknown element");
        assert!(
            err.0
                .iter()
                .any(|e| e.contains("Bundle.entry[1].resource.nmae is not an element")),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_type_fails_the_structural_check() {
        let mut p = patient();
        p["birthDate"] = json!(19800101);
        let err = validate(&Json::from(bundle(vec![p]))).expect_err("wrong type");
        assert!(
            err.0
                .iter()
                .any(|e| e.starts_with("FHIR R4 structure: Bundle.entry[1].resource(Patient): ")),
            "{err}"
        );
    }

    #[test]
    fn the_bundle_itself_and_every_kind_of_resource_are_read_by_the_model() {
        // The Bundle's own elements, read without its resources.
        let mut b = bundle(vec![patient()]);
        b["type"] = json!(5);
        let err = validate(&Json::from(b)).expect_err("wrong Bundle.type");
        assert!(
            err.0
                .iter()
                .any(|e| e.starts_with("FHIR R4 structure: Bundle: ")),
            "{err}"
        );
        // A resource type outside the directly read list goes through the model's enum:
        // valid passes, a missing required element and an unknown type do not.
        let basic = json!({ "resourceType": "Basic", "code": { "text": "note" } });
        validate(&Json::from(bundle(vec![patient(), basic]))).expect("valid Basic");
        let no_code = json!({ "resourceType": "Basic" });
        let err = validate(&Json::from(bundle(vec![patient(), no_code]))).expect_err("no code");
        assert!(
            err.0
                .iter()
                .any(|e| e.starts_with("FHIR R4 structure: Bundle.entry[2].resource(Basic): ")),
            "{err}"
        );
        let unknown = json!({ "resourceType": "Frobnication" });
        let err = validate(&Json::from(bundle(vec![patient(), unknown]))).expect_err("unknown");
        assert!(
            err.0.iter().any(|e| e.contains("resource(Frobnication)")),
            "{err}"
        );
        // A directly read type still needs its required elements (Observation.status).
        let obs = json!({ "resourceType": "Observation", "code": { "text": "x" } });
        let err = validate(&Json::from(bundle(vec![patient(), obs]))).expect_err("no status");
        assert!(
            err.0
                .iter()
                .any(|e| e.contains("resource(Observation)") && e.contains("status")),
            "{err}"
        );
    }

    #[test]
    fn profile_rules_report_every_problem() {
        let mut p = patient();
        p["identifier"][0]["value"] = json!("9449305553");
        p["generalPractitioner"] =
            json!([ { "reference": "urn:uuid:00000000-0000-5000-8000-00000000ffff" } ]);
        p["deceasedDateTime"] = json!("2026-01-01T10:00:00");
        let err = validate(&Json::from(bundle(vec![p]))).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("modulus 11"), "{text}");
        assert!(
            text.contains("generalPractitioner[0].reference does not resolve"),
            "{text}"
        );
        assert!(
            text.contains("deceasedDateTime: a date-time with a time must carry an offset"),
            "{text}"
        );
    }
}
