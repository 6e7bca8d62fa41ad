//! Bundle signing (in progress).

pub mod jcs;
