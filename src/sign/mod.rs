//! Bundle signing (in progress).
