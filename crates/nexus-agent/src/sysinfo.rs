//! Facts about this machine for `system.info` (and for the runtime's pairing/heartbeat
//! metadata): OS, architecture, hostname, uptime, agent version. Best effort and without extra
//! dependencies: each fact comes from the cheapest source the platform offers, and an unknown
//! value is `None` rather than an error.

use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;

/// A snapshot of the facts `system.info` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SystemInfo {
    /// `linux`, `macos`, `windows`, … (Rust's `std::env::consts::OS`).
    pub os: &'static str,
    /// OS family: `unix` or `windows`.
    pub family: &'static str,
    pub arch: &'static str,
    pub hostname: Option<String>,
    /// Seconds since the machine booted, when the platform tells.
    pub uptime_secs: Option<u64>,
    /// Seconds since this agent process first asked (≈ since it started).
    pub agent_uptime_secs: u64,
    pub agent_version: &'static str,
}

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Call early in the process so `agent_uptime_secs` counts from start-up.
pub fn mark_start() {
    STARTED.get_or_init(Instant::now);
}

pub fn collect() -> SystemInfo {
    SystemInfo {
        os: std::env::consts::OS,
        family: std::env::consts::FAMILY,
        arch: std::env::consts::ARCH,
        hostname: hostname(),
        uptime_secs: uptime_secs(),
        agent_uptime_secs: STARTED.get_or_init(Instant::now).elapsed().as_secs(),
        agent_version: env!("CARGO_PKG_VERSION"),
    }
}

/// The machine's host name.
pub fn hostname() -> Option<String> {
    platform::hostname()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

pub fn uptime_secs() -> Option<u64> {
    platform::uptime_secs()
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(target_os = "linux")]
mod platform {
    pub fn hostname() -> Option<String> {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| super::command_output("hostname", &[]))
    }

    /// `/proc/uptime`: "<seconds since boot> <idle seconds>".
    pub fn uptime_secs() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/uptime").ok()?;
        let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
        Some(secs as u64)
    }
}

#[cfg(target_os = "macos")]
mod platform {
    pub fn hostname() -> Option<String> {
        super::command_output("hostname", &[])
    }

    /// `sysctl -n kern.boottime` prints `{ sec = 1700000000, usec = 0 } …`.
    pub fn uptime_secs() -> Option<u64> {
        let text = super::command_output("sysctl", &["-n", "kern.boottime"])?;
        let boot: u64 = text
            .split("sec =")
            .nth(1)?
            .split(',')
            .next()?
            .trim()
            .parse()
            .ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        now.checked_sub(boot)
    }
}

#[cfg(windows)]
mod platform {
    pub fn hostname() -> Option<String> {
        std::env::var("COMPUTERNAME")
            .ok()
            .or_else(|| super::command_output("hostname", &[]))
    }

    /// No dependency-free source that is cheap and reliable; reported as unknown.
    pub fn uptime_secs() -> Option<u64> {
        None
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
mod platform {
    pub fn hostname() -> Option<String> {
        super::command_output("hostname", &[])
    }

    pub fn uptime_secs() -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn collects_something_sensible() {
        super::mark_start();
        let info = super::collect();
        assert_eq!(info.os, std::env::consts::OS);
        assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
        #[cfg(target_os = "linux")]
        {
            assert!(info.hostname.is_some());
            assert!(info.uptime_secs.is_some());
        }
    }
}
