//! The device's credentials (`agent.json`): which server, which device, its token pair and the
//! server keys pinned at pairing, plus the little state that must survive a restart (the command
//! cursor, the last contact).
//!
//! The file lives in the OS config directory (`~/.config/nexus/agent.json` on Linux,
//! `~/Library/Application Support/nexus/agent.json` on macOS, `%APPDATA%\nexus\agent.json` on
//! Windows), or wherever `--config` / `NEXUS_AGENT_CONFIG` says. It holds secrets, so it is
//! written atomically (temporary file, fsync, rename) and, on Unix, with mode 0600 in a 0700
//! directory. Its `Debug` form never shows a token.
//!
//! Everything else the agent keeps (outbox, journal, lock) lives in the state directory next to
//! it: `<dir>/<stem>.state/` (for `agent.json`: `agent.state/`), so two configs never share one.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// File name of the credentials in the config directory.
pub const FILE_NAME: &str = "agent.json";

/// What the agent stores after pairing.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Credentials {
    /// Base URL of the server (`https://nexus.example.com`), without a trailing slash.
    pub server_url: String,
    pub device_id: String,
    /// The name the device paired with.
    #[serde(default)]
    pub device_name: String,
    /// `org:project`.
    pub tenant: String,
    #[serde(default)]
    pub org_id: String,
    #[serde(default)]
    pub project_id: String,
    /// Bearer token for the device endpoints (`nxd_…`).
    pub access_token: String,
    /// When the access token was received (to know its lifetime).
    pub access_issued_at: DateTime<Utc>,
    pub access_expires_at: DateTime<Utc>,
    /// Single-use refresh token (`nxr_…`).
    pub refresh_token: String,
    pub refresh_expires_at: DateTime<Utc>,
    /// The server's public keys (JWK Set) pinned at pairing: approvals of RED commands must be
    /// signed by one of them.
    pub server_keys: Value,
    /// PEM file of an extra CA to trust for the server (self-signed deployments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// `next_cursor` of the last command pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    pub paired_at: DateTime<Utc>,
    /// Last successful exchange with the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact_at: Option<DateTime<Utc>>,
    /// Set when the server refused the refresh token for good (the device was removed or its
    /// tokens revoked): these credentials are dead and `pair` may replace them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("server_url", &self.server_url)
            .field("device_id", &self.device_id)
            .field("device_name", &self.device_name)
            .field("tenant", &self.tenant)
            .field("access_token", &"[redacted]")
            .field("access_issued_at", &self.access_issued_at)
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_token", &"[redacted]")
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("ca_cert", &self.ca_cert)
            .field("cursor", &self.cursor)
            .field("paired_at", &self.paired_at)
            .field("last_contact_at", &self.last_contact_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("this device is not paired ({} does not exist); run `nexus agent pair --server URL` first", .0.display())]
    NotPaired(PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not valid agent credentials: {source}", path.display())]
    Invalid {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Credentials {
    /// Reads the credentials at `path`.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CredentialsError::NotPaired(path.to_owned()));
            }
            Err(source) => {
                return Err(CredentialsError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_str(&text).map_err(|source| CredentialsError::Invalid {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the credentials to `path` atomically (mode 0600 on Unix).
    pub fn save(&self, path: &Path) -> Result<(), CredentialsError> {
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| CredentialsError::Write {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        text.push(b'\n');
        write_private_atomic(path, &text).map_err(|source| CredentialsError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// Like [`save`](Self::save), but only if the file still exists: a running agent must not
    /// bring back credentials that `nexus agent unpair` just deleted. Returns whether it wrote.
    pub fn save_if_present(&self, path: &Path) -> Result<bool, CredentialsError> {
        if !path.exists() {
            return Ok(false);
        }
        self.save(path).map(|()| true)
    }

    /// Removes the credentials file (missing is fine).
    pub fn remove(path: &Path) -> Result<(), CredentialsError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CredentialsError::Write {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// The default credentials path: `$NEXUS_AGENT_CONFIG` is handled by the CLI; this is the OS
/// config directory plus `nexus/agent.json`.
pub fn default_path() -> Option<PathBuf> {
    config_dir().map(|d| d.join("nexus").join(FILE_NAME))
}

/// The per-user config directory of this OS, from the environment (no system calls).
fn config_dir() -> Option<PathBuf> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if cfg!(windows) {
        env("APPDATA").or_else(|| env("USERPROFILE").map(|h| h.join("AppData").join("Roaming")))
    } else if cfg!(target_os = "macos") {
        env("HOME").map(|h| h.join("Library").join("Application Support"))
    } else {
        env("XDG_CONFIG_HOME")
            .filter(|p| p.is_absolute())
            .or_else(|| env("HOME").map(|h| h.join(".config")))
    }
}

/// The state directory that belongs to the credentials at `path`: `<dir>/<stem>.state`.
pub fn state_dir(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".to_owned());
    path.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!("{stem}.state"))
}

/// Creates `dir` (and parents) private to the user where the OS allows.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Writes `bytes` to `path` so that readers see either the old or the new content, never a
/// mix: a temporary file in the same directory (created 0600 on Unix), fsync, rename over,
/// fsync of the directory.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    create_private_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_owned());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes a rename durable (Unix); a no-op where directories cannot be opened.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    pub(crate) fn sample() -> Credentials {
        let t = |s| Utc.timestamp_opt(s, 0).single().expect("time");
        Credentials {
            server_url: "http://127.0.0.1:8080".into(),
            device_id: "dev_01".into(),
            device_name: "pc".into(),
            tenant: "default:default".into(),
            org_id: "default".into(),
            project_id: "default".into(),
            access_token: "nxd_secretaccess".into(),
            access_issued_at: t(1_700_000_000),
            access_expires_at: t(1_700_600_000),
            refresh_token: "nxr_secretrefresh".into(),
            refresh_expires_at: t(1_702_000_000),
            server_keys: serde_json::json!({"keys": []}),
            ca_cert: None,
            cursor: Some("7".into()),
            paired_at: t(1_700_000_000),
            last_contact_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn round_trips_and_overwrites_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("agent.json");
        assert!(matches!(
            Credentials::load(&path),
            Err(CredentialsError::NotPaired(_))
        ));
        let mut creds = sample();
        creds.save(&path).expect("save");
        assert_eq!(Credentials::load(&path).expect("load"), creds);
        creds.cursor = Some("8".into());
        creds.save(&path).expect("save again");
        assert_eq!(
            Credentials::load(&path).expect("load").cursor.as_deref(),
            Some("8")
        );
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("agent.json")]);
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nexus").join("agent.json");
        // Even over an existing world-readable file.
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, "{}").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        sample().save(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let fresh = dir.path().join("new").join("agent.json");
        sample().save(&fresh).expect("save");
        let dir_mode = std::fs::metadata(fresh.parent().expect("dir"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700, "{dir_mode:o}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.json");
        sample().save(&path).expect("save");
        // A directory where the file should go cannot be replaced by a rename.
        let blocked = dir.path().join("blocked.json");
        std::fs::create_dir(&blocked).expect("mkdir");
        std::fs::write(blocked.join("x"), "x").expect("write");
        assert!(sample().save(&blocked).is_err());
        assert_eq!(Credentials::load(&path).expect("load"), sample());
        let leftovers = std::fs::read_dir(dir.path())
            .expect("list")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn debug_never_shows_tokens() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("secretaccess") && !text.contains("secretrefresh"));
        assert!(text.contains("[redacted]") && text.contains("dev_01"));
    }

    #[test]
    fn save_if_present_does_not_resurrect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.json");
        assert!(!sample().save_if_present(&path).expect("save"));
        assert!(!path.exists());
        sample().save(&path).expect("save");
        assert!(sample().save_if_present(&path).expect("save"));
        Credentials::remove(&path).expect("remove");
        Credentials::remove(&path).expect("remove twice");
        assert!(!path.exists());
    }

    #[test]
    fn the_state_dir_sits_next_to_the_file() {
        assert_eq!(
            state_dir(Path::new("/etc/nexus/agent.json")),
            PathBuf::from("/etc/nexus/agent.state")
        );
        assert_eq!(
            state_dir(Path::new("other.json")),
            PathBuf::from("other.state")
        );
    }
}
