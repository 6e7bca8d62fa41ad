//! FHIR R4 (London profile: FHIR R4 + UK Core) building blocks.
//!
//! The small, dependency-free utilities live here so that mapping, validation and signing all
//! agree on them:
//!
//! - [`nhs`]: NHS number normalisation and the modulus 11 check.
//! - [`ids`]: deterministic resource ids (UUIDv5), so that re-sending the same HL7 message yields
//!   the same FHIR ids and the exchange can de-duplicate.
//! - [`time`]: HL7 v2 TS/DTM to FHIR `date`/`dateTime`/`instant`, with Europe/London applied to
//!   local times and daylight-saving edge cases flagged rather than guessed silently.
//! - [`envelope`]: the message Bundle around the mapped resources (MessageHeader, Provenance).
//! - [`tree`]: the JSON tree a Bundle is built, validated and signed in (cheaper than a
//!   `serde_json::Value`, which hashes every key).
//! - [`json`]: compact JSON output of a Bundle (serde_json's bytes, written faster).
//! - [`profile`]: the London overlay's minimums (configurable per site).
//! - [`validate`]: FHIR R4 structure (fhir-sdk R4B model) and London profile rules, checked
//!   before a Bundle is signed.

pub mod envelope;
pub mod ids;
pub mod json;
pub mod nhs;
pub mod profile;
pub mod time;
pub mod tree;
pub mod validate;
