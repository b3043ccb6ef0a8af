//! `system.say` (speak or just report a message) and `system.info` (facts about this machine).

use std::time::Duration;

use serde::Deserialize;

use super::process::{RunError, run_capped};
use super::{ExecOutcome, summary};
use crate::config::AgentConfig;

/// Longest text `system.say` accepts.
pub const MAX_SAY_BYTES: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SayParams {
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InfoParams {}

pub(super) async fn say(p: SayParams, config: &AgentConfig) -> ExecOutcome {
    let text = p.text.trim();
    if text.is_empty() {
        return ExecOutcome::refused("bad_params", "text must not be empty");
    }
    if text.len() > MAX_SAY_BYTES {
        return ExecOutcome::refused(
            "too_large",
            format!("text is {} bytes; at most {MAX_SAY_BYTES}", text.len()),
        );
    }
    let Some(prefix) = &config.say_command else {
        return ExecOutcome::done("Message", text, None);
    };
    let mut argv = prefix.clone();
    argv.push(text.to_owned());
    let timeout = Duration::from_secs(config.shell_timeout_secs);
    match run_capped(&argv, timeout, 4096).await {
        Ok(finished) if finished.code == Some(0) => ExecOutcome::done("Said", text, None),
        Ok(finished) => ExecOutcome::failed(format!(
            "{} failed (exit code {:?}): {}",
            argv[0],
            finished.code,
            summary(String::from_utf8_lossy(&finished.stderr.kept).trim(), 300)
        )),
        Err(RunError::TimedOut) => ExecOutcome::failed(format!(
            "{} timed out after {} s and was killed",
            argv[0], config.shell_timeout_secs
        )),
        Err(e) => ExecOutcome::failed(format!("{}: {e}", argv[0])),
    }
}

pub(super) fn info(_p: InfoParams) -> ExecOutcome {
    let info = crate::sysinfo::collect();
    let mut detail = format!(
        "{} {}, host {}",
        info.os,
        info.arch,
        info.hostname.as_deref().unwrap_or("unknown")
    );
    if let Some(up) = info.uptime_secs {
        detail.push_str(&format!(", up {}", human_duration(up)));
    }
    detail.push_str(&format!(", agent {}", info.agent_version));
    let output = serde_json::to_string_pretty(&info).ok();
    ExecOutcome::done("System info", detail, output)
}

fn human_duration(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m} min"),
        (0, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::human_duration(59), "0 min");
        assert_eq!(super::human_duration(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(super::human_duration(2 * 86_400 + 3600), "2 d 1 h");
    }
}
