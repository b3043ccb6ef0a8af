//! `shell.exec` and the bounded process runner it shares with `system.say`.
//!
//! Despite its name, `shell.exec` never involves a shell: `argv[0]` must equal an entry of
//! `shell_allowlist` exactly and the argv is handed to the OS as is, so `$HOME`, `;`, `|` and
//! globs are just characters. The child gets no stdin, the agent's environment minus `NEXUS_*`
//! variables, its own process group (Unix; so a timeout kills its children too), a wall-clock
//! timeout, and its stdout/stderr are read to the end but kept only up to `max_output_bytes`.

use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{ExecOutcome, summary, truncate_str};
use crate::config::AgentConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ShellParams {
    argv: Vec<String>,
}

/// A stream read to its end, keeping at most the cap.
#[derive(Debug, Default)]
pub(super) struct Captured {
    pub kept: Vec<u8>,
    pub total: u64,
}

impl Captured {
    pub fn truncated(&self) -> bool {
        (self.kept.len() as u64) < self.total
    }
}

#[derive(Debug)]
pub(super) struct Finished {
    /// `None` when the process was ended by a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Captured,
    pub stderr: Captured,
}

#[derive(Debug)]
pub(super) enum RunError {
    Spawn(std::io::Error),
    TimedOut,
    Io(std::io::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Spawn(e) => write!(f, "cannot start it: {e}"),
            Self::TimedOut => f.write_str("timed out and was killed"),
            Self::Io(e) => write!(f, "waiting for it failed: {e}"),
        }
    }
}

async fn capture(stream: Option<impl AsyncRead + Unpin>, cap: usize) -> std::io::Result<Captured> {
    let mut captured = Captured::default();
    let Some(mut stream) = stream else {
        return Ok(captured);
    };
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(captured);
        }
        captured.total += n as u64;
        let room = cap.saturating_sub(captured.kept.len());
        captured.kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// Runs `argv` directly (no shell) with a timeout, capturing each output stream up to `cap`.
pub(super) async fn run_capped(
    argv: &[String],
    timeout: Duration,
    cap: usize,
) -> Result<Finished, RunError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(RunError::Spawn(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty argv",
        )));
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NEXUS_") {
            command.env_remove(key);
        }
    }
    #[cfg(unix)]
    command.process_group(0);
    let mut child = command.spawn().map_err(RunError::Spawn)?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        let (out, err, status) =
            tokio::join!(capture(stdout, cap), capture(stderr, cap), child.wait());
        Ok::<_, std::io::Error>((out?, err?, status?))
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok((stdout, stderr, status))) => Ok(Finished {
            code: status.code(),
            signal: signal_of(&status),
            stdout,
            stderr,
        }),
        Ok(Err(e)) => Err(RunError::Io(e)),
        Err(_) => {
            kill_tree(&mut child).await;
            Err(RunError::TimedOut)
        }
    }
}

#[cfg(unix)]
fn signal_of(status: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

#[cfg(not(unix))]
fn signal_of(_status: &std::process::ExitStatus) -> Option<i32> {
    None
}

/// Kills the child and, on Unix, its process group (children it started), then reaps it.
async fn kill_tree(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // `kill` the program rather than libc::kill: the workspace forbids unsafe code.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    let _ = child.kill().await;
}

pub(super) async fn shell_exec(p: ShellParams, config: &AgentConfig) -> ExecOutcome {
    let Some(program) = p.argv.first() else {
        return ExecOutcome::refused("bad_params", "argv must name a program");
    };
    if !config
        .shell_allowlist
        .iter()
        .any(|allowed| allowed == program)
    {
        return ExecOutcome::refused(
            "not_allowlisted",
            format!("{program:?} is not in this agent's shell_allowlist"),
        );
    }
    if p.argv.iter().any(|a| a.contains('\0')) {
        return ExecOutcome::refused("bad_params", "arguments cannot contain NUL bytes");
    }
    let cap = usize::try_from(config.max_output_bytes).unwrap_or(usize::MAX);
    let timeout = Duration::from_secs(config.shell_timeout_secs);
    let finished = match run_capped(&p.argv, timeout, cap).await {
        Ok(finished) => finished,
        Err(RunError::TimedOut) => {
            return ExecOutcome::failed(format!(
                "{program} timed out after {} s and was killed",
                config.shell_timeout_secs
            ));
        }
        Err(e) => return ExecOutcome::failed(format!("{program}: {e}")),
    };
    let (output, truncated) = combined_output(&finished, cap);
    let mut detail = match (finished.code, finished.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "exit status unknown".to_owned(),
    };
    detail.push_str(&format!(
        "; stdout {} bytes, stderr {} bytes",
        finished.stdout.total, finished.stderr.total
    ));
    if truncated {
        detail.push_str(&format!("; output capped at {cap} bytes"));
    }
    if finished.code == Some(0) {
        ExecOutcome::done(
            format!("Ran {program}"),
            detail,
            (!output.is_empty()).then_some(output),
        )
    } else {
        let stderr = String::from_utf8_lossy(&finished.stderr.kept);
        let hint = if stderr.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", summary(stderr.trim(), 500))
        };
        ExecOutcome::failed(format!("{program} failed ({detail}){hint}"))
    }
}

/// stdout, then stderr under a `[stderr]` marker, capped at `cap` bytes in total.
fn combined_output(finished: &Finished, cap: usize) -> (String, bool) {
    let mut text = String::from_utf8_lossy(&finished.stdout.kept).into_owned();
    if !finished.stderr.kept.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&String::from_utf8_lossy(&finished.stderr.kept));
    }
    let truncated = finished.stdout.truncated() || finished.stderr.truncated() || text.len() > cap;
    (truncate_str(&text, cap).to_owned(), truncated)
}
