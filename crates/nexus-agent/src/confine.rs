//! Confines the file executors to the configured roots.
//!
//! A path from the server is untrusted input. It is refused outright if it has a `..`
//! component (whatever it would resolve to), then canonicalised, which resolves every symlink,
//! and the result must lie inside a canonicalised root: a symlink inside a root that points out
//! of it therefore escapes nothing. For writes and deletes the target may not exist yet, so the
//! *parent* is canonicalised and the file name re-joined, and a target that is itself a symlink
//! is refused (writing or deleting "through" a link is never what the approver saw). Device
//! files, FIFOs and sockets are refused: reading a FIFO blocks forever and a device can be
//! anything.
//!
//! Relative paths are resolved against the first configured root.
//!
//! Between this check and the executor's `open` a local user could swap a component for a
//! symlink; on Unix the executors open with `O_NOFOLLOW | O_NONBLOCK` and re-check the opened
//! file's type (see [`open_for_read`], [`open_for_write`]), which narrows that window to
//! directory components. The agent defends against what the *server* sends, not against a local
//! user who can already write inside the roots.

use std::fs::{File, FileType, OpenOptions};
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::authorize::Refusal;

/// Resolves `requested` to a path inside one of `roots`, or refuses.
///
/// Reads (`for_write == false`): the canonical path of an existing file or directory.
/// Writes/deletes (`for_write == true`): the canonical parent (which must exist and be inside a
/// root) joined with the requested file name; the target may be missing, but if it exists it
/// must not be a symlink or a special file. Directories are returned as they are; the executor
/// decides whether it accepts one.
pub fn resolve(roots: &[PathBuf], requested: &str, for_write: bool) -> Result<PathBuf, Refusal> {
    if requested.is_empty() || requested.contains('\0') {
        return Err(Refusal::new(
            "bad_params",
            "path must be a non-empty string",
        ));
    }
    let path = Path::new(requested);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Refusal::new(
            "path_escape",
            format!("{requested}: `..` is not allowed in paths"),
        ));
    }
    if roots.is_empty() {
        return Err(Refusal::new(
            "disabled",
            "file commands are off: no roots are configured (`roots` in the agent config)",
        ));
    }
    let canonical_roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let Some(first_root) = canonical_roots.first() else {
        return Err(Refusal::new(
            "disabled",
            "file commands are off: none of the configured roots exists",
        ));
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        first_root.join(path)
    };
    let inside = |p: &Path| canonical_roots.iter().any(|r| p.starts_with(r));
    let escape = || {
        Refusal::new(
            "path_escape",
            format!("{requested} is outside the configured roots"),
        )
    };
    // A missing path is "not found" only if it would have been inside a root; otherwise the
    // answer must not reveal whether something exists out there.
    let lexically_inside = |p: &Path| inside(p) || roots.iter().any(|r| p.starts_with(r));
    let canonicalize = |p: &Path| {
        std::fs::canonicalize(p).map_err(|e| {
            let dangling_link =
                std::fs::symlink_metadata(&absolute).is_ok_and(|m| m.file_type().is_symlink());
            if !lexically_inside(&absolute) || dangling_link {
                escape()
            } else if e.kind() == io::ErrorKind::NotFound {
                Refusal::new("not_found", format!("{requested} does not exist"))
            } else {
                Refusal::new("inaccessible", format!("{requested}: {e}"))
            }
        })
    };

    if !for_write {
        let canonical = canonicalize(&absolute)?;
        if !inside(&canonical) {
            return Err(escape());
        }
        let meta = std::fs::metadata(&canonical)
            .map_err(|e| Refusal::new("inaccessible", format!("{requested}: {e}")))?;
        refuse_special(requested, &meta.file_type())?;
        return Ok(canonical);
    }

    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        if !lexically_inside(&absolute) {
            return Err(escape());
        }
        return Err(Refusal::new(
            "bad_params",
            format!("{requested} does not name a file"),
        ));
    };
    let parent = canonicalize(parent)?;
    if !inside(&parent) {
        return Err(escape());
    }
    let target = parent.join(name);
    match std::fs::symlink_metadata(&target) {
        Ok(meta) if meta.file_type().is_symlink() => Err(Refusal::new(
            "path_escape",
            format!("{requested} is a symlink; the agent does not write or delete through links"),
        )),
        Ok(meta) => {
            refuse_special(requested, &meta.file_type())?;
            Ok(target)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(target),
        Err(e) => Err(Refusal::new("inaccessible", format!("{requested}: {e}"))),
    }
}

fn refuse_special(requested: &str, file_type: &FileType) -> Result<(), Refusal> {
    if is_special(file_type) {
        return Err(Refusal::new(
            "special_file",
            format!(
                "{requested} is a device, FIFO or socket; only regular files and directories are handled"
            ),
        ));
    }
    Ok(())
}

/// Block/character devices, FIFOs and sockets.
#[cfg(unix)]
pub fn is_special(file_type: &FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file_type.is_block_device()
        || file_type.is_char_device()
        || file_type.is_fifo()
        || file_type.is_socket()
}

/// Anything that is neither a file, a directory nor a link (reparse points such as devices).
#[cfg(not(unix))]
pub fn is_special(file_type: &FileType) -> bool {
    !(file_type.is_file() || file_type.is_dir() || file_type.is_symlink())
}

/// Opens a resolved path for reading without following a final symlink and without blocking
/// on a FIFO, and checks that what was opened is a regular file.
pub fn open_for_read(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    no_follow(&mut options);
    regular(options.open(path)?)
}

/// How `fs.write` treats an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Only a new file; an existing one is an error.
    Create,
    /// Create or replace the content.
    Overwrite,
    /// Create or add to the end.
    Append,
}

/// Opens a resolved path for writing as `mode` says (never through a final symlink, never
/// blocking on a FIFO). Truncation for `Overwrite` happens only after the opened file is known
/// to be a regular file.
pub fn open_for_write(path: &Path, mode: WriteMode) -> io::Result<File> {
    let mut options = OpenOptions::new();
    match mode {
        WriteMode::Create => options.write(true).create_new(true),
        WriteMode::Overwrite => options.write(true).create(true),
        WriteMode::Append => options.append(true).create(true),
    };
    no_follow(&mut options);
    let file = regular(options.open(path)?)?;
    if mode == WriteMode::Overwrite {
        file.set_len(0)?;
    }
    Ok(file)
}

fn regular(file: File) -> io::Result<File> {
    if file.metadata()?.is_file() {
        Ok(file)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

#[cfg(unix)]
fn no_follow(options: &mut OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
}

#[cfg(not(unix))]
fn no_follow(_options: &mut OpenOptions) {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    /// `<tmp>/root` (the only root, with `a.txt` and `sub/b.txt`) and `<tmp>/outside/secret.txt`.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::fs::write(root.join("sub/b.txt"), "b").unwrap();
        std::fs::write(outside.join("secret.txt"), "s").unwrap();
        Fixture {
            _dir: dir,
            root,
            outside,
        }
    }

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_owned()
    }

    fn code(r: Result<PathBuf, Refusal>) -> &'static str {
        r.unwrap_err().code
    }

    #[test]
    fn inside_paths_resolve_absolute_and_relative() {
        let f = fixture();
        let roots = vec![f.root.clone()];
        assert_eq!(
            resolve(&roots, &s(&f.root.join("a.txt")), false).unwrap(),
            f.root.join("a.txt")
        );
        assert_eq!(
            resolve(&roots, "sub/b.txt", false).unwrap(),
            f.root.join("sub/b.txt")
        );
        assert_eq!(
            resolve(&roots, "./sub/./b.txt", false).unwrap(),
            f.root.join("sub/b.txt")
        );
        assert_eq!(resolve(&roots, &s(&f.root), false).unwrap(), f.root);
        assert_eq!(
            resolve(&roots, "sub/new.txt", true).unwrap(),
            f.root.join("sub/new.txt")
        );
    }

    #[test]
    fn dot_dot_is_refused_even_when_it_stays_inside() {
        let f = fixture();
        let roots = vec![f.root.clone()];
        for p in [
            "../outside/secret.txt".to_owned(),
            "sub/../a.txt".to_owned(),
            s(&f.root.join("sub/../a.txt")),
            s(&f.root.join("../outside/secret.txt")),
        ] {
            assert_eq!(code(resolve(&roots, &p, false)), "path_escape", "{p}");
            assert_eq!(code(resolve(&roots, &p, true)), "path_escape", "{p}");
        }
    }

    #[test]
    fn absolute_paths_outside_are_refused_without_revealing_existence() {
        let f = fixture();
        let roots = vec![f.root.clone()];
        for p in [
            f.outside.join("secret.txt"),
            f.outside.join("missing.txt"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("/"),
            f.root.parent().unwrap().join("root-sibling/x"),
        ] {
            assert_eq!(code(resolve(&roots, &s(&p), false)), "path_escape", "{p:?}");
            assert_eq!(code(resolve(&roots, &s(&p), true)), "path_escape", "{p:?}");
        }
        // The root itself cannot be the target of a write/delete (its parent is outside).
        assert_eq!(code(resolve(&roots, &s(&f.root), true)), "path_escape");
        assert_eq!(code(resolve(&roots, "missing.txt", false)), "not_found");
        assert_eq!(code(resolve(&roots, "nodir/x.txt", true)), "not_found");
    }

    #[test]
    fn no_roots_or_bad_input() {
        let f = fixture();
        assert_eq!(code(resolve(&[], &s(&f.root), false)), "disabled");
        assert_eq!(
            code(resolve(&[f.root.join("does-not-exist")], "a.txt", false)),
            "disabled"
        );
        let roots = vec![f.root.clone()];
        assert_eq!(code(resolve(&roots, "", false)), "bad_params");
        assert_eq!(code(resolve(&roots, "a\0b", false)), "bad_params");
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_leading_outside_are_refused() {
        use std::os::unix::fs::symlink;
        let f = fixture();
        let roots = vec![f.root.clone()];
        // A link inside the root to a file outside it.
        symlink(f.outside.join("secret.txt"), f.root.join("link.txt")).unwrap();
        // A link inside the root to a directory outside it.
        symlink(&f.outside, f.root.join("out")).unwrap();
        // A link inside the root to a file inside it.
        symlink(f.root.join("a.txt"), f.root.join("inner.txt")).unwrap();
        assert_eq!(code(resolve(&roots, "link.txt", false)), "path_escape");
        assert_eq!(
            code(resolve(&roots, "out/secret.txt", false)),
            "path_escape"
        );
        assert_eq!(code(resolve(&roots, "out", false)), "path_escape");
        assert_eq!(code(resolve(&roots, "out/new.txt", true)), "path_escape");
        // Writing or deleting through any final link is refused, even one that stays inside.
        assert_eq!(code(resolve(&roots, "link.txt", true)), "path_escape");
        assert_eq!(code(resolve(&roots, "inner.txt", true)), "path_escape");
        // Reading through a link that stays inside is fine: the canonical target is returned.
        assert_eq!(
            resolve(&roots, "inner.txt", false).unwrap(),
            f.root.join("a.txt")
        );
        // A dangling link cannot be used to create a file outside.
        symlink(f.outside.join("new.txt"), f.root.join("dangling")).unwrap();
        assert_eq!(code(resolve(&roots, "dangling", true)), "path_escape");
        assert_eq!(code(resolve(&roots, "dangling", false)), "path_escape");
        assert!(!f.outside.join("new.txt").exists());
    }

    #[cfg(unix)]
    #[test]
    fn a_root_given_through_a_symlink_still_confines() {
        use std::os::unix::fs::symlink;
        let f = fixture();
        let link_root = f.root.parent().unwrap().join("root-link");
        symlink(&f.root, &link_root).unwrap();
        let roots = vec![link_root.clone()];
        assert_eq!(
            resolve(&roots, &s(&link_root.join("a.txt")), false).unwrap(),
            f.root.join("a.txt")
        );
        assert_eq!(
            code(resolve(&roots, &s(&f.outside.join("secret.txt")), false)),
            "path_escape"
        );
    }

    #[cfg(unix)]
    #[test]
    fn device_files_are_refused() {
        // A root that contains a device file: /dev itself.
        let roots = vec![PathBuf::from("/dev")];
        assert_eq!(code(resolve(&roots, "/dev/null", false)), "special_file");
        assert_eq!(code(resolve(&roots, "/dev/null", true)), "special_file");
        assert_eq!(code(resolve(&roots, "zero", false)), "special_file");
    }

    #[cfg(unix)]
    #[test]
    fn fifos_are_refused() {
        let f = fixture();
        let fifo = f.root.join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            eprintln!("mkfifo unavailable; skipping");
            return;
        }
        let roots = vec![f.root.clone()];
        assert_eq!(code(resolve(&roots, "pipe", false)), "special_file");
        assert_eq!(code(resolve(&roots, "pipe", true)), "special_file");
        // Even if the check were raced, opening does not block and is refused.
        assert!(open_for_read(&fifo).is_err());
        assert!(open_for_write(&fifo, WriteMode::Append).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn opening_refuses_a_final_symlink() {
        use std::os::unix::fs::symlink;
        let f = fixture();
        symlink(f.outside.join("secret.txt"), f.root.join("l")).unwrap();
        assert!(open_for_read(&f.root.join("l")).is_err());
        assert!(open_for_write(&f.root.join("l"), WriteMode::Overwrite).is_err());
        assert_eq!(
            std::fs::read_to_string(f.outside.join("secret.txt")).unwrap(),
            "s"
        );
    }

    #[test]
    fn write_modes() {
        use std::io::Write;
        let f = fixture();
        let p = f.root.join("w.txt");
        open_for_write(&p, WriteMode::Create)
            .unwrap()
            .write_all(b"one")
            .unwrap();
        assert!(open_for_write(&p, WriteMode::Create).is_err());
        open_for_write(&p, WriteMode::Append)
            .unwrap()
            .write_all(b"two")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "onetwo");
        open_for_write(&p, WriteMode::Overwrite)
            .unwrap()
            .write_all(b"3")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "3");
        assert!(open_for_read(&f.root).is_err(), "a directory is not a file");
    }
}
