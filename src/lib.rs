//! # hl7-edge
//!
//! An on-site gateway that takes HL7 v2 from hospital systems and hands signed FHIR R4 message
//! Bundles (London profile: FHIR R4 + UK Core) to a regional exchange.
//!
//! The message's journey is the module layout:
//!
//! ```text
//! ingest (mllp) -> hl7 (charset, parse, ACK) -> outbox (durable, group commit) -> ACK
//!                                                  |
//!            pipeline: map (YAML plan) -> fhir (envelope, validate) -> sign (JCS + JWS)
//!                                                  |
//!                                     outbox (Ready) -> forward (MQTT, QoS 1, FIFO per feed)
//! ```
//!
//! `config` layers settings with figment; `ops` holds logging and shutdown.

pub mod config;
pub mod fhir;
pub mod forward;
pub mod hl7;
pub mod ingest;
pub mod map;
pub mod ops;
pub mod outbox;
pub mod pipeline;
pub mod sign;
