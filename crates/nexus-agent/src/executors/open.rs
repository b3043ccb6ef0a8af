//! `os.open_url` (http/https only) and `os.open_app` (from the configured `apps` map only).
//!
//! Both start a program directly, never through a shell. On Windows that rules out
//! `cmd /c start <url>` (cmd would interpret `&`, `|` and `^` inside the URL); the URL goes to
//! `rundll32 url.dll,FileProtocolHandler` instead. With `NEXUS_AGENT_DRY_RUN_OPEN=1` nothing is
//! started and the outcome says what would have been.

use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use super::ExecOutcome;
use crate::config::AgentConfig;

/// Longest URL `os.open_url` accepts.
pub const MAX_URL_LEN: usize = 2048;

/// How long to wait for the opener to fail fast; after that it is taken as launched.
const LAUNCH_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OpenUrlParams {
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OpenAppParams {
    app_id: String,
}

/// Accepts `http://host…` and `https://host…` only, without whitespace or control characters.
pub fn valid_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("URL longer than {MAX_URL_LEN} bytes"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL contains whitespace or control characters".to_owned());
    }
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .ok_or("only http:// and https:// URLs are opened")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err("URL has no host".to_owned());
    }
    Ok(())
}

/// The opener argv for this platform.
fn opener(url: &str) -> Vec<String> {
    platform_opener()
        .into_iter()
        .map(str::to_owned)
        .chain([url.to_owned()])
        .collect()
}

#[cfg(target_os = "macos")]
fn platform_opener() -> Vec<&'static str> {
    vec!["open"]
}

#[cfg(windows)]
fn platform_opener() -> Vec<&'static str> {
    vec!["rundll32", "url.dll,FileProtocolHandler"]
}

#[cfg(not(any(target_os = "macos", windows)))]
fn platform_opener() -> Vec<&'static str> {
    vec!["xdg-open"]
}

/// Starts `argv` and gives it [`LAUNCH_GRACE`] to fail; still running after that counts as
/// launched (it is left running and reaped by tokio when it ends).
pub(super) async fn launch(argv: &[String]) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty argv".to_owned());
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    match tokio::time::timeout(LAUNCH_GRACE, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} failed ({status})")),
        Ok(Err(e)) => Err(format!("waiting for {program} failed: {e}")),
        Err(_) => Ok(()),
    }
}

pub(super) async fn open_url(p: OpenUrlParams, dry_run: bool) -> ExecOutcome {
    if let Err(why) = valid_url(&p.url) {
        return ExecOutcome::refused("bad_params", why);
    }
    let argv = opener(&p.url);
    if dry_run {
        return ExecOutcome::done(
            "Would open URL",
            format!("dry run: would open {} (with {})", p.url, argv[0]),
            None,
        );
    }
    match launch(&argv).await {
        Ok(()) => ExecOutcome::done("Opened URL", format!("opened {}", p.url), None),
        Err(e) => ExecOutcome::failed(e),
    }
}

pub(super) async fn open_app(p: OpenAppParams, config: &AgentConfig, dry_run: bool) -> ExecOutcome {
    let Some(argv) = config.apps.get(&p.app_id) else {
        return ExecOutcome::refused(
            "not_allowlisted",
            format!("app {:?} is not in this agent's apps", p.app_id),
        );
    };
    if dry_run {
        return ExecOutcome::done(
            "Would open app",
            format!("dry run: would start {} ({:?})", p.app_id, argv),
            None,
        );
    }
    match launch(argv).await {
        Ok(()) => ExecOutcome::done("Opened app", format!("started {}", p.app_id), None),
        Err(e) => ExecOutcome::failed(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls() {
        for ok in [
            "https://example.com",
            "http://example.com/a?b=c#d",
            "HTTPS://Example.com:8443/x",
            "https://user@host/",
        ] {
            assert!(super::valid_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "file:///etc/passwd",
            "javascript:alert(1)",
            "ftp://example.com",
            "https://",
            "https:///path",
            "https://:80/",
            "https://exa mple.com",
            "https://example.com/\n",
            "example.com",
            "-https://example.com",
        ] {
            assert!(super::valid_url(bad).is_err(), "{bad}");
        }
        assert!(super::valid_url(&format!("https://e.com/{}", "a".repeat(3000))).is_err());
    }
}
