//! What an appliance needs around the pipeline: logging and graceful shutdown.

pub mod logging;
pub mod shutdown;
