//! The agent's local policy file: what this device is willing to do, whatever the server asks.
//!
//! The server decides what it *proposes*; this file decides what the device *runs*. Its defaults
//! are deliberately conservative: file executors refuse until roots are configured, `shell.exec`
//! refuses until binaries are allowlisted, `os.open_app` knows no apps, and the dangerous types
//! are RED locally (they need a server-signed approval even if the server calls them GREEN).
//!
//! The file is JSON and every field is optional. Unknown fields are an error: a typo such as
//! `"disabeld"` must not silently leave an executor switched on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading, parsing, validating or writing the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid configuration in {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The local policy and tuning of one agent. See the module docs for the safety stance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Server base URL (`https://nexus.example.com`). Usually set by `nexus agent pair`; the
    /// credentials file is authoritative for an already paired agent. Default: none.
    pub server: Option<String>,
    /// Seconds between heartbeats. Default: 10.
    pub heartbeat_interval_secs: u64,
    /// Directories the file executors (`fs.list`, `fs.read`, `fs.write`, `fs.delete`) are
    /// confined to; absolute paths. Default: none, so every file command is refused.
    pub roots: Vec<PathBuf>,
    /// Most bytes `fs.read` returns (a command may ask for fewer). Default: 1 MiB.
    pub max_read_bytes: u64,
    /// Largest `content` `fs.write` accepts; bigger writes are refused. Default: 1 MiB.
    pub max_write_bytes: u64,
    /// Binaries `shell.exec` may start: a bare name (looked up on `PATH`) or an absolute path.
    /// `argv[0]` must equal an entry exactly, so `/tmp/x/echo` does not match `echo`.
    /// Default: empty, so `shell.exec` is refused.
    pub shell_allowlist: Vec<String>,
    /// Seconds before a `shell.exec` (or `say_command`) process is killed. Default: 30.
    pub shell_timeout_secs: u64,
    /// Cap on the output a command returns (`shell.exec` stdout+stderr, `fs.list`). Default: 64 KiB.
    pub max_output_bytes: u64,
    /// `os.open_app`: app id → argv started directly (no shell), e.g.
    /// `{"editor": ["gedit"]}`. Default: empty.
    pub apps: BTreeMap<String, Vec<String>>,
    /// Command types switched off entirely (exact types or prefixes such as `fs.*`).
    /// Default: none.
    pub disabled: Vec<String>,
    /// Command types (exact or `prefix.*`) this device treats as RED whatever the server says:
    /// they run only with a valid server-signed approval for this device. Default: `fs.delete`,
    /// `shell.exec`, `system.settings.*`, `external_share.*`, `email.send`.
    pub local_red: Vec<String>,
    /// Reports kept on disk while the server is unreachable; past this the oldest are dropped
    /// with a warning. Default: 10 000.
    pub outbox_max: usize,
    /// argv prefix that speaks text for `system.say` (the text is appended as the last
    /// argument), e.g. `["espeak"]`. Default: none, so `system.say` only reports the text.
    pub say_command: Option<Vec<String>>,
}

pub const DEFAULT_HEARTBEAT_INTERVAL_SECS: u64 = 10;
pub const DEFAULT_MAX_READ_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_MAX_WRITE_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_SHELL_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 64 * 1024;
pub const DEFAULT_OUTBOX_MAX: usize = 10_000;
pub const DEFAULT_LOCAL_RED: [&str; 5] = [
    "fs.delete",
    "shell.exec",
    "system.settings.*",
    "external_share.*",
    "email.send",
];

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: None,
            heartbeat_interval_secs: DEFAULT_HEARTBEAT_INTERVAL_SECS,
            roots: Vec::new(),
            max_read_bytes: DEFAULT_MAX_READ_BYTES,
            max_write_bytes: DEFAULT_MAX_WRITE_BYTES,
            shell_allowlist: Vec::new(),
            shell_timeout_secs: DEFAULT_SHELL_TIMEOUT_SECS,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            apps: BTreeMap::new(),
            disabled: Vec::new(),
            local_red: DEFAULT_LOCAL_RED.iter().map(|s| (*s).to_owned()).collect(),
            outbox_max: DEFAULT_OUTBOX_MAX,
            say_command: None,
        }
    }
}

/// `pattern` is a command type (`fs.read`) or a prefix ending in `.*` (`system.settings.*`,
/// which matches `system.settings.display` but not `system.settings` itself); `*` alone matches
/// everything.
pub fn pattern_matches(pattern: &str, command_type: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => prefix.ends_with('.') && command_type.starts_with(prefix),
        None => pattern == command_type,
    }
}

impl AgentConfig {
    /// Reads the file; a missing file means the defaults. The result is validated.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let config: Self = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(config)
    }

    /// Writes the file (pretty JSON), creating its directory; replaces it atomically so a crash
    /// never leaves half a policy behind.
    pub fn save(&self, path: &Path) -> Result<()> {
        let write_err = |source| ConfigError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_err)?;
        }
        let mut text = serde_json::to_string_pretty(self).map_err(|e| write_err(e.into()))?;
        text.push('\n');
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, text).map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)
    }

    /// Checks what serde cannot: paths absolute, entries well-formed, limits non-zero.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for root in &self.roots {
            if !root.is_absolute() {
                problems.push(format!("roots: {} is not an absolute path", root.display()));
            }
        }
        for entry in &self.shell_allowlist {
            let p = Path::new(entry);
            let bare = p.components().count() == 1 && p.file_name().is_some();
            if entry.is_empty() || !(bare || p.is_absolute()) {
                problems.push(format!(
                    "shell_allowlist: {entry:?} must be a bare binary name or an absolute path"
                ));
            }
        }
        for (app, argv) in &self.apps {
            if argv.first().is_none_or(|a| a.is_empty()) {
                problems.push(format!("apps.{app}: argv must start with a program"));
            }
        }
        if self
            .say_command
            .as_ref()
            .is_some_and(|argv| argv.first().is_none_or(|a| a.is_empty()))
        {
            problems.push("say_command: argv must start with a program".to_owned());
        }
        for (field, patterns) in [("disabled", &self.disabled), ("local_red", &self.local_red)] {
            for p in patterns {
                let body = p.strip_suffix(".*").unwrap_or(p);
                if p != "*"
                    && (body.contains('*') || !nexus_domain::command::valid_command_type(body))
                {
                    problems.push(format!(
                        "{field}: {p:?} must be a command type like fs.read or a prefix like fs.*"
                    ));
                }
            }
        }
        for (field, value) in [
            ("heartbeat_interval_secs", self.heartbeat_interval_secs),
            ("max_read_bytes", self.max_read_bytes),
            ("max_write_bytes", self.max_write_bytes),
            ("shell_timeout_secs", self.shell_timeout_secs),
            ("max_output_bytes", self.max_output_bytes),
            ("outbox_max", self.outbox_max as u64),
        ] {
            if value == 0 {
                problems.push(format!("{field}: must be greater than 0"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Whether this device itself treats `command_type` as RED (see [`AgentConfig::local_red`]).
    pub fn is_locally_red(&self, command_type: &str) -> bool {
        self.local_red
            .iter()
            .any(|p| pattern_matches(p, command_type))
    }

    /// Whether `command_type` is switched off (see [`AgentConfig::disabled`]).
    pub fn is_disabled(&self, command_type: &str) -> bool {
        self.disabled
            .iter()
            .any(|p| pattern_matches(p, command_type))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn missing_file_gives_safe_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = AgentConfig::load(&dir.path().join("nope.json")).unwrap();
        assert_eq!(c, AgentConfig::default());
        assert!(c.roots.is_empty() && c.shell_allowlist.is_empty() && c.apps.is_empty());
        assert_eq!(c.heartbeat_interval_secs, 10);
        assert_eq!(c.max_read_bytes, 1 << 20);
        assert_eq!(c.max_output_bytes, 64 << 10);
        assert_eq!(c.outbox_max, 10_000);
        for t in [
            "fs.delete",
            "shell.exec",
            "system.settings.display",
            "email.send",
        ] {
            assert!(c.is_locally_red(t), "{t}");
        }
        for t in ["fs.read", "fs.write", "system.settings", "system.say"] {
            assert!(!c.is_locally_red(t), "{t}");
        }
        assert!(c.validate().is_ok());
    }

    #[test]
    fn partial_file_fills_defaults_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("agent-config.json");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, r#"{"shell_allowlist":["echo"],"disabled":["fs.*"]}"#).unwrap();
        let mut c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.shell_allowlist, vec!["echo"]);
        assert_eq!(c.shell_timeout_secs, 30);
        assert!(c.is_disabled("fs.read") && !c.is_disabled("shell.exec"));
        c.apps.insert("editor".into(), vec!["gedit".into()]);
        c.save(&path).unwrap();
        assert_eq!(AgentConfig::load(&path).unwrap(), c);
    }

    #[test]
    fn typos_and_bad_values_are_errors_not_silence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"disabeld":["shell.exec"]}"#).unwrap();
        assert!(matches!(
            AgentConfig::load(&path),
            Err(ConfigError::Parse { .. })
        ));
        for bad in [
            r#"{"roots":["relative/dir"]}"#,
            r#"{"shell_allowlist":["bin/echo"]}"#,
            r#"{"apps":{"x":[]}}"#,
            r#"{"say_command":[]}"#,
            r#"{"disabled":["fs*"]}"#,
            r#"{"max_write_bytes":0}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(AgentConfig::load(&path), Err(ConfigError::Invalid { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("fs.*", "fs.read"));
        assert!(!pattern_matches("fs.*", "fsx.read"));
        assert!(!pattern_matches("fs.*", "fs"));
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("fs.read", "fs.read"));
        assert!(!pattern_matches("fs.read", "fs.read.more"));
    }
}
