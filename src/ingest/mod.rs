//! Sources: where HL7 v2 bytes enter the appliance.
//!
//! Every source (MLLP over TCP, serial lines) hands each framed message to the same
//! [`Intake`], which reads just enough of it to route and acknowledge, stores it durably, and
//! returns the ACK to send. The rule that matters most lives here: **a positive ACK only after the
//! durable commit**; anything refused gets a negative ACK with an ERR segment saying why.

pub mod acl;
pub mod adapter;
pub mod disk;
pub mod frame;
pub mod intake;
pub mod mllp;
pub mod serial;
pub mod tls;

pub use intake::Intake;
