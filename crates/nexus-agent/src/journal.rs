//! Agent runtime: `journal` (placeholder; filled in by the runtime work).
