//! Facts about this machine for `system.info` (work in progress).
