//! Agent runtime: `client` (placeholder; filled in by the runtime work).
