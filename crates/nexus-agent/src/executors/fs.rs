//! `fs.list`, `fs.read`, `fs.write`, `fs.delete`: confined to the configured roots (see
//! [`crate::confine`]) and size-capped. The blocking file I/O runs on tokio's blocking pool.
//!
//! `fs.delete` removes single files only: a directory is refused, because one approval of
//! "delete X" should never turn into a recursive delete of whatever X happens to contain.

use std::io::{Read, Write};
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

use super::ExecOutcome;
use crate::authorize::Refusal;
use crate::config::AgentConfig;
use crate::confine::{self, WriteMode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListParams {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadParams {
    path: String,
    /// At most this many bytes (further capped by `max_read_bytes`).
    #[serde(default)]
    max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WriteParams {
    path: String,
    content: String,
    /// Defaults to `create`, the one mode that can never destroy anything.
    #[serde(default = "default_mode")]
    mode: WriteMode,
}

fn default_mode() -> WriteMode {
    WriteMode::Create
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteParams {
    path: String,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("the file task failed: {e}"))
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

pub(super) async fn list(p: ListParams, config: &AgentConfig) -> ExecOutcome {
    let dir = match confine::resolve(&config.roots, &p.path, false) {
        Ok(dir) => dir,
        Err(r) => return r.into(),
    };
    if !dir.is_dir() {
        return ExecOutcome::refused(
            "bad_params",
            format!("{} is not a directory (use fs.read for files)", p.path),
        );
    }
    let cap = usize::try_from(config.max_output_bytes).unwrap_or(usize::MAX);
    let shown = show(&dir);
    match blocking(move || list_dir(&dir, cap)).await {
        Ok(Ok((listing, count, total))) => {
            let detail = if count < total {
                format!("{count} of {total} entries (output capped at {cap} bytes)")
            } else {
                format!("{total} entries")
            };
            ExecOutcome::done(format!("Listed {shown}"), detail, Some(listing))
        }
        Ok(Err(e)) => ExecOutcome::failed(format!("cannot list {shown}: {e}")),
        Err(e) => ExecOutcome::failed(e),
    }
}

/// A JSON array of `{"name","kind","size"}` sorted by name, with as many entries as fit in
/// `cap` bytes; returns it with the number shown and the total. Links are reported as links,
/// never followed.
fn list_dir(dir: &Path, cap: usize) -> std::io::Result<(String, usize, usize)> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        let kind = if file_type.is_symlink() {
            "symlink"
        } else if file_type.is_dir() {
            "dir"
        } else if file_type.is_file() {
            "file"
        } else {
            "other"
        };
        let size = file_type
            .is_file()
            .then(|| entry.metadata().map(|m| m.len()).ok())
            .flatten();
        entries.push((entry.file_name().to_string_lossy().into_owned(), kind, size));
    }
    entries.sort();
    let total = entries.len();
    let mut out = String::from("[");
    let mut shown = 0;
    for (name, kind, size) in entries {
        let item = serde_json::json!({ "name": name, "kind": kind, "size": size }).to_string();
        // Room for the separator, this item and the closing bracket.
        if out.len() + item.len() + 4 > cap {
            break;
        }
        if shown > 0 {
            out.push(',');
        }
        out.push('\n');
        out.push_str(&item);
        shown += 1;
    }
    out.push_str(if shown > 0 { "\n]" } else { "]" });
    Ok((out, shown, total))
}

pub(super) async fn read(p: ReadParams, config: &AgentConfig) -> ExecOutcome {
    let path = match confine::resolve(&config.roots, &p.path, false) {
        Ok(path) => path,
        Err(r) => return r.into(),
    };
    if path.is_dir() {
        return ExecOutcome::refused(
            "bad_params",
            format!("{} is a directory (use fs.list)", p.path),
        );
    }
    let limit = p
        .max_bytes
        .unwrap_or(config.max_read_bytes)
        .min(config.max_read_bytes);
    let shown = show(&path);
    let result = blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
        let file = confine::open_for_read(&path)?;
        let size = file.metadata()?.len();
        let mut bytes = Vec::new();
        file.take(limit).read_to_end(&mut bytes)?;
        Ok((bytes, size))
    })
    .await;
    let (bytes, size) = match result {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => return ExecOutcome::failed(format!("cannot read {shown}: {e}")),
        Err(e) => return ExecOutcome::failed(e),
    };
    let truncated = (bytes.len() as u64) < size;
    let mut detail = if truncated {
        format!("first {} of {size} bytes", bytes.len())
    } else {
        format!("{size} bytes")
    };
    let output = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            // A cap can cut a multi-byte character in half; that is still text.
            if truncated && bytes.len() - valid < 4 && std::str::from_utf8(&bytes[..valid]).is_ok()
            {
                String::from_utf8_lossy(&bytes[..valid]).into_owned()
            } else {
                detail.push_str(", binary (base64)");
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            }
        }
    };
    ExecOutcome::done(format!("Read {shown}"), detail, Some(output))
}

pub(super) async fn write(p: WriteParams, config: &AgentConfig) -> ExecOutcome {
    let len = p.content.len() as u64;
    if len > config.max_write_bytes {
        return ExecOutcome::refused(
            "too_large",
            format!(
                "{len} bytes is more than this agent writes at once ({} bytes)",
                config.max_write_bytes
            ),
        );
    }
    let path = match confine::resolve(&config.roots, &p.path, true) {
        Ok(path) => path,
        Err(r) => return r.into(),
    };
    if path.is_dir() {
        return ExecOutcome::refused("bad_params", format!("{} is a directory", p.path));
    }
    let mode = p.mode;
    let shown = show(&path);
    let result = blocking(move || -> std::io::Result<()> {
        let mut file = confine::open_for_write(&path, mode)?;
        file.write_all(p.content.as_bytes())?;
        file.sync_all()
    })
    .await;
    match result {
        Ok(Ok(())) => {
            let verb = match mode {
                WriteMode::Create => "created",
                WriteMode::Overwrite => "overwrote",
                WriteMode::Append => "appended to",
            };
            ExecOutcome::done(
                format!("Wrote {shown}"),
                format!("{verb} {shown} ({len} bytes)"),
                None,
            )
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            ExecOutcome::refused("exists", format!("{} exists and mode is create", p.path))
        }
        Ok(Err(e)) => ExecOutcome::failed(format!("cannot write {shown}: {e}")),
        Err(e) => ExecOutcome::failed(e),
    }
}

pub(super) async fn delete(p: DeleteParams, config: &AgentConfig) -> ExecOutcome {
    let path = match confine::resolve(&config.roots, &p.path, true) {
        Ok(path) => path,
        Err(r) => return r.into(),
    };
    let shown = show(&path);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Refusal::new("not_found", format!("{} does not exist", p.path)).into();
        }
        Err(e) => return ExecOutcome::failed(format!("cannot delete {shown}: {e}")),
        Ok(meta) if meta.is_dir() => {
            return ExecOutcome::refused(
                "bad_params",
                format!("{} is a directory; fs.delete removes files only", p.path),
            );
        }
        Ok(_) => {}
    }
    match blocking(move || std::fs::remove_file(&path)).await {
        Ok(Ok(())) => {
            ExecOutcome::done(format!("Deleted {shown}"), format!("deleted {shown}"), None)
        }
        Ok(Err(e)) => ExecOutcome::failed(format!("cannot delete {shown}: {e}")),
        Err(e) => ExecOutcome::failed(e),
    }
}
