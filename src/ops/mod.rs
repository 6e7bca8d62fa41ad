//! What an appliance needs around the pipeline: logging, graceful shutdown, fleet health
//! messages, and the local admin socket behind `hl7-edge outbox ...`.

pub mod admin;
pub mod health;
pub mod logging;
pub mod shutdown;
