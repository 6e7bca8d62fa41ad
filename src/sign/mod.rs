//! Signing FHIR message Bundles so the regional exchange can tell where each one came from.
//!
//! TODO: module docs.

pub mod jcs;
pub mod jws;
pub mod key;
