//! # hl7-edge
//!
//! An on-site gateway that takes HL7 v2 from hospital systems and hands signed FHIR R4 message
//! Bundles (London profile: FHIR R4 + UK Core) to a regional exchange.
//!
//! The message's journey is the module layout:
//!
//! ```text
//! ingest (mllp, serial) -> hl7 (charset, parse, ACK) -> map (YAML plan) -> fhir (ids, rules, validate)
//!        -> sign (JCS + detached JWS) -> outbox (redb, group commit) -> forward (mqtt)
//! ```
//!
//! `pipeline` wires the stages together for the daemon; `config` layers settings with figment;
//! `ops` holds what an appliance needs around the pipeline (logging, shutdown).

pub mod forward;
pub mod outbox;
