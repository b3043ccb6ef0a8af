//! Agent runtime: `outbox` (placeholder; filled in by the runtime work).
