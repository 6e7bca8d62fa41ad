//! The London overlay: minimums stricter than UK Core, checked on every Bundle before it is signed
//! (see `../shared/docs/london-profile.md`, "Minimums of the London overlay").
//!
//! Each minimum can be relaxed per site (`[profile]` in the configuration), because a trust's PAS
//! may simply not hold, say, a verified NHS number for every registration; relaxing is an explicit,
//! reviewed decision, not a silent default. A Bundle that misses a minimum is quarantined with the
//! list of what is missing (element paths only, never values).

use super::tree::Json;
use serde::{Deserialize, Serialize};

const NHS_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const VERIFICATION_URL: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus";
const ODS_ORG: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const UK_CORE: &str = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-";

/// Which London minimums apply (all by default).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Patient: a valid NHS number identifier carrying the verification-status extension.
    pub patient_nhs_number: bool,
    /// Patient: an identifier of type MR (the local MRN).
    pub patient_mrn: bool,
    /// Patient: an `official` name with family and given.
    pub patient_name: bool,
    /// Patient: `gender` and `birthDate`.
    pub patient_gender_birth_date: bool,
    /// Patient: a current address with `postalCode`.
    pub patient_address: bool,
    /// Encounter: identifier, status, class, subject, period.start, serviceProvider.
    pub encounter_minimums: bool,
    /// Every resource with a UK Core profile declares it in `meta.profile`.
    pub uk_core_profiles: bool,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            patient_nhs_number: true,
            patient_mrn: true,
            patient_name: true,
            patient_gender_birth_date: true,
            patient_address: true,
            encounter_minimums: true,
            uk_core_profiles: true,
        }
    }
}

/// UK Core profiles for the resource types the London profile expects them on.
const PROFILED: &[&str] = &[
    "AllergyIntolerance",
    "Condition",
    "DiagnosticReport",
    "Encounter",
    "Location",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
    "ServiceRequest",
    "Specimen",
];

/// Checks the Bundle's resources against the configured minimums; returns every miss.
pub fn check(bundle: &Json, cfg: &ProfileConfig) -> Vec<String> {
    let mut misses = Vec::new();
    let Some(entries) = bundle.get("entry").and_then(Json::as_array) else {
        return misses;
    };
    for (i, e) in entries.iter().enumerate() {
        let Some(r) = e.get("resource") else { continue };
        let rtype = r.get("resourceType").and_then(Json::as_str).unwrap_or("");
        let at = At { entry: i, rtype };
        if cfg.uk_core_profiles && PROFILED.contains(&rtype) {
            let suffixes = match profile_suffixes(rtype) {
                [] => std::slice::from_ref(&rtype),
                s => s,
            };
            let has = r
                .pointer("/meta/profile")
                .and_then(Json::as_array)
                .is_some_and(|p| {
                    p.iter().filter_map(Json::as_str).any(|p| {
                        p.strip_prefix(UK_CORE)
                            .is_some_and(|s| suffixes.contains(&s))
                    })
                });
            if !has {
                let wanted: Vec<String> =
                    suffixes.iter().map(|s| format!("{UK_CORE}{s}")).collect();
                misses.push(format!(
                    "{at}.meta.profile must include {}",
                    wanted.join(" or ")
                ));
            }
        }
        match rtype {
            "Patient" => patient(r, &at, cfg, &mut misses),
            "Encounter" if cfg.encounter_minimums => encounter(r, &at, &mut misses),
            "Organization" => {
                let ods =
                    identifiers(r).any(|i| i.get("system").and_then(Json::as_str) == Some(ODS_ORG));
                let named = r.get("name").is_some();
                if !ods && !named {
                    misses.push(format!("{at}: an Organization needs an ODS code or a name"));
                }
            }
            _ => {}
        }
    }
    misses
}

/// Where a miss is, `Bundle.entry[i].resource(Type)`: formatted only when there is one (the
/// Bundle is checked for every message, and most have none).
struct At<'a> {
    entry: usize,
    rtype: &'a str,
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bundle.entry[{}].resource({})", self.entry, self.rtype)
    }
}

/// The UK Core profiles a resource type may declare (any one of them will do), where they are
/// not simply `UKCore-<type>` (an empty list).
fn profile_suffixes(rtype: &str) -> &'static [&'static str] {
    match rtype {
        "DiagnosticReport" => &["DiagnosticReport-Lab"],
        // A lab result (ORU) is UKCore-Observation-Lab; an observation sent with an ADT event
        // (height, weight, an admission question) is a plain UKCore-Observation.
        "Observation" => &["Observation-Lab", "Observation"],
        _ => &[],
    }
}

/// A Patient record retired by a merge (A34/A40): `active` false and a `replaced-by` link. It
/// carries only what MRG says about the old record (its identifiers), not the person's
/// demographics or a verification status of the old number.
fn retired(r: &Json) -> bool {
    r.get("active").and_then(Json::as_bool) == Some(false)
        && r.get("link").and_then(Json::as_array).is_some_and(|l| {
            l.iter()
                .any(|l| l.get("type").and_then(Json::as_str) == Some("replaced-by"))
        })
}

fn identifiers(r: &Json) -> impl Iterator<Item = &Json> {
    r.get("identifier")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
}

fn patient(r: &Json, at: &At<'_>, cfg: &ProfileConfig, misses: &mut Vec<String>) {
    if retired(r) {
        // The minimums are about the live record; a retired one must only say which record it was.
        let named = identifiers(r).any(|i| {
            i.get("system").and_then(Json::as_str) == Some(NHS_SYSTEM)
                || i.pointer("/type/coding")
                    .and_then(Json::as_array)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.get("code").and_then(Json::as_str) == Some("MR"))
                    })
        });
        if (cfg.patient_nhs_number || cfg.patient_mrn) && !named {
            misses.push(format!(
                "{at}.identifier: a retired (merged) Patient needs its NHS number or MRN (MRG)"
            ));
        }
        return;
    }
    if cfg.patient_nhs_number {
        let nhs =
            identifiers(r).find(|i| i.get("system").and_then(Json::as_str) == Some(NHS_SYSTEM));
        match nhs {
            None => misses.push(format!("{at}.identifier: no valid NHS number")),
            Some(i) => {
                let verified = i
                    .get("extension")
                    .and_then(Json::as_array)
                    .is_some_and(|x| {
                        x.iter()
                            .any(|e| e.get("url").and_then(Json::as_str) == Some(VERIFICATION_URL))
                    });
                if !verified {
                    misses.push(format!(
                        "{at}.identifier(nhs-number): no NHS number verification status (PID-32)"
                    ));
                }
            }
        }
    }
    if cfg.patient_mrn {
        let mrn = identifiers(r).any(|i| {
            i.pointer("/type/coding")
                .and_then(Json::as_array)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.get("code").and_then(Json::as_str) == Some("MR"))
                })
        });
        if !mrn {
            misses.push(format!("{at}.identifier: no MRN (type MR)"));
        }
    }
    if cfg.patient_name {
        let ok = r.get("name").and_then(Json::as_array).is_some_and(|names| {
            names.iter().any(|n| {
                n.get("use").and_then(Json::as_str) == Some("official")
                    && n.get("family").is_some()
                    && n.get("given").is_some()
            })
        });
        if !ok {
            misses.push(format!("{at}.name: no official name with family and given"));
        }
    }
    if cfg.patient_gender_birth_date {
        for el in ["gender", "birthDate"] {
            if r.get(el).is_none() {
                misses.push(format!("{at}.{el} is missing"));
            }
        }
    }
    if cfg.patient_address {
        let ok = r.get("address").and_then(Json::as_array).is_some_and(|a| {
            a.iter().any(|a| {
                a.get("postalCode").is_some()
                    && !matches!(a.get("use").and_then(Json::as_str), Some("old" | "temp"))
                    && a.pointer("/period/end").is_none()
            })
        });
        if !ok {
            misses.push(format!(
                "{at}.address: no current address with a postalCode"
            ));
        }
    }
}

fn encounter(r: &Json, at: &At<'_>, misses: &mut Vec<String>) {
    for el in [
        "identifier",
        "status",
        "class",
        "subject",
        "serviceProvider",
    ] {
        if r.get(el).is_none() {
            misses.push(format!("{at}.{el} is missing"));
        }
    }
    if r.pointer("/period/start").is_none() {
        misses.push(format!("{at}.period.start is missing (PV1-44 or EVN-2)"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn bundle(patient: Value) -> Value {
        json!({ "resourceType": "Bundle", "type": "message", "entry": [ { "resource": patient } ] })
    }

    fn tree(patient: Value) -> Json {
        Json::from(bundle(patient))
    }

    fn good_patient() -> Value {
        json!({
            "resourceType": "Patient",
            "meta": { "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"] },
            "identifier": [
                { "system": NHS_SYSTEM, "value": "9449305552", "extension": [ { "url": VERIFICATION_URL } ] },
                { "type": { "coding": [ { "code": "MR" } ] }, "system": "x", "value": "1" }
            ],
            "name": [ { "use": "official", "family": "A", "given": ["B"] } ],
            "gender": "female", "birthDate": "1980-01-01",
            "address": [ { "postalCode": "NW1 2BU" } ]
        })
    }

    #[test]
    fn a_complete_patient_passes() {
        assert!(check(&tree(good_patient()), &ProfileConfig::default()).is_empty());
    }

    #[test]
    fn every_missing_minimum_is_reported_and_each_can_be_relaxed() {
        let mut p = good_patient();
        let obj = p.as_object_mut().expect("object");
        obj.remove("address");
        obj.remove("gender");
        obj.insert("identifier".into(), json!([]));
        obj.insert("meta".into(), json!({}));
        let misses = check(&tree(p.clone()), &ProfileConfig::default());
        assert_eq!(misses.len(), 5, "{misses:?}");
        assert!(misses.iter().any(|m| m.contains("NHS number")));
        assert!(misses.iter().any(|m| m.contains("MRN")));
        assert!(misses.iter().any(|m| m.contains("gender")));
        assert!(misses.iter().any(|m| m.contains("postalCode")));
        assert!(misses.iter().any(|m| m.contains("meta.profile")));
        let relaxed = ProfileConfig {
            patient_nhs_number: false,
            patient_mrn: false,
            patient_gender_birth_date: false,
            patient_address: false,
            uk_core_profiles: false,
            ..ProfileConfig::default()
        };
        assert!(check(&tree(p), &relaxed).is_empty());
    }

    #[test]
    fn a_retired_merge_record_needs_only_an_identifier() {
        let retired = json!({
            "resourceType": "Patient",
            "meta": { "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"] },
            "identifier": [ { "system": NHS_SYSTEM, "value": "9449305552" } ],
            "active": false,
            "link": [ { "other": { "reference": "urn:uuid:x" }, "type": "replaced-by" } ]
        });
        assert!(check(&tree(retired.clone()), &ProfileConfig::default()).is_empty());
        let mut anonymous = retired.clone();
        anonymous["identifier"] = json!([]);
        let misses = check(&tree(anonymous), &ProfileConfig::default());
        assert_eq!(misses.len(), 1, "{misses:?}");
        // Inactive without a replaced-by link is not a merge: every minimum applies.
        let mut inactive = retired;
        inactive.as_object_mut().expect("object").remove("link");
        assert!(check(&tree(inactive), &ProfileConfig::default()).len() > 1);
    }

    #[test]
    fn an_observation_may_be_lab_or_plain_uk_core() {
        for p in ["Observation-Lab", "Observation"] {
            let o = json!({ "resourceType": "Observation", "meta": { "profile": [format!("{UK_CORE}{p}")] } });
            assert!(check(&tree(o), &ProfileConfig::default()).is_empty(), "{p}");
        }
        let o = json!({ "resourceType": "Observation", "meta": { "profile": [format!("{UK_CORE}Condition")] } });
        assert_eq!(check(&tree(o), &ProfileConfig::default()).len(), 1);
    }

    #[test]
    fn an_old_address_is_not_current() {
        let mut p = good_patient();
        p["address"] = json!([ { "use": "old", "postalCode": "NW1 2BU" } ]);
        let misses = check(&tree(p), &ProfileConfig::default());
        assert_eq!(misses.len(), 1, "{misses:?}");
    }
}
