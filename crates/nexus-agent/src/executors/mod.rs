//! The allowlist of command types this agent can run (work in progress).

use nexus_domain::DeviceCommand;

use crate::authorize::Refusal;
use crate::config::AgentConfig;

/// What running a command came to; each becomes one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    Done {
        title: String,
        detail: String,
        output: Option<String>,
    },
    Refused(Refusal),
    Failed {
        reason: String,
    },
}

/// Runs an authorised command (call [`crate::authorize::check`] first).
pub async fn execute(cmd: &DeviceCommand, _config: &AgentConfig) -> ExecOutcome {
    ExecOutcome::Refused(Refusal::new(
        "not_allowlisted",
        format!("{} is not a command this agent runs", cmd.command_type),
    ))
}
