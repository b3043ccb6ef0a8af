//! Agent runtime: `runner` (placeholder; filled in by the runtime work).
