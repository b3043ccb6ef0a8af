//! Agent runtime: `credentials` (placeholder; filled in by the runtime work).
