//! Validation before a Bundle is signed and leaves the appliance.
//!
//! Two layers:
//! 1. **FHIR R4 structure**, with fhir-sdk's R4B model (identical to R4 for every resource we
//!    emit): types, required elements, coded values of required bindings. fhir-sdk silently
//!    ignores unknown elements, so the Bundle is also round-tripped through the model and every
//!    element that did not survive is reported as unknown. The Bundle we send is never the
//!    round-tripped one: fhir-sdk keeps decimals as f64 and would turn `1.50` into `1.5`.
//! 2. **London profile rules** that the model cannot express: message Bundle shape, `urn:uuid`
//!    fullUrls matching resource ids, references that resolve inside the Bundle, NHS numbers that
//!    pass modulus 11, and date-times with a time that carry an offset.

use std::collections::HashSet;

use serde_json::Value;

use super::nhs;

/// Every problem found, each with the element path; no patient data.
#[derive(Debug, thiserror::Error)]
#[error("the Bundle is not valid: {}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

/// Validates an unsigned (or signed) Bundle.
pub fn validate(bundle: &Value) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    structural(bundle, &mut problems);
    london(bundle, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid(problems))
    }
}

fn structural(bundle: &Value, problems: &mut Vec<String>) {
    use fhir_sdk::r4b::resources::Bundle;
    match serde_json::from_value::<Bundle>(bundle.clone()) {
        Err(e) => problems.push(format!("FHIR R4 structure: {e}")),
        Ok(model) => match serde_json::to_value(&model) {
            Ok(back) => unknown_elements(bundle, &back, "Bundle", problems),
            Err(e) => problems.push(format!("FHIR R4 structure: cannot re-serialise: {e}")),
        },
    }
}

/// Reports keys of `ours` that are missing from `model` (elements the model does not know).
fn unknown_elements(ours: &Value, model: &Value, path: &str, problems: &mut Vec<String>) {
    match (ours, model) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let here = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => unknown_elements(v, w, &here, problems),
                    None => problems.push(format!("{here} is not an element of FHIR R4")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b.iter()).enumerate() {
                unknown_elements(v, w, &format!("{path}[{i}]"), problems);
            }
        }
        _ => {}
    }
}

fn london(bundle: &Value, problems: &mut Vec<String>) {
    if bundle.get("type").and_then(Value::as_str) != Some("message") {
        problems.push("Bundle.type must be `message`".into());
    }
    let Some(entries) = bundle.get("entry").and_then(Value::as_array) else {
        problems.push("Bundle.entry is missing".into());
        return;
    };
    let first_type = entries
        .first()
        .and_then(|e| e.pointer("/resource/resourceType"))
        .and_then(Value::as_str);
    if first_type != Some("MessageHeader") {
        problems.push("Bundle.entry[0] must be the MessageHeader".into());
    }
    let mut full_urls = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        let full = e.get("fullUrl").and_then(Value::as_str).unwrap_or("");
        let id = e
            .pointer("/resource/id")
            .and_then(Value::as_str)
            .unwrap_or("");
        if full != format!("urn:uuid:{id}") || id.is_empty() {
            problems.push(format!(
                "Bundle.entry[{i}].fullUrl must be urn:uuid:<resource id>"
            ));
        }
        if !full_urls.insert(full.to_string()) {
            problems.push(format!("Bundle.entry[{i}].fullUrl is a duplicate"));
        }
    }
    for (i, e) in entries.iter().enumerate() {
        let Some(res) = e.get("resource") else {
            continue;
        };
        let rtype = res
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let path = format!("Bundle.entry[{i}].resource({rtype})");
        check_tree(res, &path, &full_urls, problems);
        if rtype == "Patient" && res.get("identifier").is_none() {
            problems.push(format!(
                "{path}.identifier: a Patient needs at least one identifier"
            ));
        }
    }
}

/// Walks a resource: references resolve, NHS numbers are valid, date-times carry offsets.
fn check_tree(v: &Value, path: &str, full_urls: &HashSet<String>, problems: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("reference")
                && r.starts_with("urn:uuid:")
                && !full_urls.contains(r)
            {
                problems.push(format!(
                    "{path}.reference does not resolve inside the Bundle"
                ));
            }
            if m.get("system").and_then(Value::as_str) == Some("https://fhir.nhs.uk/Id/nhs-number")
            {
                let ok = m
                    .get("value")
                    .and_then(Value::as_str)
                    .is_some_and(nhs::is_valid_nhs_number);
                if !ok {
                    problems.push(format!(
                        "{path}: an nhs-number identifier fails the modulus 11 check"
                    ));
                }
            }
            for (k, c) in m {
                if let Value::String(s) = c
                    && is_datetime_key(k)
                    && s.len() > 10
                    && !has_offset(s)
                {
                    problems.push(format!(
                        "{path}.{k}: a date-time with a time must carry an offset"
                    ));
                }
                check_tree(c, &format!("{path}.{k}"), full_urls, problems);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                check_tree(c, &format!("{path}[{i}]"), full_urls, problems);
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
