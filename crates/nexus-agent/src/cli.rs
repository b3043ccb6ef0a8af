//! Agent runtime: `cli` (placeholder; filled in by the runtime work).
