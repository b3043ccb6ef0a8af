//! The allowlist of command types this agent can run, and the dispatcher in front of them.
//!
//! Anything not in [`EXECUTOR_TYPES`] is refused (`not_allowlisted`), as is anything the local
//! config switches off (`disabled`). Parameters are parsed strictly (unknown fields are
//! `bad_params`): what runs is exactly what was approved and signed, nothing a lenient parser
//! guessed. Every executor is bounded: file executors by the configured roots and size caps,
//! processes by a timeout and an output cap, and none goes through a shell.
//!
//! `NEXUS_AGENT_DRY_RUN_OPEN=1` (or `true`) makes `os.open_url` and `os.open_app` report what they
//! would open instead of opening it; the end-to-end tests set it so no browser or app starts.

mod fs;
mod open;
mod process;
mod system;

use nexus_domain::DeviceCommand;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::authorize::Refusal;
use crate::config::AgentConfig;

/// Every command type this agent knows how to run.
pub const EXECUTOR_TYPES: [&str; 9] = [
    "system.say",
    "system.info",
    "os.open_url",
    "os.open_app",
    "fs.list",
    "fs.read",
    "fs.write",
    "fs.delete",
    "shell.exec",
];

/// The environment variable that turns `os.open_url`/`os.open_app` into dry runs.
pub const DRY_RUN_OPEN_ENV: &str = "NEXUS_AGENT_DRY_RUN_OPEN";

/// What running a command came to; each becomes one report (`done` for `Done`, `blocked` with
/// the reason otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// It ran. `title` and `detail` are one-line human summaries; `output` is the payload
    /// (file content, listing, process output, system facts) for the report's card.
    Done {
        title: String,
        detail: String,
        output: Option<String>,
    },
    /// The agent would not run it (policy, confinement, parameters); nothing happened.
    Refused(Refusal),
    /// It was allowed but did not succeed (I/O error, non-zero exit, timeout).
    Failed { reason: String },
}

impl ExecOutcome {
    fn done(title: impl Into<String>, detail: impl Into<String>, output: Option<String>) -> Self {
        Self::Done {
            title: title.into(),
            detail: detail.into(),
            output,
        }
    }

    fn refused(code: &'static str, reason: impl Into<String>) -> Self {
        Self::Refused(Refusal::new(code, reason))
    }

    fn failed(reason: impl Into<String>) -> Self {
        Self::Failed {
            reason: reason.into(),
        }
    }
}

impl From<Refusal> for ExecOutcome {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

/// Whether `command_type` is one this agent can run at all (ignoring `disabled`).
pub fn is_known(command_type: &str) -> bool {
    EXECUTOR_TYPES.contains(&command_type)
}

/// Runs a command. Call [`crate::authorize::check`] first: this function enforces the local
/// allowlist, `disabled`, confinement and caps, but not signatures or deadlines.
pub async fn execute(cmd: &DeviceCommand, config: &AgentConfig) -> ExecOutcome {
    let kind = cmd.command_type.as_str();
    if !is_known(kind) {
        return ExecOutcome::refused(
            "not_allowlisted",
            format!("{kind} is not a command type this agent runs"),
        );
    }
    if config.is_disabled(kind) {
        return ExecOutcome::refused(
            "disabled",
            format!("{kind} is disabled in this agent's config"),
        );
    }
    tracing::debug!(command_id = %cmd.command_id, command_type = kind, "executing");
    let params = &cmd.params;
    let outcome = match kind {
        "system.say" => match parse(kind, params) {
            Ok(p) => system::say(p, config).await,
            Err(r) => r.into(),
        },
        "system.info" => match parse(kind, params) {
            Ok(p) => system::info(p),
            Err(r) => r.into(),
        },
        "os.open_url" => match parse(kind, params) {
            Ok(p) => open::open_url(p, dry_run_open()).await,
            Err(r) => r.into(),
        },
        "os.open_app" => match parse(kind, params) {
            Ok(p) => open::open_app(p, config, dry_run_open()).await,
            Err(r) => r.into(),
        },
        "fs.list" => match parse(kind, params) {
            Ok(p) => fs::list(p, config).await,
            Err(r) => r.into(),
        },
        "fs.read" => match parse(kind, params) {
            Ok(p) => fs::read(p, config).await,
            Err(r) => r.into(),
        },
        "fs.write" => match parse(kind, params) {
            Ok(p) => fs::write(p, config).await,
            Err(r) => r.into(),
        },
        "fs.delete" => match parse(kind, params) {
            Ok(p) => fs::delete(p, config).await,
            Err(r) => r.into(),
        },
        "shell.exec" => match parse(kind, params) {
            Ok(p) => process::shell_exec(p, config).await,
            Err(r) => r.into(),
        },
        _ => ExecOutcome::refused("not_allowlisted", format!("{kind} has no executor")),
    };
    tracing::debug!(
        command_id = %cmd.command_id,
        outcome = match &outcome {
            ExecOutcome::Done { .. } => "done",
            ExecOutcome::Refused(r) => r.code,
            ExecOutcome::Failed { .. } => "failed",
        },
        "executed"
    );
    outcome
}

/// Strict parameter parsing; a missing/`null` params object counts as `{}`.
fn parse<T: DeserializeOwned>(kind: &str, params: &Value) -> Result<T, Refusal> {
    let value = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params.clone()
    };
    serde_json::from_value(value)
        .map_err(|e| Refusal::new("bad_params", format!("{kind} parameters: {e}")))
}

fn dry_run_open() -> bool {
    std::env::var(DRY_RUN_OPEN_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// The longest prefix of `text` that is at most `max` bytes and ends on a char boundary.
fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` shortened to about `max` bytes with an ellipsis, for one-line summaries.
fn summary(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    let cut = truncate_str(line, max);
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut.to_owned()
    }
}

#[cfg(test)]
mod tests;
