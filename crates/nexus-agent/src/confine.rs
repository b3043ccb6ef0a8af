//! Confines the file executors to the configured roots (work in progress).

use std::path::PathBuf;

use crate::authorize::Refusal;

/// Resolves `requested` to a canonical path inside one of `roots`, or refuses.
pub fn resolve(_roots: &[PathBuf], _requested: &str, _for_write: bool) -> Result<PathBuf, Refusal> {
    Err(Refusal::new(
        "disabled",
        "file executors are not available yet",
    ))
}
